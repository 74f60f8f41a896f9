//! Scrape options against test targets: auth, params, path, gzip, limits, malformed pages,
//! file_sd updates — observed through the agent's `/api/v1/targets` and its file sink.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use sre_lab_tests::{http_get, poll, scraped, targets, Agent, TinyServer};

#[test]
fn auth_params_path_gzip_and_limits() -> Result<()> {
    let seen: Arc<Mutex<Vec<sre_lab_tests::TinyRequest>>> = Arc::default();
    let s2 = seen.clone();
    let page = "a 1\nb{x=\"1\"} 2\nc{x=\"1\",y=\"2\",z=\"3\"} 3\n";
    let target = TinyServer::start(move |req| {
        s2.lock().unwrap().push(req.clone());
        if req.path.starts_with("/old") {
            return (302, vec![("Location".into(), "/custom?module=m1".into())], Vec::new());
        }
        if req.header("authorization") != Some("Basic dXNlcjpzZWNyZXQ=") {
            return (401, vec![], b"who are you".to_vec());
        }
        if req.header("accept-encoding").is_some_and(|v| v.contains("gzip")) {
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            enc.write_all(page.as_bytes()).unwrap();
            return (
                200,
                vec![("Content-Encoding".into(), "gzip".into())],
                enc.finish().unwrap(),
            );
        }
        (200, vec![], page.as_bytes().to_vec())
    })?;
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("password"), "secret\n")?;
    let job = |name: &str, extra: &str| {
        format!(
            "  - job_name: {name}\n    metrics_path: /custom\n    params:\n      module: [m1]\n    basic_auth:\n      username: user\n      password_file: password\n    static_configs:\n      - targets: ['{}']\n{extra}",
            target.addr
        )
    };
    let config = format!(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n{}{}{}{}{}{}",
        job("ok", ""),
        job("samples", "    sample_limit: 2\n"),
        job("labels", "    label_limit: 4\n"),
        job("body", "    body_size_limit: 10\n"),
        job("redirected", "").replace("metrics_path: /custom", "metrics_path: /old"),
        "  - job_name: noauth\n    static_configs:\n      - targets: ['".to_owned() + &target.addr + "']\n",
    );
    let agent = Agent::start(dir.path(), &config)?;

    assert_eq!(scraped(&agent, "ok")?, ("up".to_owned(), String::new()));
    let req = seen
        .lock()
        .unwrap()
        .iter()
        .find(|r| r.path.starts_with("/custom"))
        .cloned()
        .expect("a request");
    assert_eq!(req.path, "/custom?module=m1");
    assert!(req
        .header("accept")
        .unwrap_or_default()
        .starts_with("application/openmetrics-text"));
    assert!(req.header("x-prometheus-scrape-timeout-seconds").is_some());

    assert_eq!(
        scraped(&agent, "redirected")?,
        ("up".to_owned(), String::new()),
        "302 followed"
    );
    let (h, e) = scraped(&agent, "samples")?;
    assert_eq!(h, "down");
    assert!(e.contains("sample limit exceeded"), "{e}");
    let (h, e) = scraped(&agent, "labels")?;
    assert_eq!(h, "down");
    assert!(e.contains("label_limit exceeded"), "{e}");
    let (h, e) = scraped(&agent, "body")?;
    assert_eq!(h, "down");
    assert!(e.contains("body size limit"), "{e}");
    // password_file is read for every scrape: a rotated (here: wrong) password takes effect.
    std::fs::write(dir.path().join("password"), "rotated\n")?;
    poll("401 after the password file changed", Duration::from_secs(20), || {
        Ok(targets(&agent)?
            .iter()
            .any(|t| t["job"] == "ok" && t["last_error"].as_str().unwrap_or_default().contains("401"))
            .then_some(()))
    })?;
    let (h, e) = scraped(&agent, "noauth")?;
    assert_eq!(h, "down");
    assert!(e.contains("401"), "{e}");
    assert!(agent.metric("sre_agent_scrape_failures_total", "reason=\"sample_limit\"")? >= 1.0);
    Ok(())
}

