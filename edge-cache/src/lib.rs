//! `dci-edge-cache`: the cache server at the leaves of the tree.
//!
//! - [`config`]: configuration, defaults, validation.
//! - [`store`]: values, tombstones and leases (the stale-set race is closed here).
//! - [`EdgeNode`]: the running node: the invalidation consumer (following relays with failover)
//!   and the `Cache` + `Admin` gRPC services, with the staleness bound applied to reads.

pub mod config;
pub mod store;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dci_proto::pb;
use dci_proto::ring::NodeRing;
use dci_proto::types::RingOwnership;
use dci_proto::upstream::{self, lock, Applier, FollowOptions, Following, LinkState};
use dci_proto::{Batch, Epoch, Filter, Seq, ShardId};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

pub use config::{ConfigError, EdgeConfig};
pub use dci_proto::reload::Reconfigured;
pub use store::{FillRefused, Lease, Store};

/// Why an edge could not run.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("server: {0}")]
    Server(#[from] tonic::transport::Error),
    /// A TLS setting cannot be used (a file missing or not PEM).
    #[error(transparent)]
    Tls(#[from] dci_proto::tls::TlsError),
}

/// A quarantined entry, kept for inspection.
#[derive(Debug, Clone)]
pub struct Quarantined {
    /// Shard.
    pub shard: ShardId,
    /// Seq.
    pub seq: Seq,
    /// Key bytes.
    pub key: Bytes,
    /// Why.
    pub why: String,
}

/// Called after every applied batch (the bench and the demo measure latency with it).
pub type AppliedHook = Arc<dyn Fn(&Batch) + Send + Sync>;

/// The invalidation consumer's side of the edge.
pub struct EdgeApplier {
    store: Arc<Store>,
    propagation: Arc<dci_proto::metrics::LatencyHistogram>,
    quarantine: Arc<Mutex<Vec<Quarantined>>>,
    on_applied: Option<AppliedHook>,
    follows: Arc<RwLock<Filter>>,
}

/// The filter as it is now; a poisoned lock still holds a whole filter (it is only ever
/// replaced whole).
fn read(f: &RwLock<Filter>) -> RwLockReadGuard<'_, Filter> {
    f.read().unwrap_or_else(|e| e.into_inner())
}

impl Applier for EdgeApplier {
    fn apply(&mut self, batch: &Batch) {
        self.store
            .apply_batch(batch.shard, batch.epoch, &batch.entries, batch.last_seq);
        self.propagation.observe_published(batch);
        if let Some(f) = &self.on_applied {
            f(batch);
        }
    }

    fn quarantine(&mut self, shard: ShardId, entry: &pb::Invalidation, why: &str) {
        let mut q = lock(&self.quarantine);
        if q.len() >= 1000 {
            q.remove(0);
        }
        q.push(Quarantined {
            shard,
            seq: entry.seq,
            key: entry.key.clone(),
            why: why.to_string(),
        });
        // Flush the key whatever the entry meant; an entry that panicked arrives here too.
        if !entry.key.is_empty() {
            self.store.delete(&entry.key);
        }
    }

    fn flush(&mut self, shard: ShardId, epoch: Epoch, hwm: Seq, reason: &str) {
        tracing::info!(shard, epoch, hwm, reason, "edge flushed");
        self.store.flush(shard, epoch, hwm);
    }

    fn refilter(&mut self, filter: &Filter) {
        // Fills check the filter and store under its read lock: once it is replaced, none can
        // store a key this edge no longer follows, and reads refuse such keys, so what is cached
        // of them can be dropped after, without holding up reads meanwhile. Such a key gets no
        // invalidations from now on: if it were followed again later, that value could be stale.
        let mut follows = self.follows.write().unwrap_or_else(|e| e.into_inner());
        *follows = filter.clone();
        // So could a fill under a lease handed out before it was given up: its invalidations
        // since never came. The leases go before any fill sees the new filter (a few misses
        // more, at a reconfiguration).
        self.store.void_leases();
        drop(follows);
        let before = self.store.len();
        self.store.retain_keys(|k| filter.takes_key(k));
        tracing::info!(
            follows = %filter.describe(),
            dropped = before.saturating_sub(self.store.len()),
            "edge follows anew"
        );
    }
}

