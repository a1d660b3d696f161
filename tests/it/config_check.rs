//! `hookyard check` and the config validator: every kind of mistake names file, line, column.

use std::process::Command;

fn check(yaml: &str) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cfg.yaml");
    std::fs::write(&path, yaml).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_hookyard"))
        .args(["check", "--config"])
        .arg(&path)
        .env_remove("HOOKYARD_SECRET")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).replace(&path.display().to_string(), "cfg.yaml"),
    )
}

const HEAD: &str = "signing:\n  secrets: [\"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"]\n";

fn rules(body: &str) -> String {
    format!("{HEAD}routing_rules:\n{body}")
}

/// Asserts a rejected config reports `message` at `line:column` with a snippet.
fn rejects(yaml: &str, line_col: &str, message: &str) {
    let (code, _, err) = check(yaml);
    assert_eq!(code, 1, "expected exit 1 for:\n{yaml}\nstderr:\n{err}");
    let header = format!("cfg.yaml:{line_col}: ");
    let found = err
        .lines()
        .any(|l| l.contains(&header) && l.contains(message));
    assert!(found, "expected `{header}...{message}` in:\n{err}");
    assert!(err.contains(" | "), "snippet missing:\n{err}");
}

#[test]
fn shipped_config_checks_and_prints_the_rule_table() {
    let out = Command::new(env!("CARGO_BIN_EXE_hookyard"))
        .args([
            "check",
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/dispatcher-config.yaml"),
        ])
        .env_remove("HOOKYARD_SECRET")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("EVENT TYPE"));
    let row = table
        .lines()
        .find(|l| l.starts_with("payment.authorize"))
        .unwrap();
    for cell in ["sync", "127.0.0.1:9000", "1500ms", "async_dlq"] {
        assert!(row.contains(cell), "{cell} missing from {row}");
    }
    assert!(table.lines().any(|l| l.starts_with("user.profile.updated")
        && l.contains("profile_events_v2")
        && l.contains(" 6")));
}

#[test]
fn unknown_keys_are_errors() {
    rejects(
        &rules("  - event_type: a\n    mode: async\n    target: http://h:1/\n    colour: blue\n"),
        "7:5",
        "unknown field `colour`",
    );
    rejects(
        &format!("{HEAD}listn: 1\nrouting_rules: []\n"),
        "3:1",
        "unknown field `listn`",
    );
}

#[test]
fn bad_urls_are_errors() {
    rejects(
        &rules("  - event_type: a\n    mode: async\n    target: ftp://h/x\n"),
        "6:13",
        "scheme must be http or https",
    );
    rejects(
        &rules("  - event_type: a\n    mode: async\n    target: not a url\n"),
        "6:13",
        "target must be an absolute",
    );
    rejects(
        &rules("  - event_type: a\n    mode: async\n    target: /relative\n"),
        "6:13",
        "target must be an absolute",
    );
}

#[test]
fn zero_or_negative_timeouts_are_errors() {
    rejects(
        &rules("  - event_type: a\n    mode: sync\n    target: http://h:1/\n    timeout_ms: 0\n"),
        "7:17",
        "timeout_ms must be greater than 0",
    );
    rejects(
        &rules("  - event_type: a\n    mode: sync\n    target: http://h:1/\n    timeout_ms: -5\n"),
        "7:17",
        "timeout_ms must be greater than 0",
    );
    rejects(
        &format!("{HEAD}hosts:\n  default:\n    connect_timeout_ms: 0\nrouting_rules:\n  - event_type: a\n    mode: async\n    target: http://h:1/\n"),
        "5:25",
        "connect_timeout_ms must be greater than 0",
    );
}

#[test]
fn empty_retry_matrices_are_errors() {
    rejects(
        &rules(
            "  - event_type: a\n    mode: async\n    target: http://h:1/\n    retry_matrix: []\n",
        ),
        "7:19",
        "retry_matrix must list at least one delay",
    );
    rejects(&rules("  - event_type: a\n    mode: async\n    target: http://h:1/\n    retry_matrix: [100, -1]\n"), "7:25", "must not be negative");
    rejects(&rules("  - event_type: a\n    mode: async\n    target: http://h:1/\n    retry_matrix: [\"5 parsecs\"]\n"), "7:20", "invalid duration");
}

