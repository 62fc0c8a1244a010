//! Context claims of JWT-SVIDs, besides the registered ones the signer
//! sets (`sub`, `aud`, `exp`, `iat`, `jti`, `iss`):
//!
//! - the entry's static claims (`--jwt-claim KEY=VALUE`), as strings;
//! - `sigil_owner`: the entry's owner, when it has one;
//! - with `jwt_attestation_claims = true`, `sigil_attestation`: what the
//!   server verified about the node and the workload —
//!   `{"agent_id", "node_attestation" ("join_token" | "x509pop" | "tpm"),
//!   "tpm_ek_hash"? , "x509pop_subject_cn"?, "x509pop_ca_fingerprint"?,
//!   "workload_selector_types": ["unix:uid", ...]}`. The selector types are
//!   the entry's (`type:key`, sorted, deduplicated): every one of them had
//!   to match the workload for the agent to serve the entry.
//!
//! Entry claim names are validated when the entry is stored (no registered
//! name, no `sigil_` prefix), so these never collide.

use serde_json::{Map, Value, json};
use sigil_core::entry::Entry;

use super::ServerState;
use crate::datastore::AgentRecord;

impl ServerState {
    /// The claims added to a JWT-SVID of `e` minted for the agent `rec`.
    pub(super) fn context_claims(
        &self,
        e: &Entry,
        rec: Option<&AgentRecord>,
    ) -> Map<String, Value> {
        let mut m: Map<String, Value> = e
            .jwt_claims
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        if !e.owner.is_empty() {
            m.insert("sigil_owner".into(), Value::String(e.owner.clone()));
        }
        if self.cfg.governance.jwt_attestation_claims
            && let Some(rec) = rec
        {
            m.insert("sigil_attestation".into(), attestation_claim(e, rec));
        }
        m
    }
}

/// The `sigil_attestation` claim.
fn attestation_claim(e: &Entry, rec: &AgentRecord) -> Value {
    let mut a = Map::new();
    a.insert("agent_id".into(), json!(rec.spiffe_id.to_string()));
    a.insert("node_attestation".into(), json!(rec.attestation.as_str()));
    for s in &rec.selectors {
        let text = s.to_string();
        let field = if let Some(v) = text.strip_prefix("tpm:ek-hash:") {
            Some(("tpm_ek_hash", v.to_string()))
        } else if let Some(v) = text.strip_prefix("x509pop:subject:cn:") {
            Some(("x509pop_subject_cn", v.to_string()))
        } else {
            text.strip_prefix("x509pop:ca:fingerprint:")
                .map(|v| ("x509pop_ca_fingerprint", v.to_string()))
        };
        if let Some((k, v)) = field {
            a.entry(k).or_insert(json!(v));
        }
    }
    let mut types: Vec<String> = e
        .selectors
        .iter()
        .filter_map(|s| {
            let text = s.to_string();
            let mut parts = text.splitn(3, ':');
            match (parts.next(), parts.next()) {
                (Some(t), Some(k)) => Some(format!("{t}:{k}")),
                _ => None,
            }
        })
        .collect();
    types.sort();
    types.dedup();
    a.insert("workload_selector_types".into(), json!(types));
    Value::Object(a)
}
