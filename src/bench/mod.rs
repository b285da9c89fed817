//! `dci bench`: fan-out throughput, latency, cost and scale, measured on loopback with real gRPC,
//! and the same workload through Redis pub/sub in the same run when `redis-server` is on the PATH.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Args;
use dci_coordinator::{Coordinator, CoordinatorConfig};
use dci_edge_cache::{EdgeConfig, EdgeNode};
use dci_proto::metrics::HistogramSnapshot;
use dci_proto::upstream::{self, lock, Applier, FollowOptions, LinkState};
use dci_proto::{Batch, Epoch, Invalidation, Seq, ShardId};
use dci_relay::{Relay, RelayConfig};
use dci_sdk::{Publisher, PublisherOptions};
use hdrhistogram::Histogram;

mod redis;

/// Bench options.
#[derive(Args, Clone, Debug)]
pub struct BenchArgs {
    /// Edges (each with its own connection and store), split over two relays.
    #[arg(long, default_value_t = 8, value_parser = crate::positive_usize)]
    pub edges: usize,
    /// Invalidations published in the saturation run.
    #[arg(long, default_value_t = 500_000, value_parser = crate::positive)]
    pub count: u64,
    /// Publish rate of the latency run (invalidations per second).
    #[arg(long, default_value_t = 20_000, value_parser = crate::positive)]
    pub rate: u64,
    /// Length of the latency run.
    #[arg(long, value_parser = crate::positive_duration, default_value = "5s")]
    pub latency_for: Duration,
    /// Receivers on one relay in the scale run (0 skips it).
    #[arg(long, default_value_t = 1000)]
    pub receivers: usize,
    /// Distinct keys.
    #[arg(long, default_value_t = 1_000_000, value_parser = crate::positive)]
    pub keys: u64,
    /// Shape of the keys: `{}` stands for the key's number, zero-padded to 6 digits (more when
    /// `--keys` needs them).
    #[arg(long, default_value = "user:{}:profile", value_parser = parse_key_format)]
    pub key_format: String,
    /// zstd on the links.
    #[arg(long)]
    pub compression: bool,
    /// Edges take only keys with this prefix (filter at the relay).
    #[arg(long)]
    pub prefix: Option<String>,
    /// fsync policy of the coordinator's log.
    #[arg(long, default_value = "always")]
    pub fsync: dci_coordinator::FsyncPolicy,
    /// Skip the Redis comparison.
    #[arg(long)]
    pub no_redis: bool,
}

/// What the edges applied.
struct Meter {
    last: Vec<AtomicU64>,
    recording: AtomicBool,
    latency: Mutex<Histogram<u64>>,
}

fn parse_key_format(s: &str) -> Result<String, String> {
    if s.matches("{}").count() != 1 {
        return Err(format!("{s:?} must contain `{{}}` exactly once"));
    }
    Ok(s.to_string())
}

/// Keys of the bench: `prefix`, a zero-padded number below `10^digits`, `suffix`.
#[derive(Clone, Debug)]
pub struct KeyShape {
    prefix: String,
    suffix: String,
    digits: usize,
    modulo: u64,
}

impl KeyShape {
    fn new(format: &str, keys: u64) -> KeyShape {
        let (prefix, suffix) = format.split_once("{}").unwrap_or((format, ""));
        let digits = keys.saturating_sub(1).max(1).to_string().len().max(6);
        KeyShape {
            prefix: prefix.into(),
            suffix: suffix.into(),
            digits,
            modulo: 10u64.checked_pow(digits as u32).unwrap_or(u64::MAX),
        }
    }

    /// The `i`-th key.
    pub fn key(&self, i: u64) -> Bytes {
        Bytes::from(format!(
            "{}{:0w$}{}",
            self.prefix,
            i % self.modulo,
            self.suffix,
            w = self.digits
        ))
    }

    /// Bytes in every key.
    pub fn len(&self) -> usize {
        self.prefix.len() + self.digits + self.suffix.len()
    }
}

fn cpu_seconds() -> f64 {
    // utime + stime of this process, in clock ticks (100 per second on Linux).
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let t = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (t(11) + t(12)) / 100.0
}

