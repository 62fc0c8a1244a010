//! The audit signing key (Ed25519) and its public half.
//!
//! Formats:
//! - private key: PKCS#8 (RFC 5208/5958) DER, as `ring` and
//!   `openssl genpkey -algorithm ed25519 -outform DER` produce; PEM
//!   (`PRIVATE KEY`) is accepted and produced too. The server keeps it in a
//!   file of mode 0600.
//! - public key file (`sigil-server audit key`, `audit verify --key FILE`):
//!   PEM `PUBLIC KEY`, the X.509 SubjectPublicKeyInfo of RFC 8410, readable
//!   by `openssl pkey -pubin`.
//! - key ID: the first 32 hex digits of SHA-256 of that SubjectPublicKeyInfo
//!   DER, i.e. of `openssl pkey -pubin -in key.pem -outform DER | sha256sum`.
//! - checkpoint signature: Ed25519 over [`checkpoint_message`], written as
//!   128 lowercase hex digits.

use std::fmt;

use ring::rand::SystemRandom;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};

use super::{Digest, Event, Head};

/// Domain-separation prefix of the signed checkpoint message.
pub const CHECKPOINT_DOMAIN: &[u8] = b"sigil-audit-checkpoint-v1";

/// DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410): SEQUENCE {
/// SEQUENCE { OID 1.3.101.112 }, BIT STRING (32 bytes) }.
const SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

const PUBLIC_PEM_TAG: &str = "PUBLIC KEY";
const PRIVATE_PEM_TAG: &str = "PRIVATE KEY";

/// The bytes a checkpoint signs:
/// `"sigil-audit-checkpoint-v1" || seq as 8 bytes big-endian || the 32 hash
/// bytes` (65 bytes).
pub fn checkpoint_message(seq: u64, head_hash: &Digest) -> [u8; 65] {
    let mut m = [0u8; 65];
    m[..25].copy_from_slice(CHECKPOINT_DOMAIN);
    m[25..33].copy_from_slice(&seq.to_be_bytes());
    m[33..].copy_from_slice(head_hash.as_bytes());
    m
}

/// Why a key could not be loaded or a signature did not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The system random number generator failed while generating a key.
    #[error("could not generate an audit key: the system RNG failed")]
    Rng,
    /// The private key is not an Ed25519 PKCS#8 document.
    #[error("expected an Ed25519 private key in PKCS#8: {0}")]
    BadPrivateKey(String),
    /// The text is not a PEM block with the expected label.
    #[error("expected a PEM `{expected}` block: {detail}")]
    BadPem {
        /// The label expected (`PUBLIC KEY` or `PRIVATE KEY`).
        expected: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// The public key is not an Ed25519 SubjectPublicKeyInfo.
    #[error("expected an Ed25519 public key (44-byte SubjectPublicKeyInfo, OID 1.3.101.112)")]
    BadPublicKey,
    /// The signature is not 128 hex digits or does not verify.
    #[error("checkpoint signature does not verify with audit key {key_id}")]
    BadSignature {
        /// The key it was checked against.
        key_id: String,
    },
}

/// The server's audit signing key.
pub struct AuditKey {
    pair: Ed25519KeyPair,
    pkcs8: Vec<u8>,
    public: AuditPublicKey,
}

impl fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditKey")
            .field("key_id", &self.public.key_id())
            .finish_non_exhaustive()
    }
}

