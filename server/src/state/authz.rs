//! The authorization core: which entries an agent may obtain SVIDs for.
//! Authorized = the entry's parent is the agent itself, or a node-alias
//! entry whose selectors the agent's attested node selectors satisfy; never
//! a node-alias entry itself, never an expired one.

use std::collections::BTreeSet;
use std::sync::Arc;

use sigil_core::entry::Entry;
use sigil_core::selector::SelectorSet;
use sigil_core::{SpiffeId, now_unix};

use super::entries::EntryIndex;
use super::{ServerState, poisoned};
use crate::datastore::AgentRecord;
use crate::error::RegistryError;

impl ServerState {
    /// Entries an agent is authorized for, each once, sorted by ID within
    /// each parent. `rec` is the agent's record, as the caller just read it.
    pub fn entries_for_agent(
        &self,
        agent: &SpiffeId,
        rec: Option<&AgentRecord>,
    ) -> Result<Vec<Arc<Entry>>, RegistryError> {
        let parents = self.parents_of(agent, rec)?;
        let idx = self.entries.read().map_err(|_| poisoned())?;
        let now = now_unix();
        let mut seen = BTreeSet::new();
        let any_kill = self.any_kill();
        Ok(parents
            .iter()
            .flat_map(|p| idx.by_parent.get(p).into_iter().flatten())
            .filter(|id| seen.insert(*id))
            .filter_map(|id| idx.by_id.get(id))
            .filter(|e| !e.node && !e.is_expired(now))
            .filter(|e| !any_kill || self.kill_of_entry(e).is_none())
            .cloned()
            .collect())
    }

    /// The IDs an agent stands for: its own, plus every node-alias entry
    /// whose selectors its attested node selectors satisfy.
    pub fn agent_parents(&self, agent: &SpiffeId) -> Result<Vec<SpiffeId>, RegistryError> {
        let rec = self.store.read()?.agent(&agent.to_string())?;
        self.parents_of(agent, rec.as_ref())
    }

    /// [`ServerState::agent_parents`] with the agent's record at hand.
    pub(super) fn parents_of(
        &self,
        agent: &SpiffeId,
        rec: Option<&AgentRecord>,
    ) -> Result<Vec<SpiffeId>, RegistryError> {
        let selectors: SelectorSet = rec
            .map(|r| r.selectors.iter().cloned().collect())
            .unwrap_or_default();
        let mut parents = vec![agent.clone()];
        if selectors.is_empty() {
            return Ok(parents);
        }
        let idx = self.entries.read().map_err(|_| poisoned())?;
        let now = now_unix();
        for id in &idx.nodes {
            if let Some(e) = idx.by_id.get(id)
                && !e.is_expired(now)
                && selectors.satisfies(&e.selectors)
                && !parents.contains(&e.spiffe_id)
            {
                parents.push(e.spiffe_id.clone());
            }
        }
        Ok(parents)
    }

    /// The entry `entry_id` if an agent standing for `parents` may obtain
    /// SVIDs for it, else why not.
    pub(super) fn authorized_entry(
        idx: &EntryIndex,
        parents: &[SpiffeId],
        entry_id: &str,
        now: i64,
    ) -> Result<Arc<Entry>, MintRefusal> {
        let e = idx
            .by_id
            .get(entry_id)
            .cloned()
            .ok_or_else(|| MintRefusal::UnknownEntry(entry_id.to_string()))?;
        if e.node || !parents.contains(&e.parent_id) {
            return Err(MintRefusal::NotAuthorized(e.id.clone()));
        }
        if e.is_expired(now) {
            return Err(MintRefusal::Expired(e.id.clone()));
        }
        Ok(e)
    }

