//! Remote write: the on-disk write-ahead queue every scraped sample passes through, and the
//! sender that drains it to a Prometheus remote-write 1.0 receiver with sharding and retries.
//!
//! Data enters through [`Endpoint::append`] (one WAL record per scrape, already protobuf
//! encoded, see [`frame`]) and leaves through [`sender::run`], which commits the WAL position
//! only once the receiver has acknowledged the samples.

pub mod file_sink;
pub mod frame;
pub mod proto;

use std::sync::Arc;

use http::{header, HeaderMap, HeaderValue, StatusCode};

use crate::labels::Labels;
use crate::relabel::Rule;
use crate::sender::{Protocol, Rejection};
use crate::telemetry::Metrics;

/// Prometheus remote write 1.0: a snappy-compressed `WriteRequest` whose `timeseries` are the
/// frames' bodies, with the spec's headers.
pub struct RemoteWrite {
    headers: HeaderMap,
}

impl RemoteWrite {
    /// The protocol with its headers.
    pub fn new() -> Self {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("snappy"));
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-protobuf"));
        headers.insert(header::USER_AGENT, crate::http::user_agent());
        headers.insert("X-Prometheus-Remote-Write-Version", HeaderValue::from_static("0.1.0"));
        Self { headers }
    }
}

impl Default for RemoteWrite {
    fn default() -> Self {
        Self::new()
    }
}

impl Protocol for RemoteWrite {
    fn frame(&self, body: &[u8], batch: &mut Vec<u8>) {
        proto::frame_timeseries(body, batch);
    }

    fn encode(&self, batch: &[u8], body: &mut Vec<u8>) {
        proto::compress(batch, body);
    }

    fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    fn classify(&self, _status: StatusCode, body: &str) -> Rejection {
        classify_rejection(body)
    }

    fn rejection_reasons(&self) -> &'static [&'static str] {
        &REJECTION_REASONS
    }
}

/// Classifies a 4xx answer by its body. Prometheus rolls back a whole request when any sample
/// in it is out of order, out of bounds or too old, so those are loss of the whole request;
/// only an exact duplicate means the receiver has the data already.
pub fn classify_rejection(body: &str) -> Rejection {
    let lower = body.to_ascii_lowercase();
    if lower.contains("duplicate sample for timestamp") {
        Rejection::Duplicate
    } else if lower.contains("out of order") || lower.contains("out-of-order") {
        Rejection::Dropped("out_of_order")
    } else if lower.contains("out of bounds") || lower.contains("out-of-bounds") {
        Rejection::Dropped("out_of_bounds")
    } else if lower.contains("too old") {
        Rejection::Dropped("too_old")
    } else {
        Rejection::Dropped("http_4xx")
    }
}

/// The reasons [`classify_rejection`] can give, for creating the counters at zero.
pub const REJECTION_REASONS: [&str; 5] = ["out_of_order", "out_of_bounds", "too_old", "http_4xx", "http_3xx"];

#[cfg(test)]
mod classify_tests {
    use super::*;

    #[test]
    fn rejections_are_classified_as_prometheus_means_them() {
        assert_eq!(
            classify_rejection("duplicate sample for timestamp; series {__name__=\"x\"}"),
            Rejection::Duplicate
        );
        assert_eq!(
            classify_rejection("out of order sample"),
            Rejection::Dropped("out_of_order")
        );
        assert_eq!(
            classify_rejection("out of bounds: series {}"),
            Rejection::Dropped("out_of_bounds")
        );
        assert_eq!(
            classify_rejection("sample timestamp too old"),
            Rejection::Dropped("too_old")
        );
        assert_eq!(classify_rejection("bad request"), Rejection::Dropped("http_4xx"));
    }
}

/// One `remote_write` destination as seen by the scrape loops.
pub struct Endpoint {
    /// Name used in metrics and logs.
    pub name: String,
    /// The write-ahead queue of this destination.
    pub wal: Arc<crate::wal::Wal>,
    /// `write_relabel_configs`.
    pub write_relabel: Vec<Rule>,
}

impl Endpoint {
    /// Appends one scrape's frames; a failure (disk full) drops them with a counter.
    pub fn append(&self, payload: &[u8], samples: u32, metrics: &Metrics) {
        match crate::wal::blocking(|| self.wal.append(payload, samples)) {
            Ok(_) => metrics.samples_appended(&self.name, samples as u64),
            Err(e) => {
                metrics.samples_dropped(&self.name, "wal_write_error", samples as u64);
                tracing::error!(remote = %self.name, error = %e, samples, "Writing to the WAL failed; samples dropped.");
            }
        }
    }
}

/// Scrape-sized buffers shared by all scrape loops, bounded in count and in bytes: at most
/// [`BufferPool::KEEP`] buffers and [`BufferPool::KEEP_BYTES`] of capacity are kept, and a
/// buffer larger than [`BufferPool::MAX_KEPT`] (one huge page, a gzip bomb cut at
/// `body_size_limit`) is freed at once rather than held for the next scrape.
#[derive(Default)]
pub struct BufferPool(std::sync::Mutex<Vec<Vec<u8>>>);

impl BufferPool {
    /// Buffers kept for reuse.
    pub const KEEP: usize = 8;
    /// Capacity kept for reuse, all buffers together.
    pub const KEEP_BYTES: usize = 64 << 20;
    /// The largest buffer kept.
    pub const MAX_KEPT: usize = 16 << 20;

    /// An empty buffer, with capacity when one is available.
    pub fn take(&self) -> Vec<u8> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
            .unwrap_or_default()
    }

    /// Returns a buffer for reuse (or frees it, beyond the bounds).
    pub fn give(&self, mut buf: Vec<u8>) {
        if buf.capacity() == 0 || buf.capacity() > Self::MAX_KEPT {
            return;
        }
        buf.clear();
        let mut pool = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let kept: usize = pool.iter().map(Vec::capacity).sum();
        if pool.len() < Self::KEEP && kept + buf.capacity() <= Self::KEEP_BYTES {
            pool.push(buf);
        }
    }

    /// Capacity held by the pool.
    pub fn kept_bytes(&self) -> usize {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(Vec::capacity)
            .sum()
    }
}

#[cfg(test)]
mod pool_tests {
    use super::BufferPool;

    #[test]
    fn the_pool_is_bounded_in_bytes_and_frees_huge_buffers() {
        let pool = BufferPool::default();
        pool.give(Vec::with_capacity(BufferPool::MAX_KEPT + 1));
        assert_eq!(pool.kept_bytes(), 0, "a huge buffer is freed");
        for _ in 0..BufferPool::KEEP * 2 {
            pool.give(Vec::with_capacity(BufferPool::MAX_KEPT));
        }
        assert!(pool.kept_bytes() <= BufferPool::KEEP_BYTES);
        assert!(pool.kept_bytes() >= BufferPool::MAX_KEPT);
    }
}

/// Everything scraped samples are written to.
#[derive(Default)]
pub struct Outputs {
    /// Remote write destinations.
    pub endpoints: Vec<Arc<Endpoint>>,
    /// `global.external_labels`, added to series that do not have them.
    pub external_labels: Labels,
    /// The file sink, if configured.
    pub file_sink: Option<Arc<file_sink::FileSink>>,
    /// Buffers for scrapes in progress.
    pub pool: BufferPool,
}
