//! The SPIFFE Workload API service. Each call checks the security header,
//! attests the calling process, and serves what every entry whose selectors
//! are a subset of the process's selectors entitles it to: X.509-SVIDs,
//! JWT-SVIDs, and the bundles of its own and its federated trust domains.
//! Streams are fed from the cache's immutable snapshots and send a message
//! only when the caller's view changed. Every call (a stream for as long as
//! it runs) holds a [`CallGuard`] that keeps its connection from being
//! closed as idle. Audiences are bounded by
//! [`sigil_core::jwt::check_audiences`], and cached JWT-SVIDs by
//! [`JwtCache`].

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use sigil_core::limits::CallGuard;
use std::task::{Context, Poll};

use prost_types::value::Kind;
use sigil_attestors::workload::unix::{AttestError, Peer, UnixNeeds};
use sigil_attestors::workload::{Attested, AttestorSet};
use sigil_core::SpiffeId;
use sigil_core::entry::Entry;
use sigil_core::selector::SelectorSet;
use sigil_proto::WORKLOAD_API_HEADER;
use sigil_proto::agent::MintJwtSvidRequest;
use sigil_proto::agent::agent_api_client::AgentApiClient;
use sigil_proto::workload::spiffe_workload_api_server::{
    SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use sigil_proto::workload::{
    JwtBundlesRequest, JwtBundlesResponse, Jwtsvid, JwtsvidRequest, JwtsvidResponse,
    ValidateJwtsvidRequest, ValidateJwtsvidResponse, WitBundlesRequest, WitBundlesResponse,
    WitsvidRequest, X509BundlesRequest, X509BundlesResponse, X509svid, X509svidRequest,
    X509svidResponse,
};
use tokio::sync::watch;
use tokio_stream::Stream;
use tokio_stream::wrappers::WatchStream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::cache::{JwtCache, JwtCacheCaps, Snapshot};
use crate::workload_socket::PeerInfo;

/// The Workload API service.
pub struct WorkloadApi {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    attestors: Arc<AttestorSet>,
    jwt: JwtSource,
    wit: Arc<crate::wit_api::WitSource>,
}

/// JWT-SVIDs from the cache, else minted by the server (and cached).
pub(crate) struct JwtSource {
    server: watch::Receiver<Channel>,
    jwts: Mutex<JwtCache>,
}

impl JwtSource {
    pub(crate) fn new(server: watch::Receiver<Channel>) -> Self {
        Self {
            server,
            jwts: Mutex::new(JwtCache::new(JwtCacheCaps::default())),
        }
    }
}

impl WorkloadApi {
    pub fn new(
        snapshots: watch::Receiver<Arc<Snapshot>>,
        server: watch::Receiver<Channel>,
        attestors: Arc<AttestorSet>,
    ) -> SpiffeWorkloadApiServer<Self> {
        SpiffeWorkloadApiServer::new(Self {
            snapshots,
            attestors,
            jwt: JwtSource::new(server.clone()),
            wit: Arc::new(crate::wit_api::WitSource::new(server)),
        })
        .max_decoding_message_size(crate::workload_socket::MAX_MESSAGE)
    }

    /// Checks the security header and attests the caller; the guard keeps
    /// the connection busy for as long as the caller holds it. Derives
    /// the unix selectors that the entries of `snap` use (see
    /// [`UnixNeeds`]): what the call matches against.
    async fn caller<T>(&self, req: &Request<T>, snap: &Snapshot) -> Result<Caller, Status> {
        check_header(req)?;
        attest_peer_for(&self.attestors, req, snap.unix_needs()).await
    }

    /// [`WorkloadApi::caller`] against the current snapshot, for a stream:
    /// the stream re-attests if later entries use more (see [`Updates`]).
    async fn stream_caller<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        let snap = self.snapshots.borrow().clone();
        self.caller(req, &snap).await
    }
}

