//! JWT-SVIDs (spiffe/spiffe `standards/JWT-SVID.md`): signing with the
//! server's key, JWKS encoding of JWT authorities, and validation against a
//! trust domain's JWT bundle. Only asymmetric algorithms exist here: `none`
//! and HMAC can neither be produced nor accepted.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::Serialize;
use serde_json::{Value, json};
use spiffe::{SpiffeId, TrustDomain};

use crate::signer::{ExternalKey, P256_LEN, check_p256_point};

/// A JWT operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JwtError {
    /// The token is not a well-formed JWS.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// The header names an algorithm JWT-SVIDs may not use.
    #[error(
        "unsupported algorithm {0:?} (allowed: ES256, ES384, RS256, RS384, RS512, PS256, PS384, PS512)"
    )]
    Algorithm(String),
    /// The `sub` claim is missing or not a SPIFFE ID.
    #[error("invalid subject: {0}")]
    Subject(String),
    /// No bundle for the token's trust domain, or no key with its `kid`.
    #[error("no JWT authority with key ID {kid:?} for trust domain {td}")]
    UnknownKey {
        /// The token's trust domain.
        td: String,
        /// The header's `kid`.
        kid: String,
    },
    /// Signature, expiry or audience did not check out.
    #[error("token rejected: {0}")]
    Rejected(String),
    /// A JWKS document could not be parsed.
    #[error("invalid JWT bundle: {0}")]
    Bundle(String),
    /// Key handling failed.
    #[error("crypto: {0}")]
    Crypto(String),
}

/// Most audiences one JWT-SVID may carry.
pub const MAX_AUDIENCES: usize = 16;
/// Longest audience value, in bytes (the longest SPIFFE ID, since an
/// audience is often one).
pub const MAX_AUDIENCE_LEN: usize = 2048;

/// A requested audience list that Sigil will not sign or cache.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AudienceError {
    /// No audience at all, or only empty strings.
    #[error("invalid field `audience`: at least one non-empty audience is required")]
    Missing,
    /// More than [`MAX_AUDIENCES`] values.
    #[error("invalid field `audience`: {count} values, at most {max} are allowed")]
    TooMany {
        /// Values given.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// One value is longer than [`MAX_AUDIENCE_LEN`] bytes.
    #[error("invalid field `audience`: value #{index} is {len} bytes, at most {max} are allowed")]
    TooLong {
        /// Position of the value (from 1).
        index: usize,
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// One value is empty.
    #[error("invalid field `audience`: value #{index} is empty")]
    Empty {
        /// Position of the value (from 1).
        index: usize,
    },
}

/// Checks a requested audience list against the bounds every JWT-SVID
/// request must meet (server and agent alike): 1 to [`MAX_AUDIENCES`]
/// non-empty values of at most [`MAX_AUDIENCE_LEN`] bytes each.
pub fn check_audiences(audience: &[String]) -> Result<(), AudienceError> {
    if audience.is_empty() {
        return Err(AudienceError::Missing);
    }
    if audience.len() > MAX_AUDIENCES {
        return Err(AudienceError::TooMany {
            count: audience.len(),
            max: MAX_AUDIENCES,
        });
    }
    for (i, a) in audience.iter().enumerate() {
        if a.is_empty() {
            return Err(AudienceError::Empty { index: i + 1 });
        }
        if a.len() > MAX_AUDIENCE_LEN {
            return Err(AudienceError::TooLong {
                index: i + 1,
                len: a.len(),
                max: MAX_AUDIENCE_LEN,
            });
        }
    }
    Ok(())
}

const ALLOWED: &[Algorithm] = &[
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
];

/// The claims of a JWT-SVID as Sigil issues them.
#[derive(Debug, Serialize)]
struct Claims<'a> {
    sub: &'a str,
    aud: &'a [String],
    exp: i64,
    iat: i64,
    /// 128 random bits, lowercase hex: names this token in the audit trail.
    jti: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
    /// Context claims (the entry's static claims, its owner, attestation
    /// facts); they never replace the registered claims above.
    #[serde(flatten)]
    extra: &'a serde_json::Map<String, Value>,
}

/// A JWT-SVID as [`JwtSigner::sign`] issued it.
#[derive(Debug, Clone)]
pub struct SignedJwt {
    /// The compact JWS.
    pub token: String,
    /// Its `jti` claim: 128 random bits, lowercase hex.
    pub jti: String,
    /// Its `exp` claim, Unix seconds.
    pub expires_at: i64,
}

/// The key types a JWT signing key may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum JwtKeyType {
    /// ECDSA P-256, signs `ES256` (the default).
    #[default]
    EcP256,
    /// ECDSA P-384, signs `ES384`.
    EcP384,
    /// RSA 2048, signs `RS256`.
    Rsa2048,
}

