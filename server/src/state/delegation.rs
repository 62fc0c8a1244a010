//! Delegation chains: token exchange (RFC 8693) for a workload acting on
//! behalf of a user.
//!
//! An agent forwards an attested workload's request naming the entry the
//! workload matched ([`ServerState::exchange_token`]). The server
//!
//! 1. checks the request's fields (a malformed request is refused naming
//!    the field and writes nothing);
//! 2. checks the entry as minting does (authorized for the agent, not
//!    expired, not killed, approval grant in force) and that it has
//!    `delegable_scopes`;
//! 3. verifies the subject token: a token whose JOSE `typ` is
//!    [`DELEGATION_TYP`] is one of Sigil's own delegation tokens, verified
//!    with this trust domain's JWT authorities, `iss` = `jwt_issuer`, and
//!    `aud` naming the calling workload's SPIFFE ID (a delegation token can
//!    be exchanged only by the workload it was addressed to); any other
//!    token must come from a `[[trusted_issuer]]` (its `iss`, compared
//!    exactly), be signed by a key of that issuer's JWKS and name its
//!    configured audience. Both: asymmetric algorithms only (no `none`, no
//!    HMAC), `exp` and `nbf` checked with [`LEEWAY`] seconds of skew;
//! 4. narrows the scopes: the subject token's (`scope`, or `scp`) ∩ the
//!    entry's `delegable_scopes`, and if the request names scopes, every
//!    one of them must be in that intersection (a scope outside it is
//!    refused, never dropped);
//! 5. nests the chain: `act = {"sub": <workload's SPIFFE ID>, "act":
//!    <subject token's act>}`, refused when it would hold more than
//!    `max_delegation_depth` actors, or when any earlier actor's identity
//!    has been killed;
//! 6. signs with the active JWT key (so the token verifies with the bundle
//!    and the OIDC discovery JWKS), `exp` ≤ the subject token's and ≤ now +
//!    the entry's JWT-SVID TTL (itself capped by the entry's expiry and
//!    approval grant);
//! 7. audits: one `delegation_issued` record (committed before the token
//!    is returned), or one `delegation_refused` record with the reason for
//!    every refusal after step 1.

use serde_json::{Map, Value, json};
use sigil_core::audit::Event;
use sigil_core::entry::validate_scopes;
use sigil_core::jwt::{JwtBundle, JwtError, verify_issued};
use sigil_core::{SpiffeId, now_unix};

use super::{Caller, ServerState, poisoned};
use crate::datastore::append_audit;
use crate::error::RegistryError;
use crate::trusted_issuer::TrustedIssuer;

/// JOSE `typ` of delegation tokens: never `JWT`, so no JWT-SVID verifier
/// mistakes one for a JWT-SVID.
pub const DELEGATION_TYP: &str = "sigil-delegation+jwt";
/// RFC 8693 token type URIs.
pub const TOKEN_TYPE_JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
pub(super) const TOKEN_TYPE_ID_TOKEN: &str = "urn:ietf:params:oauth:token-type:id_token";
pub(super) const TOKEN_TYPE_ACCESS_TOKEN: &str = "urn:ietf:params:oauth:token-type:access_token";
/// Clock skew allowed on the subject token's `exp` and `nbf`, seconds.
pub(super) const LEEWAY: u64 = 30;
/// Longest subject token, bytes.
pub(super) const MAX_SUBJECT_TOKEN: usize = 16 * 1024;
/// Most scopes one request may name.
pub(super) const MAX_REQUESTED_SCOPES: usize = 32;
/// Most scopes read from a subject token.
const MAX_SUBJECT_SCOPES: usize = 256;
/// Longest `sub` of a subject token, bytes.
const MAX_SUBJECT_LEN: usize = 1024;

/// One exchange as the agent forwards it.
#[derive(Debug, Clone, Default)]
pub struct ExchangeRequest {
    pub entry_id: String,
    pub subject_token: String,
    pub subject_token_type: String,
    pub audience: Vec<String>,
    pub scope: Vec<String>,
}

/// An issued delegation token.
#[derive(Debug, Clone)]
pub struct Exchanged {
    pub token: String,
    pub expires_at: i64,
    pub scope: Vec<String>,
    /// The actor (the entry's SPIFFE ID).
    pub spiffe_id: SpiffeId,
    pub jti: String,
}

