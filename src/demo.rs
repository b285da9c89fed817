//! `dci demo`: a whole deployment in one process — a coordinator (or one per shard), two regions
//! each with a relay and three edges — under a workload of writers and readers, reporting every second what a user
//! cares about: publishes/s, propagation latency, hit ratio, and stale reads (which must stay 0).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use dci_coordinator::{Coordinator, CoordinatorConfig};
use dci_edge_cache::{EdgeConfig, EdgeNode};
use dci_relay::{Relay, RelayConfig};
use dci_sdk::{CacheClient, Fill, Publisher};
use hdrhistogram::Histogram;

/// Demo options.
#[derive(Args, Clone)]
pub struct DemoArgs {
    /// How long to run (e.g. 30s); runs until Ctrl-C when absent.
    #[arg(long, value_parser = crate::duration)]
    duration: Option<Duration>,
    /// Invalidations published per second (all writers together).
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Cache reads per second (all readers together).
    #[arg(long, default_value_t = 4000)]
    reads: u64,
    /// Number of distinct keys (at most ten million: the demo's "database" holds a version of
    /// each in memory).
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    keys: u64,
    /// Edges' staleness bound.
    #[arg(long, value_parser = crate::duration, default_value = "5s")]
    max_staleness: Duration,
    /// Every few seconds (3s, or as given), stop one node for a second and start it again, in
    /// turn an edge (it comes back empty), a relay and the coordinator (from its log), while
    /// the workload runs.
    #[arg(long, value_name = "EVERY", num_args = 0..=1, default_missing_value = "3s",
          value_parser = crate::positive_duration)]
    chaos: Option<Duration>,
    /// Coordinator shards (each with its log; the relays follow every one, keys go to their
    /// shard's).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16))]
    shards: u32,
    /// Edges of a region that own each key (of three): 2 or 3 keep a key readable and filled on
    /// its next owner while the first is down.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=3))]
    replication: u32,
    /// One publish in N (0: none) invalidates a prefix instead of a key: the hundred rows
    /// `user:0012…` (1200–1299) bumped together, and `user:0012` invalidated on every shard.
    #[arg(long, default_value_t = 0)]
    prefixes: u64,
    /// One read in N (0: none) is of a page: a value built from three rows (`page:000042`),
    /// filled tagged with them (`row:<k>`). Every write then also invalidates the tags of the
    /// rows it bumps, and a page read is checked for each row it shows.
    #[arg(long, default_value_t = 0)]
    pages: u64,
}

/// The rows page `p` shows, of `keys`.
fn page_rows(p: u64, keys: u64) -> [u64; 3] {
    [p % keys, (p * 7 + 1) % keys, (p * 31 + 2) % keys]
}

/// The tag of the values that show row `k`.
fn row_tag(k: u64) -> String {
    format!("row:{k}")
}

/// Rows a prefix of the demo's keys (`user:0012`) covers.
const ROWS_PER_PREFIX: u64 = 100;

/// The deployment, kept with what it takes to start each node again (`--chaos`).
struct Nodes {
    /// One per shard; `None` only while it is being restarted.
    coordinators: Vec<Option<Coordinator>>,
    coordinator_cfgs: Vec<CoordinatorConfig>,
    relays: Vec<Relay>,
    relay_cfgs: Vec<RelayConfig>,
    edges: Vec<EdgeNode>,
    edge_cfgs: Vec<(EdgeConfig, dci_edge_cache::AppliedHook)>,
}

