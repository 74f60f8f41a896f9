//! Promtail's pipeline stages, compiled once per job and run per entry.
//!
//! An [`Entry`] carries its stream labels (shared, copied only when a stage changes them),
//! the values stages extracted, structured metadata, the tenant and the file offset its first
//! line started at. [`Pipeline`] is one file's instance: the stateless stages are shared by the
//! job ([`Compiled`]), `multiline` keeps its per-file buffer here, so [`Pipeline::held_from`]
//! tells the tailer the offset its position must not pass. `cri` and `docker` parse in the
//! tailer (they merge partial lines, which also holds bytes back); here they only set `stream`.
//!
//! Differences from Promtail (documented in README): `json` expressions are paths (`a.b[0]`,
//! `"x-y"`, `a."b.c"`), not full JMESPath; `template` knows `.Value`, `.Entry`, extracted names
//! and the functions `ToLower`, `ToUpper`, `Replace`, `Trim`, `TrimPrefix`, `TrimSuffix`,
//! `TrimSpace`; a `limit` without `drop` waits (slowing reading) as Promtail's does.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use config::logs::{MetricStage, Stage};
use regex::Regex;

/// Stream labels, shared between the entries of a file until a stage changes them.
pub type Labels = Arc<BTreeMap<String, String>>;

/// One log entry on its way through the pipeline.
#[derive(Clone, Debug)]
pub struct Entry {
    /// Nanoseconds since the epoch.
    pub ts_ns: i64,
    /// The line.
    pub line: String,
    /// Stream labels.
    pub labels: Labels,
    /// Values extracted by stages.
    pub extracted: HashMap<String, String>,
    /// Structured metadata (name, value).
    pub metadata: Vec<(String, String)>,
    /// Tenant (`X-Scope-OrgID`) set by a `tenant` stage.
    pub tenant: Option<String>,
    /// File offset of the entry's first line.
    pub start: u64,
}

impl Entry {
    fn set_label(&mut self, name: &str, value: &str) {
        if self.labels.get(name).map(String::as_str) != Some(value) {
            Arc::make_mut(&mut self.labels).insert(name.to_owned(), value.to_owned());
        }
    }
}

/// Why a pipeline dropped an entry (counted by the tailer).
pub type DropReason = String;

/// The metric values of `metrics` stages, rendered on the agent's `/metrics`.
#[derive(Debug, Default)]
pub struct StageMetrics {
    inner: Mutex<BTreeMap<String, StoredMetric>>,
}

#[derive(Debug)]
struct StoredMetric {
    kind: String,
    help: String,
    buckets: Vec<f64>,
    max_idle: Duration,
    /// Label set (rendered) → (value or bucket counts + sum + count, last update).
    series: BTreeMap<String, (Vec<f64>, Instant)>,
}

impl StageMetrics {
    fn update(
        &self,
        name: &str,
        m: &MetricStage,
        labels: &BTreeMap<String, String>,
        f: impl FnOnce(&mut Vec<f64>, &[f64]),
    ) {
        let prefix = m.prefix.as_deref().unwrap_or("promtail_custom_");
        let full = format!("{prefix}{name}");
        let mut all = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let stored = all.entry(full).or_insert_with(|| StoredMetric {
            kind: m.kind.to_ascii_lowercase(),
            help: m.description.clone().unwrap_or_default(),
            buckets: m.config.buckets.clone(),
            max_idle: m.max_idle_duration.map_or(Duration::from_secs(300), |d| d.get()),
            series: BTreeMap::new(),
        });
        if !stored.kind.eq_ignore_ascii_case(&m.kind) {
            // Another stage defined this name with another type (refused by the config
            // checks): its updates are ignored rather than mixed.
            return;
        }
        let key = render_labels(labels);
        let width = if stored.kind == "histogram" {
            stored.buckets.len() + 2
        } else {
            1
        };
        let buckets = stored.buckets.clone();
        let slot = stored
            .series
            .entry(key)
            .or_insert_with(|| (vec![0.0; width], Instant::now()));
        f(&mut slot.0, &buckets);
        slot.1 = Instant::now();
    }

    /// Text exposition of every metric (idle series are removed first).
    pub fn render(&self) -> String {
        let mut all = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = String::new();
        for (name, m) in all.iter_mut() {
            let idle = m.max_idle;
            m.series.retain(|_, (_, at)| at.elapsed() < idle);
            let kind = match m.kind.as_str() {
                "counter" => "counter",
                "gauge" => "gauge",
                _ => "histogram",
            };
            let base = if kind == "counter" {
                name.strip_suffix("_total").unwrap_or(name)
            } else {
                name
            };
            out.push_str(&format!("# HELP {base} {}\n# TYPE {base} {kind}\n", m.help));
            for (labels, (v, _)) in &m.series {
                let inner = labels.trim_start_matches('{').trim_end_matches('}');
                match kind {
                    "counter" => out.push_str(&format!("{base}_total{labels} {}\n", v[0])),
                    "gauge" => out.push_str(&format!("{base}{labels} {}\n", v[0])),
                    _ => {
                        let sep = if inner.is_empty() { "" } else { "," };
                        let mut cum = 0.0;
                        for (i, b) in m.buckets.iter().enumerate() {
                            cum += v[i];
                            out.push_str(&format!("{base}_bucket{{{inner}{sep}le=\"{b}\"}} {cum}\n"));
                        }
                        let n = v[m.buckets.len() + 1];
                        out.push_str(&format!("{base}_bucket{{{inner}{sep}le=\"+Inf\"}} {n}\n"));
                        out.push_str(&format!("{base}_sum{labels} {}\n", v[m.buckets.len()]));
                        out.push_str(&format!("{base}_count{labels} {n}\n"));
                    }
                }
            }
        }
        out
    }
}

/// `{a="b", c="d"}` as Loki's stream selector syntax writes it (sorted, Go-quoted values).
pub fn render_labels(labels: &BTreeMap<String, String>) -> String {
    let mut s = String::with_capacity(64);
    s.push('{');
    for (i, (k, v)) in labels.iter().enumerate() {
        if i > 0 {
            s.push_str(", ");
        }
        s.push_str(k);
        s.push_str("=\"");
        for c in v.chars() {
            match c {
                '"' => s.push_str("\\\""),
                '\\' => s.push_str("\\\\"),
                '\n' => s.push_str("\\n"),
                c => s.push(c),
            }
        }
        s.push('"');
    }
    s.push('}');
    s
}

/// A stage ready to run.
enum Step {
    /// `cri` / `docker`: parsing happens in the tailer; here the `stream` label is set.
    Format,
    Json {
        paths: Vec<(String, Vec<PathPart>)>,
        source: Option<String>,
        drop_malformed: bool,
    },
    Regex {
        re: Regex,
        source: Option<String>,
    },
    Logfmt {
        mapping: Vec<(String, String)>,
        source: Option<String>,
    },
    Labels(Vec<(String, String)>),
    Metadata(Vec<(String, String)>),
    Static(Vec<(String, String)>),
    LabelDrop(Vec<String>),
    LabelAllow(Vec<String>),
    Timestamp {
        source: String,
        formats: Vec<TimeFormat>,
        skip_on_failure: bool,
    },
    Output(String),
    Match {
        selector: config::logql::Selector,
        drop: Option<String>,
        stages: Vec<Step>,
    },
    Drop {
        sources: Vec<String>,
        separator: String,
        expression: Option<Regex>,
        value: Option<String>,
        older_than: Option<Duration>,
        longer_than: Option<usize>,
        reason: String,
    },
    Limit(Arc<Limiter>),
    /// Index of this file's multiline state.
    Multiline(usize),
    Replace {
        re: Regex,
        source: Option<String>,
        template: Template,
    },
    Template {
        source: String,
        template: Template,
    },
    Tenant {
        source: Option<String>,
        label: Option<String>,
        value: Option<String>,
    },
    Metrics(Vec<(String, MetricStage)>),
}

