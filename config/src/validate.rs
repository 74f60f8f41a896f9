//! Semantic checks of an [`AgentConfig`] and the Prometheus defaults that complete it.
//!
//! Checks run on the deserialized value without I/O (files named in the config are not
//! opened here) and place each finding with the [`SpanTable`] of the file it came from.

use std::collections::HashMap;
use std::fmt;

use crate::agent::{
    AgentConfig, Authorization, BasicAuth, GlobalConfig, KubernetesSdConfig, QueueConfig, RelabelConfig,
    RemoteWriteConfig, ScrapeConfig, TlsConfig,
};
use crate::error::{at_path, ConfigError};
use crate::load::SpanTable;
use crate::units::Duration;

/// Relabel actions Prometheus 2.42 knows (matched case-insensitively, as Prometheus does).
pub const RELABEL_ACTIONS: &[&str] = &[
    "replace",
    "keep",
    "drop",
    "keepequal",
    "dropequal",
    "hashmod",
    "labelmap",
    "labeldrop",
    "labelkeep",
    "lowercase",
    "uppercase",
];

/// Kubernetes SD roles Prometheus knows; the agent implements only `pod`.
const KUBERNETES_ROLES: &[&str] = &["pod", "service", "endpoints", "endpointslice", "node", "ingress"];

/// Headers the remote_write client sets itself.
const RESERVED_HEADERS: &[&str] = &[
    "authorization",
    "host",
    "content-encoding",
    "content-length",
    "content-type",
    "user-agent",
    "x-prometheus-remote-write-version",
    "connection",
    "keep-alive",
    "transfer-encoding",
];

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

/// Checks `cfg` (as deserialized from a file with `spans`) and returns every finding, sorted
/// by position.
pub fn validate(cfg: &AgentConfig, spans: &SpanTable, file: &str) -> Vec<ConfigError> {
    let mut c = Checker {
        spans,
        file,
        errors: Vec::new(),
    };
    c.global(&cfg.global);
    let mut jobs: HashMap<&str, usize> = HashMap::new();
    for (i, sc) in cfg.scrape_configs.iter().enumerate() {
        let path = format!("scrape_configs[{i}]");
        if sc.job_name.is_empty() {
            c.err(&path, "job_name is required");
        } else if let Some(first) = jobs.insert(&sc.job_name, i) {
            let first_line = spans.nearest(&format!("scrape_configs[{first}].job_name")).line;
            jobs.insert(&sc.job_name, first);
            c.err(
                &format!("{path}.job_name"),
                format!(
                    "found multiple scrape configs with job name {:?} (first at line {first_line})",
                    sc.job_name
                ),
            );
        }
        c.scrape(&path, sc, &cfg.global);
    }
    let mut names: HashMap<&str, usize> = HashMap::new();
    for (i, rw) in cfg.remote_write.iter().enumerate() {
        let path = format!("remote_write[{i}]");
        if let Some(name) = rw.name.as_deref().filter(|n| !n.is_empty()) {
            if let Some(first) = names.insert(name, i) {
                names.insert(name, first);
                c.err(
                    &format!("{path}.name"),
                    format!("found multiple remote_write configs with name {name:?}"),
                );
            }
        }
        c.remote_write(&path, rw);
    }
    if cfg.storage.path.is_empty() {
        c.err("storage.path", "path must not be empty");
    }
    if !valid_listen_address(&cfg.server.listen_address) {
        c.err(
            "server.listen_address",
            format!("listen_address must be host:port, got {:?}", cfg.server.listen_address),
        );
    }
    if cfg.file_sink.as_ref().is_some_and(|f| f.path.is_empty()) {
        c.err("file_sink.path", "path is required (a file, or - for standard output)");
    }
    c.errors.sort_by_key(|e| (e.line, e.column));
    c.errors
}

struct Checker<'a> {
    spans: &'a SpanTable,
    file: &'a str,
    errors: Vec<ConfigError>,
}

