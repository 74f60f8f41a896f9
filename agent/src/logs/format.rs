//! The two container log formats kubelet leaves under `/var/log/pods`: CRI (containerd,
//! CRI-O) and Docker's json-file, told apart by the line itself.
//!
//! CRI: `<RFC 3339 time with nanoseconds> <stdout|stderr> <P|F> <message>`, where `P` marks a
//! partial line that continues in the next one and `F` the last (or only) part. Docker:
//! `{"log":"<message>\n","stream":"stdout","time":"<RFC 3339>"}`, where a message that does
//! not end in a newline was split and continues in the next line.

use std::borrow::Cow;

/// Which stream of the container a line came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

impl Stream {
    /// `stdout` or `stderr`, the `stream` label's value.
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "stdout" => Some(Stream::Stdout),
            "stderr" => Some(Stream::Stderr),
            _ => None,
        }
    }
}

/// One line of a container log file, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line<'a> {
    /// When the runtime wrote it, nanoseconds since the epoch.
    pub ts_ns: i128,
    /// Its stream.
    pub stream: Stream,
    /// More of the same message follows in the next line (CRI `P`, Docker without `\n`).
    pub partial: bool,
    /// The message, without the runtime's prefix (and, for Docker, without its final newline).
    pub message: Cow<'a, str>,
}

/// Why a line is not in the expected format (counted by the caller, which keeps the line as it
/// is rather than dropping it).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// Not `<time> <stream> <P|F> <message>`.
    #[error("not a CRI log line: {0}")]
    Cri(&'static str),
    /// Not Docker's json-file object.
    #[error("not a Docker json-file log line: {0}")]
    Docker(String),
}

/// The format of a file, judged from a line: Docker lines are JSON objects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// containerd / CRI-O.
    Cri,
    /// Docker json-file.
    Docker,
}

impl Format {
    /// The format `line` is written in.
    pub fn detect(line: &str) -> Format {
        if line.trim_start().starts_with('{') {
            Format::Docker
        } else {
            Format::Cri
        }
    }

    /// Parses `line` (without its final newline) in this format.
    pub fn parse(self, line: &str) -> Result<Line<'_>, FormatError> {
        match self {
            Format::Cri => parse_cri(line),
            Format::Docker => parse_docker(line),
        }
    }
}

/// Parses a CRI log line (without its final newline).
pub fn parse_cri(line: &str) -> Result<Line<'_>, FormatError> {
    // Split on the first three spaces (memchr: this runs for every line).
    let mut rest = line;
    let mut field = |what: &'static str| -> Result<&str, FormatError> {
        match memchr::memchr(b' ', rest.as_bytes()) {
            Some(i) => {
                let f = &rest[..i];
                rest = &rest[i + 1..];
                Ok(f)
            }
            None if !rest.is_empty() => {
                let f = rest;
                rest = "";
                Ok(f)
            }
            None => Err(FormatError::Cri(what)),
        }
    };
    let ts = field("empty line")?;
    let stream = field("no stream after the time")?;
    let tag = field("no P/F tag after the stream")?;
    // A message may be empty: `<time> stdout F` with or without the separating space.
    let message = rest;
    let ts_ns = parse_time(ts).ok_or(FormatError::Cri("the time is not RFC 3339"))?;
    let stream = Stream::parse(stream).ok_or(FormatError::Cri("the stream is not stdout or stderr"))?;
    // CRI tags may carry more flags after `P`/`F`, separated by ':'.
    let partial = match tag.split(':').next() {
        Some("P") => true,
        Some("F") => false,
        _ => return Err(FormatError::Cri("the tag is not P or F")),
    };
    Ok(Line {
        ts_ns,
        stream,
        partial,
        message: Cow::Borrowed(message),
    })
}

#[derive(serde::Deserialize)]
struct DockerLine<'a> {
    #[serde(borrow)]
    log: Cow<'a, str>,
    stream: &'a str,
    time: &'a str,
}

