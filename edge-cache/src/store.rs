//! The edge's store: cached values, tombstones, leases.
//!
//! Every cached value remembers the lease (the shard's applied seq) under which it was filled.
//! Every applied invalidation leaves a tombstone with its seq; old tombstones fold into a
//! per-shard floor when evicted. A fill is refused when an invalidation newer than its lease
//! touched the key, which closes the stale-set race (miss, invalidation, late fill).
//!
//! Leases carry a generation that changes on every flush (Reset): a lease taken before a flush
//! is refused after it, whatever the seqs of the new epoch.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use dci_proto::ring::ShardMap;
use dci_proto::upstream::lock;
use dci_proto::{Epoch, Invalidation, Kind, Seq, ShardId};
use moka::notification::RemovalCause;
use moka::sync::Cache;

const SEQ_BITS: u32 = 48;
const SEQ_MASK: u64 = (1 << SEQ_BITS) - 1;
const MAX_PREFIX_TOMBS: usize = 4096;

/// A lease: the generation of the store and the shard's applied seq at the time of a miss.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lease {
    /// Flush generation.
    pub generation: u64,
    /// Applied seq of the key's shard.
    pub seq: Seq,
}

impl Lease {
    /// The opaque wire form.
    pub fn encode(self) -> u64 {
        (self.generation << SEQ_BITS) | (self.seq & SEQ_MASK)
    }
    /// From the wire form.
    pub fn decode(v: u64) -> Lease {
        Lease {
            generation: v >> SEQ_BITS,
            seq: v & SEQ_MASK,
        }
    }
}

#[derive(Debug)]
struct Filled {
    value: Bytes,
    lease: Seq,
    ttl: Option<Duration>,
}

/// Time to live per entry: the fill's own, else the store's default.
struct FillTtl(Duration);

impl moka::Expiry<Bytes, Arc<Filled>> for FillTtl {
    fn expire_after_create(
        &self,
        _: &Bytes,
        v: &Arc<Filled>,
        _: std::time::Instant,
    ) -> Option<Duration> {
        Some(v.ttl.unwrap_or(self.0))
    }
}

#[derive(Clone, Copy, Debug)]
struct Tomb {
    seq: Seq,
    version: Option<u64>,
}

#[derive(Debug, Default)]
struct ShardState {
    epoch: Epoch,
    applied: Seq,
    floor: Seq,
    prefix_tombs: Vec<(Bytes, Seq)>,
}

/// Why a fill was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FillRefused {
    /// An invalidation newer than the lease touched the key.
    #[error("an invalidation (seq {invalidated}) newer than the lease (seq {lease}) was applied to this key")]
    Stale {
        /// Seq of the invalidation.
        invalidated: Seq,
        /// Seq of the lease.
        lease: Seq,
    },
    /// The lease predates a flush.
    #[error("the lease predates a flush of this edge")]
    Flushed,
}

/// Counters of the store.
#[derive(Debug, Default)]
pub struct StoreCounters {
    /// Gets answered with a value.
    pub hits: AtomicU64,
    /// Gets answered with a miss.
    pub misses: AtomicU64,
    /// Fills refused.
    pub refused: AtomicU64,
    /// Invalidations applied.
    pub applied: AtomicU64,
    /// Invalidations dropped as older versions.
    pub dropped_old: AtomicU64,
}

/// The store.
pub struct Store {
    values: Cache<Bytes, Arc<Filled>>,
    tombs: Cache<Bytes, Tomb>,
    shards: Arc<Mutex<HashMap<ShardId, ShardState>>>,
    /// Serializes fills against invalidations so a check and its insert are atomic.
    gate: Mutex<()>,
    generation: AtomicU64,
    map: ShardMap,
    shard_count: u32,
    /// Counters.
    pub counters: StoreCounters,
}

