//! Redirects: credentials go only to the first host (and its subdomains), as Go's client and
//! so Prometheus do; remote_write follows 307/308 with the same body.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use sre_lab_tests::{poll, Agent, TinyServer};

type Seen = Arc<Mutex<Vec<Option<String>>>>;

/// A server answering `page` that records the `Authorization` header of every request.
fn recording(page: &'static str) -> Result<(TinyServer, Seen)> {
    let seen: Seen = Arc::default();
    let s2 = seen.clone();
    let server = TinyServer::start(move |req| {
        s2.lock().unwrap().push(req.header("authorization").map(str::to_owned));
        (200, vec![], page.as_bytes().to_vec())
    })?;
    Ok((server, seen))
}

/// A server redirecting every request to `to` with `status`.
fn redirecting(status: u16, to: String) -> Result<TinyServer> {
    TinyServer::start(move |_| (status, vec![("Location".into(), to.clone())], Vec::new()))
}

#[test]
fn scrape_redirects_keep_credentials_on_the_same_host_only() -> Result<()> {
    let (same, same_seen) = recording("redirect_same 1\n")?;
    let (other, other_seen) = recording("redirect_other 1\n")?;
    // 127.0.0.1 → 127.0.0.1 (another port: the same host) and 127.0.0.1 → localhost (another host).
    let to_same = redirecting(302, format!("http://{}/metrics", same.addr))?;
    let other_port = other.addr.rsplit(':').next().unwrap_or_default();
    let to_other = redirecting(302, format!("http://localhost:{other_port}/metrics"))?;
    let dir = tempfile::tempdir()?;
    let sink = dir.path().join("sink.txt");
    let agent = Agent::start(
        dir.path(),
        &format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: r\n    authorization:\n      credentials: s3cret\n    static_configs:\n      - targets: ['{}', '{}']\nfile_sink:\n  path: {}\n",
            to_same.addr,
            to_other.addr,
            sink.display()
        ),
    )?;
    poll("both redirected scrapes", Duration::from_secs(20), || {
        let text = std::fs::read_to_string(&sink).unwrap_or_default();
        Ok((text.contains("redirect_same") && text.contains("redirect_other")).then_some(()))
    })
    .map_err(|e| e.context(agent.proc.log_text()))?;
    let same = same_seen.lock().unwrap().clone();
    let other = other_seen.lock().unwrap().clone();
    assert!(same.iter().all(|a| a.as_deref() == Some("Bearer s3cret")), "{same:?}");
    assert!(
        other.iter().all(Option::is_none),
        "credentials leaked to another host: {other:?}"
    );
    Ok(())
}

#[test]
fn remote_write_follows_307_with_the_body_and_drops_credentials_across_hosts() -> Result<()> {
    let target = TinyServer::start(|_| (200, vec![], b"rw_redirect 1\n".to_vec()))?;
    // (body length, Authorization) of every push.
    type Pushes = Arc<Mutex<Vec<(usize, Option<String>)>>>;
    let pushes: Pushes = Arc::default();
    let p2 = pushes.clone();
    let receiver = TinyServer::start(move |req| {
        p2.lock()
            .unwrap()
            .push((req.body.len(), req.header("authorization").map(str::to_owned)));
        (200, vec![], Vec::new())
    })?;
    let port = receiver.addr.rsplit(':').next().unwrap_or_default().to_owned();
    let hop = redirecting(307, format!("http://localhost:{port}/api/v1/write"))?;
    let dir = tempfile::tempdir()?;
    let agent = Agent::start(
        dir.path(),
        &format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: r\n    static_configs:\n      - targets: ['{}']\nremote_write:\n  - url: http://{}/api/v1/write\n    authorization:\n      credentials: s3cret\n    queue_config:\n      batch_send_deadline: 100ms\n",
            target.addr, hop.addr
        ),
    )?;
    poll("pushes through the redirect", Duration::from_secs(20), || {
        Ok((pushes.lock().unwrap().len() >= 2).then_some(()))
    })
    .map_err(|e| e.context(agent.proc.log_text()))?;
    let p = pushes.lock().unwrap().clone();
    assert!(p.iter().all(|(len, _)| *len > 0), "the body follows a 307: {p:?}");
    assert!(
        p.iter().all(|(_, a)| a.is_none()),
        "credentials leaked to another host: {p:?}"
    );
    assert_eq!(agent.metric("sre_agent_remote_samples_dropped_total", "")?, 0.0);
    Ok(())
}

/// A 308 is followed like a 307; with `follow_redirects: false` a redirect is not followed and
/// its push is dropped as `http_3xx` (counted, not retried).
#[test]
fn remote_write_follows_308_and_counts_unfollowed_redirects() -> Result<()> {
    let target = TinyServer::start(|_| (200, vec![], b"rw_redirect 1\n".to_vec()))?;
    let pushes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let p2 = pushes.clone();
    let receiver = TinyServer::start(move |req| {
        if !req.body.is_empty() {
            p2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        (200, vec![], Vec::new())
    })?;
    let hop = redirecting(308, format!("http://{}/api/v1/write", receiver.addr))?;
    let dir = tempfile::tempdir()?;
    let agent = Agent::start(
        dir.path(),
        &format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: r\n    static_configs:\n      - targets: ['{t}']\nremote_write:\n  - url: http://{h}/api/v1/write\n    name: follows\n    queue_config:\n      batch_send_deadline: 100ms\n  - url: http://{h}/api/v1/write?no\n    name: stays\n    follow_redirects: false\n    queue_config:\n      batch_send_deadline: 100ms\n",
            t = target.addr,
            h = hop.addr
        ),
    )?;
    poll(
        "pushes through a 308, drops of the unfollowed",
        Duration::from_secs(20),
        || {
            let dropped = agent.metric(
                "sre_agent_remote_samples_dropped_total",
                "remote=\"stays\",reason=\"http_3xx\"",
            )?;
            Ok((pushes.load(std::sync::atomic::Ordering::SeqCst) >= 2 && dropped > 0.0).then_some(()))
        },
    )
    .map_err(|e| e.context(agent.proc.log_text()))?;
    assert_eq!(
        agent.metric("sre_agent_remote_samples_dropped_total", "remote=\"follows\"")?,
        0.0
    );
    Ok(())
}
