//! `dci-sdk`: the Rust client of dci.
//!
//! - [`Publisher`]: publish invalidations to the coordinator shards, batched, retried with
//!   backoff, and idempotent (publisher id + request number), returning the seqs.
//! - [`CacheClient`]: get / set / delete against the edge caches of a region, routed by a hash ring,
//!   with [`CacheClient::get_or_load`] that fills through the lease of a miss (a stale fill is
//!   refused) and lets one caller per key load at a time.
//! - [`NearCache`]: an in-process cache that follows relays like an edge does, with the same
//!   guarantees (lease-gated fills, flush on Reset, bounded staleness).
//! - [`Subscription`]: the invalidation stream itself, as [`Event`]s in seq order per shard,
//!   for what the caches above do not hold (an application's own cache, a CDN to purge).
//!
//! ```no_run
//! # async fn demo() -> Result<(), dci_sdk::Error> {
//! use dci_sdk::{CacheClient, Publisher};
//! let publisher = Publisher::connect(vec!["http://127.0.0.1:7400".into()]).await?;
//! let seq = publisher.invalidate("user:42:profile").await?;
//! let cache = CacheClient::from_urls(vec!["http://127.0.0.1:7600".into()])?;
//! let value = cache
//!     .get_or_load("user:42:profile", || async { Ok::<_, std::io::Error>(bytes::Bytes::from("row")) })
//!     .await?;
//! # let _ = (seq, value); Ok(()) }
//! ```

mod cache;
mod fill;
mod near;
mod publisher;
mod subscription;
mod turn;

pub use cache::{CacheClient, Lookup, GET_MANY_CHUNK, SET_MANY_BYTES};
pub use dci_proto::applied::Lagging;
pub use dci_proto::tls::ClientTls;
pub use dci_proto::trace::TraceContext;
pub use dci_proto::{Invalidation, Kind};
pub use fill::Fill;
pub use near::{NearCache, NearCacheOptions};
pub use publisher::{Applied, Publisher, PublisherOptions};
pub use subscription::{Event, Subscription, SubscriptionOptions};

/// Errors of the SDK.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A URL that cannot be used.
    #[error("bad url {0:?}: {1}")]
    Url(String, String),
    /// The server refused the request (bad input); retrying will not help.
    #[error("refused: {0}")]
    Refused(String),
    /// No server answered in time, after retries.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The loader of `get_or_load` failed.
    #[error("loader failed: {0}")]
    Loader(String),
    /// The client was shut down.
    #[error("client closed")]
    Closed,
    /// [`Publisher::wait_applied`]: the time was up, and these caches had not applied
    /// everything published (one per cache and shard).
    #[error("not applied in time by {}", dci_proto::applied::named(.0))]
    NotApplied(Vec<Lagging>),
}

impl From<tonic::Status> for Error {
    fn from(s: tonic::Status) -> Self {
        use tonic::Code::*;
        match s.code() {
            InvalidArgument | FailedPrecondition | AlreadyExists | OutOfRange
            | PermissionDenied | Unauthenticated => Error::Refused(s.message().to_string()),
            // Another kind of node at that URL (a relay given as a coordinator, say): asking
            // again will not change what it is.
            Unimplemented => Error::Refused(format!(
                "that node does not answer this call ({}): is the URL the right kind of node?",
                s.message()
            )),
            // A transport failure says what failed only in its causes ("tcp connect error":
            // refused? timed out? a certificate?).
            _ => Error::Unavailable(dci_proto::status_with_causes(&s)),
        }
    }
}

/// The README's Rust examples, compiled by the doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeExamples;
