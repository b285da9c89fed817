//! `NearCache`: an in-process cache that follows relays like an edge does (same protocol, same
//! guarantees: per-key order, lease-gated fills, flush on Reset, bounded staleness).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::ops::Bound;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dci_proto::lease::{Effect, Lease, LeaseTable};
use dci_proto::pb;
use dci_proto::upstream::{self, lock, Applier, FollowOptions, LinkState};
use dci_proto::{Batch, Epoch, Filter, Seq, ShardId};
use tokio::sync::watch;

use crate::turn::{Loading, Turn};
use crate::{ClientTls, Error, Fill, Lookup};

/// Options of a near cache.
#[derive(Clone, Debug)]
pub struct NearCacheOptions {
    /// Relays to follow, in failover order.
    ///
    /// ```
    /// let o = dci_sdk::NearCacheOptions { relays: vec!["http://127.0.0.1:7500".into()], ..Default::default() };
    /// # let _ = o;
    /// ```
    pub relays: Vec<String>,
    /// This process's node id in the tree (default: random).
    ///
    /// ```
    /// let o = dci_sdk::NearCacheOptions { node_id: "checkout-7".into(), ..Default::default() };
    /// # let _ = o;
    /// ```
    pub node_id: String,
    /// Region, for `dci status`.
    ///
    /// ```
    /// let o = dci_sdk::NearCacheOptions { region: "eu".into(), ..Default::default() };
    /// # let _ = o;
    /// ```
    pub region: String,
    /// Entries kept (oldest fills go first).
    ///
    /// ```
    /// let o = dci_sdk::NearCacheOptions { capacity: 10_000, ..Default::default() };
    /// # let _ = o;
    /// ```
    pub capacity: usize,
    /// Serve only misses for a key after this long without being caught up on its shard all the
    /// way to the coordinator, through the relay and the relay with its own sender (at least 1 s).
    ///
    /// ```
    /// let o = dci_sdk::NearCacheOptions { max_staleness: std::time::Duration::from_secs(2), ..Default::default() };
    /// # let _ = o;
    /// ```
    pub max_staleness: Duration,
    /// Only follow keys with these prefixes (empty: all).
    ///
    /// ```
    /// let o = dci_sdk::NearCacheOptions { prefixes: vec!["user:".into()], ..Default::default() };
    /// # let _ = o;
    /// ```
    pub prefixes: Vec<String>,
    /// Shards of the keyspace.
    ///
    /// ```
    /// let o = dci_sdk::NearCacheOptions { shard_count: 1, ..Default::default() };
    /// # let _ = o;
    /// ```
    pub shard_count: u32,
    /// How to speak TLS to `https://` relays: the CA to trust (default: the system's roots).
    pub tls: ClientTls,
}

impl Default for NearCacheOptions {
    fn default() -> Self {
        NearCacheOptions {
            relays: Vec::new(),
            node_id: format!("near-{:08x}", rand::random::<u32>()),
            region: String::new(),
            capacity: 100_000,
            max_staleness: Duration::from_secs(5),
            prefixes: Vec::new(),
            shard_count: 1,
            tls: ClientTls::default(),
        }
    }
}

struct State {
    leases: LeaseTable,
    /// Each value with its number in the fill order. Changed only through [`State::insert`]
    /// and [`State::remove`], which keep `sorted` and `order` to the same keys.
    values: HashMap<Bytes, (u64, Bytes), foldhash::fast::RandomState>,
    /// The keys of `values` in order: those a prefix covers sit together, so that removing
    /// them costs what is removed, not a pass over every value (which, under the lock that
    /// reads take, held them up for 150 ms at a million values). Reads stay on the hash map.
    sorted: BTreeSet<Bytes>,
    /// The keys by their number in the fill order: the oldest fill is evicted first, and a key
    /// removed leaves at once (no pass to drop removed keys: at a million values, one held
    /// reads up for 80 ms).
    order: BTreeMap<u64, Bytes>,
    /// Fills so far: the next one's number.
    filled: u64,
    capacity: usize,
    /// The lease and tags of each value filled with tags: one a tag invalidation newer than
    /// its lease covers is found stale when read.
    tagged: HashMap<Bytes, (Seq, Vec<Bytes>), foldhash::fast::RandomState>,
}

