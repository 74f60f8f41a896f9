//! The scrape manager: per job, merges the target groups of its discovery providers, applies
//! `relabel_configs`, and keeps one scrape loop per target — starting loops for new targets and
//! stopping (with staleness markers) loops of targets that went away.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use super::appender::Leftover;
use super::scrape_loop::{LoopHandle, ScrapeSettings, StopMode};
use super::target::{self, JobDefaults, TargetError};
use crate::discovery::TargetGroup;
use crate::labels::Labels;
use crate::relabel::Rule;
use crate::remote_write::Outputs;
use crate::telemetry::server::TargetView;
use crate::telemetry::Metrics;

/// Series of stopped loops by target key, for the loops of the next generation.
pub type Inherited = std::collections::HashMap<String, Leftover>;

/// Running loops of jobs a reload keeps, by job name then target key: the next generation
/// takes them over as they run (schedule, series cache and all).
pub type Adopted = std::collections::HashMap<String, BTreeMap<String, LoopHandle>>;

/// Everything needed to run one job.
pub struct Job {
    /// Defaults for targets.
    pub defaults: JobDefaults,
    /// `relabel_configs`.
    pub relabel: Vec<Rule>,
    /// Scrape settings shared by the job's loops.
    pub settings: Arc<ScrapeSettings>,
    /// One receiver per discovery provider.
    pub providers: Vec<watch::Receiver<Vec<TargetGroup>>>,
    /// `target_limit` (0 = none).
    pub target_limit: u64,
}

#[derive(Default)]
struct JobState {
    loops: BTreeMap<String, LoopHandle>,
    not_scraped: Vec<(Labels, TargetError)>,
}

/// A job's name, its loops, and the views of its targets that are not scraped.
type JobEntry = (String, Arc<tokio::sync::Mutex<JobState>>, Arc<Mutex<Vec<TargetView>>>);

/// Running jobs; dropping it does not stop them, call [`Manager::stop`].
pub struct Manager {
    jobs: Vec<JobEntry>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    stop: watch::Sender<bool>,
}

impl Manager {
    /// Starts every job. `inherited` holds the series of the previous generation's loops by
    /// target key (a reload): a loop for the same target takes them over. `adopted` holds
    /// loops still running for jobs the reload did not change: they go on as they are.
    pub fn start(
        jobs: Vec<Job>,
        outputs: Arc<Outputs>,
        metrics: Arc<Metrics>,
        inherited: Inherited,
        mut adopted: Adopted,
    ) -> Self {
        let (stop, stop_rx) = watch::channel(false);
        let inherited = Arc::new(Mutex::new(inherited));
        let mut out = Self {
            jobs: Vec::new(),
            tasks: Vec::new(),
            stop,
        };
        for job in jobs {
            let state = Arc::new(tokio::sync::Mutex::new(JobState {
                loops: adopted.remove(&job.defaults.job).unwrap_or_default(),
                not_scraped: Vec::new(),
            }));
            let views = Arc::new(Mutex::new(Vec::new()));
            out.jobs.push((job.defaults.job.clone(), state.clone(), views.clone()));
            out.tasks.push(tokio::spawn(run_job(
                job,
                state,
                views,
                outputs.clone(),
                metrics.clone(),
                inherited.clone(),
                stop_rx.clone(),
            )));
        }
        out
    }

    /// Stops every loop without staleness markers (shutdown or reload), and returns each
    /// target's series for the next generation.
    pub async fn stop(self) -> Inherited {
        self.stop_keeping(&std::collections::HashSet::new()).await.0
    }

