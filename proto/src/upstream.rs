//! Following a sender: the runtime around [`crate::link::Receiver`], used by relays, edges and near caches.
//!
//! One task per node. It connects to the first reachable sender of its list, says Hello with its
//! resume points (what it has applied), feeds what arrives into the receiver state machine and
//! carries out the commands: apply into the node's [`Applier`], flush on Reset, acks, nacks. When
//! the sender goes silent or the stream breaks it moves to the next sender in the list, with
//! backoff and jitter, and resumes there from its high-water mark: seqs are end-to-end, so any
//! sender of the shard can continue where another stopped.

use std::collections::HashSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::link::{Receiver, ReceiverConfig, RxCommand};
use crate::pb;
use crate::pb::subscribe_client::SubscribeClient;
use crate::types::{stand_in, Batch, Epoch, Filter, Seq, ShardId};

/// Where applied invalidations go.
pub trait Applier: Send + 'static {
    /// Apply a contiguous range (entries already validated). A panic here is caught: the batch is
    /// applied entry by entry and the entry that panics is quarantined.
    fn apply(&mut self, batch: &Batch);
    /// Like [`Applier::apply`], with the batch shared and, when it was applied whole as it
    /// arrived, its encoding: for appliers that pass batches on (a relay's ring holds the batch
    /// without a copy and sends these bytes downstream instead of encoding again).
    fn apply_shared(&mut self, batch: &Arc<Batch>, _encoded: Option<&bytes::Bytes>) {
        self.apply(batch)
    }
    /// An entry that failed validation or panicked: drop what it may have made stale (its key),
    /// record it, count it. The stream goes on.
    fn quarantine(&mut self, shard: ShardId, entry: &pb::Invalidation, why: &str);
    /// Drop everything of `shard` that may be stale; continue after `hwm` in `epoch`.
    fn flush(&mut self, shard: ShardId, epoch: Epoch, hwm: Seq, reason: &str);
    /// The node follows `filter` from now on. Called between links: nothing is applied from the
    /// last link any more, and the next asks for `filter` from where this node has applied, so
    /// the node can drop what it no longer follows and start serving what it gained.
    fn refilter(&mut self, _filter: &Filter) {}
    /// The nodes below this one (for the heartbeat's subtree report).
    fn subtree(&self) -> Vec<pb::NodeStatus> {
        Vec::new()
    }
}

/// The shortest `peer_timeout` a node takes: two of a sender's heartbeats (500 ms apart), so a
/// healthy sender is never taken for a silent one.
pub const MIN_PEER_TIMEOUT: Duration = Duration::from_secs(1);

/// Most bytes of node reports in one heartbeat: well below the 4 MiB a gRPC server takes in one
/// message by default, so however many nodes sit below a relay, its heartbeats never grow into
/// a message its sender refuses (which would break the link, over and over). Beyond it (several
/// thousand nodes), the reports that do not fit are summed up ([`bounded_subtree`]).
pub const MAX_SUBTREE_BYTES: usize = 1 << 20;

/// The bytes a report takes in a heartbeat (a length-delimited field).
fn report_bytes(n: &pb::NodeStatus) -> usize {
    use prost::Message;
    let len = n.encoded_len();
    len + prost::encoding::encoded_len_varint(len as u64) + 1
}

/// The most bytes a report of this node can take, whatever its numbers: what it takes with each
/// at its largest. Which nodes fit in a heartbeat is decided by these, so that it changes only
/// when nodes come or go, not as their numbers grow (a node that moved from its own report into a
/// summary would look gone to a wait, which would then hold out for it until its bound).
fn worst_case_bytes(n: &pb::NodeStatus) -> usize {
    let mut w = pb::NodeStatus {
        connected_ms: u64::MAX,
        max_staleness_ms: u64::MAX,
        left_out: u32::MAX,
        restarted: true,
        ..n.clone()
    };
    for s in &mut w.shards {
        *s = pb::ShardProgress {
            shard: u32::MAX,
            epoch: u64::MAX,
            hwm: u64::MAX,
            lag_seqs: u64::MAX,
            lag_ms: u64::MAX,
            caught_up_ms: u64::MAX,
        };
    }
    report_bytes(&w)
}

/// The reports `me` sends up (its own first), within `max_bytes`: all of them if they fit, else
/// the first ones that fit beside one summary per role and region of the others
/// ([`pb::NodeStatus::left_out`]), so that every cache below is still accounted for (a wait
/// for a publish to be applied everywhere waits for the least advanced of those left out). Also
/// how many were left out. What fits is reckoned by its worst case in bytes, so the same nodes are
/// reported one by one from one heartbeat to the next while the tree stays the same, and those
/// of the last heartbeat (`alone`, which this updates) come first. Summaries
/// by region take at most half the bytes; beyond (nodes of thousands of regions), they are by
/// role alone; beyond that, there is none.
pub fn bounded_subtree(
    mut nodes: Vec<pb::NodeStatus>,
    max_bytes: usize,
    me: &str,
    alone: &mut HashSet<String>,
) -> (Vec<pb::NodeStatus>, usize) {
    let mut sizes: Vec<usize> = nodes.iter().map(worst_case_bytes).collect();
    if sizes.iter().sum::<usize>() <= max_bytes {
        *alone = nodes.iter().map(|n| n.node_id.clone()).collect();
        return (nodes, 0);
    }
    // Those reported one by one last time (`alone`) go first: a node that joins goes into a
    // summary rather than push one of them into it.
    if nodes.len() > 1 {
        let rest = nodes.split_off(1).into_iter().zip(sizes.split_off(1));
        let (were, others): (Vec<_>, Vec<_>) = rest.partition(|(n, _)| alone.contains(&n.node_id));
        for (n, size) in were.into_iter().chain(others) {
            nodes.push(n);
            sizes.push(size);
        }
    }
    let worst_of = |s: &[pb::NodeStatus]| s.iter().map(worst_case_bytes).sum::<usize>();
    // Room for the summaries of every node past this one is room for those of any tail: their
    // groups, and the shards of each, are among them.
    let rest = &nodes[1.min(nodes.len())..];
    let by_region = [true, false]
        .into_iter()
        .map(|by_region| (by_region, summarize(rest, me, by_region)))
        .find(|(_, all)| worst_of(all) <= max_bytes / 2);
    let reserve = by_region.as_ref().map_or(0, |(_, all)| worst_of(all));
    let mut bytes = 0;
    let keep = sizes
        .iter()
        .take_while(|&&n| {
            bytes += n;
            bytes <= max_bytes.saturating_sub(reserve)
        })
        .count()
        .max(1.min(nodes.len()));
    let summaries = by_region
        .as_ref()
        .map_or_else(Vec::new, |(by, _)| summarize(&nodes[keep..], me, *by));
    let left_out = nodes.len() - keep;
    nodes.truncate(keep);
    *alone = nodes.iter().map(|n| n.node_id.clone()).collect();
    nodes.extend(summaries);
    (nodes, left_out)
}

/// One report per role (a role that is not one of this tree's own counts as `other`) and, if
/// `by_region`, region, standing for `nodes`: see [`pb::NodeStatus::left_out`].
fn summarize(nodes: &[pb::NodeStatus], me: &str, by_region: bool) -> Vec<pb::NodeStatus> {
    const ROLES: [&str; 4] = ["edge", "near-cache", "relay", "follow"];
    let mut groups: std::collections::BTreeMap<(&str, &str), pb::NodeStatus> = Default::default();
    for n in nodes {
        let role = ROLES
            .iter()
            .find(|r| **r == n.role)
            .copied()
            .unwrap_or("other");
        let region = if by_region { n.region.as_str() } else { "" };
        let count = n.left_out.max(1);
        let g = groups
            .entry((role, region))
            .or_insert_with(|| pb::NodeStatus {
                node_id: match region {
                    "" => format!("{role}s left out by {me}"),
                    r => format!("{role}s of {r} left out by {me}"),
                },
                role: role.into(),
                region: region.into(),
                parent: me.into(),
                shards: Vec::new(),
                connected_ms: n.connected_ms,
                max_staleness_ms: n.max_staleness_ms,
                left_out: 0,
                restarted: false,
                failure: String::new(),
            });
        g.left_out = g.left_out.saturating_add(count);
        g.connected_ms = g.connected_ms.min(n.connected_ms);
        // One that does not say its bound makes the whole of them not say it.
        g.max_staleness_ms = match (g.max_staleness_ms, n.max_staleness_ms) {
            (0, _) | (_, 0) => 0,
            (a, b) => a.max(b),
        };
        for s in &n.shards {
            match g.shards.iter_mut().find(|x| x.shard == s.shard) {
                None => g.shards.push(*s),
                Some(x) => {
                    (x.epoch, x.hwm) = (x.epoch, x.hwm).min((s.epoch, s.hwm));
                    x.lag_seqs = x.lag_seqs.max(s.lag_seqs);
                    x.lag_ms = x.lag_ms.max(s.lag_ms);
                    x.caught_up_ms = x.caught_up_ms.max(s.caught_up_ms);
                }
            }
        }
    }
    groups
        .into_values()
        .map(|mut g| {
            g.shards.sort_by_key(|s| s.shard);
            g
        })
        .collect()
}

/// Reports of the nodes below a sender as they stand `age` after they arrived, given the
/// sender's `(epoch, head)` of each shard now: a node that went silent (stopped, stuck, cut off
/// but not yet dropped) shows its last catch-up receding and what it lacks of the head growing,
/// rather than the numbers of its last report. Each level of relays adds the age of what it
/// holds, so a report from deep in the tree is aged by every hop. The lag in time is left as
/// reported: how long a node has lacked a seq needs when the seq was logged, which the root
/// knows (and uses), while the report's age alone would overstate it for every healthy node.
pub fn aged_reports(
    nodes: &[pb::NodeStatus],
    age: Duration,
    head_of: impl Fn(ShardId) -> Option<(Epoch, Seq)>,
) -> Vec<pb::NodeStatus> {
    let age_ms = age.as_millis().min(u64::MAX as u128) as u64;
    nodes
        .iter()
        .map(|n| {
            let mut n = n.clone();
            n.connected_ms = n.connected_ms.saturating_add(age_ms);
            for s in &mut n.shards {
                if s.caught_up_ms != u64::MAX {
                    s.caught_up_ms = s.caught_up_ms.saturating_add(age_ms);
                }
                if let Some((epoch, head)) = head_of(s.shard) {
                    if epoch == s.epoch {
                        s.lag_seqs = s.lag_seqs.max(head.saturating_sub(s.hwm));
                    }
                }
            }
            n
        })
        .collect()
}

