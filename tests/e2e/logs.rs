//! The logs path end to end: real CRI and Docker log trees written in a temp dir, the agent
//! binary tailing them, and a receiver that decodes the real Loki wire format (snappy +
//! `pkg/push/push.proto` `PushRequest`) and can answer 500/429/400 on demand. Lines carry
//! sequence numbers, so every line is checked to arrive exactly once (at least once across
//! `kill -9`) with its labels and timestamp.
//!
//! No registry ships Loki; when `SRE_LAB_LOKI_BIN` names a Loki binary the same tree is also
//! shipped to it (otherwise that part says it was skipped).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent::loki::proto::PushRequest;
use anyhow::Result;
use prost::Message;
use sre_lab_tests::{http_get, http_post, poll, Agent, TinyServer};

/// One entry as received.
#[derive(Clone, Debug)]
pub(crate) struct Got {
    pub(crate) labels: BTreeMap<String, String>,
    ts_ns: i64,
    pub(crate) line: String,
    tenant: String,
}

/// A Loki push receiver; `fail` (when non-zero) is the status every push gets.
pub(crate) struct Loki {
    server: TinyServer,
    got: Arc<Mutex<Vec<Got>>>,
    fail: Arc<AtomicU16>,
    pushes: Arc<Mutex<u64>>,
    /// Largest push, decompressed.
    largest: Arc<Mutex<usize>>,
    /// Entries of a label set in a push older than the one before them, and label sets named
    /// by more than one stream of a push.
    disorder: Arc<AtomicU64>,
    /// While set, pushes are stored but not answered (until it is cleared).
    hold: Arc<AtomicBool>,
    /// The sequence tags of pushes stored but not answered.
    unanswered: Arc<Mutex<HashSet<String>>>,
}

/// The `seq=<tag>` of a line.
fn seq_of(line: &str) -> Option<&str> {
    line.split_whitespace().find_map(|w| w.strip_prefix("seq="))
}

impl Loki {
    pub(crate) fn start() -> Result<Loki> {
        let got: Arc<Mutex<Vec<Got>>> = Arc::default();
        let fail = Arc::new(AtomicU16::new(0));
        let pushes: Arc<Mutex<u64>> = Arc::default();
        let largest: Arc<Mutex<usize>> = Arc::default();
        let disorder: Arc<AtomicU64> = Arc::default();
        let hold: Arc<AtomicBool> = Arc::default();
        let unanswered: Arc<Mutex<HashSet<String>>> = Arc::default();
        let (g, f, p, big) = (got.clone(), fail.clone(), pushes.clone(), largest.clone());
        let (dis, h, un) = (disorder.clone(), hold.clone(), unanswered.clone());
        let server = TinyServer::start(move |req| {
            *p.lock().unwrap() += 1;
            let code = f.load(Ordering::SeqCst);
            if code != 0 {
                let extra = if code == 429 {
                    vec![("Retry-After".to_owned(), "2".to_owned())]
                } else {
                    vec![]
                };
                return (code, extra, b"injected failure".to_vec());
            }
            if req.path != "/loki/api/v1/push" || req.header("content-type") != Some("application/x-protobuf") {
                return (400, vec![], b"unexpected request".to_vec());
            }
            let Ok(raw) = snap::raw::Decoder::new().decompress_vec(&req.body) else {
                return (400, vec![], b"not snappy".to_vec());
            };
            {
                let mut b = big.lock().unwrap();
                *b = (*b).max(raw.len());
            }
            let Ok(push) = PushRequest::decode(raw.as_slice()) else {
                return (400, vec![], b"not a PushRequest".to_vec());
            };
            let tenant = req.header("x-scope-orgid").unwrap_or("").to_owned();
            let held = h.load(Ordering::SeqCst);
            {
                let mut g = g.lock().unwrap();
                // Per label set across the whole push: one stream each, entries in time order.
                let mut last_of: HashMap<String, i64> = HashMap::new();
                for s in push.streams {
                    let labels: BTreeMap<String, String> = agent::loki::parse_labels(&s.labels).into_iter().collect();
                    if last_of.contains_key(&s.labels) {
                        dis.fetch_add(1, Ordering::SeqCst);
                    }
                    let last = last_of.entry(s.labels.clone()).or_insert(i64::MIN);
                    for e in s.entries {
                        let t = e.timestamp.unwrap_or_default();
                        let ts_ns = t.seconds * 1_000_000_000 + i64::from(t.nanos);
                        if ts_ns < *last {
                            dis.fetch_add(1, Ordering::SeqCst);
                        }
                        *last = ts_ns;
                        if held {
                            un.lock().unwrap().extend(seq_of(&e.line).map(str::to_owned));
                        }
                        g.push(Got {
                            labels: labels.clone(),
                            ts_ns,
                            line: e.line,
                            tenant: tenant.clone(),
                        });
                    }
                }
            }
            // Stored, but the answer waits (a push unanswered when the agent dies).
            let deadline = std::time::Instant::now() + Duration::from_secs(120);
            while held && h.load(Ordering::SeqCst) && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            (204, vec![], Vec::new())
        })?;
        Ok(Loki {
            server,
            got,
            fail,
            pushes,
            largest,
            disorder,
            hold,
            unanswered,
        })
    }

    pub(crate) fn url(&self) -> String {
        format!("http://{}/loki/api/v1/push", self.server.addr)
    }

    pub(crate) fn entries(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }

    /// How often each `seq=<tag>-<n>` arrived.
    fn seqs(&self) -> HashMap<String, usize> {
        let mut m = HashMap::new();
        for g in self.entries() {
            if let Some(s) = seq_of(&g.line) {
                *m.entry(s.to_owned()).or_insert(0) += 1;
            }
        }
        m
    }
}

