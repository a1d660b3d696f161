//! The edge under hostile and unlucky clients: stalled bodies, connection floods, many large
//! bodies at once, malformed headers. Each test uses real sockets; the descriptor-limit and
//! memory tests run a real `hookyard serve` child under `prlimit`.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::util::{config_yaml, eventually, http_client, receiver, send, upstream, Sidecar};

/// Headers of an event POST that declares `length` body bytes.
fn post_head(length: usize) -> String {
    format!("POST /v1/events/user.updated HTTP/1.1\r\nhost: hookyard\r\ncontent-length: {length}\r\n\r\n")
}

/// Reads until the server closes the connection or `within` passes; returns what was read.
async fn read_to_close(stream: &mut TcpStream, within: Duration) -> String {
    let mut got = Vec::new();
    let _ = tokio::time::timeout(within, stream.read_to_end(&mut got)).await;
    String::from_utf8_lossy(&got).into_owned()
}

/// True once the server has closed `stream` (EOF or reset) within `within`.
async fn is_closed(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(within, stream.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

fn async_rule(target: &str, edge: &str) -> String {
    format!("ingress: {{ {edge} }}\nrouting_rules:\n  - event_type: user.updated\n    mode: async\n    target: {target}\n")
}

#[tokio::test]
async fn a_stalled_body_gets_408_at_the_request_timeout_and_its_connection_closes() {
    let rx = receiver().await;
    let sidecar = Sidecar::start(&async_rule(
        &format!("http://{}/u", rx.local_addr()),
        "request_timeout_ms: 300",
    ))
    .await;
    let mut stalled = TcpStream::connect(sidecar.server().ingress_addr)
        .await
        .unwrap();
    let started = Instant::now();
    stalled.write_all(post_head(100).as_bytes()).await.unwrap();
    stalled.write_all(b"0123456789").await.unwrap();
    let answer = read_to_close(&mut stalled, Duration::from_secs(5)).await;
    let waited = started.elapsed();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(3),
        "answered after {waited:?}"
    );
    let metrics = sidecar.metrics().await;
    assert!(
        metrics.contains("hookyard_edge_refusals_total{reason=\"request_timeout\"} 1"),
        "{metrics}"
    );
    // A whole request is still served.
    assert_eq!(sidecar.post("user.updated", "{}", &[]).await.status, 202);
}

#[tokio::test]
async fn connections_past_max_connections_are_closed_at_once_until_one_closes() {
    let rx = receiver().await;
    let sidecar = Sidecar::start(&async_rule(
        &format!("http://{}/u", rx.local_addr()),
        "max_connections: 4",
    ))
    .await;
    let addr = sidecar.server().ingress_addr;
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut c = TcpStream::connect(addr).await.unwrap();
        // A request answered proves the connection was accepted and counted.
        c.write_all(b"GET /v1/events/x HTTP/1.1\r\nhost: h\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let n = c.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 405"));
        held.push(c);
    }
    let mut fifth = TcpStream::connect(addr).await.unwrap();
    let started = Instant::now();
    assert!(
        is_closed(&mut fifth, Duration::from_secs(2)).await,
        "the fifth connection is closed"
    );
    assert!(started.elapsed() < Duration::from_secs(1), "at once");

    held.pop();
    let client = http_client();
    let url = format!("{}/v1/events/user.updated", sidecar.ingress());
    eventually(Duration::from_secs(5), "a slot frees up", async || {
        let req = http::Request::post(&url)
            .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))
            .unwrap();
        matches!(client.request(req).await, Ok(r) if r.status() == 202)
    })
    .await;
    let metrics = sidecar.metrics().await;
    assert!(
        crate::util::metric_value(
            &metrics,
            "hookyard_edge_refusals_total{reason=\"max_connections\"}"
        )
        .is_some_and(|n| n >= 1.0),
        "{metrics}"
    );
}

