//! Every unknown key, missing key and type error of a file in one pass.
//!
//! serde stops at the first error it meets, so a file with three misspelt keys took three
//! `check` runs. This walks the positioned YAML tree against the JSON Schema generated from the
//! schema types (the same one editors use, so the two cannot drift apart) and reports each
//! problem at its key or value, in plain words, with "did you mean" for near-miss keys.
//! Ranges and cross-field rules stay in `compile/`; only what would stop deserialization is
//! checked here.

use serde_json::{Map, Value};

use super::error::Problem;
use super::tree::{hide_snippet, push_key, secret_kind, Expansion, Kind, Node};

/// What YAML reads a plain scalar as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scalar {
    Null,
    Bool,
    Int,
    Float,
    Str,
}

fn scalar_type(text: &str, quoted: bool) -> Scalar {
    if quoted {
        return Scalar::Str;
    }
    match text {
        "" | "~" | "null" | "Null" | "NULL" => return Scalar::Null,
        "true" | "True" | "TRUE" | "false" | "False" | "FALSE" => return Scalar::Bool,
        ".inf" | "+.inf" | "-.inf" | ".Inf" | ".INF" | ".nan" | ".NaN" | ".NAN" => {
            return Scalar::Float
        }
        _ => {}
    }
    let unsigned = text.strip_prefix(['-', '+']).unwrap_or(text);
    let digits =
        |s: &str, radix: u32| !s.is_empty() && s.chars().all(|c| c == '_' || c.is_digit(radix));
    if digits(unsigned, 10)
        || unsigned.strip_prefix("0x").is_some_and(|s| digits(s, 16))
        || unsigned.strip_prefix("0o").is_some_and(|s| digits(s, 8))
    {
        return Scalar::Int;
    }
    if unsigned.parse::<f64>().is_ok()
        && unsigned
            .chars()
            .next()
            .is_some_and(|c| c != 'i' && c != 'n' && c != 'I' && c != 'N')
    {
        return Scalar::Float;
    }
    Scalar::Str
}

/// What a node is, for "got ...".
fn got(node: &Node, path: &str, expansion: &Expansion) -> String {
    match &node.kind {
        Kind::Map(_) => "a mapping".into(),
        Kind::Seq(_) => "a list".into(),
        Kind::Alias => "an alias".into(),
        Kind::Scalar { text, quoted } => {
            let kind = scalar_type(text, *quoted);
            if kind == Scalar::Null {
                return "nothing".into();
            }
            let what = match kind {
                Scalar::Bool => "a boolean",
                Scalar::Int => "an integer",
                Scalar::Float => "a number",
                _ => "a string",
            };
            if secret_kind(path).is_some() {
                return what.into();
            }
            if let Some(e) = expansion.at.get(&(node.line, node.column)) {
                // The file's text, never the value it expanded to.
                return format!("{what} from `{}`", e.raw);
            }
            if kind == Scalar::Str {
                format!("{text:?}")
            } else {
                // `1.5`, `true`: what the file wrote, without string quotes.
                text.clone()
            }
        }
    }
}

fn describe(schema: &Value) -> Vec<&'static str> {
    let mut out = Vec::new();
    let mut one = |t: &str| {
        out.push(match t {
            "integer" => "an integer",
            "number" => "a number",
            "boolean" => "true or false",
            "string" => "a string",
            "array" => "a list",
            "object" => "a mapping",
            _ => return,
        })
    };
    match schema.get("type") {
        Some(Value::String(t)) => one(t),
        Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).for_each(one),
        _ => {}
    }
    out
}

fn join_or(items: &[&str]) -> String {
    match items {
        [] => "something else".into(),
        [one] => (*one).into(),
        [rest @ .., last] => format!("{} or {last}", rest.join(", ")),
    }
}

/// The closest of `candidates` to `word`, if it is close enough to be a typo.
pub(super) fn did_you_mean<'a>(
    word: &str,
    candidates: impl Iterator<Item = &'a str>,
) -> Option<&'a str> {
    candidates
        .map(|c| (strsim::damerau_levenshtein(word, c), c))
        .filter(|(d, c)| *d <= (c.len().max(word.len()) / 3).max(1))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

pub(super) struct Checker<'a> {
    defs: Option<&'a Map<String, Value>>,
    expansion: &'a Expansion,
    pub problems: Vec<Problem>,
}

impl<'a> Checker<'a> {
    pub fn new(root_schema: &'a Value, expansion: &'a Expansion) -> Self {
        Self {
            defs: root_schema.get("$defs").and_then(Value::as_object),
            expansion,
            problems: Vec::new(),
        }
    }

