//! Reloads keep what runs: a series that vanishes from a kept target at a reload, and the
//! series of a target the reload removes, get their staleness markers in a real Prometheus (as
//! Prometheus 2.42 itself does) whether it came from static configs or from file discovery,
//! and scraping goes on without a gap.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use sre_lab_tests::{http_post, poll, Agent, Prometheus, TinyServer};

#[test]
fn series_vanishing_at_a_reload_are_marked_stale_in_prometheus() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let page = Arc::new(Mutex::new(
        "reload_kept 1\nreload_dropped 2\nreload_gone 3\n".to_owned(),
    ));
    let p2 = page.clone();
    let target = TinyServer::start(move |_| (200, vec![], p2.lock().unwrap().clone().into_bytes()))?;
    // A second target of the same job that the reload removes.
    let removed = TinyServer::start(|_| (200, vec![], b"reload_target_removed 1\n".to_vec()))?;
    let prom = Prometheus::start(dir.path(), "receiver", "global:\n  scrape_interval: 1m\n", true)?;
    let config = |targets: &str, extra: &str| {
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: reload\n    static_configs:\n      - targets: [{targets}]\n{extra}remote_write:\n  - url: {}/api/v1/write\n    queue_config:\n      batch_send_deadline: 100ms\n",
            prom.url
        )
    };
    let both = format!("'{}', '{}'", target.addr, removed.addr);
    let agent = Agent::start(dir.path(), &config(&both, ""))?;
    let present = |name: &str| -> Result<bool> { Ok(!prom.query(name)?.is_empty()) };
    for name in ["reload_kept", "reload_dropped", "reload_gone", "reload_target_removed"] {
        poll(&format!("{name} in Prometheus"), Duration::from_secs(30), || {
            Ok(present(name)?.then_some(()))
        })
        .map_err(|e| e.context(agent.proc.log_text()))?;
    }
    // Scraped for a while before the reload, so the window checked below is all covered.
    std::thread::sleep(Duration::from_secs(5));
    // At the reload, one series is dropped by new metric relabeling (only the new loop applies
    // it, so only the handed-over series can end it), another leaves the page, and the job's
    // second target is removed (its series and `up` end at once, as in Prometheus).
    page.lock()
        .unwrap()
        .replace_range(.., "reload_kept 1\nreload_dropped 2\n");
    std::fs::write(
        &agent.config,
        config(
            &format!("'{}'", target.addr),
            "    metric_relabel_configs:\n      - source_labels: [__name__]\n        regex: reload_dropped\n        action: drop\n"),
    )?;
    let reloaded_at = sre_lab_tests::now_s();
    let (status, body) = http_post(&format!("{}/-/reload", agent.url))?;
    assert_eq!(status, 200, "{body}");
    // Without staleness markers, Prometheus would answer them for its 5-minute lookback.
    let removed_up = format!("up{{instance=\"{}\"}}", removed.addr);
    for name in [
        "reload_dropped",
        "reload_gone",
        "reload_target_removed",
        removed_up.as_str(),
    ] {
        poll(&format!("{name} stale"), Duration::from_secs(20), || {
            Ok((!present(name)?).then_some(()))
        })
        .map_err(|e| e.context(agent.proc.log_text()))?;
    }
    // The kept series goes on without a gap: a sample every second in the 8 s around the
    // reload (one scrape in progress at the reload may be abandoned; a gap would lose several).
    let at = reloaded_at + 4.0;
    poll("4 s past the reload", Duration::from_secs(20), || {
        Ok((sre_lab_tests::now_s() > at + 2.0).then_some(()))
    })?;
    let url = format!(
        "{}/api/v1/query?query={}&time={at}",
        prom.url,
        sre_lab_tests::urlencode("count_over_time(reload_kept[8s])")
    );
    let v: serde_json::Value = serde_json::from_str(&sre_lab_tests::http_get(&url)?)?;
    let n: f64 = v["data"]["result"][0]["value"][1]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.0);
    assert!(
        n >= 6.0,
        "reload_kept has {n} samples in the 8 s around the reload: {v}"
    );
    assert!(present("reload_kept")?);
    Ok(())
}

