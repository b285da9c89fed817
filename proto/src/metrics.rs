//! Prometheus metrics of a node, in the text exposition format, served on `GET /metrics`.
//!
//! Nodes keep plain atomics on their hot paths; a render function reads them when scraped.

use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

/// Upper bounds (µs) of the propagation-latency buckets: 50 µs to 10 s, fine below a millisecond
/// where one tier's share of the latency lies.
const BOUNDS_US: [u64; 20] = [
    50, 100, 150, 200, 300, 400, 500, 750, 1_000, 2_000, 5_000, 10_000, 25_000, 50_000, 100_000,
    250_000, 500_000, 1_000_000, 5_000_000, 10_000_000,
];

/// A latency histogram with fixed buckets, cheap enough to observe every applied entry.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    buckets: [AtomicU64; BOUNDS_US.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
    /// Where the spans of traced entries go, when the node exports them.
    spans: std::sync::OnceLock<Arc<crate::trace::Spans>>,
}

impl LatencyHistogram {
    /// Record one observation, in microseconds.
    pub fn observe_us(&self, us: u64) {
        self.observe_many_us(std::iter::once(us));
    }

    /// Record many observations (one batch's), tallied here first: a few shared counter updates
    /// per batch instead of three per observation.
    pub fn observe_many_us(&self, values: impl Iterator<Item = u64>) {
        let mut buckets = [0u64; BOUNDS_US.len()];
        let (mut count, mut sum) = (0u64, 0u64);
        for us in values {
            let i = BOUNDS_US.partition_point(|&b| b < us);
            if i < buckets.len() {
                buckets[i] += 1;
            }
            count += 1;
            sum = sum.saturating_add(us);
        }
        if count == 0 {
            return;
        }
        for (i, n) in buckets.iter().enumerate().filter(|(_, n)| **n > 0) {
            self.buckets[i].fetch_add(*n, Ordering::Relaxed);
        }
        self.count.fetch_add(count, Ordering::Relaxed);
        self.sum_us.fetch_add(sum, Ordering::Relaxed);
    }

    /// Record, for each entry of the batch, the time from its publish call to now (and, for a
    /// traced one, its span, when the node exports spans).
    pub fn observe_published(&self, batch: &crate::types::Batch) {
        let now = crate::now_us();
        self.observe_many_us(
            batch
                .entries
                .iter()
                .map(|e| now.saturating_sub(e.publish_time_us)),
        );
        if let Some(spans) = self.spans.get() {
            spans.observe(batch);
        }
    }

    /// Make a span of each traced entry observed from now on, into `spans` (once: a later call
    /// changes nothing).
    pub fn trace_to(&self, spans: Arc<crate::trace::Spans>) {
        let _ = self.spans.set(spans);
    }

    /// The counts so far, to compare with later ones.
    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            buckets: self
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            count: self.count.load(Ordering::Relaxed),
        }
    }

    /// Append the histogram as `name` (seconds).
    pub fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, b) in BOUNDS_US.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{}\"}} {cumulative}",
                *b as f64 / 1e6
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// A histogram's counts at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HistogramSnapshot {
    buckets: Vec<u64>,
    count: u64,
}

impl HistogramSnapshot {
    /// What was observed between `earlier` and this snapshot.
    pub fn since(&self, earlier: &HistogramSnapshot) -> HistogramSnapshot {
        HistogramSnapshot {
            buckets: self
                .buckets
                .iter()
                .enumerate()
                .map(|(i, n)| n.saturating_sub(earlier.buckets.get(i).copied().unwrap_or(0)))
                .collect(),
            count: self.count.saturating_sub(earlier.count),
        }
    }

    /// Both sets of observations (several nodes of one tier, say).
    pub fn plus(&self, other: &HistogramSnapshot) -> HistogramSnapshot {
        let len = self.buckets.len().max(other.buckets.len());
        let at = |v: &[u64], i: usize| v.get(i).copied().unwrap_or(0);
        HistogramSnapshot {
            buckets: (0..len)
                .map(|i| at(&self.buckets, i) + at(&other.buckets, i))
                .collect(),
            count: self.count + other.count,
        }
    }