/// A job's stages, compiled; shared by the files of the job.
pub struct Compiled {
    steps: Vec<Step>,
    multiline: Vec<MultilineSpec>,
    metrics: Arc<StageMetrics>,
    /// The job parses CRI/Docker in the tailer (a `cri` or `docker` stage).
    pub parses_format: bool,
    /// Set when the tailer stops: a waiting `limit` stage lets its entry through at once.
    pub stop: Arc<std::sync::atomic::AtomicBool>,
}

struct MultilineSpec {
    firstline: Regex,
    max_wait: Duration,
    max_lines: usize,
}

/// A pipeline that failed to compile (check-config catches these first).
#[derive(Debug, thiserror::Error)]
#[error("pipeline stage {index} ({stage}): {message}")]
pub struct StageError {
    index: usize,
    stage: &'static str,
    message: String,
    /// Where in the config, under `pipeline_stages`: `[1].match.stages[0].json`.
    path: String,
}

impl StageError {
    /// The stage's place under its job's `pipeline_stages` (`[1].match.stages[0].json`).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// What is wrong.
    pub fn message(&self) -> &str {
        &self.message
    }
}

fn stage_name(s: &Stage) -> &'static str {
    match s {
        Stage::Cri(_) => "cri",
        Stage::Docker(_) => "docker",
        Stage::Json(_) => "json",
        Stage::Regex(_) => "regex",
        Stage::Logfmt(_) => "logfmt",
        Stage::Labels(_) => "labels",
        Stage::StructuredMetadata(_) => "structured_metadata",
        Stage::StaticLabels(_) => "static_labels",
        Stage::Labeldrop(_) => "labeldrop",
        Stage::Labelallow(_) => "labelallow",
        Stage::Timestamp(_) => "timestamp",
        Stage::Output(_) => "output",
        Stage::Match(_) => "match",
        Stage::Drop(_) => "drop",
        Stage::Limit(_) => "limit",
        Stage::Multiline(_) => "multiline",
        Stage::Replace(_) => "replace",
        Stage::Template(_) => "template",
        Stage::Tenant(_) => "tenant",
        Stage::Metrics(_) => "metrics",
    }
}

impl Compiled {
    /// Compiles a job's stages.
    pub fn new(stages: &[Stage], metrics: Arc<StageMetrics>) -> Result<Compiled, StageError> {
        let mut multiline = Vec::new();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let steps = compile(stages, &mut multiline, &stop)?;
        let parses_format = stages.iter().any(|s| matches!(s, Stage::Cri(_) | Stage::Docker(_)));
        Ok(Compiled {
            steps,
            multiline,
            metrics,
            parses_format,
            stop,
        })
    }

    /// Whether the pipeline does nothing (entries go out as read).
    pub fn is_empty(&self) -> bool {
        self.steps.iter().all(|s| matches!(s, Step::Format))
    }
}

fn compile(
    stages: &[Stage],
    multiline: &mut Vec<MultilineSpec>,
    stop: &Arc<std::sync::atomic::AtomicBool>,
) -> Result<Vec<Step>, StageError> {
    let mut steps = Vec::new();
    for (index, st) in stages.iter().enumerate() {
        let err = |message: String| StageError {
            index,
            stage: stage_name(st),
            message,
            path: format!("[{index}].{}", stage_name(st)),
        };
        let re = |e: &str| Regex::new(e).map_err(|x| err(x.to_string()));
        let names = |m: &BTreeMap<String, Option<String>>| -> Vec<(String, String)> {
            m.iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        v.clone().filter(|v| !v.is_empty()).unwrap_or_else(|| k.clone()),
                    )
                })
                .collect()
        };
        steps.push(match st {
            Stage::Cri(_) | Stage::Docker(_) => Step::Format,
            Stage::Json(j) => Step::Json {
                paths: names(&j.expressions)
                    .into_iter()
                    .map(|(k, p)| parse_path(&p).map(|p| (k, p)).map_err(err))
                    .collect::<Result<_, _>>()?,
                source: j.source.clone(),
                drop_malformed: j.drop_malformed,
            },
            Stage::Regex(r) => Step::Regex {
                re: re(&r.expression)?,
                source: r.source.clone(),
            },
            Stage::Logfmt(l) => Step::Logfmt {
                mapping: names(&l.mapping),
                source: l.source.clone(),
            },
            Stage::Labels(m) => Step::Labels(names(m)),
            Stage::StructuredMetadata(m) => Step::Metadata(names(m)),
            Stage::StaticLabels(m) => Step::Static(m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()),
            Stage::Labeldrop(v) => Step::LabelDrop(v.clone()),
            Stage::Labelallow(v) => Step::LabelAllow(v.clone()),
            Stage::Timestamp(t) => {
                let mut formats = vec![TimeFormat::new(&t.format, t.location.as_deref()).map_err(err)?];
                for f in &t.fallback_formats {
                    formats.push(TimeFormat::new(f, t.location.as_deref()).map_err(err)?);
                }
                Step::Timestamp {
                    source: t.source.clone(),
                    formats,
                    skip_on_failure: t.action_on_failure.as_deref() == Some("skip"),
                }
            }
            Stage::Output(o) => Step::Output(o.source.clone()),
            Stage::Match(m) => Step::Match {
                selector: config::logql::Selector::parse(&m.selector).map_err(err)?,
                drop: (m.action.as_deref() == Some("drop")).then(|| {
                    m.drop_counter_reason
                        .clone()
                        .unwrap_or_else(|| "match_stage".to_owned())
                }),
                stages: compile(&m.stages, multiline, stop).map_err(|mut e| {
                    e.path = format!("[{index}].match.stages{}", e.path);
                    e
                })?,
            },
            Stage::Drop(d) => Step::Drop {
                sources: d.source.as_ref().map(|s| s.names()).unwrap_or_default(),
                separator: d.separator.clone().unwrap_or_else(|| ";".to_owned()),
                expression: d.expression.as_deref().map(re).transpose()?,
                value: d.value.clone(),
                older_than: d.older_than.map(|d| d.get()),
                longer_than: d.longer_than.map(|b| b.0 as usize),
                reason: d.drop_counter_reason.clone().unwrap_or_else(|| "drop_stage".to_owned()),
            },
            Stage::Limit(l) => Step::Limit(Arc::new(Limiter::new(l, stop.clone()))),
            Stage::Multiline(m) => {
                multiline.push(MultilineSpec {
                    firstline: re(&m.firstline)?,
                    max_wait: m.max_wait_time.map_or(Duration::from_secs(3), |d| d.get()),
                    max_lines: m.max_lines.unwrap_or(128).max(1),
                });
                Step::Multiline(multiline.len() - 1)
            }
            Stage::Replace(r) => Step::Replace {
                re: re(&r.expression)?,
                source: r.source.clone(),
                template: Template::parse(&r.replace).map_err(err)?,
            },
            Stage::Template(t) => Step::Template {
                source: t.source.clone(),
                template: Template::parse(&t.template).map_err(err)?,
            },
            Stage::Tenant(t) => Step::Tenant {
                source: t.source.clone(),
                label: t.label.clone(),
                value: t.value.clone(),
            },
            Stage::Metrics(m) => Step::Metrics(m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()),
        });
    }
    Ok(steps)
}

/// What one run of the pipeline produced.
#[derive(Debug, Default)]
pub struct Output {
    /// Entries to send, in order.
    pub entries: Vec<Entry>,
    /// Entries dropped, with the reason.
    pub dropped: Vec<DropReason>,
}

/// A file's instance of its job's pipeline.
pub struct Pipeline {
    job: Arc<Compiled>,
    st: State,
}

/// The per-file state of a pipeline.
struct State {
    /// Per multiline stage, per stream (label set, as Promtail keys it): the entry being
    /// built, its line count and when it started.
    held: Vec<Vec<(Entry, usize, Instant)>>,
    /// The last time a `timestamp` stage parsed (for `action_on_failure: fudge`).
    last_ts: Option<i64>,
}

