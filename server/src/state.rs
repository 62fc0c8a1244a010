//! The server's state machine: entries (persisted, indexed by parent in
//! memory), agents, join tokens, and the CA. Every mutation is written to the
//! datastore first and then published by bumping a revision on a `watch`
//! channel, which wakes every agent's sync stream.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use sigil_core::entry::Entry;
use sigil_core::ids::{agent_id, new_entry_id, random_bytes, sha256_hex};
use sigil_core::selector::{Selector, SelectorSet};
use sigil_core::tls::SharedBundle;
use sigil_core::x509::{BACKDATE, Ca, CsrSignature, SvidInfo};
use sigil_core::{SpiffeId, TrustDomain, now_unix};
use sigil_proto::admin::Agent;
use sigil_proto::common::Entry as PbEntry;
use sigil_proto::common::FederatedBundle;
use tokio::sync::watch;
use tonic::Status;

use crate::config::ServerConfig;
use crate::datastore::{Datastore, StoreError, TokenRecord};
use crate::keys::Keys;

impl From<StoreError> for Status {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "datastore failure");
        Status::internal("datastore failure")
    }
}

/// In-memory index of the validated entries.
#[derive(Default)]
struct EntryIndex {
    by_id: HashMap<String, Arc<Entry>>,
    by_parent: HashMap<SpiffeId, BTreeSet<String>>,
    /// Entry IDs by (parent_id, spiffe_id): the duplicate check looks here
    /// instead of scanning every entry of the parent, which made creating
    /// many entries under one agent quadratic.
    by_identity: HashMap<(SpiffeId, SpiffeId), BTreeSet<String>>,
    /// IDs of node-alias entries.
    nodes: BTreeSet<String>,
}

impl EntryIndex {
    fn insert(&mut self, e: Arc<Entry>) {
        self.remove(&e.id);
        self.by_parent
            .entry(e.parent_id.clone())
            .or_default()
            .insert(e.id.clone());
        self.by_identity
            .entry((e.parent_id.clone(), e.spiffe_id.clone()))
            .or_default()
            .insert(e.id.clone());
        if e.node {
            self.nodes.insert(e.id.clone());
        }
        self.by_id.insert(e.id.clone(), e);
    }

    fn remove(&mut self, id: &str) -> Option<Arc<Entry>> {
        let old = self.by_id.remove(id)?;
        self.nodes.remove(id);
        if let Some(set) = self.by_parent.get_mut(&old.parent_id) {
            set.remove(id);
            if set.is_empty() {
                self.by_parent.remove(&old.parent_id);
            }
        }
        let key = (old.parent_id.clone(), old.spiffe_id.clone());
        if let Some(set) = self.by_identity.get_mut(&key) {
            set.remove(id);
            if set.is_empty() {
                self.by_identity.remove(&key);
            }
        }
        Some(old)
    }

    /// Another entry with the same SPIFFE ID, parent and selectors as `e`.
    fn duplicate_of(&self, e: &Entry) -> Option<&str> {
        self.by_identity
            .get(&(e.parent_id.clone(), e.spiffe_id.clone()))
            .into_iter()
            .flatten()
            .filter(|id| **id != e.id)
            .find(|id| {
                self.by_id
                    .get(*id)
                    .is_some_and(|o| o.selectors == e.selectors)
            })
            .map(String::as_str)
    }
}

/// The outcome of a verified node attestation.
pub struct NodeAttestation {
    pub spiffe_id: SpiffeId,
    /// `join_token`, `x509pop` or `tpm`.
    pub attestation_type: &'static str,
    /// Node selectors (`type:key:value`).
    pub selectors: Vec<String>,
}

/// A freshly attested or renewed agent SVID.
pub struct IssuedAgentSvid {
    pub spiffe_id: SpiffeId,
    pub chain: Vec<Vec<u8>>,
}

/// One CSR's result: the signed chain (DER, leaf first) or why it was refused.
pub type MintOutcome = Result<Vec<Vec<u8>>, String>;

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
    /// Agent IDs named by unused join tokens, with the latest expiry of the
    /// tokens naming each: they are reserved for agents (namespace rule).
    token_ids: std::sync::Mutex<HashMap<SpiffeId, i64>>,
}

/// Who claims a SPIFFE ID, for the namespace rule: workload entries and
/// agents never share an ID, so a workload SVID can never be mistaken for an
/// agent credential and a token can never turn a workload into an agent.
enum Claimant {
    /// An entry being created or updated.
    Entry,
    /// A join token being generated for an agent.
    Token,
    /// An agent attesting under this ID.
    Agent,
}

fn poisoned() -> Status {
    Status::internal("internal lock poisoned")
}

