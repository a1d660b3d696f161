//! Scalar values shared by every section: the file's own text of a value, `${VAR}`-expanded
//! strings and secrets, listen addresses, bounded positive integers and durations. Each helper
//! records its problem and returns a fallback, so compilation carries on and reports the rest.

use std::net::SocketAddr;

use super::{pos_of, Compiler};
use crate::config::schema::{DurationValue, Pos};
use crate::config::tree::SecretKind;
use crate::config::Problem;
use crate::secret::Redacted;

impl Compiler<'_> {
    /// The value as the file writes it: `${VAR}` text for an expanded value.
    fn raw<'v>(&'v self, value: &'v Pos<String>) -> &'v str {
        self.expansion
            .at
            .get(&pos_of(value))
            .map_or(value.value.as_str(), |e| e.raw.as_str())
    }

    /// The value (already expanded by `parse`).
    pub(super) fn expand(&mut self, value: &Pos<String>) -> Option<String> {
        Some(value.value.clone())
    }

    /// A value that may hold a secret, straight into a [`Redacted`], so it never exists as a
    /// plain `String` that an error message could quote.
    pub(super) fn expand_secret(
        &mut self,
        value: &Pos<String>,
        kind: SecretKind,
    ) -> Option<Redacted> {
        let s = value.value.clone();
        Some(match kind {
            SecretKind::Opaque => Redacted::opaque(s),
            SecretKind::Url => Redacted::url(s),
        })
    }

    /// A problem about a secret-bearing value: its line is printed only when the file's text
    /// holds no literal secret (a `${VAR}` reference is fine: the snippet shows the reference).
    pub(super) fn secret_problem(
        &self,
        value: &Pos<String>,
        kind: SecretKind,
        message: impl Into<String>,
    ) -> Problem {
        let hide = match kind {
            SecretKind::Opaque => true,
            SecretKind::Url => crate::config::error::url_text_holds_secret(self.raw(value)),
        };
        Problem {
            hide_snippet: hide,
            ..Problem::spanned(value, message)
        }
    }

    pub(super) fn addr(
        &mut self,
        value: &Option<Pos<String>>,
        default: &str,
        what: &str,
    ) -> SocketAddr {
        let fallback: SocketAddr = default
            .parse()
            .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0)));
        let Some(v) = value else { return fallback };
        let Some(text) = self.expand(v) else {
            return fallback;
        };
        match text.parse() {
            Ok(a) => a,
            Err(_) => {
                // Quotes the file's text, never the expansion: whatever a variable holds is
                // the environment's business, and errors are shown in many places.
                let raw = self.raw(v);
                let expanded = if raw.contains("${") {
                    " after ${VAR} expansion"
                } else {
                    ""
                };
                let message = format!(
                    "{what} must be an IP:port address such as {default}, not {raw:?}{expanded}"
                );
                self.problem(Problem::spanned(v, message));
                fallback
            }
        }
    }

    pub(super) fn positive(
        &mut self,
        v: &Option<Pos<i64>>,
        default: u64,
        what: &str,
        max: i64,
    ) -> u64 {
        match v {
            None => default,
            Some(p) if p.value <= 0 => {
                self.problem(Problem::spanned(
                    p,
                    format!("{what} must be greater than 0, got {}", p.value),
                ));
                default
            }
            Some(p) if p.value > max => {
                self.problem(Problem::spanned(
                    p,
                    format!("{what} must be at most {max}, got {}", p.value),
                ));
                default
            }
            Some(p) => p.value as u64,
        }
    }

    pub(super) fn duration_ms(&mut self, v: &Pos<DurationValue>, what: &str) -> Option<u64> {
        match v.value {
            DurationValue::Millis(ms) if ms < 0 => {
                self.problem(Problem::spanned(
                    v,
                    format!("{what} must not be negative, got {ms}"),
                ));
                None
            }
            DurationValue::Millis(ms) => Some(ms as u64),
            DurationValue::Text(d) => Some(d.as_millis() as u64),
        }
    }
}
