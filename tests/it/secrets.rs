//! Secrets are shown nowhere: a canary secret, given through the environment as the signing
//! secret, the admin token, the Redis password, a target's password and a target's query
//! token, must not appear in any output hookyard produces: logs (human and JSON, debug level),
//! every admin answer, `hookyard check` on good and bad files, failed reloads, `--help` of
//! every command, and CLI errors. And the admin API is not opened to the network by accident.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;

use crate::redis::redis_server;
use crate::util::{eventually, http_client, send, upstream, HttpClient};

/// The distinctive text every secret below contains.
const CANARY: &str = "CANARY-s3cr3t-9f1c";

/// The raw key bytes of the signing secret (they contain the canary in plain text).
fn signing_key() -> Vec<u8> {
    format!("{CANARY}-signing-key").into_bytes()
}

/// The base64 part of the `whsec_` signing secret: a leak of the configured form would show
/// this, not the canary, so it is searched for too.
fn signing_b64() -> String {
    base64::engine::general_purpose::STANDARD.encode(signing_key())
}

/// Every form a leaked secret could take.
fn forbidden() -> Vec<String> {
    let b64 = signing_b64();
    vec![
        CANARY.to_string(),
        // The canary percent-encoded (as userinfo or a query value could be rendered).
        CANARY.replace('-', "%2D"),
        b64.clone(),
        // Unpadded and URL-safe variants of the same key.
        b64.trim_end_matches('=').to_string(),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(signing_key()),
    ]
}

/// Panics if `text`, produced by `channel`, holds any form of the canary.
fn assert_clean(channel: &str, text: &str) {
    for form in forbidden() {
        if let Some(at) = text.find(&form) {
            let start = text[..at]
                .char_indices()
                .rev()
                .nth(200)
                .map_or(0, |(i, _)| i);
            panic!(
                "{channel} shows a secret ({form}) at byte {at}:\n...{}...",
                &text[start..(at + form.len() + 100).min(text.len())]
            );
        }
    }
}

/// The environment every child process gets: each secret carries the canary.
fn secret_env(command: &mut Command) -> &mut Command {
    command
        .env("HOOKYARD_SECRET", format!("whsec_{}", signing_b64()))
        .env("HY_SIGNING_SECRET", format!("whsec_{}", signing_b64()))
        .env("HOOKYARD_ADMIN_TOKEN", format!("{CANARY}-admin"))
        .env("HY_ADMIN_TOKEN", format!("{CANARY}-admin"))
        .env("HY_REDIS_PW", format!("{CANARY}-redis"))
        .env("HY_TARGET_PW", format!("{CANARY}-target"))
        .env("HY_TARGET_TOKEN", format!("{CANARY}-query"))
        // Expands into a target that is not a URL (a space), for the failing check and reload.
        .env("HY_BAD_PW", format!("{CANARY} bad"))
        .env(
            "HOOKYARD_ADMIN_URL",
            format!("http://ops:{CANARY}-url@127.0.0.1:1"),
        )
        .env("RUST_LOG", "debug")
}

fn hookyard() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hookyard"));
    secret_env(&mut c);
    c
}

