//! The SVID cache: one task owns all refresh state. It takes entry/bundle
//! updates from the sync stream, mints missing or due SVIDs in CSR batches,
//! renews each at half its lifetime (keeping the old one while renewal
//! fails), and publishes an immutable [`Snapshot`] on a `watch` channel that
//! Workload API streams read without locks.
//!
//! [`JwtCache`] holds the JWT-SVIDs handed out, bounded per entry, in count
//! and in bytes, evicting the least recently used.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prost::bytes::Bytes;
use sigil_attestors::workload::unix::UnixNeeds;
use sigil_core::entry::Entry;
use sigil_core::jwt::JwtBundle;
use sigil_core::selector::{Selector, SelectorSet};
use sigil_core::x509::BACKDATE;
use sigil_core::x509::{SvidInfo, new_key_and_csr};
use sigil_core::{SpiffeId, TrustDomain, now_unix, steady_unix};
use sigil_proto::agent::agent_api_client::AgentApiClient;
use sigil_proto::agent::{CsrForEntry, MAX_MINT_BATCH, MintX509SvidsRequest};
use sigil_proto::common::FederatedBundle;
use tokio::sync::{mpsc, watch};
use tonic::transport::Channel;

/// First retry delay after a failed mint; doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The fields of an entry that shape its X.509-SVID; a change re-mints.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SvidSpec {
    spiffe_id: SpiffeId,
    dns_names: Vec<String>,
    ttl: Option<Duration>,
}

impl SvidSpec {
    fn of(e: &Entry) -> Self {
        Self {
            spiffe_id: e.spiffe_id.clone(),
            dns_names: e.dns_names.clone(),
            ttl: e.x509_svid_ttl,
        }
    }

    /// Whether `e` still asks for this SVID (compared in place: this runs
    /// for every entry on every wake-up of the cache loop).
    fn matches(&self, e: &Entry) -> bool {
        self.spiffe_id == e.spiffe_id
            && self.dns_names == e.dns_names
            && self.ttl == e.x509_svid_ttl
    }
}

/// One issued workload SVID and its key.
pub struct CachedSvid {
    pub spiffe_id: String,
    /// DER certificates, leaf first, concatenated (the Workload API form).
    /// `Bytes`, so that every response shares it rather than copying it.
    pub chain_der: Bytes,
    /// PKCS#8 DER private key.
    pub key_der: Bytes,
    pub not_after: i64,
    /// When renewal is due: about half-way from receipt to expiry.
    /// Like `expires_at`, on the agent's [`sigil_core::steady_unix`] clock,
    /// counted from receipt over the lifetime the server's own timestamps
    /// give (notBefore is backdated by [`BACKDATE`]), so that a step of the
    /// local clock changes neither.
    refresh_at: i64,
    /// When the SVID is withdrawn, on the steady clock.
    expires_at: i64,
    spec: SvidSpec,
}

impl CachedSvid {
    /// Unix seconds (steady clock) when renewal is due.
    pub fn refresh_at(&self) -> i64 {
        self.refresh_at
    }
}

/// Seconds from receipt to renewal for an SVID living `lifetime` seconds:
/// half the lifetime, minus up to a tenth of it at random, so that SVIDs
/// issued together (an agent start, a CA rotation) do not all come back to
/// the server in the same second.
fn refresh_delay(lifetime: i64) -> i64 {
    let half = lifetime / 2;
    let spread = lifetime / 10;
    let jitter = if spread > 0 {
        let r = u64::from_le_bytes(sigil_core::ids::random_bytes::<8>());
        (r % (spread as u64 + 1)) as i64
    } else {
        0
    };
    (half - jitter).max(1)
}

/// The trust domain's CA certificates.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Bundle {
    pub certs: Vec<Vec<u8>>,
    /// The certificates concatenated (the Workload API form).
    pub concat: Bytes,
}

impl Bundle {
    pub fn new(certs: Vec<Vec<u8>>) -> Self {
        let concat = Bytes::from(certs.concat());
        Self { certs, concat }
    }
}