impl State {
    /// Store a value, evicting the oldest fills beyond the capacity. A key held keeps its
    /// place in the fill order.
    fn insert(&mut self, key: Bytes, value: Bytes) {
        self.tagged.remove(&key);
        if let Some(held) = self.values.get_mut(&key) {
            held.1 = value;
            return;
        }
        self.filled += 1;
        self.values.insert(key.clone(), (self.filled, value));
        self.sorted.insert(key.clone());
        self.order.insert(self.filled, key);
        while self.values.len() > self.capacity {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            self.values.remove(&oldest);
            self.sorted.remove(&oldest);
            self.tagged.remove(&oldest);
        }
    }

    /// [`State::insert`], the value filled under `lease` with `tags`.
    fn insert_tagged(&mut self, key: Bytes, value: Bytes, lease: Seq, tags: Vec<Bytes>) {
        self.insert(key.clone(), value);
        if !tags.is_empty() && self.values.contains_key(&key) {
            self.tagged.insert(key, (lease, tags));
        }
    }

    /// Whether `key`'s value was filled with a tag invalidated since its lease.
    fn tag_invalidated(&self, key: &[u8]) -> bool {
        self.tagged.get(key).is_some_and(|(lease, tags)| {
            self.leases.newest_tag(self.leases.shard_of(key), tags) > *lease
        })
    }

    fn get(&self, key: &[u8]) -> Option<&Bytes> {
        self.values.get(key).map(|(_, v)| v)
    }

    fn remove(&mut self, key: &[u8]) {
        self.tagged.remove(key);
        if let Some((n, _)) = self.values.remove(key) {
            self.order.remove(&n);
            self.sorted.remove(key);
        }
    }

    /// Remove the keys that start with `prefix`.
    fn remove_prefix(&mut self, prefix: &[u8]) {
        let covered: Vec<Bytes> = self
            .sorted
            .range::<[u8], _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(|k| k.starts_with(prefix))
            .cloned()
            .collect();
        for k in covered {
            self.remove(&k);
        }
    }

    /// Remove the keys of `shard`.
    fn remove_shard(&mut self, shard: ShardId) {
        let of_shard: Vec<Bytes> = self
            .sorted
            .iter()
            .filter(|k| self.leases.shard_of(k) == shard)
            .cloned()
            .collect();
        for k in of_shard {
            self.remove(&k);
        }
    }
}

struct NearApplier(Arc<Mutex<State>>);

impl Applier for NearApplier {
    fn apply(&mut self, batch: &Batch) {
        let mut st = lock(&self.0);
        let mut effects = Vec::with_capacity(batch.entries.len());
        st.leases
            .apply_all(batch.shard, &batch.entries, |_, effect| {
                effects.push(effect)
            });
        for (e, effect) in batch.entries.iter().zip(effects) {
            match effect {
                Effect::Key => st.remove(&e.key),
                Effect::Prefix => st.remove_prefix(&e.key),
                Effect::Shard(s) => st.remove_shard(s),
                // A near cache's values carry no tags.
                Effect::Tag | Effect::Nothing => {}
            }
        }
        st.leases
            .set_applied(batch.shard, batch.epoch, batch.last_seq);
    }

    fn quarantine(&mut self, _: ShardId, entry: &pb::Invalidation, _: &str) {
        // Told by the link, which quarantines it.
        lock(&self.0).remove(&entry.key);
    }

    fn flush(&mut self, shard: ShardId, epoch: Epoch, hwm: Seq, _: &str) {
        let mut st = lock(&self.0);
        st.remove_shard(shard);
        st.leases.flush(shard, epoch, hwm);
    }
}

/// An in-process cache kept coherent by the invalidation stream; clone it freely.
///
/// ```no_run
/// # async fn demo() -> Result<(), dci_sdk::Error> {
/// use dci_sdk::{Lookup, NearCache, NearCacheOptions};
/// let near = NearCache::start(NearCacheOptions { relays: vec!["http://127.0.0.1:7500".into()], ..Default::default() })?;
/// if let Lookup::Miss { lease } = near.get(b"user:42") {
///     near.set(b"user:42".as_slice(), "row", Some(lease));
/// }
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct NearCache {
    state: Arc<Mutex<State>>,
    link: Arc<Mutex<LinkState>>,
    max_staleness: Duration,
    shard_count: u32,
    /// The shard of each key, as its coordinators map them.
    shards: Arc<dci_proto::ring::ShardMap>,
    /// What it follows: the keys it may cache.
    follows: Arc<Filter>,
    stop: Arc<watch::Sender<bool>>,
    /// The relays it follows, changed by [`NearCache::set_relays`].
    relays: Arc<watch::Sender<upstream::Following>>,
    loading: Arc<Loading>,
}

