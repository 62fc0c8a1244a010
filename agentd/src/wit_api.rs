//! The WIT-SVID profile of the Workload API (`FetchWITSVID`,
//! `FetchWITBundles` of spiffe/spiffe `standards/workloadapiwitsvid.proto`),
//! served by the one `SpiffeWorkloadAPI` service of [`crate::workload_api`]
//! with its security header check and caller attestation.
//!
//! A caller gets a WIT-SVID for every entry it is entitled to that has
//! opted in (`wit_svid`); an entry that has not opted in gives none, and a
//! caller with no such entry is refused like `FetchJWTSVID` refuses one
//! with no identity. For each entry the agent generates a fresh P-256 key
//! pair, sends only the public key to the server (`MintWitSvid`), and hands
//! the workload the WIT and the private key (a JWK). The WIT is renewed, with
//! a new key, at half its lifetime, and the stream sends the new one; it
//! also sends a message when the caller's entries change, and ends when the
//! caller exits or loses its last WIT-SVID entry. The key pair lives in the
//! agent's memory only, like X.509-SVID keys, and is never logged.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sigil_attestors::workload::unix::Peer;
use sigil_core::entry::Entry;
use sigil_core::now_unix;
use sigil_core::selector::SelectorSet;
use sigil_core::wit::WorkloadKey;
use sigil_proto::agent::MintWitSvidRequest;
use sigil_proto::agent::agent_api_client::AgentApiClient;
use sigil_proto::workload::{WitBundlesResponse, Witsvid, WitsvidResponse};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Response, Status};

use crate::cache::Snapshot;
use crate::workload_api::{Caller, has_digest, none_servable};

/// How soon a stream retries a renewal that failed (the old WIT is served
/// meanwhile while it is valid).
const RETRY: Duration = Duration::from_secs(5);

/// A WIT-SVID and its key, as handed out.
struct CachedWit {
    spiffe_id: String,
    token: String,
    /// The private JWK: a secret.
    key_jwk: String,
    expires_at: i64,
    refresh_at: i64,
}

/// WIT-SVIDs by entry ID: from the cache, else freshly keyed and minted.
pub(crate) struct WitSource {
    server: watch::Receiver<Channel>,
    cache: Mutex<HashMap<String, Arc<CachedWit>>>,
}

