//! Loading YAML into the agent configuration: the happy path, every error kind with its exact
//! `FILE:LINE:COL: message`, environment expansion, ignored keys, anchors and validation.

use std::collections::BTreeMap;

use config::agent::AgentConfig;
use config::{agent_config_from_str, from_str, ConfigError, Duration, Pos};
use serde::Deserialize;

fn test_env(name: &str) -> Option<String> {
    match name {
        "CLUSTER" => Some("prod".to_owned()),
        "A" => Some("alpha".to_owned()),
        "INTERVAL" => Some("20s".to_owned()),
        "LIMIT" => Some("100".to_owned()),
        _ => None,
    }
}

fn load(text: &str) -> config::Loaded<AgentConfig> {
    match agent_config_from_str(text, "agent.yml", &test_env) {
        Ok(l) => l,
        Err(errors) => panic!("unexpected errors:\n{}", lines(&errors).join("\n")),
    }
}

fn lines(errors: &[ConfigError]) -> Vec<String> {
    errors.iter().map(ToString::to_string).collect()
}

/// The errors `text` produces, as displayed.
fn errors(text: &str) -> Vec<String> {
    match agent_config_from_str(text, "agent.yml", &test_env) {
        Ok(_) => panic!("expected errors for:\n{text}"),
        Err(errors) => lines(&errors),
    }
}

mod loads {
    use super::*;

    #[test]
    fn realistic_prometheus_yml() {
        let text = include_str!("../testdata/prometheus.yml");
        let loaded =
            agent_config_from_str(text, "prometheus.yml", &test_env).unwrap_or_else(|e| panic!("{:#?}", lines(&e)));
        let cfg = &loaded.value;
        assert_eq!(cfg.global.scrape_interval, Duration::from_secs(15));
        assert_eq!(cfg.global.external_labels["cluster"], "prod");
        let jobs: Vec<_> = cfg.scrape_configs.iter().map(|s| s.job_name.as_str()).collect();
        assert_eq!(jobs, ["prometheus", "node", "files", "kubernetes-pods"]);

        // Defaults filled from global.
        let prom = &cfg.scrape_configs[0];
        assert_eq!(prom.scrape_interval, Some(Duration::from_secs(15)));
        assert_eq!(prom.scrape_timeout, Some(Duration::from_secs(10)));
        assert_eq!(prom.metrics_path.as_deref(), Some("/metrics"));
        assert_eq!(prom.scheme.as_deref(), Some("http"));
        assert_eq!(prom.static_configs[0].labels["tier"], "monitoring");
        let node = &cfg.scrape_configs[1];
        assert_eq!(node.scrape_timeout, Some(Duration::from_secs(20)));
        assert_eq!(node.static_configs[0].targets, ["node-a:9100", "node-b:9100"]);

        let files = &cfg.scrape_configs[2];
        assert_eq!(files.file_sd_configs[0].refresh_interval, Duration::from_secs(60));
        assert_eq!(files.relabel_configs[0].regex, r"(.*):\d+");
        assert_eq!(files.relabel_configs[0].replacement, "$1");

        let k8s = &cfg.scrape_configs[3];
        assert!(k8s.honor_labels);
        assert_eq!(k8s.kubernetes_sd_configs[0].role, "pod");
        assert_eq!(k8s.relabel_configs[1].replacement, "$1:$2");
        assert_eq!(k8s.relabel_configs[4].modulus, Some(4));
        assert_eq!(k8s.sample_limit, Some(50000));
        assert_eq!(k8s.body_size_limit, Some(config::ByteSize(10 << 20)));
        // The anchored rule is shared.
        assert_eq!(k8s.metric_relabel_configs, node.metric_relabel_configs[..1]);
        assert_eq!(k8s.metric_relabel_configs[0].regex, "go_gc_.*");

        let rw = &cfg.remote_write[0];
        assert_eq!(rw.queue_config.max_shards, 50);
        assert_eq!(rw.queue_config.min_backoff, Duration::from_millis(30));
        assert_eq!(rw.headers["X-Scope-OrgID"], "tenant-1");
        assert_eq!(cfg.storage.wal_max_size, config::ByteSize(2 << 30));

        assert_eq!(
            loaded.warnings.iter().map(ToString::to_string).collect::<Vec<_>>(),
            [
                "prometheus.yml:5:3: global: key `evaluation_interval` is accepted for Prometheus compatibility and ignored",
                "prometheus.yml:10:1: key `rule_files` is accepted for Prometheus compatibility and ignored",
            ]
        );
        assert_eq!(
            loaded.spans.get("scrape_configs[1].metric_relabel_configs[1].regex"),
            Some(Pos { line: 33, column: 16 })
        );
        assert_eq!(
            loaded.spans.get("scrape_configs[3].job_name"),
            Some(Pos { line: 46, column: 15 })
        );
    }

