//! The tailer: one thread that finds the files of every target, reads them in chunks, turns
//! lines into entries (container formats, partial-line merging, the job's pipeline) and
//! appends them to the clients' WALs, each record annotated with the file and the offset it
//! covers.
//!
//! Files are found by a rescan (at start, every `rescan_interval`, and when `notify` reports a
//! created, removed or renamed file) and read when `notify` reports a change, or at the latest
//! every second. A file is keyed by device + inode: when its path is renamed away (kubelet's
//! rotation) or deleted, it is read to its end and then closed, while the new file at the path
//! is read from its start; a file that shrank (copytruncate) is read again from its start. A
//! position never passes bytes held by partial-line or multiline merging. When a client's WAL
//! is near its bound, reading pauses (nothing is evicted): the files are the second buffer.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use config::logs::StartAt;

use super::format::Format;
use super::pipeline::{Compiled, Entry, Labels, Output, Pipeline};
use super::positions::{FileKey, Identity, Positions, Saved};
use super::sink::ClientSink;
use crate::telemetry::LogsMetrics;

/// Bytes read from a file at a time (less for a small WAL: `WAL bound / 32`, so that a chunk's
/// record, labels included, always fits in an empty WAL).
const CHUNK: usize = 1 << 20;

/// A job as the tailer needs it.
pub struct Job {
    /// `job_name`.
    pub name: String,
    /// Its stages.
    pub pipeline: Arc<Compiled>,
    /// Where files found at the first start begin.
    pub start_at: StartAt,
    /// Lines are container log lines (CRI or Docker, detected per file).
    pub container_format: bool,
    /// Most partial lines merged into one (`cri.max_partial_lines`).
    pub max_partial_lines: usize,
    /// Longest line kept (`cri.max_partial_line_size`, else `logs.max_line_size`; 0 = none).
    pub max_line_size: usize,
    /// `relabel_configs` of a `kubernetes_pods` job, applied to each file's labels (with
    /// `__path__` and `__meta_kubernetes_pod_uid`); a file they drop is not read.
    pub relabel: Vec<crate::relabel::Rule>,
}

/// Files to tail: a glob and the labels of its files.
#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    /// Index of the job.
    pub job: usize,
    /// `__path__`: a glob (`**` allowed).
    pub path: String,
    /// Stream labels.
    pub labels: BTreeMap<String, String>,
    /// Add a `filename` label (static configs, as Promtail).
    pub filename_label: bool,
    /// Labels come from `/var/log/pods/<ns>_<pod>_<uid>/<container>/` and the pod cache.
    pub kubernetes_pods: bool,
}

/// What a pod adds to the labels of its files (from the pod cache).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodMeta {
    /// `app`: pod label `app.kubernetes.io/name`, else `app`.
    pub app: Option<String>,
    /// The node the pod runs on.
    pub node_name: Option<String>,
}

/// Looks a pod up by uid.
pub type PodLookup = Arc<dyn Fn(&str) -> Option<PodMeta> + Send + Sync>;

/// One file's row on the status page.
#[derive(Clone, Debug, serde::Serialize)]
pub struct FileStatus {
    /// Where it is (or was, when rotated away).
    pub path: String,
    /// Its job.
    pub job: String,
    /// Bytes read into the WAL (the position).
    pub offset: u64,
    /// Its size.
    pub size: u64,
    /// Renamed away or deleted; read to its end, then closed.
    pub rotated: bool,
}

/// Shared between the tailer and its owner.
pub struct Control {
    /// Set to stop at the next line boundary.
    pub stop: AtomicBool,
    /// New targets (replacing all).
    pub targets: Mutex<Option<Vec<Target>>>,
    /// Files tailed, for the status page.
    pub status: Mutex<Vec<FileStatus>>,
    /// Wakes the tailer (notify events, new targets, stop).
    pub wake: crossbeam_channel::Sender<bool>,
}

struct Merge {
    start: u64,
    ts_ns: i64,
    stream: &'static str,
    message: String,
    parts: usize,
    truncated: bool,
}

struct Tailed {
    path: PathBuf,
    file: File,
    id: Identity,
    /// Next byte to read.
    offset: u64,
    /// Bytes of an unfinished line (the file's bytes `offset - carry.len() .. offset`).
    carry: Vec<u8>,
    /// Skip to the next newline (the rest of an over-long line).
    skipping: bool,
    /// Partial container lines being merged, per stream (stdout, stderr): runtimes interleave
    /// the two.
    merge: [Option<Merge>; 2],
    /// Everything before this reached the WAL (or was dropped): the position.
    safe: u64,
    size: u64,
    target: Target,
    labels: Labels,
    /// The labels with `stream` added, per stream (stdout, stderr).
    stream_labels: [Option<Labels>; 2],
    /// The pod cache knew the pod when the labels were made.
    resolved: bool,
    pipeline: Pipeline,
    format: Option<Format>,
    rotated_at: Option<Instant>,
    deleted: bool,
    /// Dropped by the job's `relabel_configs`: kept open (not found again and again) but not
    /// read, its position unchanged.
    excluded: bool,
}

