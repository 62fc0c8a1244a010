//! The server's registry: entries (persisted, indexed in memory), agents,
//! join tokens, federated bundles and the CA, each behaviour in one module:
//!
//! - [`entries`] — entry create/update/delete and the in-memory index;
//! - [`namespace`] — the one rule that keeps agent and entry IDs apart;
//! - [`tokens`] — join tokens (stored by hash, single use);
//! - [`agents`] — node attestation results, credential pinning, renewal,
//!   eviction and bans;
//! - [`authz`] — which entries an agent is authorized for;
//! - [`minting`] — signing workload X.509- and JWT-SVIDs for an agent;
//! - [`federation`] — federated trust domains' bundles;
//! - [`kills`] — the kill switch: durable rules withdrawing identities;
//! - [`audit`] — the audit key, signed checkpoints and audit queries;
//! - [`revocation`] — CRLs listing the withdrawn, unexpired SVIDs;
//! - [`notify`] — waking exactly the sync streams a change concerns;
//! - [`cluster`] — every server's public signing keys in one bundle;
//! - [`remote`] — converging on changes another server made in a shared
//!   datastore;
//! - [`usage`] — when each entry last issued an SVID and each agent was
//!   last seen (in memory, flushed in batches);
//! - [`review`] — the access review of entries and agents;
//! - [`approvals`] — the approval gate of `require_approval` entries;
//! - [`claims`] — the context claims of JWT-SVIDs;
//! - [`tasks`] — task-scoped identities (start, mint, end, deadline);
//! - [`delegation`] — token exchange: delegation tokens on behalf of a user;
//! - [`wit`] — WIT-SVID signing keys and signing WIT-SVIDs for an agent.
//!
//! Every mutation names its [`Caller`] and runs as one datastore write
//! transaction ([`Datastore::write`]), reading the records it changes inside
//! it; the in-memory index and the sync streams are updated after the
//! commit. Errors are [`RegistryError`]s; the APIs map them to gRPC status.

mod agents;
mod approvals;
mod audit;
mod authz;
mod claims;
mod cluster;
mod delegation;
mod entries;
mod federation;
mod group_commit;
mod health;
mod kills;
mod minting;
mod namespace;
mod notify;
mod remote;
mod review;
mod revocation;
#[cfg(test)]
mod revocation_tests;
mod tasks;
#[cfg(test)]
mod tests;
mod tokens;
mod usage;
mod wit;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use sigil_core::tls::SharedBundle;
use sigil_core::x509::Ca;
use sigil_core::{SpiffeId, TrustDomain, now_unix};
use sigil_proto::common::FederatedBundle;
use tokio::sync::watch;

pub use sigil_core::caller::{Caller, ServerTask};

use crate::config::ServerConfig;
use crate::datastore::{AttestationType, Datastore, KillRecord, StoreError};
use crate::error::RegistryError;
use crate::keys::Keys;

pub use approvals::MAX_GRANT;
pub use audit::{AUDIT_KEY_FILE, AuditQuery, load_or_create_audit_key, normalize_serial};
pub use authz::MintRefusal;
pub use cluster::ClusterServer;
pub use delegation::{DELEGATION_TYP, Delegation, ExchangeRequest, Exchanged, TOKEN_TYPE_JWT};
use entries::EntryIndex;
pub use entries::{EntryField, MAX_ENTRY_BATCH};
pub use health::DatastoreHealth;
pub use review::{AgentReview, EntryReview, ReviewQuery};
pub use tasks::{MAX_TASK_NAME, TASK_KILL_GRACE, TaskQuery, TaskSvid, end_reason};
pub use wit::{WIT_KEYS_FILE, WitKeys};

/// The outcome of a verified node attestation.
pub struct NodeAttestation {
    pub spiffe_id: SpiffeId,
    pub attestation_type: AttestationType,
    /// Node selectors (`type:key:value`), derived from verified evidence.
    pub selectors: Vec<sigil_core::selector::Selector>,
}

