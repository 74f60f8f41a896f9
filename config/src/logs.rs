//! The agent's `logs:` section: Promtail's configuration nested one level down, so the body of
//! a `promtail.yml` can be pasted under `logs:` (`positions`, `clients`, `scrape_configs` with
//! `pipeline_stages`), plus the agent's own keys (`start_at`, `max_line_size`, the
//! `kubernetes_pods` shortcut, the client `encoding`). Promtail keys the agent has no use for
//! are accepted with a warning ([`crate::agent::ignored_key`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::agent::{Authorization, BasicAuth, KubernetesSdConfig, RelabelConfig, TlsConfig};
use crate::units::{ByteSize, Duration};

/// `logs:` — what to tail and where to push it.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogsConfig {
    /// Where read positions are kept.
    pub positions: PositionsConfig,
    /// Loki endpoints; every entry goes to each.
    pub clients: Vec<ClientConfig>,
    /// What to tail.
    pub scrape_configs: Vec<LogScrapeConfig>,
    /// Where files found at the agent's first start are read from (`beginning`, Promtail's
    /// behaviour, or `end`). Files appearing later are always read from their start.
    pub start_at: StartAt,
    /// Longest line (after merging CRI/Docker partials); longer ones are truncated and counted
    /// (default 256KiB, Loki's own default `max_line_size`; 0 = none).
    pub max_line_size: ByteSize,
    /// How often files are looked for again besides change notifications (default 10s).
    pub rescan_interval: Duration,
    /// Most files open at once; more are read in turns (default 1024).
    pub max_open_files: usize,
}

impl Default for LogsConfig {
    fn default() -> Self {
        Self {
            positions: PositionsConfig::default(),
            clients: Vec::new(),
            scrape_configs: Vec::new(),
            start_at: StartAt::Beginning,
            max_line_size: ByteSize(256 << 10),
            rescan_interval: Duration::from_secs(10),
            max_open_files: 1024,
        }
    }
}

/// Where files found at the first start are read from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StartAt {
    /// From their first byte (Promtail).
    #[default]
    Beginning,
    /// From their current end.
    End,
}

/// `positions:` as in Promtail.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PositionsConfig {
    /// The positions file (default `positions.yaml` under `storage.path`). A Promtail
    /// `positions.yaml` is read as it is.
    pub filename: Option<String>,
    /// How often positions are written (default 10s).
    pub sync_period: Duration,
    /// Start afresh instead of failing when the file is not valid YAML.
    pub ignore_invalid_yaml: bool,
}

impl Default for PositionsConfig {
    fn default() -> Self {
        Self {
            filename: None,
            sync_period: Duration::from_secs(10),
            ignore_invalid_yaml: false,
        }
    }
}

/// One Loki client, as in Promtail.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientConfig {
    /// The push URL (`http://loki:3100/loki/api/v1/push`). Required.
    pub url: String,
    /// Name of its queue (WAL directory) and in metrics (default: a hash of the URL).
    pub name: Option<String>,
    /// Sent as `X-Scope-OrgID`.
    pub tenant_id: Option<String>,
    /// Extra HTTP headers.
    pub headers: BTreeMap<String, String>,
    /// HTTP basic authentication.
    pub basic_auth: Option<BasicAuth>,
    /// `Authorization` header.
    pub authorization: Option<Authorization>,
    /// A bearer token.
    pub bearer_token: Option<String>,
    /// A file holding a bearer token.
    pub bearer_token_file: Option<String>,
    /// TLS settings.
    pub tls_config: Option<TlsConfig>,
    /// Longest an entry waits before its batch is sent (default 1s).
    pub batchwait: Duration,
    /// Largest batch in bytes of log lines (default 1MiB).
    pub batchsize: ByteSize,
    /// Request timeout (default 10s).
    pub timeout: Duration,
    /// Retry backoff.
    pub backoff_config: BackoffConfig,
    /// Labels added to every stream sent to this client.
    pub external_labels: BTreeMap<String, String>,
    /// `protobuf` (snappy, default) or `json`.
    pub encoding: LokiEncoding,
    /// Most concurrent pushes (default 4; each stream stays on one).
    pub max_shards: usize,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            name: None,
            tenant_id: None,
            headers: BTreeMap::new(),
            basic_auth: None,
            authorization: None,
            bearer_token: None,
            bearer_token_file: None,
            tls_config: None,
            batchwait: Duration::from_secs(1),
            batchsize: ByteSize(1 << 20),
            timeout: Duration::from_secs(10),
            backoff_config: BackoffConfig::default(),
            external_labels: BTreeMap::new(),
            encoding: LokiEncoding::Protobuf,
            max_shards: 4,
        }
    }
}

