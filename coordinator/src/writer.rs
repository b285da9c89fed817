//! The sequencer: assigns seqs and commits groups of publishes to the log.
//!
//! There is no writer thread to hand publishes to: a publish joins a queue, and whichever caller
//! finds the log free takes everything queued (up to a cap) and commits it as one group, while the
//! others return at once and wait for their answers (flat combining). A group is sequenced,
//! written with one write, and handed downstream (coalesced and encoded once) as soon as it is
//! written: it already survives a crash of this process, and a crash of the machine changes the
//! epoch (see [`crate::wal`]). Its fsync and its answers go to the syncer thread, which runs the
//! fsyncs in order, one for everything written since the last, and answers every request only
//! after an fsync that covers it. So a publish is never held behind a thread hop or the previous
//! group's fsync on its way downstream, and the disk still sees one fsync per group.

use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use dci_proto::link::SharedBatch;
use dci_proto::upstream::lock;
use dci_proto::{coalesce, own_bytes, Batch, Invalidation, Seq};
use tokio::sync::oneshot;

use crate::hub::Hub;
use crate::wal::{request_digest, LogRecord, Logged, PendingSync, Wal};

type Answer = (
    oneshot::Sender<Result<Acked, CommitError>>,
    Result<Acked, CommitError>,
);

/// A written group's fsync (when the policy asks for one) and the answers waiting on it.
struct SyncJob {
    sync: Option<PendingSync>,
    answers: Vec<Answer>,
}

/// Set once a write or an fsync failed: from then on nothing more is acknowledged, since a later
/// fsync can report success for a file whose earlier pages were lost.
type Failed = Arc<FailState>;

struct FailState {
    why: std::sync::Mutex<Option<String>>,
    /// The log's directory.
    dir: std::path::PathBuf,
}

fn failed_with(failed: &Failed) -> Option<String> {
    failed.why.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

fn fail(failed: &Failed, hub: &Hub, why: String) {
    if mark_failed(failed, &why) {
        tracing::error!(error = %why, "log write failed: refusing publishes from now on");
        hub.set_failed(why);
    }
}

/// Nothing more is acknowledged, and the next start takes a new epoch; false when the log had
/// failed already. What was written but not synced may be gone from the page cache (a failed
/// writeback can drop it), or the log may lack what receivers hold: it must not be trusted.
fn mark_failed(failed: &Failed, why: &str) -> bool {
    let mut f = failed.why.lock().unwrap_or_else(|p| p.into_inner());
    if f.is_some() {
        return false;
    }
    if let Err(e) = crate::wal::distrust_unsynced(&failed.dir) {
        tracing::error!(error = %e, "could not mark the log for a new epoch at its next start");
    }
    *f = Some(why.to_string());
    true
}

fn syncer(rx: std::sync::mpsc::Receiver<SyncJob>, failed: Failed, hub: Arc<Hub>) {
    while let Ok(first) = rx.recv() {
        // Everything queued meanwhile rides on the same fsync: one per file written to (a
        // segment roll already synced the file before it).
        let mut jobs = vec![first];
        jobs.extend(rx.try_iter());
        let mut syncs: Vec<PendingSync> = Vec::new();
        for j in &mut jobs {
            if let Some(s) = j.sync.take() {
                syncs.retain(|p| !p.same_file(&s));
                syncs.push(s);
            }
        }
        for s in syncs {
            if failed_with(&failed).is_none() {
                let started = Instant::now();
                let synced = s.run();
                let took = started.elapsed().as_micros() as u64;
                hub.log_stats.fsync.observe_us(took);
                if let Err(e) = synced {
                    fail(&failed, &hub, e.to_string());
                }
            }
        }
        let why = failed_with(&failed);
        for (reply, answer) in jobs.into_iter().flat_map(|j| j.answers) {
            let answer = match (&why, answer) {
                (Some(w), Ok(_)) => Err(CommitError::Log(w.clone())),
                (_, a) => a,
            };
            let _ = reply.send(answer);
        }
    }
}

/// A validated publish request waiting for its seqs.
#[derive(Debug)]
pub struct Job {
    /// Publisher id ("" disables deduplication).
    pub publisher_id: String,
    /// Request number.
    pub request_no: u64,
    /// Entries (validated).
    pub entries: Vec<Invalidation>,
    /// Where the answer goes.
    pub reply: oneshot::Sender<Result<Acked, CommitError>>,
}

/// Seqs of an acknowledged request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acked {
    /// Seq of the first entry; the others follow.
    pub first_seq: Seq,
    /// Number of entries.
    pub count: u32,
    /// True when this was a retry of a logged request.
    pub duplicate: bool,
}

