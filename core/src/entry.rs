//! Registration entries: which SPIFFE ID a workload (or node group) gets,
//! under which parent, for which selectors. Entries arrive as wire messages
//! and become [`Entry`] only through validation, so a stored or synced entry
//! is always well-formed.

use std::collections::BTreeMap;
use std::time::Duration;

use sigil_proto::common as pb;
use spiffe::{SpiffeId, TrustDomain};

use crate::ids::parse_spiffe_id;
use crate::selector::Selector;

/// Longest SVID TTL an entry may ask for.
pub const MAX_TTL: Duration = Duration::from_secs(30 * 86_400);
/// Most selectors one entry may have.
pub const MAX_SELECTORS: usize = 64;
/// Most DNS names one entry may have.
pub const MAX_DNS_NAMES: usize = 32;
/// Most trust domains one entry may federate with.
pub const MAX_FEDERATES_WITH: usize = 64;
/// Longest hint or owner, in bytes.
pub const MAX_TEXT_LEN: usize = 256;
/// Longest description, in bytes.
pub const MAX_DESCRIPTION_LEN: usize = 1024;
/// Most static JWT claims one entry may have.
pub const MAX_JWT_CLAIMS: usize = 16;
/// Longest JWT claim name, in bytes.
pub const MAX_JWT_CLAIM_NAME: usize = 64;
/// Longest JWT claim value, in bytes.
pub const MAX_JWT_CLAIM_VALUE: usize = 256;
/// Most delegable scopes one entry may have.
pub const MAX_DELEGABLE_SCOPES: usize = 32;
/// Longest scope token, in bytes.
pub const MAX_SCOPE_LEN: usize = 128;
/// Claim names an entry may not set: the registered claims a JWT-SVID
/// verifier relies on, and RFC 8693's actor claim. Names starting with
/// `sigil_` are reserved for the claims the server adds.
pub const RESERVED_JWT_CLAIMS: [&str; 8] = ["sub", "aud", "exp", "iat", "iss", "jti", "nbf", "act"];

/// An entry field was invalid. Always names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid entry field `{field}`: {reason}")]
pub struct EntryError {
    /// The wire/CLI name of the offending field.
    pub field: &'static str,
    /// What was wrong with it.
    pub reason: String,
}

fn field_err(field: &'static str, reason: impl ToString) -> EntryError {
    EntryError {
        field,
        reason: reason.to_string(),
    }
}

/// A validated registration entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Server-assigned unique ID.
    pub id: String,
    /// The identity delivered to matching callers.
    pub spiffe_id: SpiffeId,
    /// An agent ID, or a node-alias entry's ID.
    pub parent_id: SpiffeId,
    /// Selectors a caller must all have (sorted, deduplicated).
    pub selectors: Vec<Selector>,
    /// X.509-SVID lifetime; `None` = server default.
    pub x509_svid_ttl: Option<Duration>,
    /// JWT-SVID lifetime; `None` = server default.
    pub jwt_svid_ttl: Option<Duration>,
    /// DNS SANs for the X.509-SVID.
    pub dns_names: Vec<String>,
    /// Free-form hint delivered with the SVID.
    pub hint: String,
    /// Trust domains whose bundles the workload receives.
    pub federates_with: Vec<TrustDomain>,
    /// The identity may use the admin API (reserved).
    pub admin: bool,
    /// The identity may mint downstream CAs (reserved).
    pub downstream: bool,
    /// A node-alias entry: groups agents by node selectors.
    pub node: bool,
    /// Who owns this identity (person, team, ticket).
    pub owner: String,
    /// Unix seconds after which the entry stops being served.
    pub expires_at: Option<i64>,
    /// What the identity is for.
    pub description: String,
    /// SVIDs only while an approver's grant for (entry, agent) is in force.
    pub require_approval: bool,
    /// Static claims added to every JWT-SVID of the entry.
    pub jwt_claims: BTreeMap<String, String>,
    /// OAuth scopes the entry's workloads may delegate (token exchange);
    /// sorted, deduplicated; empty: no delegation.
    pub delegable_scopes: Vec<String>,
    /// Sync only: this agent may not obtain SVIDs for the entry until an
    /// approval request is granted; why (names the request).
    pub approval_pending: Option<String>,
    /// Sync only: this agent holds a grant until this Unix time.
    pub approved_until: Option<i64>,
    /// The entry allows task identities of at most this lifetime
    /// (`--task-ttl-max`); `None` = no tasks.
    pub task_ttl_max: Option<Duration>,
    /// The entry's workloads may fetch WIT-SVIDs (`--wit-svid`); off by
    /// default: an entry that has not opted in gets none.
    pub wit_svid: bool,
    /// Bumped on every update.
    pub revision: i64,
    /// Unix seconds of creation.
    pub created_at: i64,
}

