//! The LogQL subset a `match` stage selects with: a stream selector (`{app="web",
//! level!="debug", path=~"/api/.*", env!~"dev|test"}`) optionally followed by line filters
//! (`|= "text"`, `!= "text"`, `|~ "regex"`, `!~ "regex"`), as Promtail accepts them. Regular
//! expressions are fully anchored for label matchers (as in Prometheus) and unanchored for
//! line filters (as in LogQL).

use regex::Regex;

/// How a label matcher compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatchOp {
    /// `=`
    Eq,
    /// `!=`
    Ne,
    /// `=~`
    Re,
    /// `!~`
    NotRe,
}

/// One `name op "value"` of a selector.
#[derive(Clone, Debug)]
pub struct LabelMatcher {
    /// The label.
    pub name: String,
    /// The comparison.
    pub op: MatchOp,
    /// The value (or pattern).
    pub value: String,
    re: Option<Regex>,
}

impl LabelMatcher {
    /// Whether a label whose value is `v` (empty when absent) matches.
    pub fn matches(&self, v: &str) -> bool {
        match self.op {
            MatchOp::Eq => v == self.value,
            MatchOp::Ne => v != self.value,
            MatchOp::Re => self.re.as_ref().is_some_and(|r| r.is_match(v)),
            MatchOp::NotRe => !self.re.as_ref().is_some_and(|r| r.is_match(v)),
        }
    }
}

/// One line filter.
#[derive(Clone, Debug)]
pub enum LineFilter {
    /// `|= "text"`
    Contains(String),
    /// `!= "text"`
    NotContains(String),
    /// `|~ "regex"`
    Matches(Regex),
    /// `!~ "regex"`
    NotMatches(Regex),
}

/// A parsed selector with its line filters.
#[derive(Clone, Debug)]
pub struct Selector {
    /// The label matchers (all must match).
    pub matchers: Vec<LabelMatcher>,
    /// The line filters (all must pass).
    pub filters: Vec<LineFilter>,
}

impl Selector {
    /// Parses `text`; the error says what was expected and where.
    pub fn parse(text: &str) -> Result<Selector, String> {
        let mut p = Parser { s: text, i: 0 };
        p.ws();
        p.expect('{')?;
        let mut matchers = Vec::new();
        loop {
            p.ws();
            if p.eat('}') {
                break;
            }
            if !matchers.is_empty() {
                p.expect(',')?;
                p.ws();
                if p.eat('}') {
                    break;
                }
            }
            let name = p.ident()?;
            p.ws();
            let op = if p.eat_str("=~") {
                MatchOp::Re
            } else if p.eat_str("!~") {
                MatchOp::NotRe
            } else if p.eat_str("!=") {
                MatchOp::Ne
            } else if p.eat('=') {
                MatchOp::Eq
            } else {
                return Err(p.error("one of =, !=, =~, !~"));
            };
            p.ws();
            let value = p.string()?;
            let re = match op {
                MatchOp::Re | MatchOp::NotRe => {
                    Some(Regex::new(&format!("^(?:{value})$")).map_err(|e| format!("invalid regex {value:?}: {e}"))?)
                }
                _ => None,
            };
            matchers.push(LabelMatcher { name, op, value, re });
        }
        if matchers.is_empty() {
            return Err("a stream selector needs at least one label matcher".to_owned());
        }
        let mut filters = Vec::new();
        loop {
            p.ws();
            if p.i >= p.s.len() {
                break;
            }
            let kind = if p.eat_str("|=") {
                0
            } else if p.eat_str("!=") {
                1
            } else if p.eat_str("|~") {
                2
            } else if p.eat_str("!~") {
                3
            } else {
                return Err(p.error("a line filter (|=, !=, |~, !~) or the end"));
            };
            p.ws();
            let v = p.string()?;
            let re = || Regex::new(&v).map_err(|e| format!("invalid regex {v:?}: {e}"));
            filters.push(match kind {
                0 => LineFilter::Contains(v.clone()),
                1 => LineFilter::NotContains(v.clone()),
                2 => LineFilter::Matches(re()?),
                _ => LineFilter::NotMatches(re()?),
            });
        }
        Ok(Selector { matchers, filters })
    }

