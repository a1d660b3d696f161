//! Outbound signatures: Standard Webhooks (`webhook-signature: v1,<base64>`) and the legacy
//! `X-Webhook-Signature: sha256=<hex>` scheme, plus constant-time verification.
//!
//! The signing side ([`Signer`]) sits on the delivery hot path, so it feeds the MAC in pieces
//! (never building `id.timestamp.body` in memory) and starts every MAC from a pre-keyed state.
//! The verifying side ([`Verifier`]) backs `hookyard receive` and is usable by any Rust
//! consumer of hookyard's webhooks.

use std::fmt;
use std::time::Duration;

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use hmac::digest::CtOutput;
use hmac::{Hmac, Mac};
use http::{HeaderMap, HeaderName, HeaderValue};
use serde::Serialize;
use sha2::Sha256;

/// How an outbound delivery is signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SignatureScheme {
    /// `webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64>` (Standard Webhooks).
    StandardWebhooks,
    /// `X-Webhook-Signature: sha256=<hex HMAC of the body>`.
    LegacyHmacSha256,
}

impl SignatureScheme {
    /// Stable name used in the store and in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::StandardWebhooks => "standard_webhooks",
            Self::LegacyHmacSha256 => "legacy_hmac_sha256",
        }
    }

    /// Inverse of [`SignatureScheme::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "standard_webhooks" => Some(Self::StandardWebhooks),
            "legacy_hmac_sha256" => Some(Self::LegacyHmacSha256),
            _ => None,
        }
    }
}

type HmacSha256 = Hmac<Sha256>;

/// `webhook-id` header (Standard Webhooks).
pub const HEADER_WEBHOOK_ID: HeaderName = HeaderName::from_static("webhook-id");
/// `webhook-timestamp` header (Standard Webhooks): unix seconds of this attempt.
pub const HEADER_WEBHOOK_TIMESTAMP: HeaderName = HeaderName::from_static("webhook-timestamp");
/// `webhook-signature` header (Standard Webhooks): space-separated `v1,<base64>` entries.
pub const HEADER_WEBHOOK_SIGNATURE: HeaderName = HeaderName::from_static("webhook-signature");
/// `x-webhook-signature` header of the legacy scheme: `sha256=<hex>`.
pub const HEADER_LEGACY_SIGNATURE: HeaderName = HeaderName::from_static("x-webhook-signature");

/// Prefix every configured secret must carry, as the Standard Webhooks spec writes them.
const SECRET_PREFIX: &str = "whsec_";
const SIGNATURE_VERSION_PREFIX: &str = "v1,";
const LEGACY_PREFIX: &str = "sha256=";
/// Length of a SHA-256 MAC in bytes, and of its padded base64 form in characters.
const MAC_LEN: usize = 32;
const MAC_B64_LEN: usize = 44;

/// Secrets are accepted with or without base64 padding: people paste them from many tools, and
/// padding carries no information, so rejecting one form would only be a trap.
const SECRET_B64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Why a secret could not be used. Messages never include any part of the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SigningError {
    /// The secret does not start with `whsec_`.
    #[error("signing secret must start with \"whsec_\"")]
    MissingPrefix,
    /// The part after `whsec_` is not valid base64. The decoder's own message is dropped on
    /// purpose: it quotes the offending character, which is part of the secret.
    #[error("signing secret is not valid base64 after \"whsec_\"")]
    InvalidBase64,
    /// The secret decodes to zero bytes.
    #[error("signing secret is empty")]
    Empty,
    /// A signer or verifier was built without any secret.
    #[error("at least one signing secret is required")]
    NoSecrets,
    /// The message id cannot be sent as an HTTP header value.
    #[error("message id is not a valid header value")]
    InvalidMessageId,
}

/// An HMAC-SHA256 signing key, parsed from `whsec_<base64>`.
///
/// Only the pre-keyed MAC state is kept (not the raw key), so every signature starts from a cheap
/// clone instead of re-hashing the key. `Debug` is redacted.
#[derive(Clone)]
pub struct Secret {
    mac: HmacSha256,
}

