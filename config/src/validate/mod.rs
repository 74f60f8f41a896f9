//! Semantic checks of an [`AgentConfig`](crate::agent::AgentConfig) and the Prometheus
//! defaults that complete it.
//!
//! Checks run on the deserialized value without I/O (files named in the config are not
//! opened here) and place each finding with the [`SpanTable`](crate::SpanTable) of the file
//! it came from. [`apply_defaults`] then fills what Prometheus would fill.

mod checks;
mod client;
mod defaults;
mod flows;
mod logs;
mod relabel;
mod rules;

pub use checks::validate;
pub(crate) use defaults::settle_global;
pub use defaults::{apply_defaults, effective_interval, effective_timeout};
pub use relabel::{rule_problems, RuleProblem, RELABEL_ACTIONS};
pub use rules::{valid_label_name, valid_target_template};
