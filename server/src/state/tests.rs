//! Unit tests of the registry: the authorization core against a temporary datastore: agent
//! credential pinning, the namespace rule, and record updates that
//! concurrent renewals, bans and evictions cannot undo.

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::datastore::AttestationType;
use sigil_core::x509::new_key_and_csr;
use sigil_core::x509::{CsrSignature, SvidInfo};
use sigil_proto::common::Entry as PbEntry;
use std::sync::atomic::{AtomicUsize, Ordering};

pub(super) struct TempState {
    pub(super) state: Arc<ServerState>,
    pub(super) dir: std::path::PathBuf,
}

impl Drop for TempState {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub(super) fn temp_state() -> TempState {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "sigil-state-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = ServerConfig::parse(&format!(
        "trust_domain = \"example.org\"\ndata_dir = \"{}\"\n",
        dir.display()
    ))
    .unwrap();
    let store = Arc::new(crate::datastore::RedbStore::open(&dir.join("db.redb")).unwrap());
    let keys = Keys::load_or_create(
        &dir,
        &cfg.trust_domain,
        Duration::from_secs(3600),
        sigil_core::jwt::JwtKeyType::EcP256,
    )
    .unwrap();
    let state = Arc::new(ServerState::new(cfg, store, keys).unwrap());
    TempState { state, dir }
}

pub(super) fn id(s: &str) -> SpiffeId {
    SpiffeId::new(s).unwrap()
}

pub(super) fn attest(s: &ServerState, agent: &str) -> SvidInfo {
    let (csr, _) = new_key_and_csr().unwrap();
    let out = s
        .issue_agent_svid(
            &admin(),
            NodeAttestation {
                spiffe_id: id(agent),
                attestation_type: AttestationType::JoinToken,
                selectors: vec![],
            },
            &csr,
        )
        .unwrap();
    SvidInfo::from_der(&out.chain[0]).unwrap()
}

fn renew(s: &ServerState, agent: &str) -> Result<SvidInfo, RegistryError> {
    let (csr, _) = new_key_and_csr().unwrap();
    let chain = s.renew_agent(&id(agent), &csr)?;
    Ok(SvidInfo::from_der(&chain[0]).unwrap())
}

pub(super) fn entry(parent: &str, spiffe_id: &str) -> PbEntry {
    PbEntry {
        parent_id: parent.into(),
        spiffe_id: spiffe_id.into(),
        selectors: vec!["unix:uid:0".into()],
        ..Default::default()
    }
}

pub(super) fn admin() -> Caller {
    Caller::admin(0, 0, None)
}

pub(super) const AGENT: &str = "spiffe://example.org/agent1";

#[test]
fn a_ca_signed_certificate_that_is_not_the_agents_current_svid_is_refused() {
    let t = temp_state();
    let issued = attest(&t.state, AGENT);
    assert!(t.state.check_agent(&issued).is_ok());
    // Signed by the same CA for the same ID, valid, but never issued to
    // the agent as its credential (as a workload SVID would be).
    let (csr, _) = new_key_and_csr().unwrap();
    let forged = t
        .state
        .ca()
        .sign_svid(
            &csr,
            CsrSignature::Verify,
            &id(AGENT),
            &[],
            Duration::from_secs(300),
        )
        .unwrap();
    let forged = SvidInfo::from_der(&forged).unwrap();
    let err = t.state.check_agent(&forged).unwrap_err();
    assert!(matches!(err, RegistryError::PermissionDenied(_)), "{err:?}");
    assert!(err.to_string().contains("not the current SVID"), "{err:?}");
}

#[test]
fn the_previous_svid_is_accepted_only_until_the_new_one_is_used() {
    let t = temp_state();
    let first = attest(&t.state, AGENT);
    let second = renew(&t.state, AGENT).unwrap();
    // The agent may not have stored the renewal yet.
    assert!(t.state.check_agent(&first).is_ok());
    // A lost renewal response: the SVID in use stays acceptable.
    let third = renew(&t.state, AGENT).unwrap();
    assert!(t.state.check_agent(&first).is_ok());
    assert!(
        t.state.check_agent(&second).is_err(),
        "never used, replaced"
    );
    assert!(t.state.check_agent(&third).is_ok());
    // The new one was used: the old one is retired.
    assert!(t.state.check_agent(&first).is_err());
    assert!(t.state.check_agent(&third).is_ok());
}