/// What the agent can serve right now.
#[derive(Default)]
pub struct Snapshot {
    pub trust_domain: Option<TrustDomain>,
    /// Entries this agent is authorized for, sorted by ID; shared with the
    /// cache worker (and its selector index with it) until the entries
    /// change.
    pub entries: Arc<EntrySet>,
    /// SVIDs by entry ID (shared with the cache worker until it changes them).
    pub svids: Arc<HashMap<String, Arc<CachedSvid>>>,
    pub bundle: Arc<Bundle>,
    /// JWT bundles and federated bundles.
    pub trust: Arc<TrustMaterial>,
    /// True once the first sync from the server has arrived.
    pub synced: bool,
    /// Set when the agent has been cut off from the server for longer than
    /// `serve_offline_for`: nothing is served until the sync stream is back.
    pub offline: bool,
    /// The sync stream to the server is down (since the last complete
    /// update): an SVID that expires now cannot be renewed until it is back.
    pub unreachable: bool,
}

impl Snapshot {
    /// What a caller's unix attestation must derive to be matched against
    /// this snapshot's entries.
    pub fn unix_needs(&self) -> UnixNeeds {
        self.entries.unix_needs()
    }

    /// The entries whose selectors `selectors` satisfies, in `entries` order
    /// (none while [`Snapshot::offline`]).
    pub fn entitled(&self, selectors: &SelectorSet) -> Vec<&Arc<Entry>> {
        if self.offline {
            return Vec::new();
        }
        self.entries.entitled(selectors)
    }

    /// [`Snapshot::entitled`] split into the entries the agent may serve
    /// and, for those still waiting for an approval grant, why not (the
    /// server's text, naming the approval request).
    pub fn servable(&self, selectors: &SelectorSet) -> (Vec<&Arc<Entry>>, Vec<&str>) {
        let mut serve = Vec::new();
        let mut pending = Vec::new();
        // Through `entitled`, which serves nothing while offline.
        for e in self.entitled(selectors) {
            match &e.approval_pending {
                Some(why) => pending.push(why.as_str()),
                None => serve.push(e),
            }
        }
        (serve, pending)
    }
}

/// An agent's entries, sorted by ID, with a selector index built on first
/// use.
pub struct EntrySet {
    list: Vec<Arc<Entry>>,
    index: OnceLock<EntryIndex>,
    /// The costlier unix selectors any of these entries names: what a
    /// caller's attestation must derive to be matched against them.
    unix_needs: UnixNeeds,
}

impl Default for EntrySet {
    fn default() -> Self {
        Self::new(Vec::new())
    }
}

impl EntrySet {
    /// The set of `entries` (sorted by ID here unless they already are).
    pub fn new(mut entries: Vec<Arc<Entry>>) -> Self {
        if !entries.is_sorted_by(|a, b| a.id <= b.id) {
            entries.sort_by(|a, b| a.id.cmp(&b.id));
        }
        let unix_needs = UnixNeeds::of(entries.iter().flat_map(|e| e.selectors.iter()));
        Self {
            list: entries,
            index: OnceLock::new(),
            unix_needs,
        }
    }

    /// The costlier unix selectors these entries use (see [`UnixNeeds`]).
    pub fn unix_needs(&self) -> UnixNeeds {
        self.unix_needs
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn iter(&self) -> std::slice::Iter<'_, Arc<Entry>> {
        self.list.iter()
    }

    /// The entry with this ID.
    pub fn get(&self, id: &str) -> Option<&Arc<Entry>> {
        self.list
            .binary_search_by(|e| e.id.as_str().cmp(id))
            .ok()
            .and_then(|i| self.list.get(i))
    }

    /// The entries whose selectors `selectors` satisfies, in ID order.
    pub fn entitled(&self, selectors: &SelectorSet) -> Vec<&Arc<Entry>> {
        let index = self.index.get_or_init(|| EntryIndex::new(&self.list));
        let mut found: Vec<usize> = selectors
            .iter()
            .filter_map(|s| index.by_selector.get(s))
            .flatten()
            .copied()
            .collect();
        found.sort_unstable();
        found
            .into_iter()
            .filter_map(|i| self.list.get(i))
            .filter(|e| selectors.satisfies(&e.selectors))
            .collect()
    }
}

/// Positions in [`Snapshot::entries`], each filed under one selector of its
/// entry: the one the fewest entries have. A caller satisfies an entry only
/// if it has all of the entry's selectors, so it has the one the entry is
/// filed under; looking up each of the caller's selectors thus finds every
/// candidate exactly once, and only candidates need the full subset check.
/// Entries without selectors match nobody and are not filed.
#[derive(Default)]
struct EntryIndex {
    by_selector: HashMap<Selector, Vec<usize>>,
}

