//! Checks of the `logs:` section (Promtail's configuration nested one level down).

use std::collections::HashMap;

use super::checks::Checker;
use super::client::HttpClient;
use super::rules::{regex_reason, valid_http_url, valid_label_name};
use crate::logs::{LogScrapeConfig, LogsConfig, Stage};

/// Metric types of a `metrics` stage.
const METRIC_TYPES: &[&str] = &["counter", "gauge", "histogram"];

impl Checker<'_> {
    pub(super) fn logs(&mut self, l: &LogsConfig) {
        if !l.scrape_configs.is_empty() && l.clients.is_empty() {
            self.err(
                "logs.clients",
                "at least one client (a Loki push URL) is required to ship logs",
            );
        }
        let mut names: HashMap<String, usize> = HashMap::new();
        for (i, c) in l.clients.iter().enumerate() {
            let path = format!("logs.clients[{i}]");
            if let Some(n) = c
                .name
                .as_deref()
                .filter(|n| n.is_empty() || !n.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)))
            {
                // It names the client's WAL directory and its metrics.
                self.err(
                    &format!("{path}.name"),
                    format!("name must be letters, digits, '-', '_' or '.', got {n:?}"),
                );
            }
            if c.url.is_empty() {
                self.err(&path, "url is required");
            } else if !valid_http_url(&c.url) {
                self.err(
                    &format!("{path}.url"),
                    format!("url must be an http:// or https:// URL with a host, got {:?}", c.url),
                );
            }
            let name = c.name.clone().unwrap_or_else(|| c.url.clone());
            if let Some(first) = names.insert(name, i) {
                self.err(
                    &format!("{path}.url"),
                    format!("clients {first} and {i} would share one queue; give them distinct `name`s or URLs"),
                );
            }
            let client = HttpClient {
                basic_auth: c.basic_auth.as_ref(),
                authorization: c.authorization.as_ref(),
                bearer_token: c.bearer_token.as_deref(),
                bearer_token_file: c.bearer_token_file.as_deref(),
                tls: c.tls_config.as_ref(),
            };
            self.http_client(&path, &client);
            if c.backoff_config.min_period > c.backoff_config.max_period {
                self.err(
                    &format!("{path}.backoff_config.min_period"),
                    "min_period must not be greater than max_period",
                );
            }
            if c.batchsize.0 == 0 {
                self.err(&format!("{path}.batchsize"), "batchsize must be greater than 0");
            }
            if c.max_shards == 0 {
                self.err(&format!("{path}.max_shards"), "max_shards must be greater than 0");
            }
            for name in c.external_labels.keys() {
                if !valid_label_name(name) {
                    self.err(
                        &format!("{path}.external_labels.{name}"),
                        format!("{name:?} is not a valid label name"),
                    );
                }
            }
        }
        if l.max_open_files == 0 {
            self.err("logs.max_open_files", "max_open_files must be greater than 0");
        }
        let mut jobs: HashMap<&str, usize> = HashMap::new();
        for (i, sc) in l.scrape_configs.iter().enumerate() {
            let path = format!("logs.scrape_configs[{i}]");
            if sc.job_name.is_empty() {
                self.err(&path, "job_name is required");
            } else if let Some(first) = jobs.insert(&sc.job_name, i) {
                jobs.insert(&sc.job_name, first);
                self.err(
                    &format!("{path}.job_name"),
                    format!("found multiple logs scrape configs with job name {:?}", sc.job_name),
                );
            }
            self.log_scrape(&path, sc);
        }
    }

    fn log_scrape(&mut self, path: &str, sc: &LogScrapeConfig) {
        let sources = usize::from(!sc.static_configs.is_empty())
            + usize::from(!sc.kubernetes_sd_configs.is_empty())
            + usize::from(sc.kubernetes_pods.is_some());
        if sources == 0 {
            self.err(
                path,
                "a logs scrape config needs static_configs, kubernetes_sd_configs or kubernetes_pods",
            );
        } else if sources > 1 {
            self.err(
                path,
                "static_configs, kubernetes_sd_configs and kubernetes_pods are exclusive; use one per job",
            );
        }
        for (j, st) in sc.static_configs.iter().enumerate() {
            let spath = format!("{path}.static_configs[{j}]");
            match st.labels.get("__path__") {
                None => self.err(
                    &format!("{spath}.labels"),
                    "labels must include __path__ (a glob of the files to tail)",
                ),
                Some(p) if p.is_empty() => self.err(&format!("{spath}.labels.__path__"), "__path__ must not be empty"),
                Some(p) => {
                    if let Err(e) = glob::Pattern::new(p) {
                        self.err(&format!("{spath}.labels.__path__"), format!("invalid glob {p:?}: {e}"));
                    }
                }
            }
            for name in st.labels.keys() {
                if !valid_label_name(name) {
                    self.err(
                        &format!("{spath}.labels.{name}"),
                        format!("{name:?} is not a valid label name"),
                    );
                }
            }
        }
        for (j, k8s) in sc.kubernetes_sd_configs.iter().enumerate() {
            self.kubernetes(&format!("{path}.kubernetes_sd_configs[{j}]"), k8s);
        }
        if sc.kubernetes_pods.as_ref().is_some_and(|k| k.root.is_empty()) {
            self.err(&format!("{path}.kubernetes_pods.root"), "root must not be empty");
        }
        for (j, rc) in sc.relabel_configs.iter().enumerate() {
            self.relabel(&format!("{path}.relabel_configs[{j}]"), rc);
        }
        self.stages(&format!("{path}.pipeline_stages"), &sc.pipeline_stages);
    }

    /// `cri` and `docker` parse in the tailer (they merge partial lines): only at the top level.
    fn nested_format_stages(&mut self, path: &str, stages: &[Stage]) {
        for (i, st) in stages.iter().enumerate() {
            match st {
                Stage::Cri(_) | Stage::Docker(_) => self.err(
                    &format!("{path}[{i}]"),
                    "cri and docker stages must be at the top level of pipeline_stages (they parse container lines as they are read)",
                ),
                Stage::Match(m) => self.nested_format_stages(&format!("{path}[{i}].match.stages"), &m.stages),
                _ => {}
            }
        }
    }

    fn regex_field(&mut self, path: &str, re: &str, required: bool) {
        if re.is_empty() {
            if required {
                self.err(path, "a regular expression is required");
            }
        } else if let Err(e) = regex::Regex::new(re) {
            self.err(path, format!("invalid regular expression {re:?}: {}", regex_reason(&e)));
        }
    }

    fn stages(&mut self, path: &str, stages: &[Stage]) {
        for (i, st) in stages.iter().enumerate() {
            let p = format!("{path}[{i}]");
            match st {
                Stage::Regex(r) => {
                    self.regex_field(&format!("{p}.regex.expression"), &r.expression, true);
                    if regex::Regex::new(&r.expression).is_ok_and(|re| re.capture_names().flatten().next().is_none()) {
                        self.err(
                            &format!("{p}.regex.expression"),
                            "the expression has no named capture group, so it extracts nothing",
                        );
                    }
                }
                Stage::Labels(m) | Stage::StructuredMetadata(m) => {
                    for name in m.keys() {
                        if !valid_label_name(name) {
                            self.err(&p, format!("{name:?} is not a valid label name"));
                        }
                    }
                }
                Stage::StaticLabels(m) => {
                    for name in m.keys() {
                        if !valid_label_name(name) {
                            self.err(
                                &format!("{p}.static_labels.{name}"),
                                format!("{name:?} is not a valid label name"),
                            );
                        }
                    }
                }
                Stage::Timestamp(t) => {
                    if t.source.is_empty() {
                        self.err(&format!("{p}.timestamp"), "source is required");
                    }
                    if t.format.is_empty() {
                        self.err(&format!("{p}.timestamp"), "format is required");
                    }
                    if let Some(a) = t
                        .action_on_failure
                        .as_deref()
                        .filter(|a| !matches!(*a, "fudge" | "skip"))
                    {
                        self.err(
                            &format!("{p}.timestamp.action_on_failure"),
                            format!("action_on_failure must be fudge or skip, got {a:?}"),
                        );
                    }
                }
                Stage::Output(o) if o.source.is_empty() => self.err(&format!("{p}.output"), "source is required"),
                Stage::Match(m) => {
                    if m.selector.is_empty() {
                        self.err(&format!("{p}.match"), "selector is required");
                    } else if let Err(e) = crate::logql::Selector::parse(&m.selector) {
                        self.err(&format!("{p}.match.selector"), format!("invalid selector: {e}"));
                    }
                    match m.action.as_deref() {
                        None | Some("keep") => {
                            if m.stages.is_empty() {
                                self.err(&format!("{p}.match"), "stages are required unless action is drop");
                            }
                        }
                        Some("drop") => {}
                        Some(a) => self.err(
                            &format!("{p}.match.action"),
                            format!("action must be keep or drop, got {a:?}"),
                        ),
                    }
                    self.stages(&format!("{p}.match.stages"), &m.stages);
                    self.nested_format_stages(&format!("{p}.match.stages"), &m.stages);
                }
                Stage::Drop(d) => {
                    if let Some(e) = &d.expression {
                        self.regex_field(&format!("{p}.drop.expression"), e, true);
                    }
                    if d.expression.is_some() && d.value.is_some() {
                        self.err(&format!("{p}.drop.value"), "expression and value cannot both be set");
                    }
                    if d.source.is_none()
                        && d.expression.is_none()
                        && d.value.is_none()
                        && d.older_than.is_none()
                        && d.longer_than.is_none()
                    {
                        self.err(
                            &format!("{p}.drop"),
                            "drop needs at least one of source, expression, value, older_than, longer_than",
                        );
                    }
                    if d.value.is_some() && d.source.is_none() {
                        self.err(&format!("{p}.drop.value"), "value needs a source");
                    }
                }
                Stage::Limit(l) if l.rate <= 0.0 || !l.rate.is_finite() => {
                    self.err(
                        &format!("{p}.limit.rate"),
                        "rate must be a positive number of entries per second",
                    );
                }
                Stage::Multiline(m) => self.regex_field(&format!("{p}.multiline.firstline"), &m.firstline, true),
                Stage::Replace(r) => self.regex_field(&format!("{p}.replace.expression"), &r.expression, true),
                Stage::Template(t) if t.source.is_empty() => {
                    self.err(&format!("{p}.template"), "source is required");
                }
                Stage::Tenant(t) => {
                    let n = usize::from(t.source.is_some())
                        + usize::from(t.label.is_some())
                        + usize::from(t.value.is_some());
                    if n != 1 {
                        self.err(
                            &format!("{p}.tenant"),
                            "exactly one of source, label and value is required",
                        );
                    }
                }
                Stage::Metrics(ms) => {
                    for (name, m) in ms {
                        let mp = format!("{p}.metrics.{name}");
                        let kind = m.kind.to_ascii_lowercase();
                        if !METRIC_TYPES.contains(&kind.as_str()) {
                            self.err(
                                &format!("{mp}.type"),
                                format!("type must be Counter, Gauge or Histogram, got {:?}", m.kind),
                            );
                            continue;
                        }
                        let full = format!("{}{name}", m.prefix.as_deref().unwrap_or("promtail_custom_"));
                        match self.metric_kinds.get(&full) {
                            Some(k) if *k != kind => {
                                let msg = format!("metric {full} is already defined as a {k}; one name has one type");
                                self.err(&format!("{mp}.type"), msg);
                            }
                            _ => {
                                self.metric_kinds.insert(full, kind.clone());
                            }
                        }
                        let action = m.config.action.as_deref().unwrap_or("");
                        let ok = match kind.as_str() {
                            "counter" => m.config.match_all == Some(true) || matches!(action, "inc" | "add"),
                            "gauge" => matches!(action, "set" | "inc" | "dec" | "add" | "sub"),
                            _ => !m.config.buckets.is_empty(),
                        };
                        if !ok {
                            let what = match kind.as_str() {
                                "counter" => "a counter needs config.action inc or add, or config.match_all: true",
                                "gauge" => "a gauge needs config.action set, inc, dec, add or sub",
                                _ => "a histogram needs config.buckets",
                            };
                            self.err(&format!("{mp}.config"), what);
                        }
                    }
                }
                _ => {}
            }
        }
    }
}