#[test]
fn targets_a_reload_removes_from_file_sd_are_marked_stale_in_prometheus() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let kept = TinyServer::start(|_| (200, vec![], b"reload_fsd_kept 1\n".to_vec()))?;
    let removed = TinyServer::start(|_| (200, vec![], b"reload_fsd_removed 1\n".to_vec()))?;
    let prom = Prometheus::start(dir.path(), "receiver", "global:\n  scrape_interval: 1m\n", true)?;
    let both = dir.path().join("both.json");
    let one = dir.path().join("one.json");
    std::fs::write(
        &both,
        format!("[{{\"targets\": [\"{}\", \"{}\"]}}]", kept.addr, removed.addr),
    )?;
    std::fs::write(&one, format!("[{{\"targets\": [\"{}\"]}}]", kept.addr))?;
    let config = |file: &std::path::Path| {
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: fsd\n    file_sd_configs:\n      - files: ['{}']\nremote_write:\n  - url: {}/api/v1/write\n    queue_config:\n      batch_send_deadline: 100ms\n",
            file.display(),
            prom.url
        )
    };
    let agent = Agent::start(dir.path(), &config(&both))?;
    let present = |q: &str| -> Result<bool> { Ok(!prom.query(q)?.is_empty()) };
    for q in ["reload_fsd_kept", "reload_fsd_removed"] {
        poll(&format!("{q} in Prometheus"), Duration::from_secs(30), || {
            Ok(present(q)?.then_some(()))
        })
        .map_err(|e| e.context(agent.proc.log_text()))?;
    }
    // The reload points the job at a file without the second target: no running loop sees it
    // go, so only the reload can end its series.
    std::fs::write(&agent.config, config(&one))?;
    let (status, body) = http_post(&format!("{}/-/reload", agent.url))?;
    assert_eq!(status, 200, "{body}");
    let removed_up = format!("up{{job=\"fsd\",instance=\"{}\"}}", removed.addr);
    for q in ["reload_fsd_removed", removed_up.as_str()] {
        poll(&format!("{q} stale"), Duration::from_secs(20), || {
            Ok((!present(q)?).then_some(()))
        })
        .map_err(|e| e.context(agent.proc.log_text()))?;
    }
    assert!(present("reload_fsd_kept")?, "the kept target's series must go on");
    Ok(())
}

#[test]
fn a_reload_changing_a_queue_does_not_pause_scraping() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // Every scrape of the target is timed; pushes take 4 s to be answered, so a sender
    // stopping as at shutdown has one in flight for seconds.
    let scraped: Arc<Mutex<Vec<std::time::Instant>>> = Arc::default();
    let s2 = scraped.clone();
    let target = TinyServer::start(move |_| {
        s2.lock().unwrap().push(std::time::Instant::now());
        (200, vec![], b"queue_reload 1\n".to_vec())
    })?;
    let receiver = TinyServer::start(|_| {
        std::thread::sleep(Duration::from_secs(4));
        (204, vec![], Vec::new())
    })?;
    let config = |header: &str| {
        format!(
            "global:\n  scrape_interval: 500ms\n  scrape_timeout: 500ms\nscrape_configs:\n  - job_name: q\n    static_configs:\n      - targets: ['{}']\nremote_write:\n  - url: http://{}/api/v1/write\n    headers:\n      X-Test: {header}\n    queue_config:\n      batch_send_deadline: 100ms\nstorage:\n  shutdown_timeout: 10s\n",
            target.addr, receiver.addr
        )
    };
    let agent = Agent::start(dir.path(), &config("a"))?;
    poll("a push in flight", Duration::from_secs(20), || {
        Ok((agent.metric("sre_agent_wal_samples_appended_total", "")? > 0.0).then_some(()))
    })?;
    std::thread::sleep(Duration::from_secs(2));
    // The queue's settings change (a header): its sender restarts behind the same WAL.
    std::fs::write(&agent.config, config("b"))?;
    let before = std::time::Instant::now();
    let (status, body) = http_post(&format!("{}/-/reload", agent.url))?;
    assert_eq!(status, 200, "{body}");
    let reload_took = before.elapsed();
    std::thread::sleep(Duration::from_secs(4));
    let times = scraped.lock().unwrap().clone();
    let around: Vec<_> = times
        .iter()
        .filter(|t| **t >= before - Duration::from_secs(2))
        .collect();
    let worst = around.windows(2).map(|w| *w[1] - *w[0]).max().unwrap_or_default();
    assert!(
        reload_took < Duration::from_secs(2) && worst < Duration::from_millis(2500),
        "scraping paused at the reload: the reload took {reload_took:?}, longest gap between scrapes {worst:?}\n{}",
        agent.proc.log_text()
    );
    Ok(())
}

