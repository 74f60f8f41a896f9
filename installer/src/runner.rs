//! External tools (`talosctl`, `helm`, `kubectl`, `docker`): how a command is described, shown
//! (secrets redacted) and run with its output captured.

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use crate::redact::Redactor;

/// One invocation of an external tool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cmd {
    /// The program, looked up on PATH.
    pub program: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// Extra environment (e.g. `KUBECONFIG`).
    pub env: Vec<(String, String)>,
}

impl Cmd {
    /// `program` with `args`.
    pub fn new<I, S>(program: &str, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            program: program.to_owned(),
            args: args.into_iter().map(Into::into).collect(),
            env: Vec::new(),
        }
    }

    /// Adds arguments.
    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.args.push(a.into());
        self
    }

    /// Adds an environment variable.
    pub fn env(mut self, k: &str, v: impl Into<String>) -> Self {
        self.env.push((k.to_owned(), v.into()));
        self
    }

    /// The command as a shell line, each argument quoted where needed.
    pub fn shell_line(&self) -> String {
        let mut out = String::new();
        for (k, v) in &self.env {
            out.push_str(&format!("{k}={} ", quote(v)));
        }
        out.push_str(&self.program);
        for a in &self.args {
            out.push(' ');
            out.push_str(&quote(a));
        }
        out
    }
}

impl fmt::Display for Cmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shell_line())
    }
}

fn quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:=@,+%{}".contains(&b));
    if plain {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// What a finished command left behind.
#[derive(Clone, Debug, Default)]
pub struct Output {
    /// Exit code; `None` when killed by a signal.
    pub code: Option<i32>,
    /// Captured standard output.
    pub stdout: String,
    /// Captured standard error.
    pub stderr: String,
}

impl Output {
    /// Whether the command exited 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// stdout and stderr together, for an error report, secrets redacted, the last `max_lines`.
    pub fn tail(&self, redactor: &Redactor, max_lines: usize) -> String {
        let both = format!("{}{}", self.stdout, self.stderr);
        let text = redactor.redact(&both);
        let lines: Vec<&str> = text.lines().collect();
        let start = lines.len().saturating_sub(max_lines);
        lines[start..].join("\n")
    }
}

/// Runs external commands. The real one spawns processes; tests use fake executables on PATH
/// rather than another implementation, so the real code path is what they exercise.
#[derive(Clone, Debug, Default)]
pub struct Runner {
    /// PATH to search (the process's own when `None`).
    pub path: Option<OsString>,
}

impl Runner {
    /// Full path of `program` on PATH, if it is there and executable.
    pub fn which(&self, program: &str) -> Option<PathBuf> {
        let path = self.path.clone().or_else(|| std::env::var_os("PATH"))?;
        std::env::split_paths(&path)
            .map(|dir| dir.join(program))
            .find(|p| is_executable(p))
    }

    /// Runs `cmd` to completion, capturing its output. An error means it could not start.
    pub async fn run(&self, cmd: &Cmd) -> std::io::Result<Output> {
        let program = self.which(&cmd.program).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("`{}` is not on PATH (run `installer check-deps`)", cmd.program),
            )
        })?;
        let mut c = tokio::process::Command::new(program);
        c.args(&cmd.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in &cmd.env {
            c.env(k, v);
        }
        let out = c.output().await?;
        Ok(Output {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_lines_quote_what_needs_it() {
        let c = Cmd::new("helm", ["upgrade", "--install", "a b", "it's", "--set=x.y=1"]).env("KUBECONFIG", "/s/k");
        assert_eq!(
            c.shell_line(),
            r"KUBECONFIG=/s/k helm upgrade --install 'a b' 'it'\''s' --set=x.y=1"
        );
    }
}
