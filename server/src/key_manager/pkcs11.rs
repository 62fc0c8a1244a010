//! A PKCS#11 token that holds the CA and JWT signing keys
//! (`[key_manager] kind = "pkcs11"`), through the `cryptoki` crate.
//!
//! Every key is an ECDSA P-256 pair made by the token itself
//! (`CKM_EC_KEY_PAIR_GEN`): the private half is a token object that is
//! private, sensitive and not extractable, so it never leaves the token;
//! both halves share a random 16-byte `CKA_ID` (kept in keys.json, to find
//! them after a restart) and a `CKA_LABEL` `sigil-<purpose>-<hex>`. The
//! token signs the SHA-256 digest with `CKM_ECDSA` and returns `r || s`.
//!
//! PKCS#11 sessions may not be used by two threads at once: the token
//! keeps a small pool of sessions, each behind a mutex, and a signer takes
//! whichever is free. The PIN is read from `pin_file` (0600 or 0400),
//! used for the login and dropped; it is never logged.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use sigil_core::signer::{ExternalKey, P256_LEN, SignerError, check_p256_point};
use sigil_fs::{Links, read_private_file};

use crate::config::Pkcs11Config;

/// DER of the named curve P-256 (`prime256v1`), the key's `CKA_EC_PARAMS`.
const P256_PARAMS: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// A cryptoki error as `C_Function: Reason` (the short form: the crate's
/// own text for a return value is a paragraph of the specification).
pub(crate) fn ck(e: CkError) -> String {
    match e {
        CkError::Pkcs11(rv, f) => format!("C_{f:?}: {rv:?}"),
        other => other.to_string(),
    }
}

/// An open, logged-in token.
pub struct Token {
    label: String,
    sessions: Vec<Mutex<Session>>,
    next: AtomicUsize,
    /// Kept for as long as the sessions (the library stays loaded).
    _ctx: Pkcs11,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("label", &self.label)
            .field("sessions", &self.sessions.len())
            .finish_non_exhaustive()
    }
}

/// Reads the PIN: a private file, its text without a final newline.
fn read_pin(path: &Path) -> Result<AuthPin, String> {
    let bytes =
        read_private_file(path, Links::Follow).map_err(|e| format!("key_manager.pin_file: {e}"))?;
    let text = String::from_utf8(bytes)
        .map_err(|_| format!("key_manager.pin_file {}: not UTF-8", path.display()))?;
    let pin = text.strip_suffix('\n').unwrap_or(&text);
    let pin = pin.strip_suffix('\r').unwrap_or(pin);
    if pin.is_empty() || pin.contains('\n') {
        return Err(format!(
            "key_manager.pin_file {}: must hold the PIN on one line",
            path.display()
        ));
    }
    Ok(AuthPin::new(pin.into()))
}

