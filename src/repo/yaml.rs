//! A small YAML tree that remembers the line of every node, built from `saphyr-parser`
//! events. The lint needs lines for its messages; nothing else in gitfleet parses YAML.

use std::collections::HashMap;

use saphyr_parser::{Event, Parser, ScanError};

/// Deepest nesting accepted; deeper documents are rejected rather than risking the stack.
const MAX_DEPTH: usize = 256;
/// Most nodes accepted, counting alias expansions (guards against "billion laughs").
const MAX_NODES: usize = 1_000_000;

#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    /// 1-based line where the node starts.
    pub line: u32,
    pub value: Value,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// Any scalar, as written (`null`, `~` and empty scalars included).
    Scalar(String),
    Sequence(Vec<Node>),
    /// Key/value pairs in document order.
    Mapping(Vec<(Node, Node)>),
}

impl Node {
    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            Value::Scalar(text) => Some(text),
            _ => None,
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(&self.value, Value::Scalar(text) if matches!(text.as_str(), "" | "~" | "null" | "Null" | "NULL"))
    }

    pub fn as_mapping(&self) -> Option<&[(Node, Node)]> {
        match &self.value {
            Value::Mapping(pairs) => Some(pairs),
            _ => None,
        }
    }

    pub fn as_sequence(&self) -> Option<&[Node]> {
        match &self.value {
            Value::Sequence(items) => Some(items),
            _ => None,
        }
    }

    /// The value under a scalar key of a mapping.
    pub fn get(&self, key: &str) -> Option<&Node> {
        self.as_mapping()?.iter().find(|(k, _)| k.as_str() == Some(key)).map(|(_, v)| v)
    }

    /// What kind of node this is, for messages.
    pub fn kind(&self) -> &'static str {
        match &self.value {
            Value::Scalar(_) if self.is_null() => "null",
            Value::Scalar(_) => "a scalar",
            Value::Sequence(_) => "a list",
            Value::Mapping(_) => "a mapping",
        }
    }
}

/// A YAML syntax error with its line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct YamlError {
    pub line: u32,
    pub message: String,
}

/// Parses the first document of `text`. An empty stream gives `None`.
pub fn parse(text: &str) -> Result<Option<Node>, YamlError> {
    let mut builder = Builder::default();
    for item in Parser::new_from_str(text) {
        let (event, span) = item.map_err(scan_error)?;
        let line = u32::try_from(span.start.line()).unwrap_or(u32::MAX).max(1);
        if let Some(document) = builder.push(event, line)? {
            return Ok(Some(document));
        }
    }
    Ok(None)
}

fn scan_error(error: ScanError) -> YamlError {
    YamlError {
        line: u32::try_from(error.marker().line()).unwrap_or(u32::MAX).max(1),
        message: error.info().to_owned(),
    }
}

enum Open {
    Sequence { line: u32, anchor: usize, items: Vec<Node> },
    Mapping { line: u32, anchor: usize, pairs: Vec<(Node, Node)>, key: Option<Node> },
}

#[derive(Default)]
struct Builder {
    stack: Vec<Open>,
    anchors: HashMap<usize, Node>,
    nodes: usize,
}