impl Pipeline {
    /// A fresh instance for one file.
    pub fn new(job: Arc<Compiled>) -> Pipeline {
        let held = job.multiline.iter().map(|_| Vec::new()).collect();
        Pipeline {
            job,
            st: State { held, last_ts: None },
        }
    }

    /// Runs `entry` through the stages, appending what comes out to `out`.
    pub fn run(&mut self, entry: Entry, out: &mut Output) {
        let job = self.job.clone();
        run_steps(&job, &job.steps, 0, entry, &mut self.st, out);
    }

    /// Flushes multiline entries older than their `max_wait_time` (all with `force`).
    pub fn flush(&mut self, force: bool, out: &mut Output) {
        let job = self.job.clone();
        // Flushed entries continue after their multiline stage, wherever it is nested.
        for i in 0..self.st.held.len() {
            let max_wait = job.multiline[i].max_wait;
            let (mut due, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.st.held[i])
                .into_iter()
                .partition(|(_, _, at)| force || at.elapsed() >= max_wait);
            self.st.held[i] = keep;
            // In file order across streams.
            due.sort_by_key(|(e, _, _)| e.start);
            for (e, _, _) in due {
                continue_after_multiline(&job, &job.steps, i, e, &mut self.st, out);
            }
        }
    }

    /// The file offset from which lines are still held by a multiline stage.
    pub fn held_from(&self) -> Option<u64> {
        self.st.held.iter().flatten().map(|(e, _, _)| e.start).min()
    }

    /// The earliest time a held entry must be flushed.
    pub fn next_flush(&self) -> Option<Instant> {
        self.st
            .held
            .iter()
            .enumerate()
            .flat_map(|(i, h)| h.iter().map(move |(_, _, at)| *at + self.job.multiline[i].max_wait))
            .min()
    }
}

/// Runs the entry that a multiline stage (index `ml`) released through the steps after it.
fn continue_after_multiline(
    job: &Compiled,
    steps: &[Step],
    ml: usize,
    entry: Entry,
    st: &mut State,
    out: &mut Output,
) -> bool {
    for (i, s) in steps.iter().enumerate() {
        match s {
            Step::Multiline(k) if *k == ml => {
                run_steps(job, steps, i + 1, entry, st, out);
                return true;
            }
            Step::Match { stages, .. } if continue_after_multiline(job, stages, ml, entry.clone(), st, out) => {
                return true;
            }
            _ => {}
        }
    }
    false
}

fn lookup<'e>(e: &'e Entry, source: Option<&str>) -> Option<&'e str> {
    match source {
        None => Some(e.line.as_str()),
        Some(s) => e.extracted.get(s).map(String::as_str),
    }
}

