//! The payload of a WAL record: a run of frames, `[u64 LE routing hash][u32 LE length][body]`.
//!
//! The engine ([`crate::sender`]) never looks into a body: it routes each frame to a shard by
//! its hash (same hash → same shard → in order) and hands the bodies to its protocol, which
//! builds the request from them. What a body is belongs to the source and the protocol
//! (a remote-write `TimeSeries` for the metrics path, see [`crate::remote_write::frame`]).

/// Bytes of a frame header.
pub const HEADER: usize = 12;

/// Appends one frame whose body `encode` writes.
#[inline]
pub fn push_with(buf: &mut Vec<u8>, hash: u64, encode: impl FnOnce(&mut Vec<u8>)) {
    buf.extend_from_slice(&hash.to_le_bytes());
    let len_at = buf.len();
    buf.extend_from_slice(&[0; 4]);
    let start = buf.len();
    encode(buf);
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
