//! Config errors that point at the file, line and column, with a snippet.

use std::fmt;
use std::path::{Path, PathBuf};

/// One thing wrong with a config file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    /// 1-based; 0 when the position is unknown.
    pub line: u64,
    /// 1-based; 0 when the position is unknown.
    pub column: u64,
    pub message: String,
    /// The key the problem is about, as a path (`routing_rules[0].timeout_ms`), when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The line holds a secret: show the position but not the snippet.
    #[serde(skip)]
    pub hide_snippet: bool,
}

impl Problem {
    /// A problem at a known position.
    pub fn at(line: u64, column: u64, message: impl Into<String>) -> Self {
        Self {
            line,
            column,
            message: message.into(),
            key: None,
            hide_snippet: false,
        }
    }

    /// A problem about a secret: its line is never printed.
    pub fn secret<T>(value: &serde_saphyr::Spanned<T>, message: impl Into<String>) -> Self {
        Self {
            hide_snippet: true,
            ..Self::spanned(value, message)
        }
    }

    /// A problem at a value's position.
    pub fn spanned<T>(value: &serde_saphyr::Spanned<T>, message: impl Into<String>) -> Self {
        Self::at(value.referenced.line(), value.referenced.column(), message)
    }
}

/// Why a config file was rejected. `Display` renders every problem with a snippet.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigError {
    pub path: PathBuf,
    pub problems: Vec<Problem>,
    /// The source lines, kept for rendering snippets.
    source_text: String,
}

/// True when the file text of a URL (before `${VAR}` expansion) spells out a password, a query
/// value or a fragment, so that the line holding it must not be printed in an error.
///
/// `${NAME}` references are fine: they show the name, not the value. The default of
/// `${NAME:-default}` is literal text and is judged like any other.
pub(crate) fn url_text_holds_secret(raw: &str) -> bool {
    // Each reference becomes a marker that is neither secret nor special in a URL; what is
    // left around the markers is what the file spells out.
    const MARK: &str = "hookyardvar";
    let mut text = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(i) = rest.find("${") {
        text.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let Some(end) = after.find('}') else {
            // Unterminated: judge the rest as literal text.
            text.push_str(&rest[i..]);
            rest = "";
            break;
        };
        match after[..end].split_once(":-") {
            Some((_, default)) => text.push_str(default),
            None => text.push_str(MARK),
        }
        rest = &after[end + 1..];
    }
    text.push_str(rest);
    let literal = |part: &str| !part.replace(MARK, "").is_empty();
    match url::Url::parse(&text) {
        Ok(url) => {
            url.password().is_some_and(literal)
                || url.query().is_some_and(|q| {
                    q.split('&')
                        .any(|pair| literal(pair.split_once('=').map_or(pair, |(_, v)| v)))
                })
                || url.fragment().is_some_and(literal)
        }
        // Not a URL even with the references filled in: print its line only if nothing in it
        // could be userinfo or a query.
        Err(_) => text.contains(['@', '?', '#']),
    }
}

pub(crate) fn problem_from_yaml(err: &serde_saphyr::Error) -> Problem {
    let (line, column) = err
        .location()
        .map(|l| (l.line(), l.column()))
        .unwrap_or((0, 0));
    let mut message = err.without_snippet().to_string();
    // The plain rendering ends with its own " at line L column C"; the position is shown
    // in our own header, so drop the duplicate.
    if let Some(i) = message.rfind(" at line ") {
        message.truncate(i);
    }
    Problem::at(line, column, plain_words(&message))
}

/// serde's `invalid type: string "lots", expected i64` as `expected an integer, got "lots"`.
/// The schema pass (`shape.rs`) catches type errors first; this covers what it cannot see.
fn plain_words(message: &str) -> String {
    let rest = message
        .strip_prefix("invalid type: ")
        .or_else(|| message.strip_prefix("invalid value: "));
    let Some((got, expected)) = rest.and_then(|r| r.rsplit_once(", expected ")) else {
        return message.to_string();
    };
    let expected = match expected {
        "i8" | "i16" | "i32" | "i64" | "u8" | "u16" | "u32" | "u64" | "usize" | "isize" => {
            "an integer"
        }
        "f32" | "f64" => "a number",
        "a boolean" | "bool" => "true or false",
        "a string" => "a string",
        "a sequence" => "a list",
        "a map" => "a mapping",
        other => other,
    };
    let got = got
        .replace("string ", "")
        .replace("integer ", "")
        .replace("floating point ", "");
    let got = match got.as_str() {
        "map" => "a mapping".to_string(),
        "sequence" => "a list".to_string(),
        "unit value" => "nothing".to_string(),
        _ => got,
    };
    format!("expected {expected}, got {got}")
}

