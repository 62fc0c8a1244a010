//! Unit tests of revocation against a temporary datastore: which serials a
//! kill or ban lists, that the CRLs carry exactly those, that a lift takes
//! them out, and that a restarted server rebuilds the same list from the
//! audit trail.

use std::time::Duration;

use x509_parser::prelude::{CertificateRevocationList, FromDer, X509Certificate};

use super::tests::{AGENT, admin, attest, entry, id, temp_state};
use super::*;
use crate::datastore::KillTarget;
use sigil_core::x509::{SvidInfo, new_key_and_csr};

/// Serials listed by each CRL, after checking each CRL's signature
/// against one of the published CAs.
fn crl_serials(s: &ServerState) -> Vec<Vec<String>> {
    let cas = s.bundle();
    s.crls()
        .iter()
        .map(|der| {
            let (_, crl) = CertificateRevocationList::from_der(der).unwrap();
            let signed_by_a_ca = cas.iter().any(|ca| {
                let (_, ca) = X509Certificate::from_der(ca).unwrap();
                crl.verify_signature(ca.public_key()).is_ok()
            });
            assert!(signed_by_a_ca, "CRL not signed by a published CA");
            let mut v: Vec<String> = crl
                .iter_revoked_certificates()
                .map(|r| hex::encode(r.raw_serial()))
                .collect();
            v.sort();
            v
        })
        .collect()
}

fn mint(s: &ServerState, agent: &str, entry_id: &str) -> String {
    let (csr, _) = new_key_and_csr().unwrap();
    let out = s
        .mint_for_agent(&id(agent), &[(entry_id.to_string(), csr)])
        .unwrap();
    SvidInfo::from_der(&out[0].as_ref().unwrap()[0])
        .unwrap()
        .serial
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[test]
fn kills_and_bans_list_exactly_the_withdrawn_serials_and_a_restart_rebuilds_them() {
    const OTHER: &str = "spiffe://example.org/agent2";
    let t = temp_state();
    let s = &t.state;
    attest(s, AGENT);
    let agent2_svid = attest(s, OTHER).serial;
    let a = s
        .create_entry(&admin(), entry(AGENT, "spiffe://example.org/w/a"))
        .unwrap();
    let b = s
        .create_entry(&admin(), entry(AGENT, "spiffe://example.org/w/b"))
        .unwrap();
    let c = s
        .create_entry(&admin(), entry(OTHER, "spiffe://example.org/w/c"))
        .unwrap();
    let (sa, sb, sc) = (
        mint(s, AGENT, &a.id),
        mint(s, AGENT, &b.id),
        mint(s, OTHER, &c.id),
    );

    // Nothing killed: one empty CRL per published CA.
    assert_eq!(crl_serials(s), vec![Vec::<String>::new()]);

    // An entry kill lists that entry's SVID only.
    let k = s
        .create_kill(&admin(), KillTarget::Entry(a.id.clone()), "test")
        .unwrap();
    assert_eq!(s.revoked_serials(), vec![sa.clone()]);
    assert_eq!(crl_serials(s), vec![vec![sa.clone()]]);
    // A lift takes it out again.
    s.lift_kill(&admin(), &k.id).unwrap();
    assert!(s.revoked_serials().is_empty());
    assert_eq!(crl_serials(s), vec![Vec::<String>::new()]);

    // A SPIFFE-ID kill lists every SVID with that ID.
    s.create_kill(
        &admin(),
        KillTarget::SpiffeId(id("spiffe://example.org/w/b")),
        "test",
    )
    .unwrap();
    assert_eq!(s.revoked_serials(), vec![sb.clone()]);

    // A ban lists the agent's own SVID and every SVID it was given.
    s.ban_agent(&admin(), OTHER).unwrap();
    let want = sorted(vec![sb.clone(), sc.clone(), agent2_svid.clone()]);
    assert_eq!(s.revoked_serials(), want);
    assert_eq!(crl_serials(s), vec![want.clone()]);

    // A restarted server rebuilds the same list from the audit trail.
    let keys = Keys::load_or_create(
        &t.dir,
        &s.cfg.trust_domain,
        Duration::from_secs(3600),
        sigil_core::jwt::JwtKeyType::EcP256,
    )
    .unwrap();
    let again = ServerState::new(s.cfg.clone(), s.store.clone(), keys).unwrap();
    assert_eq!(again.revoked_serials(), want);
    assert_eq!(crl_serials(&again), vec![want]);
}

#[test]
fn an_agent_kill_lists_the_agent_svid_and_a_selector_kill_the_entries_with_it() {
    let t = temp_state();
    let s = &t.state;
    let agent_svid = attest(s, AGENT).serial;
    let mut tagged = entry(AGENT, "spiffe://example.org/w/tagged");
    tagged.selectors.push("unix:gid:7".into());
    let tagged = s.create_entry(&admin(), tagged).unwrap();
    let plain = s
        .create_entry(&admin(), entry(AGENT, "spiffe://example.org/w/plain"))
        .unwrap();
    let (st, sp) = (mint(s, AGENT, &tagged.id), mint(s, AGENT, &plain.id));

    let sel: sigil_core::selector::Selector = "unix:gid:7".parse().unwrap();
    let k = s
        .create_kill(&admin(), KillTarget::Selector(sel), "test")
        .unwrap();
    assert_eq!(s.revoked_serials(), vec![st.clone()]);
    s.lift_kill(&admin(), &k.id).unwrap();

    s.create_kill(&admin(), KillTarget::Agent(id(AGENT)), "test")
        .unwrap();
    assert_eq!(s.revoked_serials(), sorted(vec![st, sp, agent_svid]));
    // The periodic refresh re-signs without changing the list.
    let before = s.revoked_serials();
    s.rebuild_revocations().unwrap();
    assert_eq!(s.revoked_serials(), before);
}