/// Wire format of Loki pushes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LokiEncoding {
    /// `application/x-protobuf`, snappy block compressed.
    #[default]
    Protobuf,
    /// `application/json`.
    Json,
}

/// `backoff_config:` as in Promtail.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackoffConfig {
    /// First retry delay (default 500ms).
    pub min_period: Duration,
    /// Longest retry delay (default 5m).
    pub max_period: Duration,
    /// Accepted for compatibility: exhausting it drops nothing, the entries stay in the WAL
    /// and are retried at `max_period`.
    pub max_retries: u32,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        Self {
            min_period: Duration::from_millis(500),
            max_period: Duration::from_secs(300),
            max_retries: 10,
        }
    }
}

/// One `scrape_configs` entry of the logs section.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogScrapeConfig {
    /// Name of the job. Required, unique.
    pub job_name: String,
    /// Stages every line of this job goes through.
    pub pipeline_stages: Vec<Stage>,
    /// Files by `__path__` globs in their labels.
    pub static_configs: Vec<LogStaticConfig>,
    /// Pods from the Kubernetes API (role `pod`); `relabel_configs` build `__path__`.
    pub kubernetes_sd_configs: Vec<KubernetesSdConfig>,
    /// Rules applied to targets.
    pub relabel_configs: Vec<RelabelConfig>,
    /// The shortcut: this node's `/var/log/pods` with the standard labels.
    pub kubernetes_pods: Option<KubernetesPods>,
    /// Overrides `logs.start_at` for this job.
    pub start_at: Option<StartAt>,
}

/// `static_configs` entry of a logs job: `labels.__path__` is a glob (`**` allowed).
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogStaticConfig {
    /// Ignored except for compatibility (Promtail requires `localhost`).
    pub targets: Vec<String>,
    /// Stream labels; `__path__` names the files.
    pub labels: BTreeMap<String, String>,
}

/// `kubernetes_pods:` — tail the pods of this node.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesPods {
    /// The kubelet's pod log directory (default `/var/log/pods`).
    pub root: String,
    /// Connection to the API server for pod labels (default: in-cluster or kubeconfig). Lines
    /// carry the labels their path gives when there is none.
    pub api_server: Option<String>,
    /// Path to a kubeconfig file.
    pub kubeconfig_file: Option<String>,
}

impl Default for KubernetesPods {
    fn default() -> Self {
        Self {
            root: "/var/log/pods".to_owned(),
            api_server: None,
            kubeconfig_file: None,
        }
    }
}

