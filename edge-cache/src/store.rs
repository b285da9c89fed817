//! The edge's store: cached values (quick_cache, bounded in bytes, with TTL) guarded by a
//! [`LeaseTable`]: every value remembers the lease it was filled under, and a fill is refused when
//! an invalidation newer than its lease touched the key. That closes the stale-set race (miss,
//! invalidation, late fill). The rule itself lives in `dci_proto::lease`, shared with the SDK's
//! near cache.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
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
    /// When it expires, in microseconds since the store began (8 bytes where an `Instant`
    /// takes 16: with the tags, a value's bookkeeping stays in the allocation size it had
    /// without them).
    expires: u64,
    /// Its tags, boxed: most values have none, and then take 8 bytes for them, not 24.
    tags: Option<Box<Tags>>,
}

#[derive(Debug)]
struct Tags(Vec<Bytes>);

impl Filled {
    fn tags(&self) -> &[Bytes] {
        self.tags.as_ref().map_or(&[], |t| &t.0)
    }
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
        (k.len() + v.value.len() + ENTRY_OVERHEAD + tags_weight(v.tags())) as u64
    }
}

/// Memory a value's tags take: their bytes and a `Bytes` each.
pub fn tags_weight(tags: &[Bytes]) -> usize {
    tags.iter().map(|t| t.len() + 32).sum()
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
    values: Arc<Values>,
    ttl: Duration,
    /// When it began: values' expiry counts from it.
    born: Instant,
    /// Held across a fill's check and insert, and an invalidation's record and removal, so the
    /// two never interleave.
    leases: Mutex<LeaseTable>,
    shard_count: u32,
    shards: dci_proto::ring::ShardMap,
    /// Prefix invalidations applied whose older values are not all removed yet.
    unswept: Arc<Unswept>,
    /// Counters.
    pub counters: StoreCounters,
}

/// Prefix invalidations applied whose values a pass over the store has not removed yet: until
/// it has, reads take a value one of them covers (filled under an older lease) for a miss. The
/// pass runs on a thread of its own, so the link that applied the prefixes goes on at once, and
/// it takes every prefix applied meanwhile in its next round: however many prefixes come, in
/// however many batches, it costs a pass over the values per round, not per prefix.
///
/// A shard's prefix invalidations cover the keys of that shard (each shard's seqs and leases are
/// its own; a prefix is published to every shard).
#[derive(Debug, Default)]
struct Unswept {
    /// By shard.
    prefixes: RwLock<Vec<Prefixes>>,
    /// How many: reads look at `prefixes` only when there are some.
    count: AtomicUsize,
    /// A pass is running.
    sweeping: AtomicBool,
}

impl Unswept {
    fn add(&self, shard: ShardId, more: &Prefixes) {
        let mut p = self.prefixes.write().unwrap_or_else(|e| e.into_inner());
        if p.len() <= shard as usize {
            p.resize_with(shard as usize + 1, Prefixes::default);
        }
        p[shard as usize].merge(more);
        self.count
            .store(p.iter().map(Prefixes::len).sum(), Ordering::Release);
    }

    /// The prefixes not swept yet, if any, held until dropped: a read looks at them before it
    /// reads a value and keeps them until it has, or a pass could remove the value and then
    /// forget its prefix in between, and the value read be served though stale.
    fn look(&self) -> Option<RwLockReadGuard<'_, Vec<Prefixes>>> {
        (self.count.load(Ordering::Acquire) > 0)
            .then(|| self.prefixes.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Remove from `values` what the prefixes cover, round after round until none is left.
    fn sweep(&self, values: &Values, shard_of: &dyn Fn(&[u8]) -> ShardId) {
        loop {
            let round = self
                .prefixes
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            if round.iter().all(Prefixes::is_empty) {
                self.sweeping.store(false, Ordering::Release);
                // One added after the look above found this pass running: take it now, unless
                // another pass has started for it.
                if self.count.load(Ordering::Acquire) == 0
                    || self.sweeping.swap(true, Ordering::AcqRel)
                {
                    return;
                }
                continue;
            }
            values.retain(|k, v| {
                !round
                    .get(shard_of(k) as usize)
                    .is_some_and(|p| p.covers(k, v.lease))
            });
            let mut p = self.prefixes.write().unwrap_or_else(|e| e.into_inner());
            for (p, done) in p.iter_mut().zip(&round) {
                p.remove_done(done);
            }
            self.count
                .store(p.iter().map(Prefixes::len).sum(), Ordering::Release);
        }
    }
}

/// The share of each part of the values' cache that new entries may take (quick_cache's own
/// default, set here since it bounds the largest entry, [`Store::largest_entry`]).
const HOT_ALLOCATION: f64 = 0.97;

impl Store {
    /// A store bounded to `capacity` bytes, with `ttl`, keeping up to `max_tombstones`, for
    /// entries of the default most bytes.
    pub fn new(capacity: u64, ttl: Duration, max_tombstones: u64, shard_count: u32) -> Self {
        let largest = crate::EdgeConfig::default().largest_entry();
        Self::holding(capacity, ttl, max_tombstones, shard_count, largest)
    }

