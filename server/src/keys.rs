//! The trust domain's signing keys, X.509 CAs and JWT keys, and their
//! rotation. Each kind keeps a list of published keys and one active key:
//!
//! - at half of the active key's life a successor is generated and
//!   *published* (it appears in bundles, so every verifier learns it);
//! - at five sixths it is *activated* (it starts signing);
//! - a retired key stays published until its own expiry, and nothing it
//!   signed outlives it (SVID and token lifetimes are clamped to the key).
//!
//! All of it is persisted in `<data_dir>/keys.json`, mode 0600, with the
//! server's ID: a random name, made once, under which the server publishes
//! the public parts of its keys through the datastore
//! ([`Keys::published`], `state::cluster`) so that every server of a
//! cluster serves every server's keys. Private keys stay in this file,
//! unless `[key_manager] kind = "pkcs11"` keeps them in a token: then the
//! file holds only public parts and token object IDs
//! ([`crate::key_manager`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
use sigil_core::TrustDomain;
use sigil_core::jwt::{JwtKeyType, JwtSigner};
use sigil_core::x509::{BACKDATE, Ca, certs_to_pem, pem_to_certs};

use sigil_fs::{Links, ensure_private_dir, read_private_file, write_atomic};

use crate::datastore::{PublishedCa, PublishedJwt};
use crate::key_manager::{KeyManager, token_id};

#[derive(Serialize, Deserialize)]
struct StoredCa {
    cert_pem: String,
    /// Empty (and not written) for a key in a PKCS#11 token.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    key_pem: String,
    /// The token object's `CKA_ID`, hex, for a key in a PKCS#11 token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    token_id: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct StoredJwt {
    kid: String,
    #[serde(default = "default_key_type")]
    key_type: String,
    /// Empty (and not written) for a key in a PKCS#11 token.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pkcs8: String,
    /// The token object's `CKA_ID`, hex, for a key in a PKCS#11 token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    token_id: Option<String>,
    /// The public key, for a key in a PKCS#11 token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    public_jwk: Option<serde_json::Value>,
    issued_at: i64,
    not_after: i64,
}

fn default_key_type() -> String {
    JwtKeyType::EcP256.as_str().to_string()
}

#[derive(Serialize, Deserialize)]
struct Stored {
    cas: Vec<StoredCa>,
    active_ca: usize,
    jwt_keys: Vec<StoredJwt>,
    active_jwt: usize,
    sequence: u64,
    /// Absent in files written before servers had IDs: one is made.
    #[serde(default)]
    server_id: String,
}

/// A JWT key and when it was made.
#[derive(Clone)]
pub struct JwtSlot {
    pub signer: Arc<JwtSigner>,
    pub issued_at: i64,
}

/// Published and active keys. Cloning shares the key objects (a copy is
/// made only to try a rotation before it takes effect).
#[derive(Clone)]
pub struct Keys {
    td: TrustDomain,
    ttl: Duration,
    jwt_key_type: JwtKeyType,
    path: PathBuf,
    cas: Vec<(Arc<Ca>, String)>,
    active_ca: usize,
    jwts: Vec<JwtSlot>,
    active_jwt: usize,
    /// Bumped whenever the published set changes.
    pub sequence: u64,
    /// This server's ID in the cluster (random, made once, persisted).
    server_id: String,
    /// `[upstream_authority]`: CAs are issued under it, and its roots are
    /// the X.509 bundle (`crate::upstream`).
    upstream: Option<crate::upstream::Upstream>,
    /// Where private keys are made and kept.
    manager: KeyManager,
}

