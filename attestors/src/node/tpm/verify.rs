//! Server-side checks: EK identity and trust, AK properties, quotes.

use std::collections::BTreeSet;

use ring::digest;
use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use rsa::pkcs8::EncodePublicKey;
use rsa::{BigUint, RsaPublicKey};
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::public_key::PublicKey as X509PublicKey;

use super::wire::{
    KeyParams, PublicArea, QuoteAttest, Signature, alg, attr, curve, left_pad, strip_leading_zeros,
};
use super::{NONCE_MAX_LEN, NONCE_MIN_LEN, PCR_COUNT, TpmError, TpmEvidence, TpmQuote};

/// DER prefix of a P-256 `SubjectPublicKeyInfo` (id-ecPublicKey, prime256v1)
/// up to the uncompressed point.
const P256_SPKI_PREFIX: &[u8] = &[
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];
/// DER prefix of a P-384 `SubjectPublicKeyInfo` (id-ecPublicKey, secp384r1).
const P384_SPKI_PREFIX: &[u8] = &[
    0x30, 0x76, 0x30, 0x10, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x05, 0x2b,
    0x81, 0x04, 0x00, 0x22, 0x03, 0x62, 0x00,
];

/// The hex SHA-256 of the EK's DER `SubjectPublicKeyInfo`.
///
/// `ek_public` is the EK's `TPM2B_PUBLIC`. The hash covers the standard DER
/// encoding of the public key (RSA: `rsaEncryption` with NULL parameters
/// and `RSAPublicKey{n, e}`; ECC: `id-ecPublicKey`, named curve,
/// uncompressed point), so it equals
/// `tpm2_createek -G rsa -u ek.pem -f pem && openssl pkey -pubin -in ek.pem -outform DER | sha256sum`
/// and the hash of the EK certificate's public key. It is the `<unique>`
/// part of `spiffe://<td>/sigil/agent/tpm/<ek hash>` and the value of the
/// `tpm:ek-hash:HEX` selector.
pub fn ek_hash(ek_public: &[u8]) -> Result<String, TpmError> {
    let ek = PublicArea::from_tpm2b(ek_public, "EK TPM2B_PUBLIC")?;
    spki_hash(&ek)
}

fn spki_hash(area: &PublicArea<'_>) -> Result<String, TpmError> {
    let der = spki_der(area)?;
    Ok(sigil_core::ids::sha256_hex(&der))
}

/// The DER `SubjectPublicKeyInfo` of a TPM public key.
pub(crate) fn spki_der(area: &PublicArea<'_>) -> Result<Vec<u8>, TpmError> {
    match &area.params {
        KeyParams::Rsa {
            modulus, exponent, ..
        } => {
            let key = RsaPublicKey::new(
                BigUint::from_bytes_be(modulus),
                BigUint::from(rsa_exponent(*exponent)),
            )
            .map_err(|e| TpmError::Malformed {
                what: "TPM2B_PUBLIC",
                reason: format!("RSA public key: {e}"),
            })?;
            let der = key.to_public_key_der().map_err(|e| {
                TpmError::Bug(format!("DER encoding of an RSA public key failed: {e}"))
            })?;
            Ok(der.as_bytes().to_vec())
        }
        KeyParams::Ecc { curve, x, y, .. } => {
            let (prefix, len) = match *curve {
                curve::NIST_P256 => (P256_SPKI_PREFIX, 32),
                curve::NIST_P384 => (P384_SPKI_PREFIX, 48),
                other => {
                    return Err(TpmError::Unsupported(format!(
                        "ECC curve {other:#06x}; expected NIST P-256 or P-384"
                    )));
                }
            };
            let mut der = prefix.to_vec();
            der.push(0x04);
            der.extend(ecc_coordinate(x, len)?);
            der.extend(ecc_coordinate(y, len)?);
            Ok(der)
        }
    }
}

fn rsa_exponent(exponent: u32) -> u32 {
    if exponent == 0 { 65537 } else { exponent }
}

fn ecc_coordinate(value: &[u8], len: usize) -> Result<Vec<u8>, TpmError> {
    left_pad(value, len).ok_or_else(|| TpmError::Malformed {
        what: "TPM2B_PUBLIC",
        reason: format!("ECC coordinate of {} bytes, expected {len}", value.len()),
    })
}