fn text(out: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Where the store lives in the config under test.
enum Store {
    /// A Redis that requires the canary password.
    Redis(u16),
    Sqlite,
}

/// A config whose every secret comes from the environment; `target` is the rules' target.
fn config(dir: &Path, listen: u16, admin: u16, store: &Store, target: &str) -> String {
    let store = match store {
        Store::Redis(port) => format!(
            "  kind: redis\n  url: \"redis://:${{HY_REDIS_PW}}@127.0.0.1:{port}\"\n  key_prefix: canary{listen}\n"
        ),
        Store::Sqlite => format!("  kind: sqlite\n  path: {}\n", dir.join("hy.db").display()),
    };
    format!(
        "listen: 127.0.0.1:{listen}\nadmin_listen: 127.0.0.1:{admin}\nadmin:\n  token: \"${{HY_ADMIN_TOKEN}}\"\nstore:\n{store}signing:\n  secrets: [\"${{HY_SIGNING_SECRET}}\"]\nrouting_rules:\n  - event_type: sync.fail\n    mode: sync\n    target: \"{target}\"\n    timeout_ms: 500\n    fallback: async_dlq\n    retry_matrix: [10]\n  - event_type: async.fail\n    mode: async\n    target: \"{target}\"\n    retry_matrix: [10]\n"
    )
}

/// A target with a password and a query token, on a port where nothing listens: every
/// delivery is a connection error.
fn failing_target(port: u16) -> String {
    format!("http://hook:${{HY_TARGET_PW}}@127.0.0.1:{port}/in?token=${{HY_TARGET_TOKEN}}")
}

/// Makes the test Redis require the canary password, as a production one would.
fn require_password(port: u16) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let pw = format!("{CANARY}-redis");
    write!(
        s,
        "*4\r\n$6\r\nCONFIG\r\n$3\r\nSET\r\n$11\r\nrequirepass\r\n${}\r\n{pw}\r\n",
        pw.len()
    )
    .unwrap();
    let mut ok = [0u8; 5];
    s.read_exact(&mut ok).unwrap();
    assert_eq!(&ok, b"+OK\r\n");
}

struct Serve {
    child: Child,
    log: std::path::PathBuf,
}

