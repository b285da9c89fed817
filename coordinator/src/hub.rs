//! The downstream side of the coordinator: the memory tail of recent batches, the on-disk log
//! behind it, and the reports of the tree below, served to every relay through the link runtime.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use dci_proto::downstream::{BatchSource, Fetch};
use dci_proto::link::{Read, RetransmitRing, ShardView, SharedBatch};
use dci_proto::metrics::{sample, LatencyHistogram};
use dci_proto::pb;
use dci_proto::upstream::lock;
use dci_proto::{coalesce, Batch, Epoch, Invalidation, Seq, ShardId};
use tokio::sync::watch;

use crate::wal::LogReader;

/// Groups whose logging time is kept (a few seconds' worth at a high publish rate).
const LOGGED_AT_KEPT: usize = 4096;

/// The log's figures beside its seqs: its fsyncs, its answers to publishers, its size.
#[derive(Debug, Default)]
pub(crate) struct LogStats {
    /// Each fsync, how long it took.
    pub(crate) fsync: LatencyHistogram,
    /// Each publish request answered with seqs, from its arrival to its answer (written, and
    /// synced as the policy asks).
    pub(crate) answered: LatencyHistogram,
    /// Publish requests by how they were answered: logged, a duplicate of one logged, refused
    /// for what they hold, or not taken (the log failed, the coordinator stopping).
    pub(crate) logged: AtomicU64,
    pub(crate) duplicate: AtomicU64,
    pub(crate) refused: AtomicU64,
    pub(crate) unavailable: AtomicU64,
    /// Bytes and segment files on disk, as of the last write or retention pass.
    pub(crate) bytes: AtomicU64,
    pub(crate) segments: AtomicU64,
}

impl LogStats {
    pub(crate) fn set_size(&self, bytes: u64, segments: usize) {
        self.bytes.store(bytes, Ordering::Relaxed);
        self.segments.store(segments as u64, Ordering::Relaxed);
    }

    pub(crate) fn render(&self, out: &mut String) {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        let help = "Publish requests, by answer: logged, duplicate (of one logged), refused (for \
                    what they hold), unavailable (log failed, stopping)";
        for (outcome, n) in [
            ("logged", &self.logged),
            ("duplicate", &self.duplicate),
            ("refused", &self.refused),
            ("unavailable", &self.unavailable),
        ] {
            let labels = format!("outcome=\"{outcome}\"");
            sample(
                out,
                "counter",
                "dci_publish_requests_total",
                help,
                &labels,
                get(n),
            );
        }
        self.answered.render(
            out,
            "dci_publish_answer_seconds",
            "Publish request, from its arrival to its answer with seqs (written, and synced as the fsync policy asks)",
        );
        self.fsync
            .render(out, "dci_fsync_seconds", "Each fsync of the log");
        sample(
            out,
            "gauge",
            "dci_log_bytes",
            "Bytes of log on disk",
            "",
            get(&self.bytes),
        );
        sample(
            out,
            "gauge",
            "dci_log_segments",
            "Segment files of the log",
            "",
            get(&self.segments),
        );
    }
}

/// Shared by the writer (which pushes) and every downstream link (which read).
#[derive(Debug)]
pub struct Hub {
    shard: ShardId,
    /// How many shards the tier has (told to receivers; 0 until set).
    shard_count: u32,
    epoch: Epoch,
    tail: Mutex<RetransmitRing>,
    disk: RwLock<(Seq, LogReader)>,
    heads: watch::Sender<u64>,
    /// Why the log failed, once it has.
    failed: std::sync::OnceLock<String>,
    reports: dci_proto::upstream::Reports,
    /// (last seq, when it was logged, µs since the epoch) of the most recent groups, to tell how
    /// long a node whose report is behind the head has been missing what it lacks.
    logged_at: Mutex<VecDeque<(Seq, u64)>>,
    /// Publish (the writer's call) to written in the log and streaming, per entry.
    pub(crate) propagation: Arc<LatencyHistogram>,
    /// How the log is doing, for `/metrics`: what an operator looks at when publishes slow down.
    pub(crate) log_stats: LogStats,
    /// The pace of the error a range of the log that cannot be read sets off (every receiver
    /// behind it asks for it again).
    unreadable: Mutex<dci_proto::throttle::Throttle>,
}

