//! Persistent state of the server behind one backend-neutral interface:
//! registration entries, attested agents, join tokens (stored by hash only)
//! federated bundles, kills and the audit chain, as domain types
//! ([`records`]). Backends: [`RedbStore`] (one file, the default) and
//! [`PostgresStore`] (a database several servers can share).
//!
//! There is one write path: [`Datastore::write`] runs a mutation inside one
//! backend transaction. The mutation reads what it needs through the same
//! transaction ([`ReadTx`]) and writes every record it changes; the backend
//! commits all of it or nothing. Read-modify-write of a record therefore
//! never interleaves with another writer's (a renewal cannot undo a ban).
//! A backend may run the mutation more than once (e.g. after a
//! serialization failure), so mutations must not have side effects outside
//! the transaction.

mod copy;
mod postgres;
mod records;
mod redb_store;
mod task_record;

pub use copy::{CopySummary, copy_all};
pub use postgres::{
    ChangeEvent, ChangeKind, EventListener, Feed, PostgresStore,
    SCHEMA_VERSION as POSTGRES_SCHEMA_VERSION, describe_target,
};
pub use records::{
    AgentRecord, ApprovalRecord, ApprovalStatus, AttestationType, KillRecord, KillTarget,
    PublishedCa, PublishedJwt, ServerKeysRecord, TokenRecord, UsageKind, UsageMark,
};
pub use redb_store::RedbStore;
pub use task_record::TaskRecord;

use sigil_core::TrustDomain;
use sigil_core::audit;
use sigil_core::caller::Caller;
use sigil_core::entry::Entry;
use sigil_proto::common::FederatedBundle;

use crate::error::RegistryError;

/// A datastore operation failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The backend (database, file) failed.
    #[error("datastore: {0}")]
    Backend(String),
    /// A stored record does not parse; the message names it.
    #[error("datastore holds a corrupt record: {0}")]
    Corrupt(String),
    /// The disk holding the datastore is (nearly) full: the write was
    /// refused before it started, or failed and was rolled back. Reads
    /// still work; writes do again once space is freed.
    #[error("datastore full: {0}")]
    NoSpace(String),
}

/// Reads, either from a read snapshot or inside a write transaction (which
/// sees its own writes).
pub trait ReadTx {
    /// One agent.
    fn agent(&self, spiffe_id: &str) -> Result<Option<AgentRecord>, StoreError>;
    /// All agents.
    fn agents(&self) -> Result<Vec<AgentRecord>, StoreError>;
    /// How many agents are registered.
    fn agent_count(&self) -> Result<u64, StoreError>;
    /// All entries, validated for trust domain `td`.
    fn entries(&self, td: &TrustDomain) -> Result<Vec<Entry>, StoreError>;
    /// One entry, validated for trust domain `td`.
    fn entry(&self, id: &str, td: &TrustDomain) -> Result<Option<Entry>, StoreError>;
    /// Every unused join token record.
    fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError>;
    /// Every unused join token record with its key (the token's hash), in
    /// key order: for copying a datastore.
    fn tokens_by_hash(&self) -> Result<Vec<(String, TokenRecord)>, StoreError>;
    /// All federated bundles by trust domain.
    fn bundles(&self) -> Result<Vec<(String, FederatedBundle)>, StoreError>;
    /// Every kill in force.
    fn kills(&self) -> Result<Vec<KillRecord>, StoreError>;
    /// Every server's published public keys, by server ID, in key order.
    fn server_keys(&self) -> Result<Vec<(String, ServerKeysRecord)>, StoreError>;
    /// The last audit record's sequence number and hash (`None` before the
    /// first record).
    fn audit_head(&self) -> Result<Option<audit::Head>, StoreError>;
    /// Audit records with `seq >= since`, in order, at most `limit`.
    fn audit_records(&self, since: u64, limit: usize) -> Result<Vec<audit::Record>, StoreError>;
    /// Every stored last-activity mark (entries and agents).
    fn usage_marks(&self) -> Result<Vec<UsageMark>, StoreError>;
    /// Every approval request, decided or not.
    fn approvals(&self) -> Result<Vec<ApprovalRecord>, StoreError>;
    /// One approval request.
    fn approval(&self, id: &str) -> Result<Option<ApprovalRecord>, StoreError>;
    /// Every task, running or ended, in ID order.
    fn tasks(&self) -> Result<Vec<TaskRecord>, StoreError>;
    /// One task.
    fn task(&self, id: &str) -> Result<Option<TaskRecord>, StoreError>;
}

