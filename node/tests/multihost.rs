//! Multi-host scenarios: a swarm of real `peervm` processes, each host a network namespace
//! of its own on a test bridge (tests/common/netns.rs), under faults: providers cut off
//! for longer than the advert TTL, a bootstrap killed and restarted, loss and delay on
//! every link. 2 bootstraps, 6 providers and 3 requestors (`peervm offers --json` in
//! their namespaces) on 11 hosts.
//!
//! Providers run with `[advert] ttl_secs = 10`, `republish_secs = 3`. `provider run`
//! checks at start what guests need (root, QEMU, the guest image): missing any of it fails
//! under CI=true and skips otherwise. One scenario boots a guest: a lease made from a
//! requestor host, then its provider killed with SIGKILL and restarted on its host (the
//! same on loopback is lease_cli.rs's
//! `provider_killed_under_a_running_lease_then_restarted_serves_or_cleans_it`).
//!
//! Each test has a test bed number of its own (names, bridge, subnet), so they run in
//! parallel with each other and with the other tests; each checks that nothing of its
//! test bed is left afterwards.

mod common;
#[path = "common/netns.rs"]
mod netns;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::{HANG_GUARD, Needs};
use netns::{Impairment, ProviderConfig, TestNet};

const BOOTSTRAPS: usize = 2;
const PROVIDERS: usize = 6;
const REQUESTORS: usize = 3;
const TTL_SECS: u64 = 10;
const REPUBLISH_SECS: u64 = 3;

/// What one requestor's `peervm offers` listed: provider -> (seq, ssh host).
type Listed = BTreeMap<String, (u64, String)>;

/// One look at the whole swarm.
#[derive(Debug)]
struct View {
    /// Per requestor: what its `peervm offers` listed, or why it failed.
    offers: Vec<Result<Listed, String>>,
    /// Per running node: its name, index and the live adverts in its store.
    stores: Vec<(String, usize, Option<u64>)>,
}

impl View {
    /// How many offers each requestor saw (or `err`), and each node's store size.
    fn summary(&self) -> String {
        let offers: Vec<String> =
            self.offers.iter().map(|o| o.as_ref().map_or_else(|e| format!("({e})"), |m| m.len().to_string())).collect();
        let stores: Vec<String> = self
            .stores
            .iter()
            .map(|(name, _, size)| format!("{name}={}", size.map_or("?".to_string(), |s| s.to_string())))
            .collect();
        format!("offers [{}] stores {}", offers.join(","), stores.join(" "))
    }
}

/// The swarm on a test bed.
struct Market {
    net: TestNet,
    /// Node indices.
    boots: Vec<usize>,
    boot_addrs: Vec<String>,
    providers: Vec<usize>,
    /// Requestor hosts.
    requestors: Vec<usize>,
    /// The bootstraps each requestor's `offers` goes through.
    routes: Vec<Vec<String>>,
    /// Killed nodes (not asked for their store).
    down: BTreeSet<usize>,
}

impl Market {
    /// 2 bootstraps, 6 providers and 3 requestor hosts on a new test bed.
    fn start(id: u8) -> Market {
        Market::on(TestNet::new(id, BOOTSTRAPS + PROVIDERS + REQUESTORS))
    }

    /// Starts the swarm on `net` (hosts 0-1 bootstraps, 2-7 providers, 8-10 requestors).
    /// The bootstraps' keys are made first, so each is told the other's address.
    fn on(mut net: TestNet) -> Market {
        let ids: Vec<String> = (0..BOOTSTRAPS).map(|b| net.init_key(&format!("boot{b}"))).collect();
        let boot_addrs: Vec<String> = (0..BOOTSTRAPS).map(|b| format!("{}/p2p/{}", net.p2p_addr(b), ids[b])).collect();
        let boots: Vec<usize> = (0..BOOTSTRAPS)
            .map(|b| {
                let others: Vec<String> =
                    boot_addrs.iter().enumerate().filter(|(o, _)| *o != b).map(|(_, a)| a.clone()).collect();
                net.launch_bootstrap(b, &format!("boot{b}"), &others)
            })
            .collect();
        for (b, &node) in boots.iter().enumerate() {
            assert_eq!(net.await_startup(node).addr(), boot_addrs[b]);
        }
        let requestors: Vec<usize> = (BOOTSTRAPS + PROVIDERS..BOOTSTRAPS + PROVIDERS + REQUESTORS).collect();
        let routes = vec![vec![boot_addrs[0].clone()], vec![boot_addrs[1].clone()], boot_addrs.clone()];
        let mut m = Market { net, boots, boot_addrs, providers: Vec::new(), requestors, routes, down: BTreeSet::new() };
        let launched: Vec<usize> = (BOOTSTRAPS..BOOTSTRAPS + PROVIDERS).map(|h| m.launch_provider(h)).collect();
        for p in launched {
            m.net.await_startup(p);
        }
        m
    }