impl EntryIndex {
    fn new(entries: &[Arc<Entry>]) -> Self {
        let mut counts: HashMap<&Selector, usize> = HashMap::new();
        for e in entries {
            for s in &e.selectors {
                *counts.entry(s).or_default() += 1;
            }
        }
        let mut by_selector: HashMap<Selector, Vec<usize>> = HashMap::new();
        for (i, e) in entries.iter().enumerate() {
            if let Some(key) = e
                .selectors
                .iter()
                .min_by_key(|s| counts.get(s).copied().unwrap_or(0))
            {
                by_selector.entry(key.clone()).or_default().push(i);
            }
        }
        Self { by_selector }
    }
}

/// Trust material beyond the own X.509 bundle, replaced as a whole when
/// the server sends a change.
#[derive(Default)]
pub struct TrustMaterial {
    /// This trust domain's JWKS document, as received.
    pub jwks: Vec<u8>,
    /// Federated bundles by trust domain name, as received.
    pub federated: BTreeMap<String, FederatedBundle>,
    /// Federated X.509 authorities, concatenated DER, by trust domain ID (`spiffe://td`).
    pub federated_x509: BTreeMap<String, Bytes>,
    /// Parsed JWT bundles (own and federated) for validation.
    pub jwt_bundles: BTreeMap<TrustDomain, JwtBundle>,
    /// SPIFFE IDs withdrawn by a kill (sorted): ValidateJWTSVID rejects
    /// their tokens.
    pub killed: Vec<String>,
    /// The trust domain's CRLs (DER), as received: delivered in the
    /// Workload API's `crl` fields.
    pub crl: Vec<Bytes>,
    /// This trust domain's WIT-SVID authorities (JWKS of `use: wit-svid`
    /// keys), as received: `FetchWITBundles` serves it.
    pub wit_jwks: Vec<u8>,
}

impl TrustMaterial {
    /// Parses the JWT and federated bundles of a sync update (the agent's
    /// own trust domain is `td`); invalid documents are skipped.
    #[doc(hidden)]
    pub fn new(
        td: &TrustDomain,
        jwks: Vec<u8>,
        federated: BTreeMap<String, FederatedBundle>,
    ) -> Self {
        let mut jwt_bundles = BTreeMap::new();
        match JwtBundle::from_jwks(&jwks) {
            Ok(b) => {
                jwt_bundles.insert(td.clone(), b);
            }
            Err(e) if !jwks.is_empty() => {
                tracing::warn!(error = %e, "server sent an invalid JWT bundle")
            }
            Err(_) => {}
        }
        let mut federated_x509 = BTreeMap::new();
        for (name, b) in &federated {
            let Ok(ftd) = TrustDomain::new(name) else {
                continue;
            };
            if !b.x509_authorities.is_empty() {
                federated_x509.insert(ftd.id_string(), Bytes::from(b.x509_authorities.concat()));
            }
            if !b.jwt_bundle.is_empty()
                && let Ok(j) = JwtBundle::from_jwks(&b.jwt_bundle)
            {
                jwt_bundles.insert(ftd, j);
            }
        }
        Self {
            jwks,
            federated,
            federated_x509,
            jwt_bundles,
            killed: Vec::new(),
            crl: Vec::new(),
            wit_jwks: Vec::new(),
        }
    }
}

/// What the sync loop tells the cache.
pub enum SyncEvent {
    /// A complete update arrived (the server is reachable).
    State(SyncState),
    /// The sync stream failed or ended: the agent is offline from now
    /// until the next [`SyncEvent::State`].
    Lost,
}

/// A sync message from the server, already validated.
pub struct SyncState {
    /// Shared with the sync loop's own map: one copy of each entry.
    pub entries: Vec<Arc<Entry>>,
    pub bundle: Vec<Vec<u8>>,
    pub jwt_bundle: Vec<u8>,
    pub federated: BTreeMap<String, FederatedBundle>,
    /// SPIFFE IDs withdrawn by a kill: their JWT-SVIDs fail validation.
    pub killed: Vec<String>,
    /// CRLs of the trust domain's CAs (DER).
    pub crl: Vec<Vec<u8>>,
    /// JWKS of the trust domain's WIT-SVID authorities.
    pub wit_bundle: Vec<u8>,
}

