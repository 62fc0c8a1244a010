//! x509pop evidence as the server checks it: the node's certificate chain
//! (`verify_chain` against the fixture root) and its proof of possession
//! (`VerifiedNode::verify_signature`).
//!
//! Input: parts: leaf DER, concatenated intermediates DER, nonce, signature.

use std::time::Duration;

use crate::{X509POP_ROOT, fixture_now, part, parts};
use rustls_pki_types::UnixTime;
use sigil_attestors::x509pop::verify_chain;
use sigil_core::ids::sha256_hex;
use sigil_core::x509::split_der_certs;

/// One input through the target; panics when an oracle fails.
pub fn run(data: &[u8]) {
    let ps = parts(data);
    let mut chain = vec![part(&ps, 0).to_vec()];
    match split_der_certs(part(&ps, 1)) {
        Ok(certs) => chain.extend(certs),
        Err(_) => chain.push(part(&ps, 1).to_vec()),
    }
    let now = UnixTime::since_unix_epoch(Duration::from_secs(fixture_now().max(0) as u64));
    let Ok(node) = verify_chain(&chain, &[X509POP_ROOT.to_vec()], now) else {
        return;
    };
    assert_eq!(node.fingerprint, sha256_hex(part(&ps, 0)));
    assert!(node.selectors.iter().all(|s| s.starts_with("x509pop:")));
    assert!(node.selectors.contains(&format!(
        "x509pop:ca:fingerprint:{}",
        sha256_hex(X509POP_ROOT)
    )));
    let (nonce, sig) = (part(&ps, 2), part(&ps, 3));
    if node.verify_signature(nonce, sig).is_ok() {
        // The proof is bound to its nonce.
        let mut other = nonce.to_vec();
        other.push(0);
        assert!(node.verify_signature(&other, sig).is_err());
    }
}
