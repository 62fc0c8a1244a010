//! Agents: recording a node attestation, the pinned agent credential
//! (current serial, and the previous one until the new one is first used),
//! renewal, eviction and bans. Every read-modify-write of an agent record
//! runs inside one datastore transaction.

use sigil_core::selector::Selector;
use sigil_core::x509::{BACKDATE, CsrSignature, SvidInfo};
use sigil_core::{SpiffeId, now_unix};

use super::namespace::Claimant;
use super::{Caller, IssuedAgentSvid, NodeAttestation, ServerState, poisoned};
use crate::datastore::append_audit;
use crate::datastore::{AgentRecord, AttestationType};
use crate::error::RegistryError;
use sigil_core::audit::Event;

/// Most refused node attestations recorded per minute (the rest are
/// counted in the next record).
const FAILURE_RECORDS_PER_MINUTE: u32 = 60;

/// The rate limit's window.
#[derive(Default)]
pub(super) struct FailureWindow {
    window_start: i64,
    written: u32,
    suppressed: u64,
}

/// Whether a node may (re-)attest under an existing record.
fn admissible(existing: Option<&AgentRecord>, a: &NodeAttestation) -> Result<(), RegistryError> {
    let Some(e) = existing else { return Ok(()) };
    if e.banned {
        return Err(RegistryError::denied(format!(
            "agent {} is banned",
            a.spiffe_id
        )));
    }
    // IMA digests (`tpm:ima:`) only grow as files are measured; the
    // enrolled measurements are the rest (EK and PCRs).
    let fixed = |v: &[Selector]| -> Vec<String> {
        v.iter()
            .filter(|s| !(s.kind() == "tpm" && s.value().starts_with("ima:")))
            .map(|s| s.to_string())
            .collect()
    };
    if e.attestation == AttestationType::Tpm
        && a.attestation_type == AttestationType::Tpm
        && fixed(&e.selectors) != fixed(&a.selectors)
    {
        tracing::warn!(agent = %a.spiffe_id, "TPM measurements changed since enrollment; refusing");
        return Err(RegistryError::denied(
            "TPM measurements (PCRs) changed since enrollment; the node's identity is withdrawn (evict the agent to enroll it again)",
        ));
    }
    Ok(())
}

/// Whether an agent may renew with `RenewAgent`.
fn renewable(id: &SpiffeId, rec: Option<&AgentRecord>) -> Result<(), RegistryError> {
    let rec = rec.ok_or_else(|| RegistryError::denied("agent is not attested"))?;
    if rec.banned {
        return Err(RegistryError::denied(format!("agent {id} is banned")));
    }
    // Hardware- and certificate-attested nodes prove themselves again on
    // every renewal; a copied SVID and key must not keep the identity.
    if rec.attestation.reattests() {
        return Err(RegistryError::precondition(format!(
            "{} agents renew by re-attesting (Attest stream), not RenewAgent",
            rec.attestation
        )));
    }
    Ok(())
}

/// The serial that stays acceptable next to a newly issued one: while the
/// last issued SVID is still unused, the one in use is `previous` (a lost
/// response must not lock the agent out); otherwise the last issued one.
fn still_in_use(rec: &AgentRecord) -> String {
    rec.previous_serial
        .clone()
        .unwrap_or_else(|| rec.serial.clone())
}

