//! The receiving end of a link: one high-water mark per shard, gap repair, acks of applied seqs.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use crate::pb;
use crate::types::{Batch, Epoch, Seq, ShardId, MAX_SEQ, MAX_SHARDS};

/// Tunables of a receiver.
#[derive(Clone, Debug)]
pub struct ReceiverConfig {
    /// Ack about this often (a cumulative ack covers everything applied so far); each gap is
    /// drawn between half and one and a half of it.
    pub ack_interval: Duration,
    /// Ask again for a missing range when it has not arrived after this long.
    pub nack_retry: Duration,
    /// Out-of-order batches held while a gap is repaired; beyond that they are dropped and
    /// fetched again (the sender goes back to the gap anyway).
    pub max_pending_batches: usize,
    /// The same, in bytes (about: keys and their bookkeeping), over all shards. A sender keeps
    /// within its window; this bounds one that does not.
    pub max_pending_bytes: usize,
}

impl Default for ReceiverConfig {
    fn default() -> Self {
        ReceiverConfig {
            // Acks only let the sender trim its window and report lag; resuming works from the
            // receiver's own high-water mark. Fewer acks leave the CPU to the batches themselves.
            ack_interval: Duration::from_millis(20),
            nack_retry: Duration::from_millis(200),
            max_pending_batches: 1024,
            max_pending_bytes: 64 << 20,
        }
    }
}

/// What the runtime must do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum RxCommand {
    /// Apply these entries (the batch range is contiguous with what was delivered before), then
    /// call [`Receiver::on_applied`] with its shard, epoch and `last_seq`.
    Apply(Batch),
    /// Drop everything this shard may have made stale, then call [`Receiver::on_applied`] with
    /// `(shard, epoch, hwm)`: the receiver continues after `hwm` in `epoch`.
    Flush {
        /// The shard.
        shard: ShardId,
        /// Its new epoch.
        epoch: Epoch,
        /// Where it resumes.
        hwm: Seq,
        /// Why (for logs and metrics).
        reason: String,
    },
    /// The receiver joins a shard it had no position in, at `hwm`: whatever it may hold of that
    /// shard predates its position (a fill taken before it knew the stream), so it drops it as for
    /// a Flush, then calls [`Receiver::on_applied`] with `(shard, epoch, hwm)`. Not a Reset: nothing
    /// was lost.
    Join {
        /// The shard.
        shard: ShardId,
        /// Its epoch.
        epoch: Epoch,
        /// Where the receiver starts.
        hwm: Seq,
    },
    /// Send this cumulative ack.
    Ack(pb::Ack),
    /// Ask the sender for a missing range.
    Nack(pb::Nack),
}

#[derive(Debug)]
struct RxShard {
    epoch: Epoch,
    /// Highest seq handed out for applying; everything up to it was delivered in order.
    delivered: Seq,
    /// Highest seq the runtime confirmed applied (in `epoch`).
    applied: Seq,
    /// Highest seq acked to the sender.
    acked: Seq,
    /// No ack before this (unless a duplicate asks for one); `None`: ack at once.
    next_ack_at: Option<Instant>,
    /// Batches that arrived past a gap, by first seq.
    pending: BTreeMap<Seq, Batch>,
    /// Their size, as [`held_size`] counts it.
    pending_bytes: usize,
    /// The outstanding Nack and when it was sent.
    nack: Option<(Seq, Seq, Instant)>,
    /// The highest head a sender announced.
    head_seen: Seq,
    /// The highest seq a sender said it holds, sent to us or not.
    held_seen: Seq,
}

impl RxShard {
    fn new(epoch: Epoch, hwm: Seq) -> Self {
        RxShard {
            epoch,
            delivered: hwm,
            applied: hwm,
            acked: hwm,
            next_ack_at: None,
            pending: BTreeMap::new(),
            pending_bytes: 0,
            nack: None,
            head_seen: hwm,
            held_seen: hwm,
        }
    }
}

/// The receiver state machine of one node (all shards it takes over its current link).
#[derive(Debug)]
pub struct Receiver {
    cfg: ReceiverConfig,
    shards: HashMap<ShardId, RxShard>,
    /// Draws the spacing of acks; see [`Receiver::ack_sent`].
    spacing: u64,
    /// The sum of the shards' `pending_bytes`.
    pending_bytes: usize,
}