/// The trusted issuers and the depth limit, as the delegation service holds
/// them.
pub struct Delegation<'a> {
    pub issuers: &'a [std::sync::Arc<TrustedIssuer>],
    pub max_depth: u32,
}

/// A refusal after the request's fields checked out: audited.
struct Refusal {
    err: RegistryError,
    spiffe_id: Option<SpiffeId>,
}

fn refuse(msg: impl Into<String>) -> Refusal {
    Refusal {
        err: RegistryError::denied(msg),
        spiffe_id: None,
    }
}

/// Checks the request's fields; errors name the field.
fn check_request(r: &ExchangeRequest) -> Result<(Vec<String>, Vec<String>), RegistryError> {
    if r.entry_id.is_empty() {
        return Err(RegistryError::invalid("invalid field `entry_id`: required"));
    }
    if r.subject_token.is_empty() {
        return Err(RegistryError::invalid(
            "invalid field `subject_token`: required",
        ));
    }
    if r.subject_token.len() > MAX_SUBJECT_TOKEN {
        return Err(RegistryError::invalid(format!(
            "invalid field `subject_token`: {} bytes exceed the maximum of {MAX_SUBJECT_TOKEN}",
            r.subject_token.len()
        )));
    }
    if !matches!(
        r.subject_token_type.as_str(),
        "" | TOKEN_TYPE_JWT | TOKEN_TYPE_ID_TOKEN | TOKEN_TYPE_ACCESS_TOKEN
    ) {
        let mut t = r.subject_token_type.clone();
        t.truncate(80);
        return Err(RegistryError::invalid(format!(
            "invalid field `subject_token_type`: {t:?} is not one of {TOKEN_TYPE_JWT}, {TOKEN_TYPE_ID_TOKEN}, {TOKEN_TYPE_ACCESS_TOKEN}"
        )));
    }
    sigil_core::jwt::check_audiences(&r.audience)
        .map_err(|e| RegistryError::invalid(e.to_string()))?;
    let mut audience = r.audience.clone();
    audience.sort();
    audience.dedup();
    let scope = validate_scopes(&r.scope, MAX_REQUESTED_SCOPES)
        .map_err(|e| RegistryError::invalid(format!("invalid field `scope`: {e}")))?;
    Ok((audience, scope))
}

/// The scopes a subject token carries: `scope` (space-delimited, RFC 8693
/// §4.2) or `scp` (a string or an array of strings, as some providers
/// write it).
fn subject_scopes(claims: &Map<String, Value>) -> Result<Vec<String>, String> {
    let raw: Vec<String> = match (claims.get("scope"), claims.get("scp")) {
        (Some(Value::String(s)), _) | (None, Some(Value::String(s))) => s
            .split(' ')
            .filter(|t| !t.is_empty())
            .map(String::from)
            .collect(),
        (None, Some(Value::Array(a))) => a
            .iter()
            .map(|v| v.as_str().map(String::from))
            .collect::<Option<Vec<_>>>()
            .ok_or("the subject token's scp claim holds a non-string")?,
        (None, None) => Vec::new(),
        _ => return Err("the subject token's scope claim is not a string".into()),
    };
    validate_scopes(&raw, MAX_SUBJECT_SCOPES)
        .map_err(|e| format!("the subject token's scope claim: {e}"))
}

/// The actors of an `act` chain, outermost first. Each level must be an
/// object with a string `sub`; more than `max` levels is an error (the walk
/// stops there, so a deep chain costs nothing): with the new actor on top,
/// the chain would hold more than `max + 1`.
fn chain_actors(act: Option<&Value>, max: u32) -> Result<Vec<String>, String> {
    let mut actors = Vec::new();
    let mut cur = act;
    while let Some(v) = cur {
        if actors.len() >= max as usize {
            return Err(format!(
                "the delegation chain would exceed max_delegation_depth ({} actors)",
                max + 1
            ));
        }
        let sub = v
            .get("sub")
            .and_then(Value::as_str)
            .ok_or("the subject token's act claim is malformed (each level needs a string sub)")?;
        actors.push(sub.to_string());
        cur = v.get("act");
    }
    Ok(actors)
}

fn nest_act(actor: &SpiffeId, prior: Option<&Value>) -> Value {
    let mut a = Map::new();
    a.insert("sub".into(), json!(actor.to_string()));
    if let Some(p) = prior {
        a.insert("act".into(), p.clone());
    }
    Value::Object(a)
}

