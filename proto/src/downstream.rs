//! Serving the `Subscribe` stream to one receiver: the runtime around [`crate::link::Sender`].
//!
//! One task per receiver. It owns the receiver's sender state machine, reads batches from the
//! node's [`BatchSource`] (the coordinator's log, a relay's ring), and writes to a small bounded
//! channel that tonic drains into the stream. When the receiver is slow the channel fills and only
//! this task waits; the source is shared read-only, so nobody else is held back, and a receiver
//! that stops reading for longer than the peer timeout is dropped.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use crate::link::retransmit::compress;
use crate::link::sender::NextRange;
use crate::link::{Sender, SenderConfig, ShardView, SharedBatch, TxCommand};
use crate::pb;
use crate::types::{Filter, Seq, ShardId};

/// The longest node id, region or role a receiver may give.
const MAX_NAME: usize = 256;

/// What a source answers to a read.
#[derive(Debug, Clone)]
pub enum Fetch {
    /// Batches from the requested seq on (the first may start before it).
    Batches(Vec<Arc<SharedBatch>>),
    /// The range no longer exists anywhere this source can reach.
    Gone,
    /// Nothing there yet.
    NotYet,
}

/// Where a sender takes batches from.
pub trait BatchSource: Send + Sync + 'static {
    /// The shards served, with their bounds.
    fn views(&self) -> Vec<ShardView>;
    /// Changes whenever a head moves (or an epoch changes).
    fn heads(&self) -> watch::Receiver<u64>;
    /// Batches of `shard` from `from` on, about `budget` bytes (at least one batch).
    fn read(&self, shard: ShardId, from: Seq, budget: usize) -> impl Future<Output = Fetch> + Send;
    /// A receiver reported its subtree (itself and what is below it), for `dci status`.
    fn report(&self, link_id: u64, nodes: Vec<pb::NodeStatus>);
    /// The receiver of `link_id` acknowledged more (applied, by the link's rules): its own
    /// progress as last reported moves with it, between its reports (every heartbeat interval).
    fn acked(&self, _link_id: u64, _ack: &pb::Ack) {}
    /// The receiver of `link_id` is gone.
    fn forget(&self, link_id: u64);
    /// How long ago this node was last caught up with its own sender on `shard`, in ms (`u64::MAX`
    /// if never): told to receivers in heartbeats, since none of them is fresher than that. The
    /// source of a shard (its coordinator) is always 0.
    fn upstream_age_ms(&self, _shard: ShardId) -> u64 {
        0
    }
    /// How many shards the coordinator tier has (0: not known), told to receivers in heartbeats.
    fn shard_count(&self) -> u32 {
        0
    }
    /// A receiver resumes `shard` at `hwm`, in this node's epoch, past the shard's head here.
    /// A relay behind its sender is waited for; the source of a shard (its coordinator) has lost
    /// part of its log, and would give those seqs out again.
    fn receiver_ahead(&self, _shard: ShardId, _hwm: Seq, _head: Seq) {}
}

/// Downstream serving options.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// The sender state machine's tunables.
    pub sender: SenderConfig,
    /// How long a new stream may take to send its Hello.
    pub hello_timeout: Duration,
    /// How often the runtime ticks the state machine.
    pub tick: Duration,
    /// This node's random number (0: none): a Hello carrying it comes from this node itself.
    pub instance: u64,
    /// Receivers served at once (0: no limit). One more is refused with `RESOURCE_EXHAUSTED`
    /// before it costs anything, and goes to the next sender on its list.
    pub max_receivers: u64,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            sender: SenderConfig::default(),
            hello_timeout: Duration::from_secs(10),
            tick: Duration::from_millis(50),
            instance: 0,
            max_receivers: 0,
        }
    }
}

static LINK_IDS: AtomicU64 = AtomicU64::new(1);

