//! The durable log of one shard: segment files of checksummed records.
//!
//! Record layout: `len: u32 LE | crc32c(payload): u32 LE | payload`, where the payload is a
//! protobuf [`LogRecord`] (one accepted publish request, its entries with consecutive seqs).
//! Segments are named after the first seq they hold, so finding a seq is a lookup by name.
//!
//! Recovery reads every segment in order. A record cut short at the end of the last segment is a
//! torn write (never acknowledged under `fsync=always`): it is truncated away. Only a record whose
//! end is missing can be one; a last record written whole and damaged since is corruption. A record whose
//! checksum or seq continuity is wrong is corruption: the log is cut there, later segments are
//! set aside, and the epoch changes so every receiver flushes what it may have learned from the
//! lost part. A torn write resumes sequencing after the last good record. Corruption does not:
//! the seqs beyond it were given out (and acknowledged), so recovery looks through what it cuts
//! and sets aside for the highest seq any intact record there holds, and logs a void record that
//! covers everything up to it, so that no seq is ever given out twice. The bytes cut from a
//! damaged segment are kept beside it (`.seg.cut-<offset>`).
//!
//! The active segment is kept zeroed a little ahead of its last record (`ZEROED_AHEAD`), so
//! that an fsync usually finds only data pages to write: appending past the end of a file also
//! changes its size and allocates blocks, which costs the fsync another write and another wait.
//! Recovery therefore takes a zero header followed by zeros as the end of the last segment, and a
//! damaged last record followed by zeros as a torn write. A segment that is rolled or closed is
//! cut back to its records.
//!
//! Writing and syncing are separate steps so the writer can stream a group downstream while its
//! fsync runs: what was written survives a crash of the process (it is in the page cache), and a
//! crash of the machine is told apart by the kernel's boot id. A log last written under another
//! boot without a clean stop may have lost a tail that receivers already hold, so it gets a new
//! epoch; under the same boot nothing written can be gone, whatever the fsync policy.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use dci_proto::pb;
use dci_proto::{Epoch, Seq};
use prost::Message;

const HEADER: usize = 8;
/// No record is larger than this; a bigger length is corruption, not a reason to allocate.
const MAX_RECORD: usize = 64 << 20;
/// The active segment is zeroed this far past its last record (see the module documentation).
const ZEROED_AHEAD: u64 = 256 << 10;
/// One sparse index point per this many bytes of segment.
const INDEX_EVERY: u64 = 64 << 10;

/// One accepted publish request, as stored.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LogRecord {
    /// Seq of the first entry; the others follow consecutively.
    #[prost(uint64, tag = "1")]
    pub first_seq: u64,
    /// Publisher id (empty: no deduplication).
    #[prost(string, tag = "2")]
    pub publisher_id: String,
    /// Request number within the publisher.
    #[prost(uint64, tag = "3")]
    pub request_no: u64,
    /// The entries, seqs filled in.
    #[prost(message, repeated, tag = "4")]
    pub entries: Vec<pb::Invalidation>,
    /// Set on a void record only (which has no entries): seqs `first_seq..=void_to` were given
    /// out before a corruption and the log no longer holds them; they are never given out again.
    #[prost(uint64, tag = "5")]
    pub void_to: u64,
}

impl LogRecord {
    /// Last seq of this record.
    pub fn last_seq(&self) -> Seq {
        if self.entries.is_empty() {
            self.void_to
        } else {
            self.first_seq + self.entries.len() as u64 - 1
        }
    }

    fn check(&self) -> Result<(), Damage> {
        let fits = if self.entries.is_empty() {
            self.void_to >= self.first_seq
        } else {
            self.void_to == 0
        };
        if self.first_seq == 0 || !fits {
            return Err(Damage::Corrupt("record holds no seq".into()));
        }
        Ok(())
    }
}

/// How hard the log pushes writes to disk before a publish is acknowledged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsyncPolicy {
    /// fsync every group before acknowledging it (group commit keeps throughput up).
    Always,
    /// fsync at most every `fsync_interval`; a crash can lose the last interval.
    Interval,
    /// Leave it to the OS; a crash can lose what the OS had not written.
    Never,
}

impl std::str::FromStr for FsyncPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "always" => Ok(FsyncPolicy::Always),
            "interval" => Ok(FsyncPolicy::Interval),
            "never" => Ok(FsyncPolicy::Never),
            other => Err(format!(
                "unknown fsync policy {other:?} (always, interval, never)"
            )),
        }
    }
}

/// Log tunables.
#[derive(Clone, Debug)]
pub struct WalOptions {
    /// Roll to a new segment beyond this size.
    pub segment_bytes: u64,
    /// Delete the oldest segments beyond this total.
    pub retention_bytes: u64,
    /// Delete segments whose newest write is older than this.
    pub retention_age: Duration,
    /// fsync policy.
    pub fsync: FsyncPolicy,
    /// For [`FsyncPolicy::Interval`].
    pub fsync_interval: Duration,
    /// Whose log this is (the coordinator's shard, say); recorded at the first open, and a later
    /// open as anyone else is refused. Empty: not checked.
    pub owner: String,
    /// Which other owners' logs to set aside rather than refuse (given whose log it is and
    /// `owner`): moved whole into a subdirectory, `set-aside-<owner>-<unix time>`, and a new log
    /// begun under an epoch above theirs. None: every other owner's log is refused.
    pub set_aside_when: Option<fn(holds: &str, owner: &str) -> bool>,
}

impl Default for WalOptions {
    fn default() -> Self {
        WalOptions {
            segment_bytes: 64 << 20,
            retention_bytes: 1 << 30,
            retention_age: Duration::from_secs(24 * 3600),
            fsync: FsyncPolicy::Always,
            fsync_interval: Duration::from_millis(100),
            owner: String::new(),
            set_aside_when: None,
        }
    }
}

/// Log errors.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// File system failure.
    #[error("log I/O on {path}: {source}")]
    Io {
        /// Where.
        path: PathBuf,
        /// What.
        source: io::Error,
    },
    /// The log belongs to someone else (another shard's log, after volumes were swapped, say).
    #[error("log directory {dir} holds the log of {holds}, not of {wanted}; a log stays with its owner (start {wanted} on an empty directory; after a change of the shard count, --reshard (`reshard: true`) sets a log of the same shard aside)")]
    NotOurs {
        /// The directory.
        dir: PathBuf,
        /// Whose log it is.
        holds: String,
        /// Who opened it.
        wanted: String,
    },
    /// The data directory is a file.
    #[error("log directory {0} is a file, not a directory")]
    NotADirectory(PathBuf),
    /// Another process has the log open: two writers would hand out the same seqs.
    #[error("log directory {0} is in use by another process (it holds {0}/LOCK); one coordinator per directory")]
    InUse(PathBuf),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> WalError + '_ {
    move |source| WalError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug)]
struct Segment {
    first_seq: Seq,
    path: PathBuf,
    len: u64,
    /// (first seq of a record, its offset), sparse.
    index: Vec<(Seq, u64)>,
    last_write: SystemTime,
}

/// What recovery found, for the log line and for tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Records read.
    pub records: u64,
    /// Bytes cut from a torn tail.
    pub torn_bytes: u64,
    /// Where corruption was found (segment file, offset), if anywhere.
    pub corrupt_at: Option<(PathBuf, u64)>,
    /// True when the epoch was changed (new log, corruption, or unclean stop without fsync).
    pub new_epoch: bool,
    /// True when the directory held a log already (this is a restart).
    pub had_log: bool,
    /// Seqs given out before a corruption that the log no longer holds (first, last): a void
    /// record now covers them, and sequencing goes on after them.
    pub voided: Option<(Seq, Seq)>,
    /// Where another owner's log was set aside ([`WalOptions::set_aside_when`]), and whose.
    pub set_aside: Option<(PathBuf, String)>,
}

/// What a retry must repeat to be taken for its original request: every entry's kind, key and
/// version, in order (not its publish time, which a client may stamp anew). Counting entries is
/// not enough: a publisher that restarts with a fixed id and numbers its requests from 1 again
/// sends other keys under numbers already logged, and taking those for retries would acknowledge
/// invalidations that were never logged. Computed again from the log on recovery, so it only
/// needs to be stable within one build.
pub fn request_digest<'a>(
    entries: impl IntoIterator<Item = (pb::Kind, &'a [u8], Option<u64>)>,
) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    for (kind, key, version) in entries {
        (kind as i32, key, version).hash(&mut h);
    }
    h.finish()
}

/// [`request_digest`] of a logged record.
fn record_digest(rec: &LogRecord) -> u64 {
    request_digest(
        rec.entries
            .iter()
            .map(|e| (e.kind(), &e.key[..], e.source_version)),
    )
}

/// A logged request, as remembered for its retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Logged {
    /// Seq of its first entry.
    pub first_seq: Seq,
    /// Its number of entries.
    pub count: u32,
    /// [`request_digest`] of its entries.
    pub digest: u64,
}

/// Idempotency memory: the last requests of each publisher, for the publishers that logged most
/// recently. Forgetting the one quiet the longest (not the first seen) keeps a long-lived
/// publisher's memory however many short-lived ones (each `dci publish` is one) come and go.
#[derive(Debug)]
pub struct DedupTable {
    /// How many publishers it remembers.
    publishers: usize,
    by_publisher: HashMap<Arc<str>, Remembered>,
    /// Publishers by the tick of their last logged request: the first is the quietest.
    by_recency: BTreeMap<u64, Arc<str>>,
    tick: u64,
}