#[test]
fn entries_and_agents_never_share_an_id() {
    let t = temp_state();
    attest(&t.state, AGENT);
    // An entry for a registered agent's ID.
    let err = t
        .state
        .create_entry(&admin(), entry(AGENT, "spiffe://example.org/agent1"))
        .unwrap_err();
    assert!(matches!(err, RegistryError::AlreadyExists(_)), "{err:?}");
    assert!(err.to_string().contains("registered agent"), "{err:?}");
    // An entry for an ID an unused token names.
    t.state
        .generate_token(
            &admin(),
            Some(id("spiffe://example.org/agent2")),
            Duration::from_secs(60),
        )
        .unwrap();
    let err = t
        .state
        .create_entry(&admin(), entry(AGENT, "spiffe://example.org/agent2"))
        .unwrap_err();
    assert!(err.to_string().contains("unused join token"), "{err:?}");
    // A token for an entry's ID, and for a live agent's ID.
    let e = t
        .state
        .create_entry(&admin(), entry(AGENT, "spiffe://example.org/service"))
        .unwrap();
    let err = t
        .state
        .generate_token(
            &admin(),
            Some(id("spiffe://example.org/service")),
            Duration::from_secs(60),
        )
        .unwrap_err();
    assert!(err.to_string().contains(&e.id), "names the entry: {err:?}");
    let err = t
        .state
        .generate_token(&admin(), Some(id(AGENT)), Duration::from_secs(60))
        .unwrap_err();
    assert!(err.to_string().contains("already registered"), "{err:?}");
    // Updating an entry onto an agent's ID is refused too, and nothing
    // changes.
    let mut pb = e.to_proto();
    pb.spiffe_id = AGENT.into();
    let err = t
        .state
        .update_entry(&admin(), pb, &[EntryField::SpiffeId].into())
        .unwrap_err();
    assert!(matches!(err, RegistryError::AlreadyExists(_)), "{err:?}");
    assert_eq!(
        t.state.get_entry(&e.id).unwrap().spiffe_id,
        id("spiffe://example.org/service")
    );
}

#[test]
fn a_consumed_token_releases_its_id_only_when_no_other_token_names_it() {
    let t = temp_state();
    let agent2 = id("spiffe://example.org/agent2");
    let (tok, _) = t
        .state
        .generate_token(&admin(), Some(agent2.clone()), Duration::from_secs(60))
        .unwrap();
    t.state
        .generate_token(&admin(), Some(agent2.clone()), Duration::from_secs(60))
        .unwrap();
    t.state.consume_join_token(&admin(), &tok).unwrap();
    assert!(
        t.state
            .create_entry(&admin(), entry(AGENT, agent2.to_string().as_str()))
            .is_err(),
        "the second token still names the ID"
    );
}

/// Runs `renewals` renewals against `other` from many threads at once,
/// released together by a barrier.
fn race(s: &Arc<ServerState>, other: fn(&ServerState)) {
    let barrier = Arc::new(std::sync::Barrier::new(12));
    let threads: Vec<_> = (0..12)
        .map(|i| {
            let (s, barrier) = (s.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                if i % 2 == 0 {
                    let _ = renew(&s, AGENT);
                } else {
                    other(&s);
                }
            })
        })
        .collect();
    for th in threads {
        th.join().unwrap();
    }
}

#[test]
fn renewals_racing_a_ban_never_undo_it() {
    for _ in 0..10 {
        let t = temp_state();
        let old = attest(&t.state, AGENT);
        race(&t.state, |s| {
            let _ = s.ban_agent(&admin(), AGENT);
        });
        let rec = t.state.get_agent(AGENT).unwrap();
        assert!(rec.banned, "a ban was undone: {rec:?}");
        assert!(renew(&t.state, AGENT).is_err());
        assert!(t.state.check_agent(&old).is_err());
    }
}