/// The Name of an object: `nameAlg || H_nameAlg(TPMT_PUBLIC)` (SHA-256 only).
pub(crate) fn object_name(area: &PublicArea<'_>) -> Result<Vec<u8>, TpmError> {
    if area.name_alg != alg::SHA256 {
        return Err(TpmError::Unsupported(format!(
            "name algorithm {:#06x}; expected SHA-256",
            area.name_alg
        )));
    }
    let mut name = alg::SHA256.to_be_bytes().to_vec();
    name.extend_from_slice(digest::digest(&digest::SHA256, area.raw).as_ref());
    Ok(name)
}

/// An EK is a restricted decryption key that never leaves its TPM.
pub(crate) fn check_ek_attributes(ek: &PublicArea<'_>) -> Result<(), TpmError> {
    let required = attr::FIXED_TPM | attr::FIXED_PARENT | attr::RESTRICTED | attr::DECRYPT;
    if !ek.has(required) || ek.has(attr::SIGN_ENCRYPT) {
        return Err(TpmError::BadEkAttributes(format!(
            "objectAttributes {:#010x}; an EK must be fixedTPM, fixedParent, restricted, \
             decrypt and not sign",
            ek.attributes
        )));
    }
    Ok(())
}

/// An AK is a restricted signing key that never leaves its TPM: only such a
/// key cannot sign a forged `TPMS_ATTEST`. Its scheme must be one
/// [`verify_quote`] checks (RSASSA-SHA256 or ECDSA-P256-SHA256).
pub(crate) fn check_ak_attributes(ak: &PublicArea<'_>) -> Result<(), TpmError> {
    let required = attr::FIXED_TPM
        | attr::FIXED_PARENT
        | attr::SENSITIVE_DATA_ORIGIN
        | attr::RESTRICTED
        | attr::SIGN_ENCRYPT;
    if !ak.has(required) || ak.has(attr::DECRYPT) {
        return Err(TpmError::BadAkAttributes(format!(
            "objectAttributes {:#010x}; an AK must be fixedTPM, fixedParent, \
             sensitiveDataOrigin, restricted, sign and not decrypt",
            ak.attributes
        )));
    }
    match &ak.params {
        KeyParams::Rsa {
            scheme, key_bits, ..
        } if scheme.alg == alg::RSASSA && scheme.hash == alg::SHA256 && *key_bits >= 2048 => Ok(()),
        KeyParams::Ecc { scheme, curve, .. }
            if scheme.alg == alg::ECDSA
                && scheme.hash == alg::SHA256
                && *curve == curve::NIST_P256 =>
        {
            Ok(())
        }
        KeyParams::Rsa {
            scheme, key_bits, ..
        } => Err(TpmError::Unsupported(format!(
            "RSA-{key_bits} AK with scheme {:#06x}/{:#06x}; expected RSASSA-SHA256, >= 2048 bits",
            scheme.alg, scheme.hash
        ))),
        KeyParams::Ecc { scheme, curve, .. } => Err(TpmError::Unsupported(format!(
            "ECC AK on curve {curve:#06x} with scheme {:#06x}/{:#06x}; expected ECDSA-P256-SHA256",
            scheme.alg, scheme.hash
        ))),
    }
}

