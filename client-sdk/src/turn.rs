//! Loaders of one key taking turns (`get_or_load` of [`crate::CacheClient`] and
//! [`crate::NearCache`]): a caller that misses waits for a load of the key already under way,
//! whose fill it then reads, instead of loading too.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

/// The gate of one key: held by the caller loading it; `loads` counts the loads done under it.
#[derive(Default)]
pub(crate) struct Gate {
    held: tokio::sync::Mutex<()>,
    loads: AtomicU64,
}

/// Keys being loaded, each with the gate its loaders take in turn.
pub(crate) type Loading = Mutex<HashMap<Bytes, Arc<Gate>>>;

/// Keys being loaded now, or waited for.
pub(crate) fn in_progress(loading: &Loading) -> usize {
    loading.lock().unwrap_or_else(|e| e.into_inner()).len()
}

/// A caller's place among the loaders of a key. The key's gate leaves the map with its last
/// holder when that one is done, however it ends: finished, failed, or dropped midway (a
/// caller's timeout), which would otherwise leave the key in the map for good.
pub(crate) struct Turn<'a> {
    loading: &'a Loading,
    key: Bytes,
    gate: Option<Arc<Gate>>,
    /// Loads done under the gate when this caller came.
    loads_before: u64,
}

/// The gate, held: what a caller holds while it loads, so that the next ones wait for its fill.
pub(crate) struct Held<'a> {
    _held: tokio::sync::MutexGuard<'a, ()>,
    loads: &'a AtomicU64,
}

impl Held<'_> {
    /// The load is done (filled or not): the callers waiting look again.
    pub(crate) fn loaded(self) {
        self.loads.fetch_add(1, Ordering::Relaxed);
    }
}

impl<'a> Turn<'a> {
    pub(crate) fn take(loading: &'a Loading, key: Bytes) -> Self {
        let gate = {
            let mut l = loading.lock().unwrap_or_else(|e| e.into_inner());
            l.entry(key.clone()).or_default().clone()
        };
        let loads_before = gate.loads.load(Ordering::Relaxed);
        Turn {
            loading,
            key,
            gate: Some(gate),
            loads_before,
        }
    }

    /// Wait for the callers ahead. `Some`: the gate, for this caller to load under. `None`
    /// when another caller's load ended meanwhile: its fill was there to read, and if this
    /// caller still missed, that fill was refused (the key was invalidated while it loaded) or
    /// never made. Such a caller loads without the gate: the next ones waiting would otherwise
    /// each wait through every load ahead of them, one at a time, for as long as the key keeps
    /// being invalidated; this way none waits through more than one load besides its own.
    pub(crate) async fn wait(&self) -> Option<Held<'_>> {
        let gate = self.gate.as_ref().expect("held until dropped");
        let held = gate.held.lock().await;
        (gate.loads.load(Ordering::Relaxed) == self.loads_before).then_some(Held {
            _held: held,
            loads: &gate.loads,
        })
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let mut l = self.loading.lock().unwrap_or_else(|e| e.into_inner());
        // The map's reference and this one: nobody else waits on the key.
        if l.get(&self.key).is_some_and(|g| Arc::strong_count(g) <= 2) {
            l.remove(&self.key);
        }
        self.gate = None;
    }
}
