//! The cases of the Prometheus remote-write sender compliance suite
//! (prometheus/compliance, `remote_write_sender/cases`), written as Rust tests: a test target
//! serves an exposition page, a test receiver decodes every request, and the real agent binary
//! sits in between.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent::remote_write::proto::{self, WriteRequest};
use anyhow::{bail, Result};
use prost::Message;
use sre_lab_tests::{poll, Agent, TinyRequest, TinyServer};

mod exactly_once;

/// What the receiver recorded: (request, decoded body, status answered).
type Log = Arc<Mutex<Vec<(TinyRequest, WriteRequest, u16)>>>;

struct Harness {
    _dir: tempfile::TempDir,
    target_body: Arc<Mutex<String>>,
    target: TinyServer,
    _receiver: TinyServer,
    log: Log,
    /// Arrival time of every request.
    times: Arc<Mutex<Vec<std::time::Instant>>>,
    agent: Agent,
}

/// Decides the status of the n-th request (0-based).
type Policy = Arc<dyn Fn(usize) -> (u16, Vec<(String, String)>) + Send + Sync>;

impl Harness {
    fn start(body: &str, scrape_extra: &str, policy: Policy) -> Result<Self> {
        Self::start_with(body, scrape_extra, "", "", policy)
    }

    fn start_with(
        body: &str,
        scrape_extra: &str,
        global_extra: &str,
        remote_extra: &str,
        policy: Policy,
    ) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let target_body = Arc::new(Mutex::new(body.to_owned()));
        let tb = target_body.clone();
        let target = TinyServer::start(move |_req| {
            let b = tb.lock().unwrap().clone();
            (
                200,
                vec![("Content-Type".into(), "text/plain; version=0.0.4".into())],
                b.into_bytes(),
            )
        })?;
        let log: Log = Arc::new(Mutex::new(Vec::new()));
        let log2 = log.clone();
        let times: Arc<Mutex<Vec<std::time::Instant>>> = Arc::default();
        let times2 = times.clone();
        let receiver = TinyServer::start(move |req| {
            times2.lock().unwrap().push(std::time::Instant::now());
            let mut raw = Vec::new();
            let decoded = proto::decompress(&req.body, 64 << 20, &mut raw)
                .ok()
                .and_then(|_| WriteRequest::decode(raw.as_slice()).ok())
                .unwrap_or_default();
            let mut l = log2.lock().unwrap();
            let (status, headers) = policy(l.len());
            l.push((req, decoded, status));
            (status, headers, Vec::new())
        })?;
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n{global_extra}scrape_configs:\n  - job_name: test\n    static_configs:\n      - targets: ['{}']\n{scrape_extra}remote_write:\n  - url: http://{}/api/v1/write\n    queue_config:\n      batch_send_deadline: 100ms\n      min_backoff: 50ms\n      max_backoff: 200ms\n{remote_extra}",
            target.addr, receiver.addr
        );
        std::fs::write(dir.path().join("token"), "t0k3n\n")?;
        let agent = Agent::start(dir.path(), &config)?;
        Ok(Self {
            _dir: dir,
            target_body,
            target,
            _receiver: receiver,
            log,
            times,
            agent,
        })
    }

    fn ok(body: &str) -> Result<Self> {
        Self::start(body, "", Arc::new(|_| (200, vec![])))
    }

    /// All (labels, samples) received in accepted requests, in arrival order.
    fn accepted(&self) -> Vec<(BTreeMap<String, String>, Vec<proto::Sample>)> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, _, st)| *st < 300)
            .flat_map(|(_, wr, _)| {
                wr.timeseries
                    .iter()
                    .map(|ts| (labels(ts), ts.samples.clone()))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Waits until a series with these labels (subset match) has been accepted; returns its samples.
    fn wait_series(&self, want: &[(&str, &str)]) -> Result<Vec<proto::Sample>> {
        poll(&format!("series {want:?}"), Duration::from_secs(20), || {
            let found: Vec<proto::Sample> = self
                .accepted()
                .into_iter()
                .filter(|(l, _)| want.iter().all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v)))
                .flat_map(|(_, s)| s)
                .collect();
            Ok((!found.is_empty()).then_some(found))
        })
        .map_err(|e| e.context(self.agent.proc.log_text()))
    }
}

fn labels(ts: &proto::TimeSeries) -> BTreeMap<String, String> {
    ts.labels.iter().map(|l| (l.name.clone(), l.value.clone())).collect()
}

