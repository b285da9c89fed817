//! Traced invalidations: a writer that publishes under a W3C trace context sees, in its tracing
//! backend, when each node of the tree logged, relayed and applied the invalidation.
//!
//! An invalidation's `trace_id` holds the context: 16 bytes of trace id, then, optionally, the 8
//! bytes of the span it was published under. Each coordinator, relay and edge with an OTLP
//! collector configured exports, for every traced entry it handles, one span in that trace (a
//! child of the writer's span when there is one), from the publish call to the node's step.
//! Untraced entries cost nothing beyond a check of their field.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::trace::v1::{span, ResourceSpans, ScopeSpans, Span};
use tokio::sync::watch;

use crate::types::{Batch, Kind};

/// A W3C trace context, as an invalidation carries it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceContext {
    /// The trace id (never all zeros).
    pub trace_id: [u8; 16],
    /// The span the invalidation was published under, if said (never all zeros).
    pub parent_span_id: Option<[u8; 8]>,
}

impl TraceContext {
    /// The context of a `traceparent` header (`00-<32 hex>-<16 hex>-<2 hex>`), as W3C Trace
    /// Context defines it.
    pub fn from_traceparent(header: &str) -> Result<TraceContext, String> {
        let bad = |why: &str| format!("traceparent {header:?} {why}");
        let parts: Vec<&str> = header.trim().split('-').collect();
        let [version, trace, parent, flags] = parts[..] else {
            return Err(bad("is not version-traceid-parentid-flags"));
        };
        let (Some(version), Some(_)) = (hex::<1>(version), hex::<1>(flags)) else {
            return Err(bad("needs a version and flags of 2 hex digits each"));
        };
        if version == [0xff] {
            return Err(bad("has version ff, which is not a version"));
        }
        let Some(trace_id) = hex::<16>(trace) else {
            return Err(bad("needs a trace id of 32 hex digits"));
        };
        let Some(parent) = hex::<8>(parent) else {
            return Err(bad("needs a parent id of 16 hex digits"));
        };
        if trace_id == [0; 16] || parent == [0; 8] {
            return Err(bad(
                "has an id of zeros, which W3C Trace Context says is invalid",
            ));
        }
        Ok(TraceContext {
            trace_id,
            parent_span_id: Some(parent),
        })
    }

    /// The context an invalidation's `trace_id` bytes hold, if they hold one.
    pub fn from_bytes(b: &[u8]) -> Option<TraceContext> {
        let trace_id: [u8; 16] = b.get(..16)?.try_into().ok()?;
        let parent_span_id = match b.len() {
            16 => None,
            24 => Some(b[16..].try_into().ok()?),
            _ => return None,
        };
        (trace_id != [0; 16] && parent_span_id != Some([0; 8])).then_some(TraceContext {
            trace_id,
            parent_span_id,
        })
    }

    /// The bytes for an invalidation's `trace_id`.
    pub fn to_bytes(&self) -> Bytes {
        let mut b = self.trace_id.to_vec();
        if let Some(p) = self.parent_span_id {
            b.extend_from_slice(&p);
        }
        b.into()
    }
}

impl std::fmt::Display for TraceContext {
    /// `trace=<32 hex>`, and ` span=<16 hex>` for the span it was published under.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "trace={}", to_hex(&self.trace_id))?;
        if let Some(p) = self.parent_span_id {
            write!(f, " span={}", to_hex(&p))?;
        }
        Ok(())
    }
}

fn hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N || !s.bytes().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// Lower-case hex of `b`.
pub fn to_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The most spans a node holds for export: past it, new ones are dropped (and counted), so a
/// collector that is down or a writer that traces everything costs bounded memory.
pub const MAX_PENDING: usize = 8192;

/// The most spans one export request carries.
const PER_REQUEST: usize = 2048;

/// Key bytes a span names (its attribute `dci.key`).
const KEY_SHOWN: usize = 128;

/// One traced entry a node handled.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Handled {
    context: TraceContext,
    shard: u32,
    epoch: u64,
    seq: u64,
    kind: Kind,
    key: Bytes,
    source_version: Option<u64>,
    published_us: u64,
    handled_us: u64,
}

