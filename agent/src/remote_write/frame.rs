//! The payload of a WAL record: a run of frames, one per sample,
//! `[u64 LE series hash][u32 LE length][TimeSeries message body]`.
//!
//! The hash routes a sample to its shard (same series → same shard → in order); the body is
//! already protobuf, so a shard builds a `WriteRequest` by framing bodies as field 1 — no
//! decoding or re-encoding between the scrape and the wire.

use super::proto;

/// Bytes of a frame header.
pub const HEADER: usize = 12;

/// Appends one sample of the series whose encoded labels are `labels`.
#[inline]
pub fn push(buf: &mut Vec<u8>, hash: u64, labels: &[u8], value: f64, timestamp_ms: i64) {
    buf.extend_from_slice(&hash.to_le_bytes());
    let len_at = buf.len();
    buf.extend_from_slice(&[0; 4]);
    let start = buf.len();
    proto::encode_series(labels, value, timestamp_ms, buf);
    let len = (buf.len() - start) as u32;
    buf[len_at..len_at + 4].copy_from_slice(&len.to_le_bytes());
}

/// Iterates `(hash, body)` over a payload; stops at the first malformed frame.
pub struct Frames<'a> {
    rest: &'a [u8],
    /// Set when trailing bytes did not form a frame.
    pub malformed: bool,
}

impl<'a> Frames<'a> {
    /// Frames of `payload`.
    pub fn new(payload: &'a [u8]) -> Self {
        Self {
            rest: payload,
            malformed: false,
        }
    }
}

impl<'a> Iterator for Frames<'a> {
    type Item = (u64, &'a [u8]);
    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        if self.rest.len() < HEADER {
            self.malformed = true;
            self.rest = &[];
            return None;
        }
        let hash = u64::from_le_bytes(self.rest[..8].try_into().ok()?);
        let len = u32::from_le_bytes(self.rest[8..12].try_into().ok()?) as usize;
        if self.rest.len() < HEADER + len {
            self.malformed = true;
            self.rest = &[];
            return None;
        }
        let body = &self.rest[HEADER..HEADER + len];
        self.rest = &self.rest[HEADER + len..];
        Some((hash, body))
    }
}

/// The routing hash of a series: xxh3 of its encoded labels (stable across restarts).
#[inline]
pub fn series_hash(encoded_labels: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(encoded_labels)
}