/// A freshly attested or renewed agent SVID.
pub struct IssuedAgentSvid {
    pub spiffe_id: SpiffeId,
    pub chain: Vec<Vec<u8>>,
}

/// One CSR's result: the signed chain (DER, leaf first) or why it was refused.
pub type MintOutcome = Result<Vec<Vec<u8>>, MintRefusal>;

/// Shared server state.
pub struct ServerState {
    pub cfg: ServerConfig,
    store: Arc<dyn Datastore>,
    keys: RwLock<Keys>,
    /// The published X.509 authorities, shared with the TLS client verifier.
    x509_bundle: SharedBundle,
    entries: RwLock<EntryIndex>,
    /// Bundles of federated trust domains, by trust domain name.
    federated: RwLock<BTreeMap<String, FederatedBundle>>,
    /// Wakes every sync stream (bundle, federation and node-alias changes).
    global: watch::Sender<u64>,
    /// Wakes one agent's sync stream (its entries or its record changed).
    agent_watch: std::sync::Mutex<HashMap<SpiffeId, watch::Sender<u64>>>,
    /// Counts every change; reported as the sync revision.
    revision: std::sync::atomic::AtomicU64,
    /// Bounds concurrent X.509 signing and measures the queue.
    pub signing: crate::signing::SigningQueue,
    /// Issuance records waiting for their commit, grouped.
    issuance: group_commit::GroupCommit,
    /// Agent IDs named by unused join tokens, with the latest expiry of the
    /// tokens naming each: they are reserved for agents (namespace rule).
    token_ids: std::sync::Mutex<HashMap<SpiffeId, i64>>,
    /// Kills in force (few; checked on sync and minting).
    kills: RwLock<Vec<KillRecord>>,
    /// SPIFFE IDs withdrawn by kills, derived from `kills` and the entries
    /// on every change (see `kills::refresh_killed_ids`).
    killed_ids: RwLock<Vec<String>>,
    /// The audit key and the last checkpoint.
    audit: audit::AuditState,
    /// Withdrawn serials and the CRLs signed over them.
    revocations: RwLock<revocation::Revocations>,
    /// Rate limit of the audit records of refused node attestations.
    attest_failures: std::sync::Mutex<agents::FailureWindow>,
    /// Last-activity marks of entries and agents.
    usage: usage::Usage,
    /// The current approval request of each (entry, agent).
    approvals: RwLock<approvals::ApprovalIndex>,
    /// Other servers' published keys (a shared datastore).
    cluster: RwLock<cluster::ClusterKeys>,
    /// This server's current keys are not yet published (a failed write).
    keys_unpublished: std::sync::atomic::AtomicBool,
    /// The change feed followed (shared datastore), for the health check.
    feed: health::FeedCursor,
    /// The WIT-SVID signing keys (`wit_keys.json`).
    wit_keys: RwLock<wit::WitKeys>,
}

fn poisoned() -> RegistryError {
    RegistryError::internal("internal lock poisoned")
}

