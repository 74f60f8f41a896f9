//! Entry points: text or file in, typed value with warnings and a span table out.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use serde::de::DeserializeOwned;

use crate::agent::{self, AgentConfig};
use crate::error::{ConfigError, Diagnostics, Pos, Warning};
use crate::lab::{self, LabConfig};
use crate::yaml::{self, Node};
use crate::{de, validate};

/// Largest configuration file read.
const MAX_FILE_BYTES: u64 = 16 << 20;

/// A successfully loaded value.
#[derive(Clone, Debug)]
pub struct Loaded<T> {
    /// The value.
    pub value: T,
    /// Things worth telling the operator, sorted by position.
    pub warnings: Vec<Warning>,
    /// Where each node of the file was written, for checks made after deserializing.
    pub spans: SpanTable,
}

/// Positions of the nodes of a file by YAML path: `scrape_configs[0].relabel_configs[1].regex`.
/// Top-level keys have no leading dot; sequence elements are `[i]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpanTable {
    values: BTreeMap<String, Pos>,
    keys: BTreeMap<String, Pos>,
}

impl SpanTable {
    pub(crate) fn from_tree(root: &Node) -> Self {
        let mut table = Self::default();
        root.walk(&mut |node, is_key| {
            let map = if is_key { &mut table.keys } else { &mut table.values };
            map.entry(node.path.clone()).or_insert(node.pos);
        });
        table
    }

    /// Where the value at `path` starts, if the file has it (`""` is the whole document).
    pub fn get(&self, path: &str) -> Option<Pos> {
        self.values.get(path).copied()
    }

    /// Where the key of the mapping entry at `path` is written, if the file has it.
    pub fn key(&self, path: &str) -> Option<Pos> {
        self.keys.get(path).copied()
    }

    /// The position of `path`, or else of its nearest ancestor present in the file, or 1:1.
    /// Use it to place findings about values that were left at their default.
    pub fn nearest(&self, path: &str) -> Pos {
        let mut p = path;
        loop {
            if let Some(pos) = self.get(p) {
                return pos;
            }
            match p.rfind(['.', '[']) {
                Some(i) => p = &p[..i],
                None if !p.is_empty() => p = "",
                None => return Pos { line: 1, column: 1 },
            }
        }
    }

    /// Every recorded value path with its position, in path order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, Pos)> {
        self.values.iter().map(|(k, v)| (k.as_str(), *v))
    }
}

/// Deserializes `T` from YAML `text`, reporting every error found as `file:line:col: message`.
///
/// `env` looks up variables for `${NAME}` / `${NAME:-default}` in scalar values; `ignored`
/// says which keys a struct (by serde type name) accepts silently but for a warning. An empty
/// text reads as an empty mapping, so structs with defaults get all their defaults.
pub fn from_str<T: DeserializeOwned>(
    text: &str,
    file: &str,
    env: &dyn Fn(&str) -> Option<String>,
    ignored: &dyn Fn(&str, &str) -> bool,
) -> Result<Loaded<T>, Vec<ConfigError>> {
    let partial = from_str_partial::<T>(text, file, env, ignored);
    match partial.value {
        Some(value) if partial.errors.is_empty() => Ok(Loaded {
            value,
            warnings: partial.warnings,
            spans: partial.spans,
        }),
        _ => Err(partial.errors),
    }
}

/// What a load produced even when it failed: the value read without the nodes that failed.
struct Partial<T> {
    value: Option<T>,
    errors: Vec<ConfigError>,
    warnings: Vec<Warning>,
    spans: SpanTable,
}

fn from_str_partial<T: DeserializeOwned>(
    text: &str,
    file: &str,
    env: &dyn Fn(&str) -> Option<String>,
    ignored: &dyn Fn(&str, &str) -> bool,
) -> Partial<T> {
    let mut diags = Diagnostics::new(file);
    let doc = match yaml::parse(text) {
        Ok(doc) => doc,
        Err((pos, message)) => {
            diags.error(pos, message);
            let (errors, warnings) = diags.finish();
            return Partial {
                value: None,
                errors,
                warnings,
                spans: SpanTable::default(),
            };
        }
    };
    for (pos, message) in doc.errors {
        diags.error(pos, message);
    }
    let diags = RefCell::new(diags);
    let value = de::deserialize::<T>(&doc.root, env, ignored, &diags);
    let mut diags = diags.into_inner();
    if value.is_none() && !diags.has_errors() {
        diags.error(doc.root.pos, "the document could not be read");
    }
    let spans = SpanTable::from_tree(&doc.root);
    let (errors, warnings) = diags.finish();
    Partial {
        value,
        errors,
        warnings,
        spans,
    }
}

