//! What ordering keys cost: async deliveries per second with 1, 100 and 10,000 distinct keys
//! against unkeyed delivery, measured in the same run.
//!
//! Each run preloads `N` events straight into a fresh store (so accepting them is not part of
//! what is measured), starts hookyard in-process on it with a verifying receiver on loopback,
//! and times until the receiver has answered every event 2xx. The variants take turns, in a
//! rotated order each round, so a noisy neighbour on the shared machine hits them alike; the
//! ratio of each round is taken against that round's unkeyed run. With one key every delivery
//! waits for the one before it (claim, call, completion, release), so that variant runs
//! `N / 10` events.
//!
//! Run: `cargo bench --bench ordering_keys` (SQLite). `REDIS_URL=redis://127.0.0.1:6379` adds
//! the Redis store. Knobs: `N` (default 20000), `ROUNDS` (default 3).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use hookyard::queue::{Event, NewEvent, SignatureScheme, Store};
use hookyard::receive::{Receiver, ReceiverConfig};
use hookyard::signing::Secret;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const VARIANTS: [(&str, Option<usize>); 4] = [
    ("unkeyed", None),
    ("1 key", Some(1)),
    ("100 keys", Some(100)),
    ("10000 keys", Some(10_000)),
];

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this as a quick smoke test.
    let full = std::env::args().any(|a| a == "--bench");
    let n = if full { env_or("N", 20_000) } else { 200 };
    let rounds = if full { env_or("ROUNDS", 3) } else { 1 };
    let mut stores = vec![("sqlite", None)];
    if let Ok(url) = std::env::var("REDIS_URL") {
        stores.push(("redis", Some(url)));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    for (store, redis_url) in stores {
        runtime.block_on(measure(store, redis_url.as_deref(), n, rounds));
    }
}

async fn measure(store: &str, redis_url: Option<&str>, n: usize, rounds: usize) {
    // rates[variant][round], deliveries per second.
    let mut rates = vec![Vec::new(); VARIANTS.len()];
    for round in 0..rounds {
        for turn in 0..VARIANTS.len() {
            let v = (turn + round) % VARIANTS.len();
            let (name, keys) = VARIANTS[v];
            let events = if keys == Some(1) { (n / 10).max(20) } else { n };
            let prefix = format!("hyb{}r{round}v{v}", std::process::id());
            let took = run(redis_url, &prefix, keys, events).await;
            let rate = events as f64 / took.as_secs_f64();
            eprintln!("{store} round {round}: {name}: {events} in {took:.2?} = {rate:.0}/s");
            rates[v].push(rate);
        }
    }
    println!(
        "\nordering keys on {store}: {n} events per run (1 key: {}), {rounds} rounds",
        (n / 10).max(20)
    );
    println!("| variant | deliveries/s (median) | vs unkeyed, same round (median) |");
    println!("| --- | ---: | ---: |");
    for (v, (name, _)) in VARIANTS.iter().enumerate() {
        let ratios: Vec<f64> = rates[v]
            .iter()
            .zip(&rates[0])
            .map(|(r, unkeyed)| r / unkeyed)
            .collect();
        println!(
            "| {name} | {:.0} | {:.2}x |",
            median(rates[v].clone()),
            median(ratios)
        );
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Preloads `events` events (keyed round-robin over `keys` keys) and times their delivery.
async fn run(
    redis_url: Option<&str>,
    prefix: &str,
    keys: Option<usize>,
    events: usize,
) -> Duration {
    let receiver = Receiver::bind(
        "127.0.0.1:0".parse().unwrap(),
        ReceiverConfig {
            secrets: vec![Secret::parse(SECRET).unwrap()],
            remember_ids: events * 2 + 2,
            max_recorded: 0,
            ..Default::default()
        },
    )
    .await
    .expect("receiver binds");
    let dir = tempfile::tempdir().expect("temp dir");
    let store = match redis_url {
        Some(url) => format!("  kind: redis\n  url: {url}\n  key_prefix: {prefix}\n"),
        None => format!(
            "  kind: sqlite\n  path: {}\n",
            dir.path().join("hookyard.db").display()
        ),
    };
    let ordering = if keys.is_some() {
        "    ordering_key: header:X-Key\n"
    } else {
        ""
    };
    let yaml = format!(
        "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\nstore:\n{store}signing:\n  secrets: [\"{SECRET}\"]\nhosts:\n  default:\n    max_connections: 128\nqueues:\n  default: {{ concurrency: 64, max_depth: 10000000 }}\nrouting_rules:\n  - event_type: o\n    mode: async\n    target: http://{}/o\n{ordering}",
        receiver.local_addr()
    );
    let path = dir.path().join("dispatcher-config.yaml");
    std::fs::write(&path, yaml).expect("write config");
    let settings = hookyard::config::load(&path).expect("valid config");

    let store: Arc<dyn Store> = hookyard::queue::open(&settings.store)
        .await
        .expect("store opens");
    let now = hookyard::clock::now_ms();
    let target = format!("http://{}/o", receiver.local_addr());
    let enqueues = futures::stream::iter(0..events).map(|i| {
        let (store, target) = (store.clone(), target.clone());
        async move {
            let event = NewEvent {
                event: Event {
                    id: format!("evt_bench{i:09}"),
                    event_type: "o".into(),
                    body: bytes::Bytes::from(format!(r#"{{"n":{i}}}"#)),
                    content_type: Some("application/json".into()),
                    trace_id: format!("{i:032x}"),
                    idempotency_key: None,
                },
                queue: "default".into(),
                target,
                signature: SignatureScheme::StandardWebhooks,
                timeout_ms: 10_000,
                retry_delays_ms: vec![100; 10],
                jitter: 0.0,
                received_at_ms: now,
                due_at_ms: now,
                fallback: None,
                ordering_key: keys.map(|k| format!("k{}", i % k)),
            };
            store.enqueue(event, None, u64::MAX).await.expect("enqueue")
        }
    });
    // Many at once, so the store's group commit batches them.
    enqueues.buffer_unordered(512).collect::<Vec<_>>().await;
    store.close().await.expect("store closes");
    drop(store);

    let started = Instant::now();
    let server = hookyard::server::start(path, settings)
        .await
        .expect("hookyard starts");
    while receiver.stats().delivered_ok < events as u64 {
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "not delivered in 10 min"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let took = started.elapsed();
    server.shutdown().await;
    took
}