    /// A store as [`Store::new`] makes one, for entries of up to `largest` bytes with their key
    /// and bookkeeping.
    pub fn holding(
        capacity: u64,
        ttl: Duration,
        max_tombstones: u64,
        shard_count: u32,
        largest: u64,
    ) -> Self {
        // The cache is split in parts (four per CPU by default), each bounded to its share of
        // the capacity, and an entry heavier than a part takes was not kept at all, yet its Set
        // answered as stored: on 16 CPUs, 4 MiB values in the default 256 MiB. Fewer parts,
        // until one holds the largest entry the edge takes (as far as the capacity allows).
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut parts = (cpus * 4).next_power_of_two() as u64;
        while parts > 1 && ((capacity / parts) as f64 * HOT_ALLOCATION) < largest as f64 {
            parts /= 2;
        }
        // Estimated items for the index; the bound that matters is the weight in bytes.
        let items = (capacity / 1024).clamp(1024, 1 << 20) as usize;
        let options = quick_cache::OptionsBuilder::new()
            .estimated_items_capacity(items)
            .weight_capacity(capacity)
            .shards(parts as usize)
            .hot_allocation(HOT_ALLOCATION)
            .build()
            .expect("a capacity and a number of parts");
        let values = Values::with_options(
            options,
            ByteWeight,
            foldhash::fast::RandomState::default(),
            Default::default(),
        );
        Store {
            values: Arc::new(values),
            unswept: Arc::default(),
            ttl,
            born: Instant::now(),
            leases: Mutex::new(LeaseTable::new(shard_count, max_tombstones as usize)),
            shard_count,
            shards: dci_proto::ring::ShardMap::new(shard_count),
            counters: StoreCounters::default(),
        }
    }

    /// Remember up to `max_tags` tag invalidations in all, shared out among the shards (1,024
    /// each at least).
    pub fn with_tag_tombstones(self, max_tags: u64) -> Self {
        lock(&self.leases).set_tag_room(LeaseTable::tag_share(max_tags as usize, self.shard_count));
        self
    }

    /// The heaviest entry (key, value and [`ENTRY_OVERHEAD`]) the store keeps: a heavier one
    /// would not be kept at all.
    pub fn largest_entry(&self) -> u64 {
        (self.values.shard_capacity() as f64 * HOT_ALLOCATION) as u64
    }

    /// The shard `key` belongs to.
    pub fn shard_of(&self, key: &[u8]) -> ShardId {
        if self.shard_count <= 1 {
            0
        } else {
            self.shards.shard_of(key)
        }
    }

    /// Tag invalidations forgotten for room so far (see [`LeaseTable::tags_forgotten`]).
    pub fn tags_forgotten(&self) -> u64 {
        lock(&self.leases).tags_forgotten()
    }

    /// Microseconds since the store began: the clock of its values' expiry.
    fn now_us(&self) -> u64 {
        self.born.elapsed().as_micros() as u64
    }

    /// The lease a miss on `key` hands out now.
    pub fn lease(&self, key: &[u8]) -> Lease {
        lock(&self.leases).lease(key)
    }