/// The cache worker.
pub struct Cache {
    td: TrustDomain,
    channel: watch::Receiver<Channel>,
    updates: mpsc::Receiver<SyncEvent>,
    out: watch::Sender<Arc<Snapshot>>,
    entries: Arc<EntrySet>,
    /// Shared with the published snapshot: copied (on write) only when
    /// the SVIDs change, not on every publish.
    svids: Arc<HashMap<String, Arc<CachedSvid>>>,
    bundle: Arc<Bundle>,
    trust: Arc<TrustMaterial>,
    synced: bool,
    backoff: sigil_core::backoff::Backoff,
    retry_at: Option<tokio::time::Instant>,
    /// `serve_offline_for`: how long SVIDs are served without the server.
    serve_offline_for: Option<Duration>,
    /// Since when the sync stream has been down.
    offline_since: Option<tokio::time::Instant>,
    /// The offline limit has passed: SVIDs dropped, nothing served.
    offline: bool,
    /// The clock-skew warning was logged (once per agent run).
    skew_warned: bool,
}

/// Seconds of difference between this node's clock and the server's
/// (read off each SVID's notBefore) above which the agent warns.
const CLOCK_SKEW_WARNING: i64 = 60;

impl Cache {
    pub fn new(
        td: TrustDomain,
        channel: watch::Receiver<Channel>,
        updates: mpsc::Receiver<SyncEvent>,
        bundle: Vec<Vec<u8>>,
        serve_offline_for: Option<Duration>,
    ) -> (Self, watch::Receiver<Arc<Snapshot>>) {
        let bundle = Arc::new(Bundle::new(bundle));
        let (out, rx) = watch::channel(Arc::new(Snapshot {
            trust_domain: Some(td.clone()),
            bundle: bundle.clone(),
            ..Default::default()
        }));
        (
            Self {
                td,
                channel,
                updates,
                out,
                entries: Arc::default(),
                svids: Arc::default(),
                bundle,
                trust: Arc::new(TrustMaterial::default()),
                synced: false,
                backoff: sigil_core::backoff::Backoff::new(MIN_BACKOFF, MAX_BACKOFF),
                retry_at: None,
                serve_offline_for,
                offline_since: None,
                offline: false,
                skew_warned: false,
            },
            rx,
        )
    }

    fn event(&mut self, ev: SyncEvent) {
        match ev {
            SyncEvent::State(s) => {
                if self.offline {
                    tracing::info!("the server is reachable again: serving");
                }
                self.offline_since = None;
                self.offline = false;
                self.apply(s);
            }
            SyncEvent::Lost => {
                if self.offline_since.is_none() {
                    self.offline_since = Some(tokio::time::Instant::now());
                    // Callers waiting for a first SVID learn that none is coming.
                    self.publish();
                }
            }
        }
    }

    fn apply(&mut self, s: SyncState) {
        let crl: Vec<Bytes> = s.crl.into_iter().map(Bytes::from).collect();
        self.entries = Arc::new(EntrySet::new(s.entries));
        // Entries gone, or waiting for an approval grant (again), keep no SVID.
        let keep = |entries: &EntrySet, id: &str| {
            entries
                .get(id)
                .is_some_and(|e| e.approval_pending.is_none())
        };
        if self.svids.keys().any(|id| !keep(&self.entries, id)) {
            let entries = &self.entries;
            Arc::make_mut(&mut self.svids).retain(|id, _| keep(entries, id));
        }
        if s.bundle != self.bundle.certs {
            self.bundle = Arc::new(Bundle::new(s.bundle));
        }
        if s.jwt_bundle != self.trust.jwks
            || s.federated != self.trust.federated
            || s.killed != self.trust.killed
            || crl != self.trust.crl
            || s.wit_bundle != self.trust.wit_jwks
        {
            let mut trust = TrustMaterial::new(&self.td, s.jwt_bundle, s.federated);
            trust.killed = s.killed;
            trust.crl = crl;
            trust.wit_jwks = s.wit_bundle;
            self.trust = Arc::new(trust);
        }
        self.synced = true;
    }

