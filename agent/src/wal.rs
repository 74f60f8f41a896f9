//! The on-disk write-ahead queue between a source and the sender engine: opaque,
//! checksummed, bounded records (for the metrics path, one per scrape of [`crate::frame`]s).
//!
//! Sources [`Wal::append`] records; the sender reads them back with a [`WalReader`] and, once
//! the receiver acknowledged them, [`Wal::commit`]s its position. Calls from async code go
//! through [`blocking`], so the file I/O does not hold up other tasks on the worker.
//! The queue is bounded by `max_size_bytes`: the oldest segments are evicted, acked or not,
//! and every evicted record and item (frame) is counted.
//!
//! # On-disk layout (all integers little endian)
//!
//! ```text
//! <dir>/00000001.seg    segments, numbered by an increasing u64 index
//!   header  [4 "SRWL"][u32 version = 1][u64 first_seq][u32 crc32 of the previous 16 bytes][u32 0]
//!   record* [u32 len][u32 crc32 of (len, item_count, payload)][u32 item_count][len bytes payload]
//! <dir>/commit          [4 "SRWC"][u32 version = 1][u64 next_unacked_seq][u32 extra_len]
//!                       [extra_len bytes extra][u32 crc32 of everything before]
//! ```
//!
//! The sequence number of a record is `first_seq` of its segment plus its index in the
//! segment; a new segment starts where the previous one ended, so sequence numbers grow
//! monotonically across rolls and restarts. The commit file is replaced atomically (temp
//! file, rename); with a fsync policy other than `Never` the file and the directory are also
//! fsynced, for power loss. A process crash (`kill -9`) loses nothing either way: every append
//! and commit is in the page cache when the call returns.
//!
//! # Recovery
//!
//! [`Wal::open`] validates every record of every segment (a sequential read, like a
//! Prometheus WAL replay). A bad record in the newest segment truncates the file there (a
//! torn write of a crash); in an older segment the rest of that segment is skipped and the
//! lost records, known from the next segment's `first_seq`, are counted. Segments fully
//! below the commit position are deleted. Nothing in this module panics on bad input.
//!
//! Unix only in spirit: readers keep reading segments that get unlinked under them.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;

const SEGMENT_MAGIC: &[u8; 4] = b"SRWL";
const COMMIT_MAGIC: &[u8; 4] = b"SRWC";
const VERSION: u32 = 1;
/// Bytes of a segment header.
pub const SEGMENT_HEADER_LEN: u64 = 24;
/// Bytes of a record header.
pub const RECORD_HEADER_LEN: u64 = 12;
/// Largest accepted `extra` blob of a commit.
pub const MAX_COMMIT_EXTRA: usize = 1 << 20;
const COMMIT_FILE: &str = "commit";
const COMMIT_TMP: &str = "commit.tmp";
const SEGMENT_EXT: &str = "seg";

/// When appended data is flushed to stable storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// Leave it to the kernel; survives a process kill, not a power loss.
    Never,
    /// The owner calls [`Wal::sync`] at this interval; rolled segments are synced at the roll.
    Interval(Duration),
    /// `fdatasync` after every append, before `append` returns.
    Always,
}

/// Sizing and durability of a [`Wal`].
#[derive(Clone, Debug)]
pub struct WalOptions {
    /// Bound of all segments together; the oldest are evicted beyond it.
    pub max_size_bytes: u64,
    /// A segment is rolled before it would grow past this (a larger record gets its own).
    pub segment_size_bytes: u64,
    /// Durability of appends.
    pub fsync: FsyncPolicy,
    /// Refuse an append that would exceed the bound (`ErrorKind::StorageFull`) instead of
    /// evicting the oldest records: for a source that can wait and read again (the logs path,
    /// whose files are the second buffer).
    pub refuse_when_full: bool,
}

impl Default for WalOptions {
    fn default() -> Self {
        Self {
            max_size_bytes: 1 << 30,
            segment_size_bytes: 32 << 20,
            fsync: FsyncPolicy::Interval(Duration::from_secs(1)),
            refuse_when_full: false,
        }
    }
}

/// What [`Wal::open`] found and repaired.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Segments kept.
    pub segments: usize,
    /// Readable records kept.
    pub records: u64,
    /// Segments in which corruption was found (bad header or bad record).
    pub corrupt_segments: u64,
    /// Whole records known to be lost to corruption.
    pub corrupt_records: u64,
    /// Bytes cut from the end of the newest segment (torn or corrupt tail), plus files
    /// deleted for an unreadable header.
    pub truncated_bytes: u64,
    /// The commit file existed but was unreadable; reading restarts at the oldest record.
    pub corrupt_commit: bool,
}

/// Counters and gauges of a [`Wal`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WalStats {
    /// Bytes of all segment files.
    pub bytes: u64,
    /// Segment files, the one being written included.
    pub segments: usize,
    /// Sequence number the next append gets.
    pub next_seq: u64,
    /// All records below this are acknowledged.
    pub committed_seq: u64,
    /// Records appended since open.
    pub appended_records: u64,
    /// Samples appended since open.
    pub appended_items: u64,
    /// Segments deleted by the size bound.
    pub evicted_segments: u64,
    /// Unacknowledged records deleted by the size bound.
    pub evicted_records: u64,
    /// Samples of those records.
    pub evicted_items: u64,
    /// Records lost to corruption (at open, and found by readers).
    pub corrupt_records: u64,
    /// Failed appends (write or fsync errors, e.g. disk full).
    pub write_errors: u64,
}

/// One record read back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Its sequence number.
    pub seq: u64,
    /// The item count (frames) given to [`Wal::append`].
    pub item_count: u32,
    /// The payload given to [`Wal::append`].
    pub payload: Vec<u8>,
}

/// A segment file as known in memory.
#[derive(Debug)]
struct Segment {
    index: u64,
    first_seq: u64,
    /// Records readable from the start of the file.
    readable: u64,
    /// First sequence number after this segment. Equals `first_seq + readable` except for
    /// an older segment with a corrupt tail, where it is the next segment's `first_seq`.
    end_seq: u64,
    /// Sample count of every readable record.
    items: Vec<u32>,
    /// File length; the readable records end here.
    bytes: u64,
    /// Samples of all readable records before this segment, counted from open (lets a
    /// reader count the items it skipped over when segments are evicted under it).
    items_before: u64,
}

struct Inner {
    /// Oldest first; the last one is being written. Never empty.
    segments: VecDeque<Segment>,
    /// The last segment, opened for appending.
    active: Arc<File>,
    /// Set when the active segment may hold bytes past `bytes`; the next append rolls.
    needs_roll: bool,
    next_seq: u64,
    committed_seq: u64,
    committed_extra: Vec<u8>,
    total_bytes: u64,
    items_total: u64,
    stats: WalStats,
    /// Reused by `append` to issue one write per record.
    scratch: Vec<u8>,
    /// Tests: the next append writes half its record, then fails like a full disk.
    #[cfg(test)]
    fail_next_write: bool,
}

/// Records up to this payload size are copied next to their header and written at once.
const SMALL_RECORD: usize = 64 << 10;