/// What each receiver of a sender last reported of itself and its subtree, and when, by link.
/// The caches of a link that ended are still reported, as of their last report (no longer
/// connected), for as long as they may still serve what they hold: their staleness bound. A
/// wait for a publish to be applied everywhere then holds for them, where it took the moment a
/// relay was between senders for a tree without them.
#[derive(Debug, Default)]
pub struct Reports(Mutex<std::collections::HashMap<u64, Report>>);

#[derive(Debug)]
struct Report {
    at: Instant,
    nodes: Vec<pb::NodeStatus>,
    /// When the link ended, if it has.
    ended: Option<Instant>,
}

/// How long a cache whose link ended is still reported: its bound, and the margin a wait gives
/// bounds ([`crate::applied::BOUND_SLACK`]); `None` for a node that serves no value or does not
/// say its bound.
fn reported_after_its_link(n: &pb::NodeStatus) -> Option<Duration> {
    (crate::applied::CACHE_ROLES.contains(&n.role.as_str()) && n.max_staleness_ms > 0).then(|| {
        Duration::from_millis(n.max_staleness_ms).saturating_add(crate::applied::BOUND_SLACK)
    })
}

impl Reports {
    /// A link's receiver reported these nodes, now.
    pub fn insert(&self, link_id: u64, nodes: Vec<pb::NodeStatus>) {
        let report = Report {
            at: Instant::now(),
            nodes,
            ended: None,
        };
        lock(&self.0).insert(link_id, report);
    }

    /// The link's receiver acknowledged `ack`: its own progress (the first node it reports) is
    /// that far now, though its last report is older.
    pub fn acked(&self, link_id: u64, ack: &pb::Ack) {
        let mut reports = lock(&self.0);
        let Some(me) = reports
            .get_mut(&link_id)
            .filter(|r| r.ended.is_none())
            .and_then(|r| r.nodes.first_mut())
        else {
            return;
        };
        let Some(s) = me
            .shards
            .iter_mut()
            .find(|s| s.shard == ack.shard && s.epoch == ack.epoch)
        else {
            return;
        };
        if ack.hwm > s.hwm {
            s.lag_seqs = s.lag_seqs.saturating_sub(ack.hwm - s.hwm);
            s.hwm = ack.hwm;
            if s.lag_seqs == 0 {
                s.lag_ms = 0;
            }
        }
    }

    /// The link ended: its nodes are no longer below this sender, but its caches are still
    /// reported for their bound.
    pub fn forget(&self, link_id: u64) {
        self.forget_at(link_id, Instant::now());
    }

    fn forget_at(&self, link_id: u64, now: Instant) {
        let mut reports = lock(&self.0);
        let Some(mut r) = reports.remove(&link_id) else {
            return;
        };
        r.nodes.retain(|n| reported_after_its_link(n).is_some());
        if !r.nodes.is_empty() {
            r.ended = Some(now);
            reports.insert(link_id, r);
        }
    }

    /// Every node reported, as it stands now ([`aged_reports`], against the sender's heads),
    /// by node id. A cache whose link ended is reported as no longer connected, until its
    /// bound has passed or it is reported through a link of now.
    pub fn aged(&self, head_of: impl Fn(ShardId) -> Option<(Epoch, Seq)>) -> Vec<pb::NodeStatus> {
        self.aged_at(Instant::now(), head_of)
    }

    fn aged_at(
        &self,
        now: Instant,
        head_of: impl Fn(ShardId) -> Option<(Epoch, Seq)>,
    ) -> Vec<pb::NodeStatus> {
        let mut reports = lock(&self.0);
        reports.retain(|_, r| {
            r.ended.is_none_or(|ended| {
                r.nodes
                    .retain(|n| reported_after_its_link(n).is_some_and(|keep| now < ended + keep));
                !r.nodes.is_empty()
            })
        });
        let live: HashSet<&str> = reports
            .values()
            .filter(|r| r.ended.is_none())
            .flat_map(|r| r.nodes.iter().map(|n| n.node_id.as_str()))
            .collect();
        let mut v: Vec<_> = reports
            .values()
            .flat_map(|r| {
                let age = now.saturating_duration_since(r.at);
                let mut nodes = aged_reports(&r.nodes, age, &head_of);
                if r.ended.is_some() {
                    nodes.retain(|n| !live.contains(n.node_id.as_str()));
                    for n in &mut nodes {
                        n.connected_ms = 0;
                    }
                }
                nodes
            })
            .collect();
        v.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        v
    }
}

/// How to follow.
#[derive(Clone, Debug)]
pub struct FollowOptions {
    /// Senders, tried in order (then around again).
    pub urls: Vec<String>,
    /// This node's id.
    pub node_id: String,
    /// This node's region.
    pub region: String,
    /// "relay", "edge", "near-cache".
    pub role: String,
    /// What this node wants.
    pub filter: Filter,
    /// Receiver tunables.
    pub receiver: ReceiverConfig,
    /// Heartbeat period towards the sender.
    pub heartbeat_interval: Duration,
    /// Give up on a sender silent for this long and move to the next.
    pub peer_timeout: Duration,
    /// First reconnect delay; doubles up to `backoff_max`, with jitter.
    pub backoff_min: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
    /// Connect timeout per attempt.
    pub connect_timeout: Duration,
    /// Longest key accepted from the stream.
    pub max_key_len: usize,
    /// Where to resume (shard, epoch, hwm), for a node that kept state.
    pub resume: Vec<(ShardId, Epoch, Seq)>,
    /// Ask for zstd-compressed batches (compressed once per batch by the sender, shared).
    pub compression: bool,
    /// How to speak TLS to `https://` senders.
    pub tls: crate::tls::ClientTls,
    /// This node's random number (`Hello.instance`; drawn by default), by which a node that
    /// serves streams too knows itself when given its own URL to follow, and a sender tells
    /// two nodes that call themselves the same apart.
    pub instance: u64,
    /// New senders and filter while following (a reloaded config): the link in use is left and
    /// the next is made with them.
    pub changes: Option<watch::Receiver<Following>>,
    /// A cache's staleness bound, told in its reports: past it without catching up it serves
    /// only misses, so whoever waits for it to apply an invalidation can stop waiting then.
    pub max_staleness: Option<Duration>,
}

/// What a node follows: its senders, in failover order, and its filter.
#[derive(Clone, Debug, Default)]
pub struct Following {
    /// Senders, tried in order.
    pub urls: Vec<String>,
    /// What this node wants.
    pub filter: Filter,
}

/// The next change on `changes`; never, when there is none to wait for.
async fn next_change(changes: &mut Option<watch::Receiver<Following>>) -> Following {
    loop {
        match changes {
            None => std::future::pending::<()>().await,
            Some(rx) => match rx.changed().await {
                Ok(()) => return rx.borrow_and_update().clone(),
                Err(_) => *changes = None,
            },
        }
    }
}

impl Default for FollowOptions {
    fn default() -> Self {
        FollowOptions {
            urls: Vec::new(),
            node_id: String::new(),
            region: String::new(),
            role: "edge".into(),
            filter: Filter::default(),
            receiver: ReceiverConfig::default(),
            heartbeat_interval: Duration::from_millis(500),
            peer_timeout: Duration::from_secs(3),
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(1),
            max_key_len: crate::types::DEFAULT_MAX_KEY_LEN,
            resume: Vec::new(),
            compression: false,
            tls: Default::default(),
            // Non-zero: a sender tells two nodes that call themselves the same apart by it.
            instance: rand::random::<u64>() | 1,
            changes: None,
            max_staleness: None,
        }
    }
}

/// What the link looks like now, shared with the node (status, staleness bound).
#[derive(Debug, Default, Clone)]
pub struct LinkState {
    /// The sender currently followed.
    pub connected_to: Option<String>,
    /// Since when.
    pub connected_since: Option<Instant>,
    /// Last time anything arrived from a sender.
    pub last_heard: Option<Instant>,
    /// Last time this node had applied everything its sender had announced.
    pub last_caught_up: Option<Instant>,
    /// Per shard: (epoch, applied, highest head seen).
    pub progress: Vec<(ShardId, Epoch, Seq, Seq)>,
    /// Publish time of the newest entry applied, per shard (µs since the Unix epoch).
    pub applied_time_us: Vec<(ShardId, u64)>,
    /// Publish time of the sender's head, per shard, from its heartbeats.
    pub head_time_us: Vec<(ShardId, u64)>,
    /// Per shard, when the sender was last caught up with its own sender, as its heartbeats tell
    /// (`None`: never, or longer ago than this clock can say).
    pub vouched: Vec<(ShardId, Option<Instant>)>,
    /// Links opened so far.
    pub connects: u64,
    /// Flushes (Resets) so far.
    pub flushes: u64,
    /// Entries quarantined so far.
    pub quarantined: u64,
    /// Batches that did not decode.
    pub bad_batches: u64,
    /// How many shards the coordinator tier has, as the sender last said (0: not said).
    pub shard_count: u32,
    /// The pace of the warnings for poisoned entries and for batches that do not decode.
    pub poison_log: crate::throttle::Throttle,
}

impl LinkState {
    /// Has this node been caught up, on every shard, within `bound`: with its sender, and its
    /// sender with its own (and so on up to the coordinator)?
    pub fn fresh_within(&self, now: Instant, bound: Duration) -> bool {
        let within =
            |t: Option<Instant>| t.is_some_and(|t| now.saturating_duration_since(t) <= bound);
        // A node in no shard yet has heard of no coordinator: nothing vouches for what it holds.
        !self.progress.is_empty()
            && within(self.last_caught_up)
            && self.vouched.iter().all(|&(_, t)| within(t))
    }

