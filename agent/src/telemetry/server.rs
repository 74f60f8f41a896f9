//! The agent's HTTP server: `/metrics`, `/healthz`, `/readyz`, the status page (`/`,
//! `/status`), `/api/v1/targets` (JSON) and `POST /-/reload`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};

use super::Metrics;

/// One target as the status page shows it.
#[derive(Clone, Debug, Serialize)]
pub struct TargetView {
    /// Job name.
    pub job: String,
    /// Scrape URL.
    pub url: String,
    /// Labels after relabeling.
    pub labels: Vec<(String, String)>,
    /// Labels before relabeling.
    pub discovered_labels: Vec<(String, String)>,
    /// up / down / unknown, or "dropped"/"invalid" for targets not scraped.
    pub health: String,
    /// Last scrape start, ms since the epoch (0 = never).
    pub last_scrape_ms: i64,
    /// Last scrape duration in seconds.
    pub last_duration_seconds: f64,
    /// Samples in the last scrape.
    pub last_samples: u64,
    /// Last error, empty when fine.
    pub last_error: String,
}

/// Produces the current list of targets.
pub type StatusSource = Arc<dyn Fn() -> Vec<TargetView> + Send + Sync>;

/// Produces the current list of tailed log files.
pub type FilesSource = Arc<dyn Fn() -> Vec<crate::logs::tailer::FileStatus> + Send + Sync>;

/// A reload request with its answer channel.
pub type ReloadRequest = oneshot::Sender<Result<(), String>>;

/// What the handlers need.
#[derive(Clone)]
pub struct ServerState {
    /// Self metrics.
    pub metrics: Arc<Metrics>,
    /// Target list.
    pub status: StatusSource,
    /// Tailed log files.
    pub files: FilesSource,
    /// Where `POST /-/reload` sends its request.
    pub reload: mpsc::Sender<ReloadRequest>,
}

/// Binds `addr` (before spawning, so an address in use fails start-up).
pub async fn bind(addr: &str) -> std::io::Result<TcpListener> {
    let addr: SocketAddr = addr.parse().map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("listen address {addr:?}: {e}"),
        )
    })?;
    TcpListener::bind(addr).await
}

/// Serves until `stop` turns true.
pub async fn serve(listener: TcpListener, state: ServerState, mut stop: watch::Receiver<bool>) {
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "Accepting a connection failed.");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(req, state.clone()));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn respond(status: StatusCode, ctype: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, ctype)
        .body(Full::new(body.into()))
        .unwrap_or_default()
}