impl JwtKeyType {
    /// Parses the config spelling (`ec-p256`, `ec-p384`).
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "ec-p256" => Ok(Self::EcP256),
            "ec-p384" => Ok(Self::EcP384),
            "rsa-2048" => Ok(Self::Rsa2048),
            other => Err(format!(
                "unknown key type {other:?} (expected ec-p256, ec-p384 or rsa-2048)"
            )),
        }
    }

    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EcP256 => "ec-p256",
            Self::EcP384 => "ec-p384",
            Self::Rsa2048 => "rsa-2048",
        }
    }

    fn ec(
        self,
    ) -> Option<(
        &'static ring::signature::EcdsaSigningAlgorithm,
        &'static str,
        usize,
    )> {
        match self {
            Self::EcP256 => Some((
                &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                "P-256",
                32,
            )),
            Self::EcP384 => Some((
                &ring::signature::ECDSA_P384_SHA384_FIXED_SIGNING,
                "P-384",
                48,
            )),
            Self::Rsa2048 => None,
        }
    }

    fn jose_alg(self) -> Algorithm {
        match self {
            Self::EcP256 => Algorithm::ES256,
            Self::EcP384 => Algorithm::ES384,
            Self::Rsa2048 => Algorithm::RS256,
        }
    }
}

/// What a [`JwtSigner`] signs with.
#[derive(Clone)]
enum JwsKey {
    /// An EC key in process, signing with ring (the library the CA signs
    /// with; jsonwebtoken's pure-Rust ECDSA took about ten times longer per
    /// token).
    Ec(Arc<ring::signature::EcdsaKeyPair>),
    /// An RSA key in process, through jsonwebtoken.
    Rsa(EncodingKey),
    /// Outside the process (`ES256` only).
    External(Arc<dyn ExternalKey>),
}

/// A JWT signing key.
#[derive(Clone)]
pub struct JwtSigner {
    /// Key ID published in the bundle and put in every token header.
    pub kid: String,
    /// The key type (and so the `alg`).
    pub key_type: JwtKeyType,
    /// Empty for an external key.
    pkcs8: Vec<u8>,
    /// What signs: jsonwebtoken's key (PKCS#8 for EC, PKCS#1 for RSA) or
    /// an external one.
    key: JwsKey,
    /// The public key as a JWK (`kty`, `crv`, `x`, `y`, `kid`, `use`).
    pub public_jwk: Value,
    /// Unix seconds after which the key signs nothing and is unpublished.
    pub not_after: i64,
}

