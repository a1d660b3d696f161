//! The config file as a positioned YAML tree, read before typed deserialization.
//!
//! Two things need the file as YAML rather than as `ConfigFile`:
//!
//! * `${VAR}` expansion in every scalar value, numbers and booleans included. A scalar's type
//!   is decided by YAML from its text, so `timeout_ms: ${T:-1500}` can only become the number
//!   1500 if the expansion happens on the text. [`expand`] rewrites each scalar that holds a
//!   reference in place (same line, same starting column) and records the edits, so positions
//!   reported on the expanded text map back to the file the user edited ([`Expansion::original`]).
//! * Finding every unknown key and type error in one pass (`shape.rs`), where serde stops at
//!   the first.

use std::collections::HashMap;

use granit_parser::{Event, Marker, Parser, ScalarStyle};

use super::env;
use super::error::{url_text_holds_secret, Problem};

/// One YAML node with its position in the file text.
#[derive(Debug)]
pub(super) struct Node {
    /// 1-based line and column of the node's first character.
    pub line: u64,
    pub column: u64,
    /// Byte range of the node in the text (scalars only; collections keep their start).
    pub start: usize,
    pub end: usize,
    pub kind: Kind,
}

#[derive(Debug)]
pub(super) enum Kind {
    /// A scalar after YAML escape processing; `quoted` for any non-plain style (always a string).
    Scalar {
        text: String,
        quoted: bool,
    },
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
    /// `*alias`: not followed.
    Alias,
}

/// How much of a value may be shown: secrets never, URLs only when the file spells out none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SecretKind {
    /// A token or signing secret: never shown, nor the file line that holds it.
    Opaque,
    /// A URL: its line is shown unless the file itself spells out a password or query value.
    Url,
}

/// Which keys hold secrets, by their path (`signing.secrets[0]`, `routing_rules[3].target`).
pub(super) fn secret_kind(path: &str) -> Option<SecretKind> {
    if path == "admin.token" || path.starts_with("signing.secrets[") {
        Some(SecretKind::Opaque)
    } else if path == "store.url"
        || (path.starts_with("routing_rules[") && path.ends_with("].target"))
    {
        Some(SecretKind::Url)
    } else {
        None
    }
}

/// Whether a problem about the value at `path`, written `raw` in the file, may print its line.
pub(super) fn hide_snippet(path: &str, raw: &str) -> bool {
    match secret_kind(path) {
        Some(SecretKind::Opaque) => true,
        Some(SecretKind::Url) => url_text_holds_secret(raw),
        None => false,
    }
}

fn position(text: &str, m: &Marker) -> (u64, u64, usize) {
    let byte = m.byte_offset().unwrap_or_else(|| {
        text.char_indices()
            .nth(m.index())
            .map_or(text.len(), |(i, _)| i)
    });
    (m.line() as u64, m.col() as u64 + 1, byte)
}

/// Parses `text` into a tree; `Ok(None)` for a file without a document.
pub(super) fn parse(text: &str) -> Result<Option<Node>, Problem> {
    enum Frame {
        Seq(Node, Vec<Node>),
        Map(Node, Vec<(Node, Node)>, Option<Node>),
    }
    fn attach(stack: &mut [Frame], root: &mut Option<Node>, node: Node) {
        match stack.last_mut() {
            Some(Frame::Seq(_, items)) => items.push(node),
            Some(Frame::Map(_, pairs, pending)) => match pending.take() {
                Some(key) => pairs.push((key, node)),
                None => *pending = Some(node),
            },
            None => *root = Some(node),
        }
    }
    let mut stack: Vec<Frame> = Vec::new();
    let mut root = None;
    for event in Parser::new_from_str(text) {
        let (event, span) = event.map_err(|e| {
            let (line, column, _) = position(text, e.marker());
            Problem::at(line, column, e.info().to_string())
        })?;
        let (line, column, start) = position(text, &span.start);
        let (_, _, end) = position(text, &span.end);
        let shell = |kind| Node {
            line,
            column,
            start,
            end,
            kind,
        };
        match event {
            Event::Scalar(value, style, _, _) => {
                let node = shell(Kind::Scalar {
                    text: value.into_owned(),
                    quoted: style != ScalarStyle::Plain,
                });
                attach(&mut stack, &mut root, node);
            }
            Event::Alias(_) => attach(&mut stack, &mut root, shell(Kind::Alias)),
            Event::SequenceStart(..) => stack.push(Frame::Seq(shell(Kind::Alias), Vec::new())),
            Event::MappingStart(..) => stack.push(Frame::Map(shell(Kind::Alias), Vec::new(), None)),
            Event::SequenceEnd | Event::MappingEnd => {
                let node = match stack.pop() {
                    Some(Frame::Seq(mut n, items)) => {
                        n.kind = Kind::Seq(items);
                        n
                    }
                    Some(Frame::Map(mut n, pairs, _)) => {
                        n.kind = Kind::Map(pairs);
                        n
                    }
                    None => continue,
                };
                attach(&mut stack, &mut root, node);
            }
            // Only the first document is the config.
            Event::DocumentEnd if root.is_some() => break,
            _ => {}
        }
    }
    Ok(root)
}

