//! Loki's push wire format (`pkg/push/push.proto`): hand-written encoding of one entry as a
//! `StreamAdapter` (what a log frame's body is), and prost messages for decoding (tests, the
//! test receiver).
//!
//! ```text
//! PushRequest      { repeated StreamAdapter streams = 1; }
//! StreamAdapter    { string labels = 1; repeated EntryAdapter entries = 2; uint64 hash = 3; }
//! EntryAdapter     { Timestamp timestamp = 1; string line = 2;
//!                    repeated LabelPairAdapter structuredMetadata = 3; }
//! LabelPairAdapter { string name = 1; string value = 2; }
//! Timestamp        { int64 seconds = 1; int32 nanos = 2; }
//! ```

use prost::encoding::{encode_varint, encoded_len_varint};

/// A decoded push request.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PushRequest {
    /// The streams, each with its entries.
    #[prost(message, repeated, tag = "1")]
    pub streams: Vec<StreamAdapter>,
}

/// A stream: its label set in LogQL form and entries.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StreamAdapter {
    /// `{name="value", …}`.
    #[prost(string, tag = "1")]
    pub labels: String,
    /// Its entries.
    #[prost(message, repeated, tag = "2")]
    pub entries: Vec<EntryAdapter>,
    /// Unused by Loki's push path.
    #[prost(uint64, tag = "3")]
    pub hash: u64,
}

/// One log line.
#[derive(Clone, PartialEq, prost::Message)]
pub struct EntryAdapter {
    /// When it was written.
    #[prost(message, optional, tag = "1")]
    pub timestamp: Option<Timestamp>,
    /// The line.
    #[prost(string, tag = "2")]
    pub line: String,
    /// Structured metadata.
    #[prost(message, repeated, tag = "3")]
    pub structured_metadata: Vec<LabelPairAdapter>,
}

/// A structured-metadata pair.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LabelPairAdapter {
    /// Name.
    #[prost(string, tag = "1")]
    pub name: String,
    /// Value.
    #[prost(string, tag = "2")]
    pub value: String,
}

/// `google.protobuf.Timestamp`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Timestamp {
    /// Seconds since the epoch.
    #[prost(int64, tag = "1")]
    pub seconds: i64,
    /// Nanoseconds within the second.
    #[prost(int32, tag = "2")]
    pub nanos: i32,
}

fn key(field: u32, wire_type: u32) -> u8 {
    ((field << 3) | wire_type) as u8
}

fn bytes_field_len(len: usize) -> usize {
    1 + encoded_len_varint(len as u64) + len
}

fn put_bytes(field: u32, data: &[u8], out: &mut Vec<u8>) {
    out.push(key(field, 2));
    encode_varint(data.len() as u64, out);
    out.extend_from_slice(data);
}

/// Appends one entry of the stream `labels` (`{name="value", …}`) at `ts_ns` (nanoseconds since
/// the epoch) as a `StreamAdapter` body: a log frame's body. `line` need not be UTF-8 here;
/// the source makes it valid (Loki rejects invalid UTF-8).
pub fn encode_entry(labels: &str, ts_ns: i64, line: &[u8], metadata: &[(&str, &str)], out: &mut Vec<u8>) {
    let (seconds, nanos) = (ts_ns.div_euclid(1_000_000_000), ts_ns.rem_euclid(1_000_000_000) as i32);
    let ts_len = if seconds != 0 {
        1 + encoded_len_varint(seconds as u64)
    } else {
        0
    } + if nanos != 0 {
        1 + encoded_len_varint(nanos as u64)
    } else {
        0
    };
    let meta_len = |name: &str, value: &str| bytes_field_len(name.len()) + bytes_field_len(value.len());
    let entry_len = bytes_field_len(ts_len)
        + if line.is_empty() {
            0
        } else {
            bytes_field_len(line.len())
        }
        + metadata
            .iter()
            .map(|(n, v)| bytes_field_len(meta_len(n, v)))
            .sum::<usize>();
    out.reserve(bytes_field_len(labels.len()) + bytes_field_len(entry_len));
    put_bytes(1, labels.as_bytes(), out);
    out.push(key(2, 2));
    encode_varint(entry_len as u64, out);
    out.push(key(1, 2));
    encode_varint(ts_len as u64, out);
    if seconds != 0 {
        out.push(key(1, 0));
        encode_varint(seconds as u64, out);
    }
    if nanos != 0 {
        out.push(key(2, 0));
        encode_varint(nanos as u64, out);
    }
    if !line.is_empty() {
        put_bytes(2, line, out);
    }
    for (n, v) in metadata {
        out.push(key(3, 2));
        encode_varint(meta_len(n, v) as u64, out);
        put_bytes(1, n.as_bytes(), out);
        put_bytes(2, v.as_bytes(), out);
    }
}

