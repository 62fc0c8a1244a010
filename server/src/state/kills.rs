//! The kill switch: durable rules that withdraw identities everywhere at
//! once. A kill names a SPIFFE ID, an entry, an agent (the node and all it
//! serves) or a selector; it applies to entries created later too, and
//! holds until it is lifted. Enforcement is here and in the authorization
//! core: killed entries are never synced or minted, a killed agent is
//! refused on every call and re-attestation, and every affected sync stream
//! is woken at once.

use sigil_core::entry::Entry;
use sigil_core::ids::new_entry_id;
use sigil_core::now_unix;

use super::entries::EntryIndex;
use super::{Caller, ServerState, poisoned};
use crate::datastore::append_audit;
use crate::datastore::{KillRecord, KillTarget};
use crate::error::RegistryError;
use sigil_core::audit::{Event, KillTarget as AuditTarget};

fn audit_target(t: &KillTarget) -> AuditTarget {
    match t {
        KillTarget::SpiffeId(id) => AuditTarget::SpiffeId {
            spiffe_id: id.clone(),
        },
        KillTarget::Entry(id) => AuditTarget::Entry {
            entry_id: id.clone(),
        },
        KillTarget::Agent(id) => AuditTarget::Agent {
            agent_id: id.clone(),
        },
        KillTarget::Selector(s) => AuditTarget::selector(s),
    }
}

/// Stores `kill` and its `kill_created` record in the caller's transaction.
pub(super) fn put_kill_audited(
    tx: &mut dyn crate::datastore::WriteTx,
    caller: &Caller,
    kill: &KillRecord,
) -> Result<(), RegistryError> {
    tx.put_kill(kill)?;
    append_audit(
        tx,
        caller,
        Event::KillCreated {
            kill_id: kill.id.clone(),
            target: audit_target(&kill.target),
            reason: kill.reason.clone(),
        },
    )
}

/// Longest kill reason accepted.
const MAX_REASON: usize = 1024;

impl ServerState {
    /// Creates a kill. Entry and agent targets must exist; `reason` is
    /// required.
    pub fn create_kill(
        &self,
        caller: &Caller,
        target: KillTarget,
        reason: &str,
    ) -> Result<KillRecord, RegistryError> {
        let reason = reason.trim();
        if reason.is_empty() {
            return Err(RegistryError::invalid(
                "invalid field `reason`: required (say why the identity is withdrawn)",
            ));
        }
        if reason.len() > MAX_REASON || reason.chars().any(char::is_control) {
            return Err(RegistryError::invalid(format!(
                "invalid field `reason`: at most {MAX_REASON} bytes, no control characters"
            )));
        }
        match &target {
            KillTarget::Entry(id) => {
                self.get_entry(id)?;
            }
            KillTarget::Agent(id) => {
                self.get_agent(&id.to_string())?;
            }
            KillTarget::SpiffeId(id) if !id.is_member_of(self.trust_domain()) => {
                return Err(RegistryError::invalid(format!(
                    "invalid field `spiffe_id`: {id} is not in trust domain {}",
                    self.trust_domain()
                )));
            }
            _ => {}
        }
        let kill = KillRecord {
            id: new_entry_id(),
            target,
            reason: reason.to_string(),
            caller: caller.to_string(),
            created_at: now_unix(),
        };
        let mut kills = self.kills.write().map_err(|_| poisoned())?;
        self.store
            .transact(|tx| put_kill_audited(tx, caller, &kill))?;
        kills.push(kill.clone());
        drop(kills);
        self.kill_in_force(caller, &kill)?;
        Ok(kill)
    }

    /// After a kill's transaction committed and the kill joined
    /// `self.kills`: the withdrawn IDs, the CRLs and every sync stream
    /// follow. For mutations that store a kill as part of a larger change
    /// (a task's end) through [`put_kill_audited`].
    pub(super) fn kill_in_force(
        &self,
        caller: &Caller,
        kill: &KillRecord,
    ) -> Result<(), RegistryError> {
        self.refresh_killed_ids(&*self.entries.read().map_err(|_| poisoned())?);
        // The kill is in force before the CRL scan: a mint batch signed
        // meanwhile is caught by `revoke_raced` after its audit record.
        if let Err(e) = self.revoke_for_kill(kill) {
            tracing::error!(kill = %kill.id, error = %e, "revoking the killed SVIDs failed; retried at the next CRL refresh");
        }
        tracing::warn!(%caller, kill = %kill.id, target = %kill.target, reason = %kill.reason, "kill created");
        crate::metrics::METRICS.kills_created.inc();
        // Every stream re-evaluates: a kill may touch entries under any
        // agent or node alias, and kills are rare next to syncs.
        self.bump();
        Ok(())
    }