impl Secret {
    /// Parses `whsec_<base64>` (surrounding whitespace, e.g. a trailing newline from a file or
    /// environment variable, is ignored). The prefix is required so that a raw base64 string or
    /// a secret of another tool is not silently taken as a key.
    pub fn parse(s: &str) -> Result<Secret, SigningError> {
        let encoded = s
            .trim()
            .strip_prefix(SECRET_PREFIX)
            .ok_or(SigningError::MissingPrefix)?;
        let key = SECRET_B64
            .decode(encoded)
            .map_err(|_| SigningError::InvalidBase64)?;
        Self::from_bytes(&key)
    }

    /// Builds a secret from raw key bytes (for embedders that keep keys in their own format).
    pub fn from_bytes(key: &[u8]) -> Result<Secret, SigningError> {
        if key.is_empty() {
            return Err(SigningError::Empty);
        }
        // HMAC accepts keys of any length, so this cannot fail; map it anyway instead of
        // unwrapping so the function stays panic-free.
        let mac = HmacSha256::new_from_slice(key).map_err(|_| SigningError::Empty)?;
        Ok(Secret { mac })
    }

    /// MAC of `id.timestamp.body`, fed in pieces so the body is never copied.
    fn standard_mac(&self, msg_id: &str, timestamp_secs: i64, body: &[u8]) -> CtOutput<HmacSha256> {
        let mut ts_buf = [0u8; 20];
        let mut mac = self.mac.clone();
        mac.update(msg_id.as_bytes());
        mac.update(b".");
        mac.update(format_i64(timestamp_secs, &mut ts_buf));
        mac.update(b".");
        mac.update(body);
        mac.finalize()
    }

