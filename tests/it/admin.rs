//! The admin API: token, health, config and reload, metrics.

use std::time::Duration;

use crate::util::{eventually, metric_value, receiver, send, Sidecar};

fn rules(target: &str, mode: &str) -> String {
    format!(
        "routing_rules:\n  - event_type: a.b\n    mode: {mode}\n    target: {target}\n    timeout_ms: 500\n    retry_matrix: [10]\n"
    )
}

#[tokio::test]
async fn with_a_token_requests_without_it_get_401_and_change_nothing() {
    let rx = receiver().await;
    let hy = Sidecar::start(&format!(
        "admin:\n  token: s3cret-token\n{}",
        rules(&format!("http://{}/", rx.local_addr()), "async")
    ))
    .await;
    for (method, path) in [
        ("GET", "/v1/config"),
        ("POST", "/v1/config/reload"),
        ("GET", "/v1/dlq"),
        ("POST", "/v1/dlq/replay"),
        ("GET", "/v1/circuits"),
        ("POST", "/v1/targets/enable"),
    ] {
        let url = format!("{}{path}", hy.admin());
        let none = send(&hy.client, method, &url, &[], "").await;
        assert_eq!(none.status, 401, "{method} {path}");
        assert_eq!(none.json()["error"], "unauthorized");
        let wrong = send(
            &hy.client,
            method,
            &url,
            &[("authorization", "Bearer nope")],
            "",
        )
        .await;
        assert_eq!(wrong.status, 401, "{method} {path}");
    }
    // Probes and scrapes cannot carry a token.
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(hy.admin_get(path).await.status, 200, "{path}");
    }
    let reloads = hy.server().reloader.last();
    assert_eq!(
        reloads.trigger, "startup",
        "the unauthorized reload did nothing"
    );
    let ok = send(
        &hy.client,
        "GET",
        &format!("{}/v1/config", hy.admin()),
        &[("authorization", "Bearer s3cret-token")],
        "",
    )
    .await;
    assert_eq!(ok.status, 200);
    assert!(
        !String::from_utf8_lossy(&ok.body).contains("s3cret-token"),
        "token is never echoed"
    );
}

#[tokio::test]
async fn health_readiness_and_config_describe_the_running_sidecar() {
    let rx = receiver().await;
    let hy = Sidecar::start(&rules(&format!("http://{}/", rx.local_addr()), "sync")).await;
    assert_eq!(hy.admin_get("/healthz").await.status, 200);
    assert_eq!(hy.admin_get("/readyz").await.json()["status"], "ready");
    let config = hy.admin_get("/v1/config").await.json();
    assert_eq!(config["content_hash"].as_str().unwrap().len(), 64);
    assert_eq!(config["rules"][0]["pattern"], "a.b");
    assert_eq!(config["rules"][0]["mode"], "sync");
    assert_eq!(config["last_reload"]["result"], "ok");
    assert!(
        !String::from_utf8_lossy(&hy.admin_get("/v1/config").await.body).contains("MfKQ9r8"),
        "secrets never shown"
    );
    assert_eq!(hy.admin_get("/v1/nothing").await.status, 404);
    assert_eq!(hy.admin_post("/v1/config", "").await.status, 405);
    assert_eq!(hy.admin_get("/v1/events/evt_missing").await.status, 404);
    assert_eq!(hy.admin_get("/v1/dlq?limit=0").await.status, 400);
    assert_eq!(hy.admin_get("/v1/dlq?cursor=garbage").await.status, 400);
    assert_eq!(
        hy.admin_get("/v1/fallbacks?since=yesterday").await.status,
        400
    );
}

#[tokio::test]
async fn invalid_reload_keeps_old_rules_and_reports_the_error_then_a_valid_one_applies() {
    let rx = receiver().await;
    let target = format!("http://{}/", rx.local_addr());
    let hy = Sidecar::start(&rules(&target, "sync")).await;
    let good = std::fs::read_to_string(&hy.config_path).unwrap();
    std::fs::write(
        &hy.config_path,
        good.replace("mode: sync", "mode: sometimes"),
    )
    .unwrap();
    let r = hy.admin_post("/v1/config/reload", "").await;
    assert_eq!(r.status, 422);
    assert!(
        r.json()["error"].as_str().unwrap().contains(":10:11:"),
        "{}",
        r.json()
    );
    assert_eq!(
        hy.post("a.b", "{}", &[]).await.status,
        200,
        "old sync rule still serves"
    );
    let config = hy.admin_get("/v1/config").await.json();
    assert_eq!(config["last_reload"]["result"], "error");
    assert!(config["last_reload"]["error"]
        .as_str()
        .unwrap()
        .contains("sometimes"));
    let metrics = hy.metrics().await;
    assert!(
        metric_value(&metrics, "hookyard_config_reload_total{result=\"error\"}").unwrap() >= 1.0
    );

    std::fs::write(
        &hy.config_path,
        good.replace("mode: sync", "mode: async").replacen(
            "listen: 127.0.0.1:0\n",
            "listen: 127.0.0.1:1\n",
            1,
        ),
    )
    .unwrap();
    let r = hy.admin_post("/v1/config/reload", "").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json()["report"]["needs_restart"],
        serde_json::json!(["listen"])
    );
    let a = hy.post("a.b", "{}", &[]).await;
    assert_eq!(
        (a.status, a.json()["status"].clone()),
        (202, "accepted".into()),
        "new async rule in force"
    );
    eventually(Duration::from_secs(3), "async delivery", async || {
        rx.stats().delivered_ok == 2
    })
    .await;
}

