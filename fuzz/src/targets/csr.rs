//! The CSR DER walk (`core/src/x509/csr.rs`, used when the channel vouches
//! for the key) differential against x509-parser (the verifying path, and
//! x509-parser's own reading of the SubjectPublicKeyInfo the walk returns).
//!
//! Intended difference: the walk checks only the CSR's outer structure and
//! the key, so it accepts CSRs whose subject, attributes or signature
//! x509-parser would refuse; it never extracts another key than
//! x509-parser does.

use sigil_core::x509::{CsrSignature, csr_key};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;
use x509_parser::x509::SubjectPublicKeyInfo;

/// One input through the target; panics when an oracle fails.
pub fn run(data: &[u8]) {
    let strict = csr_key(data, CsrSignature::TrustChannel);
    let verified = csr_key(data, CsrSignature::Verify);
    if let Ok((spki, point)) = strict {
        assert!(data.windows(spki.len()).any(|w| w == spki));
        let (rest, parsed) = SubjectPublicKeyInfo::from_der(spki)
            .expect("x509-parser reads the SubjectPublicKeyInfo the walk accepted");
        assert!(rest.is_empty());
        assert_eq!(&*parsed.subject_public_key.data, point);
        match parsed.parsed() {
            Ok(PublicKey::EC(ec)) => assert_eq!(ec.data(), point),
            other => panic!("walk accepted a non-EC key: {other:?}"),
        }
        assert!(point.len() == 65 || point.len() == 97);
        if let Ok((rest, csr)) = X509CertificationRequest::from_der(data) {
            assert!(rest.is_empty());
            assert_eq!(csr.certification_request_info.subject_pki.raw, spki);
        }
    }
    if let Ok(v) = verified {
        // A CSR whose signature verifies is DER from a real encoder: the
        // walk must read the same key from it.
        assert_eq!(strict.as_ref().ok(), Some(&v), "walk: {strict:?}");
    }
}