impl ConfigError {
    pub(crate) fn new(path: &Path, source_text: &str, problems: Vec<Problem>) -> Self {
        Self {
            path: path.to_path_buf(),
            problems,
            source_text: source_text.to_string(),
        }
    }

    pub(crate) fn single(path: &Path, source_text: &str, problem: Problem) -> Self {
        Self::new(path, source_text, vec![problem])
    }

    pub(crate) fn io(path: &Path, err: std::io::Error) -> Self {
        Self::new(
            path,
            "",
            vec![Problem::at(0, 0, format!("cannot read file: {err}"))],
        )
    }

    pub(crate) fn internal(path: &Path, message: String) -> Self {
        Self::new(path, "", vec![Problem::at(0, 0, message)])
    }

    pub(crate) fn not_utf8(path: &Path, err: std::str::Utf8Error) -> Self {
        Self::new(
            path,
            "",
            vec![Problem::at(0, 0, format!("file is not UTF-8: {err}"))],
        )
    }

    /// The file's line a problem points at, unless it may hold a secret.
    pub fn snippet(&self, p: &Problem) -> Option<&str> {
        if p.hide_snippet {
            return None;
        }
        (p.line as usize)
            .checked_sub(1)
            .and_then(|i| self.source_text.lines().nth(i))
    }

    /// The first problem on one line, `file:line:column: message`, for logs and the admin API.
    pub fn summary(&self) -> String {
        let n = self.problems.len();
        match self.problems.first() {
            Some(p) if n > 1 => format!("{} (and {} more)", self.header(p), n - 1),
            Some(p) => self.header(p),
            None => format!("{}: invalid config", self.path.display()),
        }
    }

    fn header(&self, p: &Problem) -> String {
        if p.line == 0 {
            format!("{}: {}", self.path.display(), p.message)
        } else {
            format!(
                "{}:{}:{}: {}",
                self.path.display(),
                p.line,
                p.column,
                p.message
            )
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            writeln!(f, "error: {}", self.header(p))?;
            let Some(line_text) = self.snippet(p) else {
                continue;
            };
            let gutter = p.line.to_string().len();
            writeln!(f, "{:gutter$} |", "")?;
            writeln!(f, "{} | {}", p.line, line_text)?;
            let caret_at = (p.column as usize).saturating_sub(1);
            let pad: String = line_text
                .chars()
                .take(caret_at)
                .map(|c| if c == '\t' { '\t' } else { ' ' })
                .collect();
            writeln!(f, "{:gutter$} | {pad}^", "")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{plain_words, url_text_holds_secret};

    #[test]
    fn serde_type_errors_read_as_plain_words() {
        assert_eq!(
            plain_words("invalid type: string \"lots\", expected i64"),
            "expected an integer, got \"lots\""
        );
        assert_eq!(plain_words("missing field `x`"), "missing field `x`");
    }

    #[test]
    fn url_lines_are_printable_only_without_literal_secrets() {
        for shown in [
            "http://h:1/x",
            "http://user:${PW}@h:1/x",
            "http://${USERINFO}@h:1/x?token=${TOKEN}",
            "not a url",
            "${TARGET}",
        ] {
            assert!(!url_text_holds_secret(shown), "{shown}");
        }
        for hidden in [
            "http://user:hunter2@h:1/x",
            "http://user:${PW:-hunter2}@h:1/x",
            "http://user:pre${PW}@h:1/x",
            "http://h:1/x?token=abc",
            "http://h:1/x#abc",
            "not a url with @ in it",
        ] {
            assert!(url_text_holds_secret(hidden), "{hidden}");
        }
    }
}
