//! Shared helpers: start hookyard with a config, send events, misbehaving upstreams.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hookyard::receive::{Receiver, ReceiverConfig};
use hookyard::server::RunningServer;
use hookyard::signing::Secret;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

/// The secret every test config signs with.
pub const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// A running sidecar with its temp directory (SQLite file inside).
pub struct Sidecar {
    pub server: Option<RunningServer>,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub client: HttpClient,
}

/// A test's HTTP client.
pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A client with a pool big enough for the concurrency tests.
pub fn http_client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(256)
        .build_http()
}

/// An answer read completely.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Answer {
    /// The body as JSON (panics with the body text if it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// The `event_id` of a 202 answer (panics with the body if there is none).
    pub fn event_id(&self) -> String {
        match self.json()["event_id"].as_str() {
            Some(id) => id.to_string(),
            None => panic!("no event_id in {}", String::from_utf8_lossy(&self.body)),
        }
    }

    /// A header as a string.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Sends a request and reads the whole answer.
pub async fn send(
    client: &HttpClient,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Answer {
    let mut builder = http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    let response = client
        .request(builder.body(Full::new(body.into())).unwrap())
        .await
        .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let (parts, body) = response.into_parts();
    Answer {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

/// A config: listeners on free ports, a SQLite file in `dir`, the test secret, and `rest`
/// (hosts, queues and routing_rules sections) appended.
pub fn config_yaml(dir: &std::path::Path, rest: &str) -> String {
    format!(
        "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\nstore:\n  kind: sqlite\n  path: {}\nsigning:\n  secrets: [\"{SECRET}\"]\n{rest}",
        dir.join("hookyard.db").display()
    )
}

impl Sidecar {
    /// Starts a sidecar on `rest` (see [`config_yaml`]).
    pub async fn start(rest: &str) -> Sidecar {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, rest).await
    }

    /// Starts a sidecar whose data lives in `dir`.
    pub async fn start_in(dir: tempfile::TempDir, rest: &str) -> Sidecar {
        let config_path = dir.path().join("dispatcher-config.yaml");
        std::fs::write(&config_path, config_yaml(dir.path(), rest)).unwrap();
        let settings = hookyard::config::load(&config_path).unwrap_or_else(|e| panic!("{e}"));
        let server = hookyard::server::start(config_path.clone(), settings)
            .await
            .unwrap();
        Sidecar {
            server: Some(server),
            dir,
            config_path,
            client: http_client(),
        }
    }

    pub fn server(&self) -> &RunningServer {
        self.server.as_ref().unwrap()
    }

    /// `http://127.0.0.1:port` of the ingress.
    pub fn ingress(&self) -> String {
        format!("http://{}", self.server().ingress_addr)
    }

    /// `http://127.0.0.1:port` of the admin API.
    pub fn admin(&self) -> String {
        format!("http://{}", self.server().admin_addr)
    }

    /// POSTs an event.
    pub async fn post(
        &self,
        event_type: &str,
        body: impl Into<Bytes>,
        headers: &[(&str, &str)],
    ) -> Answer {
        send(
            &self.client,
            "POST",
            &format!("{}/v1/events/{event_type}", self.ingress()),
            headers,
            body,
        )
        .await
    }

    /// GETs an admin path as JSON.
    pub async fn admin_get(&self, path: &str) -> Answer {
        send(
            &self.client,
            "GET",
            &format!("{}{path}", self.admin()),
            &[],
            "",
        )
        .await
    }

    /// POSTs to an admin path.
    pub async fn admin_post(&self, path: &str, body: &str) -> Answer {
        send(
            &self.client,
            "POST",
            &format!("{}{path}", self.admin()),
            &[],
            body.to_string(),
        )
        .await
    }

    /// Starts a bulk replay job (`POST /v1/dlq/replay{query}` with `body`), waits until it is
    /// no longer running and returns its last state.
    pub async fn replay_job(&self, query: &str, body: &str) -> Value {
        let started = self
            .admin_post(&format!("/v1/dlq/replay{query}"), body)
            .await;
        assert_eq!(started.status, 202, "{:?}", started.json());
        let id = started.json()["job_id"].as_str().unwrap().to_string();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let job = self.admin_get(&format!("/v1/jobs/{id}")).await;
            assert_eq!(job.status, 200);
            let job = job.json();
            if job["state"] != "running" {
                return job;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "job still running: {job}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The Prometheus text.
    pub async fn metrics(&self) -> String {
        String::from_utf8(self.admin_get("/metrics").await.body.to_vec()).unwrap()
    }

    /// Stops the sidecar gracefully.
    pub async fn stop(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown().await;
        }
    }
}

/// A verifying receiver with the test secret.
pub async fn receiver() -> Receiver {
    receiver_with(ReceiverConfig::default()).await
}

/// A verifying receiver with the test secret and `config`'s fault injection.
pub async fn receiver_with(mut config: ReceiverConfig) -> Receiver {
    config.secrets = vec![Secret::parse(SECRET).unwrap()];
    Receiver::bind("127.0.0.1:0".parse().unwrap(), config)
        .await
        .unwrap()
}

/// Runs the `hookyard` binary with `args` (without blocking the test's runtime, which may be
/// serving the sidecar it talks to) and returns (success, stdout, stderr).
pub async fn hookyard(args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_hookyard"))
        .args(args)
        .env_remove("HOOKYARD_ADMIN_URL")
        .env_remove("HOOKYARD_ADMIN_TOKEN")
        .output()
        .await
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Polls `check` every 10 ms until it returns true or `within` passes.
pub async fn eventually(within: Duration, what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out after {within:?} waiting for {what}");
}

/// The value of one sample in Prometheus text, e.g. `hookyard_shed_total{host="127.0.0.1:1"}`.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Misbehaving upstreams built on raw TCP, for failures a well-behaved server never shows.
pub mod upstream {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A port on which nothing listens (bound once, then released).
    pub fn closed_port() -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        addr
    }

    /// Accepts connections and reads requests but never answers. Returns the address and a
    /// counter of accepted connections.
    pub async fn stalling() -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    /// Answers each request with headers promising 1000 bytes, sends 10, then resets the
    /// connection (SO_LINGER 0 makes close send RST).
    pub async fn resetting_mid_body() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    if !next_request(&mut s, &mut Vec::new()).await {
                        return;
                    }
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n0123456789")
                        .await;
                    let _ = s.flush().await;
                    // Zero linger never blocks (the deprecation is about non-zero linger).
                    #[allow(deprecated)]
                    let _ = s.set_linger(Some(Duration::ZERO));
                    drop(s);
                });
            }
        });
        addr
    }

    /// Answers every request with `head` (status line and headers, without the blank line),
    /// a `content-length` of `body_len`, and that many bytes of body. Returns the address and
    /// a counter of requests answered.
    pub async fn answering(head: &'static str, body_len: usize) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let count = requests.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                let count = count.clone();
                tokio::spawn(async move {
                    let mut seen = Vec::new();
                    while next_request(&mut s, &mut seen).await {
                        count.fetch_add(1, Ordering::SeqCst);
                        let answer = format!("{head}\r\ncontent-length: {body_len}\r\n\r\n");
                        if s.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                        let chunk = vec![b'x'; 64 * 1024];
                        let mut left = body_len;
                        while left > 0 {
                            let n = left.min(chunk.len());
                            if s.write_all(&chunk[..n]).await.is_err() {
                                return;
                            }
                            left -= n;
                        }
                    }
                });
            }
        });
        (addr, requests)
    }

    /// Reads from `s` until `seen` holds a whole request (headers and `content-length` body),
    /// and takes that request out of `seen`; false once the client closes or fails.
    async fn next_request(s: &mut tokio::net::TcpStream, seen: &mut Vec<u8>) -> bool {
        let mut buf = vec![0u8; 65536];
        loop {
            if let Some(end) = find(seen, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&seen[..end]).to_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                if seen.len() >= end + 4 + len {
                    seen.drain(..end + 4 + len);
                    return true;
                }
            }
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    }

    fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
        hay.windows(needle.len()).position(|w| w == needle)
    }
}