/// Writes inside one transaction.
pub trait WriteTx: ReadTx {
    /// Inserts or replaces an agent.
    fn put_agent(&mut self, a: &AgentRecord) -> Result<(), StoreError>;
    /// Removes an agent; false if absent.
    fn delete_agent(&mut self, spiffe_id: &str) -> Result<bool, StoreError>;
    /// Inserts or replaces an entry.
    fn put_entry(&mut self, e: &Entry) -> Result<(), StoreError>;
    /// Removes an entry; false if absent.
    fn delete_entry(&mut self, id: &str) -> Result<bool, StoreError>;
    /// Stores a token under the hash of its text.
    fn put_token(&mut self, hash: &str, t: &TokenRecord) -> Result<(), StoreError>;
    /// Removes and returns the token with this hash: within the
    /// transaction, so a token is taken once.
    fn take_token(&mut self, hash: &str) -> Result<Option<TokenRecord>, StoreError>;
    /// Inserts or replaces a federated trust domain's bundle.
    fn put_bundle(&mut self, trust_domain: &str, b: &FederatedBundle) -> Result<(), StoreError>;
    /// Removes a federated bundle; false if absent.
    fn delete_bundle(&mut self, trust_domain: &str) -> Result<bool, StoreError>;
    /// Inserts a kill.
    fn put_kill(&mut self, k: &KillRecord) -> Result<(), StoreError>;
    /// Removes (lifts) a kill and returns it.
    fn take_kill(&mut self, id: &str) -> Result<Option<KillRecord>, StoreError>;
    /// Inserts or replaces a last-activity mark (key: kind and ID).
    fn put_usage_mark(&mut self, m: &UsageMark) -> Result<(), StoreError>;
    /// Inserts or replaces an approval request.
    fn put_approval(&mut self, a: &ApprovalRecord) -> Result<(), StoreError>;
    /// Inserts or replaces a task.
    fn put_task(&mut self, t: &TaskRecord) -> Result<(), StoreError>;
    /// Inserts or replaces a server's published public keys.
    fn put_server_keys(&mut self, server_id: &str, r: &ServerKeysRecord) -> Result<(), StoreError>;
    /// Removes a server's published keys (it left and they expired); false
    /// if absent.
    fn delete_server_keys(&mut self, server_id: &str) -> Result<bool, StoreError>;
    /// Appends an audit record; it must extend [`ReadTx::audit_head`] (use
    /// [`append_audit`], which builds it from the head in this
    /// transaction, so appends are serialized on the chain head).
    fn put_audit(&mut self, r: &audit::Record) -> Result<(), StoreError>;
    /// [`WriteTx::put_audit`] for a record given as its export line
    /// (`Record::to_jsonl_line`, as `audit::next_line` renders it) and its
    /// sequence number: both backends store the line as it is.
    fn put_audit_line(&mut self, seq: u64, line: &str) -> Result<(), StoreError>;
    /// Deletes the audit records with `seq <= through` (retention) and
    /// returns how many went. Only ever a prefix of the chain, followed by
    /// a checkpoint that anchors what remains.
    fn delete_audit_through(&mut self, through: u64) -> Result<u64, StoreError>;
}

/// Appends the audit record of a change to the transaction that makes the
/// change: both commit, or neither does.
pub fn append_audit(
    tx: &mut dyn WriteTx,
    caller: &Caller,
    event: audit::Event,
) -> Result<(), RegistryError> {
    append_audit_ref(tx, caller, &event)
}

/// [`append_audit`] of a borrowed event: a transaction that may run more
/// than once (PostgreSQL retries a conflicting write) appends it without a
/// copy per attempt.
pub fn append_audit_ref(
    tx: &mut dyn WriteTx,
    caller: &Caller,
    event: &audit::Event,
) -> Result<(), RegistryError> {
    append_line(tx, |head, now| audit::next_line(head, now, caller, event))
}

/// Appends the `x509_svids_issued` record of one mint batch from its rows,
/// written as the batch was signed ([`audit::next_batch_line`]): the
/// record [`append_audit_ref`] would write for that event, without
/// building it.
pub fn append_batch_audit(
    tx: &mut dyn WriteTx,
    caller: &Caller,
    agent_id: &sigil_core::SpiffeId,
    svids: &audit::BatchRows,
) -> Result<(), RegistryError> {
    append_line(tx, |head, now| {
        audit::next_batch_line(head, now, caller, agent_id, svids)
    })
}

/// Stores the line `line_after` writes after the transaction's audit head,
/// timed now.
fn append_line(
    tx: &mut dyn WriteTx,
    line_after: impl FnOnce(Option<&audit::Head>, i64) -> (audit::Head, String),
) -> Result<(), RegistryError> {
    let head = tx.audit_head()?;
    let (new_head, line) = line_after(head.as_ref(), sigil_core::now_unix());
    tx.put_audit_line(new_head.seq, &line)?;
    Ok(())
}

/// Everything the server persists.
pub trait Datastore: Send + Sync + 'static {
    /// A consistent read snapshot.
    fn read(&self) -> Result<Box<dyn ReadTx + '_>, StoreError>;
    /// Runs `op` in one write transaction and commits it if `op` succeeds;
    /// on error nothing is written.
    fn write(
        &self,
        op: &mut dyn FnMut(&mut dyn WriteTx) -> Result<(), RegistryError>,
    ) -> Result<(), RegistryError>;
}

impl dyn Datastore {
    /// [`Datastore::write`] for a mutation that returns a value.
    pub fn transact<T>(
        &self,
        mut op: impl FnMut(&mut dyn WriteTx) -> Result<T, RegistryError>,
    ) -> Result<T, RegistryError> {
        let mut out = None;
        self.write(&mut |tx| {
            out = Some(op(tx)?);
            Ok(())
        })?;
        out.ok_or_else(|| RegistryError::internal("write transaction returned no result"))
    }
}
