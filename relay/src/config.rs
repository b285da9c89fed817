//! Relay configuration.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Everything a relay needs.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RelayConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Senders to follow (coordinator or relays), in failover order.
    #[serde(deserialize_with = "dci_proto::types::de_list")]
    pub upstream: Vec<String>,
    /// Further failover lists, each followed on a link of its own, for shards that `upstream`
    /// does not carry: with a sharded coordinator tier, `upstream` lists shard 0's senders and
    /// each group here another shard's.
    #[serde(deserialize_with = "dci_proto::types::de_lists")]
    pub upstream_groups: Vec<Vec<String>>,
    /// The region this relay serves.
    pub region: String,
    /// Node id (default: `relay-<region>-<host>-<port>`, the host the first label of its hostname).
    pub node_id: String,
    /// Bytes of recent batches kept for retransmission and catch-up, in all: shared out evenly
    /// among the shards the relay carries.
    #[serde(deserialize_with = "dci_proto::types::de_byte_size")]
    pub ring_bytes: usize,
    /// Unacked bytes in flight per receiver.
    #[serde(deserialize_with = "dci_proto::types::de_byte_size")]
    pub window_bytes: usize,
    /// Receivers served at once (0: no limit); one more is refused and goes to the next sender
    /// on its list. Each idle receiver costs about 30 KiB.
    pub max_receivers: u64,
    /// Give up on a silent upstream after this long.
    #[serde(with = "humantime_serde")]
    pub peer_timeout: Duration,
    /// Ask upstream for zstd-compressed streams.
    pub compression: bool,
    /// Longest key accepted from upstream.
    #[serde(deserialize_with = "dci_proto::types::de_byte_size")]
    pub max_key_len: usize,
    /// Where to serve Prometheus `/metrics` (none: not served).
    pub metrics_listen: Option<SocketAddr>,
    /// Pushing the same metrics to an OpenTelemetry collector.
    pub otlp: dci_proto::otlp::OtlpConfig,
    /// TLS: served with `cert` and `key`; `ca` trusted for `https://` senders.
    pub tls: dci_proto::tls::TlsConfig,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            listen: "127.0.0.1:7500".parse().expect("static address"),
            upstream: Vec::new(),
            upstream_groups: Vec::new(),
            region: "default".into(),
            node_id: String::new(),
            ring_bytes: 64 << 20,
            window_bytes: 4 << 20,
            max_receivers: 0,
            peer_timeout: Duration::from_secs(3),
            compression: false,
            max_key_len: dci_proto::types::DEFAULT_MAX_KEY_LEN,
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

impl RelayConfig {
    /// The failover lists to follow, one link each: `upstream`, then `upstream_groups`.
    pub fn groups(&self) -> Vec<Vec<String>> {
        std::iter::once(self.upstream.clone())
            .chain(self.upstream_groups.iter().cloned())
            .collect()
    }

    /// Check the values.
    pub fn validate(self) -> Result<Self, ConfigError> {
        if self.upstream.is_empty() {
            return Err(ConfigError(
                "a relay needs at least one upstream URL".into(),
            ));
        }
        // Which group each sender is in: two links to one sender would take its shards twice.
        let mut group_of = std::collections::HashMap::new();
        for (i, group) in self.groups().iter().enumerate() {
            if group.is_empty() {
                return Err(ConfigError(format!("upstream group {i} is empty")));
            }
            for u in group {
                if !(u.starts_with("http://") || u.starts_with("https://")) {
                    return Err(ConfigError(format!(
                        "upstream {u:?} is not an http(s):// URL"
                    )));
                }
                if *group_of.entry(u.clone()).or_insert(i) != i {
                    return Err(ConfigError(format!(
                        "upstream {u:?} is in two groups (each group is followed on its own link)"
                    )));
                }
            }
        }
        if self.ring_bytes < 4096 {
            return Err(ConfigError("ring_bytes must be at least 4096".into()));
        }
        if self.window_bytes < 1024 {
            return Err(ConfigError("window_bytes must be at least 1024".into()));
        }
        if self.peer_timeout < dci_proto::upstream::MIN_PEER_TIMEOUT {
            return Err(ConfigError(format!(
                "peer_timeout must be at least {:?} (two of a sender's heartbeats)",
                dci_proto::upstream::MIN_PEER_TIMEOUT
            )));
        }
        dci_proto::types::check_max_key_len(self.max_key_len).map_err(ConfigError)?;
        dci_proto::types::check_duration("peer_timeout", self.peer_timeout).map_err(ConfigError)?;
        self.otlp.check().map_err(ConfigError)?;
        self.tls
            .validate()
            .map_err(|e| ConfigError(e.to_string()))?;
        Ok(self)
    }
}