/// A pod's log directory under `root`.
fn pod_dir(root: &Path, ns: &str, pod: &str, container: &str) -> PathBuf {
    let d = root.join(format!("{ns}_{pod}_uid-{pod}")).join(container);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The CRI time of line `n`: distinct and increasing.
pub(crate) fn cri_time(n: u64) -> (String, i64) {
    let secs = 1_767_225_600 + n / 1000; // 2026-01-01
    let nanos = (n % 1000) * 1_000_000 + 123;
    let ts = jiff::Timestamp::new(secs as i64, nanos as i32).unwrap();
    (format!("{ts:.9}"), ts.as_nanosecond() as i64)
}

pub(crate) fn append(path: &Path, text: &str) {
    let mut f = OpenOptions::new().create(true).append(true).open(path).unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

/// Appends `count` CRI lines `seq=<tag>-<n>` starting at `from` (every 7th split in P/F parts).
fn cri_lines(path: &Path, tag: &str, from: u64, count: u64, stream: &str) -> Vec<(String, i64)> {
    let mut text = String::new();
    let mut want = Vec::new();
    for n in from..from + count {
        let (t, ns) = cri_time(n);
        let msg = format!("hello seq={tag}-{n} from {tag}");
        if n % 7 == 0 {
            let (a, b) = msg.split_at(8);
            text.push_str(&format!("{t} {stream} P {a}\n{t} {stream} F {b}\n"));
        } else {
            text.push_str(&format!("{t} {stream} F {msg}\n"));
        }
        want.push((format!("{tag}-{n}"), ns));
    }
    append(path, &text);
    want
}

fn config(loki: &Loki, root: &Path, extra_client: &str) -> String {
    format!(
        "logs:\n  clients:\n    - url: {}\n      batchwait: 100ms\n      backoff_config: {{min_period: 100ms, max_period: 1s}}\n{extra_client}  scrape_configs:\n    - job_name: pods\n      kubernetes_pods: {{root: {}}}\n",
        loki.url(),
        root.display()
    )
}

/// Waits until every tag in `want` arrived, then checks each arrived exactly once.
fn expect_exactly_once(loki: &Loki, want: &[(String, i64)], timeout: Duration) -> Result<()> {
    poll("every line at the receiver", timeout, || {
        let seqs = loki.seqs();
        Ok(want.iter().all(|(s, _)| seqs.contains_key(s)).then_some(()))
    })
    .map_err(|e| {
        let seqs = loki.seqs();
        let missing: Vec<_> = want.iter().filter(|(s, _)| !seqs.contains_key(s)).take(10).collect();
        e.context(format!("missing e.g. {missing:?}"))
    })?;
    let seqs = loki.seqs();
    let dups: Vec<_> = seqs.iter().filter(|(_, n)| **n > 1).take(10).collect();
    assert!(dups.is_empty(), "lines received more than once: {dups:?}");
    // Every line with its runtime's time (0: the time is the agent's, not checked), and each
    // stream's entries in time order within a push.
    let times: HashMap<&str, i64> = want.iter().map(|(s, t)| (s.as_str(), *t)).collect();
    for g in loki.entries() {
        if let Some(t) = seq_of(&g.line).and_then(|s| times.get(s)).filter(|t| **t != 0) {
            assert_eq!(g.ts_ns, *t, "timestamp of {:?}", g.line);
        }
    }
    assert_eq!(
        loki.disorder.load(Ordering::SeqCst),
        0,
        "a push names a label set once, its entries in time order"
    );
    Ok(())
}

/// Checks the labels `kubernetes_pods` gives every entry of pod `pod` in namespace `ns`.
fn expect_pod_labels(loki: &Loki, ns: &str, pod: &str, container: &str) {
    let mut seen = 0;
    for g in loki
        .entries()
        .iter()
        .filter(|g| g.labels.get("pod").map(String::as_str) == Some(pod))
    {
        assert_eq!(g.labels["namespace"], ns, "{:?}", g.labels);
        assert_eq!(g.labels["container"], container, "{:?}", g.labels);
        assert!(
            matches!(g.labels["stream"].as_str(), "stdout" | "stderr"),
            "{:?}",
            g.labels
        );
        assert!(!g.labels.contains_key("filename"), "{:?}", g.labels);
        seen += 1;
    }
    assert!(seen > 0, "no entry of {ns}/{pod}");
}

#[test]
fn kubernetes_pods_every_line_once_with_labels_and_times_through_rotation_copytruncate_and_garbage() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("pods");
    let loki = Loki::start()?;
    let mut want = Vec::new();
    // Eight CRI pods, one Docker pod, written before the agent starts (read from the start).
    let mut logs = Vec::new();
    for p in 0..8 {
        let d = pod_dir(&root, "shop", &format!("web-{p}"), "app");
        let f = d.join("0.log");
        want.extend(cri_lines(
            &f,
            &format!("p{p}"),
            0,
            300,
            if p % 2 == 0 { "stdout" } else { "stderr" },
        ));
        logs.push(f);
    }
    let docker = pod_dir(&root, "legacy", "old-0", "main").join("0.log");
    let mut text = String::new();
    for n in 0..100u64 {
        let (t, _) = cri_time(n);
        // Docker splits long messages: every 10th line in two JSON lines.
        if n % 10 == 0 {
            text.push_str(&format!(
                "{{\"log\":\"part one \",\"stream\":\"stdout\",\"time\":\"{t}\"}}\n"
            ));
            text.push_str(&format!(
                "{{\"log\":\"seq=d-{n} \\\"quoted\\\"\\n\",\"stream\":\"stdout\",\"time\":\"{t}\"}}\n"
            ));
        } else {
            text.push_str(&format!(
                "{{\"log\":\"seq=d-{n} \\\"quoted\\\"\\n\",\"stream\":\"stdout\",\"time\":\"{t}\"}}\n"
            ));
        }
        want.push((format!("d-{n}"), cri_time(n).1));
    }
    append(&docker, &text);

    let agent = Agent::start(dir.path(), &config(&loki, &root, ""))?;
    expect_exactly_once(&loki, &want, Duration::from_secs(60))?;

    // Rotation by rename in the middle: a last line without its newline, then kubelet renames
    // 0.log and the runtime opens a new one.
    let (t, ns) = cri_time(300);
    append(&logs[0], &format!("{t} stdout F last seq=p0-300 before rotation"));
    want.push(("p0-300".into(), ns));
    std::fs::rename(&logs[0], logs[0].with_extension("log.20260101-000000"))?;
    want.extend(cri_lines(&logs[0], "p0", 301, 200, "stdout"));
    // copytruncate on another pod, after its lines were read.
    std::fs::copy(&logs[1], logs[1].with_extension("log.1"))?;
    OpenOptions::new().write(true).truncate(true).open(&logs[1])?;
    want.extend(cri_lines(&logs[1], "p1", 300, 50, "stderr"));
    // Garbage, an over-long line and more lines on a third pod.
    append(&logs[2], "\u{0}\u{1}binary\u{fffd} garbage not CRI\n");
    let (t, _) = cri_time(300);
    append(&logs[2], &format!("{t} stdout F seq=p2-big {}\n", "x".repeat(1 << 20)));
    want.extend(cri_lines(&logs[2], "p2", 301, 20, "stdout"));
    // A pod that appears while the agent runs.
    let late = pod_dir(&root, "shop", "late-0", "app").join("0.log");
    want.extend(cri_lines(&late, "late", 0, 100, "stdout"));
    expect_exactly_once(&loki, &want, Duration::from_secs(60))?;

    // Labels and timestamps: the CRI time, the message alone, the Helm chart's labels.
    let all = loki.entries();
    let times: HashMap<&str, i64> = want.iter().map(|(s, t)| (s.as_str(), *t)).collect();
    for g in &all {
        let Some(seq) = g.line.split_whitespace().find_map(|w| w.strip_prefix("seq=")) else {
            continue;
        };
        if let Some(t) = times.get(seq) {
            assert_eq!(g.ts_ns, *t, "timestamp of {seq}");
        }
        for k in ["namespace", "pod", "container", "stream"] {
            assert!(g.labels.contains_key(k), "{k} missing in {:?}", g.labels);
        }
        assert!(
            !g.labels.contains_key("filename"),
            "filename is kept out of stream labels"
        );
        assert!(!g.labels.keys().any(|k| k.contains("uid")), "{:?}", g.labels);
    }
    let p7 = all.iter().find(|g| g.line.contains("seq=p7-1 ")).unwrap();
    assert_eq!(p7.labels["namespace"], "shop");
    assert_eq!(p7.labels["pod"], "web-7");
    assert_eq!(p7.labels["container"], "app");
    assert_eq!(p7.labels["stream"], "stderr");
    assert_eq!(p7.line, "hello seq=p7-1 from p7", "the CRI prefix is removed");
    let merged = all.iter().find(|g| g.line.contains("seq=p3-14 ")).unwrap();
    assert_eq!(merged.line, "hello seq=p3-14 from p3", "P/F parts are merged");
    let d = all.iter().find(|g| g.line.contains("seq=d-10 ")).unwrap();
    assert_eq!(d.line, "part one seq=d-10 \"quoted\"");
    assert_eq!(d.labels["namespace"], "legacy");
    let big = all.iter().find(|g| g.line.contains("seq=p2-big")).unwrap();
    assert_eq!(big.line.len(), 256 << 10, "cut at max_line_size");
    assert!(
        all.iter()
            .any(|g| g.line.contains("binary") && g.line.contains("garbage")),
        "garbage kept as it is"
    );
    assert!(agent.metric("sre_agent_logs_truncated_lines_total", "pods")? >= 1.0);
    assert!(agent.metric("sre_agent_logs_format_errors_total", "pods")? >= 1.0);
    assert!(agent.metric("sre_agent_logs_file_truncations_total", "pods")? >= 1.0);
    // The status page lists the files with their positions.
    let files: serde_json::Value = serde_json::from_str(&http_get(&format!("{}/api/v1/files", agent.url))?)?;
    let rows = files.as_array().unwrap();
    assert!(rows.len() >= 10, "{rows:?}");
    let page = http_get(&format!("{}/status", agent.url))?;
    for part in [
        "Tailed files",
        "Logs jobs",
        "Lines read",
        "Pushes retried",
        "Logs positions",
    ] {
        assert!(page.contains(part), "{part} missing from the status page");
    }
    assert!(agent.metric("sre_agent_logs_file_position_bytes", "web-7")? > 0.0);
    assert!(agent.metric("sre_agent_logs_file_size_bytes", "web-7")? > 0.0);
    Ok(())
}

#[test]
fn loki_outage_while_files_rotate_away_and_a_reload_lose_and_repeat_nothing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("pods");
    let loki = Loki::start()?;
    let f = pod_dir(&root, "ns", "busy-0", "c").join("0.log");
    let mut want = cri_lines(&f, "b", 0, 200, "stdout");
    let agent = Agent::start(dir.path(), &config(&loki, &root, ""))?;
    expect_exactly_once(&loki, &want, Duration::from_secs(60))?;

    // Loki fails for 30 s; meanwhile the file rotates five times and the rotated files are
    // deleted (kubelet keeps few): only the agent's WAL still has those lines.
    loki.fail.store(500, Ordering::SeqCst);
    let mut n = 200;
    for r in 0..5 {
        want.extend(cri_lines(&f, "b", n, 400, "stdout"));
        n += 400;
        let rotated = f.with_extension(format!("log.2026010{r}"));
        // The agent has the file open before it is renamed and deleted.
        poll("agent read the file", Duration::from_secs(20), || {
            let files: serde_json::Value = serde_json::from_str(&http_get(&format!("{}/api/v1/files", agent.url))?)?;
            let done = files.as_array().unwrap().iter().any(|r| {
                r["offset"] == r["size"]
                    && r["size"].as_u64() > Some(0)
                    && r["path"].as_str().unwrap().ends_with("0.log")
            });
            Ok(done.then_some(()))
        })?;
        std::fs::rename(&f, &rotated)?;
        std::thread::sleep(Duration::from_millis(200));
        std::fs::remove_file(&rotated)?;
    }
    want.extend(cri_lines(&f, "b", n, 100, "stdout"));
    n += 100;
    std::thread::sleep(Duration::from_secs(30));
    assert!(loki.seqs().len() <= 200, "nothing was accepted during the outage");
    loki.fail.store(0, Ordering::SeqCst);
    expect_exactly_once(&loki, &want, Duration::from_secs(90))?;

    // 429 with `Retry-After: 2` is retried, after 2 s rather than the 0.1 s backoff: in 3 s a
    // batch is tried at most twice (the backoff alone would try it 6 times).
    *loki.pushes.lock().unwrap() = 0;
    loki.fail.store(429, Ordering::SeqCst);
    want.extend(cri_lines(&f, "b", n, 50, "stdout"));
    n += 50;
    std::thread::sleep(Duration::from_secs(3));
    loki.fail.store(0, Ordering::SeqCst);
    let tries = *loki.pushes.lock().unwrap();
    assert!(agent.metric("sre_agent_remote_pushes_retried_total", "loki-")? >= 1.0);
    assert!(
        (1..=4).contains(&tries),
        "Retry-After is honoured: {tries} pushes in 3 s"
    );
    expect_exactly_once(&loki, &want, Duration::from_secs(60))?;

    // A reload that changes the logs section: tailing stops at a line boundary and resumes.
    let cfg = config(&loki, &root, "      external_labels: {cluster: lab}\n");
    std::fs::write(&agent.config, cfg)?;
    want.extend(cri_lines(&f, "b", n, 100, "stdout"));
    n += 100;
    let (code, body) = http_post(&format!("{}/-/reload", agent.url))?;
    assert_eq!(code, 200, "{body}");
    want.extend(cri_lines(&f, "b", n, 100, "stdout"));
    expect_exactly_once(&loki, &want, Duration::from_secs(60))?;
    let last = loki
        .entries()
        .into_iter()
        .find(|g| g.line.contains(&format!("seq=b-{} ", n + 99)))
        .unwrap();
    assert_eq!(last.labels.get("cluster").map(String::as_str), Some("lab"));
    expect_pod_labels(&loki, "ns", "busy-0", "c");
    Ok(())
}

