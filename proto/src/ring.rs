//! The hash ring of node ids: relays use it to filter by ownership, the SDK to route requests,
//! so both must agree bit for bit. Built on `hashring`, with virtual nodes for balance.

use std::hash::{Hash, Hasher};

use hashring::HashRing;

/// Points per node on the ring: enough for an even spread over a handful of nodes.
const VNODES: u16 = 64;

#[derive(Clone, Debug, PartialEq, Eq)]
struct VNode {
    node: usize,
    id_hash: u64,
    idx: u16,
}

impl Hash for VNode {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.id_hash.hash(state);
        self.idx.hash(state);
    }
}

/// A consistent-hash ring over node ids.
#[derive(Clone)]
pub struct NodeRing {
    nodes: Vec<String>,
    ring: HashRing<VNode>,
}

impl std::fmt::Debug for NodeRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeRing")
            .field("nodes", &self.nodes)
            .finish()
    }
}

fn stable_hash(s: &str) -> u64 {
    // The ring must be the same in every process: SipHash with fixed keys, as `hashring` uses.
    #[allow(deprecated)]
    let mut h = std::hash::SipHasher::new();
    s.hash(&mut h);
    h.finish()
}

impl NodeRing {
    /// A ring over `nodes` (duplicates are ignored).
    pub fn new(mut nodes: Vec<String>) -> Self {
        nodes.sort();
        nodes.dedup();
        let mut ring = HashRing::new();
        for (i, id) in nodes.iter().enumerate() {
            let id_hash = stable_hash(id);
            for idx in 0..VNODES {
                ring.add(VNode {
                    node: i,
                    id_hash,
                    idx,
                });
            }
        }
        NodeRing { nodes, ring }
    }

    /// The node ids on the ring, sorted.
    pub fn nodes(&self) -> &[String] {
        &self.nodes
    }

    /// Up to `replication` distinct owners of `key`, primary first.
    pub fn owners(&self, key: &[u8], replication: usize) -> Vec<&str> {
        let want = replication.clamp(1, self.nodes.len().max(1));
        let mut out: Vec<&str> = Vec::with_capacity(want);
        // Probe the ring at (key, 0), (key, 1)...: stable for a key, and distinct owners quickly.
        for probe in 0..(want as u32 * 8) {
            let Some(v) = self.ring.get(&(key, probe)) else {
                break;
            };
            let id = self.nodes[v.node].as_str();
            if !out.contains(&id) {
                out.push(id);
                if out.len() == want {
                    break;
                }
            }
        }
        out
    }

    /// The primary owner of `key`.
    pub fn primary(&self, key: &[u8]) -> Option<&str> {
        self.ring
            .get(&(key, 0u32))
            .map(|v| self.nodes[v.node].as_str())
    }

    /// Is `node` one of the `replication` owners of `key`?
    pub fn is_owner(&self, key: &[u8], node: &str, replication: usize) -> bool {
        if replication <= 1 {
            return self.primary(key) == Some(node);
        }
        self.owners(key, replication).contains(&node)
    }
}

/// The shard map: a hash ring over shard ids, shared by the SDK (to route publishes) and the
/// coordinators (to check that a key belongs to them).
#[derive(Clone, Debug)]
pub struct ShardMap {
    ring: NodeRing,
}

impl ShardMap {
    /// A map over shards `0..count`.
    pub fn new(count: u32) -> Self {
        ShardMap {
            ring: NodeRing::new((0..count.max(1)).map(|s| s.to_string()).collect()),
        }
    }

    /// How many shards there are.
    pub fn count(&self) -> u32 {
        self.ring.nodes().len() as u32
    }

    /// The shard that owns `key`.
    pub fn shard_of(&self, key: &[u8]) -> u32 {
        self.ring
            .primary(key)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_are_distinct_and_stable() {
        let ring = NodeRing::new(vec!["a".into(), "b".into(), "c".into()]);
        let again = NodeRing::new(vec!["c".into(), "b".into(), "a".into()]);
        for i in 0..200 {
            let k = format!("k{i}");
            let o = ring.owners(k.as_bytes(), 2);
            assert_eq!(o.len(), 2);
            assert_ne!(o[0], o[1]);
            assert_eq!(o, again.owners(k.as_bytes(), 2));
            assert_eq!(Some(o[0]), ring.primary(k.as_bytes()));
        }
    }

    #[test]
    fn spread_is_reasonable() {
        let ring = NodeRing::new((0..4).map(|i| format!("n{i}")).collect());
        let mut counts = std::collections::HashMap::new();
        for i in 0..4000 {
            *counts
                .entry(ring.primary(format!("user:{i}").as_bytes()).unwrap())
                .or_insert(0) += 1;
        }
        assert_eq!(counts.len(), 4);
        assert!(counts.values().all(|&c| c > 500), "{counts:?}");
    }

    #[test]
    fn shard_map_covers_every_shard() {
        let m = ShardMap::new(3);
        let mut seen = std::collections::HashSet::new();
        for i in 0..300 {
            seen.insert(m.shard_of(format!("k{i}").as_bytes()));
        }
        assert_eq!(seen.len(), 3);
        assert_eq!(ShardMap::new(1).shard_of(b"x"), 0);
    }
}
