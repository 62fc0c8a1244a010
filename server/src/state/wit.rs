//! WIT-SVIDs (spiffe/spiffe `standards/WIT-SVID.md`): the trust domain's
//! WIT signing keys and signing a WIT for an agent.
//!
//! **Keys.** WIT-SVIDs have keys of their own, never the JWT-SVID keys: a
//! verifier picks WIT keys by `use: wit-svid` and JWT-SVID keys by `use:
//! jwt-svid`, so a token signed for one purpose can never pass as the
//! other. They are ECDSA P-256 (`ES256`, the algorithm every WIMSE
//! implementation must support), kept in `<data_dir>/wit_keys.json` (mode
//! 0600, not followed through links, apart from `keys.json` so that the
//! X.509 and JWT key managers stay as they are), and rotated on the same
//! schedule as the JWT keys, with the CA's lifetime (`ca_ttl`): a successor
//! is published at half the active key's life and signs from five sixths
//! on; a retired key stays published until it expires, and no WIT outlives
//! its key. The public parts are published with the server's other keys
//! (`ServerKeysRecord::wit`), so every server of a cluster serves every
//! server's WIT keys.
//!
//! **Issuing.** [`ServerState::mint_wit_for_agent`] applies the rule of
//! JWT-SVIDs (an entry the agent may serve now, not expired, not killed,
//! approved when it needs approval) plus the entry's `wit_svid` opt-in,
//! binds the public key the agent generated for the workload (checked by
//! `sigil_core::wit::public_cnf_jwk`), and writes a `wit_svid_issued`
//! audit record (with `jti` and the key's thumbprint) before returning.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
use sigil_core::audit::Event;
use sigil_core::caller::Caller;
use sigil_core::jwt::{JwtKeyType, JwtSigner};
use sigil_core::wit::{into_wit_authority, jwk_thumbprint, public_cnf_jwk, sign_wit};
use sigil_core::{SpiffeId, now_unix};
use sigil_fs::{Links, read_private_file, write_atomic};

use super::ServerState;
use crate::datastore::{PublishedJwt, append_audit};
use crate::error::RegistryError;
use crate::keys::KeyError;

/// The file, in `data_dir`.
pub const WIT_KEYS_FILE: &str = "wit_keys.json";

#[derive(Serialize, Deserialize)]
struct StoredKey {
    kid: String,
    pkcs8: String,
    issued_at: i64,
    not_after: i64,
}

#[derive(Serialize, Deserialize)]
struct Stored {
    keys: Vec<StoredKey>,
    active: usize,
}

struct Slot {
    signer: Arc<JwtSigner>,
    issued_at: i64,
}

/// The WIT signing keys: published ones, oldest first, and the active one.
pub struct WitKeys {
    path: PathBuf,
    ttl: Duration,
    keys: Vec<Slot>,
    active: usize,
}

impl WitKeys {
    /// Loads `<data_dir>/wit_keys.json` or makes the first key.
    pub fn load_or_create(data_dir: &Path, ttl: Duration) -> Result<Self, KeyError> {
        let path = data_dir.join(WIT_KEYS_FILE);
        let mut w = Self {
            path: path.clone(),
            ttl,
            keys: Vec::new(),
            active: 0,
        };
        let found = match read_private_file(&path, Links::Refuse) {
            Ok(b) => Some(b),
            Err(e) if e.is_not_found() => None,
            Err(e) => return Err(KeyError::Read(e.to_string())),
        };
        if let Some(bytes) = found {
            let corrupt = |reason: String| KeyError::Corrupt {
                path: path.clone(),
                reason,
            };
            let s: Stored = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
            for k in s.keys {
                let pkcs8 = STANDARD
                    .decode(&k.pkcs8)
                    .map_err(|e| corrupt(format!("key {:?}: {e}", k.kid)))?;
                let signer =
                    JwtSigner::from_pkcs8(k.kid.clone(), JwtKeyType::EcP256, pkcs8, k.not_after)
                        .map_err(|e| corrupt(format!("key {:?}: {e}", k.kid)))?;
                w.keys.push(Slot {
                    signer: Arc::new(into_wit_authority(signer)),
                    issued_at: k.issued_at,
                });
            }
            w.active = s.active.min(w.keys.len().saturating_sub(1));
        }
        w.rotate(now_unix())?;
        w.persist()?;
        Ok(w)
    }