/// What a held batch counts for against `max_pending_bytes`.
fn held_size(b: &Batch) -> usize {
    64 + b.entries.iter().map(|e| e.approx_size()).sum::<usize>()
}

/// Seeds of the receivers' ack spacing, so that receivers of one process differ.
static SPACING_SEEDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl Receiver {
    /// A receiver with no history: every shard starts where its sender's head is.
    pub fn new(cfg: ReceiverConfig) -> Self {
        let seed =
            SPACING_SEEDS.fetch_add(0x9E37_79B9_7F4A_7C15, std::sync::atomic::Ordering::Relaxed);
        Receiver {
            cfg,
            shards: HashMap::new(),
            spacing: seed | 1,
            pending_bytes: 0,
        }
    }

    /// A receiver that resumes the given shards (e.g. a restarted NearCache with persisted state).
    pub fn with_resume(cfg: ReceiverConfig, points: &[(ShardId, Epoch, Seq)]) -> Self {
        let mut r = Self::new(cfg);
        for &(s, e, h) in points {
            r.shards.insert(s, RxShard::new(e, h));
        }
        r
    }

    /// The resume points to put in a Hello: what has been applied, per shard.
    pub fn resume_points(&self) -> Vec<pb::ResumePoint> {
        let mut v: Vec<_> = self
            .shards
            .iter()
            .map(|(&shard, s)| pb::ResumePoint {
                shard,
                epoch: s.epoch,
                hwm: s.applied,
            })
            .collect();
        v.sort_by_key(|p| p.shard);
        v
    }

    /// Applied high-water mark and epoch of a shard.
    pub fn applied(&self, shard: ShardId) -> Option<(Epoch, Seq)> {
        self.shards.get(&shard).map(|s| (s.epoch, s.applied))
    }

    /// Highest head a sender announced for a shard (for lag).
    pub fn head_seen(&self, shard: ShardId) -> Option<Seq> {
        self.shards.get(&shard).map(|s| s.head_seen)
    }

    /// Every shard known, with (epoch, applied, the highest seq known to exist: sent, or held by
    /// the sender). Caught up means applied that far.
    pub fn progress(&self) -> Vec<(ShardId, Epoch, Seq, Seq)> {
        let mut v: Vec<_> = self
            .shards
            .iter()
            .map(|(&k, s)| {
                (
                    k,
                    s.epoch,
                    s.applied,
                    s.head_seen.max(s.held_seen).max(s.applied),
                )
            })
            .collect();
        v.sort();
        v
    }

    /// A new link was opened (to any sender of the shard): forget in-flight state; resume from
    /// what was applied.
    pub fn on_reconnect(&mut self) {
        for s in self.shards.values_mut() {
            s.delivered = s.applied;
            s.acked = s.applied;
            s.pending.clear();
            s.pending_bytes = 0;
            s.nack = None;
        }
        self.pending_bytes = 0;
    }

    /// Bytes of out-of-order batches held now (as `max_pending_bytes` counts them).
    pub fn pending_bytes(&self) -> usize {
        self.pending_bytes
    }

    /// `pending_bytes`, counted again from what is held.
    #[cfg(test)]
    pub(crate) fn pending_bytes_counted(&self) -> usize {
        let per_shard = |s: &RxShard| s.pending.values().map(held_size).sum::<usize>();
        debug_assert!(self
            .shards
            .values()
            .all(|s| s.pending_bytes == per_shard(s)));
        self.shards.values().map(per_shard).sum()
    }

    /// Put `s` in place of `shard`'s state, letting go of what the old one held.
    fn replace(&mut self, shard: ShardId, s: RxShard) {
        if let Some(old) = self.shards.insert(shard, s) {
            self.pending_bytes -= old.pending_bytes;
        }
    }

    /// A batch arrived.
    pub fn on_batch(&mut self, b: Batch, now: Instant) -> Vec<RxCommand> {
        let mut out = Vec::new();
        let shard = b.shard;
        if shard >= MAX_SHARDS {
            return out;
        }
        if !self.shards.contains_key(&shard) {
            out.push(self.join(shard, b.epoch, b.first_seq.saturating_sub(1)));
        }
        let s = self.shards.get_mut(&shard).expect("joined above");
        if b.epoch < s.epoch {
            // A leftover of a log that no longer exists.
            return out;
        }
        if b.epoch > s.epoch {
            // The log was replaced without an explicit Reset reaching us: same rule.
            let hwm = b.first_seq.saturating_sub(1);
            self.pending_bytes -= s.pending_bytes;
            *s = RxShard::new(b.epoch, hwm);
            s.applied = 0;
            out.push(RxCommand::Flush {
                shard,
                epoch: b.epoch,
                hwm,
                reason: "epoch changed".into(),
            });
        }
        s.head_seen = s.head_seen.max(b.last_seq);
        if b.last_seq <= s.delivered {
            // Duplicate: re-ack so a sender retransmitting on timeout learns we have it.
            if s.applied == s.delivered && s.applied > 0 {
                out.push(ack(shard, s));
                s.next_ack_at = Some(next_ack_at(&mut self.spacing, self.cfg.ack_interval, now));
            }
            return out;
        }
        if b.first_seq > s.delivered + 1 {
            let (from, to) = (s.delivered + 1, b.first_seq - 1);
            let size = held_size(&b);
            if s.pending.len() < self.cfg.max_pending_batches
                && self.pending_bytes + size <= self.cfg.max_pending_bytes
            {
                if let Some(old) = s.pending.insert(b.first_seq, b) {
                    s.pending_bytes -= held_size(&old);
                    self.pending_bytes -= held_size(&old);
                }
                s.pending_bytes += size;
                self.pending_bytes += size;
            }
            nack_if_due(shard, s, from, to, now, self.cfg.nack_retry, &mut out);
            return out;
        }
        deliver(shard, s, b, &mut out);
        // Close the gap with what arrived early.
        while let Some((&first, _)) = s.pending.first_key_value() {
            if first > s.delivered + 1 {
                break;
            }
            let (_, p) = s.pending.pop_first().expect("checked non-empty");
            let size = held_size(&p);
            s.pending_bytes -= size;
            self.pending_bytes -= size;
            if p.last_seq > s.delivered {
                deliver(shard, s, p, &mut out);
            }
        }
        match s.pending.first_key_value() {
            Some((&first, _)) => {
                let (from, to) = (s.delivered + 1, first - 1);
                nack_if_due(shard, s, from, to, now, self.cfg.nack_retry, &mut out);
            }
            None => s.nack = None,
        }
        out
    }

    /// The runtime applied everything up to `seq` (an `Apply`'s last seq, or a `Flush`'s hwm).
    pub fn on_applied(
        &mut self,
        shard: ShardId,
        epoch: Epoch,
        seq: Seq,
        now: Instant,
    ) -> Option<RxCommand> {
        let s = self.shards.get_mut(&shard)?;
        if epoch != s.epoch || seq > s.delivered {
            return None;
        }
        s.applied = s.applied.max(seq);
        let due = s.next_ack_at.is_none_or(|t| now >= t);
        if due && s.applied > s.acked {
            s.next_ack_at = Some(next_ack_at(&mut self.spacing, self.cfg.ack_interval, now));
            Some(ack(shard, s))
        } else {
            None
        }
    }

    fn join(&mut self, shard: ShardId, epoch: Epoch, hwm: Seq) -> RxCommand {
        let mut s = RxShard::new(epoch, hwm);
        // Nothing counts as applied in this shard until the join is carried out.
        s.applied = 0;
        s.acked = 0;
        self.replace(shard, s);
        RxCommand::Join { shard, epoch, hwm }
    }

    /// The sender gave up on continuity: flush and resume after `reset.hwm` in `reset.epoch`.
    pub fn on_reset(&mut self, r: &pb::Reset) -> Vec<RxCommand> {
        if let Some(s) = self.shards.get(&r.shard) {
            if r.epoch < s.epoch {
                return Vec::new();
            }
        }
        self.adopt(r)
    }

    /// Flush and resume after `r.hwm` in `r.epoch`, even an epoch older than the one held: the
    /// sender's log is known to be the shard's log now (see `upstream::takes_older_epoch`).
    pub fn adopt(&mut self, r: &pb::Reset) -> Vec<RxCommand> {
        if r.hwm > MAX_SEQ || r.shard >= MAX_SHARDS {
            return Vec::new();
        }
        let mut s = RxShard::new(r.epoch, r.hwm);
        // Nothing is applied in the new epoch until the flush is confirmed.
        s.applied = 0;
        s.acked = 0;
        self.replace(r.shard, s);
        vec![RxCommand::Flush {
            shard: r.shard,
            epoch: r.epoch,
            hwm: r.hwm,
            reason: r.reason.clone(),
        }]
    }

    /// A heartbeat from the sender: a head above what was delivered means a lost tail.
    pub fn on_heartbeat(&mut self, hb: &pb::Heartbeat, now: Instant) -> Vec<RxCommand> {
        let mut out = Vec::new();
        for h in &hb.heads {
            if h.head > MAX_SEQ || h.shard >= MAX_SHARDS {
                continue;
            }
            if !self.shards.contains_key(&h.shard) {
                // The sender started this link at its head: that is our position in the shard.
                out.push(self.join(h.shard, h.epoch, h.head));
                continue;
            }
            let Some(s) = self.shards.get_mut(&h.shard) else {
                continue;
            };
            if h.epoch != s.epoch {
                continue;
            }
            s.head_seen = s.head_seen.max(h.head);
            if h.held <= MAX_SEQ {
                s.held_seen = s.held_seen.max(h.held);
            }
            if h.head > s.delivered {
                let to = s
                    .pending
                    .first_key_value()
                    .map_or(h.head, |(&first, _)| first - 1);
                let from = s.delivered + 1;
                if to >= from {
                    nack_if_due(h.shard, s, from, to, now, self.cfg.nack_retry, &mut out);
                }
            }
        }
        out
    }

    /// Time passed: send acks that were held back, repeat overdue Nacks.
    pub fn tick(&mut self, now: Instant) -> Vec<RxCommand> {
        let mut out = Vec::new();
        let mut shards: Vec<_> = self.shards.keys().copied().collect();
        shards.sort();
        for shard in shards {
            let s = self.shards.get_mut(&shard).expect("key from map");
            if s.applied > s.acked && s.applied > 0 && s.next_ack_at.is_none_or(|t| now >= t) {
                s.next_ack_at = Some(next_ack_at(&mut self.spacing, self.cfg.ack_interval, now));
                out.push(ack(shard, s));
            }
            if let Some((from, to, at)) = s.nack {
                if now.duration_since(at) >= self.cfg.nack_retry && to > s.delivered {
                    let from = from.max(s.delivered + 1);
                    s.nack = Some((from, to, now));
                    out.push(RxCommand::Nack(pb::Nack {
                        shard,
                        from_seq: from,
                        to_seq: to,
                    }));
                }
            }
        }
        out
    }
}

