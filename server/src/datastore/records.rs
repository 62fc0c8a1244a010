//! The records the server persists, as domain types: what a backend stores
//! and returns is always parsed and checked, never a wire message. Each has
//! a plain serde form (`Stored*`) that is the backends' encoding; decoding
//! a stored row that does not parse is [`StoreError::Corrupt`], never a
//! silently dropped field.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sigil_core::SpiffeId;
use sigil_core::selector::Selector;

use prost::Message;
use sigil_core::TrustDomain;
use sigil_core::audit;
use sigil_core::entry::Entry;
use sigil_proto::common::Entry as PbEntry;
use sigil_proto::common::FederatedBundle;

use super::StoreError;

/// How a node proved its identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AttestationType {
    /// A single-use join token.
    JoinToken,
    /// Proof of possession of a node certificate.
    X509Pop,
    /// TPM 2.0: EK, AK credential activation and a PCR quote.
    Tpm,
}

impl AttestationType {
    /// The name used on the wire, in selectors' context and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::JoinToken => "join_token",
            Self::X509Pop => "x509pop",
            Self::Tpm => "tpm",
        }
    }

    /// Whether the node proves itself again on every renewal (re-attests
    /// over the Attest stream) instead of renewing with `RenewAgent`.
    pub fn reattests(self) -> bool {
        !matches!(self, Self::JoinToken)
    }
}

impl fmt::Display for AttestationType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AttestationType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "join_token" => Ok(Self::JoinToken),
            "x509pop" => Ok(Self::X509Pop),
            "tpm" => Ok(Self::Tpm),
            other => Err(format!("unknown attestation type {other:?}")),
        }
    }
}

/// An attested agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentRecord {
    /// The agent's SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// How it attested.
    pub attestation: AttestationType,
    /// Node selectors the server derived from verified evidence.
    pub selectors: Vec<Selector>,
    /// Serial (hex) of the agent SVID issued last: the pinned credential.
    pub serial: String,
    /// Serial of the SVID the agent held before, accepted until the agent
    /// first presents `serial`.
    pub previous_serial: Option<String>,
    /// notAfter of the last issued agent SVID, Unix seconds.
    pub svid_expires_at: i64,
    /// Last successful attestation, Unix seconds.
    pub last_attested_at: i64,
    /// Banned: no renewal, sync, minting or re-attestation under this ID.
    pub banned: bool,
    /// First attestation of this record, Unix seconds.
    pub created_at: i64,
}

/// The stored form of [`AgentRecord`].
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredAgent {
    spiffe_id: String,
    attestation: String,
    selectors: Vec<String>,
    serial: String,
    #[serde(default)]
    previous_serial: Option<String>,
    svid_expires_at: i64,
    last_attested_at: i64,
    banned: bool,
    created_at: i64,
}

fn corrupt(what: &str, key: &str, e: impl fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what} {key:?}: {e}"))
}

impl AgentRecord {
    /// The backends' encoding (JSON).
    pub fn encode(&self) -> Result<Vec<u8>, StoreError> {
        serde_json::to_vec(&StoredAgent {
            spiffe_id: self.spiffe_id.to_string(),
            attestation: self.attestation.as_str().into(),
            selectors: self.selectors.iter().map(|s| s.to_string()).collect(),
            serial: self.serial.clone(),
            previous_serial: self.previous_serial.clone(),
            svid_expires_at: self.svid_expires_at,
            last_attested_at: self.last_attested_at,
            banned: self.banned,
            created_at: self.created_at,
        })
        .map_err(|e| StoreError::Backend(e.to_string()))
    }

    /// Parses a stored agent; every field must parse.
    pub fn decode(key: &str, bytes: &[u8]) -> Result<Self, StoreError> {
        let s: StoredAgent =
            serde_json::from_slice(bytes).map_err(|e| corrupt("agent record", key, e))?;
        let spiffe_id = SpiffeId::new(&s.spiffe_id)
            .map_err(|e| corrupt("agent record", key, format!("spiffe_id: {e}")))?;
        let attestation = s
            .attestation
            .parse()
            .map_err(|e| corrupt("agent record", key, format!("attestation: {e}")))?;
        let selectors = s
            .selectors
            .iter()
            .map(|t| {
                t.parse::<Selector>()
                    .map_err(|e| corrupt("agent record", key, format!("selector {t:?}: {e}")))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            spiffe_id,
            attestation,
            selectors,
            serial: s.serial,
            previous_serial: s.previous_serial.filter(|p| !p.is_empty()),
            svid_expires_at: s.svid_expires_at,
            last_attested_at: s.last_attested_at,
            banned: s.banned,
            created_at: s.created_at,
        })
    }

