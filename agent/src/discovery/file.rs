//! `file_sd_configs`: JSON or YAML files listing target groups, re-read when they change
//! (inotify via `notify`) and every `refresh_interval`.
//!
//! A file that fails to parse keeps its previous groups (as Prometheus) and the error is logged
//! and counted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::watch;

use super::TargetGroup;
use crate::labels::Labels;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileGroup {
    #[serde(default)]
    targets: Vec<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

/// Parses one file's content; `.json` as JSON, anything else as YAML.
pub fn parse_file(path: &Path, text: &str) -> Result<Vec<TargetGroup>, String> {
    let groups: Vec<FileGroup> = if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(text).map_err(|e| format!("{}: {e}", path.display()))?
    } else {
        let loaded =
            config::from_str::<Vec<FileGroupYaml>>(text, &path.display().to_string(), &|_| None, &|_, _| false)
                .map_err(|errs| errs.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))?;
        loaded
            .value
            .into_iter()
            .map(|g| FileGroup {
                targets: g.targets,
                labels: g.labels,
            })
            .collect()
    };
    Ok(groups
        .into_iter()
        .enumerate()
        .map(|(i, g)| {
            let mut labels = Labels::from_pairs(g.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())));
            labels.insert("__meta_filepath".to_owned(), path.display().to_string());
            TargetGroup {
                source: format!("{}:{i}", path.display()),
                targets: g
                    .targets
                    .iter()
                    .map(|t| Labels::from_pairs([(crate::labels::ADDRESS, t.as_str())]))
                    .collect(),
                labels,
            }
        })
        .collect())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileGroupYaml {
    #[serde(default)]
    targets: Vec<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

/// Expands the patterns (a `*` wildcard in the file name part only, as Prometheus).
pub fn expand(patterns: &[PathBuf]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for p in patterns {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !name.contains('*') && !name.contains('?') {
            out.push(p.clone());
            continue;
        }
        let dir = p.parent().unwrap_or(Path::new("."));
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if wildcard(&name, &n) {
                    out.push(e.path());
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

fn wildcard(pat: &str, s: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pat.chars().collect(), s.chars().collect());
    let (mut pi, mut ti, mut star, mut mark) = (0usize, 0usize, None, 0usize);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(sp) = star {
            pi = sp + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

/// Watches the files and publishes their groups until the sender is dropped.
pub async fn run(
    patterns: Vec<PathBuf>,
    refresh: Duration,
    out: watch::Sender<Vec<TargetGroup>>,
    on_error: impl Fn() + Send + 'static,
) {
    use notify::Watcher;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    let mut watcher = notify::recommended_watcher(move |_res: notify::Result<notify::Event>| {
        let _ = tx.try_send(());
    })
    .ok();
    let mut dirs: Vec<PathBuf> = patterns
        .iter()
        .filter_map(|p| p.parent().map(Path::to_path_buf))
        .collect();
    dirs.sort();
    dirs.dedup();
    if let Some(w) = watcher.as_mut() {
        for d in &dirs {
            if let Err(e) = w.watch(d, notify::RecursiveMode::NonRecursive) {
                tracing::warn!(dir = %d.display(), error = %e, "Cannot watch file_sd directory; relying on refresh_interval.");
            }
        }
    }
    let mut last: BTreeMap<PathBuf, Vec<TargetGroup>> = BTreeMap::new();
    let mut tick = tokio::time::interval(refresh.max(Duration::from_secs(1)));
    loop {
        let files = expand(&patterns);
        let mut current = BTreeMap::new();
        for f in files {
            match std::fs::read_to_string(&f)
                .map_err(|e| e.to_string())
                .and_then(|t| parse_file(&f, &t))
            {
                Ok(g) => {
                    current.insert(f, g);
                }
                Err(e) => {
                    tracing::warn!(file = %f.display(), error = %e, "Reading file_sd file failed; keeping its previous targets.");
                    on_error();
                    if let Some(prev) = last.get(&f) {
                        current.insert(f, prev.clone());
                    }
                }
            }
        }
        if current != last || out.borrow().is_empty() {
            let all: Vec<TargetGroup> = current.values().flatten().cloned().collect();
            last = current;
            if out.send(all).is_err() {
                return;
            }
        }
        tokio::select! {
            _ = tick.tick() => {}
            r = rx.recv() => { if r.is_none() { return; } tokio::time::sleep(Duration::from_millis(50)).await; }
            _ = out.closed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_json_and_yaml() {
        let g = parse_file(
            Path::new("/x/t.json"),
            r#"[{"targets":["a:1","b:2"],"labels":{"env":"p"}}]"#,
        )
        .unwrap();
        assert_eq!(g[0].targets.len(), 2);
        assert_eq!(g[0].labels.get("env"), Some("p"));
        assert_eq!(g[0].labels.get("__meta_filepath"), Some("/x/t.json"));
        let y = parse_file(Path::new("/x/t.yml"), "- targets: ['c:3']\n").unwrap();
        assert_eq!(y[0].targets[0].get("__address__"), Some("c:3"));
        assert!(parse_file(Path::new("/x/t.json"), "{").is_err());
    }

    #[test]
    fn wildcards() {
        assert!(wildcard("*.json", "a.json"));
        assert!(!wildcard("*.json", "a.yml"));
        assert!(wildcard("t?.y*", "t1.yaml"));
    }
}