    /// The kill of exactly this SPIFFE ID, if any.
    pub(super) fn kill_of_spiffe_id(&self, id: &sigil_core::SpiffeId) -> Option<KillRecord> {
        self.kills
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|k| matches!(&k.target, KillTarget::SpiffeId(s) if s == id))
            .cloned()
    }

    /// Lifts a kill: what it withdrew may be issued again.
    pub fn lift_kill(&self, caller: &Caller, id: &str) -> Result<KillRecord, RegistryError> {
        let mut kills = self.kills.write().map_err(|_| poisoned())?;
        let kill = self
            .store
            .transact(|tx| {
                let Some(k) = tx.take_kill(id)? else {
                    return Ok(None);
                };
                append_audit(
                    tx,
                    caller,
                    Event::KillLifted {
                        kill_id: k.id.clone(),
                        target: audit_target(&k.target),
                    },
                )?;
                Ok(Some(k))
            })?
            .ok_or_else(|| RegistryError::not_found(format!("no kill {id:?}")))?;
        kills.retain(|k| k.id != id);
        drop(kills);
        self.refresh_killed_ids(&*self.entries.read().map_err(|_| poisoned())?);
        // What only this kill withdrew leaves the CRLs.
        if let Err(e) = self.rebuild_revocations() {
            tracing::error!(kill = %kill.id, error = %e, "rebuilding the CRLs failed; retried at the next CRL refresh");
        }
        tracing::warn!(%caller, kill = %kill.id, target = %kill.target, "kill lifted");
        self.bump();
        Ok(kill)
    }

    /// Audit records with `seq >= since`, at most `limit`.
    pub fn audit_records(
        &self,
        since: u64,
        limit: usize,
    ) -> Result<Vec<sigil_core::audit::Record>, RegistryError> {
        Ok(self.store.read()?.audit_records(since, limit)?)
    }

    /// Every kill in force, oldest first.
    pub fn list_kills(&self) -> Result<Vec<KillRecord>, RegistryError> {
        let mut v = self.kills.read().map_err(|_| poisoned())?.clone();
        v.sort_by(|a, b| {
            a.created_at
                .cmp(&b.created_at)
                .then_with(|| a.id.cmp(&b.id))
        });
        Ok(v)
    }

    /// The kill that withdraws entry `e`, if any.
    pub(super) fn kill_of_entry(&self, e: &Entry) -> Option<KillRecord> {
        self.kills
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|k| k.target.covers(e))
            .cloned()
    }

    /// How many kills are in force.
    pub fn kills_in_force(&self) -> usize {
        self.kills.read().map_or(0, |k| k.len())
    }

    /// SPIFFE IDs withdrawn as a whole: named by a SPIFFE-ID kill, or
    /// whose every entry some kill covers. Sorted; empty without kills.
    /// Kept up to date by every kill and entry change, so a sync wake-up
    /// only copies it.
    pub fn killed_spiffe_ids(&self) -> Vec<String> {
        self.killed_ids
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Recomputes [`ServerState::killed_spiffe_ids`] from `idx` (the entry
    /// index the caller holds). Called before the change is announced, so
    /// a woken stream never sees a stale list.
    pub(super) fn refresh_killed_ids(&self, idx: &EntryIndex) {
        let kills = self.kills.read().unwrap_or_else(|p| p.into_inner());
        let mut out: std::collections::BTreeSet<String> = kills
            .iter()
            .filter_map(|k| match &k.target {
                KillTarget::SpiffeId(id) => Some(id.to_string()),
                _ => None,
            })
            .collect();
        if !kills.is_empty() {
            // SPIFFE ID -> whether some entry with it is still live.
            let mut live: std::collections::HashMap<&sigil_core::SpiffeId, bool> =
                std::collections::HashMap::new();
            for e in idx.by_id.values().filter(|e| !e.node) {
                let covered = kills.iter().any(|k| k.target.covers(e));
                *live.entry(&e.spiffe_id).or_insert(false) |= !covered;
            }
            out.extend(
                live.into_iter()
                    .filter(|(_, alive)| !alive)
                    .map(|(id, _)| id.to_string()),
            );
        }
        drop(kills);
        *self.killed_ids.write().unwrap_or_else(|p| p.into_inner()) = out.into_iter().collect();
    }

    /// Whether any kill is in force (fast path for the hot paths).
    pub(super) fn any_kill(&self) -> bool {
        !self
            .kills
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    /// The kill of agent `id`, if any.
    pub fn kill_of_agent(&self, id: &sigil_core::SpiffeId) -> Option<KillRecord> {
        self.kills
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|k| matches!(&k.target, KillTarget::Agent(a) if a == id))
            .cloned()
    }
}
