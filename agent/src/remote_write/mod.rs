//! Remote write: the on-disk write-ahead queue every scraped sample passes through, and the
//! sender that drains it to a Prometheus remote-write 1.0 receiver with sharding and retries.
//!
//! Data enters through [`Endpoint::append`] (one WAL record per scrape, already protobuf
//! encoded, see [`frame`]) and leaves through [`sender::run`], which commits the WAL position
//! only once the receiver has acknowledged the samples.

pub mod file_sink;
pub mod frame;
pub mod proto;
pub mod sender;
pub mod wal;

use std::sync::Arc;

use crate::labels::Labels;
use crate::relabel::Rule;
use crate::telemetry::Metrics;

/// One `remote_write` destination as seen by the scrape loops.
pub struct Endpoint {
    /// Name used in metrics and logs.
    pub name: String,
    /// The write-ahead queue of this destination.
    pub wal: Arc<wal::Wal>,
    /// `write_relabel_configs`.
    pub write_relabel: Vec<Rule>,
}

impl Endpoint {
    /// Appends one scrape's frames; a failure (disk full) drops them with a counter.
    pub fn append(&self, payload: &[u8], samples: u32, metrics: &Metrics) {
        match self.wal.append(payload, samples) {
            Ok(_) => metrics.samples_appended(&self.name, samples as u64),
            Err(e) => {
                metrics.samples_dropped(&self.name, "wal_write_error", samples as u64);
                tracing::error!(remote = %self.name, error = %e, samples, "Writing to the WAL failed; samples dropped.");
            }
        }
    }
}

/// Scrape-sized buffers shared by all scrape loops (bounded: at most [`BufferPool::KEEP`]
/// are kept; others are freed).
#[derive(Default)]
pub struct BufferPool(std::sync::Mutex<Vec<Vec<u8>>>);

impl BufferPool {
    /// Buffers kept for reuse.
    pub const KEEP: usize = 8;

    /// An empty buffer, with capacity when one is available.
    pub fn take(&self) -> Vec<u8> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
            .unwrap_or_default()
    }

    /// Returns a buffer for reuse.
    pub fn give(&self, mut buf: Vec<u8>) {
        if buf.capacity() == 0 {
            return;
        }
        buf.clear();
        let mut pool = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < Self::KEEP {
            pool.push(buf);
        }
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
