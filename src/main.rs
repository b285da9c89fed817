//! `dci`: one CLI for every part of the distributed cache-invalidation system.
//!
//! Each subcommand is a thin shell: it reads the YAML file (if any), applies the flags on top,
//! and hands the result to the library crate that does the work.

mod bench;
mod changes;
mod demo;
mod follow;
mod out;
mod publish;
mod status;

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, Context};
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
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
    Publish(publish::PublishArgs),
    /// Read a key from an edge: the value and exit 0 on a hit, "miss" on stderr and exit 1.
    Get(GetArgs),
    /// Store a value on an edge (refused when the lease is stale).
    Set(SetArgs),
    /// Drop a key from an edge: "deleted" and exit 0, or "absent" on stderr and exit 1.
    Delete(GetArgs),
    /// Show the tree: every node with its high-water mark and lag.
    Status(status::StatusArgs),
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
    #[arg(long, value_parser = crate::byte_size_usize)]
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
    #[arg(long, value_parser = crate::byte_size)]
    segment_bytes: Option<u64>,
    /// Log retention by size, in bytes [default: 1 GiB].
    #[arg(long, value_parser = crate::byte_size)]
    retention_bytes: Option<u64>,
    /// Log retention by age (e.g. 24h) [default: 24h].
    #[arg(long, value_parser = duration)]
    retention_age: Option<Duration>,
    /// Most entries written as one group [default: 65536].
    #[arg(long)]
    max_group_entries: Option<usize>,
    /// Bytes of publishes waiting for the log at most; more wait for room [default: 256 MiB].
    #[arg(long, value_parser = crate::byte_size_usize)]
    max_queued_bytes: Option<usize>,
    /// Bytes of recent batches kept in memory for replay [default: 64 MiB].
    #[arg(long, value_parser = crate::byte_size_usize)]
    memory_tail_bytes: Option<usize>,
    /// Unacked bytes in flight per receiver [default: 4 MiB].
    #[arg(long, value_parser = crate::byte_size_usize)]
    window_bytes: Option<usize>,
    /// Receivers served at once; one more is refused and follows its next sender [default: 0, no limit].
    #[arg(long)]
    max_receivers: Option<u64>,
    /// How often metrics are pushed to the OTLP collector [default: 10s].
    #[arg(long, value_parser = duration)]
    otlp_interval: Option<Duration>,
    /// The tier's shard count changed: set a log of this shard under another count aside (into
    /// a subdirectory of the data dir) and begin a new one, every cache flushing this shard,
    /// where it is otherwise refused.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    reshard: Option<bool>,
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
    /// Region name [default: default].
    #[arg(long)]
    region: Option<String>,
    /// Node id (default: `relay-<region>-<host>-<port>`, the host the first label of its hostname).
    #[arg(long)]
    node_id: Option<String>,
    /// Ring buffer bytes in all, shared out among the shards the relay carries [default: 64 MiB].
    #[arg(long, value_parser = crate::byte_size_usize)]
    ring_bytes: Option<usize>,
    /// Unacked bytes in flight per receiver [default: 4 MiB].
    #[arg(long, value_parser = crate::byte_size_usize)]
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
    #[arg(long, value_parser = crate::byte_size_usize)]
    max_key_len: Option<usize>,
    /// How often metrics are pushed to the OTLP collector [default: 10s].
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
    /// Region name [default: default].
    #[arg(long)]
    region: Option<String>,
    /// Node id (default: `edge-<region>-<host>-<port>`, the host the first label of its hostname).
    #[arg(long)]
    node_id: Option<String>,
    /// Store size bound in bytes of keys and values [default: 256 MiB].
    #[arg(long, value_parser = crate::byte_size)]
    capacity: Option<u64>,
    /// Serve only misses after this long without contact (at least 1s) [default: 5s].
    #[arg(long, value_parser = duration)]
    max_staleness: Option<Duration>,
    /// Shards of the keyspace, as many as the coordinator tier has (leases are per shard) [default: 1].
    #[arg(long)]
    shard_count: Option<u32>,
    /// Default time to live of a cached value [default: 1h].
    #[arg(long, value_parser = duration)]
    ttl: Option<Duration>,
    /// Longest key in bytes [default: 1024].
    #[arg(long, value_parser = crate::byte_size_usize)]
    max_key_len: Option<usize>,
    /// Largest value in bytes [default: 8 MiB].
    #[arg(long, value_parser = crate::byte_size_usize)]
    max_value_len: Option<usize>,
    /// Tombstone slots in all, shared out among the shards (32 bytes each) [default: 262144].
    #[arg(long)]
    max_tombstones: Option<u64>,
    /// Tag invalidations remembered in all, shared out among the shards [default: 65536].
    #[arg(long)]
    max_tag_tombstones: Option<u64>,
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
    /// How often metrics are pushed to the OTLP collector [default: 10s].
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
struct GetArgs {
    /// Edge URL; a region's edges, comma-separated: the key goes to its owner on the ring of
    /// their node ids (each is asked its own), as the SDK's CacheClient places keys.
    #[arg(long, value_delimiter = ',', value_parser = url_item, default_value = "http://127.0.0.1:7600")]
    edge: Vec<String>,
    #[command(flatten)]
    tls: ClientTlsArgs,
    /// The key.
    key: String,
}

