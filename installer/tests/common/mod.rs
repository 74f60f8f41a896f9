//! Test doubles for the installer: fake `talosctl`/`helm`/`kubectl`/`docker` first on PATH
//! (tests/common/fake-tool.sh) and a fake Kubernetes API server that kube-rs talks to over
//! HTTP. Together they let the real binary run `up`, `down`, `status`, … end to end.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

/// A fake API server: stores what is server-side applied (PATCH), serves it back on GET
/// and list (field selectors on metadata.name honoured), marks workloads rolled out, and
/// logs `METHOD path` of every request.
pub struct FakeApi {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// Requests seen, `PATCH /api/v1/namespaces/monitoring`.
    pub log: Arc<Mutex<Vec<String>>>,
    /// Stored objects by path.
    pub objects: Arc<Mutex<BTreeMap<String, Value>>>,
    /// What pods answer to HTTP requests through port-forward: pod → (path prefix, JSON body).
    pub pod_http: PodHttp,
    /// The HTTP requests pods received through port-forward: `pod GET /path?query` plus
    /// the Authorization header when sent.
    pub pod_requests: Arc<Mutex<Vec<String>>>,
}

/// Canned HTTP answers of pods reached through port-forward.
pub type PodHttp = Arc<Mutex<BTreeMap<String, Vec<(String, String)>>>>;

impl FakeApi {
    /// Starts one on a free port.
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let log = Arc::new(Mutex::new(Vec::new()));
        let objects = Arc::new(Mutex::new(BTreeMap::new()));
        let pod_http: PodHttp = Arc::new(Mutex::new(BTreeMap::new()));
        let pod_requests = Arc::new(Mutex::new(Vec::new()));
        let (l, o, h, r) = (log.clone(), objects.clone(), pod_http.clone(), pod_requests.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (l, o, h, r) = (l.clone(), o.clone(), h.clone(), r.clone());
                std::thread::spawn(move || serve(conn, &l, &o, &h, &r));
            }
        });
        Self {
            url,
            log,
            objects,
            pod_http,
            pod_requests,
        }
    }

    /// The request log.
    pub fn requests(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Makes `pod` answer HTTP requests under `prefix` with `body` (JSON) through port-forward.
    pub fn serve_http(&self, pod: &str, prefix: &str, body: Value) {
        self.pod_http
            .lock()
            .unwrap()
            .entry(pod.to_owned())
            .or_default()
            .push((prefix.to_owned(), body.to_string()));
    }

    /// Forgets the request log.
    pub fn clear(&self) {
        self.log.lock().unwrap().clear();
    }

    /// Puts an object at `path` as if it were applied (a new resource version; watchers of
    /// its collection see it as MODIFIED).
    pub fn insert(&self, path: &str, mut obj: Value) {
        obj["metadata"]["resourceVersion"] = json!(next_rv().to_string());
        self.objects.lock().unwrap().insert(path.to_owned(), obj);
    }
}

static RESOURCE_VERSION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn next_rv() -> u64 {
    RESOURCE_VERSION.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1
}

fn current_rv() -> u64 {
    RESOURCE_VERSION.load(std::sync::atomic::Ordering::SeqCst)
}

/// What `GET /version` says the API server runs.
static KUBE_VERSION: Mutex<String> = Mutex::new(String::new());

/// Makes the fake API server report `v` as its version (default v1.33.12, the lab's pin).
pub fn set_kube_version(v: &str) {
    *KUBE_VERSION.lock().unwrap() = v.to_owned();
}

/// PATCHes of a path answered with MetalLB's "webhook not ready" 500 this many more times.
static FAIL_PATCHES: Mutex<Vec<(String, u32)>> = Mutex::new(Vec::new());

/// The next `n` server-side applies of `path` fail as an admission webhook that does not
/// answer yet makes them fail (metallb/metallb#1597): connection refused, then an unknown
/// certificate authority, alternately.
pub fn fail_patches(path: &str, n: u32) {
    FAIL_PATCHES.lock().unwrap().push((path.to_owned(), n));
}

fn injected_failure(method: &str, path: &str) -> Option<(u16, Value)> {
    if method != "PATCH" {
        return None;
    }
    let mut f = FAIL_PATCHES.lock().unwrap();
    let (_, n) = f.iter_mut().find(|(p, n)| p == path && *n > 0)?;
    *n -= 1;
    // Alternately the two forms the race takes: no endpoint yet, and the serving certificate's
    // CA not injected yet.
    let cause = if *n % 2 == 1 {
        "dial tcp 10.96.0.10:443: connect: connection refused"
    } else {
        "tls: failed to verify certificate: x509: certificate signed by unknown authority"
    };
    Some((
        500,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 500, "reason": "InternalError",
               "message": format!("Internal error occurred: failed calling webhook \"ipaddresspoolvalidationwebhook.metallb.io\": failed to call webhook: Post \"https://metallb-webhook-service.metallb-system.svc:443/validate-metallb-io-v1beta1-ipaddresspool?timeout=10s\": {cause}")}),
    ))
}