    fn new_key(&self, now: i64) -> Result<Slot, KeyError> {
        let signer = JwtSigner::generate(JwtKeyType::EcP256, now + self.ttl.as_secs() as i64)
            .map_err(|e| KeyError::Generate(e.to_string()))?;
        tracing::info!(kid = %signer.kid, "generated WIT-SVID key");
        Ok(Slot {
            signer: Arc::new(into_wit_authority(signer)),
            issued_at: now,
        })
    }

    /// Advances rotation to `now` (the JWT keys' schedule: a successor
    /// published at half life, active from five sixths, the retired key
    /// published until it expires). True when the keys changed.
    pub fn rotate(&mut self, now: i64) -> Result<bool, KeyError> {
        let before = self.keys.len();
        let active_kid = self.keys.get(self.active).map(|k| k.signer.kid.clone());
        self.keys.retain(|k| k.signer.not_after > now);
        let mut changed = self.keys.len() != before;
        match active_kid.and_then(|kid| self.keys.iter().position(|k| k.signer.kid == kid)) {
            Some(i) => self.active = i,
            None => {
                if self.keys.is_empty() {
                    let k = self.new_key(now)?;
                    self.keys.push(k);
                }
                self.active = self.keys.len() - 1;
                changed = true;
            }
        }
        let (issued, not_after) = {
            let a = &self.keys[self.active];
            (a.issued_at, a.signer.not_after)
        };
        let life = (not_after - issued).max(1);
        let has_next = self.active + 1 < self.keys.len();
        if now >= not_after - life / 6 {
            if !has_next {
                let k = self.new_key(now)?;
                self.keys.push(k);
            }
            self.active = self.keys.len() - 1;
            tracing::info!("activated the next WIT-SVID key");
            changed = true;
        } else if now >= issued + life / 2 && !has_next {
            let k = self.new_key(now)?;
            self.keys.push(k);
            changed = true;
        }
        Ok(changed)
    }

    /// Writes the file (0600).
    pub fn persist(&self) -> Result<(), KeyError> {
        let s = Stored {
            keys: self
                .keys
                .iter()
                .map(|k| StoredKey {
                    kid: k.signer.kid.clone(),
                    pkcs8: STANDARD.encode(k.signer.pkcs8()),
                    issued_at: k.issued_at,
                    not_after: k.signer.not_after,
                })
                .collect(),
            active: self.active,
        };
        let write = |reason: String| KeyError::Write {
            path: self.path.clone(),
            reason,
        };
        let text = serde_json::to_vec_pretty(&s).map_err(|e| write(e.to_string()))?;
        write_atomic(&self.path, &text, 0o600).map_err(|e| write(e.to_string()))
    }

    /// The key that signs now.
    pub fn active(&self) -> Arc<JwtSigner> {
        self.keys[self.active].signer.clone()
    }

    /// Every published key as a public JWK (`use: wit-svid`), oldest first.
    pub fn authorities(&self) -> Vec<serde_json::Value> {
        self.keys
            .iter()
            .map(|k| k.signer.public_jwk.clone())
            .collect()
    }

    /// The public keys with their expiries, for the datastore.
    pub fn published(&self) -> Vec<PublishedJwt> {
        self.keys
            .iter()
            .map(|k| PublishedJwt {
                jwk: k.signer.public_jwk.clone(),
                not_after: k.signer.not_after,
            })
            .collect()
    }
}

impl ServerState {
    /// Advances WIT key rotation; on change persists the keys, publishes
    /// them and pushes the new WIT bundle to every agent.
    pub fn rotate_wit_keys(&self) -> Result<bool, KeyError> {
        {
            let mut w = self.wit_keys.write().unwrap_or_else(|p| p.into_inner());
            if !w.rotate(now_unix())? {
                return Ok(false);
            }
            w.persist()?;
        }
        self.keys_unpublished
            .store(true, std::sync::atomic::Ordering::SeqCst);
        if let Err(e) = self.publish_keys() {
            tracing::warn!(error = %e, "publishing the rotated WIT keys failed; retrying");
        }
        self.bump();
        Ok(true)
    }