#[test]
fn kill_9_repeats_only_unanswered_pushes_and_a_400_is_dropped_with_its_reason() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("pods");
    let loki = Loki::start()?;
    let f = pod_dir(&root, "ns", "crash-0", "c").join("0.log");
    let mut want = cri_lines(&f, "k", 0, 2000, "stdout");
    let mut agent = Agent::start(dir.path(), &config(&loki, &root, ""))?;
    expect_exactly_once(&loki, &want, Duration::from_secs(60))?;
    // An outage builds a backlog in the WAL, then kill -9 while it is there.
    loki.fail.store(503, Ordering::SeqCst);
    want.extend(cri_lines(&f, "k", 2000, 3000, "stdout"));
    std::thread::sleep(Duration::from_secs(2));
    agent.proc.signal("KILL")?;
    loki.fail.store(0, Ordering::SeqCst);
    want.extend(cri_lines(&f, "k", 5000, 500, "stdout"));
    let mut agent = Agent::start_with(dir.path(), agent.config.clone(), agent.storage.clone(), agent.port)?;
    poll(
        "every line at least once after kill -9",
        Duration::from_secs(60),
        || {
            let seqs = loki.seqs();
            Ok(want.iter().all(|(s, _)| seqs.contains_key(s)).then_some(()))
        },
    )?;
    // The outage answered every push, so nothing was unanswered at the kill: no repeats.
    let dups = loki.seqs().values().filter(|n| **n > 1).count();
    assert_eq!(dups, 0, "only unanswered pushes may repeat");

    // A 400 drops the push's entries and counts the reason.
    *loki.pushes.lock().unwrap() = 0;
    loki.fail.store(400, Ordering::SeqCst);
    cri_lines(&f, "k", 5500, 10, "stdout");
    poll("the 400 was counted", Duration::from_secs(30), || {
        let v = agent.metric("sre_agent_remote_samples_dropped_total", "reason=\"http_4xx\"")?;
        Ok((v >= 10.0).then_some(()))
    })?;
    loki.fail.store(0, Ordering::SeqCst);
    let later = cri_lines(&f, "k", 5510, 10, "stdout");
    want.extend(later);
    poll("later lines arrive", Duration::from_secs(30), || {
        let seqs = loki.seqs();
        Ok(want.iter().all(|(s, _)| seqs.contains_key(s)).then_some(()))
    })?;

    // Loki stores pushes but has not answered them when the agent dies: those, and only
    // those, are sent again after the restart.
    loki.hold.store(true, Ordering::SeqCst);
    want.extend(cri_lines(&f, "k", 6000, 500, "stdout"));
    poll("a push is stored and unanswered", Duration::from_secs(30), || {
        Ok((!loki.unanswered.lock().unwrap().is_empty()).then_some(()))
    })?;
    agent.proc.signal("KILL")?;
    let held: HashSet<String> = loki.unanswered.lock().unwrap().clone();
    loki.hold.store(false, Ordering::SeqCst);
    let agent = Agent::start_with(dir.path(), agent.config.clone(), agent.storage.clone(), agent.port)?;
    poll(
        "every line at least once after the second kill",
        Duration::from_secs(60),
        || {
            let seqs = loki.seqs();
            Ok(want.iter().all(|(s, _)| seqs.contains_key(s)).then_some(()))
        },
    )?;
    let repeated: HashSet<String> = loki
        .seqs()
        .into_iter()
        .filter(|(_, n)| *n > 1)
        .map(|(s, _)| s)
        .collect();
    assert!(!repeated.is_empty(), "the unanswered pushes were sent again");
    let other: Vec<_> = repeated.difference(&held).take(10).collect();
    assert!(
        other.is_empty(),
        "only unanswered pushes repeat; also repeated: {other:?}"
    );
    expect_pod_labels(&loki, "ns", "crash-0", "c");
    drop(agent);
    Ok(())
}

