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