impl Store {
    /// A store bounded to `capacity` bytes, with `ttl`, keeping up to `max_tombstones`.
    pub fn new(capacity: u64, ttl: Duration, max_tombstones: u64, shard_count: u32) -> Self {
        let values = Cache::builder()
            .max_capacity(capacity)
            .weigher(|k: &Bytes, v: &Arc<Filled>| {
                (k.len() + v.value.len() + 48).min(u32::MAX as usize) as u32
            })
            .expire_after(FillTtl(ttl))
            .support_invalidation_closures()
            .build();
        let shards: Arc<Mutex<HashMap<ShardId, ShardState>>> = Arc::default();
        let map = ShardMap::new(shard_count);
        let floor_shards = shards.clone();
        let floor_map = map.clone();
        let tombs = Cache::builder()
            .max_capacity(max_tombstones.max(1))
            .eviction_listener(move |k: Arc<Bytes>, t: Tomb, cause| {
                if cause == RemovalCause::Size || cause == RemovalCause::Expired {
                    // Forgetting a tombstone must not forget what it refused.
                    let shard = floor_map.shard_of(&k);
                    let mut s = lock(&floor_shards);
                    let st = s.entry(shard).or_default();
                    st.floor = st.floor.max(t.seq);
                }
            })
            .build();
        Store {
            values,
            tombs,
            shards,
            gate: Mutex::new(()),
            generation: AtomicU64::new(0),
            map,
            shard_count,
            counters: StoreCounters::default(),
        }
    }

    /// The shard of a key.
    pub fn shard_of(&self, key: &[u8]) -> ShardId {
        self.map.shard_of(key)
    }

    /// The lease a miss on `key` hands out now.
    pub fn lease(&self, key: &[u8]) -> Lease {
        let shard = self.shard_of(key);
        let applied = lock(&self.shards).get(&shard).map_or(0, |s| s.applied);
        Lease {
            generation: self.generation.load(Ordering::SeqCst),
            seq: applied,
        }
    }

    /// The cached value, if any.
    pub fn get(&self, key: &[u8]) -> Option<Bytes> {
        let v = self.values.get(key)?;
        Some(v.value.clone())
    }

    /// The lease seq a value was filled under (for tests and diagnostics).
    pub fn filled_at(&self, key: &[u8]) -> Option<Seq> {
        self.values.get(key).map(|v| v.lease)
    }

    /// Fill `key` with `value` under `lease` (None: the current lease).
    pub fn set(&self, key: Bytes, value: Bytes, lease: Option<Lease>) -> Result<(), FillRefused> {
        self.set_with_ttl(key, value, lease, None)
    }

    /// Like [`Store::set`], with a time to live for this value (None: the store's default).
    pub fn set_with_ttl(
        &self,
        key: Bytes,
        value: Bytes,
        lease: Option<Lease>,
        ttl: Option<Duration>,
    ) -> Result<(), FillRefused> {
        let _g = lock(&self.gate);
        let lease = lease.unwrap_or_else(|| self.lease(&key));
        if lease.generation != self.generation.load(Ordering::SeqCst) {
            self.counters.refused.fetch_add(1, Ordering::Relaxed);
            return Err(FillRefused::Flushed);
        }
        if let Some(newer) = self.newest_invalidation(&key).filter(|&s| s > lease.seq) {
            self.counters.refused.fetch_add(1, Ordering::Relaxed);
            return Err(FillRefused::Stale {
                invalidated: newer,
                lease: lease.seq,
            });
        }
        self.values.insert(
            key,
            Arc::new(Filled {
                value,
                lease: lease.seq,
                ttl,
            }),
        );
        Ok(())
    }

    /// The seq of the newest invalidation known to cover `key` (tombstone, prefix, floor).
    fn newest_invalidation(&self, key: &[u8]) -> Option<Seq> {
        let shard = self.shard_of(key);
        let mut newest = self.tombs.get(key).map(|t| t.seq);
        let shards = lock(&self.shards);
        if let Some(s) = shards.get(&shard) {
            if s.floor > 0 {
                newest = Some(newest.unwrap_or(0).max(s.floor));
            }
            for (p, seq) in &s.prefix_tombs {
                if key.starts_with(p) {
                    newest = Some(newest.unwrap_or(0).max(*seq));
                }
            }
        }
        newest
    }

    /// Remove a key (an explicit Delete).
    pub fn delete(&self, key: &[u8]) -> bool {
        self.values.remove(key).is_some()
    }

