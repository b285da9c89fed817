//! Pushing a node's metrics to an OpenTelemetry collector (OTLP over gRPC).
//!
//! The node's `/metrics` exposition is the one source: it is read back into OTLP gauges,
//! cumulative sums and histograms, so a scrape and a push always show the same figures.

use std::collections::HashMap;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    metric, number_data_point, AggregationTemporality, Gauge, Histogram, HistogramDataPoint,
    Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// Where and how often to push (YAML `otlp:`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OtlpConfig {
    /// The collector's OTLP/gRPC endpoint, `http://host:4317` (none: no push).
    pub endpoint: Option<String>,
    /// Push period.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
}

impl Default for OtlpConfig {
    fn default() -> Self {
        OtlpConfig {
            endpoint: None,
            interval: Duration::from_secs(10),
        }
    }
}

impl OtlpConfig {
    /// Why these values cannot work, if they cannot.
    pub fn check(&self) -> Result<(), String> {
        if let Some(e) = &self.endpoint {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return Err(format!("otlp endpoint {e:?} is not an http(s):// URL"));
            }
            tonic::transport::Endpoint::from_shared(e.clone())
                .map_err(|err| format!("otlp endpoint {e:?}: {err}"))?;
        }
        if self.interval < Duration::from_millis(10) {
            return Err("otlp interval must be at least 10ms".into());
        }
        crate::types::check_duration("otlp interval", self.interval)?;
        Ok(())
    }
}

/// The resource a node's metrics and spans are of.
pub(crate) fn resource(attributes: &[(&str, String)]) -> Resource {
    Resource {
        attributes: attributes.iter().map(|(k, v)| attr(k, v)).collect(),
        ..Default::default()
    }
}

/// The scope of everything a node exports.
pub(crate) fn scope() -> InstrumentationScope {
    InstrumentationScope {
        name: "dci".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        ..Default::default()
    }
}

pub(crate) fn attr(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.to_string())),
        }),
        ..Default::default()
    }
}

/// `shard="0",epoch="7"` as attributes.
fn labels(text: &str) -> Vec<KeyValue> {
    text.split(',')
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some(attr(k.trim(), v.trim().trim_matches('"')))
        })
        .collect()
}

/// One exposition sample line: name, labels, value.
fn parse_sample(line: &str) -> Option<(&str, &str, f64)> {
    let (series, value) = line.rsplit_once(' ')?;
    let value = value.parse::<f64>().ok()?;
    match series.split_once('{') {
        Some((name, rest)) => Some((name, rest.strip_suffix('}')?, value)),
        None => Some((series, "", value)),
    }
}

#[derive(Default)]
struct HistogramParts {
    bounds: Vec<f64>,
    cumulative: Vec<u64>,
    total: u64,
    sum: f64,
}

