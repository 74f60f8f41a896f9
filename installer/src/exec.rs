//! Runs a plan: skips what is done (state file or probe), runs the rest in order with
//! progress and timings, records each finished step so a re-run resumes after a failure,
//! and on failure shows the failed step, the tool's output (redacted) and what to do.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};

use crate::plan::{Action, Probe, Step};
use crate::progress::{Outcome, Progress};
use crate::redact::Redactor;
use crate::runner::{Cmd, Runner};
use crate::state::{self, Done, Paths, State};

/// A step failure, already reported to the user.
#[derive(Debug)]
pub struct StepFailed {
    /// The step's id.
    pub step: String,
}

impl std::fmt::Display for StepFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "step {:?} failed", self.step)
    }
}

impl std::error::Error for StepFailed {}

/// How to run.
pub struct Executor<'a> {
    /// External tools.
    pub runner: &'a Runner,
    /// The state directory.
    pub paths: &'a Paths,
    /// Secrets to keep out of output.
    pub redactor: Redactor,
    /// Plain progress lines even on a terminal.
    pub plain: bool,
    /// Whether finished steps are recorded (false for `down`).
    pub record: bool,
    /// Pause between retries of a retried step.
    pub retry_pause: Duration,
    client: Option<kube::Client>,
    /// Values captured from tools' output for later manifests (`{{name}}`).
    vars: std::collections::BTreeMap<String, String>,
}

impl<'a> Executor<'a> {
    /// An executor for `paths`.
    pub fn new(runner: &'a Runner, paths: &'a Paths) -> Self {
        Self {
            runner,
            paths,
            redactor: Redactor::new(),
            plain: false,
            record: true,
            retry_pause: Duration::from_secs(10),
            client: None,
            vars: std::collections::BTreeMap::new(),
        }
    }

    async fn client(&mut self) -> anyhow::Result<kube::Client> {
        if let Some(c) = &self.client {
            return Ok(c.clone());
        }
        let c = crate::kube::client(&self.paths.kubeconfig()).await?;
        self.client = Some(c.clone());
        Ok(c)
    }

    /// Runs `steps`; returns the total time. A failed step has been reported on stderr.
    pub async fn run(&mut self, steps: &[Step]) -> anyhow::Result<Duration> {
        let mut st = if self.record {
            State::load(self.paths)?
        } else {
            State::default()
        };
        if self.record {
            std::fs::create_dir_all(&self.paths.dir)
                .with_context(|| format!("creating the state directory {}", self.paths.dir.display()))?;
            state::set_mode(&self.paths.dir, 0o700)?;
        }
        if let Ok(p) = std::fs::read_to_string(self.paths.grafana_password()) {
            self.redactor.add(p.trim());
        }
        let mut progress = Progress::new(steps.len(), self.plain);
        for (i, step) in steps.iter().enumerate() {
            progress.start(i + 1, &step.title);
            let fingerprint = step.fingerprint();
            if let Some(probe) = &step.skip_if {
                if self.probe(probe).await {
                    progress.finish(Outcome::Skipped, "already exists");
                    if self.record {
                        st.done.insert(
                            step.id.clone(),
                            Done {
                                fingerprint,
                                seconds: 0.0,
                            },
                        );
                        st.save(self.paths)?;
                    }
                    continue;
                }
                if step.resets_later {
                    // It is being made anew: nothing recorded after it still holds.
                    let later: Vec<&str> = steps[i..].iter().map(|s| s.id.as_str()).collect();
                    st.done.retain(|k, _| !later.contains(&k.as_str()));
                }
            } else if !step.always && st.done.get(&step.id).is_some_and(|d| d.fingerprint == fingerprint) {
                progress.finish(Outcome::Skipped, "done in an earlier run");
                continue;
            }
            let started = Instant::now();
            match self.run_step(step, &progress).await {
                Ok(()) => {
                    progress.finish(Outcome::Done, step.notice.as_deref().unwrap_or(""));
                    if self.record {
                        for id in &step.also_done {
                            if let Some(other) = steps.iter().find(|s| &s.id == id) {
                                st.done.insert(
                                    id.clone(),
                                    Done {
                                        fingerprint: other.fingerprint(),
                                        seconds: 0.0,
                                    },
                                );
                            }
                        }
                        st.done.insert(
                            step.id.clone(),
                            Done {
                                fingerprint,
                                seconds: started.elapsed().as_secs_f64(),
                            },
                        );
                        st.save(self.paths)?;
                    }
                }
                Err(e) => {
                    progress.finish(Outcome::Failed, "");
                    if self.record {
                        st.done.remove(&step.id);
                        st.save(self.paths)?;
                    }
                    eprintln!("\n{}", self.redactor.redact(&format!("{e:#}")));
                    eprintln!("\nStep {:?} ({}) failed.", step.id, step.title);
                    eprintln!("What to do: {}", step.hint);
                    if self.record {
                        eprintln!("Then run `installer up` again: finished steps are skipped.");
                    }
                    return Err(StepFailed { step: step.id.clone() }.into());
                }
            }
        }
        Ok(progress.elapsed())
    }