#[derive(Clone)]
struct EdgeService {
    store: Arc<Store>,
    link: Arc<Mutex<LinkState>>,
    max_staleness: Duration,
    max_key_len: usize,
    max_value_len: usize,
    node_id: String,
    region: String,
    stale_misses: Arc<AtomicU64>,
    /// How many shards this edge maps keys to (its config).
    shard_count: u32,
    /// When a wrong shard count was last logged (seconds since the Unix epoch).
    warned_shard_count: Arc<AtomicU64>,
    /// What this edge follows (its Hello's filter): a key outside it is neither served nor
    /// stored, since no invalidation of it would ever reach this edge. Replaced by a reloaded
    /// config, between two links.
    follows: Arc<RwLock<Filter>>,
}

impl EdgeService {
    /// Is `told`, the tier's shard count as its coordinators say it, another than this edge's?
    /// Keys would be mapped to other shards than their invalidations, and fills checked against
    /// the wrong tombstones: such an edge serves only misses and takes no fill until its config
    /// is mended.
    fn wrong_shard_count(&self, told: u32) -> Option<u32> {
        if told == 0 || told == self.shard_count {
            return None;
        }
        let now = dci_proto::now_us() / 1_000_000;
        let last = self.warned_shard_count.load(Ordering::Relaxed);
        if now >= last + 30
            && self
                .warned_shard_count
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::error!(
                configured = self.shard_count,
                coordinators = told,
                "shard_count differs from the coordinator tier's: serving misses and refusing fills"
            );
        }
        Some(told)
    }

    fn check_key(&self, key: &[u8]) -> Result<(), Status> {
        if key.is_empty() {
            return Err(Status::invalid_argument("key is empty"));
        }
        if key.len() > self.max_key_len {
            return Err(Status::invalid_argument(format!(
                "key is {} bytes, more than the maximum of {}",
                key.len(),
                self.max_key_len
            )));
        }
        Ok(())
    }

    /// A key this edge gets no invalidations for is refused, not cached for ever.
    fn check_followed(follows: &Filter, key: &[u8]) -> Result<(), Status> {
        if follows.takes_key(key) {
            return Ok(());
        }
        // Where to go instead, when only the ring keeps it from this edge.
        let owners = follows
            .ring
            .as_ref()
            .filter(|_| follows.takes_prefix_of(key))
            .map(|r| {
                format!(
                    " (its owners: {})",
                    r.ring.owners(key, r.replication).join(", ")
                )
            })
            .unwrap_or_default();
        Err(Status::failed_precondition(format!(
            "key {:?} {}, which gets invalidations only of {}: route it to an edge that \
             does{owners}",
            String::from_utf8_lossy(key),
            dci_proto::types::NOT_FOLLOWED,
            follows.describe()
        )))
    }

    fn get_one(&self, key: Bytes) -> Result<pb::GetResponse, Status> {
        self.check_key(&key)?;
        Self::check_followed(&read(&self.follows), &key)?;
        let lease = self.store.lease(&key).encode();
        let shard = self.store.shard_of(&key);
        let (stale, told) = {
            let link = lock(&self.link);
            let now = Instant::now();
            // Why, only when it is so: reads are the hot path.
            let stale = (!link.fresh_for(shard, now, self.max_staleness)).then(|| {
                link.unready(&[shard], now, self.max_staleness)
                    .unwrap_or_else(|| "not caught up with its coordinator".into())
            });
            (stale, link.shard_count)
        };
        let wrong_count = self.wrong_shard_count(told);
        if stale.is_some() || wrong_count.is_some() {
            // Cut off for longer than the bound, here or anywhere up to the key's coordinator, or
            // mapping keys to the wrong shards: a miss is the only safe answer.
            if stale.is_some() {
                self.stale_misses.fetch_add(1, Ordering::Relaxed);
            }
            self.store.counters.misses.fetch_add(1, Ordering::Relaxed);
            let only_misses = stale.unwrap_or_else(|| {
                format!(
                    "its shard_count is {}, the coordinators' {}",
                    self.shard_count,
                    wrong_count.unwrap_or_default()
                )
            });
            return Ok(pb::GetResponse {
                hit: false,
                value: Bytes::new(),
                lease,
                only_misses,
            });
        }
        match self.store.get(&key) {
            Some(value) => {
                self.store.counters.hits.fetch_add(1, Ordering::Relaxed);
                Ok(pb::GetResponse {
                    hit: true,
                    value,
                    lease: 0,
                    only_misses: String::new(),
                })
            }
            None => {
                self.store.counters.misses.fetch_add(1, Ordering::Relaxed);
                Ok(pb::GetResponse {
                    hit: false,
                    value: Bytes::new(),
                    lease,
                    only_misses: String::new(),
                })
            }
        }
    }

    /// What would refuse a Set whatever the lease says (`follows`: held until it is stored).
    fn check_set(&self, r: &pb::SetRequest, follows: &Filter) -> Result<(), Status> {
        self.check_key(&r.key)?;
        Self::check_followed(follows, &r.key)?;
        if r.value.len() > self.max_value_len {
            return Err(Status::invalid_argument(format!(
                "value is {} bytes, more than the maximum of {}",
                r.value.len(),
                self.max_value_len
            )));
        }
        if r.tags.len() > MAX_TAGS {
            return Err(Status::invalid_argument(format!(
                "{} tags, more than the {MAX_TAGS} a value may have",
                r.tags.len()
            )));
        }
        for t in &r.tags {
            if t.is_empty() || t.len() > self.max_key_len {
                return Err(Status::invalid_argument(format!(
                    "tag of {} bytes: a tag is 1 to {} bytes (max_key_len)",
                    t.len(),
                    self.max_key_len
                )));
            }
        }
        // A capacity below what max_value_len allows: such an entry would not be kept, though
        // its Set answered as stored.
        let weight =
            (r.key.len() + r.value.len() + store::ENTRY_OVERHEAD + store::tags_weight(&r.tags))
                as u64;
        if weight > self.store.largest_entry() {
            return Err(Status::invalid_argument(format!(
                "value is {} bytes: with its key and {} bytes of bookkeeping, more than this \
                 edge keeps in one entry ({} bytes of its capacity)",
                r.value.len(),
                store::ENTRY_OVERHEAD,
                self.store.largest_entry()
            )));
        }
        if let Some(told) = self.wrong_shard_count(lock(&self.link).shard_count) {
            return Err(Status::failed_precondition(format!(
                "fill refused: this edge maps keys to {} shards, its coordinators have {told} \
                 (set shard_count)",
                self.shard_count
            )));
        }
        Ok(())
    }

    /// Store a checked Set; refused only by its lease (or its version).
    fn store_checked(&self, r: pb::SetRequest) -> Result<(), FillRefused> {
        let ttl = (r.ttl_ms > 0)
            .then(|| Duration::from_millis(r.ttl_ms).min(dci_proto::types::MAX_DURATION));
        let lease = r.lease.map(Lease::decode);
        self.store
            .fill(r.key, r.value, lease, ttl, &r.tags, r.version)
    }
}