impl NearCache {
    /// Does the coordinator tier have the shard count this cache maps keys with (or has it not
    /// said yet)? With another, fills would be checked against the wrong shard's tombstones: such
    /// a cache serves nothing and takes no fill.
    fn agrees_on_shards(&self) -> bool {
        let told = lock(&self.link).shard_count;
        told == 0 || told == self.shard_count
    }

    /// Start following the relays (needs a tokio runtime).
    pub fn start(opts: NearCacheOptions) -> Result<NearCache, Error> {
        if opts.relays.is_empty() {
            return Err(Error::Url(String::new(), "no relay URL".into()));
        }
        // Heartbeats come every 500 ms: with a shorter bound an idle near cache would be out of
        // it between any two, and miss most of the time (an edge refuses such a bound too).
        if opts.max_staleness < dci_proto::upstream::MIN_PEER_TIMEOUT {
            return Err(Error::Refused(format!(
                "max_staleness must be at least {:?} (two of a sender's heartbeats)",
                dci_proto::upstream::MIN_PEER_TIMEOUT
            )));
        }
        if opts.shard_count > dci_proto::types::MAX_SHARDS {
            return Err(Error::Refused(format!(
                "shard_count {} is more than a tier can have ({})",
                opts.shard_count,
                dci_proto::types::MAX_SHARDS
            )));
        }
        let state = Arc::new(Mutex::new(State {
            leases: LeaseTable::new(
                opts.shard_count.max(1),
                opts.capacity.max(1024).saturating_mul(4),
            ),
            values: HashMap::default(),
            sorted: BTreeSet::new(),
            order: BTreeMap::new(),
            filled: 0,
            capacity: opts.capacity.max(1),
            tagged: HashMap::default(),
        }));
        let link = Arc::new(Mutex::new(LinkState::default()));
        let (stop, rx) = watch::channel(false);
        let follows = Filter::of_prefixes(&opts.prefixes);
        let (relays, changes) = watch::channel(upstream::Following {
            urls: opts.relays.clone(),
            filter: follows.clone(),
        });
        let follow = FollowOptions {
            urls: opts.relays.clone(),
            node_id: opts.node_id.clone(),
            region: opts.region.clone(),
            role: "near-cache".into(),
            filter: follows.clone(),
            tls: opts.tls.clone(),
            changes: Some(changes),
            max_staleness: Some(opts.max_staleness),
            ..FollowOptions::default()
        };
        let applier = Arc::new(Mutex::new(NearApplier(state.clone())));
        tokio::spawn(upstream::follow(follow, applier, link.clone(), rx));
        Ok(NearCache {
            state,
            link,
            max_staleness: opts.max_staleness,
            shard_count: opts.shard_count.max(1),
            shards: Arc::new(dci_proto::ring::ShardMap::new(opts.shard_count.max(1))),
            follows: Arc::new(follows),
            stop: Arc::new(stop),
            relays: Arc::new(relays),
            loading: Arc::default(),
        })
    }