/// Appends a `StreamAdapter` body as field 1 of a `PushRequest`: concatenated, they form one.
pub fn frame_stream(stream_body: &[u8], out: &mut Vec<u8>) {
    put_bytes(1, stream_body, out);
}

/// Reads a varint at `*at`, advancing it.
#[inline]
fn varint(buf: &[u8], at: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*at)?;
        *at += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return Some(v);
        }
    }
    None
}

/// The fields of a message: (field number, wire type, payload of length-delimited fields or
/// empty, varint value).
fn fields(buf: &[u8]) -> impl Iterator<Item = Option<(u32, u8, &[u8], u64)>> + '_ {
    let mut at = 0;
    std::iter::from_fn(move || {
        if at >= buf.len() {
            return None;
        }
        let f = (|| {
            let k = varint(buf, &mut at)?;
            let (field, wire) = ((k >> 3) as u32, (k & 7) as u8);
            match wire {
                0 => Some((field, wire, &buf[..0], varint(buf, &mut at)?)),
                2 => {
                    let n = varint(buf, &mut at)? as usize;
                    let p = buf.get(at..at.checked_add(n)?)?;
                    at += n;
                    Some((field, wire, p, 0))
                }
                _ => None,
            }
        })();
        if f.is_none() {
            at = buf.len();
        }
        Some(f)
    })
}

/// The time of an encoded `EntryAdapter`, for ordering.
fn entry_time(entry: &[u8]) -> Option<(i64, i64)> {
    for f in fields(entry) {
        let (field, _, payload, _) = f?;
        if field == 1 {
            let (mut s, mut n) = (0i64, 0i64);
            for t in fields(payload) {
                match t? {
                    (1, 0, _, v) => s = v as i64,
                    (2, 0, _, v) => n = i64::from(v as i32),
                    _ => {}
                }
            }
            return Some((s, n));
        }
    }
    Some((0, 0))
}

/// A StreamAdapter laid out as [`encode_entry`] writes it — labels, then exactly one entry —
/// as (labels, entry); None for any other layout.
fn one_entry(stream: &[u8]) -> Option<(&[u8], &[u8], &[u8])> {
    let mut at = 0;
    if *stream.first()? != key(1, 2) {
        return None;
    }
    at += 1;
    let n = varint(stream, &mut at)? as usize;
    let labels = stream.get(at..at.checked_add(n)?)?;
    at += n;
    let field = stream.get(at..)?;
    if *stream.get(at)? != key(2, 2) {
        return None;
    }
    at += 1;
    let n = varint(stream, &mut at)? as usize;
    let entry = stream.get(at..at.checked_add(n)?)?;
    (at + n == stream.len()).then_some((labels, entry, field))
}

/// The whole field (tag, length and payload) of `payload`, a field of `within` found by
/// [`fields`], when its length is minimally encoded (as every encoder here writes it).
fn whole_field<'a>(within: &'a [u8], payload: &'a [u8]) -> Option<&'a [u8]> {
    let off = (payload.as_ptr() as usize).checked_sub(within.as_ptr() as usize)?;
    let start = off.checked_sub(1 + encoded_len_varint(payload.len() as u64))?;
    let field = within.get(start..off + payload.len())?;
    (field[0] == key(2, 2)).then_some(field)
}

/// The time of an entry whose first field is its timestamp (as [`encode_entry`] writes it).
fn fast_entry_time(entry: &[u8]) -> Option<(i64, i64)> {
    let mut at = 0;
    if *entry.first()? != key(1, 2) {
        return None;
    }
    at += 1;
    let n = varint(entry, &mut at)? as usize;
    let ts = entry.get(at..at.checked_add(n)?)?;
    let (mut secs, mut nanos, mut i) = (0i64, 0i64, 0);
    while i < ts.len() {
        let k = ts[i];
        i += 1;
        let v = varint(ts, &mut i)?;
        match k {
            0x08 => secs = v as i64,
            0x10 => nanos = i64::from(v as i32),
            _ => return None,
        }
    }
    Some((secs, nanos))
}

/// An encoded entry field with its entry's (seconds, nanoseconds).
type TimedEntry<'a> = ((i64, i64), &'a [u8]);

