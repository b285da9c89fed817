//! Test peers: a recording applier followed through the real link runtime.

#![allow(missing_docs)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use dci_proto::pb;
use dci_proto::upstream::{self, lock, Applier, FollowOptions, LinkState};
use dci_proto::{Batch, Epoch, Invalidation, Seq, ShardId};
use tokio::sync::watch;

#[derive(Default)]
pub struct Recorder {
    pub entries: Vec<Invalidation>,
    pub last_seq: Seq,
    pub flushes: Vec<(ShardId, Epoch, Seq, String)>,
}

impl Applier for Recorder {
    fn apply(&mut self, b: &Batch) {
        self.entries.extend(b.entries.iter().cloned());
        self.last_seq = b.last_seq;
    }
    fn quarantine(&mut self, _: ShardId, _: &pb::Invalidation, _: &str) {}
    fn flush(&mut self, shard: ShardId, epoch: Epoch, hwm: Seq, reason: &str) {
        self.flushes.push((shard, epoch, hwm, reason.to_string()));
        self.last_seq = hwm;
    }
}

pub struct Follower {
    pub rec: Arc<Mutex<Recorder>>,
    stop: watch::Sender<bool>,
}

impl Follower {
    pub fn start(urls: Vec<String>, resume: Vec<(ShardId, Epoch, Seq)>) -> Follower {
        let rec = Arc::new(Mutex::new(Recorder::default()));
        let state = Arc::new(Mutex::new(LinkState::default()));
        let (stop, rx) = watch::channel(false);
        let opts = FollowOptions {
            urls,
            node_id: "test-follower".into(),
            region: "test".into(),
            role: "relay".into(),
            resume,
            ..FollowOptions::default()
        };
        tokio::spawn(upstream::follow(opts, rec.clone(), state, rx));
        Follower { rec, stop }
    }

    pub async fn wait_for_seq(&self, seq: Seq) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if lock(&self.rec).last_seq >= seq {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "follower stuck at {} waiting for {seq}",
                lock(&self.rec).last_seq
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn seqs(&self) -> Vec<Seq> {
        lock(&self.rec).entries.iter().map(|e| e.seq).collect()
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

pub fn lock_entries(f: &Follower) -> Vec<bytes::Bytes> {
    lock(&f.rec).entries.iter().map(|e| e.key.clone()).collect()
}

pub fn lock_flushes(f: &Follower) -> usize {
    lock(&f.rec).flushes.len()
}
