//! Last-activity tracking for access reviews: per entry, when the server
//! last issued an SVID under it; per agent, when it last called the server
//! (every authenticated call and every sync wake-up counts).
//!
//! Minting must not slow down for this, so marks live in memory and move
//! at most once a minute per entry or agent ([`RESOLUTION`]); the marks
//! that moved are written by [`ServerState::flush_usage`] in one batch
//! transaction, which the server runs once a minute and at shutdown. A
//! crash loses at most the last minute of marks, which only makes a review
//! a little more cautious ("unused for" looks a minute longer).

use std::collections::HashMap;
use std::sync::Mutex;

use sigil_core::now_unix;

use super::ServerState;
use crate::datastore::{UsageKind, UsageMark};
use crate::error::RegistryError;

/// Marks move at most this often (seconds) per entry or agent.
pub(super) const RESOLUTION: i64 = 60;

#[derive(Debug, Clone, Copy)]
struct Mark {
    at: i64,
    dirty: bool,
}

/// The in-memory marks.
#[derive(Default)]
pub(super) struct Usage {
    /// By kind, then ID (so that a lookup by `&str` allocates nothing: the
    /// mint path notes every entry of every batch).
    marks: Mutex<HashMap<UsageKind, HashMap<String, Mark>>>,
}

impl Usage {
    /// Loads the stored marks.
    pub(super) fn load(marks: Vec<UsageMark>) -> Self {
        Self {
            marks: Mutex::new(marks.into_iter().fold(HashMap::new(), |mut by_kind, m| {
                by_kind.entry(m.kind).or_insert_with(HashMap::new).insert(
                    m.id,
                    Mark {
                        at: m.at,
                        dirty: false,
                    },
                );
                by_kind
            })),
        }
    }

    /// Records activity at `now` for each of `ids`, unless its mark moved
    /// less than [`RESOLUTION`] ago. One lock for the whole batch.
    fn note<'a>(&self, kind: UsageKind, ids: impl IntoIterator<Item = &'a str>, now: i64) {
        let mut by_kind = self.marks.lock().unwrap_or_else(|p| p.into_inner());
        let marks = by_kind.entry(kind).or_default();
        for id in ids {
            match marks.get_mut(id) {
                Some(m) if now - m.at < RESOLUTION => {}
                Some(m) => {
                    *m = Mark {
                        at: now,
                        dirty: true,
                    }
                }
                None => {
                    marks.insert(
                        id.to_string(),
                        Mark {
                            at: now,
                            dirty: true,
                        },
                    );
                }
            }
        }
    }

    fn get(&self, kind: UsageKind, id: &str) -> Option<i64> {
        let marks = self.marks.lock().unwrap_or_else(|p| p.into_inner());
        marks.get(&kind).and_then(|m| m.get(id)).map(|m| m.at)
    }
}

impl ServerState {
    /// SVIDs were issued under these entries now.
    pub(super) fn note_entries_used<'a>(&self, ids: impl IntoIterator<Item = &'a str>) {
        self.usage.note(UsageKind::Entry, ids, now_unix());
    }

    /// The agent called the server (or its sync stream woke) now.
    pub(super) fn note_agent_seen(&self, agent: &str) {
        self.usage.note(UsageKind::Agent, [agent], now_unix());
    }

    /// When an SVID was last issued under entry `id` (minute resolution).
    pub fn entry_last_used(&self, id: &str) -> Option<i64> {
        self.usage.get(UsageKind::Entry, id)
    }

    /// When agent `id` was last seen (minute resolution).
    pub fn agent_last_seen(&self, id: &str) -> Option<i64> {
        self.usage.get(UsageKind::Agent, id)
    }

    /// A deleted entry's mark is dropped from memory (its stored mark is
    /// harmless: entry IDs are never reused).
    pub(super) fn forget_entry_usage(&self, id: &str) {
        let mut marks = self.usage.marks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = marks.get_mut(&UsageKind::Entry) {
            m.remove(id);
        }
    }

    /// Writes every mark that moved since the last flush, in one
    /// transaction; returns how many. On failure the marks stay dirty and
    /// the next flush tries again.
    pub fn flush_usage(&self) -> Result<usize, RegistryError> {
        let dirty: Vec<UsageMark> = {
            let marks = self.usage.marks.lock().unwrap_or_else(|p| p.into_inner());
            marks
                .iter()
                .flat_map(|(kind, by_id)| by_id.iter().map(move |(id, m)| (*kind, id, m)))
                .filter(|(_, _, m)| m.dirty)
                .map(|(kind, id, m)| UsageMark {
                    kind,
                    id: id.clone(),
                    at: m.at,
                })
                .collect()
        };
        if dirty.is_empty() {
            return Ok(0);
        }
        self.store.transact(|tx| {
            for m in &dirty {
                tx.put_usage_mark(m)?;
            }
            Ok(())
        })?;
        let mut marks = self.usage.marks.lock().unwrap_or_else(|p| p.into_inner());
        for m in &dirty {
            // Only if it did not move again meanwhile.
            if let Some(cur) = marks.get_mut(&m.kind).and_then(|k| k.get_mut(&m.id))
                && cur.at == m.at
            {
                cur.dirty = false;
            }
        }
        Ok(dirty.len())
    }
}
