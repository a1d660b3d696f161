//! Ordering keys over real sockets: one event per key in flight, in accept order, whatever
//! fails; other keys and unkeyed events never wait for a failing key.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hookyard::receive::{ReceivedRequest, ReceiverConfig};

use crate::util::{eventually, receiver, receiver_with, Sidecar, SECRET};

/// Checks what a receiver saw, per `X-Ordering-Key`: every request carries the key's next
/// undelivered sequence (the head again after a failure, the next only after a 2xx), so no
/// event overtook an earlier one of its key and none was sent while another was unanswered.
/// Returns how many events each key had delivered.
pub fn assert_each_key_in_accept_order(requests: &[ReceivedRequest]) -> BTreeMap<String, u64> {
    let mut delivered: BTreeMap<String, u64> = BTreeMap::new();
    for r in requests {
        let Some(key) = &r.ordering_key else {
            continue;
        };
        let sequence: u64 = r
            .sequence
            .as_deref()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("a keyed delivery without X-Sequence: {r:?}"));
        let done = delivered.entry(key.clone()).or_default();
        assert_eq!(
            sequence,
            *done + 1,
            "key {key}: sequence {sequence} arrived after {done} were delivered"
        );
        if (200..300).contains(&r.status) {
            *done = sequence;
        }
    }
    delivered
}

fn keyed_rule(target: &str, retry: &str) -> String {
    format!(
        "queues:\n  default: {{ concurrency: 64 }}\nrouting_rules:\n  - event_type: \"order.*\"\n    mode: async\n    target: {target}\n    retry_matrix: {retry}\n    ordering_key: header:X-Customer-Id\n"
    )
}