    /// Apply one invalidation of `shard`.
    pub fn apply(&self, shard: ShardId, e: &Invalidation) {
        let _g = lock(&self.gate);
        match e.kind {
            Kind::Key => {
                let prev = self.tombs.get(&e.key);
                if let (
                    Some(v),
                    Some(Tomb {
                        version: Some(tv), ..
                    }),
                ) = (e.source_version, prev)
                {
                    if v < tv {
                        // A late, older version: the newer one already did more.
                        self.counters.dropped_old.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                }
                self.values.invalidate(&e.key);
                let version = match (prev.and_then(|t| t.version), e.source_version) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    (a, b) => a.or(b),
                };
                let seq = prev.map_or(e.seq, |t| t.seq.max(e.seq));
                self.tombs.insert(e.key.clone(), Tomb { seq, version });
            }
            Kind::Prefix => {
                let p = e.key.clone();
                let _ = self
                    .values
                    .invalidate_entries_if(move |k, _| k.starts_with(&p));
                let mut shards = lock(&self.shards);
                let st = shards.entry(shard).or_default();
                st.prefix_tombs.push((e.key.clone(), e.seq));
                if st.prefix_tombs.len() > MAX_PREFIX_TOMBS {
                    let (_, seq) = st.prefix_tombs.remove(0);
                    st.floor = st.floor.max(seq);
                }
            }
            Kind::All => {
                self.invalidate_shard(shard);
                let mut shards = lock(&self.shards);
                let st = shards.entry(shard).or_default();
                st.floor = st.floor.max(e.seq);
                st.prefix_tombs.clear();
            }
        }
        self.counters.applied.fetch_add(1, Ordering::Relaxed);
    }

    fn invalidate_shard(&self, shard: ShardId) {
        if self.shard_count <= 1 {
            self.values.invalidate_all();
        } else {
            let map = self.map.clone();
            let _ = self
                .values
                .invalidate_entries_if(move |k, _| map.shard_of(k) == shard);
        }
    }

    /// Everything up to `seq` of `shard` in `epoch` is applied.
    pub fn set_applied(&self, shard: ShardId, epoch: Epoch, seq: Seq) {
        let mut shards = lock(&self.shards);
        let st = shards.entry(shard).or_default();
        st.epoch = epoch;
        st.applied = st.applied.max(seq);
    }

    /// Applied seq per shard.
    pub fn applied(&self) -> Vec<(ShardId, Epoch, Seq)> {
        let mut v: Vec<_> = lock(&self.shards)
            .iter()
            .map(|(&k, s)| (k, s.epoch, s.applied))
            .collect();
        v.sort();
        v
    }

    /// Drop everything `shard` may have made stale; continue after `hwm` in `epoch`.
    pub fn flush(&self, shard: ShardId, epoch: Epoch, hwm: Seq) {
        let _g = lock(&self.gate);
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.invalidate_shard(shard);
        let mut shards = lock(&self.shards);
        let st = shards.entry(shard).or_default();
        *st = ShardState {
            epoch,
            applied: hwm,
            floor: hwm,
            prefix_tombs: Vec::new(),
        };
    }

