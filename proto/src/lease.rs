//! Leases, tombstones and floors: the pure rule that closes the stale-set race.
//!
//! A reader that misses gets a [`Lease`]: the store's flush generation and the applied seq of the
//! key's shard. A fill under that lease is refused when an invalidation newer than the lease has
//! been applied to the key (a tombstone), to a prefix of it, to its whole shard, or when old
//! prefix tombstones that were forgotten might have (the floor). A flush (Reset) bumps the generation,
//! so every lease taken before it is refused, whatever the seqs of a new epoch.
//!
//! [`LeaseTable`] says what an invalidation removes ([`Effect`]) and whether a fill may proceed;
//! the edge store and the SDK's near cache carry the values themselves.
//!
//! Tombstones live in a direct-mapped table per shard: a key's slot is chosen by a hash of it
//! (randomly seeded per process), and a slot keeps the highest seq of every invalidation that ever
//! landed in it, whichever key it was for. A fill is checked against its key's slot, so a key
//! sharing a slot with a recently invalidated one may be refused (more misses, never a stale
//! value), and nothing needs evicting: one random memory access per invalidation, with no floor
//! rising under load. The slot also remembers its latest key (by a second, independent 64-bit
//! hash) and that key's newest `source_version`, so an older version arriving late for the same
//! key is skipped; when unsure, the invalidation is applied, which is always safe.

use std::collections::VecDeque;

use bytes::Bytes;

use crate::ring::ShardMap;
use crate::types::{Epoch, Invalidation, Kind, Seq, ShardId};

const SEQ_BITS: u32 = 48;
const SEQ_MASK: u64 = (1 << SEQ_BITS) - 1;
/// A generation is what fits above the seq in a lease's wire form.
const GENERATION_MASK: u64 = u64::MAX >> SEQ_BITS;
const MAX_PREFIX_TOMBS: usize = 4096;
/// Tag invalidations a cache remembers by default, all its shards' together (each shard a
/// share, 1,024 at least): past it, the oldest is forgotten and every tagged value filled before
/// it goes.
pub const MAX_TAG_TOMBS: usize = 65_536;

/// A lease: the flush generation and the key's shard's applied seq at the time of a miss.
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

/// Why a fill was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FillRefused {
    /// An invalidation newer than the lease touched the key.
    #[error("an invalidation (seq {invalidated}) newer than the lease (seq {lease}) was applied to this key")]
    Stale {
        /// Seq of the invalidation (or floor).
        invalidated: Seq,
        /// Seq of the lease.
        lease: Seq,
    },
    /// The lease predates a flush.
    #[error("the lease predates a flush of this cache")]
    Flushed,
    /// The value was read at a version older than one an applied invalidation of the key named.
    #[error("the value's version {filled} is older than version {invalidated}, which an applied invalidation of this key named")]
    OlderVersion {
        /// The fill's version.
        filled: u64,
        /// The newest version of the key's invalidations.
        invalidated: u64,
    },
}

/// What the cache must remove for an applied invalidation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// The invalidation's key.
    Key,
    /// Every key starting with the invalidation's key.
    Prefix,
    /// Every key of this shard.
    Shard(ShardId),
    /// The values filled with the invalidation's tag before it (every tagged value, for an
    /// empty tag): found stale when read ([`LeaseTable::newest_tag`]), not looked for now.
    Tag,
    /// Nothing: an older version arrived after a newer one.
    Nothing,
}

/// Prefix invalidations whose keys a cache removes in one pass over what it holds, however
/// many: a pass per prefix costs a store of half a million values about 30 ms each, so a batch
/// of a hundred (a tenant-wide purge) would stall it for seconds. Each prefix keeps the seq of
/// its latest invalidation; whether a key starts with one of them costs a lookup per distinct
/// prefix length.
#[derive(Debug, Default, Clone)]
pub struct Prefixes {
    seqs: std::collections::HashMap<Bytes, Seq, foldhash::fast::RandomState>,
    /// The lengths of the prefixes, ascending, each once (some perhaps no longer used).
    lens: Vec<usize>,
}

impl Prefixes {
    /// The keys starting with `prefix` are invalidated at `seq` too.
    pub fn insert(&mut self, prefix: Bytes, seq: Seq) {
        if let Err(at) = self.lens.binary_search(&prefix.len()) {
            self.lens.insert(at, prefix.len());
        }
        let s = self.seqs.entry(prefix).or_insert(seq);
        *s = (*s).max(seq);
    }

    /// No prefix.
    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }

    /// How many prefixes.
    pub fn len(&self) -> usize {
        self.seqs.len()
    }

    /// The newest invalidation of a prefix `key` starts with, if any.
    pub fn newest(&self, key: &[u8]) -> Option<Seq> {
        self.lens
            .iter()
            .take_while(|&&l| l <= key.len())
            .filter_map(|&l| self.seqs.get(&key[..l]).copied())
            .max()
    }

    /// Whether `key` starts with one of the prefixes.
    pub fn matches(&self, key: &[u8]) -> bool {
        self.newest(key).is_some()
    }

    /// Whether a value of `key` filled under `lease` predates one of the prefixes' invalidations
    /// (one filled under a later lease was read after it, and is fresh).
    pub fn covers(&self, key: &[u8], lease: Seq) -> bool {
        self.newest(key).is_some_and(|seq| seq > lease)
    }

    /// Take in `other`'s prefixes too.
    pub fn merge(&mut self, other: &Prefixes) {
        for (p, &seq) in &other.seqs {
            self.insert(p.clone(), seq);
        }
    }

    /// Forget the prefixes of `done` whose seq is still the one `done` has (one invalidated
    /// again since stays).
    pub fn remove_done(&mut self, done: &Prefixes) {
        for (p, &seq) in &done.seqs {
            self.remove_at(p, seq);
        }
    }

    /// Forget `prefix` if its newest invalidation is still at `seq`.
    pub fn remove_at(&mut self, prefix: &[u8], seq: Seq) {
        if self.seqs.get(prefix) == Some(&seq) {
            self.seqs.remove(prefix);
        }
        if self.seqs.is_empty() {
            self.lens.clear();
        }
    }
}