    #[test]
    fn from_a_file() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/prometheus.yml");
        let loaded = config::load_agent_config(&path).unwrap_or_else(|e| panic!("{:#?}", lines(&e)));
        assert_eq!(loaded.value.scrape_configs.len(), 4);
        let missing = config::load_agent_config(std::path::Path::new("/nonexistent/agent.yml")).unwrap_err();
        assert!(lines(&missing)[0].starts_with("/nonexistent/agent.yml: cannot read configuration file: "));
    }

    #[test]
    fn empty_file_is_all_defaults() {
        for text in ["", "# nothing yet\n", "scrape_configs:\nremote_write:\n"] {
            let loaded = load(text);
            let mut expected = AgentConfig::default();
            config::apply_defaults(&mut expected);
            assert_eq!(loaded.value, expected, "{text:?}");
        }
    }

    #[test]
    fn anchors_aliases_and_merge_keys() {
        let text = "\
scrape_configs:
  - &base
    job_name: a
    scrape_interval: 30s
    static_configs: [{targets: ['x:1']}]
  - <<: *base
    job_name: b
";
        let cfg = load(text).value;
        assert_eq!(cfg.scrape_configs[1].job_name, "b");
        assert_eq!(cfg.scrape_configs[1].scrape_interval, Some(Duration::from_secs(30)));
        assert_eq!(
            cfg.scrape_configs[1].static_configs,
            cfg.scrape_configs[0].static_configs
        );
    }

    #[test]
    fn scalars_are_typed_like_prometheus() {
        let text = "\
scrape_configs:
  - job_name: 123
    honor_labels: yes
    honor_timestamps: false
    sample_limit: ${LIMIT}
    scrape_interval: ${INTERVAL}
    bearer_token: ${UNSET_TOKEN:-}
    params:
      module: [http_2xx]
";
        let sc = &load(text).value.scrape_configs[0];
        assert_eq!(sc.job_name, "123");
        assert!(sc.honor_labels);
        assert_eq!(sc.honor_timestamps, Some(false));
        assert_eq!(sc.sample_limit, Some(100));
        assert_eq!(sc.scrape_interval, Some(Duration::from_secs(20)));
        assert_eq!(sc.bearer_token, None);
        assert_eq!(sc.params["module"], ["http_2xx"]);
    }
}

mod env_expansion {
    use super::*;

    #[derive(Debug, Deserialize)]
    struct Doc {
        values: BTreeMap<String, String>,
    }

    fn expand(value: &str) -> Result<String, Vec<String>> {
        let text = format!("values:\n  v: '{value}'\n");
        let never = |_: &str, _: &str| false;
        from_str::<Doc>(&text, "x.yml", &test_env, &never)
            .map(|l| l.value.values["v"].clone())
            .map_err(|e| lines(&e))
    }

    #[test]
    fn rules() {
        assert_eq!(expand("${A}").unwrap(), "alpha");
        assert_eq!(expand("${A:-x}").unwrap(), "alpha");
        assert_eq!(expand("${NOPE:-x}").unwrap(), "x");
        assert_eq!(expand("$$").unwrap(), "$");
        assert_eq!(expand("$${A}").unwrap(), "${A}");
        assert_eq!(expand("$1").unwrap(), "$1");
        assert_eq!(expand("${1}").unwrap(), "${1}");
        assert_eq!(expand("$name-${2}").unwrap(), "$name-${2}");
    }

    #[test]
    fn relabel_replacement_references_survive() {
        let text = "\
scrape_configs:
  - job_name: j
    relabel_configs:
      - source_labels: [a, b]
        regex: (.*);(.*)
        target_label: ab
        replacement: ${1}_$2_${A}
";
        assert_eq!(
            load(text).value.scrape_configs[0].relabel_configs[0].replacement,
            "${1}_$2_alpha"
        );
    }