    fn live(&self, key: &[u8]) -> Option<Arc<Filled>> {
        let v = {
            let unswept = self.unswept.look();
            let v = self.values.get(key)?;
            let covered = unswept.is_some_and(|p| {
                p.get(self.shard_of(key) as usize)
                    .is_some_and(|p| p.covers(key, v.lease))
            });
            // Expired, or older than a prefix invalidation applied: dropped on the read that
            // notices.
            if v.expires <= self.now_us() || covered {
                self.values.remove_if(key, |x| Arc::ptr_eq(x, &v));
                return None;
            }
            v
        };
        // A tag invalidation leaves its values where they are: one is found stale when read.
        // (Apart from the prefixes' guard: an invalidation takes the leases, then that.)
        if v.tags.is_some() && lock(&self.leases).newest_tag(self.shard_of(key), v.tags()) > v.lease
        {
            self.values.remove_if(key, |x| Arc::ptr_eq(x, &v));
            return None;
        }
        Some(v)
    }

    /// How many prefix invalidations applied still have values to remove (0 once their passes
    /// are done; reads meanwhile take those values for misses).
    pub fn unswept(&self) -> usize {
        self.unswept.count.load(Ordering::Acquire)
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
        self.fill(key, value, lease, ttl, &[], None)
    }

    /// Like [`Store::set_with_ttl`], the value tagged `tags` (a tag invalidation of any of them
    /// removes it, and the fill is refused when one newer than the lease was applied) and read
    /// at `version` (refused when an invalidation of the key named a newer one: see
    /// [`LeaseTable::check_fill_with`](dci_proto::lease::LeaseTable::check_fill_with)).
    pub fn fill(
        &self,
        key: Bytes,
        value: Bytes,
        lease: Option<Lease>,
        ttl: Option<Duration>,
        tags: &[Bytes],
        version: Option<u64>,
    ) -> Result<(), FillRefused> {
        let leases = lock(&self.leases);
        let lease = lease.unwrap_or_else(|| leases.lease(&key));
        if let Err(e) = leases.check_fill_with(&key, tags, version, lease) {
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
                expires: self
                    .now_us()
                    .saturating_add(ttl.unwrap_or(self.ttl).as_micros() as u64),
                tags: (!tags.is_empty()).then(|| {
                    Box::new(Tags(
                        tags.iter().map(|t| Bytes::copy_from_slice(t)).collect(),
                    ))
                }),
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

    /// Apply a batch's invalidations of `shard`, in order, under one lock (its prefixes' values
    /// taken for misses at once and removed by a pass of their own: see `Unswept`).
    pub fn apply_all(&self, shard: ShardId, entries: &[Invalidation]) {
        self.apply_through(shard, entries, None);
    }

    /// [`Store::apply_all`], and everything of `shard` up to `last_seq` in `epoch` is applied,
    /// under the same lock: a miss in between would hand out a lease below a tombstone already
    /// recorded, and the fill it leads to (or a fill without a lease) would be refused although
    /// nothing was invalidated after it.
    pub fn apply_batch(
        &self,
        shard: ShardId,
        epoch: Epoch,
        entries: &[Invalidation],
        last_seq: Seq,
    ) {
        self.apply_through(shard, entries, Some((epoch, last_seq)));
    }

    fn apply_through(
        &self,
        shard: ShardId,
        entries: &[Invalidation],
        through: Option<(Epoch, Seq)>,
    ) {
        let mut leases = lock(&self.leases);
        let mut applied = 0;
        let mut prefixes = Prefixes::default();
        leases.apply_all(shard, entries, |e, effect| {
            if self.remove_for(e, effect, &mut prefixes) {
                applied += 1;
            }
        });
        if let Some((epoch, seq)) = through {
            leases.set_applied(shard, epoch, seq);
        }
        // The batch's prefixes are applied once reads take what they cover for misses; their
        // values go in a pass of their own (see `Unswept`). Their tombstones are recorded, so
        // a fill under a lease from before them is refused.
        if !prefixes.is_empty() {
            self.unswept.add(shard, &prefixes);
        }
        drop(leases);
        if !prefixes.is_empty() && !self.unswept.sweeping.swap(true, Ordering::AcqRel) {
            let (values, unswept) = (self.values.clone(), self.unswept.clone());
            let (count, map) = (self.shard_count, self.shards.clone());
            let shard_of = move |k: &[u8]| if count <= 1 { 0 } else { map.shard_of(k) };
            let spawned = std::thread::Builder::new()
                .name("dci-sweep".into())
                .spawn(move || unswept.sweep(&values, &shard_of));
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "no thread for a pass over the values: done here");
                self.unswept.sweep(&self.values, &|k| self.shard_of(k));
            }
        }
        self.counters.applied.fetch_add(applied, Ordering::Relaxed);
        self.counters
            .dropped_old
            .fetch_add(entries.len() as u64 - applied, Ordering::Relaxed);
    }

