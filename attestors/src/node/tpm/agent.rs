//! Agent side: evidence, credential activation and quotes from a real TPM
//! through tss-esapi (ESAPI over a TCTI).
//!
//! Every TPM object and session this module creates is flushed before the
//! call that created it returns, on success and on every error path: swtpm
//! and `/dev/tpm0` have no resource manager, and a TPM has room for only a
//! few (swtpm: 3) loaded objects. Between calls nothing stays loaded; the
//! AK lives on as its wrapped private part and public area, and is loaded
//! again under a recreated EK when needed (`TPM2_CreatePrimary` of the EK
//! is deterministic: same TPM, same template, same key).
//!
//! Each call opens its own ESAPI context and closes it before returning, so
//! no TPM connection is held between calls: swtpm serves one TCP client at a
//! time, and a held connection would block every other user of the TPM
//! (`tpm2_pcrextend`, a second agent) until the agent exits.

use std::str::FromStr;

use ring::digest;
use tss_esapi::abstraction::{AsymmetricAlgorithmSelection, DefaultKey, ak, ek};
use tss_esapi::attributes::SessionAttributesBuilder;
use tss_esapi::constants::{CapabilityType, SessionType};
use tss_esapi::handles::{AuthHandle, KeyHandle, ObjectHandle, SessionHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, SignatureSchemeAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    CapabilityData, Data, EncryptedSecret, IdObject, PcrSelectionListBuilder, PcrSlot, Private,
    Public, SignatureScheme, SymmetricDefinition,
};
use tss_esapi::traits::Marshall;
use tss_esapi::{Context, TctiNameConf};

use super::verify::{check_nonce, pcr_set};
use super::wire::{self, QuoteAttest};
use super::{EK_CERT_NV_INDEX_RSA2048, TpmError, TpmEvidence, TpmQuote};

/// How often [`AgentTpm::quote`] retries when a PCR changes between the
/// quote and the PCR read that accompanies it.
const QUOTE_ATTEMPTS: usize = 3;

/// The key type of the attestation key an [`AgentTpm`] creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum AkAlgorithm {
    /// RSA-2048, RSASSA-PKCS1-v1_5 with SHA-256 (the default; every TPM 2.0 has it).
    #[default]
    Rsa2048,
    /// NIST P-256, ECDSA with SHA-256.
    EccP256,
}

/// One TPM and the attestation key this agent created in it.
///
/// All methods block on TPM I/O (tens of milliseconds each; EK creation can
/// take seconds on hardware TPMs): call them from `spawn_blocking`, and keep
/// the `AgentTpm` behind a mutex so only one command sequence talks to the
/// TPM at a time. Each call opens one ESAPI context for its TPM commands and
/// closes it when done (see the module notes).
///
/// The EK is the TCG default RSA-2048 EK (`TPM2_CreatePrimary` in the
/// endorsement hierarchy with the EK Credential Profile low-range template
/// B.3.3, the key an EK certificate in NV index `0x01c00002` certifies).
/// The AK is created by tss-esapi's `abstraction::ak::create_ak_2` as a
/// child **of that EK** (a PolicySecret(endorsement) session authorises the
/// EK as parent): a restricted, fixedTPM, fixedParent signing key with an
/// empty auth value. It is created on the first [`evidence`](Self::evidence)
/// call and reused for this `AgentTpm`'s lifetime; it is not persisted.
pub struct AgentTpm {
    tcti: TctiNameConf,
    ak_algorithm: AkAlgorithm,
    ek: Option<EkInfo>,
    ak: Option<AkBlobs>,
}

struct EkInfo {
    public: Vec<u8>,
    cert: Option<Vec<u8>>,
}

#[derive(Clone)]
struct AkBlobs {
    private: Private,
    public: Public,
    public_bytes: Vec<u8>,
}

impl std::fmt::Debug for AgentTpm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentTpm")
            .field("tcti", &self.tcti)
            .field("ak_algorithm", &self.ak_algorithm)
            .field("has_ek", &self.ek.is_some())
            .field("has_ak", &self.ak.is_some())
            .finish_non_exhaustive()
    }
}

fn tpm(operation: &'static str) -> impl FnOnce(tss_esapi::Error) -> TpmError {
    move |e| TpmError::Tpm {
        operation,
        message: e.to_string(),
    }
}

