//! `dci`: one CLI for every part of the distributed cache-invalidation system.
//!
//! Each subcommand is a thin shell: it reads the YAML file (if any), applies the flags on top,
//! and hands the result to the library crate that does the work.

mod bench;
mod demo;
mod follow;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, Context};
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use dci_proto::applied::Outcome;
use dci_proto::pb;
use dci_proto::types::printable;
use serde::de::DeserializeOwned;

#[derive(Parser)]
#[command(
    name = "dci",
    version,
    about = "Distributed cache invalidation: coordinator, relays, edge caches"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a coordinator (the sequencer and durable log of one shard).
    Coordinator(CoordinatorArgs),
    /// Run a relay (regional fan-out).
    Relay(RelayArgs),
    /// Run an edge cache.
    Edge(EdgeArgs),
    /// Publish invalidations of keys; prints "KEY SEQ" per key.
    Publish(PublishArgs),
    /// Read a key from an edge: the value and exit 0 on a hit, "miss" on stderr and exit 1.
    Get(GetArgs),
    /// Store a value on an edge (refused when the lease is stale).
    Set(SetArgs),
    /// Drop a key from an edge: "deleted" and exit 0, or "absent" on stderr and exit 1.
    Delete(GetArgs),
    /// Show the tree: every node with its high-water mark and lag.
    Status(StatusArgs),
    /// Print the invalidations a coordinator or relay streams, one line each, as they come.
    Follow(follow::FollowArgs),
    /// Run a whole deployment in-process with a workload, and report what it sees.
    Demo(demo::DemoArgs),
    /// Measure fan-out throughput, latency, cost and scale (and Redis pub/sub beside it).
    Bench(bench::BenchArgs),
    /// The receivers of the bench's scale run, in their own process.
    #[command(hide = true)]
    BenchReceivers(bench::ReceiversArgs),
}

