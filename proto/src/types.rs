//! Domain types, and their conversions from and to the wire.

use bytes::Bytes;
use prost::Message;

use crate::pb;
use crate::ring::NodeRing;

/// A position in a shard's log. Seq 0 means "nothing yet"; the first entry has seq 1.
pub type Seq = u64;
/// A shard of the keyspace; each has one sequencer and one log.
pub type ShardId = u32;
/// Identity of one incarnation of a shard's log. It changes only when the log is lost, and grows
/// (it is taken from the clock when the log is created), so a receiver can tell old from new.
pub type Epoch = u64;

/// The largest seq accepted from the network. Far beyond any real log (2^62 entries), and low
/// enough that `seq + 1` can never overflow anywhere.
pub const MAX_SEQ: Seq = 1 << 62;

/// Shard ids are below this: a coordinator tier has at most this many shards, and an id from the
/// network at or beyond it is refused, so a sender that names ids at random cannot make a
/// receiver keep state for more than this many.
pub const MAX_SHARDS: u32 = 65_536;

/// How many of a publisher's latest requests a coordinator remembers, to answer a resend with
/// the seqs it logged them under instead of logging them again; a publisher keeps no more than
/// this in flight, so whatever it resends after a broken stream is remembered.
pub const RETRY_WINDOW: usize = 256;

/// The highest `max_key_len` a node may be given: no key longer is ever taken, whatever the
/// config, so a client can refuse one itself.
pub const MAX_KEY_LEN_LIMIT: usize = 64 << 10;

/// What an edge's refusal of a key it gets no invalidations for says (`FAILED_PRECONDITION`), by
/// which a client tells it from other refusals: while a region's edges change, a client and the
/// edges may for a moment place a key differently.
pub const NOT_FOLLOWED: &str = "is not followed by this edge";

/// The largest publish request a coordinator decodes, in bytes. Publishers keep their requests
/// under it: a larger one would end the whole stream, not only be refused.
pub const MAX_REQUEST_BYTES: usize = 16 << 20;

/// What a publisher puts in one request at most, in [`request_bytes`]: what a coordinator
/// decodes, less room for the request's own fields.
pub const PUBLISH_REQUEST_BYTES: usize = MAX_REQUEST_BYTES - (64 << 10);

/// What an entry costs beyond its key and trace id: more than its fields and framing encode to.
pub const ENTRY_OVERHEAD_BYTES: usize = 32;

/// What a publisher counts an entry's request bytes as: at least its encoded size.
pub fn request_bytes(entries: &[Invalidation]) -> usize {
    entries.iter().map(Invalidation::approx_size).sum()
}

/// Refuse a key longer than any coordinator takes ([`MAX_KEY_LEN_LIMIT`]), as entry `i` of a
/// call: said by the client, where the caller's position is known (a key of megabytes would
/// otherwise be refused by the transport, in its own words).
pub fn check_key_len_limit(i: usize, key_len: usize) -> Result<(), String> {
    if key_len > MAX_KEY_LEN_LIMIT {
        return Err(format!(
            "entry {i}: key is {key_len} bytes, more than the maximum any coordinator takes \
             ({MAX_KEY_LEN_LIMIT})"
        ));
    }
    Ok(())
}

/// The longest duration a setting may hold: far beyond any useful timeout or retention, and short
/// enough that adding it to a clock reading, or multiplying it by a small factor, cannot overflow.
pub const MAX_DURATION: std::time::Duration = std::time::Duration::from_secs(100 * 365 * 86_400);

/// A name from the network (a node id, a region) as printed to a terminal: its control
/// characters escaped (`\u{1b}`), so that a name cannot move the cursor, clear the screen or
/// forge a line of output.
pub fn printable(name: &str) -> std::borrow::Cow<'_, str> {
    if !name.chars().any(char::is_control) {
        return name.into();
    }
    name.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

/// Refuse a setting longer than [`MAX_DURATION`], naming it.
pub fn check_duration(what: &str, d: std::time::Duration) -> Result<(), String> {
    if d > MAX_DURATION {
        return Err(format!(
            "{what} must be at most 100 years, not {}s",
            d.as_secs()
        ));
    }
    Ok(())
}

/// A size in bytes as a flag or a config file says it: a count ("1048576"), or a number with a
/// unit, as `--help` prints the defaults ("64 MiB", "64MiB", "1.5GiB", "500KB", "256Mi"):
/// KiB/MiB/GiB/TiB (and Ki, Mi…) count in 1024s, KB/MB/GB/TB (and k, M…) in 1000s.
pub fn parse_byte_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let n = s
        .parse::<bytesize::ByteSize>()
        .map_err(|_| format!("{s:?} is not a size in bytes (say 1048576, 64MiB or 1.5GiB)"))?
        .as_u64();
    // The parser saturates: a size past what 64 bits count would quietly be the largest one.
    if n == u64::MAX && s != u64::MAX.to_string() {
        return Err(format!("{s:?} is more bytes than 64 bits count"));
    }
    Ok(n)
}