impl ServerState {
    /// Issues the agent SVID for a successful node attestation and records
    /// the agent with its node selectors. A banned ID gets nothing. A TPM
    /// node that re-attests with different measurements than it enrolled
    /// with loses its identity (evict it to enroll it again).
    pub fn issue_agent_svid(
        &self,
        caller: &Caller,
        a: NodeAttestation,
        csr: &[u8],
    ) -> Result<IssuedAgentSvid, RegistryError> {
        let id = a.spiffe_id.clone();
        let key = id.to_string();
        self.refuse_killed_agent(&id)?;
        // Cheap refusal before signing; repeated inside the write, where it
        // decides.
        admissible(self.store.read()?.agent(&key)?.as_ref(), &a)?;
        let chain = self.sign_agent(&id, csr)?;
        let info =
            SvidInfo::from_der(&chain[0]).map_err(|e| RegistryError::internal(e.to_string()))?;
        let now = now_unix();
        // The entry index is held so no entry can claim this ID meanwhile.
        let idx = self.entries.read().map_err(|_| poisoned())?;
        self.check_namespace(&id, Claimant::Agent, &idx)?;
        self.store.transact(|tx| {
            let existing = tx.agent(&key)?;
            admissible(existing.as_ref(), &a)?;
            tx.put_agent(&AgentRecord {
                spiffe_id: id.clone(),
                attestation: a.attestation_type,
                selectors: a.selectors.clone(),
                serial: info.serial.clone(),
                previous_serial: existing.as_ref().map(still_in_use),
                svid_expires_at: info.not_after,
                last_attested_at: now,
                banned: false,
                created_at: existing.as_ref().map_or(now, |e| e.created_at),
            })?;
            let peer = match caller {
                Caller::Node { peer } => peer.clone(),
                _ => None,
            };
            append_audit(
                tx,
                caller,
                Event::NodeAttested {
                    attestation_type: a.attestation_type.to_string(),
                    evidence: a
                        .selectors
                        .iter()
                        .map(|s| s.to_string())
                        .collect::<Vec<_>>()
                        .join(" "),
                    agent_id: id.clone(),
                    peer,
                },
            )?;
            append_audit(
                tx,
                caller,
                Event::AgentSvidIssued {
                    agent_id: id.clone(),
                    serial: info.serial.clone(),
                    expires_at: info.not_after,
                },
            )
        })?;
        drop(idx);
        self.notify_agent(&id);
        tracing::info!(%caller, agent = %id, attestor = %a.attestation_type, serial = %info.serial, "agent attested");
        Ok(IssuedAgentSvid {
            spiffe_id: id,
            chain,
        })
    }

    fn sign_agent(&self, id: &SpiffeId, csr: &[u8]) -> Result<Vec<Vec<u8>>, RegistryError> {
        let ca = self.ca();
        let leaf = ca
            .sign_svid(csr, CsrSignature::Verify, id, &[], self.cfg.agent_svid_ttl)
            .map_err(|e| RegistryError::invalid(format!("invalid field `csr`: {e}")))?;
        Ok(ca.svid_chain(leaf))
    }

    /// Checks the client certificate of an mTLS call and returns the agent's
    /// ID. The chain was already verified against the CA by the TLS layer;
    /// see [`ServerState::check_agent`] for the rest.
    pub fn authenticate_agent(&self, leaf_der: &[u8]) -> Result<SpiffeId, RegistryError> {
        let info = SvidInfo::from_der(leaf_der)
            .map_err(|e| RegistryError::unauthenticated(e.to_string()))?;
        self.check_agent(&info)?;
        Ok(info.spiffe_id)
    }

    /// The per-call checks of an agent's certificate, already parsed: the
    /// agent is registered and not banned, the certificate is its pinned
    /// credential, and it has not expired. Returns the agent's record.
    pub fn check_agent(&self, info: &SvidInfo) -> Result<AgentRecord, RegistryError> {
        let key = info.spiffe_id.to_string();
        let rec = self.store.read()?.agent(&key)?.ok_or_else(|| {
            RegistryError::denied(format!(
                "agent {} is not attested (evicted?)",
                info.spiffe_id
            ))
        })?;
        if rec.banned {
            return Err(RegistryError::denied(format!(
                "agent {} is banned",
                info.spiffe_id
            )));
        }
        self.refuse_killed_agent(&info.spiffe_id)?;
        // The credential is pinned: only the agent SVID the server issued
        // last (or, until that one is first used, the one before it) is
        // accepted, even though any SVID for this ID that chains to the CA
        // passed the TLS handshake.
        if !rec.accepts_serial(&info.serial) {
            tracing::warn!(
                agent = %info.spiffe_id,
                serial = %info.serial,
                "refused a certificate that is not the agent's current SVID"
            );
            return Err(RegistryError::denied(format!(
                "certificate {} is not the current SVID of agent {}",
                info.serial, info.spiffe_id
            )));
        }
        if info.not_before + (BACKDATE.as_secs() as i64) + 1 < rec.created_at {
            return Err(RegistryError::denied(
                "agent SVID predates the agent's current attestation",
            ));
        }
        // TLS checked validity at the handshake only; a long-lived HTTP/2
        // connection must not outlive the certificate it was opened with.
        if info.not_after <= now_unix() {
            return Err(RegistryError::unauthenticated(
                "agent SVID has expired; reconnect with a current one",
            ));
        }
        self.note_agent_seen(&key);
        if info.serial == rec.serial && rec.previous_serial.is_some() {
            // First use of the new SVID: the previous one is retired.
            return self.store.transact(|tx| {
                let Some(mut a) = tx.agent(&key)? else {
                    return Err(RegistryError::denied(format!(
                        "agent {} is not attested (evicted?)",
                        info.spiffe_id
                    )));
                };
                if a.serial == info.serial && a.previous_serial.is_some() {
                    a.previous_serial = None;
                    tx.put_agent(&a)?;
                }
                Ok(a)
            });
        }
        Ok(rec)
    }

