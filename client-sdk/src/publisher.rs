//! The publisher: a cheap handle, one task per shard that owns the connection.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use dci_proto::applied::{Coverage, Lagging, Outcome, Published};
use dci_proto::pb;
use dci_proto::pb::admin_client::AdminClient;
use dci_proto::pb::publisher_client::PublisherClient;
use dci_proto::ring::ShardMap;
use dci_proto::ShardId;
use dci_proto::{Invalidation, Kind, Seq};
use futures::stream::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tonic::transport::Channel;

use crate::{ClientTls, Error};

/// Publisher tunables.
#[derive(Clone, Debug)]
pub struct PublisherOptions {
    /// Names the publisher in the coordinators' logs (default: `pub-` and a random number). Each
    /// [`Publisher`] adds a tag of its own (`billing-7#1f2e3d4c5b6a7988`), under which the
    /// coordinators deduplicate its retried requests: retries never leave the `Publisher` that
    /// made them, so two of them with one name, or a process started again under it, never
    /// share request numbers (a number shared with other entries would be refused; with the
    /// same entries, taken for a retry and not logged).
    ///
    /// ```
    /// let o = dci_sdk::PublisherOptions { publisher_id: "billing-7".into(), ..Default::default() };
    /// assert_eq!(o.publisher_id, "billing-7");
    /// ```
    pub publisher_id: String,
    /// Most entries per request.
    ///
    /// ```
    /// let o = dci_sdk::PublisherOptions { max_batch: 1024, ..Default::default() };
    /// # let _ = o;
    /// ```
    pub max_batch: usize,
    /// Requests in flight per shard (pipelined on one stream); more accumulate into the next one.
    /// An invalidation reaches the caches as soon as it is written to the log, its answer comes
    /// once it is fsync'd: a deep pipeline keeps invalidations flowing to the caches while a
    /// disk is slow to sync. At most [`dci_proto::types::RETRY_WINDOW`] (256, the default): a
    /// coordinator remembers that many of a publisher's requests, so that each one resent after
    /// a broken stream is logged once.
    ///
    /// ```
    /// let o = dci_sdk::PublisherOptions { max_in_flight: 8, ..Default::default() };
    /// # let _ = o;
    /// ```
    pub max_in_flight: usize,
    /// Bytes of entries in flight per shard at most (about: keys and bookkeeping), kept until
    /// answered to be sent again after a failure; beyond, callers wait as for `max_in_flight`.
    ///
    /// ```
    /// let o = dci_sdk::PublisherOptions { max_in_flight_bytes: 8 << 20, ..Default::default() };
    /// # let _ = o;
    /// ```
    pub max_in_flight_bytes: usize,
    /// Give up after retrying this long.
    ///
    /// ```
    /// let o = dci_sdk::PublisherOptions { retry_for: std::time::Duration::from_secs(30), ..Default::default() };
    /// # let _ = o;
    /// ```
    pub retry_for: Duration,
    /// Longest wait for the next answer while requests are in flight, and for the coordinator to
    /// open a stream, before reconnecting (on a new connection).
    ///
    /// ```
    /// let o = dci_sdk::PublisherOptions { timeout: std::time::Duration::from_secs(2), ..Default::default() };
    /// # let _ = o;
    /// ```
    pub timeout: Duration,
    /// How to speak TLS to `https://` coordinators: the CA to trust (default: the system's roots)
    /// and, for coordinators that require one (mutual TLS), the client certificate to present.
    ///
    /// ```no_run
    /// let read = |f: &str| std::fs::read(f).unwrap();
    /// let tls = dci_sdk::ClientTls::with_ca_pem(read("ca.pem"))
    ///     .and_then(|t| t.with_identity_pem(read("me.pem"), read("me.key")))
    ///     .unwrap();
    /// let o = dci_sdk::PublisherOptions { tls, ..Default::default() };
    /// # let _ = o;
    /// ```
    pub tls: ClientTls,
}

