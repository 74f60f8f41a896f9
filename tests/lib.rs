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
        Self::start_env(dir, config, storage, port, &[])
    }

    /// Like [`Agent::start_with`], with extra environment variables.
    pub fn start_env(dir: &Path, config: PathBuf, storage: PathBuf, port: u16, env: &[(&str, &str)]) -> Result<Self> {
        let bin = workspace_bin("agent");
        let mut cmd = Command::new(&bin);
        cmd.arg("--config")
            .arg(&config)
            .arg("--listen-address")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--storage-path")
            .arg(&storage)
            .env("AGENT_LOG", "info,agent=debug")
            .envs(env.iter().copied());
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

/// Whether missing peers fail tests instead of skipping them (`SRE_LAB_REQUIRE_PEERS=1`).
pub fn peers_required() -> bool {
    std::env::var("SRE_LAB_REQUIRE_PEERS").is_ok_and(|v| v == "1")
}

/// A real kube-apiserver + etcd on loopback, started by `../shared/kube/start-apiserver.sh`
/// from the binaries in `$SRE_LAB_KUBE_DIR` (default `~/.cache/sre-lab/kube`), stopped on drop.
pub struct KubeApi {
    /// State directory (certificates, kubeconfigs, logs, pids).
    pub state: PathBuf,
    /// `https://127.0.0.1:PORT`.
    pub url: String,
    /// etcd's client URL (plain HTTP, with its JSON gateway).
    pub etcd: String,
    /// The admin kubeconfig.
    pub kubeconfig: PathBuf,
    scripts: PathBuf,
}

impl KubeApi {
    /// Starts one; `Ok(None)` (with a SKIPPED line on stderr) where the binaries are not built,
    /// an error instead when [`peers_required`]. `extra_args` go to kube-apiserver.
    pub fn start(dir: &Path, extra_args: &str) -> Result<Option<Self>> {
        let bin = std::env::var_os("SRE_LAB_KUBE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/sre-lab/kube"));
        let scripts = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/kube");
        let missing: Vec<String> = ["kube-apiserver", "etcd"]
            .iter()
            .filter(|b| !bin.join(b).is_file())
            .map(|b| bin.join(b).display().to_string())
            .chain(
                (!scripts.join("start-apiserver.sh").is_file())
                    .then(|| scripts.join("start-apiserver.sh").display().to_string()),
            )
            .collect();
        if !missing.is_empty() {
            let why = format!(
                "no real Kubernetes API server: missing {} (build kube-apiserver and etcd as shared/kube/README.md says)",
                missing.join(", ")
            );
            if peers_required() {
                bail!("SRE_LAB_REQUIRE_PEERS=1 and {why}");
            }
            eprintln!("SKIPPED: {why}");
            return Ok(None);
        }
        let state = dir.join("kube");
        let (api, etcd, peer) = (free_port(), free_port(), free_port());
        let out = Command::new("bash")
            .arg(scripts.join("start-apiserver.sh"))
            .env("KUBE_BIN_DIR", &bin)
            .env("KUBE_STATE_DIR", &state)
            .env("KUBE_API_PORT", api.to_string())
            .env("ETCD_CLIENT_PORT", etcd.to_string())
            .env("ETCD_PEER_PORT", peer.to_string())
            .env("KUBE_CONTROLLER_MANAGER", "auto")
            .env("KUBE_APISERVER_ARGS", extra_args)
            .output()?;
        let me = Self {
            kubeconfig: state.join("admin.kubeconfig"),
            state,
            url: format!("https://127.0.0.1:{api}"),
            etcd: format!("http://127.0.0.1:{etcd}"),
            scripts,
        };
        if !out.status.success() {
            bail!(
                "start-apiserver.sh failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(Some(me))
    }

    /// Runs kubectl as admin; its stdout, or an error with its stderr.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        self.kubectl_as(&self.kubeconfig, args)
    }

    /// Runs kubectl with `kubeconfig`.
    pub fn kubectl_as(&self, kubeconfig: &Path, args: &[&str]) -> Result<String> {
        let out = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!("kubectl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `kubectl apply -f -` of `yaml`.
    pub fn apply(&self, yaml: &str) -> Result<()> {
        use std::io::Write;
        let mut child = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(["apply", "--validate=false", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        child.stdin.take().context("stdin")?.write_all(yaml.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!("kubectl apply: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// A kubeconfig for `token` (with the server's CA), written to `path`.
    pub fn token_kubeconfig(&self, token: &str, path: &Path) -> Result<()> {
        use base64::Engine as _;
        let ca = base64::engine::general_purpose::STANDARD.encode(std::fs::read(self.state.join("ca.crt"))?);
        std::fs::write(
            path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster:\n    server: {}\n    certificate-authority-data: {ca}\nusers:\n- name: sa\n  user:\n    token: {token}\ncontexts:\n- name: sa\n  context: {{cluster: lab, user: sa}}\ncurrent-context: sa\n",
                self.url
            ),
        )?;
        Ok(())
    }

    fn apiserver_pid(&self) -> Result<i32> {
        Ok(std::fs::read_to_string(self.state.join("kube-apiserver.pid"))?
            .trim()
            .parse()?)
    }

    /// Kills kube-apiserver (SIGKILL, as a crash; etcd keeps running) and returns its command line for
    /// [`KubeApi::start_apiserver_again`].
    pub fn stop_apiserver(&self) -> Result<Vec<String>> {
        let pid = self.apiserver_pid()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))?;
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        Command::new("kill").args(["-KILL", &pid.to_string()]).status()?;
        poll("kube-apiserver to exit", Duration::from_secs(30), || {
            Ok((!Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z ")))
            .then_some(()))
        })?;
        Ok(args)
    }

    /// Starts kube-apiserver again with `args` (same certificates, same etcd) and waits for
    /// `/readyz`.
    pub fn start_apiserver_again(&self, args: &[String]) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(self.state.join("kube-apiserver.log"))?;
        let child = Command::new("setsid")
            .args(args)
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .stdin(Stdio::null())
            .spawn()?;
        std::fs::write(self.state.join("kube-apiserver.pid"), child.id().to_string())?;
        poll("kube-apiserver ready again", Duration::from_secs(120), || {
            Ok(self
                .kubectl(&["get", "--raw", "/readyz"])
                .ok()
                .filter(|s| s.trim() == "ok")
                .map(|_| ()))
        })
    }

    /// Calls etcd's JSON gateway (`/v3/...`) and returns the answer.
    pub fn etcd_call(&self, path: &str, body: &Value) -> Result<Value> {
        let out = Command::new("curl")
            .args(["-sf", "-m", "10", "-X", "POST", "-d", &body.to_string()])
            .arg(format!("{}{path}", self.etcd))
            .output()?;
        if !out.status.success() {
            bail!("etcd {path}: curl exit {:?}", out.status.code());
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(self.scripts.join("stop-apiserver.sh"))
            .env("KUBE_STATE_DIR", &self.state)
            .output();
    }
}