#[derive(Args)]
struct CoordinatorArgs {
    /// YAML config file; flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Serve Prometheus metrics on http://ADDR/metrics.
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Push the same metrics to an OpenTelemetry collector (OTLP/gRPC, e.g. http://127.0.0.1:4317).
    #[arg(long)]
    otlp_endpoint: Option<String>,
    /// Address to listen on [default: 127.0.0.1:7400].
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Directory of the log [default: dci-data].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Shard id [default: 0].
    #[arg(long)]
    shard: Option<u32>,
    /// Number of shards [default: 1].
    #[arg(long)]
    shard_count: Option<u32>,
    /// fsync policy: always, interval, never [default: always].
    #[arg(long)]
    fsync: Option<dci_coordinator::FsyncPolicy>,
    /// Longest key in bytes [default: 1024].
    #[arg(long)]
    max_key_len: Option<usize>,
    /// Name in `dci status` (default: `coordinator-<shard>`).
    #[arg(long)]
    node_id: Option<String>,
    /// Most entries in one publish request [default: 65536].
    #[arg(long)]
    max_request_entries: Option<usize>,
    /// Time between fsyncs under `--fsync interval` [default: 100ms].
    #[arg(long, value_parser = duration)]
    fsync_interval: Option<Duration>,
    /// Log segment size in bytes [default: 64 MiB].
    #[arg(long)]
    segment_bytes: Option<u64>,
    /// Log retention by size, in bytes [default: 1 GiB].
    #[arg(long)]
    retention_bytes: Option<u64>,
    /// Log retention by age (e.g. 24h) [default: 24h].
    #[arg(long, value_parser = duration)]
    retention_age: Option<Duration>,
    /// Most entries written as one group [default: 65536].
    #[arg(long)]
    max_group_entries: Option<usize>,
    /// Bytes of publishes waiting for the log at most; more wait for room [default: 256 MiB].
    #[arg(long)]
    max_queued_bytes: Option<usize>,
    /// Bytes of recent batches kept in memory for replay [default: 64 MiB].
    #[arg(long)]
    memory_tail_bytes: Option<usize>,
    /// Unacked bytes in flight per receiver [default: 4 MiB].
    #[arg(long)]
    window_bytes: Option<usize>,
    /// Receivers served at once; one more is refused and follows its next sender [default: 0, no limit].
    #[arg(long)]
    max_receivers: Option<u64>,
    /// How often metrics are pushed to the OTLP collector (e.g. 10s).
    #[arg(long, value_parser = duration)]
    otlp_interval: Option<Duration>,
    #[command(flatten)]
    tls: TlsArgs,
}

#[derive(Args, Clone)]
struct RelayArgs {
    /// YAML config file; flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Serve Prometheus metrics on http://ADDR/metrics.
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Push the same metrics to an OpenTelemetry collector (OTLP/gRPC, e.g. http://127.0.0.1:4317).
    #[arg(long)]
    otlp_endpoint: Option<String>,
    /// Address to listen on [default: 127.0.0.1:7500].
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Upstream senders (coordinator or relays), comma-separated, in failover order.
    #[arg(long, value_delimiter = ',', value_parser = url_item)]
    upstream: Vec<String>,
    /// Another failover list (comma-separated), followed on a link of its own: with a sharded
    /// coordinator tier, `--upstream` names shard 0's coordinator and one of these each other's.
    /// Repeatable.
    #[arg(long)]
    upstream_group: Vec<String>,
    /// Region name.
    #[arg(long)]
    region: Option<String>,
    /// Node id.
    #[arg(long)]
    node_id: Option<String>,
    /// Ring buffer bytes per shard.
    #[arg(long)]
    ring_bytes: Option<usize>,
    /// Unacked bytes in flight per receiver [default: 4 MiB].
    #[arg(long)]
    window_bytes: Option<usize>,
    /// Receivers served at once; one more is refused and follows its next sender [default: 0, no limit].
    #[arg(long)]
    max_receivers: Option<u64>,
    /// Give up on a silent sender after this long (at least 1s) [default: 3s].
    #[arg(long, value_parser = duration)]
    peer_timeout: Option<Duration>,
    /// Ask upstream for zstd-compressed streams (`--compression=false` overrides a file's true).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    compression: Option<bool>,
    /// Longest key in bytes [default: 1024].
    #[arg(long)]
    max_key_len: Option<usize>,
    /// How often metrics are pushed to the OTLP collector (e.g. 10s).
    #[arg(long, value_parser = duration)]
    otlp_interval: Option<Duration>,
    #[command(flatten)]
    tls: TlsArgs,
}

#[derive(Args, Clone)]
struct EdgeArgs {
    /// YAML config file; flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Serve Prometheus metrics on http://ADDR/metrics.
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Push the same metrics to an OpenTelemetry collector (OTLP/gRPC, e.g. http://127.0.0.1:4317).
    #[arg(long)]
    otlp_endpoint: Option<String>,
    /// Address to listen on [default: 127.0.0.1:7600].
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Relays, comma-separated, in failover order.
    #[arg(long, value_delimiter = ',', value_parser = url_item)]
    relays: Vec<String>,
    /// Region name.
    #[arg(long)]
    region: Option<String>,
    /// Node id.
    #[arg(long)]
    node_id: Option<String>,
    /// Store size bound in bytes.
    #[arg(long)]
    capacity: Option<u64>,
    /// Serve misses after this long without contact (e.g. 5s).
    #[arg(long, value_parser = duration)]
    max_staleness: Option<Duration>,
    /// Shards of the keyspace, as many as the coordinator tier has (leases are per shard).
    #[arg(long)]
    shard_count: Option<u32>,
    /// Default time to live of a cached value (e.g. 1h).
    #[arg(long, value_parser = duration)]
    ttl: Option<Duration>,
    /// Longest key in bytes [default: 1024].
    #[arg(long)]
    max_key_len: Option<usize>,
    /// Largest value in bytes [default: 8 MiB].
    #[arg(long)]
    max_value_len: Option<usize>,
    /// Tombstone slots per shard [default: 262144].
    #[arg(long)]
    max_tombstones: Option<u64>,
    /// Follow only keys with these prefixes, comma-separated (others are refused).
    #[arg(long, value_delimiter = ',')]
    prefixes: Vec<String>,
    /// Follow only the keys this edge owns on this ring of node ids, comma-separated.
    #[arg(long, value_delimiter = ',')]
    ring_nodes: Vec<String>,
    /// Owners per key on the ring [default: 1].
    #[arg(long)]
    replication: Option<u32>,
    /// Give up on a silent relay after this long (at least 1s) [default: 3s].
    #[arg(long, value_parser = duration)]
    peer_timeout: Option<Duration>,
    /// Ask relays for zstd-compressed streams (`--compression=false` overrides a file's true).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    compression: Option<bool>,
    /// How often metrics are pushed to the OTLP collector (e.g. 10s).
    #[arg(long, value_parser = duration)]
    otlp_interval: Option<Duration>,
    #[command(flatten)]
    tls: TlsArgs,
}

/// A server's TLS flags (the config file's `tls` section).
#[derive(Args, Clone)]
struct TlsArgs {
    /// PEM certificate chain to serve gRPC over TLS with (with --tls-key).
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// PEM CA certificate(s) trusted for `https://` senders (default: the system's roots).
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// Serve only clients presenting a certificate signed by these PEM CA certificate(s)
    /// (mutual TLS; needs --tls-cert).
    #[arg(long)]
    tls_client_ca: Option<PathBuf>,
    /// Under mutual TLS, names (DNS or URI, in the client certificate; `*` any run of characters)
    /// allowed to call Publisher, comma-separated (default: any client --tls-client-ca signed).
    #[arg(long, value_delimiter = ',')]
    tls_allow_publish: Option<Vec<String>>,
    /// As --tls-allow-publish, for Subscribe (relays, edges, near caches following this node).
    #[arg(long, value_delimiter = ',')]
    tls_allow_subscribe: Option<Vec<String>>,
    /// As --tls-allow-publish, for Cache (reads and fills through an edge).
    #[arg(long, value_delimiter = ',')]
    tls_allow_cache: Option<Vec<String>>,
    /// As --tls-allow-publish, for Admin (`dci status`).
    #[arg(long, value_delimiter = ',')]
    tls_allow_admin: Option<Vec<String>>,
}

impl TlsArgs {
    /// Flags override the file.
    fn apply(self, tls: &mut dci_proto::tls::TlsConfig) {
        tls.cert = self.tls_cert.or(tls.cert.take());
        tls.key = self.tls_key.or(tls.key.take());
        tls.ca = self.tls_ca.or(tls.ca.take());
        tls.client_ca = self.tls_client_ca.or(tls.client_ca.take());
        let allow = &mut tls.allow;
        allow.publish = self
            .tls_allow_publish
            .unwrap_or(std::mem::take(&mut allow.publish));
        allow.subscribe = self
            .tls_allow_subscribe
            .unwrap_or(std::mem::take(&mut allow.subscribe));
        allow.cache = self
            .tls_allow_cache
            .unwrap_or(std::mem::take(&mut allow.cache));
        allow.admin = self
            .tls_allow_admin
            .unwrap_or(std::mem::take(&mut allow.admin));
    }
}

/// A client command's TLS flags.
#[derive(Args)]
struct ClientTlsArgs {
    /// PEM CA certificate(s) trusted for `https://` URLs (default: the system's roots).
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// PEM client certificate for nodes that require one (mutual TLS; with --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

impl ClientTlsArgs {
    /// How the command speaks TLS to `https://` URLs.
    fn client(&self) -> anyhow::Result<dci_proto::tls::ClientTls> {
        let tls = dci_proto::tls::TlsConfig {
            ca: self.tls_ca.clone(),
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
            ..Default::default()
        };
        Ok(tls.client()?)
    }
}

#[derive(Args)]
struct PublishArgs {
    /// Coordinator URL; with a sharded tier, every shard's, comma-separated, in shard order (each
    /// key then goes to its shard, prefixes to all, and the shard is printed beside the seq).
    #[arg(long, value_delimiter = ',', value_parser = url_item, default_value = "http://127.0.0.1:7400")]
    coordinator: Vec<String>,
    /// Invalidate every key with these prefixes instead of exact keys.
    #[arg(long)]
    prefix: bool,
    /// Invalidate every key of every shard (edges drop all they hold); prints "* SEQ".
    #[arg(long, conflicts_with_all = ["prefix", "keys", "version"])]
    all: bool,
    /// Writer's version for every key.
    #[arg(long)]
    version: Option<u64>,
    /// Keys to invalidate; `-` reads them from standard input, one per line, and publishes them
    /// as they come.
    #[arg(required_unless_present = "all")]
    keys: Vec<String>,
    /// Resend a request left without an answer (a coordinator restarting, a connection lost)
    /// for this long before giving up; the coordinator takes a resend for the request it
    /// repeats, never as a second one.
    #[arg(long, value_parser = duration, default_value = "10s")]
    retry_for: Duration,
    /// Once published, wait until every cache below the coordinators (edges, near caches) has
    /// applied it, for at most this long (`--wait` alone: 30s): "applied by all N caches" on
    /// stderr, or the caches that lag and exit 3.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "30s", value_parser = duration)]
    wait: Option<Duration>,
    #[command(flatten)]
    tls: ClientTlsArgs,
}

/// Exit code of `dci publish --wait` when published but not applied everywhere in time.
const EXIT_NOT_APPLIED: u8 = 3;

/// Most keys `dci publish` sends in one request (far below the coordinator's limits).
const PUBLISH_CHUNK: usize = 4096;

#[derive(Args)]
struct GetArgs {
    /// Edge URL.
    #[arg(long, default_value = "http://127.0.0.1:7600")]
    edge: String,
    #[command(flatten)]
    tls: ClientTlsArgs,
    /// The key.
    key: String,
}

#[derive(Args)]
struct SetArgs {
    /// Edge URL.
    #[arg(long, default_value = "http://127.0.0.1:7600")]
    edge: String,
    #[command(flatten)]
    tls: ClientTlsArgs,
    /// Lease from a miss.
    #[arg(long)]
    lease: Option<u64>,
    /// The key.
    key: String,
    /// The value (`-` reads it from standard input, as bytes).
    value: String,
}

#[derive(Args)]
struct StatusArgs {
    /// Coordinator (or any node) URL; with a sharded tier, every shard's, comma-separated (the
    /// trees are merged: a node appears once per sender it follows).
    #[arg(long, value_delimiter = ',', value_parser = url_item, default_value = "http://127.0.0.1:7400")]
    coordinator: Vec<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    tls: ClientTlsArgs,
}

fn load<T: DeserializeOwned + Default>(path: &Option<PathBuf>) -> anyhow::Result<T> {
    match path {
        None => Ok(T::default()),
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            serde_yaml::from_str(&text).with_context(|| format!("parsing {}", p.display()))
        }
    }
}

fn init_tracing(default: &str) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default.into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal; log files and collectors get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Resolves on Ctrl-C or SIGTERM.
async fn terminated() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// A URL of a comma-separated list: "a, b" is two URLs, as it reads, not one with a space.
fn url_item(s: &str) -> Result<String, String> {
    Ok(s.trim().to_string())
}

/// A count flag that must be at least 1.
pub(crate) fn positive(s: &str) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// [`positive`], as a `usize`.
pub(crate) fn positive_usize(s: &str) -> Result<usize, String> {
    positive(s).and_then(|n| usize::try_from(n).map_err(|e| e.to_string()))
}

/// A duration flag in humantime's forms ("500ms", "2m"), no longer than any setting may be.
pub(crate) fn duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    dci_proto::types::check_duration("a duration", d)?;
    Ok(d)
}

const GRACE: Duration = Duration::from_secs(10);

/// Flags override the file: each named `Option` flag that was given replaces the config field.
macro_rules! override_with {
    ($cfg:ident, $args:ident; $($field:ident),+) => {
        $(if let Some(v) = $args.$field {
            $cfg.$field = v;
        })+
    };
}

/// Serve until Ctrl-C or SIGTERM, then drain within the grace period.
async fn until_terminated<E>(
    stop: impl std::future::Future<Output = Result<(), E>>,
) -> anyhow::Result<()>
where
    E: std::error::Error + Send + Sync + 'static,
{
    terminated().await;
    tracing::info!("draining");
    tokio::time::timeout(GRACE, stop)
        .await
        .map_err(|_| anyhow!("drain took longer than {GRACE:?}"))??;
    Ok(())
}

async fn coordinator(a: CoordinatorArgs) -> anyhow::Result<()> {
    let mut cfg: dci_coordinator::CoordinatorConfig = load(&a.config)?;
    override_with!(cfg, a; listen, data_dir, shard, shard_count, fsync, max_key_len, node_id,
        max_request_entries, fsync_interval, segment_bytes, retention_bytes, retention_age,
        max_group_entries, max_queued_bytes, memory_tail_bytes, window_bytes, max_receivers);
    cfg.metrics_listen = a.metrics_listen.or(cfg.metrics_listen);
    cfg.otlp.endpoint = a.otlp_endpoint.or(cfg.otlp.endpoint);
    cfg.otlp.interval = a.otlp_interval.unwrap_or(cfg.otlp.interval);
    a.tls.apply(&mut cfg.tls);
    let c = dci_coordinator::Coordinator::start(cfg).await?;
    tracing::info!(addr = %c.addr, epoch = c.epoch, "coordinator listening");
    until_terminated(c.stop()).await
}

/// The relay's config: the file, then the flags over it.
fn relay_config(a: &RelayArgs) -> anyhow::Result<dci_relay::RelayConfig> {
    let a = a.clone();
    let mut cfg: dci_relay::RelayConfig = load(&a.config)?;
    override_with!(cfg, a; listen, region, node_id, ring_bytes, window_bytes, peer_timeout,
        compression, max_key_len, max_receivers);
    if !a.upstream.is_empty() {
        cfg.upstream = a.upstream;
    }
    if !a.upstream_group.is_empty() {
        cfg.upstream_groups = a
            .upstream_group
            .iter()
            .map(|g| g.split(',').map(|u| u.trim().to_string()).collect())
            .collect();
    }
    cfg.metrics_listen = a.metrics_listen.or(cfg.metrics_listen);
    cfg.otlp.endpoint = a.otlp_endpoint.or(cfg.otlp.endpoint);
    cfg.otlp.interval = a.otlp_interval.unwrap_or(cfg.otlp.interval);
    a.tls.apply(&mut cfg.tls);
    Ok(cfg)
}

async fn relay(a: RelayArgs) -> anyhow::Result<()> {
    let hup = hangups();
    let r = dci_relay::Relay::start(relay_config(&a)?).await?;
    tracing::info!(addr = %r.addr, "relay listening");
    let path = a.config.clone();
    let reload = move |r: &dci_relay::Relay| Ok(r.reconfigure(relay_config(&a)?)?);
    until_terminated_reloading(r, path, hup, reload, dci_relay::Relay::stop).await
}

/// The edge's config: the file, then the flags over it.
fn edge_config(a: &EdgeArgs) -> anyhow::Result<dci_edge_cache::EdgeConfig> {
    let a = a.clone();
    let mut cfg: dci_edge_cache::EdgeConfig = load(&a.config)?;
    override_with!(cfg, a; listen, region, node_id, capacity, max_staleness, shard_count, ttl,
        max_key_len, max_value_len, max_tombstones, replication, peer_timeout, compression);
    for (list, given) in [
        (&mut cfg.relays, a.relays),
        (&mut cfg.prefixes, a.prefixes),
        (&mut cfg.ring_nodes, a.ring_nodes),
    ] {
        if !given.is_empty() {
            *list = given;
        }
    }
    cfg.metrics_listen = a.metrics_listen.or(cfg.metrics_listen);
    cfg.otlp.endpoint = a.otlp_endpoint.or(cfg.otlp.endpoint);
    cfg.otlp.interval = a.otlp_interval.unwrap_or(cfg.otlp.interval);
    a.tls.apply(&mut cfg.tls);
    Ok(cfg)
}

async fn edge(a: EdgeArgs) -> anyhow::Result<()> {
    let hup = hangups();
    let e = dci_edge_cache::EdgeNode::start(edge_config(&a)?).await?;
    tracing::info!(addr = %e.addr, node = %e.node_id, "edge listening");
    let path = a.config.clone();
    let reload = move |e: &dci_edge_cache::EdgeNode| Ok(e.reconfigure(edge_config(&a)?)?);
    until_terminated_reloading(e, path, hup, reload, dci_edge_cache::EdgeNode::stop).await
}

/// [`until_terminated`], reading the config file again meanwhile ([`watch_config`]).
async fn until_terminated_reloading<N, E, Stop>(
    node: N,
    path: Option<PathBuf>,
    hup: Option<Hangup>,
    reload: impl Fn(&N) -> anyhow::Result<dci_proto::reload::Reconfigured> + Send + Sync + 'static,
    stop: impl FnOnce(N) -> Stop,
) -> anyhow::Result<()>
where
    N: Send + Sync + 'static,
    Stop: std::future::Future<Output = Result<(), E>>,
    E: std::error::Error + Send + Sync + 'static,
{
    let node = std::sync::Arc::new(node);
    let watcher = {
        let node = node.clone();
        tokio::spawn(async move { watch_config(path.as_deref(), hup, || reload(&node)).await })
    };
    terminated().await;
    tracing::info!("draining");
    watcher.abort();
    let _ = watcher.await;
    let node = std::sync::Arc::try_unwrap(node).map_err(|_| anyhow!("still in use"))?;
    tokio::time::timeout(GRACE, stop(node))
        .await
        .map_err(|_| anyhow!("drain took longer than {GRACE:?}"))??;
    Ok(())
}

/// Reload the config file on SIGHUP, and when its contents change (a mounted ConfigMap is
/// rewritten without a signal): `reload` reads it (flags still over it) and applies it.
/// Without a file, SIGHUP is only said to have nothing to reload (it would stop the node).
async fn watch_config(
    path: Option<&std::path::Path>,
    mut hup: Option<Hangup>,
    reload: impl Fn() -> anyhow::Result<dci_proto::reload::Reconfigured>,
) {
    let mut seen = path.and_then(|p| std::fs::read(p).ok());
    let mut tick = tokio::time::interval(CONFIG_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let signalled = async {
            match hup.as_mut() {
                #[cfg(unix)]
                Some(h) => h.recv().await,
                _ => std::future::pending().await,
            }
        };
        let asked = tokio::select! {
            _ = signalled => true,
            _ = tick.tick() => false,
        };
        let Some(path) = path else {
            if asked {
                tracing::info!("SIGHUP: no --config file to reload");
            }
            continue;
        };
        let now = std::fs::read(path).ok();
        if !asked && (now.is_none() || now == seen) {
            // Unchanged, or gone for a moment (an editor's or a ConfigMap's swap).
            continue;
        }
        seen = now;
        match reload() {
            Ok(r) => {
                if !r.taken.is_empty() {
                    tracing::info!(config = %path.display(), taken = ?r.taken, "config reloaded");
                } else if asked {
                    tracing::info!(config = %path.display(), "config reloaded: nothing to change");
                }
                if !r.need_restart.is_empty() {
                    tracing::warn!(
                        config = %path.display(),
                        keys = ?r.need_restart,
                        "config changes that take effect only at a restart"
                    );
                }
            }
            Err(e) => tracing::warn!(
                config = %path.display(),
                error = %format_args!("{e:#}"),
                "config not reloaded: running on as before"
            ),
        }
    }
}

/// SIGHUPs, taken before a node says it listens: from then on one must not stop it.
fn hangups() -> Option<Hangup> {
    #[cfg(unix)]
    return tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    #[cfg(not(unix))]
    None
}

#[cfg(unix)]
type Hangup = tokio::signal::unix::Signal;
#[cfg(not(unix))]
type Hangup = ();

/// How often a node looks at its config file for changes.
const CONFIG_POLL: Duration = Duration::from_secs(2);

/// A refused call on one line; `serves` says what kind of node should have answered it.
fn status_line(
    s: &tonic::Status,
    serves: &str,
    url: &str,
    tls: &dci_proto::tls::ClientTls,
) -> String {
    match s.code() {
        // The client's own deadline comes back as "cancelled: Timeout expired".
        tonic::Code::Cancelled if s.message() == "Timeout expired" => {
            format!("no answer within {}s", REQUEST_TIMEOUT.as_secs())
        }
        tonic::Code::Unimplemented => {
            format!("that node does not answer this call: is it {serves}?")
        }
        // Refusals: the node's own message says what was wrong, the code's wording adds nothing.
        tonic::Code::InvalidArgument
        | tonic::Code::FailedPrecondition
        | tonic::Code::AlreadyExists
        | tonic::Code::OutOfRange
            if !s.message().is_empty() =>
        {
            s.message().to_string()
        }
        // A transport failure says what failed only in its causes.
        _ => {
            let mut line = dci_proto::status_with_causes(s);
            line.push_str(dci_proto::tls::mismatch_hint(&line, url, tls));
            line
        }
    }
}

/// How long a command waits for one answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

async fn connect(
    url: &str,
    tls: &dci_proto::tls::ClientTls,
) -> anyhow::Result<tonic::transport::Channel> {
    let ep = tls
        .endpoint(url)
        .map_err(|e| anyhow!("bad url {url:?}: {e}"))?
        .connect_timeout(Duration::from_secs(3))
        .timeout(REQUEST_TIMEOUT);
    ep.connect().await.map_err(|e| {
        let why = dci_proto::with_causes(&e);
        anyhow!(
            "cannot connect to {url}: {why}{}",
            dci_proto::tls::mismatch_hint(&why, url, tls)
        )
    })
}

/// Most keys `dci publish` reads and publishes at a time: what it holds however long its input
/// is (keys from standard input are published round by round, each printed once answered).
const PUBLISH_ROUND_KEYS: usize = 16_384;
const PUBLISH_ROUND_BYTES: usize = 4 << 20;

/// Where `dci publish` takes its keys: the command line, or standard input line by line.
enum KeySource {
    Args(std::vec::IntoIter<String>),
    Stdin {
        input: std::io::BufReader<std::io::Stdin>,
        line: usize,
    },
}

impl KeySource {
    /// Whether a next key can be taken without waiting for input: while one cannot, what was
    /// read is published (a writer feeding keys as they come sees each published at once).
    fn ready(&self) -> bool {
        match self {
            KeySource::Args(_) => true,
            KeySource::Stdin { input, .. } => !input.buffer().is_empty(),
        }
    }

