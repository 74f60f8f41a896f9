//! Authentication and TLS options shared by scrape, remote_write and Kubernetes SD.

use super::checks::Checker;
use crate::agent::{Authorization, BasicAuth, TlsConfig};

/// The authentication and TLS options shared by scrape, remote_write and Kubernetes SD.
pub(super) struct HttpClient<'a> {
    pub(super) basic_auth: Option<&'a BasicAuth>,
    pub(super) authorization: Option<&'a Authorization>,
    pub(super) bearer_token: Option<&'a str>,
    pub(super) bearer_token_file: Option<&'a str>,
    pub(super) tls: Option<&'a TlsConfig>,
}

impl Checker<'_> {
    pub(super) fn http_client(&mut self, path: &str, h: &HttpClient<'_>) {
        let bearer = h.bearer_token.is_some() || h.bearer_token_file.is_some();
        if h.bearer_token.is_some() && h.bearer_token_file.is_some() {
            self.err(
                &format!("{path}.bearer_token_file"),
                "at most one of bearer_token and bearer_token_file may be set",
            );
        }
        if let Some(b) = h.basic_auth {
            if b.password.is_some() && b.password_file.is_some() {
                self.err(
                    &format!("{path}.basic_auth.password_file"),
                    "at most one of basic_auth password and password_file may be set",
                );
            }
            if h.authorization.is_some() || bearer {
                self.err(
                    &format!("{path}.basic_auth"),
                    "basic_auth cannot be combined with authorization, bearer_token or bearer_token_file",
                );
            }
        }
        if let Some(a) = h.authorization {
            if a.credentials.is_some() && a.credentials_file.is_some() {
                self.err(
                    &format!("{path}.authorization.credentials_file"),
                    "at most one of authorization credentials and credentials_file may be set",
                );
            }
            if a.kind.as_deref().is_some_and(|k| k.eq_ignore_ascii_case("basic")) {
                self.err(
                    &format!("{path}.authorization.type"),
                    "authorization type cannot be Basic; use basic_auth",
                );
            }
            if bearer {
                self.err(
                    &format!("{path}.authorization"),
                    "authorization cannot be combined with bearer_token or bearer_token_file",
                );
            }
        }
        if let Some(t) = h.tls {
            self.tls(&format!("{path}.tls_config"), t);
        }
    }

    fn tls(&mut self, path: &str, t: &TlsConfig) {
        for (inline, file, name) in [
            (&t.ca, &t.ca_file, "ca"),
            (&t.cert, &t.cert_file, "cert"),
            (&t.key, &t.key_file, "key"),
        ] {
            if inline.is_some() && file.is_some() {
                self.err(
                    &format!("{path}.{name}_file"),
                    format!("at most one of {name} and {name}_file may be set"),
                );
            }
        }
        let has_cert = t.cert.is_some() || t.cert_file.is_some();
        let has_key = t.key.is_some() || t.key_file.is_some();
        if has_cert != has_key {
            self.err(
                path,
                "a client certificate (cert or cert_file) needs a key (key or key_file), and the other way round",
            );
        }
        if let Some(v) = t.min_version.as_deref().filter(|v| !matches!(*v, "TLS12" | "TLS13")) {
            self.err(
                &format!("{path}.min_version"),
                format!("min_version must be TLS12 or TLS13, got {v:?}"),
            );
        }
    }
}