#[test]
fn removing_a_scrape_config_commits_its_position_and_adding_it_back_resumes_there() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("pods");
    let loki = Loki::start()?;
    let f = pod_dir(&root, "ns", "keep-0", "c").join("0.log");
    let app = dir.path().join("app.log");
    let plain = |from: u64, count: u64| -> Vec<(String, i64)> {
        let text: String = (from..from + count)
            .map(|n| format!("plain seq=a-{n} line\n"))
            .collect();
        append(&app, &text);
        (from..from + count).map(|n| (format!("a-{n}"), 0)).collect()
    };
    let with_app = format!(
        "{}    - job_name: app\n      static_configs: [{{labels: {{job: app, __path__: {}}}}}]\n",
        config(&loki, &root, ""),
        app.display()
    );
    let mut want = cri_lines(&f, "k", 0, 100, "stdout");
    want.extend(plain(0, 100));
    let agent = Agent::start(dir.path(), &with_app)?;
    expect_exactly_once(&loki, &want, Duration::from_secs(60))?;

    // Removed: its file is no longer tailed; the pods job goes on.
    std::fs::write(&agent.config, config(&loki, &root, ""))?;
    let (code, body) = http_post(&format!("{}/-/reload", agent.url))?;
    assert_eq!(code, 200, "{body}");
    poll("app.log no longer tailed", Duration::from_secs(30), || {
        let files = http_get(&format!("{}/api/v1/files", agent.url))?;
        Ok((!files.contains("app.log")).then_some(()))
    })?;
    let unread = plain(100, 50);
    want.extend(cri_lines(&f, "k", 100, 50, "stdout"));
    expect_exactly_once(&loki, &want, Duration::from_secs(60))?;
    assert!(
        !loki.seqs().contains_key("a-100"),
        "a removed scrape config reads nothing"
    );

    // Added back: it resumes where it stopped (nothing repeated, nothing skipped).
    std::fs::write(&agent.config, &with_app)?;
    let (code, body) = http_post(&format!("{}/-/reload", agent.url))?;
    assert_eq!(code, 200, "{body}");
    want.extend(unread);
    expect_exactly_once(&loki, &want, Duration::from_secs(60))?;
    let a = loki
        .entries()
        .into_iter()
        .find(|g| g.line.contains("seq=a-120 "))
        .unwrap();
    assert_eq!(a.labels["job"], "app");
    expect_pod_labels(&loki, "ns", "keep-0", "c");
    Ok(())
}

