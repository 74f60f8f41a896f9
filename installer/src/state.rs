//! Per-cluster state directory: generated configs (talosconfig, kubeconfig, Talos secrets,
//! patches, values), the Grafana password and which steps `up` finished, so a re-run resumes.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where one cluster's files live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Paths {
    /// `<state root>/<cluster>`.
    pub dir: PathBuf,
}

impl Paths {
    /// The directory for `cluster` under `root`.
    pub fn new(root: &Path, cluster: &str) -> Self {
        Self {
            dir: root.join(cluster),
        }
    }

    /// The state root: `$SRE_LAB_HOME`, else `$XDG_STATE_HOME/sre-lab`, else
    /// `~/.local/state/sre-lab`.
    pub fn default_root() -> PathBuf {
        if let Some(p) = std::env::var_os("SRE_LAB_HOME") {
            return PathBuf::from(p);
        }
        if let Some(p) = std::env::var_os("XDG_STATE_HOME") {
            return PathBuf::from(p).join("sre-lab");
        }
        let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
        home.join(".local/state/sre-lab")
    }

    /// talosctl's client config for this cluster.
    pub fn talosconfig(&self) -> PathBuf {
        self.dir.join("talosconfig")
    }
    /// The cluster's admin kubeconfig.
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }
    /// The Talos secrets bundle (provider `nodes`): regenerating configs from it keeps the
    /// cluster's identity, so re-runs are idempotent.
    pub fn secrets(&self) -> PathBuf {
        self.dir.join("secrets.yaml")
    }
    /// Generated machine configs (provider `nodes`).
    pub fn machine_configs(&self) -> PathBuf {
        self.dir.join("talos")
    }
    /// talosctl's provisioner state (docker, qemu).
    pub fn talos_state(&self) -> PathBuf {
        self.dir.join("clusters")
    }
    /// A rendered file (values, patches) by name.
    pub fn rendered(&self, name: &str) -> PathBuf {
        self.dir.join("rendered").join(name)
    }
    /// The Grafana admin password, generated once.
    pub fn grafana_password(&self) -> PathBuf {
        self.dir.join("grafana-admin-password")
    }
    /// Which steps finished.
    pub fn state_file(&self) -> PathBuf {
        self.dir.join("state.json")
    }
}

/// What `up` has done, by step id.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// Finished steps: id → fingerprint of what the step ran.
    pub done: BTreeMap<String, Done>,
    /// Contexts `installer kubeconfig --merge` added to the user's kubeconfig.
    #[serde(default)]
    pub merged_contexts: Vec<MergedContext>,
}

/// A finished step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Done {
    /// Fingerprint of the step's actions; a changed step runs again.
    pub fingerprint: String,
    /// Seconds it took.
    pub seconds: f64,
}

/// A context merged into a kubeconfig outside the state directory.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MergedContext {
    /// The kubeconfig file.
    pub file: PathBuf,
    /// Context, cluster and user name.
    pub context: String,
}

impl State {
    /// Reads the state file; a missing one is an empty state.
    pub fn load(paths: &Paths) -> anyhow::Result<Self> {
        match std::fs::read(paths.state_file()) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", paths.state_file().display()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(anyhow::anyhow!("{}: {e}", paths.state_file().display())),
        }
    }

    /// Writes the state file atomically.
    pub fn save(&self, paths: &Paths) -> anyhow::Result<()> {
        let text = serde_json::to_vec_pretty(self)?;
        write_private(&paths.state_file(), &text)
    }
}

/// Writes `contents` to `path` (parents created) with mode 0600, atomically.
pub fn write_private(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    write_mode(path, contents, 0o600)
}

/// Writes `contents` to `path` with `mode`, through a temporary file and a rename.
pub fn write_mode(path: &Path, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.exists() {
        // Directories made here hold secrets: private. Existing ones keep their mode.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(|e| anyhow::anyhow!("{}: {e}", parent.display()))?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| anyhow::anyhow!("{}: {e}", tmp.display()))?;
    f.write_all(contents)?;
    f.sync_all()?;
    set_mode(&tmp, mode)?;
    std::fs::rename(&tmp, path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(())
}

/// Sets a file's permission bits.
pub fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}
