//! The cache client: a hash ring over the edges of a region.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use dci_proto::pb;
use dci_proto::pb::cache_client::CacheClient as RawClient;
use dci_proto::ring::NodeRing;
use tonic::transport::Channel;

use crate::turn::{Loading, Turn};
use crate::{ClientTls, Error, Fill};

/// The answer to a get.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// The cached value.
    Hit(Bytes),
    /// Not cached; fill with this lease so a fill older than a later invalidation is refused.
    Miss {
        /// Lease to pass to [`CacheClient::set`].
        lease: u64,
    },
}

/// An edge's answer to a get.
struct Found {
    lookup: Lookup,
    /// False when the edge serves only misses for now (cut off past its staleness bound): a
    /// fill would not be read from it.
    serves: bool,
}

/// How long an edge that could not be reached is passed over for reads and fills: a dead or
/// stuck edge costs one caller the timeout, not every caller in turn (the next owner answers,
/// or `get_or_load` goes to its loader at once).
const PASSED_OVER_FOR: Duration = Duration::from_secs(2);

/// Most keys [`CacheClient::get_many`] asks of one edge in one request (an edge takes up to
/// 10,000): the answer of a request of big values stays a size a client takes at once.
pub const GET_MANY_CHUNK: usize = 1_000;

/// Most bytes of keys and values one SetMany carries: half of what an edge decodes in one
/// request with its default `max_value_len` (8 MiB).
pub const SET_MANY_BYTES: usize = 4 << 20;

/// Runs of `idx` of at most [`GET_MANY_CHUNK`] entries and [`SET_MANY_BYTES`] (by `bytes`), in
/// their order; an entry larger than that alone.
fn set_many_chunks(idx: &[usize], bytes: impl Fn(usize) -> usize) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut run_bytes = 0;
    for &i in idx {
        let b = bytes(i);
        match out.last_mut() {
            Some(run) if run.len() < GET_MANY_CHUNK && run_bytes + b <= SET_MANY_BYTES => {
                run.push(i);
                run_bytes += b;
            }
            _ => {
                out.push(vec![i]);
                run_bytes = b;
            }
        }
    }
    out
}

/// The edges a client knows, by node id: the ring over them, and each one's URL and channel.
struct Members {
    ring: NodeRing,
    edges: HashMap<String, (String, RawClient<Channel>)>,
}

/// Talks to the edges of one region; clone it freely.
#[derive(Clone)]
pub struct CacheClient {
    /// Replaced whole by [`CacheClient::set_edges`]; each call works on the edges as they were
    /// when it began.
    members: Arc<RwLock<Arc<Members>>>,
    /// Owners per key: the edges' `replication`.
    replication: usize,
    /// How long the values this client fills live on their edge (None: the edge's `ttl`).
    fill_ttl: Option<Duration>,
    timeout: Duration,
    tls: ClientTls,
    loading: Arc<Loading>,
    /// Edges that could not be reached lately, and until when they are passed over.
    unreachable: Arc<Mutex<HashMap<String, (std::time::Instant, String)>>>,
    /// When a key's edge was last said not to follow it.
    warned_not_followed: Arc<Mutex<Option<std::time::Instant>>>,
}

impl CacheClient {
    /// Edges named by their URLs (the ring is over the URLs).
    pub fn from_urls(urls: Vec<String>) -> Result<CacheClient, Error> {
        Self::new(urls.iter().map(|u| (u.clone(), u.clone())).collect())
    }

    /// Edges as (node id, URL): node ids place them on the ring, and must match the `ring_nodes`
    /// the edges filter with. Each call waits at most 5 s for its answer (see
    /// [`CacheClient::with_timeout`]).
    pub fn new(edges: Vec<(String, String)>) -> Result<CacheClient, Error> {
        Self::with_timeout(edges, Duration::from_secs(5))
    }

