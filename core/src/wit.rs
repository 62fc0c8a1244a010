//! WIT-SVIDs (spiffe/spiffe `standards/WIT-SVID.md`, the SPIFFE profile of
//! the WIMSE Workload Identity Token of draft-ietf-wimse-workload-creds)
//! and their proof of possession, the WIMSE Workload Proof Token
//! (draft-ietf-wimse-wpt).
//!
//! A WIT-SVID is a JWS whose header has `typ: wit+jwt`, an `alg` of the
//! standard's list and a `kid`, and whose claims bind the workload's public
//! key (`cnf.jwk`, with its `alg`) to its SPIFFE ID (`sub`) until `exp`. It
//! has no `aud`: it is never a bearer token. A verifier accepts it only
//! with a proof signed by the `cnf` key; here that proof is a WPT
//! (`typ: wpt+jwt`, signed with `cnf.jwk.alg`, `aud` the target, a short
//! `exp`, a `jti`, and `wth` the SHA-256 of the WIT).
//!
//! - [`sign_wit`] — what the server does (with a key whose JWK says
//!   `use: wit-svid`; a JWT-SVID key is refused).
//! - [`WorkloadKey`] — the workload's P-256 key pair the agent generates,
//!   as the private JWK the Workload API hands out, and WPT signing.
//! - [`WitBundle`] and [`verify_wit`] — validation against the trust
//!   domain's `use: wit-svid` keys only.
//! - [`verify_wpt`] — the proof of possession check.
//!
//! What is left to the caller of [`verify_wpt`]: remembering the WPT's
//! `jti` for its lifetime if it wants replay protection (the draft
//! recommends it), and authorizing the SPIFFE ID.

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header};
use serde_json::{Map, Value, json};
use spiffe::{SpiffeId, TrustDomain};

use crate::jwt::JwtSigner;

/// The JOSE `typ` of a WIT.
pub const WIT_TYP: &str = "wit+jwt";
/// The JOSE `typ` of a Workload Proof Token.
pub const WPT_TYP: &str = "wpt+jwt";
/// The `use` of a WIT-SVID authority in a SPIFFE bundle.
pub const WIT_USE: &str = "wit-svid";
/// Longest WIT or WPT accepted, in bytes (Sigil's are under 1 KiB).
pub const MAX_TOKEN_LEN: usize = 16 * 1024;
/// Longest WPT lifetime [`verify_wpt`] accepts by default.
pub const DEFAULT_MAX_WPT_LIFETIME: Duration = Duration::from_secs(300);
/// The signature algorithms of the WIT-SVID standard that this crate can
/// verify, for the WIT itself and for `cnf.jwk.alg`. (The standard also
/// lists ES512, which the JOSE library here does not implement: it is
/// refused as unsupported, as the standard requires of unsupported values.)
pub const ALLOWED_ALGS: [&str; 8] = [
    "RS256", "RS384", "RS512", "ES256", "ES384", "PS256", "PS384", "PS512",
];

/// Private members of a JWK (RFC 7518 §6.2.2, §6.3.2, §6.4): never in a
/// `cnf.jwk` or a bundle key.
const PRIVATE_MEMBERS: [&str; 8] = ["d", "p", "q", "dp", "dq", "qi", "oth", "k"];

