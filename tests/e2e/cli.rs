//! The agent binary's command line, config checking, reload, storage lock and SIGTERM.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Result;
use sre_lab_tests::{free_port, http_get, http_post, poll, workspace_bin, Agent, TinyServer};

#[test]
fn usage_version_and_check_config() -> Result<()> {
    let bin = workspace_bin("agent");
    let out = Command::new(&bin).output()?;
    assert_eq!(out.status.code(), Some(2), "no arguments is a usage error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("Usage"));

    let out = Command::new(&bin).arg("--version").output()?;
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));

    let dir = tempfile::tempdir()?;
    let good = dir.path().join("good.yml");
    std::fs::write(
        &good,
        "scrape_configs:\n  - job_name: a\n    static_configs:\n      - targets: ['127.0.0.1:1']\n",
    )?;
    let out = Command::new(&bin).arg("check-config").arg(&good).output()?;
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
    assert!(out.status.success());

    let bad = dir.path().join("bad.yml");
    std::fs::write(
        &bad,
        "global:\n  scrape_interval: 15\nscrape_configs:\n  - job_name: a\n    bogus: 1\n  - job_name: b\n    scrape_intervall: 1s\n",
    )?;
    let out = Command::new(&bin).arg("check-config").arg(&bad).output()?;
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    let file = bad.display().to_string();
    assert!(lines.len() >= 3, "every error reported: {text}");
    assert!(
        lines.iter().any(|l| l.starts_with(&format!("{file}:2:"))),
        "bad duration at line 2: {text}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(&format!("{file}:5:")) && l.contains("bogus")),
        "unknown key at line 5: {text}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(&format!("{file}:7:")) && l.contains("scrape_intervall")),
        "unknown key at line 7: {text}"
    );

    // What only the agent's pipeline compiler knows, still at the stage's line and column.
    let logs = dir.path().join("logs.yml");
    std::fs::write(
        &logs,
        "logs:\n  clients: [{url: http://127.0.0.1:1/loki/api/v1/push}]\n  scrape_configs:\n    - job_name: a\n      static_configs: [{labels: {__path__: /tmp/x.log}}]\n      pipeline_stages:\n        - template:\n            source: x\n            template: '{{ NoSuchFunc .Value }}'\n        - match:\n            selector: '{a=\"b\"}'\n            stages:\n              - timestamp: {source: t, format: YYYY-MM-DD}\n",
    )?;
    let out = Command::new(&bin).arg("check-config").arg(&logs).output()?;
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    let file = logs.display().to_string();
    assert!(
        text.lines()
            .any(|l| l.starts_with(&format!("{file}:8:")) && l.contains("pipeline_stages[0].template")),
        "template error at the stage's line: {text}"
    );
    Ok(())
}

fn job_names(agent: &Agent) -> Result<Vec<String>> {
    let v: serde_json::Value = serde_json::from_str(&http_get(&format!("{}/api/v1/targets", agent.url))?)?;
    let mut jobs: Vec<String> = v
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|t| t["job"].as_str().unwrap_or_default().to_owned())
        .collect();
    jobs.sort();
    jobs.dedup();
    Ok(jobs)
}

