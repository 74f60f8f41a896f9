//! The HTTP client shared by scraping and remote write: keep-alive connections, TLS from
//! Prometheus-style `tls_config`, and the `basic_auth` / `authorization` headers.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use config::agent::{Authorization, BasicAuth, TlsConfig};
use http::HeaderValue;
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

/// The concrete client type.
pub type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Errors building a client or reading credentials; they name the file involved.
#[derive(Debug, thiserror::Error)]
pub enum HttpSetupError {
    /// A credential, certificate or key file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// PEM content was invalid.
    #[error("{what}: {message}")]
    Pem {
        /// Which setting.
        what: &'static str,
        /// What was wrong.
        message: String,
    },
    /// Settings that do not fit together.
    #[error("{0}")]
    Invalid(String),
}

/// Resolves `path` relative to `base` (the config file's directory), as Prometheus does.
pub fn resolve(base: &Path, path: &str) -> PathBuf {
    let p = Path::new(path);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

fn read_file(base: &Path, path: &str) -> Result<String, HttpSetupError> {
    read_path(&resolve(base, path))
}

/// Where the `Authorization` header comes from. Files are read again for every request, as
/// Prometheus does, so rotated tokens (Kubernetes service-account tokens) are picked up.
#[derive(Clone, Debug, Default)]
pub enum Auth {
    /// No header.
    #[default]
    None,
    /// A fixed value.
    Static(HeaderValue),
    /// `basic_auth` with `password_file`.
    BasicFile {
        /// User name.
        username: String,
        /// The password file.
        path: PathBuf,
    },
    /// `authorization.credentials_file` or `bearer_token_file`: `<kind> <file content>`.
    CredentialsFile {
        /// The scheme, e.g. `Bearer`.
        kind: String,
        /// The credentials file.
        path: PathBuf,
    },
}

impl Auth {
    /// Builds the source from the Prometheus settings and reads any file once to check it.
    pub fn new(
        base: &Path,
        basic: Option<&BasicAuth>,
        authz: Option<&Authorization>,
        bearer_token: Option<&str>,
        bearer_token_file: Option<&str>,
    ) -> Result<Self, HttpSetupError> {
        let auth = if let Some(b) = basic {
            match (&b.password, &b.password_file) {
                (None, Some(f)) => Auth::BasicFile {
                    username: b.username.clone(),
                    path: resolve(base, f),
                },
                (p, _) => Auth::Static(basic_value(&b.username, p.as_deref().unwrap_or(""))?),
            }
        } else if let Some(a) = authz {
            let kind = a.kind.clone().unwrap_or_else(|| "Bearer".to_owned());
            match (&a.credentials, &a.credentials_file) {
                (None, Some(f)) => Auth::CredentialsFile {
                    kind,
                    path: resolve(base, f),
                },
                (c, _) => Auth::Static(header_value(&format!("{kind} {}", c.as_deref().unwrap_or("")))?),
            }
        } else if let Some(t) = bearer_token {
            Auth::Static(header_value(&format!("Bearer {t}"))?)
        } else if let Some(f) = bearer_token_file {
            Auth::CredentialsFile {
                kind: "Bearer".to_owned(),
                path: resolve(base, f),
            }
        } else {
            Auth::None
        };
        auth.header()?;
        Ok(auth)
    }

    /// The header value now (reading files).
    pub fn header(&self) -> Result<Option<HeaderValue>, HttpSetupError> {
        match self {
            Auth::None => Ok(None),
            Auth::Static(v) => Ok(Some(v.clone())),
            Auth::BasicFile { username, path } => {
                let p = read_path(path)?;
                Ok(Some(basic_value(username, p.trim_end_matches(['\n', '\r']))?))
            }
            Auth::CredentialsFile { kind, path } => {
                Ok(Some(header_value(&format!("{kind} {}", read_path(path)?.trim()))?))
            }
        }
    }
}

fn read_path(path: &Path) -> Result<String, HttpSetupError> {
    std::fs::read_to_string(path).map_err(|source| HttpSetupError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn basic_value(user: &str, password: &str) -> Result<HeaderValue, HttpSetupError> {
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    header_value(&format!("Basic {token}"))
}

fn header_value(v: &str) -> Result<HeaderValue, HttpSetupError> {
    let mut hv = HeaderValue::from_str(v)
        .map_err(|_| HttpSetupError::Invalid("credentials contain characters not allowed in a header".into()))?;
    hv.set_sensitive(true);
    Ok(hv)
}

/// Builds a keep-alive HTTP(S) client for the given TLS settings. With `http2` (Prometheus's
/// `enable_http2`, default true) HTTPS connections offer HTTP/2 by ALPN and use it when the
/// server picks it; plain HTTP stays HTTP/1.1 (no h2c), as in Prometheus.
pub fn build_client(base: &Path, tls: Option<&TlsConfig>, http2: bool) -> Result<HttpClient, HttpSetupError> {
    let tls_config = rustls_config(base, tls)?;
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(std::time::Duration::from_secs(10)));
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls_config)
        .https_or_http();
    let builder = match tls.and_then(|t| t.server_name.clone()) {
        Some(name) => builder.with_server_name_resolver(FixedServerName(name)),
        None => builder,
    };
    let connector = if http2 {
        builder.enable_http1().enable_http2().wrap_connector(http)
    } else {
        builder.enable_http1().wrap_connector(http)
    };
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(std::time::Duration::from_secs(90))
        .pool_max_idle_per_host(4)
        .build(connector))
}

#[derive(Debug)]
struct FixedServerName(String);

