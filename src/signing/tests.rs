//! Signing and verification unit tests: the Standard Webhooks spec vectors, rotation,
//! tampering, timestamps and the legacy scheme.

use super::*;

const SPEC_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const SPEC_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
const SPEC_TS: i64 = 1614265330;
const SPEC_BODY: &[u8] = br#"{"test": 2432232314}"#;
const SPEC_SIG: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";
const OTHER_SECRET: &str = "whsec_ZGV2ZWxvcG1lbnQtb25seS1ub3QtYS1zZWNyZXQ=";
const FIVE_MIN: Duration = Duration::from_secs(300);

fn secret(s: &str) -> Secret {
    Secret::parse(s).unwrap()
}

fn signer(secrets: &[&str]) -> Signer {
    Signer::new(secrets.iter().map(|s| secret(s)).collect()).unwrap()
}

fn verifier(secrets: &[&str]) -> Verifier {
    Verifier::new(secrets.iter().map(|s| secret(s)).collect(), FIVE_MIN).unwrap()
}

fn header_map(pairs: impl IntoIterator<Item = (HeaderName, HeaderValue)>) -> HeaderMap {
    pairs.into_iter().collect()
}

fn spec_headers(signature: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(HEADER_WEBHOOK_ID, HeaderValue::from_static(SPEC_ID));
    h.insert(HEADER_WEBHOOK_TIMESTAMP, HeaderValue::from(SPEC_TS));
    h.insert(HEADER_WEBHOOK_SIGNATURE, signature.parse().unwrap());
    h
}

#[test]
fn spec_test_vector_signs() {
    let sig = signer(&[SPEC_SECRET]).standard_signature(SPEC_ID, SPEC_TS, SPEC_BODY);
    assert_eq!(sig, SPEC_SIG);
}

#[test]
fn spec_test_vector_verifies() {
    let v = verifier(&[SPEC_SECRET]);
    let msg = v
        .verify(&spec_headers(SPEC_SIG), SPEC_BODY, SPEC_TS)
        .unwrap();
    assert_eq!(
        msg,
        VerifiedMessage {
            id: SPEC_ID.into(),
            timestamp: SPEC_TS
        }
    );
}

#[test]
fn secret_parse_requires_prefix_and_base64() {
    assert_eq!(
        Secret::parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap_err(),
        SigningError::MissingPrefix
    );
    assert_eq!(
        Secret::parse("whsec_not*base64").unwrap_err(),
        SigningError::InvalidBase64
    );
    assert_eq!(Secret::parse("whsec_").unwrap_err(), SigningError::Empty);
    // Unpadded and whitespace-wrapped forms name the same key.
    let padded = signer(&["whsec_ZGV2ZWxvcG1lbnQtb25seS1ub3QtYS1zZWNyZXQ="]);
    let unpadded = signer(&[" whsec_ZGV2ZWxvcG1lbnQtb25seS1ub3QtYS1zZWNyZXQ\n"]);
    assert_eq!(
        padded.legacy_signature(b"x"),
        unpadded.legacy_signature(b"x")
    );
    assert!("whsec_ZGV2".parse::<Secret>().is_ok());
}

#[test]
fn debug_is_redacted() {
    let s = secret(SPEC_SECRET);
    let signer = Signer::new(vec![s.clone()]).unwrap();
    let verifier = Verifier::new(vec![s.clone()], FIVE_MIN).unwrap();
    for text in [
        format!("{s:?}"),
        format!("{signer:?}"),
        format!("{verifier:?}"),
    ] {
        assert!(text.contains("<redacted>"), "{text}");
        assert!(!text.contains("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"), "{text}");
    }
    // Errors never quote the secret either.
    let err = Secret::parse("whsec_abc$def").unwrap_err().to_string();
    assert!(!err.contains("abc") && !err.contains('$'), "{err}");
}

#[test]
fn empty_secret_lists_are_rejected() {
    assert_eq!(Signer::new(vec![]).unwrap_err(), SigningError::NoSecrets);
    assert_eq!(
        Verifier::new(vec![], FIVE_MIN).unwrap_err(),
        SigningError::NoSecrets
    );
}

#[test]
fn rotation_signs_with_every_secret_and_each_verifies() {
    let both = signer(&[SPEC_SECRET, OTHER_SECRET]);
    let sig = both.standard_signature(SPEC_ID, SPEC_TS, SPEC_BODY);
    let entries: Vec<&str> = sig.split(' ').collect();
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[0], SPEC_SIG);
    assert_eq!(
        entries[1],
        signer(&[OTHER_SECRET]).standard_signature(SPEC_ID, SPEC_TS, SPEC_BODY)
    );
    // A receiver that knows only the old or only the new secret accepts the delivery.
    for s in [SPEC_SECRET, OTHER_SECRET] {
        verifier(&[s])
            .verify(&spec_headers(&sig), SPEC_BODY, SPEC_TS)
            .unwrap();
    }
    // A receiver that knows both accepts a single-secret signature from either.
    let v = verifier(&[OTHER_SECRET, SPEC_SECRET]);
    v.verify(&spec_headers(SPEC_SIG), SPEC_BODY, SPEC_TS)
        .unwrap();
}

