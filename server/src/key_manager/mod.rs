//! Where the trust domain's CA and JWT private keys live (`[key_manager]`
//! in server.toml), for [`crate::keys::Keys`]:
//!
//! - `disk` (the default): in `<data_dir>/keys.json` itself, PKCS#8, as
//!   before this module existed;
//! - `pkcs11`: in a PKCS#11 token ([`pkcs11::Token`]), generated there and
//!   never extractable. keys.json then holds each key's certificate or
//!   public JWK and its token object ID (`token_id`), no private key.
//!
//! Rotation is the same for both: a new key is generated where its kind
//! keeps keys, and a key that expires is destroyed in the token.

pub mod pkcs11;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::Value;
use sigil_core::TrustDomain;
use sigil_core::jwt::{JwtKeyType, JwtSigner};
use sigil_core::signer::ExternalKey;
use sigil_core::x509::Ca;

use crate::config::KeyManagerKind;
use crate::keys::KeyError;

pub use pkcs11::Token;

/// Where new keys are made and stored keys are found.
#[derive(Debug, Clone, Default)]
pub enum KeyManager {
    /// In keys.json.
    #[default]
    Disk,
    /// In a PKCS#11 token.
    Pkcs11(Arc<Token>),
}

const DISK_HOLDS_TOKEN_KEYS: &str = "names a key in a PKCS#11 token, but [key_manager] kind is \"disk\" (set kind = \"pkcs11\" and the token's settings)";
const TOKEN_FINDS_DISK_KEYS: &str = "holds a private key on disk, but [key_manager] kind = \"pkcs11\": move keys.json away to start over with keys in the token (its CAs then leave the bundle)";

impl KeyManager {
    /// Opens the configured key store: for `pkcs11`, loads the module and
    /// logs in to the token (one session per core, and one more).
    pub fn open(kind: &KeyManagerKind) -> Result<KeyManager, KeyError> {
        match kind {
            KeyManagerKind::Disk => Ok(KeyManager::Disk),
            KeyManagerKind::Pkcs11(cfg) => {
                let sessions = std::thread::available_parallelism().map_or(2, |n| n.get()) + 1;
                Token::open(cfg, sessions)
                    .map(KeyManager::Pkcs11)
                    .map_err(KeyError::Token)
            }
        }
    }

    /// A new CA in the token (for [`KeyManager::Pkcs11`] only).
    pub(crate) fn token_ca(
        token: &Arc<Token>,
        td: &TrustDomain,
        ttl: Duration,
    ) -> Result<Ca, KeyError> {
        let key = token.generate("ca").map_err(KeyError::Token)?;
        let label = key.label().to_string();
        let ca = Ca::generate_external(td, ttl, key.clone()).map_err(|e| {
            // The pair is of no use without its certificate.
            let _ = token.destroy(key.key_id());
            KeyError::Generate(format!("CA over token key {label}: {e}"))
        })?;
        tracing::info!(key = %label, token = %token.label(), "generated the X.509 CA key in the token");
        Ok(ca)
    }

    /// A new JWT signing key in the token.
    pub(crate) fn token_jwt(token: &Arc<Token>, not_after: i64) -> Result<JwtSigner, KeyError> {
        let key = token.generate("jwt").map_err(KeyError::Token)?;
        let kid = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(sigil_core::ids::random_bytes::<18>());
        tracing::info!(key = %key.label(), token = %token.label(), "generated the JWT key in the token");
        JwtSigner::from_external(kid, key, not_after).map_err(|e| KeyError::Generate(e.to_string()))
    }

    /// A stored CA: its certificate with the PEM key of keys.json (disk)
    /// or the token object `token_id`. `None` for an expired CA whose
    /// token key need not (and may no longer) exist.
    pub(crate) fn load_ca(
        &self,
        cert_der: &[u8],
        key_pem: &str,
        token_id: Option<&str>,
        td: &TrustDomain,
        now: i64,
    ) -> Result<Option<Ca>, String> {
        let token = match (self, token_id) {
            (KeyManager::Disk, None) => {
                return Ca::load(cert_der, key_pem, td)
                    .map(Some)
                    .map_err(|e| e.to_string());
            }
            (KeyManager::Disk, Some(_)) => return Err(format!("a CA {DISK_HOLDS_TOKEN_KEYS}")),
            (KeyManager::Pkcs11(_), _) if !key_pem.is_empty() => {
                return Err(format!("a CA {TOKEN_FINDS_DISK_KEYS}"));
            }
            (KeyManager::Pkcs11(_), None) => {
                return Err("a CA has neither key_pem nor token_id".into());
            }
            (KeyManager::Pkcs11(t), Some(_)) => t,
        };
        let id = decode_id(token_id)?;
        let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
            .map_err(|e| format!("CA certificate: {e}"))?;
        if cert.validity().not_after.timestamp() <= now {
            let _ = token.destroy(&id);
            return Ok(None);
        }
        let key = token.find(&id)?;
        Ca::load_external(cert_der, key, td)
            .map(Some)
            .map_err(|e| e.to_string())
    }

