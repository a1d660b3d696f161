//! The command line against a running sidecar: `dlq list`/`dlq replay` filters, `reload`,
//! `circuits`, and the commands that need no sidecar (`--version`, `completions`).

use std::time::Duration;

use hookyard::receive::ReceiverConfig;
use http::StatusCode;

use crate::util::{eventually, hookyard, receiver_with, Sidecar};

#[tokio::test]
async fn dlq_filters_reload_and_circuits_work_against_a_running_sidecar() {
    // Every delivery is refused with a 400: straight to the dead-letter queue.
    let rx = receiver_with(ReceiverConfig {
        force_status: Some(StatusCode::BAD_REQUEST.as_u16()),
        ..Default::default()
    })
    .await;
    let target = format!("http://{}/u", rx.local_addr());
    let hy = Sidecar::start(&format!(
        "routing_rules:\n  - event_type: a.x\n    mode: async\n    target: {target}\n    queue: qa\n  - event_type: b.x\n    mode: async\n    target: {target}\n    queue: qb\n"
    ))
    .await;
    for t in ["a.x", "a.x", "b.x"] {
        assert_eq!(hy.post(t, "{}", &[]).await.status, 202);
    }
    eventually(Duration::from_secs(5), "three dead letters", async || {
        hy.admin_get("/v1/dlq").await.json()["items"]
            .as_array()
            .is_some_and(|i| i.len() == 3)
    })
    .await;
    let admin = hy.admin();
    let list = async |extra: &[&str]| {
        let mut args = vec!["dlq", "list", "--admin-url", &admin, "--json"];
        args.extend_from_slice(extra);
        let (ok, out, err) = hookyard(&args).await;
        assert!(ok, "{err}");
        let page: serde_json::Value = serde_json::from_str(&out).unwrap();
        page["items"].as_array().unwrap().len()
    };
    assert_eq!(list(&["--queue", "qa"]).await, 2);
    assert_eq!(list(&["--event-type", "b.x"]).await, 1);
    assert_eq!(list(&["--until", "2000-01-01T00:00:00Z"]).await, 0);
    assert_eq!(list(&["--since", "2000-01-01T00:00:00Z"]).await, 3);

    let (ok, out, err) = hookyard(&[
        "dlq",
        "replay",
        "--admin-url",
        &admin,
        "--all",
        "--queue",
        "qb",
    ])
    .await;
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "replayed 1");
    let (ok, _, err) = hookyard(&[
        "dlq",
        "replay",
        "--admin-url",
        &admin,
        "evt_x",
        "--queue",
        "qa",
    ])
    .await;
    assert!(!ok && err.contains("with --all"), "{err}");

    let (ok, out, err) = hookyard(&["reload", "--admin-url", &admin]).await;
    assert!(ok, "{err}");
    assert!(out.starts_with("reloaded: 2 rule(s)"), "{out}");
    assert_eq!(hy.server().reloader.last().trigger, "api");

    let (ok, out, err) = hookyard(&["circuits", "--admin-url", &admin]).await;
    assert!(ok, "{err}");
    let host = rx.local_addr().to_string();
    let row = out
        .lines()
        .find(|l| l.starts_with(&host))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(row.contains("closed"), "{row}");
}

#[tokio::test]
async fn version_names_the_commit_and_date_and_completions_are_generated() {
    let (ok, out, _) = hookyard(&["--version"]).await;
    assert!(ok);
    // "hookyard 0.1.0 (<12 hex digits or unknown> YYYY-MM-DD)"
    let inside = out.trim().split_once('(').unwrap().1.trim_end_matches(')');
    let (commit, date) = inside.split_once(' ').unwrap();
    assert!(
        commit == "unknown"
            || (commit.len() == 12 && commit.bytes().all(|b| b.is_ascii_hexdigit())),
        "{out}"
    );
    assert!(date.len() == 10 && date.as_bytes()[4] == b'-', "{out}");
    for shell in ["bash", "zsh", "fish"] {
        let (ok, out, err) = hookyard(&["completions", shell]).await;
        assert!(ok, "{err}");
        assert!(out.contains("dlq") && out.contains("circuits"), "{shell}");
    }
}

/// Runs `hookyard serve` on `config` with `env`, delivers one async event, stops it, and
/// returns its stderr.
async fn serve_log(env: &[(&str, &str)]) -> String {
    let rx = crate::util::receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let ingress = crate::util::upstream::closed_port();
    let admin = crate::util::upstream::closed_port();
    let config = crate::util::config_yaml(
        dir.path(),
        &format!(
            "routing_rules:\n  - event_type: a\n    mode: async\n    target: http://{}/a\n",
            rx.local_addr()
        ),
    )
    .replace(
        "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0",
        &format!("listen: {ingress}\nadmin_listen: {admin}"),
    );
    let path = dir.path().join("c.yaml");
    std::fs::write(&path, config).unwrap();
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_hookyard"))
        .arg("serve")
        .env("HOOKYARD_CONFIG", &path)
        .env_remove("HOOKYARD_LOG_FORMAT")
        .env_remove("NO_COLOR")
        .envs(env.iter().copied())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let client = crate::util::http_client();
    let url = format!("http://{ingress}/v1/events/a");
    eventually(Duration::from_secs(10), "an event accepted", async || {
        let req = http::Request::post(&url)
            .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))
            .unwrap();
        matches!(client.request(req).await, Ok(r) if r.status() == 202)
    })
    .await;
    eventually(Duration::from_secs(5), "delivered", async || {
        rx.stats().delivered_ok == 1
    })
    .await;
    // SIGTERM: a graceful stop flushes the log.
    let pid = child.id().unwrap() as i32;
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let out = child.wait_with_output().await.unwrap();
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn logs_follow_hookyard_log_format_without_colour_codes_off_a_terminal_or_empty_fields() {
    let json = serve_log(&[("HOOKYARD_LOG_FORMAT", "json")]).await;
    let lines: Vec<serde_json::Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let attempt = lines
        .iter()
        .find(|l| l["message"] == "delivery attempt")
        .unwrap_or_else(|| panic!("{json}"));
    assert_eq!(attempt["status"], 200);
    assert!(attempt.get("error").is_none(), "{attempt}");

    // The human format on a pipe: no colour codes.
    let text = serve_log(&[("HOOKYARD_LOG_FORMAT", "text")]).await;
    assert!(text.contains("delivery attempt"), "{text}");
    assert!(
        !text.contains('\u{1b}'),
        "colour codes off a terminal: {text}"
    );
    assert!(!text.contains("error=\"\""), "{text}");

    // --log-format belongs to the commands that log.
    let (ok, _, err) = hookyard(&["check", "--log-format", "json"]).await;
    assert!(!ok && err.contains("--log-format"), "{err}");
}
