//! `validate`: proves the lab end to end through the services' own HTTP APIs — the agent's
//! series are in Prometheus (it pushed them by remote_write), pod logs are in Loki, flow
//! metrics exist, Grafana's datasources answer. URLs come from port-forwards or flags.

use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

/// Where the services answer.
#[derive(Clone, Debug, Default)]
pub struct Endpoints {
    /// Prometheus base URL.
    pub prometheus: Option<String>,
    /// Loki base URL.
    pub loki: Option<String>,
    /// Grafana base URL.
    pub grafana: Option<String>,
    /// Grafana admin password.
    pub grafana_password: Option<String>,
}

/// One check's result.
#[derive(Clone, Debug, Serialize)]
pub struct Finding {
    /// What was checked.
    pub check: String,
    /// Whether it holds.
    pub ok: bool,
    /// What was seen.
    pub detail: String,
}

/// One HTTP client for every check (and every round of `--wait`), so connections are reused.
fn agent() -> &'static ureq::Agent {
    static AGENT: std::sync::OnceLock<ureq::Agent> = std::sync::OnceLock::new();
    AGENT.get_or_init(|| {
        ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(15)))
            .http_status_as_error(false)
            .build()
            .into()
    })
}

fn get_json(url: &str, auth: Option<(&str, &str)>) -> Result<Value, String> {
    let mut req = agent().get(url);
    if let Some((u, p)) = auth {
        use base64::Engine as _;
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
        req = req.header("Authorization", &format!("Basic {token}"));
    }
    let mut resp = req.call().map_err(|e| format!("GET {url}: {e}"))?;
    let status = resp.status();
    let body = resp
        .body_mut()
        .read_to_string()
        .map_err(|e| format!("GET {url}: {e}"))?;
    if !status.is_success() {
        return Err(format!(
            "GET {url}: HTTP {status}: {}",
            body.chars().take(200).collect::<String>()
        ));
    }
    serde_json::from_str(&body).map_err(|e| format!("GET {url}: not JSON: {e}"))
}

fn encode_query(q: &str) -> String {
    let mut out = String::new();
    for b in q.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The value of an instant PromQL query returning one scalar-like sample (0 when empty).
fn prom_value(base: &str, query: &str) -> Result<f64, String> {
    let url = format!(
        "{}/api/v1/query?query={}",
        base.trim_end_matches('/'),
        encode_query(query)
    );
    let v = get_json(&url, None)?;
    if v["status"] != "success" {
        return Err(format!("{query}: {}", v["error"]));
    }
    let result = v["data"]["result"].as_array().cloned().unwrap_or_default();
    Ok(result
        .first()
        .and_then(|r| r["value"][1].as_str())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.0))
}

fn finding(check: &str, r: Result<(bool, String), String>) -> Finding {
    match r {
        Ok((ok, detail)) => Finding {
            check: check.into(),
            ok,
            detail,
        },
        Err(e) => Finding {
            check: check.into(),
            ok: false,
            detail: e,
        },
    }
}

/// Series the agent pushed, in Prometheus: targets up in its annotation job and, when the
/// sample app runs, the sample app's own series.
pub fn agent_series(prometheus: &str, sample_app: bool) -> Finding {
    finding(
        "agent series in Prometheus",
        (|| {
            let sample = if sample_app {
                prom_value(prometheus, "count(sample_app_requests_total)")?
            } else {
                1.0
            };
            let up = prom_value(prometheus, "count(up{job=\"kubernetes-pods\"} == 1)")?;
            let ok = sample > 0.0 && up > 0.0;
            Ok((
                ok,
                format!(
                    "{sample} sample_app_requests_total series, {up} targets up in job kubernetes-pods{}",
                    if ok {
                        ""
                    } else {
                        " — is the agent running and its remote_write reaching Prometheus? (`installer status`, the agent's /metrics)"
                    }
                ),
            ))
        })(),
    )
}

/// The agent's flow metrics in Prometheus. Cilium's Hubble exports the same names, so only
/// the agent's (`job="sre-lab-agent-flows"`) count.
pub fn flow_metrics(prometheus: &str) -> Finding {
    finding(
        "agent flow metrics in Prometheus",
        (|| {
            let n = prom_value(
                prometheus,
                r#"count(hubble_flows_processed_total{job="sre-lab-agent-flows"})"#,
            )?;
            Ok((
                n > 0.0,
                format!(
                    "{n} hubble_flows_processed_total{{job=\"sre-lab-agent-flows\"}} series{}",
                    if n > 0.0 {
                        ""
                    } else {
                        " — is the agent counting flows? (its /metrics: sre_agent_flows_active, sre_agent_flows_off)"
                    }
                ),
            ))
        })(),
    )
}

/// The sample app's log lines in Loki (the last hour).
pub fn pod_logs(loki: &str) -> Finding {
    finding(
        "pod logs in Loki",
        (|| {
            let q = encode_query("{namespace=\"sre-lab-sample\"}");
            let url = format!(
                "{}/loki/api/v1/query_range?query={q}&limit=5&since=1h",
                loki.trim_end_matches('/')
            );
            let v = get_json(&url, None)?;
            let lines: usize = v["data"]["result"]
                .as_array()
                .map(|streams| streams.iter().map(|s| s["values"].as_array().map_or(0, Vec::len)).sum())
                .unwrap_or(0);
            Ok((
                lines > 0,
                format!(
                    "{lines} recent lines from namespace sre-lab-sample{}",
                    if lines > 0 {
                        ""
                    } else {
                        " — is the agent tailing /var/log/pods and pushing to Loki?"
                    }
                ),
            ))
        })(),
    )
}

