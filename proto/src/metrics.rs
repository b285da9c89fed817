//! Prometheus metrics of a node, in the text exposition format, served on `GET /metrics`.
//!
//! Nodes keep plain atomics on their hot paths; a render function reads them when scraped.

use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::watch;

/// Upper bounds (µs) of the propagation-latency buckets: 250 µs to 10 s.
const BOUNDS_US: [u64; 14] = [
    250, 500, 1_000, 2_000, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    5_000_000, 10_000_000,
];

/// A latency histogram with fixed buckets, cheap enough to observe every applied entry.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    buckets: [AtomicU64; BOUNDS_US.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
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
            if let Some(i) = BOUNDS_US.iter().position(|&b| us <= b) {
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

/// Serve `GET /metrics` on `addr` until `shutdown` turns true; returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    render: Arc<dyn Fn() -> String + Send + Sync>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let render = render.clone();
            async move { ([("content-type", "text/plain; version=0.0.4")], render()) }
        }),
    );
    tokio::spawn(async move {
        let stop = async move {
            let _ = shutdown.wait_for(|s| *s).await;
        };
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(stop)
            .await
        {
            tracing::error!(error = %e, "metrics endpoint failed");
        }
    });
    Ok(bound)
}

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
        assert!(out.contains("x_seconds_bucket{le=\"0.00025\"} 1"));
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
}
