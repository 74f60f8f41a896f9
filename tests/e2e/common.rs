//! Shared set-up for the e2e tests.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::Result;
use sre_lab_tests::Prometheus;

/// The scrape config used by both the agent and the oracle Prometheus.
pub fn scrape_configs(node_addr: &str) -> String {
    format!(
        r#"
scrape_configs:
  - job_name: node
    scrape_interval: 1s
    scrape_timeout: 1s
    static_configs:
      - targets: ['{node_addr}']
        labels:
          env: e2e
    relabel_configs:
      - source_labels: [__address__]
        regex: '127\.0\.0\.1:(\d+)'
        target_label: port
        replacement: 'p$1'
    metric_relabel_configs:
      - source_labels: [__name__]
        regex: 'go_memstats_.*'
        action: drop
"#
    )
}

/// Config of a receiver-only Prometheus.
pub const RECEIVER: &str = "global:\n  scrape_interval: 1m\n";

/// Agent config: the scrape configs, remote_write to `receiver`, a file sink.
pub fn agent_config(node_addr: &str, receiver: &Prometheus, sink: &Path) -> String {
    format!(
        "{}\nremote_write:\n  - url: {}/api/v1/write\n    queue_config:\n      batch_send_deadline: 200ms\n      min_backoff: 50ms\n      max_backoff: 1s\nfile_sink:\n  path: {}\n",
        scrape_configs(node_addr),
        receiver.url,
        sink.display()
    )
}

/// Timestamps (ms) per series text from the file sink, for lines whose series starts with one of `names`.
pub fn sink_samples(sink: &Path, names: &[&str]) -> Result<BTreeMap<String, BTreeSet<i64>>> {
    let text = std::fs::read_to_string(sink)?;
    let mut out: BTreeMap<String, BTreeSet<i64>> = BTreeMap::new();
    for line in text.lines() {
        let Some((rest, ts)) = line.rsplit_once(' ') else {
            continue;
        };
        let Some((series, value)) = rest.rsplit_once(' ') else {
            continue;
        };
        if value == "NaN" {
            continue; // staleness markers are not queryable samples
        }
        let name = series.split('{').next().unwrap_or("");
        if names.contains(&name) {
            out.entry(series.to_owned()).or_default().insert(ts.parse()?);
        }
    }
    Ok(out)
}

/// Raw sample timestamps (ms) of `selector` over `range` in a Prometheus.
pub fn stored_timestamps(p: &Prometheus, selector: &str, range: &str) -> Result<BTreeSet<i64>> {
    let res = p.query(&format!("{selector}[{range}]"))?;
    let mut out = BTreeSet::new();
    for s in res {
        for v in s["values"].as_array().cloned().unwrap_or_default() {
            let t = v[0].as_f64().unwrap_or(0.0);
            out.insert((t * 1000.0).round() as i64);
        }
    }
    Ok(out)
}