impl Default for PublisherOptions {
    fn default() -> Self {
        PublisherOptions {
            publisher_id: format!("pub-{:016x}", rand::random::<u64>()),
            max_batch: 4096,
            max_in_flight: dci_proto::types::RETRY_WINDOW,
            max_in_flight_bytes: 32 << 20,
            retry_for: Duration::from_secs(10),
            timeout: Duration::from_secs(5),
            tls: ClientTls::default(),
        }
    }
}

/// The most a request may carry.
const REQUEST_BYTES: usize = dci_proto::types::PUBLISH_REQUEST_BYTES;

struct Pending {
    /// When the caller handed its entries over.
    queued_at: tokio::time::Instant,
    entries: Vec<Invalidation>,
    /// Their [`dci_proto::types::request_bytes`].
    bytes: usize,
    reply: oneshot::Sender<Result<Vec<Seq>, Error>>,
}

/// Publishes invalidations; clone it freely (all clones share the connections).
#[derive(Clone)]
pub struct Publisher {
    shards: Arc<Vec<mpsc::Sender<Pending>>>,
    map: ShardMap,
    /// Per shard, the furthest the coordinator has answered (for [`Publisher::wait_applied`]).
    answered: Arc<Mutex<Vec<Published>>>,
    /// Per shard, how far a wait has found every cache to have applied.
    confirmed: Arc<Mutex<Vec<Published>>>,
    /// Each shard's coordinator, for the tree below it.
    admins: Arc<Vec<AdminClient<Channel>>>,
}

/// What [`Publisher::wait_applied`] found: every cache had applied what was published, or was
/// past its staleness bound since (and so served none of it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    /// How many caches (edges, near caches) the coordinators' tree reported.
    pub caches: usize,
    /// Their regions, each once.
    pub regions: Vec<String>,
    /// The caches that had not applied it when last reported (stopped, cut off, stuck behind
    /// their relay), but are past their staleness bounds since it was answered: they serve
    /// nothing it invalidated, and apply it before they serve hits again. Also, marked
    /// `unseen`, the caches that followed a coordinator before it restarted and were not all
    /// back before their bound had passed since its start.
    pub past_bound: Vec<Lagging>,
}

impl Publisher {
    /// Connect to the coordinators, one URL per shard (index = shard id).
    pub async fn connect(urls: Vec<String>) -> Result<Publisher, Error> {
        Self::with_options(urls, PublisherOptions::default()).await
    }

    /// Connect with options.
    pub async fn with_options(
        urls: Vec<String>,
        opts: PublisherOptions,
    ) -> Result<Publisher, Error> {
        if urls.is_empty() {
            return Err(Error::Url(String::new(), "no coordinator URL".into()));
        }
        // No answer could come within no time: every request would fail until `retry_for`.
        if opts.timeout.is_zero() {
            return Err(Error::Refused("timeout must be more than 0".into()));
        }
        let mut shards = Vec::new();
        // The name is cut to leave room for the tag within the coordinators' 256 bytes.
        let mut name = opts.publisher_id.clone();
        while name.len() > 256 - 17 {
            name.pop();
        }
        let opts = PublisherOptions {
            publisher_id: format!("{name}#{:016x}", rand::random::<u64>()),
            ..opts
        };
        let request_no = Arc::new(AtomicU64::new(1));
        let answered = Arc::new(Mutex::new(Vec::new()));
        let mut admins = Vec::new();
        for (shard, url) in urls.iter().enumerate() {
            let (client, channel) = shard_client(url, &opts)?;
            // A tree of many thousands of nodes is more than the default 4 MiB.
            admins.push(AdminClient::new(channel).max_decoding_message_size(64 << 20));
            let (tx, rx) = mpsc::channel(16384);
            tokio::spawn(run_shard(
                Shard {
                    url: url.clone(),
                    id: shard as u32,
                    answered: answered.clone(),
                },
                client,
                rx,
                opts.clone(),
                request_no.clone(),
            ));
            shards.push(tx);
        }
        Ok(Publisher {
            map: ShardMap::new(urls.len() as u32),
            shards: Arc::new(shards),
            answered,
            confirmed: Arc::default(),
            admins: Arc::new(admins),
        })
    }