async fn handle(req: Request<Incoming>, state: ServerState) -> Result<Response<Full<Bytes>>, Infallible> {
    let text = "text/plain; charset=utf-8";
    let resp = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => respond(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            state.metrics.render(),
        ),
        (&Method::GET, "/healthz") => respond(StatusCode::OK, text, "ok\n"),
        (&Method::GET, "/readyz") => {
            if state.metrics.is_ready() {
                respond(StatusCode::OK, text, "ready\n")
            } else {
                respond(StatusCode::SERVICE_UNAVAILABLE, text, "not ready\n")
            }
        }
        (&Method::GET, "/api/v1/targets") => {
            let body = serde_json::to_vec(&(state.status)()).unwrap_or_default();
            respond(StatusCode::OK, "application/json", body)
        }
        (&Method::GET, "/api/v1/files") => {
            let body = serde_json::to_vec(&(state.files)()).unwrap_or_default();
            respond(StatusCode::OK, "application/json", body)
        }
        (&Method::GET, "/" | "/status" | "/targets") => {
            let mut page = status_page(&(state.status)());
            let mut files = files_section(&(state.files)());
            files.push_str(&counters_section(&state.metrics.render(), now_secs()));
            if let Some(i) = page.rfind("</body>") {
                page.insert_str(i, &files);
            }
            respond(StatusCode::OK, "text/html; charset=utf-8", page)
        }
        (&Method::POST | &Method::PUT, "/-/reload") => {
            let (tx, rx) = oneshot::channel();
            if state.reload.send(tx).await.is_err() {
                respond(StatusCode::SERVICE_UNAVAILABLE, text, "shutting down\n")
            } else {
                match rx.await {
                    Ok(Ok(())) => respond(StatusCode::OK, text, "config reloaded\n"),
                    Ok(Err(e)) => respond(
                        StatusCode::BAD_REQUEST,
                        text,
                        format!("config not reloaded, the previous one keeps running:\n{e}\n"),
                    ),
                    Err(_) => respond(StatusCode::SERVICE_UNAVAILABLE, text, "shutting down\n"),
                }
            }
        }
        (_, "/-/reload") => respond(StatusCode::METHOD_NOT_ALLOWED, text, "use POST\n"),
        _ => respond(
            StatusCode::NOT_FOUND,
            text,
            "not found; try /status, /metrics, /healthz, /readyz\n",
        ),
    };
    Ok(resp)
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn fmt_labels(l: &[(String, String)]) -> String {
    l.iter()
        .map(|(n, v)| format!("{n}=\"{v}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

fn now_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The counters an operator looks at first, from the agent's own exposition `text`: per logs
/// job (lines and bytes read, entries written and dropped by reason, bytes lost by reason),
/// per queue (sent, pushes retried, dropped by reason, pending records) and how long ago the
/// logs positions were committed (`now` in seconds since the epoch).
pub fn counters_section(text: &str, now: f64) -> String {
    // (metric name, column heading)
    const LOGS: &[(&str, &str)] = &[
        ("sre_agent_logs_read_lines_total", "Lines read"),
        ("sre_agent_logs_read_bytes_total", "Bytes read"),
        ("sre_agent_logs_entries_written_total", "Entries written"),
        ("sre_agent_logs_entries_dropped_total", "Entries dropped"),
        ("sre_agent_logs_lost_bytes_total", "Bytes lost"),
        ("sre_agent_logs_truncated_lines_total", "Lines cut"),
    ];
    const QUEUES: &[(&str, &str)] = &[
        ("sre_agent_remote_samples_sent_total", "Sent"),
        ("sre_agent_remote_pushes_retried_total", "Pushes retried"),
        ("sre_agent_remote_samples_dropped_total", "Dropped"),
        ("sre_agent_wal_pending_records", "Pending records"),
    ];
    let mut out = String::new();
    let samples: Vec<(&str, &str, f64)> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let value: f64 = value.parse().ok()?;
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            Some((name, labels, value))
        })
        .collect();
    // One row per `key` label value; other labels (a reason) are summed into the cell and
    // listed beside it.
    let table = |title: &str, key: &str, cols: &[(&str, &str)]| -> String {
        let mut rows: std::collections::BTreeMap<String, Vec<(f64, Vec<String>)>> = Default::default();
        for (i, (metric, _)) in cols.iter().enumerate() {
            for (name, labels, v) in &samples {
                if name != metric {
                    continue;
                }
                let mut row = None;
                let mut rest = Vec::new();
                for pair in labels.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                    let Some((k, val)) = pair.split_once('=') else { continue };
                    let val = val.trim_matches('"');
                    if k == key {
                        row = Some(val.to_owned());
                    } else if *v > 0.0 {
                        rest.push(format!("{val}: {v}"));
                    }
                }
                let Some(row) = row else { continue };
                let cells = rows.entry(row).or_insert_with(|| vec![(0.0, Vec::new()); cols.len()]);
                cells[i].0 += v;
                cells[i].1.extend(rest);
            }
        }
        if rows.is_empty() {
            return String::new();
        }
        let mut h = format!("<h2>{title}</h2><table><tr><th>{}</th>", esc(key));
        for (_, head) in cols {
            h.push_str(&format!("<th>{head}</th>"));
        }
        h.push_str("</tr>");
        for (row, cells) in rows {
            h.push_str(&format!("<tr><td>{}</td>", esc(&row)));
            for (v, why) in cells {
                if why.is_empty() {
                    h.push_str(&format!("<td>{v}</td>"));
                } else {
                    h.push_str(&format!("<td>{v} ({})</td>", esc(&why.join(", "))));
                }
            }
            h.push_str("</tr>");
        }
        h.push_str("</table>");
        h
    };
    out.push_str(&table("Logs jobs", "job", LOGS));
    out.push_str(&table("Queues", "remote", QUEUES));
    if let Some((_, _, at)) = samples
        .iter()
        .find(|(n, _, _)| *n == "sre_agent_logs_positions_saved_timestamp_seconds")
    {
        if *at > 0.0 {
            out.push_str(&format!(
                "<p>Logs positions committed {:.0} s ago.</p>",
                (now - at).max(0.0)
            ));
        } else {
            out.push_str("<p>Logs positions not committed yet.</p>");
        }
    }
    out
}

