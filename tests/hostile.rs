//! Random messages on every gRPC API of real nodes on loopback, as a broken or hostile peer
//! would send them: no node panics, no stream a node follows is stopped by them, every call is
//! answered with a result or a refusal (never an internal error), and the tree still carries a
//! publish to its edge afterwards.
//!
//! The messages come from a seeded generator, so a failure repeats; the seed is in the message.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use dci_coordinator::{Coordinator, CoordinatorConfig};
use dci_edge_cache::{EdgeConfig, EdgeNode};
use dci_proto::pb;
use dci_proto::types::MAX_SEQ;
use dci_proto::upstream::lock;
use dci_relay::{Relay, RelayConfig};
use prost::Message;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

/// `DCI_HOSTILE_SEED` runs another seed (to search more widely than the suite does).
fn seed() -> u64 {
    std::env::var("DCI_HOSTILE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_d0c1)
}

static PANICS: AtomicUsize = AtomicUsize::new(0);

/// Counts panics on any thread of this test binary (a node's task that panics does not fail
/// the test by itself).
fn count_panics() {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            default(info);
        }));
    });
}

fn num(r: &mut StdRng) -> u64 {
    match r.random_range(0..10) {
        0..=5 => r.random_range(0..24),
        6 => MAX_SEQ - 2 + r.random_range(0..5),
        7 => u64::MAX - r.random_range(0..3),
        _ => r.random(),
    }
}

fn shard(r: &mut StdRng) -> u32 {
    if r.random_bool(0.9) {
        r.random_range(0..3)
    } else {
        r.random()
    }
}

fn bytes(r: &mut StdRng) -> Bytes {
    let n = match r.random_range(0..10) {
        0 => 0,
        1 => r.random_range(1000..5000),
        _ => r.random_range(1..24),
    };
    Bytes::from((0..n).map(|_| r.random::<u8>()).collect::<Vec<u8>>())
}

fn text(r: &mut StdRng) -> String {
    let n = match r.random_range(0..10) {
        0 => 0,
        1 => r.random_range(300..3000),
        _ => r.random_range(1..16),
    };
    (0..n)
        .map(|_| match r.random_range(0..4) {
            0 => char::from(r.random_range(b'a'..=b'z')),
            1 => char::from_u32(r.random_range(0..0x11_0000)).unwrap_or('\u{fffd}'),
            2 => ['\0', '\n', '/', ':', ' '][r.random_range(0..5)],
            _ => char::from(r.random_range(b'0'..=b'9')),
        })
        .collect()
}

fn invalidation(r: &mut StdRng) -> pb::Invalidation {
    pb::Invalidation {
        key: bytes(r),
        kind: r.random_range(-2..5),
        seq: num(r),
        source_version: r.random_bool(0.5).then(|| num(r)),
        publish_time_us: num(r),
        trace_id: r.random_bool(0.3).then(|| bytes(r)),
    }
}

fn status(r: &mut StdRng) -> pb::NodeStatus {
    pb::NodeStatus {
        node_id: text(r),
        role: text(r),
        region: text(r),
        parent: text(r),
        shards: (0..r.random_range(0..3))
            .map(|_| pb::ShardProgress {
                shard: shard(r),
                epoch: num(r),
                hwm: num(r),
                lag_seqs: num(r),
                lag_ms: num(r),
                caught_up_ms: num(r),
            })
            .collect(),
        connected_ms: num(r),
        max_staleness_ms: num(r),
        left_out: num(r) as u32,
        restarted: r.random(),
        failure: text(r),
    }
}