    async fn probe(&self, probe: &Probe) -> bool {
        match probe {
            Probe::All { probes } => {
                for p in probes {
                    if !Box::pin(self.probe(p)).await {
                        return false;
                    }
                }
                true
            }
            Probe::Exists { path } => path.exists(),
            Probe::Succeeds { cmd } => self.runner.run(cmd).await.is_ok_and(|o| o.success()),
            Probe::Prints { cmd, text } => self
                .runner
                .run(cmd)
                .await
                .is_ok_and(|o| o.success() && o.stdout.contains(text.as_str())),
            Probe::Fails { cmd } => !self.runner.run(cmd).await.is_ok_and(|o| o.success()),
        }
    }

    async fn run_step(&mut self, step: &Step, progress: &Progress) -> anyhow::Result<()> {
        let deadline = step.retry().map(|d| Instant::now() + d);
        loop {
            match self.run_actions(step).await {
                Ok(()) => return Ok(()),
                Err(e) => match deadline {
                    Some(d) if Instant::now() + self.retry_pause < d => {
                        progress.detail(&format!("retrying in {}s", self.retry_pause.as_secs()));
                        tokio::time::sleep(self.retry_pause).await;
                    }
                    _ => return Err(e),
                },
            }
        }
    }

    async fn run_actions(&mut self, step: &Step) -> anyhow::Result<()> {
        for action in &step.actions {
            match action {
                Action::Write { path, contents } => state::write_mode(path, contents.as_bytes(), 0o600)?,
                Action::Private { path } => state::set_mode(path, 0o600)
                    .with_context(|| format!("{} was not written by the step", path.display()))?,
                Action::Run { cmd } => {
                    self.run_cmd(cmd).await?;
                }
                Action::RunCapture { cmd, var, pattern } => {
                    let out = self.run_cmd(cmd).await?;
                    let re = regex::Regex::new(pattern).map_err(|e| anyhow!("{pattern}: {e}"))?;
                    let value = re
                        .captures(&out)
                        .and_then(|c| c.get(1))
                        .ok_or_else(|| anyhow!("`{}` printed no {var}", self.redactor.redact(&cmd.shell_line())))?;
                    self.vars.insert(var.clone(), value.as_str().to_owned());
                }
                Action::Apply { what, manifests } => {
                    let mut manifests = manifests.clone();
                    for (k, v) in &self.vars {
                        manifests = manifests.replace(&format!("{{{{{k}}}}}"), v);
                    }
                    let manifests = &manifests;
                    let client = self.client().await?;
                    // Objects a chart's admission webhook validates (MetalLB's pool right after
                    // MetalLB) are applied again until the webhook answers.
                    crate::kube::apply_waiting_for_webhooks(&client, manifests, Duration::from_secs(120))
                        .await
                        .with_context(|| format!("server-side apply of {what}"))?;
                    // ConfigMaps generated with a hash suffix by earlier applies are replaced,
                    // not updated: the superseded ones go.
                    crate::kube::prune_generated_configmaps(&client, manifests)
                        .await
                        .with_context(|| format!("pruning the ConfigMaps {what} replaced"))?;
                }
                Action::WaitRollout {
                    kind,
                    namespace,
                    name,
                    timeout_secs,
                } => {
                    let client = self.client().await?;
                    crate::kube::wait_rollout(&client, kind, namespace, name, Duration::from_secs(*timeout_secs))
                        .await?;
                }
                Action::GrafanaSecret { namespace, name } => {
                    let password = grafana_password(self.paths)?;
                    self.redactor.add(&password);
                    let client = self.client().await?;
                    let manifest = crate::kube::grafana_secret_manifest(namespace, name, &password);
                    crate::kube::apply(&client, &manifest)
                        .await
                        .with_context(|| format!("server-side apply of Secret {namespace}/{name}"))?;
                }
                Action::Cleanup { dir, keep_config } => cleanup(self.paths, dir, *keep_config)?,
            }
        }
        Ok(())
    }

