//! The steady-state scrape path allocates nothing per sample: parse, series-cache lookup and
//! encoding into the output buffers of a warm target make no heap allocation at all, and the
//! whole scrape (report series, WAL append, metrics) allocates a small constant that does not
//! grow with the number of samples.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;
use std::time::Duration;

use agent::labels::Labels;
use agent::remote_write::{Endpoint, Outputs};
use agent::scrape::appender::{Appender, StreamParse};
use agent::scrape::client::BodySink;
use agent::scrape::parse::Format;
use agent::telemetry::Metrics;
use agent::wal::{FsyncPolicy, Wal, WalOptions};

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

struct Counting;

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocs() -> u64 {
    ALLOCS.with(Cell::get)
}

fn page(n: usize) -> String {
    let mut s = String::from("# HELP http_requests_total Requests.\n# TYPE http_requests_total counter\n");
    for i in 0..n {
        s.push_str(&format!(
            "http_requests_total{{method=\"GET\",handler=\"/api/v{}\",code=\"{}\"}} {}\n",
            i / 10,
            200 + i % 10,
            i * 7
        ));
    }
    s
}

fn appender(dir: &std::path::Path) -> Appender {
    let wal = Wal::open(
        dir.join("wal"),
        WalOptions {
            fsync: FsyncPolicy::Never,
            refuse_when_full: false,
            ..WalOptions::default()
        },
    )
    .unwrap();
    let outputs = Arc::new(Outputs {
        endpoints: vec![Arc::new(Endpoint {
            name: "r".into(),
            wal: Arc::new(wal),
            write_relabel: vec![],
        })],
        external_labels: Labels::from_pairs([("cluster", "c1")]),
        file_sink: None,
        pool: Default::default(),
    });
    let settings = Arc::new(common::plain_settings(dir));
    let target = Labels::from_pairs([("job", "j"), ("instance", "10.0.0.1:9100")]);
    Appender::new(target, settings, outputs, Arc::new(Metrics::new()))
}

/// Allocations of (scrape_body, whole scrape) for a warm appender.
fn measure(n: usize) -> (u64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let mut a = appender(dir.path());
    let body = page(n);
    let mut ts = 1_700_000_000_000;
    for _ in 0..3 {
        a.begin();
        let r = a.scrape_body(body.as_bytes(), Format::Text, ts);
        a.finish(r.as_ref().map(|r| *r), ts, Duration::from_millis(5));
        ts += 15_000;
    }
    let before = allocs();
    a.begin();
    let r = a.scrape_body(body.as_bytes(), Format::Text, ts);
    let body_allocs = allocs() - before;
    assert_eq!(r.unwrap(), (n as u64, n as u64, 0));
    assert_eq!(a.buffered_samples(), n as u32);
    let report = a.finish(Ok((n as u64, n as u64, 0)), ts, Duration::from_millis(5));
    assert_eq!(report.up, 1.0);
    (body_allocs, allocs() - before)
}

#[test]
fn warm_scrape_allocates_nothing_per_sample() {
    let (body_small, whole_small) = measure(1_000);
    let (body_large, whole_large) = measure(10_000);
    assert_eq!(body_small, 0, "parse + cache + encode of 1k samples allocated");
    assert_eq!(body_large, 0, "parse + cache + encode of 10k samples allocated");
    assert_eq!(
        whole_small, whole_large,
        "per-scrape allocations must not grow with samples"
    );
    assert!(whole_small < 64, "per-scrape constant: {whole_small}");
}

/// Allocations of a warm scrape fed as the scrape loop feeds it: streamed in 16 KiB pieces
/// (lines cut between pieces) through `StreamParse`.
fn measure_streamed(n: usize) -> u64 {
    let dir = tempfile::tempdir().unwrap();
    let mut a = appender(dir.path());
    let body = page(n);
    let mut pending = Vec::new();
    let mut ts = 1_700_000_000_000;
    let scrape = |a: &mut Appender, pending: &mut Vec<u8>, ts: i64| {
        a.begin();
        let fed = {
            let mut sink = StreamParse::new(a, pending, ts);
            sink.start("text/plain; version=0.0.4");
            body.as_bytes()
                .chunks(16 << 10)
                .try_for_each(|p| sink.data(p))
                .and_then(|()| sink.end())
        };
        let r = fed.and_then(|()| a.end_body());
        assert_eq!(r.as_ref().ok().map(|c| c.0), Some(n as u64));
        r
    };
    for _ in 0..3 {
        let r = scrape(&mut a, &mut pending, ts);
        a.finish(r.as_ref().map(|r| *r), ts, Duration::from_millis(5));
        ts += 15_000;
    }
    let before = allocs();
    let _ = scrape(&mut a, &mut pending, ts);
    allocs() - before
}

#[test]
fn warm_streamed_scrape_allocates_nothing_per_sample() {
    let small = measure_streamed(1_000);
    let large = measure_streamed(10_000);
    assert_eq!(small, 0, "streamed parse + cache + encode of 1k samples allocated");
    assert_eq!(large, 0, "streamed parse + cache + encode of 10k samples allocated");
}
