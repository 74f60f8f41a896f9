//! The agent against an oracle: a real Prometheus scraping the same node_exporter with the same
//! `scrape_configs` must hold the same series as the receiver the agent writes to.

use std::time::Duration;

use anyhow::Result;
use sre_lab_tests::{poll, Agent, NodeExporter, Prometheus};

use crate::common::{agent_config, scrape_configs, RECEIVER};

fn value(p: &Prometheus, q: &str) -> Result<Option<String>> {
    let r = p.query(q)?;
    Ok(r.first().map(|s| s["value"][1].as_str().unwrap_or_default().to_owned()))
}

#[test]
fn same_series_and_values_as_prometheus_then_up_and_staleness() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let node = NodeExporter::start(dir.path())?;
    let receiver = Prometheus::start(dir.path(), "receiver", RECEIVER, true)?;
    let oracle = Prometheus::start(
        dir.path(),
        "oracle",
        &format!("global:\n  scrape_interval: 1s\n{}", scrape_configs(&node.addr)),
        false,
    )?;
    let sink = dir.path().join("sink.txt");
    let agent = Agent::start(dir.path(), &agent_config(&node.addr, &receiver, &sink))?;

    // Both have scraped a few times.
    for p in [&receiver, &oracle] {
        poll("scrapes in both", Duration::from_secs(60), || {
            Ok(value(p, "count_over_time(up{job=\"node\"}[1m])")?.filter(|v| v.parse::<f64>().unwrap_or(0.0) >= 3.0))
        })
        .map_err(|e| e.context(agent.proc.log_text()))?;
    }

    // Same series (names and label sets), synthetic series included, go_memstats dropped.
    let mut last_diff = String::new();
    let same = poll("identical series sets", Duration::from_secs(30), || {
        let a = receiver.series("{job=\"node\"}")?;
        let b = oracle.series("{job=\"node\"}")?;
        if a == b {
            return Ok(Some(a));
        }
        let only_a: Vec<_> = a.iter().filter(|s| !b.contains(s)).take(10).collect();
        let only_b: Vec<_> = b.iter().filter(|s| !a.contains(s)).take(10).collect();
        last_diff = format!("only in receiver: {only_a:#?}\nonly in oracle: {only_b:#?}");
        Ok(None)
    });
    let series = same.map_err(|e| e.context(last_diff.clone()))?;
    assert!(
        series.len() > 100,
        "node_exporter exposes hundreds of series, got {}",
        series.len()
    );
    for name in [
        "up",
        "scrape_duration_seconds",
        "scrape_samples_scraped",
        "scrape_samples_post_metric_relabeling",
        "scrape_series_added",
    ] {
        assert!(
            series.iter().any(|s| s.contains(&format!("__name__=\"{name}\""))),
            "{name} missing"
        );
    }
    assert!(
        !series.iter().any(|s| s.contains("go_memstats_")),
        "metric_relabel drop not applied"
    );
    assert!(
        series
            .iter()
            .all(|s| s.contains("env=\"e2e\"") && s.contains("port=\"p")),
        "target labels missing"
    );

    // Same values for stable series.
    for q in [
        "node_memory_MemTotal_bytes{job=\"node\"}",
        "node_uname_info{job=\"node\"}",
        "up{job=\"node\"}",
        "scrape_samples_post_metric_relabeling{job=\"node\"} > 0",
    ] {
        let a = value(&receiver, q)?;
        let b = value(&oracle, q)?;
        assert!(a.is_some(), "{q} missing in receiver");
        if !q.contains("scrape_samples") {
            assert_eq!(a, b, "{q}");
        }
    }

    // The target stops: up flips to 0 and its series go stale (absent from instant queries).
    drop(node);
    poll("up == 0 in receiver", Duration::from_secs(30), || {
        Ok(value(&receiver, "up{job=\"node\"}")?.filter(|v| v == "0"))
    })?;
    poll("series stale in receiver", Duration::from_secs(30), || {
        Ok(value(&receiver, "node_memory_MemTotal_bytes{job=\"node\"}")?
            .is_none()
            .then_some(()))
    })?;
    // The oracle agrees.
    poll("series stale in oracle", Duration::from_secs(30), || {
        Ok(value(&oracle, "node_memory_MemTotal_bytes{job=\"node\"}")?
            .is_none()
            .then_some(()))
    })?;
    assert!(agent.metric("sre_agent_scrape_failures_total", "job=\"node\"")? >= 1.0);
    Ok(())
}
