//! Software `TPM2_MakeCredential` (TPM 2.0 Part 1 §24, Part 3 §12.6): the
//! server wraps a secret so that only the TPM holding the EK private key,
//! and only for a loaded object with the given Name (the AK), can recover it
//! with `TPM2_ActivateCredential`.

use aes::{Aes128, Aes256};
use cfb_mode::Encryptor;
use cfb_mode::cipher::{AsyncStreamCipher, KeyIvInit};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use rsa::{BigUint, Oaep, RsaPublicKey};
use subtle::ConstantTimeEq;

use super::TpmError;
use super::verify::{check_ak_attributes, check_ek_attributes, object_name};
use super::wire::{self, KeyParams, PublicArea, SymDef, alg};

/// Largest credential secret [`make_credential`] wraps: the digest size of the
/// EK's name algorithm (SHA-256), as `TPM2_MakeCredential` requires.
pub const CREDENTIAL_SECRET_MAX_LEN: usize = 32;

/// `KDFa` (TPM 2.0 Part 1 §11.4.10.2): SP 800-108 counter-mode KDF with
/// HMAC. `label` is used with one terminating zero octet (added unless
/// present); the result is `bits` long (rounded up to whole bytes, the last
/// byte masked as the specification requires).
pub(crate) fn kdfa(
    hash: hmac::Algorithm,
    key: &[u8],
    label: &[u8],
    context_u: &[u8],
    context_v: &[u8],
    bits: u32,
) -> Vec<u8> {
    let key = hmac::Key::new(hash, key);
    let len = bits.div_ceil(8) as usize;
    let mut out = Vec::with_capacity(len);
    let mut counter: u32 = 1;
    while out.len() < len {
        let mut ctx = hmac::Context::with_key(&key);
        ctx.update(&counter.to_be_bytes());
        ctx.update(label);
        if label.last() != Some(&0) {
            ctx.update(&[0]);
        }
        ctx.update(context_u);
        ctx.update(context_v);
        ctx.update(&bits.to_be_bytes());
        out.extend_from_slice(ctx.sign().as_ref());
        counter = counter.wrapping_add(1);
    }
    out.truncate(len);
    if !bits.is_multiple_of(8)
        && let Some(first) = out.first_mut()
    {
        *first &= 0xff >> (8 - bits % 8);
    }
    out
}

