//! Prometheus relabeling (`relabel_configs`, `metric_relabel_configs`, `write_relabel_configs`)
//! with the semantics of Prometheus 2.42.
//!
//! Configs enter through [`Rule::new`] / [`compile`], which validate them the way Prometheus
//! does and compile each regex once, anchored as `^(?s:<regex>)$`. [`process`] then rewrites a
//! [`Labels`] set in place and says whether it survived. Processing reuses per-thread scratch
//! buffers, so a rule that does not match allocates nothing.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::sync::OnceLock;

use config::agent::RelabelConfig;
use md5::{Digest, Md5};
use regex::{Captures, Regex};

use crate::labels::Labels;

/// Default `regex`; it matches every value, so rules using it skip the regex engine.
const DEFAULT_REGEX: &str = "(.*)";
/// Scratch buffers that grew beyond this are released after a `process` call.
const MAX_RETAINED_SCRATCH: usize = 64 * 1024;

/// A relabel config Prometheus would reject.
#[derive(Debug, thiserror::Error)]
pub enum RelabelError {
    /// `action` is not one Prometheus knows.
    #[error("unknown relabel action {0:?}")]
    UnknownAction(String),
    /// A `source_labels` entry is not a valid label name.
    #[error("{0:?} is not a valid label name in source_labels")]
    InvalidSourceLabel(String),
    /// `regex` does not compile.
    #[error("invalid relabel regex {regex:?}")]
    InvalidRegex {
        /// The regex as written in the config.
        regex: String,
        /// Why it does not compile.
        #[source]
        source: regex::Error,
    },
    /// A check of the config crate's `rule_problems` failed.
    #[error("{0}")]
    Invalid(String),
}

/// The relabel actions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    Replace,
    Keep,
    Drop,
    KeepEqual,
    DropEqual,
    HashMod,
    LabelMap,
    LabelDrop,
    LabelKeep,
    Lowercase,
    Uppercase,
}

impl Action {
    const ALL: [Action; 11] = [
        Action::Replace,
        Action::Keep,
        Action::Drop,
        Action::KeepEqual,
        Action::DropEqual,
        Action::HashMod,
        Action::LabelMap,
        Action::LabelDrop,
        Action::LabelKeep,
        Action::Lowercase,
        Action::Uppercase,
    ];

    /// Parses an action name case-insensitively (Go's `strings.ToLower`, so Unicode-aware).
    fn parse(s: &str) -> Option<Action> {
        let lower = s.to_lowercase();
        Self::ALL.into_iter().find(|a| a.name() == lower)
    }

    fn name(self) -> &'static str {
        match self {
            Action::Replace => "replace",
            Action::Keep => "keep",
            Action::Drop => "drop",
            Action::KeepEqual => "keepequal",
            Action::DropEqual => "dropequal",
            Action::HashMod => "hashmod",
            Action::LabelMap => "labelmap",
            Action::LabelDrop => "labeldrop",
            Action::LabelKeep => "labelkeep",
            Action::Lowercase => "lowercase",
            Action::Uppercase => "uppercase",
        }
    }
}

/// A validated, compiled relabel rule.
#[derive(Clone, Debug)]
pub struct Rule {
    action: Action,
    source_labels: Vec<String>,
    separator: String,
    /// The anchored regex.
    regex: Regex,
    /// True for the default regex `(.*)`, which matches anything with group 1 = the whole input.
    match_all: bool,
    /// True when a template references a capture group, so matching must record them.
    needs_groups: bool,
    /// `target_label` as written (a literal name for every action but `replace`).
    target_label: String,
    /// `target_label` as a template (only `replace` expands it).
    target: Template,
    replacement: Template,
    modulus: u64,
}

impl Rule {
    /// Validates `cfg` like Prometheus's `relabel.Config.Validate` and compiles it.
    pub fn new(cfg: &RelabelConfig) -> Result<Rule, RelabelError> {
        let action = Action::parse(&cfg.action).ok_or_else(|| RelabelError::UnknownAction(cfg.action.clone()))?;
        if let Some(bad) = cfg.source_labels.iter().find(|n| !is_valid_label_name(n)) {
            return Err(RelabelError::InvalidSourceLabel(bad.clone()));
        }
        let regex = Regex::new(&format!("^(?s:{})$", cfg.regex)).map_err(|source| RelabelError::InvalidRegex {
            regex: cfg.regex.clone(),
            source,
        })?;
        // The checks `check-config` makes, from the config crate: one definition.
        if let Some(p) = config::rule_problems(cfg).into_iter().next() {
            return Err(RelabelError::Invalid(p.message));
        }

        let target_label = cfg.target_label.clone().unwrap_or_default();
        let target = if action == Action::Replace {
            Template::parse(&target_label, &regex)
        } else {
            Template::literal(&target_label)
        };
        let replacement = match action {
            Action::Replace | Action::LabelMap => Template::parse(&cfg.replacement, &regex),
            _ => Template::default(),
        };
        Ok(Rule {
            action,
            source_labels: cfg.source_labels.clone(),
            separator: cfg.separator.clone(),
            match_all: cfg.regex == DEFAULT_REGEX,
            needs_groups: target.uses_groups() || replacement.uses_groups(),
            regex,
            target_label,
            target,
            replacement,
            modulus: cfg.modulus.unwrap_or(0),
        })
    }

