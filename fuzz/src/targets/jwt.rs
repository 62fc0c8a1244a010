//! JWT-SVID parsing and validation: the unverified peeks the agent and
//! server route with (`peek_header`, `peek_claims`, `peek_trust_domain`),
//! `validate` (ValidateJWTSVID) against the fixture bundle, and
//! `verify_issued` (tokens of a trusted issuer).
//!
//! Input: parts: token, audience.

use std::collections::BTreeMap;

use crate::{JWKS, part, parts};
use serde_json::Value;
use sigil_core::TrustDomain;
use sigil_core::jwt::{
    JwtBundle, peek_claims, peek_header, peek_trust_domain, validate, verify_issued,
};

fn has_audience(claims: &serde_json::Map<String, Value>, audience: &str) -> bool {
    match claims.get("aud") {
        Some(Value::String(a)) => a == audience,
        Some(Value::Array(a)) => a.iter().any(|v| v.as_str() == Some(audience)),
        _ => false,
    }
}

/// One input through the target; panics when an oracle fails.
pub fn run(data: &[u8]) {
    let ps = parts(data);
    let (Ok(token), Ok(audience)) = (
        std::str::from_utf8(part(&ps, 0)),
        std::str::from_utf8(part(&ps, 1)),
    ) else {
        return;
    };
    let _ = peek_header(token);
    let claims = peek_claims(token);
    let td = peek_trust_domain(token);
    let bundle = JwtBundle::from_jwks(JWKS).expect("fixture JWKS");
    let example = TrustDomain::new("example.org").expect("valid");
    let bundles = BTreeMap::from([(example.clone(), bundle.clone())]);
    if let Ok(v) = validate(token, audience, &bundles) {
        assert!(v.spiffe_id.is_member_of(&example));
        assert_eq!(td.as_ref().ok(), Some(&example));
        assert!(has_audience(&v.claims, audience));
        assert_eq!(claims.as_ref().ok(), Some(&v.claims));
        assert!(v.claims.get("exp").and_then(Value::as_i64).is_some());
    }
    let issuer = "https://issuer.example.org";
    if let Ok(v) = verify_issued(token, &bundle, issuer, audience, 0) {
        assert_eq!(v.claims.get("iss").and_then(Value::as_str), Some(issuer));
        assert!(has_audience(&v.claims, audience));
        assert!(
            v.alg == "ES256"
                || v.alg == "ES384"
                || v.alg.starts_with("RS")
                || v.alg.starts_with("PS")
        );
    }
}
