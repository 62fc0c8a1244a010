//! Server side of node attestation: drives the `Attest` stream for each
//! attestor (join token; x509pop proof of possession; TPM 2.0 credential
//! activation + quote) and turns verified evidence into a
//! [`NodeAttestation`] for [`ServerState::issue_agent_svid`].

use crate::error::StartupError;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::UnixTime;
use sigil_attestors::x509pop;
use sigil_core::ids::{agent_id, random_bytes};
use sigil_core::{SpiffeId, TrustDomain};
use sigil_proto::agent::attest_begin::Evidence;
use sigil_proto::agent::attest_request::Step as ReqStep;
use sigil_proto::agent::attest_response::Step as RespStep;
use sigil_proto::agent::{AttestRequest, AttestResponse, AttestResult, X509PopChallenge};
use tokio::sync::mpsc;
use tonic::{Status, Streaming};

use crate::config::ServerConfig;
use sigil_core::selector::Selector;

use crate::datastore::AttestationType;
use crate::state::{Caller, NodeAttestation, ServerState};

/// How long an agent has to answer a challenge.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// The node attestors this server accepts, with their trust material.
#[derive(Default)]
pub struct NodeAttestors {
    x509pop_roots: Option<Vec<Vec<u8>>>,
    pub(crate) tpm: Option<crate::tpm_attest::TpmPolicy>,
}

impl NodeAttestors {
    /// Loads trust material named by the config (`[x509pop]`, `[tpm]`).
    pub fn from_config(cfg: &ServerConfig) -> Result<Self, StartupError> {
        let x509pop_roots = match &cfg.x509pop_ca_bundle {
            None => None,
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| StartupError::file("x509pop.ca_bundle_path", p, e))?;
                Some(
                    sigil_core::x509::pem_to_certs(&text)
                        .map_err(|e| StartupError::file("x509pop.ca_bundle_path", p, e))?,
                )
            }
        };
        let tpm = match &cfg.tpm {
            None => None,
            Some(t) => Some(crate::tpm_attest::TpmPolicy::from_config(t)?),
        };
        Ok(Self { x509pop_roots, tpm })
    }
}

/// Reads the next request, with a deadline.
pub(crate) async fn next(inbound: &mut Streaming<AttestRequest>) -> Result<ReqStep, Status> {
    let msg = tokio::time::timeout(STEP_TIMEOUT, inbound.message())
        .await
        .map_err(|_| Status::deadline_exceeded("attestation step timed out"))??
        .ok_or_else(|| Status::invalid_argument("attestation stream ended early"))?;
    msg.step
        .ok_or_else(|| Status::invalid_argument("invalid field `step`: missing"))
}

pub(crate) async fn send(
    tx: &mpsc::Sender<Result<AttestResponse, Status>>,
    step: RespStep,
) -> Result<(), Status> {
    tx.send(Ok(AttestResponse { step: Some(step) }))
        .await
        .map_err(|_| Status::cancelled("agent went away"))
}

/// Parses the node selectors an attestor derived; they are produced by
/// this server, so one that does not parse is a bug, not bad input.
pub(crate) fn node_selectors(v: Vec<String>) -> Result<Vec<Selector>, Status> {
    v.iter()
        .map(|s| {
            s.parse::<Selector>()
                .map_err(|e| Status::internal(format!("attestor produced selector {s:?}: {e}")))
        })
        .collect()
}

fn unique_id(td: &TrustDomain, attestor: &str, unique: &str) -> Result<SpiffeId, Status> {
    agent_id(td, attestor, unique).map_err(|e| Status::internal(e.to_string()))
}

/// Runs one attestation conversation. `caller` is the agent's ID when the
/// stream came over mTLS (re-attestation to renew): the evidence must then
/// prove that same node.
/// The attestor a node claims and a short, secret-free summary of what it
/// presented (for the audit record of a refusal): the first 16 hex digits
/// of the SHA-256 of the join token (the store keeps only the full hash),
/// of the x509pop leaf certificate, or of the TPM's EK public area.
fn claimed(begin: &sigil_proto::agent::AttestBegin) -> (&'static str, String) {
    let short = |b: &[u8]| {
        let h = sigil_core::ids::sha256_hex(b);
        format!("sha256:{}", h.get(..16).unwrap_or(&h))
    };
    match &begin.evidence {
        None => ("none", String::new()),
        Some(Evidence::JoinToken(t)) => {
            ("join_token", format!("token {}", short(t.token.as_bytes())))
        }
        Some(Evidence::X509pop(ev)) => (
            "x509pop",
            ev.chain
                .first()
                .map(|c| format!("leaf {}", short(c)))
                .unwrap_or_default(),
        ),
        Some(Evidence::Tpm(ev)) => ("tpm", format!("ek {}", short(&ev.ek_public))),
    }
}