impl Nodes {
    /// Stop one node, wait `down`, and start it again at the same address: the `round`th of
    /// edge, relay, coordinator (each shard's in turn), in turn.
    async fn restart_one(&mut self, round: usize, down: Duration) -> anyhow::Result<()> {
        // Chaos goes on whether or not its report can be printed.
        let say = |what: &str| {
            let _ = crate::out::say!("chaos: {what} stopped for {:.1}s", down.as_secs_f64());
        };
        match round % 3 {
            0 => {
                let i = (round / 3) % self.edges.len();
                let old = self.edges.remove(i);
                let listen = old.addr;
                say(&format!("edge {} (it comes back empty)", old.node_id));
                old.stop().await?;
                down_for(listen, down).await;
                let (cfg, hook) = self.edge_cfgs[i].clone();
                let cfg = EdgeConfig { listen, ..cfg };
                let edge = again(|| EdgeNode::start_with(cfg.clone(), Some(hook.clone()))).await?;
                self.edges.insert(i, edge);
            }
            1 => {
                let i = (round / 3) % self.relays.len();
                let old = self.relays.remove(i);
                let cfg = RelayConfig {
                    listen: old.addr,
                    ..self.relay_cfgs[i].clone()
                };
                say(&format!("relay {}", cfg.node_id));
                old.stop().await?;
                down_for(cfg.listen, down).await;
                self.relays
                    .insert(i, again(|| Relay::start(cfg.clone())).await?);
            }
            _ => {
                let i = (round / 3) % self.coordinators.len();
                let old = self.coordinators[i].take().expect("running");
                let cfg = CoordinatorConfig {
                    listen: old.addr,
                    ..self.coordinator_cfgs[i].clone()
                };
                if self.coordinators.len() == 1 {
                    say("the coordinator (it recovers from its log)");
                } else {
                    say(&format!(
                        "the coordinator of shard {i} (it recovers from its log)"
                    ));
                }
                old.stop().await?;
                down_for(cfg.listen, down).await;
                self.coordinators[i] = Some(again(|| Coordinator::start(cfg.clone())).await?);
            }
        }
        Ok(())
    }

    async fn stop(self) -> anyhow::Result<()> {
        for e in self.edges {
            let _ = e.stop().await;
        }
        for r in self.relays {
            let _ = r.stop().await;
        }
        for c in self.coordinators.into_iter().flatten() {
            c.stop().await?;
        }
        Ok(())
    }
}

