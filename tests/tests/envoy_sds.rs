//! End-to-end: Envoy's Secret Discovery Service v3 on the real agent's
//! Workload API socket, driven by a client generated from Envoy's SDS
//! protos (sigil-proto's `envoy` module: Envoy's packages and field
//! numbers). No Envoy binary can be installed on this machine, so Envoy
//! itself was not run: this client sends what Envoy sends (a node, the
//! Secret type URL, resource names, ACKs and NACKs, and no
//! `workload.spiffe.io` header).
//!
//! Checked: SPIRE's names (`default`, `ROOTCA`, `ALL` with the SPIFFE
//! validator, SPIFFE IDs and `spiffe://<td>`), the certificate and key
//! (openssl: the key is the certificate's), every SVID and trust domain
//! when no name is asked for, a push when a federated bundle arrives and
//! on rotation, a NACK logged and not answered, FetchSecrets, and
//! DeltaSecrets Unimplemented.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a test failure"
)]

use std::collections::BTreeMap;
use std::time::Duration;

use prost::Message;
use sigil_proto::envoy::core::{Node, data_source};
use sigil_proto::envoy::discovery::{DiscoveryRequest, DiscoveryResponse};
use sigil_proto::envoy::secret::secret_discovery_service_client::SecretDiscoveryServiceClient;
use sigil_proto::envoy::tls::{Secret, SpiffeCertValidatorConfig, secret};
use sigil_proto::envoy::{SECRET_TYPE_URL, SPIFFE_VALIDATOR_NAME, SPIFFE_VALIDATOR_TYPE_URL};
use sigil_proto::google::rpc::Status as RpcStatus;
use sigil_tests::{Cluster, eventually, log_count, my_uid_selector, openssl, pki};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::Channel;

const LONG: Duration = Duration::from_secs(60);
const ID: &str = "spiffe://example.org/envoy-front";
const TD: &str = "spiffe://example.org";
const OTHER: &str = "spiffe://other.org";

async fn client(c: &Cluster) -> SecretDiscoveryServiceClient<Channel> {
    let ch = sigil_proto::unix::channel(&c.api_socket()).await.unwrap();
    SecretDiscoveryServiceClient::new(ch)
}

fn request(names: &[&str], last: Option<&DiscoveryResponse>) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: last.map(|r| r.version_info.clone()).unwrap_or_default(),
        node: Some(Node {
            id: "envoy-test".into(),
            cluster: "front".into(),
        }),
        resource_names: names.iter().map(|s| s.to_string()).collect(),
        type_url: SECRET_TYPE_URL.into(),
        response_nonce: last.map(|r| r.nonce.clone()).unwrap_or_default(),
        error_detail: None,
    }
}

/// Secrets of a response by name, every resource checked to be a Secret.
fn secrets(r: &DiscoveryResponse) -> BTreeMap<String, Secret> {
    assert_eq!(r.type_url, SECRET_TYPE_URL);
    r.resources
        .iter()
        .map(|a| {
            assert_eq!(a.type_url, SECRET_TYPE_URL);
            let s = Secret::decode(a.value.as_slice()).unwrap();
            (s.name.clone(), s)
        })
        .collect()
}

fn inline(ds: &Option<sigil_proto::envoy::core::DataSource>) -> Vec<u8> {
    match ds.as_ref().and_then(|d| d.specifier.as_ref()) {
        Some(data_source::Specifier::InlineBytes(b)) => b.clone(),
        other => panic!("expected inline bytes, got {other:?}"),
    }
}

/// (chain PEM, key PEM) of a tls_certificate secret.
fn tls(s: &Secret) -> (Vec<u8>, Vec<u8>) {
    match &s.r#type {
        Some(secret::Type::TlsCertificate(t)) => {
            (inline(&t.certificate_chain), inline(&t.private_key))
        }
        other => panic!("{}: expected tls_certificate, got {other:?}", s.name),
    }
}

fn trusted_ca(s: &Secret) -> Vec<u8> {
    match &s.r#type {
        Some(secret::Type::ValidationContext(v)) => inline(&v.trusted_ca),
        other => panic!("{}: expected validation_context, got {other:?}", s.name),
    }
}

