//! The relay's state: one retransmit ring per shard, fed by the upstream links (one per group of
//! senders, e.g. one per coordinator shard) and read by every downstream link. Ranges older than
//! the ring are fetched from upstream on demand.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use dci_proto::downstream::{BatchSource, Fetch};
use dci_proto::link::{Read, RetransmitRing, ShardView, SharedBatch};
use dci_proto::metrics::LatencyHistogram;
use dci_proto::pb;
use dci_proto::pb::subscribe_client::SubscribeClient;
use dci_proto::upstream::{lock, Applier, LinkState};
use dci_proto::{Batch, Epoch, Seq, ShardId};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// Longest an upstream may stay silent during a catch-up fetch before the fetch is given up.
const CATCH_UP_SILENCE: Duration = Duration::from_secs(5);

/// A catch-up fetch, answered once for every receiver waiting on it.
type UnderWay = tokio::sync::OnceCell<Fetch>;

/// Shared by the upstream followers and every downstream link.
pub struct RelayCore {
    node_id: String,
    /// The failover lists followed, one link each (replaced by a reloaded config).
    groups: Mutex<Vec<Vec<String>>>,
    /// Which link a shard's batches are taken from: the first to bring it. Another link bringing
    /// it too (two groups reaching the same shard) would restart its ring at every batch.
    owners: Mutex<HashMap<ShardId, usize>>,
    ring_bytes: usize,
    max_key_len: usize,
    rings: Mutex<HashMap<ShardId, RetransmitRing>>,
    heads: watch::Sender<u64>,
    reports: dci_proto::upstream::Reports,
    channels: Mutex<HashMap<String, Channel>>,
    /// How catch-up fetches speak TLS to `https://` senders.
    tls: dci_proto::tls::ClientTls,
    /// This relay's random number (`Hello.instance`).
    instance: u64,
    /// The upstream links, one per group: for status and for choosing where to catch up from.
    pub links: Vec<Arc<Mutex<LinkState>>>,
    /// Entries quarantined.
    pub quarantined: AtomicU64,
    /// Catch-up fetches from upstream.
    pub catch_ups: AtomicU64,
    /// Catch-ups served from what an earlier one fetched.
    pub catch_up_hits: AtomicU64,
    /// What catch-ups fetched, for the next receiver behind at the same place.
    fetched: Mutex<crate::fetched::Fetched>,
    /// Catch-ups under way, by where they start: a receiver behind at the same place meanwhile
    /// waits for that fetch instead of starting its own (edges reconnecting to a restarted relay
    /// arrive together).
    under_way: Mutex<HashMap<(ShardId, Epoch, Seq), Weak<UnderWay>>>,
    /// Rings started over because a batch did not continue them.
    pub ring_restarts: AtomicU64,
    /// Publish (the writer's call) to held in this relay's ring, per entry.
    pub propagation: LatencyHistogram,
}

impl RelayCore {
    /// Catch up from these failover lists from now on (as many as there were).
    pub fn set_groups(&self, groups: Vec<Vec<String>>) {
        *lock(&self.groups) = groups;
    }

    /// A relay core with empty rings, to follow each of `groups` (failover lists) on a link.
    pub fn new(
        node_id: String,
        groups: Vec<Vec<String>>,
        ring_bytes: usize,
        max_key_len: usize,
        tls: dci_proto::tls::ClientTls,
        instance: u64,
    ) -> Self {
        RelayCore {
            tls,
            instance,
            node_id,
            links: groups
                .iter()
                .map(|_| Arc::new(Mutex::new(LinkState::default())))
                .collect(),
            groups: Mutex::new(groups),
            owners: Mutex::new(HashMap::new()),
            ring_bytes,
            max_key_len,
            rings: Mutex::new(HashMap::new()),
            heads: watch::channel(0).0,
            reports: Default::default(),
            channels: Mutex::new(HashMap::new()),
            quarantined: AtomicU64::new(0),
            catch_ups: AtomicU64::new(0),
            catch_up_hits: AtomicU64::new(0),
            // A quarter of the ring: enough for the ranges edges resume from after a restart.
            fetched: Mutex::new(crate::fetched::Fetched::new(ring_bytes / 4)),
            under_way: Mutex::new(HashMap::new()),
            ring_restarts: AtomicU64::new(0),
            propagation: LatencyHistogram::default(),
        }
    }

