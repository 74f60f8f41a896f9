//! Frames of the metrics path: one per sample, whose body is a remote-write `TimeSeries`
//! message and whose hash is the series' (see [`crate::frame`] for the layout).
//!
//! The body is already protobuf, so the remote-write protocol builds a `WriteRequest` by
//! framing bodies as field 1 — no decoding or re-encoding between the scrape and the wire.

use super::proto;

pub use crate::frame::{Frames, HEADER};

/// Appends one sample of the series whose encoded labels are `labels`.
#[inline]
pub fn push(buf: &mut Vec<u8>, hash: u64, labels: &[u8], value: f64, timestamp_ms: i64) {
    crate::frame::push_with(buf, hash, |b| proto::encode_series(labels, value, timestamp_ms, b));
}

/// The routing hash of a series: xxh3 of its encoded labels (stable across restarts).
#[inline]
pub fn series_hash(encoded_labels: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(encoded_labels)
}