fn run_steps(job: &Compiled, steps: &[Step], from: usize, mut e: Entry, st: &mut State, out: &mut Output) {
    for (i, step) in steps.iter().enumerate().skip(from) {
        match step {
            Step::Format => {}
            Step::Json {
                paths,
                source,
                drop_malformed,
            } => {
                let Some(text) = lookup(&e, source.as_deref()) else {
                    continue;
                };
                match serde_json::from_str::<serde_json::Value>(text) {
                    Ok(v) => {
                        for (name, path) in paths {
                            if let Some(found) = walk(&v, path) {
                                let s = match found {
                                    serde_json::Value::String(s) => s.clone(),
                                    serde_json::Value::Null => continue,
                                    other => other.to_string(),
                                };
                                e.extracted.insert(name.clone(), s);
                            }
                        }
                    }
                    Err(_) if *drop_malformed => {
                        out.dropped.push("malformed_json".to_owned());
                        return;
                    }
                    Err(_) => {}
                }
            }
            Step::Regex { re, source } => {
                let Some(text) = lookup(&e, source.as_deref()) else {
                    continue;
                };
                if let Some(c) = re.captures(text) {
                    let found: Vec<(String, String)> = re
                        .capture_names()
                        .enumerate()
                        .filter_map(|(k, n)| Some((n?.to_owned(), c.get(k)?.as_str().to_owned())))
                        .collect();
                    e.extracted.extend(found);
                }
            }
            Step::Logfmt { mapping, source } => {
                let Some(text) = lookup(&e, source.as_deref()) else {
                    continue;
                };
                let pairs = logfmt(text);
                for (name, key) in mapping {
                    if let Some((_, v)) = pairs.iter().find(|(k, _)| k == key) {
                        e.extracted.insert(name.clone(), v.clone());
                    }
                }
            }
            Step::Labels(m) => {
                for (name, source) in m {
                    if let Some(v) = e.extracted.get(source).cloned() {
                        if !v.is_empty() {
                            e.set_label(name, &v);
                        }
                    }
                }
            }
            Step::Metadata(m) => {
                for (name, source) in m {
                    if let Some(v) = e
                        .extracted
                        .get(source)
                        .cloned()
                        .or_else(|| e.labels.get(source).cloned())
                    {
                        e.metadata.retain(|(n, _)| n != name);
                        e.metadata.push((name.clone(), v));
                    }
                }
            }
            Step::Static(m) => {
                for (k, v) in m {
                    e.set_label(k, v);
                }
            }
            Step::LabelDrop(names) => {
                if names.iter().any(|n| e.labels.contains_key(n)) {
                    let l = Arc::make_mut(&mut e.labels);
                    names.iter().for_each(|n| {
                        l.remove(n);
                    });
                }
            }
            Step::LabelAllow(names) => {
                if e.labels.keys().any(|k| !names.contains(k)) {
                    Arc::make_mut(&mut e.labels).retain(|k, _| names.contains(k));
                }
            }
            Step::Timestamp {
                source,
                formats,
                skip_on_failure,
            } => {
                if let Some(v) = e.extracted.get(source) {
                    match formats.iter().find_map(|f| f.parse(v)) {
                        Some(ts) => {
                            e.ts_ns = ts;
                            st.last_ts = Some(ts);
                        }
                        // `fudge`: 1ns after the last parsed time, keeping the order; `skip`
                        // (or nothing parsed yet): the read time stays.
                        None if !skip_on_failure => {
                            if let Some(last) = st.last_ts {
                                e.ts_ns = last + 1;
                                st.last_ts = Some(last + 1);
                            }
                        }
                        None => {}
                    }
                }
            }
            Step::Output(source) => {
                if let Some(v) = e.extracted.get(source) {
                    e.line = v.clone();
                }
            }
            Step::Match { selector, drop, stages } => {
                let labels = e.labels.clone();
                if selector.matches(|n| labels.get(n).map(String::as_str), &e.line) {
                    if let Some(reason) = drop {
                        out.dropped.push(reason.clone());
                        return;
                    }
                    let mut sub = Output::default();
                    run_steps(job, stages, 0, e, st, &mut sub);
                    out.dropped.extend(sub.dropped);
                    // Entries that left the nested stages continue after this one.
                    for x in sub.entries {
                        run_steps(job, steps, i + 1, x, st, out);
                    }
                    return;
                }
            }
            Step::Drop {
                sources,
                separator,
                expression,
                value,
                older_than,
                longer_than,
                reason,
            } => {
                let mut hit = true;
                let subject: Option<String> = if sources.is_empty() {
                    Some(e.line.clone())
                } else {
                    let vals: Option<Vec<&str>> =
                        sources.iter().map(|s| e.extracted.get(s).map(String::as_str)).collect();
                    vals.map(|v| v.join(separator))
                };
                if !sources.is_empty() && subject.is_none() {
                    hit = false;
                }
                if let (Some(re), Some(s)) = (expression, &subject) {
                    hit &= re.is_match(s);
                }
                if let (Some(v), Some(s)) = (value, &subject) {
                    hit &= v == s;
                }
                if let Some(age) = older_than {
                    let now = now_ns();
                    hit &= now.saturating_sub(e.ts_ns) > age.as_nanos() as i64;
                }
                if let Some(n) = longer_than {
                    hit &= e.line.len() > *n;
                }
                if hit {
                    out.dropped.push(reason.clone());
                    return;
                }
            }
            Step::Limit(l) => {
                if !l.admit(&e) {
                    out.dropped.push("limit".to_owned());
                    return;
                }
            }
            Step::Multiline(k) => {
                let spec = &job.multiline[*k];
                let first = spec.firstline.is_match(&e.line);
                let streams = &mut st.held[*k];
                let at = streams
                    .iter()
                    .position(|(h, _, _)| Arc::ptr_eq(&h.labels, &e.labels) || h.labels == e.labels);
                match at {
                    Some(j) if !first && streams[j].1 < spec.max_lines => {
                        let (buf, lines, _) = &mut streams[j];
                        buf.line.push('\n');
                        buf.line.push_str(&e.line);
                        *lines += 1;
                        return;
                    }
                    Some(j) => {
                        let (prev, _, _) = std::mem::replace(&mut streams[j], (e, 1, Instant::now()));
                        run_steps(job, steps, i + 1, prev, st, out);
                        return;
                    }
                    None => {
                        streams.push((e, 1, Instant::now()));
                        return;
                    }
                }
            }
            Step::Replace { re, source, template } => {
                let Some(text) = lookup(&e, source.as_deref()).map(str::to_owned) else {
                    continue;
                };
                let replaced = replace(re, &text, template, &e);
                match source {
                    None => e.line = replaced,
                    Some(s) => {
                        e.extracted.insert(s.clone(), replaced);
                    }
                }
            }
            Step::Template { source, template } => {
                let value = e.extracted.get(source).cloned().unwrap_or_default();
                let v = template.render(&e, &value);
                e.extracted.insert(source.clone(), v);
            }
            Step::Tenant { source, label, value } => {
                let t = if let Some(v) = value {
                    Some(v.clone())
                } else if let Some(s) = source {
                    e.extracted.get(s).cloned()
                } else {
                    label.as_ref().and_then(|l| e.labels.get(l).cloned())
                };
                if let Some(t) = t.filter(|t| !t.is_empty()) {
                    e.tenant = Some(t);
                }
            }
            Step::Metrics(ms) => {
                for (name, m) in ms {
                    metric(&job.metrics, name, m, &e);
                }
            }
        }
    }
    out.entries.push(e);
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

fn metric(store: &StageMetrics, name: &str, m: &MetricStage, e: &Entry) {
    let kind = m.kind.to_ascii_lowercase();
    let source = m.source.as_deref().unwrap_or(name);
    let value = e.extracted.get(source);
    if m.config.match_all != Some(true) || kind != "counter" {
        let Some(v) = value else { return };
        if m.config.value.as_ref().is_some_and(|want| want != v) {
            return;
        }
    }
    let num = |s: Option<&String>| s.and_then(|v| v.trim().parse::<f64>().ok());
    let action = m.config.action.as_deref().unwrap_or("inc");
    match kind.as_str() {
        "counter" => {
            let delta = if m.config.match_all == Some(true) {
                if m.config.count_entry_bytes == Some(true) {
                    e.line.len() as f64
                } else {
                    1.0
                }
            } else if action == "add" {
                match num(value) {
                    Some(n) if n >= 0.0 => n,
                    _ => return,
                }
            } else {
                1.0
            };
            store.update(name, m, &e.labels, |v, _| v[0] += delta);
        }
        "gauge" => {
            let n = num(value);
            // (set?, amount)
            let (set, amount) = match (action, n) {
                ("inc", _) => (false, 1.0),
                ("dec", _) => (false, -1.0),
                ("set", Some(n)) => (true, n),
                ("add", Some(n)) => (false, n),
                ("sub", Some(n)) => (false, -n),
                _ => return,
            };
            store.update(name, m, &e.labels, |v, _| {
                if set {
                    v[0] = amount;
                } else {
                    v[0] += amount;
                }
            });
        }
        _ => {
            let Some(n) = num(value) else { return };
            store.update(name, m, &e.labels, |v, buckets| {
                if let Some(i) = buckets.iter().position(|b| n <= *b) {
                    v[i] += 1.0;
                }
                let k = buckets.len();
                v[k] += n;
                v[k + 1] += 1.0;
            });
        }
    }
}

/// A part of a `json` path.
#[derive(Clone, Debug, PartialEq)]
enum PathPart {
    Key(String),
    Index(usize),
}

/// `a.b[0]."x-y"` → parts.
fn parse_path(p: &str) -> Result<Vec<PathPart>, String> {
    let mut parts = Vec::new();
    let mut chars = p.chars().peekable();
    while let Some(&c) = chars.peek() {
        match c {
            '.' => {
                chars.next();
            }
            '"' => {
                chars.next();
                let mut k = String::new();
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some(c) => k.push(c),
                        None => return Err(format!("unclosed quote in json expression {p:?}")),
                    }
                }
                parts.push(PathPart::Key(k));
            }
            '[' => {
                chars.next();
                let mut n = String::new();
                loop {
                    match chars.next() {
                        Some(']') => break,
                        Some(c) => n.push(c),
                        None => return Err(format!("unclosed [ in json expression {p:?}")),
                    }
                }
                let n = n.trim().parse().map_err(|_| {
                    format!("json expression {p:?}: only [<index>] is supported (not JMESPath filters)")
                })?;
                parts.push(PathPart::Index(n));
            }
            _ => {
                let mut k = String::new();
                while let Some(&c) = chars.peek() {
                    if c == '.' || c == '[' {
                        break;
                    }
                    k.push(c);
                    chars.next();
                }
                if k.contains(['|', '*', '?', '(', '@']) {
                    return Err(format!(
                        "json expression {p:?}: only paths (a.b[0]) are supported, not JMESPath functions or projections"
                    ));
                }
                parts.push(PathPart::Key(k));
            }
        }
    }
    if parts.is_empty() {
        return Err("empty json expression".to_owned());
    }
    Ok(parts)
}

fn walk<'v>(mut v: &'v serde_json::Value, path: &[PathPart]) -> Option<&'v serde_json::Value> {
    for p in path {
        v = match p {
            PathPart::Key(k) => v.get(k.as_str())?,
            PathPart::Index(i) => v.get(*i)?,
        };
    }
    Some(v)
}

/// logfmt pairs (`key=value key="quoted value" flag`).
fn logfmt(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        while i < b.len() && b[i] == b' ' {
            i += 1;
        }
        let ks = i;
        while i < b.len() && b[i] != b'=' && b[i] != b' ' {
            i += 1;
        }
        let key = &s[ks..i];
        if key.is_empty() {
            i += 1;
            continue;
        }
        if i >= b.len() || b[i] == b' ' {
            out.push((key.to_owned(), String::new()));
            continue;
        }
        i += 1;
        let value = if i < b.len() && b[i] == b'"' {
            i += 1;
            let mut v = String::new();
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' && i + 1 < b.len() {
                    i += 1;
                }
                let ch = s[i..].chars().next().unwrap_or(' ');
                v.push(ch);
                i += ch.len_utf8();
            }
            i += 1;
            v
        } else {
            let vs = i;
            while i < b.len() && b[i] != b' ' {
                i += 1;
            }
            s[vs..i].to_owned()
        };
        out.push((key.to_owned(), value));
    }
    out
}

