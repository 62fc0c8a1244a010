//! TPM 2.0 node attestation on the server (wired to the pure-software
//! verifiers of `sigil_attestors::node::tpm`), with the IMA measurement
//! log an agent may send with its quote: PCR 10 is then quoted too, the
//! log is replayed against it (`sigil_attestors::node::ima`), and every
//! SHA-256 file digest of the verified part becomes a
//! `tpm:ima:sha256:HEX` node selector. A log that does not replay to the
//! quoted PCR 10 fails the attestation (audited like every refusal).

use crate::error::StartupError;
use sigil_attestors::node::{ima, tpm};
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

/// The PCR the kernel's IMA extends.
const IMA_PCR: u8 = 10;

/// Replays the agent's IMA log against the verified PCR 10 and returns
/// one `tpm:ima:sha256:HEX` selector per measured file digest.
fn ima_selectors(
    announced: bool,
    log: &[u8],
    verified: &[(u8, Vec<u8>)],
) -> Result<Vec<String>, Status> {
    if !announced {
        if !log.is_empty() {
            return Err(Status::invalid_argument(
                "invalid field `ima_log`: sent without `ima` in the TPM evidence",
            ));
        }
        return Ok(Vec::new());
    }
    if log.is_empty() {
        return Err(Status::invalid_argument(
            "invalid field `ima_log`: empty (the evidence announced an IMA log)",
        ));
    }
    if log.len() > ima::MAX_QUOTED_LOG_BYTES {
        return Err(Status::invalid_argument(format!(
            "invalid field `ima_log`: {} bytes, larger than {}",
            log.len(),
            ima::MAX_QUOTED_LOG_BYTES
        )));
    }
    let pcr10 = verified
        .iter()
        .find(|(i, _)| *i == IMA_PCR)
        .map(|(_, d)| d.as_slice())
        .ok_or_else(|| Status::internal("PCR 10 missing from a verified quote"))?;
    let log = ima::verify_quoted_prefix(log, ima::ImaBank::Sha256, pcr10)
        .map_err(|e| Status::permission_denied(format!("TPM attestation: {e}")))?;
    Ok(log
        .digests()
        .map(|d| format!("tpm:ima:sha256:{d}"))
        .collect())
}

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
    // PCR 10 is quoted for the IMA log but, unless the policy lists it,
    // gives no `tpm:pcr` selector (it changes with every measurement).
    let mut requested = policy.pcrs.clone();
    if ev.ima && !requested.contains(&IMA_PCR) {
        requested.push(IMA_PCR);
        requested.sort_unstable();
    }
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
            pcrs: requested.iter().map(|p| u32::from(*p)).collect(),
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
        tpm::verify_quote(&evidence.ak_public, &quote, &nonce, &requested).map_err(denied)?;
    let mut selectors = vec![format!("tpm:ek-hash:{ek_hash}")];
    selectors.extend(
        verified
            .iter()
            .filter(|(i, _)| policy.pcrs.contains(i))
            .map(|(i, d)| format!("tpm:pcr:sha256:{i}:{}", hex::encode(d))),
    );
    selectors.extend(ima_selectors(ev.ima, &r.ima_log, &verified)?);
    Ok(NodeAttestation {
        spiffe_id: sigil_core::ids::agent_id(td, "tpm", &ek_hash)
            .map_err(|e| Status::internal(e.to_string()))?,
        attestation_type: crate::datastore::AttestationType::Tpm,
        selectors: crate::node_attestation::node_selectors(selectors)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ima_logs_that_are_unannounced_empty_or_too_large_are_refused_naming_the_field() {
        let pcr10 = vec![(IMA_PCR, vec![0u8; 32])];
        assert!(ima_selectors(false, b"", &pcr10).unwrap().is_empty());
        for (announced, log) in [
            (false, vec![1u8]),
            (true, Vec::new()),
            (true, vec![0u8; ima::MAX_QUOTED_LOG_BYTES + 1]),
        ] {
            let e = ima_selectors(announced, &log, &pcr10).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(e.message().contains("`ima_log`"), "{}", e.message());
        }
        // Garbage that cannot replay to the quoted PCR 10.
        let e = ima_selectors(true, &[0u8; 3], &[(IMA_PCR, vec![1u8; 32])]).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
    }
}
