//! YAML text → a tree of [`Node`]s that remember where they were written.
//!
//! Built from yaml-rust2's marked event stream. Aliases are resolved by copying the anchored
//! node (bounded, so an alias bomb is an error rather than an out-of-memory), `<<` merge keys
//! are applied, a second document is an error, and a repeated mapping key is reported (as
//! yaml.v2's strict mode does) while the rest of the file is still read. Scalars keep their
//! text and whether they were quoted; typing them is left to the deserializer.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, Parser, Tag};
use yaml_rust2::scanner::{Marker, TScalarStyle};

use crate::error::Pos;

/// Deepest nesting of sequences and mappings accepted.
const MAX_DEPTH: usize = 128;
/// Most nodes a document may have once aliases are expanded.
const MAX_NODES: usize = 250_000;

/// How a scalar was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Style {
    /// Plain: typed by its text (`true`, `15`, `1.5`, otherwise a string).
    Plain,
    /// Quoted, block (`|`, `>`) or tagged `!!str`: always a string.
    Quoted,
}

/// One node of the tree.
#[derive(Clone, Debug)]
pub(crate) struct Node {
    /// Unique within the document (alias copies get their own), assigned in pre-order.
    pub id: usize,
    /// Where the node starts.
    pub pos: Pos,
    /// YAML path of the node, e.g. `scrape_configs[0].job_name` (a key shares its value's).
    pub path: String,
    /// What the node holds.
    pub kind: Kind,
}

/// The content of a [`Node`].
#[derive(Clone, Debug)]
pub(crate) enum Kind {
    /// `null`, `~` or nothing at all.
    Null,
    /// Any other scalar.
    Scalar { text: String, style: Style },
    /// A sequence.
    Seq(Vec<Node>),
    /// A mapping, in document order, keys unique.
    Map(Vec<Entry>),
}

/// One mapping entry.
#[derive(Clone, Debug)]
pub(crate) struct Entry {
    pub key: Node,
    pub value: Node,
}

impl Node {
    fn new(pos: Pos, kind: Kind) -> Self {
        Self {
            id: 0,
            pos,
            path: String::new(),
            kind,
        }
    }

    /// The text of a scalar key, as written (`None` for collections).
    pub(crate) fn key_text(&self) -> Option<&str> {
        match &self.kind {
            Kind::Scalar { text, .. } => Some(text),
            Kind::Null => Some(""),
            Kind::Seq(_) | Kind::Map(_) => None,
        }
    }

    /// Visits this node and every node below it (keys before their values).
    pub(crate) fn walk(&self, f: &mut dyn FnMut(&Node, bool)) {
        self.walk_inner(f, false);
    }

    fn walk_inner(&self, f: &mut dyn FnMut(&Node, bool), is_key: bool) {
        f(self, is_key);
        match &self.kind {
            Kind::Seq(items) => items.iter().for_each(|n| n.walk_inner(f, false)),
            Kind::Map(entries) => entries.iter().for_each(|e| {
                e.key.walk_inner(f, true);
                e.value.walk_inner(f, false);
            }),
            Kind::Null | Kind::Scalar { .. } => {}
        }
    }

    fn count(&self) -> usize {
        let mut n = 0;
        self.walk(&mut |_, _| n += 1);
        n
    }
}

/// A parsed document plus the problems that did not stop parsing (repeated keys, bad merges).
#[derive(Debug)]
pub(crate) struct Document {
    pub root: Node,
    pub errors: Vec<(Pos, String)>,
}

/// Parses one YAML document. An empty text (or only comments) is a single null node at 1:1.
/// A syntax error, a second document or an over-large expansion is returned as `Err`.
pub(crate) fn parse(text: &str) -> Result<Document, (Pos, String)> {
    let mut b = Builder {
        parser: Parser::new_from_str(text),
        anchors: HashMap::new(),
        nodes: 0,
        errors: Vec::new(),
    };
    let mut root = b.document()?;
    let mut next_id = 0;
    assign(&mut root, String::new(), &mut next_id);
    Ok(Document { root, errors: b.errors })
}

fn pos_of(m: &Marker) -> Pos {
    Pos {
        line: m.line(),
        column: m.col() + 1,
    }
}

struct Builder<'a> {
    parser: Parser<std::str::Chars<'a>>,
    /// Finished anchored nodes by the parser's anchor id.
    anchors: HashMap<usize, Node>,
    /// Nodes created so far, alias copies included.
    nodes: usize,
    errors: Vec<(Pos, String)>,
}

