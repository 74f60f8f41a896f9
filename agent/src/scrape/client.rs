//! Fetching one scrape: HTTP GET with Prometheus's headers, timeout, gzip and a body size cap.

use std::io::Write;
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

/// Where a fetched body goes, decompressed, piece by piece: nothing holds the whole body.
pub trait BodySink: Send {
    /// The answer's `Content-Type`, before any data.
    fn start(&mut self, content_type: &str);
    /// The next piece of the (decompressed) body.
    fn data(&mut self, piece: &[u8]) -> Result<(), ScrapeError>;
    /// The body ended.
    fn end(&mut self) -> Result<(), ScrapeError>;
}

/// How many redirects a scrape follows (Go's default, which Prometheus uses).
const MAX_REDIRECTS: usize = 10;

/// Fetches `url` and streams its body, gunzipped when the answer is gzip, into `sink` in
/// pieces of at most a network frame (or 32 KiB of decompressed output), so memory does not
/// grow with the page. `limit` (0 = none) caps the decompressed body, and the compressed one.
/// With `follow_redirects`, 3xx answers with a `Location` are followed (at most 10), as
/// Prometheus does by default. The timeout covers the whole exchange, parsing included.
#[allow(clippy::too_many_arguments)]
pub async fn fetch(
    client: &HttpClient,
    url: &str,
    auth: Option<&HeaderValue>,
    timeout: Duration,
    limit: u64,
    follow_redirects: bool,
    sink: &mut dyn BodySink,
) -> Result<(), ScrapeError> {
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
            .unwrap_or("");
        sink.start(content_type);
        let gzip = resp
            .headers()
            .get(header::CONTENT_ENCODING)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"gzip"));
        let cap = if limit == 0 { u64::MAX } else { limit };
        let capped = Capped {
            sink,
            written: 0,
            cap,
            limit,
            error: None,
        };
        let mut out = if gzip {
            Out::Gzip(Box::new(flate2::write::MultiGzDecoder::new(capped)))
        } else {
            Out::Plain(capped)
        };
        let mut received = 0u64;
        let mut incoming = resp.into_body();
        while let Some(frame) = incoming.frame().await {
            let frame = frame.map_err(|e| ScrapeError::Connect(format!("reading body: {e}")))?;
            let Ok(data) = frame.into_data() else { continue };
            received += data.len() as u64;
            if received > cap {
                return Err(ScrapeError::BodyTooLarge(limit));
            }
            out.write(&data)?;
        }
        out.finish()
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(ScrapeError::Timeout(timeout)),
    }
}

/// The sink behind a size cap, as a `Write` for the gzip decoder.
struct Capped<'s> {
    sink: &'s mut dyn BodySink,
    written: u64,
    cap: u64,
    limit: u64,
    /// Why the sink refused (the decoder only passes an `io::Error` on).
    error: Option<ScrapeError>,
}

impl Write for Capped<'_> {
    fn write(&mut self, piece: &[u8]) -> std::io::Result<usize> {
        self.written += piece.len() as u64;
        let refused = if self.written > self.cap {
            Err(ScrapeError::BodyTooLarge(self.limit))
        } else {
            self.sink.data(piece)
        };
        match refused {
            Ok(()) => Ok(piece.len()),
            Err(e) => {
                self.error = Some(e);
                Err(std::io::Error::other("refused by the sink"))
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The body as it is, or through the gzip decoder.
enum Out<'s> {
    Plain(Capped<'s>),
    Gzip(Box<flate2::write::MultiGzDecoder<Capped<'s>>>),
}

impl Out<'_> {
    fn write(&mut self, data: &[u8]) -> Result<(), ScrapeError> {
        match self {
            Out::Plain(c) => c.write_all(data).map_err(|e| c.refused(e)),
            Out::Gzip(d) => d.write_all(data).map_err(|e| d.get_mut().refused(e)),
        }
    }

    fn finish(self) -> Result<(), ScrapeError> {
        let capped = match self {
            Out::Plain(c) => c,
            Out::Gzip(mut d) => {
                d.try_finish().map_err(|e| d.get_mut().refused(e))?;
                d.finish().map_err(|e| ScrapeError::Decompress(e.to_string()))?
            }
        };
        capped.sink.end()
    }
}

impl Capped<'_> {
    /// The sink's own error if it refused, else a decompression error.
    fn refused(&mut self, e: std::io::Error) -> ScrapeError {
        self.error
            .take()
            .unwrap_or_else(|| ScrapeError::Decompress(e.to_string()))
    }
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