/// The tailer's settings.
pub struct Settings {
    /// Rescan interval.
    pub rescan: Duration,
    /// Open file limit.
    pub max_open_files: usize,
    /// Positions file.
    pub positions_file: PathBuf,
    /// Positions sync period.
    pub sync_period: Duration,
    /// This is the first start (no positions, no WAL): `start_at` applies.
    pub first_start: bool,
    /// When the previous run last saved positions (or this run started): unknown rotated files
    /// newer than this are read, and `start_at: end` applies to files older than this.
    pub since: std::time::SystemTime,
    /// The node's name for the `node_name` label.
    pub node_name: Option<String>,
}

/// The tailer thread's state.
pub struct Tailer {
    jobs: Vec<Job>,
    targets: Vec<Target>,
    files: HashMap<FileKey, Tailed>,
    /// Paths found but not opened because of the open-files limit: (size when seen).
    waiting: BTreeMap<PathBuf, (Target, u64, FileKey, Instant)>,
    positions: Positions,
    clients: Vec<ClientSink>,
    settings: Settings,
    metrics: Arc<LogsMetrics>,
    control: Arc<Control>,
    wake: crossbeam_channel::Receiver<bool>,
    pods: Option<PodLookup>,
    last_sync: Instant,
    roll_marks: Vec<u64>,
    buf: Vec<u8>,
    out: Output,
    /// Files (live and rotated) the last scan saw.
    seen: HashSet<FileKey>,
    /// Identities and positions of files found truncated lately.
    retired: Vec<(Identity, u64)>,
    /// Compressed rotated files looked at (see [`Tailer::gunzip_rotated`]).
    gz_checked: HashSet<FileKey>,
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

/// Whether `offset` is inside a line of `file` (the byte before it is not a newline).
fn mid_line(file: &File, offset: u64) -> bool {
    let mut b = [0u8; 1];
    offset > 0 && matches!(file.read_at(&mut b, offset - 1), Ok(1) if b[0] != b'\n')
}

/// `/var/log/pods/<ns>_<pod>_<uid>/<container>/<n>.log` → (namespace, pod, uid, container).
pub fn pod_of_path(path: &Path) -> Option<(String, String, String, String)> {
    let container = path.parent()?;
    let pod_dir = container.parent()?;
    let c = container.file_name()?.to_str()?.to_owned();
    let d = pod_dir.file_name()?.to_str()?;
    // Namespaces and pod names have no `_`; the uid is the last part.
    let mut parts = d.splitn(3, '_');
    let ns = parts.next()?.to_owned();
    let pod = parts.next()?.to_owned();
    let uid = parts.next()?.to_owned();
    Some((ns, pod, uid, c))
}

impl Tailer {
    /// A tailer over `clients`, starting from `positions`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        jobs: Vec<Job>,
        clients: Vec<ClientSink>,
        positions: Positions,
        settings: Settings,
        metrics: Arc<LogsMetrics>,
        control: Arc<Control>,
        wake: crossbeam_channel::Receiver<bool>,
        pods: Option<PodLookup>,
    ) -> Tailer {
        let smallest = clients
            .iter()
            .flat_map(|c| c.wals())
            .map(|w| w.limits().0)
            .min()
            .unwrap_or(1 << 30);
        let chunk = ((smallest / 32) as usize).clamp(16 << 10, CHUNK);
        Tailer {
            jobs,
            targets: Vec::new(),
            files: HashMap::new(),
            waiting: BTreeMap::new(),
            positions,
            roll_marks: clients
                .iter()
                .map(|c| c.wals().map(|w| w.active_first_seq()).sum())
                .collect(),
            clients,
            settings,
            metrics,
            control,
            wake,
            pods,
            last_sync: Instant::now(),
            buf: vec![0; chunk],
            out: Output::default(),
            seen: HashSet::new(),
            retired: Vec::new(),
            gz_checked: HashSet::new(),
        }
    }

    /// Runs until stopped: rescans, reads, saves positions.
    pub fn run(mut self) {
        let mut last_scan: Option<Instant> = None;
        let mut rescan = true;
        let mut last_status = Instant::now();
        loop {
            if self.control.stop.load(Ordering::SeqCst) {
                break;
            }
            if let Some(t) = self.control.targets.lock().unwrap_or_else(|p| p.into_inner()).take() {
                self.targets = t;
                rescan = true;
            }
            if rescan || last_scan.is_none_or(|t| t.elapsed() >= self.settings.rescan) {
                self.scan();
                last_scan = Some(Instant::now());
                rescan = false;
            }
            let read = self.read_pass();
            self.flush_multiline(false);
            self.maybe_sync(false);
            if read {
                // Busy reading: still take notify's news (a rotation) and refresh the status.
                while let Ok(s) = self.wake.try_recv() {
                    rescan |= s;
                }
                if last_status.elapsed() >= Duration::from_secs(1) {
                    self.publish_status();
                    last_status = Instant::now();
                }
                continue;
            }
            self.publish_status();
            let idle = self
                .files
                .values()
                .filter_map(|t| t.pipeline.next_flush())
                .min()
                .map_or(Duration::from_secs(1), |at| {
                    at.saturating_duration_since(Instant::now())
                })
                .min(Duration::from_secs(1));
            match self.wake.recv_timeout(idle) {
                Ok(structural) => {
                    rescan |= structural;
                    // Coalesce a burst of events.
                    while let Ok(s) = self.wake.try_recv() {
                        rescan |= s;
                    }
                }
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
            }
        }
        // Multiline blocks being built go out now (as at their max_wait_time), so the
        // positions pass them and a restart or reload repeats none of the lines read after
        // their start.
        self.flush_multiline(true);
        self.maybe_sync(true);
        self.publish_status();
    }