const TYPES_PAGE: &str = "# HELP test_counter_total A counter.\n# TYPE test_counter_total counter\ntest_counter_total 7\n\
# TYPE test_gauge gauge\ntest_gauge{kind=\"g\"} 2.5\n\
# TYPE test_histogram histogram\ntest_histogram_bucket{le=\"0.1\"} 1\ntest_histogram_bucket{le=\"1\"} 3\ntest_histogram_bucket{le=\"+Inf\"} 4\ntest_histogram_sum 2.2\ntest_histogram_count 4\n\
# TYPE test_summary summary\ntest_summary{quantile=\"0.5\"} 0.3\ntest_summary{quantile=\"0.99\"} 0.9\ntest_summary_sum 5\ntest_summary_count 10\n\
test_empty{foo=\"\"} 1\n";

#[test]
fn counter_gauge_histogram_summary_up_and_label_rules() -> Result<()> {
    let h = Harness::ok(TYPES_PAGE)?;
    let inst = h.target.addr.clone();
    let base = [("job", "test"), ("instance", inst.as_str())];
    let check = |name: &str, extra: &[(&str, &str)], value: f64| -> Result<()> {
        let mut want: Vec<(&str, &str)> = vec![("__name__", name)];
        want.extend_from_slice(&base);
        want.extend_from_slice(extra);
        let s = h.wait_series(&want)?;
        if s.iter().all(|s| s.value != value) {
            bail!("{name}{extra:?}: expected value {value}, got {s:?}");
        }
        Ok(())
    };
    check("test_counter_total", &[], 7.0)?;
    check("test_gauge", &[("kind", "g")], 2.5)?;
    check("test_histogram_bucket", &[("le", "0.1")], 1.0)?;
    check("test_histogram_bucket", &[("le", "+Inf")], 4.0)?;
    check("test_histogram_sum", &[], 2.2)?;
    check("test_histogram_count", &[], 4.0)?;
    check("test_summary", &[("quantile", "0.99")], 0.9)?;
    check("test_summary_count", &[], 10.0)?;
    check("up", &[], 1.0)?;
    check("scrape_samples_scraped", &[], 12.0)?;
    // Empty label values are never sent.
    check("test_empty", &[], 1.0)?;
    for (l, _) in h.accepted() {
        assert!(l.contains_key("__name__"), "every series has __name__: {l:?}");
        assert!(l.values().all(|v| !v.is_empty()), "no empty label values: {l:?}");
        assert_eq!(l.get("job").map(String::as_str), Some("test"));
        assert_eq!(l.get("instance"), Some(&inst));
    }
    // Labels sorted and unique on the wire (not just after our BTreeMap).
    for (_, wr, _) in h.log.lock().unwrap().iter() {
        for ts in &wr.timeseries {
            let names: Vec<&str> = ts.labels.iter().map(|l| l.name.as_str()).collect();
            assert!(
                names.windows(2).all(|w| w[0] < w[1]),
                "labels sorted and unique: {names:?}"
            );
        }
    }
    Ok(())
}

#[test]
fn headers_timestamps_and_ordering() -> Result<()> {
    let started = sre_lab_tests::now_s() * 1000.0;
    let h = Harness::ok("test_gauge 1\ntest_ts 5 1234567890123\n")?;
    h.wait_series(&[("__name__", "test_gauge")])?;
    // A few more scrapes for ordering.
    poll("4 scrapes received", Duration::from_secs(20), || {
        Ok((h
            .accepted()
            .iter()
            .filter(|(l, _)| l["__name__"] == "up")
            .flat_map(|(_, s)| s)
            .count()
            >= 4)
            .then_some(()))
    })?;
    let log = h.log.lock().unwrap();
    let (req, _, _) = &log[0];
    assert_eq!(req.method, "POST");
    assert_eq!(req.header("content-encoding"), Some("snappy"));
    assert_eq!(req.header("content-type"), Some("application/x-protobuf"));
    assert_eq!(req.header("x-prometheus-remote-write-version"), Some("0.1.0"));
    assert!(
        req.header("user-agent")
            .unwrap_or_default()
            .starts_with("sre-lab-agent/"),
        "{:?}",
        req.header("user-agent")
    );
    drop(log);
    let now = sre_lab_tests::now_s() * 1000.0;
    let mut last: BTreeMap<BTreeMap<String, String>, i64> = BTreeMap::new();
    for (l, samples) in h.accepted() {
        for s in samples {
            if l["__name__"] == "test_ts" {
                assert_eq!(
                    s.timestamp, 1234567890123,
                    "honor_timestamps keeps the exposed timestamp"
                );
            } else {
                assert!(
                    (s.timestamp as f64) >= started - 1000.0 && (s.timestamp as f64) <= now + 1000.0,
                    "timestamp {} out of range",
                    s.timestamp
                );
            }
            if let Some(prev) = last.get(&l) {
                assert!(
                    s.timestamp > *prev || l["__name__"] == "test_ts",
                    "{l:?}: {} after {prev}",
                    s.timestamp
                );
            }
            last.insert(l.clone(), s.timestamp);
        }
    }
    Ok(())
}