/// Why the signing keys could not be loaded, made or saved. Each variant
/// names the file or directory at fault; no variant carries key material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// `data_dir` is missing, unsafe or cannot be created.
    #[error("data_dir {}: {reason}", path.display())]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// keys.json could not be read (owner, mode, link or I/O).
    #[error("keys: {0}")]
    Read(String),
    /// keys.json holds something that does not parse.
    #[error("{}: {reason}", path.display())]
    Corrupt {
        /// keys.json.
        path: PathBuf,
        /// What does not parse.
        reason: String,
    },
    /// A new CA, JWT key or server ID could not be generated.
    #[error("{0}")]
    Generate(String),
    /// keys.json could not be written.
    #[error("{}: {reason}", path.display())]
    Write {
        /// keys.json.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The PKCS#11 token could not be opened or used (the message names
    /// the `[key_manager]` key at fault).
    #[error("{0}")]
    Token(String),
}

/// A new random server ID (16 bytes, hex).
fn new_server_id() -> Result<String, KeyError> {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| KeyError::Generate("no randomness for the server ID".into()))?;
    Ok(hex::encode(b))
}

fn unix(t: time::OffsetDateTime) -> i64 {
    t.unix_timestamp()
}

/// Where a key is in its life.
#[derive(Debug, PartialEq, Eq)]
enum Phase {
    Young,
    Prepare,
    Activate,
}

fn phase(issued: i64, not_after: i64, now: i64) -> Phase {
    let life = (not_after - issued).max(1);
    if now >= not_after - life / 6 {
        Phase::Activate
    } else if now >= issued + life / 2 {
        Phase::Prepare
    } else {
        Phase::Young
    }
}

impl Keys {
    /// Loads `<data_dir>/keys.json` or creates the first CA and JWT key.
    pub fn load_or_create(
        data_dir: &Path,
        td: &TrustDomain,
        ttl: Duration,
        jwt_key_type: JwtKeyType,
    ) -> Result<Keys, KeyError> {
        Self::load_or_create_with(data_dir, td, ttl, jwt_key_type, None, KeyManager::Disk)
    }

    /// [`Keys::load_or_create`], with every CA issued by `upstream` when
    /// given (stored CAs it did not issue are retired, see
    /// `crate::upstream::adopt`).
    pub fn load_or_create_under(
        data_dir: &Path,
        td: &TrustDomain,
        ttl: Duration,
        jwt_key_type: JwtKeyType,
        upstream: Option<crate::upstream::Upstream>,
    ) -> Result<Keys, KeyError> {
        Self::load_or_create_with(data_dir, td, ttl, jwt_key_type, upstream, KeyManager::Disk)
    }