fn serve(
    conn: TcpStream,
    log: &Mutex<Vec<String>>,
    objects: &Mutex<BTreeMap<String, Value>>,
    pod_http: &PodHttp,
    pod_requests: &Mutex<Vec<String>>,
) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut conn = conn;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = request_line.split_whitespace();
        let (method, target) = (
            parts.next().unwrap_or("").to_owned(),
            parts.next().unwrap_or("").to_owned(),
        );
        let mut len = 0usize;
        let mut ws_key = None;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            if h == "\r\n" {
                break;
            }
            if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap_or(0);
            }
            if let Some((name, value)) = h.split_once(':') {
                if name.eq_ignore_ascii_case("sec-websocket-key") {
                    ws_key = Some(value.trim().to_owned());
                }
            }
        }
        if let (Some(key), true) = (ws_key, target.contains("/portforward?")) {
            log.lock()
                .unwrap()
                .push(format!("{method} {}", target.split('?').next().unwrap_or("")));
            let pod = target
                .split("/pods/")
                .nth(1)
                .and_then(|p| p.split('/').next())
                .unwrap_or("")
                .to_owned();
            let canned = pod_http.lock().unwrap().get(&pod).cloned().unwrap_or_default();
            port_forward(conn, &key, &target, &pod, &canned, pod_requests);
            return;
        }
        if KUBE_VERSION.lock().unwrap().is_empty() {
            set_kube_version("v1.33.12");
        }
        let mut body = vec![0; len];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let shown = if method == "GET" && query.contains("watch=") {
            "WATCH"
        } else {
            method.as_str()
        };
        log.lock().unwrap().push(format!("{shown} {path}"));
        let (status, reply) =
            injected_failure(&method, path).unwrap_or_else(|| route(&method, path, query, &body, objects));
        // A watch that has nothing to report: an empty event stream (kube-rs then watches again).
        let text = if reply.is_null() {
            String::new()
        } else {
            reply.to_string()
        };
        let head = format!(
            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            text.len()
        );
        if conn
            .write_all(head.as_bytes())
            .and_then(|_| conn.write_all(text.as_bytes()))
            .is_err()
        {
            return;
        }
    }
}

/// A pod's port-forward over the v4.channel.k8s.io WebSocket protocol: announces the port on
/// its data and error channels, then answers every chunk written to the pod with
/// `pong: <chunk>` — the pod side of a tiny request/response server.
fn port_forward(
    mut conn: TcpStream,
    key: &str,
    target: &str,
    pod: &str,
    canned: &[(String, String)],
    pod_requests: &Mutex<Vec<String>>,
) {
    use tungstenite::protocol::Role;
    let port: u16 = target
        .split("ports=")
        .nth(1)
        .and_then(|p| p.split('&').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let head = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Protocol: v4.channel.k8s.io\r\n\r\n"
    );
    if conn.write_all(head.as_bytes()).is_err() {
        return;
    }
    let mut ws = tungstenite::WebSocket::from_raw_socket(conn, Role::Server, None);
    let [lo, hi] = port.to_le_bytes();
    for ch in [0u8, 1] {
        if ws.send(tungstenite::Message::binary(vec![ch, lo, hi])).is_err() {
            return;
        }
    }
    let mut request = Vec::new();
    while let Ok(msg) = ws.read() {
        match msg {
            // A pod with canned answers is an HTTP server: one request, one response.
            tungstenite::Message::Binary(b) if b.len() > 1 && b[0] == 0 && !canned.is_empty() => {
                request.extend_from_slice(&b[1..]);
                if !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    continue;
                }
                let head = String::from_utf8_lossy(&request).into_owned();
                let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
                let auth = head
                    .lines()
                    .find_map(|l| {
                        l.strip_prefix("authorization: ")
                            .or_else(|| l.strip_prefix("Authorization: "))
                    })
                    .map(|a| format!(" {a}"))
                    .unwrap_or_default();
                pod_requests.lock().unwrap().push(format!("{pod} GET {path}{auth}"));
                let body = canned
                    .iter()
                    .filter(|(prefix, _)| path.starts_with(prefix.as_str()))
                    .max_by_key(|(prefix, _)| prefix.len())
                    .map(|(_, b)| b.clone());
                let (status, body) = match body {
                    Some(b) => ("200 OK", b),
                    None => ("404 Not Found", "{}".to_owned()),
                };
                let mut reply = vec![0u8];
                reply.extend_from_slice(
                    format!("HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
                        .as_bytes(),
                );
                let _ = ws.send(tungstenite::Message::binary(reply));
                let _ = ws.close(None);
                let _ = ws.flush();
            }
            tungstenite::Message::Binary(b) if b.len() > 1 && b[0] == 0 => {
                let mut reply = vec![0u8];
                reply.extend_from_slice(b"pong: ");
                reply.extend_from_slice(&b[1..]);
                if ws.send(tungstenite::Message::binary(reply)).is_err() {
                    return;
                }
            }
            tungstenite::Message::Close(_) => return,
            _ => {}
        }
    }
}