/// Runs `f`, then flushes `handle` (object or session) whatever `f` returned.
fn with_flushed<T>(
    ctx: &mut Context,
    handle: ObjectHandle,
    what: &'static str,
    f: impl FnOnce(&mut Context) -> Result<T, TpmError>,
) -> Result<T, TpmError> {
    let result = f(ctx);
    let flushed = ctx.flush_context(handle);
    match (result, flushed) {
        (Ok(value), Ok(())) => Ok(value),
        (Ok(_), Err(e)) => Err(tpm(what)(e)),
        (Err(e), Ok(())) => Err(e),
        (Err(e), Err(flush)) => {
            tracing::warn!(error = %flush, "{what} failed after an earlier error");
            Err(e)
        }
    }
}

impl AgentTpm {
    /// Opens the TPM behind `tcti` with an RSA-2048 AK. The TPM is contacted
    /// once to check that it answers; the connection is not kept.
    ///
    /// `tcti` is a TSS2 TCTI configuration string: `device:/dev/tpmrm0`
    /// (kernel resource manager, preferred on hosts), `device:/dev/tpm0`,
    /// `swtpm:host=127.0.0.1,port=2321` (swtpm over TCP; the control
    /// channel is port+1), `tabrmd:` (the D-Bus resource manager).
    pub fn open(tcti: &str) -> Result<Self, TpmError> {
        Self::open_with(tcti, AkAlgorithm::default())
    }

    /// Opens the TPM behind `tcti`; the AK will be of type `ak_algorithm`.
    pub fn open_with(tcti: &str, ak_algorithm: AkAlgorithm) -> Result<Self, TpmError> {
        let tcti = TctiNameConf::from_str(tcti)
            .map_err(|e| TpmError::InvalidArgument(format!("TCTI {tcti:?}: {e}")))?;
        let this = Self {
            tcti,
            ak_algorithm,
            ek: None,
            ak: None,
        };
        drop(this.connect()?);
        Ok(this)
    }

    fn connect(&self) -> Result<Context, TpmError> {
        Context::new(self.tcti.clone()).map_err(tpm("opening the TPM (TCTI/ESAPI init)"))
    }

    /// The EK public area, the EK certificate when the TPM has one, and the
    /// AK public area (created now on the first call).
    pub fn evidence(&mut self) -> Result<TpmEvidence, TpmError> {
        if self.ek.is_none() || self.ak.is_none() {
            let ak_algorithm = self.ak_algorithm;
            let mut ctx = self.connect()?;
            let ek_handle = create_ek(&mut ctx)?;
            let (ek_public, ak) =
                with_flushed(&mut ctx, ek_handle.into(), "flushing the EK", |ctx| {
                    let (ek_public, _, _) = ctx
                        .read_public(ek_handle)
                        .map_err(tpm("reading the EK public area"))?;
                    let ak = create_ak(ctx, ek_handle, ak_algorithm)?;
                    Ok((tpm2b_public(&ek_public)?, ak))
                })?;
            let cert = read_ek_cert(&mut ctx)?;
            self.ek = Some(EkInfo {
                public: ek_public,
                cert,
            });
            self.ak = Some(ak);
        }
        match (&self.ek, &self.ak) {
            (Some(ek), Some(ak)) => Ok(TpmEvidence {
                ek_public: ek.public.clone(),
                ek_cert: ek.cert.clone(),
                ak_public: ak.public_bytes.clone(),
            }),
            _ => Err(TpmError::Bug("EK or AK missing after creation".into())),
        }
    }