    /// Like [`CacheClient::new`], each call waiting at most `timeout` (and connecting within it):
    /// past it, an edge counts as unavailable, and [`CacheClient::get_or_load`] goes to the loader.
    /// An edge that could not be reached is then passed over for 2 s: reads and fills go to the
    /// key's next owner, or `get_or_load` to its loader, without waiting on it again.
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() {
    /// let c = dci_sdk::CacheClient::with_timeout(
    ///     vec![("edge-0".into(), "http://127.0.0.1:7600".into())],
    ///     std::time::Duration::from_millis(50),
    /// );
    /// # let _ = c;
    /// # }
    /// ```
    pub fn with_timeout(
        edges: Vec<(String, String)>,
        timeout: Duration,
    ) -> Result<CacheClient, Error> {
        Self::with_tls(edges, timeout, &ClientTls::default())
    }

    /// Like [`CacheClient::with_timeout`], speaking TLS to `https://` edges as `tls` says (the
    /// CA to trust; by default the system's roots).
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() {
    /// let tls = dci_sdk::ClientTls::with_ca_pem(std::fs::read("ca.pem").unwrap()).unwrap();
    /// let c = dci_sdk::CacheClient::with_tls(
    ///     vec![("edge-0".into(), "https://edge-0.example:7600".into())],
    ///     std::time::Duration::from_secs(5),
    ///     &tls,
    /// );
    /// # let _ = c;
    /// # }
    /// ```
    pub fn with_tls(
        edges: Vec<(String, String)>,
        timeout: Duration,
        tls: &ClientTls,
    ) -> Result<CacheClient, Error> {
        let members = Self::members_of(edges, timeout, tls, None)?;
        Ok(CacheClient {
            members: Arc::new(RwLock::new(Arc::new(members))),
            replication: 1,
            fill_ttl: None,
            timeout,
            tls: tls.clone(),
            loading: Arc::default(),
            unreachable: Arc::default(),
            warned_not_followed: Arc::default(),
        })
    }

    /// The ring and channels for `edges`; the channels of `old` to the same URLs are kept.
    fn members_of(
        edges: Vec<(String, String)>,
        timeout: Duration,
        tls: &ClientTls,
        old: Option<&Members>,
    ) -> Result<Members, Error> {
        if edges.is_empty() {
            return Err(Error::Url(String::new(), "no edge URL".into()));
        }
        let mut map = HashMap::new();
        for (id, url) in &edges {
            if let Some((u, c)) = old.and_then(|o| o.edges.get(id)) {
                if u == url {
                    map.insert(id.clone(), (u.clone(), c.clone()));
                    continue;
                }
            }
            let ch = tls
                .endpoint(url)
                .map_err(|e| Error::Url(url.clone(), e.to_string()))?
                .tcp_nodelay(true)
                .connect_timeout(timeout.min(Duration::from_secs(1)))
                .timeout(timeout)
                .connect_lazy();
            // The edge bounds what it stores (`max_value_len`); a value it hands back is never
            // refused here for its size.
            map.insert(
                id.clone(),
                (
                    url.clone(),
                    RawClient::new(ch).max_decoding_message_size(usize::MAX),
                ),
            );
        }
        Ok(Members {
            ring: NodeRing::new(edges.into_iter().map(|(id, _)| id).collect()),
            edges: map,
        })
    }

    /// Change the edges (as [`CacheClient::new`] takes them), for this client and its clones:
    /// an edge added to the region, or one gone. Calls under way finish with the edges they
    /// began with; connections to edges kept at the same URL are kept. Give the edges' new
    /// `ring_nodes` at the same time, so that keys go where their invalidations go.
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() {
    /// let c = dci_sdk::CacheClient::new(vec![("edge-0".into(), "http://10.0.0.1:7600".into())]).unwrap();
    /// c.set_edges(vec![
    ///     ("edge-0".into(), "http://10.0.0.1:7600".into()),
    ///     ("edge-1".into(), "http://10.0.0.2:7600".into()),
    /// ])
    /// .unwrap();
    /// # }
    /// ```
    pub fn set_edges(&self, edges: Vec<(String, String)>) -> Result<(), Error> {
        let mut members = self.members.write().unwrap_or_else(|e| e.into_inner());
        *members = Arc::new(Self::members_of(
            edges,
            self.timeout,
            &self.tls,
            Some(&members),
        )?);
        Ok(())
    }

    /// Said at most every 10 s: for a moment while a region's edges change, this is normal; for
    /// longer, this client's edges or replication are not the edges' own.
    fn warn_not_followed(&self, why: &str) {
        let now = std::time::Instant::now();
        let mut last = self
            .warned_not_followed
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if last.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(10)) {
            *last = Some(now);
            tracing::warn!(
                %why,
                "loading without the cache: the key's edge does not follow it (are this \
                 client's edges and replication the edges' own?)"
            );
        }
    }

    /// The edges as they are now.
    fn members(&self) -> Arc<Members> {
        self.members
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Keys live on `replication` edges, as the edges' own `replication` (with `ring_nodes`) says:
    /// every one of them receives the key's invalidations, so when the first owner of a key
    /// cannot be reached, reads and fills go to the next, and a delete goes to all of them.
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() {
    /// let ids = ["edge-0", "edge-1", "edge-2"];
    /// let c = dci_sdk::CacheClient::new(
    ///     ids.iter().enumerate().map(|(i, id)| (id.to_string(), format!("http://10.0.0.{i}:7600"))).collect(),
    /// )
    /// .unwrap()
    /// .with_replication(2);
    /// # let _ = c;
    /// # }
    /// ```
    pub fn with_replication(mut self, replication: usize) -> CacheClient {
        self.replication = replication.max(1);
        self
    }

    /// The values this client fills (`set`, `get_or_load`) live `ttl` on their edge, in place
    /// of the edge's own `ttl`. A clone shares the connections: one per kind of data, each with
    /// its time to live, costs nothing more.
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() {
    /// let c = dci_sdk::CacheClient::from_urls(vec!["http://127.0.0.1:7600".into()]).unwrap();
    /// let sessions = c.clone().with_fill_ttl(std::time::Duration::from_secs(60));
    /// # let _ = sessions;
    /// # }
    /// ```
    pub fn with_fill_ttl(mut self, ttl: Duration) -> CacheClient {
        self.fill_ttl = Some(ttl);
        self
    }

    /// Why edge `id` is passed over now (it could not be reached lately), if it is.
    fn passed_over(&self, id: &str) -> Option<String> {
        let mut u = self.unreachable.lock().unwrap_or_else(|e| e.into_inner());
        match u.get(id) {
            Some((until, w)) if std::time::Instant::now() < *until => Some(w.clone()),
            Some(_) => {
                u.remove(id);
                None
            }
            None => None,
        }
    }

    /// Pass edge `id` over for reads and fills for [`PASSED_OVER_FOR`]: it could not be reached.
    fn pass_over(&self, id: &str, why: String) {
        self.unreachable
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                id.to_string(),
                (std::time::Instant::now() + PASSED_OVER_FOR, why),
            );
    }

    /// Ask the key's owners in turn, while they cannot be reached: the first answer, or refusal,
    /// stands. Returns the owner that answered, with the answer.
    async fn first_owner<T, F, Fut>(&self, key: &[u8], mut call: F) -> Result<(String, T), Error>
    where
        F: FnMut(String, RawClient<Channel>) -> Fut,
        Fut: Future<Output = Result<T, Error>>,
    {
        let mut why = String::new();
        let members = self.members();
        for id in members.ring.owners(key, self.replication) {
            if let Some(w) = self.passed_over(id) {
                why =
                    format!("{id} not asked: unreachable less than {PASSED_OVER_FOR:?} ago ({w})");
                continue;
            }
            match call(id.to_string(), members.edges[id].1.clone()).await {
                Ok(v) => return Ok((id.to_string(), v)),
                Err(Error::Unavailable(w)) => {
                    self.pass_over(id, w.clone());
                    why = w;
                }
                Err(e) => return Err(e),
            }
        }
        Err(Error::Unavailable(why))
    }

    /// Keys whose [`CacheClient::get_or_load`] is loading now (or waiting for another caller's
    /// load of the same key): for a service's own metrics.
    pub fn loads_in_progress(&self) -> usize {
        crate::turn::in_progress(&self.loading)
    }

    /// Look a key up.
    pub async fn get(&self, key: impl Into<Bytes>) -> Result<Lookup, Error> {
        Ok(self.get_at(key.into()).await?.1.lookup)
    }

    /// Look several keys up at once: one request to each edge that owns some of them (per
    /// [`GET_MANY_CHUNK`] keys), all sent together; the answers in the keys' order. Keys whose
    /// edge cannot be reached are asked of their next owner, one by one, as [`CacheClient::get`]
    /// asks; any other failure (a key refused) fails the call. A hit's value is its own copy:
    /// keeping one does not keep the rest of its edge's answer in memory.
    pub async fn get_many<K: Into<Bytes>>(
        &self,
        keys: impl IntoIterator<Item = K>,
    ) -> Result<Vec<Lookup>, Error> {
        let keys: Vec<Bytes> = keys.into_iter().map(Into::into).collect();
        let members = self.members();
        // Keys none of whose owners may be asked now go the way of `get`.
        let (by_edge, mut one_by_one) = self.by_first_owner(&members, keys.iter().map(|k| &k[..]));
        let calls = by_edge.into_iter().flat_map(|(id, idx)| {
            let (members, keys) = (&members, &keys);
            idx.chunks(GET_MANY_CHUNK)
                .map(|chunk| {
                    let edge = members.edges[id].1.clone();
                    let asked = chunk.iter().map(|&i| keys[i].clone()).collect();
                    let chunk = chunk.to_vec();
                    async move { (id, chunk, Self::get_many_on(edge, asked).await) }
                })
                .collect::<Vec<_>>()
        });
        let answers = self
            .gather(calls, keys.len(), &mut one_by_one, "keys")
            .await?;
        let mut out: Vec<Option<Lookup>> = answers
            .into_iter()
            .map(|a| {
                a.map(|r| {
                    if r.hit {
                        Lookup::Hit(Bytes::copy_from_slice(&r.value))
                    } else {
                        Lookup::Miss { lease: r.lease }
                    }
                })
            })
            .collect();
        for i in one_by_one {
            out[i] = Some(self.get(keys[i].clone()).await?);
        }
        Ok(out.into_iter().flatten().collect())
    }

    /// Per item (by its key), the first of its owners not passed over now, and the items of
    /// each such edge; the items with none.
    fn by_first_owner<'m, 'k>(
        &self,
        members: &'m Members,
        keys: impl Iterator<Item = &'k [u8]>,
    ) -> (HashMap<&'m str, Vec<usize>>, Vec<usize>) {
        let mut by_edge: HashMap<&str, Vec<usize>> = HashMap::new();
        let mut none = Vec::new();
        for (i, k) in keys.enumerate() {
            let owner = members
                .ring
                .owners(k, self.replication)
                .into_iter()
                .find(|id| self.passed_over(id).is_none());
            match owner {
                Some(id) => by_edge.entry(id).or_default().push(i),
                None => none.push(i),
            }
        }
        (by_edge, none)
    }

    /// The answers of `calls` (each an edge's run of the `items`), sent together, per item; the
    /// items of a run whose edge cannot be reached go to `one_by_one` (and the edge is passed
    /// over for a while). Any other failure fails the whole.
    async fn gather<'e, T>(
        &self,
        calls: impl Iterator<Item = impl Future<Output = (&'e str, Vec<usize>, Result<Vec<T>, Error>)>>,
        items: usize,
        one_by_one: &mut Vec<usize>,
        what: &str,
    ) -> Result<Vec<Option<T>>, Error> {
        let mut out: Vec<Option<T>> = std::iter::repeat_with(|| None).take(items).collect();
        for (id, idx, answer) in futures::future::join_all(calls).await {
            let answers = match answer {
                Ok(answers) => answers,
                Err(Error::Unavailable(why)) => {
                    self.pass_over(id, why);
                    one_by_one.extend(idx);
                    continue;
                }
                Err(e) => return Err(e),
            };
            if answers.len() != idx.len() {
                return Err(Error::Unavailable(format!(
                    "{id} answered {} of {} {what}",
                    answers.len(),
                    idx.len()
                )));
            }
            for (i, a) in idx.into_iter().zip(answers) {
                out[i] = Some(a);
            }
        }
        Ok(out)
    }

    /// One edge's answers to `keys`, in their order. An edge answers so many bytes of values
    /// at most in one GetMany (64 MiB, then `RESOURCE_EXHAUSTED`): the keys are then asked for
    /// in halves.
    fn get_many_on(
        mut edge: RawClient<Channel>,
        mut keys: Vec<Bytes>,
    ) -> futures::future::BoxFuture<'static, Result<Vec<pb::GetResponse>, Error>> {
        Box::pin(async move {
            let req = pb::GetManyRequest { keys: keys.clone() };
            match edge.get_many(req).await {
                Ok(r) => Ok(r.into_inner().results),
                Err(s) if s.code() == tonic::Code::ResourceExhausted && keys.len() > 1 => {
                    let second = keys.split_off(keys.len() / 2);
                    let mut results = Self::get_many_on(edge.clone(), keys).await?;
                    results.extend(Self::get_many_on(edge, second).await?);
                    Ok(results)
                }
                Err(s) => Err(s.into()),
            }
        })
    }

    /// Look a key up; also the edge that answered (its lease is good there only).
    async fn get_at(&self, key: Bytes) -> Result<(RawClient<Channel>, Found), Error> {
        let (_, (at, r)) = self
            .first_owner(&key, |_, mut edge| {
                let key = key.clone();
                async move {
                    let r = edge.get(pb::GetRequest { key }).await;
                    Ok((edge, r.map_err(Error::from)?))
                }
            })
            .await?;
        let r = r.into_inner();
        let found = Found {
            serves: r.only_misses.is_empty(),
            lookup: if r.hit {
                Lookup::Hit(r.value)
            } else {
                Lookup::Miss { lease: r.lease }
            },
        };
        Ok((at, found))
    }

    /// Fill several keys at once, each under the lease of its miss (from [`CacheClient::get_many`],
    /// say, after loading the missed rows in one query): one request to each edge that owns some
    /// of them (per [`GET_MANY_CHUNK`] entries or [`SET_MANY_BYTES`] of them), sent together. Per
    /// entry, in their order: stored, or `false` for a fill its lease makes stale. Entries whose
    /// edge cannot be reached go to their next owner one by one, as [`CacheClient::set`] sends
    /// them; any other failure (a value larger than the edge takes) fails the call, with the fills
    /// of other requests made or not. A value may be a [`Fill`] with tags or a version, as for
    /// [`CacheClient::set`].
    pub async fn set_many<K: Into<Bytes>, V: Into<Fill>>(
        &self,
        entries: impl IntoIterator<Item = (K, V, Option<u64>)>,
    ) -> Result<Vec<bool>, Error> {
        let entries: Vec<pb::SetRequest> = entries
            .into_iter()
            .map(|(key, fill, lease)| self.set_request(key.into(), fill.into(), lease))
            .collect();
        let members = self.members();
        let (by_edge, mut one_by_one) =
            self.by_first_owner(&members, entries.iter().map(|e| &e.key[..]));
        let calls = by_edge.into_iter().flat_map(|(id, idx)| {
            let (members, entries) = (&members, &entries);
            set_many_chunks(&idx, |i| {
                let e = &entries[i];
                e.key.len() + e.value.len() + e.tags.iter().map(Bytes::len).sum::<usize>()
            })
            .into_iter()
            .map(move |chunk| {
                let edge = members.edges[id].1.clone();
                let sent = chunk.iter().map(|&i| entries[i].clone()).collect();
                async move { (id, chunk, Self::set_many_on(edge, sent).await) }
            })
        });
        let answers = self
            .gather(calls, entries.len(), &mut one_by_one, "fills")
            .await?;
        let mut out: Vec<bool> = answers.into_iter().map(|a| a.unwrap_or(false)).collect();
        for i in one_by_one {
            let req = entries[i].clone();
            let (_, stored) = self
                .first_owner(&req.key, |_, edge| Self::set_on(edge, req.clone()))
                .await?;
            out[i] = stored;
        }
        Ok(out)
    }

    /// One edge's fills of `entries`, in their order. A request larger than the edge decodes
    /// (its `max_value_len`, below what [`SET_MANY_BYTES`] assumes) is sent again in halves,
    /// down to a Set of one, which the edge refuses by name if its value is too large.
    fn set_many_on(
        mut edge: RawClient<Channel>,
        mut entries: Vec<pb::SetRequest>,
    ) -> futures::future::BoxFuture<'static, Result<Vec<bool>, Error>> {
        Box::pin(async move {
            if entries.len() == 1 {
                let one = entries.pop().expect("one entry");
                return Ok(vec![Self::set_on(edge, one).await?]);
            }
            let req = pb::SetManyRequest {
                entries: entries.clone(),
            };
            match edge.set_many(req).await {
                Ok(r) => Ok(r.into_inner().stored),
                Err(s) if dci_proto::types::refused_for_size(&s) => {
                    let second = entries.split_off(entries.len() / 2);
                    let mut stored = Self::set_many_on(edge.clone(), entries).await?;
                    stored.extend(Self::set_many_on(edge, second).await?);
                    Ok(stored)
                }
                // A stale lease refuses only its own entry (`false`); a refusal of the request
                // is for what an entry is.
                Err(s) => Err(s.into()),
            }
        })
    }

    /// Fill on one edge: `Ok(false)` when it refuses the fill (stale lease, say).
    async fn set_on(mut edge: RawClient<Channel>, req: pb::SetRequest) -> Result<bool, Error> {
        let len = req.value.len();
        match edge.set(req).await {
            Ok(r) => Ok(r.into_inner().stored),
            Err(s) if s.code() == tonic::Code::FailedPrecondition => Ok(false),
            // Beyond what the edge decodes at all: refused by its transport, in words that name
            // neither the value nor the setting.
            Err(s) if dci_proto::types::refused_for_size(&s) => {
                Err(Error::Refused(dci_proto::types::value_too_large(len)))
            }
            Err(s) => Err(s.into()),
        }
    }

    /// Store a value; with the lease of a miss, it is refused (`Ok(false)`) when an invalidation
    /// newer than the lease reached the edge meanwhile. The value may be a [`Fill`] with tags
    /// (a tag invalidation of any of them removes it, whatever its key) or the version it was
    /// read at (refused when the edge applied an invalidation of the key naming a newer one).
    pub async fn set(
        &self,
        key: impl Into<Bytes>,
        fill: impl Into<Fill>,
        lease: Option<u64>,
    ) -> Result<bool, Error> {
        let req = self.set_request(key.into(), fill.into(), lease);
        let (_, stored) = self
            .first_owner(&req.key, |_, edge| Self::set_on(edge, req.clone()))
            .await?;
        Ok(stored)
    }

    fn set_request(&self, key: Bytes, fill: Fill, lease: Option<u64>) -> pb::SetRequest {
        pb::SetRequest {
            key,
            value: fill.value,
            lease,
            ttl_ms: dci_proto::types::ttl_ms(self.fill_ttl),
            tags: fill.tags,
            version: fill.version,
        }
    }

    /// Remove a key from its edges (every owner that answers): true when one of them held it.
    /// Only the value goes: a fill under a lease handed out before is still taken. To make a
    /// key's readers load it anew, and refuse their fills of what they read before, publish
    /// its invalidation ([`crate::Publisher::invalidate`]).
    pub async fn delete(&self, key: impl Into<Bytes>) -> Result<bool, Error> {
        let key = key.into();
        let (mut answered, mut existed, mut why) = (false, false, String::new());
        let members = self.members();
        for id in members.ring.owners(&key, self.replication) {
            let req = pb::DeleteRequest { key: key.clone() };
            match members.edges[id]
                .1
                .clone()
                .delete(req)
                .await
                .map_err(Error::from)
            {
                Ok(r) => {
                    answered = true;
                    existed |= r.into_inner().existed;
                }
                Err(Error::Unavailable(w)) => why = w,
                Err(e) => return Err(e),
            }
        }
        if answered {
            Ok(existed)
        } else {
            Err(Error::Unavailable(why))
        }
    }

    /// The cached value, or load it, fill under the miss's lease, and return it. Only one caller
    /// per key (in this client) loads at a time; the others wait and then read the fill, or, if
    /// it was refused (the key invalidated meanwhile), load side by side: none waits through
    /// more than one load besides its own. From an edge that serves only misses for now (past
    /// its staleness bound), every caller loads at once.
    ///
    /// The cache only saves loads: when the key's edge cannot be reached (down, stuck past the
    /// deadline), or does not follow the key (while a region's edges change, the client and the
    /// edges may place it differently for a moment; said in a warning at most every 10 s), the
    /// value comes from the loader and nothing is filled; a fill that fails is dropped the same
    /// way. Only a refusal of the request itself (a key too long, say) and the loader's own
    /// failure are errors.
    ///
    /// The loader returns the value, or a [`Fill`] with the tags it was built from (the rows a
    /// page shows, say) or the version it was read at, which the fill carries (see
    /// [`CacheClient::set`]).
    pub async fn get_or_load<F, Fut, V, E>(
        &self,
        key: impl Into<Bytes>,
        loader: F,
    ) -> Result<Bytes, Error>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>>,
        V: Into<Fill>,
        E: std::fmt::Display,
    {
        let key = key.into();
        let load = || crate::fill::load(loader);
        let value_of = |loaded: Result<Fill, Error>| loaded.map(|f| f.value);
        match self.get_at(key.clone()).await {
            Ok((
                _,
                Found {
                    lookup: Lookup::Hit(v),
                    ..
                },
            )) => return Ok(v),
            // Waiting for another caller's fill is worth it only where a fill is read.
            Ok((_, Found { serves: false, .. })) => return value_of(load().await),
            Ok(_) => {}
            Err(Error::Unavailable(why)) => {
                tracing::debug!(%why, "edge unavailable: loading without the cache");
                return value_of(load().await);
            }
            Err(Error::Refused(why)) if why.contains(dci_proto::types::NOT_FOLLOWED) => {
                // The key's edge does not follow it (yet, or any more: the region's edges are
                // changing, or this client's list is not theirs): the cache is only passed by.
                self.warn_not_followed(&why);
                return value_of(load().await);
            }
            Err(e) => return Err(e),
        }
        let turn = Turn::take(&self.loading, key.clone());
        let held = turn.wait().await;
        // The fill goes where the miss came from: a lease is good on its own edge only.
        let lease = match self.get_at(key.clone()).await {
            Ok((
                _,
                Found {
                    lookup: Lookup::Hit(v),
                    ..
                },
            )) => return Ok(v),
            Ok((_, Found { serves: false, .. })) => None,
            Ok((
                at,
                Found {
                    lookup: Lookup::Miss { lease },
                    ..
                },
            )) => Some((at, lease)),
            Err(Error::Unavailable(_)) => None,
            Err(Error::Refused(why)) if why.contains(dci_proto::types::NOT_FOLLOWED) => {
                self.warn_not_followed(&why);
                None
            }
            Err(e) => return Err(e),
        };
        // Only a caller that fills holds the others up for its load.
        let held = held.filter(|_| lease.is_some());
        let value = load().await;
        // A refused or failed fill still returns the loaded value: it was read after the
        // miss, and the next reader loads again.
        if let (Ok(fill), Some((at, lease))) = (&value, lease) {
            let req = self.set_request(key.clone(), fill.clone(), Some(lease));
            match Self::set_on(at, req).await {
                Ok(_) => {}
                Err(Error::Unavailable(why)) => {
                    tracing::debug!(%why, "edge unavailable: the loaded value is not filled");
                }
                // A value the edge does not take (too large, say): worth a look.
                Err(e) => tracing::warn!(error = %e, "fill refused by the edge"),
            }
        }
        if let Some(held) = held {
            held.loaded();
        }
        value_of(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs keep the entries' order, hold at most a run's entries and bytes, and an entry larger
    /// than a run's bytes goes alone.
    #[test]
    fn set_many_runs_are_bounded_in_entries_and_bytes() {
        let sizes = [1 << 20, 1 << 20, 3 << 20, 5 << 20, 10, 10];
        let idx: Vec<usize> = (0..sizes.len()).collect();
        let runs = set_many_chunks(&idx, |i| sizes[i]);
        assert_eq!(runs, vec![vec![0, 1], vec![2], vec![3], vec![4, 5]]);
        let many: Vec<usize> = (0..2 * GET_MANY_CHUNK + 1).collect();
        let runs = set_many_chunks(&many, |_| 1);
        assert_eq!(
            runs.iter().map(Vec::len).collect::<Vec<_>>(),
            [GET_MANY_CHUNK, GET_MANY_CHUNK, 1]
        );
        assert_eq!(runs.concat(), many);
        assert!(set_many_chunks(&[], |_| 1).is_empty());
    }
}
