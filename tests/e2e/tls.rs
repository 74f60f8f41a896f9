//! `tls_config` end to end, for scraping and for remote_write, against real TLS servers: a
//! throw-away PKI made with the `openssl` CLI and small Python `http.server` + `ssl` peers.
//! Outcomes are observed through the agent's `/api/v1/targets` and its own metrics.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use sre_lab_tests::{free_port, poll, scraped, Agent, Proc};

/// Runs `openssl ARGS` in `dir`; fails with its stderr.
fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new("/usr/bin/openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .context("running /usr/bin/openssl")?;
    if !out.status.success() {
        bail!(
            "openssl {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

const CA_CNF: &str = "[req]
distinguished_name = dn
x509_extensions = v3_ca
prompt = no
[dn]
CN = sre-lab test CA
[v3_ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
";

/// A test PKI in `dir`: `ca.pem`/`ca.key`, leaf certificates `NAME.pem`/`NAME.key` signed by it.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new(dir: &Path) -> Result<Self> {
        std::fs::write(dir.join("ca.cnf"), CA_CNF)?;
        openssl(
            dir,
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                "ca.key",
            ],
        )?;
        openssl(
            dir,
            &[
                "req", "-new", "-x509", "-key", "ca.key", "-config", "ca.cnf", "-days", "2", "-out", "ca.pem",
            ],
        )?;
        Ok(Self { dir: dir.to_path_buf() })
    }

    /// Issues `name.pem`/`name.key` with extendedKeyUsage `usage` and subjectAltName `san` (if any).
    fn issue(&self, name: &str, cn: &str, usage: &str, san: Option<&str>) -> Result<()> {
        let key = format!("{name}.key");
        let csr = format!("{name}.csr");
        let ext = format!("{name}.ext");
        let pem = format!("{name}.pem");
        let mut extensions = format!(
            "basicConstraints = CA:FALSE\nkeyUsage = critical,digitalSignature\nextendedKeyUsage = {usage}\n\
             subjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid\n"
        );
        if let Some(san) = san {
            extensions.push_str(&format!("subjectAltName = {san}\n"));
        }
        std::fs::write(self.dir.join(&ext), extensions)?;
        openssl(
            &self.dir,
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                &key,
            ],
        )?;
        openssl(
            &self.dir,
            &["req", "-new", "-key", &key, "-subj", &format!("/CN={cn}"), "-out", &csr],
        )?;
        openssl(
            &self.dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &ext,
                "-out",
                &pem,
            ],
        )
    }
}

/// The TLS peer: `GET /metrics` answers `tls_ok 1`, `POST /api/v1/write` answers 204 and prints
/// one line per request. The handshake runs in the request thread, so a stalled or failing
/// client never blocks the accept loop.
const SERVER_PY: &str = r#"
import http.server, ssl, sys

port, cert, key, client_ca = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
alpn = len(sys.argv) > 5 and sys.argv[5] == "alpn"
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
if alpn:
    # Prefers HTTP/2 but speaks only HTTP/1.1: prints what the client negotiated and hangs
    # up on an h2 client.
    ctx.set_alpn_protocols(["h2", "http/1.1"])
if client_ca != "-":
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(client_ca)

class Handler(http.server.BaseHTTPRequestHandler):
    def setup(self):
        self.request.settimeout(10)
        self.request = ctx.wrap_socket(self.request, server_side=True)
        if alpn:
            chosen = self.request.selected_alpn_protocol()
            print(f"alpn {chosen}", flush=True)
            if chosen == "h2":
                self.request.close()
                raise ConnectionAbortedError("h2 is not spoken here")
        super().setup()

    def finish(self):
        try:
            super().finish()
        finally:
            self.request.close()

    def reply(self, code, body=b""):
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.reply(200, b"tls_ok 1\n") if self.path.startswith("/metrics") else self.reply(404)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if self.path != "/api/v1/write":
            return self.reply(404)
        print(f"write {len(body)} bytes", flush=True)
        self.reply(204)

    def log_message(self, fmt, *args):
        pass

class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, addr):
        print(f"error from {addr}: {sys.exc_info()[1]!r}", flush=True)

print("listening", flush=True)
Server(("127.0.0.1", port), Handler).serve_forever()
"#;

/// A running TLS peer on `127.0.0.1:PORT`.
struct TlsServer {
    proc: Proc,
    addr: String,
}

impl TlsServer {
    /// Serves with certificate `cert` (`cert.pem`/`cert.key` in `dir`); `client_ca` makes
    /// client certificates signed by that CA mandatory.
    fn start(dir: &Path, cert: &str, client_ca: Option<&str>) -> Result<Self> {
        Self::start_with(dir, cert, client_ca, false)
    }

