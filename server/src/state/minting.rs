//! Minting: workload X.509-SVIDs (batched CSRs) and JWT-SVIDs, each against
//! an entry the calling agent is authorized for.

use std::sync::Arc;

use sigil_core::entry::Entry;
use sigil_core::{SpiffeId, now_unix};

use super::{MintOutcome, ServerState, poisoned};
use crate::error::RegistryError;

impl ServerState {
    /// Signs workload CSRs for an agent, each against an entry the agent is
    /// authorized for. Per-CSR failures are reported per CSR.
    pub fn mint_for_agent(
        &self,
        agent: &SpiffeId,
        csrs: &[(String, Vec<u8>)],
    ) -> Result<Vec<MintOutcome>, RegistryError> {
        let now = now_unix();
        let ca = self.ca();
        let parents = self.agent_parents(agent)?;
        // Look every entry up under one read of the index, then sign
        // without holding it.
        let entries: Vec<Result<Arc<Entry>, String>> = {
            let idx = self.entries.read().map_err(|_| poisoned())?;
            csrs.iter()
                .map(|(id, _)| Self::authorized_entry(&idx, &parents, id, now))
                .collect()
        };
        Ok(csrs
            .iter()
            .zip(entries)
            .map(|((_, csr), e)| {
                let e = e?;
                if let Some(k) = self.kill_of_entry(&e) {
                    return Err(format!(
                        "entry {:?} is killed (kill {}: {})",
                        e.id, k.id, k.reason
                    ));
                }
                let ttl = e.x509_svid_ttl.unwrap_or(self.cfg.default_x509_svid_ttl);
                ca.sign_svid(
                    csr,
                    self.cfg.workload_csr_check,
                    &e.spiffe_id,
                    &e.dns_names,
                    ttl,
                )
                .map(|leaf| vec![leaf])
                .map_err(|e| e.to_string())
            })
            .collect())
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
        let parents = self.agent_parents(agent)?;
        let e = {
            let idx = self.entries.read().map_err(|_| poisoned())?;
            Self::authorized_entry(&idx, &parents, entry_id, now)
        }
        .map_err(RegistryError::denied)?;
        if let Some(k) = self.kill_of_entry(&e) {
            return Err(RegistryError::denied(format!(
                "entry {:?} is killed (kill {}: {})",
                e.id, k.id, k.reason
            )));
        }
        let ttl = e.jwt_svid_ttl.unwrap_or(self.cfg.default_jwt_svid_ttl);
        let signer = self
            .keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .active_jwt();
        signer
            .sign(
                &e.spiffe_id,
                audience,
                ttl,
                now,
                self.cfg.jwt_issuer.as_deref(),
            )
            .map_err(|e| RegistryError::internal(e.to_string()))
    }
}
