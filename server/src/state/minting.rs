//! Minting: workload X.509-SVIDs (batched CSRs) and JWT-SVIDs, each against
//! an entry the calling agent is authorized for.
//!
//! Issuance is audited before anything is handed out: one
//! `x509_svids_issued` record per mint batch (listing the serial and expiry
//! of every leaf actually signed) and one `jwt_svid_issued` record per
//! JWT-SVID (with its random `jti`), each committed before the SVIDs are
//! returned, in a write transaction it shares only with the issuance
//! records that were waiting at the same time ([`super::group_commit`]). A crash
//! or a failed commit
//! therefore never leaves an SVID in an agent's hands without its record;
//! it can leave a record for SVIDs that were never delivered, which is the
//! safe direction. Signing a batch ([`ServerState::sign_for_agent`]) and
//! auditing it ([`ServerState::audit_batch`]) are separate steps so that the
//! agent API can release its signing slot before waiting on the commit.

use std::sync::Arc;

use sigil_core::audit::{BatchRows, Event, IssuedRef};
use sigil_core::caller::Caller;
use sigil_core::entry::Entry;
use sigil_core::{SpiffeId, now_unix};

use super::{MintOutcome, MintRefusal, ServerState, poisoned};
use crate::datastore::{append_audit_ref, append_batch_audit};
use crate::error::RegistryError;

/// A signed mint batch whose audit record is not written yet: hand it to
/// [`ServerState::audit_batch`] before returning anything from it.
#[must_use = "a signed batch must be audited before its SVIDs are returned"]
pub struct MintBatch {
    outcomes: Vec<MintOutcome>,
    issued: Vec<Signed>,
    /// The record's rows, written as each leaf was signed (empty when
    /// issuance is not audited).
    rows: BatchRows,
}

/// One signed leaf of a batch: the entry it was signed under (shared with
/// the index, so its ID and SPIFFE ID are not copied per SVID), its serial
/// and its expiry. Its audit row is written from it as it is signed; after
/// the commit it serves the entries' use marks and, when a kill raced the
/// batch, the revocation of what the kill covers.
struct Signed {
    entry: Arc<Entry>,
    serial: String,
    expires_at: i64,
}

impl Signed {
    fn row(&self) -> IssuedRef<'_> {
        IssuedRef {
            entry_id: &self.entry.id,
            spiffe_id: &self.entry.spiffe_id,
            serial: &self.serial,
            expires_at: self.expires_at,
        }
    }
}

impl MintBatch {
    /// How many CSRs were signed.
    pub fn signed(&self) -> usize {
        self.issued.len()
    }
}

impl ServerState {
    /// Signs workload CSRs for an agent and audits the batch: see
    /// [`ServerState::sign_for_agent`] and [`ServerState::audit_batch`].
    pub fn mint_for_agent(
        &self,
        agent: &SpiffeId,
        csrs: &[(String, impl AsRef<[u8]>)],
    ) -> Result<Vec<MintOutcome>, RegistryError> {
        let batch = self.sign_for_agent(agent, csrs)?;
        self.audit_batch(agent, batch)
    }