    /// Like [`LinkState::fresh_within`], for one shard: what an edge asks before serving a key.
    pub fn fresh_for(&self, shard: ShardId, now: Instant, bound: Duration) -> bool {
        self.caught_up_for(shard)
            .is_some_and(|t| now.saturating_duration_since(t) <= bound)
    }

    /// When this node was last caught up on `shard` all the way up: the older of its own catching
    /// up with its sender and the moment its sender last was (a sender that never said is taken
    /// at its word that it is the source).
    pub fn caught_up_for(&self, shard: ShardId) -> Option<Instant> {
        // No position in the shard: no sender ever said it has the shard (one that cannot reach
        // a coordinator, say), so nothing was ever caught up with.
        if !self.progress.iter().any(|&(s, ..)| s == shard) {
            return None;
        }
        let own = self.last_caught_up?;
        match self.vouched.iter().find(|(s, _)| *s == shard) {
            Some(&(_, upstream)) => Some(own.min(upstream?)),
            None => Some(own),
        }
    }

    /// Why this node cannot vouch, for each of `shards`, that it was caught up all the way to the
    /// shard's coordinator within `bound` (what a readiness probe asks), or `None` if it can.
    pub fn unready(&self, shards: &[ShardId], now: Instant, bound: Duration) -> Option<String> {
        let from = match &self.connected_to {
            Some(url) => format!("following {url}"),
            None => "connected to no sender".to_string(),
        };
        if shards.is_empty() {
            return Some(format!(
                "no shard from its sender yet ({from}): it has reached no coordinator"
            ));
        }
        let lagging: Vec<String> = shards
            .iter()
            .filter_map(|&shard| match self.caught_up_for(shard) {
                None => Some(format!("shard {shard} never")),
                Some(t) => {
                    let age = now.saturating_duration_since(t);
                    (age > bound).then(|| format!("shard {shard} {:.1} s ago", age.as_secs_f64()))
                }
            })
            .collect();
        if lagging.is_empty() {
            return None;
        }
        Some(format!(
            "not caught up with its coordinator within {:?} ({from}; last caught up: {})",
            bound,
            lagging.join(", ")
        ))
    }

    /// The shards this node has a position in.
    pub fn shards(&self) -> Vec<ShardId> {
        self.progress.iter().map(|&(shard, ..)| shard).collect()
    }

    /// Status of this node for `dci status`.
    pub fn node_status(&self, node_id: &str, role: &str, region: &str) -> pb::NodeStatus {
        let now_us = crate::now_us();
        let now = Instant::now();
        pb::NodeStatus {
            node_id: node_id.to_string(),
            role: role.to_string(),
            region: region.to_string(),
            parent: self.connected_to.clone().unwrap_or_default(),
            shards: self
                .progress
                .iter()
                .map(|&(shard, epoch, hwm, head)| {
                    let applied_t = lookup(&self.applied_time_us, shard);
                    let head_t = lookup(&self.head_time_us, shard);
                    let lag_ms = if hwm >= head {
                        0
                    } else if applied_t > 0 {
                        now_us.saturating_sub(applied_t) / 1000
                    } else {
                        head_t.saturating_sub(applied_t) / 1000
                    };
                    pb::ShardProgress {
                        shard,
                        epoch,
                        hwm,
                        lag_seqs: head.saturating_sub(hwm),
                        lag_ms,
                        caught_up_ms: self.caught_up_for(shard).map_or(u64::MAX, |t| {
                            now.saturating_duration_since(t).as_millis() as u64
                        }),
                    }
                })
                .collect(),
            connected_ms: self
                .connected_since
                .map_or(0, |t| t.elapsed().as_millis() as u64),
            // A cache's own (see `FollowOptions::max_staleness`).
            max_staleness_ms: 0,
            left_out: 0,
            restarted: false,
            failure: String::new(),
        }
    }
}

/// Whole milliseconds, as reports carry durations.
pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn lookup(v: &[(ShardId, u64)], shard: ShardId) -> u64 {
    v.iter().find(|(s, _)| *s == shard).map_or(0, |(_, t)| *t)
}

/// A probe of a link opened at `opened`, sent at `now`: microseconds since, plus one (0 is none).
pub fn probe_us(opened: Instant, now: Instant) -> u64 {
    u64::try_from(now.saturating_duration_since(opened).as_micros())
        .unwrap_or(u64::MAX - 1)
        .saturating_add(1)
}

/// The moment a heartbeat is known to describe its sender at or after: when the probe it echoes
/// (`echo_us`, of a link opened at `opened`) left this node. Not when it arrived, which may be
/// long after it was sent (it waited in a queue, a socket, a paused process). A sender that
/// echoes none (an older one) has only its arrival; an echo of a probe never sent, no later
/// than that either.
pub fn heartbeat_stamp(opened: Instant, echo_us: u64, now: Instant) -> Instant {
    match echo_us.checked_sub(1) {
        None => now,
        Some(us) => opened
            .checked_add(Duration::from_micros(us))
            .map_or(now, |t| t.min(now)),
    }
}

/// Is the sender followed since `connected_at` cut off itself, for `bound` or longer: it has said
/// of no shard (it never reached a coordinator), or it last was caught up with its own sender on
/// some shard it carries (`announced`: shard, epoch and when, as its heartbeats say; `None`:
/// never) `bound` ago or more? Then the node moves on (to its next sender, or to the same URL again: behind it there may
/// be others): this one answers, but what it sends cannot be vouched for, and its receivers would
/// serve misses for as long as it lasts.
pub fn sender_cut_off(
    announced: &[(ShardId, Epoch, Option<Instant>)],
    connected_at: Instant,
    now: Instant,
    bound: Duration,
) -> bool {
    let old = |t: Instant| now.saturating_duration_since(t) >= bound;
    if !old(connected_at) {
        return false;
    }
    announced.is_empty() || announced.iter().any(|&(_, _, t)| t.is_none_or(old))
}

/// Should a node take a sender's log of a shard whose epoch is older than the one it holds?
/// Epochs grow as a log is replaced, so an older one is mostly a leftover: a sender not yet
/// caught up with a coordinator that started on a new log, which vouches for the old log as of
/// before that start, earlier than this node was last caught up in the new one (`own`). But a
/// log started on a machine whose clock is behind the old one's gets a lower epoch, and is the
/// only log of the shard there is: its sender vouches for it (`vouched`, the coordinator itself:
/// now) later than this node was ever caught up in its own, and only then is it taken. Taking
/// one wrongly costs a flush, never a stale read.
pub fn takes_older_epoch(vouched: Option<Instant>, own: Option<Instant>) -> bool {
    match (vouched, own) {
        (None, _) => false,
        (Some(_), None) => true,
        (Some(v), Some(o)) => v > o,
    }
}

/// Has the node applied, on every shard it is in, as far as its sender has said the shard goes?
/// Only a heartbeat of this session says that (`announced`: the epoch its newest heartbeat gave
/// each shard): until one names a shard, the highest seq seen is only what has arrived so far (from a
/// sender replaying from far back, say, or one that has just started itself), not how far the
/// shard goes. And only in the sender's epoch: a node that holds another (one it does not take
/// from this sender, or has not flushed into yet) has applied nothing of the sender's log.
pub fn caught_up(
    progress: &[(ShardId, Epoch, Seq, Seq)],
    announced: &[(ShardId, Epoch, Option<Instant>)],
) -> bool {
    progress.iter().all(|&(shard, epoch, applied, head)| {
        applied >= head && announced.iter().any(|&(s, e, _)| s == shard && e == epoch)
    })
}

fn set(v: &mut Vec<(ShardId, u64)>, shard: ShardId, t: u64) {
    match v.iter_mut().find(|(s, _)| *s == shard) {
        Some(e) => e.1 = e.1.max(t),
        None => v.push((shard, t)),
    }
}

/// Lock a mutex even if a panic poisoned it: appliers recover by quarantine, not by dying.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What to check when a sender answered that it has no `Subscribe` stream (an edge, or another
/// service, at the address given); empty otherwise.
fn wrong_kind_hint(why: &str) -> &'static str {
    if why.contains("not implemented") || why.contains("Unimplemented") {
        " (the node at this address serves no Subscribe stream: is it an edge? follow a coordinator or a relay)"
    } else {
        ""
    }
}

/// How often a receiver probes its sender between its reports: how much older than a round trip
/// its freshness may be at each level (a report, every heartbeat interval, probes too).
const PROBE_INTERVAL: Duration = Duration::from_millis(200);

/// How often a sender that cannot be followed is told at warn level.
const WARN_EVERY: Duration = Duration::from_secs(30);

