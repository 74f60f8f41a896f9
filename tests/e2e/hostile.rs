//! Hostile targets: a 1 GiB page, a gzip bomb and a 1 MiB label value end their scrape with
//! `up=0` and a reason, while the agent's resident memory stays bounded (read from /proc).

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::Duration;

use anyhow::Result;
use sre_lab_tests::{poll, targets, Agent, TinyServer};

/// A server that answers every request with a `Content-Length: 1 GiB` page of valid lines
/// and writes it until the client goes away.
fn endless_page() -> Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?.to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = stream;
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf);
                let _ =
                    s.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 1073741824\r\n\r\n");
                let line = b"hostile_big_page_series_with_a_long_name{label=\"value\"} 1\n";
                let chunk: Vec<u8> = line.iter().copied().cycle().take(line.len() * 1024).collect();
                let mut sent = 0usize;
                while sent < 1 << 30 {
                    if s.write_all(&chunk).is_err() {
                        return;
                    }
                    sent += chunk.len();
                }
            });
        }
    });
    Ok(addr)
}

/// Peak and current resident memory of a process, in MiB.
fn rss_mib(pid: u32) -> Result<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> f64 {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    Ok((field("VmHWM:"), field("VmRSS:")))
}

#[test]
fn huge_page_gzip_bomb_and_huge_label_value_fail_with_bounded_memory() -> Result<()> {
    let big = endless_page()?;
    // 256 MiB of valid lines gzip to about a megabyte: only the body size limit stops it, and
    // it is parsed as it streams in, never held.
    let bomb = {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        let line = b"hostile_bomb_series{l=\"v\"} 1\n";
        let lines: Vec<u8> = line
            .iter()
            .copied()
            .cycle()
            .take((1 << 20) / line.len() * line.len())
            .collect();
        for _ in 0..256 {
            e.write_all(&lines)?;
        }
        e.finish()?
    };
    let bomb_server =
        TinyServer::start(move |_| (200, vec![("Content-Encoding".into(), "gzip".into())], bomb.clone()))?;
    let long_value = format!("hostile_label{{l=\"{}\"}} 1\n", "x".repeat(1 << 20));
    let label_server = TinyServer::start(move |_| (200, vec![], long_value.clone().into_bytes()))?;
    let dir = tempfile::tempdir()?;
    let agent = Agent::start(
        dir.path(),
        &format!(
            "global:\n  scrape_interval: 10s\n  scrape_timeout: 10s\n  body_size_limit: 50MiB\n  label_value_length_limit: 4096\nscrape_configs:\n  - job_name: hostile\n    static_configs:\n      - targets: ['{big}', '{}', '{}']\nfile_sink:\n  path: {}\n",
            bomb_server.addr,
            label_server.addr,
            dir.path().join("sink.txt").display()
        ),
    )?;
    let (_, baseline) = rss_mib(agent.proc.pid())?;
    // The timeout leaves room to inflate and parse 50 MiB on a loaded 2-core machine (a debug
    // build beside the rest of the suite): the limit, not the clock, must end the bomb's scrape.
    // Every target has failed a few times with the reason it deserves.
    let errors = poll("three failing scrapes each", Duration::from_secs(60), || {
        let t = targets(&agent)?;
        let errs: Vec<String> = t
            .iter()
            .map(|t| t["last_error"].as_str().unwrap_or_default().to_owned())
            .collect();
        let down = t.iter().all(|t| t["health"] == "down");
        Ok((t.len() == 3 && down && errs.iter().all(|e| !e.is_empty())).then_some(errs))
    })
    .map_err(|e| e.context(agent.proc.log_text()))?;
    std::thread::sleep(Duration::from_secs(6));
    let joined = errors.join("\n");
    assert_eq!(
        errors.iter().filter(|e| e.contains("body size limit")).count(),
        2,
        "{joined}"
    );
    assert!(joined.contains("label_value_length_limit"), "{joined}");
    let text = std::fs::read_to_string(dir.path().join("sink.txt"))?;
    assert!(
        !text.contains("hostile_big_page") && !text.contains("hostile_label{"),
        "a failed scrape appends nothing"
    );
    assert!(
        text.lines().any(|l| l.starts_with("up{") && l.contains(" 0 ")),
        "up=0 is written"
    );
    let (peak, now) = rss_mib(agent.proc.pid())?;
    eprintln!("RSS: baseline {baseline:.0} MiB, peak {peak:.0} MiB, now {now:.0} MiB");
    // Bodies are streamed: what a scrape holds is a piece of the body, the longest line (the
    // 1 MiB label value) and the samples kept — here the bomb's one series — never the 50 MiB
    // the body limit lets through, let alone the page.
    assert!(
        peak < baseline + 48.0,
        "peak RSS {peak:.0} MiB (baseline {baseline:.0} MiB)"
    );
    assert!(
        now < baseline + 32.0,
        "RSS after the scrapes {now:.0} MiB (baseline {baseline:.0} MiB)"
    );
    Ok(())
}
