//! From discovered label sets to scrape targets, as Prometheus's `PopulateLabels`: defaults
//! (`job`, `__scheme__`, `__metrics_path__`, interval/timeout, `__param_*`), `relabel_configs`,
//! `instance`, and removal of the `__`-prefixed labels.

use std::fmt;
use std::time::Duration;

use crate::discovery::TargetGroup;
use crate::labels::{self, Labels};
use crate::relabel::{self, Rule};

/// What a job's targets have in common, taken from its `ScrapeConfig`.
#[derive(Clone, Debug)]
pub struct JobDefaults {
    /// `job_name`.
    pub job: String,
    /// Default scheme.
    pub scheme: String,
    /// Default metrics path.
    pub metrics_path: String,
    /// Default interval.
    pub interval: Duration,
    /// Default timeout.
    pub timeout: Duration,
    /// URL parameters from `params`.
    pub params: Vec<(String, Vec<String>)>,
}

/// A target after relabeling, ready to be scraped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// Labels attached to every sample (`job`, `instance`, and relabeled target labels).
    pub labels: Labels,
    /// Labels before relabeling (shown on the status page).
    pub discovered: Labels,
    /// The URL to scrape.
    pub url: String,
    /// Scrape interval (possibly overridden by `__scrape_interval__`).
    pub interval: Duration,
    /// Scrape timeout.
    pub timeout: Duration,
}

impl Target {
    /// A stable identity for the target (its labels and URL).
    pub fn key(&self) -> String {
        format!("{}{}", self.url, self.labels)
    }
}

/// Why a discovered target was not turned into a scrape target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetError {
    /// Dropped by relabeling (not an error, but reported on the status page).
    Dropped,
    /// The label set is not usable.
    Invalid(String),
}

impl fmt::Display for TargetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetError::Dropped => f.write_str("dropped by relabeling"),
            TargetError::Invalid(m) => f.write_str(m),
        }
    }
}

/// Builds the scrape target for one discovered label set (group labels merged in).
pub fn populate(discovered: Labels, job: &JobDefaults, rules: &[Rule]) -> Result<Target, TargetError> {
    let mut l = discovered.clone();
    let set_default = |l: &mut Labels, name: &str, value: &str| {
        if l.get(name).is_none() {
            l.set(name, value);
        }
    };
    set_default(&mut l, "job", &job.job);
    set_default(&mut l, labels::SCRAPE_INTERVAL, &fmt_duration(job.interval));
    set_default(&mut l, labels::SCRAPE_TIMEOUT, &fmt_duration(job.timeout));
    set_default(&mut l, labels::METRICS_PATH, &job.metrics_path);
    set_default(&mut l, labels::SCHEME, &job.scheme);
    for (name, values) in &job.params {
        if let Some(first) = values.first() {
            set_default(&mut l, &format!("{}{name}", labels::PARAM_PREFIX), first);
        }
    }

    if !relabel::process(&mut l, rules) {
        return Err(TargetError::Dropped);
    }

    let mut address = l
        .get(labels::ADDRESS)
        .filter(|a| !a.is_empty())
        .ok_or_else(|| TargetError::Invalid("no address".to_owned()))?
        .to_owned();
    if address.contains('/') {
        return Err(TargetError::Invalid(format!("{address:?} is not a valid hostname")));
    }
    let scheme = l.get_or_empty(labels::SCHEME).to_owned();
    if scheme != "http" && scheme != "https" {
        return Err(TargetError::Invalid(format!("invalid scheme {scheme:?}")));
    }
    // As Prometheus 2.42: an address without a port gets the scheme's default port.
    if !has_port(&address) {
        address = format!("{address}:{}", if scheme == "https" { 443 } else { 80 });
        l.set(labels::ADDRESS, &address);
    }
    let interval = parse_duration_label(&l, labels::SCRAPE_INTERVAL)?;
    let timeout = parse_duration_label(&l, labels::SCRAPE_TIMEOUT)?;
    if interval.is_zero() {
        return Err(TargetError::Invalid("scrape interval cannot be 0".to_owned()));
    }
    if timeout.is_zero() {
        return Err(TargetError::Invalid("scrape timeout cannot be 0".to_owned()));
    }
    if timeout > interval {
        return Err(TargetError::Invalid(format!(
            "scrape timeout cannot be greater than scrape interval ({} > {})",
            fmt_duration(timeout),
            fmt_duration(interval)
        )));
    }

    // URL: scheme://address/path?params, where `__param_*` labels override config params.
    let mut query: Vec<(String, String)> = Vec::new();
    for (name, values) in &job.params {
        let label = format!("{}{name}", labels::PARAM_PREFIX);
        // As Prometheus: the label replaces the first configured value, the others stay.
        for (i, v) in values.iter().enumerate() {
            let v = match l.get(&label) {
                Some(lv) if i == 0 => lv,
                _ => v.as_str(),
            };
            query.push((name.clone(), v.to_owned()));
        }
    }
    for (name, value) in l.iter() {
        if let Some(p) = name.strip_prefix(labels::PARAM_PREFIX) {
            if !job.params.iter().any(|(n, _)| n == p) {
                query.push((p.to_owned(), value.to_owned()));
            }
        }
    }
    let mut url = format!("{scheme}://{address}{}", l.get_or_empty(labels::METRICS_PATH));
    if !query.is_empty() {
        url.push(if url.contains('?') { '&' } else { '?' });
        let q: Vec<String> = query
            .iter()
            .map(|(n, v)| format!("{}={}", url_escape(n), url_escape(v)))
            .collect();
        url.push_str(&q.join("&"));
    }

    // Final labels: drop everything starting with "__", default instance to the address.
    let mut final_labels = l;
    final_labels.retain(|n, v| !n.starts_with(labels::RESERVED_PREFIX) && !v.is_empty());
    if final_labels.get("instance").is_none() {
        final_labels.set("instance", &address);
    }
    for (n, _) in final_labels.iter() {
        if !crate::relabel::is_valid_label_name(n) {
            return Err(TargetError::Invalid(format!("invalid label name {n:?}")));
        }
    }
    Ok(Target {
        labels: final_labels,
        discovered,
        url,
        interval,
        timeout,
    })
}