/// A token bucket (`limit` stage), optionally one per value of a label.
pub struct Limiter {
    rate: f64,
    burst: f64,
    drop: bool,
    by_label: Option<String>,
    max_distinct: usize,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Limiter {
    fn new(l: &config::logs::LimitStage, stop: Arc<std::sync::atomic::AtomicBool>) -> Limiter {
        Limiter {
            rate: l.rate,
            burst: l.burst.map_or(l.rate.max(1.0), |b| b as f64),
            drop: l.drop,
            by_label: l.by_label_name.clone(),
            max_distinct: l.max_distinct_labels.unwrap_or(10_000),
            buckets: Mutex::new(HashMap::new()),
            stop,
        }
    }

    /// Whether the entry may pass now; without `drop`, waits for a token instead.
    fn admit(&self, e: &Entry) -> bool {
        let key = match &self.by_label {
            Some(l) => match e.labels.get(l) {
                Some(v) => v.clone(),
                None => return true,
            },
            None => String::new(),
        };
        loop {
            if self.stop.load(std::sync::atomic::Ordering::SeqCst) {
                return true;
            }
            let wait = {
                let mut all = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
                if !all.contains_key(&key) && all.len() >= self.max_distinct {
                    // Too many label values: the new one is not limited (Promtail's behaviour).
                    return true;
                }
                let (tokens, at) = all.entry(key.clone()).or_insert((self.burst, Instant::now()));
                let now = Instant::now();
                *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.rate).min(self.burst);
                *at = now;
                if *tokens >= 1.0 {
                    *tokens -= 1.0;
                    return true;
                }
                if self.drop {
                    return false;
                }
                (1.0 - *tokens) / self.rate
            };
            std::thread::sleep(Duration::from_secs_f64(wait.min(0.2)));
        }
    }
}

/// A time format of a `timestamp` stage.
enum TimeFormat {
    Unix(u32),
    Rfc3339,
    Layout {
        strftime: String,
        tz: Option<jiff::tz::TimeZone>,
        /// The layout has `MST`: a zone abbreviation, which jiff cannot parse. It is taken out of
        /// the value before parsing and, as Go does, means the location's offset when the
        /// location uses that abbreviation then, else a zero offset.
        abbrev: bool,
        /// The layout has `Z07:00`/`Z0700`: `Z` stands for a zero offset.
        zulu: bool,
    },
}

/// Stands in for a zone abbreviation in a layout and a value (a byte no time text contains).
const ABBREV_MARK: &str = "\u{1}";

static ABBREV: std::sync::LazyLock<Regex> =
    std::sync::LazyLock::new(|| Regex::new(r"\b[A-Z]{3,5}\b").expect("a valid regular expression"));
static ZULU: std::sync::LazyLock<Regex> =
    std::sync::LazyLock::new(|| Regex::new(r"(\d)Z\b").expect("a valid regular expression"));

impl TimeFormat {
    fn new(format: &str, location: Option<&str>) -> Result<TimeFormat, String> {
        let named = match format {
            "Unix" => return Ok(TimeFormat::Unix(0)),
            "UnixMs" => return Ok(TimeFormat::Unix(3)),
            "UnixUs" => return Ok(TimeFormat::Unix(6)),
            "UnixNs" => return Ok(TimeFormat::Unix(9)),
            "ANSIC" => "Mon Jan _2 15:04:05 2006",
            "UnixDate" => "Mon Jan _2 15:04:05 MST 2006",
            "RubyDate" => "Mon Jan 02 15:04:05 -0700 2006",
            "RFC822" => "02 Jan 06 15:04 MST",
            "RFC822Z" => "02 Jan 06 15:04 -0700",
            "RFC850" => "Monday, 02-Jan-06 15:04:05 MST",
            "RFC1123" => "Mon, 02 Jan 2006 15:04:05 MST",
            "RFC1123Z" => "Mon, 02 Jan 2006 15:04:05 -0700",
            "RFC3339" | "RFC3339Nano" => return Ok(TimeFormat::Rfc3339),
            "Kitchen" => "3:04PM",
            "Stamp" => "Jan _2 15:04:05",
            "StampMilli" => "Jan _2 15:04:05.000",
            "StampMicro" => "Jan _2 15:04:05.000000",
            "StampNano" => "Jan _2 15:04:05.000000000",
            other => other,
        };
        let tz = location
            .map(|l| jiff::tz::TimeZone::get(l).map_err(|e| format!("unknown location {l:?}: {e}")))
            .transpose()?;
        let abbrev = named.contains("MST");
        let zulu = named.contains("Z07");
        let strftime = go_layout_to_strftime(&named.replace("MST", ABBREV_MARK));
        if !strftime.contains('%') {
            return Err(format!(
                "format {format:?} has no element of Go's reference time (2006, 01, 02, 15, 04, 05, Jan, MST, -0700, …) \
                 and matches nothing; write the layout as Go's time.Parse expects or use a named one (RFC3339, Unix, …)"
            ));
        }
        Ok(TimeFormat::Layout {
            strftime,
            tz,
            abbrev,
            zulu,
        })
    }

    fn parse(&self, v: &str) -> Option<i64> {
        match self {
            TimeFormat::Rfc3339 => v
                .trim()
                .parse::<jiff::Timestamp>()
                .ok()
                .map(|t| t.as_nanosecond() as i64),
            TimeFormat::Unix(digits) => {
                let v = v.trim();
                if *digits == 0 {
                    let f: f64 = v.parse().ok()?;
                    Some((f * 1e9) as i64)
                } else {
                    let n: i64 = v.parse().ok()?;
                    Some(n.checked_mul(10i64.pow(9 - digits))?)
                }
            }
            TimeFormat::Layout {
                strftime,
                tz,
                abbrev,
                zulu,
            } => {
                let mut text = std::borrow::Cow::Borrowed(v);
                let mut name = None;
                if *abbrev {
                    let m = ABBREV.find(&text)?;
                    name = Some(m.as_str().to_owned());
                    text = std::borrow::Cow::Owned(format!("{}{ABBREV_MARK}{}", &text[..m.start()], &text[m.end()..]));
                }
                if *zulu {
                    if let std::borrow::Cow::Owned(z) = ZULU.replace(&text, "${1}+00:00") {
                        text = std::borrow::Cow::Owned(z);
                    }
                }
                let mut bdt = jiff::fmt::strtime::parse(strftime, &*text).ok()?;
                if let Ok(ts) = bdt.to_timestamp() {
                    return Some(ts.as_nanosecond() as i64);
                }
                let mut dt = bdt.to_datetime().ok();
                if dt.is_none() {
                    // A layout without a year (Stamp): this year.
                    bdt.set_year(Some(jiff::Zoned::now().year())).ok()?;
                    dt = bdt.to_datetime().ok();
                }
                let dt = dt?;
                let zone = match (&name, tz) {
                    // Go: an abbreviation means the location's offset only where the location
                    // uses it; any other is a zero offset.
                    (Some(n), Some(z)) => {
                        let zoned = dt.to_zoned(z.clone()).ok()?;
                        let info = z.to_offset_info(zoned.timestamp());
                        if info.abbreviation() == n {
                            z.clone()
                        } else {
                            jiff::tz::TimeZone::UTC
                        }
                    }
                    (Some(_), None) => jiff::tz::TimeZone::UTC,
                    (None, z) => z.clone().unwrap_or(jiff::tz::TimeZone::UTC),
                };
                Some(dt.to_zoned(zone).ok()?.timestamp().as_nanosecond() as i64)
            }
        }
    }
}

