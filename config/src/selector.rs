//! Kubernetes label and field selectors (`kubernetes_sd_configs[].selectors`), parsed once so
//! that `check-config` and the agent agree, and matched client-side by the agent's shared pod
//! cache (configs that share one watch apply their own selectors to it).
//!
//! Label selectors follow `k8s.io/apimachinery/pkg/labels`: comma-separated requirements
//! `key`, `!key`, `key=value`, `key==value`, `key!=value`, `key in (a,b)`, `key notin (a,b)`.
//! Field selectors follow `k8s.io/apimachinery/pkg/fields`: `field=value`, `field==value`,
//! `field!=value`, comma-separated, over the fields the API server accepts for pods.

use std::collections::BTreeMap;
use std::fmt;

/// Pod fields the API server accepts in a field selector (`pkg/registry/core/pod`).
pub const POD_FIELDS: &[&str] = &[
    "metadata.name",
    "metadata.namespace",
    "spec.nodeName",
    "spec.restartPolicy",
    "spec.schedulerName",
    "spec.serviceAccountName",
    "spec.hostNetwork",
    "status.phase",
    "status.podIP",
    "status.nominatedNodeName",
];

/// One requirement of a label selector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LabelRequirement {
    /// `key` — the label is present.
    Exists(String),
    /// `!key` — the label is absent.
    DoesNotExist(String),
    /// `key=value` / `key==value`.
    Equals(String, String),
    /// `key!=value` — absent or another value.
    NotEquals(String, String),
    /// `key in (a,b)`.
    In(String, Vec<String>),
    /// `key notin (a,b)` — absent or none of the values.
    NotIn(String, Vec<String>),
}

/// A parsed label selector; empty matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelSelector(pub Vec<LabelRequirement>);

/// One requirement of a field selector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldRequirement {
    /// The field path, one of [`POD_FIELDS`].
    pub field: String,
    /// The value compared with.
    pub value: String,
    /// `!=` instead of `=`.
    pub negated: bool,
}

/// A parsed field selector; empty matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldSelector(pub Vec<FieldRequirement>);

/// Why a selector did not parse.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SelectorError(pub String);

impl fmt::Display for SelectorError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SelectorError {}

fn err<T>(msg: impl Into<String>) -> Result<T, SelectorError> {
    Err(SelectorError(msg.into()))
}

/// Splits at commas outside parentheses.
fn split_top_level(text: &str) -> Result<Vec<&str>, SelectorError> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth < 0 {
                    return err(format!("unbalanced ')' at byte {i}"));
                }
            }
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return err("unclosed '('");
    }
    parts.push(&text[start..]);
    Ok(parts)
}

/// A label key: an optional DNS-subdomain prefix and `/`, then a name of at most 63
/// characters of `[A-Za-z0-9._-]` starting and ending alphanumeric.
fn check_key(key: &str) -> Result<(), SelectorError> {
    let name = match key.rsplit_once('/') {
        Some((prefix, name)) => {
            let ok = !prefix.is_empty()
                && prefix.len() <= 253
                && prefix
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
            if !ok {
                return err(format!("invalid label key prefix in {key:?}"));
            }
            name
        }
        None => key,
    };
    check_name(name, "label key").map_err(|e| SelectorError(format!("{} in {key:?}", e.0)))
}

fn check_name(name: &str, what: &str) -> Result<(), SelectorError> {
    let alnum = |c: char| c.is_ascii_alphanumeric();
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.chars().all(|c| alnum(c) || c == '-' || c == '_' || c == '.')
        && name.starts_with(alnum)
        && name.ends_with(alnum);
    if ok {
        Ok(())
    } else {
        err(format!(
            "invalid {what} {name:?} (at most 63 characters of [A-Za-z0-9._-], alphanumeric at both ends)"
        ))
    }
}

fn check_value(value: &str) -> Result<(), SelectorError> {
    if value.is_empty() {
        return Ok(());
    }
    check_name(value, "label value")
}

impl LabelSelector {
    /// Parses `text`; an empty or all-blank text is the empty selector.
    pub fn parse(text: &str) -> Result<Self, SelectorError> {
        let mut out = Vec::new();
        if text.trim().is_empty() {
            return Ok(Self(out));
        }
        for part in split_top_level(text)? {
            out.push(parse_label_requirement(part.trim())?);
        }
        Ok(Self(out))
    }

    /// Whether `labels` satisfy every requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|r| match r {
            LabelRequirement::Exists(k) => labels.contains_key(k),
            LabelRequirement::DoesNotExist(k) => !labels.contains_key(k),
            LabelRequirement::Equals(k, v) => labels.get(k) == Some(v),
            LabelRequirement::NotEquals(k, v) => labels.get(k) != Some(v),
            LabelRequirement::In(k, vs) => labels.get(k).is_some_and(|l| vs.contains(l)),
            LabelRequirement::NotIn(k, vs) => !labels.get(k).is_some_and(|l| vs.contains(l)),
        })
    }
}

