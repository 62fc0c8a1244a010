//! The approval gate: an entry with `require_approval` issues nothing to an
//! agent until an approver grants a request bound to (that entry, that
//! agent), and nothing after the grant ends.
//!
//! - **Requests open on delivery.** When an agent's sync (or a mint call)
//!   reaches a gated entry for which the agent has no request in force,
//!   the server opens a pending request, stored with its
//!   `approval_requested` audit record in one transaction. The sync sends
//!   the entry with `approval_pending` naming the request, so the agent
//!   mints nothing for it and its Workload API answers a matching workload
//!   with PermissionDenied that names the request.
//! - **Grants** (`sigil-server approval grant ID --for 8h`) and denials are
//!   read-modify-writes of the stored request inside one transaction with
//!   their audit record (caller = the approver's uid/gid/pid). With
//!   `approvers_gid` set, only admin callers with that gid may decide.
//! - **Expiry.** A grant in force sends the entry with `approved_until`;
//!   the agent's sync stream wakes at that instant, a new pending request
//!   opens and the entry goes back to pending, so the agent drops the SVIDs
//!   and every workload stream loses the identity. SVIDs minted under a
//!   grant never outlive it (their TTL is capped at its end).
//! - **Authoritative at minting.** Minting re-checks the grant whatever the
//!   agent believes.
//!
//! The current request per (entry, agent) is kept in memory, loaded at
//! start; every change to it is made under its write lock, after the
//! transaction commits.

use std::collections::HashMap;
use std::sync::Arc;

use sigil_core::audit::Event;
use sigil_core::entry::Entry;
use sigil_core::ids::new_entry_id;
use sigil_core::{SpiffeId, now_unix, rfc3339};

use super::{Caller, MintRefusal, ServerState, poisoned};
use crate::datastore::{AgentRecord, ApprovalRecord, ApprovalStatus, append_audit};
use crate::error::RegistryError;

/// Longest grant (`approval grant --for`).
pub const MAX_GRANT: std::time::Duration = std::time::Duration::from_secs(30 * 86_400);

/// The current request of each (entry ID, agent).
pub(super) type ApprovalIndex = HashMap<(String, SpiffeId), ApprovalRecord>;

/// Builds the index from every stored request: the latest per pair.
pub(super) fn index(all: Vec<ApprovalRecord>) -> ApprovalIndex {
    let mut idx: ApprovalIndex = HashMap::new();
    for a in all {
        let key = (a.entry_id.clone(), a.agent_id.clone());
        match idx.get(&key) {
            Some(cur) if (cur.requested_at, &cur.id) >= (a.requested_at, &a.id) => {}
            _ => {
                idx.insert(key, a);
            }
        }
    }
    idx
}

/// What a gated entry means for one agent right now.
enum Gate {
    /// A grant in force until this Unix time.
    Open(i64),
    /// No grant: why not (names the request).
    Closed(String),
}

/// The text an agent shows a workload for a request that does not grant.
fn closed_reason(a: &ApprovalRecord) -> String {
    match a.status {
        ApprovalStatus::Denied => format!(
            "identity {} requires approval: request {} was denied",
            a.spiffe_id, a.id
        ),
        _ => format!(
            "identity {} requires approval: request {} is pending (an approver runs `sigil-server approval grant {} --for DURATION`)",
            a.spiffe_id, a.id, a.id
        ),
    }
}

/// Whether `a` is still the request that decides its pair at `now`: a
/// pending or denied request stays until decided; a grant until it ends.
fn current_at(a: &ApprovalRecord, now: i64) -> bool {
    match a.status {
        ApprovalStatus::Pending | ApprovalStatus::Denied => true,
        ApprovalStatus::Granted => a.grants_at(now),
    }
}