/// Go's reference-time layout → jiff's strftime.
fn go_layout_to_strftime(layout: &str) -> String {
    const TOKENS: &[(&str, &str)] = &[
        ("2006", "%Y"),
        ("January", "%B"),
        ("Jan", "%b"),
        ("Monday", "%A"),
        ("Mon", "%a"),
        ("MST", "%Z"),
        ("Z07:00", "%:z"),
        ("-07:00", "%:z"),
        ("-0700", "%z"),
        ("Z0700", "%z"),
        (".999999999", "%.f"),
        (".000000000", "%.f"),
        (".999999", "%.f"),
        (".000000", "%.f"),
        (".999", "%.f"),
        (".000", "%.f"),
        ("01", "%m"),
        ("02", "%d"),
        ("_2", "%e"),
        ("15", "%H"),
        ("03", "%I"),
        ("04", "%M"),
        ("05", "%S"),
        ("06", "%y"),
        ("PM", "%p"),
        ("3", "%-I"),
        ("1", "%-m"),
        ("2", "%-d"),
    ];
    let mut out = String::new();
    let mut rest = layout;
    'outer: while !rest.is_empty() {
        for (go, f) in TOKENS {
            if let Some(r) = rest.strip_prefix(go) {
                out.push_str(f);
                rest = r;
                continue 'outer;
            }
        }
        let c = rest.chars().next().unwrap_or(' ');
        if c == '%' {
            out.push_str("%%");
        } else {
            out.push(c);
        }
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// A small Go-template subset: text with `{{ .Value }}`, `{{ .name }}`, `{{ .Entry }}` and
/// `{{ Func .x "arg" ... }}` for the string functions listed in the module docs.
#[derive(Clone, Debug)]
pub struct Template {
    parts: Vec<TPart>,
}

#[derive(Clone, Debug)]
enum TPart {
    Text(String),
    /// Commands joined by pipes: (function or None for a plain value, arguments).
    Action {
        cmds: Vec<(Option<String>, Vec<TArg>)>,
    },
}

#[derive(Clone, Debug)]
enum TArg {
    Field(String),
    Str(String),
    /// `|` between commands.
    Pipe,
}

impl Template {
    fn parse(s: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = s;
        while let Some(open) = rest.find("{{") {
            if open > 0 {
                parts.push(TPart::Text(rest[..open].to_owned()));
            }
            let after = &rest[open + 2..];
            let close = after
                .find("}}")
                .ok_or_else(|| format!("unclosed {{{{ in template {s:?}"))?;
            let body = after[..close]
                .trim()
                .trim_start_matches('-')
                .trim_end_matches('-')
                .trim();
            let mut words = Vec::new();
            let mut chars = body.chars().peekable();
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    chars.next();
                } else if c == '"' {
                    chars.next();
                    let mut w = String::new();
                    while let Some(c) = chars.next() {
                        match c {
                            '"' => break,
                            '\\' => {
                                if let Some(n) = chars.next() {
                                    w.push(match n {
                                        'n' => '\n',
                                        't' => '\t',
                                        c => c,
                                    })
                                }
                            }
                            c => w.push(c),
                        }
                    }
                    words.push(TArg::Str(w));
                } else if c == '|' {
                    chars.next();
                    words.push(TArg::Pipe);
                } else {
                    let mut w = String::new();
                    while let Some(&c) = chars.peek() {
                        if c.is_whitespace() || c == '|' {
                            break;
                        }
                        w.push(c);
                        chars.next();
                    }
                    match w.strip_prefix('.') {
                        Some(f) => words.push(TArg::Field(f.to_owned())),
                        None => words.push(TArg::Str(format!("\0{w}"))),
                    }
                }
            }
            // `a | F b` is `F b a`: each command after a pipe gets the previous result as its
            // last argument, as in Go templates.
            let mut cmds = Vec::new();
            for words in words.split(|w| matches!(w, TArg::Pipe)) {
                let (func, args) = match words.first() {
                    Some(TArg::Str(f)) if f.starts_with('\0') => {
                        let f = f[1..].to_owned();
                        const FUNCS: &[&str] = &[
                            "ToLower",
                            "ToUpper",
                            "Replace",
                            "Trim",
                            "TrimPrefix",
                            "TrimSuffix",
                            "TrimSpace",
                        ];
                        if !FUNCS.contains(&f.as_str()) {
                            return Err(format!(
                                "template function {f:?} is not supported (supported: {})",
                                FUNCS.join(", ")
                            ));
                        }
                        (Some(f), words[1..].to_vec())
                    }
                    Some(_) if cmds.is_empty() && words.len() == 1 => (None, words.to_vec()),
                    Some(_) => return Err(format!("a value cannot take arguments in template {s:?}")),
                    None => return Err(format!("empty action or pipe in template {s:?}")),
                };
                cmds.push((func, args));
            }
            parts.push(TPart::Action { cmds });
            rest = &after[close + 2..];
        }
        if !rest.is_empty() {
            parts.push(TPart::Text(rest.to_owned()));
        }
        Ok(Template { parts })
    }

    fn render(&self, e: &Entry, value: &str) -> String {
        let mut out = String::new();
        let field = |f: &str| -> String {
            match f {
                "Value" => value.to_owned(),
                "Entry" => e.line.clone(),
                name => e.extracted.get(name).cloned().unwrap_or_default(),
            }
        };
        for p in &self.parts {
            match p {
                TPart::Text(t) => out.push_str(t),
                TPart::Action { cmds } => {
                    let mut piped: Option<String> = None;
                    for (func, args) in cmds {
                        let mut vals: Vec<String> = args
                            .iter()
                            .map(|a| match a {
                                TArg::Field(f) => field(f),
                                TArg::Str(s) => s.trim_start_matches('\0').to_owned(),
                                TArg::Pipe => String::new(),
                            })
                            .collect();
                        vals.extend(piped.take());
                        piped = Some(call(func.as_deref(), &vals));
                    }
                    out.push_str(piped.as_deref().unwrap_or(""));
                }
            }
        }
        out
    }
}

/// One template function (None: the value itself) applied to its arguments.
fn call(func: Option<&str>, vals: &[String]) -> String {
    let a = |i: usize| vals.get(i).map(String::as_str).unwrap_or("");
    match func {
        None => a(0).to_owned(),
        Some("ToLower") => a(0).to_lowercase(),
        Some("ToUpper") => a(0).to_uppercase(),
        // Go's strings.Replace(s, old, new, n) as Promtail exposes it.
        Some("Replace") => {
            let n: i64 = a(3).parse().unwrap_or(-1);
            if n < 0 {
                a(0).replace(a(1), a(2))
            } else {
                a(0).replacen(a(1), a(2), n as usize)
            }
        }
        Some("Trim") => a(0).trim_matches(|c| a(1).contains(c)).to_owned(),
        Some("TrimPrefix") => a(0).strip_prefix(a(1)).unwrap_or(a(0)).to_owned(),
        Some("TrimSuffix") => a(0).strip_suffix(a(1)).unwrap_or(a(0)).to_owned(),
        Some(_) => a(0).trim().to_owned(),
    }
}

