//! Metrics people can alert on from minute one: a real `hookyard serve` child, scraped before
//! it has seen any traffic, exports every family with HELP text and only the label sets its
//! rules can produce; the Grafana dashboard queries only names in that scrape.

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::util::{config_yaml, eventually, http_client, send, upstream, HttpClient};

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A fresh `hookyard serve` process (its own metrics recorder, unlike the in-process sidecars
/// the other tests share one with).
struct Fresh {
    _proc: Proc,
    dir: tempfile::TempDir,
    admin: String,
    ingress: String,
    client: HttpClient,
    ports: String,
}

impl Fresh {
    async fn start(rest: &str) -> Fresh {
        let dir = tempfile::tempdir().unwrap();
        let (ingress, admin) = (upstream::closed_port(), upstream::closed_port());
        let ports = format!("listen: {ingress}\nadmin_listen: {admin}");
        let config = dir.path().join("cfg.yaml");
        write_config(dir.path(), &ports, rest);
        let proc = Proc(
            Command::new(env!("CARGO_BIN_EXE_hookyard"))
                .args(["serve", "--config"])
                .arg(&config)
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let f = Fresh {
            _proc: proc,
            dir,
            admin: format!("http://{admin}"),
            ingress: format!("http://{ingress}"),
            client: http_client(),
            ports,
        };
        eventually(Duration::from_secs(10), "sidecar up", async || {
            let req = http::Request::get(format!("{}/healthz", f.admin))
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap();
            matches!(f.client.request(req).await, Ok(r) if r.status() == 200)
        })
        .await;
        f
    }

    /// Rewrites the config file (to reload).
    fn write_config(&self, rest: &str) {
        write_config(self.dir.path(), &self.ports, rest);
    }

    async fn scrape(&self) -> String {
        let a = send(
            &self.client,
            "GET",
            &format!("{}/metrics", self.admin),
            &[],
            "",
        )
        .await;
        assert_eq!(a.status, 200);
        String::from_utf8(a.body.to_vec()).unwrap()
    }
}

/// Writes `dir/cfg.yaml`: [`config_yaml`] on the fixed `ports`.
fn write_config(dir: &std::path::Path, ports: &str, rest: &str) {
    let config =
        config_yaml(dir, rest).replace("listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0", ports);
    std::fs::write(dir.join("cfg.yaml"), config).unwrap();
}

/// One sample: metric name and labels.
type Series = (String, BTreeMap<String, String>);

/// Every sample of a Prometheus text scrape with its value.
fn samples(text: &str) -> Vec<(Series, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap();
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split("\",")
                .filter(|kv| !kv.is_empty())
                .map(|kv| {
                    let (k, v) = kv.split_once("=\"").unwrap();
                    (k.to_string(), v.trim_end_matches('"').to_string())
                })
                .collect();
            ((name.to_string(), labels), value.parse().unwrap())
        })
        .collect()
}

/// The label values of `label` over the samples of `name` whose labels include `filter`.
fn values(
    samples: &[(Series, f64)],
    name: &str,
    filter: &[(&str, &str)],
    label: &str,
) -> BTreeSet<String> {
    samples
        .iter()
        .filter(|((n, l), _)| {
            n == name
                && filter
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|((_, l), _)| l.get(label).cloned().unwrap_or_default())
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// The metric families the README's metrics paragraph lists.
fn readme_families() -> Vec<String> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme.find("\nMetrics (labels are bounded").unwrap();
    let end = start + readme[start..].find("A Grafana dashboard").unwrap();
    let mut families: Vec<String> = readme[start..end]
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|w| w.starts_with("hookyard_") || w.starts_with("process_"))
        .filter(|w| {
            w.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        })
        .map(str::to_string)
        .collect();
    families.sort();
    families.dedup();
    families
}

/// Three hosts: one only sync without fallback, one sync with fallback, one only async on a
/// named queue; no `*` rule. One failure opens a breaker.
fn three_hosts(sync_plain: &str, sync_fallback: &str, async_host: &str) -> String {
    format!(
        "hosts:
  default:
    circuit_breaker: {{ consecutive_failures: 1, recovery_ms: 600000 }}
routing_rules:
  - event_type: pay.plain
    mode: sync
    target: http://{sync_plain}/
    timeout_ms: 500
  - event_type: pay.fb
    mode: sync
    target: http://{sync_fallback}/
    timeout_ms: 500
    fallback: async_dlq
  - event_type: user.*
    mode: async
    target: http://{async_host}/
    queue: orders
"
    )
}

