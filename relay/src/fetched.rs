//! Batches a relay fetched from upstream for receivers behind its ring, kept for the next
//! receiver behind at the same place. After a relay restarts, every edge resumes where it was:
//! the same range, older than the new ring, which is then fetched once instead of once per edge.
//!
//! A batch is known by its shard, epoch and first seq; within an epoch a seq never changes its
//! entries, so what is kept stays right for as long as it is kept (oldest first out, by bytes).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use dci_proto::link::SharedBatch;
use dci_proto::{Epoch, Seq, ShardId};

type Key = (ShardId, Epoch, Seq);

/// The kept batches, bounded in bytes.
pub struct Fetched {
    batches: BTreeMap<Key, Arc<SharedBatch>>,
    /// Keys in the order they came, for eviction.
    order: VecDeque<Key>,
    bytes: usize,
    cap: usize,
}

impl Fetched {
    /// Keep at most `cap` bytes (as [`SharedBatch::footprint`] counts them).
    pub fn new(cap: usize) -> Self {
        Fetched {
            batches: BTreeMap::new(),
            order: VecDeque::new(),
            bytes: 0,
            cap,
        }
    }

    /// Contiguous batches of `shard` in `epoch` from `from` on (the first may start before it),
    /// about `budget` bytes; empty when `from` is not kept.
    pub fn read(
        &self,
        shard: ShardId,
        epoch: Epoch,
        from: Seq,
        budget: usize,
    ) -> Vec<Arc<SharedBatch>> {
        let mut out = Vec::new();
        let Some((&start, _)) = self.batches.range(..=(shard, epoch, from)).next_back() else {
            return out;
        };
        if (start.0, start.1) != (shard, epoch) {
            return out;
        }
        let mut next = from;
        let mut used = 0;
        for (&(s, e, first), b) in self.batches.range(start..) {
            if (s, e) != (shard, epoch) || first > next {
                break;
            }
            if b.batch.last_seq < next {
                continue;
            }
            next = b.batch.last_seq + 1;
            used += b.footprint();
            out.push(b.clone());
            if used >= budget {
                break;
            }
        }
        out
    }

    /// Keep `batches` of `shard` in `epoch`, evicting the oldest kept beyond the cap.
    pub fn keep(&mut self, shard: ShardId, epoch: Epoch, batches: &[Arc<SharedBatch>]) {
        for b in batches {
            let key = (shard, epoch, b.batch.first_seq);
            if b.footprint() > self.cap || self.batches.contains_key(&key) {
                continue;
            }
            self.bytes += b.footprint();
            self.batches.insert(key, b.clone());
            self.order.push_back(key);
        }
        while self.bytes > self.cap {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some(b) = self.batches.remove(&old) {
                self.bytes -= b.footprint();
            }
        }
    }

    /// Bytes kept.
    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dci_proto::{Batch, Invalidation};
    use proptest::prelude::*;

    fn batch(shard: ShardId, epoch: Epoch, first: Seq, last: Seq) -> Arc<SharedBatch> {
        SharedBatch::new(Batch {
            shard,
            epoch,
            first_seq: first,
            last_seq: last,
            entries: (first..=last)
                .map(|s| Invalidation {
                    seq: s,
                    ..Invalidation::key(format!("k{s:04}"))
                })
                .collect(),
        })
    }

    fn ranges(v: &[Arc<SharedBatch>]) -> Vec<(Seq, Seq)> {
        v.iter()
            .map(|b| (b.batch.first_seq, b.batch.last_seq))
            .collect()
    }

    #[test]
    fn reads_what_was_kept_from_any_seq_in_it_and_nothing_across_a_gap_or_an_epoch() {
        let mut f = Fetched::new(1 << 20);
        f.keep(0, 7, &[batch(0, 7, 10, 19), batch(0, 7, 20, 29)]);
        f.keep(0, 7, &[batch(0, 7, 40, 49)]);
        f.keep(1, 7, &[batch(1, 7, 30, 39)]);
        assert_eq!(ranges(&f.read(0, 7, 10, usize::MAX)), [(10, 19), (20, 29)]);
        assert_eq!(ranges(&f.read(0, 7, 25, usize::MAX)), [(20, 29)]);
        assert!(f.read(0, 7, 30, usize::MAX).is_empty(), "a gap");
        assert!(f.read(0, 7, 9, usize::MAX).is_empty());
        assert!(f.read(0, 8, 10, usize::MAX).is_empty(), "another epoch");
        assert!(f.read(1, 7, 29, usize::MAX).is_empty(), "another shard");
        assert_eq!(ranges(&f.read(1, 7, 35, usize::MAX)), [(30, 39)]);
        assert_eq!(ranges(&f.read(0, 7, 10, 1)), [(10, 19)], "about the budget");
    }

    #[test]
    fn keeps_no_more_than_its_bytes_and_lets_the_oldest_go_first() {
        let one = batch(0, 1, 1, 10).footprint();
        let mut f = Fetched::new(3 * one);
        for i in 0..5u64 {
            f.keep(0, 1, &[batch(0, 1, i * 10 + 1, i * 10 + 10)]);
            assert!(f.bytes() <= 3 * one);
        }
        assert!(f.read(0, 1, 1, usize::MAX).is_empty());
        assert!(f.read(0, 1, 11, usize::MAX).is_empty());
        assert_eq!(
            ranges(&f.read(0, 1, 21, usize::MAX)),
            [(21, 30), (31, 40), (41, 50)]
        );
    }

    proptest! {
        /// Whatever was kept (overlapping, trimmed, any order), a read hands out batches that
        /// cover from `from` on without a gap, all of the shard and epoch asked for.
        #[test]
        fn reads_are_contiguous_from_where_they_were_asked(
            kept in prop::collection::vec((0u32..2, 0u64..2, 1u64..60, 0u64..8), 0..30),
            from in 1u64..70,
            shard in 0u32..2,
            epoch in 0u64..2,
        ) {
            let mut f = Fetched::new(1 << 16);
            for (s, e, first, len) in kept {
                f.keep(s, e, &[batch(s, e, first, first + len)]);
            }
            let mut next = from;
            for b in f.read(shard, epoch, from, usize::MAX) {
                prop_assert_eq!((b.batch.shard, b.batch.epoch), (shard, epoch));
                prop_assert!(b.batch.first_seq <= next && b.batch.last_seq >= next);
                next = b.batch.last_seq + 1;
            }
        }
    }
}