#[tonic::async_trait]
impl pb::cache_server::Cache for EdgeService {
    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetResponse>, Status> {
        self.get_one(request.into_inner().key).map(Response::new)
    }

    async fn set(
        &self,
        request: Request<pb::SetRequest>,
    ) -> Result<Response<pb::SetResponse>, Status> {
        let r = request.into_inner();
        let follows = read(&self.follows);
        self.check_set(&r, &follows)?;
        match self.store_checked(r) {
            Ok(()) => Ok(Response::new(pb::SetResponse { stored: true })),
            Err(why) => Err(Status::failed_precondition(format!("fill refused: {why}"))),
        }
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let key = request.into_inner().key;
        self.check_key(&key)?;
        Ok(Response::new(pb::DeleteResponse {
            existed: self.store.delete(&key),
        }))
    }

    async fn get_many(
        &self,
        request: Request<pb::GetManyRequest>,
    ) -> Result<Response<pb::GetManyResponse>, Status> {
        let keys = request.into_inner().keys;
        if keys.len() > 10_000 {
            return Err(Status::invalid_argument("at most 10000 keys per GetMany"));
        }
        let asked = keys.len();
        let mut results = Vec::with_capacity(asked);
        let mut bytes = 0usize;
        for k in keys {
            let r = self.get_one(k)?;
            bytes += r.value.len();
            // The answer is built whole before it is sent: one large value asked for thousands
            // of times would be gigabytes of it. One key is always answered.
            if bytes > GET_MANY_MAX_BYTES && asked > 1 {
                return Err(Status::resource_exhausted(format!(
                    "the values of these {asked} keys come to more than {GET_MANY_MAX_BYTES} \
                     bytes, the most one GetMany answers: ask for fewer at a time"
                )));
            }
            results.push(r);
        }
        Ok(Response::new(pb::GetManyResponse { results }))
    }