/// Every Grafana datasource of type prometheus or loki answers its health check.
pub fn grafana_datasources(grafana: &str, password: &str, loki: bool) -> Finding {
    finding(
        "Grafana datasources answer",
        (|| {
            let base = grafana.trim_end_matches('/');
            let list = get_json(&format!("{base}/api/datasources"), Some(("admin", password)))?;
            let list = list.as_array().cloned().unwrap_or_default();
            let mut seen = Vec::new();
            let mut ok = true;
            let wanted: &[&str] = if loki { &["prometheus", "loki"] } else { &["prometheus"] };
            for want in wanted.iter().copied() {
                let Some(ds) = list.iter().find(|d| d["type"] == want) else {
                    ok = false;
                    seen.push(format!("no {want} datasource"));
                    continue;
                };
                let uid = ds["uid"].as_str().unwrap_or_default();
                match get_json(
                    &format!("{base}/api/datasources/uid/{uid}/health"),
                    Some(("admin", password)),
                ) {
                    Ok(h) if h["status"] == "OK" => {
                        seen.push(format!("{} ({want}) OK", ds["name"].as_str().unwrap_or(uid)))
                    }
                    Ok(h) => {
                        ok = false;
                        seen.push(format!(
                            "{} ({want}): {}",
                            ds["name"].as_str().unwrap_or(uid),
                            h["message"]
                        ));
                    }
                    Err(e) => {
                        ok = false;
                        seen.push(e);
                    }
                }
            }
            Ok((ok, seen.join("; ")))
        })(),
    )
}

/// Which checks apply to a lab (add-ons that are off are skipped, not failed).
#[derive(Clone, Copy, Debug)]
pub struct Applicable {
    /// The agent ships to Prometheus.
    pub agent_series: bool,
    /// The agent counts flows (its eBPF overlay runs where Cilium does) and ships them.
    pub flows: bool,
    /// Loki receives logs.
    pub logs: bool,
    /// Grafana runs.
    pub grafana: bool,
    /// The sample app runs (its series are the proof of the annotation path).
    pub sample_app: bool,
    /// Loki runs (Grafana then has a Loki datasource).
    pub loki: bool,
}

impl Applicable {
    /// From the lab file.
    pub fn of(lab: &config::lab::LabConfig) -> Self {
        let a = &lab.addons;
        Self {
            agent_series: a.agent && a.prometheus,
            flows: a.agent && a.cilium && a.prometheus,
            logs: a.agent && a.loki,
            grafana: a.grafana,
            sample_app: a.sample_app,
            loki: a.loki,
        }
    }
}

fn missing(check: &str, what: &str) -> Finding {
    Finding {
        check: check.into(),
        ok: false,
        detail: format!("no {what} to ask"),
    }
}

fn skipped(check: &str, why: &str) -> Finding {
    Finding {
        check: check.into(),
        ok: true,
        detail: format!("skipped: {why}"),
    }
}

/// Runs the checks that apply.
pub fn run(e: &Endpoints, which: Applicable) -> Vec<Finding> {
    let agent = match (&e.prometheus, which.agent_series) {
        (_, false) => skipped(
            "agent series in Prometheus",
            "the agent or Prometheus is off in the lab file",
        ),
        (Some(p), true) => agent_series(p, which.sample_app),
        (None, true) => missing("agent series in Prometheus", "Prometheus"),
    };
    let flows = match (&e.prometheus, which.flows) {
        (_, false) => skipped(
            "agent flow metrics in Prometheus",
            "the agent, Cilium (the agent's eBPF overlay) or Prometheus is off in the lab file",
        ),
        (Some(p), true) => flow_metrics(p),
        (None, true) => missing("agent flow metrics in Prometheus", "Prometheus"),
    };
    let logs = match (&e.loki, which.logs) {
        (_, false) => skipped("pod logs in Loki", "the agent or Loki is off in the lab file"),
        (Some(l), true) => pod_logs(l),
        (None, true) => missing("pod logs in Loki", "Loki"),
    };
    let grafana = match (&e.grafana, &e.grafana_password, which.grafana) {
        (_, _, false) => skipped("Grafana datasources answer", "Grafana is off in the lab file"),
        (Some(g), Some(p), true) => grafana_datasources(g, p, which.loki),
        _ => missing("Grafana datasources answer", "Grafana"),
    };
    vec![agent, flows, logs, grafana]
}

/// [`run`] again and again until every check passes or `wait` has passed (right after `up`,
/// series and log lines take a scrape interval or two to arrive).
pub fn run_until(e: &Endpoints, which: Applicable, wait: Duration) -> Vec<Finding> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        let findings = run(e, which);
        if findings.iter().all(|f| f.ok) || std::time::Instant::now() >= deadline {
            return findings;
        }
        std::thread::sleep(Duration::from_secs(5).min(deadline.saturating_duration_since(std::time::Instant::now())));
    }
}
