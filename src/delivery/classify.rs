//! What an attempt's result means for the event, and when to try again.

use std::time::Duration;

use http::header::RETRY_AFTER;

use crate::upstream::{CallError, UpstreamResponse};

/// The longest `Retry-After` honoured: a receiver cannot park an event for days.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// The class of an attempt's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// 2xx.
    Delivered,
    /// 408, 425, 429, 5xx, timeout, connection error; with the receiver's `Retry-After`.
    Retryable { retry_after: Option<Duration> },
    /// Any other 4xx: straight to the DLQ.
    Permanent,
    /// 3xx: redirects are not followed (the rule names the target, and a signed event must not
    /// be handed to wherever a receiver points), and retrying gets the same answer. Straight to
    /// the DLQ with reason `redirect`, so an operator sees a moved endpoint, not a client error.
    Redirect,
    /// 410: dead-letter and disable the target.
    Gone,
}

/// Classifies an attempt's result.
pub fn classify(result: &Result<UpstreamResponse, CallError>) -> Verdict {
    let response = match result {
        Ok(r) => r,
        Err(_) => return Verdict::Retryable { retry_after: None },
    };
    match response.status.as_u16() {
        200..=299 => Verdict::Delivered,
        300..=399 => Verdict::Redirect,
        410 => Verdict::Gone,
        408 | 425 | 429 | 500..=599 => Verdict::Retryable {
            retry_after: response
                .headers
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_retry_after),
        },
        _ => Verdict::Permanent,
    }
}

/// `Retry-After` as delay-seconds or an HTTP date (IMF-fixdate, or the obsolete RFC 850 and
/// asctime forms that RFC 9110 says a recipient must still accept).
fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// The delay before the next attempt: the matrix entry with jitter applied
/// (`unit` is a uniform sample in [0, 1)), raised to the receiver's `Retry-After` up to
/// [`MAX_RETRY_AFTER`].
pub fn retry_delay(
    base_ms: u64,
    jitter: f64,
    retry_after: Option<Duration>,
    unit: f64,
) -> Duration {
    let factor = 1.0 + jitter * (2.0 * unit - 1.0);
    let jittered = Duration::from_millis((base_ms as f64 * factor).max(0.0).round() as u64);
    match retry_after {
        Some(ra) => jittered.max(ra.min(MAX_RETRY_AFTER)),
        None => jittered,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http::{HeaderMap, StatusCode};

    fn answer(status: u16, retry_after: Option<&str>) -> Result<UpstreamResponse, CallError> {
        let mut headers = HeaderMap::new();
        if let Some(ra) = retry_after {
            headers.insert(RETRY_AFTER, ra.parse().unwrap());
        }
        Ok(UpstreamResponse {
            status: StatusCode::from_u16(status).unwrap(),
            headers,
            body: Bytes::new(),
            latency: Duration::ZERO,
        })
    }

    #[test]
    fn classes_follow_the_contract() {
        assert_eq!(classify(&answer(200, None)), Verdict::Delivered);
        assert_eq!(classify(&answer(204, None)), Verdict::Delivered);
        for s in [408, 425, 429, 500, 502, 503, 599] {
            assert!(
                matches!(classify(&answer(s, None)), Verdict::Retryable { .. }),
                "{s}"
            );
        }
        for s in [400, 401, 403, 404, 422] {
            assert_eq!(classify(&answer(s, None)), Verdict::Permanent, "{s}");
        }
        for s in [300, 301, 302, 307, 308] {
            assert_eq!(classify(&answer(s, None)), Verdict::Redirect, "{s}");
        }
        assert_eq!(classify(&answer(410, None)), Verdict::Gone);
        assert!(matches!(
            classify(&Err(CallError::Timeout(Duration::from_millis(5)))),
            Verdict::Retryable { retry_after: None }
        ));
        assert!(matches!(
            classify(&Err(CallError::Connect("refused".into()))),
            Verdict::Retryable { .. }
        ));
    }

    #[test]
    fn retry_after_is_parsed_and_capped() {
        assert_eq!(
            classify(&answer(429, Some("7"))),
            Verdict::Retryable {
                retry_after: Some(Duration::from_secs(7))
            }
        );
        let past = classify(&answer(503, Some("Wed, 21 Oct 2015 07:28:00 GMT")));
        assert_eq!(
            past,
            Verdict::Retryable {
                retry_after: Some(Duration::ZERO)
            }
        );
        // A date ahead, in each form RFC 9110 makes a recipient accept.
        let ahead = std::time::SystemTime::now() + Duration::from_secs(120);
        let imf = httpdate::fmt_http_date(ahead);
        let (weekday, rest) = imf.split_once(", ").unwrap();
        let mut p = rest.split(' ');
        let (day, month, year, time) = (
            p.next().unwrap(),
            p.next().unwrap(),
            p.next().unwrap(),
            p.next().unwrap(),
        );
        let long_day = [
            ("Mon", "Monday"),
            ("Tue", "Tuesday"),
            ("Wed", "Wednesday"),
            ("Thu", "Thursday"),
            ("Fri", "Friday"),
            ("Sat", "Saturday"),
            ("Sun", "Sunday"),
        ]
        .iter()
        .find(|(short, _)| *short == weekday)
        .unwrap()
        .1;
        let rfc850 = format!("{long_day}, {day}-{month}-{}  {time} GMT", &year[2..]);
        let asctime = format!(
            "{weekday} {month} {:>2} {time} {year}",
            day.trim_start_matches('0')
        );
        for form in [imf, rfc850.replace("  ", " "), asctime] {
            match classify(&answer(503, Some(&form))) {
                Verdict::Retryable {
                    retry_after: Some(d),
                } => assert!(
                    d > Duration::from_secs(100) && d <= Duration::from_secs(120),
                    "{form}: {d:?}"
                ),
                other => panic!("{form}: {other:?}"),
            }
        }
        assert_eq!(
            retry_delay(100, 0.0, Some(Duration::from_secs(7)), 0.5),
            Duration::from_secs(7)
        );
        assert_eq!(
            retry_delay(100, 0.0, Some(Duration::from_secs(86_400)), 0.5),
            MAX_RETRY_AFTER
        );
    }

    #[test]
    fn jitter_stays_within_its_fraction() {
        assert_eq!(
            retry_delay(1000, 0.2, None, 0.0),
            Duration::from_millis(800)
        );
        assert_eq!(
            retry_delay(1000, 0.2, None, 0.5),
            Duration::from_millis(1000)
        );
        assert_eq!(
            retry_delay(1000, 0.2, None, 1.0),
            Duration::from_millis(1200)
        );
        assert_eq!(
            retry_delay(1000, 0.0, None, 0.9),
            Duration::from_millis(1000)
        );
    }
}