#[test]
fn reload_by_http_and_sighup_refuses_bad_config() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let sink = dir.path().join("sink.txt");
    let cfg = |jobs: &[&str]| -> String {
        let mut s = format!(
            "file_sink:\n  path: {}\nglobal:\n  scrape_interval: 1s\nscrape_configs:\n",
            sink.display()
        );
        for j in jobs {
            s.push_str(&format!(
                "  - job_name: {j}\n    static_configs:\n      - targets: ['127.0.0.1:1']\n"
            ));
        }
        s
    };
    let mut agent = Agent::start(dir.path(), &cfg(&["one"]))?;
    poll("job one", Duration::from_secs(10), || {
        Ok((job_names(&agent)? == vec!["one"]).then_some(()))
    })?;

    std::fs::write(&agent.config, cfg(&["one", "two"]))?;
    let (status, body) = http_post(&format!("{}/-/reload", agent.url))?;
    assert_eq!(status, 200, "{body}");
    poll("job two", Duration::from_secs(10), || {
        Ok((job_names(&agent)? == vec!["one", "two"]).then_some(()))
    })?;

    poll("a scrape of job two", Duration::from_secs(10), || {
        Ok(std::fs::read_to_string(&sink)
            .unwrap_or_default()
            .contains("job=\"two\"")
            .then_some(()))
    })?;

    // A broken config is refused with its error; the running one stays.
    std::fs::write(&agent.config, "scrape_configs:\n  - job_name: x\n    nope: 1\n")?;
    let (status, body) = http_post(&format!("{}/-/reload", agent.url))?;
    assert_eq!(status, 400);
    assert!(body.contains("nope") && body.contains(":3:"), "{body}");
    poll("jobs unchanged", Duration::from_secs(10), || {
        Ok((job_names(&agent)? == vec!["one", "two"]).then_some(()))
    })?;
    assert_eq!(agent.metric("sre_agent_config_last_reload_successful", "")?, 0.0);
    // Valid YAML whose files are missing is refused too, before anything is stopped.
    std::fs::write(
        &agent.config,
        "scrape_configs:\n  - job_name: x\n    tls_config:\n      ca_file: /nonexistent/ca.pem\n    static_configs:\n      - targets: ['127.0.0.1:1']\n",
    )?;
    let (status, body) = http_post(&format!("{}/-/reload", agent.url))?;
    assert_eq!(status, 400);
    assert!(body.contains("/nonexistent/ca.pem"), "{body}");
    poll("jobs unchanged", Duration::from_secs(10), || {
        Ok((job_names(&agent)? == vec!["one", "two"]).then_some(()))
    })?;

    std::fs::write(&agent.config, cfg(&["three"]))?;
    agent.proc.signal("HUP")?;
    poll("job three after SIGHUP", Duration::from_secs(10), || {
        Ok((job_names(&agent)? == vec!["three"]).then_some(()))
    })?;
    assert_eq!(agent.metric("sre_agent_config_last_reload_successful", "")?, 1.0);
    // The removed jobs' series end with staleness markers.
    poll("staleness markers of removed job two", Duration::from_secs(10), || {
        let text = std::fs::read_to_string(&sink)?;
        Ok(text
            .lines()
            .any(|l| l.starts_with("up{instance=\"127.0.0.1:1\",job=\"two\"} NaN"))
            .then_some(()))
    })?;
    let page = http_get(&format!("{}/status", agent.url))?;
    assert!(
        page.contains("three") && page.contains("127.0.0.1:1"),
        "status page lists the target"
    );
    assert_eq!(http_get(&format!("{}/healthz", agent.url))?.trim(), "ok");
    Ok(())
}