/// Why a WIT, a WPT, a key or a bundle was refused. Every variant names
/// the header parameter or claim at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WitError {
    /// Not three base64url parts of JSON objects.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// Longer than [`MAX_TOKEN_LEN`].
    #[error("token is {len} bytes; at most {max} are accepted")]
    TooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The header's `typ` is missing or not the expected one.
    #[error("header `typ` is {found:?}, expected {expected:?}")]
    Type {
        /// What the header says.
        found: Option<String>,
        /// `wit+jwt` or `wpt+jwt`.
        expected: &'static str,
    },
    /// The header's `alg` is not one of [`ALLOWED_ALGS`].
    #[error(
        "header `alg` {0:?} is not allowed (allowed: RS256, RS384, RS512, ES256, ES384, PS256, PS384, PS512)"
    )]
    Algorithm(String),
    /// The header has no `kid` (a WIT-SVID must name its key).
    #[error("header `kid` is missing or empty: a WIT-SVID must name its signing key")]
    MissingKid,
    /// The header has `crit`: extensions this verifier does not know.
    #[error("header `crit` is present: no JWS extension is understood here")]
    Critical,
    /// No `use: wit-svid` key with this `kid` for the token's trust domain.
    #[error("no WIT-SVID authority (use wit-svid) with key ID {kid:?} for trust domain {td}")]
    UnknownKey {
        /// The `sub`'s trust domain.
        td: String,
        /// The header's `kid`.
        kid: String,
    },
    /// The signature does not verify with the key it names.
    #[error("signature does not verify")]
    Signature,
    /// A claim is missing or has the wrong form.
    #[error("claim `{claim}`: {reason}")]
    Claim {
        /// The claim's name.
        claim: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// `exp` has passed.
    #[error("claim `exp`: expired at {exp} (now {now}, leeway {leeway}s)")]
    Expired {
        /// The `exp`.
        exp: i64,
        /// The verifier's clock.
        now: i64,
        /// The allowed skew.
        leeway: u64,
    },
    /// `nbf` or `iat` is in the future.
    #[error("claim `{claim}`: {at} is in the future (now {now}, leeway {leeway}s)")]
    NotYetValid {
        /// `nbf` or `iat`.
        claim: &'static str,
        /// Its value.
        at: i64,
        /// The verifier's clock.
        now: i64,
        /// The allowed skew.
        leeway: u64,
    },
    /// The WIT has an `aud`: WIT-SVIDs carry none.
    #[error("claim `aud` is present: a WIT-SVID has no audience (it is not a bearer token)")]
    Audience,
    /// `cnf.jwk` is missing, private, or not a usable public key.
    #[error("claim `cnf.jwk`: {0}")]
    Confirmation(String),
    /// The proof of possession does not fit the WIT or the request.
    #[error("proof of possession: {0}")]
    Proof(String),
    /// A bundle document could not be used.
    #[error("invalid WIT bundle: {0}")]
    Bundle(String),
    /// Key generation or signing failed.
    #[error("crypto: {0}")]
    Crypto(String),
}

fn claim(claim: &'static str, reason: impl Into<String>) -> WitError {
    WitError::Claim {
        claim,
        reason: reason.into(),
    }
}

/// base64url (no padding) of SHA-256 of `data`: the `wth` of a WPT, and a
/// JWK thumbprint's encoding.
pub fn sha256_b64(data: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(ring::digest::digest(&ring::digest::SHA256, data))
}

// ---------------------------------------------------------------- keys

/// Checks a public JWK for `cnf.jwk` (or a WIT signing key) and returns
/// its canonical form: only `kty`, `crv`, `x`, `y` (EC) or `n`, `e` (RSA)
/// and `alg`, so nothing else a caller put in the object is ever signed.
/// `alg` must be present and one of [`ALLOWED_ALGS`], and fit the key:
/// ES256 with P-256, ES384 with P-384, RS*/PS* with RSA of 2048 bits or
/// more. Private members are refused.
pub fn public_cnf_jwk(jwk: &Value) -> Result<Value, WitError> {
    let bad = |m: String| WitError::Confirmation(m);
    let obj = jwk
        .as_object()
        .ok_or_else(|| bad("not a JSON object".into()))?;
    if let Some(m) = PRIVATE_MEMBERS.iter().find(|m| obj.contains_key(**m)) {
        return Err(bad(format!(
            "has the private member {m:?}: only a public key may be bound"
        )));
    }
    let text = |k: &str| -> Result<&str, WitError> {
        obj.get(k)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| bad(format!("member {k:?} is missing or not a string")))
    };
    let alg = text("alg")?;
    if !ALLOWED_ALGS.contains(&alg) {
        return Err(bad(format!(
            "`alg` {alg:?} is not allowed (allowed: {})",
            ALLOWED_ALGS.join(", ")
        )));
    }
    let b64 = |k: &str| -> Result<Vec<u8>, WitError> {
        URL_SAFE_NO_PAD
            .decode(text(k)?)
            .map_err(|e| bad(format!("member {k:?} is not base64url: {e}")))
    };
    match text("kty")? {
        "EC" => {
            let crv = text("crv")?;
            let (want_alg, n) = match crv {
                "P-256" => ("ES256", 32),
                "P-384" => ("ES384", 48),
                other => return Err(bad(format!("curve {other:?} is not supported"))),
            };
            if alg != want_alg {
                return Err(bad(format!("`alg` {alg:?} does not fit a {crv} key")));
            }
            let (x, y) = (b64("x")?, b64("y")?);
            if x.len() != n || y.len() != n {
                return Err(bad(format!("coordinates must be {n} bytes each for {crv}")));
            }
            let mut point = vec![4u8];
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            // A point off the curve is refused now, not at first use.
            if !point_on_curve(n, &point) {
                return Err(bad("the point is not on the curve".into()));
            }
            Ok(
                json!({"kty": "EC", "crv": crv, "x": URL_SAFE_NO_PAD.encode(x),
                "y": URL_SAFE_NO_PAD.encode(y), "alg": alg}),
            )
        }
        "RSA" => {
            if !(alg.starts_with("RS") || alg.starts_with("PS")) {
                return Err(bad(format!("`alg` {alg:?} does not fit an RSA key")));
            }
            let n = b64("n")?;
            let e = b64("e")?;
            let bits = n
                .iter()
                .position(|b| *b != 0)
                .map_or(0, |i| (n.len() - i) * 8);
            if bits < 2048 {
                return Err(bad(format!(
                    "RSA modulus of {bits} bits; at least 2048 are required"
                )));
            }
            if e.is_empty() || e.len() > 8 {
                return Err(bad("RSA exponent has the wrong size".into()));
            }
            Ok(json!({"kty": "RSA", "n": URL_SAFE_NO_PAD.encode(n),
                "e": URL_SAFE_NO_PAD.encode(e), "alg": alg}))
        }
        other => Err(bad(format!(
            "key type {other:?} is not supported (EC or RSA)"
        ))),
    }
}

