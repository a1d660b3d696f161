//! Bulk dead-letter replay as a background job: `POST /v1/dlq/replay` -> 202 + job id,
//! `GET /v1/jobs/{id}` for progress, `?dry_run=true`, and `hookyard dlq replay` polling it.

use std::time::Duration;

use futures::StreamExt;
use hookyard::receive::ReceiverConfig;
use http::StatusCode;
use serde_json::Value;

use crate::util::{eventually, hookyard, receiver_with, Sidecar};

const RULE: &str = "routing_rules:\n  - event_type: bulk.x\n    mode: async\n    target: {target}\n    queue: bulk\n    timeout_ms: 2000\n    retry_matrix: [10]\n";

/// A sidecar whose receiver answers 400 to everything, with `n` dead letters in queue `bulk`.
async fn sidecar_with_dead_letters(n: usize) -> (Sidecar, hookyard::receive::Receiver) {
    let rx = receiver_with(ReceiverConfig {
        force_status: Some(StatusCode::BAD_REQUEST.as_u16()),
        remember_ids: 100_000,
        ..Default::default()
    })
    .await;
    let hy =
        Sidecar::start(&RULE.replace("{target}", &format!("http://{}/u", rx.local_addr()))).await;
    let statuses: Vec<u16> = futures::stream::iter(0..n)
        .map(|_| async { hy.post("bulk.x", "{}", &[]).await.status })
        .buffer_unordered(32)
        .collect()
        .await;
    assert!(statuses.iter().all(|s| *s == 202));
    let store = hy.server().context.store().clone();
    eventually(Duration::from_secs(60), "all dead-lettered", async || {
        store
            .stats("bulk", hookyard::clock::now_ms())
            .await
            .unwrap()
            .dead_lettered
            == n as u64
    })
    .await;
    (hy, rx)
}

async fn dead_letters(hy: &Sidecar) -> u64 {
    hy.server()
        .context
        .store()
        .stats("bulk", hookyard::clock::now_ms())
        .await
        .unwrap()
        .dead_lettered
}

