//! `dci-proto`: the bottom of the dependency graph.
//!
//! - [`pb`]: the generated protobuf/gRPC code (fenced: nothing else is generated).
//! - [`types`]: domain types (`Invalidation`, `Batch`, `Filter`...) and their checked conversions
//!   from the wire types, so handlers validate once and then work with domain types only.
//! - [`ring`]: the hash ring of node ids shared by relays (ownership filters) and the SDK (routing).
//! - [`lease`]: leases, tombstones and floors: when a cache fill is refused (the stale-set race).
//! - [`link`]: the link protocol spoken on every hop, as pure state machines: the receiver's
//!   high-water mark and gap tracker, the sender's window and resume/reset rules, and the
//!   byte-bounded retransmit ring. No I/O and no clock reads: time is an argument.
//! - [`metrics`]: Prometheus text exposition on `/metrics`.
//! - [`downstream`] and [`upstream`]: the async runtimes that carry the state machines' commands
//!   over gRPC streams: serving `Subscribe` to receivers from any [`downstream::BatchSource`]
//!   (coordinator log, relay ring), and following senders with failover into any
//!   [`upstream::Applier`] (relay ring, edge store, near cache).

pub mod applied;
pub mod downstream;
pub mod lease;
pub mod link;
pub mod metrics;
pub mod otlp;
pub mod reload;
pub mod ring;
pub mod throttle;
pub mod tls;
pub mod trace;
pub mod types;
pub mod upstream;

/// Generated protobuf messages and gRPC clients/servers (package `dci.v1`).
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("dci.v1");

    /// The encoded file descriptor set, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("dci_descriptor");
}

pub use types::{coalesce, own_bytes, Batch, Epoch, Filter, Invalidation, Kind, Seq, ShardId};

/// Bind a node's listener; returns it with the address it really got (for port 0).
pub async fn bind(
    addr: std::net::SocketAddr,
) -> std::io::Result<(tokio::net::TcpListener, std::net::SocketAddr)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    Ok((listener, bound))
}

/// The gRPC server settings every dci node uses.
pub fn grpc_server() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        // Streams carry batches continuously: windows large enough not to stall on updates.
        .initial_stream_window_size(Some(2 << 20))
        .initial_connection_window_size(Some(8 << 20))
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
}

/// The gRPC reflection service for dci's services, so `grpcurl` and friends need no .proto file.
pub fn reflection() -> tonic_reflection::server::v1::ServerReflectionServer<
    impl tonic_reflection::server::v1::ServerReflection,
> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        // The descriptor set is generated at build time from our own .proto; it always parses.
        .expect("the built-in descriptor set is valid")
}

/// Microseconds since the Unix epoch, from the system clock (0 if the clock is before 1970).
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// An error and its causes on one line ("transport error: tcp connect error: Connection
/// refused"), each cause once: a transport error's own text says nothing of what went wrong.
pub fn with_causes(e: &(dyn std::error::Error + 'static)) -> String {
    causes_after(e.to_string(), e.source())
}

/// A refused or failed call as "code: message", then the causes the message leaves out (a
/// transport failure's message is only "transport error"), each once.
pub fn status_with_causes(s: &tonic::Status) -> String {
    // A status without a message (a server without the method says only its code) is its code.
    let head = if s.message().is_empty() {
        s.code().to_string()
    } else {
        format!("{}: {}", s.code(), s.message())
    };
    causes_after(head, std::error::Error::source(s))
}

fn causes_after(mut line: String, first: Option<&(dyn std::error::Error + 'static)>) -> String {
    let mut cause = first;
    while let Some(c) = cause {
        let text = c.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = c.source();
    }
    line.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::with_causes;

    #[derive(Debug, thiserror::Error)]
    #[error("{0}")]
    struct E(&'static str, #[source] Option<Box<E>>);

    #[test]
    fn causes_follow_the_error_each_once() {
        let refused = E("Connection refused (os error 111)", None);
        let connect = E("tcp connect error", Some(Box::new(refused)));
        let e = E("transport error", Some(Box::new(connect)));
        assert_eq!(
            with_causes(&e),
            "transport error: tcp connect error: Connection refused (os error 111)"
        );
        let repeats = E("cannot open x: denied", Some(Box::new(E("denied", None))));
        assert_eq!(with_causes(&repeats), "cannot open x: denied");
    }

    #[test]
    fn a_status_shows_the_causes_its_message_leaves_out() {
        let alert = E("received fatal alert: CertificateRequired", None);
        let conn = E("connection error", Some(Box::new(alert)));
        let inner = E("transport error", Some(Box::new(conn)));
        let outer = E("transport error", Some(Box::new(inner)));
        let mut s = tonic::Status::unknown("transport error");
        s.set_source(std::sync::Arc::new(outer));
        assert_eq!(
            super::status_with_causes(&s),
            "Unknown error: transport error: connection error: received fatal alert: CertificateRequired"
        );
        let plain = tonic::Status::invalid_argument("key is empty");
        assert_eq!(
            super::status_with_causes(&plain),
            "Client specified an invalid argument: key is empty"
        );
        let bare = tonic::Status::unimplemented("");
        assert_eq!(
            super::status_with_causes(&bare),
            "Operation is not implemented or not supported"
        );
    }
}