fn not_found(path: &str) -> (u16, Value) {
    (
        404,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": format!("{path} not found"), "reason": "NotFound", "code": 404}),
    )
}

/// The stored objects directly under collection `path`, filtered by a `metadata.name`
/// field selector in `query`.
fn collection(objects: &BTreeMap<String, Value>, path: &str, query: &str) -> Vec<Value> {
    let prefix = format!("{path}/");
    let name = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("fieldSelector=metadata.name%3D"))
        .map(str::to_owned);
    // `labelSelector=a%3Db%2Cc%3Dd`: equality selectors only.
    let labels: Vec<(String, String)> = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("labelSelector="))
        .map(|sel| {
            sel.replace("%3D", "=")
                .replace("%2C", ",")
                .replace("%2F", "/")
                .split(',')
                .filter_map(|p| p.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect()
        })
        .unwrap_or_default();
    objects
        .iter()
        .filter(|(k, _)| k.starts_with(&prefix) && !k[prefix.len()..].contains('/'))
        .filter(|(_, v)| name.as_deref().is_none_or(|n| v["metadata"]["name"] == n))
        .filter(|(_, v)| labels.iter().all(|(k, val)| v["metadata"]["labels"][k] == val.as_str()))
        .map(|(_, v)| v.clone())
        .collect()
}

