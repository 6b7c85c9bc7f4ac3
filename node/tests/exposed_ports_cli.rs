//! Exposed ports (docs/architecture.md "Exposed ports"): a guest's HTTP server answers on
//! the host port its grant names, and nothing else of the guest does; another lease's
//! mapping reaches only that lease; a privileged port the provider does not allow gets a
//! signed invalid_spec and starts nothing; isolate and the lease's end close the ports.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use common::*;

/// What an HTTP GET of `/` on 127.0.0.1:`port` returns (empty when the connection is
/// accepted and closed); `None` when nothing listens.
fn http_get(port: u16) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(30))).ok()?;
    let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\n");
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    Some(body)
}

fn exposed(lease: &serde_json::Value) -> Vec<(u64, u64)> {
    lease["exposed"]
        .as_array()
        .expect("exposed list")
        .iter()
        .map(|p| (p["guest_port"].as_u64().expect("guest port"), p["host_port"].as_u64().expect("host port")))
        .collect()
}

/// Serves `text` on each of the guest's `ports` with busybox httpd (it daemonizes).
fn serve(req: &std::path::Path, lease: &str, text: &str, ports: &[u16]) {
    let mut script = format!("mkdir -p /tmp/www && echo {text} > /tmp/www/index.html");
    for p in ports {
        script += &format!(" && busybox httpd -p {p} -h /tmp/www");
    }
    let out = peervm(req, &["exec", lease, "--", "sh", "-c", &script]);
    assert!(out.status.success(), "httpd in {lease}: {}", stderr(&out));
}

const RANGE: std::ops::RangeInclusive<u16> = 27720..=27751;

#[ignore = "needs root: runs a provider that boots guests"]
#[test]
fn an_exposed_guest_port_answers_on_its_mapped_host_port_and_nothing_else_does() {
    Needs::guests().require();
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let site = Site { prefix: "pvex", iface: "ex", net: "10.215.30", port_min: 27700, vcpus: 2, memory: "1GiB" };
    let (_boot, boot) = start_bootstrap(root);
    let mut toml = site.toml(&boot);
    // 2 ports per lease, a block for each of the 16 lease slots (the SSH port range)
    toml.extra_network = vec![
        "max_exposed_ports = 2".into(),
        format!("expose_port_min = {}", RANGE.start()),
        format!("expose_port_max = {}", RANGE.end()),
    ];
    let config = toml.write(&root.join("pvex.toml"));
    let (_provider, line) =
        spawn_json(&["provider", "run", "--config", config.to_str().expect("utf8")], &site.data(root));
    let provider = line["peer_id"].as_str().expect("peer id").to_string();
    wait_for(HANG_GUARD, || free_vcpus(&boot, &provider)).expect("the provider's offer is visible");
    // `offers --exposed-ports 2` finds it and shows what it allows (the filter's
    // refusals are unit-tested: advert_store::tests::query_filters_on_the_ports_a_lease_may_expose)
    let allows_two = wait_for(HANG_GUARD, || {
        offers_with(&boot, &["--exposed-ports", "2"])
            .into_iter()
            .find(|o| o["provider"] == provider.as_str())
            .and_then(|o| o["max_exposed_ports"].as_u64())
    });
    assert_eq!(allows_two, Some(2), "offers --exposed-ports 2 does not list the provider");
    let req = root.join("requestor");
    let small = |extra: &[&str]| {
        let mut args = vec!["--provider", provider.as_str()];
        args.extend_from_slice(&SMALL_LEASE);
        args.extend_from_slice(extra);
        args.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };

    // Lease A exposes 8000 and 8001; its grant names the host ports of its block.
    let a_args = small(&["--expose", "8000", "--expose", "8001"]);
    let a = lease_create(&req, &boot, &a_args.iter().map(String::as_str).collect::<Vec<_>>());
    let a_id = a["lease"].as_str().expect("lease id").to_string();
    let a_ports = exposed(&a);
    assert_eq!(a_ports.iter().map(|p| p.0).collect::<Vec<_>>(), [8000, 8001], "{a}");
    assert!(a_ports.iter().all(|p| RANGE.contains(&(p.1 as u16))), "{a}");
    serve(&req, &a_id, "lease-A", &[8000, 9000]);
    let a_http = a_ports[0].1 as u16;
    let body = wait_for(HANG_GUARD, || http_get(a_http).filter(|b| b.contains("lease-A"))).expect("A's page");
    assert!(body.starts_with("HTTP/1."), "{body}");
    // 8001 is mapped but nothing listens in the guest: accepted, then closed, no page
    assert_eq!(http_get(a_ports[1].1 as u16).map(|b| b.contains("lease-A")), Some(false));
    // 9000 serves in the guest but is not exposed: no host port of the range reaches it
    let mapped: Vec<u16> = a_ports.iter().map(|p| p.1 as u16).collect();
    for port in RANGE.filter(|p| !mapped.contains(p)) {
        assert!(http_get(port).is_none(), "host port {port} answers though no lease maps it");
    }
    let st = peervm(&req, &["lease", "status", &a_id]);
    assert!(stdout(&st).contains(&format!("exposed   guest port 8000 at 127.0.0.1:{a_http}")), "{}", stdout(&st));

    // A privileged port this provider does not allow: a signed invalid_spec, nothing runs.
    let denied = peervm(
        &req,
        &["lease", "create", "--bootstrap", &boot]
            .into_iter()
            .chain(small(&["--expose", "80"]).iter().map(String::as_str))
            .collect::<Vec<_>>(),
    );
    assert!(!denied.status.success(), "a port below 1024 was granted");
    assert!(stderr(&denied).contains("invalid_spec") && stderr(&denied).contains("below 1024"), "{}", stderr(&denied));

    // Lease B exposes its own 8000: its mapping reaches B, A's still reaches A.
    let b_args = small(&["--expose", "8000"]);
    let b = lease_create(&req, &boot, &b_args.iter().map(String::as_str).collect::<Vec<_>>());
    let b_id = b["lease"].as_str().expect("lease id").to_string();
    let b_http = exposed(&b)[0].1 as u16;
    assert_ne!(b_http, a_http);
    serve(&req, &b_id, "lease-B", &[8000]);
    wait_for(HANG_GUARD, || http_get(b_http).filter(|b| b.contains("lease-B"))).expect("B's page");
    let again = http_get(a_http).expect("A's port still answers");
    assert!(again.contains("lease-A") && !again.contains("lease-B"), "{again}");

    // Isolating A closes its exposed ports with its SSH port; B's stay.
    let out = peervm(&site.data(root), &["provider", "isolate", &a_id]);
    assert!(out.status.success(), "isolate: {}", stderr(&out));
    assert!(http_get(a_http).is_none(), "an isolated lease's exposed port still answers");
    assert!(http_get(b_http).is_some_and(|b| b.contains("lease-B")));

    for id in [&a_id, &b_id] {
        let out = peervm(&site.data(root), &["provider", "terminate", id]);
        assert!(out.status.success(), "terminate {id}: {}", stderr(&out));
    }
    let left = site.wait_clean(root, HANG_GUARD);
    assert!(left.is_empty(), "left behind: {left:?}");
    assert!(RANGE.clone().all(|p| http_get(p).is_none()), "an exposed port outlived its lease");
}
