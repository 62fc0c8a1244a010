//! Signing keys held outside this process (a PKCS#11 token, for one): the
//! [`ExternalKey`] trait the CA ([`crate::x509::Ca`]) and the JWT signer
//! ([`crate::jwt::JwtSigner`]) sign through when the private key is not
//! theirs to hold, and the encoding of the signatures such a key returns.
//!
//! Only ECDSA P-256 with SHA-256 is offered: the key returns the raw
//! `r || s` pair (what PKCS#11's `CKM_ECDSA` and JWS `ES256` use), and
//! [`ecdsa_der`] turns it into the DER `Ecdsa-Sig-Value` X.509 needs.
//! In-process keys do not come through here: they keep signing with ring
//! directly, so the default path pays nothing for this abstraction.

use std::fmt;

/// Length of a P-256 coordinate or scalar, in bytes.
pub const P256_LEN: usize = 32;

/// A signature could not be made by an external key. Carries the key's
/// label and the reason (never key material or a PIN).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("signing key {label}: {reason}")]
pub struct SignerError {
    /// The key's label (as [`ExternalKey::label`] gives it).
    pub label: String,
    /// What went wrong (the token's error code, a wrong length...).
    pub reason: String,
}

/// An ECDSA P-256 private key that signs somewhere else (a hardware or
/// software token). Implementations must be usable from several threads
/// at once; each call signs one message.
pub trait ExternalKey: Send + Sync {
    /// The public key, an uncompressed SEC1 point (`0x04 || x || y`, 65
    /// bytes).
    fn public_point(&self) -> &[u8];
    /// How the key store finds the key again (a PKCS#11 `CKA_ID`).
    fn key_id(&self) -> &[u8];
    /// A short name for errors and logs.
    fn label(&self) -> &str;
    /// ECDSA over SHA-256 of `msg`: the raw `r || s`, 32 bytes each.
    fn sign_p256_sha256(&self, msg: &[u8]) -> Result<[u8; 2 * P256_LEN], SignerError>;
}

impl fmt::Debug for dyn ExternalKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExternalKey")
            .field("label", &self.label())
            .finish_non_exhaustive()
    }
}

/// Checks that `point` is an uncompressed P-256 point (length and prefix;
/// the key store vouches for the rest). Returns a reason when it is not.
pub fn check_p256_point(point: &[u8]) -> Result<(), String> {
    if point.len() != 1 + 2 * P256_LEN || point[0] != 0x04 {
        return Err(format!(
            "public key is not an uncompressed P-256 point ({} bytes)",
            point.len()
        ));
    }
    Ok(())
}

/// One DER INTEGER holding the unsigned big-endian `v`: leading zeros
/// dropped, one zero put back when the top bit is set.
fn push_uint(out: &mut Vec<u8>, v: &[u8]) {
    let first = v.iter().position(|b| *b != 0).unwrap_or(v.len());
    let v = &v[first..];
    let pad = v.first().is_none_or(|b| b & 0x80 != 0);
    out.push(0x02);
    out.push((v.len() + usize::from(pad)) as u8);
    if pad {
        out.push(0);
    }
    out.extend_from_slice(v);
}

