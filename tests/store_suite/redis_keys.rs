//! Redis Cluster readiness of the Redis store's scripts, checked against a real server.
//!
//! `MONITOR` shows every command a script runs (client `lua`). The test drives each script
//! through the store's API, one step at a time with a marker between steps, asks Redis which
//! arguments of each command are keys (`COMMAND GETKEYS`), and fails when a script touches a
//! key that is neither among the `KEYS` it declared nor in the families its doc comment names
//! as found at run time, or any key without the store's hash tag.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hookyard::queue::redis::{RedisOptions, RedisStore};
use hookyard::queue::{
    Disposition, DlqFilter, FallbackReason, IdempotencyClaim, Ledger, NewEvent, Queue,
};

use super::cases::{attempt, event, LEASE, NO_LIMIT};
use super::redis_server::RedisServer;

const TAG: &str = "{kc}:";

/// `redis-cli monitor`, its lines gathered by a thread; killed on drop.
struct Monitor {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Monitor {
    fn start(port: u16) -> Monitor {
        let mut child = Command::new("redis-cli")
            .args(["-p", &port.to_string(), "monitor"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-cli monitor");
        let out = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Monitor { child, lines }
    }

    /// Waits until a line containing `needle` has arrived.
    fn wait_for(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self
            .lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains(needle))
        {
            assert!(Instant::now() < deadline, "monitor never showed {needle:?}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One `MONITOR` line: the client (`lua` inside scripts) and the command's arguments.
fn parse(line: &str) -> Option<(String, Vec<Vec<u8>>)> {
    let open = line.find('[')?;
    let close = line[open..].find(']')? + open;
    let client = line[open + 1..close].split(' ').nth(1)?.to_owned();
    let mut args = Vec::new();
    let mut chars = line[close + 1..].bytes().peekable();
    while let Some(c) = chars.next() {
        if c != b'"' {
            continue;
        }
        let mut arg = Vec::new();
        while let Some(c) = chars.next() {
            match c {
                b'"' => break,
                b'\\' => match chars.next()? {
                    b'n' => arg.push(b'\n'),
                    b'r' => arg.push(b'\r'),
                    b't' => arg.push(b'\t'),
                    b'a' => arg.push(7),
                    b'b' => arg.push(8),
                    b'x' => {
                        let hex = [chars.next()?, chars.next()?];
                        arg.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
                    }
                    other => arg.push(other),
                },
                other => arg.push(other),
            }
        }
        args.push(arg);
    }
    Some((client, args))
}

/// The keys among a command's arguments, as Redis itself names them.
async fn keys_of(
    conn: &mut ::redis::aio::MultiplexedConnection,
    args: &[Vec<u8>],
) -> Result<Vec<String>, ::redis::RedisError> {
    let mut cmd = ::redis::cmd("COMMAND");
    cmd.arg("GETKEYS");
    for a in args {
        cmd.arg(&a[..]);
    }
    cmd.query_async::<Vec<String>>(conn).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_script_declares_its_keys_and_all_share_the_hash_tag() {
    let Some(server) = RedisServer::start("redis_keys::every_script_declares_its_keys") else {
        return;
    };
    let client = ::redis::Client::open(server.url()).unwrap();
    let mut raw = client.get_multiplexed_async_connection().await.unwrap();
    let monitor = Monitor::start(server.port);
    // MONITOR is live once it shows a command sent after it started.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let _: String = ::redis::cmd("ECHO")
            .arg("start")
            .query_async(&mut raw)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        if monitor
            .lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("\"start\""))
        {
            break;
        }
        assert!(Instant::now() < deadline, "redis-cli monitor never started");
    }
    let store = RedisStore::open(
        &server.url(),
        RedisOptions {
            key_prefix: "kc".into(),
            ..RedisOptions::default()
        },
    )
    .await
    .unwrap();

    // Each step: a name, the key families (after the tag) its scripts may find at run time
    // without declaring them, and what it does. A marker closes each step.
    let mut steps: Vec<(&str, &[&str])> = Vec::new();
    let mut mark = |name: &'static str, found: &'static [&'static str]| {
        steps.push((name, found));
        name
    };
    let t = 1_000_000;
    let echo = |name: &str| ::redis::cmd("ECHO").arg(format!("step:{name}")).clone();

    // Enqueue: plain, delayed, idempotent with a fallback, two of one ordering key.
    store
        .enqueue(event("e1", "t", "q", t), None, NO_LIMIT)
        .await
        .unwrap();
    let mut delayed = event("e2", "t", "q", t);
    delayed.due_at_ms = t + 10;
    store.enqueue(delayed, None, NO_LIMIT).await.unwrap();
    let mut idem = event("e3", "t", "q", t);
    idem.event.idempotency_key = Some("k".into());
    idem.fallback = Some(FallbackReason::Timeout);
    let claim = IdempotencyClaim {
        event_type: "t".into(),
        key: "k".into(),
        expires_at_ms: t + 60_000,
    };
    store.enqueue(idem, Some(claim), NO_LIMIT).await.unwrap();
    let keyed = |id: &str| -> NewEvent {
        let mut e = event(id, "t", "q", t);
        e.ordering_key = Some("acct".into());
        e
    };
    store.enqueue(keyed("o1"), None, NO_LIMIT).await.unwrap();
    store.enqueue(keyed("o2"), None, NO_LIMIT).await.unwrap();
    let _: String = echo(mark("enqueue", &[]))
        .query_async(&mut raw)
        .await
        .unwrap();

    // Claim everything due (ready entries, and the delayed one moved to the stream).
    let claimed = store.claim_due("q", t + 20, 10, LEASE).await.unwrap();
    assert_eq!(claimed.len(), 4, "{claimed:?}");
    let _: String = echo(mark("claim", &["ev:", "att:", "okh:"]))
        .query_async(&mut raw)
        .await
        .unwrap();

    // Complete: delivered, retry, deferred by a breaker, dead; the keyed head hands over.
    let by_id = |id: &str| claimed.iter().find(|e| e.event.id == id).unwrap().clone();
    let now = t + 30;
    let (e1, e2, e3, o1) = (by_id("e1"), by_id("e2"), by_id("e3"), by_id("o1"));
    let a = || Some(attempt(1, now, Some(500), None));
    assert!(store
        .complete(
            &e1.event.id,
            &e1.lease_token,
            a(),
            Disposition::Delivered,
            now
        )
        .await
        .unwrap());
    let retry = Disposition::Retry { due_at_ms: now + 5 };
    assert!(store
        .complete(&e2.event.id, &e2.lease_token, a(), retry, now)
        .await
        .unwrap());
    let defer = Disposition::Defer {
        due_at_ms: now + 60_000,
        breaker: Some("host-a".into()),
    };
    assert!(store
        .complete(&e3.event.id, &e3.lease_token, None, defer, now)
        .await
        .unwrap());
    let dead = Disposition::DeadLetter {
        reason: "gone".into(),
    };
    let next = store
        .complete_and_take_next(&o1.event.id, &o1.lease_token, a(), dead, now, LEASE)
        .await
        .unwrap();
    let o2 = next.next.expect("the key's next event is handed over");
    let _: String = echo(mark("complete", &["q:", "okh:", "ev:"]))
        .query_async(&mut raw)
        .await
        .unwrap();

    store.undefer("host-a", now).await.unwrap();
    store.undefer_all(now).await.unwrap();
    let _: String = echo(mark("undefer", &["ev:", "q:"]))
        .query_async(&mut raw)
        .await
        .unwrap();

    store
        .release(vec![(o2.event.id.clone(), o2.lease_token.clone())], now)
        .await
        .unwrap();
    let _: String = echo(mark("release", &["q:"]))
        .query_async(&mut raw)
        .await
        .unwrap();

    // Leases that ran out (by the caller's clock) are leased again; the group lost and
    // recreated (NOGROUP) on the way.
    let _: () = ::redis::cmd("DEL")
        .arg(format!("{TAG}q:q:ready"))
        .query_async(&mut raw)
        .await
        .unwrap();
    let again = store.claim_due("q", now + 10, 10, 1).await.unwrap();
    assert!(!again.is_empty());
    let expired = store.claim_due("q", now + 100, 10, LEASE).await.unwrap();
    assert!(!expired.is_empty());
    let _: String = echo(mark("claim again", &["ev:", "att:", "okh:"]))
        .query_async(&mut raw)
        .await
        .unwrap();

    let replayed = store.replay(vec!["o1".into()], now + 200).await.unwrap();
    assert_eq!(replayed, ["o1"]);
    let _: String = echo(mark("replay", &["q:", "okh:"]))
        .query_async(&mut raw)
        .await
        .unwrap();

    store.stats("q", now).await.unwrap();
    store.next_due_at("q").await.unwrap();
    let _: String = echo(mark("gauges", &["ev:"]))
        .query_async(&mut raw)
        .await
        .unwrap();

    store.purge(i64::MAX / 2, now).await.unwrap();
    let _: String = echo(mark("purge", &["ev:", "att:", "q:"]))
        .query_async(&mut raw)
        .await
        .unwrap();
    // Reads outside scripts, for completeness of the tag check.
    store.event("e1").await.unwrap();
    store
        .list_dead_letters(DlqFilter::default(), None, 10)
        .await
        .unwrap();
    store.fallbacks(0, 10).await.unwrap();
    let _: String = echo(mark("reads", &[]))
        .query_async(&mut raw)
        .await
        .unwrap();
    monitor.wait_for("step:reads");
    let lines = monitor.lines.lock().unwrap().clone();

    let mut problems = Vec::new();
    let mut group: Vec<(String, Vec<Vec<u8>>)> = Vec::new();
    let mut steps = steps.into_iter();
    let mut checked_script_commands = 0;
    let first = lines.iter().rposition(|l| l.contains("\"start\"")).unwrap();
    for line in &lines[first + 1..] {
        let Some((client, args)) = parse(line) else {
            continue;
        };
        let is_marker = args
            .first()
            .is_some_and(|c| c.eq_ignore_ascii_case(b"ECHO"))
            && args.get(1).is_some_and(|a| a.starts_with(b"step:"));
        if !is_marker {
            group.push((client, args));
            continue;
        }
        let (step, found) = steps.next().expect("a marker per step");
        let mut declared = Vec::new();
        for (client, args) in &group {
            if client == "lua" {
                continue;
            }
            // Redis refuses GETKEYS only for keyless commands (PING, ECHO, SCRIPT LOAD...).
            let keys = keys_of(&mut raw, args).await.unwrap_or_default();
            for k in &keys {
                if !k.starts_with(TAG) {
                    problems.push(format!(
                        "{step}: key {k:?} of {:?} lacks the hash tag",
                        String::from_utf8_lossy(&args[0])
                    ));
                }
            }
            if args[0].eq_ignore_ascii_case(b"EVALSHA") || args[0].eq_ignore_ascii_case(b"EVAL") {
                declared.extend(keys);
            }
        }
        for (client, args) in &group {
            if client != "lua" {
                continue;
            }
            checked_script_commands += 1;
            let name = String::from_utf8_lossy(&args[0]).into_owned();
            // Every command a script runs names keys; a refusal would hide them.
            let keys = keys_of(&mut raw, args)
                .await
                .unwrap_or_else(|e| panic!("COMMAND GETKEYS {name}: {e}"));
            for k in keys {
                let family_ok = k
                    .strip_prefix(TAG)
                    .is_some_and(|rest| found.iter().any(|f| rest.starts_with(f)));
                if !k.starts_with(TAG) {
                    problems.push(format!(
                        "{step}: a script touched {k:?}, which lacks the hash tag"
                    ));
                } else if !declared.contains(&k) && !family_ok {
                    problems.push(format!(
                        "{step}: a script ran {} on {k:?} without declaring it",
                        String::from_utf8_lossy(&args[0])
                    ));
                }
            }
        }
        group.clear();
    }
    assert!(steps.next().is_none(), "every step's marker was seen");
    // Guards the test itself: it saw the scripts' own commands.
    assert!(checked_script_commands > 40, "{checked_script_commands}");
    problems.sort();
    problems.dedup();
    assert!(problems.is_empty(), "{problems:#?}");
}