    /// [`Keys::load_or_create`] with CAs issued under `upstream` (when
    /// given) and private keys kept by `manager`. The two do not combine
    /// yet: an upstream-issued CA's key is always made in process.
    pub fn load_or_create_with(
        data_dir: &Path,
        td: &TrustDomain,
        ttl: Duration,
        jwt_key_type: JwtKeyType,
        upstream: Option<crate::upstream::Upstream>,
        manager: KeyManager,
    ) -> Result<Keys, KeyError> {
        if upstream.is_some() && matches!(manager, KeyManager::Pkcs11(_)) {
            return Err(KeyError::Generate(
                "[upstream_authority] together with [key_manager] kind = \"pkcs11\" is not supported yet: use one of them".into(),
            ));
        }
        ensure_private_dir(data_dir).map_err(|e| KeyError::DataDir {
            path: data_dir.to_path_buf(),
            reason: e.to_string(),
        })?;
        let path = data_dir.join("keys.json");
        let mut keys = Keys {
            td: td.clone(),
            ttl,
            jwt_key_type,
            path: path.clone(),
            cas: vec![],
            active_ca: 0,
            jwts: vec![],
            active_jwt: 0,
            sequence: 1,
            server_id: String::new(),
            upstream,
            manager,
        };
        // Not following links, owned by us or root, 0600: whoever could
        // plant this file would choose the trust domain's CA keys.
        let found = match read_private_file(&path, Links::Refuse) {
            Ok(bytes) => Some(bytes),
            Err(e) if e.is_not_found() => None,
            Err(e) => return Err(KeyError::Read(e.to_string())),
        };
        if let Some(bytes) = found {
            let corrupt = |reason: &dyn std::fmt::Display| KeyError::Corrupt {
                path: path.clone(),
                reason: reason.to_string(),
            };
            let text = String::from_utf8(bytes).map_err(|_| corrupt(&"not UTF-8"))?;
            let s: Stored = serde_json::from_str(&text).map_err(|e| corrupt(&e))?;
            let mut active_ca = s.active_ca;
            let now = sigil_core::now_unix();
            for (i, c) in s.cas.iter().enumerate() {
                let der = pem_to_certs(&c.cert_pem).map_err(|e| corrupt(&e))?;
                let first = der
                    .first()
                    .ok_or_else(|| corrupt(&"a CA entry holds no certificate"))?;
                let ca = keys
                    .manager
                    .load_ca(first, &c.key_pem, c.token_id.as_deref(), td, now)
                    .map_err(|e| corrupt(&e))?
                    .and_then(|ca| crate::upstream::adopt(ca, keys.upstream.as_deref()));
                let Some(ca) = ca else {
                    // The one after a skipped active CA takes its place.
                    if i < s.active_ca {
                        active_ca -= 1;
                    }
                    continue;
                };
                keys.cas.push((Arc::new(ca), c.key_pem.clone()));
            }
            for j in &s.jwt_keys {
                let Some(signer) = keys
                    .manager
                    .load_jwt(
                        &j.kid,
                        &j.key_type,
                        &j.pkcs8,
                        j.token_id.as_deref(),
                        j.public_jwk.as_ref(),
                        j.not_after,
                        now,
                    )
                    .map_err(|e| corrupt(&e))?
                else {
                    continue;
                };
                keys.jwts.push(JwtSlot {
                    signer: Arc::new(signer),
                    issued_at: j.issued_at,
                });
            }
            keys.active_ca = active_ca.min(keys.cas.len().saturating_sub(1));
            keys.active_jwt = s.active_jwt.min(keys.jwts.len().saturating_sub(1));
            keys.sequence = s.sequence;
            keys.server_id = s.server_id;
        }
        if keys.server_id.is_empty() {
            keys.server_id = new_server_id()?;
        }
        keys.rotate(sigil_core::now_unix())?;
        keys.persist()?;
        Ok(keys)
    }

    fn new_ca(&self) -> Result<(Arc<Ca>, String), KeyError> {
        let (ca, key) = match &self.manager {
            KeyManager::Pkcs11(t) => (KeyManager::token_ca(t, &self.td, self.ttl)?, String::new()),
            KeyManager::Disk => Ca::generate_under(&self.td, self.ttl, self.upstream.as_deref())
                .map_err(|e| KeyError::Generate(e.to_string()))?,
        };
        tracing::info!(not_after = %ca.not_after(), "generated X.509 CA");
        Ok((Arc::new(ca), key))
    }

    fn new_jwt(&self, now: i64) -> Result<JwtSlot, KeyError> {
        let not_after = now + self.ttl.as_secs() as i64;
        let signer = match &self.manager {
            KeyManager::Pkcs11(t) => KeyManager::token_jwt(t, not_after)?,
            KeyManager::Disk => JwtSigner::generate(self.jwt_key_type, not_after)
                .map_err(|e| KeyError::Generate(e.to_string()))?,
        };
        tracing::info!(kid = %signer.kid, "generated JWT key");
        Ok(JwtSlot {
            signer: Arc::new(signer),
            issued_at: now,
        })
    }

    /// Advances rotation to `now` and persists the result before it takes
    /// effect. When the file cannot be written (a full disk) the keys stay
    /// as they were: nothing is ever signed by a key that a restart would
    /// not find again. Returns true when the keys changed.
    pub fn rotate_persisted(&mut self, now: i64) -> Result<bool, KeyError> {
        let mut next = self.clone();
        if !next.rotate(now)? {
            return Ok(false);
        }
        next.persist()?;
        *self = next;
        Ok(true)
    }

