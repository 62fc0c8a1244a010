//! Records, their canonical encoding and hash, the chain head, and the JSON
//! lines export format.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use spiffe::SpiffeId;

use super::{BatchRows, Event};
use crate::caller::Caller;

/// Domain-separation prefix of the bytes a record's hash is taken over.
pub const RECORD_DOMAIN: &[u8] = b"sigil-audit-record-v1\n";

/// A SHA-256 digest, written as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Digest([u8; 32]);

impl Digest {
    /// All zeros: the `prev_hash` of record 1.
    pub const ZERO: Self = Self([0; 32]);

    /// Wraps raw digest bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw digest bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// SHA-256 of `data`.
    pub fn sha256(data: &[u8]) -> Self {
        let d = ring::digest::digest(&ring::digest::SHA256, data);
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        Self(out)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

/// A string that is not 64 lowercase hex digits was given as a [`Digest`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expected a SHA-256 digest as 64 lowercase hex digits, got {0:?}")]
pub struct DigestError(pub String);

impl FromStr for Digest {
    type Err = DigestError;

    /// Only the canonical form is accepted (no uppercase), so that a digest
    /// has exactly one spelling.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let canonical = s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        let mut out = [0u8; 32];
        if !canonical || hex::decode_to_slice(s, &mut out).is_err() {
            return Err(DigestError(s.chars().take(80).collect()));
        }
        Ok(Self(out))
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The chain's head: the last record's sequence number and hash. The
/// backend stores it beside the records, inside the same transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Head {
    /// Sequence number of the last record.
    pub seq: u64,
    /// Hash of the last record.
    pub hash: Digest,
}

/// One link of the audit chain.
///
/// Build records with [`next`], which sets `seq`, `prev_hash` and `hash`;
/// the fields are public so that backends can store and load them, and
/// [`super::verify`] recomputes everything it relies on.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "RecordIn")]
pub struct Record {
    /// Position in the chain, from 1, without gaps.
    pub seq: u64,
    /// When the change happened, Unix seconds (server clock).
    pub time: i64,
    /// Who caused it.
    pub caller: Caller,
    /// What happened.
    pub event: Event,
    /// Hash of record `seq - 1`, or [`Digest::ZERO`] for record 1.
    pub prev_hash: Digest,
    /// Hash of this record: SHA-256 of [`Record::canonical_encoding`].
    pub hash: Digest,
}

/// The record that follows `head` (or the first record, if the chain is
/// empty), with its hash computed. The caller must serialize appends on the
/// head: read it, build the record, and store both the record and
/// [`Record::head`] in one transaction.
pub fn next(head: Option<&Head>, time: i64, caller: Caller, event: Event) -> Record {
    next_with_line(head, time, caller, event).0
}

/// [`next`], also returning the record's export line
/// ([`Record::to_jsonl_line`]) from the same serialization: the hashed
/// object is written once, hashed, and the line is that object with
/// `"hash"` appended as its last member. An append stores the line as it
/// is, so a record costs one serialization instead of two.
pub fn next_with_line(
    head: Option<&Head>,
    time: i64,
    caller: Caller,
    event: Event,
) -> (Record, String) {
    let (new_head, line) = next_line(head, time, &caller, &event);
    let record = Record {
        seq: new_head.seq,
        time,
        caller,
        event,
        prev_hash: head.map_or(Digest::ZERO, |h| h.hash),
        hash: new_head.hash,
    };
    (record, line)
}

/// The export line of the record that follows `head` and the head after
/// it, from borrowed parts: what [`next_with_line`] returns without
/// building (or owning) the record, so an event can be appended again if
/// its transaction is retried without being copied first.
pub fn next_line(head: Option<&Head>, time: i64, caller: &Caller, event: &Event) -> (Head, String) {
    let (seq, prev_hash) = follow(head);
    let at = crate::rfc3339(time);
    // A mint batch's record is the one written per batch on the signing
    // path: it has a direct writer of the same bytes.
    let line = match super::batch_line::hashed_object(seq, time, &at, caller, event, &prev_hash) {
        Some(line) => line,
        None => json(&RecordOut {
            seq,
            time,
            at,
            caller,
            event,
            prev_hash: &prev_hash,
            hash: None,
        }),
    };
    finish_line(seq, line)
}

/// [`next_line`] of an [`Event::X509SvidsIssued`] by `agent_id` listing
/// `rows`: the same head and line as `next_line` of that event, without
/// the event.
pub fn next_batch_line(
    head: Option<&Head>,
    time: i64,
    caller: &Caller,
    agent_id: &SpiffeId,
    rows: &BatchRows,
) -> (Head, String) {
    let (seq, prev_hash) = follow(head);
    let at = crate::rfc3339(time);
    let line = super::batch_line::batch_object(seq, time, &at, caller, agent_id, rows, &prev_hash);
    finish_line(seq, line)
}

/// The sequence number and `prev_hash` of the record after `head`.
fn follow(head: Option<&Head>) -> (u64, Digest) {
    match head {
        Some(h) => (h.seq.saturating_add(1), h.hash),
        None => (1, Digest::ZERO),
    }
}

/// Hashes the hashed object `line` of record `seq` and appends its `hash`
/// member, making it the export line.
fn finish_line(seq: u64, mut line: String) -> (Head, String) {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(RECORD_DOMAIN);
    ctx.update(line.as_bytes());
    let mut hash = [0u8; 32];
    hash.copy_from_slice(ctx.finish().as_ref());
    // The object ends in `}`: reopen it for the last member.
    line.pop();
    line.reserve(76);
    line.push_str(",\"hash\":\"");
    line.push_str(&hex::encode(hash));
    line.push_str("\"}");
    (
        Head {
            seq,
            hash: Digest(hash),
        },
        line,
    )
}

impl Head {
    /// The head a stored export line leaves, read from its first member
    /// (`{"seq":N,`) and its last (`,"hash":"<64 hex digits>"}`) without
    /// decoding the record between them: appending after a record needs
    /// only these two, and a batch record can be tens of kilobytes.
    /// Nothing else of the line is checked; [`super::verify`] checks every
    /// record in full.
    pub fn of_line(line: &str) -> Result<Head, LineError> {
        let bad =
            || LineError::Json("expected a record line: `{\"seq\":N,...,\"hash\":\"...\"}`".into());
        let rest = line.strip_prefix("{\"seq\":").ok_or_else(bad)?;
        let digits = rest.split(',').next().unwrap_or_default();
        let seq: u64 = digits.parse().map_err(|_| bad())?;
        if seq.to_string() != digits {
            return Err(LineError::NotCanonical);
        }
        let body = line.strip_suffix("\"}").ok_or_else(bad)?;
        let split = body.len().checked_sub(64).ok_or_else(bad)?;
        let (before, hex_hash) = (body.get(..split).ok_or_else(bad)?, &body[split..]);
        if !before.ends_with(",\"hash\":\"") {
            return Err(bad());
        }
        let hash = hex_hash.parse().map_err(|_| LineError::NotCanonical)?;
        Ok(Head { seq, hash })
    }
}

/// The JSON object a record is written as. Field order is the encoding's
/// field order; `hash` is absent from the hashed form.
#[derive(Serialize)]
struct RecordOut<'a> {
    seq: u64,
    time: i64,
    at: String,
    caller: &'a Caller,
    event: &'a Event,
    prev_hash: &'a Digest,
    #[serde(skip_serializing_if = "Option::is_none")]
    hash: Option<&'a Digest>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordIn {
    seq: u64,
    time: i64,
    at: String,
    caller: Caller,
    event: Event,
    prev_hash: Digest,
    hash: Digest,
}

impl TryFrom<RecordIn> for Record {
    type Error = String;

