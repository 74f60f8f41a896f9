//! The sender engine carries log entries with its second protocol, Loki push: entries appended
//! to a WAL reach a receiver that decodes the real Loki wire format (snappy + `PushRequest`),
//! each exactly once, in order per stream, through a 500 that is retried; the tenant goes in
//! `X-Scope-OrgID`; the WAL is committed as acknowledged.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent::frame;
use agent::loki::{proto, LokiPush};
use agent::sender::{SenderConfig, SenderHandle};
use agent::telemetry::Metrics;
use agent::wal::{FsyncPolicy, Wal, WalOptions};
use prost::Message;

/// (stream labels, line) in arrival order, and the tenants seen.
#[derive(Default)]
struct Received {
    entries: Vec<(String, i64, String)>,
    tenants: Vec<String>,
    requests: u32,
}

/// A one-thread HTTP receiver: the first push is answered 500, the others decoded and 204.
fn receiver() -> (String, Arc<Mutex<Received>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let got: Arc<Mutex<Received>> = Arc::default();
    let g = got.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut s = stream;
            let mut buf = Vec::new();
            let mut tmp = [0u8; 65536];
            // Headers, then Content-Length bytes of body; one request per connection is enough
            // here since every answer closes the connection.
            let (head_end, len) = loop {
                let n = match s.read(&mut tmp) {
                    Ok(0) | Err(_) => break (0, 0),
                    Ok(n) => n,
                };
                buf.extend_from_slice(&tmp[..n]);
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
                    let len = head
                        .lines()
                        .find_map(|l| {
                            l.strip_prefix("content-length:")
                                .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    break (i + 4, len);
                }
            };
            if head_end == 0 {
                continue;
            }
            while buf.len() < head_end + len {
                match s.read(&mut tmp) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&tmp[..n]),
                }
            }
            let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
            let body = &buf[head_end..];
            let mut r = g.lock().unwrap();
            r.requests += 1;
            let status = if r.requests == 1 {
                "500 Internal Server Error"
            } else {
                let raw = snap::raw::Decoder::new().decompress_vec(body).unwrap();
                let req = proto::PushRequest::decode(raw.as_slice()).unwrap();
                for st in req.streams {
                    for e in st.entries {
                        let ts = e
                            .timestamp
                            .map(|t| t.seconds * 1_000_000_000 + i64::from(t.nanos))
                            .unwrap_or(0);
                        r.entries.push((st.labels.clone(), ts, e.line));
                    }
                }
                if let Some(t) = head.lines().find_map(|l| {
                    l.strip_prefix("x-scope-orgid: ")
                        .or_else(|| l.strip_prefix("X-Scope-OrgID: "))
                }) {
                    r.tenants.push(t.trim().to_owned());
                }
                "204 No Content"
            };
            drop(r);
            let _ =
                s.write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").as_bytes());
        }
    });
    (addr, got)
}

fn wal(dir: &Path) -> Arc<Wal> {
    Arc::new(
        Wal::open(
            dir.join("wal"),
            WalOptions {
                fsync: FsyncPolicy::Never,
                refuse_when_full: false,
                ..WalOptions::default()
            },
        )
        .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_entries_reach_a_loki_receiver_exactly_once_in_order_per_stream() {
    let dir = tempfile::tempdir().unwrap();
    let wal = wal(dir.path());
    let streams = ["{app=\"web\", namespace=\"shop\"}", "{app=\"db\", namespace=\"shop\"}"];
    // 20 records (think: reads of a file) of 50 entries each, alternating streams.
    let mut n = 0;
    for r in 0..20 {
        let mut payload = Vec::new();
        for i in 0..50 {
            let labels = streams[i % 2];
            let line = format!("line {n:05} of record {r}");
            // Entries of one stream share its routing hash: one shard, in order.
            frame::push_with(&mut payload, xxhash_rust::xxh3::xxh3_64(labels.as_bytes()), |b| {
                proto::encode_entry(labels, 1_700_000_000_000_000_000 + n, line.as_bytes(), &[], b)
            });
            n += 1;
        }
        wal.append(&payload, 50).unwrap();
    }
    let (addr, got) = receiver();
    let queue = config::agent::QueueConfig {
        max_samples_per_send: 64,
        max_shards: 4,
        batch_send_deadline: config::Duration::from_millis(50),
        min_backoff: config::Duration::from_millis(20),
        max_backoff: config::Duration::from_millis(100),
        ..Default::default()
    };
    let cfg = SenderConfig {
        protocol: Arc::new(LokiPush::new(Some("team-a")).unwrap()),
        name: "loki".into(),
        url: format!("http://{addr}/loki/api/v1/push").parse().unwrap(),
        client: agent::http::build_client(dir.path(), None, false).unwrap(),
        headers: Default::default(),
        auth: agent::http::Auth::new(dir.path(), None, None, None, None).unwrap(),
        timeout: Duration::from_secs(5),
        queue,
        follow_redirects: true,
        max_bytes_per_send: 0,
    };
    let sender = SenderHandle::start(cfg, wal.clone(), Arc::new(Metrics::new()));
    let deadline = Instant::now() + Duration::from_secs(30);
    while got.lock().unwrap().entries.len() < 1000 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Acknowledged records are committed.
    while wal.committed().0 < 20 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sender.shutdown(Duration::from_secs(2)).await;
    let r = got.lock().unwrap();
    assert!(r.requests >= 2, "the first push was answered 500 and retried");
    assert_eq!(r.entries.len(), 1000, "every entry once");
    let mut per_stream: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
    for (labels, ts, line) in &r.entries {
        assert!(line.starts_with("line "), "{line}");
        per_stream.entry(labels.as_str()).or_default().push(*ts);
    }
    for (labels, ts) in &per_stream {
        assert_eq!(ts.len(), 500, "{labels}");
        assert!(
            ts.windows(2).all(|w| w[0] < w[1]),
            "entries of {labels} arrive in order"
        );
    }
    assert!(r.tenants.iter().all(|t| t == "team-a") && !r.tenants.is_empty());
    assert_eq!(wal.committed().0, 20, "all records acknowledged and committed");
}