    fn due(&self, now: i64) -> Vec<Arc<Entry>> {
        self.entries
            .iter()
            // Nothing is minted for an entry still waiting for approval.
            .filter(|e| e.approval_pending.is_none())
            .filter(|e| match self.svids.get(&e.id) {
                None => true,
                Some(s) => !s.spec.matches(e) || now >= s.refresh_at || now >= s.expires_at,
            })
            .cloned()
            .collect()
    }

    fn publish(&self) {
        self.out.send_replace(Arc::new(Snapshot {
            trust_domain: Some(self.td.clone()),
            entries: self.entries.clone(),
            svids: self.svids.clone(),
            bundle: self.bundle.clone(),
            trust: self.trust.clone(),
            synced: self.synced,
            offline: self.offline,
            unreachable: self.offline_since.is_some(),
        }));
    }

    /// Mints one batch; returns how many SVIDs were stored.
    async fn mint(&mut self, batch: &[Arc<Entry>]) -> Result<usize, tonic::Status> {
        let mut keys = HashMap::with_capacity(batch.len());
        let mut csrs = Vec::with_capacity(batch.len());
        for e in batch {
            let (csr, key) =
                new_key_and_csr().map_err(|e| tonic::Status::internal(e.to_string()))?;
            keys.insert(e.id.clone(), key);
            csrs.push(CsrForEntry {
                entry_id: e.id.clone(),
                csr: csr.into(),
            });
        }
        let ch = self.channel.borrow().clone();
        let resp = AgentApiClient::new(ch)
            .mint_x509_svids(MintX509SvidsRequest { csrs })
            .await?
            .into_inner();
        let mut stored = 0;
        let received = steady_unix();
        let wall = now_unix();
        for r in resp.results {
            if !r.error.is_empty() {
                tracing::warn!(entry = %r.entry_id, error = %r.error, "server refused to mint");
                continue;
            }
            let (Some(key), Some(entry)) =
                (keys.remove(&r.entry_id), self.entries.get(&r.entry_id))
            else {
                continue;
            };
            let Some(leaf) = r.svid_chain.first() else {
                continue;
            };
            let info = match SvidInfo::from_der(leaf) {
                Ok(i) if i.spiffe_id == entry.spiffe_id => i,
                Ok(i) => {
                    tracing::error!(entry = %r.entry_id, got = %i.spiffe_id, "server minted the wrong SPIFFE ID; discarded");
                    continue;
                }
                Err(e) => {
                    tracing::error!(entry = %r.entry_id, error = %e, "server returned an invalid SVID; discarded");
                    continue;
                }
            };
            // The server signed at notBefore + BACKDATE by its clock.
            let issued = info.not_before + BACKDATE.as_secs() as i64;
            let lifetime = (info.not_after - issued).max(1);
            let skew = wall - issued;
            if skew.abs() > CLOCK_SKEW_WARNING && !self.skew_warned {
                tracing::warn!(
                    skew_seconds = skew,
                    "this node's clock differs from the server's: SVIDs are renewed and withdrawn by their lifetime, not by the local clock; fix the clock (NTP)"
                );
                self.skew_warned = true;
            }
            Arc::make_mut(&mut self.svids).insert(
                r.entry_id.clone(),
                Arc::new(CachedSvid {
                    spiffe_id: info.spiffe_id.to_string(),
                    chain_der: Bytes::from(r.svid_chain.concat()),
                    key_der: Bytes::from(key),
                    not_after: info.not_after,
                    refresh_at: received + refresh_delay(lifetime),
                    expires_at: received + lifetime,
                    spec: SvidSpec::of(entry),
                }),
            );
            stored += 1;
        }
        Ok(stored)
    }

