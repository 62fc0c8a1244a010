//! What an audit record says happened.
//!
//! The JSON form of every type here is part of the hashed record encoding
//! ([`super::Record::canonical_encoding`]), so field names, field order and
//! tags are a stable format: add variants and types, never rename or reorder
//! fields of existing ones. Objects are tagged by `"kind"` (events) or
//! `"type"` (kill targets); unknown fields are rejected so that an edited
//! record never parses silently.

use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;
use spiffe::{SpiffeId, TrustDomain};

use super::Digest;
use crate::caller::serde_text;
use crate::selector::Selector;

/// One auditable change or issuance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
pub enum Event {
    /// A node proved its identity and became (or again became) an agent.
    NodeAttested {
        /// Node attestor name as used in agent IDs (`join_token`, `x509pop`, `tpm`).
        attestation_type: String,
        /// A short, secret-free summary of the evidence (token hash prefix,
        /// certificate fingerprint, EK hash).
        evidence: String,
        /// The agent ID the node was given.
        #[serde(with = "serde_text")]
        agent_id: SpiffeId,
        /// The node's socket address, if known.
        peer: Option<String>,
    },
    /// A node attestation was refused.
    NodeAttestationFailed {
        /// Node attestor name the node claimed.
        attestation_type: String,
        /// A short, secret-free summary of the evidence presented.
        evidence: String,
        /// The node's socket address, if known.
        peer: Option<String>,
        /// Why the attestation was refused.
        reason: String,
    },
    /// An agent X.509-SVID was issued at attestation.
    AgentSvidIssued {
        /// The agent.
        #[serde(with = "serde_text")]
        agent_id: SpiffeId,
        /// Certificate serial number, lowercase hex.
        serial: String,
        /// Certificate `notAfter`, Unix seconds.
        expires_at: i64,
    },
    /// An agent renewed its own X.509-SVID.
    AgentSvidRenewed {
        /// The agent.
        #[serde(with = "serde_text")]
        agent_id: SpiffeId,
        /// Serial of the new certificate, lowercase hex.
        serial: String,
        /// `notAfter` of the new certificate, Unix seconds.
        expires_at: i64,
    },
    /// One mint batch of workload X.509-SVIDs, signed for one agent.
    X509SvidsIssued {
        /// The agent that asked for the batch.
        #[serde(with = "serde_text")]
        agent_id: SpiffeId,
        /// Every SVID signed in the batch.
        svids: Vec<IssuedX509Svid>,
    },
    /// A JWT-SVID was signed.
    JwtSvidIssued {
        /// The agent that asked for it.
        #[serde(with = "serde_text")]
        agent_id: SpiffeId,
        /// The entry it was issued under.
        entry_id: String,
        /// Its `sub`.
        #[serde(with = "serde_text")]
        spiffe_id: SpiffeId,
        /// Its `aud`.
        audience: Vec<String>,
        /// Its `jti`.
        jti: String,
        /// Its `exp`, Unix seconds.
        expires_at: i64,
    },
    /// A WIT-SVID was signed (it has no audience; it binds a workload key).
    WitSvidIssued {
        /// The agent that asked for it.
        #[serde(with = "serde_text")]
        agent_id: SpiffeId,
        /// The entry it was issued under.
        entry_id: String,
        /// Its `sub`.
        #[serde(with = "serde_text")]
        spiffe_id: SpiffeId,
        /// Its `jti`.
        jti: String,
        /// Its `exp`, Unix seconds.
        expires_at: i64,
        /// The RFC 7638 SHA-256 thumbprint of the workload key it binds
        /// (`cnf.jwk`), base64url: which key a WIT shown later was for.
        cnf_jkt: String,
    },
    /// A registration entry was created.
    EntryCreated {
        /// The new entry's ID.
        entry_id: String,
        /// The entry's SPIFFE ID.
        #[serde(with = "serde_text")]
        spiffe_id: SpiffeId,
        /// The entry's parent ID.
        #[serde(with = "serde_text")]
        parent_id: SpiffeId,
        /// All fields of the entry as created. Object keys are encoded
        /// sorted, whatever order the value holds them in.
        #[serde(serialize_with = "sorted_value")]
        entry: Value,
    },
    /// A registration entry was changed.
    EntryUpdated {
        /// The entry's ID.
        entry_id: String,
        /// The entry's SPIFFE ID after the change.
        #[serde(with = "serde_text")]
        spiffe_id: SpiffeId,
        /// The entry's parent ID after the change.
        #[serde(with = "serde_text")]
        parent_id: SpiffeId,
        /// All fields of the entry after the change (keys encoded sorted).
        #[serde(serialize_with = "sorted_value")]
        entry: Value,
    },
    /// A registration entry was deleted.
    EntryDeleted {
        /// The entry's ID.
        entry_id: String,
        /// The SPIFFE ID it had.
        #[serde(with = "serde_text")]
        spiffe_id: SpiffeId,
        /// The parent ID it had.
        #[serde(with = "serde_text")]
        parent_id: SpiffeId,
    },
    /// An agent's record was removed; it must attest again.
    AgentEvicted {
        /// The agent.
        #[serde(with = "serde_text")]
        agent_id: SpiffeId,
    },
    /// An agent was banned; it may not attest again until unbanned.
    AgentBanned {
        /// The agent.
        #[serde(with = "serde_text")]
        agent_id: SpiffeId,
    },
    /// A kill rule was created.
    KillCreated {
        /// The kill's ID.
        kill_id: String,
        /// What it stops.
        target: KillTarget,
        /// The operator's `--reason`.
        reason: String,
    },
    /// A kill rule was lifted.
    KillLifted {
        /// The kill's ID.
        kill_id: String,
        /// What it had stopped.
        target: KillTarget,
    },
    /// A join token was generated. The token itself is never recorded.
    JoinTokenGenerated {
        /// The SPIFFE ID the token's agent will get, if one was fixed.
        #[serde(with = "serde_text::option")]
        spiffe_id: Option<SpiffeId>,
        /// When the token expires, Unix seconds.
        expires_at: i64,
        /// [`join_token_fingerprint`] of the token.
        token_hash: String,
    },
    /// A join token was consumed by a node attestation.
    JoinTokenUsed {
        /// [`join_token_fingerprint`] of the token.
        token_hash: String,
        /// The agent ID the node was given.
        #[serde(with = "serde_text")]
        agent_id: SpiffeId,
    },
    /// A federated trust domain's bundle was set (by an operator or by a
    /// federation refresh).
    FederatedBundleSet {
        /// The federated trust domain.
        #[serde(with = "serde_text")]
        trust_domain: TrustDomain,
        /// The bundle's `spiffe_sequence`, if it has one.
        sequence: Option<u64>,
    },
    /// A federated trust domain's bundle was deleted.
    FederatedBundleDeleted {
        /// The federated trust domain.
        #[serde(with = "serde_text")]
        trust_domain: TrustDomain,
    },
    /// A signing key was generated and published ahead of use.
    KeyPrepared {
        /// Which key.
        key_kind: KeyKind,
        /// Its key ID (JWKS `kid`, or the CA's subject key identifier).
        key_id: String,
    },
    /// A prepared signing key became the active one.
    KeyActivated {
        /// Which key.
        key_kind: KeyKind,
        /// Its key ID.
        key_id: String,
    },
    /// An agent asked for SVIDs of an entry that requires approval, and
    /// holds no grant: a pending approval request was opened.
    ApprovalRequested {
        /// The request's ID.
        request_id: String,
        /// The entry.
        entry_id: String,
        /// The entry's SPIFFE ID.
        #[serde(with = "serde_text")]
        spiffe_id: SpiffeId,
        /// The agent the request is bound to.
        #[serde(with = "serde_text")]
        agent_id: SpiffeId,
    },
    /// An approver granted an approval request until `expires_at`.
    ApprovalGranted {
        /// The request's ID.
        request_id: String,
        /// The entry.
        entry_id: String,
        /// The entry's SPIFFE ID.
        #[serde(with = "serde_text")]
        spiffe_id: SpiffeId,
        /// The agent the grant is bound to.
        #[serde(with = "serde_text")]
        agent_id: SpiffeId,
        /// When the grant ends, Unix seconds.
        expires_at: i64,
    },
    /// An approver denied an approval request.
    ApprovalDenied {
        /// The request's ID.
        request_id: String,
        /// The entry.
        entry_id: String,
        /// The entry's SPIFFE ID.
        #[serde(with = "serde_text")]
        spiffe_id: SpiffeId,
        /// The agent the request was bound to.
        #[serde(with = "serde_text")]
        agent_id: SpiffeId,
    },
    /// A workload started a task under an entry that allows tasks: the
    /// task's identity is `spiffe_id` until `deadline` at the latest.
    TaskStarted {
        /// The task's ID.
        task_id: String,
        /// Its name, as the workload gave it.
        name: String,
        /// The entry it runs under.
        entry_id: String,
        /// The task's SPIFFE ID.
        #[serde(with = "serde_text")]
        spiffe_id: SpiffeId,
        /// The agent that asked.
        #[serde(with = "serde_text")]
        agent_id: SpiffeId,
        /// Its deadline, Unix seconds.
        deadline: i64,
    },
    /// A task ended: `reason` is `ended` (the workload's EndTask),
    /// `operator` or `deadline`; `kill_id` names the kill of its SPIFFE ID
    /// (empty at the deadline, past which none of its SVIDs is valid).
    TaskEnded {
        /// The task's ID.
        task_id: String,
        /// The task's SPIFFE ID.
        #[serde(with = "serde_text")]
        spiffe_id: SpiffeId,
        /// Why it ended.
        reason: String,
        /// The kill withdrawing its identity, if any.
        kill_id: String,
    },
    /// A workload exchanged a subject token for a delegation token (token
    /// exchange, `sigil.delegation`). The tokens themselves are never
    /// recorded.
    DelegationIssued {
        /// The agent that forwarded the exchange.
        #[serde(with = "serde_text")]
        agent_id: SpiffeId,
        /// The entry the workload attested to.
        entry_id: String,
        /// The actor: the entry's SPIFFE ID.
        #[serde(with = "serde_text")]
        spiffe_id: SpiffeId,
        /// The token's `sub`: on whose behalf the actor acts.
        subject: String,
        /// The issuer of the original subject token.
        subject_issuer: String,
        /// The earlier actors of the chain (`act` of the subject token),
        /// most recent first.
        prior_actors: Vec<String>,
        /// Its `aud`.
        audience: Vec<String>,
        /// Its scopes.
        scope: Vec<String>,
        /// Its `jti`.
        jti: String,
        /// Its `exp`, Unix seconds.
        expires_at: i64,
    },
    /// A token exchange was refused.
    DelegationRefused {
        /// The agent that forwarded the exchange.
        #[serde(with = "serde_text")]
        agent_id: SpiffeId,
        /// The entry the workload attested to, as the agent named it.
        entry_id: String,
        /// The entry's SPIFFE ID, when the entry is known.
        #[serde(with = "serde_text::option")]
        spiffe_id: Option<SpiffeId>,
        /// Why.
        reason: String,
    },
    /// A signed statement that the chain's head was record `seq` with hash
    /// `head_hash`. A checkpoint record must directly follow the record it
    /// names; see [`super::AuditKey::sign_checkpoint`] for the signed bytes.
    Checkpoint {
        /// Sequence number of the record named.
        seq: u64,
        /// That record's hash.
        head_hash: Digest,
        /// [`super::AuditPublicKey::key_id`] of the signing key.
        key_id: String,
        /// Ed25519 signature, lowercase hex (128 digits).
        signature: String,
    },
    /// Records `1..=up_to_seq` (or from the previous prune) were deleted by
    /// retention. `head_hash` is the hash of record `up_to_seq`, which the
    /// first retained record (a checkpoint) links to.
    Pruned {
        /// Last deleted sequence number.
        up_to_seq: u64,
        /// Hash of that record.
        head_hash: Digest,
    },
}