/// The spans of the traced entries a node handled, until they are exported.
#[derive(Debug)]
pub struct Spans {
    /// The span's name: what the node did (`dci.log`, `dci.relay`, `dci.apply`).
    name: &'static str,
    pending: Mutex<Vec<Handled>>,
    dropped: AtomicU64,
    /// Told when a request's worth is pending: the exporter sends it then, not at its next
    /// tick, so that many traced entries are bounded by the collector's pace, not the tick's.
    full: tokio::sync::Notify,
}

impl Spans {
    /// Spans named `name`, none pending yet.
    pub fn new(name: &'static str) -> Spans {
        Spans {
            name,
            pending: Mutex::new(Vec::new()),
            dropped: AtomicU64::new(0),
            full: tokio::sync::Notify::new(),
        }
    }

    /// Note the traced entries of `batch`, handled now.
    pub fn observe(&self, batch: &Batch) {
        let mut traced = batch
            .entries
            .iter()
            .filter_map(|e| Some((e, TraceContext::from_bytes(e.trace_id.as_deref()?)?)))
            .peekable();
        if traced.peek().is_none() {
            return;
        }
        let now = crate::now_us();
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        for (e, context) in traced {
            if pending.len() >= MAX_PENDING {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            pending.push(Handled {
                context,
                shard: batch.shard,
                epoch: batch.epoch,
                seq: e.seq,
                kind: e.kind,
                key: e.key.slice(..e.key.len().min(KEY_SHOWN)),
                source_version: e.source_version,
                published_us: e.publish_time_us,
                handled_us: now,
            });
        }
        if pending.len() >= PER_REQUEST {
            self.full.notify_one();
        }
    }

    /// How many spans wait for export.
    fn waiting(&self) -> usize {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// How many spans were dropped because too many were pending.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Up to `PER_REQUEST` pending spans, as an export request (none when nothing is pending).
    fn take_request(&self, resource: &[(&str, String)]) -> Option<ExportTraceServiceRequest> {
        let handled: Vec<Handled> = {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            if pending.is_empty() {
                return None;
            }
            let n = pending.len().min(PER_REQUEST);
            pending.drain(..n).collect()
        };
        let spans = handled.into_iter().map(|h| self.span(h)).collect();
        Some(ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(crate::otlp::resource(resource)),
                scope_spans: vec![ScopeSpans {
                    scope: Some(crate::otlp::scope()),
                    spans,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        })
    }

    fn span(&self, h: Handled) -> Span {
        let kind = match h.kind {
            Kind::Key => "key",
            Kind::Prefix => "prefix",
            Kind::Tag => "tag",
            Kind::All => "all",
        };
        let mut attributes = vec![
            int("dci.shard", h.shard.into()),
            int("dci.epoch", h.epoch),
            int("dci.seq", h.seq),
            crate::otlp::attr("dci.kind", kind),
            crate::otlp::attr("dci.key", &String::from_utf8_lossy(&h.key)),
        ];
        if let Some(v) = h.source_version {
            attributes.push(int("dci.source_version", v));
        }
        // A span id of zeros is invalid; one in 2^64 draws would be it.
        let span_id = rand::random::<u64>().max(1).to_be_bytes().to_vec();
        Span {
            trace_id: h.context.trace_id.to_vec(),
            span_id,
            parent_span_id: h
                .context
                .parent_span_id
                .map(|p| p.to_vec())
                .unwrap_or_default(),
            name: self.name.into(),
            kind: span::SpanKind::Consumer as i32,
            // A publish time ahead of this node's clock (clocks differ) still makes a span
            // that starts before it ends.
            start_time_unix_nano: h.published_us.min(h.handled_us).saturating_mul(1_000),
            end_time_unix_nano: h.handled_us.saturating_mul(1_000),
            attributes,
            ..Default::default()
        }
    }
}

fn int(key: &str, value: u64) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::IntValue(value.min(i64::MAX as u64) as i64)),
        }),
        ..Default::default()
    }
}

