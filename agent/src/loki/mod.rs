//! The Loki push API as a [`Protocol`] of the sender engine (issue 9, first part): a frame's
//! body is one log entry already encoded as a Loki `StreamAdapter` (its stream's labels and one
//! `EntryAdapter`), so a batch is a `PushRequest` built by concatenation — field 1 per frame —
//! and snappy block-compressed, as Loki's `/loki/api/v1/push` takes it with
//! `Content-Type: application/x-protobuf`.
//!
//! At encoding, [`proto::regroup`] makes one stream per label set with its entries in time
//! order, so a push names each stream once. The schema is Loki's `pkg/push/push.proto`
//! ([`proto`]).

pub mod proto;

use http::{HeaderMap, HeaderValue, StatusCode};

use crate::sender::{Protocol, Rejection};

/// Why a Loki push answered 4xx (other than 429) dropped its entries.
pub const REJECTION_REASONS: [&str; 4] = ["too_old", "line_too_long", "invalid_labels", "http_4xx"];

/// Loki's push protocol.
pub struct LokiPush {
    headers: HeaderMap,
    json: bool,
}

impl LokiPush {
    /// The protocol, with `tenant` (Promtail's `tenant_id`) sent as `X-Scope-OrgID`.
    pub fn new(tenant: Option<&str>) -> Result<Self, http::header::InvalidHeaderValue> {
        Self::with_encoding(tenant, false)
    }

    /// The protocol sending Loki's JSON push format (`application/json`, uncompressed).
    pub fn json(tenant: Option<&str>) -> Result<Self, http::header::InvalidHeaderValue> {
        Self::with_encoding(tenant, true)
    }

    fn with_encoding(tenant: Option<&str>, json: bool) -> Result<Self, http::header::InvalidHeaderValue> {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static(if json {
                "application/json"
            } else {
                "application/x-protobuf"
            }),
        );
        headers.insert(http::header::USER_AGENT, crate::http::user_agent());
        if let Some(t) = tenant.filter(|t| !t.is_empty()) {
            headers.insert("X-Scope-OrgID", HeaderValue::from_str(t)?);
        }
        Ok(Self { headers, json })
    }
}

impl Protocol for LokiPush {
    fn frame(&self, body: &[u8], batch: &mut Vec<u8>) {
        proto::frame_stream(body, batch);
    }

    fn encode(&self, batch: &[u8], body: &mut Vec<u8>) {
        thread_local! {
            static GROUPED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        GROUPED.with_borrow_mut(|grouped| {
            grouped.clear();
            // One stream per label set, its entries in time order (Loki's ordering per stream).
            let req = if proto::regroup(batch, grouped) {
                grouped.as_slice()
            } else {
                batch
            };
            if self.json {
                to_json(req, body);
            } else {
                crate::remote_write::proto::compress(req, body);
            }
            if grouped.capacity() > 16 << 20 {
                *grouped = Vec::new();
            }
        });
    }

    fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    fn classify(&self, _status: StatusCode, body: &str) -> Rejection {
        Rejection::Dropped(classify_rejection(body))
    }

    fn rejection_reasons(&self) -> &'static [&'static str] {
        &REJECTION_REASONS
    }
}

/// A batch (a `PushRequest` in protobuf) as Loki's JSON push body:
/// `{"streams":[{"stream":{labels},"values":[["<ns>","<line>",{metadata}]]}]}`.
fn to_json(batch: &[u8], body: &mut Vec<u8>) {
    use prost::Message;
    let Ok(req) = proto::PushRequest::decode(batch) else {
        body.extend_from_slice(b"{\"streams\":[]}");
        return;
    };
    let streams: Vec<serde_json::Value> = req
        .streams
        .iter()
        .map(|s| {
            let labels: serde_json::Map<String, serde_json::Value> = parse_labels(&s.labels)
                .into_iter()
                .map(|(k, v)| (k, serde_json::Value::String(v)))
                .collect();
            let values: Vec<serde_json::Value> = s
                .entries
                .iter()
                .map(|e| {
                    let ts = e.timestamp.clone().unwrap_or_default();
                    let ns = i128::from(ts.seconds) * 1_000_000_000 + i128::from(ts.nanos);
                    let mut v = vec![
                        serde_json::Value::String(ns.to_string()),
                        serde_json::Value::String(e.line.clone()),
                    ];
                    if !e.structured_metadata.is_empty() {
                        let m: serde_json::Map<String, serde_json::Value> = e
                            .structured_metadata
                            .iter()
                            .map(|p| (p.name.clone(), serde_json::Value::String(p.value.clone())))
                            .collect();
                        v.push(serde_json::Value::Object(m));
                    }
                    serde_json::Value::Array(v)
                })
                .collect();
            serde_json::json!({"stream": labels, "values": values})
        })
        .collect();
    let _ = serde_json::to_writer(&mut *body, &serde_json::json!({ "streams": streams }));
}

/// `{a="b", c="d\"e"}` → pairs (the agent's own rendering; see `logs::pipeline::render_labels`).
pub fn parse_labels(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let inner = s.trim().trim_start_matches('{').trim_end_matches('}');
    let mut chars = inner.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let name: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if name.is_empty() {
            break;
        }
        if chars.next() != Some('"') {
            break;
        }
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '"' => break,
                '\\' => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(c) => value.push(c),
                    None => break,
                },
                c => value.push(c),
            }
        }
        out.push((name.trim().to_owned(), value));
    }
    out
}

