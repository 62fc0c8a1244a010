//! The agent's own identity: node attestation with a join token, the agent
//! SVID and key on disk (`agent_svid.pem`, `agent_svid.key` 0600,
//! `bundle.pem` under `data_dir`), renewal at half-life, and the sync stream
//! that feeds the SVID cache, reconnecting with backoff.

use sigil_core::backoff::Backoff;
use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use sigil_core::entry::Entry;
use sigil_core::ids::server_id;
use sigil_core::x509::{SvidInfo, certs_to_pem, new_key_and_csr, pem_to_certs};
use sigil_core::{SpiffeId, TrustDomain, now_unix};
use sigil_proto::agent::agent_api_client::AgentApiClient;
use sigil_proto::agent::{RenewAgentRequest, SyncRequest, SyncUpdate};
use tokio::sync::{mpsc, watch};
use tonic::transport::Channel;

use crate::attestation::Prover;
use crate::cache::{SyncEvent, SyncState};
use crate::config::{AgentConfig, Bootstrap};
use crate::server_client;
use sigil_core::tls::{ServerTrust, SharedBundle, SvidCertResolver, client_config};

/// The agent's SVID and key.
#[derive(Clone)]
pub struct AgentSvid {
    pub spiffe_id: SpiffeId,
    pub chain: Vec<Vec<u8>>,
    pub key: Vec<u8>,
    pub not_after: i64,
    /// When renewal is due, on the steady clock ([`sigil_core::steady_unix`]):
    /// half of the life left at `received_at`, so that a later step of the
    /// system clock neither delays nor hastens it.
    renew_at: i64,
}

impl AgentSvid {
    /// `received_at`: the wall clock when the SVID was obtained (or read
    /// from disk).
    pub(crate) fn new(chain: Vec<Vec<u8>>, key: Vec<u8>, received_at: i64) -> Result<Self, String> {
        let leaf = chain.first().ok_or("empty agent SVID chain")?;
        let info = SvidInfo::from_der(leaf).map_err(|e| format!("agent SVID: {e}"))?;
        // The life left by this node's clock, and no more than the life
        // the server gave it by its own (notBefore is backdated).
        let issued = info.not_before + sigil_core::x509::BACKDATE.as_secs() as i64;
        let left = (info.not_after - received_at).min(info.not_after - issued);
        Ok(Self {
            spiffe_id: info.spiffe_id,
            chain,
            key,
            not_after: info.not_after,
            renew_at: sigil_core::steady_unix() + (left / 2).max(1),
        })
    }

    fn renew_at(&self) -> i64 {
        self.renew_at
    }
}

/// Persists the agent SVID, key (0600) and bundle; makes `data_dir` again
/// (0700) when it has been removed.
pub fn store_identity(data_dir: &Path, svid: &AgentSvid, bundle: &[Vec<u8>]) -> Result<(), String> {
    if !data_dir.exists() {
        tracing::warn!(data_dir = %data_dir.display(), "data_dir is gone: making it again");
    }
    sigil_fs::ensure_private_dir(data_dir)
        .map_err(|e| format!("data_dir {}: {e}", data_dir.display()))?;
    let key_pem = pem::encode(&pem::Pem::new("PRIVATE KEY", svid.key.clone()));
    let e = |p: &str, err: std::io::Error| format!("{}: {err}", data_dir.join(p).display());
    sigil_fs::write_atomic(&data_dir.join("agent_svid.key"), key_pem.as_bytes(), 0o600)
        .map_err(|err| e("agent_svid.key", err))?;
    sigil_fs::write_atomic(
        &data_dir.join("agent_svid.pem"),
        certs_to_pem(svid.chain.iter().map(Vec::as_slice)).as_bytes(),
        0o644,
    )
    .map_err(|err| e("agent_svid.pem", err))?;
    sigil_fs::write_atomic(
        &data_dir.join("bundle.pem"),
        certs_to_pem(bundle.iter().map(Vec::as_slice)).as_bytes(),
        0o644,
    )
    .map_err(|err| e("bundle.pem", err))?;
    Ok(())
}

