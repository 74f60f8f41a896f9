//! The recovery loop: deserialize, record the error, poison its node, try again.

use std::cell::RefCell;
use std::collections::HashSet;

use serde::de::DeserializeOwned;

use super::error::Error;
use super::node::NodeDe;
use crate::error::Diagnostics;
use crate::yaml::{Entry, Node};

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
pub(super) struct Session<'a> {
    pub(super) env: &'a dyn Fn(&str) -> Option<String>,
    pub(super) ignored: &'a dyn Fn(&str, &str) -> bool,
    pub(super) poisoned: &'a HashSet<usize>,
    pub(super) diags: &'a RefCell<Diagnostics>,
}

impl Session<'_> {
    pub(super) fn live(&self, node: &Node) -> bool {
        !self.poisoned.contains(&node.id)
    }

    pub(super) fn live_entry(&self, e: &Entry) -> bool {
        self.live(&e.key) && self.live(&e.value)
    }
}

#[cfg(test)]
mod tests {
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
        assert_eq!((ok.a, ok.b.len(), ok.role), (16, 0, Some(Role::Node)));
    }
}
