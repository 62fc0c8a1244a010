//! End-to-end: the SPIFFE Broker API on the real agent, driven by the
//! `spiffe` crate's Broker API client (its `SecurityHeader` interceptor and
//! its `WorkloadPIDReference` conversion). The test process is the broker:
//! it gets its own X.509-SVID (`spiffe://example.org/orchestrator`, matched
//! by its binary's path) over the Workload API, connects to the broker
//! socket over mTLS checking that the agent presents the agent's SPIFFE ID,
//! and asks for the identities of a tool process it started (a copy of
//! `sleep`, its own entry by path). The agent attests the tool itself.
//!
//! Refused: no security header (InvalidArgument), a broker not in
//! `authorized_brokers` (PermissionDenied, the tool's own SVID used as a
//! client certificate), no client certificate (handshake), a Kubernetes
//! object reference (InvalidArgument), a PID with no process (NotFound).
//! The X.509 stream ends when the tool exits.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a test failure"
)]

use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use sigil_tests::{Cluster, eventually};
use spiffe::broker_api::SecurityHeader;
use spiffe::broker_api::pb::spiffe::broker::api_client::ApiClient;
use spiffe::broker_api::pb::spiffe::broker::{
    FetchJwtsvidRequest, KubernetesObjectKey, KubernetesObjectReference, KubernetesObjectType,
    SubscribeToX509BundlesRequest, SubscribeToX509svidRequest, WorkloadPidReference,
    WorkloadReference,
};
use tonic::transport::{Channel, Endpoint};

const LONG: Duration = Duration::from_secs(30);
const AGENT: &str = "spiffe://example.org/test-agent";
const BROKER: &str = "spiffe://example.org/orchestrator";
const TOOL: &str = "spiffe://example.org/tool";

/// An mTLS channel to the broker socket presenting `svid` (chain DER, key
/// PKCS#8) or no certificate, accepting only the agent's SPIFFE ID.
async fn channel(
    socket: std::path::PathBuf,
    bundle: Vec<Vec<u8>>,
    svid: Option<(Vec<Vec<u8>>, Vec<u8>)>,
) -> Result<Channel, tonic::transport::Error> {
    let svid = svid.as_ref().map(|(c, k)| (c.as_slice(), k.as_slice()));
    let tls = sigil_tests::svid_tls_connector(svid, bundle, AGENT);
    Endpoint::from_static("http://broker")
        .connect_with_connector(tower::service_fn(move |_| {
            let (tls, socket) = (tls.clone(), socket.clone());
            async move {
                let sock = tokio::net::UnixStream::connect(&socket).await?;
                let name = ServerName::try_from("sigil-agent").unwrap();
                let s = tls.connect(name, sock).await?;
                Ok::<_, std::io::Error>(TokioIo::new(s))
            }
        }))
        .await
}

fn pid_ref(pid: u32) -> Option<WorkloadReference> {
    Some(WorkloadReference::from(WorkloadPidReference {
        pid: i32::try_from(pid).unwrap(),
    }))
}