fn upstream(r: &mut StdRng) -> pb::Upstream {
    use pb::upstream::Msg;
    let msg = match r.random_range(0..5) {
        0 => Msg::Hello(pb::Hello {
            node_id: text(r),
            region: text(r),
            filter: r.random_bool(0.7).then(|| pb::Filter {
                prefixes: (0..r.random_range(0..4)).map(|_| bytes(r)).collect(),
                ring: r.random_bool(0.4).then(|| pb::RingFilter {
                    nodes: (0..r.random_range(0..4)).map(|_| text(r)).collect(),
                    self_id: text(r),
                    replication: num(r) as u32,
                }),
            }),
            resume: (0..r.random_range(0..3))
                .map(|_| pb::ResumePoint {
                    shard: shard(r),
                    epoch: num(r),
                    hwm: num(r),
                })
                .collect(),
            role: text(r),
            zstd_batches: r.random(),
            window_bytes: num(r),
            instance: num(r),
        }),
        1 => Msg::Ack(pb::Ack {
            shard: shard(r),
            epoch: num(r),
            hwm: num(r),
        }),
        2 => Msg::Nack(pb::Nack {
            shard: shard(r),
            from_seq: num(r),
            to_seq: num(r),
        }),
        _ => Msg::Heartbeat(pb::Heartbeat {
            heads: Vec::new(),
            subtree: (0..r.random_range(0..3)).map(|_| status(r)).collect(),
            now_us: num(r),
            probe_us: num(r),
            echo_us: num(r),
        }),
    };
    pb::Upstream { msg: Some(msg) }
}

fn downstream(r: &mut StdRng) -> pb::Downstream {
    use pb::downstream::Msg;
    let batch = |r: &mut StdRng| {
        let b = pb::Batch {
            shard: shard(r),
            epoch: if r.random_bool(0.8) { 1 } else { num(r) },
            first_seq: num(r),
            last_seq: num(r),
            entries: (0..r.random_range(0..4)).map(|_| invalidation(r)).collect(),
            base_time_us: if r.random_bool(0.7) { 0 } else { num(r) },
        };
        let mut bytes = b.encode_to_vec();
        if r.random_bool(0.3) && !bytes.is_empty() {
            let at = r.random_range(0..bytes.len());
            bytes[at] ^= r.random::<u8>() | 1;
        }
        Bytes::from(bytes)
    };
    let msg = match r.random_range(0..6) {
        0 | 1 => Msg::Batch(batch(r)),
        2 => {
            let plain = batch(r);
            Msg::BatchZstd(if r.random_bool(0.5) {
                Bytes::from(zstd::bulk::compress(&plain, 1).unwrap())
            } else {
                bytes(r)
            })
        }
        3 => Msg::Reset(pb::Reset {
            shard: shard(r),
            epoch: num(r),
            hwm: num(r),
            reason: text(r),
        }),
        _ => Msg::Heartbeat(pb::Heartbeat {
            heads: (0..r.random_range(0..3))
                .map(|_| pb::ShardHead {
                    shard: shard(r),
                    epoch: if r.random_bool(0.8) { 1 } else { num(r) },
                    head: num(r),
                    head_time_us: num(r),
                    upstream_age_ms: num(r),
                    held: num(r),
                    shard_count: num(r) as u32,
                })
                .collect(),
            subtree: Vec::new(),
            now_us: num(r),
            probe_us: 0,
            echo_us: num(r),
        }),
    };
    pb::Downstream { msg: Some(msg) }
}

/// A refusal, or an answer: anything but a node failing inside.
fn answered<T: std::fmt::Debug>(what: &str, r: &Result<T, Status>) {
    let seed = seed();
    if let Err(s) = r {
        assert!(
            !matches!(s.code(), tonic::Code::Internal | tonic::Code::Unknown),
            "seed {seed:#x}: {what} failed inside the node: {s:?}"
        );
    }
}