impl Entry {
    /// Validates a wire entry. `td` is the server's trust domain: the entry's
    /// SPIFFE ID must be in it.
    pub fn from_proto(p: &pb::Entry, td: &TrustDomain) -> Result<Self, EntryError> {
        let spiffe_id = parse_spiffe_id(&p.spiffe_id).map_err(|e| field_err("spiffe_id", e))?;
        if !spiffe_id.is_member_of(td) {
            return Err(field_err(
                "spiffe_id",
                format!("{spiffe_id} is not in trust domain {td}"),
            ));
        }
        if spiffe_id.path().is_empty() {
            return Err(field_err("spiffe_id", "must have a path"));
        }
        if spiffe_id.path().starts_with("/sigil/") {
            return Err(field_err(
                "spiffe_id",
                "the /sigil/ path is reserved for the server and agents",
            ));
        }
        let parent_id = parse_spiffe_id(&p.parent_id).map_err(|e| field_err("parent_id", e))?;
        if !parent_id.is_member_of(td) {
            return Err(field_err(
                "parent_id",
                format!("{parent_id} is not in trust domain {td}"),
            ));
        }
        if p.selectors.len() > MAX_SELECTORS {
            return Err(field_err(
                "selector",
                format!(
                    "{} selectors exceed the maximum of {MAX_SELECTORS}",
                    p.selectors.len()
                ),
            ));
        }
        let mut selectors = p
            .selectors
            .iter()
            .map(|s| s.parse::<Selector>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| match e {
                crate::selector::SelectorError::TooLong { .. } => field_err("selectors", e),
                e => field_err("selector", e),
            })?;
        selectors.sort();
        selectors.dedup();
        if selectors.is_empty() {
            return Err(field_err("selector", "at least one selector is required"));
        }
        let ttl = |field: &'static str, v: i64| -> Result<Option<Duration>, EntryError> {
            match v {
                0 => Ok(None),
                v if v < 0 => Err(field_err(field, "must not be negative")),
                v => {
                    let d = Duration::from_secs(v.unsigned_abs());
                    if d > MAX_TTL {
                        Err(field_err(
                            field,
                            format!("{v}s exceeds the maximum of {}s", MAX_TTL.as_secs()),
                        ))
                    } else {
                        Ok(Some(d))
                    }
                }
            }
        };
        let x509_svid_ttl = ttl("x509_svid_ttl", p.x509_svid_ttl)?;
        let jwt_svid_ttl = ttl("jwt_svid_ttl", p.jwt_svid_ttl)?;
        let task_ttl_max = ttl("task_ttl_max", p.task_ttl_max)?;
        if let (Some(t), Some(x)) = (task_ttl_max, x509_svid_ttl)
            && t > x
        {
            return Err(field_err(
                "task_ttl_max",
                format!(
                    "{}s exceeds the entry's x509_svid_ttl of {}s (a task identity lives at most as long as the entry's X.509-SVID)",
                    t.as_secs(),
                    x.as_secs()
                ),
            ));
        }
        if p.dns_names.len() > MAX_DNS_NAMES {
            return Err(field_err(
                "dns",
                format!(
                    "{} DNS names exceed the maximum of {MAX_DNS_NAMES}",
                    p.dns_names.len()
                ),
            ));
        }
        let mut dns_names = Vec::with_capacity(p.dns_names.len());
        for d in &p.dns_names {
            validate_dns_name(d).map_err(|r| field_err("dns", format!("{:?}: {r}", preview(d))))?;
            if !dns_names.contains(d) {
                dns_names.push(d.clone());
            }
        }
        validate_text(&p.hint).map_err(|r| field_err("hint", r))?;
        validate_text(&p.owner).map_err(|r| field_err("owner", r))?;
        if p.federates_with.len() > MAX_FEDERATES_WITH {
            return Err(field_err(
                "federates_with",
                format!(
                    "{} trust domains exceed the maximum of {MAX_FEDERATES_WITH}",
                    p.federates_with.len()
                ),
            ));
        }
        let federates_with = p
            .federates_with
            .iter()
            .map(|t| {
                TrustDomain::new(t)
                    .map_err(|e| field_err("federates_with", format!("{:?}: {e}", preview(t))))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if federates_with.contains(td) {
            return Err(field_err(
                "federates_with",
                "cannot federate with the entry's own trust domain",
            ));
        }
        let expires_at = match p.expires_at {
            0 => None,
            v if v < 0 => return Err(field_err("expires_at", "must be after 1970")),
            v => Some(v),
        };
        validate_text_max(&p.description, MAX_DESCRIPTION_LEN)
            .map_err(|r| field_err("description", r))?;
        validate_jwt_claims(&p.jwt_claims)?;
        let delegable_scopes = validate_scopes(&p.delegable_scopes, MAX_DELEGABLE_SCOPES)
            .map_err(|r| field_err("delegable_scope", r))?;
        validate_text(&p.approval_pending).map_err(|r| field_err("approval_pending", r))?;
        if p.approved_until < 0 {
            return Err(field_err("approved_until", "must be after 1970"));
        }
        Ok(Entry {
            id: p.id.clone(),
            spiffe_id,
            parent_id,
            selectors,
            x509_svid_ttl,
            jwt_svid_ttl,
            dns_names,
            hint: p.hint.clone(),
            federates_with,
            admin: p.admin,
            downstream: p.downstream,
            node: p.node,
            owner: p.owner.clone(),
            expires_at,
            description: p.description.clone(),
            require_approval: p.require_approval,
            jwt_claims: p.jwt_claims.clone(),
            delegable_scopes,
            approval_pending: (!p.approval_pending.is_empty()).then(|| p.approval_pending.clone()),
            approved_until: (p.approved_until != 0).then_some(p.approved_until),
            task_ttl_max,
            wit_svid: p.wit_svid,
            revision: p.revision,
            created_at: p.created_at,
        })
    }

    /// The wire form.
    pub fn to_proto(&self) -> pb::Entry {
        pb::Entry {
            id: self.id.clone(),
            spiffe_id: self.spiffe_id.to_string(),
            parent_id: self.parent_id.to_string(),
            selectors: self.selectors.iter().map(ToString::to_string).collect(),
            x509_svid_ttl: self.x509_svid_ttl.map_or(0, |d| d.as_secs() as i64),
            jwt_svid_ttl: self.jwt_svid_ttl.map_or(0, |d| d.as_secs() as i64),
            dns_names: self.dns_names.clone(),
            hint: self.hint.clone(),
            federates_with: self.federates_with.iter().map(|t| t.to_string()).collect(),
            admin: self.admin,
            downstream: self.downstream,
            node: self.node,
            owner: self.owner.clone(),
            expires_at: self.expires_at.unwrap_or(0),
            revision: self.revision,
            created_at: self.created_at,
            description: self.description.clone(),
            require_approval: self.require_approval,
            jwt_claims: self.jwt_claims.clone(),
            approval_pending: self.approval_pending.clone().unwrap_or_default(),
            approved_until: self.approved_until.unwrap_or(0),
            task_ttl_max: self.task_ttl_max.map_or(0, |d| d.as_secs() as i64),
            delegable_scopes: self.delegable_scopes.clone(),
            wit_svid: self.wit_svid,
        }
    }

    /// The entry as an agent may use it: without an approval grant in
    /// force, `approval_pending` says why not.
    pub fn is_pending_approval(&self) -> bool {
        self.approval_pending.is_some()
    }

    /// Refuses an expiry that is not in the future. For entries being
    /// created, or updated with a new `expires_at`: an entry stored earlier
    /// may of course have expired since.
    pub fn check_expiry_is_future(&self, now_unix: i64) -> Result<(), EntryError> {
        match self.expires_at {
            Some(t) if t <= now_unix => Err(field_err(
                "expires_at",
                format!(
                    "{} is not in the future (now is {})",
                    crate::rfc3339(t),
                    crate::rfc3339(now_unix)
                ),
            )),
            _ => Ok(()),
        }
    }

    /// True when the entry has an expiry in the past.
    pub fn is_expired(&self, now_unix: i64) -> bool {
        self.expires_at.is_some_and(|t| t <= now_unix)
    }
}

/// At most the first 64 characters of `s`, so an error never echoes an
/// arbitrarily long input.
fn preview(s: &str) -> String {
    match s.char_indices().nth(64) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

/// True for the Unicode bidirectional formatting characters (embeddings,
/// overrides, isolates and marks), which can make text display differently
/// from what it is (CVE-2021-42574, "Trojan Source").
fn is_bidi_control(c: char) -> bool {
    matches!(
        c,
        '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}'
    )
}

/// Checks free text shown to operators and workloads (hint, owner): at most
/// [`MAX_TEXT_LEN`] bytes, no control and no bidirectional formatting
/// characters.
pub fn validate_text(s: &str) -> Result<(), String> {
    validate_text_max(s, MAX_TEXT_LEN)
}

/// [`validate_text`] with another length bound.
pub fn validate_text_max(s: &str, max: usize) -> Result<(), String> {
    if s.len() > max {
        return Err(format!("{} bytes exceed the maximum of {max}", s.len()));
    }
    if let Some(c) = s.chars().find(|c| c.is_control() || is_bidi_control(*c)) {
        return Err(format!(
            "contains the control or bidirectional formatting character U+{:04X}",
            u32::from(c)
        ));
    }
    Ok(())
}

/// Checks an entry's static JWT claims: at most [`MAX_JWT_CLAIMS`], names
/// of 1-[`MAX_JWT_CLAIM_NAME`] ASCII letters, digits, `_`, `-` and `.`
/// that are neither reserved ([`RESERVED_JWT_CLAIMS`]) nor start with
/// `sigil_`, values that pass [`validate_text`] within
/// [`MAX_JWT_CLAIM_VALUE`] bytes. Errors name the field `jwt_claim`.
pub fn validate_jwt_claims(claims: &BTreeMap<String, String>) -> Result<(), EntryError> {
    let f = "jwt_claim";
    if claims.len() > MAX_JWT_CLAIMS {
        return Err(field_err(
            f,
            format!(
                "{} claims exceed the maximum of {MAX_JWT_CLAIMS}",
                claims.len()
            ),
        ));
    }
    for (k, v) in claims {
        if k.is_empty() || k.len() > MAX_JWT_CLAIM_NAME {
            return Err(field_err(
                f,
                format!(
                    "claim name {:?} must be 1-{MAX_JWT_CLAIM_NAME} bytes",
                    preview(k)
                ),
            ));
        }
        if !k
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        {
            return Err(field_err(
                f,
                format!(
                    "claim name {:?} may contain only ASCII letters, digits, '_', '-' and '.'",
                    preview(k)
                ),
            ));
        }
        if RESERVED_JWT_CLAIMS.contains(&k.as_str()) {
            return Err(field_err(
                f,
                format!("claim name {k:?} is reserved (sub, aud, exp, iat, iss, jti, nbf, act)"),
            ));
        }
        if k.starts_with("sigil_") {
            return Err(field_err(
                f,
                format!("claim name {k:?}: the sigil_ prefix is reserved for the server's claims"),
            ));
        }
        validate_text_max(v, MAX_JWT_CLAIM_VALUE)
            .map_err(|r| field_err(f, format!("value of {k:?}: {r}")))?;
    }
    Ok(())
}

/// Checks a list of OAuth scope tokens (RFC 6749 §3.3: `scope-token =
/// 1*( %x21 / %x23-5B / %x5D-7E )`, i.e. printable ASCII except space, `"`
/// and `\`), each at most [`MAX_SCOPE_LEN`] bytes, at most `max` of them.
/// Returns them sorted and deduplicated. The error does not name the
/// field: callers wrap it with theirs.
pub fn validate_scopes(scopes: &[String], max: usize) -> Result<Vec<String>, String> {
    if scopes.len() > max {
        return Err(format!(
            "{} scopes exceed the maximum of {max}",
            scopes.len()
        ));
    }
    for s in scopes {
        if s.is_empty() || s.len() > MAX_SCOPE_LEN {
            return Err(format!(
                "scope {:?} must be 1-{MAX_SCOPE_LEN} bytes",
                preview(s)
            ));
        }
        if !s
            .bytes()
            .all(|b| b == 0x21 || (0x23..=0x5B).contains(&b) || (0x5D..=0x7E).contains(&b))
        {
            return Err(format!(
                "scope {:?} is not an RFC 6749 scope token (printable ASCII without space, '\"' or '\\')",
                preview(s)
            ));
        }
    }
    let mut v = scopes.to_vec();
    v.sort();
    v.dedup();
    Ok(v)
}

/// Checks a DNS SAN (RFC 1035 and RFC 1123 host names): at most 253
/// characters in all, labels of 1-63 letters, digits and '-' that neither
/// start nor end with '-', an optional leading `*.` wildcard label, and a
/// last label that is not all digits. IP addresses are refused: they are not
/// DNS names (and would belong in an IP SAN, which entries do not carry).
pub fn validate_dns_name(d: &str) -> Result<(), &'static str> {
    if d.parse::<std::net::IpAddr>().is_ok() {
        return Err("is an IP address, not a DNS name");
    }
    if d.is_empty() || d.len() > 253 {
        return Err("must be 1-253 characters");
    }
    let name = d.strip_prefix("*.").unwrap_or(d);
    if name.is_empty() {
        return Err("a wildcard needs a domain after `*.`");
    }
    if name
        .rsplit('.')
        .next()
        .is_some_and(|tld| !tld.is_empty() && tld.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err("the last label must not be all digits (an IP address is not a DNS name)");
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err("each label must be 1-63 characters");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err("labels may contain only letters, digits and '-'");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("labels must not start or end with '-'");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    fn good() -> pb::Entry {
        pb::Entry {
            id: "x".into(),
            spiffe_id: "spiffe://example.org/svc".into(),
            parent_id: "spiffe://example.org/agent".into(),
            selectors: vec!["unix:uid:1000".into(), "unix:uid:1000".into()],
            x509_svid_ttl: 300,
            dns_names: vec!["example.org".into()],
            hint: "svc".into(),
            ..Default::default()
        }
    }

    #[test]
    fn valid_entry_round_trips() {
        let e = Entry::from_proto(&good(), &td()).unwrap();
        assert_eq!(e.selectors.len(), 1, "duplicates are removed");
        assert_eq!(e.x509_svid_ttl, Some(Duration::from_secs(300)));
        let back = Entry::from_proto(&e.to_proto(), &td()).unwrap();
        assert_eq!(back, e);
    }

    #[test]
    fn each_bad_field_is_named() {
        type Mutation = Box<dyn Fn(&mut pb::Entry)>;
        let cases: Vec<(&str, Mutation)> = vec![
            (
                "spiffe_id",
                Box::new(|e| e.spiffe_id = "http://example.org/x".into()),
            ),
            (
                "spiffe_id",
                Box::new(|e| e.spiffe_id = "spiffe://other.org/x".into()),
            ),
            (
                "spiffe_id",
                Box::new(|e| e.spiffe_id = "spiffe://example.org/sigil/agent/x".into()),
            ),
            (
                "parent_id",
                Box::new(|e| e.parent_id = "spiffe://example.org/a//b".into()),
            ),
            (
                "selector",
                Box::new(|e| e.selectors = vec!["unix:uid:x".into()]),
            ),
            ("selector", Box::new(|e| e.selectors.clear())),
            (
                "selector",
                Box::new(|e| e.selectors = vec!["unix:uid:007".into()]),
            ),
            (
                "selectors",
                Box::new(|e| e.selectors = vec![format!("docker:label:k:{}", "v".repeat(1024))]),
            ),
            ("x509_svid_ttl", Box::new(|e| e.x509_svid_ttl = -1)),
            ("x509_svid_ttl", Box::new(|e| e.x509_svid_ttl = 999_999_999)),
            ("task_ttl_max", Box::new(|e| e.task_ttl_max = -1)),
            ("task_ttl_max", Box::new(|e| e.task_ttl_max = 301)),
            ("dns", Box::new(|e| e.dns_names = vec!["bad_name".into()])),
            (
                "federates_with",
                Box::new(|e| e.federates_with = vec!["example.org".into()]),
            ),
            (
                "federates_with",
                Box::new(|e| e.federates_with = vec!["Bad Domain".into()]),
            ),
            (
                "spiffe_id",
                Box::new(|e| e.spiffe_id = format!("spiffe://example.org/{}", "a".repeat(2100))),
            ),
            (
                "parent_id",
                Box::new(|e| e.parent_id = format!("spiffe://example.org/{}", "a".repeat(2100))),
            ),
            (
                "selector",
                Box::new(|e| e.selectors = (0..65).map(|i| format!("unix:uid:{i}")).collect()),
            ),
            ("dns", Box::new(|e| e.dns_names = vec!["127.0.0.1".into()])),
            ("dns", Box::new(|e| e.dns_names = vec!["::1".into()])),
            ("dns", Box::new(|e| e.dns_names = vec!["10.0.0.300".into()])),
            ("dns", Box::new(|e| e.dns_names = vec!["a.b.".into()])),
            ("dns", Box::new(|e| e.dns_names = vec!["*.".into()])),
            ("dns", Box::new(|e| e.dns_names = vec!["a.*.org".into()])),
            (
                "dns",
                Box::new(|e| e.dns_names = vec![format!("{}.org", "a".repeat(64))]),
            ),
            (
                "dns",
                Box::new(|e| e.dns_names = vec![format!("{}orgx", "abcdefghi.".repeat(25))]),
            ),
            (
                "dns",
                Box::new(|e| e.dns_names = (0..33).map(|i| format!("h{i}.example.org")).collect()),
            ),
            ("hint", Box::new(|e| e.hint = "abc\u{202E}txt.exe".into())),
            ("hint", Box::new(|e| e.hint = "a\u{2066}b".into())),
            ("hint", Box::new(|e| e.hint = "line\nbreak".into())),
            ("hint", Box::new(|e| e.hint = "h".repeat(257))),
            ("owner", Box::new(|e| e.owner = "team\u{202E}".into())),
            ("owner", Box::new(|e| e.owner = "o".repeat(257))),
            (
                "description",
                Box::new(|e| e.description = "tab\there".into()),
            ),
            (
                "description",
                Box::new(|e| e.description = "d".repeat(1025)),
            ),
            (
                "jwt_claim",
                Box::new(|e| {
                    e.jwt_claims.insert("sub".into(), "x".into());
                }),
            ),
            (
                "jwt_claim",
                Box::new(|e| {
                    e.jwt_claims.insert("act".into(), "x".into());
                }),
            ),
            (
                "jwt_claim",
                Box::new(|e| {
                    e.jwt_claims.insert("sigil_owner".into(), "x".into());
                }),
            ),
            (
                "jwt_claim",
                Box::new(|e| {
                    e.jwt_claims.insert("bad name".into(), "x".into());
                }),
            ),
            (
                "jwt_claim",
                Box::new(|e| {
                    e.jwt_claims.insert("k".into(), "v".repeat(257));
                }),
            ),
            (
                "jwt_claim",
                Box::new(|e| {
                    for i in 0..17 {
                        e.jwt_claims.insert(format!("c{i}"), "v".into());
                    }
                }),
            ),
            (
                "delegable_scope",
                Box::new(|e| e.delegable_scopes = vec!["read mail".into()]),
            ),
            (
                "delegable_scope",
                Box::new(|e| e.delegable_scopes = vec![String::new()]),
            ),
            (
                "delegable_scope",
                Box::new(|e| e.delegable_scopes = vec!["a\\b".into()]),
            ),
            (
                "delegable_scope",
                Box::new(|e| e.delegable_scopes = vec!["s".repeat(129)]),
            ),
            (
                "delegable_scope",
                Box::new(|e| e.delegable_scopes = (0..33).map(|i| format!("s{i}")).collect()),
            ),
            (
                "federates_with",
                Box::new(|e| e.federates_with = (0..65).map(|i| format!("td{i}.org")).collect()),
            ),
        ];
        for (field, mutate) in cases {
            let mut p = good();
            mutate(&mut p);
            let err = Entry::from_proto(&p, &td()).unwrap_err();
            assert_eq!(err.field, field, "{err}");
            assert!(err.to_string().len() < 400, "errors stay short: {err}");
        }
    }

    #[test]
    fn bounds_admit_their_limits() {
        let mut p = good();
        p.spiffe_id = format!("spiffe://example.org/{}", "a".repeat(2048 - 21));
        p.dns_names = vec![
            "*.example.org".into(),
            format!("{}.org", "a".repeat(63)),
            format!("{}org", "abcdefghi.".repeat(25)),
            "xn--bcher-kva.example".into(),
            "1.2.3.example".into(),
        ];
        p.hint = "h".repeat(256);
        p.owner = "team-é".into();
        p.description = "d".repeat(1024);
        for i in 0..16 {
            p.jwt_claims.insert(format!("c.{i}-x_y"), "v".repeat(256));
        }
        p.selectors = (0..64).map(|i| format!("unix:uid:{i}")).collect();
        p.delegable_scopes = (0..32)
            .map(|i| format!("{i}:{}", "s".repeat(120)))
            .collect();
        p.delegable_scopes[0] = "mail.read!#[]^~".into();
        let e = Entry::from_proto(&p, &td()).unwrap();
        assert_eq!(e.delegable_scopes.len(), 32);
        assert_eq!(e.spiffe_id.to_string().len(), 2048);
    }

    #[test]
    fn a_past_expiry_is_refused_for_new_entries_only() {
        let now = 1_800_000_000;
        let mut p = good();
        p.expires_at = now - 1;
        let e = Entry::from_proto(&p, &td()).unwrap();
        assert!(e.is_expired(now), "stored entries still load");
        let err = e.check_expiry_is_future(now).unwrap_err();
        assert_eq!(err.field, "expires_at", "{err}");
        p.expires_at = now + 60;
        let e = Entry::from_proto(&p, &td()).unwrap();
        assert!(e.check_expiry_is_future(now).is_ok());
        p.expires_at = 0;
        let e = Entry::from_proto(&p, &td()).unwrap();
        assert!(e.check_expiry_is_future(now).is_ok());
    }
}
