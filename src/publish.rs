//! `dci publish`: keys from the command line or standard input, sent to their shards'
//! coordinators in requests that fit, resent while unanswered, and (`--wait`) followed down
//! the tree until every cache has applied them.

use std::io::{Read, Write};
use std::time::Duration;

use anyhow::anyhow;
use bytes::Bytes;
use clap::Args;
use dci_proto::applied::Outcome;
use dci_proto::pb;
use dci_proto::types::printable;

use crate::status::{merge_tree, node_tree, tier_tree};
use crate::{connect, duration, status_line, url_item, ClientTlsArgs, REQUEST_TIMEOUT};

#[derive(Args)]
pub(crate) struct PublishArgs {
    /// Coordinator URL; with a sharded tier, every shard's, comma-separated, in shard order (each
    /// key then goes to its shard, prefixes to all, and the shard is printed beside the seq).
    #[arg(long, value_delimiter = ',', value_parser = url_item, default_value = "http://127.0.0.1:7400")]
    coordinator: Vec<String>,
    /// Invalidate every key with these prefixes instead of exact keys.
    #[arg(long)]
    prefix: bool,
    /// Invalidate every value filled with these tags (`dci set --tag`, the SDK's
    /// `Fill::tagged`), whatever its key, instead of exact keys.
    #[arg(long, conflicts_with = "prefix")]
    tag: bool,
    /// Invalidate every key of every shard (edges drop all they hold); prints "* SEQ".
    #[arg(long, conflicts_with_all = ["prefix", "tag", "keys", "version", "with_versions"])]
    all: bool,
    /// Writer's version for every key (a row's: a prefix covers many rows, and takes none), or
    /// every tag (then a log position, comparable across the rows a tag covers).
    #[arg(long, conflicts_with = "prefix")]
    version: Option<u64>,
    /// Each key is followed by its writer's version after a space or tab (`user:42:profile 7`,
    /// on the command line and on each line of `-`'s input alike), as a feed of row changes
    /// carries a row version or a log position: a cache then skips an older version of a key
    /// that arrives after a newer one.
    #[arg(long, conflicts_with_all = ["prefix", "version"])]
    with_versions: bool,
    /// Standard input (`-`) is change events, a JSON object per line (a CDC feed: Debezium,
    /// Maxwell, wal2json…), and each event invalidates the key this template makes of it: text
    /// with fields in braces, each a path into the event (`payload.after.id`), alternatives
    /// separated by `|` (the first present and not null: `user:{after.id|before.id}` for an
    /// update and a delete alike). Repeat for more keys per event.
    #[arg(long = "json-key", value_name = "TEMPLATE", conflicts_with_all = ["prefix", "tag", "all", "version", "with_versions"])]
    json_keys: Vec<crate::changes::Template>,
    /// As --json-key, a tag invalidation of the tag the template makes (`org:{after.org_id}`).
    #[arg(long = "json-tag", value_name = "TEMPLATE", conflicts_with_all = ["prefix", "tag", "all", "version", "with_versions"])]
    json_tags: Vec<crate::changes::Template>,
    /// The path of an event's version, with which its keys and tags are published
    /// (`payload.source.lsn`): a whole number, digits in a string, or a PostgreSQL log position
    /// (`16/B374D848`).
    #[arg(long, value_name = "PATH")]
    json_version: Option<crate::changes::Path>,
    /// Pass over an event that no --json-key or --json-tag template fits (a heartbeat, a table
    /// without the fields) instead of stopping at it.
    #[arg(long)]
    json_skip_unmatched: bool,
    /// Keys to invalidate; `-` reads them from standard input, one per line, and publishes them
    /// as they come.
    #[arg(required_unless_present = "all")]
    keys: Vec<String>,
    /// Resend a request left without an answer (a coordinator restarting, a connection lost)
    /// for this long before giving up; the coordinator takes a resend for the request it
    /// repeats, never as a second one.
    #[arg(long, value_parser = duration, default_value = "10s")]
    retry_for: Duration,
    /// Once published, wait until every cache below the coordinators (edges, near caches) has
    /// applied it, for at most this long (`--wait` alone: 30s): "applied by all N caches" on
    /// stderr, or the caches that lag and exit 3.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "30s", value_parser = crate::positive_duration)]
    wait: Option<Duration>,
    /// Publish under this W3C trace context (`00-<trace id>-<span id>-<flags>`, as the
    /// `traceparent` header of the request that changed the data): each coordinator, relay and
    /// edge that exports to an OTLP collector makes a span of it in that trace.
    #[arg(long, value_parser = traceparent)]
    traceparent: Option<dci_proto::trace::TraceContext>,
    #[command(flatten)]
    tls: ClientTlsArgs,
}

