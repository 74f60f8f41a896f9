//! Throughput of the logs path's hot parts: CRI line parsing (`agent::logs::format`) and Loki
//! encoding + snappy compression of a batch (`agent::loki`), in MB/s of log text.
//!
//! Corpus: 20k synthetic CRI lines of ~150 bytes (a timestamp, 20 lines a second, stdout/stderr,
//! F/P tags, a logfmt-style message), generated in setup.
//!
//! Run: `cargo bench -p sre-lab-benches --bench logs`

use std::hint::black_box;

use agent::logs::format::parse_cri;
use agent::loki::{proto, LokiPush};
use agent::sender::Protocol;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn corpus() -> Vec<String> {
    (0..20_000u64)
        .map(|n| {
            let stream = if n % 5 == 0 { "stderr" } else { "stdout" };
            let tag = if n % 17 == 0 { "P" } else { "F" };
            format!(
                "2026-01-01T00:{:02}:{:02}.{:09}Z {stream} {tag} level=info ts=2026-01-01T00:00:00Z caller=handler.go:{} msg=\"request served\" path=/api/v1/items/{n} status=200 duration_ms={}",
                // 20 lines per second, as a busy container writes them.
                (n / 1200) % 60,
                (n / 20) % 60,
                // Increasing within the second, as a runtime stamps them.
                (n % 20) * 50_000_000 + n * 7919 % 1_000_000,
                n % 400,
                n % 97
            )
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let lines = corpus();
    let bytes: usize = lines.iter().map(|l| l.len() + 1).sum();
    let mut g = c.benchmark_group("logs");
    g.throughput(Throughput::Bytes(bytes as u64));
    g.bench_function("cri_parse", |b| {
        b.iter(|| {
            let mut n = 0;
            for l in &lines {
                let p = parse_cri(l).expect("valid corpus");
                n += p.message.len();
                black_box(p.ts_ns);
            }
            n
        })
    });
    let parsed: Vec<(i64, String)> = lines
        .iter()
        .map(|l| {
            let p = parse_cri(l).unwrap();
            (p.ts_ns as i64, p.message.into_owned())
        })
        .collect();
    let labels = "{app=\"web\", container=\"app\", job=\"shop/web\", namespace=\"shop\", node_name=\"node-a\", pod=\"web-7d9f\", stream=\"stdout\"}";
    let loki = LokiPush::new(None).unwrap();
    g.bench_function("loki_encode_compress", |b| {
        let mut frames = Vec::with_capacity(bytes * 2);
        let mut batch = Vec::with_capacity(bytes * 2);
        let mut body = Vec::with_capacity(bytes);
        b.iter(|| {
            batch.clear();
            body.clear();
            // Per entry: the frame body written by the tailer, then the batch the engine builds
            // (in batches of 2000 entries, as a 1 MiB `batchsize` gives).
            for chunk in parsed.chunks(2000) {
                batch.clear();
                for (ts, msg) in chunk {
                    frames.clear();
                    proto::encode_entry(labels, *ts, msg.as_bytes(), &[], &mut frames);
                    loki.frame(&frames, &mut batch);
                }
                loki.encode(&batch, &mut body);
            }
            body.len()
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