/// Parses a Docker json-file log line.
pub fn parse_docker(line: &str) -> Result<Line<'_>, FormatError> {
    let d: DockerLine<'_> = serde_json::from_str(line).map_err(|e| FormatError::Docker(e.to_string()))?;
    let ts_ns = parse_time(d.time).ok_or_else(|| FormatError::Docker("the time is not RFC 3339".into()))?;
    let stream =
        Stream::parse(d.stream).ok_or_else(|| FormatError::Docker("the stream is not stdout or stderr".into()))?;
    let (message, partial) = match d.log {
        Cow::Borrowed(s) => match s.strip_suffix('\n') {
            Some(m) => (Cow::Borrowed(m), false),
            None => (Cow::Borrowed(s), true),
        },
        Cow::Owned(mut s) => {
            let partial = !s.ends_with('\n');
            if !partial {
                s.pop();
            }
            (Cow::Owned(s), partial)
        }
    };
    Ok(Line {
        ts_ns,
        stream,
        partial,
        message,
    })
}

/// The start of the message of a Docker json-file line cut short (an over-long line): the
/// `log` string up to the cut, unescaped. Its stream and time come after the message and are
/// lost, so it is taken as stdout at the time it is read. None when it does not start like a
/// Docker line.
pub fn parse_docker_cut(line: &str) -> Option<Line<'static>> {
    let body = line
        .trim_start()
        .strip_prefix('{')?
        .trim_start()
        .strip_prefix("\"log\"")?;
    let body = body.trim_start().strip_prefix(':')?.trim_start().strip_prefix('"')?;
    // Close the string where it was cut; a cut escape (`\`, `\u00`) loses its last bytes.
    let mut end = body.len();
    for _ in 0..16 {
        let quoted = format!("\"{}\"", &body[..end]);
        if let Ok(message) = serde_json::from_str::<String>(&quoted) {
            let ts_ns = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as i128);
            return Some(Line {
                ts_ns,
                stream: Stream::Stdout,
                partial: false,
                message: Cow::Owned(message),
            });
        }
        end = body[..end].char_indices().next_back()?.0;
    }
    None
}

