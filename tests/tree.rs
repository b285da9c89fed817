//! The whole tree in-process over real gRPC on loopback: coordinator, relays, edges.

mod support;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use dci_coordinator::{Coordinator, CoordinatorConfig};
use dci_edge_cache::{EdgeConfig, EdgeNode};
use dci_proto::pb;
use dci_proto::upstream::lock;
use dci_proto::{Batch, Seq};
use dci_relay::{Relay, RelayConfig};
use dci_sdk::{CacheClient, Fill, Lookup, Publisher};
use support::scrape;

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// An address on loopback that nothing listens on (until a test starts something there).
fn nowhere() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Holds the port of a node that is down: bound and not listening (connections are refused), so
/// that no other test's node is given it meanwhile. Dropped just before the node starts again.
/// The port may be busy for a moment after its node stopped (a connection of the node's still
/// closing): it is tried again for a while.
fn hold(addr: SocketAddr) -> tokio::net::TcpSocket {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_reuseaddr(true).unwrap();
        match socket.bind(addr) {
            Ok(()) => return socket,
            Err(e) if std::time::Instant::now() < deadline => {
                assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse, "{e}");
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("{addr} still busy: {e}"),
        }
    }
}

/// An address on loopback that refuses connections for as long as the socket returned is kept:
/// bound, so no other test's node can be given its port meanwhile, and not listening.
fn refusing() -> (tokio::net::TcpSocket, SocketAddr) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(any_port()).unwrap();
    let addr = socket.local_addr().unwrap();
    (socket, addr)
}

async fn coordinator(dir: &std::path::Path) -> Coordinator {
    Coordinator::start(CoordinatorConfig {
        listen: any_port(),
        data_dir: dir.to_path_buf(),
        ..Default::default()
    })
    .await
    .unwrap()
}

/// A coordinator that serves `/metrics` (on a port of its own: one picked beforehand could be
/// taken by another test meanwhile).
async fn metered_coordinator(dir: &std::path::Path) -> Coordinator {
    Coordinator::start(CoordinatorConfig {
        listen: any_port(),
        data_dir: dir.to_path_buf(),
        metrics_listen: Some(any_port()),
        ..Default::default()
    })
    .await
    .unwrap()
}

async fn relay_at(listen: SocketAddr, upstream: Vec<String>, ring_bytes: usize) -> Relay {
    Relay::start(RelayConfig {
        listen,
        upstream,
        region: "r".into(),
        ring_bytes,
        ..Default::default()
    })
    .await
    .unwrap()
}

