//! Model-based tests: a receiver and two senders of the same shard, joined by a simulated network
//! that loses, duplicates and reorders messages, with reconnects to the *other* sender resuming from
//! the high-water mark. Whatever the schedule, once the faults stop the receiver must have applied
//! exactly what in-order delivery gives, in per-key order, and never acked a seq it had not applied.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use proptest::prelude::*;

use super::receiver::{Receiver, ReceiverConfig, RxCommand};
use super::sender::{NextRange, Sender, SenderConfig, ShardView, TxCommand};
use crate::pb;
use crate::types::{Batch, Filter, Invalidation, Seq};

const EPOCH: u64 = 3;

/// One sender's copy of the shard log, cut into batches its own way.
struct Source {
    batches: Vec<Batch>,
}

impl Source {
    fn new(log: &[Invalidation], cuts: &[usize]) -> Self {
        let mut batches = Vec::new();
        let mut i = 0;
        let mut c = 0;
        while i < log.len() {
            let n = cuts[c % cuts.len()].max(1).min(log.len() - i);
            c += 1;
            let entries = log[i..i + n].to_vec();
            batches.push(Batch {
                shard: 0,
                epoch: EPOCH,
                first_seq: entries[0].seq,
                last_seq: entries[n - 1].seq,
                entries,
            });
            i += n;
        }
        Source { batches }
    }

    fn view(&self) -> ShardView {
        ShardView {
            shard: 0,
            epoch: EPOCH,
            oldest: 1,
            head: self.batches.last().map_or(0, |b| b.last_seq),
            held_from: 1,
            head_time_us: 0,
        }
    }

    /// Batches covering `[from, ..]` within `budget` (at least one), sent whole as a relay sends
    /// its shared encodings: the first may start before `from`, and the receiver trims it.
    fn read(&self, from: Seq, budget: usize) -> Vec<Batch> {
        let mut out = Vec::new();
        let mut used = 0;
        for b in self.batches.iter().filter(|b| b.last_seq >= from) {
            let size = 16 + 8 * b.entries.len();
            if !out.is_empty() && used + size > budget {
                break;
            }
            used += size;
            out.push(b.clone());
        }
        out
    }
}

#[derive(Clone, Debug)]
enum Down {
    Batch(Batch),
    Reset(pb::Reset),
    Heartbeat(pb::Heartbeat),
}

#[derive(Clone, Debug)]
enum Up {
    Ack(pb::Ack),
    Nack(pb::Nack),
}

#[derive(Clone, Debug)]
enum Step {
    Pump,
    Deliver(usize),
    Drop(usize),
    Duplicate(usize),
    DeliverUp(usize),
    DropUp(usize),
    Tick(u64),
    Reconnect,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => Just(Step::Pump),
        6 => any::<usize>().prop_map(Step::Deliver),
        1 => any::<usize>().prop_map(Step::Drop),
        1 => any::<usize>().prop_map(Step::Duplicate),
        3 => any::<usize>().prop_map(Step::DeliverUp),
        1 => any::<usize>().prop_map(Step::DropUp),
        2 => (1u64..800).prop_map(Step::Tick),
        1 => Just(Step::Reconnect),
    ]
}

struct Sim<'a> {
    sources: [&'a Source; 2],
    active: usize,
    sender: Sender,
    receiver: Receiver,
    filter: Filter,
    down: VecDeque<Down>,
    up: VecDeque<Up>,
    now: Instant,
    applied: Vec<Invalidation>,
    applied_hwm: Seq,
    flushes: usize,
    violations: Vec<String>,
}

fn sender_cfg() -> SenderConfig {
    SenderConfig {
        window_bytes: 256,
        retransmit_timeout: Duration::from_millis(1000),
        heartbeat_interval: Duration::from_millis(300),
        peer_timeout: Duration::from_secs(3600),
        nack_guard: Duration::from_millis(100),
    }
}