#[test]
fn tampering_is_detected() {
    let v = verifier(&[SPEC_SECRET]);
    let body_err = v.verify(&spec_headers(SPEC_SIG), br#"{"test": 2432232315}"#, SPEC_TS);
    assert_eq!(body_err.unwrap_err(), VerifyError::InvalidSignature);

    let mut h = spec_headers(SPEC_SIG);
    h.insert(HEADER_WEBHOOK_ID, HeaderValue::from_static("msg_other"));
    assert_eq!(
        v.verify(&h, SPEC_BODY, SPEC_TS).unwrap_err(),
        VerifyError::InvalidSignature
    );

    let mut h = spec_headers(SPEC_SIG);
    h.insert(HEADER_WEBHOOK_TIMESTAMP, HeaderValue::from(SPEC_TS + 1));
    assert_eq!(
        v.verify(&h, SPEC_BODY, SPEC_TS).unwrap_err(),
        VerifyError::InvalidSignature
    );

    // Wrong secret, truncated entry, bare prefix, other version: all rejected.
    let wrong = signer(&[OTHER_SECRET]).standard_signature(SPEC_ID, SPEC_TS, SPEC_BODY);
    for bad in [
        wrong.as_str(),
        &SPEC_SIG[..20],
        "v1,",
        "v2,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
    ] {
        assert_eq!(
            v.verify(&spec_headers(bad), SPEC_BODY, SPEC_TS)
                .unwrap_err(),
            VerifyError::InvalidSignature,
            "{bad}"
        );
    }
    // A valid entry among junk entries still verifies.
    let mixed = format!("v1a,xyz v1,AAAA {SPEC_SIG}");
    v.verify(&spec_headers(&mixed), SPEC_BODY, SPEC_TS).unwrap();
}

#[test]
fn missing_and_malformed_headers() {
    let v = verifier(&[SPEC_SECRET]);
    for (name, label) in [
        (HEADER_WEBHOOK_ID, "webhook-id"),
        (HEADER_WEBHOOK_TIMESTAMP, "webhook-timestamp"),
        (HEADER_WEBHOOK_SIGNATURE, "webhook-signature"),
    ] {
        let mut h = spec_headers(SPEC_SIG);
        h.remove(&name);
        assert_eq!(
            v.verify(&h, SPEC_BODY, SPEC_TS).unwrap_err(),
            VerifyError::MissingHeader(label)
        );
    }
    for bad_ts in ["", "abc", "1614265330.5", "99999999999999999999"] {
        let mut h = spec_headers(SPEC_SIG);
        h.insert(HEADER_WEBHOOK_TIMESTAMP, bad_ts.parse().unwrap());
        assert_eq!(
            v.verify(&h, SPEC_BODY, SPEC_TS).unwrap_err(),
            VerifyError::InvalidTimestamp,
            "{bad_ts}"
        );
    }
    let mut h = spec_headers(SPEC_SIG);
    h.insert(
        HEADER_WEBHOOK_ID,
        HeaderValue::from_bytes(b"msg\xff").unwrap(),
    );
    assert_eq!(
        v.verify(&h, SPEC_BODY, SPEC_TS).unwrap_err(),
        VerifyError::InvalidHeader("webhook-id")
    );
}

#[test]
fn timestamp_tolerance_both_directions() {
    let v = verifier(&[SPEC_SECRET]);
    let h = spec_headers(SPEC_SIG);
    // Exactly at the edge is accepted; one second beyond is not.
    v.verify(&h, SPEC_BODY, SPEC_TS + 300).unwrap();
    v.verify(&h, SPEC_BODY, SPEC_TS - 300).unwrap();
    assert_eq!(
        v.verify(&h, SPEC_BODY, SPEC_TS + 301).unwrap_err(),
        VerifyError::TimestampTooOld
    );
    assert_eq!(
        v.verify(&h, SPEC_BODY, SPEC_TS - 301).unwrap_err(),
        VerifyError::TimestampTooNew
    );
    // Extreme values neither overflow nor pass.
    let mut h = spec_headers(SPEC_SIG);
    h.insert(HEADER_WEBHOOK_TIMESTAMP, HeaderValue::from(i64::MIN));
    assert_eq!(
        v.verify(&h, SPEC_BODY, i64::MAX).unwrap_err(),
        VerifyError::TimestampTooOld
    );
    // A zero tolerance accepts only the exact second.
    let strict = Verifier::new(vec![secret(SPEC_SECRET)], Duration::ZERO).unwrap();
    strict
        .verify(&spec_headers(SPEC_SIG), SPEC_BODY, SPEC_TS)
        .unwrap();
    assert!(strict
        .verify(&spec_headers(SPEC_SIG), SPEC_BODY, SPEC_TS + 1)
        .is_err());
}

#[test]
fn legacy_scheme_round_trip() {
    let s = signer(&[SPEC_SECRET, OTHER_SECRET]);
    let sig = s.legacy_signature(SPEC_BODY);
    // Independent computation of the expected value with the raw key.
    let key = STANDARD.decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
    let mut mac = HmacSha256::new_from_slice(&key).unwrap();
    mac.update(SPEC_BODY);
    let expected = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    assert_eq!(sig, expected);

    let mut h = HeaderMap::new();
    h.insert(HEADER_LEGACY_SIGNATURE, sig.parse().unwrap());
    verifier(&[SPEC_SECRET])
        .verify_legacy(&h, SPEC_BODY)
        .unwrap();
    // Rotation on the verifying side: the old secret is still accepted.
    verifier(&[OTHER_SECRET, SPEC_SECRET])
        .verify_legacy(&h, SPEC_BODY)
        .unwrap();
    // Upper-case hex is the same MAC.
    let mut upper = HeaderMap::new();
    upper.insert(
        HEADER_LEGACY_SIGNATURE,
        format!("sha256={}", sig["sha256=".len()..].to_uppercase())
            .parse()
            .unwrap(),
    );
    verifier(&[SPEC_SECRET])
        .verify_legacy(&upper, SPEC_BODY)
        .unwrap();

    let v = verifier(&[SPEC_SECRET]);
    assert_eq!(
        v.verify_legacy(&h, b"tampered").unwrap_err(),
        VerifyError::InvalidSignature
    );
    assert_eq!(
        verifier(&[OTHER_SECRET])
            .verify_legacy(&h, SPEC_BODY)
            .unwrap_err(),
        VerifyError::InvalidSignature
    );
    assert_eq!(
        v.verify_legacy(&HeaderMap::new(), SPEC_BODY).unwrap_err(),
        VerifyError::MissingHeader("x-webhook-signature")
    );
    for bad in ["sha1=00", "sha256=zz", "sha256=", &sig[..sig.len() - 2]] {
        let mut h = HeaderMap::new();
        h.insert(HEADER_LEGACY_SIGNATURE, bad.parse().unwrap());
        assert_eq!(
            v.verify_legacy(&h, SPEC_BODY).unwrap_err(),
            VerifyError::InvalidSignature,
            "{bad}"
        );
    }
}

#[test]
fn headers_per_scheme() {
    let s = signer(&[SPEC_SECRET]);
    let std_h = header_map(
        s.headers(
            SignatureScheme::StandardWebhooks,
            SPEC_ID,
            SPEC_TS,
            SPEC_BODY,
        )
        .unwrap(),
    );
    assert_eq!(std_h[&HEADER_WEBHOOK_ID], SPEC_ID);
    assert_eq!(std_h[&HEADER_WEBHOOK_TIMESTAMP], "1614265330");
    assert_eq!(std_h[&HEADER_WEBHOOK_SIGNATURE], SPEC_SIG);
    assert!(!std_h.contains_key(&HEADER_LEGACY_SIGNATURE));
    verifier(&[SPEC_SECRET])
        .verify(&std_h, SPEC_BODY, SPEC_TS)
        .unwrap();

    let legacy_h = header_map(
        s.headers(
            SignatureScheme::LegacyHmacSha256,
            SPEC_ID,
            SPEC_TS,
            SPEC_BODY,
        )
        .unwrap(),
    );
    assert_eq!(
        legacy_h[&HEADER_LEGACY_SIGNATURE],
        s.legacy_signature(SPEC_BODY).as_str()
    );
    assert!(!legacy_h.contains_key(&HEADER_WEBHOOK_SIGNATURE));
    verifier(&[SPEC_SECRET])
        .verify_legacy(&legacy_h, SPEC_BODY)
        .unwrap();

    assert_eq!(
        s.headers(
            SignatureScheme::StandardWebhooks,
            "bad\nid",
            SPEC_TS,
            SPEC_BODY
        )
        .unwrap_err(),
        SigningError::InvalidMessageId
    );
}

#[test]
fn format_i64_matches_display() {
    let mut buf = [0u8; 20];
    for n in [0, 7, -7, 10, 1614265330, i64::MAX, i64::MIN, -1] {
        assert_eq!(format_i64(n, &mut buf), n.to_string().as_bytes());
    }
}