    /// Number of cached values (approximate).
    pub fn len(&self) -> u64 {
        self.values.run_pending_tasks();
        self.values.entry_count()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> Store {
        Store::new(1 << 20, Duration::from_secs(60), 1000, 1)
    }

    fn inv(key: &'static str, seq: Seq, version: Option<u64>) -> Invalidation {
        Invalidation {
            seq,
            source_version: version,
            ..Invalidation::key(key)
        }
    }

    #[test]
    fn stale_set_race_is_refused() {
        let s = store();
        let lease = s.lease(b"k"); // miss at seq 0
        s.apply(0, &inv("k", 5, None)); // the writer's invalidation lands
        s.set_applied(0, 1, 5);
        let r = s.set(
            Bytes::from_static(b"k"),
            Bytes::from_static(b"old"),
            Some(lease),
        );
        assert_eq!(
            r,
            Err(FillRefused::Stale {
                invalidated: 5,
                lease: 0
            })
        );
        assert_eq!(s.get(b"k"), None);
        // A fill under a lease taken after the invalidation is fine.
        let lease = s.lease(b"k");
        s.set(
            Bytes::from_static(b"k"),
            Bytes::from_static(b"new"),
            Some(lease),
        )
        .unwrap();
        assert_eq!(s.get(b"k"), Some(Bytes::from_static(b"new")));
        assert_eq!(s.filled_at(b"k"), Some(5));
    }

    #[test]
    fn older_versions_do_not_undo_newer_ones() {
        let s = store();
        s.apply(0, &inv("k", 1, Some(10)));
        s.set_applied(0, 1, 1);
        s.set(Bytes::from_static(b"k"), Bytes::from_static(b"v10"), None)
            .unwrap();
        s.apply(0, &inv("k", 2, Some(7))); // late, older
        assert_eq!(s.get(b"k"), Some(Bytes::from_static(b"v10")));
        assert_eq!(s.counters.dropped_old.load(Ordering::Relaxed), 1);
        s.apply(0, &inv("k", 3, Some(11)));
        assert_eq!(s.get(b"k"), None);
    }

    #[test]
    fn prefix_and_all_invalidate_and_refuse_older_fills() {
        let s = store();
        for k in ["user:1", "user:2", "item:1"] {
            s.set(Bytes::from(k), Bytes::from_static(b"v"), None)
                .unwrap();
        }
        let lease = s.lease(b"user:3");
        s.apply(
            0,
            &Invalidation {
                seq: 4,
                kind: Kind::Prefix,
                ..Invalidation::key("user:")
            },
        );
        assert_eq!(s.get(b"user:1"), None);
        assert_eq!(s.get(b"item:1"), Some(Bytes::from_static(b"v")));
        assert!(s
            .set(
                Bytes::from_static(b"user:3"),
                Bytes::from_static(b"x"),
                Some(lease)
            )
            .is_err());
        s.apply(
            0,
            &Invalidation {
                seq: 9,
                kind: Kind::All,
                ..Invalidation::key("")
            },
        );
        assert_eq!(s.get(b"item:1"), None);
        assert!(s
            .set(
                Bytes::from_static(b"item:1"),
                Bytes::from_static(b"x"),
                Some(lease)
            )
            .is_err());
    }

    #[test]
    fn evicted_tombstones_leave_a_floor() {
        let s = Store::new(1 << 20, Duration::from_secs(60), 10, 1);
        let lease = s.lease(b"k-0");
        for i in 0..500u64 {
            s.apply(
                0,
                &Invalidation {
                    seq: i + 1,
                    ..Invalidation::key(format!("k-{i}"))
                },
            );
        }
        s.tombs.run_pending_tasks();
        // Whether k-0's tombstone survived or folded into the floor, the old fill is refused.
        assert!(s
            .set(
                Bytes::from_static(b"k-0"),
                Bytes::from_static(b"v"),
                Some(lease)
            )
            .is_err());
    }

    #[test]
    fn a_fill_may_carry_its_own_ttl() {
        let s = store();
        s.set_with_ttl(
            Bytes::from_static(b"short"),
            Bytes::from_static(b"v"),
            None,
            Some(Duration::from_millis(30)),
        )
        .unwrap();
        s.set(Bytes::from_static(b"long"), Bytes::from_static(b"v"), None)
            .unwrap();
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(s.get(b"short"), None);
        assert!(s.get(b"long").is_some());
    }

    #[test]
    fn flush_empties_and_invalidates_old_leases() {
        let s = store();
        s.set(Bytes::from_static(b"a"), Bytes::from_static(b"1"), None)
            .unwrap();
        let lease = s.lease(b"b");
        s.flush(0, 2, 0);
        assert_eq!(s.get(b"a"), None);
        assert_eq!(
            s.set(
                Bytes::from_static(b"b"),
                Bytes::from_static(b"x"),
                Some(lease)
            ),
            Err(FillRefused::Flushed)
        );
        assert!(Lease::decode(lease.encode()) == lease);
    }
}
