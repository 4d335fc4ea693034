//! The two checksums a copy can use, side by side on what a copy hashes per frame (256 KiB):
//! XXH64, negotiated with agents that announce `xxh64`, and SHA-256, the default for
//! version-1 peers (docs/agent-protocol.md, "Checksums"). Their ratio is why copies use XXH64:
//! under TCG, in a guest without SHA extensions, SHA-256 alone bound a copy at ~28 MiB/s.
//! `cargo bench -p vmlink-agent --bench checksum`; CI runs it once with `-- --test`.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use sha2::Digest;

const CHUNK: usize = 256 * 1024;

fn checksums(c: &mut Criterion) {
    let data: Vec<u8> = (0..CHUNK).map(|i| (i * 31 + 7) as u8).collect();
    let mut g = c.benchmark_group("copy_checksum_256k");
    g.throughput(Throughput::Bytes(CHUNK as u64));
    g.bench_function("xxh64", |b| {
        b.iter(|| {
            let mut h = xxhash_rust::xxh64::Xxh64::new(0);
            h.update(black_box(&data));
            black_box(h.digest())
        })
    });
    g.bench_function("sha256", |b| {
        b.iter(|| {
            let mut h = sha2::Sha256::new();
            h.update(black_box(&data));
            black_box(h.finalize())
        })
    });
    g.finish();
}

criterion_group!(benches, checksums);
criterion_main!(benches);
