//! The agent's configuration: a Prometheus 2.42 `prometheus.yml` (`global`, `scrape_configs`,
//! `remote_write`) plus the agent's own sections (`server`, `storage`, `file_sink`).
//!
//! Every struct denies unknown keys; keys Prometheus knows but the agent has no use for are
//! listed in [`ignored_key`] and accepted with a warning.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::units::{ByteSize, Duration};

/// The whole agent configuration file.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Defaults for every scrape config, and `external_labels` added to every series sent.
    pub global: GlobalConfig,
    /// What to scrape, as in Prometheus.
    pub scrape_configs: Vec<ScrapeConfig>,
    /// Where to send samples, as in Prometheus.
    pub remote_write: Vec<RemoteWriteConfig>,
    /// The agent's own HTTP server.
    pub server: ServerConfig,
    /// Where the agent keeps its state (WAL, positions).
    pub storage: StorageConfig,
    /// Extension: append every sample as a text line to a local file.
    pub file_sink: Option<FileSinkConfig>,
    /// Extension: tail log files and push them to Loki (Promtail's configuration).
    pub logs: Option<crate::logs::LogsConfig>,
    /// Extension: eBPF network flow metrics with Hubble's names.
    pub flows: Option<crate::flows::FlowsConfig>,
}

/// `global:` — defaults for scrape configs.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct GlobalConfig {
    /// How often to scrape targets by default.
    pub scrape_interval: Duration,
    /// How long until a scrape request times out by default.
    pub scrape_timeout: Duration,
    /// Labels added to every series sent to remote_write (and the file sink).
    pub external_labels: BTreeMap<String, String>,
    /// Default per-scrape body size limit (0 = none).
    pub body_size_limit: ByteSize,
    /// Default per-scrape sample limit (0 = none).
    pub sample_limit: u64,
    /// Default per-scrape target limit (0 = none).
    pub target_limit: u64,
    /// Default per-sample label count limit (0 = none).
    pub label_limit: u64,
    /// Default label name length limit (0 = none).
    pub label_name_length_limit: u64,
    /// Default label value length limit (0 = none).
    pub label_value_length_limit: u64,
}

impl Default for GlobalConfig {
    fn default() -> Self {
        Self {
            scrape_interval: Duration::from_secs(60),
            scrape_timeout: Duration::from_secs(10),
            external_labels: BTreeMap::new(),
            body_size_limit: ByteSize(0),
            sample_limit: 0,
            target_limit: 0,
            label_limit: 0,
            label_name_length_limit: 0,
            label_value_length_limit: 0,
        }
    }
}

/// One `scrape_configs` entry.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScrapeConfig {
    /// The job name; the default value of the `job` label. Required, unique.
    pub job_name: String,
    /// Keep the scraped labels when they clash with target labels.
    pub honor_labels: bool,
    /// Use timestamps present in the scraped data (default true).
    pub honor_timestamps: Option<bool>,
    /// How often to scrape (default: global).
    pub scrape_interval: Option<Duration>,
    /// Scrape timeout (default: global, at most the interval).
    pub scrape_timeout: Option<Duration>,
    /// HTTP path to scrape (default `/metrics`).
    pub metrics_path: Option<String>,
    /// `http` (default) or `https`.
    pub scheme: Option<String>,
    /// URL query parameters.
    pub params: BTreeMap<String, Vec<String>>,
    /// HTTP basic authentication.
    pub basic_auth: Option<BasicAuth>,
    /// `Authorization` header.
    pub authorization: Option<Authorization>,
    /// Deprecated Prometheus key: a bearer token.
    pub bearer_token: Option<String>,
    /// Deprecated Prometheus key: a file holding a bearer token.
    pub bearer_token_file: Option<String>,
    /// TLS settings for the scrape connection.
    pub tls_config: Option<TlsConfig>,
    /// Follow HTTP 3xx redirects (default true).
    pub follow_redirects: Option<bool>,
    /// Offer HTTP/2 by ALPN on HTTPS (default true, as Prometheus).
    pub enable_http2: Option<bool>,
    /// Static targets.
    pub static_configs: Vec<StaticConfig>,
    /// Targets from files, reloaded when they change.
    pub file_sd_configs: Vec<FileSdConfig>,
    /// Targets from the Kubernetes API (role `pod`).
    pub kubernetes_sd_configs: Vec<KubernetesSdConfig>,
    /// Rules applied to targets before scraping.
    pub relabel_configs: Vec<RelabelConfig>,
    /// Rules applied to scraped samples.
    pub metric_relabel_configs: Vec<RelabelConfig>,
    /// Fail the scrape when it has more samples than this after relabeling (0 = none).
    pub sample_limit: Option<u64>,
    /// Maximum number of targets after relabeling (0 = none).
    pub target_limit: Option<u64>,
    /// Fail the scrape when a sample has more labels than this (0 = none).
    pub label_limit: Option<u64>,
    /// Fail the scrape when a label name is longer than this (0 = none).
    pub label_name_length_limit: Option<u64>,
    /// Fail the scrape when a label value is longer than this (0 = none).
    pub label_value_length_limit: Option<u64>,
    /// Fail the scrape when the uncompressed body is larger than this (0 = none).
    pub body_size_limit: Option<ByteSize>,
}

