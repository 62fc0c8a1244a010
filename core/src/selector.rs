//! Selectors: `type:key:value` facts about a workload or a node, and the
//! subset matching that decides which entries a caller gets.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

/// Selector types Sigil knows. Anything else is a typo and is refused.
pub const KNOWN_TYPES: &[&str] = &[
    "unix",
    "container",
    "docker",
    "k8s",
    "systemd",
    "tpm",
    "x509pop",
    "join_token",
];

/// Keys allowed after `unix:`; the value check for each is in [`Selector::from_str`].
const UNIX_KEYS: &[&str] = &[
    "uid",
    "gid",
    "user",
    "group",
    "path",
    "sha256",
    "supplementary_gid",
];

/// A selector could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SelectorError {
    /// Not of the form `type:value`.
    #[error("selector {0:?} is not of the form type:key:value")]
    Format(String),
    /// The type is not one Sigil knows.
    #[error(
        "selector {0:?} has unknown type {1:?} (known: unix, container, docker, k8s, systemd, tpm, x509pop)"
    )]
    UnknownType(String, String),
    /// The key/value part is malformed for the type.
    #[error("selector {0:?}: {1}")]
    BadValue(String, &'static str),
}

/// One validated selector. Its text form is `type:value`, where the value
/// usually is `key:value` and may itself contain colons.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Selector {
    text: String,
    type_len: usize,
}

impl Selector {
    /// Builds a selector from its type and value (`unix`, `uid:1000`).
    pub fn new(kind: &str, value: &str) -> Result<Self, SelectorError> {
        format!("{kind}:{value}").parse()
    }

    /// The selector type (`unix`).
    pub fn kind(&self) -> &str {
        &self.text[..self.type_len]
    }

    /// Everything after the type (`uid:1000`).
    pub fn value(&self) -> &str {
        &self.text[self.type_len + 1..]
    }

    /// The full text form (`unix:uid:1000`).
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl FromStr for Selector {
    type Err = SelectorError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let Some((kind, value)) = s.split_once(':') else {
            return Err(SelectorError::Format(s.to_string()));
        };
        if value.is_empty() || s.chars().any(char::is_control) {
            return Err(SelectorError::Format(s.to_string()));
        }
        if !KNOWN_TYPES.contains(&kind) {
            return Err(SelectorError::UnknownType(s.to_string(), kind.to_string()));
        }
        if kind == "unix" {
            let Some((key, v)) = value.split_once(':') else {
                return Err(SelectorError::BadValue(
                    s.to_string(),
                    "expected unix:<key>:<value>",
                ));
            };
            if !UNIX_KEYS.contains(&key) {
                return Err(SelectorError::BadValue(
                    s.to_string(),
                    "unknown unix key (uid, gid, user, group, path, sha256, supplementary_gid)",
                ));
            }
            if v.is_empty() {
                return Err(SelectorError::BadValue(s.to_string(), "empty value"));
            }
            let numeric = matches!(key, "uid" | "gid" | "supplementary_gid");
            if numeric && v.parse::<u32>().is_err() {
                return Err(SelectorError::BadValue(
                    s.to_string(),
                    "uid/gid must be a number",
                ));
            }
            if key == "sha256" && (v.len() != 64 || !v.bytes().all(|b| b.is_ascii_hexdigit())) {
                return Err(SelectorError::BadValue(
                    s.to_string(),
                    "sha256 must be 64 hex digits",
                ));
            }
        }
        Ok(Selector {
            text: s.to_string(),
            type_len: kind.len(),
        })
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// A set of selectors describing one caller (a workload or a node).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SelectorSet(BTreeSet<Selector>);

impl SelectorSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a selector.
    pub fn insert(&mut self, s: Selector) {
        self.0.insert(s);
    }

    /// True when every selector of `required` is in this set. An empty
    /// `required` never matches: an entry must select something.
    pub fn satisfies(&self, required: &[Selector]) -> bool {
        !required.is_empty() && required.iter().all(|s| self.0.contains(s))
    }

    /// Iterates the selectors in order.
    pub fn iter(&self) -> impl Iterator<Item = &Selector> {
        self.0.iter()
    }

    /// Number of selectors.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when the set has no selectors.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromIterator<Selector> for SelectorSet {
    fn from_iter<I: IntoIterator<Item = Selector>>(iter: I) -> Self {
        Self(iter.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(s: &str) -> Selector {
        s.parse().unwrap()
    }

    #[test]
    fn parses_and_splits() {
        let s = sel("docker:label:app:web");
        assert_eq!(s.kind(), "docker");
        assert_eq!(s.value(), "label:app:web");
        assert_eq!(s.to_string(), "docker:label:app:web");
    }

    #[test]
    fn rejects_malformed_selectors_with_reason() {
        for bad in [
            "",
            "unix",
            "unix:",
            "nope:x:y",
            "unix:uid:abc",
            "unix:bogus:1",
            "unix:uid:",
            "unix:sha256:12",
        ] {
            assert!(bad.parse::<Selector>().is_err(), "{bad:?} accepted");
        }
        let e = "nope:x:y".parse::<Selector>().unwrap_err().to_string();
        assert!(e.contains("unknown type"), "{e}");
    }

    #[test]
    fn subset_matching() {
        let set: SelectorSet = [
            sel("unix:uid:1000"),
            sel("unix:gid:1000"),
            sel("unix:user:bob"),
        ]
        .into_iter()
        .collect();
        assert!(set.satisfies(&[sel("unix:uid:1000")]));
        assert!(set.satisfies(&[sel("unix:uid:1000"), sel("unix:user:bob")]));
        assert!(!set.satisfies(&[sel("unix:uid:1000"), sel("unix:user:eve")]));
        assert!(!set.satisfies(&[]));
    }
}