    fn scan(&mut self) {
        let mut found: BTreeMap<PathBuf, Target> = BTreeMap::new();
        let mut rotated: BTreeMap<PathBuf, Target> = BTreeMap::new();
        let mut gzipped: BTreeMap<PathBuf, Target> = BTreeMap::new();
        for t in &self.targets {
            let Ok(paths) = glob::glob(&t.path) else { continue };
            for p in paths.flatten() {
                // One file is tailed once, however many targets name it: the first wins.
                found.entry(p).or_insert_with(|| t.clone());
            }
            // Rotated files (`0.log.20260101-000000`, kubelet's; not yet compressed ones).
            let Ok(paths) = glob::glob(&format!("{}.*", t.path)) else {
                continue;
            };
            for p in paths.flatten() {
                let name = p
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                if name.ends_with(".gz") {
                    gzipped.entry(p).or_insert_with(|| t.clone());
                    continue;
                }
                if [".bz2", ".xz", ".zst", ".zip", ".tmp"]
                    .iter()
                    .any(|x| name.ends_with(x))
                {
                    continue;
                }
                rotated.entry(p).or_insert_with(|| t.clone());
            }
        }
        // Turns: with files waiting for a slot, open files read to their end with nothing held
        // are closed (their position kept) so the waiting ones are read; they wait in turn.
        if !self.waiting.is_empty() {
            self.close_idle(self.waiting.len());
        }
        let mut seen: HashSet<FileKey> = HashSet::new();
        let mut new_waiting = BTreeMap::new();
        // Files that waited for a slot come first, the longest waiting first.
        let mut order: Vec<(PathBuf, Target)> = found.clone().into_iter().collect();
        let now = Instant::now();
        order.sort_by_key(|(p, _)| match self.waiting.get(p) {
            Some((_, _, _, since)) => (false, *since),
            None => (true, now),
        });
        for (path, target) in order {
            let Ok(m) = std::fs::metadata(&path) else { continue };
            if !m.is_file() {
                continue;
            }
            let key = FileKey::of(&m);
            if !seen.insert(key) {
                // The same file under a second path (a symlink, two globs): tailed once, under
                // the path found first.
                continue;
            }
            if let Some(mut t) = self.files.remove(&key) {
                // Its target's labels may have changed (relabeling, discovery): relabel.
                let relabel = t.path != path || t.target != target;
                t.path = path;
                t.target = target;
                t.rotated_at = None;
                if relabel {
                    self.label(&mut t);
                }
                self.files.insert(key, t);
                continue;
            }
            if self.files.len() >= self.settings.max_open_files {
                let since = self.waiting.get(&path).map_or(now, |w| w.3);
                new_waiting.insert(path, (target, m.len(), key, since));
                continue;
            }
            self.open(path, target, false);
        }
        // A rotated file is read (to its end, then closed) when it has bytes past its saved
        // position, or when it is unknown and newer than the last run's positions: a file
        // created and rotated between two looks, or while the agent was down.
        let mut all_seen = seen.clone();
        for (path, target) in rotated {
            let Ok(m) = std::fs::metadata(&path) else { continue };
            if !m.is_file() || found.contains_key(&path) {
                continue;
            }
            let key = FileKey::of(&m);
            all_seen.insert(key);
            if self.files.contains_key(&key) {
                continue;
            }
            // A rotated file may be deleted soon: it takes the slot of an idle file.
            if self.files.len() >= self.settings.max_open_files && self.close_idle(1) == 0 {
                continue;
            }
            self.open(path, target, true);
        }
        for (path, target) in gzipped {
            let Ok(m) = std::fs::metadata(&path) else { continue };
            let key = FileKey::of(&m);
            all_seen.insert(key);
            if self.files.len() < self.settings.max_open_files && self.gz_checked.insert(key) {
                self.gunzip_rotated(path, target);
            }
        }
        self.seen = all_seen;
        // Known files no longer at a watched path were rotated away or deleted.
        for t in self.files.values_mut() {
            if !seen.contains(&t.id.key) && t.rotated_at.is_none() {
                t.rotated_at = Some(Instant::now());
            }
            if let Ok(m) = t.file.metadata() {
                t.deleted = m.nlink() == 0;
            }
        }
        // Files that waited for a free slot and are gone now were never read: lost.
        for (path, (target, size, key, _)) in std::mem::take(&mut self.waiting) {
            if !new_waiting.contains_key(&path) && !self.files.contains_key(&key) {
                // What it held past its saved position (files closed for a turn were read).
                let read = self
                    .positions
                    .files
                    .get(&path)
                    .filter(|s| s.id.is_some_and(|id| id.key == key))
                    .map_or(0, |s| s.offset);
                let job = &self.jobs[target.job].name;
                self.metrics
                    .lost_bytes(job, "deleted_before_read", size.saturating_sub(read));
            }
        }
        self.waiting = new_waiting;
        self.metrics.set_files(self.files.len(), self.waiting.len());
    }

    fn open(&mut self, path: PathBuf, target: Target, rotated: bool) {
        self.open_file(path, None, target, rotated);
    }