fn parse_label_requirement(part: &str) -> Result<LabelRequirement, SelectorError> {
    if part.is_empty() {
        return err("empty requirement (stray comma?)");
    }
    if let Some(key) = part.strip_prefix('!') {
        let key = key.trim();
        check_key(key)?;
        return Ok(LabelRequirement::DoesNotExist(key.to_owned()));
    }
    for (op, negated) in [("!=", true), ("==", false), ("=", false)] {
        if let Some((k, v)) = part.split_once(op) {
            let (k, v) = (k.trim(), v.trim());
            check_key(k)?;
            check_value(v)?;
            return Ok(if negated {
                LabelRequirement::NotEquals(k.to_owned(), v.to_owned())
            } else {
                LabelRequirement::Equals(k.to_owned(), v.to_owned())
            });
        }
    }
    let mut words = part.splitn(2, char::is_whitespace);
    let key = words.next().unwrap_or_default();
    let rest = words.next().unwrap_or_default().trim();
    if rest.is_empty() {
        check_key(key)?;
        return Ok(LabelRequirement::Exists(key.to_owned()));
    }
    let (op, list) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    let (op, list) = match rest.find('(') {
        Some(i) if op.len() > i => (rest[..i].trim(), &rest[i..]),
        _ => (op, list.trim()),
    };
    let values = || -> Result<Vec<String>, SelectorError> {
        let inner = list
            .strip_prefix('(')
            .and_then(|l| l.strip_suffix(')'))
            .ok_or_else(|| SelectorError(format!("expected a parenthesised value list after {op:?} in {part:?}")))?;
        let values: Vec<String> = inner.split(',').map(|v| v.trim().to_owned()).collect();
        for v in &values {
            check_value(v)?;
        }
        Ok(values)
    };
    check_key(key)?;
    match op {
        "in" => Ok(LabelRequirement::In(key.to_owned(), values()?)),
        "notin" => Ok(LabelRequirement::NotIn(key.to_owned(), values()?)),
        other => err(format!(
            "unknown operator {other:?} in {part:?} (expected =, ==, !=, in, notin, key or !key)"
        )),
    }
}

impl FieldSelector {
    /// Parses `text` and checks every field against [`POD_FIELDS`].
    pub fn parse(text: &str) -> Result<Self, SelectorError> {
        let mut out = Vec::new();
        if text.trim().is_empty() {
            return Ok(Self(out));
        }
        for part in text.split(',') {
            let part = part.trim();
            let (field, value, negated) = if let Some((f, v)) = part.split_once("!=") {
                (f, v, true)
            } else if let Some((f, v)) = part.split_once("==") {
                (f, v, false)
            } else if let Some((f, v)) = part.split_once('=') {
                (f, v, false)
            } else {
                return err(format!("{part:?} is not field=value, field==value or field!=value"));
            };
            let field = field.trim();
            if !POD_FIELDS.contains(&field) {
                return err(format!(
                    "field {field:?} cannot be selected on for pods (supported: {})",
                    POD_FIELDS.join(", ")
                ));
            }
            out.push(FieldRequirement {
                field: field.to_owned(),
                value: value.trim().to_owned(),
                negated,
            });
        }
        Ok(Self(out))
    }

    /// Whether every requirement holds; `field` gives a field's value (empty when unset).
    pub fn matches(&self, field: impl Fn(&str) -> String) -> bool {
        self.0.iter().all(|r| (field(&r.field) == r.value) != r.negated)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn label_selector_operators() {
        let s = LabelSelector::parse("app=web, tier in (a, b),!canary,env!=prod,team,zone notin (x)").unwrap();
        assert_eq!(s.0.len(), 6);
        let l = labels(&[("app", "web"), ("tier", "b"), ("env", "dev"), ("team", "t")]);
        assert!(s.matches(&l));
        let mut l2 = l.clone();
        l2.insert("canary".into(), "1".into());
        assert!(!s.matches(&l2));
        let mut l3 = l.clone();
        l3.insert("zone".into(), "x".into());
        assert!(!s.matches(&l3));
        let mut l4 = l;
        l4.remove("team");
        assert!(!s.matches(&l4));
        assert!(LabelSelector::parse("").unwrap().matches(&labels(&[])));
        assert!(LabelSelector::parse("app.kubernetes.io/name==x")
            .unwrap()
            .matches(&labels(&[("app.kubernetes.io/name", "x")])));
        assert!(LabelSelector::parse("a in(x,y)")
            .unwrap()
            .matches(&labels(&[("a", "y")])));
    }

    #[test]
    fn label_selector_errors_say_what_is_wrong() {
        for (text, want) in [
            ("app=web,", "empty requirement"),
            ("a in x", "parenthesised"),
            ("a in (x", "unclosed"),
            ("a like x", "unknown operator"),
            ("-bad=x", "invalid label key"),
            ("a=b c", "invalid label value"),
        ] {
            let e = LabelSelector::parse(text).unwrap_err();
            assert!(e.0.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn field_selector_parse_and_match() {
        let s = FieldSelector::parse("spec.nodeName=n1,status.phase!=Succeeded").unwrap();
        let get = |phase: &'static str| {
            move |f: &str| match f {
                "spec.nodeName" => "n1".to_owned(),
                "status.phase" => phase.to_owned(),
                _ => String::new(),
            }
        };
        assert!(s.matches(get("Running")));
        assert!(!s.matches(get("Succeeded")));
        let e = FieldSelector::parse("metadata.labels.app=x").unwrap_err();
        assert!(e.0.contains("cannot be selected on"), "{e}");
        assert!(FieldSelector::parse("spec.nodeName").is_err());
    }
}
