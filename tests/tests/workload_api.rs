//! End-to-end: the real server and agent binaries, with the public `spiffe`
//! crate as the Workload API client.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a test failure"
)]

use std::process::Command;
use std::time::Duration;

use sigil_tests::{Cluster, Scratch, bin, my_uid_selector, wait_for};
use spiffe::{TrustDomain, WorkloadApiClient, WorkloadApiError};
use tokio_stream::StreamExt;
use x509_parser::prelude::{FromDer, X509Certificate};

const LONG: Duration = Duration::from_secs(15);

fn leaf_serial(der: &[u8]) -> String {
    let (_, c) = X509Certificate::from_der(der).unwrap();
    c.raw_serial_as_string()
}

fn not_after(der: &[u8]) -> i64 {
    let (_, c) = X509Certificate::from_der(der).unwrap();
    c.validity().not_after.timestamp()
}

#[tokio::test]
async fn spiffe_crate_fetches_svid_key_bundle_and_hint() {
    let c = Cluster::with_agent();
    let sel = my_uid_selector();
    c.create_entry(
        "spiffe://example.org/myservice",
        &[
            "--selector",
            &sel,
            "--x509-ttl",
            "5m",
            "--dns",
            "example.org",
            "--hint",
            "myservice",
        ],
    );

    let client = WorkloadApiClient::connect_to(c.api_addr()).await.unwrap();
    let mut ctx = None;
    for _ in 0..100 {
        match client.fetch_x509_context().await {
            Ok(x) => {
                ctx = Some(x);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let ctx = ctx.expect("no X.509 context");
    let svid = ctx.default_svid().unwrap();
    assert_eq!(
        svid.spiffe_id().to_string(),
        "spiffe://example.org/myservice"
    );
    assert_eq!(svid.hint(), Some("myservice"));
    let leaf = svid.leaf().as_bytes();
    let ttl = not_after(leaf) - sigil_core_now();
    assert!((250..=305).contains(&ttl), "x509 ttl {ttl}");
    let td = TrustDomain::new("example.org").unwrap();
    let bundle = ctx.bundle_set().get(&td).expect("own bundle");
    assert_eq!(bundle.authorities().len(), 1);

    // The bundle RPC agrees.
    let bundles = client.fetch_x509_bundles().await.unwrap();
    assert_eq!(
        bundles.get(&td).unwrap().authorities()[0].as_bytes(),
        bundle.authorities()[0].as_bytes()
    );

    // openssl verifies the chain written by `sigil-agent api fetch x509 --write`.
    let out_dir = c.dir.0.join("out");
    let out = Command::new(bin("sigil-agent"))
        .args(["api", "fetch", "x509", "--socket"])
        .arg(c.api_addr())
        .arg("--write")
        .arg(&out_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("spiffe://example.org/myservice"),
        "{stdout}"
    );
    let v = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(out_dir.join("bundle.pem"))
        .arg(out_dir.join("svid.pem"))
        .output()
        .unwrap();
    assert!(
        v.status.success(),
        "openssl verify: {}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(out_dir.join("svid.key"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let text = Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(out_dir.join("svid.pem"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("URI:spiffe://example.org/myservice"),
        "{text}"
    );
    assert!(text.contains("DNS:example.org"), "{text}");
    assert!(text.contains("CA:FALSE"), "{text}");
    assert!(!text.contains("Certificate Sign"), "{text}");
}

fn sigil_core_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[tokio::test]
async fn stream_delivers_entry_update_and_delete() {
    let c = Cluster::with_agent();
    let sel = my_uid_selector();
    let id = c.create_entry("spiffe://example.org/v1", &["--selector", &sel]);
    let client = WorkloadApiClient::connect_to(c.api_addr()).await.unwrap();
    let mut stream = None;
    for _ in 0..100 {
        if let Ok(s) = client.stream_x509_contexts().await {
            stream = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut stream = stream.expect("stream");
    let first = tokio::time::timeout(LONG, stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        first.default_svid().unwrap().spiffe_id().to_string(),
        "spiffe://example.org/v1"
    );

    c.server_ok(&[
        "entry",
        "update",
        &id,
        "--spiffe-id",
        "spiffe://example.org/v2",
    ]);
    let start = std::time::Instant::now();
    let next = tokio::time::timeout(LONG, stream.next())
        .await
        .expect("no update after entry update")
        .unwrap()
        .unwrap();
    eprintln!(
        "entry update reached the workload stream after {:?}",
        start.elapsed()
    );
    assert_eq!(
        next.default_svid().unwrap().spiffe_id().to_string(),
        "spiffe://example.org/v2"
    );

    // Deleting the last entry takes the identity away: the stream ends with PermissionDenied.
    c.server_ok(&["entry", "delete", &id]);
    let end = tokio::time::timeout(LONG, stream.next())
        .await
        .expect("no message after delete");
    match end {
        Some(Err(WorkloadApiError::NoIdentityIssued | WorkloadApiError::PermissionDenied(_))) => {}
        other => panic!(
            "expected permission denied after delete, got {:?}",
            other.map(|r| r.map(|_| "context"))
        ),
    }
}

#[tokio::test]
async fn svid_rotates_before_expiry() {
    let c = Cluster::with_agent();
    let sel = my_uid_selector();
    c.create_entry(
        "spiffe://example.org/short",
        &["--selector", &sel, "--x509-ttl", "4s"],
    );
    let client = WorkloadApiClient::connect_to(c.api_addr()).await.unwrap();
    let mut stream = None;
    for _ in 0..100 {
        if let Ok(s) = client.stream_x509_svids().await {
            stream = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut stream = stream.unwrap();
    let first = tokio::time::timeout(LONG, stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let first_serial = leaf_serial(first.leaf().as_bytes());
    let first_expiry = not_after(first.leaf().as_bytes());
    let second = tokio::time::timeout(LONG, stream.next())
        .await
        .expect("no rotation")
        .unwrap()
        .unwrap();
    let received_at = sigil_core_now();
    assert_ne!(
        leaf_serial(second.leaf().as_bytes()),
        first_serial,
        "rotation must bring a new certificate"
    );
    assert!(
        received_at < first_expiry,
        "rotated SVID arrived at {received_at}, after the old one expired at {first_expiry}"
    );
    assert!(not_after(second.leaf().as_bytes()) > first_expiry);
}

#[tokio::test]
async fn request_without_security_header_is_invalid_argument() {
    let c = Cluster::with_agent();
    c.create_entry(
        "spiffe://example.org/x",
        &["--selector", &my_uid_selector()],
    );
    let path = c.api_socket();
    let ch = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let p = path.clone();
            async move {
                tokio::net::UnixStream::connect(p)
                    .await
                    .map(hyper_util::rt::TokioIo::new)
            }
        }))
        .await
        .unwrap();
    let mut raw =
        sigil_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(ch);
    let err = raw
        .fetch_x509svid(sigil_proto::workload::X509svidRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    let mut req = tonic::Request::new(sigil_proto::workload::X509svidRequest {});
    req.metadata_mut()
        .insert("workload.spiffe.io", "false".parse().unwrap());
    let err = raw.fetch_x509svid(req).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
}

#[tokio::test]
async fn unregistered_uid_gets_permission_denied() {
    let c = Cluster::with_agent();
    let me = sigil_tests::my_uid();
    // An entry for a uid that is not the prober's.
    let probe_dir = Scratch::new("probe");
    let probe = probe_dir.0.join("spiffe-probe");
    std::fs::copy(bin("spiffe-probe"), &probe).unwrap();
    let run_probe = |as_other: bool| {
        let mut cmd = if as_other {
            let mut c = Command::new("setpriv");
            c.args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
                .arg(&probe);
            c
        } else {
            Command::new(&probe)
        };
        let out = cmd.arg(c.api_addr()).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    if me == 0 {
        // As root: register root, probe as nobody (65534).
        c.create_entry(
            "spiffe://example.org/root-only",
            &["--selector", "unix:uid:0"],
        );
        wait_for("root gets its SVID", LONG, || {
            run_probe(false).starts_with("OK ")
        });
        let out = run_probe(true);
        assert!(
            out.starts_with("ERR permission_denied"),
            "uid 65534 got: {out}"
        );
    } else {
        // Unprivileged: register another uid, probe as ourselves.
        c.create_entry(
            "spiffe://example.org/other",
            &["--selector", &format!("unix:uid:{}", me + 1)],
        );
        std::thread::sleep(Duration::from_millis(500));
        let out = run_probe(false);
        assert!(
            out.starts_with("ERR permission_denied"),
            "uid {me} got: {out}"
        );
    }
}