impl Builder<'_> {
    fn next(&mut self) -> Result<(Event, Pos), (Pos, String)> {
        self.parser
            .next_token()
            .map(|(ev, m)| (ev, pos_of(&m)))
            .map_err(|e| (pos_of(e.marker()), format!("YAML syntax error: {}", e.info())))
    }

    fn document(&mut self) -> Result<Node, (Pos, String)> {
        let first = Pos { line: 1, column: 1 };
        loop {
            match self.next()? {
                (Event::StreamStart, _) | (Event::Nothing, _) => {}
                (Event::StreamEnd, _) => return Ok(Node::new(first, Kind::Null)),
                (Event::DocumentStart, _) => break,
                (ev, pos) => return Err((pos, format!("YAML syntax error: unexpected {ev:?}"))),
            }
        }
        let (ev, pos) = self.next()?;
        let root = self.node(ev, pos, 0)?;
        loop {
            match self.next()? {
                (Event::DocumentEnd, _) | (Event::Nothing, _) => {}
                (Event::StreamEnd, _) => return Ok(root),
                (Event::DocumentStart, pos) => {
                    return Err((
                        pos,
                        "a configuration file must hold one YAML document, found a second".to_owned(),
                    ))
                }
                (ev, pos) => return Err((pos, format!("YAML syntax error: unexpected {ev:?}"))),
            }
        }
    }

    fn created(&mut self, n: usize, pos: Pos) -> Result<(), (Pos, String)> {
        self.nodes += n;
        if self.nodes > MAX_NODES {
            return Err((
                pos,
                format!("document too large: more than {MAX_NODES} nodes once aliases are expanded"),
            ));
        }
        Ok(())
    }

    fn node(&mut self, ev: Event, pos: Pos, depth: usize) -> Result<Node, (Pos, String)> {
        if depth > MAX_DEPTH {
            return Err((pos, format!("YAML nested deeper than {MAX_DEPTH} levels")));
        }
        let (node, anchor) = match ev {
            Event::Alias(id) => {
                let Some(target) = self.anchors.get(&id) else {
                    return Err((pos, "alias refers to an anchor that encloses it".to_owned()));
                };
                let mut copy = target.clone();
                copy.pos = pos;
                self.created(copy.count(), pos)?;
                return Ok(copy);
            }
            Event::Scalar(text, style, anchor, tag) => {
                self.created(1, pos)?;
                (Node::new(pos, scalar_kind(text, style, tag.as_ref())), anchor)
            }
            Event::SequenceStart(anchor, _) => {
                self.created(1, pos)?;
                let mut items = Vec::new();
                loop {
                    match self.next()? {
                        (Event::SequenceEnd, _) => break,
                        (ev, p) => items.push(self.node(ev, p, depth + 1)?),
                    }
                }
                (Node::new(pos, Kind::Seq(items)), anchor)
            }
            Event::MappingStart(anchor, _) => {
                self.created(1, pos)?;
                let entries = self.mapping(depth)?;
                // A block mapping's event is marked at its first `:`; report the first key.
                let first_key = entries.first().map_or(pos, |e| e.key.pos);
                (Node::new(pos.min(first_key), Kind::Map(entries)), anchor)
            }
            other => return Err((pos, format!("YAML syntax error: unexpected {other:?}"))),
        };
        if anchor > 0 {
            self.anchors.insert(anchor, node.clone());
        }
        Ok(node)
    }

    /// Reads mapping entries up to the end of the mapping. Explicit keys must be unique and win
    /// over keys brought in by `<<` merges; earlier merge sources win over later ones.
    fn mapping(&mut self, depth: usize) -> Result<Vec<Entry>, (Pos, String)> {
        let mut entries: Vec<Entry> = Vec::new();
        let mut merged: Vec<Entry> = Vec::new();
        loop {
            let (ev, kpos) = self.next()?;
            if ev == Event::MappingEnd {
                break;
            }
            let key = self.node(ev, kpos, depth + 1)?;
            let (ev, vpos) = self.next()?;
            let mut value = self.node(ev, vpos, depth + 1)?;
            if matches!(value.kind, Kind::Null) && value.pos.line != key.pos.line {
                // An empty value is marked at the next token; its key is a better place.
                value.pos = key.pos;
            }
            if matches!(&key.kind, Kind::Scalar { text, style: Style::Plain } if text == "<<") {
                self.merge_source(value, &mut merged);
                continue;
            }
            if let Some(text) = key.key_text() {
                if let Some(first) = entries.iter().find(|e| e.key.key_text() == Some(text)) {
                    let msg = format!(
                        "duplicate key `{text}` (first defined at line {}, column {})",
                        first.key.pos.line, first.key.pos.column
                    );
                    self.errors.push((key.pos, msg));
                    continue;
                }
            }
            entries.push(Entry { key, value });
        }
        for m in merged {
            let text = m.key.key_text();
            if text.is_none() || !entries.iter().any(|e| e.key.key_text() == text) {
                entries.push(m);
            }
        }
        Ok(entries)
    }

    fn merge_source(&mut self, value: Node, merged: &mut Vec<Entry>) {
        let pos = value.pos;
        let sources = match value.kind {
            Kind::Map(entries) => vec![entries],
            Kind::Seq(items) if items.iter().all(|n| matches!(n.kind, Kind::Map(_))) => items
                .into_iter()
                .map(|n| match n.kind {
                    Kind::Map(entries) => entries,
                    _ => Vec::new(),
                })
                .collect(),
            _ => {
                self.errors.push((
                    pos,
                    "merge key `<<` needs a mapping or a sequence of mappings".to_owned(),
                ));
                return;
            }
        };
        for entry in sources.into_iter().flatten() {
            let text = entry.key.key_text();
            if text.is_none() || !merged.iter().any(|m| m.key.key_text() == text) {
                merged.push(entry);
            }
        }
    }
}