    /// Observations counted.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The `q` quantile in µs, interpolated within its bucket as Prometheus'
    /// `histogram_quantile` does; `None` without observations or beyond the last bound.
    pub fn quantile_us(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * self.count as f64;
        let mut below = 0u64;
        for (i, &n) in self.buckets.iter().enumerate() {
            if n > 0 && (below + n) as f64 >= rank {
                let lower = if i == 0 { 0 } else { BOUNDS_US[i - 1] } as f64;
                let upper = BOUNDS_US[i] as f64;
                let within = (rank - below as f64).max(0.0) / n as f64;
                return Some(lower + (upper - lower) * within);
            }
            below += n;
        }
        None
    }
}

/// Append one metric sample, with its HELP and TYPE lines.
pub fn sample(out: &mut String, kind: &str, name: &str, help: &str, labels: &str, value: f64) {
    if !out.contains(&format!("# TYPE {name} ")) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }
    if labels.is_empty() {
        let _ = writeln!(out, "{name} {value}");
    } else {
        let _ = writeln!(out, "{name}{{{labels}}} {value}");
    }
}

/// The link of a receiver (relay, edge, near cache): hwm, lag, flushes, quarantine.
pub fn render_link(out: &mut String, link: &crate::upstream::LinkState) {
    for &(shard, epoch, hwm, head) in &link.progress {
        let l = format!("shard=\"{shard}\",epoch=\"{epoch}\"");
        sample(
            out,
            "gauge",
            "dci_applied_seq",
            "Highest seq applied",
            &l,
            hwm as f64,
        );
        sample(
            out,
            "gauge",
            "dci_lag_seqs",
            "Seqs behind the sender's head",
            &l,
            head.saturating_sub(hwm) as f64,
        );
    }
    let c = if link.connected_to.is_some() {
        1.0
    } else {
        0.0
    };
    sample(
        out,
        "gauge",
        "dci_upstream_connected",
        "1 when following a sender",
        "",
        c,
    );
    sample(
        out,
        "counter",
        "dci_resets_total",
        "Resets received (flushes)",
        "",
        link.flushes as f64,
    );
    sample(
        out,
        "counter",
        "dci_quarantined_total",
        "Entries quarantined",
        "",
        link.quarantined as f64,
    );
    sample(
        out,
        "counter",
        "dci_bad_batches_total",
        "Batches that did not decode",
        "",
        link.bad_batches as f64,
    );
    sample(
        out,
        "counter",
        "dci_upstream_connects_total",
        "Links opened to senders",
        "",
        link.connects as f64,
    );
}

/// Calls a node's `tls.allow` lists refused.
pub fn render_refused_calls(out: &mut String, refused: &AtomicU64) {
    sample(
        out,
        "counter",
        "dci_calls_refused_total",
        "Calls refused because the client certificate is not on the API's tls.allow list",
        "",
        refused.load(Ordering::Relaxed) as f64,
    );
}

/// The sending side of a node (coordinator, relay).
pub fn render_serve(out: &mut String, c: &crate::downstream::ServeCounters) {
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
    sample(
        out,
        "gauge",
        "dci_receivers",
        "Receivers connected",
        "",
        get(&c.receivers),
    );
    sample(
        out,
        "counter",
        "dci_receivers_refused_total",
        "Receivers refused because max_receivers were connected",
        "",
        get(&c.refused),
    );
    sample(
        out,
        "counter",
        "dci_receivers_named_twice_total",
        "Receivers that connected under the node id of another receiver connected",
        "",
        get(&c.named_twice),
    );
    sample(
        out,
        "counter",
        "dci_batches_sent_total",
        "Batches sent to receivers",
        "",
        get(&c.batches),
    );
    sample(
        out,
        "counter",
        "dci_batch_bytes_sent_total",
        "Batch bytes sent to receivers",
        "",
        get(&c.bytes),
    );
    sample(
        out,
        "counter",
        "dci_resets_sent_total",
        "Resets sent to receivers",
        "",
        get(&c.resets),
    );
    sample(
        out,
        "counter",
        "dci_retransmits_total",
        "Ranges sent again (Nack or timeout)",
        "",
        get(&c.retransmits),
    );
}