    /// `ttl`, shortened so that an SVID of `e` never outlives the entry's
    /// expiry or the approval grant (ending at `grant_until`) it is issued
    /// under; an error if nothing is left.
    pub(super) fn capped_ttl(
        e: &Entry,
        ttl: std::time::Duration,
        grant_until: Option<i64>,
        now: i64,
    ) -> Result<std::time::Duration, MintRefusal> {
        let mut secs = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
        for end in [e.expires_at, grant_until].into_iter().flatten() {
            secs = secs.min(end - now);
        }
        if secs <= 0 {
            return Err(MintRefusal::NothingLeft(e.id.clone()));
        }
        Ok(std::time::Duration::from_secs(secs.unsigned_abs()))
    }

    /// [`MintRefusal::Killed`] when a kill covers `e`.
    pub(super) fn refuse_if_killed(&self, e: &Entry) -> Result<(), MintRefusal> {
        match self.kill_of_entry(e) {
            Some(k) => Err(MintRefusal::Killed {
                entry_id: e.id.clone(),
                kill_id: k.id,
                reason: k.reason,
            }),
            None => Ok(()),
        }
    }
}

/// Why an agent may not have an SVID of one entry now: one per CSR of a
/// mint batch (the agent logs it), or the whole answer to a JWT-SVID,
/// task or delegation request. Rendered only at the API edge.
#[derive(Debug, thiserror::Error)]
pub enum MintRefusal {
    /// No entry has this ID.
    #[error("no entry {0:?}")]
    UnknownEntry(String),
    /// The entry is a node alias, or not parented on this agent or on a
    /// node alias it satisfies.
    #[error("entry {0:?} is not authorized for this agent")]
    NotAuthorized(String),
    /// The entry's `expires_at` has passed.
    #[error("entry {0:?} has expired")]
    Expired(String),
    /// Its expiry or approval grant ends now: any SVID would be born dead.
    #[error("entry {0:?} issues nothing any more")]
    NothingLeft(String),
    /// A kill covers the entry.
    #[error("entry {entry_id:?} is killed (kill {kill_id}: {reason})")]
    Killed {
        /// The entry.
        entry_id: String,
        /// The kill that covers it.
        kill_id: String,
        /// The kill's reason, as the operator gave it.
        reason: String,
    },
    /// The entry needs approval and no grant is in force; the message
    /// names the approval request.
    #[error("{0}")]
    NotApproved(String),
    /// The CSR could not be signed (malformed, wrong key, or a SPIFFE ID
    /// outside the trust domain).
    #[error("entry {entry_id:?}: {reason}")]
    Unsignable {
        /// The entry the CSR was for.
        entry_id: String,
        /// The signer's error.
        reason: sigil_core::x509::X509Error,
    },
    /// The registry failed while deciding.
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

impl From<MintRefusal> for RegistryError {
    fn from(r: MintRefusal) -> Self {
        match r {
            MintRefusal::Registry(e) => e,
            MintRefusal::Unsignable { .. } => RegistryError::invalid(r.to_string()),
            other => RegistryError::denied(other.to_string()),
        }
    }
}

/// An entry an agent may mint for now: the entry, the agent's record, and
/// the end of the approval grant it mints under (if the entry needs one).
pub(super) type MintableEntry = (Arc<Entry>, Option<AgentRecord>, Option<i64>);

impl ServerState {
    /// The entry `entry_id` if `agent` may mint for it now: parented on
    /// the agent (or one of its node aliases), not expired, not killed,
    /// and approved when it needs approval. One rule for JWT-SVIDs and
    /// task identities.
    pub(super) fn entry_to_mint(
        &self,
        agent: &SpiffeId,
        entry_id: &str,
        now: i64,
    ) -> Result<MintableEntry, RegistryError> {
        let rec = self.store.read()?.agent(&agent.to_string())?;
        let parents = self.parents_of(agent, rec.as_ref())?;
        let e = {
            let idx = self.entries.read().map_err(|_| poisoned())?;
            Self::authorized_entry(&idx, &parents, entry_id, now)
        }?;
        self.refuse_if_killed(&e)?;
        let grant = self.grant_for_mint(&e, agent, now)?;
        Ok((e, rec, grant))
    }
}
