//! The no-loss promise against a real crash: a child `hookyard serve` killed with SIGKILL.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures::StreamExt;

use crate::util::{config_yaml, eventually, http_client, send, upstream};
use hookyard::receive::ReceiverConfig;

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(config: &std::path::Path) -> Proc {
    Proc(
        Command::new(env!("CARGO_BIN_EXE_hookyard"))
            .args(["serve", "--config"])
            .arg(config)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

async fn wait_healthy(client: &crate::util::HttpClient, admin: &str) {
    eventually(Duration::from_secs(10), "sidecar up", async || {
        let req = http::Request::get(format!("{admin}/healthz"))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        matches!(client.request(req).await, Ok(r) if r.status() == 200)
    })
    .await;
}

#[tokio::test]
async fn events_answered_202_survive_sigkill_and_are_delivered_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let receiver_addr = upstream::closed_port();
    let ingress = upstream::closed_port();
    let admin = upstream::closed_port();
    let rules = format!(
        "hosts:\n  default:\n    circuit_breaker: {{ consecutive_failures: 5, recovery_ms: 100 }}\nqueues:\n  default: {{ concurrency: 32 }}\nrouting_rules:\n  - event_type: user.updated\n    mode: async\n    target: http://{receiver_addr}/u\n    timeout_ms: 3000\n    retry_matrix: [20, 40, 80, 160, 320, 640, 1000, 1000, 1000, 1000, 1000, 1000]\n"
    );
    let config = config_yaml(dir.path(), &rules).replace(
        "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0",
        &format!("listen: {ingress}\nadmin_listen: {admin}"),
    );
    let path = dir.path().join("cfg.yaml");
    std::fs::write(&path, config).unwrap();
    let client = http_client();
    let admin_url = format!("http://{admin}");

    let mut first = spawn(&path);
    wait_healthy(&client, &admin_url).await;
    let url = format!("http://{ingress}/v1/events/user.updated");
    let statuses: Vec<u16> = futures::stream::iter(0..2000)
        .map(|i| {
            let (client, url) = (client.clone(), url.clone());
            async move {
                send(&client, "POST", &url, &[], format!(r#"{{"n":{i}}}"#))
                    .await
                    .status
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    assert!(
        statuses.iter().all(|s| *s == 202),
        "all accepted before the crash"
    );

    first.0.kill().unwrap(); // SIGKILL: no graceful shutdown, no flush.
    first.0.wait().unwrap();
    drop(first);

    let _second = spawn(&path);
    wait_healthy(&client, &admin_url).await;
    let rx = hookyard::receive::Receiver::bind(
        receiver_addr,
        ReceiverConfig {
            secrets: vec![hookyard::signing::Secret::parse(crate::util::SECRET).unwrap()],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    eventually(Duration::from_secs(40), "all 2000 delivered", async || {
        rx.stats().unique_ids == 2000
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stats = rx.stats();
    assert_eq!(stats.duplicates_after_success, 0, "{stats:?}");
    assert_eq!(stats.invalid_signature, 0);
    assert_eq!(stats.unique_ids, 2000);
}
