//! Helpers for end-to-end tests: real peer processes (Prometheus, node_exporter, the agent)
//! on free loopback ports, each owned by a guard that kills it by PID on drop, and polling
//! helpers with deadlines instead of sleeps.

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

/// A free loopback port (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Polls `f` until it returns `Ok(Some(v))` or the deadline passes; the last error is reported.
pub fn poll<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    let mut last;
    loop {
        match f() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => last = "condition not met yet".into(),
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}: {last}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A child process killed on drop; its output goes to a log file kept for failures.
pub struct Proc {
    /// What it is, for messages.
    pub name: String,
    child: Option<Child>,
    /// The log file of stdout+stderr.
    pub log: PathBuf,
}

impl Proc {
    /// Spawns `cmd` with output to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: PathBuf) -> Result<Self> {
        let f = std::fs::File::create(&log)?;
        let child = cmd
            .stdout(Stdio::from(f.try_clone()?))
            .stderr(Stdio::from(f))
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        Ok(Self {
            name: name.to_owned(),
            child: Some(child),
            log,
        })
    }

    /// PID of the process.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Sends `signal` (e.g. "TERM", "KILL", "HUP") and, for TERM/KILL, waits for exit.
    pub fn signal(&mut self, signal: &str) -> Result<Option<std::process::ExitStatus>> {
        let pid = self.pid();
        let ok = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()?
            .success();
        if !ok {
            bail!("kill -{signal} {pid} failed");
        }
        if signal == "TERM" || signal == "KILL" || signal == "INT" {
            let child = self.child.as_mut().ok_or_else(|| anyhow!("no child"))?;
            let deadline = Instant::now() + Duration::from_secs(40);
            loop {
                if let Some(st) = child.try_wait()? {
                    self.child = None;
                    return Ok(Some(st));
                }
                if Instant::now() > deadline {
                    bail!("{} did not exit within 40s after SIG{signal}", self.name);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(None)
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Blocking HTTP GET returning the body as a string (errors on non-2xx).
pub fn http_get(url: &str) -> Result<String> {
    let mut resp = ureq::get(url).call().with_context(|| format!("GET {url}"))?;
    Ok(resp.body_mut().read_to_string()?)
}

/// Blocking HTTP POST with an empty body; returns (status, body).
pub fn http_post(url: &str) -> Result<(u16, String)> {
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let mut resp = agent.post(url).send_empty().with_context(|| format!("POST {url}"))?;
    let status = resp.status().as_u16();
    Ok((status, resp.body_mut().read_to_string()?))
}

/// Path of a binary built by this workspace (`agent`, `installer`).
pub fn workspace_bin(name: &str) -> PathBuf {
    if let Ok(dir) = std::env::var("CARGO_TARGET_DIR") {
        for profile in ["debug", "release"] {
            let p = Path::new(&dir).join(profile).join(name);
            if p.exists() {
                return p;
            }
        }
    }
    // target/<profile>/deps/<test-binary> → target/<profile>/<name>
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join(name)
}

/// A running Prometheus.
pub struct Prometheus {
    /// The process.
    pub proc: Proc,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// Port.
    pub port: u16,
    /// Data directory.
    pub data: PathBuf,
    config: PathBuf,
    receiver: bool,
}

impl Prometheus {
    /// Starts Prometheus with `config_yaml` in `dir`; `receiver` enables the remote-write receiver.
    pub fn start(dir: &Path, name: &str, config_yaml: &str, receiver: bool) -> Result<Self> {
        let port = free_port();
        let config = dir.join(format!("{name}.yml"));
        std::fs::write(&config, config_yaml)?;
        let data = dir.join(format!("{name}-data"));
        Self::start_at(dir, name, config, data, port, receiver)
    }

    fn start_at(dir: &Path, name: &str, config: PathBuf, data: PathBuf, port: u16, receiver: bool) -> Result<Self> {
        let mut cmd = Command::new("prometheus");
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", data.display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn");
        if receiver {
            cmd.arg("--web.enable-remote-write-receiver");
        }
        let log = dir.join(format!("{name}.log"));
        let proc = Proc::spawn(name, cmd, log)?;
        let url = format!("http://127.0.0.1:{port}");
        let p = Self {
            proc,
            url,
            port,
            data,
            config,
            receiver,
        };
        poll(&format!("{name} ready"), Duration::from_secs(60), || {
            Ok(http_get(&format!("{}/-/ready", p.url)).ok().map(|_| ()))
        })
        .with_context(|| p.proc.log_text())?;
        Ok(p)
    }

    /// Stops it (SIGTERM) and returns what is needed to start it again on the same port/data.
    pub fn stop(mut self) -> Result<StoppedPrometheus> {
        self.proc.signal("TERM")?;
        Ok(StoppedPrometheus {
            config: self.config.clone(),
            data: self.data.clone(),
            port: self.port,
            receiver: self.receiver,
            name: self.proc.name.clone(),
            dir: self.proc.log.parent().map(Path::to_path_buf).unwrap_or_default(),
        })
    }

    /// Runs an instant PromQL query; returns `data.result`.
    pub fn query(&self, q: &str) -> Result<Vec<Value>> {
        let url = format!("{}/api/v1/query?query={}", self.url, urlencode(q));
        let v: Value = serde_json::from_str(&http_get(&url)?)?;
        if v["status"] != "success" {
            bail!("query {q} failed: {v}");
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    /// All series matching `matcher` over the last hour, as sorted label-set strings.
    pub fn series(&self, matcher: &str) -> Result<Vec<String>> {
        let url = format!(
            "{}/api/v1/series?match[]={}&start={}",
            self.url,
            urlencode(matcher),
            now_s() - 3600.0
        );
        let v: Value = serde_json::from_str(&http_get(&url)?)?;
        let mut out: Vec<String> = v["data"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(label_string)
            .collect();
        out.sort();
        Ok(out)
    }
}

/// What remains of a stopped Prometheus, to start it again.
pub struct StoppedPrometheus {
    config: PathBuf,
    data: PathBuf,
    port: u16,
    receiver: bool,
    name: String,
    dir: PathBuf,
}

impl StoppedPrometheus {
    /// Starts it again on the same port and data directory.
    pub fn restart(self) -> Result<Prometheus> {
        Prometheus::start_at(
            &self.dir,
            &format!("{}-again", self.name),
            self.config,
            self.data,
            self.port,
            self.receiver,
        )
    }
}

/// Renders a JSON label object as `{a="1", b="2"}` with sorted names.
pub fn label_string(m: &Value) -> String {
    let mut pairs: Vec<(String, String)> = m
        .as_object()
        .map(|o| {
            o.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect()
        })
        .unwrap_or_default();
    pairs.sort();
    let inner: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
    format!("{{{}}}", inner.join(", "))
}

/// Current time in seconds.
pub fn now_s() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Percent-encodes a query parameter.
pub fn urlencode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// A running node_exporter.
pub struct NodeExporter {
    /// The process.
    pub proc: Proc,
    /// `127.0.0.1:PORT`.
    pub addr: String,
}

impl NodeExporter {
    /// Starts `prometheus-node-exporter` on a free port.
    pub fn start(dir: &Path) -> Result<Self> {
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let mut cmd = Command::new("prometheus-node-exporter");
        // Mounts come and go under /tmp while tests run (the full-disk test mounts a tmpfs):
        // keep them out so two scrapers of one exporter see the same series.
        cmd.arg(format!("--web.listen-address={addr}"))
            .arg("--collector.filesystem.mount-points-exclude=^/(dev|proc|run|sys|tmp|var/lib/docker)($|/)");
        let proc = Proc::spawn("node_exporter", cmd, dir.join(format!("node_exporter-{port}.log")))?;
        poll("node_exporter ready", Duration::from_secs(30), || {
            Ok(http_get(&format!("http://{addr}/metrics")).ok().map(|_| ()))
        })?;
        Ok(Self { proc, addr })
    }
}

/// A running agent.
pub struct Agent {
    /// The process.
    pub proc: Proc,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// Listen port.
    pub port: u16,
    /// The config file.
    pub config: PathBuf,
    /// Storage directory.
    pub storage: PathBuf,
}

impl Agent {
    /// Starts the agent binary with `config_yaml` written to `dir/agent.yml`.
    pub fn start(dir: &Path, config_yaml: &str) -> Result<Self> {
        let config = dir.join("agent.yml");
        std::fs::write(&config, config_yaml)?;
        let storage = dir.join("agent-data");
        Self::start_with(dir, config, storage, free_port())
    }

    /// Starts the agent with an existing config/storage on `port`.
    pub fn start_with(dir: &Path, config: PathBuf, storage: PathBuf, port: u16) -> Result<Self> {
        let bin = workspace_bin("agent");
        let mut cmd = Command::new(&bin);
        cmd.arg("--config")
            .arg(&config)
            .arg("--listen-address")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--storage-path")
            .arg(&storage)
            .env("AGENT_LOG", "info,agent=debug");
        let n = std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
        let proc = Proc::spawn("agent", cmd, dir.join(format!("agent-{n}.log")))?;
        let url = format!("http://127.0.0.1:{port}");
        let a = Self {
            proc,
            url,
            port,
            config,
            storage,
        };
        poll("agent ready", Duration::from_secs(30), || {
            Ok(http_get(&format!("{}/readyz", a.url)).ok().map(|_| ()))
        })
        .with_context(|| a.proc.log_text())?;
        Ok(a)
    }

    /// The agent's own metric value (sum over label sets whose text contains `filter`).
    pub fn metric(&self, name: &str, filter: &str) -> Result<f64> {
        let text = http_get(&format!("{}/metrics", self.url))?;
        Ok(text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.split(['{', ' ']).next() == Some(name) && l.contains(filter))
            .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
            .sum())
    }
}

/// A minimal blocking HTTP/1.1 server for tests: every request is answered by `handler`
/// (method, path, headers, body) → (status, extra headers, body), with `Connection: close`.
pub struct TinyServer {
    /// `127.0.0.1:PORT`.
    pub addr: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// One received request.
#[derive(Clone, Debug)]
pub struct TinyRequest {
    /// Method.
    pub method: String,
    /// Path with query.
    pub path: String,
    /// Headers, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
}

impl TinyRequest {
    /// First header named `name` (lower-case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// A handler's answer.
pub type TinyResponse = (u16, Vec<(String, String)>, Vec<u8>);

impl TinyServer {
    /// Starts serving on a free port in a background thread.
    pub fn start<F>(handler: F) -> Result<Self>
    where
        F: Fn(TinyRequest) -> TinyResponse + Send + Sync + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?.to_string();
        listener.set_nonblocking(true)?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        let handler = std::sync::Arc::new(handler);
        std::thread::spawn(move || {
            while !stop2.load(std::sync::atomic::Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let h = handler.clone();
                        std::thread::spawn(move || {
                            let _ = serve_one(stream, &*h);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(Self { addr, stop })
    }
}

impl Drop for TinyServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

fn serve_one(mut stream: std::net::TcpStream, handler: &dyn Fn(TinyRequest) -> TinyResponse) -> Result<()> {
    use std::io::Write;
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut buf = Vec::new();
    let mut tmp = [0u8; 8192];
    let header_end = loop {
        let n = stream.read(&mut tmp)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&tmp[..n]);
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..header_end]).into_owned();
    let mut lines = head.split("\r\n");
    let first = lines.next().unwrap_or_default();
    let mut parts = first.split(' ');
    let method = parts.next().unwrap_or_default().to_owned();
    let path = parts.next().unwrap_or_default().to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = buf[header_end..].to_vec();
    while body.len() < len {
        let n = stream.read(&mut tmp)?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&tmp[..n]);
    }
    let (status, extra, resp_body) = handler(TinyRequest {
        method,
        path,
        headers,
        body,
    });
    let mut out = format!(
        "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n",
        resp_body.len()
    );
    for (n, v) in extra {
        out.push_str(&format!("{n}: {v}\r\n"));
    }
    out.push_str("\r\n");
    stream.write_all(out.as_bytes())?;
    stream.write_all(&resp_body)?;
    stream.flush()?;
    Ok(())
}

/// The agent's targets as its `/api/v1/targets` lists them.
pub fn targets(agent: &Agent) -> Result<Vec<Value>> {
    let v: Value = serde_json::from_str(&http_get(&format!("{}/api/v1/targets", agent.url))?)?;
    Ok(v.as_array().cloned().unwrap_or_default())
}

/// Waits until the target of `job` has been scraped and returns (health, last_error).
pub fn scraped(agent: &Agent, job: &str) -> Result<(String, String)> {
    poll(&format!("a scrape of {job}"), Duration::from_secs(20), || {
        Ok(targets(agent)?
            .into_iter()
            .find(|t| t["job"] == job && t["last_scrape_ms"].as_i64().unwrap_or(0) > 0)
            .map(|t| {
                (
                    t["health"].as_str().unwrap_or_default().to_owned(),
                    t["last_error"].as_str().unwrap_or_default().to_owned(),
                )
            }))
    })
    .map_err(|e| e.context(agent.proc.log_text()))
}