/// The leaf's URI SAN and serial.
fn leaf(chain_pem: &[u8]) -> (String, String) {
    let pems = pem::parse_many(chain_pem).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(pems[0].contents()).unwrap();
    let san = cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .find_map(|g| match g {
            x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .unwrap();
    (san, cert.raw_serial_as_string())
}

async fn next(st: &mut Streaming<DiscoveryResponse>) -> DiscoveryResponse {
    tokio::time::timeout(LONG, st.message())
        .await
        .expect("an SDS response within the deadline")
        .unwrap()
        .expect("the stream is open")
}

#[tokio::test]
async fn envoy_sds_serves_spire_named_secrets_and_pushes_updates() {
    let mut c = Cluster::start();
    c.start_agent("spiffe://example.org/test-agent");
    c.create_entry(
        ID,
        &[
            "--selector",
            &my_uid_selector(),
            "--x509-ttl",
            "30s",
            "--federates-with",
            OTHER,
        ],
    );
    let dir = c.dir.0.clone();

    // Every SVID and trust domain: no names asked.
    let mut all = client(&c).await;
    let (all_tx, all_rx) = mpsc::channel(8);
    all_tx.send(request(&[], None)).await.unwrap();
    let mut all_st = all
        .stream_secrets(ReceiverStream::new(all_rx))
        .await
        .unwrap()
        .into_inner();
    let first = next(&mut all_st).await;
    let got = secrets(&first);
    assert_eq!(
        got.keys().cloned().collect::<Vec<_>>(),
        vec![TD.to_string(), ID.to_string()],
        "{got:?}"
    );
    let (chain, key) = tls(&got[ID]);
    assert_eq!(leaf(&chain).0, ID);
    // The key is the certificate's (openssl, not this code, compares them).
    std::fs::write(dir.join("sds-chain.pem"), &chain).unwrap();
    std::fs::write(dir.join("sds-key.pem"), &key).unwrap();
    std::fs::write(dir.join("sds-td.pem"), trusted_ca(&got[TD])).unwrap();
    openssl(
        &dir,
        &[
            "x509",
            "-in",
            "sds-chain.pem",
            "-noout",
            "-pubkey",
            "-out",
            "pub1.pem",
        ],
    );
    openssl(
        &dir,
        &["pkey", "-in", "sds-key.pem", "-pubout", "-out", "pub2.pem"],
    );
    assert_eq!(
        std::fs::read(dir.join("pub1.pem")).unwrap(),
        std::fs::read(dir.join("pub2.pem")).unwrap()
    );
    openssl(&dir, &["verify", "-CAfile", "sds-td.pem", "sds-chain.pem"]);
    all_tx.send(request(&[], Some(&first))).await.unwrap(); // ACK

    // SPIRE's aliases, asked by name.
    let mut named = client(&c).await;
    let (tx, rx) = mpsc::channel(8);
    tx.send(request(
        &["default", "ROOTCA", "ALL", "spiffe://nobody.org"],
        None,
    ))
    .await
    .unwrap();
    let mut st = named
        .stream_secrets(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let r1 = next(&mut st).await;
    let got = secrets(&r1);
    // A name the caller is not entitled to is left out.
    assert_eq!(
        got.keys().cloned().collect::<Vec<_>>(),
        vec![
            "ALL".to_string(),
            "ROOTCA".to_string(),
            "default".to_string()
        ]
    );
    let (default_chain, _) = tls(&got["default"]);
    assert_eq!(leaf(&default_chain).0, ID);
    let root = trusted_ca(&got["ROOTCA"]);
    assert_eq!(root, std::fs::read(dir.join("sds-td.pem")).unwrap());
    let Some(secret::Type::ValidationContext(v)) = &got["ALL"].r#type else {
        panic!("ALL is not a validation context");
    };
    let validator = v.custom_validator_config.as_ref().unwrap();
    assert_eq!(validator.name, SPIFFE_VALIDATOR_NAME);
    let typed = validator.typed_config.as_ref().unwrap();
    assert_eq!(typed.type_url, SPIFFE_VALIDATOR_TYPE_URL);
    let cfg = SpiffeCertValidatorConfig::decode(typed.value.as_slice()).unwrap();
    assert_eq!(cfg.trust_domains.len(), 1, "other.org has no bundle yet");
    assert_eq!(cfg.trust_domains[0].name, "example.org");
    assert_eq!(inline(&cfg.trust_domains[0].trust_bundle), root);

    // A NACK is logged and not answered.
    let before = log_count(&dir, "agent.log", "SDS client rejected secrets");
    let mut nack = request(&["default", "ROOTCA", "ALL"], Some(&r1));
    nack.error_detail = Some(RpcStatus {
        code: 3,
        message: "test: certificate rejected".into(),
        details: vec![],
    });
    tx.send(nack).await.unwrap();
    // (Polled asynchronously: this runtime's one thread also sends the NACK.)
    eventually("the NACK in the agent log", LONG, || async {
        (log_count(&dir, "agent.log", "SDS client rejected secrets") > before).then_some(())
    })
    .await;

    // A federated bundle arrives: the stream without names gets it pushed.
    let other_ca = pki::make_ca(&dir, "other-ca");
    c.server_ok(&[
        "bundle",
        "set",
        "--id",
        OTHER,
        "--format",
        "pem",
        "--path",
        other_ca.to_str().unwrap(),
    ]);
    let pushed = loop {
        let r = next(&mut all_st).await;
        if secrets(&r).contains_key(OTHER) {
            break r;
        }
        all_tx.send(request(&[], Some(&r))).await.unwrap();
    };
    assert!(pushed.version_info != first.version_info);
    let other_pem = std::fs::read(&other_ca).unwrap();
    let other_der = pem::parse(&other_pem).unwrap();
    let sent = pem::parse(trusted_ca(&secrets(&pushed)[OTHER])).unwrap();
    assert_eq!(sent.contents(), other_der.contents());

    // Rotation (30 s SVIDs renew at about half-life): the named stream
    // gets a new default certificate, with ALL now holding other.org too.
    let serial = leaf(&default_chain).1;
    let rotated = loop {
        let r = next(&mut st).await;
        // Nothing answered the NACK: every later response carries changes.
        assert_ne!(
            r.resources, r1.resources,
            "the NACKed response was sent again"
        );
        let s = secrets(&r);
        if let Some(d) = s.get("default")
            && leaf(&tls(d).0).1 != serial
        {
            break s;
        }
        tx.send(request(&["default", "ROOTCA", "ALL"], Some(&r)))
            .await
            .unwrap();
    };
    assert_eq!(leaf(&tls(&rotated["default"]).0).0, ID);
    let Some(secret::Type::ValidationContext(v)) = &rotated["ALL"].r#type else {
        panic!("ALL is not a validation context");
    };
    let typed = v
        .custom_validator_config
        .as_ref()
        .unwrap()
        .typed_config
        .as_ref()
        .unwrap();
    let tds: Vec<String> = SpiffeCertValidatorConfig::decode(typed.value.as_slice())
        .unwrap()
        .trust_domains
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(
        tds,
        vec!["example.org".to_string(), "other.org".to_string()]
    );

    // FetchSecrets answers once; DeltaSecrets is not served.
    let mut once = client(&c).await;
    let r = once
        .fetch_secrets(request(&["default"], None))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        secrets(&r).keys().cloned().collect::<Vec<_>>(),
        vec!["default".to_string()]
    );
    let delta = once
        .delta_secrets(tokio_stream::iter(Vec::<
            sigil_proto::envoy::discovery::DeltaDiscoveryRequest,
        >::new()))
        .await;
    assert_eq!(delta.unwrap_err().code(), tonic::Code::Unimplemented);
    // A wrong type URL is refused naming the field.
    let mut bad = request(&["default"], None);
    bad.type_url = "type.googleapis.com/envoy.config.cluster.v3.Cluster".into();
    let e = once.fetch_secrets(bad).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("type_url"), "{}", e.message());
}