    #[test]
    fn unset_variable_is_an_error_at_the_scalar() {
        assert_eq!(
            errors("global:\n  external_labels:\n    cluster: \"x-${NOPE}\"\n"),
            ["agent.yml:3:14: global.external_labels.cluster: environment variable `NOPE` is not set (write ${NOPE:-default} to give a default)"]
        );
    }
}

mod errors {
    use super::*;

    #[test]
    fn unknown_key() {
        assert_eq!(
            errors("scrape_configs:\n  - job_name: a\n    foo: 1\n"),
            ["agent.yml:3:5: scrape_configs[0]: unknown key `foo` in scrape config (expected one of: job_name, honor_labels, honor_timestamps, scrape_interval, scrape_timeout, metrics_path, scheme, params, basic_auth, authorization, bearer_token, bearer_token_file, tls_config, follow_redirects, enable_http2, static_configs, file_sd_configs, kubernetes_sd_configs, relabel_configs, metric_relabel_configs, sample_limit, target_limit, label_limit, label_name_length_limit, label_value_length_limit, body_size_limit)"]
        );
    }

    #[test]
    fn unknown_keys_in_different_scrape_configs_are_all_reported() {
        let text = "\
scrape_configs:
  - job_name: a
    scrape_intervall: 10s
  - job_name: b
    metric_path: /m
globall:
  scrape_interval: 1m
";
        assert_eq!(
            errors(text),
            [
                "agent.yml:3:5: scrape_configs[0]: unknown key `scrape_intervall` in scrape config (did you mean `scrape_interval`?)",
                "agent.yml:5:5: scrape_configs[1]: unknown key `metric_path` in scrape config (did you mean `metrics_path`?)",
                "agent.yml:6:1: unknown key `globall` in agent config (did you mean `global`?)",
            ]
        );
    }

    #[test]
    fn wrong_type() {
        assert_eq!(
            errors("scrape_configs:\n  - job_name: a\n    static_configs:\n      - targets: localhost:9090\n"),
            ["agent.yml:4:18: scrape_configs[0].static_configs[0].targets: expected a sequence, got a string \"localhost:9090\""]
        );
        assert_eq!(
            errors("scrape_configs:\n  job_name: a\n"),
            ["agent.yml:2:3: scrape_configs: expected a sequence, got a mapping"]
        );
        assert_eq!(
            errors("global:\n  sample_limit: lots\n"),
            ["agent.yml:2:17: global.sample_limit: expected a non-negative integer, got a string \"lots\""]
        );
        assert_eq!(
            errors("scrape_configs:\n  - job_name: a\n    honor_labels: \"true\"\n"),
            ["agent.yml:3:19: scrape_configs[0].honor_labels: expected a boolean (true or false), got a quoted string \"true\""]
        );
    }

    #[test]
    fn bad_duration() {
        assert_eq!(
            errors("scrape_configs:\n  - job_name: a\n    scrape_interval: 15\n"),
            ["agent.yml:3:22: scrape_configs[0].scrape_interval: not a valid duration string: \"15\" (expected e.g. 15s, 1m30s, 500ms)"]
        );
    }

    #[test]
    fn duplicate_key() {
        assert_eq!(
            errors("global:\n  scrape_interval: 15s\n  scrape_interval: 30s\n"),
            ["agent.yml:3:3: duplicate key `scrape_interval` (first defined at line 2, column 3)"]
        );
    }

    #[test]
    fn syntax_error() {
        assert_eq!(
            errors("scrape_configs:\n  - job_name: a\n   static_configs: []\n"),
            ["agent.yml:3:18: YAML syntax error: while parsing a block collection, did not find expected '-' indicator"]
        );
        assert_eq!(
            errors("global: {}\n---\nglobal: {}\n"),
            ["agent.yml:2:1: a configuration file must hold one YAML document, found a second"]
        );
    }