    /// Starts provider number `providers.len()` on `host` (given both bootstraps).
    fn launch_provider(&mut self, host: usize) -> usize {
        let k = self.providers.len();
        let id = self.net.id();
        let config = ProviderConfig {
            bootstrap: self.boot_addrs.clone(),
            name_prefix: format!("pvmh{id}p{k}"),
            iface_prefix: format!("{}{}", (b'l' + id) as char, (b'a' + k as u8) as char),
            pool: format!("10.219.{}.0/24", u32::from(id) * 10 + k as u32),
            ttl_secs: TTL_SECS,
            republish_secs: REPUBLISH_SECS,
            vcpus: 2,
            image_dir: common::image_dir(),
        };
        let node = self.net.launch_provider(host, &format!("provider{k}"), &config);
        self.providers.push(node);
        node
    }

    fn ids(&self, providers: &[usize]) -> BTreeSet<String> {
        providers.iter().map(|&p| self.net.node(p).peer_id().to_string()).collect()
    }

    fn running(&self) -> Vec<usize> {
        self.boots.iter().chain(&self.providers).copied().filter(|n| !self.down.contains(n)).collect()
    }

    /// Every requestor's offers and every running node's store size, asked in parallel.
    fn view(&self) -> View {
        std::thread::scope(|s| {
            let offers: Vec<_> = self
                .requestors
                .iter()
                .zip(&self.routes)
                .map(|(&host, route)| s.spawn(move || self.net.offers(host, route)))
                .collect();
            let stores: Vec<_> = self
                .running()
                .into_iter()
                .map(|n| s.spawn(move || (self.net.node(n).name.clone(), n, self.net.store_size(n))))
                .collect();
            View {
                offers: offers
                    .into_iter()
                    .map(|j| {
                        let list = j.join().expect("offers thread")?;
                        Ok(list
                            .iter()
                            .map(|o| {
                                let seq = o["seq"].as_u64().unwrap_or(0);
                                let host = o["ssh_host"].as_str().unwrap_or("").to_string();
                                (o["provider"].as_str().unwrap_or("").to_string(), (seq, host))
                            })
                            .collect())
                    })
                    .collect(),
                stores: stores.into_iter().map(|j| j.join().expect("metrics thread")).collect(),
            }
        })
    }

    /// True when every requestor lists exactly `expect` and every running node's store
    /// holds `store(node)` adverts.
    fn sees(&self, v: &View, expect: &BTreeSet<String>, store: impl Fn(usize) -> u64) -> bool {
        let offers_ok = v.offers.iter().all(|o| o.as_ref().is_ok_and(|m| m.keys().eq(expect.iter())));
        offers_ok && v.stores.iter().all(|(_, n, size)| *size == Some(store(*n)))
    }

