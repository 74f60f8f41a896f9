//! Keeps secrets out of everything the installer prints: known secret values (the Grafana
//! password) and the secret-bearing keys of kubeconfig, talosconfig and Talos secrets files.

use std::sync::OnceLock;

use regex::Regex;

/// What replaces a secret in output.
pub const MASK: &str = "<redacted>";

/// Replaces secrets in text.
#[derive(Clone, Debug, Default)]
pub struct Redactor {
    secrets: Vec<String>,
}

fn keyed() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        // `key: value` / `key=value` / `"key": "value"` for keys that carry credentials in kubeconfig,
        // talosconfig, Talos secrets bundles and Helm --set arguments.
        Regex::new(
            r#"(?i)\b(client-key-data|client-certificate-data|token|password|adminPassword|admin-password|secret|bootstraptoken|secretboxencryptionsecret|aescbcencryptionsecret|key|crt|ca)("?\s*[:=]\s*"?)([^\s,}"]{8,})"#,
        )
        .expect("static regex")
    })
}

impl Redactor {
    /// A redactor that knows no secret values yet (key-based redaction still applies).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a secret value; it is masked wherever it appears.
    pub fn add(&mut self, secret: &str) {
        if secret.len() >= 4 && !self.secrets.iter().any(|s| s == secret) {
            self.secrets.push(secret.to_owned());
        }
    }

    /// `text` with every known secret and every credential-keyed value masked.
    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for s in &self.secrets {
            out = out.replace(s.as_str(), MASK);
        }
        keyed().replace_all(&out, format!("${{1}}${{2}}{MASK}")).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_known_values_and_keyed_credentials() {
        let mut r = Redactor::new();
        r.add("s3cr3t-pa55");
        let json = r#"{"adminPassword": "hunter2hunter2", "user": "admin"}"#;
        assert_eq!(r.redact(json), r#"{"adminPassword": "<redacted>", "user": "admin"}"#);
        let text = "login with s3cr3t-pa55\n    client-key-data: LS0tLS1CRUdJTiBFQyBQUklWQVRFIEtFWS0tLS0t\ntoken=abcdefghijklmnop\nname: sre-lab";
        let out = r.redact(text);
        assert!(!out.contains("s3cr3t-pa55"), "{out}");
        assert!(!out.contains("LS0tLS1"), "{out}");
        assert!(!out.contains("abcdefghijklmnop"), "{out}");
        assert!(out.contains("name: sre-lab"), "{out}");
        assert!(out.contains("client-key-data: <redacted>"), "{out}");
    }
}
