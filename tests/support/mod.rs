//! Test support: the fault-injecting proxy and a world (coordinator, relays, edges wired through
//! proxies) with a checker that publishes versioned invalidations, reads through the edges, and
//! verifies what the system promises.

#![allow(dead_code, missing_docs)]

pub mod proxy;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use dci_coordinator::{Coordinator, CoordinatorConfig};
use dci_edge_cache::{EdgeConfig, EdgeNode};
use dci_proto::ring::NodeRing;
use dci_proto::upstream::lock;
use dci_proto::{Batch, Seq};
use dci_relay::{Relay, RelayConfig};
use dci_sdk::{CacheClient, Publisher, PublisherOptions};
use proxy::Proxy;

/// What one edge applied, as its hook saw it.
#[derive(Default, Debug)]
pub struct EdgeWatch {
    pub max_seq: HashMap<Bytes, Seq>,
    pub max_version: HashMap<Bytes, u64>,
    pub order_violations: u64,
    pub max_staleness_us: u64,
    /// The seq before the first batch this incarnation applied.
    pub start: Option<Seq>,
    pub last: Seq,
}

impl EdgeWatch {
    fn on_batch(&mut self, b: &Batch) {
        self.start.get_or_insert(b.first_seq - 1);
        self.last = self.last.max(b.last_seq);
        let now = dci_proto::now_us();
        for e in &b.entries {
            if let Some(&prev) = self.max_seq.get(&e.key) {
                if e.seq <= prev {
                    self.order_violations += 1;
                }
            }
            self.max_seq.insert(e.key.clone(), e.seq);
            if let Some(v) = e.source_version {
                let m = self.max_version.entry(e.key.clone()).or_insert(0);
                *m = (*m).max(v);
            }
            self.max_staleness_us = self
                .max_staleness_us
                .max(now.saturating_sub(e.publish_time_us));
        }
    }
}

/// An acknowledged publish.
#[derive(Clone, Debug)]
pub struct Acked {
    pub key: String,
    pub version: u64,
    pub seq: Seq,
}