    fn bump(&self) {
        self.heads.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Every node reported below this relay.
    pub fn reported(&self) -> Vec<pb::NodeStatus> {
        let heads: HashMap<ShardId, (Epoch, Seq)> = lock(&self.rings)
            .values()
            .map(|r| (r.shard(), (r.epoch(), r.head())))
            .collect();
        self.reports.aged(|s| heads.get(&s).copied())
    }

    /// All upstream links as one: every shard's progress; connected, and caught up, only while
    /// every link is.
    pub fn upstream(&self) -> LinkState {
        let links: Vec<LinkState> = self.links.iter().map(|l| lock(l).clone()).collect();
        let mut all = LinkState::default();
        let every = |f: &dyn Fn(&LinkState) -> Option<std::time::Instant>| {
            links.iter().map(f).collect::<Option<Vec<_>>>()
        };
        all.connected_to = links
            .iter()
            .map(|l| l.connected_to.clone())
            .collect::<Option<Vec<_>>>()
            .map(|v| v.join(" "));
        all.connected_since = every(&|l| l.connected_since).and_then(|v| v.into_iter().max());
        all.last_heard = every(&|l| l.last_heard).and_then(|v| v.into_iter().min());
        // Each shard is as fresh as the link that brings it (its own catching up and what its
        // sender vouches for), not as the node's own catching up: for that, every shard's
        // time goes into `vouched`, and the merged own time is the latest of the links' (none
        // while a link has none), which bounds none of them.
        all.last_caught_up = every(&|l| l.last_caught_up).and_then(|v| v.into_iter().max());
        let owners = lock(&self.owners).clone();
        for (group, l) in links.iter().enumerate() {
            for shard in l.shards() {
                if owners.get(&shard).is_none_or(|&g| g == group) {
                    all.vouched.push((shard, l.caught_up_for(shard)));
                }
            }
        }
        for l in links {
            all.progress.extend(l.progress);
            all.applied_time_us.extend(l.applied_time_us);
            all.head_time_us.extend(l.head_time_us);
            all.connects += l.connects;
            all.flushes += l.flushes;
            all.quarantined += l.quarantined;
            all.bad_batches += l.bad_batches;
        }
        all.progress.sort();
        all.applied_time_us.sort();
        all.head_time_us.sort();
        all
    }

    /// Why this relay should take no new receivers: it can vouch for no shard it carries (caught
    /// up with the shard's coordinator within `bound`), said link by link; `None` while it can
    /// for some. A coordinator of a sharded tier that is down cuts every relay off from its
    /// shard alone: were each relay unready for it, the relays' Service would have none, and an
    /// edge reconnecting meanwhile could follow no relay, the other shards' invalidations
    /// included. Its receivers leave it for one that can vouch for every shard, if there is one
    /// ([`dci_proto::upstream::sender_cut_off`]).
    pub fn unready(&self, now: std::time::Instant, bound: Duration) -> Option<String> {
        let mut why = Vec::new();
        let mut vouches = false;
        for l in &self.links {
            let l = lock(l);
            let shards = l.shards();
            vouches |= shards
                .iter()
                .any(|&s| l.unready(&[s], now, bound).is_none());
            why.extend(l.unready(&shards, now, bound));
        }
        (!vouches).then(|| why.join("; "))
    }

    /// Bytes held in rings.
    pub fn ring_bytes_used(&self) -> usize {
        lock(&self.rings).values().map(|r| r.bytes()).sum()
    }

    fn channel(&self, url: &str) -> Option<Channel> {
        let mut chans = lock(&self.channels);
        if let Some(c) = chans.get(url) {
            return Some(c.clone());
        }
        let c = self
            .tls
            .endpoint(url)
            .ok()?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .initial_stream_window_size(Some(2 << 20))
            .initial_connection_window_size(Some(8 << 20))
            .connect_lazy();
        chans.insert(url.to_string(), c.clone());
        Some(c)
    }

    /// Fetch `[from, until]` of a shard from upstream, for a receiver behind this relay's ring:
    /// from what an earlier catch-up fetched, or with the fetch under way from the same place, or
    /// else by a fetch of its own.
    async fn catch_up(
        &self,
        shard: ShardId,
        epoch: Epoch,
        from: Seq,
        until: Seq,
        budget: usize,
    ) -> Fetch {
        let kept = lock(&self.fetched).read(shard, epoch, from, budget);
        if !kept.is_empty() {
            self.catch_up_hits.fetch_add(1, Ordering::Relaxed);
            return Fetch::Batches(kept);
        }
        let cell = {
            let mut under_way = lock(&self.under_way);
            match under_way.get(&(shard, epoch, from)).and_then(Weak::upgrade) {
                Some(cell) => cell,
                None => {
                    // Fetches whose every receiver went away leave only dead entries.
                    under_way.retain(|_, w| w.strong_count() > 0);
                    let cell = Arc::new(UnderWay::new());
                    under_way.insert((shard, epoch, from), Arc::downgrade(&cell));
                    cell
                }
            }
        };
        // Whoever waits runs the fetch if the one running it went away (its receiver left).
        let fetched_here = std::sync::atomic::AtomicBool::new(false);
        let f = cell
            .get_or_init(|| {
                fetched_here.store(true, Ordering::Relaxed);
                self.fetch(shard, epoch, from, until, budget)
            })
            .await;
        if fetched_here.load(Ordering::Relaxed) {
            return f.clone();
        }
        self.catch_up_hits.fetch_add(1, Ordering::Relaxed);
        // What was fetched was kept: read it within this receiver's own budget.
        let kept = lock(&self.fetched).read(shard, epoch, from, budget);
        if kept.is_empty() {
            f.clone()
        } else {
            Fetch::Batches(kept)
        }
    }

    /// Fetch `[from, until]` from the group that brings the shard, and keep what came.
    async fn fetch(
        &self,
        shard: ShardId,
        epoch: Epoch,
        from: Seq,
        until: Seq,
        budget: usize,
    ) -> Fetch {
        self.catch_ups.fetch_add(1, Ordering::Relaxed);
        // The group that brings this shard, starting with the sender its link follows now.
        let group = lock(&self.owners).get(&shard).copied().unwrap_or(0);
        let mut urls = lock(&self.groups)[group].clone();
        if let Some(current) = lock(&self.links[group]).connected_to.clone() {
            urls.retain(|u| *u != current);
            urls.insert(0, current);
        }
        for url in urls {
            let Some(ch) = self.channel(&url) else {
                continue;
            };
            match self
                .catch_up_from(ch, shard, epoch, from, until, budget)
                .await
            {
                Ok(f) => {
                    if let Fetch::Batches(b) = &f {
                        lock(&self.fetched).keep(shard, epoch, b);
                    }
                    return f;
                }
                Err(e) => {
                    tracing::debug!(upstream = %url, error = %e, "catch-up failed");
                    // The next fetch makes a new channel: a lazy one would reconnect with what
                    // it was made with (an address, TLS files since renewed).
                    lock(&self.channels).remove(&url);
                }
            }
        }
        Fetch::NotYet
    }

    async fn catch_up_from(
        &self,
        ch: Channel,
        shard: ShardId,
        epoch: Epoch,
        from: Seq,
        until: Seq,
        budget: usize,
    ) -> Result<Fetch, String> {
        let mut client = SubscribeClient::new(ch).max_decoding_message_size(64 << 20);
        let (tx, rx) = mpsc::channel(4);
        tx.send(pb::Upstream {
            msg: Some(pb::upstream::Msg::Hello(pb::Hello {
                node_id: format!("{}/catch-up", self.node_id),
                region: String::new(),
                filter: None,
                resume: vec![pb::ResumePoint {
                    shard,
                    epoch,
                    hwm: from - 1,
                }],
                role: "catch-up".into(),
                zstd_batches: false,
                window_bytes: budget.max(1) as u64,
                instance: self.instance,
            })),
        })
        .await
        .map_err(|e| e.to_string())?;
        // Bounded as each message is: an upstream behind a partition that swallows packets
        // would otherwise hold the handshake, and this receiver's catch-up, for ever.
        let mut stream =
            tokio::time::timeout(CATCH_UP_SILENCE, client.subscribe(ReceiverStream::new(rx)))
                .await
                .map_err(|_| "upstream catch-up: no answer".to_string())?
                .map_err(|e| e.to_string())?
                .into_inner();
        let mut out = Vec::new();
        let mut used = 0usize;
        let mut next = from;
        loop {
            let msg = tokio::time::timeout(CATCH_UP_SILENCE, stream.message())
                .await
                .map_err(|_| "upstream catch-up timed out".to_string())?
                .map_err(|e| e.to_string())?;
            let Some(msg) = msg else { break };
            match msg.msg {
                Some(pb::downstream::Msg::Batch(bytes)) => {
                    let len = bytes.len();
                    let checked = Batch::decode_checked(bytes, self.max_key_len)
                        .map_err(|e| e.to_string())?;
                    let b = checked.batch;
                    if b.shard != shard || b.last_seq < next {
                        continue;
                    }
                    if b.first_seq > next {
                        return Err(format!("upstream skipped from {next} to {}", b.first_seq));
                    }
                    next = b.last_seq + 1;
                    used += len;
                    out.push(SharedBatch::new(b.after(from - 1)));
                    if next > until || used >= budget {
                        break;
                    }
                }
                Some(pb::downstream::Msg::Reset(r)) if r.shard == shard => return Ok(Fetch::Gone),
                Some(pb::downstream::Msg::Heartbeat(h))
                    if h.heads.iter().any(|x| x.shard == shard && x.head < from) =>
                {
                    break;
                }
                _ => {}
            }
        }
        drop(tx);
        Ok(if out.is_empty() {
            Fetch::NotYet
        } else {
            Fetch::Batches(out)
        })
    }
}

impl BatchSource for RelayCore {
    fn views(&self) -> Vec<ShardView> {
        let rings = lock(&self.rings);
        let mut v: Vec<_> = rings
            .values()
            .map(|r| ShardView {
                shard: r.shard(),
                epoch: r.epoch(),
                // Older ranges are fetched from upstream; if they are gone there too, the fetch
                // says so and the receiver is Reset.
                oldest: 1,
                head: r.head(),
                held_from: r.oldest(),
                head_time_us: r.head_publish_us(),
            })
            .collect();
        v.sort_by_key(|x| x.shard);
        v
    }

