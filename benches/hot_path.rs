//! Micro-benchmarks of the per-request hot path: rule lookup, delivery signing, and the
//! circuit breaker's cost per call under each policy.
//!
//! Only the public API is used: the rule table is compiled from a generated YAML config through
//! `hookyard::config::load_from_bytes`, exactly as `serve` and `check` compile the real file.
//!
//! Run: `cargo bench --bench hot_path` (add `-- --quick` for a fast smoke run).

use std::fmt::Write as _;
use std::hint::black_box;
use std::path::Path;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use hookyard::config::{BreakerPolicy, BreakerSettings};
use hookyard::routing::RuleTable;
use hookyard::signing::{Secret, SignatureScheme, Signer};
use hookyard::upstream::breaker::Breaker;

/// Number of service namespaces; each contributes exact rules and `prefix.*` rules.
const SERVICES: usize = 20;
/// Exact rules per service (`svcN.entityM.created`).
const EXACT_PER_SERVICE: usize = 7;
/// Prefix rules per service: `svcN.*` and `svcN.entityM.*` for a few entities.
const PREFIX_ENTITIES_PER_SERVICE: usize = 2;

/// Builds a config with `SERVICES * (EXACT + 1 + PREFIX_ENTITIES) + 1` rules (= 201), the last
/// one the `*` catch-all, and compiles it through the public loader.
fn rule_table() -> RuleTable {
    let mut yaml = String::from(
        "listen: 127.0.0.1:18080\n\
         admin_listen: 127.0.0.1:19090\n\
         signing:\n  secrets: [\"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"]\n\
         routing_rules:\n",
    );
    let mut rule = |event_type: &str, mode: &str| {
        let _ = write!(
            yaml,
            "  - event_type: \"{event_type}\"\n    mode: {mode}\n    \
             target: http://127.0.0.1:9000/hooks\n    timeout_ms: 1500\n"
        );
    };
    for s in 0..SERVICES {
        for e in 0..EXACT_PER_SERVICE {
            rule(&format!("svc{s}.entity{e}.created"), "sync");
        }
        rule(&format!("svc{s}.*"), "async");
        for e in 0..PREFIX_ENTITIES_PER_SERVICE {
            rule(&format!("svc{s}.entity{}.*", e + 100), "async");
        }
    }
    rule("*", "async");
    let settings =
        hookyard::config::load_from_bytes(Path::new("bench-config.yaml"), yaml.as_bytes())
            .unwrap_or_else(|e| panic!("generated bench config does not compile: {e}"));
    settings.rules
}

fn bench_routing(c: &mut Criterion) {
    let table = rule_table();
    assert!(
        table.len() >= 200,
        "expected ~200 rules, got {}",
        table.len()
    );

    // (label, event type, pattern that must win): checked once so the bench measures the
    // path it claims to measure.
    let cases = [
        (
            "exact_hit",
            "svc13.entity4.created",
            "svc13.entity4.created",
        ),
        // Longest-prefix hit two segments up: exact miss, `svc7.entity100.sub` miss,
        // then `svc7.entity100.*` hit.
        (
            "wildcard_hit",
            "svc7.entity100.sub.updated",
            "svc7.entity100.*",
        ),
        // Top-level prefix hit after three prefix probes.
        (
            "wildcard_hit_shallow",
            "svc19.entity5.child.deleted",
            "svc19.*",
        ),
        // Nothing matches: exact miss, every prefix probe misses, catch-all answers.
        ("miss_to_catch_all", "billing.invoice.line.finalized", "*"),
    ];
    let mut group = c.benchmark_group("route");
    for (label, event_type, expected) in cases {
        let got = table.route(event_type).map(|r| r.pattern.to_string());
        assert_eq!(got.as_deref(), Some(expected), "{label}: {event_type}");
        group.bench_with_input(BenchmarkId::from_parameter(label), event_type, |b, ty| {
            b.iter(|| table.route(black_box(ty)).map(|r| r.mode))
        });
    }
    group.finish();
}

fn signer(secrets: usize) -> Signer {
    let all = [
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD",
    ];
    Signer::new(
        all[..secrets]
            .iter()
            .map(|s| Secret::parse(s).expect("valid test secret"))
            .collect(),
    )
    .expect("at least one secret")
}