#[test]
fn second_agent_on_the_same_storage_exits_with_a_clear_error() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let agent = Agent::start(dir.path(), "scrape_configs: []\n")?;
    let out = Command::new(workspace_bin("agent"))
        .arg("--config")
        .arg(&agent.config)
        .arg("--storage-path")
        .arg(&agent.storage)
        .arg("--listen-address")
        .arg(format!("127.0.0.1:{}", free_port()))
        .output()?;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("locked by another agent"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[test]
fn sigterm_exits_0_in_time_while_the_receiver_fails_and_keeps_the_backlog() -> Result<()> {
    use agent::remote_write::proto::{self, WriteRequest};
    use prost::Message;
    let dir = tempfile::tempdir()?;
    let failing = TinyServer::start(|_| (500, vec![], b"down".to_vec()))?;
    let target = TinyServer::start(|_| (200, vec![], b"test_gauge 1\n".to_vec()))?;
    let sink = dir.path().join("sink.txt");
    let config = format!(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: t\n    static_configs:\n      - targets: ['{}']\nremote_write:\n  - url: http://{}/api/v1/write\n    name: main\n    queue_config:\n      batch_send_deadline: 100ms\nstorage:\n  shutdown_timeout: 3s\nfile_sink:\n  path: {}\n",
        target.addr,
        failing.addr,
        sink.display()
    );
    let mut agent = Agent::start(dir.path(), &config)?;
    poll("retries", Duration::from_secs(20), || {
        Ok((agent.metric("sre_agent_remote_samples_retried_total", "")? > 0.0).then_some(()))
    })?;
    let stopped_at = sre_lab_tests::now_s() * 1000.0;
    let started = Instant::now();
    let status = agent.proc.signal("TERM")?.expect("exit status");
    assert!(
        status.success(),
        "exit 0 after SIGTERM: {status:?}\n{}",
        agent.proc.log_text()
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    assert!(agent.proc.log_text().contains("unsent samples stay in the WAL"));
    let sunk = std::fs::read_to_string(&sink)?;
    assert!(sunk.contains("test_gauge"), "scraped before the stop");
    assert!(!sunk.contains(" NaN "), "SIGTERM writes no staleness markers:\n{sunk}");

    // The backlog (samples scraped before the stop) is delivered by the next start to a working
    // receiver at a new URL: the queue is kept by its `name`.
    let old: std::sync::Arc<std::sync::Mutex<Vec<i64>>> = Default::default();
    let o2 = old.clone();
    let ok = TinyServer::start(move |req| {
        let mut raw = Vec::new();
        if proto::decompress(&req.body, 64 << 20, &mut raw).is_ok() {
            if let Ok(wr) = WriteRequest::decode(raw.as_slice()) {
                for ts in wr.timeseries {
                    o2.lock().unwrap().extend(ts.samples.iter().map(|s| s.timestamp));
                }
            }
        }
        (200, vec![], Vec::new())
    })?;
    std::fs::write(
        &agent.config,
        config
            .replace(&failing.addr, &ok.addr)
            .replace(&target.addr, "127.0.0.1:1"),
    )?;
    let (cfg, storage) = (agent.config.clone(), agent.storage.clone());
    drop(agent);
    let _agent = Agent::start_with(dir.path(), cfg, storage, free_port())?;
    poll(
        "backlog from before the stop delivered",
        Duration::from_secs(20),
        || Ok((old.lock().unwrap().iter().filter(|t| (**t as f64) < stopped_at).count() >= 3).then_some(())),
    )?;
    Ok(())
}

#[test]
fn shipped_example_configs_pass_check_config() -> Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for example in ["examples/quickstart.yml", "examples/kubernetes.yml"] {
        let out = Command::new(workspace_bin("agent"))
            .arg("check-config")
            .arg(root.join(example))
            .output()?;
        assert!(
            out.status.success(),
            "{example}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok", "{example}");
    }
    Ok(())
}

#[test]
fn storage_and_listen_address_defaults_come_from_the_config() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let port = free_port();
    std::fs::write(
        dir.path().join("agent.yml"),
        format!("server:\n  listen_address: 127.0.0.1:{port}\nscrape_configs: []\n"),
    )?;
    let log = dir.path().join("agent.log");
    let mut cmd = Command::new(workspace_bin("agent"));
    cmd.arg("--config").arg("agent.yml").current_dir(dir.path());
    let mut proc = sre_lab_tests::Proc::spawn("agent", cmd, log)?;
    poll("listening on server.listen_address", Duration::from_secs(20), || {
        Ok(http_get(&format!("http://127.0.0.1:{port}/readyz")).ok().map(|_| ()))
    })?;
    assert!(
        dir.path().join("data").join("lock").exists(),
        "storage.path defaults to ./data"
    );
    let st = proc.signal("TERM")?.expect("exit status");
    assert!(st.success());
    Ok(())
}