/// The DER `Ecdsa-Sig-Value` (`SEQUENCE { r INTEGER, s INTEGER }`, RFC
/// 3279 §2.2.3) of a raw P-256 `r || s` signature.
pub fn ecdsa_der(raw: &[u8; 2 * P256_LEN]) -> Vec<u8> {
    let (r, s) = raw.split_at(P256_LEN);
    let mut body = Vec::with_capacity(2 * P256_LEN + 6);
    push_uint(&mut body, r);
    push_uint(&mut body, s);
    // At most 2 * (2 + 33) = 70 bytes: the short length form always fits.
    let mut out = Vec::with_capacity(body.len() + 2);
    out.push(0x30);
    out.push(body.len() as u8);
    out.extend_from_slice(&body);
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::{
        ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair,
        UnparsedPublicKey,
    };

    /// An [`ExternalKey`] backed by ring, standing in for a token in the
    /// unit tests (the real one is tested against SoftHSM2 end to end).
    pub(crate) struct RingKey {
        kp: EcdsaKeyPair,
        point: Vec<u8>,
        pub(crate) fail: bool,
    }

    impl RingKey {
        pub(crate) fn new() -> RingKey {
            let rng = SystemRandom::new();
            let pkcs8 =
                EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
            let kp =
                EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
                    .unwrap();
            let point = kp.public_key().as_ref().to_vec();
            RingKey {
                kp,
                point,
                fail: false,
            }
        }
    }

    impl ExternalKey for RingKey {
        fn public_point(&self) -> &[u8] {
            &self.point
        }
        fn key_id(&self) -> &[u8] {
            b"ring"
        }
        fn label(&self) -> &str {
            "test-key"
        }
        fn sign_p256_sha256(&self, msg: &[u8]) -> Result<[u8; 64], SignerError> {
            if self.fail {
                return Err(SignerError {
                    label: self.label().into(),
                    reason: "CKR_DEVICE_REMOVED".into(),
                });
            }
            let sig = self.kp.sign(&SystemRandom::new(), msg).unwrap();
            Ok(sig.as_ref().try_into().unwrap())
        }
    }

    #[test]
    fn raw_signatures_become_der_that_verifies() {
        let k = RingKey::new();
        let pk = UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, k.point.clone());
        // Enough signatures that r and s both start with a set top bit and
        // with a zero byte at least once.
        let (mut padded, mut short) = (false, false);
        for i in 0..600u32 {
            let msg = i.to_be_bytes();
            let raw = k.sign_p256_sha256(&msg).unwrap();
            let der = ecdsa_der(&raw);
            pk.verify(&msg, &der).unwrap();
            padded |= raw[0] & 0x80 != 0;
            short |= raw[0] == 0 || raw[32] == 0;
        }
        assert!(padded && short);
    }

    #[test]
    fn edge_integers_encode_minimally() {
        let mut raw = [0u8; 64];
        raw[31] = 1;
        raw[32] = 0x80;
        assert_eq!(
            ecdsa_der(&raw),
            [
                [0x30, 0x26, 0x02, 0x01, 0x01, 0x02, 0x21, 0x00, 0x80].as_slice(),
                &[0; 31]
            ]
            .concat()
        );
        assert_eq!(ecdsa_der(&[0; 64]), [0x30, 0x06, 2, 1, 0, 2, 1, 0]);
    }

    #[test]
    fn points_are_checked() {
        assert!(check_p256_point(&RingKey::new().point).is_ok());
        assert!(check_p256_point(&[4; 33]).is_err());
        let mut p = RingKey::new().point;
        p[0] = 2;
        assert!(check_p256_point(&p).is_err());
    }

    #[test]
    fn an_external_key_signs_jwt_svids_that_validate_against_its_jwk() {
        use crate::jwt::{JwtBundle, JwtError, JwtSigner, jwks, validate};
        use std::collections::BTreeMap;
        use std::sync::Arc;
        let s = JwtSigner::from_external(
            "kid-1".into(),
            Arc::new(RingKey::new()),
            crate::now_unix() + 600,
        )
        .unwrap();
        assert!(s.external_key().is_some() && s.pkcs8().is_empty());
        assert_eq!(s.public_jwk["kid"], "kid-1");
        let bundle = JwtBundle::from_jwks(&jwks(std::slice::from_ref(&s.public_jwk))).unwrap();
        let td = spiffe::TrustDomain::new("example.org").unwrap();
        let bundles = BTreeMap::from([(td, bundle)]);
        let id = spiffe::SpiffeId::new("spiffe://example.org/svc").unwrap();
        let t = s
            .sign(
                &id,
                &["api".into()],
                std::time::Duration::from_secs(60),
                crate::now_unix(),
                Some("https://issuer.example"),
            )
            .unwrap();
        let v = validate(&t.token, "api", &bundles).unwrap();
        assert_eq!(v.spiffe_id, id);
        assert_eq!(v.claims["jti"], t.jti.as_str());
        let (alg, kid, typ) = crate::jwt::peek_header(&t.token).unwrap();
        assert_eq!(
            (alg.as_str(), kid.as_deref(), typ.as_deref()),
            ("ES256", Some("kid-1"), Some("JWT"))
        );
        // Another key's signature does not validate under this kid.
        let other = JwtSigner::from_external(
            "kid-1".into(),
            Arc::new(RingKey::new()),
            crate::now_unix() + 600,
        )
        .unwrap();
        let forged = other
            .sign(
                &id,
                &["api".into()],
                std::time::Duration::from_secs(60),
                crate::now_unix(),
                None,
            )
            .unwrap();
        assert!(matches!(
            validate(&forged.token, "api", &bundles),
            Err(JwtError::Rejected(_))
        ));
        // A failing key is an error, not a token.
        let mut broken = RingKey::new();
        broken.fail = true;
        let broken = JwtSigner::from_external("k".into(), Arc::new(broken), i64::MAX).unwrap();
        let e = broken
            .sign(
                &id,
                &["api".into()],
                std::time::Duration::from_secs(60),
                crate::now_unix(),
                None,
            )
            .unwrap_err();
        assert!(e.to_string().contains("CKR_DEVICE_REMOVED"), "{e}");
    }
}