    async fn set_many(
        &self,
        request: Request<pb::SetManyRequest>,
    ) -> Result<Response<pb::SetManyResponse>, Status> {
        let entries = request.into_inner().entries;
        if entries.len() > 10_000 {
            return Err(Status::invalid_argument(
                "at most 10000 entries per SetMany",
            ));
        }
        // All or nothing: a refused entry stores none of the others.
        let follows = read(&self.follows);
        for e in &entries {
            self.check_set(e, &follows)?;
        }
        let stored = entries
            .into_iter()
            .map(|e| self.store_checked(e).is_ok())
            .collect();
        Ok(Response::new(pb::SetManyResponse { stored }))
    }
}

#[tonic::async_trait]
impl pb::admin_server::Admin for EdgeService {
    async fn status(
        &self,
        _: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let mut me = lock(&self.link).node_status(&self.node_id, "edge", &self.region);
        me.max_staleness_ms = dci_proto::upstream::millis(self.max_staleness);
        Ok(Response::new(pb::StatusResponse { nodes: vec![me] }))
    }
}

/// The most tags one value may have.
pub const MAX_TAGS: usize = 64;

/// The most bytes of values one GetMany answers (`RESOURCE_EXHAUSTED` past it, unless one key
/// was asked): the SDK then asks for the keys in halves.
pub const GET_MANY_MAX_BYTES: usize = 64 << 20;

/// The config keys an edge takes while it runs ([`EdgeNode::reconfigure`]).
pub const RELOADABLE: [&str; 4] = ["relays", "prefixes", "ring_nodes", "replication"];

/// What an edge with this config and node id follows.
fn follows(cfg: &EdgeConfig, node_id: &str) -> Result<Filter, EdgeError> {
    let ring = if cfg.ring_nodes.is_empty() {
        None
    } else {
        if !cfg.ring_nodes.iter().any(|n| n == node_id) {
            return Err(EdgeError::Config(ConfigError(format!(
                "node id {node_id:?} is not one of ring_nodes"
            ))));
        }
        Some(RingOwnership {
            ring: NodeRing::new(cfg.ring_nodes.clone()),
            self_id: node_id.to_string(),
            replication: cfg.replication.max(1) as usize,
        })
    };
    Ok(Filter {
        ring,
        ..Filter::of_prefixes(&cfg.prefixes)
    })
}