#[test]
fn duplicate_event_types_are_errors() {
    rejects(
        &rules("  - event_type: a.b\n    mode: async\n    target: http://h:1/\n  - event_type: a.b\n    mode: async\n    target: http://h:2/\n"),
        "7:17",
        "duplicate event_type \"a.b\" (first defined on line 4)",
    );
}

#[test]
fn a_sync_rule_without_timeout_is_an_error() {
    rejects(
        &rules("  - event_type: a\n    mode: sync\n    target: http://h:1/\n"),
        "5:11",
        "a sync rule needs timeout_ms",
    );
}

#[test]
fn shed_at_outside_zero_one_is_an_error() {
    for bad in ["0", "1.5", "-0.1"] {
        rejects(
            &format!("{HEAD}hosts:\n  default:\n    shed_at: {bad}\nrouting_rules:\n  - event_type: a\n    mode: async\n    target: http://h:1/\n"),
            "5:14",
            "shed_at must be in (0, 1]",
        );
    }
}

#[test]
fn syntax_errors_and_bad_patterns_name_their_position() {
    rejects(
        &format!("{HEAD}routing_rules:\n  - event_type: [unclosed\n"),
        "4:17",
        "",
    );
    rejects(
        &rules("  - event_type: a.*.b\n    mode: async\n    target: http://h:1/\n"),
        "4:17",
        "invalid event_type",
    );
    rejects(
        &rules("  - event_type: a\n    mode: teleport\n    target: http://h:1/\n"),
        "5:11",
        "teleport",
    );
}

#[test]
fn every_problem_is_reported_in_one_run() {
    let (code, _, err) = check(&rules(
        "  - event_type: a\n    mode: sync\n    target: http://h:1/\n  - event_type: b\n    mode: async\n    target: ftp://x/\n    retry_matrix: []\n",
    ));
    assert_eq!(code, 1);
    assert_eq!(err.matches("error: cfg.yaml:").count(), 3, "{err}");
}

#[test]
fn env_expansion_reports_unset_variables_and_secrets_are_never_printed() {
    let (code, _, err) = check(
        "signing:\n  secrets: [\"${HOOKYARD_TEST_UNSET_VAR}\"]\nrouting_rules:\n  - event_type: a\n    mode: async\n    target: http://h:1/\n",
    );
    assert_eq!(code, 1);
    assert!(
        err.contains(
            "cfg.yaml:2:13: signing.secrets[0]: environment variable HOOKYARD_TEST_UNSET_VAR is not set"
        ),
        "{err}"
    );
    let (code, _, err) = check(
        "signing:\n  secrets: [\"whsec_not*base64*supersecretvalue\"]\nrouting_rules:\n  - event_type: a\n    mode: async\n    target: http://h:1/\n",
    );
    assert_eq!(code, 1);
    assert!(err.contains("invalid signing secret"), "{err}");
    assert!(err.contains("cfg.yaml:2:13"), "{err}");
    assert!(!err.contains("supersecretvalue"), "secret echoed: {err}");
}

#[test]
fn the_shipped_json_schema_matches_the_config_types() {
    let shipped: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/dispatcher-config.schema.json"
        ))
        .unwrap(),
    )
    .unwrap();
    assert_eq!(
        shipped,
        hookyard::config::json_schema(),
        "regenerate with: hookyard schema > dispatcher-config.schema.json"
    );
    assert!(shipped["properties"]["routing_rules"].is_object());
}

#[test]
fn https_targets_are_accepted_and_a_missing_ca_file_is_an_error() {
    let (code, out, err) = check(&rules(
        "  - event_type: a\n    mode: async\n    target: https://example.com/hook\n",
    ));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("example.com:443"), "{out}");
    rejects(
        &format!("{HEAD}tls:\n  ca_files: [\"/nonexistent/ca.pem\"]\nrouting_rules:\n  - event_type: a\n    mode: async\n    target: https://h/\n"),
        "4:14",
        "cannot read CA file /nonexistent/ca.pem",
    );
}

#[test]
fn output_to_a_reader_that_went_away_ends_quietly_instead_of_panicking() {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_hookyard"))
        .arg("schema")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Closed before the command writes a byte: its first write meets a broken pipe.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(out.status.success(), "{:?} {stderr}", out.status);
}

fn breaker(section: &str) -> String {
    rules_with_hosts(&format!("  default:\n    circuit_breaker:\n{section}"))
}