    /// Advances rotation to `now`. Returns true when keys changed (the
    /// caller persists and republishes).
    pub fn rotate(&mut self, now: i64) -> Result<bool, KeyError> {
        let mut changed = false;
        // X.509: drop expired, make sure an unexpired CA is active.
        let before = self.cas.len();
        let active_cert = self
            .cas
            .get(self.active_ca)
            .map(|c| c.0.cert_der().to_vec());
        for (ca, _) in self
            .cas
            .iter()
            .filter(|(ca, _)| unix(ca.not_after()) <= now)
        {
            self.manager.destroy(ca.external_key());
        }
        self.cas.retain(|(ca, _)| unix(ca.not_after()) > now);
        self.active_ca = active_cert
            .and_then(|d| self.cas.iter().position(|c| c.0.cert_der() == d))
            .unwrap_or(usize::MAX);
        changed |= self.cas.len() != before;
        if self.active_ca == usize::MAX {
            if self.cas.is_empty() {
                let c = self.new_ca()?;
                self.cas.push(c);
            }
            self.active_ca = self.cas.len() - 1;
            changed = true;
        }
        let active = &self.cas[self.active_ca].0;
        let issued = unix(active.not_before()) + BACKDATE.as_secs() as i64;
        let has_next = self.active_ca + 1 < self.cas.len();
        match phase(issued, unix(active.not_after()), now) {
            Phase::Prepare if !has_next => {
                let c = self.new_ca()?;
                self.cas.push(c);
                changed = true;
            }
            Phase::Activate => {
                if !has_next {
                    let c = self.new_ca()?;
                    self.cas.push(c);
                }
                self.active_ca = self.cas.len() - 1;
                tracing::info!("activated the next X.509 CA");
                changed = true;
            }
            _ => {}
        }

        // JWT keys: same life cycle.
        let before = self.jwts.len();
        let active_kid = self.jwts.get(self.active_jwt).map(|j| j.signer.kid.clone());
        for j in self.jwts.iter().filter(|j| j.signer.not_after <= now) {
            self.manager.destroy(j.signer.external_key());
        }
        self.jwts.retain(|j| j.signer.not_after > now);
        self.active_jwt = active_kid
            .and_then(|k| self.jwts.iter().position(|j| j.signer.kid == k))
            .unwrap_or(usize::MAX);
        changed |= self.jwts.len() != before;
        if self.active_jwt == usize::MAX {
            if self.jwts.is_empty() {
                let j = self.new_jwt(now)?;
                self.jwts.push(j);
            }
            self.active_jwt = self.jwts.len() - 1;
            changed = true;
        }
        let active = &self.jwts[self.active_jwt];
        let has_next = self.active_jwt + 1 < self.jwts.len();
        match phase(active.issued_at, active.signer.not_after, now) {
            Phase::Prepare if !has_next => {
                let j = self.new_jwt(now)?;
                self.jwts.push(j);
                changed = true;
            }
            Phase::Activate => {
                if !has_next {
                    let j = self.new_jwt(now)?;
                    self.jwts.push(j);
                }
                self.active_jwt = self.jwts.len() - 1;
                tracing::info!("activated the next JWT key");
                changed = true;
            }
            _ => {}
        }
        if changed {
            self.sequence += 1;
        }
        Ok(changed)
    }

    /// Writes keys.json (0600).
    pub fn persist(&self) -> Result<(), KeyError> {
        let s = Stored {
            cas: self
                .cas
                .iter()
                .map(|(ca, key)| StoredCa {
                    cert_pem: certs_to_pem([ca.cert_der()]),
                    key_pem: key.clone(),
                    token_id: token_id(ca.external_key()),
                })
                .collect(),
            active_ca: self.active_ca,
            jwt_keys: self
                .jwts
                .iter()
                .map(|j| StoredJwt {
                    kid: j.signer.kid.clone(),
                    key_type: j.signer.key_type.as_str().to_string(),
                    pkcs8: STANDARD.encode(j.signer.pkcs8()),
                    token_id: token_id(j.signer.external_key()),
                    public_jwk: j.signer.external_key().map(|_| j.signer.public_jwk.clone()),
                    issued_at: j.issued_at,
                    not_after: j.signer.not_after,
                })
                .collect(),
            active_jwt: self.active_jwt,
            sequence: self.sequence,
            server_id: self.server_id.clone(),
        };
        let write = |reason: String| KeyError::Write {
            path: self.path.clone(),
            reason,
        };
        let text = serde_json::to_vec_pretty(&s).map_err(|e| write(e.to_string()))?;
        write_atomic(&self.path, &text, 0o600).map_err(|e| write(e.to_string()))
    }

