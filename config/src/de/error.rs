//! The deserializer's error: where it happened, or not yet attributed.

use std::fmt;

use serde::de;

use crate::error::Pos;

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