/// Follow senders until `shutdown` turns true.
pub async fn follow<A: Applier>(
    mut opts: FollowOptions,
    applier: Arc<Mutex<A>>,
    state: Arc<Mutex<LinkState>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut changes = opts.changes.take();
    let mut receiver = Receiver::with_resume(opts.receiver.clone(), &opts.resume);
    let mut idx = 0usize;
    let mut backoff = opts.backoff_min;
    if opts.urls.is_empty() {
        tracing::error!("no sender to follow");
        return;
    }
    // Failures since the last link that worked, and when one was last told at warn level.
    let mut failures = 0u64;
    let mut failing_since = None::<Instant>;
    let mut last_warned = None::<Instant>;
    let mut cut_off = CutOff::default();
    loop {
        if *shutdown.borrow() {
            return;
        }
        let url = opts.urls[idx % opts.urls.len()].clone();
        let outcome = tokio::select! {
            r = session(&opts, &url, &mut receiver, &applier, &state, &mut cut_off) => Some(r),
            _ = shutdown.changed() => return,
            f = next_change(&mut changes) => {
                refollow(&mut opts, f, &applier);
                cut_off.reset();
                None
            }
        };
        {
            let mut st = lock(&state);
            st.connected_to = None;
            st.connected_since = None;
        }
        let Some(outcome) = outcome else {
            // Straight to the first of the new senders: nothing failed.
            (idx, backoff) = (0, opts.backoff_min);
            (failures, failing_since, last_warned) = (0, None, None);
            continue;
        };
        match outcome {
            Ok(()) => {
                // A session that did work resets the backoff.
                backoff = opts.backoff_min;
                (failures, failing_since, last_warned) = (0, None, None);
                if !cut_off.just_left {
                    tracing::info!(sender = %url, "link to sender lost; trying the next one");
                }
            }
            Err(e) => {
                failures += 1;
                let now = Instant::now();
                let since = *failing_since.get_or_insert(now);
                // The first failure, then a line every 30 s for as long as none works: a sender
                // restarting is normal for a moment, a wrong address or service is not, and
                // either way the operator should not have to turn on debug logs to see it.
                if last_warned.is_none_or(|t| now.duration_since(t) >= WARN_EVERY) {
                    last_warned = Some(now);
                    let why = e.to_string();
                    let hint = match crate::tls::mismatch_hint(&why, &url, &opts.tls) {
                        "" => wrong_kind_hint(&why),
                        tls => tls,
                    };
                    tracing::warn!(
                        sender = %url,
                        error = %format_args!("{why}{hint}"),
                        failures,
                        failing_for_s = now.duration_since(since).as_secs(),
                        "could not follow sender; retrying"
                    );
                } else {
                    tracing::debug!(sender = %url, error = %e, "could not follow sender");
                }
            }
        }
        idx += 1;
        let jitter = rand::rng().random_range(0.5..1.5);
        let delay = backoff.mul_f64(jitter);
        backoff = (backoff * 2).min(opts.backoff_max);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.changed() => return,
            f = next_change(&mut changes) => {
                refollow(&mut opts, f, &applier);
                cut_off.reset();
                (idx, backoff) = (0, opts.backoff_min);
                (failures, failing_since, last_warned) = (0, None, None);
            }
        }
    }
}

/// The longest a node stays with a sender cut off itself before it moves on, however many times
/// in a row it found every one of its senders so.
pub const MAX_CUT_OFF_PATIENCE: Duration = Duration::from_secs(30);

/// Leaving senders cut off themselves: told once every `WARN_EVERY`.
#[derive(Debug, Default)]
struct CutOff {
    /// When it was last told at warn level.
    warned: Option<Instant>,
    /// The session that ended last left a sender cut off (already told of).
    just_left: bool,
    /// Senders left in a row for it, since one was last caught up on every shard it carries.
    in_a_row: u32,
}

impl CutOff {
    /// How long a sender must have been cut off before the node leaves it: `bound` (its peer
    /// timeout), doubled for each round of its `senders` that found every one cut off, up to
    /// [`MAX_CUT_OFF_PATIENCE`]. A coordinator of a sharded tier that is down cuts every relay
    /// off from its shard: moving on finds the next relay no better, and every edge of every
    /// relay reconnected every peer timeout for as long as it lasted, though the other shards
    /// flowed. A sender cut off while another is not is still left after one timeout.
    fn patience(&self, bound: Duration, senders: usize) -> Duration {
        let rounds = self.in_a_row / senders.max(1) as u32;
        bound
            .saturating_mul(1 << rounds.min(16))
            .min(MAX_CUT_OFF_PATIENCE.max(bound))
    }

    /// A sender was left for being cut off.
    fn left(&mut self) {
        self.just_left = true;
        self.in_a_row = self.in_a_row.saturating_add(1);
    }

    /// A sender was caught up on every shard it carries, or the senders changed: the next one
    /// cut off is left after one timeout again.
    fn reset(&mut self) {
        self.in_a_row = 0;
    }
}

/// Has the sender been caught up with its own sender on every shard it carries within `bound`
/// (`announced` as [`sender_cut_off`] takes it)?
pub fn sender_fresh(
    announced: &[(ShardId, Epoch, Option<Instant>)],
    now: Instant,
    bound: Duration,
) -> bool {
    !announced.is_empty()
        && announced
            .iter()
            .all(|&(_, _, t)| t.is_some_and(|t| now.saturating_duration_since(t) < bound))
}

/// Take new senders and filter, between links.
fn refollow<A: Applier>(opts: &mut FollowOptions, f: Following, applier: &Arc<Mutex<A>>) {
    if f.urls.is_empty() {
        tracing::error!("told to follow no sender: keeping the senders it has");
        return;
    }
    tracing::info!(senders = ?f.urls, filter = %f.filter.describe(), "following anew");
    if f.filter.to_pb() != opts.filter.to_pb() {
        lock(applier).refilter(&f.filter);
    }
    opts.urls = f.urls;
    opts.filter = f.filter;
}