    /// As [`TlsServer::start`]; `alpn` offers h2 and http/1.1 and logs the choice.
    fn start_with(dir: &Path, cert: &str, client_ca: Option<&str>, alpn: bool) -> Result<Self> {
        let script = dir.join("tls_server.py");
        if !script.exists() {
            std::fs::write(&script, SERVER_PY)?;
        }
        let port = free_port();
        let mut cmd = Command::new("python3");
        cmd.arg(&script)
            .arg(port.to_string())
            .arg(dir.join(format!("{cert}.pem")))
            .arg(dir.join(format!("{cert}.key")))
            .arg(client_ca.map(|c| dir.join(c)).unwrap_or_else(|| "-".into()))
            .arg(if alpn { "alpn" } else { "-" })
            .current_dir(dir);
        let name = format!("tls-server-{cert}-{port}");
        let proc = Proc::spawn(&name, cmd, dir.join(format!("{name}.log")))?;
        let addr = format!("127.0.0.1:{port}");
        poll(&format!("{name} listening"), Duration::from_secs(20), || {
            Ok(TcpStream::connect(&addr).ok().map(|_| ()))
        })
        .with_context(|| proc.log_text())?;
        Ok(Self { proc, addr })
    }
}

/// Config of one https scrape job of `addr` with the given `tls_config` lines (6-space indent).
fn job(name: &str, addr: &str, tls: &[&str]) -> String {
    let mut s = format!("  - job_name: {name}\n    scheme: https\n");
    if !tls.is_empty() {
        s.push_str("    tls_config:\n");
        for l in tls {
            s.push_str(&format!("      {l}\n"));
        }
    }
    s.push_str(&format!("    static_configs:\n      - targets: ['{addr}']\n"));
    s
}

fn scrape_config(jobs: &[String]) -> String {
    format!("global:\n  scrape_interval: 1s\nscrape_configs:\n{}", jobs.concat())
}

#[test]
fn scrape_verifies_the_server_certificate() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path())?;
    pki.issue("server", "localhost", "serverAuth", Some("DNS:localhost,IP:127.0.0.1"))?;
    let server = TlsServer::start(dir.path(), "server", None)?;
    let a = server.addr.as_str();
    // The config lives next to ca.pem, so the relative `ca.pem` resolves against its directory.
    let agent = Agent::start(
        dir.path(),
        &scrape_config(&[
            job("ca", a, &["ca_file: ca.pem"]),
            job("noca", a, &[]),
            job("insecure", a, &["insecure_skip_verify: true"]),
        ]),
    )?;

    assert_eq!(
        scraped(&agent, "ca")?,
        ("up".to_owned(), String::new()),
        "server log: {}",
        server.proc.log_text()
    );
    let (h, e) = scraped(&agent, "noca")?;
    assert_eq!(h, "down", "a certificate from an unknown CA must fail verification");
    assert!(
        e.contains("invalid peer certificate") && e.contains("UnknownIssuer"),
        "error names the certificate problem: {e}"
    );
    assert_eq!(
        scraped(&agent, "insecure")?,
        ("up".to_owned(), String::new()),
        "insecure_skip_verify accepts any certificate"
    );
    Ok(())
}

#[test]
fn scrape_server_name_overrides_the_verified_name() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path())?;
    // Only a DNS name: the target address 127.0.0.1 does not match it.
    pki.issue("dnsonly", "localhost", "serverAuth", Some("DNS:localhost"))?;
    let server = TlsServer::start(dir.path(), "dnsonly", None)?;
    let a = server.addr.as_str();
    let agent = Agent::start(
        dir.path(),
        &scrape_config(&[
            job("sni", a, &["ca_file: ca.pem", "server_name: localhost"]),
            job("nosni", a, &["ca_file: ca.pem"]),
        ]),
    )?;

    assert_eq!(
        scraped(&agent, "sni")?,
        ("up".to_owned(), String::new()),
        "server_name: localhost verifies the DNS-only certificate; server log: {}",
        server.proc.log_text()
    );
    let (h, e) = scraped(&agent, "nosni")?;
    assert_eq!(h, "down", "127.0.0.1 is not in the certificate");
    assert!(
        e.contains("invalid peer certificate") && e.contains("not valid for name"),
        "error names the name mismatch: {e}"
    );
    Ok(())
}