/// HTTP basic authentication.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BasicAuth {
    /// User name.
    pub username: String,
    /// Password (or use `password_file`).
    pub password: Option<String>,
    /// File holding the password, relative to the config file.
    pub password_file: Option<String>,
}

/// The `Authorization` header.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Authorization {
    /// The scheme (default `Bearer`).
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// The credentials.
    pub credentials: Option<String>,
    /// File holding the credentials, relative to the config file.
    pub credentials_file: Option<String>,
}

/// TLS client settings.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// CA certificate(s) to verify the server with (PEM text).
    pub ca: Option<String>,
    /// CA certificate file.
    pub ca_file: Option<String>,
    /// Client certificate (PEM text).
    pub cert: Option<String>,
    /// Client certificate file.
    pub cert_file: Option<String>,
    /// Client key (PEM text).
    pub key: Option<String>,
    /// Client key file.
    pub key_file: Option<String>,
    /// Server name to verify (default: the target host).
    pub server_name: Option<String>,
    /// Skip verification of the server certificate.
    pub insecure_skip_verify: bool,
    /// Minimum TLS version (`TLS12`, `TLS13`).
    pub min_version: Option<String>,
}

/// `static_configs` entry.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StaticConfig {
    /// `host:port` addresses.
    pub targets: Vec<String>,
    /// Labels given to every target of this group.
    pub labels: BTreeMap<String, String>,
}

/// `file_sd_configs` entry.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileSdConfig {
    /// File patterns (`*.json`, `*.yml`, `*.yaml`), relative to the config file.
    pub files: Vec<String>,
    /// Re-read interval in addition to change notifications (default 5m).
    pub refresh_interval: Duration,
}

impl Default for FileSdConfig {
    fn default() -> Self {
        Self {
            files: Vec::new(),
            refresh_interval: Duration::from_secs(300),
        }
    }
}

/// `kubernetes_sd_configs` entry. Only role `pod` is supported.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesSdConfig {
    /// The role; only `pod`.
    pub role: String,
    /// API server URL (default: in-cluster or kubeconfig).
    pub api_server: Option<String>,
    /// Path to a kubeconfig file.
    pub kubeconfig_file: Option<String>,
    /// Namespaces to watch (default all).
    pub namespaces: Option<NamespaceDiscovery>,
    /// Label and field selectors.
    pub selectors: Vec<Selector>,
    /// Extra metadata to attach.
    pub attach_metadata: Option<AttachMetadata>,
    /// Basic auth for the API server.
    pub basic_auth: Option<BasicAuth>,
    /// Authorization for the API server.
    pub authorization: Option<Authorization>,
    /// Deprecated bearer token file for the API server.
    pub bearer_token_file: Option<String>,
    /// TLS for the API server.
    pub tls_config: Option<TlsConfig>,
    /// Follow redirects.
    pub follow_redirects: Option<bool>,
    /// HTTP/2.
    pub enable_http2: Option<bool>,
}