impl Event {
    /// The event's `"kind"` tag, e.g. `"entry_created"`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::NodeAttested { .. } => "node_attested",
            Self::NodeAttestationFailed { .. } => "node_attestation_failed",
            Self::AgentSvidIssued { .. } => "agent_svid_issued",
            Self::AgentSvidRenewed { .. } => "agent_svid_renewed",
            Self::X509SvidsIssued { .. } => "x509_svids_issued",
            Self::JwtSvidIssued { .. } => "jwt_svid_issued",
            Self::WitSvidIssued { .. } => "wit_svid_issued",
            Self::EntryCreated { .. } => "entry_created",
            Self::EntryUpdated { .. } => "entry_updated",
            Self::EntryDeleted { .. } => "entry_deleted",
            Self::AgentEvicted { .. } => "agent_evicted",
            Self::AgentBanned { .. } => "agent_banned",
            Self::KillCreated { .. } => "kill_created",
            Self::KillLifted { .. } => "kill_lifted",
            Self::JoinTokenGenerated { .. } => "join_token_generated",
            Self::JoinTokenUsed { .. } => "join_token_used",
            Self::FederatedBundleSet { .. } => "federated_bundle_set",
            Self::FederatedBundleDeleted { .. } => "federated_bundle_deleted",
            Self::KeyPrepared { .. } => "key_prepared",
            Self::KeyActivated { .. } => "key_activated",
            Self::ApprovalRequested { .. } => "approval_requested",
            Self::ApprovalGranted { .. } => "approval_granted",
            Self::ApprovalDenied { .. } => "approval_denied",
            Self::TaskStarted { .. } => "task_started",
            Self::TaskEnded { .. } => "task_ended",
            Self::DelegationIssued { .. } => "delegation_issued",
            Self::DelegationRefused { .. } => "delegation_refused",
            Self::Checkpoint { .. } => "checkpoint",
            Self::Pruned { .. } => "pruned",
        }
    }
}