    /// MAC of the body alone (legacy scheme).
    fn body_mac(&self, body: &[u8]) -> CtOutput<HmacSha256> {
        let mut mac = self.mac.clone();
        mac.update(body);
        mac.finalize()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl std::str::FromStr for Secret {
    type Err = SigningError;

    /// Same as [`Secret::parse`]; lets `clap` and `str::parse` build secrets directly.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Secret::parse(s)
    }
}

/// Writes `n` in decimal into `buf` and returns the digits, so the timestamp can be fed to the
/// MAC without allocating a `String`. 20 bytes hold any `i64` including its sign.
fn format_i64(n: i64, buf: &mut [u8; 20]) -> &[u8] {
    let mut v = n.unsigned_abs();
    let mut i = buf.len();
    loop {
        i -= 1;
        // `v % 10` is below 10, so the cast cannot truncate.
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    if n < 0 {
        i -= 1;
        buf[i] = b'-';
    }
    &buf[i..]
}

/// Signs outbound deliveries with one or more secrets (several while rotating).
#[derive(Debug, Clone)]
pub struct Signer {
    secrets: Vec<Secret>,
}

impl Signer {
    /// A signer for `secrets`, in order: the first one is used by the legacy scheme, all of them
    /// by Standard Webhooks. An empty list is rejected, since it would send unsigned requests.
    pub fn new(secrets: Vec<Secret>) -> Result<Signer, SigningError> {
        if secrets.is_empty() {
            return Err(SigningError::NoSecrets);
        }
        Ok(Signer { secrets })
    }

    /// How many secrets sign each delivery.
    pub fn secret_count(&self) -> usize {
        self.secrets.len()
    }

    /// The `webhook-signature` value: `v1,<base64 MAC of "id.timestamp.body">` per secret,
    /// space separated.
    pub fn standard_signature(&self, msg_id: &str, timestamp_secs: i64, body: &[u8]) -> String {
        // One allocation of the exact final size; each MAC is base64-encoded straight into it.
        let per_entry = SIGNATURE_VERSION_PREFIX.len() + MAC_B64_LEN;
        let mut out = String::with_capacity(self.secrets.len() * (per_entry + 1));
        for (i, secret) in self.secrets.iter().enumerate() {
            if i > 0 {
                out.push(' ');
            }
            out.push_str(SIGNATURE_VERSION_PREFIX);
            let tag = secret
                .standard_mac(msg_id, timestamp_secs, body)
                .into_bytes();
            STANDARD.encode_string(tag, &mut out);
        }
        out
    }

    /// The legacy `X-Webhook-Signature` value: `sha256=<lowercase hex MAC of the body>`, with the
    /// first secret only (the legacy scheme has no way to carry several).
    pub fn legacy_signature(&self, body: &[u8]) -> String {
        let tag = self.first().body_mac(body).into_bytes();
        let mut hex_buf = [0u8; MAC_LEN * 2];
        let mut out = String::with_capacity(LEGACY_PREFIX.len() + hex_buf.len());
        out.push_str(LEGACY_PREFIX);
        // The buffer is exactly twice the MAC length, which is all `encode_to_slice` needs.
        if hex::encode_to_slice(tag, &mut hex_buf).is_ok() {
            // Hex digits are ASCII, so every byte maps to the same char.
            out.extend(hex_buf.iter().map(|&b| char::from(b)));
        }
        out
    }

    /// All headers that carry the signature of one delivery attempt.
    ///
    /// Both schemes send `webhook-id` and `webhook-timestamp` (harmless for legacy receivers
    /// and useful for deduplication); Standard Webhooks adds `webhook-signature`, legacy adds
    /// `x-webhook-signature`. Fails only when `msg_id` is not a valid header value.
    pub fn headers(
        &self,
        scheme: SignatureScheme,
        msg_id: &str,
        timestamp_secs: i64,
        body: &[u8],
    ) -> Result<[(HeaderName, HeaderValue); 3], SigningError> {
        let id = HeaderValue::from_str(msg_id).map_err(|_| SigningError::InvalidMessageId)?;
        let ts = HeaderValue::from(timestamp_secs);
        let (name, signature) = match scheme {
            SignatureScheme::StandardWebhooks => (
                HEADER_WEBHOOK_SIGNATURE,
                self.standard_signature(msg_id, timestamp_secs, body),
            ),
            SignatureScheme::LegacyHmacSha256 => {
                (HEADER_LEGACY_SIGNATURE, self.legacy_signature(body))
            }
        };
        // `TryFrom<String>` reuses the string's buffer; base64 and hex output is always a
        // valid header value, so the error arm is unreachable in practice.
        let signature =
            HeaderValue::try_from(signature).map_err(|_| SigningError::InvalidMessageId)?;
        Ok([
            (HEADER_WEBHOOK_ID, id),
            (HEADER_WEBHOOK_TIMESTAMP, ts),
            (name, signature),
        ])
    }

    fn first(&self) -> &Secret {
        // `new` rejects an empty list and the field is private, so index 0 always exists.
        &self.secrets[0]
    }
}

/// What a verified Standard Webhooks request said about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedMessage {
    /// The `webhook-id`: stable across retries, the key to deduplicate on.
    pub id: String,
    /// The `webhook-timestamp`, unix seconds.
    pub timestamp: i64,
}

/// Why a request failed verification.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// A required header is absent.
    #[error("missing header {0}")]
    MissingHeader(&'static str),
    /// A header is present but not visible ASCII.
    #[error("invalid header {0}")]
    InvalidHeader(&'static str),
    /// `webhook-timestamp` is not an integer number of seconds.
    #[error("invalid webhook-timestamp")]
    InvalidTimestamp,
    /// The timestamp is older than the tolerance allows (possible replay).
    #[error("webhook-timestamp too old")]
    TimestampTooOld,
    /// The timestamp is further in the future than the tolerance allows.
    #[error("webhook-timestamp too far in the future")]
    TimestampTooNew,
    /// No signature entry matched any secret.
    #[error("no signature matched")]
    InvalidSignature,
}

/// Verifies incoming webhooks against one or more secrets (any of them may match).
#[derive(Debug, Clone)]
pub struct Verifier {
    secrets: Vec<Secret>,
    tolerance_secs: i64,
}

impl Verifier {
    /// A verifier accepting signatures by any of `secrets`, with timestamps at most `tolerance`
    /// away from now in either direction (Standard Webhooks suggests 5 minutes).
    pub fn new(secrets: Vec<Secret>, tolerance: Duration) -> Result<Verifier, SigningError> {
        if secrets.is_empty() {
            return Err(SigningError::NoSecrets);
        }
        Ok(Verifier {
            secrets,
            tolerance_secs: i64::try_from(tolerance.as_secs()).unwrap_or(i64::MAX),
        })
    }

    /// Verifies a Standard Webhooks request: `webhook-id`, `webhook-timestamp` within tolerance
    /// of `now_secs`, and at least one `v1,` entry of `webhook-signature` matching any secret.
    /// Entries of other versions are ignored, as the spec requires. MACs are compared in
    /// constant time.
    pub fn verify(
        &self,
        headers: &HeaderMap,
        body: &[u8],
        now_secs: i64,
    ) -> Result<VerifiedMessage, VerifyError> {
        let id = header_str(headers, &HEADER_WEBHOOK_ID, "webhook-id")?;
        let ts_raw = header_str(headers, &HEADER_WEBHOOK_TIMESTAMP, "webhook-timestamp")?;
        let signatures = header_str(headers, &HEADER_WEBHOOK_SIGNATURE, "webhook-signature")?;
        let timestamp: i64 = ts_raw.parse().map_err(|_| VerifyError::InvalidTimestamp)?;

        // Saturating: a hostile timestamp near i64::MIN/MAX must not overflow.
        if now_secs.saturating_sub(timestamp) > self.tolerance_secs {
            return Err(VerifyError::TimestampTooOld);
        }
        if timestamp.saturating_sub(now_secs) > self.tolerance_secs {
            return Err(VerifyError::TimestampTooNew);
        }

        // Decode the candidate entries once; a well-formed v1 entry is exactly one MAC.
        let candidates: Vec<CtOutput<HmacSha256>> = signatures
            .split(' ')
            .filter_map(|entry| entry.strip_prefix(SIGNATURE_VERSION_PREFIX))
            .filter_map(decode_b64_mac)
            .collect();
        if candidates.is_empty() {
            return Err(VerifyError::InvalidSignature);
        }

        for secret in &self.secrets {
            let expected = secret.standard_mac(id, timestamp, body);
            // `contains` uses `CtOutput`'s `==`, which is constant time (subtle), so timing does
            // not reveal how much of a forged MAC was right.
            if candidates.contains(&expected) {
                return Ok(VerifiedMessage {
                    id: id.to_owned(),
                    timestamp,
                });
            }
        }
        Err(VerifyError::InvalidSignature)
    }

    /// Verifies the legacy `X-Webhook-Signature: sha256=<hex>` header against any secret. The
    /// hex may be either case. This scheme signs only the body, so it offers no replay
    /// protection; prefer [`Verifier::verify`].
    pub fn verify_legacy(&self, headers: &HeaderMap, body: &[u8]) -> Result<(), VerifyError> {
        let value = header_str(headers, &HEADER_LEGACY_SIGNATURE, "x-webhook-signature")?;
        let hex_mac = value
            .strip_prefix(LEGACY_PREFIX)
            .ok_or(VerifyError::InvalidSignature)?;
        let mut tag = [0u8; MAC_LEN];
        hex::decode_to_slice(hex_mac, &mut tag).map_err(|_| VerifyError::InvalidSignature)?;
        let candidate = CtOutput::<HmacSha256>::new(tag.into());
        if self.secrets.iter().any(|s| s.body_mac(body) == candidate) {
            Ok(())
        } else {
            Err(VerifyError::InvalidSignature)
        }
    }
}

fn header_str<'a>(
    headers: &'a HeaderMap,
    name: &HeaderName,
    label: &'static str,
) -> Result<&'a str, VerifyError> {
    headers
        .get(name)
        .ok_or(VerifyError::MissingHeader(label))?
        .to_str()
        .map_err(|_| VerifyError::InvalidHeader(label))
}

/// Decodes one base64 MAC; anything that is not exactly 32 bytes is not a candidate.
fn decode_b64_mac(entry: &str) -> Option<CtOutput<HmacSha256>> {
    if entry.len() != MAC_B64_LEN {
        return None;
    }
    // The decoder wants room for its length estimate (33 bytes for 44 chars).
    let mut buf = [0u8; MAC_B64_LEN];
    let n = STANDARD.decode_slice(entry, &mut buf).ok()?;
    let tag: [u8; MAC_LEN] = buf.get(..n)?.try_into().ok()?;
    Some(CtOutput::new(tag.into()))
}

#[cfg(test)]
mod tests;
