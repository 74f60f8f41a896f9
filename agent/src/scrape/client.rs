//! Fetching one scrape: HTTP GET with Prometheus's headers, timeout, gzip and a body size cap.

use std::io::Read;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Full};

use crate::http::HttpClient;

/// The `Accept` header Prometheus 2.42 sends: OpenMetrics preferred, text 0.0.4 accepted.
pub const ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

pub use crate::http::{error_chain, join_location, user_agent};

/// Why a scrape failed; `kind()` is the bounded label value for metrics.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    /// The request did not finish in time.
    #[error("context deadline exceeded (scrape timeout {0:?})")]
    Timeout(Duration),
    /// Connecting or sending failed.
    #[error("{0}")]
    Connect(String),
    /// Non-200 answer.
    #[error("server returned HTTP status {0}")]
    Status(StatusCode),
    /// Body larger than `body_size_limit`.
    #[error("body size limit exceeded: the response is larger than {0} bytes")]
    BodyTooLarge(u64),
    /// gzip decoding failed.
    #[error("decompressing gzip response: {0}")]
    Decompress(String),
    /// The exposition text was malformed.
    #[error("{0}")]
    Parse(String),
    /// More samples than `sample_limit`.
    #[error("sample limit exceeded: {got} samples > sample_limit {limit}")]
    SampleLimit {
        /// Samples after relabeling.
        got: u64,
        /// The limit.
        limit: u64,
    },
    /// A label limit was exceeded.
    #[error("{0}")]
    LabelLimit(String),
    /// Credentials could not be read.
    #[error("reading credentials: {0}")]
    Auth(String),
    /// The request could not be built (bad URL).
    #[error("invalid scrape URL: {0}")]
    Url(String),
}

impl ScrapeError {
    /// Every value [`ScrapeError::kind`] can take.
    pub const KINDS: &'static [&'static str] = &[
        "timeout",
        "connect",
        "http_status",
        "body_size_limit",
        "decompress",
        "parse",
        "sample_limit",
        "label_limit",
        "url",
        "auth",
    ];

    /// A short, bounded reason for the failure counter.
    pub fn kind(&self) -> &'static str {
        match self {
            ScrapeError::Timeout(_) => "timeout",
            ScrapeError::Connect(_) => "connect",
            ScrapeError::Status(_) => "http_status",
            ScrapeError::BodyTooLarge(_) => "body_size_limit",
            ScrapeError::Decompress(_) => "decompress",
            ScrapeError::Parse(_) => "parse",
            ScrapeError::SampleLimit { .. } => "sample_limit",
            ScrapeError::LabelLimit(_) => "label_limit",
            ScrapeError::Url(_) => "url",
            ScrapeError::Auth(_) => "auth",
        }
    }
}

/// What a fetch returns besides the body (which goes into the caller's buffer).
pub struct Fetched {
    /// `Content-Type` of the answer.
    pub content_type: String,
}

/// How many redirects a scrape follows (Go's default, which Prometheus uses).
const MAX_REDIRECTS: usize = 10;

/// Fetches `url` into `body` (uncompressed; `scratch` holds the compressed form). Both are
/// reused buffers, so a steady-state scrape does not allocate its body. `limit` of 0 means no
/// size limit. With `follow_redirects`, 3xx answers with a `Location` are followed (at most
/// 10), as Prometheus does by default.
#[allow(clippy::too_many_arguments)]
pub async fn fetch(
    client: &HttpClient,
    url: &str,
    auth: Option<&HeaderValue>,
    timeout: Duration,
    limit: u64,
    follow_redirects: bool,
    body: &mut Vec<u8>,
    scratch: &mut Vec<u8>,
) -> Result<Fetched, ScrapeError> {
    body.clear();
    scratch.clear();
    let build = |url: &str, auth: Option<&HeaderValue>| {
        let mut req = Request::get(url)
            .header(header::ACCEPT, ACCEPT)
            .header(header::ACCEPT_ENCODING, "gzip")
            .header(header::USER_AGENT, user_agent())
            .header(
                "X-Prometheus-Scrape-Timeout-Seconds",
                format!("{}", timeout.as_secs_f64()),
            );
        if let Some(a) = auth {
            req = req.header(header::AUTHORIZATION, a.clone());
        }
        req.body(Full::new(Bytes::new()))
            .map_err(|e| ScrapeError::Url(e.to_string()))
    };
    let work = async {
        let mut current = url.to_owned();
        let mut hops = 0;
        let resp = loop {
            // Credentials go only to the first host and its subdomains, as Go's client (and
            // so Prometheus) does on redirects.
            let auth = auth.filter(|_| crate::http::credentials_may_follow(url, &current));
            let resp = client
                .request(build(&current, auth)?)
                .await
                .map_err(|e| ScrapeError::Connect(error_chain(&e)))?;
            let location = resp.headers().get(header::LOCATION).and_then(|v| v.to_str().ok());
            match location {
                Some(loc) if follow_redirects && resp.status().is_redirection() && hops < MAX_REDIRECTS => {
                    current = join_location(&current, loc);
                    hops += 1;
                }
                _ => break resp,
            }
        };
        if resp.status() != StatusCode::OK {
            return Err(ScrapeError::Status(resp.status()));
        }
        let content_type = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let gzip = resp
            .headers()
            .get(header::CONTENT_ENCODING)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"gzip"));
        let cap = if limit == 0 { u64::MAX } else { limit };
        let raw: &mut Vec<u8> = if gzip { &mut *scratch } else { &mut *body };
        let mut incoming = resp.into_body();
        while let Some(frame) = incoming.frame().await {
            let frame = frame.map_err(|e| ScrapeError::Connect(format!("reading body: {e}")))?;
            if let Ok(data) = frame.into_data() {
                if (raw.len() + data.len()) as u64 > cap {
                    return Err(ScrapeError::BodyTooLarge(limit));
                }
                raw.extend_from_slice(&data);
            }
        }
        if gzip {
            gunzip(scratch, limit, body)?;
        }
        Ok(Fetched { content_type })
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(ScrapeError::Timeout(timeout)),
    }
}

fn gunzip(data: &[u8], limit: u64, out: &mut Vec<u8>) -> Result<(), ScrapeError> {
    let cap = if limit == 0 { u64::MAX } else { limit + 1 };
    flate2::read::MultiGzDecoder::new(data)
        .take(cap)
        .read_to_end(out)
        .map_err(|e| ScrapeError::Decompress(e.to_string()))?;
    if limit != 0 && out.len() as u64 > limit {
        return Err(ScrapeError::BodyTooLarge(limit));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::join_location;

    #[test]
    fn locations() {
        assert_eq!(join_location("http://a:1/x/metrics?q=1", "/m"), "http://a:1/m");
        assert_eq!(join_location("http://a:1/x/metrics", "other"), "http://a:1/x/other");
        assert_eq!(join_location("http://a:1/x", "https://b/y"), "https://b/y");
        assert_eq!(join_location("https://a:1/x", "//c/z"), "https://c/z");
    }
}
