//! Micro-benchmarks of the hot paths: batch encode/decode, the link state machines, log append,
//! edge apply. `cargo bench --bench hot_paths`.

// The group function criterion's macro generates has no doc comment of its own.
#![allow(missing_docs)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use dci_proto::link::{Receiver, ReceiverConfig, Sender, SenderConfig, ShardView};
use dci_proto::{Batch, Invalidation};

const N: u64 = 1024;

fn batch(first: u64) -> Batch {
    let now = dci_proto::now_us();
    Batch {
        shard: 0,
        epoch: 1,
        first_seq: first,
        last_seq: first + N - 1,
        entries: (0..N)
            .map(|i| Invalidation {
                seq: first + i,
                source_version: Some((first + i) * 2_654_435_761),
                publish_time_us: now + i,
                ..Invalidation::key(format!(
                    "user:{:06}:profile",
                    (first + i) * 7_919 % 1_000_000
                ))
            })
            .collect(),
    }
}

fn encode_decode(c: &mut Criterion) {
    let b = batch(1);
    let bytes = b.encode_shared();
    let mut g = c.benchmark_group("batch");
    g.throughput(Throughput::Elements(N));
    g.bench_function("encode 1024", |x| x.iter(|| black_box(b.encode_shared())));
    g.bench_function("decode+check 1024", |x| {
        x.iter(|| black_box(Batch::decode_checked(bytes.clone(), 1024).unwrap()))
    });
    g.bench_function("zstd compress 1024", |x| {
        x.iter(|| black_box(dci_proto::link::retransmit::compress(&bytes)))
    });
    g.finish();
}

