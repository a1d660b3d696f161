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

/// Runs `hookyard check` on `yaml` with extra arguments and environment variables; returns
/// the exit code, stdout and stderr (with the temp path shown as `cfg.yaml`).
fn check_with(yaml: &str, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cfg.yaml");
    std::fs::write(&path, yaml).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hookyard"));
    cmd.args(["check", "--config"]).arg(&path).args(args);
    cmd.env_remove("HOOKYARD_SECRET");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let shown =
        |b: &[u8]| String::from_utf8_lossy(b).replace(&path.display().to_string(), "cfg.yaml");
    (
        out.status.code().unwrap_or(-1),
        shown(&out.stdout),
        shown(&out.stderr),
    )
}

fn check_json(yaml: &str, env: &[(&str, &str)]) -> (i32, serde_json::Value) {
    let (code, out, err) = check_with(yaml, &["--format", "json"], env);
    let v = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}\n{err}"));
    (code, v)
}

#[test]
fn every_unknown_key_is_reported_in_one_run() {
    let (code, _, err) = check(&rules(
        "  - event_type: a\n    mode: async\n    target: http://h:1/\n    colour: blue\n  - event_type: b\n    mode: async\n    target: http://h:2/\n    shape: round\nweather: fine\n",
    ));
    assert_eq!(code, 1);
    for at in [
        "cfg.yaml:7:5: unknown field `colour`",
        "cfg.yaml:11:5: unknown field `shape`",
        "cfg.yaml:12:1: unknown field `weather`",
    ] {
        assert!(err.contains(at), "{at} missing:\n{err}");
    }
    assert_eq!(err.matches("error: ").count(), 3, "{err}");
}

#[test]
fn near_miss_keys_get_a_did_you_mean() {
    rejects(
        &rules("  - event_type: a\n    mode: sync\n    target: http://h:1/\n    timout_ms: 100\n"),
        "7:5",
        "unknown field `timout_ms` in routing_rules[0]; did you mean `timeout_ms`?",
    );
    rejects(
        &format!("{HEAD}queues:\n  default:\n    concurrancy: 4\nrouting_rules: []\n"),
        "5:5",
        "did you mean `concurrency`?",
    );
}

#[test]
fn type_errors_are_in_plain_words() {
    let (code, _, err) = check(&rules(
        "  - event_type: a\n    mode: sync\n    target: http://h:1/\n    timeout_ms: lots\n",
    ));
    assert_eq!(code, 1);
    assert!(
        err.contains(
            "cfg.yaml:7:17: routing_rules[0].timeout_ms: expected an integer, got \"lots\""
        ),
        "{err}"
    );
    assert!(
        !err.contains("invalid type") && !err.contains("i64"),
        "{err}"
    );
    rejects(
        &rules("  - event_type: a\n    mode: sync\n    target: http://h:1/\n    timeout_ms: 1.5\n"),
        "7:17",
        "routing_rules[0].timeout_ms: expected an integer, got 1.5",
    );
    // A type error and an unknown key in the same file are both reported.
    let (_, _, err) = check(&format!(
        "{HEAD}hosts:\n  default:\n    shed_at: half\n    max_conections: 3\nrouting_rules:\n  - event_type: a\n    mode: async\n    target: http://h:1/\n"
    ));
    assert!(
        err.contains("cfg.yaml:5:14: hosts.default.shed_at: expected a number, got \"half\""),
        "{err}"
    );
    assert!(
        err.contains("cfg.yaml:6:5: unknown field `max_conections`"),
        "{err}"
    );
}

#[test]
fn a_missing_target_points_at_the_rules_first_line() {
    rejects(
        &rules("  - event_type: a\n    mode: async\n  - event_type: b\n    mode: async\n    target: http://h:1/\n"),
        "4:5",
        "routing_rules[0]: missing required key `target`",
    );
}

#[test]
fn a_tab_points_at_the_line_that_holds_it() {
    let yaml = rules("  - event_type: a\n    mode: async\n\ttarget: http://h:1/\n");
    let (code, _, err) = check(&yaml);
    assert_eq!(code, 1);
    assert!(err.contains("cfg.yaml:6:1: tabs are not allowed"), "{err}");
    assert!(err.contains("6 | \ttarget"), "{err}");
}

#[test]
fn json_format_reports_errors_and_rules() {
    let (code, v) = check_json(
        &rules("  - event_type: a\n    mode: async\n    target: http://h:1/\n    colour: blue\n"),
        &[],
    );
    assert_eq!(code, 1);
    assert_eq!(v["ok"], false);
    assert_eq!(v["rules"], serde_json::json!([]));
    let e = &v["errors"][0];
    assert_eq!(e["file"], "cfg.yaml");
    assert_eq!(
        (e["line"].as_u64(), e["column"].as_u64()),
        (Some(7), Some(5))
    );
    assert_eq!(e["key"], "routing_rules[0].colour");
    assert!(e["message"]
        .as_str()
        .unwrap()
        .contains("unknown field `colour`"));
    assert_eq!(e["snippet"], "    colour: blue");

    let (code, v) = check_json(
        &rules("  - event_type: a.b\n    mode: sync\n    target: http://h:1/\n    timeout_ms: 250\n    fallback: async_dlq\n"),
        &[],
    );
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["ok"], true);
    assert_eq!(v["errors"], serde_json::json!([]));
    let r = &v["rules"][0];
    assert_eq!(r["event_type"], "a.b");
    assert_eq!(r["mode"], "sync");
    assert_eq!(r["target_host"], "h:1");
    assert_eq!(r["timeout_ms"], 250);
    assert_eq!(r["fallback"], "async_dlq");
    assert_eq!(r["queue"], "default");
}