/// A stored agent SVID and the bundle stored with it.
pub type StoredIdentity = (AgentSvid, Vec<Vec<u8>>);

/// Loads a stored, unexpired identity, if any. Missing, unparsable or
/// expired files mean `Ok(None)` (attest again). Files that cannot be trusted
/// are an error, never silently replaced: the key must be a regular file
/// (not a link) owned by this process's uid or root with mode 0600 or
/// stricter, and the certificate and bundle (which decide whom the agent
/// trusts) must be owned likewise and not writable by group or others.
pub fn load_identity(data_dir: &Path, td: &TrustDomain) -> Result<Option<StoredIdentity>, String> {
    use sigil_fs::{Links, read_private_file, read_trusted_file};
    let read = |name: &str, private: bool| -> Result<Option<String>, String> {
        let path = data_dir.join(name);
        let r = if private {
            read_private_file(&path, Links::Refuse)
        } else {
            read_trusted_file(&path, Links::Refuse)
        };
        match r {
            Ok(b) => Ok(String::from_utf8(b).ok()),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(format!("stored agent identity: {e}")),
        }
    };
    let (Some(key), Some(chain), Some(bundle)) = (
        read("agent_svid.key", true)?,
        read("agent_svid.pem", false)?,
        read("bundle.pem", false)?,
    ) else {
        return Ok(None);
    };
    let parsed = (|| {
        let key = pem::parse(key)
            .map_err(|e| format!("agent_svid.key: {e}"))?
            .into_contents();
        let chain = pem_to_certs(&chain).map_err(|e| format!("agent_svid.pem: {e}"))?;
        let bundle = pem_to_certs(&bundle).map_err(|e| format!("bundle.pem: {e}"))?;
        let svid = AgentSvid::new(chain, key, now_unix())
            .map_err(|e| format!("agent_svid.pem with agent_svid.key: {e}"))?;
        if !svid.spiffe_id.is_member_of(td) {
            return Err(format!(
                "agent_svid.pem: {} is not in trust domain {td}",
                svid.spiffe_id
            ));
        }
        if svid.not_after <= now_unix() + 1 {
            return Err(format!("agent_svid.pem: expired at {}", svid.not_after));
        }
        Ok((svid, bundle))
    })();
    // An unusable identity is attested again (x509pop and TPM agents can;
    // a join-token agent needs a new token), never repaired in place.
    Ok(parsed
        .inspect_err(|reason| {
            tracing::warn!(
                data_dir = %data_dir.display(),
                %reason,
                "the stored agent identity is unusable: attesting again"
            );
        })
        .ok())
}

/// First attestation, over TLS that authenticates the server by the
/// bootstrap bundle (or not at all with `insecure_bootstrap`).
pub async fn bootstrap_attest(
    cfg: &AgentConfig,
    prover: &Prover,
) -> Result<(AgentSvid, Vec<Vec<u8>>), String> {
    let trust = match &cfg.bootstrap {
        Bootstrap::BundleFile(p) => {
            let text = fs::read_to_string(p)
                .map_err(|e| format!("trust_bundle_path {}: {e}", p.display()))?;
            let certs = pem_to_certs(&text)
                .map_err(|e| format!("trust_bundle_path {}: {e}", p.display()))?;
            ServerTrust::Spiffe {
                bundle: Arc::new(RwLock::new(certs)),
                expected: server_id(&cfg.trust_domain),
            }
        }
        Bootstrap::Insecure => {
            tracing::warn!(
                "insecure_bootstrap: the server is NOT authenticated for node attestation; use trust_bundle_path in production"
            );
            ServerTrust::Insecure
        }
    };
    let tls = client_config(trust, Arc::new(SvidCertResolver::default()))?;
    let ch = server_client::channel(&cfg.servers, Arc::default(), tls)?;
    let (svid, bundle) = crate::attestation::attest(ch, prover).await?;
    if !svid.spiffe_id.is_member_of(&cfg.trust_domain) {
        return Err(format!(
            "server issued {} outside trust domain {}",
            svid.spiffe_id, cfg.trust_domain
        ));
    }
    Ok((svid, bundle))
}

