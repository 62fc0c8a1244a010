//! End-to-end: JWT-SVIDs through the public `spiffe` crate, federation
//! between two Sigil trust domains, and CA/JWT key rotation.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a test failure"
)]

use std::process::{Command, Stdio};
use std::time::Duration;

use sigil_tests::{Cluster, bin, my_uid_selector, openssl};
use spiffe::{JwtSvid, TrustDomain, WorkloadApiClient};
use tokio_stream::StreamExt;

async fn client(c: &Cluster) -> WorkloadApiClient {
    WorkloadApiClient::connect_to(c.api_addr()).await.unwrap()
}

/// Retries `f` until it succeeds (the agent may still be minting).
async fn eventually<T, E: std::fmt::Debug, F: std::future::Future<Output = Result<T, E>>>(
    mut f: impl FnMut() -> F,
) -> T {
    let mut last = None;
    for _ in 0..150 {
        match f().await {
            Ok(v) => return v,
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("never succeeded: {last:?}");
}

#[tokio::test]
async fn jwt_svids_for_two_entries_selected_by_hint_validate_with_the_spiffe_crate() {
    let c = Cluster::with_agent();
    let sel = my_uid_selector();
    c.create_entry(
        "spiffe://example.org/frontend",
        &["--selector", &sel, "--hint", "frontend", "--jwt-ttl", "2m"],
    );
    c.create_entry(
        "spiffe://example.org/backend",
        &["--selector", &sel, "--hint", "backend"],
    );
    let cl = client(&c).await;

    let all = eventually(|| cl.fetch_all_jwt_svids(["payments"], None)).await;
    let mut ids: Vec<String> = all.iter().map(|s| s.spiffe_id().to_string()).collect();
    ids.sort();
    assert_eq!(
        ids,
        [
            "spiffe://example.org/backend",
            "spiffe://example.org/frontend"
        ]
    );

    let backend = cl
        .fetch_jwt_svid_by_hint(["payments"], None, "backend")
        .await
        .unwrap();
    assert_eq!(
        backend.spiffe_id().to_string(),
        "spiffe://example.org/backend"
    );
    let frontend = cl
        .fetch_jwt_svid_by_hint(["payments"], None, "frontend")
        .await
        .unwrap();
    assert_eq!(
        frontend.spiffe_id().to_string(),
        "spiffe://example.org/frontend"
    );
    let ttl = frontend.expiry().unix_timestamp() - now();
    assert!((100..=121).contains(&ttl), "per-entry jwt ttl: {ttl}");

    // Validate locally against the fetched JWT bundle with the crate's verifier.
    let bundles = cl.fetch_jwt_bundles().await.unwrap();
    let ok = JwtSvid::parse_and_validate(backend.token(), &bundles, &["payments"]).unwrap();
    assert_eq!(ok.spiffe_id().to_string(), "spiffe://example.org/backend");
    assert!(JwtSvid::parse_and_validate(backend.token(), &bundles, &["elsewhere"]).is_err());

    // And through the agent's ValidateJWTSVID.
    let v = cl
        .validate_jwt_token("payments", backend.token())
        .await
        .unwrap();
    assert_eq!(v.spiffe_id().to_string(), "spiffe://example.org/backend");
    assert!(
        cl.validate_jwt_token("elsewhere", backend.token())
            .await
            .is_err()
    );

    // The JWT bundle stream carries the key that signed the token.
    let mut stream = cl.stream_jwt_bundles().await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let td = TrustDomain::new("example.org").unwrap();
    let bundle = first.get(&td).expect("own JWT bundle");
    assert!(bundle.find_jwt_authority(backend.key_id()).is_some());

    // JwtSource (the crate's long-lived, auto-updating source) sees the same.
    let source = spiffe::JwtSource::builder()
        .endpoint(c.api_addr())
        .build()
        .await
        .unwrap();
    let via_source = source.fetch_jwt_svid(["payments"]).await.unwrap();
    let bundles_now = source.bundle_set().unwrap();
    assert!(JwtSvid::parse_and_validate(via_source.token(), &*bundles_now, &["payments"]).is_ok());

    // The CLI agrees.
    let out = Command::new(bin("sigil-agent"))
        .args([
            "api",
            "validate",
            "jwt",
            "--audience",
            "payments",
            "--token",
            backend.token(),
            "--socket",
        ])
        .arg(c.api_addr())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("spiffe://example.org/backend"));
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn set_bundle(on: &Cluster, from: &Cluster) {
    let doc = from.server_ok(&["bundle", "show", "--format", "spiffe"]);
    let mut child = Command::new(bin("sigil-server"))
        .args([
            "bundle",
            "set",
            "--id",
            &format!("spiffe://{}", from.trust_domain),
            "--format",
            "spiffe",
            "--path",
            "-",
        ])
        .env("SIGIL_ADMIN_SOCKET", on.admin_socket())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), doc.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn federated_bundles_reach_only_federating_workloads_and_validate_foreign_jwts() {
    let mut a = Cluster::start_td("example.org", "");
    a.start_agent("spiffe://example.org/agent-a");
    let mut b = Cluster::start_td("other.org", "");
    b.start_agent("spiffe://other.org/agent-b");
    set_bundle(&a, &b);
    let listed = a.server_ok(&["bundle", "list"]);
    assert!(listed.contains("spiffe://other.org"), "{listed}");

    let sel = my_uid_selector();
    a.create_entry("spiffe://example.org/local", &["--selector", &sel]);
    let cl = client(&a).await;
    let ctx = eventually(|| cl.fetch_x509_context()).await;
    let other = TrustDomain::new("other.org").unwrap();
    assert!(
        ctx.bundle_set().get(&other).is_none(),
        "a workload without federates_with must not see other.org"
    );

    a.create_entry(
        "spiffe://example.org/federated",
        &["--selector", &sel, "--federates-with", "spiffe://other.org"],
    );
    let ctx = eventually(|| async {
        let ctx = cl.fetch_x509_context().await.map_err(|e| e.to_string())?;
        if ctx.bundle_set().get(&other).is_some() {
            Ok(ctx)
        } else {
            Err("no other.org bundle yet".to_string())
        }
    })
    .await;
    let fed = ctx.bundle_set().get(&other).unwrap();
    let b_ca = sigil_core_pem(&b.server_ok(&["bundle", "show"]));
    assert_eq!(fed.authorities()[0].as_bytes(), b_ca.as_slice());

    // A JWT-SVID from other.org validates at example.org's agent.
    b.create_entry("spiffe://other.org/caller", &["--selector", &sel]);
    let bcl = client(&b).await;
    let token = eventually(|| bcl.fetch_jwt_token(["example-api"], None)).await;
    let v = eventually(|| cl.validate_jwt_token("example-api", &token)).await;
    assert_eq!(v.spiffe_id().to_string(), "spiffe://other.org/caller");

    // Deleting the bundle withdraws it.
    a.server_ok(&["bundle", "delete", "--id", "spiffe://other.org"]);
    eventually(|| async {
        let ctx = cl.fetch_x509_context().await.map_err(|e| e.to_string())?;
        if ctx.bundle_set().get(&other).is_none() {
            Ok(())
        } else {
            Err("still there".to_string())
        }
    })
    .await;
}

fn sigil_core_pem(text: &str) -> Vec<u8> {
    let b64: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
    let out = Command::new("base64")
        .arg("-d")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = out;
    std::io::Write::write_all(out.stdin.as_mut().unwrap(), b64.as_bytes()).unwrap();
    drop(out.stdin.take());
    out.wait_with_output().unwrap().stdout
}

#[tokio::test]
async fn svids_issued_across_a_ca_rotation_all_verify() {
    // A 24 s CA: the next CA is published at ~12 s and activated at ~20 s.
    let c = Cluster::start_with(
        "ca_ttl = \"24s\"\ndefault_x509_svid_ttl = \"4s\"\ndefault_jwt_svid_ttl = \"4s\"\nagent_svid_ttl = \"6s\"\njwt_key_type = \"ec-p384\"\n",
    );
    let mut c = c;
    c.start_agent("spiffe://example.org/test-agent");
    c.create_entry(
        "spiffe://example.org/rotating",
        &["--selector", &my_uid_selector()],
    );
    let cl = client(&c).await;
    let mut stream = eventually(|| cl.stream_x509_contexts()).await;
    let first_ca = c.server_ok(&["bundle", "show"]);
    let mut issuers = std::collections::BTreeSet::new();
    let mut bundle_sizes = std::collections::BTreeSet::new();
    let mut kids = std::collections::BTreeSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    let out_dir = c.dir.0.join("rot");
    std::fs::create_dir_all(&out_dir).unwrap();
    let mut n = 0;
    while std::time::Instant::now() < deadline {
        let Ok(Some(Ok(ctx))) = tokio::time::timeout(Duration::from_secs(10), stream.next()).await
        else {
            break;
        };
        let svid = ctx.default_svid().unwrap();
        let td = TrustDomain::new("example.org").unwrap();
        let bundle = ctx.bundle_set().get(&td).unwrap();
        bundle_sizes.insert(bundle.authorities().len());
        // Every SVID verifies with openssl against the bundle delivered with it.
        let leaf = pem("CERTIFICATE", svid.leaf().as_bytes());
        let cas: String = bundle
            .authorities()
            .iter()
            .map(|a| pem("CERTIFICATE", a.as_bytes()))
            .collect();
        std::fs::write(out_dir.join(format!("svid{n}.pem")), &leaf).unwrap();
        std::fs::write(out_dir.join(format!("bundle{n}.pem")), &cas).unwrap();
        let v = Command::new("openssl")
            .arg("verify")
            .arg("-CAfile")
            .arg(out_dir.join(format!("bundle{n}.pem")))
            .arg(out_dir.join(format!("svid{n}.pem")))
            .output()
            .unwrap();
        assert!(
            v.status.success(),
            "SVID #{n} failed openssl verify: {}",
            String::from_utf8_lossy(&v.stderr)
        );
        let (_, cert) = x509_parser::parse_x509_certificate(svid.leaf().as_bytes()).unwrap();
        let issuer = bundle
            .authorities()
            .iter()
            .find(|a| {
                let (_, ca) = x509_parser::parse_x509_certificate(a.as_bytes()).unwrap();
                cert.verify_signature(Some(ca.public_key())).is_ok()
            })
            .map(|a| a.as_bytes().to_vec())
            .expect("an authority in the bundle signed the SVID");
        issuers.insert(issuer);
        // A JWT-SVID fetched now verifies (ES384) against the JWT bundle fetched now.
        let token = cl.fetch_jwt_token(["aud"], None).await.unwrap();
        let jwt_bundles = cl.fetch_jwt_bundles().await.unwrap();
        let jwt = JwtSvid::parse_and_validate(&token, &jwt_bundles, &["aud"])
            .unwrap_or_else(|e| panic!("JWT #{n} failed validation: {e}"));
        kids.insert(jwt.key_id().to_string());
        n += 1;
        if issuers.len() >= 2 && bundle_sizes.contains(&2) && kids.len() >= 2 {
            break;
        }
    }
    assert!(
        issuers.len() >= 2,
        "expected SVIDs from at least two CAs, saw {issuers:?} over {n} updates"
    );
    assert!(
        bundle_sizes.contains(&2),
        "the next CA must be published alongside the current one: sizes {bundle_sizes:?}"
    );
    assert_ne!(
        c.server_ok(&["bundle", "show"]),
        first_ca,
        "the published bundle should have changed"
    );
    // JWT keys rotate on the same schedule; a token still validates.
    let token = eventually(|| cl.fetch_jwt_token(["aud"], None)).await;
    eventually(|| cl.validate_jwt_token("aud", &token)).await;
}

fn pem(tag: &str, der: &[u8]) -> String {
    use std::fmt::Write;
    let b64 = {
        let out = Command::new("base64")
            .arg("-w64")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = out;
        std::io::Write::write_all(out.stdin.as_mut().unwrap(), der).unwrap();
        drop(out.stdin.take());
        String::from_utf8(out.wait_with_output().unwrap().stdout).unwrap()
    };
    let mut s = String::new();
    let _ = write!(s, "-----BEGIN {tag}-----\n{b64}-----END {tag}-----\n");
    s
}

/// A throwaway Web PKI: a CA and a server certificate for 127.0.0.1.
fn web_pki(dir: &std::path::Path) {
    openssl(
        dir,
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "webca.key",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            "webca.key",
            "-out",
            "webca.pem",
            "-days",
            "1",
            "-subj",
            "/CN=Test Web CA",
        ],
    );
    openssl(
        dir,
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "web.key",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-key",
            "web.key",
            "-out",
            "web.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "web.csr",
            "-CA",
            "webca.pem",
            "-CAkey",
            "webca.key",
            "-CAcreateserial",
            "-out",
            "web.pem",
            "-days",
            "1",
            "-extfile",
            "ext.cnf",
        ],
    );
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.join("web.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
}

#[tokio::test]
async fn two_servers_federate_through_their_bundle_endpoints() {
    let pki = sigil_tests::Scratch::new("webpki");
    web_pki(&pki.0);
    let (pa, pb) = (sigil_tests::free_port(), sigil_tests::free_port());
    let d = pki.0.display();
    // example.org serves https_spiffe and pulls other.org over https_web;
    // other.org serves https_web and pulls example.org over https_spiffe.
    let a = Cluster::start_td(
        "example.org",
        &format!(
            "[bundle_endpoint]\nport = {pa}\nprofile = \"https_spiffe\"\nrefresh_hint = \"1s\"\n\n[[federation]]\ntrust_domain = \"other.org\"\nbundle_endpoint_url = \"https://127.0.0.1:{pb}/\"\nprofile = \"https_web\"\nca_bundle_path = \"{d}/webca.pem\"\n"
        ),
    );
    let b = Cluster::start_td(
        "other.org",
        &format!(
            "[bundle_endpoint]\nport = {pb}\nprofile = \"https_web\"\ncert_path = \"{d}/web.pem\"\nkey_path = \"{d}/web.key\"\nrefresh_hint = \"1s\"\n\n[[federation]]\ntrust_domain = \"example.org\"\nbundle_endpoint_url = \"https://127.0.0.1:{pa}/\"\nprofile = \"https_spiffe\"\nendpoint_spiffe_id = \"spiffe://example.org/sigil/server\"\n"
        ),
    );
    // https_web needs no bootstrap: example.org learns other.org by itself.
    let list = |c: &Cluster| -> serde_json::Value {
        let out = c.server_ok(&["bundle", "list", "--format", "spiffe"]);
        let docs: Vec<serde_json::Value> = out
            .split("****************************************")
            .filter_map(|chunk| chunk.find('{').map(|i| &chunk[i..]))
            .filter_map(|j| serde_json::from_str(j.trim()).ok())
            .collect();
        serde_json::Value::Array(docs)
    };
    sigil_tests::wait_for(
        "example.org fetches other.org's bundle",
        Duration::from_secs(20),
        || {
            a.server_ok(&["bundle", "list"])
                .contains("spiffe://other.org")
        },
    );
    let fetched = &list(&a)[0];
    let b_own: serde_json::Value =
        serde_json::from_str(&b.server_ok(&["bundle", "show", "--format", "spiffe"])).unwrap();
    // A federated bundle carries X.509 and JWT authorities; other.org's
    // WIT-SVID keys are in its own SPIFFE bundle but not carried across
    // (docs/OPERATOR-GUIDE.md §9i).
    let of_use = |doc: &serde_json::Value, uses: &[&str]| -> Vec<serde_json::Value> {
        doc["keys"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|k| k["use"].as_str().is_some_and(|u| uses.contains(&u)))
            .cloned()
            .collect()
    };
    let carried = ["x509-svid", "jwt-svid"];
    assert_eq!(
        of_use(fetched, &carried),
        of_use(&b_own, &carried),
        "the fetched bundle is other.org's bundle, X.509 and JWT keys"
    );
    assert_eq!(
        of_use(fetched, &carried).len(),
        fetched["keys"].as_array().map_or(0, Vec::len),
        "only X.509 and JWT authorities are carried: {fetched}"
    );
    assert!(
        !of_use(&b_own, &["jwt-svid"]).is_empty() && !of_use(&b_own, &["x509-svid"]).is_empty(),
        "other.org publishes X.509 and JWT keys: {b_own}"
    );

    // https_spiffe is bootstrapped once with a PEM bundle (no JWT keys) ...
    let pem_path = b.dir.0.join("example-org.pem");
    std::fs::write(&pem_path, a.server_ok(&["bundle", "show"])).unwrap();
    b.server_ok(&[
        "bundle",
        "set",
        "--id",
        "spiffe://example.org",
        "--format",
        "pem",
        "--path",
        pem_path.to_str().unwrap(),
    ]);
    // ... and then refreshed from the endpoint, authenticated by SPIFFE ID: the JWT keys appear.
    sigil_tests::wait_for(
        "other.org refreshes example.org's bundle over https_spiffe",
        Duration::from_secs(20),
        || {
            list(&b)
                .as_array()
                .and_then(|a| a.first().cloned())
                .is_some_and(|doc| {
                    doc["keys"]
                        .as_array()
                        .is_some_and(|k| k.iter().any(|k| k["use"] == "jwt-svid"))
                })
        },
    );
}
