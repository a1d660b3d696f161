//! Hot reload: file watch (including editors that rename), bad files, and reloads under load.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::util::{eventually, receiver, send, Sidecar};

fn rule(mode: &str, target: &str) -> String {
    let timeout = if mode == "sync" {
        "    timeout_ms: 1000\n"
    } else {
        "    retry_matrix: [10, 10, 10]\n"
    };
    format!(
        "routing_rules:\n  - event_type: flip\n    mode: {mode}\n    target: {target}\n{timeout}"
    )
}

async fn last_reload(hy: &Sidecar) -> serde_json::Value {
    hy.admin_get("/v1/config").await.json()["last_reload"].clone()
}

async fn mode_of_flip(hy: &Sidecar) -> String {
    hy.admin_get("/v1/config").await.json()["rules"][0]["mode"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn a_changed_file_is_picked_up_without_a_signal() {
    let rx = receiver().await;
    let target = format!("http://{}/", rx.local_addr());
    let hy = Sidecar::start(&rule("sync", &target)).await;
    let text = std::fs::read_to_string(&hy.config_path).unwrap();
    std::fs::write(&hy.config_path, text.replace("mode: sync", "mode: async")).unwrap();
    eventually(Duration::from_secs(5), "file reload", async || {
        mode_of_flip(&hy).await == "async"
    })
    .await;
    assert_eq!(last_reload(&hy).await["trigger"], "file");
    assert_eq!(hy.post("flip", "{}", &[]).await.status, 202);
}

#[tokio::test]
async fn an_editor_that_writes_a_temp_file_and_renames_is_picked_up() {
    let rx = receiver().await;
    let target = format!("http://{}/", rx.local_addr());
    let hy = Sidecar::start(&rule("sync", &target)).await;
    let text = std::fs::read_to_string(&hy.config_path).unwrap();
    let tmp = hy.dir.path().join(".dispatcher-config.yaml.swp");
    std::fs::write(&tmp, text.replace("mode: sync", "mode: async")).unwrap();
    std::fs::rename(&tmp, &hy.config_path).unwrap();
    eventually(Duration::from_secs(5), "rename reload", async || {
        mode_of_flip(&hy).await == "async"
    })
    .await;
}

#[tokio::test]
async fn truncated_broken_and_deleted_files_keep_the_old_rules_until_a_good_file_returns() {
    let rx = receiver().await;
    let target = format!("http://{}/", rx.local_addr());
    let hy = Sidecar::start(&rule("sync", &target)).await;
    let good = std::fs::read_to_string(&hy.config_path).unwrap();
    let hash = hy.admin_get("/v1/config").await.json()["content_hash"].clone();

    let break_file = |what: &str| match what {
        "truncated" => std::fs::write(&hy.config_path, "").unwrap(),
        "syntax error" => {
            std::fs::write(&hy.config_path, good.replace("mode: sync", "mode: [sync")).unwrap()
        }
        _ => std::fs::remove_file(&hy.config_path).unwrap(),
    };
    for what in ["truncated", "syntax error", "deleted"] {
        break_file(what);
        eventually(Duration::from_secs(5), what, async || {
            last_reload(&hy).await["result"] == "error"
        })
        .await;
        assert!(last_reload(&hy).await["error"]
            .as_str()
            .unwrap()
            .contains("dispatcher-config.yaml"));
        assert_eq!(
            hy.post("flip", "{}", &[]).await.status,
            200,
            "old sync rule still serves after {what}"
        );
        assert_eq!(
            hy.admin_get("/v1/config").await.json()["content_hash"],
            hash,
            "{what}"
        );
        // The good file returns (recreated after the delete).
        std::fs::write(
            &hy.config_path,
            good.replace("timeout_ms: 1000", "timeout_ms: 999"),
        )
        .unwrap();
        eventually(
            Duration::from_secs(5),
            "good file picked up again",
            async || last_reload(&hy).await["result"] == "ok",
        )
        .await;
        std::fs::write(&hy.config_path, &good).unwrap();
        eventually(Duration::from_secs(5), "original restored", async || {
            hy.admin_get("/v1/config").await.json()["content_hash"] == hash
        })
        .await;
    }
    let metrics = hy.metrics().await;
    assert!(
        crate::util::metric_value(&metrics, "hookyard_config_reload_total{result=\"error\"}")
            .unwrap()
            >= 3.0
    );
}

#[tokio::test]
async fn twenty_reloads_under_steady_load_lose_nothing_and_each_request_sees_one_rule() {
    let a = receiver().await;
    let b = receiver().await;
    let sync_to_a = rule("sync", &format!("http://{}/a", a.local_addr()));
    let async_to_b = rule("async", &format!("http://{}/b", b.local_addr()));
    let hy = Arc::new(Sidecar::start(&sync_to_a).await);
    let head = std::fs::read_to_string(&hy.config_path)
        .unwrap()
        .replace(&sync_to_a, "");

    let done = Arc::new(AtomicBool::new(false));
    let mut senders = Vec::new();
    for worker in 0..4 {
        let (hy, done) = (hy.clone(), done.clone());
        senders.push(tokio::spawn(async move {
            let url = format!("{}/v1/events/flip", hy.ingress());
            let mut seen = Vec::new();
            let mut n = 0;
            while !done.load(Ordering::Acquire) {
                let body = format!("{worker}-{n}");
                let answer = send(&hy.client, "POST", &url, &[], body.clone()).await;
                seen.push((
                    body,
                    answer.status,
                    answer.header("x-dispatch-mode").map(str::to_string),
                ));
                n += 1;
            }
            seen
        }));
    }
    for i in 0..20 {
        let next = if i % 2 == 0 { &async_to_b } else { &sync_to_a };
        std::fs::write(&hy.config_path, format!("{head}{next}")).unwrap();
        let r = hy.admin_post("/v1/config/reload", "").await;
        assert_eq!(r.status, 200, "{}", r.json());
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    done.store(true, Ordering::Release);
    let mut sync_bodies = HashSet::new();
    let mut async_bodies = HashSet::new();
    for s in senders {
        for (body, status, mode) in s.await.unwrap() {
            match (status, mode.as_deref()) {
                (200, Some("sync")) => assert!(sync_bodies.insert(body)),
                (202, None) => assert!(async_bodies.insert(body)),
                other => panic!("request {body} failed during reloads: {other:?}"),
            }
        }
    }
    assert!(
        sync_bodies.len() > 20 && async_bodies.len() > 20,
        "both rules saw traffic: {} sync, {} async",
        sync_bodies.len(),
        async_bodies.len()
    );
    eventually(
        Duration::from_secs(10),
        "async events delivered",
        async || b.stats().delivered_ok as usize == async_bodies.len(),
    )
    .await;
    let at_a: HashSet<String> = a
        .requests()
        .iter()
        .map(|r| String::from_utf8_lossy(&r.body).into_owned())
        .collect();
    let at_b: HashSet<String> = b
        .requests()
        .iter()
        .map(|r| String::from_utf8_lossy(&r.body).into_owned())
        .collect();
    assert_eq!(
        at_a, sync_bodies,
        "every sync answer came from the old target, exactly"
    );
    assert_eq!(
        at_b, async_bodies,
        "every 202 was delivered to the new target, exactly"
    );
    assert_eq!(b.stats().duplicates_after_success, 0);
}

/// A Kubernetes ConfigMap volume: `config.yaml -> ..data/config.yaml`, `..data -> ..<stamp>/`.
/// An update writes a new stamped directory, points `..data_tmp` at it and renames `..data_tmp`
/// over `..data`; the file's own name never sees an event.
#[tokio::test]
async fn a_configmap_style_data_symlink_swap_is_picked_up() {
    use std::os::unix::fs::symlink;
    let rx = receiver().await;
    let target = format!("http://{}/", rx.local_addr());
    let dir = tempfile::tempdir().unwrap();
    let volume = dir.path().join("volume");
    std::fs::create_dir(&volume).unwrap();
    let data_dir = tempfile::tempdir().unwrap();
    let text = crate::util::config_yaml(data_dir.path(), &rule("sync", &target));
    let stamp = |n: u32, text: &str| {
        let d = volume.join(format!("..2026_12_03_00_00_0{n}.000"));
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("dispatcher-config.yaml"), text).unwrap();
        d.file_name().unwrap().to_os_string()
    };
    let first = stamp(1, &text);
    symlink(&first, volume.join("..data")).unwrap();
    let config_path = volume.join("dispatcher-config.yaml");
    symlink("..data/dispatcher-config.yaml", &config_path).unwrap();

    let settings = hookyard::config::load(&config_path).unwrap();
    let server = hookyard::server::start(config_path.clone(), settings)
        .await
        .unwrap();
    let hy = Sidecar {
        server: Some(server),
        dir: data_dir,
        config_path,
        client: crate::util::http_client(),
    };
    assert_eq!(mode_of_flip(&hy).await, "sync");

    let second = stamp(2, &text.replace("mode: sync", "mode: async"));
    symlink(&second, volume.join("..data_tmp")).unwrap();
    std::fs::rename(volume.join("..data_tmp"), volume.join("..data")).unwrap();
    std::fs::remove_dir_all(volume.join(&first)).unwrap();
    eventually(
        Duration::from_secs(5),
        "the ..data swap reloads",
        async || mode_of_flip(&hy).await == "async",
    )
    .await;
    assert_eq!(last_reload(&hy).await["trigger"], "file");
    drop(dir);
}

#[tokio::test]
async fn queue_concurrency_changes_live_in_both_directions() {
    let rx = crate::util::receiver_with(hookyard::receive::ReceiverConfig {
        delay: Duration::from_millis(150),
        ..Default::default()
    })
    .await;
    let target = format!("http://{}/", rx.local_addr());
    let hy = Sidecar::start(&format!(
        "queues:\n  default: {{ concurrency: 1 }}\n{}",
        rule("async", &target)
    ))
    .await;
    let burst = async |n: usize| {
        for _ in 0..n {
            assert_eq!(hy.post("flip", "{}", &[]).await.status, 202);
        }
    };
    let reload_with = |concurrency: u32| {
        let text = std::fs::read_to_string(&hy.config_path).unwrap();
        let at = text.find("concurrency: ").unwrap() + "concurrency: ".len();
        let end = at + text[at..].find(' ').unwrap();
        std::fs::write(
            &hy.config_path,
            format!("{}{concurrency}{}", &text[..at], &text[end..]),
        )
        .unwrap();
    };
    burst(4).await;
    eventually(Duration::from_secs(5), "four delivered", async || {
        rx.stats().delivered_ok == 4
    })
    .await;
    assert_eq!(rx.stats().max_concurrent, 1);

    reload_with(4);
    eventually(Duration::from_secs(5), "the reload", async || {
        last_reload(&hy).await["trigger"] == "file"
    })
    .await;
    burst(8).await;
    eventually(Duration::from_secs(5), "four at once", async || {
        rx.stats().max_concurrent == 4
    })
    .await;
    eventually(Duration::from_secs(5), "all delivered", async || {
        rx.stats().delivered_ok == 12
    })
    .await;

    let before = last_reload(&hy).await["at_ms"].clone();
    reload_with(1);
    eventually(Duration::from_secs(5), "the second reload", async || {
        last_reload(&hy).await["at_ms"] != before
    })
    .await;
    burst(6).await;
    let mut most = 0;
    while rx.stats().delivered_ok < 18 {
        most = most.max(rx.stats().in_flight);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(most, 1, "back to one at a time");
}

#[tokio::test]
async fn a_setting_that_needs_a_restart_is_reported_until_it_is_reverted() {
    let rx = receiver().await;
    let target = format!("http://{}/", rx.local_addr());
    let hy = Sidecar::start(&rule("sync", &target)).await;
    let good = std::fs::read_to_string(&hy.config_path).unwrap();
    let reload = async |text: &str| {
        std::fs::write(&hy.config_path, text).unwrap();
        let r = hy.admin_post("/v1/config/reload", "").await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        r.json()["report"]["needs_restart"].clone()
    };
    // One more event loop than the default (one per core).
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) + 1;
    let moved = good.replacen("listen: 127.0.0.1:0\n", "listen: 127.0.0.1:1\n", 1)
        + &format!("ingress: {{ threads: {threads} }}\n");
    assert_eq!(
        reload(&moved).await,
        serde_json::json!(["listen", "ingress.threads"])
    );
    // Reloading the same change again still says it (the process still runs the old values).
    assert_eq!(
        reload(&moved).await,
        serde_json::json!(["listen", "ingress.threads"])
    );
    assert_eq!(reload(&good).await, serde_json::json!([]), "reverted");
    assert!(
        hy.admin_get("/v1/config").await.json()["last_reload"]["needs_restart"]
            .as_array()
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn a_hosts_max_connections_changes_live_under_load_and_the_pool_shows_its_connections() {
    let rx = crate::util::receiver_with(hookyard::receive::ReceiverConfig {
        delay: Duration::from_millis(100),
        ..Default::default()
    })
    .await;
    let host = rx.local_addr().to_string();
    let target = format!("http://{host}/");
    let hy = Sidecar::start(&format!(
        "hosts:\n  default: {{ max_connections: 2 }}\nqueues:\n  default: {{ concurrency: 16 }}\n{}",
        rule("async", &target)
    ))
    .await;
    let burst = async |n: usize| {
        for _ in 0..n {
            assert_eq!(hy.post("flip", "{}", &[]).await.status, 202);
        }
    };
    burst(12).await;
    // While the gate is full, the pool holds two busy connections and workers wait for slots.
    let series =
        |state: &str| format!("hookyard_host_connections{{host=\"{host}\",state=\"{state}\"}}");
    eventually(Duration::from_secs(5), "two connections open", async || {
        crate::util::metric_value(&hy.metrics().await, &series("open")) == Some(2.0)
    })
    .await;
    let circuits = hy.admin_get("/v1/circuits").await.json();
    assert_eq!(circuits["hosts"][0]["connections"]["open"], 2, "{circuits}");

    let text = std::fs::read_to_string(&hy.config_path).unwrap();
    std::fs::write(
        &hy.config_path,
        text.replace("max_connections: 2", "max_connections: 6"),
    )
    .unwrap();
    eventually(Duration::from_secs(5), "the reload", async || {
        last_reload(&hy).await["trigger"] == "file"
    })
    .await;
    burst(24).await;
    eventually(Duration::from_secs(10), "all delivered", async || {
        rx.stats().delivered_ok == 36
    })
    .await;
    let stats = rx.stats();
    assert_eq!(stats.max_concurrent, 6, "the new cap, reached and kept");
    assert_eq!(
        stats.unique_ids, 36,
        "nothing dropped or sent twice: {stats:?}"
    );
    let metrics = hy.metrics().await;
    assert!(
        crate::util::metric_value(
            &metrics,
            &format!("hookyard_host_slot_waits_total{{host=\"{host}\"}}")
        )
        .is_some_and(|n| n > 0.0),
        "workers waited for slots while the cap was 2"
    );
    // Idle now: every open connection is idle in the pool.
    let open = crate::util::metric_value(&metrics, &series("open")).unwrap();
    let idle = crate::util::metric_value(&metrics, &series("idle")).unwrap();
    assert!(open >= 2.0 && idle == open, "open {open}, idle {idle}");
}
