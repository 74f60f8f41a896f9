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