/// A node's metrics in the Prometheus text format, made on demand.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// The health of a node that serves for as long as it runs.
pub fn always_healthy() -> Health {
    Arc::new(|| Ok(()))
}

/// Whether a node serves (what its gRPC health service says), or why not.
pub type Health = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// A node's health (`/healthz`: should it be restarted?) and readiness (`/readyz`: should it
/// be given traffic?).
#[derive(Clone)]
pub struct Probes {
    /// Does the node work: a failure here is one only a restart mends.
    pub health: Health,
    /// Can the node vouch for what it serves now (caught up with its coordinator recently
    /// enough): a failure here passes of itself once its links recover.
    pub ready: Health,
}

impl Probes {
    /// Ready whenever healthy.
    pub fn same(health: Health) -> Self {
        Self {
            ready: health.clone(),
            health,
        }
    }
}

/// Make a node's metrics available as configured: served on `/metrics` at `listen` (with its
/// health on `/healthz` and readiness on `/readyz`), pushed to the collector of `otlp`, and
/// with it the spans of the traced entries `traced`'s histogram observes, named by its name
/// ([`crate::trace`]). Returns where `/metrics` is served.
pub async fn expose(
    listen: Option<SocketAddr>,
    otlp: &crate::otlp::OtlpConfig,
    resource: Vec<(&'static str, String)>,
    render: Render,
    probes: Probes,
    traced: (&'static str, &LatencyHistogram),
    shutdown: watch::Receiver<bool>,
) -> Option<SocketAddr> {
    let mut served = None;
    if let Some(addr) = listen {
        // (An OTLP collector has the same in the resource of everything the node pushes.)
        let info = node_info(&resource);
        let inner = render.clone();
        let with_info: Render = Arc::new(move || inner() + &info);
        match serve(addr, with_info, probes, shutdown.clone()).await {
            Ok(bound) => {
                tracing::info!(%bound, "metrics on /metrics");
                served = Some(bound);
            }
            Err(e) => tracing::error!(%addr, error = %e, "metrics endpoint not started"),
        }
    }
    if let Some(endpoint) = otlp.endpoint.clone() {
        let (name, propagation) = traced;
        let spans = Arc::new(crate::trace::Spans::new(name));
        propagation.trace_to(spans.clone());
        // Spans are looked for within a second or two, whatever the metrics' period.
        tokio::spawn(crate::trace::export(
            endpoint.clone(),
            otlp.interval.min(Duration::from_secs(1)),
            resource.clone(),
            spans,
            shutdown.clone(),
        ));
        tokio::spawn(crate::otlp::push(
            endpoint,
            otlp.interval,
            resource,
            render,
            shutdown,
        ));
    }
    served
}

/// `dci_node_info`, 1 with the node's role, id, region and shard as labels (from its OTLP
/// resource): what a dashboard joins a node's other metrics with (`* on(instance)
/// group_left(role, region) dci_node_info`), since they carry no such labels themselves.
fn node_info(resource: &[(&'static str, String)]) -> String {
    let mut labels = vec![format!("version=\"{}\"", env!("CARGO_PKG_VERSION"))];
    for (key, value) in resource {
        let name = match *key {
            "service.name" => "role",
            "service.instance.id" => "node_id",
            "dci.region" => "region",
            "dci.shard" => "shard",
            _ => continue,
        };
        let value = value
            .strip_prefix("dci-")
            .filter(|_| name == "role")
            .unwrap_or(value);
        labels.push(format!("{name}=\"{}\"", label_value(value)));
    }
    let mut out = String::new();
    sample(
        &mut out,
        "gauge",
        "dci_node_info",
        "1, with the node's role, node_id, region (relays and edges), shard (coordinators) and version",
        &labels.join(","),
        1.0,
    );
    out
}

/// A label value as the text format writes it: backslash, double quote and newline escaped.
fn label_value(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A probe's route: 200 and `yes`, or 503 and `no` with the reason.
fn probe(check: Health, yes: &'static str, no: &'static str) -> axum::routing::MethodRouter {
    axum::routing::get(move || {
        let check = check.clone();
        async move {
            match check() {
                Ok(()) => (axum::http::StatusCode::OK, format!("{yes}\n")),
                Err(why) => (
                    axum::http::StatusCode::SERVICE_UNAVAILABLE,
                    format!("{no}: {why}\n"),
                ),
            }
        }
    })
}

/// Serve `GET /metrics`, and `GET /healthz` and `GET /readyz` (200, or 503 saying why not), on
/// `addr` until `shutdown` turns true; returns the bound address. Plain HTTP whether or not the
/// node's gRPC port is TLS, so that a Kubernetes probe can reach it.
pub async fn serve(
    addr: SocketAddr,
    render: Render,
    probes: Probes,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let render = render.clone();
                async move { ([("content-type", "text/plain; version=0.0.4")], render()) }
            }),
        )
        .route("/healthz", probe(probes.health, "serving", "not serving"))
        .route("/readyz", probe(probes.ready, "ready", "not ready"));
    tokio::spawn(async move {
        let mut warned = None::<std::time::Instant>;
        loop {
            let stream = tokio::select! {
                _ = stopped(&mut shutdown) => return,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    // Out of file descriptors, a connection reset before it was taken: the
                    // listener still works.
                    Err(e) => {
                        if warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                            warned = Some(std::time::Instant::now());
                            tracing::warn!(error = %e, "metrics endpoint: accepting a connection failed");
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let svc = hyper_util::service::TowerToHyperService::new(app.clone());
            let mut shutdown = shutdown.clone();
            tokio::spawn(async move {
                // A request's head must come within the timeout, on a new connection and on an
                // idle kept-alive one alike: a client that opens connections and says nothing,
                // or says it a byte at a time, cannot hold descriptors for ever.
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
                tokio::pin!(conn);
                tokio::select! {
                    _ = conn.as_mut() => {}
                    _ = stopped(&mut shutdown) => {
                        conn.as_mut().graceful_shutdown();
                        let _ = conn.await;
                    }
                }
            });
        }
    });
    Ok(bound)
}

/// Resolves once `shutdown` turns true (or its sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

/// How long the metrics endpoint waits for a request's head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_renders_cumulative_buckets() {
        let h = LatencyHistogram::default();
        h.observe_us(100);
        h.observe_us(800);
        h.observe_us(20_000_000);
        let mut out = String::new();
        h.render(&mut out, "x_seconds", "test");
        assert!(out.contains("x_seconds_bucket{le=\"0.0001\"} 1"));
        assert!(out.contains("x_seconds_bucket{le=\"0.001\"} 2"));
        assert!(out.contains("x_seconds_bucket{le=\"+Inf\"} 3"));
        assert!(out.contains("x_seconds_count 3"));
        let many = LatencyHistogram::default();
        many.observe_many_us([100, 800, 20_000_000].into_iter());
        many.observe_many_us(std::iter::empty());
        let mut again = String::new();
        many.render(&mut again, "x_seconds", "test");
        assert_eq!(
            out, again,
            "a batch tallies like its observations one by one"
        );
    }

    #[test]
    fn quantiles_come_from_the_counts_since_a_snapshot() {
        let h = LatencyHistogram::default();
        h.observe_many_us([5_000, 5_000, 5_000].into_iter());
        let before = h.snapshot();
        // 100 observations spread evenly over (100, 150] µs, then one slow one.
        h.observe_many_us((0..100).map(|i| 101 + i / 2));
        h.observe_us(900);
        let d = h.snapshot().since(&before);
        assert_eq!(d.count(), 101);
        let p50 = d.quantile_us(0.5).unwrap();
        assert!((100.0..=150.0).contains(&p50), "{p50}");
        let p999 = d.quantile_us(0.999).unwrap();
        assert!((750.0..=1_000.0).contains(&p999), "{p999}");
        assert_eq!(
            LatencyHistogram::default().snapshot().quantile_us(0.5),
            None
        );
        let twice = d.plus(&d);
        assert_eq!(twice.count(), 202);
        assert_eq!(twice.quantile_us(0.5), d.quantile_us(0.5));
        h.observe_us(20_000_000);
        let beyond = h.snapshot().since(&h.snapshot());
        assert_eq!(beyond.count(), 0);
    }
}