    fn heads(&self) -> watch::Receiver<u64> {
        self.heads.subscribe()
    }

    async fn read(&self, shard: ShardId, from: Seq, budget: usize) -> Fetch {
        let (read, epoch) = {
            let rings = lock(&self.rings);
            let Some(r) = rings.get(&shard) else {
                return Fetch::NotYet;
            };
            (r.read(from, budget), r.epoch())
        };
        match read {
            Read::Batches(b) => Fetch::Batches(b),
            Read::UpToDate => Fetch::NotYet,
            Read::Gone { oldest } => self.catch_up(shard, epoch, from, oldest - 1, budget).await,
        }
    }

    fn report(&self, link_id: u64, nodes: Vec<pb::NodeStatus>) {
        self.reports.insert(link_id, nodes);
    }

    fn acked(&self, link_id: u64, ack: &pb::Ack) {
        self.reports.acked(link_id, ack);
    }

    fn forget(&self, link_id: u64) {
        self.reports.forget(link_id);
    }

    fn shard_count(&self) -> u32 {
        self.links
            .iter()
            .map(|l| lock(l).shard_count)
            .max()
            .unwrap_or(0)
    }

    fn upstream_age_ms(&self, shard: ShardId) -> u64 {
        let Some(group) = lock(&self.owners).get(&shard).copied() else {
            return u64::MAX;
        };
        let caught_up = lock(&self.links[group]).caught_up_for(shard);
        // At least 1: an age of 0 says "the shard's source", which bounds nothing below it.
        caught_up.map_or(u64::MAX, |t| (t.elapsed().as_millis() as u64).max(1))
    }
}

/// The core as the follower of one upstream group sees it.
pub struct RelayApplier {
    core: Arc<RelayCore>,
    group: usize,
    /// Shards another group brought first (told once).
    ignored: std::collections::HashSet<ShardId>,
}

impl RelayApplier {
    /// The applier of the link of `group` (an index into the core's groups).
    pub fn new(core: Arc<RelayCore>, group: usize) -> Self {
        RelayApplier {
            core,
            group,
            ignored: Default::default(),
        }
    }