/// Streams of random messages to a node's Subscribe; reads what it answers meanwhile.
async fn hostile_streams(url: &str, r: &mut StdRng, streams: usize) {
    let seed = seed();
    for _ in 0..streams {
        let Ok(mut client) = pb::subscribe_client::SubscribeClient::connect(url.to_string()).await
        else {
            panic!("seed {seed:#x}: {url} no longer takes connections");
        };
        let (tx, rx) = mpsc::channel(64);
        // Mostly a Hello first, as a receiver would; sometimes not.
        if r.random_bool(0.8) {
            let mut hello = upstream(r);
            while !matches!(hello.msg, Some(pb::upstream::Msg::Hello(_))) {
                hello = upstream(r);
            }
            tx.send(hello).await.unwrap();
        }
        for _ in 0..r.random_range(0..12) {
            let _ = tx.send(upstream(r)).await;
        }
        let call = client.subscribe(ReceiverStream::new(rx)).await;
        answered("a subscribe", &call);
        if let Ok(resp) = call {
            let mut down = resp.into_inner();
            // What the node answers, for a moment; a refusal is fine, a failure inside is not.
            let deadline = tokio::time::Instant::now() + Duration::from_millis(50);
            while let Ok(m) = tokio::time::timeout_at(deadline, down.message()).await {
                answered("a subscribe stream", &m);
                if !matches!(m, Ok(Some(_))) {
                    break;
                }
            }
        }
        drop(tx);
    }
}

/// A relay of region "r" following `upstream`, on a port of its own.
async fn relay_following(upstream: String) -> Relay {
    Relay::start(RelayConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        upstream: vec![upstream],
        region: "r".into(),
        ..Default::default()
    })
    .await
    .unwrap()
}

