//! [`Subscription`]: the invalidation stream handed to application code, as an edge receives
//! it (in seq order per shard, gaps repaired, failing over between senders), for what the SDK's
//! caches do not cover: an application's own typed cache, a CDN to purge, an index to refresh.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use dci_proto::pb;
use dci_proto::types::{Batch, Epoch, Invalidation, Seq, ShardId};
use dci_proto::upstream::{self, Applier, FollowOptions, LinkState};
use dci_proto::Filter;
use tokio::sync::{mpsc, watch};

use crate::{ClientTls, Error};

/// What a [`Subscription`] follows, and from where.
#[derive(Clone, Debug)]
pub struct SubscriptionOptions {
    /// Relays to follow, in failover order (a relay carries every shard of its tier; a
    /// coordinator given here, only its own).
    pub senders: Vec<String>,
    /// Only keys with these prefixes (every prefix, tag and all-keys invalidation still comes);
    /// empty: every key.
    pub prefixes: Vec<String>,
    /// This subscriber's id in `dci status`.
    pub node_id: String,
    /// This subscriber's region in `dci status`.
    pub region: String,
    /// Where to resume, per shard: a [`Subscription::position`] kept from before. The stream
    /// goes on after it, or, when the senders no longer have what follows it (or the shard's
    /// log is of another epoch now), with an [`Event::Flush`]. Empty: at the senders' head.
    pub resume: Vec<(ShardId, Epoch, Seq)>,
    /// Events held for the application before the stream waits for it to take them (64; an
    /// event is a batch, as many invalidations as came together): a subscriber that takes them
    /// slowly slows only its own link, and one that falls behind everything its senders retain
    /// gets an [`Event::Flush`].
    pub buffer: usize,
    /// How to speak TLS to `https://` senders.
    pub tls: ClientTls,
}

impl Default for SubscriptionOptions {
    fn default() -> Self {
        SubscriptionOptions {
            senders: Vec::new(),
            prefixes: Vec::new(),
            node_id: format!("subscriber-{:08x}", rand::random::<u32>()),
            region: String::new(),
            resume: Vec::new(),
            buffer: 64,
            tls: ClientTls::default(),
        }
    }
}

/// What the stream says, in order per shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Invalidations of `shard`, in seq order: drop what each names (a key, every key with a
    /// prefix, every value with a tag, every key of the shard), up to and with `last_seq`.
    Invalidations {
        /// The shard.
        shard: ShardId,
        /// The shard log's epoch.
        epoch: Epoch,
        /// The last seq this event covers (some between may have been filtered out).
        last_seq: Seq,
        /// The invalidations.
        entries: Vec<Invalidation>,
    },
    /// The stream of `shard` could not be kept whole (the subscriber fell behind everything
    /// its senders retain, or the shard's log began a new epoch), or it is joined (at the
    /// senders' head, the shard's first event): drop everything of the shard held from before.
    /// It goes on after `hwm` in `epoch`.
    Flush {
        /// The shard.
        shard: ShardId,
        /// The epoch it goes on in.
        epoch: Epoch,
        /// The seq it goes on after.
        hwm: Seq,
        /// Why.
        reason: String,
    },
    /// An invalidation refused as poison (an unknown kind, a key too long...), for the
    /// application's log: told before its batch, which carries what stands in for it (its key
    /// invalidated; a tag's, every tagged value), so there is nothing more to drop for it.
    Quarantined {
        /// The shard.
        shard: ShardId,
        /// Its key, as it came.
        key: Bytes,
        /// Why it was refused.
        why: String,
    },
}

/// The invalidation stream of the senders given, as [`Event`]s.
///
/// ```no_run
/// # async fn demo() -> Result<(), dci_sdk::Error> {
/// use dci_sdk::{Event, Subscription, SubscriptionOptions};
/// let mut sub = Subscription::start(SubscriptionOptions {
///     senders: vec!["http://127.0.0.1:7500".into()],
///     ..Default::default()
/// })?;
/// while let Some(event) = sub.next().await {
///     if let Event::Invalidations { entries, .. } = event {
///         for e in entries {
///             println!("{:?} {:?}", e.kind, e.key);
///         }
///     }
/// }
/// # Ok(()) }
/// ```
pub struct Subscription {
    events: mpsc::Receiver<Event>,
    /// After the events taken so far.
    position: Vec<(ShardId, Epoch, Seq)>,
    stop: watch::Sender<bool>,
}

