//! Fault injection: every failure the system claims to survive, with the checker's verdict.
//! Each scenario publishes versioned invalidations while the fault happens, heals it, waits for
//! convergence, and asserts: nothing acknowledged is lost, per-key order holds, no edge served a
//! value older than an invalidation it had applied, every acknowledged publish is logged once.

mod support;

use std::time::Duration;

use dci_sdk::Lookup;
use support::{eventually, World};

const SECOND: Duration = Duration::from_secs(1);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_killed_and_restarted_mid_stream() {
    let mut w = World::start(2, 3, 5 * SECOND).await;
    w.start_writers(8, 100);
    w.start_readers(2);
    tokio::time::sleep(SECOND).await;
    w.stop_relay(0).await;
    tokio::time::sleep(2 * SECOND).await;
    w.start_relay(0).await;
    tokio::time::sleep(SECOND).await;
    w.check("relay killed and restarted").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_killed_and_restarted_from_its_log() {
    let mut w = World::start(2, 3, 5 * SECOND).await;
    w.start_writers(8, 100);
    w.start_readers(2);
    tokio::time::sleep(SECOND).await;
    w.restart_coordinator().await;
    tokio::time::sleep(SECOND).await;
    w.restart_coordinator().await;
    tokio::time::sleep(SECOND).await;
    w.check("coordinator restarted from its log (twice)").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_cut_off_for_ten_seconds_serves_misses_then_repairs() {
    let mut w = World::start(2, 3, 2 * SECOND).await;
    w.start_writers(8, 50);
    tokio::time::sleep(SECOND).await;
    // A value cached at edge 0, then edge 0 is partitioned from both relays.
    let cache = cached_at(w.edges[0].as_ref().unwrap(), "cut:key").await;
    for p in &w.edge_proxies[0] {
        p.blackhole(true);
    }
    let cut = tokio::time::Instant::now();
    let bound_hit_after = misses_within(
        &cache,
        "cut:key",
        cut,
        8 * SECOND,
        "a cut-off edge kept serving",
    )
    .await;
    assert!(
        bound_hit_after >= SECOND,
        "stopped serving before the bound: {bound_hit_after:?}"
    );
    w.start_readers(2);
    tokio::time::sleep(10 * SECOND - cut.elapsed()).await;
    for p in &w.edge_proxies[0] {
        p.blackhole(false);
    }
    w.converge().await;
    let line = w.check("edge cut off 10s").await;
    println!("  (edge stopped serving {bound_hit_after:?} after the cut)");
    let _ = line;
}

/// The edges still hear their relay, but the relay no longer hears the coordinator, whose writers
/// go on: past the bound, the edges behind it answer only misses, as if cut off themselves; once
/// the relay is back and caught up, they serve again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edges_behind_a_relay_cut_off_from_the_coordinator_stop_serving_at_the_bound() {
    let mut w = World::start(1, 2, 2 * SECOND).await;
    w.start_writers(4, 50);
    tokio::time::sleep(SECOND).await;
    let cache = cached_at(w.edges[0].as_ref().unwrap(), "behind:key").await;
    w.up_proxies[0].blackhole(true);
    let cut = tokio::time::Instant::now();
    let stopped_after = misses_within(
        &cache,
        "behind:key",
        cut,
        6 * SECOND,
        "an edge behind a cut-off relay kept serving",
    )
    .await;
    assert!(
        stopped_after >= SECOND,
        "stopped serving before the bound: {stopped_after:?}"
    );
    // `dci status` shows why: the edge is caught up with its relay, not with the coordinator.
    let caught_up_ms = |edge: &dci_edge_cache::EdgeNode| {
        dci_proto::upstream::lock(&edge.link)
            .node_status("e", "edge", "r")
            .shards[0]
            .caught_up_ms
    };
    let ms = caught_up_ms(w.edges[0].as_ref().unwrap());
    assert!(ms >= 2_000 && ms != u64::MAX, "caught up {ms} ms ago");
    w.up_proxies[0].blackhole(false);
    w.converge().await;
    eventually("serving again", || {
        lock_fresh(w.edges[0].as_ref().unwrap(), 2 * SECOND)
    })
    .await;
    assert!(caught_up_ms(w.edges[0].as_ref().unwrap()) <= 2_000);
    w.check("relay cut off past the bound").await;
    println!("  (edges stopped serving {stopped_after:?} after the relay's cut)");
}

/// A client of `edge` with `key` cached there (and served).
async fn cached_at(edge: &dci_edge_cache::EdgeNode, key: &str) -> dci_sdk::CacheClient {
    let cache = dci_sdk::CacheClient::from_urls(vec![edge.url()]).unwrap();
    assert!(cache.set(key.to_string(), "v", None).await.unwrap());
    assert_eq!(
        cache.get(key.to_string()).await.unwrap(),
        Lookup::Hit("v".into())
    );
    cache
}

/// Ask for `key` until it is a miss, at most `limit` after `since`; how long that took.
async fn misses_within(
    cache: &dci_sdk::CacheClient,
    key: &str,
    since: tokio::time::Instant,
    limit: Duration,
    failure: &str,
) -> Duration {
    while !matches!(
        cache.get(key.to_string()).await.unwrap(),
        Lookup::Miss { .. }
    ) {
        assert!(since.elapsed() < limit, "{failure}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    since.elapsed()
}

fn lock_fresh(edge: &dci_edge_cache::EdgeNode, bound: Duration) -> bool {
    dci_proto::upstream::lock(&edge.link).fresh_within(std::time::Instant::now(), bound)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_cut_off_from_the_coordinator() {
    let mut w = World::start(2, 3, 5 * SECOND).await;
    w.start_writers(8, 100);
    w.start_readers(2);
    tokio::time::sleep(SECOND).await;
    w.up_proxies[0].blackhole(true);
    tokio::time::sleep(3 * SECOND).await;
    w.up_proxies[0].blackhole(false);
    tokio::time::sleep(SECOND).await;
    w.check("relay cut off from coordinator 3s").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_slow_edge_does_not_hold_back_the_others() {
    let mut w = World::start(1, 3, 30 * SECOND).await;
    for p in &w.edge_proxies[0] {
        p.bandwidth(4 * 1024);
    }
    w.start_writers(8, 100);
    w.start_readers(2);
    tokio::time::sleep(3 * SECOND).await;
    // The fast edges keep up with the head while the slow one lags.
    let head = w.head();
    for j in 1..3 {
        let watch = w.watches[j].clone();
        eventually("a fast edge keeps up", move || {
            dci_proto::upstream::lock(&watch).last >= head
        })
        .await;
    }
    let slow = dci_proto::upstream::lock(&w.watches[0]).last;
    println!("  (at head {head}: slow edge at {slow})");
    for p in &w.edge_proxies[0] {
        p.bandwidth(0);
    }
    w.check("one bandwidth-capped edge").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_dropped_at_random_for_twenty_seconds() {
    let mut w = World::start(2, 3, 5 * SECOND).await;
    w.start_writers(8, 50);
    w.start_readers(2);
    let started = tokio::time::Instant::now();
    let mut drops = 0;
    while started.elapsed() < 20 * SECOND {
        tokio::time::sleep(Duration::from_millis(rand::random_range(100..500))).await;
        let all: Vec<&support::proxy::Proxy> = w
            .up_proxies
            .iter()
            .chain(w.edge_proxies.iter().flatten())
            .collect();
        all[rand::random_range(0..all.len())].drop_connections();
        drops += 1;
    }
    println!("  ({drops} connection drops)");
    w.check("connections dropped every 100-500ms for 20s").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_and_jittered_links() {
    let mut w = World::start(2, 3, 5 * SECOND).await;
    for p in w.up_proxies.iter().chain(w.edge_proxies.iter().flatten()) {
        p.delay(Duration::from_millis(20), Duration::from_millis(30));
    }
    w.start_writers(8, 100);
    w.start_readers(2);
    tokio::time::sleep(3 * SECOND).await;
    w.check("every link delayed 20ms + up to 30ms jitter").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_restarted() {
    let mut w = World::start(2, 3, 5 * SECOND).await;
    w.start_writers(8, 100);
    w.start_readers(2);
    tokio::time::sleep(SECOND).await;
    w.stop_edge(1).await;
    tokio::time::sleep(SECOND).await;
    w.start_edge(1).await;
    let e = w.edges[1].as_ref().unwrap();
    assert!(e.store.is_empty(), "a restarted edge starts empty");
    tokio::time::sleep(SECOND).await;
    w.check("edge restarted").await;
}

/// A coordinator under writers, two relays and one edge (3 s bound) following the first: the
/// world, and the URLs of the edge's proxies to its two relays.
async fn one_edge_on_two_relays() -> (World, [String; 2]) {
    let mut w = World::start(2, 1, 3 * SECOND).await;
    w.start_writers(4, 50);
    tokio::time::sleep(SECOND).await;
    let urls = [w.edge_proxies[0][0].url(), w.edge_proxies[0][1].url()];
    (w, urls)
}

/// A partition that swallows packets (no reset, no close) between an edge and one relay, then
/// both, then heals only on the second: the edge moves to the relay it can still reach, and a
/// connection attempt into the silence never keeps it from the one that answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_partitioned_from_its_relay_moves_to_the_one_it_can_reach() {
    let (w, [first, second]) = one_edge_on_two_relays().await;
    let link = w.edges[0].as_ref().unwrap().link.clone();
    let on = |url: &str| dci_proto::upstream::lock(&link).connected_to.as_deref() == Some(url);
    assert!(on(&first));
    w.edge_proxies[0][0].blackhole(true);
    let cut = tokio::time::Instant::now();
    eventually("the edge on the second relay", || on(&second)).await;
    let moved_after = cut.elapsed();
    // It never stopped serving: the move took less than its staleness bound.
    eventually("the edge fresh on the second relay", || {
        lock_fresh(w.edges[0].as_ref().unwrap(), 3 * SECOND)
    })
    .await;
    // Now both are cut: it tries each in turn, each attempt into silence.
    w.edge_proxies[0][1].blackhole(true);
    tokio::time::sleep(5 * SECOND).await;
    // The second heals, the first does not: whatever attempt it was in, it reaches the second.
    w.edge_proxies[0][1].blackhole(false);
    let healed = tokio::time::Instant::now();
    let deadline = healed + 10 * SECOND;
    while !(on(&second) && lock_fresh(w.edges[0].as_ref().unwrap(), 3 * SECOND)) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the edge did not come back through the healed relay within 10 s (connected to {:?})",
            dci_proto::upstream::lock(&link).connected_to
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "  (moved {moved_after:?} after the first cut; back {:?} after the heal)",
        healed.elapsed()
    );
    w.edge_proxies[0][0].blackhole(false);
    w.converge().await;
    w.check("an edge partitioned from one relay, then both")
        .await;
}

/// A coordinator behind a partition that swallows packets: a publisher's callers are answered
/// `Unavailable` after its `retry_for`, not left waiting for ever; once the partition heals, the
/// same publisher publishes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_behind_a_silent_partition_gives_up_then_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let c = dci_coordinator::Coordinator::start(dci_coordinator::CoordinatorConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_path_buf(),
        ..Default::default()
    })
    .await
    .unwrap();
    let proxy = support::proxy::Proxy::start(c.addr).await;
    proxy.blackhole(true);
    let p = dci_sdk::Publisher::with_options(
        vec![proxy.url()],
        dci_sdk::PublisherOptions {
            timeout: Duration::from_millis(500),
            retry_for: 2 * SECOND,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let r = tokio::time::timeout(20 * SECOND, p.invalidate("k"))
        .await
        .expect("a caller was left waiting behind the partition");
    match r {
        Err(dci_sdk::Error::Unavailable(why)) => assert!(why.contains("no answer"), "{why}"),
        other => panic!("{other:?}"),
    }
    proxy.blackhole(false);
    let seq = tokio::time::timeout(20 * SECOND, p.invalidate("k"))
        .await
        .expect("no answer once healed")
        .unwrap();
    assert_eq!(seq, 1, "nothing of the first call was logged");
    c.stop().await.unwrap();
}

/// An edge behind a partition that swallows packets: a cache client's calls fail within its
/// timeout, and once the partition heals the same client reads again (its connection, stuck
/// mid-handshake, is not kept for ever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_client_behind_a_silent_partition_fails_fast_then_recovers() {
    let w = World::start(1, 1, 5 * SECOND).await;
    let edge = w.edges[0].as_ref().unwrap();
    let proxy = support::proxy::Proxy::start(edge.addr).await;
    proxy.blackhole(true);
    let cache = dci_sdk::CacheClient::with_timeout(
        vec![("e".into(), proxy.url())],
        Duration::from_millis(500),
    )
    .unwrap();
    for _ in 0..3 {
        let r = tokio::time::timeout(10 * SECOND, cache.get("k"))
            .await
            .expect("a call was left waiting behind the partition");
        assert!(matches!(r, Err(dci_sdk::Error::Unavailable(_))), "{r:?}");
    }
    proxy.blackhole(false);
    let healed = tokio::time::Instant::now();
    while !matches!(cache.get("k").await, Ok(Lookup::Miss { .. })) {
        assert!(
            healed.elapsed() < 10 * SECOND,
            "the client did not read again within 10 s of the heal"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("  (reading again {:?} after the heal)", healed.elapsed());
}

/// An asymmetric partition: the relay's batches and heartbeats still reach the edge, but nothing
/// the edge sends (acks, probes) reaches the relay. The edge cannot learn that it is fresh (its
/// probes go unanswered), so it serves misses past its bound, and it leaves that relay for the
/// next one once its probes have gone unanswered for its peer timeout, instead of waiting for the
/// relay to give up on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_whose_probes_go_unanswered_moves_to_the_next_relay() {
    let (w, [first, second]) = one_edge_on_two_relays().await;
    let link = w.edges[0].as_ref().unwrap().link.clone();
    let on = |url: &str| dci_proto::upstream::lock(&link).connected_to.as_deref() == Some(url);
    assert!(on(&first));
    w.edge_proxies[0][0].blackhole_to_server(true);
    let cut = tokio::time::Instant::now();
    let deadline = cut + 4 * SECOND;
    while !on(&second) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the edge stayed on a relay that hears nothing from it for 4 s (its peer timeout is 1 s)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let moved_after = cut.elapsed();
    eventually("the edge fresh on the second relay", || {
        lock_fresh(w.edges[0].as_ref().unwrap(), 3 * SECOND)
    })
    .await;
    println!("  (moved {moved_after:?} after the one-way cut)");
    w.edge_proxies[0][0].blackhole_to_server(false);
    w.converge().await;
    w.check("an edge whose probes go unanswered").await;
}

/// A cache client reading through an edge that went silent (a partition that swallows packets):
/// the first read waits for its timeout, and then the edge is passed over (its keys read from
/// their next owner at once) instead of every read waiting in turn; after the partition heals,
/// the edge is asked again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_edge_costs_one_timeout_not_one_per_read() {
    let w = World::start(1, 2, 5 * SECOND).await;
    let proxy = support::proxy::Proxy::start(w.edges[0].as_ref().unwrap().addr).await;
    let ids = vec!["e0".to_string(), "e1".to_string()];
    let cache = dci_sdk::CacheClient::with_timeout(
        vec![
            (ids[0].clone(), proxy.url()),
            (ids[1].clone(), w.edges[1].as_ref().unwrap().url()),
        ],
        3 * SECOND,
    )
    .unwrap()
    .with_replication(2);
    let ring = dci_proto::ring::NodeRing::new(ids.clone());
    let keys: Vec<String> = (0..)
        .map(|i| format!("user:{i}"))
        .filter(|k| ring.owners(k.as_bytes(), 2)[0] == "e0")
        .take(10)
        .collect();
    for k in &keys {
        assert!(cache.get(k.clone()).await.is_ok());
    }
    let before = proxy.passed();
    proxy.blackhole(true);
    let started = tokio::time::Instant::now();
    for k in &keys {
        let r = cache.get(k.clone()).await;
        assert!(matches!(r, Ok(Lookup::Miss { .. })), "{r:?}");
    }
    // Ten reads waiting 3 s each would take 30 s; passed over, one wait and nine at once.
    let took = started.elapsed();
    assert!(took < 15 * SECOND, "ten reads took {took:?}");
    proxy.blackhole(false);
    tokio::time::sleep(3 * SECOND).await;
    let asked = proxy.passed();
    for k in &keys {
        assert!(cache.get(k.clone()).await.is_ok());
    }
    assert!(
        proxy.passed() > asked && asked >= before,
        "the healed edge was not asked again"
    );
    println!("  (ten reads behind the silent edge took {took:?})");
}

/// The answers to a publisher are held (as while the coordinator's disk is slow to sync, or a
/// link is slow one way): its invalidations still go to the log, and on to the caches, as far as
/// its in-flight window reaches: 256 requests at most, whatever it is asked for, and a window
/// in bytes bounds what it keeps for a resend. The stream breaks meanwhile: everything in flight
/// is resent, and each is logged once (the coordinator remembers as many requests per publisher
/// as may be in flight). Once the answers come, every call has its own seq.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidations_reach_the_caches_while_answers_lag_within_the_window() {
    let w = World::start(1, 1, 3 * SECOND).await;
    let proxy = support::proxy::Proxy::start(w.coord_addr).await;
    let edge = w.edges[0].as_ref().unwrap();
    let applied = || {
        edge.store
            .applied()
            .iter()
            .map(|&(_, _, s)| s)
            .max()
            .unwrap_or(0)
    };
    // (requests asked for in flight, bytes, calls, how many go out before an answer).
    let cases = [
        (dci_proto::types::RETRY_WINDOW, 32 << 20, 200, 200..=200),
        // About 28 entries of these keys fit in 1 KiB.
        (dci_proto::types::RETRY_WINDOW, 1024, 200, 6..=40),
        (10_000, 32 << 20, 400, 256..=256),
    ];
    for (max_in_flight, max_in_flight_bytes, calls, out) in cases {
        let p = dci_sdk::Publisher::with_options(
            vec![proxy.url()],
            dci_sdk::PublisherOptions {
                max_in_flight,
                max_in_flight_bytes,
                // One caller per request, so the windows count single entries.
                max_batch: 1,
                timeout: 60 * SECOND,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let base = p.invalidate("warm").await.unwrap();
        eventually("the edge has the warm-up", || applied() >= base).await;
        proxy.blackhole_to_client(true);
        let calls: Vec<_> = (0..calls)
            .map(|i| {
                let p = p.clone();
                tokio::spawn(async move { p.invalidate(format!("k{i}")).await })
            })
            .collect();
        let n = calls.len() as u64;
        eventually("the window's worth at the edge", || {
            applied() >= base + out.start()
        })
        .await;
        tokio::time::sleep(SECOND).await;
        let through = applied() - base;
        assert!(out.contains(&through), "{through} went out");
        assert!(
            calls.iter().all(|c| !c.is_finished()),
            "answered while held"
        );
        // The stream breaks: what is in flight goes again, on a new one.
        proxy.drop_connections();
        tokio::time::sleep(SECOND).await;
        proxy.blackhole_to_client(false);
        let mut seqs = Vec::new();
        for c in calls {
            seqs.push(c.await.unwrap().unwrap());
        }
        seqs.sort_unstable();
        seqs.dedup();
        assert_eq!(seqs.len() as u64, n);
        assert_eq!(*seqs.last().unwrap(), base + n, "logged once each");
        eventually("the edge has them all", || applied() >= base + n).await;
        assert_eq!(applied(), base + n, "nothing logged twice");
    }
}

/// A relay restarts while its edges were caught up: its new ring starts at the head, and each
/// edge resumes where it was, behind it. The first fetches that range from the coordinator; the
/// others are served what it fetched, and ask the coordinator nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edges_behind_a_restarted_relay_share_one_catch_up() {
    let mut w = World::start(1, 3, 3 * SECOND).await;
    let applied = |w: &World, j: usize| {
        w.edges[j]
            .as_ref()
            .unwrap()
            .store
            .applied()
            .iter()
            .map(|&(_, _, s)| s)
            .max()
            .unwrap_or(0)
    };
    let first = w.publisher.invalidate("before").await.unwrap();
    for j in 0..3 {
        eventually("every edge caught up", || applied(&w, j) >= first).await;
    }
    w.stop_relay(0).await;
    let mut head = first;
    for chunk in 0..10 {
        let keys = (0..300)
            .map(|i| dci_proto::Invalidation::key(format!("while-down-{chunk}-{i}")))
            .collect();
        head = *w.publisher.publish(keys).await.unwrap().last().unwrap();
    }
    // Edges 1 and 2 stay away until edge 0 has caught up through the new relay.
    w.edge_proxies[1][0].blackhole(true);
    w.edge_proxies[2][0].blackhole(true);
    w.start_relay(0).await;
    let last = w.publisher.invalidate("after").await.unwrap();
    eventually("edge 0 caught up", || applied(&w, 0) >= last).await;
    let core = w.relays[0].as_ref().unwrap().core.clone();
    let fetches = core.catch_ups.load(std::sync::atomic::Ordering::Relaxed);
    assert!(fetches > 0, "the range was older than the new ring");
    for j in 1..3 {
        w.edge_proxies[j][0].blackhole(false);
        eventually("the edge caught up", || applied(&w, j) >= last).await;
    }
    assert_eq!(
        core.catch_ups.load(std::sync::atomic::Ordering::Relaxed),
        fetches,
        "the later edges were served what the first fetched"
    );
    assert!(
        core.catch_up_hits
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2
    );
    assert!(head < last);
    w.converge().await;
}