/// One slot of the tombstone table: a cache line holds two.
#[derive(Clone, Copy, Debug, Default)]
#[repr(align(32))]
struct Slot {
    /// Highest seq of any invalidation that landed here (0: none).
    seq: Seq,
    /// Second hash of the latest key that landed here.
    id: u64,
    /// That key's newest writer version; [`NO_VERSION`] when none.
    version: u64,
}

const NO_VERSION: u64 = u64::MAX;

fn version_of(v: Option<u64>) -> u64 {
    v.unwrap_or(NO_VERSION)
}

/// The higher of two versions, where a missing version loses to any present one.
fn max_version(a: u64, b: u64) -> u64 {
    match (a, b) {
        (NO_VERSION, x) | (x, NO_VERSION) => x,
        (a, b) => a.max(b),
    }
}

#[derive(Debug, Default)]
struct ShardLeases {
    shard: ShardId,
    epoch: Epoch,
    applied: Seq,
    floor: Seq,
    /// In the order they came, for the oldest to go first.
    prefix_tombs: VecDeque<(Bytes, Seq)>,
    /// The same, for a fill's check: a lookup per prefix length, not a comparison per prefix.
    prefix_index: Prefixes,
    /// Allocated on the shard's first key invalidation: an edge only pays for shards it hears of.
    slots: Vec<Slot>,
    occupied: usize,
    /// The newest invalidation of each tag remembered, and the highest version one named.
    tag_tombs: std::collections::HashMap<Bytes, TagTomb, foldhash::fast::RandomState>,
    /// The same, in the order they came, for the oldest to go first.
    tag_order: VecDeque<(Bytes, Seq)>,
    /// A tagged value filled under a lease below this is stale: a tag invalidation forgotten
    /// for room, or a poisoned one, may have covered it.
    tag_floor: Seq,
    /// The highest version of the tag invalidations forgotten ([`NO_VERSION`]: none): a
    /// tagged fill read at an older one is refused, as one of them may have covered it.
    tag_version_floor: u64,
}

/// What a cache remembers of a tag's invalidations.
#[derive(Debug, Clone, Copy)]
struct TagTomb {
    /// The newest one's seq.
    seq: Seq,
    /// The highest version any named ([`NO_VERSION`]: none).
    version: u64,
}

/// Most tombstone slots of one cache, all its shards' together (32 bytes each: 512 MiB).
pub const MAX_TOMBSTONES: usize = 1 << 24;

/// Bytes of one tombstone slot: a cache's table of a shard takes this times its slots.
pub const SLOT_BYTES: usize = std::mem::size_of::<Slot>();

/// Tombstones and floors of one cache.
#[derive(Debug)]
pub struct LeaseTable {
    map: ShardMap,
    shards: Vec<ShardLeases>,
    /// Slots per shard, a power of two (see [`LeaseTable::new`]).
    slots: usize,
    /// Tag invalidations remembered per shard.
    tags_per_shard: usize,
    /// Tag invalidations forgotten for room so far (each raised its shard's tag floor).
    tags_forgotten: u64,
    generation: u64,
    hash: foldhash::fast::FixedState,
    id: foldhash::fast::FixedState,
}

impl LeaseTable {
    /// A table of at most `max_tombs` tombstone slots in all, shared out among the shards
    /// (each shard's share a power of two, rounded down; one slot at least). A shard takes as
    /// many invalidations as its share of the keys, so a key's chance of sharing a slot with a
    /// newer invalidation does not depend on how many shards the tier has; a table per shard of
    /// the whole size would have made a cache of a 64-shard tier take 64 times the memory.
    pub fn new(shard_count: u32, max_tombs: usize) -> Self {
        use std::hash::BuildHasher;
        let seed = foldhash::fast::RandomState::default().hash_one(0u64);
        Self::with_seed(shard_count, max_tombs, seed)
    }

    /// Like [`LeaseTable::new`], with the hashes seeded by `seed` (reproducible slot choices).
    pub fn with_seed(shard_count: u32, max_tombs: usize, seed: u64) -> Self {
        LeaseTable {
            map: ShardMap::new(shard_count),
            shards: Vec::new(),
            slots: {
                let share = max_tombs.clamp(1, MAX_TOMBSTONES) / shard_count.max(1) as usize;
                1 << share.max(1).ilog2()
            },
            tags_per_shard: Self::tag_share(MAX_TAG_TOMBS, shard_count),
            tags_forgotten: 0,
            // Not 0: a cache started again (a restarted edge, a replacement at the same address)
            // would otherwise count its generations as its earlier life did, and could take a
            // lease that life handed out.
            generation: seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> SEQ_BITS,
            hash: foldhash::fast::FixedState::with_seed(seed),
            id: foldhash::fast::FixedState::with_seed(seed ^ 0x9e37_79b9_7f4a_7c15),
        }
    }

    /// Remember at most `room` tag invalidations per shard (from the next one on).
    pub fn set_tag_room(&mut self, room: usize) {
        self.tags_per_shard = room.max(1);
    }

    /// The tag invalidations a shard's share of `max_tags` in all is, for `shard_count` shards.
    pub fn tag_share(max_tags: usize, shard_count: u32) -> usize {
        (max_tags / shard_count.max(1) as usize).max(1024)
    }

    /// Slot index and identity of a key.
    fn hashes(&self, key: &[u8]) -> (usize, u64) {
        use std::hash::BuildHasher;
        let slot = self.hash.hash_one(key) as usize & (self.slots - 1);
        (slot, self.id.hash_one(key) | 1)
    }

    fn shard(&self, shard: ShardId) -> Option<&ShardLeases> {
        self.shards.iter().find(|s| s.shard == shard)
    }

    fn shard_mut(&mut self, shard: ShardId) -> &mut ShardLeases {
        match self.shards.iter().position(|s| s.shard == shard) {
            Some(i) => &mut self.shards[i],
            None => {
                self.shards.push(ShardLeases {
                    shard,
                    ..ShardLeases::default()
                });
                self.shards.last_mut().expect("just pushed")
            }
        }
    }

    /// The shard of a key.
    pub fn shard_of(&self, key: &[u8]) -> ShardId {
        self.map.shard_of(key)
    }