#[derive(Debug)]
struct Remembered {
    last_tick: u64,
    requests: VecDeque<(u64, Logged)>,
}

const DEDUP_PER_PUBLISHER: usize = dci_proto::types::RETRY_WINDOW;
const DEDUP_PUBLISHERS: usize = 10_000;

impl Default for DedupTable {
    fn default() -> Self {
        Self::remembering(DEDUP_PUBLISHERS)
    }
}

impl DedupTable {
    /// A table that remembers the last requests of `publishers` publishers.
    pub fn remembering(publishers: usize) -> Self {
        Self {
            publishers: publishers.max(1),
            by_publisher: HashMap::new(),
            by_recency: BTreeMap::new(),
            tick: 0,
        }
    }

    /// An already logged request, if remembered.
    pub fn lookup(&self, publisher: &str, request_no: u64) -> Option<Logged> {
        self.by_publisher
            .get(publisher)?
            .requests
            .iter()
            .find(|(r, _)| *r == request_no)
            .map(|&(_, l)| l)
    }

    /// Remember a logged request.
    pub fn remember(&mut self, publisher: &str, request_no: u64, logged: Logged) {
        if publisher.is_empty() {
            return;
        }
        self.tick += 1;
        let tick = self.tick;
        let entry = match self.by_publisher.get_mut(publisher) {
            Some(entry) => {
                if let Some(name) = self.by_recency.remove(&entry.last_tick) {
                    self.by_recency.insert(tick, name);
                }
                entry.last_tick = tick;
                entry
            }
            None => {
                if self.by_publisher.len() >= self.publishers {
                    if let Some((_, quietest)) = self.by_recency.pop_first() {
                        self.by_publisher.remove(&quietest);
                    }
                }
                let name: Arc<str> = Arc::from(publisher);
                self.by_recency.insert(tick, name.clone());
                self.by_publisher.entry(name).or_insert(Remembered {
                    last_tick: tick,
                    requests: VecDeque::new(),
                })
            }
        };
        if entry.requests.len() >= DEDUP_PER_PUBLISHER {
            entry.requests.pop_front();
        }
        entry.requests.push_back((request_no, logged));
    }
}

/// The log of one shard.
#[derive(Debug)]
pub struct Wal {
    dir: PathBuf,
    opts: WalOptions,
    epoch: Epoch,
    segments: BTreeMap<Seq, Segment>,
    active: Arc<File>,
    /// Length of the active file: its records, then zeros.
    zeroed_to: u64,
    /// Cleared after zeroing ahead failed once (the log still works, at the old cost).
    zero_ahead: bool,
    head: Seq,
    unsynced: bool,
    last_sync: std::time::Instant,
    dedup: DedupTable,
    /// Held (locked) for as long as this log is open.
    _lock: File,
}

/// An fsync of the active segment, handed out so it can run off the writer's thread.
#[derive(Debug)]
pub struct PendingSync {
    file: Arc<File>,
    path: PathBuf,
}

impl PendingSync {
    /// Is this an fsync of the same file as `other`?
    pub fn same_file(&self, other: &PendingSync) -> bool {
        Arc::ptr_eq(&self.file, &other.file)
    }

    /// Push the file's written data to disk.
    pub fn run(self) -> Result<(), WalError> {
        self.file.sync_data().map_err(io_err(&self.path))
    }
}

/// Take the directory's lock, or say who has it. The kernel lets go of it when the holder exits,
/// however it exits, so a crash never leaves the directory locked.
fn lock_dir(dir: &Path) -> Result<File, WalError> {
    let path = dir.join("LOCK");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err(&path))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => Err(WalError::InUse(dir.to_path_buf())),
        Err(fs::TryLockError::Error(e)) => Err(io_err(&path)(e)),
    }
}