/// [`parse_byte_size`] for a config file's field (`#[serde(deserialize_with = ...)]`): a YAML
/// number or a string with a unit, into any integer type it fits.
pub fn de_byte_size<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: TryFrom<u64>,
{
    struct Size;
    impl serde::de::Visitor<'_> for Size {
        type Value = u64;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a size in bytes (a number, or a string such as \"64MiB\")")
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<u64, E> {
            Ok(v)
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<u64, E> {
            u64::try_from(v).map_err(|_| E::custom(format!("{v} is not a size in bytes")))
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<u64, E> {
            parse_byte_size(v).map_err(E::custom)
        }
    }
    let n = d.deserialize_any(Size)?;
    T::try_from(n).map_err(|_| serde::de::Error::custom(format!("{n} bytes is too many here")))
}

/// Whether a call was refused by the server's transport for its size (beyond what the node
/// decodes at all), in words that name neither the value nor the setting: the caller says it.
pub fn refused_for_size(s: &tonic::Status) -> bool {
    s.code() == tonic::Code::OutOfRange && s.message().contains("length too large")
}

/// What a Set of a value of `len` bytes refused for its size is told.
pub fn value_too_large(len: usize) -> String {
    format!("value is {len} bytes, more than that edge takes (its max_value_len)")
}

/// A value's time to live as a Set carries it (`ttl_ms`): 0 is the edge's default, so a time to
/// live given is at least a millisecond.
pub fn ttl_ms(ttl: Option<std::time::Duration>) -> u64 {
    ttl.map_or(0, |t| {
        u64::try_from(t.as_millis()).unwrap_or(u64::MAX).max(1)
    })
}

/// A list of a config file (`#[serde(deserialize_with = ...)]`): a YAML sequence, or a string of
/// its items comma-separated as on the command line, so that `upstream: http://c0:7400` is the
/// list of one URL it looks like (and `relays: "http://r0:7500, http://r1:7500"` of two).
pub fn de_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    d.deserialize_any(ListVisitor)
}

/// [`de_list`] for a list of lists (`upstream_groups`): each item a sequence or a string.
pub fn de_lists<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Vec<String>>, D::Error> {
    struct Item(Vec<String>);
    impl<'de> serde::Deserialize<'de> for Item {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(ListVisitor).map(Item)
        }
    }
    let items: Vec<Item> = serde::Deserialize::deserialize(d)?;
    Ok(items.into_iter().map(|i| i.0).collect())
}

struct ListVisitor;

impl<'de> serde::de::Visitor<'de> for ListVisitor {
    type Value = Vec<String>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a list, or a string of comma-separated items")
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Vec<String>, E> {
        Ok(v.split(',')
            .map(str::trim)
            .filter(|i| !i.is_empty())
            .map(String::from)
            .collect())
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<Vec<String>, E> {
        // `upstream:` with nothing after it: no items.
        Ok(Vec::new())
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<String>, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
        while let Some(item) = seq.next_element::<String>()? {
            out.push(item);
        }
        Ok(out)
    }
}

/// The name a relay or edge goes by when its config gives none: its role, region, host (the
/// first label of the machine's hostname) and port. Without the host, nodes on several machines
/// listening on the same port would share a name, and a wait for a publish to be applied
/// everywhere, which follows each cache by its name, could take one's progress for another's.
pub fn default_node_id(role: &str, region: &str, port: u16) -> String {
    let hostname = gethostname::gethostname();
    let host: String = hostname
        .to_string_lossy()
        .split('.')
        .next()
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .take(63)
        .collect();
    if host.is_empty() {
        format!("{role}-{region}-{port}")
    } else {
        format!("{role}-{region}-{host}-{port}")
    }
}

/// Default bound on key length, in bytes.
pub const DEFAULT_MAX_KEY_LEN: usize = 1024;

/// Refuse a key-length bound that cannot work: 0 refuses every key (a relay would take every
/// entry for poison), and beyond 64 KiB is past what the wire format is meant to carry.
pub fn check_max_key_len(n: usize) -> Result<(), String> {
    if n == 0 || n > MAX_KEY_LEN_LIMIT {
        return Err("max_key_len must be between 1 and 65536".into());
    }
    Ok(())
}

/// What an invalidation removes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Exactly the key.
    Key,
    /// Every key starting with the key bytes.
    Prefix,
    /// Every key of the shard.
    All,
    /// Every value filled with the tag (the key bytes), whatever its key; with no tag (only
    /// ever a poisoned entry's stand-in), every tagged value of the shard.
    Tag,
}

impl From<Kind> for pb::Kind {
    fn from(k: Kind) -> Self {
        match k {
            Kind::Key => pb::Kind::Key,
            Kind::Prefix => pb::Kind::Prefix,
            Kind::All => pb::Kind::All,
            Kind::Tag => pb::Kind::Tag,
        }
    }
}

/// One invalidation, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalidation {
    /// The key, or the prefix for [`Kind::Prefix`]; empty for [`Kind::All`].
    pub key: Bytes,
    /// What it removes.
    pub kind: Kind,
    /// Offset in the shard's log (0 until the coordinator assigns it).
    pub seq: Seq,
    /// Writer-supplied version (row version, LSN): older versions never undo newer ones.
    pub source_version: Option<u64>,
    /// Publish time, microseconds since the Unix epoch.
    pub publish_time_us: u64,
    /// Trace id carried end to end.
    pub trace_id: Option<Bytes>,
}

impl Invalidation {
    /// An invalidation of exactly `key`.
    pub fn key(key: impl Into<Bytes>) -> Self {
        Invalidation {
            key: key.into(),
            kind: Kind::Key,
            seq: 0,
            source_version: None,
            publish_time_us: 0,
            trace_id: None,
        }
    }

    /// An invalidation of every key that starts with `prefix`. An empty prefix is refused where it
    /// is checked: every key is [`Invalidation::all`], said on purpose.
    pub fn prefix(prefix: impl Into<Bytes>) -> Self {
        Invalidation {
            kind: Kind::Prefix,
            ..Invalidation::key(prefix)
        }
    }

    /// An invalidation of every value filled with `tag` (a Set's tags), whatever its key.
    pub fn tag(tag: impl Into<Bytes>) -> Self {
        Invalidation {
            kind: Kind::Tag,
            ..Invalidation::key(tag)
        }
    }

    /// An invalidation of every key.
    pub fn all() -> Self {
        Invalidation {
            kind: Kind::All,
            ..Invalidation::key(Bytes::new())
        }
    }

