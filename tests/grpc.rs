//! gRPC conventions on every node: health, reflection, graceful shutdown.

mod support;

use dci_coordinator::{Coordinator, CoordinatorConfig};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::ServerReflectionRequest;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_answer() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(CoordinatorConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_path_buf(),
        ..Default::default()
    })
    .await
    .unwrap();
    let channel = tonic::transport::Endpoint::from_shared(c.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel.clone());
    let status = health
        .check(HealthCheckRequest {
            service: "dci.v1.Publisher".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(status, 1, "SERVING");

    let mut refl = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = refl
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let resp = answers.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("{resp:?}")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for s in [
        "dci.v1.Publisher",
        "dci.v1.Subscribe",
        "dci.v1.Admin",
        "dci.v1.Cache",
    ] {
        assert!(names.contains(&s.to_string()), "{names:?}");
    }
    c.stop().await.unwrap();
}

/// A coordinator stopped with a publish stream open (a rolling restart): every request it took
/// is answered, the stream then ends with `UNAVAILABLE` (not a plain end a publisher could take
/// for "all done", nor a broken connection), and what it answered is in the log when it comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_coordinator_answers_what_it_took_then_says_unavailable() {
    use dci_proto::pb;
    let dir = tempfile::tempdir().unwrap();
    let cfg = CoordinatorConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_path_buf(),
        ..Default::default()
    };
    let c = Coordinator::start(cfg.clone()).await.unwrap();
    let mut client = pb::publisher_client::PublisherClient::connect(c.url())
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4096);
    let request = |n: u64| pb::PublishRequest {
        publisher_id: "drain".into(),
        request_no: n,
        entries: vec![pb::Invalidation {
            key: format!("k{n}").into(),
            kind: pb::Kind::Key as i32,
            ..Default::default()
        }],
    };
    for n in 1..=2000 {
        tx.send(request(n)).await.unwrap();
    }
    let mut answers = client
        .publish_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = answers.message().await.unwrap().unwrap();
    assert_eq!(first.seqs, vec![1]);
    // The request stream stays open: only the drain can end the answers.
    let stopping = tokio::spawn(c.stop());
    let mut last = 1;
    let end = loop {
        match answers.message().await {
            Ok(Some(a)) => {
                assert_eq!(a.seqs, vec![last + 1], "answered in order, one seq each");
                last += 1;
            }
            Ok(None) => panic!("the stream ended without saying why, after seq {last}"),
            Err(status) => break status,
        }
    };
    assert_eq!(end.code(), tonic::Code::Unavailable, "{end:?}");
    assert!(end.message().contains("shutting down"), "{end:?}");
    stopping.await.unwrap().unwrap();
    drop(tx);

    let c = Coordinator::start(cfg).await.unwrap();
    let mut client = pb::publisher_client::PublisherClient::connect(c.url())
        .await
        .unwrap();
    // A resend of an answered request gets its seq again; the next new one comes after all.
    let again = client.publish(request(last)).await.unwrap().into_inner();
    assert_eq!(again.seqs, vec![last]);
    let next = client.publish(request(5000)).await.unwrap().into_inner();
    assert!(next.seqs[0] > last, "{next:?} after {last}");
    c.stop().await.unwrap();
}

/// Connections that open and say nothing (a port scanner, a client stuck before its first
/// write, many of them at once), on the gRPC port and on the metrics port, and connections that
/// send half a request head and stop, are closed after a while instead of holding a descriptor
/// each for ever; a client that speaks meanwhile is served as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_never_speak_are_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(CoordinatorConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_path_buf(),
        metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
        ..Default::default()
    })
    .await
    .unwrap();
    let metrics = c.metrics_addr.unwrap();
    let mut silent = Vec::new();
    for i in 0..60 {
        let at = if i % 3 == 0 { metrics } else { c.addr };
        let mut s = tokio::net::TcpStream::connect(at).await.unwrap();
        if i % 6 == 0 {
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: d")
                .await
                .unwrap();
        }
        silent.push(s);
    }
    let p = dci_sdk::Publisher::connect(vec![c.url()]).await.unwrap();
    assert_eq!(p.invalidate("k").await.unwrap(), 1);
    for mut s in silent {
        let closed = async {
            let mut buf = [0u8; 64];
            while let Ok(1..) = s.read(&mut buf).await {}
        };
        tokio::time::timeout(std::time::Duration::from_secs(30), closed)
            .await
            .expect("a silent connection was kept open");
    }
    assert_eq!(p.invalidate("k2").await.unwrap(), 2);
    // The metrics endpoint still answers whole requests.
    let page = support::scrape(metrics).await;
    assert!(page.contains("dci_receivers"), "{page}");
    c.stop().await.unwrap();
}