    /// Applies the rule; false when the label set is dropped.
    fn apply(&self, labels: &mut Labels, scratch: &mut Scratch) -> bool {
        let Scratch {
            joined,
            target,
            value,
            pending,
        } = scratch;
        joined.clear();
        for (i, name) in self.source_labels.iter().enumerate() {
            if i > 0 {
                joined.push_str(&self.separator);
            }
            joined.push_str(labels.get_or_empty(name));
        }
        let val = joined.as_str();

        match self.action {
            Action::Keep => return self.is_match(val),
            Action::Drop => return !self.is_match(val),
            Action::KeepEqual => return labels.get_or_empty(&self.target_label) == val,
            Action::DropEqual => return labels.get_or_empty(&self.target_label) != val,
            Action::Replace => self.replace(labels, val, target, value),
            Action::Lowercase => {
                value.clear();
                val.chars().for_each(|c| push_lower(value, c));
                labels.set(&self.target_label, value);
            }
            Action::Uppercase => {
                value.clear();
                val.chars().for_each(|c| push_upper(value, c));
                labels.set(&self.target_label, value);
            }
            Action::HashMod => {
                let digest = Md5::digest(val.as_bytes());
                let mut tail = [0u8; 8];
                tail.copy_from_slice(&digest[8..]);
                value.clear();
                let _ = write!(value, "{}", u64::from_be_bytes(tail) % self.modulus);
                labels.set(&self.target_label, value);
            }
            Action::LabelMap => self.label_map(labels, pending),
            Action::LabelDrop => labels.retain(|name, _| !self.is_match(name)),
            Action::LabelKeep => labels.retain(|name, _| self.is_match(name)),
        }
        true
    }

    fn is_match(&self, haystack: &str) -> bool {
        self.match_all || self.regex.is_match(haystack)
    }

    /// Matches `haystack`, recording capture groups only when a template needs them.
    fn groups<'h>(&self, haystack: &'h str) -> Option<Groups<'h>> {
        if self.match_all {
            return Some(Groups::Whole(haystack));
        }
        // `is_match` first: `captures` allocates even when nothing matches.
        if !self.regex.is_match(haystack) {
            return None;
        }
        if !self.needs_groups {
            return Some(Groups::Unused);
        }
        self.regex.captures(haystack).map(Groups::Captures)
    }

    fn replace(&self, labels: &mut Labels, val: &str, target: &mut String, value: &mut String) {
        let Some(groups) = self.groups(val) else {
            return;
        };
        let name = match self.target.as_literal() {
            Some(name) => name,
            None => {
                target.clear();
                self.target.expand(&groups, target);
                target.as_str()
            }
        };
        // Checked even for literals: `${9}1x` passes validation but always yields "1x".
        if !is_valid_label_name(name) {
            return;
        }
        match self.replacement.as_literal() {
            Some(lit) => labels.set(name, lit),
            None => {
                value.clear();
                self.replacement.expand(&groups, value);
                labels.set(name, value);
            }
        }
    }

    /// Copies every label whose name matches to the expanded replacement name. Names and
    /// values are read from the set as it was before the rule, as Prometheus does.
    fn label_map(&self, labels: &mut Labels, pending: &mut Vec<(String, String)>) {
        pending.clear();
        for (name, value) in labels.iter() {
            if let Some(groups) = self.groups(name) {
                let mut new_name = String::new();
                self.replacement.expand(&groups, &mut new_name);
                pending.push((new_name, value.to_owned()));
            }
        }
        for (name, value) in pending.drain(..) {
            labels.set(&name, &value);
        }
    }
}

/// Validates and compiles rules, in order.
pub fn compile(cfgs: &[RelabelConfig]) -> Result<Vec<Rule>, RelabelError> {
    cfgs.iter().map(Rule::new).collect()
}

/// Buffers reused across rules and calls on one thread.
#[derive(Default)]
struct Scratch {
    /// Source label values joined by the separator.
    joined: String,
    /// Expanded target label name.
    target: String,
    /// Computed label value.
    value: String,
    /// Labels `labelmap` will set.
    pending: Vec<(String, String)>,
}

