//! The compiled rule table: which rule handles an event type.
//!
//! Lookup is one hash probe for the exact type, then one probe per dot-separated prefix
//! (longest first) for `prefix.*` rules, then the `*` catch-all. No regex, no allocation: the
//! prefixes are slices of the incoming event type. The most specific rule therefore wins: an
//! exact rule beats any wildcard, and `user.profile.*` beats `user.*`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

pub mod ordering;

mod rule_metrics;

pub use crate::event::DeliveryMode;
pub use ordering::{OrderingKeyError, OrderingKeySource};
pub use rule_metrics::{possible_outcomes, RuleMetrics, OUTCOMES};

use crate::secret::Redacted;
use crate::signing::SignatureScheme;

/// Where a rule delivers.
///
/// A target may carry credentials: `https://user:pass@host/hook` is delivered to
/// `https://host/hook` with `Authorization: Basic`, as browsers and curl do, and a token in the
/// query is sent as written. Both are secrets, so the URL is kept as [`Redacted`] and shown as
/// `https://***@host/hook?token=***`; `uri` (what the connection is made to) has no userinfo,
/// so the `Host` header, pool keys and metric labels never see it.
#[derive(Clone, Serialize)]
pub struct Target {
    /// The URL as configured (after `${VAR}` expansion); serialized redacted.
    pub url: Redacted,
    /// The URL without its userinfo, used by the HTTP client.
    #[serde(skip)]
    pub uri: http::Uri,
    /// `host:port`: the key of the per-host pool, gate and breaker.
    pub host: Arc<str>,
    /// `Basic` credentials from the URL's userinfo, marked sensitive.
    #[serde(skip)]
    pub authorization: Option<http::HeaderValue>,
}

impl std::fmt::Debug for Target {
    // Written by hand: `uri` would print the query (a token) and the derived form would too.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("url", &self.url)
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

/// Why a string cannot be a target. Messages never quote the URL: it may hold a password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// Not a URL at all; the parser's reason names the kind of mistake, not the text.
    #[error("not a URL ({0})")]
    Invalid(String),
    #[error("scheme must be http or https")]
    Scheme,
    #[error("host missing")]
    NoHost,
    #[error("the user name or password is not a valid header value")]
    BadCredentials,
}

impl Target {
    /// Parses and checks an absolute `http://` or `https://` URL, splitting any userinfo off
    /// into `Authorization: Basic`. Config compilation and async delivery (which reads the
    /// URL stored with the event) both build their targets here.
    pub fn parse(url: Redacted) -> Result<Target, TargetError> {
        let uri: http::Uri = url
            .expose()
            .parse()
            .map_err(|e: http::uri::InvalidUri| TargetError::Invalid(e.to_string()))?;
        if !matches!(uri.scheme_str(), Some("http") | Some("https")) {
            return Err(TargetError::Scheme);
        }
        let host = host_key(&uri).ok_or(TargetError::NoHost)?;
        let (uri, authorization) = split_userinfo(uri)?;
        Ok(Target {
            url,
            uri,
            host,
            authorization,
        })
    }
}

/// `uri` without its userinfo, and the userinfo as a sensitive `Basic` header value.
fn split_userinfo(uri: http::Uri) -> Result<(http::Uri, Option<http::HeaderValue>), TargetError> {
    use base64::Engine as _;
    let Some((userinfo, host_port)) = uri
        .authority()
        .and_then(|a| a.as_str().rsplit_once('@'))
        .map(|(u, h)| (u.to_string(), h.to_string()))
    else {
        return Ok((uri, None));
    };
    let mut parts = uri.into_parts();
    parts.authority = Some(
        host_port
            .parse()
            .map_err(|e: http::uri::InvalidUri| TargetError::Invalid(e.to_string()))?,
    );
    let uri = http::Uri::from_parts(parts).map_err(|e| TargetError::Invalid(e.to_string()))?;
    let (user, password) = userinfo.split_once(':').unwrap_or((&userinfo, ""));
    let decode = |s: &str| percent_encoding::percent_decode_str(s).collect::<Vec<u8>>();
    let mut credentials = decode(user);
    credentials.push(b':');
    credentials.extend(decode(password));
    let encoded = base64::engine::general_purpose::STANDARD.encode(credentials);
    let mut value = http::HeaderValue::from_str(&format!("Basic {encoded}"))
        .map_err(|_| TargetError::BadCredentials)?;
    // Keeps it out of HTTP/2 header compression tables and `Debug` output.
    value.set_sensitive(true);
    Ok((uri, Some(value)))
}