/// A running edge cache.
pub struct EdgeNode {
    /// The address it listens on.
    pub addr: SocketAddr,
    /// Its node id.
    pub node_id: String,
    /// The store.
    pub store: Arc<Store>,
    /// The link to its relays.
    pub link: Arc<Mutex<LinkState>>,
    /// Quarantined entries (most recent last).
    pub quarantine: Arc<Mutex<Vec<Quarantined>>>,
    /// Reads answered as misses because the edge was cut off.
    pub stale_misses: Arc<AtomicU64>,
    /// Where `/metrics` is served, if it is.
    pub metrics_addr: Option<SocketAddr>,
    /// Publish (the writer's call) to applied at this edge, per entry (also on `/metrics`).
    pub propagation: Arc<dci_proto::metrics::LatencyHistogram>,
    /// "https" when it serves TLS, else "http".
    scheme: &'static str,
    /// The config it runs with (what `reconfigure` took included).
    config: Mutex<EdgeConfig>,
    changes: watch::Sender<Following>,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), EdgeError>>,
}

/// Log when the edge turns to serving only misses (cut off past its staleness bound, here or up
/// the way to a coordinator), and when it serves hits again: otherwise only a metric and the
/// hit ratio would show it.
async fn tell_serving(ready: dci_proto::metrics::Health, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut serving = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        match (ready(), serving) {
            (Ok(()), false) => {
                serving = true;
                tracing::info!("serving hits: caught up with every shard's coordinator");
            }
            (Err(why), true) => {
                serving = false;
                tracing::warn!(%why, "serving only misses");
            }
            _ => {}
        }
    }
}

impl EdgeNode {
    /// Bind `cfg.listen` and run in the background.
    pub async fn start(cfg: EdgeConfig) -> Result<EdgeNode, EdgeError> {
        Self::start_with(cfg, None).await
    }

