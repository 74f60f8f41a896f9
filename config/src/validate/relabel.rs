//! Checks of a relabel rule, as Prometheus 2.42 makes them.

use super::checks::Checker;
use super::rules::{regex_reason, valid_label_name, valid_target_template};
use crate::agent::RelabelConfig;

/// Relabel actions Prometheus 2.42 knows (matched case-insensitively, as Prometheus does).
pub const RELABEL_ACTIONS: &[&str] = &[
    "replace",
    "keep",
    "drop",
    "keepequal",
    "dropequal",
    "hashmod",
    "labelmap",
    "labeldrop",
    "labelkeep",
    "lowercase",
    "uppercase",
];

impl Checker<'_> {
    pub(super) fn relabel(&mut self, path: &str, rc: &RelabelConfig) {
        let action = rc.action.to_ascii_lowercase();
        if !RELABEL_ACTIONS.contains(&action.as_str()) {
            self.err(
                &format!("{path}.action"),
                format!(
                    "unknown relabel action {:?} (expected one of: {})",
                    rc.action,
                    RELABEL_ACTIONS.join(", ")
                ),
            );
            return;
        }
        if let Err(e) = regex::Regex::new(&format!("^(?s:{})$", rc.regex)) {
            self.err(
                &format!("{path}.regex"),
                format!("invalid regular expression {:?}: {}", rc.regex, regex_reason(&e)),
            );
        }
        for (k, name) in rc.source_labels.iter().enumerate() {
            if !valid_label_name(name) {
                self.err(
                    &format!("{path}.source_labels[{k}]"),
                    format!("{name:?} is not a valid label name"),
                );
            }
        }
        let needs_target = matches!(
            action.as_str(),
            "replace" | "hashmod" | "lowercase" | "uppercase" | "keepequal" | "dropequal"
        );
        let target = rc.target_label.as_deref().unwrap_or("");
        if needs_target && target.is_empty() {
            self.err(path, format!("target_label is required for action `{action}`"));
        } else if !target.is_empty() {
            let ok = if action == "replace" {
                valid_target_template(target)
            } else {
                valid_label_name(target)
            };
            if !ok {
                self.err(
                    &format!("{path}.target_label"),
                    format!("{target:?} is not a valid label name"),
                );
            }
        }
        if action == "hashmod" && rc.modulus.unwrap_or(0) == 0 {
            self.err(path, "action `hashmod` needs a non-zero modulus");
        }
        let d = RelabelConfig::default();
        if matches!(action.as_str(), "labeldrop" | "labelkeep")
            && (!rc.source_labels.is_empty()
                || rc.target_label.is_some()
                || rc.modulus.is_some()
                || rc.separator != d.separator
                || rc.replacement != d.replacement)
        {
            self.err(path, format!("action `{action}` takes only `regex`"));
        }
        if matches!(action.as_str(), "keepequal" | "dropequal")
            && (rc.regex != d.regex
                || rc.modulus.is_some()
                || rc.separator != d.separator
                || rc.replacement != d.replacement)
        {
            self.err(
                path,
                format!("action `{action}` takes only `source_labels` and `target_label`"),
            );
        }
    }
}