/// One compiled routing rule.
#[derive(Debug, Clone, Serialize)]
pub struct Rule {
    /// The `event_type` as written: exact, `prefix.*`, or `*`. Also the metric label.
    pub pattern: Arc<str>,
    pub mode: DeliveryMode,
    pub target: Target,
    /// Deadline of one attempt (sync: the whole call).
    #[serde(serialize_with = "serialize_ms")]
    pub timeout: Duration,
    /// Sync only: queue the event for async delivery when the sync call fails.
    pub fallback_to_async: bool,
    /// Queue used by async delivery and by fallback.
    pub queue: Arc<str>,
    /// Delays before each retry, in ms; attempts = 1 + len.
    pub retry_delays_ms: Arc<[u64]>,
    /// Fraction of each delay applied as +/- jitter.
    pub jitter: f64,
    pub signature: SignatureScheme,
    /// Async only: events with the same key are delivered one at a time in accept order.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ordering_key: Option<OrderingKeySource>,
    /// This rule's `events_received` counters.
    #[serde(skip)]
    pub metrics: Arc<RuleMetrics>,
}

/// The `host:port` key of a target URL (the port defaults by scheme), or `None` when the URL
/// has no host. Userinfo is not part of it, so credentials never reach logs or metric labels.
pub fn host_key(uri: &http::Uri) -> Option<Arc<str>> {
    let authority = uri.authority()?;
    if authority.host().is_empty() {
        return None;
    }
    let default_port = if uri.scheme_str() == Some("https") {
        443
    } else {
        80
    };
    Some(
        format!(
            "{}:{}",
            authority.host(),
            authority.port_u16().unwrap_or(default_port)
        )
        .into(),
    )
}

fn serialize_ms<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis() as u64)
}

/// A pattern accepted as an `event_type` in a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern<'a> {
    /// Matches exactly this type.
    Exact(&'a str),
    /// `prefix.*`: matches any type that starts with `prefix.`.
    Prefix(&'a str),
    /// `*`: matches anything.
    CatchAll,
}

/// Why a string is not a valid event type or pattern.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("event type is empty")]
    Empty,
    #[error("event type is longer than {MAX_EVENT_TYPE_LEN} bytes")]
    TooLong,
    #[error("event type contains {0:?}; allowed are letters, digits and . _ - :")]
    BadChar(char),
    #[error("event type has an empty segment (leading, trailing or doubled '.')")]
    EmptySegment,
    #[error("'*' may only stand alone or as the last segment (\"prefix.*\")")]
    MisplacedWildcard,
}

/// Longest event type accepted; bounds the work and memory one request can cause.
pub const MAX_EVENT_TYPE_LEN: usize = 200;

/// Checks an event type sent by a client (no wildcards allowed).
pub fn validate_event_type(s: &str) -> Result<(), PatternError> {
    if s.is_empty() {
        return Err(PatternError::Empty);
    }
    if s.len() > MAX_EVENT_TYPE_LEN {
        return Err(PatternError::TooLong);
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':')))
    {
        return Err(PatternError::BadChar(c));
    }
    if s.split('.').any(str::is_empty) {
        return Err(PatternError::EmptySegment);
    }
    Ok(())
}

