//! What a fill hands a cache besides its key: the value, and what the cache checks it against
//! besides the miss's lease.

use std::future::Future;

use bytes::Bytes;

use crate::Error;

/// A value to fill ([`crate::CacheClient::set`], [`crate::NearCache::set`], or what a
/// `get_or_load` loader returns), with the tags it was built from and the version it was read
/// at. A plain value (`Bytes`, `Vec<u8>`, `String`, `&'static str`) is a fill with neither.
///
/// ```
/// use dci_sdk::Fill;
/// let page = Fill::new("<html>…</html>").tagged(["product:7", "product:8"]);
/// let row = Fill::new(r#"{"name":"x"}"#).version(42);
/// # let _ = (page, row);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fill {
    pub(crate) value: Bytes,
    pub(crate) tags: Vec<Bytes>,
    pub(crate) version: Option<u64>,
}

impl Fill {
    /// `value`, untagged and of no version.
    pub fn new(value: impl Into<Bytes>) -> Fill {
        Fill {
            value: value.into(),
            ..Fill::default()
        }
    }

    /// Tagged `tags` (at most 64, each as long as a key may be): a tag invalidation of any of
    /// them ([`crate::Publisher::invalidate_tag`]) removes the value, whatever its key, and the
    /// fill is refused when one newer than the lease reached the cache meanwhile.
    pub fn tagged<T: Into<Bytes>>(mut self, tags: impl IntoIterator<Item = T>) -> Fill {
        self.tags.extend(tags.into_iter().map(Into::into));
        self
    }

    /// Read at `version`, in the terms of the invalidations' `source_version`
    /// ([`crate::Publisher::invalidate_version`]: the row's version, or the database's log
    /// position). The fill is refused when the cache applied an invalidation of the key that
    /// named a newer version, even under a lease taken after it: a value read from a replica
    /// that lags behind the write is not cached.
    pub fn version(mut self, version: u64) -> Fill {
        self.version = Some(version);
        self
    }
}

impl<V: Into<Bytes>> From<V> for Fill {
    fn from(value: V) -> Fill {
        Fill::new(value)
    }
}

/// Run a `get_or_load` loader: what it returns as a fill, its failure as [`Error::Loader`].
pub(crate) async fn load<F, Fut, V, E>(loader: F) -> Result<Fill, Error>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<V, E>>,
    V: Into<Fill>,
    E: std::fmt::Display,
{
    loader()
        .await
        .map(Into::into)
        .map_err(|e| Error::Loader(e.to_string()))
}
