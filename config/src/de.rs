//! A serde `Deserializer` over the [`yaml`](crate::yaml) tree that reports every error it can.
//!
//! Errors carry the node they were raised at. Serde visitors stop at the first error and
//! cannot be restarted, so [`deserialize`] recovers by restarting the whole value: it records
//! the error, marks the failing node as *poisoned* and deserializes the document again with
//! poisoned nodes left out (a poisoned mapping entry reads as absent, a poisoned sequence
//! element as missing). Each round poisons one more node, so every independent error in the
//! file is found; the result is only returned when no error was recorded. An error raised by
//! a node that lost children this way (say "missing field") is a consequence, not news, and
//! is not reported.
//!
//! Keys that a struct does not declare are reported (or, when the caller's `ignored` predicate
//! says so, warned about) and skipped without failing anything, so all of them are found too.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashSet;
use std::fmt;

use serde::de::{self, DeserializeOwned, DeserializeSeed, Visitor};

use crate::env;
use crate::error::{at_path, Diagnostics, Pos};
use crate::yaml::{is_null, Entry, Kind, Node, Style};

/// Most recovery rounds before giving up on finding further errors.
const MAX_ROUNDS: usize = 500;

/// Deserializes `T` from `root`, recording every error and warning into `diags`.
/// Returns `None` when deserialization failed; when it returns a value the caller must still
/// check `diags` for errors such as unknown keys.
pub(crate) fn deserialize<T: DeserializeOwned>(
    root: &Node,
    env: &dyn Fn(&str) -> Option<String>,
    ignored: &dyn Fn(&str, &str) -> bool,
    diags: &RefCell<Diagnostics>,
) -> Option<T> {
    let mut poisoned = HashSet::new();
    for _ in 0..MAX_ROUNDS {
        let err = {
            let session = Session {
                env,
                ignored,
                poisoned: &poisoned,
                diags,
            };
            let de = NodeDe {
                node: root,
                s: &session,
            };
            match T::deserialize(de) {
                Ok(value) => return Some(value),
                Err(e) => de.locate(e),
            }
        };
        let Error::At {
            node,
            pos,
            message,
            suppressed,
        } = err
        else {
            unreachable!("located above")
        };
        if !suppressed {
            diags.borrow_mut().error(pos, message);
        }
        if node == root.id || !poisoned.insert(node) {
            return None;
        }
    }
    diags
        .borrow_mut()
        .error(root.pos, format!("too many errors, stopped after {MAX_ROUNDS}"));
    None
}

/// What one deserialization round shares.
struct Session<'a> {
    env: &'a dyn Fn(&str) -> Option<String>,
    ignored: &'a dyn Fn(&str, &str) -> bool,
    poisoned: &'a HashSet<usize>,
    diags: &'a RefCell<Diagnostics>,
}

impl Session<'_> {
    fn live(&self, node: &Node) -> bool {
        !self.poisoned.contains(&node.id)
    }

    fn live_entry(&self, e: &Entry) -> bool {
        self.live(&e.key) && self.live(&e.value)
    }
}

/// The deserializer's error.
#[derive(Debug)]
pub(crate) enum Error {
    /// Raised at (or attributed to) a node; `message` already starts with the node's path.
    At {
        node: usize,
        pos: Pos,
        message: String,
        suppressed: bool,
    },
    /// From a visitor, not yet attributed to a node.
    Msg(String),
    /// A struct lacks a field without default; attributed to the struct's node.
    MissingField(&'static str),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::At { message, .. } | Error::Msg(message) => f.write_str(message),
            Error::MissingField(field) => write!(f, "missing required key `{field}`"),
        }
    }
}

impl std::error::Error for Error {}

impl de::Error for Error {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Error::Msg(msg.to_string())
    }
    fn invalid_type(unexp: de::Unexpected, exp: &dyn de::Expected) -> Self {
        Error::Msg(format!("expected {exp}, got {unexp}"))
    }
    fn invalid_value(unexp: de::Unexpected, exp: &dyn de::Expected) -> Self {
        Error::Msg(format!("invalid value {unexp}, expected {exp}"))
    }
    fn invalid_length(len: usize, exp: &dyn de::Expected) -> Self {
        Error::Msg(format!("expected {exp}, got {len} elements"))
    }
    fn unknown_variant(variant: &str, expected: &'static [&'static str]) -> Self {
        Error::Msg(format!(
            "unknown value `{variant}` (expected one of: {})",
            expected.join(", ")
        ))
    }
    fn missing_field(field: &'static str) -> Self {
        Error::MissingField(field)
    }
    fn duplicate_field(field: &'static str) -> Self {
        Error::Msg(format!("duplicate key `{field}`"))
    }
}