    /// Whether a certificate with `serial` is this agent's credential.
    pub fn accepts_serial(&self, serial: &str) -> bool {
        self.serial == serial || self.previous_serial.as_deref() == Some(serial)
    }

    /// The admin API's view of the record.
    pub fn to_proto(&self) -> sigil_proto::admin::Agent {
        sigil_proto::admin::Agent {
            spiffe_id: self.spiffe_id.to_string(),
            attestation_type: self.attestation.as_str().into(),
            selectors: self.selectors.iter().map(|s| s.to_string()).collect(),
            serial: self.serial.clone(),
            previous_serial: self.previous_serial.clone().unwrap_or_default(),
            svid_expires_at: self.svid_expires_at,
            last_attested_at: self.last_attested_at,
            banned: self.banned,
            created_at: self.created_at,
            last_seen_at: 0,
        }
    }
}

/// A stored join token. The token text itself is never stored, only its
/// SHA-256, which is the record's key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// The agent SPIFFE ID the token grants, if it names one.
    pub spiffe_id: Option<String>,
    /// Unix seconds after which the token is refused.
    pub expires_at: i64,
}

impl TokenRecord {
    /// The backends' encoding (JSON).
    pub fn encode(&self) -> Result<Vec<u8>, StoreError> {
        serde_json::to_vec(self).map_err(|e| StoreError::Backend(e.to_string()))
    }

    /// Parses a stored token; a named ID must be a SPIFFE ID.
    pub fn decode(key: &str, bytes: &[u8]) -> Result<Self, StoreError> {
        let t: Self = serde_json::from_slice(bytes).map_err(|e| corrupt("join token", key, e))?;
        if let Some(id) = &t.spiffe_id {
            SpiffeId::new(id).map_err(|e| corrupt("join token", key, format!("spiffe_id: {e}")))?;
        }
        Ok(t)
    }
}

/// One server's published *public* signing keys: its X.509 CA
/// certificates and JWT public keys (current and next), each with its
/// expiry. Private keys never leave the server's own disk; this record is
/// how every server of a cluster puts every other server's keys in the
/// bundle it serves. The key is the server's ID.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerKeysRecord {
    /// X.509 CA certificates (DER, standard base64), oldest first.
    pub x509: Vec<PublishedCa>,
    /// JWT public keys (JWK), oldest first.
    pub jwt: Vec<PublishedJwt>,
    /// WIT-SVID public keys (JWK, `use: wit-svid`), oldest first. Absent
    /// in records written before WIT-SVIDs.
    #[serde(default)]
    pub wit: Vec<PublishedJwt>,
    /// The cluster-wide bundle sequence number at publication: greater than
    /// every other server's record when written, so the bundle's sequence
    /// only grows whichever server changed its keys.
    pub sequence: u64,
    /// Unix seconds of the publication.
    pub published_at: i64,
}

/// A published X.509 CA certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedCa {
    /// DER, standard base64.
    pub der: String,
    /// Unix seconds after which it is dropped from the bundle.
    pub not_after: i64,
}

/// A published JWT public key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedJwt {
    /// The public JWK (it carries its `kid`).
    pub jwk: serde_json::Value,
    /// Unix seconds after which it is dropped from the bundle.
    pub not_after: i64,
}

impl ServerKeysRecord {
    /// The backends' encoding (JSON).
    pub fn encode(&self) -> Result<Vec<u8>, StoreError> {
        serde_json::to_vec(self).map_err(|e| StoreError::Backend(e.to_string()))
    }

    /// Parses a stored record; every certificate must be base64 and every
    /// JWK an object with a `kid`.
    pub fn decode(key: &str, bytes: &[u8]) -> Result<Self, StoreError> {
        use base64::Engine;
        let r: Self = serde_json::from_slice(bytes).map_err(|e| corrupt("server keys", key, e))?;
        for c in &r.x509 {
            base64::engine::general_purpose::STANDARD
                .decode(&c.der)
                .map_err(|e| corrupt("server keys", key, format!("x509: {e}")))?;
        }
        for j in &r.jwt {
            if j.jwk.get("kid").and_then(|k| k.as_str()).is_none() {
                return Err(corrupt("server keys", key, "jwt: a JWK without kid"));
            }
        }
        for j in &r.wit {
            if j.jwk.get("kid").and_then(|k| k.as_str()).is_none() {
                return Err(corrupt("server keys", key, "wit: a JWK without kid"));
            }
        }
        Ok(r)
    }

