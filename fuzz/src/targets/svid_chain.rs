//! Agent-SVID (and workload SVID) chain validation as the server's and the
//! agent's TLS verifiers run it: `verify_svid_chain_with_crls` against the
//! fixture CA with CRLs, then `SvidInfo::from_der` (which the server's
//! `authenticate_agent` runs on every call), `split_der_certs` and
//! `pem_to_certs`.
//!
//! Input: parts (see `sigil_fuzz::parts`): leaf DER, concatenated
//! intermediates DER, CRL DER, ... .

use std::time::Duration;

use crate::{CA_DER, fixture_now, part, parts};
use rustls_pki_types::{CertificateDer, UnixTime};
use sigil_core::TrustDomain;
use sigil_core::tls::verify_svid_chain_with_crls;
use sigil_core::x509::{SvidInfo, pem_to_certs, split_der_certs};

/// One input through the target; panics when an oracle fails.
pub fn run(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = pem_to_certs(text);
    }
    let ps = parts(data);
    let leaf = part(&ps, 0);
    let info = SvidInfo::from_der(leaf);
    let inters: Vec<CertificateDer<'_>> = match split_der_certs(part(&ps, 1)) {
        Ok(certs) => {
            assert_eq!(certs.concat(), part(&ps, 1), "split loses no byte");
            certs.into_iter().map(CertificateDer::from).collect()
        }
        Err(_) => vec![CertificateDer::from(part(&ps, 1))],
    };
    let crls: Vec<&[u8]> = ps.iter().skip(2).copied().collect();
    let now_secs = fixture_now();
    let now = UnixTime::since_unix_epoch(Duration::from_secs(now_secs.max(0) as u64));
    for server in [false, true] {
        let r = verify_svid_chain_with_crls(
            &[CA_DER],
            &CertificateDer::from(leaf),
            &inters,
            now,
            server,
            &crls,
        );
        if let Ok(id) = r {
            let info = info.as_ref().expect("a verified leaf is an SVID");
            assert_eq!(info.spiffe_id, id);
            assert!(info.not_before <= now_secs && now_secs <= info.not_after);
            let td = TrustDomain::new("example.org").expect("valid");
            assert!(id.is_member_of(&td));
        }
    }
}
