//! Unit tests of WIT-SVID issuing and verification: one test per refusal.

use super::*;
use crate::jwt::{JwtKeyType, jwks};

const NOW_SKEW: u64 = 30;

struct Fixture {
    wit_key: JwtSigner,
    jwt_key: JwtSigner,
    bundles: BTreeMap<TrustDomain, WitBundle>,
    workload: WorkloadKey,
    id: SpiffeId,
    now: i64,
}

fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

fn fixture() -> Fixture {
    let now = crate::now_unix();
    let wit_key = into_wit_authority(JwtSigner::generate(JwtKeyType::EcP256, now + 3600).unwrap());
    let jwt_key = JwtSigner::generate(JwtKeyType::EcP256, now + 3600).unwrap();
    // One document with both kinds, as the bundle endpoint serves it.
    let doc = jwks(&[jwt_key.public_jwk.clone(), wit_key.public_jwk.clone()]);
    let bundles = BTreeMap::from([(td(), WitBundle::from_jwks(&doc).unwrap())]);
    Fixture {
        wit_key,
        jwt_key,
        bundles,
        workload: WorkloadKey::generate().unwrap(),
        id: SpiffeId::new("spiffe://example.org/agent/tool").unwrap(),
        now,
    }
}

impl Fixture {
    fn wit(&self) -> String {
        sign_wit(
            &self.wit_key,
            &self.id,
            self.workload.public_jwk(),
            Duration::from_secs(300),
            self.now,
        )
        .unwrap()
        .token
    }

    fn verify(&self, t: &str) -> Result<VerifiedWit, WitError> {
        verify_wit(t, &self.bundles, self.now, NOW_SKEW)
    }

    fn check(&self) -> WptCheck<'static> {
        WptCheck {
            audience: "https://tools.example.org/run",
            now: self.now,
            leeway: NOW_SKEW,
            max_lifetime: DEFAULT_MAX_WPT_LIFETIME,
            txn_token: None,
        }
    }

    /// Claims of a valid WIT for this fixture, to alter.
    fn claims(&self) -> Value {
        json!({"sub": self.id.to_string(), "exp": self.now + 300, "iat": self.now,
            "jti": "j1", "cnf": {"jwk": self.workload.public_jwk()}})
    }

    fn header(&self) -> Value {
        json!({"alg": "ES256", "typ": "wit+jwt", "kid": self.wit_key.kid})
    }
}

fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(v.to_string())
}

/// A JWS of `header` and `claims` signed ES256 with a PKCS#8 P-256 key.
fn raw_sign(header: &Value, claims: &Value, pkcs8: &[u8]) -> String {
    let input = format!("{}.{}", b64(header), b64(claims));
    let sig = jsonwebtoken::crypto::sign(
        input.as_bytes(),
        &EncodingKey::from_ec_der(pkcs8),
        Algorithm::ES256,
    )
    .unwrap();
    format!("{input}.{sig}")
}

#[test]
fn issued_wit_verifies_and_its_proof_of_possession_too() {
    let f = fixture();
    let t = f.wit();
    let h = split(&t).unwrap().header;
    assert_eq!(h["typ"], "wit+jwt");
    assert_eq!(h["kid"], f.wit_key.kid.as_str());
    assert_eq!(h["alg"], "ES256");
    let v = f.verify(&t).unwrap();
    assert_eq!(v.spiffe_id, f.id);
    assert!(!v.claims.contains_key("aud"));
    assert_eq!(v.cnf_jwk, *f.workload.public_jwk());
    assert_eq!(v.cnf_alg, "ES256");
    assert_eq!(v.jti.as_deref().map(str::len), Some(32));
    let wpt = f
        .workload
        .sign_wpt(
            &t,
            "https://tools.example.org/run",
            Duration::from_secs(60),
            f.now,
            None,
        )
        .unwrap();
    let p = verify_wpt(&wpt, &v, &f.check()).unwrap();
    assert_eq!(p.expires_at, f.now + 60);
    assert!(!p.jti.is_empty());
}

