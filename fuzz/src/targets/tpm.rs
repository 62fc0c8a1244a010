//! TPM structures the server reads from an agent (`TPM2B_PUBLIC` of the EK
//! and AK, the quote's `TPMS_ATTEST`, `TPMT_SIGNATURE`) and the credential
//! blob the agent reads from the server, through the strict parsers and the
//! public verifiers (`ek_hash`, `verify_ek`, `make_credential`,
//! `verify_quote`).
//!
//! The whole input goes to each parser; as parts (ek, ek cert, ak, attest,
//! signature, PCR values, nonce, PCR indices) to the verifiers.

use crate::{part, parts};
use sigil_attestors::node::tpm::fuzzing;
use sigil_attestors::node::tpm::{
    TpmError, TpmEvidence, TpmQuote, ek_hash, make_credential, verify_ek, verify_quote,
};
use x509_parser::prelude::FromDer;
use x509_parser::x509::SubjectPublicKeyInfo;

/// A strict parser refuses every proper prefix and any trailing byte of
/// what it accepts.
fn strict<T>(data: &[u8], parse: impl Fn(&[u8]) -> Result<T, TpmError>) -> Option<T> {
    let ok = parse(data).ok()?;
    for cut in [0, 1, data.len() / 2, data.len() - 1] {
        if cut < data.len() {
            assert!(
                parse(&data[..cut]).is_err(),
                "prefix of {cut} bytes accepted"
            );
        }
    }
    let mut longer = data.to_vec();
    longer.push(0);
    assert!(parse(&longer).is_err(), "trailing byte accepted");
    Some(ok)
}

/// One input through the target; panics when an oracle fails.
pub fn run(data: &[u8]) {
    if let Some(Some(spki)) = strict(data, fuzzing::public) {
        // The key the verifier derives is a SubjectPublicKeyInfo another
        // parser reads, and what ek_hash hashes.
        let (rest, _) = SubjectPublicKeyInfo::from_der(&spki).expect("x509-parser reads our SPKI");
        assert!(rest.is_empty());
        let h = ek_hash(data).expect("hash of a parsed key");
        assert_eq!(h, sigil_core::ids::sha256_hex(&spki));
    }
    if let Some(extra) = strict(data, fuzzing::attest) {
        assert!(extra.len() <= data.len());
    }
    strict(data, fuzzing::signature);

    let ps = parts(data);
    if let Ok((id_object, secret)) = fuzzing::activation_inputs(part(&ps, 0), part(&ps, 1)) {
        assert_eq!(id_object.len() + 2, part(&ps, 0).len());
        assert_eq!(secret.len() + 2, part(&ps, 1).len());
    }

    let (ek, ak) = (part(&ps, 0), part(&ps, 2));
    let cert = part(&ps, 1);
    let evidence = TpmEvidence {
        ek_public: ek.to_vec(),
        ek_cert: (!cert.is_empty()).then(|| cert.to_vec()),
        ak_public: ak.to_vec(),
    };
    if let Ok(hash) = ek_hash(ek) {
        match verify_ek(&evidence, std::slice::from_ref(&hash), &[]) {
            Ok(h) => assert_eq!(h, hash),
            Err(TpmError::BadEkAttributes(_)) => {}
            Err(e) => panic!("allow-listed EK refused: {e}"),
        }
    }
    let _ = verify_ek(&evidence, &[], &[cert.to_vec()]);
    if let Ok((blob, seed)) = make_credential(ek, ak, b"0123456789abcdef") {
        // What the server sends, the agent can take apart.
        let (id_object, _) = fuzzing::activation_inputs(&blob, &seed).expect("own challenge");
        assert!(id_object.len() > 34);
    }
    let pcr_values = part(&ps, 5)
        .chunks(33)
        .map(|c| (c[0], c[1..].to_vec()))
        .collect();
    let quote = TpmQuote {
        attest: part(&ps, 3).to_vec(),
        signature: part(&ps, 4).to_vec(),
        pcr_values,
    };
    let (nonce, pcrs) = (part(&ps, 6), part(&ps, 7));
    if let Ok(values) = verify_quote(ak, &quote, nonce, pcrs) {
        let mut want: Vec<u8> = pcrs.to_vec();
        want.sort_unstable();
        want.dedup();
        assert_eq!(values.iter().map(|(i, _)| *i).collect::<Vec<_>>(), want);
        assert!(values.iter().all(|(_, v)| v.len() == 32));
    }
}
