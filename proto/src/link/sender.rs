//! The sending end of a link: what to send next to one receiver, within its window, and when to
//! give up on continuity (Reset).

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use crate::pb;
use crate::types::{Epoch, Seq, ShardId};

/// Tunables of a sender.
#[derive(Clone, Debug)]
pub struct SenderConfig {
    /// Unacked bytes allowed in flight to one receiver; beyond it the receiver waits and catches
    /// up from the ring or the log later, without holding anyone else back.
    pub window_bytes: usize,
    /// Go back to the last ack when nothing was acked for this long while data is in flight.
    pub retransmit_timeout: Duration,
    /// Send a heartbeat (heads per shard) this often.
    pub heartbeat_interval: Duration,
    /// Drop a receiver not heard from (no ack, no heartbeat) for this long.
    pub peer_timeout: Duration,
    /// A Nack less than this after the sender last went back on the shard is ignored: the
    /// resend is on its way, and a receiver's Nacks only move forward (each starts past what it
    /// has applied), so the go-back covers it. A receiver repeating Nacks faster than resends can
    /// arrive (a broken or hostile one) thus costs at most one resend of its window per interval.
    /// Shorter than a receiver's own Nack repeat, so a repeat after a lost resend is honoured.
    pub nack_guard: Duration,
}

impl Default for SenderConfig {
    fn default() -> Self {
        SenderConfig {
            window_bytes: 4 << 20,
            retransmit_timeout: Duration::from_secs(2),
            heartbeat_interval: Duration::from_millis(500),
            peer_timeout: Duration::from_secs(10),
            nack_guard: Duration::from_millis(100),
        }
    }
}

/// What the sender holds of a shard right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardView {
    /// The shard.
    pub shard: ShardId,
    /// Its current epoch.
    pub epoch: Epoch,
    /// The lowest seq this sender can still obtain (ring, log, or upstream).
    pub oldest: Seq,
    /// The highest seq it has.
    pub head: Seq,
    /// The first seq it holds in memory: where a receiver without a resume point starts when
    /// the shard appears after its Hello (everything held is news to it).
    pub held_from: Seq,
    /// Publish time of the head entry, µs since the Unix epoch (0 if unknown).
    pub head_time_us: u64,
}

/// What the runtime must do, besides sending the ranges [`Sender::next_range`] asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum TxCommand {
    /// Send this Reset (the receiver flushes the shard and resumes after `hwm`).
    Reset(pb::Reset),
    /// Send a heartbeat with these heads, echoing this probe of the receiver's (0: none).
    Heartbeat(Vec<pb::ShardHead>, u64),
    /// Close the link: the receiver is gone.
    Disconnect(String),
}

#[derive(Debug)]
struct TxShard {
    epoch: Epoch,
    /// Next seq to send.
    next: Seq,
    /// Highest seq the receiver acked.
    acked: Seq,
    /// Highest seq sent on this link.
    sent: Seq,
    /// (last seq, bytes) of each unacked send, oldest first.
    inflight: VecDeque<(Seq, usize)>,
    inflight_bytes: usize,
    /// Last time an ack moved forward (or the first send after quiet).
    last_progress: Instant,
    /// When the sender last went back (Nack or timeout).
    went_back: Option<Instant>,
}

/// The sender state machine of one link (one receiver), over every shard the sender serves.
#[derive(Debug)]
pub struct Sender {
    cfg: SenderConfig,
    shards: BTreeMap<ShardId, TxShard>,
    /// The receiver's resume points, for shards this sender learns of after the Hello.
    resume: Vec<pb::ResumePoint>,
    last_heartbeat: Option<Instant>,
    /// The receiver's newest probe.
    echo: u64,
    last_heard: Instant,
    resets: u64,
    retransmits: u64,
}

impl Sender {
    /// A sender for a receiver that has not said hello yet.
    pub fn new(cfg: SenderConfig, now: Instant) -> Self {
        Sender {
            cfg,
            shards: BTreeMap::new(),
            resume: Vec::new(),
            last_heartbeat: None,
            echo: 0,
            last_heard: now,
            resets: 0,
            retransmits: 0,
        }
    }

    /// Resets sent on this link.
    pub fn resets(&self) -> u64 {
        self.resets
    }

    /// Go-backs (Nack or timeout) on this link.
    pub fn retransmits(&self) -> u64 {
        self.retransmits
    }

    /// Highest seq acked by the receiver for a shard.
    pub fn acked(&self, shard: ShardId) -> Option<Seq> {
        self.shards.get(&shard).map(|s| s.acked)
    }