/// The write-ahead queue. Share it with `Arc`; every method takes `&self`.
pub struct Wal {
    dir: PathBuf,
    opts: WalOptions,
    inner: Mutex<Inner>,
    /// Serialises commits so the commit file is written by one caller at a time.
    commit_lock: Mutex<()>,
    /// A commit was written but not made durable yet (interval fsync policy).
    commit_dirty: std::sync::atomic::AtomicBool,
    notify: Arc<Notify>,
    recovery: Recovery,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn invalid_input(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

fn segment_path(dir: &Path, index: u64) -> PathBuf {
    dir.join(format!("{index:08}.{SEGMENT_EXT}"))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn record_crc(len: u32, item_count: u32, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&len.to_le_bytes());
    h.update(&item_count.to_le_bytes());
    h.update(payload);
    h.finalize()
}

fn segment_header(first_seq: u64) -> [u8; SEGMENT_HEADER_LEN as usize] {
    let mut h = [0u8; SEGMENT_HEADER_LEN as usize];
    h[..4].copy_from_slice(SEGMENT_MAGIC);
    h[4..8].copy_from_slice(&VERSION.to_le_bytes());
    h[8..16].copy_from_slice(&first_seq.to_le_bytes());
    let crc = crc32fast::hash(&h[..16]);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    h
}

/// `first_seq` of a segment file, or `None` when the header is missing or damaged.
fn read_segment_header(path: &Path) -> io::Result<Option<u64>> {
    let mut h = [0u8; SEGMENT_HEADER_LEN as usize];
    let mut f = File::open(path)?;
    match f.read_exact(&mut h) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let ok = &h[..4] == SEGMENT_MAGIC && u32_at(&h, 4) == VERSION && u32_at(&h, 16) == crc32fast::hash(&h[..16]);
    Ok(ok.then(|| u64_at(&h, 8)))
}

/// Result of validating the records of one segment file.
#[derive(Default)]
struct Scan {
    items: Vec<u32>,
    /// End of the last valid record.
    valid_bytes: u64,
    file_len: u64,
    /// A complete record failed its CRC (as opposed to a torn, incomplete one).
    corrupt: bool,
    /// CRC-valid records found after the first bad one (lost with it).
    lost_after: u64,
}

/// Validates records from the header on, at most `max_records` of them.
fn scan_segment(path: &Path, max_records: u64) -> io::Result<Scan> {
    let file = File::open(path)?;
    let file_len = file.metadata()?.len();
    let mut r = io::BufReader::with_capacity(1 << 20, file);
    r.seek(SeekFrom::Start(SEGMENT_HEADER_LEN))?;
    let mut scan = Scan {
        valid_bytes: SEGMENT_HEADER_LEN.min(file_len),
        file_len,
        ..Scan::default()
    };
    let mut payload = Vec::new();
    let mut pos = SEGMENT_HEADER_LEN;
    let mut bad = false;
    loop {
        if scan.items.len() as u64 >= max_records && !bad {
            break;
        }
        match read_record_at(&mut r, pos, file_len, &mut payload)? {
            RecordRead::Ok { item_count, len } if !bad => {
                scan.items.push(item_count);
                pos += RECORD_HEADER_LEN + len;
                scan.valid_bytes = pos;
            }
            RecordRead::Ok { len, .. } => {
                scan.lost_after += 1;
                pos += RECORD_HEADER_LEN + len;
            }
            RecordRead::BadCrc { len } => {
                scan.corrupt = true;
                if !bad {
                    bad = true;
                    scan.lost_after += 1;
                }
                pos += RECORD_HEADER_LEN + len;
            }
            RecordRead::Torn | RecordRead::End => break,
        }
    }
    Ok(scan)
}

enum RecordRead {
    Ok {
        item_count: u32,
        len: u64,
    },
    /// A record that fits in the file but whose CRC does not match.
    BadCrc {
        len: u64,
    },
    /// An incomplete record.
    Torn,
    /// Clean end of file.
    End,
}

/// Reads the record at `pos` (the reader's current position) into `payload`.
fn read_record_at(r: &mut impl Read, pos: u64, limit: u64, payload: &mut Vec<u8>) -> io::Result<RecordRead> {
    if pos >= limit {
        return Ok(RecordRead::End);
    }
    if limit - pos < RECORD_HEADER_LEN {
        return Ok(RecordRead::Torn);
    }
    let mut h = [0u8; RECORD_HEADER_LEN as usize];
    r.read_exact(&mut h)?;
    let (len, crc, item_count) = (u32_at(&h, 0), u32_at(&h, 4), u32_at(&h, 8));
    if u64::from(len) > limit - pos - RECORD_HEADER_LEN {
        return Ok(RecordRead::Torn);
    }
    payload.clear();
    payload.resize(len as usize, 0);
    r.read_exact(payload)?;
    if record_crc(len, item_count, payload) != crc {
        return Ok(RecordRead::BadCrc { len: u64::from(len) });
    }
    Ok(RecordRead::Ok {
        item_count,
        len: u64::from(len),
    })
}

fn read_commit(dir: &Path) -> io::Result<Option<(u64, Vec<u8>)>> {
    let b = match fs::read(dir.join(COMMIT_FILE)) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Some((0, Vec::new()))),
        Err(e) => return Err(e),
    };
    if b.len() < 24 || &b[..4] != COMMIT_MAGIC || u32_at(&b, 4) != VERSION {
        return Ok(None);
    }
    let extra_len = u32_at(&b, 16) as usize;
    if b.len() != 24 + extra_len || crc32fast::hash(&b[..20 + extra_len]) != u32_at(&b, 20 + extra_len) {
        return Ok(None);
    }
    Ok(Some((u64_at(&b, 8), b[20..20 + extra_len].to_vec())))
}