    #[test]
    fn errors_in_several_sections_and_entries_are_all_reported() {
        let text = "\
global:
  scrape_interval: soon
scrape_configs:
  - job_name: a
    scrape_timeout: 5
    sample_limit: -1
  - job_name: b
  - job_name: c
    static_configs: oops
remote_write:
  - url: http://r/push
    queue_config:
      max_shards: many
storage:
  wal_max_size: 1XB
";
        assert_eq!(
            errors(text),
            [
                "agent.yml:2:20: global.scrape_interval: not a valid duration string: \"soon\" (expected e.g. 15s, 1m30s, 500ms)",
                "agent.yml:5:21: scrape_configs[0].scrape_timeout: not a valid duration string: \"5\" (expected e.g. 15s, 1m30s, 500ms)",
                "agent.yml:6:19: scrape_configs[0].sample_limit: expected a non-negative integer, got an integer \"-1\"",
                "agent.yml:9:21: scrape_configs[2].static_configs: expected a sequence, got a string \"oops\"",
                "agent.yml:13:19: remote_write[0].queue_config.max_shards: expected a non-negative integer, got a string \"many\"",
                "agent.yml:15:17: storage.wal_max_size: unknown size unit \"XB\" in \"1XB\" (expected B, KB, MB, GB, TB, KiB, MiB, GiB or TiB)",
            ]
        );
    }

    /// Regression: a `labelmap` whose replacement cannot make a label name passed
    /// check-config and failed at start; the agent compiles rules with the same checks now.
    #[test]
    fn labelmap_replacement_and_case_actions_are_checked_like_the_agent_does() {
        assert_eq!(
            errors("scrape_configs:\n  - job_name: a\n    relabel_configs:\n      - action: labelmap\n        regex: __meta_(.+)\n        replacement: a-$1\n      - action: lowercase\n        target_label: t\n        replacement: x\n"),
            [
                "agent.yml:6:22: scrape_configs[0].relabel_configs[0].replacement: \"a-$1\" is not a valid replacement for relabel action \"labelmap\"",
                "agent.yml:9:22: scrape_configs[0].relabel_configs[1].replacement: relabel action \"lowercase\" does not allow setting replacement",
            ]
        );
    }

    #[test]
    fn kubernetes_selectors_are_checked_with_their_position() {
        let text = "scrape_configs:\n  - job_name: k\n    kubernetes_sd_configs:\n      - role: pod\n        selectors:\n          - role: pod\n            label: 'app in web'\n            field: metadata.labels=x\n          - role: pod\n";
        assert_eq!(
            errors(text),
            [
                "agent.yml:7:20: scrape_configs[0].kubernetes_sd_configs[0].selectors[0].label: invalid label selector: expected a parenthesised value list after \"in\" in \"app in web\"",
                "agent.yml:8:20: scrape_configs[0].kubernetes_sd_configs[0].selectors[0].field: invalid field selector: field \"metadata.labels\" cannot be selected on for pods (supported: metadata.name, metadata.namespace, spec.nodeName, spec.restartPolicy, spec.schedulerName, spec.serviceAccountName, spec.hostNetwork, status.phase, status.podIP, status.nominatedNodeName)",
                "agent.yml:9:13: scrape_configs[0].kubernetes_sd_configs[0].selectors[1]: only one selector per role: merge the requirements into one `label` and one `field`",
            ]
        );
    }

    #[test]
    fn storage_wal_max_size_below_a_segment_and_bad_fsync_are_errors() {
        assert_eq!(
            errors("storage:\n  wal_max_size: 512KiB\n  wal_fsync: sometimes\n"),
            [
                "agent.yml:2:17: storage.wal_max_size: wal_max_size must be at least 1MiB (the smallest WAL segment), got 512KiB",
                "agent.yml:3:14: storage.wal_fsync: \"sometimes\" is not `never`, `always` or a duration such as 1s",
            ]
        );
        for (v, want) in [
            ("never", config::units::WalFsync::Never),
            ("always", config::units::WalFsync::Always),
            (
                "250ms",
                config::units::WalFsync::Interval(config::Duration::from_millis(250)),
            ),
        ] {
            let cfg = load(&format!("storage:\n  wal_fsync: {v}\n")).value;
            assert_eq!(cfg.storage.wal_fsync, want);
        }
    }

    #[test]
    fn ignored_keys_warn_once_each() {
        let loaded = load("rule_files: [a.yml]\nalerting:\n  alertmanagers: []\nscrape_configs:\n  - job_name: a\n    scrape_classic_histograms: true\n");
        assert_eq!(
            loaded.warnings.iter().map(ToString::to_string).collect::<Vec<_>>(),
            [
                "agent.yml:1:1: key `rule_files` is accepted for Prometheus compatibility and ignored",
                "agent.yml:2:1: key `alerting` is accepted for Prometheus compatibility and ignored",
                "agent.yml:6:5: scrape_configs[0]: key `scrape_classic_histograms` is accepted for Prometheus compatibility and ignored",
            ]
        );
    }
}

