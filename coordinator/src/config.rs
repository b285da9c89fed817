//! Coordinator configuration: one struct, one set of defaults, read from YAML and overridden by flags.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::wal::{FsyncPolicy, WalOptions};

/// Everything a coordinator needs.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Directory of the shard's log.
    pub data_dir: PathBuf,
    /// The shard this coordinator sequences.
    pub shard: u32,
    /// How many shards the keyspace has (the shard map is a hash ring over `0..shard_count`).
    pub shard_count: u32,
    /// Node id shown by `dci status`.
    pub node_id: String,
    /// Longest key accepted, in bytes.
    #[serde(deserialize_with = "dci_proto::types::de_byte_size")]
    pub max_key_len: usize,
    /// Most entries in one publish request.
    pub max_request_entries: usize,
    /// fsync policy of the log.
    pub fsync: FsyncPolicy,
    /// For `fsync: interval`.
    #[serde(with = "humantime_serde")]
    pub fsync_interval: Duration,
    /// Segment size of the log.
    #[serde(deserialize_with = "dci_proto::types::de_byte_size")]
    pub segment_bytes: u64,
    /// Keep at most this many bytes of log.
    #[serde(deserialize_with = "dci_proto::types::de_byte_size")]
    pub retention_bytes: u64,
    /// Keep log segments at most this long.
    #[serde(with = "humantime_serde")]
    pub retention_age: Duration,
    /// Most entries in one group commit.
    pub max_group_entries: usize,
    /// Bytes of accepted publishes waiting for the log at most (about: keys and bookkeeping);
    /// while a write is stuck, further publishes wait for room (a stream is not read on).
    #[serde(deserialize_with = "dci_proto::types::de_byte_size")]
    pub max_queued_bytes: usize,
    /// Bytes of recent batches kept in memory for replay without touching the disk.
    #[serde(deserialize_with = "dci_proto::types::de_byte_size")]
    pub memory_tail_bytes: usize,
    /// Unacked bytes in flight per receiver.
    #[serde(deserialize_with = "dci_proto::types::de_byte_size")]
    pub window_bytes: usize,
    /// Receivers served at once (0: no limit); one more is refused and goes to the next sender
    /// on its list. Each idle receiver costs about 30 KiB.
    pub max_receivers: u64,
    /// Where to serve Prometheus `/metrics` (none: not served).
    pub metrics_listen: Option<SocketAddr>,
    /// Pushing the same metrics to an OpenTelemetry collector.
    pub otlp: dci_proto::otlp::OtlpConfig,
    /// TLS: served with `cert` and `key`; `ca` trusted for `https://` senders.
    pub tls: dci_proto::tls::TlsConfig,
    /// The tier's shard count changed: a log of this shard under another count is set aside
    /// (kept in a subdirectory of `data_dir`) and a new one begun under a new epoch, where it
    /// is otherwise refused. A log of another shard is refused all the same.
    pub reshard: bool,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        let wal = WalOptions::default();
        CoordinatorConfig {
            listen: "127.0.0.1:7400".parse().expect("static address"),
            data_dir: PathBuf::from("dci-data"),
            shard: 0,
            shard_count: 1,
            node_id: String::new(),
            max_key_len: dci_proto::types::DEFAULT_MAX_KEY_LEN,
            max_request_entries: 65_536,
            fsync: wal.fsync,
            fsync_interval: wal.fsync_interval,
            segment_bytes: wal.segment_bytes,
            retention_bytes: wal.retention_bytes,
            retention_age: wal.retention_age,
            max_group_entries: 65_536,
            max_queued_bytes: 256 << 20,
            memory_tail_bytes: 64 << 20,
            window_bytes: 4 << 20,
            max_receivers: 0,
            metrics_listen: None,
            otlp: Default::default(),
            tls: Default::default(),
            reshard: false,
        }
    }
}

/// A configuration that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A value out of its range.
    #[error("{0}")]
    Invalid(String),
}

impl CoordinatorConfig {
    /// Check the values; fill in what derives from others.
    pub fn validate(mut self) -> Result<Self, ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.shard_count == 0 || self.shard_count > dci_proto::types::MAX_SHARDS {
            return bad(format!(
                "shard_count must be between 1 and {}",
                dci_proto::types::MAX_SHARDS
            ));
        }
        if self.shard >= self.shard_count {
            return bad(format!(
                "shard {} is not below shard_count {}",
                self.shard, self.shard_count
            ));
        }
        dci_proto::types::check_max_key_len(self.max_key_len).map_err(ConfigError::Invalid)?;
        if self.segment_bytes < 4096 {
            return bad("segment_bytes must be at least 4096".into());
        }
        if self.window_bytes < 1024 {
            return bad("window_bytes must be at least 1024".into());
        }
        if self.max_queued_bytes < 1 << 20 {
            return bad("max_queued_bytes must be at least 1 MiB".into());
        }
        if self.max_group_entries == 0 || self.max_request_entries == 0 {
            return bad("max_group_entries and max_request_entries must be positive".into());
        }
        for (what, d) in [
            ("fsync_interval", self.fsync_interval),
            ("retention_age", self.retention_age),
        ] {
            dci_proto::types::check_duration(what, d).map_err(ConfigError::Invalid)?;
        }
        self.otlp.check().map_err(ConfigError::Invalid)?;
        self.tls
            .validate()
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if self.node_id.is_empty() {
            self.node_id = format!("coordinator-{}", self.shard);
        }
        Ok(self)
    }

    /// The log options.
    pub fn wal(&self) -> WalOptions {
        WalOptions {
            segment_bytes: self.segment_bytes,
            retention_bytes: self.retention_bytes,
            retention_age: self.retention_age,
            fsync: self.fsync,
            fsync_interval: self.fsync_interval,
            owner: format!("shard {} of {}", self.shard, self.shard_count),
            set_aside_when: self.reshard.then_some(same_shard_other_count),
        }
    }
}

/// Whether two logs' owners (`shard I of N`) are one shard under two shard counts.
pub(crate) fn same_shard_other_count(holds: &str, owner: &str) -> bool {
    let parse = |o: &str| -> Option<(u32, u32)> {
        let (shard, count) = o.strip_prefix("shard ")?.split_once(" of ")?;
        Some((shard.parse().ok()?, count.parse().ok()?))
    };
    match (parse(holds), parse(owner)) {
        (Some((a, n)), Some((b, m))) => a == b && n != m,
        _ => false,
    }
}
