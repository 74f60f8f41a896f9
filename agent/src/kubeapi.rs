//! The Kubernetes API client of a `kubernetes_sd_configs` entry (its server, credentials and
//! TLS), shared by the pod cache and discovery. Build errors are this module's [`Error`].

use std::io;
use std::path::{Path, PathBuf};

use config::agent::KubernetesSdConfig;
use kube::config::{KubeConfigOptions, Kubeconfig, KubeconfigError};
use kube::Client;

/// File holding the namespace of the agent's own pod (`namespaces.own_namespace`).
pub const OWN_NAMESPACE_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";
/// Errors building pod discovery or its API client. Watch errors at run time are not errors
/// of this type: they are logged, counted and retried.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `role` is not `pod`.
    #[error("kubernetes_sd_configs: role {0:?} is not supported (only \"pod\")")]
    UnsupportedRole(String),
    /// A `selectors` entry names another role.
    #[error("kubernetes_sd_configs: selector role {0:?} does not match role \"pod\"")]
    SelectorRole(String),
    /// Both `api_server` and `kubeconfig_file` are set.
    #[error("kubernetes_sd_configs: api_server and kubeconfig_file are mutually exclusive")]
    ConflictingServer,
    /// A file named by the config could not be read.
    #[error("reading {what} from {}", path.display())]
    ReadFile {
        /// What the file holds.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The kubeconfig (given or synthesized for `api_server`) was rejected.
    #[error("loading Kubernetes client configuration")]
    Kubeconfig(#[source] KubeconfigError),
    /// The `api_server` settings do not form a valid client configuration.
    #[error("kubernetes_sd_configs: invalid api_server settings")]
    ApiServer(#[source] serde_json::Error),
    /// The `authorization` credentials are not a valid header value.
    #[error("kubernetes_sd_configs: authorization credentials are not a valid HTTP header value")]
    InvalidAuthorization,
    /// A selector does not parse.
    #[error("kubernetes_sd_configs: invalid selector: {0}")]
    Selector(String),
    /// The client could not be built (including in-cluster / `~/.kube/config` inference).
    #[error("building the Kubernetes client")]
    Client(#[source] kube::Error),
}

/// A client for `cfg`: from `kubeconfig_file`, or for `api_server` with the entry's TLS and
/// auth settings, else [`Client::try_default`] (`KUBECONFIG`/`~/.kube/config`, then in-cluster).
/// File paths are used as given; resolve them against the config file's directory first.
pub async fn client_for(cfg: &KubernetesSdConfig) -> Result<Client, Error> {
    let config = match (&cfg.api_server, &cfg.kubeconfig_file) {
        (Some(_), Some(_)) => return Err(Error::ConflictingServer),
        (None, None) => return Client::try_default().await.map_err(Error::Client),
        (None, Some(path)) => {
            let kubeconfig = Kubeconfig::read_from(path).map_err(Error::Kubeconfig)?;
            load_kubeconfig(kubeconfig).await?
        }
        (Some(server), None) => {
            let (kubeconfig, authorization) = api_server_kubeconfig(server, cfg)?;
            let mut config = load_kubeconfig(kubeconfig).await?;
            if let Some(value) = authorization {
                config.headers.push((http::header::AUTHORIZATION, value));
            }
            config
        }
    };
    Client::try_from(config).map_err(Error::Client)
}

async fn load_kubeconfig(kubeconfig: Kubeconfig) -> Result<kube::Config, Error> {
    let options = KubeConfigOptions::default();
    kube::Config::from_custom_kubeconfig(kubeconfig, &options)
        .await
        .map_err(Error::Kubeconfig)
}

/// A one-context kubeconfig for `server` carrying `cfg`'s TLS and auth settings, plus an
/// `Authorization` header for non-Bearer `authorization` types (kubeconfig has no slot for them).
fn api_server_kubeconfig(
    server: &str,
    cfg: &KubernetesSdConfig,
) -> Result<(Kubeconfig, Option<http::HeaderValue>), Error> {
    use base64::Engine as _;
    let b64 = |pem: &Option<String>| {
        let encode = |pem: &String| base64::engine::general_purpose::STANDARD.encode(pem);
        pem.as_ref().map(encode)
    };
    let tls = cfg.tls_config.clone().unwrap_or_default();
    let auth = api_auth(cfg)?;
    let basic = cfg.basic_auth.as_ref();
    let password = match basic {
        Some(b) => inline_or_file("basic auth password", &b.password, &b.password_file)?,
        None => None,
    };
    let mut cluster = serde_json::json!({
        "server": server,
        "insecure-skip-tls-verify": tls.insecure_skip_verify,
        "certificate-authority": tls.ca_file,
        "certificate-authority-data": b64(&tls.ca),
        "tls-server-name": tls.server_name,
    });
    let mut user = serde_json::json!({
        "client-certificate": tls.cert_file,
        "client-certificate-data": b64(&tls.cert),
        "client-key": tls.key_file,
        "client-key-data": b64(&tls.key),
        "token": auth.token,
        "tokenFile": auth.token_file,
        "username": basic.map(|b| b.username.as_str()),
        "password": password,
    });
    for object in [&mut cluster, &mut user] {
        if let Some(map) = object.as_object_mut() {
            map.retain(|_, value| !value.is_null());
        }
    }
    let kubeconfig = serde_json::json!({
        "clusters": [{ "name": "sd", "cluster": cluster }],
        "users": [{ "name": "sd", "user": user }],
        "contexts": [{ "name": "sd", "context": { "cluster": "sd", "user": "sd" } }],
        "current-context": "sd",
    });
    let kubeconfig = serde_json::from_value(kubeconfig).map_err(Error::ApiServer)?;
    Ok((kubeconfig, auth.header))
}

/// API server credentials: a Bearer token (inline or file, re-read by kube) or, for another
/// `authorization` type, a ready header.
struct ApiAuth {
    token: Option<String>,
    token_file: Option<String>,
    header: Option<http::HeaderValue>,
}

fn api_auth(cfg: &KubernetesSdConfig) -> Result<ApiAuth, Error> {
    let mut auth = ApiAuth {
        token: None,
        token_file: cfg.bearer_token_file.clone(),
        header: None,
    };
    let Some(authorization) = &cfg.authorization else {
        return Ok(auth);
    };
    let kind = authorization.kind.as_deref().unwrap_or("Bearer");
    let (inline, file) = (&authorization.credentials, &authorization.credentials_file);
    if kind.eq_ignore_ascii_case("bearer") {
        auth.token.clone_from(inline);
        auth.token_file = file.clone().or(auth.token_file);
        return Ok(auth);
    }
    let credentials = inline_or_file("authorization credentials", inline, file)?;
    let header = format!("{kind} {}", credentials.unwrap_or_default());
    let mut value = http::HeaderValue::try_from(header).map_err(|_| Error::InvalidAuthorization)?;
    value.set_sensitive(true);
    auth.header = Some(value);
    Ok(auth)
}

/// `inline` if set, else the trimmed content of `file` if set.
fn inline_or_file(what: &'static str, inline: &Option<String>, file: &Option<String>) -> Result<Option<String>, Error> {
    match (inline, file) {
        (Some(inline), _) => Ok(Some(inline.clone())),
        (None, Some(file)) => read_trimmed(what, Path::new(file)).map(Some),
        (None, None) => Ok(None),
    }
}

fn read_trimmed(what: &'static str, path: &Path) -> Result<String, Error> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text.trim().to_owned()),
        Err(source) => Err(Error::ReadFile {
            what,
            path: path.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use config::agent::Authorization;

    use super::*;

    fn pod_cfg() -> KubernetesSdConfig {
        KubernetesSdConfig {
            role: "pod".into(),
            ..KubernetesSdConfig::default()
        }
    }

    #[tokio::test]
    async fn client_for_api_server_and_conflicts() {
        let mut cfg = pod_cfg();
        cfg.api_server = Some("http://127.0.0.1:6443".into());
        cfg.authorization = Some(Authorization {
            kind: None,
            credentials: Some("secret".into()),
            credentials_file: None,
        });
        assert!(client_for(&cfg).await.is_ok());

        cfg.authorization.as_mut().unwrap().kind = Some("Token".into());
        let (_, header) = api_server_kubeconfig("http://127.0.0.1:6443", &cfg).unwrap();
        assert_eq!(header.unwrap().to_str().unwrap(), "Token secret");

        cfg.authorization = None;
        cfg.basic_auth = Some(config::agent::BasicAuth {
            username: "agent".into(),
            password: Some("pw".into()),
            password_file: None,
        });
        assert!(client_for(&cfg).await.is_ok());

        cfg.kubeconfig_file = Some("/nonexistent".into());
        assert!(matches!(client_for(&cfg).await, Err(Error::ConflictingServer)));
    }
}