    /// Is this link the one that brings `shard` (the first to have brought it)?
    fn owns(&mut self, shard: ShardId) -> bool {
        let owner = *lock(&self.core.owners).entry(shard).or_insert(self.group);
        if owner != self.group && self.ignored.insert(shard) {
            tracing::warn!(
                shard,
                group = self.group,
                owner,
                "a second upstream group brings this shard; its batches are ignored"
            );
        }
        owner == self.group
    }

    fn push(&mut self, batch: &Batch, shared: Arc<SharedBatch>) {
        if !self.owns(batch.shard) {
            return;
        }
        let core = &self.core;
        {
            let mut rings = lock(&core.rings);
            let ring = ring_of(
                &mut rings,
                core.ring_bytes,
                batch.shard,
                batch.epoch,
                batch.first_seq - 1,
            );
            if ring.epoch() != batch.epoch || ring.head() + 1 != batch.first_seq {
                // The link protocol delivers contiguous ranges; anything else means our ring
                // no longer describes upstream: start it over where upstream is.
                tracing::warn!(
                    shard = batch.shard,
                    head = ring.head(),
                    first = batch.first_seq,
                    "ring restarted"
                );
                ring.reset(batch.epoch, batch.first_seq - 1);
                core.ring_restarts.fetch_add(1, Ordering::Relaxed);
            }
            if let Err(e) = ring.push(shared) {
                tracing::error!(error = %e, "ring refused a batch");
            }
        }
        core.bump();
        core.propagation.observe_published(batch);
    }
}

/// The ring of `shard`, made (empty, at `epoch` and `head`) if the relay carries no ring of it
/// yet. The rings share `ring_bytes` out evenly: a relay of a sharded tier takes what it is told,
/// however many shards it carries, and each shard, a share of the invalidations, a share of the
/// memory, so a ring covers about as long a time as one ring of all of them would.
fn ring_of(
    rings: &mut HashMap<ShardId, RetransmitRing>,
    ring_bytes: usize,
    shard: ShardId,
    epoch: Epoch,
    head: Seq,
) -> &mut RetransmitRing {
    let share = ring_bytes / (rings.len() + 1);
    if !rings.contains_key(&shard) {
        for ring in rings.values_mut() {
            ring.set_cap_bytes(share);
        }
    }
    rings
        .entry(shard)
        .or_insert_with(|| RetransmitRing::new(shard, epoch, head, share))
}

/// Batches smaller than this are copied into the ring, not kept as received. What arrives is a
/// slice of the link's receive buffer (several KiB), shared with what arrived around it, of other
/// shards too on a link that carries several (a relay following a relay): a small batch of a
/// quiet shard, kept while its ring is not full, would keep all of that alive (about 10 KiB for
/// each such batch, measured). A larger batch is most of its buffer.
const COPY_BELOW: usize = 16 << 10;

impl Applier for RelayApplier {
    fn apply(&mut self, batch: &Batch) {
        let shared = SharedBatch::new(batch.clone());
        let shared = if shared.encoded.len() < COPY_BELOW {
            // The encoding is this relay's own; the entries' keys are what came in.
            let mut own = batch.clone();
            dci_proto::own_bytes(&mut own.entries);
            SharedBatch::from_encoded(own, shared.encoded.clone())
        } else {
            shared
        };
        self.push(batch, shared);
    }

