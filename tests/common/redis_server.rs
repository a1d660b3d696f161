//! A throwaway `redis-server` for tests: its own free port, its own temp directory, AOF on
//! (`appendfsync always`, the setting that matches hookyard's no-loss promise), killed on drop.
//!
//! When `redis-server` is not on PATH, [`RedisServer::start`] prints why the test is skipped
//! and returns `None`, unless `HOOKYARD_REQUIRE_REDIS=1`, which turns the skip into a failure
//! (CI sets it, so a missing install cannot pass silently).

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `redis-server` child process.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

/// Whether a missing redis-server fails the test instead of skipping it.
pub fn redis_required() -> bool {
    std::env::var("HOOKYARD_REQUIRE_REDIS").is_ok_and(|v| v == "1")
}

fn on_path() -> bool {
    Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local addr").port()
}

/// True when something on `port` answers `PING` with `+PONG`.
pub fn answers_ping(port: u16) -> bool {
    let Ok(mut s) =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200))
    else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

impl RedisServer {
    /// Starts a server, or returns `None` (after printing why) when redis-server is missing
    /// and `HOOKYARD_REQUIRE_REDIS` is not `1`.
    pub fn start(test: &str) -> Option<RedisServer> {
        if !on_path() {
            let why = "redis-server is not on PATH (install it: apt-get install -y redis-server)";
            if redis_required() {
                panic!("{test}: {why}, and HOOKYARD_REQUIRE_REDIS=1 forbids skipping");
            }
            eprintln!("SKIPPED {test}: {why}; set HOOKYARD_REQUIRE_REDIS=1 to make this a failure");
            return None;
        }
        let dir = tempfile::tempdir().expect("temp dir for redis");
        let mut server = RedisServer {
            child: None,
            port: free_port(),
            dir,
        };
        server.spawn();
        Some(server)
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("redis.log")).expect("redis log");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(self.dir.path())
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .stdout(Stdio::from(log))
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !answers_ping(self.port) {
            if Instant::now() > deadline {
                panic!(
                    "redis-server on port {} did not answer PING within 10 s; log:\n{}",
                    self.port,
                    std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILLs the server (a crash: nothing is flushed beyond what AOF already has).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `signal` (`"STOP"`, `"CONT"`) to the server process.
    fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("redis-server is running");
        let ok = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(child.id().to_string())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -{signal} redis-server");
    }

    /// Freezes the server (SIGSTOP): connections stay open, commands queue up unanswered, as
    /// on a stalled host or a long fork.
    pub fn freeze(&self) {
        self.signal("STOP");
    }

    /// Lets a frozen server run again (SIGCONT); it then runs what queued up meanwhile.
    pub fn thaw(&self) {
        self.signal("CONT");
    }

    /// Starts the server again on the same port and directory (it reloads the AOF).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// The data directory (AOF lives here).
    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // A frozen process ignores SIGKILL only until it is continued; continue it first so
        // the kill below is not left pending behind the stop.
        if let Some(child) = &self.child {
            let _ = Command::new("kill")
                .arg("-CONT")
                .arg(child.id().to_string())
                .status();
        }
        self.kill();
    }
}
