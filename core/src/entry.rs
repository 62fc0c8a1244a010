//! Registration entries: which SPIFFE ID a workload (or node group) gets,
//! under which parent, for which selectors. Entries arrive as wire messages
//! and become [`Entry`] only through validation, so a stored or synced entry
//! is always well-formed.

use std::time::Duration;

use sigil_proto::common as pb;
use spiffe::{SpiffeId, TrustDomain};

use crate::selector::Selector;

/// Longest SVID TTL an entry may ask for.
pub const MAX_TTL: Duration = Duration::from_secs(30 * 86_400);

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
    /// Bumped on every update.
    pub revision: i64,
    /// Unix seconds of creation.
    pub created_at: i64,
}

impl Entry {
    /// Validates a wire entry. `td` is the server's trust domain: the entry's
    /// SPIFFE ID must be in it.
    pub fn from_proto(p: &pb::Entry, td: &TrustDomain) -> Result<Self, EntryError> {
        let spiffe_id = SpiffeId::new(&p.spiffe_id)
            .map_err(|e| field_err("spiffe_id", format!("{:?}: {e}", p.spiffe_id)))?;
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
        let parent_id = SpiffeId::new(&p.parent_id)
            .map_err(|e| field_err("parent_id", format!("{:?}: {e}", p.parent_id)))?;
        if !parent_id.is_member_of(td) {
            return Err(field_err(
                "parent_id",
                format!("{parent_id} is not in trust domain {td}"),
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
        let mut dns_names = Vec::with_capacity(p.dns_names.len());
        for d in &p.dns_names {
            validate_dns_name(d).map_err(|r| field_err("dns", format!("{d:?}: {r}")))?;
            if !dns_names.contains(d) {
                dns_names.push(d.clone());
            }
        }
        if p.hint.len() > 256 || p.hint.chars().any(char::is_control) {
            return Err(field_err("hint", "at most 256 printable characters"));
        }
        if p.owner.len() > 256 || p.owner.chars().any(char::is_control) {
            return Err(field_err("owner", "at most 256 printable characters"));
        }
        let federates_with = p
            .federates_with
            .iter()
            .map(|t| {
                TrustDomain::new(t).map_err(|e| field_err("federates_with", format!("{t:?}: {e}")))
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
        }
    }

    /// True when the entry has an expiry in the past.
    pub fn is_expired(&self, now_unix: i64) -> bool {
        self.expires_at.is_some_and(|t| t <= now_unix)
    }
}

/// Checks a DNS SAN: LDH labels, optional leading `*.` wildcard.
pub fn validate_dns_name(d: &str) -> Result<(), &'static str> {
    let name = d.strip_prefix("*.").unwrap_or(d);
    if name.is_empty() || name.len() > 253 {
        return Err("must be 1-253 characters");
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
            ("dns", Box::new(|e| e.dns_names = vec!["bad_name".into()])),
            (
                "federates_with",
                Box::new(|e| e.federates_with = vec!["example.org".into()]),
            ),
            (
                "federates_with",
                Box::new(|e| e.federates_with = vec!["Bad Domain".into()]),
            ),
        ];
        for (field, mutate) in cases {
            let mut p = good();
            mutate(&mut p);
            let err = Entry::from_proto(&p, &td()).unwrap_err();
            assert_eq!(err.field, field, "{err}");
        }
    }
}