/// An edge of region "r" following `sender`, on a port of its own.
async fn edge_following(sender: String) -> EdgeNode {
    EdgeNode::start(EdgeConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        relays: vec![sender],
        region: "r".into(),
        ..Default::default()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_messages_on_every_api_neither_panic_nor_stop_a_node() {
    count_panics();
    let seed = seed();
    let mut r = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(CoordinatorConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_path_buf(),
        ..Default::default()
    })
    .await
    .unwrap();
    let relay = relay_following(c.url()).await;
    let e = edge_following(relay.url()).await;

    hostile_streams(&c.url(), &mut r, 60).await;
    hostile_streams(&relay.url(), &mut r, 60).await;

    let mut publisher = pb::publisher_client::PublisherClient::connect(c.url())
        .await
        .unwrap();
    let mut refused = 0;
    for _ in 0..200 {
        let req = pb::PublishRequest {
            publisher_id: if r.random_bool(0.5) {
                String::new()
            } else {
                text(&mut r)
            },
            request_no: num(&mut r),
            entries: (0..r.random_range(0..5))
                .map(|_| invalidation(&mut r))
                .collect(),
        };
        let a = publisher.publish(req.clone()).await;
        answered("a publish", &a);
        refused += usize::from(a.is_err());
        let s = publisher
            .publish_stream(tokio_stream::iter(vec![req.clone(), req]))
            .await;
        answered("a publish stream", &s);
        if let Ok(s) = s {
            let mut s = s.into_inner();
            while let Some(m) = s.message().await.transpose() {
                answered("a publish stream's answer", &m);
                if m.is_err() {
                    break;
                }
            }
        }
    }
    assert!(refused > 0, "seed {seed:#x}: nothing random was refused");

    let mut cache = pb::cache_client::CacheClient::connect(e.url())
        .await
        .unwrap();
    for _ in 0..200 {
        let key = bytes(&mut r);
        answered(
            "a get",
            &cache.get(pb::GetRequest { key: key.clone() }).await,
        );
        let set = pb::SetRequest {
            key: key.clone(),
            value: bytes(&mut r),
            lease: r.random_bool(0.7).then(|| num(&mut r)),
            ttl_ms: num(&mut r),
            tags: (0..r.random_range(0..70)).map(|_| bytes(&mut r)).collect(),
            version: r.random_bool(0.5).then(|| num(&mut r)),
        };
        answered("a set", &cache.set(set.clone()).await);
        answered(
            "a delete",
            &cache.delete(pb::DeleteRequest { key: key.clone() }).await,
        );
        answered(
            "a get-many",
            &cache
                .get_many(pb::GetManyRequest {
                    keys: (0..r.random_range(0..4)).map(|_| bytes(&mut r)).collect(),
                })
                .await,
        );
        answered(
            "a set-many",
            &cache
                .set_many(pb::SetManyRequest {
                    entries: vec![set.clone(), set],
                })
                .await,
        );
    }
    for url in [c.url(), relay.url(), e.url()] {
        let mut admin = pb::admin_client::AdminClient::connect(url).await.unwrap();
        answered("a status", &admin.status(pb::StatusRequest {}).await);
    }

    // The tree still carries a publish, on the link it had from the start.
    let seq = publisher
        .publish(pb::PublishRequest {
            publisher_id: String::new(),
            request_no: 0,
            entries: vec![pb::Invalidation {
                key: Bytes::from_static(b"after:1"),
                kind: pb::Kind::Key as i32,
                ..Default::default()
            }],
        })
        .await
        .unwrap()
        .into_inner()
        .seqs[0];
    let store = e.store.clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !store.applied().iter().any(|&(_, _, s)| s >= seq) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "seed {seed:#x}: the edge never applied seq {seq}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(lock(&e.link).connects, 1, "the edge's link was cut");
    assert_eq!(
        lock(&relay.core.links[0]).connects,
        1,
        "the relay's link was cut"
    );
    assert_eq!(
        PANICS.load(Ordering::SeqCst),
        0,
        "seed {seed:#x}: a node panicked"
    );
    e.stop().await.unwrap();
    relay.stop().await.unwrap();
    c.stop().await.unwrap();
}

/// Plays random messages to whoever follows it, between heartbeats that keep the link alive.
#[derive(Clone)]
struct Random {
    seed: u64,
    messages: usize,
}

#[tonic::async_trait]
impl pb::subscribe_server::Subscribe for Random {
    type SubscribeStream = ReceiverStream<Result<pb::Downstream, Status>>;
    async fn subscribe(
        &self,
        req: Request<Streaming<pb::Upstream>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let this = self.clone();
        tokio::spawn(async move {
            let mut r = StdRng::seed_from_u64(this.seed);
            // Read what the receiver says, so its stream never backs up.
            tokio::spawn(async move { while let Ok(Some(_)) = inbound.message().await {} });
            for i in 0..this.messages {
                if tx.send(Ok(downstream(&mut r))).await.is_err() {
                    return;
                }
                if i % 16 == 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            // Then only heartbeats: the receiver stays connected.
            loop {
                let hb = pb::Downstream {
                    msg: Some(pb::downstream::Msg::Heartbeat(pb::Heartbeat::default())),
                };
                if tx.send(Ok(hb)).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_messages_from_a_sender_neither_panic_nor_stop_its_receivers() {
    count_panics();
    let seed = seed();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let messages = 2000;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(pb::subscribe_server::SubscribeServer::new(Random {
                seed,
                messages,
            }))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let relay = relay_following(url.clone()).await;
    let edges = [
        edge_following(url.clone()).await,
        // Behind the relay: whatever the random sender made it hold, it passes on.
        edge_following(relay.url()).await,
    ];
    // Long enough for every message to have gone out and been taken.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for e in &edges {
        let mut cache = pb::cache_client::CacheClient::connect(e.url())
            .await
            .unwrap();
        answered(
            "a get",
            &cache
                .get(pb::GetRequest {
                    key: Bytes::from_static(b"k"),
                })
                .await,
        );
        assert_eq!(lock(&e.link).connects, 1, "{}: its link was cut", e.node_id);
    }
    assert_eq!(
        lock(&relay.core.links[0]).connects,
        1,
        "the relay's link was cut"
    );
    assert_eq!(
        PANICS.load(Ordering::SeqCst),
        0,
        "seed {seed:#x}: a node panicked"
    );
    for e in edges {
        e.stop().await.unwrap();
    }
    relay.stop().await.unwrap();
}