    /// This invalidation, published under a trace context: every node that exports spans
    /// (an OTLP collector configured) makes one of it in that trace ([`crate::trace`]).
    pub fn traced(self, context: crate::trace::TraceContext) -> Self {
        Invalidation {
            trace_id: Some(context.to_bytes()),
            ..self
        }
    }

    /// This invalidation, naming the writer's version (`source_version`): a row's version or,
    /// for a tag or to compare across rows, a log position.
    pub fn versioned(self, version: u64) -> Self {
        Invalidation {
            source_version: Some(version),
            ..self
        }
    }

    /// Does this invalidation remove `key`?
    pub fn covers(&self, key: &[u8]) -> bool {
        match self.kind {
            Kind::Key => self.key.as_ref() == key,
            Kind::Prefix => key.starts_with(&self.key),
            // A tag names values, not keys: which it removes, only the cache knows.
            Kind::Tag => false,
            Kind::All => true,
        }
    }

    /// Approximate encoded size, for byte budgets.
    pub fn approx_size(&self) -> usize {
        self.key.len() + ENTRY_OVERHEAD_BYTES + self.trace_id.as_ref().map_or(0, |t| t.len())
    }

    /// Check an invalidation received from the network.
    pub fn try_from_pb(p: pb::Invalidation, max_key_len: usize) -> Result<Self, InvalidEntry> {
        let kind = check_entry(&p, max_key_len)?;
        Ok(Invalidation {
            key: p.key,
            kind,
            seq: p.seq,
            source_version: p.source_version,
            publish_time_us: p.publish_time_us,
            trace_id: p.trace_id,
        })
    }

    /// The wire form.
    pub fn to_pb(&self) -> pb::Invalidation {
        pb::Invalidation {
            key: self.key.clone(),
            kind: pb::Kind::from(self.kind) as i32,
            seq: self.seq,
            source_version: self.source_version,
            publish_time_us: self.publish_time_us,
            trace_id: self.trace_id.clone(),
        }
    }
}

/// The checks of a wire invalidation, without taking it apart: its kind, or why it is invalid.
fn check_entry(p: &pb::Invalidation, max_key_len: usize) -> Result<Kind, InvalidEntry> {
    let kind = match pb::Kind::try_from(p.kind) {
        Ok(pb::Kind::Key) => Kind::Key,
        Ok(pb::Kind::Prefix) => Kind::Prefix,
        Ok(pb::Kind::All) => Kind::All,
        Ok(pb::Kind::Tag) => Kind::Tag,
        Ok(pb::Kind::Unspecified) => return Err(InvalidEntry::KindUnspecified),
        Err(_) => return Err(InvalidEntry::UnknownKind(p.kind)),
    };
    if kind == Kind::Prefix && p.key.is_empty() {
        return Err(InvalidEntry::EmptyPrefix);
    }
    if kind == Kind::Key && p.key.is_empty() {
        return Err(InvalidEntry::EmptyKey);
    }
    if kind == Kind::Tag && p.key.is_empty() {
        return Err(InvalidEntry::EmptyTag);
    }
    if p.key.len() > max_key_len {
        return Err(InvalidEntry::KeyTooLong {
            len: p.key.len(),
            max: max_key_len,
        });
    }
    if let Some(t) = &p.trace_id {
        if t.len() > 64 {
            return Err(InvalidEntry::TraceIdTooLong(t.len()));
        }
    }
    Ok(kind)
}

/// Why an invalidation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidEntry {
    /// The kind was left unset.
    #[error("kind is unspecified (use KEY, PREFIX or ALL)")]
    KindUnspecified,
    /// The kind is not one we know.
    #[error("unknown kind {0}")]
    UnknownKind(i32),
    /// KEY needs a key.
    #[error("key is empty")]
    EmptyKey,
    /// An empty prefix would be every key: that is what ALL says, on purpose.
    #[error("prefix is empty (to invalidate every key, use kind ALL)")]
    EmptyPrefix,
    /// A TAG names its tag.
    #[error("tag is empty")]
    EmptyTag,
    /// The key is over the configured bound.
    #[error("key is {len} bytes, more than the maximum of {max}")]
    KeyTooLong {
        /// Length seen.
        len: usize,
        /// Configured maximum.
        max: usize,
    },
    /// An entry of a batch outside the batch's range or out of order.
    #[error("entry seq {0} is outside its batch's range or out of order")]
    SeqOutOfRange(u64),
    /// Trace ids are at most 64 bytes.
    #[error("trace id is {0} bytes, more than 64")]
    TraceIdTooLong(usize),
}

/// A contiguous range `[first_seq, last_seq]` of one shard's log, with the entries that passed the
/// receiver's filter (possibly none).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    /// The shard.
    pub shard: ShardId,
    /// The shard log's epoch.
    pub epoch: Epoch,
    /// First seq covered (inclusive).
    pub first_seq: Seq,
    /// Last seq covered (inclusive).
    pub last_seq: Seq,
    /// Entries in the range, in seq order.
    pub entries: Vec<Invalidation>,
}

/// Why a batch from the network was refused as a whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidBatch {
    /// Bytes that do not decode as a `Batch`.
    #[error("batch does not decode: {0}")]
    Decode(String),
    /// `first_seq` is 0 or after `last_seq`, or beyond [`MAX_SEQ`].
    #[error("batch range [{first}, {last}] is empty, starts at 0 or is out of bounds")]
    Range {
        /// first_seq seen.
        first: Seq,
        /// last_seq seen.
        last: Seq,
    },
    /// A shard id at or beyond [`MAX_SHARDS`].
    #[error("shard {0} is out of bounds (shard ids are below {MAX_SHARDS})")]
    Shard(ShardId),
}