impl Hub {
    /// A hub whose memory tail starts after `head`; older seqs come from `reader`.
    pub fn new(
        shard: ShardId,
        epoch: Epoch,
        head: Seq,
        oldest_on_disk: Seq,
        reader: LogReader,
        tail_bytes: usize,
    ) -> Self {
        Hub {
            shard,
            shard_count: 0,
            epoch,
            tail: Mutex::new(RetransmitRing::new(shard, epoch, head, tail_bytes)),
            disk: RwLock::new((oldest_on_disk, reader)),
            heads: watch::channel(head).0,
            failed: std::sync::OnceLock::new(),
            reports: Default::default(),
            logged_at: Mutex::new(VecDeque::new()),
            propagation: Arc::default(),
            log_stats: LogStats::default(),
            unreadable: Mutex::default(),
        }
    }

    /// The shard.
    pub fn shard(&self) -> ShardId {
        self.shard
    }
    /// The hub of a tier of `n` shards, which its receivers are told.
    pub fn with_shard_count(self, n: u32) -> Self {
        Hub {
            shard_count: n,
            ..self
        }
    }

    /// The log's epoch.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }
    /// Last seq logged.
    pub fn head(&self) -> Seq {
        lock(&self.tail).head()
    }
    /// First seq still obtainable.
    pub fn oldest(&self) -> Seq {
        let disk = self.disk.read().unwrap_or_else(|e| e.into_inner()).0;
        disk.min(lock(&self.tail).oldest())
    }

    /// A committed group, to every receiver.
    pub fn push(&self, b: Arc<SharedBatch>) {
        let head = b.batch.last_seq;
        self.propagation.observe_published(&b.batch);
        if let Err(e) = lock(&self.tail).push(b) {
            tracing::error!(error = %e, "memory tail refused a batch");
        }
        self.heads.send_replace(head);
        let mut times = lock(&self.logged_at);
        if times.len() == LOGGED_AT_KEPT {
            times.pop_front();
        }
        times.push_back((head, dci_proto::now_us()));
    }

    /// When `seq` was logged (µs since the epoch), as far as the recent groups tell: for an older
    /// seq, the oldest time kept (so an age computed from it is a lower bound). `None` for a seq
    /// not logged yet.
    pub fn logged_at(&self, seq: Seq) -> Option<u64> {
        let times = lock(&self.logged_at);
        let i = times.partition_point(|&(last, _)| last < seq);
        times.get(i).map(|&(_, t)| t)
    }

    /// The log moved (retention, new segments).
    pub fn set_disk(&self, oldest: Seq, reader: LogReader) {
        *self.disk.write().unwrap_or_else(|e| e.into_inner()) = (oldest, reader);
    }

    /// The log failed (the first failure is the one told); publishes are refused.
    pub fn set_failed(&self, why: String) {
        let _ = self.failed.set(why);
    }
    /// Has the log failed?
    pub fn failed(&self) -> bool {
        self.failed.get().is_some()
    }
    /// Why the log failed, if it has.
    pub fn failure(&self) -> Option<&str> {
        self.failed.get().map(String::as_str)
    }

    /// Every node reported below this one.
    pub fn reported(&self) -> Vec<pb::NodeStatus> {
        let head = (self.epoch, lock(&self.tail).head());
        self.reports.aged(|s| (s == self.shard).then_some(head))
    }