#[tokio::test]
async fn a_replay_job_over_thousands_of_dead_letters_reports_progress_and_ends_done() {
    let (hy, rx) = sidecar_with_dead_letters(2000).await;
    rx.set_status(None);

    let started = hy.admin_post("/v1/dlq/replay", r#"{"all":true}"#).await;
    assert_eq!(started.status, 202);
    let body = started.json();
    let id = body["job_id"].as_str().unwrap().to_string();
    assert!(id.starts_with("job_"), "{body}");
    assert_eq!(
        started.header("location"),
        Some(format!("/v1/jobs/{id}").as_str())
    );

    let mut seen: Vec<Value> = Vec::new();
    let job = loop {
        let answer = hy.admin_get(&format!("/v1/jobs/{id}")).await;
        assert_eq!(answer.status, 200);
        let job = answer.json();
        let p = &job["progress"];
        let n = |k: &str| p[k].as_u64().unwrap();
        assert!(
            n("replayed") + n("skipped") + n("remaining") <= n("matched"),
            "{job}"
        );
        if let Some(last) = seen.last() {
            assert!(
                n("replayed") >= last["progress"]["replayed"].as_u64().unwrap(),
                "progress never goes back"
            );
        }
        seen.push(job.clone());
        if job["state"] != "running" {
            break job;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert_eq!(job["state"], "done", "{job}");
    assert_eq!(job["dry_run"], false);
    assert_eq!(job["progress"]["matched"], 2000);
    assert_eq!(job["progress"]["replayed"], 2000);
    assert_eq!(job["progress"]["skipped"], 0);
    assert_eq!(job["progress"]["remaining"], 0);
    assert_eq!(job["counts"]["batches"], 4, "500 ids per store call");
    assert_eq!(job["errors"], serde_json::json!([]));
    assert!(job["finished_at_ms"].as_i64() >= job["started_at_ms"].as_i64());
    assert!(job["finished_at"].is_string());
    // The workers were woken: every replayed event is delivered.
    eventually(Duration::from_secs(60), "replayed deliveries", async || {
        rx.stats().delivered_ok == 2000
    })
    .await;
    assert_eq!(dead_letters(&hy).await, 0);
    // The finished job stays visible.
    assert_eq!(hy.admin_get(&format!("/v1/jobs/{id}")).await.status, 200);
}

#[tokio::test]
async fn a_dry_run_counts_and_replays_nothing() {
    let (hy, rx) = sidecar_with_dead_letters(30).await;
    rx.set_status(None);
    let job = hy.replay_job("?dry_run=true", r#"{"queue":"bulk"}"#).await;
    assert_eq!(job["state"], "done", "{job}");
    assert_eq!(job["dry_run"], true);
    assert_eq!(job["counts"]["would_replay"], 30);
    assert_eq!(job["progress"]["matched"], 30);
    assert_eq!(job["progress"]["replayed"], 0);
    let some = hy.admin_get("/v1/dlq?limit=2").await.json();
    let known = some["items"][0]["id"].as_str().unwrap().to_string();
    let by_id = hy
        .replay_job(
            "?dry_run=true",
            &format!(r#"{{"ids":["{known}","evt_nope"]}}"#),
        )
        .await;
    assert_eq!(by_id["counts"]["would_replay"], 1, "{by_id}");
    assert_eq!(by_id["missing_ids"], serde_json::json!(["evt_nope"]));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(dead_letters(&hy).await, 30, "nothing was replayed");
    assert_eq!(rx.stats().delivered_ok, 0);
    assert_eq!(
        hy.admin_post("/v1/dlq/replay?dry_run=maybe", r#"{"all":true}"#)
            .await
            .status,
        400
    );
}

#[tokio::test]
async fn unknown_jobs_are_404_json_and_jobs_are_read_only() {
    let (hy, _rx) = sidecar_with_dead_letters(0).await;
    let missing = hy.admin_get("/v1/jobs/job_nope").await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json()["error"], "not_found");
    assert!(missing.json()["reason"]
        .as_str()
        .unwrap()
        .contains("job_nope"));
    let post = hy.admin_post("/v1/jobs/job_nope", "").await;
    assert_eq!(post.status, 405);
    assert_eq!(post.header("allow"), Some("GET"));
    let both = hy
        .admin_post("/v1/dlq/replay", r#"{"ids":["evt_a"],"queue":"bulk"}"#)
        .await;
    assert_eq!(both.status, 400, "ids and a filter together");
}

#[tokio::test]
async fn the_cli_polls_the_job_and_reports_ids_not_in_the_dlq() {
    let (hy, rx) = sidecar_with_dead_letters(1200).await;
    rx.set_status(None);
    let admin = hy.admin();
    let page = hy.admin_get("/v1/dlq?limit=1").await.json();
    let known = page["items"][0]["id"].as_str().unwrap().to_string();

    let (ok, out, err) =
        hookyard(&["dlq", "replay", "--admin-url", &admin, "--all", "--dry-run"]).await;
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "would replay 1200");

    // Ids: the known one is replayed, the unknown one is reported and the exit is non-zero.
    let (ok, out, err) =
        hookyard(&["dlq", "replay", "--admin-url", &admin, &known, "evt_gone"]).await;
    assert!(!ok);
    assert_eq!(out.trim(), "replayed 1");
    assert!(
        err.contains("not in the dead-letter queue: evt_gone") && !err.contains(&known),
        "{err}"
    );

    // Everything else; stderr is not a terminal, so progress comes as plain lines.
    let (ok, out, err) = hookyard(&["dlq", "replay", "--admin-url", &admin, "--all"]).await;
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "replayed 1199");
    assert!(
        err.lines().last().unwrap().contains("1199/1199 done"),
        "{err}"
    );
    assert!(
        !err.contains('\u{1b}'),
        "no terminal escapes in plain output: {err}"
    );
    eventually(Duration::from_secs(60), "delivered", async || {
        rx.stats().delivered_ok == 1200
    })
    .await;
}