/// A budget of log lines for an event that can come in floods (a thousand edges reconnecting
/// at once, or every few seconds while their relays are cut off): each of the first
/// `per_window` in a window is logged; the rest are counted, and told when the window ends
/// ([`LogBudget::close`]) or with the next one logged, whichever comes first.
#[derive(Debug)]
pub struct LogBudget {
    window: Duration,
    per_window: u32,
    opened: Option<Instant>,
    used: u32,
    held: u64,
}

impl LogBudget {
    /// `per_window` lines per `window`.
    pub fn new(window: Duration, per_window: u32) -> Self {
        Self {
            window,
            per_window,
            opened: None,
            used: 0,
            held: 0,
        }
    }

    /// Log this event? `Some(n)`: yes, and `n` before it were not; `None`: no.
    pub fn admit(&mut self, now: Instant) -> Option<u64> {
        if self
            .opened
            .is_none_or(|t| now.saturating_duration_since(t) >= self.window)
        {
            self.opened = Some(now);
            self.used = 0;
        }
        if self.used < self.per_window {
            self.used += 1;
            Some(std::mem::take(&mut self.held))
        } else {
            self.held += 1;
            None
        }
    }

    /// When the window holding events not logged ends: `Some` for the first one held in a
    /// window (the caller tells them then, with [`LogBudget::close`]), else `None`.
    pub fn first_held_until(&self) -> Option<Instant> {
        match self.opened {
            Some(t) if self.held == 1 && self.used >= self.per_window => Some(t + self.window),
            _ => None,
        }
    }

    /// Once the window is over: how many events were not logged (0 if they were told already,
    /// or the window goes on).
    pub fn close(&mut self, now: Instant) -> u64 {
        match self.opened {
            Some(t) if now.saturating_duration_since(t) >= self.window => {
                std::mem::take(&mut self.held)
            }
            _ => 0,
        }
    }
}

impl Default for LogBudget {
    fn default() -> Self {
        Self::new(Duration::from_secs(10), 20)
    }
}

/// Counters shared by all links of a node.
#[derive(Debug, Default)]
pub struct ServeCounters {
    /// Batches sent.
    pub batches: AtomicU64,
    /// Bytes of batches sent.
    pub bytes: AtomicU64,
    /// Resets sent.
    pub resets: AtomicU64,
    /// Go-backs (retransmissions).
    pub retransmits: AtomicU64,
    /// Receivers connected now.
    pub receivers: AtomicU64,
    /// Receivers refused because `max_receivers` were connected.
    pub refused: AtomicU64,
    /// Receivers that connected under a name another live receiver goes by.
    pub named_twice: AtomicU64,
    /// Lines saying a receiver connected.
    pub connect_log: std::sync::Mutex<LogBudget>,
    /// The receivers' names, each with the random numbers (`Hello.instance`) of its live links:
    /// two numbers under one name are two nodes that call themselves the same.
    names: std::sync::Mutex<(HashMap<String, Vec<u64>>, crate::throttle::Throttle)>,
}

/// A receiver's name among those served, given back when its link ends.
struct Named {
    counters: Arc<ServeCounters>,
    name: String,
    instance: u64,
}

impl Named {
    /// Note `name` with `instance`; warn when another node goes by it. A wait for a publish to
    /// be applied everywhere follows each cache by its name, and would take one's progress for
    /// the other's.
    fn register(counters: &Arc<ServeCounters>, name: &str, instance: u64) -> Named {
        let mut guard = crate::upstream::lock(&counters.names);
        let (names, throttle) = &mut *guard;
        let live = names.entry(name.to_string()).or_default();
        let others = live
            .iter()
            .filter(|&&i| i != 0 && instance != 0 && i != instance)
            .count();
        live.push(instance);
        if others > 0 {
            if let Some(held) = throttle.allow(Instant::now()) {
                tracing::warn!(
                    node = %crate::types::printable(name),
                    held,
                    "two receivers call themselves the same (or one came back before its last \
                     link here ended): give each its own node_id, or a wait for a publish to be \
                     applied everywhere (dci publish --wait) may take one's progress for the \
                     other's"
                );
            }
            counters.named_twice.fetch_add(1, Ordering::Relaxed);
        }
        Named {
            counters: counters.clone(),
            name: name.to_string(),
            instance,
        }
    }
}