impl<'a> Sim<'a> {
    fn new(sources: [&'a Source; 2], filter: Filter) -> Self {
        let now = Instant::now();
        let receiver = Receiver::with_resume(ReceiverConfig::default(), &[(0, EPOCH, 0)]);
        let mut sim = Sim {
            sources,
            active: 0,
            sender: Sender::new(sender_cfg(), now),
            receiver,
            filter,
            down: VecDeque::new(),
            up: VecDeque::new(),
            now,
            applied: Vec::new(),
            applied_hwm: 0,
            flushes: 0,
            violations: Vec::new(),
        };
        sim.hello();
        sim
    }

    fn hello(&mut self) {
        let view = self.sources[self.active].view();
        let resume = self.receiver.resume_points();
        self.sender = Sender::new(sender_cfg(), self.now);
        for c in self.sender.on_hello(&resume, &[view], self.now) {
            self.tx(c);
        }
    }

    fn tx(&mut self, c: TxCommand) {
        match c {
            TxCommand::Reset(r) => self.down.push_back(Down::Reset(r)),
            TxCommand::Heartbeat(heads, _) => self.down.push_back(Down::Heartbeat(pb::Heartbeat {
                heads,
                ..Default::default()
            })),
            TxCommand::Disconnect(_) => {}
        }
    }

    fn pump(&mut self) {
        let src = self.sources[self.active];
        let view = src.view();
        loop {
            match self.sender.next_range(&view, self.now) {
                NextRange::Send { from, budget, .. } => {
                    for b in src.read(from, budget) {
                        let b = b.filtered(&self.filter);
                        let size = 16 + 8 * b.entries.len();
                        self.sender.on_sent(0, b.last_seq, size, self.now);
                        self.down.push_back(Down::Batch(b));
                    }
                }
                NextRange::Reset(c) => self.tx(c),
                NextRange::Idle | NextRange::WindowFull => break,
            }
        }
    }

    fn rx(&mut self, cmds: Vec<RxCommand>) {
        for c in cmds {
            match c {
                RxCommand::Apply(b) => {
                    for e in &b.entries {
                        if e.seq <= self.applied_hwm {
                            self.violations
                                .push(format!("seq {} applied after {}", e.seq, self.applied_hwm));
                        }
                        self.applied_hwm = e.seq;
                        self.applied.push(e.clone());
                    }
                    self.applied_hwm = self.applied_hwm.max(b.last_seq);
                    if let Some(a) = self
                        .receiver
                        .on_applied(b.shard, b.epoch, b.last_seq, self.now)
                    {
                        self.rx(vec![a]);
                    }
                }
                RxCommand::Flush { .. } => self.flushes += 1,
                RxCommand::Join { .. } => {}
                RxCommand::Ack(a) => {
                    if a.hwm > self.applied_hwm {
                        self.violations
                            .push(format!("acked {} but applied {}", a.hwm, self.applied_hwm));
                    }
                    self.up.push_back(Up::Ack(a));
                }
                RxCommand::Nack(n) => self.up.push_back(Up::Nack(n)),
            }
        }
    }

    fn deliver_down(&mut self, m: Down) {
        let cmds = match m {
            Down::Batch(b) => self.receiver.on_batch(b, self.now),
            Down::Reset(r) => self.receiver.on_reset(&r),
            Down::Heartbeat(h) => self.receiver.on_heartbeat(&h, self.now),
        };
        self.rx(cmds);
    }

    fn deliver_up(&mut self, m: Up) {
        match m {
            Up::Ack(a) => {
                self.sender.on_ack(&a, self.now);
            }
            Up::Nack(n) => {
                self.sender.on_nack(&n, self.now);
            }
        }
    }

    fn tick(&mut self, ms: u64) {
        self.now += Duration::from_millis(ms);
        let view = self.sources[self.active].view();
        for c in self.sender.tick(&[view], self.now) {
            self.tx(c);
        }
        let cmds = self.receiver.tick(self.now);
        self.rx(cmds);
    }

    fn run(&mut self, s: &Step) {
        match *s {
            Step::Pump => self.pump(),
            Step::Deliver(i) if !self.down.is_empty() => {
                let m = self
                    .down
                    .remove(i % self.down.len())
                    .expect("index in range");
                self.deliver_down(m);
            }
            Step::Drop(i) if !self.down.is_empty() => {
                self.down.remove(i % self.down.len());
            }
            Step::Duplicate(i) if !self.down.is_empty() => {
                let m = self.down[i % self.down.len()].clone();
                self.down.push_back(m);
            }
            Step::DeliverUp(i) if !self.up.is_empty() => {
                let m = self.up.remove(i % self.up.len()).expect("index in range");
                self.deliver_up(m);
            }
            Step::DropUp(i) if !self.up.is_empty() => {
                self.up.remove(i % self.up.len());
            }
            Step::Tick(ms) => self.tick(ms),
            Step::Reconnect => {
                self.down.clear();
                self.up.clear();
                self.active = 1 - self.active;
                self.receiver.on_reconnect();
                self.hello();
            }
            _ => {}
        }
    }

    /// Faults over: a clean network, in-order delivery, time passing.
    fn heal(&mut self) {
        for _ in 0..10_000 {
            self.pump();
            while let Some(m) = self.down.pop_front() {
                self.deliver_down(m);
            }
            while let Some(m) = self.up.pop_front() {
                self.deliver_up(m);
            }
            let head = self.sources[self.active].view().head;
            let done = self.receiver.applied(0).map(|(_, h)| h) == Some(head)
                && self.sender.acked(0) == Some(head);
            if done {
                return;
            }
            self.tick(100);
        }
    }
}

fn log_strategy() -> impl Strategy<Value = Vec<Invalidation>> {
    prop::collection::vec((0u8..6, any::<bool>()), 1..120).prop_map(|keys| {
        keys.into_iter()
            .enumerate()
            .map(|(i, (k, user))| {
                let prefix = if user { "user:" } else { "item:" };
                Invalidation {
                    key: Bytes::from(format!("{prefix}{k}")),
                    seq: i as u64 + 1,
                    source_version: Some(i as u64 + 1),
                    ..Invalidation::key("")
                }
            })
            .collect()
    })
}

fn check(
    log: Vec<Invalidation>,
    cuts_a: Vec<usize>,
    cuts_b: Vec<usize>,
    steps: Vec<Step>,
    filter: Filter,
) -> Result<(), TestCaseError> {
    let a = Source::new(&log, &cuts_a);
    let b = Source::new(&log, &cuts_b);
    let mut sim = Sim::new([&a, &b], filter.clone());
    for s in &steps {
        sim.run(s);
    }
    sim.heal();
    prop_assert!(sim.violations.is_empty(), "{:?}", sim.violations);
    prop_assert_eq!(sim.flushes, 0, "nothing was gone, so nothing may reset");
    let expected: Vec<Seq> = log
        .iter()
        .filter(|e| filter.accepts(e))
        .map(|e| e.seq)
        .collect();
    let got: Vec<Seq> = sim.applied.iter().map(|e| e.seq).collect();
    prop_assert_eq!(got, expected, "exactly the in-order entries, each once");
    // Per-key order: versions of each key only grow.
    let mut last: HashMap<Bytes, u64> = HashMap::new();
    for e in &sim.applied {
        let v = e.source_version.unwrap_or(0);
        if let Some(prev) = last.insert(e.key.clone(), v) {
            prop_assert!(
                prev < v,
                "key {:?} went from version {} to {}",
                e.key,
                prev,
                v
            );
        }
    }
    prop_assert_eq!(sim.receiver.applied(0), Some((EPOCH, log.len() as u64)));
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6000, ..ProptestConfig::default() })]

    #[test]
    fn any_schedule_converges_to_in_order_delivery(
        log in log_strategy(),
        cuts_a in prop::collection::vec(1usize..12, 1..8),
        cuts_b in prop::collection::vec(1usize..12, 1..8),
        steps in prop::collection::vec(step(), 0..250),
    ) {
        check(log, cuts_a, cuts_b, steps, Filter::default())?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]

    #[test]
    fn filtered_links_keep_contiguous_ranges(
        log in log_strategy(),
        cuts_a in prop::collection::vec(1usize..12, 1..8),
        cuts_b in prop::collection::vec(1usize..12, 1..8),
        steps in prop::collection::vec(step(), 0..250),
    ) {
        let filter = Filter { prefixes: vec![Bytes::from_static(b"user:")], ring: None };
        check(log, cuts_a, cuts_b, steps, filter)?;
    }
}

