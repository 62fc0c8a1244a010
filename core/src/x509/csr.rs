//! The public key of a PKCS#10 CSR, read with a strict DER walk.
//!
//! When the CSR's signature is not verified (the agent's mTLS channel
//! vouches for its keys), all the CA needs is the SubjectPublicKeyInfo. This
//! walk checks the CSR's outer structure (SEQUENCE { SEQUENCE { version 0,
//! Name, SubjectPublicKeyInfo, [0] attributes }, AlgorithmIdentifier,
//! BIT STRING }, with nothing after it and definite, minimal lengths) and
//! the key (id-ecPublicKey on P-256 or P-384, an uncompressed point), and
//! returns slices of the input. It reads in bounds everywhere and never
//! allocates; the verifying path keeps using x509-parser.

use super::X509Error;

use super::leaf::{BIT_STRING, INTEGER, OID, SEQUENCE};

const CONTEXT_0: u8 = 0xa0;

/// id-ecPublicKey, prime256v1 and secp384r1 (content octets).
const EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const P384: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x22];

/// The checked key of a CSR, borrowed from the CSR's DER.
pub(super) struct CsrKey<'a> {
    /// The whole SubjectPublicKeyInfo.
    pub(super) spki: &'a [u8],
    /// The uncompressed point (the SubjectPublicKeyInfo's BIT STRING).
    pub(super) point: &'a [u8],
}

fn bad(what: &str) -> X509Error {
    X509Error::Csr(format!("malformed DER: {what}"))
}

/// (content, whole element, rest of the input).
type Element<'a> = (&'a [u8], &'a [u8], &'a [u8]);

/// One element at the start of `input` with tag `tag`.
fn element<'a>(input: &'a [u8], tag: u8, what: &str) -> Result<Element<'a>, X509Error> {
    if input.first() != Some(&tag) {
        return Err(bad(&format!("expected {what}")));
    }
    let (len, header) = match input.get(1).copied() {
        Some(n) if n < 0x80 => (usize::from(n), 2),
        // Long forms must be minimal (DER): 0x81 for 128..=255, 0x82 for
        // 256..=65535; a CSR never needs more.
        Some(0x81) => match input.get(2).copied() {
            Some(n) if n >= 0x80 => (usize::from(n), 3),
            _ => return Err(bad(&format!("length of {what}"))),
        },
        Some(0x82) => match (input.get(2).copied(), input.get(3).copied()) {
            (Some(hi), Some(lo)) if hi != 0 => ((usize::from(hi) << 8) | usize::from(lo), 4),
            _ => return Err(bad(&format!("length of {what}"))),
        },
        _ => return Err(bad(&format!("length of {what}"))),
    };
    let end = header + len;
    let content = input
        .get(header..end)
        .ok_or_else(|| bad(&format!("{what} runs past the end")))?;
    let whole = input.get(..end).unwrap_or_default();
    let rest = input.get(end..).unwrap_or_default();
    Ok((content, whole, rest))
}

/// The SubjectPublicKeyInfo of `der` if it is a well-formed CSR for an EC
/// P-256 or P-384 key.
pub(super) fn public_key(der: &[u8]) -> Result<CsrKey<'_>, X509Error> {
    let (csr, _, rest) = element(der, SEQUENCE, "CertificationRequest")?;
    if !rest.is_empty() {
        return Err(X509Error::Csr("trailing bytes after the CSR".into()));
    }
    let (info, _, rest) = element(csr, SEQUENCE, "CertificationRequestInfo")?;
    let (_, _, rest) = element(rest, SEQUENCE, "signatureAlgorithm")?;
    let (_, _, rest) = element(rest, BIT_STRING, "signature")?;
    if !rest.is_empty() {
        return Err(bad("extra elements in the CSR"));
    }
    let (version, _, rest) = element(info, INTEGER, "version")?;
    if version != [0] {
        return Err(bad("version is not 0 (v1)"));
    }
    let (_, _, rest) = element(rest, SEQUENCE, "subject")?;
    let (spki_body, spki, rest) = element(rest, SEQUENCE, "subjectPKInfo")?;
    let (_, _, rest) = element(rest, CONTEXT_0, "attributes")?;
    if !rest.is_empty() {
        return Err(bad("extra elements in CertificationRequestInfo"));
    }
    let (alg, _, rest) = element(spki_body, SEQUENCE, "algorithm")?;
    let (bits, _, rest) = element(rest, BIT_STRING, "subjectPublicKey")?;
    if !rest.is_empty() {
        return Err(bad("extra elements in subjectPKInfo"));
    }
    let (key_type, _, rest) =
        element(alg, OID, "algorithm OID").map_err(|_| X509Error::CsrKeyType)?;
    if key_type != EC_PUBLIC_KEY {
        return Err(X509Error::CsrKeyType);
    }
    let (curve, _, rest) = element(rest, OID, "curve OID").map_err(|_| X509Error::CsrKeyType)?;
    if !rest.is_empty() {
        return Err(X509Error::CsrKeyType);
    }
    let point_len = point_len(curve)?;
    let point = match bits.split_first() {
        Some((0, point)) => point,
        _ => return Err(bad("subjectPublicKey has unused bits")),
    };
    check_point(point, point_len)?;
    Ok(CsrKey { spki, point })
}

