//! `openapi.json`: current with the code, valid OpenAPI 3.1, and exactly the routes served.

use std::collections::BTreeSet;

use hookyard::admin::openapi::{document, document_json, documented};
use hookyard::admin::Endpoint;
use serde_json::Value;

use crate::util::{receiver, send, Sidecar};

fn shipped() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json")).unwrap()
}

#[test]
fn the_shipped_openapi_json_is_generated_from_the_code() {
    assert!(
        shipped() == document_json(),
        "regenerate with: hookyard openapi > openapi.json"
    );
}

#[test]
fn the_document_is_valid_openapi_3_1_and_every_reference_resolves() {
    let spec = oas3::from_json(shipped()).expect("parses as OpenAPI 3.1");
    let version = spec.validate_version().expect("a supported version");
    assert_eq!((version.major, version.minor), (3, 1));
    let mut operations = 0;
    for (path, method, op) in spec.operations() {
        operations += 1;
        assert!(op.servers.len() == 1, "{method} {path}: names its server");
        assert!(!op.responses(&spec).is_empty(), "{method} {path}");
        for (status, response) in op.responses(&spec) {
            for (ct, media) in &response.content {
                if let Some(schema) = &media.schema {
                    schema
                        .resolve(&spec)
                        .unwrap_or_else(|e| panic!("{method} {path} {status} {ct}: {e}"));
                }
            }
        }
        for param in &op.parameters {
            param.resolve(&spec).unwrap();
        }
        if let Some(body) = &op.request_body {
            body.resolve(&spec).unwrap();
        }
    }
    assert_eq!(operations, Endpoint::ALL.len() + 1, "admin + ingress");
    let doc: Value = serde_json::from_str(&shipped()).unwrap();
    // Every error answer is documented with a JSON body that has `error` (readiness aside).
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            for (status, response) in op["responses"].as_object().unwrap() {
                if status.starts_with('4') || status.starts_with('5') {
                    let schema = &response["content"]["application/json"]["schema"]["$ref"];
                    let name = schema
                        .as_str()
                        .unwrap_or_else(|| panic!("{method} {path} {status}: no JSON error body"));
                    let name = name.rsplit('/').next().unwrap();
                    let props = &doc["components"]["schemas"][name]["properties"];
                    assert!(
                        props.get("error").is_some() || name == "Health",
                        "{method} {path} {status}: {name} has no `error`"
                    );
                }
            }
        }
    }
}

/// Fills `{…}` path parameters with `x`.
fn concrete(template: &str) -> String {
    template
        .split('/')
        .map(|s| if s.starts_with('{') { "x" } else { s })
        .collect::<Vec<_>>()
        .join("/")
}

#[test]
fn the_document_holds_exactly_the_admin_routes_served_plus_the_ingress_route() {
    // `Endpoint::ALL` is complete: this match stops compiling when a variant is added, and the
    // numbering check fails until ALL lists it.
    let number = |e: Endpoint| match e {
        Endpoint::Metrics => 0,
        Endpoint::Healthz => 1,
        Endpoint::Readyz => 2,
        Endpoint::Config => 3,
        Endpoint::Reload => 4,
        Endpoint::Event => 5,
        Endpoint::ListDlq => 6,
        Endpoint::BulkReplay => 7,
        Endpoint::ReplayOne => 8,
        Endpoint::Job => 9,
        Endpoint::Fallbacks => 10,
        Endpoint::Circuits => 11,
        Endpoint::EnableTargets => 12,
    };
    let numbers: BTreeSet<usize> = Endpoint::ALL.iter().map(|e| number(*e)).collect();
    assert_eq!(numbers, (0..13).collect());

    let doc = document();
    let mut in_doc: BTreeSet<(String, String)> = BTreeSet::new();
    for (path, item) in &doc.paths.paths {
        for (method, op) in [("GET", &item.get), ("POST", &item.post)] {
            if op.is_some() {
                in_doc.insert((method.to_string(), path.clone()));
            }
        }
        assert!(item.put.is_none() && item.delete.is_none() && item.patch.is_none());
    }
    let mut served = BTreeSet::new();
    for endpoint in Endpoint::ALL {
        let (methods, path, _) = documented(endpoint);
        assert_eq!(methods.len(), 1);
        let method = endpoint.method().to_string();
        // The documented path is the one the router serves with this endpoint.
        let url = concrete(&path);
        let segments: Vec<&str> = url.trim_matches('/').split('/').collect();
        assert_eq!(
            Endpoint::of(&segments).map(|(e, _)| e),
            Some(endpoint),
            "{method} {path}"
        );
        served.insert((method, path));
    }
    served.insert(("POST".into(), "/v1/events/{event}".into()));
    assert_eq!(in_doc, served);
}

#[tokio::test]
async fn every_documented_operation_is_answered_by_a_running_sidecar() {
    let rx = receiver().await;
    let hy = Sidecar::start(&format!(
        "routing_rules:\n  - event_type: x\n    mode: async\n    target: http://{}/\n",
        rx.local_addr()
    ))
    .await;
    let doc: Value = serde_json::from_str(&document_json()).unwrap();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let base = if op["tags"][0] == "ingress" {
                hy.ingress()
            } else {
                hy.admin()
            };
            let url = format!("{base}{}", concrete(path));
            let m = method.to_uppercase();
            let answer = send(&hy.client, &m, &url, &[], "{\"all\":true}").await;
            let status = answer.status.to_string();
            assert_ne!(answer.status, 405, "{m} {path}");
            let body: Value = serde_json::from_slice(&answer.body).unwrap_or(Value::Null);
            let reason = body["reason"].as_str().unwrap_or("").to_string();
            assert!(
                !reason.contains("no admin endpoint"),
                "{m} {path}: {reason}"
            );
            assert!(
                op["responses"].get(&status).is_some() || op["responses"].get("default").is_some(),
                "{m} {path} answered {status}, which is not documented"
            );
        }
    }
}