/// Whether an uncompressed point is a valid public key of its curve:
/// ring validates the peer point of an ECDH agreement, so one ephemeral
/// agreement with it tells.
fn point_on_curve(n: usize, point: &[u8]) -> bool {
    use ring::agreement;
    let alg = if n == 32 {
        &agreement::ECDH_P256
    } else {
        &agreement::ECDH_P384
    };
    let rng = ring::rand::SystemRandom::new();
    let Ok(mine) = agreement::EphemeralPrivateKey::generate(alg, &rng) else {
        return false;
    };
    agreement::agree_ephemeral(mine, &agreement::UnparsedPublicKey::new(alg, point), |_| ()).is_ok()
}

/// The RFC 7638 SHA-256 thumbprint of a (canonical) public JWK: what the
/// audit trail records of the workload key a WIT-SVID binds.
pub fn jwk_thumbprint(jwk: &Value) -> String {
    let members: &[&str] = match jwk.get("kty").and_then(Value::as_str) {
        Some("EC") => &["crv", "kty", "x", "y"],
        Some("RSA") => &["e", "kty", "n"],
        _ => &[],
    };
    let mut m = Map::new();
    for k in members {
        if let Some(v) = jwk.get(*k) {
            m.insert((*k).to_string(), v.clone());
        }
    }
    // serde_json's Map keeps keys sorted (no `preserve_order`), as RFC
    // 7638 requires, and writes no whitespace.
    sha256_b64(Value::Object(m).to_string().as_bytes())
}

/// The fixed DER framing of a P-256 PKCS#8 v1 document as `ring` writes
/// it: this prefix, the 32-byte private scalar, [`P256_PKCS8_MIDDLE`],
/// then the uncompressed public point.
const P256_PKCS8_PREFIX: [u8; 36] = [
    0x30, 0x81, 0x87, 0x02, 0x01, 0x00, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02,
    0x01, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x04, 0x6d, 0x30, 0x6b, 0x02,
    0x01, 0x01, 0x04, 0x20,
];
const P256_PKCS8_MIDDLE: [u8; 5] = [0xa1, 0x44, 0x03, 0x42, 0x00];
const P256_PKCS8_LEN: usize = 36 + 32 + 5 + 65;

/// A workload's WIT key pair (ECDSA P-256, `ES256`): generated by the
/// agent for each WIT-SVID, handed to the workload as a private JWK.
/// `Debug` shows only the public key.
#[derive(Clone)]
pub struct WorkloadKey {
    pkcs8: Vec<u8>,
    public_jwk: Value,
}

impl std::fmt::Debug for WorkloadKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadKey")
            .field("public_jwk", &self.public_jwk)
            .finish_non_exhaustive()
    }
}

