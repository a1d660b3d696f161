//! Seed 001's `retry_policy` form beside `retry_matrix`: what it compiles to, what `check`
//! refuses, and the attempt times it produces on a real queue.

use std::time::Duration;

use hookyard::receive::ReceiverConfig;

use crate::util::{eventually, receiver_with, Sidecar, SECRET};

/// Compiles `body` (hosts/queues/rules sections) and returns the settings, or the error text.
fn compile(body: &str) -> Result<hookyard::config::Settings, String> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cfg.yaml");
    let yaml = format!("signing:\n  secrets: [\"{SECRET}\"]\n{body}");
    hookyard::config::load_from_bytes(&path, yaml.as_bytes()).map_err(|e| e.to_string())
}

fn rule_with(retry: &str) -> String {
    format!("routing_rules:\n  - event_type: a\n    mode: async\n    target: http://127.0.0.1:9/a\n    {retry}\n")
}

fn schedule(settings: &hookyard::config::Settings) -> (Vec<u64>, f64) {
    let rule = settings.rules.route("a").unwrap();
    (rule.retry_delays_ms.to_vec(), rule.jitter)
}

#[test]
fn a_retry_policy_compiles_to_its_delays() {
    let s = compile(&rule_with(
        "retry_policy: { max_attempts: 5, backoff: exponential, base_delay_ms: 1000, max_delay_ms: 3600000, jitter: true }",
    ))
    .unwrap();
    assert_eq!(schedule(&s), (vec![1000, 2000, 4000, 8000], 0.2));

    // Capped by max_delay_ms; durations accepted; jitter off.
    let s = compile(&rule_with(
        "retry_policy: { max_attempts: 6, base_delay_ms: \"1s\", max_delay_ms: \"5s\", jitter: false }",
    ))
    .unwrap();
    assert_eq!(schedule(&s), (vec![1000, 2000, 4000, 5000, 5000], 0.0));

    let s = compile(&rule_with(
        "retry_policy: { max_attempts: 3, backoff: fixed, base_delay_ms: 250 }",
    ))
    .unwrap();
    assert_eq!(schedule(&s).0, vec![250, 250]);

    // One attempt: no retry at all.
    let s = compile(&rule_with("retry_policy: { max_attempts: 1 }")).unwrap();
    assert!(schedule(&s).0.is_empty());

    // Under queues.<name>, inherited by the queue's rules.
    let s = compile(
        "queues:\n  q: { retry_policy: { max_attempts: 3, base_delay_ms: 100, jitter: false } }\nrouting_rules:\n  - event_type: a\n    mode: async\n    target: http://127.0.0.1:9/a\n    queue: q\n",
    )
    .unwrap();
    assert_eq!(schedule(&s), (vec![100, 200], 0.0));
}

#[test]
fn check_refuses_both_forms_and_out_of_range_policies_at_their_position() {
    let both = compile(&rule_with(
        "retry_matrix: [100]\n    retry_policy: { max_attempts: 3 }",
    ))
    .unwrap_err();
    assert!(
        both.contains(":8:") && both.contains("give retry_matrix or retry_policy, not both"),
        "{both}"
    );
    for (policy, message) in [
        (
            "{ max_attempts: 0 }",
            "retry_policy.max_attempts must be greater than 0",
        ),
        (
            "{ max_attempts: 101 }",
            "retry_policy.max_attempts must be at most 100",
        ),
        (
            "{ max_attempts: 3, base_delay_ms: 5000, max_delay_ms: 1000 }",
            "max_delay_ms (1000) must be at least base_delay_ms (5000)",
        ),
        ("{ max_attempts: 3, backoff: linear }", "linear"),
        ("{ max_attempts: 3, jitters: true }", "jitters"),
    ] {
        let err = compile(&rule_with(&format!("retry_policy: {policy}"))).unwrap_err();
        assert!(err.contains(message), "{policy}: {err}");
    }
}

#[tokio::test]
async fn attempts_follow_base_times_two_to_the_n_minus_one() {
    let rx = receiver_with(ReceiverConfig {
        force_status: Some(500),
        ..Default::default()
    })
    .await;
    let hy = Sidecar::start(&format!(
        "routing_rules:\n  - event_type: a\n    mode: async\n    target: http://{}/a\n    retry_policy: {{ max_attempts: 4, base_delay_ms: 60, jitter: false }}\n",
        rx.local_addr()
    ))
    .await;
    let id = hy.post("a", "{}", &[]).await.event_id();
    let mut record = serde_json::Value::Null;
    eventually(Duration::from_secs(5), "dead-lettered", async || {
        record = hy.admin_get(&format!("/v1/events/{id}")).await.json();
        record["state"] == "dead_lettered"
    })
    .await;
    let started: Vec<i64> = record["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["started_at_ms"].as_i64().unwrap())
        .collect();
    assert_eq!(started.len(), 4, "max_attempts: {record}");
    for (n, pair) in started.windows(2).enumerate() {
        let wanted = 60 * (1 << n);
        let gap = pair[1] - pair[0];
        // Never early; late by no more than the wake-up and the failed attempt (with room for a
        // loaded machine).
        assert!(
            gap >= wanted && gap <= wanted + 150,
            "retry {}: {gap} ms after the attempt before, wanted {wanted}: {started:?}",
            n + 1
        );
    }
}
