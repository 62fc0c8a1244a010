//! Selectors: `type:key:value` facts about a workload or a node, and the
//! subset matching that decides which entries a caller gets.
//!
//! Every selector type has one validator in [`KINDS`], used both by the
//! server when an entry is created (so a selector that no attestor could
//! ever produce is refused up front) and by the attestors when they build
//! selectors. A type not in the table is refused with a message naming the
//! known ones.
//!
//! # Canonical forms
//!
//! An entry's selector matches only if it is byte-for-byte what the
//! attestor produces, so values are accepted only in their canonical form:
//!
//! * numbers (`unix:uid`, `unix:gid`, `unix:supplementary_gid`) are decimal
//!   without sign or leading zeros (`5`, never `+5` or `007`);
//! * digests are lowercase hex;
//! * file paths and process-derived names are the raw bytes the kernel
//!   reports, *percent-escaped* by [`escape_bytes`]: `%` itself, control
//!   characters and bytes that are not valid UTF-8 become `%XX` (uppercase
//!   hex); everything else stays as it is. The mapping is one-to-one, so a
//!   binary whose name is not UTF-8 still has exactly one selector, and
//!   [`Selector::from_str`] refuses a `%XX` that would not have been
//!   produced (`%41` for `A`, `%ff` for `%FF`).
//!
//! A selector's value (everything after `type:`) is at most
//! [`MAX_VALUE_LEN`] bytes.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

/// Longest selector value (after `type:`), in bytes.
pub const MAX_VALUE_LEN: usize = 1024;

/// How the part after `type:` is checked.
type Validator = fn(&str) -> Result<(), &'static str>;

/// Every selector type Sigil knows, with the validator of its values.
/// Workload types are produced by the attestors in `sigil-attestors`
/// (`unix`, `container`, `docker`, `k8s`, `systemd`, `ima`), node types by
/// the server's node attestors.
pub const KINDS: &[(&str, Validator)] = &[
    ("unix", validate_unix),
    ("container", validate_container),
    ("docker", validate_docker),
    ("k8s", validate_k8s),
    ("systemd", validate_systemd),
    ("ima", validate_ima),
    ("tpm", validate_free),
    ("x509pop", validate_free),
    ("join_token", validate_free),
];

/// The names of [`KINDS`], in order.
pub fn known_types() -> impl Iterator<Item = &'static str> {
    KINDS.iter().map(|(k, _)| *k)
}

/// A selector could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SelectorError {
    /// Not of the form `type:value`.
    #[error("selector {0:?} is not of the form type:key:value")]
    Format(String),
    /// The type is not one Sigil knows.
    #[error(
        "selector {0:?} has unknown type {1:?} (known: {known})",
        known = known_types().collect::<Vec<_>>().join(", ")
    )]
    UnknownType(String, String),
    /// The key/value part is malformed for the type.
    #[error("selector {0:?}: {1}")]
    BadValue(String, &'static str),
    /// The value is longer than [`MAX_VALUE_LEN`].
    #[error(
        "selectors: a selector of type {kind:?} has a {len}-byte value; at most {max} bytes are allowed",
        max = MAX_VALUE_LEN
    )]
    TooLong {
        /// The selector type.
        kind: String,
        /// The value's length in bytes.
        len: usize,
    },
}

/// Percent-escapes raw bytes (a path, a process name) into the canonical,
/// lossless text form selectors use: `%`, control characters and bytes of
/// invalid UTF-8 sequences become `%XX` with uppercase hex digits.
pub fn escape_bytes(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    let push_hex = |out: &mut String, b: u8| {
        const HEX: &[u8; 16] = b"0123456789ABCDEF";
        out.push('%');
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    };
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c == '%' || c.is_control() {
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    push_hex(&mut out, b);
                }
            } else {
                out.push(c);
            }
        }
        for &b in chunk.invalid() {
            push_hex(&mut out, b);
        }
    }
    out
}

/// Reverses [`escape_bytes`]; `None` if `s` is not in its canonical form
/// (a stray `%`, lowercase hex, or an escape that was not needed).
pub fn unescape_bytes(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = |c: u8| match c {
                b'0'..=b'9' => Some(c - b'0'),
                b'A'..=b'F' => Some(c - b'A' + 10),
                _ => None,
            };
            let hi = hex(*b.get(i + 1)?)?;
            let lo = hex(*b.get(i + 2)?)?;
            out.push(hi << 4 | lo);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    (escape_bytes(&out) == s).then_some(out)
}

