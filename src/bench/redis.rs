//! The same workload through Redis pub/sub, for the comparison column. Speaks just enough RESP
//! (PUBLISH, SUBSCRIBE) over raw TCP to measure Redis and not a client library.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use super::KeyShape;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A redis-server started for the bench on a free loopback port.
pub struct Redis {
    child: Child,
    port: u16,
    shape: KeyShape,
}

const CHANNEL: &str = "inv";
/// Key + 8-byte version + 8-byte timestamp.
fn payload_len(shape: &KeyShape) -> usize {
    shape.len() + 16
}

fn frame_len(shape: &KeyShape) -> usize {
    // *3\r\n $7\r\nmessage\r\n $3\r\ninv\r\n $<len>\r\n<payload>\r\n
    let p = payload_len(shape);
    4 + 13 + 9 + (1 + p.to_string().len() + 2) + p + 2
}

fn publish_cmd(shape: &KeyShape, i: u64, now_us: u64) -> Vec<u8> {
    let mut payload = shape.key(i).to_vec();
    payload.extend_from_slice(&i.to_le_bytes());
    payload.extend_from_slice(&now_us.to_le_bytes());
    let mut cmd = format!(
        "*3\r\n$7\r\nPUBLISH\r\n${}\r\n{CHANNEL}\r\n${}\r\n",
        CHANNEL.len(),
        payload.len()
    )
    .into_bytes();
    cmd.extend_from_slice(&payload);
    cmd.extend_from_slice(b"\r\n");
    cmd
}

/// The server goes with the bench however it ends: an error half-way left it running.
impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Redis {
    /// Start `redis-server` if it is on the PATH.
    pub async fn start(shape: KeyShape) -> Option<Redis> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--client-output-buffer-limit", "pubsub", "0", "0", "0"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let r = Redis { child, port, shape };
        for _ in 0..200 {
            if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                return Some(r);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        None
    }

    async fn subscribers(
        &self,
        n: usize,
        lat: Option<Arc<Mutex<Histogram<u64>>>>,
    ) -> anyhow::Result<Vec<Arc<AtomicU64>>> {
        let mut counts = Vec::new();
        for _ in 0..n {
            let mut s = TcpStream::connect(("127.0.0.1", self.port)).await?;
            s.set_nodelay(true)?;
            s.write_all(
                format!(
                    "*2\r\n$9\r\nSUBSCRIBE\r\n${}\r\n{CHANNEL}\r\n",
                    CHANNEL.len()
                )
                .as_bytes(),
            )
            .await?;
            // The subscribe confirmation: *3 $9 subscribe $3 inv :1
            let confirm = 4 + 15 + 9 + 4;
            let mut buf = vec![0u8; confirm];
            s.read_exact(&mut buf).await?;
            let c = Arc::new(AtomicU64::new(0));
            counts.push(c.clone());
            let lat = lat.clone();
            let shape = self.shape.clone();
            tokio::spawn(async move {
                let fl = frame_len(&shape);
                let mut buf = vec![0u8; 64 * 1024];
                let mut carry: Vec<u8> = Vec::new();
                loop {
                    let n = match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    carry.extend_from_slice(&buf[..n]);
                    let frames = carry.len() / fl;
                    if let Some(l) = &lat {
                        let now = dci_proto::now_us();
                        let mut h = l.lock().unwrap_or_else(|e| e.into_inner());
                        for f in 0..frames {
                            let end = (f + 1) * fl - 2;
                            let ts = u64::from_le_bytes(
                                carry[end - 8..end].try_into().unwrap_or([0; 8]),
                            );
                            let _ = h.record(now.saturating_sub(ts).max(1));
                        }
                    }
                    carry.drain(..frames * fl);
                    c.fetch_add(frames as u64, Ordering::Release);
                }
            });
        }
        Ok(counts)
    }

    async fn publisher(&self) -> anyhow::Result<TcpStream> {
        let s = TcpStream::connect(("127.0.0.1", self.port)).await?;
        s.set_nodelay(true)?;
        Ok(s)
    }

    /// Delivered messages per second with `n` subscribers, publishing `count` as fast as possible.
    pub async fn saturation(&self, n: usize, count: u64) -> anyhow::Result<f64> {
        let counts = self.subscribers(n, None).await?;
        let p = self.publisher().await?;
        let (mut rd, mut wr) = p.into_split();
        // Drain the integer replies so the publisher never blocks on them.
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = rd.read(&mut buf).await {
                if n == 0 {
                    return;
                }
            }
        });
        let started = Instant::now();
        let mut batch = Vec::with_capacity(256 * 80);
        for i in 0..count {
            batch.extend_from_slice(&publish_cmd(&self.shape, i, 0));
            if batch.len() >= 256 * 80 {
                wr.write_all(&batch).await?;
                batch.clear();
            }
        }
        wr.write_all(&batch).await?;
        let deadline = Instant::now() + Duration::from_secs(300);
        while counts.iter().any(|c| c.load(Ordering::Acquire) < count) {
            if Instant::now() > deadline {
                anyhow::bail!("redis subscribers did not receive everything");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok((count * n as u64) as f64 / started.elapsed().as_secs_f64())
    }

    /// p50/p99/p99.9 in ms at a fixed rate with `n` subscribers.
    pub async fn latency(
        &self,
        n: usize,
        rate: u64,
        dur: Duration,
    ) -> anyhow::Result<(f64, f64, f64)> {
        let lat = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(
            1, 60_000_000, 3,
        )?));
        let counts = self.subscribers(n, Some(lat.clone())).await?;
        let p = self.publisher().await?;
        let (mut rd, mut wr) = p.into_split();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = rd.read(&mut buf).await {
                if n == 0 {
                    return;
                }
            }
        });
        let per_tick = rate as f64 / 1000.0;
        let mut due = 0.0;
        let mut sent = 0u64;
        let started = Instant::now();
        let mut interval = tokio::time::interval(Duration::from_millis(1));
        while started.elapsed() < dur {
            interval.tick().await;
            due += per_tick;
            let k = due as u64;
            due -= k as f64;
            if k == 0 {
                continue;
            }
            let now = dci_proto::now_us();
            let mut batch = Vec::new();
            for _ in 0..k {
                batch.extend_from_slice(&publish_cmd(&self.shape, sent, now));
                sent += 1;
            }
            wr.write_all(&batch).await?;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while counts.iter().any(|c| c.load(Ordering::Acquire) < sent) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let h = lat.lock().unwrap_or_else(|e| e.into_inner());
        let q = |x: f64| h.value_at_quantile(x) as f64 / 1000.0;
        Ok((q(0.5), q(0.99), q(0.999)))
    }
}