    fn try_from(r: RecordIn) -> Result<Self, Self::Error> {
        let at = crate::rfc3339(r.time);
        if r.at != at {
            return Err(format!(
                "field `at` is {:?} but `time` {} is {at:?}",
                r.at, r.time
            ));
        }
        Ok(Self {
            seq: r.seq,
            time: r.time,
            caller: r.caller,
            event: r.event,
            prev_hash: r.prev_hash,
            hash: r.hash,
        })
    }
}

impl Serialize for Record {
    /// The export form: the canonical object including `hash`.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.out(true).serialize(s)
    }
}

impl Record {
    /// The chain head after this record.
    pub fn head(&self) -> Head {
        Head {
            seq: self.seq,
            hash: self.hash,
        }
    }

    fn out(&self, with_hash: bool) -> RecordOut<'_> {
        RecordOut {
            seq: self.seq,
            time: self.time,
            at: crate::rfc3339(self.time),
            caller: &self.caller,
            event: &self.event,
            prev_hash: &self.prev_hash,
            hash: with_hash.then_some(&self.hash),
        }
    }

    /// The bytes the record's hash is taken over:
    /// `"sigil-audit-record-v1\n"` followed by the record's JSON line
    /// without its `hash` member — compact JSON (no whitespace), members in
    /// the fixed order `seq, time, at, caller, event, prev_hash`, nested
    /// objects in their declared field order, entry snapshots with sorted
    /// keys, strings as serde_json escapes them (`"`, `\` and control
    /// characters only; other text as UTF-8).
    pub fn canonical_encoding(&self) -> Vec<u8> {
        let mut out = RECORD_DOMAIN.to_vec();
        out.extend_from_slice(json(&self.out(false)).as_bytes());
        out
    }

    /// SHA-256 of [`Self::canonical_encoding`]: what `hash` must be.
    pub fn compute_hash(&self) -> Digest {
        Digest::sha256(&self.canonical_encoding())
    }

    /// The record as one line of the JSON lines export (no trailing
    /// newline): the hashed object with `"hash"` appended as its last
    /// member. Hence, for an independent checker, the hash of a line is
    /// `SHA-256("sigil-audit-record-v1\n" || line[..i] || "}")`, where `i`
    /// is where the final `,"hash":"` begins.
    pub fn to_jsonl_line(&self) -> String {
        json(&self.out(true))
    }

    /// Parses one export line. The line must be exactly the canonical form
    /// of the record it describes ([`Self::to_jsonl_line`]): any other
    /// spelling (whitespace, key order, escapes, number forms) is refused, so
    /// that every byte of an export is covered by its record's hash.
    pub fn from_jsonl_line(line: &str) -> Result<Self, LineError> {
        let record: Self =
            serde_json::from_str(line).map_err(|e| LineError::Json(e.to_string()))?;
        if record.to_jsonl_line() != line {
            return Err(LineError::NotCanonical);
        }
        Ok(record)
    }
}