impl Scratch {
    fn release_oversized(&mut self) {
        for s in [&mut self.joined, &mut self.target, &mut self.value] {
            if s.capacity() > MAX_RETAINED_SCRATCH {
                *s = String::new();
            }
        }
        if self.pending.capacity() > MAX_RETAINED_SCRATCH / 64 {
            self.pending = Vec::new();
        }
    }
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Applies rules in order; returns false when the set is dropped (then the content of `labels`
/// is unspecified).
pub fn process(labels: &mut Labels, rules: &[Rule]) -> bool {
    if rules.is_empty() {
        return true;
    }
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut scratch) => apply_all(labels, rules, &mut scratch),
        Err(_) => apply_all(labels, rules, &mut Scratch::default()),
    })
}

fn apply_all(labels: &mut Labels, rules: &[Rule], scratch: &mut Scratch) -> bool {
    let keep = rules.iter().all(|rule| rule.apply(labels, scratch));
    scratch.release_oversized();
    keep
}

/// True for a Prometheus label name: `[a-zA-Z_][a-zA-Z0-9_]*`.
pub fn is_valid_label_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b == b'_' || b.is_ascii_alphabetic())
        && bytes.all(|b| b == b'_' || b.is_ascii_alphanumeric())
}

/// Capture groups of one match, as a template sees them.
enum Groups<'h> {
    /// The default regex `(.*)`: groups 0 and 1 are the whole input.
    Whole(&'h str),
    /// No template references a group.
    Unused,
    Captures(Captures<'h>),
}

impl<'h> Groups<'h> {
    fn get(&self, index: usize) -> Option<&'h str> {
        match self {
            Groups::Whole(all) => (index <= 1).then_some(*all),
            Groups::Unused => None,
            Groups::Captures(caps) => caps.get(index).map(|m| m.as_str()),
        }
    }
}

/// A replacement template parsed once, with Go's `Regexp.Expand` rules: `$$` is a `$`;
/// `$name` / `${name}` take the longest run of letters, digits and `_` as the name; a number
/// without leading zeros is a group index, anything else a group name; unknown groups expand
/// to nothing; a `$` not followed by a valid reference is kept as is.
#[derive(Clone, Debug, Default)]
struct Template {
    pieces: Vec<Piece>,
}

#[derive(Clone, Debug)]
enum Piece {
    Literal(String),
    Group(usize),
}

impl Template {
    fn literal(s: &str) -> Template {
        let pieces = if s.is_empty() {
            Vec::new()
        } else {
            vec![Piece::Literal(s.to_owned())]
        };
        Template { pieces }
    }

    fn parse(template: &str, regex: &Regex) -> Template {
        let mut pieces = Vec::new();
        let mut literal = String::new();
        let mut rest = template;
        while let Some(dollar) = rest.find('$') {
            literal.push_str(&rest[..dollar]);
            rest = &rest[dollar + 1..];
            if let Some(after) = rest.strip_prefix('$') {
                literal.push('$');
                rest = after;
                continue;
            }
            let Some((name, after)) = split_reference(rest) else {
                literal.push('$');
                continue;
            };
            rest = after;
            if let Some(index) = group_index(name, regex) {
                if !literal.is_empty() {
                    pieces.push(Piece::Literal(std::mem::take(&mut literal)));
                }
                pieces.push(Piece::Group(index));
            }
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            pieces.push(Piece::Literal(literal));
        }
        Template { pieces }
    }

    fn uses_groups(&self) -> bool {
        self.pieces.iter().any(|p| matches!(p, Piece::Group(_)))
    }

    /// The template's text when it references no group.
    fn as_literal(&self) -> Option<&str> {
        match self.pieces.as_slice() {
            [] => Some(""),
            [Piece::Literal(s)] => Some(s),
            _ => None,
        }
    }

    fn expand(&self, groups: &Groups<'_>, out: &mut String) {
        for piece in &self.pieces {
            match piece {
                Piece::Literal(s) => out.push_str(s),
                Piece::Group(i) => out.push_str(groups.get(*i).unwrap_or("")),
            }
        }
    }
}

/// Splits a reference (the text after `$`) into its name and the rest, like Go's `extract`.
fn split_reference(s: &str) -> Option<(&str, &str)> {
    let (braced, body) = match s.strip_prefix('{') {
        Some(body) => (true, body),
        None => (false, s),
    };
    let end = body
        .char_indices()
        .find(|&(_, c)| !is_reference_char(c))
        .map_or(body.len(), |(i, _)| i);
    if end == 0 {
        return None;
    }
    let (name, mut rest) = body.split_at(end);
    if braced {
        rest = rest.strip_prefix('}')?;
    }
    Some((name, rest))
}