/// Seed 001's consumer check: 30% random 5xx with short retries, three keys interleaved and
/// 64 workers: each key's deliveries arrive strictly in accept order, numbered 1, 2, 3…
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_interleaved_keys_arrive_in_accept_order_through_30_percent_failures() {
    let rx = receiver_with(ReceiverConfig {
        fail_rate: 0.3,
        fail_status: 503,
        seed: Some(3),
        ..Default::default()
    })
    .await;
    let hy = Sidecar::start(&keyed_rule(
        &format!("http://{}/orders", rx.local_addr()),
        "[5, 5, 10, 10, 20, 20, 40, 40, 80, 80, 80, 80]",
    ))
    .await;
    // One at a time, so accept order is the order sent.
    for n in 0..60 {
        let key = ["alice", "bob", "carol"][n % 3];
        let answer = hy
            .post(
                "order.updated",
                format!(r#"{{"n":{n}}}"#),
                &[("x-customer-id", key)],
            )
            .await;
        assert_eq!(answer.status, 202, "{:?}", answer.json());
    }
    eventually(Duration::from_secs(20), "60 delivered", async || {
        rx.stats().unique_ids == 60
    })
    .await;
    let requests = rx.requests();
    let delivered = assert_each_key_in_accept_order(&requests);
    assert_eq!(
        delivered.into_iter().collect::<Vec<_>>(),
        [
            ("alice".into(), 20),
            ("bob".into(), 20),
            ("carol".into(), 20)
        ]
    );
    // The n-th event of a key is the n-th sent with that key.
    for r in requests.iter().filter(|r| r.status == 200) {
        let n: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        let sequence: u64 = r.sequence.as_deref().unwrap().parse().unwrap();
        assert_eq!(n["n"].as_u64().unwrap() / 3 + 1, sequence, "{r:?}");
    }
    let stats = rx.stats();
    assert!(stats.failed_injected > 10, "failures injected: {stats:?}");
    assert_eq!(stats.duplicates_after_success, 0, "{stats:?}");
}

/// A key whose first event keeps failing holds back that key's later events only: another
/// key and an unkeyed event are delivered while it retries; when it is dead-lettered the next
/// event of its key goes, and the dead letter names the key and sequence it held.
#[tokio::test]
async fn a_failing_head_holds_back_its_key_only_until_it_is_dead_lettered() {
    let failing = receiver_with(ReceiverConfig {
        force_status: Some(500),
        ..Default::default()
    })
    .await;
    let healthy = receiver().await;
    let hy = Sidecar::start(&format!(
        "routing_rules:\n  - event_type: bad\n    mode: async\n    target: http://{}/bad\n    retry_matrix: [700, 700]\n    ordering_key: json:/customer\n  - event_type: good\n    mode: async\n    target: http://{}/good\n    retry_matrix: [50]\n    ordering_key: json:/customer\n  - event_type: plain\n    mode: async\n    target: http://{}/plain\n",
        failing.local_addr(),
        healthy.local_addr(),
        healthy.local_addr()
    ))
    .await;
    let started = Instant::now();
    let head = hy.post("bad", r#"{"customer":"k1"}"#, &[]).await.event_id();
    let held = hy
        .post("good", r#"{"customer":"k1"}"#, &[])
        .await
        .event_id();
    hy.post("good", r#"{"customer":"k2"}"#, &[])
        .await
        .event_id();
    hy.post("plain", r#"{"customer":"k1"}"#, &[])
        .await
        .event_id();
    eventually(
        Duration::from_secs(2),
        "k2 and the unkeyed event",
        async || healthy.stats().unique_ids == 2,
    )
    .await;
    // Delivered while the head is still retrying (its schedule takes 1.4 s; the slack is for a
    // loaded machine).
    assert!(started.elapsed() < Duration::from_millis(1200));
    let record = hy.admin_get(&format!("/v1/events/{held}")).await.json();
    assert_eq!(record["state"], "held", "{record}");
    assert_eq!(record["ordering"]["key"], "k1");
    assert_eq!(record["ordering"]["sequence"], 2);
    let seen = healthy.requests();
    assert_eq!(seen[0].ordering_key.as_deref(), Some("k2"));
    assert_eq!(seen[0].sequence.as_deref(), Some("1"));
    assert_eq!(seen[1].ordering_key, None, "an unkeyed rule sends no key");

    eventually(Duration::from_secs(5), "the held event", async || {
        healthy.stats().unique_ids == 3
    })
    .await;
    let after = hy.admin_get(&format!("/v1/events/{head}")).await.json();
    assert_eq!(after["state"], "dead_lettered");
    assert_eq!(failing.stats().received, 3, "the head got all its attempts");
    let last = healthy.requests().pop().unwrap();
    assert_eq!(last.ordering_key.as_deref(), Some("k1"));
    assert_eq!(last.sequence.as_deref(), Some("2"));
    let dlq = hy.admin_get("/v1/dlq").await.json();
    assert_eq!(dlq["items"][0]["id"], head.as_str());
    assert_eq!(dlq["items"][0]["ordering"]["key"], "k1");
    assert_eq!(dlq["items"][0]["ordering"]["sequence"], 1);

    // Replayed, the dead letter keeps its sequence.
    failing.set_status(None);
    let replay = hy.admin_post(&format!("/v1/dlq/{head}/replay"), "").await;
    assert_eq!(replay.status, 200, "{:?}", replay.json());
    eventually(Duration::from_secs(2), "the replayed head", async || {
        failing.stats().delivered_ok == 1
    })
    .await;
    let replayed = failing.requests().pop().unwrap();
    assert_eq!(replayed.sequence.as_deref(), Some("1"));
    assert_eq!(replayed.delivery_attempt.as_deref(), Some("1"));
}

/// An event without the key its rule orders by is refused with 400 and stored nowhere.
#[tokio::test]
async fn an_event_without_its_ordering_key_is_refused() {
    let rx = receiver().await;
    let hy = Sidecar::start(&format!(
        "routing_rules:\n  - event_type: h\n    mode: async\n    target: http://{0}/h\n    ordering_key: header:X-Customer-Id\n  - event_type: j\n    mode: async\n    target: http://{0}/j\n    ordering_key: json:/customer/id\n",
        rx.local_addr()
    ))
    .await;
    let long = "k".repeat(257);
    for (event_type, body, headers, says) in [
        (
            "h",
            "{}",
            vec![],
            "header:x-customer-id, and this event has none",
        ),
        (
            "h",
            "{}",
            vec![("x-customer-id", long.as_str())],
            "1 to 256 printable ASCII",
        ),
        (
            "j",
            r#"{"customer":{}}"#,
            vec![],
            "json:/customer/id, and this event has none",
        ),
        (
            "j",
            r#"{"customer":{"id":[1]}}"#,
            vec![],
            "a string or an integer",
        ),
        ("j", "not json", vec![], "the body is not JSON"),
    ] {
        let answer = hy.post(event_type, body, &headers).await;
        assert_eq!(answer.status, 400, "{body}");
        let json = answer.json();
        assert_eq!(json["error"], "invalid_ordering_key", "{json}");
        assert!(
            json["reason"].as_str().unwrap().contains(says),
            "{json} should say {says}"
        );
    }
    assert_eq!(
        hy.post("j", r#"{"customer":{"id":7}}"#, &[]).await.status,
        202
    );
    eventually(Duration::from_secs(2), "the keyed event", async || {
        rx.stats().unique_ids == 1
    })
    .await;
    assert_eq!(rx.stats().received, 1, "nothing refused was delivered");
    assert_eq!(rx.requests()[0].ordering_key.as_deref(), Some("7"));
    assert!(hy.metrics().await.contains(
        r#"hookyard_events_received_total{event_type="h",mode="async",outcome="rejected"} 2"#
    ));
}

/// `hookyard check` refuses an ordering key on a sync rule and a malformed one, at its line.
#[test]
fn check_refuses_misplaced_and_malformed_ordering_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cfg.yaml");
    let rule = |mode: &str, key: &str| {
        format!(
            "signing:\n  secrets: [\"{SECRET}\"]\nrouting_rules:\n  - event_type: a\n    mode: {mode}\n    timeout_ms: 100\n    target: http://127.0.0.1:9/a\n    ordering_key: {key}\n"
        )
    };
    for (yaml, says) in [
        (
            rule("sync", "header:X-Key"),
            "ordering_key applies to async rules only",
        ),
        (rule("async", "X-Key"), "header:<Name> or json:<pointer>"),
        (
            rule("async", "\"header:bad name\""),
            "not a valid header name",
        ),
        (rule("async", "json:customer"), "starts with '/'"),
    ] {
        let err = hookyard::config::load_from_bytes(&path, yaml.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(err.contains(says) && err.contains(":8:"), "{err}");
    }
    let ok =
        hookyard::config::load_from_bytes(&path, rule("async", "json:/a/b").as_bytes()).unwrap();
    assert_eq!(
        ok.rules
            .route("a")
            .unwrap()
            .ordering_key
            .as_ref()
            .unwrap()
            .to_string(),
        "json:/a/b"
    );
}
