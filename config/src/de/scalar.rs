//! Typing plain scalars the way yaml.v2 users expect, and describing nodes in messages.

use std::borrow::Cow;

use crate::yaml::{Entry, Node, Style};

/// A node after `${VAR}` expansion.
pub(super) enum View<'a> {
    Null,
    Scalar(Cow<'a, str>, Style),
    Seq(&'a [Node]),
    Map(&'a [Entry]),
}

/// How a plain scalar reads.
#[derive(Debug, PartialEq)]
pub(super) enum Typed {
    Bool(bool),
    Int(i128),
    Float(f64),
    Str,
}

pub(super) fn resolve_plain(text: &str) -> Typed {
    match text {
        "true" | "True" | "TRUE" | "yes" | "Yes" | "YES" | "on" | "On" | "ON" => return Typed::Bool(true),
        "false" | "False" | "FALSE" | "no" | "No" | "NO" | "off" | "Off" | "OFF" => return Typed::Bool(false),
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => return Typed::Float(f64::INFINITY),
        "-.inf" | "-.Inf" | "-.INF" => return Typed::Float(f64::NEG_INFINITY),
        ".nan" | ".NaN" | ".NAN" => return Typed::Float(f64::NAN),
        _ => {}
    }
    if let Some(i) = parse_int(text) {
        return Typed::Int(i);
    }
    let numeric = text.bytes().any(|b| b.is_ascii_digit())
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-' | b'_'));
    match text.replace('_', "").parse::<f64>() {
        Ok(f) if numeric => Typed::Float(f),
        _ => Typed::Str,
    }
}

/// A YAML integer: optional sign, then decimal, `0x` hex, `0o` octal or `0b` binary digits,
/// `_` allowed between digits.
pub(super) fn parse_int(text: &str) -> Option<i128> {
    let (neg, body) = match text.as_bytes().first()? {
        b'-' => (true, &text[1..]),
        b'+' => (false, &text[1..]),
        _ => (false, text),
    };
    let (radix, digits) = if let Some(d) = body.strip_prefix("0x") {
        (16, d)
    } else if let Some(d) = body.strip_prefix("0o") {
        (8, d)
    } else if let Some(d) = body.strip_prefix("0b") {
        (2, d)
    } else {
        (10, body)
    };
    if digits.is_empty() || digits.starts_with('_') || !digits.chars().all(|c| c == '_' || c.is_digit(radix)) {
        return None;
    }
    let n = i128::from_str_radix(&digits.replace('_', ""), radix).ok()?;
    Some(if neg { -n } else { n })
}

pub(super) fn describe(view: &View<'_>) -> String {
    let quote = |t: &str| {
        let mut s: String = t.chars().take(40).collect();
        if s.len() < t.len() {
            s.push('…');
        }
        format!("{s:?}")
    };
    match view {
        View::Null => "an empty value".to_owned(),
        View::Seq(_) => "a sequence".to_owned(),
        View::Map(_) => "a mapping".to_owned(),
        View::Scalar(t, Style::Quoted) => format!("a quoted string {}", quote(t)),
        View::Scalar(t, Style::Plain) => {
            let kind = match resolve_plain(t) {
                Typed::Bool(_) => "a boolean",
                Typed::Int(_) => "an integer",
                Typed::Float(_) => "a number",
                Typed::Str => "a string",
            };
            format!("{kind} {}", quote(t))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_scalars_are_typed_like_yaml_1_1() {
        assert_eq!(resolve_plain("true"), Typed::Bool(true));
        assert_eq!(resolve_plain("Off"), Typed::Bool(false));
        assert_eq!(resolve_plain("15"), Typed::Int(15));
        assert_eq!(resolve_plain("-0x1F"), Typed::Int(-31));
        assert_eq!(resolve_plain("1_000"), Typed::Int(1000));
        assert_eq!(resolve_plain("1.5"), Typed::Float(1.5));
        assert_eq!(resolve_plain("1e3"), Typed::Float(1000.0));
        assert_eq!(resolve_plain("inf"), Typed::Str);
        assert_eq!(resolve_plain("15s"), Typed::Str);
        assert_eq!(resolve_plain("localhost:9090"), Typed::Str);
        assert_eq!(resolve_plain("1.2.3.4"), Typed::Str);
    }
}