/// Refuse a log that belongs to someone else, or set it aside when `opts` says to (then where,
/// and whose it was); claim one that belongs to nobody yet.
fn check_owner(dir: &Path, opts: &WalOptions) -> Result<Option<(PathBuf, String)>, WalError> {
    let owner = opts.owner.as_str();
    if owner.is_empty() {
        return Ok(None);
    }
    match fs::read_to_string(dir.join("owner")) {
        Ok(holds) if holds.trim() == owner => Ok(None),
        Ok(holds) if opts.set_aside_when.is_some_and(|f| f(holds.trim(), owner)) => {
            let aside = set_aside(dir, holds.trim())?;
            write_atomically(dir, "owner", owner.as_bytes())?;
            Ok(Some((aside, holds.trim().to_string())))
        }
        Ok(holds) => Err(WalError::NotOurs {
            dir: dir.to_path_buf(),
            holds: holds.trim().to_string(),
            wanted: owner.to_string(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            write_atomically(dir, "owner", owner.as_bytes()).map(|()| None)
        }
        Err(e) => Err(io_err(&dir.join("owner"))(e)),
    }
}

fn segment_name(first_seq: Seq) -> String {
    format!("{first_seq:020}.seg")
}

/// The kernel's id of this boot: the page cache, and so every write not yet synced, lives exactly
/// as long as it. `None` where the platform does not tell, which makes every unclean stop suspect.
fn boot_id() -> Option<String> {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

fn fsync_dir(dir: &Path) -> Result<(), WalError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

fn write_atomically(dir: &Path, name: &str, contents: &[u8]) -> Result<(), WalError> {
    let tmp = dir.join(format!("{name}.tmp"));
    let dst = dir.join(name);
    let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(contents).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, &dst).map_err(io_err(&dst))?;
    fsync_dir(dir)
}

/// Move the log in `dir` (every file but the lock, set-aside logs apart) into a subdirectory
/// named after `holds`, and leave an epoch above the log's, for the new log to take: receivers
/// that followed the old one then flush, whatever seqs they hold.
///
/// The owner file moves last, so a move cut short (a crash) is taken up again at the next
/// start, into the same subdirectory (still `.partial`, without an owner); once it has moved,
/// the directory is the new owner's, and what is aside is a whole log.
fn set_aside(dir: &Path, holds: &str) -> Result<PathBuf, WalError> {
    let old_epoch = fs::read_to_string(dir.join("epoch"))
        .ok()
        .and_then(|s| s.trim().parse::<Epoch>().ok());
    let label: String = holds
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(64)
        .collect();
    let begun = format!("{SET_ASIDE}{label}-");
    let mut partial = None;
    for e in fs::read_dir(dir).map_err(io_err(dir))? {
        let path = e.map_err(io_err(dir))?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if name.starts_with(&begun) && name.ends_with(PARTIAL) && !path.join("owner").exists() {
            partial = Some(path);
        }
    }
    let partial = match partial {
        Some(p) => p,
        None => {
            let secs = dci_proto::now_us() / 1_000_000;
            let p = dir.join(format!("{begun}{secs}{PARTIAL}"));
            fs::create_dir(&p).map_err(io_err(&p))?;
            p
        }
    };
    let mut names = Vec::new();
    for e in fs::read_dir(dir).map_err(io_err(dir))? {
        let name = e
            .map_err(io_err(dir))?
            .file_name()
            .to_string_lossy()
            .to_string();
        if name != "LOCK" && name != "owner" && !name.starts_with(SET_ASIDE) {
            names.push(name);
        }
    }
    names.push("owner".into());
    for name in names {
        fs::rename(dir.join(&name), partial.join(&name)).map_err(io_err(&dir.join(&name)))?;
    }
    fsync_dir(&partial)?;
    let aside = partial.with_file_name(
        partial
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .trim_end_matches(PARTIAL),
    );
    fs::rename(&partial, &aside).map_err(io_err(&partial))?;
    fsync_dir(dir)?;
    write_atomically(dir, "epoch", new_epoch(old_epoch).to_string().as_bytes())?;
    Ok(aside)
}

/// How the name of a subdirectory being filled with a log set aside ends.
const PARTIAL: &str = ".partial";

/// How the subdirectories of logs set aside begin.
const SET_ASIDE: &str = "set-aside-";

fn new_epoch(previous: Option<Epoch>) -> Epoch {
    // Epochs grow: clock-based, and always above the one they replace.
    let now = dci_proto::now_us();
    now.max(previous.map_or(0, |p| p + 1))
}

/// After a write or fsync of the log failed: what was written and not synced may be lost even
/// under this boot (a failed writeback can drop the pages), so the next start must take the log
/// as it takes one left by a crash of the machine, and give it a new epoch.
pub fn distrust_unsynced(dir: &Path) -> io::Result<()> {
    match fs::remove_file(dir.join("boot")) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Read the record at the reader's position. `Ok(None)` at a clean end; `Err(kind)` for a torn
/// or corrupt record.
fn read_record<R: Read>(r: &mut R, remaining: u64) -> Result<Option<(LogRecord, u64)>, Damage> {
    if remaining == 0 {
        return Ok(None);
    }
    if remaining < HEADER as u64 {
        return Err(Damage::Torn);
    }
    let mut header = [0u8; HEADER];
    r.read_exact(&mut header).map_err(|_| Damage::Torn)?;
    let len = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
    if len > MAX_RECORD || len == 0 {
        return Err(Damage::Corrupt(format!("record length {len}")));
    }
    if remaining < (HEADER + len) as u64 {
        return Err(Damage::Torn);
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).map_err(|_| Damage::Torn)?;
    if crc32c::crc32c(&payload) != crc {
        return Err(Damage::Corrupt("checksum mismatch".into()));
    }
    // Decoded from `Bytes`, the keys are slices of the payload rather than an allocation each:
    // a replay from disk decodes millions of them.
    let rec = LogRecord::decode(bytes::Bytes::from(payload))
        .map_err(|e| Damage::Corrupt(format!("undecodable record: {e}")))?;
    rec.check()?;
    Ok(Some((rec, (HEADER + len) as u64)))
}

/// Fewer bytes than any entry takes in a record: what bounds how many seqs damaged bytes held.
const MIN_ENTRY_BYTES: u64 = 4;

/// The highest seq a damaged part of the log (`bytes`, which may start and continue anywhere;
/// `before` the last seq known before it) may have given out: the highest of its intact records,
/// found past damage by trying every offset, and beyond that as many seqs as the damaged bytes
/// after the last of them could have held (zeros are space never written).
fn seqs_given_out(bytes: &[u8], before: Seq) -> Seq {
    let (highest, damaged) = scan(bytes);
    highest.max(before) + damaged.div_ceil(MIN_ENTRY_BYTES)
}

/// The highest seq of the intact records in `bytes` (0: none), and how many non-zero bytes
/// follow the last of them.
fn scan(bytes: &[u8]) -> (Seq, u64) {
    let (mut highest, mut damaged) = (0, 0u64);
    let mut at = 0;
    while at < bytes.len() {
        match record_at(bytes, at) {
            Some((last, n)) => {
                highest = highest.max(last);
                damaged = 0;
                at += n;
            }
            None => {
                damaged += u64::from(bytes[at] != 0);
                at += 1;
            }
        }
    }
    (highest, damaged)
}

/// The intact record at `at` in `bytes`, if there is one: (its last seq, its length).
fn record_at(bytes: &[u8], at: usize) -> Option<(Seq, usize)> {
    let header = bytes.get(at..at + HEADER)?;
    let len = u32::from_le_bytes(header[0..4].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(header[4..8].try_into().ok()?);
    let payload = bytes.get(at + HEADER..(at + HEADER).checked_add(len)?)?;
    // A record starts with its first seq (field 1, a varint): most offsets fail here, before a
    // checksum over what may be megabytes.
    if len == 0 || len > MAX_RECORD || payload[0] != 0x08 || crc32c::crc32c(payload) != crc {
        return None;
    }
    let rec = LogRecord::decode(payload).ok()?;
    rec.check().ok()?;
    Some((rec.last_seq(), HEADER + len))
}

/// Ends every record written: field 15 (unknown to [`LogRecord`], so skipped when read) set to 1.
/// A record's last byte is then never zero, whatever its entries carry, so recovery can tell a
/// write cut short (its end reads back as zeros) from a whole record damaged since.
const END_MARK: [u8; 2] = [15 << 3, 1];

/// Could the damaged record at `off` be a write cut short? Its length must be one a write could
/// have begun (a cut only leaves zeros where the rest was to go), and its end must be missing:
/// past the end of the file, or zero. A record whose last byte is there was written whole
/// ([`END_MARK`]; records written before it ended in a zero byte only when their last entry
/// carried a trace id that did), so its damage came after, to a record that may have been
/// acknowledged.
fn may_be_torn(path: &Path, off: u64, size: u64) -> io::Result<bool> {
    let mut f = File::open(path)?;
    f.seek(SeekFrom::Start(off))?;
    let mut header = [0u8; HEADER];
    let got = f.read(&mut header)?;
    if got < HEADER {
        return Ok(true);
    }
    let len = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes")) as u64;
    if len == 0 || len > MAX_RECORD as u64 {
        // Zeros are not a record begun; more than any record is not a length ever written.
        return Ok(header[0..4] == [0; 4] && header[4..8] == [0; 4]);
    }
    let end = off + HEADER as u64 + len;
    if end > size {
        return Ok(true);
    }
    f.seek(SeekFrom::Start(end - 1))?;
    let mut last = [0u8; 1];
    f.read_exact(&mut last)?;
    Ok(last[0] == 0)
}

#[derive(Debug)]
enum Damage {
    Torn,
    Corrupt(String),
}

/// What follows the last good record of the last segment.
#[derive(Debug, PartialEq)]
enum Tail {
    /// Only zeros: space zeroed ahead of writes that never came.
    Zeros,
    /// A record whose claimed extent is followed only by zeros: a write cut short (zeroed space
    /// reads back where its end should be), never acknowledged under `fsync=always`.
    Torn,
    /// Anything else.
    Written,
}

fn unwritten_tail(path: &Path, off: u64, size: u64) -> io::Result<Tail> {
    let mut f = File::open(path)?;
    f.seek(SeekFrom::Start(off))?;
    let mut r = io::BufReader::new(f).take(size - off);
    let mut header = [0u8; HEADER];
    let got = r.read(&mut header)?;
    let len = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes")) as u64;
    let all_zero = |r: &mut dyn Read, mut skip: u64| -> io::Result<bool> {
        let mut buf = [0u8; 8192];
        loop {
            let n = r.read(&mut buf)?;
            if n == 0 {
                return Ok(true);
            }
            let from = skip.min(n as u64) as usize;
            skip -= from as u64;
            if buf[from..n].iter().any(|&b| b != 0) {
                return Ok(false);
            }
        }
    };
    if got == HEADER && header == [0u8; HEADER] {
        return Ok(if all_zero(&mut r, 0)? {
            Tail::Zeros
        } else {
            Tail::Written
        });
    }
    // A partial header, or a length past the end, is torn anyway; otherwise look past the record.
    let skip = if got < HEADER || len as usize > MAX_RECORD {
        0
    } else {
        len
    };
    Ok(if all_zero(&mut r, skip)? {
        Tail::Torn
    } else {
        Tail::Written
    })
}

impl Wal {
    /// Open (or create) the log in `dir`, recovering what is there.
    pub fn open(dir: &Path, opts: WalOptions) -> Result<(Wal, Recovery), WalError> {
        if dir.exists() && !dir.is_dir() {
            return Err(WalError::NotADirectory(dir.to_path_buf()));
        }
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let lock = lock_dir(dir)?;
        let set_aside = check_owner(dir, &opts)?;
        let mut recovery = Recovery {
            new_epoch: set_aside.is_some(),
            set_aside,
            ..Recovery::default()
        };
        let epoch_path = dir.join("epoch");
        recovery.had_log = epoch_path.exists();
        let stored_epoch = fs::read_to_string(&epoch_path)
            .ok()
            .and_then(|s| s.trim().parse::<Epoch>().ok());
        let clean_path = dir.join("clean");
        let was_clean = clean_path.exists();
        if was_clean {
            fs::remove_file(&clean_path).map_err(io_err(&clean_path))?;
        }
        let this_boot = boot_id();
        let same_boot = this_boot.is_some()
            && fs::read_to_string(dir.join("boot")).ok().as_deref() == this_boot.as_deref();

        let mut names: Vec<(Seq, PathBuf)> = Vec::new();
        for e in fs::read_dir(dir).map_err(io_err(dir))? {
            let e = e.map_err(io_err(dir))?;
            let name = e.file_name().to_string_lossy().to_string();
            if let Some(stem) = name.strip_suffix(".seg") {
                if let Ok(first) = stem.parse::<Seq>() {
                    names.push((first, e.path()));
                }
            }
        }
        names.sort();

        let mut segments = BTreeMap::new();
        let mut head: Seq = 0;
        let mut dedup = DedupTable::default();
        let mut corrupt = false;
        // The highest seq found given out, in damaged or set-aside parts included.
        let mut issued: Seq = 0;
        let count = names.len();
        for (i, (first, path)) in names.into_iter().enumerate() {
            let broken = head != 0 && first != head + 1;
            if corrupt || broken {
                if broken {
                    tracing::error!(segment = %path.display(), expected = head + 1, "segment does not continue the log");
                    corrupt = true;
                    recovery.corrupt_at = Some((path.clone(), 0));
                } else {
                    tracing::error!(segment = %path.display(), "segment after corruption set aside");
                }
                // Its name alone says that every seq before `first` was given out.
                let bytes = fs::read(&path).map_err(io_err(&path))?;
                issued = issued.max(seqs_given_out(&bytes, first.saturating_sub(1)));
                let aside = path.with_extension("seg.corrupt");
                fs::rename(&path, &aside).map_err(io_err(&path))?;
                continue;
            }
            let meta = fs::metadata(&path).map_err(io_err(&path))?;
            let size = meta.len();
            let mut f = io::BufReader::new(File::open(&path).map_err(io_err(&path))?);
            let mut off = 0u64;
            let mut index = Vec::new();
            let mut last_indexed: Option<u64> = None;
            let mut expected = if head == 0 { first } else { head + 1 };
            loop {
                match read_record(&mut f, size - off) {
                    Ok(None) => break,
                    Ok(Some((rec, n))) => {
                        if rec.first_seq != expected {
                            tracing::error!(segment = %path.display(), offset = off, expected, found = rec.first_seq, "log record out of sequence");
                            corrupt = true;
                            recovery.corrupt_at = Some((path.clone(), off));
                            break;
                        }
                        if last_indexed.is_none_or(|l| off - l >= INDEX_EVERY) {
                            index.push((rec.first_seq, off));
                            last_indexed = Some(off);
                        }
                        if !rec.publisher_id.is_empty() {
                            dedup.remember(
                                &rec.publisher_id,
                                rec.request_no,
                                Logged {
                                    first_seq: rec.first_seq,
                                    count: rec.entries.len() as u32,
                                    digest: record_digest(&rec),
                                },
                            );
                        }
                        head = rec.last_seq();
                        expected = head + 1;
                        off += n;
                        recovery.records += 1;
                    }
                    Err(damage) if i + 1 == count => {
                        // A write cut short ends the log: an intact record after it means the
                        // damage is elsewhere (a length field, say), and those records count.
                        let intact_after = || -> Result<bool, WalError> {
                            let bytes = fs::read(&path).map_err(io_err(&path))?;
                            Ok(scan(&bytes[off as usize..]).0 > head)
                        };
                        match (
                            damage,
                            unwritten_tail(&path, off, size).map_err(io_err(&path))?,
                        ) {
                            // The space zeroed ahead of the writes: the end of the log.
                            (_, Tail::Zeros) => {}
                            (Damage::Torn, _) | (_, Tail::Torn)
                                if !intact_after()?
                                    && may_be_torn(&path, off, size).map_err(io_err(&path))? =>
                            {
                                recovery.torn_bytes = size - off;
                                tracing::warn!(segment = %path.display(), offset = off, bytes = size - off, "truncating a torn write at the end of the log");
                            }
                            (Damage::Torn, _) | (_, Tail::Torn) => {
                                tracing::error!(segment = %path.display(), offset = off, last_good_seq = head, "damaged log record, written whole or with intact records after it: recovering up to it");
                                corrupt = true;
                                recovery.corrupt_at = Some((path.clone(), off));
                            }
                            (Damage::Corrupt(why), Tail::Written) => {
                                tracing::error!(segment = %path.display(), offset = off, %why, last_good_seq = head, "corrupt log record: recovering up to it");
                                corrupt = true;
                                recovery.corrupt_at = Some((path.clone(), off));
                            }
                        }
                        break;
                    }
                    Err(Damage::Torn) => {
                        tracing::error!(segment = %path.display(), offset = off, "record cut short in the middle of the log");
                        corrupt = true;
                        recovery.corrupt_at = Some((path.clone(), off));
                        break;
                    }
                    Err(Damage::Corrupt(why)) => {
                        tracing::error!(segment = %path.display(), offset = off, %why, last_good_seq = head, "corrupt log record: recovering up to it");
                        corrupt = true;
                        recovery.corrupt_at = Some((path.clone(), off));
                        break;
                    }
                }
            }
            if off < size {
                if corrupt {
                    // Kept for whoever looks into the damage, and read for the seqs it gave out.
                    let mut cut = Vec::new();
                    let mut f = File::open(&path).map_err(io_err(&path))?;
                    f.seek(SeekFrom::Start(off)).map_err(io_err(&path))?;
                    f.read_to_end(&mut cut).map_err(io_err(&path))?;
                    issued = issued.max(seqs_given_out(&cut, head));
                    let name = format!("{}.cut-{off}", path.display());
                    let kept = PathBuf::from(name);
                    fs::write(&kept, &cut).map_err(io_err(&kept))?;
                }
                let file = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(io_err(&path))?;
                file.set_len(off).map_err(io_err(&path))?;
                file.sync_all().map_err(io_err(&path))?;
            }
            segments.insert(
                first,
                Segment {
                    first_seq: first,
                    path: path.clone(),
                    len: off,
                    index,
                    last_write: meta.modified().unwrap_or_else(|_| SystemTime::now()),
                },
            );
        }

        // A segment is named after its first seq: those before it were given out (and dropped by
        // retention), even when damage left none of its own records.
        if let Some((&first, _)) = segments.first_key_value() {
            head = head.max(first.saturating_sub(1));
        }

        // A lost part (corruption, or a machine crash that took unsynced writes) means receivers
        // may hold seqs the log no longer has: a new epoch makes them flush instead of trusting
        // reused seqs.
        let maybe_lost = !was_clean && !same_boot;
        let epoch = match stored_epoch {
            Some(e) if !(corrupt || (maybe_lost && head > 0)) => e,
            prev => {
                recovery.new_epoch = true;
                let e = new_epoch(prev);
                write_atomically(dir, "epoch", e.to_string().as_bytes())?;
                e
            }
        };

        // Drop empty segments except a lone first one, then open (or create) the active one.
        let active_first = match segments.last_key_value() {
            Some((&first, _)) => first,
            None => {
                let first = head + 1;
                let path = dir.join(segment_name(first));
                File::create(&path).map_err(io_err(&path))?;
                fsync_dir(dir)?;
                segments.insert(
                    first,
                    Segment {
                        first_seq: first,
                        path,
                        len: 0,
                        index: Vec::new(),
                        last_write: SystemTime::now(),
                    },
                );
                first
            }
        };
        let active_path = segments[&active_first].path.clone();
        // Written at explicit offsets: the file runs past the last record once zeroed ahead.
        let active = OpenOptions::new()
            .write(true)
            .open(&active_path)
            .map_err(io_err(&active_path))?;
        let zeroed_to = segments[&active_first].len;
        if !was_clean {
            // What the last run wrote but did not sync is about to be served again: make it
            // durable before this boot is recorded as the log's.
            active.sync_all().map_err(io_err(&active_path))?;
        }
        if let Some(b) = &this_boot {
            write_atomically(dir, "boot", b.as_bytes())?;
        }
        let mut wal = Wal {
            dir: dir.to_path_buf(),
            opts,
            epoch,
            segments,
            active: Arc::new(active),
            zeroed_to,
            zero_ahead: true,
            head,
            unsynced: false,
            last_sync: std::time::Instant::now(),
            dedup,
            _lock: lock,
        };
        if issued > wal.head {
            let void = LogRecord {
                first_seq: wal.head + 1,
                void_to: issued,
                ..Default::default()
            };
            tracing::error!(
                first = void.first_seq, last = issued,
                "seqs given out before the corruption are lost: voided, never to be given out again"
            );
            recovery.voided = Some((void.first_seq, issued));
            wal.write(std::slice::from_ref(&void))?;
            wal.sync()?;
        }
        Ok((wal, recovery))
    }

    /// The log's epoch.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }
    /// Last seq in the log (0 when empty).
    pub fn head(&self) -> Seq {
        self.head
    }
    /// First seq still held on disk.
    pub fn oldest(&self) -> Seq {
        self.segments
            .first_key_value()
            .map_or(self.head + 1, |(&f, _)| f)
    }
    /// Bytes on disk.
    pub fn bytes(&self) -> u64 {
        self.segments.values().map(|s| s.len).sum()
    }
    /// Number of segment files.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }
    /// The idempotency memory.
    pub fn dedup(&self) -> &DedupTable {
        &self.dedup
    }
    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Append records (seqs must continue the log). Durable per the fsync policy when this
    /// returns: `always` syncs here, `interval` when the interval has passed.
    pub fn append(&mut self, records: &[LogRecord]) -> Result<(), WalError> {
        self.write(records)?;
        self.zero_ahead();
        self.sync_per_policy()
    }

    /// Zero the active segment ahead of its last record, when what is zeroed runs short; best
    /// called right after a write, once its records are on their way. Without it the log works
    /// as well, each fsync just costs more, so a failure is only reported, once.
    pub fn zero_ahead(&mut self) {
        let (_, seg) = self.active_segment();
        let (len, path) = (seg.len, seg.path.clone());
        if !self.zero_ahead || self.zeroed_to >= len + ZEROED_AHEAD / 2 {
            return;
        }
        let from = self.zeroed_to.max(len);
        let zeros = vec![0u8; (len + ZEROED_AHEAD - from) as usize];
        match std::os::unix::fs::FileExt::write_all_at(&*self.active, &zeros, from) {
            Ok(()) => self.zeroed_to = from + zeros.len() as u64,
            Err(e) => {
                self.zero_ahead = false;
                tracing::warn!(segment = %path.display(), error = %e, "could not zero the log ahead of its writes; going on without");
            }
        }
    }

    /// Make written records durable as the fsync policy asks.
    pub fn sync_per_policy(&mut self) -> Result<(), WalError> {
        match self.take_sync() {
            Some(s) => s.run(),
            None => Ok(()),
        }
    }

    /// The fsync the policy asks for now, to be run by the caller (on any thread) before it
    /// acknowledges what was written so far; `None` when no fsync is due. The log counts the
    /// written records as synced from here on.
    pub fn take_sync(&mut self) -> Option<PendingSync> {
        let due = match self.opts.fsync {
            FsyncPolicy::Always => true,
            FsyncPolicy::Interval => self.last_sync.elapsed() >= self.opts.fsync_interval,
            FsyncPolicy::Never => false,
        };
        if !due || !self.unsynced {
            return None;
        }
        self.unsynced = false;
        self.last_sync = std::time::Instant::now();
        Some(PendingSync {
            file: self.active.clone(),
            path: self.active_segment().1.path.clone(),
        })
    }

    /// Write records (seqs must continue the log) without syncing: once this returns they survive
    /// a crash of the process, and [`Wal::sync_per_policy`] makes them survive the machine's.
    pub fn write(&mut self, records: &[LogRecord]) -> Result<(), WalError> {
        if records.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(records.len() * 64);
        let (mut seg_first, _) = self.active_segment();
        for rec in records {
            debug_assert_eq!(rec.first_seq, self.head + 1);
            if self.segments[&seg_first].len + buf.len() as u64 >= self.opts.segment_bytes
                && self.segments[&seg_first].len + (buf.len() as u64) > 0
            {
                self.write_active(&mut buf)?;
                self.roll(rec.first_seq)?;
                seg_first = rec.first_seq;
            }
            let mut payload = Vec::with_capacity(rec.encoded_len() + END_MARK.len());
            rec.encode(&mut payload).expect("a Vec grows");
            payload.extend_from_slice(&END_MARK);
            let off = self.segments[&seg_first].len + buf.len() as u64;
            let seg = self.segments.get_mut(&seg_first).expect("active segment");
            if seg
                .index
                .last()
                .is_none_or(|&(_, o)| off - o >= INDEX_EVERY)
            {
                seg.index.push((rec.first_seq, off));
            }
            buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            buf.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
            buf.extend_from_slice(&payload);
            self.head = rec.last_seq();
            if !rec.publisher_id.is_empty() {
                self.dedup.remember(
                    &rec.publisher_id,
                    rec.request_no,
                    Logged {
                        first_seq: rec.first_seq,
                        count: rec.entries.len() as u32,
                        digest: record_digest(rec),
                    },
                );
            }
        }
        self.write_active(&mut buf)
    }

    fn active_segment(&self) -> (Seq, &Segment) {
        let (&k, s) = self.segments.last_key_value().expect("always one segment");
        (k, s)
    }

    fn write_active(&mut self, buf: &mut Vec<u8>) -> Result<(), WalError> {
        if buf.is_empty() {
            return Ok(());
        }
        let (k, _) = self.active_segment();
        let seg = self.segments.get_mut(&k).expect("active segment");
        std::os::unix::fs::FileExt::write_all_at(&*self.active, buf, seg.len)
            .map_err(io_err(&seg.path))?;
        seg.len += buf.len() as u64;
        self.zeroed_to = self.zeroed_to.max(seg.len);
        seg.last_write = SystemTime::now();
        self.unsynced = true;
        buf.clear();
        Ok(())
    }

    fn roll(&mut self, first_seq: Seq) -> Result<(), WalError> {
        self.cut_to_records()?;
        self.sync()?;
        let path = self.dir.join(segment_name(first_seq));
        self.active = Arc::new(
            OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .open(&path)
                .map_err(io_err(&path))?,
        );
        self.zeroed_to = 0;
        fsync_dir(&self.dir)?;
        self.segments.insert(
            first_seq,
            Segment {
                first_seq,
                path,
                len: 0,
                index: Vec::new(),
                last_write: SystemTime::now(),
            },
        );
        Ok(())
    }

    /// Drop the zeros past the active segment's last record (synced with the next sync), so that
    /// only the active segment ever ends in zeros.
    fn cut_to_records(&mut self) -> Result<(), WalError> {
        let (_, seg) = self.active_segment();
        if self.zeroed_to > seg.len {
            self.active.set_len(seg.len).map_err(io_err(&seg.path))?;
            self.zeroed_to = seg.len;
            self.unsynced = true;
        }
        Ok(())
    }

    /// Push written records to disk.
    pub fn sync(&mut self) -> Result<(), WalError> {
        if self.unsynced {
            let (_, seg) = self.active_segment();
            let path = seg.path.clone();
            self.active.sync_data().map_err(io_err(&path))?;
            self.unsynced = false;
        }
        self.last_sync = std::time::Instant::now();
        Ok(())
    }

    /// For `interval`: sync if the interval passed with writes pending.
    pub fn sync_if_due(&mut self) -> Result<(), WalError> {
        if self.unsynced && self.last_sync.elapsed() >= self.opts.fsync_interval {
            self.sync()?;
        }
        Ok(())
    }

    /// Mark a clean stop (everything synced), so the next start keeps the epoch under any policy.
    pub fn close(mut self) -> Result<(), WalError> {
        self.cut_to_records()?;
        self.sync()?;
        write_atomically(&self.dir, "clean", b"")
    }

    /// Delete the oldest segments beyond the retention bounds (never the active one).
    /// Returns the seqs now gone (the new oldest).
    pub fn enforce_retention(&mut self, now: SystemTime) -> Result<Seq, WalError> {
        loop {
            if self.segments.len() <= 1 {
                break;
            }
            let total = self.bytes();
            let (&first, seg) = self.segments.first_key_value().expect("non-empty");
            let too_old = now
                .duration_since(seg.last_write)
                .is_ok_and(|age| age > self.opts.retention_age);
            if total <= self.opts.retention_bytes && !too_old {
                break;
            }
            let path = seg.path.clone();
            self.segments.remove(&first);
            fs::remove_file(&path).map_err(io_err(&path))?;
            tracing::info!(segment = %path.display(), "log segment removed by retention");
        }
        Ok(self.oldest())
    }

    /// A reader for replay from disk, usable from other threads while the writer appends.
    pub fn reader(&self) -> LogReader {
        LogReader {
            segments: self
                .segments
                .values()
                .map(|s| (s.first_seq, s.path.clone(), s.index.clone()))
                .collect(),
        }
    }
}

/// A snapshot of the segment list, to read records from disk.
#[derive(Debug, Clone, Default)]
pub struct LogReader {
    segments: Vec<SegmentRef>,
}

/// (first seq, file, sparse index of (record first seq, offset)).
type SegmentRef = (Seq, PathBuf, Vec<(Seq, u64)>);

impl LogReader {
    /// Records holding seqs from `from` on (the first may start before `from`), up to about
    /// `max_bytes`, in order and each following the one before. Empty when `from` is not on disk
    /// (gone, not yet written, or in a record damaged since); they stop short of damage.
    pub fn read_from(&self, from: Seq, max_bytes: usize) -> io::Result<Vec<LogRecord>> {
        let pos = self
            .segments
            .partition_point(|(first, _, _)| *first <= from);
        if pos == 0 {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        let mut used = 0usize;
        for (i, (_, path, index)) in self.segments.iter().enumerate().skip(pos - 1) {
            let start = if i == pos - 1 {
                let k = index.partition_point(|(s, _)| *s <= from);
                if k == 0 {
                    0
                } else {
                    index[k - 1].1
                }
            } else {
                0
            };
            let mut f = match File::open(path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
                Err(e) => return Err(e),
            };
            let size = f.metadata()?.len();
            f.seek(SeekFrom::Start(start))?;
            let mut r = io::BufReader::new(f);
            let mut off = start;
            loop {
                let (rec, n) = match read_record(&mut r, size - off) {
                    Ok(Some(read)) => read,
                    Ok(None) => break,
                    // Damaged since it was written (recovery took it whole), or being written at
                    // the end: what follows is not the records' continuation. Going on to the
                    // next segment gave batches whose range spanned the damaged seqs without
                    // their entries, which receivers take for entries filtered out.
                    Err(_) => return Ok(out),
                };
                off += n;
                if rec.last_seq() < from {
                    continue;
                }
                // Each record follows the one before it, the first holds `from`: a record that
                // does not is no continuation either.
                let follows = match out.last() {
                    Some(p) => p.last_seq() + 1 == rec.first_seq,
                    None => rec.first_seq <= from,
                };
                if !follows {
                    return Ok(out);
                }
                used += n as usize;
                out.push(rec);
                if used >= max_bytes {
                    return Ok(out);
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn rec(first: Seq, n: usize, publisher: &str, req: u64) -> LogRecord {
        LogRecord {
            first_seq: first,
            publisher_id: publisher.into(),
            request_no: req,
            entries: (0..n)
                .map(|i| pb::Invalidation {
                    key: Bytes::from(format!("key-{}", first + i as u64)),
                    kind: pb::Kind::Key as i32,
                    seq: first + i as u64,
                    ..Default::default()
                })
                .collect(),
            void_to: 0,
        }
    }

    fn logged(first_seq: Seq) -> Logged {
        Logged {
            first_seq,
            count: 1,
            digest: 0,
        }
    }

    #[test]
    fn dedup_forgets_the_quietest_publisher_not_the_first_seen() {
        let mut t = DedupTable::default();
        t.remember("long-lived", 1, logged(1));
        for i in 0..DEDUP_PUBLISHERS as u64 * 3 {
            t.remember(&format!("cli-{i}"), 1, logged(i + 2));
            if i % 100 == 0 {
                t.remember("long-lived", i + 2, logged(i + 2));
            }
        }
        // Its last DEDUP_PER_PUBLISHER requests, the first of them from long before most of
        // the others came.
        let requests: Vec<u64> = (0..DEDUP_PUBLISHERS as u64 * 3)
            .step_by(100)
            .map(|i| i + 2)
            .collect();
        for &r in &requests[requests.len() - DEDUP_PER_PUBLISHER..] {
            assert_eq!(t.lookup("long-lived", r), Some(logged(r)), "request {r}");
        }
        assert_eq!(t.lookup("cli-0", 1), None, "the quietest are forgotten");
        let newest = DEDUP_PUBLISHERS as u64 * 3 - 1;
        assert_eq!(
            t.lookup(&format!("cli-{newest}"), 1),
            Some(logged(newest + 2))
        );
        assert_eq!(t.by_publisher.len(), DEDUP_PUBLISHERS);
        assert_eq!(t.by_recency.len(), DEDUP_PUBLISHERS);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]
        /// Against a plain model: a list of publishers from quietest to most recent, each with its
        /// last `DEDUP_PER_PUBLISHER` requests.
        #[test]
        fn dedup_remembers_the_last_requests_of_the_most_recent_publishers(
            capacity in 1usize..6,
            ops in proptest::collection::vec((0u8..10, 0u64..400), 0..300),
        ) {
            let mut t = DedupTable::remembering(capacity);
            let mut model: Vec<(String, Vec<u64>)> = Vec::new();
            for (i, &(p, req)) in ops.iter().enumerate() {
                let name = format!("p{p}");
                t.remember(&name, req, logged(i as Seq));
                let mut reqs = match model.iter().position(|(n, _)| *n == name) {
                    Some(at) => model.remove(at).1,
                    None => {
                        if model.len() >= capacity {
                            model.remove(0);
                        }
                        Vec::new()
                    }
                };
                if reqs.len() >= DEDUP_PER_PUBLISHER {
                    reqs.remove(0);
                }
                reqs.push(req);
                model.push((name, reqs));
            }
            for p in 0u8..10 {
                let name = format!("p{p}");
                let kept = model.iter().find(|(n, _)| *n == name);
                for req in 0u64..400 {
                    let expected = kept.is_some_and(|(_, reqs)| reqs.contains(&req));
                    proptest::prop_assert_eq!(t.lookup(&name, req).is_some(), expected);
                }
            }
            proptest::prop_assert_eq!(t.by_recency.len(), t.by_publisher.len());
        }
    }

    #[test]
    fn reopen_keeps_everything_and_dedup() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, r) = Wal::open(dir.path(), WalOptions::default()).unwrap();
        assert!(r.new_epoch);
        let epoch = w.epoch();
        w.append(&[rec(1, 3, "p", 1), rec(4, 2, "p", 2)]).unwrap();
        drop(w);
        let (w, r) = Wal::open(dir.path(), WalOptions::default()).unwrap();
        assert_eq!(w.head(), 5);
        assert_eq!(w.epoch(), epoch);
        assert!(!r.new_epoch);
        assert_eq!(
            w.dedup().lookup("p", 2).map(|l| (l.first_seq, l.count)),
            Some((4, 2))
        );
        let recs = w.reader().read_from(4, usize::MAX).unwrap();
        assert_eq!(recs.len(), 1);
        assert_eq!(recs[0].first_seq, 4);
    }

    /// Two writers on one directory would both hand out the seqs after the head.
    #[test]
    fn a_log_open_elsewhere_is_refused_until_it_is_let_go() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, _) = Wal::open(dir.path(), WalOptions::default()).unwrap();
        w.append(&[rec(1, 3, "p", 1)]).unwrap();
        match Wal::open(dir.path(), WalOptions::default()) {
            Err(e @ WalError::InUse(_)) => assert!(e.to_string().contains("in use"), "{e}"),
            other => panic!("a second open must be refused, got {other:?}"),
        }
        // The refused open touched nothing: the first goes on, and its records stay.
        w.append(&[rec(4, 1, "p", 2)]).unwrap();
        w.close().unwrap();
        let (w, r) = Wal::open(dir.path(), WalOptions::default()).unwrap();
        assert_eq!(w.head(), 4);
        assert!(!r.new_epoch, "the first writer's clean close was kept");
        drop(w);
        // Dropped without a close, as in a crash: the lock goes with it.
        assert!(Wal::open(dir.path(), WalOptions::default()).is_ok());
        // A file where the directory should be is named as such.
        let file = dir.path().join("not-a-dir");
        fs::write(&file, b"x").unwrap();
        match Wal::open(&file, WalOptions::default()) {
            Err(e @ WalError::NotADirectory(_)) => assert!(e.to_string().contains("is a file")),
            other => panic!("got {other:?}"),
        }
    }

    /// Volumes swapped between shards, or the shard count changed over old logs: each log stays
    /// with the shard that wrote it.
    #[test]
    fn a_log_is_refused_to_anyone_but_its_owner() {
        let dir = tempfile::tempdir().unwrap();
        let as_owner = |owner: &str| WalOptions {
            owner: owner.into(),
            ..WalOptions::default()
        };
        let (mut w, _) = Wal::open(dir.path(), as_owner("shard 0 of 2")).unwrap();
        w.append(&[rec(1, 3, "p", 1)]).unwrap();
        w.close().unwrap();
        for other in ["shard 1 of 2", "shard 0 of 3"] {
            match Wal::open(dir.path(), as_owner(other)) {
                Err(e @ WalError::NotOurs { .. }) => {
                    let m = e.to_string();
                    assert!(
                        m.contains("holds the log of shard 0 of 2") && m.contains(other),
                        "{m}"
                    );
                }
                r => panic!("{other} must be refused, got {:?}", r.map(|_| ())),
            }
        }
        let (w, r) = Wal::open(dir.path(), as_owner("shard 0 of 2")).unwrap();
        assert_eq!(w.head(), 3, "refused opens touched nothing");
        assert!(!r.new_epoch);
    }

    /// A change of the shard count, with `set_aside_when` saying so: the shard's log is kept
    /// aside whole and a new one begins under a higher epoch; another shard's log is still
    /// refused, and a log set aside is never moved again.
    #[test]
    fn a_log_set_aside_on_a_reshard_is_kept_whole_under_a_new_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let as_owner = |owner: &str| WalOptions {
            owner: owner.into(),
            set_aside_when: Some(crate::config::same_shard_other_count),
            ..WalOptions::default()
        };
        let (mut w, _) = Wal::open(dir.path(), as_owner("shard 0 of 2")).unwrap();
        w.append(&[rec(1, 3, "p", 1)]).unwrap();
        let old_epoch = w.epoch();
        w.close().unwrap();
        assert!(matches!(
            Wal::open(dir.path(), as_owner("shard 1 of 3")),
            Err(WalError::NotOurs { .. })
        ));
        let (w, r) = Wal::open(dir.path(), as_owner("shard 0 of 3")).unwrap();
        assert_eq!(w.head(), 0, "a new log");
        assert!(w.epoch() > old_epoch && r.new_epoch);
        let (aside, was) = r.set_aside.clone().unwrap();
        assert_eq!(was, "shard 0 of 2");
        assert!(aside.starts_with(dir.path()));
        // The old log, whole: opened where it was set aside, it has its records and epoch.
        let (old, _) = Wal::open(&aside, as_owner("shard 0 of 2")).unwrap();
        assert_eq!((old.head(), old.epoch()), (3, old_epoch));
        drop(old);
        w.close().unwrap();
        let (w, r) = Wal::open(dir.path(), as_owner("shard 0 of 3")).unwrap();
        assert!(r.set_aside.is_none() && !r.new_epoch, "its own log now");
        let epoch = w.epoch();
        w.close().unwrap();
        // Back to two shards: the log of three goes aside too, and the first stays where it is.
        let (w, r) = Wal::open(dir.path(), as_owner("shard 0 of 2")).unwrap();
        assert!(w.epoch() > epoch);
        let (second, _) = r.set_aside.unwrap();
        assert_ne!(second, aside);
        assert!(aside.join("epoch").exists() && !second.join(aside.file_name().unwrap()).exists());
        // Without set_aside_when, another count's log is refused as before.
        drop(w);
        let strict = WalOptions {
            owner: "shard 0 of 5".into(),
            ..WalOptions::default()
        };
        assert!(matches!(
            Wal::open(dir.path(), strict),
            Err(WalError::NotOurs { .. })
        ));

        // A set-aside cut short (the segments moved, the rest not) is taken up where it was.
        let dir = tempfile::tempdir().unwrap();
        let (mut w, _) = Wal::open(dir.path(), as_owner("shard 2 of 4")).unwrap();
        w.append(&[rec(1, 5, "p", 1)]).unwrap();
        w.close().unwrap();
        let partial = dir.path().join("set-aside-shard-2-of-4-7.partial");
        fs::create_dir(&partial).unwrap();
        for e in fs::read_dir(dir.path()).unwrap() {
            let name = e.unwrap().file_name();
            if name.to_string_lossy().ends_with(".seg") {
                fs::rename(dir.path().join(&name), partial.join(&name)).unwrap();
            }
        }
        let (w, r) = Wal::open(dir.path(), as_owner("shard 2 of 8")).unwrap();
        let aside = dir.path().join("set-aside-shard-2-of-4-7");
        assert_eq!(r.set_aside.unwrap().0, aside);
        assert_eq!(w.head(), 0);
        drop(w);
        let (old, _) = Wal::open(&aside, as_owner("shard 2 of 4")).unwrap();
        assert_eq!(old.head(), 5, "whole again");
    }

    #[test]
    fn segments_roll_and_retention_drops_oldest() {
        let dir = tempfile::tempdir().unwrap();
        let opts = WalOptions {
            segment_bytes: 200,
            retention_bytes: 600,
            ..Default::default()
        };
        let (mut w, _) = Wal::open(dir.path(), opts.clone()).unwrap();
        for i in 0..40 {
            w.append(&[rec(i * 2 + 1, 2, "", 0)]).unwrap();
        }
        assert!(w.segments.len() > 3);
        let oldest = w.enforce_retention(SystemTime::now()).unwrap();
        assert!(oldest > 1);
        assert!(w.bytes() <= 600 + 200);
        assert!(w.reader().read_from(1, usize::MAX).unwrap().is_empty());
        let recs = w.reader().read_from(oldest, usize::MAX).unwrap();
        assert_eq!(recs[0].first_seq, oldest);
        assert_eq!(recs.last().unwrap().last_seq(), 80);
        drop(w);
        let (w, _) = Wal::open(dir.path(), opts).unwrap();
        assert_eq!((w.oldest(), w.head()), (oldest, 80));
    }

    #[test]
    fn age_retention() {
        let dir = tempfile::tempdir().unwrap();
        let opts = WalOptions {
            segment_bytes: 100,
            retention_age: Duration::from_secs(60),
            ..Default::default()
        };
        let (mut w, _) = Wal::open(dir.path(), opts).unwrap();
        for i in 0..10 {
            w.append(&[rec(i * 2 + 1, 2, "", 0)]).unwrap();
        }
        let later = SystemTime::now() + Duration::from_secs(120);
        w.enforce_retention(later).unwrap();
        assert_eq!(w.segments.len(), 1, "only the active segment survives");
    }

    /// Length of the records of the only segment, and its file.
    /// (offset, payload length) of each record in the first `len` bytes of a segment.
    fn records_in(bytes: &[u8], len: usize) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        let mut at = 0;
        while at + HEADER <= len {
            let n = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
            out.push((at, n));
            at += HEADER + n;
        }
        out
    }

    fn only_segment(w: &Wal) -> (u64, PathBuf) {
        let seg = w.segments.values().next().unwrap();
        (seg.len, seg.path.clone())
    }

    #[test]
    fn torn_tail_is_truncated_and_seqs_continue() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, _) = Wal::open(dir.path(), WalOptions::default()).unwrap();
        w.append(&[rec(1, 3, "", 0), rec(4, 3, "", 0)]).unwrap();
        let (len, path) = only_segment(&w);
        drop(w);
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len - 5).unwrap(); // cut in the middle of the second record
        let (mut w, r) = Wal::open(dir.path(), WalOptions::default()).unwrap();
        assert_eq!(w.head(), 3);
        assert!(r.torn_bytes > 0);
        assert!(!r.new_epoch);
        w.append(&[rec(4, 1, "", 0)]).unwrap();
        drop(w);
        let (w, _) = Wal::open(dir.path(), WalOptions::default()).unwrap();
        assert_eq!(w.head(), 4);
    }

    /// The last record damaged after it was written whole (its end is there, not zeros): that is
    /// no torn write, and it may have been acknowledged. Its seqs are voided, never given out
    /// again, whether the log was closed (cut to its records) or not (zeroed ahead).
    #[test]
    fn a_last_record_damaged_after_it_was_written_is_corruption_not_a_torn_write() {
        for close in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let (mut w, _) = Wal::open(dir.path(), WalOptions::default()).unwrap();
            w.append(&[rec(1, 2, "", 0), rec(3, 2, "", 0), rec(5, 2, "", 0)])
                .unwrap();
            let (len, path) = only_segment(&w);
            if close {
                w.close().unwrap();
            } else {
                drop(w);
            }
            let mut bytes = fs::read(&path).unwrap();
            let (last, _) = *records_in(&bytes, len as usize).last().unwrap();
            bytes[last + HEADER + 3] ^= 0x10;
            fs::write(&path, &bytes).unwrap();
            let (mut w, r) = Wal::open(dir.path(), WalOptions::default()).unwrap();
            assert!(r.corrupt_at.is_some(), "close={close}");
            assert_eq!(r.torn_bytes, 0);
            assert!(r.new_epoch);
            let (first, to) = r.voided.expect("voided");
            assert!(first == 5 && to >= 6, "{:?}", r.voided);
            assert!(w.head() >= 6);
            let next = w.head() + 1;
            w.write(&[rec(next, 1, "", 0)]).unwrap();
        }
    }

    /// The same whatever a record's last entry carries: a trace id ending in a zero byte once
    /// made a whole record look like one whose end was never written.
    #[test]
    fn a_damaged_last_record_whose_entries_end_in_zero_is_still_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, _) = Wal::open(dir.path(), WalOptions::default()).unwrap();
        let mut last = rec(3, 2, "", 0);
        last.entries[1].trace_id = Some(Bytes::from_static(&[7, 7, 0]));
        w.append(&[rec(1, 2, "", 0), last]).unwrap();
        let (len, path) = only_segment(&w);
        drop(w);
        let mut bytes = fs::read(&path).unwrap();
        let (at, _) = *records_in(&bytes, len as usize).last().unwrap();
        bytes[at + HEADER + 3] ^= 0x10;
        fs::write(&path, &bytes).unwrap();
        let (w, r) = Wal::open(dir.path(), WalOptions::default()).unwrap();
        assert!(r.corrupt_at.is_some());
        assert_eq!(r.torn_bytes, 0);
        assert!(r.new_epoch);
        assert_eq!(r.voided.map(|v| v.0), Some(3));
        assert!(w.head() >= 4, "seqs 3 and 4 are never given out again");
    }

    /// A write cut short inside the zeroed space: the file is as long as ever, the record's end
    /// reads back as zeros.
    #[test]
    fn a_write_cut_short_in_zeroed_space_is_torn_not_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, _) = Wal::open(dir.path(), WalOptions::default()).unwrap();
        let epoch = w.epoch();
        w.append(&[rec(1, 3, "", 0), rec(4, 3, "", 0)]).unwrap();
        let (len, path) = only_segment(&w);
        drop(w);
        let mut bytes = fs::read(&path).unwrap();
        assert!(bytes.len() as u64 >= len + ZEROED_AHEAD / 2, "zeroed ahead");
        assert!(bytes[len as usize..].iter().all(|&b| b == 0));
        bytes[len as usize - 5..len as usize].fill(0);
        fs::write(&path, &bytes).unwrap();
        let (mut w, r) = Wal::open(dir.path(), WalOptions::default()).unwrap();
        assert_eq!(w.head(), 3);
        assert!(r.torn_bytes > 0);
        assert!(r.corrupt_at.is_none());
        if boot_id().is_some() {
            assert!(!r.new_epoch, "same boot, nothing acknowledged lost");
            assert_eq!(w.epoch(), epoch);
        }
        w.append(&[rec(4, 2, "", 0)]).unwrap();
        drop(w);
        let (w, _) = Wal::open(dir.path(), WalOptions::default()).unwrap();
        assert_eq!(w.head(), 5);
    }

    #[test]
    fn zeroed_space_ends_the_log_and_only_the_active_segment_has_it() {
        let dir = tempfile::tempdir().unwrap();
        let opts = WalOptions {
            segment_bytes: 4096,
            ..Default::default()
        };
        let (mut w, _) = Wal::open(dir.path(), opts.clone()).unwrap();
        let epoch = w.epoch();
        let mut next = 1;
        for req in 0..300 {
            w.append(&[rec(next, 3, "p", req)]).unwrap();
            next += 3;
        }
        assert!(w.segments.len() > 2);
        let records_len = |w: &Wal| -> Vec<(u64, u64)> {
            w.segments
                .values()
                .map(|s| (s.len, fs::metadata(&s.path).unwrap().len()))
                .collect()
        };
        let lens = records_len(&w);
        let (active, closed) = lens.split_last().unwrap();
        assert!(closed.iter().all(|(len, file)| len == file), "{lens:?}");
        assert!(active.1 >= active.0 + ZEROED_AHEAD / 2, "{lens:?}");
        drop(w); // not closed: recovery meets the zeros
        let (mut w, r) = Wal::open(dir.path(), opts.clone()).unwrap();
        assert_eq!(w.head(), next - 1);
        assert_eq!((r.torn_bytes, r.corrupt_at.is_none()), (0, true));
        if boot_id().is_some() {
            assert_eq!(w.epoch(), epoch);
        }
        assert_eq!(
            w.dedup().lookup("p", 299).map(|l| (l.first_seq, l.count)),
            Some((next - 3, 3))
        );
        w.append(&[rec(next, 1, "p", 300)]).unwrap();
        w.close().unwrap();
        let (w, r) = Wal::open(dir.path(), opts).unwrap();
        assert_eq!(w.head(), next);
        assert!(!r.new_epoch);
        let lens = records_len(&w);
        assert!(
            lens.iter().all(|(len, file)| len == file),
            "closed: cut to its records {lens:?}"
        );
        let got = w.reader().read_from(1, usize::MAX).unwrap();
        assert_eq!(got.last().unwrap().last_seq(), next);
    }

    /// Zeros are the end only when nothing follows them: a zeroed record header in front of more
    /// records is corruption.
    #[test]
    fn zeros_in_front_of_records_are_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, _) = Wal::open(dir.path(), WalOptions::default()).unwrap();
        w.append(&[rec(1, 2, "", 0), rec(3, 2, "", 0), rec(5, 2, "", 0)])
            .unwrap();
        let (_, path) = only_segment(&w);
        drop(w);
        let mut bytes = fs::read(&path).unwrap();
        let first_len = u32::from_le_bytes(bytes[0..4].try_into().unwrap()) as usize;
        bytes[HEADER + first_len..HEADER + first_len + HEADER].fill(0);
        fs::write(&path, &bytes).unwrap();
        let (w, r) = Wal::open(dir.path(), WalOptions::default()).unwrap();
        assert!(r.corrupt_at.is_some());
        assert!(r.new_epoch);
        assert_eq!((w.head(), r.voided), (6, Some((3, 6))));
    }

    #[test]
    fn corrupt_record_stops_recovery_and_changes_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, _) = Wal::open(dir.path(), WalOptions::default()).unwrap();
        let epoch = w.epoch();
        w.append(&[rec(1, 2, "", 0), rec(3, 2, "", 0), rec(5, 2, "", 0)])
            .unwrap();
        let path = w.segments.values().next().unwrap().path.clone();
        drop(w);
        let mut bytes = fs::read(&path).unwrap();
        let first_len = u32::from_le_bytes(bytes[0..4].try_into().unwrap()) as usize;
        bytes[HEADER + first_len + HEADER + 2] ^= 0xff; // inside the second record's payload
        fs::write(&path, &bytes).unwrap();
        let (mut w, r) = Wal::open(dir.path(), WalOptions::default()).unwrap();
        assert!(r.corrupt_at.is_some());
        assert!(r.new_epoch);
        assert!(w.epoch() > epoch);
        // Seqs 3..=6 were given out: the intact record past the damage says so, and they are
        // voided rather than given out again.
        assert_eq!(r.voided, Some((3, 6)));
        assert_eq!(w.head(), 6);
        let recs = w.reader().read_from(1, usize::MAX).unwrap();
        let ranges: Vec<_> = recs
            .iter()
            .map(|r| (r.first_seq, r.last_seq(), r.entries.len()))
            .collect();
        assert_eq!(ranges, vec![(1, 2, 2), (3, 6, 0)]);
        // What was cut is kept beside the segment.
        let kept = fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                let name = e.as_ref().unwrap().file_name();
                name.to_string_lossy().contains(".seg.cut-")
            })
            .count();
        assert_eq!(kept, 1);
        w.write(&[rec(7, 1, "", 0)]).unwrap();
        w.close().unwrap();
        let (w, r) = Wal::open(dir.path(), WalOptions::default()).unwrap();
        assert_eq!(
            (w.head(), r.corrupt_at, r.voided, r.new_epoch),
            (7, None, None, false)
        );
    }

    /// Damage anywhere: in a length field (the records after it can only be found by trying
    /// every offset), in a segment that later segments follow (set aside, and read for their
    /// seqs), or in the only record of the oldest segment (its name still tells where it starts).
    #[test]
    fn seqs_past_damage_are_never_given_out_again() {
        let opts = WalOptions {
            segment_bytes: 300,
            ..Default::default()
        };
        let open = |dir: &Path| Wal::open(dir, opts.clone()).unwrap();
        // A length field.
        let dir = tempfile::tempdir().unwrap();
        let (mut w, _) = Wal::open(dir.path(), WalOptions::default()).unwrap();
        w.append(&[rec(1, 2, "", 0), rec(3, 2, "", 0), rec(5, 2, "", 0)])
            .unwrap();
        let (_, path) = only_segment(&w);
        drop(w);
        let mut bytes = fs::read(&path).unwrap();
        let first_len = u32::from_le_bytes(bytes[0..4].try_into().unwrap()) as usize;
        bytes[HEADER + first_len + 1] = 0x7f;
        fs::write(&path, &bytes).unwrap();
        let (w, r) = Wal::open(dir.path(), WalOptions::default()).unwrap();
        assert_eq!((w.head(), r.voided), (6, Some((3, 6))));

        // A segment followed by others.
        let dir = tempfile::tempdir().unwrap();
        let (mut w, _) = open(dir.path());
        for i in 0..30 {
            w.append(&[rec(i * 2 + 1, 2, "", 0)]).unwrap();
        }
        assert!(w.segment_count() > 3);
        let first_path = w.segments.values().next().unwrap().path.clone();
        drop(w);
        let mut bytes = fs::read(&first_path).unwrap();
        bytes[HEADER + 3] ^= 0x01;
        fs::write(&first_path, &bytes).unwrap();
        let (mut w, r) = open(dir.path());
        assert_eq!((w.head(), r.voided), (60, Some((1, 60))));
        assert_eq!(w.segment_count(), 1, "later segments set aside");
        w.append(&[rec(61, 1, "", 0)]).unwrap();
        let recs = w.reader().read_from(1, usize::MAX).unwrap();
        let ranges: Vec<_> = recs.iter().map(|r| (r.first_seq, r.last_seq())).collect();
        assert_eq!(ranges, vec![(1, 60), (61, 61)]);

        // The oldest segment left by retention, its only record damaged.
        let dir = tempfile::tempdir().unwrap();
        let (mut w, _) = open(dir.path());
        for i in 0..30 {
            w.append(&[rec(i * 2 + 1, 2, "", 0)]).unwrap();
        }
        let (last_first, last_path) = w
            .segments
            .iter()
            .map(|(f, s)| (*f, s.path.clone()))
            .next_back()
            .unwrap();
        drop(w);
        for e in fs::read_dir(dir.path()).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "seg") && p != last_path {
                fs::remove_file(p).unwrap();
            }
        }
        let mut bytes = fs::read(&last_path).unwrap();
        bytes.truncate(bytes.len().min(HEADER + 4));
        bytes[HEADER + 2] ^= 0x01;
        bytes.extend_from_slice(&[1; 64]);
        fs::write(&last_path, &bytes).unwrap();
        let (w, r) = open(dir.path());
        assert!(r.corrupt_at.is_some());
        assert!(
            w.head() >= last_first - 1,
            "seqs before the segment's name are not given out again"
        );
    }

    /// Bit rot anywhere in the records' payloads, in any segment, of a log closed cleanly or not:
    /// recovery never fails, never gives out a seq that was given out before, and the log goes on.
    mod damage {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(48))]
            #[test]
            fn no_seq_is_given_out_twice(
                sizes in prop::collection::vec(1usize..5, 1..14),
                small_segments in any::<bool>(),
                flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..4),
                close in any::<bool>(),
            ) {
                let dir = tempfile::tempdir().unwrap();
                let opts = WalOptions {
                    segment_bytes: if small_segments { 300 } else { 64 << 20 },
                    ..Default::default()
                };
                let (mut w, _) = Wal::open(dir.path(), opts.clone()).unwrap();
                let mut next = 1;
                for n in &sizes {
                    w.append(&[rec(next, *n, "p", next)]).unwrap();
                    next += *n as u64;
                }
                let given_out = next - 1;
                // Where every payload lies: (file, start, end).
                let mut payloads = Vec::new();
                for seg in w.segments.values() {
                    let bytes = fs::read(&seg.path).unwrap();
                    for (at, len) in records_in(&bytes, seg.len as usize) {
                        payloads.push((seg.path.clone(), at + HEADER, at + HEADER + len));
                    }
                }
                if close {
                    w.close().unwrap();
                } else {
                    drop(w);
                }
                let mut damaged = std::collections::BTreeMap::new();
                for (where_, mask) in &flips {
                    let (path, from, to) = &payloads[where_.index(payloads.len())];
                    let at = from + where_.index(to - from);
                    let bytes = fs::read(path).unwrap();
                    // Never zero: a zero at a record's end is what a write cut short leaves.
                    let b = if bytes[at] ^ mask == 0 { bytes[at] ^ 0x80 } else { bytes[at] ^ mask };
                    damaged.insert((path.clone(), at), b);
                }
                for ((path, at), b) in &damaged {
                    let mut bytes = fs::read(path).unwrap();
                    bytes[*at] = *b;
                    fs::write(path, &bytes).unwrap();
                }
                let (mut w, r) = Wal::open(dir.path(), opts.clone()).unwrap();
                prop_assert!(w.head() >= given_out, "head {} < {given_out}: {r:?}", w.head());
                prop_assert!(r.corrupt_at.is_some() && r.new_epoch, "{r:?}");
                let after = w.head() + 1;
                w.append(&[rec(after, 1, "p", 999)]).unwrap();
                drop(w);
                let (w, r) = Wal::open(dir.path(), opts).unwrap();
                prop_assert_eq!(w.head(), after);
                prop_assert!(r.corrupt_at.is_none(), "{r:?}");
            }
        }
    }

    #[test]
    fn unclean_stop_changes_epoch_only_across_a_reboot() {
        for fsync in [FsyncPolicy::Never, FsyncPolicy::Always] {
            let dir = tempfile::tempdir().unwrap();
            let opts = WalOptions {
                fsync,
                ..Default::default()
            };
            let (mut w, _) = Wal::open(dir.path(), opts.clone()).unwrap();
            w.append(&[rec(1, 1, "", 0)]).unwrap();
            let e1 = w.epoch();
            w.close().unwrap();
            let (mut w, r) = Wal::open(dir.path(), opts.clone()).unwrap();
            assert!(!r.new_epoch);
            assert_eq!(w.epoch(), e1);
            // Written, not synced, process gone: the page cache still has it.
            w.write(&[rec(2, 1, "", 0)]).unwrap();
            drop(w);
            let (mut w, r) = Wal::open(dir.path(), opts.clone()).unwrap();
            if boot_id().is_some() {
                assert!(!r.new_epoch, "{fsync:?}: same boot, nothing lost");
                assert_eq!(w.epoch(), e1);
                assert_eq!(w.head(), 2);
            } else {
                assert!(r.new_epoch);
            }
            let e2 = w.epoch();
            w.write(&[rec(3, 1, "", 0)]).unwrap();
            drop(w);
            // The machine went down: another boot finds the log without a clean stop.
            fs::write(dir.path().join("boot"), "another-boot").unwrap();
            let (w, r) = Wal::open(dir.path(), opts).unwrap();
            assert!(r.new_epoch, "{fsync:?}: a tail sent downstream may be gone");
            assert!(w.epoch() > e2);
        }
    }

    /// A failed write or fsync may have cost pages the page cache no longer holds, under this
    /// very boot: the next start gives the log a new epoch, as after a crash of the machine, and
    /// sequencing goes on after the last record there is.
    #[test]
    fn a_log_whose_writes_failed_gets_a_new_epoch_at_its_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, _) = Wal::open(dir.path(), WalOptions::default()).unwrap();
        w.append(&[rec(1, 1, "", 0)]).unwrap();
        let e1 = w.epoch();
        w.write(&[rec(2, 1, "", 0)]).unwrap();
        distrust_unsynced(dir.path()).unwrap();
        drop(w);
        let (w, r) = Wal::open(dir.path(), WalOptions::default()).unwrap();
        assert!(r.new_epoch);
        assert!(w.epoch() > e1);
        assert_eq!(w.head(), 2);
        // Marking a log twice, or one that was never started, is no error.
        distrust_unsynced(dir.path()).unwrap();
        distrust_unsynced(dir.path()).unwrap();
    }
}