impl WorkloadKey {
    /// A fresh P-256 key pair.
    pub fn generate() -> Result<Self, WitError> {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &rng,
        )
        .map_err(|_| WitError::Crypto("key generation failed".into()))?;
        Self::from_pkcs8(pkcs8.as_ref().to_vec())
    }

    fn from_pkcs8(pkcs8: Vec<u8>) -> Result<Self, WitError> {
        use ring::signature::KeyPair;
        if pkcs8.len() != P256_PKCS8_LEN
            || pkcs8[..36] != P256_PKCS8_PREFIX
            || pkcs8[68..73] != P256_PKCS8_MIDDLE
        {
            return Err(WitError::Crypto("unexpected P-256 PKCS#8 layout".into()));
        }
        let kp = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &pkcs8,
            &ring::rand::SystemRandom::new(),
        )
        .map_err(|e| WitError::Crypto(format!("invalid P-256 key: {e}")))?;
        let point = kp.public_key().as_ref();
        if point.len() != 65 {
            return Err(WitError::Crypto("unexpected public key size".into()));
        }
        let public_jwk = json!({
            "kty": "EC",
            "crv": "P-256",
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&point[33..]),
            "alg": "ES256",
        });
        Ok(Self { pkcs8, public_jwk })
    }

    /// The public key as the WIT's `cnf.jwk` (`kty`, `crv`, `x`, `y`, `alg`).
    pub fn public_jwk(&self) -> &Value {
        &self.public_jwk
    }

    /// The key pair as a private JWK (RFC 7517/7518: the public members
    /// plus `d`): the Workload API's `wit_svid_key`. A secret: never log it.
    pub fn private_jwk(&self) -> String {
        let mut jwk = self.public_jwk.clone();
        jwk["d"] = json!(URL_SAFE_NO_PAD.encode(&self.pkcs8[36..68]));
        jwk.to_string()
    }

    /// The key pair as PKCS#8 DER (the form `JwtSigner::from_pkcs8` loads).
    /// A secret: never log it.
    pub fn pkcs8(&self) -> &[u8] {
        &self.pkcs8
    }

    /// Loads a private JWK as [`WorkloadKey::private_jwk`] writes it (what a
    /// workload received over the Workload API). The public members must
    /// match the private key.
    pub fn from_private_jwk(text: &str) -> Result<Self, WitError> {
        let bad = |m: &str| WitError::Crypto(format!("private JWK: {m}"));
        let v: Value = serde_json::from_str(text).map_err(|_| bad("not JSON"))?;
        let get = |k: &str| v.get(k).and_then(Value::as_str);
        if get("kty") != Some("EC") || get("crv") != Some("P-256") {
            return Err(bad("only EC P-256 keys are supported"));
        }
        let dec = |k: &str| {
            get(k)
                .and_then(|s| URL_SAFE_NO_PAD.decode(s).ok())
                .filter(|b| b.len() == 32)
                .ok_or_else(|| bad("`d`, `x` and `y` must be 32 bytes of base64url"))
        };
        let (d, x, y) = (dec("d")?, dec("x")?, dec("y")?);
        let mut pkcs8 = Vec::with_capacity(P256_PKCS8_LEN);
        pkcs8.extend_from_slice(&P256_PKCS8_PREFIX);
        pkcs8.extend_from_slice(&d);
        pkcs8.extend_from_slice(&P256_PKCS8_MIDDLE);
        pkcs8.push(4);
        pkcs8.extend_from_slice(&x);
        pkcs8.extend_from_slice(&y);
        // ring refuses a public point that is not the private key's.
        Self::from_pkcs8(pkcs8).map_err(|_| bad("the public key does not match `d`"))
    }

    /// Signs a Workload Proof Token for presenting `wit` to `audience` (the
    /// target URI), valid `ttl` from `now`, with a fresh random `jti`.
    /// `txn_token`, if given, is bound with `tth`.
    pub fn sign_wpt(
        &self,
        wit: &str,
        audience: &str,
        ttl: Duration,
        now: i64,
        txn_token: Option<&str>,
    ) -> Result<String, WitError> {
        let mut claims = json!({
            "aud": audience,
            "exp": now + ttl.as_secs() as i64,
            "iat": now,
            "jti": URL_SAFE_NO_PAD.encode(crate::ids::random_bytes::<16>()),
            "wth": sha256_b64(wit.as_bytes()),
        });
        if let Some(t) = txn_token {
            claims["tth"] = json!(sha256_b64(t.as_bytes()));
        }
        let mut header = Header::new(Algorithm::ES256);
        header.typ = Some(WPT_TYP.into());
        jsonwebtoken::encode(&header, &claims, &EncodingKey::from_ec_der(&self.pkcs8))
            .map_err(|e| WitError::Crypto(e.to_string()))
    }
}

// ------------------------------------------------------------- issuing

/// A WIT-SVID as [`sign_wit`] issued it.
#[derive(Debug, Clone)]
pub struct SignedWit {
    /// The compact JWS.
    pub token: String,
    /// Its `jti`: 128 random bits, lowercase hex.
    pub jti: String,
    /// Its `exp`, Unix seconds.
    pub expires_at: i64,
}

/// Marks a JWT signing key as a WIT-SVID authority: its public JWK says
/// `use: wit-svid`, and only such a key signs WITs ([`sign_wit`]).
pub fn into_wit_authority(mut signer: JwtSigner) -> JwtSigner {
    signer.public_jwk["use"] = json!(WIT_USE);
    signer
}