#[tokio::test]
async fn bodies_past_the_buffered_budget_get_503_with_retry_after_until_memory_is_given_back() {
    let rx = receiver().await;
    let sidecar = Sidecar::start(&async_rule(
        &format!("http://{}/u", rx.local_addr()),
        "max_buffered_body_bytes: 100000, request_timeout_ms: 10000",
    ))
    .await;
    let addr = sidecar.server().ingress_addr;
    // One client declares a 90,000-byte body, sends part of it and stalls: the declared
    // length is held for it.
    let mut stalled = TcpStream::connect(addr).await.unwrap();
    stalled
        .write_all(post_head(90_000).as_bytes())
        .await
        .unwrap();
    stalled.write_all(&[b'x'; 1_000]).await.unwrap();
    let series = "hookyard_ingress_body_bytes_buffered";
    eventually(Duration::from_secs(3), "the body held", async || {
        crate::util::metric_value(&sidecar.metrics().await, series) == Some(90_000.0)
    })
    .await;
    let body = vec![b'y'; 20_000];
    let refused = sidecar.post("user.updated", body.clone(), &[]).await;
    assert_eq!(refused.status, 503);
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert_eq!(refused.json()["error"], "overloaded");

    // A chunked body (no declared length) is charged as it arrives, and refused too.
    let mut chunked = TcpStream::connect(addr).await.unwrap();
    chunked
        .write_all(b"POST /v1/events/user.updated HTTP/1.1\r\nhost: h\r\ntransfer-encoding: chunked\r\n\r\n4e20\r\n")
        .await
        .unwrap();
    chunked.write_all(&[b'z'; 20_000]).await.unwrap();
    chunked.write_all(b"\r\n0\r\n\r\n").await.unwrap();
    let answer = read_to_close(&mut chunked, Duration::from_secs(3)).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");

    // The stalled client leaves: its bytes are given back and the same body is accepted.
    drop(stalled);
    eventually(Duration::from_secs(3), "the body accepted", async || {
        sidecar.post("user.updated", body.clone(), &[]).await.status == 202
    })
    .await;
}