    /// Wait until every cache below the coordinators (each edge and near cache of the tree they
    /// report, in every region) has applied everything this publisher has had answered, for at
    /// most `within`: then none serves a value invalidated so far, and a read that misses loads
    /// the new one. A relay reports what its receivers have applied (their acks) every half
    /// second, so this returns up to about half a second after the last cache applied (per level
    /// of relays). A cache in the tree at the call that leaves it (cut off, restarting, moving
    /// to another relay), or that does not apply (stuck), is waited for until it is back, or
    /// until its staleness bound has passed since the call (it then serves nothing invalidated
    /// before: [`Applied::past_bound`]). A sender goes on reporting the caches of a link that
    /// ended for their bound, so the tree has the caches behind a relay that is between senders;
    /// one it no longer reports has been out of touch for longer than its bound, and serves
    /// nothing until it has caught up, which is applying what was published. A coordinator
    /// that restarted on its log less than the longest bound it knows of ago (5 s unless a
    /// cache says more) may not have all its caches of before back: the wait holds until that
    /// much has passed since its start. Caches beyond
    /// what a relay's heartbeat carries come summed up, and are waited for as the least advanced
    /// of them. [`Error::NotApplied`] names the caches that lag when the time is up. Only the
    /// trees of the shards this publisher has had answers from since its last wait that
    /// returned are read (all it has had answers from, if none since): a coordinator down that
    /// it did not publish to since holds no wait.
    ///
    /// ```no_run
    /// # async fn demo(p: dci_sdk::Publisher) -> Result<(), dci_sdk::Error> {
    /// p.invalidate("user:42:profile").await?;
    /// let applied = p.wait_applied(std::time::Duration::from_secs(5)).await?;
    /// println!("gone from all {} caches", applied.caches);
    /// # Ok(()) }
    /// ```
    pub async fn wait_applied(&self, within: Duration) -> Result<Applied, Error> {
        let answered = dci_proto::upstream::lock(&self.answered).clone();
        // What an earlier wait found applied needs no second one: a shard answered nothing since
        // (its coordinator down now, say) is not read again.
        let confirmed = dci_proto::upstream::lock(&self.confirmed).clone();
        let pending: Vec<Published> = answered
            .iter()
            .filter(|p| !confirmed.contains(p))
            .copied()
            .collect();
        let published = if pending.is_empty() {
            answered
        } else {
            pending
        };
        let deadline = tokio::time::Instant::now() + within;
        let mut coverage = Coverage::default();
        // Only the shards published to: a coordinator down holds no wait for the others' keys.
        let shards: Vec<ShardId> = if published.is_empty() {
            (0..self.admins.len() as ShardId).collect()
        } else {
            published.iter().map(|p| p.shard).collect()
        };
        let tree = || self.tree(&shards);
        match dci_proto::applied::wait(&mut coverage, &published, deadline, tree).await {
            Outcome::Applied { past_bound } => {
                let mut confirmed = dci_proto::upstream::lock(&self.confirmed);
                for p in &published {
                    dci_proto::applied::note(&mut confirmed, *p);
                }
                drop(confirmed);
                Ok(Applied {
                    caches: coverage.caches(),
                    regions: coverage.regions().into_iter().map(String::from).collect(),
                    past_bound,
                })
            }
            Outcome::NotApplied(lagging) => Err(Error::NotApplied(lagging)),
            Outcome::Unread(failed) => Err(failed.unwrap_or_else(|| {
                Error::Unavailable(format!("the coordinators' tree not read within {within:?}"))
            })),
        }
    }