#[test]
fn invalid_exposition_sends_up_0_only() -> Result<()> {
    let h = Harness::ok("test_ok 1\nthis is { not valid\n")?;
    let up = h.wait_series(&[("__name__", "up")])?;
    assert!(up.iter().all(|s| s.value == 0.0), "up must be 0: {up:?}");
    assert!(
        !h.accepted().iter().any(|(l, _)| l["__name__"] == "test_ok"),
        "a failed scrape sends none of its samples"
    );
    Ok(())
}

#[test]
fn honor_labels_false_renames_and_true_keeps() -> Result<()> {
    let page = "test_honor{job=\"other\",instance=\"elsewhere\"} 1\n";
    let h = Harness::ok(page)?;
    h.wait_series(&[
        ("__name__", "test_honor"),
        ("job", "test"),
        ("exported_job", "other"),
        ("exported_instance", "elsewhere"),
    ])?;
    drop(h);
    let h = Harness::start(page, "    honor_labels: true\n", Arc::new(|_| (200, vec![])))?;
    let found = h.wait_series(&[("__name__", "test_honor"), ("job", "other"), ("instance", "elsewhere")])?;
    assert!(!found.is_empty());
    Ok(())
}

#[test]
fn staleness_marker_when_a_series_disappears() -> Result<()> {
    let h = Harness::ok("test_stale 1\ntest_stay 1\n")?;
    h.wait_series(&[("__name__", "test_stale")])?;
    *h.target_body.lock().unwrap() = "test_stay 1\n".into();
    poll("stale marker for test_stale", Duration::from_secs(20), || {
        Ok(h.accepted()
            .iter()
            .any(|(l, s)| l["__name__"] == "test_stale" && s.iter().any(|s| proto::is_stale_nan(s.value)))
            .then_some(()))
    })?;
    Ok(())
}

#[test]
fn retries_on_500_and_429_with_retry_after() -> Result<()> {
    let policy: Policy = Arc::new(|n| match n {
        0..=2 => (500, vec![]),
        3 => (429, vec![("Retry-After".into(), "1".into())]),
        _ => (200, vec![]),
    });
    let h = Harness::start("test_gauge 1\n", "", policy)?;
    // The samples of the first (failed) request arrive later in an accepted one.
    let first = poll("a failed request", Duration::from_secs(20), || {
        Ok(h.log.lock().unwrap().first().map(|(_, wr, _)| wr.clone()))
    })?;
    let first_ts: Vec<(BTreeMap<String, String>, i64)> = first
        .timeseries
        .iter()
        .flat_map(|ts| ts.samples.iter().map(move |s| (labels(ts), s.timestamp)))
        .collect();
    assert!(!first_ts.is_empty());
    poll("resent samples accepted", Duration::from_secs(30), || {
        let acc = h.accepted();
        Ok(first_ts
            .iter()
            .all(|(l, t)| acc.iter().any(|(al, s)| al == l && s.iter().any(|s| s.timestamp == *t)))
            .then_some(()))
    })?;
    assert!(h.agent.metric("sre_agent_remote_samples_retried_total", "")? > 0.0);
    // Backoff grows between the 500s, and the Retry-After of the 429 (1 s) is honoured.
    let t = h.times.lock().unwrap().clone();
    assert!(t.len() >= 5);
    assert!(
        t[4] - t[3] >= Duration::from_millis(950),
        "Retry-After: 1 honoured: {:?}",
        t[4] - t[3]
    );
    assert!(
        t[2] - t[1] >= Duration::from_millis(45),
        "backoff between retries: {:?}",
        t[2] - t[1]
    );
    Ok(())
}

#[test]
fn no_retry_on_400() -> Result<()> {
    let policy: Policy = Arc::new(|n| if n == 0 { (400, vec![]) } else { (200, vec![]) });
    let h = Harness::start("test_gauge 1\n", "", policy)?;
    poll("three requests", Duration::from_secs(20), || {
        Ok((h.log.lock().unwrap().len() >= 3).then_some(()))
    })?;
    let log = h.log.lock().unwrap();
    let rejected: Vec<(BTreeMap<String, String>, i64)> = log[0]
        .1
        .timeseries
        .iter()
        .flat_map(|ts| ts.samples.iter().map(move |s| (labels(ts), s.timestamp)))
        .collect();
    for (_, wr, _) in log.iter().skip(1) {
        for ts in &wr.timeseries {
            for s in &ts.samples {
                assert!(
                    !rejected.contains(&(labels(ts), s.timestamp)),
                    "a sample rejected with 400 was sent again"
                );
            }
        }
    }
    drop(log);
    poll("dropped counter", Duration::from_secs(10), || {
        Ok((h
            .agent
            .metric("sre_agent_remote_samples_dropped_total", "reason=\"http_4xx\"")?
            > 0.0)
            .then_some(()))
    })?;
    Ok(())
}

