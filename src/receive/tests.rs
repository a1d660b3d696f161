//! The test receiver's unit tests: config defaults and checks, seeded failures, and the
//! bounded id memory.

use super::*;

#[test]
fn config_defaults_match_the_cli_contract() {
    let c = ReceiverConfig::default();
    assert!(c.secrets.is_empty());
    assert_eq!(c.tolerance, Duration::from_secs(300));
    assert_eq!(c.fail_status, 500);
    assert_eq!(c.fail_rate, 0.0);
    assert_eq!(c.force_status, None);
    assert_eq!(c.delay, Duration::ZERO);
    assert_eq!(c.remember_ids, 1_000_000);
}

#[tokio::test]
async fn bind_rejects_invalid_settings() {
    let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    for config in [
        ReceiverConfig {
            fail_rate: 1.5,
            ..Default::default()
        },
        ReceiverConfig {
            fail_rate: f64::NAN,
            ..Default::default()
        },
        ReceiverConfig {
            fail_status: 1000,
            ..Default::default()
        },
        ReceiverConfig {
            force_status: Some(42),
            ..Default::default()
        },
    ] {
        let err = Receiver::bind(addr, config).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    }
}

#[test]
fn a_seed_fixes_which_requests_fail_and_the_rate_holds() {
    let verdicts = |seed| {
        let shared = Shared::new(ReceiverConfig {
            fail_rate: 0.2,
            seed,
            ..Default::default()
        })
        .unwrap();
        (0..2_000)
            .map(|_| shared.pick_status() != StatusCode::OK)
            .collect::<Vec<_>>()
    };
    let first = verdicts(Some(7));
    assert_eq!(first, verdicts(Some(7)), "same seed, same failures");
    assert_ne!(first, verdicts(Some(8)), "another seed, other failures");
    let failed = first.iter().filter(|f| **f).count();
    assert!(
        (300..500).contains(&failed),
        "{failed} of 2000 failed at 20%"
    );
}

#[test]
fn recent_ids_stay_under_capacity_and_keep_the_latest_half() {
    let mut ids = RecentIds::new(100);
    for i in 0..1_000u32 {
        assert!(ids.insert(&format!("id_{i}")), "id_{i} is new");
        assert!(ids.len() <= 100, "{} ids held", ids.len());
        for recent in i.saturating_sub(49)..=i {
            assert!(ids.contains(&format!("id_{recent}")), "id_{recent} at {i}");
        }
    }
    assert!(!ids.insert("id_999"), "a remembered id is not new");
    assert!(!ids.contains("id_0"));
}

#[test]
fn pick_status_honours_force_and_rate() {
    let shared = Shared::new(ReceiverConfig::default()).unwrap();
    assert_eq!(shared.pick_status(), StatusCode::OK);
    shared
        .fail_rate_bits
        .store(1.0f64.to_bits(), Ordering::Relaxed);
    shared.fail_status.store(503, Ordering::Relaxed);
    assert_eq!(shared.pick_status(), StatusCode::SERVICE_UNAVAILABLE);
    shared.force_status.store(429, Ordering::Relaxed);
    assert_eq!(shared.pick_status(), StatusCode::TOO_MANY_REQUESTS);
}

#[test]
fn recording_keeps_only_the_latest() {
    let shared = Shared::new(ReceiverConfig {
        max_recorded: 2,
        ..Default::default()
    })
    .unwrap();
    for i in 0..5u16 {
        shared.record(ReceivedRequest {
            path: "/".into(),
            webhook_id: None,
            webhook_timestamp: None,
            callback_mode: None,
            delivery_attempt: None,
            trace_id: None,
            traceparent: None,
            idempotency_key: None,
            event_type: None,
            ordering_key: None,
            sequence: None,
            body: Bytes::new(),
            status: 200 + i,
            duplicate: false,
        });
    }
    let statuses: Vec<u16> = lock(&shared.recorded).iter().map(|r| r.status).collect();
    assert_eq!(statuses, [203, 204]);
}
