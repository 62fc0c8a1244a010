//! TPM 2.0 node attestation: the agent proves it runs on a machine with a
//! given TPM, and reports that TPM's PCRs.
//!
//! The protocol (one round trip per line; the transport is the caller's):
//!
//! 1. agent → server: [`TpmEvidence`] from [`AgentTpm::evidence`]: the EK
//!    public area, the EK certificate if the TPM has one, and the public
//!    area of an attestation key (AK) created under the EK.
//! 2. server: [`verify_ek`] — the EK is allow-listed by [`ek_hash`] or its
//!    certificate was issued by a configured EK CA; then [`make_credential`]
//!    with a fresh random secret → agent.
//! 3. agent: [`AgentTpm::activate_credential`] → the secret; server:
//!    [`check_activation`]. Only the TPM holding that EK can decrypt the
//!    challenge, and only for an object with the AK's Name (which covers
//!    the AK's key and attributes), so the AK is a restricted key in the
//!    same TPM as the EK.
//! 4. server → agent: a fresh nonce ([`NONCE_MIN_LEN`]..=[`NONCE_MAX_LEN`]
//!    bytes) and PCR indices; agent: [`AgentTpm::quote`] → [`TpmQuote`];
//!    server: [`verify_quote`] → the verified SHA-256 PCR values (the
//!    `tpm:pcr:sha256:N:HEX` selectors).
//!
//! Re-attestation with the same AK needs only step 4 (a fresh nonce), as
//! long as the server kept the activated AK public area for that EK.
//!
//! Byte fields are TPM-marshalled structures (TPM 2.0 Part 2), so the server
//! parses them in pure Rust without a TPM or libtss2: the server-side
//! functions here never touch a TPM, and [`AgentTpm`] (feature `tpm`, on by
//! default) is the only part that links tss-esapi.

mod credential;
mod verify;
mod wire;

#[cfg(feature = "tpm")]
mod agent;

#[cfg(feature = "tpm")]
pub use agent::{AgentTpm, AkAlgorithm, read_ima_pcr};
pub use credential::{CREDENTIAL_SECRET_MAX_LEN, check_activation, make_credential};
pub use verify::{ek_hash, verify_ek, verify_quote};

/// The strict parsers of the TPM structures the server reads from an
/// agent, for the fuzz targets (`fuzz/`): each returns whether the bytes
/// parse, plus what a caller can cross-check.
#[doc(hidden)]
pub mod fuzzing {
    use super::TpmError;
    use super::wire::{PublicArea, QuoteAttest, Signature};

    /// Parses a `TPM2B_PUBLIC`; returns the DER SubjectPublicKeyInfo of
    /// its key when it has one the verifier can express.
    pub fn public(bytes: &[u8]) -> Result<Option<Vec<u8>>, TpmError> {
        let area = PublicArea::from_tpm2b(bytes, "TPM2B_PUBLIC")?;
        Ok(super::verify::spki_der(&area).ok())
    }

    /// Parses a quote's `TPMS_ATTEST`; returns its `extraData`.
    pub fn attest(bytes: &[u8]) -> Result<Vec<u8>, TpmError> {
        QuoteAttest::parse(bytes).map(|a| a.extra_data.to_vec())
    }

    /// Parses a `TPMT_SIGNATURE`.
    pub fn signature(bytes: &[u8]) -> Result<(), TpmError> {
        Signature::parse(bytes).map(|_| ())
    }

    /// Splits a `TPM2B_ID_OBJECT` credential blob and a
    /// `TPM2B_ENCRYPTED_SECRET` the way the agent does before handing them
    /// to its TPM (`AgentTpm::activate_credential`).
    pub fn activation_inputs<'a>(
        credential_blob: &'a [u8],
        encrypted_secret: &'a [u8],
    ) -> Result<(&'a [u8], &'a [u8]), TpmError> {
        super::wire::activation_inputs(credential_blob, encrypted_secret)
    }
}

/// NV index of the RSA-2048 EK certificate (TCG EK Credential Profile 2.3,
/// §2.2.1.4, low range).
pub const EK_CERT_NV_INDEX_RSA2048: u32 = 0x01c0_0002;
/// Number of PCRs in a bank (indices `0..PCR_COUNT`).
pub const PCR_COUNT: usize = 24;
/// Shortest nonce [`AgentTpm::quote`] and [`verify_quote`] accept.
pub const NONCE_MIN_LEN: usize = 16;
/// Longest nonce: a TPM's qualifying data is at most 64 bytes.
pub const NONCE_MAX_LEN: usize = 64;

