//! No data loss: a receiver outage of 30 s, and `kill -9` of the agent with a backlog in its WAL.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::Result;
use sre_lab_tests::{poll, Agent, NodeExporter, Prometheus};

use crate::common::{agent_config, sink_samples, stored_timestamps, RECEIVER};

const CHECKED: [&str; 3] = ["up", "scrape_duration_seconds", "node_memory_MemTotal_bytes"];

/// Every sample the agent wrote to its file sink up to the last one the receiver has must be in
/// the receiver.
fn assert_nothing_lost(receiver: &Prometheus, sink: &std::path::Path) -> Result<usize> {
    let scraped = sink_samples(sink, &CHECKED)?;
    let mut checked = 0;
    for (series, ts) in &scraped {
        let name = series.split('{').next().unwrap_or_default();
        let selector = format!("{name}{{job=\"node\"}}");
        let newest_sink = *ts.last().unwrap_or(&0);
        let stored = poll(
            &format!("{series} up to {newest_sink} in receiver"),
            Duration::from_secs(60),
            || {
                let s = stored_timestamps(receiver, &selector, "30m")?;
                Ok(s.contains(&newest_sink).then_some(s))
            },
        )?;
        let missing: BTreeSet<_> = ts.difference(&stored).collect();
        assert!(
            missing.is_empty(),
            "{series}: {} of {} samples missing, e.g. {:?}",
            missing.len(),
            ts.len(),
            missing.iter().take(5).collect::<Vec<_>>()
        );
        checked += ts.len();
    }
    Ok(checked)
}

#[test]
fn receiver_outage_of_30s_loses_nothing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let node = NodeExporter::start(dir.path())?;
    let receiver = Prometheus::start(dir.path(), "receiver", RECEIVER, true)?;
    let sink = dir.path().join("sink.txt");
    let agent = Agent::start(dir.path(), &agent_config(&node.addr, &receiver, &sink))?;
    poll("first samples", Duration::from_secs(30), || {
        Ok((!receiver.query("up{job=\"node\"}")?.is_empty()).then_some(()))
    })?;

    let stopped = receiver.stop()?;
    std::thread::sleep(Duration::from_secs(30)); // the outage itself
    let retried = agent.metric("sre_agent_remote_samples_retried_total", "")?;
    let receiver = stopped.restart()?;
    let checked = assert_nothing_lost(&receiver, &sink).map_err(|e| e.context(agent.proc.log_text()))?;
    assert!(checked >= 3 * 30, "expected at least 90 checked samples, got {checked}");
    assert!(retried > 0.0, "the outage must have caused retries");
    // Self-telemetry the issue lists: scrapes, samples sent/retried, queue and WAL size,
    // shards, send latency.
    let text = sre_lab_tests::http_get(&format!("{}/metrics", agent.url))?;
    for name in [
        "sre_agent_scrapes_total{",
        "sre_agent_scrape_duration_seconds_bucket{",
        "sre_agent_scraped_samples_total{",
        "sre_agent_wal_samples_appended_total{",
        "sre_agent_remote_samples_sent_total{",
        "sre_agent_remote_samples_retried_total{",
        "sre_agent_remote_send_duration_seconds_bucket{",
        "sre_agent_remote_shards{",
        "sre_agent_wal_size_bytes{",
        "sre_agent_wal_segments{",
        "sre_agent_wal_pending_records{",
        "sre_agent_targets{",
        "sre_agent_build_info{",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics");
    }
    assert_eq!(agent.metric("sre_agent_remote_samples_dropped_total", "")?, 0.0);
    Ok(())
}

#[test]
fn kill_9_with_backlog_then_restart_loses_nothing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let node = NodeExporter::start(dir.path())?;
    let receiver = Prometheus::start(dir.path(), "receiver", RECEIVER, true)?;
    let sink = dir.path().join("sink.txt");
    let mut agent = Agent::start(dir.path(), &agent_config(&node.addr, &receiver, &sink))?;
    poll("first samples", Duration::from_secs(30), || {
        Ok((!receiver.query("up{job=\"node\"}")?.is_empty()).then_some(()))
    })?;

    // Build a backlog: receiver down, agent keeps scraping into its WAL, then dies hard.
    let stopped = receiver.stop()?;
    poll("backlog of 5 scrapes", Duration::from_secs(30), || {
        Ok((agent.metric("sre_agent_scrapes_total", "job=\"node\"")? >= 8.0).then_some(()))
    })?;
    std::thread::sleep(Duration::from_secs(3));
    agent.proc.signal("KILL")?;
    let (config, storage, port) = (agent.config.clone(), agent.storage.clone(), agent.port);
    drop(agent);

    let receiver = stopped.restart()?;
    let agent = Agent::start_with(dir.path(), config, storage, port)?;
    let checked = assert_nothing_lost(&receiver, &sink).map_err(|e| e.context(agent.proc.log_text()))?;
    assert!(checked >= 15, "expected at least 15 checked samples, got {checked}");
    Ok(())
}
