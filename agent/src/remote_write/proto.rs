//! Prometheus remote write 1.0 wire format.
//!
//! Two halves that produce the same bytes:
//! - prost messages mirroring `prompb/types.proto` and `prompb/remote.proto` (field numbers
//!   as upstream), used by tests and the test receiver to decode what the agent sends;
//! - a hand-rolled encoder for the hot path. A scrape loop encodes a series' labels once
//!   ([`encode_labels`]) and caches them; every sample then costs one [`encode_series`]
//!   (labels copied plus a 20-odd byte `Sample`). The sender concatenates bodies with
//!   [`frame_timeseries`], which yields a `WriteRequest` body, and snappy-compresses it with
//!   [`compress`]. No message structs are built on this path.
//!
//! Histograms (`TimeSeries` field 4) are not modelled; prost skips them when decoding.

use std::cell::RefCell;
use std::io;

/// Bit pattern of the NaN Prometheus uses as a staleness marker.
pub const STALE_NAN_BITS: u64 = 0x7ff0_0000_0000_0002;

/// The staleness marker as a float. Compare with [`is_stale_nan`], never with `==`.
pub const STALE_NAN: f64 = f64::from_bits(STALE_NAN_BITS);

/// Whether `v` is the staleness marker (an exact bit comparison; other NaNs are not).
#[inline]
pub fn is_stale_nan(v: f64) -> bool {
    v.to_bits() == STALE_NAN_BITS
}

/// `prometheus.WriteRequest`: the body of one remote write POST (before snappy).
#[derive(Clone, PartialEq, prost::Message)]
pub struct WriteRequest {
    /// Series with their samples.
    #[prost(message, repeated, tag = "1")]
    pub timeseries: Vec<TimeSeries>,
    /// Metric family metadata (field 2 is reserved upstream).
    #[prost(message, repeated, tag = "3")]
    pub metadata: Vec<MetricMetadata>,
}

/// `prometheus.TimeSeries`: one label set and its samples.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TimeSeries {
    /// Sorted by name, names unique.
    #[prost(message, repeated, tag = "1")]
    pub labels: Vec<Label>,
    /// Samples in timestamp order.
    #[prost(message, repeated, tag = "2")]
    pub samples: Vec<Sample>,
    /// Exemplars attached to the series.
    #[prost(message, repeated, tag = "3")]
    pub exemplars: Vec<Exemplar>,
}

/// `prometheus.Label`.
#[derive(Clone, PartialEq, Eq, Hash, prost::Message)]
pub struct Label {
    /// Label name.
    #[prost(string, tag = "1")]
    pub name: String,
    /// Label value.
    #[prost(string, tag = "2")]
    pub value: String,
}

/// `prometheus.Sample`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Sample {
    /// The value; NaN payloads (the staleness marker) must survive bit-exact.
    #[prost(double, tag = "1")]
    pub value: f64,
    /// Milliseconds since the Unix epoch.
    #[prost(int64, tag = "2")]
    pub timestamp: i64,
}

/// `prometheus.Exemplar`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Exemplar {
    /// Exemplar labels, e.g. `trace_id`.
    #[prost(message, repeated, tag = "1")]
    pub labels: Vec<Label>,
    /// The observed value.
    #[prost(double, tag = "2")]
    pub value: f64,
    /// Milliseconds since the Unix epoch.
    #[prost(int64, tag = "3")]
    pub timestamp: i64,
}

/// `prometheus.MetricMetadata`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct MetricMetadata {
    /// A [`MetricType`] value.
    #[prost(enumeration = "MetricType", tag = "1")]
    pub r#type: i32,
    /// The metric family name.
    #[prost(string, tag = "2")]
    pub metric_family_name: String,
    /// `# HELP` text.
    #[prost(string, tag = "4")]
    pub help: String,
    /// `# UNIT` text.
    #[prost(string, tag = "5")]
    pub unit: String,
}

/// `prometheus.MetricMetadata.MetricType`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum MetricType {
    /// No `# TYPE` line.
    Unknown = 0,
    /// `counter`.
    Counter = 1,
    /// `gauge`.
    Gauge = 2,
    /// `histogram`.
    Histogram = 3,
    /// `gaugehistogram`.
    Gaugehistogram = 4,
    /// `summary`.
    Summary = 5,
    /// `info`.
    Info = 6,
    /// `stateset`.
    Stateset = 7,
}