#[test]
fn the_private_jwk_round_trips_and_must_match_its_public_part() {
    let k = WorkloadKey::generate().unwrap();
    let text = k.private_jwk();
    let back = WorkloadKey::from_private_jwk(&text).unwrap();
    assert_eq!(back.public_jwk(), k.public_jwk());
    assert!(!format!("{k:?}").contains(&text[text.find("\"d\"").unwrap()..]));
    let mut v: Value = serde_json::from_str(&text).unwrap();
    v["x"] = WorkloadKey::generate().unwrap().public_jwk()["x"].clone();
    assert!(WorkloadKey::from_private_jwk(&v.to_string()).is_err());
    v["kty"] = json!("RSA");
    assert!(WorkloadKey::from_private_jwk(&v.to_string()).is_err());
    assert!(WorkloadKey::from_private_jwk("not json").is_err());
}

#[test]
fn a_jwt_svid_key_neither_signs_nor_verifies_a_wit() {
    let f = fixture();
    let e = sign_wit(
        &f.jwt_key,
        &f.id,
        f.workload.public_jwk(),
        Duration::from_secs(60),
        f.now,
    )
    .unwrap_err();
    assert!(e.to_string().contains("not a WIT-SVID authority"), "{e}");
    // A WIT-shaped token signed by the JWT-SVID key, naming it: the key is
    // in the document, but not as a wit-svid key.
    let mut h = f.header();
    h["kid"] = json!(f.jwt_key.kid);
    let t = raw_sign(&h, &f.claims(), f.jwt_key.pkcs8());
    assert!(matches!(f.verify(&t), Err(WitError::UnknownKey { .. })));
    // And a WIT is no JWT-SVID: the JWT bundle does not hold its key.
    let jb = crate::jwt::JwtBundle::from_jwks(&jwks(&[
        f.jwt_key.public_jwk.clone(),
        f.wit_key.public_jwk.clone(),
    ]))
    .unwrap();
    let jbs = BTreeMap::from([(td(), jb)]);
    assert!(crate::jwt::validate(&f.wit(), "any", &jbs).is_err());
}

#[test]
fn header_refusals() {
    let f = fixture();
    let c = f.claims();
    let sign = |h: Value| raw_sign(&h, &c, f.wit_key.pkcs8());
    let mut h = f.header();
    h["alg"] = json!("none");
    assert_eq!(
        f.verify(&sign(h)).unwrap_err(),
        WitError::Algorithm("none".into())
    );
    let mut h = f.header();
    h["alg"] = json!("HS256");
    assert!(matches!(f.verify(&sign(h)), Err(WitError::Algorithm(_))));
    // ES384 is allowed, but not with this P-256 key.
    let mut h = f.header();
    h["alg"] = json!("ES384");
    assert!(matches!(f.verify(&sign(h)), Err(WitError::Algorithm(_))));
    let mut h = f.header();
    h["typ"] = json!("JWT");
    assert!(matches!(f.verify(&sign(h)), Err(WitError::Type { .. })));
    let mut h = f.header();
    h.as_object_mut().unwrap().remove("typ");
    assert!(matches!(
        f.verify(&sign(h)),
        Err(WitError::Type { found: None, .. })
    ));
    let mut h = f.header();
    h["typ"] = json!("application/WIT+JWT");
    f.verify(&sign(h)).unwrap();
    let mut h = f.header();
    h.as_object_mut().unwrap().remove("kid");
    assert_eq!(f.verify(&sign(h)).unwrap_err(), WitError::MissingKid);
    let mut h = f.header();
    h["crit"] = json!(["exp"]);
    assert_eq!(f.verify(&sign(h)).unwrap_err(), WitError::Critical);
    let mut h = f.header();
    h["kid"] = json!("no-such-key");
    assert!(matches!(
        f.verify(&sign(h)),
        Err(WitError::UnknownKey { .. })
    ));
}

#[test]
fn malformed_long_and_tampered_tokens_are_refused() {
    let f = fixture();
    assert!(matches!(f.verify("a.b"), Err(WitError::Malformed(_))));
    assert!(matches!(f.verify("a.b.c.d"), Err(WitError::Malformed(_))));
    assert!(matches!(f.verify("!!.e30.AA"), Err(WitError::Malformed(_))));
    let long = "a".repeat(MAX_TOKEN_LEN + 1);
    assert!(matches!(f.verify(&long), Err(WitError::TooLong { .. })));
    let t = f.wit();
    let mut parts: Vec<&str> = t.split('.').collect();
    let mut c = f.claims();
    c["sub"] = json!("spiffe://example.org/admin");
    let forged = b64(&c);
    parts[1] = &forged;
    assert_eq!(f.verify(&parts.join(".")).unwrap_err(), WitError::Signature);
    let unsigned = format!("{}.{}.", t.split('.').next().unwrap(), forged);
    assert!(matches!(f.verify(&unsigned), Err(WitError::Malformed(_))));
}

