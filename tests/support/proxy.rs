//! A fault-injecting TCP proxy for tests: placed between any two tiers, switched by the test.
//!
//! Faults: added delay (fixed and jittered, per chunk, order kept), dropped connections, a
//! blackhole (connections are accepted but nothing passes: a partition; or only what one side
//! sends is held: an asymmetric one), and a bandwidth cap.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Default)]
struct Faults {
    blackhole: AtomicBool,
    /// Only what the client sends is held (an asymmetric partition).
    blackhole_to_server: AtomicBool,
    /// Only what the server sends is held.
    blackhole_to_client: AtomicBool,
    /// Bytes per second each direction of each connection may carry (0: unlimited).
    bandwidth: AtomicU64,
    delay: Mutex<(Duration, Duration)>,
    passed: AtomicU64,
}

/// A running proxy.
pub struct Proxy {
    pub addr: SocketAddr,
    faults: Arc<Faults>,
    drops: watch::Sender<u64>,
    stop: watch::Sender<bool>,
}

impl Proxy {
    /// Listen on an ephemeral loopback port and forward to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Proxy {
        Self::balancing(vec![upstream]).await
    }

    /// Like [`Proxy::start`], each new connection to the next of `upstreams` in turn: a
    /// Kubernetes Service in front of several pods.
    pub async fn balancing(upstreams: Vec<SocketAddr>) -> Proxy {
        let next = Arc::new(AtomicU64::new(0));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let faults = Arc::new(Faults::default());
        let (drops, drop_rx) = watch::channel(0u64);
        let (stop, mut stop_rx) = watch::channel(false);
        let f = faults.clone();
        tokio::spawn(async move {
            loop {
                let (client, _) = tokio::select! {
                    c = listener.accept() => match c { Ok(c) => c, Err(_) => continue },
                    _ = stop_rx.changed() => return,
                };
                let (f, mut drop_rx, mut stop_rx) = (f.clone(), drop_rx.clone(), stop_rx.clone());
                let turn = next.fetch_add(1, Ordering::Relaxed) as usize;
                let upstream = upstreams[turn % upstreams.len()];
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    drop_rx.mark_unchanged();
                    tokio::select! {
                        _ = pump(cr, sw, f.clone(), true) => {}
                        _ = pump(sr, cw, f.clone(), false) => {}
                        _ = drop_rx.changed() => {}
                        _ = stop_rx.changed() => {}
                    }
                });
            }
        });
        Proxy {
            addr,
            faults,
            drops,
            stop,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A partition: nothing passes (connections stay open and silent) until switched off.
    pub fn blackhole(&self, on: bool) {
        self.faults.blackhole.store(on, Ordering::SeqCst);
    }

    /// An asymmetric partition: what the client sends is held, what the server sends passes.
    pub fn blackhole_to_server(&self, on: bool) {
        self.faults.blackhole_to_server.store(on, Ordering::SeqCst);
    }

    /// The other asymmetric partition: what the server sends is held, what the client sends
    /// passes.
    pub fn blackhole_to_client(&self, on: bool) {
        self.faults.blackhole_to_client.store(on, Ordering::SeqCst);
    }

    /// Close every open connection (new ones are accepted).
    pub fn drop_connections(&self) {
        self.drops.send_modify(|g| *g += 1);
    }

    /// Cap each direction of each connection to `bytes_per_sec` (0: no cap).
    pub fn bandwidth(&self, bytes_per_sec: u64) {
        self.faults.bandwidth.store(bytes_per_sec, Ordering::SeqCst);
    }

    /// Delay every chunk by `fixed` plus up to `jitter`.
    pub fn delay(&self, fixed: Duration, jitter: Duration) {
        *self.faults.delay.lock().unwrap() = (fixed, jitter);
    }

    /// Bytes forwarded so far.
    pub fn passed(&self) -> u64 {
        self.faults.passed.load(Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    f: Arc<Faults>,
    to_server: bool,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while f.blackhole.load(Ordering::SeqCst)
            || (to_server && f.blackhole_to_server.load(Ordering::SeqCst))
            || (!to_server && f.blackhole_to_client.load(Ordering::SeqCst))
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (fixed, jitter) = *f.delay.lock().unwrap();
        if !fixed.is_zero() || !jitter.is_zero() {
            let j = if jitter.is_zero() {
                Duration::ZERO
            } else {
                jitter.mul_f64(rand::random::<f64>())
            };
            tokio::time::sleep(fixed + j).await;
        }
        let cap = f.bandwidth.load(Ordering::SeqCst);
        let mut at = 0;
        while at < n {
            // Under a cap, write in small slices so the pace is even.
            let slice = if cap == 0 { n - at } else { (n - at).min(1024) };
            if to.write_all(&buf[at..at + slice]).await.is_err() {
                return;
            }
            at += slice;
            f.passed.fetch_add(slice as u64, Ordering::Relaxed);
            if cap > 0 {
                tokio::time::sleep(Duration::from_secs_f64(slice as f64 / cap as f64)).await;
            }
        }
    }
}
