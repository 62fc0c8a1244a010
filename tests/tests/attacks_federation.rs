//! Attack suite (issue 14), federation: a hostile bundle endpoint, with the
//! real `sigil-server`. The endpoint is a small HTTPS server inside the test
//! (tokio-rustls, a Web PKI certificate from a throwaway CA), configured as
//! `[[federation]] profile = "https_web"` for `other.org`; the test switches
//! what it serves at run time and counts the requests it answers.
//!
//! It first serves other.org's real bundle (from a running other.org
//! server) with `spiffe_sequence` 10, which is stored. Then, in turn:
//! - a bundle of another other.org server (other keys) with sequence 5: a
//!   rollback, refused; the same without a sequence (which would reset the
//!   stored sequence to 0, opening the way to any rollback): refused;
//! - a bundle whose X.509 authority is the CA of `third.org` (its URI SAN
//!   names `spiffe://third.org`), with a higher sequence: refused, since a
//!   CA that names another trust domain is not other.org's authority;
//! - a 64 MiB chunked body: cut off at the 1 MiB bound, server RSS
//!   measured before and after;
//! - malformed JSON: refused;
//! - a body trickled a byte a second: cut off after 10 s.
//!
//! After each the stored bundle is still the good one (keys and sequence),
//! the server logged the refusal with its reason, and it still answers its
//! healthcheck and `entry list`. Finally a good bundle with a higher
//! sequence is taken again: the fetcher was not wedged.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a test failure"
)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{Value, json};
use sigil_tests::{Cluster, Scratch, eventually};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LONG: Duration = Duration::from_secs(40);
const STARS: &str = "****************************************";

/// What the hostile endpoint answers `GET /` with.
#[derive(Clone)]
enum Serve {
    /// `200 OK` with this body.
    Doc(Vec<u8>),
    /// `200 OK` with a chunked body of this many bytes, written until the
    /// client stops reading.
    Huge(usize),
    /// `200 OK` with a chunked body of one byte a second, for a minute.
    Trickle,
}

/// The test's bundle endpoint.
struct Endpoint {
    port: u16,
    serve: Arc<Mutex<Serve>>,
    /// Requests answered so far.
    requests: Arc<AtomicUsize>,
    /// Most body bytes written in one `Huge` response before the peer
    /// stopped reading (hung up).
    huge_written: Arc<AtomicUsize>,
}

impl Endpoint {
    async fn start(cert_pem: &str, key_pem: &str, first: Serve) -> Self {
        let chain: Vec<CertificateDer<'static>> = pem::parse_many(cert_pem)
            .unwrap()
            .into_iter()
            .map(|p| CertificateDer::from(p.contents().to_vec()))
            .collect();
        let key = pem::parse_many(key_pem)
            .unwrap()
            .into_iter()
            .find(|p| p.tag() == "PRIVATE KEY")
            .expect("a PKCS#8 key");
        let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            chain,
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.contents().to_vec())),
        )
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ep = Endpoint {
            port: listener.local_addr().unwrap().port(),
            serve: Arc::new(Mutex::new(first)),
            requests: Arc::new(AtomicUsize::new(0)),
            huge_written: Arc::new(AtomicUsize::new(0)),
        };
        let (serve, requests, huge) = (
            ep.serve.clone(),
            ep.requests.clone(),
            ep.huge_written.clone(),
        );
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let (acceptor, serve, requests, huge) = (
                    acceptor.clone(),
                    serve.clone(),
                    requests.clone(),
                    huge.clone(),
                );
                tokio::spawn(async move {
                    let Ok(Ok(mut tls)) =
                        tokio::time::timeout(Duration::from_secs(10), acceptor.accept(sock)).await
                    else {
                        return;
                    };
                    // The request head, then one answer, then close.
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tls.read(&mut buf).await {
                            Ok(n) if n > 0 && head.len() < 16 * 1024 => {
                                head.extend_from_slice(&buf[..n])
                            }
                            _ => return,
                        }
                    }
                    let what = serve.lock().unwrap().clone();
                    requests.fetch_add(1, Ordering::SeqCst);
                    match what {
                        Serve::Doc(body) => {
                            let mut r = format!(
                                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                                body.len()
                            )
                            .into_bytes();
                            r.extend_from_slice(&body);
                            let _ = tls.write_all(&r).await;
                            let _ = tls.shutdown().await;
                        }
                        Serve::Huge(total) => {
                            let h = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
                            if tls.write_all(h.as_bytes()).await.is_err() {
                                return;
                            }
                            let piece = vec![b' '; 64 * 1024];
                            let mut chunk = format!("{:x}\r\n", piece.len()).into_bytes();
                            chunk.extend_from_slice(&piece);
                            chunk.extend_from_slice(b"\r\n");
                            let mut written = 0;
                            while written < total {
                                let w = tokio::time::timeout(
                                    Duration::from_secs(20),
                                    tls.write_all(&chunk),
                                )
                                .await;
                                if !matches!(w, Ok(Ok(()))) {
                                    break;
                                }
                                written += piece.len();
                            }
                            huge.fetch_max(written, Ordering::SeqCst);
                            let _ = tls.write_all(b"0\r\n\r\n").await;
                        }
                        Serve::Trickle => {
                            let h = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
                            if tls.write_all(h.as_bytes()).await.is_err() {
                                return;
                            }
                            let mut tick = tokio::time::interval(Duration::from_secs(1));
                            for _ in 0..60 {
                                tick.tick().await;
                                if tls.write_all(b"1\r\n \r\n").await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                });
            }
        });
        ep
    }

    fn set(&self, s: Serve) {
        *self.serve.lock().unwrap() = s;
    }
}