    /// The latest expiry of any key in the record (0 if none).
    pub fn not_after(&self) -> i64 {
        self.x509
            .iter()
            .map(|c| c.not_after)
            .chain(self.jwt.iter().map(|j| j.not_after))
            .chain(self.wit.iter().map(|j| j.not_after))
            .max()
            .unwrap_or(0)
    }
}

/// What a kill withdraws.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KillTarget {
    /// Every workload identity with this SPIFFE ID.
    SpiffeId(SpiffeId),
    /// One entry.
    Entry(String),
    /// A node: the agent and every identity it serves.
    Agent(SpiffeId),
    /// Every entry that has this selector.
    Selector(Selector),
}

impl KillTarget {
    /// Whether this kill withdraws entry `e`.
    pub fn covers(&self, e: &sigil_core::entry::Entry) -> bool {
        match self {
            Self::SpiffeId(id) => e.spiffe_id == *id,
            Self::Entry(id) => e.id == *id,
            Self::Agent(id) => e.parent_id == *id,
            Self::Selector(s) => e.selectors.contains(s),
        }
    }

    /// `kind` and value, as stored and shown.
    pub fn parts(&self) -> (&'static str, String) {
        match self {
            Self::SpiffeId(id) => ("spiffe_id", id.to_string()),
            Self::Entry(id) => ("entry", id.clone()),
            Self::Agent(id) => ("agent", id.to_string()),
            Self::Selector(s) => ("selector", s.to_string()),
        }
    }
}

impl fmt::Display for KillTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (k, v) = self.parts();
        write!(f, "{k} {v}")
    }
}

/// A kill: a durable rule that withdraws identities until it is lifted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KillRecord {
    /// Server-assigned ID.
    pub id: String,
    /// What it withdraws.
    pub target: KillTarget,
    /// Why (required).
    pub reason: String,
    /// Who created it, as shown in logs.
    pub caller: String,
    /// Unix seconds.
    pub created_at: i64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredKill {
    id: String,
    kind: String,
    value: String,
    reason: String,
    caller: String,
    created_at: i64,
}

impl KillRecord {
    /// The backends' encoding (JSON).
    pub fn encode(&self) -> Result<Vec<u8>, StoreError> {
        let (kind, value) = self.target.parts();
        serde_json::to_vec(&StoredKill {
            id: self.id.clone(),
            kind: kind.into(),
            value,
            reason: self.reason.clone(),
            caller: self.caller.clone(),
            created_at: self.created_at,
        })
        .map_err(|e| StoreError::Backend(e.to_string()))
    }

    /// Parses a stored kill; the target must parse.
    pub fn decode(key: &str, bytes: &[u8]) -> Result<Self, StoreError> {
        let s: StoredKill = serde_json::from_slice(bytes).map_err(|e| corrupt("kill", key, e))?;
        let bad = |e: String| corrupt("kill", key, e);
        let target = match s.kind.as_str() {
            "spiffe_id" => {
                KillTarget::SpiffeId(SpiffeId::new(&s.value).map_err(|e| bad(e.to_string()))?)
            }
            "entry" => KillTarget::Entry(s.value),
            "agent" => KillTarget::Agent(SpiffeId::new(&s.value).map_err(|e| bad(e.to_string()))?),
            "selector" => KillTarget::Selector(
                s.value
                    .parse()
                    .map_err(|e: sigil_core::selector::SelectorError| bad(e.to_string()))?,
            ),
            other => return Err(bad(format!("unknown target kind {other:?}"))),
        };
        Ok(Self {
            id: s.id,
            target,
            reason: s.reason,
            caller: s.caller,
            created_at: s.created_at,
        })
    }
}

/// Entries are stored as their protobuf form and validated again when read.
pub(super) fn encode_entry(e: &Entry) -> Vec<u8> {
    e.to_proto().encode_to_vec()
}

/// Federated bundles are stored as their protobuf form.
pub(super) fn encode_bundle(b: &FederatedBundle) -> Vec<u8> {
    b.encode_to_vec()
}