    /// Follow these relays from now on (for every clone): the link in use is left and the next
    /// made with them, resuming where this cache is, so nothing cached is dropped and no
    /// invalidation missed.
    pub fn set_relays(&self, relays: Vec<String>) -> Result<(), Error> {
        if relays.is_empty() {
            return Err(Error::Url(String::new(), "no relay URL".into()));
        }
        for url in &relays {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(Error::Url(url.clone(), "not an http(s):// URL".into()));
            }
        }
        self.relays.send_modify(|f| f.urls = relays);
        Ok(())
    }

    /// Look a key up; a miss carries the lease for the fill. A key outside `prefixes` is always
    /// a miss (and its fill is refused): no invalidation of it reaches this cache.
    pub fn get(&self, key: &[u8]) -> Lookup {
        self.look(key).0
    }

    /// The lookup, and whether this cache serves the key now (a fill of it would be read).
    fn look(&self, key: &[u8]) -> (Lookup, bool) {
        // Fresh for the key's shard, as an edge asks: a coordinator of a sharded tier that is
        // down left every key a miss, where only its shard's are unvouched for.
        let shard = self.shards.shard_of(key);
        let serves = lock(&self.link).fresh_for(shard, Instant::now(), self.max_staleness)
            && self.agrees_on_shards()
            && self.follows.takes_key(key);
        let mut st = lock(&self.state);
        let lease = st.leases.lease(key).encode();
        if st.tag_invalidated(key) {
            st.remove(key);
        }
        match st.get(key) {
            Some(v) if serves => (Lookup::Hit(v.clone()), true),
            _ => (Lookup::Miss { lease }, serves),
        }
    }

    /// Fill a key; `false` when the lease is older than an invalidation applied to the key. The
    /// value may be a [`Fill`] with tags (a tag invalidation of any of them drops it, whatever
    /// its key, and the fill is refused when one newer than the lease was applied) or the
    /// version it was read at (refused when an invalidation of the key named a newer one).
    pub fn set(&self, key: impl Into<Bytes>, fill: impl Into<Fill>, lease: Option<u64>) -> bool {
        let (key, fill) = (key.into(), fill.into());
        if !self.agrees_on_shards() || !self.follows.takes_key(&key) {
            return false;
        }
        let mut st = lock(&self.state);
        let lease = lease
            .map(Lease::decode)
            .unwrap_or_else(|| st.leases.lease(&key));
        if st
            .leases
            .check_fill_with(&key, &fill.tags, fill.version, lease)
            .is_err()
        {
            return false;
        }
        st.insert_tagged(key, fill.value, lease.seq, fill.tags);
        true
    }

    /// The cached value, or load it and fill under the miss's lease. Only one caller per key
    /// (of this cache and its clones) loads at a time while it serves the key; the others wait
    /// and then read the fill, or, if it was refused (the key invalidated meanwhile), load
    /// side by side: none waits through more than one load besides its own. Past its staleness
    /// bound every caller loads at once. The loader returns the value, or a [`Fill`] with its
    /// tags or version (see [`NearCache::set`]).
    pub async fn get_or_load<F, Fut, V, E>(
        &self,
        key: impl Into<Bytes>,
        loader: F,
    ) -> Result<Bytes, Error>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>>,
        V: Into<Fill>,
        E: std::fmt::Display,
    {
        let key = key.into();
        let load = || crate::fill::load(loader);
        let value_of = |loaded: Result<Fill, Error>| loaded.map(|f| f.value);
        match self.look(&key) {
            (Lookup::Hit(v), _) => return Ok(v),
            // Waiting for another caller's fill is worth it only where a fill is read.
            (_, false) => return value_of(load().await),
            _ => {}
        }
        let turn = Turn::take(&self.loading, key.clone());
        let held = turn.wait().await;
        let lease = match self.look(&key) {
            (Lookup::Hit(v), _) => return Ok(v),
            (Lookup::Miss { lease }, serves) => serves.then_some(lease),
        };
        // Only a caller that fills holds the others up for its load.
        let held = held.filter(|_| lease.is_some());
        let value = load().await;
        if let (Ok(fill), Some(lease)) = (&value, lease) {
            self.set(key, fill.clone(), Some(lease));
        }
        if let Some(held) = held {
            held.loaded();
        }
        value_of(value)
    }

    /// Keys whose [`NearCache::get_or_load`] is loading now (or waiting for another caller's
    /// load of the same key): for a service's own metrics.
    pub fn loads_in_progress(&self) -> usize {
        crate::turn::in_progress(&self.loading)
    }

    /// Applied (shard, epoch, seq) per shard.
    pub fn applied(&self) -> Vec<(ShardId, Epoch, Seq)> {
        lock(&self.state).leases.applied()
    }

    /// Is it connected and caught up within its staleness bound?
    pub fn is_fresh(&self) -> bool {
        lock(&self.link).fresh_within(Instant::now(), self.max_staleness)
    }

    /// Stop following (every clone stops serving hits once stale).
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(shards: u32, capacity: usize) -> State {
        State {
            leases: LeaseTable::new(shards, 4096),
            values: HashMap::default(),
            sorted: BTreeSet::new(),
            order: BTreeMap::new(),
            filled: 0,
            capacity,
            tagged: HashMap::default(),
        }
    }

    /// The three views of what is held agree.
    fn agree(st: &State) {
        let keys: BTreeSet<&Bytes> = st.values.keys().collect();
        assert!(st.sorted.iter().eq(keys.iter().copied()));
        let mut by_order: Vec<&Bytes> = st.order.values().collect();
        by_order.sort();
        assert!(by_order.into_iter().eq(keys.iter().copied()));
        assert!(st.order.iter().all(|(n, k)| st.values[k].0 == *n));
        assert!(st.tagged.keys().all(|k| st.values.contains_key(k)));
    }

    /// A prefix removes the keys that start with it, whatever their bytes, and only those; a
    /// shard's flush the keys of that shard.
    #[test]
    fn a_prefix_removes_exactly_the_keys_it_starts() {
        let keys: [&[u8]; 10] = [
            b"u",
            b"user",
            b"user:",
            b"user:0",
            b"user:1",
            b"user:1:x",
            b"user:10",
            b"user:2",
            b"user:1\xff",
            b"v",
        ];
        let mut st = state(4, 100);
        let fill = |st: &mut State| {
            for k in keys {
                st.insert(Bytes::copy_from_slice(k), Bytes::from_static(b"v"));
            }
        };
        fill(&mut st);
        st.remove_prefix(b"user:1");
        let mut left: Vec<&[u8]> = st.values.keys().map(|k| &k[..]).collect();
        left.sort();
        assert_eq!(
            left,
            [&b"u"[..], b"user", b"user:", b"user:0", b"user:2", b"v"]
        );
        agree(&st);
        for (prefix, kept) in [
            (&b"\xff"[..], 10),
            (b"user:1\xff", 9),
            (b"user", 2),
            (b"", 0),
        ] {
            fill(&mut st);
            st.remove_prefix(prefix);
            assert_eq!(st.values.len(), kept, "{prefix:?}");
            assert!(st.values.keys().all(|k| !k.starts_with(prefix)));
            agree(&st);
        }
        fill(&mut st);
        st.remove_shard(1);
        assert!(st.values.keys().all(|k| st.leases.shard_of(k) != 1));
        assert!(st.values.len() < keys.len(), "some key is of shard 1");
        agree(&st);
    }

    /// Beyond its capacity the cache evicts its oldest fills; a key filled again keeps its
    /// place, and a key removed frees its place at once.
    #[test]
    fn the_oldest_fills_go_first_and_a_removed_key_frees_its_place() {
        let mut st = state(1, 4);
        let key = |i: u32| Bytes::from(format!("k{i}"));
        for i in 0..4 {
            st.insert(key(i), Bytes::from_static(b"v"));
        }
        st.insert(key(0), Bytes::from_static(b"again"));
        st.insert(key(4), Bytes::from_static(b"v"));
        assert_eq!(
            st.get(b"k0"),
            None,
            "the oldest fill went, though filled again since"
        );
        assert_eq!(st.values.len(), 4);
        st.remove(b"k2");
        st.insert(key(5), Bytes::from_static(b"v"));
        assert_eq!(st.values.len(), 4, "k2's place taken: nothing evicted");
        assert!(st.get(b"k1").is_some());
        st.insert(key(6), Bytes::from_static(b"v"));
        assert_eq!(st.get(b"k1"), None);
        let mut left: Vec<_> = st.values.keys().cloned().collect();
        left.sort();
        assert_eq!(left, [key(3), key(4), key(5), key(6)]);
        agree(&st);
        // However many are removed, no key removed is left behind in the fill order, nor its
        // tags; a value filled again without tags has none.
        for i in 7..10_000 {
            let tags = vec![Bytes::from(format!("t{}", i % 5))];
            st.insert_tagged(key(i), Bytes::from_static(b"v"), 0, tags);
            if i % 3 == 0 {
                st.remove_prefix(format!("k{i}").as_bytes());
            }
            if i % 7 == 0 {
                st.insert(key(i), Bytes::from_static(b"v"));
            }
        }
        agree(&st);
        assert!(st.order.len() <= 4 && st.tagged.len() <= 4);
        assert!(
            !st.tagged.contains_key(&key(9_996)),
            "filled again without tags"
        );
    }
}