/// A batch that decoded and has a sane range, with per-entry verdicts: a bad entry does not sink the
/// batch (the receiver quarantines it and goes on).
#[derive(Debug, Clone)]
pub struct CheckedBatch {
    /// The batch with the valid entries.
    pub batch: Batch,
    /// Entries that failed validation, with their seq and key so the receiver can flush the key.
    pub poisoned: Vec<(pb::Invalidation, InvalidEntry)>,
}

impl Batch {
    /// This batch and `encoded`, its encoding as received (its entries' keys and trace ids are
    /// slices of it, as decoded), in one allocation of their own: a copy of the encoding, the
    /// entries pointing into it. What was received is a slice of a link's receive buffer, shared
    /// with whatever arrived around it; kept for long, it keeps all of that alive.
    pub fn owned(&self, encoded: &Bytes) -> (Batch, Bytes) {
        let own = Bytes::copy_from_slice(encoded);
        let (start, end) = (
            encoded.as_ptr() as usize,
            encoded.as_ptr() as usize + encoded.len(),
        );
        let rebase = |b: &Bytes| -> Bytes {
            let at = b.as_ptr() as usize;
            if !b.is_empty() && at >= start && at + b.len() <= end {
                own.slice(at - start..at - start + b.len())
            } else {
                Bytes::copy_from_slice(b)
            }
        };
        let mut batch = self.clone();
        for e in &mut batch.entries {
            e.key = rebase(&e.key);
            if let Some(t) = &e.trace_id {
                e.trace_id = Some(rebase(t));
            }
        }
        (batch, own)
    }

    /// Decode and check a batch received from the network.
    pub fn decode_checked(bytes: Bytes, max_key_len: usize) -> Result<CheckedBatch, InvalidBatch> {
        let p = pb::Batch::decode(bytes).map_err(|e| InvalidBatch::Decode(e.to_string()))?;
        Self::check_pb(p, max_key_len)
    }

    /// Check a decoded wire batch.
    pub fn check_pb(p: pb::Batch, max_key_len: usize) -> Result<CheckedBatch, InvalidBatch> {
        if p.first_seq == 0 || p.first_seq > p.last_seq || p.last_seq > MAX_SEQ {
            return Err(InvalidBatch::Range {
                first: p.first_seq,
                last: p.last_seq,
            });
        }
        if p.shard >= MAX_SHARDS {
            return Err(InvalidBatch::Shard(p.shard));
        }
        let mut entries = Vec::with_capacity(p.entries.len());
        let mut poisoned = Vec::new();
        let mut prev = p.first_seq - 1;
        for mut e in p.entries {
            if e.seq == 0 {
                e.seq = prev + 1;
            }
            if p.base_time_us != 0 {
                e.publish_time_us = p.base_time_us.saturating_add(e.publish_time_us);
            }
            if e.seq < p.first_seq || e.seq > p.last_seq || e.seq <= prev {
                let seq = e.seq;
                poisoned.push((e, InvalidEntry::SeqOutOfRange(seq)));
                continue;
            }
            prev = e.seq;
            match check_entry(&e, max_key_len) {
                Ok(kind) => entries.push(Invalidation {
                    key: e.key,
                    kind,
                    seq: e.seq,
                    source_version: e.source_version,
                    publish_time_us: e.publish_time_us,
                    trace_id: e.trace_id,
                }),
                Err(err) => poisoned.push((e, err)),
            }
        }
        Ok(CheckedBatch {
            batch: Batch {
                shard: p.shard,
                epoch: p.epoch,
                first_seq: p.first_seq,
                last_seq: p.last_seq,
                entries,
            },
            poisoned,
        })
    }

    /// The wire form: seqs that follow their predecessor and publish times relative to the
    /// batch's earliest are left implicit or small (see the `Batch` message).
    pub fn to_pb(&self) -> pb::Batch {
        let base = self
            .entries
            .iter()
            .map(|e| e.publish_time_us)
            .min()
            .unwrap_or(0);
        let mut prev = self.first_seq.saturating_sub(1);
        let entries = self
            .entries
            .iter()
            .map(|e| {
                let mut p = e.to_pb();
                if e.seq == prev + 1 {
                    p.seq = 0;
                }
                prev = e.seq;
                p.publish_time_us -= base;
                p
            })
            .collect();
        pb::Batch {
            shard: self.shard,
            epoch: self.epoch,
            first_seq: self.first_seq,
            last_seq: self.last_seq,
            entries,
            base_time_us: base,
        }
    }

    /// Encode once; the bytes can be shared by every receiver that takes the batch unfiltered.
    pub fn encode_shared(&self) -> Bytes {
        Bytes::from(self.to_pb().encode_to_vec())
    }

    /// The part of this batch a filter lets through, keeping the full range.
    pub fn filtered(&self, filter: &Filter) -> Batch {
        Batch {
            shard: self.shard,
            epoch: self.epoch,
            first_seq: self.first_seq,
            last_seq: self.last_seq,
            entries: self
                .entries
                .iter()
                .filter(|e| filter.accepts(e))
                .cloned()
                .collect(),
        }
    }

    /// The part of this batch after `hwm` (for a receiver that already has up to `hwm`).
    pub fn after(&self, hwm: Seq) -> Batch {
        Batch {
            shard: self.shard,
            epoch: self.epoch,
            first_seq: self.first_seq.max(hwm + 1),
            last_seq: self.last_seq,
            entries: self
                .entries
                .iter()
                .filter(|e| e.seq > hwm)
                .cloned()
                .collect(),
        }
    }
}