mod validation {
    use super::*;

    #[test]
    fn settings_that_change_requests_are_errors_not_warnings() {
        // Ignoring these would send unauthenticated or unproxied requests and lose data.
        let e = errors("scrape_configs:\n  - job_name: a\n    proxy_url: http://p:3128\nremote_write:\n  - url: http://r/api/v1/write\n    sigv4: {}\n");
        assert!(e.iter().any(|l| l.contains("proxy_url")), "{e:?}");
        assert!(e.iter().any(|l| l.contains("sigv4")), "{e:?}");
    }

    #[test]
    fn duplicate_and_missing_job_names() {
        assert_eq!(
            errors("scrape_configs:\n  - job_name: a\n  - job_name: b\n  - job_name: a\n  - scheme: http\n"),
            [
                "agent.yml:4:15: scrape_configs[2].job_name: found multiple scrape configs with job name \"a\" (first at line 2)",
                "agent.yml:5:5: scrape_configs[3]: job_name is required",
            ]
        );
    }

    #[test]
    fn scrape_checks() {
        let text = "\
global:
  scrape_interval: 10s
scrape_configs:
  - job_name: a
    scrape_timeout: 20s
    scheme: ftp
    metrics_path: metrics
    static_configs:
      - targets: [\"http://x:80\", \"x:80/metrics\", \"ok:1\"]
    kubernetes_sd_configs:
      - role: node
    relabel_configs:
      - regex: \"(unclosed\"
        action: keep
      - action: explode
      - action: hashmod
        target_label: h
";
        assert_eq!(
            errors(text),
            [
                "agent.yml:5:21: scrape_configs[0].scrape_timeout: scrape timeout greater than scrape interval for scrape config with job name \"a\" (20s > 10s)",
                "agent.yml:6:13: scrape_configs[0].scheme: scheme must be http or https, got \"ftp\"",
                "agent.yml:7:19: scrape_configs[0].metrics_path: metrics_path must start with /, got \"metrics\"",
                "agent.yml:9:19: scrape_configs[0].static_configs[0].targets[0]: target \"http://x:80\" must be host:port without a scheme (set `scheme` instead)",
                "agent.yml:9:34: scrape_configs[0].static_configs[0].targets[1]: target \"x:80/metrics\" must be host:port without a path (set `metrics_path` instead)",
                "agent.yml:11:15: scrape_configs[0].kubernetes_sd_configs[0].role: kubernetes_sd role `node` is not supported (the agent supports role `pod`)",
                "agent.yml:13:16: scrape_configs[0].relabel_configs[0].regex: invalid regular expression \"(unclosed\": unclosed group",
                "agent.yml:15:17: scrape_configs[0].relabel_configs[1].action: unknown relabel action \"explode\" (expected one of: replace, keep, drop, keepequal, dropequal, hashmod, labelmap, labeldrop, labelkeep, lowercase, uppercase)",
                "agent.yml:16:9: scrape_configs[0].relabel_configs[2]: relabel action \"hashmod\" requires a non-zero modulus",
            ]
        );
    }

    #[test]
    fn auth_exclusivity() {
        let text = "\
scrape_configs:
  - job_name: a
    basic_auth:
      username: u
      password: p
      password_file: /f
  - job_name: b
    authorization:
      credentials: c
      credentials_file: /f
  - job_name: c
    bearer_token: t
    authorization:
      credentials: c
";
        assert_eq!(
            errors(text),
            [
                "agent.yml:6:22: scrape_configs[0].basic_auth.password_file: at most one of basic_auth password and password_file may be set",
                "agent.yml:10:25: scrape_configs[1].authorization.credentials_file: at most one of authorization credentials and credentials_file may be set",
                "agent.yml:14:7: scrape_configs[2].authorization: authorization cannot be combined with bearer_token or bearer_token_file",
            ]
        );
    }

    #[test]
    fn remote_write_and_global_checks() {
        let text = "\
global:
  external_labels:
    ok: x
    bad-name: y
remote_write:
  - name: r
  - url: ftp://r/push
    queue_config:
      min_shards: 10
      max_shards: 5
      max_samples_per_send: 0
";
        assert_eq!(
            errors(text),
            [
                "agent.yml:4:15: global.external_labels.bad-name: \"bad-name\" is not a valid label name",
                "agent.yml:6:5: remote_write[0]: url is required",
                "agent.yml:7:10: remote_write[1].url: url must be an http:// or https:// URL with a host, got \"ftp://r/push\"",
                "agent.yml:9:19: remote_write[1].queue_config.min_shards: min_shards (10) must not be greater than max_shards (5)",
                "agent.yml:11:29: remote_write[1].queue_config.max_samples_per_send: max_samples_per_send must be greater than 0",
            ]
        );
    }

    #[test]
    fn global_timeout_is_clamped_when_not_written() {
        let cfg = load("global:\n  scrape_interval: 5s\nscrape_configs:\n  - job_name: a\n").value;
        assert_eq!(cfg.global.scrape_timeout, Duration::from_secs(5));
        assert_eq!(cfg.scrape_configs[0].scrape_timeout, Some(Duration::from_secs(5)));
        assert_eq!(
            errors("global:\n  scrape_interval: 5s\n  scrape_timeout: 6s\n"),
            ["agent.yml:3:19: global.scrape_timeout: global scrape timeout greater than scrape interval (6s > 5s)"]
        );
    }
}

mod empty_values {
    use super::*;

