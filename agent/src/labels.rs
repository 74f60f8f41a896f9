//! `Labels`: a sorted, de-duplicated set of label pairs, the unit discovery,
//! relabeling and the scrape loop exchange.

use std::fmt;

/// Name of the label holding the metric name.
pub const METRIC_NAME: &str = "__name__";
/// Name of the label holding a target's address.
pub const ADDRESS: &str = "__address__";
/// Name of the label holding a target's scheme.
pub const SCHEME: &str = "__scheme__";
/// Name of the label holding a target's metrics path.
pub const METRICS_PATH: &str = "__metrics_path__";
/// Name of the label holding a target's scrape interval.
pub const SCRAPE_INTERVAL: &str = "__scrape_interval__";
/// Name of the label holding a target's scrape timeout.
pub const SCRAPE_TIMEOUT: &str = "__scrape_timeout__";
/// Prefix of labels holding URL parameters (`__param_<name>`).
pub const PARAM_PREFIX: &str = "__param_";
/// Prefix of labels removed after target relabeling.
pub const RESERVED_PREFIX: &str = "__";
/// Prefix of labels that are removed after target relabeling, kept for users' scratch space.
pub const TMP_PREFIX: &str = "__tmp";
/// Prefix of labels produced by service discovery.
pub const META_PREFIX: &str = "__meta_";

/// A set of labels kept sorted by name, names unique.
#[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Labels(Vec<(String, String)>);

impl Labels {
    /// An empty label set.
    pub fn new() -> Self {
        Self(Vec::new())
    }

    /// Builds a set from pairs in any order; a later duplicate name wins.
    pub fn from_pairs<I, N, V>(pairs: I) -> Self
    where
        I: IntoIterator<Item = (N, V)>,
        N: Into<String>,
        V: Into<String>,
    {
        let mut out = Self::new();
        for (n, v) in pairs {
            out.insert(n.into(), v.into());
        }
        out
    }

    /// Value of `name`, if present.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.position(name).ok().map(|i| self.0[i].1.as_str())
    }

    /// Value of `name`, or "" when absent (Prometheus semantics).
    pub fn get_or_empty(&self, name: &str) -> &str {
        self.get(name).unwrap_or("")
    }

    /// Sets `name` to `value`, replacing any previous value. An empty value removes the label,
    /// as Prometheus treats empty and absent labels alike.
    pub fn set(&mut self, name: &str, value: &str) {
        if value.is_empty() {
            self.remove(name);
            return;
        }
        match self.position(name) {
            Ok(i) => {
                if self.0[i].1 != value {
                    self.0[i].1.clear();
                    self.0[i].1.push_str(value);
                }
            }
            Err(i) => self.0.insert(i, (name.to_owned(), value.to_owned())),
        }
    }

    /// Like [`Labels::set`] but keeps an empty value (used while building discovery labels,
    /// where an empty `__meta_*` label is meaningful to relabel rules).
    pub fn insert(&mut self, name: String, value: String) {
        match self.position(&name) {
            Ok(i) => self.0[i].1 = value,
            Err(i) => self.0.insert(i, (name, value)),
        }
    }

    /// Removes `name`; returns its value.
    pub fn remove(&mut self, name: &str) -> Option<String> {
        self.position(name).ok().map(|i| self.0.remove(i).1)
    }

    /// Keeps the labels for which `keep(name, value)` is true.
    pub fn retain(&mut self, mut keep: impl FnMut(&str, &str) -> bool) {
        self.0.retain(|(n, v)| keep(n, v));
    }

    /// Iterates `(name, value)` in name order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&str, &str)> + '_ {
        self.0.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    /// Number of labels.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when there are no labels.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Removes every label.
    pub fn clear(&mut self) {
        self.0.clear();
    }

    /// The underlying sorted pairs.
    pub fn as_slice(&self) -> &[(String, String)] {
        &self.0
    }

    /// Merges `other` into `self`; labels of `other` win.
    pub fn extend_from(&mut self, other: &Labels) {
        for (n, v) in other.iter() {
            self.insert(n.to_owned(), v.to_owned());
        }
    }

    fn position(&self, name: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(n, _)| n.as_str().cmp(name))
    }
}

impl fmt::Debug for Labels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Labels {
    /// Formats as `{a="1", b="2"}` like Prometheus.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("{")?;
        for (i, (n, v)) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{n}={v:?}")?;
        }
        f.write_str("}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorted_unique_and_empty_removes() {
        let mut l = Labels::from_pairs([("b", "2"), ("a", "1"), ("b", "3")]);
        assert_eq!(l.iter().collect::<Vec<_>>(), vec![("a", "1"), ("b", "3")]);
        l.set("a", "");
        assert_eq!(l.get("a"), None);
        l.set("c", "x");
        assert_eq!(l.to_string(), r#"{b="3", c="x"}"#);
    }
}
