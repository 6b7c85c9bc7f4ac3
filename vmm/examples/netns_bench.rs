//! Network provisioning benchmark (issue 19): how long one lease's network takes to set
//! up and to tear down, alone: namespace, veth pair, address, bridge, tap and the
//! nftables table, then their removal (`network.rs`), with no guest, overlay or cgroup.
//!
//! Run as root (needs nftables and /dev/net/tun):
//!     cargo run -p peervm-vmm --example netns_bench -- [rounds]
//! Prints the median, minimum and maximum of each to stderr and one JSON object per
//! median (name, value, unit) on stdout. Uses the prefixes pvnb/nb and 10.214.24.0/30,
//! which no test uses.

use std::time::{Duration, Instant};

use peervm_vmm::network::{setup_lease_network, teardown_lease_network};
use peervm_vmm::{AddressPool, EgressPolicy, LeaseId, NamePrefix};

fn summary(name: &str, mut v: Vec<Duration>) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let median = ms(v[v.len() / 2]);
    eprintln!(
        "{name}: median {median:.2} ms, min {:.2} ms, max {:.2} ms ({} rounds)",
        ms(v[0]),
        ms(v[v.len() - 1]),
        v.len()
    );
    println!(r#"{{"name": "{name}, median", "value": {median:.2}, "unit": "ms"}}"#);
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let rounds: usize = std::env::args().nth(1).map_or(20, |s| s.parse().expect("rounds: a number"));
    let names = NamePrefix::new("pvnb", "nb").expect("prefixes");
    let pool: AddressPool = "10.214.24.0/30".parse().expect("pool");
    let (mut setup, mut teardown) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let mut id = [0x5a; 16];
        id[15] = round as u8;
        let lease = LeaseId::from_bytes(id);
        let started = Instant::now();
        let made =
            setup_lease_network(&names, &lease, pool.slot(0).expect("slot"), EgressPolicy::PublicOnly, pool).await;
        setup.push(started.elapsed());
        let started = Instant::now();
        teardown_lease_network(&names, &lease).await.expect("network teardown failed");
        teardown.push(started.elapsed());
        made.expect("network setup failed");
    }
    summary("lease network setup (netns, veth, address, bridge, tap, nft table)", setup);
    summary("lease network teardown (nft table, netns, veth)", teardown);
}
