//! `dci follow`: the invalidations a coordinator or relay streams, one line each, as they come
//! (or from a seq of its ring or log): what an operator looks at to see whether, when and in
//! which order a key's invalidation went by.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Args;
use dci_proto::upstream::{self, Applier, FollowOptions, LinkState};
use dci_proto::{Batch, Epoch, Filter, Kind, Seq, ShardId};
use tokio::sync::watch;

#[derive(Args)]
pub struct FollowArgs {
    /// The sender to follow (a coordinator or a relay); several, comma-separated, are followed
    /// in failover order.
    #[arg(long, value_delimiter = ',', value_parser = crate::url_item, default_value = "http://127.0.0.1:7500")]
    sender: Vec<String>,
    /// Only keys with these prefixes (the sender filters), comma-separated.
    #[arg(long, value_delimiter = ',')]
    prefixes: Vec<String>,
    /// Start at this seq, from the sender's ring or log (every shard it carries, at the same
    /// seq, or the one `--shard` names), instead of at its head.
    #[arg(long, value_parser = crate::positive)]
    from: Option<u64>,
    /// Only this shard's invalidations (a sender that carries several: each shard has seqs of
    /// its own).
    #[arg(long)]
    shard: Option<ShardId>,
    /// Exit after this many invalidations.
    #[arg(long, value_parser = crate::positive)]
    count: Option<u64>,
    /// A JSON object per line, for a program to read: `{"event":"invalidate","shard":0,
    /// "epoch":…,"seq":3,"kind":"key","key":"user:42","version":7}` (a key that is not UTF-8 as
    /// `key_hex`; `trace_id` and `span_id` when traced), and also, on standard output, what
    /// the stream says of itself: `{"event":"flush",…,"hwm":…,"reason":…}` (drop everything of
    /// the shard) and `{"event":"quarantined",…}` (poison, for the record: the lines after it
    /// carry what stands in for it).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    tls: crate::ClientTlsArgs,
}

/// One line per invalidation on standard output; what happens to the stream on standard error.
struct Printer {
    out: std::io::BufWriter<std::io::Stdout>,
    /// Invalidations still to print (`None`: no end).
    left: Option<u64>,
    /// Print the shard beside each seq (the sender carries several).
    shards: bool,
    /// Print only this shard's.
    only: Option<ShardId>,
    /// Told once printing is over (the count reached, or output nobody reads any more).
    done: Arc<watch::Sender<bool>>,
    /// Why printing stopped early, if not for a reader that went away.
    failed: Arc<Mutex<Option<String>>>,
    /// JSON lines (`--json`).
    json: bool,
}

impl Printer {
    fn stop(&mut self, failure: Option<String>) {
        if let Some(f) = failure {
            upstream::lock(&self.failed).get_or_insert(f);
        }
        self.left = Some(0);
        let _ = self.done.send(true);
    }
}

/// The line of one invalidation: `seq=N key=K` (or `prefix=P`, or `all`), then ` version=V`,
/// ` trace=T span=S` (the trace context it was published under) and ` shard=S` when there
/// are. Bytes that are not printable ASCII are escaped (`\xNN`).
fn line(e: &dci_proto::Invalidation, shard: Option<ShardId>) -> String {
    let mut l = match e.kind {
        Kind::Key => format!("seq={} key={}", e.seq, e.key.escape_ascii()),
        Kind::Prefix => format!("seq={} prefix={}", e.seq, e.key.escape_ascii()),
        Kind::Tag => format!("seq={} tag={}", e.seq, e.key.escape_ascii()),
        Kind::All => format!("seq={} all", e.seq),
    };
    if let Some(v) = e.source_version {
        l.push_str(&format!(" version={v}"));
    }
    if let Some(t) = &e.trace_id {
        // Bytes that are no W3C context are carried as they came, and shown as they are.
        match dci_proto::trace::TraceContext::from_bytes(t) {
            Some(context) => l.push_str(&format!(" {context}")),
            None => l.push_str(&format!(" trace={}", dci_proto::trace::to_hex(t))),
        }
    }
    if let Some(s) = shard {
        l.push_str(&format!(" shard={s}"));
    }
    l
}