fn rejected(what: &str, e: &JwtError) -> String {
    let mut m = format!("{what}: {e}");
    m.truncate(300);
    m
}

impl ServerState {
    /// Exchanges a subject token for a delegation token on behalf of the
    /// workload the agent attested to `req.entry_id`. See the module doc.
    pub fn exchange_token(
        &self,
        agent: &SpiffeId,
        req: &ExchangeRequest,
        d: &Delegation<'_>,
    ) -> Result<Exchanged, RegistryError> {
        let (audience, requested) = check_request(req)?;
        match self.exchange_checked(agent, req, d, &audience, &requested) {
            Ok(x) => Ok(x),
            Err(Refusal { err, spiffe_id }) => {
                let reason = err.to_string();
                tracing::info!(agent = %agent, entry = %req.entry_id, reason = %reason, "token exchange refused");
                let caller = Caller::agent(agent.clone());
                let event = Event::DelegationRefused {
                    agent_id: agent.clone(),
                    entry_id: req.entry_id.chars().take(128).collect(),
                    spiffe_id,
                    reason,
                };
                self.store
                    .transact(|tx| append_audit(tx, &caller, event.clone()))?;
                Err(err)
            }
        }
    }

    fn exchange_checked(
        &self,
        agent: &SpiffeId,
        req: &ExchangeRequest,
        d: &Delegation<'_>,
        audience: &[String],
        requested: &[String],
    ) -> Result<Exchanged, Refusal> {
        let now = now_unix();
        let store_err = |e: crate::datastore::StoreError| Refusal {
            err: e.into(),
            spiffe_id: None,
        };
        let rec = self
            .store
            .read()
            .and_then(|r| r.agent(&agent.to_string()))
            .map_err(store_err)?;
        let parents = self
            .parents_of(agent, rec.as_ref())
            .map_err(|err| Refusal {
                err,
                spiffe_id: None,
            })?;
        let e = {
            let idx = self.entries.read().map_err(|_| Refusal {
                err: poisoned(),
                spiffe_id: None,
            })?;
            Self::authorized_entry(&idx, &parents, &req.entry_id, now)
        }
        .map_err(|r| refuse(r.to_string()))?;
        let with_id = |mut r: Refusal| {
            r.spiffe_id = Some(e.spiffe_id.clone());
            r
        };
        self.refuse_if_killed(&e)
            .map_err(|r| with_id(refuse(r.to_string())))?;
        if self
            .killed_spiffe_ids()
            .binary_search(&e.spiffe_id.to_string())
            .is_ok()
        {
            return Err(with_id(refuse(format!("{} has been killed", e.spiffe_id))));
        }
        let grant = self
            .grant_for_mint(&e, agent, now)
            .map_err(|r| with_id(refuse(r.to_string())))?;
        if e.delegable_scopes.is_empty() {
            return Err(with_id(refuse(format!(
                "entry {:?} ({}) has no delegable scopes: it may not act on behalf of anyone (entry update --delegable-scope)",
                e.id, e.spiffe_id
            ))));
        }
        let Some(own_issuer) = self.cfg.jwt_issuer.clone() else {
            return Err(with_id(Refusal {
                err: RegistryError::precondition(
                    "delegation needs jwt_issuer (or [oidc]) in server.toml: delegation tokens carry it as iss",
                ),
                spiffe_id: None,
            }));
        };

        // The subject token.
        let (_, kid, typ) = sigil_core::jwt::peek_header(&req.subject_token)
            .map_err(|e| with_id(refuse(rejected("subject token", &e))))?;
        let is_delegation = typ.as_deref() == Some(DELEGATION_TYP);
        let (claims, subject_issuer) = if is_delegation {
            let own = JwtBundle::from_jwks(&self.jwt_bundle())
                .map_err(|e| with_id(refuse(rejected("this trust domain's JWT bundle", &e))))?;
            let v = verify_issued(
                &req.subject_token,
                &own,
                &own_issuer,
                &e.spiffe_id.to_string(),
                LEEWAY,
            )
            .map_err(|err| {
                with_id(refuse(rejected(
                    &format!(
                        "the subject delegation token (it must be addressed to {})",
                        e.spiffe_id
                    ),
                    &err,
                )))
            })?;
            let orig = v
                .claims
                .get("sigil_subject_iss")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            if v.claims.get("act").is_none() {
                return Err(with_id(refuse(
                    "the subject delegation token has no act claim",
                )));
            }
            (v.claims, orig)
        } else {
            let peeked = sigil_core::jwt::peek_claims(&req.subject_token)
                .map_err(|e| with_id(refuse(rejected("subject token", &e))))?;
            let iss = peeked
                .get("iss")
                .and_then(Value::as_str)
                .unwrap_or_default();
            if iss == own_issuer {
                return Err(with_id(refuse(format!(
                    "the subject token is from this trust domain's issuer but is not a delegation token (typ {:?}): JWT-SVIDs cannot be exchanged",
                    typ.unwrap_or_default()
                ))));
            }
            let Some(ti) = d.issuers.iter().find(|t| t.cfg.issuer == iss) else {
                let mut shown = iss.to_string();
                shown.truncate(120);
                return Err(with_id(refuse(format!(
                    "the subject token's issuer {shown:?} is not a trusted_issuer"
                ))));
            };
            let mut keys = ti.keys(false);
            if kid.as_ref().is_some_and(|k| !keys.has_key(k)) {
                keys = ti.keys(true);
            }
            let v = verify_issued(&req.subject_token, &keys, iss, &ti.cfg.audience, LEEWAY)
                .map_err(|err| {
                    with_id(refuse(rejected(
                        &format!("the subject token of {iss}"),
                        &err,
                    )))
                })?;
            (v.claims, iss.to_string())
        };
        let subject = claims
            .get("sub")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty() && s.len() <= MAX_SUBJECT_LEN)
            .ok_or_else(|| {
                with_id(refuse(format!(
                    "the subject token's sub must be a string of 1-{MAX_SUBJECT_LEN} bytes"
                )))
            })?
            .to_string();
        let subject_exp = claims
            .get("exp")
            .and_then(Value::as_i64)
            .ok_or_else(|| with_id(refuse("the subject token has no numeric exp")))?;

