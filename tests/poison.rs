//! Poison pills: a scripted sender (a fake relay on loopback) feeds bad entries to real receivers.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use dci_edge_cache::{EdgeConfig, EdgeNode};
use dci_proto::pb;
use dci_proto::upstream::{self, lock, Applier, FollowOptions, LinkState};
use dci_proto::{Batch, Epoch, Seq, ShardId};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

/// Sends the scripted batches after the Hello, then heartbeats echoing the receiver's probes;
/// ignores acks.
#[derive(Clone)]
struct Scripted {
    batches: Vec<pb::Batch>,
    head: Seq,
    /// What the heartbeats say the sender holds (beyond `head` when it is holding some back).
    held: Seq,
    /// Hostile messages sent before the batches.
    before: Vec<pb::downstream::Msg>,
    /// The tier's shard count, as the heartbeats say it.
    shard_count: u32,
    /// How long after the batches the first heartbeat comes.
    first_heartbeat_after: Duration,
    /// While set, no heartbeat is sent on any stream (the streams stay open).
    silent: Arc<std::sync::atomic::AtomicBool>,
}

#[tonic::async_trait]
impl pb::subscribe_server::Subscribe for Scripted {
    type SubscribeStream = ReceiverStream<Result<pb::Downstream, Status>>;
    async fn subscribe(
        &self,
        req: Request<Streaming<pb::Upstream>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let script = self.clone();
        tokio::spawn(async move {
            let _hello = inbound.message().await;
            for m in script.before {
                if tx.send(Ok(pb::Downstream { msg: Some(m) })).await.is_err() {
                    return;
                }
            }
            for b in script.batches {
                let msg = pb::downstream::Msg::Batch(Bytes::from(b.encode_to_vec()));
                if tx
                    .send(Ok(pb::Downstream { msg: Some(msg) }))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            // Garbage that is not a batch at all must not stop the stream either.
            let junk = pb::downstream::Msg::Batch(Bytes::from_static(b"\x0a\xff\xff\xff\xff"));
            let _ = tx.send(Ok(pb::Downstream { msg: Some(junk) })).await;
            tokio::time::sleep(script.first_heartbeat_after).await;
            // The receiver's newest probe, echoed as a sender does.
            let mut echo = 0;
            loop {
                if script.silent.load(std::sync::atomic::Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                let hb = pb::Heartbeat {
                    heads: vec![pb::ShardHead {
                        shard: 0,
                        epoch: 1,
                        head: script.head,
                        head_time_us: 0,
                        upstream_age_ms: 0,
                        held: script.held,
                        shard_count: script.shard_count,
                    }],
                    echo_us: echo,
                    ..Default::default()
                };
                if tx
                    .send(Ok(pb::Downstream {
                        msg: Some(pb::downstream::Msg::Heartbeat(hb)),
                    }))
                    .await
                    .is_err()
                {
                    return;
                }
                while let Ok(Ok(Some(m))) =
                    tokio::time::timeout(Duration::from_millis(100), inbound.message()).await
                {
                    if let Some(pb::upstream::Msg::Heartbeat(h)) = m.msg {
                        echo = echo.max(h.probe_us);
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// An edge (`cfg`, on a port of its own) following a sender that plays `script`; and what stops
/// the sender.
async fn edge_behind(script: Scripted, cfg: EdgeConfig) -> (EdgeNode, watch::Sender<bool>) {
    let (url, stop) = serve(script).await;
    (edge_following(url, cfg).await, stop)
}

/// An edge (`cfg`, on a port of its own) following the sender at `url`.
async fn edge_following(url: String, cfg: EdgeConfig) -> EdgeNode {
    EdgeNode::start(EdgeConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        relays: vec![url],
        ..cfg
    })
    .await
    .unwrap()
}

async fn serve(script: Scripted) -> (String, watch::Sender<bool>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, mut rx) = watch::channel(false);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(pb::subscribe_server::SubscribeServer::new(script))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
                let _ = rx.wait_for(|s| *s).await;
            }),
    );
    (url, stop)
}

fn entry(seq: Seq, key: &str, kind: i32) -> pb::Invalidation {
    pb::Invalidation {
        key: Bytes::from(key.to_string()),
        kind,
        seq,
        ..Default::default()
    }
}

fn script() -> Scripted {
    let key = pb::Kind::Key as i32;
    Scripted {
        batches: vec![
            pb::Batch {
                shard: 0,
                epoch: 1,
                first_seq: 1,
                last_seq: 4,
                entries: vec![
                    entry(1, "a", key),
                    entry(2, "poison", 99),
                    entry(3, "", key),
                    entry(4, "boom", key),
                ],
                base_time_us: 0,
            },
            pb::Batch {
                shard: 0,
                epoch: 1,
                first_seq: 5,
                last_seq: 5,
                entries: vec![entry(5, "after", key)],
                base_time_us: 0,
            },
        ],
        head: 5,
        held: 5,
        before: Vec::new(),
        shard_count: 1,
        first_heartbeat_after: Duration::ZERO,
        silent: Default::default(),
    }
}

/// A coordinator on a port of its own, its log in `dir`.
async fn coordinator(dir: &std::path::Path) -> dci_coordinator::Coordinator {
    dci_coordinator::Coordinator::start(dci_coordinator::CoordinatorConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.to_path_buf(),
        ..Default::default()
    })
    .await
    .unwrap()
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_quarantines_poison_flushes_its_key_and_goes_on() {
    let (edge, stop) = edge_behind(script(), EdgeConfig::default()).await;
    // Cached before the stream starts (a lease of 0 is still valid then).
    let store = edge.store.clone();
    eventually("applied through seq 5", || {
        store.applied().iter().any(|&(_, _, s)| s >= 5)
    })
    .await;
    let q = lock(&edge.quarantine).clone();
    assert_eq!(q.len(), 2, "{q:?}");
    assert!(q.iter().any(|x| x.seq == 2 && x.key.as_ref() == b"poison"));
    // The poison entry (seq 2) still invalidated its key: a fill under a lease from seq 1 is refused
    // for that key, and only for that key.
    let generation = edge.store.lease(b"any").generation;
    let at_seq_1 = dci_edge_cache::Lease { generation, seq: 1 };
    assert!(matches!(
        edge.store
            .set(Bytes::from("poison"), Bytes::from("stale"), Some(at_seq_1)),
        Err(dci_edge_cache::FillRefused::Stale { invalidated: 2, .. })
    ));
    assert!(edge
        .store
        .set(Bytes::from("untouched"), Bytes::from("v"), Some(at_seq_1))
        .is_ok());
    assert_eq!(
        lock(&edge.link).bad_batches,
        1,
        "the undecodable frame was dropped, not fatal"
    );
    let _ = stop.send(true);
    edge.stop().await.unwrap();
}

/// A subscription tells the application of the poison (Quarantined, before its batch), hands it
/// the batch with what stands in for each poisoned entry (its key, invalidated), and goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_tells_the_poison_and_goes_on() {
    use dci_sdk::{Event, Subscription, SubscriptionOptions};
    let (url, stop) = serve(script()).await;
    let mut sub = Subscription::start(SubscriptionOptions {
        senders: vec![url],
        resume: vec![(0, 1, 0)],
        ..Default::default()
    })
    .unwrap();
    let mut seen = Vec::new();
    while !seen.contains(&"after".to_string()) {
        let event = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .expect("the stream goes on")
            .expect("not stopped");
        match event {
            Event::Invalidations { entries, .. } => {
                seen.extend(
                    entries
                        .iter()
                        .map(|e| String::from_utf8_lossy(&e.key).to_string()),
                );
            }
            Event::Quarantined { shard: 0, key, why } => {
                assert!(!why.is_empty());
                seen.push(format!("quarantined {}", String::from_utf8_lossy(&key)));
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        seen,
        [
            "quarantined poison",
            "quarantined ",
            "a",
            "poison",
            "boom",
            "after"
        ],
        "told, then the batch with the poison's stand-in"
    );
    assert_eq!(sub.position(), [(0, 1, 5)]);
    let _ = stop.send(true);
}

/// A tag too long for a relay is quarantined there, and what stands in for it (every tagged
/// value of the shard) goes on down, where an edge takes it the same way: a tagged fill under a
/// lease from before it is refused, an untagged one is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poisoned_tag_takes_every_tagged_value_down_the_tree() {
    let key = pb::Kind::Key as i32;
    let batch = |seq: Seq, e: pb::Invalidation| pb::Batch {
        shard: 0,
        epoch: 1,
        first_seq: seq,
        last_seq: seq,
        entries: vec![e],
        base_time_us: 0,
    };
    let script = Scripted {
        batches: vec![
            batch(1, entry(1, "a", key)),
            batch(2, entry(2, "a-tag-too-long", pb::Kind::Tag as i32)),
        ],
        head: 2,
        held: 2,
        ..script()
    };
    let (url, stop) = serve(script).await;
    let relay = dci_relay::Relay::start(dci_relay::RelayConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        upstream: vec![url],
        max_key_len: 8,
        ..Default::default()
    })
    .await
    .unwrap();
    let edge = edge_following(relay.url(), EdgeConfig::default()).await;
    let store = edge.store.clone();
    eventually("applied through seq 2", || {
        store.applied().iter().any(|&(_, _, s)| s >= 2)
    })
    .await;
    let generation = store.lease(b"any").generation;
    let at_seq_1 = Some(dci_edge_cache::Lease { generation, seq: 1 });
    let fill = |tags: &[Bytes], lease| {
        store.fill(
            Bytes::from("page"),
            Bytes::from("v"),
            lease,
            None,
            tags,
            None,
        )
    };
    assert!(matches!(
        fill(&[Bytes::from("any-tag")], at_seq_1),
        Err(dci_edge_cache::FillRefused::Stale { invalidated: 2, .. })
    ));
    assert!(fill(&[], at_seq_1).is_ok());
    assert!(fill(&[Bytes::from("any-tag")], None).is_ok());
    assert!(
        lock(&edge.quarantine).iter().any(|q| q.seq == 2),
        "the stand-in, an empty tag, is refused here too"
    );
    let _ = stop.send(true);
    edge.stop().await.unwrap();
    relay.stop().await.unwrap();
}

/// A sender that holds more than it sends (its window full, a range still being fetched) keeps
/// heartbeating: its receiver is alive but not caught up, and an edge must stop serving at its
/// staleness bound as if it were cut off. The same sender sending everything it holds is fine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_whose_sender_holds_back_stops_serving_at_its_bound() {
    let start = |held: Seq| {
        let cfg = EdgeConfig {
            max_staleness: Duration::from_secs(1),
            ..Default::default()
        };
        edge_behind(Scripted { held, ..script() }, cfg)
    };
    let (fine, stop_fine) = start(5).await;
    let (behind, stop_behind) = start(9).await;
    for e in [&fine, &behind] {
        let store = e.store.clone();
        eventually("applied through seq 5", || {
            store.applied().iter().any(|&(_, _, s)| s >= 5)
        })
        .await;
    }
    eventually("the held-back edge knows how far the shard goes", || {
        lock(&behind.link)
            .progress
            .iter()
            .any(|&(_, _, applied, head)| applied == 5 && head == 9)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for (e, serves) in [(&fine, true), (&behind, false)] {
        let cache = dci_sdk::CacheClient::from_urls(vec![e.url()]).unwrap();
        assert!(cache.set("x", "v", None).await.unwrap());
        let got = cache.get("x").await.unwrap();
        assert_eq!(
            matches!(got, dci_sdk::Lookup::Hit(_)),
            serves,
            "fine edge serves, held-back edge does not: {got:?}"
        );
    }
    assert!(
        behind
            .stale_misses
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
    let _ = (stop_fine.send(true), stop_behind.send(true));
    fine.stop().await.unwrap();
    behind.stop().await.unwrap();
}

/// Caught up means applied as far as the sender has said the shard goes, in a heartbeat of this
/// session: the highest seq that has arrived is not that. A relay just started replays from far
/// back and sends batches before its first heartbeat; an edge that took the last of those for
/// the head served values whose invalidations were still to come, past its bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_is_not_caught_up_before_its_sender_says_how_far_the_shard_goes() {
    let cfg = EdgeConfig {
        max_staleness: Duration::from_secs(1),
        ..Default::default()
    };
    let script = Scripted {
        first_heartbeat_after: Duration::from_secs(2),
        ..script()
    };
    let (e, stop) = edge_behind(script, cfg).await;
    let store = e.store.clone();
    eventually("applied through seq 5", || {
        store.applied().iter().any(|&(_, _, s)| s >= 5)
    })
    .await;
    let cache = dci_sdk::CacheClient::from_urls(vec![e.url()]).unwrap();
    assert!(cache.set("x", "v", None).await.unwrap());
    assert!(
        matches!(cache.get("x").await.unwrap(), dci_sdk::Lookup::Miss { .. }),
        "no word yet from the sender on how far the shard goes"
    );
    // Its heartbeat says the shard goes to 5, which the edge has: now it serves.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !matches!(cache.get("x").await.unwrap(), dci_sdk::Lookup::Hit(_)) {
        assert!(tokio::time::Instant::now() < deadline, "never served");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop.send(true);
    e.stop().await.unwrap();
}

/// Freeze the edge's runtime (its one thread blocked, as in a stopped process) for `pause`;
/// returns once the freeze has begun.
async fn freeze(edge_rt: &tokio::runtime::Handle, pause: Duration) {
    let (frozen_tx, frozen_rx) = tokio::sync::oneshot::channel();
    edge_rt.spawn(async move {
        let _ = frozen_tx.send(());
        std::thread::sleep(pause);
    });
    frozen_rx.await.unwrap();
}

/// Ten reads of `key` a little apart, every one a miss.
async fn only_misses(cache: &dci_sdk::CacheClient, key: &str) {
    for _ in 0..10 {
        assert!(
            matches!(
                cache.get(key.to_string()).await.unwrap(),
                dci_sdk::Lookup::Miss { .. }
            ),
            "served on the strength of heartbeats that waited out the pause"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `test` beside an edge (`cfg`) following a sender that plays `script`. The sender and
/// `test` live on the test's runtime; the edge on a single thread of its own, which a blocking
/// sleep spawned on `edge_rt` (the first argument of `test`) freezes whole: its timers, its
/// follower, its gRPC server. The second argument is the edge's URL.
fn with_a_freezable_edge<F, Fut>(script: Scripted, cfg: EdgeConfig, test: F)
where
    F: FnOnce(tokio::runtime::Handle, String) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let outer = tokio::runtime::Runtime::new().unwrap();
    let (url, stop) = outer.block_on(serve(script));
    let (handle_tx, handle_rx) = std::sync::mpsc::channel();
    let edge_thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let edge = edge_following(url, cfg).await;
            let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
            handle_tx
                .send((tokio::runtime::Handle::current(), edge.url(), done_tx))
                .unwrap();
            let _ = done_rx.await;
            edge.stop().await.unwrap();
        });
    });
    let (edge_rt, edge_url, done) = handle_rx.recv().unwrap();
    outer.block_on(test(edge_rt, edge_url));
    let _ = done.send(());
    edge_thread.join().unwrap();
    let _ = stop.send(true);
}

/// An edge paused (a frozen VM, a stopped process) finds, when it runs again, the heartbeats its
/// sender sent early in the pause waiting in its socket, and then nothing more. Stamped on arrival
/// they would pass for fresh news, and the edge would serve for another staleness bound what it
/// held from before the pause. A message after a silence longer than the peer timeout ends the
/// link instead, whichever the follower sees first, the message or its own timer; so the edge
/// serves misses until a sender speaks again.
#[test]
fn an_edge_paused_longer_than_its_bound_does_not_take_queued_heartbeats_for_fresh_ones() {
    let cfg = EdgeConfig {
        max_staleness: Duration::from_secs(1),
        peer_timeout: Duration::from_secs(1),
        ..Default::default()
    };
    let script = script();
    let silent = script.silent.clone();
    with_a_freezable_edge(script, cfg, |edge_rt, edge_url| async move {
        let cache = dci_sdk::CacheClient::from_urls(vec![edge_url]).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let _ = cache.set("x", "v", None).await;
            if matches!(cache.get("x").await.unwrap(), dci_sdk::Lookup::Hit(_)) {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "never served");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Frozen for 3 s; heartbeats pile up in its socket for the first second, then stop.
        freeze(&edge_rt, Duration::from_secs(3)).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        silent.store(true, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(2500)).await;
        // Awake again: its last news from a sender is 2 s old, more than its bound.
        only_misses(&cache, "x").await;
        // A sender speaking again brings it back.
        silent.store(false, std::sync::atomic::Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !matches!(cache.get("x").await.unwrap(), dci_sdk::Lookup::Hit(_)) {
            assert!(tokio::time::Instant::now() < deadline, "never served again");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
}

/// An edge paused for less than its peer timeout but longer than its staleness bound finds the
/// heartbeats its sender sent early in the pause waiting in its socket, and then nothing more
/// (the sender fell silent meanwhile). The link does not end (the silence was shorter than the
/// peer timeout), and stamped on arrival those heartbeats would pass for fresh news: the edge
/// would serve what it held from before the pause for another bound. They echo the edge's last
/// probe before the pause, and that is how fresh they make it: too old, it serves misses until
/// the sender answers a probe again.
#[test]
fn an_edge_paused_shorter_than_its_peer_timeout_is_as_fresh_as_its_last_answered_probe() {
    let cfg = EdgeConfig {
        max_staleness: Duration::from_secs(1),
        peer_timeout: Duration::from_secs(4),
        ..Default::default()
    };
    let script = script();
    let silent = script.silent.clone();
    with_a_freezable_edge(script, cfg, |edge_rt, edge_url| async move {
        let cache = dci_sdk::CacheClient::from_urls(vec![edge_url]).unwrap();
        let served = || async {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            loop {
                let _ = cache.set("x", "v", None).await;
                if matches!(cache.get("x").await.unwrap(), dci_sdk::Lookup::Hit(_)) {
                    return;
                }
                assert!(tokio::time::Instant::now() < deadline, "never served");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        served().await;
        // Frozen for 2.5 s; heartbeats pile up in its socket for the first second, then stop.
        freeze(&edge_rt, Duration::from_millis(2500)).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        silent.store(true, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(2000)).await;
        // Awake again: its last answered probe left before the pause, more than its bound ago.
        only_misses(&cache, "x").await;
        // The sender answering probes again brings it back.
        silent.store(false, std::sync::atomic::Ordering::SeqCst);
        served().await;
    });
}

/// An edge told a shard count other than the tier's would map keys to other shards than their
/// invalidations, and check fills against the wrong tombstones: once its sender says how many
/// shards there are, it serves misses and refuses fills, saying why. The same edge and sender
/// agreeing is fine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_with_another_shard_count_than_its_coordinators_takes_no_fill() {
    let start = |shard_count: u32| {
        let script = Scripted {
            shard_count,
            ..script()
        };
        edge_behind(script, EdgeConfig::default())
    };
    let (agrees, stop_agrees) = start(1).await;
    let (differs, stop_differs) = start(2).await;
    for e in [&agrees, &differs] {
        let link = e.link.clone();
        eventually("the sender's shard count heard", || {
            lock(&link).shard_count != 0
        })
        .await;
    }
    let cache = dci_sdk::CacheClient::from_urls(vec![agrees.url()]).unwrap();
    assert!(cache.set("x", "v", None).await.unwrap());
    assert_eq!(
        cache.get("x").await.unwrap(),
        dci_sdk::Lookup::Hit(Bytes::from("v"))
    );
    let cache = dci_sdk::CacheClient::from_urls(vec![differs.url()]).unwrap();
    assert!(!cache.set("x", "v", None).await.unwrap(), "fill refused");
    let mut raw = pb::cache_client::CacheClient::connect(differs.url())
        .await
        .unwrap();
    let err = raw
        .set(pb::SetRequest {
            key: Bytes::from("x"),
            value: Bytes::from("v"),
            lease: None,
            ttl_ms: 0,
            tags: vec![],
            version: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains("shard_count"), "{}", err.message());
    // Whatever it held before it knew is not served either.
    differs
        .store
        .set(Bytes::from("y"), Bytes::from("v"), None)
        .unwrap();
    assert!(matches!(
        cache.get("y").await.unwrap(),
        dci_sdk::Lookup::Miss { .. }
    ));
    let _ = (stop_agrees.send(true), stop_differs.send(true));
    agrees.stop().await.unwrap();
    differs.stop().await.unwrap();
}

/// An applier that panics on one key, as a bug in apply code would.
#[derive(Default)]
struct Fragile {
    applied: Vec<Bytes>,
    quarantined: Vec<(Seq, String)>,
}

impl Applier for Fragile {
    fn apply(&mut self, b: &Batch) {
        for e in &b.entries {
            if e.key.as_ref() == b"boom" {
                panic!("apply bug on boom");
            }
        }
        self.applied.extend(b.entries.iter().map(|e| e.key.clone()));
    }
    fn quarantine(&mut self, _: ShardId, e: &pb::Invalidation, why: &str) {
        self.quarantined.push((e.seq, why.to_string()));
    }
    fn flush(&mut self, _: ShardId, _: Epoch, _: Seq, _: &str) {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_that_panics_while_applied_is_quarantined_and_the_stream_goes_on() {
    let (url, stop) = serve(script()).await;
    let fragile = Arc::new(Mutex::new(Fragile::default()));
    let state = Arc::new(Mutex::new(LinkState::default()));
    let (halt, rx) = watch::channel(false);
    let opts = FollowOptions {
        urls: vec![url],
        node_id: "fragile".into(),
        ..Default::default()
    };
    tokio::spawn(upstream::follow(opts, fragile.clone(), state.clone(), rx));
    let f = fragile.clone();
    eventually("entry after the poison applied", move || {
        lock(&f).applied.iter().any(|k| k.as_ref() == b"after")
    })
    .await;
    let f = lock(&fragile);
    assert!(
        f.applied.iter().any(|k| k.as_ref() == b"a"),
        "entries before the culprit still apply"
    );
    assert!(!f.applied.iter().any(|k| k.as_ref() == b"boom"));
    assert!(
        f.quarantined
            .iter()
            .any(|(s, why)| *s == 4 && why.contains("panicked")),
        "{:?}",
        f.quarantined
    );
    assert_eq!(
        lock(&state).progress[0].2,
        5,
        "acked and applied through the end"
    );
    let _ = halt.send(true);
    let _ = stop.send(true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_seqs_from_a_sender_neither_panic_nor_stop_the_stream() {
    let mut s = script();
    let huge = pb::Batch {
        shard: 0,
        epoch: 1,
        first_seq: 1,
        last_seq: u64::MAX,
        entries: vec![],
        base_time_us: 0,
    };
    s.before = vec![
        pb::downstream::Msg::Reset(pb::Reset {
            shard: 0,
            epoch: 99,
            hwm: u64::MAX,
            reason: "hostile".into(),
        }),
        pb::downstream::Msg::Heartbeat(pb::Heartbeat {
            heads: vec![pb::ShardHead {
                shard: 0,
                epoch: 1,
                head: u64::MAX,
                head_time_us: u64::MAX,
                upstream_age_ms: u64::MAX,
                held: u64::MAX,
                shard_count: u32::MAX,
            }],
            ..Default::default()
        }),
        pb::downstream::Msg::Batch(Bytes::from(huge.encode_to_vec())),
        pb::downstream::Msg::BatchZstd(Bytes::from_static(b"\x28\xb5\x2f\xfd garbage")),
    ];
    let (edge, stop) = edge_behind(s, EdgeConfig::default()).await;
    let store = edge.store.clone();
    eventually("the good batches after the hostile ones apply", || {
        store.applied().iter().any(|&(_, _, s)| s >= 5)
    })
    .await;
    assert_eq!(lock(&edge.link).flushes, 0, "an absurd Reset is ignored");
    let _ = stop.send(true);
    edge.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absurd_resume_point_or_name_is_refused_with_invalid_argument() {
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator(dir.path()).await;
    let mut raw = pb::subscribe_client::SubscribeClient::connect(c.url())
        .await
        .unwrap();
    let absurd_resume = pb::Hello {
        node_id: "hostile".into(),
        resume: vec![pb::ResumePoint {
            shard: 0,
            epoch: c.epoch,
            hwm: u64::MAX,
        }],
        ..Default::default()
    };
    // A name kept for as long as the link lives, a megabyte long.
    let absurd_name = pb::Hello {
        node_id: "x".repeat(1 << 20),
        ..Default::default()
    };
    for hello in [absurd_resume, absurd_name] {
        let hello = pb::Upstream {
            msg: Some(pb::upstream::Msg::Hello(hello)),
        };
        let mut stream = raw
            .subscribe(tokio_stream::iter(vec![hello]))
            .await
            .unwrap()
            .into_inner();
        let err = loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("stream ended without a status"),
                Err(e) => break e,
            }
        };
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    }
    // The coordinator is fine.
    let mut p = pb::publisher_client::PublisherClient::connect(c.url())
        .await
        .unwrap();
    let r = p
        .publish(pb::PublishRequest {
            publisher_id: String::new(),
            request_no: 0,
            entries: vec![entry(0, "k", pb::Kind::Key as i32)],
        })
        .await
        .unwrap();
    assert_eq!(r.into_inner().seqs, vec![1]);
    c.stop().await.unwrap();
}

/// A receiver that asks for the same range again and again, far faster than any receiver repeats a
/// Nack, gets it resent at most once per guard interval: it cannot turn its sender into a firehose
/// at the cost of the sender's other receivers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_nacks_without_end_gets_a_bounded_number_of_resends() {
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator(dir.path()).await;
    let mut p = pb::publisher_client::PublisherClient::connect(c.url())
        .await
        .unwrap();
    let entries: Vec<_> = (0..5_000)
        .map(|i| entry(0, &format!("user:{i:06}:profile"), pb::Kind::Key as i32))
        .collect();
    p.publish(pb::PublishRequest {
        publisher_id: String::new(),
        request_no: 0,
        entries,
    })
    .await
    .unwrap();

    let (tx, rx) = mpsc::channel(16);
    let hello = pb::Hello {
        node_id: "nacker".into(),
        resume: vec![pb::ResumePoint {
            shard: 0,
            epoch: c.epoch,
            hwm: 0,
        }],
        ..Default::default()
    };
    tx.send(pb::Upstream {
        msg: Some(pb::upstream::Msg::Hello(hello)),
    })
    .await
    .unwrap();
    let mut raw = pb::subscribe_client::SubscribeClient::connect(c.url())
        .await
        .unwrap()
        .max_decoding_message_size(64 << 20);
    let mut stream = raw
        .subscribe(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let received = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let reader = {
        let received = received.clone();
        tokio::spawn(async move {
            while let Ok(Some(m)) = stream.message().await {
                if let Some(pb::downstream::Msg::Batch(b)) = m.msg {
                    received.fetch_add(b.len() as u64, std::sync::atomic::Ordering::Relaxed);
                }
            }
        })
    };
    let load = || received.load(std::sync::atomic::Ordering::Relaxed);
    eventually("the history arrives once", || load() > 0).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let history = load();

    let nack = pb::Upstream {
        msg: Some(pb::upstream::Msg::Nack(pb::Nack {
            shard: 0,
            from_seq: 1,
            to_seq: 1,
        })),
    };
    let started = std::time::Instant::now();
    let mut nacks = 0u64;
    while started.elapsed() < Duration::from_secs(1) {
        tx.send(nack.clone()).await.unwrap();
        nacks += 1;
        tokio::task::yield_now().await;
    }
    let spent = started.elapsed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let resends = (load() - history) as f64 / history as f64;
    // One resend per 100 ms guard, and one more for where the clock falls.
    let allowed = (spent.as_secs_f64() + 0.3) / 0.1 + 1.0;
    eprintln!("{nacks} nacks in {spent:?}: {resends:.1} resends of {history} bytes");
    assert!(
        nacks > 200 * allowed as u64,
        "the test sent too few Nacks to tell"
    );
    assert!(
        resends >= 1.0,
        "a Nack is still answered ({resends:.1} resends)"
    );
    assert!(
        resends <= allowed,
        "{resends:.1} resends of the history for {nacks} Nacks in {spent:?} (at most {allowed:.0})"
    );
    drop(tx);
    reader.abort();
    c.stop().await.unwrap();
}