/// The tree a node's `Admin.Status` answers (the node itself first).
async fn tree_at(url: String) -> Vec<pb::NodeStatus> {
    let mut admin = pb::admin_client::AdminClient::connect(url).await.unwrap();
    admin
        .status(pb::StatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .nodes
}

async fn relay(upstream: &Coordinator) -> Relay {
    relay_at(any_port(), vec![upstream.url()], 64 << 20).await
}

/// An edge that records every applied entry's key and every applied range.
struct Watched {
    edge: EdgeNode,
    keys: Arc<Mutex<Vec<Bytes>>>,
}

async fn edge(cfg: EdgeConfig) -> Watched {
    let keys = Arc::new(Mutex::new(Vec::new()));
    let k = keys.clone();
    let cb: Arc<dyn Fn(&Batch) + Send + Sync> = Arc::new(move |b: &Batch| {
        lock(&k).extend(b.entries.iter().map(|e| e.key.clone()));
    });
    let edge = EdgeNode::start_with(
        EdgeConfig {
            listen: any_port(),
            ..cfg
        },
        Some(cb),
    )
    .await
    .unwrap();
    Watched { edge, keys }
}

fn edge_cfg(relays: Vec<String>) -> EdgeConfig {
    EdgeConfig {
        relays,
        peer_timeout: Duration::from_secs(1),
        ..Default::default()
    }
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn wait_connected(e: &Watched) {
    eventually("edge connected", || {
        lock(&e.edge.link).connected_to.is_some()
    })
    .await;
}

/// Connected, and in its relay's stream of a shard: what is published from now on reaches it (a
/// relay whose own link came up after a publish would have started its ring past it).
async fn wait_in_stream(e: &Watched) {
    eventually("edge in a shard's stream", || {
        let link = lock(&e.edge.link);
        link.connected_to.is_some() && !link.progress.is_empty()
    })
    .await;
}

/// Connected, and in the stream of every shard its relay has: it serves from now on.
async fn wait_serving(e: &Watched) {
    eventually("edge serving", || {
        lock(&e.edge.link).fresh_within(std::time::Instant::now(), Duration::from_secs(5))
    })
    .await;
}

async fn wait_applied(e: &Watched, seq: Seq) {
    let id = e.edge.node_id.clone();
    let applied = e.edge.store.clone();
    // The link's progress moves once a batch is through, its keys recorded (`keys`); the
    // store's applied seq, which reads look at, a moment before that.
    eventually(&format!("{id} applied {seq}"), || {
        applied.applied().iter().any(|&(_, _, s)| s >= seq)
            && lock(&e.edge.link).progress.iter().any(|p| p.2 >= seq)
    })
    .await;
}

fn keys(n: std::ops::Range<u64>, prefix: &str) -> Vec<String> {
    n.map(|i| format!("{prefix}{i}")).collect()
}

async fn publish_all(p: &Publisher, keys: &[String]) -> Seq {
    let mut last = 0;
    for chunk in keys.chunks(500) {
        let seqs = p
            .publish(
                chunk
                    .iter()
                    .map(|k| dci_proto::Invalidation::key(k.clone()))
                    .collect(),
            )
            .await
            .unwrap();
        last = *seqs.last().unwrap();
    }
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidations_reach_every_edge_and_survive_a_relay_kill() {
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator(dir.path()).await;
    let r1 = relay(&c).await;
    let r2 = relay(&c).await;
    let r1_addr = r1.addr;
    let mut edges = Vec::new();
    for i in 0..4 {
        let relays = if i % 2 == 0 {
            vec![r1.url(), r2.url()]
        } else {
            vec![r2.url(), r1.url()]
        };
        edges.push(edge(edge_cfg(relays)).await);
    }
    for e in &edges {
        wait_in_stream(e).await;
    }
    let p = Publisher::connect(vec![c.url()]).await.unwrap();
    let first = keys(0..100, "a:");
    let head = publish_all(&p, &first).await;
    for e in &edges {
        wait_applied(e, head).await;
    }

    // Kill relay 1 mid-stream: its edges move to relay 2 and miss nothing.
    let writer = {
        let p = p.clone();
        tokio::spawn(async move { publish_all(&p, &keys(100..3000, "b:")).await })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    r1.stop().await.unwrap();
    let held = hold(r1_addr);
    let head = writer.await.unwrap();
    for e in &edges {
        wait_applied(e, head).await;
        let got: HashSet<Bytes> = lock(&e.keys).iter().cloned().collect();
        for k in keys(0..100, "a:").into_iter().chain(keys(100..3000, "b:")) {
            assert!(got.contains(k.as_bytes()), "{} missed {k}", e.edge.node_id);
        }
        assert_eq!(lock(&e.edge.link).flushes, 0, "failover needs no reset");
    }

    // Relay 1 comes back on its address and serves again.
    drop(held);
    let r1 = relay_at(r1_addr, vec![c.url()], 64 << 20).await;
    let late = edge(edge_cfg(vec![r1.url()])).await;
    wait_in_stream(&late).await;
    let head = publish_all(&p, &keys(0..10, "c:")).await;
    wait_applied(&late, head).await;
    for e in edges {
        e.edge.stop().await.unwrap();
    }
    late.edge.stop().await.unwrap();
    r1.stop().await.unwrap();
    r2.stop().await.unwrap();
    c.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_that_missed_ten_thousand_entries_catches_up_through_a_restarted_relay() {
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator(dir.path()).await;
    let r = relay(&c).await;
    let addr = r.addr;
    let e = edge(edge_cfg(vec![r.url()])).await;
    wait_in_stream(&e).await;
    let p = Publisher::connect(vec![c.url()]).await.unwrap();
    let head = publish_all(&p, &keys(0..10, "warm:")).await;
    wait_applied(&e, head).await;

    r.stop().await.unwrap();
    let held = hold(addr);
    let head = publish_all(&p, &keys(0..10_000, "missed:")).await;
    // The relay restarts empty; the edge resumes from its high-water mark, and the relay fetches
    // the range from upstream for it.
    drop(held);
    let r = relay_at(addr, vec![c.url()], 64 << 20).await;
    wait_applied(&e, head).await;
    let got: HashSet<Bytes> = lock(&e.keys).iter().cloned().collect();
    assert!(keys(0..10_000, "missed:")
        .iter()
        .all(|k| got.contains(k.as_bytes())));
    assert_eq!(lock(&e.edge.link).flushes, 0);
    assert!(r.core.catch_ups.load(std::sync::atomic::Ordering::Relaxed) > 0);
    e.edge.stop().await.unwrap();
    r.stop().await.unwrap();
    c.stop().await.unwrap();
}

/// Receivers behind a relay's ring at the same place at the same time (edges reconnecting to a
/// restarted relay) share one fetch from upstream; and one whose fetch others wait on may leave
/// without leaving them stranded. Each read is polled once before any answer can come, so every
/// one starts while the first fetch is under way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receivers_behind_at_once_share_one_fetch_even_if_its_first_leaves() {
    use dci_proto::downstream::{BatchSource, Fetch};
    use std::sync::atomic::Ordering::Relaxed;
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator(dir.path()).await;
    let p = Publisher::connect(vec![c.url()]).await.unwrap();
    let head = publish_all(&p, &keys(0..3_000, "before:")).await;
    let r = relay(&c).await;
    let core = r.core.clone();
    eventually("the relay's ring follows the shard", || {
        core.views()
            .iter()
            .any(|v| v.shard == 0 && v.held_from > head)
    })
    .await;
    let contiguous_from_one = |f: &Fetch| match f {
        Fetch::Batches(b) => {
            let mut next = 1;
            for x in b {
                assert!(x.batch.first_seq <= next && x.batch.last_seq >= next);
                next = x.batch.last_seq + 1;
            }
            next > 1
        }
        _ => false,
    };

    // The first reader leaves while another waits on its fetch.
    let from = head - 500;
    let mut first = Box::pin(core.read(0, from, 1 << 20));
    assert!(futures::poll!(&mut first).is_pending());
    assert_eq!(
        core.catch_ups.load(Relaxed),
        1,
        "the first fetch is under way"
    );
    let mut second = Box::pin(core.read(0, from, 1 << 20));
    assert!(futures::poll!(&mut second).is_pending());
    assert_eq!(core.catch_ups.load(Relaxed), 1, "the second waits for it");
    drop(first);
    match second.await {
        Fetch::Batches(b) => {
            assert!(b[0].batch.first_seq <= from && b[0].batch.last_seq >= from);
            assert_eq!(b.last().unwrap().batch.last_seq, head);
        }
        f => panic!("the waiting reader got {f:?}"),
    }
    assert_eq!(
        core.catch_ups.load(Relaxed),
        2,
        "the waiting reader fetched it itself"
    );

    // Another place, not kept yet: eight readers at once.
    let reads = futures::future::join_all((0..8).map(|_| core.read(0, 1, 1 << 20))).await;
    assert!(reads.iter().all(contiguous_from_one), "{reads:?}");
    assert_eq!(core.catch_ups.load(Relaxed), 3, "one fetch for all eight");
    assert_eq!(core.catch_up_hits.load(Relaxed), 7);
    r.stop().await.unwrap();
    c.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_gone_everywhere_ends_in_reset_and_flush() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(CoordinatorConfig {
        listen: any_port(),
        data_dir: dir.path().to_path_buf(),
        segment_bytes: 4096,
        retention_bytes: 4096,
        memory_tail_bytes: 4096,
        ..Default::default()
    })
    .await
    .unwrap();
    let r = relay_at(any_port(), vec![c.url()], 4096).await;
    let addr = r.addr;
    let e = edge(edge_cfg(vec![r.url()])).await;
    wait_in_stream(&e).await;
    let p = Publisher::connect(vec![c.url()]).await.unwrap();
    let head = publish_all(&p, &keys(0..10, "k:")).await;
    wait_applied(&e, head).await;
    let cache = CacheClient::from_urls(vec![e.edge.url()]).unwrap();
    assert!(cache.set("cached", "v", None).await.unwrap());

    r.stop().await.unwrap();
    let held = hold(addr);
    // Far more than the relay ring, the coordinator's memory tail and its log retention hold.
    publish_all(&p, &keys(0..20_000, "flood:")).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let head = publish_all(&p, &keys(0..10, "after:")).await;
    drop(held);
    let r = relay_at(addr, vec![c.url()], 4096).await;
    eventually("edge reset", || lock(&e.edge.link).flushes > 0).await;
    wait_applied(&e, head).await;
    assert_eq!(
        cache.get("cached").await.unwrap(),
        Lookup::Miss {
            lease: e.edge.store.lease(b"cached").encode()
        }
    );
    e.edge.stop().await.unwrap();
    r.stop().await.unwrap();
    c.stop().await.unwrap();
}

/// A client's `with_fill_ttl`: what it fills (`get_or_load`, `set`) lives that long on the edge;
/// a clone without it fills for the edge's `ttl`, through the same connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_fills_values_for_the_time_to_live_it_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator(dir.path()).await;
    let r = relay(&c).await;
    let e = edge(edge_cfg(vec![r.url()])).await;
    wait_in_stream(&e).await;
    let cache = CacheClient::from_urls(vec![e.edge.url()]).unwrap();
    let brief = cache.clone().with_fill_ttl(Duration::from_millis(500));
    let load = |v: &'static str| move || async move { Ok::<_, std::io::Error>(Bytes::from(v)) };
    let hit = |key: &'static str| {
        let cache = cache.clone();
        async move { matches!(cache.get(key).await.unwrap(), Lookup::Hit(_)) }
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    // The first fills may meet the edge's flush as it joins its sender's stream: load again.
    loop {
        brief.get_or_load("brief", load("b")).await.unwrap();
        if hit("brief").await {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no fill stored");
    }
    // (Stored, and not read back here: a slow machine could let its 500 ms pass meanwhile.)
    assert!(brief.set("set briefly", "s", None).await.unwrap());
    cache.get_or_load("kept", load("k")).await.unwrap();
    assert!(hit("kept").await);
    while hit("brief").await || hit("set briefly").await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "filled for 500 ms, still there"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(hit("kept").await, "the edge's ttl, an hour, is not over");
    e.edge.stop().await.unwrap();
    r.stop().await.unwrap();
    c.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stale_set_race_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator(dir.path()).await;
    let r = relay(&c).await;
    let e = edge(edge_cfg(vec![r.url()])).await;
    wait_in_stream(&e).await;
    let p = Publisher::connect(vec![c.url()]).await.unwrap();
    let head = publish_all(&p, &keys(0..1, "warm:")).await;
    wait_applied(&e, head).await;

    let cache = CacheClient::from_urls(vec![e.edge.url()]).unwrap();
    // Reader misses and reads the old row...
    let Lookup::Miss { lease } = cache.get("user:1").await.unwrap() else {
        panic!("expected a miss")
    };
    // ...the writer updates the row and invalidates...
    let seq = p.invalidate("user:1").await.unwrap();
    wait_applied(&e, seq).await;
    // ...and the reader's late fill of the old row is refused.
    assert!(!cache.set("user:1", "old row", Some(lease)).await.unwrap());
    let mut raw = pb::cache_client::CacheClient::connect(e.edge.url())
        .await
        .unwrap();
    let err = raw
        .set(pb::SetRequest {
            key: Bytes::from("user:1"),
            value: Bytes::from("old"),
            lease: Some(lease),
            ttl_ms: 0,
            tags: vec![],
            version: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(matches!(
        cache.get("user:1").await.unwrap(),
        Lookup::Miss { .. }
    ));
    // A fill under a fresh lease is stored.
    let v = cache
        .get_or_load("user:1", || async {
            Ok::<_, std::io::Error>(Bytes::from("new row"))
        })
        .await
        .unwrap();
    assert_eq!(v, Bytes::from("new row"));
    assert_eq!(
        cache.get("user:1").await.unwrap(),
        Lookup::Hit(Bytes::from("new row"))
    );
    e.edge.stop().await.unwrap();
    r.stop().await.unwrap();
    c.stop().await.unwrap();
}

/// The race a lease cannot see: a reader misses after the invalidation (its lease is newer) and
/// reads a replica that has not caught up with the write. A fill that says the version it read
/// is refused when older than the invalidation's, at an edge (by the SDK, the raw API, SetMany,
/// get_or_load) and at a near cache; the version written, or a newer one, is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_read_from_a_replica_behind_the_write_is_refused_by_its_version() {
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator(dir.path()).await;
    let r = relay(&c).await;
    let e = edge(edge_cfg(vec![r.url()])).await;
    wait_in_stream(&e).await;
    let (near, p) = near_cache_caught_up(&c, &r).await;
    let cache = CacheClient::from_urls(vec![e.edge.url()]).unwrap();
    // The writer commits version 8 of two rows, and invalidates them with it.
    let rows = ["user:1", "user:2"];
    let mut head = 0;
    for row in rows {
        head = p.invalidate_version(row, 8).await.unwrap();
    }
    wait_applied(&e, head).await;
    let n = near.clone();
    eventually("the near cache applied them", move || {
        n.applied().iter().any(|&(_, _, s)| s >= head)
    })
    .await;
    let row = |version: u64| Fill::new(format!("v{version}")).version(version);
    for key in rows {
        let Lookup::Miss { lease } = cache.get(key).await.unwrap() else {
            panic!("a miss")
        };
        assert!(
            !cache.set(key, row(7), Some(lease)).await.unwrap(),
            "read at 7 from a replica behind, under a lease after the invalidation"
        );
        let Lookup::Miss { lease: near_lease } = near.get(key.as_bytes()) else {
            panic!("a miss")
        };
        assert!(!near.set(key, row(7), Some(near_lease)));
        assert!(near.set(key, row(8), Some(near_lease)));
        assert_eq!(near.get(key.as_bytes()), Lookup::Hit(Bytes::from("v8")));
    }
    let mut raw = pb::cache_client::CacheClient::connect(e.edge.url())
        .await
        .unwrap();
    let err = raw
        .set(pb::SetRequest {
            key: Bytes::from("user:1"),
            value: Bytes::from("v7"),
            version: Some(7),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(
        err.message().contains("version 7 is older than version 8"),
        "{}",
        err.message()
    );
    let stored = cache
        .set_many([("user:1", row(7), None), ("user:2", row(9), None)])
        .await
        .unwrap();
    assert_eq!(stored, [false, true]);
    // get_or_load hands back what it loaded, and caches it only when not older.
    let v = cache
        .get_or_load("user:1", || async { Ok::<_, std::io::Error>(row(7)) })
        .await
        .unwrap();
    assert_eq!(v, "v7");
    assert!(matches!(
        cache.get("user:1").await.unwrap(),
        Lookup::Miss { .. }
    ));
    cache
        .get_or_load("user:1", || async { Ok::<_, std::io::Error>(row(8)) })
        .await
        .unwrap();
    assert_eq!(
        cache.get("user:1").await.unwrap(),
        Lookup::Hit(Bytes::from("v8"))
    );
    assert_eq!(
        cache.get("user:2").await.unwrap(),
        Lookup::Hit(Bytes::from("v9"))
    );
    near.stop();
    e.edge.stop().await.unwrap();
    r.stop().await.unwrap();
    c.stop().await.unwrap();
}

/// A Subscription hands the application the stream in seq order, from where it says, and goes
/// on after its position in a later subscription. One that takes nothing for a while holds up
/// no edge of its relay; one that resumes in an epoch the shard's log is not in gets a Flush.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_hands_the_stream_to_the_application_in_order() {
    use dci_sdk::{Event, Subscription, SubscriptionOptions};
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator(dir.path()).await;
    let r = relay(&c).await;
    let e = edge(edge_cfg(vec![r.url()])).await;
    wait_in_stream(&e).await;
    let p = Publisher::connect(vec![c.url()]).await.unwrap();
    let mut published = Vec::new();
    for k in keys(0..20, "user:") {
        published.push(k.clone());
        p.invalidate(k).await.unwrap();
    }
    p.publish(vec![
        dci_proto::Invalidation::prefix("user:1"),
        dci_proto::Invalidation::tag("org:7"),
    ])
    .await
    .unwrap();
    published.extend(["user:1".to_string(), "org:7".to_string()]);
    let subscribe = |resume| {
        Subscription::start(SubscriptionOptions {
            senders: vec![r.url()],
            resume,
            buffer: 4,
            ..Default::default()
        })
        .unwrap()
    };
    let mut sub = subscribe(vec![(0, c.epoch, 0)]);
    // Taking nothing, it holds up no edge: 300 more reach the edge meanwhile.
    let more = keys(20..320, "user:");
    for chunk in more.chunks(1) {
        publish_all(&p, chunk).await;
    }
    published.extend(more);
    let head = published.len() as Seq;
    wait_applied(&e, head).await;
    let mut got = Vec::new();
    let mut kinds = Vec::new();
    while (got.len() as Seq) < head {
        match tokio::time::timeout(Duration::from_secs(10), sub.next()).await {
            Ok(Some(Event::Invalidations {
                shard: 0,
                epoch,
                last_seq,
                entries,
            })) => {
                assert_eq!(epoch, c.epoch);
                for e in &entries {
                    assert_eq!(e.seq, got.len() as Seq + 1, "in seq order, none missing");
                    got.push(String::from_utf8(e.key.to_vec()).unwrap());
                    kinds.push(e.kind);
                }
                assert_eq!(last_seq, got.len() as Seq);
            }
            other => panic!("{other:?} after {} of {head}", got.len()),
        }
    }
    assert_eq!(got, published);
    assert_eq!(
        kinds[20..22],
        [dci_proto::Kind::Prefix, dci_proto::Kind::Tag]
    );
    assert_eq!(sub.position(), [(0, c.epoch, head)]);
    // A later subscription goes on after the position, with nothing again and nothing missed.
    let position = sub.position();
    drop(sub);
    let later = publish_all(&p, &keys(0..3, "late:")).await;
    let mut sub = subscribe(position);
    let Some(Event::Invalidations { entries, .. }) = sub.next().await else {
        panic!("the invalidations after the position")
    };
    let seqs: Vec<Seq> = entries.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (head + 1..=later).collect::<Vec<_>>());
    // An epoch the shard's log is not in: what the subscriber holds of it must go. (Taken as a
    // Stream, and the position follows.)
    let mut sub = subscribe(vec![(0, c.epoch + 1, 2)]);
    let next = futures::StreamExt::next(&mut sub);
    match tokio::time::timeout(Duration::from_secs(10), next).await {
        Ok(Some(Event::Flush {
            shard: 0,
            epoch,
            hwm,
            ..
        })) => {
            assert_eq!(epoch, c.epoch);
            assert_eq!(sub.position(), [(0, epoch, hwm)]);
        }
        other => panic!("{other:?}"),
    }
    e.edge.stop().await.unwrap();
    r.stop().await.unwrap();
    c.stop().await.unwrap();
}

/// The cache only saves loads: a key whose edge is gone (stopped, never there, or stuck past the
/// deadline) is still read, from the loader, and nothing is filled; the loader's own failure and
/// a key the edge refuses are still errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_or_load_reads_through_when_the_edge_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator(dir.path()).await;
    let r = relay(&c).await;
    let e = edge(edge_cfg(vec![r.url()])).await;
    wait_serving(&e).await;
    let cache = CacheClient::from_urls(vec![e.edge.url()]).unwrap();
    let row = |v: &'static str| move || async move { Ok::<_, std::io::Error>(Bytes::from(v)) };
    assert_eq!(cache.get_or_load("user:1", row("v1")).await.unwrap(), "v1");
    assert_eq!(
        cache.get("user:1").await.unwrap(),
        Lookup::Hit(Bytes::from("v1"))
    );
    let refused = cache.get_or_load("", row("x")).await.unwrap_err();
    assert!(matches!(refused, dci_sdk::Error::Refused(_)), "{refused}");

    e.edge.stop().await.unwrap();
    assert!(matches!(
        cache.get("user:1").await,
        Err(dci_sdk::Error::Unavailable(_))
    ));
    assert_eq!(cache.get_or_load("user:1", row("v2")).await.unwrap(), "v2");
    let failed = cache
        .get_or_load("user:1", || async {
            Err::<Bytes, _>(std::io::Error::other("database down"))
        })
        .await
        .unwrap_err();
    assert!(matches!(failed, dci_sdk::Error::Loader(_)), "{failed}");

    // Stuck: it takes connections and never answers.
    let stuck = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", stuck.local_addr().unwrap());
    let cache =
        CacheClient::with_timeout(vec![(url.clone(), url)], Duration::from_millis(300)).unwrap();
    assert_eq!(cache.get_or_load("user:1", row("v3")).await.unwrap(), "v3");
    drop(stuck);
    r.stop().await.unwrap();
    c.stop().await.unwrap();
}

/// A publisher rides out one coordinator restart after another, however long it has lived:
/// each outage has its own `retry_for`, counted from when that outage began.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_ride_out_coordinator_restarts_far_apart() {
    let dir = tempfile::tempdir().unwrap();
    let first = coordinator(dir.path()).await;
    let (addr, url) = (first.addr, first.url());
    let retry_for = Duration::from_millis(2500);
    let p = Publisher::with_options(
        vec![url],
        dci_sdk::PublisherOptions {
            retry_for,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut running = Some(first);
    for round in 0..2 {
        // Publishes go on all through the outage.
        let load = {
            let p = p.clone();
            tokio::spawn(async move {
                for i in 0..60 {
                    p.invalidate(format!("k{round}-{i}")).await?;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Ok::<_, dci_sdk::Error>(())
            })
        };
        tokio::time::sleep(Duration::from_millis(150)).await;
        running.take().unwrap().stop().await.unwrap();
        let held = hold(addr);
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(held);
        running = Some(
            Coordinator::start(CoordinatorConfig {
                listen: addr,
                data_dir: dir.path().to_path_buf(),
                ..Default::default()
            })
            .await
            .unwrap(),
        );
        load.await.unwrap().unwrap();
        // More than `retry_for` before the next outage.
        tokio::time::sleep(retry_for + Duration::from_millis(500)).await;
    }
    running.unwrap().stop().await.unwrap();
}

/// Three edges of one region sharing a ring, each key on two of them, following `r` and
/// serving; their ids, the edges (`None` once a test stops one) and a client of the region.
async fn replicated_region(r: &Relay) -> (Vec<String>, Vec<Option<Watched>>, CacheClient) {
    let ids: Vec<String> = (0..3).map(|i| format!("replica-{i}")).collect();
    let mut edges = Vec::new();
    for id in &ids {
        let e = edge(EdgeConfig {
            node_id: id.clone(),
            ring_nodes: ids.clone(),
            replication: 2,
            ..edge_cfg(vec![r.url()])
        })
        .await;
        wait_serving(&e).await;
        edges.push(Some(e));
    }
    let client = CacheClient::with_timeout(
        ids.iter()
            .cloned()
            .zip(edges.iter().map(|e| e.as_ref().unwrap().edge.url()))
            .collect(),
        Duration::from_secs(1),
    )
    .unwrap()
    .with_replication(2);
    (ids, edges, client)
}

/// `get_many` reads keys of every edge of a ring at once, in the keys' order, more than one
/// request carries per edge; an invalidation shows in it as in `get`; with an edge down its keys
/// go to their next owner, and a key refused fails the call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_many_reads_across_a_region_in_the_keys_order() {
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator(dir.path()).await;
    let r = relay(&c).await;
    let (ids, mut edges, client) = replicated_region(&r).await;
    let ring = dci_proto::ring::NodeRing::new(ids.clone());
    let n = 3_500;
    let keys: Vec<String> = (0..n).map(|i| format!("k:{i}")).collect();
    let first_owner = |k: &str| ring.owners(k.as_bytes(), 2)[0].to_string();
    assert!(
        ids.iter()
            .any(|id| keys.iter().filter(|k| first_owner(k) == *id).count()
                > dci_sdk::GET_MANY_CHUNK),
        "one edge gets more keys than one request carries"
    );
    for (i, k) in keys.iter().enumerate() {
        if i % 2 == 0 {
            assert!(client.set(k.clone(), format!("v{i}"), None).await.unwrap());
        }
    }
    let got = client.get_many(keys.clone()).await.unwrap();
    assert_eq!(got.len(), n);
    for (i, g) in got.iter().enumerate() {
        match g {
            Lookup::Hit(v) if i % 2 == 0 => assert_eq!(v, &Bytes::from(format!("v{i}"))),
            Lookup::Miss { lease } if i % 2 == 1 => assert!(*lease > 0, "a lease for {i}"),
            other => panic!("k:{i}: {other:?}"),
        }
    }
    assert_eq!(client.get_many(Vec::<String>::new()).await.unwrap(), vec![]);

    let p = Publisher::connect(vec![c.url()]).await.unwrap();
    let seq = p.invalidate("k:0").await.unwrap();
    for e in edges.iter().flatten() {
        wait_applied(e, seq).await;
    }
    assert!(matches!(
        client.get_many(["k:0", "k:2"]).await.unwrap()[..],
        [Lookup::Miss { .. }, Lookup::Hit(_)]
    ));

    // One edge down: its keys are asked of their next owner (which was not filled: a miss).
    let down = ids[1].clone();
    edges[1].take().unwrap().edge.stop().await.unwrap();
    let got = client.get_many(keys.clone()).await.unwrap();
    for (i, (k, g)) in keys.iter().zip(&got).enumerate().skip(1) {
        let hit = matches!(g, Lookup::Hit(v) if v == &Bytes::from(format!("v{i}")));
        assert_eq!(hit, i % 2 == 0 && first_owner(k) != down, "k:{i}: {g:?}");
    }

    let err = client
        .get_many(["k:1".to_string(), "x".repeat(5_000)])
        .await
        .unwrap_err();
    assert!(matches!(err, dci_sdk::Error::Refused(_)), "{err}");
    for e in edges.into_iter().flatten() {
        e.edge.stop().await.unwrap();
    }
    r.stop().await.unwrap();
    c.stop().await.unwrap();
}

/// `set_many` fills what a `get_many` missed, each key under its miss's lease, on the edges that
/// own them, more than one request carries: a key invalidated since its miss is refused alone
/// (`false`), the others stored; with an edge down its keys go to their next owner; values
/// larger in all than an edge decodes in one request go in several.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_many_fills_what_get_many_missed_under_each_lease() {
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator(dir.path()).await;
    let r = relay(&c).await;
    let (ids, mut edges, client) = replicated_region(&r).await;
    let n = 2_500;
    let keys: Vec<String> = (0..n).map(|i| format!("row:{i}")).collect();
    let leases = |got: Vec<Lookup>| -> Vec<Option<u64>> {
        got.into_iter()
            .map(|g| match g {
                Lookup::Miss { lease } => Some(lease),
                Lookup::Hit(v) => panic!("a hit: {v:?}"),
            })
            .collect()
    };
    let missed = leases(client.get_many(keys.clone()).await.unwrap());
    // Rows 0, 10, 20, ... are written after the reader read them: their fills are stale.
    let p = Publisher::connect(vec![c.url()]).await.unwrap();
    let written: Vec<String> = keys.iter().step_by(10).cloned().collect();
    let head = publish_all(&p, &written).await;
    for e in edges.iter().flatten() {
        wait_applied(e, head).await;
    }
    let fills = keys
        .iter()
        .zip(&missed)
        .map(|(k, lease)| (k.clone(), format!("v:{k}"), *lease));
    let stored = client.set_many(fills).await.unwrap();
    assert_eq!(stored.len(), n);
    // Every stale fill is refused; a few others may be too, their key sharing a tombstone slot
    // with a written one (more misses, never a stale value).
    let refused_fresh = (0..n).filter(|&i| i % 10 != 0 && !stored[i]).count();
    assert!((0..n).all(|i| i % 10 != 0 || !stored[i]));
    assert!(
        refused_fresh < n / 100,
        "{refused_fresh} fresh fills refused"
    );
    let got = client.get_many(keys.clone()).await.unwrap();
    for (i, g) in got.iter().enumerate() {
        match g {
            Lookup::Hit(v) => assert!(stored[i] && v == &format!("v:{}", keys[i]), "{v:?}"),
            Lookup::Miss { .. } => assert!(!stored[i], "{} was filled", keys[i]),
        }
    }
    assert_eq!(
        client
            .set_many(Vec::<(String, String, _)>::new())
            .await
            .unwrap(),
        Vec::<bool>::new()
    );

    // An edge down: its keys are filled on their next owner.
    edges[1].take().unwrap().edge.stop().await.unwrap();
    let ring = dci_proto::ring::NodeRing::new(ids.clone());
    let moved: Vec<String> = (0..200)
        .map(|i| format!("moved:{i}"))
        .filter(|k| ring.owners(k.as_bytes(), 2)[0] == ids[1])
        .collect();
    assert!(!moved.is_empty());
    let missed = leases(client.get_many(moved.clone()).await.unwrap());
    let fills = moved.iter().zip(&missed).map(|(k, l)| (k.clone(), "v", *l));
    let stored = client.set_many(fills).await.unwrap();
    assert!(stored.iter().all(|s| *s), "{stored:?}");
    let got = client.get_many(moved.clone()).await.unwrap();
    assert!(got.iter().all(|g| matches!(g, Lookup::Hit(_))), "{got:?}");

    // 12 MiB of values in all, to one edge that decodes 1 MiB and a bit per request.
    let small = edge(EdgeConfig {
        max_value_len: 1 << 20,
        ..edge_cfg(vec![r.url()])
    })
    .await;
    wait_serving(&small).await;
    let one = CacheClient::from_urls(vec![small.edge.url()]).unwrap();
    let big: Vec<(String, Bytes, Option<u64>)> = (0..24)
        .map(|i| {
            (
                format!("big:{i}"),
                Bytes::from(vec![i as u8; 512 << 10]),
                None,
            )
        })
        .collect();
    let stored = one.set_many(big.clone()).await.unwrap();
    assert_eq!(stored, vec![true; 24]);
    let got = one.get_many(big.iter().map(|b| b.0.clone())).await.unwrap();
    for ((_, value, _), g) in big.iter().zip(&got) {
        assert!(matches!(g, Lookup::Hit(v) if v == value));
    }
    // A value larger than it takes fails the call, by name.
    let err = one
        .set_many([("huge", Bytes::from(vec![0u8; 2 << 20]), None)])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("max_value_len"), "{err}");
    small.edge.stop().await.unwrap();
    for e in edges.into_iter().flatten() {
        e.edge.stop().await.unwrap();
    }
    r.stop().await.unwrap();
    c.stop().await.unwrap();
}

/// With the edges' replication, a key lives on two edges that both receive its invalidations: the
/// client reads and fills on the second while the first is down (the fill under the second's own
/// lease), the second applies the key's invalidation, and a delete reaches every owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_and_fills_go_to_the_next_owner_while_the_first_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator(dir.path()).await;
    let r = relay(&c).await;
    let (ids, mut edges, client) = replicated_region(&r).await;
    let owners: Vec<usize> = dci_proto::ring::NodeRing::new(ids.clone())
        .owners(b"user:42", 2)
        .iter()
        .map(|o| ids.iter().position(|i| i == o).unwrap())
        .collect();
    let (first, second) = (owners[0], owners[1]);
    edges[first].take().unwrap().edge.stop().await.unwrap();

    let v = client
        .get_or_load("user:42", || async { Ok::<_, String>(Bytes::from("v1")) })
        .await
        .unwrap();
    assert_eq!(v, Bytes::from("v1"));
    let replica = edges[second].as_ref().unwrap();
    assert_eq!(
        replica.edge.store.get(b"user:42"),
        Some(Bytes::from("v1")),
        "filled there"
    );
    assert_eq!(
        client.get("user:42").await.unwrap(),
        Lookup::Hit(Bytes::from("v1"))
    );

    let p = Publisher::connect(vec![c.url()]).await.unwrap();
    p.invalidate("user:42").await.unwrap();
    let store = replica.edge.store.clone();
    eventually("the replica applies the key's invalidation", || {
        store.get(b"user:42").is_none()
    })
    .await;
    assert!(matches!(
        client.get("user:42").await.unwrap(),
        Lookup::Miss { .. }
    ));

    assert!(client.set("user:42", "v2", None).await.unwrap());
    assert!(client.delete("user:42").await.unwrap());
    assert!(
        store.get(b"user:42").is_none(),
        "deleted on the owner that answers"
    );
    for e in edges.into_iter().flatten() {
        e.edge.stop().await.unwrap();
    }
    r.stop().await.unwrap();
    c.stop().await.unwrap();
}

/// A service that names its publisher and restarts keeps its name: what it publishes after the
/// restart is logged, not answered with the seqs of what its earlier life published under the
/// same request numbers; likewise two publishers under one name at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_restarted_under_its_fixed_id_has_its_publishes_logged() {
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator(dir.path()).await;
    let named = || {
        Publisher::with_options(
            vec![c.url()],
            dci_sdk::PublisherOptions {
                publisher_id: "billing-7".into(),
                ..Default::default()
            },
        )
    };
    let mut seqs = Vec::new();
    for life in 0..3 {
        let p = named().await.unwrap();
        for i in 0..3 {
            seqs.push(p.invalidate(format!("life{life}:k{i}")).await.unwrap());
        }
    }
    assert_eq!(
        seqs,
        (1..=9).collect::<Vec<_>>(),
        "each publish logged once"
    );
    // Two at once under the name, each invalidating the same key as its first request: two
    // invalidations, each logged.
    let (a, b) = (named().await.unwrap(), named().await.unwrap());
    let (sa, sb) = (
        a.invalidate("same").await.unwrap(),
        b.invalidate("same").await.unwrap(),
    );
    assert_eq!((sa, sb), (10, 11));
    // A name as long as the coordinators take still leaves room for the tag.
    let long = Publisher::with_options(
        vec![c.url()],
        dci_sdk::PublisherOptions {
            publisher_id: "n".repeat(256),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(long.invalidate("k").await.unwrap(), 12);
    c.stop().await.unwrap();
}

/// An edge whose first relay answers but is cut off itself (it never reached a coordinator)
/// moves on to its next relay, and serves through it, instead of answering misses for as long
/// as the first one lasts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_leaves_a_relay_cut_off_itself_for_its_next_one() {
    let (_kept, nowhere) = refusing();
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator(dir.path()).await;
    let cut_off = relay_at(any_port(), vec![format!("http://{nowhere}")], 64 << 20).await;
    let healthy = relay(&c).await;
    let e = edge(EdgeConfig {
        max_staleness: Duration::from_secs(2),
        ..edge_cfg(vec![cut_off.url(), healthy.url()])
    })
    .await;
    let p = Publisher::connect(vec![c.url()]).await.unwrap();
    let seq = p.invalidate("k").await.unwrap();
    let link = e.edge.link.clone();
    let to = healthy.url();
    eventually("the edge on its second relay", || {
        lock(&link).connected_to.as_deref() == Some(to.as_str())
    })
    .await;
    wait_applied(&e, seq).await;
    wait_serving(&e).await;
    let cache = CacheClient::from_urls(vec![e.edge.url()]).unwrap();
    assert!(cache.set("k", "v", None).await.unwrap());
    assert_eq!(cache.get("k").await.unwrap(), Lookup::Hit(Bytes::from("v")));
    e.edge.stop().await.unwrap();
    cut_off.stop().await.unwrap();
    healthy.stop().await.unwrap();
    c.stop().await.unwrap();
}

/// Relays behind one address (a Kubernetes Service): an edge whose link lands on one cut off
/// itself leaves it all the same, though its list has no other URL, and its next connection
/// lands on one that is not. It used to stay, answering misses for as long as the relay lasted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_behind_a_service_leaves_a_relay_cut_off_itself() {
    let (_kept, nowhere) = refusing();
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator(dir.path()).await;
    let cut_off = relay_at(any_port(), vec![format!("http://{nowhere}")], 64 << 20).await;
    let healthy = relay(&c).await;
    // The first connection goes to the relay cut off.
    let service = support::proxy::Proxy::balancing(vec![cut_off.addr, healthy.addr]).await;
    let e = edge(EdgeConfig {
        max_staleness: Duration::from_secs(2),
        ..edge_cfg(vec![service.url()])
    })
    .await;
    let p = Publisher::connect(vec![c.url()]).await.unwrap();
    let seq = p.invalidate("k").await.unwrap();
    wait_applied(&e, seq).await;
    wait_serving(&e).await;
    let cache = CacheClient::from_urls(vec![e.edge.url()]).unwrap();
    assert!(cache.set("k", "v", None).await.unwrap());
    assert_eq!(cache.get("k").await.unwrap(), Lookup::Hit(Bytes::from("v")));
    assert!(lock(&e.edge.link).connects >= 2, "it moved on");
    e.edge.stop().await.unwrap();
    cut_off.stop().await.unwrap();
    healthy.stop().await.unwrap();
    c.stop().await.unwrap();
}

/// A relay that has never reached a coordinator (a wrong address at deploy time, a partition)
/// knows no shard; the edges behind it have nothing vouching for what they hold and answer
/// misses, until the coordinator is there: then they serve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edges_behind_a_relay_that_never_reached_a_coordinator_do_not_serve() {
    let addr = nowhere();
    let r = relay_at(any_port(), vec![format!("http://{addr}")], 64 << 20).await;
    let e = edge(EdgeConfig {
        max_staleness: Duration::from_secs(1),
        ..edge_cfg(vec![r.url()])
    })
    .await;
    wait_connected(&e).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let cache = CacheClient::from_urls(vec![e.edge.url()]).unwrap();
    assert!(cache.set("k", "v", None).await.unwrap());
    assert!(
        matches!(cache.get("k").await.unwrap(), Lookup::Miss { .. }),
        "served with no coordinator ever heard of"
    );
    assert!(
        e.edge
            .stale_misses
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );

    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(CoordinatorConfig {
        listen: addr,
        data_dir: dir.path().to_path_buf(),
        ..Default::default()
    })
    .await
    .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        assert!(cache.set("k", "v", None).await.unwrap());
        if cache.get("k").await.unwrap() == Lookup::Hit(Bytes::from("v")) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never served after the coordinator came"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    e.edge.stop().await.unwrap();
    r.stop().await.unwrap();
    c.stop().await.unwrap();
}