/// A node after `${VAR}` expansion.
enum View<'a> {
    Null,
    Scalar(Cow<'a, str>, Style),
    Seq(&'a [Node]),
    Map(&'a [Entry]),
}

/// How a plain scalar reads.
#[derive(Debug, PartialEq)]
enum Typed {
    Bool(bool),
    Int(i128),
    Float(f64),
    Str,
}

fn resolve_plain(text: &str) -> Typed {
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
fn parse_int(text: &str) -> Option<i128> {
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

fn describe(view: &View<'_>) -> String {
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

/// `ScrapeConfig` → `scrape config`.
fn humanize(type_name: &str) -> String {
    let mut out = String::new();
    for (i, c) in type_name.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push(' ');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

fn unknown_key_message(strukt: &str, key: &str, fields: &[&str]) -> String {
    let what = humanize(strukt);
    let close = fields
        .iter()
        .map(|f| (edit_distance(key, f), f))
        .filter(|(d, _)| *d <= 2 && *d * 3 <= key.len())
        .min_by_key(|(d, _)| *d);
    match close {
        Some((_, f)) => format!("unknown key `{key}` in {what} (did you mean `{f}`?)"),
        None => format!("unknown key `{key}` in {what} (expected one of: {})", fields.join(", ")),
    }
}

/// Deserializes one node.
#[derive(Clone, Copy)]
struct NodeDe<'a> {
    node: &'a Node,
    s: &'a Session<'a>,
}

impl<'a> NodeDe<'a> {
    fn child(&self, node: &'a Node) -> NodeDe<'a> {
        NodeDe { node, s: self.s }
    }

    /// Attributes an error to this node unless it already belongs to one.
    fn locate(&self, e: Error) -> Error {
        let (message, suppressed) = match e {
            Error::At { .. } => return e,
            Error::Msg(m) => (m, self.lost_children()),
            Error::MissingField(f) => (format!("missing required key `{f}`"), self.lost_key(f)),
        };
        Error::At {
            node: self.node.id,
            pos: self.node.pos,
            message: at_path(&self.node.path, message),
            suppressed,
        }
    }

    fn fail(&self, message: impl Into<String>) -> Error {
        self.locate(Error::Msg(message.into()))
    }

    fn expected(&self, what: &str, got: &View<'_>) -> Error {
        self.fail(format!("expected {what}, got {}", describe(got)))
    }

    fn lost_children(&self) -> bool {
        match &self.node.kind {
            Kind::Seq(items) => items.iter().any(|n| !self.s.live(n)),
            Kind::Map(entries) => entries.iter().any(|e| !self.s.live_entry(e)),
            Kind::Null | Kind::Scalar { .. } => false,
        }
    }

    fn lost_key(&self, key: &str) -> bool {
        match &self.node.kind {
            Kind::Map(entries) => entries
                .iter()
                .any(|e| e.key.key_text() == Some(key) && !self.s.live_entry(e)),
            _ => false,
        }
    }

    /// The node with `${VAR}` expanded in a scalar. A plain scalar that expands to a null
    /// spelling (`${TOKEN:-}`) reads as null, as if the text had been written in the file.
    fn view(&self) -> Result<View<'a>, Error> {
        Ok(match &self.node.kind {
            Kind::Null => View::Null,
            Kind::Seq(items) => View::Seq(items),
            Kind::Map(entries) => View::Map(entries),
            Kind::Scalar { text, style } => {
                let value = env::expand(text, self.s.env).map_err(|name| {
                    self.fail(format!(
                        "environment variable `{name}` is not set (write ${{{name}:-default}} to give a default)"
                    ))
                })?;
                if *style == Style::Plain && matches!(value, Cow::Owned(_)) && is_null(&value) {
                    View::Null
                } else {
                    View::Scalar(value, *style)
                }
            }
        })
    }

    fn int<V: Visitor<'a>>(self, visitor: V, unsigned: bool) -> Result<V::Value, Error> {
        let what = if unsigned {
            "a non-negative integer"
        } else {
            "an integer"
        };
        let view = self.view()?;
        let n = match &view {
            View::Scalar(t, Style::Plain) => parse_int(t),
            _ => None,
        };
        let result = match n {
            Some(n) if unsigned && n < 0 => Err(self.expected(what, &view)),
            Some(n) if n >= 0 => match u64::try_from(n) {
                Ok(n) => visitor.visit_u64(n),
                Err(_) => Err(self.fail(format!("integer {n} is too large"))),
            },
            Some(n) => match i64::try_from(n) {
                Ok(n) => visitor.visit_i64(n),
                Err(_) => Err(self.fail(format!("integer {n} is too small"))),
            },
            None => Err(self.expected(what, &view)),
        };
        result.map_err(|e| self.locate(e))
    }

    fn seq<V: Visitor<'a>>(self, visitor: V) -> Result<V::Value, Error> {
        let items: &[Node] = match self.view()? {
            View::Seq(items) => items,
            View::Null => &[],
            other => return Err(self.expected("a sequence", &other)),
        };
        let access = SeqDe {
            items: items.iter(),
            s: self.s,
        };
        visitor.visit_seq(access).map_err(|e| self.locate(e))
    }

    fn entries(&self) -> Result<&'a [Entry], Error> {
        match self.view()? {
            View::Map(entries) => Ok(entries),
            View::Null => Ok(&[]),
            other => Err(self.expected("a mapping", &other)),
        }
    }

    /// Keeps the entries a struct declares; reports or warns about the others.
    fn struct_entries(&self, name: &str, fields: &[&str]) -> Result<Vec<&'a Entry>, Error> {
        let mut keep = Vec::new();
        for entry in self.entries()?.iter().filter(|e| self.s.live_entry(e)) {
            let mut diags = self.s.diags.borrow_mut();
            let Some(key) = entry.key.key_text().filter(|_| !matches!(entry.key.kind, Kind::Null)) else {
                diags.error(
                    entry.key.pos,
                    at_path(&self.node.path, format!("keys of {} must be strings", humanize(name))),
                );
                continue;
            };
            if fields.contains(&key) {
                keep.push(entry);
            } else if (self.s.ignored)(name, key) {
                let msg = format!("key `{key}` is accepted for Prometheus compatibility and ignored");
                diags.warning(entry.key.pos, at_path(&self.node.path, msg));
            } else {
                diags.error(
                    entry.key.pos,
                    at_path(&self.node.path, unknown_key_message(name, key, fields)),
                );
            }
        }
        Ok(keep)
    }
}

macro_rules! ints {
    ($($method:ident => $unsigned:expr),* $(,)?) => {
        $(fn $method<V: Visitor<'a>>(self, visitor: V) -> Result<V::Value, Error> {
            self.int(visitor, $unsigned)
        })*
    };
}

