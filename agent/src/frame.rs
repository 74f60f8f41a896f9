//! The payload of a WAL record: a run of frames, `[u64 LE routing hash][u32 LE length][body]`.
//!
//! A frame whose length has its top bit set ([`ANNOTATION`]) is an *annotation*: something the
//! source notes about the record (the logs path: which file and up to which offset it covers).
//! The engine skips annotations ([`Frames`] does not yield them) and never sends them.
//!
//! The engine ([`crate::sender`]) never looks into a body: it routes each frame to a shard by
//! its hash (same hash → same shard → in order) and hands the bodies to its protocol, which
//! builds the request from them. What a body is belongs to the source and the protocol
//! (a remote-write `TimeSeries` for the metrics path, see [`crate::remote_write::frame`]).

/// Bytes of a frame header.
pub const HEADER: usize = 12;

/// Top bit of a frame length: the frame is an annotation, not data.
pub const ANNOTATION: u32 = 1 << 31;

/// Appends an annotation frame (skipped by the engine; read back with [`annotations`]).
pub fn push_annotation(buf: &mut Vec<u8>, body: &[u8]) {
    buf.extend_from_slice(&0u64.to_le_bytes());
    buf.extend_from_slice(&(body.len() as u32 | ANNOTATION).to_le_bytes());
    buf.extend_from_slice(body);
}

/// The annotation bodies of a payload, in order.
pub fn annotations(payload: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut f = Frames::new(payload);
    f.annotations = true;
    f.map(|(_, body)| body)
}

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
    /// Yield annotations instead of data frames.
    annotations: bool,
}

impl<'a> Frames<'a> {
    /// Frames of `payload`.
    pub fn new(payload: &'a [u8]) -> Self {
        Self {
            rest: payload,
            malformed: false,
            annotations: false,
        }
    }
}

impl<'a> Iterator for Frames<'a> {
    type Item = (u64, &'a [u8]);
    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.rest.is_empty() {
                return None;
            }
            if self.rest.len() < HEADER {
                self.malformed = true;
                self.rest = &[];
                return None;
            }
            let hash = u64::from_le_bytes(self.rest[..8].try_into().ok()?);
            let raw = u32::from_le_bytes(self.rest[8..12].try_into().ok()?);
            let len = (raw & !ANNOTATION) as usize;
            if self.rest.len() < HEADER + len {
                self.malformed = true;
                self.rest = &[];
                return None;
            }
            let body = &self.rest[HEADER..HEADER + len];
            self.rest = &self.rest[HEADER + len..];
            if (raw & ANNOTATION != 0) == self.annotations {
                return Some((hash, body));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn annotations_are_skipped_by_frames_and_found_by_annotations() {
        let mut buf = Vec::new();
        push_with(&mut buf, 7, |b| b.extend_from_slice(b"one"));
        push_annotation(&mut buf, b"note");
        push_with(&mut buf, 9, |b| b.extend_from_slice(b"two"));
        let frames: Vec<_> = Frames::new(&buf).collect();
        assert_eq!(frames, [(7, &b"one"[..]), (9, &b"two"[..])]);
        assert_eq!(annotations(&buf).collect::<Vec<_>>(), [&b"note"[..]]);
        let mut torn = Frames::new(&buf[..buf.len() - 1]);
        assert_eq!(torn.by_ref().count(), 1);
        assert!(torn.malformed);
    }
}
