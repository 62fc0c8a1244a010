//! The agent API (gRPC over TLS): node attestation, agent SVID renewal,
//! the pushed entry sync stream, and batched workload SVID minting.
//!
//! Every call first passes [`Gate`], before its body is read: a call other
//! than `Attest` must come from an authenticated agent, `Attest` bodies are
//! capped and counted against a server-wide number of attestations in
//! progress, every call keeps its connection busy (for the idle timeout)
//! until its response ends, and every refusal is logged with the peer's
//! address.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use sigil_core::limits::CallGuard;

use sigil_core::x509::SvidInfo;
use sigil_core::{SpiffeId, now_unix};
use sigil_proto::agent::agent_api_server::AgentApi;
use sigil_proto::agent::{
    AttestRequest, AttestResponse, MAX_MINT_BATCH, MintJwtSvidRequest, MintJwtSvidResponse,
    MintResult, MintWitSvidRequest, MintWitSvidResponse, MintX509SvidsRequest,
    MintX509SvidsResponse, RenewAgentRequest, RenewAgentResponse, SyncRequest, SyncUpdate,
    attest_response,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::body::Body;
use tonic::{Request, Response, Status, Streaming};

use crate::blocking;
use crate::limits::{ConnPeer, MAX_ATTEST_BYTES, MAX_ATTESTATIONS};
use crate::state::ServerState;
use crate::sync::{SyncTracker, Trust, chunks};

pub struct AgentService {
    state: Arc<ServerState>,
    attestors: Arc<crate::node_attestation::NodeAttestors>,
}

impl AgentService {
    pub fn new(state: Arc<ServerState>, attestors: crate::node_attestation::NodeAttestors) -> Self {
        Self {
            state,
            attestors: Arc::new(attestors),
        }
    }
}

/// The agent a call was authenticated as (by [`Gate`], from the client
/// certificate), with that certificate.
#[derive(Clone)]
pub struct Authenticated {
    pub id: SpiffeId,
    pub leaf: Arc<Vec<u8>>,
}

/// The gRPC path of `Attest`, the one call open to clients without an
/// agent SVID.
const ATTEST_PATH: &str = "/sigil.agent.AgentApi/Attest";

impl AgentService {
    fn authenticate<T>(&self, req: &Request<T>) -> Result<(SpiffeId, Arc<Vec<u8>>), Status> {
        req.extensions()
            .get::<Authenticated>()
            .map(|a| (a.id.clone(), a.leaf.clone()))
            .ok_or_else(|| Status::unauthenticated("an agent X.509-SVID (mTLS) is required"))
    }
}

fn peer_addr<T>(req: &Request<T>) -> Option<String> {
    req.extensions()
        .get::<ConnPeer>()
        .map(|p| p.addr.to_string())
}

/// Tower layer in front of the agent API; see the module doc.
#[derive(Clone)]
pub struct Gate {
    state: Arc<ServerState>,
    attestations: Arc<Semaphore>,
}

impl Gate {
    pub fn new(state: Arc<ServerState>) -> Self {
        Self {
            state,
            attestations: Arc::new(Semaphore::new(MAX_ATTESTATIONS)),
        }
    }
}

impl<S> tower::Layer<S> for Gate {
    type Service = GateService<S>;
    fn layer(&self, inner: S) -> GateService<S> {
        GateService {
            gate: self.clone(),
            inner,
        }
    }
}

/// The service [`Gate`] wraps around the agent API.
#[derive(Clone)]
pub struct GateService<S> {
    gate: Gate,
    inner: S,
}

fn refuse(peer: &ConnPeer, path: &str, st: Status) -> http::Response<Body> {
    tracing::info!(peer = %peer.addr, method = path, code = ?st.code(), error = %st.message(), "agent API call refused");
    st.into_http()
}

impl Gate {
    /// Checks a call's credentials before its body is read.
    fn admit(&self, peer: &ConnPeer, path: &str) -> Result<Option<Authenticated>, Status> {
        let leaf = peer.certs.as_ref().and_then(|c| c.first());
        match leaf {
            Some(leaf) => {
                let leaf = Arc::new(leaf.to_vec());
                let id = self.state.authenticate_agent(&leaf)?;
                Ok(Some(Authenticated { id, leaf }))
            }
            None if path == ATTEST_PATH => Ok(None),
            None => Err(Status::unauthenticated(
                "an agent X.509-SVID (mTLS) is required",
            )),
        }
    }
}

impl<S> tower::Service<http::Request<Body>> for GateService<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        let Some(peer) = req.extensions().get::<ConnPeer>().cloned() else {
            return Box::pin(async {
                Ok(Status::internal("no connection information").into_http())
            });
        };
        let path = req.uri().path().to_string();
        match self.gate.admit(&peer, &path) {
            Ok(Some(a)) => {
                req.extensions_mut().insert(a);
            }
            Ok(None) => {}
            Err(st) => {
                let resp = refuse(&peer, &path, st);
                return Box::pin(async move { Ok(resp) });
            }
        }
        if path == ATTEST_PATH {
            let Ok(permit) = self.gate.attestations.clone().try_acquire_owned() else {
                let resp = refuse(
                    &peer,
                    &path,
                    Status::resource_exhausted(format!(
                        "{MAX_ATTESTATIONS} node attestations are in progress; retry later"
                    )),
                );
                return Box::pin(async move { Ok(resp) });
            };
            req = req.map(|b| {
                Body::new(Permitted {
                    inner: http_body_util::Limited::new(b, MAX_ATTEST_BYTES),
                    _permit: Some(permit),
                    _call: None,
                })
            });
        }
        let call = peer.activity.begin();
        // Clone-and-swap: the service that was polled ready handles this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let resp = inner.call(req).await?;
            if let Some(code) = resp.headers().get("grpc-status")
                && code.as_bytes() != b"0"
            {
                let msg = resp
                    .headers()
                    .get("grpc-message")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default();
                tracing::info!(peer = %peer.addr, method = path, code = ?code, error = msg, "agent API call refused");
            }
            Ok(resp.map(|b| {
                Body::new(Permitted {
                    inner: b,
                    _permit: None,
                    _call: Some(call),
                })
            }))
        })
    }
}

