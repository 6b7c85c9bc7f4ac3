//! Advert signing and validation costs. Results go into BENCHMARKS.md:
//! `cargo bench -p peervm-protocol --bench adverts`.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use peervm_protocol::samples::{self, T0_UNIX_MS};
use peervm_protocol::{Advertisement, Signed, verify_batch};
use std::hint::black_box;

fn bench(c: &mut Criterion) {
    let key = samples::provider_key();
    let advert = samples::advert(&key, 1, T0_UNIX_MS);
    let bytes = Signed::sign(&key, &advert).unwrap().to_bytes();

    let mut g = c.benchmark_group("advert");
    g.throughput(Throughput::Elements(1));
    g.bench_function("sign", |b| b.iter(|| Signed::sign(&key, black_box(&advert)).unwrap()));
    g.bench_function("verify", |b| {
        b.iter(|| Signed::<Advertisement>::open(black_box(&bytes)).unwrap());
    });
    g.bench_function("parse_envelope", |b| {
        b.iter(|| Signed::<Advertisement>::from_bytes(black_box(&bytes)).unwrap());
    });
    let payload = Signed::<Advertisement>::from_bytes(&bytes).unwrap().payload_bytes().to_vec();
    g.bench_function("decode_payload", |b| {
        b.iter(|| peervm_protocol::encoding::from_cbor::<Advertisement>(black_box(&payload), "advert").unwrap());
    });
    g.bench_function("decode_and_validate", |b| {
        b.iter(|| {
            let v = Signed::<Advertisement>::open(black_box(&bytes)).unwrap();
            v.body().check_acceptable(T0_UNIX_MS + 1, Some(0)).unwrap();
        });
    });
    g.finish();

    let mut g = c.benchmark_group("advert_batch");
    for n in [64u64, 256] {
        let items = samples::signed_adverts(n);
        let refs: Vec<&[u8]> = items.iter().map(Vec::as_slice).collect();
        g.throughput(Throughput::Elements(n));
        g.bench_with_input(BenchmarkId::new("verify_and_validate", n), &refs, |b, refs| {
            b.iter(|| {
                for r in verify_batch::<Advertisement>(black_box(refs)) {
                    r.unwrap().body().check_acceptable(T0_UNIX_MS + 1, None).unwrap();
                }
            });
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