// Tag bytes: (field number << 3) | wire type. Wire types: 1 = fixed64, 0 = varint, 2 = bytes.
const TAG_1_BYTES: u8 = (1 << 3) | 2;
const TAG_2_BYTES: u8 = (2 << 3) | 2;
const TAG_1_FIXED64: u8 = (1 << 3) | 1;
const TAG_2_VARINT: u8 = 2 << 3;

/// Bytes a base-128 varint of `v` takes (1..=10).
#[inline]
fn varint_len(v: u64) -> usize {
    let bits = 64 - (v | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

#[inline]
fn put_varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Appends the repeated `labels` field (field 1 of `TimeSeries`) for a label set.
///
/// The caller guarantees names sorted and unique and values non-empty (Prometheus drops
/// empty-valued labels); the result is meant to be cached per series and passed to
/// [`encode_series`] for every sample.
pub fn encode_labels<'a>(labels: impl Iterator<Item = (&'a str, &'a str)>, out: &mut Vec<u8>) {
    for (name, value) in labels {
        let inner = 2 + varint_len(name.len() as u64) + name.len() + varint_len(value.len() as u64) + value.len();
        out.reserve(1 + varint_len(inner as u64) + inner);
        out.push(TAG_1_BYTES);
        put_varint(inner as u64, out);
        out.push(TAG_1_BYTES);
        put_varint(name.len() as u64, out);
        out.extend_from_slice(name.as_bytes());
        out.push(TAG_2_BYTES);
        put_varint(value.len() as u64, out);
        out.extend_from_slice(value.as_bytes());
    }
}

/// Appends one complete `TimeSeries` message body: `encoded_labels` (from [`encode_labels`])
/// followed by a single `Sample`. Nothing frames it; see [`frame_timeseries`].
///
/// Both sample fields are always written, also when zero, so every value (including NaN
/// payloads and `-0.0`) round-trips bit-exact.
#[inline]
pub fn encode_series(encoded_labels: &[u8], value: f64, timestamp_ms: i64, out: &mut Vec<u8>) {
    out.reserve(encoded_labels.len() + 22);
    out.extend_from_slice(encoded_labels);
    encode_sample(value, timestamp_ms, out);
}

/// Appends the `samples` field of a `TimeSeries` body (one sample): what follows its labels
/// in [`encode_series`].
#[inline]
pub fn encode_sample(value: f64, timestamp_ms: i64, out: &mut Vec<u8>) {
    let ts = timestamp_ms as u64;
    // fixed64 value (1 + 8) + varint timestamp (1 + 1..=10): at most 20, one length byte.
    let sample_len = 10 + varint_len(ts);
    out.reserve(2 + sample_len);
    out.push(TAG_2_BYTES);
    out.push(sample_len as u8);
    out.push(TAG_1_FIXED64);
    out.extend_from_slice(&value.to_bits().to_le_bytes());
    out.push(TAG_2_VARINT);
    put_varint(ts, out);
}

/// Appends `ts_body` as field 1 of `WriteRequest` (tag, length, body). Concatenated framed
/// bodies form a valid `WriteRequest` body.
#[inline]
pub fn frame_timeseries(ts_body: &[u8], out: &mut Vec<u8>) {
    out.reserve(1 + varint_len(ts_body.len() as u64) + ts_body.len());
    out.push(TAG_1_BYTES);
    put_varint(ts_body.len() as u64, out);
    out.extend_from_slice(ts_body);
}

/// A compression scratch buffer above this is freed after use rather than kept per thread.
const SCRATCH_KEEP_BYTES: usize = 8 << 20;

thread_local! {
    // Per thread: the snappy encoder (it owns a hash table) and an output buffer that stays
    // initialised, so a batch costs no zero-filling of its worst-case compressed size.
    static SNAPPY: RefCell<(snap::raw::Encoder, Vec<u8>)> = RefCell::new((snap::raw::Encoder::new(), Vec::new()));
}

/// Snappy block-compresses `raw` into `out` (replacing its contents, reusing its capacity),
/// the `Content-Encoding: snappy` body of a remote write request.
///
/// Snappy blocks cannot describe inputs of 4 GiB or more; for such an input (never a real
/// batch) `out` is left empty. Use [`try_compress`] to get the error instead.
pub fn compress(raw: &[u8], out: &mut Vec<u8>) {
    if try_compress(raw, out).is_err() {
        out.clear();
    }
}

/// [`compress`] that reports snappy's error (input too large).
pub fn try_compress(raw: &[u8], out: &mut Vec<u8>) -> Result<(), snap::Error> {
    SNAPPY.with(|cell| {
        let (encoder, scratch) = &mut *cell.borrow_mut();
        let max = snap::raw::max_compress_len(raw.len());
        if scratch.len() < max {
            scratch.resize(max, 0);
        }
        let result = encoder.compress(raw, &mut scratch[..max]).map(|n| {
            out.clear();
            out.extend_from_slice(&scratch[..n]);
        });
        if scratch.len() > SCRATCH_KEEP_BYTES {
            *scratch = Vec::new();
        }
        result
    })
}

/// Decompresses a snappy block into `out` (replacing its contents), refusing blocks that
/// claim more than `max_len` bytes before allocating anything. For receivers and tests.
pub fn decompress(compressed: &[u8], max_len: usize, out: &mut Vec<u8>) -> io::Result<()> {
    let invalid = |e: snap::Error| io::Error::new(io::ErrorKind::InvalidData, e);
    let len = snap::raw::decompress_len(compressed).map_err(invalid)?;
    if len > max_len {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("snappy block decompresses to {len} bytes, limit is {max_len}"),
        ));
    }
    out.clear();
    out.resize(len, 0);
    let n = snap::raw::Decoder::new().decompress(compressed, out).map_err(invalid)?;
    out.truncate(n);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn series(labels: &[(&str, &str)], samples: &[(f64, i64)]) -> TimeSeries {
        TimeSeries {
            labels: labels
                .iter()
                .map(|(n, v)| Label {
                    name: n.to_string(),
                    value: v.to_string(),
                })
                .collect(),
            samples: samples
                .iter()
                .map(|&(value, timestamp)| Sample { value, timestamp })
                .collect(),
            exemplars: Vec::new(),
        }
    }

    /// Labels, value, timestamp of one sample.
    type Input<'a> = (&'a [(&'a str, &'a str)], f64, i64);

    /// Encodes with the fast path: one framed body per (labels, sample).
    fn fast_request(input: &[Input<'_>]) -> Vec<u8> {
        let mut raw = Vec::new();
        let mut body = Vec::new();
        for (labels, value, ts) in input {
            let mut enc = Vec::new();
            encode_labels(labels.iter().copied(), &mut enc);
            body.clear();
            encode_series(&enc, *value, *ts, &mut body);
            frame_timeseries(&body, &mut raw);
        }
        raw
    }

    /// Values compared bit for bit, since NaN != NaN.
    fn assert_same(got: &WriteRequest, want: &WriteRequest) {
        assert_eq!(got.timeseries.len(), want.timeseries.len());
        assert_eq!(got.metadata, want.metadata);
        for (g, w) in got.timeseries.iter().zip(&want.timeseries) {
            assert_eq!(g.labels, w.labels);
            assert_eq!(g.exemplars, w.exemplars);
            let bits = |s: &[Sample]| s.iter().map(|s| (s.value.to_bits(), s.timestamp)).collect::<Vec<_>>();
            assert_eq!(bits(&g.samples), bits(&w.samples));
        }
    }

    #[test]
    fn fast_encoder_decodes_to_expected_request() {
        let a: &[(&str, &str)] = &[("__name__", "up"), ("instance", "10.0.0.1:9100"), ("job", "node")];
        let long = "x".repeat(300); // two-byte length varints
        let b: &[(&str, &str)] = &[("__name__", "http_requests_total"), ("path", &long)];
        let values = [
            (1.0, 1_700_000_000_000),
            (0.0, 0),
            (-0.0, 1),
            (f64::NAN, 5),
            (STALE_NAN, 1_700_000_015_000),
            (f64::INFINITY, i64::MAX),
            (f64::NEG_INFINITY, -1),
            (f64::MIN_POSITIVE, i64::MIN),
            (-123.456, -1_000),
        ];
        let mut input = Vec::new();
        let mut want = WriteRequest::default();
        for (i, &(v, ts)) in values.iter().enumerate() {
            let labels = if i % 2 == 0 { a } else { b };
            input.push((labels, v, ts));
            want.timeseries.push(series(labels, &[(v, ts)]));
        }
        let raw = fast_request(&input);
        let got = WriteRequest::decode(raw.as_slice()).expect("decodes");
        assert_same(&got, &want);
        assert!(is_stale_nan(got.timeseries[4].samples[0].value));
        assert!(!is_stale_nan(got.timeseries[3].samples[0].value));
    }

    #[test]
    fn encoded_labels_match_prost() {
        let labels: &[(&str, &str)] = &[("__name__", "node_cpu_seconds_total"), ("cpu", "0"), ("mode", "idle")];
        let mut fast = Vec::new();
        encode_labels(labels.iter().copied(), &mut fast);
        let mut body = Vec::new();
        encode_series(&fast, 2.5, 1234, &mut body);
        let ts = TimeSeries::decode(body.as_slice()).expect("decodes");
        assert_eq!(ts, series(labels, &[(2.5, 1234)]));
        // Labels are the canonical prost encoding, byte for byte.
        let want = series(labels, &[]).encode_to_vec();
        assert_eq!(fast, want);
    }

    #[test]
    fn empty_request_and_large_body() {
        assert_eq!(WriteRequest::decode(&[][..]).unwrap(), WriteRequest::default());
        let mut raw = Vec::new();
        frame_timeseries(&[], &mut raw);
        assert_eq!(
            WriteRequest::decode(raw.as_slice()).unwrap().timeseries,
            vec![TimeSeries::default()]
        );
        // A body above 16 KiB needs a three-byte length varint.
        let value = "v".repeat(20_000);
        let raw = fast_request(&[(&[("__name__", "big"), ("blob", &value)], 1.0, 2)]);
        let got = WriteRequest::decode(raw.as_slice()).unwrap();
        assert_eq!(got.timeseries[0].labels[1].value.len(), 20_000);
    }

    #[test]
    fn varint_lengths() {
        for v in [
            0u64,
            1,
            127,
            128,
            16_383,
            16_384,
            u32::MAX as u64,
            u64::MAX >> 1,
            u64::MAX,
        ] {
            let mut out = Vec::new();
            put_varint(v, &mut out);
            assert_eq!(out.len(), varint_len(v), "{v}");
            assert_eq!(prost::encoding::decode_varint(&mut out.as_slice()).unwrap(), v);
        }
    }

    #[test]
    fn snappy_round_trip_with_reused_buffers() {
        let labels: &[(&str, &str)] = &[("__name__", "up"), ("job", "node")];
        let mut compressed = vec![0xff; 7]; // stale content must be replaced
        let mut decompressed = Vec::new();
        for n in [0usize, 1, 500, 2000] {
            let input: Vec<_> = (0..n).map(|i| (labels, i as f64, i as i64)).collect();
            let raw = fast_request(&input);
            compress(&raw, &mut compressed);
            decompress(&compressed, raw.len(), &mut decompressed).expect("decompresses");
            assert_eq!(decompressed, raw);
            let req = WriteRequest::decode(decompressed.as_slice()).unwrap();
            assert_eq!(req.timeseries.len(), n);
            if n > 0 {
                assert!(decompress(&compressed, raw.len() - 1, &mut decompressed).is_err());
            }
        }
        assert!(decompress(b"\xff\xff\xff\xff\x0fgarbage", 1 << 20, &mut decompressed).is_err());
    }

    #[test]
    fn metadata_and_exemplar_field_numbers() {
        let req = WriteRequest {
            timeseries: vec![TimeSeries {
                labels: vec![],
                samples: vec![],
                exemplars: vec![Exemplar {
                    labels: vec![Label {
                        name: "trace_id".into(),
                        value: "abc".into(),
                    }],
                    value: 1.0,
                    timestamp: 2,
                }],
            }],
            metadata: vec![MetricMetadata {
                r#type: MetricType::Counter as i32,
                metric_family_name: "http_requests".into(),
                help: "Requests.".into(),
                unit: "".into(),
            }],
        };
        let bytes = req.encode_to_vec();
        // WriteRequest.metadata is field 3 (tag 0x1a); TimeSeries.exemplars is field 3.
        assert!(bytes.contains(&0x1a));
        assert_eq!(WriteRequest::decode(bytes.as_slice()).unwrap(), req);
        let md =
            MetricMetadata::decode(&[0x08, 0x02, 0x12, 0x01, b'g', 0x22, 0x01, b'h', 0x2a, 0x01, b'u'][..]).unwrap();
        assert_eq!((md.r#type(), md.metric_family_name.as_str()), (MetricType::Gauge, "g"));
        assert_eq!((md.help.as_str(), md.unit.as_str()), ("h", "u"));
    }
}
