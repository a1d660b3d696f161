//! The async path over real sockets and real SQLite files: durable accept, retries, DLQ,
//! replay, idempotency, backpressure, fallback reconciliation, store failures.

use std::time::Duration;

use hookyard::receive::ReceiverConfig;
use serde_json::Value;

use crate::util::{eventually, receiver, receiver_with, upstream, Sidecar};

fn async_rule(target: &str, retry: &str, extra: &str) -> String {
    format!(
        "routing_rules:\n  - event_type: user.updated\n    mode: async\n    target: {target}\n    timeout_ms: 500\n    retry_matrix: {retry}\n{extra}"
    )
}

async fn event(hy: &Sidecar, id: &str) -> Value {
    hy.admin_get(&format!("/v1/events/{id}")).await.json()
}

#[tokio::test]
async fn async_event_is_accepted_then_delivered_signed_with_async_headers() {
    let rx = receiver().await;
    let hy = Sidecar::start(&async_rule(
        &format!("http://{}/u", rx.local_addr()),
        "[20]",
        "",
    ))
    .await;
    let a = hy
        .post("user.updated", r#"{"id":7}"#, &[("x-trace-id", "tr-1")])
        .await;
    assert_eq!(a.status, 202);
    let body = a.json();
    assert_eq!(body["status"], "accepted");
    assert_eq!(body["trace_id"], "tr-1");
    let id = body["event_id"].as_str().unwrap().to_string();
    eventually(Duration::from_secs(5), "delivery", async || {
        rx.stats().delivered_ok == 1
    })
    .await;
    let got = &rx.requests()[0];
    assert_eq!(got.webhook_id.as_deref(), Some(id.as_str()));
    assert_eq!(got.callback_mode.as_deref(), Some("async"));
    assert_eq!(got.delivery_attempt.as_deref(), Some("1"));
    assert_eq!(
        got.idempotency_key.as_deref(),
        Some(id.as_str()),
        "event id stands in for a missing key"
    );
    assert_eq!(&got.body[..], br#"{"id":7}"#);
    assert_eq!(rx.stats().invalid_signature, 0);
    eventually(Duration::from_secs(2), "history", async || {
        event(&hy, &id).await["state"] == "delivered"
    })
    .await;
    let history = event(&hy, &id).await;
    assert_eq!(history["attempts"].as_array().unwrap().len(), 1);
    assert_eq!(history["attempts"][0]["status"], 200);
}

#[tokio::test]
async fn thousand_events_with_twenty_percent_5xx_are_all_delivered_once() {
    let rx = receiver_with(ReceiverConfig {
        fail_rate: 0.2,
        fail_status: 503,
        ..Default::default()
    })
    .await;
    // Ten retries: the chance that one event fails all eleven attempts is 0.2^11, about 2e-8.
    // Five 503s in a row happen by chance at this rate and open the breaker: keep recovery short.
    let hy = Sidecar::start(&format!(
        "queues:\n  default: {{ concurrency: 32 }}\nhosts:\n  default:\n    circuit_breaker: {{ consecutive_failures: 5, recovery_ms: 100 }}\n{}",
        async_rule(
            &format!("http://{}/u", rx.local_addr()),
            "[10, 10, 20, 20, 40, 40, 80, 80, 80, 80]",
            ""
        )
        // A deadline no loaded machine blows: a delivery that times out after the receiver
        // answered 2xx is an honest at-least-once duplicate, not what this test looks for.
        .replace("timeout_ms: 500", "timeout_ms: 10000")
    ))
    .await;
    let posts = (0..1000).map(|i| hy.post("user.updated", format!(r#"{{"n":{i}}}"#), &[]));
    let answers = futures::future::join_all(posts).await;
    assert!(answers.iter().all(|a| a.status == 202));
    eventually(Duration::from_secs(30), "all 1000 delivered", async || {
        rx.stats().unique_ids == 1000
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stats = rx.stats();
    assert_eq!(stats.duplicates_after_success, 0, "{stats:?}");
    assert_eq!(stats.invalid_signature, 0);
    assert!(
        stats.failed_injected > 100,
        "failures were injected: {stats:?}"
    );
    let dlq = hy.admin_get("/v1/dlq").await.json();
    assert_eq!(dlq["items"].as_array().unwrap().len(), 0);
}

#[tokio::test]
async fn retry_delays_follow_the_matrix_to_the_millisecond() {
    let rx = receiver_with(ReceiverConfig {
        force_status: Some(500),
        ..Default::default()
    })
    .await;
    let hy = Sidecar::start(&format!(
        "queues:\n  default: {{ jitter: 0.0 }}\nhosts:\n  default:\n    circuit_breaker: {{ consecutive_failures: 100 }}\n{}",
        async_rule(&format!("http://{}/u", rx.local_addr()), "[100, 250]", "")
    ))
    .await;
    let id = hy.post("user.updated", "{}", &[]).await.event_id();
    eventually(Duration::from_secs(5), "dead letter", async || {
        event(&hy, &id).await["state"] == "dead_lettered"
    })
    .await;
    let history = event(&hy, &id).await;
    let attempts = history["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 3, "attempts = 1 + len(retry_matrix)");
    assert_eq!(history["dead_letter_reason"], "exhausted");
    let started: Vec<i64> = attempts
        .iter()
        .map(|a| a["started_at_ms"].as_i64().unwrap())
        .collect();
    let gap1 = started[1] - started[0];
    let gap2 = started[2] - started[1];
    assert!((100..250).contains(&gap1), "first retry after {gap1} ms");
    assert!((250..400).contains(&gap2), "second retry after {gap2} ms");
}

#[tokio::test]
async fn permanent_400_dead_letters_after_one_attempt_and_replay_delivers_it() {
    let rx = receiver_with(ReceiverConfig {
        force_status: Some(400),
        ..Default::default()
    })
    .await;
    let hy = Sidecar::start(&async_rule(
        &format!("http://{}/u", rx.local_addr()),
        "[10, 10, 10]",
        "",
    ))
    .await;
    let id = hy.post("user.updated", "{}", &[]).await.event_id();
    eventually(Duration::from_secs(5), "dead letter", async || {
        event(&hy, &id).await["state"] == "dead_lettered"
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(rx.stats().received, 1, "a permanent 4xx is attempted once");
    let dlq = hy.admin_get("/v1/dlq?event_type=user.updated").await.json();
    assert_eq!(dlq["items"][0]["id"], id.as_str());
    assert_eq!(dlq["items"][0]["reason"], "permanent_4xx");
    assert_eq!(dlq["items"][0]["last_status"], 400);

    rx.set_status(None);
    let replay = hy.admin_post(&format!("/v1/dlq/{id}/replay"), "").await;
    assert_eq!(replay.status, 200);
    eventually(Duration::from_secs(5), "replayed delivery", async || {
        rx.stats().delivered_ok == 1
    })
    .await;
    let last = rx.requests().last().unwrap().clone();
    assert_eq!(
        last.webhook_id.as_deref(),
        Some(id.as_str()),
        "replay keeps the event id"
    );
    assert_eq!(
        last.delivery_attempt.as_deref(),
        Some("1"),
        "replay starts a fresh attempt count"
    );
    let again = hy.admin_post(&format!("/v1/dlq/{id}/replay"), "").await;
    assert_eq!(again.status, 404, "no longer dead-lettered");
}

#[tokio::test]
async fn bulk_replay_needs_a_filter_or_all() {
    let rx = receiver_with(ReceiverConfig {
        force_status: Some(404),
        ..Default::default()
    })
    .await;
    let hy = Sidecar::start(&async_rule(
        &format!("http://{}/u", rx.local_addr()),
        "[10]",
        "",
    ))
    .await;
    for _ in 0..3 {
        hy.post("user.updated", "{}", &[]).await;
    }
    eventually(Duration::from_secs(5), "three dead letters", async || {
        hy.admin_get("/v1/dlq").await.json()["items"]
            .as_array()
            .unwrap()
            .len()
            == 3
    })
    .await;
    assert_eq!(hy.admin_post("/v1/dlq/replay", "{}").await.status, 400);
    assert_eq!(
        hy.admin_post("/v1/dlq/replay", "not json").await.status,
        400
    );
    rx.set_status(None);
    let job = hy.replay_job("", r#"{"event_type":"user.updated"}"#).await;
    assert_eq!(job["state"], "done");
    assert_eq!(job["progress"]["replayed"], 3);
    eventually(Duration::from_secs(5), "replayed deliveries", async || {
        rx.stats().delivered_ok == 3
    })
    .await;
}

#[tokio::test]
async fn repeated_idempotency_key_returns_the_first_event_and_enqueues_nothing() {
    let rx = receiver().await;
    let hy = Sidecar::start(&async_rule(
        &format!("http://{}/u", rx.local_addr()),
        "[10]",
        "",
    ))
    .await;
    let first = hy
        .post("user.updated", "{}", &[("idempotency-key", "k-1")])
        .await
        .json();
    let second = hy
        .post("user.updated", "{}", &[("idempotency-key", "k-1")])
        .await
        .json();
    assert_eq!(second["event_id"], first["event_id"]);
    assert_eq!(second["duplicate"], true);
    assert!(first.get("duplicate").is_none());
    eventually(Duration::from_secs(5), "delivery", async || {
        rx.stats().delivered_ok == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(rx.stats().received, 1);
    assert_eq!(rx.requests()[0].idempotency_key.as_deref(), Some("k-1"));
}

#[tokio::test]
async fn a_full_queue_answers_429_with_retry_after_and_drops_nothing() {
    let down = upstream::closed_port();
    let hy = Sidecar::start(&format!(
        "queues:\n  default: {{ max_depth: 3 }}\n{}",
        async_rule(&format!("http://{down}/u"), "[60000]", "")
    ))
    .await;
    for _ in 0..3 {
        assert_eq!(hy.post("user.updated", "{}", &[]).await.status, 202);
    }
    let full = hy.post("user.updated", "{}", &[]).await;
    assert_eq!(full.status, 429);
    assert!(full.header("retry-after").is_some());
    assert_eq!(full.json()["error"], "queue_full");
}

#[tokio::test]
async fn a_full_store_answers_503_with_a_reason_never_202() {
    let down = upstream::closed_port();
    let mut hy = Sidecar::start(
        &format!(
            "store_cap_placeholder\n{}",
            async_rule(&format!("http://{down}/u"), "[60000]", "")
        )
        .replace("store_cap_placeholder\n", ""),
    )
    .await;
    hy.stop().await;
    // Restart the same directory with a 1 MiB cap on the database file.
    let dir = std::mem::replace(&mut hy.dir, tempfile::tempdir().unwrap());
    let config = crate::util::config_yaml(
        dir.path(),
        &async_rule(&format!("http://{down}/u"), "[60000]", ""),
    )
    .replace("  kind: sqlite\n", "  kind: sqlite\n  max_size_mb: 1\n");
    let path = dir.path().join("capped.yaml");
    std::fs::write(&path, config).unwrap();
    let server = hookyard::server::start(path.clone(), hookyard::config::load(&path).unwrap())
        .await
        .unwrap();
    let url = format!("http://{}/v1/events/user.updated", server.ingress_addr);
    let client = crate::util::http_client();
    let body = vec![b'x'; 64 * 1024];
    let mut accepted = Vec::new();
    let mut refused = None;
    for _ in 0..64 {
        let a = crate::util::send(&client, "POST", &url, &[], body.clone()).await;
        match a.status {
            202 => accepted.push(a.event_id()),
            503 => {
                refused = Some(a);
                break;
            }
            other => panic!("unexpected status {other}"),
        }
    }
    let refused = refused.expect("the store filled up");
    assert_eq!(refused.json()["error"], "store_unavailable");
    assert!(refused.json()["reason"].as_str().unwrap().len() > 5);
    // Every 202 before it is stored.
    let admin = format!("http://{}", server.admin_addr);
    for id in &accepted {
        let e =
            crate::util::send(&client, "GET", &format!("{admin}/v1/events/{id}"), &[], "").await;
        assert_eq!(e.status, 200, "accepted event {id} is stored");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn sync_failure_falls_back_with_trace_id_and_reconciles_when_delivered() {
    let rx = receiver_with(ReceiverConfig {
        force_status: Some(503),
        ..Default::default()
    })
    .await;
    let hy = Sidecar::start(&format!(
        "routing_rules:\n  - event_type: pay.authorize\n    mode: sync\n    target: http://{}/p\n    timeout_ms: 300\n    fallback: async_dlq\n    retry_matrix: [50, 50, 50, 50, 50, 50, 50, 50]\n",
        rx.local_addr()
    ))
    .await;
    let a = hy
        .post("pay.authorize", "{}", &[("x-trace-id", "fallback-trace-1")])
        .await;
    assert_eq!(a.status, 202);
    let body = a.json();
    assert_eq!(body["status"], "queued");
    assert_eq!(body["fallback"], "sync_to_async");
    assert_eq!(body["reason"], "upstream_5xx");
    assert_eq!(body["trace_id"], "fallback-trace-1");
    let id = body["event_id"].as_str().unwrap().to_string();

    let fallbacks = hy.admin_get("/v1/fallbacks").await.json();
    let record = &fallbacks["items"][0];
    assert_eq!(record["event_id"], id.as_str());
    assert_eq!(record["trace_id"], "fallback-trace-1");
    assert_eq!(record["reason"], "upstream_5xx");
    assert_eq!(record["state"], "pending");

    rx.set_status(None);
    eventually(Duration::from_secs(5), "reconciled", async || {
        hy.admin_get("/v1/fallbacks").await.json()["items"][0]["state"] == "delivered"
    })
    .await;
    let delivered = rx.requests().into_iter().find(|r| r.status == 200).unwrap();
    assert_eq!(
        delivered.webhook_id.as_deref(),
        Some(id.as_str()),
        "same event id as the sync attempt"
    );
    assert_eq!(delivered.trace_id.as_deref(), Some("fallback-trace-1"));
    assert_eq!(delivered.callback_mode.as_deref(), Some("async"));
    let metrics = hy.metrics().await;
    assert!(
        metrics.contains("hookyard_fallback_total{reason=\"upstream_5xx\"}"),
        "{metrics}"
    );
}

#[tokio::test]
async fn stall_timeout_and_refused_connection_fall_back_with_their_reason() {
    let (stall, _) = upstream::stalling().await;
    let down = upstream::closed_port();
    let hy = Sidecar::start(&format!(
        "routing_rules:\n  - event_type: a.stall\n    mode: sync\n    target: http://{stall}/\n    timeout_ms: 150\n    fallback: async_dlq\n    retry_matrix: [60000]\n  - event_type: a.down\n    mode: sync\n    target: http://{down}/\n    timeout_ms: 150\n    fallback: async_dlq\n    retry_matrix: [60000]\n"
    ))
    .await;
    let s = hy.post("a.stall", "{}", &[]).await;
    assert_eq!(
        (s.status, s.json()["reason"].clone()),
        (202, "timeout".into())
    );
    let d = hy.post("a.down", "{}", &[]).await;
    assert_eq!(
        (d.status, d.json()["reason"].clone()),
        (202, "connect".into())
    );
}

#[tokio::test]
async fn an_open_breaker_delays_async_attempts_without_dropping_them() {
    let rx = receiver_with(ReceiverConfig {
        force_status: Some(500),
        ..Default::default()
    })
    .await;
    let hy = Sidecar::start(&format!(
        "hosts:\n  default:\n    circuit_breaker: {{ consecutive_failures: 2, recovery_ms: 300 }}\n{}",
        async_rule(&format!("http://{}/u", rx.local_addr()), "[10, 10, 10]", "")
    ))
    .await;
    let id = hy.post("user.updated", "{}", &[]).await.event_id();
    // Two failures open the breaker; the third attempt waits for recovery instead of being spent.
    eventually(Duration::from_secs(3), "breaker open", async || {
        rx.stats().received == 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        rx.stats().received,
        2,
        "no attempt while the breaker is open"
    );
    rx.set_status(None);
    eventually(
        Duration::from_secs(3),
        "delivered after recovery",
        async || rx.stats().delivered_ok == 1,
    )
    .await;
    eventually(
        Duration::from_secs(3),
        "recorded as delivered",
        async || event(&hy, &id).await["state"] == "delivered",
    )
    .await;
    let history = event(&hy, &id).await;
    assert_eq!(history["attempts"].as_array().unwrap().len(), 3);
}

#[tokio::test]
async fn gone_410_dead_letters_and_disables_the_target_until_enabled() {
    let rx = receiver_with(ReceiverConfig {
        force_status: Some(410),
        ..Default::default()
    })
    .await;
    let hy = Sidecar::start(&async_rule(
        &format!("http://{}/u", rx.local_addr()),
        "[10]",
        "",
    ))
    .await;
    let first = hy.post("user.updated", "{}", &[]).await.event_id();
    eventually(Duration::from_secs(3), "gone", async || {
        event(&hy, &first).await["dead_letter_reason"] == "gone"
    })
    .await;
    let second = hy.post("user.updated", "{}", &[]).await.event_id();
    eventually(Duration::from_secs(3), "disabled", async || {
        event(&hy, &second).await["dead_letter_reason"] == "target_disabled"
    })
    .await;
    assert_eq!(rx.stats().received, 1, "a disabled target gets nothing");
    let circuits = hy.admin_get("/v1/circuits").await.json();
    assert_eq!(circuits["disabled_targets"].as_array().unwrap().len(), 1);
    rx.set_status(None);
    assert_eq!(hy.admin_post("/v1/targets/enable", "").await.status, 200);
    assert_eq!(
        hy.replay_job("", r#"{"all":true}"#).await["progress"]["replayed"],
        2
    );
    eventually(
        Duration::from_secs(3),
        "delivered after enable",
        async || rx.stats().delivered_ok == 2,
    )
    .await;
}

/// Upgrading hookyard over a schema-1 database that still holds queued events: the store is
/// migrated at start and every queued event is delivered, once, with its original body, and
/// its history (including attempts made before the upgrade) stays visible.
#[tokio::test]
async fn queued_events_of_a_schema_1_database_are_delivered_after_upgrade() {
    use crate::sqlite_v1::{create, insert, insert_attempt, V1Event};
    let rx = receiver().await;
    let target = format!("http://{}/u", rx.local_addr());
    let dir = tempfile::tempdir().unwrap();
    let now = hookyard::clock::now_ms();
    let conn = create(&dir.path().join("hookyard.db"));
    let bodies: Vec<String> = (0..50).map(|i| format!(r#"{{"n":{i}}}"#)).collect();
    for (i, body) in bodies.iter().enumerate() {
        let id = format!("evt_v1_{i:02}");
        insert(
            &conn,
            &V1Event {
                id: &id,
                event_type: "user.updated",
                queue: "default",
                target: &target,
                body: body.as_bytes(),
                state: 0,
                due_at: Some(now - 1000),
                lease_token: None,
                attempts_made: i64::from(i == 0),
                received_at: now - 2000,
                delivered_at: None,
                dead_lettered_at: None,
                dead_letter_reason: None,
            },
        );
    }
    insert_attempt(&conn, "evt_v1_00", 1, now - 1500, Some(503));
    drop(conn);

    let hy = Sidecar::start_in(dir, &async_rule(&target, "[20]", "")).await;
    eventually(
        Duration::from_secs(10),
        "all v1 events delivered",
        async || rx.stats().delivered_ok == 50,
    )
    .await;
    let stats = rx.stats();
    assert_eq!((stats.unique_ids, stats.invalid_signature), (50, 0));
    let mut got: Vec<Vec<u8>> = rx.requests().iter().map(|r| r.body.to_vec()).collect();
    got.sort();
    let mut want: Vec<Vec<u8>> = bodies.iter().map(|b| b.as_bytes().to_vec()).collect();
    want.sort();
    assert_eq!(got, want);
    eventually(Duration::from_secs(2), "history", async || {
        event(&hy, "evt_v1_00").await["state"] == "delivered"
    })
    .await;
    let history = event(&hy, "evt_v1_00").await;
    let attempts = history["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{history}");
    assert_eq!(attempts[0]["status"], 503);
    assert_eq!(attempts[1]["status"], 200);
    assert_eq!(attempts[1]["attempt"], 2);
}

/// A target that answers 2xx has taken the event, whatever it sends back: a body past the
/// response cap (4 MiB) is discarded unread, not taken for a failure and retried into the DLQ.
#[tokio::test]
async fn an_async_2xx_with_a_body_over_the_response_cap_is_delivered_once() {
    let (target, requests) = upstream::answering("HTTP/1.1 200 OK", 5 * 1024 * 1024).await;
    let hy = Sidecar::start(&async_rule(&format!("http://{target}/u"), "[20, 20]", "")).await;
    let id = hy.post("user.updated", "{}", &[]).await.event_id();
    eventually(Duration::from_secs(10), "delivered", async || {
        event(&hy, &id).await["state"] == "delivered"
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let history = event(&hy, &id).await;
    assert_eq!(
        history["attempts"].as_array().unwrap().len(),
        1,
        "{history}"
    );
    assert_eq!(history["attempts"][0]["status"], 200);
    assert_eq!(requests.load(std::sync::atomic::Ordering::SeqCst), 1);
}

/// Redirects are not followed for webhooks (the signature and the target are the rule's): a
/// 3xx dead-letters at once with its own reason and metric class, not as a client error.
#[tokio::test]
async fn an_async_3xx_dead_letters_at_once_as_redirect() {
    let (target, requests) = upstream::answering(
        "HTTP/1.1 301 Moved Permanently\r\nlocation: http://127.0.0.1:9/",
        0,
    )
    .await;
    let hy = Sidecar::start(&async_rule(&format!("http://{target}/u"), "[20, 20]", "")).await;
    let id = hy.post("user.updated", "{}", &[]).await.event_id();
    eventually(Duration::from_secs(10), "dead-lettered", async || {
        event(&hy, &id).await["state"] == "dead_lettered"
    })
    .await;
    let history = event(&hy, &id).await;
    assert_eq!(history["dead_letter_reason"], "redirect", "{history}");
    assert_eq!(history["attempts"].as_array().unwrap().len(), 1);
    assert_eq!(history["attempts"][0]["status"], 301);
    assert_eq!(requests.load(std::sync::atomic::Ordering::SeqCst), 1);
    let metrics = hy.metrics().await;
    let series = format!(
        "hookyard_delivery_attempts_total{{host=\"{target}\",mode=\"async\",class=\"redirect\"}}"
    );
    assert_eq!(
        crate::util::metric_value(&metrics, &series),
        Some(1.0),
        "{series} in\n{metrics}"
    );
}
