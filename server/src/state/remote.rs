//! Converging on changes another server made in a shared datastore: given
//! the kinds and keys of changed records (the PostgreSQL change feed), the
//! in-memory state is brought in line with the store and exactly the sync
//! streams concerned are woken, as for a local change. Applying a change
//! this server made itself finds nothing to do. A server that fell behind
//! the feed's retained window reloads everything instead
//! ([`ServerState::reload_all`]).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use sigil_core::SpiffeId;

use super::{ServerState, poisoned};
use crate::datastore::{ChangeEvent, ChangeKind};
use crate::error::RegistryError;

impl ServerState {
    /// Applies a batch of change events read from the store.
    pub fn apply_changes(&self, events: &[ChangeEvent]) -> Result<(), RegistryError> {
        let of = |k: ChangeKind| -> BTreeSet<&str> {
            events
                .iter()
                .filter(|e| e.kind == k)
                .map(|e| e.id.as_str())
                .collect()
        };
        let entries = of(ChangeKind::Entry);
        if !entries.is_empty() {
            self.apply_entry_changes(&entries)?;
        }
        if !of(ChangeKind::Kill).is_empty() {
            self.reload_kills()?;
        }
        if !of(ChangeKind::FederatedBundle).is_empty() {
            self.reload_federated()?;
        }
        if !of(ChangeKind::ServerKeys).is_empty() {
            self.reload_cluster_keys()?;
        }
        if !of(ChangeKind::JoinToken).is_empty() {
            self.reload_token_ids()?;
        }
        let approvals = of(ChangeKind::Approval);
        if !approvals.is_empty() {
            self.apply_approval_changes(&approvals)?;
        }
        // Agent records are read from the store on every check; wake the
        // agent's stream so that a ban or eviction takes effect now.
        for id in of(ChangeKind::Agent) {
            if let Ok(id) = SpiffeId::new(id) {
                self.notify_agent(&id);
            }
        }
        Ok(())
    }

    fn apply_entry_changes(&self, ids: &BTreeSet<&str>) -> Result<(), RegistryError> {
        let stored: HashMap<String, Option<_>> = {
            let r = self.store.read()?;
            ids.iter()
                .map(|id| Ok((id.to_string(), r.entry(id, self.trust_domain())?)))
                .collect::<Result<_, RegistryError>>()?
        };
        self.take_entries(stored)
    }

    /// Brings the index in line with `stored` (entry ID to the stored
    /// entry, `None` for one that no longer exists).
    fn take_entries(
        &self,
        stored: HashMap<String, Option<sigil_core::entry::Entry>>,
    ) -> Result<(), RegistryError> {
        let ids: BTreeSet<&str> = stored.keys().map(String::as_str).collect();
        let mut idx = self.entries.write().map_err(|_| poisoned())?;
        let mut changed = false;
        for id in &ids {
            let old = idx.by_id.get(*id).cloned();
            match stored.get(*id).and_then(Option::as_ref) {
                Some(e) if old.as_deref() == Some(e) => {}
                Some(e) => {
                    idx.insert(Arc::new(e.clone()));
                    self.entry_changed(&idx, old.as_deref(), Some(e));
                    changed = true;
                }
                None => {
                    if let Some(gone) = idx.remove(id) {
                        self.entry_changed(&idx, Some(&gone), None);
                        changed = true;
                    }
                }
            }
        }
        if changed {
            tracing::debug!(
                entries = ids.len(),
                "applied entry changes from the datastore"
            );
            if self.any_kill() {
                self.refresh_killed_ids(&idx);
            }
        }
        Ok(())
    }

    /// Reloads every record kind from the store, for a server whose
    /// position in the change feed is older than what the feed retains:
    /// the events it missed are gone, so it compares everything.
    pub fn reload_all(&self) -> Result<(), RegistryError> {
        let mut stored: HashMap<String, Option<sigil_core::entry::Entry>> = self
            .entries
            .read()
            .map_err(|_| poisoned())?
            .by_id
            .keys()
            .map(|id| (id.clone(), None))
            .collect();
        let approvals: Vec<String> = {
            let r = self.store.read()?;
            for e in r.entries(self.trust_domain())? {
                stored.insert(e.id.clone(), Some(e));
            }
            r.approvals()?.into_iter().map(|a| a.id).collect()
        };
        self.take_entries(stored)?;
        self.reload_kills()?;
        self.reload_federated()?;
        self.reload_cluster_keys()?;
        self.reload_token_ids()?;
        self.apply_approval_changes(&approvals.iter().map(String::as_str).collect())?;
        // Bans and evictions: every stream re-checks its agent.
        self.bump();
        tracing::info!(
            "reloaded every record from the datastore (behind the change feed's window)"
        );
        Ok(())
    }

    fn reload_kills(&self) -> Result<(), RegistryError> {
        let stored = self.store.read()?.kills()?;
        let added: Vec<_> = {
            let mut kills = self.kills.write().map_err(|_| poisoned())?;
            if *kills == stored {
                return Ok(());
            }
            let added = stored
                .iter()
                .filter(|k| !kills.contains(k))
                .cloned()
                .collect();
            *kills = stored;
            added
        };
        self.refresh_killed_ids(&*self.entries.read().map_err(|_| poisoned())?);
        for k in &added {
            if let Err(e) = self.revoke_for_kill(k) {
                tracing::error!(kill = %k.id, error = %e, "revoking the killed SVIDs failed; retried at the next CRL refresh");
            }
        }
        self.bump();
        Ok(())
    }

    fn reload_federated(&self) -> Result<(), RegistryError> {
        let stored: std::collections::BTreeMap<_, _> =
            self.store.read()?.bundles()?.into_iter().collect();
        let mut fed = self.federated.write().map_err(|_| poisoned())?;
        if *fed != stored {
            *fed = stored;
            drop(fed);
            self.bump();
        }
        Ok(())
    }

    fn reload_token_ids(&self) -> Result<(), RegistryError> {
        let mut ids: HashMap<SpiffeId, i64> = HashMap::new();
        for t in self.store.read()?.tokens()? {
            if let Some(id) = t.spiffe_id.as_deref().and_then(|s| SpiffeId::new(s).ok()) {
                let exp = ids.entry(id).or_insert(t.expires_at);
                *exp = (*exp).max(t.expires_at);
            }
        }
        *self.token_ids.lock().unwrap_or_else(|p| p.into_inner()) = ids;
        Ok(())
    }
}