/// Decides whether the EK in `evidence` belongs to a trusted TPM and
/// returns its [`ek_hash`].
///
/// Trusted means either
/// - its EK hash is in `allowed_ek_hashes` (hex, case-insensitive), or
/// - `evidence.ek_cert` is present, was issued (signature checked) by one of
///   `ek_ca_certs` (DER; each is a trust anchor — configure the CA that issues
///   the EK certificates, usually a TPM vendor's intermediate), both are
///   within their validity period, the issuer is a CA, and the certificate's
///   public key is the EK in `ek_public`.
///
/// The EK itself must look like an EK (restricted decryption key, fixedTPM).
/// Trust in the EK says nothing about the AK: the caller continues with
/// [`make_credential`](super::make_credential) and a quote.
pub fn verify_ek(
    evidence: &TpmEvidence,
    allowed_ek_hashes: &[String],
    ek_ca_certs: &[Vec<u8>],
) -> Result<String, TpmError> {
    let ek = PublicArea::from_tpm2b(&evidence.ek_public, "EK TPM2B_PUBLIC")?;
    check_ek_attributes(&ek)?;
    let hash = spki_hash(&ek)?;
    if allowed_ek_hashes
        .iter()
        .any(|allowed| allowed.trim().eq_ignore_ascii_case(&hash))
    {
        return Ok(hash);
    }
    let reason = match (&evidence.ek_cert, ek_ca_certs.is_empty()) {
        (None, _) => "not allow-listed and the TPM sent no EK certificate".to_string(),
        (Some(_), true) => "not allow-listed and no EK CA certificates are configured".into(),
        (Some(cert), false) => match verify_ek_cert(&ek, cert, ek_ca_certs) {
            Ok(()) => return Ok(hash),
            Err(reason) => format!("not allow-listed and {reason}"),
        },
    };
    Err(TpmError::EkNotTrusted {
        ek_hash: hash,
        reason,
    })
}

fn verify_ek_cert(ek: &PublicArea<'_>, cert_der: &[u8], cas: &[Vec<u8>]) -> Result<(), String> {
    // NV-stored EK certificates may be padded after the DER; ignore the rest.
    let (_, cert) = X509Certificate::from_der(cert_der)
        .map_err(|e| format!("the EK certificate does not parse: {e}"))?;
    if !cert_key_is(&cert, ek)? {
        return Err("the EK certificate is for another key than the EK".into());
    }
    if !cert.validity().is_valid() {
        return Err(format!(
            "the EK certificate is outside its validity ({} to {})",
            cert.validity().not_before,
            cert.validity().not_after
        ));
    }
    let mut reasons = Vec::new();
    for (i, ca_der) in cas.iter().enumerate() {
        let ca = match X509Certificate::from_der(ca_der) {
            Ok((_, ca)) => ca,
            Err(e) => {
                reasons.push(format!("EK CA #{i} does not parse: {e}"));
                continue;
            }
        };
        if ca.subject().as_raw() != cert.issuer().as_raw() {
            continue;
        }
        if let Err(e) = cert.verify_signature(Some(ca.public_key())) {
            reasons.push(format!("not signed by EK CA #{i} ({}): {e}", ca.subject()));
            continue;
        }
        if !ca.is_ca() {
            reasons.push(format!("EK CA #{i} ({}) is not a CA", ca.subject()));
            continue;
        }
        if !ca.validity().is_valid() {
            reasons.push(format!(
                "EK CA #{i} ({}) is outside its validity",
                ca.subject()
            ));
            continue;
        }
        return Ok(());
    }
    if reasons.is_empty() {
        Err(format!(
            "no configured EK CA is the EK certificate's issuer ({})",
            cert.issuer()
        ))
    } else {
        Err(reasons.join("; "))
    }
}

/// Whether the certificate's subject public key is the TPM key `ek`.
fn cert_key_is(cert: &X509Certificate<'_>, ek: &PublicArea<'_>) -> Result<bool, String> {
    let parsed = cert
        .public_key()
        .parsed()
        .map_err(|e| format!("the EK certificate's public key does not parse: {e}"))?;
    Ok(match (parsed, &ek.params) {
        (
            X509PublicKey::RSA(rsa),
            KeyParams::Rsa {
                modulus, exponent, ..
            },
        ) => {
            strip_leading_zeros(rsa.modulus) == strip_leading_zeros(modulus)
                && strip_leading_zeros(rsa.exponent)
                    == strip_leading_zeros(&rsa_exponent(*exponent).to_be_bytes())
        }
        (X509PublicKey::EC(_), KeyParams::Ecc { .. }) => {
            // The full SPKI carries the curve; compare it as a whole.
            spki_der(ek).map_err(|e| e.to_string())? == cert.public_key().raw
        }
        _ => false,
    })
}