/// Calls `f` with every value node (not keys) and its path, depth first.
pub(super) fn walk<'a>(node: &'a Node, path: &mut String, f: &mut dyn FnMut(&'a Node, &str)) {
    f(node, path);
    let len = path.len();
    match &node.kind {
        Kind::Seq(items) => {
            for (i, item) in items.iter().enumerate() {
                path.push_str(&format!("[{i}]"));
                walk(item, path, f);
                path.truncate(len);
            }
        }
        Kind::Map(pairs) => {
            for (key, value) in pairs {
                push_key(path, key);
                walk(value, path, f);
                path.truncate(len);
            }
        }
        Kind::Scalar { .. } | Kind::Alias => {}
    }
}

/// `path.key`, or `key` at the top.
pub(super) fn push_key(path: &mut String, key: &Node) {
    if !path.is_empty() {
        path.push('.');
    }
    match &key.kind {
        Kind::Scalar { text, .. } => path.push_str(text),
        _ => path.push('?'),
    }
}

/// One scalar that `${VAR}` expansion rewrote.
#[derive(Debug)]
pub(super) struct Expanded {
    /// The scalar as written in the file, without its quotes (what errors may quote).
    pub raw: String,
    /// What it expanded to (what errors must never quote).
    pub value: String,
}

/// The result of expanding every scalar of a file.
#[derive(Debug, Default)]
pub(super) struct Expansion {
    /// The YAML text to deserialize: the file with every expanded scalar rewritten.
    pub text: String,
    /// Expanded scalars keyed by their (line, column) in `text`.
    pub at: HashMap<(u64, u64), Expanded>,
    /// Per line: (column in `text` from which, columns shifted by) after a rewritten scalar.
    shifts: HashMap<u64, Vec<(u64, i64)>>,
    /// Paths of all nodes by their (line, column) in the file, for the `key` of a problem.
    pub paths: HashMap<(u64, u64), String>,
}

impl Expansion {
    /// The file position of a position in the expanded text.
    pub fn original(&self, line: u64, column: u64) -> (u64, u64) {
        let shift: i64 = self
            .shifts
            .get(&line)
            .map(|v| {
                v.iter()
                    .filter(|(from, _)| column >= *from)
                    .map(|(_, d)| d)
                    .sum()
            })
            .unwrap_or(0);
        (line, (column as i64 - shift).max(1) as u64)
    }

    /// Takes every expanded value out of `message`, putting the file's text in its place.
    ///
    /// The value of the scalar the problem is about (`line`, `column` in the expanded text) is
    /// replaced where it stands as a whole word, last occurrence first (messages end with
    /// "got X"); every other expanded value of six or more characters is replaced wherever it
    /// appears, in case a message quotes a neighbour.
    pub fn scrub(&self, line: u64, column: u64, message: &str) -> String {
        let here = self.at.get(&(line, column));
        // The file's text the message already quotes (`${T:-100}`) is left alone, defaults
        // and all; only what lies between is scrubbed.
        let Some(e) = here else {
            return self.scrub_others(message);
        };
        let parts: Vec<String> = message
            .split(e.raw.as_str())
            .map(|part| self.scrub_others(part))
            .collect();
        let mut out = parts.join(&e.raw);
        if !e.value.is_empty() && !e.raw.is_empty() {
            // Last occurrence first: messages end with "got X". Only outside quoted file text.
            let mut searched = out.len();
            while let Some(i) = rfind_word(&out[..searched], &e.value) {
                let inside_raw = out
                    .match_indices(e.raw.as_str())
                    .any(|(r, _)| r <= i && i < r + e.raw.len());
                if !inside_raw {
                    out.replace_range(i..i + e.value.len(), &e.raw);
                    break;
                }
                searched = i;
            }
        }
        out
    }

