//! The retransmit ring: recent batches of one shard, bounded in bytes.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;

use crate::types::{Batch, Epoch, Seq, ShardId};

/// A batch together with its encoding, made once and shared (by `Arc`) with every receiver.
#[derive(Debug)]
pub struct SharedBatch {
    /// The batch (all entries, unfiltered), shared with whoever decoded it.
    pub batch: Arc<Batch>,
    /// `pb::Batch` encoding of `batch`, sent as is to receivers without a filter.
    pub encoded: Bytes,
    /// Publish time of the newest entry (µs since the Unix epoch), for lag in ms.
    pub newest_publish_us: u64,
    /// zstd of `encoded`, made on first use and shared like `encoded`.
    zstd: std::sync::OnceLock<Bytes>,
    /// See [`SharedBatch::footprint`].
    footprint: usize,
}

impl SharedBatch {
    /// Encode `batch` once.
    pub fn new(batch: impl Into<Arc<Batch>>) -> Arc<Self> {
        let batch = batch.into();
        let encoded = batch.encode_shared();
        Self::from_encoded(batch, encoded)
    }

    /// A batch whose encoding is already at hand (as received from upstream).
    pub fn from_encoded(batch: impl Into<Arc<Batch>>, encoded: Bytes) -> Arc<Self> {
        let batch = batch.into();
        let newest_publish_us = batch
            .entries
            .iter()
            .map(|e| e.publish_time_us)
            .max()
            .unwrap_or(0);
        // The decoded entries weigh several times their encoding (a 35-byte invalidation encodes
        // to about 20 bytes and decodes to over 100): a bound on the encoding alone let a ring
        // of 64 MiB hold 200 MiB. Keys are counted apart although a relay's are slices of the
        // encoding, so the bound is an upper one.
        let footprint = encoded.len()
            + std::mem::size_of::<SharedBatch>()
            + std::mem::size_of::<Batch>()
            + batch.entries.capacity() * std::mem::size_of::<crate::types::Invalidation>()
            + batch.entries.iter().map(|e| e.key.len()).sum::<usize>();
        Arc::new(SharedBatch {
            batch,
            encoded,
            newest_publish_us,
            zstd: std::sync::OnceLock::new(),
            footprint,
        })
    }

    /// The zstd-compressed encoding, compressed once for every receiver that takes it.
    pub fn compressed(&self) -> Bytes {
        self.zstd.get_or_init(|| compress(&self.encoded)).clone()
    }

    /// Bytes this batch holds in memory: its encoding, its decoded entries and their keys (not
    /// a zstd encoding made later for compressing receivers).
    pub fn footprint(&self) -> usize {
        self.footprint
    }
}

/// zstd at a fast level: links are CPU-bound long before they are bandwidth-bound.
pub fn compress(bytes: &[u8]) -> Bytes {
    match zstd::bulk::compress(bytes, 1) {
        Ok(c) => Bytes::from(c),
        // Compression of a valid buffer does not fail; if it ever did, an empty frame would be
        // dropped by the receiver as undecodable and repaired by a Nack.
        Err(_) => Bytes::new(),
    }
}

/// Largest decompressed batch accepted: a compressed frame cannot make a receiver allocate more.
pub const MAX_BATCH_BYTES: usize = 64 << 20;

/// Undo [`compress`], refusing anything that would decompress beyond [`MAX_BATCH_BYTES`].
pub fn decompress(bytes: &[u8]) -> Result<Bytes, String> {
    zstd::bulk::decompress(bytes, MAX_BATCH_BYTES)
        .map(Bytes::from)
        .map_err(|e| format!("zstd: {e}"))
}

/// What a read from the ring found.
#[derive(Debug)]
pub enum Read {
    /// Batches covering `from..` (the first may start before `from`), oldest first.
    Batches(Vec<Arc<SharedBatch>>),
    /// `from` is older than anything the ring holds; `oldest` is the first seq it still has.
    Gone {
        /// First seq still held.
        oldest: Seq,
    },
    /// Nothing after `from - 1` yet.
    UpToDate,
}

/// Why a push was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// The batch does not start right after the ring's head.
    #[error("batch [{first}, {last}] does not follow head {head}")]
    NotContiguous {
        /// The ring's head.
        head: Seq,
        /// The batch's first seq.
        first: Seq,
        /// The batch's last seq.
        last: Seq,
    },
    /// The batch belongs to another epoch or shard.
    #[error("batch of shard {shard} epoch {epoch} does not belong in this ring")]
    Foreign {
        /// Its shard.
        shard: ShardId,
        /// Its epoch.
        epoch: Epoch,
    },
}