/// The authentication and TLS options shared by scrape, remote_write and Kubernetes SD.
struct HttpClient<'a> {
    basic_auth: Option<&'a BasicAuth>,
    authorization: Option<&'a Authorization>,
    bearer_token: Option<&'a str>,
    bearer_token_file: Option<&'a str>,
    tls: Option<&'a TlsConfig>,
}

impl Checker<'_> {
    fn err(&mut self, path: &str, message: impl fmt::Display) {
        let pos = self.spans.nearest(path);
        self.errors.push(ConfigError {
            file: self.file.to_owned(),
            line: pos.line,
            column: pos.column,
            message: at_path(path, message),
        });
    }

    fn global(&mut self, g: &GlobalConfig) {
        if g.scrape_timeout > g.scrape_interval {
            self.err(
                "global.scrape_timeout",
                format!(
                    "global scrape timeout greater than scrape interval ({} > {})",
                    g.scrape_timeout, g.scrape_interval
                ),
            );
        }
        for name in g.external_labels.keys() {
            if !valid_label_name(name) || name == "__name__" {
                self.err(
                    &format!("global.external_labels.{name}"),
                    format!("{name:?} is not a valid label name"),
                );
            }
        }
    }

    fn scrape(&mut self, path: &str, sc: &ScrapeConfig, global: &GlobalConfig) {
        let (interval, timeout) = (effective_interval(sc, global), effective_timeout(sc, global));
        if timeout > interval {
            let at = if sc.scrape_timeout.is_some() {
                "scrape_timeout"
            } else {
                "scrape_interval"
            };
            self.err(
                &format!("{path}.{at}"),
                format!(
                    "scrape timeout greater than scrape interval for scrape config with job name {:?} ({timeout} > {interval})",
                    sc.job_name
                ),
            );
        }
        if let Some(scheme) = sc.scheme.as_deref().filter(|s| !matches!(*s, "http" | "https")) {
            self.err(
                &format!("{path}.scheme"),
                format!("scheme must be http or https, got {scheme:?}"),
            );
        }
        if let Some(mp) = sc.metrics_path.as_deref().filter(|p| !p.starts_with('/')) {
            self.err(
                &format!("{path}.metrics_path"),
                format!("metrics_path must start with /, got {mp:?}"),
            );
        }
        let client = HttpClient {
            basic_auth: sc.basic_auth.as_ref(),
            authorization: sc.authorization.as_ref(),
            bearer_token: sc.bearer_token.as_deref(),
            bearer_token_file: sc.bearer_token_file.as_deref(),
            tls: sc.tls_config.as_ref(),
        };
        self.http_client(path, &client);
        for (j, st) in sc.static_configs.iter().enumerate() {
            for (k, target) in st.targets.iter().enumerate() {
                self.target(&format!("{path}.static_configs[{j}].targets[{k}]"), target);
            }
            for name in st.labels.keys() {
                if !valid_label_name(name) {
                    self.err(
                        &format!("{path}.static_configs[{j}].labels.{name}"),
                        format!("{name:?} is not a valid label name"),
                    );
                }
            }
        }
        for (j, fsd) in sc.file_sd_configs.iter().enumerate() {
            let fpath = format!("{path}.file_sd_configs[{j}]");
            if fsd.files.is_empty() {
                self.err(&fpath, "files must list at least one file pattern");
            }
            for (k, f) in fsd.files.iter().enumerate() {
                if !valid_file_sd_pattern(f) {
                    self.err(
                        &format!("{fpath}.files[{k}]"),
                        format!("{f:?} is not a valid file_sd pattern (a *.json, *.yml or *.yaml file; `*` only in the file name)"),
                    );
                }
            }
        }
        for (j, k8s) in sc.kubernetes_sd_configs.iter().enumerate() {
            self.kubernetes(&format!("{path}.kubernetes_sd_configs[{j}]"), k8s);
        }
        for (j, rc) in sc.relabel_configs.iter().enumerate() {
            self.relabel(&format!("{path}.relabel_configs[{j}]"), rc);
        }
        for (j, rc) in sc.metric_relabel_configs.iter().enumerate() {
            self.relabel(&format!("{path}.metric_relabel_configs[{j}]"), rc);
        }
    }

    fn target(&mut self, path: &str, target: &str) {
        if target.is_empty() {
            self.err(path, "target must not be empty");
        } else if target.contains("://") {
            self.err(
                path,
                format!("target {target:?} must be host:port without a scheme (set `scheme` instead)"),
            );
        } else if target.contains('/') {
            self.err(
                path,
                format!("target {target:?} must be host:port without a path (set `metrics_path` instead)"),
            );
        }
    }

    fn kubernetes(&mut self, path: &str, k: &KubernetesSdConfig) {
        match k.role.as_str() {
            "pod" => {}
            "" => self.err(
                &format!("{path}.role"),
                "role is required (the agent supports role `pod`)",
            ),
            r if KUBERNETES_ROLES.contains(&r) => self.err(
                &format!("{path}.role"),
                format!("kubernetes_sd role `{r}` is not supported (the agent supports role `pod`)"),
            ),
            r => self.err(
                &format!("{path}.role"),
                format!("unknown kubernetes_sd role `{r}` (the agent supports role `pod`)"),
            ),
        }
        if k.api_server.is_some() && k.kubeconfig_file.is_some() {
            self.err(
                &format!("{path}.kubeconfig_file"),
                "api_server and kubeconfig_file cannot both be set",
            );
        }
        for (j, sel) in k.selectors.iter().enumerate() {
            if sel.role != "pod" {
                self.err(
                    &format!("{path}.selectors[{j}].role"),
                    format!("selector role must be `pod`, got {:?}", sel.role),
                );
            }
        }
        let client = HttpClient {
            basic_auth: k.basic_auth.as_ref(),
            authorization: k.authorization.as_ref(),
            bearer_token: None,
            bearer_token_file: k.bearer_token_file.as_deref(),
            tls: k.tls_config.as_ref(),
        };
        self.http_client(path, &client);
    }

    fn relabel(&mut self, path: &str, rc: &RelabelConfig) {
        let action = rc.action.to_ascii_lowercase();
        if !RELABEL_ACTIONS.contains(&action.as_str()) {
            self.err(
                &format!("{path}.action"),
                format!(
                    "unknown relabel action {:?} (expected one of: {})",
                    rc.action,
                    RELABEL_ACTIONS.join(", ")
                ),
            );
            return;
        }
        if let Err(e) = regex::Regex::new(&format!("^(?s:{})$", rc.regex)) {
            self.err(
                &format!("{path}.regex"),
                format!("invalid regular expression {:?}: {}", rc.regex, regex_reason(&e)),
            );
        }
        for (k, name) in rc.source_labels.iter().enumerate() {
            if !valid_label_name(name) {
                self.err(
                    &format!("{path}.source_labels[{k}]"),
                    format!("{name:?} is not a valid label name"),
                );
            }
        }
        let needs_target = matches!(
            action.as_str(),
            "replace" | "hashmod" | "lowercase" | "uppercase" | "keepequal" | "dropequal"
        );
        let target = rc.target_label.as_deref().unwrap_or("");
        if needs_target && target.is_empty() {
            self.err(path, format!("target_label is required for action `{action}`"));
        } else if !target.is_empty() {
            let ok = if action == "replace" {
                valid_target_template(target)
            } else {
                valid_label_name(target)
            };
            if !ok {
                self.err(
                    &format!("{path}.target_label"),
                    format!("{target:?} is not a valid label name"),
                );
            }
        }
        if action == "hashmod" && rc.modulus.unwrap_or(0) == 0 {
            self.err(path, "action `hashmod` needs a non-zero modulus");
        }
        let d = RelabelConfig::default();
        if matches!(action.as_str(), "labeldrop" | "labelkeep")
            && (!rc.source_labels.is_empty()
                || rc.target_label.is_some()
                || rc.modulus.is_some()
                || rc.separator != d.separator
                || rc.replacement != d.replacement)
        {
            self.err(path, format!("action `{action}` takes only `regex`"));
        }
        if matches!(action.as_str(), "keepequal" | "dropequal")
            && (rc.regex != d.regex
                || rc.modulus.is_some()
                || rc.separator != d.separator
                || rc.replacement != d.replacement)
        {
            self.err(
                path,
                format!("action `{action}` takes only `source_labels` and `target_label`"),
            );
        }
    }

    fn remote_write(&mut self, path: &str, rw: &RemoteWriteConfig) {
        if rw.url.is_empty() {
            self.err(path, "url is required");
        } else if !valid_http_url(&rw.url) {
            self.err(
                &format!("{path}.url"),
                format!("url must be an http:// or https:// URL with a host, got {:?}", rw.url),
            );
        }
        for name in rw.headers.keys() {
            if RESERVED_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
                self.err(
                    &format!("{path}.headers.{name}"),
                    format!("header {name:?} is set by the agent and cannot be configured"),
                );
            }
        }
        let client = HttpClient {
            basic_auth: rw.basic_auth.as_ref(),
            authorization: rw.authorization.as_ref(),
            bearer_token: rw.bearer_token.as_deref(),
            bearer_token_file: rw.bearer_token_file.as_deref(),
            tls: rw.tls_config.as_ref(),
        };
        self.http_client(path, &client);
        for (j, rc) in rw.write_relabel_configs.iter().enumerate() {
            self.relabel(&format!("{path}.write_relabel_configs[{j}]"), rc);
        }
        self.queue(&format!("{path}.queue_config"), &rw.queue_config);
    }

    fn queue(&mut self, path: &str, q: &QueueConfig) {
        if q.max_shards == 0 {
            self.err(&format!("{path}.max_shards"), "max_shards must be greater than 0");
        } else if q.min_shards > q.max_shards {
            self.err(
                &format!("{path}.min_shards"),
                format!(
                    "min_shards ({}) must not be greater than max_shards ({})",
                    q.min_shards, q.max_shards
                ),
            );
        }
        if q.max_samples_per_send == 0 {
            self.err(
                &format!("{path}.max_samples_per_send"),
                "max_samples_per_send must be greater than 0",
            );
        }
        if q.capacity == 0 {
            self.err(&format!("{path}.capacity"), "capacity must be greater than 0");
        }
        if q.min_backoff > q.max_backoff {
            self.err(
                &format!("{path}.min_backoff"),
                format!(
                    "min_backoff ({}) must not be greater than max_backoff ({})",
                    q.min_backoff, q.max_backoff
                ),
            );
        }
    }

    fn http_client(&mut self, path: &str, h: &HttpClient<'_>) {
        let bearer = h.bearer_token.is_some() || h.bearer_token_file.is_some();
        if h.bearer_token.is_some() && h.bearer_token_file.is_some() {
            self.err(
                &format!("{path}.bearer_token_file"),
                "at most one of bearer_token and bearer_token_file may be set",
            );
        }
        if let Some(b) = h.basic_auth {
            if b.password.is_some() && b.password_file.is_some() {
                self.err(
                    &format!("{path}.basic_auth.password_file"),
                    "at most one of basic_auth password and password_file may be set",
                );
            }
            if h.authorization.is_some() || bearer {
                self.err(
                    &format!("{path}.basic_auth"),
                    "basic_auth cannot be combined with authorization, bearer_token or bearer_token_file",
                );
            }
        }
        if let Some(a) = h.authorization {
            if a.credentials.is_some() && a.credentials_file.is_some() {
                self.err(
                    &format!("{path}.authorization.credentials_file"),
                    "at most one of authorization credentials and credentials_file may be set",
                );
            }
            if a.kind.as_deref().is_some_and(|k| k.eq_ignore_ascii_case("basic")) {
                self.err(
                    &format!("{path}.authorization.type"),
                    "authorization type cannot be Basic; use basic_auth",
                );
            }
            if bearer {
                self.err(
                    &format!("{path}.authorization"),
                    "authorization cannot be combined with bearer_token or bearer_token_file",
                );
            }
        }
        if let Some(t) = h.tls {
            self.tls(&format!("{path}.tls_config"), t);
        }
    }

    fn tls(&mut self, path: &str, t: &TlsConfig) {
        for (inline, file, name) in [
            (&t.ca, &t.ca_file, "ca"),
            (&t.cert, &t.cert_file, "cert"),
            (&t.key, &t.key_file, "key"),
        ] {
            if inline.is_some() && file.is_some() {
                self.err(
                    &format!("{path}.{name}_file"),
                    format!("at most one of {name} and {name}_file may be set"),
                );
            }
        }
        let has_cert = t.cert.is_some() || t.cert_file.is_some();
        let has_key = t.key.is_some() || t.key_file.is_some();
        if has_cert != has_key {
            self.err(
                path,
                "a client certificate (cert or cert_file) needs a key (key or key_file), and the other way round",
            );
        }
        if let Some(v) = t.min_version.as_deref().filter(|v| !matches!(*v, "TLS12" | "TLS13")) {
            self.err(
                &format!("{path}.min_version"),
                format!("min_version must be TLS12 or TLS13, got {v:?}"),
            );
        }
    }
}