/// One pipeline stage, written as Promtail writes it: `- <name>: <options>`.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Parse CRI lines (time, stream, message; partials merged).
    Cri(CriStage),
    /// Parse Docker json-file lines.
    Docker(EmptyStage),
    /// Extract values from a JSON line.
    Json(JsonStage),
    /// Extract named groups of a regular expression.
    Regex(RegexStage),
    /// Extract logfmt pairs.
    Logfmt(LogfmtStage),
    /// Set stream labels from extracted values (`name: source`, source defaulting to name).
    Labels(BTreeMap<String, Option<String>>),
    /// Set structured metadata from extracted values.
    StructuredMetadata(BTreeMap<String, Option<String>>),
    /// Set stream labels to fixed values.
    StaticLabels(BTreeMap<String, String>),
    /// Remove stream labels.
    Labeldrop(Vec<String>),
    /// Keep only these stream labels.
    Labelallow(Vec<String>),
    /// Set the entry time from an extracted value.
    Timestamp(TimestampStage),
    /// Replace the line with an extracted value.
    Output(OutputStage),
    /// Run stages (or drop) for entries whose labels match a LogQL selector.
    Match(MatchStage),
    /// Drop entries.
    Drop(DropStage),
    /// Rate-limit entries.
    Limit(LimitStage),
    /// Merge lines into one entry.
    Multiline(MultilineStage),
    /// Replace what a regular expression matches.
    Replace(ReplaceStage),
    /// Set an extracted value from a Go-style template.
    Template(TemplateStage),
    /// Set the tenant of the entry.
    Tenant(TenantStage),
    /// Count entries or values into metrics on `/metrics`.
    Metrics(BTreeMap<String, MetricStage>),
}

/// A stage without options (`docker: {}`).
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EmptyStage {}

/// `cri:` options.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CriStage {
    /// Most partial lines merged into one (default 100).
    pub max_partial_lines: usize,
    /// Longest merged line (0 = `logs.max_line_size`).
    pub max_partial_line_size: ByteSize,
    /// Truncate longer merged lines (the agent always truncates; accepted for compatibility).
    pub max_partial_line_size_truncate: bool,
}

impl Default for CriStage {
    fn default() -> Self {
        Self {
            max_partial_lines: 100,
            max_partial_line_size: ByteSize(0),
            max_partial_line_size_truncate: true,
        }
    }
}

/// `json:` options.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct JsonStage {
    /// Extracted name → path into the JSON (`a.b[0]`, `"x-y"`); empty means the name.
    pub expressions: BTreeMap<String, Option<String>>,
    /// Extracted value to parse instead of the line.
    pub source: Option<String>,
    /// Drop lines that are not JSON.
    pub drop_malformed: bool,
}

/// `regex:` options.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegexStage {
    /// RE2 syntax; named groups become extracted values.
    pub expression: String,
    /// Extracted value to match instead of the line.
    pub source: Option<String>,
}

/// `logfmt:` options.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogfmtStage {
    /// Extracted name → logfmt key (empty means the name).
    pub mapping: BTreeMap<String, Option<String>>,
    /// Extracted value to parse instead of the line.
    pub source: Option<String>,
}

/// `timestamp:` options.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimestampStage {
    /// Extracted value holding the time. Required.
    pub source: String,
    /// `RFC3339`, `RFC3339Nano`, `Unix`, `UnixMs`, `UnixUs`, `UnixNs`, another Go layout name, or
    /// a Go reference-time layout (`2006-01-02 15:04:05`).
    pub format: String,
    /// Tried in order when `format` fails.
    pub fallback_formats: Vec<String>,
    /// IANA time zone for layouts without one.
    pub location: Option<String>,
    /// `fudge` (default: keep the read time) or `skip`.
    pub action_on_failure: Option<String>,
}

/// `output:` options.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutputStage {
    /// Extracted value that becomes the line. Required.
    pub source: String,
}

/// `match:` options.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MatchStage {
    /// LogQL stream selector, optionally with line filters (`{app="web"} |= "error"`). Required.
    pub selector: String,
    /// Name in metrics.
    pub pipeline_name: Option<String>,
    /// `keep` (default: run `stages`) or `drop`.
    pub action: Option<String>,
    /// Reason counted when `action: drop` drops (default `match_stage`).
    pub drop_counter_reason: Option<String>,
    /// Stages run for matching entries.
    pub stages: Vec<Stage>,
}

