//! Findings about a configuration file, each pinned to a line and column.

use std::collections::HashSet;
use std::fmt;

/// A problem that makes a configuration file unusable.
///
/// Displays as `FILE:LINE:COL: message`, or `FILE: message` when the problem has no position
/// (for example the file cannot be read).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// The file name as given by the caller.
    pub file: String,
    /// 1-based line, 0 when the error concerns the whole file.
    pub line: usize,
    /// 1-based column, 0 when the error concerns the whole file.
    pub column: usize,
    /// What is wrong, usually prefixed with the YAML path (`scrape_configs[0].scheme: ...`).
    pub message: String,
}

/// Something worth telling the operator that does not stop the file from loading, such as a
/// Prometheus key the agent accepts and ignores. Displays like [`ConfigError`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Warning {
    /// The file name as given by the caller.
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// The warning text.
    pub message: String,
}

fn write_located(f: &mut fmt::Formatter<'_>, file: &str, line: usize, column: usize, message: &str) -> fmt::Result {
    if line == 0 {
        write!(f, "{file}: {message}")
    } else {
        write!(f, "{file}:{line}:{column}: {message}")
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_located(f, &self.file, self.line, self.column, &self.message)
    }
}

impl std::error::Error for ConfigError {}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_located(f, &self.file, self.line, self.column, &self.message)
    }
}

/// A 1-based line and column in the source text.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pos {
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
}

/// Collects errors and warnings for one file, dropping exact repeats (the deserializer may
/// visit a node more than once while it recovers from errors).
#[derive(Debug, Default)]
pub(crate) struct Diagnostics {
    file: String,
    errors: Vec<ConfigError>,
    warnings: Vec<Warning>,
    seen: HashSet<(bool, Pos, String)>,
}

impl Diagnostics {
    pub(crate) fn new(file: &str) -> Self {
        Self {
            file: file.to_owned(),
            ..Self::default()
        }
    }

    pub(crate) fn error(&mut self, pos: Pos, message: impl Into<String>) {
        let message = message.into();
        if self.seen.insert((true, pos, message.clone())) {
            self.errors.push(ConfigError {
                file: self.file.clone(),
                line: pos.line,
                column: pos.column,
                message,
            });
        }
    }

    pub(crate) fn warning(&mut self, pos: Pos, message: impl Into<String>) {
        let message = message.into();
        if self.seen.insert((false, pos, message.clone())) {
            self.warnings.push(Warning {
                file: self.file.clone(),
                line: pos.line,
                column: pos.column,
                message,
            });
        }
    }

    pub(crate) fn has_errors(&self) -> bool {
        !self.errors.is_empty()
    }

    /// Errors and warnings, each sorted by position (stable, so findings at one position keep
    /// the order they were found in).
    pub(crate) fn finish(mut self) -> (Vec<ConfigError>, Vec<Warning>) {
        self.errors.sort_by_key(|e| (e.line, e.column));
        self.warnings.sort_by_key(|w| (w.line, w.column));
        (self.errors, self.warnings)
    }
}

/// Joins a YAML path and a message: `scrape_configs[0].scheme: message`, or just the message
/// at the top level.
pub(crate) fn at_path(path: &str, message: impl fmt::Display) -> String {
    if path.is_empty() {
        message.to_string()
    } else {
        format!("{path}: {message}")
    }
}