/// One X.509-SVID of a mint batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuedX509Svid {
    /// The entry it was issued under.
    pub entry_id: String,
    /// Its URI SAN.
    #[serde(with = "serde_text")]
    pub spiffe_id: SpiffeId,
    /// Its serial number, lowercase hex.
    pub serial: String,
    /// Its `notAfter`, Unix seconds.
    pub expires_at: i64,
}

/// What a kill stops.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
pub enum KillTarget {
    /// Every identity with this SPIFFE ID, on every agent.
    SpiffeId {
        /// The killed SPIFFE ID.
        #[serde(with = "serde_text")]
        spiffe_id: SpiffeId,
    },
    /// One registration entry.
    Entry {
        /// The killed entry's ID.
        entry_id: String,
    },
    /// A whole node: the agent and every identity it serves.
    Agent {
        /// The killed agent's ID.
        #[serde(with = "serde_text")]
        agent_id: SpiffeId,
    },
    /// Every entry that has this selector.
    Selector {
        /// The selector in `type:key:value` form. Kept as text so that a
        /// later, stricter selector grammar never makes an old audit log
        /// unreadable.
        selector: String,
    },
}

impl KillTarget {
    /// A selector target.
    pub fn selector(selector: &Selector) -> Self {
        Self::Selector {
            selector: selector.to_string(),
        }
    }
}

