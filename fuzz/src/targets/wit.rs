//! WIT-SVIDs and their proof of possession (`sigil_core::wit`): the
//! unverified peek, `verify_wit` against the fixture WIT bundle,
//! `verify_wpt` for whatever WIT verified, WIT bundle parsing and the
//! `cnf.jwk` check. Claims given as JSON are also signed with the fixture
//! WIT authority first, so that the claim checks behind the signature are
//! reached with any claims the fuzzer makes up.
//!
//! Input: parts: WIT, WPT, audience, claims JSON, JWKS / JWK JSON.
//! Fixtures: `fixtures/wit-authority.jwk` and `wit-workload.jwk` (fuzz-only
//! P-256 keys) and `wit-jwks.json` (the authority's public key, kid
//! `fuzz-wit`, `use: wit-svid`).

use std::collections::BTreeMap;
use std::time::Duration;

use crate::{part, parts};
use serde_json::Value;
use sigil_core::TrustDomain;
use sigil_core::jwt::{JwtKeyType, JwtSigner};
use sigil_core::wit::{
    ALLOWED_ALGS, VerifiedWit, WitBundle, WorkloadKey, WptCheck, into_wit_authority,
    peek_trust_domain, public_cnf_jwk, sha256_b64, verify_wit, verify_wpt,
};

/// The verifiers' clock: fixed, so that a crash reproduces (the seeds are
/// valid at this time).
const NOW: i64 = 1_796_228_618;
const AUTHORITY: &str = include_str!("../../fixtures/wit-authority.jwk");
const WIT_JWKS: &[u8] = include_bytes!("../../fixtures/wit-jwks.json");

fn check_wit(token: &str, bundles: &BTreeMap<TrustDomain, WitBundle>) -> Option<VerifiedWit> {
    let v = verify_wit(token, bundles, NOW, 30).ok()?;
    assert!(!v.claims.contains_key("aud"), "a verified WIT has no aud");
    assert_eq!(v.spiffe_id.trust_domain_name(), "example.org");
    assert!(v.expires_at + 30 > NOW);
    assert!(ALLOWED_ALGS.contains(&v.cnf_alg.as_str()));
    assert_eq!(public_cnf_jwk(&v.cnf_jwk).as_ref(), Ok(&v.cnf_jwk));
    assert_eq!(
        peek_trust_domain(token)
            .ok()
            .as_ref()
            .map(TrustDomain::as_str),
        Some("example.org")
    );
    Some(v)
}

/// One input through the target; panics when an oracle fails.
pub fn run(data: &[u8]) {
    let ps = parts(data);
    let text = |i| std::str::from_utf8(part(&ps, i)).unwrap_or_default();
    let (wit, wpt, audience, claims, jwks) = (text(0), text(1), text(2), text(3), text(4));
    let example = TrustDomain::new("example.org").expect("valid");
    let bundle = WitBundle::from_jwks(WIT_JWKS).expect("fixture WIT bundle");
    let bundles = BTreeMap::from([(example, bundle)]);
    let _ = peek_trust_domain(wit);
    let mut verified = check_wit(wit, &bundles);
    if let Ok(c @ Value::Object(_)) = serde_json::from_str::<Value>(claims) {
        let key = WorkloadKey::from_private_jwk(AUTHORITY).expect("fixture key");
        let signer = into_wit_authority(
            JwtSigner::from_pkcs8(
                "fuzz-wit".into(),
                JwtKeyType::EcP256,
                key.pkcs8().to_vec(),
                i64::MAX,
            )
            .expect("fixture signer"),
        );
        if let Value::Object(m) = c
            && let Ok(t) = signer.sign_typed("wit+jwt", &m)
            && let Some(v) = check_wit(&t, &bundles)
        {
            verified.get_or_insert(v);
        }
    }
    if let Some(v) = &verified {
        let check = WptCheck {
            audience,
            now: NOW,
            leeway: 30,
            max_lifetime: Duration::from_secs(300),
            txn_token: None,
        };
        if let Ok(p) = verify_wpt(wpt, v, &check) {
            assert!(!p.jti.is_empty());
            assert!(p.expires_at + 30 > NOW && p.expires_at <= NOW + 330);
            let c = sigil_core::jwt::peek_claims(wpt).expect("a verified WPT has claims");
            assert_eq!(
                c.get("wth").and_then(Value::as_str),
                Some(sha256_b64(v.token.as_bytes()).as_str())
            );
            assert!(!c.contains_key("oth"));
        }
    }
    if let Ok(b) = WitBundle::from_jwks(jwks.as_bytes()) {
        let _ = b.len();
    }
    if let Ok(j) = serde_json::from_str::<Value>(jwks)
        && let Ok(canon) = public_cnf_jwk(&j)
    {
        // Canonical keys are fixed points.
        assert_eq!(public_cnf_jwk(&canon).as_ref(), Ok(&canon));
    }
}