/// `namespaces:` of a Kubernetes SD config.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NamespaceDiscovery {
    /// Include the agent's own namespace.
    pub own_namespace: bool,
    /// Namespace names.
    pub names: Vec<String>,
}

/// A Kubernetes selector.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Selector {
    /// The role this selector applies to.
    pub role: String,
    /// A label selector.
    pub label: Option<String>,
    /// A field selector.
    pub field: Option<String>,
}

/// `attach_metadata:` of a Kubernetes SD config.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AttachMetadata {
    /// Attach node labels (needs nodes get/list/watch).
    pub node: bool,
}

/// A Prometheus relabel rule.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelabelConfig {
    /// Labels whose values are joined with `separator` and matched against `regex`.
    pub source_labels: Vec<String>,
    /// Separator between concatenated source values (default `;`).
    pub separator: String,
    /// Regular expression, fully anchored (default `(.*)`).
    pub regex: String,
    /// Modulus for `hashmod`.
    pub modulus: Option<u64>,
    /// Label written by `replace`, `hashmod`, `lowercase`, `uppercase`; compared by `keepequal`/`dropequal`.
    pub target_label: Option<String>,
    /// Replacement, with `$1`/`${1}`/`$name` references (default `$1`).
    pub replacement: String,
    /// The action (default `replace`).
    pub action: String,
}

impl Default for RelabelConfig {
    fn default() -> Self {
        Self {
            source_labels: Vec::new(),
            separator: ";".to_owned(),
            regex: "(.*)".to_owned(),
            modulus: None,
            target_label: None,
            replacement: "$1".to_owned(),
            action: "replace".to_owned(),
        }
    }
}

/// One `remote_write` entry.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RemoteWriteConfig {
    /// Receiver URL. Required.
    pub url: String,
    /// Name for metrics and logs (default: a hash of the config).
    pub name: Option<String>,
    /// Request timeout (default 30s).
    pub remote_timeout: Option<Duration>,
    /// Extra HTTP headers.
    pub headers: BTreeMap<String, String>,
    /// Rules applied to series before sending.
    pub write_relabel_configs: Vec<RelabelConfig>,
    /// Basic authentication.
    pub basic_auth: Option<BasicAuth>,
    /// Authorization header.
    pub authorization: Option<Authorization>,
    /// Deprecated bearer token.
    pub bearer_token: Option<String>,
    /// Deprecated bearer token file.
    pub bearer_token_file: Option<String>,
    /// TLS settings.
    pub tls_config: Option<TlsConfig>,
    /// Follow redirects.
    pub follow_redirects: Option<bool>,
    /// HTTP/2.
    pub enable_http2: Option<bool>,
    /// Send exemplars (accepted; exemplars are not sent yet).
    pub send_exemplars: Option<bool>,
    /// Send native histograms (accepted; not produced).
    pub send_native_histograms: Option<bool>,
    /// Queue tuning.
    pub queue_config: QueueConfig,
}

/// `queue_config:` of a remote_write entry, with Prometheus's defaults.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// Samples buffered per shard before reading more from the WAL.
    pub capacity: usize,
    /// Maximum number of shards.
    pub max_shards: usize,
    /// Minimum (and starting) number of shards.
    pub min_shards: usize,
    /// Maximum samples per request.
    pub max_samples_per_send: usize,
    /// Longest a sample waits in a shard before it is sent.
    pub batch_send_deadline: Duration,
    /// First retry delay.
    pub min_backoff: Duration,
    /// Longest retry delay.
    pub max_backoff: Duration,
    /// Retry on 429 (default true).
    pub retry_on_http_429: bool,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            capacity: 2500,
            max_shards: 200,
            min_shards: 1,
            max_samples_per_send: 500,
            batch_send_deadline: Duration::from_secs(5),
            min_backoff: Duration::from_millis(30),
            max_backoff: Duration::from_secs(5),
            retry_on_http_429: true,
        }
    }
}