    /// The CA that signs now.
    pub fn active_ca(&self) -> Arc<Ca> {
        self.cas[self.active_ca].0.clone()
    }

    /// Every published CA, oldest first.
    pub fn cas(&self) -> Vec<Arc<Ca>> {
        self.cas.iter().map(|(c, _)| c.clone()).collect()
    }

    /// The JWT key that signs now.
    pub fn active_jwt(&self) -> Arc<JwtSigner> {
        self.jwts[self.active_jwt].signer.clone()
    }

    /// Every published CA certificate (DER), oldest first; with an
    /// upstream authority, its roots instead (the CAs are intermediates).
    pub fn x509_authorities(&self) -> Vec<Vec<u8>> {
        if let Some(up) = &self.upstream {
            return up.roots();
        }
        self.cas
            .iter()
            .map(|(c, _)| c.cert_der().to_vec())
            .collect()
    }

    /// This server's ID in the cluster.
    pub fn server_id(&self) -> &str {
        &self.server_id
    }

    /// The public parts of every published key with their expiries, for
    /// the datastore (`sequence` is filled in by the publisher).
    pub fn published(&self) -> (Vec<PublishedCa>, Vec<PublishedJwt>) {
        let x509 = self
            .cas
            .iter()
            .map(|(c, _)| PublishedCa {
                der: STANDARD.encode(c.cert_der()),
                not_after: unix(c.not_after()),
            })
            .collect();
        // With an upstream authority the roots are published, not the CAs.
        let x509 = self
            .upstream
            .as_ref()
            .map_or(x509, |up| crate::upstream::published_roots(up));
        let jwt = self
            .jwts
            .iter()
            .map(|j| PublishedJwt {
                jwk: j.signer.public_jwk.clone(),
                not_after: j.signer.not_after,
            })
            .collect();
        (x509, jwt)
    }

