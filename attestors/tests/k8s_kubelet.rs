//! The k8s attestor against a local HTTPS server standing in for the
//! kubelet (no kubelet runs on the test machines): real TLS with a CA and a
//! serving certificate made here, a bearer token checked on every request,
//! and a PodList document shaped like the kubelet's `/pods` answer
//! (testdata/kubelet-pods.json, following the v1 Pod reference of the
//! Kubernetes API). What this does not prove: that a real kubelet's
//! authorizer accepts the token, and real kubelet certificate layouts.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sigil_attestors::workload::k8s::{K8sAttestor, K8sConfig};
use sigil_attestors::workload::{Workload, WorkloadAttestError, WorkloadAttestor};

const TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.node-token.sig";
const POD_: &str = "2f1c7a52_8a4b_4bd6_9e1c_2f0a6d7b3e41";
const AGENT_ID: &str = "3c5c8e5d2f6f4b3e9a1b7c0d8e2f4a6b8c0d2e4f6a8b0c2d4e6f8a0b2c4d6e8f";

struct Pki {
    ca_pem: String,
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
}

fn pki() -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    ca.distinguished_name
        .push(DnType::CommonName, "worker-3-ca@1732958000");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut leaf =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "worker-3".to_string()]).unwrap();
    leaf.distinguished_name
        .push(DnType::CommonName, "worker-3@1732958000");
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    Pki {
        ca_pem: ca_cert.pem(),
        cert: cert.der().clone(),
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    }
}

/// Serves `/pods` over TLS on 127.0.0.1:0; counts the requests.
async fn fake_kubelet(pki: &Pki, hits: Arc<AtomicUsize>) -> u16 {
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![pki.cert.clone()], pki.key.clone_key())
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let pods = Bytes::from(
        std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/testdata/kubelet-pods.json"
        ))
        .unwrap(),
    );
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let pods = pods.clone();
            let hits = hits.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let pods = pods.clone();
                        let hits = hits.clone();
                        async move {
                            hits.fetch_add(1, Ordering::SeqCst);
                            let auth = req
                                .headers()
                                .get(http::header::AUTHORIZATION)
                                .and_then(|v| v.to_str().ok());
                            let resp = if auth != Some(&format!("Bearer {TOKEN}")) {
                                http::Response::builder()
                                    .status(401)
                                    .body(Full::new(Bytes::from_static(b"Unauthorized")))
                            } else if req.uri().path() != "/pods" {
                                http::Response::builder()
                                    .status(404)
                                    .body(Full::new(Bytes::new()))
                            } else {
                                http::Response::builder()
                                    .header("content-type", "application/json")
                                    .body(Full::new(pods))
                            };
                            Ok::<_, std::convert::Infallible>(resp.unwrap())
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    port
}

fn attestor(dir: &std::path::Path, port: u16, ca_pem: &str, token: &str) -> K8sAttestor {
    std::fs::write(dir.join("ca.pem"), ca_pem).unwrap();
    std::fs::write(dir.join("token"), format!("{token}\n")).unwrap();
    K8sAttestor::new(K8sConfig {
        kubelet_url: format!("https://127.0.0.1:{port}").parse().unwrap(),
        token_path: dir.join("token"),
        ca_path: dir.join("ca.pem"),
        cache_ttl: Duration::from_secs(60),
        timeout: Duration::from_secs(5),
    })
}

fn in_pod(container: &str) -> Workload {
    Workload {
        pid: 1,
        uid: 0,
        cgroup: format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD_}.slice/cri-containerd-{container}.scope\n"
        ),
        exe_sha256: None,
    }
}

fn texts(v: Vec<sigil_core::selector::Selector>) -> Vec<String> {
    let mut t: Vec<String> = v.iter().map(ToString::to_string).collect();
    t.sort();
    t
}

#[tokio::test]
async fn pod_and_container_selectors_from_the_kubelet_over_tls_with_a_token() {
    let pki = pki();
    let hits = Arc::new(AtomicUsize::new(0));
    let port = fake_kubelet(&pki, hits.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let a = attestor(dir.path(), port, &pki.ca_pem, TOKEN);
    let got = texts(a.attest(&in_pod(AGENT_ID)).await.unwrap());
    assert_eq!(
        got,
        vec![
            format!("container:id:{AGENT_ID}"),
            "container:runtime:containerd".to_string(),
            "k8s:container-image:registry.example/agents/triage:1.4".to_string(),
            "k8s:container-image:registry.example/agents/triage@sha256:4c0f8e2d1b3a59687766554433221100ffeeddccbbaa99887766554433221100".to_string(),
            "k8s:container-name:agent".to_string(),
            "k8s:node-name:worker-3".to_string(),
            "k8s:ns:agents".to_string(),
            "k8s:pod-label:app.kubernetes.io/name:triage".to_string(),
            "k8s:pod-label:pod-template-hash:7c9d8f6b5".to_string(),
            "k8s:pod-label:team:sec".to_string(),
            "k8s:pod-name:triage-7c9d8f6b5-x2kqp".to_string(),
            "k8s:pod-owner:ReplicaSet:triage-7c9d8f6b5".to_string(),
            "k8s:pod-uid:2f1c7a52-8a4b-4bd6-9e1c-2f0a6d7b3e41".to_string(),
            "k8s:sa:triage".to_string(),
        ]
    );
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    // The sidecar of the same pod: served from the cached list.
    let side = texts(a.attest(&in_pod(&"5e".repeat(32))).await.unwrap());
    assert!(
        side.contains(&"k8s:container-name:sidecar".to_string()),
        "{side:?}"
    );
    assert_eq!(hits.load(Ordering::SeqCst), 1, "cached PodList not reused");
    // A finished init container and an unknown container: nothing (after
    // one fresh look, since the cached list might be stale).
    assert_eq!(a.attest(&in_pod(&"11".repeat(32))).await.unwrap(), vec![]);
    assert_eq!(a.attest(&in_pod(&"99".repeat(32))).await.unwrap(), vec![]);
    // Not in a pod: the kubelet is not asked.
    let before = hits.load(Ordering::SeqCst);
    let host = Workload {
        pid: 1,
        uid: 0,
        cgroup: "0::/system.slice/sshd.service\n".into(),
        exe_sha256: None,
    };
    assert_eq!(a.attest(&host).await.unwrap(), vec![]);
    assert_eq!(hits.load(Ordering::SeqCst), before);
}

#[tokio::test]
async fn a_wrong_token_or_an_untrusted_kubelet_certificate_is_an_error() {
    let pki = pki();
    let port = fake_kubelet(&pki, Arc::new(AtomicUsize::new(0))).await;
    let dir = tempfile::tempdir().unwrap();
    let e = attestor(dir.path(), port, &pki.ca_pem, "stolen")
        .attest(&in_pod(AGENT_ID))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, WorkloadAttestError::Unavailable(m) if m.contains("401")),
        "{e}"
    );
    let other = pki_ca_only();
    let dir2 = tempfile::tempdir().unwrap();
    let e = attestor(dir2.path(), port, &other, TOKEN)
        .attest(&in_pod(AGENT_ID))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("TLS"), "{e}");
}

fn pki_ca_only() -> String {
    pki().ca_pem
}
