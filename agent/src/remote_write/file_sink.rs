//! The `file_sink` extension: every sample appended as `name{labels} value timestamp_ms`.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;
use std::sync::Mutex;

/// A shared, line-buffered writer; one scrape's lines are written as one block.
pub struct FileSink {
    out: Mutex<Box<dyn Write + Send>>,
}

impl FileSink {
    /// Opens `path` for appending (`-` = standard output), creating parent directories.
    pub fn open(path: &Path) -> io::Result<Self> {
        let out: Box<dyn Write + Send> = if path.as_os_str() == "-" {
            Box::new(io::stdout())
        } else {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)?;
            }
            let f: File = OpenOptions::new().create(true).append(true).open(path)?;
            Box::new(f)
        };
        Ok(Self { out: Mutex::new(out) })
    }

    /// Writes a block of complete lines.
    pub fn write_block(&self, block: &[u8]) -> io::Result<()> {
        if block.is_empty() {
            return Ok(());
        }
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        out.write_all(block)?;
        out.flush()
    }
}

/// Formats `{a="1",b="2"}` style series text (`name{labels}`) for the sink, escaping values.
pub fn series_text<'a>(name: &str, labels: impl Iterator<Item = (&'a str, &'a str)>) -> String {
    let mut s = String::with_capacity(64);
    s.push_str(name);
    let mut first = true;
    for (n, v) in labels {
        if n == crate::labels::METRIC_NAME {
            continue;
        }
        s.push(if first { '{' } else { ',' });
        first = false;
        s.push_str(n);
        s.push_str("=\"");
        for c in v.chars() {
            match c {
                '\\' => s.push_str("\\\\"),
                '"' => s.push_str("\\\""),
                '\n' => s.push_str("\\n"),
                c => s.push(c),
            }
        }
        s.push('"');
    }
    if !first {
        s.push('}');
    }
    s
}

/// Appends one line for a sample.
pub fn push_line(buf: &mut Vec<u8>, series: &str, value: f64, timestamp_ms: i64) {
    use std::io::Write as _;
    buf.extend_from_slice(series.as_bytes());
    buf.push(b' ');
    if value.is_nan() {
        buf.extend_from_slice(b"NaN");
    } else if value == f64::INFINITY {
        buf.extend_from_slice(b"+Inf");
    } else if value == f64::NEG_INFINITY {
        buf.extend_from_slice(b"-Inf");
    } else {
        let _ = write!(buf, "{value}");
    }
    let _ = writeln!(buf, " {timestamp_ms}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_lines() {
        let s = series_text(
            "up",
            [("__name__", "up"), ("instance", "a\"b"), ("job", "j")].into_iter(),
        );
        assert_eq!(s, r#"up{instance="a\"b",job="j"}"#);
        let mut buf = Vec::new();
        push_line(&mut buf, &s, 1.0, 1000);
        push_line(&mut buf, "x", f64::NEG_INFINITY, 5);
        assert_eq!(
            String::from_utf8(buf).unwrap(),
            "up{instance=\"a\\\"b\",job=\"j\"} 1 1000\nx -Inf 5\n"
        );
    }
}