    /// Every published JWT key as a public JWK, oldest first.
    pub fn jwt_authorities(&self) -> Vec<serde_json::Value> {
        self.jwts
            .iter()
            .map(|j| j.signer.public_jwk.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    #[test]
    fn keys_persist_with_private_mode_and_survive_restart() {
        let dir = std::env::temp_dir().join(format!("sigil-keys-{}", std::process::id()));
        let a = Keys::load_or_create(&dir, &td(), Duration::from_secs(3600), JwtKeyType::EcP256)
            .unwrap();
        let mode = std::fs::metadata(dir.join("keys.json"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let b = Keys::load_or_create(&dir, &td(), Duration::from_secs(3600), JwtKeyType::EcP256)
            .unwrap();
        assert_eq!(
            a.x509_authorities(),
            b.x509_authorities(),
            "restart keeps the CA"
        );
        assert_eq!(
            a.active_jwt().kid,
            b.active_jwt().kid,
            "restart keeps the JWT key"
        );
        std::fs::set_permissions(
            dir.join("keys.json"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        assert!(
            Keys::load_or_create(&dir, &td(), Duration::from_secs(3600), JwtKeyType::EcP256)
                .is_err(),
            "world-readable keys refused"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_linked_or_foreign_keys_file_is_refused() {
        let dir = std::env::temp_dir().join(format!("sigil-keys-trust-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Keys::load_or_create(&dir, &td(), Duration::from_secs(3600), JwtKeyType::EcP256).unwrap();
        let real = dir.join("keys.real");
        std::fs::rename(dir.join("keys.json"), &real).unwrap();
        std::os::unix::fs::symlink(&real, dir.join("keys.json")).unwrap();
        let e = Keys::load_or_create(&dir, &td(), Duration::from_secs(3600), JwtKeyType::EcP256)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("keys.json") && e.contains("symbolic link"),
            "{e}"
        );
        std::fs::remove_file(dir.join("keys.json")).unwrap();
        std::fs::rename(&real, dir.join("keys.json")).unwrap();
        if nix::unistd::geteuid().is_root() {
            nix::unistd::chown(
                &dir.join("keys.json"),
                Some(nix::unistd::Uid::from_raw(65534)),
                None,
            )
            .unwrap();
            let e =
                Keys::load_or_create(&dir, &td(), Duration::from_secs(3600), JwtKeyType::EcP256)
                    .err()
                    .unwrap()
                    .to_string();
            assert!(e.contains("uid 65534") && e.contains("0600"), "{e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn next_key_is_published_before_it_signs_and_old_stays_until_expiry() {
        let dir = std::env::temp_dir().join(format!("sigil-keys-rot-{}", std::process::id()));
        let mut k = Keys::load_or_create(&dir, &td(), Duration::from_secs(600), JwtKeyType::EcP256)
            .unwrap();
        let first_ca = k.active_ca().cert_der().to_vec();
        let first_kid = k.active_jwt().kid.clone();
        let t0 = sigil_core::now_unix();
        // Young: nothing happens.
        assert!(!k.rotate(t0 + 10).unwrap());
        // Half-life: the successor is published but not active.
        assert!(k.rotate(t0 + 310).unwrap());
        assert_eq!(k.x509_authorities().len(), 2);
        assert_eq!(k.jwt_authorities().len(), 2);
        assert_eq!(k.active_ca().cert_der(), first_ca.as_slice());
        assert_eq!(k.active_jwt().kid, first_kid);
        // Five sixths: the successor signs; the old one is still published.
        assert!(k.rotate(t0 + 510).unwrap());
        assert_ne!(k.active_ca().cert_der(), first_ca.as_slice());
        assert_ne!(k.active_jwt().kid, first_kid);
        assert!(k.x509_authorities().contains(&first_ca));
        // After its expiry the old one is gone.
        k.rotate(t0 + 620).unwrap();
        assert!(!k.x509_authorities().contains(&first_ca));
        assert!(
            k.jwt_authorities()
                .iter()
                .all(|j| j["kid"] != first_kid.as_str())
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_rotation_that_cannot_be_persisted_changes_nothing() {
        let dir = std::env::temp_dir().join(format!("sigil-keys-nopersist-{}", std::process::id()));
        let mut k = Keys::load_or_create(&dir, &td(), Duration::from_secs(600), JwtKeyType::EcP256)
            .unwrap();
        let ca = k.active_ca().cert_der().to_vec();
        let kid = k.active_jwt().kid.clone();
        let published = k.x509_authorities();
        let t0 = sigil_core::now_unix();
        // The file's directory is gone and a file stands in its place, so
        // the write fails (as on a full disk).
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::write(&dir, b"not a directory").unwrap();
        for t in [t0 + 310, t0 + 510] {
            assert!(k.rotate_persisted(t).is_err());
            assert_eq!(k.active_ca().cert_der(), ca.as_slice());
            assert_eq!(k.active_jwt().kid, kid);
            assert_eq!(k.x509_authorities(), published);
        }
        // Once it can write again, the rotation happens and is on disk.
        std::fs::remove_file(&dir).unwrap();
        std::fs::create_dir_all(&dir).unwrap();
        assert!(k.rotate_persisted(t0 + 510).unwrap());
        assert_ne!(k.active_ca().cert_der(), ca.as_slice());
        let again = Keys::load_or_create(&dir, &td(), Duration::from_secs(600), JwtKeyType::EcP256)
            .unwrap();
        assert_eq!(again.active_ca().cert_der(), k.active_ca().cert_der());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