/// Builds a credential-activation challenge for the AK `ak_public`
/// (`TPM2B_PUBLIC`) in the TPM whose EK is `ek_public` (`TPM2B_PUBLIC`).
///
/// Returns `(credential_blob, encrypted_secret)`: a marshalled
/// `TPM2B_ID_OBJECT` and `TPM2B_ENCRYPTED_SECRET`, the two inputs of
/// `TPM2_ActivateCredential` (and of [`AgentTpm::activate_credential`]).
/// `secret` (1..=32 bytes, fresh and random per challenge) comes back from
/// the agent only if the AK is loaded in the TPM that holds this EK; compare
/// with [`check_activation`].
///
/// Supported: RSA EKs with SHA-256 name algorithm and AES-128/256-CFB
/// symmetric parameters (the TCG default RSA-2048 EK template); the AK must
/// be a restricted signing key bound to its TPM (`fixedTPM`, `fixedParent`),
/// with a SHA-256 name algorithm.
///
/// [`AgentTpm::activate_credential`]: super::AgentTpm::activate_credential
pub fn make_credential(
    ek_public: &[u8],
    ak_public: &[u8],
    secret: &[u8],
) -> Result<(Vec<u8>, Vec<u8>), TpmError> {
    if secret.is_empty() || secret.len() > CREDENTIAL_SECRET_MAX_LEN {
        return Err(TpmError::InvalidArgument(format!(
            "credential secret of {} bytes, expected 1..={CREDENTIAL_SECRET_MAX_LEN}",
            secret.len()
        )));
    }
    let ek = PublicArea::from_tpm2b(ek_public, "EK TPM2B_PUBLIC")?;
    check_ek_attributes(&ek)?;
    let ak = PublicArea::from_tpm2b(ak_public, "AK TPM2B_PUBLIC")?;
    check_ak_attributes(&ak)?;
    let ak_name = object_name(&ak)?;

    if ek.name_alg != alg::SHA256 {
        return Err(TpmError::Unsupported(format!(
            "EK name algorithm {:#06x}; credential activation supports SHA-256 EKs",
            ek.name_alg
        )));
    }
    let (symmetric, modulus, exponent) = match ek.params {
        KeyParams::Rsa {
            symmetric,
            modulus,
            exponent,
            ..
        } => (symmetric, modulus, exponent),
        KeyParams::Ecc { .. } => {
            return Err(TpmError::Unsupported(
                "ECC EK: credential activation supports RSA EKs only".into(),
            ));
        }
    };
    let sym_key_bits = match symmetric {
        SymDef::Cipher {
            alg: alg::AES,
            key_bits: bits @ (128 | 256),
            mode: alg::CFB,
        } => bits,
        other => {
            return Err(TpmError::Unsupported(format!(
                "EK symmetric parameters {other:?}; expected AES-128-CFB or AES-256-CFB"
            )));
        }
    };

    let mut seed = [0u8; 32];
    SystemRandom::new()
        .fill(&mut seed)
        .map_err(|_| TpmError::Crypto("the system random generator failed".into()))?;

    let ek_key = RsaPublicKey::new(
        BigUint::from_bytes_be(modulus),
        BigUint::from(if exponent == 0 { 65537 } else { exponent }),
    )
    .map_err(|e| TpmError::Malformed {
        what: "EK TPM2B_PUBLIC",
        reason: format!("RSA public key: {e}"),
    })?;
    // Part 1 §B.10.4: OAEP with the EK's name algorithm and the label "IDENTITY".
    let encrypted_seed = ek_key
        .encrypt(
            &mut rand_core::OsRng,
            Oaep::new_with_label::<sha2::Sha256, _>("IDENTITY\0"),
            &seed,
        )
        .map_err(|e| TpmError::Crypto(format!("RSA-OAEP encryption of the seed: {e}")))?;

    let credential_blob = seal_credential(&seed, sym_key_bits, &ak_name, secret)?;
    Ok((credential_blob, wire::tpm2b(&encrypted_seed)?))
}

/// The deterministic part of `TPM2_MakeCredential` for a SHA-256 EK: the
/// `TPM2B_ID_OBJECT` protecting `secret` under `seed` for the object `name`.
pub(crate) fn seal_credential(
    seed: &[u8],
    sym_key_bits: u16,
    name: &[u8],
    secret: &[u8],
) -> Result<Vec<u8>, TpmError> {
    // encIdentity = CFB(symKey, IV = 0, TPM2B_DIGEST(secret)), Part 1 §24.4.
    let sym_key = kdfa(
        hmac::HMAC_SHA256,
        seed,
        b"STORAGE",
        name,
        &[],
        u32::from(sym_key_bits),
    );
    let mut enc_identity = wire::tpm2b(secret)?;
    let iv = [0u8; 16];
    match sym_key_bits {
        128 => Encryptor::<Aes128>::new_from_slices(&sym_key, &iv)
            .map_err(|e| TpmError::Bug(format!("AES-128-CFB key: {e}")))?
            .encrypt(&mut enc_identity),
        256 => Encryptor::<Aes256>::new_from_slices(&sym_key, &iv)
            .map_err(|e| TpmError::Bug(format!("AES-256-CFB key: {e}")))?
            .encrypt(&mut enc_identity),
        other => return Err(TpmError::Bug(format!("AES key of {other} bits"))),
    }
    // outerHMAC = HMAC(HMACkey, encIdentity || Name), Part 1 §24.5.
    let hmac_key = kdfa(hmac::HMAC_SHA256, seed, b"INTEGRITY", &[], &[], 256);
    let hmac_key = hmac::Key::new(hmac::HMAC_SHA256, &hmac_key);
    let mut ctx = hmac::Context::with_key(&hmac_key);
    ctx.update(&enc_identity);
    ctx.update(name);
    let outer_hmac = ctx.sign();

    let mut id_object = wire::tpm2b(outer_hmac.as_ref())?;
    id_object.extend_from_slice(&enc_identity);
    wire::tpm2b(&id_object)
}