    fn scrub_others(&self, message: &str) -> String {
        let mut out = message.to_string();
        for e in self.at.values() {
            if e.value.chars().count() >= 6 && out.contains(&e.value) {
                out = out.replace(&e.value, &e.raw);
            }
        }
        out
    }
}

fn rfind_word(hay: &str, needle: &str) -> Option<usize> {
    let word = |c: char| c.is_alphanumeric() || c == '_' || c == '.';
    let mut end = hay.len();
    while let Some(i) = hay[..end].rfind(needle) {
        let before = hay[..i].chars().next_back();
        let after = hay[i + needle.len()..].chars().next();
        if !before.is_some_and(word) && !after.is_some_and(word) {
            return Some(i);
        }
        if i == 0 {
            break;
        }
        end = i + needle.len() - 1;
    }
    None
}

/// Keys are names and are taken as written: a `${` in one is reported rather than left to
/// name a host or queue that matches nothing.
fn unexpanded_keys(node: &Node, path: &mut String, problems: &mut Vec<Problem>) {
    let len = path.len();
    match &node.kind {
        Kind::Seq(items) => {
            for (i, item) in items.iter().enumerate() {
                path.push_str(&format!("[{i}]"));
                unexpanded_keys(item, path, problems);
                path.truncate(len);
            }
        }
        Kind::Map(pairs) => {
            for (key, value) in pairs {
                push_key(path, key);
                if matches!(&key.kind, Kind::Scalar { text, .. } if text.contains("${")) {
                    problems.push(Problem {
                        key: Some(path.clone()),
                        ..Problem::at(
                            key.line,
                            key.column,
                            format!(
                                "{path}: ${{VAR}} is not expanded in keys; write the name itself"
                            ),
                        )
                    });
                }
                unexpanded_keys(value, path, problems);
                path.truncate(len);
            }
        }
        Kind::Scalar { .. } | Kind::Alias => {}
    }
}

/// A value YAML reads back as the same scalar when written plain: numbers, booleans and simple
/// words. Anything else is written double-quoted (a string), so no variable can inject YAML.
fn is_safe_plain(v: &str) -> bool {
    !v.is_empty()
        && v != "-"
        && !v.starts_with("---")
        && !v.starts_with("...")
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '+' | '-' | '/'))
}

