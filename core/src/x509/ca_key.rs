//! The CA's private key, wherever it lives: in this process (an rcgen
//! `KeyPair`, signing with ring, the default) or outside it (an
//! [`ExternalKey`], such as a PKCS#11 token). rcgen signs the CA
//! certificate and the CRLs through [`SigningKey`]; the SVID hot path
//! calls [`CaKey::sign_der`], which keeps the external key's own error.

use std::sync::{Arc, Mutex};

use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256, PublicKeyData, SignatureAlgorithm, SigningKey};

use super::X509Error;
use crate::signer::{ExternalKey, ecdsa_der};

/// A CA signing key.
#[expect(
    clippy::large_enum_variant,
    reason = "one per CA; boxing the in-process key would add a pointer chase to every signature"
)]
pub(super) enum CaKey {
    /// Held in process.
    Local(KeyPair),
    /// Held by an external key store (ECDSA P-256 only).
    External(External),
}

/// An external key, and the last error it gave while rcgen was signing
/// (rcgen's own error has no room for it).
pub(super) struct External {
    pub(super) key: Arc<dyn ExternalKey>,
    last_error: Mutex<Option<String>>,
}

impl CaKey {
    pub(super) fn external(key: Arc<dyn ExternalKey>) -> CaKey {
        CaKey::External(External {
            key,
            last_error: Mutex::new(None),
        })
    }

    /// Signs `msg` with the CA's algorithm (a DER ECDSA signature).
    pub(super) fn sign_der(&self, msg: &[u8]) -> Result<Vec<u8>, X509Error> {
        match self {
            CaKey::Local(k) => k.sign(msg).map_err(super::crypto),
            CaKey::External(e) => e
                .key
                .sign_p256_sha256(msg)
                .map(|raw| ecdsa_der(&raw))
                .map_err(|e| X509Error::Signer(e.to_string())),
        }
    }

    /// An rcgen error as an [`X509Error`], with the external key's own
    /// reason when it was the one that failed.
    pub(super) fn rcgen_error(&self, e: rcgen::Error) -> X509Error {
        if let (CaKey::External(x), rcgen::Error::RemoteKeyError) = (self, &e)
            && let Some(reason) = x
                .last_error
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take()
        {
            return X509Error::Signer(reason);
        }
        super::crypto(e)
    }
}

impl PublicKeyData for CaKey {
    fn der_bytes(&self) -> &[u8] {
        match self {
            CaKey::Local(k) => k.der_bytes(),
            CaKey::External(e) => e.key.public_point(),
        }
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        match self {
            CaKey::Local(k) => k.algorithm(),
            CaKey::External(_) => &PKCS_ECDSA_P256_SHA256,
        }
    }
}

impl SigningKey for CaKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        match self {
            CaKey::Local(k) => k.sign(msg),
            CaKey::External(x) => match x.key.sign_p256_sha256(msg) {
                Ok(raw) => Ok(ecdsa_der(&raw)),
                Err(e) => {
                    *x.last_error
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(e.to_string());
                    Err(rcgen::Error::RemoteKeyError)
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use spiffe::{SpiffeId, TrustDomain};
    use x509_parser::prelude::{CertificateRevocationList, FromDer, X509Certificate};

    use crate::signer::tests::RingKey;
    use crate::x509::{Ca, CrlEntry, CsrSignature, X509Error, new_key_and_csr};

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    #[test]
    fn an_external_key_signs_the_ca_its_svids_and_crls() {
        let key = Arc::new(RingKey::new());
        let ca = Ca::generate_external(&td(), Duration::from_secs(3600), key.clone()).unwrap();
        assert!(ca.external_key().is_some());
        let (_, cert) = X509Certificate::from_der(ca.cert_der()).unwrap();
        cert.verify_signature(None).unwrap();
        assert_eq!(cert.public_key().subject_public_key.data.as_ref(), {
            use crate::signer::ExternalKey;
            key.public_point()
        });

        let id = SpiffeId::new("spiffe://example.org/svc").unwrap();
        let (csr, _) = new_key_and_csr().unwrap();
        let der = ca
            .sign_svid(
                &csr,
                CsrSignature::Verify,
                &id,
                &[],
                Duration::from_secs(60),
            )
            .unwrap();
        let got = crate::tls::verify_svid_chain(
            &[ca.cert_der().to_vec()],
            &der.clone().into(),
            &[],
            rustls_pki_types::UnixTime::now(),
            false,
        )
        .unwrap();
        assert_eq!(got, id);

        let now = crate::now_unix();
        let crl = ca
            .sign_crl(
                &[CrlEntry {
                    serial: "01".into(),
                    revoked_at: now,
                }],
                1,
                now,
                now + 60,
            )
            .unwrap();
        let (_, crl) = CertificateRevocationList::from_der(&crl).unwrap();
        crl.verify_signature(cert.public_key()).unwrap();

        // Reloaded over the same key it signs on; another key is refused.
        let again = Ca::load_external(ca.cert_der(), key, &td()).unwrap();
        let der = again
            .sign_svid(
                &csr,
                CsrSignature::Verify,
                &id,
                &[],
                Duration::from_secs(60),
            )
            .unwrap();
        let (_, leaf) = X509Certificate::from_der(&der).unwrap();
        leaf.verify_signature(Some(cert.public_key())).unwrap();
        let e = Ca::load_external(ca.cert_der(), Arc::new(RingKey::new()), &td()).unwrap_err();
        assert!(e.to_string().contains("does not match"), "{e}");
    }

    #[test]
    fn a_failing_external_key_gives_its_reason() {
        let mut key = RingKey::new();
        key.fail = true;
        let key = Arc::new(key);
        let e = Ca::generate_external(&td(), Duration::from_secs(60), key).unwrap_err();
        assert_eq!(
            e,
            X509Error::Signer("signing key test-key: CKR_DEVICE_REMOVED".into())
        );
    }
}