/// Go's `unicode.IsLetter(c) || unicode.IsDigit(c) || c == '_'`.
fn is_reference_char(c: char) -> bool {
    if c.is_ascii() {
        return c == '_' || c.is_ascii_alphanumeric();
    }
    static LETTER_OR_DIGIT: OnceLock<Regex> = OnceLock::new();
    let mut buf = [0u8; 4];
    LETTER_OR_DIGIT
        .get_or_init(|| Regex::new(r"^[\p{L}\p{Nd}]$").expect("static regex"))
        .is_match(c.encode_utf8(&mut buf))
}

/// The group a reference names, if the regex has it.
fn group_index(name: &str, regex: &Regex) -> Option<usize> {
    let numeric = name.bytes().all(|b| b.is_ascii_digit()) && !(name.len() > 1 && name.starts_with('0'));
    let index = if numeric {
        name.parse::<usize>().ok()?
    } else {
        regex.capture_names().position(|n| n == Some(name))?
    };
    (index < regex.captures_len()).then_some(index)
}

/// Go's `unicode.ToLower`: a simple, one-to-one mapping. The only multi-character full
/// lower-case mapping (U+0130) starts with its simple mapping.
fn push_lower(out: &mut String, c: char) {
    out.push(c.to_lowercase().next().unwrap_or(c));
}