    fn read_disk(
        reader: &LogReader,
        shard: ShardId,
        epoch: Epoch,
        from: Seq,
        budget: usize,
    ) -> std::io::Result<Vec<Arc<SharedBatch>>> {
        let records = reader.read_from(from, budget.max(64 << 10))?;
        let mut out = Vec::new();
        let mut entries = Vec::new();
        let mut bytes = 0;
        let mut first = None;
        let mut last = 0;
        for rec in records {
            first.get_or_insert(rec.first_seq);
            last = rec.last_seq();
            for e in rec.entries {
                // Validated before it was logged; the limit is the format's, not the config's.
                if let Ok(inv) = Invalidation::try_from_pb(e, usize::MAX) {
                    bytes += inv.approx_size();
                    entries.push(inv);
                }
            }
            // Batches a receiver decodes, bounded as groups are (long keys make few entries
            // many bytes).
            if entries.len() >= 4096 || bytes >= crate::writer::MAX_GROUP_BYTES {
                bytes = 0;
                out.push(SharedBatch::new(Batch {
                    shard,
                    epoch,
                    first_seq: first.take().expect("set above"),
                    last_seq: last,
                    entries: coalesce(std::mem::take(&mut entries)),
                }));
            }
        }
        if let Some(first_seq) = first {
            out.push(SharedBatch::new(Batch {
                shard,
                epoch,
                first_seq,
                last_seq: last,
                entries: coalesce(entries),
            }));
        }
        Ok(out)
    }
}

impl BatchSource for Hub {
    fn shard_count(&self) -> u32 {
        self.shard_count
    }

    fn receiver_ahead(&self, shard: ShardId, hwm: Seq, head: Seq) {
        if shard != self.shard || self.failed() {
            return;
        }
        // Only this log gave out this epoch's seqs: a receiver that applied one past its head
        // learned of it from a log that had more (this one before it was restored from an
        // older copy, say, or another coordinator run on a copy of it). The seqs after the head
        // would be given out again, for other invalidations, and the receivers would skip them.
        let why = format!(
            "a receiver has applied seq {hwm} of this log's epoch {}, past its head {head}: the \
             log lost part of what it streamed (restored from an older copy, or a copy of it \
             run elsewhere), and would give those seqs out again; this coordinator refuses \
             publishes until it is restarted, and starts then under a new epoch, so that every \
             receiver drops what it holds",
            self.epoch
        );
        tracing::error!(shard, hwm, head, "{why}");
        self.set_failed(why);
    }

    fn views(&self) -> Vec<ShardView> {
        let tail = lock(&self.tail);
        let disk = self.disk.read().unwrap_or_else(|e| e.into_inner()).0;
        vec![ShardView {
            shard: self.shard,
            epoch: self.epoch,
            oldest: disk.min(tail.oldest()),
            head: tail.head(),
            held_from: tail.oldest(),
            head_time_us: tail.head_publish_us(),
        }]
    }

    fn heads(&self) -> watch::Receiver<u64> {
        self.heads.subscribe()
    }

    async fn read(&self, shard: ShardId, from: Seq, budget: usize) -> Fetch {
        if shard != self.shard {
            return Fetch::Gone;
        }
        let read = lock(&self.tail).read(from, budget);
        match read {
            Read::Batches(b) => Fetch::Batches(b),
            Read::UpToDate => Fetch::NotYet,
            Read::Gone { .. } => {
                let (oldest, reader) = {
                    let d = self.disk.read().unwrap_or_else(|e| e.into_inner());
                    (d.0, d.1.clone())
                };
                if from < oldest {
                    return Fetch::Gone;
                }
                let (shard, epoch) = (self.shard, self.epoch);
                let read = tokio::task::spawn_blocking(move || {
                    Hub::read_disk(&reader, shard, epoch, from, budget)
                })
                .await;
                let why = match read {
                    Ok(Ok(batches)) if !batches.is_empty() => return Fetch::Batches(batches),
                    Ok(Ok(_)) => "its segment is missing or damaged".to_string(),
                    Ok(Err(e)) => e.to_string(),
                    Err(e) => e.to_string(),
                };
                // It was written (it is older than the memory tail), yet the log gives none of
                // it: retention removed its segment meanwhile, or it cannot be read (a segment
                // removed by hand, damaged since it was written). Asking again would hold the
                // receiver where it is for good, and its cache with it: the range is gone.
                let oldest = self.disk.read().unwrap_or_else(|e| e.into_inner()).0;
                if from >= oldest {
                    if let Some(held_back) = lock(&self.unreadable).allow(std::time::Instant::now())
                    {
                        tracing::error!(
                            from,
                            %why,
                            held_back,
                            "a range of the log cannot be read: receivers that need it are reset to the head"
                        );
                    }
                }
                Fetch::Gone
            }
        }
    }