    /// The trees below the coordinators of `shards`, one after the other (a node below several
    /// is in each: [`Coverage`] takes its furthest).
    async fn tree(&self, shards: &[ShardId]) -> Result<Vec<pb::NodeStatus>, Error> {
        let mut nodes = Vec::new();
        for admin in shards.iter().filter_map(|&s| self.admins.get(s as usize)) {
            let r = admin.clone().status(pb::StatusRequest {}).await?;
            nodes.extend(r.into_inner().nodes);
        }
        Ok(nodes)
    }

    /// Invalidate one key; returns its seq once it is durable.
    pub async fn invalidate(&self, key: impl Into<Bytes>) -> Result<Seq, Error> {
        let seqs = self.publish(vec![Invalidation::key(key)]).await?;
        Ok(seqs[0])
    }

    /// Invalidate one key with the writer's version (row version, LSN).
    pub async fn invalidate_version(
        &self,
        key: impl Into<Bytes>,
        version: u64,
    ) -> Result<Seq, Error> {
        let inv = Invalidation {
            source_version: Some(version),
            ..Invalidation::key(key)
        };
        Ok(self.publish(vec![inv]).await?[0])
    }

    /// Invalidate every key that starts with `prefix`, on every shard of the tier; returns the
    /// seq it got on shard 0 once it is durable on all of them.
    pub async fn invalidate_prefix(&self, prefix: impl Into<Bytes>) -> Result<Seq, Error> {
        let prefix = prefix.into();
        if prefix.is_empty() {
            return Err(Error::Refused(
                "an empty prefix would be every key: say invalidate_all for that".into(),
            ));
        }
        Ok(self.publish(vec![Invalidation::prefix(prefix)]).await?[0])
    }

    /// Invalidate every value filled with `tag` ([`crate::Fill::tagged`]), whatever
    /// its key, on every shard of the tier; returns the seq it got on shard 0 once it is
    /// durable on all of them.
    pub async fn invalidate_tag(&self, tag: impl Into<Bytes>) -> Result<Seq, Error> {
        let tag = tag.into();
        if tag.is_empty() {
            return Err(Error::Refused("an empty tag is no tag".into()));
        }
        Ok(self.publish(vec![Invalidation::tag(tag)]).await?[0])
    }

    /// Invalidate every key, on every shard of the tier; returns the seq it got on shard 0 once
    /// it is durable on all of them.
    pub async fn invalidate_all(&self) -> Result<Seq, Error> {
        Ok(self.publish(vec![Invalidation::all()]).await?[0])
    }

    /// The streaming form: invalidations in, their seqs out, in order, with up to `depth`
    /// pipelined (they share batches with everything else in flight).
    ///
    /// ```no_run
    /// # async fn demo(p: dci_sdk::Publisher) {
    /// use futures::StreamExt;
    /// let keys = futures::stream::iter((0..1000).map(|i| dci_proto::Invalidation::key(format!("user:{i}"))));
    /// let mut seqs = p.publish_stream(keys, 256);
    /// while let Some(seq) = seqs.next().await {
    ///     let _ = seq.expect("published");
    /// }
    /// # }
    /// ```
    pub fn publish_stream<S>(
        &self,
        entries: S,
        depth: usize,
    ) -> impl futures::Stream<Item = Result<Seq, Error>> + Send + Unpin + 'static
    where
        S: futures::Stream<Item = Invalidation> + Send + 'static,
    {
        let this = self.clone();
        // Handing entries to the shard queues is sequential (`then`), so they are queued in the
        // stream's order; only the waits for answers overlap.
        entries
            .then(move |e| {
                let p = this.clone();
                async move { p.enqueue(vec![e]).await }
            })
            .map(|queued| async move { queued?.wait().await.map(|s| s[0]) })
            .buffered(depth.max(1))
            .boxed()
    }

    /// Publish several invalidations; returns their seqs in order. KEY entries go to the shard
    /// that owns the key; PREFIX and ALL entries go to every shard (the seq returned is shard 0's).
    pub async fn publish(&self, entries: Vec<Invalidation>) -> Result<Vec<Seq>, Error> {
        self.enqueue(entries).await?.wait().await
    }

