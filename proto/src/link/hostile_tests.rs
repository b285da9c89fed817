//! What a broken or hostile peer can send, thrown at the decoders and at both state machines:
//! nothing panics, and what the receiver hands out for applying stays in order and is acked only
//! once applied.
//!
//! Inputs are as the runtimes pass them on: raw bytes to the decoders; to the receiver, batches
//! that passed [`Batch::check_pb`] (the runtime refuses the rest) and resets and heartbeats as they
//! came; to the sender, resume points as the Hello check lets through and acks and nacks as they
//! came.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use proptest::prelude::*;
use prost::Message;

use super::receiver::{Receiver, ReceiverConfig, RxCommand};
use super::retransmit::decompress;
use super::sender::{NextRange, Sender, SenderConfig, ShardView, TxCommand};
use crate::pb;
use crate::types::{Batch, Epoch, Seq, ShardId, MAX_SEQ, MAX_SHARDS};

/// Seqs where arithmetic breaks: small ones, the bound and its neighbours, the top of u64.
fn num() -> impl Strategy<Value = u64> {
    prop_oneof![
        6 => 0u64..24,
        1 => (MAX_SEQ - 3)..=(MAX_SEQ + 3),
        1 => (u64::MAX - 3)..=u64::MAX,
        1 => any::<u64>(),
    ]
}

fn shard() -> impl Strategy<Value = ShardId> {
    prop_oneof![16 => 0u32..3, 1 => Just(MAX_SHARDS - 1), 1 => Just(MAX_SHARDS), 1 => Just(u32::MAX)]
}

fn epoch() -> impl Strategy<Value = Epoch> {
    prop_oneof![8 => 0u64..4, 1 => Just(u64::MAX)]
}

fn entry() -> impl Strategy<Value = pb::Invalidation> {
    (
        prop::collection::vec(any::<u8>(), 0..6),
        -1i32..4,
        num(),
        prop::option::of(any::<u64>()),
        any::<u64>(),
        prop::option::of(prop::collection::vec(any::<u8>(), 0..70)),
    )
        .prop_map(
            |(key, kind, seq, source_version, t, trace)| pb::Invalidation {
                key: Bytes::from(key),
                kind,
                seq,
                source_version,
                publish_time_us: t,
                trace_id: trace.map(Bytes::from),
            },
        )
}