impl ServerState {
    /// Loads entries from the datastore and builds the index.
    pub fn new(
        cfg: ServerConfig,
        store: Arc<dyn Datastore>,
        keys: Keys,
    ) -> Result<Self, StoreError> {
        let mut index = EntryIndex::default();
        for pb in store.list_entries()? {
            let e = Entry::from_proto(&pb, &cfg.trust_domain)
                .map_err(|e| StoreError::Corrupt(format!("entry {}: {e}", pb.id)))?;
            index.insert(Arc::new(e));
        }
        let federated = store.list_bundles()?.into_iter().collect();
        let mut token_ids: HashMap<SpiffeId, i64> = HashMap::new();
        for t in store.list_tokens()? {
            if let Some(id) = &t.spiffe_id {
                let id = SpiffeId::new(id).map_err(|e| {
                    StoreError::Corrupt(format!("join token spiffe_id {id:?}: {e}"))
                })?;
                let exp = token_ids.entry(id).or_insert(t.expires_at);
                *exp = (*exp).max(t.expires_at);
            }
        }
        let (global, _) = watch::channel(0);
        Ok(Self {
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
            token_ids: std::sync::Mutex::new(token_ids),
        })
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

    /// The JWT authorities as a JWKS document.
    pub fn jwt_bundle(&self) -> Vec<u8> {
        sigil_core::jwt::jwks(
            &self
                .keys
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .jwt_authorities(),
        )
    }

    /// The bundle's sequence number (bumped on every key change).
    pub fn bundle_sequence(&self) -> u64 {
        self.keys.read().unwrap_or_else(|p| p.into_inner()).sequence
    }

    /// Advances key rotation; on change persists the keys and pushes the new
    /// bundle to every agent.
    pub fn rotate_keys(&self) -> Result<bool, String> {
        let mut keys = self.keys.write().unwrap_or_else(|p| p.into_inner());
        if !keys.rotate(now_unix())? {
            return Ok(false);
        }
        keys.persist()?;
        if let Ok(mut b) = self.x509_bundle.write() {
            *b = keys.x509_authorities();
        }
        drop(keys);
        self.bump();
        Ok(true)
    }

    /// Change notifications for one agent's sync stream: the global
    /// channel and the agent's own. A change to one agent's entries wakes
    /// only that agent, so the cost of a change does not grow with the
    /// number of agents.
    pub fn subscribe(&self, agent: &SpiffeId) -> (watch::Receiver<u64>, watch::Receiver<u64>) {
        let mut map = self.agent_watch.lock().unwrap_or_else(|p| p.into_inner());
        let own = map
            .entry(agent.clone())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe();
        (self.global.subscribe(), own)
    }

    /// Current change revision.
    pub fn revision(&self) -> u64 {
        self.revision.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn next_revision(&self) -> u64 {
        self.revision
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1
    }

    /// Wakes every sync stream.
    fn bump(&self) {
        let r = self.next_revision();
        self.global.send_replace(r);
    }

    /// Wakes the sync stream of one agent, if it has one.
    fn notify_agent(&self, agent: &SpiffeId) {
        let r = self.next_revision();
        let map = self.agent_watch.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = map.get(agent) {
            tx.send_replace(r);
        }
    }

    fn notify_agent_str(&self, id: &str) {
        match SpiffeId::new(id) {
            Ok(a) => self.notify_agent(&a),
            Err(_) => self.bump(),
        }
    }

    /// Wakes whoever an entry change concerns: the agent named as parent,
    /// or everyone when a node alias (or an entry under one) changed, since
    /// alias membership depends on each agent's node selectors.
    fn entry_changed(&self, idx: &EntryIndex, old: Option<&Entry>, new: Option<&Entry>) {
        let mut everyone = false;
        let mut agents: Vec<&SpiffeId> = Vec::new();
        for e in [old, new].into_iter().flatten() {
            let parent_is_alias = idx
                .nodes
                .iter()
                .filter_map(|id| idx.by_id.get(id))
                .any(|n| n.spiffe_id == e.parent_id);
            if e.node || parent_is_alias {
                everyone = true;
            } else {
                agents.push(&e.parent_id);
            }
        }
        if everyone {
            self.bump();
        } else {
            for a in agents {
                self.notify_agent(a);
            }
        }
    }

    // ---- entries -------------------------------------------------------

    fn validate(&self, pb: &PbEntry) -> Result<Entry, Status> {
        Entry::from_proto(pb, self.trust_domain())
            .map_err(|e| Status::invalid_argument(e.to_string()))
    }

    /// Creates an entry. Refuses an exact duplicate (same SPIFFE ID, parent
    /// and selectors).
    pub fn create_entry(&self, mut pb: PbEntry) -> Result<Entry, Status> {
        if !pb.id.is_empty() {
            return Err(Status::invalid_argument(
                "invalid entry field `id`: assigned by the server",
            ));
        }
        pb.id = new_entry_id();
        pb.revision = 0;
        pb.created_at = now_unix();
        let e = self.validate(&pb)?;
        let mut idx = self.entries.write().map_err(|_| poisoned())?;
        self.check_namespace(&e.spiffe_id, Claimant::Entry, &idx)?;
        if let Some(other) = idx.duplicate_of(&e) {
            return Err(Status::already_exists(format!(
                "entry {other} already has this spiffe_id, parent_id and selectors"
            )));
        }
        self.store.put_entry(&e.to_proto())?;
        idx.insert(Arc::new(e.clone()));
        self.entry_changed(&idx, None, Some(&e));
        drop(idx);
        Ok(e)
    }

    /// Replaces the fields named in `set_fields` (wire names) of entry `pb.id`.
    pub fn update_entry(&self, pb: PbEntry, set_fields: &[String]) -> Result<Entry, Status> {
        let mut idx = self.entries.write().map_err(|_| poisoned())?;
        let old = idx
            .by_id
            .get(&pb.id)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("no entry with id {:?}", pb.id)))?;
        let mut next = old.to_proto();
        for f in set_fields {
            match f.as_str() {
                "spiffe_id" => next.spiffe_id = pb.spiffe_id.clone(),
                "parent_id" => next.parent_id = pb.parent_id.clone(),
                "selectors" => next.selectors = pb.selectors.clone(),
                "x509_svid_ttl" => next.x509_svid_ttl = pb.x509_svid_ttl,
                "jwt_svid_ttl" => next.jwt_svid_ttl = pb.jwt_svid_ttl,
                "dns_names" => next.dns_names = pb.dns_names.clone(),
                "hint" => next.hint = pb.hint.clone(),
                "federates_with" => next.federates_with = pb.federates_with.clone(),
                "admin" => next.admin = pb.admin,
                "downstream" => next.downstream = pb.downstream,
                "node" => next.node = pb.node,
                "owner" => next.owner = pb.owner.clone(),
                "expires_at" => next.expires_at = pb.expires_at,
                other => {
                    return Err(Status::invalid_argument(format!(
                        "invalid field `set_fields`: unknown field {other:?}"
                    )));
                }
            }
        }
        next.revision = old.revision + 1;
        let e = self.validate(&next)?;
        self.check_namespace(&e.spiffe_id, Claimant::Entry, &idx)?;
        if let Some(other) = idx.duplicate_of(&e) {
            return Err(Status::already_exists(format!(
                "entry {other} already has this spiffe_id, parent_id and selectors"
            )));
        }
        self.store.put_entry(&e.to_proto())?;
        idx.insert(Arc::new(e.clone()));
        self.entry_changed(&idx, Some(&old), Some(&e));
        drop(idx);
        Ok(e)
    }