/// `key` (or `key_hex` when it is not UTF-8) in `fields`.
fn json_key(fields: &mut serde_json::Map<String, serde_json::Value>, key: &[u8]) {
    match std::str::from_utf8(key) {
        Ok(k) => fields.insert("key".into(), k.into()),
        Err(_) => fields.insert("key_hex".into(), dci_proto::trace::to_hex(key).into()),
    };
}

/// The JSON line of one invalidation (`--json`).
fn json_line(e: &dci_proto::Invalidation, shard: ShardId, epoch: Epoch) -> String {
    let mut f = serde_json::Map::new();
    f.insert("event".into(), "invalidate".into());
    f.insert("shard".into(), shard.into());
    f.insert("epoch".into(), epoch.into());
    f.insert("seq".into(), e.seq.into());
    let kind = match e.kind {
        Kind::Key => "key",
        Kind::Prefix => "prefix",
        Kind::Tag => "tag",
        Kind::All => "all",
    };
    f.insert("kind".into(), kind.into());
    if e.kind != Kind::All {
        json_key(&mut f, &e.key);
    }
    if let Some(v) = e.source_version {
        f.insert("version".into(), v.into());
    }
    if let Some(t) = &e.trace_id {
        match dci_proto::trace::TraceContext::from_bytes(t) {
            Some(c) => {
                f.insert(
                    "trace_id".into(),
                    dci_proto::trace::to_hex(&c.trace_id).into(),
                );
                if let Some(span) = c.parent_span_id {
                    f.insert("span_id".into(), dci_proto::trace::to_hex(&span).into());
                }
            }
            None => {
                f.insert("trace_id".into(), dci_proto::trace::to_hex(t).into());
            }
        }
    }
    f.insert("published_us".into(), e.publish_time_us.into());
    serde_json::Value::Object(f).to_string()
}

impl Applier for Printer {
    fn apply(&mut self, b: &Batch) {
        if self.only.is_some_and(|s| s != b.shard) {
            return;
        }
        let shard = (self.shards || b.shard != 0).then_some(b.shard);
        for e in &b.entries {
            if self.left == Some(0) {
                break;
            }
            let text = if self.json {
                json_line(e, b.shard, b.epoch)
            } else {
                line(e, shard)
            };
            if let Err(e) = writeln!(self.out, "{text}") {
                return self.wrote(e);
            }
            self.left = self.left.map(|n| n - 1);
        }
        if let Err(e) = self.out.flush() {
            return self.wrote(e);
        }
        if self.left == Some(0) {
            self.stop(None);
        }
    }

    fn quarantine(&mut self, shard: ShardId, entry: &dci_proto::pb::Invalidation, why: &str) {
        if self.json && self.only.is_none_or(|s| s == shard) {
            let mut f = serde_json::Map::new();
            f.insert("event".into(), "quarantined".into());
            f.insert("shard".into(), shard.into());
            f.insert("seq".into(), entry.seq.into());
            json_key(&mut f, &entry.key);
            f.insert("reason".into(), why.into());
            self.say(serde_json::Value::Object(f));
        }
        eprintln!(
            "shard {shard}: seq {} quarantined (its key {} dropped): {why}",
            entry.seq,
            entry.key.escape_ascii()
        );
    }

    fn flush(&mut self, shard: ShardId, epoch: Epoch, hwm: Seq, reason: &str) {
        if self.json && self.only.is_none_or(|s| s == shard) {
            self.say(serde_json::json!({
                "event": "flush",
                "shard": shard,
                "epoch": epoch,
                "hwm": hwm,
                "reason": reason,
            }));
        }
        eprintln!(
            "shard {shard}: following from seq {} of epoch {epoch} ({reason})",
            hwm.saturating_add(1)
        );
    }
}