fn wire_batch() -> impl Strategy<Value = pb::Batch> {
    (
        shard(),
        epoch(),
        num(),
        num(),
        prop::collection::vec(entry(), 0..5),
        prop_oneof![Just(0u64), any::<u64>()],
    )
        .prop_map(
            |(shard, epoch, first_seq, last_seq, entries, base)| pb::Batch {
                shard,
                epoch,
                first_seq,
                last_seq,
                entries,
                base_time_us: base,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    /// Any bytes, and any damage to a real batch (bytes flipped, cut short, or zstd frames of
    /// them), decode to an error or to a batch whose range and entries hold together.
    #[test]
    fn bytes_from_the_network_decode_or_are_refused(
        b in wire_batch(),
        flips in prop::collection::vec((any::<usize>(), any::<u8>()), 0..4),
        cut in any::<usize>(),
        noise in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut bytes = b.encode_to_vec();
        let n = bytes.len().max(1);
        for (at, x) in flips {
            if let Some(byte) = bytes.get_mut(at % n) {
                *byte ^= x;
            }
        }
        bytes.truncate(cut % (n + 1));
        let compressed = zstd::bulk::compress(&bytes, 1).expect("compress");
        let mut candidates = vec![Bytes::from(bytes), Bytes::from(noise.clone())];
        if let Ok(d) = decompress(&compressed) {
            candidates.push(d);
        }
        if let Ok(d) = decompress(&noise) {
            candidates.push(d);
        }
        for bytes in candidates {
            if let Ok(c) = Batch::decode_checked(bytes, 16) {
                let b = &c.batch;
                prop_assert!(1 <= b.first_seq && b.first_seq <= b.last_seq && b.last_seq <= MAX_SEQ);
                prop_assert!(b.shard < MAX_SHARDS);
                let mut prev = b.first_seq - 1;
                for e in &b.entries {
                    prop_assert!(e.seq > prev && e.seq <= b.last_seq, "{e:?} in {b:?}");
                    prop_assert!(!e.key.is_empty() || e.kind == crate::types::Kind::All);
                    prop_assert!(e.key.len() <= 16);
                    prev = e.seq;
                }
            }
        }
    }
}

#[derive(Debug, Clone)]
enum RxEvent {
    Batch(pb::Batch),
    Reset(pb::Reset),
    Heartbeat(Vec<pb::ShardHead>),
    /// The runtime carries out the oldest command it has not confirmed yet.
    ConfirmNext,
    /// A confirmation that matches nothing asked for.
    ConfirmAny(ShardId, Epoch, Seq),
    Tick(u64),
    Reconnect,
}

fn rx_event() -> impl Strategy<Value = RxEvent> {
    let head =
        (shard(), epoch(), num(), num()).prop_map(|(shard, epoch, head, held)| pb::ShardHead {
            shard,
            epoch,
            head,
            held,
            ..Default::default()
        });
    prop_oneof![
        8 => wire_batch().prop_map(RxEvent::Batch),
        1 => (shard(), epoch(), num()).prop_map(|(shard, epoch, hwm)| RxEvent::Reset(pb::Reset {
            shard,
            epoch,
            hwm,
            reason: "test".into(),
        })),
        2 => prop::collection::vec(head, 0..3).prop_map(RxEvent::Heartbeat),
        6 => Just(RxEvent::ConfirmNext),
        1 => (shard(), epoch(), num()).prop_map(|(s, e, q)| RxEvent::ConfirmAny(s, e, q)),
        2 => (0u64..400).prop_map(RxEvent::Tick),
        1 => Just(RxEvent::Reconnect),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    /// Whatever a sender sends, the receiver hands out ranges in order (each starts right after
    /// what it handed out before in that shard, or after a flush's or join's position), acks
    /// no more than the runtime said it applied, keeps state for no shard id out of bounds, and
    /// holds no more out-of-order batches than its bound.
    #[test]
    fn a_receiver_fed_anything_applies_in_order_and_acks_only_what_was_applied(
        events in prop::collection::vec(rx_event(), 0..120),
    ) {
        let t0 = Instant::now();
        let mut now = t0;
        // A bound small enough for these batches to reach it.
        let cfg = ReceiverConfig { max_pending_bytes: 200, ..ReceiverConfig::default() };
        let max_pending = cfg.max_pending_bytes;
        let mut rx = Receiver::new(cfg);
        // Per shard: the epoch and last seq handed out (for applying, or as a flush's position).
        let mut handed: HashMap<ShardId, (Epoch, Seq)> = HashMap::new();
        // The most the runtime confirmed, per shard and epoch.
        let mut confirmed: HashMap<(ShardId, Epoch), Seq> = HashMap::new();
        let mut to_confirm: VecDeque<(ShardId, Epoch, Seq)> = VecDeque::new();
        for ev in events {
            let cmds = match ev {
                RxEvent::Batch(p) => match Batch::check_pb(p, 16) {
                    Ok(c) => rx.on_batch(c.batch, now),
                    Err(_) => Vec::new(),
                },
                RxEvent::Reset(r) => rx.on_reset(&r),
                RxEvent::Heartbeat(heads) => rx.on_heartbeat(
                    &pb::Heartbeat { heads, ..Default::default() },
                    now,
                ),
                RxEvent::ConfirmNext => match to_confirm.pop_front() {
                    Some((s, e, q)) => {
                        let c = confirmed.entry((s, e)).or_default();
                        *c = (*c).max(q);
                        rx.on_applied(s, e, q, now).into_iter().collect()
                    }
                    None => Vec::new(),
                },
                RxEvent::ConfirmAny(s, e, q) => {
                    // Not counted as applied: the receiver must not take it as such either.
                    let before = rx.applied(s);
                    let out: Vec<_> = rx.on_applied(s, e, q, now).into_iter().collect();
                    if rx.applied(s) != before {
                        // It took it: only if it matches what it handed out in that epoch.
                        let (he, hq) = handed.get(&s).copied().unwrap_or_default();
                        prop_assert!(he == e && q <= hq, "took ({s}, {e}, {q}), handed out {:?}", handed.get(&s));
                        let c = confirmed.entry((s, e)).or_default();
                        *c = (*c).max(q);
                    }
                    out
                }
                RxEvent::Tick(ms) => {
                    now += Duration::from_millis(ms);
                    rx.tick(now)
                }
                RxEvent::Reconnect => {
                    rx.on_reconnect();
                    // What is handed out next follows what was confirmed applied: the rest
                    // comes again (duplicates are harmless, gaps are not).
                    for (s, h) in handed.iter_mut() {
                        if let Some(applied) = rx.applied(*s) {
                            *h = applied;
                        }
                    }
                    to_confirm.clear();
                    prop_assert_eq!(rx.pending_bytes(), 0);
                    Vec::new()
                }
            };
            prop_assert!(rx.pending_bytes() <= max_pending);
            prop_assert_eq!(rx.pending_bytes(), rx.pending_bytes_counted());
            prop_assert!(rx.progress().iter().all(|p| p.0 < MAX_SHARDS));
            for c in cmds {
                match c {
                    RxCommand::Apply(b) => {
                        let (e, last) = handed.get(&b.shard).copied().unwrap_or_default();
                        prop_assert_eq!(b.epoch, e, "an apply in another epoch than handed out");
                        prop_assert_eq!(b.first_seq, last + 1, "{:?} after {}", (b.first_seq, b.last_seq), last);
                        prop_assert!(b.first_seq <= b.last_seq);
                        let mut prev = last;
                        for x in &b.entries {
                            prop_assert!(x.seq > prev && x.seq <= b.last_seq);
                            prev = x.seq;
                        }
                        handed.insert(b.shard, (b.epoch, b.last_seq));
                        to_confirm.push_back((b.shard, b.epoch, b.last_seq));
                    }
                    RxCommand::Flush { shard, epoch, hwm, .. }
                    | RxCommand::Join { shard, epoch, hwm } => {
                        prop_assert!(hwm <= MAX_SEQ);
                        handed.insert(shard, (epoch, hwm));
                        to_confirm.push_back((shard, epoch, hwm));
                    }
                    RxCommand::Ack(a) => {
                        let c = confirmed.get(&(a.shard, a.epoch)).copied().unwrap_or(0);
                        prop_assert!(a.hwm <= c, "acked {a:?}, applied only {c}");
                    }
                    RxCommand::Nack(n) => {
                        prop_assert!(1 <= n.from_seq && n.from_seq <= n.to_seq, "{n:?}");
                    }
                }
            }
        }
    }
}

#[derive(Debug, Clone)]
enum TxEvent {
    Hello(Vec<pb::ResumePoint>),
    Ack(pb::Ack),
    Nack(pb::Nack),
    Probe(u64),
    /// The shard's log grows by this many seqs.
    Grow(usize, u64),
    /// The shard's oldest moves up (retention), by this many.
    Trim(usize, u64),
    /// The shard's log is replaced.
    NewEpoch(usize),
    /// The runtime asks what to send and sends part or all of it.
    Send(usize, u64, usize),
    Gone(usize),
    Tick(u64),
}

fn tx_event() -> impl Strategy<Value = TxEvent> {
    let point = (shard(), epoch(), num()).prop_map(|(shard, epoch, hwm)| pb::ResumePoint {
        shard,
        epoch,
        // The Hello check refuses resume points beyond the bound.
        hwm: hwm.min(MAX_SEQ),
    });
    prop_oneof![
        1 => prop::collection::vec(point, 0..3).prop_map(TxEvent::Hello),
        4 => (shard(), epoch(), num()).prop_map(|(shard, epoch, hwm)| TxEvent::Ack(pb::Ack { shard, epoch, hwm })),
        2 => (shard(), num(), num()).prop_map(|(shard, from_seq, to_seq)| TxEvent::Nack(pb::Nack { shard, from_seq, to_seq })),
        1 => any::<u64>().prop_map(TxEvent::Probe),
        3 => (0usize..2, 0u64..30).prop_map(|(s, n)| TxEvent::Grow(s, n)),
        1 => (0usize..2, 0u64..30).prop_map(|(s, n)| TxEvent::Trim(s, n)),
        1 => (0usize..2).prop_map(TxEvent::NewEpoch),
        5 => (0usize..2, 0u64..40, 1usize..3000).prop_map(|(s, k, b)| TxEvent::Send(s, k, b)),
        1 => (0usize..2).prop_map(TxEvent::Gone),
        2 => (0u64..3000).prop_map(TxEvent::Tick),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    /// Whatever a receiver says (acks of seqs never sent, nacks of absurd ranges, other epochs),
    /// the sender never panics, asks only for ranges the shard still has, and keeps within the
    /// window.
    #[test]
    fn a_sender_fed_anything_asks_only_for_ranges_that_exist(
        events in prop::collection::vec(tx_event(), 0..150),
    ) {
        let cfg = SenderConfig { window_bytes: 4096, ..SenderConfig::default() };
        let mut now = Instant::now();
        let mut tx = Sender::new(cfg.clone(), now);
        let mut views: Vec<ShardView> = (0..2)
            .map(|shard| ShardView { shard, epoch: 1, oldest: 1, head: 0, held_from: 1, head_time_us: 0 })
            .collect();
        let check = |cmds: Vec<TxCommand>, views: &[ShardView]| -> Result<(), TestCaseError> {
            for c in cmds {
                if let TxCommand::Reset(r) = c {
                    let v = views.iter().find(|v| v.shard == r.shard).expect("a reset of a shard it has");
                    prop_assert_eq!((r.epoch, r.hwm), (v.epoch, v.head));
                }
            }
            Ok(())
        };
        tx.on_hello(&[], &views, now);
        for ev in events {
            match ev {
                TxEvent::Hello(points) => {
                    tx = Sender::new(cfg.clone(), now);
                    let cmds = tx.on_hello(&points, &views, now);
                    check(cmds, &views)?;
                }
                TxEvent::Ack(a) => {
                    tx.on_ack(&a, now);
                }
                TxEvent::Nack(n) => {
                    tx.on_nack(&n, now);
                }
                TxEvent::Probe(p) => tx.on_probe(p),
                TxEvent::Grow(s, n) => views[s].head += n,
                TxEvent::Trim(s, n) => {
                    let v = &mut views[s];
                    v.oldest = (v.oldest + n).min(v.head + 1);
                    v.held_from = v.held_from.max(v.oldest);
                }
                TxEvent::NewEpoch(s) => {
                    let v = &mut views[s];
                    v.epoch += 1;
                    v.oldest = v.head + 1;
                    v.held_from = v.oldest;
                }
                TxEvent::Send(s, k, bytes) => {
                    let v = views[s];
                    match tx.next_range(&v, now) {
                        NextRange::Send { from, to, budget } => {
                            prop_assert!(v.oldest <= from && from <= to && to == v.head, "{from}..{to} of {v:?}");
                            prop_assert!(0 < budget && budget <= cfg.window_bytes);
                            tx.on_sent(v.shard, (from + k).min(to), bytes, now);
                        }
                        NextRange::Reset(c) => check(vec![c], &views)?,
                        NextRange::Idle | NextRange::WindowFull => {}
                    }
                }
                TxEvent::Gone(s) => {
                    let c = tx.on_gone(&views[s], now);
                    check(vec![c], &views)?;
                }
                TxEvent::Tick(ms) => {
                    now += Duration::from_millis(ms);
                    tx.on_heard(now);
                    let cmds = tx.tick(&views, now);
                    check(cmds, &views)?;
                }
            }
        }
    }
}