    /// Runs until the update channel closes.
    pub async fn run(mut self) {
        loop {
            let now = steady_unix();
            let can_try = self
                .retry_at
                .is_none_or(|t| tokio::time::Instant::now() >= t);
            // Cut off for longer than serve_offline_for: serve nothing.
            if let (Some(since), Some(limit)) = (self.offline_since, self.serve_offline_for)
                && !self.offline
                && tokio::time::Instant::now() >= since + limit
            {
                tracing::error!(
                    limit = ?limit,
                    "no contact with the server for longer than serve_offline_for: dropping every SVID and serving nothing until it is back"
                );
                self.offline = true;
                Arc::make_mut(&mut self.svids).clear();
                self.publish();
            }
            let due = if can_try && !self.offline {
                self.due(now)
            } else {
                vec![]
            };
            let mut changed = false;
            if !due.is_empty() {
                let mut failed = false;
                // Calls filled to the server's cap: a rotation of many SVIDs
                // pays each call's fixed cost (above all its audit commit)
                // as few times as it can.
                for chunk in due.chunks(MAX_MINT_BATCH) {
                    match self.mint(chunk).await {
                        Ok(n) => changed |= n > 0,
                        Err(st) => {
                            tracing::warn!(code = ?st.code(), error = %st.message(), "minting failed; keeping current SVIDs and retrying");
                            failed = true;
                            break;
                        }
                    }
                }
                if failed {
                    self.retry_at = Some(tokio::time::Instant::now() + self.backoff.next_delay());
                } else {
                    self.retry_at = None;
                    self.backoff.reset();
                }
            }
            // Expired SVIDs are never served.
            if self.svids.values().any(|s| s.expires_at <= now) {
                Arc::make_mut(&mut self.svids).retain(|_, s| s.expires_at > now);
                changed = true;
            }
            if changed {
                self.publish();
            }

            // Sleep until the next refresh, a retry, or an update.
            let next_refresh = self
                .svids
                .values()
                .map(|s| s.refresh_at.min(s.expires_at))
                .min();
            let mut wake = match next_refresh {
                Some(t) => {
                    tokio::time::Instant::now()
                        + Duration::from_secs((t - steady_unix()).max(0) as u64)
                }
                None => tokio::time::Instant::now() + Duration::from_secs(3600),
            };
            if let Some(r) = self.retry_at {
                wake = wake.min(r);
            }
            if let (Some(since), Some(limit), false) =
                (self.offline_since, self.serve_offline_for, self.offline)
            {
                wake = wake.min(since + limit);
            }
            tokio::select! {
                u = self.updates.recv() => match u {
                    Some(ev) => {
                        self.event(ev);
                        // Drain whatever else queued up; only the newest matters.
                        while let Ok(ev) = self.updates.try_recv() {
                            self.event(ev);
                        }
                        self.retry_at = None;
                        self.publish();
                    }
                    None => return,
                },
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }
}

/// Most JWT-SVIDs cached for one entry (one per audience set).
pub const JWT_CACHE_PER_ENTRY: usize = 32;
/// Most JWT-SVIDs cached in total.
pub const JWT_CACHE_TOTAL: usize = 4096;
/// Most bytes (tokens, audiences, entry IDs) the JWT cache holds.
pub const JWT_CACHE_BYTES: usize = 16 * 1024 * 1024;

/// One cached JWT-SVID.
struct CachedJwt {
    token: String,
    issued_at: i64,
    expires_at: i64,
    last_used: u64,
    bytes: usize,
}

/// JWT-SVIDs by (entry ID, sorted audiences): each is handed out again
/// while more than half its lifetime remains. Bounded by
/// [`JwtCacheCaps`]; when full, the least recently used token goes first
/// (of the same entry, if that entry is at its cap). Expired tokens are
/// dropped on every insert.
pub struct JwtCache {
    caps: JwtCacheCaps,
    tokens: HashMap<(String, Vec<String>), CachedJwt>,
    per_entry: HashMap<String, usize>,
    bytes: usize,
    clock: u64,
}

/// The bounds of a [`JwtCache`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JwtCacheCaps {
    pub per_entry: usize,
    pub total: usize,
    pub bytes: usize,
}

impl Default for JwtCacheCaps {
    fn default() -> Self {
        Self {
            per_entry: JWT_CACHE_PER_ENTRY,
            total: JWT_CACHE_TOTAL,
            bytes: JWT_CACHE_BYTES,
        }
    }
}

impl JwtCache {
    pub fn new(caps: JwtCacheCaps) -> Self {
        Self {
            caps,
            tokens: HashMap::new(),
            per_entry: HashMap::new(),
            bytes: 0,
            clock: 0,
        }
    }

    /// Tokens cached now.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Bytes cached now.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The cached token for `entry_id` and `audience` if more than half of
    /// its lifetime remains at `now`.
    pub fn get(&mut self, entry_id: &str, audience: &[String], now: i64) -> Option<String> {
        self.clock += 1;
        let clock = self.clock;
        let key = (entry_id.to_string(), audience.to_vec());
        let c = self.tokens.get_mut(&key)?;
        if now < c.issued_at + (c.expires_at - c.issued_at) / 2 {
            c.last_used = clock;
            Some(c.token.clone())
        } else {
            None
        }
    }