impl std::fmt::Debug for JwtSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtSigner")
            .field("kid", &self.kid)
            .field("key_type", &self.key_type)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl JwtSigner {
    /// A fresh key of `key_type` with a random `kid`.
    pub fn generate(key_type: JwtKeyType, not_after: i64) -> Result<Self, JwtError> {
        let pkcs8 = match key_type.ec() {
            Some((alg, _, _)) => {
                let rng = ring::rand::SystemRandom::new();
                ring::signature::EcdsaKeyPair::generate_pkcs8(alg, &rng)
                    .map_err(|_| JwtError::Crypto("key generation failed".into()))?
                    .as_ref()
                    .to_vec()
            }
            None => {
                use rsa::pkcs8::EncodePrivateKey;
                let key = rsa::RsaPrivateKey::new(&mut rand_core::OsRng, 2048)
                    .map_err(|e| JwtError::Crypto(e.to_string()))?;
                key.to_pkcs8_der()
                    .map_err(|e| JwtError::Crypto(e.to_string()))?
                    .as_bytes()
                    .to_vec()
            }
        };
        let kid = URL_SAFE_NO_PAD.encode(crate::ids::random_bytes::<18>());
        Self::from_pkcs8(kid, key_type, pkcs8, not_after)
    }

    /// Loads a stored key.
    pub fn from_pkcs8(
        kid: String,
        key_type: JwtKeyType,
        pkcs8: Vec<u8>,
        not_after: i64,
    ) -> Result<Self, JwtError> {
        let (mut public_jwk, key) = match key_type.ec() {
            Some((alg, crv, n)) => {
                use ring::signature::KeyPair;
                let rng = ring::rand::SystemRandom::new();
                let kp = ring::signature::EcdsaKeyPair::from_pkcs8(alg, &pkcs8, &rng)
                    .map_err(|e| JwtError::Crypto(format!("bad JWT key: {e}")))?;
                let point = kp.public_key().as_ref();
                if point.len() != 1 + 2 * n {
                    return Err(JwtError::Crypto("unexpected public key size".into()));
                }
                let jwk = json!({
                    "kty": "EC",
                    "crv": crv,
                    "x": URL_SAFE_NO_PAD.encode(&point[1..1 + n]),
                    "y": URL_SAFE_NO_PAD.encode(&point[1 + n..]),
                });
                (jwk, JwsKey::Ec(Arc::new(kp)))
            }
            None => {
                use rsa::pkcs1::EncodeRsaPrivateKey;
                use rsa::pkcs8::DecodePrivateKey;
                use rsa::traits::PublicKeyParts;
                let key = rsa::RsaPrivateKey::from_pkcs8_der(&pkcs8)
                    .map_err(|e| JwtError::Crypto(format!("bad JWT key: {e}")))?;
                let jwk = json!({
                    "kty": "RSA",
                    "n": URL_SAFE_NO_PAD.encode(key.n().to_bytes_be()),
                    "e": URL_SAFE_NO_PAD.encode(key.e().to_bytes_be()),
                });
                let pkcs1 = key
                    .to_pkcs1_der()
                    .map_err(|e| JwtError::Crypto(e.to_string()))?;
                (
                    jwk,
                    JwsKey::Rsa(EncodingKey::from_rsa_der(pkcs1.as_bytes())),
                )
            }
        };
        public_jwk["kid"] = json!(kid);
        public_jwk["use"] = json!("jwt-svid");
        Ok(Self {
            kid,
            key_type,
            pkcs8,
            key,
            public_jwk,
            not_after,
        })
    }

    /// An `ES256` key held outside the process (a PKCS#11 token), with
    /// key ID `kid`.
    pub fn from_external(
        kid: String,
        key: Arc<dyn ExternalKey>,
        not_after: i64,
    ) -> Result<Self, JwtError> {
        let point = key.public_point();
        check_p256_point(point).map_err(JwtError::Crypto)?;
        let n = P256_LEN;
        let public_jwk = json!({
            "kty": "EC",
            "crv": "P-256",
            "x": URL_SAFE_NO_PAD.encode(&point[1..1 + n]),
            "y": URL_SAFE_NO_PAD.encode(&point[1 + n..]),
            "kid": kid,
            "use": "jwt-svid",
        });
        Ok(Self {
            kid,
            key_type: JwtKeyType::EcP256,
            pkcs8: Vec::new(),
            key: JwsKey::External(key),
            public_jwk,
            not_after,
        })
    }

    /// The external key this signer signs with, if it has one.
    pub fn external_key(&self) -> Option<&Arc<dyn ExternalKey>> {
        match &self.key {
            JwsKey::Ec(_) | JwsKey::Rsa(_) => None,
            JwsKey::External(k) => Some(k),
        }
    }

    /// The compact JWS of `header` and `claims`, signed with this key.
    fn encode<T: Serialize>(&self, header: &Header, claims: &T) -> Result<String, JwtError> {
        if let JwsKey::Rsa(k) = &self.key {
            return jsonwebtoken::encode(header, claims, k)
                .map_err(|e| JwtError::Crypto(e.to_string()));
        }
        if header.alg != self.key_type.jose_alg() {
            return Err(JwtError::Algorithm(format!("{:?}", header.alg)));
        }
        // The compact serialization (RFC 7515 §7.1), as jsonwebtoken writes
        // it: BASE64URL(header) '.' BASE64URL(claims) '.' BASE64URL(sig),
        // the signature over the first two parts, `r || s` (RFC 7518 §3.4).
        let part = |v: Result<Vec<u8>, serde_json::Error>| {
            v.map(|b| URL_SAFE_NO_PAD.encode(b))
                .map_err(|e| JwtError::Malformed(e.to_string()))
        };
        let mut token = part(serde_json::to_vec(header))?;
        token.push('.');
        token.push_str(&part(serde_json::to_vec(claims))?);
        let sig = match &self.key {
            JwsKey::Ec(kp) => URL_SAFE_NO_PAD.encode(
                kp.sign(&ring::rand::SystemRandom::new(), token.as_bytes())
                    .map_err(|_| JwtError::Crypto("signing failed".into()))?,
            ),
            JwsKey::External(k) => URL_SAFE_NO_PAD.encode(
                k.sign_p256_sha256(token.as_bytes())
                    .map_err(|e| JwtError::Crypto(e.to_string()))?,
            ),
            JwsKey::Rsa(_) => return Err(JwtError::Algorithm("RS256".into())),
        };
        token.push('.');
        token.push_str(&sig);
        Ok(token)
    }

    /// The private key (PKCS#8 DER), for persistence; empty for an
    /// external key.
    pub fn pkcs8(&self) -> &[u8] {
        &self.pkcs8
    }

    /// Signs a JWT-SVID for `sub` and `audience`, valid for `ttl` but never
    /// past this key's own expiry; `issuer` becomes the `iss` claim if given.
    pub fn sign(
        &self,
        sub: &SpiffeId,
        audience: &[String],
        ttl: Duration,
        now: i64,
        issuer: Option<&str>,
    ) -> Result<SignedJwt, JwtError> {
        self.sign_with_claims(sub, audience, ttl, now, issuer, &serde_json::Map::new())
    }

    /// [`JwtSigner::sign`] with additional claims. A claim in `extra` that
    /// names a registered claim (`sub`, `aud`, `exp`, `iat`, `jti`, `iss`,
    /// `nbf`, `act`) is refused rather than emitted twice.
    pub fn sign_with_claims(
        &self,
        sub: &SpiffeId,
        audience: &[String],
        ttl: Duration,
        now: i64,
        issuer: Option<&str>,
        extra: &serde_json::Map<String, Value>,
    ) -> Result<SignedJwt, JwtError> {
        if let Some(k) = extra
            .keys()
            .find(|k| crate::entry::RESERVED_JWT_CLAIMS.contains(&k.as_str()))
        {
            return Err(JwtError::Malformed(format!(
                "claim {k:?} is reserved and set by the signer"
            )));
        }
        if audience.is_empty() || audience.iter().any(String::is_empty) {
            return Err(JwtError::Malformed("audience must be non-empty".into()));
        }
        let mut header = Header::new(self.key_type.jose_alg());
        header.kid = Some(self.kid.clone());
        header.typ = Some("JWT".into());
        let exp = (now + ttl.as_secs() as i64).min(self.not_after);
        let sub = sub.to_string();
        let jti = hex::encode(crate::x509::random_16());
        let claims = Claims {
            sub: &sub,
            aud: audience,
            exp,
            iat: now,
            jti: &jti,
            iss: issuer,
            extra,
        };
        let token = self.encode(&header, &claims)?;
        Ok(SignedJwt {
            token,
            jti,
            expires_at: exp,
        })
    }
}

