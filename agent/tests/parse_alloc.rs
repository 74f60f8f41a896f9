//! The scrape parser must not allocate on the common path: once a body without
//! escape sequences is parsed, iterating its entries and label pairs again
//! performs zero heap allocations.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::fmt::Write as _;

use agent::scrape::parse::{Entry, Format, Parser};

/// Counts allocations per thread so the test harness's own threads cannot
/// disturb the measurement.
struct CountingAllocator;

thread_local! {
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

fn count_one() {
    // `try_with` fails only during thread teardown; nothing to count then.
    let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
}

fn allocations() -> usize {
    ALLOCATIONS.with(Cell::get)
}

// SAFETY: every call is forwarded unchanged to the system allocator.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_one();
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count_one();
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_one();
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

/// A node_exporter-like page with about 1000 series: counters, gauges, a
/// histogram and a summary, 0–4 labels each, some explicit timestamps.
fn page(format: Format) -> String {
    let om = format == Format::OpenMetrics;
    let mut out = String::new();
    let cpu_total = if om {
        "node_cpu_seconds"
    } else {
        "node_cpu_seconds_total"
    };
    writeln!(out, "# HELP {cpu_total} Seconds the CPUs spent in each mode.").unwrap();
    writeln!(out, "# TYPE {cpu_total} counter").unwrap();
    for cpu in 0..64 {
        for mode in ["idle", "iowait", "irq", "nice", "softirq", "steal", "system", "user"] {
            let value = 1000.0 + f64::from(cpu) * 13.37;
            writeln!(out, "node_cpu_seconds_total{{cpu=\"{cpu}\",mode=\"{mode}\"}} {value}").unwrap();
        }
    }
    out.push_str("# HELP node_network_receive_bytes_total Network device statistic receive_bytes.\n");
    out.push_str("# TYPE node_network_receive_bytes_total counter\n");
    for dev in 0u32..240 {
        let ts = if dev % 4 == 0 {
            if om {
                " 1700000000.123"
            } else {
                " 1700000000123"
            }
        } else {
            ""
        };
        let exemplar = if om && dev % 10 == 0 {
            " # {trace_id=\"4bf92f3577b34da6\"} 1"
        } else {
            ""
        };
        writeln!(
            out,
            "node_network_receive_bytes_total{{device=\"veth{dev:04x}\",instance=\"10.0.0.1:9100\",job=\"node\"}} {}{ts}{exemplar}",
            u64::from(dev) * 987_654_321
        )
        .unwrap();
    }
    out.push_str("# HELP http_request_duration_seconds Request latency.\n");
    out.push_str("# TYPE http_request_duration_seconds histogram\n");
    for handler in 0..30 {
        let labels = format!("code=\"200\",handler=\"/api/v1/h{handler}\",method=\"GET\"");
        for (i, le) in ["0.005", "0.01", "0.05", "0.1", "0.5", "1", "+Inf"].iter().enumerate() {
            writeln!(
                out,
                "http_request_duration_seconds_bucket{{{labels},le=\"{le}\"}} {}",
                i * 7
            )
            .unwrap();
        }
        writeln!(out, "http_request_duration_seconds_sum{{{labels}}} 12.5e-3").unwrap();
        writeln!(out, "http_request_duration_seconds_count{{{labels}}} 42").unwrap();
    }
    out.push_str("# HELP go_gc_duration_seconds A summary of GC pauses.\n");
    out.push_str("# TYPE go_gc_duration_seconds summary\n");
    for q in ["0", "0.25", "0.5", "0.75", "1"] {
        writeln!(out, "go_gc_duration_seconds{{quantile=\"{q}\"}} 4.9351e-05").unwrap();
    }
    out.push_str("go_gc_duration_seconds_sum NaN\ngo_gc_duration_seconds_count 0\n");
    out.push_str("# TYPE go_goroutines gauge\ngo_goroutines 33\n");
    if om {
        out.push_str("# EOF\n");
    }
    out
}

/// What a scrape loop does with every entry: count, touch values and labels.
fn consume(body: &[u8], format: Format) -> (usize, usize, u64) {
    let (mut samples, mut label_bytes, mut checksum) = (0, 0, 0u64);
    for entry in Parser::new(body, format) {
        match entry.expect("test page is valid") {
            Entry::Sample(sample) => {
                samples += 1;
                checksum = checksum.wrapping_add(sample.value.to_bits());
                checksum = checksum.wrapping_add(sample.timestamp_ms.unwrap_or(0) as u64);
                label_bytes += sample.series.len();
                for (name, value) in sample.labels() {
                    label_bytes += name.len() + value.len();
                }
                if let Some(exemplar) = sample.exemplar {
                    checksum = checksum.wrapping_add(exemplar.value.to_bits());
                    label_bytes += exemplar.labels().map(|(n, v)| n.len() + v.len()).sum::<usize>();
                }
            }
            Entry::Help { metric, text } => label_bytes += metric.len() + text.len(),
            Entry::Type { metric, .. } | Entry::Unit { metric, .. } => label_bytes += metric.len(),
        }
    }
    (samples, label_bytes, checksum)
}

fn assert_second_parse_allocates_nothing(format: Format) {
    let body = page(format);
    let first = consume(body.as_bytes(), format);
    assert!(first.0 >= 1000, "only {} samples", first.0);
    let before = allocations();
    let second = consume(body.as_bytes(), format);
    let allocated = allocations() - before;
    assert_eq!(second, first);
    assert_eq!(allocated, 0, "{format:?} parse allocated {allocated} times");
}

#[test]
fn text_parse_allocates_nothing() {
    assert_second_parse_allocates_nothing(Format::Text);
}

#[test]
fn openmetrics_parse_allocates_nothing() {
    assert_second_parse_allocates_nothing(Format::OpenMetrics);
}
