//! The sequencer: one thread owns the log, assigns seqs, and commits groups.
//!
//! Publish requests queue on a bounded channel (a full queue makes publishers wait). The writer
//! takes one, then everything that accumulated meanwhile (up to a cap), assigns consecutive
//! seqs and writes the whole group with one write. The group, coalesced and encoded once, goes to
//! the downstream hub as soon as it is written (it already survives a crash of this process; a
//! crash of the machine changes the epoch, see [`crate::wal`]). Its fsync and its answers go to a
//! second thread, the syncer, so the writer takes the next group while the disk works: a group is
//! never held behind the previous one's fsync on its way downstream, and every request is answered
//! only after an fsync that covers it (in order, since the syncer runs the fsyncs in order).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use dci_proto::link::SharedBatch;
use dci_proto::{coalesce, Batch, Invalidation, Seq};
use tokio::sync::{mpsc, oneshot};

use crate::hub::Hub;
use crate::wal::{LogRecord, PendingSync, Wal};

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
type Failed = Arc<std::sync::Mutex<Option<String>>>;

fn failed_with(failed: &Failed) -> Option<String> {
    failed.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

fn fail(failed: &Failed, hub: &Hub, why: String) {
    let mut f = failed.lock().unwrap_or_else(|p| p.into_inner());
    if f.is_none() {
        tracing::error!(error = %why, "log write failed: refusing publishes from now on");
        *f = Some(why);
        hub.set_failed();
    }
}

fn syncer(rx: std::sync::mpsc::Receiver<SyncJob>, failed: Failed, hub: Arc<Hub>) {
    for job in rx {
        if let Some(s) = job.sync {
            if failed_with(&failed).is_none() {
                if let Err(e) = s.run() {
                    fail(&failed, &hub, e.to_string());
                }
            }
        }
        let why = failed_with(&failed);
        for (reply, answer) in job.answers {
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
    /// A retry reused a request number with different content.
    #[error("request {0} was already logged with {1} entries, not {2}")]
    Mismatch(u64, u32, u32),
}

/// Writer tunables.
#[derive(Debug, Clone)]
pub struct WriterOptions {
    /// Most entries per group.
    pub max_group_entries: usize,
    /// Longest wait to grow a group.
    pub linger: Duration,
}

/// Run the writer until every job sender is dropped; then close the log cleanly.
pub fn run(mut wal: Wal, mut rx: mpsc::Receiver<Job>, hub: Arc<Hub>, opts: WriterOptions) {
    let mut last_retention = Instant::now();
    let failed: Failed = Arc::default();
    let (sync_tx, sync_rx) = std::sync::mpsc::channel();
    let syncer = {
        let (failed, hub) = (failed.clone(), hub.clone());
        std::thread::Builder::new()
            .name("dci-log-sync".into())
            .spawn(move || syncer(sync_rx, failed, hub))
            .expect("spawn the log sync thread")
    };
    let mut segments = wal.segment_count();
    while let Some(first) = rx.blocking_recv() {
        let mut jobs = vec![first];
        let mut entries = jobs[0].entries.len();
        let linger_until = Instant::now() + opts.linger;
        loop {
            while entries < opts.max_group_entries {
                match rx.try_recv() {
                    Ok(j) => {
                        entries += j.entries.len();
                        jobs.push(j);
                    }
                    Err(_) => break,
                }
            }
            if entries >= opts.max_group_entries || Instant::now() >= linger_until {
                break;
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        if let Some(why) = failed_with(&failed) {
            for j in jobs {
                let _ = j.reply.send(Err(CommitError::Log(why.clone())));
            }
            continue;
        }
        match commit(&mut wal, jobs, &hub) {
            Ok(job) => {
                let _ = sync_tx.send(job);
            }
            Err((why, answers)) => {
                fail(&failed, &hub, why);
                let _ = sync_tx.send(SyncJob {
                    sync: None,
                    answers,
                });
            }
        }
        if wal.segment_count() != segments {
            segments = wal.segment_count();
            hub.set_disk(wal.oldest(), wal.reader());
        }
        if last_retention.elapsed() >= Duration::from_secs(1) {
            last_retention = Instant::now();
            match wal.enforce_retention(SystemTime::now()) {
                Ok(oldest) => hub.set_disk(oldest, wal.reader()),
                Err(e) => tracing::error!(error = %e, "retention failed"),
            }
            if let Err(e) = wal.sync_if_due() {
                tracing::error!(error = %e, "fsync failed");
            }
        }
    }
    drop(sync_tx);
    let _ = syncer.join();
    if failed_with(&failed).is_none() {
        if let Err(e) = wal.close() {
            tracing::error!(error = %e, "closing the log failed");
        }
    }
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
    let mut in_group: Vec<(String, u64, Seq, u32)> = Vec::new();
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
                        .find(|(p, r, _, _)| *p == job.publisher_id && *r == job.request_no)
                        .map(|&(_, _, s, c)| (s, c))
                })
        };
        if let Some((first_seq, count)) = known {
            let answer = if count == n {
                Ok(Acked {
                    first_seq,
                    count,
                    duplicate: true,
                })
            } else {
                Err(CommitError::Mismatch(job.request_no, count, n))
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
            in_group.push((job.publisher_id.clone(), job.request_no, first_seq, n));
        }
        records.push(LogRecord {
            first_seq,
            publisher_id: job.publisher_id,
            request_no: job.request_no,
            entries: pbs,
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
    if let Err(e) = wal.write(&records) {
        return Err((e.to_string(), answers));
    }
    hub.push(SharedBatch::new(Batch {
        shard: hub.shard(),
        epoch: hub.epoch(),
        first_seq: first_of_group,
        last_seq: next - 1,
        entries: coalesce(group_entries),
    }));
    Ok(SyncJob {
        sync: wal.take_sync(),
        answers,
    })
}