impl JwtSigner {
    /// Signs `claims` as they are, with JOSE header `typ` (and this key's
    /// `alg` and `kid`): for tokens other than JWT-SVIDs, whose claims the
    /// caller builds. The caller sets `exp`; it is capped at this key's
    /// expiry here.
    pub fn sign_typed(
        &self,
        typ: &str,
        claims: &serde_json::Map<String, Value>,
    ) -> Result<String, JwtError> {
        let mut claims = claims.clone();
        match claims.get("exp").and_then(Value::as_i64) {
            Some(exp) => {
                claims.insert("exp".into(), json!(exp.min(self.not_after)));
            }
            None => return Err(JwtError::Malformed("exp is required".into())),
        }
        let mut header = Header::new(self.key_type.jose_alg());
        header.kid = Some(self.kid.clone());
        header.typ = Some(typ.into());
        self.encode(&header, &claims)
    }
}

/// A JWT verified by [`verify_issued`]: its header and claims.
#[derive(Debug, Clone)]
pub struct VerifiedJwt {
    /// The JOSE header's `typ`, if any.
    pub typ: Option<String>,
    /// The header's `alg`.
    pub alg: String,
    /// All claims.
    pub claims: serde_json::Map<String, Value>,
}

/// The header of a token, *unverified*: `(alg, kid, typ)`, to pick the key
/// and the verification rules.
pub fn peek_header(token: &str) -> Result<(String, Option<String>, Option<String>), JwtError> {
    let h = jsonwebtoken::decode_header(token).map_err(|e| JwtError::Malformed(e.to_string()))?;
    Ok((format!("{:?}", h.alg), h.kid, h.typ))
}

