//! Remote write hot path: encode samples of cached series and snappy-compress the batch.
//!
//! Run: `cargo bench -p sre-lab-benches --bench remote_write`
//!
//! Mirrors the agent: labels are encoded once per series and cached; per sample the scrape
//! loop appends a `TimeSeries` body, the sender frames the bodies of a batch into a
//! `WriteRequest` and compresses it. Throughput is reported in samples per second.

use std::hint::black_box;

use agent::remote_write::proto;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

/// Cached label encodings of `n` series shaped like a Kubernetes node's scrape targets.
fn series(n: usize) -> Vec<Vec<u8>> {
    const METRICS: [(&str, &str, &[&str]); 6] = [
        (
            "node_cpu_seconds_total",
            "cpu",
            &["idle", "iowait", "irq", "nice", "softirq", "steal", "system", "user"],
        ),
        (
            "container_memory_working_set_bytes",
            "id",
            &["/kubepods/burstable", "/kubepods/besteffort"],
        ),
        (
            "http_server_request_duration_seconds_bucket",
            "le",
            &[
                "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "+Inf",
            ],
        ),
        ("apiserver_request_total", "code", &["200", "201", "404", "409", "500"]),
        (
            "kube_pod_container_status_restarts_total",
            "reason",
            &["Completed", "Error", "OOMKilled"],
        ),
        ("go_gc_duration_seconds", "quantile", &["0", "0.25", "0.5", "0.75", "1"]),
    ];
    (0..n)
        .map(|i| {
            let (name, extra, values) = METRICS[i % METRICS.len()];
            let pod = format!(
                "checkout-{:x}-{:05x}",
                0x5f7c9d8b4 + (i % 37) as u64,
                i * 7919 % 0xfffff
            );
            let instance = format!("10.42.{}.{}:8080", i % 17, i % 251);
            let extra_value = values[(i / METRICS.len()) % values.len()];
            let mut labels = vec![
                ("__name__", name),
                ("cluster", "prod-eu-west-1"),
                ("container", "checkout"),
                (extra, extra_value),
                ("instance", &instance),
                ("job", "kubernetes-pods"),
                ("namespace", "shop"),
                ("node", "ip-10-0-12-34.eu-west-1.compute.internal"),
                ("pod", &pod),
            ];
            labels.sort_unstable();
            let mut enc = Vec::new();
            proto::encode_labels(labels.into_iter(), &mut enc);
            enc
        })
        .collect()
}

fn values(n: usize) -> Vec<f64> {
    (0..n)
        .map(|i| match i % 4 {
            0 => (i * 1_234_567) as f64,         // counter
            1 => 0.1 * i as f64 + 0.003,         // gauge
            2 => (1u64 << 30) as f64 + i as f64, // bytes
            _ => (i % 2) as f64,                 // up / boolean
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("remote_write");
    for n in [500usize, 2000] {
        let labels = series(n);
        let vals = values(n);
        let ts = 1_700_000_000_000i64;
        let mut body = Vec::with_capacity(512);
        let mut raw = Vec::with_capacity(n * 512);
        let mut compressed = Vec::with_capacity(n * 512);
        group.throughput(Throughput::Elements(n as u64));
        group.bench_function(BenchmarkId::new("encode_compress", n), |b| {
            b.iter(|| {
                raw.clear();
                for (i, (l, v)) in labels.iter().zip(&vals).enumerate() {
                    body.clear();
                    proto::encode_series(l, *v, ts + i as i64, &mut body);
                    proto::frame_timeseries(&body, &mut raw);
                }
                proto::compress(&raw, &mut compressed);
                black_box(compressed.len())
            })
        });
        group.bench_function(BenchmarkId::new("encode_only", n), |b| {
            b.iter(|| {
                raw.clear();
                for (i, (l, v)) in labels.iter().zip(&vals).enumerate() {
                    body.clear();
                    proto::encode_series(l, *v, ts + i as i64, &mut body);
                    proto::frame_timeseries(&body, &mut raw);
                }
                black_box(raw.len())
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
