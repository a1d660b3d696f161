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
    Problem::at(line, column, message)
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
            if p.hide_snippet {
                continue;
            }
            let Some(line_text) = (p.line as usize)
                .checked_sub(1)
                .and_then(|i| self.source_text.lines().nth(i))
            else {
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
