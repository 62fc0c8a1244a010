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
    ) -> Result<Arc<Entry>, String> {
        let e = idx
            .by_id
            .get(entry_id)
            .cloned()
            .ok_or_else(|| format!("no entry {entry_id:?}"))?;
        if e.node || !parents.contains(&e.parent_id) {
            return Err(format!(
                "entry {entry_id:?} is not authorized for this agent"
            ));
        }
        if e.is_expired(now) {
            return Err(format!("entry {entry_id:?} has expired"));
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
    ) -> Result<std::time::Duration, String> {
        let mut secs = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
        for end in [e.expires_at, grant_until].into_iter().flatten() {
            secs = secs.min(end - now);
        }
        if secs <= 0 {
            return Err(format!("entry {:?} issues nothing any more", e.id));
        }
        Ok(std::time::Duration::from_secs(secs.unsigned_abs()))
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
        }
        .map_err(RegistryError::denied)?;
        if let Some(k) = self.kill_of_entry(&e) {
            return Err(RegistryError::denied(format!(
                "entry {:?} is killed (kill {}: {})",
                e.id, k.id, k.reason
            )));
        }
        let grant = self
            .grant_for_mint(&e, agent, now)
            .map_err(RegistryError::denied)?;
        Ok((e, rec, grant))
    }
}