impl ServerState {
    /// Loads entries, bundles and token reservations from the datastore and
    /// builds the index.
    pub fn new(
        cfg: ServerConfig,
        store: Arc<dyn Datastore>,
        keys: Keys,
    ) -> Result<Self, StoreError> {
        let (index, federated, token_ids, kills, marks, approval_records) = {
            let r = store.read()?;
            let mut index = EntryIndex::default();
            for e in r.entries(&cfg.trust_domain)? {
                index.insert(Arc::new(e));
            }
            let federated: BTreeMap<_, _> = r.bundles()?.into_iter().collect();
            let mut token_ids: HashMap<SpiffeId, i64> = HashMap::new();
            for t in r.tokens()? {
                if let Some(id) = &t.spiffe_id {
                    let id = SpiffeId::new(id).map_err(|e| {
                        StoreError::Corrupt(format!("join token spiffe_id {id:?}: {e}"))
                    })?;
                    let exp = token_ids.entry(id).or_insert(t.expires_at);
                    *exp = (*exp).max(t.expires_at);
                }
            }
            (
                index,
                federated,
                token_ids,
                r.kills()?,
                r.usage_marks()?,
                r.approvals()?,
            )
        };
        let (global, _) = watch::channel(0);
        let wit_keys = wit::WitKeys::load_or_create(&cfg.data_dir, cfg.ca_ttl)
            .map_err(|e| StoreError::Backend(format!("WIT-SVID keys: {e}")))?;
        let state = Self {
            cfg,
            store,
            x509_bundle: Arc::new(RwLock::new(keys.x509_authorities())),
            keys: RwLock::new(keys),
            entries: RwLock::new(index),
            federated: RwLock::new(federated),
            global,
            agent_watch: std::sync::Mutex::new(HashMap::new()),
            revision: std::sync::atomic::AtomicU64::new(0),
            signing: crate::signing::SigningQueue::per_core(),
            issuance: group_commit::GroupCommit::default(),
            token_ids: std::sync::Mutex::new(token_ids),
            kills: RwLock::new(kills),
            killed_ids: RwLock::default(),
            audit: audit::AuditState::default(),
            revocations: RwLock::default(),
            attest_failures: std::sync::Mutex::default(),
            usage: usage::Usage::load(marks),
            approvals: RwLock::new(approvals::index(approval_records)),
            cluster: RwLock::default(),
            keys_unpublished: std::sync::atomic::AtomicBool::new(true),
            feed: health::FeedCursor::default(),
            wit_keys: RwLock::new(wit_keys),
        };
        // Publish before use: the keys are in the datastore (and the other
        // servers' keys in this server's bundle) before anything is served.
        state
            .publish_keys()
            .map_err(|e| StoreError::Backend(format!("publishing this server's keys: {e}")))?;
        if let Ok(idx) = state.entries.read() {
            state.refresh_killed_ids(&idx);
        }
        state
            .rebuild_revocations()
            .map_err(|e| StoreError::Backend(format!("building the CRLs: {e}")))?;
        Ok(state)
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.cfg.trust_domain
    }

    /// The CA that signs now.
    pub fn ca(&self) -> Arc<Ca> {
        // A poisoned lock means a panic while rotating; the keys themselves
        // are still consistent (rotation only appends, then switches index).
        self.keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .active_ca()
    }

    /// The X.509 authorities of the trust domain (DER), every published CA.
    pub fn bundle(&self) -> Vec<Vec<u8>> {
        self.x509_bundle
            .read()
            .map(|b| b.clone())
            .unwrap_or_default()
    }

    /// The same authorities as a shared handle, for TLS verification.
    pub fn shared_bundle(&self) -> SharedBundle {
        self.x509_bundle.clone()
    }

    /// The JWT authorities of every server as a JWKS document.
    pub fn jwt_bundle(&self) -> Vec<u8> {
        sigil_core::jwt::jwks(&self.cluster_jwt_authorities())
    }

    /// The bundle's sequence number (grows on every key change of any
    /// server, see [`cluster`]).
    pub fn bundle_sequence(&self) -> u64 {
        self.cluster_sequence()
    }

    /// Advances key rotation; on change persists the keys and pushes the new
    /// bundle to every agent.
    pub fn rotate_keys(&self) -> Result<bool, crate::keys::KeyError> {
        let mut keys = self.keys.write().unwrap_or_else(|p| p.into_inner());
        if !keys.rotate_persisted(now_unix())? {
            return Ok(false);
        }
        drop(keys);
        tracing::info!(caller = %Caller::server(ServerTask::KeyRotation), "signing keys rotated");
        self.keys_unpublished
            .store(true, std::sync::atomic::Ordering::SeqCst);
        if let Err(e) = self.publish_keys() {
            tracing::warn!(error = %e, "publishing the rotated keys failed; retrying");
        }
        self.refresh_bundle();
        self.bump();
        Ok(true)
    }
}