#[test]
fn subject_must_be_a_spiffe_id_of_the_keys_trust_domain() {
    let f = fixture();
    let sign = |c: Value| raw_sign(&f.header(), &c, f.wit_key.pkcs8());
    let mut c = f.claims();
    c["sub"] = json!("https://example.org/x");
    assert!(matches!(
        f.verify(&sign(c)),
        Err(WitError::Claim { claim: "sub", .. })
    ));
    let mut c = f.claims();
    c.as_object_mut().unwrap().remove("sub");
    assert!(matches!(
        f.verify(&sign(c)),
        Err(WitError::Claim { claim: "sub", .. })
    ));
    // Signed by example.org's key, claiming another trust domain.
    let mut c = f.claims();
    c["sub"] = json!("spiffe://other.org/x");
    assert!(matches!(
        f.verify(&sign(c)),
        Err(WitError::UnknownKey { .. })
    ));
}

#[test]
fn time_claims_are_enforced_with_leeway() {
    let f = fixture();
    let sign = |c: Value| raw_sign(&f.header(), &c, f.wit_key.pkcs8());
    let mut c = f.claims();
    c["exp"] = json!(f.now - 100);
    assert!(matches!(f.verify(&sign(c)), Err(WitError::Expired { .. })));
    let mut c = f.claims();
    c["exp"] = json!(f.now - 10);
    f.verify(&sign(c)).unwrap();
    let mut c = f.claims();
    c.as_object_mut().unwrap().remove("exp");
    assert!(matches!(
        f.verify(&sign(c)),
        Err(WitError::Claim { claim: "exp", .. })
    ));
    let mut c = f.claims();
    c["exp"] = json!("tomorrow");
    assert!(matches!(
        f.verify(&sign(c)),
        Err(WitError::Claim { claim: "exp", .. })
    ));
    let mut c = f.claims();
    c["nbf"] = json!(f.now + 600);
    assert!(matches!(
        f.verify(&sign(c)),
        Err(WitError::NotYetValid { claim: "nbf", .. })
    ));
    let mut c = f.claims();
    c["iat"] = json!(f.now + 600);
    assert!(matches!(
        f.verify(&sign(c)),
        Err(WitError::NotYetValid { claim: "iat", .. })
    ));
    // The issued token expires too.
    let t = f.wit();
    assert!(matches!(
        verify_wit(&t, &f.bundles, f.now + 400, NOW_SKEW),
        Err(WitError::Expired { .. })
    ));
}

#[test]
fn an_audience_or_a_bad_jti_is_refused() {
    let f = fixture();
    let sign = |c: Value| raw_sign(&f.header(), &c, f.wit_key.pkcs8());
    let mut c = f.claims();
    c["aud"] = json!("https://api");
    assert_eq!(f.verify(&sign(c)).unwrap_err(), WitError::Audience);
    let mut c = f.claims();
    c["jti"] = json!(7);
    assert!(matches!(
        f.verify(&sign(c)),
        Err(WitError::Claim { claim: "jti", .. })
    ));
}

