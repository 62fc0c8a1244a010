//! Agent side of node attestation over the `Attest` stream: sends the
//! evidence of the configured attestor (join token, x509pop, TPM) with a
//! CSR, answers the server's challenge, and returns the agent SVID.
//! x509pop and TPM agents also renew this way (fresh nonce, fresh quote).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sigil_attestors::node::tpm::AgentTpm;
use sigil_attestors::x509pop::NodeKey;
use sigil_core::now_unix;
use sigil_core::x509::new_key_and_csr;
use sigil_proto::agent::agent_api_client::AgentApiClient;
use sigil_proto::agent::attest_begin::Evidence;
use sigil_proto::agent::attest_request::Step as ReqStep;
use sigil_proto::agent::attest_response::Step as RespStep;
use sigil_proto::agent::{
    AttestBegin, AttestRequest, JoinToken, PcrValue, TpmChallengeResponse, TpmEvidence,
    X509PopEvidence, X509PopResponse,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::config::{AgentConfig, NodeAttestor};
use crate::node::AgentSvid;

/// What the agent proves its node with.
pub enum Prover {
    /// A join token (first attestation only).
    JoinToken(String),
    /// The node certificate and key.
    X509Pop(Arc<NodeKey>),
    /// The TPM (one ESAPI context; blocking calls run on the blocking pool)
    /// and the IMA log sent with each quote (`tpm.ima_log_path`), if any.
    Tpm(Arc<Mutex<AgentTpm>>, Option<PathBuf>),
}

impl Prover {
    /// Builds the prover named by the config. `join_token` is only needed
    /// (and only used) for the join-token attestor.
    pub fn from_config(cfg: &AgentConfig, join_token: Option<String>) -> Result<Self, String> {
        match &cfg.node_attestor {
            NodeAttestor::JoinToken => join_token
                .map(Prover::JoinToken)
                .ok_or_else(|| "no usable stored agent identity and no join token: pass --join-token (see `sigil-server token generate`; a node already registered under that ID is evicted first with `sigil-server agent evict`)".to_string()),
            NodeAttestor::X509Pop { cert_path, key_path } => {
                sigil_fs::check_private_file(key_path).map_err(|e| format!("x509pop.key_path: {e}"))?;
                let cert = std::fs::read_to_string(cert_path).map_err(|e| format!("x509pop.cert_path {}: {e}", cert_path.display()))?;
                let key = std::fs::read_to_string(key_path).map_err(|e| format!("x509pop.key_path {}: {e}", key_path.display()))?;
                Ok(Prover::X509Pop(Arc::new(NodeKey::load(&cert, &key).map_err(|e| e.to_string())?)))
            }
            NodeAttestor::Tpm { tcti, ima_log_path } => {
                let tpm = AgentTpm::open(tcti).map_err(|e| format!("tpm.tcti {tcti:?}: {e}"))?;
                Ok(Prover::Tpm(Arc::new(Mutex::new(tpm)), ima_log_path.clone()))
            }
        }
    }

    /// Whether renewals go through re-attestation (x509pop, TPM).
    pub fn reattests(&self) -> bool {
        !matches!(self, Prover::JoinToken(_))
    }
}

/// Reads the IMA log sent with a quote, refusing one larger than the
/// server accepts.
fn read_ima_log(path: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let max = sigil_attestors::node::ima::MAX_QUOTED_LOG_BYTES;
    let f = std::fs::File::open(path)
        .map_err(|e| format!("tpm.ima_log_path {}: {e}", path.display()))?;
    let mut log = Vec::new();
    f.take(max as u64 + 1)
        .read_to_end(&mut log)
        .map_err(|e| format!("tpm.ima_log_path {}: {e}", path.display()))?;
    if log.len() > max {
        return Err(format!(
            "tpm.ima_log_path {}: the IMA log is larger than {max} bytes",
            path.display()
        ));
    }
    Ok(log)
}

fn with_tpm<T: Send + 'static>(
    tpm: &Arc<Mutex<AgentTpm>>,
    f: impl FnOnce(&mut AgentTpm) -> Result<T, String> + Send + 'static,
) -> impl Future<Output = Result<T, String>> {
    let tpm = tpm.clone();
    async move {
        tokio::task::spawn_blocking(move || {
            let mut guard = tpm.lock().map_err(|_| "TPM lock poisoned".to_string())?;
            f(&mut guard)
        })
        .await
        .map_err(|_| "TPM task failed".to_string())?
    }
}