    pub fn get_entry(&self, id: &str) -> Result<Arc<Entry>, Status> {
        let idx = self.entries.read().map_err(|_| poisoned())?;
        idx.by_id
            .get(id)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("no entry with id {id:?}")))
    }

    pub fn list_entries(&self) -> Result<Vec<Arc<Entry>>, Status> {
        let idx = self.entries.read().map_err(|_| poisoned())?;
        let mut v: Vec<_> = idx.by_id.values().cloned().collect();
        // Every entry is in this trust domain, so comparing the parsed IDs
        // orders them as their text would, without an allocation per
        // comparison.
        v.sort_by(|a, b| a.spiffe_id.cmp(&b.spiffe_id).then_with(|| a.id.cmp(&b.id)));
        Ok(v)
    }

    /// How many agents are registered (no sorting: for health checks).
    pub fn agent_count(&self) -> Result<usize, Status> {
        Ok(self.store.list_agents()?.len())
    }

    /// How many entries there are (cheap: for health checks).
    pub fn entry_count(&self) -> Result<usize, Status> {
        Ok(self.entries.read().map_err(|_| poisoned())?.by_id.len())
    }

    pub fn delete_entry(&self, id: &str) -> Result<(), Status> {
        let mut idx = self.entries.write().map_err(|_| poisoned())?;
        if !idx.by_id.contains_key(id) {
            return Err(Status::not_found(format!("no entry with id {id:?}")));
        }
        self.store.delete_entry(id)?;
        let old = idx.remove(id);
        self.entry_changed(&idx, old.as_deref(), None);
        drop(idx);
        Ok(())
    }

    /// Entries an agent is authorized for: those whose parent is the agent
    /// or one of its node aliases, minus expired ones; each once, sorted by
    /// ID within each parent.
    /// `rec` is the agent's record, as the caller just read it.
    pub fn entries_for_agent(
        &self,
        agent: &SpiffeId,
        rec: Option<&Agent>,
    ) -> Result<Vec<Arc<Entry>>, Status> {
        let parents = self.parents_of(agent, rec)?;
        let idx = self.entries.read().map_err(|_| poisoned())?;
        let now = now_unix();
        let mut seen = BTreeSet::new();
        Ok(parents
            .iter()
            .flat_map(|p| idx.by_parent.get(p).into_iter().flatten())
            .filter(|id| seen.insert(*id))
            .filter_map(|id| idx.by_id.get(id))
            .filter(|e| !e.node && !e.is_expired(now))
            .cloned()
            .collect())
    }

    /// The IDs an agent stands for: its own, plus every node-alias entry
    /// whose selectors its attested node selectors satisfy.
    pub fn agent_parents(&self, agent: &SpiffeId) -> Result<Vec<SpiffeId>, Status> {
        let rec = self.store.get_agent(&agent.to_string())?;
        self.parents_of(agent, rec.as_ref())
    }

    /// [`ServerState::agent_parents`] with the agent's record at hand.
    fn parents_of(&self, agent: &SpiffeId, rec: Option<&Agent>) -> Result<Vec<SpiffeId>, Status> {
        let selectors: SelectorSet = match rec {
            Some(rec) => rec
                .selectors
                .iter()
                .filter_map(|s| s.parse::<Selector>().ok())
                .collect(),
            None => SelectorSet::new(),
        };
        let mut parents = vec![agent.clone()];
        if selectors.is_empty() {
            return Ok(parents);
        }
        let idx = self.entries.read().map_err(|_| poisoned())?;
        let now = now_unix();
        for id in &idx.nodes {
            if let Some(e) = idx.by_id.get(id)
                && !e.is_expired(now)
                && selectors.satisfies(&e.selectors)
                && !parents.contains(&e.spiffe_id)
            {
                parents.push(e.spiffe_id.clone());
            }
        }
        Ok(parents)
    }

    // ---- federation ------------------------------------------------------

    /// Bundles of the trust domains that any of `entries` federates with.
    pub fn federated_for(&self, entries: &[Arc<Entry>]) -> HashMap<String, FederatedBundle> {
        // Distinct names first: many entries federate with the same few
        // trust domains, and each bundle is cloned once.
        let names: BTreeSet<&str> = entries
            .iter()
            .flat_map(|e| e.federates_with.iter().map(|td| td.as_str()))
            .collect();
        let fed = self.federated.read().unwrap_or_else(|p| p.into_inner());
        names
            .into_iter()
            .filter_map(|td| fed.get(td).map(|b| (td.to_string(), b.clone())))
            .collect()
    }

    /// Sets (creates or replaces) a federated trust domain's bundle.
    pub fn set_federated_bundle(&self, td: &TrustDomain, b: FederatedBundle) -> Result<(), Status> {
        if td == self.trust_domain() {
            return Err(Status::invalid_argument(
                "invalid field `id`: that is this server's own trust domain",
            ));
        }
        if b.x509_authorities.is_empty() && b.jwt_bundle.is_empty() {
            return Err(Status::invalid_argument(
                "invalid field `bundle`: no authorities",
            ));
        }
        let mut fed = self.federated.write().map_err(|_| poisoned())?;
        self.store.put_bundle(td.as_str(), &b)?;
        let changed = fed.get(td.as_str()) != Some(&b);
        fed.insert(td.to_string(), b);
        drop(fed);
        if changed {
            self.bump();
        }
        Ok(())
    }

    /// Removes a federated bundle.
    pub fn delete_federated_bundle(&self, td: &TrustDomain) -> Result<(), Status> {
        let mut fed = self.federated.write().map_err(|_| poisoned())?;
        if !self.store.delete_bundle(td.as_str())? {
            return Err(Status::not_found(format!(
                "no bundle for trust domain {td}"
            )));
        }
        fed.remove(td.as_str());
        drop(fed);
        self.bump();
        Ok(())
    }

    /// All federated bundles.
    pub fn federated_bundles(&self) -> BTreeMap<String, FederatedBundle> {
        self.federated
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    // ---- identity namespace ----------------------------------------------

    /// The namespace rule, the one place it is enforced: an entry's SPIFFE
    /// ID may not be an agent's ID (registered, or named by an unused join
    /// token), and an agent ID (token or attestation) may not be an entry's
    /// SPIFFE ID or, for a new token, an already registered agent's. The
    /// refusal names the colliding record. Callers hold the entry index
    /// (write-locked for entry changes), so entry and agent claims on the
    /// same ID cannot interleave.
    fn check_namespace(
        &self,
        id: &SpiffeId,
        claimant: Claimant,
        idx: &EntryIndex,
    ) -> Result<(), Status> {
        match claimant {
            Claimant::Entry => {
                if self.store.get_agent(&id.to_string())?.is_some() {
                    return Err(Status::already_exists(format!(
                        "invalid field `spiffe_id`: {id} is the ID of registered agent {id}; \
                         entries and agents may not share an ID"
                    )));
                }
                let now = now_unix();
                let tokens = self.token_ids.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(exp) = tokens.get(id).filter(|exp| **exp > now) {
                    return Err(Status::already_exists(format!(
                        "invalid field `spiffe_id`: {id} is named by an unused join token \
                         (valid until {exp}); entries and agents may not share an ID"
                    )));
                }
            }
            Claimant::Token | Claimant::Agent => {
                // IDs under /sigil/ never belong to entries (Entry::from_proto
                // refuses them), so only other IDs need the scan.
                if !id.path().starts_with("/sigil/")
                    && let Some(e) = idx.by_id.values().find(|e| e.spiffe_id == *id)
                {
                    return Err(Status::already_exists(format!(
                        "invalid field `spiffe_id`: entry {} has SPIFFE ID {id}; \
                         entries and agents may not share an ID",
                        e.id
                    )));
                }
                // A live agent's ID: a token would give a second node the
                // same identity. (A banned agent is not live: its ID stays
                // refused at attestation, which is where the ban is enforced.)
                if matches!(claimant, Claimant::Token)
                    && self
                        .store
                        .get_agent(&id.to_string())?
                        .is_some_and(|a| !a.banned)
                {
                    return Err(Status::already_exists(format!(
                        "invalid field `spiffe_id`: agent {id} is already registered \
                         (evict it before enrolling a node under its ID again)"
                    )));
                }
            }
        }
        Ok(())
    }

    // ---- join tokens and agents ------------------------------------------

    /// Generates a single-use join token. Only its SHA-256 is stored.
    pub fn generate_token(
        &self,
        spiffe_id: Option<SpiffeId>,
        ttl: Duration,
    ) -> Result<(String, i64), Status> {
        if let Some(id) = &spiffe_id {
            if !id.is_member_of(self.trust_domain()) {
                return Err(Status::invalid_argument(format!(
                    "invalid field `spiffe_id`: {id} is not in trust domain {}",
                    self.trust_domain()
                )));
            }
            if id.path().is_empty() {
                return Err(Status::invalid_argument(
                    "invalid field `spiffe_id`: must have a path",
                ));
            }
            // The /sigil/ namespace belongs to the server; an agent holding the
            // server's ID could impersonate it to other agents.
            if id.path().starts_with("/sigil/") && !id.path().starts_with("/sigil/agent/") {
                return Err(Status::invalid_argument(format!(
                    "invalid field `spiffe_id`: {id} is reserved for the server"
                )));
            }
        }
        let token = hex::encode(random_bytes::<16>());
        let expires_at = now_unix() + ttl.as_secs() as i64;
        // Held across the check and the write: an entry cannot claim the ID
        // in between.
        let idx = self.entries.read().map_err(|_| poisoned())?;
        if let Some(id) = &spiffe_id {
            self.check_namespace(id, Claimant::Token, &idx)?;
        }
        let rec = TokenRecord {
            spiffe_id: spiffe_id.as_ref().map(|s| s.to_string()),
            expires_at,
        };
        self.store.put_token(&sha256_hex(token.as_bytes()), &rec)?;
        if let Some(id) = spiffe_id {
            let mut tokens = self.token_ids.lock().unwrap_or_else(|p| p.into_inner());
            let exp = tokens.entry(id).or_insert(expires_at);
            *exp = (*exp).max(expires_at);
        }
        drop(idx);
        Ok((token, expires_at))
    }

    /// Join-token node attestation: consumes the token (even if it turns out
    /// expired) and issues the agent SVID.
    pub fn consume_join_token(&self, token: &str) -> Result<NodeAttestation, Status> {
        let hash = sha256_hex(token.trim().as_bytes());
        let rec = self
            .store
            .take_token(&hash)?
            .ok_or_else(|| Status::permission_denied("join token is unknown or already used"))?;
        if let Some(id) = rec.spiffe_id.as_deref().and_then(|s| SpiffeId::new(s).ok()) {
            self.release_token_id(&id)?;
        }
        if rec.expires_at <= now_unix() {
            return Err(Status::permission_denied("join token has expired"));
        }
        let spiffe_id = match &rec.spiffe_id {
            Some(s) => {
                SpiffeId::new(s).map_err(|e| Status::internal(format!("stored token id: {e}")))?
            }
            None => agent_id(self.trust_domain(), "join_token", &hash[..32])
                .map_err(|e| Status::internal(e.to_string()))?,
        };
        Ok(NodeAttestation {
            spiffe_id,
            attestation_type: "join_token",
            selectors: vec![],
        })
    }

    /// Forgets a token-named agent ID once no unused token names it.
    fn release_token_id(&self, id: &SpiffeId) -> Result<(), Status> {
        let still_named = self
            .store
            .list_tokens()?
            .iter()
            .filter(|t| t.spiffe_id.as_deref() == Some(id.to_string().as_str()))
            .map(|t| t.expires_at)
            .max();
        let mut tokens = self.token_ids.lock().unwrap_or_else(|p| p.into_inner());
        match still_named {
            Some(exp) => tokens.insert(id.clone(), exp),
            None => tokens.remove(id),
        };
        Ok(())
    }

    /// Issues the agent SVID for a successful node attestation and records
    /// the agent with its node selectors. A banned ID gets nothing. A TPM
    /// node that re-attests with different measurements than it enrolled
    /// with loses its identity (evict it to enroll it again).
    pub fn issue_agent_svid(
        &self,
        a: NodeAttestation,
        csr: &[u8],
    ) -> Result<IssuedAgentSvid, Status> {
        let id = a.spiffe_id;
        let key = id.to_string();
        // Cheap refusals before signing; repeated inside the write below,
        // where they decide.
        let admissible = |existing: Option<&Agent>| -> Result<(), Status> {
            let Some(e) = existing else { return Ok(()) };
            if e.banned {
                return Err(Status::permission_denied(format!("agent {id} is banned")));
            }
            if e.attestation_type == "tpm"
                && a.attestation_type == "tpm"
                && e.selectors != a.selectors
            {
                tracing::warn!(agent = %id, "TPM measurements changed since enrollment; refusing");
                return Err(Status::permission_denied(
                    "TPM measurements (PCRs) changed since enrollment; the node's identity is withdrawn (evict the agent to enroll it again)",
                ));
            }
            Ok(())
        };
        admissible(self.store.get_agent(&key)?.as_ref())?;
        let chain = self.sign_agent(&id, csr)?;
        let info = SvidInfo::from_der(&chain[0]).map_err(|e| Status::internal(e.to_string()))?;
        let now = now_unix();
        // The entry index is held so no entry can claim this ID meanwhile.
        let idx = self.entries.read().map_err(|_| poisoned())?;
        self.check_namespace(&id, Claimant::Agent, &idx)?;
        let mut refusal = None;
        let written = self.store.update_agent(&key, &mut |existing| {
            if let Err(st) = admissible(existing.as_ref()) {
                refusal = Some(st);
                return None;
            }
            Some(Agent {
                spiffe_id: key.clone(),
                attestation_type: a.attestation_type.into(),
                selectors: a.selectors.clone(),
                serial: info.serial.clone(),
                // Until the agent first presents the new SVID, the one it
                // held before stays acceptable (it may not have stored the
                // new one yet).
                previous_serial: existing
                    .as_ref()
                    .map(|e| {
                        if e.previous_serial.is_empty() {
                            e.serial.clone()
                        } else {
                            e.previous_serial.clone()
                        }
                    })
                    .unwrap_or_default(),
                svid_expires_at: info.not_after,
                last_attested_at: now,
                banned: false,
                created_at: existing.as_ref().map_or(now, |e| e.created_at),
            })
        })?;
        drop(idx);
        if let Some(st) = refusal {
            return Err(st);
        }
        if written.is_none() {
            return Err(Status::internal("agent record was not written"));
        }
        self.notify_agent(&id);
        tracing::info!(agent = %id, attestor = a.attestation_type, serial = %info.serial, "agent attested");
        Ok(IssuedAgentSvid {
            spiffe_id: id,
            chain,
        })
    }

    fn sign_agent(&self, id: &SpiffeId, csr: &[u8]) -> Result<Vec<Vec<u8>>, Status> {
        let leaf = self
            .ca()
            .sign_svid(csr, CsrSignature::Verify, id, &[], self.cfg.agent_svid_ttl)
            .map_err(|e| Status::invalid_argument(format!("invalid field `csr`: {e}")))?;
        Ok(vec![leaf])
    }

    /// Checks the client certificate of an mTLS call and returns the agent's
    /// ID. The chain was already verified against the CA by the TLS layer;
    /// here the agent must still be registered, not banned, and the
    /// certificate must not predate the agent's current attestation.
    pub fn authenticate_agent(&self, leaf_der: &[u8]) -> Result<SpiffeId, Status> {
        let info =
            SvidInfo::from_der(leaf_der).map_err(|e| Status::unauthenticated(e.to_string()))?;
        self.check_agent(&info)?;
        Ok(info.spiffe_id)
    }

    /// The checks of [`ServerState::authenticate_agent`] on an already
    /// parsed certificate; returns the agent's record.
    pub fn check_agent(&self, info: &SvidInfo) -> Result<Agent, Status> {
        let rec = self
            .store
            .get_agent(&info.spiffe_id.to_string())?
            .ok_or_else(|| {
                Status::permission_denied(format!(
                    "agent {} is not attested (evicted?)",
                    info.spiffe_id
                ))
            })?;
        if rec.banned {
            return Err(Status::permission_denied(format!(
                "agent {} is banned",
                info.spiffe_id
            )));
        }
        // The credential is pinned: only the agent SVID the server issued
        // last (or, until that one is first used, the one before it) is
        // accepted, even though any SVID for this ID that chains to the CA
        // passed the TLS handshake.
        let current = info.serial == rec.serial;
        let previous = !rec.previous_serial.is_empty() && info.serial == rec.previous_serial;
        if !current && !previous {
            tracing::warn!(
                agent = %info.spiffe_id,
                serial = %info.serial,
                "refused a certificate that is not the agent's current SVID"
            );
            return Err(Status::permission_denied(format!(
                "certificate {} is not the current SVID of agent {}",
                info.serial, info.spiffe_id
            )));
        }
        if info.not_before + (BACKDATE.as_secs() as i64) + 1 < rec.created_at {
            return Err(Status::permission_denied(
                "agent SVID predates the agent's current attestation",
            ));
        }
        // TLS checked validity at the handshake only; a long-lived HTTP/2
        // connection must not outlive the certificate it was opened with.
        if info.not_after <= now_unix() {
            return Err(Status::unauthenticated(
                "agent SVID has expired; reconnect with a current one",
            ));
        }
        if current && !rec.previous_serial.is_empty() {
            // First use of the new SVID: the previous one is retired.
            let serial = info.serial.clone();
            let updated = self.store.update_agent(&rec.spiffe_id, &mut |a| {
                a.filter(|a| a.serial == serial && !a.previous_serial.is_empty())
                    .map(|mut a| {
                        a.previous_serial.clear();
                        a
                    })
            })?;
            if let Some(a) = updated {
                return Ok(a);
            }
        }
        Ok(rec)
    }

    /// Renews an authenticated agent's SVID.
    pub fn renew_agent(&self, id: &SpiffeId, csr: &[u8]) -> Result<Vec<Vec<u8>>, Status> {
        let key = id.to_string();
        let renewable = |rec: Option<&Agent>| -> Result<(), Status> {
            let rec = rec.ok_or_else(|| Status::permission_denied("agent is not attested"))?;
            if rec.banned {
                return Err(Status::permission_denied(format!("agent {id} is banned")));
            }
            // Hardware- and certificate-attested nodes prove themselves again
            // on every renewal; a copied SVID and key must not keep the
            // identity.
            if rec.attestation_type != "join_token" {
                return Err(Status::failed_precondition(format!(
                    "{} agents renew by re-attesting (Attest stream), not RenewAgent",
                    rec.attestation_type
                )));
            }
            Ok(())
        };
        renewable(self.store.get_agent(&key)?.as_ref())?;
        let chain = self.sign_agent(id, csr)?;
        let info = SvidInfo::from_der(&chain[0]).map_err(|e| Status::internal(e.to_string()))?;
        // Re-checked inside the write: a ban or eviction that landed while
        // signing wins, and the new SVID is discarded.
        let mut refusal = None;
        self.store.update_agent(&key, &mut |rec| {
            if let Err(st) = renewable(rec.as_ref()) {
                refusal = Some(st);
                return None;
            }
            rec.map(|mut rec| {
                // While the last issued SVID is still unused, the one in use
                // stays `previous` (a lost renewal response must not lock
                // the agent out).
                let in_use = std::mem::replace(&mut rec.serial, info.serial.clone());
                if rec.previous_serial.is_empty() {
                    rec.previous_serial = in_use;
                }
                rec.svid_expires_at = info.not_after;
                rec
            })
        })?;
        if let Some(st) = refusal {
            return Err(st);
        }
        Ok(chain)
    }

    pub fn list_agents(&self) -> Result<Vec<Agent>, Status> {
        let mut v = self.store.list_agents()?;
        v.sort_by(|a, b| a.spiffe_id.cmp(&b.spiffe_id));
        Ok(v)
    }

    pub fn get_agent(&self, id: &str) -> Result<Agent, Status> {
        self.store
            .get_agent(id)?
            .ok_or_else(|| Status::not_found(format!("no agent {id:?}")))
    }

    /// Removes the agent: it must re-attest with a new token.
    pub fn evict_agent(&self, id: &str) -> Result<(), Status> {
        if !self.store.delete_agent(id)? {
            return Err(Status::not_found(format!("no agent {id:?}")));
        }
        self.notify_agent_str(id);
        Ok(())
    }

    /// Bans the agent: it can neither renew, sync, nor re-attest under this ID.
    pub fn ban_agent(&self, id: &str) -> Result<Agent, Status> {
        let rec = self
            .store
            .update_agent(id, &mut |rec| {
                rec.map(|mut rec| {
                    rec.banned = true;
                    rec
                })
            })?
            .ok_or_else(|| Status::not_found(format!("no agent {id:?}")))?;
        self.notify_agent_str(id);
        Ok(rec)
    }

    /// The entry `entry_id` if `agent` may obtain SVIDs for it.
    fn authorized_entry(
        idx: &EntryIndex,
        parents: &[SpiffeId],
        entry_id: &str,
        now: i64,
    ) -> Result<Arc<Entry>, String> {
        let e = idx
            .by_id
            .get(entry_id)
            .cloned()
            .ok_or_else(|| format!("no entry {entry_id:?}"))?;
        if e.node || !parents.contains(&e.parent_id) {
            return Err(format!(
                "entry {entry_id:?} is not authorized for this agent"
            ));
        }
        if e.is_expired(now) {
            return Err(format!("entry {entry_id:?} has expired"));
        }
        Ok(e)
    }

    /// Signs workload CSRs for an agent, each against an entry the agent is
    /// authorized for. Per-CSR failures are reported per CSR.
    pub fn mint_for_agent(
        &self,
        agent: &SpiffeId,
        csrs: &[(String, Vec<u8>)],
    ) -> Result<Vec<MintOutcome>, Status> {
        let now = now_unix();
        let ca = self.ca();
        let parents = self.agent_parents(agent)?;
        // Look every entry up under one read of the index, then sign
        // without holding it.
        let entries: Vec<Result<Arc<Entry>, String>> = {
            let idx = self.entries.read().map_err(|_| poisoned())?;
            csrs.iter()
                .map(|(id, _)| Self::authorized_entry(&idx, &parents, id, now))
                .collect()
        };
        Ok(csrs
            .iter()
            .zip(entries)
            .map(|((_, csr), e)| {
                let e = e?;
                let ttl = e.x509_svid_ttl.unwrap_or(self.cfg.default_x509_svid_ttl);
                ca.sign_svid(
                    csr,
                    self.cfg.workload_csr_check,
                    &e.spiffe_id,
                    &e.dns_names,
                    ttl,
                )
                .map(|leaf| vec![leaf])
                .map_err(|e| e.to_string())
            })
            .collect())
    }

    /// Signs a JWT-SVID for an entry the agent is authorized for.
    pub fn mint_jwt_for_agent(
        &self,
        agent: &SpiffeId,
        entry_id: &str,
        audience: &[String],
    ) -> Result<String, Status> {
        if audience.is_empty() || audience.iter().any(|a| a.is_empty()) {
            return Err(Status::invalid_argument(
                "invalid field `audience`: at least one non-empty audience is required",
            ));
        }
        let now = now_unix();
        let parents = self.agent_parents(agent)?;
        let e = {
            let idx = self.entries.read().map_err(|_| poisoned())?;
            Self::authorized_entry(&idx, &parents, entry_id, now)
        }
        .map_err(Status::permission_denied)?;
        let ttl = e.jwt_svid_ttl.unwrap_or(self.cfg.default_jwt_svid_ttl);
        let signer = self
            .keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .active_jwt();
        signer
            .sign(
                &e.spiffe_id,
                audience,
                ttl,
                now,
                self.cfg.jwt_issuer.as_deref(),
            )
            .map_err(|e| Status::internal(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    //! The authorization core against a temporary datastore: agent
    //! credential pinning, the namespace rule, and record updates that
    //! concurrent renewals, bans and evictions cannot undo.

    use super::*;
    use sigil_core::x509::new_key_and_csr;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct TempState {
        state: Arc<ServerState>,
        dir: std::path::PathBuf,
    }

    impl Drop for TempState {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn temp_state() -> TempState {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "sigil-state-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = ServerConfig::parse(&format!(
            "trust_domain = \"example.org\"\ndata_dir = \"{}\"\n",
            dir.display()
        ))
        .unwrap();
        let store = Arc::new(crate::datastore::RedbStore::open(&dir.join("db.redb")).unwrap());
        let keys = Keys::load_or_create(
            &dir,
            &cfg.trust_domain,
            Duration::from_secs(3600),
            sigil_core::jwt::JwtKeyType::EcP256,
        )
        .unwrap();
        let state = Arc::new(ServerState::new(cfg, store, keys).unwrap());
        TempState { state, dir }
    }

    fn id(s: &str) -> SpiffeId {
        SpiffeId::new(s).unwrap()
    }

    fn attest(s: &ServerState, agent: &str) -> SvidInfo {
        let (csr, _) = new_key_and_csr().unwrap();
        let out = s
            .issue_agent_svid(
                NodeAttestation {
                    spiffe_id: id(agent),
                    attestation_type: "join_token",
                    selectors: vec![],
                },
                &csr,
            )
            .unwrap();
        SvidInfo::from_der(&out.chain[0]).unwrap()
    }

    fn renew(s: &ServerState, agent: &str) -> Result<SvidInfo, Status> {
        let (csr, _) = new_key_and_csr().unwrap();
        let chain = s.renew_agent(&id(agent), &csr)?;
        Ok(SvidInfo::from_der(&chain[0]).unwrap())
    }

    fn entry(parent: &str, spiffe_id: &str) -> PbEntry {
        PbEntry {
            parent_id: parent.into(),
            spiffe_id: spiffe_id.into(),
            selectors: vec!["unix:uid:0".into()],
            ..Default::default()
        }
    }

    const AGENT: &str = "spiffe://example.org/agent1";

    #[test]
    fn a_ca_signed_certificate_that_is_not_the_agents_current_svid_is_refused() {
        let t = temp_state();
        let issued = attest(&t.state, AGENT);
        assert!(t.state.check_agent(&issued).is_ok());
        // Signed by the same CA for the same ID, valid, but never issued to
        // the agent as its credential (as a workload SVID would be).
        let (csr, _) = new_key_and_csr().unwrap();
        let forged = t
            .state
            .ca()
            .sign_svid(
                &csr,
                CsrSignature::Verify,
                &id(AGENT),
                &[],
                Duration::from_secs(300),
            )
            .unwrap();
        let forged = SvidInfo::from_der(&forged).unwrap();
        let err = t.state.check_agent(&forged).unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert!(err.message().contains("not the current SVID"), "{err:?}");
    }

    #[test]
    fn the_previous_svid_is_accepted_only_until_the_new_one_is_used() {
        let t = temp_state();
        let first = attest(&t.state, AGENT);
        let second = renew(&t.state, AGENT).unwrap();
        // The agent may not have stored the renewal yet.
        assert!(t.state.check_agent(&first).is_ok());
        // A lost renewal response: the SVID in use stays acceptable.
        let third = renew(&t.state, AGENT).unwrap();
        assert!(t.state.check_agent(&first).is_ok());
        assert!(
            t.state.check_agent(&second).is_err(),
            "never used, replaced"
        );
        assert!(t.state.check_agent(&third).is_ok());
        // The new one was used: the old one is retired.
        assert!(t.state.check_agent(&first).is_err());
        assert!(t.state.check_agent(&third).is_ok());
    }

    #[test]
    fn entries_and_agents_never_share_an_id() {
        let t = temp_state();
        attest(&t.state, AGENT);
        // An entry for a registered agent's ID.
        let err = t
            .state
            .create_entry(entry(AGENT, "spiffe://example.org/agent1"))
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::AlreadyExists);
        assert!(err.message().contains("registered agent"), "{err:?}");
        // An entry for an ID an unused token names.
        t.state
            .generate_token(
                Some(id("spiffe://example.org/agent2")),
                Duration::from_secs(60),
            )
            .unwrap();
        let err = t
            .state
            .create_entry(entry(AGENT, "spiffe://example.org/agent2"))
            .unwrap_err();
        assert!(err.message().contains("unused join token"), "{err:?}");
        // A token for an entry's ID, and for a live agent's ID.
        let e = t
            .state
            .create_entry(entry(AGENT, "spiffe://example.org/service"))
            .unwrap();
        let err = t
            .state
            .generate_token(
                Some(id("spiffe://example.org/service")),
                Duration::from_secs(60),
            )
            .unwrap_err();
        assert!(err.message().contains(&e.id), "names the entry: {err:?}");
        let err = t
            .state
            .generate_token(Some(id(AGENT)), Duration::from_secs(60))
            .unwrap_err();
        assert!(err.message().contains("already registered"), "{err:?}");
        // Updating an entry onto an agent's ID is refused too, and nothing
        // changes.
        let mut pb = e.to_proto();
        pb.spiffe_id = AGENT.into();
        let err = t.state.update_entry(pb, &["spiffe_id".into()]).unwrap_err();
        assert_eq!(err.code(), tonic::Code::AlreadyExists);
        assert_eq!(
            t.state.get_entry(&e.id).unwrap().spiffe_id,
            id("spiffe://example.org/service")
        );
    }

    #[test]
    fn a_consumed_token_releases_its_id_only_when_no_other_token_names_it() {
        let t = temp_state();
        let agent2 = id("spiffe://example.org/agent2");
        let (tok, _) = t
            .state
            .generate_token(Some(agent2.clone()), Duration::from_secs(60))
            .unwrap();
        t.state
            .generate_token(Some(agent2.clone()), Duration::from_secs(60))
            .unwrap();
        t.state.consume_join_token(&tok).unwrap();
        assert!(
            t.state
                .create_entry(entry(AGENT, agent2.to_string().as_str()))
                .is_err(),
            "the second token still names the ID"
        );
    }

    /// Runs `renewals` renewals against `other` from many threads at once,
    /// released together by a barrier.
    fn race(s: &Arc<ServerState>, other: fn(&ServerState)) {
        let barrier = Arc::new(std::sync::Barrier::new(12));
        let threads: Vec<_> = (0..12)
            .map(|i| {
                let (s, barrier) = (s.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    if i % 2 == 0 {
                        let _ = renew(&s, AGENT);
                    } else {
                        other(&s);
                    }
                })
            })
            .collect();
        for th in threads {
            th.join().unwrap();
        }
    }

    #[test]
    fn renewals_racing_a_ban_never_undo_it() {
        for _ in 0..10 {
            let t = temp_state();
            let old = attest(&t.state, AGENT);
            race(&t.state, |s| {
                let _ = s.ban_agent(AGENT);
            });
            let rec = t.state.get_agent(AGENT).unwrap();
            assert!(rec.banned, "a ban was undone: {rec:?}");
            assert!(renew(&t.state, AGENT).is_err());
            assert!(t.state.check_agent(&old).is_err());
        }
    }

    #[test]
    fn renewals_racing_an_eviction_never_revive_the_agent() {
        for _ in 0..10 {
            let t = temp_state();
            let old = attest(&t.state, AGENT);
            race(&t.state, |s| {
                let _ = s.evict_agent(AGENT);
            });
            let err = t.state.get_agent(AGENT).unwrap_err();
            assert_eq!(
                err.code(),
                tonic::Code::NotFound,
                "an evicted agent came back"
            );
            // Enrolled again (new token): the SVID from before the eviction
            // is never accepted again.
            let new = attest(&t.state, AGENT);
            assert!(t.state.check_agent(&new).is_ok());
            assert!(t.state.check_agent(&old).is_err());
        }
    }
}
