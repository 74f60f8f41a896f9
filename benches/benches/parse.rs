//! Throughput of the scrape body parser (`agent::scrape::parse`) doing a full
//! parse: every entry, every label pair iterated, every value touched.
//!
//! Corpora: a real node_exporter page (`testdata/node_exporter.txt`) and a
//! synthetic 100k-series page generated in setup.
//!
//! Run: `cargo bench -p sre-lab-benches --bench parse`

use std::fmt::Write as _;
use std::hint::black_box;

use agent::scrape::parse::{Entry, Format, Parser};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const NODE_EXPORTER: &[u8] = include_bytes!("../testdata/node_exporter.txt");

/// Parses `body` the way a scrape loop consumes it; returns the sample count.
fn full_parse(body: &[u8]) -> usize {
    let mut samples = 0;
    for entry in Parser::new(body, Format::Text) {
        match entry.expect("corpus is valid") {
            Entry::Sample(sample) => {
                samples += 1;
                black_box(sample.series);
                black_box(sample.value);
                black_box(sample.timestamp_ms);
                for (name, value) in sample.labels() {
                    black_box(name);
                    black_box(&value);
                }
            }
            other => {
                black_box(other);
            }
        }
    }
    samples
}

/// Deterministic xorshift64 so the synthetic page is the same on every run.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// A Kubernetes-flavoured page: families of 50–2000 series with 3–5 sorted
/// labels, integer and float values, every eighth family with timestamps.
fn synthetic_page(series: usize) -> Vec<u8> {
    const FAMILIES: &[(&str, &str, &[&str])] = &[
        (
            "http_server_requests_total",
            "counter",
            &["code", "handler", "instance", "method"],
        ),
        (
            "container_cpu_usage_seconds_total",
            "counter",
            &["container", "namespace", "pod"],
        ),
        (
            "container_memory_working_set_bytes",
            "gauge",
            &["container", "id", "namespace", "pod"],
        ),
        ("kube_pod_status_phase", "gauge", &["namespace", "phase", "pod", "uid"]),
        (
            "node_network_receive_bytes_total",
            "counter",
            &["device", "instance", "job"],
        ),
        (
            "grpc_server_handling_seconds_bucket",
            "histogram",
            &["grpc_method", "grpc_service", "instance", "job", "le"],
        ),
        (
            "process_resident_memory_bytes",
            "gauge",
            &["instance", "job", "namespace"],
        ),
        (
            "apiserver_request_duration_seconds_sum",
            "summary",
            &["component", "resource", "scope", "verb"],
        ),
    ];
    const WORDS: &[&str] = &[
        "api",
        "frontend",
        "checkout",
        "kube-system",
        "monitoring",
        "GET",
        "POST",
        "200",
        "503",
        "eth0",
        "/api/v1/query_range",
        "node-exporter",
        "10.0.3.17:9100",
        "Running",
        "payments-7d9f8c6b5-x2x8q",
        "cluster",
        "pods",
        "0.005",
        "+Inf",
        "2.5",
    ];
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut out = String::with_capacity(series * 130);
    let mut written = 0;
    let mut family_no = 0;
    while written < series {
        let (base, kind, label_names) = FAMILIES[family_no % FAMILIES.len()];
        let name = format!("{base}_{family_no}");
        let count = (50 + rng.below(1950) as usize).min(series - written);
        writeln!(
            out,
            "# HELP {name} Synthetic {kind} number {family_no} for the parser bench."
        )
        .unwrap();
        writeln!(out, "# TYPE {name} {kind}").unwrap();
        for i in 0..count {
            out.push_str(&name);
            out.push('{');
            for (j, label) in label_names.iter().enumerate() {
                if j > 0 {
                    out.push(',');
                }
                let word = WORDS[rng.below(WORDS.len() as u64) as usize];
                write!(out, "{label}=\"{word}-{i}\"").unwrap();
            }
            out.push_str("} ");
            match rng.below(4) {
                0 => write!(out, "{}", rng.below(2)),
                1 => write!(out, "{}", rng.below(10_000_000_000)),
                2 => write!(out, "{}", rng.below(1_000_000) as f64 / 1000.0),
                _ => write!(out, "{:e}", rng.below(1 << 40) as f64 * 1.7e-9),
            }
            .unwrap();
            if family_no % 8 == 7 {
                write!(out, " {}", 1_700_000_000_000 + rng.below(1_000_000)).unwrap();
            }
            out.push('\n');
        }
        written += count;
        family_no += 1;
    }
    out.into_bytes()
}

fn bench_parse(c: &mut Criterion) {
    let synthetic = synthetic_page(100_000);
    let mut group = c.benchmark_group("parse");
    for (name, body) in [("node_exporter", NODE_EXPORTER), ("synthetic_100k", &synthetic[..])] {
        // Printed so samples/s can be derived from the reported time.
        eprintln!("{name}: {} bytes, {} samples", body.len(), full_parse(body));
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_function(name, |b| b.iter(|| full_parse(black_box(body))));
    }
    group.finish();
    // The same parses reported in samples/s.
    let mut group = c.benchmark_group("parse_samples");
    for (name, body) in [("node_exporter", NODE_EXPORTER), ("synthetic_100k", &synthetic[..])] {
        group.throughput(Throughput::Elements(full_parse(body) as u64));
        group.bench_function(name, |b| b.iter(|| full_parse(black_box(body))));
    }
    group.finish();
}

criterion_group!(benches, bench_parse);
criterion_main!(benches);
