//! The hashed JSON of an `x509_svids_issued` record, written directly.
//!
//! A mint batch's record lists up to 1000 SVIDs (about 170 bytes each) and
//! is written once per batch on the server's signing path. serde_json
//! produces it through a serializer call per key and per value, escaping
//! every key and formatting each SPIFFE ID through `Display`; this module
//! appends the same bytes with plain string pushes, checking each string
//! once for the characters JSON must escape and handing only those strings
//! to serde_json.
//!
//! It is an optimization of [`super::next_line`] and
//! [`super::next_batch_line`] only ([`BatchRows`] lets the server write the
//! rows while it signs): the canonical
//! encoding stays defined by serde_json ([`super::Record::canonical_encoding`]
//! and the verifier use it), so a difference here would make `audit
//! verify` refuse the record, and the tests compare both writers byte for
//! byte.

use spiffe::SpiffeId;

use super::{Digest, Event, IssuedX509Svid};
use crate::caller::Caller;

/// One SVID of a mint batch, borrowed from wherever the server holds it
/// (its entry, its signed leaf): what [`super::next_batch_line`] lists
/// without copying each entry's ID and SPIFFE ID into an
/// [`IssuedX509Svid`] first. Written exactly as that type is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IssuedRef<'a> {
    /// The entry it was issued under.
    pub entry_id: &'a str,
    /// Its URI SAN.
    pub spiffe_id: &'a SpiffeId,
    /// Its serial number, lowercase hex.
    pub serial: &'a str,
    /// Its `notAfter`, Unix seconds.
    pub expires_at: i64,
}

impl<'a> IssuedRef<'a> {
    /// A borrowed view of an owned row.
    pub fn of(s: &'a IssuedX509Svid) -> Self {
        Self {
            entry_id: &s.entry_id,
            spiffe_id: &s.spiffe_id,
            serial: &s.serial,
            expires_at: s.expires_at,
        }
    }
}

/// The `svids` array of an `x509_svids_issued` record, written one row at
/// a time: the server appends each SVID's row right after signing it, while
/// the entry's ID and SPIFFE ID are still in the core's cache, instead of
/// walking a thousand cold entries again when the record is built. The
/// rows are the same bytes [`super::next_line`] writes for the event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchRows {
    /// The rows, comma-separated, without the enclosing brackets.
    json: String,
}

impl BatchRows {
    /// Room for `n` rows of the usual size (about 170 bytes each).
    pub fn with_capacity(n: usize) -> Self {
        Self {
            json: String::with_capacity(n.saturating_mul(192)),
        }
    }

    /// Appends one SVID's row (a row is never empty, so an empty buffer
    /// means the first row).
    pub fn push(&mut self, row: &IssuedRef<'_>) {
        if !self.json.is_empty() {
            self.json.push(',');
        }
        push_svid(&mut self.json, row);
    }
}

impl<'a> FromIterator<IssuedRef<'a>> for BatchRows {
    fn from_iter<I: IntoIterator<Item = IssuedRef<'a>>>(rows: I) -> Self {
        let rows = rows.into_iter();
        let mut out = Self::with_capacity(rows.size_hint().0);
        rows.for_each(|r| out.push(&r));
        out
    }
}

/// The hashed object of the record (`hash` absent) when `event` is an
/// [`Event::X509SvidsIssued`]; `None` for every other event, which the
/// caller serializes with serde_json.
pub(super) fn hashed_object(
    seq: u64,
    time: i64,
    at: &str,
    caller: &Caller,
    event: &Event,
    prev_hash: &Digest,
) -> Option<String> {
    let Event::X509SvidsIssued { agent_id, svids } = event else {
        return None;
    };
    let rows: BatchRows = svids.iter().map(IssuedRef::of).collect();
    Some(batch_object(
        seq, time, at, caller, agent_id, &rows, prev_hash,
    ))
}

/// The hashed object of an `x509_svids_issued` record of `rows`.
pub(super) fn batch_object(
    seq: u64,
    time: i64,
    at: &str,
    caller: &Caller,
    agent_id: &SpiffeId,
    rows: &BatchRows,
    prev_hash: &Digest,
) -> String {
    // Under 400 bytes besides the rows; the `hash` member is reserved for
    // when it is appended.
    let mut out = String::with_capacity(512 + rows.json.len());
    out.push_str("{\"seq\":");
    out.push_str(itoa::Buffer::new().format(seq));
    out.push_str(",\"time\":");
    out.push_str(itoa::Buffer::new().format(time));
    out.push_str(",\"at\":");
    push_str(&mut out, at);
    out.push_str(",\"caller\":");
    out.push_str(&super::record::json(caller));
    out.push_str(",\"event\":{\"kind\":\"x509_svids_issued\",\"agent_id\":");
    push_id(&mut out, agent_id);
    out.push_str(",\"svids\":[");
    out.push_str(&rows.json);
    out.push_str("]},\"prev_hash\":\"");
    out.push_str(&hex::encode(prev_hash.as_bytes()));
    out.push_str("\"}");
    out
}

fn push_svid(out: &mut String, s: &IssuedRef<'_>) {
    out.push_str("{\"entry_id\":");
    push_str(out, s.entry_id);
    out.push_str(",\"spiffe_id\":");
    push_id(out, s.spiffe_id);
    out.push_str(",\"serial\":");
    push_str(out, s.serial);
    out.push_str(",\"expires_at\":");
    out.push_str(itoa::Buffer::new().format(s.expires_at));
    out.push('}');
}

/// Whether serde_json writes `s` between quotes unchanged: it escapes only
/// `"`, `\` and the control characters below U+0020.
fn plain(s: &str) -> bool {
    s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\')
}

/// `s` as a JSON string, spelled as serde_json spells it.
fn push_str(out: &mut String, s: &str) {
    if plain(s) {
        out.push('"');
        out.push_str(s);
        out.push('"');
    } else {
        // Serializing a string to a String cannot fail; the fallback is
        // only reached for strings that need escapes.
        out.push_str(&serde_json::to_string(s).unwrap_or_default());
    }
}

/// A SPIFFE ID as its text (what `serde_text` writes), without building
/// the text first.
fn push_id(out: &mut String, id: &SpiffeId) {
    let (td, path) = (id.trust_domain_name(), id.path());
    if plain(td) && plain(path) {
        out.push_str("\"spiffe://");
        out.push_str(td);
        out.push_str(path);
        out.push('"');
    } else {
        push_str(out, &id.to_string());
    }
}