pub(super) fn json<T: Serialize>(value: &T) -> String {
    #[expect(
        clippy::expect_used,
        reason = "records hold only strings, integers, lists and string-keyed JSON \
                  values, whose serialization to a String cannot fail"
    )]
    serde_json::to_string(value).expect("audit records serialize")
}

/// Why one export line is not a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LineError {
    /// The line is not UTF-8 text.
    #[error("expected UTF-8 text")]
    NotUtf8,
    /// The line is empty; an export has one record per line and no blank lines.
    #[error("expected a record, found an empty line")]
    Empty,
    /// The line is not a record's JSON object (bad syntax, missing or unknown
    /// field, bad value).
    #[error("expected a record's JSON object: {0}")]
    Json(String),
    /// The line parses but is not spelled as the record's canonical encoding.
    #[error("expected the record's canonical encoding (compact JSON, fixed field order)")]
    NotCanonical,
}

/// An export could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {error}")]
pub struct ParseError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong with it.
    pub error: LineError,
}

/// Parses a JSON lines export: one [`Record::to_jsonl_line`] per line, each
/// ending in `\n` (the final newline may be missing). Stops at the first bad
/// line. Use [`super::verify_jsonl`] to parse and verify in one step with
/// errors named by sequence number.
pub fn parse_jsonl(text: &str) -> Result<Vec<Record>, ParseError> {
    split_lines(text.as_bytes())
        .enumerate()
        .map(|(i, line)| parse_line(line).map_err(|error| ParseError { line: i + 1, error }))
        .collect()
}

/// Serializes records as a JSON lines export, each line ending in `\n`.
pub fn to_jsonl(records: &[Record]) -> String {
    let mut out = String::new();
    for r in records {
        out.push_str(&r.to_jsonl_line());
        out.push('\n');
    }
    out
}

/// The lines of an export: split on `\n`, without the empty remainder after
/// a final newline.
pub(super) fn split_lines(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    let body = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    let empty = bytes.is_empty();
    body.split(|&b| b == b'\n').filter(move |_| !empty)
}

pub(super) fn parse_line(line: &[u8]) -> Result<Record, LineError> {
    if line.is_empty() {
        return Err(LineError::Empty);
    }
    let line = std::str::from_utf8(line).map_err(|_| LineError::NotUtf8)?;
    Record::from_jsonl_line(line)
}