#[test]
fn malformed_page_fails_the_scrape_with_a_clear_error() -> Result<()> {
    let target = TinyServer::start(|_| (200, vec![], b"good 1\nbad{x=} 2\n".to_vec()))?;
    let dir = tempfile::tempdir()?;
    let agent = Agent::start(
        dir.path(),
        &format!("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: m\n    static_configs:\n      - targets: ['{}']\n", target.addr),
    )?;
    let (h, e) = scraped(&agent, "m")?;
    assert_eq!(h, "down");
    assert!(e.contains("line 2"), "error names the line: {e}");
    let page = http_get(&format!("{}/status", agent.url))?;
    assert!(page.contains("line 2"), "status page shows the error");
    assert!(agent.proc.log_text().contains("line 2"), "log shows the error");
    assert!(agent.metric("sre_agent_scrape_failures_total", "reason=\"parse\"")? >= 1.0);
    Ok(())
}

#[test]
fn file_sd_changes_are_picked_up() -> Result<()> {
    let a = TinyServer::start(|_| (200, vec![], b"x 1\n".to_vec()))?;
    let b = TinyServer::start(|_| (200, vec![], b"x 2\n".to_vec()))?;
    let dir = tempfile::tempdir()?;
    let sd = dir.path().join("targets.json");
    let sink = dir.path().join("sink.txt");
    std::fs::write(
        &sd,
        format!(r#"[{{"targets": ["{}"], "labels": {{"team": "a"}}}}]"#, a.addr),
    )?;
    let agent = Agent::start(
        dir.path(),
        &format!(
            "global:\n  scrape_interval: 1s\nfile_sink:\n  path: {}\nscrape_configs:\n  - job_name: f\n    file_sd_configs:\n      - files: ['*.json']\n        refresh_interval: 1m\n",
            sink.display()
        ),
    )?;
    let url_of = |agent: &Agent| -> Result<Vec<String>> {
        let mut v: Vec<String> = targets(agent)?
            .iter()
            .map(|t| t["url"].as_str().unwrap_or_default().to_owned())
            .collect();
        v.sort();
        Ok(v)
    };
    poll("first file target", Duration::from_secs(20), || {
        Ok((url_of(&agent)? == vec![format!("http://{}/metrics", a.addr)]).then_some(()))
    })?;
    let labels = targets(&agent)?[0]["labels"].to_string();
    assert!(labels.contains("team") && labels.contains("\"a\""), "{labels}");
    poll("a scrape of the first target", Duration::from_secs(10), || {
        Ok(std::fs::read_to_string(&sink)
            .unwrap_or_default()
            .contains("x{")
            .then_some(()))
    })?;
    std::fs::write(&sd, format!(r#"[{{"targets": ["{}"]}}]"#, b.addr))?;
    poll(
        "changed file target (inotify, not the 1m refresh)",
        Duration::from_secs(20),
        || Ok((url_of(&agent)? == vec![format!("http://{}/metrics", b.addr)]).then_some(())),
    )?;
    // The target that went away ends its series with staleness markers.
    let gone = format!("x{{instance=\"{}\",job=\"f\",team=\"a\"}} NaN", a.addr);
    poll(
        "staleness markers of the removed target",
        Duration::from_secs(10),
        || Ok(std::fs::read_to_string(&sink)?.contains(&gone).then_some(())),
    )?;
    // A broken file keeps the previous targets and is counted.
    std::fs::write(&sd, "[{")?;
    poll("discovery error counted", Duration::from_secs(10), || {
        Ok((agent.metric("sre_agent_discovery_errors_total", "mechanism=\"file\"")? >= 1.0).then_some(()))
    })?;
    assert_eq!(url_of(&agent)?, vec![format!("http://{}/metrics", b.addr)]);
    Ok(())
}