#[test]
fn cnf_must_be_a_well_formed_public_key() {
    let f = fixture();
    let sign = |c: Value| raw_sign(&f.header(), &c, f.wit_key.pkcs8());
    let with = |jwk: Value| {
        let mut c = f.claims();
        c["cnf"] = json!({ "jwk": jwk });
        c
    };
    let pk = f.workload.public_jwk().clone();
    let mut c = f.claims();
    c.as_object_mut().unwrap().remove("cnf");
    assert!(matches!(f.verify(&sign(c)), Err(WitError::Confirmation(_))));
    let mut private: Value = serde_json::from_str(&f.workload.private_jwk()).unwrap();
    private["alg"] = json!("ES256");
    let e = f.verify(&sign(with(private))).unwrap_err();
    assert!(e.to_string().contains("private member"), "{e}");
    for (k, v) in [
        ("alg", json!("HS256")),
        ("alg", json!("ES384")),
        ("alg", json!("EdDSA")),
        ("crv", json!("P-521")),
        ("kty", json!("oct")),
        ("x", json!("AAAA")),
        ("y", json!(URL_SAFE_NO_PAD.encode([1u8; 32]))),
    ] {
        let mut j = pk.clone();
        j[k] = v;
        assert!(
            matches!(f.verify(&sign(with(j))), Err(WitError::Confirmation(_))),
            "{k}"
        );
    }
    let mut j = pk.clone();
    j.as_object_mut().unwrap().remove("alg");
    assert!(matches!(
        f.verify(&sign(with(j))),
        Err(WitError::Confirmation(_))
    ));
    let small_rsa = json!({"kty": "RSA", "alg": "RS256",
        "n": URL_SAFE_NO_PAD.encode([0xffu8; 128]), "e": "AQAB"});
    assert!(matches!(
        f.verify(&sign(with(small_rsa))),
        Err(WitError::Confirmation(_))
    ));
    // The issuer refuses to bind such keys in the first place, and binds
    // only the public members of a good one.
    let mut extra = pk.clone();
    extra["x5u"] = json!("https://attacker");
    let t = sign_wit(&f.wit_key, &f.id, &extra, Duration::from_secs(60), f.now).unwrap();
    assert_eq!(f.verify(&t.token).unwrap().cnf_jwk, pk);
    let mut bad = pk.clone();
    bad["d"] = json!("AAAA");
    assert!(sign_wit(&f.wit_key, &f.id, &bad, Duration::from_secs(60), f.now).is_err());
}

#[test]
fn a_wit_never_outlives_its_signing_key() {
    let now = crate::now_unix();
    let k = into_wit_authority(JwtSigner::generate(JwtKeyType::EcP256, now + 10).unwrap());
    let w = WorkloadKey::generate().unwrap();
    let id = SpiffeId::new("spiffe://example.org/a").unwrap();
    let t = sign_wit(&k, &id, w.public_jwk(), Duration::from_secs(3600), now).unwrap();
    assert_eq!(t.expires_at, now + 10);
}