    /// The receiver said hello: decide per shard where to start, or to Reset it.
    ///
    /// Rules: same epoch and `hwm + 1` still obtainable → replay from there (also when the receiver
    /// is ahead of us: we wait until we catch up). No resume point → start at the head. Another
    /// epoch, or a range that is gone → Reset to the head.
    pub fn on_hello(
        &mut self,
        resume: &[pb::ResumePoint],
        views: &[ShardView],
        now: Instant,
    ) -> Vec<TxCommand> {
        self.last_heard = now;
        self.resume = resume.to_vec();
        let mut out = Vec::new();
        for v in views {
            if let Some(c) = self.start_shard(v, now, false) {
                out.push(c);
            }
        }
        out
    }

    /// Where a shard starts on this link, from the receiver's resume point.
    fn start_shard(&mut self, v: &ShardView, now: Instant, late: bool) -> Option<TxCommand> {
        let mut out = None;
        {
            let point = self.resume.iter().find(|p| p.shard == v.shard).cloned();
            let next = match point {
                None if late => v.held_from.max(1),
                None => v.head + 1,
                Some(p) if p.epoch == v.epoch && p.hwm + 1 >= v.oldest => p.hwm + 1,
                Some(p) if p.epoch == 0 && p.hwm == 0 && v.oldest <= 1 => 1,
                Some(p) => {
                    let reason = if p.epoch != v.epoch {
                        format!("epoch changed ({} -> {})", p.epoch, v.epoch)
                    } else {
                        format!("range from {} is gone (oldest {})", p.hwm + 1, v.oldest)
                    };
                    out = Some(self.reset(v, reason));
                    v.head + 1
                }
            };
            self.shards.insert(v.shard, self.fresh(v.epoch, next, now));
        }
        out
    }

    fn fresh(&self, epoch: Epoch, next: Seq, now: Instant) -> TxShard {
        TxShard {
            epoch,
            next,
            acked: next - 1,
            sent: next - 1,
            inflight: VecDeque::new(),
            inflight_bytes: 0,
            last_progress: now,
            went_back: None,
        }
    }

    fn reset(&mut self, v: &ShardView, reason: String) -> TxCommand {
        self.resets += 1;
        TxCommand::Reset(pb::Reset {
            shard: v.shard,
            epoch: v.epoch,
            hwm: v.head,
            reason,
        })
    }

    /// The range to send next for `view`'s shard, if the window allows: `[from, view.head]`
    /// (the runtime may send less, then reports what it sent with [`Sender::on_sent`]). A range
    /// older than `view.oldest` gets a Reset instead.
    pub fn next_range(&mut self, view: &ShardView, now: Instant) -> NextRange {
        let window = self.cfg.window_bytes;
        let Some(s) = self.shards.get(&view.shard) else {
            // A shard that appeared after the Hello: same rules as at Hello time.
            return match self.start_shard(view, now, true) {
                Some(c) => NextRange::Reset(c),
                None => self.next_range(view, now),
            };
        };
        if s.epoch != view.epoch {
            let cmd = self.reset(
                view,
                format!("epoch changed ({} -> {})", s.epoch, view.epoch),
            );
            let fresh = self.fresh(view.epoch, view.head + 1, now);
            self.shards.insert(view.shard, fresh);
            return NextRange::Reset(cmd);
        }
        if s.next > view.head {
            return NextRange::Idle;
        }
        if s.inflight_bytes >= window {
            return NextRange::WindowFull;
        }
        if s.next < view.oldest {
            let cmd = self.reset(
                view,
                format!("range from {} is gone (oldest {})", s.next, view.oldest),
            );
            let fresh = self.fresh(view.epoch, view.head + 1, now);
            self.shards.insert(view.shard, fresh);
            return NextRange::Reset(cmd);
        }
        NextRange::Send {
            from: s.next,
            to: view.head,
            budget: window - s.inflight_bytes,
        }
    }

    /// The runtime sent `[.., last]` of a shard, `bytes` long.
    pub fn on_sent(&mut self, shard: ShardId, last: Seq, bytes: usize, now: Instant) {
        let Some(s) = self.shards.get_mut(&shard) else {
            return;
        };
        if last < s.next {
            return;
        }
        if s.inflight.is_empty() {
            s.last_progress = now;
        }
        s.next = last + 1;
        s.sent = s.sent.max(last);
        s.inflight.push_back((last, bytes));
        s.inflight_bytes += bytes;
    }