impl ServerState {
    /// The gate of `e` for `agent`, opening a pending request (stored and
    /// audited) when there is none in force.
    fn gate(&self, e: &Entry, agent: &SpiffeId, now: i64) -> Result<Gate, RegistryError> {
        let key = (e.id.clone(), agent.clone());
        {
            let idx = self.approvals.read().map_err(|_| poisoned())?;
            if let Some(a) = idx.get(&key).filter(|a| current_at(a, now)) {
                return Ok(if a.grants_at(now) {
                    Gate::Open(a.expires_at)
                } else {
                    Gate::Closed(closed_reason(a))
                });
            }
        }
        let mut idx = self.approvals.write().map_err(|_| poisoned())?;
        // Another call may have opened it meanwhile.
        if let Some(a) = idx.get(&key).filter(|a| current_at(a, now)) {
            return Ok(if a.grants_at(now) {
                Gate::Open(a.expires_at)
            } else {
                Gate::Closed(closed_reason(a))
            });
        }
        let req = ApprovalRecord {
            id: new_entry_id(),
            entry_id: e.id.clone(),
            spiffe_id: e.spiffe_id.clone(),
            agent_id: agent.clone(),
            status: ApprovalStatus::Pending,
            requested_at: now,
            decided_at: 0,
            decided_by: String::new(),
            expires_at: 0,
        };
        let caller = Caller::agent(agent.clone());
        self.store.transact(|tx| {
            tx.put_approval(&req)?;
            append_audit(
                tx,
                &caller,
                Event::ApprovalRequested {
                    request_id: req.id.clone(),
                    entry_id: req.entry_id.clone(),
                    spiffe_id: req.spiffe_id.clone(),
                    agent_id: req.agent_id.clone(),
                },
            )
        })?;
        tracing::warn!(request = %req.id, entry = %e.id, spiffe_id = %e.spiffe_id, %agent, "approval requested");
        let reason = closed_reason(&req);
        idx.insert(key, req);
        Ok(Gate::Closed(reason))
    }

    /// The entries an agent's sync stream sends: those it is authorized
    /// for, each gated entry marked with the agent's approval state.
    pub fn entries_for_sync(
        &self,
        agent: &SpiffeId,
        rec: Option<&AgentRecord>,
    ) -> Result<Vec<Arc<Entry>>, RegistryError> {
        let entries = self.entries_for_agent(agent, rec)?;
        if !entries.iter().any(|e| e.require_approval) {
            return Ok(entries);
        }
        let now = now_unix();
        entries
            .into_iter()
            .map(|e| {
                if !e.require_approval {
                    return Ok(e);
                }
                let mut marked = (*e).clone();
                match self.gate(&e, agent, now)? {
                    Gate::Open(until) => marked.approved_until = Some(until),
                    Gate::Closed(why) => marked.approval_pending = Some(why),
                }
                Ok(Arc::new(marked))
            })
            .collect()
    }

    /// At minting: the end of the agent's grant for `e` (`None` when the
    /// entry needs none), or why nothing may be issued.
    pub(super) fn grant_for_mint(
        &self,
        e: &Entry,
        agent: &SpiffeId,
        now: i64,
    ) -> Result<Option<i64>, MintRefusal> {
        if !e.require_approval {
            return Ok(None);
        }
        match self.gate(e, agent, now)? {
            Gate::Open(until) => Ok(Some(until)),
            Gate::Closed(why) => Err(MintRefusal::NotApproved(why)),
        }
    }

    /// Takes approval requests another server stored (the change feed) into
    /// the index, where they are the newest of their pair, and wakes their
    /// agents' streams.
    pub(super) fn apply_approval_changes(
        &self,
        ids: &std::collections::BTreeSet<&str>,
    ) -> Result<(), RegistryError> {
        let stored: Vec<ApprovalRecord> = {
            let r = self.store.read()?;
            let mut v = Vec::new();
            for id in ids {
                if let Some(a) = r.approval(id)? {
                    v.push(a);
                }
            }
            v
        };
        let mut idx = self.approvals.write().map_err(|_| poisoned())?;
        let mut wake = Vec::new();
        for a in stored {
            let key = (a.entry_id.clone(), a.agent_id.clone());
            let newer = idx
                .get(&key)
                .is_none_or(|cur| cur.id == a.id || cur.requested_at <= a.requested_at);
            if newer && idx.get(&key) != Some(&a) {
                wake.push(a.agent_id.clone());
                idx.insert(key, a);
            }
        }
        drop(idx);
        for agent in wake {
            self.notify_agent(&agent);
        }
        Ok(())
    }

    /// Every approval request, newest first.
    pub fn list_approvals(&self) -> Result<Vec<ApprovalRecord>, RegistryError> {
        let mut v = self.store.read()?.approvals()?;
        v.sort_by(|a, b| {
            b.requested_at
                .cmp(&a.requested_at)
                .then_with(|| a.id.cmp(&b.id))
        });
        Ok(v)
    }

