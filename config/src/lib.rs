//! Typed configuration shared by the agent and the installer.
//!
//! YAML text enters through [`from_str`] (any `serde` type) or [`load_agent_config`] /
//! [`agent_config_from_str`] (the agent's file). The text is parsed into a tree that keeps the
//! line and column of every node; `${VAR}` and `${VAR:-default}` are expanded in scalar values;
//! a serde deserializer over the tree rejects unknown keys (warning instead about keys
//! Prometheus knows but the agent ignores) and keeps going after an error, so every problem
//! in the file comes back at once as `FILE:LINE:COL: message`. What leaves is the typed value
//! with its warnings and a [`SpanTable`] (YAML path → position) for later checks; the agent
//! config is then checked by [`validate`] and completed by [`apply_defaults`].

pub mod agent;
pub mod flows;
pub mod lab;
pub mod logql;
pub mod logs;
pub mod selector;
pub mod units;

mod de;
mod env;
mod error;
mod load;
mod validate;
mod yaml;

pub use error::{ConfigError, Pos, Warning};
pub use load::{
    agent_config_from_str, from_str, lab_config_from_str, load_agent_config, load_lab_config, Loaded, SpanTable,
};
pub use units::{ByteSize, Duration};
pub use validate::{
    apply_defaults, effective_interval, effective_timeout, rule_problems, valid_label_name, valid_target_template,
    validate, RuleProblem, RELABEL_ACTIONS,
};