/// Runs one attestation over `channel`. Returns the new SVID and bundle.
pub async fn attest(
    channel: Channel,
    prover: &Prover,
) -> Result<(AgentSvid, Vec<Vec<u8>>), String> {
    let (csr, key) = new_key_and_csr().map_err(|e| e.to_string())?;
    let evidence = match prover {
        Prover::JoinToken(t) => Evidence::JoinToken(JoinToken { token: t.clone() }),
        Prover::X509Pop(k) => Evidence::X509pop(X509PopEvidence {
            chain: k.chain.clone(),
        }),
        Prover::Tpm(tpm, ima_log) => {
            let ev = with_tpm(tpm, |t| t.evidence().map_err(|e| e.to_string())).await?;
            Evidence::Tpm(TpmEvidence {
                ek_public: ev.ek_public,
                ek_cert: ev.ek_cert.unwrap_or_default(),
                ak_public: ev.ak_public,
                ima: ima_log.is_some(),
            })
        }
    };
    let (out, rx) = mpsc::channel(2);
    let first = AttestRequest {
        step: Some(ReqStep::Begin(AttestBegin {
            evidence: Some(evidence),
            csr,
        })),
    };
    out.send(first)
        .await
        .map_err(|_| "attestation stream closed".to_string())?;
    let mut inbound = AgentApiClient::new(channel)
        .attest(ReceiverStream::new(rx))
        .await
        .map_err(|s| format!("node attestation failed: {}", s.message()))?
        .into_inner();
    loop {
        let msg = inbound
            .message()
            .await
            .map_err(|s| format!("node attestation failed: {}", s.message()))?
            .ok_or("node attestation failed: the server closed the stream")?;
        let reply = match msg.step {
            Some(RespStep::Result(r)) => {
                let svid = AgentSvid::new(r.svid_chain, key, now_unix())?;
                if r.bundle.is_empty() {
                    return Err("server returned an empty trust bundle".into());
                }
                return Ok((svid, r.bundle));
            }
            Some(RespStep::X509popChallenge(c)) => {
                let Prover::X509Pop(k) = prover else {
                    return Err("server sent an x509pop challenge to a non-x509pop agent".into());
                };
                ReqStep::X509popResponse(X509PopResponse {
                    signature: k.sign(&c.nonce).map_err(|e| e.to_string())?,
                })
            }
            Some(RespStep::TpmChallenge(c)) => {
                let Prover::Tpm(tpm, ima_log_path) = prover else {
                    return Err("server sent a TPM challenge to a non-TPM agent".into());
                };
                let pcrs = c
                    .pcrs
                    .iter()
                    .map(|p| u8::try_from(*p).map_err(|_| format!("server asked for PCR {p}")))
                    .collect::<Result<Vec<u8>, _>>()?;
                let ima_log_path = ima_log_path.clone();
                let (secret, quote, ima_log) = with_tpm(tpm, move |t| {
                    let secret = t
                        .activate_credential(&c.credential_blob, &c.encrypted_secret)
                        .map_err(|e| e.to_string())?;
                    let quote = t.quote(&c.nonce, &pcrs).map_err(|e| e.to_string())?;
                    // Read after the quote: the server verifies the prefix
                    // the quote covers.
                    let ima_log = match &ima_log_path {
                        Some(p) => read_ima_log(p)?,
                        None => Vec::new(),
                    };
                    Ok((secret, quote, ima_log))
                })
                .await?;
                ReqStep::TpmResponse(TpmChallengeResponse {
                    activated_secret: secret,
                    quote_attest: quote.attest,
                    quote_signature: quote.signature,
                    pcr_values: quote
                        .pcr_values
                        .into_iter()
                        .map(|(i, d)| PcrValue {
                            index: u32::from(i),
                            digest: d,
                        })
                        .collect(),
                    ima_log,
                })
            }
            None => return Err("server sent an empty attestation step".into()),
        };
        out.send(AttestRequest { step: Some(reply) })
            .await
            .map_err(|_| "attestation stream closed".to_string())?;
    }
}
