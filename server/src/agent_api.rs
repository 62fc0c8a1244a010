//! The agent API (gRPC over TLS): node attestation, agent SVID renewal,
//! the pushed entry sync stream, and batched workload SVID minting.

use std::sync::Arc;
use std::time::Duration;

use sigil_core::x509::SvidInfo;
use sigil_core::{SpiffeId, now_unix};
use sigil_proto::agent::agent_api_server::AgentApi;
use sigil_proto::agent::{
    AttestRequest, AttestResponse, MintJwtSvidRequest, MintJwtSvidResponse, MintResult,
    MintX509SvidsRequest, MintX509SvidsResponse, RenewAgentRequest, RenewAgentResponse,
    SyncRequest, SyncUpdate, attest_response,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::blocking;
use crate::state::ServerState;
use crate::sync::{SyncTracker, Trust, chunks};

/// Most CSRs accepted in one mint call.
pub const MAX_MINT_BATCH: usize = 1000;

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

fn peer_leaf<T>(req: &Request<T>) -> Result<Vec<u8>, Status> {
    let certs = req
        .peer_certs()
        .ok_or_else(|| Status::unauthenticated("an agent X.509-SVID (mTLS) is required"))?;
    certs
        .first()
        .map(|c| c.to_vec())
        .ok_or_else(|| Status::unauthenticated("an agent X.509-SVID (mTLS) is required"))
}

impl AgentService {
    fn authenticate<T>(&self, req: &Request<T>) -> Result<(SpiffeId, Vec<u8>), Status> {
        let leaf = peer_leaf(req)?;
        let id = self.state.authenticate_agent(&leaf)?;
        Ok((id, leaf))
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
        let peer = req.remote_addr().map(|a| a.to_string());
        let caller = match peer_leaf(&req) {
            Ok(leaf) => Some(self.state.authenticate_agent(&leaf)?),
            Err(_) => None,
        };
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(2);
        let state = self.state.clone();
        let attestors = self.attestors.clone();
        tokio::spawn(async move {
            let result =
                crate::node_attestation::attest(state, attestors, caller, peer, &mut inbound, &tx)
                    .await;
            if let Err(st) = &result {
                tracing::info!(code = ?st.code(), error = %st.message(), "node attestation refused");
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
        let state = self.state.clone();
        let (tx, rx) = mpsc::channel(4);
        let (mut global, mut own) = state.subscribe(&id);
        tokio::spawn(async move {
            let mut tracker = SyncTracker::new(deltas);
            loop {
                global.borrow_and_update();
                own.borrow_and_update();
                // A banned or evicted agent loses its stream at the next change.
                let rec = match state.check_agent(&info) {
                    Ok(rec) => rec,
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                };
                // Wake up when the next of this agent's entries expires, so an
                // expired entry is withdrawn without waiting for another change.
                let entries = match state.entries_for_agent(&id, Some(&rec)) {
                    Ok(entries) => entries,
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                };
                let next_expiry = entries.iter().filter_map(|e| e.expires_at).min();
                let trust = Trust {
                    bundle: state.bundle(),
                    jwt_bundle: state.jwt_bundle(),
                    federated: state.federated_for(&entries),
                };
                if let Some(update) = tracker.next(&entries, trust, state.revision()) {
                    for chunk in chunks(update) {
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
        let csrs: Vec<(String, Vec<u8>)> = req
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
        let ids: Vec<String> = csrs.iter().map(|c| c.0.clone()).collect();
        // Signing is CPU-bound: at most one batch per core at a time, so a
        // rotation storm queues (and is counted) instead of starving the
        // runtime.
        let slot = self
            .state
            .signing
            .acquire(csrs.len())
            .await
            .ok_or_else(|| Status::unavailable("server shutting down"))?;
        let results = blocking(move || state.mint_for_agent(&id, &csrs)).await?;
        slot.signed(results.iter().filter(|r| r.is_ok()).count());
        drop(slot);
        Ok(Response::new(MintX509SvidsResponse {
            results: ids
                .into_iter()
                .zip(results)
                .map(|(entry_id, r)| match r {
                    Ok(chain) => MintResult {
                        entry_id,
                        svid_chain: chain,
                        error: String::new(),
                    },
                    Err(error) => MintResult {
                        entry_id,
                        svid_chain: vec![],
                        error,
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
        let state = self.state.clone();
        let token =
            blocking(move || state.mint_jwt_for_agent(&id, &r.entry_id, &r.audience)).await?;
        Ok(Response::new(MintJwtSvidResponse { token }))
    }
}