#[derive(Args)]
struct SetArgs {
    /// Edge URL; a region's edges, comma-separated: the key goes to its owner on the ring of
    /// their node ids (each is asked its own), as the SDK's CacheClient places keys.
    #[arg(long, value_delimiter = ',', value_parser = url_item, default_value = "http://127.0.0.1:7600")]
    edge: Vec<String>,
    #[command(flatten)]
    tls: ClientTlsArgs,
    /// Lease from a miss.
    #[arg(long)]
    lease: Option<u64>,
    /// How long the value lives on the edge (e.g. 60s) [default: the edge's ttl].
    #[arg(long, value_parser = positive_duration)]
    ttl: Option<Duration>,
    /// A tag of the value (repeat for several): `dci publish --tag` of any of them removes it,
    /// whatever its key.
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// The version the value was read at, as `dci publish --version` names a writer's: refused
    /// when the edge applied an invalidation of the key with a newer one.
    #[arg(long)]
    version: Option<u64>,
    /// The key.
    key: String,
    /// The value (`-` reads it from standard input, as bytes).
    value: String,
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

/// A size flag: bytes, or a number with a unit ("64MiB", "1.5GiB").
fn byte_size(s: &str) -> Result<u64, String> {
    dci_proto::types::parse_byte_size(s)
}

/// [`byte_size`], as a `usize`.
fn byte_size_usize(s: &str) -> Result<usize, String> {
    byte_size(s).and_then(|n| usize::try_from(n).map_err(|_| format!("{n} bytes is too many")))
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

/// [`duration`], more than nothing (a period, a length of a run).
pub(crate) fn positive_duration(s: &str) -> Result<Duration, String> {
    match duration(s)? {
        d if d.is_zero() => Err("must be more than 0".into()),
        d => Ok(d),
    }
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
        max_group_entries, max_queued_bytes, memory_tail_bytes, window_bytes, max_receivers, reshard);
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
        max_key_len, max_value_len, max_tombstones, max_tag_tombstones, replication, peer_timeout,
        compression);
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
            format!("{url}: no answer within {}s", REQUEST_TIMEOUT.as_secs())
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

/// The edge to ask about `key`: the one given, or, of several (a region's edges), the key's
/// owner on the ring of their node ids. An edge that does not say its id is left off the ring,
/// with a warning: a key it owns then goes to an edge that refuses it, naming its owners.
async fn edge_for(
    edges: &[String],
    key: &str,
    tls: &dci_proto::tls::ClientTls,
) -> anyhow::Result<String> {
    if let [one] = edges {
        return Ok(one.clone());
    }
    let ids = futures::future::join_all(edges.iter().map(|url| async move {
        let mut admin = pb::admin_client::AdminClient::new(connect(url, tls).await?);
        let r = admin
            .status(pb::StatusRequest {})
            .await
            .map_err(|s| anyhow!(status_line(&s, "an edge", url, tls)))?
            .into_inner();
        match r.nodes.first() {
            Some(me) if me.role == "edge" => Ok(me.node_id.clone()),
            Some(me) => Err(anyhow!("{url} is a {}, not an edge", me.role)),
            None => Err(anyhow!("{url} did not say its node id")),
        }
    }))
    .await;
    let mut by_id = std::collections::HashMap::new();
    let mut unknown = Vec::new();
    for (url, id) in edges.iter().zip(ids) {
        match id {
            Ok(id) => {
                by_id.insert(id, url.clone());
            }
            Err(e) => unknown.push(one_line(&e)),
        }
    }
    if by_id.is_empty() {
        anyhow::bail!("no edge said its node id: {}", unknown.join("; "));
    }
    if !unknown.is_empty() {
        eprintln!(
            "warning: {} of {} edges left off the ring ({})",
            unknown.len(),
            edges.len(),
            unknown.join("; ")
        );
    }
    let ring = dci_proto::ring::NodeRing::new(by_id.keys().cloned().collect());
    let owner = ring.primary(key.as_bytes()).unwrap_or_default();
    Ok(by_id[owner].clone())
}

async fn get(a: GetArgs) -> anyhow::Result<bool> {
    // The edge bounds the values it stores; none is refused here for its size.
    let tls = a.tls.client()?;
    let edge = edge_for(&a.edge, &a.key, &tls).await?;
    let mut client = pb::cache_client::CacheClient::new(connect(&edge, &tls).await?)
        .max_decoding_message_size(usize::MAX);
    let r = client
        .get(pb::GetRequest {
            key: Bytes::from(a.key),
        })
        .await
        .map_err(|s| anyhow!(status_line(&s, "an edge", &edge, &tls)))?
        .into_inner();
    if r.hit {
        // The value as stored (it need not be text), then a newline.
        out::bytes(&r.value)?;
        out::bytes(b"\n")?;
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
    let edge = edge_for(&a.edge, &a.key, &tls).await?;
    let mut client = pb::cache_client::CacheClient::new(connect(&edge, &tls).await?);
    let r = client
        .delete(pb::DeleteRequest {
            key: Bytes::from(a.key),
        })
        .await
        .map_err(|s| anyhow!(status_line(&s, "an edge", &edge, &tls)))?
        .into_inner();
    if r.existed {
        crate::out::say!("deleted")?;
    } else {
        eprintln!("absent");
    }
    Ok(r.existed)
}

/// The largest value `dci set` reads from standard input: far beyond what an edge takes by
/// default (8 MiB); reading on without end held all of a mistaken input (`dci set k - < disk.img`)
/// in memory and then sent it for longer than any answer is waited for.
const MAX_SET_VALUE: u64 = 256 << 20;

async fn set(a: SetArgs) -> anyhow::Result<()> {
    let value = if a.value == "-" {
        let mut v = Vec::new();
        std::io::stdin()
            .take(MAX_SET_VALUE + 1)
            .read_to_end(&mut v)
            .map_err(|e| anyhow!("reading the value from standard input: {e}"))?;
        if v.len() as u64 > MAX_SET_VALUE {
            anyhow::bail!(
                "the value on standard input is more than {} MiB, the most dci set sends",
                MAX_SET_VALUE >> 20
            );
        }
        Bytes::from(v)
    } else {
        Bytes::from(a.value)
    };
    let tls = a.tls.client()?;
    let edge = edge_for(&a.edge, &a.key, &tls).await?;
    let mut client = pb::cache_client::CacheClient::new(connect(&edge, &tls).await?);
    let len = value.len();
    client
        .set(pb::SetRequest {
            key: Bytes::from(a.key),
            value,
            lease: a.lease,
            ttl_ms: dci_proto::types::ttl_ms(a.ttl),
            tags: a.tags.into_iter().map(Bytes::from).collect(),
            version: a.version,
        })
        .await
        .map_err(|s| {
            // A request beyond what the edge decodes at all is refused by its transport, whose
            // wording names neither the value nor the setting.
            if dci_proto::types::refused_for_size(&s) {
                anyhow!(dci_proto::types::value_too_large(len))
            } else {
                anyhow!(status_line(&s, "an edge", &edge, &tls))
            }
        })?;
    crate::out::say!("stored")?;
    Ok(())
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

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    if let (Command::Publish(_), Some(v)) = (
        &cli.command,
        publish::duration_after_bare_wait(std::env::args().skip(1)),
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
            Command::Publish(a) => publish::publish(a).await,
            Command::Get(a) => get(a).await.map(|hit| if hit { 0 } else { 1 }),
            Command::Set(a) => set(a).await.map(|_| 0),
            Command::Delete(a) => delete(a).await.map(|existed| if existed { 0 } else { 1 }),
            Command::Status(a) => status::status(a).await.map(|_| 0),
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
    use super::one_line;

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