impl hyper_rustls::ResolveServerName for FixedServerName {
    fn resolve(&self, _uri: &http::Uri) -> Result<ServerName<'static>, Box<dyn std::error::Error + Sync + Send>> {
        Ok(ServerName::try_from(self.0.clone())?)
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn rustls_config(base: &Path, tls: Option<&TlsConfig>) -> Result<rustls::ClientConfig, HttpSetupError> {
    let default = TlsConfig::default();
    let tls = tls.unwrap_or(&default);
    let versions: &[&'static rustls::SupportedProtocolVersion] = match tls.min_version.as_deref() {
        None | Some("TLS12") | Some("TLS10") | Some("TLS11") => rustls::ALL_VERSIONS,
        Some("TLS13") => &[&rustls::version::TLS13],
        Some(other) => {
            return Err(HttpSetupError::Invalid(format!(
                "unknown TLS version {other:?} (expected TLS12 or TLS13)"
            )))
        }
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .map_err(|e| HttpSetupError::Invalid(e.to_string()))?;

    let builder = if tls.insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider())))
    } else {
        let mut roots = rustls::RootCertStore::empty();
        let pem = match (&tls.ca, &tls.ca_file) {
            (Some(ca), _) => Some(ca.clone()),
            (None, Some(f)) => Some(read_file(base, f)?),
            (None, None) => None,
        };
        match pem {
            Some(pem) => {
                for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                    let cert = cert.map_err(|e| HttpSetupError::Pem {
                        what: "tls_config.ca",
                        message: e.to_string(),
                    })?;
                    roots.add(cert).map_err(|e| HttpSetupError::Pem {
                        what: "tls_config.ca",
                        message: e.to_string(),
                    })?;
                }
            }
            None => {
                let native = rustls_native_certs::load_native_certs();
                roots.add_parsable_certificates(native.certs);
            }
        }
        builder.with_root_certificates(roots)
    };

    let cert = match (&tls.cert, &tls.cert_file) {
        (Some(c), _) => Some(c.clone()),
        (None, Some(f)) => Some(read_file(base, f)?),
        _ => None,
    };
    let key = match (&tls.key, &tls.key_file) {
        (Some(k), _) => Some(k.clone()),
        (None, Some(f)) => Some(read_file(base, f)?),
        _ => None,
    };
    match (cert, key) {
        (Some(cert), Some(key)) => {
            let certs = CertificateDer::pem_slice_iter(cert.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| HttpSetupError::Pem {
                    what: "tls_config.cert",
                    message: e.to_string(),
                })?;
            let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(|e| HttpSetupError::Pem {
                what: "tls_config.key",
                message: e.to_string(),
            })?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| HttpSetupError::Invalid(format!("client certificate: {e}")))
        }
        (None, None) => Ok(builder.with_no_client_auth()),
        _ => Err(HttpSetupError::Invalid(
            "tls_config needs both a client certificate and a key, or neither".into(),
        )),
    }
}

/// Verifier for `insecure_skip_verify: true`: accepts any certificate, still checks signatures
/// of the handshake itself.
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The host of a URL, without port or credentials, lower-cased.
fn url_host(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or(rest);
    let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next().unwrap_or(v6)
    } else {
        authority.split(':').next().unwrap_or(authority)
    };
    host.to_ascii_lowercase()
}

/// Whether the `Authorization` header (or basic-auth credentials) of a request to `initial`
/// may be sent to `dest` after a redirect: only to the same host or one of its subdomains,
/// as Go's HTTP client decides for sensitive headers.
pub fn credentials_may_follow(initial: &str, dest: &str) -> bool {
    let (a, b) = (url_host(initial), url_host(dest));
    b == a || b.ends_with(&format!(".{a}"))
}

/// The agent's `User-Agent`.
pub fn user_agent() -> HeaderValue {
    HeaderValue::from_static(concat!("sre-lab-agent/", env!("CARGO_PKG_VERSION")))
}

/// Renders an error with its sources, `a: b: c`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// Resolves a `Location` header against the URL that answered it.
pub fn join_location(base: &str, loc: &str) -> String {
    if loc.starts_with("http://") || loc.starts_with("https://") {
        return loc.to_owned();
    }
    let (scheme, rest) = base.split_once("://").unwrap_or(("http", base));
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    if let Some(p) = loc.strip_prefix("//") {
        return format!("{scheme}://{p}");
    }
    if loc.starts_with('/') {
        return format!("{scheme}://{authority}{loc}");
    }
    let path = &rest[authority.len()..];
    let path = path.split('?').next().unwrap_or("");
    let dir = path.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
    format!("{scheme}://{authority}{dir}/{loc}")
}

#[cfg(test)]
mod redirect_tests {
    use super::credentials_may_follow;

    #[test]
    fn credentials_follow_only_to_the_same_host_or_a_subdomain() {
        let from = "https://user:pw@metrics.example.com:8443/metrics";
        assert!(credentials_may_follow(from, "https://metrics.example.com/other"));
        assert!(credentials_may_follow(from, "http://a.metrics.example.com:9000/x"));
        assert!(!credentials_may_follow(from, "https://evil.com/metrics"));
        assert!(!credentials_may_follow(from, "https://badmetrics.example.com/"));
        assert!(!credentials_may_follow(from, "https://example.com/"));
        assert!(credentials_may_follow("http://[::1]:80/", "http://[::1]:81/"));
        assert!(!credentials_may_follow("http://127.0.0.1:80/", "http://127.0.0.2:80/"));
    }
}