fn traceparent(s: &str) -> Result<dci_proto::trace::TraceContext, String> {
    dci_proto::trace::TraceContext::from_traceparent(s)
}

/// Exit code of `dci publish --wait` when published but not applied everywhere in time.
const EXIT_NOT_APPLIED: u8 = 3;

/// Most keys `dci publish` sends in one request (far below the coordinator's limits).
const PUBLISH_CHUNK: usize = 4096;

/// Most keys `dci publish` reads and publishes at a time: what it holds however long its input
/// is (keys from standard input are published round by round, each printed once answered).
const PUBLISH_ROUND_KEYS: usize = 16_384;
const PUBLISH_ROUND_BYTES: usize = 4 << 20;

/// A key (or prefix, or tag), its kind, and its writer's version if it has one.
type Keyed = (String, pb::Kind, Option<u64>);

/// Most bytes of a change event (a line of `--json-key`'s input).
const EVENT_BYTES: usize = 1 << 20;

/// How `--json-key` reads its input.
struct Events {
    changes: crate::changes::Changes,
    skip_unmatched: bool,
    /// What the last event makes and is not taken yet.
    pending: std::collections::VecDeque<Keyed>,
}

/// Where `dci publish` takes its keys: the command line, or standard input line by line.
enum KeySource {
    Args {
        keys: std::vec::IntoIter<String>,
        /// Keys taken so far.
        taken: usize,
    },
    Stdin {
        input: std::io::BufReader<std::io::Stdin>,
        line: usize,
        /// Bytes a line may have past the longest key: room for a version after it.
        slack: usize,
        /// Lines are change events (`--json-key`).
        events: Option<Events>,
    },
}

impl KeySource {
    /// Whether a next key can be taken without waiting for input: while one cannot, what was
    /// read is published (a writer feeding keys as they come sees each published at once).
    fn ready(&self) -> bool {
        match self {
            KeySource::Args { .. } => true,
            KeySource::Stdin { input, events, .. } => {
                !input.buffer().is_empty() || events.as_ref().is_some_and(|e| !e.pending.is_empty())
            }
        }
    }

    /// The next key (blank lines of standard input skipped), `None` at the end.
    fn next_key(&mut self) -> anyhow::Result<Option<String>> {
        use std::io::BufRead;
        let (input, line, slack, events) = match self {
            KeySource::Args { keys, taken } => {
                *taken += 1;
                return Ok(keys.next());
            }
            KeySource::Stdin {
                input,
                line,
                slack,
                events,
            } => (input, line, *slack, events.is_some()),
        };
        let limit = dci_proto::types::MAX_KEY_LEN_LIMIT + slack;
        loop {
            *line += 1;
            let mut buf = Vec::new();
            // At most one key over the limit is held: a line longer than any coordinator takes
            // (or input that is no list of keys at all) is measured, not kept.
            let n = input
                .by_ref()
                .take(limit as u64 + 2)
                .read_until(b'\n', &mut buf)
                .map_err(|e| anyhow!("reading keys from standard input: {e}"))?;
            if n == 0 {
                return Ok(None);
            }
            let mut len = buf.len();
            if buf.last() != Some(&b'\n') && len > limit {
                loop {
                    let chunk = input
                        .fill_buf()
                        .map_err(|e| anyhow!("reading keys from standard input: {e}"))?;
                    if chunk.is_empty() {
                        break;
                    }
                    match chunk.iter().position(|&b| b == b'\n') {
                        Some(i) => {
                            len += i;
                            input.consume(i + 1);
                            break;
                        }
                        None => {
                            len += chunk.len();
                            let n = chunk.len();
                            input.consume(n);
                        }
                    }
                }
            }
            if len > limit {
                // A line ends where its key ends (a newline, a carriage return before it).
                let tail = buf
                    .iter()
                    .rev()
                    .take_while(|b| b.is_ascii_whitespace())
                    .count();
                if len - tail > limit {
                    let longest = dci_proto::types::MAX_KEY_LEN_LIMIT;
                    // The same words as for a key of the command line, with its line.
                    return Err(if events {
                        anyhow!(
                            "line {line} of standard input: {} bytes, more than a change event \
                             may have ({EVENT_BYTES})",
                            len - tail
                        )
                    } else if slack == 0 {
                        anyhow!(
                            "line {line} of standard input: key is {} bytes, more than the \
                             maximum any coordinator takes ({longest})",
                            len - tail
                        )
                    } else {
                        anyhow!(
                            "line {line} of standard input: {} bytes, more than the longest \
                             key any coordinator takes ({longest}) and a version",
                            len - tail
                        )
                    });
                }
            }
            let Ok(text) = String::from_utf8(buf) else {
                anyhow::bail!("line {line} of standard input: not UTF-8");
            };
            let key = text.trim_end();
            if !key.is_empty() {
                return Ok(Some(key.to_string()));
            }
        }
    }