#[test]
fn variables_expand_in_every_scalar_including_numbers() {
    let yaml = rules(
        "  - event_type: a\n    mode: ${HOOKYARD_TEST_MODE:-sync}\n    target: http://h:1/\n    timeout_ms: ${HOOKYARD_TEST_T:-1500}\n    queue: ${Q:-prof}\n  - event_type: b\n    mode: async\n    target: http://h:2/\n    queue: \"$${literal}\"\n",
    );
    let (code, v) = check_json(&yaml, &[]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["rules"][0]["queue"], "prof");
    assert_eq!(v["rules"][0]["timeout_ms"], 1500);
    assert_eq!(v["rules"][0]["mode"], "sync");
    assert_eq!(
        v["rules"][1]["queue"], "${literal}",
        "$${{ writes a literal ${{"
    );
    let (code, v) = check_json(&yaml, &[("HOOKYARD_TEST_T", "250"), ("Q", "fast")]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["rules"][0]["queue"], "fast");
    assert_eq!(v["rules"][0]["timeout_ms"], 250);
}

#[test]
fn an_unset_variable_in_a_number_is_an_error_naming_the_key() {
    let (code, _, err) = check(&rules(
        "  - event_type: a\n    mode: sync\n    target: http://h:1/\n    timeout_ms: ${HOOKYARD_TEST_UNSET_T}\n",
    ));
    assert_eq!(code, 1);
    assert!(
        err.contains("cfg.yaml:7:17: routing_rules[0].timeout_ms: environment variable HOOKYARD_TEST_UNSET_T is not set"),
        "{err}"
    );
    assert!(
        err.contains("7 |     timeout_ms: ${HOOKYARD_TEST_UNSET_T}"),
        "{err}"
    );
    // Reported once (not again as a type error), and alongside the file's other mistakes.
    assert_eq!(err.matches("error: ").count(), 1, "{err}");
    let (_, _, err) = check(&rules(
        "  - event_type: a\n    mode: async\n    target: http://h:1/\n    queue: ${HOOKYARD_TEST_UNSET_Q}\n    colour: blue\n",
    ));
    assert!(err.contains("cfg.yaml:7:12: routing_rules[0].queue: environment variable HOOKYARD_TEST_UNSET_Q is not set"), "{err}");
    assert!(
        err.contains("cfg.yaml:8:5: unknown field `colour`"),
        "{err}"
    );
}

#[test]
fn a_secret_expanded_into_a_bad_number_never_appears_in_the_error() {
    const SECRET: &str = "hunter2-9f1c-secret";
    let yaml = rules(
        "  - event_type: a\n    mode: sync\n    target: http://h:1/\n    timeout_ms: ${HOOKYARD_TEST_SECRET}\n",
    );
    let (code, out, err) = check_with(&yaml, &[], &[("HOOKYARD_TEST_SECRET", SECRET)]);
    assert_eq!(code, 1);
    assert!(
        err.contains("cfg.yaml:7:17: routing_rules[0].timeout_ms: expected an integer"),
        "{err}"
    );
    assert!(
        err.contains("${HOOKYARD_TEST_SECRET}"),
        "names the reference: {err}"
    );
    assert!(
        !out.contains(SECRET) && !err.contains(SECRET),
        "secret echoed: {err}"
    );
    let (_, v) = check_json(&yaml, &[("HOOKYARD_TEST_SECRET", SECRET)]);
    assert!(!v.to_string().contains(SECRET), "secret echoed: {v}");

    // A number that parses but is out of range: the message names the reference, not the digits.
    let (code, _, err) = check_with(&yaml, &[], &[("HOOKYARD_TEST_SECRET", "987654321")]);
    assert_eq!(code, 1);
    assert!(
        err.contains("timeout_ms must be at most 300000, got ${HOOKYARD_TEST_SECRET}"),
        "{err}"
    );
    assert!(!err.contains("987654321"), "{err}");
}

#[test]
fn a_variable_in_a_key_is_an_error_not_a_silent_literal() {
    rejects(
        &format!("{HEAD}hosts:\n  \"${{API_HOST}}:443\":\n    max_connections: 3\nrouting_rules:\n  - event_type: a\n    mode: async\n    target: http://h:1/\n"),
        "4:3",
        "hosts.${API_HOST}:443: ${VAR} is not expanded in keys",
    );
}

#[test]
fn the_file_text_quoted_in_a_message_keeps_its_default_intact() {
    let (code, _, err) = check(&format!(
        "{HEAD}store:\n  fsync: ${{HOOKYARD_TEST_F:-nope}}\nrouting_rules:\n  - event_type: a\n    mode: async\n    target: http://h:1/\n"
    ));
    assert_eq!(code, 1);
    assert!(
        err.contains("cfg.yaml:4:10: store.fsync: expected true or false, got a string from `${HOOKYARD_TEST_F:-nope}`"),
        "{err}"
    );
}