/// A canonical unsigned decimal: `0`, or digits without a leading zero,
/// that fits in a u32.
fn canonical_u32(v: &str) -> bool {
    v.parse::<u32>().is_ok_and(|n| n.to_string() == v)
}

fn lower_hex(v: &str, len: usize) -> bool {
    v.len() == len && v.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Splits `key:rest`; the key must be one of `keys`.
fn key_value<'a>(
    value: &'a str,
    keys: &[&str],
    unknown: &'static str,
) -> Result<(&'a str, &'a str), &'static str> {
    let (key, v) = value
        .split_once(':')
        .ok_or("expected <type>:<key>:<value>")?;
    if !keys.contains(&key) {
        return Err(unknown);
    }
    if v.is_empty() {
        return Err("empty value");
    }
    Ok((key, v))
}

/// `K:V` with a non-empty `K` (labels, env variables, pod owners).
fn pair(v: &str, what: &'static str) -> Result<(), &'static str> {
    match v.split_once(':') {
        Some((k, _)) if !k.is_empty() => Ok(()),
        _ => Err(what),
    }
}

fn validate_unix(value: &str) -> Result<(), &'static str> {
    let (key, v) = key_value(
        value,
        &[
            "uid",
            "gid",
            "user",
            "group",
            "path",
            "sha256",
            "supplementary_gid",
        ],
        "unknown unix key (uid, gid, user, group, path, sha256, supplementary_gid)",
    )?;
    match key {
        "uid" | "gid" | "supplementary_gid" if !canonical_u32(v) => {
            Err("uid/gid must be a number in canonical form (decimal, no sign, no leading zeros)")
        }
        "sha256" if !lower_hex(v, 64) => Err("sha256 must be 64 lowercase hex digits"),
        "path" if unescape_bytes(v).is_none() => Err(
            "path must be percent-escaped canonically: `%`, control characters and non-UTF-8 bytes as %XX (uppercase hex), nothing else escaped",
        ),
        _ => Ok(()),
    }
}

fn validate_container(value: &str) -> Result<(), &'static str> {
    let (key, v) = key_value(
        value,
        &["id", "runtime"],
        "unknown container key (id, runtime)",
    )?;
    match key {
        "id" if !v
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')) =>
        {
            Err("container id must be letters, digits, `-`, `_` or `.`")
        }
        "runtime" if !matches!(v, "docker" | "containerd" | "crio" | "podman") => {
            Err("container runtime must be docker, containerd, crio or podman")
        }
        _ => Ok(()),
    }
}

fn validate_docker(value: &str) -> Result<(), &'static str> {
    let (key, v) = key_value(
        value,
        &[
            "image_id",
            "image_config_digest",
            "label",
            "env",
            "container_name",
        ],
        "unknown docker key (image_id, image_config_digest, label, env, container_name)",
    )?;
    match key {
        "label" => pair(v, "expected docker:label:KEY:VALUE"),
        "env" => pair(v, "expected docker:env:NAME:VALUE"),
        _ => Ok(()),
    }
}

fn validate_k8s(value: &str) -> Result<(), &'static str> {
    let (key, v) = key_value(
        value,
        &[
            "ns",
            "sa",
            "pod-name",
            "pod-uid",
            "pod-label",
            "pod-owner",
            "container-name",
            "container-image",
            "node-name",
        ],
        "unknown k8s key (ns, sa, pod-name, pod-uid, pod-label, pod-owner, container-name, container-image, node-name)",
    )?;
    match key {
        "pod-label" => pair(v, "expected k8s:pod-label:KEY:VALUE"),
        "pod-owner" => pair(v, "expected k8s:pod-owner:KIND:NAME"),
        _ => Ok(()),
    }
}

fn validate_systemd(value: &str) -> Result<(), &'static str> {
    let (key, v) = key_value(
        value,
        &["id", "fragment_path"],
        "unknown systemd key (id, fragment_path)",
    )?;
    match key {
        "fragment_path" if unescape_bytes(v).is_none() => {
            Err("fragment_path must be percent-escaped canonically (as unix:path)")
        }
        _ => Ok(()),
    }
}

fn validate_ima(value: &str) -> Result<(), &'static str> {
    let (_, v) = key_value(value, &["sha256"], "unknown ima key (sha256)")?;
    if lower_hex(v, 64) {
        Ok(())
    } else {
        Err("ima sha256 must be 64 lowercase hex digits")
    }
}