    /// Where the last key taken came from, for an error about it.
    fn last_place(&self) -> String {
        match self {
            KeySource::Args { taken, .. } => format!("key {taken}"),
            KeySource::Stdin { line, .. } => format!("line {line} of standard input"),
        }
    }

    /// The next entry, of `kind`, and its version: with `with_versions`, each item is `KEY
    /// VERSION`; from change events, each key and tag an event makes.
    fn next_entry(&mut self, kind: pb::Kind, with_versions: bool) -> anyhow::Result<Option<Keyed>> {
        if let KeySource::Stdin {
            events: Some(_), ..
        } = self
        {
            return self.next_change();
        }
        let Some(item) = self.next_key()? else {
            return Ok(None);
        };
        if !with_versions {
            return Ok(Some((item, kind, None)));
        }
        let (key, version) =
            split_version(&item).map_err(|why| anyhow!("{}: {why}", self.last_place()))?;
        let limit = dci_proto::types::MAX_KEY_LEN_LIMIT;
        if key.len() > limit {
            anyhow::bail!(
                "{}: key is {} bytes, more than the maximum any coordinator takes ({limit})",
                self.last_place(),
                key.len()
            );
        }
        Ok(Some((key.to_string(), kind, Some(version))))
    }

    /// The next key or tag of the change events.
    fn next_change(&mut self) -> anyhow::Result<Option<Keyed>> {
        loop {
            if let KeySource::Stdin {
                events: Some(e), ..
            } = self
            {
                if let Some(next) = e.pending.pop_front() {
                    return Ok(Some(next));
                }
            }
            let Some(line) = self.next_key()? else {
                return Ok(None);
            };
            let KeySource::Stdin {
                events: Some(e),
                line: n,
                ..
            } = self
            else {
                unreachable!("change events come from standard input")
            };
            let made = e
                .changes
                .of(&line)
                .map_err(|why| anyhow!("line {n} of standard input: {why}"))?;
            if made.keys.is_empty() && made.tags.is_empty() && !e.skip_unmatched {
                anyhow::bail!(
                    "line {n} of standard input: no --json-key or --json-tag template finds its \
                     fields in {:?} (--json-skip-unmatched passes over such events)",
                    printable_prefix(&line)
                );
            }
            let limit = dci_proto::types::MAX_KEY_LEN_LIMIT;
            for k in made.keys.iter().chain(&made.tags) {
                if k.len() > limit {
                    anyhow::bail!(
                        "line {n} of standard input: key {:?} is {} bytes, more than the maximum \
                         any coordinator takes ({limit})",
                        printable_prefix(k),
                        k.len()
                    );
                }
            }
            let keys = made
                .keys
                .into_iter()
                .map(|k| (k, pb::Kind::Key, made.version));
            let tags = made
                .tags
                .into_iter()
                .map(|t| (t, pb::Kind::Tag, made.version));
            e.pending.extend(keys.chain(tags));
        }
    }
}