    /// Like [`EdgeNode::start`], calling `on_applied` after every applied batch.
    pub async fn start_with(
        cfg: EdgeConfig,
        on_applied: Option<AppliedHook>,
    ) -> Result<EdgeNode, EdgeError> {
        let cfg = cfg.validate()?;
        let (listener, addr) =
            dci_proto::bind(cfg.listen)
                .await
                .map_err(|source| EdgeError::Bind {
                    addr: cfg.listen,
                    source,
                })?;
        let node_id = if cfg.node_id.is_empty() {
            dci_proto::types::default_node_id("edge", &cfg.region, addr.port())
        } else {
            cfg.node_id.clone()
        };
        let follows = follows(&cfg, &node_id)?;
        let (changes_tx, changes) = watch::channel(Following {
            urls: cfg.relays.clone(),
            filter: follows.clone(),
        });
        let shared_follows = Arc::new(RwLock::new(follows.clone()));
        let store = Arc::new(
            Store::holding(
                cfg.capacity,
                cfg.ttl,
                cfg.max_tombstones,
                cfg.shard_count,
                cfg.largest_entry(),
            )
            .with_tag_tombstones(cfg.max_tag_tombstones),
        );
        let link = Arc::new(Mutex::new(LinkState::default()));
        let quarantine = Arc::new(Mutex::new(Vec::new()));
        let stale_misses = Arc::new(AtomicU64::new(0));
        let (shutdown, rx) = watch::channel(false);
        let propagation = Arc::new(dci_proto::metrics::LatencyHistogram::default());
        let applier = Arc::new(Mutex::new(EdgeApplier {
            store: store.clone(),
            propagation: propagation.clone(),
            quarantine: quarantine.clone(),
            on_applied,
            follows: shared_follows.clone(),
        }));
        let follow = FollowOptions {
            urls: cfg.relays.clone(),
            node_id: node_id.clone(),
            region: cfg.region.clone(),
            role: "edge".into(),
            filter: follows,
            changes: Some(changes),
            peer_timeout: cfg.peer_timeout,
            compression: cfg.compression,
            max_key_len: cfg.max_key_len,
            tls: cfg.tls.client()?,
            max_staleness: Some(cfg.max_staleness),
            ..FollowOptions::default()
        };
        tokio::spawn(upstream::follow(follow, applier, link.clone(), rx.clone()));
        let refused_calls = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let render: dci_proto::metrics::Render = {
            let refused = refused_calls.clone();
            let (store, link, stale, propagation) = (
                store.clone(),
                link.clone(),
                stale_misses.clone(),
                propagation.clone(),
            );
            let (bound, shard_count) = (cfg.max_staleness, cfg.shard_count);
            Arc::new(move || {
                use dci_proto::metrics::sample;
                let mut out = String::new();
                dci_proto::metrics::render_link(&mut out, &lock(&link));
                // What an alert asks (an edge that answers only misses), whether or not reads
                // come to show it in dci_stale_misses_total.
                let now = Instant::now();
                for shard in 0..shard_count {
                    let serves = lock(&link).fresh_for(shard, now, bound);
                    sample(
                        &mut out,
                        "gauge",
                        "dci_serves_hits",
                        "1 while caught up with the shard's coordinator within max_staleness \
                         (values are served), 0 while only misses are",
                        &format!("shard=\"{shard}\""),
                        f64::from(u8::from(serves)),
                    );
                }
                dci_proto::metrics::render_refused_calls(&mut out, &refused);
                let c = &store.counters;
                let get = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
                sample(
                    &mut out,
                    "counter",
                    "dci_cache_hits_total",
                    "Gets answered with a value",
                    "",
                    get(&c.hits),
                );
                sample(
                    &mut out,
                    "counter",
                    "dci_cache_misses_total",
                    "Gets answered with a miss",
                    "",
                    get(&c.misses),
                );
                sample(
                    &mut out,
                    "counter",
                    "dci_fills_refused_total",
                    "Sets refused by their lease (or their version)",
                    "",
                    get(&c.refused),
                );
                sample(
                    &mut out,
                    "counter",
                    "dci_invalidations_applied_total",
                    "Invalidations applied",
                    "",
                    get(&c.applied),
                );
                sample(
                    &mut out,
                    "counter",
                    "dci_invalidations_older_version_total",
                    "Invalidations dropped as older versions",
                    "",
                    get(&c.dropped_old),
                );
                sample(
                    &mut out,
                    "counter",
                    "dci_stale_misses_total",
                    "Gets answered as misses because the edge was cut off",
                    "",
                    get(&stale),
                );
                sample(
                    &mut out,
                    "counter",
                    "dci_tags_forgotten_total",
                    "Tag invalidations forgotten for room (max_tag_tombstones): each made every \
                     tagged value of its shard filled before it a miss",
                    "",
                    store.tags_forgotten() as f64,
                );
                sample(
                    &mut out,
                    "gauge",
                    "dci_cache_entries",
                    "Values cached",
                    "",
                    store.len() as f64,
                );
                propagation.render(
                    &mut out,
                    "dci_propagation_seconds",
                    "Publish (the writer's call) to applied at this edge",
                );
                out
            })
        };
        // Ready when it would serve hits on every shard, not only misses.
        let ready: dci_proto::metrics::Health = {
            let (link, bound, shard_count) = (link.clone(), cfg.max_staleness, cfg.shard_count);
            let shards: Vec<ShardId> = (0..shard_count).collect();
            Arc::new(move || {
                let link = lock(&link);
                if link.shard_count != 0 && link.shard_count != shard_count {
                    return Err(format!(
                        "shard_count {shard_count} differs from the coordinator tier's {}",
                        link.shard_count
                    ));
                }
                match link.unready(&shards, Instant::now(), bound) {
                    None => Ok(()),
                    Some(why) => Err(why),
                }
            })
        };
        tokio::spawn(tell_serving(ready.clone(), rx.clone()));
        let metrics_addr = dci_proto::metrics::expose(
            cfg.metrics_listen,
            &cfg.otlp,
            vec![
                ("service.name", "dci-edge".to_string()),
                ("service.instance.id", node_id.clone()),
                ("dci.region", cfg.region.clone()),
            ],
            render,
            dci_proto::metrics::Probes {
                health: dci_proto::metrics::always_healthy(),
                ready,
            },
            ("dci.apply", &propagation),
            rx.clone(),
        )
        .await;
        let svc = EdgeService {
            store: store.clone(),
            link: link.clone(),
            max_staleness: cfg.max_staleness,
            max_key_len: cfg.max_key_len,
            max_value_len: cfg.max_value_len,
            node_id: node_id.clone(),
            region: cfg.region.clone(),
            stale_misses: stale_misses.clone(),
            shard_count: cfg.shard_count,
            warned_shard_count: Arc::default(),
            follows: shared_follows,
        };
        let (health_reporter, health) = tonic_health::server::health_reporter();
        health_reporter
            .set_serving::<pb::cache_server::CacheServer<EdgeService>>()
            .await;
        let max_request = cfg
            .max_value_len
            .saturating_add(cfg.max_key_len)
            .saturating_add(64 << 10);
        let mut server = dci_proto::tls::grpc_server(&cfg.tls, refused_calls)?;
        let incoming = dci_proto::tls::incoming(listener, &cfg.tls)?;
        let mut stop = rx;
        let task = tokio::spawn(async move {
            server
                .add_service(health)
                .add_service(dci_proto::reflection())
                .add_service(
                    // Room for the largest value and key this edge stores, so that a Set is
                    // refused by their limits, named, not by the transport's.
                    pb::cache_server::CacheServer::new(svc.clone())
                        .max_decoding_message_size(max_request),
                )
                .add_service(pb::admin_server::AdminServer::new(svc))
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await
                .map_err(EdgeError::Server)
        });
        Ok(EdgeNode {
            addr,
            node_id,
            store,
            link,
            quarantine,
            stale_misses,
            metrics_addr,
            propagation,
            scheme: cfg.tls.scheme(),
            config: Mutex::new(cfg),
            changes: changes_tx,
            shutdown,
            task,
        })
    }