    /// Hand entries to their shards' queues; the answers come through [`Queued::wait`].
    async fn enqueue(&self, mut entries: Vec<Invalidation>) -> Result<Queued, Error> {
        // Propagation latency is measured from here, the writer's call.
        let now = dci_proto::now_us();
        for e in &mut entries {
            if e.publish_time_us == 0 {
                e.publish_time_us = now;
            }
        }
        for (i, e) in entries.iter().enumerate() {
            dci_proto::types::check_key_len_limit(i, e.key.len()).map_err(Error::Refused)?;
        }
        let n = self.shards.len();
        let mut per_shard: Vec<Vec<(usize, Invalidation)>> = vec![Vec::new(); n];
        for (i, e) in entries.into_iter().enumerate() {
            if n == 1 {
                per_shard[0].push((i, e));
            } else if e.kind == Kind::Key {
                per_shard[self.map.shard_of(&e.key) as usize % n].push((i, e));
            } else {
                for s in per_shard.iter_mut() {
                    s.push((i, e.clone()));
                }
            }
        }
        let mut waits = Vec::new();
        for (shard, list) in per_shard.into_iter().enumerate() {
            if list.is_empty() {
                continue;
            }
            let (idx, entries): (Vec<usize>, Vec<Invalidation>) = list.into_iter().unzip();
            let bytes = dci_proto::types::request_bytes(&entries);
            if bytes > REQUEST_BYTES {
                return Err(Error::Refused(format!(
                    "{} entries of about {bytes} bytes for one coordinator: more than one \
                     request carries ({REQUEST_BYTES} bytes); publish them in smaller calls",
                    entries.len()
                )));
            }
            let (reply, rx) = oneshot::channel();
            self.shards[shard]
                .send(Pending {
                    queued_at: tokio::time::Instant::now(),
                    entries,
                    bytes,
                    reply,
                })
                .await
                .map_err(|_| Error::Closed)?;
            waits.push((shard, idx, rx));
        }
        Ok(Queued { waits })
    }
}

/// Entries handed to their shards, waiting for their seqs.
struct Queued {
    /// Per shard: the entries' positions and where their seqs come from.
    waits: Vec<(usize, Vec<usize>, SeqsReply)>,
}

type SeqsReply = oneshot::Receiver<Result<Vec<Seq>, Error>>;

impl Queued {
    async fn wait(self) -> Result<Vec<Seq>, Error> {
        let waits = self.waits;
        let total = waits
            .iter()
            .flat_map(|(_, i, _)| i.iter())
            .max()
            .map_or(0, |m| m + 1);
        let mut out = vec![0; total];
        for (shard, idx, rx) in waits {
            let seqs = rx.await.map_err(|_| Error::Closed)??;
            for (i, s) in idx.into_iter().zip(seqs) {
                if shard == 0 || out[i] == 0 {
                    out[i] = s;
                }
            }
        }
        Ok(out)
    }
}

/// A request sent (or to resend) on the shard's stream: its number and the callers it answers,
/// whose entries it carries.
struct InFlight {
    request_no: u64,
    callers: Vec<Pending>,
    /// What its entries count for against `max_in_flight_bytes`.
    bytes: usize,
}

impl InFlight {
    fn new(request_no: u64, callers: Vec<Pending>) -> InFlight {
        let bytes = callers.iter().map(|p| p.bytes).sum();
        InFlight {
            request_no,
            callers,
            bytes,
        }
    }

    /// The wire request. The callers keep their entries for a resend, so each send costs one
    /// reference count per key, not a copy of the request.
    fn request(&self, publisher_id: &str) -> pb::PublishRequest {
        pb::PublishRequest {
            publisher_id: publisher_id.to_string(),
            request_no: self.request_no,
            entries: self
                .callers
                .iter()
                .flat_map(|p| p.entries.iter().map(Invalidation::to_pb))
                .collect(),
        }
    }
}

