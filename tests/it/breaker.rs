//! The circuit breaker over real sockets: the failure-rate default against random failures,
//! its thresholds, half-open probes, and what an open breaker does to the queue.

use std::time::{Duration, Instant};

use hookyard::receive::ReceiverConfig;
use http::StatusCode;
use serde_json::Value;

use crate::util::*;

/// An async rule for `user.updated` to `target` with `retry` as its matrix.
fn rule(target: &str, retry: &str) -> String {
    format!(
        "routing_rules:\n  - event_type: user.updated\n    mode: async\n    target: {target}\n    timeout_ms: 5000\n    retry_matrix: {retry}\n"
    )
}

async fn circuit(hy: &Sidecar) -> Value {
    let all = hy.admin_get("/v1/circuits").await.json();
    all["hosts"][0]["breaker"].clone()
}

fn opened(metrics: &str, host: &str) -> f64 {
    metric_value(
        metrics,
        &format!("hookyard_circuit_transitions_total{{host=\"{host}\",to=\"open\"}}"),
    )
    .unwrap_or_else(|| panic!("no open-transition series for {host} in:\n{metrics}"))
}

async fn post_many(hy: &Sidecar, n: usize) {
    let posts = (0..n).map(|i| hy.post("user.updated", format!(r#"{{"n":{i}}}"#), &[]));
    let answers = futures::future::join_all(posts).await;
    assert!(answers.iter().all(|a| a.status == 202));
}

/// Seed 000's problem: 20% random 5xx with 64 deliveries in flight used to line up five
/// failures in a row and cut the host off again and again. The default failure-rate breaker
/// never opens, and every event is delivered within seconds, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_percent_random_5xx_at_high_concurrency_never_opens_the_default_breaker() {
    let rx = receiver_with(ReceiverConfig {
        fail_rate: 0.2,
        fail_status: 503,
        // A seed keeps an honest 50% streak out of the first calls (about 1 unseeded run in
        // 300 has one, and rightly opens the breaker): with this one at most 9 of the first 84
        // requests fail, 253 of the first 1250, so no reordering of 64 workers reaches 50%.
        seed: Some(121),
        ..Default::default()
    })
    .await;
    let host = rx.local_addr().to_string();
    // No circuit_breaker section: the shipped default policy.
    let hy = Sidecar::start(&format!(
        "queues:\n  default: {{ concurrency: 64 }}\n{}",
        rule(
            &format!("http://{host}/u"),
            "[10, 10, 20, 20, 40, 40, 80, 80, 80, 80]"
        )
    ))
    .await;
    let started = Instant::now();
    post_many(&hy, 1000).await;
    eventually(Duration::from_secs(20), "all 1000 delivered", async || {
        rx.stats().unique_ids == 1000
    })
    .await;
    let took = started.elapsed();
    let stats = rx.stats();
    assert_eq!(stats.duplicates_after_success, 0, "{stats:?}");
    assert!(stats.failed_injected > 100, "failures injected: {stats:?}");
    assert_eq!(
        opened(&hy.metrics().await, &host),
        0.0,
        "the breaker never opened"
    );
    let b = circuit(&hy).await;
    assert_eq!(b["policy"], "failure_rate");
    assert_eq!(b["state"], "closed");
    assert!(b["calls"].as_u64().unwrap() >= 1000, "{b}");
    let rate = b["rate"].as_f64().unwrap();
    assert!(
        (0.1..0.3).contains(&rate),
        "window shows the ~20% rate: {b}"
    );
    assert!(took < Duration::from_secs(15), "took {took:?}");
}

/// A host failing every call is cut off within one window: once `min_calls` calls finished,
/// the rest of the queue waits instead of hammering it.
#[tokio::test]
async fn all_failures_open_the_default_breaker_within_one_window() {
    let rx = receiver_with(ReceiverConfig {
        force_status: Some(500),
        ..Default::default()
    })
    .await;
    let host = rx.local_addr().to_string();
    let hy = Sidecar::start(&format!(
        "queues:\n  default: {{ concurrency: 8 }}\n{}",
        rule(&format!("http://{host}/u"), "[10, 10, 10, 10, 10]")
    ))
    .await;
    let started = Instant::now();
    post_many(&hy, 200).await;
    eventually(Duration::from_secs(10), "breaker open", async || {
        circuit(&hy).await["state"] == "open"
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "within one window"
    );
    let at_open = rx.stats().received;
    // min_calls (20) finished, plus what was in flight when it opened.
    assert!(
        (20..=20 + 8).contains(&at_open),
        "{at_open} calls before opening"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        rx.stats().received <= at_open + 8,
        "no new calls while open"
    );
    let b = circuit(&hy).await;
    assert_eq!(b["rate"], 1.0);
    assert!(b["next_probe_at_ms"].as_i64().is_some(), "{b}");
    assert_eq!(opened(&hy.metrics().await, &host), 1.0);
    assert_eq!(
        metric_value(
            &hy.metrics().await,
            &format!("hookyard_circuit_state{{host=\"{host}\"}}")
        ),
        Some(1.0)
    );
}

/// Fewer calls than `min_calls` in the window give no verdict, however many of them failed.
#[tokio::test]
async fn min_calls_holds_the_breaker_closed_below_the_volume() {
    let rx = receiver_with(ReceiverConfig {
        force_status: Some(500),
        ..Default::default()
    })
    .await;
    // One attempt each now, the retry far away: 19 calls, all failed, in one window.
    let hy = Sidecar::start(&rule(&format!("http://{}/u", rx.local_addr()), "[60000]")).await;
    post_many(&hy, 19).await;
    eventually(Duration::from_secs(5), "19 attempts", async || {
        rx.stats().received == 19
    })
    .await;
    let b = circuit(&hy).await;
    assert_eq!(
        (b["state"].clone(), b["failures"].clone()),
        ("closed".into(), 19.into())
    );
}

/// Half-open lets exactly `half_open_probes` calls through; a failed probe re-opens; when the
/// probes succeed the breaker closes and every event it deferred is due at once, not at the
/// deferred time (one more recovery period away).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_admits_exactly_the_probes_and_closing_makes_deferred_events_due_at_once() {
    let rx = receiver_with(ReceiverConfig {
        force_status: Some(500),
        ..Default::default()
    })
    .await;
    let hy = Sidecar::start(&format!(
        "queues:\n  default: {{ concurrency: 16 }}\nhosts:\n  default:\n    circuit_breaker: {{ min_calls: 4, recovery_ms: 1500, half_open_probes: 2 }}\n{}",
        rule(&format!("http://{}/u", rx.local_addr()), "[10, 10, 10, 10, 10, 10, 10, 10, 10, 10]")
    ))
    .await;
    post_many(&hy, 40).await;
    eventually(Duration::from_secs(5), "open", async || {
        circuit(&hy).await["state"] == "open"
    })
    .await;
    // Deliveries in flight when it opened land; then nothing until the probes.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = rx.stats().received;
    // Slow answers, so that every probe is admitted before the first verdict re-opens it.
    rx.set_delay(Duration::from_millis(300));
    let first_probe_at = circuit(&hy).await["next_probe_at_ms"].as_i64().unwrap();
    eventually(
        Duration::from_secs(5),
        "re-opened by failed probes",
        async || {
            let b = circuit(&hy).await;
            b["state"] == "open" && b["next_probe_at_ms"].as_i64().unwrap() > first_probe_at
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        rx.stats().received,
        before + 2,
        "exactly half_open_probes calls went through"
    );

    rx.set_delay(Duration::ZERO);
    rx.set_status(Some(StatusCode::OK));
    let probe_at = circuit(&hy).await["next_probe_at_ms"].as_i64().unwrap();
    eventually(Duration::from_secs(10), "all 40 delivered", async || {
        rx.stats().unique_ids == 40
    })
    .await;
    let done_at = hookyard::clock::now_ms();
    assert!(
        done_at - probe_at < 1000,
        "delivered {} ms after the probe time; without undefer the events deferred while the \
         probes were out would wait the 1500 ms recovery",
        done_at - probe_at
    );
    assert_eq!(circuit(&hy).await["state"], "closed");
}

/// Events deferred by an open breaker carry its host in the store. After a restart that
/// breaker is gone, so they are due at once rather than at the next probe time it set.
#[tokio::test]
async fn breaker_deferred_events_are_due_at_once_after_a_restart() {
    let rx = receiver_with(ReceiverConfig {
        force_status: Some(500),
        ..Default::default()
    })
    .await;
    let config = format!(
        "hosts:\n  default:\n    circuit_breaker: {{ min_calls: 2, recovery_ms: 600000 }}\n{}",
        rule(
            &format!("http://{}/u", rx.local_addr()),
            "[10, 10, 10, 10, 10]"
        )
    );
    let mut hy = Sidecar::start(&config).await;
    let ids: Vec<String> = {
        let mut ids = Vec::new();
        for i in 0..10 {
            ids.push(
                hy.post("user.updated", format!("{i}"), &[])
                    .await
                    .event_id(),
            );
        }
        ids
    };
    eventually(Duration::from_secs(5), "open", async || {
        circuit(&hy).await["state"] == "open"
    })
    .await;
    // Every event is waiting for the probe ten minutes away.
    eventually(Duration::from_secs(5), "all deferred", async || {
        let mut all = true;
        for id in &ids {
            let e = hy.admin_get(&format!("/v1/events/{id}")).await.json();
            all &= e["state"] == "pending"
                && e["due_at_ms"].as_i64().unwrap() > hookyard::clock::now_ms() + 60_000;
        }
        all
    })
    .await;
    hy.stop().await;
    rx.set_status(None);
    let Sidecar { dir, .. } = hy;
    let restarted_at = Instant::now();
    let hy = Sidecar::start_in(dir, &config).await;
    eventually(
        Duration::from_secs(5),
        "all delivered after restart",
        async || rx.stats().unique_ids == 10,
    )
    .await;
    assert!(restarted_at.elapsed() < Duration::from_secs(5));
    assert_eq!(circuit(&hy).await["state"], "closed");
}

/// Seed 002's mini challenge on the SHIPPED `dispatcher-config.yaml`: 100 events, 20% random
/// 5xx, at least 98% delivered, no duplicates. Only what a test must change is changed: free
/// ports, a temp store, the `user.*` target pointed at the receiver with short retry delays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mini_challenge_on_the_shipped_config_delivers_98_percent_without_duplicates() {
    let shipped = include_str!("../../dispatcher-config.yaml");
    let rx = hookyard::receive::Receiver::bind(
        "127.0.0.1:0".parse().unwrap(),
        ReceiverConfig {
            secrets: vec![
                hookyard::signing::Secret::parse(hookyard::config::DEVELOPMENT_SECRET).unwrap(),
            ],
            fail_rate: 0.2,
            fail_status: 500,
            // Unseeded, about 1 run in 300 draws 10 failures among the first 20 calls, a true
            // 50% that rightly opens the breaker. With this seed the n-th request's verdict is
            // fixed: 21 of the first 125 fail (17%), and at most 9 of the first 84, so no 20
            // completions can hold 10 failures even when the 64 workers finish out of order.
            seed: Some(511),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut yaml = shipped.to_owned();
    for (from, to) in [
        ("listen: 127.0.0.1:8080", "listen: 127.0.0.1:0".to_owned()),
        ("admin_listen: 127.0.0.1:9090", "admin_listen: 127.0.0.1:0".to_owned()),
        (
            "path: ./data/hookyard.db",
            format!("path: {}", dir.path().join("hookyard.db").display()),
        ),
        (
            "target: http://127.0.0.1:9000/webhooks/users",
            format!(
                "target: http://{}/webhooks/users\n    retry_matrix: [10, 20, 40, 80, 160, 320, 640]",
                rx.local_addr()
            ),
        ),
    ] {
        assert!(yaml.contains(from), "the shipped config no longer has `{from}`");
        yaml = yaml.replace(from, &to);
    }
    let path = dir.path().join("dispatcher-config.yaml");
    std::fs::write(&path, &yaml).unwrap();
    let settings = hookyard::config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        settings.hosts.default.circuit_breaker.policy,
        hookyard::config::BreakerPolicy::FailureRate {
            failure_rate: 0.5,
            window_ms: 10_000,
            min_calls: 20
        },
        "the shipped default is seed 000's failure-rate breaker"
    );
    let server = hookyard::server::start(path, settings).await.unwrap();
    let client = http_client();
    let url = format!("http://{}/v1/events/user.signup", server.ingress_addr);
    let posts = (0..100).map(|i| send(&client, "POST", &url, &[], format!(r#"{{"n":{i}}}"#)));
    assert!(futures::future::join_all(posts)
        .await
        .iter()
        .all(|a| a.status == 202));
    eventually(Duration::from_secs(15), "98 of 100 delivered", async || {
        rx.stats().unique_ids >= 98
    })
    .await;
    // Let stragglers and any duplicate land before judging.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stats = rx.stats();
    assert_eq!(stats.duplicates_after_success, 0, "{stats:?}");
    assert_eq!(stats.invalid_signature, 0, "{stats:?}");
    let metrics = send(
        &client,
        "GET",
        &format!("http://{}/metrics", server.admin_addr),
        &[],
        "",
    )
    .await;
    let metrics = String::from_utf8_lossy(&metrics.body).into_owned();
    assert_eq!(opened(&metrics, &rx.local_addr().to_string()), 0.0);
    server.shutdown().await;
}