fn scalar_kind(text: String, style: TScalarStyle, tag: Option<&Tag>) -> Kind {
    let tagged_str = tag.is_some_and(|t| t.handle == "tag:yaml.org,2002:" && t.suffix == "str");
    if style != TScalarStyle::Plain || tagged_str {
        return Kind::Scalar {
            text,
            style: Style::Quoted,
        };
    }
    if is_null(&text) {
        Kind::Null
    } else {
        Kind::Scalar {
            text,
            style: Style::Plain,
        }
    }
}

/// Whether a plain scalar's text means null.
pub(crate) fn is_null(text: &str) -> bool {
    matches!(text, "" | "~" | "null" | "Null" | "NULL")
}

/// Numbers nodes in pre-order and gives each its YAML path.
fn assign(node: &mut Node, path: String, next_id: &mut usize) {
    node.id = *next_id;
    *next_id += 1;
    match &mut node.kind {
        Kind::Seq(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                assign(item, format!("{path}[{i}]"), next_id);
            }
        }
        Kind::Map(entries) => {
            for e in entries {
                let seg = e.key.key_text().unwrap_or("?");
                let child = if path.is_empty() {
                    seg.to_owned()
                } else {
                    format!("{path}.{seg}")
                };
                assign(&mut e.key, child.clone(), next_id);
                assign(&mut e.value, child, next_id);
            }
        }
        Kind::Null | Kind::Scalar { .. } => {}
    }
    node.path = path;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root(text: &str) -> Node {
        parse(text).unwrap().root
    }

    fn map(node: &Node) -> &[Entry] {
        match &node.kind {
            Kind::Map(e) => e,
            other => panic!("not a map: {other:?}"),
        }
    }

    #[test]
    fn positions_are_one_based() {
        let r = root("a: 1\nb:\n  - x\n  - 'y'\n");
        let e = map(&r);
        assert_eq!(e[0].key.pos, Pos { line: 1, column: 1 });
        assert_eq!(e[0].value.pos, Pos { line: 1, column: 4 });
        let Kind::Seq(items) = &e[1].value.kind else { panic!() };
        assert_eq!(items[1].pos, Pos { line: 4, column: 5 });
        assert!(matches!(
            &items[1].kind,
            Kind::Scalar {
                style: Style::Quoted,
                ..
            }
        ));
        assert_eq!(items[1].path, "b[1]");
    }

    #[test]
    fn empty_values_take_their_key_position() {
        let r = root("a:\nb: 1\n");
        assert_eq!(map(&r)[0].value.pos, Pos { line: 1, column: 1 });
    }

    #[test]
    fn empty_text_is_null() {
        assert!(matches!(root("").kind, Kind::Null));
        assert!(matches!(root("# only a comment\n").kind, Kind::Null));
    }

    #[test]
    fn anchors_and_merges() {
        let r = root("base: &b {x: 1, y: 2}\nc:\n  <<: *b\n  y: 3\nd: *b\n");
        let e = map(&r);
        let c = map(&e[1].value);
        let keys: Vec<_> = c.iter().map(|e| e.key.key_text().unwrap()).collect();
        assert_eq!(keys, ["y", "x"]);
        assert_eq!(map(&e[2].value).len(), 2);
        assert_eq!(e[2].value.pos, Pos { line: 5, column: 4 });
    }

    #[test]
    fn duplicate_keys_and_second_document() {
        let d = parse("a: 1\nb: 2\na: 3\n").unwrap();
        assert_eq!(
            d.errors,
            [(
                Pos { line: 3, column: 1 },
                "duplicate key `a` (first defined at line 1, column 1)".to_owned()
            )]
        );
        let e = parse("a: 1\n---\nb: 2\n").unwrap_err();
        assert_eq!(e.0, Pos { line: 2, column: 1 });
    }

    #[test]
    fn alias_bomb_is_bounded() {
        let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..8 {
            let prev = format!("*a{}", i - 1);
            text.push_str(&format!("a{i}: &a{i} [{}]\n", vec![prev; 10].join(", ")));
        }
        let err = parse(&text).unwrap_err();
        assert!(err.1.contains("too large"), "{err:?}");
    }
}