/// `c`'s own bundle as a SPIFFE bundle document, with `sequence` and a
/// refresh hint of 1 s.
fn spiffe_doc(c: &Cluster, sequence: u64) -> Value {
    let mut v: Value =
        serde_json::from_str(&c.server_ok(&["bundle", "show", "--format", "spiffe"])).unwrap();
    v["spiffe_sequence"] = json!(sequence);
    v["spiffe_refresh_hint"] = json!(1);
    v
}

/// The X.509 and JWT keys of a bundle document (WIT keys are not carried
/// across federation) and its sequence.
fn carried(doc: &Value) -> (Vec<Value>, Option<u64>) {
    let keys = doc["keys"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|k| matches!(k["use"].as_str(), Some("x509-svid" | "jwt-svid")))
        .cloned()
        .collect();
    (keys, doc["spiffe_sequence"].as_u64())
}

/// The federated bundles `c` stores: (trust domain, document) pairs from
/// `bundle list --format spiffe`.
fn stored(c: &Cluster) -> Vec<(String, Value)> {
    let out = c.server_ok(&["bundle", "list", "--format", "spiffe"]);
    let mut v = Vec::new();
    let mut td = None;
    for chunk in out.split(STARS) {
        if let Some(name) = chunk.trim().strip_prefix("* ") {
            td = Some(name.to_string());
        } else if let (Some(i), Some(name)) = (chunk.find('{'), td.take()) {
            v.push((name, serde_json::from_str(chunk[i..].trim()).unwrap()));
        }
    }
    v
}