pub(super) fn decode_entry(key: &str, b: &[u8], td: &TrustDomain) -> Result<Entry, StoreError> {
    let pb = PbEntry::decode(b).map_err(|e| StoreError::Corrupt(format!("entry {key:?}: {e}")))?;
    Entry::from_proto(&pb, td).map_err(|e| StoreError::Corrupt(format!("entry {key:?}: {e}")))
}

pub(super) fn decode_audit(seq: u64, line: &str) -> Result<audit::Record, StoreError> {
    let r = audit::Record::from_jsonl_line(line)
        .map_err(|e| StoreError::Corrupt(format!("audit record {seq}: {e}")))?;
    if r.seq != seq {
        return Err(StoreError::Corrupt(format!(
            "audit record stored at {seq} says seq {}",
            r.seq
        )));
    }
    Ok(r)
}

/// The chain head left by the audit line stored at `seq`, read from the
/// line's ends ([`audit::Head::of_line`]) instead of decoding the whole
/// record: every append reads the head, and a mint batch's record lists
/// hundreds of SVIDs.
pub(super) fn audit_head_of(seq: u64, line: &str) -> Result<audit::Head, StoreError> {
    let head = audit::Head::of_line(line)
        .map_err(|e| StoreError::Corrupt(format!("audit record {seq}: {e}")))?;
    if head.seq != seq {
        return Err(StoreError::Corrupt(format!(
            "audit record stored at {seq} says seq {}",
            head.seq
        )));
    }
    Ok(head)
}

pub(super) fn decode_bundle(key: &str, b: &[u8]) -> Result<FederatedBundle, StoreError> {
    FederatedBundle::decode(b)
        .map_err(|e| StoreError::Corrupt(format!("federated bundle {key:?}: {e}")))
}

/// What a [`UsageMark`] records the last activity of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum UsageKind {
    /// An entry: the last time an SVID was issued under it.
    Entry,
    /// An agent: the last time it called the server or its sync stream
    /// woke up.
    Agent,
}

impl UsageKind {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Entry => "entry",
            Self::Agent => "agent",
        }
    }
}

/// The last activity of an entry or agent, at minute resolution: written in
/// batches (at most once a minute), never in the transaction of the call
/// that caused it, and not audited (it is bookkeeping for access reviews,
/// not a change of what anyone may do).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageMark {
    pub kind: UsageKind,
    /// Entry ID, or agent SPIFFE ID.
    pub id: String,
    /// Unix seconds.
    pub at: i64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredUsage {
    kind: String,
    id: String,
    at: i64,
}

impl UsageMark {
    /// The key a backend stores it under (`kind/id`).
    pub fn key(&self) -> String {
        format!("{}/{}", self.kind.as_str(), self.id)
    }

    /// The backends' encoding (JSON).
    pub fn encode(&self) -> Result<Vec<u8>, StoreError> {
        serde_json::to_vec(&StoredUsage {
            kind: self.kind.as_str().into(),
            id: self.id.clone(),
            at: self.at,
        })
        .map_err(|e| StoreError::Backend(e.to_string()))
    }

    /// Parses a stored mark.
    pub fn decode(key: &str, bytes: &[u8]) -> Result<Self, StoreError> {
        let s: StoredUsage =
            serde_json::from_slice(bytes).map_err(|e| corrupt("usage mark", key, e))?;
        let kind = match s.kind.as_str() {
            "entry" => UsageKind::Entry,
            "agent" => UsageKind::Agent,
            other => return Err(corrupt("usage mark", key, format!("kind {other:?}"))),
        };
        Ok(Self {
            kind,
            id: s.id,
            at: s.at,
        })
    }
}

/// Where an approval request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApprovalStatus {
    /// Waiting for an approver.
    Pending,
    /// Granted until [`ApprovalRecord::expires_at`].
    Granted,
    /// Denied.
    Denied,
}

impl ApprovalStatus {
    /// The stored and shown name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Granted => "granted",
            Self::Denied => "denied",
        }
    }
}

/// An approval request for one entry and one agent, and its decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalRecord {
    /// Server-assigned ID.
    pub id: String,
    /// The entry (which has `require_approval`).
    pub entry_id: String,
    /// The entry's SPIFFE ID when the request was opened.
    pub spiffe_id: SpiffeId,
    /// The agent that asked; a grant holds for this agent only.
    pub agent_id: SpiffeId,
    pub status: ApprovalStatus,
    /// Unix seconds.
    pub requested_at: i64,
    /// When it was granted or denied, Unix seconds (0 while pending).
    pub decided_at: i64,
    /// Who decided (admin uid/gid/pid), as shown in logs.
    pub decided_by: String,
    /// A grant's end, Unix seconds (0 unless granted).
    pub expires_at: i64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredApproval {
    id: String,
    entry_id: String,
    spiffe_id: String,
    agent_id: String,
    status: String,
    requested_at: i64,
    decided_at: i64,
    decided_by: String,
    expires_at: i64,
}