fn json_body(len: usize) -> Vec<u8> {
    // Valid JSON of exactly `len` bytes: {"data":"xxxx…"}.
    let overhead = r#"{"data":""}"#.len();
    let mut body = String::with_capacity(len);
    body.push_str(r#"{"data":""#);
    body.extend(std::iter::repeat_n('x', len - overhead));
    body.push_str(r#""}"#);
    assert_eq!(body.len(), len);
    body.into_bytes()
}

fn bench_signing(c: &mut Criterion) {
    let msg_id = "01J9ZQ3X8K7H2M4N6P8R0T2V4W";
    let ts: i64 = 1_735_689_600;
    let sizes = [("1KiB", 1024usize), ("64KiB", 64 * 1024)];

    let mut group = c.benchmark_group("sign");
    for (size_label, len) in sizes {
        let body = json_body(len);
        group.throughput(Throughput::Bytes(len as u64));
        for secrets in [1usize, 2] {
            let s = signer(secrets);
            group.bench_with_input(
                BenchmarkId::new(format!("standard_signature/{secrets}secret"), size_label),
                &body,
                |b, body| b.iter(|| s.standard_signature(black_box(msg_id), ts, black_box(body))),
            );
            group.bench_with_input(
                BenchmarkId::new(format!("headers_standard/{secrets}secret"), size_label),
                &body,
                |b, body| {
                    b.iter(|| {
                        s.headers(
                            SignatureScheme::StandardWebhooks,
                            black_box(msg_id),
                            ts,
                            black_box(body),
                        )
                    })
                },
            );
        }
        let s = signer(1);
        group.bench_with_input(
            BenchmarkId::new("legacy_signature", size_label),
            &body,
            |b, body| b.iter(|| s.legacy_signature(black_box(body))),
        );
        group.bench_with_input(
            BenchmarkId::new("headers_legacy", size_label),
            &body,
            |b, body| {
                b.iter(|| {
                    s.headers(
                        SignatureScheme::LegacyHmacSha256,
                        black_box(msg_id),
                        ts,
                        black_box(body),
                    )
                })
            },
        );
    }
    group.finish();
}

/// One admitted call and its verdict, on a closed breaker: what every delivery pays. `fail_every`
/// 5 is seed 000's 20% failure rate, which neither policy's default trips on (a strict one in
/// five never makes five in a row). The `2threads` rows run the same loop on two threads at
/// once, sharing the breaker, and report the time per call of one thread.
fn bench_breaker(c: &mut Criterion) {
    let policies = [
        ("failure_rate", BreakerSettings::default()),
        (
            "consecutive",
            BreakerSettings {
                policy: BreakerPolicy::Consecutive {
                    consecutive_failures: 5,
                },
                ..BreakerSettings::default()
            },
        ),
    ];
    let mut group = c.benchmark_group("breaker");
    for (name, settings) in policies {
        for (label, fail_every) in [("all_success", u64::MAX), ("20pct_failure", 5)] {
            let breaker = Breaker::new("bench:1".into(), settings);
            let mut n = 0u64;
            group.bench_function(BenchmarkId::new(name, label), |b| {
                b.iter(|| {
                    n += 1;
                    let ticket = breaker.admit().expect("never opens");
                    if n % fail_every == 0 {
                        ticket.failure()
                    } else {
                        ticket.success()
                    }
                })
            });
            let breaker = Breaker::new("bench:2".into(), settings);
            group.bench_function(BenchmarkId::new(name, format!("{label}_2threads")), |b| {
                b.iter_custom(|iters| {
                    let run = || {
                        let started = std::time::Instant::now();
                        for n in 1..=iters {
                            let ticket = breaker.admit().expect("never opens");
                            if n % fail_every == 0 {
                                ticket.failure()
                            } else {
                                ticket.success()
                            }
                        }
                        started.elapsed()
                    };
                    std::thread::scope(|s| {
                        let other = s.spawn(run);
                        let mine = run();
                        mine.max(other.join().expect("bench thread"))
                    })
                })
            });
            assert_eq!(breaker.state(), hookyard::circuit::BreakerState::Closed);
        }
    }
    group.finish();
}

criterion_group!(benches, bench_routing, bench_signing, bench_breaker);
criterion_main!(benches);