    /// Whether labels (looked up by `get`) and `line` match.
    pub fn matches<'a>(&self, get: impl Fn(&str) -> Option<&'a str>, line: &str) -> bool {
        self.matchers.iter().all(|m| m.matches(get(&m.name).unwrap_or("")))
            && self.filters.iter().all(|f| match f {
                LineFilter::Contains(s) => line.contains(s.as_str()),
                LineFilter::NotContains(s) => !line.contains(s.as_str()),
                LineFilter::Matches(r) => r.is_match(line),
                LineFilter::NotMatches(r) => !r.is_match(line),
            })
    }
}

struct Parser<'a> {
    s: &'a str,
    i: usize,
}

impl Parser<'_> {
    fn rest(&self) -> &str {
        &self.s[self.i..]
    }
    fn ws(&mut self) {
        while self.rest().starts_with(char::is_whitespace) {
            self.i += self.rest().chars().next().map_or(1, char::len_utf8);
        }
    }
    fn eat(&mut self, c: char) -> bool {
        if self.rest().starts_with(c) {
            self.i += c.len_utf8();
            true
        } else {
            false
        }
    }
    fn eat_str(&mut self, s: &str) -> bool {
        if self.rest().starts_with(s) {
            self.i += s.len();
            true
        } else {
            false
        }
    }
    fn error(&self, expected: &str) -> String {
        let found = self
            .rest()
            .chars()
            .next()
            .map_or("the end".to_owned(), |c| format!("{c:?}"));
        format!("expected {expected} at offset {}, found {found}", self.i)
    }
    fn expect(&mut self, c: char) -> Result<(), String> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(self.error(&format!("{c:?}")))
        }
    }
    fn ident(&mut self) -> Result<String, String> {
        let n = self
            .rest()
            .char_indices()
            .take_while(|(k, c)| c.is_ascii_alphabetic() || *c == '_' || (*k > 0 && c.is_ascii_digit()))
            .count();
        if n == 0 {
            return Err(self.error("a label name"));
        }
        let id = self.rest()[..n].to_owned();
        self.i += n;
        Ok(id)
    }
    /// A double-quoted string with Go escapes, or a back-quoted raw string.
    fn string(&mut self) -> Result<String, String> {
        if self.eat('`') {
            let end = self.rest().find('`').ok_or_else(|| self.error("a closing `"))?;
            let v = self.rest()[..end].to_owned();
            self.i += end + 1;
            return Ok(v);
        }
        self.expect('"')?;
        let mut out = String::new();
        let mut chars = self.rest().char_indices();
        while let Some((k, c)) = chars.next() {
            match c {
                '"' => {
                    self.i += k + 1;
                    return Ok(out);
                }
                '\\' => match chars.next() {
                    Some((_, 'n')) => out.push('\n'),
                    Some((_, 't')) => out.push('\t'),
                    Some((_, 'r')) => out.push('\r'),
                    Some((_, c)) => out.push(c),
                    None => break,
                },
                c => out.push(c),
            }
        }
        Err(self.error("a closing \""))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(sel: &str, labels: &[(&str, &str)], line: &str) -> bool {
        let s = Selector::parse(sel).unwrap();
        s.matches(|n| labels.iter().find(|(k, _)| *k == n).map(|(_, v)| *v), line)
    }

    #[test]
    fn selectors_match_like_logql() {
        let l = [("app", "web"), ("namespace", "shop")];
        assert!(m(r#"{app="web"}"#, &l, ""));
        assert!(!m(r#"{app="db"}"#, &l, ""));
        assert!(m(r#"{app=~"w.*", namespace!="kube-system"}"#, &l, ""));
        assert!(!m(r#"{app=~"w"}"#, &l, ""), "label regexes are anchored");
        assert!(m(r#"{app!~"db|cache", missing=""}"#, &l, ""));
        assert!(m(r#"{app="web"} |= "error" != "debug""#, &l, "an error here"));
        assert!(!m(r#"{app="web"} |= "error" != "debug""#, &l, "debug error"));
        assert!(m(r#"{app="web"} |~ "err(or)?" !~ `^x`"#, &l, "some err"));
    }

    #[test]
    fn errors_say_what_was_expected() {
        assert_eq!(
            Selector::parse(r#"app="web""#).unwrap_err(),
            "expected '{' at offset 0, found 'a'"
        );
        assert!(Selector::parse(r#"{app=="web"}"#)
            .unwrap_err()
            .contains("expected '\"'"));
        assert!(Selector::parse(r#"{app="web"} | json"#)
            .unwrap_err()
            .contains("line filter"));
        assert!(Selector::parse("{}").unwrap_err().contains("at least one"));
        assert!(Selector::parse(r#"{a=~"("}"#).unwrap_err().contains("invalid regex"));
    }
}