#[test]
fn renewals_racing_an_eviction_never_revive_the_agent() {
    for _ in 0..10 {
        let t = temp_state();
        let old = attest(&t.state, AGENT);
        race(&t.state, |s| {
            let _ = s.evict_agent(&admin(), AGENT);
        });
        let err = t.state.get_agent(AGENT).unwrap_err();
        assert!(
            matches!(err, RegistryError::NotFound(_)),
            "an evicted agent came back: {err:?}"
        );
        // Enrolled again (new token): the SVID from before the eviction
        // is never accepted again.
        let new = attest(&t.state, AGENT);
        assert!(t.state.check_agent(&new).is_ok());
        assert!(t.state.check_agent(&old).is_err());
    }
}

#[test]
fn a_spiffe_id_is_withdrawn_only_when_no_live_entry_holds_it() {
    use crate::datastore::KillTarget;
    let t = temp_state();
    attest(&t.state, AGENT);
    let a = t
        .state
        .create_entry(&admin(), entry(AGENT, "spiffe://example.org/x"))
        .unwrap();
    let mut second = entry(AGENT, "spiffe://example.org/x");
    second.selectors = vec!["unix:uid:1".into()];
    let b = t.state.create_entry(&admin(), second).unwrap();
    assert!(t.state.killed_spiffe_ids().is_empty());
    t.state
        .create_kill(&admin(), KillTarget::Entry(a.id.clone()), "one of two")
        .unwrap();
    assert!(
        t.state.killed_spiffe_ids().is_empty(),
        "entry {} still serves the ID",
        b.id
    );
    t.state
        .create_kill(&admin(), KillTarget::Entry(b.id.clone()), "both")
        .unwrap();
    assert_eq!(t.state.killed_spiffe_ids(), vec!["spiffe://example.org/x"]);
    // A SPIFFE-ID kill names the ID even with no entry at all.
    t.state
        .create_kill(
            &admin(),
            KillTarget::SpiffeId(id("spiffe://example.org/none")),
            "preemptive",
        )
        .unwrap();
    assert_eq!(
        t.state.killed_spiffe_ids(),
        vec!["spiffe://example.org/none", "spiffe://example.org/x"]
    );
}

#[test]
fn checkpoints_sign_the_head_once_and_exports_end_signed() {
    let t = temp_state();
    let s = &t.state;
    // No key yet: nothing is signed.
    attest(s, AGENT);
    assert_eq!(s.audit_checkpoint().unwrap(), None);
    let key = load_or_create_audit_key(&t.dir).unwrap();
    let public = key.public_key().clone();
    s.install_audit_key(key).unwrap();
    assert!(
        s.install_audit_key(load_or_create_audit_key(&t.dir).unwrap())
            .is_err()
    );

    let head = s.store.read().unwrap().audit_head().unwrap().unwrap();
    assert_eq!(s.audit_checkpoint().unwrap(), Some(head.seq + 1));
    // The head is a checkpoint now: nothing more to sign, not even when due.
    assert_eq!(s.audit_checkpoint().unwrap(), None);
    assert_eq!(s.audit_checkpoint_if_due().unwrap(), None);

    s.create_entry(&admin(), entry(AGENT, "spiffe://example.org/w"))
        .unwrap();
    // One unsigned record, 1000 per checkpoint and 60 s: not due yet.
    assert_eq!(s.audit_checkpoint_if_due().unwrap(), None);
    // An export page reaching the head ends with a checkpoint over it.
    let page = s.audit_export_page(1, 10_000).unwrap();
    let last = page.last().unwrap();
    assert!(matches!(
        last.event,
        sigil_core::audit::Event::Checkpoint { .. }
    ));
    assert_eq!(last.caller, Caller::server(ServerTask::AuditCheckpoint));
    let summary = sigil_core::audit::verify(&page, Some(&public)).unwrap();
    // Only the checkpoint record itself follows the signed head.
    assert_eq!(summary.unauthenticated_tail(), 1);
    // A page that stops before the head appends nothing.
    let before = s.store.read().unwrap().audit_head().unwrap().unwrap();
    s.create_entry(&admin(), entry(AGENT, "spiffe://example.org/w2"))
        .unwrap();
    s.audit_export_page(1, 2).unwrap();
    let after = s.store.read().unwrap().audit_head().unwrap().unwrap();
    assert_eq!(after.seq, before.seq + 1);

    // Queries filter by every field given.
    let q = AuditQuery {
        spiffe_id: Some(id("spiffe://example.org/w2")),
        ..Default::default()
    };
    let (found, truncated) = s.query_audit(&q, 10).unwrap();
    assert!(!truncated);
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].seq, after.seq);
    let q = AuditQuery {
        agent_id: Some(id(AGENT)),
        ..Default::default()
    };
    let (found, truncated) = s.query_audit(&q, 1).unwrap();
    assert!(truncated && found.len() == 1);
}