/// All targets of a set of groups, with errors for the status page.
pub fn from_groups(
    groups: &[TargetGroup],
    job: &JobDefaults,
    rules: &[Rule],
) -> (Vec<Target>, Vec<(Labels, TargetError)>) {
    let mut ok = Vec::new();
    let mut bad = Vec::new();
    for g in groups {
        for t in &g.targets {
            let mut l = g.labels.clone();
            for (n, v) in t.iter() {
                l.insert(n.to_owned(), v.to_owned());
            }
            match populate(l.clone(), job, rules) {
                Ok(target) => ok.push(target),
                Err(e) => bad.push((l, e)),
            }
        }
    }
    // Two discovered targets can end up identical after relabeling; scrape each once.
    ok.sort_by_key(Target::key);
    ok.dedup_by(|a, b| a.key() == b.key());
    (ok, bad)
}

/// Whether `host:port` / `[v6]:port` carries a port.
fn has_port(address: &str) -> bool {
    if let Some(rest) = address.strip_prefix('[') {
        return rest
            .split_once(']')
            .is_some_and(|(_, p)| p.starts_with(':') && p.len() > 1);
    }
    match address.rsplit_once(':') {
        Some((host, port)) => !host.contains(':') && !port.is_empty(),
        None => false,
    }
}

fn parse_duration_label(l: &Labels, name: &str) -> Result<Duration, TargetError> {
    let v = l.get_or_empty(name);
    v.parse::<config::Duration>()
        .map(|d| d.get())
        .map_err(|e| TargetError::Invalid(format!("error parsing {name}: {e}")))
}

/// Formats a duration like Prometheus (`15s`, `1m30s`).
pub fn fmt_duration(d: Duration) -> String {
    config::Duration(d).to_string()
}

fn url_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => out.push(b as char),
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use config::agent::RelabelConfig;

    fn job() -> JobDefaults {
        JobDefaults {
            job: "node".into(),
            scheme: "http".into(),
            metrics_path: "/metrics".into(),
            interval: Duration::from_secs(15),
            timeout: Duration::from_secs(10),
            params: vec![("module".into(), vec!["a".into(), "b".into()])],
        }
    }

    #[test]
    fn defaults_instance_and_url() {
        let t = populate(
            Labels::from_pairs([("__address__", "127.0.0.1:9100"), ("env", "x")]),
            &job(),
            &[],
        )
        .unwrap();
        assert_eq!(
            t.labels.to_string(),
            r#"{env="x", instance="127.0.0.1:9100", job="node"}"#
        );
        assert_eq!(t.url, "http://127.0.0.1:9100/metrics?module=a&module=b");
        assert_eq!(t.interval, Duration::from_secs(15));
    }

    #[test]
    fn relabel_can_set_address_path_and_drop() {
        let rules = relabel::compile(&[
            RelabelConfig {
                source_labels: vec!["__meta_port".into()],
                regex: "(\\d+)".into(),
                target_label: Some("__address__".into()),
                replacement: "10.0.0.1:$1".into(),
                ..Default::default()
            },
            RelabelConfig {
                target_label: Some("__metrics_path__".into()),
                replacement: "/m".into(),
                ..Default::default()
            },
            RelabelConfig {
                target_label: Some("__param_module".into()),
                replacement: "z".into(),
                ..Default::default()
            },
        ])
        .unwrap();
        let t = populate(
            Labels::from_pairs([("__address__", "x"), ("__meta_port", "8080")]),
            &job(),
            &rules,
        )
        .unwrap();
        assert_eq!(t.url, "http://10.0.0.1:8080/m?module=z&module=b");
        assert_eq!(t.labels.get("instance"), Some("10.0.0.1:8080"));
        assert!(t.labels.get("__meta_port").is_none());

        let drop = relabel::compile(&[RelabelConfig {
            action: "drop".into(),
            source_labels: vec!["env".into()],
            regex: "dev".into(),
            ..Default::default()
        }])
        .unwrap();
        assert_eq!(
            populate(
                Labels::from_pairs([("__address__", "a:1"), ("env", "dev")]),
                &job(),
                &drop
            ),
            Err(TargetError::Dropped)
        );
    }

    #[test]
    fn default_port_and_empty_labels_as_prometheus_2_42() {
        let t = populate(
            Labels::from_pairs([("__address__", "localhost"), ("empty", "")]),
            &job(),
            &[],
        )
        .unwrap();
        assert_eq!(t.labels.get("instance"), Some("localhost:80"));
        assert!(t.labels.get("empty").is_none());
        assert!(t.url.starts_with("http://localhost:80/metrics"));
        assert!(has_port("[::1]:9100") && !has_port("[::1]") && has_port("a:1") && !has_port("a"));
    }

    #[test]
    fn invalid_targets() {
        assert!(matches!(
            populate(Labels::new(), &job(), &[]),
            Err(TargetError::Invalid(_))
        ));
        assert!(matches!(
            populate(
                Labels::from_pairs([("__address__", "a:1"), ("__scrape_timeout__", "1m")]),
                &job(),
                &[]
            ),
            Err(TargetError::Invalid(_))
        ));
    }
}