#[test]
fn static_configs_with_a_pipeline_and_a_promtail_positions_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let loki = Loki::start()?;
    let logs = dir.path().join("var/log/app");
    std::fs::create_dir_all(logs.join("nested"))?;
    let a = logs.join("a.log");
    let b = logs.join("nested/b.log");
    let mut text = String::new();
    for n in 0..100 {
        text.push_str(&format!(
            "{{\"level\":\"{}\",\"msg\":\"seq=s-{n} done\",\"tenant\":\"t{}\"}}\n",
            if n % 2 == 0 { "info" } else { "debug" },
            n % 2
        ));
    }
    append(&a, &text);
    append(&b, "plain seq=b-0 line\nplain seq=b-1 line\n");
    // Promtail left b.log at its second line.
    let positions = dir.path().join("positions.yaml");
    std::fs::write(&positions, format!("positions:\n  {}: \"19\"\n", b.display()))?;
    let cfg = format!(
        "logs:\n  positions: {{filename: {}}}\n  clients: [{{url: {}, batchwait: 100ms, batchsize: 2KiB, tenant_id: base}}]\n  scrape_configs:\n    - job_name: files\n      static_configs:\n        - targets: [localhost]\n          labels: {{job: files, __path__: '{}/**/*.log'}}\n      pipeline_stages:\n        - json:\n            expressions: {{level: , msg: , tenant: }}\n        - labels: {{level: }}\n        - match:\n            selector: '{{level=\"debug\"}}'\n            action: drop\n            drop_counter_reason: debug\n        - tenant: {{source: tenant}}\n        - output: {{source: msg}}\n",
        positions.display(),
        loki.url(),
        logs.display()
    );
    let agent = Agent::start(dir.path(), &cfg)?;
    let want: Vec<(String, i64)> = (0..100)
        .step_by(2)
        .map(|n| (format!("s-{n}"), 0))
        .chain([("b-1".to_owned(), 0)])
        .collect();
    expect_exactly_once(&loki, &want, Duration::from_secs(60))?;
    let all = loki.entries();
    assert!(!loki.seqs().contains_key("b-0"), "the Promtail position was honoured");
    let s = all.iter().find(|g| g.line == "seq=s-2 done").unwrap();
    assert_eq!(s.labels["level"], "info");
    assert_eq!(s.labels["job"], "files");
    assert_eq!(
        s.labels["filename"],
        a.display().to_string(),
        "static configs get a filename label"
    );
    assert_eq!(s.tenant, "t0");
    let b1 = all.iter().find(|g| g.line.contains("seq=b-1")).unwrap();
    assert_eq!(b1.tenant, "base");
    assert_eq!(agent.metric("sre_agent_logs_entries_dropped_total", "debug")?, 50.0);
    let largest = *loki.largest.lock().unwrap();
    assert!(largest <= 2048 + 300, "batchsize bounds a push's bytes: {largest}");
    // Positions are saved in Promtail's layout (plus identities).
    poll("positions saved", Duration::from_secs(20), || {
        let text = std::fs::read_to_string(&positions).unwrap_or_default();
        Ok((text.contains("positions:") && text.contains(&format!("\"{}\": \"38\"", b.display()))).then_some(text))
    })?;
    Ok(())
}