/// Why a request was not committed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CommitError {
    /// The log failed; the coordinator stops accepting publishes.
    #[error("log write failed: {0}")]
    Log(String),
    /// A request number already logged with other entries: not a retry of it.
    #[error(
        "request {0} of this publisher id was already logged with other entries: a retry must \
         repeat its request, and a new request needs a new number (a publisher id restarted \
         with its numbering from the start?)"
    )]
    Mismatch(u64),
}

/// The log and what goes with it, used by one caller at a time.
struct Log {
    /// `None` once closed.
    wal: Option<Wal>,
    /// Where fsyncs and answers go; `None` once closed.
    syncs: Option<std::sync::mpsc::Sender<SyncJob>>,
    last_retention: Instant,
}

/// A job in the queue, with the room it takes there.
struct Queued {
    job: Job,
    room: tokio::sync::OwnedSemaphorePermit,
}

/// Owns the log; see the module documentation.
pub struct Sequencer {
    queue: Mutex<Vec<Queued>>,
    /// Bytes of publishes queued and not yet written (in units of [`job_bytes`]): while a write
    /// is stuck (a disk that stalls, dirty pages throttled), publishers wait for room instead of
    /// piling up in memory.
    room: Arc<tokio::sync::Semaphore>,
    room_bytes: u32,
    log: Mutex<Log>,
    hub: Arc<Hub>,
    failed: Failed,
    max_group_entries: usize,
    syncer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Sequencer {
    /// Take over `wal`; committed groups go to `hub`; at most `queue_bytes` of publishes wait
    /// for the log at a time.
    pub fn new(wal: Wal, hub: Arc<Hub>, max_group_entries: usize, queue_bytes: usize) -> Sequencer {
        let room_bytes = u32::try_from(queue_bytes).unwrap_or(u32::MAX).max(1);
        let failed: Failed = Arc::new(FailState {
            why: Default::default(),
            dir: wal.dir().to_path_buf(),
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let syncer = {
            let (failed, hub) = (failed.clone(), hub.clone());
            std::thread::Builder::new()
                .name("dci-log-sync".into())
                .spawn(move || syncer(rx, failed, hub))
                .expect("spawn the log sync thread")
        };
        Sequencer {
            queue: Mutex::new(Vec::new()),
            room: Arc::new(tokio::sync::Semaphore::new(room_bytes as usize)),
            room_bytes,
            log: Mutex::new(Log {
                wal: Some(wal),
                syncs: Some(tx),
                last_retention: Instant::now(),
            }),
            hub,
            failed,
            max_group_entries: max_group_entries.max(1),
            syncer: Mutex::new(Some(syncer)),
        }
    }

    /// Queue a publish, once there is room in the queue; it is answered on its `reply` once
    /// durable (or refused).
    pub async fn submit(&self, job: Job) {
        // One request larger than the whole queue still goes, alone.
        let bytes = job_bytes(&job).min(self.room_bytes);
        let Ok(room) = self.room.clone().acquire_many_owned(bytes).await else {
            let _ = job
                .reply
                .send(Err(CommitError::Log("the log is closed".into())));
            return;
        };
        lock(&self.queue).push(Queued { job, room });
        self.drain();
    }

    /// Commit what is queued, unless the log is busy: then its holder does, as it checks the
    /// queue again after letting go (and so does every other holder, like [`Sequencer::tick`]).
    fn drain(&self) {
        loop {
            // Busy: the caller holding the log takes this job too, as it checks the queue
            // again after letting go.
            let mut log = match self.log.try_lock() {
                Ok(log) => log,
                Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => return,
            };
            loop {
                let jobs = self.take_group();
                if jobs.is_empty() {
                    break;
                }
                self.commit_group(&mut log, jobs);
            }
            drop(log);
            if lock(&self.queue).is_empty() {
                return;
            }
        }
    }

    /// The next group: what queued, up to `max_group_entries` entries and [`MAX_GROUP_BYTES`]
    /// (the first request always, whatever its size).
    fn take_group(&self) -> Vec<Queued> {
        let mut q = lock(&self.queue);
        let (mut entries, mut bytes) = (0, 0);
        let n = q
            .iter()
            .take_while(|q| {
                let (n, b) = (q.job.entries.len(), job_bytes(&q.job) as usize);
                let fits = entries == 0
                    || (entries + n <= self.max_group_entries && bytes + b <= MAX_GROUP_BYTES);
                entries += n;
                bytes += b;
                fits
            })
            .count();
        q.drain(..n).collect()
    }

    /// Commit a group; its room in the queue is given back once it is written (or refused).
    fn commit_group(&self, log: &mut Log, queued: Vec<Queued>) {
        let (jobs, _room): (Vec<Job>, Vec<_>) = queued.into_iter().map(|q| (q.job, q.room)).unzip();
        let (Some(wal), Some(syncs)) = (log.wal.as_mut(), log.syncs.as_ref()) else {
            for j in jobs {
                let _ = j
                    .reply
                    .send(Err(CommitError::Log("the log is closed".into())));
            }
            return;
        };
        if let Some(why) = failed_with(&self.failed) {
            for j in jobs {
                let _ = j.reply.send(Err(CommitError::Log(why.clone())));
            }
            return;
        }
        match commit(wal, jobs, &self.hub) {
            Ok(job) => {
                let _ = syncs.send(job);
            }
            Err((why, answers)) => {
                fail(&self.failed, &self.hub, why);
                let _ = syncs.send(SyncJob {
                    sync: None,
                    answers,
                });
            }
        }
    }

    /// Housekeeping, called periodically: retention, and the fsync `interval` asks for when no
    /// publish came to trigger it.
    pub fn tick(&self) {
        self.housekeeping();
        // Publishes that found the log busy with housekeeping are waiting in the queue.
        self.drain();
    }

    /// A failure the hub was told of (a receiver ahead of the log) is the log's too: nothing
    /// more is acknowledged, and the next start takes a new epoch.
    fn adopt_hub_failure(&self) {
        if let Some(why) = self.hub.failure() {
            mark_failed(&self.failed, why);
        }
    }

    fn housekeeping(&self) {
        self.adopt_hub_failure();
        let mut log = lock(&self.log);
        let log = &mut *log;
        let (Some(wal), Some(syncs)) = (log.wal.as_mut(), log.syncs.as_ref()) else {
            return;
        };
        if let Some(sync) = wal.take_sync() {
            let _ = syncs.send(SyncJob {
                sync: Some(sync),
                answers: Vec::new(),
            });
        }
        if log.last_retention.elapsed() >= Duration::from_secs(1) {
            log.last_retention = Instant::now();
            match wal.enforce_retention(SystemTime::now()) {
                Ok(oldest) => {
                    self.hub.set_disk(oldest, wal.reader());
                    self.hub
                        .log_stats
                        .set_size(wal.bytes(), wal.segment_count());
                }
                Err(e) => tracing::error!(error = %e, "retention failed"),
            }
        }
    }

    /// Answer what is pending, then close the log cleanly (unless it failed). Later publishes
    /// are refused.
    pub fn close(&self) {
        self.adopt_hub_failure();
        let (wal, syncs) = {
            let mut log = lock(&self.log);
            (log.wal.take(), log.syncs.take())
        };
        drop(syncs);
        if let Some(h) = lock(&self.syncer).take() {
            let _ = h.join();
        }
        self.room.close();
        for Queued { job: j, .. } in std::mem::take(&mut *lock(&self.queue)) {
            let _ = j
                .reply
                .send(Err(CommitError::Log("the log is closed".into())));
        }
        if let Some(wal) = wal {
            if failed_with(&self.failed).is_none() {
                if let Err(e) = wal.close() {
                    tracing::error!(error = %e, "closing the log failed");
                }
            }
        }
    }
}

/// The most a group of requests holds (in [`job_bytes`], at least their encoding; a first request
/// larger still goes, alone). A group goes downstream as one batch, which every receiver must
/// decode ([`dci_proto::link::MAX_BATCH_BYTES`]): a group bounded only by entries could be more
/// when keys are long.
pub(crate) const MAX_GROUP_BYTES: usize = dci_proto::types::MAX_REQUEST_BYTES;

/// What a job counts for in the queue: about the memory it holds.
fn job_bytes(job: &Job) -> u32 {
    let bytes = 64 + job.entries.iter().map(|e| e.approx_size()).sum::<usize>();
    u32::try_from(bytes).unwrap_or(u32::MAX)
}

fn digest_of(entries: &[Invalidation]) -> u64 {
    request_digest(
        entries
            .iter()
            .map(|e| (e.kind.into(), &e.key[..], e.source_version)),
    )
}

/// Write a group and hand it downstream; what is left is its fsync and its answers. On a write
/// failure, the reason and the answers (which the syncer turns into errors).
fn commit(wal: &mut Wal, jobs: Vec<Job>, hub: &Hub) -> Result<SyncJob, (String, Vec<Answer>)> {
    let mut records = Vec::with_capacity(jobs.len());
    let mut answers = Vec::with_capacity(jobs.len());
    let mut next = wal.head() + 1;
    let first_of_group = next;
    let mut group_entries = Vec::new();
    // Requests seen in this very group, for a retry that races its original.
    let mut in_group: Vec<(String, u64, Logged)> = Vec::new();
    for job in jobs {
        let n = job.entries.len() as u32;
        let known = if job.publisher_id.is_empty() {
            None
        } else {
            wal.dedup()
                .lookup(&job.publisher_id, job.request_no)
                .or_else(|| {
                    in_group
                        .iter()
                        .find(|(p, r, _)| *p == job.publisher_id && *r == job.request_no)
                        .map(|&(_, _, l)| l)
                })
        };
        if let Some(logged) = known {
            let answer = if logged.count == n && logged.digest == digest_of(&job.entries) {
                Ok(Acked {
                    first_seq: logged.first_seq,
                    count: n,
                    duplicate: true,
                })
            } else {
                Err(CommitError::Mismatch(job.request_no))
            };
            answers.push((job.reply, answer));
            continue;
        }
        let first_seq = next;
        let mut pbs = Vec::with_capacity(job.entries.len());
        for mut e in job.entries {
            e.seq = next;
            next += 1;
            pbs.push(e.to_pb());
            group_entries.push(e);
        }
        if !job.publisher_id.is_empty() {
            let logged = Logged {
                first_seq,
                count: n,
                digest: digest_of(&group_entries[group_entries.len() - n as usize..]),
            };
            in_group.push((job.publisher_id.clone(), job.request_no, logged));
        }
        records.push(LogRecord {
            first_seq,
            publisher_id: job.publisher_id,
            request_no: job.request_no,
            entries: pbs,
            void_to: 0,
        });
        answers.push((
            job.reply,
            Ok(Acked {
                first_seq,
                count: n,
                duplicate: false,
            }),
        ));
    }
    if records.is_empty() {
        return Ok(SyncJob {
            sync: None,
            answers,
        });
    }
    let segments = wal.segment_count();
    if let Err(e) = wal.write(&records) {
        return Err((e.to_string(), answers));
    }
    hub.log_stats.set_size(wal.bytes(), wal.segment_count());
    // A new segment is readable before the group in it goes to the memory tail: the tail may
    // let older groups go for it, and a receiver that needs them reads them from disk.
    if wal.segment_count() != segments {
        hub.set_disk(wal.oldest(), wal.reader());
    }
    let mut entries = coalesce(group_entries);
    // The tail keeps the group: not the requests it came in.
    own_bytes(&mut entries);
    hub.push(SharedBatch::new(Batch {
        shard: hub.shard(),
        epoch: hub.epoch(),
        first_seq: first_of_group,
        last_seq: next - 1,
        entries,
    }));
    // Off the group's way downstream, and before its fsync, which then makes the new zeroed space
    // part of the file once for the many groups that will be written into it.
    wal.zero_ahead();
    Ok(SyncJob {
        sync: wal.take_sync(),
        answers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::{FsyncPolicy, WalOptions};

    fn job(
        publisher: &str,
        request_no: u64,
        n: usize,
    ) -> (Job, oneshot::Receiver<Result<Acked, CommitError>>) {
        let (reply, rx) = oneshot::channel();
        let entries = (0..n)
            .map(|i| Invalidation::key(format!("k{request_no}:{i}")))
            .collect();
        (
            Job {
                publisher_id: publisher.into(),
                request_no,
                entries,
                reply,
            },
            rx,
        )
    }

    #[test]
    fn a_publish_that_finds_the_log_busy_is_committed_by_the_next_holder() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _) = Wal::open(dir.path(), WalOptions::default()).unwrap();
        let hub = Arc::new(Hub::new(0, wal.epoch(), 0, 1, wal.reader(), 1 << 20));
        let seq = Sequencer::new(wal, hub, 100, 1 << 20);
        let busy = lock(&seq.log);
        let (j, mut rx) = job("p", 1, 3);
        futures::executor::block_on(seq.submit(j)); // returns at once: the log is busy
        assert!(rx.try_recv().is_err(), "not committed yet");
        drop(busy);
        seq.tick(); // housekeeping holds the log too, and drains after
        let a = rx.blocking_recv().unwrap().unwrap();
        assert_eq!((a.first_seq, a.count), (1, 3));
        seq.close();
    }

    /// Publishes that queued while the log was busy are written as one group and sent
    /// downstream as one batch, which every receiver must be able to decode: however many
    /// megabytes of long keys queued, no batch is larger than a receiver takes.
    #[test]
    fn a_group_of_long_keys_makes_batches_a_receiver_decodes() {
        use dci_proto::downstream::{BatchSource, Fetch};
        let dir = tempfile::tempdir().unwrap();
        let (wal, _) = Wal::open(dir.path(), WalOptions::default()).unwrap();
        let hub = Arc::new(Hub::new(0, wal.epoch(), 0, 1, wal.reader(), 1 << 30));
        let seq = Sequencer::new(wal, hub.clone(), 65_536, 1 << 30);
        let busy = lock(&seq.log);
        let mut answers = Vec::new();
        // 80 MB of 1,000-byte keys, each request under what a coordinator decodes.
        for r in 1..=80u64 {
            let (reply, rx) = oneshot::channel();
            let entries = (0..1_000)
                .map(|i| Invalidation::key(format!("{r}:{i:01000}")))
                .collect();
            let job = Job {
                publisher_id: "p".into(),
                request_no: r,
                entries,
                reply,
            };
            futures::executor::block_on(seq.submit(job));
            answers.push(rx);
        }
        drop(busy);
        seq.tick();
        for rx in answers {
            rx.blocking_recv().unwrap().unwrap();
        }
        assert_eq!(hub.head(), 80_000);
        let mut next = 1;
        while next <= 80_000 {
            let Fetch::Batches(batches) =
                futures::executor::block_on(hub.read(0, next, usize::MAX))
            else {
                panic!("the memory tail holds everything");
            };
            for b in batches {
                assert!(
                    b.encoded.len() <= dci_proto::link::MAX_BATCH_BYTES / 2,
                    "a batch of {} bytes",
                    b.encoded.len()
                );
                next = b.batch.last_seq + 1;
            }
        }
        seq.close();
    }

    /// A request number seen twice in one group: the same entries are a retry (the original's
    /// seqs), other entries, even as many, are refused and logged nowhere.
    #[test]
    fn a_number_reused_in_one_group_is_a_retry_only_with_the_same_entries() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _) = Wal::open(dir.path(), WalOptions::default()).unwrap();
        let hub = Arc::new(Hub::new(0, wal.epoch(), 0, 1, wal.reader(), 1 << 20));
        let seq = Sequencer::new(wal, hub.clone(), 100, 1 << 20);
        let busy = lock(&seq.log);
        let (original, rx1) = job("p", 1, 2);
        let (mut other, rx2) = job("p", 1, 2);
        other.entries[1] = Invalidation::key("another key");
        let (retry, rx3) = job("p", 1, 2);
        for j in [original, other, retry] {
            futures::executor::block_on(seq.submit(j));
        }
        drop(busy);
        seq.tick();
        let first = rx1.blocking_recv().unwrap().unwrap();
        assert_eq!(
            (first.first_seq, first.count, first.duplicate),
            (1, 2, false)
        );
        assert!(matches!(
            rx2.blocking_recv().unwrap(),
            Err(CommitError::Mismatch(1))
        ));
        let again = rx3.blocking_recv().unwrap().unwrap();
        assert_eq!((again.first_seq, again.duplicate), (1, true));
        assert_eq!(hub.head(), 2, "only the original was logged");
        seq.close();
    }

    /// Callers racing on the log from many threads: each request gets its own contiguous seqs,
    /// together they cover the log without a gap, a retry
    /// gets the original seqs, and what was written is what the log holds after a restart.
    #[test]
    fn concurrent_submitters_are_all_sequenced_exactly_once() {
        let dir = tempfile::tempdir().unwrap();
        let opts = WalOptions {
            fsync: FsyncPolicy::Always,
            segment_bytes: 16 << 10,
            ..WalOptions::default()
        };
        let (wal, _) = Wal::open(dir.path(), opts.clone()).unwrap();
        let hub = Arc::new(Hub::new(0, wal.epoch(), 0, 1, wal.reader(), 1 << 20));
        let seq = Arc::new(Sequencer::new(wal, hub.clone(), 50, 1 << 20));
        let answers: Vec<_> = (0..8u64)
            .map(|t| {
                let seq = seq.clone();
                std::thread::spawn(move || {
                    (0..100u64)
                        .map(|r| {
                            let (j, rx) = job(&format!("p{t}"), r, 1 + (r % 7) as usize);
                            futures::executor::block_on(seq.submit(j));
                            let a = rx.blocking_recv().unwrap().unwrap();
                            assert!(!a.duplicate);
                            assert_eq!(a.count as u64, 1 + r % 7);
                            (a.first_seq, a.count)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut ranges: Vec<(Seq, u32)> = answers
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        ranges.sort();
        let mut next = 1;
        for (first, count) in &ranges {
            assert_eq!(*first, next, "seqs are contiguous and never shared");
            next += *count as u64;
        }
        assert_eq!(hub.head(), next - 1);
        let (j, rx) = job("p3", 43, 2); // 43 % 7 + 1 entries, as first sent
        futures::executor::block_on(seq.submit(j));
        let again = rx.blocking_recv().unwrap().unwrap();
        assert!(again.duplicate);
        seq.close();
        let (j, rx) = job("p0", 1000, 1);
        futures::executor::block_on(seq.submit(j));
        assert!(rx.blocking_recv().unwrap().is_err(), "closed: refused");
        let (wal, r) = Wal::open(dir.path(), opts).unwrap();
        assert!(!r.new_epoch);
        assert_eq!(wal.head(), next - 1);
    }

    /// While the log is stuck, publishes queue only up to the queue's bytes; the next waits for
    /// room (it is not queued, so it holds no memory there) and goes once a write makes room.
    /// One larger than the whole queue still goes, alone.
    #[test]
    fn a_stuck_log_makes_publishers_wait_once_the_queue_is_full() {
        use std::future::Future;
        use std::task::{Context, Poll};
        let dir = tempfile::tempdir().unwrap();
        let (wal, _) = Wal::open(dir.path(), WalOptions::default()).unwrap();
        let hub = Arc::new(Hub::new(0, wal.epoch(), 0, 1, wal.reader(), 1 << 20));
        let seq = Sequencer::new(wal, hub, 1_000_000, 4096);
        let stuck = lock(&seq.log);
        let mut answers = Vec::new();
        let mut n = 0;
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let waiting = loop {
            n += 1;
            let (j, rx) = job("p", n, 10);
            let mut submit = Box::pin(seq.submit(j));
            match submit.as_mut().poll(&mut cx) {
                Poll::Ready(()) => answers.push(rx),
                Poll::Pending => break (submit, rx),
            }
            assert!(n < 100, "the queue never filled");
        };
        let queued = lock(&seq.queue).len();
        assert_eq!(queued as u64, n - 1);
        let per_job = job_bytes(&job("p", 1, 10).0) as usize;
        assert!(queued * per_job <= 4096 && (queued + 1) * per_job > 4096);
        let (mut submit, rx) = waiting;
        assert!(submit.as_mut().poll(&mut cx).is_pending(), "still no room");
        drop(stuck);
        seq.tick(); // the log moves: the queue is written, and makes room
        assert!(
            submit.as_mut().poll(&mut cx).is_ready(),
            "room once written"
        );
        seq.tick();
        answers.push(rx);
        let (big, big_rx) = job("p", 1000, 400);
        assert!(job_bytes(&big) > 4096);
        futures::executor::block_on(seq.submit(big));
        answers.push(big_rx);
        let mut next = 1;
        for rx in answers {
            let a = rx.blocking_recv().unwrap().unwrap();
            assert_eq!(a.first_seq, next);
            next += a.count as u64;
        }
        seq.close();
    }
}