#[tokio::test]
async fn a_broker_gets_the_identities_of_a_process_it_names_by_pid() {
    let mut c = Cluster::start();
    let socket = c.dir.0.join("broker/broker.sock");
    c.start_agent_with(
        AGENT,
        &format!(
            "[broker]\nsocket_path = \"{}\"\nauthorized_brokers = [\"{BROKER}\"]\n",
            socket.display()
        ),
    );
    let me = std::env::current_exe().unwrap();
    c.create_entry(
        BROKER,
        &["--selector", &format!("unix:path:{}", me.display())],
    );
    let tool_bin = c.dir.0.join("tool-sleep");
    std::fs::copy("/bin/sleep", &tool_bin).unwrap();
    c.create_entry(
        TOOL,
        &["--selector", &format!("unix:path:{}", tool_bin.display())],
    );

    // The broker's own SVID, over the Workload API.
    let wl = spiffe::WorkloadApiClient::connect_to(c.api_addr())
        .await
        .unwrap();
    let mine = eventually("the broker's SVID", LONG, || async {
        wl.fetch_x509_svid()
            .await
            .ok()
            .filter(|s| s.spiffe_id().to_string() == BROKER)
    })
    .await;
    let chain: Vec<Vec<u8>> = mine
        .cert_chain()
        .iter()
        .map(|c| c.as_ref().to_vec())
        .collect();
    let key = mine.private_key().as_ref().to_vec();
    let bundle: Vec<Vec<u8>> = wl
        .fetch_x509_bundles()
        .await
        .unwrap()
        .get(&spiffe::TrustDomain::new("example.org").unwrap())
        .unwrap()
        .authorities()
        .iter()
        .map(|a| a.as_ref().to_vec())
        .collect();

    let mut tool = std::process::Command::new(&tool_bin)
        .arg("300")
        .spawn()
        .unwrap();
    let ch = channel(socket.clone(), bundle.clone(), Some((chain, key)))
        .await
        .unwrap();
    let mut broker = ApiClient::with_interceptor(ch.clone(), SecurityHeader::new());

    // The tool's X.509-SVID, attested by the agent from the PID alone.
    let tool_pid = tool.id();
    let mut st = eventually("the tool's SVID through the broker", LONG, || {
        let mut broker = broker.clone();
        async move {
            broker
                .subscribe_to_x509svid(SubscribeToX509svidRequest {
                    reference: pid_ref(tool_pid),
                })
                .await
                .ok()
                .map(tonic::Response::into_inner)
        }
    })
    .await;
    let first = st.message().await.unwrap().unwrap();
    assert_eq!(first.svids.len(), 1);
    let svid = &first.svids[0];
    assert_eq!(svid.spiffe_id, TOOL);
    let leaf = sigil_core::x509::split_der_certs(&svid.x509_svid).unwrap();
    let info = sigil_core::x509::SvidInfo::from_der(&leaf[0]).unwrap();
    assert_eq!(info.spiffe_id.to_string(), TOOL);
    assert_eq!(svid.bundle, bundle.concat());

    let b = broker
        .subscribe_to_x509_bundles(SubscribeToX509BundlesRequest {
            reference: pid_ref(tool.id()),
        })
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap();
    assert_eq!(b.bundles["spiffe://example.org"], bundle.concat());

    let jwt = broker
        .fetch_jwtsvid(FetchJwtsvidRequest {
            reference: pid_ref(tool.id()),
            audience: vec!["tools-api".into()],
            spiffe_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(jwt.svids.len(), 1);
    let claims = sigil_core::jwt::peek_claims(&jwt.svids[0].svid).unwrap();
    assert_eq!(claims["sub"], TOOL);

    // Refusals.
    let mut no_header = ApiClient::new(ch.clone());
    let e = no_header
        .subscribe_to_x509svid(SubscribeToX509svidRequest {
            reference: pid_ref(tool.id()),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    let k8s = WorkloadReference::from(KubernetesObjectReference {
        r#type: Some(KubernetesObjectType {
            plural: "pods".into(),
            group: "core".into(),
        }),
        key: Some(KubernetesObjectKey {
            namespace: "default".into(),
            name: "web-0".into(),
        }),
        uid: String::new(),
    });
    let e = broker
        .subscribe_to_x509svid(SubscribeToX509svidRequest {
            reference: Some(k8s),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("reference"), "{}", e.message());
    // The tool's own SVID is valid in the trust domain, but it is no broker.
    let tool_chain = sigil_core::x509::split_der_certs(&svid.x509_svid).unwrap();
    let imposter = channel(
        socket.clone(),
        bundle.clone(),
        Some((tool_chain, svid.x509_svid_key.to_vec())),
    )
    .await
    .unwrap();
    let e = ApiClient::with_interceptor(imposter, SecurityHeader::new())
        .subscribe_to_x509svid(SubscribeToX509svidRequest {
            reference: pid_ref(tool.id()),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    // Without a client certificate the handshake is refused.
    let anonymous = match channel(socket.clone(), bundle.clone(), None).await {
        Err(_) => None,
        Ok(ch) => Some(
            ApiClient::with_interceptor(ch, SecurityHeader::new())
                .subscribe_to_x509svid(SubscribeToX509svidRequest {
                    reference: pid_ref(tool.id()),
                })
                .await,
        ),
    };
    assert!(
        anonymous.is_none_or(|r| r.is_err()),
        "a broker without a certificate was served"
    );

    // The tool exits: its stream ends, and its PID names no one.
    let pid = tool.id();
    tool.kill().unwrap();
    tool.wait().unwrap();
    let end = tokio::time::timeout(LONG, st.message())
        .await
        .expect("the stream to end within the deadline");
    let e = end.expect_err("the stream of an exited process ends with an error");
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    let e = broker
        .subscribe_to_x509svid(SubscribeToX509svidRequest {
            reference: pid_ref(pid),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
}