impl Printer {
    /// A line of what the stream says of itself (`--json`), unless printing is over.
    fn say(&mut self, v: serde_json::Value) {
        if self.left == Some(0) {
            return;
        }
        if let Err(e) = writeln!(self.out, "{v}").and_then(|()| self.out.flush()) {
            self.wrote(e);
        }
    }

    fn wrote(&mut self, e: std::io::Error) {
        // A reader that went away (`dci follow | head`) ends it as it ends any command.
        let failure = (e.kind() != std::io::ErrorKind::BrokenPipe)
            .then(|| format!("writing to standard output: {e}"));
        self.stop(failure);
    }
}

pub async fn run(a: FollowArgs) -> anyhow::Result<()> {
    let tls = a.tls.client()?;
    // The sender answers before anything is followed: an address that is wrong is an error,
    // not a retry without end.
    let mut tree = None;
    let mut failed = None;
    for url in &a.sender {
        match crate::status::node_tree(url, &tls).await {
            Ok(t) => {
                tree = Some((url, t));
                break;
            }
            Err(e) => {
                failed.get_or_insert(e);
            }
        }
    }
    let Some((url, tree)) = tree else {
        return Err(failed.unwrap_or_else(|| anyhow::anyhow!("no sender given")));
    };
    let me = tree.into_iter().next().unwrap_or_default();
    if me.role == "edge" || me.role == "near-cache" {
        anyhow::bail!(
            "{url} is {} {}: it serves no stream; follow a coordinator or a relay",
            if me.role == "edge" { "an" } else { "a" },
            me.role
        );
    }
    if let Some(shard) = a.shard {
        if !me.shards.iter().any(|s| s.shard == shard) {
            let carried: Vec<String> = me.shards.iter().map(|s| s.shard.to_string()).collect();
            anyhow::bail!(
                "{url} carries no shard {shard} (it carries: {})",
                if carried.is_empty() {
                    "none yet".to_string()
                } else {
                    carried.join(", ")
                }
            );
        }
    }
    let starts: Vec<_> = me
        .shards
        .iter()
        .filter(|s| a.shard.is_none_or(|only| only == s.shard))
        .collect();
    let resume: Vec<(ShardId, Epoch, Seq)> = match a.from {
        None => Vec::new(),
        Some(from) => {
            if starts.is_empty() {
                anyhow::bail!("{url} carries no shard yet: there is no seq {from} to start at");
            }
            for s in &starts {
                if from > s.hwm.saturating_add(1) {
                    anyhow::bail!(
                        "seq {from} is past the head of shard {} at {url} ({})",
                        s.shard,
                        s.hwm
                    );
                }
            }
            starts
                .iter()
                .map(|s| (s.shard, s.epoch, from - 1))
                .collect()
        }
    };
    let (done_tx, mut done) = watch::channel(false);
    let done_tx = Arc::new(done_tx);
    let failure = Arc::new(Mutex::new(None));
    let printer = Printer {
        out: std::io::BufWriter::new(std::io::stdout()),
        left: a.count,
        shards: me.shards.len() > 1,
        only: a.shard,
        done: done_tx.clone(),
        failed: failure.clone(),
        json: a.json,
    };
    let opts = FollowOptions {
        urls: a.sender.clone(),
        node_id: format!("follow-{:08x}", rand::random::<u32>()),
        role: "follow".into(),
        filter: Filter::of_prefixes(&a.prefixes),
        heartbeat_interval: Duration::from_secs(1),
        resume,
        tls,
        ..FollowOptions::default()
    };
    let state = Arc::new(Mutex::new(LinkState::default()));
    let follow = tokio::spawn(upstream::follow(
        opts,
        Arc::new(Mutex::new(printer)),
        state,
        done.clone(),
    ));
    // Ends on the count, a reader gone, or the process told to stop (Ctrl-C, SIGTERM).
    tokio::select! {
        _ = done.wait_for(|d| *d) => {}
        _ = reader_gone() => {
            let _ = done_tx.send(true);
        }
        _ = crate::terminated() => {
            let _ = done_tx.send(true);
        }
    }
    let _ = follow.await;
    let failed = upstream::lock(&failure).take();
    failed.map_or(Ok(()), |f| Err(anyhow::anyhow!(f)))
}

