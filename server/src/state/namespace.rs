//! The namespace rule, the one place it is enforced: workload entries and
//! agents never share a SPIFFE ID, so a workload SVID can never act as an
//! agent credential and a join token can never turn a workload into an
//! agent.

use sigil_core::{SpiffeId, now_unix};

use super::ServerState;
use super::entries::EntryIndex;
use crate::error::RegistryError;

/// Who claims a SPIFFE ID.
pub(super) enum Claimant {
    /// An entry being created or updated.
    Entry,
    /// A join token being generated for an agent.
    Token,
    /// An agent attesting under this ID.
    Agent,
}

impl ServerState {
    /// An entry's SPIFFE ID may not be an agent's ID (registered, or named
    /// by an unused join token); an agent ID (token or attestation) may not
    /// be an entry's SPIFFE ID or, for a new token, a live agent's. The
    /// refusal names the colliding record. Callers hold the entry index
    /// (write-locked for entry changes), so entry and agent claims on the
    /// same ID cannot interleave.
    pub(super) fn check_namespace(
        &self,
        id: &SpiffeId,
        claimant: Claimant,
        idx: &EntryIndex,
    ) -> Result<(), RegistryError> {
        match claimant {
            Claimant::Entry => {
                if self.store.read()?.agent(&id.to_string())?.is_some() {
                    return Err(RegistryError::exists(format!(
                        "invalid field `spiffe_id`: {id} is the ID of registered agent {id}; \
                         entries and agents may not share an ID"
                    )));
                }
                let now = now_unix();
                let tokens = self.token_ids.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(exp) = tokens.get(id).filter(|exp| **exp > now) {
                    return Err(RegistryError::exists(format!(
                        "invalid field `spiffe_id`: {id} is named by an unused join token \
                         (valid until {exp}); entries and agents may not share an ID"
                    )));
                }
            }
            Claimant::Token | Claimant::Agent => {
                // IDs under /sigil/ never belong to entries (Entry::from_proto
                // refuses them), so only other IDs need the scan.
                if !id.path().starts_with("/sigil/")
                    && let Some(e) = idx.by_id.values().find(|e| e.spiffe_id == *id)
                {
                    return Err(RegistryError::exists(format!(
                        "invalid field `spiffe_id`: entry {} has SPIFFE ID {id}; \
                         entries and agents may not share an ID",
                        e.id
                    )));
                }
                // A live agent's ID: a token would give a second node the
                // same identity. (A banned agent is not live: its ID stays
                // refused at attestation, which is where the ban is enforced.)
                if matches!(claimant, Claimant::Token)
                    && self
                        .store
                        .read()?
                        .agent(&id.to_string())?
                        .is_some_and(|a| !a.banned)
                {
                    return Err(RegistryError::exists(format!(
                        "invalid field `spiffe_id`: agent {id} is already registered \
                         (evict it before enrolling a node under its ID again)"
                    )));
                }
            }
        }
        Ok(())
    }
}