    /// Runs `cmd`; its stdout when it succeeds, else an error with its (redacted) output.
    async fn run_cmd(&self, cmd: &Cmd) -> anyhow::Result<String> {
        let out = self
            .runner
            .run(cmd)
            .await
            .map_err(|e| anyhow!("{}: {e}", self.redactor.redact(&cmd.shell_line())))?;
        if out.success() {
            return Ok(out.stdout);
        }
        let code = out
            .code
            .map_or_else(|| "a signal".to_owned(), |c| format!("exit code {c}"));
        bail!(
            "$ {}\nfailed with {code}; its output (last 40 lines):\n{}",
            self.redactor.redact(&cmd.shell_line()),
            out.tail(&self.redactor, 40)
        )
    }
}

/// The Grafana admin password: read from the state directory, or generated (24 characters
/// from the OS's CSPRNG) and stored there with mode 0600.
pub fn grafana_password(paths: &Paths) -> anyhow::Result<String> {
    let file = paths.grafana_password();
    if let Ok(p) = std::fs::read_to_string(&file) {
        let p = p.trim().to_owned();
        if !p.is_empty() {
            return Ok(p);
        }
    }
    const ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789";
    let mut raw = [0u8; 24];
    getrandom::fill(&mut raw).map_err(|e| anyhow!("no randomness for the Grafana password: {e}"))?;
    let p: String = raw
        .iter()
        .map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()] as char)
        .collect();
    state::write_private(&file, p.as_bytes())?;
    Ok(p)
}

/// `down`'s last action: drop merged contexts, then the state directory (or all of it but
/// the configs with `keep_config`).
fn cleanup(paths: &Paths, dir: &Path, keep_config: bool) -> anyhow::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let st = State::load(paths).unwrap_or_default();
    if keep_config {
        let keep = [paths.kubeconfig(), paths.talosconfig(), paths.secrets()];
        for entry in std::fs::read_dir(dir)? {
            let p = entry?.path();
            if keep.contains(&p) {
                continue;
            }
            if p.is_dir() {
                std::fs::remove_dir_all(&p)?;
            } else {
                std::fs::remove_file(&p)?;
            }
        }
        // The merged contexts stay too, and so does the record of them for a later `down`.
        if !st.merged_contexts.is_empty() {
            State {
                merged_contexts: st.merged_contexts,
                ..State::default()
            }
            .save(paths)?;
        }
        return Ok(());
    }
    for m in &st.merged_contexts {
        crate::kubeconfig::remove_context(&m.file, &m.context)?;
    }
    std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))
}
