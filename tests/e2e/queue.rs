//! The remote-write queue under pressure: shards grow with a backlog, the WAL stays within
//! `wal_max_size` (evictions counted), and a full disk is counted, not fatal.

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use sre_lab_tests::{poll, Agent, TinyServer};

/// A page of `n` series.
fn page(n: usize) -> Vec<u8> {
    let mut s = String::new();
    for i in 0..n {
        s.push_str(&format!("test_series{{idx=\"{i}\",group=\"g{}\"}} {i}\n", i % 10));
    }
    s.into_bytes()
}

fn config(target: &str, receiver: &str, extra_queue: &str, storage: &str) -> String {
    format!(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: q\n    static_configs:\n      - targets: ['{target}']\nremote_write:\n  - url: http://{receiver}/api/v1/write\n    queue_config:\n      batch_send_deadline: 100ms\n      max_samples_per_send: 500\n      min_backoff: 50ms\n      max_backoff: 500ms\n{extra_queue}{storage}"
    )
}

#[test]
fn shards_grow_with_a_backlog() -> Result<()> {
    let body = page(5000);
    let target = TinyServer::start(move |_| (200, vec![], body.clone()))?;
    // A receiver that needs 300 ms per request: one shard sends ~1700 samples/s of 5000/s.
    let receiver = TinyServer::start(|_| {
        std::thread::sleep(Duration::from_millis(300));
        (200, vec![], Vec::new())
    })?;
    let dir = tempfile::tempdir()?;
    let agent = Agent::start(
        dir.path(),
        &config(&target.addr, &receiver.addr, "      max_shards: 8\n", ""),
    )?;
    assert_eq!(agent.metric("sre_agent_remote_shards", "")?, 1.0);
    poll("more shards", Duration::from_secs(60), || {
        Ok((agent.metric("sre_agent_remote_shards", "")? >= 2.0).then_some(()))
    })
    .map_err(|e| e.context(agent.proc.log_text()))?;
    Ok(())
}

#[test]
fn wal_stays_within_its_bound_and_counts_evictions() -> Result<()> {
    let body = page(5000);
    let target = TinyServer::start(move |_| (200, vec![], body.clone()))?;
    let receiver = TinyServer::start(|_| (503, vec![], b"down".to_vec()))?;
    let dir = tempfile::tempdir()?;
    let agent = Agent::start(
        dir.path(),
        &config(&target.addr, &receiver.addr, "", "storage:\n  wal_max_size: 2MiB\n"),
    )?;
    poll("evictions", Duration::from_secs(60), || {
        Ok((agent.metric("sre_agent_remote_samples_dropped_total", "reason=\"wal_evicted\"")? > 0.0).then_some(()))
    })
    .map_err(|e| e.context(agent.proc.log_text()))?;
    let size = agent.metric("sre_agent_wal_size_bytes", "")?;
    assert!(size <= (2 << 20) as f64, "WAL size {size} over its 2MiB bound");
    // And on disk, measured a few times while it keeps growing and evicting.
    for _ in 0..5 {
        let on_disk: u64 = std::fs::read_dir(agent.storage.join("wal"))?
            .flatten()
            .flat_map(|d| std::fs::read_dir(d.path()).into_iter().flatten().flatten())
            .filter(|f| f.file_name().to_string_lossy().ends_with(".seg"))
            .filter_map(|f| f.metadata().ok())
            .map(|m| m.len())
            .sum();
        assert!(on_disk <= 2 << 20, "segments on disk {on_disk} over the 2MiB bound");
        std::thread::sleep(Duration::from_millis(700));
    }
    Ok(())
}

/// A tmpfs of `size` mounted on a fresh directory, unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &std::path::Path, size: &str) -> Result<Self> {
        let p = dir.join("small-disk");
        std::fs::create_dir_all(&p)?;
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&p)
            .status()?;
        if !st.success() {
            bail!("mounting a tmpfs needs root: {st}");
        }
        Ok(Self(p))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn full_disk_is_counted_and_recovers() -> Result<()> {
    let body = page(2000);
    let target = TinyServer::start(move |_| (200, vec![], body.clone()))?;
    let up = Arc::new(AtomicBool::new(false));
    let accepted = Arc::new(AtomicUsize::new(0));
    let (up2, acc2) = (up.clone(), accepted.clone());
    let receiver = TinyServer::start(move |_| {
        if up2.load(Ordering::SeqCst) {
            acc2.fetch_add(1, Ordering::SeqCst);
            (200, vec![], Vec::new())
        } else {
            (503, vec![], Vec::new())
        }
    })?;
    let dir = tempfile::tempdir()?;
    let disk = Tmpfs::mount(dir.path(), "3m")?;
    let storage = format!("storage:\n  path: {}\n  wal_max_size: 100MiB\n", disk.0.display());
    let cfg_path = dir.path().join("agent.yml");
    std::fs::write(&cfg_path, config(&target.addr, &receiver.addr, "", &storage))?;
    let agent = Agent::start_with(dir.path(), cfg_path, disk.0.clone(), sre_lab_tests::free_port())?;
    poll("WAL write errors on the full disk", Duration::from_secs(60), || {
        Ok((agent.metric("sre_agent_remote_samples_dropped_total", "reason=\"wal_write_error\"")? > 0.0).then_some(()))
    })
    .map_err(|e| e.context(agent.proc.log_text()))?;
    // Still alive and serving.
    assert_eq!(sre_lab_tests::http_get(&format!("{}/healthz", agent.url))?.trim(), "ok");
    // The receiver comes back: the backlog drains, commits free the disk, appends work again.
    up.store(true, Ordering::SeqCst);
    let appended_before = agent.metric("sre_agent_wal_samples_appended_total", "")?;
    poll(
        "appends resume after the backlog drained",
        Duration::from_secs(60),
        || Ok((agent.metric("sre_agent_wal_samples_appended_total", "")? > appended_before + 4000.0).then_some(())),
    )
    .map_err(|e| {
        let m = sre_lab_tests::http_get(&format!("{}/metrics", agent.url)).unwrap_or_default();
        let m: Vec<&str> = m
            .lines()
            .filter(|l| l.starts_with("sre_agent_wal") || l.starts_with("sre_agent_remote_samples"))
            .collect();
        e.context(format!(
            "{}\n{}",
            m.join("\n"),
            std::process::Command::new("ls")
                .arg("-la")
                .arg(disk.0.join("wal"))
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default()
        ))
    })?;
    assert!(accepted.load(Ordering::SeqCst) > 0);
    drop(agent);
    Ok(())
}

