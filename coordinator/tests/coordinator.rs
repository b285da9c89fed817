//! The coordinator over real gRPC on loopback, with its log in real files.

mod support;

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use dci_coordinator::{Coordinator, CoordinatorConfig};
use dci_proto::pb;
use dci_proto::pb::publisher_client::PublisherClient;
use support::Follower;
use tonic::transport::Channel;
use tonic::Code;

fn cfg(dir: &Path) -> CoordinatorConfig {
    CoordinatorConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.to_path_buf(),
        ..CoordinatorConfig::default()
    }
}

fn key(k: &str) -> pb::Invalidation {
    pb::Invalidation {
        key: Bytes::copy_from_slice(k.as_bytes()),
        kind: pb::Kind::Key as i32,
        ..Default::default()
    }
}

fn req(publisher: &str, n: u64, keys: &[&str]) -> pb::PublishRequest {
    pb::PublishRequest {
        publisher_id: publisher.into(),
        request_no: n,
        entries: keys.iter().map(|k| key(k)).collect(),
    }
}

async fn client(c: &Coordinator) -> PublisherClient<Channel> {
    PublisherClient::connect(c.url()).await.unwrap()
}

/// A raw `Subscribe` stream that has said `hello`: where the test sends its acks, and what the
/// coordinator sends.
async fn subscribe_raw(
    c: &Coordinator,
    hello: pb::Hello,
) -> (
    tokio::sync::mpsc::Sender<pb::Upstream>,
    tonic::Streaming<pb::Downstream>,
) {
    let mut raw = pb::subscribe_client::SubscribeClient::connect(c.url())
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::Upstream {
        msg: Some(pb::upstream::Msg::Hello(hello)),
    })
    .await
    .unwrap();
    let stream = raw
        .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (tx, stream)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_every_acknowledged_publish_and_never_reuses_a_seq() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(cfg(dir.path())).await.unwrap();
    let epoch = c.epoch;
    let mut p = client(&c).await;
    let mut acked = Vec::new();
    for i in 0..50 {
        let r = p
            .publish(req("", 0, &[&format!("k{i}"), "shared"]))
            .await
            .unwrap()
            .into_inner();
        acked.extend(r.seqs);
    }
    c.stop().await.unwrap();

    let c = Coordinator::start(cfg(dir.path())).await.unwrap();
    assert_eq!(c.epoch, epoch, "a clean restart keeps the epoch");
    let mut p = client(&c).await;
    let r = p
        .publish(req("", 0, &["after-restart"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.seqs,
        vec![101],
        "sequencing resumes after the last durable seq"
    );
    acked.extend(r.seqs);

    // A receiver from the beginning gets every acknowledged seq, in order, once.
    let f = Follower::start(vec![c.url()], vec![(0, epoch, 0)]);
    f.wait_for_seq(101).await;
    let mut got = f.seqs();
    // Groups may coalesce repeated keys ("shared"): every seq is covered, keys once per group.
    got.dedup();
    assert!(got.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(*got.last().unwrap(), 101);
    let keys: std::collections::HashSet<_> = support::lock_entries(&f).into_iter().collect();
    for i in 0..50 {
        assert!(keys.contains(&Bytes::from(format!("k{i}"))));
    }
    drop(f);
    c.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_publish_is_refused_and_logs_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(cfg(dir.path())).await.unwrap();
    let mut p = client(&c).await;
    p.publish(req("", 0, &["good"])).await.unwrap();

    let mut bad = req("", 0, &["ok-1", "ok-2"]);
    bad.entries.push(key(""));
    let err = p.publish(bad).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("entry 2"), "{}", err.message());
    assert!(err.message().contains("empty"), "{}", err.message());

    let long = "x".repeat(2000);
    let err = p.publish(req("", 0, &[&long])).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("2000"), "{}", err.message());

    let mut unknown = req("", 0, &["k"]);
    unknown.entries[0].kind = 17;
    assert_eq!(
        p.publish(unknown).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(
        p.publish(req("", 0, &[])).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    // A publisher id with its request number left at 0: every request would look like a retry
    // of the first.
    let err = p.publish(req("svc", 0, &["k"])).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("request_no is 0"),
        "{}",
        err.message()
    );

    // Nothing of the refused requests reached the log: the next seq is 2.
    let r = p.publish(req("", 0, &["next"])).await.unwrap().into_inner();
    assert_eq!(r.seqs, vec![2]);
    c.stop().await.unwrap();
}

/// On a PublishStream a refused request is answered in its turn and the stream goes on: a bad
/// message does not stop it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_request_on_a_publish_stream_is_answered_and_the_stream_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(cfg(dir.path())).await.unwrap();
    let mut p = client(&c).await;
    let mut empty_key = req("svc", 2, &["ok"]);
    empty_key.entries.push(key(""));
    let reqs = vec![
        req("svc", 1, &["a", "b"]),
        empty_key,
        req("svc", 3, &["c"]),
        // Request 1 again with other content.
        req("svc", 1, &["x"]),
        req("svc", 4, &["d"]),
    ];
    let mut stream = p
        .publish_stream(tokio_stream::iter(reqs))
        .await
        .unwrap()
        .into_inner();
    let mut answers = Vec::new();
    while let Some(a) = stream.message().await.unwrap() {
        answers.push(a);
    }
    let seen: Vec<_> = answers
        .iter()
        .map(|a| (a.request_no, a.seqs.clone(), a.refused_code))
        .collect();
    assert_eq!(
        seen,
        vec![
            (1, vec![1, 2], 0),
            (2, vec![], Code::InvalidArgument as i32),
            (3, vec![3], 0),
            (1, vec![], Code::AlreadyExists as i32),
            (4, vec![4], 0),
        ],
        "nothing of a refused request is logged"
    );
    assert!(
        answers[1].refused.contains("entry 1"),
        "{}",
        answers[1].refused
    );
    c.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_publish_returns_the_original_seqs_even_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(cfg(dir.path())).await.unwrap();
    let mut p = client(&c).await;
    let first = p
        .publish(req("svc-a", 1, &["a", "b"]))
        .await
        .unwrap()
        .into_inner();
    let again = p
        .publish(req("svc-a", 1, &["a", "b"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.seqs, again.seqs);
    assert!(again.duplicate && !first.duplicate);
    let other = p
        .publish(req("svc-b", 1, &["a"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(other.seqs, vec![3], "another publisher's request 1 is new");
    // The same number and as many entries, but other keys (a publisher restarted with a fixed id
    // and its numbering from the start): not a retry, and not acknowledged as one.
    for keys in [&["a", "c"][..], &["b", "a"], &["a", "b", "c"]] {
        let e = p.publish(req("svc-a", 1, keys)).await.unwrap_err();
        assert_eq!(e.code(), Code::AlreadyExists, "{keys:?}: {e}");
        assert!(e.message().contains("request 1"), "{}", e.message());
    }
    c.stop().await.unwrap();

    let c = Coordinator::start(cfg(dir.path())).await.unwrap();
    let mut p = client(&c).await;
    let after = p
        .publish(req("svc-a", 1, &["a", "b"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(after.seqs, first.seqs);
    assert!(after.duplicate);
    let e = p.publish(req("svc-a", 1, &["a", "c"])).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "recovered from the log: {e}");
    let next = p
        .publish(req("svc-a", 2, &["c"]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next.seqs, vec![4]);
    c.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_publish_answers_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(cfg(dir.path())).await.unwrap();
    let mut p = client(&c).await;
    let reqs: Vec<_> = (1..=200u64)
        .map(|n| req("stream", n, &[&format!("k{n}")]))
        .collect();
    let mut out = p
        .publish_stream(tokio_stream::iter(reqs))
        .await
        .unwrap()
        .into_inner();
    let mut last = 0;
    let mut n = 0;
    while let Some(r) = out.message().await.unwrap() {
        n += 1;
        assert_eq!(r.request_no, n);
        assert!(r.seqs[0] > last);
        last = r.seqs[0];
    }
    assert_eq!(n, 200);
    c.stop().await.unwrap();
}

fn only_segment(dir: &Path) -> std::path::PathBuf {
    let mut segs: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    segs.sort();
    segs.pop().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_torn_in_the_middle_of_a_record_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(cfg(dir.path())).await.unwrap();
    let epoch = c.epoch;
    let mut p = client(&c).await;
    for i in 0..10 {
        p.publish(req("", 0, &[&format!("k{i}")])).await.unwrap();
    }
    c.stop().await.unwrap();
    let seg = only_segment(dir.path());
    let len = std::fs::metadata(&seg).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(len - 3)
        .unwrap();

    let c = Coordinator::start(cfg(dir.path())).await.unwrap();
    assert_eq!(
        c.epoch, epoch,
        "a torn tail was never acknowledged: same epoch"
    );
    let mut p = client(&c).await;
    let r = p.publish(req("", 0, &["new"])).await.unwrap().into_inner();
    assert_eq!(
        r.seqs,
        vec![10],
        "the torn record 10 was cut; sequencing continues after 9"
    );
    c.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_record_is_reported_and_the_log_recovers_up_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(cfg(dir.path())).await.unwrap();
    let epoch = c.epoch;
    let mut p = client(&c).await;
    for i in 0..10 {
        p.publish(req("", 0, &[&format!("key-{i}")])).await.unwrap();
    }
    c.stop().await.unwrap();
    let seg = only_segment(dir.path());
    let mut bytes = std::fs::read(&seg).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x5a;
    std::fs::write(&seg, &bytes).unwrap();

    let c = Coordinator::start(cfg(dir.path())).await.unwrap();
    assert!(c.epoch > epoch, "a lost part of the log changes the epoch");
    let mut p = client(&c).await;
    let r = p.publish(req("", 0, &["new"])).await.unwrap().into_inner();
    assert_eq!(
        r.seqs,
        vec![11],
        "seqs 1..=10 were acknowledged: lost to the damage or not, none is given out again"
    );
    // A receiver of the new epoch from the start gets what survived, passes over the voided
    // range, and reaches the new publish.
    let fresh = Follower::start(vec![c.url()], vec![(0, c.epoch, 0)]);
    fresh.wait_for_seq(11).await;
    let got = fresh.seqs();
    assert!(got.windows(2).all(|w| w[0] < w[1]), "{got:?}");
    assert!(got.len() < 11 && got.last() == Some(&11), "{got:?}");
    drop(fresh);
    // A receiver of the old epoch is told to flush.
    let f = Follower::start(vec![c.url()], vec![(0, epoch, 10)]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while support::lock_flushes(&f) == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no reset received");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(f);
    c.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_resuming_from_an_old_hwm_gets_everything_since_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = cfg(dir.path());
    config.memory_tail_bytes = 1; // force replay from disk
    config.segment_bytes = 4096; // and across segments
    let c = Coordinator::start(config).await.unwrap();
    let epoch = c.epoch;
    let mut p = client(&c).await;
    for i in 0..300 {
        p.publish(req("", 0, &[&format!("key-{i}")])).await.unwrap();
    }
    let f = Follower::start(vec![c.url()], vec![(0, epoch, 120)]);
    f.wait_for_seq(300).await;
    let got = f.seqs();
    assert_eq!(got, (121..=300).collect::<Vec<_>>());
    drop(f);
    c.stop().await.unwrap();
}

/// A range of the log that cannot be read any more (a segment removed by hand, a record damaged
/// since it was written) is gone: a receiver that needs it gets what can be read before it, then
/// a reset to the head, and follows from there. It was asked for again without end, and the
/// receiver held where it was for good (its caches serving only misses).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_of_the_log_that_cannot_be_read_ends_in_a_reset_not_a_wait() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = cfg(dir.path());
    config.memory_tail_bytes = 1; // every replay from disk
    config.segment_bytes = 4096;
    let c = Coordinator::start(config).await.unwrap();
    let epoch = c.epoch;
    let mut p = client(&c).await;
    for i in 0..600 {
        p.publish(req("", 0, &[&format!("key-{i}")])).await.unwrap();
    }
    let mut segments: Vec<(u64, std::path::PathBuf)> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .map(|p| (p.file_stem().unwrap().to_str().unwrap().parse().unwrap(), p))
        .collect();
    segments.sort();
    assert!(segments.len() >= 5, "{segments:?}");
    // A record in the middle of the second segment damaged, the fourth segment removed.
    let mut second = std::fs::read(&segments[1].1).unwrap();
    let mid = second.len() / 2;
    for b in &mut second[mid..mid + 8] {
        *b ^= 0xff;
    }
    std::fs::write(&segments[1].1, second).unwrap();
    std::fs::remove_file(&segments[3].1).unwrap();

    let reset_then_new = |f: Follower, from: u64, head: u64| async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while support::lock_flushes(&f) == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "a receiver from {from} was held at {} for good",
                dci_proto::upstream::lock(&f.rec).last_seq
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (got, flushes) = {
            let r = dci_proto::upstream::lock(&f.rec);
            (
                r.entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
                r.flushes.clone(),
            )
        };
        // What could be read came first, in order and without a gap, and stopped short of the
        // head.
        assert!(got.len() < (head - from + 1) as usize, "{got:?}");
        assert_eq!(
            got,
            (from..from + got.len() as u64).collect::<Vec<_>>(),
            "{flushes:?}"
        );
        assert_eq!(flushes.len(), 1, "{flushes:?}");
        assert_eq!(flushes[0].2, head, "reset to the head: {flushes:?}");
        f
    };
    // From the start: the first segment, then the damaged record.
    let f = Follower::start(vec![c.url()], vec![(0, epoch, 0)]);
    let f = reset_then_new(f, 1, 600).await;
    assert!(
        f.seqs().len() as u64 >= segments[1].0 - 1,
        "the first segment is read"
    );
    // From the removed segment on.
    let g = Follower::start(vec![c.url()], vec![(0, epoch, segments[3].0 - 1)]);
    let g = reset_then_new(g, segments[3].0, 600).await;
    // Both follow on from the head.
    p.publish(req("", 0, &["after"])).await.unwrap();
    f.wait_for_seq(601).await;
    g.wait_for_seq(601).await;
    assert_eq!(f.seqs().last(), Some(&601));
    assert_eq!(g.seqs(), vec![601]);
    drop((f, g));
    c.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_receiver_does_not_slow_publishing_or_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = cfg(dir.path());
    config.window_bytes = 16 << 10;
    let c = Coordinator::start(config).await.unwrap();
    let epoch = c.epoch;
    // A receiver that says hello and then never reads nor acks.
    let (tx, _stuck) = subscribe_raw(
        &c,
        pb::Hello {
            node_id: "stuck".into(),
            resume: vec![pb::ResumePoint {
                shard: 0,
                epoch,
                hwm: 0,
            }],
            ..Default::default()
        },
    )
    .await;
    let healthy = Follower::start(vec![c.url()], vec![(0, epoch, 0)]);

    let mut p = client(&c).await;
    let reqs: Vec<_> = (0..2000u64)
        .map(|n| pb::PublishRequest {
            publisher_id: String::new(),
            request_no: n,
            entries: (0..10)
                .map(|i| key(&format!("user:{n}:{i}:profile")))
                .collect(),
        })
        .collect();
    let mut out = p
        .publish_stream(tokio_stream::iter(reqs))
        .await
        .unwrap()
        .into_inner();
    let mut answered = 0;
    while let Some(r) = tokio::time::timeout(Duration::from_secs(30), out.message())
        .await
        .expect("publishing stalled")
        .unwrap()
    {
        answered += r.seqs.len();
    }
    assert_eq!(answered, 20_000);
    healthy.wait_for_seq(20_000).await;
    drop(tx);
    c.stop().await.unwrap();
}

/// A receiver that asks for a smaller window in its Hello (a relay fetching one range) is sent
/// about that much until it acks, however far behind it is; an ack opens the window again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_gets_no_more_in_flight_than_the_window_its_hello_asks_for() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(cfg(dir.path())).await.unwrap();
    let epoch = c.epoch;
    let mut p = client(&c).await;
    for n in 0..1000u64 {
        let keys: Vec<String> = (0..10).map(|i| format!("user:{n}:{i}:profile")).collect();
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        p.publish(req("", 0, &keys)).await.unwrap();
    }
    // Batch bytes received for `long`, and the last seq they reach: shorter than the sender's
    // retransmit timeout (2 s), after which it would send the unacknowledged window again.
    async fn take(stream: &mut tonic::Streaming<pb::Downstream>, long: Duration) -> (usize, u64) {
        let (mut bytes, mut last) = (0, 0);
        let until = tokio::time::Instant::now() + long;
        while let Ok(Ok(Some(m))) = tokio::time::timeout_at(until, stream.message()).await {
            if let Some(pb::downstream::Msg::Batch(b)) = m.msg {
                let batch = dci_proto::Batch::decode_checked(b.clone(), 1024)
                    .unwrap()
                    .batch;
                bytes += b.len();
                last = last.max(batch.last_seq);
            }
        }
        (bytes, last)
    }
    let window = 2_000u64;
    let (tx, mut stream) = subscribe_raw(
        &c,
        pb::Hello {
            node_id: "catch-up".into(),
            resume: vec![pb::ResumePoint {
                shard: 0,
                epoch,
                hwm: 0,
            }],
            window_bytes: window,
            ..Default::default()
        },
    )
    .await;
    let (bytes, last) = take(&mut stream, Duration::from_millis(500)).await;
    // At least one batch; past the window only by the last batch sent into it (each of these
    // is one 10-entry publish, a few hundred bytes).
    assert!(bytes > 0 && bytes < 2 * window as usize, "{bytes} bytes");
    assert!(last > 0 && last < 10_000, "{last}");
    tx.send(pb::Upstream {
        msg: Some(pb::upstream::Msg::Ack(pb::Ack {
            shard: 0,
            epoch,
            hwm: last,
        })),
    })
    .await
    .unwrap();
    let (more, next) = take(&mut stream, Duration::from_millis(500)).await;
    assert!(more > 0 && more < 2 * window as usize, "{more} bytes");
    assert!(next > last, "{next} after {last}");
    // Without one, the sender's own window (4 MiB) holds everything published.
    let f = Follower::start(vec![c.url()], vec![(0, epoch, 0)]);
    f.wait_for_seq(10_000).await;
    drop(tx);
    c.stop().await.unwrap();
}
