//! Service discovery: turns `static_configs`, `file_sd_configs` and `kubernetes_sd_configs`
//! into [`TargetGroup`]s. Each provider publishes its current full set of groups; the scrape
//! manager merges them per job, applies `relabel_configs` and (re)starts scrape loops.

use crate::labels::Labels;

/// A set of targets sharing common labels, as Prometheus's `targetgroup.Group`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TargetGroup {
    /// Identifies the group within its provider (e.g. `pod/default/web-0`, a file name + index).
    pub source: String,
    /// One label set per target; each has at least `__address__`.
    pub targets: Vec<Labels>,
    /// Labels common to every target of the group (target labels win on conflict).
    pub labels: Labels,
}

pub mod file;
pub mod kubernetes;

/// Groups of a job's `static_configs`, as Prometheus builds them.
pub fn static_groups(job: &str, configs: &[config::agent::StaticConfig]) -> Vec<TargetGroup> {
    configs
        .iter()
        .enumerate()
        .map(|(i, c)| TargetGroup {
            source: format!("{job}/static/{i}"),
            targets: c
                .targets
                .iter()
                .map(|t| Labels::from_pairs([(crate::labels::ADDRESS, t.as_str())]))
                .collect(),
            labels: Labels::from_pairs(c.labels.iter().map(|(k, v)| (k.as_str(), v.as_str()))),
        })
        .collect()
}