#[test]
fn a_full_wal_pauses_reading_and_evicts_nothing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("pods");
    let loki = Loki::start()?;
    loki.fail.store(500, Ordering::SeqCst);
    let f = pod_dir(&root, "ns", "flood-0", "c").join("0.log");
    // About 5 MiB of WAL records for a WAL bounded at 2 MiB.
    let want = cri_lines(&f, "w", 0, 30_000, "stdout");
    let cfg = format!("{}storage:\n  wal_max_size: 2MiB\n", config(&loki, &root, ""));
    let agent = Agent::start(dir.path(), &cfg)?;
    poll("reading paused on the full WAL", Duration::from_secs(30), || {
        let v = agent.metric("sre_agent_logs_reading_paused_total", "")?;
        Ok((v > 0.0).then_some(()))
    })?;
    let wal_bytes: u64 = std::fs::read_dir(agent.storage.join("logs"))?
        .flatten()
        .flat_map(|d| std::fs::read_dir(d.path()).into_iter().flatten().flatten())
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum();
    assert!(wal_bytes <= 2 << 20, "the WAL stays within its bound: {wal_bytes}");
    loki.fail.store(0, Ordering::SeqCst);
    expect_exactly_once(&loki, &want, Duration::from_secs(90))?;
    assert_eq!(agent.metric("sre_agent_logs_lost_bytes_total", "")?, 0.0);
    Ok(())
}

#[test]
fn files_rotated_faster_than_a_scan_and_while_the_agent_is_down_are_read() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("pods");
    let loki = Loki::start()?;
    let f = pod_dir(&root, "ns", "fast-0", "c").join("0.log");
    let mut want = cri_lines(&f, "r", 0, 50, "stdout");
    let mut agent = Agent::start(dir.path(), &config(&loki, &root, ""))?;
    expect_exactly_once(&loki, &want, Duration::from_secs(60))?;
    // Twenty files written and rotated away in a burst: most are never seen at the live path.
    let mut n = 50;
    for r in 0..20 {
        std::fs::rename(&f, f.with_extension(format!("log.2026010{r:02}-000000")))?;
        want.extend(cri_lines(&f, "r", n, 100, "stdout"));
        n += 100;
    }
    expect_exactly_once(&loki, &want, Duration::from_secs(60))?;
    // Stopped, the file grows and is rotated twice, then the agent comes back.
    agent.proc.signal("TERM")?;
    want.extend(cri_lines(&f, "r", n, 100, "stdout"));
    n += 100;
    std::fs::rename(&f, f.with_extension("log.20260201-000000"))?;
    want.extend(cri_lines(&f, "r", n, 100, "stdout"));
    n += 100;
    std::fs::rename(&f, f.with_extension("log.20260201-000001"))?;
    want.extend(cri_lines(&f, "r", n, 100, "stdout"));
    n += 100;
    agent = Agent::start_with(dir.path(), agent.config.clone(), agent.storage.clone(), agent.port)?;
    expect_exactly_once(&loki, &want, Duration::from_secs(60))?;

    // Stopped again: the file grows, is rotated and compressed (kubelet gzips older rotated
    // files) before the agent is back. Its unread end is read from the compressed file; an
    // old compressed file the agent never read stays unread, as with Promtail.
    agent.proc.signal("TERM")?;
    want.extend(cri_lines(&f, "r", n, 100, "stdout"));
    n += 100;
    let rotated = f.with_extension("log.20260301-000000");
    std::fs::rename(&f, &rotated)?;
    let gz = |p: &Path| -> Result<()> {
        let st = std::process::Command::new("gzip").arg(p).status()?;
        anyhow::ensure!(st.success(), "gzip {}", p.display());
        Ok(())
    };
    gz(&rotated)?;
    let old = f.with_extension("log.20250101-000000");
    cri_lines(&old, "old", 0, 20, "stdout");
    gz(&old)?;
    want.extend(cri_lines(&f, "r", n, 100, "stdout"));
    let agent = Agent::start_with(dir.path(), agent.config.clone(), agent.storage.clone(), agent.port)?;
    if let Err(e) = expect_exactly_once(&loki, &want, Duration::from_secs(60)) {
        eprintln!("{}", std::fs::read_to_string(&agent.proc.log).unwrap_or_default());
        return Err(e);
    }
    assert!(
        !loki.seqs().keys().any(|s| s.starts_with("old-")),
        "a compressed file never read is left alone"
    );
    // A restart does not read the compressed file again.
    let mut agent = agent;
    agent.proc.signal("TERM")?;
    want.extend(cri_lines(&f, "r", n + 100, 10, "stdout"));
    let agent = Agent::start_with(dir.path(), agent.config.clone(), agent.storage.clone(), agent.port)?;
    expect_exactly_once(&loki, &want, Duration::from_secs(60))?;
    drop(agent);
    Ok(())
}

