//! The SPIFFE bundle format (a JWKS, spiffe/spiffe
//! `SPIFFE_Trust_Domain_and_Bundle.md` §4): X.509 authorities become keys
//! with `use: "x509-svid"` and an `x5c` holding the CA certificate.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::{Value, json};
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::public_key::PublicKey;

use crate::x509::X509Error;

/// Encodes X.509 authorities (DER) and JWT authorities (public JWKs) as a
/// SPIFFE bundle document.
pub fn spiffe_bundle(
    certs: &[Vec<u8>],
    jwt_keys: &[Value],
    sequence: u64,
    refresh_hint_secs: u64,
) -> Result<Value, X509Error> {
    let mut keys = Vec::with_capacity(certs.len());
    for der in certs {
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| X509Error::Certificate(e.to_string()))?;
        let spki = cert.public_key();
        let mut key = match spki
            .parsed()
            .map_err(|e| X509Error::Certificate(e.to_string()))?
        {
            PublicKey::EC(point) => {
                let raw = point.data();
                let (crv, n) = match raw.len() {
                    65 => ("P-256", 32),
                    97 => ("P-384", 48),
                    _ => return Err(X509Error::Certificate("unsupported EC key size".into())),
                };
                if raw.first() != Some(&4) {
                    return Err(X509Error::Certificate(
                        "compressed EC points are not supported".into(),
                    ));
                }
                json!({
                    "kty": "EC",
                    "crv": crv,
                    "x": URL_SAFE_NO_PAD.encode(&raw[1..1 + n]),
                    "y": URL_SAFE_NO_PAD.encode(&raw[1 + n..]),
                })
            }
            PublicKey::RSA(rsa) => json!({
                "kty": "RSA",
                "n": URL_SAFE_NO_PAD.encode(strip_zero(rsa.modulus)),
                "e": URL_SAFE_NO_PAD.encode(strip_zero(rsa.exponent)),
            }),
            _ => {
                return Err(X509Error::Certificate(
                    "unsupported authority key type".into(),
                ));
            }
        };
        key["use"] = json!("x509-svid");
        key["x5c"] = json!([STANDARD.encode(der)]);
        keys.push(key);
    }
    for k in jwt_keys {
        let mut k = k.clone();
        k["use"] = json!("jwt-svid");
        keys.push(k);
    }
    Ok(json!({
        "keys": keys,
        "spiffe_sequence": sequence,
        "spiffe_refresh_hint": refresh_hint_secs,
    }))
}

/// Appends WIT-SVID authorities (public JWKs) to a bundle document made by
/// [`spiffe_bundle`], each with `use: wit-svid` (whatever `use` it had).
pub fn add_wit_authorities(doc: &mut Value, wit_keys: &[Value]) {
    if let Some(keys) = doc.get_mut("keys").and_then(Value::as_array_mut) {
        for k in wit_keys {
            let mut k = k.clone();
            k["use"] = json!(crate::wit::WIT_USE);
            keys.push(k);
        }
    }
}

/// A parsed SPIFFE bundle document.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ParsedBundle {
    /// DER CA certificates of `x509-svid` keys.
    pub x509_authorities: Vec<Vec<u8>>,
    /// `jwt-svid` keys as JWKs.
    pub jwt_authorities: Vec<Value>,
    /// `wit-svid` keys as JWKs (WIT-SVID authorities, kept apart from the
    /// JWT-SVID ones: see [`crate::wit`]).
    pub wit_authorities: Vec<Value>,
    /// `spiffe_sequence`, if present.
    pub sequence: Option<u64>,
    /// `spiffe_refresh_hint` in seconds, if present.
    pub refresh_hint: Option<u64>,
}

/// Parses a SPIFFE bundle document. Every `x509-svid` key must carry exactly
/// one certificate in `x5c`; every `jwt-svid` and `wit-svid` key must have
/// a `kid`.
pub fn parse_spiffe_bundle(doc: &[u8]) -> Result<ParsedBundle, X509Error> {
    let bad = |m: String| X509Error::Certificate(format!("SPIFFE bundle: {m}"));
    let v: Value = serde_json::from_slice(doc).map_err(|e| bad(e.to_string()))?;
    let keys = v
        .get("keys")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("missing \"keys\" array".into()))?;
    let mut out = ParsedBundle {
        sequence: v.get("spiffe_sequence").and_then(Value::as_u64),
        refresh_hint: v.get("spiffe_refresh_hint").and_then(Value::as_u64),
        ..Default::default()
    };
    for k in keys {
        match k.get("use").and_then(Value::as_str) {
            Some("x509-svid") => {
                let x5c = k
                    .get("x5c")
                    .and_then(Value::as_array)
                    .ok_or_else(|| bad("x509-svid key without x5c".into()))?;
                let [cert] = x5c.as_slice() else {
                    return Err(bad(
                        "x509-svid key must have exactly one x5c certificate".into()
                    ));
                };
                let der = STANDARD
                    .decode(cert.as_str().unwrap_or_default())
                    .map_err(|e| bad(format!("x5c: {e}")))?;
                X509Certificate::from_der(&der).map_err(|e| bad(format!("x5c: {e}")))?;
                out.x509_authorities.push(der);
            }
            Some("jwt-svid") => {
                if k.get("kid")
                    .and_then(Value::as_str)
                    .is_none_or(str::is_empty)
                {
                    return Err(bad("jwt-svid key without kid".into()));
                }
                out.jwt_authorities.push(k.clone());
            }
            Some(crate::wit::WIT_USE) => {
                if k.get("kid")
                    .and_then(Value::as_str)
                    .is_none_or(str::is_empty)
                {
                    return Err(bad("wit-svid key without kid".into()));
                }
                out.wit_authorities.push(k.clone());
            }
            // Unknown uses are ignored, as the spec asks.
            _ => {}
        }
    }
    Ok(out)
}

