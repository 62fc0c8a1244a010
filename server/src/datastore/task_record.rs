//! The persisted record of a task-scoped identity (see
//! `server/src/state/tasks.rs`): which entry and agent it belongs to, its
//! SPIFFE ID, deadline and how it ended. Stored as JSON text in both
//! backends (redb table `tasks`, PostgreSQL table `tasks`), like the other
//! records; a stored task that does not parse is [`StoreError::Corrupt`].

use serde::{Deserialize, Serialize};
use sigil_core::SpiffeId;

use super::StoreError;

/// A task, running or ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskRecord {
    /// Server-assigned ID (the last segment of its SPIFFE ID).
    pub id: String,
    /// The workload's name for it.
    pub name: String,
    /// The entry it was started under.
    pub entry_id: String,
    /// That entry's SPIFFE ID.
    pub entry_spiffe_id: SpiffeId,
    /// The entry's owner at the start.
    pub owner: String,
    /// The agent that started it.
    pub agent_id: SpiffeId,
    /// The task's own SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// Unix seconds.
    pub started_at: i64,
    /// Nothing is issued for it from this Unix time on.
    pub deadline: i64,
    /// When it ended (`None` while running).
    pub ended_at: Option<i64>,
    /// `ended`, `operator` or `deadline` (empty while running).
    pub end_reason: String,
    /// Who started it, as shown in logs.
    pub started_by: String,
    /// Who ended it (empty while running).
    pub ended_by: String,
    /// The kill of its SPIFFE ID made when it ended (empty if none).
    pub kill_id: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredTask {
    id: String,
    name: String,
    entry_id: String,
    entry_spiffe_id: String,
    owner: String,
    agent_id: String,
    spiffe_id: String,
    started_at: i64,
    deadline: i64,
    ended_at: i64,
    end_reason: String,
    started_by: String,
    ended_by: String,
    kill_id: String,
}

impl TaskRecord {
    /// Whether the task may still be issued SVIDs at `now`.
    pub fn running_at(&self, now: i64) -> bool {
        self.ended_at.is_none() && now < self.deadline
    }

    /// The backends' encoding (JSON).
    pub fn encode(&self) -> Result<Vec<u8>, StoreError> {
        serde_json::to_vec(&StoredTask {
            id: self.id.clone(),
            name: self.name.clone(),
            entry_id: self.entry_id.clone(),
            entry_spiffe_id: self.entry_spiffe_id.to_string(),
            owner: self.owner.clone(),
            agent_id: self.agent_id.to_string(),
            spiffe_id: self.spiffe_id.to_string(),
            started_at: self.started_at,
            deadline: self.deadline,
            ended_at: self.ended_at.unwrap_or(0),
            end_reason: self.end_reason.clone(),
            started_by: self.started_by.clone(),
            ended_by: self.ended_by.clone(),
            kill_id: self.kill_id.clone(),
        })
        .map_err(|e| StoreError::Backend(e.to_string()))
    }

    /// Parses a stored task; its IDs must parse.
    pub fn decode(key: &str, bytes: &[u8]) -> Result<Self, StoreError> {
        let bad = |e: String| StoreError::Corrupt(format!("task {key:?}: {e}"));
        let s: StoredTask = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        let id = |what: &str, v: &str| {
            SpiffeId::new(v).map_err(|e| StoreError::Corrupt(format!("task {key:?}: {what}: {e}")))
        };
        Ok(Self {
            entry_spiffe_id: id("entry_spiffe_id", &s.entry_spiffe_id)?,
            agent_id: id("agent_id", &s.agent_id)?,
            spiffe_id: id("spiffe_id", &s.spiffe_id)?,
            id: s.id,
            name: s.name,
            entry_id: s.entry_id,
            owner: s.owner,
            started_at: s.started_at,
            deadline: s.deadline,
            ended_at: (s.ended_at != 0).then_some(s.ended_at),
            end_reason: s.end_reason,
            started_by: s.started_by,
            ended_by: s.ended_by,
            kill_id: s.kill_id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_round_trips_and_a_bad_id_is_corrupt() {
        let t = TaskRecord {
            id: "t1".into(),
            name: "summarise".into(),
            entry_id: "e1".into(),
            entry_spiffe_id: SpiffeId::new("spiffe://example.org/w").unwrap(),
            owner: "team".into(),
            agent_id: SpiffeId::new("spiffe://example.org/sigil/agent/a").unwrap(),
            spiffe_id: SpiffeId::new("spiffe://example.org/w/task/t1").unwrap(),
            started_at: 1,
            deadline: 10,
            ended_at: Some(5),
            end_reason: "ended".into(),
            started_by: "agent".into(),
            ended_by: "agent".into(),
            kill_id: "k1".into(),
        };
        assert_eq!(TaskRecord::decode("t1", &t.encode().unwrap()).unwrap(), t);
        assert!(!t.running_at(2));
        let bad = String::from_utf8(t.encode().unwrap())
            .unwrap()
            .replace("spiffe://example.org/w/task/t1", "nope");
        assert!(matches!(
            TaskRecord::decode("t1", bad.as_bytes()),
            Err(StoreError::Corrupt(_))
        ));
    }
}