    /// Answers a [`make_credential`](super::make_credential) challenge:
    /// `TPM2_ActivateCredential` with the AK as the credentialed object and
    /// the EK as the decryption key. Returns the secret; it decrypts only if
    /// the challenge was made for this EK and this AK's Name.
    pub fn activate_credential(
        &mut self,
        credential_blob: &[u8],
        encrypted_secret: &[u8],
    ) -> Result<Vec<u8>, TpmError> {
        let ak = self.ak.clone().ok_or(TpmError::NoAttestationKey)?;
        let (id_object, secret) = wire::activation_inputs(credential_blob, encrypted_secret)?;
        let id_object =
            IdObject::try_from(id_object.to_vec()).map_err(|e| TpmError::Malformed {
                what: "TPM2B_ID_OBJECT",
                reason: e.to_string(),
            })?;
        let secret =
            EncryptedSecret::try_from(secret.to_vec()).map_err(|e| TpmError::Malformed {
                what: "TPM2B_ENCRYPTED_SECRET",
                reason: e.to_string(),
            })?;

        let ctx = &mut self.connect()?;
        let ek_handle = create_ek(ctx)?;
        with_flushed(ctx, ek_handle.into(), "flushing the EK", |ctx| {
            let ak_handle = load_ak(ctx, ek_handle, &ak)?;
            with_flushed(ctx, ak_handle.into(), "flushing the AK", |ctx| {
                let policy = start_endorsement_policy_session(ctx)?;
                with_flushed(
                    ctx,
                    SessionHandle::from(policy).into(),
                    "flushing the policy session",
                    |ctx| {
                        authorize_endorsement(ctx, policy)?;
                        // Handle 1 (the AK, USER role): empty password.
                        // Handle 2 (the EK, ADMIN role, adminWithPolicy):
                        // the PolicySecret(endorsement) session.
                        let digest = ctx
                            .execute_with_sessions(
                                (Some(AuthSession::Password), Some(policy), None),
                                |ctx| {
                                    ctx.activate_credential(ak_handle, ek_handle, id_object, secret)
                                },
                            )
                            .map_err(tpm("TPM2_ActivateCredential"))?;
                        Ok(digest.value().to_vec())
                    },
                )
            })
        })
    }

    /// Quotes the SHA-256 PCRs `pcrs` (indices 0..24) with the AK over
    /// `nonce` (qualifying data, 16..=64 bytes), and reads their values.
    ///
    /// The values are read right after the quote; if a PCR changed in
    /// between (the digest does not match) the quote is retried a few times.
    pub fn quote(&mut self, nonce: &[u8], pcrs: &[u8]) -> Result<TpmQuote, TpmError> {
        check_nonce(nonce)?;
        let indices: Vec<u8> = pcr_set(pcrs)?.into_iter().collect();
        let ak = self.ak.clone().ok_or(TpmError::NoAttestationKey)?;
        let selection = sha256_selection(&indices)?;
        let qualifying_data = Data::try_from(nonce.to_vec())
            .map_err(|e| TpmError::InvalidArgument(format!("nonce: {e}")))?;

        let ctx = &mut self.connect()?;
        let ek_handle = create_ek(ctx)?;
        // The AK stays loaded without its parent: free the EK's slot first.
        let ak_handle = with_flushed(ctx, ek_handle.into(), "flushing the EK", |ctx| {
            load_ak(ctx, ek_handle, &ak)
        })?;
        with_flushed(ctx, ak_handle.into(), "flushing the AK", |ctx| {
            for _ in 0..QUOTE_ATTEMPTS {
                let (attest, signature) = ctx
                    .execute_with_session(Some(AuthSession::Password), |ctx| {
                        ctx.quote(
                            ak_handle,
                            qualifying_data.clone(),
                            SignatureScheme::Null,
                            selection.clone(),
                        )
                    })
                    .map_err(tpm("TPM2_Quote"))?;
                let pcr_values = read_sha256_pcrs(ctx, &indices)?;
                let attest = attest.marshall().map_err(tpm("marshalling TPMS_ATTEST"))?;
                let signature = signature
                    .marshall()
                    .map_err(tpm("marshalling TPMT_SIGNATURE"))?;
                let mut hash = digest::Context::new(&digest::SHA256);
                for (_, value) in &pcr_values {
                    hash.update(value);
                }
                if hash.finish().as_ref() == QuoteAttest::parse(&attest)?.pcr_digest {
                    return Ok(TpmQuote {
                        attest,
                        signature,
                        pcr_values,
                    });
                }
                tracing::debug!("a PCR changed between TPM2_Quote and TPM2_PCR_Read; retrying");
            }
            Err(TpmError::Tpm {
                operation: "TPM2_Quote",
                message: format!("the PCRs kept changing during {QUOTE_ATTEMPTS} attempts"),
            })
        })
    }

    /// Reads the SHA-256 PCRs `pcrs` (indices 0..24), sorted by index.
    pub fn read_pcrs(&mut self, pcrs: &[u8]) -> Result<Vec<(u8, Vec<u8>)>, TpmError> {
        let indices: Vec<u8> = pcr_set(pcrs)?.into_iter().collect();
        read_sha256_pcrs(&mut self.connect()?, &indices)
    }
}