/// The uncompressed point length for a curve OID (content octets); only
/// P-256 and P-384 are issued for.
pub(super) fn point_len(curve: &[u8]) -> Result<usize, X509Error> {
    match curve {
        P256 => Ok(65),
        P384 => Ok(97),
        _ => Err(X509Error::CsrKeyType),
    }
}

/// Checks that `point` is an uncompressed EC point of `len` bytes.
pub(super) fn check_point(point: &[u8], len: usize) -> Result<(), X509Error> {
    if point.len() != len || point.first() != Some(&0x04) {
        return Err(X509Error::Csr(
            "public key is not an uncompressed EC point of its curve".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384};
    use x509_parser::certification_request::X509CertificationRequest;
    use x509_parser::prelude::FromDer;

    fn csr(alg: &'static rcgen::SignatureAlgorithm, cn: Option<&str>) -> Vec<u8> {
        let key = KeyPair::generate_for(alg).unwrap();
        let mut params = CertificateParams::default();
        if let Some(cn) = cn {
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, cn);
            params.subject_alt_names =
                vec![rcgen::SanType::DnsName("x.example".try_into().unwrap())];
        }
        params.serialize_request(&key).unwrap().der().to_vec()
    }

    #[test]
    fn agrees_with_x509_parser_on_valid_csrs() {
        // A long CN pushes lengths into the two-byte form.
        let long = "n".repeat(300);
        for der in [
            csr(&PKCS_ECDSA_P256_SHA256, None),
            csr(&PKCS_ECDSA_P384_SHA384, None),
            csr(&PKCS_ECDSA_P256_SHA256, Some("node-1")),
            csr(&PKCS_ECDSA_P256_SHA256, Some(&long)),
        ] {
            let key = public_key(&der).unwrap();
            let (_, parsed) = X509CertificationRequest::from_der(&der).unwrap();
            let spki = &parsed.certification_request_info.subject_pki;
            assert_eq!(key.spki, spki.raw);
            assert_eq!(key.point, &*spki.subject_public_key.data);
        }
    }

    #[test]
    fn other_key_types_are_refused() {
        let alg = &rcgen::PKCS_ED25519;
        assert!(matches!(
            public_key(&csr(alg, None)),
            Err(X509Error::CsrKeyType)
        ));
    }

    #[test]
    fn every_truncation_and_byte_flip_is_handled_without_panic() {
        let der = csr(&PKCS_ECDSA_P256_SHA256, Some("node-1"));
        for n in 0..der.len() {
            assert!(
                public_key(&der[..n]).is_err(),
                "prefix of {n} bytes accepted"
            );
        }
        let mut extra = der.clone();
        extra.push(0);
        assert!(public_key(&extra).is_err());
        // Flipping bytes must never panic; flips in the parts the walk checks
        // (tags, lengths, key) are refused.
        for i in 0..der.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut m = der.clone();
                m[i] ^= flip;
                let _ = public_key(&m);
            }
        }
        let mut m = der.clone();
        m[0] = 0x31; // SET instead of SEQUENCE
        assert!(public_key(&m).is_err());
    }

    #[test]
    fn non_minimal_and_indefinite_lengths_are_refused() {
        // SEQUENCE with a long-form length for 5 bytes, and indefinite form.
        assert!(element(&[0x30, 0x81, 0x05, 1, 2, 3, 4, 5], SEQUENCE, "x").is_err());
        assert!(element(&[0x30, 0x82, 0x00, 0x05, 1, 2, 3, 4, 5], SEQUENCE, "x").is_err());
        assert!(element(&[0x30, 0x80, 1, 2, 0, 0], SEQUENCE, "x").is_err());
        let (content, whole, rest) = element(&[0x30, 0x02, 7, 8, 9], SEQUENCE, "x").unwrap();
        assert_eq!(
            (content, whole, rest),
            (&[7u8, 8][..], &[0x30u8, 2, 7, 8][..], &[9u8][..])
        );
    }
}
