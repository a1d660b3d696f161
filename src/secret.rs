//! Values that may carry a secret: signing secrets as written, the admin token, and URLs whose
//! userinfo or query holds a password or token (the store URL, rule targets).
//!
//! [`Redacted`] is the one type such a value lives in from the moment `${VAR}` expansion
//! produces it. Its `Display`, `Debug` and `Serialize` never show the secret part, so a value
//! that reaches a log line, an error, `hookyard check`, `GET /v1/config` or a `{:?}` by mistake
//! still shows nothing. The raw text is reachable only through [`Redacted::expose`], a name
//! that stands out in review; it is called where the value is used, never where it is shown:
//! deriving the signing key, opening the Redis client, building a delivery request and
//! comparing the admin token (in constant time, see `admin`).
//!
//! A URL is shown as `scheme://***@host:port/path?key=***`: userinfo whole, every query value
//! and any fragment are replaced, while what an operator needs to recognise the endpoint (scheme,
//! host, port, path, query keys) stays.

use std::fmt;

/// A string that may hold a secret; shown redacted everywhere.
#[derive(Clone, PartialEq, Eq)]
pub struct Redacted {
    value: Box<str>,
    shape: Shape,
}

/// How much of a value can be shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// Nothing: a token or a signing secret.
    Opaque,
    /// A URL: everything but its userinfo, query values and fragment.
    Url,
}

/// What an opaque secret is shown as.
pub const MASK: &str = "***";

impl Redacted {
    /// A value shown as `***`: a token, a signing secret.
    pub fn opaque(value: impl Into<String>) -> Self {
        Self {
            value: value.into().into_boxed_str(),
            shape: Shape::Opaque,
        }
    }

    /// A URL, shown with its userinfo, query values and fragment masked.
    pub fn url(value: impl Into<String>) -> Self {
        Self {
            value: value.into().into_boxed_str(),
            shape: Shape::Url,
        }
    }

    /// The raw value. Call it only where the value is used (a key derivation, a connection,
    /// a request, a comparison), never to show it.
    pub fn expose(&self) -> &str {
        &self.value
    }

    /// True when the value is the empty string.
    pub fn is_empty(&self) -> bool {
        self.value.is_empty()
    }
}

impl fmt::Display for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.shape {
            Shape::Opaque => f.write_str(MASK),
            Shape::Url => f.write_str(&redact_url(&self.value)),
        }
    }
}

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Redacted({:?})", self.to_string())
    }
}

impl serde::Serialize for Redacted {
    /// The redacted form: JSON answers show what `Display` shows.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl std::str::FromStr for Redacted {
    type Err = std::convert::Infallible;

    /// An opaque value; lets `clap` take secrets from arguments and the environment without
    /// ever holding them as a plain `String`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self::opaque(s))
    }
}

/// `scheme://***@host:port/path?key=***` for any URL; `***` for text that is not a URL (it
/// could be anything, including a secret pasted into the wrong place).
pub fn redact_url(raw: &str) -> String {
    let Ok(url) = url::Url::parse(raw) else {
        return MASK.to_string();
    };
    let mut out = format!("{}://", url.scheme());
    if !url.username().is_empty() || url.password().is_some() {
        out.push_str(MASK);
        out.push('@');
    }
    if let Some(host) = url.host_str() {
        out.push_str(host);
    }
    if let Some(port) = url.port() {
        out.push(':');
        out.push_str(&port.to_string());
    }
    out.push_str(url.path());
    if let Some(query) = url.query() {
        out.push('?');
        let pairs: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((key, _)) => format!("{key}={MASK}"),
                // A bare `?abcdef` is as likely a token as a flag.
                None => MASK.to_string(),
            })
            .collect();
        out.push_str(&pairs.join("&"));
    }
    if url.fragment().is_some() {
        out.push('#');
        out.push_str(MASK);
    }
    out
}

/// `serialize_with` for stored URL strings (event records, dead letters, fallbacks).
pub fn serialize_url<S: serde::Serializer>(url: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&redact_url(url))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_hide_userinfo_query_values_and_fragment() {
        let cases = [
            (
                "redis://:hunter2@127.0.0.1:6379/0",
                "redis://***@127.0.0.1:6379/0",
            ),
            (
                "https://user:pw@example.com/hook?token=abc&x=1#frag",
                "https://***@example.com/hook?token=***&x=***#***",
            ),
            ("http://h:8080/x?bare", "http://h:8080/x?***"),
            ("http://user@h/x", "http://***@h/x"),
            ("http://[::1]:9000/x", "http://[::1]:9000/x"),
            ("http://h:9000/x", "http://h:9000/x"),
            ("not a url hunter2", "***"),
        ];
        for (raw, shown) in cases {
            assert_eq!(redact_url(raw), shown, "{raw}");
            assert_eq!(Redacted::url(raw).to_string(), shown);
        }
    }

    #[test]
    fn display_debug_and_serialize_never_show_the_value() {
        let token = Redacted::opaque("hunter2");
        let url = Redacted::url("redis://:hunter2@h:1/?password=hunter2");
        for shown in [
            token.to_string(),
            format!("{token:?}"),
            serde_json::to_string(&token).unwrap(),
            url.to_string(),
            format!("{url:?}"),
            serde_json::to_string(&url).unwrap(),
            format!("{:?}", Some(&url)),
        ] {
            assert!(!shown.contains("hunter2"), "{shown}");
        }
        assert_eq!(token.expose(), "hunter2");
        assert_eq!(url.to_string(), "redis://***@h:1/?password=***");
    }
}