/// The last batch is lost and traffic stops: only the heartbeat's head reveals it.
#[test]
fn dropped_final_batch_is_recovered_through_a_heartbeat() {
    let log: Vec<Invalidation> = (1..=10)
        .map(|s| Invalidation {
            seq: s,
            ..Invalidation::key(format!("k{s}"))
        })
        .collect();
    let src = Source::new(&log, &[5]);
    let mut sim = Sim::new([&src, &src], Filter::default());
    sim.pump();
    assert_eq!(sim.down.len(), 2);
    let first = sim.down.pop_front().unwrap();
    sim.deliver_down(first);
    sim.down.clear(); // the final batch (6..=10) is lost
    while let Some(m) = sim.up.pop_front() {
        sim.deliver_up(m);
    }
    assert_eq!(sim.receiver.applied(0), Some((EPOCH, 5)));
    // Time passes; the sender's heartbeat carries head 10.
    sim.tick(300);
    let hb = sim.down.pop_front().unwrap();
    assert!(matches!(&hb, Down::Heartbeat(h) if h.heads[0].head == 10));
    sim.deliver_down(hb);
    let nack = sim.up.pop_back().unwrap();
    assert!(matches!(&nack, Up::Nack(n) if n.from_seq == 6 && n.to_seq == 10));
    sim.deliver_up(nack);
    sim.pump();
    while let Some(m) = sim.down.pop_front() {
        sim.deliver_down(m);
    }
    assert_eq!(sim.receiver.applied(0), Some((EPOCH, 10)));
    assert_eq!(sim.applied.len(), 10);
}

/// A receiver too far behind a sender whose ring moved on gets a Reset, flushes, and goes on.
#[test]
fn lagging_receiver_is_reset_then_follows_the_head() {
    let now = Instant::now();
    let mut sender = Sender::new(SenderConfig::default(), now);
    let mut rx = Receiver::with_resume(ReceiverConfig::default(), &[(0, EPOCH, 2)]);
    let view = ShardView {
        shard: 0,
        epoch: EPOCH,
        oldest: 50,
        head: 80,
        held_from: 50,
        head_time_us: 0,
    };
    let cmds = sender.on_hello(&rx.resume_points(), &[view], now);
    let TxCommand::Reset(r) = &cmds[0] else {
        panic!("{cmds:?}")
    };
    let out = rx.on_reset(r);
    assert!(matches!(out[0], RxCommand::Flush { hwm: 80, .. }));
    rx.on_applied(0, EPOCH, 80, now);
    let b = Batch {
        shard: 0,
        epoch: EPOCH,
        first_seq: 81,
        last_seq: 81,
        entries: vec![],
    };
    assert!(matches!(rx.on_batch(b, now)[0], RxCommand::Apply(_)));
}