/// Log lines of the server that contain every one of `needles`.
fn log_lines(c: &Cluster, needles: &[&str]) -> usize {
    std::fs::read_to_string(c.dir.0.join("server.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .count()
}

/// Serves `what`, waits until the server logged one more line with all of
/// `needles`, and checks that other.org's stored bundle is still `good`
/// and the server still serves.
async fn refused(
    a: &Cluster,
    ep: &Endpoint,
    what: Serve,
    name: &str,
    needles: &[&str],
    good: &(Vec<Value>, Option<u64>),
) {
    let before = log_lines(a, needles);
    let fetched = ep.requests.load(Ordering::SeqCst);
    ep.set(what);
    eventually(&format!("the server refuses {name}"), LONG, || async {
        (log_lines(a, needles) > before).then_some(())
    })
    .await;
    let after = ep.requests.load(Ordering::SeqCst);
    let now = stored(a);
    assert_eq!(now.len(), 1, "{name}: {now:?}");
    assert_eq!(now[0].0, "spiffe://other.org", "{name}");
    assert_eq!(
        &carried(&now[0].1),
        good,
        "{name}: other.org's stored bundle changed"
    );
    a.server_ok(&["healthcheck"]);
    a.server_ok(&["entry", "list"]);
    println!(
        "{name}: refused after {} more request(s) to the endpoint",
        after - fetched
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_federation_endpoint_can_neither_roll_back_swap_nor_flood_the_stored_bundle() {
    let pki = Scratch::new("hostile-web");
    sigil_tests::pki::make_ca(&pki.0, "webca");
    let (cert, key) = sigil_tests::pki::make_server_cert(&pki.0, "webca", "web", "IP:127.0.0.1");
    // Sources of real bundles: other.org, another other.org (other keys),
    // and third.org.
    let other = Cluster::start_td("other.org", "");
    let impostor = Cluster::start_td("other.org", "");
    let third = Cluster::start_td("third.org", "");
    let good_doc = spiffe_doc(&other, 10);
    let good = carried(&good_doc);
    assert!(!good.0.is_empty());
    let ep = Endpoint::start(
        &cert,
        &key,
        Serve::Doc(serde_json::to_vec(&good_doc).unwrap()),
    )
    .await;
    let a = Cluster::start_td(
        "example.org",
        &format!(
            "[[federation]]\ntrust_domain = \"other.org\"\nbundle_endpoint_url = \"https://127.0.0.1:{}/\"\nprofile = \"https_web\"\nca_bundle_path = \"{}/webca.pem\"\n",
            ep.port,
            pki.0.display()
        ),
    );
    eventually("other.org's bundle, sequence 10, stored", LONG, || async {
        stored(&a)
            .first()
            .is_some_and(|(td, d)| td == "spiffe://other.org" && carried(d) == good)
            .then_some(())
    })
    .await;

    // (a) Rolled back: other keys, a lower sequence.
    let rolled = spiffe_doc(&impostor, 5);
    assert_ne!(carried(&rolled).0, good.0);
    refused(
        &a,
        &ep,
        Serve::Doc(serde_json::to_vec(&rolled).unwrap()),
        "a rolled-back bundle",
        &[
            "refused federated bundle",
            "trust_domain=other.org",
            "5 is older than the stored bundle's 10 (a rollback)",
        ],
        &good,
    )
    .await;

    // (a') The same without a sequence: it would reset the stored
    // sequence to 0, and then any rollback would pass.
    let mut unsequenced = rolled.clone();
    unsequenced
        .as_object_mut()
        .unwrap()
        .remove("spiffe_sequence");
    refused(
        &a,
        &ep,
        Serve::Doc(serde_json::to_vec(&unsequenced).unwrap()),
        "a bundle without a sequence",
        &[
            "refused federated bundle",
            "trust_domain=other.org",
            "missing, and the stored bundle's is 10",
        ],
        &good,
    )
    .await;

    // (b) third.org's CA (and JWT keys) served as other.org's, with a
    // higher sequence, so that the rollback rule alone would take it.
    let foreign = spiffe_doc(&third, 20);
    refused(
        &a,
        &ep,
        Serve::Doc(serde_json::to_vec(&foreign).unwrap()),
        "another trust domain's CA",
        &[
            "refused federated bundle",
            "trust_domain=other.org",
            "an X.509 authority names trust domain third.org, not other.org",
        ],
        &good,
    )
    .await;

    // (c) 64 MiB, chunked.
    let pid = a.server_pid().unwrap();
    let rss_before = sigil_tests::rss_kib(pid);
    refused(
        &a,
        &ep,
        Serve::Huge(64 << 20),
        "a 64 MiB body",
        &[
            "bundle endpoint fetch failed",
            "trust_domain=other.org",
            "length limit exceeded",
        ],
        &good,
    )
    .await;
    let rss_after = sigil_tests::rss_kib(pid);
    // The endpoint's writer notices the hang-up when its next write fails.
    let written = eventually("the endpoint sees the hang-up", LONG, || async {
        let w = ep.huge_written.load(Ordering::SeqCst);
        (w > 0).then_some(w)
    })
    .await;
    println!(
        "64 MiB body: server RSS {rss_before} KiB before, {rss_after} KiB after; the endpoint wrote {} KiB before the server hung up",
        written / 1024
    );
    assert!(
        written < 32 << 20,
        "the server read {written} bytes of a 64 MiB body"
    );
    assert!(
        rss_after.saturating_sub(rss_before) < 16 * 1024,
        "server RSS grew from {rss_before} KiB to {rss_after} KiB"
    );

    // (d) Not JSON.
    refused(
        &a,
        &ep,
        Serve::Doc(b"{\"keys\": [ {\"use\": \"x509-svid\", ".to_vec()),
        "malformed JSON",
        &[
            "bundle endpoint fetch failed",
            "trust_domain=other.org",
            "SPIFFE bundle:",
        ],
        &good,
    )
    .await;

    // (e) A body trickled a byte a second: cut off after 10 s.
    refused(
        &a,
        &ep,
        Serve::Trickle,
        "a trickled body",
        &[
            "bundle endpoint fetch failed",
            "trust_domain=other.org",
            "body: not complete within 10s",
        ],
        &good,
    )
    .await;

    // The endpoint, good again with a newer sequence, is followed.
    let newer = spiffe_doc(&other, 11);
    ep.set(Serve::Doc(serde_json::to_vec(&newer).unwrap()));
    eventually("other.org's bundle, sequence 11, stored", LONG, || async {
        stored(&a)
            .first()
            .is_some_and(|(_, d)| carried(d) == carried(&newer))
            .then_some(())
    })
    .await;
}