fn ack(shard: ShardId, s: &mut RxShard) -> RxCommand {
    s.acked = s.applied;
    RxCommand::Ack(pb::Ack {
        shard,
        epoch: s.epoch,
        hwm: s.applied,
    })
}

fn deliver(shard: ShardId, s: &mut RxShard, b: Batch, out: &mut Vec<RxCommand>) {
    let b = if b.first_seq <= s.delivered {
        b.after(s.delivered)
    } else {
        b
    };
    debug_assert_eq!(b.shard, shard);
    s.delivered = b.last_seq;
    out.push(RxCommand::Apply(b));
}

fn nack_if_due(
    shard: ShardId,
    s: &mut RxShard,
    from: Seq,
    to: Seq,
    now: Instant,
    retry: Duration,
    out: &mut Vec<RxCommand>,
) {
    let due = match s.nack {
        Some((f, t, at)) => (f, t) != (from, to) || now.duration_since(at) >= retry,
        None => true,
    };
    if due {
        s.nack = Some((from, to, now));
        out.push(RxCommand::Nack(pb::Nack {
            shard,
            from_seq: from,
            to_seq: to,
        }));
    }
}

/// When the next ack may go: between half an interval and one and a half from `now`, drawn
/// afresh each time. Receivers that applied the same batch at the same moment would otherwise
/// ack in lockstep forever, and their sender would take every ack of its subtree in one burst.
fn next_ack_at(spacing: &mut u64, interval: Duration, now: Instant) -> Instant {
    let mut x = *spacing;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *spacing = x;
    let fraction = (x >> 11) as f64 / (1u64 << 53) as f64;
    now + interval.mul_f64(0.5 + fraction)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Invalidation;

    fn batch(first: Seq, last: Seq) -> Batch {
        Batch {
            shard: 0,
            epoch: 7,
            first_seq: first,
            last_seq: last,
            entries: (first..=last)
                .map(|s| Invalidation {
                    seq: s,
                    ..Invalidation::key(format!("k{s}"))
                })
                .collect(),
        }
    }

    fn applied_ranges(cmds: &[RxCommand]) -> Vec<(Seq, Seq)> {
        cmds.iter()
            .filter_map(|c| match c {
                RxCommand::Apply(b) => Some((b.first_seq, b.last_seq)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn in_order_batches_apply_and_ack_only_after_applied() {
        let now = Instant::now();
        let mut r = Receiver::with_resume(ReceiverConfig::default(), &[(0, 7, 0)]);
        let cmds = r.on_batch(batch(1, 3), now);
        assert_eq!(applied_ranges(&cmds), vec![(1, 3)]);
        assert!(!cmds.iter().any(|c| matches!(c, RxCommand::Ack(_))));
        assert!(r.tick(now).is_empty(), "nothing applied yet, nothing acked");
        let ack = r.on_applied(0, 7, 3, now);
        assert_eq!(
            ack,
            Some(RxCommand::Ack(pb::Ack {
                shard: 0,
                epoch: 7,
                hwm: 3
            }))
        );
    }

    #[test]
    fn gap_is_nacked_and_filled_from_pending() {
        let now = Instant::now();
        let mut r = Receiver::with_resume(ReceiverConfig::default(), &[(0, 7, 0)]);
        r.on_batch(batch(1, 2), now);
        let cmds = r.on_batch(batch(5, 6), now);
        assert_eq!(
            cmds,
            vec![RxCommand::Nack(pb::Nack {
                shard: 0,
                from_seq: 3,
                to_seq: 4
            })]
        );
        let cmds = r.on_batch(batch(3, 4), now);
        assert_eq!(applied_ranges(&cmds), vec![(3, 4), (5, 6)]);
    }

    /// Receivers fed the same batches at the same instants (a relay's edges) must not ack in the
    /// same instants, or their sender takes all their acks in one burst every interval. Each still
    /// acks everything it applied, about once an interval.
    #[test]
    fn receivers_in_lockstep_spread_their_acks() {
        let cfg = ReceiverConfig::default();
        let interval = cfg.ack_interval;
        let start = Instant::now();
        let mut rs: Vec<_> = (0..10)
            .map(|_| Receiver::with_resume(cfg.clone(), &[(0, 7, 0)]))
            .collect();
        let mut acks_at: Vec<Vec<u64>> = vec![Vec::new(); rs.len()];
        let mut acked_hwm = vec![0; rs.len()];
        let ms = 2_000u64;
        for t in 1..=ms {
            let now = start + Duration::from_millis(t);
            for (i, r) in rs.iter_mut().enumerate() {
                let mut cmds = r.on_batch(batch(t, t), now);
                cmds.extend(r.on_applied(0, 7, t, now));
                cmds.extend(r.tick(now));
                for c in cmds {
                    if let RxCommand::Ack(a) = c {
                        assert!(a.hwm <= t, "never acks what was not applied");
                        acks_at[i].push(t);
                        acked_hwm[i] = a.hwm;
                    }
                }
            }
        }
        // The first acks come together (all applied their first batch at once); from the second on
        // they drift apart.
        let per_ms = acks_at.iter().flat_map(|t| t.iter().skip(1)).fold(
            std::collections::HashMap::<u64, usize>::new(),
            |mut m, &t| {
                *m.entry(t).or_default() += 1;
                m
            },
        );
        // Drawn at random, more than half may meet in some instant now and then (about one run in
        // two hundred); in lockstep, all would meet in every one.
        let burst = per_ms.values().copied().max().unwrap_or(0);
        assert!(burst < rs.len(), "all {burst} acked in one instant");
        let crowded = per_ms.values().filter(|&&n| n > rs.len() / 2).count();
        assert!(
            crowded <= 2,
            "{crowded} instants with more than half of {} acking at once",
            rs.len()
        );
        let (lo, hi) = (
            interval.as_millis() as u64 / 2,
            interval.as_millis() as u64 * 3 / 2,
        );
        for (i, times) in acks_at.iter().enumerate() {
            let n = times.len() as u64;
            assert!(
                n >= ms / hi && n <= ms / lo + 1,
                "receiver {i} acked {n} times in {ms} ms"
            );
            for w in times.windows(2) {
                assert!((lo..=hi).contains(&(w[1] - w[0])), "gap {:?}", w);
            }
            assert!(acked_hwm[i] + hi >= ms, "the last ack is recent");
        }
    }

    #[test]
    fn duplicates_and_overlaps_are_trimmed() {
        let now = Instant::now();
        let mut r = Receiver::with_resume(ReceiverConfig::default(), &[(0, 7, 0)]);
        r.on_batch(batch(1, 4), now);
        assert!(applied_ranges(&r.on_batch(batch(1, 4), now)).is_empty());
        let cmds = r.on_batch(batch(3, 6), now);
        match &cmds[0] {
            RxCommand::Apply(b) => {
                assert_eq!((b.first_seq, b.last_seq), (5, 6));
                assert_eq!(b.entries.len(), 2);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn heartbeat_reveals_a_lost_tail() {
        let now = Instant::now();
        let mut r = Receiver::with_resume(ReceiverConfig::default(), &[(0, 7, 0)]);
        r.on_batch(batch(1, 5), now);
        r.on_applied(0, 7, 5, now);
        // Batch 6..=8 was lost; then traffic stopped. Only the heartbeat tells.
        let hb = pb::Heartbeat {
            heads: vec![pb::ShardHead {
                shard: 0,
                epoch: 7,
                head: 8,
                head_time_us: 0,
                upstream_age_ms: 0,
                held: 8,
                shard_count: 0,
            }],
            ..Default::default()
        };
        assert_eq!(
            r.on_heartbeat(&hb, now),
            vec![RxCommand::Nack(pb::Nack {
                shard: 0,
                from_seq: 6,
                to_seq: 8
            })]
        );
        assert!(
            r.on_heartbeat(&hb, now).is_empty(),
            "not repeated before retry"
        );
        let later = now + Duration::from_secs(1);
        assert_eq!(r.tick(later).len(), 1, "repeated after nack_retry");
    }

    /// What the sender holds but has not sent is nothing to repair (no Nack), but the receiver is
    /// not caught up until it has applied that far; an absurd figure is ignored.
    #[test]
    fn what_the_sender_holds_back_counts_as_not_caught_up_and_is_not_nacked() {
        let now = Instant::now();
        let mut r = Receiver::with_resume(ReceiverConfig::default(), &[(0, 7, 0)]);
        r.on_batch(batch(1, 5), now);
        r.on_applied(0, 7, 5, now);
        let hb = |held| pb::Heartbeat {
            heads: vec![pb::ShardHead {
                shard: 0,
                epoch: 7,
                head: 5,
                held,
                ..Default::default()
            }],
            ..Default::default()
        };
        assert!(r.on_heartbeat(&hb(9), now).is_empty(), "nothing was lost");
        assert_eq!(r.progress(), vec![(0, 7, 5, 9)]);
        assert!(r.on_heartbeat(&hb(u64::MAX), now).is_empty());
        assert_eq!(r.progress(), vec![(0, 7, 5, 9)], "absurd: ignored");
        assert!(r.on_heartbeat(&hb(3), now).is_empty());
        assert_eq!(r.progress(), vec![(0, 7, 5, 9)], "never goes back");
        r.on_batch(batch(6, 9), now);
        r.on_applied(0, 7, 9, now);
        assert_eq!(r.progress(), vec![(0, 7, 9, 9)], "caught up");
    }

    #[test]
    fn reset_flushes_and_resumes_at_the_given_point() {
        let now = Instant::now();
        let mut r = Receiver::with_resume(ReceiverConfig::default(), &[(0, 7, 0)]);
        r.on_batch(batch(1, 5), now);
        r.on_applied(0, 7, 5, now);
        let cmds = r.on_reset(&pb::Reset {
            shard: 0,
            epoch: 9,
            hwm: 100,
            reason: "range gone".into(),
        });
        assert!(matches!(
            cmds[0],
            RxCommand::Flush {
                hwm: 100,
                epoch: 9,
                ..
            }
        ));
        assert_eq!(r.resume_points()[0].hwm, 0, "not applied until flushed");
        r.on_applied(0, 9, 100, now);
        assert_eq!(
            r.resume_points(),
            vec![pb::ResumePoint {
                shard: 0,
                epoch: 9,
                hwm: 100
            }]
        );
        // A straggler of the old epoch changes nothing.
        let mut old = batch(6, 6);
        old.epoch = 7;
        assert!(r.on_batch(old, now).is_empty());
    }

    /// A Reset to an older epoch is passed over; told to take it (the shard's log now), the
    /// receiver flushes into it and goes on there.
    #[test]
    fn an_older_epoch_is_taken_only_when_told_to() {
        let now = Instant::now();
        let mut r = Receiver::with_resume(ReceiverConfig::default(), &[(0, 9, 5)]);
        let older = pb::Reset {
            shard: 0,
            epoch: 7,
            hwm: 40,
            reason: "a new log".into(),
        };
        assert!(r.on_reset(&older).is_empty());
        assert_eq!(r.applied(0), Some((9, 5)));
        let cmds = r.adopt(&older);
        assert!(matches!(
            cmds[..],
            [RxCommand::Flush {
                epoch: 7,
                hwm: 40,
                ..
            }]
        ));
        r.on_applied(0, 7, 40, now);
        let mut next = batch(41, 42);
        next.epoch = 7;
        assert!(r
            .on_batch(next, now)
            .iter()
            .any(|c| matches!(c, RxCommand::Apply(b) if b.last_seq == 42)));
        assert!(r
            .adopt(&pb::Reset {
                hwm: u64::MAX,
                ..older
            })
            .is_empty());
    }

    #[test]
    fn absurd_seqs_from_the_network_are_ignored() {
        let now = Instant::now();
        let mut r = Receiver::with_resume(ReceiverConfig::default(), &[(0, 7, 5)]);
        let reset = pb::Reset {
            shard: 0,
            epoch: 8,
            hwm: u64::MAX,
            reason: String::new(),
        };
        assert!(r.on_reset(&reset).is_empty());
        let hb = pb::Heartbeat {
            heads: vec![pb::ShardHead {
                shard: 0,
                epoch: 7,
                head: u64::MAX,
                head_time_us: 0,
                upstream_age_ms: 0,
                held: u64::MAX,
                shard_count: 0,
            }],
            ..Default::default()
        };
        assert!(r.on_heartbeat(&hb, now).is_empty());
        assert_eq!(r.applied(0), Some((7, 5)));
    }

    #[test]
    fn a_receiver_without_a_position_joins_at_the_announced_head() {
        let now = Instant::now();
        let mut r = Receiver::new(ReceiverConfig::default());
        let hb = pb::Heartbeat {
            heads: vec![pb::ShardHead {
                shard: 3,
                epoch: 7,
                head: 40,
                head_time_us: 0,
                upstream_age_ms: 0,
                held: 40,
                shard_count: 0,
            }],
            ..Default::default()
        };
        assert_eq!(
            r.on_heartbeat(&hb, now),
            vec![RxCommand::Join {
                shard: 3,
                epoch: 7,
                hwm: 40
            }]
        );
        assert!(
            r.resume_points().iter().all(|p| p.hwm == 0),
            "not applied until joined"
        );
        r.on_applied(3, 7, 40, now);
        assert_eq!(
            r.resume_points(),
            vec![pb::ResumePoint {
                shard: 3,
                epoch: 7,
                hwm: 40
            }]
        );
        // A first batch on an unknown shard joins just before it.
        let mut b = batch(11, 12);
        b.shard = 4;
        let cmds = r.on_batch(b, now);
        assert!(matches!(
            cmds[0],
            RxCommand::Join {
                shard: 4,
                hwm: 10,
                ..
            }
        ));
        assert!(matches!(cmds[1], RxCommand::Apply(_)));
    }

    #[test]
    fn newer_epoch_in_a_batch_flushes() {
        let now = Instant::now();
        let mut r = Receiver::with_resume(ReceiverConfig::default(), &[(0, 7, 10)]);
        let mut b = batch(1, 2);
        b.epoch = 8;
        let cmds = r.on_batch(b, now);
        assert!(matches!(
            cmds[0],
            RxCommand::Flush {
                epoch: 8,
                hwm: 0,
                ..
            }
        ));
        assert_eq!(applied_ranges(&cmds), vec![(1, 2)]);
    }
}