/// Verifies a JWT issued by `issuer` (an OIDC provider or Sigil itself)
/// with a key of `bundle`: the header's `alg` must be asymmetric (ES256,
/// ES384, RS*, PS*: never `none` or HMAC) and match the key; the claims
/// must have `iss` equal to `issuer`, `aud` containing `audience`, `exp` in
/// the future and `nbf` (if present) in the past, each with `leeway`
/// seconds of clock skew, and a `sub`. A token without `kid` is tried
/// against the bundle's only key, if it has just one.
pub fn verify_issued(
    token: &str,
    bundle: &JwtBundle,
    issuer: &str,
    audience: &str,
    leeway: u64,
) -> Result<VerifiedJwt, JwtError> {
    let header =
        jsonwebtoken::decode_header(token).map_err(|e| JwtError::Malformed(e.to_string()))?;
    if !ALLOWED.contains(&header.alg) {
        return Err(JwtError::Algorithm(format!("{:?}", header.alg)));
    }
    let jwk = match &header.kid {
        Some(kid) => bundle.keys.get(kid),
        None if bundle.keys.len() == 1 => bundle.keys.values().next(),
        None => None,
    }
    .ok_or_else(|| JwtError::UnknownKey {
        td: issuer.to_string(),
        kid: header.kid.clone().unwrap_or_default(),
    })?;
    let key = DecodingKey::from_jwk(jwk).map_err(|e| JwtError::Bundle(e.to_string()))?;
    let mut v = Validation::new(header.alg);
    v.algorithms = vec![header.alg];
    v.set_audience(&[audience]);
    v.set_issuer(&[issuer]);
    v.set_required_spec_claims(&["exp", "sub", "aud", "iss"]);
    v.validate_nbf = true;
    v.leeway = leeway;
    let data = jsonwebtoken::decode::<serde_json::Map<String, Value>>(token, &key, &v)
        .map_err(|e| JwtError::Rejected(e.to_string()))?;
    Ok(VerifiedJwt {
        typ: header.typ,
        alg: format!("{:?}", header.alg),
        claims: data.claims,
    })
}

/// The JWKS document (`{"keys": [...]}`) for a set of public JWKs, as the
/// Workload API's `JWTBundlesResponse` carries it.
pub fn jwks(keys: &[Value]) -> Vec<u8> {
    serde_json::to_vec(&json!({ "keys": keys })).unwrap_or_default()
}

/// JWT authorities of one trust domain, by key ID.
#[derive(Debug, Clone, Default)]
pub struct JwtBundle {
    keys: HashMap<String, Jwk>,
}