#[test]
fn relabel_configs_and_per_job_cri_limits_apply_to_kubernetes_pods() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("pods");
    let loki = Loki::start()?;
    let kept = pod_dir(&root, "shop", "web-0", "app").join("0.log");
    let noisy = pod_dir(&root, "noisy", "spam-0", "app").join("0.log");
    let (t, _) = cri_time(1);
    // Five parts of one message, interleaved with stderr lines; a 5 KiB line.
    append(
        &kept,
        &format!(
            "{t} stdout P a1-\n{t} stderr F err seq=e-1\n{t} stdout P a2-\n{t} stdout P a3-\n{t} stderr P err2-\n{t} stdout P a4-\n{t} stdout F a5 seq=m-1\n{t} stderr F tail seq=e-2\n{t} stdout F big seq=big {}\n",
            "y".repeat(5000)
        ),
    );
    append(&noisy, &format!("{t} stdout F never seq=n-1\n"));
    let cfg = format!(
        "logs:\n  clients: [{{url: {}, batchwait: 100ms}}]\n  scrape_configs:\n    - job_name: pods\n      kubernetes_pods: {{root: {}}}\n      relabel_configs:\n        - source_labels: [namespace]\n          regex: noisy\n          action: drop\n        - source_labels: [__meta_kubernetes_pod_uid]\n          target_label: uid_tag\n      pipeline_stages:\n        - cri: {{max_partial_lines: 2, max_partial_line_size: 1KiB}}\n",
        loki.url(),
        root.display()
    );
    let _agent = Agent::start(dir.path(), &cfg)?;
    poll("the big line", Duration::from_secs(30), || {
        Ok(loki.entries().into_iter().find(|g| g.line.contains("seq=big")))
    })?;
    let all = loki.entries();
    let lines: Vec<&str> = all.iter().map(|g| g.line.as_str()).collect();
    // stdout parts merged two at a time, never with stderr's.
    assert!(lines.contains(&"a1-a2-"), "{lines:?}");
    assert!(lines.contains(&"a3-a4-"), "{lines:?}");
    assert!(lines.contains(&"a5 seq=m-1"), "{lines:?}");
    assert!(lines.contains(&"err seq=e-1"), "{lines:?}");
    assert!(lines.contains(&"err2-tail seq=e-2"), "{lines:?}");
    let big = all.iter().find(|g| g.line.contains("seq=big")).unwrap();
    assert_eq!(big.line.len(), 1024, "cut at max_partial_line_size");
    assert!(
        !lines.iter().any(|l| l.contains("seq=n-1")),
        "the relabel drop keeps the noisy pod out"
    );
    assert_eq!(
        big.labels["uid_tag"], "uid-web-0",
        "relabel_configs see __meta_kubernetes_pod_uid"
    );
    Ok(())
}

/// The same kind of tree shipped to a real Loki, when `SRE_LAB_LOKI_BIN` names its binary (no
/// registry ships one): every line is queried back from Loki with its labels.
#[test]
fn a_real_loki_stores_every_line_once_when_its_binary_is_given() -> Result<()> {
    let Some(bin) = std::env::var_os("SRE_LAB_LOKI_BIN") else {
        eprintln!("SKIPPED: SRE_LAB_LOKI_BIN is not set (no Loki binary on this machine); the decoding receiver tests stand in");
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let (port, grpc) = (sre_lab_tests::free_port(), sre_lab_tests::free_port());
    let data = dir.path().join("loki");
    let cfg = format!(
        "auth_enabled: false\nserver:\n  http_listen_address: 127.0.0.1\n  http_listen_port: {port}\n  grpc_listen_address: 127.0.0.1\n  grpc_listen_port: {grpc}\ncommon:\n  instance_addr: 127.0.0.1\n  path_prefix: {d}\n  storage:\n    filesystem:\n      chunks_directory: {d}/chunks\n      rules_directory: {d}/rules\n  replication_factor: 1\n  ring:\n    kvstore:\n      store: inmemory\nschema_config:\n  configs:\n    - from: 2020-10-24\n      store: tsdb\n      object_store: filesystem\n      schema: v13\n      index:\n        prefix: index_\n        period: 24h\nlimits_config:\n  reject_old_samples: false\n  allow_structured_metadata: true\n",
        d = data.display()
    );
    std::fs::write(dir.path().join("loki.yml"), cfg)?;
    let mut cmd = std::process::Command::new(bin);
    cmd.arg(format!("-config.file={}", dir.path().join("loki.yml").display()));
    let _loki = sre_lab_tests::Proc::spawn("loki", cmd, dir.path().join("loki.log"))?;
    let base = format!("http://127.0.0.1:{port}");
    poll("loki ready", Duration::from_secs(60), || {
        Ok(http_get(&format!("{base}/ready")).ok().map(|_| ()))
    })?;
    let root = dir.path().join("pods");
    let mut want = Vec::new();
    // Recent times: Loki's queriers ask ingesters only about the last hours.
    let base_ns = jiff::Timestamp::now().as_nanosecond() as i64 - 60_000_000_000;
    for p in 0..3 {
        let f = pod_dir(&root, "shop", &format!("real-{p}"), "app").join("0.log");
        let mut text = String::new();
        for n in 0..200i64 {
            let ns = base_ns + n * 1_000_000 + p;
            let t = jiff::Timestamp::from_nanosecond(i128::from(ns)).unwrap();
            text.push_str(&format!("{t:.9} stdout F hello seq=q{p}-{n}\n"));
            want.push((format!("q{p}-{n}"), ns));
        }
        append(&f, &text);
    }
    let cfg = format!(
        "logs:\n  clients: [{{url: {base}/loki/api/v1/push, batchwait: 100ms}}]\n  scrape_configs:\n    - job_name: pods\n      kubernetes_pods: {{root: {}}}\n",
        root.display()
    );
    let _agent = Agent::start(dir.path(), &cfg)?;
    let (start, end) = (
        want.iter().map(|w| w.1).min().unwrap_or(0) - 1,
        want.iter().map(|w| w.1).max().unwrap_or(0) + 1,
    );
    let counts = poll("every line queryable in Loki", Duration::from_secs(60), || {
        let url = format!(
            "{base}/loki/api/v1/query_range?query={}&start={start}&end={end}&limit=5000&direction=forward",
            sre_lab_tests::urlencode("{namespace=\"shop\"}")
        );
        let v: serde_json::Value = serde_json::from_str(&http_get(&url)?)?;
        let mut counts: HashMap<String, usize> = HashMap::new();
        for stream in v["data"]["result"].as_array().cloned().unwrap_or_default() {
            assert_eq!(stream["stream"]["container"], "app");
            for value in stream["values"].as_array().cloned().unwrap_or_default() {
                let line = value[1].as_str().unwrap_or_default();
                if let Some(s) = line.split_whitespace().find_map(|w| w.strip_prefix("seq=")) {
                    *counts.entry(s.to_owned()).or_insert(0) += 1;
                }
            }
        }
        Ok(want.iter().all(|(s, _)| counts.contains_key(s)).then_some(counts))
    })?;
    assert!(counts.values().all(|n| *n == 1), "every line once in Loki");
    Ok(())
}

#[test]
fn sigterm_exits_0_within_30_s_while_loki_fails_and_the_rest_stays_in_the_wal() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("pods");
    let loki = Loki::start()?;
    loki.fail.store(503, Ordering::SeqCst);
    let f = pod_dir(&root, "ns", "term-0", "c").join("0.log");
    let mut want = cri_lines(&f, "t", 0, 500, "stdout");
    let cfg = format!("{}storage:\n  shutdown_timeout: 5s\n", config(&loki, &root, ""));
    let mut agent = Agent::start(dir.path(), &cfg)?;
    poll("lines in the WAL", Duration::from_secs(30), || {
        let v = agent.metric("sre_agent_logs_entries_written_total", "")?;
        Ok((v >= 500.0).then_some(()))
    })?;
    let started = std::time::Instant::now();
    let status = agent.proc.signal("TERM")?.expect("exited");
    assert!(status.success(), "exit status {status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "stopped in {:?}",
        started.elapsed()
    );
    // Started again with Loki healthy: the WAL's lines go out, none read twice.
    loki.fail.store(0, Ordering::SeqCst);
    want.extend(cri_lines(&f, "t", 500, 10, "stdout"));
    let _agent = Agent::start_with(dir.path(), agent.config.clone(), agent.storage.clone(), agent.port)?;
    expect_exactly_once(&loki, &want, Duration::from_secs(60))?;
    Ok(())
}