/// The stand-in for a poison entry: a valid invalidation that removes at least what the entry
/// could have meant for its key, so quarantining it never leaves a stale value behind. `None`
/// when there is nothing to remove (no key) or no place for it (seq outside its batch).
pub fn stand_in(
    p: &pb::Invalidation,
    why: &InvalidEntry,
    max_key_len: usize,
) -> Option<Invalidation> {
    let tag = p.kind == pb::Kind::Tag as i32;
    if (p.key.is_empty() && !tag) || matches!(why, InvalidEntry::SeqOutOfRange(_)) {
        return None;
    }
    let (key, kind) = if tag {
        // No tag a value could hold is known from a bad one: every tagged value goes. (Such a
        // stand-in, sent on, is refused below as an empty tag, and stands in again there.)
        (Bytes::new(), Kind::Tag)
    } else if p.key.len() > max_key_len {
        (p.key.slice(..max_key_len), Kind::Prefix)
    } else {
        match pb::Kind::try_from(p.kind) {
            Ok(pb::Kind::Prefix) => (p.key.clone(), Kind::Prefix),
            _ => (p.key.clone(), Kind::Key),
        }
    };
    Some(Invalidation {
        key,
        kind,
        seq: p.seq,
        source_version: None,
        publish_time_us: p.publish_time_us,
        trace_id: None,
    })
}

/// Give the keys and trace ids of `entries` one allocation of their own, exactly their size.
/// Decoded from requests, each is a slice of its request's buffer (8 KiB or more for a request
/// of one key), which it keeps alive for as long as it is kept (in a coordinator's tail of
/// recent batches, say): many times the bytes counted against that tail's bound.
pub fn own_bytes(entries: &mut [Invalidation]) {
    let len = |e: &Invalidation| e.key.len() + e.trace_id.as_ref().map_or(0, Bytes::len);
    let mut buf = bytes::BytesMut::with_capacity(entries.iter().map(len).sum());
    for e in entries.iter() {
        buf.extend_from_slice(&e.key);
        if let Some(t) = &e.trace_id {
            buf.extend_from_slice(t);
        }
    }
    let own = buf.freeze();
    let mut at = 0;
    let mut next = |n: usize| {
        at += n;
        own.slice(at - n..at)
    };
    for e in entries.iter_mut() {
        e.key = next(e.key.len());
        if let Some(t) = &e.trace_id {
            e.trace_id = Some(next(t.len()));
        }
    }
}

/// Coalesce repeated KEY invalidations of one group: each key keeps only its newest entry (the
/// highest seq), carrying the highest `source_version` seen for it. Later seqs subsume earlier
/// ones, so a receiver resuming in the middle of the group still applies every key's effect; the
/// range of the batch is unchanged. PREFIX and ALL entries are kept as they are. A kept entry
/// without a trace takes the newest trace of those it subsumes, so a traced invalidation's
/// spans show whatever carried it.
pub fn coalesce(entries: Vec<Invalidation>) -> Vec<Invalidation> {
    use std::collections::HashMap;
    if entries.len() < 2 {
        return entries;
    }
    let mut newest: HashMap<&Bytes, usize, foldhash::fast::RandomState> =
        HashMap::with_capacity_and_hasher(entries.len(), Default::default());
    let mut keep = vec![true; entries.len()];
    let mut versions: Vec<Option<u64>> = entries.iter().map(|e| e.source_version).collect();
    let mut traces: Vec<Option<Bytes>> = entries.iter().map(|e| e.trace_id.clone()).collect();
    for (i, e) in entries.iter().enumerate().rev() {
        if e.kind != Kind::Key {
            continue;
        }
        match newest.get(&e.key) {
            Some(&j) => {
                keep[i] = false;
                versions[j] = match (versions[j], e.source_version) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    (a, b) => a.or(b),
                };
                if traces[j].is_none() {
                    traces[j] = e.trace_id.clone();
                }
            }
            None => {
                newest.insert(&e.key, i);
            }
        }
    }
    if keep.iter().all(|k| *k) {
        return entries;
    }
    entries
        .into_iter()
        .enumerate()
        .filter(|(i, _)| keep[*i])
        .map(|(i, mut e)| {
            e.source_version = versions[i];
            e.trace_id = traces[i].take();
            e
        })
        .collect()
}

/// What a receiver wants from a stream.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// Keep keys with one of these prefixes (empty: all).
    pub prefixes: Vec<Bytes>,
    /// Keep only the keys this receiver owns on a hash ring.
    pub ring: Option<RingOwnership>,
}

/// Hash-ring ownership: the receiver `self_id` keeps keys for which it is one of `replication` owners.
#[derive(Clone, Debug)]
pub struct RingOwnership {
    /// The ring of the receiver's region.
    pub ring: NodeRing,
    /// The receiver's node id.
    pub self_id: String,
    /// Owners per key.
    pub replication: usize,
}

/// Why a filter from the network was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidFilter {
    /// The receiver is not on its own ring.
    #[error("ring filter: self_id {0:?} is not one of the ring's nodes")]
    NotOnRing(String),
    /// Too many nodes or prefixes to be reasonable.
    #[error("filter too large: {0}")]
    TooLarge(String),
}

impl Filter {
    /// Keys with one of these prefixes (none: every key), on no ring.
    pub fn of_prefixes(prefixes: &[String]) -> Filter {
        Filter {
            prefixes: prefixes.iter().map(|p| Bytes::from(p.clone())).collect(),
            ring: None,
        }
    }

    /// Does the entry pass? ALL and TAG always pass (a tag's values may have any key); PREFIX
    /// passes when it overlaps a wanted prefix; a PREFIX entry also passes a ring filter (its
    /// keys may live on any node).
    pub fn accepts(&self, e: &Invalidation) -> bool {
        match e.kind {
            Kind::All | Kind::Tag => true,
            Kind::Prefix => {
                self.prefixes.is_empty()
                    || self
                        .prefixes
                        .iter()
                        .any(|p| p.starts_with(&e.key) || e.key.starts_with(p))
            }
            Kind::Key => self.takes_key(&e.key),
        }
    }

