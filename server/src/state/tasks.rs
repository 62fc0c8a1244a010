//! Task-scoped identities: a workload of an entry that allows tasks
//! (`task_ttl_max`) starts a task through its agent and gets an identity
//! of its own for it, `<entry SPIFFE ID>/task/<task ID>`, for at most
//! min(requested ttl, `task_ttl_max`, the entry's X.509-SVID TTL) — the
//! task's deadline. The protocol is `proto/sigil/task.proto`.
//!
//! - **Who may.** Starting, minting for, looking up and ending a task are
//!   allowed only to an agent that may mint for the task's entry (it is,
//!   or stands for, the entry's parent; the entry is not a node alias, has
//!   not expired, is not killed, and holds an approval grant if it needs
//!   one). The agent in turn serves a task only to a process that attests
//!   to the entry (`agentd/src/task_api.rs`). An operator may end any task.
//! - **Records.** A task is a [`TaskRecord`] in the datastore, read from it
//!   on every use (no in-memory copy, so every server sharing a datastore
//!   sees the same state). Its start is one transaction: the record, its
//!   `task_started` audit record and the issuance records of the SVIDs
//!   handed out with it.
//! - **End.** Ending a task (`EndTask`, `sigil-server task end`) is one
//!   transaction that marks the record ended and stores a kill of the
//!   task's SPIFFE ID with its `task_ended` and `kill_created` records; the
//!   kill then takes effect as any other (`kills.rs`): the CRLs list the
//!   task's serials, the agents' ValidateJWTSVID refuses its JWT-SVIDs.
//! - **Deadline.** No SVID of a task outlives its deadline (TTLs are
//!   capped at it) and nothing is minted from the deadline on; a periodic
//!   job ([`ServerState::end_tasks_past_deadline`]) then records the end
//!   (reason `deadline`, no kill: nothing of the task is valid any more),
//!   and lifts the kill of an ended task [`TASK_KILL_GRACE`] after its
//!   deadline (the task stays ended: minting still refuses it).

use std::time::Duration;

use serde_json::json;
use sigil_core::audit::{Event, IssuedRef, IssuedX509Svid};
use sigil_core::entry::{Entry, validate_text_max};
use sigil_core::ids::{new_entry_id, parse_spiffe_id};
use sigil_core::jwt::SignedJwt;
use sigil_core::{SpiffeId, now_unix, rfc3339};

use super::kills::put_kill_audited;
use super::{Caller, ServerState, ServerTask, poisoned};
use crate::datastore::{AgentRecord, KillRecord, KillTarget, TaskRecord, WriteTx, append_audit};
use crate::error::RegistryError;

/// Longest task name, in bytes.
pub const MAX_TASK_NAME: usize = 128;

/// Seconds past an ended task's deadline after which the kill of its SPIFFE
/// ID is lifted ([`ServerState::lift_expired_task_kills`]): by then no SVID
/// of the task is valid even to a verifier whose clock is that far behind,
/// and the kills of finished tasks do not pile up.
pub const TASK_KILL_GRACE: i64 = 300;

/// Why a task ended.
pub mod end_reason {
    /// The workload ended it (`EndTask`).
    pub const ENDED: &str = "ended";
    /// An operator ended it (`sigil-server task end`).
    pub const OPERATOR: &str = "operator";
    /// It reached its deadline.
    pub const DEADLINE: &str = "deadline";
}

/// A task and the SVIDs just issued for it.
pub struct TaskSvid {
    pub task: TaskRecord,
    /// The X.509-SVID chain, leaf first (DER).
    pub chain: Vec<Vec<u8>>,
    /// A JWT-SVID, when audiences were asked.
    pub jwt: Option<String>,
}

/// What [`ServerState::list_tasks`] selects.
#[derive(Debug, Default, Clone)]
pub struct TaskQuery {
    /// Tasks whose own or whose entry's SPIFFE ID is this.
    pub spiffe_id: Option<SpiffeId>,
}

fn invalid(field: &str, reason: impl std::fmt::Display) -> RegistryError {
    RegistryError::invalid(format!("invalid field `{field}`: {reason}"))
}