impl AuditKey {
    /// A new random key.
    pub fn generate() -> Result<Self, KeyError> {
        let doc =
            Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).map_err(|_| KeyError::Rng)?;
        Self::from_pkcs8(doc.as_ref())
    }

    /// Loads a PKCS#8 DER private key (v1 or v2).
    pub fn from_pkcs8(der: &[u8]) -> Result<Self, KeyError> {
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
            .map_err(|e| KeyError::BadPrivateKey(e.to_string()))?;
        let mut raw = [0u8; 32];
        raw.copy_from_slice(pair.public_key().as_ref());
        Ok(Self {
            pair,
            pkcs8: der.to_vec(),
            public: AuditPublicKey::from_raw(raw),
        })
    }

    /// Loads a PEM `PRIVATE KEY` (PKCS#8).
    pub fn from_pkcs8_pem(text: &str) -> Result<Self, KeyError> {
        Self::from_pkcs8(&pem_contents(text, PRIVATE_PEM_TAG)?)
    }

    /// The PKCS#8 DER bytes to store (mode 0600).
    pub fn to_pkcs8_der(&self) -> &[u8] {
        &self.pkcs8
    }

    /// The private key as PEM `PRIVATE KEY`.
    pub fn to_pkcs8_pem(&self) -> String {
        pem::encode(&pem::Pem::new(PRIVATE_PEM_TAG, self.pkcs8.clone()))
    }

    /// The public half.
    pub fn public_key(&self) -> &AuditPublicKey {
        &self.public
    }

    /// The public key file's content (PEM `PUBLIC KEY`).
    pub fn public_key_pem(&self) -> String {
        self.public.to_pem()
    }

    /// The key's ID, as written in checkpoints.
    pub fn key_id(&self) -> String {
        self.public.key_id()
    }

    /// A checkpoint event stating that the chain's head is (`seq`,
    /// `head_hash`). Append it as the very next record (its `prev_hash` is
    /// then `head_hash`): [`super::verify`] refuses a checkpoint anywhere else.
    pub fn sign_checkpoint(&self, seq: u64, head_hash: &Digest) -> Event {
        let sig = self.pair.sign(&checkpoint_message(seq, head_hash));
        Event::Checkpoint {
            seq,
            head_hash: *head_hash,
            key_id: self.key_id(),
            signature: hex::encode(sig.as_ref()),
        }
    }

    /// [`Self::sign_checkpoint`] of a head.
    pub fn checkpoint(&self, head: &Head) -> Event {
        self.sign_checkpoint(head.seq, &head.hash)
    }
}

/// The public half of the audit key: what `audit verify --key` loads.
#[derive(Clone, PartialEq, Eq)]
pub struct AuditPublicKey {
    raw: [u8; 32],
}

impl fmt::Debug for AuditPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AuditPublicKey({})", self.key_id())
    }
}

impl AuditPublicKey {
    /// Wraps a raw 32-byte Ed25519 public key.
    pub fn from_raw(raw: [u8; 32]) -> Self {
        Self { raw }
    }

    /// The raw 32-byte Ed25519 public key.
    pub fn as_raw(&self) -> &[u8; 32] {
        &self.raw
    }

    /// Parses a SubjectPublicKeyInfo DER of an Ed25519 key.
    pub fn from_spki_der(der: &[u8]) -> Result<Self, KeyError> {
        let key = der
            .strip_prefix(&SPKI_PREFIX)
            .and_then(|k| <[u8; 32]>::try_from(k).ok())
            .ok_or(KeyError::BadPublicKey)?;
        Ok(Self::from_raw(key))
    }

    /// The SubjectPublicKeyInfo DER (44 bytes).
    pub fn to_spki_der(&self) -> Vec<u8> {
        let mut der = SPKI_PREFIX.to_vec();
        der.extend_from_slice(&self.raw);
        der
    }

    /// Parses a public key file (PEM `PUBLIC KEY`).
    pub fn from_pem(text: &str) -> Result<Self, KeyError> {
        Self::from_spki_der(&pem_contents(text, PUBLIC_PEM_TAG)?)
    }

    /// The public key file's content (PEM `PUBLIC KEY`).
    pub fn to_pem(&self) -> String {
        pem::encode(&pem::Pem::new(PUBLIC_PEM_TAG, self.to_spki_der()))
    }

    /// The key ID: first 32 hex digits of SHA-256 of the SubjectPublicKeyInfo DER.
    pub fn key_id(&self) -> String {
        let mut id = Digest::sha256(&self.to_spki_der()).to_string();
        id.truncate(32);
        id
    }

    /// Checks a checkpoint's signature (hex) over (`seq`, `head_hash`). Only
    /// the signature is checked; [`super::verify`] also checks the key ID
    /// and that the head is the record before the checkpoint.
    pub fn verify_checkpoint(
        &self,
        seq: u64,
        head_hash: &Digest,
        signature_hex: &str,
    ) -> Result<(), KeyError> {
        let bad = || KeyError::BadSignature {
            key_id: self.key_id(),
        };
        let mut sig = [0u8; 64];
        let canonical = signature_hex.len() == 128
            && signature_hex
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if !canonical || hex::decode_to_slice(signature_hex, &mut sig).is_err() {
            return Err(bad());
        }
        UnparsedPublicKey::new(&ED25519, &self.raw)
            .verify(&checkpoint_message(seq, head_hash), &sig)
            .map_err(|_| bad())
    }
}

fn pem_contents(text: &str, expected: &'static str) -> Result<Vec<u8>, KeyError> {
    let block = pem::parse(text).map_err(|e| KeyError::BadPem {
        expected,
        detail: e.to_string(),
    })?;
    if block.tag() != expected {
        return Err(KeyError::BadPem {
            expected,
            detail: format!("found `{}`", block.tag()),
        });
    }
    Ok(block.into_contents())
}