/// Go's `unicode.ToUpper`: characters whose upper case is several characters (`ß`) are kept.
fn push_upper(out: &mut String, c: char) {
    let mut upper = c.to_uppercase();
    match (upper.next(), upper.next()) {
        (Some(u), None) => out.push(u),
        _ => out.push(c),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(action: &str) -> RelabelConfig {
        RelabelConfig {
            action: action.to_owned(),
            ..Default::default()
        }
    }

    fn src(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn target(name: &str) -> Option<String> {
        Some(name.to_owned())
    }

    fn lbls(pairs: &[(&str, &str)]) -> Labels {
        Labels::from_pairs(pairs.iter().copied())
    }

    /// Runs `cfgs` over `input`; None when dropped.
    fn run<'a>(input: &[(&str, &str)], cfgs: impl IntoIterator<Item = &'a RelabelConfig>) -> Option<Labels> {
        let rules: Vec<Rule> = cfgs.into_iter().map(|c| Rule::new(c).unwrap()).collect();
        let mut l = lbls(input);
        process(&mut l, &rules).then_some(l)
    }

    fn replace(sources: &[&str], regex: &str, target_label: &str, replacement: &str) -> RelabelConfig {
        RelabelConfig {
            source_labels: src(sources),
            regex: regex.into(),
            target_label: target(target_label),
            replacement: replacement.into(),
            ..Default::default()
        }
    }

    const ABC: &[(&str, &str)] = &[("a", "foo"), ("b", "bar"), ("c", "baz")];

    #[test]
    fn replace_with_group_references() {
        let out = run(ABC, &[replace(&["a"], "f(.*)", "d", "ch${1}-ch${1}")]).unwrap();
        assert_eq!(
            out,
            lbls(&[("a", "foo"), ("b", "bar"), ("c", "baz"), ("d", "choo-choo")])
        );
    }

    #[test]
    fn replace_joins_sources_and_chains() {
        let rules = [
            replace(&["a", "b"], "f(.*);(.*)r", "a", "b${1}${2}m"),
            replace(&["c", "a"], "(b).*b(.*)ba(.*)", "d", "$1$2$2$3"),
        ];
        let out = run(ABC, &rules).unwrap();
        assert_eq!(
            out,
            lbls(&[("a", "boobam"), ("b", "bar"), ("c", "baz"), ("d", "boooom")])
        );
    }

    #[test]
    fn replace_custom_separator() {
        let mut c = replace(&["a", "b"], "(.*)", "d", "$1");
        c.separator = "--".into();
        assert_eq!(run(ABC, &[c]).unwrap().get("d"), Some("foo--bar"));
    }

    #[test]
    fn replace_without_match_changes_nothing() {
        let out = run(
            ABC,
            &[replace(&["a"], "(f).*x", "d", "$1"), replace(&["a"], "o", "d", "x")],
        );
        assert_eq!(out.unwrap(), lbls(ABC));
    }

    #[test]
    fn missing_source_label_is_empty() {
        let out = run(&[("a", "foo")], &[replace(&["a", "missing"], "(foo);", "d", "ok")]).unwrap();
        assert_eq!(out.get("d"), Some("ok"));
        // A single missing source matches the empty string.
        let out = run(&[("a", "foo")], &[replace(&["missing"], "", "d", "empty")]).unwrap();
        assert_eq!(out.get("d"), Some("empty"));
    }

    #[test]
    fn replace_with_empty_result_deletes_target() {
        let out = run(ABC, &[replace(&["a"], "(f).*", "b", "$2")]).unwrap();
        assert_eq!(out, lbls(&[("a", "foo"), ("c", "baz")]));
        // Defaults: no sources, `(.*)` on "" gives an empty `$1`.
        let out = run(
            ABC,
            &[RelabelConfig {
                target_label: target("c"),
                ..Default::default()
            }],
        )
        .unwrap();
        assert_eq!(out.get("c"), None);
    }

    #[test]
    fn replace_literal_without_sources() {
        let c = RelabelConfig {
            target_label: target("__metrics_path__"),
            replacement: "/m".into(),
            ..Default::default()
        };
        assert_eq!(run(ABC, &[c]).unwrap().get("__metrics_path__"), Some("/m"));
    }

    #[test]
    fn replace_named_groups() {
        let c = replace(&["a"], "(?P<head>f)(?P<tail>.*)", "d", "$tail-${head}-$missing");
        assert_eq!(run(ABC, &[c]).unwrap().get("d"), Some("oo-f-"));
    }

    #[test]
    fn replacement_expansion_follows_go() {
        let expand = |replacement: &str| {
            run(&[("a", "foo")], &[replace(&["a"], "(f)(o+)", "d", replacement)])
                .unwrap()
                .get("d")
                .map(str::to_owned)
        };
        assert_eq!(expand("$$1").as_deref(), Some("$1"));
        assert_eq!(expand("$$$1").as_deref(), Some("$f"));
        // `$1_x` names group "1_x", which does not exist.
        assert_eq!(expand("v$1_x").as_deref(), Some("v"));
        assert_eq!(expand("v${1}_x").as_deref(), Some("vf_x"));
        // Leading zeros make a name, not a number; so does a trailing non-ASCII letter.
        assert_eq!(expand("v$01").as_deref(), Some("v"));
        assert_eq!(expand("v$1é").as_deref(), Some("v"));
        // Out-of-range groups are empty; malformed references stay literal.
        assert_eq!(expand("v$9").as_deref(), Some("v"));
        assert_eq!(expand("${1").as_deref(), Some("${1"));
        assert_eq!(expand("a$").as_deref(), Some("a$"));
        assert_eq!(expand("${}-$-").as_deref(), Some("${}-$-"));
        assert_eq!(expand("$0|$2").as_deref(), Some("foo|oo"));
    }

    #[test]
    fn regex_is_anchored_and_dot_matches_newline() {
        let keep = |regex: &str, value: &str| {
            let c = RelabelConfig {
                source_labels: src(&["a"]),
                regex: regex.into(),
                ..cfg("keep")
            };
            run(&[("a", value)], &[c]).is_some()
        };
        assert!(keep("f.*", "foo"));
        assert!(!keep("o", "foo"));
        assert!(!keep("fo", "foo"));
        assert!(keep("foo|bar", "bar"));
        assert!(keep("a.b", "a\nb"));
        assert!(keep("(.*)", "x\ny"));
    }

    #[test]
    fn target_label_template() {
        let c = replace(&["a"], "(.*)", "${1}_copy", "v");
        assert_eq!(run(&[("a", "foo")], [&c]).unwrap().get("foo_copy"), Some("v"));
        // An expansion that is not a label name skips the rule.
        assert_eq!(run(&[("a", "1bad")], [&c]).unwrap(), lbls(&[("a", "1bad")]));
        assert_eq!(run(&[("a", "a-b")], &[c]).unwrap(), lbls(&[("a", "a-b")]));
        let c = replace(&["a"], "(.*)", "${9}1x", "v");
        assert_eq!(run(&[("a", "x")], [&c]).unwrap(), lbls(&[("a", "x")]));
        let c = replace(&["missing"], "(.*)", "$1", "v");
        assert_eq!(run(&[("a", "x")], &[c]).unwrap(), lbls(&[("a", "x")]));
    }

    #[test]
    fn keep_and_drop() {
        let keep = RelabelConfig {
            source_labels: src(&["a"]),
            regex: "f.*".into(),
            ..cfg("keep")
        };
        let drop = RelabelConfig {
            action: "drop".into(),
            ..keep.clone()
        };
        assert!(run(ABC, [&keep]).is_some());
        assert!(run(&[("a", "boo")], &[keep]).is_none());
        assert!(run(ABC, [&drop]).is_none());
        assert_eq!(run(&[("a", "boo")], &[drop]).unwrap(), lbls(&[("a", "boo")]));
        // Missing label: "" only matches a regex that accepts it.
        let keep_empty = RelabelConfig {
            source_labels: src(&["x"]),
            regex: "".into(),
            ..cfg("keep")
        };
        assert!(run(ABC, &[keep_empty]).is_some());
        let drop_any = RelabelConfig {
            source_labels: src(&["x"]),
            ..cfg("drop")
        };
        assert!(run(ABC, &[drop_any]).is_none());
    }

    #[test]
    fn keepequal_and_dropequal() {
        let keepeq = RelabelConfig {
            source_labels: src(&["__tmp_port"]),
            target_label: target("port"),
            ..cfg("keepequal")
        };
        let dropeq = RelabelConfig {
            action: "dropequal".into(),
            ..keepeq.clone()
        };
        let same = [("__tmp_port", "80"), ("port", "80")];
        let differ = [("__tmp_port", "80"), ("port", "81")];
        assert!(run(&same, [&keepeq]).is_some());
        assert!(run(&differ, [&keepeq]).is_none());
        assert!(run(&same, [&dropeq]).is_none());
        assert_eq!(run(&differ, [&dropeq]).unwrap(), lbls(&differ));
        // Both missing compare equal ("" == "").
        assert!(run(&[("a", "1")], &[keepeq]).is_some());
        assert!(run(&[("a", "1")], &[dropeq]).is_none());
    }

    #[test]
    fn hashmod_matches_prometheus() {
        // Expected values: python3 -c 'import hashlib; d=hashlib.md5(V).digest();
        // print(int.from_bytes(d[8:], "big") % M)'
        let hashmod = |sources: &[&str], modulus: u64, input: &[(&str, &str)]| {
            let c = RelabelConfig {
                source_labels: src(sources),
                modulus: Some(modulus),
                target_label: target("h"),
                ..cfg("hashmod")
            };
            run(input, &[c]).unwrap().get("h").map(str::to_owned)
        };
        assert_eq!(hashmod(&["a"], 1000, ABC).as_deref(), Some("696"));
        assert_eq!(hashmod(&["a", "b"], 1000, ABC).as_deref(), Some("750"));
        assert_eq!(hashmod(&["x"], 10, ABC).as_deref(), Some("8"));
        assert_eq!(hashmod(&["a"], 1, ABC).as_deref(), Some("0"));
        assert_eq!(hashmod(&["b"], u64::MAX, ABC).as_deref(), Some("6581718738824679922"));
        assert_eq!(
            hashmod(&["__address__"], 3, &[("__address__", "10.0.0.1:9100")]).as_deref(),
            Some("2")
        );
    }

    #[test]
    fn labelmap() {
        let map = |regex: &str, replacement: &str, input: &[(&str, &str)]| {
            let c = RelabelConfig {
                regex: regex.into(),
                replacement: replacement.into(),
                ..cfg("labelmap")
            };
            run(input, &[c]).unwrap()
        };
        let input = [
            ("__meta_pod_label_app", "web"),
            ("__meta_pod_label_tier", "fe"),
            ("app", "old"),
        ];
        let out = map("__meta_pod_label_(.+)", "$1", &input);
        assert_eq!(out, lbls(&[input[0], input[1], ("app", "web"), ("tier", "fe")]));

        assert_eq!(
            map("(b.*)", "${1}_x", ABC),
            lbls(&[ABC[0], ABC[1], ABC[2], ("b_x", "bar")])
        );
        // Anchored: "a" does not match "ab".
        assert_eq!(map("a", "z", &[("ab", "1")]), lbls(&[("ab", "1")]));
        // Names come from the set before the rule: a -> b, then b's original value wins.
        assert_eq!(
            map("a|b", "b", &[("a", "1"), ("b", "2")]),
            lbls(&[("a", "1"), ("b", "2")])
        );
        assert_eq!(map("a|c", "b", &[("a", "1"), ("c", "3")]).get("b"), Some("3"));
        // Named groups work too.
        assert_eq!(map("x_(?P<n>.*)", "$n", &[("x_y", "1")]).get("y"), Some("1"));
    }

    #[test]
    fn labelmap_of_empty_discovery_value_deletes_target() {
        let rules = compile(&[RelabelConfig {
            regex: "__meta_(.+)".into(),
            replacement: "$1".into(),
            ..cfg("labelmap")
        }])
        .unwrap();
        let mut l = lbls(&[("x", "old")]);
        l.insert("__meta_x".into(), String::new());
        assert!(process(&mut l, &rules));
        assert_eq!(l.get("x"), None);
        assert_eq!(l.get("__meta_x"), Some(""));
    }

    #[test]
    fn labeldrop_and_labelkeep() {
        let drop = RelabelConfig {
            regex: "b.*".into(),
            ..cfg("labeldrop")
        };
        let keep = RelabelConfig {
            regex: "b.*".into(),
            ..cfg("labelkeep")
        };
        assert_eq!(run(ABC, &[drop]).unwrap(), lbls(&[("a", "foo"), ("c", "baz")]));
        assert_eq!(run(ABC, &[keep]).unwrap(), lbls(&[("b", "bar")]));
        let anchored = RelabelConfig {
            regex: "a".into(),
            ..cfg("labeldrop")
        };
        assert_eq!(
            run(&[("ab", "1"), ("a", "2")], &[anchored]).unwrap(),
            lbls(&[("ab", "1")])
        );
        let keep_all = cfg("labelkeep");
        assert_eq!(run(ABC, &[keep_all]).unwrap(), lbls(ABC));
    }

    #[test]
    fn lowercase_and_uppercase() {
        let input = [("foo", "bAr123FoO"), ("x", "ß")];
        let c = |action: &str, sources: &[&str]| RelabelConfig {
            source_labels: src(sources),
            target_label: target("out"),
            ..cfg(action)
        };
        assert_eq!(
            run(&input, &[c("lowercase", &["foo"])]).unwrap().get("out"),
            Some("bar123foo")
        );
        assert_eq!(
            run(&input, &[c("uppercase", &["foo"])]).unwrap().get("out"),
            Some("BAR123FOO")
        );
        assert_eq!(
            run(&input, &[c("uppercase", &["foo", "x"])]).unwrap().get("out"),
            Some("BAR123FOO;ß")
        );
        assert_eq!(
            run(&[("a", "ÀΣ")], &[c("lowercase", &["a"])]).unwrap().get("out"),
            Some("àσ")
        );
        assert_eq!(
            run(&[("a", "İ")], &[c("lowercase", &["a"])]).unwrap().get("out"),
            Some("i")
        );
        // An empty result deletes the target.
        let out = run(&[("out", "x")], &[c("lowercase", &["missing"])]).unwrap();
        assert_eq!(out.get("out"), None);
    }

    #[test]
    fn actions_are_case_insensitive() {
        let c = RelabelConfig {
            source_labels: src(&["a"]),
            regex: "foo".into(),
            ..cfg("DrOp")
        };
        assert!(run(ABC, &[c]).is_none());
        assert!(Rule::new(&RelabelConfig {
            regex: "x".into(),
            ..cfg("LabelKeep")
        })
        .is_ok());
        assert!(Rule::new(&RelabelConfig {
            target_label: target("t"),
            ..cfg("UPPERCASE")
        })
        .is_ok());
    }

    #[test]
    fn processing_stops_at_drop() {
        let rules = [
            RelabelConfig {
                source_labels: src(&["a"]),
                regex: "foo".into(),
                ..cfg("drop")
            },
            replace(&["a"], "(.*)", "z", "$1"),
        ];
        assert!(run(ABC, &rules).is_none());
        assert!(process(&mut lbls(ABC), &[]));
    }

    #[test]
    fn untouched_empty_values_survive() {
        let rules = compile(&[replace(&["a"], "(.*)", "b", "$1")]).unwrap();
        let mut l = lbls(&[("a", "1")]);
        l.insert("__meta_empty".into(), String::new());
        assert!(process(&mut l, &rules));
        assert_eq!(l.get("__meta_empty"), Some(""));
        assert_eq!(l.get("b"), Some("1"));
    }

    fn err(c: RelabelConfig) -> String {
        Rule::new(&c).unwrap_err().to_string()
    }

    #[test]
    fn validation_errors() {
        assert_eq!(err(cfg("bogus")), r#"unknown relabel action "bogus""#);
        assert_eq!(err(cfg("")), r#"unknown relabel action """#);
        assert_eq!(err(cfg("replace")), r#"relabel action "replace" requires target_label"#);
        for action in ["lowercase", "uppercase", "keepequal", "dropequal"] {
            assert_eq!(
                err(cfg(action)),
                format!("relabel action {action:?} requires target_label")
            );
        }
        let hashmod = RelabelConfig {
            target_label: target("h"),
            ..cfg("hashmod")
        };
        assert_eq!(
            err(hashmod.clone()),
            r#"relabel action "hashmod" requires a non-zero modulus"#
        );
        assert!(err(RelabelConfig {
            modulus: Some(0),
            ..hashmod.clone()
        })
        .contains("non-zero modulus"));
        assert!(err(RelabelConfig {
            modulus: Some(2),
            target_label: None,
            ..hashmod.clone()
        })
        .contains("requires target_label"));
        assert_eq!(
            err(RelabelConfig {
                modulus: Some(2),
                target_label: target("1h"),
                ..hashmod
            }),
            r#""1h" is not a valid target_label for relabel action "hashmod""#
        );

        assert!(err(replace(&[], "(.*)", "a-b", "$1")).contains("not a valid target_label"));
        assert!(err(replace(&[], "(.*)", "$1-x", "$1")).contains("not a valid target_label"));
        assert!(err(replace(&[], "(.*)", "${1", "$1")).contains("not a valid target_label"));
        assert!(Rule::new(&replace(&[], "(.*)", "x_${1}", "$1")).is_ok());
        assert!(Rule::new(&replace(&[], "(.*)", "$1", "$1")).is_ok());
        let lower = RelabelConfig {
            target_label: target("$1"),
            ..cfg("lowercase")
        };
        assert!(err(lower.clone()).contains("not a valid target_label"));
        let lower = RelabelConfig {
            target_label: target("t"),
            replacement: "x".into(),
            ..lower
        };
        assert_eq!(
            err(lower),
            r#"relabel action "lowercase" does not allow setting replacement"#
        );

        assert_eq!(
            err(RelabelConfig {
                replacement: "a-$1".into(),
                ..cfg("labelmap")
            }),
            r#""a-$1" is not a valid replacement for relabel action "labelmap""#
        );
        assert!(Rule::new(&RelabelConfig {
            replacement: "k8s_$1".into(),
            ..cfg("labelmap")
        })
        .is_ok());

        let keepeq = RelabelConfig {
            source_labels: src(&["a"]),
            target_label: target("b"),
            ..cfg("keepequal")
        };
        assert!(Rule::new(&keepeq).is_ok());
        let cases: [(&str, RelabelConfig); 4] = [
            (
                "regex",
                RelabelConfig {
                    regex: "x".into(),
                    ..keepeq.clone()
                },
            ),
            (
                "modulus",
                RelabelConfig {
                    modulus: Some(3),
                    ..keepeq.clone()
                },
            ),
            (
                "separator",
                RelabelConfig {
                    separator: ",".into(),
                    ..keepeq.clone()
                },
            ),
            (
                "replacement",
                RelabelConfig {
                    replacement: "x".into(),
                    ..keepeq.clone()
                },
            ),
        ];
        for (field, c) in cases {
            assert_eq!(
                err(c),
                format!("relabel action \"keepequal\" does not allow setting {field}")
            );
        }

        for action in ["labeldrop", "labelkeep"] {
            let base = RelabelConfig {
                regex: "x.*".into(),
                ..cfg(action)
            };
            assert!(Rule::new(&base).is_ok());
            let cases: [(&str, RelabelConfig); 5] = [
                (
                    "source_labels",
                    RelabelConfig {
                        source_labels: src(&["a"]),
                        ..base.clone()
                    },
                ),
                (
                    "target_label",
                    RelabelConfig {
                        target_label: target("a"),
                        ..base.clone()
                    },
                ),
                (
                    "modulus",
                    RelabelConfig {
                        modulus: Some(1),
                        ..base.clone()
                    },
                ),
                (
                    "separator",
                    RelabelConfig {
                        separator: ",".into(),
                        ..base.clone()
                    },
                ),
                (
                    "replacement",
                    RelabelConfig {
                        replacement: "x".into(),
                        ..base.clone()
                    },
                ),
            ];
            for (field, c) in cases {
                assert_eq!(
                    err(c),
                    format!("relabel action {action:?} does not allow setting {field}")
                );
            }
            // Defaults written out explicitly are fine.
            assert!(Rule::new(&RelabelConfig {
                target_label: target(""),
                modulus: Some(0),
                ..base
            })
            .is_ok());
        }

        assert_eq!(
            err(RelabelConfig {
                source_labels: src(&["ok", "not-ok"]),
                ..cfg("keep")
            }),
            r#""not-ok" is not a valid label name in source_labels"#
        );
        let e = Rule::new(&RelabelConfig {
            regex: "(".into(),
            ..cfg("keep")
        })
        .unwrap_err();
        assert_eq!(e.to_string(), r#"invalid relabel regex "(""#);
        assert!(std::error::Error::source(&e).is_some());
        assert!(compile(&[cfg("keep"), cfg("nope")]).is_err());
    }

    #[test]
    fn label_names() {
        for ok in ["a", "_", "__name__", "A9_z"] {
            assert!(is_valid_label_name(ok), "{ok}");
        }
        for bad in ["", "9a", "a-b", "a.b", "é", "a b"] {
            assert!(!is_valid_label_name(bad), "{bad}");
        }
    }
}