/// Checks a workload's task name: 1-[`MAX_TASK_NAME`] bytes of printable
/// text.
fn check_name(name: &str) -> Result<(), RegistryError> {
    if name.trim().is_empty() {
        return Err(invalid("task_name", "required (say what the task is)"));
    }
    validate_text_max(name, MAX_TASK_NAME).map_err(|r| invalid("task_name", r))
}

/// The issuance records of one task SVID: under the task's entry, with the
/// task's SPIFFE ID (what a kill of that ID matches in the CRL scan).
struct Issued {
    x509: IssuedX509Svid,
    jwt: Option<SignedJwt>,
    audience: Vec<String>,
}

/// A task's entry as an agent may mint for it: the entry, the agent's
/// record and the end of its approval grant (if the entry needs one).
impl ServerState {
    /// Refuses a `task_ttl_max` the entry could not honour: on a node-alias
    /// entry, or above the entry's X.509-SVID TTL (the server default when
    /// the entry has none). Called when an entry is created or updated.
    pub(super) fn check_task_ttl_max(&self, e: &Entry) -> Result<(), RegistryError> {
        let Some(max) = e.task_ttl_max else {
            return Ok(());
        };
        if e.node {
            return Err(RegistryError::invalid(
                "invalid entry field `task_ttl_max`: a node-alias entry issues no SVIDs, so it runs no tasks",
            ));
        }
        let x509 = e.x509_svid_ttl.unwrap_or(self.cfg.default_x509_svid_ttl);
        if max > x509 {
            return Err(RegistryError::invalid(format!(
                "invalid entry field `task_ttl_max`: {}s exceeds the entry's X.509-SVID TTL of {}s{} (a task identity lives at most as long as the entry's)",
                max.as_secs(),
                x509.as_secs(),
                if e.x509_svid_ttl.is_none() {
                    " (the server's default_x509_svid_ttl)"
                } else {
                    ""
                }
            )));
        }
        Ok(())
    }

    /// Signs an X.509-SVID (and a JWT-SVID when `audience` is not empty)
    /// of `task` under `e`, valid at most until the task's deadline.
    #[allow(clippy::too_many_arguments)]
    fn sign_task(
        &self,
        e: &Entry,
        rec: Option<&AgentRecord>,
        task: &TaskRecord,
        grant: Option<i64>,
        csr: &[u8],
        audience: &[String],
        now: i64,
    ) -> Result<(Vec<Vec<u8>>, Issued), RegistryError> {
        let until_deadline = Duration::from_secs((task.deadline - now).max(0).unsigned_abs());
        let x509_ttl = Self::capped_ttl(
            e,
            e.x509_svid_ttl
                .unwrap_or(self.cfg.default_x509_svid_ttl)
                .min(until_deadline),
            grant,
            now,
        )?;
        let ca = self.ca();
        let leaf = ca
            .sign_svid_at(
                csr,
                self.cfg.workload_csr_check,
                &task.spiffe_id,
                &e.dns_names,
                x509_ttl,
                now,
            )
            .map_err(|err| invalid("csr", err))?;
        let x509 = IssuedX509Svid {
            entry_id: e.id.clone(),
            spiffe_id: task.spiffe_id.clone(),
            serial: leaf.serial,
            expires_at: leaf.not_after,
        };
        let jwt = if audience.is_empty() {
            None
        } else {
            let ttl = Self::capped_ttl(
                e,
                e.jwt_svid_ttl
                    .unwrap_or(self.cfg.default_jwt_svid_ttl)
                    .min(until_deadline),
                grant,
                now,
            )?;
            let mut claims = self.context_claims(e, rec);
            claims.insert(
                "sigil_task".into(),
                json!({"id": task.id, "name": task.name}),
            );
            let signer = self
                .keys
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .active_jwt();
            Some(
                signer
                    .sign_with_claims(
                        &task.spiffe_id,
                        audience,
                        ttl,
                        now,
                        self.cfg.jwt_issuer.as_deref(),
                        &claims,
                    )
                    .map_err(|err| RegistryError::internal(err.to_string()))?,
            )
        };
        Ok((
            ca.svid_chain(leaf.der),
            Issued {
                x509,
                jwt,
                audience: audience.to_vec(),
            },
        ))
    }