fn issuance_records(s: &ServerState) -> Vec<sigil_core::audit::Event> {
    s.store
        .read()
        .unwrap()
        .audit_records(0, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|r| r.event)
        .filter(|e| {
            matches!(
                e,
                sigil_core::audit::Event::X509SvidsIssued { .. }
                    | sigil_core::audit::Event::JwtSvidIssued { .. }
            )
        })
        .collect()
}

#[test]
fn each_mint_refusal_names_the_rule_that_refused_it() {
    use crate::datastore::KillTarget;
    let t = temp_state();
    let s = &t.state;
    attest(s, AGENT);
    let other = "spiffe://example.org/agent2";
    attest(s, other);
    let mine = s
        .create_entry(&admin(), entry(AGENT, "spiffe://example.org/w/mine"))
        .unwrap();
    let theirs = s
        .create_entry(&admin(), entry(other, "spiffe://example.org/w/theirs"))
        .unwrap();
    let kill = s
        .create_kill(&admin(), KillTarget::Entry(mine.id.clone()), "compromised")
        .unwrap();
    let csr = || new_key_and_csr().unwrap().0;
    let out = s
        .mint_for_agent(
            &id(AGENT),
            &[(mine.id.clone(), csr()), (theirs.id.clone(), csr())],
        )
        .unwrap();
    match &out[0] {
        Err(MintRefusal::Killed {
            entry_id,
            kill_id,
            reason,
        }) => {
            assert_eq!(
                (entry_id, kill_id, reason.as_str()),
                (&mine.id, &kill.id, "compromised")
            );
        }
        r => panic!("expected a kill refusal, got {r:?}"),
    }
    assert!(
        matches!(&out[1], Err(MintRefusal::NotAuthorized(e)) if *e == theirs.id),
        "{:?}",
        out[1]
    );
    // Outside a batch the same refusals are PermissionDenied, with the
    // same words.
    let e = s
        .mint_jwt_for_agent(&id(AGENT), &mine.id, &["aud".to_string()])
        .unwrap_err();
    assert!(
        matches!(&e, RegistryError::PermissionDenied(m) if m.contains(&kill.id)),
        "{e:?}"
    );
}