    /// The range the sender could not obtain after all (e.g. upstream said it is gone): Reset.
    pub fn on_gone(&mut self, view: &ShardView, now: Instant) -> TxCommand {
        let cmd = self.reset(view, "range is gone upstream".into());
        let fresh = self.fresh(view.epoch, view.head + 1, now);
        self.shards.insert(view.shard, fresh);
        cmd
    }

    /// A cumulative ack arrived; true when it acknowledged more than before.
    pub fn on_ack(&mut self, ack: &pb::Ack, now: Instant) -> bool {
        self.last_heard = now;
        let Some(s) = self.shards.get_mut(&ack.shard) else {
            return false;
        };
        // An ack beyond what we sent comes from a receiver that was ahead of us; not ours to count.
        if ack.epoch != s.epoch || ack.hwm <= s.acked || ack.hwm > s.sent {
            return false;
        }
        s.acked = ack.hwm;
        s.last_progress = now;
        while let Some(&(last, bytes)) = s.inflight.front() {
            if last > ack.hwm {
                break;
            }
            s.inflight.pop_front();
            s.inflight_bytes -= bytes;
        }
        if s.next <= s.acked {
            s.next = s.acked + 1;
        }
        true
    }

    /// The receiver misses `[from, to]`: go back to `from` (receivers drop what they already
    /// have). True when it did; false when the Nack asks for nothing that is not already on its
    /// way again.
    pub fn on_nack(&mut self, nack: &pb::Nack, now: Instant) -> bool {
        self.last_heard = now;
        let Some(s) = self.shards.get_mut(&nack.shard) else {
            return false;
        };
        if nack.from_seq == 0 || nack.from_seq > nack.to_seq || nack.from_seq >= s.next {
            return false;
        }
        if s.went_back
            .is_some_and(|at| now.saturating_duration_since(at) < self.cfg.nack_guard)
        {
            return false;
        }
        go_back(s, nack.from_seq.max(s.acked + 1), now);
        self.retransmits += 1;
        true
    }

    /// Anything arrived from the receiver (it is alive).
    pub fn on_heard(&mut self, now: Instant) {
        self.last_heard = now;
    }

    /// The receiver probed: the next tick answers with a heartbeat echoing the newest probe.
    pub fn on_probe(&mut self, probe_us: u64) {
        if probe_us > self.echo {
            self.echo = probe_us;
            self.last_heartbeat = None;
        }
    }

    /// Time passed: heartbeats, retransmit timeouts, dead receivers.
    pub fn tick(&mut self, views: &[ShardView], now: Instant) -> Vec<TxCommand> {
        let mut out = Vec::new();
        if now.duration_since(self.last_heard) >= self.cfg.peer_timeout {
            out.push(TxCommand::Disconnect(format!(
                "receiver silent for {:?}",
                now.duration_since(self.last_heard)
            )));
            return out;
        }
        let rto = self.cfg.retransmit_timeout;
        for s in self.shards.values_mut() {
            if !s.inflight.is_empty() && now.duration_since(s.last_progress) >= rto {
                let from = s.acked + 1;
                go_back(s, from, now);
                self.retransmits += 1;
            }
        }
        let due = self
            .last_heartbeat
            .is_none_or(|t| now.duration_since(t) >= self.cfg.heartbeat_interval);
        if due {
            self.last_heartbeat = Some(now);
            let heads = views
                .iter()
                .filter_map(|v| {
                    let s = self.shards.get(&v.shard)?;
                    (s.epoch == v.epoch).then_some(pb::ShardHead {
                        shard: v.shard,
                        epoch: v.epoch,
                        head: s.sent,
                        head_time_us: v.head_time_us,
                        // The runtime knows its own upstream and tier; see `BatchSource`.
                        upstream_age_ms: 0,
                        held: v.head,
                        shard_count: 0,
                    })
                })
                .collect();
            out.push(TxCommand::Heartbeat(heads, self.echo));
        }
        out
    }
}

fn go_back(s: &mut TxShard, from: Seq, now: Instant) {
    s.next = from;
    while let Some(&(last, bytes)) = s.inflight.back() {
        // Keep sends wholly before `from`; they are still unacked but need no resend.
        if last < from {
            break;
        }
        s.inflight.pop_back();
        s.inflight_bytes -= bytes;
    }
    s.last_progress = now;
    s.went_back = Some(now);
}