/// One link. `Ok` when a link was established (and later lost), `Err` when none could be made.
async fn session<A: Applier>(
    opts: &FollowOptions,
    url: &str,
    receiver: &mut Receiver,
    applier: &Arc<Mutex<A>>,
    state: &Arc<Mutex<LinkState>>,
    cut_off: &mut CutOff,
) -> Result<(), String> {
    // Right after leaving a sender cut off (told of then), the next link is told of quietly.
    let quiet = std::mem::take(&mut cut_off.just_left);
    let endpoint = opts
        .tls
        .endpoint(url)
        .map_err(|e| e.to_string())?
        .connect_timeout(opts.connect_timeout)
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(2 << 20))
        .initial_connection_window_size(Some(8 << 20));
    // The connect timeout covers the TCP connect only: a sender behind a partition that swallows
    // packets (a load balancer's port still open, a half-dead host) would hold the HTTP/2 or
    // TLS handshake, or the subscribe's answer, for ever, and this node with it, never trying the
    // next sender. A sender silent that long is dead by this node's own rule.
    let establish = opts.peer_timeout.max(opts.connect_timeout);
    let silent = || format!("no answer within {establish:?} (a partition, or a sender that hangs)");
    let channel = tokio::time::timeout(establish, endpoint.connect())
        .await
        .map_err(|_| silent())?
        .map_err(|e| crate::with_causes(&e))?;
    let mut client = SubscribeClient::new(channel).max_decoding_message_size(64 << 20);
    receiver.on_reconnect();
    let (up, up_rx) = mpsc::channel::<pb::Upstream>(256);
    let hello = pb::Hello {
        node_id: opts.node_id.clone(),
        region: opts.region.clone(),
        filter: Some(opts.filter.to_pb()),
        resume: receiver.resume_points(),
        role: opts.role.clone(),
        zstd_batches: opts.compression,
        window_bytes: 0,
        instance: opts.instance,
    };
    // Probes are timed from here; the first follows the hello, so that the sender's first
    // heartbeats already echo one.
    let opened = Instant::now();
    let probe = |now: Instant, subtree: Vec<pb::NodeStatus>| pb::Upstream {
        msg: Some(pb::upstream::Msg::Heartbeat(pb::Heartbeat {
            heads: Vec::new(),
            subtree,
            now_us: crate::now_us(),
            probe_us: probe_us(opened, now),
            echo_us: 0,
        })),
    };
    up.try_send(pb::Upstream {
        msg: Some(pb::upstream::Msg::Hello(hello)),
    })
    .map_err(|e| e.to_string())?;
    up.try_send(probe(opened, Vec::new()))
        .map_err(|e| e.to_string())?;
    let mut stream = tokio::time::timeout(establish, client.subscribe(ReceiverStream::new(up_rx)))
        .await
        .map_err(|_| silent())?
        .map_err(|s| crate::status_with_causes(&s))?
        .into_inner();
    let now = Instant::now();
    {
        let mut st = lock(state);
        st.connected_to = Some(url.to_string());
        st.connected_since = Some(now);
        st.connects += 1;
    }
    let mut last_heard = now;
    let mut last_hb_sent = now;
    let mut last_probe = now;
    let mut heard_any = false;
    let mut said_left_out = false;
    let mut said_older = false;
    // The nodes the last heartbeat reported one by one (see `bounded_subtree`).
    let mut alone = HashSet::new();
    let connected_at = now;
    // What this sender says of each shard it carries, as its newest heartbeat says: its epoch,
    // and when the sender last was caught up with its own.
    let mut announced: Vec<(ShardId, Epoch, Option<Instant>)> = Vec::new();
    // When the sender was as its newest heartbeat describes it, at the latest (what being caught
    // up with that heartbeat's heads makes this node fresh as of).
    let mut described = now;
    let mut tick = tokio::time::interval(opts.receiver.ack_interval.max(Duration::from_millis(2)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            msg = stream.message() => {
                let msg = match msg {
                    Ok(Some(m)) => m,
                    Ok(None) => return Ok(()),
                    // Refused before it said anything (a Hello it will not take): a failure to
                    // follow it, retried with backoff, not a link that worked.
                    Err(status) if !heard_any => {
                        return Err(format!("{}: {}", status.code(), status.message()));
                    }
                    Err(status) => {
                        tracing::info!(sender = %url, %status, "sender ended the stream");
                        return Ok(());
                    }
                };
                if !heard_any {
                    // Only now: a sender that refuses the stream answers the subscribe first.
                    if quiet {
                        tracing::debug!(sender = %url, "following sender");
                    } else {
                        tracing::info!(sender = %url, "following sender");
                    }
                    heard_any = true;
                }
                let now = Instant::now();
                // Nothing came for longer than the peer timeout: this node was paused (a frozen
                // VM, a stopped process) or the sender was. What waited in the socket meanwhile is
                // old news, and its heartbeats, stamped on arrival, would pass for fresh ones:
                // this link ended by its own rule, whichever branch noticed first.
                if now.duration_since(last_heard) >= opts.peer_timeout {
                    tracing::warn!(sender = %url, silent_ms = now.duration_since(last_heard).as_millis() as u64, "sender silent; moving on");
                    return Ok(());
                }
                last_heard = now;
                let msg = match msg.msg {
                    Some(pb::downstream::Msg::BatchZstd(z)) => match crate::link::retransmit::decompress(&z) {
                        Ok(bytes) => Some(pb::downstream::Msg::Batch(bytes)),
                        Err(e) => {
                            let mut st = lock(state);
                            st.bad_batches += 1;
                            if let Some(held) = st.poison_log.allow(now) {
                                tracing::warn!(sender = %url, error = %e, held_back = held, "undecompressable batch dropped");
                            }
                            None
                        }
                    },
                    other => other,
                };
                let mut raw = None;
                let cmds = match msg {
                    Some(pb::downstream::Msg::Batch(bytes)) => {
                        let as_received = bytes.clone();
                        match Batch::decode_checked(bytes, opts.max_key_len) {
                            Ok(mut checked) => {
                                if checked.poisoned.is_empty() {
                                    let b = &checked.batch;
                                    raw = Some(((b.shard, b.first_seq, b.last_seq), as_received));
                                }
                                if !checked.poisoned.is_empty() {
                                    let mut a = lock(applier);
                                    let mut st = lock(state);
                                    for (entry, why) in &checked.poisoned {
                                        quarantine(&mut *a, &mut st, checked.batch.shard, entry, why);
                                        // Its key is still flushed, here and below, by a stand-in.
                                        if let Some(s) = stand_in(entry, why, opts.max_key_len) {
                                            let at = checked.batch.entries.partition_point(|e| e.seq < s.seq);
                                            checked.batch.entries.insert(at, s);
                                        }
                                    }
                                }
                                receiver.on_batch(checked.batch, now)
                            }
                            Err(e) => {
                                let mut st = lock(state);
                                st.bad_batches += 1;
                                if let Some(held) = st.poison_log.allow(now) {
                                    tracing::warn!(sender = %url, error = %e, held_back = held, "undecodable batch dropped");
                                }
                                Vec::new()
                            }
                        }
                    }
                    Some(pb::downstream::Msg::Reset(r)) => {
                        tracing::warn!(shard = r.shard, epoch = r.epoch, hwm = r.hwm, reason = %r.reason, "reset from sender");
                        receiver.on_reset(&r)
                    }
                    Some(pb::downstream::Msg::Heartbeat(h)) => {
                        let at = heartbeat_stamp(opened, h.echo_us, now);
                        described = at;
                        let mut st = lock(state);
                        // When this node was last caught up, per shard, before this heartbeat
                        // says anything: the time an older epoch is weighed against.
                        let before: Vec<(ShardId, Epoch, Option<Instant>)> = st
                            .progress
                            .iter()
                            .map(|&(shard, epoch, ..)| (shard, epoch, st.caught_up_for(shard)))
                            .collect();
                        for head in &h.heads {
                            set(&mut st.head_time_us, head.shard, head.head_time_us);
                            if head.shard_count > 0 {
                                st.shard_count = head.shard_count;
                            }
                            // The shard's source (age 0) bounds nothing: being caught up with it is
                            // all there is to being fresh.
                            st.vouched.retain(|(s, _)| *s != head.shard);
                            announced.retain(|(s, ..)| *s != head.shard);
                            if head.upstream_age_ms > 0 {
                                let at = at.checked_sub(Duration::from_millis(head.upstream_age_ms));
                                st.vouched.push((head.shard, at));
                                announced.push((head.shard, head.epoch, at));
                            } else {
                                announced.push((head.shard, head.epoch, Some(at)));
                            }
                        }
                        drop(st);
                        let mut cmds = Vec::new();
                        for &(shard, epoch, own) in &before {
                            let Some(head) = h.heads.iter().find(|h| h.shard == shard && h.epoch < epoch) else {
                                continue;
                            };
                            let vouched = announced.iter().find(|(s, ..)| *s == shard).and_then(|&(.., t)| t);
                            if takes_older_epoch(vouched, own) {
                                tracing::warn!(sender = %url, shard, sender_epoch = head.epoch, epoch, "the sender's log of the shard has an older epoch than this node's, and is newer: a coordinator started on a new log with its clock behind the old one's; taken (a flush)");
                                cmds.extend(receiver.adopt(&pb::Reset {
                                    shard,
                                    epoch: head.epoch,
                                    hwm: head.head,
                                    reason: format!("the sender's log, of an older epoch, is newer ({epoch} -> {})", head.epoch),
                                }));
                            } else if !said_older {
                                // Passed over (see `Receiver::on_batch`): told once per link.
                                said_older = true;
                                tracing::warn!(sender = %url, shard, sender_epoch = head.epoch, epoch, "the sender's log of the shard is of an older epoch than this node holds, and the sender has not been caught up with it since this node last was with its own: none of it is taken, and this node is not caught up, until the sender is");
                            }
                        }
                        cmds.extend(receiver.on_heartbeat(&h, now));
                        cmds
                    }
                    Some(pb::downstream::Msg::BatchZstd(_)) | None => Vec::new(),
                };
                execute(cmds, raw, receiver, applier, state, &up, now);
                let mut st = lock(state);
                st.last_heard = Some(now);
                st.progress = receiver.progress();
                if caught_up(&st.progress, &announced) {
                    st.last_caught_up = Some(described);
                }
            }
            _ = tick.tick() => {
                let now = Instant::now();
                let cmds = receiver.tick(now);
                execute(cmds, None, receiver, applier, state, &up, now);
                if now.duration_since(last_heard) >= opts.peer_timeout {
                    tracing::warn!(sender = %url, "sender silent; moving on");
                    return Ok(());
                }
                // Also with one URL: behind it may be several senders (a Kubernetes Service),
                // and the next connection may reach one that is not cut off. While every one is
                // (a coordinator down), that is a reconnection every `patience`, which grows:
                // warned of at once and every 30 s, like a sender that cannot be reached.
                let patience = cut_off.patience(opts.peer_timeout, opts.urls.len());
                if sender_fresh(&announced, now, opts.peer_timeout) {
                    cut_off.reset();
                }
                if sender_cut_off(&announced, connected_at, now, patience) {
                    cut_off.left();
                    if cut_off.warned.is_none_or(|t| now.duration_since(t) >= WARN_EVERY) {
                        cut_off.warned = Some(now);
                        tracing::warn!(sender = %url, "sender cut off from its own sender; moving on");
                    } else {
                        tracing::debug!(sender = %url, "sender cut off from its own sender; moving on");
                    }
                    return Ok(());
                }
                if now.duration_since(last_hb_sent) >= opts.heartbeat_interval {
                    last_hb_sent = now;
                    let mut me = lock(state).node_status(&opts.node_id, &opts.role, &opts.region);
                    me.max_staleness_ms = opts.max_staleness.map_or(0, millis);
                    let mut subtree = vec![me];
                    subtree.extend(lock(applier).subtree());
                    let (subtree, left_out) =
                        bounded_subtree(subtree, MAX_SUBTREE_BYTES, &opts.node_id, &mut alone);
                    if left_out > 0 && !said_left_out {
                        said_left_out = true;
                        tracing::warn!(left_out, "too many nodes below to report them all; `dci status` lists those that fit, and the others summed up per role and region");
                    }
                    // A full queue means the sender is not reading; acks are cumulative and
                    // probes repeated, so dropping one is harmless.
                    let _ = up.try_send(probe(now, subtree));
                    last_probe = now;
                } else if now.duration_since(last_probe) >= PROBE_INTERVAL {
                    last_probe = now;
                    let _ = up.try_send(probe(now, Vec::new()));
                }
            }
        }
    }
}

/// Count, tell (at the log's pace) and hand to the applier an entry that is not applied: every
/// node's quarantine goes through here.
fn quarantine<A: Applier>(
    a: &mut A,
    st: &mut LinkState,
    shard: ShardId,
    entry: &pb::Invalidation,
    why: &dyn std::fmt::Display,
) {
    if let Some(held) = st.poison_log.allow(Instant::now()) {
        let key = crate::throttle::key_shown(&entry.key);
        tracing::warn!(shard, seq = entry.seq, key, %why, held_back = held, "poison entry quarantined (held_back: like warnings not logged since the last, at most one a second)");
    }
    st.quarantined += 1;
    a.quarantine(shard, entry, &why.to_string());
}

/// A batch's (shard, first, last) and its bytes as received.
type Raw = ((ShardId, Seq, Seq), bytes::Bytes);

fn execute<A: Applier>(
    cmds: Vec<RxCommand>,
    raw: Option<Raw>,
    receiver: &mut Receiver,
    applier: &Arc<Mutex<A>>,
    state: &Arc<Mutex<LinkState>>,
    up: &mpsc::Sender<pb::Upstream>,
    now: Instant,
) {
    for c in cmds {
        match c {
            RxCommand::Apply(b) => {
                let (shard, epoch, last) = (b.shard, b.epoch, b.last_seq);
                let newest = b.entries.iter().map(|e| e.publish_time_us).max();
                // The bytes describe this batch only if it was applied whole, as it arrived.
                let encoded = raw
                    .as_ref()
                    .filter(|(range, _)| *range == (b.shard, b.first_seq, b.last_seq))
                    .map(|(_, bytes)| bytes);
                apply_guarded(applier, state, &Arc::new(b), encoded);
                if let Some(t) = newest {
                    set(&mut lock(state).applied_time_us, shard, t);
                }
                if let Some(ack) = receiver.on_applied(shard, epoch, last, now) {
                    send_up(up, ack);
                }
            }
            RxCommand::Join { shard, epoch, hwm } => {
                lock(applier).flush(shard, epoch, hwm, "joined the stream");
                if let Some(ack) = receiver.on_applied(shard, epoch, hwm, now) {
                    send_up(up, ack);
                }
            }
            RxCommand::Flush {
                shard,
                epoch,
                hwm,
                reason,
            } => {
                lock(applier).flush(shard, epoch, hwm, &reason);
                lock(state).flushes += 1;
                if let Some(ack) = receiver.on_applied(shard, epoch, hwm, now) {
                    send_up(up, ack);
                }
            }
            other => send_up(up, other),
        }
    }
}