fn strip_zero(b: &[u8]) -> &[u8] {
    let mut s = b;
    while s.len() > 1 && s[0] == 0 {
        s = &s[1..];
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::x509::Ca;
    use spiffe::TrustDomain;
    use std::time::Duration;

    #[test]
    fn ca_becomes_an_x509_svid_jwk_with_its_certificate() {
        let (ca, _) = Ca::generate(
            &TrustDomain::new("example.org").unwrap(),
            Duration::from_secs(60),
        )
        .unwrap();
        let jwt =
            crate::jwt::JwtSigner::generate(crate::jwt::JwtKeyType::EcP256, crate::now_unix() + 60)
                .unwrap();
        let doc = spiffe_bundle(
            &[ca.cert_der().to_vec()],
            std::slice::from_ref(&jwt.public_jwk),
            3,
            300,
        )
        .unwrap();
        let k = &doc["keys"][0];
        assert_eq!(k["use"], "x509-svid");
        assert_eq!(k["kty"], "EC");
        assert_eq!(k["crv"], "P-256");
        assert_eq!(
            URL_SAFE_NO_PAD
                .decode(k["x"].as_str().unwrap())
                .unwrap()
                .len(),
            32
        );
        assert_eq!(
            STANDARD.decode(k["x5c"][0].as_str().unwrap()).unwrap(),
            ca.cert_der()
        );
        assert_eq!(doc["spiffe_sequence"], 3);
        assert_eq!(doc["keys"][1]["use"], "jwt-svid");

        let parsed = parse_spiffe_bundle(doc.to_string().as_bytes()).unwrap();
        assert_eq!(parsed.x509_authorities, vec![ca.cert_der().to_vec()]);
        assert_eq!(parsed.jwt_authorities.len(), 1);
        assert_eq!(parsed.sequence, Some(3));
        assert_eq!(parsed.refresh_hint, Some(300));
        assert!(parsed.wit_authorities.is_empty());
    }

    #[test]
    fn wit_keys_are_published_apart_with_their_use() {
        let jwt =
            crate::jwt::JwtSigner::generate(crate::jwt::JwtKeyType::EcP256, crate::now_unix() + 60)
                .unwrap();
        let wit = crate::wit::into_wit_authority(
            crate::jwt::JwtSigner::generate(crate::jwt::JwtKeyType::EcP256, crate::now_unix() + 60)
                .unwrap(),
        );
        let mut doc = spiffe_bundle(&[], std::slice::from_ref(&jwt.public_jwk), 1, 300).unwrap();
        add_wit_authorities(&mut doc, std::slice::from_ref(&wit.public_jwk));
        assert_eq!(doc["keys"][1]["use"], "wit-svid");
        assert_eq!(doc["keys"][1]["kid"], wit.kid.as_str());
        let parsed = parse_spiffe_bundle(doc.to_string().as_bytes()).unwrap();
        assert_eq!(parsed.jwt_authorities.len(), 1);
        assert_eq!(parsed.wit_authorities.len(), 1);
        assert_eq!(parsed.wit_authorities[0]["kid"], wit.kid.as_str());
        // Neither verifier takes the other's key from the combined document.
        let text = doc.to_string();
        let jwt_bundle = crate::jwt::JwtBundle::from_jwks(text.as_bytes()).unwrap();
        assert!(jwt_bundle.has_key(&jwt.kid) && !jwt_bundle.has_key(&wit.kid));
        let wit_bundle = crate::wit::WitBundle::from_jwks(text.as_bytes()).unwrap();
        assert!(wit_bundle.has_key(&wit.kid) && !wit_bundle.has_key(&jwt.kid));
    }

    #[test]
    fn malformed_bundles_are_refused() {
        for bad in [
            &b"{}"[..],
            b"not json",
            br#"{"keys":[{"use":"x509-svid","x5c":[]}]}"#,
            br#"{"keys":[{"use":"x509-svid","x5c":["AAAA"]}]}"#,
            br#"{"keys":[{"use":"jwt-svid","kty":"EC"}]}"#,
            br#"{"keys":[{"use":"wit-svid","kty":"EC"}]}"#,
        ] {
            assert!(
                parse_spiffe_bundle(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