/// `server:` — the agent's own HTTP server.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address of `/metrics`, `/healthz`, `/readyz`, `/status`, `/-/reload`.
    pub listen_address: String,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen_address: "0.0.0.0:9500".to_owned(),
        }
    }
}

/// `storage:` — where state lives.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// State directory, relative to the working directory (default `data`).
    pub path: String,
    /// Upper bound of the on-disk write-ahead queue (default 1GiB); oldest data is evicted.
    pub wal_max_size: ByteSize,
    /// How long SIGTERM waits for the receiver before leaving the rest in the WAL.
    pub shutdown_timeout: Duration,
    /// When WAL appends are flushed to disk (default `1s`): `never`, `always` or an interval.
    pub wal_fsync: crate::units::WalFsync,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            path: "data".to_owned(),
            wal_max_size: ByteSize(1 << 30),
            shutdown_timeout: Duration::from_secs(10),
            wal_fsync: crate::units::WalFsync::Interval(Duration::from_secs(1)),
        }
    }
}

/// `file_sink:` — append every sample as `name{labels} value timestamp_ms`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileSinkConfig {
    /// File to append to; `-` is standard output.
    pub path: String,
}

/// Keys that Prometheus 2.42 accepts but the agent has no use for, per struct (serde's
/// struct name). They are accepted with one warning each.
pub fn ignored_key(strukt: &str, key: &str) -> bool {
    let keys: &[&str] = match strukt {
        "AgentConfig" => &[
            "rule_files",
            "alerting",
            "remote_read",
            "tracing",
            "scrape_config_files",
        ],
        "GlobalConfig" => &["evaluation_interval", "query_log_file", "keep_dropped_targets"],
        "ScrapeConfig" => &[
            "no_proxy",
            "proxy_from_environment",
            "proxy_connect_header",
            "scrape_classic_histograms",
            "native_histogram_bucket_limit",
            "keep_dropped_targets",
            "track_timestamps_staleness",
            "scrape_protocols",
            "enable_compression",
            "azure_sd_configs",
            "consul_sd_configs",
            "digitalocean_sd_configs",
            "docker_sd_configs",
            "dockerswarm_sd_configs",
            "dns_sd_configs",
            "ec2_sd_configs",
            "eureka_sd_configs",
            "gce_sd_configs",
            "hetzner_sd_configs",
            "http_sd_configs",
            "ionos_sd_configs",
            "kuma_sd_configs",
            "lightsail_sd_configs",
            "linode_sd_configs",
            "marathon_sd_configs",
            "nerve_sd_configs",
            "nomad_sd_configs",
            "openstack_sd_configs",
            "ovhcloud_sd_configs",
            "puppetdb_sd_configs",
            "scaleway_sd_configs",
            "serverset_sd_configs",
            "triton_sd_configs",
            "uyuni_sd_configs",
            "vultr_sd_configs",
        ],
        "RemoteWriteConfig" => &[
            "no_proxy",
            "proxy_from_environment",
            "proxy_connect_header",
            "metadata_config",
        ],
        "StorageConfig" => &["tsdb", "exemplars"],
        "KubernetesSdConfig" => &["no_proxy", "proxy_from_environment", "proxy_connect_header"],
        "QueueConfig" => &["sample_age_limit"],
        "TlsConfig" => &["max_version"],
        "LogsConfig" => crate::logs::IGNORED_LOGS_KEYS,
        "ClientConfig" => &[
            "proxy_url",
            "no_proxy",
            "proxy_from_environment",
            "proxy_connect_header",
            "follow_redirects",
            "enable_http2",
            "drop_rate_limited_batches",
            "stream_lag_labels",
        ],
        _ => &[],
    };
    keys.contains(&key)
}
