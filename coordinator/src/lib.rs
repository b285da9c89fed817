//! `dci-coordinator`: the root of the invalidation tree for one shard.
//!
//! - [`config`]: the configuration with its defaults and validation.
//! - [`wal`]: the durable log (segments, CRC32C records, group commit, retention, recovery).
//! - [`writer`]: the sequencer that owns the log and commits groups of publishes.
//! - [`hub`]: recent batches in memory plus the log behind them, served downstream.
//! - [`service`]: the `Publisher`, `Subscribe` and `Admin` gRPC services.
//!
//! [`Coordinator::start`] runs everything in-process (tests, `dci demo`); the `dci coordinator`
//! command is a thin shell over it.

pub mod config;
pub mod hub;
pub mod service;
pub mod wal;
pub mod writer;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use dci_proto::downstream::{ServeCounters, ServeOptions, SubscribeService};
use dci_proto::link::SenderConfig;
use dci_proto::metrics::LatencyHistogram;
use dci_proto::pb;
use dci_proto::ring::ShardMap;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use config::{ConfigError, CoordinatorConfig};
pub use wal::FsyncPolicy;

/// Why a coordinator could not run.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The log could not be opened.
    #[error(transparent)]
    Log(#[from] wal::WalError),
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

/// A running coordinator.
pub struct Coordinator {
    /// The address it listens on.
    pub addr: SocketAddr,
    /// The log's epoch.
    pub epoch: u64,
    /// Publish (the writer's call) to written in the log, per entry (also on `/metrics`).
    pub propagation: Arc<LatencyHistogram>,
    /// Where `/metrics` is served, if it is.
    pub metrics_addr: Option<SocketAddr>,
    /// "https" when it serves TLS, else "http".
    scheme: &'static str,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), CoordinatorError>>,
}

impl Coordinator {
    /// Bind `cfg.listen` and run in the background.
    pub async fn start(cfg: CoordinatorConfig) -> Result<Coordinator, CoordinatorError> {
        let cfg = cfg.validate()?;
        // Unusable TLS files are refused before the log is opened (or made).
        cfg.tls.server()?;
        let scheme = cfg.tls.scheme();
        let (listener, addr) =
            dci_proto::bind(cfg.listen)
                .await
                .map_err(|source| CoordinatorError::Bind {
                    addr: cfg.listen,
                    source,
                })?;
        let (shutdown, rx) = watch::channel(false);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let mut stop = rx.clone();
        let task = tokio::spawn(async move {
            run(
                cfg,
                listener,
                rx,
                async move {
                    let _ = stop.wait_for(|s| *s).await;
                },
                Some(ready_tx),
            )
            .await
        });
        let (epoch, propagation, metrics_addr) = match ready_rx.await {
            Ok(r) => r,
            Err(_) => {
                return match task.await {
                    Ok(Err(e)) => Err(e),
                    _ => Err(CoordinatorError::Config(ConfigError::Invalid(
                        "coordinator did not start".into(),
                    ))),
                }
            }
        };
        Ok(Coordinator {
            addr,
            epoch,
            propagation,
            metrics_addr,
            scheme,
            shutdown,
            task,
        })
    }

    /// `http://addr` (`https://` over TLS), for clients.
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    /// Stop: refuse new work, end streams, close the log cleanly.
    pub async fn stop(self) -> Result<(), CoordinatorError> {
        let _ = self.shutdown.send(true);
        match self.task.await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "coordinator task failed");
                Ok(())
            }
        }
    }

    /// Stop without closing anything cleanly (for crash tests): the task is aborted.
    pub fn abort(self) {
        self.task.abort();
    }
}

/// What a started coordinator tells its handle: its epoch, its latency histogram, and where
/// `/metrics` is served.
pub type Ready = (u64, Arc<LatencyHistogram>, Option<SocketAddr>);

