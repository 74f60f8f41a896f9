//! `${NAME}` and `${NAME:-default}` expansion in scalar values.
//!
//! Only those two forms are expanded, with `NAME` matching `[A-Za-z_][A-Za-z0-9_]*`; `$$` is
//! a literal `$`. Every other `$` (`$1`, `${1}`, `$name`, a lone `$`) is kept as written,
//! because relabel replacements use them. A default applies when the variable is unset or
//! empty, as in the shell; the default itself is not expanded further.

use std::borrow::Cow;

/// Expands `text`, looking variables up with `lookup`. On failure returns the name of the
/// first variable that is unset and has no default.
pub(crate) fn expand<'t>(text: &'t str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<Cow<'t, str>, String> {
    if !text.contains('$') {
        return Ok(Cow::Borrowed(text));
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        if rest.starts_with("$$") {
            out.push('$');
            rest = &rest[2..];
            continue;
        }
        match reference(rest) {
            Some((name, default, len)) => {
                match (lookup(name), default) {
                    (Some(v), Some(d)) if v.is_empty() => out.push_str(d),
                    (Some(v), _) => out.push_str(&v),
                    (None, Some(d)) => out.push_str(d),
                    (None, None) => return Err(name.to_owned()),
                }
                rest = &rest[len..];
            }
            None => {
                out.push('$');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    Ok(Cow::Owned(out))
}

/// Parses `${NAME}` or `${NAME:-default}` at the start of `s` (which starts with `$`):
/// the name, the default, and the length of the whole reference.
fn reference(s: &str) -> Option<(&str, Option<&str>, usize)> {
    let body = s.strip_prefix("${")?;
    let close = body.find('}')?;
    let inner = &body[..close];
    let (name, default) = match inner.find(":-") {
        Some(i) => (&inner[..i], Some(&inner[i + 2..])),
        None => (inner, None),
    };
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return None;
    }
    Some((name, default, close + 3))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "A" => Some("alpha".to_owned()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    fn ex(s: &str) -> Result<String, String> {
        expand(s, &env).map(Cow::into_owned)
    }

    #[test]
    fn expands_braced_names_and_defaults() {
        assert_eq!(ex("${A}").unwrap(), "alpha");
        assert_eq!(ex("x-${A}-y").unwrap(), "x-alpha-y");
        assert_eq!(ex("${B:-x}").unwrap(), "x");
        assert_eq!(ex("${A:-x}").unwrap(), "alpha");
        assert_eq!(ex("${EMPTY:-d}").unwrap(), "d");
        assert_eq!(ex("${EMPTY}").unwrap(), "");
        assert_eq!(ex("${B:-}").unwrap(), "");
        assert_eq!(ex("${B:-a:b/c}").unwrap(), "a:b/c");
    }

    #[test]
    fn keeps_other_dollar_forms() {
        for s in [
            "$1",
            "${1}",
            "$name",
            "a$",
            "${1}_${2}",
            "$",
            "${",
            "${A",
            "${-x}",
            "${A-x}",
            "${a.b}",
        ] {
            assert_eq!(ex(s).unwrap(), s);
        }
    }

    #[test]
    fn double_dollar_is_literal() {
        assert_eq!(ex("$$").unwrap(), "$");
        assert_eq!(ex("$${A}").unwrap(), "${A}");
        assert_eq!(ex("$$$1").unwrap(), "$$1");
    }

    #[test]
    fn unset_without_default_names_the_variable() {
        assert_eq!(ex("pre ${NOPE} post").unwrap_err(), "NOPE");
    }
}