fn send_up(up: &mpsc::Sender<pb::Upstream>, c: RxCommand) {
    let msg = match c {
        RxCommand::Ack(a) => pb::upstream::Msg::Ack(a),
        RxCommand::Nack(n) => pb::upstream::Msg::Nack(n),
        _ => return,
    };
    // Acks are cumulative and Nacks are repeated, so a full queue may drop one.
    let _ = up.try_send(pb::Upstream { msg: Some(msg) });
}

/// Apply a batch; if the applier panics, apply entry by entry and quarantine the culprits.
fn apply_guarded<A: Applier>(
    applier: &Arc<Mutex<A>>,
    state: &Arc<Mutex<LinkState>>,
    b: &Arc<Batch>,
    encoded: Option<&bytes::Bytes>,
) {
    let ok = catch_unwind(AssertUnwindSafe(|| lock(applier).apply_shared(b, encoded))).is_ok();
    if ok {
        return;
    }
    for e in &b.entries {
        let single = Batch {
            shard: b.shard,
            epoch: b.epoch,
            first_seq: e.seq,
            last_seq: e.seq,
            entries: vec![e.clone()],
        };
        if catch_unwind(AssertUnwindSafe(|| lock(applier).apply(&single))).is_err() {
            let mut a = lock(applier);
            let mut st = lock(state);
            quarantine(
                &mut *a,
                &mut st,
                b.shard,
                &e.to_pb(),
                &"panicked while applied",
            );
        }
    }
}

