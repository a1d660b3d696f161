//! Trace ids: taken from `X-Trace-Id` or W3C `traceparent`, generated when absent.

use http::HeaderMap;

use crate::headers::{TRACEPARENT, X_TRACE_ID};

/// Longest `X-Trace-Id` accepted from a caller.
const MAX_TRACE_ID_LEN: usize = 128;

/// A new W3C-compatible trace id: 32 lowercase hex digits.
pub fn new_trace_id() -> String {
    let mut digits = [0u8; 32];
    // 16 random bytes are exactly 32 hex digits, so encoding cannot fail.
    let _ = hex::encode_to_slice(rand::random::<[u8; 16]>(), &mut digits);
    // Hex digits are ASCII: one copy, instead of pushing 32 chars one at a time.
    String::from_utf8_lossy(&digits).into_owned()
}

/// The caller's trace id: `X-Trace-Id` if it is sane, else the trace-id field of a valid
/// `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`).
pub fn trace_id_from_headers(headers: &HeaderMap) -> Option<String> {
    if let Some(id) = headers.get(X_TRACE_ID).and_then(|v| v.to_str().ok()) {
        let ok = !id.is_empty()
            && id.len() <= MAX_TRACE_ID_LEN
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
        if ok {
            return Some(id.to_string());
        }
    }
    let tp = headers.get(TRACEPARENT)?.to_str().ok()?;
    let mut parts = tp.split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    let not_zero = |s: &str| s.bytes().any(|b| b != b'0');
    // Version 00 has exactly four fields; a later version may append more (W3C Trace
    // Context, "versioning of traceparent"), which a version-00 reader ignores.
    let fields_ok = version != "00" || parts.next().is_none();
    let valid = hex(version, 2)
        && version != "ff"
        && fields_ok
        && hex(trace, 32)
        && not_zero(trace)
        && hex(parent, 16)
        && not_zero(parent)
        && hex(flags, 2);
    valid.then(|| trace.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn x_trace_id_wins_then_traceparent_then_nothing() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(
            trace_id_from_headers(&headers(&[("x-trace-id", "abc-1"), ("traceparent", tp)]))
                .as_deref(),
            Some("abc-1")
        );
        assert_eq!(
            trace_id_from_headers(&headers(&[("traceparent", tp)])).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(trace_id_from_headers(&headers(&[])), None);
    }

    #[test]
    fn malformed_values_are_ignored() {
        assert_eq!(
            trace_id_from_headers(&headers(&[("x-trace-id", "a b")])),
            None
        );
        assert_eq!(
            trace_id_from_headers(&headers(&[(
                "traceparent",
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01"
            )])),
            None
        );
        assert_eq!(
            trace_id_from_headers(&headers(&[("traceparent", "garbage")])),
            None
        );
    }

    #[test]
    fn generated_trace_ids_are_distinct_w3c_trace_ids() {
        let (a, b) = (new_trace_id(), new_trace_id());
        assert_ne!(a, b);
        for id in [a, b] {
            assert_eq!(id.len(), 32, "{id}");
            assert!(
                id.bytes().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')),
                "{id}"
            );
        }
    }

    #[test]
    fn a_traceparent_with_a_zero_parent_id_or_extra_fields_is_ignored() {
        let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
        for tp in [
            format!("00-{trace}-0000000000000000-01"),
            format!("00-{trace}-00f067aa0ba902b7-01-extra"),
            format!("00-{trace}-00f067aa0ba902b7-01-"),
        ] {
            let mut h = HeaderMap::new();
            h.insert("traceparent", tp.parse().unwrap());
            assert_eq!(trace_id_from_headers(&h), None, "{tp}");
        }
        // A later version may carry more fields.
        let mut h = HeaderMap::new();
        h.insert(
            "traceparent",
            format!("01-{trace}-00f067aa0ba902b7-01-future")
                .parse()
                .unwrap(),
        );
        assert_eq!(trace_id_from_headers(&h).as_deref(), Some(trace));
    }
}
