//! Exactly-once delivery under a slow, flaky receiver: every (series, timestamp) the agent
//! scraped reaches the receiver in exactly one accepted push, while shards move between 1 and
//! 8, pushes wait a random time, some are answered 500 or 429 with `Retry-After`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent::remote_write::proto::{self, WriteRequest};
use anyhow::{bail, Result};
use prost::Message;
use sre_lab_tests::{poll, Agent, TinyServer};

/// A small deterministic generator (xorshift64*), seeded per test so failures reproduce.
pub struct Rng(AtomicU64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(AtomicU64::new(seed | 1))
    }

    /// A number in `0..n`.
    pub fn below(&self, n: u64) -> u64 {
        let mut x = self.0.load(Ordering::Relaxed);
        loop {
            let mut y = x;
            y ^= y >> 12;
            y ^= y << 25;
            y ^= y >> 27;
            match self.0.compare_exchange(x, y, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return y.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1),
                Err(now) => x = now,
            }
        }
    }
}

/// What an accepting receiver has: how often each (series, timestamp) arrived in a 2xx push.
#[derive(Default)]
pub struct Delivered {
    pub counts: HashMap<(String, i64), u32>,
    pub pushes: u64,
    pub rejected: u64,
}

impl Delivered {
    pub fn record(&mut self, body: &[u8]) {
        let mut raw = Vec::new();
        let Ok(wr) = proto::decompress(body, 256 << 20, &mut raw).map(|_| WriteRequest::decode(raw.as_slice())) else {
            return;
        };
        let Ok(wr) = wr else { return };
        self.pushes += 1;
        for ts in wr.timeseries {
            let mut key = String::new();
            for l in &ts.labels {
                key.push_str(&l.name);
                key.push('=');
                key.push_str(&l.value);
                key.push(',');
            }
            for s in ts.samples {
                *self.counts.entry((key.clone(), s.timestamp)).or_default() += 1;
            }
        }
    }

    /// (series, timestamp) pairs that arrived more than once, with a few examples.
    pub fn duplicates(&self) -> (usize, Vec<String>) {
        let dups: Vec<_> = self.counts.iter().filter(|(_, &n)| n > 1).collect();
        let examples = dups
            .iter()
            .take(5)
            .map(|((k, t), n)| format!("{k} @{t} ×{n}"))
            .collect();
        (dups.len(), examples)
    }

    /// Distinct scrape timestamps of `up`.
    pub fn scrapes(&self) -> usize {
        self.counts
            .keys()
            .filter(|(k, _)| k.starts_with("__name__=up,"))
            .count()
    }
}

/// A page of `n` series.
pub fn page(n: usize) -> Vec<u8> {
    let mut s = String::new();
    for i in 0..n {
        s.push_str(&format!("stress_series{{idx=\"{i}\"}} {i}\n"));
    }
    s.into_bytes()
}

/// Starts a receiver that waits `0..max_delay_ms` before each answer, answers `fail_pct`% of
/// pushes 500 and `throttle_pct`% 429 with `Retry-After: 1`, and records the accepted ones.
pub fn flaky_receiver(
    seed: u64,
    max_delay_ms: u64,
    fail_pct: u64,
    throttle_pct: u64,
) -> Result<(TinyServer, Arc<Mutex<Delivered>>)> {
    let delivered: Arc<Mutex<Delivered>> = Arc::default();
    let d2 = delivered.clone();
    let rng = Arc::new(Rng::new(seed));
    let server = TinyServer::start(move |req| {
        std::thread::sleep(Duration::from_millis(rng.below(max_delay_ms + 1)));
        let roll = rng.below(100);
        if roll < fail_pct {
            d2.lock().unwrap().rejected += 1;
            return (500, vec![], b"injected failure".to_vec());
        }
        if roll < fail_pct + throttle_pct {
            d2.lock().unwrap().rejected += 1;
            return (429, vec![("Retry-After".into(), "1".into())], b"slow down".to_vec());
        }
        d2.lock().unwrap().record(&req.body);
        (200, vec![], Vec::new())
    })?;
    Ok((server, delivered))
}