    fn apply_shared(&mut self, batch: &Arc<Batch>, encoded: Option<&bytes::Bytes>) {
        // The ring keeps the batch as decoded, and upstream's bytes when they describe it: this
        // relay copies nothing but small batches, and encodes nothing for receivers without a
        // filter.
        let shared = match encoded {
            Some(bytes) if bytes.len() < COPY_BELOW => {
                let (own, encoded) = batch.owned(bytes);
                SharedBatch::from_encoded(own, encoded)
            }
            Some(bytes) => SharedBatch::from_encoded(batch.clone(), bytes.clone()),
            None => {
                return self.apply(batch);
            }
        };
        self.push(batch, shared);
    }

    fn quarantine(&mut self, _: ShardId, _: &pb::Invalidation, _: &str) {
        // Told by the link, which quarantines it.
        self.core.quarantined.fetch_add(1, Ordering::Relaxed);
    }

    fn flush(&mut self, shard: ShardId, epoch: Epoch, hwm: Seq, reason: &str) {
        if !self.owns(shard) {
            return;
        }
        let core = &self.core;
        let mut rings = lock(&core.rings);
        if rings.contains_key(&shard) {
            tracing::warn!(
                shard,
                epoch,
                hwm,
                reason,
                "relay ring flushed; receivers will be reset"
            );
        } else {
            // A relay's first position in a shard is routine, not a problem.
            tracing::info!(shard, epoch, hwm, reason, "relay ring starts");
        }
        ring_of(&mut rings, core.ring_bytes, shard, epoch, hwm).reset(epoch, hwm);
        drop(rings);
        core.bump();
    }