#[test]
fn a_mint_batch_is_one_record_of_the_serials_actually_signed() {
    use sigil_core::audit::Event;
    let t = temp_state();
    let s = &t.state;
    attest(s, AGENT);
    let a = s
        .create_entry(&admin(), entry(AGENT, "spiffe://example.org/w/a"))
        .unwrap();
    let b = s
        .create_entry(&admin(), entry(AGENT, "spiffe://example.org/w/b"))
        .unwrap();
    let csr = || new_key_and_csr().unwrap().0;
    let batch = [
        (a.id.clone(), csr()),
        ("no-such-entry".to_string(), csr()),
        (b.id.clone(), b"not a csr".to_vec()),
        (b.id.clone(), csr()),
    ];
    let out = s.mint_for_agent(&id(AGENT), &batch).unwrap();
    assert!(out[0].is_ok() && out[3].is_ok());
    // Each refusal says which rule refused it.
    assert!(
        matches!(&out[1], Err(MintRefusal::UnknownEntry(e)) if e == "no-such-entry"),
        "{:?}",
        out[1]
    );
    assert!(
        matches!(&out[2], Err(MintRefusal::Unsignable { entry_id, .. }) if *entry_id == b.id),
        "{:?}",
        out[2]
    );
    let leaf = |i: usize| SvidInfo::from_der(&out[i].as_ref().unwrap()[0]).unwrap();
    let recs = issuance_records(s);
    let [Event::X509SvidsIssued { agent_id, svids }] = recs.as_slice() else {
        panic!("expected one batch record, got {recs:?}");
    };
    assert_eq!(agent_id, &id(AGENT));
    let listed: Vec<(&str, &str, i64)> = svids
        .iter()
        .map(|v| (v.entry_id.as_str(), v.serial.as_str(), v.expires_at))
        .collect();
    let (l0, l3) = (leaf(0), leaf(3));
    assert_eq!(
        listed,
        [
            (a.id.as_str(), l0.serial.as_str(), l0.not_after),
            (b.id.as_str(), l3.serial.as_str(), l3.not_after),
        ]
    );

    // A batch that signs nothing writes nothing.
    let none = s
        .mint_for_agent(&id(AGENT), &[("no-such-entry".to_string(), csr())])
        .unwrap();
    assert!(none[0].is_err());
    assert_eq!(issuance_records(s).len(), 1);

    // Each JWT-SVID is recorded with its jti.
    let token = s
        .mint_jwt_for_agent(&id(AGENT), &a.id, &["aud".to_string()])
        .unwrap();
    let recs = issuance_records(s);
    let Some(Event::JwtSvidIssued {
        jti,
        spiffe_id,
        audience,
        entry_id,
        ..
    }) = recs.last()
    else {
        panic!("no JWT record in {recs:?}");
    };
    assert_eq!(entry_id, &a.id);
    assert_eq!(spiffe_id, &a.spiffe_id);
    assert_eq!(audience, &["aud".to_string()]);
    let bundle = sigil_core::jwt::JwtBundle::from_jwks(&s.jwt_bundle()).unwrap();
    let v = sigil_core::jwt::validate(
        &token,
        "aud",
        &std::collections::BTreeMap::from([(s.cfg.trust_domain.clone(), bundle)]),
    )
    .unwrap();
    assert_eq!(v.claims["jti"], serde_json::json!(jti));
}

#[test]
fn concurrent_mint_batches_are_each_audited_once_on_one_chain() {
    use sigil_core::audit::Event;
    let t = temp_state();
    let s = &t.state;
    attest(s, AGENT);
    let entries: Vec<String> = (0..4)
        .map(|i| {
            s.create_entry(
                &admin(),
                entry(AGENT, &format!("spiffe://example.org/c/{i}")),
            )
            .unwrap()
            .id
        })
        .collect();
    let barrier = Arc::new(std::sync::Barrier::new(8));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (s, barrier, entries) = (s.clone(), barrier.clone(), entries.clone());
            std::thread::spawn(move || {
                let batch: Vec<(String, Vec<u8>)> = entries
                    .iter()
                    .map(|e| (e.clone(), new_key_and_csr().unwrap().0))
                    .collect();
                barrier.wait();
                let mut serials = Vec::new();
                for _ in 0..3 {
                    let out = s.mint_for_agent(&id(AGENT), &batch).unwrap();
                    let mut batch_serials: Vec<String> = out
                        .iter()
                        .map(|r| SvidInfo::from_der(&r.as_ref().unwrap()[0]).unwrap().serial)
                        .collect();
                    batch_serials.sort();
                    serials.push(batch_serials);
                }
                serials
            })
        })
        .collect();
    let mut returned: Vec<Vec<String>> = threads
        .into_iter()
        .flat_map(|th| th.join().unwrap())
        .collect();
    let mut recorded: Vec<Vec<String>> = issuance_records(s)
        .into_iter()
        .map(|e| match e {
            Event::X509SvidsIssued { svids, .. } => {
                let mut v: Vec<String> = svids.into_iter().map(|x| x.serial).collect();
                v.sort();
                v
            }
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    returned.sort();
    recorded.sort();
    // One record per batch, listing exactly the serials that batch returned.
    assert_eq!(recorded.len(), 24);
    assert_eq!(recorded, returned);
    let chain = s
        .store
        .read()
        .unwrap()
        .audit_records(0, usize::MAX)
        .unwrap();
    sigil_core::audit::verify(&chain, None).unwrap();
}