/// Signs a WIT-SVID for `sub` binding `cnf_jwk` (checked and reduced to
/// its public members by [`public_cnf_jwk`]), valid `ttl` from `now` but
/// never past the key's own expiry. `signer` must be a WIT-SVID authority
/// ([`into_wit_authority`]): a JWT-SVID key is refused, so no key ever
/// signs both kinds.
pub fn sign_wit(
    signer: &JwtSigner,
    sub: &SpiffeId,
    cnf_jwk: &Value,
    ttl: Duration,
    now: i64,
) -> Result<SignedWit, WitError> {
    if signer.public_jwk.get("use").and_then(Value::as_str) != Some(WIT_USE) {
        return Err(WitError::Crypto(
            "this key is not a WIT-SVID authority (use wit-svid)".into(),
        ));
    }
    let jwk = public_cnf_jwk(cnf_jwk)?;
    let exp = (now + ttl.as_secs() as i64).min(signer.not_after);
    let jti = hex::encode(crate::ids::random_bytes::<16>());
    let claims = json!({
        "sub": sub.to_string(),
        "exp": exp,
        "iat": now,
        "nbf": now,
        "jti": jti,
        "cnf": {"jwk": jwk},
    });
    let Value::Object(claims) = claims else {
        return Err(WitError::Crypto("claims are not an object".into()));
    };
    let token = signer
        .sign_typed(WIT_TYP, &claims)
        .map_err(|e| WitError::Crypto(e.to_string()))?;
    Ok(SignedWit {
        token,
        jti,
        expires_at: exp,
    })
}

// ------------------------------------------------------------- bundles

/// The WIT-SVID authorities of one trust domain, by key ID: only the keys
/// of a JWKS (or of a whole SPIFFE bundle) whose `use` is `wit-svid`.
#[derive(Debug, Clone, Default)]
pub struct WitBundle {
    keys: HashMap<String, Jwk>,
}

impl WitBundle {
    /// Parses a JWKS or SPIFFE bundle document and keeps its `use:
    /// wit-svid` keys. Such a key without `kid`, with a duplicate `kid`,
    /// symmetric or private, is refused.
    pub fn from_jwks(doc: &[u8]) -> Result<Self, WitError> {
        let bad = |m: String| WitError::Bundle(m);
        let v: Value = serde_json::from_slice(doc).map_err(|e| bad(e.to_string()))?;
        let list = v
            .get("keys")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("missing \"keys\" array".into()))?;
        let mut keys = HashMap::new();
        for k in list {
            if k.get("use").and_then(Value::as_str) != Some(WIT_USE) {
                continue;
            }
            let kid = k
                .get("kid")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .ok_or_else(|| bad("a wit-svid key has no kid".into()))?;
            if let Some(m) = PRIVATE_MEMBERS
                .iter()
                .find(|m| k.as_object().is_some_and(|o| o.contains_key(**m)))
            {
                return Err(bad(format!(
                    "wit-svid key {kid:?} has the private or secret member {m:?}"
                )));
            }
            let jwk: Jwk = serde_json::from_value(k.clone())
                .map_err(|e| bad(format!("wit-svid key {kid:?}: {e}")))?;
            if !matches!(
                jwk.algorithm,
                AlgorithmParameters::EllipticCurve(_) | AlgorithmParameters::RSA(_)
            ) {
                return Err(bad(format!(
                    "wit-svid key {kid:?} is not an EC or RSA public key"
                )));
            }
            if keys.insert(kid.to_string(), jwk).is_some() {
                return Err(bad(format!("two wit-svid keys have the kid {kid:?}")));
            }
        }
        Ok(Self { keys })
    }

    /// Whether an authority has key ID `kid`.
    pub fn has_key(&self, kid: &str) -> bool {
        self.keys.contains_key(kid)
    }

    /// Number of authorities.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True when the trust domain has no WIT-SVID authority (it does not
    /// support WIT-SVIDs).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

// ---------------------------------------------------------- verifying

/// A WIT-SVID that [`verify_wit`] accepted. It is *not yet* an
/// authenticated caller: that takes [`verify_wpt`] as well.
#[derive(Debug, Clone)]
pub struct VerifiedWit {
    /// The `sub`.
    pub spiffe_id: SpiffeId,
    /// The `jti`, if any.
    pub jti: Option<String>,
    /// The `exp`.
    pub expires_at: i64,
    /// The bound public key (canonical form, see [`public_cnf_jwk`]).
    pub cnf_jwk: Value,
    /// `cnf.jwk.alg`: the algorithm every proof must use.
    pub cnf_alg: String,
    /// All claims.
    pub claims: Map<String, Value>,
    /// The token as presented (its hash is a WPT's `wth`).
    pub token: String,
}