/// Values up to the edge's `max_value_len` (8 MiB by default) go in and come back out through
/// the SDK, whose gRPC limits must not be the smaller ones; a larger one is refused by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_as_large_as_the_edge_takes_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator(dir.path()).await;
    let r = relay(&c).await;
    let e = edge(edge_cfg(vec![r.url()])).await;
    wait_serving(&e).await;
    let cache = CacheClient::from_urls(vec![e.edge.url()]).unwrap();
    let big = Bytes::from(vec![7u8; 8 << 20]);
    assert!(cache.set("big", big.clone(), None).await.unwrap());
    assert_eq!(cache.get("big").await.unwrap(), Lookup::Hit(big));
    let err = cache
        .set("bigger", vec![7u8; (8 << 20) + 1], None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("more than the maximum"), "{err}");
    // SetMany is all or nothing: the good entry beside the refused one is not stored either.
    let mut raw = pb::cache_client::CacheClient::connect(e.edge.url())
        .await
        .unwrap();
    let set = |key: &str, len: usize| pb::SetRequest {
        key: Bytes::from(key.to_string()),
        value: Bytes::from(vec![1u8; len]),
        lease: None,
        ttl_ms: 0,
        tags: vec![],
        version: None,
    };
    let err = raw
        .set_many(pb::SetManyRequest {
            entries: vec![set("good", 10), set("bigger", (8 << 20) + 1)],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    assert!(matches!(
        cache.get("good").await.unwrap(),
        Lookup::Miss { .. }
    ));
    // A GetMany's answer is built whole before it is sent: the large value asked for 10,000
    // times would have been 80 GiB of it. The edge answers so many bytes at most, and the SDK
    // asks for the keys in halves then: twenty of them come back whole, and in order.
    let err = raw
        .get_many(pb::GetManyRequest {
            keys: vec![Bytes::from_static(b"big"); 10_000],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err}");
    assert!(err.message().contains("ask for fewer at a time"), "{err}");
    let keys: Vec<&str> = (0..20)
        .map(|i| if i == 7 { "good" } else { "big" })
        .collect();
    let got = cache.get_many(keys).await.unwrap();
    assert_eq!(got.len(), 20);
    for (i, g) in got.iter().enumerate() {
        match (i, g) {
            (7, Lookup::Miss { .. }) => {}
            (_, Lookup::Hit(v)) if i != 7 => assert!(v.len() == 8 << 20 && v[0] == 7),
            (_, Lookup::Hit(v)) => panic!("key {i}: a hit of {} bytes", v.len()),
            (_, miss) => panic!("key {i}: {miss:?}"),
        }
    }
    e.edge.stop().await.unwrap();

    // Its values are kept in parts of the capacity (by default four per CPU): each part holds
    // a value as large as the edge takes, where one larger than a part was answered as stored
    // and never kept (64 MiB in 8 parts here, 256 MiB on 16 CPUs).
    let e = edge(EdgeConfig {
        capacity: 64 << 20,
        ..edge_cfg(vec![r.url()])
    })
    .await;
    wait_serving(&e).await;
    let cache = CacheClient::from_urls(vec![e.edge.url()]).unwrap();
    let big = Bytes::from(vec![7u8; 8 << 20]);
    assert!(cache.set("big", big.clone(), None).await.unwrap());
    assert_eq!(cache.get("big").await.unwrap(), Lookup::Hit(big));
    e.edge.stop().await.unwrap();
    // A capacity too small for such a value refuses it, saying so.
    let e = edge(EdgeConfig {
        capacity: 1 << 20,
        ..edge_cfg(vec![r.url()])
    })
    .await;
    wait_serving(&e).await;
    let cache = CacheClient::from_urls(vec![e.edge.url()]).unwrap();
    let err = cache
        .set("big", vec![7u8; 2 << 20], None)
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("more than this edge keeps in one entry"),
        "{err}"
    );
    let fits = Bytes::from(vec![7u8; 500_000]);
    assert!(cache.set("fits", fits.clone(), None).await.unwrap());
    assert_eq!(cache.get("fits").await.unwrap(), Lookup::Hit(fits));
    e.edge.stop().await.unwrap();
    r.stop().await.unwrap();
    c.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_and_ring_filters_deliver_only_what_they_should() {
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator(dir.path()).await;
    let r = relay(&c).await;
    let users = edge(EdgeConfig {
        prefixes: vec!["user:".into()],
        ..edge_cfg(vec![r.url()])
    })
    .await;
    let ids: Vec<String> = (0..3).map(|i| format!("ring-{i}")).collect();
    let mut ring = Vec::new();
    for id in &ids {
        ring.push(
            edge(EdgeConfig {
                node_id: id.clone(),
                ring_nodes: ids.clone(),
                ..edge_cfg(vec![r.url()])
            })
            .await,
        );
    }
    wait_in_stream(&users).await;
    for e in &ring {
        wait_in_stream(e).await;
    }
    let p = Publisher::connect(vec![c.url()]).await.unwrap();
    let mut all = keys(0..300, "user:");
    all.extend(keys(0..300, "item:"));
    let head = publish_all(&p, &all).await;
    wait_applied(&users, head).await;
    for e in &ring {
        wait_applied(e, head).await;
    }
    let got = lock(&users.keys).clone();
    assert_eq!(got.len(), 300);
    assert!(got.iter().all(|k| k.starts_with(b"user:")));
    let mut owners = std::collections::HashMap::new();
    for e in &ring {
        let got = lock(&e.keys).clone();
        assert!(
            !got.is_empty() && got.len() < all.len(),
            "{} got {}",
            e.edge.node_id,
            got.len()
        );
        for k in got {
            *owners.entry(k).or_insert(0) += 1;
        }
    }
    assert_eq!(owners.len(), all.len(), "every key reached its owner");
    assert!(owners.values().all(|&n| n == 1), "and only its owner");
    // The SDK routes with the same ring: a key lands on the edge that receives its invalidations.
    let client = CacheClient::new(
        ids.iter()
            .cloned()
            .zip(ring.iter().map(|e| e.edge.url()))
            .collect(),
    )
    .unwrap();
    client.set("user:7", "v", None).await.unwrap();
    let holder = ring
        .iter()
        .find(|e| e.edge.store.get(b"user:7").is_some())
        .unwrap();
    assert!(lock(&holder.keys).iter().any(|k| k.as_ref() == b"user:7"));
    // A key an edge gets no invalidations for is neither served nor stored there (nothing would
    // ever remove it): refused with the reason, on reads and fills alike; `get_or_load` passes the
    // cache by (the key's value comes from the loader).
    let elsewhere = ring.iter().find(|e| !std::ptr::eq(*e, holder)).unwrap();
    for (e, key, why) in [
        (&users, "item:1", "prefixes \"user:\""),
        (elsewhere, "user:7", "owns on its ring"),
    ] {
        let direct = CacheClient::from_urls(vec![e.edge.url()]).unwrap();
        match direct.get(key).await {
            Err(dci_sdk::Error::Refused(m)) => assert!(m.contains(why), "{m}"),
            other => panic!("{key} on {}: {other:?}", e.edge.node_id),
        }
        let load = || async { Ok::<_, String>(Bytes::from("loaded")) };
        assert_eq!(direct.get_or_load(key, load).await.unwrap(), "loaded");
        assert!(!direct.set(key, "v", None).await.unwrap(), "not stored");
        assert!(e.edge.store.get(key.as_bytes()).is_none());
    }
    users.edge.stop().await.unwrap();
    for e in ring {
        e.edge.stop().await.unwrap();
    }
    r.stop().await.unwrap();
    c.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_takes_new_relays_and_ring_while_it_runs() {
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator(dir.path()).await;
    let (r1, r2) = (relay(&c).await, relay(&c).await);
    let ids: Vec<String> = vec!["e0".into(), "e1".into()];
    let cfg = |id: &str, ring: &[String], relays: Vec<String>| EdgeConfig {
        listen: any_port(),
        node_id: id.into(),
        ring_nodes: ring.to_vec(),
        ..edge_cfg(relays)
    };
    let e0 = edge(cfg("e0", &ids, vec![r1.url()])).await;
    let e1 = edge(cfg("e1", &ids, vec![r1.url()])).await;
    wait_in_stream(&e0).await;
    wait_in_stream(&e1).await;
    let p = Publisher::connect(vec![c.url()]).await.unwrap();
    let ks = keys(0..200, "k:");
    let head = publish_all(&p, &ks).await;
    wait_applied(&e0, head).await;
    let client = CacheClient::new(
        ids.iter()
            .cloned()
            .zip([e0.edge.url(), e1.edge.url()])
            .collect(),
    )
    .unwrap();
    for k in &ks {
        assert!(client.set(k.clone(), "v1", None).await.unwrap());
    }
    let held = |e: &Watched| -> Vec<String> {
        ks.iter()
            .filter(|k| e.edge.store.get(k.as_bytes()).is_some())
            .cloned()
            .collect()
    };
    let (kept, gained) = (held(&e0), held(&e1));
    assert!(!kept.is_empty() && !gained.is_empty());
    let direct = CacheClient::from_urls(vec![e0.edge.url()]).unwrap();
    assert!(matches!(
        direct.get(gained[0].clone()).await,
        Err(dci_sdk::Error::Refused(_))
    ));

    // Alone on the ring, following the other relay: told while it runs.
    let alone = vec!["e0".to_string()];
    let r = e0
        .edge
        .reconfigure(EdgeConfig {
            capacity: 1 << 20,
            ..cfg("e0", &alone, vec![r2.url()])
        })
        .unwrap();
    assert_eq!(r.taken, ["relays", "ring_nodes"]);
    assert_eq!(r.need_restart, ["capacity"], "not taken: {r:?}");
    eventually("e0 follows the new relay", || {
        lock(&e0.edge.link).connected_to.as_deref() == Some(r2.url().as_str())
    })
    .await;
    // What it kept is still served; what it gained is served from now on.
    assert_eq!(held(&e0), kept, "values of keys it still follows are kept");
    let k = gained[0].clone();
    let lease = match direct.get(k.clone()).await.unwrap() {
        Lookup::Miss { lease } => lease,
        other => panic!("{other:?}"),
    };
    assert!(direct.set(k.clone(), "v2", Some(lease)).await.unwrap());
    assert_eq!(
        direct.get(k.clone()).await.unwrap(),
        Lookup::Hit("v2".into())
    );
    // ... and its invalidations reach it through the new relay, with the new filter.
    let seq = publish_all(&p, std::slice::from_ref(&k)).await;
    wait_applied(&e0, seq).await;
    assert!(e0.edge.store.get(k.as_bytes()).is_none(), "{k} invalidated");
    // A reader's miss, whose fill comes only after the key was given up and taken again.
    let before = match direct.get(k.clone()).await.unwrap() {
        Lookup::Miss { lease } => lease,
        other => panic!("{other:?}"),
    };

    // A config it cannot run with changes nothing.
    let err = e0
        .edge
        .reconfigure(cfg("e0", &["e1".to_string()], vec![r1.url()]))
        .unwrap_err();
    assert!(err.to_string().contains("not one of ring_nodes"), "{err}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        lock(&e0.edge.link).connected_to.as_deref(),
        Some(r2.url().as_str())
    );

    // Back on a ring of two: the values of the keys it gave up are dropped there and then (no
    // invalidation of them reaches it any more, so if it took them again later they could be
    // stale), and they are refused again.
    assert!(direct.set(k.clone(), "v3", None).await.unwrap());
    let r = e0
        .edge
        .reconfigure(cfg("e0", &ids, vec![r2.url()]))
        .unwrap();
    assert_eq!(r.taken, ["ring_nodes"]);
    eventually("e0 dropped what it no longer follows", || {
        e0.edge.store.get(k.as_bytes()).is_none()
    })
    .await;
    assert_eq!(held(&e0), kept);
    wait_in_stream(&e0).await;
    assert!(matches!(
        direct.get(k.clone()).await,
        Err(dci_sdk::Error::Refused(_))
    ));
    // Nothing was missed over the changes: a kept key's invalidation still lands.
    let seq = publish_all(&p, &kept[..1]).await;
    wait_applied(&e0, seq).await;
    assert!(e0.edge.store.get(kept[0].as_bytes()).is_none());
    // The given-up key is written meanwhile: its invalidation does not reach e0. Alone again,
    // e0 follows it anew, and the fill under the lease of before is refused: that lease's
    // reader loaded the row before this write, and e0 has no tombstone of it.
    let seq = publish_all(&p, std::slice::from_ref(&k)).await;
    wait_applied(&e0, seq).await;
    e0.edge
        .reconfigure(cfg("e0", &alone, vec![r2.url()]))
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while direct.get(k.clone()).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "e0 follows the key again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_in_stream(&e0).await;
    assert!(
        !direct
            .set(k.clone(), "loaded before the write", Some(before))
            .await
            .unwrap(),
        "a fill under a lease from before the key was given up"
    );
    e0.edge
        .reconfigure(cfg("e0", &ids, vec![r2.url()]))
        .unwrap();

    // The SDK's clients take new edges the same way, clones included.
    let one = CacheClient::new(vec![("e0".into(), e0.edge.url())]).unwrap();
    let clone = one.clone();
    one.set_edges(
        ids.iter()
            .cloned()
            .zip([e0.edge.url(), e1.edge.url()])
            .collect(),
    )
    .unwrap();
    let theirs = gained[1].clone();
    assert!(clone.set(theirs.clone(), "v4", None).await.unwrap());
    assert_eq!(
        e1.edge.store.get(theirs.as_bytes()),
        Some(Bytes::from("v4"))
    );
    assert!(
        one.set_edges(Vec::new()).is_err(),
        "no edge at all is refused"
    );
    assert_eq!(clone.get(theirs).await.unwrap(), Lookup::Hit("v4".into()));

    e0.edge.stop().await.unwrap();
    e1.edge.stop().await.unwrap();
    r1.stop().await.unwrap();
    r2.stop().await.unwrap();
    c.stop().await.unwrap();
}

/// A near cache moved to another relay while it runs keeps what it holds and gets, through the
/// new relay, the invalidations published after the old one stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_near_cache_takes_new_relays_while_it_runs() {
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator(dir.path()).await;
    let (old, new) = (relay(&c).await, relay(&c).await);
    let (near, p) = near_cache_caught_up(&c, &old).await;
    assert!(near.set("kept", "v", None));
    assert!(near.set("dropped", "v", None));
    assert!(matches!(
        near.set_relays(vec![]),
        Err(dci_sdk::Error::Url(..))
    ));
    assert!(matches!(
        near.set_relays(vec!["127.0.0.1:1".into()]),
        Err(dci_sdk::Error::Url(..))
    ));
    near.set_relays(vec![new.url()]).unwrap();
    old.stop().await.unwrap();
    let seq = p.invalidate("dropped").await.unwrap();
    let n = near.clone();
    eventually(
        "the invalidation applied through the new relay",
        move || n.applied().iter().any(|&(_, _, s)| s >= seq) && n.is_fresh(),
    )
    .await;
    assert!(matches!(near.get(b"dropped"), Lookup::Miss { .. }));
    assert_eq!(near.get(b"kept"), Lookup::Hit(Bytes::from("v")));
    near.stop();
    new.stop().await.unwrap();
    c.stop().await.unwrap();
}

/// A near cache following `r`, caught up with `c` (an invalidation published and applied), and
/// a publisher to `c`.
async fn near_cache_caught_up(c: &Coordinator, r: &Relay) -> (dci_sdk::NearCache, Publisher) {
    let near = dci_sdk::NearCache::start(dci_sdk::NearCacheOptions {
        relays: vec![r.url()],
        ..Default::default()
    })
    .unwrap();
    let p = Publisher::connect(vec![c.url()]).await.unwrap();
    let head = p.invalidate("warm").await.unwrap();
    let n = near.clone();
    eventually("near cache caught up", move || {
        n.applied().iter().any(|&(_, _, s)| s >= head) && n.is_fresh()
    })
    .await;
    (near, p)
}

/// A near cache's values filled with tags go with a tag invalidation, as an edge's do; a fill
/// loaded before one, with its tag, is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_near_cache_drops_the_values_of_an_invalidated_tag() {
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator(dir.path()).await;
    let r = relay(&c).await;
    let (near, p) = near_cache_caught_up(&c, &r).await;
    let v = near
        .get_or_load("page:1", || async {
            Ok::<_, std::io::Error>(Fill::new("v").tagged(["row:7"]))
        })
        .await
        .unwrap();
    assert_eq!(v, "v");
    assert!(near.set("page:2", Fill::new("v").tagged(["row:8"]), None));
    assert!(near.set("row:7", "v", None));
    let Lookup::Miss { lease } = near.get(b"page:3") else {
        panic!("a miss")
    };
    let seq = p.invalidate_tag("row:7").await.unwrap();
    let n = near.clone();
    eventually("the tag's invalidation applied", move || {
        n.applied().iter().any(|&(_, _, s)| s >= seq)
    })
    .await;
    assert!(matches!(near.get(b"page:1"), Lookup::Miss { .. }));
    assert_eq!(near.get(b"page:2"), Lookup::Hit(Bytes::from("v")));
    assert_eq!(
        near.get(b"row:7"),
        Lookup::Hit(Bytes::from("v")),
        "a key is no tag"
    );
    let tagged = |tag| Fill::new("v").tagged([tag]);
    assert!(!near.set("page:3", tagged("row:7"), Some(lease)));
    assert!(near.set("page:3", tagged("row:9"), Some(lease)));
    near.stop();
    r.stop().await.unwrap();
    c.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_takes_new_upstreams_while_it_runs() {
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator(dir.path()).await;
    let (ra, rb) = (relay(&c).await, relay(&c).await);
    let cfg = |upstream: Vec<String>| RelayConfig {
        listen: any_port(),
        upstream,
        region: "r".into(),
        ring_bytes: 64 << 20,
        ..Default::default()
    };
    let x = Relay::start(cfg(vec![ra.url()])).await.unwrap();
    let e = edge(edge_cfg(vec![x.url()])).await;
    wait_in_stream(&e).await;
    let p = Publisher::connect(vec![c.url()]).await.unwrap();
    let head = publish_all(&p, &keys(0..100, "a:")).await;
    wait_applied(&e, head).await;

    let r = x.reconfigure(cfg(vec![rb.url()])).unwrap();
    assert_eq!(r.taken, ["upstream"]);
    assert!(r.need_restart.is_empty(), "{r:?}");
    eventually("the relay follows its new upstream", || {
        lock(&x.core.links[0]).connected_to.as_deref() == Some(rb.url().as_str())
    })
    .await;
    // The old one can go: nothing below the relay depends on it any more.
    ra.stop().await.unwrap();
    let head = publish_all(&p, &keys(0..100, "b:")).await;
    wait_applied(&e, head).await;
    let got = lock(&e.keys).clone();
    assert_eq!(got.len(), 200, "each key once, none missed over the change");

    // Another number of groups (shards followed) needs a restart: refused, nothing changes.
    let err = x
        .reconfigure(RelayConfig {
            upstream_groups: vec![vec![c.url()]],
            ..cfg(vec![rb.url()])
        })
        .unwrap_err();
    assert!(err.to_string().contains("only at a restart"), "{err}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        lock(&x.core.links[0]).connected_to.as_deref(),
        Some(rb.url().as_str())
    );
    e.edge.stop().await.unwrap();
    x.stop().await.unwrap();
    rb.stop().await.unwrap();
    c.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_edge_stops_serving_after_max_staleness_then_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator(dir.path()).await;
    let r = relay(&c).await;
    let addr = r.addr;
    let e = edge(EdgeConfig {
        max_staleness: Duration::from_millis(1500),
        ..edge_cfg(vec![r.url()])
    })
    .await;
    wait_in_stream(&e).await;
    let p = Publisher::connect(vec![c.url()]).await.unwrap();
    let head = publish_all(&p, &keys(0..1, "warm:")).await;
    wait_applied(&e, head).await;
    let cache = CacheClient::from_urls(vec![e.edge.url()]).unwrap();
    assert!(cache.set("k", "v", None).await.unwrap());
    assert_eq!(cache.get("k").await.unwrap(), Lookup::Hit(Bytes::from("v")));

    r.stop().await.unwrap();
    let held = hold(addr);
    let started = tokio::time::Instant::now();
    loop {
        if matches!(cache.get("k").await.unwrap(), Lookup::Miss { .. }) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "still serving long after the bound"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        started.elapsed() >= Duration::from_millis(1000),
        "stopped serving before the bound"
    );
    assert!(
        e.edge
            .stale_misses
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );

    // Back in contact and caught up: it serves again.
    drop(held);
    let r = relay_at(addr, vec![c.url()], 64 << 20).await;
    let cache2 = cache.clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if cache2.get("k").await.unwrap() == Lookup::Hit(Bytes::from("v")) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never served again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    e.edge.stop().await.unwrap();
    r.stop().await.unwrap();
    c.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_near_cache_follows_relays_with_the_same_guarantees() {
    use dci_sdk::{NearCache, NearCacheOptions};
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator(dir.path()).await;
    let r = relay(&c).await;
    let too_many = NearCache::start(NearCacheOptions {
        relays: vec![r.url()],
        shard_count: dci_proto::types::MAX_SHARDS + 1,
        ..Default::default()
    });
    assert!(
        matches!(&too_many, Err(dci_sdk::Error::Refused(m)) if m.contains("shard_count")),
        "a shard count no tier can have is refused"
    );
    let too_short = NearCache::start(NearCacheOptions {
        relays: vec![r.url()],
        max_staleness: Duration::from_millis(200),
        ..Default::default()
    });
    assert!(
        matches!(&too_short, Err(dci_sdk::Error::Refused(m)) if m.contains("max_staleness must be at least 1s")),
        "a bound shorter than two heartbeats is refused, as an edge refuses it"
    );
    let near = NearCache::start(NearCacheOptions {
        relays: vec![r.url()],
        prefixes: vec!["user:".into()],
        ..Default::default()
    })
    .unwrap();
    let p = Publisher::connect(vec![c.url()]).await.unwrap();
    let head = publish_all(&p, &keys(0..1, "warm:")).await;
    let n = near.clone();
    eventually("near cache caught up", move || {
        n.applied().iter().any(|&(_, _, s)| s >= head) && n.is_fresh()
    })
    .await;

    assert!(near.set("user:1", "v1", None));
    assert_eq!(near.get(b"user:1"), Lookup::Hit(Bytes::from("v1")));
    let seq = p.invalidate("user:1").await.unwrap();
    let n = near.clone();
    eventually("invalidation applied", move || {
        n.get(b"user:1") != Lookup::Hit(Bytes::from("v1"))
    })
    .await;

    let Lookup::Miss { lease } = near.get(b"user:2") else {
        panic!("expected a miss")
    };
    let seq2 = p.invalidate("user:2").await.unwrap();
    assert!(seq2 > seq);
    let n = near.clone();
    eventually("second invalidation applied", move || {
        n.applied().iter().any(|&(_, _, s)| s >= seq2)
    })
    .await;
    assert!(
        !near.set("user:2", "stale", Some(lease)),
        "the stale fill is refused"
    );
    let v = near
        .get_or_load("user:2", || async {
            Ok::<_, std::io::Error>(Bytes::from("fresh"))
        })
        .await
        .unwrap();
    assert_eq!(v, Bytes::from("fresh"));
    assert_eq!(near.get(b"user:2"), Lookup::Hit(Bytes::from("fresh")));
    // Outside its prefixes no invalidation reaches it: such a key is loaded, never kept.
    assert!(!near.set("item:1", "v", None));
    let v = near
        .get_or_load("item:1", || async {
            Ok::<_, std::io::Error>(Bytes::from("row"))
        })
        .await
        .unwrap();
    assert_eq!(v, Bytes::from("row"));
    assert!(matches!(near.get(b"item:1"), Lookup::Miss { .. }));
    // Prefixes remove their keys, several in one request as well.
    for k in ["user:7:a", "user:7:b", "user:70", "user:8:a", "user:9:a"] {
        assert!(near.set(k, "v", None));
    }
    let seqs = p
        .publish(vec![
            dci_proto::Invalidation::prefix("user:7:"),
            dci_proto::Invalidation::key("user:1"),
            dci_proto::Invalidation::prefix("user:9"),
        ])
        .await
        .unwrap();
    let n = near.clone();
    eventually("the prefixes applied", move || {
        n.applied().iter().any(|&(_, _, s)| s >= seqs[2])
    })
    .await;
    let hit = |k: &str| matches!(near.get(k.as_bytes()), Lookup::Hit(_));
    let kept: Vec<&str> = ["user:7:a", "user:7:b", "user:70", "user:8:a", "user:9:a"]
        .into_iter()
        .filter(|k| hit(k))
        .collect();
    assert_eq!(kept, ["user:70", "user:8:a"]);
    near.stop();
    r.stop().await.unwrap();
    c.stop().await.unwrap();
}

/// `Publisher::wait_applied` returns once every cache of the tree (edges, near caches) has
/// applied what the publisher had answered: right after, each has, without waiting further. A
/// cache whose applying is stuck is named when the time is up; given longer than its staleness
/// bound, the wait ends with it named as past its bound (it then serves none of it); once it
/// goes on, the wait succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_waits_until_every_cache_applied_what_it_published() {
    use dci_sdk::{NearCache, NearCacheOptions};
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator(dir.path()).await;
    let r = relay(&c).await;
    let cfg = |id: &str| EdgeConfig {
        region: "eu".into(),
        node_id: id.into(),
        ..edge_cfg(vec![r.url()])
    };
    let free = edge(cfg("free")).await;
    // Its applying blocks while `hold` is set (a stuck disk, a lock held): it stays in the tree
    // at what it had applied. On a runtime of its own, which that blocks whole.
    let hold = Arc::new(AtomicBool::new(false));
    let h = hold.clone();
    let cb: Arc<dyn Fn(&Batch) + Send + Sync> = Arc::new(move |_: &Batch| {
        while h.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    let held_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let bound = Duration::from_secs(1);
    let held_cfg = EdgeConfig {
        listen: any_port(),
        max_staleness: bound,
        ..cfg("held")
    };
    let held = held_rt
        .spawn(EdgeNode::start_with(held_cfg, Some(cb)))
        .await
        .unwrap()
        .unwrap();
    let near = NearCache::start(NearCacheOptions {
        relays: vec![r.url()],
        node_id: "near".into(),
        region: "us".into(),
        ..Default::default()
    })
    .unwrap();
    let p = Publisher::connect(vec![c.url()]).await.unwrap();
    p.invalidate("warm").await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let applied = loop {
        let applied = p.wait_applied(Duration::from_secs(10)).await.unwrap();
        if applied.caches == 3 || tokio::time::Instant::now() > deadline {
            break applied;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        applied,
        dci_sdk::Applied {
            caches: 3,
            regions: vec!["eu".into(), "us".into()],
            past_bound: Vec::new(),
        }
    );

    let caches = [free.edge.url(), held.url()].map(|u| CacheClient::from_urls(vec![u]).unwrap());
    for cache in &caches {
        let Lookup::Miss { lease } = cache.get("user:1").await.unwrap() else {
            panic!("nothing stored yet")
        };
        assert!(cache.set("user:1", "v1", Some(lease)).await.unwrap());
    }
    assert!(near.set("user:1", "v1", None));
    let seq = p.invalidate("user:1").await.unwrap();
    p.wait_applied(Duration::from_secs(10)).await.unwrap();
    let at = |applied: Vec<(u32, u64, Seq)>| applied.iter().map(|a| a.2).max();
    assert!(at(free.edge.store.applied()) >= Some(seq));
    assert!(at(held.store.applied()) >= Some(seq));
    assert!(at(near.applied()) >= Some(seq));
    for cache in &caches {
        assert!(matches!(
            cache.get("user:1").await.unwrap(),
            Lookup::Miss { .. }
        ));
    }
    assert!(matches!(near.get(b"user:1"), Lookup::Miss { .. }));

    hold.store(true, Ordering::Relaxed);
    let next = p.invalidate("user:2").await.unwrap();
    // Within its bound (and the margin past it), the cache may still serve what it held.
    let got = p.wait_applied(bound).await;
    let Err(dci_sdk::Error::NotApplied(lagging)) = got else {
        panic!("a cache that has not applied it is waited for: {got:?}")
    };
    assert_eq!(lagging.len(), 1, "{lagging:?}");
    assert_eq!(
        (lagging[0].node_id.as_str(), lagging[0].seq),
        ("held", next)
    );
    assert!(dci_sdk::Error::NotApplied(lagging)
        .to_string()
        .starts_with(&format!(
            "not applied in time by held (eu) at seq {seq} of {next}"
        )),);
    let called = tokio::time::Instant::now();
    let applied = p.wait_applied(Duration::from_secs(20)).await.unwrap();
    assert!(
        called.elapsed() >= bound + dci_proto::applied::BOUND_SLACK,
        "not before its bound has passed: {:?}",
        called.elapsed()
    );
    assert_eq!(
        (applied.caches, applied.past_bound.len()),
        (3, 1),
        "{applied:?}"
    );
    assert_eq!(applied.past_bound[0].node_id, "held");
    assert_eq!(applied.past_bound[0].bound, Some(bound));
    hold.store(false, Ordering::Relaxed);
    p.wait_applied(Duration::from_secs(10)).await.unwrap();
    assert!(at(held.store.applied()) >= Some(next));
    near.stop();
    held_rt.shutdown_background();
    r.stop().await.unwrap();
    c.stop().await.unwrap();
}

/// Callers of one `Publisher` share requests. One caller's bad entry must not refuse the others'
/// good ones that happened to ride in the same request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_entry_is_refused_alone_though_it_shared_a_request() {
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator(dir.path()).await;
    // One request in flight at a time: everything called meanwhile goes as the next request.
    let p = Publisher::with_options(
        vec![c.url()],
        dci_sdk::PublisherOptions {
            max_in_flight: 1,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    for round in 0..5 {
        let calls: Vec<_> = (0..40)
            .map(|i| {
                let p = p.clone();
                let key = if i == 17 {
                    String::new() // empty: refused
                } else {
                    format!("r{round}:k{i}")
                };
                tokio::spawn(async move { p.invalidate(key).await })
            })
            .collect();
        let mut seqs = Vec::new();
        for (i, call) in calls.into_iter().enumerate() {
            match call.await.unwrap() {
                Ok(seq) => {
                    assert_ne!(i, 17, "the empty key was accepted");
                    seqs.push(seq);
                }
                Err(e) => {
                    assert_eq!(i, 17, "a good key was refused: {e}");
                    assert!(matches!(e, dci_sdk::Error::Refused(_)), "{e}");
                    assert!(e.to_string().contains("key is empty"), "{e}");
                }
            }
        }
        assert_eq!(seqs.len(), 39);
        seqs.sort();
        seqs.dedup();
        assert_eq!(seqs.len(), 39, "each good key has its own seq");
    }
    c.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_publishes_single_batch_and_streaming_forms_in_order() {
    use futures::StreamExt;
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator(dir.path()).await;
    let p = Publisher::connect(vec![c.url()]).await.unwrap();
    let one = p.invalidate("a").await.unwrap();
    let many = p
        .publish(vec![
            dci_proto::Invalidation::key("b"),
            dci_proto::Invalidation::key("c"),
        ])
        .await
        .unwrap();
    assert_eq!(many, vec![one + 1, one + 2]);
    let seqs: Vec<Seq> = p
        .publish_stream(
            futures::stream::iter((0..500).map(|i| dci_proto::Invalidation::key(format!("s{i}")))),
            64,
        )
        .map(|r| r.unwrap())
        .collect()
        .await;
    assert_eq!(seqs.len(), 500);
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order");
    // Refused input comes back as a refusal, not a retry loop.
    let err = p.invalidate("").await.unwrap_err();
    assert!(matches!(err, dci_sdk::Error::Refused(_)), "{err}");
    c.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_serves_prometheus_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let c = metered_coordinator(dir.path()).await;
    let r = Relay::start(RelayConfig {
        listen: any_port(),
        upstream: vec![c.url()],
        metrics_listen: Some(any_port()),
        ..Default::default()
    })
    .await
    .unwrap();
    let e = edge(EdgeConfig {
        metrics_listen: Some(any_port()),
        ..edge_cfg(vec![r.url()])
    })
    .await;
    wait_in_stream(&e).await;
    let p = Publisher::connect(vec![c.url()]).await.unwrap();
    let head = publish_all(&p, &keys(0..20, "m:")).await;
    wait_applied(&e, head).await;
    let cache = CacheClient::from_urls(vec![e.edge.url()]).unwrap();
    let _ = cache.get("m:1").await.unwrap();

    // The counters follow the applied seq that `wait_applied` looks at, a moment later.
    let edge_metrics = scrape_until(e.edge.metrics_addr.unwrap(), |m| {
        m.contains("dci_propagation_seconds_count 20")
    })
    .await;
    assert!(
        edge_metrics.contains(&format!(
            "dci_applied_seq{{shard=\"0\",epoch=\"{}\"}} {head}",
            c.epoch
        )),
        "{edge_metrics}"
    );
    assert!(
        edge_metrics.contains("dci_cache_misses_total 1"),
        "{edge_metrics}"
    );
    let relay_metrics = scrape_until(r.metrics_addr.unwrap(), |m| {
        m.contains("dci_propagation_seconds_count 20")
    })
    .await;
    assert!(relay_metrics.contains("dci_receivers 1"), "{relay_metrics}");
    // Every tier times each entry from the publish call to itself.
    let coord_metrics = scrape(c.metrics_addr.unwrap()).await;
    assert!(
        coord_metrics.contains("dci_propagation_seconds_count 20"),
        "{coord_metrics}"
    );
    assert!(
        coord_metrics.contains(&format!(
            "dci_log_head_seq{{shard=\"0\",epoch=\"{}\"}} {head}",
            c.epoch
        )),
        "{coord_metrics}"
    );
    // An edge caught up says it serves values; cut off past its bound, that it does not.
    assert!(
        edge_metrics.contains("dci_serves_hits{shard=\"0\"} 1"),
        "{edge_metrics}"
    );

    // The chart's alerting rules ask only for metrics that some node serves.
    let served: HashSet<&str> = [&coord_metrics, &relay_metrics, &edge_metrics]
        .iter()
        .flat_map(|m| m.lines())
        .filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next())
        .collect();
    let asked = alert_metrics();
    assert!(asked.len() >= 10, "{asked:?}");
    let charted = dashboard_metrics();
    assert!(charted.len() >= 15, "{charted:?}");
    for name in asked.iter().chain(&charted) {
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        assert!(
            served.contains(family),
            "an alert or the dashboard asks for {name}, which no node serves"
        );
    }
    // Each node says what it is, for the dashboard's joins.
    for (m, info) in [
        (
            &coord_metrics,
            format!("dci_node_info{{version=\"{}\",role=\"coordinator\",node_id=\"coordinator-0\",shard=\"0\"}} 1", env!("CARGO_PKG_VERSION")),
        ),
        (&relay_metrics, "role=\"relay\",".to_string()),
        (&edge_metrics, "role=\"edge\",".to_string()),
    ] {
        let line = m.lines().find(|l| l.starts_with("dci_node_info{"));
        assert!(line.is_some_and(|l| l.contains(&info)), "{info} in {m}");
        assert!(line.is_some_and(|l| l.ends_with("} 1")), "{line:?}");
    }
    e.edge.stop().await.unwrap();
    r.stop().await.unwrap();
    c.stop().await.unwrap();
}

/// Every metric the Grafana dashboard's panels chart, each query checked to parse as PromQL
/// (with Grafana's variables as it fills them in) and each panel to say what it shows.
fn dashboard_metrics() -> HashSet<String> {
    let dash: serde_json::Value = serde_json::from_str(&chart_file("dashboard.json")).unwrap();
    let mut names = HashSet::new();
    let mut places = HashSet::new();
    for panel in dash["panels"].as_array().unwrap() {
        let title = panel["title"].as_str().unwrap();
        assert!(
            panel["description"].as_str().is_some_and(|d| !d.is_empty()),
            "{title}"
        );
        let at = &panel["gridPos"];
        assert!(
            places.insert((at["x"].as_u64(), at["y"].as_u64())),
            "{title} overlaps"
        );
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let filled = expr
                .replace("$__rate_interval", "2m")
                .replace("$region", ".*");
            promql_parser::parser::parse(&filled).unwrap_or_else(|e| panic!("{title}: {e}"));
            names.extend(metric_names(expr));
        }
    }
    names
}

/// A file of the Helm chart's `files/`.
fn chart_file(name: &str) -> String {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/helm/dci/files");
    std::fs::read_to_string(format!("{dir}/{name}")).unwrap()
}

/// The `dci_` metrics a PromQL expression names.
fn metric_names(expr: &str) -> HashSet<String> {
    let mut names = HashSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("dci_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        names.insert(name);
    }
    names
}

/// Every metric the Helm chart's alerting rules name, each rule checked to be whole and to
/// parse as PromQL.
fn alert_metrics() -> HashSet<String> {
    let rules: serde_yaml::Value = serde_yaml::from_str(&chart_file("alerts.yaml")).unwrap();
    let mut names = HashSet::new();
    for rule in rules["groups"][0]["rules"].as_sequence().unwrap() {
        let alert = rule["alert"].as_str().unwrap();
        let expr = rule["expr"].as_str().unwrap();
        promql_parser::parser::parse(expr).unwrap_or_else(|e| panic!("{alert}: {e}"));
        for field in [&rule["labels"]["severity"], &rule["annotations"]["summary"]] {
            assert!(field.as_str().is_some_and(|s| !s.is_empty()), "{alert}");
        }
        names.extend(metric_names(expr));
    }
    names
}

/// What an operator looks at when publishes slow down or fail: a coordinator counts publish
/// requests by their answer, times its answers and its fsyncs, and says how large its log is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_counts_publishes_by_answer_and_times_its_log() {
    let dir = tempfile::tempdir().unwrap();
    let c = metered_coordinator(dir.path()).await;
    let mut client = pb::publisher_client::PublisherClient::connect(c.url())
        .await
        .unwrap();
    let request = |n: u64, key: &str| pb::PublishRequest {
        publisher_id: "metrics".into(),
        request_no: n,
        entries: vec![pb::Invalidation {
            key: key.to_string().into(),
            kind: pb::Kind::Key as i32,
            ..Default::default()
        }],
    };
    client.publish(request(1, "a")).await.unwrap();
    let again = client.publish(request(1, "a")).await.unwrap().into_inner();
    assert!(again.duplicate);
    let empty = pb::PublishRequest {
        entries: vec![],
        ..request(2, "b")
    };
    assert!(client.publish(empty).await.is_err());
    // On a stream: two logged, one refused in band (an empty key).
    let stream = tokio_stream::iter([request(3, "c"), request(4, ""), request(5, "d")]);
    let mut answers = client.publish_stream(stream).await.unwrap().into_inner();
    let mut refused = 0;
    while let Some(a) = answers.message().await.unwrap() {
        refused += usize::from(a.refused_code != 0);
    }
    assert_eq!(refused, 1);

    let m = scrape(c.metrics_addr.unwrap()).await;
    let value = |name: &str| -> f64 {
        m.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in:\n{m}"))
    };
    for (outcome, n) in [
        ("logged", 3.0),
        ("duplicate", 1.0),
        ("refused", 2.0),
        ("unavailable", 0.0),
    ] {
        let name = format!("dci_publish_requests_total{{outcome=\"{outcome}\"}}");
        assert_eq!(value(&name), n, "{name}");
    }
    assert_eq!(
        value("dci_publish_answer_seconds_count"),
        4.0,
        "answers with seqs"
    );
    // fsync=always: each logged request waited for an fsync (several may share one).
    assert!(value("dci_fsync_seconds_count") >= 1.0);
    assert!(value("dci_fsync_seconds_sum") > 0.0);
    assert_eq!(value("dci_log_segments"), 1.0);
    let on_disk: u64 = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|f| f.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    let said = value("dci_log_bytes");
    assert!(
        said > 0.0 && said <= on_disk as f64,
        "{said} of {on_disk} on disk"
    );
    c.stop().await.unwrap();
}

/// A coordinator whose log is older than what its receivers hold (restored from a copy made
/// before, say) would give those seqs out again, for other invalidations, and its receivers
/// would skip them as applied. It learns so when a receiver resumes past its head: it refuses
/// publishes, and its next start is under a new epoch, which every receiver takes for a Reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_on_an_older_copy_of_its_log_stops_and_starts_a_new_epoch() {
    on_an_older_copy(false).await;
}

/// The same, with the relays restarted too (a cluster brought back whole): a relay that starts
/// empty joins at the head, and only the edges below it know better. Their reports, which the
/// relay passes up, tell it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_on_an_older_copy_learns_it_from_the_edges_below_a_new_relay() {
    on_an_older_copy(true).await;
}

async fn on_an_older_copy(through_a_new_relay: bool) {
    let dir = tempfile::tempdir().unwrap();
    let copy = tempfile::tempdir().unwrap();
    let files = |from: &std::path::Path, to: &std::path::Path| {
        for f in std::fs::read_dir(to).unwrap() {
            std::fs::remove_file(f.unwrap().path()).unwrap();
        }
        for f in std::fs::read_dir(from).unwrap() {
            let f = f.unwrap();
            std::fs::copy(f.path(), to.join(f.file_name())).unwrap();
        }
    };
    let cfg = |listen| CoordinatorConfig {
        listen,
        data_dir: dir.path().to_path_buf(),
        ..Default::default()
    };
    let c = Coordinator::start(cfg(any_port())).await.unwrap();
    let (addr, epoch) = (c.addr, c.epoch);
    // A refusal by a failed log is retried as a coordinator's restart would be: not for long.
    let p = Publisher::with_options(
        vec![c.url()],
        dci_sdk::PublisherOptions {
            retry_for: Duration::from_secs(1),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(publish_all(&p, &keys(0..5, "old:")).await, 5);
    // Each restart is on the same address: held meanwhile, so that no other test's connection
    // takes the port for its own end.
    c.stop().await.unwrap();
    let held = hold(addr);
    files(dir.path(), copy.path());
    drop(held);
    let c = Coordinator::start(cfg(addr)).await.unwrap();
    let mut r = None;
    let e = if through_a_new_relay {
        let relay = relay_at(any_port(), vec![c.url()], 1 << 20).await;
        let e = edge(edge_cfg(vec![relay.url()])).await;
        r = Some(relay);
        e
    } else {
        edge(edge_cfg(vec![c.url()])).await
    };
    wait_in_stream(&e).await;
    assert_eq!(publish_all(&p, &keys(0..5, "new:")).await, 10);
    wait_applied(&e, 10).await;
    c.stop().await.unwrap();
    let held = hold(addr);

    // The disk is lost, and the copy comes back: stopped cleanly, it keeps its epoch.
    files(copy.path(), dir.path());
    if let Some(relay) = r.take() {
        let at = relay.addr;
        relay.stop().await.unwrap();
        let held = hold(at);
        drop(held);
        r = Some(relay_at(at, vec![format!("http://{addr}")], 1 << 20).await);
    }
    drop(held);
    let c = Coordinator::start(cfg(addr)).await.unwrap();
    assert_eq!(c.epoch, epoch);
    let mut admin = pb::admin_client::AdminClient::connect(c.url())
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let failure = loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the edge resumed at 10, past the head: no failure told"
        );
        let nodes = admin
            .status(pb::StatusRequest {})
            .await
            .unwrap()
            .into_inner()
            .nodes;
        let me = nodes.iter().find(|n| n.role == "coordinator").unwrap();
        if !me.failure.is_empty() {
            break me.failure.clone();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        failure.contains("applied seq 10") && failure.contains("past its head 5"),
        "{failure}"
    );
    let err = p.invalidate("meanwhile").await.unwrap_err();
    assert!(err.to_string().contains("past its head 5"), "{err}");
    c.stop().await.unwrap();
    drop(hold(addr));

    // Started again, under a new epoch: the edge drops what it holds and follows on from the
    // head, and the log's seqs are its own again.
    let c = Coordinator::start(cfg(addr)).await.unwrap();
    assert_ne!(c.epoch, epoch, "a new epoch");
    let seq = p.invalidate("after").await.unwrap();
    assert_eq!(seq, 6, "after the copy's head");
    // (At seq 10 of the old epoch, the edge is past 6 until it takes the new one.)
    eventually("the edge applied seq 6 of the new epoch", || {
        e.edge.applied(0) == Some((c.epoch, seq))
    })
    .await;
    e.edge.stop().await.unwrap();
    if let Some(relay) = r {
        relay.stop().await.unwrap();
    }
    c.stop().await.unwrap();
}

/// Two nodes that call themselves the same would be taken for one by a wait for a publish to be
/// applied everywhere (it follows each cache by its name): their sender says so. A node's own
/// reconnection, or another name, is no such thing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_tells_of_two_receivers_that_call_themselves_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator(dir.path()).await;
    let r = relay(&c).await;
    let named = |id: &str| EdgeConfig {
        node_id: id.into(),
        ..edge_cfg(vec![r.url()])
    };
    let solo = edge(named("solo")).await;
    let first = edge(named("twin")).await;
    wait_in_stream(&solo).await;
    wait_in_stream(&first).await;
    assert_eq!(r.counters.named_twice.load(Ordering::Relaxed), 0);
    let second = edge(named("twin")).await;
    wait_in_stream(&second).await;
    eventually("the relay told of the twins", || {
        r.counters.named_twice.load(Ordering::Relaxed) == 1
    })
    .await;
    for e in [solo, first, second] {
        e.edge.stop().await.unwrap();
    }
    r.stop().await.unwrap();
    c.stop().await.unwrap();
}

/// The SDK's example runs as its comment says, against a real tier: it reads its write back.
#[allow(dead_code)]
#[path = "../client-sdk/examples/cache_aside.rs"]
mod cache_aside;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdks_cache_aside_example_reads_its_write_back() {
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator(dir.path()).await;
    let r = relay(&c).await;
    let e = edge(edge_cfg(vec![r.url()])).await;
    wait_serving(&e).await;
    cache_aside::run(c.url(), e.edge.url()).await.unwrap();
    // The row as it was written is what the edge holds now (filled by the read after it).
    let cache = CacheClient::from_urls(vec![e.edge.url()]).unwrap();
    assert_eq!(
        cache.get("user:42:profile").await.unwrap(),
        Lookup::Hit(Bytes::from("Ada Lovelace"))
    );
    e.edge.stop().await.unwrap();
    r.stop().await.unwrap();
    c.stop().await.unwrap();
}

/// The SDK's own-cache example keeps an application's map coherent: a key and a prefix
/// invalidated drop their rows, and a later run resumes after its position.
#[allow(dead_code)]
#[path = "../client-sdk/examples/own_cache.rs"]
mod own_cache;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdks_own_cache_example_drops_what_is_invalidated() {
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator(dir.path()).await;
    let r = relay(&c).await;
    let p = Publisher::connect(vec![c.url()]).await.unwrap();
    let user = |name: &str| own_cache::User { name: name.into() };
    let mut users: own_cache::Users = ["user:1", "user:2", "user:20", "team:1"]
        .iter()
        .map(|k| (k.to_string(), user(k)))
        .collect();
    p.invalidate("user:1").await.unwrap();
    p.invalidate_prefix("user:2").await.unwrap();
    let position = own_cache::run(r.url(), &mut users, vec![(0, c.epoch, 0)], Some(2))
        .await
        .unwrap();
    assert_eq!(users.keys().collect::<Vec<_>>(), ["team:1"]);
    assert_eq!(position, [(0, c.epoch, 2)]);
    // Later, from where it stopped: only what came since.
    users.insert("user:1".into(), user("again"));
    p.invalidate("team:1").await.unwrap();
    own_cache::run(r.url(), &mut users, position, Some(3))
        .await
        .unwrap();
    assert_eq!(users.keys().collect::<Vec<_>>(), ["user:1"]);
    r.stop().await.unwrap();
    c.stop().await.unwrap();
}

/// A node's metrics once `ready` says they are (failing with the last scrape after 10 s).
async fn scrape_until(addr: SocketAddr, ready: impl Fn(&str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let m = scrape(addr).await;
        if ready(&m) {
            return m;
        }
        assert!(tokio::time::Instant::now() < deadline, "{m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An OpenTelemetry collector's metrics endpoint that keeps what it is sent.
#[derive(Clone, Default)]
struct Collector {
    got: Arc<Mutex<Vec<ExportMetricsServiceRequest>>>,
}

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value;
use opentelemetry_proto::tonic::metrics::v1::metric::Data;

#[tonic::async_trait]
impl MetricsService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        lock(&self.got).push(request.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

impl Collector {
    /// The newest count of `metric` (a histogram) pushed by `service`.
    fn histogram_count(&self, service: &str, metric: &str) -> Option<u64> {
        let got = lock(&self.got);
        got.iter()
            .rev()
            .flat_map(|r| &r.resource_metrics)
            .filter(|rm| {
                rm.resource.as_ref().is_some_and(|res| {
                    res.attributes.iter().any(|kv| {
                        kv.key == "service.name"
                            && kv.value.as_ref().and_then(|v| v.value.as_ref())
                                == Some(&any_value::Value::StringValue(service.into()))
                    })
                })
            })
            .flat_map(|rm| &rm.scope_metrics)
            .flat_map(|sm| &sm.metrics)
            .find(|m| m.name == metric)
            .and_then(|m| match &m.data {
                Some(Data::Histogram(h)) => h.data_points.first().map(|p| p.count),
                _ => None,
            })
    }
}

/// A coordinator (its log in `dir`), a relay and an edge in its stream, each exporting to the
/// OTLP collector at `collector` every 100 ms.
async fn otlp_tree(
    collector: std::net::SocketAddr,
    dir: &std::path::Path,
) -> (Coordinator, Relay, Watched) {
    let otlp = dci_proto::otlp::OtlpConfig {
        endpoint: Some(format!("http://{collector}")),
        interval: Duration::from_millis(100),
    };
    let c = Coordinator::start(CoordinatorConfig {
        listen: any_port(),
        data_dir: dir.to_path_buf(),
        otlp: otlp.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let r = Relay::start(RelayConfig {
        listen: any_port(),
        upstream: vec![c.url()],
        otlp: otlp.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let e = edge(EdgeConfig {
        otlp,
        ..edge_cfg(vec![r.url()])
    })
    .await;
    wait_in_stream(&e).await;
    (c, r, e)
}

#[tokio::test]
async fn every_node_pushes_its_metrics_to_an_otlp_collector() {
    // The collector comes up only after the nodes: pushes that fail meanwhile are retried.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let dir = tempfile::tempdir().unwrap();
    let (c, r, e) = otlp_tree(addr, dir.path()).await;
    let p = Publisher::connect(vec![c.url()]).await.unwrap();
    let head = publish_all(&p, &keys(0..20, "o:")).await;
    wait_applied(&e, head).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let collector = Collector::default();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(MetricsServiceServer::new(collector.clone()))
            .serve(addr),
    );
    for service in ["dci-coordinator", "dci-relay", "dci-edge"] {
        eventually(&format!("{service} pushed 20 propagation samples"), || {
            collector.histogram_count(service, "dci_propagation_seconds") == Some(20)
        })
        .await;
    }
    e.edge.stop().await.unwrap();
    r.stop().await.unwrap();
    c.stop().await.unwrap();
    server.abort();
}

/// An OpenTelemetry collector's trace endpoint that keeps the spans it is sent, with the
/// service that sent each.
#[derive(Clone, Default)]
struct SpanCollector {
    got: Arc<Mutex<Vec<(String, Span)>>>,
}

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span;

#[tonic::async_trait]
impl TraceService for SpanCollector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    any_value::Value::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                lock(&self.got).extend(ss.spans.into_iter().map(|s| (service.clone(), s)));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn int_attribute(s: &Span, key: &str) -> Option<i64> {
    s.attributes.iter().find(|kv| kv.key == key).and_then(|kv| {
        match kv.value.as_ref()?.value.as_ref()? {
            any_value::Value::IntValue(i) => Some(*i),
            _ => None,
        }
    })
}

#[tokio::test]
async fn a_traced_publish_makes_a_span_in_its_trace_at_every_node() {
    let collector = SpanCollector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .add_service(MetricsServiceServer::new(Collector::default()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let dir = tempfile::tempdir().unwrap();
    let (c, r, e) = otlp_tree(addr, dir.path()).await;
    let p = Publisher::connect(vec![c.url()]).await.unwrap();
    let context = dci_sdk::TraceContext::from_traceparent(
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    )
    .unwrap();
    // Untraced entries around it, and one that a later entry of its key subsumes in the
    // coordinator's group (the later one carries its trace on).
    let mut entries: Vec<_> = (0..10)
        .map(|i| dci_sdk::Invalidation::key(format!("t:{i}")))
        .collect();
    entries.insert(5, dci_sdk::Invalidation::key("t:traced").traced(context));
    entries.push(dci_sdk::Invalidation::key("t:traced"));
    let before = dci_proto::now_us() * 1_000;
    let seqs = p.publish(entries).await.unwrap();
    let seq = *seqs.last().unwrap() as i64;
    wait_applied(&e, seq as u64).await;

    eventually(
        "a span from the coordinator, the relay and the edge",
        || {
            let got = lock(&collector.got);
            ["dci-coordinator", "dci-relay", "dci-edge"]
                .iter()
                .all(|s| got.iter().any(|(service, _)| service == s))
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = lock(&collector.got).clone();
    let mut ends = Vec::new();
    for (service, name) in [
        ("dci-coordinator", "dci.log"),
        ("dci-relay", "dci.relay"),
        ("dci-edge", "dci.apply"),
    ] {
        let spans: Vec<&Span> = got
            .iter()
            .filter(|(s, _)| s == service)
            .map(|(_, s)| s)
            .collect();
        assert_eq!(
            spans.len(),
            1,
            "{service}: one span, of the traced entry only"
        );
        let s = spans[0];
        assert_eq!(s.name, name);
        assert_eq!(s.trace_id, context.trace_id.to_vec(), "{service}");
        assert_eq!(
            s.parent_span_id,
            context.parent_span_id.unwrap().to_vec(),
            "{service}: a child of the writer's span"
        );
        assert_eq!(int_attribute(s, "dci.seq"), Some(seq), "{service}");
        assert!(
            s.start_time_unix_nano >= before && s.start_time_unix_nano <= s.end_time_unix_nano,
            "{service}: from the publish call to the node's step"
        );
        ends.push(s.end_time_unix_nano);
    }
    assert!(
        ends.is_sorted(),
        "logged, then relayed, then applied: {ends:?}"
    );
    e.edge.stop().await.unwrap();
    r.stop().await.unwrap();
    c.stop().await.unwrap();
    server.abort();
}

/// Values filled with tags (the rows a cached page was built from) go when one of their tags is
/// invalidated, whatever their keys and shards; a fill that loaded before such an invalidation
/// is refused, and values without the tag stay.
#[tokio::test]
async fn a_tag_invalidation_drops_its_values_in_every_shard() {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let (cs, r, e) = sharded_tier(&dirs, Duration::from_secs(2)).await;
    let p = Publisher::connect(cs.iter().map(|c| c.url()).collect())
        .await
        .unwrap();
    let cache = CacheClient::from_urls(vec![e.edge.url()]).unwrap();
    let map = dci_proto::ring::ShardMap::new(2);
    let pages: Vec<String> = (0..40).map(|i| format!("page:{i}")).collect();
    assert!(pages.iter().any(|k| map.shard_of(k.as_bytes()) == 0));
    assert!(pages.iter().any(|k| map.shard_of(k.as_bytes()) == 1));
    // Even pages show product 7, every page product 8.
    let tags_of = |i: usize| {
        let mut t = vec!["product:8"];
        if i.is_multiple_of(2) {
            t.push("product:7");
        }
        Fill::new("v1").tagged(t)
    };
    for (i, k) in pages.iter().enumerate() {
        let v = cache
            .get_or_load(k.clone(), || async { Ok::<_, std::io::Error>(tags_of(i)) })
            .await
            .unwrap();
        assert_eq!(v, "v1");
    }
    for k in &pages {
        assert!(
            matches!(cache.get(k.clone()).await.unwrap(), Lookup::Hit(_)),
            "{k} filled"
        );
    }
    // Filled in bulk, each with its tags.
    let bulk: Vec<String> = (0..20).map(|i| format!("bulk:{i}")).collect();
    let missed = cache.get_many(bulk.clone()).await.unwrap();
    let fills = bulk.iter().zip(missed).enumerate().map(|(i, (k, m))| {
        let Lookup::Miss { lease } = m else {
            panic!("{k} a miss")
        };
        (k.clone(), tags_of(i), Some(lease))
    });
    assert!(cache.set_many(fills).await.unwrap().iter().all(|s| *s));
    // A reader that missed before the invalidation, and fills after it: refused.
    let Lookup::Miss { lease: late } = cache.get("page:late").await.unwrap() else {
        panic!("a miss")
    };
    p.invalidate_tag("product:7").await.unwrap();
    p.wait_applied(Duration::from_secs(10)).await.unwrap();
    for (i, k) in pages.iter().chain(&bulk).enumerate() {
        let hit = matches!(cache.get(k.clone()).await.unwrap(), Lookup::Hit(_));
        assert_eq!(hit, i % 2 == 1, "{k}");
    }
    let tagged = |tags: &[&'static str]| Fill::new("v0").tagged(tags.to_vec());
    let stored = cache
        .set("page:late", tagged(&["product:7"]), Some(late))
        .await
        .unwrap();
    assert!(
        !stored,
        "filled under a lease from before the tag's invalidation"
    );
    let stored = cache
        .set("page:late", tagged(&["product:9"]), Some(late))
        .await
        .unwrap();
    assert!(stored, "a tag not invalidated");
    // Bad tags are refused by name.
    let err = cache.set("page:x", tagged(&[""]), None).await.unwrap_err();
    assert!(err.to_string().contains("a tag is 1 to"), "{err}");
    let err = cache
        .set("page:x", tagged(&["t"; 65]), None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("65 tags"), "{err}");
    e.edge.stop().await.unwrap();
    r.stop().await.unwrap();
    for c in cs {
        c.stop().await.unwrap();
    }
}

/// Two coordinators (shards 0 and 1, logs in `dirs`), a relay that follows each on a link of its
/// own (`upstream` for shard 0, `upstream_groups` for shard 1), and an edge behind it with this
/// staleness bound, in the stream of both shards: a relay whose link to a shard came up after a
/// publish would have started that shard's ring past it.
async fn sharded_tier(
    dirs: &[tempfile::TempDir; 2],
    max_staleness: Duration,
) -> (Vec<Coordinator>, Relay, Watched) {
    let mut cs = Vec::new();
    for (shard, dir) in dirs.iter().enumerate() {
        cs.push(
            Coordinator::start(CoordinatorConfig {
                listen: any_port(),
                data_dir: dir.path().to_path_buf(),
                shard: shard as u32,
                shard_count: 2,
                ..Default::default()
            })
            .await
            .unwrap(),
        );
    }
    let r = Relay::start(RelayConfig {
        listen: any_port(),
        upstream: vec![cs[0].url()],
        upstream_groups: vec![vec![cs[1].url()]],
        region: "r".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let e = edge(EdgeConfig {
        shard_count: 2,
        max_staleness,
        ..edge_cfg(vec![r.url()])
    })
    .await;
    eventually("the edge in the stream of both shards", || {
        let shards: HashSet<u32> = lock(&e.edge.link).progress.iter().map(|p| p.0).collect();
        shards == HashSet::from([0, 1])
    })
    .await;
    (cs, r, e)
}

/// A sharded coordinator tier: one relay follows each shard's coordinator on a link of its own
/// (`upstream` for shard 0, `upstream_groups` for shard 1) and serves both shards to its edges.
/// A shard whose coordinator is gone holds back only itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_follows_every_shard_of_a_sharded_tier() {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let (mut cs, r, e) = sharded_tier(&dirs, Duration::from_secs(2)).await;
    let p = Publisher::connect(cs.iter().map(|c| c.url()).collect())
        .await
        .unwrap();
    let map = dci_proto::ring::ShardMap::new(2);
    let all = keys(0..400, "user:");
    publish_all(&p, &all).await;
    let by_shard = |ks: &[String], s: u32| {
        ks.iter()
            .filter(|k| map.shard_of(k.as_bytes()) == s)
            .count()
    };
    assert!(by_shard(&all, 0) > 100 && by_shard(&all, 1) > 100);
    eventually("every key of both shards at the edge", || {
        let got: HashSet<Bytes> = lock(&e.keys).iter().cloned().collect();
        all.iter().all(|k| got.contains(k.as_bytes()))
    })
    .await;
    let shards: HashSet<_> = e.edge.store.applied().iter().map(|a| a.0).collect();
    assert_eq!(shards, HashSet::from([0, 1]));
    let upstream = r.core.upstream();
    assert!(upstream.connected_to.is_some(), "both links up");
    assert_eq!(
        upstream.progress.iter().map(|p| p.0).collect::<Vec<_>>(),
        vec![0, 1]
    );

    // A value of each shard cached at the edge.
    let cache = CacheClient::from_urls(vec![e.edge.url()]).unwrap();
    let of_shard = |s: u32| {
        (0..)
            .map(|i| format!("cached:{i}"))
            .find(|k| map.shard_of(k.as_bytes()) == s)
            .unwrap()
    };
    let (k0, k1) = (of_shard(0), of_shard(1));
    for k in [&k0, &k1] {
        assert!(cache.set(k.clone(), "v", None).await.unwrap());
        assert_eq!(cache.get(k.clone()).await.unwrap(), Lookup::Hit("v".into()));
    }
    // And in a near cache following the same relay.
    let near = dci_sdk::NearCache::start(dci_sdk::NearCacheOptions {
        relays: vec![r.url()],
        shard_count: 2,
        max_staleness: Duration::from_secs(2),
        ..Default::default()
    })
    .unwrap();
    let n = near.clone();
    eventually("the near cache caught up", move || n.is_fresh()).await;
    for k in [&k0, &k1] {
        assert!(near.set(k.clone(), "v", None));
        assert_eq!(near.get(k.as_bytes()), Lookup::Hit("v".into()));
    }

    // A publisher of the whole tier, whose wait finds both shards applied, once both
    // coordinators' trees have the edge and the near cache.
    for c in &cs {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let tree = tree_at(c.url()).await;
            if ["edge", "near-cache"]
                .iter()
                .all(|role| tree.iter().any(|n| n.role == *role))
            {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the caches never reported"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let tier = Publisher::connect(cs.iter().map(|c| c.url()).collect())
        .await
        .unwrap();
    for s in [0, 1] {
        let other = (0..)
            .map(|i| format!("other:{i}"))
            .find(|k| map.shard_of(k.as_bytes()) == s)
            .unwrap();
        tier.invalidate(other).await.unwrap();
    }
    assert_eq!(
        tier.wait_applied(Duration::from_secs(20))
            .await
            .unwrap()
            .caches,
        2
    );

    // Shard 1's coordinator goes away: shard 0 goes on through the same relay.
    let c1 = cs.pop().unwrap();
    c1.stop().await.unwrap();
    let more: Vec<String> = keys(400..2_000, "user:")
        .into_iter()
        .filter(|k| map.shard_of(k.as_bytes()) == 0)
        .collect();
    let p0 = Publisher::connect(vec![cs[0].url()]).await.unwrap();
    publish_all(&p0, &more).await;
    eventually("shard 0 goes on without shard 1", || {
        let got: HashSet<Bytes> = lock(&e.keys).iter().cloned().collect();
        more.iter().all(|k| got.contains(k.as_bytes()))
    })
    .await;
    eventually("the relay tells that one link is down", || {
        r.core.upstream().connected_to.is_none()
    })
    .await;
    // Moving on from the relay finds it no better (there is no other, and every relay would be
    // cut off from shard 1): the edge leaves it ever more slowly, where it reconnected every
    // peer timeout (1 s here) for as long as shard 1 was down.
    let mut links = 0;
    let mut since = lock(&e.edge.link).connected_since;
    let watching = tokio::time::Instant::now();
    while watching.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = lock(&e.edge.link).connected_since;
        if now.is_some() && now != since {
            links += 1;
        }
        since = now.or(since);
    }
    assert!(links <= 4, "{links} links in 10 s");
    // The relay stays ready: it vouches for shard 0 (were every relay of the Service unready
    // for shard 1, an edge reconnecting could follow none).
    let long_ago = Duration::from_secs(3);
    assert_eq!(r.core.unready(std::time::Instant::now(), long_ago), None);
    // Past the bound, shard 1's keys are misses (nothing vouches for them); shard 0's still hit.
    let cut = tokio::time::Instant::now();
    while !matches!(cache.get(k1.clone()).await.unwrap(), Lookup::Miss { .. }) {
        assert!(
            cut.elapsed() < Duration::from_secs(10),
            "shard 1 kept being served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        cache.get(k0.clone()).await.unwrap(),
        Lookup::Hit("v".into())
    );
    // The near cache too serves shard 0's keys and not shard 1's (it served none).
    assert_eq!(near.get(k0.as_bytes()), Lookup::Hit("v".into()));
    assert!(matches!(near.get(k1.as_bytes()), Lookup::Miss { .. }));
    // The tier's publisher waits for a key of shard 0 in shard 0's tree: shard 1, down, has
    // nothing it published since its last wait, and does not hold it.
    tier.invalidate(k0.clone()).await.unwrap();
    let applied = tier.wait_applied(Duration::from_secs(20)).await.unwrap();
    assert_eq!(applied.caches, 2);
    assert!(matches!(
        cache.get(k0.clone()).await.unwrap(),
        Lookup::Miss { .. }
    ));
    e.edge.stop().await.unwrap();
    r.stop().await.unwrap();
    cs.pop().unwrap().stop().await.unwrap();
}

/// A prefix and "everything" reach every shard's keys at the edge, and only those; a fill under a
/// lease taken before the prefix was invalidated is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_invalidates_a_prefix_and_everything_on_every_shard() {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let (cs, r, e) = sharded_tier(&dirs, EdgeConfig::default().max_staleness).await;
    let p = Publisher::connect(cs.iter().map(|c| c.url()).collect())
        .await
        .unwrap();
    let cache = CacheClient::from_urls(vec![e.edge.url()]).unwrap();
    let map = dci_proto::ring::ShardMap::new(2);
    let dropped = keys(0..40, "user:1:");
    let shards: HashSet<u32> = dropped.iter().map(|k| map.shard_of(k.as_bytes())).collect();
    assert_eq!(
        shards,
        HashSet::from([0, 1]),
        "the prefix spans both shards"
    );
    // "user:10:" starts with "user:1" but not with "user:1:".
    let kept = ["user:2:x".to_string(), "user:10:y".to_string()];
    for k in dropped.iter().chain(&kept) {
        assert!(cache.set(k.clone(), "v", None).await.unwrap(), "{k}");
    }
    let Lookup::Miss { lease } = cache.get("user:1:late").await.unwrap() else {
        panic!("a key never set is a miss");
    };

    let hits = |ks: Vec<String>| {
        let cache = cache.clone();
        async move {
            let mut n = 0;
            for k in ks {
                n += matches!(cache.get(k).await.unwrap(), Lookup::Hit(_)) as usize;
            }
            n
        }
    };
    assert_eq!(hits(dropped.clone()).await, dropped.len());
    p.invalidate_prefix("user:1:").await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while hits(dropped.clone()).await > 0 {
        assert!(tokio::time::Instant::now() < deadline, "prefix not applied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        hits(kept.to_vec()).await,
        kept.len(),
        "only the prefix goes"
    );
    assert!(
        !cache.set("user:1:late", "old", Some(lease)).await.unwrap(),
        "a fill under a lease from before the prefix's invalidation is refused"
    );
    let err = p.invalidate_prefix("").await.unwrap_err();
    assert!(matches!(err, dci_sdk::Error::Refused(_)), "{err}");

    p.invalidate_all().await.unwrap();
    while hits(kept.to_vec()).await > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "everything not applied"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    e.edge.stop().await.unwrap();
    r.stop().await.unwrap();
    for c in cs {
        c.stop().await.unwrap();
    }
}

/// Two groups that reach the same shard (here the coordinator, and a relay in front of it): the
/// first to bring the shard feeds the ring, the other's copies are ignored, so the ring never
/// restarts and edges are never reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_brought_by_two_groups_is_taken_from_one() {
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator(dir.path()).await;
    let mid = relay(&c).await;
    let r = Relay::start(RelayConfig {
        listen: any_port(),
        upstream: vec![c.url()],
        upstream_groups: vec![vec![mid.url()]],
        region: "r".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let e = edge(edge_cfg(vec![r.url()])).await;
    wait_in_stream(&e).await;
    let p = Publisher::connect(vec![c.url()]).await.unwrap();
    let mut head = 0;
    for round in 0..20 {
        head = publish_all(&p, &keys(round * 100..(round + 1) * 100, "k:")).await;
    }
    wait_applied(&e, head).await;
    eventually("both links up", || r.core.upstream().connected_to.is_some()).await;
    let head = publish_all(&p, &keys(0..100, "after:")).await;
    wait_applied(&e, head).await;
    let got: HashSet<Bytes> = lock(&e.keys).iter().cloned().collect();
    assert!(keys(0..2_000, "k:")
        .iter()
        .chain(&keys(0..100, "after:"))
        .all(|k| got.contains(k.as_bytes())));
    assert_eq!(lock(&e.edge.link).flushes, 0, "no edge was reset");
    assert_eq!(
        r.core
            .ring_restarts
            .load(std::sync::atomic::Ordering::Relaxed),
        0,
        "the ring never restarted"
    );
    e.edge.stop().await.unwrap();
    r.stop().await.unwrap();
    mid.stop().await.unwrap();
    c.stop().await.unwrap();
}

/// An edge two relays deep with a 1 s staleness bound, everything idle and healthy, stays fresh:
/// each level's freshness is as old as its last answered probe, and probes go often enough that
/// two levels' worth stays well inside the bound. (With a probe every 500 ms, or stamps taken on
/// a heartbeat's arrival, such an edge served misses for a fifth to over half of its reads.)
/// Sampled for 3 s; a stalled test machine may cost a few samples, not many.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_two_relays_deep_stays_fresh_within_a_one_second_bound() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(CoordinatorConfig {
        listen: any_port(),
        data_dir: dir.path().to_path_buf(),
        ..Default::default()
    })
    .await
    .unwrap();
    let relay = |upstream: String| {
        Relay::start(RelayConfig {
            listen: any_port(),
            upstream: vec![upstream],
            region: "r".into(),
            ..Default::default()
        })
    };
    let near = relay(c.url()).await.unwrap();
    let far = relay(near.url()).await.unwrap();
    let e = EdgeNode::start(EdgeConfig {
        listen: any_port(),
        relays: vec![far.url()],
        region: "r".into(),
        max_staleness: Duration::from_secs(1),
        ..Default::default()
    })
    .await
    .unwrap();
    let p = Publisher::connect(vec![c.url()]).await.unwrap();
    let seq = p.invalidate("warm").await.unwrap();
    let link = e.link.clone();
    let bound = Duration::from_secs(1);
    eventually("the edge to be fresh", move || {
        let st = lock(&link);
        st.progress.iter().any(|&(_, _, hwm, _)| hwm >= seq)
            && st.fresh_for(0, std::time::Instant::now(), bound)
    })
    .await;
    let (mut fresh, mut samples) = (0, 0);
    while samples < 150 {
        fresh += usize::from(lock(&e.link).fresh_for(0, std::time::Instant::now(), bound));
        samples += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        fresh * 10 >= samples * 9,
        "fresh in {fresh} of {samples} samples"
    );
    e.stop().await.unwrap();
    far.stop().await.unwrap();
    near.stop().await.unwrap();
    c.stop().await.unwrap();
}

/// A coordinator on `dir`, a relay, and an edge below it with staleness bound `bound` that has
/// applied a first publish; and a client of the edge.
async fn one_edge_below(
    dir: &std::path::Path,
    bound: Duration,
) -> (Coordinator, Relay, Watched, CacheClient) {
    let c = coordinator(dir).await;
    let r = relay(&c).await;
    let e = edge(EdgeConfig {
        listen: any_port(),
        max_staleness: bound,
        ..edge_cfg(vec![r.url()])
    })
    .await;
    let p = Publisher::connect(vec![c.url()]).await.unwrap();
    wait_applied(&e, p.invalidate("warm").await.unwrap()).await;
    let cache = CacheClient::from_urls(vec![e.edge.url()]).unwrap();
    (c, r, e, cache)
}

/// A coordinator started on a new log whose epoch is lower than the one its receivers hold (its
/// directory lost, and the new one's clock behind the old one's). Until they take its log, they
/// are not caught up with it: the edge below served a value whose invalidation the new
/// coordinator had acknowledged, counting as caught up (the heads it was told were of the other
/// epoch). They take it since it is vouched for after they were last caught up in theirs (the
/// relay at once, from the coordinator itself; the edge from the relay): a flush each, and the
/// edge serves again. They passed over it for good, and had to be restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_log_of_a_lower_epoch_is_taken_with_a_flush_and_never_served_stale() {
    let (first, second) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // The new log, made beforehand, under an epoch lower than any a clock gives.
    let c = coordinator(second.path()).await;
    c.stop().await.unwrap();
    std::fs::write(second.path().join("epoch"), "1000").unwrap();

    let (c, r, e, cache) = one_edge_below(first.path(), Duration::from_secs(1)).await;
    let addr = c.addr;
    c.stop().await.unwrap();
    let c = Coordinator::start(CoordinatorConfig {
        listen: addr,
        data_dir: second.path().to_path_buf(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(c.epoch, 1000);
    let p = Publisher::connect(vec![c.url()]).await.unwrap();
    // Filled now, invalidated after: from then on, a hit is a stale read.
    let _ = cache.set("k", "old", None).await;
    p.invalidate("k").await.unwrap();
    let invalidated = std::time::Instant::now();
    // A wait for it holds until the edge is in the new log (its old epoch, higher, is no log's
    // now), or past its bound; once the new coordinator's tree has it (a cache is waited for
    // from when it is reported).
    loop {
        let applied = p.wait_applied(Duration::from_secs(10)).await.unwrap();
        if applied.caches == 1 {
            assert!(
                e.edge.applied(0).is_some_and(|(epoch, _)| epoch == 1000)
                    || !applied.past_bound.is_empty(),
                "{applied:?} with the edge at {:?}",
                e.edge.applied(0)
            );
            break;
        }
        assert!(
            invalidated.elapsed() < Duration::from_secs(10),
            "no cache in the tree"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Within its bound the edge may serve what it held; past it, never again.
    let bound = Duration::from_secs(1) + Duration::from_millis(500);
    while invalidated.elapsed() < bound + Duration::from_secs(1) {
        let read = cache.get("k").await.unwrap();
        if invalidated.elapsed() >= bound {
            assert!(
                !matches!(read, Lookup::Hit(v) if v == "old"),
                "served a value invalidated {:?} ago",
                invalidated.elapsed()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eventually("the edge in the new log", || {
        e.edge.applied(0).is_some_and(|(epoch, _)| epoch == 1000)
    })
    .await;
    assert_eq!(lock(&e.edge.link).flushes, 1, "taken with a flush");
    let seq = p.invalidate("k2").await.unwrap();
    wait_applied(&e, seq).await;
    let started = std::time::Instant::now();
    loop {
        if let Lookup::Miss { lease } = cache.get("k").await.unwrap() {
            assert!(cache.set("k", "new", Some(lease)).await.unwrap());
            if cache.get("k").await.unwrap() == Lookup::Hit("new".into()) {
                break;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "never served again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    e.edge.stop().await.unwrap();
    r.stop().await.unwrap();
    c.stop().await.unwrap();
}

/// A wait right after its coordinator restarted on its log holds for the caches that followed it
/// before and are not back yet: it returned at once, "nothing to wait for", while the edge, its
/// relay not yet back, served the value it had just invalidated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_after_a_coordinator_restart_holds_for_the_caches_not_back_yet() {
    let dir = tempfile::tempdir().unwrap();
    let (c, r, e, cache) = one_edge_below(dir.path(), Duration::from_secs(3)).await;
    let addr = c.addr;
    assert!(cache.set("k", "old", None).await.unwrap());

    // Down long enough for the relay to back off between its attempts to reconnect.
    c.stop().await.unwrap();
    let held = hold(addr);
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(held);
    let c = Coordinator::start(CoordinatorConfig {
        listen: addr,
        data_dir: dir.path().to_path_buf(),
        ..Default::default()
    })
    .await
    .unwrap();
    let p = Publisher::connect(vec![c.url()]).await.unwrap();
    let seq = p.invalidate("k").await.unwrap();
    let applied = p.wait_applied(Duration::from_secs(20)).await.unwrap();
    let read = cache.get("k").await.unwrap();
    assert!(
        !matches!(&read, Lookup::Hit(v) if v == "old"),
        "served what the wait said was gone ({applied:?}, the edge at {:?} of {seq})",
        e.edge.applied(0)
    );
    e.edge.stop().await.unwrap();
    r.stop().await.unwrap();
    c.stop().await.unwrap();
}

/// A relay asked for its own status answers, for each shard, when it was last caught up all the
/// way to the coordinator, as the heartbeats of its sender vouch: a relay below another whose
/// coordinator is gone is not caught up, although it keeps up with its own sender (it answered
/// with that, a fraction of a second, for as long as the coordinator was gone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_says_how_long_ago_it_was_caught_up_with_the_coordinator() {
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator(dir.path()).await;
    let near = relay(&c).await;
    let far = relay_at(any_port(), vec![near.url()], 64 << 20).await;
    let p = Publisher::connect(vec![c.url()]).await.unwrap();
    let seq = p.invalidate("k").await.unwrap();
    let own_row = |url: String| async move {
        let nodes = tree_at(url).await;
        nodes[0].shards.first().map(|s| (s.hwm, s.caught_up_ms))
    };
    let started = std::time::Instant::now();
    loop {
        if matches!(own_row(far.url()).await, Some((hwm, ms)) if hwm >= seq && ms < 1_000) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "far relay never caught up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.stop().await.unwrap();
    let stopped = std::time::Instant::now();
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    let (_, ms) = own_row(far.url()).await.unwrap();
    assert!(
        ms >= 1_500,
        "caught up {ms} ms ago, {} ms after its coordinator stopped",
        stopped.elapsed().as_millis()
    );
    far.stop().await.unwrap();
    near.stop().await.unwrap();
}

/// A relay given its own URL to follow refuses itself (its Hello carries the number the relay
/// drew at start), and a stream refused before a word is a failure to follow, retried with
/// backoff: a few attempts in two seconds, not a busy loop (it reconnected every few
/// milliseconds, logging each time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_given_its_own_url_refuses_itself_and_backs_off() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let own = format!("http://127.0.0.1:{port}");
    let r = Relay::start(RelayConfig {
        listen: format!("127.0.0.1:{port}").parse().unwrap(),
        upstream: vec![own.clone()],
        region: "r".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(r.url(), own);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let st = lock(&r.core.links[0]).clone();
    assert!(st.progress.is_empty(), "followed itself: {:?}", st.progress);
    assert!(
        (2..=10).contains(&st.connects),
        "{} attempts in 2 s",
        st.connects
    );
    r.stop().await.unwrap();
}

/// The SDK over mutual TLS: a coordinator, a relay and an edge serving TLS with the test CA's
/// node certificate, requiring client certificates that CA signed, and following each other at
/// `https://` URLs (presenting their own certificate); a `Publisher`, a `CacheClient` and a
/// `NearCache` that trust that CA and present a certificate it signed publish, fill, read and
/// follow through it. Clients that do not trust the CA, present no certificate or one of another
/// CA are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_publishes_reads_and_follows_over_mutual_tls() {
    use dci_proto::tls::TlsConfig;
    use dci_sdk::{ClientTls, NearCache, NearCacheOptions, PublisherOptions};
    let file = |name: &str| format!("{}/tests/tls/{name}", env!("CARGO_MANIFEST_DIR")).into();
    let tls = TlsConfig {
        cert: Some(file("node.pem")),
        key: Some(file("node.key")),
        ca: Some(file("ca.pem")),
        client_ca: Some(file("ca.pem")),
        ..Default::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(CoordinatorConfig {
        listen: any_port(),
        data_dir: dir.path().to_path_buf(),
        tls: tls.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(c.url().starts_with("https://"), "{}", c.url());
    let r = Relay::start(RelayConfig {
        listen: any_port(),
        upstream: vec![c.url()],
        region: "r".into(),
        tls: tls.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let e = EdgeNode::start(EdgeConfig {
        listen: any_port(),
        relays: vec![r.url()],
        region: "r".into(),
        tls: tls.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let read = |name: &str| std::fs::read(file(name)).unwrap();
    let trusting = ClientTls::with_ca_pem(read("ca.pem")).unwrap();
    let client_tls = trusting
        .clone()
        .with_identity_pem(read("node.pem"), read("node.key"))
        .unwrap();
    let p = Publisher::with_options(
        vec![c.url()],
        PublisherOptions {
            tls: client_tls.clone(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let near = NearCache::start(NearCacheOptions {
        relays: vec![r.url()],
        tls: client_tls.clone(),
        ..Default::default()
    })
    .unwrap();
    let cache = CacheClient::with_tls(
        vec![(e.url(), e.url())],
        Duration::from_secs(5),
        &client_tls,
    )
    .unwrap();
    let warm = p.invalidate("warm").await.unwrap();
    let (link, n) = (e.link.clone(), near.clone());
    eventually(
        "the edge and the near cache to follow over TLS",
        move || {
            let edge_at = lock(&link)
                .progress
                .iter()
                .any(|&(_, _, hwm, _)| hwm >= warm);
            edge_at && n.applied().iter().any(|&(_, _, s)| s >= warm)
        },
    )
    .await;
    let v = cache
        .get_or_load("user:1", || async {
            Ok::<_, std::io::Error>(Bytes::from("v1"))
        })
        .await
        .unwrap();
    assert_eq!(v, Bytes::from("v1"));
    assert_eq!(
        cache.get("user:1").await.unwrap(),
        Lookup::Hit(Bytes::from("v1"))
    );
    let seq = p.invalidate("user:1").await.unwrap();
    let link = e.link.clone();
    eventually("the invalidation to reach the edge", move || {
        lock(&link)
            .progress
            .iter()
            .any(|&(_, _, hwm, _)| hwm >= seq)
    })
    .await;
    assert!(matches!(
        cache.get("user:1").await.unwrap(),
        Lookup::Miss { .. }
    ));
    // Trusting another CA, the publisher cannot verify the coordinator: it gives up, it never
    // sends in the clear. Without a certificate, or with one of another CA, the coordinator
    // and the edge refuse the client.
    let other = ClientTls::with_ca_pem(read("other-ca.pem")).unwrap();
    let strangers = [
        ("untrusting", other),
        ("no certificate", trusting.clone()),
        (
            "another CA's certificate",
            trusting
                .with_identity_pem(read("other-node.pem"), read("other-node.key"))
                .unwrap(),
        ),
    ];
    // Each error says why, as far as the client can know: a node it cannot verify, or what the
    // node said when it refused (or that it hung up, when that came first).
    fn says_why<T>(who: &str, r: &Result<T, dci_sdk::Error>) -> bool {
        match r {
            Err(dci_sdk::Error::Unavailable(why)) if who == "untrusting" => {
                why.contains("invalid peer certificate: UnknownIssuer")
            }
            Err(dci_sdk::Error::Unavailable(why)) => {
                ["fatal alert", "connection closed", "broken pipe"]
                    .iter()
                    .any(|w| why.contains(w))
            }
            _ => false,
        }
    }
    for (who, tls) in strangers {
        let publisher = Publisher::with_options(
            vec![c.url()],
            PublisherOptions {
                retry_for: Duration::from_millis(500),
                tls: tls.clone(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        // Each error says why, as far as the client can know: a node it cannot verify, or
        // what the node said when it refused (or that it hung up, when that came first).
        let r = publisher.invalidate("user:2").await;
        assert!(says_why(who, &r), "{who}: {r:?}");
        let cache =
            CacheClient::with_tls(vec![(e.url(), e.url())], Duration::from_secs(2), &tls).unwrap();
        let r = cache.get("user:1").await;
        assert!(says_why(who, &r), "{who}: {r:?}");
    }
    assert_eq!(
        lock(&e.link).progress[0].2,
        seq,
        "nothing more was published"
    );
    near.stop();
    e.stop().await.unwrap();
    r.stop().await.unwrap();
    c.stop().await.unwrap();
}

/// Under mutual TLS, each API serves only the clients its `tls.allow` list names: the writer's
/// certificate publishes and reads status, the nodes' certificate follows; each refused the
/// other's API with `PERMISSION_DENIED`, saying which list to look at, and health answers all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_lets_each_api_only_the_names_its_allow_list_gives() {
    use dci_proto::tls::{Allow, TlsConfig};
    use dci_sdk::{ClientTls, PublisherOptions};
    let file = |name: &str| format!("{}/tests/tls/{name}", env!("CARGO_MANIFEST_DIR")).into();
    let tls = TlsConfig {
        cert: Some(file("node.pem")),
        key: Some(file("node.key")),
        ca: Some(file("ca.pem")),
        client_ca: Some(file("ca.pem")),
        allow: Allow {
            publish: vec!["orders.svc.*".into()],
            subscribe: vec!["localhost".into()],
            admin: vec!["spiffe://example.test/ns/*/sa/writer".into()],
            cache: vec![],
        },
    };
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(CoordinatorConfig {
        listen: any_port(),
        data_dir: dir.path().to_path_buf(),
        tls: tls.clone(),
        metrics_listen: Some(any_port()),
        ..Default::default()
    })
    .await
    .unwrap();
    let r = Relay::start(RelayConfig {
        listen: any_port(),
        upstream: vec![c.url()],
        region: "r".into(),
        tls: tls.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let read = |name: &str| std::fs::read(file(name)).unwrap();
    let trusting = ClientTls::with_ca_pem(read("ca.pem")).unwrap();
    let as_writer = trusting
        .clone()
        .with_identity_pem(read("writer.pem"), read("writer.key"))
        .unwrap();
    let as_node = trusting
        .with_identity_pem(read("node.pem"), read("node.key"))
        .unwrap();
    let publisher = |tls: ClientTls| {
        Publisher::with_options(
            vec![c.url()],
            PublisherOptions {
                tls,
                retry_for: Duration::from_secs(2),
                ..Default::default()
            },
        )
    };

    let seq = publisher(as_writer.clone())
        .await
        .unwrap()
        .invalidate("user:1")
        .await
        .unwrap();
    let link = r.core.links[0].clone();
    eventually("the relay, a node, follows the coordinator", || {
        lock(&link).progress.iter().any(|p| p.2 >= seq)
    })
    .await;
    match publisher(as_node.clone())
        .await
        .unwrap()
        .invalidate("user:2")
        .await
    {
        Err(dci_sdk::Error::Refused(why)) => {
            assert!(why.contains("Publisher/PublishStream"), "{why}");
            assert!(why.contains("its names: localhost"), "{why}");
            assert!(why.contains("tls.allow.publish"), "{why}");
        }
        other => panic!("a node's certificate published: {other:?}"),
    }

    let channel = |tls: &ClientTls| tls.endpoint(&c.url()).unwrap().connect_lazy();
    let status = |tls: &ClientTls| {
        let mut admin = pb::admin_client::AdminClient::new(channel(tls));
        async move { admin.status(pb::StatusRequest::default()).await }
    };
    assert!(status(&as_writer).await.is_ok());
    let refused = status(&as_node).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("tls.allow.admin"), "{refused:?}");

    let mut follow = pb::subscribe_client::SubscribeClient::new(channel(&as_writer));
    let hello = pb::Upstream {
        msg: Some(pb::upstream::Msg::Hello(pb::Hello {
            node_id: "impostor".into(),
            ..Default::default()
        })),
    };
    let refused = follow
        .subscribe(tokio_stream::iter(vec![hello]))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(
        refused.message().contains("tls.allow.subscribe"),
        "{refused:?}"
    );

    for tls in [&as_writer, &as_node] {
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel(tls));
        let answer = health
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .unwrap();
        assert_eq!(answer.into_inner().status, 1, "SERVING");
    }
    // Each refusal counted: the publish stream, the status call and the subscription.
    let metrics = scrape(c.metrics_addr.unwrap()).await;
    let refused: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("dci_calls_refused_total "))
        .unwrap_or_else(|| panic!("{metrics}"))
        .trim()
        .parse()
        .unwrap();
    assert!(refused >= 3.0, "{refused}");
    assert_eq!(
        lock(&link).progress.iter().map(|p| p.2).max(),
        Some(seq),
        "nothing more was published"
    );
    r.stop().await.unwrap();
    c.stop().await.unwrap();
}

/// Certificates renewed while nodes run (a Secret's files rewritten): the coordinator serves
/// the new certificate from the next handshake on, without a restart, and a client made from
/// files (as nodes make theirs) trusts the CA now in its file from its next connection on. A
/// connection made before keeps working; a client holding only the old CA is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewed_tls_files_are_used_from_the_next_connection() {
    use dci_proto::tls::TlsConfig;
    use dci_sdk::{ClientTls, PublisherOptions};
    let test_file = |name: &str| format!("{}/tests/tls/{name}", env!("CARGO_MANIFEST_DIR"));
    let files = tempfile::tempdir().unwrap();
    let at = |name: &str| files.path().join(name);
    let put = |name: &str, from: &str| std::fs::copy(test_file(from), at(name)).unwrap();
    put("tls.crt", "node.pem");
    put("tls.key", "node.key");
    put("ca.crt", "ca.pem");
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(CoordinatorConfig {
        listen: any_port(),
        data_dir: dir.path().to_path_buf(),
        tls: TlsConfig {
            cert: Some(at("tls.crt")),
            key: Some(at("tls.key")),
            ..Default::default()
        },
        ..Default::default()
    })
    .await
    .unwrap();
    let from_files = TlsConfig {
        ca: Some(at("ca.crt")),
        ..Default::default()
    }
    .client()
    .unwrap();
    let publisher = |tls: ClientTls| {
        let url = c.url();
        async move {
            let opts = PublisherOptions {
                retry_for: Duration::from_millis(300),
                tls,
                ..Default::default()
            };
            Publisher::with_options(vec![url], opts).await.unwrap()
        }
    };
    let before = publisher(from_files.clone()).await;
    assert_eq!(answer_of(&before, "a").await.unwrap(), 1);

    // Renewed by another CA (the key first: a half-written pair keeps the old one served).
    put("tls.key", "other-node.key");
    put("tls.crt", "other-node.pem");
    put("ca.crt", "other-ca.pem");
    let mut renewed = None;
    for _ in 0..50 {
        let p = publisher(from_files.clone()).await;
        if let Ok(seq) = answer_of(&p, "b").await {
            renewed = Some(seq);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(renewed, Some(2), "the renewed certificate was never served");
    let old_ca = ClientTls::with_ca_pem(std::fs::read(test_file("ca.pem")).unwrap()).unwrap();
    let r = answer_of(&publisher(old_ca).await, "c").await;
    assert!(r.is_err(), "trusting the old CA only: {r:?}");
    assert_eq!(
        answer_of(&before, "d").await.unwrap(),
        3,
        "the connection made before still works"
    );
    c.stop().await.unwrap();
}

/// A publisher whose coordinator cannot be reached at all (nothing listens there) answers each
/// call with an error once it has retried for `retry_for`, rather than leaving it waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_that_never_reaches_its_coordinator_gives_up_after_retry_for() {
    // A port another test's node could be given would answer with another service.
    let (_kept, refused) = refusing();
    let p = publisher_retrying_for(format!("http://{refused}"), Duration::from_millis(300)).await;
    for key in ["a", "b"] {
        match answer_of(&p, key).await {
            // Says why, as the transport told it, not only that it failed.
            Err(dci_sdk::Error::Unavailable(why)) => {
                assert!(why.contains("Connection refused"), "{why}")
            }
            other => panic!("{other:?}"),
        }
    }
    let cache = CacheClient::from_urls(vec![format!("http://{refused}")]).unwrap();
    match cache.get("k").await {
        Err(dci_sdk::Error::Unavailable(why)) => {
            assert!(why.contains("Connection refused"), "{why}")
        }
        other => panic!("{other:?}"),
    }
}

/// A publisher to `url` that retries for `retry_for`.
async fn publisher_retrying_for(url: String, retry_for: Duration) -> Publisher {
    let opts = dci_sdk::PublisherOptions {
        retry_for,
        ..Default::default()
    };
    Publisher::with_options(vec![url], opts).await.unwrap()
}

/// What `invalidate(key)` answers; the test fails if the call is left waiting.
async fn answer_of(p: &Publisher, key: &str) -> Result<Seq, dci_sdk::Error> {
    tokio::time::timeout(Duration::from_secs(30), p.invalidate(key.to_string()))
        .await
        .expect("the call was left waiting")
}

/// A URL of the wrong kind of node (a relay given as a coordinator, a coordinator given as an
/// edge) is refused with an error that says so, for every call, not retried as if it were down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_pointed_at_the_wrong_kind_of_node_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator(dir.path()).await;
    let r = relay(&c).await;
    let p = publisher_retrying_for(r.url(), Duration::from_secs(3600)).await;
    for key in ["a", "b"] {
        match answer_of(&p, key).await {
            Err(dci_sdk::Error::Refused(why)) => {
                assert!(why.contains("right kind of node"), "{why}")
            }
            other => panic!("{other:?}"),
        }
    }
    let cache = CacheClient::from_urls(vec![c.url()]).unwrap();
    match cache.get("k").await {
        Err(dci_sdk::Error::Refused(why)) => assert!(why.contains("right kind of node"), "{why}"),
        other => panic!("{other:?}"),
    }
    // Options no publish could work with are refused before any.
    let no_time = dci_sdk::PublisherOptions {
        timeout: Duration::ZERO,
        ..Default::default()
    };
    match Publisher::with_options(vec![c.url()], no_time).await {
        Err(dci_sdk::Error::Refused(why)) => assert!(why.contains("timeout"), "{why}"),
        other => panic!("{:?}", other.err()),
    }
    r.stop().await.unwrap();
    c.stop().await.unwrap();
}

/// A `get_or_load` dropped while it loads (a caller's timeout around it) leaves nothing behind:
/// no key stays counted as loading, and the next caller loads and fills.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_or_load_dropped_midway_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator(dir.path()).await;
    let r = relay(&c).await;
    let e = edge(edge_cfg(vec![r.url()])).await;
    wait_serving(&e).await;
    let cache = CacheClient::from_urls(vec![e.edge.url()]).unwrap();
    for key in ["user:1", "user:2", "user:1"] {
        let never = || futures::future::pending::<Result<Bytes, std::io::Error>>();
        let dropped =
            tokio::time::timeout(Duration::from_millis(200), cache.get_or_load(key, never)).await;
        assert!(dropped.is_err(), "the loader never finishes");
        assert_eq!(cache.loads_in_progress(), 0, "{key} left behind");
    }
    let v = cache
        .get_or_load("user:1", || async {
            Ok::<_, std::io::Error>(Bytes::from("v1"))
        })
        .await
        .unwrap();
    assert_eq!(v, Bytes::from("v1"));
    assert_eq!(cache.loads_in_progress(), 0);
    assert_eq!(cache.get("user:1").await.unwrap(), Lookup::Hit(v));
}

/// A relay at its `max_receivers` refuses one more before it costs anything: an edge with
/// another relay on its list follows that one, an edge without waits (refused, retrying) until
/// a place frees, and the receivers the relay has go on as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_at_max_receivers_sends_the_next_one_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator(dir.path()).await;
    let full = Relay::start(RelayConfig {
        listen: any_port(),
        upstream: vec![c.url()],
        region: "r".into(),
        max_receivers: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    let other = relay(&c).await;
    let first = edge(edge_cfg(vec![full.url()])).await;
    wait_serving(&first).await;
    let second = edge(edge_cfg(vec![full.url(), other.url()])).await;
    let waiting = edge(edge_cfg(vec![full.url()])).await;
    let on = |e: &Watched, url: &str| lock(&e.edge.link).connected_to.as_deref() == Some(url);
    eventually("the second edge on the other relay", || {
        on(&second, &other.url())
    })
    .await;
    let refused = || {
        full.counters
            .refused
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    eventually("the waiting edge refused more than once", || refused() >= 3).await;
    assert!(lock(&waiting.edge.link).connected_to.is_none());
    assert_eq!(
        full.counters
            .receivers
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    let mut metrics = String::new();
    dci_proto::metrics::render_serve(&mut metrics, &full.counters);
    assert!(
        metrics.contains("dci_receivers_refused_total "),
        "{metrics}"
    );

    // What a receiver is told: why, in so many words.
    let mut raw = pb::subscribe_client::SubscribeClient::connect(full.url())
        .await
        .unwrap();
    let hello = pb::Upstream {
        msg: Some(pb::upstream::Msg::Hello(pb::Hello {
            node_id: "one-too-many".into(),
            ..Default::default()
        })),
    };
    let status = raw
        .subscribe(tokio_stream::iter(vec![hello]))
        .await
        .expect_err("a relay at its limit refuses");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert!(status.message().contains("max_receivers"), "{status:?}");

    let p = Publisher::connect(vec![c.url()]).await.unwrap();
    let seq = publish_all(&p, &keys(0..200, "k")).await;
    wait_applied(&first, seq).await;
    wait_applied(&second, seq).await;
    assert!(lock(&waiting.keys).is_empty());

    // A place frees: the waiting edge takes it and catches up.
    first.edge.stop().await.unwrap();
    eventually("the waiting edge on the relay", || {
        on(&waiting, &full.url())
    })
    .await;
    wait_applied(&waiting, seq).await;
    assert_eq!(
        full.counters
            .receivers
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    for e in [second, waiting] {
        e.edge.stop().await.unwrap();
    }
    full.stop().await.unwrap();
    other.stop().await.unwrap();
    c.stop().await.unwrap();
}

/// The disk refuses a write (as a full disk does; here the log's next segment is `/dev/full`,
/// which answers every write with ENOSPC): the coordinator acknowledges nothing from then on,
/// says why, and reports itself unhealthy; what it acknowledged before reaches the edges. Restarted
/// on the same directory with the space back, it has every acknowledged entry, goes on after the
/// last of them under a new epoch (its receivers may hold a tail it no longer has), and the edge
/// follows it there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_write_the_disk_refuses_stops_acks_until_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let addr = nowhere();
    let cfg = CoordinatorConfig {
        listen: addr,
        data_dir: dir.path().to_path_buf(),
        segment_bytes: 4096,
        ..Default::default()
    };
    let c = Coordinator::start(cfg.clone()).await.unwrap();
    let r = relay(&c).await;
    let e = edge(edge_cfg(vec![r.url()])).await;
    let p = Publisher::with_options(
        vec![c.url()],
        dci_sdk::PublisherOptions {
            retry_for: Duration::from_millis(300),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    // Published before the edge is in the stream, "before" could be behind where it joins.
    wait_in_stream(&e).await;
    let first = p.invalidate("before").await.unwrap();
    // Every segment the log could roll to next, until well past what 4 KiB segments need.
    let full: Vec<_> = (first + 1..first + 400)
        .map(|s| dir.path().join(format!("{s:020}.seg")))
        .collect();
    for f in &full {
        std::os::unix::fs::symlink("/dev/full", f).unwrap();
    }
    let mut acked = vec![first];
    let refused = loop {
        match p.invalidate(format!("k{}", acked.len())).await {
            Ok(seq) => acked.push(seq),
            Err(err) => break err,
        }
        assert!(acked.len() < 400, "the log never rolled onto the full disk");
    };
    assert!(
        matches!(&refused, dci_sdk::Error::Unavailable(m) if m.contains("No space left on device")),
        "{refused}"
    );
    let last = *acked.last().unwrap();
    assert!(
        acked.len() > 10,
        "a 4 KiB segment holds more than {acked:?}"
    );
    // Nothing more is taken, whatever is asked.
    let again = p.invalidate("after").await.unwrap_err();
    assert!(matches!(again, dci_sdk::Error::Unavailable(_)), "{again}");
    let channel = tonic::transport::Endpoint::from_shared(c.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    // Told at the coordinator's next housekeeping tick.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: "dci.v1.Publisher".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        if status == 2 {
            break; // NOT_SERVING
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still healthy: {status}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_applied(&e, last).await;
    let before = lock(&e.keys).len();
    assert_eq!(before, acked.len(), "every acknowledged entry, once");
    // `dci status`, where an operator looks first, says so too.
    let failure = tree_at(c.url()).await[0].failure.clone();
    assert!(
        failure.contains("No space left on device") && failure.contains("refuses publishes"),
        "{failure:?}"
    );
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_dci"))
        .args(["status", "--coordinator", &c.url()])
        .output()
        .await
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown
            .lines()
            .any(|l| l == format!("! coordinator-0: {failure}")),
        "{shown}"
    );

    let old_epoch = c.epoch;
    c.stop().await.unwrap();
    for f in &full {
        std::fs::remove_file(f).unwrap();
    }
    let c = Coordinator::start(cfg).await.unwrap();
    assert_ne!(c.epoch, old_epoch);
    assert_eq!(
        tree_at(c.url()).await[0].failure,
        "",
        "restarted, it does its work"
    );
    let next = p.invalidate("after the restart").await.unwrap();
    assert_eq!(
        next,
        last + 1,
        "acknowledged seqs are kept, and none is skipped"
    );
    wait_applied(&e, next).await;
    assert!(e
        .edge
        .store
        .applied()
        .iter()
        .any(|&(_, ep, s)| ep == c.epoch && s == next));
    e.edge.stop().await.unwrap();
    r.stop().await.unwrap();
    c.stop().await.unwrap();
}

/// A coordinator decodes requests of at most 16 MiB; a larger one ends the stream (for every
/// caller in flight on it). A call whose entries are more than that is refused at once, saying
/// so, and callers merged into one request stop short of it: forty calls of a megabyte each,
/// queued together, are all logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_stay_under_what_a_coordinator_decodes() {
    use dci_sdk::PublisherOptions;
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator(dir.path()).await;
    let proxy = support::proxy::Proxy::start(c.addr).await;
    let p = Publisher::with_options(
        vec![proxy.url()],
        PublisherOptions {
            max_batch: 1 << 20,
            max_in_flight: 1,
            timeout: Duration::from_secs(30),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let keys = |tag: usize, n: usize| -> Vec<dci_proto::Invalidation> {
        (0..n)
            .map(|i| dci_proto::Invalidation::key(format!("{tag}:{i:01000}")))
            .collect()
    };
    match p.publish(keys(0, 20_000)).await {
        Err(dci_sdk::Error::Refused(why)) => {
            assert!(why.contains("publish them in smaller calls"), "{why}")
        }
        other => panic!("{:?}", other.map(|s| s.len())),
    }
    // One key longer than any coordinator takes: said in our words, before the transport's.
    match p.invalidate("k".repeat(17 << 20)).await {
        Err(dci_sdk::Error::Refused(why)) => assert!(
            why.contains("entry 0: key is 17825792 bytes, more than the maximum any coordinator takes (65536)"),
            "{why}"
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(p.invalidate("warm").await.unwrap(), 1);

    // With the one request in flight unanswered, forty calls of a megabyte queue up behind it;
    // its answer lets them all go at once.
    proxy.blackhole_to_client(true);
    let mut first = Box::pin(p.invalidate("first"));
    assert!(futures::poll!(&mut first).is_pending());
    eventually("the first logged", || c.propagation.snapshot().count() == 2).await;
    let mut calls = Box::pin(futures::future::join_all(
        (1..=40).map(|tag| p.publish(keys(tag, 1_000))),
    ));
    assert!(futures::poll!(&mut calls).is_pending());
    proxy.blackhole_to_client(false);
    assert_eq!(first.await.unwrap(), 2);
    let mut seqs: Vec<Seq> = Vec::new();
    for r in calls.await {
        let s = r.unwrap();
        assert_eq!(s.len(), 1_000);
        seqs.extend(s);
    }
    seqs.sort();
    seqs.dedup();
    assert_eq!(seqs.len(), 40_000, "every entry logged once");
    assert_eq!(p.invalidate("after").await.unwrap(), 40_003);
    c.stop().await.unwrap();
}

/// A relay with more nodes below it than its heartbeats carry (thousands of edges, here under a
/// relay below it) sums up those it has no room for: a wait for a publish waits for them as
/// their least advanced and counts each, where it used to leave them out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caches_beyond_what_a_heartbeat_carries_are_still_waited_for() {
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator(dir.path()).await;
    let r = Relay::start(RelayConfig {
        listen: any_port(),
        upstream: vec![c.url()],
        region: "eu".into(),
        node_id: "relay-top".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let p = Publisher::connect(vec![c.url()]).await.unwrap();
    for i in 0..3 {
        p.invalidate(format!("k{i}")).await.unwrap();
    }
    let epoch = tree_at(c.url()).await[0].shards[0].epoch;

    // The relay below, played by a raw stream: it reports 12,000 edges (about 1.6 MiB of
    // reports), every one at seq 3 but the last 10 by name, at 2.
    const EDGES: usize = 12_000;
    let report = move |id: String, role: &str, hwm: Seq| pb::NodeStatus {
        node_id: id,
        role: role.into(),
        region: "eu".into(),
        parent: "relay-below".into(),
        shards: vec![pb::ShardProgress {
            shard: 0,
            epoch,
            hwm,
            ..Default::default()
        }],
        ..Default::default()
    };
    let subtree = move |last_ones_at: Seq| {
        let mut nodes = vec![report("relay-below".into(), "relay", 3)];
        nodes.extend((0..EDGES).map(|i| {
            let hwm = if i >= EDGES - 10 { last_ones_at } else { 3 };
            report(
                format!("edge-{i:05}.eu-west-1.edges.dci.svc.cluster.local"),
                "edge",
                hwm,
            )
        }));
        nodes
    };
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tx.send(pb::Upstream {
        msg: Some(pb::upstream::Msg::Hello(pb::Hello {
            node_id: "relay-below".into(),
            region: "eu".into(),
            role: "relay".into(),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut raw = pb::subscribe_client::SubscribeClient::connect(r.url())
        .await
        .unwrap();
    let _down = raw
        .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap();
    let (at_tx, mut at) = tokio::sync::watch::channel(2);
    let reporting = tokio::spawn(async move {
        loop {
            let hb = pb::Heartbeat {
                subtree: subtree(*at.borrow_and_update()),
                ..Default::default()
            };
            let msg = pb::Upstream {
                msg: Some(pb::upstream::Msg::Heartbeat(hb)),
            };
            if tx.send(msg).await.is_err() {
                return;
            }
            let _ = tokio::time::timeout(Duration::from_millis(200), at.changed()).await;
        }
    });

    let lagging = loop {
        match p.wait_applied(Duration::from_secs(2)).await {
            Err(dci_sdk::Error::NotApplied(l))
                if l.iter().any(|l| l.node_id.contains("left out")) =>
            {
                break l
            }
            // The relays' reports on their way.
            Err(dci_sdk::Error::NotApplied(_)) => {}
            Ok(a) if a.caches == 0 => {}
            other => panic!("the last edges were not waited for: {other:?}"),
        }
    };
    let names: Vec<String> = lagging.iter().map(ToString::to_string).collect();
    let summed_up = names.iter().find_map(|n| {
        n.strip_suffix(" edges of eu left out by relay-top (eu) at seq 2 of 3 on shard 0")
    });
    let count: usize = summed_up
        .expect("the edges left out, at the least advanced")
        .parse()
        .unwrap();
    assert!((10..EDGES).contains(&count), "{names:?}");
    assert_eq!(
        names.len(),
        1,
        "the ten behind are all among those left out: {names:?}"
    );
    at_tx.send(3).unwrap();
    let applied = loop {
        if let Ok(a) = p.wait_applied(Duration::from_secs(5)).await {
            break a;
        }
    };
    assert_eq!(
        applied.caches, EDGES,
        "each edge counted, whether reported or summed up"
    );
    assert!(applied.past_bound.is_empty());
    // `dci status` reads the same: the summary is one node of the tree, saying how many it is.
    let tree = tree_at(c.url()).await;
    let summary = tree.iter().find(|n| n.left_out > 0).expect("a summary");
    assert_eq!(
        (
            summary.node_id.as_str(),
            summary.parent.as_str(),
            summary.role.as_str()
        ),
        ("edges of eu left out by relay-top", "relay-top", "edge")
    );
    let edges = tree
        .iter()
        .filter(|n| n.role == "edge" && n.left_out == 0)
        .count();
    assert_eq!(edges + summary.left_out as usize, EDGES);
    reporting.abort();
}

/// A cache whose relay's link ended (the relay stopped, or between senders) is still in the
/// tree for its staleness bound: a wait holds for it, where it took the tree without it for one
/// with nothing to wait for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_holds_for_a_cache_whose_relay_went_away() {
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator(dir.path()).await;
    let a_addr = nowhere();
    let a = relay_at(a_addr, vec![c.url()], 64 << 20).await;
    let b = relay_at(any_port(), vec![a.url()], 64 << 20).await;
    let bound = Duration::from_secs(2);
    let e = edge(EdgeConfig {
        node_id: "edge-1".into(),
        region: "eu".into(),
        max_staleness: bound,
        ..edge_cfg(vec![b.url()])
    })
    .await;
    let p = Publisher::connect(vec![c.url()]).await.unwrap();
    p.invalidate("k0").await.unwrap();
    loop {
        match p.wait_applied(Duration::from_secs(10)).await {
            Ok(a) if a.caches == 1 => break,
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }

    // The relay between the edge and the coordinator goes; the one below it has no other. Its
    // port is held meanwhile (bound, refusing), so that no other test's node takes it.
    a.stop().await.unwrap();
    let held = hold(a_addr);
    p.invalidate("k1").await.unwrap();
    let began = std::time::Instant::now();
    let applied = p.wait_applied(Duration::from_secs(10)).await.unwrap();
    assert_eq!(applied.caches, 1, "{applied:?}");
    let names: Vec<&str> = applied
        .past_bound
        .iter()
        .map(|l| l.node_id.as_str())
        .collect();
    assert_eq!(names, ["edge-1"], "released at its bound, not before");
    assert!(began.elapsed() >= bound, "{:?}", began.elapsed());
    assert!(
        !lock(&e.edge.link).fresh_within(std::time::Instant::now(), bound),
        "it serves only misses by then"
    );

    // Back (once past its bound and out of the tree, it serves nothing until it has caught up,
    // which is applying): it applies what it missed, and is waited for as any other.
    drop(held);
    let a = relay_at(a_addr, vec![c.url()], 64 << 20).await;
    p.invalidate("k2").await.unwrap();
    loop {
        match p.wait_applied(Duration::from_secs(10)).await {
            Ok(a) if a.caches == 1 && a.past_bound.is_empty() => break,
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    c.stop().await.unwrap();
}

type Loaded = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Bytes, String>> + Send>>;
type Loader = Box<dyn FnOnce() -> Loaded + Send>;
/// A cache's `get_or_load` of one key, whatever the cache.
type GetOrLoad = Arc<
    dyn Fn(
            Loader,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<Bytes, dci_sdk::Error>> + Send>,
        > + Send
        + Sync,
>;
/// What a load does meanwhile (e.g. invalidate the key it loads, as a write racing it would).
type During =
    Arc<dyn Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> + Send + Sync>;

/// `n` callers of one key's `get_or_load` at once, all of them in before the first load ends.
/// Every load runs `during`, then stays until as many loads as `together` run at once (or
/// two seconds have passed). The values, how many loads ran, and the most that ran at once.
async fn herd(
    n: usize,
    get_or_load: GetOrLoad,
    during: Option<During>,
    together: usize,
) -> (Vec<Bytes>, usize, usize) {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    let (arrived, started, now, most) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let callers: Vec<_> = (0..n)
        .map(|_| {
            let (arrived, started, now, most) =
                (arrived.clone(), started.clone(), now.clone(), most.clone());
            let (get_or_load, during) = (get_or_load.clone(), during.clone());
            let came = arrived.clone();
            let loader: Loader = Box::new(move || {
                Box::pin(async move {
                    let i = started.fetch_add(1, SeqCst);
                    most.fetch_max(now.fetch_add(1, SeqCst) + 1, SeqCst);
                    if i == 0 {
                        while arrived.load(SeqCst) < n {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        // Their first look is a miss, and then they queue for the key.
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                    if let Some(d) = during {
                        d().await;
                    }
                    let until = tokio::time::Instant::now() + Duration::from_secs(2);
                    while now.load(SeqCst) < together && tokio::time::Instant::now() < until {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    now.fetch_sub(1, SeqCst);
                    Ok(Bytes::from(format!("load {i}")))
                })
            });
            tokio::spawn(async move {
                came.fetch_add(1, SeqCst);
                get_or_load(loader).await.unwrap()
            })
        })
        .collect();
    let mut values = Vec::new();
    for c in callers {
        values.push(c.await.unwrap());
    }
    (values, started.load(SeqCst), most.load(SeqCst))
}

/// `get_or_load` of one key by many callers at once, through a `CacheClient` and a `NearCache`.
/// One loads and the others read its fill: one load for twenty callers. When each load's fill is
/// refused (the key is invalidated while it loads, as a row written again and again), the callers
/// that waited load side by side instead of each waiting through every load ahead of it. From a
/// cache that serves only misses (its relay cut off from the coordinator), none waits for another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_or_load_callers_wait_for_one_load_and_never_through_a_line_of_them() {
    use dci_sdk::{NearCache, NearCacheOptions};
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator(dir.path()).await;
    let r = relay(&c).await;
    let e = edge(edge_cfg(vec![r.url()])).await;
    let near = NearCache::start(NearCacheOptions {
        relays: vec![r.url()],
        ..Default::default()
    })
    .unwrap();
    // A relay that never reaches a coordinator: what follows it serves only misses.
    let stranded = relay_at(any_port(), vec![format!("http://{}", nowhere())], 1 << 20).await;
    let cut_off = edge(edge_cfg(vec![stranded.url()])).await;
    let near_cut_off = NearCache::start(NearCacheOptions {
        relays: vec![stranded.url()],
        ..Default::default()
    })
    .unwrap();
    let p = Publisher::connect(vec![c.url()]).await.unwrap();
    let head = p.invalidate("warm").await.unwrap();
    wait_applied(&e, head).await;
    let n2 = near.clone();
    eventually("near cache caught up", move || {
        n2.applied().iter().any(|&(_, _, s)| s >= head) && n2.is_fresh()
    })
    .await;
    wait_connected(&cut_off).await;

    let client = |url: String, key: &'static str| -> GetOrLoad {
        let cache = CacheClient::from_urls(vec![url]).unwrap();
        Arc::new(move |loader| {
            let cache = cache.clone();
            Box::pin(async move { cache.get_or_load(key, loader).await })
        })
    };
    let in_process = |near: &NearCache, key: &'static str| -> GetOrLoad {
        let near = near.clone();
        Arc::new(move |loader| {
            let near = near.clone();
            Box::pin(async move { near.get_or_load(key, loader).await })
        })
    };
    // Each load invalidates its key and waits until the cache has applied that.
    let invalidating =
        |key: &'static str, applied: Arc<dyn Fn(Seq) -> bool + Send + Sync>| -> During {
            let p = p.clone();
            Arc::new(move || {
                let (p, applied) = (p.clone(), applied.clone());
                Box::pin(async move {
                    let seq = p.invalidate(key).await.unwrap();
                    eventually("the load's invalidation applied", || applied(seq)).await;
                })
            })
        };
    let edge_applied: Arc<dyn Fn(Seq) -> bool + Send + Sync> = {
        let store = e.edge.store.clone();
        Arc::new(move |seq| store.applied().iter().any(|&(_, _, s)| s >= seq))
    };
    let near_applied: Arc<dyn Fn(Seq) -> bool + Send + Sync> = {
        let near = near.clone();
        Arc::new(move |seq| near.applied().iter().any(|&(_, _, s)| s >= seq))
    };

    let n = 20;
    for (name, cache) in [
        ("edge", client(e.edge.url(), "hot:1")),
        ("near cache", in_process(&near, "hot:1")),
    ] {
        let (values, loads, _) = herd(n, cache, None, 1).await;
        assert_eq!(loads, 1, "{name}: one load for {n} callers");
        assert!(values.iter().all(|v| v == "load 0"), "{name}: {values:?}");
    }
    for (name, cache, applied) in [
        ("edge", client(e.edge.url(), "hot:2"), edge_applied),
        ("near cache", in_process(&near, "hot:2"), near_applied),
    ] {
        let during = invalidating("hot:2", applied);
        let (values, loads, most) = herd(n, cache, Some(during), n - 1).await;
        assert_eq!(loads, n, "{name}: every fill refused, every caller loads");
        assert!(
            most >= n / 2,
            "{name}: the callers that waited load side by side, not in a line: {most} at most"
        );
        let distinct: HashSet<_> = values.iter().collect();
        assert_eq!(distinct.len(), n, "{name}: each its own load");
    }
    for (name, cache) in [
        ("edge", client(cut_off.edge.url(), "hot:3")),
        ("near cache", in_process(&near_cut_off, "hot:3")),
    ] {
        let (_, loads, most) = herd(n, cache, None, n).await;
        assert_eq!(loads, n, "{name}: serving only misses");
        assert_eq!(most, n, "{name}: none waits for another");
    }
    near.stop();
    near_cut_off.stop();
    for w in [e, cut_off] {
        w.edge.stop().await.unwrap();
    }
    stranded.stop().await.unwrap();
    r.stop().await.unwrap();
    c.stop().await.unwrap();
}
