//! Where each tailed file was read to, and how a file is recognised again.
//!
//! A file is identified by device + inode plus a fingerprint of its first bytes (up to
//! [`FINGERPRINT_LEN`]), so a rename during rotation keeps its place and a re-used inode with
//! other contents is a new file. The positions file is Promtail's `positions.yaml` (a
//! `positions:` map of path → offset string, which Promtail and the agent both read) plus an
//! `identities:` map the agent adds. A Promtail file (no identities) is trusted by path while
//! the file is at least as long as the saved offset. Writes are atomic: temp file, fsync,
//! rename, fsync of the directory.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Bytes of a file's start that its fingerprint covers (fewer while the file is shorter).
pub const FINGERPRINT_LEN: u64 = 256;

/// Device and inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileKey {
    /// `st_dev`.
    pub dev: u64,
    /// `st_ino`.
    pub ino: u64,
}

impl FileKey {
    /// The key of an open file or a path's metadata.
    pub fn of(m: &std::fs::Metadata) -> Self {
        FileKey {
            dev: m.dev(),
            ino: m.ino(),
        }
    }
}

/// Device, inode and a fingerprint of the first `fp_len` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Identity {
    /// Device and inode.
    pub key: FileKey,
    /// Bytes the fingerprint covers.
    pub fp_len: u32,
    /// xxh3 of those bytes.
    pub fp: u64,
}

impl Identity {
    /// Reads the identity of an open file (its first bytes, up to `FINGERPRINT_LEN`).
    pub fn read(file: &File) -> io::Result<Identity> {
        let m = file.metadata()?;
        let want = m.len().min(FINGERPRINT_LEN) as usize;
        let mut buf = vec![0u8; want];
        let n = read_at_most(file, 0, &mut buf)?;
        Ok(Identity {
            key: FileKey::of(&m),
            fp_len: n as u32,
            fp: xxhash_rust::xxh3::xxh3_64(&buf[..n]),
        })
    }

    /// Whether `file` is this file: same device and inode, and the same first `fp_len` bytes.
    pub fn matches(&self, file: &File) -> io::Result<bool> {
        let m = file.metadata()?;
        if FileKey::of(&m) != self.key || m.len() < u64::from(self.fp_len) {
            return Ok(false);
        }
        let mut buf = vec![0u8; self.fp_len as usize];
        let n = read_at_most(file, 0, &mut buf)?;
        Ok(n == buf.len() && xxhash_rust::xxh3::xxh3_64(&buf) == self.fp)
    }

    /// Whether `file` starts with the bytes this fingerprint covers, whatever its inode: a
    /// copy of this file (copytruncate's rotated file).
    pub fn same_start(&self, file: &File) -> io::Result<bool> {
        if self.fp_len == 0 || file.metadata()?.len() < u64::from(self.fp_len) {
            return Ok(false);
        }
        let mut buf = vec![0u8; self.fp_len as usize];
        let n = read_at_most(file, 0, &mut buf)?;
        Ok(n == buf.len() && xxhash_rust::xxh3::xxh3_64(&buf) == self.fp)
    }

    /// Whether `other` may be this same file: the same device and inode, and the same
    /// fingerprint where both cover as many bytes (an inode is reused once a file is deleted,
    /// e.g. after kubelet compressed a rotated file).
    pub fn same_file(&self, other: &Identity) -> bool {
        self.key == other.key && (self.fp_len != other.fp_len || self.fp == other.fp)
    }

    /// Whether `bytes` (a file's first bytes) start with what this fingerprint covers.
    pub fn starts(&self, bytes: &[u8]) -> bool {
        self.fp_len > 0
            && bytes.len() >= self.fp_len as usize
            && xxhash_rust::xxh3::xxh3_64(&bytes[..self.fp_len as usize]) == self.fp
    }

    fn encode(&self) -> String {
        format!("{}:{}:{}:{:016x}", self.key.dev, self.key.ino, self.fp_len, self.fp)
    }