impl JwtSource {
    /// A JWT-SVID for `entry` and `audience`, from the cache or the server.
    async fn jwt_for(&self, entry: &Entry, audience: &[String]) -> Result<String, Status> {
        let now = sigil_core::steady_unix();
        if let Ok(mut cache) = self.jwts.lock()
            && let Some(token) = cache.get(&entry.id, audience, now)
        {
            return Ok(token);
        }
        let ch = self.server.borrow().clone();
        let token = AgentApiClient::new(ch)
            .mint_jwt_svid(MintJwtSvidRequest {
                entry_id: entry.id.clone(),
                audience: audience.to_vec(),
            })
            .await
            .map_err(|s| {
                let msg = format!(
                    "could not obtain a JWT-SVID from the server: {}",
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
        // Cached by the token's lifetime (its `exp` minus `iat`, both the
        // server's clock) counted on the steady clock from now: a step of
        // the local clock neither keeps a stale token in use nor drops a
        // fresh one.
        let lifetime = sigil_core::jwt::peek_claims(&token)
            .ok()
            .and_then(|c| {
                let claim = |k: &str| c.get(k).and_then(serde_json::Value::as_i64);
                Some(claim("exp")? - claim("iat")?)
            })
            .unwrap_or(0)
            .max(0);
        if let Ok(mut cache) = self.jwts.lock() {
            cache.insert(&entry.id, audience, token.clone(), now, now + lifetime, now);
        }
        Ok(token)
    }
}

/// An attested caller: its selectors, the guard keeping its connection
/// busy, and the process (so that its streams end when it exits).
pub(crate) struct Caller {
    pub(crate) selectors: SelectorSet,
    pub(crate) call: CallGuard,
    pub(crate) peer: Arc<Peer>,
    /// Which of the costlier unix selectors `selectors` were derived for.
    pub(crate) derived: UnixNeeds,
}

/// Checks the security header and attests the caller (also for the task
/// service on the same socket); the guard keeps
/// the connection busy for as long as the caller holds it.
pub(crate) async fn attest_caller<T>(
    attestors: &AttestorSet,
    req: &Request<T>,
) -> Result<Caller, Status> {
    check_header(req)?;
    attest_peer(attestors, req).await
}

/// The Workload API's security header must be present and `true`.
fn check_header<T>(req: &Request<T>) -> Result<(), Status> {
    let hdr = req
        .metadata()
        .get(WORKLOAD_API_HEADER)
        .and_then(|v| v.to_str().ok());
    if hdr != Some("true") {
        return Err(Status::invalid_argument(
            "security header missing from request",
        ));
    }
    Ok(())
}

/// Attests the process at the other end of the call's connection, without
/// the security header check (for Envoy's SDS, whose clients send none).
pub(crate) async fn attest_peer<T>(
    attestors: &AttestorSet,
    req: &Request<T>,
) -> Result<Caller, Status> {
    attest_peer_for(attestors, req, UnixNeeds::ALL).await
}

/// [`attest_peer`], deriving the costlier unix selectors only as far as
/// `needs` asks.
async fn attest_peer_for<T>(
    attestors: &AttestorSet,
    req: &Request<T>,
    needs: UnixNeeds,
) -> Result<Caller, Status> {
    let (peer, call) = req
        .extensions()
        .get::<PeerInfo>()
        .map(|p| (p.0.clone(), p.1.begin()))
        .ok_or_else(|| Status::internal("peer information missing"))?;
    let pid = peer.pid;
    let process = peer.clone();
    // Every call is attested afresh: `unix` inline when its caches are
    // warm (else on a blocking thread), then every enabled attestor
    // under its own deadline (see `AttestorSet::attest`).
    let selectors = attested_selectors(attestors.attest_for(peer, needs).await, pid)?;
    Ok(Caller {
        selectors,
        call,
        peer: process,
        derived: needs,
    })
}

/// The selectors of a finished attestation, or the status that refuses the
/// caller.
fn attested_selectors(
    attested: Result<Attested, AttestError>,
    pid: i32,
) -> Result<SelectorSet, Status> {
    let attested = attested.map_err(|e| {
        tracing::info!(pid, error = %e, "workload attestation failed");
        Status::permission_denied("could not attest the calling process")
    })?;
    // An attestor that could not answer leaves the selectors
    // incomplete: refuse (retryable) rather than serve a partial
    // identity as if it were the caller's whole one.
    if !attested.failed.is_empty() {
        let kinds: Vec<&str> = attested.failed.iter().map(|(k, _)| *k).collect();
        return Err(Status::unavailable(format!(
            "workload attestor {} did not answer; retry",
            kinds.join(", ")
        )));
    }
    Ok(attested.selectors)
}

/// Whether `selectors` include a `unix:sha256` digest of the binary.
pub(crate) fn has_digest(selectors: &SelectorSet) -> bool {
    selectors
        .iter()
        .any(|s| s.as_str().starts_with("unix:sha256:"))
}

/// Why a stream ended: the process attested when it was opened is gone.
fn caller_exited() -> Status {
    Status::permission_denied("the process that opened this stream has exited: its identity ended")
}

/// Federated trust domains (`spiffe://td`) any of `entries` federates with.
fn federations(entries: &[&Arc<Entry>]) -> BTreeSet<String> {
    entries
        .iter()
        .flat_map(|e| e.federates_with.iter().map(|t| t.id_string()))
        .collect()
}

/// Why nothing is served: `serve_offline_for` has passed without contact.
fn offline() -> Status {
    Status::unavailable(
        "this agent has had no contact with the server for longer than serve_offline_for: serving no identity until it is back",
    )
}

/// Why an entitled caller gets no SVID: none is valid and the server,
/// which would renew it, cannot be reached.
fn unrenewable() -> Status {
    Status::unavailable(
        "no valid SVID: the server cannot be reached to issue or renew it (expired SVIDs are never served); retry later",
    )
}

fn no_identity(snap: &Snapshot) -> Result<(), Status> {
    if snap.offline {
        Err(offline())
    } else if snap.synced {
        Err(Status::permission_denied("no identity issued"))
    } else if snap.unreachable {
        // Not synced since it started, and the server is away: waiting
        // would leave the caller hanging for as long as the outage lasts.
        Err(Status::unavailable(
            "this agent has not synced with the server yet and cannot reach it: no identity can be served until it does; retry later",
        ))
    } else {
        Ok(())
    }
}

/// What to say when nothing is servable: the approval requests the caller
/// waits for, if any, else "no identity issued" (or Unavailable while
/// offline).
pub(crate) fn none_servable(snap: &Snapshot, pending: &[&str]) -> Result<(), Status> {
    if pending.is_empty() || snap.offline {
        no_identity(snap)
    } else {
        Err(Status::permission_denied(pending.join("; ")))
    }
}

/// The X.509 response for a caller, or why there is none. `Ok(None)` means
/// entitled but nothing minted yet (wait for the next snapshot).
pub(crate) fn x509_response(
    snap: &Snapshot,
    selectors: &SelectorSet,
) -> Result<Option<X509svidResponse>, Status> {
    let (matching, pending) = snap.servable(selectors);
    if matching.is_empty() {
        return none_servable(snap, &pending).map(|()| None);
    }
    // Chain, key and bundle are `Bytes`: cloning them shares the buffers.
    let svids: Vec<X509svid> = matching
        .iter()
        .filter_map(|e| snap.svids.get(&e.id).map(|s| (e, s)))
        .map(|(e, s)| X509svid {
            spiffe_id: s.spiffe_id.clone(),
            x509_svid: s.chain_der.clone(),
            x509_svid_key: s.key_der.clone(),
            bundle: snap.bundle.concat.clone(),
            hint: e.hint.clone(),
        })
        .collect();
    if svids.is_empty() {
        // Entitled, but nothing valid: wait for the mint, unless the
        // server cannot be reached to do it.
        return if snap.unreachable {
            Err(unrenewable())
        } else {
            Ok(None)
        };
    }
    let federated_bundles = federations(&matching)
        .into_iter()
        .filter_map(|td| snap.trust.federated_x509.get(&td).map(|b| (td, b.clone())))
        .collect();
    Ok(Some(X509svidResponse {
        svids,
        crl: snap.trust.crl.clone(),
        federated_bundles,
    }))
}

pub(crate) fn x509_bundles_response(
    snap: &Snapshot,
    selectors: &SelectorSet,
) -> Result<Option<X509BundlesResponse>, Status> {
    let (matching, pending) = snap.servable(selectors);
    if matching.is_empty() {
        return none_servable(snap, &pending).map(|()| None);
    }
    let Some(td) = &snap.trust_domain else {
        return Ok(None);
    };
    if snap.bundle.certs.is_empty() {
        return Ok(None);
    }
    let mut bundles: HashMap<String, Vec<u8>> = federations(&matching)
        .into_iter()
        .filter_map(|ftd| {
            snap.trust
                .federated_x509
                .get(&ftd)
                .map(|b| (ftd, b.to_vec()))
        })
        .collect();
    bundles.insert(td.id_string(), snap.bundle.concat.to_vec());
    Ok(Some(X509BundlesResponse {
        crl: snap.trust.crl.iter().map(|c| c.to_vec()).collect(),
        bundles,
    }))
}

pub(crate) fn jwt_bundles_response(
    snap: &Snapshot,
    selectors: &SelectorSet,
) -> Result<Option<JwtBundlesResponse>, Status> {
    let (matching, pending) = snap.servable(selectors);
    if matching.is_empty() {
        return none_servable(snap, &pending).map(|()| None);
    }
    let Some(td) = &snap.trust_domain else {
        return Ok(None);
    };
    if snap.trust.jwks.is_empty() {
        return Ok(None);
    }
    let mut bundles: HashMap<String, Vec<u8>> = HashMap::new();
    for ftd in federations(&matching) {
        let name = ftd.trim_start_matches("spiffe://");
        if let Some(b) = snap.trust.federated.get(name)
            && !b.jwt_bundle.is_empty()
        {
            bundles.insert(ftd, b.jwt_bundle.clone());
        }
    }
    bundles.insert(td.id_string(), snap.trust.jwks.clone());
    Ok(Some(JwtBundlesResponse { bundles }))
}

/// A Workload API stream: the caller's view of the current snapshot, then
/// of every later snapshot in which it differs from the last message sent;
/// it ends after an error (the caller lost its last identity) and, with a
/// `permission_denied` error, as soon as the process that opened it exits
/// (a container stopped, or the connection was handed to another process):
/// the identity was the attested process's, not the connection's.
///
/// The stream is polled by the connection that carries it and dropped with
/// the call: no task or channel per call, and the first message is built
/// once, in [`Updates::start`].
///
/// A caller attested for only the unix selectors the entries used then
/// (see [`UnixNeeds`]) is attested again, once, when a later snapshot's
/// entries use more, before that snapshot is matched: a stream never
/// matches entries against selectors that were not derived for them.
pub struct Updates<M, F> {
    first: Option<M>,
    changes: WatchStream<Arc<Snapshot>>,
    build: F,
    selectors: SelectorSet,
    last: Option<M>,
    done: bool,
    /// Resolves when the attested caller has exited.
    gone: Pin<Box<dyn Future<Output = ()> + Send>>,
    /// The caller, and whether its identity rested on a binary digest.
    peer: Arc<Peer>,
    pinned_digest: bool,
    /// Which costlier unix selectors `selectors` were derived for.
    derived: UnixNeeds,
    /// Who attests the caller again (`None`: `derived` is every one).
    attestors: Option<Arc<AttestorSet>>,
    /// A snapshot waiting for the re-attestation in flight.
    pending: Option<(Arc<Snapshot>, Reattesting)>,
    /// Keeps the connection busy while the stream runs.
    _call: CallGuard,
}

/// A re-attestation in flight.
type Reattesting = Pin<Box<dyn Future<Output = Result<Attested, AttestError>> + Send>>;

impl<M, F> Updates<M, F>
where
    M: PartialEq + Clone,
    F: Fn(&Snapshot, &SelectorSet) -> Result<Option<M>, Status>,
{
    /// Builds the first message from the current snapshot; refuses at once
    /// (rather than in-stream) when the caller has no identity. `Ok(None)`
    /// from `build` means entitled but nothing minted yet: the stream then
    /// waits for the next snapshot.
    fn start(
        mut snaps: watch::Receiver<Arc<Snapshot>>,
        build: F,
        caller: Caller,
        attestors: Option<Arc<AttestorSet>>,
    ) -> Result<Self, Status> {
        // Mark this version seen before reading it, so that a snapshot
        // published meanwhile is delivered as a change.
        let snap = snaps.borrow_and_update().clone();
        let Caller {
            selectors,
            call,
            peer,
            derived,
        } = caller;
        let mut this = Self {
            first: None,
            last: None,
            changes: WatchStream::from_changes(snaps),
            build,
            pinned_digest: has_digest(&selectors),
            selectors,
            done: false,
            gone: {
                let p = peer.clone();
                Box::pin(async move { p.exited().await })
            },
            peer,
            derived,
            attestors,
            pending: None,
            _call: call,
        };
        // The snapshot may have changed since the caller was attested.
        match this.reattest_for(&snap) {
            Some(fut) => this.pending = Some((snap, fut)),
            None => {
                let first = (this.build)(&snap, &this.selectors)?;
                this.last = first.clone();
                this.first = first;
            }
        }
        Ok(this)
    }

    /// A re-attestation when `snap`'s entries use unix selectors the
    /// current ones were not derived for.
    fn reattest_for(&self, snap: &Snapshot) -> Option<Reattesting> {
        let set = self.attestors.as_ref()?;
        let needs = snap.unix_needs();
        if self.derived.covers(needs) {
            return None;
        }
        let (set, peer, wider) = (set.clone(), self.peer.clone(), self.derived.union(needs));
        Some(Box::pin(async move { set.attest_for(peer, wider).await }))
    }

    /// The message for `snap`, if it is one to send.
    fn message(&mut self, snap: &Snapshot) -> Option<Result<M, Status>> {
        // The digest was computed when the stream opened: a binary
        // changed under the process since ends what it entitled.
        if self.pinned_digest && self.peer.exe_changed() {
            self.done = true;
            return Some(Err(Status::permission_denied(
                "the caller's executable changed on disk after it was attested: its unix:sha256 identity ended",
            )));
        }
        match (self.build)(snap, &self.selectors) {
            Ok(Some(m)) if self.last.as_ref() != Some(&m) => {
                self.last = Some(m.clone());
                Some(Ok(m))
            }
            Ok(_) => None,
            Err(st) => {
                self.done = true;
                Some(Err(st))
            }
        }
    }
}

impl<M, F> Stream for Updates<M, F>
where
    M: PartialEq + Clone + Unpin,
    F: Fn(&Snapshot, &SelectorSet) -> Result<Option<M>, Status> + Unpin,
{
    type Item = Result<M, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if !this.done && this.gone.as_mut().poll(cx).is_ready() {
            this.done = true;
            return Poll::Ready(Some(Err(caller_exited())));
        }
        if let Some(m) = this.first.take() {
            return Poll::Ready(Some(Ok(m)));
        }
        while !this.done {
            let snap = match this.pending.as_mut() {
                Some((_, fut)) => {
                    let attested = std::task::ready!(fut.as_mut().poll(cx));
                    let Some((snap, _)) = this.pending.take() else {
                        continue;
                    };
                    match attested_selectors(attested, this.peer.pid) {
                        Ok(selectors) => {
                            this.derived = this.derived.union(snap.unix_needs());
                            this.pinned_digest = has_digest(&selectors);
                            this.selectors = selectors;
                        }
                        Err(st) => {
                            this.done = true;
                            return Poll::Ready(Some(Err(st)));
                        }
                    }
                    snap
                }
                None => {
                    let Some(snap) = std::task::ready!(Pin::new(&mut this.changes).poll_next(cx))
                    else {
                        return Poll::Ready(None);
                    };
                    if let Some(fut) = this.reattest_for(&snap) {
                        this.pending = Some((snap, fut));
                        continue;
                    }
                    snap
                }
            };
            if let Some(m) = this.message(&snap) {
                return Poll::Ready(Some(m));
            }
        }
        Poll::Ready(None)
    }
}

/// A stream of `M` built by a boxed closure over the snapshot and the
/// caller's selectors.
pub(crate) type UpdateStream<M> =
    Updates<M, Box<dyn Fn(&Snapshot, &SelectorSet) -> Result<Option<M>, Status> + Send + Sync>>;

/// The stream of `build`'s messages for `caller`, attested again by
/// `attestors` as [`Updates`] describes (`None` when the caller's
/// selectors are complete).
pub(crate) fn updates<M>(
    snaps: watch::Receiver<Arc<Snapshot>>,
    caller: Caller,
    attestors: Option<Arc<AttestorSet>>,
    build: impl Fn(&Snapshot, &SelectorSet) -> Result<Option<M>, Status> + Send + Sync + 'static,
) -> Result<UpdateStream<M>, Status>
where
    M: PartialEq + Clone,
{
    Updates::start(snaps, Box::new(build), caller, attestors)
}

/// JSON → protobuf `Value`, for the claims `Struct`.
fn to_prost_value(v: &serde_json::Value) -> prost_types::Value {
    let kind = match v {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(*b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        serde_json::Value::String(s) => Kind::StringValue(s.clone()),
        serde_json::Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.iter().map(to_prost_value).collect(),
        }),
        serde_json::Value::Object(o) => Kind::StructValue(to_prost_struct(o)),
    };
    prost_types::Value { kind: Some(kind) }
}

fn to_prost_struct(m: &serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: m
            .iter()
            .map(|(k, v)| (k.clone(), to_prost_value(v)))
            .collect(),
    }
}

