//! `https://` targets: verified against the bundled roots plus configured CA files.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_rustls::rustls::{self, pki_types::PrivateKeyDer};

use crate::util::Sidecar;

/// A TLS server for `localhost` with a fresh self-signed certificate; returns its port and the
/// certificate in PEM.
async fn tls_upstream() -> (u16, String) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let pem = cert.cert.pem();
    let key = PrivateKeyDer::try_from(cert.signing_key.serialize_der()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert.cert.der().clone()], key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                    let signed = req.headers().contains_key("webhook-signature");
                    let body = if signed { "tls-ok" } else { "unsigned" };
                    Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from(
                        body,
                    ))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (port, pem)
}

fn rule(port: u16) -> String {
    format!(
        "routing_rules:\n  - event_type: secure.event\n    mode: sync\n    target: https://localhost:{port}/hook\n    timeout_ms: 2000\n"
    )
}

#[tokio::test]
async fn https_target_signed_by_a_configured_ca_is_delivered() {
    let (port, pem) = tls_upstream().await;
    let ca_dir = tempfile::tempdir().unwrap();
    let ca = ca_dir.path().join("ca.pem");
    std::fs::write(&ca, pem).unwrap();
    let hy = Sidecar::start(&format!(
        "tls:\n  ca_files: [\"{}\"]\n{}",
        ca.display(),
        rule(port)
    ))
    .await;
    let answer = hy.post("secure.event", "{}", &[]).await;
    assert_eq!(answer.status, 200);
    assert_eq!(&answer.body[..], b"tls-ok");
}

#[tokio::test]
async fn https_target_with_an_untrusted_certificate_is_refused() {
    let (port, _pem) = tls_upstream().await;
    let hy = Sidecar::start(&rule(port)).await;
    let answer = hy.post("secure.event", "{}", &[]).await;
    assert_eq!(answer.status, 502, "{:?}", answer.body);
    assert_eq!(answer.json()["reason"], "connect");
}