pub fn stress_config(target: &str, receiver: &str) -> String {
    format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\nscrape_configs:\n  - job_name: stress\n    static_configs:\n      - targets: ['{target}']\nremote_write:\n  - url: http://{receiver}/api/v1/write\n    queue_config:\n      min_shards: 1\n      max_shards: 8\n      batch_send_deadline: 200ms\n      min_backoff: 30ms\n      max_backoff: 1s\n"
    )
}

/// The stress run, shortened: 2000 series at 1 s, pushes answered after 0–2 s, 20 %
/// answered 500, 5 % 429; every sample arrives exactly once and shards move.
#[test]
fn slow_flaky_receiver_gets_every_sample_exactly_once() -> Result<()> {
    let body = page(2000);
    let target = TinyServer::start(move |_| (200, vec![], body.clone()))?;
    let (receiver, delivered) = flaky_receiver(0x5eed_0001, 2000, 20, 5)?;
    let dir = tempfile::tempdir()?;
    let agent = Agent::start(dir.path(), &stress_config(&target.addr, &receiver.addr))?;
    let run = Duration::from_secs(40);
    std::thread::sleep(run);
    // Stop scraping and let the queue drain: SIGTERM sends what it can within the shutdown
    // timeout; the receiver has then seen every scrape that was accepted.
    let mut agent = agent;
    agent.proc.signal("TERM")?;
    let log = agent.proc.log_text();
    let d = delivered.lock().unwrap();
    let (n, examples) = d.duplicates();
    if n > 0 {
        bail!(
            "{n} (series, timestamp) pairs delivered more than once, e.g. {examples:?}\n{}",
            log.lines()
                .filter(|l| l.contains("harding") || l.contains("WARN"))
                .take(40)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    let scrapes = d.scrapes();
    assert!(scrapes >= 20, "only {scrapes} scrapes delivered in {run:?}");
    Ok(())
}

/// The compliance suite's Ordering case: the receiver waits a random 0–5 s before each answer;
/// every series' samples arrive in increasing timestamp order, none twice.
#[test]
fn ordering_with_random_answer_delay() -> Result<()> {
    let target = TinyServer::start(|_| (200, vec![], b"# TYPE test_counter counter\ntest_counter 1\n".to_vec()))?;
    let order: Arc<Mutex<Vec<(String, i64)>>> = Arc::default();
    let o2 = order.clone();
    let rng = Arc::new(Rng::new(0x0bde_2001));
    let receiver = TinyServer::start(move |req| {
        std::thread::sleep(Duration::from_millis(rng.below(5001)));
        let mut raw = Vec::new();
        if proto::decompress(&req.body, 64 << 20, &mut raw).is_ok() {
            if let Ok(wr) = WriteRequest::decode(raw.as_slice()) {
                let mut o = o2.lock().unwrap();
                for ts in wr.timeseries {
                    let name = ts.labels.iter().find(|l| l.name == "__name__").map(|l| l.value.clone());
                    for s in ts.samples {
                        o.push((name.clone().unwrap_or_default(), s.timestamp));
                    }
                }
            }
        }
        (200, vec![], Vec::new())
    })?;
    let dir = tempfile::tempdir()?;
    let agent = Agent::start(
        dir.path(),
        &format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: ordering\n    static_configs:\n      - targets: ['{}']\nremote_write:\n  - url: http://{}/api/v1/write\n    queue_config:\n      batch_send_deadline: 100ms\n",
            target.addr, receiver.addr
        ),
    )?;
    poll("12 samples of test_counter", Duration::from_secs(60), || {
        let n = order
            .lock()
            .unwrap()
            .iter()
            .filter(|(n, _)| n == "test_counter")
            .count();
        Ok((n >= 12).then_some(()))
    })
    .map_err(|e| e.context(agent.proc.log_text()))?;
    let o = order.lock().unwrap();
    let mut last: HashMap<&str, i64> = HashMap::new();
    for (name, ts) in o.iter() {
        if let Some(prev) = last.get(name.as_str()) {
            assert!(
                ts > prev,
                "{name}: sample at {ts} arrived after {prev} (out of order or twice)"
            );
        }
        last.insert(name, *ts);
    }
    Ok(())
}