    /// A stored JWT key, as [`KeyManager::load_ca`] for CAs. With a token,
    /// `public_jwk` (when stored) must be the token key's.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn load_jwt(
        &self,
        kid: &str,
        key_type: &str,
        pkcs8_b64: &str,
        token_id: Option<&str>,
        public_jwk: Option<&Value>,
        not_after: i64,
        now: i64,
    ) -> Result<Option<JwtSigner>, String> {
        let token = match (self, token_id) {
            (KeyManager::Disk, None) => {
                let pkcs8 = STANDARD.decode(pkcs8_b64).map_err(|e| e.to_string())?;
                return JwtSigner::from_pkcs8(
                    kid.to_string(),
                    JwtKeyType::parse(key_type)?,
                    pkcs8,
                    not_after,
                )
                .map(Some)
                .map_err(|e| e.to_string());
            }
            (KeyManager::Disk, Some(_)) => {
                return Err(format!("JWT key {kid:?} {DISK_HOLDS_TOKEN_KEYS}"));
            }
            (KeyManager::Pkcs11(_), _) if !pkcs8_b64.is_empty() => {
                return Err(format!("JWT key {kid:?} {TOKEN_FINDS_DISK_KEYS}"));
            }
            (KeyManager::Pkcs11(_), None) => {
                return Err(format!("JWT key {kid:?} has neither pkcs8 nor token_id"));
            }
            (KeyManager::Pkcs11(t), Some(_)) => t,
        };
        let id = decode_id(token_id)?;
        if not_after <= now {
            let _ = token.destroy(&id);
            return Ok(None);
        }
        let key = token.find(&id)?;
        let signer =
            JwtSigner::from_external(kid.to_string(), key, not_after).map_err(|e| e.to_string())?;
        if let Some(stored) = public_jwk
            && *stored != signer.public_jwk
        {
            return Err(format!(
                "JWT key {kid:?}: the token key {} is not the stored public key",
                hex::encode(
                    signer
                        .external_key()
                        .map(|k| k.key_id())
                        .unwrap_or_default()
                )
            ));
        }
        Ok(Some(signer))
    }

    /// Destroys an expired key's objects in the token (nothing for a key
    /// held on disk). A failure is logged: the key signs nothing any more
    /// either way.
    pub(crate) fn destroy(&self, key: Option<&Arc<dyn ExternalKey>>) {
        let (KeyManager::Pkcs11(token), Some(key)) = (self, key) else {
            return;
        };
        match token.destroy(key.key_id()) {
            Ok(n) => {
                tracing::info!(key = %key.label(), objects = n, "destroyed an expired key in the token")
            }
            Err(e) => {
                tracing::warn!(key = %key.label(), error = %e, "could not destroy an expired key in the token")
            }
        }
    }
}

/// The hex `token_id` of keys.json, as bytes.
fn decode_id(token_id: Option<&str>) -> Result<Vec<u8>, String> {
    let id = token_id.unwrap_or_default();
    match hex::decode(id) {
        Ok(b) if !b.is_empty() && b.len() <= 64 => Ok(b),
        _ => Err(format!("token_id {id:?} is not a hex object ID")),
    }
}

/// The `token_id` to store for a key: its object ID in hex, if external.
pub(crate) fn token_id(key: Option<&Arc<dyn ExternalKey>>) -> Option<String> {
    key.map(|k| hex::encode(k.key_id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_refuses_entries_that_name_token_keys() {
        let td = TrustDomain::new("example.org").unwrap();
        let (ca, pem) = Ca::generate(&td, Duration::from_secs(600)).unwrap();
        let now = sigil_core::now_unix();
        let disk = KeyManager::Disk;
        assert!(
            disk.load_ca(ca.cert_der(), &pem, None, &td, now)
                .unwrap()
                .is_some()
        );
        let e = disk
            .load_ca(ca.cert_der(), "", Some("00ff"), &td, now)
            .unwrap_err();
        assert!(e.contains("kind is \"disk\""), "{e}");
        let e = disk
            .load_jwt("k", "ec-p256", "", Some("00ff"), None, now + 60, now)
            .unwrap_err();
        assert!(
            e.contains("JWT key \"k\"") && e.contains("kind is \"disk\""),
            "{e}"
        );
        assert_eq!(token_id(None), None);
        assert!(decode_id(Some("zz")).is_err() && decode_id(Some("")).is_err());
        assert_eq!(decode_id(Some("00ff")).unwrap(), [0, 0xff]);
    }
}
