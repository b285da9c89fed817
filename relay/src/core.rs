//! The relay's state: one retransmit ring per shard, fed by the upstream link and read by every
//! downstream link. Ranges older than the ring are fetched from upstream on demand.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
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
use tonic::transport::{Channel, Endpoint};

/// Shared by the upstream follower and every downstream link.
pub struct RelayCore {
    node_id: String,
    upstream: Vec<String>,
    ring_bytes: usize,
    max_key_len: usize,
    rings: Mutex<HashMap<ShardId, RetransmitRing>>,
    heads: watch::Sender<u64>,
    reports: Mutex<HashMap<u64, Vec<pb::NodeStatus>>>,
    channels: Mutex<HashMap<String, Channel>>,
    /// The upstream link, for status and for choosing where to catch up from.
    pub link: Arc<Mutex<LinkState>>,
    /// Entries quarantined.
    pub quarantined: AtomicU64,
    /// Catch-up fetches from upstream.
    pub catch_ups: AtomicU64,
    /// Publish (the writer's call) to held in this relay's ring, per entry.
    pub propagation: LatencyHistogram,
}

impl RelayCore {
    /// A relay core with empty rings.
    pub fn new(
        node_id: String,
        upstream: Vec<String>,
        ring_bytes: usize,
        max_key_len: usize,
    ) -> Self {
        RelayCore {
            node_id,
            upstream,
            ring_bytes,
            max_key_len,
            rings: Mutex::new(HashMap::new()),
            heads: watch::channel(0).0,
            reports: Mutex::new(HashMap::new()),
            channels: Mutex::new(HashMap::new()),
            link: Arc::new(Mutex::new(LinkState::default())),
            quarantined: AtomicU64::new(0),
            catch_ups: AtomicU64::new(0),
            propagation: LatencyHistogram::default(),
        }
    }

    fn bump(&self) {
        self.heads.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Every node reported below this relay.
    pub fn reported(&self) -> Vec<pb::NodeStatus> {
        let mut v: Vec<_> = lock(&self.reports).values().flatten().cloned().collect();
        v.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        v
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
        let c = Endpoint::from_shared(url.to_string())
            .ok()?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .initial_stream_window_size(Some(2 << 20))
            .initial_connection_window_size(Some(8 << 20))
            .connect_lazy();
        chans.insert(url.to_string(), c.clone());
        Some(c)
    }

    /// Fetch `[from, until]` of a shard from upstream, for a receiver behind this relay's ring.
    async fn catch_up(
        &self,
        shard: ShardId,
        epoch: Epoch,
        from: Seq,
        until: Seq,
        budget: usize,
    ) -> Fetch {
        self.catch_ups.fetch_add(1, Ordering::Relaxed);
        let mut urls = self.upstream.clone();
        if let Some(current) = lock(&self.link).connected_to.clone() {
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
                Ok(f) => return f,
                Err(e) => tracing::debug!(upstream = %url, error = %e, "catch-up failed"),
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
            })),
        })
        .await
        .map_err(|e| e.to_string())?;
        let mut stream = client
            .subscribe(ReceiverStream::new(rx))
            .await
            .map_err(|e| e.to_string())?
            .into_inner();
        let mut out = Vec::new();
        let mut used = 0usize;
        let mut next = from;
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(5), stream.message())
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
        lock(&self.reports).insert(link_id, nodes);
    }

    fn forget(&self, link_id: u64) {
        lock(&self.reports).remove(&link_id);
    }
}

/// The upstream follower's view of the core.
pub struct RelayApplier(pub Arc<RelayCore>);

impl RelayApplier {
    fn push(&mut self, batch: &Batch, shared: Arc<SharedBatch>) {
        let core = &self.0;
        {
            let mut rings = lock(&core.rings);
            let ring = rings.entry(batch.shard).or_insert_with(|| {
                RetransmitRing::new(
                    batch.shard,
                    batch.epoch,
                    batch.first_seq - 1,
                    core.ring_bytes,
                )
            });
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
            }
            if let Err(e) = ring.push(shared) {
                tracing::error!(error = %e, "ring refused a batch");
            }
        }
        core.bump();
        core.propagation.observe_published(&batch.entries);
    }
}

impl Applier for RelayApplier {
    fn apply(&mut self, batch: &Batch) {
        self.push(batch, SharedBatch::new(batch.clone()));
    }

    fn apply_shared(&mut self, batch: &Arc<Batch>, encoded: Option<&bytes::Bytes>) {
        // The ring keeps the batch as decoded, and upstream's bytes when they describe it: this
        // relay copies nothing, and encodes nothing for receivers without a filter.
        let shared = match encoded {
            Some(bytes) => SharedBatch::from_encoded(batch.clone(), bytes.clone()),
            None => SharedBatch::new(batch.clone()),
        };
        self.push(batch, shared);
    }

    fn quarantine(&mut self, shard: ShardId, entry: &pb::Invalidation, why: &str) {
        self.0.quarantined.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(shard, seq = entry.seq, %why, "entry quarantined at relay; a stand-in goes on");
    }

    fn flush(&mut self, shard: ShardId, epoch: Epoch, hwm: Seq, reason: &str) {
        let core = &self.0;
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
        rings
            .entry(shard)
            .and_modify(|r| r.reset(epoch, hwm))
            .or_insert_with(|| RetransmitRing::new(shard, epoch, hwm, core.ring_bytes));
        drop(rings);
        core.bump();
    }

    fn subtree(&self) -> Vec<pb::NodeStatus> {
        self.0.reported()
    }
}