        // Scopes.
        let offered = subject_scopes(&claims).map_err(|m| with_id(refuse(m)))?;
        let allowed: Vec<String> = offered
            .iter()
            .filter(|s| e.delegable_scopes.binary_search(s).is_ok())
            .cloned()
            .collect();
        let scope = if requested.is_empty() {
            allowed
        } else {
            let outside: Vec<&str> = requested
                .iter()
                .filter(|s| allowed.binary_search(s).is_err())
                .map(String::as_str)
                .collect();
            if !outside.is_empty() {
                return Err(with_id(refuse(format!(
                    "scope {} not allowed: the subject token grants [{}] and entry {:?} may delegate [{}]",
                    outside.join(" "),
                    offered.join(" "),
                    e.id,
                    e.delegable_scopes.join(" ")
                ))));
            }
            requested.to_vec()
        };
        if scope.is_empty() {
            return Err(with_id(refuse(format!(
                "no scope to delegate: the subject token grants [{}] and entry {:?} may delegate [{}]",
                offered.join(" "),
                e.id,
                e.delegable_scopes.join(" ")
            ))));
        }

        // The chain.
        let prior = claims.get("act");
        let prior_actors =
            chain_actors(prior, d.max_depth.saturating_sub(1)).map_err(|m| with_id(refuse(m)))?;
        let killed = self.killed_spiffe_ids();
        if let Some(a) = prior_actors
            .iter()
            .find(|a| killed.binary_search(a).is_ok())
        {
            return Err(with_id(refuse(format!(
                "actor {a} earlier in the delegation chain has been killed"
            ))));
        }