/// A body that holds an attestation slot or keeps its connection busy
/// until it is dropped.
struct Permitted<B> {
    inner: B,
    _permit: Option<OwnedSemaphorePermit>,
    _call: Option<CallGuard>,
}

impl<B> HttpBody for Permitted<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[tonic::async_trait]
impl AgentApi for AgentService {
    type AttestStream = ReceiverStream<Result<AttestResponse, Status>>;

    async fn attest(
        &self,
        req: Request<Streaming<AttestRequest>>,
    ) -> Result<Response<Self::AttestStream>, Status> {
        // Over mTLS this is a re-attestation by an existing agent.
        let caller = self.authenticate(&req).ok().map(|(id, _)| id);
        let peer = peer_addr(&req);
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(2);
        let state = self.state.clone();
        let attestors = self.attestors.clone();
        tokio::spawn(async move {
            let result = crate::node_attestation::attest(
                state,
                attestors,
                caller,
                peer.clone(),
                &mut inbound,
                &tx,
            )
            .await;
            if let Err(st) = &result {
                tracing::info!(peer = %peer.as_deref().unwrap_or("unknown"), code = ?st.code(), error = %st.message(), "node attestation refused");
            }
            let msg = result.map(|r| AttestResponse {
                step: Some(attest_response::Step::Result(r)),
            });
            let _ = tx.send(msg).await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn renew_agent(
        &self,
        req: Request<RenewAgentRequest>,
    ) -> Result<Response<RenewAgentResponse>, Status> {
        let (id, _) = self.authenticate(&req)?;
        let csr = req.into_inner().csr;
        let state = self.state.clone();
        let chain = blocking(move || state.renew_agent(&id, &csr)).await?;
        Ok(Response::new(RenewAgentResponse {
            svid_chain: chain,
            bundle: self.state.bundle(),
        }))
    }

    type SyncStream = ReceiverStream<Result<SyncUpdate, Status>>;

    async fn sync(&self, req: Request<SyncRequest>) -> Result<Response<Self::SyncStream>, Status> {
        let (id, leaf) = self.authenticate(&req)?;
        // The certificate cannot change during the stream: parse it once;
        // each wake-up re-checks the agent's record (ban, eviction, expiry).
        let info = SvidInfo::from_der(&leaf).map_err(|e| Status::unauthenticated(e.to_string()))?;
        let deltas = req.get_ref().deltas;
        let peer = peer_addr(&req);
        let state = self.state.clone();
        let (tx, rx) = mpsc::channel(4);
        let (mut global, mut own) = state.subscribe(&id);
        tokio::spawn(async move {
            let _open = crate::metrics::SyncStreamGauge::open();
            let mut tracker = SyncTracker::new(deltas);
            loop {
                global.borrow_and_update();
                own.borrow_and_update();
                // A banned or evicted agent loses its stream at the next change.
                let rec = match state.check_agent(&info) {
                    Ok(rec) => rec,
                    Err(e) => {
                        let st: Status = e.into();
                        tracing::info!(peer = %peer.as_deref().unwrap_or("unknown"), agent = %id, code = ?st.code(), error = %st.message(), "sync stream refused");
                        // A killed or banned node is told so, with an empty
                        // entry set: it drops every identity it serves.
                        if let Some(reason) = state.withdrawal_of(&id) {
                            tracing::warn!(agent = %id, %reason, "withdrawing every identity of the agent");
                            let _ = tx
                                .send(Ok(SyncUpdate {
                                    revision: state.revision(),
                                    bundle: state.bundle(),
                                    jwt_bundle: state.jwt_bundle(),
                                    agent_killed: true,
                                    kill_reason: reason,
                                    ..Default::default()
                                }))
                                .await;
                        }
                        let _ = tx.send(Err(st)).await;
                        return;
                    }
                };
                // Wake up when the next of this agent's entries expires, so an
                // expired entry is withdrawn without waiting for another change.
                let entries = match state.entries_for_sync(&id, Some(&rec)) {
                    Ok(entries) => entries,
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                };
                // Grants end the same way.
                let next_expiry = entries
                    .iter()
                    .flat_map(|e| [e.expires_at, e.approved_until])
                    .flatten()
                    .min();
                let trust = Trust {
                    bundle: state.bundle(),
                    jwt_bundle: state.jwt_bundle(),
                    federated: state.federated_for(&entries),
                    killed: state.killed_spiffe_ids(),
                    crl: state.crls(),
                    wit_bundle: state.wit_bundle(),
                };
                if let Some(update) = tracker.next(&entries, trust, state.revision()) {
                    for chunk in chunks(update) {
                        let m = &crate::metrics::METRICS;
                        m.sync_updates_sent.inc();
                        m.sync_sent_bytes
                            .inc_by(prost::Message::encoded_len(&chunk) as u64);
                        if tx.send(Ok(chunk)).await.is_err() {
                            return;
                        }
                    }
                }
                let expiry_wait =
                    next_expiry.map(|t| Duration::from_secs((t - now_unix()).max(0) as u64 + 1));
                tokio::select! {
                    r = global.changed() => if r.is_err() { return },
                    r = own.changed() => if r.is_err() { return },
                    _ = tx.closed() => return,
                    _ = async {
                        match expiry_wait {
                            Some(d) => tokio::time::sleep(d).await,
                            None => std::future::pending().await,
                        }
                    } => {}
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn mint_x509_svids(
        &self,
        req: Request<MintX509SvidsRequest>,
    ) -> Result<Response<MintX509SvidsResponse>, Status> {
        let (id, _) = self.authenticate(&req)?;
        let started = std::time::Instant::now();
        let csrs: Vec<(String, bytes::Bytes)> = req
            .into_inner()
            .csrs
            .into_iter()
            .map(|c| (c.entry_id, c.csr))
            .collect();
        if csrs.len() > MAX_MINT_BATCH {
            return Err(Status::invalid_argument(format!(
                "invalid field `csrs`: at most {MAX_MINT_BATCH} per call"
            )));
        }
        let state = self.state.clone();
        // Signing is CPU-bound: at most one batch per core at a time, so a
        // rotation storm queues (and is counted) instead of starving the
        // runtime.
        let slot = self
            .state
            .signing
            .acquire(csrs.len())
            .await
            .ok_or_else(|| Status::unavailable("server shutting down"))?;
        // The CSRs come back with the batch: their entry IDs name the
        // results, without a copy of each.
        let (batch, csrs) = blocking({
            let (state, id) = (state.clone(), id.clone());
            move || state.sign_for_agent(&id, &csrs).map(|b| (b, csrs))
        })
        .await?;
        slot.signed(batch.signed());
        // The slot goes before the audit commit: the next batch signs while
        // this one waits on the disk.
        drop(slot);
        // Audited before anything is returned.
        let results = blocking(move || state.audit_batch(&id, batch)).await?;
        crate::metrics::METRICS
            .mint_batch_duration
            .observe(started.elapsed().as_secs_f64());
        Ok(Response::new(MintX509SvidsResponse {
            results: csrs
                .into_iter()
                .map(|(entry_id, _)| entry_id)
                .zip(results)
                .map(|(entry_id, r)| match r {
                    Ok(chain) => MintResult {
                        entry_id,
                        svid_chain: chain,
                        error: String::new(),
                    },
                    Err(refusal) => MintResult {
                        entry_id,
                        svid_chain: vec![],
                        error: refusal.to_string(),
                    },
                })
                .collect(),
        }))
    }

    async fn mint_jwt_svid(
        &self,
        req: Request<MintJwtSvidRequest>,
    ) -> Result<Response<MintJwtSvidResponse>, Status> {
        let (id, _) = self.authenticate(&req)?;
        let r = req.into_inner();
        // Bounded here, before anything is signed or cached on either side.
        sigil_core::jwt::check_audiences(&r.audience)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let state = self.state.clone();
        let token =
            blocking(move || state.mint_jwt_for_agent(&id, &r.entry_id, &r.audience)).await?;
        crate::metrics::METRICS.jwt_svids_signed.inc();
        Ok(Response::new(MintJwtSvidResponse { token }))
    }

    async fn mint_wit_svid(
        &self,
        req: Request<MintWitSvidRequest>,
    ) -> Result<Response<MintWitSvidResponse>, Status> {
        let (id, _) = self.authenticate(&req)?;
        let r = req.into_inner();
        // A public JWK is a few hundred bytes; refuse anything far larger
        // before parsing it.
        if r.public_jwk.len() > 4096 {
            return Err(Status::invalid_argument(format!(
                "invalid field `public_jwk`: {} bytes, at most 4096 are accepted",
                r.public_jwk.len()
            )));
        }
        let state = self.state.clone();
        let token =
            blocking(move || state.mint_wit_for_agent(&id, &r.entry_id, &r.public_jwk)).await?;
        Ok(Response::new(MintWitSvidResponse { token }))
    }
}