fn route(
    method: &str,
    path: &str,
    query: &str,
    body: &[u8],
    objects_lock: &Mutex<BTreeMap<String, Value>>,
) -> (u16, Value) {
    let mut objects = objects_lock.lock().unwrap();
    match method {
        "PATCH" => {
            let mut obj: Value = match serde_json::from_slice(body) {
                Ok(v) => v,
                Err(e) => return (400, json!({"kind": "Status", "message": e.to_string(), "code": 400})),
            };
            obj["metadata"]["uid"] = json!(format!("uid-{}", objects.len()));
            obj["metadata"]["generation"] = json!(1);
            obj["metadata"]["resourceVersion"] = json!(next_rv().to_string());
            match obj["kind"].as_str() {
                Some("DaemonSet") => {
                    obj["status"] = json!({"currentNumberScheduled": 3, "desiredNumberScheduled": 3, "numberMisscheduled": 0, "numberReady": 3, "numberAvailable": 3, "updatedNumberScheduled": 3, "observedGeneration": 1});
                }
                Some("Deployment") => {
                    obj["status"] = json!({"replicas": 1, "updatedReplicas": 1, "readyReplicas": 1, "availableReplicas": 1, "observedGeneration": 1});
                }
                Some("Secret") => {
                    use base64::Engine as _;
                    if let Some(sd) = obj.get("stringData").cloned() {
                        let data: serde_json::Map<String, Value> = sd
                            .as_object()
                            .unwrap()
                            .iter()
                            .map(|(k, v)| {
                                (
                                    k.clone(),
                                    json!(base64::engine::general_purpose::STANDARD
                                        .encode(v.as_str().unwrap_or_default())),
                                )
                            })
                            .collect();
                        obj["data"] = Value::Object(data);
                        obj.as_object_mut().unwrap().remove("stringData");
                    }
                }
                _ => {}
            }
            objects.insert(path.to_owned(), obj.clone());
            (200, obj)
        }
        "GET" if query.contains("watch=") => {
            // Objects of the collection changed since the watcher's resource version, as
            // MODIFIED events; wait up to a second for one.
            drop(objects);
            let since: u64 = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("resourceVersion="))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            for _ in 0..10 {
                let events: String = collection(&objects_lock.lock().unwrap(), path, query)
                    .into_iter()
                    .filter(|o| {
                        o["metadata"]["resourceVersion"]
                            .as_str()
                            .and_then(|v| v.parse::<u64>().ok())
                            .unwrap_or(0)
                            > since
                    })
                    .map(|o| format!("{}\n", json!({"type": "MODIFIED", "object": o})))
                    .collect();
                if !events.is_empty() {
                    return (200, Value::String(events));
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            (200, Value::Null)
        }
        "GET" => {
            if path == "/version" {
                let v = KUBE_VERSION.lock().unwrap().clone();
                return (
                    200,
                    json!({"major": "1", "minor": "36", "gitVersion": v, "platform": "linux/amd64"}),
                );
            }
            if let Some(o) = objects.get(path) {
                return (200, o.clone());
            }
            let prefix = format!("{path}/");
            let items = collection(&objects, path, query);
            let known_collection = objects.keys().any(|k| k.starts_with(&prefix)) || path.ends_with('s');
            if !known_collection {
                return not_found(path);
            }
            (
                200,
                json!({"kind": "List", "apiVersion": "v1", "metadata": {"resourceVersion": current_rv().to_string()}, "items": items}),
            )
        }
        "DELETE" => match objects.remove(path) {
            Some(o) => (200, o),
            None => not_found(path),
        },
        _ => (405, json!({"kind": "Status", "code": 405})),
    }
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A sandbox for running the installer binary: fake tools on PATH, a fake API, a state
/// root, a working directory.
pub struct Sandbox {
    /// Everything lives under here.
    pub dir: tempfile::TempDir,
    /// The fake API server.
    pub api: FakeApi,
    /// Extra environment for every run.
    pub env: Vec<(String, String)>,
}

impl Sandbox {
    /// A fresh sandbox.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/common/fake-tool.sh");
        for tool in ["talosctl", "helm", "kubectl", "docker"] {
            std::os::unix::fs::symlink(&script, bin.join(tool)).unwrap();
        }
        for d in ["fake", "work", "home"] {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        let api = FakeApi::start();
        let env = vec![
            ("FAKE_LOG".into(), dir.path().join("fake/log").display().to_string()),
            ("FAKE_STATE".into(), dir.path().join("fake").display().to_string()),
            ("FAKE_API_URL".into(), api.url.clone()),
            ("SRE_LAB_HOME".into(), dir.path().join("state").display().to_string()),
            ("HOME".into(), dir.path().join("home").display().to_string()),
            ("PATH".into(), format!("{}:/usr/bin:/bin", bin.display())),
            ("SRE_LAB_RETRY_PAUSE_MS".into(), "10".into()),
        ];
        Self { dir, api, env }
    }

    /// The state directory of cluster `name`.
    pub fn state(&self, name: &str) -> PathBuf {
        self.dir.path().join("state").join(name)
    }

    /// Writes the lab file into the working directory as ./sre-lab.yaml.
    pub fn lab_file(&self, text: &str) {
        std::fs::write(self.dir.path().join("work/sre-lab.yaml"), text).unwrap();
    }

    /// Runs `installer ARGS` in the working directory, with `extra` environment.
    pub fn run(&self, args: &[&str], extra: &[(&str, &str)]) -> Output {
        let mut c = Command::new(env!("CARGO_BIN_EXE_installer"));
        c.args(args).current_dir(self.dir.path().join("work")).env_clear();
        for (k, v) in &self.env {
            c.env(k, v);
        }
        for (k, v) in extra {
            c.env(k, v);
        }
        c.output().unwrap()
    }

    /// Runs `installer ARGS` on a pseudo-terminal (util-linux `script`), returning what the
    /// terminal showed.
    pub fn run_on_tty(&self, args: &[&str]) -> Output {
        let line = std::iter::once(env!("CARGO_BIN_EXE_installer").to_owned())
            .chain(args.iter().map(|a| (*a).to_owned()))
            .collect::<Vec<_>>()
            .join(" ");
        let mut c = Command::new("script");
        c.args(["-qec", &line, "/dev/null"])
            .current_dir(self.dir.path().join("work"))
            .env_clear();
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c.env("TERM", "xterm");
        c.output().unwrap()
    }

    /// The fake tools' command log, with the sandbox path shown as `$T`; then cleared.
    pub fn take_log(&self) -> Vec<String> {
        let path = self.dir.path().join("fake/log");
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let _ = std::fs::remove_file(&path);
        let root = self.dir.path().display().to_string();
        text.lines().map(|l| l.replace(&root, "$T")).collect()
    }
}

/// `stderr` as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `stdout` as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