/// Compares the secret an agent returned from credential activation with
/// the one given to [`make_credential`], in constant time.
pub fn check_activation(expected_secret: &[u8], returned: &[u8]) -> Result<(), TpmError> {
    if expected_secret.is_empty() {
        return Err(TpmError::InvalidArgument(
            "empty expected credential secret".into(),
        ));
    }
    if bool::from(expected_secret.ct_eq(returned)) {
        Ok(())
    } else {
        Err(TpmError::ActivationMismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The KDFa self-test vector of the TCG reference implementation
    /// (libtpms `KdfTestData.h`): 20-byte key, label "KDFSELFTESTLABEL",
    /// 8-byte contexts U and V, 160 output bits.
    #[test]
    fn kdfa_matches_the_tcg_reference_self_test_vectors() {
        let key = hex::decode("271fa08bbdc5060ec3dfa928ff9b73123a12da0c").unwrap();
        let u = hex::decode("ce244f395dca7391").unwrap();
        let v = hex::decode("da504031ddf12e83").unwrap();
        for (alg, expected) in [
            (
                hmac::HMAC_SHA256,
                "bb0259e1c8ba607e6a2cd704b69a902e9ade84c4",
            ),
            (
                hmac::HMAC_SHA384,
                "1dce70c9113eb2dba47bd9cfc72bf46f45b09312",
            ),
            (
                hmac::HMAC_SHA512,
                "8be2c1b85b78569b9fa759f5857c56d684810fd3",
            ),
        ] {
            // With and without the explicit terminating zero.
            for label in [&b"KDFSELFTESTLABEL"[..], &b"KDFSELFTESTLABEL\0"[..]] {
                assert_eq!(hex::encode(kdfa(alg, &key, label, &u, &v, 160)), expected);
            }
        }
    }

    #[test]
    fn kdfa_spans_several_blocks_and_masks_odd_bit_lengths() {
        let long = kdfa(hmac::HMAC_SHA256, b"k", b"STORAGE", b"n", &[], 520);
        assert_eq!(long.len(), 65);
        let odd = kdfa(hmac::HMAC_SHA256, b"k", b"L", &[], &[], 12);
        assert_eq!(odd.len(), 2);
        assert_eq!(odd[0] & 0xf0, 0);
    }

    #[test]
    fn id_object_layout() {
        let blob = seal_credential(&[7; 32], 128, &[0, 0x0b, 1, 2, 3], b"secret").unwrap();
        // TPM2B size, TPM2B_DIGEST(outer HMAC: 32), encIdentity (2 + 6).
        assert_eq!(blob.len(), 2 + 2 + 32 + 8);
        assert_eq!(&blob[..4], &[0, 42, 0, 32]);
        // Deterministic for a given seed, different for another name.
        assert_eq!(
            blob,
            seal_credential(&[7; 32], 128, &[0, 0x0b, 1, 2, 3], b"secret").unwrap()
        );
        assert_ne!(
            blob,
            seal_credential(&[7; 32], 128, &[0, 0x0b, 1, 2, 4], b"secret").unwrap()
        );
    }

    #[test]
    fn secret_size_is_checked() {
        let ek = [0u8; 4];
        assert!(matches!(
            make_credential(&ek, &ek, &[]),
            Err(TpmError::InvalidArgument(_))
        ));
        assert!(matches!(
            make_credential(&ek, &ek, &[1; 33]),
            Err(TpmError::InvalidArgument(_))
        ));
    }

    #[test]
    fn activation_is_compared_exactly() {
        assert!(check_activation(b"abc", b"abc").is_ok());
        assert_eq!(
            check_activation(b"abc", b"abd"),
            Err(TpmError::ActivationMismatch)
        );
        assert_eq!(
            check_activation(b"abc", b"ab"),
            Err(TpmError::ActivationMismatch)
        );
        assert!(check_activation(b"", b"").is_err());
    }
}