/// Export `spans` to the OTLP/gRPC collector at `endpoint` every `interval`, and whenever a
/// request's worth is waiting, until `shutdown` turns true, then once more. A collector that is down costs a warning and
/// the spans of the requests it failed, never the node's work.
pub async fn export(
    endpoint: String,
    interval: Duration,
    resource: Vec<(&'static str, String)>,
    spans: std::sync::Arc<Spans>,
    mut shutdown: watch::Receiver<bool>,
) {
    let channel = match crate::tls::ClientTls::default().endpoint(&endpoint) {
        Ok(e) => e
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(5))
            .connect_lazy(),
        Err(e) => {
            tracing::error!(%endpoint, error = %e, "bad otlp endpoint; spans are not exported");
            return;
        }
    };
    let mut client = TraceServiceClient::new(channel);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut failing, mut told_dropped, mut last_told) = (false, 0, None::<Instant>);
    loop {
        let last = tokio::select! {
            _ = tick.tick() => false,
            // While the collector fails, only the tick tries it again.
            _ = spans.full.notified(), if !failing => false,
            _ = shutdown.wait_for(|s| *s) => true,
        };
        // What is waiting now, and no more: spans that come meanwhile wake the next round.
        let mut rounds = spans.waiting().div_ceil(PER_REQUEST);
        while rounds > 0 {
            rounds -= 1;
            let Some(request) = spans.take_request(&resource) else {
                break;
            };
            match client.export(request).await {
                Ok(_) if failing => {
                    tracing::info!(%endpoint, "otlp collector takes spans again");
                    failing = false;
                }
                Ok(_) => {}
                Err(status) => {
                    if !failing {
                        tracing::warn!(%endpoint, %status, "otlp span export failed; spans are dropped while it fails");
                    }
                    failing = true;
                    break;
                }
            }
        }
        let dropped = spans.dropped();
        if dropped > told_dropped
            && last_told.is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
        {
            tracing::warn!(
                dropped = dropped - told_dropped,
                "spans of traced invalidations dropped: more were waiting than a node holds \
                 ({MAX_PENDING}), the collector being slow or unreachable"
            );
            (told_dropped, last_told) = (dropped, Some(Instant::now()));
        }
        if last {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Invalidation;

    const HEADER: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_traceparent_header_reads_as_its_context_and_back() {
        let c = TraceContext::from_traceparent(HEADER).unwrap();
        assert_eq!(to_hex(&c.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(to_hex(&c.parent_span_id.unwrap()), "00f067aa0ba902b7");
        assert_eq!(TraceContext::from_bytes(&c.to_bytes()), Some(c));
        assert_eq!(
            c.to_string(),
            "trace=4bf92f3577b34da6a3ce929d0e0e4736 span=00f067aa0ba902b7"
        );
        let bare = TraceContext::from_bytes(&c.trace_id).unwrap();
        assert_eq!(bare.parent_span_id, None);
        assert_eq!(bare.to_string(), "trace=4bf92f3577b34da6a3ce929d0e0e4736");
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "+0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            let e = TraceContext::from_traceparent(bad).unwrap_err();
            assert!(e.starts_with("traceparent"), "{bad:?}: {e}");
        }
        for not_a_context in [&[1u8; 15][..], &[1; 17], &[1; 23], &[1; 25], &[0; 16], &[]] {
            assert_eq!(TraceContext::from_bytes(not_a_context), None);
        }
    }

    /// A collector that counts the spans it is sent.
    #[derive(Clone, Default)]
    struct Counting(std::sync::Arc<AtomicU64>);

    #[tonic::async_trait]
    impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService
        for Counting
    {
        async fn export(
            &self,
            request: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<
            tonic::Response<
                opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse,
            >,
            tonic::Status,
        > {
            let n: usize = request
                .into_inner()
                .resource_spans
                .iter()
                .flat_map(|r| &r.scope_spans)
                .map(|s| s.spans.len())
                .sum();
            self.0.fetch_add(n as u64, Ordering::Relaxed);
            Ok(tonic::Response::new(Default::default()))
        }
    }

    /// Many traced entries are sent as they come, a request at a time, not held for the next
    /// tick (and dropped past the bound meanwhile).
    #[tokio::test]
    async fn a_requests_worth_of_spans_goes_out_without_waiting_for_the_tick() {
        use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let got = Counting::default();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(got.clone()))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let spans = std::sync::Arc::new(Spans::new("dci.apply"));
        let (_stop, shutdown) = watch::channel(false);
        tokio::spawn(export(
            format!("http://{addr}"),
            Duration::from_secs(3600),
            vec![("service.name", "dci-edge".into())],
            spans.clone(),
            shutdown,
        ));
        let c = TraceContext::from_traceparent(HEADER).unwrap();
        let mut seq = 0;
        let deadline = Instant::now() + Duration::from_secs(20);
        // Four bounds' worth, a batch of 500 at a time, each once there is room: without sending
        // early, nothing after the first round would go out before the tick an hour away.
        for _ in 0..(4 * MAX_PENDING / 500) {
            let entries = (0..500)
                .map(|_| {
                    seq += 1;
                    Invalidation {
                        seq,
                        ..Invalidation::key("k").traced(c)
                    }
                })
                .collect();
            spans.observe(&Batch {
                shard: 0,
                epoch: 1,
                first_seq: seq - 499,
                last_seq: seq,
                entries,
            });
            // As batches come from a sender: each a moment after the one before.
            while spans.waiting() >= MAX_PENDING - 500 {
                assert!(Instant::now() < deadline, "spans never went out");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        assert_eq!(spans.dropped(), 0);
        while got.0.load(Ordering::Relaxed) < seq - PER_REQUEST as u64 {
            assert!(Instant::now() < deadline, "spans never went out");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        server.abort();
    }

    #[test]
    fn spans_are_made_for_traced_entries_only_and_held_within_a_bound() {
        let c = TraceContext::from_traceparent(HEADER).unwrap();
        let entry = |seq: u64, trace: Option<Bytes>| Invalidation {
            seq,
            publish_time_us: 1_000,
            source_version: Some(9),
            trace_id: trace,
            ..Invalidation::key(format!("user:{seq}:{}", "x".repeat(200)))
        };
        let batch = Batch {
            shard: 3,
            epoch: 7,
            first_seq: 10,
            last_seq: 12,
            entries: vec![
                entry(10, Some(c.to_bytes())),
                entry(11, None),
                // Bytes that are no W3C context are carried, but make no span.
                entry(12, Some(Bytes::from_static(b"not a trace"))),
            ],
        };
        let spans = Spans::new("dci.apply");
        spans.observe(&batch);
        let resource = [("service.name", "dci-edge".to_string())];
        let request = spans.take_request(&resource).unwrap();
        assert!(spans.take_request(&resource).is_none(), "taken once");
        let rs = &request.resource_spans[0];
        assert_eq!(
            rs.resource.as_ref().unwrap().attributes[0].key,
            "service.name"
        );
        let got = &rs.scope_spans[0].spans;
        assert_eq!(got.len(), 1);
        let s = &got[0];
        assert_eq!(s.trace_id, c.trace_id.to_vec());
        assert_eq!(s.parent_span_id, c.parent_span_id.unwrap().to_vec());
        assert_eq!(s.span_id.len(), 8);
        assert_ne!(s.span_id, vec![0; 8]);
        assert_eq!(s.name, "dci.apply");
        assert_eq!(s.start_time_unix_nano, 1_000_000);
        assert!(s.end_time_unix_nano > s.start_time_unix_nano);
        let attr = |k: &str| {
            s.attributes
                .iter()
                .find(|a| a.key == k)
                .and_then(|a| a.value.clone()?.value)
        };
        assert_eq!(attr("dci.seq"), Some(any_value::Value::IntValue(10)));
        assert_eq!(attr("dci.shard"), Some(any_value::Value::IntValue(3)));
        assert_eq!(attr("dci.epoch"), Some(any_value::Value::IntValue(7)));
        assert_eq!(
            attr("dci.source_version"),
            Some(any_value::Value::IntValue(9))
        );
        let Some(any_value::Value::StringValue(key)) = attr("dci.key") else {
            panic!("no key")
        };
        assert_eq!(key.len(), KEY_SHOWN);
        assert!(key.starts_with("user:10:"));

        let many = Batch {
            entries: (0..MAX_PENDING as u64 + 5)
                .map(|i| entry(i, Some(c.to_bytes())))
                .collect(),
            ..batch
        };
        spans.observe(&many);
        assert_eq!(spans.dropped(), 5);
        let mut taken = 0;
        while let Some(r) = spans.take_request(&resource) {
            let n = r.resource_spans[0].scope_spans[0].spans.len();
            assert!(n <= PER_REQUEST);
            taken += n;
        }
        assert_eq!(taken, MAX_PENDING);
    }
}
