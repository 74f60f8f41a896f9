//! One line per step: a spinner with the elapsed time on a terminal, plain timestamped lines
//! otherwise (CI logs, pipes). Everything shown goes through the redactor.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use indicatif::{ProgressBar, ProgressStyle};

/// How a step ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// It ran and succeeded.
    Done,
    /// Nothing to do (already done, or found existing).
    Skipped,
    /// It failed.
    Failed,
}

/// Progress output for a run of steps.
pub struct Progress {
    tty: bool,
    total: usize,
    bar: Option<ProgressBar>,
    started: Instant,
    step_started: Instant,
    current: String,
}

impl Progress {
    /// Spinners when stderr is a terminal, unless `plain`.
    pub fn new(total: usize, plain: bool) -> Self {
        Self {
            tty: !plain && std::io::stderr().is_terminal(),
            total,
            bar: None,
            started: Instant::now(),
            step_started: Instant::now(),
            current: String::new(),
        }
    }

    /// Step `n` (1-based) starts.
    pub fn start(&mut self, n: usize, title: &str) {
        self.current = format!("[{n}/{}] {title}", self.total);
        self.step_started = Instant::now();
        if self.tty {
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                ProgressStyle::with_template("{spinner:.cyan} {msg} {elapsed:.dim}").expect("static template"),
            );
            bar.set_message(self.current.clone());
            bar.enable_steady_tick(Duration::from_millis(120));
            self.bar = Some(bar);
        } else {
            line(&format!("{} …", self.current));
        }
    }

    /// Extra detail about the running step (e.g. "retrying in 10s").
    pub fn detail(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.set_message(format!("{} — {text}", self.current)),
            None => line(&format!("{} — {text}", self.current)),
        }
    }

    /// The running step ended.
    pub fn finish(&mut self, outcome: Outcome, note: &str) {
        let secs = self.step_started.elapsed().as_secs_f64();
        let (mark, word) = match outcome {
            Outcome::Done => ("✓", "done"),
            Outcome::Skipped => ("–", "skipped"),
            Outcome::Failed => ("✗", "FAILED"),
        };
        let note = if note.is_empty() {
            String::new()
        } else {
            format!(" ({note})")
        };
        let text = format!("{} {word} in {secs:.1}s{note}", self.current);
        match self.bar.take() {
            Some(bar) => {
                bar.set_style(ProgressStyle::with_template("{msg}").expect("static template"));
                bar.finish_with_message(format!("{mark} {text}"));
            }
            None => line(&text),
        }
    }

    /// Total time since the run began.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

/// A plain progress line: `2026-11-29T17:50:01Z text`.
pub fn line(text: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{} {text}", timestamp(SystemTime::now()));
}

/// RFC 3339 UTC timestamp, seconds precision.
pub fn timestamp(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}Z")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(timestamp(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            timestamp(UNIX_EPOCH + Duration::from_secs(1_795_974_001)),
            "2026-11-29T17:40:01Z"
        );
    }
}