    #[test]
    fn null_sections_are_defaults_and_null_scalars_are_placed_at_their_key() {
        let cfg = load("global:\nscrape_configs:\n  - job_name: a\n    scrape_interval:\n    static_configs:\n").value;
        assert_eq!(cfg.global.scrape_interval, Duration::from_secs(60));
        assert_eq!(cfg.scrape_configs[0].scrape_interval, Some(Duration::from_secs(60)));
        assert!(cfg.scrape_configs[0].static_configs.is_empty());
        assert_eq!(
            errors("global:\n  scrape_interval:\n  sample_limit: 5\n"),
            ["agent.yml:2:3: global.scrape_interval: empty duration string"]
        );
        assert_eq!(
            errors("scrape_configs:\n  - job_name:\n    scheme: http\n"),
            ["agent.yml:2:5: scrape_configs[0]: job_name is required"]
        );
    }
}

#[test]
fn type_errors_and_semantic_errors_are_reported_in_one_run() {
    let text = "scrape_configs:\n  - job_name: a\n    scrape_interval: 10s\n    scrape_timeout: 20s\n    honor_labels: maybe\n  - job_name: a\n";
    let errs = config::agent_config_from_str(text, "c.yml", &|_| None).unwrap_err();
    let lines: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("c.yml:5:") && l.contains("honor_labels")),
        "{lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("c.yml:4:") && l.contains("scrape timeout greater")),
        "{lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("c.yml:6:") && l.contains("job_name")),
        "{lines:#?}"
    );
}

mod logs {
    use super::*;
    use config::logs::{LokiEncoding, Stage, StartAt};

    #[test]
    fn a_pasted_promtail_config_loads() {
        let text = include_str!("../testdata/promtail.yml");
        let loaded = agent_config_from_str(text, "agent.yml", &test_env).unwrap_or_else(|e| panic!("{:#?}", lines(&e)));
        let logs = loaded.value.logs.as_ref().expect("logs section");
        let c = &logs.clients[0];
        assert_eq!(c.tenant_id.as_deref(), Some("team-a"));
        assert_eq!(c.backoff_config.max_period, Duration::from_secs(300));
        assert_eq!(c.external_labels["cluster"], "lab");
        assert_eq!(c.encoding, LokiEncoding::Protobuf);
        assert_eq!(logs.positions.filename.as_deref(), Some("/run/promtail/positions.yaml"));
        let pods = &logs.scrape_configs[0];
        assert_eq!(pods.pipeline_stages.len(), 11);
        match &pods.pipeline_stages[2] {
            Stage::Json(j) => {
                assert_eq!(j.expressions["level"], None);
                assert_eq!(j.expressions["msg"].as_deref(), Some("message"));
            }
            s => panic!("expected json, got {s:?}"),
        }
        match &pods.pipeline_stages[5] {
            Stage::Match(m) => assert_eq!(m.action.as_deref(), Some("drop")),
            s => panic!("expected match, got {s:?}"),
        }
        assert_eq!(pods.relabel_configs.len(), 8);
        assert_eq!(
            logs.scrape_configs[1].static_configs[0].labels["__path__"],
            "/var/log/**/*.log"
        );
        assert_eq!(logs.scrape_configs[2].start_at, Some(StartAt::End));
        assert_eq!(
            logs.scrape_configs[2].kubernetes_pods.as_ref().unwrap().root,
            "/var/log/pods"
        );
        // Promtail's own sections are accepted with one warning each.
        let warned: Vec<String> = loaded.warnings.iter().map(|w| w.to_string()).collect();
        assert_eq!(warned.len(), 2, "{warned:?}");
        assert!(warned[0].starts_with("agent.yml:3:3:"), "{warned:?}");
        assert!(warned[0].contains("server"), "{warned:?}");
        assert!(warned[1].contains("limits_config"), "{warned:?}");
    }