/// Reads SHA-256 PCR 10 (the IMA PCR) of the TPM behind `tcti`, opening
/// and closing a context for this one read.
pub fn read_ima_pcr(tcti: &str) -> Result<Vec<u8>, TpmError> {
    let conf = TctiNameConf::from_str(tcti)
        .map_err(|e| TpmError::InvalidArgument(format!("TCTI {tcti:?}: {e}")))?;
    let mut ctx = Context::new(conf).map_err(tpm("opening the TPM (TCTI/ESAPI init)"))?;
    read_sha256_pcrs(&mut ctx, &[10])?
        .into_iter()
        .find(|(i, _)| *i == 10)
        .map(|(_, v)| v)
        .ok_or_else(|| TpmError::Tpm {
            operation: "TPM2_PCR_Read",
            message: "no value for PCR 10".into(),
        })
}

/// `TPM2_CreatePrimary` of the default RSA-2048 EK; the caller flushes it.
fn create_ek(ctx: &mut Context) -> Result<KeyHandle, TpmError> {
    ek::create_ek_object_2(
        ctx,
        AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048),
        DefaultKey,
    )
    .map_err(tpm(
        "creating the EK (TPM2_CreatePrimary, endorsement hierarchy)",
    ))
}

fn create_ak(
    ctx: &mut Context,
    ek_handle: KeyHandle,
    algorithm: AkAlgorithm,
) -> Result<AkBlobs, TpmError> {
    let (key, scheme) = match algorithm {
        AkAlgorithm::Rsa2048 => (
            AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048),
            SignatureSchemeAlgorithm::RsaSsa,
        ),
        AkAlgorithm::EccP256 => (
            AsymmetricAlgorithmSelection::Ecc(EccCurve::NistP256),
            SignatureSchemeAlgorithm::EcDsa,
        ),
    };
    let created = ak::create_ak_2(
        ctx,
        ek_handle,
        HashingAlgorithm::Sha256,
        key,
        scheme,
        None,
        DefaultKey,
    )
    .map_err(tpm("creating the AK (TPM2_Create under the EK)"))?;
    Ok(AkBlobs {
        public_bytes: tpm2b_public(&created.out_public)?,
        private: created.out_private,
        public: created.out_public,
    })
}

fn load_ak(ctx: &mut Context, ek_handle: KeyHandle, ak: &AkBlobs) -> Result<KeyHandle, TpmError> {
    ak::load_ak(ctx, ek_handle, None, ak.private.clone(), ak.public.clone())
        .map_err(tpm("loading the AK (TPM2_Load under the EK)"))
}

/// A policy session for the EK's admin role (the EK template's authPolicy
/// is PolicySecret(TPM_RH_ENDORSEMENT)); the caller flushes it.
fn start_endorsement_policy_session(ctx: &mut Context) -> Result<AuthSession, TpmError> {
    let session = ctx
        .start_auth_session(
            None,
            None,
            None,
            SessionType::Policy,
            SymmetricDefinition::AES_128_CFB,
            HashingAlgorithm::Sha256,
        )
        .map_err(tpm("TPM2_StartAuthSession"))?
        .ok_or_else(|| TpmError::Tpm {
            operation: "TPM2_StartAuthSession",
            message: "no session handle returned".into(),
        })?;
    let (attributes, mask) = SessionAttributesBuilder::new()
        .with_decrypt(true)
        .with_encrypt(true)
        .build();
    if let Err(e) = ctx.tr_sess_set_attributes(session, attributes, mask) {
        if let Err(flush) = ctx.flush_context(SessionHandle::from(session).into()) {
            tracing::warn!(error = %flush, "flushing the policy session failed");
        }
        return Err(tpm("setting session attributes")(e));
    }
    Ok(session)
}

fn authorize_endorsement(ctx: &mut Context, policy: AuthSession) -> Result<(), TpmError> {
    let policy = PolicySession::try_from(policy).map_err(tpm("policy session handle"))?;
    ctx.execute_with_nullauth_session(|ctx| {
        ctx.policy_secret(
            policy,
            AuthHandle::Endorsement,
            Default::default(),
            Default::default(),
            Default::default(),
            None,
        )
    })
    .map_err(tpm("TPM2_PolicySecret(endorsement)"))?;
    Ok(())
}

fn pcr_slot(index: u8) -> Result<PcrSlot, TpmError> {
    PcrSlot::try_from(1u32 << index)
        .map_err(|_| TpmError::InvalidArgument(format!("PCR index {index}")))
}

fn sha256_selection(indices: &[u8]) -> Result<tss_esapi::structures::PcrSelectionList, TpmError> {
    let slots = indices
        .iter()
        .map(|i| pcr_slot(*i))
        .collect::<Result<Vec<_>, _>>()?;
    PcrSelectionListBuilder::new()
        .with_selection(HashingAlgorithm::Sha256, &slots)
        .build()
        .map_err(|e| TpmError::InvalidArgument(format!("PCR selection {indices:?}: {e}")))
}