#[test]
fn a_reload_keeps_the_running_loops_of_unchanged_jobs() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let page = || TinyServer::start(|_| (200, vec![], b"kept_a 1\nkept_b 2\nkept_c 3\n".to_vec()));
    let (same, changed) = (page()?, page()?);
    let sink = dir.path().join("sink.txt");
    let config = |timeout: &str| {
        format!(
            "global:\n  scrape_interval: 500ms\nscrape_configs:\n  - job_name: same\n    static_configs:\n      - targets: ['{}']\n  - job_name: changed\n    scrape_timeout: {timeout}\n    static_configs:\n      - targets: ['{}']\nfile_sink:\n  path: {}\n",
            same.addr,
            changed.addr,
            sink.display()
        )
    };
    let agent = Agent::start(dir.path(), &config("400ms"))?;
    // `scrape_series_added` of each job's scrapes after `from_ms`.
    let added_after = |job: &str, from_ms: i64| -> Result<Vec<f64>> {
        let text = std::fs::read_to_string(&sink)?;
        Ok(text
            .lines()
            .filter(|l| l.starts_with("scrape_series_added{") && l.contains(&format!("job=\"{job}\"")))
            .filter_map(|l| {
                let mut parts = l.rsplitn(3, ' ');
                let ts: i64 = parts.next()?.parse().ok()?;
                let v: f64 = parts.next()?.parse().ok()?;
                (ts > from_ms).then_some(v)
            })
            .collect())
    };
    poll("a few scrapes of both jobs", Duration::from_secs(20), || {
        Ok((added_after("same", 0)?.len() >= 3 && added_after("changed", 0)?.len() >= 3).then_some(()))
    })?;
    // Only the second job's settings change.
    std::fs::write(&agent.config, config("450ms"))?;
    let reloaded_ms = (sre_lab_tests::now_s() * 1000.0) as i64;
    let (status, body) = http_post(&format!("{}/-/reload", agent.url))?;
    assert_eq!(status, 200, "{body}");
    let (same_after, changed_after) = poll("scrapes after the reload", Duration::from_secs(20), || {
        let (s, c) = (added_after("same", reloaded_ms)?, added_after("changed", reloaded_ms)?);
        Ok((s.len() >= 3 && c.len() >= 3).then_some((s, c)))
    })?;
    // The unchanged job's loop ran on with its series cache: nothing is new to it. The changed
    // job's loop was replaced: its first scrape found every series new to its fresh cache.
    assert!(same_after.iter().all(|v| *v == 0.0), "same: {same_after:?}");
    assert_eq!(changed_after[0], 3.0, "changed: {changed_after:?}");
    Ok(())
}

#[test]
fn a_provider_that_cannot_list_does_not_hold_up_removals() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let a = TinyServer::start(|_| (200, vec![], b"held_a 1\n".to_vec()))?;
    let b = TinyServer::start(|_| (200, vec![], b"held_b 1\n".to_vec()))?;
    let file = dir.path().join("targets.json");
    std::fs::write(&file, format!("[{{\"targets\": [\"{}\", \"{}\"]}}]", a.addr, b.addr))?;
    let sink = dir.path().join("sink.txt");
    // The same job also has pod discovery against an API server that is not there: it never
    // publishes a list.
    let agent = Agent::start(
        dir.path(),
        &format!(
            "global:\n  scrape_interval: 500ms\nscrape_configs:\n  - job_name: held\n    file_sd_configs:\n      - files: ['{}']\n        refresh_interval: 1s\n    kubernetes_sd_configs:\n      - role: pod\n        api_server: http://127.0.0.1:1\nfile_sink:\n  path: {}\n",
            file.display(),
            sink.display()
        ),
    )?;
    poll("both targets scraped", Duration::from_secs(20), || {
        let text = std::fs::read_to_string(&sink).unwrap_or_default();
        Ok((text.contains("held_a") && text.contains("held_b")).then_some(()))
    })?;
    std::fs::write(&file, format!("[{{\"targets\": [\"{}\"]}}]", a.addr))?;
    // Well within the 30 s a job waits for slow providers at most.
    poll("the removed target's staleness marker", Duration::from_secs(10), || {
        let text = std::fs::read_to_string(&sink)?;
        Ok(text
            .lines()
            .any(|l| l.starts_with("held_b{") && l.contains(" NaN "))
            .then_some(()))
    })
    .map_err(|e| e.context(agent.proc.log_text()))?;
    Ok(())
}
