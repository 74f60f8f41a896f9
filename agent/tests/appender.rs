//! Series bookkeeping of a scrape, read back from the WAL: staleness after a failed scrape,
//! series that disappear, duplicates, report series.

mod common;

use std::sync::Arc;
use std::time::Duration;

use agent::labels::Labels;
use agent::remote_write::{frame, proto, Endpoint, Outputs};
use agent::scrape::appender::{Appender, StreamParse};
use agent::scrape::parse::Format;
use agent::telemetry::Metrics;
use agent::wal::{FsyncPolicy, Wal, WalOptions};
use prost::Message;

/// (scraped, post-relabeling, added) of a scrape, or its error.
type Counts = Result<(u64, u64, u64), String>;

struct Fixture {
    _dir: tempfile::TempDir,
    wal: Arc<Wal>,
    next: u64,
    a: Appender,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let wal = Arc::new(
            Wal::open(
                dir.path().join("wal"),
                WalOptions {
                    fsync: FsyncPolicy::Never,
                    refuse_when_full: false,
                    ..WalOptions::default()
                },
            )
            .unwrap(),
        );
        let outputs = Arc::new(Outputs {
            endpoints: vec![Arc::new(Endpoint {
                name: "r".into(),
                wal: wal.clone(),
                write_relabel: vec![],
            })],
            external_labels: Labels::new(),
            file_sink: None,
            pool: Default::default(),
        });
        let settings = Arc::new(common::plain_settings(dir.path()));
        let a = Appender::new(
            Labels::from_pairs([("job", "j"), ("instance", "i")]),
            settings,
            outputs,
            Arc::new(Metrics::new()),
        );
        Self {
            _dir: dir,
            wal,
            next: 0,
            a,
        }
    }

    /// One scrape of `body` at `ts`; returns the (name, value) pairs written, report series excluded.
    fn scrape(&mut self, body: &str, ts: i64) -> Vec<(String, f64)> {
        self.a.begin();
        let r = self.a.scrape_body(body.as_bytes(), Format::Text, ts);
        self.a.finish(r.as_ref().map(|r| *r), ts, Duration::from_millis(1));
        self.written()
    }

    /// One scrape of `body` streamed in pieces of `piece` bytes, as `content_type`; the
    /// pairs written and the scrape's result.
    fn scrape_streamed(
        &mut self,
        body: &[u8],
        piece: usize,
        content_type: &str,
        ts: i64,
    ) -> (Vec<(String, f64)>, Counts) {
        use agent::scrape::client::BodySink;
        self.a.begin();
        let mut pending = Vec::new();
        let fed = {
            let mut sink = StreamParse::new(&mut self.a, &mut pending, ts);
            sink.start(content_type);
            body.chunks(piece.max(1))
                .try_for_each(|p| sink.data(p))
                .and_then(|()| sink.end())
        };
        let r = fed.and_then(|()| self.a.end_body());
        self.a.finish(r.as_ref().map(|r| *r), ts, Duration::from_millis(1));
        (self.written(), r.map_err(|e| e.to_string()))
    }

    fn written(&mut self) -> Vec<(String, f64)> {
        let mut reader = self.wal.reader(self.next);
        let mut out = Vec::new();
        while let Some(rec) = reader.next().unwrap() {
            self.next = rec.seq + 1;
            for (_, body) in frame::Frames::new(&rec.payload) {
                let ts = proto::TimeSeries::decode(body).unwrap();
                let name = ts.labels.iter().find(|l| l.name == "__name__").unwrap().value.clone();
                if !name.starts_with("scrape_") {
                    out.push((name, ts.samples[0].value));
                }
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

fn stale(v: &[(String, f64)], name: &str) -> bool {
    v.iter().any(|(n, x)| n == name && proto::is_stale_nan(*x))
}

#[test]
fn failed_scrape_marks_every_previous_series_stale_even_ones_parsed_before_the_error() {
    let mut f = Fixture::new();
    let first = f.scrape("a 1\nb 2\n", 1000);
    assert_eq!(first, vec![("a".into(), 1.0), ("b".into(), 2.0), ("up".into(), 1.0)]);
    let failed = f.scrape("a 1\nbroken{\n", 2000);
    assert!(stale(&failed, "a") && stale(&failed, "b"), "{failed:?}");
    assert!(failed.iter().any(|(n, v)| n == "up" && *v == 0.0));
    // Recovery: a and b are new again, nothing stale.
    let again = f.scrape("a 1\nb 2\n", 3000);
    assert_eq!(again, vec![("a".into(), 1.0), ("b".into(), 2.0), ("up".into(), 1.0)]);
}

#[test]
fn disappearing_series_and_target_end_with_staleness() {
    let mut f = Fixture::new();
    f.scrape("a 1\nb 2\n", 1000);
    let second = f.scrape("a 1\n", 2000);
    assert!(stale(&second, "b") && !stale(&second, "a"), "{second:?}");
    let third = f.scrape("a 1\n", 3000);
    assert!(!stale(&third, "b"), "a stale marker is written once: {third:?}");
    f.a.write_stale_all(4000);
    let mut reader = f.wal.reader(f.next);
    let rec = reader.next().unwrap().expect("a record of staleness markers");
    let names: Vec<String> = frame::Frames::new(&rec.payload)
        .map(|(_, b)| proto::TimeSeries::decode(b).unwrap())
        .filter(|ts| proto::is_stale_nan(ts.samples[0].value))
        .map(|ts| ts.labels.iter().find(|l| l.name == "__name__").unwrap().value.clone())
        .collect();
    assert!(
        names.contains(&"a".to_owned()) && names.contains(&"up".to_owned()),
        "{names:?}"
    );
}

#[test]
fn duplicate_series_in_one_scrape_is_sent_once() {
    let mut f = Fixture::new();
    let out = f.scrape("a 1\na 2\n", 1000);
    assert_eq!(out.iter().filter(|(n, _)| n == "a").count(), 1);
}

#[test]
fn series_new_in_a_failed_scrape_get_no_marker() {
    let mut f = Fixture::new();
    let failed = f.scrape("fresh 1\nbroken{\n", 1000);
    assert_eq!(failed, vec![("up".into(), 0.0)]);
    let failed = f.scrape("fresh 1\nbroken{\n", 2000);
    assert_eq!(failed, vec![("up".into(), 0.0)]);
}

#[test]
fn same_labels_in_another_order_are_one_series() {
    let mut f = Fixture::new();
    let out = f.scrape("a{x=\"1\",y=\"2\"} 1\na{y=\"2\",x=\"1\"} 2\n", 1000);
    assert_eq!(out, vec![("a".into(), 1.0), ("up".into(), 1.0)]);
    // Next scrape only has the second spelling: the series continues, no staleness marker.
    let out = f.scrape("a{y=\"2\",x=\"1\"} 3\n", 2000);
    assert_eq!(out, vec![("a".into(), 3.0), ("up".into(), 1.0)]);
}

#[test]
fn failed_scrape_reports_counts_reached() {
    let mut f = Fixture::new();
    f.a.begin();
    let r = f.a.scrape_body(b"a 1\nb 2\nbroken{\n", Format::Text, 1000);
    assert!(r.is_err());
    let report = f.a.finish(r.as_ref().map(|r| *r), 1000, Duration::from_millis(1));
    assert_eq!((report.up, report.scraped, report.post_relabel), (0.0, 2, 2));
}

#[test]
fn a_body_streamed_in_pieces_of_any_size_gives_the_same_samples() {
    let mut body = String::from("# HELP m A metric.\n# TYPE m counter\n");
    for i in 0..200 {
        body.push_str(&format!("m{{k=\"v{i}\",long=\"{}\"}} {i}\n", "x".repeat(i % 37)));
    }
    body.push_str("last 7"); // no final newline
    let whole = Fixture::new().scrape(&body, 1000);
    assert_eq!(whole.len(), 202);
    for piece in [1, 2, 3, 7, 64, 1000, body.len()] {
        let mut f = Fixture::new();
        let (got, r) = f.scrape_streamed(body.as_bytes(), piece, "text/plain; version=0.0.4", 1000);
        assert_eq!(r, Ok((201, 201, 201)), "piece {piece}");
        assert_eq!(got, whole, "piece {piece}");
    }
}

#[test]
fn a_streamed_body_stays_all_or_nothing_with_the_right_line_number() {
    let mut body = String::new();
    for i in 0..100 {
        body.push_str(&format!("ok_{i} 1\n"));
    }
    body.push_str("broken{\n");
    let mut f = Fixture::new();
    let (got, r) = f.scrape_streamed(body.as_bytes(), 5, "text/plain", 1000);
    let err = r.unwrap_err();
    assert!(err.contains("line 101"), "{err}");
    assert_eq!(got, vec![("up".into(), 0.0)], "nothing of a failed page is appended");
}

#[test]
fn openmetrics_eof_is_checked_across_pieces() {
    const OM: &str = "application/openmetrics-text; version=1.0.0";
    let mut f = Fixture::new();
    let (got, r) = f.scrape_streamed(b"a 1\n# EOF\n", 3, OM, 1000);
    assert_eq!(r, Ok((1, 1, 1)));
    assert!(got.contains(&("a".into(), 1.0)));
    let (_, r) = f.scrape_streamed(b"a 1\n# EOF\nb 2\n", 4, OM, 2000);
    assert!(r.unwrap_err().contains("unexpected data after # EOF"));
    let (_, r) = f.scrape_streamed(b"a 1\nb 2\n", 4, OM, 3000);
    assert!(r.unwrap_err().contains("does not end with # EOF"));
}

#[test]
fn a_streamed_line_longer_than_the_cap_fails_the_scrape() {
    let mut body = b"ok 1\nendless ".to_vec();
    body.extend(std::iter::repeat_n(b'9', agent::scrape::appender::MAX_LINE + 10));
    body.push(b'\n');
    let mut f = Fixture::new();
    let (got, r) = f.scrape_streamed(&body, 64 << 10, "text/plain", 1000);
    let err = r.unwrap_err();
    assert!(err.contains("line 2 is longer than 4 MiB"), "{err}");
    assert_eq!(got, vec![("up".into(), 0.0)]);
}