impl Serve {
    fn start(dir: &Path, config: &Path, format: &str) -> Serve {
        let log = dir.join(format!("serve-{format}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = hookyard()
            .args(["serve", "--log-format", format, "--config"])
            .arg(config)
            .stdout(Stdio::from(file.try_clone().unwrap()))
            .stderr(Stdio::from(file))
            .spawn()
            .unwrap();
        Serve { child, log }
    }

    /// SIGTERM (a graceful stop, so shutdown logs are included), then everything it printed.
    fn stop(mut self) -> String {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait().unwrap().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::fs::read_to_string(&self.log).unwrap()
    }
}

async fn admin_get(client: &HttpClient, admin: &str, path: &str, token: bool) -> (u16, String) {
    let auth = format!("Bearer {CANARY}-admin");
    let headers: Vec<(&str, &str)> = if token {
        vec![("authorization", auth.as_str())]
    } else {
        vec![]
    };
    let a = send(client, "GET", &format!("{admin}{path}"), &headers, "").await;
    (a.status, String::from_utf8_lossy(&a.body).into_owned())
}

/// Runs serve with `format` logs, drives every admin endpoint and a failing delivery, a failed
/// reload, and returns everything any channel showed.
async fn exercise_serve(store: &Store, format: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let (listen, admin) = (
        upstream::closed_port().port(),
        upstream::closed_port().port(),
    );
    let target = failing_target(upstream::closed_port().port());
    let path = dir.path().join("cfg.yaml");
    std::fs::write(&path, config(dir.path(), listen, admin, store, &target)).unwrap();
    let mut serve = Serve::start(dir.path(), &path, format);
    let client = http_client();
    let admin_url = format!("http://127.0.0.1:{admin}");
    let ingress = format!("http://127.0.0.1:{listen}");
    let mut shown = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while client
        .get(format!("{admin_url}/healthz").parse().unwrap())
        .await
        .is_err()
    {
        if let Some(status) = serve.child.try_wait().unwrap() {
            // What it printed on the way out is an output channel too.
            let log = std::fs::read_to_string(&serve.log).unwrap();
            assert_clean("serve that exited at start", &log);
            panic!("serve exited ({status}) before answering:\n{log}");
        }
        assert!(
            Instant::now() < deadline,
            "serve did not answer within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A sync delivery that fails to connect (falls back) and an async one (retried, then
    // dead-lettered): their errors reach logs, event history, DLQ and fallbacks.
    let sync = send(
        &client,
        "POST",
        &format!("{ingress}/v1/events/sync.fail"),
        &[],
        "{}",
    )
    .await;
    shown.push_str(&String::from_utf8_lossy(&sync.body));
    assert_eq!(sync.status, 202, "{}", String::from_utf8_lossy(&sync.body));
    let sync_id = sync.event_id();
    let queued = send(
        &client,
        "POST",
        &format!("{ingress}/v1/events/async.fail"),
        &[],
        "{}",
    )
    .await;
    shown.push_str(&String::from_utf8_lossy(&queued.body));
    let async_id = queued.event_id();
    for id in [&sync_id, &async_id] {
        eventually(Duration::from_secs(20), "dead-lettered", async || {
            let (_, body) = admin_get(&client, &admin_url, &format!("/v1/events/{id}"), true).await;
            body.contains("dead_lettered")
        })
        .await;
    }

    for path in [
        "/v1/config",
        "/v1/circuits",
        "/metrics",
        &format!("/v1/events/{sync_id}"),
        &format!("/v1/events/{async_id}"),
        "/v1/dlq",
        "/v1/fallbacks",
        "/healthz",
        "/readyz",
    ] {
        for token in [true, false] {
            let (status, body) = admin_get(&client, &admin_url, path, token).await;
            if token {
                assert!(status < 300, "{path}: {status} {body}");
            }
            shown.push_str(&format!("\n--- GET {path} (token: {token})\n{body}"));
        }
    }
    let (_, config_body) = admin_get(&client, &admin_url, "/v1/config", true).await;
    assert!(config_body.contains("***@127.0.0.1"), "{config_body}");
    assert!(
        config_body.contains(r#""admin":{"allow_unauthenticated_remote":false,"token":"***"}"#),
        "{config_body}"
    );

    // A reload of a file whose target expands to something that is not a URL.
    let bad = config(
        dir.path(),
        listen,
        admin,
        store,
        "http://hook:${HY_BAD_PW}@127.0.0.1:1/x",
    );
    std::fs::write(&path, bad).unwrap();
    let auth = format!("Bearer {CANARY}-admin");
    let reload = send(
        &client,
        "POST",
        &format!("{admin_url}/v1/config/reload"),
        &[("authorization", auth.as_str())],
        "",
    )
    .await;
    let reload_body = String::from_utf8_lossy(&reload.body).into_owned();
    assert_eq!(reload.status, 422, "{reload_body}");
    assert!(
        reload_body.contains("routing_rules[0].target"),
        "the error names the key: {reload_body}"
    );
    shown.push_str(&format!("\n--- reload 422\n{reload_body}"));
    let (_, after) = admin_get(&client, &admin_url, "/v1/config", true).await;
    assert!(after.contains("\"result\":\"error\""), "{after}");
    shown.push_str(&format!(
        "\n--- GET /v1/config after the failed reload\n{after}"
    ));

    shown.push_str(&format!("\n--- serve {format} logs\n{}", serve.stop()));
    shown
}

#[tokio::test]
async fn a_canary_secret_appears_in_no_output_channel() {
    let redis = redis_server::RedisServer::start("a_canary_secret_appears_in_no_output_channel");
    let store = match &redis {
        Some(r) => {
            require_password(r.port);
            Store::Redis(r.port)
        }
        None => Store::Sqlite,
    };

    for format in ["human", "json"] {
        let shown = exercise_serve(&store, format).await;
        assert!(
            shown.contains("delivery attempt") || shown.contains("falling back"),
            "debug logs were captured:\n{shown}"
        );
        assert_clean(&format!("serve ({format} logs) and admin API"), &shown);
    }

    // `hookyard check` on a valid file (prints the store URL) and an invalid one.
    let dir = tempfile::tempdir().unwrap();
    let port = match store {
        Store::Redis(p) => p,
        Store::Sqlite => 6379,
    };
    let good = dir.path().join("good.yaml");
    std::fs::write(
        &good,
        config(dir.path(), 1, 2, &Store::Redis(port), &failing_target(1)),
    )
    .unwrap();
    let out = hookyard()
        .args(["check", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("redis://***@127.0.0.1"),
        "{}",
        text(&out)
    );
    assert_clean("check (valid)", &text(&out));
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        config(
            dir.path(),
            1,
            2,
            &Store::Redis(port),
            "http://hook:${HY_BAD_PW}@127.0.0.1:1/x",
        ),
    )
    .unwrap();
    let out = hookyard()
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = text(&out);
    assert!(err.contains("routing_rules[0].target"), "{err}");
    assert!(
        err.contains("${HY_BAD_PW}"),
        "the snippet is the file's text: {err}"
    );
    assert_clean("check (invalid)", &err);
}

#[test]
fn help_and_cli_errors_show_no_secret_from_the_environment() {
    // `--help` of every command, with every secret in the environment.
    for args in [
        vec!["--help"],
        vec!["serve", "--help"],
        vec!["check", "--help"],
        vec!["schema", "--help"],
        vec!["receive", "--help"],
        vec!["dlq", "--help"],
        vec!["dlq", "list", "--help"],
        vec!["dlq", "replay", "--help"],
        vec!["fallbacks", "--help"],
    ] {
        let out = hookyard().args(&args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", text(&out));
        assert_clean(&format!("hookyard {}", args.join(" ")), &text(&out));
    }

    // CLI errors: an admin URL with a password that cannot be reached, a receive secret
    // that is not a whsec_ secret.
    let out = hookyard().args(["dlq", "list"]).output().unwrap();
    assert!(!out.status.success());
    assert_clean("dlq list (unreachable admin URL)", &text(&out));
    let out = hookyard()
        .args(["receive", "--listen", "127.0.0.1:0"])
        .env("HOOKYARD_SECRET", format!("not-whsec-{CANARY}"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    assert_clean("receive (invalid secret)", &text(&out));
}

/// `hookyard check` on `yaml` with the secret environment: (exit code, stdout + stderr).
fn check(yaml: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cfg.yaml");
    std::fs::write(&path, yaml).unwrap();
    let out = hookyard()
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    (out.status.code().unwrap_or(-1), text(&out))
}

const RULES: &str = "signing:\n  secrets: [\"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"]\nrouting_rules:\n  - event_type: a\n    mode: async\n    target: http://127.0.0.1:9/\n";

#[test]
fn an_open_admin_api_beyond_loopback_is_refused_unless_explicitly_allowed() {
    let open = format!("admin_listen: 0.0.0.0:9090\n{RULES}");
    let (code, out) = check(&open);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("cfg.yaml:1:15: admin_listen 0.0.0.0:9090 is not a loopback address and admin.token is not set"),
        "{out}"
    );
    let (code, out) = check(&format!(
        "admin_listen: 0.0.0.0:9090\nadmin:\n  token: \"${{HY_ADMIN_TOKEN}}\"\n{RULES}"
    ));
    assert_eq!(code, 0, "a token makes it fine: {out}");
    let allowed = format!(
        "admin_listen: 0.0.0.0:9090\nadmin:\n  allow_unauthenticated_remote: true\n{RULES}"
    );
    let (code, out) = check(&allowed);
    assert_eq!(code, 0, "{out}");

    // serve refuses too, with the same message and a non-zero exit, before binding anything.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cfg.yaml");
    std::fs::write(
        &path,
        format!(
            "listen: 127.0.0.1:0\nadmin_listen: 0.0.0.0:0\nstore:\n  path: {}\n{RULES}",
            dir.path().join("hy.db").display()
        ),
    )
    .unwrap();
    let out = hookyard()
        .env("RUST_LOG", "info")
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("is not a loopback address and admin.token is not set"),
        "{}",
        text(&out)
    );

    // Allowed explicitly, serve starts and says loudly that the admin API is open.
    std::fs::write(
        &path,
        format!(
            "listen: 127.0.0.1:0\nadmin_listen: 0.0.0.0:0\nadmin:\n  allow_unauthenticated_remote: true\nstore:\n  path: {}\n{RULES}",
            dir.path().join("hy.db").display()
        ),
    )
    .unwrap();
    let serve = Serve::start(dir.path(), &path, "human");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut log = String::new();
    while Instant::now() < deadline && !log.contains("hookyard is serving") {
        std::thread::sleep(Duration::from_millis(50));
        log = std::fs::read_to_string(&serve.log).unwrap_or_default();
    }
    let log = serve.stop();
    assert!(log.contains("hookyard is serving"), "{log}");
    assert!(
        log.contains("THE ADMIN API IS OPEN TO THE NETWORK WITHOUT A TOKEN"),
        "{log}"
    );
}

#[test]
fn config_errors_name_the_key_and_show_the_files_text_not_the_expansion() {
    // HY_BAD_PW holds the canary and a space: the expanded target is not a URL.
    let (code, out) = check(
        "signing:\n  secrets: [\"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"]\nrouting_rules:\n  - event_type: a\n    mode: async\n    target: http://127.0.0.1:9/\n  - event_type: b\n    mode: async\n    target: \"http://user:${HY_BAD_PW}@127.0.0.1:9/x\"\n",
    );
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(
            "cfg.yaml:9:13: routing_rules[1].target must be an absolute http:// or https:// URL"
        ),
        "{out}"
    );
    assert!(
        out.contains("9 |     target: \"http://user:${HY_BAD_PW}@127.0.0.1:9/x\""),
        "the snippet is the file's line: {out}"
    );
    assert_clean("check", &out);

    // A password written into the file itself: the position is shown, the line is not.
    let (code, out) = check(&format!(
        "signing:\n  secrets: [\"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"]\nrouting_rules:\n  - event_type: a\n    mode: async\n    target: \"ftp://user:{CANARY}@127.0.0.1:9/x\"\n"
    ));
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("cfg.yaml:6:13: routing_rules[0].target"),
        "{out}"
    );
    assert_clean("check (literal password)", &out);

    // A store URL that expands to something else entirely.
    let (code, out) = check(&format!(
        "store:\n  kind: redis\n  url: \"${{HY_REDIS_PW}}\"\n{RULES}"
    ));
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("store.url must start with redis://"), "{out}");
    assert_clean("check (store url)", &out);