/// Runs one attestation stream; a refusal after the first message is
/// written to the audit trail (rate-limited, see
/// [`ServerState::audit_attestation_failure`]).
pub async fn attest(
    state: Arc<ServerState>,
    attestors: Arc<NodeAttestors>,
    caller: Option<SpiffeId>,
    peer: Option<String>,
    inbound: &mut Streaming<AttestRequest>,
    tx: &mpsc::Sender<Result<AttestResponse, Status>>,
) -> Result<AttestResult, Status> {
    let ReqStep::Begin(begin) = next(inbound).await? else {
        return Err(Status::invalid_argument(
            "invalid field `step`: the first message must be `begin`",
        ));
    };
    let (kind, evidence) = claimed(&begin);
    let result = attest_begun(
        state.clone(),
        attestors,
        caller,
        peer.clone(),
        begin,
        inbound,
        tx,
    )
    .await;
    crate::metrics::node_attestation(kind, result.is_ok());
    if let Err(st) = &result {
        let reason = format!("{:?}: {}", st.code(), st.message());
        let st2 = state.clone();
        let _ = crate::blocking(move || {
            st2.audit_attestation_failure(kind, &evidence, peer, &reason);
            Ok::<(), Status>(())
        })
        .await;
    }
    result
}

async fn attest_begun(
    state: Arc<ServerState>,
    attestors: Arc<NodeAttestors>,
    caller: Option<SpiffeId>,
    peer: Option<String>,
    begin: sigil_proto::agent::AttestBegin,
    inbound: &mut Streaming<AttestRequest>,
    tx: &mpsc::Sender<Result<AttestResponse, Status>>,
) -> Result<AttestResult, Status> {
    let csr = begin.csr;
    let who = match &caller {
        Some(id) => Caller::agent(id.clone()),
        None => Caller::Node { peer },
    };
    let td = state.trust_domain().clone();
    let attested: NodeAttestation = match begin.evidence {
        None => {
            return Err(Status::invalid_argument(
                "invalid field `evidence`: missing",
            ));
        }
        Some(Evidence::JoinToken(t)) => {
            if caller.is_some() {
                return Err(Status::failed_precondition(
                    "join-token agents renew with RenewAgent",
                ));
            }
            if t.token.is_empty() {
                return Err(Status::invalid_argument(
                    "invalid field `join_token`: empty",
                ));
            }
            let st = state.clone();
            let who = who.clone();
            crate::blocking(move || st.consume_join_token(&who, &t.token)).await?
        }
        Some(Evidence::X509pop(ev)) => {
            let roots = attestors.x509pop_roots.as_ref().ok_or_else(|| {
                Status::failed_precondition("x509pop attestation is not enabled on this server")
            })?;
            let node = x509pop::verify_chain(&ev.chain, roots, UnixTime::now())
                .map_err(|e| Status::permission_denied(e.to_string()))?;
            let nonce = random_bytes::<32>().to_vec();
            send(
                tx,
                RespStep::X509popChallenge(X509PopChallenge {
                    nonce: nonce.clone(),
                }),
            )
            .await?;
            let ReqStep::X509popResponse(r) = next(inbound).await? else {
                return Err(Status::invalid_argument(
                    "invalid field `step`: expected x509pop_response",
                ));
            };
            node.verify_signature(&nonce, &r.signature)
                .map_err(|e| Status::permission_denied(e.to_string()))?;
            NodeAttestation {
                spiffe_id: unique_id(&td, "x509pop", &node.fingerprint)?,
                attestation_type: AttestationType::X509Pop,
                selectors: node_selectors(node.selectors)?,
            }
        }
        Some(Evidence::Tpm(ev)) => {
            let policy = attestors.tpm.as_ref().ok_or_else(|| {
                Status::failed_precondition("TPM attestation is not enabled on this server")
            })?;
            crate::tpm_attest::attest(policy, &td, ev, inbound, tx).await?
        }
    };
    if let Some(c) = &caller
        && c != &attested.spiffe_id
    {
        return Err(Status::permission_denied(format!(
            "re-attestation by {c} proved another node ({})",
            attested.spiffe_id
        )));
    }
    let st = state.clone();
    let issued = crate::blocking(move || st.issue_agent_svid(&who, attested, &csr)).await?;
    Ok(AttestResult {
        svid_chain: issued.chain,
        bundle: state.bundle(),
        spiffe_id: issued.spiffe_id.to_string(),
    })
}