    /// Remove what an applied invalidation's `effect` says (a prefix: noted in `prefixes`, for
    /// the pass); false when it removes nothing.
    fn remove_for(&self, e: &Invalidation, effect: Effect, prefixes: &mut Prefixes) -> bool {
        match effect {
            Effect::Key => {
                self.values.remove(&e.key);
            }
            Effect::Prefix => prefixes.insert(e.key.clone(), e.seq),
            Effect::Shard(s) => self.invalidate_shard(s),
            // Found stale when read (see `live`).
            Effect::Tag => {}
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

    /// Refuse the fills of every lease handed out so far.
    pub fn void_leases(&self) {
        lock(&self.leases).void_leases();
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

    /// An invalidation of every key starting with `p`.
    fn prefix(p: impl Into<Bytes>, seq: Seq) -> Invalidation {
        Invalidation {
            seq,
            ..Invalidation::prefix(p)
        }
    }

    /// A tag invalidation takes every value filled with the tag before it for a miss (and
    /// removes it then), whatever its key; values without the tag stay, and a fill under a
    /// lease from before it, with the tag, is refused.
    #[test]
    fn a_tag_invalidation_takes_its_values_whatever_their_keys() {
        let s = store();
        let tagged = |tags: &[&'static str]| {
            tags.iter()
                .map(|t| Bytes::from_static(t.as_bytes()))
                .collect::<Vec<_>>()
        };
        let fill = |key: &'static str, tags: &[&'static str], lease: Option<Lease>| {
            s.fill(
                Bytes::from_static(key.as_bytes()),
                Bytes::from_static(b"v"),
                lease,
                None,
                &tagged(tags),
                None,
            )
        };
        fill("page:home", &["product:7", "product:8"], None).unwrap();
        fill("page:about", &["product:8"], None).unwrap();
        fill("product:7", &[], None).unwrap();
        let before = s.lease(b"page:deals");
        s.apply_batch(
            0,
            1,
            &[Invalidation {
                seq: 1,
                ..Invalidation::tag("product:7")
            }],
            1,
        );
        assert_eq!(s.get(b"page:home"), None, "tagged product:7");
        assert_eq!(s.get(b"page:about"), Some(Bytes::from_static(b"v")));
        assert_eq!(
            s.get(b"product:7"),
            Some(Bytes::from_static(b"v")),
            "a key named as the tag is not the tag"
        );
        assert_eq!(s.len(), 2, "removed on the read that found it stale");
        assert_eq!(
            fill("page:deals", &["product:7"], Some(before)),
            Err(FillRefused::Stale {
                invalidated: 1,
                lease: 0
            })
        );
        fill("page:deals", &["product:8"], Some(before)).unwrap();
        fill("page:home", &["product:7"], Some(s.lease(b"page:home"))).unwrap();
        assert_eq!(
            s.get(b"page:home"),
            Some(Bytes::from_static(b"v")),
            "filled after it"
        );
    }

    /// A value's bookkeeping takes no more with tags possible than it did before them: 56 bytes
    /// beside its Arc's counts, the allocation size class an edge of millions of values pays.
    #[test]
    fn a_values_bookkeeping_stays_in_its_size() {
        assert!(
            std::mem::size_of::<Filled>() <= 56,
            "{}",
            std::mem::size_of::<Filled>()
        );
    }

    /// Past the tag invalidations a store remembers, the oldest is forgotten and every tagged
    /// value filled before it is a miss; a store that remembers more keeps its values.
    #[test]
    fn tag_invalidations_beyond_those_remembered_take_every_older_tagged_value() {
        for (max_tags, kept) in [(1, false), (65_536, true)] {
            let s = store().with_tag_tombstones(max_tags);
            s.fill(
                Bytes::from_static(b"page"),
                Bytes::from_static(b"v"),
                None,
                None,
                &[Bytes::from_static(b"quiet")],
                None,
            )
            .unwrap();
            // A shard remembers 1,024 at least: one more forgets the first.
            let busy: Vec<Invalidation> = (1..=1025)
                .map(|seq| Invalidation {
                    seq,
                    ..Invalidation::tag(format!("busy:{seq}"))
                })
                .collect();
            s.apply_batch(0, 1, &busy, 1025);
            assert_eq!(s.get(b"page").is_some(), kept, "max {max_tags}");
            assert_eq!(s.tags_forgotten(), u64::from(!kept));
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

    /// A lease handed out while batches are applied covers every invalidation already recorded:
    /// fills under it (and fills without one) go in while nothing newer lands.
    #[test]
    fn a_lease_taken_while_batches_land_is_never_behind_them() {
        let s = Arc::new(store());
        let (stop, refused) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
        );
        let filler = {
            let (s, stop, refused) = (s.clone(), stop.clone(), refused.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let fill = s.set(Bytes::from_static(b"k"), Bytes::from_static(b"v"), None);
                    if fill.is_err() {
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        };
        for seq in 1..=200_000 {
            // Other keys between: the batch's last seq is past the key's tombstone.
            let entries = [inv("k", seq * 2 - 1, None), inv("j", seq * 2, None)];
            s.apply_batch(0, 1, &entries, seq * 2);
        }
        stop.store(true, Ordering::Relaxed);
        filler.join().unwrap();
        assert_eq!(
            refused.load(Ordering::Relaxed),
            0,
            "fills without a lease refused"
        );
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
            s.apply_all(0, &[prefix("p:", seq)]);
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

    /// Prefix invalidations in batches of their own, one after the other: each is applied at
    /// once (reads miss its keys), their values go in passes that take every prefix come
    /// meanwhile, and a value filled after a prefix's invalidation stays.
    #[test]
    fn prefixes_in_many_batches_are_swept_in_rounds_and_spare_later_fills() {
        let s = Store::new(256 << 20, Duration::from_secs(60), 1000, 1);
        for i in 0..20_000 {
            let key = Bytes::from(format!("t{}:{i}", i % 100));
            s.set(key, Bytes::from_static(b"v"), None).unwrap();
        }
        for t in 0..50u64 {
            s.apply_all(0, &[prefix(format!("t{t}:"), t + 1)]);
            s.set_applied(0, 1, t + 1);
        }
        assert_eq!((s.get(b"t0:0"), s.get(b"t49:49")), (None, None));
        assert!(s.get(b"t50:50").is_some());
        let lease = s.lease(b"t7:new");
        s.set(
            Bytes::from_static(b"t7:new"),
            Bytes::from_static(b"v"),
            Some(lease),
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while s.unswept() > 0 {
            assert!(
                Instant::now() < deadline,
                "{} prefixes never swept",
                s.unswept()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(s.len(), 10_000 + 1, "the other half, and the later fill");
        assert!(s.get(b"t7:new").is_some());
    }

    /// Each shard has seqs of its own: a prefix invalidation of one shard covers that shard's
    /// keys, whatever the other shard's leases say (the prefix reaches every shard).
    #[test]
    fn a_shards_prefix_covers_its_own_keys() {
        let s = Store::new(1 << 20, Duration::from_secs(60), 1000, 2);
        let key_of = |shard: ShardId| {
            (0..)
                .map(|i| format!("p:{i}"))
                .find(|k| s.shard_of(k.as_bytes()) == shard)
                .unwrap()
        };
        let (k0, k1) = (key_of(0), key_of(1));
        s.set_applied(1, 1, 500); // shard 1 far ahead: its leases are 500
        for k in [&k0, &k1] {
            s.set(Bytes::from(k.clone()), Bytes::from_static(b"v"), None)
                .unwrap();
        }
        s.apply_all(0, &[prefix("p:", 10)]);
        assert_eq!(s.get(k0.as_bytes()), None);
        assert!(
            s.get(k1.as_bytes()).is_some(),
            "shard 0's seq 10 says nothing of shard 1"
        );
        s.apply_all(1, &[prefix("p:", 501)]);
        assert_eq!(s.get(k1.as_bytes()), None);
    }

    #[test]
    fn prefix_and_all_invalidate_and_refuse_older_fills() {
        let s = store();
        for k in ["user:1", "user:2", "item:1"] {
            s.set(Bytes::from(k), Bytes::from_static(b"v"), None)
                .unwrap();
        }
        let lease = s.lease(b"user:3");
        s.apply(0, &prefix("user:", 4));
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
