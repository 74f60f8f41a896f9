//! [`validate`]: the checks of each section, reported through a [`Checker`].

use std::collections::HashMap;
use std::fmt;

use super::client::HttpClient;
use super::rules::{valid_file_sd_pattern, valid_http_url, valid_label_name, valid_listen_address};
use crate::agent::{AgentConfig, GlobalConfig, KubernetesSdConfig, QueueConfig, RemoteWriteConfig, ScrapeConfig};
use crate::error::{at_path, ConfigError};
use crate::load::SpanTable;
use crate::validate::{effective_interval, effective_timeout};

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

/// Checks `cfg` (as deserialized from a file with `spans`) and returns every finding, sorted
/// by position.
pub fn validate(cfg: &AgentConfig, spans: &SpanTable, file: &str) -> Vec<ConfigError> {
    let mut c = Checker {
        spans,
        file,
        errors: Vec::new(),
        metric_kinds: HashMap::new(),
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
    if cfg.storage.wal_max_size.0 < 1 << 20 {
        c.err(
            "storage.wal_max_size",
            format!(
                "wal_max_size must be at least 1MiB (the smallest WAL segment), got {}",
                cfg.storage.wal_max_size
            ),
        );
    }
    if !valid_listen_address(&cfg.server.listen_address) {
        c.err(
            "server.listen_address",
            format!("listen_address must be host:port, got {:?}", cfg.server.listen_address),
        );
    }
    if let Some(f) = &cfg.flows {
        c.flows(f);
    }
    if let Some(l) = &cfg.logs {
        c.logs(l);
    }
    if cfg.file_sink.as_ref().is_some_and(|f| f.path.is_empty()) {
        c.err("file_sink.path", "path is required (a file, or - for standard output)");
    }
    c.errors.sort_by_key(|e| (e.line, e.column));
    c.errors
}

pub(super) struct Checker<'a> {
    spans: &'a SpanTable,
    file: &'a str,
    errors: Vec<ConfigError>,
    /// Full name → type of the `metrics` stages' metrics seen so far (one type per name).
    pub(super) metric_kinds: HashMap<String, String>,
}

impl Checker<'_> {
    pub(super) fn err(&mut self, path: &str, message: impl fmt::Display) {
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

    pub(super) fn kubernetes(&mut self, path: &str, k: &KubernetesSdConfig) {
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
            if let Some(Err(e)) = sel.label.as_deref().map(crate::selector::LabelSelector::parse) {
                self.err(
                    &format!("{path}.selectors[{j}].label"),
                    format!("invalid label selector: {e}"),
                );
            }
            if let Some(Err(e)) = sel.field.as_deref().map(crate::selector::FieldSelector::parse) {
                self.err(
                    &format!("{path}.selectors[{j}].field"),
                    format!("invalid field selector: {e}"),
                );
            }
        }
        if k.selectors.len() > 1 {
            self.err(
                &format!("{path}.selectors[1]"),
                "only one selector per role: merge the requirements into one `label` and one `field`",
            );
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
}