    #[test]
    fn every_ignored_promtail_key_warns_once_with_its_position() {
        let mut text = String::from("logs:\n  clients: [{url: http://l/, proxy_url: http://p/}]\n");
        for k in config::logs::IGNORED_LOGS_KEYS {
            text.push_str(&format!("  {k}: {{}}\n"));
        }
        let loaded = config::agent_config_from_str(&text, "agent.yml", &|_| None).unwrap();
        let warned: Vec<String> = loaded.warnings.iter().map(|w| w.to_string()).collect();
        assert_eq!(warned.len(), config::logs::IGNORED_LOGS_KEYS.len() + 1, "{warned:?}");
        assert!(
            warned[0].starts_with("agent.yml:2:30:") && warned[0].contains("proxy_url"),
            "{warned:?}"
        );
        for (i, k) in config::logs::IGNORED_LOGS_KEYS.iter().enumerate() {
            let w = &warned[i + 1];
            assert!(w.starts_with(&format!("agent.yml:{}:3:", i + 3)), "{w}");
            assert!(
                w.contains(&format!("`{k}`")) && w.contains("Promtail compatibility"),
                "{w}"
            );
        }
    }

    #[test]
    fn mistakes_name_file_line_and_column() {
        let text = "\
logs:
  clients:
    - url: loki:3100
  scrape_configs:
    - job_name: a
      static_configs:
        - labels: {job: a}
      pipeline_stages:
        - regex:
            expression: '(unclosed'
        - match:
            selector: 'app=\"web\"'
            stages: [{docker: {}}]
        - tenant: {}
        - metrics:
            m: {type: Summary}
    - job_name: a
      kubernetes_pods: {}
      static_configs: [{labels: {__path__: /x}}]
  bogus: 1
";
        let e = errors(text);
        let want = [
            "agent.yml:3:12: logs.clients[0].url: url must be an http:// or https:// URL with a host, got \"loki:3100\"",
            "agent.yml:7:19: logs.scrape_configs[0].static_configs[0].labels: labels must include __path__",
            "agent.yml:10:25: logs.scrape_configs[0].pipeline_stages[0].regex.expression: invalid regular expression",
            "agent.yml:12:23: logs.scrape_configs[0].pipeline_stages[1].match.selector: invalid selector: expected '{'",
            "agent.yml:14:19: logs.scrape_configs[0].pipeline_stages[2].tenant: exactly one of source, label and value",
            "agent.yml:16:23: logs.scrape_configs[0].pipeline_stages[3].metrics.m.type: type must be Counter",
            "agent.yml:17:17: logs.scrape_configs[1].job_name: found multiple logs scrape configs",
            "agent.yml:17:7: logs.scrape_configs[1]: static_configs, kubernetes_sd_configs and kubernetes_pods are exclusive",
            "agent.yml:20:3: logs: unknown key `bogus` in logs config",
        ];
        for w in want {
            assert!(
                e.iter().any(|l| l.starts_with(w)),
                "missing {w:?} in:\n{}",
                e.join("\n")
            );
        }
        let named = errors("logs:\n  clients: [{url: http://l/, name: ../x@y}]\n");
        assert!(
            named
                .iter()
                .any(|l| l.starts_with("agent.yml:2:36: logs.clients[0].name: name must be letters")),
            "{named:?}"
        );
        let nested = errors(
            "logs:\n  clients: [{url: http://l/}]\n  scrape_configs:\n    - job_name: a\n      kubernetes_pods: {}\n      pipeline_stages:\n        - match: {selector: '{a=\"b\"}', stages: [{cri: {}}]}\n",
        );
        assert!(
            nested[0].contains("pipeline_stages[0].match.stages[0]: cri and docker stages must be at the top level"),
            "{nested:?}"
        );
        assert_eq!(
            errors("logs:\n  scrape_configs:\n    - job_name: a\n      pipeline_stages: [{jsn: {}}]\n"),
            [
                "agent.yml:4:26: logs.scrape_configs[0].pipeline_stages[0].jsn: unknown value `jsn` (expected one of: \
              cri, docker, json, regex, logfmt, labels, structured_metadata, static_labels, labeldrop, labelallow, \
              timestamp, output, match, drop, limit, multiline, replace, template, tenant, metrics)"
            ]
        );
    }
}