    /// Stops the job tasks; the loops of jobs in `keep` are handed back running, the others
    /// stop without staleness markers and hand back their series.
    pub async fn stop_keeping(self, keep: &std::collections::HashSet<String>) -> (Inherited, Adopted) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        // Signal every loop first, then wait: stopping is bounded by the slowest loop, not
        // the sum of them.
        let mut all = Vec::new();
        let mut adopted = Adopted::new();
        for (name, state, _) in self.jobs {
            let mut st = state.lock().await;
            let loops = std::mem::take(&mut st.loops);
            if keep.contains(&name) {
                adopted.insert(name, loops);
                continue;
            }
            for (_, l) in loops {
                l.signal(StopMode::Shutdown);
                all.push(l);
            }
        }
        let keys: Vec<String> = all.iter().map(|l| l.target.key()).collect();
        let left = futures::future::join_all(all.into_iter().map(LoopHandle::join)).await;
        let inherited = keys
            .into_iter()
            .zip(left)
            .filter_map(|(k, l)| l.map(|l| (k, l)))
            .collect();
        (inherited, adopted)
    }

    /// Stops adopted loops that will not run after all (a reload that failed to launch),
    /// handing back their series.
    pub async fn release(adopted: Adopted) -> Inherited {
        let all: Vec<LoopHandle> = adopted.into_values().flat_map(BTreeMap::into_values).collect();
        all.iter().for_each(|l| l.signal(StopMode::Shutdown));
        let keys: Vec<String> = all.iter().map(|l| l.target.key()).collect();
        let left = futures::future::join_all(all.into_iter().map(LoopHandle::join)).await;
        keys.into_iter()
            .zip(left)
            .filter_map(|(k, l)| l.map(|l| (k, l)))
            .collect()
    }

    /// Stops, with staleness markers, the loops of jobs not in `keep` (jobs removed by a
    /// reload: their series end now rather than after the receiver's lookback).
    pub async fn retire_jobs(&self, keep: &std::collections::HashSet<String>) {
        for (name, state, views) in &self.jobs {
            if keep.contains(name) {
                continue;
            }
            let mut st = state.lock().await;
            let loops: Vec<LoopHandle> = std::mem::take(&mut st.loops).into_values().collect();
            loops.iter().for_each(|l| l.signal(StopMode::TargetGone));
            futures::future::join_all(loops.into_iter().map(LoopHandle::join)).await;
            views.lock().unwrap_or_else(|p| p.into_inner()).clear();
        }
    }

    /// A closure that lists every target for the status page.
    pub fn status_source(&self) -> crate::telemetry::server::StatusSource {
        let jobs: Vec<_> = self.jobs.iter().map(|(_, s, v)| (s.clone(), v.clone())).collect();
        Arc::new(move || {
            let mut out = Vec::new();
            for (state, views) in &jobs {
                // Live loops: read their status; the job task keeps `views` for the static part.
                if let Ok(st) = state.try_lock() {
                    for l in st.loops.values() {
                        let s = l.status.lock().unwrap_or_else(|p| p.into_inner()).clone();
                        out.push(TargetView {
                            job: l.target.labels.get_or_empty("job").to_owned(),
                            url: l.target.url.clone(),
                            labels: l.target.labels.as_slice().to_vec(),
                            discovered_labels: l.target.discovered.as_slice().to_vec(),
                            health: s.health.to_owned(),
                            last_scrape_ms: s.last_scrape_ms,
                            last_duration_seconds: s.last_duration.as_secs_f64(),
                            last_samples: s.last_samples,
                            last_error: s.last_error,
                        });
                    }
                }
                out.extend(views.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned());
            }
            out
        })
    }
}

