//! Checks of the `flows:` section.

use super::checks::Checker;
use crate::flows::{FlowsConfig, CONTEXTS, METRICS};

impl Checker<'_> {
    pub(super) fn flows(&mut self, f: &FlowsConfig) {
        if f.cgroup.is_some() && !f.interfaces.is_empty() {
            self.err(
                "flows.cgroup",
                "cgroup and interfaces are exclusive: attach at the cgroup v2 root or to interfaces",
            );
        }
        if let Some(c) = &f.cgroup {
            if !c.starts_with('/') {
                self.err("flows.cgroup", format!("cgroup must be an absolute path, got {c:?}"));
            }
        }
        for (i, p) in f.interfaces.iter().enumerate() {
            if p.is_empty() || p.len() > 15 && !p.contains(['*', '?', '[']) {
                self.err(
                    &format!("flows.interfaces[{i}]"),
                    format!("an interface name or glob (at most 15 characters without wildcards), got {p:?}"),
                );
            } else if let Err(e) = glob::Pattern::new(p) {
                self.err(&format!("flows.interfaces[{i}]"), format!("invalid glob {p:?}: {e}"));
            }
        }
        if f.interval.get().is_zero() {
            self.err("flows.interval", "interval must be more than 0s");
        }
        if f.idle_timeout.get() < f.interval.get() {
            self.err("flows.idle_timeout", "idle_timeout must be at least interval");
        }
        if !(1024..=1 << 24).contains(&f.max_flows) {
            self.err(
                "flows.max_flows",
                format!("max_flows must be between 1024 and 16777216, got {}", f.max_flows),
            );
        }
        for (i, m) in f.metrics.iter().enumerate() {
            if !METRICS.contains(&m.as_str()) {
                self.err(
                    &format!("flows.metrics[{i}]"),
                    format!("unknown metric {m:?} (expected one of: {})", METRICS.join(", ")),
                );
            }
        }
        for (key, list) in [
            ("source_context", &f.source_context),
            ("destination_context", &f.destination_context),
        ] {
            for (i, entry) in list.iter().enumerate() {
                for c in entry.split('|').map(str::trim) {
                    if CONTEXTS.contains(&c) {
                        continue;
                    }
                    self.err(
                        &format!("flows.{key}[{i}]"),
                        format!("unknown context {c:?} (expected one of: {})", CONTEXTS.join(", ")),
                    );
                }
            }
        }
        if f.max_ports == 0 {
            self.err("flows.max_ports", "max_ports must be at least 1");
        }
        if f.api_server.is_some() && f.kubeconfig_file.is_some() {
            self.err("flows.api_server", "api_server and kubeconfig_file are exclusive");
        }
        if f.max_label_sets == 0 {
            self.err("flows.max_label_sets", "max_label_sets must be at least 1");
        }
    }
}