    /// The next key (blank lines of standard input skipped), `None` at the end.
    fn next_key(&mut self) -> anyhow::Result<Option<String>> {
        use std::io::BufRead;
        let (input, line) = match self {
            KeySource::Args(keys) => return Ok(keys.next()),
            KeySource::Stdin { input, line } => (input, line),
        };
        let limit = dci_proto::types::MAX_KEY_LEN_LIMIT;
        loop {
            *line += 1;
            let mut buf = Vec::new();
            // At most one key over the limit is held: a line longer than any coordinator takes
            // (or input that is no list of keys at all) is measured, not kept.
            let n = input
                .by_ref()
                .take(limit as u64 + 2)
                .read_until(b'\n', &mut buf)
                .map_err(|e| anyhow!("reading keys from standard input: {e}"))?;
            if n == 0 {
                return Ok(None);
            }
            let mut len = buf.len();
            if buf.last() != Some(&b'\n') && len > limit {
                loop {
                    let chunk = input
                        .fill_buf()
                        .map_err(|e| anyhow!("reading keys from standard input: {e}"))?;
                    if chunk.is_empty() {
                        break;
                    }
                    match chunk.iter().position(|&b| b == b'\n') {
                        Some(i) => {
                            len += i;
                            input.consume(i + 1);
                            break;
                        }
                        None => {
                            len += chunk.len();
                            let n = chunk.len();
                            input.consume(n);
                        }
                    }
                }
            }
            if len > limit {
                // A line ends where its key ends (a newline, a carriage return before it).
                let tail = buf
                    .iter()
                    .rev()
                    .take_while(|b| b.is_ascii_whitespace())
                    .count();
                if len - tail > limit {
                    // The same words as for a key of the command line, with its line.
                    return Err(anyhow!(
                        "line {line} of standard input: key is {} bytes, more than the \
                         maximum any coordinator takes ({limit})",
                        len - tail
                    ));
                }
            }
            let Ok(text) = String::from_utf8(buf) else {
                anyhow::bail!("line {line} of standard input: not UTF-8");
            };
            let key = text.trim_end();
            if !key.is_empty() {
                return Ok(Some(key.to_string()));
            }
        }
    }
}

async fn publish(a: PublishArgs) -> anyhow::Result<u8> {
    let Some(within) = a.wait else {
        return publish_keys(&a, &mut Vec::new()).await.map(|()| 0);
    };
    let tls = a.tls.client()?;
    let started = tokio::time::Instant::now();
    // The caches there before publishing: one that leaves the tree afterwards (cut off,
    // restarting, failing over) may still hold what is invalidated, so it is waited for.
    let mut coverage = dci_proto::applied::Coverage::default();
    let deadline = started + within;
    if let Ok(Ok(nodes)) = tokio::time::timeout_at(deadline, tier_tree(&a.coordinator, &tls)).await
    {
        coverage.update(&nodes);
    }
    let mut published = Vec::new();
    publish_keys(&a, &mut published).await?;
    let tree = || tier_tree(&a.coordinator, &tls);
    let outcome = dci_proto::applied::wait(&mut coverage, &published, deadline, tree).await;
    let within = humantime::format_duration(within);
    match outcome {
        Outcome::Applied { past_bound } => {
            let took = started.elapsed().as_secs_f64();
            let regions: Vec<_> = coverage.regions().into_iter().map(printable).collect();
            let regions = regions.join(", ");
            let mut past: Vec<&str> = past_bound.iter().map(|l| l.node_id.as_str()).collect();
            past.dedup();
            let caches = coverage.caches();
            let applied = caches.saturating_sub(past.len());
            match (caches, past.len()) {
                (0, _) => eprintln!("no cache follows these coordinators: nothing to wait for"),
                (1, 0) => eprintln!("applied by the only cache ({regions}) in {took:.2}s"),
                (n, 0) => eprintln!("applied by all {n} caches ({regions}) in {took:.2}s"),
                (n, k) => eprintln!(
                    "applied by {applied} of {n} caches ({regions}) in {took:.2}s; not by {}, \
                     {}",
                    dci_proto::applied::named(&past_bound),
                    match k {
                        1 => "which is past its staleness bound since: it serves none of it",
                        _ => "which are past their staleness bounds since: they serve none of it",
                    }
                ),
            }
            return Ok(0);
        }
        Outcome::NotApplied(lagging) => {
            let mut ids: Vec<&str> = lagging.iter().map(|l| l.node_id.as_str()).collect();
            ids.dedup();
            eprintln!(
                "not applied within {within} by {} of {} caches: {}",
                ids.len(),
                coverage.caches(),
                dci_proto::applied::named(&lagging)
            );
        }
        Outcome::Unread(failed) => {
            let why = failed.map_or("no answer from the coordinators".into(), |e| {
                format!("{e:#}")
            });
            eprintln!("published, but the tree could not be read within {within}: {why}");
        }
    }
    Ok(EXIT_NOT_APPLIED)
}

/// The tree below every coordinator of a tier, merged; an error if any does not answer (a
/// part of the tree would be missing).
async fn tier_tree(
    urls: &[String],
    tls: &dci_proto::tls::ClientTls,
) -> anyhow::Result<Vec<pb::NodeStatus>> {
    let mut nodes = Vec::new();
    for url in urls {
        merge_tree(&mut nodes, node_tree(url, tls).await?);
    }
    Ok(nodes)
}

/// Publish what the arguments say, noting in `published` how far each shard answered.
async fn publish_keys(
    a: &PublishArgs,
    published: &mut Vec<dci_proto::applied::Published>,
) -> anyhow::Result<()> {
    let tls = a.tls.client()?;
    let kind = if a.all {
        pb::Kind::All
    } else if a.prefix {
        pb::Kind::Prefix
    } else {
        pb::Kind::Key
    };
    let mut source = if a.all {
        KeySource::Args(vec![String::new()].into_iter())
    } else if a.keys == ["-"] {
        KeySource::Stdin {
            input: std::io::BufReader::with_capacity(1 << 20, std::io::stdin()),
            line: 0,
        }
    } else {
        for (i, k) in a.keys.iter().enumerate() {
            dci_proto::types::check_key_len_limit(i, k.len()).map_err(anyhow::Error::msg)?;
        }
        KeySource::Args(a.keys.clone().into_iter())
    };
    let shards = a.coordinator.len();
    let map = dci_proto::ring::ShardMap::new(shards as u32);
    // A prefix may match keys of every shard.
    let targets = |k: &str| -> Vec<usize> {
        if a.prefix || a.all {
            (0..shards).collect()
        } else {
            vec![map.shard_of(k.as_bytes()) as usize]
        }
    };
    let publisher_id = format!("cli-{:016x}", rand::random::<u64>());
    let mut clients = vec![None; shards];
    let mut request_no = vec![0u64; shards];
    let mut read = 0usize;
    // Once nothing reads the output (`| head`), the keys are still published: only the
    // printing stops. Any other failure to print is told once every key is published.
    let mut out = Some(std::io::BufWriter::new(std::io::stdout()));
    let mut unprinted = None;
    loop {
        let mut round = Vec::new();
        let mut bytes = 0;
        // A bad line ends the input: what came before it is published, then the error told.
        let mut bad = None;
        while round.len() < PUBLISH_ROUND_KEYS && bytes < PUBLISH_ROUND_BYTES {
            if !round.is_empty() && !source.ready() {
                break;
            }
            let k = match source.next_key() {
                Ok(Some(k)) => k,
                Ok(None) => break,
                Err(e) => {
                    bad = Some(e);
                    break;
                }
            };
            if a.prefix && k.is_empty() {
                anyhow::bail!("an empty prefix would be every key: say --all for that");
            }
            bytes += k.len();
            round.push(k);
        }
        if round.is_empty() {
            if let Some(e) = bad {
                return Err(e);
            }
            if read == 0 {
                anyhow::bail!("no keys on standard input");
            }
            return unprinted.map_or(Ok(()), Err);
        }
        read += round.len();
        // The shards' requests go out together; each shard's in order, one after the other.
        let sends = a
            .coordinator
            .iter()
            .zip(clients.iter_mut())
            .zip(request_no.iter_mut())
            .enumerate()
            .map(|(shard, ((url, client), request_no))| {
                let keys: Vec<(usize, &String)> = round
                    .iter()
                    .enumerate()
                    .filter(|(_, k)| targets(k).contains(&shard))
                    .collect();
                let (tls, publisher_id) = (&tls, &publisher_id);
                async move {
                    let mut answered = Vec::new();
                    for chunk in request_chunks(&keys) {
                        *request_no += 1;
                        let req = pb::PublishRequest {
                            publisher_id: publisher_id.clone(),
                            request_no: *request_no,
                            entries: chunk
                                .iter()
                                .map(|(_, k)| pb::Invalidation {
                                    key: Bytes::from(k.to_string()),
                                    kind: kind as i32,
                                    source_version: a.version,
                                    ..Default::default()
                                })
                                .collect(),
                        };
                        match publish_one(url, tls, client, req, a.retry_for).await {
                            Ok(r) => answered.push((chunk.to_vec(), r)),
                            Err(e) => return (shard, answered, Some(e)),
                        }
                    }
                    (shard, answered, None)
                }
            });
        let mut lines = vec![Vec::new(); round.len()];
        let mut failed = None;
        for (shard, answered, error) in futures::future::join_all(sends).await {
            for (chunk, r) in answered {
                if let Some(&seq) = r.seqs.iter().max() {
                    dci_proto::applied::note(
                        published,
                        dci_proto::applied::Published {
                            shard: shard as u32,
                            epoch: r.epoch,
                            seq,
                        },
                    );
                }
                for ((i, k), seq) in chunk.iter().zip(r.seqs) {
                    let k = if a.all { "*" } else { k.as_str() };
                    lines[*i].push(if shards == 1 {
                        format!("{k} {seq}")
                    } else {
                        format!("{k} {seq} shard={shard}")
                    });
                }
            }
            failed = failed.or(error);
        }
        // What a shard accepted before another failed stays accepted: say so before the error.
        if let Some(w) = &mut out {
            let printed = lines
                .iter()
                .flatten()
                .try_for_each(|l| writeln!(w, "{l}"))
                .and_then(|()| w.flush());
            if let Err(e) = printed {
                if e.kind() != std::io::ErrorKind::BrokenPipe {
                    unprinted = Some(anyhow!("writing to standard output: {e}"));
                }
                out = None;
            }
        }
        if let Some(e) = failed.or(bad) {
            return Err(e);
        }
    }
}

/// Keys in runs of at most [`PUBLISH_CHUNK`] and of fewer bytes than a coordinator decodes in
/// one request (a larger one would be refused whole).
fn request_chunks<'a, 'k>(keys: &'a [(usize, &'k String)]) -> Vec<&'a [(usize, &'k String)]> {
    use dci_proto::types::{ENTRY_OVERHEAD_BYTES, PUBLISH_REQUEST_BYTES};
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, (_, k)) in keys.iter().enumerate() {
        let cost = k.len() + ENTRY_OVERHEAD_BYTES;
        if i > start && (i - start == PUBLISH_CHUNK || bytes + cost > PUBLISH_REQUEST_BYTES) {
            out.push(&keys[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += cost;
    }
    if start < keys.len() {
        out.push(&keys[start..]);
    }
    out
}

/// Send one publish request, resending it (same publisher id and request number: the
/// coordinator answers a resend with the seqs it gave the first) while its answer does not come,
/// for up to `retry_for`; a refusal is final at once. An attempt waits for its answer no longer
/// than resends may go on (a node that is stopped, not gone, answers nothing): with no resends
/// (`retry_for` 0), as long as any request.
async fn publish_one(
    url: &str,
    tls: &dci_proto::tls::ClientTls,
    client: &mut Option<pb::publisher_client::PublisherClient<tonic::transport::Channel>>,
    req: pb::PublishRequest,
    retry_for: Duration,
) -> anyhow::Result<pb::PublishResponse> {
    let started = tokio::time::Instant::now();
    let mut backoff = Duration::from_millis(50);
    loop {
        let wait = if retry_for.is_zero() {
            REQUEST_TIMEOUT
        } else {
            retry_for
                .saturating_sub(started.elapsed())
                .clamp(Duration::from_millis(500), REQUEST_TIMEOUT)
        };
        let err = match client {
            Some(c) => match tokio::time::timeout(wait, c.publish(req.clone())).await {
                Ok(Ok(r)) => return Ok(r.into_inner()),
                Err(_) => {
                    *client = None;
                    let within = if retry_for.is_zero() {
                        REQUEST_TIMEOUT
                    } else {
                        retry_for
                    };
                    anyhow!(
                        "{url}: no answer within {}",
                        humantime::format_duration(within)
                    )
                }
                Ok(Err(s)) => {
                    let line = anyhow!(status_line(&s, "a coordinator", url, tls));
                    if !resendable(s.code()) {
                        return Err(line);
                    }
                    // A fresh connection: the old one may be the one a restarted node closed.
                    *client = None;
                    line
                }
            },
            None => match connect(url, tls).await {
                Ok(ch) => {
                    *client = Some(pb::publisher_client::PublisherClient::new(ch));
                    continue;
                }
                Err(e) => e,
            },
        };
        if started.elapsed() + backoff > retry_for {
            return Err(err);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

/// Whether a request that failed this way may be sent again: not when the node refused it for
/// what it is (sending it again would be refused again).
fn resendable(code: tonic::Code) -> bool {
    use tonic::Code::*;
    matches!(
        code,
        Unavailable | Internal | Unknown | Cancelled | DeadlineExceeded | Aborted
    )
}

async fn get(a: GetArgs) -> anyhow::Result<bool> {
    // The edge bounds the values it stores; none is refused here for its size.
    let tls = a.tls.client()?;
    let mut client = pb::cache_client::CacheClient::new(connect(&a.edge, &tls).await?)
        .max_decoding_message_size(usize::MAX);
    let r = client
        .get(pb::GetRequest {
            key: Bytes::from(a.key),
        })
        .await
        .map_err(|s| anyhow!(status_line(&s, "an edge", &a.edge, &tls)))?
        .into_inner();
    if r.hit {
        // The value as stored (it need not be text), then a newline.
        let mut out = std::io::stdout().lock();
        out.write_all(&r.value)?;
        out.write_all(b"\n")?;
        out.flush()?;
    } else {
        if r.only_misses.is_empty() {
            eprintln!("miss (lease {})", r.lease);
        } else {
            let why = printable(&r.only_misses);
            eprintln!(
                "miss (lease {}): the edge serves only misses for now: {why}",
                r.lease
            );
        }
    }
    Ok(r.hit)
}

async fn delete(a: GetArgs) -> anyhow::Result<bool> {
    let tls = a.tls.client()?;
    let mut client = pb::cache_client::CacheClient::new(connect(&a.edge, &tls).await?);
    let r = client
        .delete(pb::DeleteRequest {
            key: Bytes::from(a.key),
        })
        .await
        .map_err(|s| anyhow!(status_line(&s, "an edge", &a.edge, &tls)))?
        .into_inner();
    if r.existed {
        println!("deleted");
    } else {
        eprintln!("absent");
    }
    Ok(r.existed)
}

async fn set(a: SetArgs) -> anyhow::Result<()> {
    let value = if a.value == "-" {
        let mut v = Vec::new();
        std::io::stdin()
            .read_to_end(&mut v)
            .map_err(|e| anyhow!("reading the value from standard input: {e}"))?;
        Bytes::from(v)
    } else {
        Bytes::from(a.value)
    };
    let tls = a.tls.client()?;
    let mut client = pb::cache_client::CacheClient::new(connect(&a.edge, &tls).await?);
    let len = value.len();
    client
        .set(pb::SetRequest {
            key: Bytes::from(a.key),
            value,
            lease: a.lease,
            ttl_ms: 0,
        })
        .await
        .map_err(|s| {
            // A request beyond what the edge decodes at all is refused by its transport, whose
            // wording names neither the value nor the setting.
            if s.code() == tonic::Code::OutOfRange && s.message().contains("length too large") {
                anyhow!("value is {len} bytes, more than that edge takes (its max_value_len)")
            } else {
                anyhow!(status_line(&s, "an edge", &a.edge, &tls))
            }
        })?;
    println!("stored");
    Ok(())
}

async fn node_tree(
    url: &str,
    tls: &dci_proto::tls::ClientTls,
) -> anyhow::Result<Vec<pb::NodeStatus>> {
    // A tree of tens of thousands of nodes is more than the default 4 MiB.
    let mut client = pb::admin_client::AdminClient::new(connect(url, tls).await?)
        .max_decoding_message_size(64 << 20);
    let r = client
        .status(pb::StatusRequest {})
        .await
        .map_err(|s| anyhow!("{url}: {}", status_line(&s, "a dci node", url, tls)))?;
    Ok(r.into_inner().nodes)
}

/// Add `more` to `nodes`: a node seen again under the same parent (an edge that every shard's
/// tree reports) is one row per shard, the freshest report of each.
fn merge_tree(nodes: &mut Vec<pb::NodeStatus>, more: Vec<pb::NodeStatus>) {
    for n in more {
        let Some(m) = nodes
            .iter_mut()
            .find(|m| m.node_id == n.node_id && m.parent == n.parent)
        else {
            nodes.push(n);
            continue;
        };
        for s in n.shards {
            match m.shards.iter_mut().find(|x| x.shard == s.shard) {
                Some(x) if x.hwm >= s.hwm => {}
                Some(x) => *x = s,
                None => m.shards.push(s),
            }
        }
        m.shards.sort_by_key(|s| s.shard);
    }
}

async fn status(a: StatusArgs) -> anyhow::Result<()> {
    let tls = a.tls.client()?;
    let mut nodes = Vec::new();
    let mut failed = None;
    for url in &a.coordinator {
        match node_tree(url, &tls).await {
            Ok(more) => merge_tree(&mut nodes, more),
            Err(e) => {
                failed.get_or_insert(e);
            }
        }
    }
    // With one shard unreachable, the others' trees are still worth seeing before the error.
    if nodes.is_empty() {
        return Err(failed.unwrap_or_else(|| anyhow!("no node answered")));
    }
    let r = pb::StatusResponse { nodes };
    if a.json {
        let nodes: Vec<_> = r
            .nodes
            .iter()
            .map(|n| {
                serde_json::json!({
                    "node_id": n.node_id, "role": n.role, "region": n.region, "parent": n.parent,
                    "connected_ms": n.connected_ms,
                    // A cache's staleness bound; null for the other roles.
                    "max_staleness_ms": (n.max_staleness_ms > 0).then_some(n.max_staleness_ms),
                    "shards": n.shards.iter().map(shard_json).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "nodes": nodes }))?
        );
        return failed.map_or(Ok(()), Err);
    }
    println!(
        "{:<28} {:<12} {:<10} {:>6} {:>12} {:>10} {:>8} {:>10} {:>12}  parent",
        "node", "role", "region", "shard", "hwm", "lag_seqs", "lag_ms", "caught_up", "connected"
    );
    let mut past_bound = false;
    for n in &r.nodes {
        // Names come from the nodes themselves, any receiver's report included.
        let (node_id, role, region, parent) = (
            printable(&n.node_id),
            printable(&n.role),
            printable(&n.region),
            printable(&n.parent),
        );
        let connected =
            humantime::format_duration(Duration::from_secs(n.connected_ms / 1000)).to_string();
        if n.shards.is_empty() {
            println!(
                "{:<28} {:<12} {:<10} {:>6} {:>12} {:>10} {:>8} {:>10} {:>12}  {}",
                node_id, role, region, "-", "-", "-", "-", "-", connected, parent
            );
        }
        for s in &n.shards {
            // Seconds ago, all the way to the coordinator: what the staleness bound looks at.
            let mut caught_up = match s.caught_up_ms {
                u64::MAX => "never".to_string(),
                ms => format!("{:.1}s", ms as f64 / 1000.0),
            };
            if n.max_staleness_ms > 0 && s.caught_up_ms > n.max_staleness_ms {
                past_bound = true;
                caught_up.push('*');
            }
            println!(
                "{:<28} {:<12} {:<10} {:>6} {:>12} {:>10} {:>8} {:>10} {:>12}  {}",
                node_id,
                role,
                region,
                s.shard,
                s.hwm,
                s.lag_seqs,
                s.lag_ms,
                caught_up,
                connected,
                parent
            );
        }
    }
    if past_bound {
        println!("* a cache past its staleness bound: it answers only misses for the shard until it has caught up");
    }
    failed.map_or(Ok(()), Err)
}

/// Help and version as clap prints them; a usage error as every other error: one line on
/// stderr (what is wrong, not the usage that follows it), exit 2.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind::*;
    if matches!(
        e.kind(),
        DisplayHelp | DisplayVersion | DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        e.exit();
    }
    // The first paragraph says what is wrong (a list of missing arguments on lines of its own).
    let text = e.render().to_string();
    let what: Vec<&str> = text
        .lines()
        .map(str::trim)
        .skip_while(|l| l.is_empty())
        .take_while(|l| !l.is_empty())
        .collect();
    let what = what.join(" ");
    let what = what.trim_start_matches("error: ");
    eprintln!("dci: {what} (see --help)");
    ExitCode::from(2)
}

/// The duration a bare `--wait` is followed by (`--wait 5s`): it is taken for a key (the
/// wait's own value needs `--wait=5s`, so that `--wait KEY` works), which publishes a key
/// nobody has and waits the default 30 s: almost surely not what was meant.
fn duration_after_bare_wait(args: impl IntoIterator<Item = String>) -> Option<String> {
    let mut after = args.into_iter().skip_while(|a| a != "--wait").skip(1);
    after
        .next()
        .filter(|v| humantime::parse_duration(v).is_ok())
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    if let (Command::Publish(_), Some(v)) = (
        &cli.command,
        duration_after_bare_wait(std::env::args().skip(1)),
    ) {
        eprintln!(
            "dci: `--wait {v}` would publish a key named {v:?} and wait 30s: say --wait={v} \
             (a key that reads as a duration goes before --wait)"
        );
        return ExitCode::from(2);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("dci: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let server = matches!(
        cli.command,
        Command::Coordinator(_) | Command::Relay(_) | Command::Edge(_) | Command::Demo(_)
    );
    if server {
        // The demo prints its own report; only problems are logged beside it.
        init_tracing(if matches!(cli.command, Command::Demo(_)) {
            "warn"
        } else {
            "info"
        });
    } else if matches!(cli.command, Command::Follow(_)) {
        // A stream that lasts: a sender lost (and followed again) is told on stderr.
        init_tracing("warn");
    }
    if server || matches!(cli.command, Command::Bench(_) | Command::BenchReceivers(_)) {
        // A node holds a descriptor per connection (a relay, one per receiver) and the usual
        // soft limit is 1024: up to the hard limit, as the system allows without privileges.
        match rlimit::increase_nofile_limit(u64::MAX) {
            Ok(n) => tracing::debug!(open_files = n, "open-file limit"),
            Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
        }
    }
    // The command runs as a task on the runtime's workers, not on this thread: its wake-ups
    // (a publish answered, a tick) then stay among the workers instead of crossing threads.
    let command = async move {
        match cli.command {
            Command::Coordinator(a) => coordinator(a).await.map(|_| 0),
            Command::Relay(a) => relay(a).await.map(|_| 0),
            Command::Edge(a) => edge(a).await.map(|_| 0),
            Command::Publish(a) => publish(a).await,
            Command::Get(a) => get(a).await.map(|hit| if hit { 0 } else { 1 }),
            Command::Set(a) => set(a).await.map(|_| 0),
            Command::Delete(a) => delete(a).await.map(|existed| if existed { 0 } else { 1 }),
            Command::Status(a) => status(a).await.map(|_| 0),
            Command::Follow(a) => follow::run(a).await.map(|_| 0),
            Command::Demo(a) => demo::run(a, terminated()).await.map(|_| 0),
            Command::Bench(a) => bench::run(a).await.map(|_| 0),
            Command::BenchReceivers(a) => bench::receivers(a).await.map(|_| 0),
        }
    };
    let result = rt.block_on(async move {
        tokio::spawn(command)
            .await
            .unwrap_or_else(|e| Err(anyhow::anyhow!("the command failed: {e}")))
    });
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("dci: {}", one_line(&e));
            ExitCode::from(2)
        }
    }
}

/// One shard of a node in `dci status --json`; `caught_up_ms` is null for a node never caught up.
fn shard_json(s: &pb::ShardProgress) -> serde_json::Value {
    serde_json::json!({
        "shard": s.shard, "epoch": s.epoch, "hwm": s.hwm, "lag_seqs": s.lag_seqs, "lag_ms": s.lag_ms,
        "caught_up_ms": (s.caught_up_ms != u64::MAX).then_some(s.caught_up_ms),
    })
}

/// The error and its causes on one line, leaving out a cause its outer message already quotes
/// (many errors print their source inside their own message).
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !line.ends_with(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    line.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::{duration_after_bare_wait, one_line, pb, shard_json};

    #[test]
    fn a_duration_after_a_bare_wait_is_caught() {
        let after = |line: &str| duration_after_bare_wait(line.split(' ').map(String::from));
        assert_eq!(after("publish --wait 5s user:1"), Some("5s".into()));
        assert_eq!(after("publish user:1 --wait 1m"), Some("1m".into()));
        assert_eq!(after("publish --wait user:1"), None);
        assert_eq!(after("publish --wait=5s user:1"), None);
        assert_eq!(after("publish 5s --wait"), None, "a key before it is meant");
        assert_eq!(
            after("publish --wait -- 5s"),
            None,
            "after `--`, it is meant"
        );
        assert_eq!(after("publish user:1 5s"), None);
    }

    #[test]
    fn a_node_never_caught_up_has_no_caught_up_time_in_json() {
        let mut s = pb::ShardProgress {
            hwm: 7,
            caught_up_ms: 1500,
            ..Default::default()
        };
        assert_eq!(shard_json(&s)["caught_up_ms"], 1500);
        s.caught_up_ms = u64::MAX;
        assert!(shard_json(&s)["caught_up_ms"].is_null());
        assert_eq!(shard_json(&s)["hwm"], 7);
    }

    #[test]
    fn a_cause_is_printed_once() {
        let io = || std::io::Error::other("No space left on device");
        let quoted =
            anyhow::Error::new(io()).context("log I/O on boot.tmp: No space left on device");
        assert_eq!(
            one_line(&quoted),
            "log I/O on boot.tmp: No space left on device"
        );
        let plain = anyhow::Error::new(io()).context("opening the log\nat startup");
        assert_eq!(
            one_line(&plain),
            "opening the log at startup: No space left on device"
        );
    }
}
