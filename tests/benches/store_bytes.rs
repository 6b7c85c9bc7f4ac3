//! Where a store's bytes go, per advert, at 100,000 adverts (issue 18): the heap each
//! component takes, counted by a global allocator that models glibc's chunk sizes (a
//! small allocation takes its size plus an 8-byte header, rounded up to 16, at least 32).
//! Run: `cargo bench -p peervm-tests --bench store_bytes`.
//! First version: measures the store of commit 96b29ef (decoded adverts in an `Arc`).

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use peervm_node::advert_store::AdvertStore;
use peervm_protocol::{Accel, PeerId, Signed, samples};

struct Counting;
static CHUNK: AtomicUsize = AtomicUsize::new(0);
static REQ: AtomicUsize = AtomicUsize::new(0);
static COUNT: AtomicUsize = AtomicUsize::new(0);
fn chunk(n: usize) -> usize { if n >= 128 * 1024 { (n + 4095) & !4095 } else { ((n + 8 + 15) & !15).max(32) } }
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 { CHUNK.fetch_add(chunk(l.size()), Relaxed); REQ.fetch_add(l.size(), Relaxed); COUNT.fetch_add(1, Relaxed); unsafe { System.alloc(l) } }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) { CHUNK.fetch_sub(chunk(l.size()), Relaxed); REQ.fetch_sub(l.size(), Relaxed); COUNT.fetch_sub(1, Relaxed); unsafe { System.dealloc(p, l) } }
}
#[global_allocator]
static A: Counting = Counting;
fn snap() -> (usize, usize, usize) { (CHUNK.load(Relaxed), REQ.load(Relaxed), COUNT.load(Relaxed)) }
fn per(name: &str, b: (usize, usize, usize), n: usize) {
    let a = snap();
    println!("{name:40} chunk {:8.1} B  requested {:8.1} B  allocs {:5.2} per advert", (a.0 as f64 - b.0 as f64) / n as f64, (a.1 as f64 - b.1 as f64) / n as f64, (a.2 as f64 - b.2 as f64) / n as f64);
}

fn advert_number(i: u64) -> peervm_protocol::Verified<peervm_protocol::Advertisement> {
    let now = peervm_node::clock::now_unix_ms();
    let regions = ["eu-central", "eu-west", "us-east", "us-west", "ap-south", "sa-east"];
    let key = samples::numbered_key(i + 1_000_000);
    let mut a = samples::advert(&key, 1, now);
    a.resources.total.vcpus = 1 + (i % 64) as u32;
    a.resources.free.vcpus = 1 + (i % 64) as u32;
    a.resources.total.memory_mib = 1024 * (1 + i % 256);
    a.resources.free.memory_mib = 1024 * (1 + i % 256);
    a.resources.free.disk_gib = a.resources.total.disk_gib.min(10 * (1 + i % 20));
    a.pricing.per_vcpu_hour_micros = 5_000 + (i * 7919) % 20_000;
    a.region = regions[(i % regions.len() as u64) as usize].into();
    a.hypervisor.accel = if i.is_multiple_of(3) { Accel::Kvm } else { Accel::Tcg };
    Signed::sign(&key, &a).unwrap()
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") { return; }
    let n = 100_000usize;
    let ads: Vec<_> = (0..n as u64).map(advert_number).collect();
    let wire = ads[0].to_bytes().len();
    println!("wire envelope {} B, payload {} B, size_of Verified<Advertisement> {} B, Signed {} B, Advertisement {} B, PeerId {} B",
        wire, ads[0].signed().payload_bytes().len(), size_of::<peervm_protocol::Verified<peervm_protocol::Advertisement>>(),
        size_of::<Signed<peervm_protocol::Advertisement>>(), size_of::<peervm_protocol::Advertisement>(), size_of::<PeerId>());
    let b = snap();
    let raw: Vec<Box<[u8]>> = ads.iter().map(|a| a.to_bytes().into_boxed_slice()).collect();
    per("raw envelope Box<[u8]> (+8 B vec slot x2)", b, n);
    drop(raw);
    let b = snap();
    let bodies: Vec<_> = ads.iter().map(|a| a.body().clone()).collect();
    per("decoded body heap (+ size_of in vec)", b, n);
    drop(bodies);
    let b = snap();
    let signeds: Vec<_> = ads.iter().map(|a| a.signed().clone()).collect();
    per("Signed (payload vec + inline in vec)", b, n);
    drop(signeds);
    let b = snap();
    let arcs: Vec<Arc<_>> = ads.iter().map(|a| Arc::new(a.clone())).collect();
    per("Arc<Verified<Advertisement>> total (+8 vec)", b, n);
    let b = snap();
    let mut live: HashMap<PeerId, (usize, Arc<_>)> = HashMap::new();
    for (i, a) in arcs.iter().enumerate() { live.insert(a.body().provider, (i, a.clone())); }
    per("live HashMap<PeerId,(usize,Arc)>", b, n);
    let b = snap();
    let mut exp: BTreeSet<(u64, PeerId)> = BTreeSet::new();
    for a in &arcs { exp.insert((a.body().expires_at_unix_ms, a.body().provider)); }
    per("expiry BTreeSet<(u64,PeerId)>", b, n);
    let b = snap();
    let mut order: BTreeSet<PeerId> = BTreeSet::new();
    for a in &arcs { order.insert(a.body().provider); }
    per("order BTreeSet<PeerId>", b, n);
    drop((live, exp, order, arcs));
    let b = snap();
    let mut store = AdvertStore::new();
    let now = peervm_node::clock::now_unix_ms();
    for a in ads { store.insert(a, now).unwrap(); }
    per("whole AdvertStore (adverts moved in)", b, n);
    let b = snap();
    let _ = advert_number(5);
    per("one advert_number temp (x n)", b, n);
}