    fn subtree(&self) -> Vec<pb::NodeStatus> {
        self.core.reported()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use dci_proto::Invalidation;
    use prost::Message;

    /// A relay caught up this very moment still tells an age: 0 would make it the shard's source.
    #[test]
    fn a_relay_never_tells_its_receivers_it_is_the_source() {
        let core = RelayCore::new(
            "r".into(),
            vec![vec!["http://127.0.0.1:1".into()]],
            64 << 20,
            1024,
            Default::default(),
            1,
        );
        lock(&core.owners).insert(0, 0);
        {
            let mut link = lock(&core.links[0]);
            link.progress = vec![(0, 1, 5, 5)];
            link.last_caught_up = Some(std::time::Instant::now());
        }
        assert_eq!(core.upstream_age_ms(0), 1);
        assert_eq!(
            core.upstream_age_ms(1),
            u64::MAX,
            "a shard it does not carry"
        );
    }

    /// The rings of all the shards a relay carries hold `ring_bytes` in all: a ring that is
    /// alone takes all of it, and gives up its oldest batches as rings of other shards come.
    #[test]
    fn the_rings_share_ring_bytes_out_among_the_shards() {
        const RING_BYTES: usize = 256 << 10;
        let core = Arc::new(RelayCore::new(
            "r".into(),
            vec![vec!["http://127.0.0.1:1".into()]],
            RING_BYTES,
            1024,
            Default::default(),
            1,
        ));
        let mut applier = RelayApplier::new(core.clone(), 0);
        let mut heads = [0u64; 4];
        // The most a batch takes in a ring: a ring goes past its share by less than one.
        let mut batch_bytes = 0;
        let mut receive = |shard: ShardId| {
            let first = heads[shard as usize] + 1;
            let b = Batch {
                shard,
                epoch: 1,
                first_seq: first,
                last_seq: first + 99,
                entries: (first..first + 100)
                    .map(|seq| Invalidation {
                        seq,
                        ..Invalidation::key(format!("user:{seq:06}:profile"))
                    })
                    .collect(),
            };
            heads[shard as usize] += 100;
            batch_bytes = batch_bytes.max(2 * SharedBatch::new(b.clone()).footprint());
            applier.apply(&b);
            let held: usize = lock(&core.rings).values().map(|r| r.bytes()).sum();
            (held, batch_bytes)
        };
        let mut held = 0;
        while held < RING_BYTES * 9 / 10 {
            held = receive(0).0;
        }
        let oldest = |shard: ShardId| lock(&core.rings)[&shard].oldest();
        assert_eq!(oldest(0), 1, "alone, shard 0 holds all it was sent");
        let mut slack = 0;
        for _ in 0..1_000 {
            for shard in 0..4 {
                (held, slack) = receive(shard);
                assert!(held <= RING_BYTES + 4 * slack, "{held} bytes held");
            }
        }
        assert!(held > RING_BYTES / 2, "{held} bytes held");
        for shard in 0..4 {
            let ring = &lock(&core.rings)[&shard];
            assert!(ring.bytes() <= RING_BYTES / 4 + slack, "{}", ring.bytes());
            assert!(ring.oldest() > 1, "shard {shard} gave up its oldest");
        }
    }

    /// A small batch received as a slice of a large buffer is kept in the ring as a copy, and a
    /// large one as received: the ring holds nothing of the buffer around a small batch.
    #[test]
    fn the_ring_keeps_small_batches_apart_from_the_buffer_they_came_in() {
        let core = Arc::new(RelayCore::new(
            "r".into(),
            vec![vec!["http://127.0.0.1:1".into()]],
            64 << 20,
            1024,
            Default::default(),
            1,
        ));
        let mut applier = RelayApplier::new(core.clone(), 0);
        let mut first = 1;
        let mut receive = |entries: u64| {
            let b = Batch {
                shard: 0,
                epoch: 1,
                first_seq: first,
                last_seq: first + entries - 1,
                entries: (first..first + entries)
                    .map(|seq| Invalidation {
                        seq,
                        ..Invalidation::key(format!("user:{seq:06}:profile"))
                    })
                    .collect(),
            };
            first += entries;
            let encoded = b.to_pb().encode_to_vec();
            let mut buffer = vec![0u8; 100 + encoded.len() + (64 << 10)];
            buffer[100..100 + encoded.len()].copy_from_slice(&encoded);
            let buffer = Bytes::from(buffer);
            let received = buffer.slice(100..100 + encoded.len());
            let decoded = Batch::decode_checked(received.clone(), 1024).unwrap().batch;
            applier.apply_shared(&Arc::new(decoded), Some(&received));
            buffer
        };
        let small = receive(20);
        let large = receive(2_000);
        let Read::Batches(held) = lock(&core.rings)[&0].read(1, usize::MAX) else {
            panic!("the ring holds both");
        };
        let inside = |x: &Bytes, of: &Bytes| of.as_ptr_range().contains(&x.as_ptr());
        assert_eq!(held.len(), 2);
        assert!(!inside(&held[0].encoded, &small));
        assert!(held[0]
            .batch
            .entries
            .iter()
            .all(|e| !inside(&e.key, &small)));
        assert!(
            inside(&held[1].encoded, &large),
            "a large batch is not copied"
        );
    }
}