    fn report(&self, link_id: u64, nodes: Vec<pb::NodeStatus>) {
        // A node further down may know more than the relay it reports through (one that
        // started empty, and joined at this head): what it has applied is told here too.
        let head = lock(&self.tail).head();
        let ahead = nodes
            .iter()
            .flat_map(|n| &n.shards)
            .find(|s| s.shard == self.shard && s.epoch == self.epoch && s.hwm > head);
        if let Some(s) = ahead {
            self.receiver_ahead(s.shard, s.hwm, head);
        }
        self.reports.insert(link_id, nodes);
    }

    fn acked(&self, link_id: u64, ack: &pb::Ack) {
        self.reports.acked(link_id, ack);
    }

    fn forget(&self, link_id: u64) {
        self.reports.forget(link_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::{Wal, WalOptions};

    #[test]
    fn a_seq_is_dated_by_the_group_that_logged_it_and_the_oldest_kept_bounds_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _) = Wal::open(dir.path(), WalOptions::default()).unwrap();
        let hub = Hub::new(0, wal.epoch(), 0, 1, wal.reader(), 64 << 20);
        let group = |first: Seq, last: Seq| {
            SharedBatch::new(Batch {
                shard: 0,
                epoch: hub.epoch(),
                first_seq: first,
                last_seq: last,
                entries: (first..=last)
                    .map(|s| Invalidation {
                        seq: s,
                        ..Invalidation::key(format!("k{s}"))
                    })
                    .collect(),
            })
        };
        assert_eq!(hub.logged_at(1), None, "nothing logged yet");
        let before = dci_proto::now_us();
        hub.push(group(1, 3));
        std::thread::sleep(std::time::Duration::from_millis(5));
        let middle = dci_proto::now_us();
        hub.push(group(4, 4));
        let t1 = hub.logged_at(1).unwrap();
        assert!(t1 >= before && t1 < middle);
        assert_eq!(hub.logged_at(3), Some(t1), "the whole group at once");
        assert!(hub.logged_at(4).unwrap() >= middle);
        assert_eq!(hub.logged_at(5), None, "beyond the head");
        for seq in (5..).take(LOGGED_AT_KEPT) {
            hub.push(group(seq, seq));
        }
        // Seqs 1..=4 fell out: the oldest kept time stands for them, a lower bound of their age.
        assert_eq!(hub.logged_at(1), hub.logged_at(5));
        assert!(hub.logged_at(1).unwrap() >= middle);
    }

    /// A replay from disk makes batches a receiver decodes, however long the keys: 4,000 keys of
    /// 8 KiB are more than 32 MB, and were one batch.
    #[test]
    fn a_replay_of_long_keys_is_cut_into_batches_a_receiver_decodes() {
        let dir = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(dir.path(), WalOptions::default()).unwrap();
        let records: Vec<_> = (0..40u64)
            .map(|r| crate::wal::LogRecord {
                first_seq: r * 100 + 1,
                entries: (0..100u64)
                    .map(|i| {
                        Invalidation {
                            seq: r * 100 + i + 1,
                            ..Invalidation::key(format!("{r}:{i:08192}"))
                        }
                        .to_pb()
                    })
                    .collect(),
                ..Default::default()
            })
            .collect();
        wal.append(&records).unwrap();
        let Ok(batches) = Hub::read_disk(&wal.reader(), 0, wal.epoch(), 1, usize::MAX) else {
            panic!("the log holds them");
        };
        let mut next = 1;
        for b in &batches {
            assert!(
                b.encoded.len() <= dci_proto::types::MAX_REQUEST_BYTES + (1 << 20),
                "a batch of {} bytes",
                b.encoded.len()
            );
            assert_eq!(b.batch.first_seq, next);
            next = b.batch.last_seq + 1;
        }
        assert_eq!(next, 4_001);
    }
}