/// Rewrites a `PushRequest` (`batch`, one `StreamAdapter` per entry as the frames are) into
/// `out` with one `StreamAdapter` per label set, in the order streams first appear, holding
/// its entries in timestamp order (stable: equal times keep their read order). Loki then
/// sees each stream once per push, in order, and the request is smaller (labels once per
/// stream). False, with `out` untouched, when `batch` does not parse.
pub fn regroup(batch: &[u8], out: &mut Vec<u8>) -> bool {
    // (labels, entries as (time, payload)); the last stream is checked first since an entry's
    // neighbours are usually of its stream.
    let mut streams: Vec<(&[u8], Vec<TimedEntry<'_>>)> = Vec::new();
    let mut index: std::collections::HashMap<&[u8], usize> = std::collections::HashMap::new();
    let mut last = usize::MAX;
    // (entry payload, whole entry field)
    let mut entries: Vec<(&[u8], &[u8])> = Vec::new();
    let mut at = 0;
    while at < batch.len() {
        // Field 1 of the PushRequest: a StreamAdapter.
        if batch[at] != key(1, 2) {
            return false;
        }
        at += 1;
        let Some(n) = varint(batch, &mut at) else { return false };
        let Some(stream) = at.checked_add(n as usize).and_then(|end| batch.get(at..end)) else {
            return false;
        };
        at += n as usize;
        entries.clear();
        let labels = match one_entry(stream) {
            // The frames' own layout: labels, then one entry.
            Some((l, e, f)) => {
                entries.push((e, f));
                l
            }
            None => {
                let mut labels: &[u8] = &[];
                for g in fields(stream) {
                    match g {
                        Some((1, 2, l, _)) => labels = l,
                        Some((2, 2, e, _)) => {
                            let Some(f) = whole_field(stream, e) else { return false };
                            entries.push((e, f));
                        }
                        Some(_) => {}
                        None => return false,
                    }
                }
                labels
            }
        };
        let k = if last < streams.len() && streams[last].0 == labels {
            last
        } else {
            *index.entry(labels).or_insert_with(|| {
                streams.push((labels, Vec::new()));
                streams.len() - 1
            })
        };
        last = k;
        for (e, f) in &entries {
            let Some(t) = fast_entry_time(e).or_else(|| entry_time(e)) else {
                return false;
            };
            streams[k].1.push((t, f));
        }
    }
    out.reserve(batch.len());
    for (labels, entries) in &mut streams {
        if entries.windows(2).any(|w| w[0].0 > w[1].0) {
            entries.sort_by_key(|(t, _)| *t);
        }
        // Entries are copied as whole fields (tag and length included).
        let len = bytes_field_len(labels.len()) + entries.iter().map(|(_, f)| f.len()).sum::<usize>();
        out.push(key(1, 2));
        encode_varint(len as u64, out);
        put_bytes(1, labels, out);
        for (_, f) in entries.iter() {
            out.extend_from_slice(f);
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn regroup_makes_one_stream_per_label_set_in_time_order() {
        let mut batch = Vec::new();
        for (labels, ts, line) in [
            ("{a=\"1\"}", 30, "a3"),
            ("{a=\"2\"}", 5, "b1"),
            ("{a=\"1\"}", 10, "a1"),
            ("{a=\"1\"}", 10, "a2"),
            ("{a=\"2\"}", 6, "b2"),
        ] {
            let mut body = Vec::new();
            encode_entry(labels, ts, line.as_bytes(), &[("k", "v")], &mut body);
            frame_stream(&body, &mut batch);
        }
        let mut out = Vec::new();
        assert!(regroup(&batch, &mut out));
        let req = PushRequest::decode(out.as_slice()).unwrap();
        let got: Vec<(String, Vec<String>)> = req
            .streams
            .iter()
            .map(|s| (s.labels.clone(), s.entries.iter().map(|e| e.line.clone()).collect()))
            .collect();
        assert_eq!(
            got,
            [
                (
                    "{a=\"1\"}".to_owned(),
                    vec!["a1".to_owned(), "a2".to_owned(), "a3".to_owned()]
                ),
                ("{a=\"2\"}".to_owned(), vec!["b1".to_owned(), "b2".to_owned()]),
            ]
        );
        assert_eq!(req.streams[0].entries[0].structured_metadata[0].name, "k");
        // Garbage is refused, not mangled.
        let mut out = Vec::new();
        assert!(!regroup(&[0x0a, 0x7f, 1], &mut out));
        assert!(out.is_empty());
    }
}