    fn decode(s: &str) -> Option<Identity> {
        let mut p = s.split(':');
        let dev = p.next()?.parse().ok()?;
        let ino = p.next()?.parse().ok()?;
        let fp_len = p.next()?.parse().ok()?;
        let fp = u64::from_str_radix(p.next()?, 16).ok()?;
        Some(Identity {
            key: FileKey { dev, ino },
            fp_len,
            fp,
        })
    }

    /// The WAL annotation of a record that covers this file up to `offset`:
    /// `[u64 dev][u64 ino][u32 fp_len][u64 fp][u64 offset][path bytes]`.
    pub fn annotation(&self, offset: u64, path: &Path, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.key.dev.to_le_bytes());
        out.extend_from_slice(&self.key.ino.to_le_bytes());
        out.extend_from_slice(&self.fp_len.to_le_bytes());
        out.extend_from_slice(&self.fp.to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        out.extend_from_slice(path.as_os_str().as_encoded_bytes());
    }

    /// Reads an annotation back.
    pub fn from_annotation(b: &[u8]) -> Option<(Identity, u64, PathBuf)> {
        if b.len() < 36 {
            return None;
        }
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or_default());
        let id = Identity {
            key: FileKey {
                dev: u64_at(0),
                ino: u64_at(8),
            },
            fp_len: u32::from_le_bytes(b[16..20].try_into().unwrap_or_default()),
            fp: u64_at(20),
        };
        let path = PathBuf::from(String::from_utf8_lossy(&b[36..]).into_owned());
        Some((id, u64_at(28), path))
    }
}

fn read_at_most(file: &File, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], offset + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// A saved position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Saved {
    /// The file's identity (none when read from a Promtail positions file).
    pub id: Option<Identity>,
    /// Bytes of the file already read into the WAL.
    pub offset: u64,
}

/// The positions of every file, by the path it was last seen at.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Positions {
    /// Path → position.
    pub files: BTreeMap<PathBuf, Saved>,
}

/// Why the positions file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PositionsError {
    /// Reading failed.
    #[error("reading {0}: {1}")]
    Io(PathBuf, io::Error),
    /// Not YAML, or not Promtail's layout.
    #[error("{0}: {1} (set logs.positions.ignore_invalid_yaml to start afresh)")]
    Invalid(PathBuf, String),
}