#[tokio::test]
async fn malformed_idempotency_keys_and_content_types_are_refused_with_400() {
    let rx = receiver().await;
    let sidecar = Sidecar::start(&async_rule(&format!("http://{}/u", rx.local_addr()), "")).await;
    for key in ["has space", "has\ttab"] {
        let a = sidecar
            .post("user.updated", "{}", &[("idempotency-key", key)])
            .await;
        assert_eq!(a.status, 400, "{key:?}");
        assert_eq!(a.json()["error"], "invalid_idempotency_key");
    }
    // hyper's client refuses to send a non-ASCII header value; raw bytes it is.
    let mut c = TcpStream::connect(sidecar.server().ingress_addr)
        .await
        .unwrap();
    c.write_all(
        b"POST /v1/events/user.updated HTTP/1.1\r\nhost: h\r\ncontent-type: text/plain; charset=\xc3\xa9\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}",
    )
    .await
    .unwrap();
    let answer = read_to_close(&mut c, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("invalid_content_type"), "{answer}");
    // A well-formed event still goes through, and only it is delivered.
    assert_eq!(sidecar.post("user.updated", "{}", &[]).await.status, 202);
    eventually(Duration::from_secs(5), "one delivery", async || {
        rx.stats().delivered_ok == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(rx.stats().delivered_ok, 1);
}

/// A `hookyard serve` child under `prlimit --nofile=N:N`, its stderr kept in a file.
struct Limited {
    child: Child,
    log: std::path::PathBuf,
}

impl Drop for Limited {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Limited {
    fn spawn(config: &std::path::Path, nofile: u32) -> Limited {
        let log = config.with_extension("log");
        let child = Command::new("prlimit")
            .arg(format!("--nofile={nofile}:{nofile}"))
            .arg("--")
            .arg(env!("CARGO_BIN_EXE_hookyard"))
            .args(["serve", "--log-format", "json", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("prlimit (util-linux) runs hookyard");
        Limited { child, log }
    }

    /// Peak resident memory (VmHWM) in KiB.
    fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    fn log_lines(&self) -> Vec<String> {
        BufReader::new(std::fs::File::open(&self.log).unwrap())
            .lines()
            .map_while(Result::ok)
            .collect()
    }
}

/// Starts a limited child on free ports with `edge` settings and an async rule to `target`;
/// returns it with its ingress and admin addresses once it is healthy.
async fn start_limited(
    dir: &std::path::Path,
    target: &str,
    edge: &str,
    nofile: u32,
) -> (Limited, std::net::SocketAddr, std::net::SocketAddr) {
    let ingress = upstream::closed_port();
    let admin = upstream::closed_port();
    let config = config_yaml(dir, &async_rule(target, edge)).replace(
        "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0",
        &format!("listen: {ingress}\nadmin_listen: {admin}"),
    );
    let path = dir.join("cfg.yaml");
    std::fs::write(&path, config).unwrap();
    let child = Limited::spawn(&path, nofile);
    let client = http_client();
    eventually(
        Duration::from_secs(10),
        "the child is healthy",
        async || {
            let req = http::Request::get(format!("http://{admin}/healthz"))
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap();
            matches!(client.request(req).await, Ok(r) if r.status() == 200)
        },
    )
    .await;
    (child, ingress, admin)
}

#[tokio::test]
async fn hundreds_of_stalled_bodies_under_a_256_descriptor_limit_do_not_starve_a_real_request() {
    const NOFILE: u32 = 256;
    const STALLED: usize = 300;
    let dir = tempfile::tempdir().unwrap();
    let rx = receiver().await;
    let (child, ingress, admin) = start_limited(
        dir.path(),
        &format!("http://{}/u", rx.local_addr()),
        "request_timeout_ms: 1000",
        NOFILE,
    )
    .await;

    // 300 clients send headers and the start of a body, then stall.
    let mut stalled = Vec::new();
    for _ in 0..STALLED {
        if let Ok(mut c) = TcpStream::connect(ingress).await {
            let _ = c.write_all(post_head(1000).as_bytes()).await;
            let _ = c.write_all(b"{\"partial\":").await;
            stalled.push(c);
        }
    }
    // A real caller, retrying a refused connection as any HTTP client would.
    let client = http_client();
    let url = format!("http://{ingress}/v1/events/user.updated");
    let started = Instant::now();
    let mut status = 0;
    while started.elapsed() < Duration::from_secs(5) {
        let req = http::Request::post(&url)
            .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))
            .unwrap();
        if let Ok(r) = client.request(req).await {
            status = r.status().as_u16();
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let waited = started.elapsed();
    eprintln!(
        "descriptor limit {NOFILE}, {STALLED} stalled connections: the real request waited {waited:?}, peak RSS {} KiB",
        child.peak_rss_kib()
    );
    assert_eq!(status, 202, "the real request is served");
    assert!(
        waited < Duration::from_millis(1000 + 1500),
        "served within the request timeout (plus scheduling): {waited:?}"
    );
    // The admin port was never starved either.
    let a = send(&client, "GET", &format!("http://{admin}/readyz"), &[], "").await;
    assert_eq!(a.status, 200);

    drop(stalled);
    let log = child.log_lines();
    assert!(
        !log.iter().any(|l| l.contains("Too many open files")),
        "accept never ran out of descriptors:\n{}",
        log.join("\n")
    );
    let plan = log
        .iter()
        .find(|l| l.contains("file descriptors"))
        .expect("the log says what limit it chose");
    assert!(plan.contains("\"soft_limit\":256"), "{plan}");
    assert!(plan.contains("\"max_connections\":128"), "{plan}");
}

#[tokio::test]
async fn many_large_bodies_at_once_are_held_to_the_body_budget() {
    const CLIENTS: usize = 100;
    const BODY: usize = 2_000_000;
    const BUDGET_MIB: u64 = 16;
    let dir = tempfile::tempdir().unwrap();
    let rx = receiver().await;
    let (child, ingress, _admin) = start_limited(
        dir.path(),
        &format!("http://{}/u", rx.local_addr()),
        &format!(
            "request_timeout_ms: 10000, max_buffered_body_bytes: {}",
            BUDGET_MIB * 1024 * 1024
        ),
        4096,
    )
    .await;
    let before = child.peak_rss_kib();
    // Each client sends all but the last byte of a 2 MB body, then stalls.
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        tasks.push(tokio::spawn(async move {
            let mut c = TcpStream::connect(ingress).await.unwrap();
            let chunk = vec![b'x'; 64 * 1024];
            let send = async {
                c.write_all(post_head(BODY).as_bytes()).await?;
                let mut sent = 0;
                while sent < BODY - 1 {
                    let n = chunk.len().min(BODY - 1 - sent);
                    c.write_all(&chunk[..n]).await?;
                    sent += n;
                }
                std::io::Result::Ok(())
            };
            let _ = tokio::time::timeout(Duration::from_secs(3), send).await;
            c
        }));
    }
    let mut held = Vec::new();
    for t in tasks {
        held.push(t.await.unwrap());
    }
    let peak = child.peak_rss_kib();
    let grown_mib = peak.saturating_sub(before) / 1024;
    eprintln!(
        "{CLIENTS} clients x {BODY} bytes against a {BUDGET_MIB} MiB budget: peak RSS {before} -> {peak} KiB (+{grown_mib} MiB)"
    );
    drop(held);
    // Unbounded, the bodies alone would be ~190 MiB.
    assert!(
        grown_mib < BUDGET_MIB * 4,
        "memory grew by {grown_mib} MiB against a {BUDGET_MIB} MiB budget"
    );
}
