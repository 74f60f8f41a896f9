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

mod access;
mod driver;
mod error;
mod keys;
mod node;
mod scalar;

pub(crate) use driver::deserialize;