/// The three parts of a compact JWS, header and claims decoded.
struct Parts<'a> {
    header: Map<String, Value>,
    claims: Map<String, Value>,
    signing_input: &'a str,
    signature: &'a str,
}

fn split(token: &str) -> Result<Parts<'_>, WitError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(WitError::TooLong {
            len: token.len(),
            max: MAX_TOKEN_LEN,
        });
    }
    let mut it = token.split('.');
    let (Some(h), Some(c), Some(s), None) = (it.next(), it.next(), it.next(), it.next()) else {
        return Err(WitError::Malformed(
            "expected three dot-separated parts".into(),
        ));
    };
    let object = |part: &str, what: &str| -> Result<Map<String, Value>, WitError> {
        let bytes = URL_SAFE_NO_PAD
            .decode(part)
            .map_err(|e| WitError::Malformed(format!("{what} is not base64url: {e}")))?;
        match serde_json::from_slice(&bytes) {
            Ok(Value::Object(m)) => Ok(m),
            _ => Err(WitError::Malformed(format!("{what} is not a JSON object"))),
        }
    };
    let header = object(h, "header")?;
    let claims = object(c, "claims")?;
    if s.is_empty() {
        return Err(WitError::Malformed("the signature is empty".into()));
    }
    Ok(Parts {
        header,
        claims,
        signing_input: &token[..h.len() + 1 + c.len()],
        signature: s,
    })
}

/// Whether a `typ` value names `expected` (media types compare without
/// case; `application/` may be written out).
fn typ_is(found: Option<&str>, expected: &str) -> bool {
    found.is_some_and(|t| {
        let t = t.to_ascii_lowercase();
        t == expected || t.strip_prefix("application/") == Some(expected)
    })
}

/// Checks `alg` against [`ALLOWED_ALGS`], `typ` against `expected`, and
/// refuses `crit`.
fn check_header(h: &Map<String, Value>, expected: &'static str) -> Result<Algorithm, WitError> {
    let alg = h.get("alg").and_then(Value::as_str).unwrap_or_default();
    if !ALLOWED_ALGS.contains(&alg) {
        return Err(WitError::Algorithm(alg.to_string()));
    }
    let typ = h.get("typ").and_then(Value::as_str);
    if !typ_is(typ, expected) {
        return Err(WitError::Type {
            found: typ.map(String::from),
            expected,
        });
    }
    if h.contains_key("crit") {
        return Err(WitError::Critical);
    }
    Algorithm::from_str(alg).map_err(|_| WitError::Algorithm(alg.to_string()))
}

/// Whether a bundle key can verify `alg` (EC curve fits, RSA for RS/PS),
/// and its own `alg`, if it states one, is that one.
fn key_fits(jwk: &Jwk, alg: Algorithm) -> bool {
    if let Some(ka) = &jwk.common.key_algorithm
        && format!("{ka:?}") != format!("{alg:?}")
    {
        return false;
    }
    match &jwk.algorithm {
        AlgorithmParameters::EllipticCurve(ec) => matches!(
            (&ec.curve, alg),
            (EllipticCurve::P256, Algorithm::ES256) | (EllipticCurve::P384, Algorithm::ES384)
        ),
        AlgorithmParameters::RSA(_) => matches!(
            alg,
            Algorithm::RS256
                | Algorithm::RS384
                | Algorithm::RS512
                | Algorithm::PS256
                | Algorithm::PS384
                | Algorithm::PS512
        ),
        _ => false,
    }
}

fn verify_signature(parts: &Parts<'_>, jwk: &Jwk, alg: Algorithm) -> Result<(), WitError> {
    let key = DecodingKey::from_jwk(jwk).map_err(|_| WitError::Signature)?;
    match jsonwebtoken::crypto::verify(parts.signature, parts.signing_input.as_bytes(), &key, alg) {
        Ok(true) => Ok(()),
        _ => Err(WitError::Signature),
    }
}

fn int_claim(c: &Map<String, Value>, name: &'static str) -> Result<Option<i64>, WitError> {
    match c.get(name) {
        None => Ok(None),
        Some(v) => v
            .as_i64()
            .map(Some)
            .ok_or_else(|| claim(name, "must be an integer (NumericDate)")),
    }
}