#[test]
fn proof_of_possession_refusals() {
    let f = fixture();
    let t = f.wit();
    let v = f.verify(&t).unwrap();
    let aud = "https://tools.example.org/run";
    let ttl = Duration::from_secs(60);
    // Signed by another key.
    let other = WorkloadKey::generate().unwrap();
    let wpt = other.sign_wpt(&t, aud, ttl, f.now, None).unwrap();
    let e = verify_wpt(&wpt, &v, &f.check()).unwrap_err();
    assert!(matches!(e, WitError::Proof(_)), "{e}");
    // For another recipient.
    let wpt = f
        .workload
        .sign_wpt(&t, "https://elsewhere", ttl, f.now, None)
        .unwrap();
    assert!(matches!(
        verify_wpt(&wpt, &v, &f.check()),
        Err(WitError::Claim { claim: "aud", .. })
    ));
    // Expired.
    let wpt = f
        .workload
        .sign_wpt(&t, aud, ttl, f.now - 200, None)
        .unwrap();
    assert!(matches!(
        verify_wpt(&wpt, &v, &f.check()),
        Err(WitError::Expired { .. })
    ));
    // Too long-lived.
    let wpt = f
        .workload
        .sign_wpt(&t, aud, Duration::from_secs(3600), f.now, None)
        .unwrap();
    assert!(matches!(
        verify_wpt(&wpt, &v, &f.check()),
        Err(WitError::Claim { claim: "exp", .. })
    ));
    // Bound to another WIT of the same key.
    let t2 = f.wit();
    let wpt = f.workload.sign_wpt(&t2, aud, ttl, f.now, None).unwrap();
    assert!(matches!(
        verify_wpt(&wpt, &v, &f.check()),
        Err(WitError::Claim { claim: "wth", .. })
    ));
    // Txn-Token binding, both ways.
    let wpt = f
        .workload
        .sign_wpt(&t, aud, ttl, f.now, Some("txn"))
        .unwrap();
    assert!(matches!(
        verify_wpt(&wpt, &v, &f.check()),
        Err(WitError::Claim { claim: "tth", .. })
    ));
    let mut with_txn = f.check();
    with_txn.txn_token = Some("txn");
    verify_wpt(&wpt, &v, &with_txn).unwrap();
    with_txn.txn_token = Some("other");
    assert!(verify_wpt(&wpt, &v, &with_txn).is_err());
    let plain = f.workload.sign_wpt(&t, aud, ttl, f.now, None).unwrap();
    with_txn.txn_token = Some("txn");
    assert!(matches!(
        verify_wpt(&plain, &v, &with_txn),
        Err(WitError::Claim { claim: "tth", .. })
    ));
    // Hand-made proofs: wrong typ, alg, missing jti, oth.
    let good = json!({"aud": aud, "exp": f.now + 60, "jti": "p1",
        "wth": sha256_b64(t.as_bytes())});
    let wh = json!({"alg": "ES256", "typ": "wpt+jwt"});
    let sign = |h: &Value, c: &Value| raw_sign(h, c, &f.workload.pkcs8);
    verify_wpt(&sign(&wh, &good), &v, &f.check()).unwrap();
    let mut h = wh.clone();
    h["typ"] = json!("wit+jwt");
    assert!(matches!(
        verify_wpt(&sign(&h, &good), &v, &f.check()),
        Err(WitError::Type { .. })
    ));
    let mut h = wh.clone();
    h["alg"] = json!("RS256");
    assert!(matches!(
        verify_wpt(&sign(&h, &good), &v, &f.check()),
        Err(WitError::Proof(_))
    ));
    let mut c = good.clone();
    c.as_object_mut().unwrap().remove("jti");
    assert!(matches!(
        verify_wpt(&sign(&wh, &c), &v, &f.check()),
        Err(WitError::Claim { claim: "jti", .. })
    ));
    let mut c = good.clone();
    c.as_object_mut().unwrap().remove("wth");
    assert!(matches!(
        verify_wpt(&sign(&wh, &c), &v, &f.check()),
        Err(WitError::Claim { claim: "wth", .. })
    ));
    let mut c = good.clone();
    c["oth"] = json!({"x-token": "abc"});
    assert!(matches!(
        verify_wpt(&sign(&wh, &c), &v, &f.check()),
        Err(WitError::Claim { claim: "oth", .. })
    ));
    let mut c = good.clone();
    c.as_object_mut().unwrap().remove("aud");
    assert!(matches!(
        verify_wpt(&sign(&wh, &c), &v, &f.check()),
        Err(WitError::Claim { claim: "aud", .. })
    ));
    let mut c = good.clone();
    c["aud"] = json!(["https://a", aud]);
    verify_wpt(&sign(&wh, &c), &v, &f.check()).unwrap();
}

#[test]
fn wit_bundles_keep_only_wit_keys_and_refuse_bad_ones() {
    let f = fixture();
    assert_eq!(f.bundles[&td()].len(), 1);
    let empty = WitBundle::from_jwks(&jwks(std::slice::from_ref(&f.jwt_key.public_jwk))).unwrap();
    assert!(empty.is_empty(), "a JWT-SVID key is no WIT authority");
    let mut nokid = f.wit_key.public_jwk.clone();
    nokid.as_object_mut().unwrap().remove("kid");
    assert!(WitBundle::from_jwks(&jwks(&[nokid])).is_err());
    let k = f.wit_key.public_jwk.clone();
    assert!(WitBundle::from_jwks(&jwks(&[k.clone(), k])).is_err());
    assert!(
        WitBundle::from_jwks(
            br#"{"keys":[{"use":"wit-svid","kid":"s","kty":"oct","k":"c2VjcmV0"}]}"#
        )
        .is_err()
    );
    assert!(WitBundle::from_jwks(b"{}").is_err());
    assert_eq!(peek_trust_domain(&f.wit()).unwrap(), td());
}

#[test]
fn thumbprints_follow_rfc7638() {
    // RFC 7638 §3.1's example key and thumbprint.
    let jwk = json!({"kty": "RSA", "e": "AQAB", "alg": "RS256",
        "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"});
    assert_eq!(
        jwk_thumbprint(&jwk),
        "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
    );
}
