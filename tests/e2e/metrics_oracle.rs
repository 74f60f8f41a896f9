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
        // Polled: on a loaded machine one side may time out a scrape now and then.
        let mut last = (None, None);
        poll(&format!("same value of {q}"), Duration::from_secs(20), || {
            let a = value(&receiver, q)?;
            let b = value(&oracle, q)?;
            let same = a.is_some() && (q.contains("scrape_samples") || a == b);
            last = (a, b);
            Ok(same.then_some(()))
        })
        .map_err(|e| e.context(format!("receiver vs oracle: {last:?}")))?;
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

const OPENMETRICS_PAGE: &str = r#"# TYPE om_requests counter
# HELP om_requests Requests.
om_requests_total{path="/a"} 12 # {trace_id="abc"} 1.0 1700000000.000
om_requests_created{path="/a"} 1.7e9
# TYPE om_latency histogram
om_latency_bucket{le="0.1"} 2
om_latency_bucket{le="1.0"} 5
om_latency_bucket{le="+Inf"} 6
om_latency_sum 3.5
om_latency_count 6
# TYPE om_temp_celsius gauge
# UNIT om_temp_celsius celsius
om_temp_celsius{room="a \"quoted\" \\ value"} -4.5
# TYPE om_build info
om_build_info{version="1.2.3"} 1
# TYPE om_state stateset
om_state{om_state="on"} 1
om_state{om_state="off"} 0
# EOF
"#;

const TEXT_PAGE: &str = "# HELP edge_escapes A help with \\\\ and \\n.\n# TYPE edge_escapes gauge\n\
edge_escapes{v=\"line\\nbreak\",w=\"back\\\\slash\"} 1\n\
edge_special{kind=\"nan\"} NaN\nedge_special{kind=\"pinf\"} +Inf\nedge_special{kind=\"ninf\"} -Inf\n\
edge_trailing_comma{a=\"1\",} 2\nedge_exp 1.5e+3\n";

/// Prometheus and the agent scrape an OpenMetrics page and a text page full of edge cases;
/// the receiver must hold the same series and values as the oracle.
#[test]
fn openmetrics_and_text_edge_cases_match_prometheus() -> Result<()> {
    let om = sre_lab_tests::TinyServer::start(|req| {
        let om = req.header("accept").unwrap_or_default().contains("openmetrics");
        let ct = if om {
            "application/openmetrics-text; version=1.0.0; charset=utf-8"
        } else {
            "text/plain; version=0.0.4"
        };
        let body = if om { OPENMETRICS_PAGE } else { "wrong_format 1\n" };
        (200, vec![("Content-Type".into(), ct.into())], body.as_bytes().to_vec())
    })?;
    let text = sre_lab_tests::TinyServer::start(|_| (200, vec![], TEXT_PAGE.as_bytes().to_vec()))?;
    let scrape = format!(
        "scrape_configs:\n  - job_name: om\n    scrape_interval: 1s\n    static_configs:\n      - targets: ['{}']\n  - job_name: text\n    scrape_interval: 1s\n    static_configs:\n      - targets: ['{}']\n",
        om.addr, text.addr
    );
    let dir = tempfile::tempdir()?;
    let receiver = Prometheus::start(dir.path(), "receiver", RECEIVER, true)?;
    let oracle = Prometheus::start(
        dir.path(),
        "oracle",
        &format!("global:\n  scrape_interval: 1s\n{scrape}"),
        false,
    )?;
    let agent = Agent::start(
        dir.path(),
        &format!(
            "{scrape}remote_write:\n  - url: {}/api/v1/write\n    queue_config:\n      batch_send_deadline: 200ms\n",
            receiver.url
        ),
    )?;
    for job in ["om", "text"] {
        let sel = format!("{{job=\"{job}\"}}");
        let mut diff = String::new();
        poll(&format!("identical {job} series"), Duration::from_secs(30), || {
            let a = receiver.series(&sel)?;
            let b = oracle.series(&sel)?;
            let errors = sre_lab_tests::http_get(&format!("{}/api/v1/targets", oracle.url)).unwrap_or_default();
            diff = format!("receiver: {a:#?}\noracle: {b:#?}\noracle targets: {errors}");
            Ok((a == b && b.len() > 5).then_some(()))
        })
        .map_err(|e| e.context(diff.clone()).context(agent.proc.log_text()))?;
    }
    for q in [
        "om_requests_total",
        "om_requests_created",
        "om_latency_bucket{le=\"1.0\"}",
        "om_temp_celsius",
        "om_build_info",
        "om_state{om_state=\"off\"}",
        "edge_escapes",
        "edge_special{kind=\"pinf\"}",
        "edge_special{kind=\"ninf\"}",
        "edge_special{kind=\"nan\"}",
        "edge_trailing_comma",
        "edge_exp",
    ] {
        let a = value(&receiver, q)?;
        assert!(a.is_some(), "{q} missing in receiver");
        assert_eq!(a, value(&oracle, q)?, "{q}");
    }
    Ok(())
}