impl WitSource {
    pub(crate) fn new(server: watch::Receiver<Channel>) -> Self {
        Self {
            server,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The current WIT-SVID of `e`: the cached one until its renewal is
    /// due, else a new one with a new key. When a renewal fails, the old
    /// one is returned while it is still valid.
    async fn wit_for(&self, e: &Entry, now: i64) -> Result<Arc<CachedWit>, Status> {
        let cached = self
            .cache
            .lock()
            .ok()
            .and_then(|c| c.get(&e.id).cloned())
            .filter(|c| c.spiffe_id == e.spiffe_id.to_string());
        if let Some(c) = &cached
            && now < c.refresh_at
        {
            return Ok(c.clone());
        }
        match self.mint(e, now).await {
            Ok(w) => {
                let w = Arc::new(w);
                if let Ok(mut c) = self.cache.lock() {
                    c.retain(|_, v| v.expires_at > now);
                    c.insert(e.id.clone(), w.clone());
                }
                Ok(w)
            }
            Err(st) => match cached {
                Some(c) if now < c.expires_at && st.code() != tonic::Code::PermissionDenied => {
                    tracing::warn!(entry = %e.id, error = %st.message(), "renewing a WIT-SVID failed; serving the current one");
                    Ok(c)
                }
                _ => Err(st),
            },
        }
    }

    async fn mint(&self, e: &Entry, now: i64) -> Result<CachedWit, Status> {
        let key = WorkloadKey::generate().map_err(|e| Status::internal(e.to_string()))?;
        let ch = self.server.borrow().clone();
        let token = AgentApiClient::new(ch)
            .mint_wit_svid(MintWitSvidRequest {
                entry_id: e.id.clone(),
                public_jwk: key.public_jwk().to_string(),
            })
            .await
            .map_err(|s| {
                let msg = format!(
                    "could not obtain a WIT-SVID from the server: {}",
                    s.message()
                );
                if s.code() == tonic::Code::PermissionDenied {
                    Status::permission_denied(msg)
                } else {
                    Status::unavailable(msg)
                }
            })?
            .into_inner()
            .token;
        let expires_at = sigil_core::jwt::peek_claims(&token)
            .ok()
            .and_then(|c| c.get("exp").and_then(serde_json::Value::as_i64))
            .unwrap_or(now);
        Ok(CachedWit {
            spiffe_id: e.spiffe_id.to_string(),
            token,
            key_jwk: key.private_jwk(),
            expires_at,
            refresh_at: now + ((expires_at - now) / 2).max(1),
        })
    }
}

/// The entries a caller may have WIT-SVIDs for, and the approval requests
/// of those still waiting for a grant.
fn wit_entries<'a>(
    snap: &'a Snapshot,
    selectors: &SelectorSet,
) -> (Vec<&'a Arc<Entry>>, Vec<&'a str>) {
    let mut serve = Vec::new();
    let mut pending = Vec::new();
    for e in snap.entitled(selectors).into_iter().filter(|e| e.wit_svid) {
        match &e.approval_pending {
            Some(why) => pending.push(why.as_str()),
            None => serve.push(e),
        }
    }
    (serve, pending)
}

/// The caller's WIT-SVIDs now, with when the next renewal is due; `None`
/// while the agent has not synced yet.
async fn wit_response(
    src: &WitSource,
    snap: &Snapshot,
    selectors: &SelectorSet,
) -> Result<Option<(WitsvidResponse, i64)>, Status> {
    let (entries, pending) = wit_entries(snap, selectors);
    if entries.is_empty() {
        return none_servable(snap, &pending).map(|()| None);
    }
    let now = now_unix();
    let mut svids = Vec::with_capacity(entries.len());
    let mut next = i64::MAX;
    for e in entries {
        let w = src.wit_for(e, now).await?;
        next = next.min(if w.refresh_at > now {
            w.refresh_at
        } else {
            now + RETRY.as_secs() as i64
        });
        svids.push(Witsvid {
            spiffe_id: w.spiffe_id.clone(),
            wit_svid: w.token.clone(),
            wit_svid_key: w.key_jwk.clone(),
            hint: e.hint.clone(),
        });
    }
    Ok(Some((WitsvidResponse { svids }, next)))
}

/// The stream `FetchWITSVID` returns.
pub type WitStream = ReceiverStream<Result<WitsvidResponse, Status>>;

/// `FetchWITSVID` for an attested caller: refused at once when it has no
/// WIT-SVID entry, else a stream fed by a task that wakes on snapshot
/// changes and renewals and ends with the caller.
pub(crate) async fn fetch_witsvid(
    src: Arc<WitSource>,
    mut snaps: watch::Receiver<Arc<Snapshot>>,
    caller: Caller,
) -> Result<Response<WitStream>, Status> {
    let Caller {
        selectors,
        call,
        peer,
        ..
    } = caller;
    let snap = snaps.borrow_and_update().clone();
    let first = wit_response(&src, &snap, &selectors).await?;
    let pinned_digest = has_digest(&selectors);
    let (tx, rx) = mpsc::channel(2);
    tokio::spawn(async move {
        // Keeps the connection busy for as long as the stream runs.
        let _call = call;
        let gone = {
            let p: Arc<Peer> = peer.clone();
            async move { p.exited().await }
        };
        tokio::pin!(gone);
        let mut last: Option<WitsvidResponse> = None;
        let mut wake = None;
        if let Some((m, next)) = first {
            if tx.send(Ok(m.clone())).await.is_err() {
                return;
            }
            last = Some(m);
            wake = Some(next);
        }
        loop {
            let sleep = async {
                match wake {
                    Some(at) => {
                        let secs = (at - now_unix()).max(0).unsigned_abs();
                        tokio::time::sleep(Duration::from_secs(secs)).await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = tx.closed() => return,
                _ = &mut gone => {
                    let _ = tx.send(Err(Status::permission_denied(
                        "the process that opened this stream has exited: its identity ended",
                    ))).await;
                    return;
                }
                changed = snaps.changed() => if changed.is_err() { return },
                _ = sleep => {}
            }
            if pinned_digest && peer.exe_changed() {
                let _ = tx
                    .send(Err(Status::permission_denied(
                        "the caller's executable changed on disk after it was attested: its unix:sha256 identity ended",
                    )))
                    .await;
                return;
            }
            let snap = snaps.borrow_and_update().clone();
            match wit_response(&src, &snap, &selectors).await {
                Ok(Some((m, next))) => {
                    wake = Some(next);
                    if last.as_ref() != Some(&m) {
                        if tx.send(Ok(m.clone())).await.is_err() {
                            return;
                        }
                        last = Some(m);
                    }
                }
                Ok(None) => wake = None,
                Err(st) => {
                    let _ = tx.send(Err(st)).await;
                    return;
                }
            }
        }
    });
    Ok(Response::new(ReceiverStream::new(rx)))
}

/// `FetchWITBundles`: the trust domain's WIT bundle (JWKS of its `use:
/// wit-svid` keys) for any caller with an identity, streamed on change.
pub(crate) fn wit_bundles_response(
    snap: &Snapshot,
    selectors: &SelectorSet,
) -> Result<Option<WitBundlesResponse>, Status> {
    let (matching, pending) = snap.servable(selectors);
    if matching.is_empty() {
        return none_servable(snap, &pending).map(|()| None);
    }
    let Some(td) = &snap.trust_domain else {
        return Ok(None);
    };
    if snap.trust.wit_jwks.is_empty() {
        return Ok(None);
    }
    let doc = String::from_utf8(snap.trust.wit_jwks.clone())
        .map_err(|_| Status::internal("the server sent a WIT bundle that is not UTF-8"))?;
    Ok(Some(WitBundlesResponse {
        bundles: HashMap::from([(td.id_string(), doc)]),
        more: false,
    }))
}

/// `sigil-agent api fetch wit [--write DIR]`: the caller's WIT-SVIDs (the
/// first message of the stream) and the WIT bundle; with `--write`, the
/// token and its key go to `wit.jwt` and `wit.key.jwk` (0600: the key is
/// a secret, and the token is only useful with it) and the bundle to
/// `wit_bundle.json`; later SVIDs get a `.N` suffix.
pub async fn fetch_cli(ch: Channel, write: Option<std::path::PathBuf>) -> Result<(), String> {
    use crate::cli::{grpc_err, with_header, write_file};
    use sigil_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
    use sigil_proto::workload::{WitBundlesRequest, WitsvidRequest};
    let mut client = SpiffeWorkloadApiClient::new(ch);
    let resp = client
        .fetch_witsvid(with_header(WitsvidRequest {}))
        .await
        .map_err(grpc_err)?
        .into_inner()
        .message()
        .await
        .map_err(grpc_err)?
        .ok_or("the Workload API closed the stream without a WIT-SVID")?;
    let bundle = client
        .fetch_wit_bundles(with_header(WitBundlesRequest {}))
        .await
        .map_err(grpc_err)?
        .into_inner()
        .message()
        .await
        .map_err(grpc_err)?;
    for (i, s) in resp.svids.iter().enumerate() {
        let kid = sigil_core::jwt::peek_header(&s.wit_svid)
            .ok()
            .and_then(|(_, kid, _)| kid)
            .unwrap_or_else(|| "-".into());
        let claims = sigil_core::jwt::peek_claims(&s.wit_svid).unwrap_or_default();
        let text = |v: Option<&serde_json::Value>| {
            v.and_then(serde_json::Value::as_str)
                .unwrap_or("-")
                .to_string()
        };
        println!("SPIFFE ID:\t{}", s.spiffe_id);
        if !s.hint.is_empty() {
            println!("Hint:\t\t{}", s.hint);
        }
        println!("Key ID (kid):\t{kid}");
        println!("JWT ID (jti):\t{}", text(claims.get("jti")));
        if let Some(exp) = claims.get("exp").and_then(serde_json::Value::as_i64) {
            println!("Valid Until:\t{}", sigil_core::rfc3339(exp));
        }
        println!(
            "Bound key:\t{}",
            claims
                .get("cnf")
                .and_then(|c| c.get("jwk"))
                .map(sigil_core::wit::jwk_thumbprint)
                .unwrap_or_default()
        );
        println!("Token:\t\t{}", s.wit_svid);
        if let Some(dir) = &write {
            let suffix = if i == 0 {
                String::new()
            } else {
                format!(".{i}")
            };
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            let token = dir.join(format!("wit{suffix}.jwt"));
            let key = dir.join(format!("wit{suffix}.key.jwk"));
            write_file(&token, s.wit_svid.as_bytes(), 0o600)?;
            write_file(&key, s.wit_svid_key.as_bytes(), 0o600)?;
            println!("Writing WIT-SVID #{i} to file {}", token.display());
            println!("Writing key #{i} to file {}", key.display());
        }
        println!();
    }
    if let Some(b) = bundle {
        let mut tds: Vec<_> = b.bundles.into_iter().collect();
        tds.sort();
        for (td, jwks) in &tds {
            println!("bundle({td}):\n\t{jwks}");
        }
        if let (Some(dir), Some((_, jwks))) = (&write, tds.first()) {
            let path = dir.join("wit_bundle.json");
            write_file(&path, jwks.as_bytes(), 0o644)?;
            println!("Writing the WIT bundle to file {}", path.display());
        }
    }
    Ok(())
}