/// Promtail's `replace`: each match's capture groups (or the whole match without groups) are
/// replaced by the template, where `.Value` is the text replaced.
fn replace(re: &Regex, text: &str, template: &Template, e: &Entry) -> String {
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    for c in re.captures_iter(text) {
        let groups: Vec<regex::Match> = (1..c.len()).filter_map(|k| c.get(k)).collect();
        let targets = if groups.is_empty() {
            c.get(0).into_iter().collect()
        } else {
            groups
        };
        for m in targets {
            if m.start() < last {
                continue;
            }
            out.push_str(&text[last..m.start()]);
            out.push_str(&template.render(e, m.as_str()));
            last = m.end();
        }
    }
    out.push_str(&text[last..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stages(yaml: &str) -> Vec<Stage> {
        let wrapped = format!("logs:\n  clients: [{{url: http://l/}}]\n  scrape_configs:\n    - job_name: t\n      static_configs: [{{labels: {{__path__: /x}}}}]\n      pipeline_stages:\n{}", yaml.lines().map(|l| format!("        {l}\n")).collect::<String>());
        let cfg = config::agent_config_from_str(&wrapped, "t.yml", &|_| None)
            .unwrap_or_else(|e| panic!("{e:?}"))
            .value;
        cfg.logs.unwrap().scrape_configs[0].pipeline_stages.clone()
    }

    fn entry(line: &str, labels: &[(&str, &str)]) -> Entry {
        Entry {
            ts_ns: 1_000,
            line: line.to_owned(),
            labels: Arc::new(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
            extracted: HashMap::new(),
            metadata: Vec::new(),
            tenant: None,
            start: 0,
        }
    }

    fn run(yaml: &str, lines: &[&str]) -> (Output, Arc<StageMetrics>) {
        let metrics = Arc::new(StageMetrics::default());
        let c = Arc::new(Compiled::new(&stages(yaml), metrics.clone()).unwrap());
        let mut p = Pipeline::new(c);
        let mut out = Output::default();
        for (i, l) in lines.iter().enumerate() {
            let mut e = entry(l, &[("job", "t"), ("app", "web")]);
            e.start = i as u64 * 100;
            p.run(e, &mut out);
        }
        p.flush(true, &mut out);
        (out, metrics)
    }

    #[test]
    fn json_labels_timestamp_output_and_metadata() {
        let (out, _) = run(
            "- json:\n    expressions:\n      level:\n      msg: message\n      ts: meta.time\n      trace: \"spans[0].id\"\n- labels:\n    level:\n- structured_metadata:\n    trace_id: trace\n- timestamp:\n    source: ts\n    format: RFC3339Nano\n- output:\n    source: msg",
            &[r#"{"level":"warn","message":"disk 91%","meta":{"time":"2024-05-01T10:00:00.5Z"},"spans":[{"id":"abc"}]}"#, "not json"],
        );
        assert_eq!(out.entries.len(), 2);
        let e = &out.entries[0];
        assert_eq!(e.line, "disk 91%");
        assert_eq!(e.labels["level"], "warn");
        assert_eq!(e.metadata, [("trace_id".to_owned(), "abc".to_owned())]);
        assert_eq!(e.ts_ns, 1_714_557_600_500_000_000);
        assert_eq!(out.entries[1].line, "not json");
        assert!(!out.entries[1].labels.contains_key("level"));
    }

    #[test]
    fn regex_logfmt_replace_template_and_labels() {
        let (out, _) = run(
            "- regex:\n    expression: 'user=(?P<user>\\w+)'\n- logfmt:\n    mapping:\n      lvl: level\n      dur:\n- template:\n    source: user\n    template: '{{ ToUpper .Value }}-{{ .lvl }}'\n- labels:\n    user:\n- replace:\n    expression: 'password=(\\S+)'\n    replace: '****'\n- static_labels:\n    env: prod\n- labeldrop: [job]",
            &[r#"level=info user=bob dur="1.5 s" password=hunter2 ok"#],
        );
        let e = &out.entries[0];
        assert_eq!(e.labels["user"], "BOB-info");
        assert_eq!(e.extracted["dur"], "1.5 s");
        assert_eq!(e.line, r#"level=info user=bob dur="1.5 s" password=**** ok"#);
        assert_eq!(e.labels["env"], "prod");
        assert!(!e.labels.contains_key("job"));
    }

    #[test]
    fn match_drop_limit_and_tenant() {
        let (out, metrics) = run(
            "- match:\n    selector: '{app=\"web\"} |= \"debug\"'\n    action: drop\n    drop_counter_reason: noisy\n- match:\n    selector: '{app=\"web\"}'\n    stages:\n      - regex:\n          expression: 'status=(?P<status>\\d+)'\n      - tenant:\n          source: status\n      - metrics:\n          requests_total:\n            type: Counter\n            description: by status\n            source: status\n            config: {action: inc}\n- drop:\n    expression: '^skip'\n- drop:\n    longer_than: 20\n- labelallow: [app]",
            &["debug status=200", "status=500 fine", "skip me", "status=200 this line is long enough to go"],
        );
        assert_eq!(out.entries.len(), 1);
        assert_eq!(out.entries[0].line, "status=500 fine");
        assert_eq!(out.entries[0].tenant.as_deref(), Some("500"));
        assert_eq!(out.entries[0].labels.len(), 1);
        assert_eq!(out.dropped, ["noisy", "drop_stage", "drop_stage"]);
        let text = metrics.render();
        assert!(
            text.contains("promtail_custom_requests_total{app=\"web\", job=\"t\"} 2"),
            "{text}"
        );
    }

    #[test]
    fn multiline_holds_lines_and_reports_the_held_offset() {
        let metrics = Arc::new(StageMetrics::default());
        let c = Arc::new(
            Compiled::new(
                &stages("- multiline:\n    firstline: '^\\d{4}'\n    max_wait_time: 1h"),
                metrics,
            )
            .unwrap(),
        );
        let mut p = Pipeline::new(c);
        let mut out = Output::default();
        for (i, l) in ["2024 start", "  at a", "  at b", "2024 next"].iter().enumerate() {
            let mut e = entry(l, &[]);
            e.start = i as u64 * 10;
            p.run(e, &mut out);
        }
        assert_eq!(out.entries.len(), 1);
        assert_eq!(out.entries[0].line, "2024 start\n  at a\n  at b");
        assert_eq!(p.held_from(), Some(30));
        p.flush(false, &mut out);
        assert_eq!(out.entries.len(), 1, "not due yet");
        p.flush(true, &mut out);
        assert_eq!(out.entries[1].line, "2024 next");
        assert_eq!(p.held_from(), None);
    }

    #[test]
    fn multiline_blocks_are_kept_per_stream() {
        let metrics = Arc::new(StageMetrics::default());
        let c = Arc::new(
            Compiled::new(
                &stages("- multiline:\n    firstline: '^\\d{4}'\n    max_wait_time: 1h"),
                metrics,
            )
            .unwrap(),
        );
        let mut p = Pipeline::new(c);
        let mut out = Output::default();
        let out_l = Arc::new(BTreeMap::from([("stream".to_owned(), "stdout".to_owned())]));
        let err_l = Arc::new(BTreeMap::from([("stream".to_owned(), "stderr".to_owned())]));
        // stdout and stderr interleaved, as a container writes them.
        for (i, (l, labels)) in [
            ("2024 out", &out_l),
            ("2024 err", &err_l),
            ("  out more", &out_l),
            ("  err more", &err_l),
            ("2024 out next", &out_l),
        ]
        .into_iter()
        .enumerate()
        {
            let mut e = entry(l, &[]);
            e.labels = labels.clone();
            e.start = i as u64 * 10;
            p.run(e, &mut out);
        }
        assert_eq!(out.entries.len(), 1);
        assert_eq!(out.entries[0].line, "2024 out\n  out more");
        assert_eq!(out.entries[0].labels["stream"], "stdout");
        // The stderr block (from offset 10) holds the position back.
        assert_eq!(p.held_from(), Some(10));
        p.flush(true, &mut out);
        let lines: Vec<&str> = out.entries.iter().map(|e| e.line.as_str()).collect();
        assert_eq!(lines, ["2024 out\n  out more", "2024 err\n  err more", "2024 out next"]);
        assert_eq!(out.entries[1].labels["stream"], "stderr");
    }

    #[test]
    fn a_name_used_by_two_metric_types_does_not_panic() {
        // Each job is valid alone; two jobs may still give one name two types (the config
        // checks refuse that within a file): the later type's updates are ignored.
        let metrics = Arc::new(StageMetrics::default());
        let counter = "- metrics:\n    lines:\n      type: Counter\n      description: c\n      config: {match_all: true, action: inc}";
        let histogram = "- regex:\n    expression: '(?P<n>\\d+)'\n- metrics:\n    lines:\n      type: Histogram\n      description: h\n      source: n\n      config: {buckets: [1, 2]}";
        let mut out = Output::default();
        for yaml in [counter, histogram] {
            let mut p = Pipeline::new(Arc::new(Compiled::new(&stages(yaml), metrics.clone()).unwrap()));
            for l in ["1", "5"] {
                p.run(entry(l, &[("job", "t")]), &mut out);
            }
        }
        assert_eq!(out.entries.len(), 4);
        let text = metrics.render();
        assert!(text.contains("promtail_custom_lines_total{job=\"t\"} 2"), "{text}");
        assert!(!text.contains("_bucket"), "{text}");
    }

    fn run_entries(yaml: &str, entries: Vec<Entry>) -> (Output, Arc<StageMetrics>) {
        let metrics = Arc::new(StageMetrics::default());
        let mut p = Pipeline::new(Arc::new(Compiled::new(&stages(yaml), metrics.clone()).unwrap()));
        let mut out = Output::default();
        for e in entries {
            p.run(e, &mut out);
        }
        p.flush(true, &mut out);
        (out, metrics)
    }

    #[test]
    fn drop_older_than_and_tenant_by_label_and_value() {
        let mut fresh = entry("new", &[("app", "web")]);
        fresh.ts_ns = now_for_tests();
        let old = entry("old", &[("app", "web")]);
        let (out, _) = run_entries(
            "- drop:\n    older_than: 1h\n    drop_counter_reason: stale",
            vec![old, fresh],
        );
        assert_eq!(out.entries.len(), 1);
        assert_eq!(out.entries[0].line, "new");
        assert_eq!(out.dropped, ["stale"]);
        let (out, _) = run("- tenant:\n    label: app", &["x"]);
        assert_eq!(out.entries[0].tenant.as_deref(), Some("web"));
        let (out, _) = run("- tenant:\n    value: fixed", &["x"]);
        assert_eq!(out.entries[0].tenant.as_deref(), Some("fixed"));
    }

    fn now_for_tests() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as i64
    }

    #[test]
    fn timestamp_fallback_fudge_and_skip() {
        let yaml = "- regex:\n    expression: '^(?P<t>\\S+) '\n- timestamp:\n    source: t\n    format: RFC3339\n    fallback_formats: [UnixMs]";
        let (out, _) = run(yaml, &["1700000000123 a", "garbage b", "2024-01-01T00:00:00Z c"]);
        let ts: Vec<i64> = out.entries.iter().map(|e| e.ts_ns).collect();
        // The fallback parses the first; the second is fudged 1 ns after it (Promtail's
        // default); the third parses with the main format.
        assert_eq!(
            ts,
            [
                1_700_000_000_123_000_000,
                1_700_000_000_123_000_001,
                1_704_067_200_000_000_000
            ]
        );
        let (out, _) = run(
            &format!("{yaml}\n    action_on_failure: skip"),
            &["1700000000123 a", "garbage b"],
        );
        assert_eq!(out.entries[1].ts_ns, 1_000, "skip keeps the time the line was read");
    }

    #[test]
    fn metrics_counter_match_all_gauge_and_histogram() {
        let (_, metrics) = run(
            "- regex:\n    expression: 'took=(?P<took>[\\d.]+) queue=(?P<queue>\\d+)'\n- metrics:\n    lines:\n      type: Counter\n      description: every line\n      config: {match_all: true, action: inc}\n    line_bytes:\n      type: Counter\n      description: bytes\n      config: {match_all: true, count_entry_bytes: true, action: add}\n    queue:\n      type: Gauge\n      description: depth\n      source: queue\n      config: {action: set}\n    took:\n      type: Histogram\n      description: latency\n      source: took\n      config: {buckets: [0.1, 1]}",
            &["took=0.05 queue=3", "took=0.5 queue=7", "no values here"],
        );
        let text = metrics.render();
        let l = "{app=\"web\", job=\"t\"}";
        for want in [
            format!("promtail_custom_lines_total{l} 3"),
            format!("promtail_custom_line_bytes_total{l} 47"),
            format!("promtail_custom_queue{l} 7"),
            "promtail_custom_took_bucket{app=\"web\", job=\"t\",le=\"0.1\"} 1".to_owned(),
            "promtail_custom_took_bucket{app=\"web\", job=\"t\",le=\"1\"} 2".to_owned(),
            format!("promtail_custom_took_count{l} 2"),
            format!("promtail_custom_took_sum{l} 0.55"),
        ] {
            assert!(text.contains(&want), "{want} missing in\n{text}");
        }
    }

    #[test]
    fn limit_per_label_value_and_waiting_mode() {
        let e = |app: &str| entry("x", &[("app", app)]);
        let (out, _) = run_entries(
            "- limit:\n    rate: 1\n    burst: 1\n    drop: true\n    by_label_name: app",
            vec![e("a"), e("a"), e("b"), e("b"), e("c")],
        );
        let apps: Vec<&str> = out.entries.iter().map(|e| e.labels["app"].as_str()).collect();
        assert_eq!(apps, ["a", "b", "c"], "one burst per label value");
        assert_eq!(out.dropped, ["limit", "limit"]);
        // Without drop, entries wait for tokens: none is lost, the fifth comes ≥ 4/rate later.
        let started = Instant::now();
        let (out, _) = run_entries("- limit:\n    rate: 20\n    burst: 1", (0..5).map(|_| e("a")).collect());
        assert_eq!(out.entries.len(), 5);
        assert!(out.dropped.is_empty());
        assert!(
            started.elapsed() >= Duration::from_millis(150),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn limit_drops_over_the_burst() {
        let (out, _) = run(
            "- limit:\n    rate: 1\n    burst: 2\n    drop: true",
            &["a", "b", "c", "d"],
        );
        assert_eq!(out.entries.len(), 2);
        assert_eq!(out.dropped, ["limit", "limit"]);
    }

    #[test]
    fn time_formats() {
        let f = TimeFormat::new("2006-01-02 15:04:05.000", Some("Europe/Paris")).unwrap();
        assert_eq!(f.parse("2024-01-01 12:00:00.250"), Some(1_704_106_800_250_000_000));
        assert_eq!(
            TimeFormat::new("UnixMs", None).unwrap().parse("1700000000123"),
            Some(1_700_000_000_123_000_000)
        );
        assert_eq!(
            TimeFormat::new("Unix", None).unwrap().parse("1700000000.5"),
            Some(1_700_000_000_500_000_000)
        );
        let rfc = TimeFormat::new("RFC1123Z", None).unwrap();
        assert_eq!(
            rfc.parse("Mon, 01 Jan 2024 12:00:00 +0100"),
            Some(1_704_106_800_000_000_000)
        );
        assert_eq!(rfc.parse("garbage"), None);
        // Zone abbreviations (jiff cannot parse them): the location's where it uses the
        // abbreviation then, else a zero offset, as Go does.
        let unix = TimeFormat::new("UnixDate", Some("Europe/Paris")).unwrap();
        assert_eq!(
            unix.parse("Mon Jan  1 12:00:00 CET 2024"),
            Some(1_704_106_800_000_000_000)
        );
        assert_eq!(
            unix.parse("Mon Jan  1 12:00:00 UTC 2024"),
            Some(1_704_110_400_000_000_000)
        );
        let rfc1123 = TimeFormat::new("RFC1123", None).unwrap();
        assert_eq!(
            rfc1123.parse("Mon, 01 Jan 2024 12:00:00 GMT"),
            Some(1_704_110_400_000_000_000)
        );
        // `Z07:00` takes `Z` as well as an offset.
        let z = TimeFormat::new("2006-01-02T15:04:05Z07:00", None).unwrap();
        assert_eq!(z.parse("2024-01-01T12:00:00Z"), Some(1_704_110_400_000_000_000));
        assert_eq!(z.parse("2024-01-01T12:00:00+01:00"), Some(1_704_106_800_000_000_000));
        // A layout without Go's reference elements is refused rather than never matching.
        assert!(TimeFormat::new("YYYY-MM-DD", None).is_err());
    }

    #[test]
    fn template_pipes_pass_the_value_as_the_last_argument() {
        let e = entry("line", &[]);
        let t = Template::parse(
            r#"{{ .Value | ToUpper }}-{{ .Value|TrimPrefix "a"|TrimSpace }}-{{ Replace .Value "b" "x" -1 }}"#,
        )
        .unwrap();
        // TrimPrefix "a" v is TrimPrefix("a", v) as in Go: v is not a prefix of "a".
        assert_eq!(t.render(&e, "abc"), "ABC-a-axc");
        assert!(Template::parse("{{ .Value | }}").is_err());
        assert!(Template::parse("{{ .Value | Nope }}").is_err());
        assert!(Template::parse("{{ .a .b }}").is_err());
    }

    #[test]
    fn unsupported_json_expressions_are_errors() {
        assert!(parse_path("items[?x=='y']").is_err());
        assert_eq!(
            parse_path("a.\"b.c\"[2]").unwrap(),
            [
                PathPart::Key("a".into()),
                PathPart::Key("b.c".into()),
                PathPart::Index(2)
            ]
        );
    }
}