#[test]
fn remote_auth_headers_write_relabel_external_labels_and_honor_timestamps_false() -> Result<()> {
    let h = Harness::start_with(
        "kept 1\ndropped 2\nwith_ts 3 1234567890123\n",
        "    honor_timestamps: false\n    authorization:\n      credentials_file: token\n",
        "  external_labels:\n    cluster: c1\n    job: not-this\n",
        "    headers:\n      X-Scope-OrgID: tenant-a\n    basic_auth:\n      username: u\n      password: p\n    write_relabel_configs:\n      - source_labels: [__name__]\n        regex: dropped\n        action: drop\n",
        Arc::new(|_| (200, vec![])),
    )?;
    let kept = h.wait_series(&[("__name__", "kept"), ("cluster", "c1"), ("job", "test")])?;
    assert!(
        !kept.is_empty(),
        "external label added, the series' own job wins over it"
    );
    let ts = h.wait_series(&[("__name__", "with_ts")])?;
    assert!(
        ts.iter().all(|s| s.timestamp != 1234567890123),
        "honor_timestamps: false uses the scrape time"
    );
    assert!(
        !h.accepted().iter().any(|(l, _)| l["__name__"] == "dropped"),
        "write_relabel_configs drop"
    );
    let log = h.log.lock().unwrap();
    let (req, _, _) = &log[0];
    assert_eq!(req.header("x-scope-orgid"), Some("tenant-a"));
    assert_eq!(req.header("authorization"), Some("Basic dTpw"));
    Ok(())
}

#[test]
fn scrape_authorization_credentials_file() -> Result<()> {
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let s2 = seen.clone();
    let target = TinyServer::start(move |req| {
        s2.lock()
            .unwrap()
            .push(req.header("authorization").unwrap_or_default().to_owned());
        (200, vec![], b"x 1\n".to_vec())
    })?;
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("token"), "t0k3n\n")?;
    let _agent = Agent::start(
        dir.path(),
        &format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: a\n    authorization:\n      credentials_file: token\n    static_configs:\n      - targets: ['{}']\n  - job_name: b\n    bearer_token_file: token\n    static_configs:\n      - targets: ['{}']\n",
            target.addr, target.addr
        ),
    )?;
    poll("two scrapes", Duration::from_secs(20), || {
        Ok((seen.lock().unwrap().len() >= 2).then_some(()))
    })?;
    assert!(
        seen.lock().unwrap().iter().all(|a| a == "Bearer t0k3n"),
        "{:?}",
        seen.lock().unwrap()
    );
    Ok(())
}

#[test]
fn repeated_label_names_fail_the_scrape() -> Result<()> {
    let h = Harness::ok("test_repeated{a=\"1\",a=\"2\"} 1\n")?;
    let up = h.wait_series(&[("__name__", "up")])?;
    assert!(
        up.iter().all(|s| s.value == 0.0),
        "a sample with a repeated label name fails the scrape: {up:?}"
    );
    assert!(!h.accepted().iter().any(|(l, _)| l["__name__"] == "test_repeated"));
    Ok(())
}

/// A 400 "duplicate sample for timestamp" means the receiver has the samples (delivered); a
/// 400 for out-of-order samples makes Prometheus roll back the whole request: dropped, with
/// its reason.
#[test]
fn rejections_counted_as_duplicate_or_dropped_with_reason() -> Result<()> {
    let target = TinyServer::start(|_| (200, vec![], b"test_gauge 1\n".to_vec()))?;
    let n = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let n2 = n.clone();
    let receiver = TinyServer::start(move |_| match n2.fetch_add(1, std::sync::atomic::Ordering::SeqCst) {
        0 => (400, vec![], b"duplicate sample for timestamp".to_vec()),
        1 => (400, vec![], b"out of order sample".to_vec()),
        _ => (200, vec![], Vec::new()),
    })?;
    let dir = tempfile::tempdir()?;
    let agent = Agent::start(
        dir.path(),
        &format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: t\n    static_configs:\n      - targets: ['{}']\nremote_write:\n  - url: http://{}/api/v1/write\n    queue_config:\n      batch_send_deadline: 100ms\n",
            target.addr, receiver.addr
        ),
    )?;
    poll("both rejections counted", Duration::from_secs(20), || {
        let dup = agent.metric("sre_agent_remote_samples_duplicate_total", "")?;
        let ooo = agent.metric("sre_agent_remote_samples_dropped_total", "reason=\"out_of_order\"")?;
        Ok((dup > 0.0 && ooo > 0.0).then_some((dup, ooo)))
    })
    .map_err(|e| e.context(agent.proc.log_text()))?;
    assert_eq!(
        agent.metric("sre_agent_remote_samples_dropped_total", "reason=\"http_4xx\"")?,
        0.0,
        "a known rejection is counted under its own reason"
    );
    Ok(())
}
