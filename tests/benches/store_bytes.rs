//! Where a store's bytes go, per advert, at 100,000 adverts (issue 18). Heap is counted
//! by a global allocator that models glibc's chunk sizes (a small allocation takes its
//! size plus an 8-byte header, rounded up to 16, at least 32; a large one whole pages),
//! so the figures are what the allocator hands out, not what the types ask for.
//! Run: `cargo bench -p peervm-tests --bench store_bytes`. Prints one JSON object per
//! figure (name, value, unit), bytes per advert:
//! - `advert_wire_bytes`: the signed envelope on the wire;
//! - `advert_kept_heap_bytes`: the envelope as the store keeps it (`VerifiedBytes`);
//! - `advert_decoded_heap_bytes`: a decoded advert (`Verified<Advertisement>`, boxed),
//!   what the store no longer keeps, for comparison;
//! - `store_heap_bytes_per_advert`: the whole store, adverts included;
//! - `store_summary_bytes_per_advert`, `store_held_bytes_per_advert`: its flat tables
//!   (query summaries; envelope handle and seq), by capacity;
//! - `store_index_bytes_per_advert`: the rest: the ordered provider index and the
//!   interners (the store holds no tombstones, owners or blocks here).
//! - `store_refresh_chain_bytes_per_advert`: what a refresh chain (docs/protocol.md
//!   section 4a) adds to the store for an advert that carries one, besides its longer
//!   envelope: the same store filled with the same adverts with a chain, less the first,
//!   envelopes left out of both.
//!
//! The adverts are those of the `swarm` bench's store group.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use peervm_node::advert_store::AdvertStore;
use peervm_protocol::{Advertisement, Verified, VerifiedBytes};

struct Counting;

static HEAP: AtomicUsize = AtomicUsize::new(0);

/// What glibc's malloc takes for a request of `n` bytes (x86_64).
fn chunk(n: usize) -> usize {
    if n >= 128 * 1024 { (n + 8 + 4095) & !4095 } else { ((n + 8 + 15) & !15).max(32) }
}

// SAFETY: every call is passed through to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        HEAP.fetch_add(chunk(l.size()), Relaxed);
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        HEAP.fetch_sub(chunk(l.size()), Relaxed);
        // SAFETY: as above.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        HEAP.fetch_add(chunk(new), Relaxed);
        HEAP.fetch_sub(chunk(l.size()), Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn heap() -> usize {
    HEAP.load(Relaxed)
}

fn report(name: &str, bytes: f64) {
    println!("{{\"name\":\"{name}\",\"value\":{bytes:.1},\"unit\":\"B\"}}");
}

fn main() {
    // `cargo test --benches` runs this without --bench: only benchmark when asked.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let n = 100_000u64;
    let per = |bytes: usize| bytes as f64 / n as f64;
    let now = peervm_node::clock::now_unix_ms();
    let adverts: Vec<_> = (0..n).map(|i| peervm_tests::bench_advert(i, now)).collect();
    report("advert_wire_bytes", per(adverts.iter().map(|a| a.to_bytes().len()).sum()));

    let before = heap();
    let kept: Vec<_> = adverts.iter().map(VerifiedBytes::new).collect();
    let slots = kept.capacity() * size_of::<VerifiedBytes<Advertisement>>();
    report("advert_kept_heap_bytes", per(heap() - before - chunk(slots)));
    drop(kept);

    let before = heap();
    let decoded: Vec<Box<Verified<Advertisement>>> = adverts.iter().map(|a| Box::new(a.clone())).collect();
    let slots = decoded.capacity() * size_of::<usize>();
    report("advert_decoded_heap_bytes", per(heap() - before - chunk(slots)));
    drop(decoded);
    drop(adverts);

    // Made one at a time (as a node receives them): only what the store keeps remains.
    let before = heap();
    let mut store = AdvertStore::new();
    for i in 0..n {
        store.insert(peervm_tests::bench_advert(i, now), now).unwrap();
    }
    let total = heap() - before;
    let tables = store.table_bytes();
    report("store_heap_bytes_per_advert", per(total));
    report("store_summary_bytes_per_advert", per(chunk(tables.summaries)));
    report("store_held_bytes_per_advert", per(chunk(tables.held)));
    let envelopes: usize =
        store.providers().map(|p| chunk(2 * size_of::<usize>() + store.get(&p).unwrap().as_bytes().len())).sum();
    report("store_envelope_bytes_per_advert", per(envelopes));
    report("store_index_bytes_per_advert", per(total - chunk(tables.summaries) - chunk(tables.held) - envelopes));
    drop(store);

    let before = heap();
    let mut chained = AdvertStore::new();
    for i in 0..n {
        chained.insert(peervm_tests::bench_advert_refreshed(i, now), now).unwrap();
    }
    let chained_total = heap() - before;
    let chained_envelopes: usize =
        chained.providers().map(|p| chunk(2 * size_of::<usize>() + chained.get(&p).unwrap().as_bytes().len())).sum();
    report("store_refresh_chain_bytes_per_advert", per(chained_total - chained_envelopes) - per(total - envelopes));
}