/// Expands `${VAR}` in every scalar value of `root` (keys are names and are left alone),
/// returning the text to deserialize and every expansion error (positions in the file). A
/// scalar that fails to expand is left as written.
pub(super) fn expand(
    text: &str,
    root: Option<&Node>,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> (Expansion, Vec<Problem>) {
    let mut problems = Vec::new();
    let mut edits: Vec<(&Node, &str, String, String)> = Vec::new();
    let mut paths = HashMap::new();
    if let Some(root) = root {
        let mut path = String::new();
        walk(root, &mut path, &mut |node, path| {
            paths.insert((node.line, node.column), path.to_string());
            let Kind::Scalar {
                text: value,
                quoted,
            } = &node.kind
            else {
                return;
            };
            if !value.contains("${") {
                return;
            }
            match env::expand(value, lookup) {
                Ok(expanded) if expanded == *value => {}
                Ok(expanded) => {
                    let encoded = if !quoted && is_safe_plain(&expanded) {
                        expanded.clone()
                    } else {
                        serde_json::to_string(&expanded).unwrap_or_default()
                    };
                    edits.push((node, value, encoded, expanded));
                }
                Err(message) => {
                    let raw = value.as_str();
                    let shown = if path.is_empty() { "the file" } else { path };
                    problems.push(Problem {
                        hide_snippet: hide_snippet(path, raw),
                        key: Some(path.to_string()),
                        ..Problem::at(node.line, node.column, format!("{shown}: {message}"))
                    });
                }
            }
        });
    }
    if let Some(root) = root {
        unexpanded_keys(root, &mut String::new(), &mut problems);
    }
    edits.sort_by_key(|(n, ..)| n.start);
    let mut out = Expansion {
        text: String::with_capacity(text.len()),
        paths,
        ..Expansion::default()
    };
    let mut copied = 0;
    // Per line, how far columns in the output have moved so far.
    let mut moved: HashMap<u64, i64> = HashMap::new();
    for (node, written, encoded, expanded) in edits {
        if node.start < copied || node.end > text.len() {
            continue;
        }
        out.text.push_str(&text[copied..node.start]);
        let raw = &text[node.start..node.end];
        let delta = *moved.get(&node.line).unwrap_or(&0);
        let column = (node.column as i64 + delta) as u64;
        out.text.push_str(&encoded);
        let lines = raw.matches('\n').count();
        if lines == 0 {
            let d = encoded.chars().count() as i64 - raw.chars().count() as i64;
            if d != 0 {
                let end_col = column + encoded.chars().count() as u64;
                out.shifts.entry(node.line).or_default().push((end_col, d));
                *moved.entry(node.line).or_default() += d;
            }
        } else {
            // Keep every later line where it was: the rewritten scalar stays on its first line,
            // then blank lines, then spaces up to where the original ended.
            for _ in 0..lines {
                out.text.push('\n');
            }
            let tail = raw.rsplit('\n').next().unwrap_or("");
            out.text.push_str(&" ".repeat(tail.chars().count()));
        }
        out.at.insert(
            (node.line, column),
            Expanded {
                raw: written.to_string(),
                value: expanded,
            },
        );
        copied = node.end;
    }
    out.text.push_str(&text[copied..]);
    (out, problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "LONG" => Some("a much longer value".into()),
            "N" => Some("7".into()),
            _ => None,
        }
    }

    #[test]
    fn expansion_rewrites_scalars_and_maps_positions_back() {
        let text = "a: ${N}\nb: ['${LONG}', x, '${N:-1}']\nc: '${Q:-prof}'\nd: $${N}\n";
        let root = parse(text).unwrap();
        let (e, problems) = expand(text, root.as_ref(), &env);
        assert!(problems.is_empty());
        assert_eq!(
            e.text,
            "a: 7\nb: [\"a much longer value\", x, \"7\"]\nc: \"prof\"\nd: \"${N}\"\n"
        );
        // `x` is at column 16 of line 2 in the file and column 28 once expanded.
        assert_eq!(e.original(2, 28), (2, 16));
        assert_eq!(e.original(2, 5), (2, 5));
        assert_eq!(e.at[&(2, 31)].raw, "${N:-1}");
        assert_eq!(e.original(2, 31), (2, 19));
    }

    #[test]
    fn multi_line_scalars_keep_later_lines_in_place() {
        let text = "a: |\n  x ${N}\n  y\nb: 1\n";
        let root = parse(text).unwrap();
        let (e, problems) = expand(text, root.as_ref(), &env);
        assert!(problems.is_empty());
        assert_eq!(e.text.lines().nth(3), Some("b: 1"), "{}", e.text);
    }

    #[test]
    fn scrub_replaces_the_expanded_value_with_the_file_text() {
        let text = "t: ${N}\n";
        let root = parse(text).unwrap();
        let (e, problems) = expand(text, root.as_ref(), &env);
        assert!(problems.is_empty());
        assert_eq!(
            e.scrub(1, 4, "t must be at most 5, got 7"),
            "t must be at most 5, got ${N}"
        );
        let text = "t: ${T:-100}\n";
        let root = parse(text).unwrap();
        let (e, _) = expand(text, root.as_ref(), &env);
        assert_eq!(
            e.scrub(
                1,
                4,
                "expected true or false, got a string from `${T:-100}`"
            ),
            "expected true or false, got a string from `${T:-100}`"
        );
        assert_eq!(e.scrub(1, 4, "got 100"), "got ${T:-100}");
    }
}