/// The agent's live connection to the server: the current SVID (presented
/// as client certificate), the bundle used to verify the server, and the
/// channel, replaced after every renewal so new calls use the new SVID.
pub struct ServerLink {
    cfg: AgentConfig,
    /// For x509pop/TPM agents: renewals re-attest with fresh evidence.
    prover: Option<Arc<Prover>>,
    pub svid: watch::Sender<AgentSvid>,
    pub bundle: SharedBundle,
    resolver: Arc<SvidCertResolver>,
    pub channel: watch::Sender<Channel>,
    /// The server last connected to (failover starts there).
    preferred: Arc<server_client::Preferred>,
}

impl ServerLink {
    pub fn new(
        cfg: AgentConfig,
        svid: AgentSvid,
        bundle: Vec<Vec<u8>>,
        prover: Option<Arc<Prover>>,
    ) -> Result<Arc<Self>, String> {
        let resolver = Arc::new(SvidCertResolver::default());
        resolver.set(&svid.chain, &svid.key)?;
        let bundle: SharedBundle = Arc::new(RwLock::new(bundle));
        let preferred = Arc::<server_client::Preferred>::default();
        let ch = Self::make_channel(&cfg, &bundle, &resolver, &preferred)?;
        Ok(Arc::new(Self {
            preferred,
            cfg,
            prover: prover.filter(|p| p.reattests()),
            svid: watch::channel(svid).0,
            bundle,
            resolver,
            channel: watch::channel(ch).0,
        }))
    }

    fn make_channel(
        cfg: &AgentConfig,
        bundle: &SharedBundle,
        resolver: &Arc<SvidCertResolver>,
        preferred: &Arc<server_client::Preferred>,
    ) -> Result<Channel, String> {
        let trust = ServerTrust::Spiffe {
            bundle: bundle.clone(),
            expected: server_id(&cfg.trust_domain),
        };
        let tls = client_config(trust, resolver.clone())?;
        server_client::channel(&cfg.servers, preferred.clone(), tls)
    }

    fn set_bundle(&self, certs: &[Vec<u8>]) {
        if let Ok(mut b) = self.bundle.write()
            && *b != certs
        {
            *b = certs.to_vec();
        }
    }