/// Bytes through the loopback interface (every link of the run, both directions, with TCP/IP
/// headers): what the wire really carried.
fn loopback_bytes() -> u64 {
    let dev = std::fs::read_to_string("/proc/net/dev").unwrap_or_default();
    dev.lines()
        .find(|l| l.trim_start().starts_with("lo:"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|b| b.parse().ok())
        .unwrap_or(0)
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Publish-to-here latency so far, per tier: the coordinator's log, the relays, the edges.
fn tiers(c: &Coordinator, relays: &[Relay], edges: &[EdgeNode]) -> [HistogramSnapshot; 3] {
    let sum = |it: &mut dyn Iterator<Item = HistogramSnapshot>| {
        it.fold(HistogramSnapshot::default(), |a, b| a.plus(&b))
    };
    [
        c.propagation.snapshot(),
        sum(&mut relays.iter().map(|r| r.core.propagation.snapshot())),
        sum(&mut edges.iter().map(|e| e.propagation.snapshot())),
    ]
}

async fn wait_until(
    what: &str,
    limit: Duration,
    mut f: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while !f() {
        if Instant::now() > deadline {
            anyhow::bail!("bench: timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}

/// Memory an edge of the bench takes besides its tombstone table (its store, link and buffers).
const EDGE_OVERHEAD: u64 = 2 << 20;

/// Receivers below which the scale scenario's memory per receiver is mostly noise.
const SCALE_RECEIVERS_TO_MEASURE: usize = 100;

/// Memory the system can give new work without swapping (Linux's `MemAvailable`); `None` where
/// it does not say.
fn available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse::<u64>()
        .ok()?;
    Some(kib << 10)
}

fn ratio(ours: f64, theirs: Option<f64>) -> String {
    match theirs {
        Some(t) if t > 0.0 => format!("{:.2}x", ours / t),
        _ => "-".into(),
    }
}

pub async fn run(a: BenchArgs) -> anyhow::Result<()> {
    // Each receiver of the scale run is a connection: a descriptor in the relay (here) and one
    // in the receivers' process. Past the limit, connecting would fail for minutes, not at once.
    let (limit, _) = rlimit::getrlimit(rlimit::Resource::NOFILE)?;
    if a.receivers > 0 {
        let needed = a.receivers as u64 + 1024;
        if needed > limit {
            anyhow::bail!(
                "--receivers {} needs about {needed} open files in this process and in the \
                 receivers' (a connection each), and the limit here is {limit} (ulimit -n)",
                a.receivers
            );
        }
    }
    // Each edge is a listener and both ends of its link, here; and it takes its tombstone table
    // (8 MiB by default) once it applies: thousands of edges were killed for memory, minutes in.
    let needed = (a.edges as u64).saturating_mul(3).saturating_add(1024);
    if needed > limit {
        anyhow::bail!(
            "--edges {} needs about {needed} open files, and the limit here is {limit} (ulimit -n)",
            a.edges
        );
    }
    let per_edge =
        EdgeConfig::default().max_tombstones * dci_proto::lease::SLOT_BYTES as u64 + EDGE_OVERHEAD;
    if let Some(available) = available_memory() {
        let needed = (a.edges as u64).saturating_mul(per_edge);
        if needed > available / 4 * 3 {
            anyhow::bail!(
                "--edges {} needs about {} MiB ({} MiB per edge, most of it its tombstone table), \
                 and {} MiB are available",
                a.edges,
                needed >> 20,
                per_edge >> 20,
                available >> 20
            );
        }
    }
    let shape = KeyShape::new(&a.key_format, a.keys);
    // Edges that take none of the keys would apply nothing, and every figure would be of nothing.
    if let Some(prefix) = &a.prefix {
        if !(0..a.keys.max(1)).any(|i| shape.key(i).starts_with(prefix.as_bytes())) {
            anyhow::bail!(
                "--prefix {prefix:?} matches none of the bench's keys (they look like {:?})",
                String::from_utf8_lossy(&shape.key(123_456))
            );
        }
    }
    let dir = tempfile::tempdir()?;
    let coordinator = Coordinator::start(CoordinatorConfig {
        listen: "127.0.0.1:0".parse()?,
        data_dir: dir.path().to_path_buf(),
        fsync: a.fsync,
        ..CoordinatorConfig::default()
    })
    .await?;
    let mut relays = Vec::new();
    for i in 0..2 {
        relays.push(
            Relay::start(RelayConfig {
                listen: "127.0.0.1:0".parse()?,
                upstream: vec![coordinator.url()],
                region: format!("bench-{i}"),
                compression: a.compression,
                ..RelayConfig::default()
            })
            .await?,
        );
    }
    let meter = Arc::new(Meter {
        last: (0..a.edges).map(|_| AtomicU64::new(0)).collect(),
        recording: AtomicBool::new(false),
        latency: Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3)?),
    });
    let mut edges = Vec::new();
    for j in 0..a.edges {
        let m = meter.clone();
        let hook: dci_edge_cache::AppliedHook = Arc::new(move |b: &Batch| {
            m.last[j].store(b.last_seq, Ordering::Release);
            if m.recording.load(Ordering::Relaxed) {
                let now = dci_proto::now_us();
                let mut h = lock(&m.latency);
                for e in &b.entries {
                    let _ = h.record(now.saturating_sub(e.publish_time_us).max(1));
                }
            }
        });
        edges.push(
            EdgeNode::start_with(
                EdgeConfig {
                    listen: "127.0.0.1:0".parse()?,
                    relays: vec![relays[j % 2].url()],
                    region: "bench".into(),
                    compression: a.compression,
                    prefixes: a.prefix.iter().cloned().collect(),
                    ..EdgeConfig::default()
                },
                Some(hook),
            )
            .await?,
        );
    }
    for e in &edges {
        let link = e.link.clone();
        // In the shard's stream, not only connected: an edge that joins the shard after the
        // warm-up was published starts past it, and would never be seen to apply it.
        wait_until("edges to join the stream", Duration::from_secs(30), || {
            let l = lock(&link);
            l.connected_to.is_some() && !l.progress.is_empty()
        })
        .await?;
    }
    let publisher = Publisher::with_options(
        vec![coordinator.url()],
        PublisherOptions {
            max_batch: 16_384,
            ..Default::default()
        },
    )
    .await?;
    let redis = if a.no_redis {
        None
    } else {
        redis::Redis::start(shape.clone()).await
    };
    if redis.is_none() && !a.no_redis {
        crate::out::say!("redis: redis-server not on the PATH; the Redis comparison is skipped")?;
    }
    crate::out::say!(
        "dci bench: {} edges over 2 relays, fsync={:?}, {}-byte invalidations ({}-byte keys like {:?}), compression={}, prefix filter={}",
        a.edges, a.fsync, shape.len() + 16, shape.len(), String::from_utf8_lossy(&shape.key(123_456)), a.compression,
        a.prefix.as_ref().map_or("none".into(), |p| format!("{p:?}"))
    )?;

    // 1. Saturation.
    let base = publisher.invalidate("bench:warmup").await?;
    let m = meter.clone();
    wait_until("warm-up", Duration::from_secs(30), || {
        m.last.iter().all(|l| l.load(Ordering::Acquire) >= base)
    })
    .await?;
    let bytes_before: u64 = relays
        .iter()
        .map(|r| r.counters.bytes.load(Ordering::Relaxed))
        .sum();
    // Keys are made before the clock starts: the load generator should not be what is measured.
    // They live for the whole process (one buffer, leaked on purpose), so handing a key to a
    // publish costs no reference count: the counts on a million shared keys would be the load
    // generator's cost, not the system's.
    let key_space: Arc<Vec<Bytes>> = {
        let keys: Vec<Bytes> = (0..a.keys.max(1)).map(|i| shape.key(i)).collect();
        let all: &'static [u8] = Box::leak(keys.concat().into_boxed_slice());
        let mut at = 0;
        Arc::new(
            keys.iter()
                .map(|k| {
                    at += k.len();
                    Bytes::from_static(&all[at - k.len()..at])
                })
                .collect(),
        )
    };
    let cpu_before = cpu_seconds();
    let lo_before = loopback_bytes();
    let started = Instant::now();
    let chunk = 2048u64;
    let mut tasks = Vec::new();
    let sent = Arc::new(AtomicU64::new(0));
    // Those of the keys the edges take: what they are delivered (all, without a prefix filter).
    let matched = Arc::new(AtomicU64::new(0));
    for t in 0..4u64 {
        let (p, sent, count) = (publisher.clone(), sent.clone(), a.count);
        let (key_space, matched, prefix) = (key_space.clone(), matched.clone(), a.prefix.clone());
        tasks.push(tokio::spawn(async move {
            let mut head = 0;
            let mut i = t * 7_919;
            loop {
                let at = sent.fetch_add(chunk, Ordering::Relaxed);
                if at >= count {
                    return Ok::<Seq, dci_sdk::Error>(head);
                }
                let n = chunk.min(count - at);
                let now = dci_proto::now_us();
                let entries = (0..n)
                    .map(|_| {
                        i = i
                            .wrapping_mul(6_364_136_223_846_793_005)
                            .wrapping_add(1_442_695_040_888_963_407);
                        Invalidation {
                            source_version: Some(i >> 8),
                            publish_time_us: now,
                            ..Invalidation::key(
                                key_space[((i >> 20) % key_space.len() as u64) as usize].clone(),
                            )
                        }
                    })
                    .collect::<Vec<_>>();
                let taken = match &prefix {
                    Some(prefix) => entries
                        .iter()
                        .filter(|e| e.key.starts_with(prefix.as_bytes()))
                        .count() as u64,
                    None => n,
                };
                matched.fetch_add(taken, Ordering::Relaxed);
                let seqs = p.publish(entries).await?;
                head = head.max(seqs.last().copied().unwrap_or(0));
            }
        }));
    }
    let mut head = base;
    for t in tasks {
        head = head.max(t.await??);
    }
    let published_in = started.elapsed();
    let m = meter.clone();
    wait_until(
        "every edge to apply the head",
        Duration::from_secs(300),
        || m.last.iter().all(|l| l.load(Ordering::Acquire) >= head),
    )
    .await?;
    let elapsed = started.elapsed();
    let cpu = cpu_seconds() - cpu_before;
    let lo = loopback_bytes().saturating_sub(lo_before);
    let wire: u64 = relays
        .iter()
        .map(|r| r.counters.bytes.load(Ordering::Relaxed))
        .sum::<u64>()
        - bytes_before;
    let published = head - base;
    let matched = matched.load(Ordering::Relaxed);
    // Each edge is delivered the invalidations of the keys it takes: with a prefix filter, not
    // every one published. (Two of one key in one batch are delivered as the newer one alone:
    // the older is counted, since it is applied by then.)
    let delivered = matched * a.edges as u64;
    let rate = delivered as f64 / elapsed.as_secs_f64();
    let redis_sat = match &redis {
        Some(r) => Some(r.saturation(a.edges, a.count.min(500_000)).await?),
        None => None,
    };
    crate::out::say!("saturation (N={}):", a.edges)?;
    crate::out::say!(
        "  published {published} in {:.2}s ({:.0}/s through the log){}; applied at all edges after {:.2}s",
        published_in.as_secs_f64(),
        published as f64 / published_in.as_secs_f64(),
        match &a.prefix {
            Some(_) => format!(", {matched} of them to the edges' prefix"),
            None => String::new(),
        },
        elapsed.as_secs_f64()
    )?;
    crate::out::say!(
        "  dci:   {:>12.0} delivered/s   lost 0   | redis pub/sub: {:>12} delivered/s  ratio {}",
        rate,
        redis_sat.map_or("-".into(), |r| format!("{r:.0}")),
        ratio(rate, redis_sat)
    )?;
    crate::out::say!(
        "  cost:  {:.3} CPU s per million deliveries (whole process: coordinator, relays, edges, publisher)",
        cpu / (delivered as f64 / 1e6)
    )?;
    crate::out::say!(
        "  wire:  {:.1} bytes per delivered invalidation on the relay→edge links (batch payloads), {:.1} on all of loopback (every link, acks, TCP/IP headers)",
        wire as f64 / delivered as f64,
        lo as f64 / delivered as f64
    )?;

    if crate::out::gone() {
        // Nobody reads the figures any more (`dci bench | head`): the runs left are not made.
        return stop(coordinator, relays, edges).await;
    }

    // 2. Latency at a fixed rate.
    let m = meter.clone();
    let tiers_before = tiers(&coordinator, &relays, &edges);
    lock(&m.latency).reset();
    m.recording.store(true, Ordering::Relaxed);
    let tick = Duration::from_millis(1);
    // Below one per tick, the fractions add up over ticks (`due`).
    let per_tick = a.rate as f64 / 1000.0;
    let started = Instant::now();
    let mut due = 0.0f64;
    let mut n = 0u64;
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut last_head = head;
    // Publishes in flight are polled here, beside the ticks, as an application's task would
    // await its own: no task spawned per publish.
    let mut pending = futures::stream::FuturesUnordered::new();
    let mut acks = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut acked = |r: Result<(Vec<Seq>, Duration), dci_sdk::Error>, head: &mut Seq| {
        if let Ok((s, took)) = r {
            *head = (*head).max(s.last().copied().unwrap_or(0));
            let _ = acks.record((took.as_micros() as u64).max(1));
        }
    };
    while started.elapsed() < a.latency_for {
        tokio::select! {
            biased;
            _ = interval.tick() => {}
            Some(r) = futures::StreamExt::next(&mut pending) => {
                acked(r, &mut last_head);
                continue;
            }
        }
        due += per_tick;
        let k = due as u64;
        due -= k as f64;
        if k == 0 {
            continue;
        }
        let now = dci_proto::now_us();
        let entries: Vec<_> = (0..k)
            .map(|_| {
                n += 1;
                Invalidation {
                    publish_time_us: now,
                    ..Invalidation::key(shape.key(n * 7_919))
                }
            })
            .collect();
        let p = publisher.clone();
        pending.push(async move {
            let t = Instant::now();
            p.publish(entries).await.map(|s| (s, t.elapsed()))
        });
    }
    while let Some(r) = futures::StreamExt::next(&mut pending).await {
        acked(r, &mut last_head);
    }
    wait_until("latency run to drain", Duration::from_secs(60), || {
        m.last
            .iter()
            .all(|l| l.load(Ordering::Acquire) >= last_head)
    })
    .await?;
    m.recording.store(false, Ordering::Relaxed);
    let tiers_during: Vec<_> = tiers(&coordinator, &relays, &edges)
        .iter()
        .zip(&tiers_before)
        .map(|(after, before)| after.since(before))
        .collect();
    let h = lock(&m.latency).clone();
    let q = |x: f64| h.value_at_quantile(x) as f64 / 1000.0;
    let redis_lat = match &redis {
        Some(r) => Some(r.latency(a.edges, a.rate, a.latency_for).await?),
        None => None,
    };
    crate::out::say!(
        "latency at {}/s, N={} (publish call → applied at each edge, {} samples):",
        a.rate,
        a.edges,
        h.len()
    )?;
    crate::out::say!(
        "  dci:   p50 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  max {:.3} ms",
        q(0.5),
        q(0.99),
        q(0.999),
        h.max() as f64 / 1000.0
    )?;
    crate::out::say!(
        "  publish acknowledged ({}, fsync={:?}, through the SDK's PublishStream): p50 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms",
        match a.fsync {
            dci_coordinator::FsyncPolicy::Always => "durable",
            _ => "written, not yet synced",
        },
        a.fsync,
        acks.value_at_quantile(0.5) as f64 / 1000.0,
        acks.value_at_quantile(0.99) as f64 / 1000.0,
        acks.value_at_quantile(0.999) as f64 / 1000.0
    )?;
    let tier = |t: &HistogramSnapshot| {
        let q = |x| {
            t.quantile_us(x)
                .map_or("-".into(), |us| format!("{:.2}", us / 1000.0))
        };
        format!("p50 {} p99 {}", q(0.5), q(0.99))
    };
    crate::out::say!(
        "  by tier (each node's own dci_propagation_seconds, interpolated in its buckets, ms): in the log {} · at the relays {} · at the edges {}",
        tier(&tiers_during[0]),
        tier(&tiers_during[1]),
        tier(&tiers_during[2])
    )?;
    if let Some((p50, p99, p999)) = redis_lat {
        crate::out::say!(
            "  redis: p50 {p50:.3} ms  p99 {p99:.3} ms  p99.9 {p999:.3} ms   dci/redis: p50 {} p99 {}",
            ratio(q(0.5), Some(p50)),
            ratio(q(0.99), Some(p99))
        )?;
    }

    if crate::out::gone() {
        return stop(coordinator, relays, edges).await;
    }

    // 3. Catch-up: a receiver that comes back far behind (it was stopped, say) resumes at its
    // high-water mark, before everything published so far; its relay holds only the newest
    // part in its ring and fetches the rest from the coordinator (its memory, then its log).
    let caught = Arc::new(AtomicU64::new(0));
    let flushed = Arc::new(AtomicBool::new(false));
    let (stop_catch_up, halt) = tokio::sync::watch::channel(false);
    let fetches_before = relays[0].core.catch_ups.load(Ordering::Relaxed);
    let started = Instant::now();
    tokio::spawn(upstream::follow(
        FollowOptions {
            urls: vec![relays[0].url()],
            node_id: "bench-catch-up".into(),
            resume: vec![(0, coordinator.epoch, base)],
            ..FollowOptions::default()
        },
        Arc::new(Mutex::new(CatchUp {
            last: caught.clone(),
            flushed: flushed.clone(),
        })),
        Arc::new(Mutex::new(LinkState::default())),
        halt,
    ));
    let (c, f) = (caught.clone(), flushed.clone());
    wait_until(
        "the catch-up receiver to apply the head",
        Duration::from_secs(300),
        || c.load(Ordering::Acquire) >= last_head || f.load(Ordering::Relaxed),
    )
    .await?;
    let took = started.elapsed();
    let _ = stop_catch_up.send(true);
    if flushed.load(Ordering::Relaxed) {
        anyhow::bail!("bench: the catch-up receiver was reset: the range was gone");
    }
    crate::out::say!(
        "catch-up (a receiver {} invalidations behind, resumed through a relay: {} fetches from the coordinator):",
        last_head - base,
        relays[0].core.catch_ups.load(Ordering::Relaxed) - fetches_before
    )?;
    crate::out::say!(
        "  applied all in {:.2}s ({:.0}/s)",
        took.as_secs_f64(),
        (last_head - base) as f64 / took.as_secs_f64()
    )?;

    if crate::out::gone() {
        return stop(coordinator, relays, edges).await;
    }

    // 4. Scale: many receivers on one relay.
    if a.receivers > 0 {
        scale(&a, &shape, &relays[0], &publisher).await?;
    }

    stop(coordinator, relays, edges).await
}

async fn stop(
    coordinator: Coordinator,
    relays: Vec<Relay>,
    edges: Vec<EdgeNode>,
) -> anyhow::Result<()> {
    for e in edges {
        let _ = e.stop().await;
    }
    for r in relays {
        let _ = r.stop().await;
    }
    coordinator.stop().await?;
    Ok(())
}

/// A receiver that only counts (the scale run measures the relay, not a cache).
struct Counter(Arc<AtomicU64>);

impl Applier for Counter {
    fn apply(&mut self, b: &Batch) {
        self.0.store(b.last_seq, Ordering::Release);
    }
    fn quarantine(&mut self, _: ShardId, _: &dci_proto::pb::Invalidation, _: &str) {}
    fn flush(&mut self, _: ShardId, _: Epoch, hwm: Seq, _: &str) {
        self.0.store(hwm, Ordering::Release);
    }
}

/// The catch-up receiver: how far it has applied, and whether it was reset instead.
struct CatchUp {
    last: Arc<AtomicU64>,
    flushed: Arc<AtomicBool>,
}

impl Applier for CatchUp {
    fn apply(&mut self, b: &Batch) {
        self.last.store(b.last_seq, Ordering::Release);
    }
    fn quarantine(&mut self, _: ShardId, _: &dci_proto::pb::Invalidation, _: &str) {}
    fn flush(&mut self, _: ShardId, _: Epoch, _: Seq, _: &str) {
        // It resumes with a resume point: any flush means it was not caught up but reset.
        self.flushed.store(true, Ordering::Relaxed);
    }
}

/// Options of the receivers process the scale run starts (a hidden subcommand).
#[derive(Args, Clone, Debug)]
pub struct ReceiversArgs {
    /// The relay to follow.
    #[arg(long)]
    pub relay: String,
    /// How many receivers.
    #[arg(long)]
    pub count: usize,
}

/// The receivers of the scale run, in their own process so the relay's memory is measured alone.
/// Each stdin line is a seq; once every receiver applied it, a line "done" goes to stdout.
pub async fn receivers(a: ReceiversArgs) -> anyhow::Result<()> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let (_halt_tx, halt) = tokio::sync::watch::channel(false);
    let mut counters = Vec::new();
    for i in 0..a.count {
        let c = Arc::new(AtomicU64::new(0));
        counters.push(c.clone());
        let opts = FollowOptions {
            urls: vec![a.relay.clone()],
            node_id: format!("bench-receiver-{i}"),
            role: "near-cache".into(),
            heartbeat_interval: Duration::from_secs(1),
            ..FollowOptions::default()
        };
        let state = Arc::new(Mutex::new(LinkState::default()));
        tokio::spawn(upstream::follow(
            opts,
            Arc::new(Mutex::new(Counter(c))),
            state,
            halt.clone(),
        ));
    }
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut out = tokio::io::stdout();
    while let Some(line) = lines.next_line().await? {
        let target: Seq = line.trim().parse()?;
        wait_until(
            "every receiver to apply the head",
            Duration::from_secs(600),
            || counters.iter().all(|c| c.load(Ordering::Acquire) >= target),
        )
        .await?;
        out.write_all(b"done\n").await?;
        out.flush().await?;
    }
    Ok(())
}

async fn scale(
    a: &BenchArgs,
    shape: &KeyShape,
    relay: &Relay,
    publisher: &Publisher,
) -> anyhow::Result<()> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let before = rss_bytes();
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .args([
            "bench-receivers",
            "--relay",
            &relay.url(),
            "--count",
            &a.receivers.to_string(),
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut to_child = child
        .stdin
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdin to the receivers"))?;
    let mut from_child = BufReader::new(
        child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdout from the receivers"))?,
    )
    .lines();
    let rc = relay.counters.clone();
    let want = a.receivers as u64 + (a.edges as u64).div_ceil(2);
    wait_until("receivers to connect", Duration::from_secs(120), || {
        rc.receivers.load(Ordering::Relaxed) >= want
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = rss_bytes().saturating_sub(before) as f64 / a.receivers as f64;
    let count = (a.count / 10).max(10_000);
    let started = Instant::now();
    let mut head = 0;
    let mut i = 0u64;
    while i < count {
        let n = 4096.min(count - i);
        let now = dci_proto::now_us();
        let entries = (i..i + n)
            .map(|j| Invalidation {
                publish_time_us: now,
                ..Invalidation::key(shape.key(j * 31))
            })
            .collect();
        let seqs = publisher.publish(entries).await?;
        head = head.max(*seqs.last().unwrap_or(&0));
        i += n;
    }
    to_child.write_all(format!("{head}\n").as_bytes()).await?;
    to_child.flush().await?;
    match tokio::time::timeout(Duration::from_secs(600), from_child.next_line()).await {
        Ok(Ok(Some(l))) if l == "done" => {}
        other => anyhow::bail!("bench: the receivers process did not finish: {other:?}"),
    }
    let elapsed = started.elapsed();
    let delivered = count * a.receivers as u64;
    crate::out::say!(
        "scale ({} receiver{} on one relay, in a separate process):",
        a.receivers,
        if a.receivers == 1 { "" } else { "s" }
    )?;
    // The growth is of the whole process (the coordinator and the other relay too): a few
    // receivers are lost in what the rest allocates meanwhile.
    let few = if a.receivers < SCALE_RECEIVERS_TO_MEASURE {
        format!("; too few receivers to tell from the rest, measure with --receivers {SCALE_RECEIVERS_TO_MEASURE} or more")
    } else {
        String::new()
    };
    crate::out::say!(
        "  memory per idle receiver on the relay {:.1} KiB (relay process RSS growth / receivers{few})",
        idle / 1024.0
    )?;
    crate::out::say!(
        "  delivered/s {:.0} ({} invalidations to each receiver in {:.2}s)",
        delivered as f64 / elapsed.as_secs_f64(),
        count,
        elapsed.as_secs_f64()
    )?;
    drop(to_child);
    let _ = child.kill().await;
    Ok(())
}