    /// Looks (bounded: `within`, then panics with the last look) until `ok` holds;
    /// returns the time from the call to the end of the look that saw it (an upper
    /// bound), and that look.
    fn wait(&self, within: Duration, what: &str, ok: impl Fn(&View) -> bool) -> (Duration, View) {
        let start = Instant::now();
        let mut looks = 0;
        loop {
            let v = self.view();
            looks += 1;
            // one line per look (shown when the test fails, or with --nocapture)
            eprintln!("  [{:>5.1?}] {what}: {}", start.elapsed(), v.summary());
            if ok(&v) {
                return (start.elapsed(), v);
            }
            if start.elapsed() > within {
                panic!("{what}: not within {within:?} ({looks} looks); the last one:\n{v:#?}");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Each provider's seq as the last requestor (both bootstraps) saw it.
    fn seqs(v: &View) -> BTreeMap<String, u64> {
        let last = v.offers.last().and_then(|o| o.as_ref().ok()).expect("the last requestor's offers");
        last.iter().map(|(p, (seq, _))| (p.clone(), *seq)).collect()
    }

    /// True when every requestor lists every provider of `before` with a newer seq.
    fn newer_everywhere(v: &View, before: &BTreeMap<String, u64>) -> bool {
        v.offers
            .iter()
            .all(|o| o.as_ref().is_ok_and(|m| before.iter().all(|(p, s)| m.get(p).is_some_and(|(seq, _)| seq > s))))
    }
}

/// The test bed is gone once dropped.
fn assert_clean(id: u8) {
    let left = netns::leftovers(id);
    assert!(left.is_empty(), "test bed {id} left {left:?}");
}

#[ignore = "needs root: hosts in network namespaces"]
#[test]
fn eleven_hosts_every_offer_is_visible_everywhere() {
    Needs::guests().and(Needs::netns()).require();
    let t0 = Instant::now();
    let m = Market::start(1);
    let started = t0.elapsed();
    for &n in m.boots.iter().chain(&m.providers) {
        m.net.check_in_namespace(n).unwrap();
    }
    // `ip netns exec` execs in place: its child is the requestor's peervm itself, inside
    // the requestor's namespace, and killing the child kills peervm.
    let r = m.requestors[0];
    let mut watch = m.net.netns_exec(r, netns::PEERVM);
    watch.args(["offers", "--watch", "--json", "--bootstrap", &m.boot_addrs[0]]);
    let mut watch = watch.stdout(std::process::Stdio::null()).spawn().unwrap();
    let pid = watch.id();
    let checked = (0..100).find_map(|_| {
        std::thread::sleep(Duration::from_millis(50)); // `ip` until it execs
        m.net.check_process(pid, r).ok()
    });
    let _ = watch.kill();
    let status = watch.wait().unwrap();
    assert!(checked.is_some(), "{:?}", m.net.check_process(pid, r));
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "peervm {pid} outlived its kill ({status})");
    let all = m.ids(&m.providers);
    assert_eq!(all.len(), PROVIDERS);
    let (took, v) = m.wait(HANG_GUARD, "every offer visible everywhere", |v| m.sees(v, &all, |_| PROVIDERS as u64));
    // Each offer names its provider's own host: the adverts came from the namespaces.
    let hosts: BTreeMap<String, String> = m
        .providers
        .iter()
        .map(|&p| (m.net.node(p).peer_id().into(), m.net.host(m.net.node(p).host).addr.to_string()))
        .collect();
    for offers in &v.offers {
        for (p, (_, ssh_host)) in offers.as_ref().unwrap() {
            assert_eq!(Some(ssh_host), hosts.get(p), "{p}");
        }
    }
    eprintln!("multihost: 11 hosts up in {started:.1?}; every offer everywhere by {took:.1?} later");
    drop(m);
    assert_clean(1);
}

#[ignore = "needs root: hosts in network namespaces"]
#[test]
fn cut_off_providers_expire_elsewhere_and_are_back_everywhere_after_healing() {
    Needs::guests().and(Needs::netns()).require();
    let m = Market::start(2);
    let all = m.ids(&m.providers);
    m.wait(HANG_GUARD, "every offer visible everywhere", |v| m.sees(v, &all, |_| PROVIDERS as u64));

    let (cut, kept) = m.providers.split_at(3);
    let kept_ids = m.ids(kept);
    let t_cut = Instant::now();
    for &p in cut {
        m.net.cut(m.net.node(p).host);
    }
    // Elsewhere the cut providers' adverts run out at their expiry; the cut providers,
    // alone, keep only their own.
    let (expired, _) = m.wait(HANG_GUARD, "the cut providers' adverts expire elsewhere", |v| {
        m.sees(v, &kept_ids, |n| if cut.contains(&n) { 1 } else { kept.len() as u64 })
    });
    let min_cut = Duration::from_secs(TTL_SECS + 3);
    if let Some(rest) = min_cut.checked_sub(t_cut.elapsed()) {
        std::thread::sleep(rest);
    }
    let cut_for = t_cut.elapsed();

    for &p in cut {
        m.net.heal(m.net.node(p).host);
    }
    let (back, _) =
        m.wait(HANG_GUARD, "the healed providers' adverts back everywhere", |v| m.sees(v, &all, |_| PROVIDERS as u64));
    eprintln!(
        "multihost: cut providers' adverts gone elsewhere by {expired:.1?} after the cut (TTL {TTL_SECS} s); \
         cut for {cut_for:.1?}; back everywhere by {back:.1?} after healing"
    );
    drop(m);
    assert_clean(2);
}

#[ignore = "needs root: hosts in network namespaces"]
#[test]
fn bootstrap_killed_joins_and_propagation_continue_through_the_other() {
    Needs::guests().and(Needs::netns()).require();
    let mut m = Market::start(3);
    let all = m.ids(&m.providers);
    let (_, v) = m.wait(HANG_GUARD, "every offer visible everywhere", |v| m.sees(v, &all, |_| PROVIDERS as u64));
    let before = Market::seqs(&v);

    let dead = m.boots[0];
    let t_kill = Instant::now();
    assert!(m.net.kill9(dead).is_some(), "the bootstrap was not running");
    m.down.insert(dead);
    let alone = m.net.offers(m.requestors[0], &m.boot_addrs[..1]);
    let err = alone.expect_err("offers through the killed bootstrap alone");
    assert!(err.contains("could not reach any bootstrap node"), "{err}");

    // Every requestor now joins given both bootstraps, the first dead: newer adverts of
    // every provider reach all of them, and every running node.
    m.routes = vec![m.boot_addrs.clone(); REQUESTORS];
    let (propagated, _) = m.wait(HANG_GUARD, "newer adverts everywhere after the kill", |v| {
        m.sees(v, &all, |_| PROVIDERS as u64) && Market::newer_everywhere(v, &before)
    });

    // A provider that starts now, given both bootstraps, joins through the other.
    let host = m.net.add_host();
    let late = m.launch_provider(host);
    m.net.await_startup(late);
    let seven = m.ids(&m.providers);
    let (joined, _) = m.wait(HANG_GUARD, "a provider started after the kill reaches everyone", |v| {
        m.sees(v, &seven, |_| PROVIDERS as u64 + 1)
    });

    // A TTL after the kill every advert that existed then has expired: every running
    // node still holding every provider's advert shows that refreshes keep reaching all.
    let ttl_after_kill = Duration::from_secs(TTL_SECS + 1);
    if let Some(rest) = ttl_after_kill.checked_sub(t_kill.elapsed()) {
        std::thread::sleep(rest);
    }
    m.wait(HANG_GUARD, "every advert refreshed everywhere a TTL after the kill", |v| {
        m.sees(v, &seven, |_| PROVIDERS as u64 + 1)
    });

    // The killed bootstrap restarts (same key, same address) and catches up; a requestor
    // that knows only it sees the whole market again.
    assert_eq!(m.net.restart(dead).addr(), m.boot_addrs[0]);
    m.down.remove(&dead);
    m.routes[0] = vec![m.boot_addrs[0].clone()];
    let (caught_up, _) =
        m.wait(HANG_GUARD, "the restarted bootstrap has the market", |v| m.sees(v, &seven, |_| PROVIDERS as u64 + 1));
    eprintln!(
        "multihost: after kill -9 of a bootstrap: newer adverts everywhere by {propagated:.1?}, a new provider \
         everywhere by {joined:.1?} after its start, every advert refreshed everywhere a TTL after the kill; \
         the restarted bootstrap caught up by {caught_up:.1?} ({:.1?} in all); through the dead one alone: {err}",
        t_kill.elapsed()
    );
    drop(m);
    assert_clean(3);
}

#[ignore = "needs root: hosts in network namespaces"]
#[test]
fn ten_percent_loss_and_50ms_delay_on_every_link_propagation_reaches_every_node() {
    Needs::guests().and(Needs::netns()).require();
    let imp = Impairment { loss_percent: 10.0, delay: Duration::from_millis(50) };
    let mut net = TestNet::new(4, BOOTSTRAPS + PROVIDERS + REQUESTORS);
    let backends: BTreeSet<_> = (0..net.hosts()).map(|h| net.impair(h, imp)).collect();
    // The links do what they are told: a datagram to another host and back crosses four
    // impaired hops (0.9^4 = 66% make it), each 50 ms. (Short probes first, until the
    // two hosts have resolved each other's addresses through the lossy links.)
    for _ in 0..5 {
        if net.udp_echo_probe(10, 0, 20).echoed >= 5 {
            break;
        }
    }
    let probe = net.udp_echo_probe(10, 0, 300);
    let rate = probe.echoed as f64 / probe.sent as f64;
    let rtt = probe.min_rtt.expect("no echo came back");
    assert!((0.45..0.85).contains(&rate), "{probe:?}");
    assert!(rtt >= Duration::from_millis(195) && rtt < Duration::from_millis(400), "{probe:?}");

    let t0 = Instant::now();
    let m = Market::on(net);
    let started = t0.elapsed();
    let all = m.ids(&m.providers);
    let (took, v) = m.wait(HANG_GUARD, "every offer visible everywhere under loss and delay", |v| {
        m.sees(v, &all, |_| PROVIDERS as u64)
    });
    let before = Market::seqs(&v);
    let (newer, _) = m.wait(HANG_GUARD, "newer adverts everywhere under loss and delay", |v| {
        m.sees(v, &all, |_| PROVIDERS as u64) && Market::newer_everywhere(v, &before)
    });
    eprintln!(
        "multihost: loss and delay by {backends:?}; probe {probe:?}; 11 hosts up in {started:.1?}; every offer \
         everywhere by {took:.1?} later; newer adverts everywhere by {newer:.1?} after that"
    );
    drop(m);
    assert_clean(4);
}

#[ignore = "needs root: hosts in network namespaces"]
#[test]
fn provider_restarted_under_a_running_lease_exec_still_works_or_the_lease_is_cleanly_failed() {
    Needs::guests().and(Needs::netns()).require();
    // host 0 bootstrap, host 1 provider, host 2 requestor
    let mut net = TestNet::new(5, 3);
    let boot_id = net.init_key("boot");
    let boot = format!("{}/p2p/{boot_id}", net.p2p_addr(0));
    net.spawn_bootstrap(0, "boot", &[]);
    // The provider's data dir is where `Site::leftovers` looks for its lease directories.
    let site =
        common::Site { prefix: "pvmh5p0", iface: "qa", net: "10.219.50", port_min: 22000, vcpus: 2, memory: "1GiB" };
    let config = ProviderConfig {
        bootstrap: vec![boot.clone()],
        name_prefix: site.prefix.into(),
        iface_prefix: site.iface.into(),
        pool: format!("{}.0/24", site.net),
        ttl_secs: TTL_SECS,
        republish_secs: REPUBLISH_SECS,
        vcpus: 2,
        image_dir: common::image_dir(),
    };
    let data_name = site.data(net.dir()).file_name().expect("data dir name").to_string_lossy().into_owned();
    let provider = net.launch_provider(1, &data_name, &config);
    let provider_id = net.await_startup(provider).peer_id().to_string();
    let provider_host = net.host(1).addr.to_string();

    common::wait_for(HANG_GUARD, || {
        let offers = net.offers(2, std::slice::from_ref(&boot)).ok()?;
        offers.iter().any(|o| o["provider"] == provider_id).then_some(())
    })
    .expect("the provider's offer never reached the requestor host");

    let t0 = Instant::now();
    let mut create = vec!["lease", "create", "--bootstrap", &boot, "--json"];
    create.extend_from_slice(&common::SMALL_LEASE);
    let out = net.requestor(2, &create, Duration::from_secs(180));
    assert!(out.success(), "lease create from the requestor host: {}", out.stderr);
    let lease: serde_json::Value = serde_json::from_str(out.stdout.trim()).expect("lease create JSON");
    let id = lease["lease"].as_str().expect("lease id").to_string();
    assert_eq!(lease["ssh"]["host"].as_str(), Some(provider_host.as_str()), "{lease}");
    let granted = t0.elapsed();
    let out = net.requestor(2, &["exec", &id, "--", "echo", "before"], Duration::from_secs(60));
    assert!(out.stdout.contains("before"), "exec across hosts before the restart: {}", out.stderr);

    // SIGKILL: no withdrawal, no teardown; then the same node again on the same host.
    assert!(net.kill9(provider).is_some(), "the provider was not running");
    let t_restart = Instant::now();
    assert_eq!(net.restart(provider).peer_id(), provider_id, "same identity after the restart");

    let out = net.requestor(2, &["lease", "status", &id, "--json", "--bootstrap", &boot], Duration::from_secs(60));
    assert!(out.success(), "lease status after the restart: {}", out.stderr);
    let status: serde_json::Value = serde_json::from_str(out.stdout.trim()).expect("lease status JSON");
    let outcome = match status["state"].as_str() {
        Some("running") => {
            let out = net.requestor(2, &["exec", &id, "--", "echo", "after"], Duration::from_secs(60));
            assert!(
                out.stdout.contains("after"),
                "re-adopted guest unreachable from the requestor host: {}",
                out.stderr
            );
            let out = net.requestor(2, &["lease", "terminate", &id, "--bootstrap", &boot], Duration::from_secs(60));
            assert!(out.success(), "terminate after the restart: {}", out.stderr);
            "re-adopted: exec worked, then terminated"
        }
        Some("failed") => {
            // A cleanly failed lease: `exec` says so instead of hanging or reaching
            // another guest.
            let out = net.requestor(2, &["exec", &id, "--", "true"], Duration::from_secs(60));
            assert!(!out.success(), "exec on a failed lease succeeded");
            "failed cleanly"
        }
        other => panic!("lease is {other:?} after the restart: {status}"),
    };
    let left = site.wait_clean(net.dir(), HANG_GUARD);
    assert!(left.is_empty(), "left behind by the lease: {left:?}");
    eprintln!(
        "multihost: lease granted across hosts in {granted:.1?}; provider killed and restarted; {outcome} \
         {:.1?} after the restart",
        t_restart.elapsed()
    );
    drop(net);
    assert_clean(5);
}