/// Resolves once the pipe on standard output has lost its reader (`| head -1` has exited): on
/// a quiet stream a write, which would tell, may not come for a long time. Never, for output
/// that cannot tell (a file).
async fn reader_gone() {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let out = std::io::stdout();
    let now = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    loop {
        tokio::time::sleep(READER_CHECK).await;
        // A pipe without a reader polls as an error; a socket whose peer left, as a hang-up.
        let mut fds = [PollFd::new(&out, PollFlags::empty())];
        if poll(&mut fds, Some(&now)).is_ok()
            && fds[0].revents().intersects(PollFlags::ERR | PollFlags::HUP)
        {
            return;
        }
    }
}

/// How often `dci follow` looks whether its output is still read.
const READER_CHECK: Duration = Duration::from_millis(200);

#[cfg(test)]
mod tests {
    use super::*;

    /// One line per invalidation whatever its key holds: bytes that would break the line or the
    /// terminal are escaped.
    #[test]
    fn a_line_per_invalidation_whatever_its_key_holds() {
        let e = |key: &'static [u8], kind: Kind| dci_proto::Invalidation {
            seq: 7,
            kind,
            ..dci_proto::Invalidation::key(bytes::Bytes::from_static(key))
        };
        assert_eq!(line(&e(b"user:1", Kind::Key), None), "seq=7 key=user:1");
        assert_eq!(
            line(&e(b"a\nb\xff\x1b[2J", Kind::Key), Some(3)),
            "seq=7 key=a\\nb\\xff\\x1b[2J shard=3"
        );
        let versioned = dci_proto::Invalidation {
            source_version: Some(42),
            ..e(b"p:", Kind::Prefix)
        };
        assert_eq!(line(&versioned, None), "seq=7 prefix=p: version=42");
        assert_eq!(line(&e(b"", Kind::All), Some(0)), "seq=7 all shard=0");
        let context = dci_proto::trace::TraceContext::from_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .unwrap();
        assert_eq!(
            line(&e(b"k", Kind::Key).traced(context), Some(1)),
            "seq=7 key=k trace=4bf92f3577b34da6a3ce929d0e0e4736 span=00f067aa0ba902b7 shard=1"
        );
        let opaque = dci_proto::Invalidation {
            trace_id: Some(bytes::Bytes::from_static(b"\x01\xab")),
            ..e(b"k", Kind::Key)
        };
        assert_eq!(line(&opaque, None), "seq=7 key=k trace=01ab");
    }

    /// `--json`: a key that is not UTF-8 goes in hex, and bytes of a trace that are no W3C
    /// context as they came.
    #[test]
    fn a_json_line_holds_any_key() {
        let e = dci_proto::Invalidation {
            seq: 7,
            trace_id: Some(bytes::Bytes::from_static(b"\x01\xab")),
            ..dci_proto::Invalidation::tag(bytes::Bytes::from_static(b"a\n\xff"))
        };
        let v: serde_json::Value = serde_json::from_str(&json_line(&e, 2, 9)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"event": "invalidate", "shard": 2, "epoch": 9, "seq": 7,
                "kind": "tag", "key_hex": "610aff", "trace_id": "01ab", "published_us": 0})
        );
        let v: serde_json::Value =
            serde_json::from_str(&json_line(&dci_proto::Invalidation::key("ü \"x\""), 0, 1))
                .unwrap();
        assert_eq!(v["key"], "ü \"x\"");
    }
}