    /// Caches `token`, evicting as needed; a token that alone exceeds the
    /// byte bound is not cached.
    pub fn insert(
        &mut self,
        entry_id: &str,
        audience: &[String],
        token: String,
        issued_at: i64,
        expires_at: i64,
        now: i64,
    ) {
        self.clock += 1;
        let key = (entry_id.to_string(), audience.to_vec());
        self.remove(&key);
        let expired: Vec<_> = self
            .tokens
            .iter()
            .filter(|(_, c)| c.expires_at <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for k in expired {
            self.remove(&k);
        }
        let bytes = token.len() + entry_id.len() + audience.iter().map(String::len).sum::<usize>();
        if bytes > self.caps.bytes || self.caps.per_entry == 0 || self.caps.total == 0 {
            return;
        }
        while self.per_entry.get(entry_id).copied().unwrap_or(0) >= self.caps.per_entry {
            if !self.evict_lru(Some(entry_id)) {
                break;
            }
        }
        while self.tokens.len() >= self.caps.total || self.bytes + bytes > self.caps.bytes {
            if !self.evict_lru(None) {
                break;
            }
        }
        *self.per_entry.entry(entry_id.to_string()).or_insert(0) += 1;
        self.bytes += bytes;
        self.tokens.insert(
            key,
            CachedJwt {
                token,
                issued_at,
                expires_at,
                last_used: self.clock,
                bytes,
            },
        );
    }

    fn remove(&mut self, key: &(String, Vec<String>)) {
        if let Some(c) = self.tokens.remove(key) {
            self.bytes -= c.bytes;
            if let Some(n) = self.per_entry.get_mut(&key.0) {
                *n -= 1;
                if *n == 0 {
                    self.per_entry.remove(&key.0);
                }
            }
        }
    }

    /// Evicts the least recently used token (of `entry` only, if given);
    /// false if there was none.
    fn evict_lru(&mut self, entry: Option<&str>) -> bool {
        let victim = self
            .tokens
            .iter()
            .filter(|(k, _)| entry.is_none_or(|e| k.0 == e))
            .min_by_key(|(_, c)| c.last_used)
            .map(|(k, _)| k.clone());
        match victim {
            Some(k) => {
                self.remove(&k);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use sigil_core::SpiffeId;

    pub(crate) fn entry(id: usize, selectors: &[&str]) -> Arc<Entry> {
        Arc::new(Entry {
            id: format!("e{id:03}"),
            spiffe_id: SpiffeId::new(format!("spiffe://example.org/w{id}")).unwrap(),
            parent_id: SpiffeId::new("spiffe://example.org/agent").unwrap(),
            selectors: selectors.iter().map(|s| s.parse().unwrap()).collect(),
            x509_svid_ttl: None,
            jwt_svid_ttl: None,
            dns_names: vec![],
            hint: String::new(),
            federates_with: vec![],
            admin: false,
            downstream: false,
            node: false,
            owner: String::new(),
            expires_at: None,
            description: String::new(),
            require_approval: false,
            jwt_claims: Default::default(),
            delegable_scopes: vec![],
            wit_svid: false,
            approval_pending: None,
            approved_until: None,
            task_ttl_max: None,
            revision: 1,
            created_at: 0,
        })
    }

    pub(crate) fn set(selectors: &[&str]) -> SelectorSet {
        selectors.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn the_entry_index_finds_exactly_what_a_full_scan_finds() {
        let pool = [
            "unix:uid:1000",
            "unix:uid:1001",
            "unix:gid:1000",
            "unix:user:alice",
            "unix:path:/usr/bin/a",
            "unix:path:/usr/bin/b",
            "unix:supplementary_gid:27",
            "docker:label:app:x",
        ];
        // Every subset of the pool (up to 3 selectors) as an entry, plus
        // one without selectors, which must match nobody.
        let mut entries = vec![entry(0, &[])];
        for a in 0..pool.len() {
            entries.push(entry(entries.len(), &[pool[a]]));
            for b in a + 1..pool.len() {
                let mut sel = vec![pool[a], pool[b]];
                sel.sort();
                entries.push(entry(entries.len(), &sel));
                for c in b + 1..pool.len() {
                    let mut sel = vec![pool[a], pool[b], pool[c]];
                    sel.sort();
                    entries.push(entry(entries.len(), &sel));
                }
            }
        }
        let snap = Snapshot {
            entries: Arc::new(EntrySet::new(entries)),
            ..Default::default()
        };
        for mask in 0u32..(1 << pool.len()) {
            let callers: Vec<&str> = (0..pool.len())
                .filter(|i| mask & (1 << i) != 0)
                .map(|i| pool[i])
                .collect();
            let caller = set(&callers);
            let scan: Vec<&str> = snap
                .entries
                .iter()
                .filter(|e| caller.satisfies(&e.selectors))
                .map(|e| e.id.as_str())
                .collect();
            let indexed: Vec<&str> = snap
                .entitled(&caller)
                .into_iter()
                .map(|e| e.id.as_str())
                .collect();
            assert_eq!(indexed, scan, "caller {callers:?}");
        }
        assert!(snap.entitled(&set(&["unix:uid:1000"])).len() == 1);
    }

    #[test]
    fn renewal_lands_between_forty_and_fifty_percent_of_the_lifetime() {
        for _ in 0..200 {
            let d = refresh_delay(3600);
            assert!((1440..=1800).contains(&d), "{d}");
        }
        assert_eq!(refresh_delay(1), 1);
        assert_eq!(refresh_delay(4), 2);
    }

    fn aud(n: usize) -> Vec<String> {
        vec![format!("aud-{n}")]
    }

    #[test]
    fn jwt_cache_evicts_the_least_recently_used_token_of_a_full_entry() {
        let mut c = JwtCache::new(JwtCacheCaps {
            per_entry: 3,
            total: 100,
            bytes: 1 << 20,
        });
        for n in 0..3 {
            c.insert("e1", &aud(n), format!("t{n}"), 0, 100, 0);
        }
        c.insert("e2", &aud(0), "other".into(), 0, 100, 0);
        // aud-0 used last: aud-1 is the least recently used of e1.
        assert_eq!(c.get("e1", &aud(0), 10).as_deref(), Some("t0"));
        c.insert("e1", &aud(3), "t3".into(), 0, 100, 10);
        assert_eq!(c.len(), 4);
        assert!(c.get("e1", &aud(1), 10).is_none(), "evicted");
        assert!(c.get("e1", &aud(0), 10).is_some());
        assert!(c.get("e1", &aud(2), 10).is_some());
        assert!(
            c.get("e2", &aud(0), 10).is_some(),
            "other entries untouched"
        );
    }

    #[test]
    fn jwt_cache_is_bounded_in_total_and_in_bytes() {
        let mut c = JwtCache::new(JwtCacheCaps {
            per_entry: 100,
            total: 5,
            bytes: 1 << 20,
        });
        for n in 0..20 {
            c.insert(&format!("e{n}"), &aud(n), "tok".into(), 0, 100, 0);
            assert!(c.len() <= 5);
        }
        assert!(c.get("e19", &aud(19), 1).is_some(), "newest kept");
        assert!(c.get("e0", &aud(0), 1).is_none(), "oldest gone");

        let mut c = JwtCache::new(JwtCacheCaps {
            per_entry: 100,
            total: 100,
            bytes: 1000,
        });
        for n in 0..10 {
            c.insert("e", &aud(n), "x".repeat(300), 0, 100, 0);
            assert!(c.bytes() <= 1000, "{}", c.bytes());
        }
        assert_eq!(c.len(), 3);
        c.insert("e", &aud(99), "x".repeat(2000), 0, 100, 0);
        assert!(c.get("e", &aud(99), 1).is_none(), "too big to cache");
    }

    #[test]
    fn jwt_cache_serves_until_half_life_and_drops_expired_tokens() {
        let mut c = JwtCache::new(JwtCacheCaps::default());
        c.insert("e", &aud(1), "t".into(), 100, 200, 100);
        assert!(c.get("e", &aud(1), 149).is_some());
        assert!(c.get("e", &aud(1), 150).is_none(), "half-life reached");
        c.insert("e", &aud(2), "u".into(), 300, 400, 300);
        assert_eq!(c.len(), 1, "the expired token was dropped");
    }
}