async fn run_job(
    job: Job,
    state: Arc<tokio::sync::Mutex<JobState>>,
    views: Arc<Mutex<Vec<TargetView>>>,
    outputs: Arc<Outputs>,
    metrics: Arc<Metrics>,
    inherited: Arc<Mutex<Inherited>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut providers = job.providers;
    // Whether each provider has published its first full list (static groups, a file read,
    // a listed pod cache). Once all have, the targets of the previous generation that none of
    // them has any more are gone, and their series end.
    let mut synced = vec![false; providers.len()];
    let mut reaped = false;
    // A provider that cannot list (an unreachable API server, a forbidden namespace) must not
    // hold that up for ever: after this, what was published is taken as complete.
    let sync_deadline = tokio::time::Instant::now() + SYNC_WAIT;
    // Loops a reload handed over run before the providers have listed their targets.
    let handed_over = !state.lock().await.loops.is_empty();
    loop {
        for (p, s) in providers.iter().zip(synced.iter_mut()) {
            *s |= p.has_changed().unwrap_or(true);
        }
        let groups: Vec<TargetGroup> = providers
            .iter_mut()
            .flat_map(|p| p.borrow_and_update().clone())
            .collect();
        let (mut targets, not_scraped) = target::from_groups(&groups, &job.defaults, &job.relabel);
        let mut invalid_limit = Vec::new();
        if job.target_limit > 0 && targets.len() as u64 > job.target_limit {
            tracing::warn!(job = %job.defaults.job, targets = targets.len(), limit = job.target_limit, "target_limit exceeded; scraping none of the job's targets.");
            for t in targets.drain(..) {
                invalid_limit.push((
                    t.discovered,
                    TargetError::Invalid(format!("target_limit exceeded ({})", job.target_limit)),
                ));
            }
        }
        {
            let mut st = state.lock().await;
            let wanted: BTreeMap<String, target::Target> = targets.into_iter().map(|t| (t.key(), t)).collect();
            // Until every provider has published, a handed-over loop missing from the list may
            // only be not listed yet; otherwise a target missing from the list is gone at once.
            let complete = synced.iter().all(|s| *s) || tokio::time::Instant::now() >= sync_deadline;
            let gone: Vec<String> = if complete || !handed_over {
                st.loops.keys().filter(|k| !wanted.contains_key(*k)).cloned().collect()
            } else {
                Vec::new()
            };
            for k in gone {
                if let Some(l) = st.loops.remove(&k) {
                    l.stop(StopMode::TargetGone).await;
                }
            }
            for (k, t) in wanted {
                st.loops.entry(k).or_insert_with_key(|k| {
                    let left = inherited.lock().unwrap_or_else(|p| p.into_inner()).remove(k);
                    LoopHandle::start(t, job.settings.clone(), outputs.clone(), metrics.clone(), left)
                });
            }
            if !reaped && complete {
                reaped = true;
                // Targets of this job that the reload removed (from its static configs, files
                // or pods): their series end now, as when a target goes away while running.
                let gone: Vec<Leftover> = {
                    let mut inh = inherited.lock().unwrap_or_else(|p| p.into_inner());
                    let keys: Vec<String> = inh
                        .iter()
                        .filter(|(_, l)| l.job == job.defaults.job)
                        .map(|(k, _)| k.clone())
                        .collect();
                    keys.into_iter().filter_map(|k| inh.remove(&k)).collect()
                };
                let ts = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as i64)
                    .unwrap_or(0);
                for left in gone {
                    tracing::debug!(job = %job.defaults.job, "Target removed by the reload; ending its series.");
                    left.write_stale(&outputs, &metrics, ts);
                }
            }
            st.not_scraped = not_scraped.into_iter().chain(invalid_limit).collect();
            let dropped = st
                .not_scraped
                .iter()
                .filter(|(_, e)| *e == TargetError::Dropped)
                .count();
            metrics.set_targets(
                &job.defaults.job,
                st.loops.len(),
                dropped,
                st.not_scraped.len() - dropped,
            );
            let mut v = views.lock().unwrap_or_else(|p| p.into_inner());
            *v = st
                .not_scraped
                .iter()
                .filter(|(_, e)| *e != TargetError::Dropped)
                .map(|(l, e)| TargetView {
                    job: job.defaults.job.clone(),
                    url: l.get_or_empty(crate::labels::ADDRESS).to_owned(),
                    labels: Vec::new(),
                    discovered_labels: l.as_slice().to_vec(),
                    health: "invalid".to_owned(),
                    last_scrape_ms: 0,
                    last_duration_seconds: 0.0,
                    last_samples: 0,
                    last_error: e.to_string(),
                })
                .collect();
        }
        // Wait for any provider to change, or stop.
        let changed = async {
            if providers.is_empty() {
                return std::future::pending::<(bool, usize)>().await;
            }
            let futs = providers.iter_mut().map(|p| Box::pin(p.changed()));
            let (r, index, _) = futures::future::select_all(futs).await;
            (r.is_ok(), index)
        };
        tokio::select! {
            (ok, index) = changed => {
                // `changed` marked the new list seen: note here that this provider published.
                if let Some(s) = synced.get_mut(index) {
                    *s = true;
                }
                if !ok {
                    // A provider ended (its task stopped); keep its last groups out and go on.
                    let mut keep = providers.iter().map(|p| p.has_changed().is_ok());
                    synced.retain(|_| keep.next().unwrap_or(false));
                    providers.retain(|p| p.has_changed().is_ok());
                }
            }
            () = tokio::time::sleep_until(sync_deadline), if !reaped => {}
            _ = stop.changed() => return,
        }
    }
}

/// How long a job waits for all its providers' first lists before taking what it has as
/// complete (ending removed targets, stopping handed-over loops no provider lists).
const SYNC_WAIT: std::time::Duration = std::time::Duration::from_secs(30);