mod flows {
    use config::flows::FlowsConfig;

    fn errors(text: &str) -> Vec<String> {
        match config::agent_config_from_str(text, "agent.yml", &|_| None) {
            Ok(_) => Vec::new(),
            Err(e) => e.iter().map(|e| e.to_string()).collect(),
        }
    }

    #[test]
    fn the_flows_section_loads_with_defaults() {
        let text = "flows:\n  enabled: true\n  interfaces: ['lxc*', 'veth*', eth0]\n  interval: 10s\n  source_context: [pod, ip]\n";
        let loaded = config::agent_config_from_str(text, "agent.yml", &|_| None).unwrap();
        let f = loaded.value.flows.unwrap();
        assert!(f.enabled);
        assert_eq!(f.interfaces, ["lxc*", "veth*", "eth0"]);
        assert_eq!(f.interval.get(), std::time::Duration::from_secs(10));
        assert_eq!(f.source_context, ["pod", "ip"]);
        assert_eq!(f.max_flows, 65_536);
        assert_eq!(f.metrics.len(), config::flows::METRICS.len());
        assert_eq!(FlowsConfig::default().effective_interfaces(), ["lxc*", "veth*"]);
        let cg = FlowsConfig {
            cgroup: Some("/sys/fs/cgroup".into()),
            ..FlowsConfig::default()
        };
        assert!(cg.effective_interfaces().is_empty());
        // Hubble's default-like contexts: the pod, else host or world.
        assert_eq!(FlowsConfig::default().source_context, ["pod", "reserved-identity"]);
    }

    #[test]
    fn contexts_take_hubbles_alternatives_written_with_a_bar() {
        let text =
            "flows:\n  source_context: ['workload-name|reserved-identity', app]\n  destination_context: ['pod | ip']\n";
        let f = config::agent_config_from_str(text, "agent.yml", &|_| None)
            .unwrap()
            .value
            .flows
            .unwrap();
        assert_eq!(
            FlowsConfig::contexts(&f.source_context),
            ["workload-name", "reserved-identity", "app"]
        );
        assert_eq!(FlowsConfig::contexts(&f.destination_context), ["pod", "ip"]);
        let e = errors("flows:\n  source_context: ['pod|labels']\n  api_server: http://a\n  kubeconfig_file: k\n");
        assert!(
            e.iter()
                .any(|l| l.starts_with("agent.yml:2:20: flows.source_context[0]: unknown context \"labels\"")),
            "{e:?}"
        );
        assert!(
            e.iter()
                .any(|l| l.contains("flows.api_server: api_server and kubeconfig_file are exclusive")),
            "{e:?}"
        );
    }

    #[test]
    fn flows_mistakes_name_file_line_and_column() {
        let e = errors(
            "flows:\n  interfaces: ['[bad']\n  cgroup: sys/fs/cgroup\n  interval: 0s\n  max_flows: 10\n  metrics: [flows-processed, dns]\n  destination_context: [pod, label]\n  bogus: 1\n",
        );
        let want = [
            "agent.yml:2:16: flows.interfaces[0]: invalid glob",
            "agent.yml:3:11: flows.cgroup: cgroup and interfaces are exclusive",
            "agent.yml:3:11: flows.cgroup: cgroup must be an absolute path",
            "agent.yml:4:13: flows.interval: interval must be more than 0s",
            "agent.yml:5:14: flows.max_flows: max_flows must be between 1024 and 16777216, got 10",
            "agent.yml:6:30: flows.metrics[1]: unknown metric \"dns\"",
            "agent.yml:7:30: flows.destination_context[1]: unknown context \"label\"",
            "agent.yml:8:3: flows: unknown key `bogus`",
        ];
        for w in want {
            assert!(
                e.iter().any(|l| l.starts_with(w)),
                "missing {w:?} in:\n{}",
                e.join("\n")
            );
        }
    }
}