impl<'a> de::Deserializer<'a> for NodeDe<'a> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'a>>(self, visitor: V) -> Result<V::Value, Error> {
        let result = match self.view()? {
            View::Null => visitor.visit_unit(),
            View::Scalar(t, Style::Quoted) => visitor.visit_str(&t),
            View::Scalar(t, Style::Plain) => match resolve_plain(&t) {
                Typed::Bool(b) => visitor.visit_bool(b),
                Typed::Int(n) => match (u64::try_from(n), i64::try_from(n)) {
                    (Ok(u), _) => visitor.visit_u64(u),
                    (_, Ok(i)) => visitor.visit_i64(i),
                    _ => visitor.visit_str(&t),
                },
                Typed::Float(f) => visitor.visit_f64(f),
                Typed::Str => visitor.visit_str(&t),
            },
            View::Seq(_) => return self.seq(visitor),
            View::Map(_) => return self.deserialize_map(visitor),
        };
        result.map_err(|e| self.locate(e))
    }

    fn deserialize_bool<V: Visitor<'a>>(self, visitor: V) -> Result<V::Value, Error> {
        let view = self.view()?;
        match &view {
            View::Scalar(t, Style::Plain) => match resolve_plain(t) {
                Typed::Bool(b) => visitor.visit_bool(b).map_err(|e| self.locate(e)),
                _ => Err(self.expected("a boolean (true or false)", &view)),
            },
            _ => Err(self.expected("a boolean (true or false)", &view)),
        }
    }

    ints! {
        deserialize_i8 => false, deserialize_i16 => false, deserialize_i32 => false,
        deserialize_i64 => false, deserialize_i128 => false,
        deserialize_u8 => true, deserialize_u16 => true, deserialize_u32 => true,
        deserialize_u64 => true, deserialize_u128 => true,
    }

    fn deserialize_f32<V: Visitor<'a>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_f64(visitor)
    }

    fn deserialize_f64<V: Visitor<'a>>(self, visitor: V) -> Result<V::Value, Error> {
        let view = self.view()?;
        let value = match &view {
            View::Scalar(t, Style::Plain) => match resolve_plain(t) {
                Typed::Int(n) => Some(n as f64),
                Typed::Float(f) => Some(f),
                _ => None,
            },
            _ => None,
        };
        match value {
            Some(f) => visitor.visit_f64(f).map_err(|e| self.locate(e)),
            None => Err(self.expected("a number", &view)),
        }
    }

    fn deserialize_char<V: Visitor<'a>>(self, visitor: V) -> Result<V::Value, Error> {
        let view = self.view()?;
        if let View::Scalar(t, _) = &view {
            let mut chars = t.chars();
            if let (Some(c), None) = (chars.next(), chars.next()) {
                return visitor.visit_char(c).map_err(|e| self.locate(e));
            }
        }
        Err(self.expected("a single character", &view))
    }

    fn deserialize_str<V: Visitor<'a>>(self, visitor: V) -> Result<V::Value, Error> {
        let result = match self.view()? {
            View::Null => visitor.visit_str(""),
            View::Scalar(t, _) => visitor.visit_str(&t),
            other => return Err(self.expected("a string", &other)),
        };
        result.map_err(|e| self.locate(e))
    }

    fn deserialize_string<V: Visitor<'a>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_str(visitor)
    }

    fn deserialize_bytes<V: Visitor<'a>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_str(visitor)
    }

    fn deserialize_byte_buf<V: Visitor<'a>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_str(visitor)
    }

    fn deserialize_option<V: Visitor<'a>>(self, visitor: V) -> Result<V::Value, Error> {
        let result = match self.view()? {
            View::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        };
        result.map_err(|e| self.locate(e))
    }

    fn deserialize_unit<V: Visitor<'a>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.view()? {
            View::Null => visitor.visit_unit().map_err(|e| self.locate(e)),
            other => Err(self.expected("an empty value", &other)),
        }
    }

    fn deserialize_unit_struct<V: Visitor<'a>>(self, _name: &'static str, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_unit(visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'a>>(self, _name: &'static str, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_newtype_struct(self).map_err(|e| self.locate(e))
    }

    fn deserialize_seq<V: Visitor<'a>>(self, visitor: V) -> Result<V::Value, Error> {
        self.seq(visitor)
    }

    fn deserialize_tuple<V: Visitor<'a>>(self, _len: usize, visitor: V) -> Result<V::Value, Error> {
        self.seq(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'a>>(
        self,
        _name: &'static str,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.seq(visitor)
    }

    fn deserialize_map<V: Visitor<'a>>(self, visitor: V) -> Result<V::Value, Error> {
        let entries = self.entries()?.iter().filter(|e| self.s.live_entry(e)).collect();
        visitor
            .visit_map(MapDe::new(entries, self.s))
            .map_err(|e| self.locate(e))
    }

    fn deserialize_struct<V: Visitor<'a>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        let entries = self.struct_entries(name, fields)?;
        visitor
            .visit_map(MapDe::new(entries, self.s))
            .map_err(|e| self.locate(e))
    }

    fn deserialize_enum<V: Visitor<'a>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        let access = match self.view()? {
            View::Scalar(..) => EnumDe {
                variant: self,
                value: None,
            },
            View::Map([entry]) => EnumDe {
                variant: self.child(&entry.key),
                value: Some(self.child(&entry.value)),
            },
            other => return Err(self.expected("a name or a mapping with a single key", &other)),
        };
        visitor.visit_enum(access).map_err(|e| self.locate(e))
    }

    fn deserialize_identifier<V: Visitor<'a>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_str(visitor)
    }

    fn deserialize_ignored_any<V: Visitor<'a>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_unit()
    }
}