    /// Does the receiver get the invalidations of `key`? A cache must neither serve nor store a
    /// key it does not: nothing would ever remove it.
    pub fn takes_key(&self, key: &[u8]) -> bool {
        self.takes_prefix_of(key)
            && self
                .ring
                .as_ref()
                .is_none_or(|r| r.ring.is_owner(key, &r.self_id, r.replication))
    }

    /// Whether `key` passes the filter's prefixes (whatever its ring says).
    pub fn takes_prefix_of(&self, key: &[u8]) -> bool {
        self.prefixes.is_empty() || self.prefixes.iter().any(|p| key.starts_with(p))
    }

    /// What the filter keeps, for an error about a key it does not.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if !self.prefixes.is_empty() {
            let list: Vec<_> = self
                .prefixes
                .iter()
                .map(|p| format!("{:?}", String::from_utf8_lossy(p)))
                .collect();
            parts.push(format!("keys with the prefixes {}", list.join(", ")));
        }
        if let Some(r) = &self.ring {
            parts.push(format!(
                "keys {} owns on its ring (replication {})",
                r.self_id, r.replication
            ));
        }
        if parts.is_empty() {
            "every key".into()
        } else {
            parts.join(" and ")
        }
    }

    /// True when nothing is filtered out (the shared encoding can be sent as is).
    pub fn is_pass_all(&self) -> bool {
        self.prefixes.is_empty() && self.ring.is_none()
    }

    /// Check a filter from the network.
    pub fn try_from_pb(p: Option<pb::Filter>) -> Result<Self, InvalidFilter> {
        let Some(p) = p else {
            return Ok(Filter::default());
        };
        if p.prefixes.len() > 1024 {
            return Err(InvalidFilter::TooLarge(format!(
                "{} prefixes (max 1024)",
                p.prefixes.len()
            )));
        }
        let ring = match p.ring {
            Some(r) if !r.nodes.is_empty() => {
                if r.nodes.len() > 10_000 {
                    return Err(InvalidFilter::TooLarge(format!(
                        "{} ring nodes (max 10000)",
                        r.nodes.len()
                    )));
                }
                if !r.nodes.iter().any(|n| n == &r.self_id) {
                    return Err(InvalidFilter::NotOnRing(r.self_id));
                }
                Some(RingOwnership {
                    ring: NodeRing::new(r.nodes),
                    self_id: r.self_id,
                    replication: (r.replication.max(1) as usize).min(16),
                })
            }
            _ => None,
        };
        Ok(Filter {
            prefixes: p.prefixes,
            ring,
        })
    }

    /// The wire form.
    pub fn to_pb(&self) -> pb::Filter {
        pb::Filter {
            prefixes: self.prefixes.clone(),
            ring: self.ring.as_ref().map(|r| pb::RingFilter {
                nodes: r.ring.nodes().to_vec(),
                self_id: r.self_id.clone(),
                replication: r.replication as u32,
            }),
        }
    }
}

#[cfg(test)]
mod tests {