    /// Renews the agent SVID at half-life, forever; retries with backoff.
    pub async fn renew_loop(self: Arc<Self>) {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30)).jittered();
        loop {
            let at = self.svid.borrow().renew_at();
            let wait = (at - sigil_core::steady_unix()).max(0) as u64;
            tokio::time::sleep(Duration::from_secs(wait)).await;
            match self.renew_once().await {
                Ok(()) => {
                    backoff.reset();
                    tracing::info!(
                        not_after = self.svid.borrow().not_after,
                        "renewed agent SVID"
                    );
                }
                Err(e) => {
                    tracing::warn!(error = %e, "agent SVID renewal failed; retrying");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
    }

    async fn renew_once(&self) -> Result<(), String> {
        let ch = self.channel.borrow().clone();
        // An SVID that ran out (the server was away longer than its life)
        // is refused at the handshake, so it cannot be renewed with.
        let expired = self.svid.borrow().not_after <= now_unix();
        let (svid, bundle) = match &self.prover {
            // Fresh evidence (new nonce, new quote) on every renewal; once
            // the SVID has expired, over a connection that presents none,
            // as at the first attestation (the server is still
            // authenticated by the current bundle).
            Some(prover) if expired => {
                tracing::warn!("the agent SVID expired: attesting again");
                let anonymous = Arc::new(SvidCertResolver::default());
                let ch = Self::make_channel(&self.cfg, &self.bundle, &anonymous, &self.preferred)?;
                crate::attestation::attest(ch, prover).await?
            }
            Some(prover) => crate::attestation::attest(ch, prover).await?,
            None if expired => {
                return Err(format!(
                    "the agent SVID expired at {} while the server could not be reached; a join-token node cannot renew it: run `sigil-server agent evict {}` and restart the agent with a new --join-token",
                    sigil_core::rfc3339(self.svid.borrow().not_after),
                    self.svid.borrow().spiffe_id
                ));
            }
            None => {
                let (csr, key) = new_key_and_csr().map_err(|e| e.to_string())?;
                let resp = AgentApiClient::new(ch)
                    .renew_agent(RenewAgentRequest { csr })
                    .await
                    .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
                    .into_inner();
                (
                    AgentSvid::new(resp.svid_chain, key, now_unix())?,
                    resp.bundle,
                )
            }
        };
        if svid.spiffe_id != self.svid.borrow().spiffe_id {
            return Err(format!(
                "server renewed as {}, expected {}",
                svid.spiffe_id,
                self.svid.borrow().spiffe_id
            ));
        }
        self.resolver.set(&svid.chain, &svid.key)?;
        self.set_bundle(&bundle);
        // The renewed SVID is in use from here on, stored or not: a write
        // failure must not leave the agent renewing in a loop with its old
        // SVID running out. The next renewal tries the disk again.
        if let Err(e) = store_identity(&self.cfg.data_dir, &svid, &bundle) {
            tracing::error!(error = %e, "could not store the renewed agent SVID; serving with it from memory (a restart before the next successful write needs to attest again)");
        }
        self.svid.send_replace(svid);
        // New connections present the new SVID.
        let ch = Self::make_channel(&self.cfg, &self.bundle, &self.resolver, &self.preferred)?;
        self.channel.send_replace(ch);
        Ok(())
    }

    /// Keeps one sync stream open and forwards validated updates to the
    /// cache. Reconnects with backoff; restarts on channel replacement.
    pub async fn sync_loop(self: Arc<Self>, out: mpsc::Sender<SyncEvent>) {
        let mut backoff =
            Backoff::new(Duration::from_millis(200), Duration::from_secs(30)).jittered();
        let mut channels = self.channel.subscribe();
        loop {
            let ch = channels.borrow_and_update().clone();
            let result = async {
                let mut stream = AgentApiClient::new(ch)
                    .sync(SyncRequest { deltas: true })
                    .await?
                    .into_inner();
                let mut assembler = SyncAssembler::new(self.cfg.trust_domain.clone());
                loop {
                    tokio::select! {
                        msg = stream.message() => match msg? {
                            Some(u) => {
                                let Some(state) = assembler.push(u) else {
                                    continue;
                                };
                                if !state.bundle.is_empty() {
                                    self.set_bundle(&state.bundle);
                                }
                                if out.send(SyncEvent::State(state)).await.is_err() {
                                    return Ok(true);
                                }
                            }
                            None => return Ok::<bool, tonic::Status>(false),
                        },
                        _ = channels.changed() => return Ok(false),
                    }
                }
            }
            .await;
            match result {
                Ok(true) => return,
                Ok(false) => {
                    backoff.reset();
                }
                Err(st) => {
                    tracing::warn!(code = ?st.code(), error = %st.message(), "sync stream failed; reconnecting");
                    // Offline until the next complete update (serve_offline_for).
                    if out.send(SyncEvent::Lost).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
    }
}

/// Turns the messages of one sync stream into complete [`SyncState`]s:
/// chunks of an update (`more`) are held until the last one arrives, and
/// deltas are applied to the entry set of the previous complete update (the
/// stream's first update is complete; later ones may be deltas). Everything
/// in a message is the server's word, checked here the way the agent uses
/// it: entries through [`Entry::from_proto`].
#[doc(hidden)]
pub struct SyncAssembler {
    td: TrustDomain,
    /// Entries of chunks of an update not yet complete.
    pending: Vec<sigil_proto::common::Entry>,
    /// The entry set as of the last complete update.
    current: BTreeMap<String, Arc<Entry>>,
}

impl SyncAssembler {
    /// An assembler for a new stream of trust domain `td`'s server.
    pub fn new(td: TrustDomain) -> Self {
        Self {
            td,
            pending: Vec::new(),
            current: BTreeMap::new(),
        }
    }

    /// Entries held for an update whose last chunk has not arrived.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Takes one message; returns the state once an update is complete.
    pub fn push(&mut self, mut u: SyncUpdate) -> Option<SyncState> {
        if u.more {
            self.pending.append(&mut u.entries);
            return None;
        }
        self.pending.append(&mut u.entries);
        let entries = std::mem::take(&mut self.pending);
        apply_update(&self.td, &mut self.current, &u, entries);
        tracing::debug!(revision = u.revision, "sync update");
        if u.agent_killed {
            tracing::error!(reason = %u.kill_reason, "this agent is withdrawn by the server: serving no identity");
        }
        Some(SyncState {
            entries: self.current.values().cloned().collect(),
            bundle: u.bundle,
            jwt_bundle: u.jwt_bundle,
            federated: u.federated.into_iter().collect(),
            killed: u.killed_spiffe_ids,
            crl: u.crl,
            wit_bundle: u.wit_bundle,
        })
    }
}

/// Brings `current` up to a complete sync update: a full snapshot replaces
/// it, a delta adds/replaces `entries` and drops `removed`. An entry that
/// fails validation is dropped (and any older version of it removed).
fn apply_update(
    td: &TrustDomain,
    current: &mut BTreeMap<String, Arc<Entry>>,
    u: &SyncUpdate,
    entries: Vec<sigil_proto::common::Entry>,
) {
    if !u.delta {
        current.clear();
    }
    for id in &u.removed {
        current.remove(id);
    }
    for p in entries {
        match Entry::from_proto(&p, td) {
            Ok(e) => {
                current.insert(e.id.clone(), Arc::new(e));
            }
            Err(err) => {
                tracing::warn!(entry = %p.id, error = %err, "ignoring invalid entry from server");
                current.remove(&p.id);
            }
        }
    }
}

#[cfg(test)]
mod sync_tests {
    use super::*;
    use sigil_proto::common::Entry as PbEntry;

    fn pb(id: &str, hint: &str) -> PbEntry {
        PbEntry {
            id: id.into(),
            spiffe_id: format!("spiffe://example.org/{id}"),
            parent_id: "spiffe://example.org/agent".into(),
            selectors: vec!["unix:uid:1".into()],
            hint: hint.into(),
            ..Default::default()
        }
    }

    #[test]
    fn full_updates_replace_and_deltas_patch() {
        let td = TrustDomain::new("example.org").unwrap();
        let mut cur = BTreeMap::new();
        let full = SyncUpdate::default();
        apply_update(
            &td,
            &mut cur,
            &full,
            vec![pb("a", ""), pb("b", ""), pb("c", "")],
        );
        assert_eq!(cur.keys().collect::<Vec<_>>(), ["a", "b", "c"]);
        let delta = SyncUpdate {
            delta: true,
            removed: vec!["a".into()],
            ..Default::default()
        };
        let mut bad = pb("c", "");
        bad.spiffe_id = "not an id".into();
        apply_update(
            &td,
            &mut cur,
            &delta,
            vec![pb("b", "new"), pb("d", ""), bad],
        );
        assert_eq!(cur.keys().collect::<Vec<_>>(), ["b", "d"]);
        assert_eq!(cur["b"].hint, "new");
        // A full update after deltas starts over.
        apply_update(&td, &mut cur, &full, vec![pb("z", "")]);
        assert_eq!(cur.keys().collect::<Vec<_>>(), ["z"]);
    }
}