fn link(c: &mut Criterion) {
    let mut g = c.benchmark_group("link");
    g.throughput(Throughput::Elements(N));
    g.bench_function("receiver on_batch+on_applied 1024", |x| {
        let mut r = Receiver::with_resume(ReceiverConfig::default(), &[(0, 1, 0)]);
        let mut next = 1;
        let now = Instant::now();
        x.iter_batched(
            || {
                let b = batch(next);
                next += N;
                b
            },
            |b| {
                let last = b.last_seq;
                black_box(r.on_batch(b, now));
                black_box(r.on_applied(0, 1, last, now));
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("sender next_range+on_sent+on_ack", |x| {
        let now = Instant::now();
        let mut s = Sender::new(SenderConfig::default(), now);
        s.on_hello(&[], &[], now);
        let mut head = 0;
        x.iter(|| {
            head += N;
            let v = ShardView {
                shard: 0,
                epoch: 1,
                oldest: 1,
                head,
                held_from: 1,
                head_time_us: 0,
            };
            black_box(s.next_range(&v, now));
            s.on_sent(0, head, 20_000, now);
            s.on_ack(
                &dci_proto::pb::Ack {
                    shard: 0,
                    epoch: 1,
                    hwm: head,
                },
                now,
            );
        })
    });
    g.finish();
}

fn log_append(c: &mut Criterion) {
    let mut g = c.benchmark_group("log");
    g.throughput(Throughput::Elements(N));
    g.measurement_time(Duration::from_secs(3));
    for (name, fsync) in [
        (
            "append 1024, fsync=never",
            dci_coordinator::FsyncPolicy::Never,
        ),
        (
            "append 1024, fsync=always",
            dci_coordinator::FsyncPolicy::Always,
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let opts = dci_coordinator::wal::WalOptions {
            fsync,
            ..Default::default()
        };
        let (mut wal, _) = dci_coordinator::wal::Wal::open(dir.path(), opts).unwrap();
        g.bench_function(name, |x| {
            x.iter(|| {
                let first = wal.head() + 1;
                let rec = dci_coordinator::wal::LogRecord {
                    first_seq: first,
                    publisher_id: String::new(),
                    request_no: 0,
                    entries: batch(first)
                        .entries
                        .iter()
                        .map(Invalidation::to_pb)
                        .collect(),
                    void_to: 0,
                };
                wal.append(&[rec]).unwrap();
            })
        });
    }
    g.finish();
}

/// A hundred prefix invalidations from seq `next` on (which moves past them), matching none of
/// the bench's keys.
fn hundred_prefixes(next: &mut u64) -> Vec<Invalidation> {
    let b = (*next..*next + 100)
        .map(|seq| Invalidation {
            seq,
            kind: dci_proto::Kind::Prefix,
            ..Invalidation::key(format!("x{seq}:"))
        })
        .collect();
    *next += 100;
    b
}

/// Wait until the store's passes over its values have taken every prefix applied.
fn until_swept(store: &dci_edge_cache::Store) {
    while store.unswept() > 0 {
        std::thread::yield_now();
    }
}

fn edge_apply(c: &mut Criterion) {
    let mut g = c.benchmark_group("edge");
    g.throughput(Throughput::Elements(N));
    let store = dci_edge_cache::Store::new(256 << 20, Duration::from_secs(3600), 262_144, 1);
    for i in 0..10_000u64 {
        let _ = store.set(
            Bytes::from(format!("user:{:06}:profile", i * 13)),
            Bytes::from_static(b"v"),
            None,
        );
    }
    let mut next = 1;
    g.bench_function("apply 1024", |x| {
        x.iter_batched(
            || {
                let b = batch(next);
                next += N;
                b
            },
            |b| store.apply_batch(0, 1, &b.entries, b.last_seq),
            BatchSize::SmallInput,
        )
    });
    // A purge of a hundred prefixes in one batch over 200,000 values: one pass over the store.
    let purged = dci_edge_cache::Store::new(1 << 30, Duration::from_secs(3600), 262_144, 1);
    for i in 0..200_000u64 {
        let _ = purged.set(
            Bytes::from(format!("t{}:user:{i:06}:profile", i % 1000)),
            Bytes::from_static(b"v"),
            None,
        );
    }
    let mut next = 1;
    g.throughput(Throughput::Elements(100));
    g.bench_function("100 prefixes (matching nothing) over 200k values", |x| {
        x.iter_batched(
            || hundred_prefixes(&mut next),
            |b| {
                // Applied at once; measured until the pass over the values is done too.
                purged.apply_all(0, &b);
                until_swept(&purged);
            },
            BatchSize::SmallInput,
        )
    });
    // The same hundred, each in a batch of its own (a stream of purges): one pass takes all
    // that came while the one before it ran.
    g.bench_function(
        "100 prefixes (matching nothing), a batch each, over 200k values",
        |x| {
            x.iter_batched(
                || hundred_prefixes(&mut next),
                |b| {
                    for e in &b {
                        purged.apply_all(0, std::slice::from_ref(e));
                    }
                    until_swept(&purged);
                },
                BatchSize::SmallInput,
            )
        },
    );
    g.throughput(Throughput::Elements(N));
    let mut table = dci_proto::lease::LeaseTable::new(1, 262_144);
    let mut next = 1;
    g.bench_function("lease table apply 1024", |x| {
        x.iter_batched(
            || {
                let b = batch(next);
                next += N;
                b
            },
            |b| {
                for e in &b.entries {
                    black_box(table.apply(0, e));
                }
            },
            BatchSize::SmallInput,
        )
    });
    // Eight edges' tables, as `dci bench` co-locates them: together larger than the L3 cache.
    let mut tables: Vec<_> = (0..8)
        .map(|_| dci_proto::lease::LeaseTable::new(1, 262_144))
        .collect();
    let mut next = 1;
    g.bench_function("lease table apply 1024, 8 tables, one by one", |x| {
        x.iter_batched(
            || {
                let b = batch(next);
                next += N;
                b
            },
            |b| {
                for t in tables.iter_mut() {
                    for e in &b.entries {
                        black_box(t.apply(0, e));
                    }
                }
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("lease table apply 1024, 8 tables, apply_all", |x| {
        x.iter_batched(
            || {
                let b = batch(next);
                next += N;
                b
            },
            |b| {
                for t in tables.iter_mut() {
                    t.apply_all(0, &b.entries, |_, eff| {
                        black_box(eff);
                    });
                }
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(
    name = benches;
    config = Criterion::default();
    targets = encode_decode, link, log_append, edge_apply
);
criterion_main!(benches);