/// Sequence elements, skipping poisoned ones.
struct SeqDe<'a> {
    items: std::slice::Iter<'a, Node>,
    s: &'a Session<'a>,
}

impl<'a> de::SeqAccess<'a> for SeqDe<'a> {
    type Error = Error;

    fn next_element_seed<T: DeserializeSeed<'a>>(&mut self, seed: T) -> Result<Option<T::Value>, Error> {
        match self.items.by_ref().find(|n| self.s.live(n)) {
            Some(node) => seed.deserialize(NodeDe { node, s: self.s }).map(Some),
            None => Ok(None),
        }
    }
}

/// Mapping entries already filtered by the caller.
struct MapDe<'a> {
    entries: std::vec::IntoIter<&'a Entry>,
    value: Option<&'a Node>,
    s: &'a Session<'a>,
}

impl<'a> MapDe<'a> {
    fn new(entries: Vec<&'a Entry>, s: &'a Session<'a>) -> Self {
        Self {
            entries: entries.into_iter(),
            value: None,
            s,
        }
    }
}

impl<'a> de::MapAccess<'a> for MapDe<'a> {
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'a>>(&mut self, seed: K) -> Result<Option<K::Value>, Error> {
        match self.entries.next() {
            Some(entry) => {
                self.value = Some(&entry.value);
                seed.deserialize(NodeDe {
                    node: &entry.key,
                    s: self.s,
                })
                .map(Some)
            }
            None => Ok(None),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'a>>(&mut self, seed: V) -> Result<V::Value, Error> {
        let node = self.value.take().expect("next_value_seed called before next_key_seed");
        seed.deserialize(NodeDe { node, s: self.s })
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.entries.len())
    }
}