/// Run a coordinator on `listener` until `shutdown` resolves.
pub async fn run(
    cfg: CoordinatorConfig,
    listener: TcpListener,
    drain: watch::Receiver<bool>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    ready: Option<tokio::sync::oneshot::Sender<Ready>>,
) -> Result<(), CoordinatorError> {
    let cfg = cfg.validate()?;
    let dir = cfg.data_dir.clone();
    let wal_opts = cfg.wal();
    let (wal, recovery) = tokio::task::spawn_blocking(move || wal::Wal::open(&dir, wal_opts))
        .await
        .expect("log recovery does not panic")?;
    tracing::info!(
        dir = %cfg.data_dir.display(), shard = cfg.shard, epoch = wal.epoch(), head = wal.head(),
        oldest = wal.oldest(), records = recovery.records, torn_bytes = recovery.torn_bytes,
        corrupt = ?recovery.corrupt_at, voided = ?recovery.voided, new_epoch = recovery.new_epoch, "log recovered"
    );
    if let Some((aside, holds)) = &recovery.set_aside {
        tracing::warn!(
            aside = %aside.display(), was = %holds, epoch = wal.epoch(),
            "the tier was resharded: the log of {holds} is set aside, and a new log begins under a \
             new epoch (every cache flushes this shard); delete the directory set aside once its \
             history is of no use"
        );
    }
    let hub = Arc::new(
        hub::Hub::new(
            cfg.shard,
            wal.epoch(),
            wal.head(),
            wal.oldest(),
            wal.reader(),
            cfg.memory_tail_bytes,
        )
        .with_shard_count(cfg.shard_count),
    );
    hub.log_stats.set_size(wal.bytes(), wal.segment_count());
    let epoch = wal.epoch();
    let sequencer = Arc::new(writer::Sequencer::new(
        wal,
        hub.clone(),
        cfg.max_group_entries,
        cfg.max_queued_bytes,
    ));
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<pb::publisher_server::PublisherServer<service::CoordinatorService>>()
        .await;
    let housekeeping = {
        let (sequencer, hub, mut drain) = (sequencer.clone(), hub.clone(), drain.clone());
        let every = cfg.fsync_interval.min(std::time::Duration::from_secs(1));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            let mut reported_failure = false;
            loop {
                tokio::select! {
                    _ = tick.tick() => sequencer.tick(),
                    _ = drain.wait_for(|d| *d) => return,
                }
                // A failed log refuses every publish until a restart recovers it: say so to
                // whatever routes publishes here or restarts nodes.
                if hub.failed() && !reported_failure {
                    reported_failure = true;
                    health_reporter
                        .set_not_serving::<pb::publisher_server::PublisherServer<service::CoordinatorService>>()
                        .await;
                    health_reporter
                        .set_service_status("", tonic_health::ServingStatus::NotServing)
                        .await;
                }
            }
        })
    };

    let counters = Arc::new(ServeCounters::default());
    let refused_calls = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let render: dci_proto::metrics::Render = {
        let refused = refused_calls.clone();
        let (hub, counters) = (hub.clone(), counters.clone());
        Arc::new(move || {
            let mut out = String::new();
            let l = format!("shard=\"{}\",epoch=\"{}\"", hub.shard(), hub.epoch());
            dci_proto::metrics::sample(
                &mut out,
                "gauge",
                "dci_log_head_seq",
                "Last seq in the log",
                &l,
                hub.head() as f64,
            );
            dci_proto::metrics::sample(
                &mut out,
                "gauge",
                "dci_log_oldest_seq",
                "First seq still obtainable",
                &l,
                hub.oldest() as f64,
            );
            let failed = if hub.failed() { 1.0 } else { 0.0 };
            dci_proto::metrics::sample(
                &mut out,
                "gauge",
                "dci_log_failed",
                "1 when the log failed",
                "",
                failed,
            );
            dci_proto::metrics::render_serve(&mut out, &counters);
            dci_proto::metrics::render_refused_calls(&mut out, &refused);
            hub.propagation.render(
                &mut out,
                "dci_propagation_seconds",
                "Publish (the writer's call) to written in the log",
            );
            hub.log_stats.render(&mut out);
            out
        })
    };
    let metrics_addr = dci_proto::metrics::expose(
        cfg.metrics_listen,
        &cfg.otlp,
        vec![
            ("service.name", "dci-coordinator".to_string()),
            ("service.instance.id", cfg.node_id.clone()),
            ("dci.shard", cfg.shard.to_string()),
        ],
        render,
        {
            let hub = hub.clone();
            dci_proto::metrics::Probes::same(Arc::new(move || {
                if let Some(why) = hub.failure() {
                    Err(format!("the log failed ({why}); a restart recovers it"))
                } else {
                    Ok(())
                }
            }))
        },
        ("dci.log", &hub.propagation),
        drain.clone(),
    )
    .await;
    let svc = service::CoordinatorService {
        sequencer: sequencer.clone(),
        hub: hub.clone(),
        shard_map: ShardMap::new(cfg.shard_count),
        shard_count: cfg.shard_count,
        max_key_len: cfg.max_key_len,
        max_request_entries: cfg.max_request_entries,
        shutdown: drain.clone(),
        node_id: cfg.node_id.clone(),
        started: std::time::Instant::now(),
        restarted: recovery.had_log,
    };
    let mut server = dci_proto::tls::grpc_server(&cfg.tls, refused_calls)?;
    let incoming = dci_proto::tls::incoming(listener, &cfg.tls)?;
    if let Some(r) = ready {
        let _ = r.send((epoch, hub.propagation.clone(), metrics_addr));
    }
    let result = server
        .add_service(health)
        .add_service(dci_proto::reflection())
        .add_service(
            pb::publisher_server::PublisherServer::new(svc.clone())
                .max_decoding_message_size(dci_proto::types::MAX_REQUEST_BYTES)
                .accept_compressed(tonic::codec::CompressionEncoding::Zstd)
                .accept_compressed(tonic::codec::CompressionEncoding::Gzip),
        )
        .add_service(
            pb::subscribe_server::SubscribeServer::new(SubscribeService::new(
                hub.clone(),
                ServeOptions {
                    sender: SenderConfig {
                        window_bytes: cfg.window_bytes,
                        ..SenderConfig::default()
                    },
                    max_receivers: cfg.max_receivers,
                    ..ServeOptions::default()
                },
                counters,
                drain,
            ))
            .accept_compressed(tonic::codec::CompressionEncoding::Zstd)
            .send_compressed(tonic::codec::CompressionEncoding::Zstd),
        )
        .add_service(pb::admin_server::AdminServer::new(svc))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    housekeeping.abort();
    // Answer what is in flight and close the log cleanly.
    let _ = tokio::task::spawn_blocking(move || sequencer.close()).await;
    tracing::info!("coordinator stopped");
    result.map_err(CoordinatorError::Server)
}
