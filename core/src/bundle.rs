//! The SPIFFE bundle format (a JWKS, spiffe/spiffe
//! `SPIFFE_Trust_Domain_and_Bundle.md` §4): X.509 authorities become keys
//! with `use: "x509-svid"` and an `x5c` holding the CA certificate.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::{Value, json};
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::public_key::PublicKey;

use crate::x509::X509Error;

/// Encodes X.509 authorities (DER) as a SPIFFE bundle document.
pub fn x509_authorities_to_spiffe_bundle(
    certs: &[Vec<u8>],
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
    Ok(json!({
        "keys": keys,
        "spiffe_sequence": sequence,
        "spiffe_refresh_hint": refresh_hint_secs,
    }))
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
        let doc = x509_authorities_to_spiffe_bundle(&[ca.cert_der().to_vec()], 3, 300).unwrap();
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
    }
}