pub struct World {
    pub dir: tempfile::TempDir,
    pub coord: Option<Coordinator>,
    pub coord_addr: SocketAddr,
    pub relays: Vec<Option<Relay>>,
    pub relay_addrs: Vec<SocketAddr>,
    /// Relay i → coordinator.
    pub up_proxies: Vec<Proxy>,
    /// Edge j → relay i is `edge_proxies[j][i]`.
    pub edge_proxies: Vec<Vec<Proxy>>,
    pub edges: Vec<Option<EdgeNode>>,
    pub edge_addrs: Vec<SocketAddr>,
    pub watches: Vec<Arc<Mutex<EdgeWatch>>>,
    pub max_staleness: Duration,
    pub acked: Arc<Mutex<Vec<Acked>>>,
    pub db: Arc<Vec<AtomicU64>>,
    pub stale_reads: Arc<AtomicU64>,
    pub reads: Arc<AtomicU64>,
    pub publisher: Publisher,
    halt: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

pub const KEYS: usize = 200;

pub fn key(i: usize) -> String {
    format!("user:{i:05}:profile")
}

fn any() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

async fn start_relay(listen: SocketAddr, upstream: String) -> Relay {
    Relay::start(RelayConfig {
        listen,
        upstream: vec![upstream],
        region: "r".into(),
        peer_timeout: Duration::from_secs(1),
        ..Default::default()
    })
    .await
    .unwrap()
}

impl World {
    /// A coordinator, `relays` relays and `edges` edges, every link through its own proxy.
    pub async fn start(relays: usize, edges: usize, max_staleness: Duration) -> World {
        let dir = tempfile::tempdir().unwrap();
        let coord = Coordinator::start(CoordinatorConfig {
            listen: any(),
            data_dir: dir.path().to_path_buf(),
            ..Default::default()
        })
        .await
        .unwrap();
        let coord_addr = coord.addr;
        let mut up_proxies = Vec::new();
        let mut rs = Vec::new();
        let mut relay_addrs = Vec::new();
        for _ in 0..relays {
            let p = Proxy::start(coord_addr).await;
            let r = start_relay(any(), p.url()).await;
            relay_addrs.push(r.addr);
            rs.push(Some(r));
            up_proxies.push(p);
        }
        let publisher = Publisher::with_options(
            vec![coord.url()],
            PublisherOptions {
                retry_for: Duration::from_secs(60),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let mut w = World {
            dir,
            coord: Some(coord),
            coord_addr,
            relays: rs,
            relay_addrs,
            up_proxies,
            edge_proxies: Vec::new(),
            edges: Vec::new(),
            edge_addrs: Vec::new(),
            watches: Vec::new(),
            max_staleness,
            acked: Arc::default(),
            db: Arc::new((0..KEYS).map(|_| AtomicU64::new(0)).collect()),
            stale_reads: Arc::default(),
            reads: Arc::default(),
            publisher,
            halt: Arc::default(),
            tasks: Vec::new(),
        };
        for j in 0..edges {
            let mut proxies = Vec::new();
            for i in 0..relays {
                // Edges prefer different relays so both carry traffic.
                let _ = i;
                proxies.push(Proxy::start(w.relay_addrs[(i + j) % relays]).await);
            }
            w.edge_proxies.push(proxies);
            w.watches.push(Arc::default());
            w.edge_addrs.push(any());
            w.edges.push(None);
            w.start_edge(j).await;
        }
        for j in 0..edges {
            let e = w.edges[j].as_ref().unwrap();
            let link = e.link.clone();
            // In its relay's stream too: a relay whose own link came up after a test's first
            // publish would have started its ring past it.
            eventually("edge in the stream", || {
                let link = lock(&link);
                link.connected_to.is_some() && !link.progress.is_empty()
            })
            .await;
        }
        w
    }

    pub async fn start_edge(&mut self, j: usize) {
        let watch = Arc::new(Mutex::new(EdgeWatch::default()));
        self.watches[j] = watch.clone();
        let hook: dci_edge_cache::AppliedHook = Arc::new(move |b: &Batch| lock(&watch).on_batch(b));
        let e = EdgeNode::start_with(
            EdgeConfig {
                listen: self.edge_addrs[j],
                relays: self.edge_proxies[j].iter().map(|p| p.url()).collect(),
                region: "r".into(),
                node_id: format!("edge-{j}"),
                max_staleness: self.max_staleness,
                peer_timeout: Duration::from_secs(1),
                ..Default::default()
            },
            Some(hook),
        )
        .await
        .unwrap();
        self.edge_addrs[j] = e.addr;
        self.edges[j] = Some(e);
    }

    pub async fn stop_edge(&mut self, j: usize) {
        if let Some(e) = self.edges[j].take() {
            e.stop().await.unwrap();
        }
    }

    pub async fn stop_relay(&mut self, i: usize) {
        if let Some(r) = self.relays[i].take() {
            r.stop().await.unwrap();
        }
    }

    pub async fn start_relay(&mut self, i: usize) {
        self.relays[i] = Some(start_relay(self.relay_addrs[i], self.up_proxies[i].url()).await);
    }

    pub async fn restart_coordinator(&mut self) {
        if let Some(c) = self.coord.take() {
            c.stop().await.unwrap();
        }
        let c = Coordinator::start(CoordinatorConfig {
            listen: self.coord_addr,
            data_dir: self.dir.path().to_path_buf(),
            ..Default::default()
        })
        .await
        .unwrap();
        self.coord = Some(c);
    }

    /// Writers: one per key group, each publishing its keys' new versions in order.
    pub fn start_writers(&mut self, writers: usize, per_writer_rate: u64) {
        for w in 0..writers {
            let (p, db, acked, halt) = (
                self.publisher.clone(),
                self.db.clone(),
                self.acked.clone(),
                self.halt.clone(),
            );
            self.tasks.push(tokio::spawn(async move {
                let period = Duration::from_secs_f64(1.0 / per_writer_rate as f64);
                let mut i = w;
                while !halt.load(Ordering::Relaxed) {
                    let k = i % KEYS;
                    i += writers;
                    let version = db[k].fetch_add(1, Ordering::SeqCst) + 1;
                    if let Ok(seq) = p.invalidate_version(key(k), version).await {
                        lock(&acked).push(Acked {
                            key: key(k),
                            version,
                            seq,
                        });
                    }
                    tokio::time::sleep(period).await;
                }
            }));
        }
    }

    /// Readers: fill through leases and check nothing older than an applied invalidation is served.
    pub fn start_readers(&mut self, readers: usize) {
        let urls: Vec<String> = self
            .edge_addrs
            .iter()
            .map(|a| format!("http://{a}"))
            .collect();
        let ring = NodeRing::new(urls.clone());
        let client = CacheClient::from_urls(urls.clone()).unwrap();
        for r in 0..readers {
            let (client, ring, urls) = (client.clone(), ring.clone(), urls.clone());
            let (db, watches, stale, reads, halt) = (
                self.db.clone(),
                self.watches.clone(),
                self.stale_reads.clone(),
                self.reads.clone(),
                self.halt.clone(),
            );
            self.tasks.push(tokio::spawn(async move {
                let mut i = r * 7;
                while !halt.load(Ordering::Relaxed) {
                    i = (i + 13) % KEYS;
                    let k = key(i);
                    let owner = urls
                        .iter()
                        .position(|u| Some(u.as_str()) == ring.primary(k.as_bytes()))
                        .unwrap();
                    let applied_before = lock(&watches[owner])
                        .max_version
                        .get(k.as_bytes())
                        .copied()
                        .unwrap_or(0);
                    let db2 = db.clone();
                    let got = client
                        .get_or_load(k.clone(), move || async move {
                            Ok::<_, std::io::Error>(Bytes::from(
                                db2[i].load(Ordering::SeqCst).to_string(),
                            ))
                        })
                        .await;
                    if let Ok(v) = got {
                        reads.fetch_add(1, Ordering::Relaxed);
                        let seen: u64 = std::str::from_utf8(&v).unwrap().parse().unwrap();
                        if seen < applied_before {
                            stale.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }));
        }
    }

    pub async fn stop_load(&mut self) {
        self.halt.store(true, Ordering::Relaxed);
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
    }

    pub fn head(&self) -> Seq {
        lock(&self.acked).iter().map(|a| a.seq).max().unwrap_or(0)
    }

    /// Faults healed: wait until every live edge applied up to the head.
    pub async fn converge(&self) {
        let head = self.head();
        for (j, w) in self.watches.iter().enumerate() {
            if self.edges[j].is_none() {
                continue;
            }
            let w = w.clone();
            eventually(&format!("edge {j} reaches {head}"), move || {
                lock(&w).last >= head
            })
            .await;
        }
    }

    /// Check every promise; returns the report line.
    pub async fn check(mut self, scenario: &str) -> String {
        self.stop_load().await;
        self.converge().await;
        let acked = lock(&self.acked).clone();
        assert!(!acked.is_empty(), "nothing was published");
        let mut lost = 0;
        let mut order = 0;
        let mut staleness = 0;
        let mut newest: HashMap<&str, (Seq, u64)> = HashMap::new();
        for a in &acked {
            let e = newest.entry(&a.key).or_insert((0, 0));
            *e = (e.0.max(a.seq), e.1.max(a.version));
        }
        for (j, w) in self.watches.iter().enumerate() {
            if self.edges[j].is_none() {
                continue;
            }
            let w = lock(w);
            let start = w.start.unwrap_or(0);
            order += w.order_violations;
            staleness = staleness.max(w.max_staleness_us);
            let flushed = lock(&self.edges[j].as_ref().unwrap().link).flushes;
            assert_eq!(
                flushed, 0,
                "edge {j} was reset; nothing should have been gone"
            );
            for a in acked.iter().filter(|a| a.seq > start) {
                if w.max_seq.get(a.key.as_bytes()).copied().unwrap_or(0) < a.seq {
                    lost += 1;
                }
            }
            for (k, (_, v)) in &newest {
                if let Some(&got) = w.max_version.get(k.as_bytes()) {
                    assert_eq!(got, *v, "edge {j} ends with an older version of {k}");
                }
            }
        }
        // Every acknowledged publish is in the log exactly once, with its key and version.
        let coord = self.coord.take().unwrap();
        coord.stop().await.unwrap();
        let (wal, _) =
            dci_coordinator::wal::Wal::open(self.dir.path(), Default::default()).unwrap();
        let records = wal.reader().read_from(1, usize::MAX).unwrap();
        let mut log: HashMap<Seq, (Bytes, Option<u64>)> = HashMap::new();
        let mut requests = std::collections::HashSet::new();
        for r in &records {
            assert!(
                requests.insert((r.publisher_id.clone(), r.request_no)),
                "request logged twice"
            );
            for e in &r.entries {
                assert!(
                    log.insert(e.seq, (e.key.clone(), e.source_version))
                        .is_none(),
                    "seq {} twice",
                    e.seq
                );
            }
        }
        for a in &acked {
            let (k, v) = log
                .get(&a.seq)
                .unwrap_or_else(|| panic!("acknowledged seq {} is not in the log", a.seq));
            assert_eq!((k.as_ref(), *v), (a.key.as_bytes(), Some(a.version)));
        }
        let stale = self.stale_reads.load(Ordering::Relaxed);
        let line = format!(
            "SCENARIO {scenario}: published={} lost={lost} order_violations={order} stale_reads={stale} reads={} longest_staleness_ms={}",
            acked.len(),
            self.reads.load(Ordering::Relaxed),
            staleness / 1000
        );
        println!("{line}");
        assert_eq!(lost, 0, "{line}");
        assert_eq!(order, 0, "{line}");
        assert_eq!(stale, 0, "{line}");
        for e in self.edges.into_iter().flatten() {
            e.stop().await.unwrap();
        }
        for r in self.relays.into_iter().flatten() {
            r.stop().await.unwrap();
        }
        line
    }
}

pub async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `GET /metrics` of a node's metrics endpoint: the whole answer, which must be a 200.
pub async fn scrape(addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: dci\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out
}
