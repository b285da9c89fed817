//! The edge's store: cached values (quick_cache, bounded in bytes, with TTL) guarded by a
//! [`LeaseTable`]: every value remembers the lease it was filled under, and a fill is refused when
//! an invalidation newer than its lease touched the key. That closes the stale-set race (miss,
//! invalidation, late fill). The rule itself lives in `dci_proto::lease`, shared with the SDK's
//! near cache.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dci_proto::lease::{Effect, LeaseTable, Prefixes};
use dci_proto::upstream::lock;
use dci_proto::{Epoch, Invalidation, Seq, ShardId};
use quick_cache::sync::Cache;
use quick_cache::Weighter;

pub use dci_proto::lease::{FillRefused, Lease};

#[derive(Debug)]
struct Filled {
    value: Bytes,
    lease: Seq,
    expires: Instant,
}

/// Weight of an entry: its key and value bytes plus bookkeeping.
#[derive(Clone, Copy)]
struct ByteWeight;

/// Memory an entry takes beyond its key and value bytes: the cache's slot, the `Filled` and the
/// allocator's share of three allocations. Measured as an edge process's growth per entry, less
/// the entry's bytes: 197–202 bytes for values of 10 and 100 bytes.
pub const ENTRY_OVERHEAD: usize = 192;

impl Weighter<Bytes, Arc<Filled>> for ByteWeight {
    fn weight(&self, k: &Bytes, v: &Arc<Filled>) -> u64 {
        (k.len() + v.value.len() + ENTRY_OVERHEAD) as u64
    }
}

type Values = Cache<Bytes, Arc<Filled>, ByteWeight, foldhash::fast::RandomState>;

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
    values: Values,
    ttl: Duration,
    /// Held across a fill's check and insert, and an invalidation's record and removal, so the
    /// two never interleave.
    leases: Mutex<LeaseTable>,
    shard_count: u32,
    shards: dci_proto::ring::ShardMap,
    /// Counters.
    pub counters: StoreCounters,
}

impl Store {
    /// A store bounded to `capacity` bytes, with `ttl`, keeping up to `max_tombstones`.
    pub fn new(capacity: u64, ttl: Duration, max_tombstones: u64, shard_count: u32) -> Self {
        // Estimated items for the index; the bound that matters is the weight in bytes.
        let items = (capacity / 1024).clamp(1024, 1 << 20) as usize;
        let values = Values::with(
            items,
            capacity,
            ByteWeight,
            foldhash::fast::RandomState::default(),
            Default::default(),
        );
        Store {
            values,
            ttl,
            leases: Mutex::new(LeaseTable::new(shard_count, max_tombstones as usize)),
            shard_count,
            shards: dci_proto::ring::ShardMap::new(shard_count),
            counters: StoreCounters::default(),
        }
    }

    /// The shard `key` belongs to.
    pub fn shard_of(&self, key: &[u8]) -> ShardId {
        if self.shard_count <= 1 {
            0
        } else {
            self.shards.shard_of(key)
        }
    }

    /// The lease a miss on `key` hands out now.
    pub fn lease(&self, key: &[u8]) -> Lease {
        lock(&self.leases).lease(key)
    }

    fn live(&self, key: &[u8]) -> Option<Arc<Filled>> {
        let v = self.values.get(key)?;
        if v.expires <= Instant::now() {
            // Expired: dropped on the read that notices.
            self.values.remove_if(key, |x| Arc::ptr_eq(x, &v));
            return None;
        }
        Some(v)
    }

    /// The cached value, if any.
    pub fn get(&self, key: &[u8]) -> Option<Bytes> {
        self.live(key).map(|v| v.value.clone())
    }

    /// The lease seq a value was filled under (for tests and diagnostics).
    pub fn filled_at(&self, key: &[u8]) -> Option<Seq> {
        self.live(key).map(|v| v.lease)
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
        let leases = lock(&self.leases);
        let lease = lease.unwrap_or_else(|| leases.lease(&key));
        if let Err(e) = leases.check_fill(&key, lease) {
            self.counters.refused.fetch_add(1, Ordering::Relaxed);
            return Err(e);
        }
        // Copies of their own: a key or value decoded from a request is a slice of the
        // request's buffer (8 KiB or more, or a whole SetMany), which it would keep alive for as
        // long as it stays here, many times the bytes the capacity counts.
        self.values.insert(
            Bytes::copy_from_slice(&key),
            Arc::new(Filled {
                value: Bytes::copy_from_slice(&value),
                lease: lease.seq,
                expires: Instant::now() + ttl.unwrap_or(self.ttl),
            }),
        );
        Ok(())
    }

    /// Remove a key (an explicit Delete, or a quarantined entry's key).
    pub fn delete(&self, key: &[u8]) -> bool {
        self.values.remove(key).is_some()
    }

    /// Apply one invalidation of `shard`.
    pub fn apply(&self, shard: ShardId, e: &Invalidation) {
        self.apply_all(shard, std::slice::from_ref(e));
    }

