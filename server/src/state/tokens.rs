//! Join tokens: 128-bit, single use, stored as SHA-256 only, with a TTL.
//! A token that names an agent ID reserves it (see [`super::namespace`]).

use std::time::Duration;

use sigil_core::ids::{agent_id, random_bytes, sha256_hex};
use sigil_core::{SpiffeId, now_unix};

use super::namespace::Claimant;
use super::{Caller, NodeAttestation, ServerState, poisoned};
use crate::datastore::append_audit;
use crate::datastore::{AttestationType, TokenRecord};
use crate::error::RegistryError;
use sigil_core::audit::{Event, join_token_fingerprint};

impl ServerState {
    /// Generates a single-use join token. Only its SHA-256 is stored.
    pub fn generate_token(
        &self,
        caller: &Caller,
        spiffe_id: Option<SpiffeId>,
        ttl: Duration,
    ) -> Result<(String, i64), RegistryError> {
        if let Some(id) = &spiffe_id {
            if !id.is_member_of(self.trust_domain()) {
                return Err(RegistryError::invalid(format!(
                    "invalid field `spiffe_id`: {id} is not in trust domain {}",
                    self.trust_domain()
                )));
            }
            if id.path().is_empty() {
                return Err(RegistryError::invalid(
                    "invalid field `spiffe_id`: must have a path",
                ));
            }
            // The /sigil/ namespace belongs to the server; an agent holding the
            // server's ID could impersonate it to other agents.
            if id.path().starts_with("/sigil/") && !id.path().starts_with("/sigil/agent/") {
                return Err(RegistryError::invalid(format!(
                    "invalid field `spiffe_id`: {id} is reserved for the server"
                )));
            }
        }
        let token = hex::encode(random_bytes::<16>());
        let expires_at = now_unix() + ttl.as_secs() as i64;
        // Held across the check and the write: an entry cannot claim the ID
        // in between.
        let idx = self.entries.read().map_err(|_| poisoned())?;
        if let Some(id) = &spiffe_id {
            self.check_namespace(id, Claimant::Token, &idx)?;
        }
        let rec = TokenRecord {
            spiffe_id: spiffe_id.as_ref().map(|s| s.to_string()),
            expires_at,
        };
        let hash = sha256_hex(token.as_bytes());
        self.store.transact(|tx| {
            tx.put_token(&hash, &rec)?;
            append_audit(
                tx,
                caller,
                Event::JoinTokenGenerated {
                    spiffe_id: spiffe_id.clone(),
                    expires_at,
                    token_hash: join_token_fingerprint(&token),
                },
            )
        })?;
        if let Some(id) = &spiffe_id {
            let mut tokens = self.token_ids.lock().unwrap_or_else(|p| p.into_inner());
            let exp = tokens.entry(id.clone()).or_insert(expires_at);
            *exp = (*exp).max(expires_at);
        }
        drop(idx);
        tracing::info!(%caller, spiffe_id = ?rec.spiffe_id, expires_at, "join token generated");
        Ok((token, expires_at))
    }

    /// Join-token node attestation: consumes the token (even if it turns out
    /// expired) and names the agent it admits.
    pub fn consume_join_token(
        &self,
        caller: &Caller,
        token: &str,
    ) -> Result<NodeAttestation, RegistryError> {
        let token = token.trim();
        let hash = sha256_hex(token.as_bytes());
        let rec = self
            .store
            .transact(|tx| {
                let Some(rec) = tx.take_token(&hash)? else {
                    return Ok(None);
                };
                let agent = self.token_agent_id(&rec, &hash)?;
                append_audit(
                    tx,
                    caller,
                    Event::JoinTokenUsed {
                        token_hash: join_token_fingerprint(token),
                        agent_id: agent,
                    },
                )?;
                Ok(Some(rec))
            })?
            .ok_or_else(|| RegistryError::denied("join token is unknown or already used"))?;
        if let Some(id) = rec.spiffe_id.as_deref().and_then(|s| SpiffeId::new(s).ok()) {
            self.release_token_id(&id)?;
        }
        tracing::info!(%caller, spiffe_id = ?rec.spiffe_id, "join token used");
        if rec.expires_at <= now_unix() {
            return Err(RegistryError::denied("join token has expired"));
        }
        let spiffe_id = self.token_agent_id(&rec, &hash)?;
        Ok(NodeAttestation {
            spiffe_id,
            attestation_type: AttestationType::JoinToken,
            selectors: vec![],
        })
    }

    /// The agent ID a token admits: the one it names, or one derived from
    /// its hash.
    fn token_agent_id(&self, rec: &TokenRecord, hash: &str) -> Result<SpiffeId, RegistryError> {
        match &rec.spiffe_id {
            Some(s) => SpiffeId::new(s)
                .map_err(|e| RegistryError::internal(format!("stored token id: {e}"))),
            None => agent_id(self.trust_domain(), "join_token", &hash[..32])
                .map_err(|e| RegistryError::internal(e.to_string())),
        }
    }

    /// Forgets a token-named agent ID once no unused token names it.
    fn release_token_id(&self, id: &SpiffeId) -> Result<(), RegistryError> {
        let text = id.to_string();
        let still_named = self
            .store
            .read()?
            .tokens()?
            .iter()
            .filter(|t| t.spiffe_id.as_deref() == Some(text.as_str()))
            .map(|t| t.expires_at)
            .max();
        let mut tokens = self.token_ids.lock().unwrap_or_else(|p| p.into_inner());
        match still_named {
            Some(exp) => tokens.insert(id.clone(), exp),
            None => tokens.remove(id),
        };
        Ok(())
    }
}