/// Verifies a quote from the AK `ak_public` (`TPM2B_PUBLIC`) and returns the
/// quoted SHA-256 PCR values, sorted by index.
///
/// Checks: the AK is a restricted, fixedTPM signing key (so it cannot sign
/// non-TPM data that looks like an attestation); `quote.signature` is its
/// signature (RSASSA-SHA256 or ECDSA-P256-SHA256) over `quote.attest`; the
/// attestation is TPM-generated (`TPM_GENERATED_VALUE`) and a quote
/// (`TPM_ST_ATTEST_QUOTE`); its `extraData` is `nonce` (so the quote is
/// fresh); it selects exactly the SHA-256 PCRs `pcrs` (indices 0..24); and
/// `quote.pcr_values` hold exactly those PCRs, 32 bytes each, whose
/// concatenation in index order hashes to the quoted `pcrDigest`.
///
/// Only call this for an AK whose credential activation succeeded against a
/// trusted EK; this function cannot know which TPM the AK lives in.
pub fn verify_quote(
    ak_public: &[u8],
    quote: &TpmQuote,
    nonce: &[u8],
    pcrs: &[u8],
) -> Result<Vec<(u8, Vec<u8>)>, TpmError> {
    check_nonce(nonce)?;
    let requested = pcr_set(pcrs)?;
    let ak = PublicArea::from_tpm2b(ak_public, "AK TPM2B_PUBLIC")?;
    check_ak_attributes(&ak)?;
    verify_signature(&ak, &quote.attest, &quote.signature)?;

    let attest = QuoteAttest::parse(&quote.attest)?;
    if attest.extra_data != nonce {
        return Err(TpmError::NonceMismatch);
    }
    let mut quoted = None;
    for (hash, bitmap) in &attest.pcr_select {
        if bitmap.iter().all(|b| *b == 0) {
            continue;
        }
        if *hash != alg::SHA256 || quoted.is_some() {
            return Err(TpmError::PcrSelectionMismatch {
                requested: requested.iter().copied().collect(),
                quoted: format!("selections {:?}", attest.pcr_select),
            });
        }
        let mut set = BTreeSet::new();
        for (byte_index, byte) in bitmap.iter().enumerate() {
            for bit in 0..8 {
                if byte & (1 << bit) != 0 {
                    set.insert(byte_index * 8 + bit);
                }
            }
        }
        quoted = Some(set);
    }
    let quoted = quoted.unwrap_or_default();
    if quoted
        .iter()
        .copied()
        .ne(requested.iter().map(|i| usize::from(*i)))
    {
        return Err(TpmError::PcrSelectionMismatch {
            requested: requested.iter().copied().collect(),
            quoted: format!("sha256 {quoted:?}"),
        });
    }

    let mut values = quote.pcr_values.clone();
    values.sort_by_key(|(index, _)| *index);
    let indices: Vec<u8> = values.iter().map(|(index, _)| *index).collect();
    if indices.iter().ne(requested.iter()) {
        return Err(TpmError::PcrValuesMismatch(format!(
            "PCR values for {indices:?}, the quote covers {:?}",
            requested
        )));
    }
    let mut ctx = digest::Context::new(&digest::SHA256);
    for (index, value) in &values {
        if value.len() != 32 {
            return Err(TpmError::PcrValuesMismatch(format!(
                "PCR {index} value of {} bytes, expected 32 (sha256)",
                value.len()
            )));
        }
        ctx.update(value);
    }
    if ctx.finish().as_ref() != attest.pcr_digest {
        return Err(TpmError::PcrValuesMismatch(
            "the PCR values do not hash to the quoted PCR digest".into(),
        ));
    }
    Ok(values)
}

pub(crate) fn check_nonce(nonce: &[u8]) -> Result<(), TpmError> {
    if (NONCE_MIN_LEN..=NONCE_MAX_LEN).contains(&nonce.len()) {
        Ok(())
    } else {
        Err(TpmError::InvalidArgument(format!(
            "nonce of {} bytes, expected {NONCE_MIN_LEN}..={NONCE_MAX_LEN}",
            nonce.len()
        )))
    }
}

/// The requested PCR indices as a set; each must be below [`PCR_COUNT`].
pub(crate) fn pcr_set(pcrs: &[u8]) -> Result<BTreeSet<u8>, TpmError> {
    if pcrs.is_empty() {
        return Err(TpmError::InvalidArgument("no PCRs requested".into()));
    }
    if let Some(bad) = pcrs.iter().find(|i| usize::from(**i) >= PCR_COUNT) {
        return Err(TpmError::InvalidArgument(format!(
            "PCR index {bad}, expected 0..{PCR_COUNT}"
        )));
    }
    Ok(pcrs.iter().copied().collect())
}

