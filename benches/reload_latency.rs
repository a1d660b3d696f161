//! Reload latency: from writing the config file to the new rules being in force.
//!
//! Starts hookyard in-process on a temp config, then 50 times rewrites the file with a changed
//! rule and polls the dispatcher's snapshot (the same `Arc` the request path reads) until the new
//! content hash is in force. Prints min / p50 / p95 / max. The file watcher's debounce
//! (`config::watch::DEBOUNCE`, 50 ms) is part of what is measured, as a user would see it.
//!
//! Run: `cargo bench --bench reload_latency`

use std::time::{Duration, Instant};

fn main() {
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    runtime.block_on(measure());
}

async fn measure() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("dispatcher-config.yaml");
    let config = |timeout: u32| {
        format!(
            "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\nstore:\n  path: {}\nsigning:\n  secrets: [\"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"]\nrouting_rules:\n  - event_type: a.b\n    mode: sync\n    target: http://127.0.0.1:9/\n    timeout_ms: {timeout}\n",
            dir.path().join("db").display()
        )
    };
    std::fs::write(&path, config(1000)).expect("write config");
    let settings = hookyard::config::load(&path).expect("valid config");
    let server = hookyard::server::start(path.clone(), settings)
        .await
        .expect("server starts");
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this as a quick smoke test.
    let rounds = if std::env::args().any(|a| a == "--bench") {
        50
    } else {
        3
    };
    let mut samples = Vec::new();
    for i in 0..rounds {
        let before = server.context.snapshot().settings.content_hash.clone();
        let started = Instant::now();
        std::fs::write(&path, config(1001 + i)).expect("rewrite config");
        loop {
            if server.context.snapshot().settings.content_hash != before {
                break;
            }
            if started.elapsed() > Duration::from_secs(5) {
                panic!("reload {i} not applied within 5 s");
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        samples.push(started.elapsed());
        // Let the watcher go quiet so each sample is one isolated change.
        tokio::time::sleep(Duration::from_millis(120)).await;
    }
    samples.sort();
    let pick = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    println!(
        "reload latency (file write -> rules in force), {} samples: min {:?}  p50 {:?}  p95 {:?}  max {:?}",
        samples.len(),
        samples[0],
        pick(0.5),
        pick(0.95),
        samples[samples.len() - 1]
    );
    server.shutdown().await;
}