impl Token {
    /// Loads `module`, finds the token labelled `token_label`, logs in with
    /// the PIN of `pin_file` and opens `sessions` sessions. Every error
    /// names the `[key_manager]` key it is about.
    pub fn open(cfg: &Pkcs11Config, sessions: usize) -> Result<Arc<Token>, String> {
        let pin = read_pin(&cfg.pin_file)?;
        let module = cfg.module.display();
        let ctx = Pkcs11::new(&cfg.module).map_err(|e| {
            format!("key_manager.module {module}: cannot load the PKCS#11 library: {e}")
        })?;
        match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
            Err(e) => return Err(format!("key_manager.module {module}: {}", ck(e))),
        }
        let slot = find_slot(&ctx, &cfg.token_label)
            .map_err(|e| format!("key_manager.token_label {:?}: {e}", cfg.token_label))?;
        let first = ctx
            .open_rw_session(slot)
            .map_err(|e| format!("key_manager.token_label {:?}: {}", cfg.token_label, ck(e)))?;
        match first.login(UserType::User, Some(&pin)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(e) => {
                return Err(format!(
                    "key_manager.pin_file {}: token {:?} refused the login ({})",
                    cfg.pin_file.display(),
                    cfg.token_label,
                    ck(e)
                ));
            }
        }
        drop(pin);
        // A login holds for every session of this process with the token.
        let mut all = vec![Mutex::new(first)];
        for _ in 1..sessions.max(1) {
            let s = ctx
                .open_rw_session(slot)
                .map_err(|e| format!("key_manager.token_label {:?}: {}", cfg.token_label, ck(e)))?;
            all.push(Mutex::new(s));
        }
        tracing::info!(
            token = %cfg.token_label,
            module = %module,
            sessions = all.len(),
            "opened the PKCS#11 token for the signing keys"
        );
        Ok(Arc::new(Token {
            label: cfg.token_label.clone(),
            sessions: all,
            next: AtomicUsize::new(0),
            _ctx: ctx,
        }))
    }

    /// The token's label.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// A free session, or the next one in turn when all are busy.
    fn session(&self) -> MutexGuard<'_, Session> {
        let n = self.sessions.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        for i in 0..n {
            match self.sessions[(start + i) % n].try_lock() {
                Ok(g) => return g,
                Err(TryLockError::Poisoned(p)) => return p.into_inner(),
                Err(TryLockError::WouldBlock) => {}
            }
        }
        self.sessions[start % n]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Generates a P-256 key pair in the token for `purpose` (`ca`, `jwt`).
    pub fn generate(self: &Arc<Self>, purpose: &str) -> Result<Arc<TokenKey>, String> {
        let id = sigil_core::ids::random_bytes::<16>().to_vec();
        let label = format!("sigil-{purpose}-{}", hex::encode(&id[..8]));
        let public = [
            Attribute::Token(true),
            Attribute::Private(false),
            Attribute::Verify(true),
            Attribute::KeyType(KeyType::EC),
            Attribute::EcParams(P256_PARAMS.to_vec()),
            Attribute::Id(id.clone()),
            Attribute::Label(label.as_bytes().to_vec()),
        ];
        let private = [
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
            Attribute::KeyType(KeyType::EC),
            Attribute::Id(id.clone()),
            Attribute::Label(label.as_bytes().to_vec()),
        ];
        let s = self.session();
        let (pub_h, priv_h) = s
            .generate_key_pair(&Mechanism::EccKeyPairGen, &public, &private)
            .map_err(|e| format!("token {:?}: generating key {label}: {}", self.label, ck(e)))?;
        let point = ec_point(&s, pub_h).map_err(|e| format!("key {label}: {e}"))?;
        drop(s);
        Ok(Arc::new(TokenKey {
            token: self.clone(),
            handle: priv_h,
            id,
            label,
            point,
        }))
    }

    /// Finds the key pair with `CKA_ID` `id` again. The private key must
    /// be sensitive and never have been extractable.
    pub fn find(self: &Arc<Self>, id: &[u8]) -> Result<Arc<TokenKey>, String> {
        let s = self.session();
        let hex_id = hex::encode(id);
        let one = |class: ObjectClass, what: &str| -> Result<ObjectHandle, String> {
            let found = s
                .find_objects(&[Attribute::Class(class), Attribute::Id(id.to_vec())])
                .map_err(|e| format!("token {:?}: {}", self.label, ck(e)))?;
            match found.as_slice() {
                [h] => Ok(*h),
                [] => Err(format!(
                    "key ID {hex_id}: no {what} with this ID in token {:?}",
                    self.label
                )),
                _ => Err(format!(
                    "key ID {hex_id}: {} {what}s with this ID in token {:?}",
                    found.len(),
                    self.label
                )),
            }
        };
        let priv_h = one(ObjectClass::PRIVATE_KEY, "private key")?;
        let pub_h = one(ObjectClass::PUBLIC_KEY, "public key")?;
        let attrs = s
            .get_attributes(
                priv_h,
                &[
                    AttributeType::Label,
                    AttributeType::Sensitive,
                    AttributeType::NeverExtractable,
                    AttributeType::Sign,
                ],
            )
            .map_err(|e| format!("key ID {hex_id}: {}", ck(e)))?;
        let mut label = format!("key ID {hex_id}");
        let (mut sensitive, mut never_extractable, mut sign) = (false, false, false);
        for a in attrs {
            match a {
                Attribute::Label(l) => label = String::from_utf8_lossy(&l).into_owned(),
                Attribute::Sensitive(b) => sensitive = b,
                Attribute::NeverExtractable(b) => never_extractable = b,
                Attribute::Sign(b) => sign = b,
                _ => {}
            }
        }
        if !(sensitive && never_extractable && sign) {
            return Err(format!(
                "key {label}: refused, the private key must be sensitive, never extractable and able to sign"
            ));
        }
        let point = ec_point(&s, pub_h).map_err(|e| format!("key {label}: {e}"))?;
        drop(s);
        Ok(Arc::new(TokenKey {
            token: self.clone(),
            handle: priv_h,
            id: id.to_vec(),
            label,
            point,
        }))
    }

    /// Destroys every object with `CKA_ID` `id`; returns how many.
    pub fn destroy(&self, id: &[u8]) -> Result<usize, String> {
        let s = self.session();
        let found = s
            .find_objects(&[Attribute::Id(id.to_vec())])
            .map_err(|e| format!("token {:?}: {}", self.label, ck(e)))?;
        for h in &found {
            s.destroy_object(*h)
                .map_err(|e| format!("token {:?}: {}", self.label, ck(e)))?;
        }
        Ok(found.len())
    }
}