#[cfg(test)]
mod probe_tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_heartbeat_is_as_fresh_as_the_probe_it_echoes() {
        let opened = Instant::now();
        let sent = opened + Duration::from_millis(1500);
        let now = opened + Duration::from_secs(4);
        let probe = probe_us(opened, sent);
        assert_eq!(heartbeat_stamp(opened, probe, now), sent);
        // No echo (an older sender): its arrival.
        assert_eq!(heartbeat_stamp(opened, 0, now), now);
        // An echo of a probe not yet sent: no later than now.
        let future = probe_us(opened, now + Duration::from_secs(60));
        assert_eq!(heartbeat_stamp(opened, future, now), now);
        assert_eq!(heartbeat_stamp(opened, u64::MAX, now), now);
    }

    proptest! {
        /// Whatever a sender echoes, the stamp is never later than now, and for a probe this
        /// link sent, never later than when it was sent.
        #[test]
        fn stamps_are_never_fresher_than_the_probe(sent_ms in 0u64..1_000_000, late_ms in 0u64..1_000_000, echo in any::<u64>()) {
            let opened = Instant::now();
            let sent = opened + Duration::from_millis(sent_ms);
            let now = sent + Duration::from_millis(late_ms);
            prop_assert!(heartbeat_stamp(opened, echo, now) <= now);
            prop_assert_eq!(heartbeat_stamp(opened, probe_us(opened, sent), now), sent);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn report(hwm: Seq, lag_seqs: u64, lag_ms: u64, caught_up_ms: u64) -> pb::NodeStatus {
        pb::NodeStatus {
            node_id: "edge".into(),
            shards: vec![pb::ShardProgress {
                shard: 0,
                epoch: 7,
                hwm,
                lag_seqs,
                lag_ms,
                caught_up_ms,
            }],
            connected_ms: 1_000,
            ..Default::default()
        }
    }

    /// The caches of a link that ended are still reported (no longer connected) until their
    /// bound and the margin have passed, or until a link of now reports them; its other nodes,
    /// and caches that do not say their bound, are gone at once.
    #[test]
    fn the_caches_of_a_link_that_ended_are_reported_for_their_bound() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let node = |id: &str, role: &str, bound_ms| pb::NodeStatus {
            node_id: id.into(),
            role: role.into(),
            max_staleness_ms: bound_ms,
            ..report(10, 0, 0, 0)
        };
        let reports = Reports::default();
        reports.insert(
            1,
            vec![
                node("relay-b", "relay", 0),
                node("edge-1", "edge", 2_000),
                node("edge-2", "edge", 0),
                node("near-1", "near-cache", 5_000),
            ],
        );
        let ids = |now| -> Vec<(String, u64)> {
            reports
                .aged_at(now, |_| None)
                .into_iter()
                .map(|n| (n.node_id, n.connected_ms))
                .collect()
        };
        reports.forget_at(1, at(0));
        assert_eq!(ids(at(0)), [("edge-1".into(), 0), ("near-1".into(), 0)]);
        assert_eq!(ids(at(2_499)), [("edge-1".into(), 0), ("near-1".into(), 0)]);
        assert_eq!(ids(at(2_500)), [("near-1".into(), 0)], "past its bound");
        // Back through another link: reported as it is there, once.
        reports.insert(2, vec![node("near-1", "near-cache", 5_000)]);
        let now = Instant::now();
        assert_eq!(reports.aged_at(now, |_| None).len(), 1);
        assert!(reports.aged_at(now, |_| None)[0].connected_ms > 0);
        reports.forget_at(2, now);
        reports.forget_at(1, now); // long gone: nothing
        assert_eq!(
            reports
                .aged_at(now + Duration::from_millis(5_499), |_| None)
                .len(),
            2
        );
        assert!(reports
            .aged_at(now + Duration::from_millis(5_500), |_| None)
            .is_empty());
    }

    /// A receiver's acks move its own progress in its last report (not what it reported of the
    /// nodes below it): what it has applied shows before its next report.
    #[test]
    fn acks_move_a_receivers_reported_progress() {
        let reports = Reports::default();
        let ack = |epoch, hwm| pb::Ack {
            shard: 0,
            epoch,
            hwm,
        };
        reports.acked(1, &ack(7, 50)); // nothing reported yet: nothing to move
        let below = pb::NodeStatus {
            node_id: "below".into(),
            ..report(10, 30, 900, 0)
        };
        reports.insert(1, vec![report(20, 30, 900, 0), below]);
        reports.acked(1, &ack(7, 35));
        let hwms = |r: &Reports| -> Vec<(Seq, u64, u64)> {
            lock(&r.0)[&1]
                .nodes
                .iter()
                .map(|n| (n.shards[0].hwm, n.shards[0].lag_seqs, n.shards[0].lag_ms))
                .collect()
        };
        assert_eq!(hwms(&reports), [(35, 15, 900), (10, 30, 900)]);
        reports.acked(1, &ack(7, 50));
        assert_eq!(hwms(&reports)[0], (50, 0, 0), "caught up with what it knew");
        reports.acked(1, &ack(7, 40)); // behind what it said: an old ack
        reports.acked(1, &ack(8, 90)); // another epoch than it reported: its next report says
        reports.acked(2, &ack(7, 90)); // another link
        assert_eq!(hwms(&reports)[0], (50, 0, 0));
    }

    /// An edge (or any other service) given as a sender answers that it has no such stream.
    #[test]
    fn a_sender_of_the_wrong_kind_is_named_as_such() {
        let e = tonic::Status::unimplemented("");
        let why = crate::status_with_causes(&e);
        assert!(wrong_kind_hint(&why).contains("is it an edge?"), "{why}");
        assert_eq!(wrong_kind_hint("Unavailable: connection refused"), "");
    }

    /// A report ages: its last catch-up recedes, what it lacks of the head now counts (not of
    /// another epoch's head), a node that never caught up stays so, and its lag in time is left
    /// as reported.
    #[test]
    fn reports_age_with_the_time_since_they_arrived() {
        let age = Duration::from_millis(4_000);
        let heads = |s: ShardId| (s == 0).then_some((7, 500));
        let shard = |n: &pb::NodeStatus| n.shards[0];

        let aged = aged_reports(&[report(500, 0, 0, 100)], age, heads);
        let s = shard(&aged[0]);
        assert_eq!((s.lag_seqs, s.lag_ms, s.caught_up_ms), (0, 0, 4_100));
        assert_eq!(aged[0].connected_ms, 5_000);

        let s = shard(&aged_reports(&[report(400, 0, 0, 100)], age, heads)[0]);
        assert_eq!((s.lag_seqs, s.lag_ms, s.caught_up_ms), (100, 0, 4_100));

        let s = shard(&aged_reports(&[report(300, 150, 2_000, 9_000)], age, heads)[0]);
        assert_eq!((s.lag_seqs, s.lag_ms, s.caught_up_ms), (200, 2_000, 13_000));

        let s = shard(&aged_reports(&[report(0, 0, 0, u64::MAX)], age, heads)[0]);
        assert_eq!((s.lag_seqs, s.caught_up_ms), (500, u64::MAX));

        let other_epoch = |_| Some((8, 900));
        let s = shard(&aged_reports(&[report(500, 0, 0, 100)], age, other_epoch)[0]);
        assert_eq!(s.lag_seqs, 0);

        let s = shard(&aged_reports(&[report(500, 0, 0, 100)], Duration::ZERO, heads)[0]);
        assert_eq!((s.lag_seqs, s.lag_ms, s.caught_up_ms), (0, 0, 100));
    }

    #[test]
    fn an_older_epoch_is_taken_only_when_vouched_for_after_this_node_was_last_caught_up() {
        let t = Instant::now();
        let later = t + Duration::from_millis(1);
        assert!(
            takes_older_epoch(Some(later), Some(t)),
            "a new log, vouched for since"
        );
        assert!(
            !takes_older_epoch(Some(t), Some(later)),
            "a leftover of the old log"
        );
        assert!(!takes_older_epoch(Some(t), Some(t)));
        assert!(!takes_older_epoch(None, Some(t)), "never vouched for");
        assert!(!takes_older_epoch(None, None));
        assert!(
            takes_older_epoch(Some(t), None),
            "nothing of its own vouched for"
        );
    }

    /// Applied as far as the highest seq seen is not caught up until a heartbeat of the session
    /// has named the shard in the epoch this node holds; then applied must reach the head it said.
    #[test]
    fn caught_up_only_as_far_as_the_sender_has_said() {
        let progress = [(0, 1, 50, 50), (1, 1, 9, 9)];
        assert!(!caught_up(&progress, &[]), "no heartbeat yet");
        let t = Some(Instant::now());
        assert!(!caught_up(&progress, &[(0, 1, t)]), "shard 1 not named yet");
        assert!(caught_up(&progress, &[(0, 1, t), (1, 1, None)]));
        assert!(
            !caught_up(&[(0, 1, 50, 60)], &[(0, 1, t)]),
            "behind the head it said"
        );
        assert!(
            !caught_up(&progress, &[(0, 1, t), (1, 2, t)]),
            "shard 1 in another epoch at the sender"
        );
        assert!(caught_up(&[], &[]), "in no shard: nothing to be behind on");
    }

    fn node_report(i: usize, role: &str, region: &str, hwm: u64) -> pb::NodeStatus {
        pb::NodeStatus {
            node_id: format!("{role}-{region}-{i:06}"),
            role: role.into(),
            region: region.into(),
            parent: "http://relay-eu-west-1-0.relay.dci.svc.cluster.local:7500".into(),
            shards: (0..4)
                .map(|s| pb::ShardProgress {
                    shard: s,
                    epoch: u64::MAX / 3,
                    hwm: hwm + s as u64,
                    caught_up_ms: 100 + i as u64,
                    ..Default::default()
                })
                .collect(),
            connected_ms: 1_000_000 - i as u64,
            max_staleness_ms: 5_000,
            ..Default::default()
        }
    }

    fn heartbeat_bytes(subtree: Vec<pb::NodeStatus>) -> usize {
        use prost::Message;
        pb::Heartbeat {
            heads: Vec::new(),
            subtree,
            now_us: u64::MAX,
            probe_us: u64::MAX,
            echo_us: 0,
        }
        .encoded_len()
    }

    /// However many nodes sit below, a heartbeat stays within the bound: the first reports (this
    /// node's own first) are kept in order, and the others are summed up per role and region,
    /// each summary with the least progress of those it stands for.
    #[test]
    fn a_heartbeat_reports_as_many_nodes_as_fit_and_sums_up_the_others() {
        let few: Vec<_> = (0..100).map(|i| node_report(i, "edge", "eu", 9)).collect();
        assert_eq!(
            bounded_subtree(few.clone(), MAX_SUBTREE_BYTES, "r", &mut HashSet::new()),
            (few, 0)
        );

        let mut many: Vec<_> = (0..30_000)
            .map(|i| match i % 10 {
                0 => node_report(i, "near-cache", "eu", 1_000 + i as u64),
                1 => node_report(i, "edge", "us", 1_000 + i as u64),
                _ => node_report(i, "edge", "eu", 1_000 + i as u64),
            })
            .collect();
        // Far down the list: one short of the rest, and one that does not say its bound.
        many[29_005].shards[2] = pb::ShardProgress {
            shard: 2,
            epoch: u64::MAX / 3,
            hwm: 7,
            lag_seqs: 40,
            lag_ms: 900,
            caught_up_ms: u64::MAX,
        };
        many[29_002].max_staleness_ms = 0;
        many[29_003].max_staleness_ms = 9_000;
        let (sent, left_out) = bounded_subtree(
            many.clone(),
            MAX_SUBTREE_BYTES,
            "relay-top",
            &mut HashSet::new(),
        );
        let len = heartbeat_bytes(sent.clone());
        assert!(len <= MAX_SUBTREE_BYTES + 32, "{len} bytes");
        let worst: usize = sent.iter().map(worst_case_bytes).sum();
        assert!(worst <= MAX_SUBTREE_BYTES, "{worst} bytes at most");
        assert!(
            worst > MAX_SUBTREE_BYTES - 1024,
            "{worst} bytes at most: as many as fit"
        );
        let kept = many.len() - left_out;
        assert!(left_out > 0 && kept > 1000);
        assert_eq!(sent[..kept], many[..kept], "the first ones, in order");
        let summaries = &sent[kept..];
        let ids: Vec<&str> = summaries.iter().map(|n| n.node_id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "edges of eu left out by relay-top",
                "edges of us left out by relay-top",
                "near-caches of eu left out by relay-top"
            ]
        );
        let counted: u32 = summaries.iter().map(|n| n.left_out).sum();
        assert_eq!(counted as usize, left_out, "each left out counted once");
        let tail = |role: &str, region: &str| {
            many[kept..]
                .iter()
                .filter(|n| n.role == role && n.region == region)
                .count() as u32
        };
        assert_eq!(summaries[1].left_out, tail("edge", "us"));
        assert_eq!(summaries[2].left_out, tail("near-cache", "eu"));
        let eu = &summaries[0];
        assert_eq!(
            (eu.role.as_str(), eu.region.as_str(), eu.parent.as_str()),
            ("edge", "eu", "relay-top")
        );
        assert_eq!(eu.max_staleness_ms, 0, "one did not say its bound");
        assert_eq!(summaries[1].max_staleness_ms, 5_000);
        let first_left = many[kept..]
            .iter()
            .find(|n| n.role == "edge" && n.region == "eu");
        let first_left = first_left.map(|n| n.shards[0].hwm);
        let shards: Vec<(u32, u64, u64, u64, u64)> = eu
            .shards
            .iter()
            .map(|s| (s.shard, s.hwm, s.lag_seqs, s.lag_ms, s.caught_up_ms))
            .collect();
        let (f, oldest) = (first_left.unwrap(), 100 + 29_999);
        assert_eq!(
            shards,
            [
                (0, f, 0, 0, oldest),
                (1, f + 1, 0, 0, oldest),
                (2, 7, 40, 900, u64::MAX),
                (3, f + 3, 0, 0, oldest)
            ],
            "per shard, the least advanced of them"
        );
        assert_eq!(eu.connected_ms, 1_000_000 - 29_999);

        // A summary reported from below is summed up again with its count.
        let mut again = vec![node_report(0, "relay", "", 0)];
        again.extend(sent);
        let (above, more) =
            bounded_subtree(again, MAX_SUBTREE_BYTES / 4, "root", &mut HashSet::new());
        let counted: u32 = above.iter().map(|n| n.left_out.max(1)).sum();
        assert_eq!(counted as usize, many.len() + 1);
        assert!(more > 0);
        assert!(heartbeat_bytes(above) <= MAX_SUBTREE_BYTES / 4 + 32);
    }

    fn arb_node() -> impl Strategy<Value = pb::NodeStatus> {
        let shard = (0u32..4, 1u64..3, 0u64..50, any::<u64>());
        (
            0usize..500,
            prop::sample::select(vec!["edge", "near-cache", "relay", "x"]),
            prop::sample::select(vec!["eu", "us", ""]),
            prop::collection::vec(shard, 0..4),
            0u64..3,
            0u32..3,
        )
            .prop_map(
                |(i, role, region, shards, bound, left_out)| pb::NodeStatus {
                    node_id: format!("{role}-{i}"),
                    role: role.into(),
                    region: region.into(),
                    shards: shards
                        .into_iter()
                        .map(|(shard, epoch, hwm, caught_up_ms)| pb::ShardProgress {
                            shard,
                            epoch,
                            hwm,
                            caught_up_ms,
                            ..Default::default()
                        })
                        .collect(),
                    max_staleness_ms: bound * 1000,
                    left_out,
                    ..Default::default()
                },
            )
    }

    proptest! {
        /// Whatever the reports, a heartbeat keeps within the bound, the ones it keeps are the
        /// first, and the summaries count every one left out (a summary counts as many as it
        /// stands for) with, per shard, no more progress than any of them.
        #[test]
        fn summaries_stand_for_every_node_left_out(
            nodes in prop::collection::vec(arb_node(), 1..300),
            max_bytes in 200usize..6_000,
        ) {
            let (sent, left_out) = bounded_subtree(nodes.clone(), max_bytes, "me", &mut HashSet::new());
            let kept = nodes.len() - left_out;
            prop_assert_eq!(&sent[..kept], &nodes[..kept]);
            let summaries = &sent[kept..];
            if left_out == 0 {
                prop_assert!(summaries.is_empty());
                return Ok(());
            }
            let bytes: usize = sent.iter().map(report_bytes).sum();
            prop_assert!(bytes <= max_bytes || kept == 1, "{} bytes", bytes);
            if summaries.is_empty() {
                return Ok(()); // no room for them at all
            }
            let stands_for = |n: &pb::NodeStatus| n.left_out.max(1) as u64;
            let counted: u64 = summaries.iter().map(|s| s.left_out as u64).sum();
            prop_assert_eq!(counted, nodes[kept..].iter().map(stands_for).sum::<u64>());
            for n in &nodes[kept..] {
                // Its role's and region's, or (summaries by role alone) its role's.
                let role = if n.role == "x" { "other" } else { n.role.as_str() };
                let of = |region: &str| summaries.iter().find(|s| s.role == role && s.region == region);
                let s = of(&n.region).or_else(|| of("")).expect("a summary for each");
                if n.max_staleness_ms == 0 {
                    prop_assert_eq!(s.max_staleness_ms, 0);
                } else if s.max_staleness_ms != 0 {
                    prop_assert!(s.max_staleness_ms >= n.max_staleness_ms);
                }
                for p in &n.shards {
                    let q = s.shards.iter().find(|q| q.shard == p.shard).expect("its shard");
                    prop_assert!((q.epoch, q.hwm) <= (p.epoch, p.hwm));
                    prop_assert!(q.caught_up_ms >= p.caught_up_ms);
                }
            }
        }
    }

    /// Which nodes are reported one by one does not change as their numbers do (from one
    /// heartbeat to the next, with the same nodes below): only as nodes come and go.
    #[test]
    fn the_same_nodes_are_reported_one_by_one_however_their_numbers_grow() {
        let young: Vec<_> = (0..20_000)
            .map(|i| pb::NodeStatus {
                connected_ms: 0,
                shards: vec![pb::ShardProgress {
                    shard: 0,
                    epoch: 1,
                    ..Default::default()
                }],
                ..node_report(i, "edge", "eu", 0)
            })
            .collect();
        let old: Vec<_> = young
            .iter()
            .map(|n| pb::NodeStatus {
                connected_ms: u64::MAX / 2,
                shards: vec![pb::ShardProgress {
                    shard: 0,
                    epoch: u64::MAX / 2,
                    hwm: u64::MAX / 2,
                    lag_seqs: u64::MAX / 2,
                    lag_ms: u64::MAX / 2,
                    caught_up_ms: u64::MAX,
                }],
                ..n.clone()
            })
            .collect();
        let (_, left_young) = bounded_subtree(young, MAX_SUBTREE_BYTES, "r", &mut HashSet::new());
        let (sent, left_old) = bounded_subtree(old, MAX_SUBTREE_BYTES, "r", &mut HashSet::new());
        assert!(left_young > 0);
        assert_eq!(left_young, left_old);
        assert!(heartbeat_bytes(sent) <= MAX_SUBTREE_BYTES + 32);
    }

    /// A node that joins goes into the summary, and every node reported one by one before
    /// still is (a wait would take one that moved into a summary for gone); one that leaves
    /// makes room for the first of those summed up.
    #[test]
    fn a_node_that_joins_does_not_push_another_into_the_summary() {
        let mut nodes = vec![node_report(0, "relay", "", 5)];
        nodes.extend((1..20_000).map(|i| node_report(i * 2, "edge", "eu", 5)));
        let ids = |sent: &[pb::NodeStatus]| -> Vec<String> {
            sent.iter()
                .filter(|n| n.left_out == 0)
                .map(|n| n.node_id.clone())
                .collect()
        };
        let mut alone = HashSet::new();
        let (before, left_before) =
            bounded_subtree(nodes.clone(), MAX_SUBTREE_BYTES, "r", &mut alone);
        assert!(left_before > 0);
        // Sorted first among them, it would have taken the place of the last one reported.
        nodes.insert(1, node_report(1, "edge", "eu", 5));
        let (after, left_after) =
            bounded_subtree(nodes.clone(), MAX_SUBTREE_BYTES, "r", &mut alone);
        assert!(ids(&after) == ids(&before), "the same ones one by one");
        assert_eq!(left_after, left_before + 1);
        assert_eq!(after.last().unwrap().left_out as usize, left_after);
        // One reported leaves: the first one summed up takes its place.
        let gone = nodes.remove(5);
        let (then, _) = bounded_subtree(nodes.clone(), MAX_SUBTREE_BYTES, "r", &mut alone);
        let then = ids(&then);
        assert!(!then.contains(&gone.node_id));
        assert_eq!(then.len(), ids(&before).len());
        assert!(
            then.contains(&nodes[1].node_id),
            "the joiner, sorted first, is in now"
        );
    }

    /// Summaries by region that would take more than half the bound (nodes of thousands of
    /// regions) are by role alone.
    #[test]
    fn reports_of_thousands_of_regions_are_summed_up_by_role() {
        let many: Vec<_> = (0..30_000)
            .map(|i| node_report(i, "edge", &format!("region-{i}"), 50))
            .collect();
        let (sent, left_out) =
            bounded_subtree(many.clone(), MAX_SUBTREE_BYTES, "r", &mut HashSet::new());
        let summary = sent.last().unwrap();
        assert_eq!(summary.node_id, "edges left out by r");
        assert_eq!(
            (summary.region.as_str(), summary.left_out as usize),
            ("", left_out)
        );
        assert!(heartbeat_bytes(sent) <= MAX_SUBTREE_BYTES + 32);
    }

    /// A sender is left for the next one when, connected for the bound, it has said of no shard,
    /// or it has been out of touch with its own sender on some shard for the bound.
    #[test]
    fn a_sender_cut_off_itself_is_left_once_the_bound_has_passed() {
        let t0 = Instant::now();
        let s = |ms| t0 + Duration::from_millis(ms);
        let bound = Duration::from_secs(3);
        assert!(
            !sender_cut_off(&[], t0, s(2_999), bound),
            "too early to tell"
        );
        assert!(sender_cut_off(&[], t0, s(3_000), bound), "said of no shard");
        let fresh = [(0, 1, Some(s(9_000))), (1, 1, Some(s(9_500)))];
        assert!(!sender_cut_off(&fresh, t0, s(10_000), bound));
        let one_behind = [(0, 1, Some(s(9_000))), (1, 1, Some(s(6_000)))];
        assert!(sender_cut_off(&one_behind, t0, s(10_000), bound));
        assert!(
            sender_cut_off(&[(0, 1, None)], t0, s(10_000), bound),
            "never caught up"
        );
    }

    /// A node that keeps finding every sender cut off waits twice as long at each round of its
    /// senders before it leaves the next, up to a bound; one sender caught up on every shard
    /// (or new senders) brings it back to one timeout.
    #[test]
    fn senders_all_cut_off_are_left_ever_more_slowly() {
        let bound = Duration::from_secs(1);
        let mut c = CutOff::default();
        let mut waits = Vec::new();
        for _ in 0..14 {
            waits.push(c.patience(bound, 2).as_secs());
            c.left();
        }
        assert_eq!(waits, [1, 1, 2, 2, 4, 4, 8, 8, 16, 16, 30, 30, 30, 30]);
        assert_eq!(c.patience(bound, 1), MAX_CUT_OFF_PATIENCE);
        c.reset();
        assert_eq!(c.patience(bound, 2), bound);
        // A peer timeout above the most is kept.
        let long = Duration::from_secs(60);
        for _ in 0..10 {
            c.left();
        }
        assert_eq!(c.patience(long, 1), long);
        // Past every doubling that fits.
        for _ in 0..100 {
            c.left();
        }
        assert_eq!(c.patience(bound, 1), MAX_CUT_OFF_PATIENCE);

        let t0 = Instant::now();
        let s = |ms| t0 + Duration::from_millis(ms);
        assert!(!sender_fresh(&[], s(0), bound), "said of no shard");
        assert!(sender_fresh(
            &[(0, 1, Some(s(9_500))), (1, 1, Some(s(9_900)))],
            s(10_000),
            bound
        ));
        assert!(!sender_fresh(
            &[(0, 1, Some(s(9_500))), (1, 1, Some(s(8_000)))],
            s(10_000),
            bound
        ));
        assert!(!sender_fresh(&[(0, 1, None)], s(10_000), bound));
    }

    /// Readiness says which shards are behind and how long ago each was caught up, and turns
    /// ready exactly when every shard asked is fresh.
    #[test]
    fn unready_names_the_shards_behind() {
        let t0 = Instant::now();
        let s = |ms| t0 + Duration::from_millis(ms);
        let bound = Duration::from_millis(1_000);
        let mut st = LinkState::default();
        let why = st.unready(&[], s(0), bound).unwrap();
        assert!(
            why.contains("no shard") && why.contains("connected to no sender"),
            "{why}"
        );
        st.connected_to = Some("http://r1".into());
        st.progress = vec![(0, 7, 10, 10), (1, 7, 10, 10)];
        st.last_caught_up = Some(s(5_000));
        st.vouched = vec![(1, Some(s(3_000)))];
        assert_eq!(st.unready(&[0], s(5_500), bound), None);
        let why = st.unready(&[0, 1, 2], s(5_500), bound).unwrap();
        assert!(
            why.contains("shard 1 2.5 s ago") && why.contains("shard 2 never"),
            "{why}"
        );
        assert!(!why.contains("shard 0"), "{why}");
        assert!(why.contains("following http://r1"), "{why}");
        st.vouched.clear();
        assert_eq!(st.unready(&st.shards(), s(6_000), bound), None);
        assert!(st.unready(&st.shards(), s(6_001), bound).is_some());
        for now in [4_000, 5_000, 6_000, 6_001, 9_000] {
            assert_eq!(
                st.unready(&st.shards(), s(now), bound).is_none(),
                st.fresh_within(s(now), bound),
                "at {now} ms"
            );
        }
    }

    /// A node is fresh on a shard only while it and every sender up to the shard's source were
    /// caught up within the bound; a sender that vouches for nothing (the source) bounds nothing.
    #[test]
    fn freshness_is_the_oldest_catching_up_on_the_way_to_the_source() {
        let t0 = Instant::now();
        let s = |ms| t0 + Duration::from_millis(ms);
        let bound = Duration::from_millis(1_000);
        let mut st = LinkState {
            last_caught_up: Some(s(5_000)),
            ..Default::default()
        };
        assert!(
            !st.fresh_for(0, s(5_001), bound) && !st.fresh_within(s(5_001), bound),
            "in no shard yet: fresh for nothing"
        );
        st.progress = (0..3).map(|shard| (shard, 7, 10, 10)).collect();
        assert!(
            st.fresh_for(0, s(5_900), bound),
            "no vouch: its own catching up"
        );
        assert!(!st.fresh_for(0, s(6_100), bound));
        // The relay above was last caught up at 4.5 s (it told so at some later heartbeat).
        st.vouched = vec![(0, Some(s(4_500))), (1, None)];
        assert_eq!(st.caught_up_for(0), Some(s(4_500)));
        assert!(st.fresh_for(0, s(5_400), bound));
        assert!(!st.fresh_for(0, s(5_600), bound), "its sender's age counts");
        assert!(
            !st.fresh_for(1, s(5_001), bound),
            "a sender never caught up vouches for nothing"
        );
        assert!(
            st.fresh_for(2, s(5_900), bound),
            "another shard: its own catching up"
        );
        assert!(
            !st.fresh_for(3, s(5_001), bound),
            "a shard it has no position in"
        );
        assert!(
            !st.fresh_within(s(5_001), bound),
            "every shard must be fresh"
        );
        st.vouched.retain(|(shard, _)| *shard == 0);
        assert!(st.fresh_within(s(5_400), bound));
        st.last_caught_up = None;
        assert!(!st.fresh_for(0, s(5_400), bound), "never caught up itself");
    }
}