        // Lifetime.
        let ttl = Self::capped_ttl(
            &e,
            e.jwt_svid_ttl.unwrap_or(self.cfg.default_jwt_svid_ttl),
            grant,
            now,
        )
        .map_err(|r| with_id(refuse(r.to_string())))?;
        let signer = self
            .keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .active_jwt();
        let exp = subject_exp
            .min(now.saturating_add(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX)))
            .min(signer.not_after);
        if exp <= now {
            return Err(with_id(refuse("the subject token has expired")));
        }

        let jti = hex::encode(sigil_core::ids::random_bytes::<16>());
        let mut c = Map::new();
        c.insert("iss".into(), json!(own_issuer));
        c.insert("sub".into(), json!(subject));
        c.insert("aud".into(), json!(audience));
        c.insert("act".into(), nest_act(&e.spiffe_id, prior));
        c.insert("scope".into(), json!(scope.join(" ")));
        c.insert("exp".into(), json!(exp));
        c.insert("iat".into(), json!(now));
        c.insert("nbf".into(), json!(now));
        c.insert("jti".into(), json!(jti));
        c.insert("sigil_subject_iss".into(), json!(subject_issuer));
        c.insert("sigil_entry_id".into(), json!(e.id));
        let token = signer.sign_typed(DELEGATION_TYP, &c).map_err(|err| {
            with_id(Refusal {
                err: RegistryError::internal(err.to_string()),
                spiffe_id: None,
            })
        })?;
        let caller = Caller::agent(agent.clone());
        let event = Event::DelegationIssued {
            agent_id: agent.clone(),
            entry_id: e.id.clone(),
            spiffe_id: e.spiffe_id.clone(),
            subject,
            subject_issuer,
            prior_actors,
            audience: audience.to_vec(),
            scope: scope.clone(),
            jti: jti.clone(),
            expires_at: exp,
        };
        // The record is committed before the token leaves: a failed write
        // is an error, not an unaudited token.
        self.store
            .transact(|tx| append_audit(tx, &caller, event.clone()))
            .map_err(|err| Refusal {
                err,
                spiffe_id: None,
            })?;
        self.note_entries_used([e.id.as_str()]);
        tracing::info!(agent = %agent, actor = %e.spiffe_id, jti = %jti, "delegation token issued");
        Ok(Exchanged {
            token,
            expires_at: exp,
            scope,
            spiffe_id: e.spiffe_id.clone(),
            jti,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_are_read_from_scope_or_scp() {
        let m = |v: Value| v.as_object().unwrap().clone();
        assert_eq!(
            subject_scopes(&m(json!({"scope": "b a  a"}))).unwrap(),
            vec!["a", "b"]
        );
        assert_eq!(
            subject_scopes(&m(json!({"scp": ["x", "y"]}))).unwrap(),
            vec!["x", "y"]
        );
        assert!(subject_scopes(&m(json!({"scope": 5}))).is_err());
        assert!(subject_scopes(&m(json!({"scp": [1]}))).is_err());
        assert!(subject_scopes(&m(json!({"scope": "a\\b"}))).is_err());
        assert!(subject_scopes(&m(json!({}))).unwrap().is_empty());
    }

    #[test]
    fn chains_are_walked_outermost_first_and_bounded() {
        let act = json!({"sub": "b", "act": {"sub": "a"}});
        assert_eq!(chain_actors(Some(&act), 4).unwrap(), vec!["b", "a"]);
        assert!(
            chain_actors(Some(&act), 1)
                .unwrap_err()
                .contains("max_delegation_depth")
        );
        assert!(chain_actors(Some(&json!({"act": {}})), 4).is_err());
        assert!(chain_actors(None, 0).unwrap().is_empty());
        let id = SpiffeId::new("spiffe://example.org/c").unwrap();
        let n = nest_act(&id, Some(&act));
        assert_eq!(n["sub"], "spiffe://example.org/c");
        assert_eq!(n["act"]["act"]["sub"], "a");
    }

    #[test]
    fn malformed_requests_name_the_field() {
        let good = ExchangeRequest {
            entry_id: "e".into(),
            subject_token: "t".into(),
            subject_token_type: String::new(),
            audience: vec!["a".into()],
            scope: vec![],
        };
        assert!(check_request(&good).is_ok());
        type M = fn(&mut ExchangeRequest);
        let cases: [(&str, M); 6] = [
            ("entry_id", |r| r.entry_id.clear()),
            ("subject_token", |r| r.subject_token.clear()),
            ("subject_token", |r| {
                r.subject_token = "x".repeat(MAX_SUBJECT_TOKEN + 1)
            }),
            ("subject_token_type", |r| {
                r.subject_token_type = "saml".into()
            }),
            ("audience", |r| r.audience.clear()),
            ("scope", |r| r.scope = vec!["a b".into()]),
        ];
        for (field, m) in cases {
            let mut r = good.clone();
            m(&mut r);
            let e = check_request(&r).unwrap_err().to_string();
            assert!(e.contains(&format!("`{field}`")), "{field}: {e}");
        }
    }
}