/// Which signing key a key event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum KeyKind {
    /// The X.509 CA key (`"x509-ca"`).
    #[serde(rename = "x509-ca")]
    X509Ca,
    /// The JWT-SVID signing key (`"jwt"`).
    #[serde(rename = "jwt")]
    Jwt,
}

/// Domain-separation prefix of [`join_token_fingerprint`].
const JOIN_TOKEN_DOMAIN: &[u8] = b"sigil-join-token-v1\0";

/// What the audit trail records instead of a join token: the first 16 hex
/// digits of `SHA-256("sigil-join-token-v1\0" || token)`. Enough to match
/// the generation and use of one token; since tokens are random secrets of
/// high entropy, the prefix reveals nothing usable about the token.
pub fn join_token_fingerprint(token: &str) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(JOIN_TOKEN_DOMAIN);
    ctx.update(token.as_bytes());
    let mut hex = hex::encode(ctx.finish());
    hex.truncate(16);
    hex
}

/// Serializes a JSON value with the keys of every object in sorted order,
/// so the encoding does not depend on insertion order (serde_json's
/// `preserve_order` feature) and matches what a parser reads back.
fn sorted_value<S: Serializer>(v: &Value, s: S) -> Result<S::Ok, S::Error> {
    sorted(v).serialize(s)
}

fn sorted(v: &Value) -> Value {
    match v {
        Value::Object(map) => {
            let mut members: Vec<(&String, &Value)> = map.iter().collect();
            members.sort_by(|a, b| a.0.cmp(b.0));
            Value::Object(
                members
                    .into_iter()
                    .map(|(k, v)| (k.clone(), sorted(v)))
                    .collect(),
            )
        }
        Value::Array(items) => Value::Array(items.iter().map(sorted).collect()),
        other => other.clone(),
    }
}
