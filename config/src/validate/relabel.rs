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

const DEFAULT_REGEX: &str = "(.*)";
const DEFAULT_SEPARATOR: &str = ";";
const DEFAULT_REPLACEMENT: &str = "$1";

/// One problem of a relabel rule: the field it is about (`None`: the rule as a whole) and
/// what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleProblem {
    /// `action`, `regex`, `source_labels[N]`, `target_label`, `replacement`, … or `None`.
    pub field: Option<String>,
    /// The message.
    pub message: String,
}

fn problem(field: Option<&str>, message: String) -> RuleProblem {
    RuleProblem {
        field: field.map(str::to_owned),
        message,
    }
}

/// Every problem of one relabel rule, in the order Prometheus 2.42 checks. `check-config`, a
/// reload and the agent's rule compiler all use this one function, so they cannot disagree.
pub fn rule_problems(rc: &RelabelConfig) -> Vec<RuleProblem> {
    let mut out = Vec::new();
    // Unicode-aware, as Go's strings.ToLower that Prometheus uses.
    let action = rc.action.to_lowercase();
    if !RELABEL_ACTIONS.contains(&action.as_str()) {
        out.push(problem(
            Some("action"),
            format!(
                "unknown relabel action {:?} (expected one of: {})",
                rc.action,
                RELABEL_ACTIONS.join(", ")
            ),
        ));
        return out;
    }
    let name: &str = RELABEL_ACTIONS
        .iter()
        .find(|a| **a == action)
        .copied()
        .unwrap_or("replace");
    if let Err(e) = regex::Regex::new(&format!("^(?s:{})$", rc.regex)) {
        out.push(problem(
            Some("regex"),
            format!("invalid regular expression {:?}: {}", rc.regex, regex_reason(&e)),
        ));
    }
    for (k, label) in rc.source_labels.iter().enumerate() {
        if !valid_label_name(label) {
            out.push(problem(
                Some(&format!("source_labels[{k}]")),
                format!("{label:?} is not a valid label name"),
            ));
        }
    }
    let target = rc.target_label.as_deref().unwrap_or("");
    let modulus = rc.modulus.unwrap_or(0);
    let invalid_target = || {
        problem(
            Some("target_label"),
            format!("{target:?} is not a valid target_label for relabel action {name:?}"),
        )
    };
    let not_allowed = |field: &str| {
        problem(
            Some(field),
            format!("relabel action {name:?} does not allow setting {field}"),
        )
    };
    if name == "hashmod" && modulus == 0 {
        out.push(problem(
            None,
            "relabel action \"hashmod\" requires a non-zero modulus".to_owned(),
        ));
    }
    let needs_target = matches!(
        name,
        "replace" | "hashmod" | "lowercase" | "uppercase" | "keepequal" | "dropequal"
    );
    if needs_target && target.is_empty() {
        out.push(problem(None, format!("relabel action {name:?} requires target_label")));
        return out;
    }
    if name == "replace" {
        let ok = if target.contains('$') {
            valid_target_template(target)
        } else {
            valid_label_name(target)
        };
        if !ok {
            out.push(invalid_target());
        }
    }
    let literal_target = matches!(name, "lowercase" | "uppercase" | "keepequal" | "dropequal" | "hashmod");
    if literal_target && !valid_label_name(target) {
        out.push(invalid_target());
    }
    if matches!(name, "lowercase" | "uppercase" | "keepequal" | "dropequal") && rc.replacement != DEFAULT_REPLACEMENT {
        out.push(not_allowed("replacement"));
    }
    if name == "labelmap" && !valid_target_template(&rc.replacement) {
        out.push(problem(
            Some("replacement"),
            format!(
                "{:?} is not a valid replacement for relabel action \"labelmap\"",
                rc.replacement
            ),
        ));
    }
    if matches!(name, "keepequal" | "dropequal") {
        if rc.regex != DEFAULT_REGEX {
            out.push(not_allowed("regex"));
        }
        if modulus != 0 {
            out.push(not_allowed("modulus"));
        }
        if rc.separator != DEFAULT_SEPARATOR {
            out.push(not_allowed("separator"));
        }
    }
    if matches!(name, "labeldrop" | "labelkeep") {
        if !rc.source_labels.is_empty() {
            out.push(not_allowed("source_labels"));
        }
        if !target.is_empty() {
            out.push(not_allowed("target_label"));
        }
        if modulus != 0 {
            out.push(not_allowed("modulus"));
        }
        if rc.separator != DEFAULT_SEPARATOR {
            out.push(not_allowed("separator"));
        }
        if rc.replacement != DEFAULT_REPLACEMENT {
            out.push(not_allowed("replacement"));
        }
    }
    out
}

impl Checker<'_> {
    pub(super) fn relabel(&mut self, path: &str, rc: &RelabelConfig) {
        for p in rule_problems(rc) {
            match &p.field {
                Some(f) => self.err(&format!("{path}.{f}"), p.message),
                None => self.err(path, p.message),
            }
        }
    }
}
