//! `dci-relay`: a regional fan-out node.
//!
//! - [`config`]: configuration, defaults, validation.
//! - [`core`]: the per-shard retransmit rings, fed by the upstream link and read by every
//!   downstream link, with on-demand catch-up from upstream for receivers behind the ring.
//! - [`Relay`]: the running node: an upstream follower plus a gRPC server speaking `Subscribe`
//!   (to edges, near caches and other relays, so relays stack) and `Admin`.

pub mod config;
pub mod core;
mod fetched;

use std::net::SocketAddr;
use std::sync::Arc;

use dci_proto::downstream::{ServeCounters, ServeOptions, SubscribeService};
use dci_proto::link::SenderConfig;
use dci_proto::pb;
use dci_proto::upstream::{self, lock, FollowOptions, Following};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

pub use config::{ConfigError, RelayConfig};
pub use core::RelayCore;
pub use dci_proto::reload::Reconfigured;

/// Why a relay could not run.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
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

#[derive(Clone)]
struct RelayService {
    core: Arc<RelayCore>,
    node_id: String,
    region: String,
}

#[tonic::async_trait]
impl pb::admin_server::Admin for RelayService {
    async fn status(
        &self,
        _: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let me = self
            .core
            .upstream()
            .node_status(&self.node_id, "relay", &self.region);
        let mut nodes = vec![me];
        nodes.extend(self.core.reported());
        Ok(Response::new(pb::StatusResponse { nodes }))
    }
}

/// The config keys a relay takes while it runs ([`Relay::reconfigure`]).
pub const RELOADABLE: [&str; 2] = ["upstream", "upstream_groups"];

/// A relay answers `/readyz` with 503 once cut off from its coordinator for this many
/// `peer_timeout`s.
pub const UNREADY_AFTER: u32 = 3;

/// A running relay.
pub struct Relay {
    /// The address it listens on.
    pub addr: SocketAddr,
    /// Its state (rings, link state), for tests and the bench.
    pub core: Arc<RelayCore>,
    /// Downstream counters.
    pub counters: Arc<ServeCounters>,
    /// Where `/metrics` is served, if it is.
    pub metrics_addr: Option<SocketAddr>,
    /// "https" when it serves TLS, else "http".
    scheme: &'static str,
    /// The config it runs with (what `reconfigure` took included).
    config: std::sync::Mutex<RelayConfig>,
    /// New failover lists for each link.
    changes: Vec<watch::Sender<Following>>,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), RelayError>>,
}