/// `KEY VERSION`: the key, and the writer's version after its last space or tab.
fn split_version(item: &str) -> Result<(&str, u64), String> {
    let Some((key, version)) = item.rsplit_once([' ', '\t']) else {
        return Err(format!(
            "no version after the key {:?} (with --with-versions, each key is `KEY VERSION`)",
            printable_prefix(item)
        ));
    };
    let version = version.parse::<u64>().map_err(|_| {
        format!(
            "{:?} is no version (a whole number up to {}) for the key {:?}",
            printable_prefix(version),
            u64::MAX,
            printable_prefix(key)
        )
    })?;
    // As a line's end, the space before the version is no part of its key.
    let key = key.trim_end();
    if key.is_empty() {
        return Err(format!("no key before the version {version}"));
    }
    Ok((key, version))
}

/// At most the first 64 characters of what an error quotes: a key may be 64 KiB long.
fn printable_prefix(s: &str) -> String {
    match s.char_indices().nth(64) {
        Some((at, _)) => format!("{}…", &s[..at]),
        None => s.to_string(),
    }
}

pub(crate) async fn publish(a: PublishArgs) -> anyhow::Result<u8> {
    let Some(within) = a.wait else {
        return publish_keys(&a, &mut Vec::new()).await.map(|()| 0);
    };
    let tls = a.tls.client()?;
    let started = tokio::time::Instant::now();
    // The caches there before publishing: one that leaves the tree afterwards (cut off,
    // restarting, failing over) may still hold what is invalidated, so it is waited for.
    let mut coverage = dci_proto::applied::Coverage::default();
    let deadline = started + within;
    // Of every coordinator that answers: one that does not may have nothing to do with the keys.
    let trees = futures::future::join_all(a.coordinator.iter().map(|url| node_tree(url, &tls)));
    if let Ok(trees) = tokio::time::timeout_at(deadline, trees).await {
        let mut nodes = Vec::new();
        for tree in trees.into_iter().flatten() {
            merge_tree(&mut nodes, tree);
        }
        coverage.update(&nodes);
    }
    let mut published = Vec::new();
    publish_keys(&a, &mut published).await?;
    // Only the shards published to are waited for: a coordinator down (or its tree unread)
    // holds no wait for keys of the others.
    let urls: Vec<String> = published
        .iter()
        .filter_map(|p| a.coordinator.get(p.shard as usize).cloned())
        .collect();
    let tree = || tier_tree(&urls, &tls);
    let outcome = dci_proto::applied::wait(&mut coverage, &published, deadline, tree).await;
    let within = humantime::format_duration(within);
    match outcome {
        Outcome::Applied { past_bound } => {
            let took = started.elapsed().as_secs_f64();
            let regions: Vec<_> = coverage.regions().into_iter().map(printable).collect();
            let regions = regions.join(", ");
            // Those a restarted coordinator had not heard from again are no caches it counts.
            let (unseen, past_bound): (Vec<_>, Vec<_>) =
                past_bound.into_iter().partition(|l| l.unseen);
            if let Some(u) = unseen.first() {
                eprintln!(
                    "{}: past their staleness bound since the restart, they serve none of it",
                    u.node_id
                );
            }
            let mut past: Vec<&str> = past_bound.iter().map(|l| l.node_id.as_str()).collect();
            past.dedup();
            let caches = coverage.caches();
            let applied = caches.saturating_sub(past.len());
            match (caches, past.len()) {
                (0, _) => eprintln!("no cache follows these coordinators: nothing to wait for"),
                (1, 0) => eprintln!("applied by the only cache ({regions}) in {took:.2}s"),
                (n, 0) => eprintln!("applied by all {n} caches ({regions}) in {took:.2}s"),
                (n, k) => eprintln!(
                    "applied by {applied} of {n} caches ({regions}) in {took:.2}s; not by {}, \
                     {}",
                    dci_proto::applied::named(&past_bound),
                    match k {
                        1 => "which is past its staleness bound since: it serves none of it",
                        _ => "which are past their staleness bounds since: they serve none of it",
                    }
                ),
            }
            return Ok(0);
        }
        Outcome::NotApplied(lagging) => {
            let mut ids: Vec<&str> = lagging
                .iter()
                .filter(|l| !l.unseen)
                .map(|l| l.node_id.as_str())
                .collect();
            ids.dedup();
            eprintln!(
                "not applied within {within} by {} of {} caches: {}",
                ids.len(),
                coverage.caches(),
                dci_proto::applied::named(&lagging)
            );
        }
        Outcome::Unread(failed) => {
            let why = failed.map_or("no answer from the coordinators".into(), |e| {
                format!("{e:#}")
            });
            eprintln!("published, but the tree could not be read within {within}: {why}");
        }
    }
    Ok(EXIT_NOT_APPLIED)
}