/// `drop:` options; every condition given must hold.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DropStage {
    /// Extracted value(s) to test instead of the line (a name or a list).
    pub source: Option<StringOrList>,
    /// Joins several sources (default `;`).
    pub separator: Option<String>,
    /// Drop when this regular expression matches.
    pub expression: Option<String>,
    /// Drop when the source equals this.
    pub value: Option<String>,
    /// Drop entries older than this.
    pub older_than: Option<Duration>,
    /// Drop lines longer than this.
    pub longer_than: Option<ByteSize>,
    /// Reason counted (default `drop_stage`).
    pub drop_counter_reason: Option<String>,
}

/// A name or a list of names.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum StringOrList {
    /// One.
    One(String),
    /// Several.
    Many(Vec<String>),
}

impl StringOrList {
    /// The names.
    pub fn names(&self) -> Vec<String> {
        match self {
            StringOrList::One(s) => vec![s.clone()],
            StringOrList::Many(v) => v.clone(),
        }
    }
}

/// `limit:` options.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitStage {
    /// Entries per second. Required.
    pub rate: f64,
    /// Burst size (default: rate).
    pub burst: Option<u64>,
    /// Drop over-limit entries (default false: wait, which slows reading).
    pub drop: bool,
    /// A separate limit per value of this label.
    pub by_label_name: Option<String>,
    /// Most label values tracked with `by_label_name` (default 10000).
    pub max_distinct_labels: Option<usize>,
}

/// `multiline:` options.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MultilineStage {
    /// A line matching this starts a new entry. Required.
    pub firstline: String,
    /// Longest a merged entry waits for more lines (default 3s).
    pub max_wait_time: Option<Duration>,
    /// Most lines in one entry (default 128).
    pub max_lines: Option<usize>,
}

/// `replace:` options.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplaceStage {
    /// What to replace (capture groups, or the whole match). Required.
    pub expression: String,
    /// Extracted value to change instead of the line.
    pub source: Option<String>,
    /// The replacement (a template; `{{ .Value }}` is the matched text).
    pub replace: String,
}

/// `template:` options.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TemplateStage {
    /// Extracted value written (created if missing). Required.
    pub source: String,
    /// The template (`{{ .Value }}`, `{{ .name }}`, `{{ ToUpper .Value }}`, …).
    pub template: String,
}

/// `tenant:` options; exactly one of the three.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TenantStage {
    /// Extracted value naming the tenant.
    pub source: Option<String>,
    /// Stream label naming the tenant.
    pub label: Option<String>,
    /// A fixed tenant.
    pub value: Option<String>,
}

/// One metric of a `metrics:` stage.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricStage {
    /// `Counter`, `Gauge` or `Histogram`.
    #[serde(rename = "type")]
    pub kind: String,
    /// HELP text.
    pub description: Option<String>,
    /// Extracted value used (default: the metric's name).
    pub source: Option<String>,
    /// Name prefix (default `promtail_custom_`).
    pub prefix: Option<String>,
    /// Series not updated for this long are removed (default 5m).
    pub max_idle_duration: Option<Duration>,
    /// What to do with the value.
    pub config: MetricAction,
}

/// `config:` of a metric.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricAction {
    /// Counter: count every entry.
    pub match_all: Option<bool>,
    /// Counter with match_all: count line bytes.
    pub count_entry_bytes: Option<bool>,
    /// Only when the source equals this.
    pub value: Option<String>,
    /// `inc`, `add` (counter, gauge), `set`, `dec`, `sub` (gauge).
    pub action: Option<String>,
    /// Histogram buckets.
    pub buckets: Vec<f64>,
}

/// Promtail keys accepted under `logs:` with one warning each (the agent has no use for them).
pub const IGNORED_LOGS_KEYS: &[&str] = &[
    "server",
    "target_config",
    "limits_config",
    "options",
    "global",
    "tracing",
    "wal",
    "client",
];
