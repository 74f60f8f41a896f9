//! From entries to WAL records: each entry becomes one log frame (a Loki `StreamAdapter`
//! with one entry) in the record of its client and tenant; each record ends with an annotation
//! naming the file and the offset it covers, so a restart knows where the WAL left each file.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::Path;
use std::sync::Arc;

use super::pipeline::{render_labels, Entry, Labels};
use super::positions::Identity;
use crate::wal::Wal;

/// Tenant queues a client may have besides its own: each is a WAL bounded by
/// `storage.wal_max_size` with its own sender, so a pipeline that makes tenants from log
/// content must not make them without bound. Entries for more are dropped and counted
/// (`reason="too_many_tenants"`).
pub const MAX_TENANTS: usize = 64;

/// Opens (or returns) the queue of a client for a tenant (`None`: the client's own).
pub type OpenQueue = Arc<dyn Fn(Option<&str>) -> io::Result<Arc<Wal>> + Send + Sync>;

/// One client: where its entries go and what it adds.
pub struct ClientSink {
    /// Name in logs and metrics.
    pub name: String,
    /// Labels added to every stream.
    pub external_labels: BTreeMap<String, String>,
    open: OpenQueue,
    queues: HashMap<Option<String>, Arc<Wal>>,
    /// Records being built, per tenant: payload and frame count.
    building: HashMap<Option<String>, (Vec<u8>, u32)>,
    /// Rendered stream labels of recent label sets (by identity of the shared set).
    cache: Vec<(Labels, Arc<str>, u64)>,
}

impl ClientSink {
    /// A client whose queues `open` gives.
    pub fn new(name: String, external_labels: BTreeMap<String, String>, open: OpenQueue) -> io::Result<Self> {
        let mut queues = HashMap::new();
        queues.insert(None, open(None)?);
        Ok(ClientSink {
            name,
            external_labels,
            open,
            queues,
            building: HashMap::new(),
            cache: Vec::new(),
        })
    }

    /// Every queue opened so far.
    pub fn wals(&self) -> impl Iterator<Item = &Arc<Wal>> {
        self.queues.values()
    }

    fn labels_of(&mut self, labels: &Labels) -> (Arc<str>, u64) {
        // The same shared set first (the common case, cheap), then an equal one.
        if let Some((_, s, h)) = self.cache.iter().rev().find(|(l, _, _)| Arc::ptr_eq(l, labels)) {
            return (s.clone(), *h);
        }
        if let Some((_, s, h)) = self.cache.iter().find(|(l, _, _)| **l == **labels) {
            let found = (s.clone(), *h);
            self.cache.push((labels.clone(), found.0.clone(), found.1));
            if self.cache.len() > 256 {
                self.cache.remove(0);
            }
            return found;
        }
        let text: Arc<str> = if self.external_labels.is_empty() {
            render_labels(labels).into()
        } else {
            let mut all = (**labels).clone();
            for (k, v) in &self.external_labels {
                all.entry(k.clone()).or_insert_with(|| v.clone());
            }
            render_labels(&all).into()
        };
        let hash = xxhash_rust::xxh3::xxh3_64(text.as_bytes());
        if self.cache.len() >= 256 {
            self.cache.remove(0);
        }
        self.cache.push((labels.clone(), text.clone(), hash));
        (text, hash)
    }

    /// Opens the queue of `tenant` (one a previous run left, to drain it).
    pub fn open_tenant(&mut self, tenant: &str) -> io::Result<()> {
        let key = Some(tenant.to_owned());
        if !self.queues.contains_key(&key) {
            let w = (self.open)(Some(tenant))?;
            self.queues.insert(key, w);
        }
        Ok(())
    }

    /// Adds an entry to the record being built for its tenant. False (the entry is not
    /// taken) when it names a new tenant beyond [`MAX_TENANTS`].
    pub fn add(&mut self, e: &Entry) -> bool {
        if !self.building.contains_key(&e.tenant) {
            // A tenant not seen since this client started: within the cap?
            let tenants = self.queues.len() + self.building.keys().filter(|k| !self.queues.contains_key(*k)).count();
            if !self.queues.contains_key(&e.tenant) && tenants > MAX_TENANTS {
                return false;
            }
            self.building.insert(e.tenant.clone(), Default::default());
        }
        let (labels, hash) = self.labels_of(&e.labels);
        let Some((buf, n)) = self.building.get_mut(&e.tenant) else {
            return false;
        };
        let meta: Vec<(&str, &str)> = e.metadata.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        crate::frame::push_with(buf, hash, |b| {
            crate::loki::proto::encode_entry(&labels, e.ts_ns, e.line.as_bytes(), &meta, b)
        });
        *n += 1;
        true
    }

    /// Bytes of records being built.
    pub fn pending_bytes(&self) -> usize {
        self.building.values().map(|(b, _)| b.len()).sum()
    }

    /// Whether every record being built fits in its queue now (its WAL refuses appends beyond
    /// its bound rather than evicting). Only the tailer appends and senders only shrink a WAL,
    /// so a `true` holds until the append.
    pub fn fits(&self) -> bool {
        self.building
            .iter()
            .all(|(tenant, (buf, _))| match self.queues.get(tenant) {
                _ if buf.is_empty() => true,
                Some(w) => {
                    let (max, _) = w.limits();
                    // Header of the record and of its annotation frame, and the annotation.
                    w.size() + buf.len() as u64 + 512 + crate::wal::RECORD_HEADER_LEN <= max
                }
                None => true,
            })
    }

    /// Appends the records built so far, each annotated with `file` read up to `offset`.
    /// Returns the entries written.
    pub fn flush(&mut self, id: &Identity, offset: u64, path: &Path) -> io::Result<u64> {
        let mut written = 0;
        let mut note = Vec::new();
        id.annotation(offset, path, &mut note);
        // The record buffers are kept (cleared) for the next chunk: a megabyte each.
        let tenants: Vec<Option<String>> = self.building.keys().cloned().collect();
        for tenant in tenants {
            let wal = match self.queues.get(&tenant) {
                Some(w) => w.clone(),
                None => {
                    let w = (self.open)(tenant.as_deref())?;
                    self.queues.insert(tenant.clone(), w.clone());
                    w
                }
            };
            let Some((buf, n)) = self.building.get_mut(&tenant) else {
                continue;
            };
            if *n == 0 {
                continue;
            }
            crate::frame::push_annotation(buf, &note);
            let appended = wal.append(buf, *n);
            let count = *n;
            buf.clear();
            *n = 0;
            appended?;
            written += u64::from(count);
        }
        Ok(written)
    }

    /// Drops what was built and not flushed (an append failed).
    pub fn discard(&mut self) {
        for (buf, n) in self.building.values_mut() {
            buf.clear();
            *n = 0;
        }
    }
}

/// Where each file was left according to the WAL: per device + inode, its last annotation
/// (records are read in order, so a re-used inode's newer file wins, and a file's latest
/// fingerprint, which grows with it up to its full length, comes with its latest offset).
pub fn positions_in_wal(wal: &Arc<Wal>) -> io::Result<Vec<(Identity, u64, std::path::PathBuf)>> {
    let mut last: HashMap<super::positions::FileKey, (Identity, u64, std::path::PathBuf)> = HashMap::new();
    let mut r = wal.reader(0);
    while let Some(rec) = r.next()? {
        for note in crate::frame::annotations(&rec.payload) {
            if let Some((id, off, path)) = Identity::from_annotation(note) {
                last.insert(id.key, (id, off, path));
            }
        }
    }
    Ok(last.into_values().collect())
}