/// Parses a rule's `event_type`.
pub fn parse_pattern(s: &str) -> Result<Pattern<'_>, PatternError> {
    if s == "*" {
        return Ok(Pattern::CatchAll);
    }
    if let Some(prefix) = s.strip_suffix(".*") {
        if prefix.contains('*') {
            return Err(PatternError::MisplacedWildcard);
        }
        validate_event_type(prefix)?;
        return Ok(Pattern::Prefix(prefix));
    }
    if s.contains('*') {
        return Err(PatternError::MisplacedWildcard);
    }
    validate_event_type(s)?;
    Ok(Pattern::Exact(s))
}

/// The compiled rule table. Immutable; a reload builds a new one.
#[derive(Debug, Default)]
pub struct RuleTable {
    exact: HashMap<Box<str>, Arc<Rule>>,
    prefixes: HashMap<Box<str>, Arc<Rule>>,
    catch_all: Option<Arc<Rule>>,
    /// In file order, for display.
    ordered: Vec<Arc<Rule>>,
}

/// A second rule for a pattern already in the table.
#[derive(Debug, thiserror::Error)]
#[error("duplicate rule for event_type {0:?}")]
pub struct DuplicateRule(pub String);

impl RuleTable {
    /// Adds a rule; a second rule for the same pattern is an error.
    pub fn insert(&mut self, rule: Rule) -> Result<(), DuplicateRule> {
        let rule = Arc::new(rule);
        let pattern = rule.pattern.clone();
        let slot = match parse_pattern(&pattern) {
            Ok(Pattern::Exact(s)) => self.exact.entry(s.into()),
            Ok(Pattern::Prefix(p)) => self.prefixes.entry(p.into()),
            Ok(Pattern::CatchAll) => {
                if self.catch_all.is_some() {
                    return Err(DuplicateRule(pattern.to_string()));
                }
                self.catch_all = Some(rule.clone());
                self.ordered.push(rule);
                return Ok(());
            }
            // Compile validates patterns first; an invalid one can never match anything.
            Err(_) => return Err(DuplicateRule(pattern.to_string())),
        };
        match slot {
            std::collections::hash_map::Entry::Occupied(_) => {
                Err(DuplicateRule(pattern.to_string()))
            }
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(rule.clone());
                self.ordered.push(rule);
                Ok(())
            }
        }
    }

    /// The most specific rule for `event_type`, if any.
    pub fn route(&self, event_type: &str) -> Option<&Arc<Rule>> {
        if let Some(rule) = self.exact.get(event_type) {
            return Some(rule);
        }
        if !self.prefixes.is_empty() {
            let mut end = event_type.len();
            while let Some(dot) = event_type[..end].rfind('.') {
                if let Some(rule) = self.prefixes.get(&event_type[..dot]) {
                    return Some(rule);
                }
                end = dot;
            }
        }
        self.catch_all.as_ref()
    }

    /// Every rule, in the order of the file.
    pub fn rules(&self) -> &[Arc<Rule>] {
        &self.ordered
    }

    /// Number of rules.
    pub fn len(&self) -> usize {
        self.ordered.len()
    }

    /// True when there are no rules.
    pub fn is_empty(&self) -> bool {
        self.ordered.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(pattern: &str) -> Rule {
        Rule {
            pattern: pattern.into(),
            mode: DeliveryMode::Async,
            target: Target::parse(Redacted::url("http://127.0.0.1:1/")).unwrap(),
            timeout: Duration::from_millis(100),
            fallback_to_async: false,
            queue: "default".into(),
            retry_delays_ms: Arc::from(vec![10u64]),
            jitter: 0.0,
            signature: SignatureScheme::StandardWebhooks,
            ordering_key: None,
            metrics: Default::default(),
        }
    }

    #[test]
    fn target_userinfo_becomes_basic_auth_and_leaves_the_uri() {
        let t = Target::parse(Redacted::url(
            "http://us%40er:p%3Ass@h.example:81/x?token=t1",
        ))
        .unwrap();
        assert_eq!(t.uri.to_string(), "http://h.example:81/x?token=t1");
        assert_eq!(&*t.host, "h.example:81");
        let auth = t.authorization.as_ref().unwrap();
        assert!(auth.is_sensitive());
        // base64("us@er:p:ss")
        assert_eq!(auth.to_str().unwrap(), "Basic dXNAZXI6cDpzcw==");
        let shown = format!("{t:?} {}", serde_json::to_string(&t).unwrap());
        assert!(
            !shown.contains("p%3Ass") && !shown.contains("t1"),
            "{shown}"
        );
        assert!(
            shown.contains("http://***@h.example:81/x?token=***"),
            "{shown}"
        );
        let plain = Target::parse(Redacted::url("https://h.example/x")).unwrap();
        assert_eq!(&*plain.host, "h.example:443");
        assert!(plain.authorization.is_none());
        assert_eq!(
            Target::parse(Redacted::url("ftp://u:pw@h/")).unwrap_err(),
            TargetError::Scheme
        );
    }

    fn table(patterns: &[&str]) -> RuleTable {
        let mut t = RuleTable::default();
        for p in patterns {
            t.insert(rule(p)).unwrap();
        }
        t
    }

    fn routed<'a>(t: &'a RuleTable, ty: &str) -> Option<&'a str> {
        t.route(ty).map(|r| &*r.pattern)
    }

    #[test]
    fn exact_beats_wildcards_and_longest_prefix_wins() {
        let t = table(&["*", "user.*", "user.profile.*", "user.profile.updated"]);
        assert_eq!(
            routed(&t, "user.profile.updated"),
            Some("user.profile.updated")
        );
        assert_eq!(routed(&t, "user.profile.deleted"), Some("user.profile.*"));
        assert_eq!(
            routed(&t, "user.profile.photo.added"),
            Some("user.profile.*")
        );
        assert_eq!(routed(&t, "user.created"), Some("user.*"));
        assert_eq!(routed(&t, "order.created"), Some("*"));
    }

    #[test]
    fn prefix_does_not_match_the_bare_prefix_or_a_longer_word() {
        let t = table(&["user.*"]);
        assert_eq!(routed(&t, "user"), None);
        assert_eq!(routed(&t, "username.changed"), None);
        assert_eq!(routed(&t, "user.x"), Some("user.*"));
    }

    #[test]
    fn no_rule_and_no_catch_all_routes_nowhere() {
        let t = table(&["payment.authorize"]);
        assert_eq!(routed(&t, "payment.capture"), None);
    }

    #[test]
    fn duplicates_are_rejected() {
        let mut t = table(&["a.b", "a.*", "*"]);
        assert!(t.insert(rule("a.b")).is_err());
        assert!(t.insert(rule("a.*")).is_err());
        assert!(t.insert(rule("*")).is_err());
    }

    #[test]
    fn patterns_are_checked() {
        assert_eq!(parse_pattern("*"), Ok(Pattern::CatchAll));
        assert_eq!(parse_pattern("a.b.*"), Ok(Pattern::Prefix("a.b")));
        assert_eq!(parse_pattern("a.b"), Ok(Pattern::Exact("a.b")));
        assert_eq!(parse_pattern(""), Err(PatternError::Empty));
        assert_eq!(parse_pattern("a.*.b"), Err(PatternError::MisplacedWildcard));
        assert_eq!(parse_pattern("a*"), Err(PatternError::MisplacedWildcard));
        assert_eq!(parse_pattern("a..b"), Err(PatternError::EmptySegment));
        assert_eq!(parse_pattern(".*"), Err(PatternError::Empty));
        assert_eq!(parse_pattern("a b"), Err(PatternError::BadChar(' ')));
        assert!(validate_event_type(&"a".repeat(201)).is_err());
    }
}