fn check_times(
    c: &Map<String, Value>,
    now: i64,
    leeway: u64,
    require_exp: bool,
) -> Result<Option<i64>, WitError> {
    let l = leeway as i64;
    let exp = int_claim(c, "exp")?;
    if require_exp && exp.is_none() {
        return Err(claim("exp", "is missing"));
    }
    if let Some(exp) = exp
        && exp.saturating_add(l) <= now
    {
        return Err(WitError::Expired { exp, now, leeway });
    }
    for name in ["nbf", "iat"] {
        if let Some(at) = int_claim(c, name)?
            && at > now.saturating_add(l)
        {
            return Err(WitError::NotYetValid {
                claim: name,
                at,
                now,
                leeway,
            });
        }
    }
    Ok(exp)
}

/// Verifies a WIT-SVID against the WIT bundles of `bundles` (trust domain
/// → its `use: wit-svid` keys), with `leeway` seconds of clock skew:
///
/// - header: `alg` in [`ALLOWED_ALGS`], `typ` `wit+jwt`, `kid` present,
///   no `crit`;
/// - `sub` a SPIFFE ID; the key is looked up by `kid` among the WIT-SVID
///   keys of *its* trust domain only (a JWT-SVID key never verifies a WIT),
///   must fit `alg`, and must verify the signature;
/// - `exp` present and not passed, `nbf` and `iat` (if present) not in
///   the future, no `aud`, `jti` (if present) a string;
/// - `cnf.jwk` a well-formed public key whose `alg` is allowed
///   ([`public_cnf_jwk`]).
///
/// The result still needs a proof of possession ([`verify_wpt`]).
pub fn verify_wit(
    token: &str,
    bundles: &BTreeMap<TrustDomain, WitBundle>,
    now: i64,
    leeway: u64,
) -> Result<VerifiedWit, WitError> {
    let parts = split(token)?;
    let alg = check_header(&parts.header, WIT_TYP)?;
    let kid = parts
        .header
        .get("kid")
        .and_then(Value::as_str)
        .filter(|k| !k.is_empty())
        .ok_or(WitError::MissingKid)?;
    let sub = parts
        .claims
        .get("sub")
        .and_then(Value::as_str)
        .ok_or_else(|| claim("sub", "is missing or not a string"))?;
    let spiffe_id = crate::ids::parse_spiffe_id(sub)
        .map_err(|e| claim("sub", format!("not a SPIFFE ID: {e}")))?;
    let td =
        TrustDomain::new(spiffe_id.trust_domain_name()).map_err(|e| claim("sub", e.to_string()))?;
    let unknown = || WitError::UnknownKey {
        td: td.to_string(),
        kid: kid.to_string(),
    };
    let jwk = bundles
        .get(&td)
        .and_then(|b| b.keys.get(kid))
        .ok_or_else(unknown)?;
    if !key_fits(jwk, alg) {
        return Err(WitError::Algorithm(format!(
            "{alg:?} (key {kid:?} cannot verify it)"
        )));
    }
    verify_signature(&parts, jwk, alg)?;
    // Signed by the trust domain's WIT authority: now the claims.
    let c = &parts.claims;
    let exp = check_times(c, now, leeway, true)?.unwrap_or_default();
    if c.contains_key("aud") {
        return Err(WitError::Audience);
    }
    let jti = match c.get("jti") {
        None => None,
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(_) => return Err(claim("jti", "must be a non-empty string")),
    };
    let cnf = c
        .get("cnf")
        .and_then(|v| v.get("jwk"))
        .ok_or_else(|| WitError::Confirmation("is missing".into()))?;
    let cnf_jwk = public_cnf_jwk(cnf)?;
    let cnf_alg = cnf_jwk["alg"].as_str().unwrap_or_default().to_string();
    Ok(VerifiedWit {
        spiffe_id,
        jti,
        expires_at: exp,
        cnf_jwk,
        cnf_alg,
        claims: parts.claims.clone(),
        token: token.to_string(),
    })
}

/// What the recipient of a request expects of its WPT.
#[derive(Debug, Clone)]
pub struct WptCheck<'a> {
    /// The request's target URI without query or fragment (or the alias the
    /// deployment agreed on): the WPT's `aud` must be it.
    pub audience: &'a str,
    /// The verifier's clock, Unix seconds.
    pub now: i64,
    /// Allowed clock skew, seconds.
    pub leeway: u64,
    /// Longest lifetime accepted: a WPT whose `exp` is further than this
    /// from `now` is refused.
    pub max_lifetime: Duration,
    /// The request's Txn-Token, if it carried one: the WPT must bind it
    /// with `tth`. Without one, a WPT with `tth` is refused.
    pub txn_token: Option<&'a str>,
}