    /// Take what of `cfg` an edge takes while it runs ([`RELOADABLE`]: its relays and what it
    /// follows), as a reloaded config file says. The link in use is left and the next made with
    /// the new relays and filter, resuming where this edge is: nothing is missed, values of keys
    /// it no longer follows are dropped, and keys it now follows are served from then on. Says
    /// which keys it took and which differ but need a restart; a config that cannot work (this
    /// node not on its new ring, say) changes nothing.
    pub fn reconfigure(&self, cfg: EdgeConfig) -> Result<Reconfigured, EdgeError> {
        let cfg = cfg.validate()?;
        let mut current = lock(&self.config);
        let out = dci_proto::reload::diff(&*current, &cfg, &RELOADABLE);
        if out.taken.is_empty() {
            return Ok(out);
        }
        let filter = follows(&cfg, &self.node_id)?;
        current.relays = cfg.relays.clone();
        current.prefixes = cfg.prefixes;
        current.ring_nodes = cfg.ring_nodes;
        current.replication = cfg.replication;
        self.changes.send_replace(Following {
            urls: cfg.relays,
            filter,
        });
        Ok(out)
    }

    /// `http://addr` (`https://` over TLS), for clients.
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    /// Applied (epoch, seq) of a shard.
    pub fn applied(&self, shard: ShardId) -> Option<(Epoch, Seq)> {
        self.store
            .applied()
            .into_iter()
            .find(|(s, _, _)| *s == shard)
            .map(|(_, e, h)| (e, h))
    }

    /// Stop serving and following.
    pub async fn stop(self) -> Result<(), EdgeError> {
        let _ = self.shutdown.send(true);
        match self.task.await {
            Ok(r) => r,
            Err(_) => Ok(()),
        }
    }
}