/// `[a-zA-Z_][a-zA-Z0-9_]*`.
pub fn valid_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A replace target: label name characters and `$1`, `${1}`, `$name`, `${name}` references.
fn valid_target_template(target: &str) -> bool {
    let mut rest = target;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix("${") {
            let Some(end) = r.find('}') else { return false };
            let name = &r[..end];
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return false;
            }
            rest = &r[end + 1..];
        } else if let Some(r) = rest.strip_prefix('$') {
            let n = r.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').count();
            if n == 0 {
                return false;
            }
            rest = &r[n..];
        } else {
            let c = rest.chars().next().unwrap_or('_');
            if !(c.is_ascii_alphanumeric() || c == '_') {
                return false;
            }
            rest = &rest[c.len_utf8()..];
        }
    }
    target.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_' || c == '$')
}

/// A file_sd pattern: ends in `.json`, `.yml` or `.yaml`, with `*` only in the last element.
fn valid_file_sd_pattern(p: &str) -> bool {
    let lower = p.to_ascii_lowercase();
    let ext_ok = [".json", ".yml", ".yaml"].iter().any(|e| lower.ends_with(e));
    let dir = p.rfind('/').map_or("", |i| &p[..i]);
    ext_ok && !dir.contains('*')
}

fn valid_http_url(url: &str) -> bool {
    let rest = url.strip_prefix("http://").or_else(|| url.strip_prefix("https://"));
    rest.is_some_and(|r| {
        let host = r.split(['/', '?', '#']).next().unwrap_or("");
        !host.is_empty() && !host.starts_with(':')
    })
}

fn valid_listen_address(addr: &str) -> bool {
    addr.rsplit_once(':')
        .is_some_and(|(_, port)| port.parse::<u16>().is_ok())
}

/// The last line of a regex error, which names the problem (`unclosed group`).
fn regex_reason(e: &regex::Error) -> String {
    let text = e.to_string();
    let line = text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or(&text);
    line.trim().trim_start_matches("error: ").to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_templates() {
        assert!(valid_target_template("foo"));
        assert!(valid_target_template("${1}"));
        assert!(valid_target_template("pre_$1_post"));
        assert!(!valid_target_template("a-b"));
        assert!(!valid_target_template("${"));
        assert!(!valid_target_template("1abc"));
    }

    #[test]
    fn file_sd_patterns() {
        assert!(valid_file_sd_pattern("targets/*.json"));
        assert!(valid_file_sd_pattern("a.YAML"));
        assert!(!valid_file_sd_pattern("*/a.json"));
        assert!(!valid_file_sd_pattern("targets.txt"));
    }

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