    /// Nodes on several machines listening on the same port are told apart by their host.
    #[test]
    fn a_default_node_id_names_the_host() {
        let id = default_node_id("edge", "eu", 7600);
        let hostname = gethostname::gethostname();
        let label = hostname.to_string_lossy();
        let label = label.split('.').next().unwrap_or_default();
        assert!(id.starts_with("edge-eu-") && id.ends_with("-7600"), "{id}");
        if !label.is_empty() && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            assert_eq!(id, format!("edge-eu-{label}-7600"));
        }
        assert!(
            !id.contains('.') && id.len() <= "edge-eu--7600".len() + 63,
            "{id}"
        );
    }

    #[test]
    fn sizes_are_read_as_help_prints_them() {
        for (said, bytes) in [
            ("1048576", 1 << 20),
            ("64 MiB", 64 << 20),
            ("64MiB", 64 << 20),
            ("64mib", 64 << 20),
            ("256Mi", 256 << 20),
            ("1.5GiB", 3 << 29),
            ("500KB", 500_000),
            ("2k", 2000),
            ("8 B", 8),
            (" 4096 ", 4096),
            ("18446744073709551615", u64::MAX),
        ] {
            assert_eq!(parse_byte_size(said), Ok(bytes), "{said:?}");
        }
        for bad in [
            "",
            "-1",
            "MiB",
            "1.5",
            "64 parsecs",
            "1e6",
            "20000000EiB",
            "1,024",
        ] {
            let e = parse_byte_size(bad).unwrap_err();
            assert!(e.contains(bad.trim()), "{bad:?}: {e}");
        }
    }

    #[test]
    fn config_sizes_are_numbers_or_strings_with_units() {
        #[derive(serde::Deserialize, Debug)]
        struct C {
            #[serde(deserialize_with = "de_byte_size")]
            a: usize,
            #[serde(deserialize_with = "de_byte_size")]
            b: u64,
            #[serde(deserialize_with = "de_byte_size")]
            c: u32,
        }
        let c: C = serde_yaml::from_str("a: 4096\nb: 1GiB\nc: \"2 KiB\"").unwrap();
        assert_eq!((c.a, c.b, c.c), (4096, 1 << 30, 2048));
        for (bad, says) in [
            ("a: -1\nb: 1\nc: 1", "-1 is not a size"),
            ("a: 1\nb: 64 parsecs\nc: 1", "not a size in bytes"),
            ("a: 1\nb: 1\nc: 8GiB", "too many"),
            ("a: [1]\nb: 1\nc: 1", "a size in bytes"),
        ] {
            let e = serde_yaml::from_str::<C>(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }
    use super::*;

    #[test]
    fn names_from_the_network_print_without_control_characters() {
        assert_eq!(printable("eu-edge-1 (é)"), "eu-edge-1 (é)");
        assert_eq!(printable("a\x1b[2J\nb\t"), "a\\u{1b}[2J\\nb\\t");
    }

    fn inv(key: &str, kind: pb::Kind) -> pb::Invalidation {
        pb::Invalidation {
            key: Bytes::copy_from_slice(key.as_bytes()),
            kind: kind as i32,
            ..Default::default()
        }
    }

    #[test]
    fn validation_names_the_problem() {
        assert_eq!(
            Invalidation::try_from_pb(inv("", pb::Kind::Key), 8),
            Err(InvalidEntry::EmptyKey)
        );
        assert_eq!(
            Invalidation::try_from_pb(inv("", pb::Kind::Prefix), 8),
            Err(InvalidEntry::EmptyPrefix)
        );
        assert_eq!(
            Invalidation::try_from_pb(inv("abc", pb::Kind::Unspecified), 8),
            Err(InvalidEntry::KindUnspecified)
        );
        assert!(matches!(
            Invalidation::try_from_pb(inv("123456789", pb::Kind::Key), 8),
            Err(InvalidEntry::KeyTooLong { len: 9, max: 8 })
        ));
        let mut p = inv("k", pb::Kind::Key);
        p.kind = 42;
        assert_eq!(
            Invalidation::try_from_pb(p, 8),
            Err(InvalidEntry::UnknownKind(42))
        );
        assert!(Invalidation::try_from_pb(inv("", pb::Kind::All), 8).is_ok());
    }

    #[test]
    fn bad_entries_are_poison_not_fatal() {
        let mut good = inv("a", pb::Kind::Key);
        good.seq = 5;
        let mut bad = inv("", pb::Kind::Key);
        bad.seq = 6;
        let mut out_of_range = inv("b", pb::Kind::Key);
        out_of_range.seq = 99;
        let b = pb::Batch {
            shard: 0,
            epoch: 1,
            first_seq: 5,
            last_seq: 7,
            entries: vec![good, bad, out_of_range],
            base_time_us: 0,
        };
        let c = Batch::decode_checked(Bytes::from(b.encode_to_vec()), 1024).unwrap();
        assert_eq!(c.batch.entries.len(), 1);
        assert_eq!(c.poisoned.len(), 2);
        assert!(Batch::decode_checked(Bytes::from_static(b"\xff\xff\xff"), 1024).is_err());
        let empty = pb::Batch {
            first_seq: 4,
            last_seq: 3,
            ..Default::default()
        };
        assert!(Batch::decode_checked(Bytes::from(empty.encode_to_vec()), 1024).is_err());
    }

    /// Entries whose bytes are slices of several large buffers, given their own: equal, and
    /// holding nothing of those buffers; empty keys and absent trace ids stay so.
    #[test]
    fn entries_given_their_own_bytes_hold_nothing_of_their_requests() {
        let requests: Vec<Bytes> = (0..3u8)
            .map(|i| Bytes::from(vec![i + b'a'; 8192]))
            .collect();
        let mut entries: Vec<Invalidation> = requests
            .iter()
            .enumerate()
            .map(|(i, r)| Invalidation {
                key: r.slice(10..10 + 5 * i),
                trace_id: (i == 1).then(|| r.slice(100..116)),
                ..Invalidation::key("")
            })
            .collect();
        let before = entries.clone();
        own_bytes(&mut entries);
        assert_eq!(entries, before);
        for e in &entries {
            for r in &requests {
                assert!(!r.as_ptr_range().contains(&e.key.as_ptr()) || e.key.is_empty());
                if let Some(t) = &e.trace_id {
                    assert!(!r.as_ptr_range().contains(&t.as_ptr()));
                }
            }
        }
    }

    /// A batch decoded from a slice of a large buffer, owned: equal, and holding nothing of
    /// that buffer; its entries share one copy of the encoding.
    #[test]
    fn an_owned_batch_holds_nothing_of_the_buffer_it_came_in() {
        let b = Batch {
            shard: 3,
            epoch: 9,
            first_seq: 10,
            last_seq: 12,
            entries: (10..13)
                .map(|seq| Invalidation {
                    seq,
                    trace_id: (seq == 11).then(|| Bytes::from_static(&[7; 16])),
                    ..Invalidation::key(format!("user:{seq:06}:profile"))
                })
                .collect(),
        };
        let mut buffer = vec![0u8; 64 << 10];
        let encoded = b.to_pb().encode_to_vec();
        buffer[1000..1000 + encoded.len()].copy_from_slice(&encoded);
        let buffer = Bytes::from(buffer);
        let received = buffer.slice(1000..1000 + encoded.len());
        let decoded = Batch::decode_checked(received.clone(), 1024).unwrap().batch;
        let (owned, own) = decoded.owned(&received);
        assert_eq!(owned, b);
        assert_eq!(own, received);
        let inside = |x: &Bytes, of: &Bytes| of.as_ptr_range().contains(&x.as_ptr());
        for e in &owned.entries {
            assert!(!inside(&e.key, &buffer) && inside(&e.key, &own));
            if let Some(t) = &e.trace_id {
                assert!(!inside(t, &buffer) && inside(t, &own));
            }
        }
        assert!(!inside(&own, &buffer));
    }

    #[test]
    fn compact_encoding_round_trips() {
        let mk = |seq: u64, t: u64| Invalidation {
            seq,
            publish_time_us: 1_795_000_000_000_000 + t,
            source_version: Some(seq * 3),
            ..Invalidation::key(format!("user:{seq:06}:profile"))
        };
        let b = Batch {
            shard: 2,
            epoch: 9,
            first_seq: 10,
            last_seq: 20,
            entries: vec![
                mk(10, 1_000_000),
                mk(11, 1_000_050),
                mk(15, 999_990),
                mk(16, 1_000_100),
            ],
        };
        let bytes = b.encode_shared();
        let back = Batch::decode_checked(bytes.clone(), 1024).unwrap();
        assert!(back.poisoned.is_empty());
        assert_eq!(back.batch, b);
        let verbose: usize = b.entries.iter().map(|e| e.to_pb().encoded_len() + 2).sum();
        assert!(bytes.len() + 16 < verbose, "{} vs {verbose}", bytes.len());
    }

    #[test]
    fn poison_stand_ins_cover_the_key() {
        let mut p = inv("user:1", pb::Kind::Key);
        p.kind = 99;
        let s = stand_in(&p, &InvalidEntry::UnknownKind(99), 8).unwrap();
        assert_eq!((s.kind, s.key.as_ref()), (Kind::Key, b"user:1".as_ref()));
        let long = inv("0123456789abc", pb::Kind::Key);
        let s = stand_in(&long, &InvalidEntry::KeyTooLong { len: 13, max: 8 }, 8).unwrap();
        assert_eq!(s.kind, Kind::Prefix);
        assert!(s.covers(b"0123456789abc"));
        assert!(stand_in(&inv("", pb::Kind::Key), &InvalidEntry::EmptyKey, 8).is_none());
        // A bad tag, or a stand-in for one sent on: every tagged value of the shard.
        for t in ["0123456789abc", ""] {
            let s = stand_in(&inv(t, pb::Kind::Tag), &InvalidEntry::EmptyTag, 8).unwrap();
            assert_eq!((s.kind, s.key.len()), (Kind::Tag, 0));
        }
    }

    #[test]
    fn filters_keep_ranges_and_pick_entries() {
        let mk = |seq, key: &'static str, kind| Invalidation {
            key: Bytes::from_static(key.as_bytes()),
            kind,
            seq,
            source_version: None,
            publish_time_us: 0,
            trace_id: None,
        };
        let b = Batch {
            shard: 0,
            epoch: 1,
            first_seq: 1,
            last_seq: 4,
            entries: vec![
                mk(1, "user:1", Kind::Key),
                mk(2, "item:1", Kind::Key),
                mk(3, "us", Kind::Prefix),
                mk(4, "", Kind::All),
            ],
        };
        let f = Filter {
            prefixes: vec![Bytes::from_static(b"user:")],
            ring: None,
        };
        let out = b.filtered(&f);
        assert_eq!((out.first_seq, out.last_seq), (1, 4));
        let seqs: Vec<_> = out.entries.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![1, 3, 4]);
        let none = Filter {
            prefixes: vec![Bytes::from_static(b"zzz")],
            ring: None,
        };
        let out = b.filtered(&none);
        assert_eq!((out.first_seq, out.last_seq), (1, 4));
        assert_eq!(out.entries.len(), 1); // only ALL
    }

    #[test]
    fn coalescing_keeps_the_newest_seq_and_highest_version() {
        let mk = |seq, key: &'static str, v| Invalidation {
            seq,
            source_version: v,
            ..Invalidation::key(key)
        };
        let out = coalesce(vec![
            mk(1, "a", Some(9)),
            mk(2, "b", None),
            mk(3, "a", Some(4)),
            mk(4, "c", Some(1)),
            mk(5, "b", Some(2)),
        ]);
        let got: Vec<_> = out
            .iter()
            .map(|e| (e.seq, e.key.clone(), e.source_version))
            .collect();
        assert_eq!(
            got,
            vec![
                (3, Bytes::from_static(b"a"), Some(9)),
                (4, Bytes::from_static(b"c"), Some(1)),
                (5, Bytes::from_static(b"b"), Some(2)),
            ]
        );
        let traced = |seq, t: Option<&'static [u8]>| Invalidation {
            seq,
            trace_id: t.map(Bytes::from_static),
            ..Invalidation::key("k")
        };
        let trace_of = |v: Vec<Invalidation>| v[0].trace_id.clone();
        let (t1, t2, t3): (&[u8], &[u8], &[u8]) = (b"t1", b"t2", b"t3");
        // The kept entry's own trace stands; without one, it takes the newest it subsumes.
        let own = coalesce(vec![
            traced(1, Some(t1)),
            traced(2, Some(t2)),
            traced(3, Some(t3)),
        ]);
        assert_eq!(trace_of(own), Some(Bytes::from_static(t3)));
        let taken = coalesce(vec![
            traced(1, Some(t1)),
            traced(2, Some(t2)),
            traced(3, None),
        ]);
        assert_eq!(trace_of(taken), Some(Bytes::from_static(t2)));
        assert_eq!(
            trace_of(coalesce(vec![traced(1, None), traced(2, None)])),
            None
        );
    }

    #[test]
    fn ring_filter_partitions_keys() {
        let nodes: Vec<String> = (0..4).map(|i| format!("edge-{i}")).collect();
        let filters: Vec<Filter> = nodes
            .iter()
            .map(|n| {
                Filter::try_from_pb(Some(pb::Filter {
                    prefixes: vec![],
                    ring: Some(pb::RingFilter {
                        nodes: nodes.clone(),
                        self_id: n.clone(),
                        replication: 1,
                    }),
                }))
                .unwrap()
            })
            .collect();
        for i in 0..500 {
            let e = Invalidation::key(format!("key:{i}"));
            let owners = filters.iter().filter(|f| f.accepts(&e)).count();
            assert_eq!(owners, 1, "each key has exactly one owner");
        }
        let bad = Filter::try_from_pb(Some(pb::Filter {
            prefixes: vec![],
            ring: Some(pb::RingFilter {
                nodes: nodes.clone(),
                self_id: "stranger".into(),
                replication: 1,
            }),
        }));
        assert!(matches!(bad, Err(InvalidFilter::NotOnRing(_))));
    }
}