impl JwtBundle {
    /// Parses a JWKS document. Keys without `kid`, and symmetric keys, are refused.
    pub fn from_jwks(doc: &[u8]) -> Result<Self, JwtError> {
        let set: JwkSet =
            serde_json::from_slice(doc).map_err(|e| JwtError::Bundle(e.to_string()))?;
        let mut keys = HashMap::new();
        for k in set.keys {
            // Skip X.509 authorities in a combined SPIFFE bundle.
            if let Some(u) = &k.common.public_key_use
                && !matches!(u, jsonwebtoken::jwk::PublicKeyUse::Other(s) if s == "jwt-svid")
                && !matches!(u, jsonwebtoken::jwk::PublicKeyUse::Signature)
            {
                continue;
            }
            let kid = k
                .common
                .key_id
                .clone()
                .ok_or_else(|| JwtError::Bundle("a JWT authority has no kid".into()))?;
            if matches!(k.algorithm, AlgorithmParameters::OctetKey(_)) {
                return Err(JwtError::Bundle(
                    "symmetric keys are not JWT-SVID authorities".into(),
                ));
            }
            let mut k = k;
            if let AlgorithmParameters::EllipticCurve(ec) = &mut k.algorithm {
                pad_coordinates(ec);
            }
            keys.insert(kid, k);
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

    /// True when there are no authorities.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// Left-pads an EC key's `x` and `y` to the curve's size. RFC 7518
/// §6.2.1.2 requires the full length, but some JWKS writers (PyJWT before
/// 2.8, for one) drop leading zero bytes, and the verifier would refuse
/// such a key (1 key in ~128).
fn pad_coordinates(ec: &mut jsonwebtoken::jwk::EllipticCurveKeyParameters) {
    use jsonwebtoken::jwk::EllipticCurve;
    let n = match ec.curve {
        EllipticCurve::P256 => 32,
        EllipticCurve::P384 => 48,
        _ => return,
    };
    for c in [&mut ec.x, &mut ec.y] {
        if let Ok(b) = URL_SAFE_NO_PAD.decode(c.as_bytes())
            && b.len() < n
        {
            let mut full = vec![0u8; n - b.len()];
            full.extend_from_slice(&b);
            *c = URL_SAFE_NO_PAD.encode(full);
        }
    }
}

/// A validated JWT-SVID.
#[derive(Debug, Clone)]
pub struct ValidatedJwt {
    /// The `sub` claim.
    pub spiffe_id: SpiffeId,
    /// All claims.
    pub claims: serde_json::Map<String, Value>,
}

/// The claims of a token, *unverified*: only for routing (which bundle to
/// validate with) and bookkeeping (cache expiry of tokens we minted).
pub fn peek_claims(token: &str) -> Result<serde_json::Map<String, Value>, JwtError> {
    let payload = token
        .split('.')
        .nth(1)
        .ok_or_else(|| JwtError::Malformed("expected three dot-separated parts".into()))?;
    let bytes = URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|e| JwtError::Malformed(e.to_string()))?;
    serde_json::from_slice(&bytes).map_err(|e| JwtError::Malformed(e.to_string()))
}

/// Reads the trust domain a token claims to be from (unverified), to pick
/// the bundle to validate it with.
pub fn peek_trust_domain(token: &str) -> Result<TrustDomain, JwtError> {
    let v = peek_claims(token)?;
    let sub = v
        .get("sub")
        .and_then(Value::as_str)
        .ok_or_else(|| JwtError::Subject("missing sub".into()))?;
    let id = SpiffeId::new(sub).map_err(|e| JwtError::Subject(format!("{sub:?}: {e}")))?;
    TrustDomain::new(id.trust_domain_name()).map_err(|e| JwtError::Subject(e.to_string()))
}

/// Validates `token` for `audience` against `bundles` (trust domain →
/// bundle): signature by a known `kid`, `exp` in the future, `aud` contains
/// `audience`, `sub` a SPIFFE ID of the bundle's trust domain.
pub fn validate(
    token: &str,
    audience: &str,
    bundles: &BTreeMap<TrustDomain, JwtBundle>,
) -> Result<ValidatedJwt, JwtError> {
    if audience.is_empty() {
        return Err(JwtError::Rejected("audience is required".into()));
    }
    let header =
        jsonwebtoken::decode_header(token).map_err(|e| JwtError::Malformed(e.to_string()))?;
    if !ALLOWED.contains(&header.alg) {
        return Err(JwtError::Algorithm(format!("{:?}", header.alg)));
    }
    let td = peek_trust_domain(token)?;
    let kid = header.kid.clone().unwrap_or_default();
    let jwk = bundles
        .get(&td)
        .and_then(|b| b.keys.get(&kid))
        .ok_or_else(|| JwtError::UnknownKey {
            td: td.to_string(),
            kid: kid.clone(),
        })?;
    let key = DecodingKey::from_jwk(jwk).map_err(|e| JwtError::Bundle(e.to_string()))?;
    let mut v = Validation::new(header.alg);
    v.algorithms = vec![header.alg];
    v.set_audience(&[audience]);
    v.set_required_spec_claims(&["exp", "sub", "aud"]);
    v.leeway = 0;
    let data = jsonwebtoken::decode::<serde_json::Map<String, Value>>(token, &key, &v)
        .map_err(|e| JwtError::Rejected(e.to_string()))?;
    let sub = data
        .claims
        .get("sub")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let spiffe_id = SpiffeId::new(sub).map_err(|e| JwtError::Subject(e.to_string()))?;
    Ok(ValidatedJwt {
        spiffe_id,
        claims: data.claims,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audience_bounds_name_the_field() {
        let ok: Vec<String> = vec!["a".into(); MAX_AUDIENCES];
        assert_eq!(check_audiences(&ok), Ok(()));
        assert_eq!(check_audiences(&[]), Err(AudienceError::Missing));
        let many: Vec<String> = vec!["a".into(); MAX_AUDIENCES + 1];
        let e = check_audiences(&many).unwrap_err();
        assert!(e.to_string().contains("`audience`"), "{e}");
        assert!(matches!(e, AudienceError::TooMany { count: 17, max: 16 }));
        let long = vec!["x".into(), "y".repeat(MAX_AUDIENCE_LEN + 1)];
        assert_eq!(
            check_audiences(&long),
            Err(AudienceError::TooLong {
                index: 2,
                len: MAX_AUDIENCE_LEN + 1,
                max: MAX_AUDIENCE_LEN
            })
        );
        let exact = vec!["y".repeat(MAX_AUDIENCE_LEN)];
        assert_eq!(check_audiences(&exact), Ok(()));
        assert_eq!(
            check_audiences(&["a".into(), String::new()]),
            Err(AudienceError::Empty { index: 2 })
        );
    }

    fn setup() -> (JwtSigner, BTreeMap<TrustDomain, JwtBundle>) {
        let s = JwtSigner::generate(JwtKeyType::EcP256, crate::now_unix() + 3600).unwrap();
        let doc = jwks(std::slice::from_ref(&s.public_jwk));
        let b = JwtBundle::from_jwks(&doc).unwrap();
        (
            s,
            BTreeMap::from([(TrustDomain::new("example.org").unwrap(), b)]),
        )
    }

    #[test]
    fn signed_token_validates_for_its_audience_only() {
        let (s, bundles) = setup();
        let id = SpiffeId::new("spiffe://example.org/svc").unwrap();
        let t = s
            .sign(
                &id,
                &["api".into(), "db".into()],
                Duration::from_secs(60),
                crate::now_unix(),
                None,
            )
            .unwrap()
            .token;
        let v = validate(&t, "db", &bundles).unwrap();
        assert_eq!(v.spiffe_id, id);
        assert_eq!(v.claims["aud"], json!(["api", "db"]));
        assert!(matches!(
            validate(&t, "other", &bundles),
            Err(JwtError::Rejected(_))
        ));
    }

    #[test]
    fn every_token_carries_a_fresh_random_jti() {
        let (s, bundles) = setup();
        let id = SpiffeId::new("spiffe://example.org/svc").unwrap();
        let now = crate::now_unix();
        let aud = ["api".to_string()];
        let a = s
            .sign(&id, &aud, Duration::from_secs(60), now, None)
            .unwrap();
        let b = s
            .sign(&id, &aud, Duration::from_secs(60), now, None)
            .unwrap();
        assert_eq!(a.jti.len(), 32);
        assert!(
            a.jti
                .bytes()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_ne!(a.jti, b.jti);
        let v = validate(&a.token, "api", &bundles).unwrap();
        assert_eq!(v.claims["jti"], json!(a.jti));
        assert_eq!(v.claims["exp"], json!(a.expires_at));
    }

    #[test]
    fn expired_tampered_foreign_and_unsigned_tokens_are_refused() {
        let (s, bundles) = setup();
        let id = SpiffeId::new("spiffe://example.org/svc").unwrap();
        let old = s
            .sign(
                &id,
                &["a".into()],
                Duration::from_secs(1),
                crate::now_unix() - 100,
                None,
            )
            .unwrap()
            .token;
        assert!(matches!(
            validate(&old, "a", &bundles),
            Err(JwtError::Rejected(_))
        ));

        let t = s
            .sign(
                &id,
                &["a".into()],
                Duration::from_secs(60),
                crate::now_unix(),
                None,
            )
            .unwrap()
            .token;
        let mut parts: Vec<String> = t.split('.').map(String::from).collect();
        let forged = URL_SAFE_NO_PAD
            .encode(br#"{"sub":"spiffe://example.org/admin","aud":["a"],"exp":9999999999}"#);
        parts[1] = forged;
        assert!(validate(&parts.join("."), "a", &bundles).is_err());

        let none_header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let none = format!("{none_header}.{}.", t.split('.').nth(1).unwrap());
        assert!(validate(&none, "a", &bundles).is_err());

        let other = SpiffeId::new("spiffe://other.org/svc").unwrap();
        let foreign = s
            .sign(
                &other,
                &["a".into()],
                Duration::from_secs(60),
                crate::now_unix(),
                None,
            )
            .unwrap()
            .token;
        assert!(matches!(
            validate(&foreign, "a", &bundles),
            Err(JwtError::UnknownKey { .. })
        ));
    }

    #[test]
    fn token_never_outlives_its_key() {
        let s = JwtSigner::generate(JwtKeyType::EcP256, crate::now_unix() + 10).unwrap();
        let id = SpiffeId::new("spiffe://example.org/svc").unwrap();
        let t = s
            .sign(
                &id,
                &["a".into()],
                Duration::from_secs(3600),
                crate::now_unix(),
                None,
            )
            .unwrap()
            .token;
        let td = peek_trust_domain(&t).unwrap();
        assert_eq!(td.as_str(), "example.org");
        let payload: Value = serde_json::from_slice(
            &URL_SAFE_NO_PAD
                .decode(t.split('.').nth(1).unwrap())
                .unwrap(),
        )
        .unwrap();
        assert!(payload["exp"].as_i64().unwrap() <= s.not_after);
    }

    #[test]
    fn es384_keys_sign_and_validate() {
        let s = JwtSigner::generate(JwtKeyType::EcP384, crate::now_unix() + 60).unwrap();
        assert_eq!(s.public_jwk["crv"], "P-384");
        let b = JwtBundle::from_jwks(&jwks(std::slice::from_ref(&s.public_jwk))).unwrap();
        let bundles = BTreeMap::from([(TrustDomain::new("example.org").unwrap(), b)]);
        let id = SpiffeId::new("spiffe://example.org/svc").unwrap();
        let t = s
            .sign(
                &id,
                &["a".into()],
                Duration::from_secs(30),
                crate::now_unix(),
                None,
            )
            .unwrap()
            .token;
        assert_eq!(
            jsonwebtoken::decode_header(&t).unwrap().alg,
            Algorithm::ES384
        );
        assert_eq!(validate(&t, "a", &bundles).unwrap().spiffe_id, id);
    }

    #[test]
    fn rs256_keys_sign_and_validate() {
        let s = JwtSigner::generate(JwtKeyType::Rsa2048, crate::now_unix() + 60).unwrap();
        assert_eq!(s.public_jwk["kty"], "RSA");
        let again = JwtSigner::from_pkcs8(
            s.kid.clone(),
            JwtKeyType::Rsa2048,
            s.pkcs8().to_vec(),
            s.not_after,
        )
        .unwrap();
        assert_eq!(again.public_jwk, s.public_jwk, "reloading keeps the key");
        let b = JwtBundle::from_jwks(&jwks(std::slice::from_ref(&s.public_jwk))).unwrap();
        let bundles = BTreeMap::from([(TrustDomain::new("example.org").unwrap(), b)]);
        let id = SpiffeId::new("spiffe://example.org/svc").unwrap();
        let t = s
            .sign(
                &id,
                &["a".into()],
                Duration::from_secs(30),
                crate::now_unix(),
                None,
            )
            .unwrap()
            .token;
        assert_eq!(
            jsonwebtoken::decode_header(&t).unwrap().alg,
            Algorithm::RS256
        );
        assert_eq!(validate(&t, "a", &bundles).unwrap().spiffe_id, id);
    }

    #[test]
    fn typed_tokens_verify_against_their_issuer_only() {
        let s = JwtSigner::generate(JwtKeyType::EcP256, crate::now_unix() + 60).unwrap();
        let b = JwtBundle::from_jwks(&jwks(std::slice::from_ref(&s.public_jwk))).unwrap();
        let now = crate::now_unix();
        let claims = json!({"iss": "https://idp", "sub": "alice", "aud": "sigil",
            "exp": now + 3600, "nbf": now - 1});
        let t = s
            .sign_typed("sigil-delegation+jwt", claims.as_object().unwrap())
            .unwrap();
        let v = verify_issued(&t, &b, "https://idp", "sigil", 0).unwrap();
        assert_eq!(v.typ.as_deref(), Some("sigil-delegation+jwt"));
        assert_eq!(
            v.claims["exp"],
            json!(s.not_after),
            "capped at the key's expiry"
        );
        assert!(verify_issued(&t, &b, "https://other", "sigil", 0).is_err());
        assert!(verify_issued(&t, &b, "https://idp", "other", 0).is_err());
        let none_header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#);
        let none = format!("{none_header}.{}.", t.split('.').nth(1).unwrap());
        assert!(verify_issued(&none, &b, "https://idp", "sigil", 0).is_err());
        let hs_header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256"}"#);
        let hs = format!("{hs_header}.{}.AAAA", t.split('.').nth(1).unwrap());
        assert!(matches!(
            verify_issued(&hs, &b, "https://idp", "sigil", 0),
            Err(JwtError::Algorithm(_))
        ));
        let late = json!({"iss": "https://idp", "sub": "a", "aud": "sigil", "exp": now + 60,
            "nbf": now + 600});
        let t = s.sign_typed("JWT", late.as_object().unwrap()).unwrap();
        assert!(verify_issued(&t, &b, "https://idp", "sigil", 30).is_err());
    }

    #[test]
    fn short_ec_coordinates_are_padded() {
        // A key whose x has a leading zero byte, written without it.
        let s = loop {
            let s = JwtSigner::generate(JwtKeyType::EcP256, crate::now_unix() + 60).unwrap();
            let x = URL_SAFE_NO_PAD
                .decode(s.public_jwk["x"].as_str().unwrap())
                .unwrap();
            if x[0] == 0 {
                break s;
            }
        };
        let mut jwk = s.public_jwk.clone();
        let x = URL_SAFE_NO_PAD.decode(jwk["x"].as_str().unwrap()).unwrap();
        jwk["x"] = json!(URL_SAFE_NO_PAD.encode(&x[1..]));
        let b = JwtBundle::from_jwks(&jwks(&[jwk])).unwrap();
        let now = crate::now_unix();
        let claims = json!({"iss": "i", "sub": "s", "aud": "a", "exp": now + 60});
        let t = s.sign_typed("JWT", claims.as_object().unwrap()).unwrap();
        verify_issued(&t, &b, "i", "a", 0).unwrap();
    }

    #[test]
    fn symmetric_and_kidless_bundles_are_refused() {
        assert!(
            JwtBundle::from_jwks(br#"{"keys":[{"kty":"oct","k":"c2VjcmV0","kid":"x"}]}"#).is_err()
        );
        assert!(
            JwtBundle::from_jwks(br#"{"keys":[{"kty":"EC","crv":"P-256","x":"AA","y":"AA"}]}"#)
                .is_err()
        );
    }
}