#[tokio::test]
async fn at_first_scrape_every_readme_family_exists_with_help_and_only_possible_labels() {
    let (a, b, c) = (
        upstream::closed_port(),
        upstream::closed_port(),
        upstream::closed_port(),
    );
    let (a, b, c) = (a.to_string(), b.to_string(), c.to_string());
    let hy = Fresh::start(&three_hosts(&a, &b, &c)).await;
    let text = hy.scrape().await;
    let s = samples(&text);

    let families = readme_families();
    assert!(
        families.len() >= 20,
        "README lists the families: {families:?}"
    );
    for family in &families {
        assert!(
            text.contains(&format!("# HELP {family} ")),
            "{family} has no HELP text:\n{text}"
        );
        assert!(
            s.iter().any(|((n, _), _)| n == family
                || *n == format!("{family}_bucket")
                || *n == format!("{family}_count")),
            "{family} is missing from the first scrape:\n{text}"
        );
    }
    // Every family in the scrape has HELP, not just the README's.
    for ((name, _), _) in &s {
        let family = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .filter(|f| text.contains(&format!("# TYPE {f} histogram")))
            .unwrap_or(name);
        assert!(
            text.contains(&format!("# HELP {family} ")),
            "{family} has no HELP"
        );
    }

    // build_info
    let info: Vec<_> = s
        .iter()
        .filter(|((n, _), _)| n == "hookyard_build_info")
        .collect();
    assert_eq!(info.len(), 1, "{text}");
    let ((_, labels), value) = info[0];
    assert_eq!(*value, 1.0);
    assert_eq!(labels["version"], env!("CARGO_PKG_VERSION"));
    assert!(!labels["commit"].is_empty());

    // events_received: exactly the outcomes each rule's mode can produce.
    let ev = "hookyard_events_received_total";
    assert_eq!(
        values(&s, ev, &[("event_type", "pay.plain")], "outcome"),
        set(&["delivered", "relayed_error", "failed"])
    );
    assert_eq!(
        values(&s, ev, &[("event_type", "pay.fb")], "outcome"),
        set(&[
            "delivered",
            "relayed_error",
            "failed",
            "fallback",
            "duplicate",
            "queue_full",
            "store_unavailable"
        ])
    );
    assert_eq!(
        values(&s, ev, &[("event_type", "user.*")], "outcome"),
        set(&["accepted", "duplicate", "queue_full", "store_unavailable"])
    );
    assert_eq!(
        values(&s, ev, &[("event_type", "pay.plain")], "mode"),
        set(&["sync"])
    );
    assert_eq!(
        values(&s, ev, &[("event_type", "user.*")], "mode"),
        set(&["async"])
    );
    assert_eq!(
        values(&s, ev, &[("event_type", "_unrouted")], "outcome"),
        set(&["no_route"])
    );
    assert_eq!(
        values(&s, ev, &[], "event_type"),
        set(&["pay.plain", "pay.fb", "user.*", "_unrouted"])
    );

    // delivery attempts: the modes in which each host can be called, every class.
    let at = "hookyard_delivery_attempts_total";
    let classes = set(&[
        "2xx", "redirect", "4xx", "5xx", "timeout", "connect", "reset",
    ]);
    assert_eq!(values(&s, at, &[("host", &a)], "mode"), set(&["sync"]));
    assert_eq!(
        values(&s, at, &[("host", &b)], "mode"),
        set(&["sync", "async"])
    );
    assert_eq!(values(&s, at, &[("host", &c)], "mode"), set(&["async"]));
    for (host, mode) in [(&a, "sync"), (&b, "sync"), (&b, "async"), (&c, "async")] {
        assert_eq!(
            values(&s, at, &[("host", host), ("mode", mode)], "class"),
            classes
        );
    }
    assert_eq!(
        values(&s, "hookyard_shed_total", &[], "host"),
        set(&[&a, &b]),
        "only sync calls are shed"
    );

    // Breakers: every host closed, every transition at zero.
    for host in [&a, &b, &c] {
        assert_eq!(
            values(&s, "hookyard_circuit_state", &[("host", host)], "host").len(),
            1
        );
        assert_eq!(
            values(
                &s,
                "hookyard_circuit_transitions_total",
                &[("host", host)],
                "to"
            ),
            set(&["closed", "open", "half_open"])
        );
    }
    assert_eq!(
        values(&s, "hookyard_fallback_total", &[], "reason"),
        set(&["timeout", "upstream_5xx", "circuit_open", "shed", "connect"])
    );
    assert_eq!(
        values(&s, "hookyard_deliveries_total", &[], "queue"),
        set(&["default", "orders"])
    );
    assert_eq!(
        values(&s, "hookyard_deliveries_total", &[], "result"),
        set(&["delivered", "dead_lettered"])
    );
    assert_eq!(
        values(&s, "hookyard_config_reload_total", &[], "result"),
        set(&["ok", "error"])
    );
    // No traffic: every hookyard counter is at zero.
    for ((name, labels), value) in &s {
        if name.starts_with("hookyard_") && name.ends_with("_total") {
            assert_eq!(*value, 0.0, "{name}{labels:?}");
        }
    }
    for process in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_start_time_seconds",
    ] {
        assert!(s.iter().any(|((n, _), _)| n == process), "{process}");
    }

    // Traffic moves the counters but adds no label set the rules cannot produce (the handles
    // taken at first use are as narrow as the ones registered at start).
    for event_type in ["pay.plain", "pay.fb", "user.created"] {
        let url = format!("{}/v1/events/{event_type}", hy.ingress);
        send(&hy.client, "POST", &url, &[], "{}").await;
    }
    let after = samples(&hy.scrape().await);
    let shape = |s: &[(Series, f64)]| -> BTreeSet<Series> {
        s.iter()
            .filter(|((n, _), _)| n.starts_with("hookyard_"))
            .map(|(series, _)| series.clone())
            .collect()
    };
    assert_eq!(shape(&after), shape(&s), "same series after traffic");
    let count = |s: &[(Series, f64)], event_type: &str, outcome: &str| {
        s.iter()
            .find(|((n, l), _)| n == ev && l["event_type"] == event_type && l["outcome"] == outcome)
            .map(|(_, v)| *v)
    };
    assert_eq!(count(&after, "pay.plain", "failed"), Some(1.0));
    assert_eq!(count(&after, "pay.fb", "fallback"), Some(1.0));
    assert_eq!(count(&after, "user.*", "accepted"), Some(1.0));
    let state = |s: &[(Series, f64)], host: &str| {
        s.iter()
            .find(|((n, l), _)| n == "hookyard_circuit_state" && l["host"] == host)
            .map(|(_, v)| *v)
    };
    assert_eq!(state(&after, &a), Some(1.0), "the refused call opened it");

    // A reload registers the new host at once; the dropped ones keep their (frozen) series.
    let d = upstream::closed_port().to_string();
    hy.write_config(&format!(
        "routing_rules:\n  - event_type: other\n    mode: sync\n    target: http://{d}/\n    timeout_ms: 500\n"
    ));
    let r = send(
        &hy.client,
        "POST",
        &format!("{}/v1/config/reload", hy.admin),
        &[],
        "",
    )
    .await;
    assert_eq!(r.status, 200);
    let s = samples(&hy.scrape().await);
    assert_eq!(
        values(
            &s,
            "hookyard_circuit_transitions_total",
            &[("host", &d)],
            "to"
        ),
        set(&["closed", "open", "half_open"])
    );
    assert_eq!(values(&s, at, &[("host", &d)], "mode"), set(&["sync"]));
    assert_eq!(
        values(&s, ev, &[("event_type", "other")], "outcome"),
        set(&["delivered", "relayed_error", "failed"])
    );
    assert_eq!(
        state(&s, &a),
        Some(0.0),
        "the dropped host's breaker is gone: its gauge no longer says open"
    );
    let ok = s
        .iter()
        .find(|((n, l), _)| n == "hookyard_config_reload_total" && l["result"] == "ok")
        .unwrap();
    assert_eq!(ok.1, 1.0);
}