/// `TPM2_PCR_Read` returns at most 8 digests per call: read in chunks.
fn read_sha256_pcrs(ctx: &mut Context, indices: &[u8]) -> Result<Vec<(u8, Vec<u8>)>, TpmError> {
    let mut values = Vec::with_capacity(indices.len());
    for chunk in indices.chunks(8) {
        let selection = sha256_selection(chunk)?;
        let (_, read, digests) = ctx
            .execute_without_session(|ctx| ctx.pcr_read(selection))
            .map_err(tpm("TPM2_PCR_Read"))?;
        let read_count: usize = read
            .get_selections()
            .iter()
            .map(|s| s.selected().len())
            .sum();
        if read_count != chunk.len() || digests.len() != chunk.len() {
            return Err(TpmError::Tpm {
                operation: "TPM2_PCR_Read",
                message: format!(
                    "asked for sha256 PCRs {chunk:?}, got {} values: is the sha256 bank active?",
                    digests.len()
                ),
            });
        }
        for (index, value) in chunk.iter().zip(digests.value()) {
            values.push((*index, value.value().to_vec()));
        }
    }
    Ok(values)
}

fn tpm2b_public(public: &Public) -> Result<Vec<u8>, TpmError> {
    let tpmt = public.marshall().map_err(tpm("marshalling TPMT_PUBLIC"))?;
    wire::tpm2b(&tpmt)
}

/// The EK certificate from NV index 0x01c00002, if the TPM has one.
fn read_ek_cert(ctx: &mut Context) -> Result<Option<Vec<u8>>, TpmError> {
    let (handles, _) = ctx
        .execute_without_session(|ctx| {
            ctx.get_capability(CapabilityType::Handles, EK_CERT_NV_INDEX_RSA2048, 1)
        })
        .map_err(tpm("TPM2_GetCapability(handles)"))?;
    let present = matches!(&handles, CapabilityData::Handles(list)
        if list.iter().any(|h| tss_esapi::tss2_esys::TPM2_HANDLE::from(*h) == EK_CERT_NV_INDEX_RSA2048));
    if !present {
        return Ok(None);
    }
    let cert = ek::retrieve_ek_pubcert(ctx, AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048))
        .map_err(tpm("reading the EK certificate (NV index 0x01c00002)"))?;
    Ok(Some(trim_der(cert)))
}

/// NV indices are often larger than the certificate: cut the bytes after
/// the outer DER SEQUENCE (left as is when it does not look like DER).
fn trim_der(mut bytes: Vec<u8>) -> Vec<u8> {
    let total = match bytes.as_slice() {
        [0x30, len @ 0..=0x7f, ..] => Some(2 + usize::from(*len)),
        [0x30, 0x81, len, ..] => Some(3 + usize::from(*len)),
        [0x30, 0x82, hi, lo, ..] => Some(4 + usize::from(u16::from_be_bytes([*hi, *lo]))),
        [0x30, 0x83, a, b, c, ..] => {
            Some(5 + ((usize::from(*a) << 16) | (usize::from(*b) << 8) | usize::from(*c)))
        }
        _ => None,
    };
    if let Some(total) = total
        && total <= bytes.len()
    {
        bytes.truncate(total);
    }
    bytes
}

// The integrator moves an `AgentTpm` into `spawn_blocking` closures.
const _: fn() = || {
    fn assert_send<T: Send>() {}
    assert_send::<AgentTpm>();
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_padding_is_trimmed() {
        assert_eq!(trim_der(vec![0x30, 2, 1, 2, 0, 0]), vec![0x30, 2, 1, 2]);
        let mut long = vec![0x30, 0x82, 0x01, 0x00];
        long.extend(vec![7; 256]);
        long.extend(vec![0xff; 10]);
        assert_eq!(trim_der(long).len(), 260);
        assert_eq!(trim_der(vec![0x30, 0x05, 1]), vec![0x30, 0x05, 1]);
        assert_eq!(trim_der(vec![1, 2, 3]), vec![1, 2, 3]);
    }

    #[test]
    fn pcr_slots_are_bits() {
        assert_eq!(pcr_slot(0).unwrap(), PcrSlot::Slot0);
        assert_eq!(pcr_slot(23).unwrap(), PcrSlot::Slot23);
    }
}
