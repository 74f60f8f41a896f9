//! [`NodeDe`]: the `serde::Deserializer` for one node.

use std::borrow::Cow;

use serde::de::{self, Visitor};

use super::access::{EnumDe, MapDe, SeqDe};
use super::driver::Session;
use super::error::Error;
use super::keys::{humanize, unknown_key_message};
use super::scalar::{describe, parse_int, resolve_plain, Typed, View};
use crate::env;
use crate::error::at_path;
use crate::yaml::{is_null, Entry, Kind, Node, Style};

/// Deserializes one node.
#[derive(Clone, Copy)]
pub(super) struct NodeDe<'a> {
    pub(super) node: &'a Node,
    pub(super) s: &'a Session<'a>,
}

impl<'a> NodeDe<'a> {
    pub(super) fn child(&self, node: &'a Node) -> NodeDe<'a> {
        NodeDe { node, s: self.s }
    }

    /// Attributes an error to this node unless it already belongs to one.
    pub(super) fn locate(&self, e: Error) -> Error {
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

    pub(super) fn fail(&self, message: impl Into<String>) -> Error {
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

    pub(super) fn seq<V: Visitor<'a>>(self, visitor: V) -> Result<V::Value, Error> {
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
                let like = if matches!(name, "LogsConfig" | "ClientConfig") {
                    "Promtail"
                } else {
                    "Prometheus"
                };
                let msg = format!("key `{key}` is accepted for {like} compatibility and ignored");
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