#[tokio::test]
async fn metrics_cover_the_contract_with_bounded_labels() {
    let rx = receiver().await;
    let hy = Sidecar::start(&rules(&format!("http://{}/", rx.local_addr()), "sync")).await;
    hy.post("a.b", "{}", &[("x-trace-id", "trace-must-not-be-a-label")])
        .await;
    hy.post("unknown.type.12345", "{}", &[]).await;
    let m = hy.metrics().await;
    for name in [
        "hookyard_events_received_total",
        "hookyard_delivery_attempts_total",
        "hookyard_delivery_latency_seconds_bucket",
        "hookyard_host_in_flight",
        "hookyard_host_max_connections",
        "hookyard_queue_depth",
        "hookyard_dlq_depth",
        "hookyard_queue_oldest_ready_age_seconds",
    ] {
        assert!(m.contains(name), "{name} missing:\n{m}");
    }
    assert!(
        m.contains(r#"event_type="a.b",mode="sync",outcome="delivered""#),
        "{m}"
    );
    assert!(m.contains(r#"event_type="_unrouted""#));
    assert!(
        !m.contains("unknown.type.12345"),
        "raw event types never become labels"
    );
    assert!(!m.contains("trace-must-not-be-a-label"));
    assert!(!m.contains("evt_"), "event ids never become labels");
}

#[test]
fn the_grafana_dashboard_only_uses_metric_names_hookyard_exports() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/dashboards/hookyard.json"
    ))
    .unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let exported = [
        hookyard::metrics::EVENTS_RECEIVED,
        hookyard::metrics::DELIVERY_ATTEMPTS,
        hookyard::metrics::DELIVERY_LATENCY,
        hookyard::metrics::HOST_IN_FLIGHT,
        hookyard::metrics::HOST_MAX_CONNECTIONS,
        hookyard::metrics::SHED,
        hookyard::metrics::CIRCUIT_STATE,
        hookyard::metrics::CIRCUIT_TRANSITIONS,
        hookyard::metrics::FALLBACKS,
        hookyard::metrics::QUEUE_DEPTH,
        hookyard::metrics::DLQ_DEPTH,
        hookyard::metrics::OLDEST_READY_AGE,
        hookyard::metrics::DELIVERIES,
        hookyard::metrics::ENQUEUE_BATCH_SIZE,
        hookyard::metrics::CONFIG_RELOADS,
    ];
    let mut used = std::collections::HashSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if let Some(name) = word.strip_prefix("hookyard_") {
                    let name = format!("hookyard_{name}");
                    let base = name.trim_end_matches("_bucket");
                    assert!(
                        exported.contains(&base),
                        "dashboard uses unknown metric {name}"
                    );
                    used.insert(base.to_string());
                }
            }
        }
    }
    assert_eq!(
        used.len(),
        exported.len(),
        "every exported metric has a panel"
    );
}

#[tokio::test]
async fn token_protects_metrics_puts_metrics_behind_the_token_but_never_the_probes() {
    let rx = receiver().await;
    let hy = Sidecar::start(&format!(
        "admin:\n  token: s3cret-token\n  token_protects_metrics: true\n{}",
        rules(&format!("http://{}/", rx.local_addr()), "async")
    ))
    .await;
    assert_eq!(hy.admin_get("/metrics").await.status, 401);
    assert_eq!(hy.admin_get("/healthz").await.status, 200);
    assert_eq!(hy.admin_get("/readyz").await.status, 200);
    let url = format!("{}/metrics", hy.admin());
    let with = send(
        &hy.client,
        "GET",
        &url,
        &[("authorization", "Bearer s3cret-token")],
        "",
    )
    .await;
    assert_eq!(with.status, 200);
}