impl Relay {
    /// Bind `cfg.listen` and run in the background.
    pub async fn start(cfg: RelayConfig) -> Result<Relay, RelayError> {
        let cfg = cfg.validate()?;
        let (listener, addr) =
            dci_proto::bind(cfg.listen)
                .await
                .map_err(|source| RelayError::Bind {
                    addr: cfg.listen,
                    source,
                })?;
        let node_id = if cfg.node_id.is_empty() {
            dci_proto::types::default_node_id("relay", &cfg.region, addr.port())
        } else {
            cfg.node_id.clone()
        };
        // Drawn anew at each start: what tells this relay's own streams from others'.
        let instance = rand::random::<u64>().max(1);
        let core = Arc::new(RelayCore::new(
            node_id.clone(),
            cfg.groups(),
            cfg.ring_bytes,
            cfg.max_key_len,
            cfg.tls.client()?,
            instance,
        ));
        let counters = Arc::new(ServeCounters::default());
        let (shutdown, rx) = watch::channel(false);

        // One link per group: a shard's sender that is slow or gone holds back only its own.
        let mut changes = Vec::new();
        for (group, urls) in cfg.groups().into_iter().enumerate() {
            let (tx, new_lists) = watch::channel(Following {
                urls: urls.clone(),
                filter: Default::default(),
            });
            changes.push(tx);
            let follow = FollowOptions {
                urls,
                changes: Some(new_lists),
                node_id: node_id.clone(),
                region: cfg.region.clone(),
                role: "relay".into(),
                peer_timeout: cfg.peer_timeout,
                compression: cfg.compression,
                max_key_len: cfg.max_key_len,
                tls: cfg.tls.client()?,
                instance,
                ..FollowOptions::default()
            };
            let applier = core::RelayApplier::new(core.clone(), group);
            tokio::spawn(upstream::follow(
                follow,
                Arc::new(std::sync::Mutex::new(applier)),
                core.links[group].clone(),
                rx.clone(),
            ));
        }

        let refused_calls = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let render: dci_proto::metrics::Render = {
            let refused = refused_calls.clone();
            let (core, counters) = (core.clone(), counters.clone());
            Arc::new(move || {
                let mut out = String::new();
                dci_proto::metrics::render_link(&mut out, &core.upstream());
                dci_proto::metrics::render_serve(&mut out, &counters);
                dci_proto::metrics::render_refused_calls(&mut out, &refused);
                let ring = core.ring_bytes_used() as f64;
                dci_proto::metrics::sample(
                    &mut out,
                    "gauge",
                    "dci_ring_bytes",
                    "Bytes held in the rings",
                    "",
                    ring,
                );
                let relaxed = std::sync::atomic::Ordering::Relaxed;
                for (name, help, value) in [
                    (
                        "dci_catch_ups_total",
                        "Ranges fetched from upstream for receivers behind the ring",
                        core.catch_ups.load(relaxed),
                    ),
                    (
                        "dci_catch_up_hits_total",
                        "Ranges for receivers behind the ring served from what an earlier catch-up fetched",
                        core.catch_up_hits.load(relaxed),
                    ),
                    (
                        "dci_ring_restarts_total",
                        "Rings started over because a batch from upstream did not continue them",
                        core.ring_restarts.load(relaxed),
                    ),
                ] {
                    dci_proto::metrics::sample(&mut out, "counter", name, help, "", value as f64);
                }
                core.propagation.render(
                    &mut out,
                    "dci_propagation_seconds",
                    "Publish (the writer's call) to held in this relay's ring",
                );
                out
            })
        };
        let metrics_addr = dci_proto::metrics::expose(
            cfg.metrics_listen,
            &cfg.otlp,
            vec![
                ("service.name", "dci-relay".to_string()),
                ("service.instance.id", node_id.clone()),
                ("dci.region", cfg.region.clone()),
            ],
            render,
            dci_proto::metrics::Probes {
                health: dci_proto::metrics::always_healthy(),
                // Edges leave a relay cut off for a peer_timeout; new traffic is kept off it
                // only after a few, so that while the coordinators restart (every relay cut off
                // for a moment) the relays' Service keeps its endpoints and edges their links.
                ready: {
                    let (core, bound) = (core.clone(), cfg.peer_timeout * UNREADY_AFTER);
                    Arc::new(
                        move || match core.unready(std::time::Instant::now(), bound) {
                            None => Ok(()),
                            Some(why) => Err(why),
                        },
                    )
                },
            },
            ("dci.relay", &core.propagation),
            rx.clone(),
        )
        .await;
        let svc = RelayService {
            core: core.clone(),
            node_id,
            region: cfg.region.clone(),
        };
        let subscribe = SubscribeService::new(
            core.clone(),
            ServeOptions {
                sender: SenderConfig {
                    window_bytes: cfg.window_bytes,
                    ..SenderConfig::default()
                },
                instance,
                max_receivers: cfg.max_receivers,
                ..ServeOptions::default()
            },
            counters.clone(),
            rx.clone(),
        );
        let (health_reporter, health) = tonic_health::server::health_reporter();
        health_reporter
            .set_serving::<pb::subscribe_server::SubscribeServer<SubscribeService<RelayCore>>>()
            .await;
        let mut server = dci_proto::tls::grpc_server(&cfg.tls, refused_calls)?;
        let incoming = dci_proto::tls::incoming(listener, &cfg.tls)?;
        let mut stop = rx;
        let task = tokio::spawn(async move {
            server
                .add_service(health)
                .add_service(dci_proto::reflection())
                .add_service(
                    pb::subscribe_server::SubscribeServer::new(subscribe)
                        .accept_compressed(tonic::codec::CompressionEncoding::Zstd)
                        .send_compressed(tonic::codec::CompressionEncoding::Zstd),
                )
                .add_service(pb::admin_server::AdminServer::new(svc))
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await
                .map_err(RelayError::Server)
        });
        Ok(Relay {
            addr,
            core,
            counters,
            metrics_addr,
            scheme: cfg.tls.scheme(),
            config: std::sync::Mutex::new(cfg),
            changes,
            shutdown,
            task,
        })
    }

    /// Take what of `cfg` a relay takes while it runs ([`RELOADABLE`]: the senders it follows),
    /// as a reloaded config file says: each link whose failover list changed is left and made
    /// again with the new list, resuming where the relay is, and catch-ups ask the new lists.
    /// The number of lists (one per shard group) changes only at a restart. Says which keys it
    /// took and which differ but need a restart; a config that cannot work changes nothing.
    pub fn reconfigure(&self, cfg: RelayConfig) -> Result<Reconfigured, RelayError> {
        let cfg = cfg.validate()?;
        let mut current = lock(&self.config);
        let out = dci_proto::reload::diff(&*current, &cfg, &RELOADABLE);
        if out.taken.is_empty() {
            return Ok(out);
        }
        let (old, new) = (current.groups(), cfg.groups());
        if old.len() != new.len() {
            return Err(RelayError::Config(ConfigError(format!(
                "the relay follows {} upstream groups and the config lists {}: the groups (one \
                 link each, per shard) change only at a restart",
                old.len(),
                new.len()
            ))));
        }
        self.core.set_groups(new.clone());
        for ((tx, was), urls) in self.changes.iter().zip(&old).zip(new) {
            if *was != urls {
                tx.send_replace(Following {
                    urls,
                    filter: Default::default(),
                });
            }
        }
        current.upstream = cfg.upstream;
        current.upstream_groups = cfg.upstream_groups;
        Ok(out)
    }

    /// `http://addr` (`https://` over TLS), for receivers.
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    /// Stop: end every stream and the upstream link.
    pub async fn stop(self) -> Result<(), RelayError> {
        let _ = self.shutdown.send(true);
        match self.task.await {
            Ok(r) => r,
            Err(_) => Ok(()),
        }
    }
}