    /// Apply a batch's invalidations of `shard`, in order, under one lock (its prefixes' keys
    /// removed after it).
    pub fn apply_all(&self, shard: ShardId, entries: &[Invalidation]) {
        let mut leases = lock(&self.leases);
        let mut applied = 0;
        let mut prefixes = Prefixes::default();
        leases.apply_all(shard, entries, |e, effect| {
            if self.remove_for(e, effect, &mut prefixes) {
                applied += 1;
            }
        });
        // The batch's prefixes go in one pass at its end (removals commute), and outside the
        // lock, so that misses and fills need not wait for a pass over every value: their
        // tombstones are recorded, so a fill under a lease from before them is refused, and
        // one that comes in between under a later lease loses its value to the pass at most
        // (a miss more). Nothing is applied before the pass ends: the caller says so after.
        drop(leases);
        if !prefixes.is_empty() {
            self.values.retain(|k, _| !prefixes.matches(k));
        }
        self.counters.applied.fetch_add(applied, Ordering::Relaxed);
        self.counters
            .dropped_old
            .fetch_add(entries.len() as u64 - applied, Ordering::Relaxed);
    }

    /// Remove what an applied invalidation's `effect` says (a prefix's keys: once `prefixes`
    /// has them all); false when it removes nothing.
    fn remove_for(&self, e: &Invalidation, effect: Effect, prefixes: &mut Prefixes) -> bool {
        match effect {
            Effect::Key => {
                self.values.remove(&e.key);
            }
            Effect::Prefix => prefixes.insert(e.key.clone()),
            Effect::Shard(s) => self.invalidate_shard(s),
            Effect::Nothing => return false,
        }
        true
    }

    fn invalidate_shard(&self, shard: ShardId) {
        if self.shard_count <= 1 {
            self.values.clear();
        } else {
            self.values.retain(|k, _| self.shards.shard_of(k) != shard);
        }
    }

    /// Everything up to `seq` of `shard` in `epoch` is applied.
    pub fn set_applied(&self, shard: ShardId, epoch: Epoch, seq: Seq) {
        lock(&self.leases).set_applied(shard, epoch, seq);
    }

    /// (shard, epoch, applied) per shard.
    pub fn applied(&self) -> Vec<(ShardId, Epoch, Seq)> {
        lock(&self.leases).applied()
    }

    /// Drop everything `shard` may have made stale; continue after `hwm` in `epoch`.
    pub fn flush(&self, shard: ShardId, epoch: Epoch, hwm: Seq) {
        let mut leases = lock(&self.leases);
        self.invalidate_shard(shard);
        leases.flush(shard, epoch, hwm);
    }

    /// Keep only the values of keys `keep` takes.
    pub fn retain_keys(&self, keep: impl Fn(&[u8]) -> bool) {
        self.values.retain(|k, _| keep(k));
    }

    /// Number of cached values (approximate).
    pub fn len(&self) -> u64 {
        self.values.len() as u64
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dci_proto::Kind;

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

    /// A batch's prefixes, among its keys, each remove what they would one by one (they go in
    /// one pass), and fills under leases from before them are refused.
    #[test]
    fn a_batch_of_prefixes_and_keys_removes_each_ones_keys() {
        let s = store();
        let keys = ["t1:a", "t1:b", "t2:a", "t22:a", "t3:a", "u:1", "u:2", "v:1"];
        for k in keys {
            s.set(Bytes::from(k), Bytes::from_static(b"v"), None)
                .unwrap();
        }
        let lease = s.lease(b"t1:c");
        let prefix = |p: &'static str, seq| Invalidation {
            seq,
            kind: Kind::Prefix,
            ..Invalidation::key(p)
        };
        s.apply_all(
            0,
            &[
                prefix("t1:", 1),
                inv("u:1", 2, None),
                prefix("t2", 3),
                prefix("w:", 4),
            ],
        );
        let left: Vec<&str> = keys
            .into_iter()
            .filter(|k| s.get(k.as_bytes()).is_some())
            .collect();
        assert_eq!(left, ["t3:a", "u:2", "v:1"]);
        assert_eq!(s.counters.applied.load(Ordering::Relaxed), 4);
        assert!(s
            .set(
                Bytes::from_static(b"t1:c"),
                Bytes::from_static(b"x"),
                Some(lease)
            )
            .is_err());
    }

    /// Fills racing prefix invalidations (whose pass over the values runs outside the lock):
    /// once one is applied, no value of its keys filled under an older lease is left.
    #[test]
    fn a_fill_racing_a_prefix_pass_never_outlives_it() {
        let s = Arc::new(Store::new(64 << 20, Duration::from_secs(60), 1000, 1));
        let keys: Vec<String> = (0..2_000).map(|i| format!("p:{i}")).collect();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let filler = {
            let (s, keys, stop) = (s.clone(), keys.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    for k in &keys {
                        let lease = s.lease(k.as_bytes());
                        let _ = s.set(
                            Bytes::from(k.clone()),
                            Bytes::from_static(b"v"),
                            Some(lease),
                        );
                    }
                }
            })
        };
        for seq in 1..=300 {
            s.apply_all(
                0,
                &[Invalidation {
                    seq,
                    kind: Kind::Prefix,
                    ..Invalidation::key("p:")
                }],
            );
            s.set_applied(0, 1, seq);
            for k in &keys {
                if let Some(at) = s.filled_at(k.as_bytes()) {
                    assert!(
                        at >= seq,
                        "{k} filled under seq {at}, after the prefix at {seq}"
                    );
                }
            }
        }
        stop.store(true, Ordering::Relaxed);
        filler.join().unwrap();
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