    /// This server's WIT keys (public JWKs), for publication.
    pub(super) fn own_wit_authorities(&self) -> Vec<PublishedJwt> {
        self.wit_keys
            .read()
            .map(|w| w.published())
            .unwrap_or_default()
    }

    /// Every WIT-SVID authority of the cluster as a JWKS document (keys
    /// with `use: wit-svid`; never the JWT-SVID keys).
    pub fn wit_bundle(&self) -> Vec<u8> {
        sigil_core::jwt::jwks(&self.cluster_wit_authorities())
    }

    /// Signs a WIT-SVID binding `public_jwk` (the workload key the agent
    /// generated) for entry `entry_id`, which the agent must be authorized
    /// for and which must have opted in (`wit_svid`). Lifetime: the entry's
    /// JWT-SVID TTL or `default_jwt_svid_ttl`, capped like JWT-SVIDs (entry
    /// expiry, approval grant) and by the key's own expiry. Audited with
    /// its `jti` before it is returned.
    pub fn mint_wit_for_agent(
        &self,
        agent: &SpiffeId,
        entry_id: &str,
        public_jwk: &str,
    ) -> Result<String, RegistryError> {
        let jwk: serde_json::Value = serde_json::from_str(public_jwk).map_err(|e| {
            RegistryError::invalid(format!("invalid field `public_jwk`: not JSON: {e}"))
        })?;
        let jwk = public_cnf_jwk(&jwk)
            .map_err(|e| RegistryError::invalid(format!("invalid field `public_jwk`: {e}")))?;
        let now = now_unix();
        let (e, _rec, grant) = self.entry_to_mint(agent, entry_id, now)?;
        if !e.wit_svid {
            return Err(RegistryError::denied(format!(
                "entry {} does not issue WIT-SVIDs (it was not created or updated with --wit-svid)",
                e.id
            )));
        }
        let ttl = Self::capped_ttl(
            &e,
            e.jwt_svid_ttl.unwrap_or(self.cfg.default_jwt_svid_ttl),
            grant,
            now,
        )?;
        let signer = self
            .wit_keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .active();
        let wit = sign_wit(&signer, &e.spiffe_id, &jwk, ttl, now)
            .map_err(|err| RegistryError::internal(err.to_string()))?;
        self.note_entries_used([e.id.as_str()]);
        if self.cfg.audit_issuance {
            let caller = Caller::agent(agent.clone());
            let event = Event::WitSvidIssued {
                agent_id: agent.clone(),
                entry_id: e.id.clone(),
                spiffe_id: e.spiffe_id.clone(),
                jti: wit.jti,
                expires_at: wit.expires_at,
                cnf_jkt: jwk_thumbprint(&jwk),
            };
            self.store
                .transact(|tx| append_audit(tx, &caller, event.clone()))?;
        }
        Ok(wit.token)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{AGENT, admin, attest, entry, id, temp_state};
    use super::*;
    use crate::datastore::KillTarget;
    use std::collections::BTreeMap;

    #[test]
    fn only_opted_in_authorized_unkilled_entries_get_a_wit_and_each_is_audited() {
        let t = temp_state();
        let s = &t.state;
        attest(s, AGENT);
        let other = "spiffe://example.org/agent2";
        attest(s, other);
        let key = sigil_core::wit::WorkloadKey::generate().unwrap();
        let jwk = key.public_jwk().to_string();
        let plain = s
            .create_entry(&admin(), entry(AGENT, "spiffe://example.org/w/plain"))
            .unwrap();
        let mut pb = entry(AGENT, "spiffe://example.org/w/wit");
        pb.wit_svid = true;
        let opted = s.create_entry(&admin(), pb).unwrap();
        let mut pb = entry(other, "spiffe://example.org/w/theirs");
        pb.wit_svid = true;
        let theirs = s.create_entry(&admin(), pb).unwrap();

        let e = s
            .mint_wit_for_agent(&id(AGENT), &plain.id, &jwk)
            .unwrap_err();
        assert!(
            matches!(&e, RegistryError::PermissionDenied(m) if m.contains("--wit-svid")),
            "{e:?}"
        );
        let e = s
            .mint_wit_for_agent(&id(AGENT), &theirs.id, &jwk)
            .unwrap_err();
        assert!(matches!(e, RegistryError::PermissionDenied(_)), "{e:?}");
        // A private key, or something that is no key, is refused naming the field.
        let e = s
            .mint_wit_for_agent(&id(AGENT), &opted.id, &key.private_jwk())
            .unwrap_err();
        assert!(e.to_string().contains("public_jwk"), "{e}");
        assert!(s.mint_wit_for_agent(&id(AGENT), &opted.id, "{").is_err());

        let token = s.mint_wit_for_agent(&id(AGENT), &opted.id, &jwk).unwrap();
        let bundle = sigil_core::wit::WitBundle::from_jwks(&s.wit_bundle()).unwrap();
        let v = sigil_core::wit::verify_wit(
            &token,
            &BTreeMap::from([(s.cfg.trust_domain.clone(), bundle)]),
            now_unix(),
            0,
        )
        .unwrap();
        assert_eq!(v.spiffe_id, opted.spiffe_id);
        assert_eq!(v.cnf_jwk, *key.public_jwk());
        // The JWT bundle does not carry the WIT key.
        let (_, kid, _) = sigil_core::jwt::peek_header(&token).unwrap();
        let jwt = sigil_core::jwt::JwtBundle::from_jwks(&s.jwt_bundle()).unwrap();
        assert!(!jwt.has_key(&kid.unwrap()));
        let recs: Vec<Event> = s
            .store
            .read()
            .unwrap()
            .audit_records(0, usize::MAX)
            .unwrap()
            .into_iter()
            .map(|r| r.event)
            .filter(|e| matches!(e, Event::WitSvidIssued { .. }))
            .collect();
        let [Event::WitSvidIssued { jti, cnf_jkt, .. }] = recs.as_slice() else {
            panic!("expected one WIT record, got {recs:?}");
        };
        assert_eq!(Some(jti), v.jti.as_ref());
        assert_eq!(*cnf_jkt, jwk_thumbprint(key.public_jwk()));

        // A killed identity gets none.
        let kill = s
            .create_kill(&admin(), KillTarget::Entry(opted.id.clone()), "leaked")
            .unwrap();
        let e = s
            .mint_wit_for_agent(&id(AGENT), &opted.id, &jwk)
            .unwrap_err();
        assert!(
            matches!(&e, RegistryError::PermissionDenied(m) if m.contains(&kill.id)),
            "{e:?}"
        );
    }

    #[test]
    fn wit_keys_rotate_like_jwt_keys_and_persist_privately() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("sigil-wit-keys-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        sigil_fs::ensure_private_dir(&dir).unwrap();
        let mut k = WitKeys::load_or_create(&dir, Duration::from_secs(600)).unwrap();
        let mode = std::fs::metadata(dir.join(WIT_KEYS_FILE))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let first = k.active().kid.clone();
        assert_eq!(k.authorities()[0]["use"], "wit-svid");
        let again = WitKeys::load_or_create(&dir, Duration::from_secs(600)).unwrap();
        assert_eq!(again.active().kid, first, "a restart keeps the key");
        let t0 = now_unix();
        assert!(!k.rotate(t0 + 10).unwrap());
        assert!(k.rotate(t0 + 310).unwrap());
        assert_eq!(k.authorities().len(), 2);
        assert_eq!(k.active().kid, first, "published before it signs");
        assert!(k.rotate(t0 + 510).unwrap());
        assert_ne!(k.active().kid, first);
        k.rotate(t0 + 620).unwrap();
        assert!(k.authorities().iter().all(|j| j["kid"] != first.as_str()));
        std::fs::set_permissions(
            dir.join(WIT_KEYS_FILE),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        assert!(WitKeys::load_or_create(&dir, Duration::from_secs(600)).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