fn verify_signature(ak: &PublicArea<'_>, message: &[u8], sig: &[u8]) -> Result<(), TpmError> {
    let sig = Signature::parse(sig)?;
    let ok = match (&ak.params, sig) {
        (
            KeyParams::Rsa {
                modulus, exponent, ..
            },
            Signature::Rsa {
                scheme: alg::RSASSA,
                hash: alg::SHA256,
                sig,
            },
        ) => {
            let e = rsa_exponent(*exponent).to_be_bytes();
            RsaPublicKeyComponents {
                n: strip_leading_zeros(modulus),
                e: strip_leading_zeros(&e),
            }
            .verify(&signature::RSA_PKCS1_2048_8192_SHA256, message, sig)
            .is_ok()
        }
        (
            KeyParams::Ecc {
                curve: curve::NIST_P256,
                x,
                y,
                ..
            },
            Signature::Ecc {
                scheme: alg::ECDSA,
                hash: alg::SHA256,
                r,
                s,
            },
        ) => {
            let mut point = vec![0x04];
            point.extend(ecc_coordinate(x, 32)?);
            point.extend(ecc_coordinate(y, 32)?);
            let (Some(r), Some(s)) = (left_pad(r, 32), left_pad(s, 32)) else {
                return Err(TpmError::BadSignature);
            };
            let fixed = [r, s].concat();
            UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, &point)
                .verify(message, &fixed)
                .is_ok()
        }
        (_, Signature::Rsa { scheme, hash, .. } | Signature::Ecc { scheme, hash, .. }) => {
            return Err(TpmError::Unsupported(format!(
                "signature scheme {scheme:#06x}/{hash:#06x} for this AK; expected the AK's \
                 RSASSA-SHA256 or ECDSA-P256-SHA256"
            )));
        }
    };
    if ok {
        Ok(())
    } else {
        Err(TpmError::BadSignature)
    }
}

/// The marshalled `TPM2B_PUBLIC`'s DER SPKI, for tests and diagnostics.
#[cfg(test)]
pub(crate) fn spki_der_of(public: &[u8]) -> Result<Vec<u8>, TpmError> {
    spki_der(&PublicArea::from_tpm2b(public, "TPM2B_PUBLIC")?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pcr_sets_are_validated() {
        assert!(pcr_set(&[]).is_err());
        assert!(pcr_set(&[24]).is_err());
        assert_eq!(
            pcr_set(&[7, 0, 7]).unwrap().into_iter().collect::<Vec<_>>(),
            vec![0, 7]
        );
    }

    #[test]
    fn nonces_are_validated() {
        assert!(check_nonce(&[0; NONCE_MIN_LEN - 1]).is_err());
        assert!(check_nonce(&[0; NONCE_MIN_LEN]).is_ok());
        assert!(check_nonce(&[0; NONCE_MAX_LEN + 1]).is_err());
    }

    #[test]
    fn p256_spki_prefix_is_der_for_a_65_byte_point() {
        // SEQUENCE(0x59 = 89) = AlgorithmIdentifier(21) + BIT STRING(2 + 66).
        assert_eq!(P256_SPKI_PREFIX.len() + 65, 2 + 0x59);
        assert_eq!(P384_SPKI_PREFIX.len() + 97, 2 + 0x76);
    }

    #[test]
    fn ek_and_ak_attributes_are_told_apart() {
        let ak = crate::node::tpm::wire::tests_support::rsa_ak_public();
        let area = PublicArea::from_tpm2b(&ak, "AK").unwrap();
        assert!(check_ak_attributes(&area).is_ok());
        assert!(matches!(
            check_ek_attributes(&area),
            Err(TpmError::BadEkAttributes(_))
        ));
        // A name is nameAlg || sha256(TPMT_PUBLIC).
        let name = object_name(&area).unwrap();
        assert_eq!(name.len(), 34);
        assert_eq!(&name[..2], &[0x00, 0x0b]);
        // An RSA key hashes as a DER SPKI.
        let der = spki_der_of(&ak).unwrap();
        assert_eq!(&der[..4], &[0x30, 0x82, 0x01, 0x22]);
    }
}
