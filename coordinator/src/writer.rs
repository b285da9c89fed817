//! The sequencer: one thread owns the log, assigns seqs, and commits groups.
//!
//! Publish requests queue on a bounded channel (a full queue makes publishers wait). The writer
//! takes one, then everything that accumulated meanwhile (up to a cap), assigns consecutive
//! seqs and writes the whole group with one write. The group, coalesced and encoded once, goes to
//! the downstream hub as soon as it is written (it already survives a crash of this process; a
//! crash of the machine changes the epoch, see [`crate::wal`]); then one fsync (group commit), and
//! only then is every request in it answered. Publishes arriving meanwhile form the next group.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use dci_proto::link::SharedBatch;
use dci_proto::{coalesce, Batch, Invalidation, Seq};
use tokio::sync::{mpsc, oneshot};

use crate::hub::Hub;
use crate::wal::{LogRecord, Wal};

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
    let mut failed: Option<String> = None;
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
        if let Some(why) = &failed {
            for j in jobs {
                let _ = j.reply.send(Err(CommitError::Log(why.clone())));
            }
            continue;
        }
        if let Err(e) = commit(&mut wal, jobs, &hub) {
            tracing::error!(error = %e, "log write failed: refusing publishes from now on");
            failed = Some(e);
            hub.set_failed();
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
    if let Err(e) = wal.close() {
        tracing::error!(error = %e, "closing the log failed");
    }
}

fn commit(wal: &mut Wal, jobs: Vec<Job>, hub: &Hub) -> Result<(), String> {
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
    if !records.is_empty() {
        let fail = |answers: Vec<(oneshot::Sender<_>, _)>, e: crate::wal::WalError| {
            let why = e.to_string();
            for (reply, _) in answers {
                let _ = reply.send(Err(CommitError::Log(why.clone())));
            }
            why
        };
        if let Err(e) = wal.write(&records) {
            return Err(fail(answers, e));
        }
        let batch = Batch {
            shard: hub.shard(),
            epoch: hub.epoch(),
            first_seq: first_of_group,
            last_seq: next - 1,
            entries: coalesce(group_entries),
        };
        hub.push(SharedBatch::new(batch));
        if let Err(e) = wal.sync_per_policy() {
            return Err(fail(answers, e));
        }
    }
    for (reply, answer) in answers {
        let _ = reply.send(answer);
    }
    Ok(())
}