/// The reason for a Loki 400, from the messages its distributor and ingester validation give
/// ("entry too far behind", "entry out of order", "greater than max allowed line size", …).
pub fn classify_rejection(body: &str) -> &'static str {
    let b = body.to_ascii_lowercase();
    if b.contains("too far behind") || b.contains("out of order") || b.contains("too old") || b.contains("older than") {
        "too_old"
    } else if b.contains("line size") || b.contains("line too long") || b.contains("max line") {
        "line_too_long"
    } else if b.contains("label") && (b.contains("invalid") || b.contains("error parsing")) {
        "invalid_labels"
    } else {
        "http_4xx"
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    #[test]
    fn a_batch_is_a_snappy_push_request_of_its_entries() {
        let p = LokiPush::new(Some("team-a")).unwrap();
        assert_eq!(p.headers()["X-Scope-OrgID"], "team-a");
        assert_eq!(p.headers()[http::header::CONTENT_TYPE], "application/x-protobuf");
        let mut batch = Vec::new();
        let entries = [
            (
                "{app=\"web\", namespace=\"shop\"}",
                1_700_000_000_123_456_789i64,
                "GET /cart 200",
                vec![("pod_uid", "u-1")],
            ),
            (
                "{app=\"web\", namespace=\"shop\"}",
                1_700_000_000_223_456_789,
                "GET /pay 500 \u{1F4A5}",
                vec![],
            ),
            ("{app=\"db\"}", 1_700_000_001_000_000_000, "", vec![]),
        ];
        for (labels, ts, line, meta) in &entries {
            let mut body = Vec::new();
            proto::encode_entry(labels, *ts, line.as_bytes(), meta, &mut body);
            p.frame(&body, &mut batch);
        }
        let mut wire = Vec::new();
        p.encode(&batch, &mut wire);
        let raw = snap::raw::Decoder::new().decompress_vec(&wire).unwrap();
        let req = proto::PushRequest::decode(raw.as_slice()).unwrap();
        // One stream per label set.
        assert_eq!(req.streams.len(), 2);
        assert_eq!(req.streams[0].entries.len(), 2);
        let flat = req.streams.iter().flat_map(|s| s.entries.iter().map(move |e| (s, e)));
        for ((s, e), (labels, ts, line, meta)) in flat.zip(&entries) {
            assert_eq!(&s.labels, labels);
            let t = e.timestamp.clone().unwrap();
            assert_eq!(t.seconds * 1_000_000_000 + i64::from(t.nanos), *ts);
            assert_eq!(e.line, *line);
            let got: Vec<(&str, &str)> = e
                .structured_metadata
                .iter()
                .map(|m| (m.name.as_str(), m.value.as_str()))
                .collect();
            assert_eq!(&got, meta);
        }
    }

    #[test]
    fn json_encoding_is_lokis_json_push_body() {
        let p = LokiPush::json(None).unwrap();
        assert_eq!(p.headers()[http::header::CONTENT_TYPE], "application/json");
        let mut batch = Vec::new();
        for (labels, ts, line, meta) in [
            (
                "{app=\"web\", ns=\"a\\\"b\"}",
                1_700_000_000_000_000_001i64,
                "line \"one\"",
                vec![("trace_id", "t1")],
            ),
            ("{app=\"db\"}", 1_700_000_000_500_000_000, "two", vec![]),
        ] {
            let mut body = Vec::new();
            proto::encode_entry(labels, ts, line.as_bytes(), &meta, &mut body);
            p.frame(&body, &mut batch);
        }
        let mut wire = Vec::new();
        p.encode(&batch, &mut wire);
        let v: serde_json::Value = serde_json::from_slice(&wire).unwrap();
        let streams = v["streams"].as_array().unwrap();
        assert_eq!(streams.len(), 2);
        assert_eq!(streams[0]["stream"]["app"], "web");
        assert_eq!(streams[0]["stream"]["ns"], "a\"b");
        assert_eq!(streams[0]["values"][0][0], "1700000000000000001");
        assert_eq!(streams[0]["values"][0][1], "line \"one\"");
        assert_eq!(streams[0]["values"][0][2]["trace_id"], "t1");
        assert_eq!(
            streams[1]["values"][0],
            serde_json::json!(["1700000000500000000", "two"])
        );
    }

    #[test]
    fn rejections_are_named() {
        assert_eq!(
            classify_rejection("entry for stream '{a=\"b\"}' has timestamp too old: 2020-01-01"),
            "too_old"
        );
        assert_eq!(
            classify_rejection("entry too far behind, oldest acceptable timestamp is: x"),
            "too_old"
        );
        assert_eq!(
            classify_rejection(
                "Max entry size '262144' bytes exceeded for stream ... greater than max allowed line size"
            ),
            "line_too_long"
        );
        assert_eq!(
            classify_rejection("error parsing labels '{a=}': invalid"),
            "invalid_labels"
        );
        assert_eq!(classify_rejection("something else"), "http_4xx");
    }
}
