//! Edge cache configuration.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Everything an edge needs.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EdgeConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Relays to follow, in failover order.
    #[serde(deserialize_with = "dci_proto::types::de_list")]
    pub relays: Vec<String>,
    /// The region.
    pub region: String,
    /// Node id (default: `edge-<region>-<host>-<port>`, the host the first label of its
    /// hostname); with `ring_nodes`, it must be one of them.
    pub node_id: String,
    /// Size bound of the store, in bytes of keys and values.
    #[serde(deserialize_with = "dci_proto::types::de_byte_size")]
    pub capacity: u64,
    /// Default time to live of a cached value.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Answer misses once no relay has been heard (and caught up with) for this long.
    #[serde(with = "humantime_serde")]
    pub max_staleness: Duration,
    /// Shards of the keyspace (leases and tombstones are per shard).
    pub shard_count: u32,
    /// Longest key accepted.
    #[serde(deserialize_with = "dci_proto::types::de_byte_size")]
    pub max_key_len: usize,
    /// Largest value accepted.
    #[serde(deserialize_with = "dci_proto::types::de_byte_size")]
    pub max_value_len: usize,
    /// Tombstone slots in all, shared out among the shards (each shard's share a power of two,
    /// rounded down; 32 bytes each): a fill of a key sharing a slot with a more recently
    /// invalidated key is refused, so more slots, fewer such misses.
    pub max_tombstones: u64,
    /// Tag invalidations remembered in all, shared out among the shards (1,024 each at least):
    /// past it, the oldest is forgotten and every tagged value filled before it is a miss.
    pub max_tag_tombstones: u64,
    /// Only take invalidations of keys with these prefixes (empty: all).
    #[serde(deserialize_with = "dci_proto::types::de_list")]
    pub prefixes: Vec<String>,
    /// Only take keys this edge owns on this ring of node ids (empty: all keys).
    #[serde(deserialize_with = "dci_proto::types::de_list")]
    pub ring_nodes: Vec<String>,
    /// Owners per key on the ring.
    pub replication: u32,
    /// Give up on a silent relay after this long and move to the next.
    #[serde(with = "humantime_serde")]
    pub peer_timeout: Duration,
    /// Ask relays for zstd-compressed streams.
    pub compression: bool,
    /// Where to serve Prometheus `/metrics` (none: not served).
    pub metrics_listen: Option<SocketAddr>,
    /// Pushing the same metrics to an OpenTelemetry collector.
    pub otlp: dci_proto::otlp::OtlpConfig,
    /// TLS: served with `cert` and `key`; `ca` trusted for `https://` senders.
    pub tls: dci_proto::tls::TlsConfig,
}

impl Default for EdgeConfig {
    fn default() -> Self {
        EdgeConfig {
            listen: "127.0.0.1:7600".parse().expect("static address"),
            relays: Vec::new(),
            region: "default".into(),
            node_id: String::new(),
            capacity: 256 << 20,
            ttl: Duration::from_secs(3600),
            max_staleness: Duration::from_secs(5),
            shard_count: 1,
            max_key_len: dci_proto::types::DEFAULT_MAX_KEY_LEN,
            max_value_len: 8 << 20,
            max_tombstones: 262_144,
            max_tag_tombstones: dci_proto::lease::MAX_TAG_TOMBS as u64,
            prefixes: Vec::new(),
            ring_nodes: Vec::new(),
            replication: 1,
            peer_timeout: Duration::from_secs(3),
            compression: false,
            metrics_listen: None,
            otlp: Default::default(),
            tls: Default::default(),
        }
    }
}

/// A configuration that cannot work.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl EdgeConfig {
    /// The heaviest entry the edge takes: its longest key and value, and the store's
    /// bookkeeping.
    pub fn largest_entry(&self) -> u64 {
        (self.max_key_len + self.max_value_len + crate::store::ENTRY_OVERHEAD) as u64
    }

    /// Check the values.
    pub fn validate(self) -> Result<Self, ConfigError> {
        if self.relays.is_empty() {
            return Err(ConfigError("an edge needs at least one relay URL".into()));
        }
        for u in &self.relays {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                return Err(ConfigError(format!("relay {u:?} is not an http(s):// URL")));
            }
        }
        if self.capacity < 1024 {
            return Err(ConfigError("capacity must be at least 1024 bytes".into()));
        }
        if self.shard_count == 0 || self.shard_count > dci_proto::types::MAX_SHARDS {
            return Err(ConfigError(format!(
                "shard_count must be between 1 and {}",
                dci_proto::types::MAX_SHARDS
            )));
        }
        // Heartbeats come every 500 ms: with a shorter bound an idle edge would be out of it
        // between any two, and answer misses most of the time.
        if self.max_staleness < dci_proto::upstream::MIN_PEER_TIMEOUT {
            return Err(ConfigError(format!(
                "max_staleness must be at least {:?} (two of a sender's heartbeats)",
                dci_proto::upstream::MIN_PEER_TIMEOUT
            )));
        }
        if self.peer_timeout < dci_proto::upstream::MIN_PEER_TIMEOUT {
            return Err(ConfigError(format!(
                "peer_timeout must be at least {:?} (two of a sender's heartbeats)",
                dci_proto::upstream::MIN_PEER_TIMEOUT
            )));
        }
        if self.max_tombstones == 0 || self.max_tombstones > dci_proto::lease::MAX_TOMBSTONES as u64
        {
            return Err(ConfigError(format!(
                "max_tombstones must be between 1 and {} (32 bytes each, all shards together)",
                dci_proto::lease::MAX_TOMBSTONES
            )));
        }
        if self.max_tag_tombstones == 0 || self.max_tag_tombstones > 1 << 24 {
            return Err(ConfigError(
                "max_tag_tombstones must be between 1 and 16777216 (about 100 bytes each, and \
                 its tag)"
                    .into(),
            ));
        }
        dci_proto::types::check_max_key_len(self.max_key_len).map_err(ConfigError)?;
        for (what, d) in [
            ("ttl", self.ttl),
            ("max_staleness", self.max_staleness),
            ("peer_timeout", self.peer_timeout),
        ] {
            dci_proto::types::check_duration(what, d).map_err(ConfigError)?;
        }
        self.otlp.check().map_err(ConfigError)?;
        self.tls
            .validate()
            .map_err(|e| ConfigError(e.to_string()))?;
        Ok(self)
    }
}
