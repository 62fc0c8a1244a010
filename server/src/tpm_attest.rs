//! TPM 2.0 node attestation on the server (wired to the pure-software
//! verifiers of `sigil_attestors::node::tpm`).

use crate::error::StartupError;
use sigil_attestors::node::tpm;
use sigil_core::TrustDomain;
use sigil_core::ids::random_bytes;
use sigil_proto::agent::attest_request::Step as ReqStep;
use sigil_proto::agent::attest_response::Step as RespStep;
use sigil_proto::agent::{AttestRequest, AttestResponse, TpmChallenge, TpmEvidence};
use tokio::sync::mpsc;
use tonic::{Status, Streaming};

use crate::config::TpmConfig;
use crate::node_attestation::{next, send};
use crate::state::NodeAttestation;

/// Which TPMs may attest and what they must quote.
pub struct TpmPolicy {
    pub ek_hashes: Vec<String>,
    pub ek_cas: Vec<Vec<u8>>,
    pub pcrs: Vec<u8>,
}

impl TpmPolicy {
    pub fn from_config(t: &TpmConfig) -> Result<Self, StartupError> {
        let ek_cas = match &t.ek_ca_path {
            None => vec![],
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| StartupError::file("tpm.ek_ca_path", p, e))?;
                sigil_core::x509::pem_to_certs(&text)
                    .map_err(|e| StartupError::file("tpm.ek_ca_path", p, e))?
            }
        };
        Ok(Self {
            ek_hashes: t.ek_hashes.clone(),
            ek_cas,
            pcrs: t.pcrs.clone(),
        })
    }
}

/// Runs the TPM challenge: verify the EK, make a credential for the AK,
/// demand its activation plus a quote over the policy's PCRs with a fresh
/// nonce, and derive the agent ID and node selectors.
pub async fn attest(
    policy: &TpmPolicy,
    td: &TrustDomain,
    ev: TpmEvidence,
    inbound: &mut Streaming<AttestRequest>,
    tx: &mpsc::Sender<Result<AttestResponse, Status>>,
) -> Result<NodeAttestation, Status> {
    let denied = |e: tpm::TpmError| Status::permission_denied(format!("TPM attestation: {e}"));
    let evidence = tpm::TpmEvidence {
        ek_public: ev.ek_public,
        ek_cert: (!ev.ek_cert.is_empty()).then_some(ev.ek_cert),
        ak_public: ev.ak_public,
    };
    let ek_hash = tpm::verify_ek(&evidence, &policy.ek_hashes, &policy.ek_cas).map_err(denied)?;
    let secret = random_bytes::<32>();
    let (credential_blob, encrypted_secret) =
        tpm::make_credential(&evidence.ek_public, &evidence.ak_public, &secret).map_err(denied)?;
    let nonce = random_bytes::<32>().to_vec();
    send(
        tx,
        RespStep::TpmChallenge(TpmChallenge {
            credential_blob,
            encrypted_secret,
            nonce: nonce.clone(),
            pcrs: policy.pcrs.iter().map(|p| u32::from(*p)).collect(),
        }),
    )
    .await?;
    let ReqStep::TpmResponse(r) = next(inbound).await? else {
        return Err(Status::invalid_argument(
            "invalid field `step`: expected tpm_response",
        ));
    };
    tpm::check_activation(&secret, &r.activated_secret).map_err(denied)?;
    let pcr_values = r
        .pcr_values
        .into_iter()
        .map(|p| {
            u8::try_from(p.index).map(|i| (i, p.digest)).map_err(|_| {
                Status::invalid_argument("invalid field `pcr_values`: index out of range")
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let quote = tpm::TpmQuote {
        attest: r.quote_attest,
        signature: r.quote_signature,
        pcr_values,
    };
    let verified =
        tpm::verify_quote(&evidence.ak_public, &quote, &nonce, &policy.pcrs).map_err(denied)?;
    let mut selectors = vec![format!("tpm:ek-hash:{ek_hash}")];
    selectors.extend(
        verified
            .iter()
            .map(|(i, d)| format!("tpm:pcr:sha256:{i}:{}", hex::encode(d))),
    );
    Ok(NodeAttestation {
        spiffe_id: sigil_core::ids::agent_id(td, "tpm", &ek_hash)
            .map_err(|e| Status::internal(e.to_string()))?,
        attestation_type: crate::datastore::AttestationType::Tpm,
        selectors: crate::node_attestation::node_selectors(selectors)?,
    })
}