    /// Opens `path` (or reads `given` in its place: a decompressed copy) for `target`.
    fn open_file(&mut self, path: PathBuf, given: Option<File>, target: Target, rotated: bool) {
        let file = match given.map_or_else(|| File::open(&path), Ok) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "Cannot open a log file; retrying at the next scan.");
                self.metrics.open_error(&self.jobs[target.job].name);
                return;
            }
        };
        let Ok(id) = Identity::read(&file) else { return };
        let Ok(meta) = file.metadata() else { return };
        let size = meta.len();
        // Creation time where the filesystem keeps it (a rename keeps it too), else mtime.
        let modified = meta
            .created()
            .or_else(|_| meta.modified())
            .unwrap_or(std::time::UNIX_EPOCH);
        let job = &self.jobs[target.job];
        let saved = self.positions.lookup(&path, &file);
        // A copy of a file already read (copytruncate) goes on from where that file was.
        let saved = match saved {
            None if rotated => self.copy_of(&file),
            s => s,
        };
        if rotated {
            match saved {
                Some(o) if o < size => {}
                Some(_) => return,
                None if modified > self.settings.since => {}
                None => return,
            }
        }
        let offset = match saved {
            Some(o) if o > size => {
                // Truncated while the agent was not running: its new contents from the start.
                self.metrics.truncations(&job.name);
                0
            }
            Some(o) => o,
            // `start_at: end` is for files that were there when the agent first started.
            None if self.settings.first_start && job.start_at == StartAt::End && modified <= self.settings.since => {
                size
            }
            None => 0,
        };
        tracing::info!(path = %path.display(), job = %job.name, offset, "Tailing a log file.");
        let pipeline = Pipeline::new(job.pipeline.clone());
        let format = None;
        // A position in the middle of a line follows an over-long line that was cut.
        let skipping = mid_line(&file, offset);
        let mut t = Tailed {
            path,
            file,
            id,
            offset,
            carry: Vec::new(),
            skipping,
            merge: [None, None],
            safe: offset,
            size,
            labels: Arc::new(BTreeMap::new()),
            stream_labels: [None, None],
            resolved: false,
            target,
            pipeline,
            format,
            rotated_at: rotated.then(Instant::now),
            deleted: false,
            excluded: false,
        };
        self.label(&mut t);
        self.positions.claim(
            &t.path,
            Saved {
                id: Some(t.id),
                offset: t.safe,
            },
        );
        self.files.insert(t.id.key, t);
    }

    /// Closes up to `n` open files that are idle — live, read to their end, nothing held, or
    /// excluded by relabeling — keeping their positions. Returns how many it closed.
    fn close_idle(&mut self, n: usize) -> usize {
        let idle: Vec<FileKey> = self
            .files
            .iter()
            .filter(|(_, t)| {
                t.rotated_at.is_none()
                    && (t.excluded
                        || t.carry.is_empty()
                            && t.merge.iter().all(Option::is_none)
                            && t.pipeline.held_from().is_none()
                            && t.safe == t.offset
                            && t.file.metadata().is_ok_and(|m| m.len() == t.offset))
            })
            .map(|(k, _)| *k)
            .take(n)
            .collect();
        for key in &idle {
            if let Some(t) = self.files.remove(key) {
                self.positions.claim(
                    &t.path,
                    Saved {
                        id: Some(t.id),
                        offset: t.safe,
                    },
                );
                self.metrics.turns(&self.jobs[t.target.job].name);
            }
        }
        idle.len()
    }

    /// A rotated file kubelet compressed (`0.log.<time>.gz`) is read only when it holds lines
    /// not read yet: its decompressed start is a file the agent was reading (a saved position,
    /// or a copy being read) and it goes on past that position — the agent was down, or
    /// behind, when the file was rotated and compressed. It is decompressed into an unlinked
    /// file next to the positions file and read from there, under its own path (its labels).
    /// Compressed files never read before are left alone, as Promtail does.
    fn gunzip_rotated(&mut self, path: PathBuf, target: Target) {
        use std::io::Read;
        let Ok(gz) = File::open(&path) else { return };
        let mut prefix = Vec::new();
        let mut dec = flate2::read::MultiGzDecoder::new(&gz);
        if (&mut dec)
            .take(super::positions::FINGERPRINT_LEN)
            .read_to_end(&mut prefix)
            .is_err()
        {
            return;
        }
        let saved = self
            .positions
            .files
            .values()
            .filter_map(|s| s.id.map(|id| (id, s.offset)));
        let open = self.files.values().map(|t| (t.id, t.offset));
        let Some(offset) = open
            .chain(saved)
            .chain(self.retired.iter().copied())
            .filter(|(id, _)| id.fp_len as u64 >= 64 && id.starts(&prefix))
            .map(|(_, o)| o)
            .max()
        else {
            return;
        };
        if self.files.values().any(|t| t.id.starts(&prefix)) {
            // Its uncompressed file is still open (deleted, being read to its end).
            return;
        }
        let dir = self
            .settings
            .positions_file
            .parent()
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
            .join(".gunzip");
        let job = self.jobs[target.job].name.clone();
        let copy = (|| -> std::io::Result<File> {
            std::fs::create_dir_all(&dir)?;
            let tmp = dir.join(format!("{}.log", std::process::id()));
            let mut out = File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)?;
            // Unlinked at once: nothing is left behind, and it reads as deleted (closed at its end).
            std::fs::remove_file(&tmp)?;
            let mut dec = flate2::read::MultiGzDecoder::new(File::open(&path)?);
            std::io::copy(&mut dec, &mut out)?;
            Ok(out)
        })();
        match copy {
            Ok(f) if f.metadata().is_ok_and(|m| m.len() > offset) => {
                tracing::info!(path = %path.display(), offset, "Reading the unread end of a compressed rotated log file.");
                self.open_file(path, Some(f), target, true);
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "Cannot decompress a rotated log file with unread lines; they are lost.");
                self.metrics.read_error(&job);
                let size = std::fs::metadata(&path).map_or(0, |m| m.len());
                self.metrics.lost_bytes(&job, "compressed_unreadable", size);
            }
        }
    }

    /// The position of a file `file` is a copy of (same first bytes): an open file, one that was
    /// truncated lately, or a saved position.
    fn copy_of(&self, file: &File) -> Option<u64> {
        let open = self.files.values().map(|t| (t.id, t.safe));
        let saved = self
            .positions
            .files
            .values()
            .filter_map(|s| s.id.map(|id| (id, s.offset)));
        // The furthest any of them got (a file and its copies hold the same lines).
        open.chain(self.retired.iter().copied())
            .chain(saved)
            .filter(|(id, _)| id.fp_len as u64 >= 64)
            .filter(|(id, _)| id.same_start(file).unwrap_or(false))
            .map(|(_, off)| off)
            .max()
    }

    /// The stream labels of a file: its target's, plus `filename`, plus what its path and
    /// the pod cache say for `kubernetes_pods`.
    fn label(&self, t: &mut Tailed) {
        let mut l = t.target.labels.clone();
        if t.target.filename_label {
            l.insert("filename".to_owned(), t.path.display().to_string());
        }
        t.resolved = true;
        if t.target.kubernetes_pods {
            if let Some((ns, pod, uid, container)) = pod_of_path(&t.path) {
                let meta = self.pods.as_ref().and_then(|f| f(&uid));
                t.resolved = meta.is_some() || self.pods.is_none();
                let meta = meta.unwrap_or_default();
                if let Some(app) = meta.app.filter(|a| !a.is_empty()) {
                    l.insert("job".to_owned(), format!("{ns}/{app}"));
                    l.insert("app".to_owned(), app);
                }
                if let Some(n) = meta.node_name.or_else(|| self.settings.node_name.clone()) {
                    l.insert("node_name".to_owned(), n);
                }
                l.insert("namespace".to_owned(), ns);
                l.insert("pod".to_owned(), pod);
                l.insert("container".to_owned(), container);
                let rules = &self.jobs[t.target.job].relabel;
                if !rules.is_empty() {
                    let mut rl = crate::labels::Labels::from_pairs(l.iter().map(|(k, v)| (k.as_str(), v.as_str())));
                    rl.set("__path__", &t.path.display().to_string());
                    rl.set("__meta_kubernetes_pod_uid", &uid);
                    t.excluded = !crate::relabel::process(&mut rl, rules);
                    l = rl
                        .iter()
                        .filter(|(k, v)| !k.starts_with("__") && !v.is_empty())
                        .map(|(k, v)| (k.to_owned(), v.to_owned()))
                        .collect();
                }
            }
        }
        t.labels = Arc::new(l);
        t.stream_labels = [None, None];
    }

    /// Whether a client's WAL is too full to take another chunk (a cheap early pause; the exact
    /// check is [`ClientSink::fits`] before appending).
    fn wal_full(&self) -> bool {
        self.clients.iter().flat_map(|c| c.wals()).any(|w| {
            let (max, _) = w.limits();
            w.size() + (max / 4).min(2 * CHUNK as u64) > max
        })
    }

    /// Reads one chunk of every file that has new bytes. True when anything was read.
    fn read_pass(&mut self) -> bool {
        let mut any = false;
        let mut full = false;
        // A rotated file is read to its end before the new file in its directory, so a
        // stream's entries stay in time order across a rotation.
        let rotating: HashSet<PathBuf> = self
            .files
            .values()
            .filter(|t| t.rotated_at.is_some() && !t.excluded && t.offset < t.size.max(1))
            .filter_map(|t| t.path.parent().map(Path::to_path_buf))
            .collect();
        let mut keys: Vec<(bool, FileKey)> = self.files.iter().map(|(k, t)| (t.rotated_at.is_none(), *k)).collect();
        keys.sort();
        for (live, key) in keys {
            if live
                && self
                    .files
                    .get(&key)
                    .and_then(|t| t.path.parent())
                    .is_some_and(|d| rotating.contains(d))
            {
                continue;
            }
            if self.control.stop.load(Ordering::SeqCst) {
                break;
            }
            if self.wal_full() {
                self.metrics.paused();
                std::thread::sleep(Duration::from_millis(100));
                return true;
            }
            let Some(mut t) = self.files.remove(&key) else { continue };
            if !t.resolved {
                self.label(&mut t);
            }
            let keep = match self.read_chunk(&mut t) {
                Ok(n) => {
                    any |= n > 0;
                    n > 0 || !self.finished(&mut t)
                }
                Err(e) => {
                    // Read or WAL append failed: start again from the position, so the lines
                    // not in the WAL are read again.
                    let to = t.safe;
                    self.rewind(&mut t, to);
                    if e.kind() == std::io::ErrorKind::StorageFull {
                        // Reading pauses until the sender frees room; nothing is evicted.
                        full = true;
                    } else {
                        tracing::warn!(path = %t.path.display(), error = %e, "Reading a log file failed; it is retried.");
                        self.metrics.read_error(&self.jobs[t.target.job].name);
                    }
                    true
                }
            };
            if keep {
                self.files.insert(key, t);
                if full {
                    self.metrics.paused();
                    std::thread::sleep(Duration::from_millis(100));
                    return true;
                }
            } else {
                // Its position stays while the file exists, so it is not read again.
                tracing::info!(path = %t.path.display(), offset = t.safe, "Closed a rotated or deleted log file read to its end.");
            }
        }
        if !any && !self.waiting.is_empty() && self.files.len() < self.settings.max_open_files {
            // A slot freed up: take the next waiting files at the next scan.
            let _ = self.control.wake.try_send(true);
        }
        any
    }

    /// At the end of a rotated or deleted file: flush what it held and close it.
    fn finished(&mut self, t: &mut Tailed) -> bool {
        let Some(at) = t.rotated_at else {
            return false;
        };
        // A renamed file may get a last write from a runtime that has not reopened yet.
        if !t.deleted && at.elapsed() < Duration::from_secs(1) {
            return false;
        }
        // Its last line, even without a final newline, and whatever was still merging.
        if !t.carry.is_empty() && !t.skipping {
            let line = std::mem::take(&mut t.carry);
            let start = t.offset - line.len() as u64;
            self.line(t, &line, start, t.offset);
        }
        let before = t.safe;
        self.end_merge(t, 0);
        self.end_merge(t, 1);
        t.pipeline.flush(true, &mut self.out);
        t.safe = t.offset;
        if self.emit(t).is_err() {
            // Not in the WAL (full, or failing): read the end again later.
            self.rewind(t, before);
            return false;
        }
        true
    }

    /// Forgets what was read past `to` (and what merging held), to read it again.
    fn rewind(&self, t: &mut Tailed, to: u64) {
        t.safe = to;
        t.offset = to;
        t.carry.clear();
        t.merge = [None, None];
        t.skipping = mid_line(&t.file, to);
        t.pipeline = Pipeline::new(self.jobs[t.target.job].pipeline.clone());
    }

    /// Reads up to a chunk of `t` and processes its whole lines. Returns the bytes read.
    fn read_chunk(&mut self, t: &mut Tailed) -> std::io::Result<usize> {
        if t.excluded {
            return Ok(0);
        }
        let size = t.file.metadata()?.len();
        if size < t.offset || (t.offset > 0 && !t.id.matches(&t.file).unwrap_or(true)) {
            // Truncated (copytruncate): what was not read before is lost; start over.
            let lost = t.size.saturating_sub(t.offset);
            let job = &self.jobs[t.target.job].name;
            self.metrics.lost_bytes(job, "truncated", lost);
            self.metrics.truncations(job);
            tracing::info!(path = %t.path.display(), "Log file truncated; reading it from its start.");
            // Its copy (copytruncate) is recognised by these first bytes.
            if self.retired.len() >= 1024 {
                self.retired.remove(0);
            }
            self.retired.push((t.id, t.safe));
            t.offset = 0;
            t.safe = 0;
            t.carry.clear();
            t.merge = [None, None];
            t.skipping = false;
            t.id = Identity::read(&t.file)?;
            t.pipeline = Pipeline::new(self.jobs[t.target.job].pipeline.clone());
        }
        t.size = size;
        if size == t.offset {
            return Ok(0);
        }
        if t.id.fp_len < super::positions::FINGERPRINT_LEN as u32 && size > u64::from(t.id.fp_len) {
            // The fingerprint grows with the file up to its full length.
            t.id = Identity::read(&t.file)?;
        }
        let safe_before = t.safe;
        let want = ((size - t.offset) as usize).min(self.buf.len());
        let n = t.file.read_at(&mut self.buf[..want], t.offset)?;
        if n == 0 {
            return Ok(0);
        }
        let job_name = self.jobs[t.target.job].name.clone();
        self.metrics.bytes_read(&job_name, n as u64);
        let chunk = std::mem::take(&mut self.buf);
        // File offset where the carried bytes (or the chunk) begin.
        let mut pos = t.offset - t.carry.len() as u64;
        t.offset += n as u64;
        let mut rest = &chunk[..n];
        let mut lines = 0u64;
        while let Some(i) = memchr::memchr(b'\n', rest) {
            let (line, after) = (&rest[..i], &rest[i + 1..]);
            let end = pos + t.carry.len() as u64 + i as u64 + 1;
            if t.skipping {
                // The rest of an over-long line, already sent truncated.
                t.skipping = false;
                t.carry.clear();
                self.advance(t, end);
            } else if t.carry.is_empty() {
                self.line(t, line, pos, end);
            } else {
                let mut whole = std::mem::take(&mut t.carry);
                whole.extend_from_slice(line);
                self.line(t, &whole, pos, end);
                whole.clear();
                t.carry = whole;
            }
            pos = end;
            lines += 1;
            rest = after;
        }
        if !rest.is_empty() && !t.skipping {
            t.carry.extend_from_slice(rest);
            let cap = self.line_cap(t.target.job);
            if t.carry.len() > cap {
                // An over-long line: keep its start, skip the rest up to its newline.
                let line = std::mem::take(&mut t.carry);
                let start = t.offset - line.len() as u64;
                // Set first: `line` knows by it that this line was cut.
                t.skipping = true;
                self.line(t, &line[..cap], start, t.offset);
                self.metrics.truncated(&job_name);
            }
        }
        self.buf = chunk;
        self.metrics.lines_read(&job_name, lines);
        if let Err(e) = self.emit(t) {
            // Not in the WAL: the position goes back to where this chunk's lines began.
            t.safe = safe_before;
            return Err(e);
        }
        Ok(n)
    }

    /// The most bytes of an unfinished line kept in memory.
    fn line_cap(&self, job: usize) -> usize {
        match self.jobs[job].max_line_size {
            0 => 64 << 20,
            // Room for a CRI or Docker envelope around the longest message.
            m => m + 4096,
        }
    }

    /// One whole line of `t` (without its newline) that spans `start..end` of the file.
    fn line(&mut self, t: &mut Tailed, raw: &[u8], start: u64, end: u64) {
        // Valid UTF-8 (nearly always) is borrowed after the fast check; invalid bytes become
        // U+FFFD (Loki wants UTF-8).
        let text = match std::str::from_utf8(raw) {
            Ok(s) => std::borrow::Cow::Borrowed(s),
            Err(_) => String::from_utf8_lossy(raw),
        };
        let job = &self.jobs[t.target.job];
        if !job.container_format {
            self.raw_line(t, text.into_owned(), start);
            self.advance(t, end);
            return;
        }
        let mut format = *t.format.get_or_insert_with(|| Format::detect(&text));
        let mut parsed = format.parse(&text);
        if parsed.is_err() {
            // The first line may have been garbage: a line in the other format switches.
            let other = match format {
                Format::Cri => Format::Docker,
                Format::Docker => Format::Cri,
            };
            if let Ok(l) = other.parse(&text) {
                format = other;
                t.format = Some(other);
                parsed = Ok(l);
            }
        }
        if parsed.is_err() && format == Format::Docker && t.skipping {
            // A Docker line cut at the cap is no longer JSON: keep the start of its message.
            parsed = super::format::parse_docker_cut(&text).ok_or(super::format::FormatError::Docker("cut".into()));
        }
        match parsed {
            Ok(l) => {
                let stream = l.stream.as_str();
                let ts = l.ts_ns as i64;
                let max = job.max_line_size;
                let k = usize::from(stream == "stderr");
                let merge = t.merge[k].get_or_insert_with(|| Merge {
                    start,
                    ts_ns: ts,
                    stream,
                    message: String::new(),
                    parts: 0,
                    truncated: false,
                });
                if max > 0 && merge.message.len() + l.message.len() > max {
                    let room = max.saturating_sub(merge.message.len());
                    let mut cut = room.min(l.message.len());
                    while !l.message.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    merge.message.push_str(&l.message[..cut]);
                    if !merge.truncated {
                        merge.truncated = true;
                        self.metrics.truncated(&job.name);
                    }
                } else {
                    merge.message.push_str(&l.message);
                }
                merge.parts += 1;
                if !l.partial || merge.parts >= job.max_partial_lines {
                    self.end_merge(t, k);
                }
            }
            Err(e) => {
                // Not in the container format: kept as it is, counted.
                self.metrics.format_error(&job.name);
                tracing::debug!(path = %t.path.display(), error = %e, "A log line is not in the container format.");
                self.end_merge(t, 0);
                self.end_merge(t, 1);
                self.raw_line(t, text.into_owned(), start);
            }
        }
        self.advance(t, end);
    }

    /// A line taken as it is (no container format): stamped with the time it was read.
    fn raw_line(&mut self, t: &mut Tailed, text: String, start: u64) {
        let e = Entry {
            ts_ns: now_ns(),
            line: self.cap(text, t.target.job),
            labels: t.labels.clone(),
            extracted: HashMap::new(),
            metadata: Vec::new(),
            tenant: None,
            start,
        };
        t.pipeline.run(e, &mut self.out);
    }

    fn cap(&self, mut s: String, job: usize) -> String {
        let max = self.jobs[job].max_line_size;
        if max > 0 && s.len() > max {
            let mut cut = max;
            while !s.is_char_boundary(cut) {
                cut -= 1;
            }
            s.truncate(cut);
            self.metrics.truncated(&self.jobs[job].name);
        }
        s
    }

    /// Sends a merged container message on through the pipeline.
    fn end_merge(&mut self, t: &mut Tailed, k: usize) {
        let Some(m) = t.merge[k].take() else { return };
        // One shared label set per stream and file, so the sink renders it once.
        let labels = match &t.stream_labels[k] {
            Some(l) => l.clone(),
            None => {
                let mut l = (*t.labels).clone();
                l.insert("stream".to_owned(), m.stream.to_owned());
                let l = Arc::new(l);
                t.stream_labels[k] = Some(l.clone());
                l
            }
        };
        let e = Entry {
            ts_ns: m.ts_ns,
            line: m.message,
            labels,
            extracted: HashMap::new(),
            metadata: Vec::new(),
            tenant: None,
            start: m.start,
        };
        t.pipeline.run(e, &mut self.out);
    }

    /// The position after a line ending at `end`: not past anything still held.
    fn advance(&mut self, t: &mut Tailed, end: u64) {
        let held = [
            t.merge[0].as_ref().map(|m| m.start),
            t.merge[1].as_ref().map(|m| m.start),
            t.pipeline.held_from(),
        ]
        .into_iter()
        .flatten()
        .min();
        t.safe = held.unwrap_or(end);
    }

    fn flush_multiline(&mut self, force: bool) {
        let keys: Vec<FileKey> = self
            .files
            .iter()
            .filter(|(_, t)| t.pipeline.next_flush().is_some_and(|at| force || at <= Instant::now()))
            .map(|(k, _)| *k)
            .collect();
        for k in keys {
            let Some(mut t) = self.files.remove(&k) else { continue };
            let before = t.safe;
            t.pipeline.flush(force, &mut self.out);
            let held = [
                t.merge[0].as_ref().map(|m| m.start),
                t.merge[1].as_ref().map(|m| m.start),
                t.pipeline.held_from(),
            ]
            .into_iter()
            .flatten()
            .min();
            t.safe = held.unwrap_or(t.offset - t.carry.len() as u64);
            if self.emit(&mut t).is_err() {
                // The flushed entry is not in the WAL: its lines are read again.
                self.rewind(&mut t, before);
            }
            self.files.insert(k, t);
        }
    }

    /// Hands the entries the pipeline produced to every client and appends the records.
    fn emit(&mut self, t: &mut Tailed) -> std::io::Result<()> {
        let out = std::mem::take(&mut self.out);
        let job = &self.jobs[t.target.job].name;
        for reason in &out.dropped {
            self.metrics.dropped(job, reason, 1);
        }
        for c in &mut self.clients {
            for e in &out.entries {
                if !c.add(e) {
                    self.metrics.dropped(job, "too_many_tenants", 1);
                }
            }
        }
        let mut result = Ok(());
        // All clients or none: a record appended for one client and refused for another would
        // be sent twice once the chunk is read again.
        if !self.clients.iter().all(ClientSink::fits) {
            for c in &mut self.clients {
                c.discard();
            }
            self.out = Output::default();
            return Err(std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                "a logs WAL is full",
            ));
        }
        for c in &mut self.clients {
            match c.flush(&t.id, t.safe, &t.path) {
                Ok(n) => self.metrics.entries(job, &c.name, n),
                Err(e) => {
                    // A full disk: the lines are not in the WAL, so the position stays
                    // where the WAL is; they are read again.
                    c.discard();
                    self.metrics.wal_append_error(&c.name);
                    tracing::error!(client = %c.name, error = %e, "Appending log entries to the WAL failed; the lines are read again.");
                    result = Err(e);
                }
            }
        }
        self.out = Output {
            entries: {
                let mut v = out.entries;
                v.clear();
                v
            },
            dropped: Vec::new(),
        };
        result?;
        // By identity: a rotated file still known under its old path must not overwrite the
        // entry of the new file at that path.
        let at_path = self
            .positions
            .files
            .get(&t.path)
            .is_some_and(|s| s.id.is_some_and(|id| id.same_file(&t.id)));
        let entry = if at_path {
            self.positions.files.get_mut(&t.path)
        } else {
            self.positions
                .files
                .values_mut()
                .find(|s| s.id.is_some_and(|id| id.same_file(&t.id)))
        };
        match entry {
            Some(s) => {
                s.offset = t.safe;
                s.id = Some(t.id);
            }
            None => self.positions.merge_wal(t.id, t.safe, t.path.clone()),
        }
        Ok(())
    }

    /// Saves positions every `sync_period`, when a WAL segment rolled (before it can be
    /// deleted), and at `force`.
    fn maybe_sync(&mut self, force: bool) {
        let marks: Vec<u64> = self
            .clients
            .iter()
            .map(|c| c.wals().map(|w| w.active_first_seq()).sum())
            .collect();
        let rolled = marks != self.roll_marks;
        if !(force || rolled || self.last_sync.elapsed() >= self.settings.sync_period) {
            return;
        }
        self.roll_marks = marks;
        // Entries with an identity whose file is not tailed any more are dropped.
        // Entries of files neither open nor seen by the last scan (rotated files included) go.
        let open: HashSet<FileKey> = self.files.keys().copied().collect();
        let seen = &self.seen;
        // (A file no job tails now, e.g. of a removed scrape config, keeps its entry while it
        // is on disk, so it resumes where it was if tailed again.)
        self.positions.files.retain(|p, s| match s.id {
            Some(id) => {
                open.contains(&id.key)
                    || seen.contains(&id.key)
                    || std::fs::metadata(p).is_ok_and(|m| FileKey::of(&m) == id.key)
            }
            None => p.exists(),
        });
        match self.positions.save(&self.settings.positions_file) {
            Ok(()) => self.metrics.positions_saved(),
            Err(e) => {
                self.metrics.positions_error();
                tracing::error!(file = %self.settings.positions_file.display(), error = %e, "Saving positions failed.");
            }
        }
        self.last_sync = Instant::now();
    }

    fn publish_status(&self) {
        let mut rows: Vec<FileStatus> = self
            .files
            .values()
            .map(|t| FileStatus {
                path: t.path.display().to_string(),
                job: self.jobs[t.target.job].name.clone(),
                offset: t.safe,
                size: t.size,
                rotated: t.rotated_at.is_some(),
            })
            .collect();
        rows.sort_by(|a, b| a.path.cmp(&b.path));
        let lag: u64 = rows.iter().map(|r| r.size.saturating_sub(r.offset)).sum();
        self.metrics.set_lag(lag);
        self.metrics
            .set_file_rows(rows.iter().map(|r| (r.path.as_str(), r.job.as_str(), r.offset, r.size)));
        *self.control.status.lock().unwrap_or_else(|p| p.into_inner()) = rows;
    }
}