impl Builder {
    /// Feeds one event; returns the document once its root is complete.
    fn push(&mut self, event: Event<'_>, line: u32) -> Result<Option<Node>, YamlError> {
        let finished = match event {
            Event::Scalar(text, _, anchor, _) => {
                let node = Node { line, value: Value::Scalar(text.into_owned()) };
                self.remember(anchor, &node);
                Some(node)
            }
            Event::Alias(anchor) => {
                let node = self
                    .anchors
                    .get(&anchor)
                    .cloned()
                    .ok_or_else(|| YamlError { line, message: "alias to an unknown anchor".to_owned() })?;
                self.count(&node, line)?;
                Some(Node { line, value: node.value })
            }
            Event::SequenceStart(anchor, _) => {
                self.open(Open::Sequence { line, anchor, items: Vec::new() }, line)?;
                None
            }
            Event::MappingStart(anchor, _) => {
                self.open(Open::Mapping { line, anchor, pairs: Vec::new(), key: None }, line)?;
                None
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let node = match self.stack.pop() {
                    Some(Open::Sequence { line, anchor, items }) => {
                        let node = Node { line, value: Value::Sequence(items) };
                        self.remember(anchor, &node);
                        node
                    }
                    Some(Open::Mapping { line, anchor, pairs, .. }) => {
                        let node = Node { line, value: Value::Mapping(pairs) };
                        self.remember(anchor, &node);
                        node
                    }
                    None => {
                        return Err(YamlError { line, message: "unbalanced collection end".to_owned() });
                    }
                };
                Some(node)
            }
            Event::StreamStart | Event::StreamEnd | Event::DocumentStart(_) | Event::DocumentEnd | Event::Nothing => {
                None
            }
        };
        let Some(node) = finished else {
            return Ok(None);
        };
        self.nodes += 1;
        if self.nodes > MAX_NODES {
            return Err(YamlError { line, message: format!("document has more than {MAX_NODES} nodes") });
        }
        match self.stack.last_mut() {
            None => Ok(Some(node)),
            Some(Open::Sequence { items, .. }) => {
                items.push(node);
                Ok(None)
            }
            Some(Open::Mapping { pairs, key, .. }) => {
                match key.take() {
                    None => *key = Some(node),
                    Some(k) => pairs.push((k, node)),
                }
                Ok(None)
            }
        }
    }

    fn open(&mut self, collection: Open, line: u32) -> Result<(), YamlError> {
        if self.stack.len() >= MAX_DEPTH {
            return Err(YamlError { line, message: format!("nesting deeper than {MAX_DEPTH} levels") });
        }
        self.stack.push(collection);
        Ok(())
    }

    fn remember(&mut self, anchor: usize, node: &Node) {
        if anchor != 0 {
            self.anchors.insert(anchor, node.clone());
        }
    }

    /// Counts an alias expansion so that nested aliases cannot blow up memory.
    fn count(&mut self, node: &Node, line: u32) -> Result<(), YamlError> {
        fn size(node: &Node) -> usize {
            match &node.value {
                Value::Scalar(_) => 1,
                Value::Sequence(items) => 1 + items.iter().map(size).sum::<usize>(),
                Value::Mapping(pairs) => 1 + pairs.iter().map(|(k, v)| size(k) + size(v)).sum::<usize>(),
            }
        }
        self.nodes += size(node);
        if self.nodes > MAX_NODES {
            return Err(YamlError { line, message: format!("aliases expand to more than {MAX_NODES} nodes") });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_carry_their_lines() {
        let text =
            "receivers:\n  otlp:\n    protocols: {}\nservice:\n  pipelines:\n    traces:\n      receivers: [otlp]\n";
        let root = parse(text).expect("valid").expect("one document");
        assert_eq!(root.get("service").map(|n| n.line), Some(5));
        let receivers = root
            .get("service")
            .and_then(|s| s.get("pipelines"))
            .and_then(|p| p.get("traces"))
            .and_then(|t| t.get("receivers"));
        let first = receivers.and_then(Node::as_sequence).map(|items| (items[0].as_str(), items[0].line));
        assert_eq!(first, Some((Some("otlp"), 7)));
    }

    #[test]
    fn syntax_errors_report_a_line() {
        let error = parse("a: 1\nb: [unclosed\nc: 2\n").expect_err("invalid");
        assert!(error.line >= 2, "{error:?}");
    }

    #[test]
    fn aliases_expand_and_unknown_aliases_fail() {
        let root = parse("base: &b {x: 1}\nother: *b\n").expect("valid").expect("document");
        assert_eq!(root.get("other").and_then(|o| o.get("x")).and_then(Node::as_str), Some("1"));
        assert!(parse("a: *nope\n").is_err());
    }

    #[test]
    fn alias_bombs_are_refused() {
        let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for level in 1..8 {
            let previous = level - 1;
            text.push_str(&format!("a{level}: &a{level} [*a{previous}, *a{previous}, *a{previous}, *a{previous}, *a{previous}, *a{previous}, *a{previous}, *a{previous}, *a{previous}, *a{previous}]\n"));
        }
        let error = parse(&text).expect_err("bomb");
        assert!(error.message.contains("aliases expand"), "{error:?}");
    }

    #[test]
    fn empty_input_has_no_document() {
        assert_eq!(parse(""), Ok(None));
        assert_eq!(parse("# only a comment\n"), Ok(None));
    }
}