#[test]
fn more_files_than_max_open_files_are_read_in_turns() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("pods");
    let loki = Loki::start()?;
    let files: Vec<PathBuf> = (0..5)
        .map(|p| pod_dir(&root, "ns", &format!("many-{p}"), "c").join("0.log"))
        .collect();
    let mut want = Vec::new();
    for (p, f) in files.iter().enumerate() {
        want.extend(cri_lines(f, &format!("m{p}"), 0, 100, "stdout"));
    }
    let cfg = config(&loki, &root, "").replace("logs:\n", "logs:\n  max_open_files: 2\n  rescan_interval: 200ms\n");
    let agent = Agent::start(dir.path(), &cfg)?;
    if let Err(e) = expect_exactly_once(&loki, &want, Duration::from_secs(60)) {
        eprintln!("{}", std::fs::read_to_string(&agent.proc.log).unwrap_or_default());
        return Err(e);
    }
    // Every file grows again: each gets its turn, from where it was left.
    for (p, f) in files.iter().enumerate() {
        want.extend(cri_lines(f, &format!("m{p}"), 100, 50, "stdout"));
    }
    expect_exactly_once(&loki, &want, Duration::from_secs(60))?;
    let files: serde_json::Value = serde_json::from_str(&http_get(&format!("{}/api/v1/files", agent.url))?)?;
    assert!(files.as_array().unwrap().len() <= 2, "at most 2 open: {files}");
    assert!(agent.metric("sre_agent_logs_file_turns_total", "pods")? >= 3.0);
    Ok(())
}

#[test]
fn start_at_end_skips_only_what_was_there_at_the_first_start() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("pods");
    let loki = Loki::start()?;
    let f = pod_dir(&root, "ns", "pre-0", "c").join("0.log");
    cri_lines(&f, "old", 0, 50, "stdout");
    let cfg = format!("{}      start_at: end\n", config(&loki, &root, ""));
    let agent = Agent::start(dir.path(), &cfg)?;
    poll(
        "the existing file is tailed from its end",
        Duration::from_secs(30),
        || {
            let files: serde_json::Value = serde_json::from_str(&http_get(&format!("{}/api/v1/files", agent.url))?)?;
            let at_end = files
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["offset"] == r["size"] && r["size"].as_u64() > Some(0));
            Ok(at_end.then_some(()))
        },
    )?;
    // New lines of that file, and a file that appears later (read from its start).
    let mut want = cri_lines(&f, "new", 0, 20, "stdout");
    let late = pod_dir(&root, "ns", "late-0", "c").join("0.log");
    want.extend(cri_lines(&late, "late", 0, 20, "stdout"));
    expect_exactly_once(&loki, &want, Duration::from_secs(60))?;
    assert!(
        !loki.seqs().keys().any(|s| s.starts_with("old-")),
        "start_at: end skipped the old lines"
    );
    Ok(())
}