#[tokio::test]
async fn every_metric_the_dashboard_queries_is_in_the_first_scrape_of_an_idle_sidecar() {
    let (a, b, c) = (
        upstream::closed_port().to_string(),
        upstream::closed_port().to_string(),
        upstream::closed_port().to_string(),
    );
    let hy = Fresh::start(&three_hosts(&a, &b, &c)).await;
    let scraped: BTreeSet<String> = samples(&hy.scrape().await)
        .into_iter()
        .map(|((name, _), _)| name)
        .collect();

    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/dashboards/hookyard.json"
    ))
    .unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let instance = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "instance")
        .expect("an instance variable");
    assert_eq!(
        instance["definition"],
        "label_values(hookyard_build_info, instance)"
    );
    let mut queried = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let words: Vec<&str> = expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|w| w.starts_with("hookyard_") || w.starts_with("process_"))
                .collect();
            assert!(!words.is_empty(), "{expr}");
            for name in words {
                assert!(
                    expr.contains(&format!("{name}{{instance=~\"$instance\"}}")),
                    "{name} in {expr} is not filtered by $instance"
                );
                assert!(
                    scraped.contains(name),
                    "the dashboard queries {name}, absent from an idle sidecar's first scrape"
                );
                queried.insert(name.to_string());
            }
        }
    }
    assert!(queried.contains("hookyard_circuit_state"));
}
