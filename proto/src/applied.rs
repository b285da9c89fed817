//! Whether published invalidations have reached every cache, read from the tree that
//! `Admin.Status` reports. Pure: the caller fetches the tree and decides how long to wait.
//!
//! A cache that does not confirm (stopped, cut off, crashed, stuck behind its relay) is waited
//! for only up to its staleness bound: a cache serves a value only while it has been caught up
//! with the coordinator within its bound, and caught up after the publish means it applied it;
//! so once the bound has passed since the publish was answered, it can no longer serve anything
//! the publish invalidated, whether it ever confirms or not.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::pb;
use crate::types::printable;
use crate::{Epoch, Seq, ShardId};

/// The roles of nodes that serve values, and so must have applied an invalidation before it
/// has taken effect (relays and `dci follow` serve none).
pub const CACHE_ROLES: [&str; 2] = ["edge", "near-cache"];

/// What a shard answered a publish: everything up to `seq` in `epoch` is logged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Published {
    /// The shard.
    pub shard: ShardId,
    /// The shard log's epoch when it answered.
    pub epoch: Epoch,
    /// The highest seq it gave.
    pub seq: Seq,
}

/// Keep, per shard, the highest of what was answered.
pub fn note(published: &mut Vec<Published>, p: Published) {
    match published.iter_mut().find(|q| q.shard == p.shard) {
        Some(q) if (q.epoch, q.seq) >= (p.epoch, p.seq) => {}
        Some(q) => *q = p,
        None => published.push(p),
    }
}

/// A cache that has not applied a shard's invalidations yet, as its latest report says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lagging {
    /// The cache's node id; for caches a sender's report had no room for, how many and whose
    /// report (`120 edges of eu left out by relay-eu-1`: of them, the least advanced).
    pub node_id: String,
    /// Its region.
    pub region: String,
    /// The shard it lags on.
    pub shard: ShardId,
    /// The seq it must reach, in the published epoch.
    pub seq: Seq,
    /// What it reported (`None`: it is no longer in the tree).
    pub at: Option<(Epoch, Seq)>,
    /// Its staleness bound, as it reported it (`None`: it does not say).
    pub bound: Option<Duration>,
    /// Not a cache seen, but those that followed a coordinator before it restarted and may not
    /// be back yet (`node_id` names the coordinator): they are not counted among the caches.
    pub unseen: bool,
}

impl std::fmt::Display for Lagging {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", printable(&self.node_id))?;
        if !self.region.is_empty() {
            write!(f, " ({})", printable(&self.region))?;
        }
        match self.at {
            None if self.unseen => write!(f, " (not all back yet)"),
            None => write!(f, " no longer reported"),
            Some((_, hwm)) => write!(f, " at seq {hwm} of {} on shard {}", self.seq, self.shard),
        }
    }
}

/// The caches seen so far and how far each has applied: fed a tree at a time, it tells which
/// caches still lack a publish. A cache once seen and then missing from the tree (stopped,
/// cut off, failing over) still lacks it: it may still hold what was invalidated, and serve it
/// until its staleness bound.
#[derive(Debug, Default)]
pub struct Coverage {
    caches: BTreeMap<String, Cache>,
    /// Per shard, the epoch of its log now, as its coordinator reports it.
    logs: BTreeMap<ShardId, Epoch>,
    /// Coordinators that restarted on their log, while their tree may lack caches of before.
    restarts: BTreeMap<String, Restart>,
}

/// A coordinator that started again on its log (see [`pb::NodeStatus::restarted`]).
#[derive(Debug)]
struct Restart {
    shards: Vec<ShardId>,
    /// Its uptime when first seen by this coverage, and in the last tree.
    first: Duration,
    last: Duration,
}

/// The staleness bound assumed for the caches a restarted coordinator may not hear from again
/// (they do not say theirs): the edges' and near caches' default, unless a longer one is seen.
pub const UNKNOWN_BOUND: Duration = Duration::from_secs(5);