/// The answer of [`Sender::next_range`].
#[derive(Debug, Clone, PartialEq)]
pub enum NextRange {
    /// Nothing new for this receiver.
    Idle,
    /// The receiver's window is full: wait for acks.
    WindowFull,
    /// Send `[from, to]`, at most `budget` bytes (at least one batch).
    Send {
        /// First seq to send.
        from: Seq,
        /// Last seq available.
        to: Seq,
        /// Bytes the window still allows.
        budget: usize,
    },
    /// Send this Reset; the link continues at the head.
    Reset(TxCommand),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(oldest: Seq, head: Seq) -> ShardView {
        ShardView {
            shard: 0,
            epoch: 5,
            oldest,
            head,
            held_from: oldest,
            head_time_us: 0,
        }
    }

    fn point(epoch: Epoch, hwm: Seq) -> pb::ResumePoint {
        pb::ResumePoint {
            shard: 0,
            epoch,
            hwm,
        }
    }

    #[test]
    fn resume_replays_from_hwm() {
        let now = Instant::now();
        let mut s = Sender::new(SenderConfig::default(), now);
        assert!(s
            .on_hello(&[point(5, 40)], &[view(10, 100)], now)
            .is_empty());
        assert!(matches!(
            s.next_range(&view(10, 100), now),
            NextRange::Send {
                from: 41,
                to: 100,
                ..
            }
        ));
    }

    #[test]
    fn gone_range_or_other_epoch_resets_to_head() {
        let now = Instant::now();
        let mut s = Sender::new(SenderConfig::default(), now);
        let cmds = s.on_hello(&[point(5, 3)], &[view(10, 100)], now);
        assert!(matches!(&cmds[0], TxCommand::Reset(r) if r.hwm == 100 && r.epoch == 5));
        assert_eq!(s.next_range(&view(10, 100), now), NextRange::Idle);

        let mut s = Sender::new(SenderConfig::default(), now);
        let cmds = s.on_hello(&[point(4, 50)], &[view(10, 100)], now);
        assert!(matches!(&cmds[0], TxCommand::Reset(r) if r.reason.contains("epoch")));
        assert_eq!(s.resets(), 1);
    }

    #[test]
    fn no_resume_point_starts_at_head_and_ahead_receiver_waits() {
        let now = Instant::now();
        let mut s = Sender::new(SenderConfig::default(), now);
        s.on_hello(&[], &[view(1, 100)], now);
        assert_eq!(s.next_range(&view(1, 100), now), NextRange::Idle);
        assert!(matches!(
            s.next_range(&view(1, 101), now),
            NextRange::Send { from: 101, .. }
        ));

        let mut s = Sender::new(SenderConfig::default(), now);
        s.on_hello(&[point(5, 150)], &[view(1, 100)], now);
        assert_eq!(s.next_range(&view(1, 120), now), NextRange::Idle);
        assert!(matches!(
            s.next_range(&view(1, 151), now),
            NextRange::Send { from: 151, .. }
        ));
    }

    #[test]
    fn window_limits_inflight_and_acks_open_it() {
        let now = Instant::now();
        let cfg = SenderConfig {
            window_bytes: 100,
            ..Default::default()
        };
        let mut s = Sender::new(cfg, now);
        s.on_hello(&[point(5, 0)], &[view(1, 100)], now);
        s.on_sent(0, 10, 60, now);
        s.on_sent(0, 20, 60, now);
        assert_eq!(s.next_range(&view(1, 100), now), NextRange::WindowFull);
        s.on_ack(
            &pb::Ack {
                shard: 0,
                epoch: 5,
                hwm: 10,
            },
            now,
        );
        assert!(matches!(
            s.next_range(&view(1, 100), now),
            NextRange::Send {
                from: 21,
                budget: 40,
                ..
            }
        ));
    }

    #[test]
    fn nack_and_timeout_go_back() {
        let now = Instant::now();
        let mut s = Sender::new(SenderConfig::default(), now);
        s.on_hello(&[point(5, 0)], &[view(1, 100)], now);
        s.on_sent(0, 10, 10, now);
        s.on_sent(0, 20, 10, now);
        s.on_sent(0, 30, 10, now);
        s.on_nack(
            &pb::Nack {
                shard: 0,
                from_seq: 11,
                to_seq: 20,
            },
            now,
        );
        assert!(matches!(
            s.next_range(&view(1, 100), now),
            NextRange::Send { from: 11, .. }
        ));
        s.on_sent(0, 30, 20, now);
        let later = now + Duration::from_secs(3);
        s.on_heard(later);
        s.tick(&[view(1, 100)], later);
        assert!(matches!(
            s.next_range(&view(1, 100), later),
            NextRange::Send { from: 1, .. }
        ));
        assert_eq!(s.retransmits(), 2);
    }