    /// Signs workload CSRs for an agent, each against an entry the agent is
    /// authorized for. Per-CSR failures are reported per CSR. Nothing is
    /// audited yet.
    pub fn sign_for_agent(
        &self,
        agent: &SpiffeId,
        csrs: &[(String, impl AsRef<[u8]>)],
    ) -> Result<MintBatch, RegistryError> {
        let now = now_unix();
        let ca = self.ca();
        let rec = self.store.read()?.agent(&agent.to_string())?;
        let parents = self.parents_of(agent, rec.as_ref())?;
        // Look every entry up under one read of the index, then sign
        // without holding it.
        let entries: Vec<Result<Arc<Entry>, MintRefusal>> = {
            let idx = self.entries.read().map_err(|_| poisoned())?;
            csrs.iter()
                .map(|(id, _)| Self::authorized_entry(&idx, &parents, id, now))
                .collect()
        };
        let mut issued = Vec::with_capacity(csrs.len());
        let audited = self.cfg.audit_issuance;
        let mut rows = BatchRows::with_capacity(if audited { csrs.len() } else { 0 });
        let outcomes = csrs
            .iter()
            .zip(entries)
            .map(|((_, csr), e)| {
                let e = e?;
                self.refuse_if_killed(&e)?;
                let grant = self.grant_for_mint(&e, agent, now)?;
                let ttl = Self::capped_ttl(
                    &e,
                    e.x509_svid_ttl.unwrap_or(self.cfg.default_x509_svid_ttl),
                    grant,
                    now,
                )?;
                let leaf = ca
                    .sign_svid_at(
                        csr.as_ref(),
                        self.cfg.workload_csr_check,
                        &e.spiffe_id,
                        &e.dns_names,
                        ttl,
                        now,
                    )
                    .map_err(|reason| MintRefusal::Unsignable {
                        entry_id: e.id.clone(),
                        reason,
                    })?;
                let signed = Signed {
                    entry: e,
                    serial: leaf.serial,
                    expires_at: leaf.not_after,
                };
                // Now, while the entry is in the cache.
                if audited {
                    rows.push(&signed.row());
                }
                issued.push(signed);
                Ok(ca.svid_chain(leaf.der))
            })
            .collect();
        Ok(MintBatch {
            outcomes,
            issued,
            rows,
        })
    }

    /// Writes a signed batch's one `x509_svids_issued` record (when it
    /// signed anything) and only then releases its outcomes. On error the
    /// SVIDs must not be returned.
    pub fn audit_batch(
        &self,
        agent: &SpiffeId,
        batch: MintBatch,
    ) -> Result<Vec<MintOutcome>, RegistryError> {
        let MintBatch {
            outcomes,
            issued,
            rows,
        } = batch;
        self.note_entries_used(issued.iter().map(|s| s.entry.id.as_str()));
        if issued.is_empty() || !self.cfg.audit_issuance {
            return Ok(outcomes);
        }
        let (caller, agent_id) = (Caller::agent(agent.clone()), agent.clone());
        self.issuance.append(
            &*self.store,
            Box::new(move |tx| append_batch_audit(tx, &caller, &agent_id, &rows)),
        )?;
        if self.any_kill() {
            let issued: Vec<IssuedRef<'_>> = issued.iter().map(Signed::row).collect();
            self.revoke_raced(agent, &issued)?;
        }
        Ok(outcomes)
    }

    /// Signs a JWT-SVID for an entry the agent is authorized for.
    pub fn mint_jwt_for_agent(
        &self,
        agent: &SpiffeId,
        entry_id: &str,
        audience: &[String],
    ) -> Result<String, RegistryError> {
        if audience.is_empty() || audience.iter().any(|a| a.is_empty()) {
            return Err(RegistryError::invalid(
                "invalid field `audience`: at least one non-empty audience is required",
            ));
        }
        let now = now_unix();
        let (e, rec, grant) = self.entry_to_mint(agent, entry_id, now)?;
        let ttl = Self::capped_ttl(
            &e,
            e.jwt_svid_ttl.unwrap_or(self.cfg.default_jwt_svid_ttl),
            grant,
            now,
        )?;
        let claims = self.context_claims(&e, rec.as_ref());
        let signer = self
            .keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .active_jwt();
        let jwt = signer
            .sign_with_claims(
                &e.spiffe_id,
                audience,
                ttl,
                now,
                self.cfg.jwt_issuer.as_deref(),
                &claims,
            )
            .map_err(|e| RegistryError::internal(e.to_string()))?;
        self.note_entries_used([e.id.as_str()]);
        if self.cfg.audit_issuance {
            let caller = Caller::agent(agent.clone());
            let event = Event::JwtSvidIssued {
                agent_id: agent.clone(),
                entry_id: e.id.clone(),
                spiffe_id: e.spiffe_id.clone(),
                audience: audience.to_vec(),
                jti: jwt.jti,
                expires_at: jwt.expires_at,
            };
            self.issuance.append(
                &*self.store,
                Box::new(move |tx| append_audit_ref(tx, &caller, &event)),
            )?;
        }
        Ok(jwt.token)
    }
}