    /// The lease a miss on `key` hands out now.
    pub fn lease(&self, key: &[u8]) -> Lease {
        let applied = self.shard(self.shard_of(key)).map_or(0, |s| s.applied);
        Lease {
            generation: self.generation,
            seq: applied,
        }
    }

    /// May `key` be filled under `lease`?
    pub fn check_fill(&self, key: &[u8], lease: Lease) -> Result<(), FillRefused> {
        if lease.generation != self.generation {
            return Err(FillRefused::Flushed);
        }
        // The slot's seq counts whichever key put it there: refusing more is safe.
        let (slot, _) = self.hashes(key);
        let mut newest = 0;
        if let Some(s) = self.shard(self.shard_of(key)) {
            newest = s.slots.get(slot).map_or(0, |t| t.seq).max(s.floor);
            newest = newest.max(s.prefix_index.newest(key).unwrap_or(0));
        }
        if newest > lease.seq {
            return Err(FillRefused::Stale {
                invalidated: newest,
                lease: lease.seq,
            });
        }
        Ok(())
    }

    /// May `key`, tagged `tags` and read at `version`, be filled under `lease`? As
    /// [`LeaseTable::check_fill`]; and no invalidation of one of its tags is newer than the
    /// lease; and, with a version, the key's newest invalidation remembered names none newer
    /// (a value read from a replica behind the write, under a lease taken after the
    /// invalidation, passes the lease but not this).
    pub fn check_fill_with(
        &self,
        key: &[u8],
        tags: &[Bytes],
        version: Option<u64>,
        lease: Lease,
    ) -> Result<(), FillRefused> {
        self.check_fill(key, lease)?;
        if let Some(filled) = version {
            let shard = self.shard_of(key);
            let newest = [
                self.newest_version(key),
                self.newest_tag_version(shard, tags),
            ];
            if let Some(invalidated) = newest.into_iter().flatten().filter(|&v| filled < v).max() {
                return Err(FillRefused::OlderVersion {
                    filled,
                    invalidated,
                });
            }
        }
        let newest = self.newest_tag(self.shard_of(key), tags);
        if newest > lease.seq {
            return Err(FillRefused::Stale {
                invalidated: newest,
                lease: lease.seq,
            });
        }
        Ok(())
    }

    /// The newest `source_version` of `key`'s invalidations, while its slot still remembers the
    /// key (another key invalidated since in the same slot, or a flush, forgets it).
    pub fn newest_version(&self, key: &[u8]) -> Option<u64> {
        let (slot, id) = self.hashes(key);
        let t = self.shard(self.shard_of(key))?.slots.get(slot)?;
        (t.id == id && t.version != NO_VERSION).then_some(t.version)
    }

    /// The newest invalidation in `shard` that may have covered a value tagged `tags` (0 when
    /// it has none): such a value filled under a lease below it is stale.
    pub fn newest_tag(&self, shard: ShardId, tags: &[Bytes]) -> Seq {
        if tags.is_empty() {
            return 0;
        }
        self.shard(shard).map_or(0, |s| {
            tags.iter()
                .filter_map(|t| s.tag_tombs.get(t).map(|t| t.seq))
                .fold(s.tag_floor, Seq::max)
        })
    }

    /// The highest version named by an invalidation in `shard` that may have covered a value
    /// tagged `tags`, if any named one: a value of them read at an older version is stale
    /// (versions that are log positions, comparable across rows, as tags need).
    pub fn newest_tag_version(&self, shard: ShardId, tags: &[Bytes]) -> Option<u64> {
        if tags.is_empty() {
            return None;
        }
        let s = self.shard(shard)?;
        let newest = tags
            .iter()
            .filter_map(|t| s.tag_tombs.get(t).map(|t| t.version))
            .fold(s.tag_version_floor, max_version);
        (newest != NO_VERSION && newest > 0).then_some(newest)
    }

    /// Is `shard` one this table maps keys to? Of any other, no lease is ever handed out or
    /// checked: its invalidations still remove what they name, but leave no bookkeeping (a
    /// sender naming many such shards would otherwise have a tombstone table allocated for each).
    fn keeps(&self, shard: ShardId) -> bool {
        shard < self.map.count()
    }

    /// Record an applied invalidation of `shard`; returns what the cache must remove.
    pub fn apply(&mut self, shard: ShardId, e: &Invalidation) -> Effect {
        if !self.keeps(shard) {
            return match e.kind {
                Kind::Key => Effect::Key,
                Kind::Prefix => Effect::Prefix,
                Kind::All => Effect::Shard(shard),
                Kind::Tag => Effect::Tag,
            };
        }
        match e.kind {
            Kind::Key => {
                let at = self.hashes(&e.key);
                let slots = self.slots;
                apply_key(self.shard_mut(shard), slots, e, at)
            }
            Kind::Prefix => {
                let st = self.shard_mut(shard);
                // A copy: the key is a slice of the whole batch's buffer.
                let prefix = Bytes::copy_from_slice(&e.key);
                st.prefix_index.insert(prefix.clone(), e.seq);
                st.prefix_tombs.push_back((prefix, e.seq));
                if st.prefix_tombs.len() > MAX_PREFIX_TOMBS {
                    if let Some((p, seq)) = st.prefix_tombs.pop_front() {
                        st.floor = st.floor.max(seq);
                        st.prefix_index.remove_at(&p, seq);
                    }
                }
                Effect::Prefix
            }
            Kind::All => {
                let st = self.shard_mut(shard);
                st.floor = st.floor.max(e.seq);
                st.prefix_tombs.clear();
                st.prefix_index = Prefixes::default();
                // Every value of the shard goes now, and the floor refuses older fills.
                for t in st.tag_tombs.values() {
                    st.tag_version_floor = max_version(st.tag_version_floor, t.version);
                }
                st.tag_tombs.clear();
                st.tag_order.clear();
                Effect::Shard(shard)
            }
            Kind::Tag => {
                let room = self.tags_per_shard;
                let mut forgotten = 0;
                let st = self.shard_mut(shard);
                if e.key.is_empty() {
                    st.tag_floor = st.tag_floor.max(e.seq);
                    return Effect::Tag;
                }
                // A copy: the tag is a slice of the whole batch's buffer.
                let tag = Bytes::copy_from_slice(&e.key);
                let newest = st.tag_tombs.entry(tag.clone()).or_insert(TagTomb {
                    seq: 0,
                    version: NO_VERSION,
                });
                newest.seq = newest.seq.max(e.seq);
                newest.version = max_version(newest.version, version_of(e.source_version));
                st.tag_order.push_back((tag, e.seq));
                while st.tag_order.len() > room {
                    let Some((old, seq)) = st.tag_order.pop_front() else {
                        break;
                    };
                    // Forgotten only if no later invalidation of the tag is remembered.
                    if st.tag_tombs.get(&old).is_some_and(|t| t.seq == seq) {
                        if let Some(t) = st.tag_tombs.remove(&old) {
                            st.tag_version_floor = max_version(st.tag_version_floor, t.version);
                        }
                        st.tag_floor = st.tag_floor.max(seq);
                        forgotten += 1;
                    }
                }
                self.tags_forgotten += forgotten;
                Effect::Tag
            }
        }
    }