#[derive(Debug, Default)]
struct Cache {
    region: String,
    /// How many caches it stands for, if it is a summary of those a report had no room for
    /// (see [`pb::NodeStatus::left_out`]); 0 for one cache.
    left_out: u32,
    /// In the last tree.
    reported: bool,
    /// Per shard, the furthest (epoch, hwm) in the last tree.
    shards: BTreeMap<ShardId, (Epoch, Seq)>,
    /// Its staleness bound, as last reported (kept while it is missing).
    bound: Option<Duration>,
}

impl Coverage {
    /// Take the latest tree: every cache in it, with its furthest progress per shard (a cache
    /// reported by two senders, while it moves from one to the other, counts once).
    pub fn update(&mut self, nodes: &[pb::NodeStatus]) {
        for c in self.caches.values_mut() {
            c.reported = false;
            c.shards.clear();
        }
        self.logs.clear();
        for n in nodes {
            // A coordinator's own row (a report from below has a parent).
            if n.role == "coordinator" && n.parent.is_empty() {
                self.logs
                    .extend(n.shards.iter().map(|s| (s.shard, s.epoch)));
                let up = Duration::from_millis(n.connected_ms);
                if n.restarted {
                    let r = self.restarts.entry(n.node_id.clone()).or_insert(Restart {
                        shards: Vec::new(),
                        first: up,
                        last: up,
                    });
                    r.shards = n.shards.iter().map(|s| s.shard).collect();
                    r.last = up;
                }
            }
            if !CACHE_ROLES.contains(&n.role.as_str()) {
                continue;
            }
            let c = self.caches.entry(n.node_id.clone()).or_default();
            c.region.clone_from(&n.region);
            c.left_out = n.left_out;
            c.reported = true;
            if n.max_staleness_ms > 0 {
                c.bound = Some(Duration::from_millis(n.max_staleness_ms));
            }
            for s in &n.shards {
                let at = c.shards.entry(s.shard).or_insert((s.epoch, s.hwm));
                *at = (*at).max((s.epoch, s.hwm));
            }
        }
    }

    /// How many caches have been seen (those summed up in a report counted one by one).
    pub fn caches(&self) -> usize {
        self.caches
            .values()
            .map(|c| c.left_out.max(1) as usize)
            .sum()
    }

    /// The regions of the caches seen, each once, in order (a summary of several regions
    /// names none).
    pub fn regions(&self) -> Vec<&str> {
        let mut r: Vec<&str> = self
            .caches
            .values()
            .filter(|c| c.left_out == 0 || !c.region.is_empty())
            .map(|c| c.region.as_str())
            .collect();
        r.sort_unstable();
        r.dedup();
        r
    }

    /// Has a cache at `at` applied `p`? Past its seq in its epoch, or in the epoch of the
    /// shard's log now, which it entered by dropping all it held of the shard after the log
    /// that took `p` was replaced. Not in any other epoch: one that is no log's now (a cache
    /// not yet in the log of a coordinator started anew, whose epoch may even be lower, its
    /// machine's clock behind). Without the coordinator's word, any later epoch.
    fn has_applied(&self, p: &Published, at: (Epoch, Seq)) -> bool {
        if at.0 == p.epoch {
            return at.1 >= p.seq;
        }
        match self.logs.get(&p.shard) {
            Some(&now) => at.0 == now,
            None => at.0 > p.epoch,
        }
    }

    /// How long a restarted coordinator's tree may lack caches of before: the longest bound of
    /// the caches seen (or [`UNKNOWN_BOUND`]), from its start. A cache that followed it before
    /// its restart was caught up no later than then, so past that it serves nothing of before.
    fn settling(&self) -> Duration {
        self.caches
            .values()
            .filter_map(|c| c.bound)
            .fold(UNKNOWN_BOUND, Duration::max)
    }