/// A stopped node's `down` time, with its port held (bound, not listening: connections to it
/// are refused, as to a node that is down), so that no other process takes the port meanwhile
/// and keeps the node from starting again there.
async fn down_for(addr: std::net::SocketAddr, down: Duration) {
    let hold = || -> std::io::Result<tokio::net::TcpSocket> {
        let socket = match addr {
            std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        Ok(socket)
    };
    let held = hold();
    tokio::time::sleep(down).await;
    drop(held);
}

/// Start a node again, trying for a few seconds: its port may still be held a moment (the
/// chaos used to end the demo, every node with it, when one start failed).
async fn again<N, E, F, Fut>(mut start: F) -> anyhow::Result<N>
where
    E: std::error::Error + Send + Sync + 'static,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<N, E>>,
{
    let mut tries = 0;
    loop {
        match start().await {
            Ok(node) => return Ok(node),
            Err(e) if tries < 25 => {
                tries += 1;
                tracing::warn!(error = %e, "chaos: a node did not start again; trying once more");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The "database": a version per key, and when each version's invalidation was acknowledged.
struct Database {
    versions: Vec<AtomicU64>,
    acked: Mutex<HashMap<u64, Acked>>,
}

/// When the versions of one key were acknowledged, as much as the stale-read check asks: for a
/// read of version `seen`, the earliest acknowledgement of any newer version. Only versions
/// acknowledged later than every older one's are kept (one acknowledged after a newer one
/// adds nothing: a read older than it is older than the newer one too), so the earliest
/// acknowledgement newer than a version is the next one kept, and a hot key costs a lookup
/// per read and per publish, not a pass over the thousands of versions of the last seconds.
#[derive(Default)]
struct Acked(BTreeMap<u64, Instant>);

impl Acked {
    /// `version` was acknowledged at `at`, no earlier than anything noted before. Of the
    /// versions acknowledged before `horizon`, the newest stands for them all: any read older
    /// than it began long after it was acknowledged. So memory follows the rate, not the run.
    fn note(&mut self, version: u64, at: Instant, horizon: Option<Instant>) {
        if self.0.range(version..).next().is_none() {
            self.0.insert(version, at);
        }
        while let (Some(horizon), Some(second)) = (horizon, self.0.values().nth(1)) {
            if *second >= horizon {
                break;
            }
            self.0.pop_first();
        }
    }

    /// The earliest acknowledgement of a version newer than `seen`, and that version.
    fn first_newer(&self, seen: u64) -> Option<(u64, Instant)> {
        self.0.range(seen + 1..).next().map(|(v, at)| (*v, *at))
    }
}

#[derive(Default)]
struct Stats {
    publishes: AtomicU64,
    hits: AtomicU64,
    reads: AtomicU64,
    stale: AtomicU64,
    errors: AtomicU64,
}

/// How long, beyond the staleness bound, every acknowledged version of a key is remembered for
/// the stale-read check: longer than any read takes (the client's deadline is 5 s).
const ACKED_HORIZON: Duration = Duration::from_secs(10);

/// With `--chaos`: how long a node stays down (less than the default staleness bound, so that
/// edges behind a restarted relay go on serving meanwhile).
const CHAOS_DOWN: Duration = Duration::from_secs(1);

/// Publishes the demo's writers keep in flight at most.
const MAX_PUBLISHES_IN_FLIGHT: usize = 4096;

/// The ticks of the `i`th of `n` tasks that share a rate: each at its own moment of the period.
/// Ticks that all fell at once (every reader at the same instant, every 8 ms) made the load come
/// in bursts, and the propagation the demo reports then measured the bursts.
fn staggered(period: Duration, i: u64, n: u64) -> tokio::time::Interval {
    let start = tokio::time::Instant::now() + stagger(period, i, n);
    let mut tick = tokio::time::interval_at(start, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    tick
}

/// When, within the period, the `i`th of `n` tasks ticks.
fn stagger(period: Duration, i: u64, n: u64) -> Duration {
    period.mul_f64((i % n.max(1)) as f64 / n.max(1) as f64)
}

fn key_of(i: u64) -> String {
    format!("user:{i:06}:profile")
}

pub async fn run(a: DemoArgs, stop: impl Future<Output = ()>) -> anyhow::Result<()> {
    // Checked before anything starts, like every edge's config.
    EdgeConfig {
        max_staleness: a.max_staleness,
        relays: vec!["http://127.0.0.1:7500".into()],
        ..EdgeConfig::default()
    }
    .validate()?;
    let dir = tempfile::tempdir()?;
    let mut coordinators = Vec::new();
    let mut coordinator_cfgs = Vec::new();
    for shard in 0..a.shards {
        let cfg = CoordinatorConfig {
            listen: "127.0.0.1:0".parse()?,
            data_dir: dir.path().join(format!("shard-{shard}")),
            shard,
            shard_count: a.shards,
            ..CoordinatorConfig::default()
        };
        coordinators.push(Coordinator::start(cfg.clone()).await?);
        coordinator_cfgs.push(cfg);
    }
    let urls: Vec<String> = coordinators.iter().map(Coordinator::url).collect();
    let latency = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(
        1, 60_000_000, 3,
    )?));
    let mut relays = Vec::new();
    let mut relay_cfgs = Vec::new();
    let mut edges = Vec::new();
    let mut edge_cfgs = Vec::new();
    let mut clients = Vec::new();
    for region in ["eu", "us"] {
        let cfg = RelayConfig {
            listen: "127.0.0.1:0".parse()?,
            upstream: vec![urls[0].clone()],
            upstream_groups: urls[1..].iter().map(|u| vec![u.clone()]).collect(),
            region: region.into(),
            node_id: format!("relay-{region}"),
            ..RelayConfig::default()
        };
        let relay = Relay::start(cfg.clone()).await?;
        relay_cfgs.push(cfg);
        let ids: Vec<String> = (0..3).map(|i| format!("edge-{region}-{i}")).collect();
        let mut members = Vec::new();
        for id in &ids {
            let lat = latency.clone();
            let on_applied: Arc<dyn Fn(&dci_proto::Batch) + Send + Sync> =
                Arc::new(move |b: &dci_proto::Batch| {
                    let now = dci_proto::now_us();
                    let mut h = dci_proto::upstream::lock(&lat);
                    for e in &b.entries {
                        let _ = h.record(now.saturating_sub(e.publish_time_us).max(1));
                    }
                });
            let cfg = EdgeConfig {
                listen: "127.0.0.1:0".parse()?,
                relays: vec![relay.url()],
                region: region.into(),
                node_id: id.clone(),
                ring_nodes: ids.clone(),
                replication: a.replication,
                shard_count: a.shards,
                max_staleness: a.max_staleness,
                ..EdgeConfig::default()
            };
            let edge = EdgeNode::start_with(cfg.clone(), Some(on_applied.clone())).await?;
            members.push((id.clone(), edge.url()));
            edges.push(edge);
            edge_cfgs.push((cfg, on_applied));
        }
        clients.push(CacheClient::new(members)?.with_replication(a.replication as usize));
        relays.push(relay);
    }
    crate::out::say!(
        "dci demo: coordinator{} {} (log in {}), relays {}, {} edges; {} writes/s, {} reads/s over {} keys",
        if urls.len() > 1 { "s" } else { "" },
        urls.join(" "),
        dir.path().display(),
        relays.iter().map(|r| r.url()).collect::<Vec<_>>().join(" "),
        edges.len(),
        a.rate,
        a.reads,
        a.keys
    )?;

    let publisher = Publisher::connect(urls).await?;
    let nodes = Nodes {
        coordinators: coordinators.into_iter().map(Some).collect(),
        coordinator_cfgs,
        relays,
        relay_cfgs,
        edges,
        edge_cfgs,
    };
    let db = Arc::new(Database {
        versions: (0..a.keys).map(|_| AtomicU64::new(1)).collect(),
        acked: Mutex::new(HashMap::new()),
    });
    let stats = Arc::new(Stats::default());
    let (halt_tx, halt) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();

    // Writers: bump the row's version, then invalidate with it. Publishes in flight are bounded:
    // asked for more than the process can carry, the demo runs at what it can (the per-second
    // line shows it) instead of queueing without end and reporting the queue as latency.
    let writers = if a.rate == 0 { 0 } else { 4u64 };
    let in_flight = Arc::new(tokio::sync::Semaphore::new(MAX_PUBLISHES_IN_FLIGHT));
    for w in 0..writers {
        let (p, db, stats, mut halt) = (publisher.clone(), db.clone(), stats.clone(), halt.clone());
        let in_flight = in_flight.clone();
        let period = Duration::from_secs_f64(writers as f64 / a.rate.max(1) as f64);
        let (keys, bound, prefixes, pages) = (a.keys, a.max_staleness, a.prefixes, a.pages);
        tasks.push(tokio::spawn(async move {
            let mut tick = staggered(period, w, writers);
            loop {
                tokio::select! { _ = tick.tick() => {}, _ = halt.changed() => return }
                let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                    continue;
                };
                let k = rand::random_range(0..keys);
                // A prefix: every row under it bumped, then one invalidation for them all.
                let rows: Vec<(u64, u64)> = if prefixes > 0 && rand::random_range(0..prefixes) == 0
                {
                    let first = k / ROWS_PER_PREFIX * ROWS_PER_PREFIX;
                    (first..(first + ROWS_PER_PREFIX).min(keys))
                        .map(|k| {
                            (
                                k,
                                db.versions[k as usize].fetch_add(1, Ordering::SeqCst) + 1,
                            )
                        })
                        .collect()
                } else {
                    vec![(
                        k,
                        db.versions[k as usize].fetch_add(1, Ordering::SeqCst) + 1,
                    )]
                };
                let p = p.clone();
                let (db, stats) = (db.clone(), stats.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    let mut entries = vec![match rows[..] {
                        [(k, version)] => dci_sdk::Invalidation {
                            source_version: Some(version),
                            ..dci_sdk::Invalidation::key(key_of(k))
                        },
                        _ => dci_sdk::Invalidation::prefix(format!(
                            "user:{:04}",
                            k / ROWS_PER_PREFIX
                        )),
                    }];
                    // The pages that show these rows, in the same request: acknowledged
                    // together, as one change.
                    if pages > 0 {
                        entries.extend(
                            rows.iter()
                                .map(|(k, _)| dci_sdk::Invalidation::tag(row_tag(*k))),
                        );
                    }
                    let published = p.publish(entries).await;
                    match published {
                        Ok(_) => {
                            stats.publishes.fetch_add(1, Ordering::Relaxed);
                            let mut acked = dci_proto::upstream::lock(&db.acked);
                            // Read under the lock, so that times are noted in their order.
                            let now = Instant::now();
                            let horizon = now.checked_sub(ACKED_HORIZON + bound);
                            for &(k, version) in &rows {
                                acked.entry(k).or_default().note(version, now, horizon);
                            }
                        }
                        Err(e) => {
                            let k = rows[0].0;
                            tracing::warn!(key = %key_of(k), error = %e, "publish failed");
                            stats.errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        }));
    }

    // Readers: get_or_load through each region's ring; check what they read.
    let readers = if a.reads == 0 { 0 } else { 32u64 };
    for r in 0..readers {
        let client = clients[(r % clients.len() as u64) as usize].clone();
        let (db, stats, mut halt) = (db.clone(), stats.clone(), halt.clone());
        let period = Duration::from_secs_f64(readers as f64 / a.reads.max(1) as f64);
        let (keys, bound, pages) = (a.keys, a.max_staleness, a.pages);
        tasks.push(tokio::spawn(async move {
            let mut tick = staggered(period, r, readers);
            loop {
                tokio::select! { _ = tick.tick() => {}, _ = halt.changed() => return }
                let k = rand::random_range(0..keys);
                // A row's value is its version; a page's, the versions of the rows it shows.
                let (key, rows) = if pages > 0 && rand::random_range(0..pages) == 0 {
                    (format!("page:{k:06}"), page_rows(k, keys).to_vec())
                } else {
                    (key_of(k), vec![k])
                };
                let loaded = Arc::new(AtomicU64::new(0));
                let l2 = loaded.clone();
                let db2 = db.clone();
                let read_rows = rows.clone();
                // Only what was acknowledged before the read began can be asked of it: a read
                // that takes long (a fill waiting on an edge being stopped) returns a value as
                // of its start.
                let began = Instant::now();
                let got = client
                    .get_or_load(key.clone(), move || async move {
                        l2.store(1, Ordering::Relaxed);
                        let versions: Vec<u64> = read_rows
                            .iter()
                            .map(|&k| db2.versions[k as usize].load(Ordering::SeqCst))
                            .collect();
                        let text: Vec<String> = versions.iter().map(u64::to_string).collect();
                        let fill = Fill::new(text.join(","));
                        // A row's own key is invalidated by key, with the row's version; a page
                        // by its rows' tags.
                        let fill = match versions[..] {
                            [version] => fill.version(version),
                            _ => fill.tagged(read_rows.iter().map(|&k| row_tag(k))),
                        };
                        Ok::<_, std::convert::Infallible>(fill)
                    })
                    .await;
                stats.reads.fetch_add(1, Ordering::Relaxed);
                let value = match got {
                    Ok(v) => v,
                    Err(e) => {
                        tracing::warn!(%key, error = %e, "read failed");
                        stats.errors.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                };
                if loaded.load(Ordering::Relaxed) == 0 {
                    stats.hits.fetch_add(1, Ordering::Relaxed);
                }
                let seen: Vec<u64> = std::str::from_utf8(&value)
                    .unwrap_or_default()
                    .split(',')
                    .map(|s| s.parse().unwrap_or(0))
                    .collect();
                // Stale: a newer version of a row it shows had its invalidation acknowledged
                // more than the bound ago.
                let acked = dci_proto::upstream::lock(&db.acked);
                for (&k, &seen) in rows.iter().zip(seen.iter().chain(std::iter::repeat(&0))) {
                    let Some((newer, at)) = acked.get(&k).and_then(|p| p.first_newer(seen)) else {
                        continue;
                    };
                    let before = began.saturating_duration_since(at);
                    if before > bound {
                        stats.stale.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(
                            %key,
                            row = %key_of(k),
                            read = seen,
                            acknowledged = newer,
                            acked_before_read_ms = before.as_millis() as u64,
                            read_ms = began.elapsed().as_millis() as u64,
                            loaded = loaded.load(Ordering::Relaxed) == 1,
                            "stale read"
                        );
                        break;
                    }
                }
            }
        }));
    }

    // The nodes live in this task, which (with --chaos) restarts one of them every few seconds
    // and hands them all back when the demo stops.
    let restarts = Arc::new(AtomicU64::new(0));
    let chaos = {
        let (mut halt, restarts, every) = (halt.clone(), restarts.clone(), a.chaos);
        let mut nodes = nodes;
        tokio::spawn(async move {
            for round in 0.. {
                tokio::select! {
                    biased;
                    _ = halt.changed() => break,
                    _ = tokio::time::sleep(every.unwrap_or_default()), if every.is_some() => {}
                }
                // A node that cannot start again ends the chaos, not the other nodes.
                if let Err(e) = nodes.restart_one(round, CHAOS_DOWN).await {
                    let _ = crate::out::say!(
                        "chaos: a node did not start again ({e:#}); no more chaos"
                    );
                    return (nodes, Some(e));
                }
                restarts.fetch_add(1, Ordering::Relaxed);
            }
            (nodes, None)
        })
    };

    let started = Instant::now();
    let mut report = tokio::time::interval(Duration::from_secs(1));
    report.tick().await;
    let (mut last_pub, mut last_reads, mut last_hits) = (0, 0, 0);
    tokio::pin!(stop);
    loop {
        // Nobody reads the report any more (`dci demo | grep -m1 stale`): the run ends as at
        // its duration, and its exit code still tells whether a stale read was seen.
        let done = a.duration.is_some_and(|d| started.elapsed() >= d) || crate::out::gone();
        if done {
            break;
        }
        tokio::select! {
            _ = report.tick() => {}
            _ = &mut stop => break,
        }
        let pubs = stats.publishes.load(Ordering::Relaxed);
        let reads = stats.reads.load(Ordering::Relaxed);
        let hits = stats.hits.load(Ordering::Relaxed);
        let (p50, p99) = {
            let mut h = dci_proto::upstream::lock(&latency);
            let r = (h.value_at_quantile(0.5), h.value_at_quantile(0.99));
            h.reset();
            r
        };
        let dr = reads - last_reads;
        let hit_ratio = if dr == 0 {
            0.0
        } else {
            (hits - last_hits) as f64 / dr as f64 * 100.0
        };
        let chaos = if a.chaos.is_some() {
            format!(" restarts={}", restarts.load(Ordering::Relaxed))
        } else {
            String::new()
        };
        crate::out::say!(
            "t={:>4}s publishes/s={:>6} propagation p50={:.2}ms p99={:.2}ms hit ratio={:>5.1}% stale reads={} errors={}{chaos}",
            started.elapsed().as_secs(),
            pubs - last_pub,
            p50 as f64 / 1000.0,
            p99 as f64 / 1000.0,
            hit_ratio,
            stats.stale.load(Ordering::Relaxed),
            stats.errors.load(Ordering::Relaxed),
        )?;
        (last_pub, last_reads, last_hits) = (pubs, reads, hits);
    }
    let _ = halt_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    crate::out::say!(
        "dci demo: done after {:.1}s: {} publishes, {} reads, {} stale reads",
        started.elapsed().as_secs_f64(),
        stats.publishes.load(Ordering::Relaxed),
        stats.reads.load(Ordering::Relaxed),
        stats.stale.load(Ordering::Relaxed)
    )?;
    let (nodes, failed) = chaos.await?;
    nodes.stop().await?;
    if let Some(e) = failed {
        return Err(e.context("chaos"));
    }
    let stale = stats.stale.load(Ordering::Relaxed);
    if stale > 0 {
        anyhow::bail!("{stale} stale reads seen");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node that does not start at once (its port still taken) is tried again, for a while.
    #[tokio::test(start_paused = true)]
    async fn a_node_that_does_not_start_is_tried_again() {
        let tries = std::cell::Cell::new(0);
        let start = || {
            tries.set(tries.get() + 1);
            let ok = tries.get() > 3;
            async move {
                if ok {
                    Ok(7)
                } else {
                    Err(std::io::Error::from(std::io::ErrorKind::AddrInUse))
                }
            }
        };
        assert_eq!(again(start).await.unwrap(), 7);
        assert_eq!(tries.get(), 4);
        let never = || async { Err::<(), _>(std::io::Error::from(std::io::ErrorKind::AddrInUse)) };
        assert!(again(never).await.is_err(), "but not for ever");
    }

    /// While a stopped node is down its port is held: connections to it are refused, and the
    /// node starts there again once the time is up.
    #[tokio::test]
    async fn a_stopped_nodes_port_is_held_while_it_is_down() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let down = tokio::spawn(down_for(addr, Duration::from_millis(300)));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "refused while down"
        );
        let other = tokio::net::TcpSocket::new_v4().unwrap();
        assert!(other.bind(addr).is_err(), "no one else binds it meanwhile");
        drop(other);
        down.await.unwrap();
        tokio::net::TcpListener::bind(addr)
            .await
            .expect("free once it is up");
    }

    /// Against the whole record kept naively: the earliest acknowledgement of any newer
    /// version, whatever order the acknowledgements came in.
    #[test]
    fn the_earliest_newer_acknowledgement_is_found_as_if_all_were_kept() {
        use rand::{Rng, SeedableRng};
        let mut r = rand::rngs::StdRng::seed_from_u64(7);
        let t0 = Instant::now();
        for _ in 0..200 {
            let mut acked = Acked::default();
            let mut all: Vec<(u64, Instant)> = Vec::new();
            let mut at = t0;
            for _ in 0..r.random_range(1..60) {
                let version = r.random_range(1..40);
                at += Duration::from_millis(r.random_range(0..3));
                acked.note(version, at, None);
                all.push((version, at));
            }
            for seen in 0..42 {
                let naive = all
                    .iter()
                    .filter(|(v, _)| *v > seen)
                    .map(|(_, at)| *at)
                    .min();
                assert_eq!(acked.first_newer(seen).map(|(_, at)| at), naive, "{all:?}");
            }
        }
        // Past the horizon, the newest acknowledged stands for the older ones.
        let mut acked = Acked::default();
        for v in 1..=1000 {
            acked.note(v, t0 + Duration::from_millis(v), None);
        }
        let horizon = t0 + Duration::from_millis(900);
        acked.note(1001, t0 + Duration::from_millis(1001), Some(horizon));
        assert_eq!(acked.0.len(), 1 + 102, "899, then 900..=1001");
        assert_eq!(
            acked.first_newer(3),
            Some((899, t0 + Duration::from_millis(899)))
        );
    }

    #[test]
    fn tasks_sharing_a_rate_tick_evenly_apart_within_the_period() {
        let period = Duration::from_millis(8);
        let at: Vec<Duration> = (0..32).map(|i| stagger(period, i, 32)).collect();
        assert_eq!(at[0], Duration::ZERO);
        for w in at.windows(2) {
            assert_eq!(w[1] - w[0], Duration::from_micros(250));
        }
        assert!(at[31] < period);
        assert_eq!(stagger(period, 0, 0), Duration::ZERO);
    }
}