/// Nanoseconds since the epoch of an RFC 3339 time (jiff: it keeps all nine digits and any
/// offset; no hand-written calendar arithmetic).
fn parse_time(s: &str) -> Option<i128> {
    // Fast path for the runtimes' own shape, `YYYY-MM-DDTHH:MM:SS[.fraction]Z`: consecutive
    // lines share their second, so the seconds of the last prefix are kept and only the
    // fraction is read here. Anything else (offsets, other shapes) goes to jiff.
    thread_local! {
        static LAST: std::cell::RefCell<([u8; 19], i128)> = const { std::cell::RefCell::new(([0; 19], i128::MIN)) };
    }
    let b = s.as_bytes();
    if b.len() >= 20 && b.len() <= 30 && b[b.len() - 1] == b'Z' && (b[19] == b'.' || b.len() == 20) {
        let frac = &b[19..b.len() - 1];
        let digits = frac.get(1..).unwrap_or(&[]);
        if digits.len() <= 9 && digits.iter().all(u8::is_ascii_digit) && (frac.is_empty() || !digits.is_empty()) {
            let prefix: [u8; 19] = b[..19].try_into().ok()?;
            let secs = LAST.with(|c| {
                let mut c = c.borrow_mut();
                if c.1 != i128::MIN && c.0 == prefix {
                    return Some(c.1);
                }
                // A new second: the whole time through jiff, its second kept for the next lines.
                let secs = s.parse::<jiff::Timestamp>().ok()?.as_second();
                *c = (prefix, i128::from(secs));
                Some(i128::from(secs))
            })?;
            let mut nanos: i128 = 0;
            for d in digits {
                nanos = nanos * 10 + i128::from(d - b'0');
            }
            for _ in digits.len()..9 {
                nanos *= 10;
            }
            return Some(secs * 1_000_000_000 + nanos);
        }
    }
    s.parse::<jiff::Timestamp>().ok().map(|t| t.as_nanosecond())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cri_lines_full_partial_empty_and_offsets() {
        let l = parse_cri("2026-12-04T17:16:16.123456789Z stdout F GET /cart 200").unwrap();
        assert_eq!(l.ts_ns, 1_796_404_576_123_456_789);
        assert_eq!(
            (l.stream, l.partial, &*l.message),
            (Stream::Stdout, false, "GET /cart 200")
        );
        let p = parse_cri("2026-12-04T18:16:16.123456789+01:00 stderr P part one ").unwrap();
        assert_eq!(p.ts_ns, l.ts_ns, "the offset is applied");
        assert_eq!((p.stream, p.partial, &*p.message), (Stream::Stderr, true, "part one "));
        assert_eq!(parse_cri("2026-12-04T17:16:16Z stdout F").unwrap().message, "");
        assert_eq!(parse_cri("2026-12-04T17:16:16Z stdout F ").unwrap().message, "");
        assert!(!parse_cri("2026-12-04T17:16:16Z stdout F:x msg").unwrap().partial);
    }

    #[test]
    fn the_fast_time_path_agrees_with_jiff() {
        for t in [
            "2026-01-01T00:00:00Z",
            "2026-01-01T00:00:00.5Z",
            "2026-01-01T00:00:00.000000001Z",
            "2026-01-01T00:00:00.123456789Z",
            "2026-01-01T00:00:01.123456789Z",
            "1999-12-31T23:59:59.999999999Z",
            "2024-02-29T12:00:00.25Z",
            "2026-01-01T00:00:00.123+02:00",
            "2026-01-01T00:00:00.1234567891Z",
        ] {
            assert_eq!(
                parse_time(t),
                t.parse::<jiff::Timestamp>().ok().map(|x| x.as_nanosecond()),
                "{t}"
            );
        }
        assert_eq!(parse_time("2026-13-01T00:00:00Z"), None);
        assert_eq!(parse_time("2026-01-01T00:00:00.Z"), None);
        assert_eq!(parse_time("2026-01-01T00:00:00.12a4Z"), None);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bad in [
            "",
            "hello",
            "2026-12-04T17:16:16Z",
            "2026-12-04T17:16:16Z stdout",
            "2026-12-04T17:16:16Z stdin F x",
            "2026-12-04T17:16:16Z stdout X x",
            "yesterday stdout F x",
            "\u{0}\u{1}\u{ff}",
        ] {
            assert!(parse_cri(bad).is_err(), "{bad:?}");
        }
        assert!(parse_docker("{\"log\":1}").is_err());
        assert!(parse_docker("{not json").is_err());
    }

    #[test]
    fn docker_lines_unescape_and_split_on_the_missing_newline() {
        let l =
            parse_docker(r#"{"log":"a \"quoted\" line\n","stream":"stderr","time":"2026-12-04T17:16:16.5Z"}"#).unwrap();
        assert_eq!(
            (&*l.message, l.stream, l.partial),
            ("a \"quoted\" line", Stream::Stderr, false)
        );
        assert_eq!(l.ts_ns, 1_796_404_576_500_000_000);
        let p = parse_docker(r#"{"log":"first half","stream":"stdout","time":"2026-12-04T17:16:16Z"}"#).unwrap();
        assert!(p.partial);
        assert_eq!(Format::detect(r#"{"log":"x"}"#), Format::Docker);
        // Cut in the middle of an escape: the message up to the cut, unescaped.
        let cut = parse_docker_cut(r#"{"log":"tab\there \"q\" \u00"#).unwrap();
        assert_eq!(&*cut.message, "tab\there \"q\" ");
        assert!(parse_docker_cut("garbage").is_none());
        assert_eq!(Format::detect("2026-12-04T17:16:16Z stdout F x"), Format::Cri);
    }
}