/// The exposition `text` (as [`crate::metrics`] writes it) as an OTLP export request.
pub fn to_request(
    text: &str,
    resource: &[(&str, String)],
    start_ns: u64,
    now_ns: u64,
) -> ExportMetricsServiceRequest {
    let mut help: HashMap<&str, &str> = HashMap::new();
    let mut kind: HashMap<&str, &str> = HashMap::new();
    let mut order: Vec<&str> = Vec::new();
    let mut points: HashMap<&str, Vec<NumberDataPoint>> = HashMap::new();
    let mut histograms: HashMap<&str, HistogramParts> = HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            if let Some((name, h)) = rest.split_once(' ') {
                help.insert(name, h);
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            if let Some((name, k)) = rest.split_once(' ') {
                if !kind.contains_key(name) {
                    order.push(name);
                }
                kind.insert(name, k);
            }
            continue;
        }
        let Some((name, label_text, value)) = parse_sample(line) else {
            continue;
        };
        let histogram_part = ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
            let base = name.strip_suffix(suffix)?;
            (kind.get(base) == Some(&"histogram")).then_some((base, *suffix))
        });
        match histogram_part {
            Some((base, "_bucket")) => {
                let h = histograms.entry(base).or_default();
                let le = label_text
                    .strip_prefix("le=\"")
                    .and_then(|l| l.strip_suffix('"'));
                match le {
                    Some("+Inf") => h.total = value as u64,
                    Some(b) => {
                        if let Ok(bound) = b.parse::<f64>() {
                            h.bounds.push(bound);
                            h.cumulative.push(value as u64);
                        }
                    }
                    None => {}
                }
            }
            Some((base, "_sum")) => histograms.entry(base).or_default().sum = value,
            Some((base, _)) => histograms.entry(base).or_default().total = value as u64,
            None => points.entry(name).or_default().push(NumberDataPoint {
                attributes: labels(label_text),
                start_time_unix_nano: start_ns,
                time_unix_nano: now_ns,
                value: Some(number_data_point::Value::AsDouble(value)),
                ..Default::default()
            }),
        }
    }
    let cumulative = AggregationTemporality::Cumulative as i32;
    let metrics = order
        .into_iter()
        .filter_map(|name| {
            let data = match kind.get(name).copied() {
                Some("gauge") => metric::Data::Gauge(Gauge {
                    data_points: points.remove(name)?,
                }),
                Some("counter") => metric::Data::Sum(Sum {
                    data_points: points.remove(name)?,
                    aggregation_temporality: cumulative,
                    is_monotonic: true,
                }),
                Some("histogram") => {
                    let h = histograms.remove(name)?;
                    // OTLP wants per-bucket counts, the exposition has running totals; the
                    // last bucket is what lies above the last bound.
                    let mut counts: Vec<u64> = h
                        .cumulative
                        .iter()
                        .scan(0u64, |prev, &c| {
                            let n = c.saturating_sub(*prev);
                            *prev = c;
                            Some(n)
                        })
                        .collect();
                    counts.push(
                        h.total
                            .saturating_sub(h.cumulative.last().copied().unwrap_or(0)),
                    );
                    metric::Data::Histogram(Histogram {
                        data_points: vec![HistogramDataPoint {
                            start_time_unix_nano: start_ns,
                            time_unix_nano: now_ns,
                            count: h.total,
                            sum: Some(h.sum),
                            bucket_counts: counts,
                            explicit_bounds: h.bounds,
                            ..Default::default()
                        }],
                        aggregation_temporality: cumulative,
                    })
                }
                _ => return None,
            };
            Some(Metric {
                name: name.to_string(),
                description: help.get(name).copied().unwrap_or_default().to_string(),
                unit: if name.ends_with("_seconds") { "s" } else { "" }.to_string(),
                data: Some(data),
                ..Default::default()
            })
        })
        .collect();
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(self::resource(resource)),
            scope_metrics: vec![ScopeMetrics {
                scope: Some(scope()),
                metrics,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

fn now_ns() -> u64 {
    crate::now_us().saturating_mul(1_000)
}

/// Push `render`'s metrics to `endpoint` every `interval` until `shutdown` turns true, then once
/// more. A collector that is down or slow costs a warning, never the node's work.
pub async fn push(
    endpoint: String,
    interval: Duration,
    resource: Vec<(&'static str, String)>,
    render: crate::metrics::Render,
    mut shutdown: watch::Receiver<bool>,
) {
    // An https:// collector is verified against the system's roots.
    let channel = match crate::tls::ClientTls::default().endpoint(&endpoint) {
        Ok(e) => e
            .connect_timeout(Duration::from_secs(2))
            .timeout(interval.max(Duration::from_secs(1)))
            .connect_lazy(),
        Err(e) => {
            tracing::error!(%endpoint, error = %e, "bad otlp endpoint; metrics are not pushed");
            return;
        }
    };
    let mut client = MetricsServiceClient::new(channel);
    let start = now_ns();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        let last = tokio::select! {
            _ = tick.tick() => false,
            _ = shutdown.wait_for(|s| *s) => true,
        };
        let request = to_request(&render(), &resource, start, now_ns());
        match client.export(request).await {
            Ok(_) if failing => {
                tracing::info!(%endpoint, "otlp collector reachable again");
                failing = false;
            }
            Ok(_) => {}
            Err(status) if !failing => {
                tracing::warn!(%endpoint, %status, "otlp push failed; retrying every interval");
                failing = true;
            }
            Err(status) => tracing::debug!(%endpoint, %status, "otlp push failed"),
        }
        if last {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{sample, LatencyHistogram};

    #[test]
    fn the_exposition_reads_back_as_otlp() {
        let mut text = String::new();
        sample(
            &mut text,
            "gauge",
            "dci_applied_seq",
            "Highest seq applied",
            "shard=\"0\",epoch=\"7\"",
            42.0,
        );
        sample(&mut text, "counter", "dci_resets_total", "Resets", "", 3.0);
        let h = LatencyHistogram::default();
        h.observe_many_us([40, 120, 120, 20_000_000].into_iter());
        h.render(&mut text, "dci_propagation_seconds", "Publish to applied");
        let req = to_request(&text, &[("service.name", "dci-edge".into())], 1, 2);
        let rm = &req.resource_metrics[0];
        assert_eq!(
            rm.resource.as_ref().unwrap().attributes,
            vec![attr("service.name", "dci-edge")]
        );
        let metrics = &rm.scope_metrics[0].metrics;
        let names: Vec<_> = metrics.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "dci_applied_seq",
                "dci_resets_total",
                "dci_propagation_seconds"
            ]
        );

        let Some(metric::Data::Gauge(g)) = &metrics[0].data else {
            panic!("a gauge")
        };
        assert_eq!(
            g.data_points[0].value,
            Some(number_data_point::Value::AsDouble(42.0))
        );
        assert_eq!(
            g.data_points[0].attributes,
            vec![attr("shard", "0"), attr("epoch", "7")]
        );

        let Some(metric::Data::Sum(s)) = &metrics[1].data else {
            panic!("a sum")
        };
        assert!(s.is_monotonic);
        assert_eq!(
            s.aggregation_temporality,
            AggregationTemporality::Cumulative as i32
        );

        let Some(metric::Data::Histogram(hist)) = &metrics[2].data else {
            panic!("a histogram")
        };
        let p = &hist.data_points[0];
        assert_eq!(metrics[2].unit, "s");
        assert_eq!(p.count, 4);
        assert_eq!(p.bucket_counts.len(), p.explicit_bounds.len() + 1);
        assert_eq!(p.bucket_counts.iter().sum::<u64>(), 4);
        assert_eq!(p.bucket_counts[0], 1, "40 µs in the first bucket (≤ 50 µs)");
        assert_eq!(p.bucket_counts[2], 2, "120 µs twice in (100, 150] µs");
        assert_eq!(
            *p.bucket_counts.last().unwrap(),
            1,
            "20 s above the last bound"
        );
        assert!((p.sum.unwrap() - 20.00028).abs() < 1e-9, "{:?}", p.sum);
    }

    #[test]
    fn bad_endpoints_and_intervals_are_refused() {
        let ok = OtlpConfig {
            endpoint: Some("http://127.0.0.1:4317".into()),
            ..Default::default()
        };
        assert_eq!(ok.check(), Ok(()));
        let bad = OtlpConfig {
            endpoint: Some("collector:4317".into()),
            ..Default::default()
        };
        assert!(bad.check().unwrap_err().contains("http(s)://"));
        let fast = OtlpConfig {
            interval: Duration::from_millis(1),
            ..Default::default()
        };
        assert!(fast.check().is_err());
        assert_eq!(OtlpConfig::default().check(), Ok(()));
    }
}