    /// Every cache that has not applied `published`, as of the last tree (see `has_applied`).
    /// A cache in the tree that does not follow the shard (yet) holds none of its keys; one
    /// missing from the tree lacks every shard. A coordinator that restarted less than the
    /// longest staleness bound of the caches seen (or [`UNKNOWN_BOUND`]) ago stands for the
    /// caches that followed it before and have not been reported since: they lag, no longer
    /// reported, until that long after its start.
    pub fn lagging(&self, published: &[Published]) -> Vec<Lagging> {
        let mut out = Vec::new();
        let settling = self.settling();
        for (id, r) in &self.restarts {
            if r.last >= settling {
                continue;
            }
            for p in published.iter().filter(|p| r.shards.contains(&p.shard)) {
                out.push(Lagging {
                    node_id: format!("caches that followed {id} before its restart"),
                    region: String::new(),
                    shard: p.shard,
                    seq: p.seq,
                    at: None,
                    // From the start of the wait, which came `first` after the restart.
                    bound: Some(settling.saturating_sub(r.first)),
                    unseen: true,
                });
            }
        }
        for (node_id, c) in &self.caches {
            for p in published {
                let at = if !c.reported {
                    None
                } else {
                    match c.shards.get(&p.shard) {
                        None => continue,
                        Some(&at) if self.has_applied(p, at) => continue,
                        Some(&at) => Some(at),
                    }
                };
                out.push(Lagging {
                    node_id: match c.left_out {
                        0 => node_id.clone(),
                        n => format!("{n} {node_id}"),
                    },
                    region: c.region.clone(),
                    shard: p.shard,
                    seq: p.seq,
                    at,
                    bound: c.bound,
                    unseen: false,
                });
                if at.is_none() {
                    break;
                }
            }
        }
        out
    }
}

/// How the wait of [`wait`] ended.
#[derive(Debug)]
pub enum Outcome<E> {
    /// Every cache has applied everything published, but these, which had not when they were
    /// last reported, and are past their staleness bounds since the publish was answered: they
    /// serve nothing it invalidated.
    Applied {
        /// The caches that did not confirm, each past its bound.
        past_bound: Vec<Lagging>,
    },
    /// The time was up with these caches short of it (as the last tree read said).
    NotApplied(Vec<Lagging>),
    /// No tree could be read in the time: the last error, if a read failed (else they timed out).
    Unread(Option<E>),
}

/// How often [`wait`] reads the tree (a relay reports its own every half second, a sender its
/// receivers' acks at once).
pub const WAIT_POLL: Duration = Duration::from_millis(100);

/// [`wait`] waits this many times as long as its last read of the tree took before the next
/// (and at least [`WAIT_POLL`]).
pub const WAIT_READING_SHARE: u32 = 10;

/// How long past a cache's staleness bound [`wait`] still waits for it. The cache measures its
/// bound from when it sent the probe it last caught up by, which is no later than that; the wait
/// measures from once the publish was answered, which is after it was logged. The margin covers
/// the bound's rounding in reports and the drift of one clock against the other.
pub const BOUND_SLACK: Duration = Duration::from_millis(500);

/// Of `lagging`, (those past their bound `elapsed` after the publish was answered, the others).
pub fn past_bound(lagging: Vec<Lagging>, elapsed: Duration) -> (Vec<Lagging>, Vec<Lagging>) {
    lagging.into_iter().partition(|l| {
        l.bound
            .is_some_and(|b| elapsed > b.saturating_add(BOUND_SLACK))
    })
}

/// Read the tree (`tree`) every [`WAIT_POLL`] into `coverage` until every cache has applied
/// `published` or is past its staleness bound (see [`past_bound`]), or until `deadline`: no
/// read goes past it. Call it once `published` is answered: the bounds run from then.
pub async fn wait<E, F, Fut>(
    coverage: &mut Coverage,
    published: &[Published],
    deadline: tokio::time::Instant,
    mut tree: F,
) -> Outcome<E>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Vec<pb::NodeStatus>, E>>,
{
    let answered = tokio::time::Instant::now();
    let (mut read, mut failed) = (false, None);
    loop {
        let asked = tokio::time::Instant::now();
        match tokio::time::timeout_at(deadline, tree()).await {
            Ok(Ok(nodes)) => {
                coverage.update(&nodes);
                read = true;
            }
            Ok(Err(e)) => failed = Some(e),
            Err(_) => {}
        }
        let now = tokio::time::Instant::now();
        // A tree read and then lost still names who lagged then; their bounds still run.
        if read {
            let (past, lagging) = past_bound(
                coverage.lagging(published),
                now.saturating_duration_since(answered),
            );
            if lagging.is_empty() {
                return Outcome::Applied { past_bound: past };
            }
            if now >= deadline {
                return Outcome::NotApplied(lagging);
            }
        } else if now >= deadline {
            return Outcome::Unread(failed);
        }
        // A tree of thousands of nodes takes the coordinators milliseconds to report: reading
        // it at most a tenth of the time keeps many waits from loading them.
        let poll = WAIT_POLL.max(now.saturating_duration_since(asked) * WAIT_READING_SHARE);
        tokio::time::sleep(poll.min(deadline - now)).await;
    }
}

