//! WIT-SVIDs end to end (spiffe/spiffe `standards/WIT-SVID.md`): the real
//! server and agent, a client generated from the standard's WIT profile
//! proto alone, and `sigil_core::wit` as the relying party.
//!
//! An entry that has not opted in gives no WIT-SVID; once it has
//! (`entry update --wit-svid`), the workload receives a WIT with its
//! private key; the token names its key (`kid`), has no `aud`, and binds
//! the returned key; the trust domain's WIT keys are `use: wit-svid` and
//! absent from the JWT bundle; the verifier accepts the WIT and a proof of
//! possession made with the returned key, and refuses a proof made with
//! another key, a tampered token and an expired one; the stream delivers a
//! renewed WIT (new key) before the first expires, and ends when the entry
//! opts out again.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a test failure"
)]

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::Value;
use sigil_core::TrustDomain;
use sigil_core::wit::{
    DEFAULT_MAX_WPT_LIFETIME, WitBundle, WitError, WorkloadKey, WptCheck, verify_wit, verify_wpt,
};
use sigil_proto::workload_wit::spiffe_workload_api_client::SpiffeWorkloadApiClient as WitClient;
use sigil_proto::workload_wit::{WitBundlesRequest, WitsvidRequest, WitsvidResponse};
use sigil_tests::{Cluster, eventually, fetch_x509_id, my_uid_selector};
use tokio_stream::StreamExt;
use tonic::Streaming;

const TARGET: &str = "https://tools.example.org/invoke";

fn request<T>(m: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(m);
    r.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    r
}

async fn client(c: &Cluster) -> WitClient<tonic::transport::Channel> {
    WitClient::new(sigil_proto::unix::channel(&c.api_socket()).await.unwrap())
}

async fn open_stream(c: &Cluster) -> Result<Streaming<WitsvidResponse>, tonic::Status> {
    client(c)
        .await
        .fetch_witsvid(request(WitsvidRequest {}))
        .await
        .map(tonic::Response::into_inner)
}

fn decode(part: &str) -> Value {
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
}