    #[test]
    fn nacks_repeated_faster_than_the_guard_go_back_once() {
        let now = Instant::now();
        let mut s = Sender::new(SenderConfig::default(), now);
        s.on_hello(&[point(5, 0)], &[view(1, 100)], now);
        for last in [10, 20, 30] {
            s.on_sent(0, last, 10, now);
        }
        let nack = |from| pb::Nack {
            shard: 0,
            from_seq: from,
            to_seq: 30,
        };
        assert!(s.on_nack(&nack(11), now));
        s.on_sent(0, 30, 20, now);
        let soon = now + Duration::from_millis(99);
        // The same range, a later one, an earlier one: all on their way already.
        for from in [11, 21, 1] {
            assert!(!s.on_nack(&nack(from), soon), "from {from}");
        }
        assert_eq!(s.next_range(&view(1, 30), soon), NextRange::Idle);
        // A repeat after the guard is answered (the resend may have been lost).
        let later = now + Duration::from_millis(100);
        assert!(s.on_nack(&nack(21), later));
        assert!(matches!(
            s.next_range(&view(1, 30), later),
            NextRange::Send { from: 21, .. }
        ));
        assert_eq!(s.retransmits(), 2);
        // A timeout's go-back counts too.
        s.on_sent(0, 30, 10, later);
        let timeout = later + Duration::from_secs(3);
        s.on_heard(timeout);
        s.tick(&[view(1, 30)], timeout);
        s.on_sent(0, 30, 30, timeout);
        assert!(!s.on_nack(&nack(11), timeout + Duration::from_millis(50)));
        assert_eq!(s.retransmits(), 3);
    }

    #[test]
    fn heartbeat_carries_sent_head_and_silent_peer_is_dropped() {
        let now = Instant::now();
        let mut s = Sender::new(SenderConfig::default(), now);
        s.on_hello(&[point(5, 0)], &[view(1, 100)], now);
        s.on_sent(0, 42, 10, now);
        let cmds = s.tick(&[view(1, 100)], now);
        assert!(matches!(&cmds[0], TxCommand::Heartbeat(h, 0) if h[0].head == 42));
        let cmds = s.tick(&[view(1, 100)], now + Duration::from_secs(11));
        assert!(matches!(cmds[0], TxCommand::Disconnect(_)));
    }

    #[test]
    fn a_probe_is_answered_at_once_and_echoed_until_a_newer_one() {
        let now = Instant::now();
        let mut s = Sender::new(SenderConfig::default(), now);
        s.on_hello(&[point(5, 0)], &[view(1, 100)], now);
        assert!(matches!(
            s.tick(&[view(1, 100)], now)[..],
            [TxCommand::Heartbeat(_, 0)]
        ));
        // Not due again for a heartbeat interval, unless probed.
        let soon = now + Duration::from_millis(10);
        assert!(s.tick(&[view(1, 100)], soon).is_empty());
        s.on_probe(700);
        assert!(matches!(
            s.tick(&[view(1, 100)], soon)[..],
            [TxCommand::Heartbeat(_, 700)]
        ));
        assert!(s.tick(&[view(1, 100)], soon).is_empty(), "answered once");
        // An older probe (reordered, repeated) neither lowers the echo nor asks for an answer.
        s.on_probe(500);
        assert!(s.tick(&[view(1, 100)], soon).is_empty());
        let later = now + Duration::from_secs(1);
        assert!(matches!(
            s.tick(&[view(1, 100)], later)[..],
            [TxCommand::Heartbeat(_, 700)]
        ));
    }

    #[test]
    fn shard_learned_after_hello_honours_the_resume_point() {
        let now = Instant::now();
        let mut s = Sender::new(SenderConfig::default(), now);
        assert!(s.on_hello(&[point(5, 40)], &[], now).is_empty());
        assert!(matches!(
            s.next_range(&view(1, 100), now),
            NextRange::Send { from: 41, .. }
        ));
        // Without a resume point, everything held is news: start at the first held seq.
        let mut s = Sender::new(SenderConfig::default(), now);
        s.on_hello(&[], &[], now);
        assert!(matches!(
            s.next_range(&view(7, 100), now),
            NextRange::Send { from: 7, .. }
        ));
    }

    #[test]
    fn epoch_change_under_a_link_resets_it() {
        let now = Instant::now();
        let mut s = Sender::new(SenderConfig::default(), now);
        s.on_hello(&[point(5, 0)], &[view(1, 100)], now);
        let mut v = view(1, 3);
        v.epoch = 6;
        assert!(matches!(
            s.next_range(&v, now),
            NextRange::Reset(TxCommand::Reset(pb::Reset {
                epoch: 6,
                hwm: 3,
                ..
            }))
        ));
    }
}