/// Recent batches of one shard, oldest first, bounded by `cap_bytes` (it always keeps the newest batch).
#[derive(Debug)]
pub struct RetransmitRing {
    shard: ShardId,
    epoch: Epoch,
    cap_bytes: usize,
    batches: VecDeque<Arc<SharedBatch>>,
    bytes: usize,
    head: Seq,
    /// First seq still held (head + 1 when empty).
    oldest: Seq,
}

impl RetransmitRing {
    /// An empty ring whose next batch starts at `head + 1`.
    pub fn new(shard: ShardId, epoch: Epoch, head: Seq, cap_bytes: usize) -> Self {
        RetransmitRing {
            shard,
            epoch,
            cap_bytes,
            batches: VecDeque::new(),
            bytes: 0,
            head,
            oldest: head + 1,
        }
    }

    /// The shard.
    pub fn shard(&self) -> ShardId {
        self.shard
    }
    /// The epoch of the held batches.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }
    /// Highest seq held (or the start point when empty).
    pub fn head(&self) -> Seq {
        self.head
    }
    /// First seq still held; `head + 1` when empty.
    pub fn oldest(&self) -> Seq {
        self.oldest
    }
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
    /// Publish time of the newest entry held (0 if unknown).
    pub fn head_publish_us(&self) -> u64 {
        self.batches.back().map_or(0, |b| b.newest_publish_us)
    }

    /// Append the next batch; evicts the oldest batches beyond the byte bound.
    pub fn push(&mut self, b: Arc<SharedBatch>) -> Result<(), RingError> {
        if b.batch.shard != self.shard || b.batch.epoch != self.epoch {
            return Err(RingError::Foreign {
                shard: b.batch.shard,
                epoch: b.batch.epoch,
            });
        }
        if b.batch.first_seq != self.head + 1 || b.batch.last_seq < b.batch.first_seq {
            return Err(RingError::NotContiguous {
                head: self.head,
                first: b.batch.first_seq,
                last: b.batch.last_seq,
            });
        }
        self.head = b.batch.last_seq;
        self.bytes += b.footprint();
        self.batches.push_back(b);
        self.evict();
        Ok(())
    }

    /// Hold at most `cap_bytes` from now on (the newest batch always), evicting the oldest.
    pub fn set_cap_bytes(&mut self, cap_bytes: usize) {
        self.cap_bytes = cap_bytes;
        self.evict();
    }

    fn evict(&mut self) {
        while self.bytes > self.cap_bytes && self.batches.len() > 1 {
            if let Some(old) = self.batches.pop_front() {
                self.bytes -= old.footprint();
                self.oldest = old.batch.last_seq + 1;
            }
        }
    }

    /// Start over at another epoch and head (after a Reset from upstream).
    pub fn reset(&mut self, epoch: Epoch, head: Seq) {
        self.epoch = epoch;
        self.batches.clear();
        self.bytes = 0;
        self.head = head;
        self.oldest = head + 1;
    }