/// An enum written as `name` or `name: value`.
struct EnumDe<'a> {
    variant: NodeDe<'a>,
    value: Option<NodeDe<'a>>,
}

impl<'a> de::EnumAccess<'a> for EnumDe<'a> {
    type Error = Error;
    type Variant = Self;

    fn variant_seed<V: DeserializeSeed<'a>>(self, seed: V) -> Result<(V::Value, Self), Error> {
        let v = seed.deserialize(self.variant)?;
        Ok((v, self))
    }
}

impl<'a> de::VariantAccess<'a> for EnumDe<'a> {
    type Error = Error;

    fn unit_variant(self) -> Result<(), Error> {
        match self.value {
            None => Ok(()),
            Some(v) => de::Deserialize::deserialize(v),
        }
    }

    fn newtype_variant_seed<T: DeserializeSeed<'a>>(self, seed: T) -> Result<T::Value, Error> {
        match self.value {
            Some(v) => seed.deserialize(v),
            None => Err(self.variant.fail("expected a mapping `name: value` for this variant")),
        }
    }

    fn tuple_variant<V: Visitor<'a>>(self, _len: usize, visitor: V) -> Result<V::Value, Error> {
        match self.value {
            Some(v) => v.seq(visitor),
            None => Err(self
                .variant
                .fail("expected a mapping `name: [values]` for this variant")),
        }
    }

    fn struct_variant<V: Visitor<'a>>(self, fields: &'static [&'static str], visitor: V) -> Result<V::Value, Error> {
        match self.value {
            Some(v) => de::Deserializer::deserialize_struct(v, "variant", fields, visitor),
            None => Err(self
                .variant
                .fail("expected a mapping `name: {fields}` for this variant")),
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

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Strict {
        a: u32,
        #[serde(default)]
        b: Vec<u32>,
        #[serde(default)]
        role: Option<Role>,
    }

    #[derive(Debug, PartialEq, serde::Deserialize)]
    #[serde(rename_all = "lowercase")]
    enum Role {
        Pod,
        Node,
    }

    fn strict(text: &str) -> Result<Strict, Vec<String>> {
        let no_env = |_: &str| None;
        let never = |_: &str, _: &str| false;
        crate::from_str::<Strict>(text, "s.yml", &no_env, &never)
            .map(|l| l.value)
            .map_err(|e| e.iter().map(ToString::to_string).collect())
    }

    #[test]
    fn every_failing_field_and_element_is_reported_once() {
        assert_eq!(
            strict("a: x\nb: [1, y, 3, z]\nrole: pdo\n").unwrap_err(),
            [
                "s.yml:1:4: a: expected a non-negative integer, got a string \"x\"",
                "s.yml:2:8: b[1]: expected a non-negative integer, got a string \"y\"",
                "s.yml:2:14: b[3]: expected a non-negative integer, got a string \"z\"",
                "s.yml:3:7: role: unknown value `pdo` (expected one of: pod, node)",
            ]
        );
    }

    #[test]
    fn a_really_missing_field_is_reported_at_the_mapping() {
        assert_eq!(strict("b: [1]\n").unwrap_err(), ["s.yml:1:1: missing required key `a`"]);
        let ok = strict("a: 0x10\nrole: node\n").unwrap();
        assert_eq!((ok.a, ok.role), (16, Some(Role::Node)));
    }

    #[test]
    fn unknown_keys_suggest_close_names() {
        let fields = ["job_name", "scrape_interval"];
        assert_eq!(
            unknown_key_message("ScrapeConfig", "scrape_intervall", &fields),
            "unknown key `scrape_intervall` in scrape config (did you mean `scrape_interval`?)"
        );
        assert_eq!(
            unknown_key_message("ScrapeConfig", "foo", &fields),
            "unknown key `foo` in scrape config (expected one of: job_name, scrape_interval)"
        );
    }
}