/// Loads, validates and completes the agent configuration from `text` (see
/// [`load_agent_config`]); `file` only names the source in messages.
pub fn agent_config_from_str(
    text: &str,
    file: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Loaded<AgentConfig>, Vec<ConfigError>> {
    let partial = from_str_partial::<AgentConfig>(text, file, env, &agent::ignored_key);
    let mut errors = partial.errors;
    let Some(mut value) = partial.value else {
        return Err(errors);
    };
    // Semantic checks run even after type errors (on what could be read), so one run reports
    // everything; a finding on a line that already has an error is left out as a likely echo.
    validate::settle_global(&mut value.global, &partial.spans);
    let read_error_lines: Vec<usize> = errors.iter().map(|e| e.line).collect();
    for e in validate::validate(&value, &partial.spans, file) {
        if !read_error_lines.contains(&e.line) {
            errors.push(e);
        }
    }
    if !errors.is_empty() {
        errors.sort_by_key(|e| (e.line, e.column));
        return Err(errors);
    }
    validate::apply_defaults(&mut value);
    Ok(Loaded {
        value,
        warnings: partial.warnings,
        spans: partial.spans,
    })
}

/// Reads the agent configuration file at `path`: `${VAR}` expanded from the process
/// environment, Prometheus-only keys warned about, every error reported, the result
/// validated and every scrape config completed from `global` (see [`apply_defaults`]).
///
/// [`apply_defaults`]: crate::apply_defaults
pub fn load_agent_config(path: &Path) -> Result<Loaded<AgentConfig>, Vec<ConfigError>> {
    let file = path.display().to_string();
    let text = read_config_file(path, &file)?;
    agent_config_from_str(&text, &file, &|name| std::env::var(name).ok())
}

/// Reads and checks the installer's lab file: type errors, unknown keys and the rules of
/// [`lab::validate`], each as `FILE:LINE:COL: path: message`.
pub fn lab_config_from_str(
    text: &str,
    file: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Loaded<LabConfig>, Vec<ConfigError>> {
    let loaded = from_str::<LabConfig>(text, file, env, &|_, _| false)?;
    let errors: Vec<ConfigError> = lab::validate(&loaded.value)
        .into_iter()
        .map(|(path, message)| {
            let pos = loaded.spans.nearest(&path);
            ConfigError {
                file: file.to_owned(),
                line: pos.line,
                column: pos.column,
                message: format!("{path}: {message}"),
            }
        })
        .collect();
    if errors.is_empty() {
        Ok(loaded)
    } else {
        Err(errors)
    }
}

/// [`lab_config_from_str`] on a file, with `${VAR}` taken from the environment.
pub fn load_lab_config(path: &Path) -> Result<Loaded<LabConfig>, Vec<ConfigError>> {
    let file = path.display().to_string();
    let text = read_config_file(path, &file)?;
    lab_config_from_str(&text, &file, &|name| std::env::var(name).ok())
}

fn read_config_file(path: &Path, file: &str) -> Result<String, Vec<ConfigError>> {
    let whole_file = |message: String| {
        vec![ConfigError {
            file: file.to_owned(),
            line: 0,
            column: 0,
            message,
        }]
    };
    let mut text = String::new();
    let read = std::fs::File::open(path).and_then(|f| f.take(MAX_FILE_BYTES + 1).read_to_string(&mut text));
    if let Err(e) = read {
        return Err(whole_file(format!("cannot read configuration file: {e}")));
    }
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(whole_file(format!(
            "configuration file is larger than {MAX_FILE_BYTES} bytes"
        )));
    }
    Ok(text)
}