    fn resolve(&self, mut s: &'a Value) -> &'a Value {
        for _ in 0..16 {
            let Some(r) = s.get("$ref").and_then(Value::as_str) else {
                break;
            };
            let name = r.rsplit('/').next().unwrap_or("");
            match self.defs.and_then(|d| d.get(name)) {
                Some(next) => s = next,
                None => break,
            }
        }
        s
    }

    fn problem(&mut self, node: &Node, path: &str, message: String) {
        let raw = match (&node.kind, self.expansion.at.get(&(node.line, node.column))) {
            (_, Some(e)) => e.raw.as_str(),
            (Kind::Scalar { text, .. }, None) => text.as_str(),
            _ => "",
        };
        self.problems.push(Problem {
            hide_snippet: hide_snippet(path, raw),
            key: (!path.is_empty()).then(|| path.to_string()),
            ..Problem::at(node.line, node.column, message)
        });
    }

    /// Whether `node` has the shape `schema` asks for, ignoring what is inside.
    fn shape_fits(&self, node: &Node, schema: &'a Value) -> bool {
        let s = self.resolve(schema);
        if let Some(branches) = branches(s) {
            return branches.iter().any(|b| self.shape_fits(node, b));
        }
        if let Some(c) = s.get("const") {
            return matches!(&node.kind, Kind::Scalar { text, .. } if c.as_str() == Some(text));
        }
        if let Some(e) = s.get("enum").and_then(Value::as_array) {
            return matches!(&node.kind, Kind::Scalar { text, .. } if e.iter().any(|v| v.as_str() == Some(text)));
        }
        let types: Vec<&str> = match s.get("type") {
            Some(Value::String(t)) => vec![t.as_str()],
            Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
            _ => return true,
        };
        types.iter().any(|t| match (&node.kind, *t) {
            (Kind::Alias, _) => true,
            (Kind::Map(_), "object") | (Kind::Seq(_), "array") => true,
            (Kind::Scalar { text, quoted }, t) => {
                let k = scalar_type(text, *quoted);
                match t {
                    "null" => k == Scalar::Null,
                    "boolean" => k == Scalar::Bool,
                    "integer" => k == Scalar::Int,
                    "number" => matches!(k, Scalar::Int | Scalar::Float),
                    // serde-saphyr reads any non-null scalar into a string.
                    "string" => k != Scalar::Null,
                    _ => false,
                }
            }
            _ => false,
        })
    }

    pub fn check(&mut self, node: &Node, schema: &'a Value, path: &mut String) {
        let s = self.resolve(schema);
        if matches!(node.kind, Kind::Alias) {
            return;
        }
        if let Some(branches) = branches(s) {
            let fitting: Vec<&Value> = branches
                .iter()
                .filter(|b| self.shape_fits(node, b))
                .collect();
            if let Some(first) = fitting
                .iter()
                .find(|b| !is_null(self.resolve(b)))
                .or(fitting.first())
            {
                self.check(node, first, path);
                return;
            }
            // Choices of names (an enum with documented variants) or of types.
            let mut names = Vec::new();
            let mut expected = Vec::new();
            self.choices(s, &mut names, &mut expected);
            if !names.is_empty() {
                self.unknown_variant(node, path, &names);
                return;
            }
            let message = format!(
                "{}: expected {}, got {}",
                shown(path),
                join_or(&expected),
                got(node, path, self.expansion)
            );
            self.problem(node, path, message);
            return;
        }
        if let Some(e) = s.get("enum").and_then(Value::as_array) {
            let names: Vec<&str> = e.iter().filter_map(Value::as_str).collect();
            if !self.shape_fits(node, s) {
                self.unknown_variant(node, path, &names);
            }
            return;
        }
        if !self.shape_fits(node, s) {
            let message = format!(
                "{}: expected {}, got {}",
                shown(path),
                join_or(&describe(s)),
                got(node, path, self.expansion)
            );
            self.problem(node, path, message);
            return;
        }
        match &node.kind {
            Kind::Map(pairs) => self.check_map(node, pairs, s, path),
            Kind::Seq(items) => {
                if let Some(item_schema) = s.get("items") {
                    let len = path.len();
                    for (i, item) in items.iter().enumerate() {
                        path.push_str(&format!("[{i}]"));
                        self.check(item, item_schema, path);
                        path.truncate(len);
                    }
                }
            }
            Kind::Scalar { .. } | Kind::Alias => {}
        }
    }

    fn check_map(&mut self, node: &Node, pairs: &[(Node, Node)], s: &'a Value, path: &mut String) {
        let properties = s.get("properties").and_then(Value::as_object);
        let additional = s.get("additionalProperties");
        let len = path.len();
        for (key, value) in pairs {
            let Kind::Scalar { text: name, .. } = &key.kind else {
                continue;
            };
            push_key(path, key);
            if let Some(field) = properties.and_then(|p| p.get(name)) {
                self.check(value, field, path);
            } else {
                match additional {
                    Some(Value::Bool(false)) => {
                        let allowed = properties.map(|p| p.keys().map(String::as_str));
                        let hint = match allowed.clone().and_then(|a| did_you_mean(name, a)) {
                            Some(m) => format!("; did you mean `{m}`?"),
                            None => format!(
                                "; expected one of: {}",
                                allowed
                                    .map(|a| a.collect::<Vec<_>>().join(", "))
                                    .unwrap_or_default()
                            ),
                        };
                        path.truncate(len);
                        let section = if path.is_empty() {
                            "at the top level".to_string()
                        } else {
                            format!("in {path}")
                        };
                        let message = format!("unknown field `{name}` {section}{hint}");
                        let at = path.clone();
                        self.problems.push(Problem {
                            key: Some(if at.is_empty() {
                                name.clone()
                            } else {
                                format!("{at}.{name}")
                            }),
                            ..Problem::at(key.line, key.column, message)
                        });
                    }
                    Some(schema @ Value::Object(_)) => self.check(value, schema, path),
                    _ => {}
                }
            }
            path.truncate(len);
        }
        if let Some(required) = s.get("required").and_then(Value::as_array) {
            for name in required.iter().filter_map(Value::as_str) {
                let present = pairs
                    .iter()
                    .any(|(k, _)| matches!(&k.kind, Kind::Scalar { text, .. } if text == name));
                if !present {
                    let message = if path.is_empty() {
                        format!("missing required key `{name}` at the top level")
                    } else {
                        format!("{path}: missing required key `{name}`")
                    };
                    let key = if path.is_empty() {
                        name.to_string()
                    } else {
                        format!("{path}.{name}")
                    };
                    self.problems.push(Problem {
                        key: Some(key),
                        ..Problem::at(node.line, node.column, message)
                    });
                }
            }
        }
    }

    /// The names (`const`, `enum`) and the types a schema accepts, through its branches.
    fn choices(&self, s: &'a Value, names: &mut Vec<&'a str>, types: &mut Vec<&'static str>) {
        let s = self.resolve(s);
        if let Some(bs) = branches(s) {
            for b in bs {
                self.choices(b, names, types);
            }
            return;
        }
        let listed: Vec<&str> = s
            .get("const")
            .into_iter()
            .chain(
                s.get("enum")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten(),
            )
            .filter_map(Value::as_str)
            .collect();
        if !listed.is_empty() {
            names.extend(listed);
            return;
        }
        for d in describe(s) {
            if !types.contains(&d) {
                types.push(d);
            }
        }
    }

    fn unknown_variant(&mut self, node: &Node, path: &str, names: &[&str]) {
        let message = match &node.kind {
            Kind::Scalar { text, quoted } if scalar_type(text, *quoted) != Scalar::Null => {
                let hint = did_you_mean(text, names.iter().copied())
                    .map(|m| format!("; did you mean `{m}`?"))
                    .unwrap_or_default();
                let value = if secret_kind(path).is_some() {
                    "this value".to_string()
                } else if let Some(e) = self.expansion.at.get(&(node.line, node.column)) {
                    format!("from `{}`", e.raw)
                } else {
                    format!("`{text}`")
                };
                format!(
                    "{}: unknown variant {value}, expected {}{hint}",
                    shown(path),
                    join_or(&names.iter().map(|n| n.trim()).collect::<Vec<_>>())
                )
            }
            _ => format!(
                "{}: expected one of {}, got {}",
                shown(path),
                names.join(", "),
                got(node, path, self.expansion)
            ),
        };
        self.problem(node, path, message);
    }
}

fn shown(path: &str) -> &str {
    if path.is_empty() {
        "the file"
    } else {
        path
    }
}

fn is_null(s: &Value) -> bool {
    s.get("type").and_then(Value::as_str) == Some("null")
}

fn branches(s: &Value) -> Option<&Vec<Value>> {
    s.get("anyOf")
        .or_else(|| s.get("oneOf"))
        .and_then(Value::as_array)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalar_types_follow_yaml() {
        assert_eq!(scalar_type("1500", false), Scalar::Int);
        assert_eq!(scalar_type("-5", false), Scalar::Int);
        assert_eq!(scalar_type("1500", true), Scalar::Str);
        assert_eq!(scalar_type("0.5", false), Scalar::Float);
        assert_eq!(scalar_type("lots", false), Scalar::Str);
        assert_eq!(scalar_type("nan", false), Scalar::Str);
        assert_eq!(scalar_type("true", false), Scalar::Bool);
        assert_eq!(scalar_type("", false), Scalar::Null);
    }

    #[test]
    fn near_misses_are_suggested() {
        let keys = ["timeout_ms", "target", "queue", "mode"];
        assert_eq!(
            did_you_mean("timout_ms", keys.into_iter()),
            Some("timeout_ms")
        );
        assert_eq!(did_you_mean("colour", keys.into_iter()), None);
    }
}