/// What an agent sends to be attested by its TPM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TpmEvidence {
    /// The EK's public area, a marshalled `TPM2B_PUBLIC`.
    pub ek_public: Vec<u8>,
    /// The EK certificate (DER) from NV index [`EK_CERT_NV_INDEX_RSA2048`],
    /// when the TPM manufacturer provisioned one.
    pub ek_cert: Option<Vec<u8>>,
    /// The AK's public area, a marshalled `TPM2B_PUBLIC`.
    pub ak_public: Vec<u8>,
}

/// A quote over SHA-256 PCRs and the PCR values it covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TpmQuote {
    /// The marshalled `TPMS_ATTEST` (what the signature covers; the same
    /// bytes `tpm2_quote -m` writes).
    pub attest: Vec<u8>,
    /// The AK's signature over `attest`, a marshalled `TPMT_SIGNATURE`
    /// (`tpm2_quote -s` format).
    pub signature: Vec<u8>,
    /// `(PCR index, SHA-256 PCR value)` for every quoted PCR, by index.
    pub pcr_values: Vec<(u8, Vec<u8>)>,
}

/// Why TPM attestation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TpmError {
    /// Bytes from the other side are not the TPM structure they should be.
    #[error("malformed {what}: {reason}")]
    Malformed {
        /// The structure, e.g. `AK TPM2B_PUBLIC`.
        what: &'static str,
        /// What was wrong, naming the field.
        reason: String,
    },
    /// A well-formed key, scheme or algorithm this implementation does not
    /// handle (SHA-256 names, RSA EKs for activation, RSASSA/ECDSA-P256 AKs).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The EK's attributes are not those of an endorsement key.
    #[error("not an endorsement key: {0}")]
    BadEkAttributes(String),
    /// The AK's attributes are not those of a TPM-bound restricted signing key.
    #[error("not an attestation key: {0}")]
    BadAkAttributes(String),
    /// The EK is neither allow-listed nor certified by a configured EK CA.
    #[error("EK {ek_hash} is not trusted: {reason}")]
    EkNotTrusted {
        /// The EK's [`ek_hash`].
        ek_hash: String,
        /// Why neither trust path applied.
        reason: String,
    },
    /// The secret returned from credential activation is not the one sent.
    #[error("credential activation returned the wrong secret")]
    ActivationMismatch,
    /// The quote's signature does not verify with the AK.
    #[error("the quote signature does not verify with the AK")]
    BadSignature,
    /// The signed attestation is not a TPM-generated quote.
    #[error("not a TPM quote: {0}")]
    NotAQuote(String),
    /// The quote was made over another nonce (a replayed or foreign quote).
    #[error("the quote is not over this nonce (replayed or foreign quote)")]
    NonceMismatch,
    /// The quote covers other PCRs than requested.
    #[error("the quote covers other PCRs than requested {requested:?}: {quoted}")]
    PcrSelectionMismatch {
        /// The requested SHA-256 PCR indices.
        requested: Vec<u8>,
        /// What the quote selects.
        quoted: String,
    },
    /// The reported PCR values are not the quoted ones.
    #[error("PCR values do not match the quote: {0}")]
    PcrValuesMismatch(String),
    /// The caller passed an unusable argument (nonce length, PCR index,
    /// secret size, TCTI string, EK CA certificate).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// [`AgentTpm::activate_credential`] or [`AgentTpm::quote`] was called
    /// before [`AgentTpm::evidence`] created the AK.
    #[error("no attestation key yet: call evidence() first")]
    NoAttestationKey,
    /// A TPM command (or the TSS stack in front of it) failed.
    #[error("{operation}: {message}")]
    Tpm {
        /// The operation, e.g. `TPM2_ActivateCredential`.
        operation: &'static str,
        /// The TSS error, e.g. a TPM response code.
        message: String,
    },
    /// A cryptographic primitive failed (random generator, RSA encryption).
    #[error("crypto failure: {0}")]
    Crypto(String),
    /// An internal invariant broke; a bug in this module.
    #[error("internal error (bug): {0}")]
    Bug(String),
}