impl ApprovalRecord {
    /// Whether this is a grant in force at `now`.
    pub fn grants_at(&self, now: i64) -> bool {
        self.status == ApprovalStatus::Granted && now < self.expires_at
    }

    /// The backends' encoding (JSON).
    pub fn encode(&self) -> Result<Vec<u8>, StoreError> {
        serde_json::to_vec(&StoredApproval {
            id: self.id.clone(),
            entry_id: self.entry_id.clone(),
            spiffe_id: self.spiffe_id.to_string(),
            agent_id: self.agent_id.to_string(),
            status: self.status.as_str().into(),
            requested_at: self.requested_at,
            decided_at: self.decided_at,
            decided_by: self.decided_by.clone(),
            expires_at: self.expires_at,
        })
        .map_err(|e| StoreError::Backend(e.to_string()))
    }

    /// Parses a stored request; IDs and status must parse.
    pub fn decode(key: &str, bytes: &[u8]) -> Result<Self, StoreError> {
        let s: StoredApproval =
            serde_json::from_slice(bytes).map_err(|e| corrupt("approval", key, e))?;
        let bad = |e: String| corrupt("approval", key, e);
        let status = match s.status.as_str() {
            "pending" => ApprovalStatus::Pending,
            "granted" => ApprovalStatus::Granted,
            "denied" => ApprovalStatus::Denied,
            other => return Err(bad(format!("status {other:?}"))),
        };
        Ok(Self {
            id: s.id,
            entry_id: s.entry_id,
            spiffe_id: SpiffeId::new(&s.spiffe_id).map_err(|e| bad(format!("spiffe_id: {e}")))?,
            agent_id: SpiffeId::new(&s.agent_id).map_err(|e| bad(format!("agent_id: {e}")))?,
            status,
            requested_at: s.requested_at,
            decided_at: s.decided_at,
            decided_by: s.decided_by,
            expires_at: s.expires_at,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent() -> AgentRecord {
        AgentRecord {
            spiffe_id: SpiffeId::new("spiffe://example.org/sigil/agent/tpm/ab").unwrap(),
            attestation: AttestationType::Tpm,
            selectors: vec!["tpm:ek-hash:ab".parse().unwrap()],
            serial: "01".into(),
            previous_serial: Some("02".into()),
            svid_expires_at: 10,
            last_attested_at: 5,
            banned: false,
            created_at: 1,
        }
    }

    #[test]
    fn usage_marks_and_approvals_round_trip() {
        let m = UsageMark {
            kind: UsageKind::Agent,
            id: "spiffe://example.org/a".into(),
            at: 7,
        };
        assert_eq!(UsageMark::decode("k", &m.encode().unwrap()).unwrap(), m);
        let a = ApprovalRecord {
            id: "r1".into(),
            entry_id: "e1".into(),
            spiffe_id: SpiffeId::new("spiffe://example.org/w").unwrap(),
            agent_id: SpiffeId::new("spiffe://example.org/a").unwrap(),
            status: ApprovalStatus::Granted,
            requested_at: 1,
            decided_at: 2,
            decided_by: "admin uid=0".into(),
            expires_at: 10,
        };
        assert_eq!(
            ApprovalRecord::decode("k", &a.encode().unwrap()).unwrap(),
            a
        );
        assert!(a.grants_at(9) && !a.grants_at(10));
    }

    #[test]
    fn agent_records_round_trip() {
        let a = agent();
        assert_eq!(AgentRecord::decode("k", &a.encode().unwrap()).unwrap(), a);
    }

    #[test]
    fn a_stored_selector_that_does_not_parse_is_an_error_not_dropped() {
        let text = String::from_utf8(agent().encode().unwrap())
            .unwrap()
            .replace("tpm:ek-hash:ab", "no-colons");
        let err = AgentRecord::decode("k", text.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("no-colons"), "{err}");
        let text = String::from_utf8(agent().encode().unwrap())
            .unwrap()
            .replace("\"tpm\"", "\"magic\"");
        assert!(AgentRecord::decode("k", text.as_bytes()).is_err());
    }
}