/// Writes the commit file atomically (temp file + rename). With `durable` the data and the
/// directory are fsynced too, so the commit survives a power loss; a process crash (`kill -9`)
/// keeps it either way because the rename is atomic in the page cache.
fn write_commit(dir: &Path, seq: u64, extra: &[u8], durable: bool) -> io::Result<()> {
    let mut b = Vec::with_capacity(24 + extra.len());
    b.extend_from_slice(COMMIT_MAGIC);
    b.extend_from_slice(&VERSION.to_le_bytes());
    b.extend_from_slice(&seq.to_le_bytes());
    b.extend_from_slice(&(extra.len() as u32).to_le_bytes());
    b.extend_from_slice(extra);
    let crc = crc32fast::hash(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    let tmp = dir.join(COMMIT_TMP);
    let mut f = File::create(&tmp)?;
    f.write_all(&b)?;
    if durable {
        f.sync_all()?;
    }
    drop(f);
    fs::rename(&tmp, dir.join(COMMIT_FILE))?;
    if durable {
        sync_dir(dir)?;
    }
    Ok(())
}

/// Segment files of `dir`, sorted by index.
fn list_segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(index) = name.strip_suffix(".seg").and_then(|s| s.parse::<u64>().ok()) {
            out.push(index);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Creates segment `index` starting at `first_seq` (replacing any file of that name).
fn create_segment(dir: &Path, index: u64, first_seq: u64, fsync: FsyncPolicy) -> io::Result<File> {
    let path = segment_path(dir, index);
    let result = (|| {
        let mut f = OpenOptions::new().create(true).write(true).truncate(true).open(&path)?;
        f.write_all(&segment_header(first_seq))?;
        if fsync != FsyncPolicy::Never {
            f.sync_all()?;
            sync_dir(dir)?;
        }
        drop(f);
        OpenOptions::new().append(true).open(&path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&path);
    }
    result
}

/// Validates the segments of `dir` (see "Recovery" above), deleting fully acknowledged
/// ones and those with an unreadable header, and truncating a bad tail of the newest.
fn load_segments(dir: &Path, committed_seq: u64, recovery: &mut Recovery) -> io::Result<VecDeque<Segment>> {
    // Headers first: an older segment's extent is known from its successor's first_seq.
    let mut headers: Vec<(u64, u64)> = Vec::new();
    for index in list_segments(dir)? {
        let path = segment_path(dir, index);
        match read_segment_header(&path)? {
            Some(first) if headers.last().is_none_or(|&(_, prev)| first >= prev) => {
                headers.push((index, first));
            }
            _ => {
                // Unknown extent: nothing in it can be placed.
                recovery.corrupt_segments += 1;
                recovery.truncated_bytes += fs::metadata(&path).map_or(0, |m| m.len());
                fs::remove_file(&path)?;
            }
        }
    }
    let mut segments = VecDeque::new();
    let mut items_total = 0;
    for (i, &(index, first_seq)) in headers.iter().enumerate() {
        let path = segment_path(dir, index);
        let next_first = headers.get(i + 1).map(|&(_, f)| f);
        if next_first.is_some_and(|n| n <= committed_seq) {
            fs::remove_file(&path)?; // fully acknowledged
            continue;
        }
        let segment = recover_segment(&path, index, first_seq, next_first, recovery)?;
        let segment = Segment {
            items_before: items_total,
            ..segment
        };
        items_total += sum(&segment.items);
        segments.push_back(segment);
    }
    Ok(segments)
}

/// Validates one segment; `next_first` is the successor's first_seq (`None` for the newest).
fn recover_segment(
    path: &Path,
    index: u64,
    first_seq: u64,
    next_first: Option<u64>,
    recovery: &mut Recovery,
) -> io::Result<Segment> {
    let scan = scan_segment(path, next_first.map_or(u64::MAX, |n| n - first_seq))?;
    let readable = scan.items.len() as u64;
    let end_seq = next_first.unwrap_or(first_seq + readable);
    let bad_tail = scan.valid_bytes < scan.file_len;
    if scan.corrupt || bad_tail || readable < end_seq - first_seq {
        recovery.corrupt_segments += 1;
    }
    let mut bytes = scan.file_len;
    if next_first.is_some() {
        // Exact: the successor says how many records there were.
        recovery.corrupt_records += end_seq - first_seq - readable;
    } else {
        recovery.corrupt_records += scan.lost_after;
        if bad_tail {
            let f = OpenOptions::new().write(true).open(path)?;
            f.set_len(scan.valid_bytes)?;
            f.sync_all()?;
            recovery.truncated_bytes += scan.file_len - scan.valid_bytes;
            bytes = scan.valid_bytes;
        }
    }
    Ok(Segment {
        index,
        first_seq,
        readable,
        end_seq,
        items: scan.items,
        bytes,
        items_before: 0,
    })
}

/// Makes sure the newest segment can take appends. Sequence numbers never restart below the
/// commit position, so records lost to a torn tail cannot pass for acknowledged ones.
fn ensure_active_segment(
    dir: &Path,
    segments: &mut VecDeque<Segment>,
    committed_seq: u64,
    fsync: FsyncPolicy,
) -> io::Result<()> {
    let (index, first_seq, items_before) = match segments.back() {
        Some(s) if s.end_seq >= committed_seq => return Ok(()),
        // An empty newest segment is rewritten in place with the right first_seq.
        Some(s) if s.readable == 0 => (s.index, committed_seq, s.items_before),
        Some(s) => (s.index + 1, committed_seq, s.items_before + sum(&s.items)),
        None => (1, committed_seq, 0),
    };
    if segments.back().is_some_and(|s| s.index == index) {
        segments.pop_back();
    }
    create_segment(dir, index, first_seq, fsync)?;
    segments.push_back(Segment {
        index,
        first_seq,
        readable: 0,
        end_seq: first_seq,
        items: Vec::new(),
        bytes: SEGMENT_HEADER_LEN,
        items_before,
    });
    Ok(())
}

/// Total items of `items` (u64, no overflow).
fn sum(items: &[u32]) -> u64 {
    items.iter().map(|&s| u64::from(s)).sum()
}

impl Wal {
    /// Opens (creating if needed) the WAL in `dir`, validating and repairing what is there.
    ///
    /// The directory lock is the caller's business. The committed position and its `extra`
    /// blob are available from [`Wal::committed`], the repair report from [`Wal::recovery`].
    pub fn open(dir: impl Into<PathBuf>, opts: WalOptions) -> io::Result<Wal> {
        let dir = dir.into();
        if opts.segment_size_bytes <= SEGMENT_HEADER_LEN + RECORD_HEADER_LEN {
            return Err(invalid_input(format!(
                "segment size {} is too small",
                opts.segment_size_bytes
            )));
        }
        if opts.max_size_bytes < opts.segment_size_bytes {
            return Err(invalid_input(format!(
                "max size {} is below the segment size {}",
                opts.max_size_bytes, opts.segment_size_bytes
            )));
        }
        fs::create_dir_all(&dir)?;
        match fs::remove_file(dir.join(COMMIT_TMP)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut recovery = Recovery::default();
        let (committed_seq, committed_extra) = read_commit(&dir)?.unwrap_or_else(|| {
            recovery.corrupt_commit = true;
            (0, Vec::new())
        });

        let mut segments = load_segments(&dir, committed_seq, &mut recovery)?;
        ensure_active_segment(&dir, &mut segments, committed_seq, opts.fsync)?;
        let active = segments
            .back()
            .map(|s| segment_path(&dir, s.index))
            .ok_or_else(|| io::Error::other("no segment"))?;
        let active = Arc::new(OpenOptions::new().append(true).open(active)?);
        recovery.segments = segments.len();
        recovery.records = segments.iter().map(|s| s.readable).sum();

        let next_seq = segments.back().map_or(0, |s| s.end_seq);
        let total_bytes = segments.iter().map(|s| s.bytes).sum();
        let items_total = segments.back().map_or(0, |s| s.items_before + sum(&s.items));
        let stats = WalStats {
            corrupt_records: recovery.corrupt_records,
            ..WalStats::default()
        };
        let inner = Inner {
            segments,
            active,
            needs_roll: false,
            next_seq,
            committed_seq,
            committed_extra,
            total_bytes,
            items_total,
            stats,
            scratch: Vec::new(),
            #[cfg(test)]
            fail_next_write: false,
        };
        let wal = Wal {
            dir,
            opts,
            inner: Mutex::new(inner),
            commit_lock: Mutex::new(()),
            commit_dirty: std::sync::atomic::AtomicBool::new(false),
            notify: Arc::new(Notify::new()),
            recovery,
        };
        wal.with_inner(|inner| inner.evict_for(&wal.dir, wal.opts.max_size_bytes, 0));
        Ok(wal)
    }

    fn with_inner<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        f(&mut lock(&self.inner))
    }

    /// What open found and repaired.
    pub fn recovery(&self) -> &Recovery {
        &self.recovery
    }

    /// The committed position (all records below it are acknowledged) and its `extra` blob.
    pub fn committed(&self) -> (u64, Vec<u8>) {
        self.with_inner(|i| (i.committed_seq, i.committed_extra.clone()))
    }

    /// The sequence number the next append gets.
    pub fn next_seq(&self) -> u64 {
        self.with_inner(|i| i.next_seq)
    }

    /// Current sizes and counters.
    pub fn stats(&self) -> WalStats {
        self.with_inner(|i| WalStats {
            bytes: i.total_bytes,
            segments: i.segments.len(),
            next_seq: i.next_seq,
            committed_seq: i.committed_seq,
            ..i.stats.clone()
        })
    }

    /// Sequence number of the first record of the segment being written: it changes when a
    /// segment is rolled (the logs path saves its positions then, before the segment can be
    /// deleted).
    pub fn active_first_seq(&self) -> u64 {
        self.with_inner(|i| i.segments.back().map_or(0, |s| s.first_seq))
    }

    /// Bytes of all segment files.
    pub fn size(&self) -> u64 {
        self.with_inner(|i| i.total_bytes)
    }

    /// The bound of all segments together and the size of one.
    pub fn limits(&self) -> (u64, u64) {
        (self.opts.max_size_bytes, self.opts.segment_size_bytes)
    }

    /// Notified (`notify_one`, so a permit is kept) after every append. Meant for one
    /// consumer: wait on it when [`WalReader::next`] returned `None`.
    pub fn notifier(&self) -> Arc<Notify> {
        self.notify.clone()
    }

    /// Appends one record and returns its sequence number. The bytes go to the file with a
    /// single `write_all` (nothing is buffered in the process); on error the partial record
    /// is cut off again and the WAL stays usable.
    pub fn append(&self, payload: &[u8], item_count: u32) -> io::Result<u64> {
        let record_len = RECORD_HEADER_LEN + payload.len() as u64;
        let limit = (self.opts.max_size_bytes - SEGMENT_HEADER_LEN).min(u64::from(u32::MAX));
        if record_len > limit {
            return Err(invalid_input(format!(
                "record of {record_len} bytes exceeds the WAL limit {limit}"
            )));
        }
        let crc = record_crc(payload.len() as u32, item_count, payload);
        let mut inner = lock(&self.inner);
        let inner = &mut *inner;
        if self.opts.refuse_when_full && inner.total_bytes + record_len > self.opts.max_size_bytes {
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                format!(
                    "WAL full: {} of {} bytes hold records not yet acknowledged",
                    inner.total_bytes, self.opts.max_size_bytes
                ),
            ));
        }
        let active = inner.segments.back().map_or((0, 0), |s| (s.bytes, s.readable));
        if inner.needs_roll || (active.0 + record_len > self.opts.segment_size_bytes && active.1 > 0) {
            if let Err(e) = inner.roll(&self.dir, self.opts.fsync) {
                inner.stats.write_errors += 1;
                return Err(e);
            }
        }
        inner.evict_for(&self.dir, self.opts.max_size_bytes, record_len);

        inner.scratch.clear();
        inner.scratch.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        inner.scratch.extend_from_slice(&crc.to_le_bytes());
        inner.scratch.extend_from_slice(&item_count.to_le_bytes());
        // A small record goes out in one write; a large one is written from where it is
        // rather than copied next to its header (a scrape of 200k series is ~40 MB).
        let separate = payload.len() > SMALL_RECORD;
        if !separate {
            inner.scratch.extend_from_slice(payload);
        }
        let rest: &[u8] = if separate { payload } else { &[] };
        let file = inner.active.clone();
        let prev_len = inner.segments.back().map_or(SEGMENT_HEADER_LEN, |s| s.bytes);
        let mut written = inner.write_record(&file, rest);
        if written.is_ok() && self.opts.fsync == FsyncPolicy::Always {
            written = file.sync_data();
        }
        if let Err(e) = written {
            inner.stats.write_errors += 1;
            if file.set_len(prev_len).is_err() {
                inner.needs_roll = true;
            }
            // The disk may be full of records that are all acknowledged already: replace the
            // active segment and try once more.
            let committed = inner.committed_seq;
            if !inner.reset_acked_active(&self.dir, committed) || inner.needs_roll {
                return Err(e);
            }
            let file = inner.active.clone();
            let mut again = inner.write_record(&file, rest);
            if again.is_ok() && self.opts.fsync == FsyncPolicy::Always {
                again = file.sync_data();
            }
            if let Err(e) = again {
                let _ = file.set_len(SEGMENT_HEADER_LEN);
                return Err(e);
            }
        }

        let seq = inner.next_seq;
        if let Some(s) = inner.segments.back_mut() {
            s.readable += 1;
            s.end_seq += 1;
            s.bytes += record_len;
            s.items.push(item_count);
        }
        inner.next_seq += 1;
        inner.total_bytes += record_len;
        inner.items_total += u64::from(item_count);
        inner.stats.appended_records += 1;
        inner.stats.appended_items += u64::from(item_count);
        self.notify.notify_one();
        Ok(seq)
    }

    /// Flushes the segment being written, and a commit written since the last call, to stable
    /// storage (for [`FsyncPolicy::Interval`], and at shutdown). Appends are not blocked while
    /// the flush runs.
    pub fn sync(&self) -> io::Result<()> {
        let file = self.with_inner(|i| i.active.clone());
        file.sync_data()?;
        if self.commit_dirty.swap(false, std::sync::atomic::Ordering::AcqRel) {
            // A commit renamed in since: the file, then its directory entry.
            let synced = File::open(self.dir.join(COMMIT_FILE))
                .and_then(|f| f.sync_all())
                .and_then(|()| sync_dir(&self.dir));
            if synced.is_err() {
                self.commit_dirty.store(true, std::sync::atomic::Ordering::Release);
            }
            synced?;
        }
        Ok(())
    }

    /// Persists "all records with `seq < next_unacked_seq` are acknowledged" plus the
    /// sender's opaque `extra` blob, atomically, then deletes fully acknowledged segments.
    ///
    /// The position may not move backwards nor past [`Wal::next_seq`]. Repeating the last
    /// commit is free. If the commit file cannot be written (disk full) the error is
    /// returned, the committed position stays, but the acknowledged segments are deleted
    /// anyway to free space for the next attempt.
    pub fn commit(&self, next_unacked_seq: u64, extra: &[u8]) -> io::Result<()> {
        if extra.len() > MAX_COMMIT_EXTRA {
            return Err(invalid_input(format!(
                "commit extra of {} bytes exceeds {MAX_COMMIT_EXTRA}",
                extra.len()
            )));
        }
        let _serial = lock(&self.commit_lock);
        let (committed, next_seq, unchanged) =
            self.with_inner(|i| (i.committed_seq, i.next_seq, i.committed_extra == extra));
        if next_unacked_seq < committed || next_unacked_seq > next_seq {
            return Err(invalid_input(format!(
                "commit position {next_unacked_seq} outside [{committed}, {next_seq}]"
            )));
        }
        if next_unacked_seq == committed && unchanged {
            return Ok(());
        }
        // Only `Always` makes every commit durable at once (an fsync of the file and of the
        // directory: two disk flushes per acknowledged push). With an interval the commit is
        // renamed into place at once — enough for a process crash — and made durable by the
        // next [`Wal::sync`].
        let durable = self.opts.fsync == FsyncPolicy::Always;
        let written = write_commit(&self.dir, next_unacked_seq, extra, durable);
        if written.is_ok() && !durable && matches!(self.opts.fsync, FsyncPolicy::Interval(_)) {
            self.commit_dirty.store(true, std::sync::atomic::Ordering::Release);
        }
        if written.is_err() {
            let _ = fs::remove_file(self.dir.join(COMMIT_TMP));
        }
        // Acknowledged segments go even when the commit could not be written (disk full):
        // the space is needed to write it, and their records were delivered.
        let acked = self.with_inner(|i| {
            if written.is_ok() {
                i.committed_seq = next_unacked_seq;
                i.committed_extra.clear();
                i.committed_extra.extend_from_slice(extra);
            }
            let mut acked = Vec::new();
            while i.segments.len() > 1 && i.segments.front().is_some_and(|s| s.end_seq <= next_unacked_seq) {
                if let Some(s) = i.segments.pop_front() {
                    i.total_bytes -= s.bytes;
                    acked.push(s.index);
                }
            }
            // A full disk held by an all-acknowledged active segment: start a fresh one so the
            // commit (and new appends) find room.
            if written.is_err() {
                i.reset_acked_active(&self.dir, next_unacked_seq);
            }
            acked
        });
        for index in acked {
            // A leftover file is below the commit position and deleted by the next open.
            let _ = remove_segment(&self.dir, index);
        }
        written
    }

    /// A reader starting at `from_seq` (normally the committed position). Records that are
    /// no longer on disk are skipped and counted.
    pub fn reader(self: &Arc<Self>, from_seq: u64) -> WalReader {
        WalReader {
            wal: self.clone(),
            next_seq: from_seq,
            items_before: None,
            cur: None,
            bad_segment: None,
            evicted_records: 0,
            evicted_items: 0,
            corrupt_records: 0,
            spare: Vec::new(),
        }
    }
}

fn remove_segment(dir: &Path, index: u64) -> io::Result<()> {
    match fs::remove_file(segment_path(dir, index)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

impl Inner {
    /// Writes the record held in `scratch` (its header, and its payload if small) followed
    /// by `rest` (the payload of a large record).
    fn write_record(&mut self, mut file: &File, rest: &[u8]) -> io::Result<()> {
        #[cfg(test)]
        if std::mem::take(&mut self.fail_next_write) {
            file.write_all(&self.scratch[..self.scratch.len() / 2])?;
            return Err(io::Error::new(io::ErrorKind::StorageFull, "injected"));
        }
        file.write_all(&self.scratch)?;
        if !rest.is_empty() {
            file.write_all(rest)?;
        }
        Ok(())
    }

    /// Starts a new segment after the active one.
    fn roll(&mut self, dir: &Path, fsync: FsyncPolicy) -> io::Result<()> {
        let (index, first_seq) = match self.segments.back() {
            Some(s) => (s.index + 1, s.end_seq),
            None => (1, self.next_seq),
        };
        // A segment left behind after a failed write is not synced: it may keep failing.
        if fsync != FsyncPolicy::Never && !self.needs_roll {
            self.active.sync_data()?;
        }
        let file = create_segment(dir, index, first_seq, fsync)?;
        self.active = Arc::new(file);
        self.needs_roll = false;
        self.push_empty_segment(index, first_seq, SEGMENT_HEADER_LEN);
        Ok(())
    }

    /// Records a new, empty segment of `bytes` (its header, or 0 for a placeholder).
    fn push_empty_segment(&mut self, index: u64, first_seq: u64, bytes: u64) {
        self.total_bytes += bytes;
        self.segments.push_back(Segment {
            index,
            first_seq,
            readable: 0,
            end_seq: first_seq,
            items: Vec::new(),
            bytes,
            items_before: self.items_total,
        });
    }

    /// Replaces an active segment whose records are all acknowledged (`upto` covers them) by
    /// a fresh one, deleting the old file first so this works on a full disk. Returns whether
    /// it did. If the new file cannot be created the next append retries through `needs_roll`.
    fn reset_acked_active(&mut self, dir: &Path, upto: u64) -> bool {
        let Some(active) = self.segments.back() else {
            return false;
        };
        if active.readable == 0 || active.end_seq > upto || self.segments.len() != 1 {
            return false;
        }
        let Some(old) = self.segments.pop_back() else {
            return false;
        };
        self.total_bytes -= old.bytes;
        let _ = remove_segment(dir, old.index);
        let first_seq = old.end_seq;
        match create_segment(dir, old.index + 1, first_seq, FsyncPolicy::Never) {
            Ok(file) => {
                self.active = Arc::new(file);
                self.push_empty_segment(old.index + 1, first_seq, SEGMENT_HEADER_LEN);
                self.needs_roll = false;
            }
            Err(_) => {
                // Keep an empty placeholder so indexes continue; the next append rolls.
                self.push_empty_segment(old.index, first_seq, 0);
                self.needs_roll = true;
            }
        }
        true
    }

    /// Deletes the oldest segments (never the active one) until `incoming` more bytes fit.
    fn evict_for(&mut self, dir: &Path, max_bytes: u64, incoming: u64) {
        while self.total_bytes + incoming > max_bytes && self.segments.len() > 1 {
            let Some(s) = self.segments.pop_front() else { break };
            let acked = self.committed_seq.saturating_sub(s.first_seq).min(s.readable);
            self.stats.evicted_segments += 1;
            self.stats.evicted_records += s.readable - acked;
            self.stats.evicted_items += sum(&s.items[acked as usize..]);
            self.total_bytes -= s.bytes;
            // A file that cannot be deleted is forgotten rather than blocking appends.
            let _ = remove_segment(dir, s.index);
        }
    }
}

/// An open segment file positioned at a record.
struct Cursor {
    index: u64,
    file: File,
    /// Byte offset of the record `seq`.
    offset: u64,
    seq: u64,
}

/// Reads records in sequence order; see [`Wal::reader`].
pub struct WalReader {
    wal: Arc<Wal>,
    next_seq: u64,
    /// Samples of all records before `next_seq`, in the WAL's count; `None` until positioned.
    items_before: Option<u64>,
    cur: Option<Cursor>,
    /// A segment in which this reader found a bad record; the rest of it is skipped.
    bad_segment: Option<u64>,
    evicted_records: u64,
    evicted_items: u64,
    corrupt_records: u64,
    /// A payload buffer given back ([`WalReader::recycle`]) for the next record.
    spare: Vec<u8>,
}

/// What to do next, decided under the lock.
enum Plan {
    CaughtUp,
    /// Read the record `next_seq` of segment `index`, whose valid bytes end at `limit`.
    Read {
        index: u64,
        limit: u64,
        open_at: Option<(u64, u64)>,
    },
}

impl WalReader {
    /// Gives a record's payload back, so the next record is read into it instead of a new
    /// allocation (records of the logs path are a megabyte each).
    pub fn recycle(&mut self, payload: Vec<u8>) {
        if payload.capacity() > self.spare.capacity() {
            self.spare = payload;
        }
    }

    /// The sequence number of the next record to return.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Records and items skipped because their segments were evicted, since the last call.
    pub fn take_evicted(&mut self) -> (u64, u64) {
        (
            std::mem::take(&mut self.evicted_records),
            std::mem::take(&mut self.evicted_items),
        )
    }

    /// Records skipped because they were corrupt, since the last call.
    pub fn take_corrupt(&mut self) -> u64 {
        std::mem::take(&mut self.corrupt_records)
    }

    /// The next record, or `None` when caught up with the appends so far.
    ///
    /// An I/O error leaves the position unchanged; calling again retries.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> io::Result<Option<Record>> {
        loop {
            let (index, limit, open_at) = match self.plan() {
                Plan::CaughtUp => return Ok(None),
                Plan::Read { index, limit, open_at } => (index, limit, open_at),
            };
            if let Some((record_index, items_before)) = open_at {
                match self.open_cursor(index, record_index) {
                    Ok(cursor) => {
                        self.cur = Some(cursor);
                        self.items_before = Some(items_before);
                    }
                    // Evicted or acked meanwhile: plan again.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                        self.bad_segment = Some(index);
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            }
            let Some(cur) = self.cur.as_mut() else { continue };
            let mut payload = std::mem::take(&mut self.spare);
            match read_record_at(&mut cur.file, cur.offset, limit, &mut payload) {
                Ok(RecordRead::Ok { item_count, len }) => {
                    let record = Record {
                        seq: cur.seq,
                        item_count,
                        payload,
                    };
                    cur.offset += RECORD_HEADER_LEN + len;
                    cur.seq += 1;
                    self.next_seq += 1;
                    self.items_before = self.items_before.map(|s| s + u64::from(item_count));
                    return Ok(Some(record));
                }
                Ok(_) => {
                    self.cur = None;
                    self.bad_segment = Some(index);
                }
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    self.cur = None;
                    self.bad_segment = Some(index);
                }
                Err(e) => {
                    self.cur = None;
                    return Err(e);
                }
            }
        }
    }

    /// Under the lock: accounts for gaps (evicted or corrupt records) and decides where
    /// the record `next_seq` is.
    fn plan(&mut self) -> Plan {
        let mut inner = lock(&self.wal.inner);
        let inner = &mut *inner;
        // A segment deleted under the cursor (acked, evicted, or replaced to free a full disk)
        // is let go at once: an open file keeps its blocks allocated.
        if let Some(c) = &self.cur {
            if !inner.segments.iter().any(|s| s.index == c.index) {
                self.cur = None;
            }
        }
        loop {
            let Some(oldest) = inner.segments.front() else {
                return Plan::CaughtUp;
            };
            if self.next_seq < oldest.first_seq {
                self.evicted_records += oldest.first_seq - self.next_seq;
                if let Some(before) = self.items_before {
                    self.evicted_items += oldest.items_before.saturating_sub(before);
                }
                self.next_seq = oldest.first_seq;
                self.items_before = Some(oldest.items_before);
                self.cur = None;
            }
            if self.next_seq >= inner.next_seq {
                return Plan::CaughtUp;
            }
            let pos = inner
                .segments
                .partition_point(|s| s.first_seq <= self.next_seq)
                .saturating_sub(1);
            let is_active = pos + 1 == inner.segments.len();
            let Some(s) = inner.segments.get(pos) else {
                return Plan::CaughtUp;
            };
            let in_segment = self.next_seq - s.first_seq;
            let found_bad = self.bad_segment == Some(s.index);
            if in_segment >= s.readable || found_bad {
                // A hole: the rest of this segment cannot be read. Holes found at open are
                // already in the WAL's counter; damage found by this reader is added.
                let end = s.end_seq.max(self.next_seq);
                self.corrupt_records += end - self.next_seq;
                if found_bad {
                    inner.stats.corrupt_records += end - self.next_seq;
                }
                self.next_seq = end;
                self.items_before = Some(
                    inner
                        .segments
                        .get(pos + 1)
                        .map_or(inner.items_total, |n| n.items_before),
                );
                self.cur = None;
                if is_active {
                    // New appends must not land behind the damage.
                    inner.needs_roll = true;
                    return Plan::CaughtUp;
                }
                continue;
            }
            let positioned = self
                .cur
                .as_ref()
                .is_some_and(|c| c.index == s.index && c.seq == self.next_seq);
            let open_at = (!positioned).then(|| (in_segment, s.items_before + sum(&s.items[..in_segment as usize])));
            return Plan::Read {
                index: s.index,
                limit: s.bytes,
                open_at,
            };
        }
    }

    /// Opens segment `index` and skips to its record number `record_index`.
    fn open_cursor(&mut self, index: u64, record_index: u64) -> io::Result<Cursor> {
        let mut file = File::open(segment_path(&self.wal.dir, index))?;
        let mut offset = SEGMENT_HEADER_LEN;
        let mut h = [0u8; RECORD_HEADER_LEN as usize];
        for _ in 0..record_index {
            file.seek(SeekFrom::Start(offset))?;
            file.read_exact(&mut h)?;
            offset += RECORD_HEADER_LEN + u64::from(u32_at(&h, 0));
        }
        file.seek(SeekFrom::Start(offset))?;
        Ok(Cursor {
            index,
            file,
            offset,
            seq: self.next_seq,
        })
    }
}

/// Runs WAL file I/O from async code: on a multi-threaded runtime the worker is handed to
/// other tasks meanwhile (`block_in_place`); elsewhere (a current-thread runtime, no runtime)
/// it simply runs.
pub fn blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(segment: u64, max: u64) -> WalOptions {
        WalOptions {
            max_size_bytes: max,
            segment_size_bytes: segment,
            fsync: FsyncPolicy::Never,
            refuse_when_full: false,
        }
    }

    fn open(dir: &Path, o: WalOptions) -> Arc<Wal> {
        Arc::new(Wal::open(dir, o).expect("open"))
    }

    fn payload(i: u64) -> Vec<u8> {
        format!("record-{i:05}-").repeat(1 + (i % 3) as usize).into_bytes()
    }

    fn read_all(r: &mut WalReader) -> Vec<Record> {
        let mut out = Vec::new();
        while let Some(rec) = r.next().expect("read") {
            out.push(rec);
        }
        out
    }

    fn segment_files(dir: &Path) -> Vec<u64> {
        list_segments(dir).unwrap()
    }

    #[test]
    fn append_read_commit_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let wal = open(dir.path(), WalOptions::default());
        for i in 0..10 {
            assert_eq!(wal.append(&payload(i), i as u32).unwrap(), i);
        }
        let mut r = wal.reader(0);
        let got = read_all(&mut r);
        assert_eq!(got.len(), 10);
        for (i, rec) in got.iter().enumerate() {
            assert_eq!(
                (rec.seq, rec.item_count, &rec.payload),
                (i as u64, i as u32, &payload(i as u64))
            );
        }
        // Caught up until the next append.
        wal.append(b"late", 1).unwrap();
        assert_eq!(r.next().unwrap().unwrap().payload, b"late");
        assert!(r.next().unwrap().is_none());
        wal.commit(4, b"partial").unwrap();
        drop((r, wal));

        let wal = open(dir.path(), WalOptions::default());
        assert_eq!(wal.committed(), (4, b"partial".to_vec()));
        assert_eq!(wal.next_seq(), 11);
        assert_eq!(wal.recovery().records, 11);
        let got = read_all(&mut wal.reader(4));
        assert_eq!(
            got.iter().map(|r| r.seq).collect::<Vec<_>>(),
            (4..11).collect::<Vec<_>>()
        );
        assert_eq!(wal.append(b"after", 2).unwrap(), 11);
    }

    #[test]
    fn commit_blob_round_trip_and_validation() {
        let dir = tempfile::tempdir().unwrap();
        let wal = open(dir.path(), WalOptions::default());
        assert_eq!(wal.committed(), (0, Vec::new()));
        for i in 0..3 {
            wal.append(&payload(i), 1).unwrap();
        }
        let blob: Vec<u8> = (0..=255).collect();
        wal.commit(2, &blob).unwrap();
        wal.commit(2, &blob).unwrap(); // unchanged: no rewrite, no error
        assert_eq!(wal.commit(1, b"").unwrap_err().kind(), io::ErrorKind::InvalidInput);
        assert_eq!(wal.commit(4, b"").unwrap_err().kind(), io::ErrorKind::InvalidInput);
        let too_big = vec![0; MAX_COMMIT_EXTRA + 1];
        assert_eq!(wal.commit(3, &too_big).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        drop(wal);
        let wal = open(dir.path(), WalOptions::default());
        assert_eq!(wal.committed(), (2, blob));
        wal.commit(3, b"").unwrap();
        drop(wal);
        assert_eq!(open(dir.path(), WalOptions::default()).committed(), (3, Vec::new()));

        // A damaged commit file restarts from the oldest record instead of failing.
        let path = dir.path().join(COMMIT_FILE);
        let mut b = fs::read(&path).unwrap();
        b[9] ^= 0xff;
        fs::write(&path, b).unwrap();
        let wal = open(dir.path(), WalOptions::default());
        assert!(wal.recovery().corrupt_commit);
        assert_eq!(wal.committed(), (0, Vec::new()));
    }

    #[test]
    fn torn_tail_is_truncated_and_appends_continue() {
        let dir = tempfile::tempdir().unwrap();
        let wal = open(dir.path(), WalOptions::default());
        for i in 0..5 {
            wal.append(&payload(i), 1).unwrap();
        }
        drop(wal);
        let path = segment_path(dir.path(), 1);
        let len = fs::metadata(&path).unwrap().len();
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len - 5).unwrap(); // cut the last record short
        drop(f);

        let wal = open(dir.path(), WalOptions::default());
        let rec = wal.recovery();
        assert_eq!((rec.records, rec.corrupt_records), (4, 0));
        assert_eq!(rec.truncated_bytes, RECORD_HEADER_LEN + payload(4).len() as u64 - 5);
        assert_eq!(wal.append(b"next", 1).unwrap(), 4);
        let got = read_all(&mut wal.reader(0));
        assert_eq!(got.len(), 5);
        assert_eq!(got[3].payload, payload(3));
        assert_eq!(got[4].payload, b"next");
        drop(wal);
        assert_eq!(open(dir.path(), WalOptions::default()).recovery().truncated_bytes, 0);
    }

    #[test]
    fn truncated_header_of_newest_segment_is_recreated() {
        let dir = tempfile::tempdir().unwrap();
        let wal = open(dir.path(), opts(200, 10_000));
        for i in 0..6 {
            wal.append(&payload(i), 1).unwrap();
        }
        let next = wal.next_seq();
        let last = *segment_files(dir.path()).last().unwrap();
        drop(wal);
        let f = OpenOptions::new()
            .write(true)
            .open(segment_path(dir.path(), last))
            .unwrap();
        f.set_len(10).unwrap();
        drop(f);
        let wal = open(dir.path(), opts(200, 10_000));
        assert_eq!(wal.recovery().corrupt_segments, 1);
        let lost = read_all(&mut wal.reader(0)).len() as u64;
        assert!(lost < next);
        assert_eq!(wal.append(b"x", 1).unwrap(), lost);
    }

    #[test]
    fn flipped_byte_in_newest_segment_is_counted() {
        let dir = tempfile::tempdir().unwrap();
        let wal = open(dir.path(), WalOptions::default());
        for i in 0..6 {
            wal.append(&payload(i), 1).unwrap();
        }
        drop(wal);
        let path = segment_path(dir.path(), 1);
        let mut b = fs::read(&path).unwrap();
        // A payload byte of record 2.
        let at = SEGMENT_HEADER_LEN + 2 * RECORD_HEADER_LEN + (payload(0).len() + payload(1).len()) as u64;
        b[at as usize + RECORD_HEADER_LEN as usize + 3] ^= 0x40;
        fs::write(&path, b).unwrap();

        let wal = open(dir.path(), WalOptions::default());
        let rec = wal.recovery().clone();
        assert_eq!(rec.corrupt_segments, 1);
        assert_eq!(rec.corrupt_records, 4); // the bad record and the three after it
        assert!(rec.truncated_bytes > 0);
        assert_eq!(wal.stats().corrupt_records, 4);
        let got = read_all(&mut wal.reader(0));
        assert_eq!(
            got.iter().map(|r| r.payload.clone()).collect::<Vec<_>>(),
            vec![payload(0), payload(1)]
        );
        assert_eq!(wal.append(b"x", 1).unwrap(), 2);
    }

    #[test]
    fn corrupt_record_in_older_segment_skips_its_rest() {
        let dir = tempfile::tempdir().unwrap();
        let wal = open(dir.path(), opts(200, 100_000));
        for i in 0..30 {
            wal.append(&payload(i), 10).unwrap();
        }
        drop(wal);
        let files = segment_files(dir.path());
        assert!(files.len() >= 3);
        let path = segment_path(dir.path(), files[1]);
        let first = read_segment_header(&path).unwrap().unwrap();
        let next_first = read_segment_header(&segment_path(dir.path(), files[2]))
            .unwrap()
            .unwrap();
        let mut b = fs::read(&path).unwrap();
        // Corrupt the length field of the second record of the middle segment.
        let second = SEGMENT_HEADER_LEN + RECORD_HEADER_LEN + u64::from(u32_at(&b, SEGMENT_HEADER_LEN as usize));
        b[second as usize] ^= 0x01;
        fs::write(&path, b).unwrap();

        let wal = open(dir.path(), opts(200, 100_000));
        let lost = next_first - first - 1;
        assert_eq!(wal.recovery().corrupt_records, lost);
        let mut r = wal.reader(0);
        let got = read_all(&mut r);
        assert_eq!(got.len() as u64, 30 - lost);
        assert!(got.iter().all(|rec| rec.payload == payload(rec.seq)));
        assert!(!got.iter().any(|rec| rec.seq > first && rec.seq < next_first));
        assert_eq!(r.take_corrupt(), lost);
        assert_eq!(r.take_evicted(), (0, 0));
    }

    #[test]
    fn reader_detects_damage_after_open() {
        let dir = tempfile::tempdir().unwrap();
        let wal = open(dir.path(), WalOptions::default());
        for i in 0..4 {
            wal.append(&payload(i), 1).unwrap();
        }
        let path = segment_path(dir.path(), 1);
        let mut b = fs::read(&path).unwrap();
        let n = b.len();
        b[n - 1] ^= 0xff; // last payload byte of record 3
        fs::write(&path, b).unwrap();
        let mut r = wal.reader(0);
        assert_eq!(read_all(&mut r).len(), 3);
        assert_eq!(r.take_corrupt(), 1);
        assert_eq!(wal.stats().corrupt_records, 1);
        // New records land in a fresh segment and are readable.
        assert_eq!(wal.append(b"fresh", 1).unwrap(), 4);
        assert_eq!(read_all(&mut r).iter().map(|r| r.seq).collect::<Vec<_>>(), vec![4]);
        assert_eq!(segment_files(dir.path()).len(), 2);
    }

    #[test]
    fn reader_follows_segment_rolls() {
        let dir = tempfile::tempdir().unwrap();
        let wal = open(dir.path(), opts(256, 1 << 20));
        let mut r = wal.reader(0);
        let mut seen = Vec::new();
        for i in 0..50 {
            wal.append(&payload(i), 1).unwrap();
            if i % 7 == 0 {
                seen.extend(read_all(&mut r));
            }
        }
        seen.extend(read_all(&mut r));
        assert!(segment_files(dir.path()).len() > 5);
        assert_eq!(
            seen.iter().map(|r| r.seq).collect::<Vec<_>>(),
            (0..50).collect::<Vec<_>>()
        );
        assert!(seen.iter().all(|rec| rec.payload == payload(rec.seq)));
        // A reader starting mid-segment.
        let got = read_all(&mut wal.reader(23));
        assert_eq!(got.first().map(|r| r.seq), Some(23));
        assert_eq!(got.len(), 27);
        // A record larger than a segment gets a segment of its own.
        let big = vec![7u8; 1000];
        let seq = wal.append(&big, 3).unwrap();
        assert_eq!(
            r.next().unwrap().unwrap(),
            Record {
                seq,
                item_count: 3,
                payload: big
            }
        );
    }

    #[test]
    fn commit_deletes_acked_segments() {
        let dir = tempfile::tempdir().unwrap();
        let wal = open(dir.path(), opts(200, 1 << 20));
        for i in 0..40 {
            wal.append(&payload(i), 1).unwrap();
        }
        let before = segment_files(dir.path());
        let stats = wal.stats();
        assert_eq!(stats.segments, before.len());
        assert_eq!(
            stats.bytes,
            before
                .iter()
                .map(|&i| fs::metadata(segment_path(dir.path(), i)).unwrap().len())
                .sum::<u64>()
        );
        wal.commit(20, b"").unwrap();
        let after = segment_files(dir.path());
        assert!(after.len() < before.len());
        let oldest = read_segment_header(&segment_path(dir.path(), after[0]))
            .unwrap()
            .unwrap();
        assert!(oldest <= 20, "the segment holding seq 20 is kept");
        let got = read_all(&mut wal.reader(20));
        assert_eq!(got.first().map(|r| r.seq), Some(20));
        assert_eq!(
            wal.stats().bytes,
            after
                .iter()
                .map(|&i| fs::metadata(segment_path(dir.path(), i)).unwrap().len())
                .sum::<u64>()
        );
        // Everything acked: only the active segment stays.
        wal.commit(40, b"").unwrap();
        assert_eq!(segment_files(dir.path()).len(), 1);
        drop(wal);
        let wal = open(dir.path(), opts(200, 1 << 20));
        assert_eq!((wal.next_seq(), wal.committed().0), (40, 40));
        assert!(read_all(&mut wal.reader(40)).is_empty());
    }

    #[test]
    fn failed_commit_still_frees_acked_segments() {
        let dir = tempfile::tempdir().unwrap();
        let wal = open(dir.path(), opts(200, 1 << 20));
        for i in 0..40 {
            wal.append(&payload(i), 1).unwrap();
        }
        let before = segment_files(dir.path()).len();
        fs::create_dir(dir.path().join(COMMIT_TMP)).unwrap(); // makes writing the commit fail
        assert!(wal.commit(30, b"x").is_err());
        assert_eq!(wal.committed(), (0, Vec::new()));
        assert!(segment_files(dir.path()).len() < before);
        fs::remove_dir(dir.path().join(COMMIT_TMP)).unwrap();
        wal.commit(30, b"x").unwrap();
        assert_eq!(wal.committed(), (30, b"x".to_vec()));
        assert_eq!(read_all(&mut wal.reader(30)).len(), 10);
    }

    #[test]
    fn eviction_at_max_size_counts_unacked_records() {
        let dir = tempfile::tempdir().unwrap();
        let seg = 256;
        let max = 1024;
        let wal = open(dir.path(), opts(seg, max));
        let mut r = wal.reader(0);
        // Read and ack the first two records.
        wal.append(&payload(0), 5).unwrap();
        wal.append(&payload(1), 5).unwrap();
        assert_eq!(read_all(&mut r).len(), 2);
        wal.commit(2, b"").unwrap();
        for i in 2..60 {
            wal.append(&payload(i), 5).unwrap();
            assert!(wal.stats().bytes <= max, "bound held after append {i}");
        }
        let stats = wal.stats();
        assert!(stats.evicted_segments > 0);
        assert!(stats.evicted_records > 0);
        assert_eq!(stats.evicted_items, stats.evicted_records * 5);
        let oldest = read_segment_header(&segment_path(dir.path(), segment_files(dir.path())[0]))
            .unwrap()
            .unwrap();
        // The reader jumps the gap and reports exactly the unacked records it lost.
        let got = read_all(&mut r);
        assert_eq!(got.first().map(|r| r.seq), Some(oldest));
        assert_eq!(got.last().map(|r| r.seq), Some(59));
        assert_eq!(r.take_evicted(), (oldest - 2, (oldest - 2) * 5));
        assert_eq!(stats.evicted_records, oldest - 2);
        assert_eq!(r.take_evicted(), (0, 0));
        // The old commit position stays valid; committing what was read works.
        assert_eq!(wal.committed().0, 2);
        wal.commit(60, b"").unwrap();
        drop((r, wal));
        let wal = open(dir.path(), opts(seg, max));
        assert_eq!(wal.committed().0, 60);
    }

    #[test]
    fn reader_created_below_oldest_segment_counts_the_gap() {
        let dir = tempfile::tempdir().unwrap();
        let wal = open(dir.path(), opts(256, 1024));
        for i in 0..60 {
            wal.append(&payload(i), 2).unwrap();
        }
        drop(wal);
        let wal = open(dir.path(), opts(256, 1024));
        let mut r = wal.reader(0);
        let got = read_all(&mut r);
        let first = got[0].seq;
        assert!(first > 0);
        assert_eq!(r.take_evicted().0, first);
        // Shrinking the bound at open evicts too.
        drop((r, wal));
        let wal = open(dir.path(), opts(256, 512));
        assert!(wal.stats().evicted_records > 0);
        assert!(wal.stats().bytes <= 512);
    }

    #[test]
    fn failed_write_is_cut_off_and_wal_stays_usable() {
        let dir = tempfile::tempdir().unwrap();
        let wal = open(dir.path(), WalOptions::default());
        wal.append(b"one", 1).unwrap();
        lock(&wal.inner).fail_next_write = true;
        let err = wal.append(b"two-two-two-two", 1).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::StorageFull);
        assert_eq!(wal.stats().write_errors, 1);
        assert_eq!(wal.append(b"three", 1).unwrap(), 1);
        let got = read_all(&mut wal.reader(0));
        assert_eq!(
            got.iter().map(|r| r.payload.clone()).collect::<Vec<_>>(),
            vec![b"one".to_vec(), b"three".to_vec()]
        );
        drop(wal);
        let wal = open(dir.path(), WalOptions::default());
        assert_eq!(
            wal.recovery(),
            &Recovery {
                segments: 1,
                records: 2,
                ..Recovery::default()
            }
        );
    }

    #[test]
    fn concurrent_appends_keep_per_thread_order() {
        let dir = tempfile::tempdir().unwrap();
        let wal = open(
            dir.path(),
            WalOptions {
                fsync: FsyncPolicy::Always,
                refuse_when_full: false,
                ..opts(4096, 1 << 30)
            },
        );
        let threads = 4u32;
        let per_thread = 200u32;
        std::thread::scope(|s| {
            for t in 0..threads {
                let wal = &wal;
                s.spawn(move || {
                    for i in 0..per_thread {
                        let mut p = t.to_le_bytes().to_vec();
                        p.extend_from_slice(&i.to_le_bytes());
                        wal.append(&p, i).unwrap();
                    }
                });
            }
        });
        wal.sync().unwrap();
        drop(wal);
        let wal = open(dir.path(), WalOptions::default());
        let got = read_all(&mut wal.reader(0));
        assert_eq!(got.len() as u32, threads * per_thread);
        let mut next = vec![0u32; threads as usize];
        for (k, rec) in got.iter().enumerate() {
            assert_eq!(rec.seq, k as u64);
            let t = u32_at(&rec.payload, 0) as usize;
            let i = u32_at(&rec.payload, 4);
            assert_eq!((i, rec.item_count), (next[t], next[t]), "thread {t} in order");
            next[t] += 1;
        }
        assert!(segment_files(dir.path()).len() > 1);
    }

    #[test]
    fn append_wakes_the_reader() {
        use std::future::Future;
        use std::task::{Context, Poll, Waker};
        let dir = tempfile::tempdir().unwrap();
        let wal = open(dir.path(), WalOptions::default());
        let notify = wal.notifier();
        wal.append(b"x", 1).unwrap();
        // notify_one keeps a permit, so a reader that checks after the append still wakes.
        let notified = notify.notified();
        let mut notified = std::pin::pin!(notified);
        let mut cx = Context::from_waker(Waker::noop());
        assert!(matches!(notified.as_mut().poll(&mut cx), Poll::Ready(())));
    }

    #[test]
    fn refuse_when_full_keeps_every_record_and_says_storage_full() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = opts(64 << 10, 256 << 10);
        o.refuse_when_full = true;
        let wal = Arc::new(Wal::open(dir.path(), o).unwrap());
        let payload = vec![7u8; 30 << 10];
        let mut appended = 0;
        let err = loop {
            match wal.append(&payload, 1) {
                Ok(_) => appended += 1,
                Err(e) => break e,
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::StorageFull);
        assert!(wal.size() <= 256 << 10);
        assert_eq!(wal.stats().evicted_records, 0);
        let mut r = wal.reader(0);
        let mut n = 0;
        while r.next().unwrap().is_some() {
            n += 1;
        }
        assert_eq!(n, appended, "nothing was evicted");
        // Acknowledging frees room again.
        wal.commit(appended as u64, &[]).unwrap();
        assert!(wal.append(&payload, 1).is_ok());
    }

    #[test]
    fn rejects_bad_options_and_oversized_records() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Wal::open(dir.path(), opts(10, 1000)).is_err());
        assert!(Wal::open(dir.path(), opts(1000, 999)).is_err());
        let wal = open(dir.path(), opts(100, 200));
        let err = wal.append(&[0; 200], 1).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(wal.append(&[0; 100], 1).unwrap(), 0);
    }
}