    /// Batches covering `from..=head`, at most `max_bytes` of encodings (at least one batch).
    pub fn read(&self, from: Seq, max_bytes: usize) -> Read {
        if from > self.head {
            return Read::UpToDate;
        }
        if from < self.oldest {
            return Read::Gone {
                oldest: self.oldest,
            };
        }
        // Batches are contiguous and sorted: find the one holding `from`. A receiver that keeps
        // up asks for the newest few, so look there first; a search through a long ring costs a
        // cache miss per step.
        let mut idx = self.batches.len();
        for _ in 0..8 {
            match idx.checked_sub(1).map(|i| &self.batches[i]) {
                Some(b) if b.batch.last_seq >= from => idx -= 1,
                _ => break,
            }
        }
        if idx > 0 && self.batches[idx - 1].batch.last_seq >= from {
            idx = self.batches.partition_point(|b| b.batch.last_seq < from);
        }
        let mut out = Vec::new();
        let mut budget = 0usize;
        for b in self.batches.iter().skip(idx) {
            if !out.is_empty() && budget + b.encoded.len() > max_bytes {
                break;
            }
            budget += b.encoded.len();
            out.push(b.clone());
        }
        Read::Batches(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Invalidation;

    fn batch(first: Seq, last: Seq) -> Arc<SharedBatch> {
        SharedBatch::new(Batch {
            shard: 0,
            epoch: 1,
            first_seq: first,
            last_seq: last,
            entries: (first..=last)
                .map(|s| Invalidation {
                    seq: s,
                    ..Invalidation::key(format!("key-{s}"))
                })
                .collect(),
        })
    }

    proptest::proptest! {
        /// Wherever a read starts, it starts at the batch holding `from` and runs on in order.
        #[test]
        fn a_read_starts_at_the_batch_holding_its_seq(
            sizes in proptest::collection::vec(1u64..5, 1..60),
            pick in 0usize..1000,
        ) {
            let mut ring = RetransmitRing::new(0, 1, 0, usize::MAX);
            let mut next = 1;
            for n in &sizes {
                ring.push(batch(next, next + n - 1)).unwrap();
                next += n;
            }
            let from = 1 + (pick as u64 % (next - 1));
            let Read::Batches(out) = ring.read(from, usize::MAX) else {
                panic!("seq {from} is held");
            };
            proptest::prop_assert!(out[0].batch.first_seq <= from && from <= out[0].batch.last_seq);
            proptest::prop_assert_eq!(out.last().unwrap().batch.last_seq, next - 1);
            for w in out.windows(2) {
                proptest::prop_assert_eq!(w[0].batch.last_seq + 1, w[1].batch.first_seq);
            }
        }
    }

    #[test]
    fn reads_from_the_middle_and_reports_gone() {
        let mut r = RetransmitRing::new(0, 1, 0, 1 << 20);
        r.push(batch(1, 3)).unwrap();
        r.push(batch(4, 4)).unwrap();
        r.push(batch(5, 9)).unwrap();
        match r.read(4, usize::MAX) {
            Read::Batches(b) => {
                assert_eq!(b.len(), 2);
                assert_eq!(b[0].batch.first_seq, 4);
            }
            other => panic!("{other:?}"),
        }
        match r.read(7, usize::MAX) {
            Read::Batches(b) => assert_eq!(b[0].batch.first_seq, 5),
            other => panic!("{other:?}"),
        }
        assert!(matches!(r.read(10, 10), Read::UpToDate));
        assert_eq!(
            r.push(batch(11, 12)),
            Err(RingError::NotContiguous {
                head: 9,
                first: 11,
                last: 12
            })
        );
    }

    /// A ring's bound is on the memory its batches hold, decoded entries included, not on their
    /// encoding alone (a fraction of it).
    #[test]
    fn a_batch_weighs_its_decoded_entries_too() {
        let b = batch(1, 1000);
        let entries = 1000 * std::mem::size_of::<Invalidation>();
        let keys: usize = b.batch.entries.iter().map(|e| e.key.len()).sum();
        assert!(b.footprint() >= b.encoded.len() + entries + keys);
        assert!(
            b.footprint() > 4 * b.encoded.len(),
            "{} vs {}",
            b.footprint(),
            b.encoded.len()
        );
    }

    #[test]
    fn byte_bound_evicts_oldest_and_keeps_newest() {
        let one = batch(1, 10).footprint();
        let mut r = RetransmitRing::new(0, 1, 0, one * 2);
        for i in 0..5 {
            r.push(batch(i * 10 + 1, i * 10 + 10)).unwrap();
        }
        assert!(r.bytes() <= one * 2 + 16);
        assert_eq!(r.head(), 50);
        assert!(r.oldest() > 1);
        assert!(matches!(r.read(1, usize::MAX), Read::Gone { .. }));
        let tiny = RetransmitRing::new(0, 1, 0, 1);
        let mut tiny = tiny;
        tiny.push(batch(1, 10)).unwrap();
        tiny.push(batch(11, 20)).unwrap();
        assert_eq!(tiny.oldest(), 11, "always keeps the newest batch");
    }

    #[test]
    fn compression_is_shared_and_round_trips() {
        let b = batch(1, 200);
        let c1 = b.compressed();
        let c2 = b.compressed();
        assert_eq!(c1.as_ptr(), c2.as_ptr(), "compressed once, shared");
        assert!(c1.len() < b.encoded.len() / 2);
        assert_eq!(decompress(&c1).unwrap(), b.encoded);
        assert!(decompress(b"not zstd").is_err());
    }

    #[test]
    fn read_respects_the_byte_budget() {
        let mut r = RetransmitRing::new(0, 1, 0, 1 << 20);
        for i in 0..10 {
            r.push(batch(i * 2 + 1, i * 2 + 2)).unwrap();
        }
        let per = batch(1, 2).encoded.len();
        match r.read(1, per * 3) {
            Read::Batches(b) => assert_eq!(b.len(), 3),
            other => panic!("{other:?}"),
        }
        match r.read(1, 0) {
            Read::Batches(b) => assert_eq!(b.len(), 1, "always at least one"),
            other => panic!("{other:?}"),
        }
    }
}