/// The JWT-SVIDs `selectors` entitle a caller to for `audience` (every
/// entitled SPIFFE ID, or only `spiffe_id`), minted or cached by `jwt`.
pub(crate) async fn jwt_svids(
    jwt: &JwtSource,
    snap: &Snapshot,
    selectors: &SelectorSet,
    audience: Vec<String>,
    spiffe_id: &str,
) -> Result<Vec<Jwtsvid>, Status> {
    let mut audience: Vec<String> = audience.into_iter().filter(|a| !a.is_empty()).collect();
    if audience.is_empty() {
        return Err(Status::invalid_argument("audience must be specified"));
    }
    sigil_core::jwt::check_audiences(&audience)
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    audience.sort();
    audience.dedup();
    let wanted = if spiffe_id.is_empty() {
        None
    } else {
        Some(
            SpiffeId::new(spiffe_id)
                .map_err(|e| Status::invalid_argument(format!("invalid field `spiffe_id`: {e}")))?,
        )
    };
    let wanted_ok = |e: &Entry| wanted.as_ref().is_none_or(|w| &e.spiffe_id == w);
    let mut pending = Vec::new();
    let mut matching: Vec<Arc<Entry>> = Vec::new();
    for e in snap.entitled(selectors) {
        if !wanted_ok(e) {
            continue;
        }
        match &e.approval_pending {
            Some(why) => pending.push(why.as_str()),
            None => matching.push(e.clone()),
        }
    }
    if matching.is_empty() {
        return Err(if snap.offline {
            offline()
        } else if pending.is_empty() {
            Status::permission_denied("no identity issued")
        } else {
            Status::permission_denied(pending.join("; "))
        });
    }
    let mut svids = Vec::with_capacity(matching.len());
    for e in &matching {
        svids.push(Jwtsvid {
            spiffe_id: e.spiffe_id.to_string(),
            svid: jwt.jwt_for(e, &audience).await?,
            hint: e.hint.clone(),
        });
    }
    Ok(svids)
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = UpdateStream<X509svidResponse>;
    type FetchX509BundlesStream = UpdateStream<X509BundlesResponse>;
    type FetchJWTBundlesStream = UpdateStream<JwtBundlesResponse>;
    type FetchWITSVIDStream = crate::wit_api::WitStream;
    type FetchWITBundlesStream = UpdateStream<WitBundlesResponse>;

    async fn fetch_witsvid(
        &self,
        req: Request<WitsvidRequest>,
    ) -> Result<Response<Self::FetchWITSVIDStream>, Status> {
        // The WIT stream keeps its first selectors: derive all of them.
        check_header(&req)?;
        let caller = attest_peer(&self.attestors, &req).await?;
        crate::wit_api::fetch_witsvid(self.wit.clone(), self.snapshots.clone(), caller).await
    }

    async fn fetch_wit_bundles(
        &self,
        req: Request<WitBundlesRequest>,
    ) -> Result<Response<Self::FetchWITBundlesStream>, Status> {
        let caller = self.stream_caller(&req).await?;
        // Refuses at once (rather than in-stream) when the caller has no identity.
        Ok(Response::new(updates(
            self.snapshots.clone(),
            caller,
            Some(self.attestors.clone()),
            crate::wit_api::wit_bundles_response,
        )?))
    }

    async fn fetch_x509svid(
        &self,
        req: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let caller = self.stream_caller(&req).await?;
        // Refuses at once (rather than in-stream) when the caller has no identity.
        Ok(Response::new(updates(
            self.snapshots.clone(),
            caller,
            Some(self.attestors.clone()),
            x509_response,
        )?))
    }

    async fn fetch_x509_bundles(
        &self,
        req: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        let caller = self.stream_caller(&req).await?;
        // Refuses at once (rather than in-stream) when the caller has no identity.
        Ok(Response::new(updates(
            self.snapshots.clone(),
            caller,
            Some(self.attestors.clone()),
            x509_bundles_response,
        )?))
    }

    async fn fetch_jwtsvid(
        &self,
        req: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        let snap = self.snapshots.borrow().clone();
        let Caller {
            selectors,
            call: _call,
            ..
        } = self.caller(&req, &snap).await?;
        let r = req.into_inner();
        let svids = jwt_svids(&self.jwt, &snap, &selectors, r.audience, &r.spiffe_id).await?;
        Ok(Response::new(JwtsvidResponse { svids }))
    }

    async fn fetch_jwt_bundles(
        &self,
        req: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        let caller = self.stream_caller(&req).await?;
        // Refuses at once (rather than in-stream) when the caller has no identity.
        Ok(Response::new(updates(
            self.snapshots.clone(),
            caller,
            Some(self.attestors.clone()),
            jwt_bundles_response,
        )?))
    }

    async fn validate_jwtsvid(
        &self,
        req: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        // Any identity will do: only the socket's credentials are derived.
        let _call = {
            check_header(&req)?;
            attest_peer_for(&self.attestors, &req, UnixNeeds::NONE).await?
        };
        let r = req.into_inner();
        if r.audience.is_empty() {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        sigil_core::jwt::check_audiences(std::slice::from_ref(&r.audience))
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if r.svid.is_empty() {
            return Err(Status::invalid_argument("svid must be specified"));
        }
        let snap = self.snapshots.borrow().clone();
        // The killed list may be stale: validate nothing while cut off.
        if snap.offline {
            return Err(offline());
        }
        let v = sigil_core::jwt::validate(&r.svid, &r.audience, &snap.trust.jwt_bundles)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if snap
            .trust
            .killed
            .binary_search(&v.spiffe_id.to_string())
            .is_ok()
        {
            return Err(Status::invalid_argument(format!(
                "the JWT-SVID's identity {} has been killed",
                v.spiffe_id
            )));
        }
        Ok(Response::new(ValidateJwtsvidResponse {
            spiffe_id: v.spiffe_id.to_string(),
            claims: Some(to_prost_struct(&v.claims)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::EntrySet;
    use crate::cache::tests::{entry, set};

    /// A snapshot entitling `unix:uid:1000` to one entry, with no SVID.
    fn entitled_without_svid(synced: bool, unreachable: bool) -> Snapshot {
        Snapshot {
            entries: Arc::new(EntrySet::new(vec![entry(1, &["unix:uid:1000"])])),
            synced,
            unreachable,
            ..Default::default()
        }
    }

    #[test]
    fn an_entitled_caller_without_a_valid_svid_waits_only_while_the_server_is_reachable() {
        let caller = set(&["unix:uid:1000"]);
        // Reachable: the mint is coming, the stream waits for it.
        let snap = entitled_without_svid(true, false);
        assert!(matches!(x509_response(&snap, &caller), Ok(None)));
        // The server is away: no SVID is coming, the caller is told so.
        let snap = entitled_without_svid(true, true);
        let st = x509_response(&snap, &caller).expect_err("an error");
        assert_eq!(st.code(), tonic::Code::Unavailable);
        assert!(
            st.message().contains("cannot be reached"),
            "{}",
            st.message()
        );
    }

    #[test]
    fn before_the_first_sync_callers_wait_unless_the_server_is_away() {
        let caller = set(&["unix:uid:1000"]);
        let empty = |unreachable| Snapshot {
            unreachable,
            ..Default::default()
        };
        assert!(matches!(x509_response(&empty(false), &caller), Ok(None)));
        let st = x509_response(&empty(true), &caller).expect_err("an error");
        assert_eq!(st.code(), tonic::Code::Unavailable);
        assert!(st.message().contains("not synced"), "{}", st.message());
        // Synced, and nothing for this caller: refused as before.
        let other = entitled_without_svid(true, true);
        let st = x509_response(&other, &set(&["unix:uid:2000"])).expect_err("an error");
        assert_eq!(st.code(), tonic::Code::PermissionDenied);
    }
}