/// The first slot whose token has `label`; the error lists the labels seen.
fn find_slot(ctx: &Pkcs11, label: &str) -> Result<Slot, String> {
    let slots = ctx.get_slots_with_token().map_err(ck)?;
    let mut seen = Vec::new();
    for slot in slots {
        let info = ctx.get_token_info(slot).map_err(ck)?;
        if info.label() == label {
            if !info.token_initialized() {
                return Err("the token is not initialized".into());
            }
            return Ok(slot);
        }
        if info.token_initialized() {
            seen.push(format!("{:?}", info.label()));
        }
    }
    Err(format!(
        "no token with this label (tokens found: {})",
        if seen.is_empty() {
            "none".to_string()
        } else {
            seen.join(", ")
        }
    ))
}

/// The uncompressed point of an EC public key object: `CKA_EC_POINT` is a
/// DER OCTET STRING around it (some modules return the bare point).
fn ec_point(s: &Session, public: ObjectHandle) -> Result<Vec<u8>, String> {
    let attrs = s
        .get_attributes(public, &[AttributeType::EcPoint])
        .map_err(ck)?;
    let raw = attrs
        .into_iter()
        .find_map(|a| match a {
            Attribute::EcPoint(p) => Some(p),
            _ => None,
        })
        .ok_or("the public key has no CKA_EC_POINT")?;
    let n = 1 + 2 * P256_LEN;
    let point = match raw.as_slice() {
        [0x04, len, rest @ ..] if usize::from(*len) == n && rest.len() == n => rest.to_vec(),
        _ => raw,
    };
    check_p256_point(&point)?;
    Ok(point)
}

/// A key pair in the token, signing through it.
pub struct TokenKey {
    token: Arc<Token>,
    handle: ObjectHandle,
    id: Vec<u8>,
    label: String,
    point: Vec<u8>,
}

impl ExternalKey for TokenKey {
    fn public_point(&self) -> &[u8] {
        &self.point
    }

    fn key_id(&self) -> &[u8] {
        &self.id
    }

    fn label(&self) -> &str {
        &self.label
    }

    fn sign_p256_sha256(&self, msg: &[u8]) -> Result<[u8; 2 * P256_LEN], SignerError> {
        let fail = |reason: String| SignerError {
            label: self.label.clone(),
            reason,
        };
        let digest = ring::digest::digest(&ring::digest::SHA256, msg);
        let sig = self
            .token
            .session()
            .sign(&Mechanism::Ecdsa, self.handle, digest.as_ref())
            .map_err(|e| fail(format!("token {:?}: {}", self.token.label, ck(e))))?;
        sig.as_slice()
            .try_into()
            .map_err(|_| fail(format!("a {}-byte signature, expected 64", sig.len())))
    }
}