    /// Renews an authenticated agent's SVID.
    pub fn renew_agent(&self, id: &SpiffeId, csr: &[u8]) -> Result<Vec<Vec<u8>>, RegistryError> {
        let key = id.to_string();
        self.refuse_killed_agent(id)?;
        renewable(id, self.store.read()?.agent(&key)?.as_ref())?;
        let chain = self.sign_agent(id, csr)?;
        let info =
            SvidInfo::from_der(&chain[0]).map_err(|e| RegistryError::internal(e.to_string()))?;
        // Re-checked inside the write: a ban or eviction that landed while
        // signing wins, and the new SVID is discarded.
        self.store.transact(|tx| {
            let rec = tx.agent(&key)?;
            renewable(id, rec.as_ref())?;
            let Some(mut rec) = rec else {
                return Err(RegistryError::denied("agent is not attested"));
            };
            rec.previous_serial = Some(still_in_use(&rec));
            rec.serial = info.serial.clone();
            rec.svid_expires_at = info.not_after;
            tx.put_agent(&rec)?;
            append_audit(
                tx,
                &Caller::agent(id.clone()),
                Event::AgentSvidRenewed {
                    agent_id: id.clone(),
                    serial: info.serial.clone(),
                    expires_at: info.not_after,
                },
            )
        })?;
        tracing::info!(caller = %Caller::agent(id.clone()), serial = %info.serial, "agent SVID renewed");
        Ok(chain)
    }

    pub fn list_agents(&self) -> Result<Vec<AgentRecord>, RegistryError> {
        let mut v = self.store.read()?.agents()?;
        v.sort_by(|a, b| a.spiffe_id.cmp(&b.spiffe_id));
        Ok(v)
    }

    /// How many agents are registered (for health checks).
    pub fn agent_count(&self) -> Result<usize, RegistryError> {
        Ok(self.store.read()?.agent_count()? as usize)
    }

    pub fn get_agent(&self, id: &str) -> Result<AgentRecord, RegistryError> {
        self.store
            .read()?
            .agent(id)?
            .ok_or_else(|| RegistryError::not_found(format!("no agent {id:?}")))
    }

    /// Removes the agent: it must re-attest with a new token.
    pub fn evict_agent(&self, caller: &Caller, id: &str) -> Result<(), RegistryError> {
        let agent =
            SpiffeId::new(id).map_err(|_| RegistryError::not_found(format!("no agent {id:?}")))?;
        self.store.transact(|tx| {
            if !tx.delete_agent(id)? {
                return Err(RegistryError::not_found(format!("no agent {id:?}")));
            }
            append_audit(
                tx,
                caller,
                Event::AgentEvicted {
                    agent_id: agent.clone(),
                },
            )
        })?;
        tracing::warn!(%caller, agent = %id, "agent evicted");
        self.notify_agent_text(id);
        Ok(())
    }

    /// Bans the agent: it can neither renew, sync, nor re-attest under this ID.
    pub fn ban_agent(&self, caller: &Caller, id: &str) -> Result<AgentRecord, RegistryError> {
        let rec = self.store.transact(|tx| {
            let mut rec = tx
                .agent(id)?
                .ok_or_else(|| RegistryError::not_found(format!("no agent {id:?}")))?;
            rec.banned = true;
            tx.put_agent(&rec)?;
            append_audit(
                tx,
                caller,
                Event::AgentBanned {
                    agent_id: rec.spiffe_id.clone(),
                },
            )?;
            Ok(rec)
        })?;
        tracing::warn!(%caller, agent = %id, "agent banned");
        if let Err(e) = self.revoke_for_ban(&rec.spiffe_id) {
            tracing::error!(agent = %id, error = %e, "revoking the banned agent's SVIDs failed; retried at the next CRL refresh");
        }
        self.notify_agent_text(id);
        // Every agent gets the new CRLs.
        self.bump();
        Ok(rec)
    }