    // An address variable that does not parse is quoted as written.
    let (code, out) = check(&format!("listen: \"${{HY_ADMIN_TOKEN}}\"\n{RULES}"));
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("not \"${HY_ADMIN_TOKEN}\" after ${VAR} expansion"),
        "{out}"
    );
    assert_clean("check (listen)", &out);
}

#[tokio::test]
async fn a_target_with_userinfo_is_delivered_with_basic_auth_and_shown_redacted() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A raw upstream that records the request head and answers 200.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<String>();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 65536];
        let mut seen = Vec::new();
        while !String::from_utf8_lossy(&seen).contains("\r\n\r\n{}") {
            let n = s.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
        }
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .await;
        let _ = tx.send(String::from_utf8_lossy(&seen).into_owned());
    });
    let hy = crate::util::Sidecar::start(&format!(
        "routing_rules:\n  - event_type: a\n    mode: sync\n    timeout_ms: 2000\n    target: \"http://hook:pa%20ss@{addr}/in?token=tok\"\n"
    ))
    .await;
    let answer = hy.post("a", "{}", &[]).await;
    assert_eq!(answer.status, 200);
    let head = rx.await.unwrap().to_lowercase();
    assert!(
        head.starts_with("post /in?token=tok http/1.1\r\n"),
        "{head}"
    );
    // base64("hook:pa ss")
    assert!(
        head.contains("\r\nauthorization: basic ag9vazpwysbzcw==\r\n"),
        "{head}"
    );
    assert!(head.contains(&format!("\r\nhost: {addr}\r\n")), "{head}");
    let config = String::from_utf8_lossy(&hy.admin_get("/v1/config").await.body).into_owned();
    assert!(
        config.contains(&format!("http://***@{addr}/in?token=***")),
        "{config}"
    );
    assert!(
        !config.contains("pa%20ss") && !config.contains("tok\""),
        "{config}"
    );
}