/// Publish what the arguments say, noting in `published` how far each shard answered.
async fn publish_keys(
    a: &PublishArgs,
    published: &mut Vec<dci_proto::applied::Published>,
) -> anyhow::Result<()> {
    let tls = a.tls.client()?;
    if a.json_version.is_some() && a.json_keys.is_empty() && a.json_tags.is_empty() {
        anyhow::bail!(
            "--json-version is the version of change events: give --json-key or --json-tag"
        );
    }
    let kind = if a.all {
        pb::Kind::All
    } else if a.prefix {
        pb::Kind::Prefix
    } else if a.tag {
        pb::Kind::Tag
    } else {
        pb::Kind::Key
    };
    let mut source = if a.all {
        KeySource::Args {
            keys: vec![String::new()].into_iter(),
            taken: 0,
        }
    } else if a.keys == ["-"] {
        let events = (!a.json_keys.is_empty() || !a.json_tags.is_empty()).then(|| Events {
            changes: crate::changes::Changes {
                keys: a.json_keys.clone(),
                tags: a.json_tags.clone(),
                version: a.json_version.clone(),
            },
            skip_unmatched: a.json_skip_unmatched,
            pending: Default::default(),
        });
        KeySource::Stdin {
            input: std::io::BufReader::with_capacity(1 << 20, std::io::stdin()),
            line: 0,
            slack: if events.is_some() {
                EVENT_BYTES
            } else if a.with_versions {
                // A space and the longest version.
                1 + u64::MAX.to_string().len()
            } else {
                0
            },
            events,
        }
    } else if !a.json_keys.is_empty() || !a.json_tags.is_empty() {
        anyhow::bail!("--json-key and --json-tag read change events from standard input: give `-`");
    } else {
        for (i, k) in a.keys.iter().enumerate() {
            let k = if a.with_versions {
                split_version(k)
                    .map_err(|why| anyhow!("key {}: {why}", i + 1))?
                    .0
            } else {
                k
            };
            dci_proto::types::check_key_len_limit(i, k.len()).map_err(anyhow::Error::msg)?;
        }
        KeySource::Args {
            keys: a.keys.clone().into_iter(),
            taken: 0,
        }
    };
    let shards = a.coordinator.len();
    let map = dci_proto::ring::ShardMap::new(shards as u32);
    // A prefix may match keys of every shard, and a tag be on values of any.
    let targets = |k: &str, kind: pb::Kind| -> Vec<usize> {
        if kind == pb::Kind::Key {
            vec![map.shard_of(k.as_bytes()) as usize]
        } else {
            (0..shards).collect()
        }
    };
    let publisher_id = format!("cli-{:016x}", rand::random::<u64>());
    let trace = a.traceparent.map(|c| c.to_bytes());
    let mut clients = vec![None; shards];
    let mut request_no = vec![0u64; shards];
    let mut read = 0usize;
    // Once nothing reads the output (`| head`), the keys are still published: only the
    // printing stops. Any other failure to print is told once every key is published.
    let mut out = Some(std::io::BufWriter::new(std::io::stdout()));
    let mut unprinted = None;
    loop {
        let mut round = Vec::new();
        let mut bytes = 0;
        // A bad line ends the input: what came before it is published, then the error told.
        let mut bad = None;
        while round.len() < PUBLISH_ROUND_KEYS && bytes < PUBLISH_ROUND_BYTES {
            if !round.is_empty() && !source.ready() {
                break;
            }
            let (k, kind, version) = match source.next_entry(kind, a.with_versions) {
                Ok(Some(k)) => k,
                Ok(None) => break,
                Err(e) => {
                    bad = Some(e);
                    break;
                }
            };
            if a.prefix && k.is_empty() {
                anyhow::bail!("an empty prefix would be every key: say --all for that");
            }
            if a.tag && k.is_empty() {
                anyhow::bail!("an empty tag is no tag");
            }
            bytes += k.len();
            round.push((k, kind, version.or(a.version)));
        }
        if round.is_empty() {
            if let Some(e) = bad {
                return Err(e);
            }
            if read == 0 {
                anyhow::bail!("no keys on standard input");
            }
            return unprinted.map_or(Ok(()), Err);
        }
        read += round.len();
        // The shards' requests go out together; each shard's in order, one after the other.
        let sends = a
            .coordinator
            .iter()
            .zip(clients.iter_mut())
            .zip(request_no.iter_mut())
            .enumerate()
            .map(|(shard, ((url, client), request_no))| {
                let keys: Vec<(usize, &Keyed)> = round
                    .iter()
                    .enumerate()
                    .filter(|(_, (k, kind, _))| targets(k, *kind).contains(&shard))
                    .collect();
                let (tls, publisher_id, trace) = (&tls, &publisher_id, &trace);
                async move {
                    let mut answered = Vec::new();
                    for chunk in request_chunks(&keys, trace.as_ref().map_or(0, Bytes::len)) {
                        *request_no += 1;
                        let req = pb::PublishRequest {
                            publisher_id: publisher_id.clone(),
                            request_no: *request_no,
                            entries: chunk
                                .iter()
                                .map(|(_, (k, kind, version))| pb::Invalidation {
                                    key: Bytes::from(k.to_string()),
                                    kind: *kind as i32,
                                    source_version: *version,
                                    trace_id: trace.clone(),
                                    ..Default::default()
                                })
                                .collect(),
                        };
                        match publish_one(url, tls, client, req, a.retry_for).await {
                            Ok(r) => answered.push((chunk.to_vec(), r)),
                            Err(e) => return (shard, answered, Some(e)),
                        }
                    }
                    (shard, answered, None)
                }
            });
        let mut lines = vec![Vec::new(); round.len()];
        let mut failed = None;
        for (shard, answered, error) in futures::future::join_all(sends).await {
            for (chunk, r) in answered {
                if let Some(&seq) = r.seqs.iter().max() {
                    dci_proto::applied::note(
                        published,
                        dci_proto::applied::Published {
                            shard: shard as u32,
                            epoch: r.epoch,
                            seq,
                        },
                    );
                }
                for ((i, (k, _, _)), seq) in chunk.iter().zip(r.seqs) {
                    let k = if a.all { "*" } else { k.as_str() };
                    lines[*i].push(if shards == 1 {
                        format!("{k} {seq}")
                    } else {
                        format!("{k} {seq} shard={shard}")
                    });
                }
            }
            failed = failed.or(error);
        }
        // What a shard accepted before another failed stays accepted: say so before the error.
        if let Some(w) = &mut out {
            let printed = lines
                .iter()
                .flatten()
                .try_for_each(|l| writeln!(w, "{l}"))
                .and_then(|()| w.flush());
            if let Err(e) = printed {
                if e.kind() != std::io::ErrorKind::BrokenPipe {
                    unprinted = Some(anyhow!("writing to standard output: {e}"));
                }
                out = None;
            }
        }
        if let Some(e) = failed.or(bad) {
            return Err(e);
        }
    }
}