    /// Record a run of applied invalidations of `shard`, in order, handing each one's [`Effect`]
    /// to `effect`: the same as [`LeaseTable::apply`] on each, but faster on long runs.
    pub fn apply_all(
        &mut self,
        shard: ShardId,
        entries: &[Invalidation],
        mut effect: impl FnMut(&Invalidation, Effect),
    ) {
        const CHUNK: usize = 32;
        if !self.keeps(shard) {
            for e in entries {
                effect(e, self.apply(shard, e));
            }
            return;
        }
        let slots = self.slots;
        for chunk in entries.chunks(CHUNK) {
            let mut at = [(0usize, 0u64); CHUNK];
            for (a, e) in at.iter_mut().zip(chunk) {
                if e.kind == Kind::Key {
                    *a = self.hashes(&e.key);
                }
            }
            let st = self.shard_mut(shard);
            if st.slots.is_empty() && chunk.iter().any(|e| e.kind == Kind::Key) {
                st.slots = vec![Slot::default(); slots];
            }
            // Each slot is a likely cache (and TLB) miss. Touching them all first lets those
            // independent loads overlap instead of being paid one after another below.
            let mut touched = 0u64;
            for (a, e) in at.iter().zip(chunk) {
                if e.kind == Kind::Key {
                    touched ^= st.slots[a.0].seq;
                }
            }
            std::hint::black_box(touched);
            for (a, e) in at.iter().zip(chunk) {
                let done = if e.kind == Kind::Key {
                    apply_key(self.shard_mut(shard), slots, e, *a)
                } else {
                    self.apply(shard, e)
                };
                effect(e, done);
            }
        }
    }

    /// Everything of `shard` up to `seq` in `epoch` is applied.
    pub fn set_applied(&mut self, shard: ShardId, epoch: Epoch, seq: Seq) {
        if !self.keeps(shard) {
            return;
        }
        let st = self.shard_mut(shard);
        st.epoch = epoch;
        st.applied = st.applied.max(seq);
    }

    /// Every lease handed out so far is void: their fills are refused.
    pub fn void_leases(&mut self) {
        // Wrapping as the wire form does: past its width, every lease would be refused for ever.
        self.generation = (self.generation + 1) & GENERATION_MASK;
    }

    /// The cache dropped everything of `shard`; it continues after `hwm` in `epoch`. Every
    /// lease handed out before is void.
    pub fn flush(&mut self, shard: ShardId, epoch: Epoch, hwm: Seq) {
        self.void_leases();
        if !self.keeps(shard) {
            return;
        }
        let st = self.shard_mut(shard);
        *st = ShardLeases {
            shard,
            epoch,
            applied: hwm,
            floor: hwm,
            ..ShardLeases::default()
        };
    }

    /// (shard, epoch, applied) of every shard seen.
    pub fn applied(&self) -> Vec<(ShardId, Epoch, Seq)> {
        let mut v: Vec<_> = self
            .shards
            .iter()
            .map(|s| (s.shard, s.epoch, s.applied))
            .collect();
        v.sort();
        v
    }

    /// Tag invalidations forgotten for room so far: each made every tagged value of its shard
    /// filled before it a miss (`max_tag_tombstones` too small for the tags' pace, if it grows).
    pub fn tags_forgotten(&self) -> u64 {
        self.tags_forgotten
    }

    /// Tombstone slots in use.
    pub fn tombstones(&self) -> usize {
        self.shards.iter().map(|s| s.occupied).sum()
    }
}