#[tokio::test]
async fn opted_in_entry_gets_a_wit_svid_whose_proof_of_possession_verifies() {
    let c = Cluster::with_agent();
    let id = "spiffe://example.org/wit-tool";
    let entry = c.create_entry(id, &["--selector", &my_uid_selector(), "--jwt-ttl", "20s"]);
    let shown: Value =
        serde_json::from_str(&c.server_ok(&["entry", "show", &entry, "--output", "json"])).unwrap();
    assert_eq!(shown["wit_svid"], false, "{shown}");
    // The caller has an identity (its X.509-SVID) ...
    eventually("X.509-SVID", Duration::from_secs(20), || async {
        fetch_x509_id(&c.api_addr()).await.ok()
    })
    .await;
    // ... but its entry has not opted in: no WIT-SVID, as FetchJWTSVID
    // answers when nothing matches.
    let err = open_stream(&c).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("no identity issued"), "{err:?}");
    // Nor without the security header.
    let err = client(&c)
        .await
        .fetch_witsvid(WitsvidRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");

    c.server_ok(&["entry", "update", &entry, "--wit-svid"]);
    let mut stream = eventually("a WIT-SVID stream", Duration::from_secs(20), || async {
        open_stream(&c).await.ok()
    })
    .await;
    let first = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("first WIT-SVID message")
        .unwrap()
        .unwrap();
    assert_eq!(first.svids.len(), 1, "{first:?}");
    let svid = &first.svids[0];
    assert_eq!(svid.spiffe_id, id);
    let parts: Vec<&str> = svid.wit_svid.split('.').collect();
    assert_eq!(parts.len(), 3);
    let header = decode(parts[0]);
    let claims = decode(parts[1]);
    assert_eq!(header["typ"], "wit+jwt", "{header}");
    let kid = header["kid"].as_str().expect("kid").to_string();
    assert!(!kid.is_empty());
    assert!(claims.get("aud").is_none(), "no audience: {claims}");
    assert_eq!(claims["sub"], id);
    let lifetime = claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap();
    assert!((1..=20).contains(&lifetime), "{claims}");
    // The private key handed out is the one the token binds.
    let key = WorkloadKey::from_private_jwk(&svid.wit_svid_key).unwrap();
    assert_eq!(claims["cnf"]["jwk"], *key.public_jwk(), "{claims}");

    // The WIT bundle: JWKS of `use: wit-svid` keys, the token's among them,
    // and none of them in the JWT bundle.
    let mut bundles = client(&c)
        .await
        .fetch_wit_bundles(request(WitBundlesRequest {}))
        .await
        .unwrap()
        .into_inner();
    let b = bundles.next().await.unwrap().unwrap();
    let doc = &b.bundles["spiffe://example.org"];
    let jwks: Value = serde_json::from_str(doc).unwrap();
    let keys = jwks["keys"].as_array().unwrap();
    assert!(keys.iter().all(|k| k["use"] == "wit-svid"), "{jwks}");
    assert!(keys.iter().any(|k| k["kid"] == kid.as_str()), "{jwks}");
    let spiffe = spiffe::WorkloadApiClient::connect_to(&c.api_addr())
        .await
        .unwrap();
    let jwt_bundles = spiffe.fetch_jwt_bundles().await.unwrap();
    let td = spiffe::TrustDomain::new("example.org").unwrap();
    let own = jwt_bundles.get(&td).unwrap();
    assert!(
        own.find_jwt_authority(&kid).is_none(),
        "a WIT key is no JWT-SVID key"
    );
    drop(spiffe);
    // The operator's view of the SPIFFE bundle has it with its use too.
    let doc_show: Value =
        serde_json::from_str(&c.server_ok(&["bundle", "show", "--format", "spiffe"])).unwrap();
    let shown = doc_show["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == kid.as_str())
        .expect("the WIT key in bundle show");
    assert_eq!(shown["use"], "wit-svid", "{doc_show}");

    // The relying party: WIT against the WIT bundle, then the proof.
    let wb = BTreeMap::from([(
        TrustDomain::new("example.org").unwrap(),
        WitBundle::from_jwks(doc.as_bytes()).unwrap(),
    )]);
    let now = sigil_core::now_unix();
    let v = verify_wit(&svid.wit_svid, &wb, now, 5).unwrap();
    assert_eq!(v.spiffe_id.to_string(), id);
    let check = WptCheck {
        audience: TARGET,
        now,
        leeway: 5,
        max_lifetime: DEFAULT_MAX_WPT_LIFETIME,
        txn_token: None,
    };
    let wpt = key
        .sign_wpt(&svid.wit_svid, TARGET, Duration::from_secs(30), now, None)
        .unwrap();
    let proof = verify_wpt(&wpt, &v, &check).unwrap();
    assert!(!proof.jti.is_empty());
    // A proof made with another key is refused.
    let other = WorkloadKey::generate().unwrap();
    let forged = other
        .sign_wpt(&svid.wit_svid, TARGET, Duration::from_secs(30), now, None)
        .unwrap();
    assert!(matches!(
        verify_wpt(&forged, &v, &check),
        Err(WitError::Proof(_))
    ));
    // A tampered token (another subject) is refused.
    let mut c2 = claims.clone();
    c2["sub"] = Value::from("spiffe://example.org/admin");
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        URL_SAFE_NO_PAD.encode(c2.to_string()),
        parts[2]
    );
    assert_eq!(
        verify_wit(&tampered, &wb, now, 5).unwrap_err(),
        WitError::Signature
    );
    // The token itself refused once expired.
    let exp = claims["exp"].as_i64().unwrap();
    assert!(matches!(
        verify_wit(&svid.wit_svid, &wb, exp + 1, 0),
        Err(WitError::Expired { .. })
    ));

    // The issuance is audited with the token's jti.
    let audit = c.server_ok(&["audit", "query", "--spiffe-id", id, "--output", "json"]);
    let jti = claims["jti"].as_str().unwrap();
    assert!(
        audit.contains("wit_svid_issued") && audit.contains(jti),
        "{audit}"
    );

    // Renewed at half life with a new key, pushed on the stream before the
    // first expires.
    let second = tokio::time::timeout(Duration::from_secs(25), stream.next())
        .await
        .expect("a renewed WIT-SVID")
        .unwrap()
        .unwrap();
    let renewed = &second.svids[0];
    assert_ne!(renewed.wit_svid, svid.wit_svid);
    assert_ne!(renewed.wit_svid_key, svid.wit_svid_key, "a new key per WIT");
    assert!(sigil_core::now_unix() < exp, "renewed before expiry");
    verify_wit(&renewed.wit_svid, &wb, sigil_core::now_unix(), 5).unwrap();

    // Opting out ends the stream and refuses new ones.
    c.server_ok(&["entry", "update", &entry, "--wit-svid", "false"]);
    let end = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match stream.next().await {
                Some(Ok(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the stream ends");
    let st = end.expect("an error ends the stream").unwrap_err();
    assert_eq!(st.code(), tonic::Code::PermissionDenied, "{st:?}");
    let err = open_stream(&c).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
}
