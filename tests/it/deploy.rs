//! The deployment files (`Dockerfile`, `deploy/`) against the binary they deploy: every port,
//! path, environment variable and config key they use must exist, so that a rename in the code
//! cannot leave a manifest that deploys a sidecar whose probes or scrapes fail.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::util::{eventually, http_client, send, upstream};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Every YAML document of a manifest file.
fn documents(path: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(&read(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The environment variables the binary reads: clap's `[env: NAME]` in the help of the
/// commands a deployment runs.
fn binary_env_vars() -> BTreeSet<String> {
    let mut vars = BTreeSet::new();
    for args in [
        &["serve", "--help"][..],
        &["receive", "--help"],
        &["--help"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_hookyard"))
            .args(args)
            .output()
            .unwrap();
        let help = String::from_utf8_lossy(&out.stdout);
        for part in help.split("[env: ").skip(1) {
            let name: String = part
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            vars.insert(name);
        }
    }
    vars
}

/// `${VAR}` and `${VAR:-default}` references in a config text: (name, has a default).
fn config_vars(text: &str) -> Vec<(String, bool)> {
    text.split("${")
        .skip(1)
        .filter_map(|rest| rest.split_once('}'))
        .map(|(inner, _)| match inner.split_once(":-") {
            Some((name, _)) => (name.to_string(), true),
            None => (inner.to_string(), false),
        })
        .collect()
}

/// `hookyard check` on `config` with `env` set: the file's every key and value must compile.
fn check(config: &Path, env: &[(&str, &str)]) {
    let out = Command::new(env!("CARGO_BIN_EXE_hookyard"))
        .args(["check", "--config"])
        .arg(config)
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{} does not check:\n{}{}",
        config.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The port of a `host:port` config value.
fn port_of(config: &Value, key: &str) -> u16 {
    config[key]
        .as_str()
        .and_then(|a| a.rsplit_once(':'))
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("{key} in {config}"))
}

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

#[tokio::test]
async fn the_kubernetes_manifest_matches_the_binary_and_its_probes_answer_without_a_token() {
    let docs = documents("deploy/kubernetes/hookyard-sidecar.yaml");
    let config_map = docs.iter().find(|d| d["kind"] == "ConfigMap").unwrap();
    let deployment = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    let (file_name, config_text) = config_map["data"]
        .as_object()
        .unwrap()
        .iter()
        .next()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .unwrap();
    let config: Value = serde_saphyr::from_str(&config_text).unwrap();
    let pod = &deployment["spec"]["template"];
    let sidecar = pod["spec"]["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "hookyard")
        .unwrap();

    // Environment: every variable set is one the binary or the config reads, and every
    // variable the config needs without a default is set.
    let set: BTreeSet<String> = sidecar["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect();
    let read_by_config = config_vars(&config_text);
    let known: BTreeSet<String> = binary_env_vars()
        .into_iter()
        .chain(read_by_config.iter().map(|(n, _)| n.clone()))
        .collect();
    for name in &set {
        assert!(known.contains(name), "{name} is read by nothing");
    }
    for (name, has_default) in &read_by_config {
        assert!(*has_default || set.contains(name), "{name} is not set");
    }

    // Paths: HOOKYARD_CONFIG is the ConfigMap's file where the volume is mounted, and the
    // store lives on the data volume.
    let env_value = |name: &str| {
        sidecar["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .and_then(|e| e["value"].as_str())
            .unwrap()
            .to_string()
    };
    let mount = |volume: &str| {
        sidecar["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == volume)
            .and_then(|m| m["mountPath"].as_str())
            .unwrap()
            .to_string()
    };
    assert_eq!(
        env_value("HOOKYARD_CONFIG"),
        format!("{}/{file_name}", mount("hookyard-config"))
    );
    let store_path = config["store"]["path"].as_str().unwrap();
    assert!(store_path.starts_with(&format!("{}/", mount("hookyard-data"))));

    // Ports: the probes and the scrape annotation name the admin port the config listens on.
    let admin_port = port_of(&config, "admin_listen");
    let named = sidecar["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "admin")
        .unwrap();
    assert_eq!(named["containerPort"].as_u64(), Some(u64::from(admin_port)));
    let annotations = &pod["metadata"]["annotations"];
    assert_eq!(
        annotations["prometheus.io/port"].as_str(),
        Some(admin_port.to_string().as_str())
    );
    let mut probe_paths = vec![annotations["prometheus.io/path"]
        .as_str()
        .unwrap()
        .to_string()];
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        assert_eq!(sidecar[probe]["httpGet"]["port"], "admin", "{probe}");
        probe_paths.push(
            sidecar[probe]["httpGet"]["path"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }

    // Keys: the config compiles, then runs (on loopback and a temp store) and every probed
    // path answers 200 without the token the sidecar requires elsewhere.
    let dir = tempfile::tempdir().unwrap();
    let admin = upstream::closed_port();
    let ingress = upstream::closed_port();
    let runnable = config_text
        .replace(config["admin_listen"].as_str().unwrap(), &admin.to_string())
        .replace(config["listen"].as_str().unwrap(), &ingress.to_string())
        .replace(
            store_path,
            &dir.path().join("hookyard.db").display().to_string(),
        );
    let path = dir.path().join(&file_name);
    std::fs::write(&path, runnable).unwrap();
    let env = [
        ("HOOKYARD_SECRET", SECRET),
        ("HOOKYARD_ADMIN_TOKEN", "t0ken"),
    ];
    check(&path, &env);
    let mut child = Command::new(env!("CARGO_BIN_EXE_hookyard"))
        .args(["serve"])
        .env_clear()
        .envs(env)
        .env("HOOKYARD_CONFIG", &path)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let client = http_client();
    eventually(Duration::from_secs(10), "the sidecar is up", async || {
        let req = http::Request::get(format!("http://{admin}/healthz"))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        matches!(client.request(req).await, Ok(r) if r.status() == 200)
    })
    .await;
    for probe_path in &probe_paths {
        let a = send(
            &client,
            "GET",
            &format!("http://{admin}{probe_path}"),
            &[],
            "",
        )
        .await;
        assert_eq!(a.status, 200, "{probe_path}");
    }
    let config_api = send(
        &client,
        "GET",
        &format!("http://{admin}/v1/config"),
        &[],
        "",
    )
    .await;
    assert_eq!(
        config_api.status, 401,
        "the rest of the admin API needs the token"
    );
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn the_dockerfile_and_its_config_match_the_binary() {
    let dockerfile = read("Dockerfile");
    let instruction = |name: &str| -> Vec<String> {
        dockerfile
            .lines()
            .filter_map(|l| l.strip_prefix(&format!("{name} ")))
            .map(str::to_string)
            .collect()
    };
    // ENV HOOKYARD_CONFIG names the file the image copies its config to.
    let env_block = dockerfile
        .split("ENV ")
        .nth(1)
        .unwrap()
        .split("\n\n")
        .next()
        .unwrap()
        .to_string();
    let config_in_image = env_block
        .split_whitespace()
        .find_map(|w| w.strip_prefix("HOOKYARD_CONFIG="))
        .unwrap();
    let copied = instruction("COPY")
        .into_iter()
        .find(|c| c.starts_with("deploy/"))
        .unwrap();
    let (source, destination) = copied.split_once(' ').unwrap();
    assert_eq!(destination, config_in_image);
    for var in env_block
        .split_whitespace()
        .filter_map(|w| w.split_once('='))
    {
        assert!(
            binary_env_vars().contains(var.0),
            "{} is read by nothing",
            var.0
        );
    }

    // EXPOSE names the config's ports; VOLUME holds its store.
    let text = read(source);
    let config: Value = serde_saphyr::from_str(&text).unwrap();
    let exposed: BTreeSet<u16> = instruction("EXPOSE")
        .iter()
        .flat_map(|l| l.split_whitespace().map(|p| p.parse().unwrap()))
        .collect();
    let used: BTreeSet<u16> = [port_of(&config, "listen"), port_of(&config, "admin_listen")]
        .into_iter()
        .collect();
    assert_eq!(exposed, used);
    let volume = instruction("VOLUME").pop().unwrap();
    assert!(config["store"]["path"]
        .as_str()
        .unwrap()
        .starts_with(&format!("{volume}/")));
    check(
        &repo(source),
        &[
            ("HOOKYARD_SECRET", SECRET),
            ("HOOKYARD_ADMIN_TOKEN", "t0ken"),
        ],
    );
}

#[test]
fn the_compose_file_and_its_redis_config_match_the_binary() {
    let compose = &documents("deploy/compose/docker-compose.yml")[0];
    let known = binary_env_vars();
    let services = compose["services"].as_object().unwrap();
    let hookyard = &services["hookyard-1"];
    let mounted = hookyard["volumes"][0].as_str().unwrap();
    let mut parts = mounted.split(':');
    let (source, target) = (parts.next().unwrap(), parts.next().unwrap());
    assert_eq!(
        hookyard["environment"]["HOOKYARD_CONFIG"].as_str(),
        Some(target)
    );
    let text = read(&format!("deploy/compose/{source}"));
    let read_by_config: BTreeSet<String> = config_vars(&text).into_iter().map(|(n, _)| n).collect();
    for service in ["hookyard-1", "receiver"] {
        for name in services[service]["environment"].as_object().unwrap().keys() {
            assert!(
                known.contains(name) || read_by_config.contains(name),
                "{service}: {name} is read by nothing"
            );
        }
    }
    // The config's ports are the ones compose publishes, and it compiles.
    let config: Value = serde_saphyr::from_str(&text).unwrap();
    let published: BTreeSet<u16> = hookyard["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            p.as_str()
                .unwrap()
                .rsplit(':')
                .next()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    let used: BTreeSet<u16> = [port_of(&config, "listen"), port_of(&config, "admin_listen")]
        .into_iter()
        .collect();
    assert_eq!(published, used);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("redis-config.yaml");
    std::fs::write(&path, text).unwrap();
    check(
        &path,
        &[
            ("HOOKYARD_SECRET", SECRET),
            ("HOOKYARD_ADMIN_TOKEN", "t0ken"),
        ],
    );
}
