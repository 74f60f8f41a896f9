//! The values Prometheus uses for what a file leaves out.

use crate::agent::{AgentConfig, GlobalConfig, ScrapeConfig};
use crate::load::SpanTable;
use crate::units::Duration;

const DEFAULT_REMOTE_TIMEOUT: Duration = Duration::from_secs(30);

/// Completes `global` the way Prometheus does: an unset or zero interval is 1m, and a timeout
/// that was not written in the file (or is zero) is 10s but at most the interval.
pub(crate) fn settle_global(global: &mut GlobalConfig, spans: &SpanTable) {
    let defaults = GlobalConfig::default();
    if global.scrape_interval == Duration::default() {
        global.scrape_interval = defaults.scrape_interval;
    }
    let written = spans.get("global.scrape_timeout").is_some();
    if global.scrape_timeout == Duration::default() || !written {
        global.scrape_timeout = defaults.scrape_timeout.min(global.scrape_interval);
    }
}

fn set(d: Option<Duration>) -> Option<Duration> {
    d.filter(|d| *d != Duration::default())
}

/// The scrape interval a job runs with: its own, else the global one.
pub fn effective_interval(sc: &ScrapeConfig, global: &GlobalConfig) -> Duration {
    set(sc.scrape_interval).unwrap_or(global.scrape_interval)
}

/// The scrape timeout a job runs with: its own, else the global one but at most the job's
/// interval (Prometheus's rule).
pub fn effective_timeout(sc: &ScrapeConfig, global: &GlobalConfig) -> Duration {
    set(sc.scrape_timeout).unwrap_or_else(|| global.scrape_timeout.min(effective_interval(sc, global)))
}

/// Fills every scrape config and remote_write entry with the values Prometheus would use, so
/// the agent reads concrete settings: interval, timeout and limits from `global` (an unset or
/// zero limit takes the global one), `metrics_path` `/metrics`, `scheme` `http`,
/// `honor_timestamps`/`follow_redirects`/`enable_http2` true, `remote_timeout` 30s, and
/// relabel actions in lower case.
pub fn apply_defaults(cfg: &mut AgentConfig) {
    let g = cfg.global.clone();
    for sc in &mut cfg.scrape_configs {
        let interval = effective_interval(sc, &g);
        let timeout = effective_timeout(sc, &g);
        sc.scrape_interval = Some(interval);
        sc.scrape_timeout = Some(timeout);
        let limit = |own: Option<u64>, global: u64| Some(own.filter(|v| *v != 0).unwrap_or(global));
        sc.sample_limit = limit(sc.sample_limit, g.sample_limit);
        sc.target_limit = limit(sc.target_limit, g.target_limit);
        sc.label_limit = limit(sc.label_limit, g.label_limit);
        sc.label_name_length_limit = limit(sc.label_name_length_limit, g.label_name_length_limit);
        sc.label_value_length_limit = limit(sc.label_value_length_limit, g.label_value_length_limit);
        sc.body_size_limit = Some(sc.body_size_limit.filter(|b| b.0 != 0).unwrap_or(g.body_size_limit));
        sc.metrics_path.get_or_insert_with(|| "/metrics".to_owned());
        sc.scheme.get_or_insert_with(|| "http".to_owned());
        sc.honor_timestamps.get_or_insert(true);
        sc.follow_redirects.get_or_insert(true);
        sc.enable_http2.get_or_insert(true);
        for rc in sc.relabel_configs.iter_mut().chain(&mut sc.metric_relabel_configs) {
            rc.action = rc.action.to_ascii_lowercase();
        }
    }
    for rw in &mut cfg.remote_write {
        rw.remote_timeout = Some(set(rw.remote_timeout).unwrap_or(DEFAULT_REMOTE_TIMEOUT));
        rw.follow_redirects.get_or_insert(true);
        rw.enable_http2.get_or_insert(true);
        for rc in &mut rw.write_relabel_configs {
            rc.action = rc.action.to_ascii_lowercase();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeout_defaults_follow_prometheus() {
        let g = GlobalConfig {
            scrape_interval: Duration::from_secs(30),
            scrape_timeout: Duration::from_secs(10),
            ..GlobalConfig::default()
        };
        let mut sc = ScrapeConfig {
            scrape_interval: Some(Duration::from_secs(5)),
            ..ScrapeConfig::default()
        };
        assert_eq!(effective_timeout(&sc, &g), Duration::from_secs(5));
        sc.scrape_interval = None;
        assert_eq!(effective_interval(&sc, &g), Duration::from_secs(30));
        assert_eq!(effective_timeout(&sc, &g), Duration::from_secs(10));
    }
}