/// A proof of possession that [`verify_wpt`] accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedWpt {
    /// Its `jti`: remember it until `expires_at` to refuse a replay.
    pub jti: String,
    /// Its `exp`.
    pub expires_at: i64,
}

/// Verifies a Workload Proof Token for `wit` (already verified with
/// [`verify_wit`]): `typ` `wpt+jwt`, `alg` string-equal to `cnf.jwk.alg`,
/// no `crit`, a signature by the `cnf` key, `aud` equal to
/// `check.audience` (or an array holding it), `exp` present, not passed
/// and at most `check.max_lifetime` ahead, `jti` present, `wth` the hash
/// of this very WIT, `tth` matching the Txn-Token if there is one, and no
/// `oth` (no other token binding is understood here, and the draft
/// requires refusing entries that are not).
pub fn verify_wpt(
    wpt: &str,
    wit: &VerifiedWit,
    check: &WptCheck<'_>,
) -> Result<VerifiedWpt, WitError> {
    let proof = |m: String| WitError::Proof(m);
    let parts = split(wpt)?;
    let alg = check_header(&parts.header, WPT_TYP)?;
    let header_alg = parts
        .header
        .get("alg")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if header_alg != wit.cnf_alg {
        return Err(proof(format!(
            "header `alg` {header_alg:?} is not the WIT's cnf.jwk.alg {:?}",
            wit.cnf_alg
        )));
    }
    let jwk: Jwk = serde_json::from_value(wit.cnf_jwk.clone())
        .map_err(|e| WitError::Confirmation(e.to_string()))?;
    verify_signature(&parts, &jwk, alg)
        .map_err(|_| proof("signature does not verify with the WIT's cnf key".into()))?;
    let c = &parts.claims;
    let exp = check_times(c, check.now, check.leeway, true)?.unwrap_or_default();
    let max = check.max_lifetime.as_secs() as i64 + check.leeway as i64;
    if exp - check.now > max {
        return Err(claim(
            "exp",
            format!(
                "{}s ahead; a proof lives at most {}s",
                exp - check.now,
                check.max_lifetime.as_secs()
            ),
        ));
    }
    let aud_ok = match c.get("aud") {
        Some(Value::String(a)) => a == check.audience,
        Some(Value::Array(a)) => a.iter().any(|v| v.as_str() == Some(check.audience)),
        _ => return Err(claim("aud", "is missing")),
    };
    if !aud_ok {
        return Err(claim(
            "aud",
            format!("does not name this recipient ({:?})", check.audience),
        ));
    }
    let jti = c
        .get("jti")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| claim("jti", "is missing or empty"))?
        .to_string();
    match c.get("wth").and_then(Value::as_str) {
        None => return Err(claim("wth", "is missing")),
        Some(h) if h != sha256_b64(wit.token.as_bytes()) => {
            return Err(claim("wth", "is not the hash of the presented WIT"));
        }
        Some(_) => {}
    }
    match (c.get("tth"), check.txn_token) {
        (None, None) => {}
        (Some(h), Some(t)) if h.as_str() == Some(sha256_b64(t.as_bytes()).as_str()) => {}
        (Some(_), Some(_)) => return Err(claim("tth", "is not the hash of the Txn-Token")),
        (None, Some(_)) => {
            return Err(claim("tth", "is missing but the request has a Txn-Token"));
        }
        (Some(_), None) => {
            return Err(claim("tth", "is present but the request has no Txn-Token"));
        }
    }
    if c.contains_key("oth") {
        return Err(claim(
            "oth",
            "binds other tokens, which this recipient does not understand",
        ));
    }
    Ok(VerifiedWpt {
        jti,
        expires_at: exp,
    })
}

/// The trust domain a WIT claims (unverified), to pick its bundle.
pub fn peek_trust_domain(token: &str) -> Result<TrustDomain, WitError> {
    let parts = split(token)?;
    let sub = parts
        .claims
        .get("sub")
        .and_then(Value::as_str)
        .ok_or_else(|| claim("sub", "is missing"))?;
    let id = crate::ids::parse_spiffe_id(sub).map_err(|e| claim("sub", e.to_string()))?;
    TrustDomain::new(id.trust_domain_name()).map_err(|e| claim("sub", e.to_string()))
}

/// Whether a JWK's `use` is `wit-svid`.
pub fn is_wit_authority(jwk: &Jwk) -> bool {
    matches!(&jwk.common.public_key_use, Some(PublicKeyUse::Other(u)) if u == WIT_USE)
}

#[cfg(test)]
mod tests;