/// Node selector types, produced by the server itself: any non-empty value.
fn validate_free(_value: &str) -> Result<(), &'static str> {
    Ok(())
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
        let Some((_, validate)) = KINDS.iter().find(|(k, _)| *k == kind) else {
            return Err(SelectorError::UnknownType(s.to_string(), kind.to_string()));
        };
        if value.len() > MAX_VALUE_LEN {
            return Err(SelectorError::TooLong {
                kind: kind.to_string(),
                len: value.len(),
            });
        }
        validate(value).map_err(|why| SelectorError::BadValue(s.to_string(), why))?;
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
        assert!(e.contains("unix, container, docker, k8s"), "{e}");
    }

    #[test]
    fn numbers_must_be_canonical() {
        for good in [
            "unix:uid:0",
            "unix:uid:5",
            "unix:gid:4294967295",
            "unix:supplementary_gid:10",
        ] {
            sel(good);
        }
        for bad in [
            "unix:uid:+5",
            "unix:uid:007",
            "unix:uid:00",
            "unix:uid:-1",
            "unix:uid: 5",
            "unix:gid:4294967296",
            "unix:supplementary_gid:01",
        ] {
            let e = bad.parse::<Selector>().unwrap_err().to_string();
            assert!(e.contains("canonical"), "{bad:?}: {e}");
        }
        assert!("unix:sha256:".to_string().parse::<Selector>().is_err());
        let upper = format!("unix:sha256:{}", "AB".repeat(32));
        assert!(upper.parse::<Selector>().is_err());
        sel(&format!("unix:sha256:{}", "ab".repeat(32)));
    }

    #[test]
    fn escaping_is_lossless_and_canonical() {
        let cases: &[(&[u8], &str)] = &[
            (b"/usr/bin/python3", "/usr/bin/python3"),
            (b"/opt/caf\xc3\xa9", "/opt/caf\u{e9}"),
            (b"/tmp/sl\xffeep", "/tmp/sl%FFeep"),
            (b"/tmp/100%", "/tmp/100%25"),
            (b"/tmp/a\nb", "/tmp/a%0Ab"),
            (b"/tmp/\xc3", "/tmp/%C3"),
            (b"/tmp/c1\xc2\x85", "/tmp/c1%C2%85"),
        ];
        for (raw, text) in cases {
            assert_eq!(escape_bytes(raw), *text);
            assert_eq!(unescape_bytes(text).as_deref(), Some(*raw));
            sel(&format!("unix:path:{text}"));
        }
        // Escapes that escape_bytes would never produce are refused.
        for bad in [
            "/tmp/%41",
            "/tmp/%ff",
            "/tmp/%",
            "/tmp/%F",
            "/tmp/100%zz",
            "/tmp/%C3%A9",
        ] {
            assert_eq!(unescape_bytes(bad), None, "{bad}");
            let e = format!("unix:path:{bad}")
                .parse::<Selector>()
                .unwrap_err()
                .to_string();
            assert!(e.contains("percent-escaped"), "{e}");
        }
        // Every byte string round-trips.
        let all: Vec<u8> = (0..=255u8).collect();
        assert_eq!(unescape_bytes(&escape_bytes(&all)), Some(all));
    }

    #[test]
    fn values_are_bounded() {
        sel(&format!("docker:label:k:{}", "v".repeat(MAX_VALUE_LEN - 8)));
        let long = format!("docker:label:k:{}", "v".repeat(MAX_VALUE_LEN));
        let e = long.parse::<Selector>().unwrap_err();
        assert!(matches!(e, SelectorError::TooLong { .. }), "{e}");
        assert!(e.to_string().contains("selectors"), "{e}");
    }

    #[test]
    fn workload_types_check_their_keys() {
        for good in [
            "container:id:0123abcd",
            "container:runtime:containerd",
            "docker:label:team:sec",
            "docker:env:MODE:prod",
            "docker:image_id:sha256:abc",
            "k8s:pod-owner:ReplicaSet:web-5d4",
            "k8s:ns:default",
            "systemd:id:nginx.service",
            "systemd:fragment_path:/usr/lib/systemd/system/nginx.service",
            "tpm:pcr:sha256:7:00",
        ] {
            sel(good);
        }
        for bad in [
            "container:id:a/b",
            "container:runtime:lxc",
            "docker:label::v",
            "docker:label:novalue",
            "docker:colour:red",
            "k8s:namespace:x",
            "systemd:unit:x",
            "ima:sha256:xyz",
        ] {
            assert!(bad.parse::<Selector>().is_err(), "{bad:?} accepted");
        }
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
