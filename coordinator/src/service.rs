//! The gRPC edge of the coordinator: validation of wire input, mapping of errors to statuses.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use dci_proto::pb;
use dci_proto::ring::ShardMap;
use dci_proto::{Invalidation, Kind};
use futures::stream::{FuturesOrdered, Stream, StreamExt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::hub::Hub;
use crate::writer::{Acked, CommitError, Job};

/// A request of a PublishStream on its way to an answer: its number, and what the log said (or
/// why it never got there).
type Answering = Pin<
    Box<
        dyn std::future::Future<
                Output = (
                    u64,
                    Instant,
                    Result<Result<Result<Acked, CommitError>, oneshot::error::RecvError>, Status>,
                ),
            > + Send,
    >,
>;

/// Implements `Publisher`, `Subscribe` and `Admin`.
#[derive(Clone)]
pub struct CoordinatorService {
    pub(crate) sequencer: Arc<crate::writer::Sequencer>,
    pub(crate) hub: Arc<Hub>,
    pub(crate) shard_map: ShardMap,
    pub(crate) shard_count: u32,
    pub(crate) max_key_len: usize,
    pub(crate) max_request_entries: usize,
    pub(crate) shutdown: watch::Receiver<bool>,
    pub(crate) node_id: String,
    pub(crate) started: std::time::Instant,
    /// Started on a log it held before (see `pb::NodeStatus::restarted`).
    pub(crate) restarted: bool,
}

impl CoordinatorService {
    /// Validate a request and turn it into a job; nothing of a bad request reaches the log.
    fn validate(
        &self,
        req: pb::PublishRequest,
    ) -> Result<(Job, oneshot::Receiver<Result<Acked, CommitError>>), Status> {
        if req.entries.is_empty() {
            return Err(Status::invalid_argument("publish request has no entries"));
        }
        if req.entries.len() > self.max_request_entries {
            return Err(Status::invalid_argument(format!(
                "publish request has {} entries, more than the maximum of {}",
                req.entries.len(),
                self.max_request_entries
            )));
        }
        if req.publisher_id.len() > 256 {
            return Err(Status::invalid_argument(
                "publisher_id is longer than 256 bytes",
            ));
        }
        // Left at its default, the number would make every request of the publisher look like
        // a retry of its first: repeats of an invalidation would be answered, never logged.
        if req.request_no == 0 && !req.publisher_id.is_empty() {
            return Err(Status::invalid_argument(
                "request_no is 0: with a publisher_id, number requests from 1, a new number for \
                 each new request (or leave publisher_id empty: no deduplication)",
            ));
        }
        let now = dci_proto::now_us();
        let mut entries = Vec::with_capacity(req.entries.len());
        for (i, p) in req.entries.into_iter().enumerate() {
            let mut e = Invalidation::try_from_pb(p, self.max_key_len)
                .map_err(|err| Status::invalid_argument(format!("entry {i}: {err}")))?;
            if self.shard_count > 1 && e.kind == Kind::Key {
                let owner = self.shard_map.shard_of(&e.key);
                if owner != self.hub.shard() {
                    // A publisher told the tier's coordinators in another order, or not all of
                    // them: say what it takes.
                    return Err(Status::failed_precondition(format!(
                        "entry {i}: key belongs to shard {owner} of {}, this is shard {}: a \
                         publisher lists every shard's coordinator, in shard order",
                        self.shard_count,
                        self.hub.shard()
                    )));
                }
            }
            if e.publish_time_us == 0 {
                e.publish_time_us = now;
            }
            e.seq = 0;
            entries.push(e);
        }
        let (reply, rx) = oneshot::channel();
        Ok((
            Job {
                publisher_id: req.publisher_id,
                request_no: req.request_no,
                entries,
                reply,
            },
            rx,
        ))
    }

    async fn submit(&self, job: Job) -> Result<(), Status> {
        if let Some(why) = self.hub.failure() {
            return Err(Status::unavailable(format!(
                "the log failed ({why}); this coordinator refuses publishes until it is restarted"
            )));
        }
        self.sequencer.submit(job).await;
        Ok(())
    }

    /// A refusal of one request on a PublishStream, answered in band; any other failure ends the
    /// stream with its status.
    fn refused(&self, request_no: u64, s: Status) -> Result<pb::PublishResponse, Status> {
        match s.code() {
            Code::InvalidArgument | Code::FailedPrecondition | Code::AlreadyExists => {
                Ok(pb::PublishResponse {
                    shard: self.hub.shard(),
                    epoch: self.hub.epoch(),
                    request_no,
                    refused_code: s.code() as i32,
                    refused: s.message().to_string(),
                    ..Default::default()
                })
            }
            _ => Err(s),
        }
    }

    /// Count a request's answer (and time it, from `arrived`, when it has seqs).
    fn tally(&self, arrived: Instant, answer: &Result<pb::PublishResponse, Status>) {
        let stats = &self.hub.log_stats;
        let outcome = match answer {
            Ok(r) if r.refused_code != 0 => &stats.refused,
            Ok(r) => {
                stats
                    .answered
                    .observe_us(arrived.elapsed().as_micros() as u64);
                if r.duplicate {
                    &stats.duplicate
                } else {
                    &stats.logged
                }
            }
            Err(s)
                if matches!(
                    s.code(),
                    Code::InvalidArgument | Code::FailedPrecondition | Code::AlreadyExists
                ) =>
            {
                &stats.refused
            }
            Err(_) => &stats.unavailable,
        };
        outcome.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    fn answer(
        &self,
        request_no: u64,
        r: Result<Result<Acked, CommitError>, oneshot::error::RecvError>,
    ) -> Result<pb::PublishResponse, Status> {
        match r {
            Ok(Ok(a)) => Ok(pb::PublishResponse {
                shard: self.hub.shard(),
                epoch: self.hub.epoch(),
                request_no,
                seqs: (a.first_seq..a.first_seq + a.count as u64).collect(),
                duplicate: a.duplicate,
                ..Default::default()
            }),
            Ok(Err(e @ CommitError::Mismatch(..))) => Err(Status::already_exists(e.to_string())),
            Ok(Err(e)) => Err(Status::unavailable(e.to_string())),
            Err(_) => Err(Status::unavailable("coordinator is shutting down")),
        }
    }
}

#[tonic::async_trait]
impl pb::publisher_server::Publisher for CoordinatorService {
    async fn publish(
        &self,
        request: Request<pb::PublishRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        let arrived = Instant::now();
        let req = request.into_inner();
        let request_no = req.request_no;
        let answer = async {
            let (job, rx) = self.validate(req)?;
            self.submit(job).await?;
            self.answer(request_no, rx.await)
        }
        .await;
        self.tally(arrived, &answer);
        answer.map(Response::new)
    }

    type PublishStreamStream =
        Pin<Box<dyn Stream<Item = Result<pb::PublishResponse, Status>> + Send>>;

    async fn publish_stream(
        &self,
        request: Request<Streaming<pb::PublishRequest>>,
    ) -> Result<Response<Self::PublishStreamStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(256);
        let svc = self.clone();
        let mut shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            // Requests are submitted as they arrive (pipelined) and answered in request order.
            // A request refused for what it holds is answered in its turn, in the response
            // (`refused`), and the stream goes on: only a failure of this coordinator ends it.
            let mut pending = FuturesOrdered::new();
            let mut open = true;
            let mut draining = false;
            loop {
                if !open && pending.is_empty() {
                    if draining {
                        let _ = tx
                            .send(Err(Status::unavailable("coordinator is shutting down")))
                            .await;
                    }
                    return;
                }
                tokio::select! {
                    msg = inbound.message(), if open && pending.len() < 1024 => match msg {
                        Ok(Some(req)) => {
                            let arrived = Instant::now();
                            let request_no = req.request_no;
                            match svc.validate(req) {
                                Ok((job, rx)) => {
                                    if let Err(s) = svc.submit(job).await {
                                        let answer = Err(s);
                                        svc.tally(arrived, &answer);
                                        let _ = tx.send(answer).await;
                                        return;
                                    }
                                    pending.push_back(Box::pin(async move {
                                        (request_no, arrived, Ok(rx.await))
                                    }) as Answering);
                                }
                                Err(status) => {
                                    pending.push_back(Box::pin(async move {
                                        (request_no, arrived, Err(status))
                                    }));
                                }
                            }
                        }
                        Ok(None) => open = false,
                        Err(_) => open = false,
                    },
                    Some((n, arrived, r)) = pending.next(), if !pending.is_empty() => {
                        let answer = r.and_then(|r| svc.answer(n, r)).or_else(|s| svc.refused(n, s));
                        svc.tally(arrived, &answer);
                        let failed = answer.is_err();
                        if tx.send(answer).await.is_err() || failed {
                            return;
                        }
                    }
                    // Draining: what was taken is answered (it is in the log, and acknowledged
                    // as its fsync completes), then the stream ends with a status that says why,
                    // so that the publisher resends the rest elsewhere or after the restart.
                    _ = shutdown.changed(), if open => {
                        open = false;
                        draining = true;
                    }
                    else => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[tonic::async_trait]
impl pb::admin_server::Admin for CoordinatorService {
    async fn status(
        &self,
        _: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let head = self.hub.head();
        let me = pb::NodeStatus {
            node_id: self.node_id.clone(),
            role: "coordinator".into(),
            region: String::new(),
            parent: String::new(),
            shards: vec![pb::ShardProgress {
                shard: self.hub.shard(),
                epoch: self.hub.epoch(),
                hwm: head,
                lag_seqs: 0,
                lag_ms: 0,
                caught_up_ms: 0,
            }],
            connected_ms: self.started.elapsed().as_millis() as u64,
            max_staleness_ms: 0,
            left_out: 0,
            restarted: self.restarted,
            failure: self.hub.failure().map_or_else(String::new, |why| {
                format!("the log failed ({why}); it refuses publishes until it is restarted")
            }),
        };
        let mut nodes = vec![me];
        let now_us = dci_proto::now_us();
        for mut n in self.hub.reported() {
            // Lag against the root's head, which is the truth: a report is up to a heartbeat
            // per level old, and its sender's head may be behind. Seqs logged since the report
            // was made count too, so its lag in time is at least how long ago the first seq it
            // lacks was logged.
            for s in &mut n.shards {
                if s.shard == self.hub.shard() && s.epoch == self.hub.epoch() {
                    s.lag_seqs = head.saturating_sub(s.hwm);
                    if s.lag_seqs > 0 {
                        if let Some(t) = self.hub.logged_at(s.hwm + 1) {
                            s.lag_ms = s.lag_ms.max(now_us.saturating_sub(t) / 1000);
                        }
                    }
                }
            }
            nodes.push(n);
        }
        Ok(Response::new(pb::StatusResponse { nodes }))
    }
}