    /// Records a refused node attestation in the audit trail. Refusals
    /// come from unauthenticated callers, so they are rate-limited: at most
    /// [`FAILURE_RECORDS_PER_MINUTE`] records a minute; the next record
    /// written counts the ones left out in its reason. Best effort: a
    /// failure to write is logged, never returned to the node.
    pub fn audit_attestation_failure(
        &self,
        attestation_type: &str,
        evidence: &str,
        peer: Option<String>,
        reason: &str,
    ) {
        let suppressed = {
            let mut w = self
                .attest_failures
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let now = now_unix();
            if now - w.window_start >= 60 {
                w.window_start = now;
                w.written = 0;
            }
            if w.written >= FAILURE_RECORDS_PER_MINUTE {
                w.suppressed += 1;
                return;
            }
            w.written += 1;
            std::mem::take(&mut w.suppressed)
        };
        let mut reason: String = reason.chars().take(512).collect();
        if suppressed > 0 {
            reason.push_str(&format!(
                " ({suppressed} earlier refusals not recorded: rate limit)"
            ));
        }
        let caller = Caller::Node { peer: peer.clone() };
        let event = Event::NodeAttestationFailed {
            attestation_type: attestation_type.to_string(),
            evidence: evidence.to_string(),
            peer,
            reason,
        };
        if let Err(e) = self
            .store
            .transact(|tx| append_audit(tx, &caller, event.clone()))
        {
            tracing::error!(error = %e, "could not audit a refused node attestation");
        }
    }

    /// Refuses an agent a kill names.
    fn refuse_killed_agent(&self, id: &SpiffeId) -> Result<(), RegistryError> {
        match self.kill_of_agent(id) {
            Some(k) => Err(RegistryError::denied(format!(
                "agent {id} is killed (kill {}: {})",
                k.id, k.reason
            ))),
            None => Ok(()),
        }
    }

    /// Why agent `id` may hold no identity at all (killed or banned), if
    /// it may not: its sync stream sends a last, empty update with this
    /// reason.
    pub fn withdrawal_of(&self, id: &SpiffeId) -> Option<String> {
        if let Some(k) = self.kill_of_agent(id) {
            return Some(format!("killed (kill {}: {})", k.id, k.reason));
        }
        match self.store.read().and_then(|r| r.agent(&id.to_string())) {
            Ok(Some(rec)) if rec.banned => Some("banned".into()),
            _ => None,
        }
    }

    /// Wakes the agent named by `id`, or everyone if it is not an ID.
    fn notify_agent_text(&self, id: &str) {
        match SpiffeId::new(id) {
            Ok(a) => self.notify_agent(&a),
            Err(_) => self.bump(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::temp_state;
    use super::*;

    fn failures(s: &ServerState) -> Vec<String> {
        s.store
            .read()
            .unwrap()
            .audit_records(0, usize::MAX)
            .unwrap()
            .into_iter()
            .filter_map(|r| match r.event {
                Event::NodeAttestationFailed { reason, .. } => Some(reason),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn refused_attestations_are_recorded_at_a_bounded_rate_and_the_gap_is_counted() {
        let t = temp_state();
        let s = &t.state;
        for _ in 0..(FAILURE_RECORDS_PER_MINUTE + 5) {
            s.audit_attestation_failure(
                "join_token",
                "token sha256:0011",
                Some("10.0.0.9:4000".into()),
                "PermissionDenied: unknown join token",
            );
        }
        let got = failures(s);
        assert_eq!(got.len(), FAILURE_RECORDS_PER_MINUTE as usize);
        // The next window's first record says how many were left out.
        s.attest_failures.lock().unwrap().window_start -= 61;
        s.audit_attestation_failure(
            "tpm",
            "ek sha256:22",
            None,
            "PermissionDenied: EK not allowed",
        );
        let got = failures(s);
        let last = got.last().unwrap();
        assert!(last.contains("5 earlier refusals not recorded"), "{last}");
        let recs = s
            .store
            .read()
            .unwrap()
            .audit_records(0, usize::MAX)
            .unwrap();
        assert!(sigil_core::audit::verify(&recs, None).is_ok());
    }
}