/// An acknowledged batch is never sent again, across a `kill -9` and a restart, with several
/// shards and batches smaller than a scrape (so records are partly acknowledged); and nothing
/// scraped is missing.
#[test]
fn acknowledged_batches_are_never_resent_after_kill_9() -> Result<()> {
    use agent::remote_write::proto::{self, WriteRequest};
    use prost::Message;
    use std::collections::BTreeMap;

    let body = page(50);
    let target = TinyServer::start(move |_| (200, vec![], body.clone()))?;
    let failing = Arc::new(AtomicBool::new(false));
    let accepted: Arc<std::sync::Mutex<Vec<(String, i64)>>> = Arc::default();
    let (f2, a2) = (failing.clone(), accepted.clone());
    let receiver = TinyServer::start(move |req| {
        if f2.load(Ordering::SeqCst) {
            return (503, vec![], Vec::new());
        }
        let mut raw = Vec::new();
        proto::decompress(&req.body, 64 << 20, &mut raw).unwrap();
        let wr = WriteRequest::decode(raw.as_slice()).unwrap();
        let mut acc = a2.lock().unwrap();
        for ts in wr.timeseries {
            let key: Vec<String> = ts.labels.iter().map(|l| format!("{}={}", l.name, l.value)).collect();
            for s in ts.samples {
                acc.push((key.join(","), s.timestamp));
            }
        }
        (200, vec![], Vec::new())
    })?;
    let dir = tempfile::tempdir()?;
    let sink = dir.path().join("sink.txt");
    let cfg = format!(
        "{}file_sink:\n  path: {}\n",
        config(
            &target.addr,
            &receiver.addr,
            "      min_shards: 3\n      max_shards: 3\n",
            ""
        ),
        sink.display()
    )
    .replace("max_samples_per_send: 500", "max_samples_per_send: 20");
    let mut agent = Agent::start(dir.path(), &cfg)?;
    poll("some accepted scrapes", Duration::from_secs(30), || {
        Ok((accepted.lock().unwrap().len() > 150).then_some(()))
    })?;
    failing.store(true, Ordering::SeqCst);
    poll("a backlog", Duration::from_secs(30), || {
        Ok((agent.metric("sre_agent_remote_samples_retried_total", "")? > 50.0).then_some(()))
    })?;
    agent.proc.signal("KILL")?;
    let (config_path, storage, port) = (agent.config.clone(), agent.storage.clone(), agent.port);
    drop(agent);
    failing.store(false, Ordering::SeqCst);
    let restarted_at = sre_lab_tests::now_s() as i64 * 1000;
    let agent = Agent::start_with(dir.path(), config_path, storage, port)?;
    poll("samples scraped after the restart", Duration::from_secs(30), || {
        Ok(accepted
            .lock()
            .unwrap()
            .iter()
            .any(|(_, t)| *t > restarted_at + 2000)
            .then_some(()))
    })
    .map_err(|e| e.context(agent.proc.log_text()))?;
    drop(agent);

    let acc = accepted.lock().unwrap().clone();
    let mut counts: BTreeMap<&(String, i64), usize> = BTreeMap::new();
    for k in &acc {
        *counts.entry(k).or_default() += 1;
    }
    let dups: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).take(5).collect();
    assert!(dups.is_empty(), "acknowledged samples sent twice: {dups:?}");
    // Per-series order held across 3 shards, the outage and the restart.
    let mut last: BTreeMap<&str, i64> = BTreeMap::new();
    for (series, t) in &acc {
        if let Some(prev) = last.insert(series.as_str(), *t) {
            assert!(*t > prev, "{series}: {t} arrived after {prev}");
        }
    }
    // Nothing scraped before the kill is missing.
    let scraped = std::fs::read_to_string(&sink)?;
    let stamps: std::collections::BTreeSet<i64> = acc.iter().map(|(_, t)| *t).collect();
    let missing = scraped
        .lines()
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, t)| t.parse::<i64>().ok()))
        .filter(|t| *t < restarted_at && !stamps.contains(t))
        .count();
    assert_eq!(missing, 0, "samples scraped before the kill never arrived");
    Ok(())
}