    /// Appends the issuance records of `issued` to the transaction.
    fn audit_task_issued(
        &self,
        tx: &mut dyn WriteTx,
        caller: &Caller,
        agent: &SpiffeId,
        task: &TaskRecord,
        issued: &Issued,
    ) -> Result<(), RegistryError> {
        if !self.cfg.audit_issuance {
            return Ok(());
        }
        append_audit(
            tx,
            caller,
            Event::X509SvidsIssued {
                agent_id: agent.clone(),
                svids: vec![issued.x509.clone()],
            },
        )?;
        if let Some(j) = &issued.jwt {
            append_audit(
                tx,
                caller,
                Event::JwtSvidIssued {
                    agent_id: agent.clone(),
                    entry_id: task.entry_id.clone(),
                    spiffe_id: task.spiffe_id.clone(),
                    audience: issued.audience.clone(),
                    jti: j.jti.clone(),
                    expires_at: j.expires_at,
                },
            )?;
        }
        Ok(())
    }

    /// Starts a task under `entry_id` for `agent`'s workload, and issues
    /// its first SVIDs (`csr` for the X.509-SVID; a JWT-SVID when
    /// `audience` is not empty).
    pub fn start_task(
        &self,
        agent: &SpiffeId,
        entry_id: &str,
        name: &str,
        ttl_seconds: i64,
        csr: &[u8],
        audience: &[String],
    ) -> Result<TaskSvid, RegistryError> {
        check_name(name)?;
        if ttl_seconds <= 0 {
            return Err(invalid("ttl", "must be at least 1 second"));
        }
        if entry_id.is_empty() {
            return Err(invalid("entry_id", "required"));
        }
        let now = now_unix();
        if !self
            .entries
            .read()
            .map_err(|_| poisoned())?
            .by_id
            .contains_key(entry_id)
        {
            return Err(RegistryError::not_found(format!(
                "invalid field `entry_id`: no entry {entry_id:?}"
            )));
        }
        let (e, rec, grant) = self.entry_to_mint(agent, entry_id, now)?;
        let max = e.task_ttl_max.ok_or_else(|| {
            RegistryError::precondition(format!(
                "invalid entry field `task_ttl_max`: entry {} ({}) allows no tasks (it was created without --task-ttl-max)",
                e.id, e.spiffe_id
            ))
        })?;
        let lifetime = Duration::from_secs(ttl_seconds.unsigned_abs())
            .min(max)
            .min(e.x509_svid_ttl.unwrap_or(self.cfg.default_x509_svid_ttl));
        let lifetime = Self::capped_ttl(&e, lifetime, grant, now)?;
        let id = new_entry_id();
        let spiffe_id = parse_spiffe_id(&format!("{}/task/{id}", e.spiffe_id)).map_err(|err| {
            RegistryError::precondition(format!(
                "entry {}'s SPIFFE ID is too long for a task identity: {err}",
                e.id
            ))
        })?;
        let caller = Caller::agent(agent.clone());
        let task = TaskRecord {
            id,
            name: name.to_string(),
            entry_id: e.id.clone(),
            entry_spiffe_id: e.spiffe_id.clone(),
            owner: e.owner.clone(),
            agent_id: agent.clone(),
            spiffe_id,
            started_at: now,
            deadline: now.saturating_add(i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX)),
            ended_at: None,
            end_reason: String::new(),
            started_by: caller.to_string(),
            ended_by: String::new(),
            kill_id: String::new(),
        };
        let (chain, issued) = self.sign_task(&e, rec.as_ref(), &task, grant, csr, audience, now)?;
        self.store.transact(|tx| {
            tx.put_task(&task)?;
            append_audit(
                tx,
                &caller,
                Event::TaskStarted {
                    task_id: task.id.clone(),
                    name: task.name.clone(),
                    entry_id: task.entry_id.clone(),
                    spiffe_id: task.spiffe_id.clone(),
                    agent_id: agent.clone(),
                    deadline: task.deadline,
                },
            )?;
            self.audit_task_issued(tx, &caller, agent, &task, &issued)
        })?;
        self.note_entries_used([e.id.as_str()]);
        tracing::info!(%caller, task = %task.id, spiffe_id = %task.spiffe_id, deadline = %rfc3339(task.deadline), "task started");
        Ok(TaskSvid {
            task,
            chain,
            jwt: issued.jwt.map(|j| j.token),
        })
    }

    /// A stored task, or NotFound naming the field `task_id`.
    fn stored_task(&self, id: &str) -> Result<TaskRecord, RegistryError> {
        if id.is_empty() {
            return Err(invalid("task_id", "required"));
        }
        self.store
            .read()?
            .task(id)?
            .ok_or_else(|| RegistryError::not_found(format!("no task {id:?}")))
    }

    /// Why nothing may be issued for `t` at `now`, if so.
    fn task_closed(&self, t: &TaskRecord, now: i64) -> Option<String> {
        if let Some(at) = t.ended_at {
            return Some(format!(
                "task {} ended at {} ({}): its identity {} is killed",
                t.id,
                rfc3339(at),
                t.end_reason,
                t.spiffe_id
            ));
        }
        if now >= t.deadline {
            return Some(format!(
                "task {} passed its deadline at {}: its identity {} issues nothing",
                t.id,
                rfc3339(t.deadline),
                t.spiffe_id
            ));
        }
        self.kill_of_spiffe_id(&t.spiffe_id)
            .map(|k| format!("{} is killed (kill {}: {})", t.spiffe_id, k.id, k.reason))
    }

    /// Issues another X.509-SVID (and JWT-SVID) of a running task.
    pub fn mint_task_svid(
        &self,
        agent: &SpiffeId,
        task_id: &str,
        csr: &[u8],
        audience: &[String],
    ) -> Result<TaskSvid, RegistryError> {
        let now = now_unix();
        let task = self.stored_task(task_id)?;
        let (e, rec, grant) = self.entry_to_mint(agent, &task.entry_id, now)?;
        if e.task_ttl_max.is_none() {
            return Err(RegistryError::denied(format!(
                "entry {} no longer allows tasks (task_ttl_max was removed)",
                e.id
            )));
        }
        if let Some(why) = self.task_closed(&task, now) {
            return Err(RegistryError::denied(why));
        }
        let (chain, issued) = self.sign_task(&e, rec.as_ref(), &task, grant, csr, audience, now)?;
        let caller = Caller::agent(agent.clone());
        self.store.transact(|tx| {
            // Serialized with the task's end: a task ended meanwhile gets
            // nothing.
            match tx.task(task_id)? {
                Some(t) if t.running_at(now) => {}
                _ => {
                    return Err(RegistryError::denied(format!(
                        "task {task_id} ended meanwhile"
                    )));
                }
            }
            self.audit_task_issued(tx, &caller, agent, &task, &issued)
        })?;
        // A kill of the task's ID that committed after the check above
        // but scanned the audit trail before this record: revoke now.
        if self.any_kill() {
            self.revoke_raced(agent, &[IssuedRef::of(&issued.x509)])?;
        }
        self.note_entries_used([e.id.as_str()]);
        Ok(TaskSvid {
            task,
            chain,
            jwt: issued.jwt.map(|j| j.token),
        })
    }

    /// Task `id`, if `agent` may mint for its entry (the agent checks which
    /// processes may use it).
    pub fn task_for_agent(&self, agent: &SpiffeId, id: &str) -> Result<TaskRecord, RegistryError> {
        let task = self.stored_task(id)?;
        self.check_task_agent(agent, &task)?;
        Ok(task)
    }

    /// Refuses an agent that neither started `task` nor is the parent of
    /// its entry.
    fn check_task_agent(&self, agent: &SpiffeId, task: &TaskRecord) -> Result<(), RegistryError> {
        if &task.agent_id == agent {
            return Ok(());
        }
        let parents = self.agent_parents(agent)?;
        let idx = self.entries.read().map_err(|_| poisoned())?;
        match idx.by_id.get(&task.entry_id) {
            Some(e) if !e.node && parents.contains(&e.parent_id) => Ok(()),
            _ => Err(RegistryError::denied(format!(
                "task {} is not under an entry of this agent",
                task.id
            ))),
        }
    }

    /// The workload's `EndTask`, through its agent.
    pub fn end_task_for_agent(
        &self,
        agent: &SpiffeId,
        id: &str,
    ) -> Result<TaskRecord, RegistryError> {
        let task = self.stored_task(id)?;
        self.check_task_agent(agent, &task)?;
        self.end_task(&Caller::agent(agent.clone()), id, end_reason::ENDED)
    }

    /// Ends task `id` (`reason`: see [`end_reason`]): one transaction
    /// marks it ended and kills its SPIFFE ID, with both audit records.
    pub fn end_task(
        &self,
        caller: &Caller,
        id: &str,
        reason: &str,
    ) -> Result<TaskRecord, RegistryError> {
        let now = now_unix();
        let mut kills = self.kills.write().map_err(|_| poisoned())?;
        let (task, kill) = self.store.transact(|tx| {
            let mut t = tx
                .task(id)?
                .ok_or_else(|| RegistryError::not_found(format!("no task {id:?}")))?;
            if let Some(at) = t.ended_at {
                return Err(RegistryError::precondition(format!(
                    "task {id} already ended at {} ({})",
                    rfc3339(at),
                    t.end_reason
                )));
            }
            let kill = KillRecord {
                id: new_entry_id(),
                target: KillTarget::SpiffeId(t.spiffe_id.clone()),
                reason: format!("task {} ({:?}) ended: {reason}", t.id, t.name),
                caller: caller.to_string(),
                created_at: now,
            };
            t.ended_at = Some(now);
            t.end_reason = reason.to_string();
            t.ended_by = caller.to_string();
            t.kill_id = kill.id.clone();
            tx.put_task(&t)?;
            append_audit(
                tx,
                caller,
                Event::TaskEnded {
                    task_id: t.id.clone(),
                    spiffe_id: t.spiffe_id.clone(),
                    reason: reason.to_string(),
                    kill_id: kill.id.clone(),
                },
            )?;
            put_kill_audited(tx, caller, &kill)?;
            Ok((t, kill))
        })?;
        kills.push(kill.clone());
        drop(kills);
        self.kill_in_force(caller, &kill)?;
        tracing::warn!(%caller, task = %task.id, spiffe_id = %task.spiffe_id, reason, "task ended");
        Ok(task)
    }

    /// Records the end of every running task past its deadline (reason
    /// `deadline`); returns how many. Nothing of such a task is valid any
    /// more (its SVIDs never outlive the deadline, minting refuses it), so
    /// no kill is made. Run periodically.
    pub fn end_tasks_past_deadline(&self) -> Result<usize, RegistryError> {
        let now = now_unix();
        let due: Vec<String> = self
            .store
            .read()?
            .tasks()?
            .into_iter()
            .filter(|t| t.ended_at.is_none() && t.deadline <= now)
            .map(|t| t.id)
            .collect();
        let caller = Caller::server(ServerTask::Expiry);
        let mut n = 0;
        for id in due {
            let ended = self.store.transact(|tx| {
                let Some(mut t) = tx.task(&id)? else {
                    return Ok(false);
                };
                if t.ended_at.is_some() {
                    return Ok(false);
                }
                t.ended_at = Some(now);
                t.end_reason = end_reason::DEADLINE.to_string();
                t.ended_by = caller.to_string();
                tx.put_task(&t)?;
                append_audit(
                    tx,
                    &caller,
                    Event::TaskEnded {
                        task_id: t.id.clone(),
                        spiffe_id: t.spiffe_id.clone(),
                        reason: end_reason::DEADLINE.to_string(),
                        kill_id: String::new(),
                    },
                )?;
                Ok(true)
            })?;
            if ended {
                tracing::info!(task = %id, "task reached its deadline");
                n += 1;
            }
        }
        self.lift_expired_task_kills(now)?;
        Ok(n)
    }

    /// Lifts the kills of ended tasks whose deadline passed at least
    /// [`TASK_KILL_GRACE`] before `now` (each with its `kill_lifted`
    /// record, caller `server (expiry)`); returns how many. Run with the
    /// deadline job.
    pub fn lift_expired_task_kills(&self, now: i64) -> Result<usize, RegistryError> {
        let in_force: std::collections::HashSet<String> = self
            .kills
            .read()
            .map_err(|_| poisoned())?
            .iter()
            .filter(|k| matches!(k.target, KillTarget::SpiffeId(_)))
            .map(|k| k.id.clone())
            .collect();
        if in_force.is_empty() {
            return Ok(0);
        }
        let due: Vec<String> = self
            .store
            .read()?
            .tasks()?
            .into_iter()
            .filter(|t| {
                t.ended_at.is_some()
                    && in_force.contains(&t.kill_id)
                    && t.deadline.saturating_add(TASK_KILL_GRACE) <= now
            })
            .map(|t| t.kill_id)
            .collect();
        let caller = Caller::server(ServerTask::Expiry);
        let mut n = 0;
        for kill in due {
            match self.lift_kill(&caller, &kill) {
                Ok(_) => n += 1,
                // Another server sharing the datastore lifted it first.
                Err(RegistryError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(n)
    }

    /// Tasks, running and ended, newest first.
    pub fn list_tasks(&self, q: &TaskQuery) -> Result<Vec<TaskRecord>, RegistryError> {
        let mut v: Vec<TaskRecord> = self
            .store
            .read()?
            .tasks()?
            .into_iter()
            .filter(|t| {
                q.spiffe_id
                    .as_ref()
                    .is_none_or(|id| &t.spiffe_id == id || &t.entry_spiffe_id == id)
            })
            .collect();
        v.sort_by(|a, b| {
            b.started_at
                .cmp(&a.started_at)
                .then_with(|| a.id.cmp(&b.id))
        });
        Ok(v)
    }
}

#[cfg(test)]
mod unit {
    use super::super::tests::{admin, attest, entry, id, temp_state};
    use super::*;
    use sigil_core::x509::new_key_and_csr;

    #[test]
    fn an_ended_task_stays_killed_until_its_deadline_passes_then_the_kill_is_lifted() {
        let t = temp_state();
        let s = &t.state;
        let agent = "spiffe://example.org/agent";
        attest(s, agent);
        let mut pb = entry(agent, "spiffe://example.org/w");
        pb.x509_svid_ttl = 300;
        pb.task_ttl_max = 60;
        let e = s.create_entry(&admin(), pb).unwrap();
        let (csr, _) = new_key_and_csr().unwrap();
        let started = s
            .start_task(&id(agent), &e.id, "job", 3600, &csr, &[])
            .unwrap();
        let task = &started.task;
        assert!(
            task.deadline - task.started_at <= 60,
            "capped at task_ttl_max"
        );
        let ended = s
            .end_task(&admin(), &task.id, end_reason::OPERATOR)
            .unwrap();
        let has_kill = |s: &ServerState| {
            s.list_kills()
                .unwrap()
                .iter()
                .any(|k| k.id == ended.kill_id)
        };
        assert!(has_kill(s));
        let at = ended.deadline + TASK_KILL_GRACE;
        assert_eq!(s.lift_expired_task_kills(at - 1).unwrap(), 0);
        assert!(has_kill(s), "in force until the grace has passed");
        assert_eq!(s.lift_expired_task_kills(at).unwrap(), 1);
        assert!(!has_kill(s), "lifted");
        assert_eq!(s.lift_expired_task_kills(at + 1000).unwrap(), 0, "once");
        let (csr, _) = new_key_and_csr().unwrap();
        let err = s
            .mint_task_svid(&id(agent), &task.id, &csr, &[])
            .err()
            .unwrap();
        assert!(err.to_string().contains("ended"), "{err}");
    }
}