/// A key invalidation landing in its slot `at` (index, identity).
fn apply_key(st: &mut ShardLeases, slots: usize, e: &Invalidation, at: (usize, u64)) -> Effect {
    let (slot, id) = at;
    if st.slots.is_empty() {
        st.slots = vec![Slot::default(); slots];
    }
    let t = &mut st.slots[slot];
    let v = version_of(e.source_version);
    if t.id == id {
        if v != NO_VERSION && t.version != NO_VERSION && v < t.version {
            return Effect::Nothing;
        }
        t.version = max_version(t.version, v);
    } else {
        if t.id == 0 {
            st.occupied += 1;
        }
        t.id = id;
        t.version = v;
    }
    t.seq = t.seq.max(e.seq);
    Effect::Key
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tags(ts: &[&'static str]) -> Vec<Bytes> {
        ts.iter()
            .map(|x| Bytes::from_static(x.as_bytes()))
            .collect()
    }

    fn inv(key: &str, seq: Seq) -> Invalidation {
        Invalidation {
            seq,
            ..Invalidation::key(key.to_string())
        }
    }

    /// A prefix tombstone keeps its prefix, not the batch it came in: the key of a decoded
    /// entry is a slice of the whole batch's buffer, which up to 4,096 tombstones per shard would
    /// otherwise keep alive.
    /// Past the most prefix tombstones kept, the oldest goes and the floor rises to it; a prefix
    /// invalidated again since is still refused at its newest seq.
    #[test]
    fn the_oldest_prefix_tombstone_goes_into_the_floor() {
        let mut t = LeaseTable::new(1, 100);
        let prefix = |p: String, seq| Invalidation {
            seq,
            kind: Kind::Prefix,
            ..Invalidation::key(p)
        };
        t.apply(0, &prefix("again:".into(), 1));
        for i in 0..MAX_PREFIX_TOMBS as u64 - 1 {
            t.apply(0, &prefix(format!("p{i}:"), i + 2));
        }
        let last = MAX_PREFIX_TOMBS as u64;
        t.apply(0, &prefix("again:".into(), last + 1)); // one more: "again:" at 1 goes
        t.set_applied(0, 0, last + 1);
        let lease = |seq| Lease {
            generation: t.lease(b"x").generation,
            seq,
        };
        assert_eq!(t.shards[0].floor, 1, "the oldest went into the floor");
        assert!(
            t.check_fill(b"again:x", lease(last)).is_err(),
            "invalidated again since"
        );
        assert!(t.check_fill(b"p7:x", lease(8)).is_err());
        assert!(t.check_fill(b"p7:x", lease(9)).is_ok());
        assert!(t.check_fill(b"other", lease(1)).is_ok());
        assert!(t.check_fill(b"again:x", lease(last + 1)).is_ok());
    }

    #[test]
    fn a_prefix_tombstone_holds_a_copy_of_its_prefix() {
        let batch = Bytes::from(vec![b'x'; 1 << 20]);
        let range = batch.as_ptr_range();
        let mut t = LeaseTable::new(1, 100);
        let e = Invalidation {
            kind: Kind::Prefix,
            key: batch.slice(100..110),
            seq: 5,
            ..Invalidation::key("")
        };
        assert_eq!(t.apply(0, &e), Effect::Prefix);
        let held = &t.shards[0].prefix_tombs[0].0;
        assert_eq!(held, &e.key);
        assert!(
            !range.contains(&held.as_ptr()),
            "the batch's buffer is kept"
        );
    }

    #[test]
    fn stale_fill_after_invalidation_is_refused() {
        let mut t = LeaseTable::new(1, 100);
        let lease = t.lease(b"k");
        assert_eq!(t.apply(0, &inv("k", 5)), Effect::Key);
        t.set_applied(0, 1, 5);
        assert_eq!(
            t.check_fill(b"k", lease),
            Err(FillRefused::Stale {
                invalidated: 5,
                lease: 0
            })
        );
        assert_eq!(t.check_fill(b"k", t.lease(b"k")), Ok(()));
        // Another key, in another slot (one sharing the slot is refused too, by design).
        let other = (0..)
            .map(|i| format!("other{i}"))
            .find(|o| t.hashes(o.as_bytes()).0 != t.hashes(b"k").0)
            .unwrap();
        assert_eq!(t.check_fill(other.as_bytes(), lease), Ok(()));
    }

    /// A value read at a version older than the key's newest invalidation is refused even under
    /// a lease taken after it (the replica it was read from lagged behind the write); the same
    /// version or a newer one, or a fill that says no version, passes. Once the key's slot holds
    /// another key, or a flush emptied it, the version is not known and the lease decides alone.
    #[test]
    fn a_fill_older_than_the_keys_invalidated_version_is_refused() {
        let mut t = LeaseTable::new(1, 1 << 10);
        let at = |key: &str, seq: Seq, version: u64| Invalidation {
            source_version: Some(version),
            ..inv(key, seq)
        };
        t.apply(0, &at("k", 1, 10));
        t.apply(0, &at("k", 2, 7));
        t.set_applied(0, 1, 2);
        let lease = t.lease(b"k");
        assert_eq!(
            t.newest_version(b"k"),
            Some(10),
            "an older one arriving late is not it"
        );
        assert_eq!(
            t.check_fill_with(b"k", &[], Some(9), lease),
            Err(FillRefused::OlderVersion {
                filled: 9,
                invalidated: 10
            })
        );
        for ok in [Some(10), Some(11), None] {
            assert_eq!(t.check_fill_with(b"k", &[], ok, lease), Ok(()), "{ok:?}");
        }
        // An unversioned invalidation since keeps the version known.
        t.apply(0, &inv("k", 3));
        assert_eq!(t.newest_version(b"k"), Some(10));
        let other = (0..)
            .map(|i| format!("other{i}"))
            .find(|o| t.hashes(o.as_bytes()).0 == t.hashes(b"k").0)
            .unwrap();
        assert_eq!(t.newest_version(other.as_bytes()), None, "not its key");
        t.apply(0, &at(&other, 4, 1));
        assert_eq!(
            t.newest_version(b"k"),
            None,
            "forgotten: another key took the slot"
        );
        t.set_applied(0, 1, 4);
        assert_eq!(t.check_fill_with(b"k", &[], Some(1), t.lease(b"k")), Ok(()));
        t.apply(0, &at("k", 5, 10));
        t.flush(0, 1, 5);
        assert_eq!(t.newest_version(b"k"), None, "a flush forgets");
    }

    /// Tag invalidations that name a version (a log position, comparable across rows) refuse
    /// a fill of a value with the tag read at an older one; a tag forgotten for room, or
    /// cleared by an all-keys invalidation, leaves its version as a floor for every tag.
    #[test]
    fn a_tagged_fill_older_than_its_tags_invalidated_version_is_refused() {
        let mut t = LeaseTable::new(1, 1 << 10);
        t.set_tag_room(2);
        let tag = |tag: &str, seq: Seq, version: Option<u64>| Invalidation {
            seq,
            source_version: version,
            ..Invalidation::tag(tag.to_string())
        };
        t.apply(0, &tag("row:1", 1, Some(20)));
        t.apply(0, &tag("row:1", 2, Some(15)));
        t.apply(0, &tag("row:2", 3, None));
        t.set_applied(0, 1, 3);
        let lease = t.lease(b"page");
        let fill = |t: &LeaseTable, ts: &[&'static str], v: Option<u64>| {
            t.check_fill_with(b"page", &tags(ts), v, lease)
        };
        assert_eq!(
            fill(&t, &["row:2", "row:1"], Some(19)),
            Err(FillRefused::OlderVersion {
                filled: 19,
                invalidated: 20
            })
        );
        for ok in [Some(20), None] {
            assert_eq!(fill(&t, &["row:1"], ok), Ok(()), "{ok:?}");
        }
        assert_eq!(
            fill(&t, &["row:2", "row:3"], Some(1)),
            Ok(()),
            "no version named"
        );
        assert_eq!(fill(&t, &[], Some(1)), Ok(()), "untagged");
        // Room for two: row:1 (at 20) is forgotten, and its version is a floor for every tag.
        t.apply(0, &tag("row:3", 4, Some(25)));
        t.apply(0, &tag("row:4", 5, Some(9)));
        t.set_applied(0, 1, 5);
        let lease = t.lease(b"page");
        let fill = |t: &LeaseTable, ts: &[&'static str], v: Option<u64>| {
            t.check_fill_with(b"page", &tags(ts), v, lease)
        };
        assert_eq!(t.newest_tag_version(0, &tags(&["row:9"])), Some(20));
        assert!(fill(&t, &["row:9"], Some(19)).is_err());
        assert_eq!(fill(&t, &["row:9"], Some(20)), Ok(()));
        assert!(fill(&t, &["row:3"], Some(24)).is_err());
        // An all-keys invalidation leaves the versions it cleared as the floor.
        t.apply(
            0,
            &Invalidation {
                seq: 6,
                ..Invalidation::all()
            },
        );
        t.set_applied(0, 1, 6);
        assert_eq!(t.newest_tag_version(0, &tags(&["row:9"])), Some(25));
    }

    /// A shard this table does not map keys to (a sender's mistake, or worse) removes what its
    /// entries name but allocates nothing: a thousand such shards cost no tombstone table each.
    #[test]
    fn shards_beyond_the_count_leave_no_bookkeeping() {
        let mut t = LeaseTable::new(2, 1 << 16);
        for shard in 2..1000 {
            assert_eq!(t.apply(shard, &inv("k", 5)), Effect::Key);
            t.apply_all(shard, &[inv("a", 6), inv("b", 7)], |_, e| {
                assert_eq!(e, Effect::Key)
            });
            t.set_applied(shard, 1, 7);
        }
        assert_eq!(t.tombstones(), 0);
        assert!(t.shards.is_empty(), "{:?}", t.applied());
        // The shards it does map keys to are kept as ever.
        let lease = t.lease(b"k");
        t.apply(t.shard_of(b"k"), &inv("k", 9));
        assert!(t.check_fill(b"k", lease).is_err());
    }

    #[test]
    fn voided_leases_are_refused_and_new_ones_taken() {
        let mut t = LeaseTable::new(1, 100);
        let before = t.lease(b"k");
        t.void_leases();
        assert_eq!(t.check_fill(b"k", before), Err(FillRefused::Flushed));
        assert_eq!(t.check_fill(b"k", t.lease(b"k")), Ok(()));
    }

    /// The bound is of the whole table: shards share it, however many the tier has.
    #[test]
    fn the_tombstone_slots_are_shared_out_among_the_shards() {
        let allocated = |shards: u32, max: usize| {
            let mut t = LeaseTable::new(shards, max);
            let mut seen = std::collections::HashSet::new();
            for (i, k) in (0..).map(|i| format!("k{i}")).enumerate() {
                let shard = t.shard_of(k.as_bytes());
                t.apply(shard, &inv(&k, i as Seq + 1));
                seen.insert(shard);
                if seen.len() == shards as usize {
                    break;
                }
            }
            t.shards.iter().map(|s| s.slots.len()).sum::<usize>()
        };
        assert_eq!(allocated(1, 262_144), 262_144);
        assert_eq!(allocated(64, 262_144), 262_144);
        // A share that is not a power of two is rounded down: within the bound.
        assert_eq!(allocated(3, 262_144), 3 * 65_536);
        assert_eq!(allocated(1, 100), 64);
        // One slot per shard at least.
        assert_eq!(allocated(8, 4), 8);
    }

    #[test]
    fn older_version_has_no_effect() {
        let mut t = LeaseTable::new(1, 100);
        t.apply(
            0,
            &Invalidation {
                source_version: Some(9),
                ..inv("k", 1)
            },
        );
        assert_eq!(
            t.apply(
                0,
                &Invalidation {
                    source_version: Some(3),
                    ..inv("k", 2)
                }
            ),
            Effect::Nothing
        );
    }

    #[test]
    fn flush_voids_leases_and_lease_round_trips() {
        let mut t = LeaseTable::new(1, 100);
        let lease = t.lease(b"k");
        t.flush(0, 2, 0);
        assert_eq!(t.check_fill(b"k", lease), Err(FillRefused::Flushed));
        let l = Lease {
            generation: 3,
            seq: 123_456,
        };
        assert_eq!(Lease::decode(l.encode()), l);
    }

    /// A lease goes over the wire and back before it is checked: generations stay within what
    /// the wire form carries, however many flushes there were.
    #[test]
    fn leases_fill_after_more_flushes_than_the_wire_form_counts() {
        let mut t = LeaseTable::new(1, 100);
        for i in 0..(GENERATION_MASK + 5) {
            t.flush(0, 1, i);
        }
        let wired = Lease::decode(t.lease(b"k").encode());
        assert_eq!(t.check_fill(b"k", wired), Ok(()));
    }

    /// A cache started again does not count its generations as its earlier life did: a lease
    /// handed out before the restart is refused as flushed, whatever the seqs say.
    #[test]
    fn a_cache_started_again_refuses_the_leases_of_its_earlier_life() {
        let mut before = LeaseTable::with_seed(1, 100, 1);
        before.flush(0, 1, 10);
        let lease = before.lease(b"k");
        let mut after = LeaseTable::with_seed(1, 100, 2);
        after.flush(0, 1, 10);
        assert_eq!(after.check_fill(b"k", lease), Err(FillRefused::Flushed));
    }

    /// A tag invalidation refuses the fills under older leases of the values tagged with it,
    /// in its shard only; a tag forgotten for room, or a poisoned one's stand-in (no tag),
    /// raises the floor of every tagged value of the shard; a flush forgets the shard's tags.
    #[test]
    fn tags_refuse_older_fills_of_their_values_in_their_shard() {
        let mut t = LeaseTable::new(2, 64);
        t.set_tag_room(2);
        let key_of = |shard: ShardId| {
            (0..)
                .map(|i| format!("k{i}"))
                .find(|k| t.shard_of(k.as_bytes()) == shard)
                .unwrap()
        };
        let (k0, k1) = (key_of(0), key_of(1));
        let at = |tag: &str, seq: Seq| Invalidation {
            seq,
            ..Invalidation::tag(tag.to_string())
        };
        let old = t.lease(k0.as_bytes());
        assert_eq!(t.apply(0, &at("row:1", 1)), Effect::Tag);
        t.set_applied(0, 1, 1);
        let stale = t.check_fill_with(k0.as_bytes(), &tags(&["x", "row:1"]), None, old);
        assert_eq!(
            stale,
            Err(FillRefused::Stale {
                invalidated: 1,
                lease: 0
            })
        );
        assert!(t
            .check_fill_with(k0.as_bytes(), &tags(&["x"]), None, old)
            .is_ok());
        assert!(
            t.check_fill(k0.as_bytes(), old).is_ok(),
            "untagged: its key was not invalidated"
        );
        assert!(
            t.check_fill_with(
                k1.as_bytes(),
                &tags(&["row:1"]),
                None,
                t.lease(k1.as_bytes())
            )
            .is_ok(),
            "shard 1 has its own invalidation of the tag"
        );
        assert!(t
            .check_fill_with(
                k0.as_bytes(),
                &tags(&["row:1"]),
                None,
                t.lease(k0.as_bytes())
            )
            .is_ok());
        assert_eq!(t.newest_tag(0, &tags(&["row:1"])), 1);
        assert_eq!(
            (t.newest_tag(0, &tags(&["y"])), t.newest_tag(0, &[])),
            (0, 0)
        );
        // Room for two: the third forgets the oldest, whose seq becomes the floor of every tag.
        t.apply(0, &at("row:1", 2));
        t.apply(0, &at("row:2", 3));
        assert_eq!(
            t.newest_tag(0, &tags(&["z"])),
            0,
            "row:1 at 1 was invalidated again at 2"
        );
        t.apply(0, &at("row:3", 4));
        assert_eq!(t.newest_tag(0, &tags(&["z"])), 2);
        assert_eq!(t.newest_tag(0, &tags(&["row:3"])), 4);
        t.apply(0, &at("", 9));
        assert_eq!(
            t.newest_tag(0, &tags(&["z"])),
            9,
            "a stand-in covers every tag"
        );
        assert_eq!(t.newest_tag(1, &tags(&["z"])), 0);
        t.flush(0, 2, 20);
        assert_eq!(t.newest_tag(0, &tags(&["row:3"])), 0);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Invalidate(u8),
        Prefix(u8),
        All,
        Lease(u8),
        Fill(u8, usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            5 => (0u8..20).prop_map(Op::Invalidate),
            1 => (0u8..3).prop_map(Op::Prefix),
            1 => Just(Op::All),
            4 => (0u8..20).prop_map(Op::Lease),
            4 => (0u8..20, any::<usize>()).prop_map(|(k, i)| Op::Fill(k, i)),
        ]
    }

    #[test]
    fn prefixes_match_what_starts_with_one_of_them() {
        let mut p = Prefixes::default();
        assert!(p.is_empty() && !p.matches(b"a"));
        for (x, seq) in [("user:1:", 5), ("t9:", 6), ("user:", 3)] {
            p.insert(Bytes::from(x), seq);
        }
        assert!(p.matches(b"user:1:x") && p.matches(b"user:2") && p.matches(b"t9:"));
        assert!(!p.matches(b"use") && !p.matches(b"t9") && !p.matches(b"item:user:"));
        assert_eq!(
            (p.newest(b"user:1:x"), p.newest(b"user:2")),
            (Some(5), Some(3))
        );
        assert!(
            p.covers(b"user:1:x", 4) && !p.covers(b"user:1:x", 5),
            "filled after it: fresh"
        );
        let done = p.clone();
        p.insert(Bytes::from("user:"), 9); // invalidated again meanwhile
        p.remove_done(&done);
        assert_eq!((p.len(), p.newest(b"user:1:x")), (1, Some(9)));
        p.remove_done(&p.clone());
        assert!(p.is_empty() && !p.matches(b"user:1:x"));
        p.insert(Bytes::new(), 1);
        assert!(p.matches(b""), "an empty prefix is every key");
    }

    proptest! {
        /// One pass with every prefix removes exactly what a pass per prefix would, and knows
        /// the newest invalidation of a key's prefixes.
        #[test]
        fn prefixes_match_as_any_of_them_does(
            prefixes in proptest::collection::vec("[ab:]{0,4}", 0..8),
            keys in proptest::collection::vec("[ab:]{0,6}", 0..32),
        ) {
            let mut p = Prefixes::default();
            for (seq, x) in prefixes.iter().enumerate() {
                p.insert(Bytes::from(x.clone()), seq as Seq + 1);
            }
            for k in &keys {
                let newest = prefixes
                    .iter()
                    .enumerate()
                    .filter(|(_, x)| k.starts_with(x.as_str()))
                    .map(|(seq, _)| seq as Seq + 1)
                    .max();
                prop_assert_eq!(p.newest(k.as_bytes()), newest, "{:?} {:?}", k, prefixes);
            }
        }

        /// Against a model that remembers every invalidation forever: a fill accepted by the
        /// bounded table is accepted by the model (never a stale fill); with room for every
        /// tombstone, the two agree exactly.
        #[test]
        fn never_accepts_a_fill_the_full_history_refuses(ops in prop::collection::vec(op(), 1..200), cap in 1usize..40) {
            let key = |k: u8| format!("g{}:k{k}", k % 3);
            let mut bounded = LeaseTable::new(1, cap);
            let mut roomy = LeaseTable::new(1, 1 << 12);
            // Exact agreement needs the 20 keys in 20 slots; a rare seed that shares one is
            // still held to never accepting a stale fill.
            let distinct = (0..20u8).map(|k| roomy.hashes(key(k).as_bytes()).0).collect::<std::collections::HashSet<_>>().len() == 20;
            let mut history: Vec<(Invalidation, Seq)> = Vec::new();
            let mut leases: Vec<(u8, Lease, Lease)> = Vec::new();
            let mut seq = 0;
            for o in ops {
                match o {
                    Op::Invalidate(_) | Op::Prefix(_) | Op::All => {
                        seq += 1;
                        let e = match o {
                            Op::Invalidate(k) => inv(&key(k), seq),
                            Op::Prefix(k) => Invalidation { kind: Kind::Prefix, ..inv(&format!("g{}:", k % 3), seq) },
                            _ => Invalidation { kind: Kind::All, ..inv("", seq) },
                        };
                        bounded.apply(0, &e);
                        roomy.apply(0, &e);
                        bounded.set_applied(0, 1, seq);
                        roomy.set_applied(0, 1, seq);
                        history.push((e, seq));
                    }
                    Op::Lease(k) => leases.push((k, bounded.lease(key(k).as_bytes()), roomy.lease(key(k).as_bytes()))),
                    Op::Fill(k, i) if !leases.is_empty() => {
                        let (lk, lb, lr) = leases[i % leases.len()];
                        let k = if i % 2 == 0 { lk } else { k };
                        let name = key(k);
                        let model_ok = !history.iter().any(|(e, s)| *s > lr.seq && e.covers(name.as_bytes()));
                        let b = bounded.check_fill(name.as_bytes(), lb).is_ok();
                        let r = roomy.check_fill(name.as_bytes(), lr).is_ok();
                        prop_assert!(!b || model_ok, "bounded table accepted a stale fill of {}", name);
                        prop_assert!(!r || model_ok, "roomy table accepted a stale fill of {}", name);
                        if distinct {
                            prop_assert_eq!(r, model_ok);
                        }
                    }
                    Op::Fill(..) => {}
                }
            }
        }

        /// Tags against a model that remembers every invalidation for ever: a fill or a read of
        /// a tagged value that the bounded table lets through, the model does too; with room
        /// for every tag, the two agree. (A read of a value filled before an ALL is not asked:
        /// the ALL removed it.)
        #[test]
        fn tags_never_let_through_what_the_full_history_refuses(
            ops in prop::collection::vec((0u8..6, 0u8..8, 0u8..64, any::<usize>()), 1..200),
            room in 1usize..6,
        ) {
            let mut bounded = LeaseTable::new(1, 64);
            bounded.set_tag_room(room);
            let mut roomy = LeaseTable::new(1, 64);
            let tag = |t: u8| Bytes::from(format!("t{t}"));
            // The tag of each invalidation (None: ALL), and its seq.
            let mut history: Vec<(Option<u8>, Seq)> = Vec::new();
            let mut leases: Vec<(Lease, Lease)> = Vec::new();
            let mut seq = 0;
            for (op, t, set, i) in ops {
                match op {
                    0..=2 => {
                        seq += 1;
                        let (e, x) = if op == 2 && t == 0 {
                            (Invalidation::all(), None)
                        } else {
                            (Invalidation::tag(tag(t % 6)), Some(t % 6))
                        };
                        let e = Invalidation { seq, ..e };
                        for table in [&mut bounded, &mut roomy] {
                            table.apply(0, &e);
                            table.set_applied(0, 1, seq);
                        }
                        history.push((x, seq));
                    }
                    3 => leases.push((bounded.lease(b"k"), roomy.lease(b"k"))),
                    _ if !leases.is_empty() => {
                        let (lb, lr) = leases[i % leases.len()];
                        let tags: Vec<Bytes> = (0..6u8).filter(|b| set & (1 << b) != 0).map(tag).collect();
                        let newer = |all: bool| history.iter().any(|(x, s)| {
                            *s > lr.seq && x.map_or(all, |x| tags.contains(&tag(x)))
                        });
                        let (stale_fill, stale_read, all_since) = (newer(true), newer(false), history.iter().any(|(x, s)| x.is_none() && *s > lr.seq));
                        let b = bounded.check_fill_with(b"k", &tags, None, lb).is_ok();
                        let r = roomy.check_fill_with(b"k", &tags, None, lr).is_ok();
                        prop_assert!(!b || !stale_fill, "bounded table took a stale fill");
                        prop_assert_eq!(r, !stale_fill);
                        if !all_since {
                            let fresh_b = bounded.newest_tag(0, &tags) <= lb.seq;
                            let fresh_r = roomy.newest_tag(0, &tags) <= lr.seq;
                            prop_assert!(!fresh_b || !stale_read, "bounded table served a stale value");
                            prop_assert_eq!(fresh_r, !stale_read);
                        }
                    }
                    _ => {}
                }
            }
        }

        /// Applying a run at once is applying its entries one by one: the same effects in the
        /// same order, and the same answer to every later fill.
        #[test]
        fn a_run_applied_at_once_is_the_entries_applied_one_by_one(
            kinds in prop::collection::vec((0u8..8, 0u8..40, prop::option::of(0u64..6)), 1..120),
            cap in 1usize..64,
            seed in any::<u64>(),
        ) {
            let key = |k: u8| format!("g{}:k{k}", k % 3);
            let entries: Vec<Invalidation> = kinds.iter().enumerate().map(|(i, &(kind, k, v))| {
                let base = Invalidation { source_version: v, ..inv(&key(k), i as Seq + 1) };
                match kind {
                    0 => Invalidation { kind: Kind::Prefix, ..inv(&format!("g{}:", k % 3), i as Seq + 1) },
                    1 if k % 5 == 0 => Invalidation { kind: Kind::All, ..inv("", i as Seq + 1) },
                    _ => base,
                }
            }).collect();
            let mut one = LeaseTable::with_seed(1, cap, seed);
            let mut all = LeaseTable::with_seed(1, cap, seed);
            let lease = one.lease(b"x");
            let singly: Vec<Effect> = entries.iter().map(|e| one.apply(0, e)).collect();
            let mut together = Vec::new();
            all.apply_all(0, &entries, |_, eff| together.push(eff));
            prop_assert_eq!(singly, together);
            prop_assert_eq!(one.tombstones(), all.tombstones());
            for k in 0..40u8 {
                let name = key(k);
                prop_assert_eq!(one.check_fill(name.as_bytes(), lease), all.check_fill(name.as_bytes(), lease));
            }
        }
    }
}