impl Subscription {
    /// Start following the senders, on a thread of its own: however slowly the application
    /// takes events, nothing else waits for it.
    pub fn start(opts: SubscriptionOptions) -> Result<Subscription, Error> {
        if opts.senders.is_empty() {
            return Err(Error::Url(String::new(), "no sender URL".into()));
        }
        let (tx, events) = mpsc::channel(opts.buffer.max(1));
        let (stop, stopped) = watch::channel(false);
        let follow = FollowOptions {
            urls: opts.senders.clone(),
            node_id: opts.node_id.clone(),
            region: opts.region.clone(),
            role: "subscriber".into(),
            filter: Filter::of_prefixes(&opts.prefixes),
            heartbeat_interval: Duration::from_secs(1),
            resume: opts.resume.clone(),
            tls: opts.tls.clone(),
            ..FollowOptions::default()
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::Unavailable(format!("starting the subscription: {e}")))?;
        let applier = Arc::new(Mutex::new(Handing(tx)));
        let state = Arc::new(Mutex::new(LinkState::default()));
        std::thread::Builder::new()
            .name(format!("dci-{}", opts.node_id))
            .spawn(move || runtime.block_on(upstream::follow(follow, applier, state, stopped)))
            .map_err(|e| Error::Unavailable(format!("starting the subscription: {e}")))?;
        Ok(Subscription {
            events,
            position: opts.resume,
            stop,
        })
    }

    /// The next event; `None` once stopped. (A `Subscription` is also a [`futures::Stream`]
    /// of them.)
    pub async fn next(&mut self) -> Option<Event> {
        std::future::poll_fn(|cx| self.poll_event(cx)).await
    }

    fn poll_event(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Event>> {
        let event = match self.events.poll_recv(cx) {
            std::task::Poll::Ready(Some(event)) => event,
            other => return other,
        };
        self.taken(&event);
        std::task::Poll::Ready(Some(event))
    }

    /// The position after `event`, which the application has taken.
    fn taken(&mut self, event: &Event) {
        let (shard, epoch, seq) = match event {
            Event::Invalidations {
                shard,
                epoch,
                last_seq,
                ..
            } => (*shard, *epoch, *last_seq),
            Event::Flush {
                shard, epoch, hwm, ..
            } => (*shard, *epoch, *hwm),
            Event::Quarantined { .. } => return,
        };
        match self.position.iter_mut().find(|(s, _, _)| *s == shard) {
            Some(p) => *p = (shard, epoch, seq),
            None => self.position.push((shard, epoch, seq)),
        }
        self.position.sort_unstable();
    }

    /// Where the events taken so far end, per shard: give it as
    /// [`SubscriptionOptions::resume`] to go on after them (a later process, say).
    pub fn position(&self) -> Vec<(ShardId, Epoch, Seq)> {
        self.position.clone()
    }

    /// Stop following (also when dropped).
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

impl futures::Stream for Subscription {
    type Item = Event;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Event>> {
        self.get_mut().poll_event(cx)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Hands what the link applies to the application, waiting while its buffer is full: on the
/// subscription's own thread, so the wait holds up only this link (whose acks then say it is
/// behind, as they should).
struct Handing(mpsc::Sender<Event>);

impl Handing {
    fn hand(&self, event: Event) {
        // An error: the subscription is gone, and its link stops at once. Unconstrained: this
        // runs inside the link task's poll, whose budget, once spent, would have the send
        // answer "not yet" for ever to a wait that never yields to the runtime.
        let send = tokio::task::unconstrained(self.0.send(event));
        let _ = futures::executor::block_on(send);
    }
}

impl Applier for Handing {
    fn apply(&mut self, batch: &Batch) {
        if batch.entries.is_empty() {
            return;
        }
        self.hand(Event::Invalidations {
            shard: batch.shard,
            epoch: batch.epoch,
            last_seq: batch.last_seq,
            entries: batch.entries.clone(),
        });
    }

    fn quarantine(&mut self, shard: ShardId, entry: &pb::Invalidation, why: &str) {
        self.hand(Event::Quarantined {
            shard,
            key: entry.key.clone(),
            why: why.to_string(),
        });
    }

    fn flush(&mut self, shard: ShardId, epoch: Epoch, hwm: Seq, reason: &str) {
        self.hand(Event::Flush {
            shard,
            epoch,
            hwm,
            reason: reason.to_string(),
        });
    }
}