#[test]
fn scrape_presents_a_client_certificate() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path())?;
    pki.issue("server", "localhost", "serverAuth", Some("DNS:localhost,IP:127.0.0.1"))?;
    pki.issue("client", "sre-lab agent", "clientAuth", None)?;
    let server = TlsServer::start(dir.path(), "server", Some("ca.pem"))?;
    let a = server.addr.as_str();
    let agent = Agent::start(
        dir.path(),
        &scrape_config(&[
            job(
                "mtls",
                a,
                &["ca_file: ca.pem", "cert_file: client.pem", "key_file: client.key"],
            ),
            job("nocert", a, &["ca_file: ca.pem"]),
        ]),
    )?;

    assert_eq!(
        scraped(&agent, "mtls")?,
        ("up".to_owned(), String::new()),
        "the client certificate is accepted; server log: {}",
        server.proc.log_text()
    );
    let (h, e) = scraped(&agent, "nocert")?;
    assert_eq!(h, "down", "the server requires a client certificate");
    // TLS 1.3: the server's alert reaches the client with the response, not in the handshake.
    assert!(
        // (or the connection is reset before the alert is read)
        e.contains("CertificateRequired")
            || e.contains("HandshakeFailure")
            || e.contains("reset")
            || e.contains("Connect"),
        "error names the missing client certificate: {e}"
    );
    Ok(())
}

#[test]
fn remote_write_over_tls() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path())?;
    pki.issue("server", "localhost", "serverAuth", Some("DNS:localhost,IP:127.0.0.1"))?;
    let target = TlsServer::start(dir.path(), "server", None)?;
    let receiver = TlsServer::start(dir.path(), "server", None)?;
    let url = format!("https://{}/api/v1/write", receiver.addr);
    let config = format!(
        "{}remote_write:
  - url: {url}
    name: trusted
    tls_config:
      ca_file: ca.pem
    queue_config:
      batch_send_deadline: 1s
  - url: {url}
    name: untrusted
    queue_config:
      batch_send_deadline: 1s
      min_backoff: 100ms
      max_backoff: 1s
",
        scrape_config(&[job("tls", &target.addr, &["ca_file: ca.pem"])])
    );
    let agent = Agent::start(dir.path(), &config)?;
    assert_eq!(scraped(&agent, "tls")?, ("up".to_owned(), String::new()));

    poll("samples sent over TLS", Duration::from_secs(30), || {
        Ok((agent.metric("sre_agent_remote_samples_sent_total", "remote=\"trusted\"")? > 0.0).then_some(()))
    })
    .with_context(|| {
        format!(
            "agent log: {}\nreceiver log: {}",
            agent.proc.log_text(),
            receiver.proc.log_text()
        )
    })?;
    assert!(
        receiver.proc.log_text().contains("write "),
        "the receiver got the requests: {}",
        receiver.proc.log_text()
    );
    assert_eq!(agent.metric("sre_agent_remote_samples_dropped_total", "")?, 0.0);

    // Without the CA the same receiver is not trusted: nothing is accepted, the batch is retried.
    poll("retries of the untrusted remote", Duration::from_secs(30), || {
        Ok((agent.metric("sre_agent_remote_samples_retried_total", "remote=\"untrusted\"")? > 0.0).then_some(()))
    })
    .with_context(|| agent.proc.log_text())?;
    assert_eq!(
        agent.metric("sre_agent_remote_samples_sent_total", "remote=\"untrusted\"")?,
        0.0
    );
    assert_eq!(agent.metric("sre_agent_remote_samples_dropped_total", "")?, 0.0);
    Ok(())
}

/// `enable_http2` (default true, as Prometheus) offers HTTP/2 by ALPN on HTTPS; with `false`
/// the client offers no h2 and this server speaks HTTP/1.1 to it.
#[test]
fn enable_http2_offers_h2_by_alpn_and_false_keeps_http1() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = Pki::new(dir.path())?;
    pki.issue("server", "localhost", "serverAuth", Some("DNS:localhost,IP:127.0.0.1"))?;
    let h2 = TlsServer::start_with(dir.path(), "server", None, true)?;
    let h1 = TlsServer::start_with(dir.path(), "server", None, true)?;
    let mut no_h2 = job("http1", &h1.addr, &["ca_file: ca.pem"]);
    no_h2 = no_h2.replace("    scheme: https\n", "    scheme: https\n    enable_http2: false\n");
    let agent = Agent::start(
        dir.path(),
        &scrape_config(&[job("http2", &h2.addr, &["ca_file: ca.pem"]), no_h2]),
    )?;
    poll("the h2 server saw an h2 client", Duration::from_secs(20), || {
        Ok(h2.proc.log_text().contains("alpn h2").then_some(()))
    })?;
    assert_eq!(
        scraped(&agent, "http1")?,
        ("up".to_owned(), String::new()),
        "{}",
        h1.proc.log_text()
    );
    // Without HTTP/2 the client offers no h2 (rustls then sends no ALPN at all).
    let log = h1.proc.log_text();
    assert!(log.contains("alpn ") && !log.contains("alpn h2"), "{log}");
    Ok(())
}