    /// Refuses a caller who may not decide approval requests: with
    /// `approvers_gid` set, only admin callers whose gid (from the admin
    /// socket's peer credentials) is that gid may, root included.
    fn check_approver(&self, caller: &Caller) -> Result<(), RegistryError> {
        let Some(want) = self.cfg.governance.approvers_gid else {
            return Ok(());
        };
        match caller {
            Caller::Admin { gid, .. } if *gid == want => Ok(()),
            Caller::Admin { uid, gid, .. } => Err(RegistryError::denied(format!(
                "uid {uid} (gid {gid}) may not decide approval requests: server.toml approvers_gid = {want}"
            ))),
            other => Err(RegistryError::denied(format!(
                "{other} may not decide approval requests"
            ))),
        }
    }

    /// Grants request `id` for `duration` from now. Pending and denied
    /// requests may be granted; a grant is bound to the request's entry and
    /// agent.
    pub fn grant_approval(
        &self,
        caller: &Caller,
        id: &str,
        duration: std::time::Duration,
    ) -> Result<ApprovalRecord, RegistryError> {
        self.check_approver(caller)?;
        if duration.is_zero() || duration > MAX_GRANT {
            return Err(RegistryError::invalid(format!(
                "invalid field `for`: must be between 1s and {}d",
                MAX_GRANT.as_secs() / 86_400
            )));
        }
        self.decide(caller, id, |a, now| {
            match a.status {
                ApprovalStatus::Pending | ApprovalStatus::Denied => {}
                ApprovalStatus::Granted => {
                    return Err(RegistryError::precondition(format!(
                        "request {} was already granted (until {}); a new request opens after a grant ends",
                        a.id,
                        rfc3339(a.expires_at)
                    )));
                }
            }
            a.status = ApprovalStatus::Granted;
            a.expires_at = now.saturating_add(duration.as_secs() as i64);
            Ok(Event::ApprovalGranted {
                request_id: a.id.clone(),
                entry_id: a.entry_id.clone(),
                spiffe_id: a.spiffe_id.clone(),
                agent_id: a.agent_id.clone(),
                expires_at: a.expires_at,
            })
        })
    }

    /// Denies request `id`: a pending one, or a grant in force (which ends
    /// it at once).
    pub fn deny_approval(
        &self,
        caller: &Caller,
        id: &str,
    ) -> Result<ApprovalRecord, RegistryError> {
        self.check_approver(caller)?;
        self.decide(caller, id, |a, now| {
            match a.status {
                ApprovalStatus::Pending => {}
                ApprovalStatus::Granted if a.grants_at(now) => {}
                ApprovalStatus::Granted => {
                    return Err(RegistryError::precondition(format!(
                        "request {}'s grant already ended at {}",
                        a.id,
                        rfc3339(a.expires_at)
                    )));
                }
                ApprovalStatus::Denied => {
                    return Err(RegistryError::precondition(format!(
                        "request {} is already denied",
                        a.id
                    )));
                }
            }
            a.status = ApprovalStatus::Denied;
            a.expires_at = 0;
            Ok(Event::ApprovalDenied {
                request_id: a.id.clone(),
                entry_id: a.entry_id.clone(),
                spiffe_id: a.spiffe_id.clone(),
                agent_id: a.agent_id.clone(),
            })
        })
    }

    /// A decision on request `id`: `change` edits the stored request (read
    /// in the same transaction) and names the audit event. The request must
    /// still be its pair's current one. Wakes the agent's sync stream.
    fn decide(
        &self,
        caller: &Caller,
        id: &str,
        change: impl Fn(&mut ApprovalRecord, i64) -> Result<Event, RegistryError>,
    ) -> Result<ApprovalRecord, RegistryError> {
        let mut idx = self.approvals.write().map_err(|_| poisoned())?;
        let now = now_unix();
        let decided = self.store.transact(|tx| {
            let mut a = tx
                .approval(id)?
                .ok_or_else(|| RegistryError::not_found(format!("no approval request {id:?}")))?;
            let key = (a.entry_id.clone(), a.agent_id.clone());
            if idx.get(&key).is_some_and(|cur| cur.id != a.id) {
                return Err(RegistryError::precondition(format!(
                    "request {id} was superseded by a newer request for the same entry and agent"
                )));
            }
            let event = change(&mut a, now)?;
            a.decided_at = now;
            a.decided_by = caller.to_string();
            tx.put_approval(&a)?;
            append_audit(tx, caller, event)?;
            Ok(a)
        })?;
        idx.insert(
            (decided.entry_id.clone(), decided.agent_id.clone()),
            decided.clone(),
        );
        drop(idx);
        tracing::warn!(%caller, request = %decided.id, status = decided.status.as_str(), agent = %decided.agent_id, "approval request decided");
        self.notify_agent(&decided.agent_id);
        Ok(decided)
    }
}