impl Positions {
    /// Reads `path` (a missing file is no positions).
    pub fn load(path: &Path) -> Result<Positions, PositionsError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Positions::default()),
            Err(e) => return Err(PositionsError::Io(path.to_owned(), e)),
        };
        Self::parse(&text).map_err(|e| PositionsError::Invalid(path.to_owned(), e))
    }

    /// Parses Promtail's layout (plus the agent's `identities:`).
    pub fn parse(text: &str) -> Result<Positions, String> {
        use yaml_rust2::{Yaml, YamlLoader};
        let docs = YamlLoader::load_from_str(text).map_err(|e| e.to_string())?;
        let mut out = Positions::default();
        let Some(doc) = docs.first() else { return Ok(out) };
        if doc.is_null() {
            return Ok(out);
        }
        let Yaml::Hash(top) = doc else {
            return Err("expected a mapping with `positions:`".to_owned());
        };
        let identities = match top.get(&Yaml::String("identities".into())) {
            Some(Yaml::Hash(h)) => h.clone(),
            _ => Default::default(),
        };
        match top.get(&Yaml::String("positions".into())) {
            None | Some(Yaml::Null) => {}
            Some(Yaml::Hash(h)) => {
                for (k, v) in h {
                    let Some(path) = k.as_str() else { continue };
                    let offset = match v {
                        Yaml::String(s) => s.parse::<u64>().ok(),
                        Yaml::Integer(i) => u64::try_from(*i).ok(),
                        _ => None,
                    };
                    // Promtail keeps other targets (journal, syslog) here as non-paths: skip.
                    let Some(offset) = offset else { continue };
                    if !path.starts_with('/') {
                        continue;
                    }
                    let id = identities
                        .get(&Yaml::String(path.to_owned()))
                        .and_then(Yaml::as_str)
                        .and_then(Identity::decode);
                    out.files.insert(PathBuf::from(path), Saved { id, offset });
                }
            }
            Some(_) => return Err("`positions:` must be a mapping of path to offset".to_owned()),
        }
        Ok(out)
    }

    /// The text written to disk.
    pub fn render(&self) -> String {
        let mut s = String::from(
            "# sre-lab agent positions. Promtail reads `positions:`; `identities:` is the agent's.\npositions:\n",
        );
        let q = |p: &Path| serde_json::to_string(&p.to_string_lossy()).unwrap_or_default();
        for (p, saved) in &self.files {
            s.push_str(&format!("  {}: \"{}\"\n", q(p), saved.offset));
        }
        s.push_str("identities:\n");
        for (p, saved) in &self.files {
            if let Some(id) = saved.id {
                s.push_str(&format!("  {}: \"{}\"\n", q(p), id.encode()));
            }
        }
        s
    }

    /// Writes `path` atomically: temp file, fsync, rename, fsync of the directory.
    pub fn save(&self, path: &Path) -> io::Result<()> {
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let tmp = path.with_extension("yaml.tmp");
        {
            let mut f = File::create(&tmp)?;
            f.write_all(self.render().as_bytes())?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    }

    /// Records `saved` for the file now at `path`: other entries of the same file go, and an
    /// entry of another file at that path (rotated away) moves to a key of its own.
    pub fn claim(&mut self, path: &Path, saved: Saved) {
        if let Some(id) = saved.id {
            // Only entries certainly of this file go: a fingerprint over fewer bytes may be of
            // a deleted file whose inode this one reuses (kept for its copies; lookups take the
            // furthest matching entry).
            self.files.retain(|_, s| s.id != Some(id));
        }
        if let Some(other) = self.files.remove(path) {
            if let Some(oid) = other.id {
                // Kept: its lines may still be read from a copy (compressed, copytruncate).
                let key = PathBuf::from(format!(
                    "{}#{}:{}:{:016x}",
                    path.display(),
                    oid.key.dev,
                    oid.key.ino,
                    oid.fp
                ));
                self.files.insert(key, other);
            }
        }
        self.files.insert(path.to_owned(), saved);
    }

    /// Adds where the WAL left a file: the later of this and a saved position of the same
    /// file (same device, inode and fingerprint). Fingerprints over different lengths cannot be
    /// compared without the file, so such an entry is kept beside the other, and
    /// [`Positions::lookup`] takes the later of those that match the file found.
    pub fn merge_wal(&mut self, id: Identity, offset: u64, path: PathBuf) {
        for s in self.files.values_mut() {
            if s.id == Some(id) {
                s.offset = s.offset.max(offset);
                return;
            }
        }
        // Another file may be saved at this path (it was rotated): keep both; lookups go by
        // identity. The extra key is never a real path, so saving drops it once unused.
        let key = if self.files.contains_key(&path) {
            PathBuf::from(format!(
                "{}#{}:{}:{}",
                path.display(),
                id.key.dev,
                id.key.ino,
                id.fp_len
            ))
        } else {
            path
        };
        let e = self.files.entry(key).or_insert(Saved { id: Some(id), offset });
        e.offset = e.offset.max(offset);
    }

    /// The saved offset for `file` found at `path`: by identity first (a rotated file keeps its
    /// place under its new name), else by path for an entry without identity (Promtail's) as
    /// long as the file is at least that long.
    pub fn lookup(&self, path: &Path, file: &File) -> Option<u64> {
        let key = FileKey::of(&file.metadata().ok()?);
        let by_id = self
            .files
            .values()
            .filter(|s| {
                s.id.is_some_and(|id| id.key == key && id.matches(file).unwrap_or(false))
            })
            .map(|s| s.offset)
            .max();
        if by_id.is_some() {
            return by_id;
        }
        let saved = self.files.get(path)?;
        if saved.id.is_some() {
            return None;
        }
        let len = file.metadata().ok()?.len();
        (saved.offset <= len).then_some(saved.offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn promtail_positions_files_are_read() {
        let text =
            "positions:\n  /var/log/pods/a_b_c/x/0.log: \"1234\"\n  journal-systemd: \"s=abc\"\n  /tmp/y.log: 99\n";
        let p = Positions::parse(text).unwrap();
        assert_eq!(p.files.len(), 2);
        assert_eq!(p.files[Path::new("/var/log/pods/a_b_c/x/0.log")].offset, 1234);
        assert_eq!(p.files[Path::new("/tmp/y.log")].id, None);
        assert!(Positions::parse("positions: [1, 2]").is_err());
        assert!(Positions::parse(": : :\n  - ][").is_err());
        assert_eq!(Positions::parse("").unwrap(), Positions::default());
    }

    #[test]
    fn saved_positions_round_trip_and_find_renamed_files() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("0.log");
        std::fs::write(&log, "first line\nsecond line\n").unwrap();
        let file = File::open(&log).unwrap();
        let id = Identity::read(&file).unwrap();
        let mut p = Positions::default();
        p.files.insert(
            log.clone(),
            Saved {
                id: Some(id),
                offset: 11,
            },
        );
        let pos = dir.path().join("positions.yaml");
        p.save(&pos).unwrap();
        let back = Positions::load(&pos).unwrap();
        assert_eq!(back, p);
        // Renamed (kubelet rotation): found by identity under the old path's entry.
        let rotated = dir.path().join("0.log.20240101-000000");
        std::fs::rename(&log, &rotated).unwrap();
        assert_eq!(back.lookup(&rotated, &File::open(&rotated).unwrap()), Some(11));
        // A new file at the old path with other contents is not the saved one.
        std::fs::write(&log, "other contents\n").unwrap();
        assert_eq!(back.lookup(&log, &File::open(&log).unwrap()), None);
        // Promtail entries trust the path while the file is long enough.
        let promtail = Positions::parse(&format!("positions:\n  {}: \"5\"\n", log.display())).unwrap();
        assert_eq!(promtail.lookup(&log, &File::open(&log).unwrap()), Some(5));
        let promtail = Positions::parse(&format!("positions:\n  {}: \"500\"\n", log.display())).unwrap();
        assert_eq!(promtail.lookup(&log, &File::open(&log).unwrap()), None);
    }

    #[test]
    fn wal_positions_merge_by_identity_and_the_later_matching_one_wins() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("0.log");
        std::fs::write(&log, "short\n").unwrap();
        let short = Identity::read(&File::open(&log).unwrap()).unwrap();
        let mut long_text = String::from("short\n");
        long_text.push_str(&"x".repeat(2000));
        long_text.push('\n');
        std::fs::write(&log, &long_text).unwrap();
        let file = File::open(&log).unwrap();
        let long = Identity::read(&file).unwrap();
        assert_eq!(short.key, long.key);
        assert!(short.fp_len < long.fp_len);
        let mut p = Positions::default();
        p.merge_wal(short, 6, log.clone());
        p.merge_wal(long, 900, log.clone());
        // Kept apart (fingerprints over different lengths), and the later one that matches
        // the file wins; a repeated identity keeps its later offset.
        assert_eq!(p.files.len(), 2);
        p.merge_wal(long, 100, log.clone());
        assert_eq!(p.lookup(&log, &file), Some(900));
        // Another file in the same inode (the short fingerprint no longer matches): only the
        // entry whose fingerprint matches counts.
        std::fs::write(&log, "other contents\n").unwrap();
        let file = File::open(&log).unwrap();
        assert_eq!(p.lookup(&log, &file), None);
    }

    #[test]
    fn annotations_round_trip() {
        let id = Identity {
            key: FileKey { dev: 3, ino: 77 },
            fp_len: 256,
            fp: 0xdead_beef,
        };
        let mut b = Vec::new();
        id.annotation(4096, Path::new("/var/log/pods/n_p_u/c/0.log"), &mut b);
        let (back, off, path) = Identity::from_annotation(&b).unwrap();
        assert_eq!((back, off), (id, 4096));
        assert_eq!(path, Path::new("/var/log/pods/n_p_u/c/0.log"));
        assert!(Identity::from_annotation(&b[..10]).is_none());
    }
}