fn rules_with_hosts(hosts: &str) -> String {
    format!(
        "{HEAD}hosts:\n{hosts}routing_rules:\n  - event_type: a\n    mode: async\n    target: http://h:1/\n"
    )
}

fn compiled_breaker(yaml: &str, host: &str) -> hookyard::config::BreakerSettings {
    let settings =
        hookyard::config::load_from_bytes(std::path::Path::new("cfg.yaml"), yaml.as_bytes())
            .unwrap_or_else(|e| panic!("{e}"));
    settings.hosts.for_host(host).circuit_breaker
}

#[test]
fn breaker_thresholds_out_of_range_are_errors_at_their_value() {
    rejects(
        &breaker("      failure_rate: 0\n"),
        "6:21",
        "failure_rate must be in (0, 1], got 0",
    );
    rejects(
        &breaker("      failure_rate: 1.5\n"),
        "6:21",
        "failure_rate must be in (0, 1]",
    );
    rejects(
        &breaker("      window_ms: 0\n"),
        "6:18",
        "window_ms must be greater than 0",
    );
    rejects(
        &breaker("      min_calls: 0\n"),
        "6:18",
        "min_calls must be greater than 0",
    );
    rejects(
        &breaker("      half_open_probes: 0\n"),
        "6:25",
        "half_open_probes must be greater than 0",
    );
    rejects(
        &breaker("      policy: half\n"),
        "6:15",
        "unknown variant `half`",
    );
}

#[test]
fn keys_of_the_other_breaker_policy_are_errors_naming_the_key() {
    rejects(
        &breaker("      policy: consecutive\n      failure_rate: 0.5\n"),
        "7:21",
        "failure_rate is not a setting of policy consecutive",
    );
    rejects(
        &breaker("      policy: failure_rate\n      consecutive_failures: 5\n"),
        "7:29",
        "consecutive_failures is not a setting of policy failure_rate",
    );
    rejects(
        &breaker("      consecutive_failures: 5\n      min_calls: 10\n"),
        "7:18",
        "min_calls belongs to policy failure_rate, but consecutive_failures",
    );
}

#[test]
fn breaker_policy_defaults_and_selection() {
    use hookyard::config::BreakerPolicy;
    // Nothing written: the failure-rate policy with seed 000's numbers.
    let b = compiled_breaker(
        &rules("  - event_type: a\n    mode: async\n    target: http://h:1/\n"),
        "h:1",
    );
    assert_eq!(
        b.policy,
        BreakerPolicy::FailureRate {
            failure_rate: 0.5,
            window_ms: 10_000,
            min_calls: 20
        }
    );
    assert_eq!((b.recovery_ms, b.half_open_probes), (10_000, 1));

    // consecutive_failures alone keeps its old meaning.
    let b = compiled_breaker(
        &breaker("      consecutive_failures: 3\n      recovery_ms: 250\n"),
        "h:1",
    );
    assert_eq!(
        b.policy,
        BreakerPolicy::Consecutive {
            consecutive_failures: 3
        }
    );
    assert_eq!(b.recovery_ms, 250);

    // An explicit policy takes that policy's defaults for what is not written.
    let b = compiled_breaker(&breaker("      policy: consecutive\n"), "h:1");
    assert_eq!(
        b.policy,
        BreakerPolicy::Consecutive {
            consecutive_failures: 5
        }
    );

    // A host override inherits the default host's policy and changes what it writes.
    let yaml = rules_with_hosts(
        "  default:\n    circuit_breaker: { failure_rate: 0.3, half_open_probes: 2 }\n  \"h:1\":\n    circuit_breaker: { min_calls: 50 }\n  \"h:2\":\n    circuit_breaker: { consecutive_failures: 7 }\n",
    );
    let b = compiled_breaker(&yaml, "h:1");
    assert_eq!(
        b.policy,
        BreakerPolicy::FailureRate {
            failure_rate: 0.3,
            window_ms: 10_000,
            min_calls: 50
        }
    );
    assert_eq!(b.half_open_probes, 2);
    let b = compiled_breaker(&yaml, "h:2");
    assert_eq!(
        b.policy,
        BreakerPolicy::Consecutive {
            consecutive_failures: 7
        }
    );
    assert_eq!(b.half_open_probes, 2, "shared keys still inherit");
}
