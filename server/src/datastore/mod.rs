//! Persistent state of the server behind one small trait: registration
//! entries, attested agents, and join tokens (stored by hash only).

mod redb_store;

pub use redb_store::RedbStore;

use sigil_proto::admin::Agent;
use sigil_proto::common::Entry as PbEntry;
use sigil_proto::common::FederatedBundle;

/// A stored join token. The token text itself is never stored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TokenRecord {
    /// The agent SPIFFE ID the token grants, if it names one.
    pub spiffe_id: Option<String>,
    /// Unix seconds after which the token is refused.
    pub expires_at: i64,
}

/// A datastore operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("datastore: {0}")]
    Backend(String),
    #[error("datastore holds a corrupt record: {0}")]
    Corrupt(String),
}

/// Everything the server persists. Writes are atomic per call.
pub trait Datastore: Send + Sync + 'static {
    /// Inserts or replaces an entry.
    fn put_entry(&self, e: &PbEntry) -> Result<(), StoreError>;
    /// Removes an entry; false if absent.
    fn delete_entry(&self, id: &str) -> Result<bool, StoreError>;
    /// All entries.
    fn list_entries(&self) -> Result<Vec<PbEntry>, StoreError>;
    /// Inserts or replaces an agent.
    fn put_agent(&self, a: &Agent) -> Result<(), StoreError>;
    /// One agent.
    fn get_agent(&self, spiffe_id: &str) -> Result<Option<Agent>, StoreError>;
    /// All agents.
    fn list_agents(&self) -> Result<Vec<Agent>, StoreError>;
    /// Reads the agent record and writes what `f` returns in one write
    /// transaction, so a concurrent ban or eviction cannot be overwritten by
    /// a stale copy. `f` sees the current record (`None` if absent) and
    /// returns the record to store, or `None` to leave the store unchanged.
    /// Returns what was written.
    fn update_agent(
        &self,
        spiffe_id: &str,
        f: &mut dyn FnMut(Option<Agent>) -> Option<Agent>,
    ) -> Result<Option<Agent>, StoreError>;
    /// Removes an agent; false if absent.
    fn delete_agent(&self, spiffe_id: &str) -> Result<bool, StoreError>;
    /// Stores a token under the hash of its text.
    fn put_token(&self, hash: &str, t: &TokenRecord) -> Result<(), StoreError>;
    /// Removes and returns the token with this hash, atomically: a token
    /// can be taken once.
    fn take_token(&self, hash: &str) -> Result<Option<TokenRecord>, StoreError>;
    /// Every stored (unused) token record.
    fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError>;
    /// Inserts or replaces a federated trust domain's bundle.
    fn put_bundle(&self, trust_domain: &str, b: &FederatedBundle) -> Result<(), StoreError>;
    /// Removes a federated bundle; false if absent.
    fn delete_bundle(&self, trust_domain: &str) -> Result<bool, StoreError>;
    /// All federated bundles by trust domain.
    fn list_bundles(&self) -> Result<Vec<(String, FederatedBundle)>, StoreError>;
}
