//! Outbound signatures: Standard Webhooks (`webhook-signature: v1,<base64>`) and the legacy
//! `X-Webhook-Signature: sha256=<hex>` scheme, plus constant-time verification.

use serde::Serialize;

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


// TEMPORARY (replaced by the signing branch): minimal Secret/Signer so config compiles.
/// A signing key.
pub struct Secret(Vec<u8>);
impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}
/// Bad secret.
#[derive(Debug, thiserror::Error)]
#[error("secret must be whsec_<base64>")]
pub struct SigningError;
impl Secret {
    /// Parses whsec_.
    pub fn parse(s: &str) -> Result<Secret, SigningError> {
        use base64::Engine;
        let b = s.strip_prefix("whsec_").ok_or(SigningError)?;
        base64::engine::general_purpose::STANDARD.decode(b).map(Secret).map_err(|_| SigningError)
    }
}
/// Signs.
#[derive(Debug)]
pub struct Signer { secrets: Vec<Secret> }
impl Signer {
    /// New.
    pub fn new(secrets: Vec<Secret>) -> Self { Self { secrets } }
}
impl Signer {
    /// Headers.
    pub fn headers(&self, _scheme: SignatureScheme, _id: &str, _ts: i64, _body: &[u8]) -> Vec<(http::HeaderName, http::HeaderValue)> { let _ = &self.secrets; Vec::new() }
}