/// A client of the coordinator at `url`, connecting when first used; and its channel.
fn shard_client(
    url: &str,
    opts: &PublisherOptions,
) -> Result<(PublisherClient<Channel>, Channel), Error> {
    let ch = opts
        .tls
        .endpoint(url)
        .map_err(|e| Error::Url(url.to_string(), e.to_string()))?
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(2 << 20))
        .initial_connection_window_size(Some(8 << 20))
        .connect_timeout(Duration::from_secs(1))
        .connect_lazy();
    Ok((PublisherClient::new(ch.clone()), ch))
}

/// The shard a [`run_shard`] publishes to.
struct Shard {
    url: String,
    id: dci_proto::ShardId,
    /// Where it notes how far its coordinator answered.
    answered: Arc<Mutex<Vec<Published>>>,
}

/// One shard's connection: a `PublishStream` that pipelines requests and answers them in order,
/// so one publisher's invalidations get increasing seqs. Whatever queues while requests are in
/// flight goes out as the next request. If the stream breaks, unanswered requests are resent in
/// order with their request numbers, so the coordinator logs each at most once.
async fn run_shard(
    shard: Shard,
    mut client: PublisherClient<Channel>,
    mut rx: mpsc::Receiver<Pending>,
    opts: PublisherOptions,
    request_no: Arc<AtomicU64>,
) {
    let mut unanswered: VecDeque<InFlight> = VecDeque::new();
    // The sum of their `bytes`.
    let mut in_flight_bytes = 0usize;
    let max_in_flight = opts.max_in_flight.clamp(1, dci_proto::types::RETRY_WINDOW);
    // Callers of a refused shared request, each to go again in a request of its own, within the
    // window like any other (a coordinator remembers only so many requests for a resend).
    let mut alone: VecDeque<Pending> = VecDeque::new();
    let mut open = true;
    let mut backoff = Duration::from_millis(20);
    let mut failing_since: Option<tokio::time::Instant> = None;
    // A caller taken off the queue but not into a request yet: it goes first.
    let mut held: Option<Pending> = None;
    while open || !unanswered.is_empty() || held.is_some() || !alone.is_empty() {
        // Room for every resend at once, and the window's worth of new requests.
        let (tx, req_rx) =
            mpsc::channel::<pb::PublishRequest>((max_in_flight * 2).max(unanswered.len()));
        for f in &unanswered {
            let _ = tx.try_send(f.request(&opts.publisher_id));
        }
        let mut c = client.clone();
        // A session that got answers was a working stream: its end is a new failure, with the
        // whole `retry_for` and the shortest backoff ahead of it, not the tail of an old one.
        let mut answered = false;
        let outcome = async {
            // Bounded: a coordinator behind a partition that swallows packets would hold the
            // handshake for ever, and every caller queued behind it.
            let mut responses = tokio::time::timeout(
                opts.timeout,
                c.publish_stream(tokio_stream::wrappers::ReceiverStream::new(req_rx)),
            )
            .await
            .map_err(|_| {
                tonic::Status::deadline_exceeded(format!(
                    "no answer from the coordinator within {:?} (a partition, or a coordinator that hangs)",
                    opts.timeout
                ))
            })??
            .into_inner();
            loop {
                tokio::select! {
                    _ = std::future::ready(()), if !alone.is_empty() && unanswered.len() < max_in_flight => {
                        let caller = alone.pop_front().expect("checked non-empty");
                        let f = InFlight::new(request_no.fetch_add(1, Ordering::Relaxed), vec![caller]);
                        let request = f.request(&opts.publisher_id);
                        in_flight_bytes += f.bytes;
                        unanswered.push_back(f);
                        if tx.send(request).await.is_err() {
                            return Err(tonic::Status::unavailable("publish stream closed"));
                        }
                    }
                    first = next_caller(&mut held, &mut rx), if open && alone.is_empty() && unanswered.len() < max_in_flight && (unanswered.is_empty() || in_flight_bytes < opts.max_in_flight_bytes) => {
                        let Some(first) = first else { open = false; if unanswered.is_empty() && alone.is_empty() { return Ok(()) } continue };
                        let mut callers = vec![first];
                        let (mut n, mut bytes) = (callers[0].entries.len(), callers[0].bytes);
                        while n < opts.max_batch {
                            match rx.try_recv() {
                                // Not past what a coordinator decodes: that would end the stream
                                // for every caller in flight. It goes in the next request.
                                Ok(p) if bytes + p.bytes > REQUEST_BYTES => { held = Some(p); break; }
                                Ok(p) => { n += p.entries.len(); bytes += p.bytes; callers.push(p); }
                                Err(_) => break,
                            }
                        }
                        let f = InFlight::new(request_no.fetch_add(1, Ordering::Relaxed), callers);
                        let request = f.request(&opts.publisher_id);
                        in_flight_bytes += f.bytes;
                        unanswered.push_back(f);
                        if tx.send(request).await.is_err() {
                            return Err(tonic::Status::unavailable("publish stream closed"));
                        }
                    }
                    msg = responses.message(), if !unanswered.is_empty() => {
                        match msg? {
                            Some(resp) => {
                                answered = true;
                                let Some(f) = unanswered.pop_front() else { continue };
                                in_flight_bytes -= f.bytes;
                                if resp.refused_code == 0 && resp.refused.is_empty() {
                                    if let Some(&seq) = resp.seqs.iter().max() {
                                        let p = Published { shard: shard.id, epoch: resp.epoch, seq };
                                        dci_proto::applied::note(&mut dci_proto::upstream::lock(&shard.answered), p);
                                    }
                                    answer(f.callers, Ok(resp.seqs));
                                    continue;
                                }
                                // Refused, and nothing of it logged; the stream goes on. When
                                // several callers shared the request, the fault may be one
                                // caller's only: each goes again on its own, so that only the
                                // one at fault is refused (its error naming the entry in its own
                                // call).
                                if f.callers.len() == 1 {
                                    answer(f.callers, Err(Error::Refused(resp.refused)));
                                    continue;
                                }
                                alone.extend(f.callers);
                            }
                            None => return Err(tonic::Status::unavailable("publish stream ended")),
                        }
                    }
                    _ = tokio::time::sleep(opts.timeout), if !unanswered.is_empty() => {
                        return Err(tonic::Status::deadline_exceeded("no publish answer within the timeout"));
                    }
                    else => return Ok(()),
                }
            }
        }
        .await;
        if answered {
            failing_since = None;
            backoff = Duration::from_millis(20);
        }
        match outcome {
            Ok(()) => failing_since = None,
            Err(status) => {
                // The next attempt on a connection of its own: the one that failed may be
                // stuck for good (a handshake whose bytes a partition swallowed), and the TLS
                // files may have been renewed since.
                if let Ok((fresh, _)) = shard_client(&shard.url, &opts) {
                    client = fresh;
                }
                let err = Error::from(status);
                if let Error::Refused(msg) = &err {
                    // The stream itself was refused (the coordinator refuses a request in its
                    // answer, and goes on): retrying will not help any of those waiting.
                    in_flight_bytes = 0;
                    for f in unanswered.drain(..) {
                        answer(f.callers, Err(Error::Refused(msg.clone())));
                    }
                    answer(alone.drain(..).collect(), Err(Error::Refused(msg.clone())));
                    while let Ok(p) = rx.try_recv() {
                        answer(vec![p], Err(Error::Refused(msg.clone())));
                    }
                    failing_since = None;
                    // Not at once again: the next callers are told after a pause, so a node
                    // that refuses the stream is not asked in a tight loop.
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
                let since = *failing_since.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() >= opts.retry_for {
                    let decided = tokio::time::Instant::now();
                    let why = match &err {
                        Error::Unavailable(m) => m.clone(),
                        other => other.to_string(),
                    };
                    in_flight_bytes = 0;
                    for f in unanswered.drain(..) {
                        answer(f.callers, Err(Error::Unavailable(why.clone())));
                    }
                    answer(
                        alone.drain(..).collect(),
                        Err(Error::Unavailable(why.clone())),
                    );
                    // So are the callers queued meanwhile: with no stream to be had (nothing
                    // listening, a certificate not trusted), none of them was ever taken into a
                    // request, and they would wait for ever. One who came after this decision
                    // (having seen the answers it sent, say) gets its own retries.
                    while let Some(p) = next_queued(&mut held, &mut rx) {
                        if p.queued_at > decided {
                            held = Some(p);
                            break;
                        }
                        answer(vec![p], Err(Error::Unavailable(why.clone())));
                    }
                    failing_since = None;
                    continue;
                }
                let jitter = rand::random::<f64>() * 0.5 + 0.75;
                tokio::time::sleep(backoff.mul_f64(jitter)).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        }
        backoff = Duration::from_millis(20);
    }
}

/// The next caller: the one held back, else the next queued (waiting for one).
async fn next_caller(
    held: &mut Option<Pending>,
    rx: &mut mpsc::Receiver<Pending>,
) -> Option<Pending> {
    match held.take() {
        Some(p) => Some(p),
        None => rx.recv().await,
    }
}

/// The next caller without waiting: the one held back, else the next queued, if any.
fn next_queued(held: &mut Option<Pending>, rx: &mut mpsc::Receiver<Pending>) -> Option<Pending> {
    held.take().or_else(|| rx.try_recv().ok())
}

fn answer(callers: Vec<Pending>, result: Result<Vec<Seq>, Error>) {
    match result {
        Ok(seqs) => {
            let asked: usize = callers.iter().map(|p| p.entries.len()).sum();
            let mut at = 0;
            for p in callers {
                let n = p.entries.len();
                // A coordinator answers a seq per entry: an answer short of them (a node that
                // is not one, or broken) is no seq at all, not seq 0.
                let _ = p.reply.send(match seqs.get(at..at + n) {
                    Some(mine) if seqs.len() == asked => Ok(mine.to_vec()),
                    _ => Err(Error::Unavailable(format!(
                        "the coordinator answered {} seqs for {asked} entries",
                        seqs.len()
                    ))),
                });
                at += n;
            }
        }
        Err(e) => {
            for p in callers {
                let err = match &e {
                    Error::Refused(m) => Error::Refused(m.clone()),
                    Error::Unavailable(m) => Error::Unavailable(m.clone()),
                    other => Error::Unavailable(other.to_string()),
                };
                let _ = p.reply.send(Err(err));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(n: usize) -> (Pending, oneshot::Receiver<Result<Vec<Seq>, Error>>) {
        let (reply, rx) = oneshot::channel();
        let p = Pending {
            queued_at: tokio::time::Instant::now(),
            entries: (0..n).map(|i| Invalidation::key(format!("k{i}"))).collect(),
            bytes: 0,
            reply,
        };
        (p, rx)
    }

    #[test]
    fn callers_sharing_a_request_each_get_their_seqs() {
        let ((a, mut ra), (b, mut rb)) = (pending(2), pending(1));
        answer(vec![a, b], Ok(vec![7, 8, 9]));
        assert_eq!(ra.try_recv().unwrap().unwrap(), vec![7, 8]);
        assert_eq!(rb.try_recv().unwrap().unwrap(), vec![9]);
    }

    /// An answer short of a seq per entry is an error for every caller, not seq 0 or a part.
    #[test]
    fn an_answer_without_a_seq_per_entry_is_an_error() {
        for seqs in [vec![], vec![7, 8]] {
            let ((a, mut ra), (b, mut rb)) = (pending(2), pending(1));
            answer(vec![a, b], Ok(seqs.clone()));
            for r in [ra.try_recv().unwrap(), rb.try_recv().unwrap()] {
                let e = r.unwrap_err().to_string();
                assert!(
                    e.contains(&format!("answered {} seqs for 3 entries", seqs.len())),
                    "{e}"
                );
            }
        }
    }
}
