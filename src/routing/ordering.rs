//! Where an async rule finds an event's ordering key: a request header or a JSON pointer into
//! the body.
//!
//! Events of one key are delivered one at a time in accept order (the store enforces it); this
//! module only reads the key at ingress and checks that it can travel in the
//! `X-Ordering-Key` header of every delivery.

use std::fmt;

use http::{HeaderMap, HeaderName};
use serde::{Serialize, Serializer};

/// Most bytes in an ordering key; a key travels in the `X-Ordering-Key` header.
pub const MAX_ORDERING_KEY_LEN: usize = 256;

/// A rule's `ordering_key:` as compiled: `header:<Name>` or `json:<pointer>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderingKeySource {
    /// The value of this request header.
    Header(HeaderName),
    /// The string or integer at this RFC 6901 pointer (`/customer/id`) in the JSON body.
    JsonPointer(String),
}

/// Why an event's ordering key could not be read; ingress answers 400 with the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OrderingKeyError {
    /// The header or the pointer's value is absent: the rule promises order per key, and an
    /// event without one cannot be placed in that order.
    #[error("the rule orders events by {0}, and this event has none")]
    Missing(OrderingKeySource),
    /// The body is not JSON, so a `json:` pointer cannot be followed.
    #[error("the rule orders events by {0}, and the body is not JSON: {1}")]
    BodyNotJson(OrderingKeySource, String),
    /// The pointer names an object, array, boolean or null rather than a string or integer.
    #[error("the rule orders events by {0}, which must be a string or an integer here")]
    NotScalar(OrderingKeySource),
    /// Empty, longer than [`MAX_ORDERING_KEY_LEN`] bytes, or not printable ASCII (it is sent
    /// as a header).
    #[error(
        "ordering key from {0} must be 1 to {MAX_ORDERING_KEY_LEN} printable ASCII characters"
    )]
    Invalid(OrderingKeySource),
}

impl OrderingKeySource {
    /// Parses `header:<Name>` or `json:/<pointer>`; the error says what is wrong.
    pub fn parse(spec: &str) -> Result<Self, String> {
        if let Some(name) = spec.strip_prefix("header:") {
            return HeaderName::from_bytes(name.trim().as_bytes())
                .map(Self::Header)
                .map_err(|_| format!("{name:?} is not a valid header name"));
        }
        if let Some(pointer) = spec.strip_prefix("json:") {
            // An empty pointer would name the whole body, never a key.
            return if pointer.starts_with('/') {
                Ok(Self::JsonPointer(pointer.to_owned()))
            } else {
                Err(format!(
                    "{pointer:?} is not a JSON pointer: it starts with '/' (json:/customer/id)"
                ))
            };
        }
        Err(
            "write header:<Name> or json:<pointer> (header:X-Customer-Id, json:/customer/id)"
                .into(),
        )
    }

    /// The event's key, from its request headers or its body.
    pub fn extract(&self, headers: &HeaderMap, body: &[u8]) -> Result<String, OrderingKeyError> {
        let key = match self {
            Self::Header(name) => {
                let value = headers
                    .get(name)
                    .ok_or_else(|| OrderingKeyError::Missing(self.clone()))?;
                value
                    .to_str()
                    .map_err(|_| OrderingKeyError::Invalid(self.clone()))?
                    .to_owned()
            }
            Self::JsonPointer(pointer) => {
                let document: serde_json::Value = serde_json::from_slice(body)
                    .map_err(|e| OrderingKeyError::BodyNotJson(self.clone(), e.to_string()))?;
                match document.pointer(pointer) {
                    None | Some(serde_json::Value::Null) => {
                        return Err(OrderingKeyError::Missing(self.clone()))
                    }
                    Some(serde_json::Value::String(s)) => s.clone(),
                    Some(serde_json::Value::Number(n)) if n.is_i64() || n.is_u64() => n.to_string(),
                    Some(_) => return Err(OrderingKeyError::NotScalar(self.clone())),
                }
            }
        };
        let printable = key.bytes().all(|b| (0x20..=0x7e).contains(&b));
        if key.is_empty() || key.len() > MAX_ORDERING_KEY_LEN || !printable {
            return Err(OrderingKeyError::Invalid(self.clone()));
        }
        Ok(key)
    }
}

impl fmt::Display for OrderingKeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Header(name) => write!(f, "header:{name}"),
            Self::JsonPointer(pointer) => write!(f, "json:{pointer}"),
        }
    }
}

impl Serialize for OrderingKeySource {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| (k.parse().unwrap(), v.parse().unwrap()))
            .collect()
    }

    #[test]
    fn parses_both_forms_and_explains_the_rest() {
        assert_eq!(
            OrderingKeySource::parse("header:X-Customer-Id").unwrap(),
            OrderingKeySource::Header(HeaderName::from_static("x-customer-id"))
        );
        assert_eq!(
            OrderingKeySource::parse("json:/customer/id").unwrap(),
            OrderingKeySource::JsonPointer("/customer/id".into())
        );
        assert!(OrderingKeySource::parse("header:bad name")
            .unwrap_err()
            .contains("not a valid header name"));
        assert!(OrderingKeySource::parse("json:customer")
            .unwrap_err()
            .contains("starts with '/'"));
        assert!(OrderingKeySource::parse("customer")
            .unwrap_err()
            .contains("header:<Name> or json:<pointer>"));
        assert_eq!(
            OrderingKeySource::parse("json:/a/b").unwrap().to_string(),
            "json:/a/b"
        );
    }

    #[test]
    fn reads_a_header_or_a_string_or_integer_in_the_body() {
        let by_header = OrderingKeySource::parse("header:X-Customer-Id").unwrap();
        assert_eq!(
            by_header.extract(&headers(&[("x-customer-id", "c-42")]), b"not json"),
            Ok("c-42".to_owned())
        );
        let by_body = OrderingKeySource::parse("json:/customer/id").unwrap();
        let none = HeaderMap::new();
        assert_eq!(
            by_body.extract(&none, br#"{"customer":{"id":"c-7"}}"#),
            Ok("c-7".to_owned())
        );
        assert_eq!(
            by_body.extract(&none, br#"{"customer":{"id":123}}"#),
            Ok("123".to_owned())
        );
    }

    #[test]
    fn refuses_what_cannot_be_placed_in_order() {
        let by_header = OrderingKeySource::parse("header:X-Customer-Id").unwrap();
        assert!(matches!(
            by_header.extract(&HeaderMap::new(), b"{}"),
            Err(OrderingKeyError::Missing(_))
        ));
        let long = "k".repeat(MAX_ORDERING_KEY_LEN + 1);
        assert!(matches!(
            by_header.extract(&headers(&[("x-customer-id", &long)]), b""),
            Err(OrderingKeyError::Invalid(_))
        ));
        let by_body = OrderingKeySource::parse("json:/id").unwrap();
        let none = HeaderMap::new();
        for (body, want) in [
            (&b"{}"[..], "Missing"),
            (br#"{"id":null}"#, "Missing"),
            (br#"{"id":{"a":1}}"#, "NotScalar"),
            (br#"{"id":1.5}"#, "NotScalar"),
            (br#"{"id":true}"#, "NotScalar"),
            (br#"{"id":""}"#, "Invalid"),
            ("{\"id\":\"caf\u{e9}\"}".as_bytes(), "Invalid"),
            (b"<xml/>", "BodyNotJson"),
        ] {
            let got = by_body.extract(&none, body).unwrap_err();
            assert!(
                format!("{got:?}").starts_with(want),
                "{}: {got:?}",
                String::from_utf8_lossy(body)
            );
        }
    }
}