/// The tailed files as a table: path, job, position, size, lag.
pub fn files_section(files: &[crate::logs::tailer::FileStatus]) -> String {
    if files.is_empty() {
        return String::new();
    }
    let mut h = format!(
        "<h2>Tailed files ({})</h2><p><a href=\"/api/v1/files\">JSON</a></p><table><tr><th>File</th><th>Job</th><th>Position</th><th>Size</th><th>Lag</th><th>State</th></tr>",
        files.len()
    );
    for f in files {
        h.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&f.path),
            esc(&f.job),
            f.offset,
            f.size,
            f.size.saturating_sub(f.offset),
            if f.rotated {
                "rotated, reading to its end"
            } else {
                "following"
            }
        ));
    }
    h.push_str("</table>");
    h
}

/// Renders the targets page, grouped by job like Prometheus's /targets.
pub fn status_page(targets: &[TargetView]) -> String {
    let mut jobs: Vec<&str> = targets.iter().map(|t| t.job.as_str()).collect();
    jobs.sort_unstable();
    jobs.dedup();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let mut h = String::from(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>sre-lab agent — targets</title>\
         <style>body{font-family:sans-serif;margin:1em}table{border-collapse:collapse;width:100%}\
         td,th{border:1px solid #ccc;padding:4px;text-align:left;vertical-align:top;font-size:13px}\
         .up{color:#070}.down{color:#b00}.unknown{color:#777}.dropped,.invalid{color:#a60}</style></head><body>",
    );
    h.push_str(&format!(
        "<h1>sre-lab agent {}</h1><p><a href=\"/metrics\">/metrics</a> · <a href=\"/api/v1/targets\">JSON</a></p>",
        env!("CARGO_PKG_VERSION")
    ));
    for job in jobs {
        let ts: Vec<&TargetView> = targets.iter().filter(|t| t.job == job).collect();
        let up = ts.iter().filter(|t| t.health == "up").count();
        h.push_str(&format!("<h2>{} ({up}/{} up)</h2><table><tr><th>Endpoint</th><th>State</th><th>Labels</th><th>Last scrape</th><th>Duration</th><th>Samples</th><th>Error</th></tr>", esc(job), ts.len()));
        for t in ts {
            let ago = if t.last_scrape_ms > 0 {
                format!("{:.1}s ago", (now - t.last_scrape_ms) as f64 / 1000.0)
            } else {
                "never".into()
            };
            h.push_str(&format!(
                "<tr><td>{}</td><td class=\"{}\">{}</td><td title=\"discovered: {}\">{}</td><td>{ago}</td><td>{:.3}s</td><td>{}</td><td>{}</td></tr>",
                esc(&t.url),
                esc(&t.health),
                esc(&t.health),
                esc(&fmt_labels(&t.discovered_labels)),
                esc(&fmt_labels(&t.labels)),
                t.last_duration_seconds,
                t.last_samples,
                esc(&t.last_error)
            ));
        }
        h.push_str("</table>");
    }
    h.push_str("</body></html>\n");
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_counters_section_groups_by_job_and_queue_with_reasons_and_the_commit_age() {
        let text = "\
# TYPE sre_agent_logs_read_lines counter
sre_agent_logs_read_lines_total{job=\"pods\"} 120
sre_agent_logs_entries_dropped_total{job=\"pods\",reason=\"limit\"} 3
sre_agent_logs_entries_dropped_total{job=\"pods\",reason=\"debug\"} 2
sre_agent_remote_pushes_retried_total{remote=\"loki\"} 7
sre_agent_remote_samples_dropped_total{remote=\"loki\",reason=\"too_old\"} 0
sre_agent_logs_positions_saved_timestamp_seconds 1000.5
";
        let h = counters_section(text, 1010.0);
        assert!(h.contains("<h2>Logs jobs</h2>"), "{h}");
        assert!(h.contains("<td>pods</td><td>120</td>"), "{h}");
        assert!(h.contains("<td>5 (limit: 3, debug: 2)</td>"), "{h}");
        assert!(h.contains("<td>loki</td><td>0</td><td>7</td><td>0</td>"), "{h}");
        assert!(h.contains("committed 10 s ago"), "{h}");
        assert!(counters_section("", 0.0).is_empty());
    }
}