/// The lagging caches as one line: the first ten, then how many more.
pub fn named(lagging: &[Lagging]) -> String {
    const NAMED: usize = 10;
    let mut s: Vec<String> = lagging.iter().take(NAMED).map(Lagging::to_string).collect();
    if lagging.len() > NAMED {
        s.push(format!("and {} more", lagging.len() - NAMED));
    }
    s.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(
        id: &str,
        role: &str,
        region: &str,
        shards: &[(ShardId, Epoch, Seq)],
    ) -> pb::NodeStatus {
        pb::NodeStatus {
            node_id: id.into(),
            role: role.into(),
            region: region.into(),
            // A coordinator's own row has none.
            parent: if role == "coordinator" { "" } else { "r" }.into(),
            shards: shards
                .iter()
                .map(|&(shard, epoch, hwm)| pb::ShardProgress {
                    shard,
                    epoch,
                    hwm,
                    ..Default::default()
                })
                .collect(),
            connected_ms: 0,
            max_staleness_ms: 0,
            left_out: 0,
            restarted: false,
            failure: String::new(),
        }
    }

    fn ids(l: &[Lagging]) -> Vec<&str> {
        l.iter().map(|l| l.node_id.as_str()).collect()
    }

    const P: Published = Published {
        shard: 0,
        epoch: 5,
        seq: 100,
    };

    #[test]
    fn only_caches_short_of_the_seq_in_its_epoch_lag() {
        let mut c = Coverage::default();
        c.update(&[
            // Started anew since the publish, on a log it could not trust (epoch 6).
            node("c", "coordinator", "", &[(0, 6, 1)]),
            node("r", "relay", "eu", &[(0, 5, 90)]),
            node("f", "follow", "", &[(0, 5, 10)]),
            node("at", "edge", "eu", &[(0, 5, 100)]),
            node("past", "near-cache", "us", &[(0, 5, 101)]),
            node("short", "edge", "eu", &[(0, 5, 99)]),
            node("old-epoch", "edge", "us", &[(0, 4, 500)]),
            node("new-epoch", "edge", "us", &[(0, 6, 1)]),
        ]);
        assert_eq!(
            c.caches(),
            5,
            "relays, coordinators and followers serve no value"
        );
        assert_eq!(c.regions(), ["eu", "us"]);
        let l = c.lagging(&[P]);
        assert_eq!(ids(&l), ["old-epoch", "short"]);
        assert_eq!(l[1].to_string(), "short (eu) at seq 99 of 100 on shard 0");
    }

    /// A cache in an epoch that is no log's now has not applied a publish, whichever the number:
    /// the log that took it may have a lower epoch than the one it replaced.
    #[test]
    fn a_cache_in_an_epoch_that_is_no_logs_now_lags() {
        let published = Published {
            shard: 0,
            epoch: 1000,
            seq: 1,
        };
        let mut c = Coverage::default();
        c.update(&[
            node("c", "coordinator", "", &[(0, 1000, 1)]),
            node("behind", "edge", "eu", &[(0, 1_700_000, 3)]),
            node("in", "edge", "eu", &[(0, 1000, 1)]),
        ]);
        assert_eq!(ids(&c.lagging(&[published])), ["behind"]);
        // Without the coordinator's word, a later epoch is taken for a later log.
        let mut c = Coverage::default();
        c.update(&[node("behind", "edge", "eu", &[(0, 1_700_000, 3)])]);
        assert!(c.lagging(&[published]).is_empty());
    }

    /// A coordinator that restarted on its log stands for the caches that followed it before,
    /// until the longest bound it knows of has passed since its start.
    #[test]
    fn a_restarted_coordinator_stands_for_the_caches_of_before_for_a_bound() {
        let coordinator = |up_ms: u64, restarted: bool| pb::NodeStatus {
            connected_ms: up_ms,
            restarted,
            ..node("c", "coordinator", "", &[(0, 5, 120)])
        };
        let mut c = Coverage::default();
        c.update(&[coordinator(1_200, true)]);
        let l = c.lagging(&[P]);
        assert_eq!(ids(&l), ["caches that followed c before its restart"]);
        assert_eq!(
            l[0].bound,
            Some(UNKNOWN_BOUND - Duration::from_millis(1_200))
        );
        assert_eq!(
            l[0].to_string(),
            "caches that followed c before its restart (not all back yet)"
        );
        assert_eq!(c.caches(), 0, "no cache counted for them");
        // A cache with a longer bound reports: the coordinator stands for others as long.
        c.update(&[
            coordinator(5_100, true),
            pb::NodeStatus {
                max_staleness_ms: 8_000,
                ..node("e", "edge", "eu", &[(0, 5, 120)])
            },
        ]);
        assert_eq!(c.lagging(&[P])[0].bound, Some(Duration::from_millis(6_800)));
        c.update(&[coordinator(8_000, true)]);
        assert!(
            ids(&c.lagging(&[P])) == ["e"],
            "settled: only the cache seen"
        );
        // Not for a shard it does not carry, nor once settled, nor when it did not restart.
        let mut c = Coverage::default();
        c.update(&[coordinator(100, true)]);
        let other = Published { shard: 1, ..P };
        assert!(c.lagging(&[other]).is_empty());
        let mut c = Coverage::default();
        c.update(&[coordinator(100, false)]);
        assert!(c.lagging(&[P]).is_empty());
        // A report from below that calls itself a coordinator is not one.
        let mut c = Coverage::default();
        c.update(&[pb::NodeStatus {
            parent: "relay".into(),
            ..coordinator(100, true)
        }]);
        assert!(c.lagging(&[P]).is_empty());
    }

    /// Caches a relay's report had no room for come as one summary: counted one by one, and
    /// waited for as the least advanced of them.
    #[test]
    fn caches_summed_up_in_a_report_count_each_and_lag_as_their_least_advanced() {
        let summary = |hwm| pb::NodeStatus {
            left_out: 120,
            parent: "relay-top".into(),
            ..node(
                "edges of eu left out by relay-top",
                "edge",
                "eu",
                &[(0, 5, hwm)],
            )
        };
        let mixed = pb::NodeStatus {
            left_out: 3,
            ..node(
                "near-caches left out by relay-top",
                "near-cache",
                "",
                &[(0, 5, 100)],
            )
        };
        let mut c = Coverage::default();
        c.update(&[node("a", "edge", "us", &[(0, 5, 100)]), summary(99), mixed]);
        assert_eq!(c.caches(), 1 + 120 + 3);
        assert_eq!(
            c.regions(),
            ["eu", "us"],
            "a summary of several regions names none"
        );
        let l = c.lagging(&[P]);
        assert_eq!(
            l.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["120 edges of eu left out by relay-top (eu) at seq 99 of 100 on shard 0"]
        );
        c.update(&[node("a", "edge", "us", &[(0, 5, 100)]), summary(100)]);
        assert_eq!(
            c.lagging(&[P]).len(),
            1,
            "the other summary is no longer reported"
        );
        assert!(c.lagging(&[P])[0].at.is_none());
    }

    #[test]
    fn a_cache_reported_twice_counts_once_at_its_furthest() {
        let mut c = Coverage::default();
        c.update(&[
            node("e", "edge", "eu", &[(0, 5, 40)]),
            node("e", "edge", "eu", &[(0, 5, 100)]),
        ]);
        assert_eq!(c.caches(), 1);
        assert!(c.lagging(&[P]).is_empty());
    }

    #[test]
    fn a_cache_gone_from_the_tree_is_waited_for_until_it_is_back() {
        let mut c = Coverage::default();
        c.update(&[
            node("a", "edge", "eu", &[(0, 5, 50)]),
            node("b", "edge", "eu", &[(0, 5, 50)]),
        ]);
        c.update(&[node("a", "edge", "eu", &[(0, 5, 100)])]);
        let l = c.lagging(&[
            P,
            Published {
                shard: 1,
                epoch: 2,
                seq: 3,
            },
        ]);
        assert_eq!(
            ids(&l),
            ["b"],
            "one line for a missing cache, not one per shard"
        );
        assert_eq!(l[0].at, None);
        assert_eq!(l[0].to_string(), "b (eu) no longer reported");
        c.update(&[
            node("a", "edge", "eu", &[(0, 5, 100)]),
            node("b", "edge", "eu", &[(0, 5, 100)]),
        ]);
        assert!(c.lagging(&[P]).is_empty());
    }

    #[test]
    fn every_shard_published_to_must_be_applied() {
        let mut c = Coverage::default();
        let q = Published {
            shard: 1,
            epoch: 7,
            seq: 9,
        };
        c.update(&[
            node("both", "edge", "eu", &[(0, 5, 100), (1, 7, 8)]),
            node("only-0", "edge", "eu", &[(0, 5, 100)]),
        ]);
        let l = c.lagging(&[P, q]);
        assert_eq!(
            ids(&l),
            ["both"],
            "a cache not following a shard holds none of its keys"
        );
        assert_eq!(l[0].shard, 1);
        c.update(&[node("both", "edge", "eu", &[(0, 5, 100), (1, 7, 9)])]);
        assert_eq!(ids(&c.lagging(&[P, q])), ["only-0"], "gone from the tree");
    }

    /// The wait reads trees until every cache has applied, goes on through reads that fail,
    /// and at its deadline says who lagged in the last tree read, or why none was.
    #[tokio::test]
    async fn the_wait_ends_applied_or_says_who_lags_or_why_no_tree_was_read() {
        use std::time::Duration;
        let soon = || tokio::time::Instant::now() + Duration::from_millis(300);
        let behind = vec![node("e", "edge", "eu", &[(0, 5, 99)])];
        let applied = vec![node("e", "edge", "eu", &[(0, 5, 100)])];

        let mut reads = vec![Ok(applied), Ok(behind.clone()), Err("refused")]
            .into_iter()
            .rev();
        let far = tokio::time::Instant::now() + Duration::from_secs(30);
        let mut c = Coverage::default();
        let got = wait(&mut c, &[P], far, || {
            std::future::ready(reads.next().unwrap())
        })
        .await;
        assert!(
            matches!(&got, Outcome::Applied { past_bound } if past_bound.is_empty()),
            "{got:?}"
        );

        let mut reads = vec![Ok(behind)].into_iter();
        let mut c = Coverage::default();
        let got = wait(&mut c, &[P], soon(), || {
            std::future::ready(reads.next().unwrap_or(Err("gone")))
        })
        .await;
        let Outcome::NotApplied(l) = got else {
            panic!("{got:?}")
        };
        assert_eq!(ids(&l), ["e"], "as the last tree read said");

        let mut c = Coverage::default();
        let got = wait(&mut c, &[P], soon(), || {
            std::future::ready(Err::<Vec<_>, _>("refused"))
        })
        .await;
        assert!(matches!(got, Outcome::Unread(Some("refused"))), "{got:?}");
        let got: Outcome<()> = wait(&mut c, &[P], soon(), std::future::pending).await;
        assert!(
            matches!(got, Outcome::Unread(None)),
            "a read that never ends ends at the deadline"
        );
    }

    /// Reads of the tree that always answer `nodes`.
    fn always(
        nodes: Vec<pb::NodeStatus>,
    ) -> impl FnMut() -> std::future::Ready<Result<Vec<pb::NodeStatus>, ()>> {
        move || std::future::ready(Ok(nodes.clone()))
    }

    /// The tree is read every [`WAIT_POLL`], or, when reading it takes long (thousands of
    /// nodes), ten times as long as that apart.
    #[tokio::test(start_paused = true)]
    async fn a_tree_slow_to_read_is_read_less_often() {
        let lagging = vec![node("e", "edge", "eu", &[(0, 5, 99)])];
        for (read_takes, at_most, at_least) in [(0, 101, 95), (100, 10, 8)] {
            let reads = std::sync::atomic::AtomicUsize::new(0);
            let tree = || {
                reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let nodes = lagging.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(read_takes)).await;
                    Ok::<_, ()>(nodes)
                }
            };
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            let outcome = wait(&mut Coverage::default(), &[P], deadline, tree).await;
            assert!(matches!(outcome, Outcome::NotApplied(_)));
            let reads = reads.into_inner();
            assert!(
                (at_least..=at_most).contains(&reads),
                "{reads} reads taking {read_takes} ms each in 10 s"
            );
        }
    }

    /// A cache that does not confirm (stuck, or gone from the tree) is waited for until its
    /// staleness bound and the margin have passed since the wait began, and no longer; one that
    /// does not say its bound, to the deadline.
    #[tokio::test(start_paused = true)]
    async fn a_cache_past_its_bound_since_the_publish_no_longer_holds_the_wait() {
        let bounded = |id: &str, ms: u64| pb::NodeStatus {
            max_staleness_ms: ms,
            ..node(id, "edge", "eu", &[(0, 5, 99)])
        };
        let bound = Duration::from_secs(2);
        let far = || tokio::time::Instant::now() + Duration::from_secs(30);
        let tree = vec![
            bounded("stuck", 2_000),
            node("done", "edge", "eu", &[(0, 5, 100)]),
        ];
        let mut c = Coverage::default();
        let began = tokio::time::Instant::now();
        let got = wait(&mut c, &[P], far(), always(tree)).await;
        let took = began.elapsed();
        let Outcome::Applied { past_bound } = got else {
            panic!("{got:?}")
        };
        assert_eq!(ids(&past_bound), ["stuck"]);
        assert_eq!(past_bound[0].bound, Some(bound));
        assert!(took > bound + BOUND_SLACK, "{took:?}");
        assert!(took <= bound + BOUND_SLACK + WAIT_POLL, "{took:?}");

        let mut c = Coverage::default();
        c.update(&[bounded("gone", 1_000), bounded("done", 1_000)]);
        let began = tokio::time::Instant::now();
        let done = node("done", "edge", "eu", &[(0, 5, 100)]);
        let got = wait(&mut c, &[P], far(), always(vec![done])).await;
        let Outcome::Applied { past_bound } = got else {
            panic!("{got:?}")
        };
        assert_eq!(ids(&past_bound), ["gone"], "its bound as last reported");
        assert_eq!(past_bound[0].at, None);
        assert!(began.elapsed() > Duration::from_secs(1) + BOUND_SLACK);

        let mut c = Coverage::default();
        let began = tokio::time::Instant::now();
        let silent = node("silent", "edge", "eu", &[(0, 5, 99)]);
        let got = wait(
            &mut c,
            &[P],
            began + Duration::from_secs(10),
            always(vec![silent]),
        )
        .await;
        let Outcome::NotApplied(l) = got else {
            panic!("{got:?}")
        };
        assert_eq!(ids(&l), ["silent"], "no bound: waited for to the deadline");
        assert_eq!(began.elapsed(), Duration::from_secs(10));
    }

    #[test]
    fn at_most_ten_lagging_caches_are_named() {
        let l = |i: usize| Lagging {
            node_id: format!("e{i}"),
            region: String::new(),
            shard: 0,
            seq: 9,
            at: Some((1, 8)),
            bound: None,
            unseen: false,
        };
        assert_eq!(named(&[l(0)]), "e0 at seq 8 of 9 on shard 0");
        let many: Vec<Lagging> = (0..12).map(l).collect();
        assert!(named(&many).starts_with("e0 at seq 8 of 9 on shard 0, e1 "));
        assert!(named(&many).ends_with("e9 at seq 8 of 9 on shard 0, and 2 more"));
    }

    #[test]
    fn the_highest_answer_per_shard_is_kept() {
        let mut p = Vec::new();
        note(&mut p, P);
        note(&mut p, Published { seq: 90, ..P });
        note(
            &mut p,
            Published {
                shard: 1,
                epoch: 1,
                seq: 1,
            },
        );
        note(&mut p, Published { seq: 110, ..P });
        assert_eq!(
            p,
            [
                Published { seq: 110, ..P },
                Published {
                    shard: 1,
                    epoch: 1,
                    seq: 1
                }
            ]
        );
    }
}
