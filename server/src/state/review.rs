//! The access review: every entry and agent that needs an operator's
//! attention, each with the reasons why (stable snake_case codes, so an
//! identity-governance tool can ingest them).
//!
//! Entry reasons: `never_used`, `unused_for_period`, `expired`, `expiring`,
//! `no_owner`, `parent_agent_gone` (no attested agent or node alias has the
//! parent ID), `parent_agent_killed`, `parent_agent_banned`,
//! `ttl_above_max` (X.509- or JWT-SVID TTL above `review_max_ttl`).
//! Agent reasons: `never_seen`, `not_seen_for_period`, `join_token_only`,
//! `banned`, `killed`.

use std::collections::HashMap;

use sigil_core::{SpiffeId, now_unix};

use super::ServerState;
use crate::datastore::{AgentRecord, AttestationType};
use crate::error::RegistryError;

/// The review's periods.
#[derive(Debug, Clone, Copy)]
pub struct ReviewQuery {
    /// Flag entries not used (agents not seen) for this long.
    pub unused_for: std::time::Duration,
    /// Flag entries expiring within this long.
    pub expiring_within: std::time::Duration,
}

/// One flagged entry.
#[derive(Debug, Clone)]
pub struct EntryReview {
    pub entry: std::sync::Arc<sigil_core::entry::Entry>,
    pub reasons: Vec<&'static str>,
    /// When an SVID was last issued under it (minute resolution).
    pub last_used_at: Option<i64>,
}

/// One flagged agent.
#[derive(Debug, Clone)]
pub struct AgentReview {
    pub agent: AgentRecord,
    pub reasons: Vec<&'static str>,
    /// When it last called the server (minute resolution).
    pub last_seen_at: Option<i64>,
}

fn secs(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

impl ServerState {
    /// Entries with at least one reason, in `list_entries` order.
    pub fn review_entries(&self, q: &ReviewQuery) -> Result<Vec<EntryReview>, RegistryError> {
        let now = now_unix();
        let agents: HashMap<SpiffeId, AgentRecord> = self
            .store
            .read()?
            .agents()?
            .into_iter()
            .map(|a| (a.spiffe_id.clone(), a))
            .collect();
        let entries = self.list_entries()?;
        let aliases: Vec<SpiffeId> = entries
            .iter()
            .filter(|e| e.node)
            .map(|e| e.spiffe_id.clone())
            .collect();
        let max_ttl = self.cfg.governance.review_max_ttl;
        let mut out = Vec::new();
        for e in entries {
            let mut reasons = Vec::new();
            let last_used_at = self.entry_last_used(&e.id);
            if !e.node {
                match last_used_at {
                    None => reasons.push("never_used"),
                    Some(t) if now.saturating_sub(t) >= secs(q.unused_for) => {
                        reasons.push("unused_for_period")
                    }
                    Some(_) => {}
                }
            }
            match e.expires_at {
                Some(t) if t <= now => reasons.push("expired"),
                Some(t) if t - now <= secs(q.expiring_within) => reasons.push("expiring"),
                _ => {}
            }
            if e.owner.trim().is_empty() {
                reasons.push("no_owner");
            }
            if !e.node {
                match agents.get(&e.parent_id) {
                    Some(a) => {
                        if a.banned {
                            reasons.push("parent_agent_banned");
                        }
                        if self.kill_of_agent(&a.spiffe_id).is_some() {
                            reasons.push("parent_agent_killed");
                        }
                    }
                    None if aliases.contains(&e.parent_id) => {}
                    None => reasons.push("parent_agent_gone"),
                }
            }
            let x509 = e.x509_svid_ttl.unwrap_or(self.cfg.default_x509_svid_ttl);
            let jwt = e.jwt_svid_ttl.unwrap_or(self.cfg.default_jwt_svid_ttl);
            if !e.node && (x509 > max_ttl || jwt > max_ttl) {
                reasons.push("ttl_above_max");
            }
            if !reasons.is_empty() {
                out.push(EntryReview {
                    entry: e,
                    reasons,
                    last_used_at,
                });
            }
        }
        Ok(out)
    }

    /// Agents with at least one reason, sorted by ID.
    pub fn review_agents(&self, q: &ReviewQuery) -> Result<Vec<AgentReview>, RegistryError> {
        let now = now_unix();
        let mut out = Vec::new();
        for a in self.list_agents()? {
            let mut reasons = Vec::new();
            let last_seen_at = self.agent_last_seen(&a.spiffe_id.to_string());
            match last_seen_at {
                None => reasons.push("never_seen"),
                Some(t) if now.saturating_sub(t) >= secs(q.unused_for) => {
                    reasons.push("not_seen_for_period")
                }
                Some(_) => {}
            }
            if a.attestation == AttestationType::JoinToken {
                reasons.push("join_token_only");
            }
            if a.banned {
                reasons.push("banned");
            }
            if self.kill_of_agent(&a.spiffe_id).is_some() {
                reasons.push("killed");
            }
            if !reasons.is_empty() {
                out.push(AgentReview {
                    agent: a,
                    reasons,
                    last_seen_at,
                });
            }
        }
        Ok(out)
    }
}