impl Drop for Named {
    fn drop(&mut self) {
        let mut guard = crate::upstream::lock(&self.counters.names);
        let names = &mut guard.0;
        if let Some(live) = names.get_mut(&self.name) {
            if let Some(at) = live.iter().position(|&i| i == self.instance) {
                live.swap_remove(at);
            }
            if live.is_empty() {
                names.remove(&self.name);
            }
        }
    }
}

/// A receiver's place among those served, given back when its link ends.
struct Slot(Arc<ServeCounters>);

impl Slot {
    /// A place, unless `max` (0: no limit) are taken. Taken and counted in one step, so that
    /// receivers connecting at once cannot all slip in under the limit.
    fn take(counters: &Arc<ServeCounters>, max: u64) -> Option<Slot> {
        counters
            .receivers
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (max == 0 || n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(counters.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.receivers.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The `Subscribe` gRPC service over any batch source (the coordinator's log, a relay's rings).
pub struct SubscribeService<S> {
    source: Arc<S>,
    opts: ServeOptions,
    counters: Arc<ServeCounters>,
    shutdown: watch::Receiver<bool>,
}

impl<S: BatchSource> SubscribeService<S> {
    /// Serve `source`; every link ends when `shutdown` turns true.
    pub fn new(
        source: Arc<S>,
        opts: ServeOptions,
        counters: Arc<ServeCounters>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        SubscribeService {
            source,
            opts,
            counters,
            shutdown,
        }
    }
}

#[tonic::async_trait]
impl<S: BatchSource> pb::subscribe_server::Subscribe for SubscribeService<S> {
    type SubscribeStream = ReceiverStream<Result<pb::Downstream, Status>>;

    async fn subscribe(
        &self,
        request: tonic::Request<Streaming<pb::Upstream>>,
    ) -> Result<tonic::Response<Self::SubscribeStream>, Status> {
        let max = self.opts.max_receivers;
        let Some(slot) = Slot::take(&self.counters, max) else {
            self.counters.refused.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(max, "receiver refused: max_receivers reached");
            return Err(Status::resource_exhausted(format!(
                "this node serves its maximum of {max} receivers (max_receivers); follow another sender"
            )));
        };
        Ok(tonic::Response::new(serve(
            self.source.clone(),
            request.into_inner(),
            self.opts.clone(),
            slot,
            self.shutdown.clone(),
        )))
    }
}

/// Serve one `Subscribe` call: returns the response stream at once and runs the link in a task.
fn serve<S: BatchSource>(
    source: Arc<S>,
    inbound: Streaming<pb::Upstream>,
    opts: ServeOptions,
    slot: Slot,
    shutdown: watch::Receiver<bool>,
) -> ReceiverStream<Result<pb::Downstream, Status>> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let link_id = LINK_IDS.fetch_add(1, Ordering::Relaxed);
        let counters = &slot.0;
        let result = run_link(&source, inbound, &tx, &opts, counters, shutdown, link_id).await;
        drop(slot);
        source.forget(link_id);
        if let Err(status) = result {
            tracing::debug!(link_id, %status, "link ended");
            let _ = tx.try_send(Err(status));
        }
    });
    ReceiverStream::new(rx)
}

type Tx = mpsc::Sender<Result<pb::Downstream, Status>>;

async fn send(tx: &Tx, msg: pb::downstream::Msg, timeout: Duration) -> Result<(), Status> {
    // The common case, room in the queue, needs no timer.
    let item = match tx.try_send(Ok(pb::Downstream { msg: Some(msg) })) {
        Ok(()) => return Ok(()),
        Err(mpsc::error::TrySendError::Closed(_)) => {
            return Err(Status::cancelled("receiver went away"))
        }
        Err(mpsc::error::TrySendError::Full(item)) => item,
    };
    match tokio::time::timeout(timeout, tx.send(item)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(Status::cancelled("receiver went away")),
        Err(_) => Err(Status::deadline_exceeded(
            "receiver stopped reading; dropped to protect the others",
        )),
    }
}

async fn run_link<S: BatchSource>(
    source: &Arc<S>,
    mut inbound: Streaming<pb::Upstream>,
    tx: &Tx,
    opts: &ServeOptions,
    counters: &Arc<ServeCounters>,
    mut shutdown: watch::Receiver<bool>,
    link_id: u64,
) -> Result<(), Status> {
    let first = tokio::time::timeout(opts.hello_timeout, inbound.message())
        .await
        .map_err(|_| Status::deadline_exceeded("no Hello within the hello timeout"))??;
    let hello = match first.and_then(|m| m.msg) {
        Some(pb::upstream::Msg::Hello(h)) => h,
        Some(_) => return Err(Status::invalid_argument("the first message must be Hello")),
        None => return Ok(()),
    };
    if hello.instance != 0 && hello.instance == opts.instance {
        return Err(Status::failed_precondition(
            "this node was given its own URL to follow (--upstream): a node cannot follow itself",
        ));
    }
    if let Some(p) = hello.resume.iter().find(|p| p.hwm > crate::types::MAX_SEQ) {
        return Err(Status::invalid_argument(format!(
            "resume point of shard {} is out of bounds ({})",
            p.shard, p.hwm
        )));
    }
    // Names are logged and kept for `dci status` as long as the link lives.
    for (what, name) in [
        ("node_id", &hello.node_id),
        ("region", &hello.region),
        ("role", &hello.role),
    ] {
        if name.len() > MAX_NAME {
            return Err(Status::invalid_argument(format!(
                "{what} is {} bytes, more than the maximum of {MAX_NAME}",
                name.len()
            )));
        }
    }
    let filter = Filter::try_from_pb(hello.filter.clone())
        .map_err(|e| Status::invalid_argument(format!("bad filter: {e}")))?;
    let _named = Named::register(counters, &hello.node_id, hello.instance);
    // Under one lock: the first connection held in a window, and only it, has the summary told.
    let (logged, held_until) = {
        let mut budget = crate::upstream::lock(&counters.connect_log);
        let logged = budget.admit(Instant::now());
        (logged, budget.first_held_until())
    };
    match logged {
        Some(0) => {
            tracing::info!(link_id, node = %hello.node_id, region = %hello.region, role = %hello.role, "receiver connected")
        }
        Some(not_logged) => {
            tracing::info!(link_id, node = %hello.node_id, region = %hello.region, role = %hello.role, not_logged, "receiver connected (and others before it, not logged one by one)")
        }
        None => {
            tracing::debug!(link_id, node = %hello.node_id, region = %hello.region, role = %hello.role, "receiver connected");
            // The last of a flood is told too, when its window ends, not only with a later one.
            if let Some(until) = held_until {
                let counters = counters.clone();
                tokio::spawn(async move {
                    tokio::time::sleep_until(until.into()).await;
                    let not_logged =
                        crate::upstream::lock(&counters.connect_log).close(Instant::now());
                    if not_logged > 0 {
                        tracing::info!(not_logged, "receivers connected, not logged one by one");
                    }
                });
            }
        }
    }
    let stall = opts.sender.peer_timeout;
    let mut cfg = opts.sender.clone();
    if hello.window_bytes > 0 {
        cfg.window_bytes = cfg
            .window_bytes
            .min(usize::try_from(hello.window_bytes).unwrap_or(usize::MAX));
    }
    let mut sender = Sender::new(cfg, Instant::now());
    let views = source.views();
    for p in &hello.resume {
        if let Some(v) = views.iter().find(|v| v.shard == p.shard) {
            if p.epoch == v.epoch && p.hwm > v.head {
                source.receiver_ahead(p.shard, p.hwm, v.head);
            }
        }
    }
    for c in sender.on_hello(&hello.resume, &views, Instant::now()) {
        exec(source.as_ref(), c, tx, stall, counters).await?;
    }
    let mut heads = source.heads();
    let mut tick = tokio::time::interval(opts.tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        pump(
            source,
            &mut sender,
            &filter,
            hello.zstd_batches,
            tx,
            stall,
            counters,
        )
        .await?;
        tokio::select! {
            biased;
            _ = shutdown.changed() => return Ok(()),
            msg = inbound.message() => {
                let now = Instant::now();
                match msg {
                    Ok(Some(pb::Upstream { msg: Some(m) })) => match m {
                        pb::upstream::Msg::Ack(a) => {
                            if sender.on_ack(&a, now) {
                                source.acked(link_id, &a);
                            }
                        }
                        pb::upstream::Msg::Nack(n) => {
                            if sender.on_nack(&n, now) {
                                counters.retransmits.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        pb::upstream::Msg::Heartbeat(h) => {
                            sender.on_heard(now);
                            if !h.subtree.is_empty() {
                                source.report(link_id, h.subtree);
                            }
                            if h.probe_us > 0 {
                                sender.on_probe(h.probe_us);
                                for c in sender.tick(&source.views(), now) {
                                    exec(source.as_ref(), c, tx, stall, counters).await?;
                                }
                            }
                        }
                        pb::upstream::Msg::Hello(_) => sender.on_heard(now),
                    },
                    Ok(Some(pb::Upstream { msg: None })) => sender.on_heard(now),
                    Ok(None) => return Ok(()),
                    Err(status) => return Err(status),
                }
            }
            r = heads.changed() => {
                if r.is_err() {
                    return Ok(());
                }
            }
            _ = tick.tick() => {
                for c in sender.tick(&source.views(), Instant::now()) {
                    exec(source.as_ref(), c, tx, stall, counters).await?;
                }
            }
        }
    }
}

async fn exec<S: BatchSource>(
    source: &S,
    c: TxCommand,
    tx: &Tx,
    stall: Duration,
    counters: &ServeCounters,
) -> Result<(), Status> {
    match c {
        TxCommand::Reset(r) => {
            tracing::info!(shard = r.shard, epoch = r.epoch, hwm = r.hwm, reason = %r.reason, "reset sent");
            counters.resets.fetch_add(1, Ordering::Relaxed);
            send(tx, pb::downstream::Msg::Reset(r), stall).await
        }
        TxCommand::Heartbeat(mut heads, echo_us) => {
            let shard_count = source.shard_count();
            for h in &mut heads {
                h.upstream_age_ms = source.upstream_age_ms(h.shard);
                h.shard_count = shard_count;
            }
            let hb = pb::Heartbeat {
                heads,
                subtree: Vec::new(),
                now_us: crate::now_us(),
                probe_us: 0,
                echo_us,
            };
            send(tx, pb::downstream::Msg::Heartbeat(hb), stall).await
        }
        TxCommand::Disconnect(why) => Err(Status::unavailable(why)),
    }
}

/// Send whatever the window allows on every shard.
#[allow(clippy::too_many_arguments)]
async fn pump<S: BatchSource>(
    source: &Arc<S>,
    sender: &mut Sender,
    filter: &Filter,
    zstd: bool,
    tx: &Tx,
    stall: Duration,
    counters: &ServeCounters,
) -> Result<(), Status> {
    for view in source.views() {
        loop {
            let now = Instant::now();
            match sender.next_range(&view, now) {
                NextRange::Idle | NextRange::WindowFull => break,
                NextRange::Reset(c) => exec(source.as_ref(), c, tx, stall, counters).await?,
                NextRange::Send { from, budget, .. } => {
                    match source.read(view.shard, from, budget).await {
                        Fetch::NotYet => break,
                        Fetch::Gone => {
                            let c = sender.on_gone(&view, now);
                            exec(source.as_ref(), c, tx, stall, counters).await?;
                        }
                        Fetch::Batches(batches) => {
                            if batches.is_empty() {
                                break;
                            }
                            for b in batches {
                                let filtered =
                                    || b.batch.after(from - 1).filtered(filter).encode_shared();
                                let msg = match (filter.is_pass_all(), zstd) {
                                    // The shared encoding; the receiver trims what it already has.
                                    (true, false) => pb::downstream::Msg::Batch(b.encoded.clone()),
                                    (true, true) => pb::downstream::Msg::BatchZstd(b.compressed()),
                                    (false, false) => pb::downstream::Msg::Batch(filtered()),
                                    (false, true) => {
                                        pb::downstream::Msg::BatchZstd(compress(&filtered()))
                                    }
                                };
                                let len = match &msg {
                                    pb::downstream::Msg::Batch(x)
                                    | pb::downstream::Msg::BatchZstd(x) => x.len(),
                                    _ => 0,
                                };
                                send(tx, msg, stall).await?;
                                counters.batches.fetch_add(1, Ordering::Relaxed);
                                counters.bytes.fetch_add(len as u64, Ordering::Relaxed);
                                sender.on_sent(view.shard, b.batch.last_seq, len, Instant::now());
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A flood is logged up to the budget; the first line of the next window says how many were
    /// not; a quiet window costs nothing.
    #[test]
    fn a_log_budget_holds_a_flood_and_says_how_much() {
        let t0 = Instant::now();
        let s = |ms| t0 + Duration::from_millis(ms);
        let mut b = LogBudget::new(Duration::from_secs(10), 3);
        let first: Vec<Option<u64>> = (0..1000).map(|i| b.admit(s(i))).collect();
        assert_eq!(&first[..4], &[Some(0), Some(0), Some(0), None]);
        assert!(first[3..].iter().all(Option::is_none));
        assert_eq!(b.admit(s(10_000)), Some(997), "the held ones, told once");
        assert_eq!(b.admit(s(10_001)), Some(0));
        assert_eq!(b.admit(s(10_002)), Some(0));
        assert_eq!(b.admit(s(10_003)), None);
        assert_eq!(b.admit(s(60_000)), Some(1));
        assert_eq!(b.admit(s(60_001)), Some(0));
    }

    /// The last of a flood is told when its window ends, once; the window's first held event
    /// says when that is, and no other does.
    #[test]
    fn a_log_budget_tells_the_held_ones_when_their_window_ends() {
        let t0 = Instant::now();
        let s = |ms| t0 + Duration::from_millis(ms);
        let mut b = LogBudget::new(Duration::from_secs(10), 2);
        assert_eq!(b.admit(s(0)), Some(0));
        assert_eq!(b.first_held_until(), None, "logged, nothing held");
        assert_eq!(b.admit(s(1)), Some(0));
        assert_eq!(b.admit(s(2)), None);
        assert_eq!(b.first_held_until(), Some(s(10_000)));
        assert_eq!(b.admit(s(3)), None);
        assert_eq!(b.first_held_until(), None, "only the first held one asks");
        assert_eq!(b.close(s(9_999)), 0, "the window goes on");
        assert_eq!(b.close(s(10_000)), 2);
        assert_eq!(b.close(s(10_001)), 0, "told once");
        assert_eq!(b.admit(s(10_002)), Some(0), "and not again with the next");
        // A window whose held ones the next logged event told has nothing left to close.
        assert_eq!(b.admit(s(10_003)), Some(0));
        assert_eq!(b.admit(s(10_004)), None);
        assert_eq!(b.admit(s(20_002)), Some(1));
        assert_eq!(b.close(s(30_002)), 0);
    }
}