/// Keys in runs of at most [`PUBLISH_CHUNK`] and of fewer bytes than a coordinator decodes in
/// one request (a larger one would be refused whole).
fn request_chunks<'a, 'k>(
    keys: &'a [(usize, &'k Keyed)],
    trace_len: usize,
) -> Vec<&'a [(usize, &'k Keyed)]> {
    use dci_proto::types::{ENTRY_OVERHEAD_BYTES, PUBLISH_REQUEST_BYTES};
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, (_, (k, _, _))) in keys.iter().enumerate() {
        let cost = k.len() + ENTRY_OVERHEAD_BYTES + trace_len;
        if i > start && (i - start == PUBLISH_CHUNK || bytes + cost > PUBLISH_REQUEST_BYTES) {
            out.push(&keys[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += cost;
    }
    if start < keys.len() {
        out.push(&keys[start..]);
    }
    out
}

/// Send one publish request, resending it (same publisher id and request number: the
/// coordinator answers a resend with the seqs it gave the first) while its answer does not come,
/// for up to `retry_for`; a refusal is final at once. An attempt waits for its answer no longer
/// than resends may go on (a node that is stopped, not gone, answers nothing): with no resends
/// (`retry_for` 0), as long as any request.
async fn publish_one(
    url: &str,
    tls: &dci_proto::tls::ClientTls,
    client: &mut Option<pb::publisher_client::PublisherClient<tonic::transport::Channel>>,
    req: pb::PublishRequest,
    retry_for: Duration,
) -> anyhow::Result<pb::PublishResponse> {
    let started = tokio::time::Instant::now();
    let mut backoff = Duration::from_millis(50);
    loop {
        let wait = if retry_for.is_zero() {
            REQUEST_TIMEOUT
        } else {
            retry_for
                .saturating_sub(started.elapsed())
                .clamp(Duration::from_millis(500), REQUEST_TIMEOUT)
        };
        let err = match client {
            Some(c) => match tokio::time::timeout(wait, c.publish(req.clone())).await {
                Ok(Ok(r)) => return Ok(r.into_inner()),
                Err(_) => {
                    *client = None;
                    let within = if retry_for.is_zero() {
                        REQUEST_TIMEOUT
                    } else {
                        retry_for
                    };
                    anyhow!(
                        "{url}: no answer within {}",
                        humantime::format_duration(within)
                    )
                }
                Ok(Err(s)) => {
                    let line = anyhow!(status_line(&s, "a coordinator", url, tls));
                    if !resendable(s.code()) {
                        return Err(line);
                    }
                    // A fresh connection: the old one may be the one a restarted node closed.
                    *client = None;
                    line
                }
            },
            None => match connect(url, tls).await {
                Ok(ch) => {
                    *client = Some(pb::publisher_client::PublisherClient::new(ch));
                    continue;
                }
                Err(e) => e,
            },
        };
        if started.elapsed() + backoff > retry_for {
            return Err(err);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

/// Whether a request that failed this way may be sent again: not when the node refused it for
/// what it is (sending it again would be refused again).
fn resendable(code: tonic::Code) -> bool {
    use tonic::Code::*;
    matches!(
        code,
        Unavailable | Internal | Unknown | Cancelled | DeadlineExceeded | Aborted
    )
}

/// The duration a bare `--wait` is followed by (`--wait 5s`): it is taken for a key (the
/// wait's own value needs `--wait=5s`, so that `--wait KEY` works), which publishes a key
/// nobody has and waits the default 30 s: almost surely not what was meant.
pub(crate) fn duration_after_bare_wait(args: impl IntoIterator<Item = String>) -> Option<String> {
    let mut after = args.into_iter().skip_while(|a| a != "--wait").skip(1);
    after
        .next()
        .filter(|v| humantime::parse_duration(v).is_ok())
}

#[cfg(test)]
mod tests {
    use super::duration_after_bare_wait;

    #[test]
    fn a_duration_after_a_bare_wait_is_caught() {
        let after = |line: &str| duration_after_bare_wait(line.split(' ').map(String::from));
        assert_eq!(after("publish --wait 5s user:1"), Some("5s".into()));
        assert_eq!(after("publish user:1 --wait 1m"), Some("1m".into()));
        assert_eq!(after("publish --wait user:1"), None);
        assert_eq!(after("publish --wait=5s user:1"), None);
        assert_eq!(after("publish 5s --wait"), None, "a key before it is meant");
        assert_eq!(
            after("publish --wait -- 5s"),
            None,
            "after `--`, it is meant"
        );
        assert_eq!(after("publish user:1 5s"), None);
    }
}
