//! The tamper-evident audit trail: records, their hash chain, signed
//! checkpoints, the JSON lines export, offline verification and the
//! retention rule. Backend-neutral and pure: the datastore (redb,
//! PostgreSQL) stores what this module builds, and the offline verifier
//! needs nothing else.
//!
//! # The chain
//! Each [`Record`] has a sequence number (from 1, no gaps), a time (Unix
//! seconds), a [`Caller`], an [`Event`], the hash of the previous record
//! (`prev_hash`, all zeros for record 1) and its own `hash`. A backend
//! appends inside the transaction of the change it records:
//!
//! ```
//! # use sigil_core::audit::{self, Event, KeyKind};
//! # use sigil_core::caller::{Caller, ServerTask};
//! let mut head = None; // read from the datastore, in the transaction
//! let event = Event::KeyPrepared { key_kind: KeyKind::Jwt, key_id: "k1".into() };
//! let record = audit::next(head.as_ref(), 1_700_000_000, Caller::server(ServerTask::KeyRotation), event);
//! // store `record` and the new head in the same transaction
//! head = Some(record.head());
//! # assert_eq!(head.map(|h| h.seq), Some(1));
//! ```
//!
//! # Canonical encoding
//! A record's hash is SHA-256 over `"sigil-audit-record-v1\n"` followed by
//! the record's compact JSON without `hash`: members `seq, time, at,
//! caller, event, prev_hash` in that order (`at` is `time` in RFC 3339 UTC),
//! nested objects in declared field order, entry snapshots with sorted
//! keys, digests as 64 lowercase hex digits ([`Record::canonical_encoding`]).
//! An export line is the same object with `"hash"` appended last, and a line
//! parses only if it is spelled exactly so, so every byte of an export is
//! covered by a hash. The golden test in this module pins the encoding.
//!
//! # Checkpoints
//! Every N records or T seconds the server appends a [`Event::Checkpoint`]
//! naming the record before it, signed with its [`AuditKey`] (Ed25519) over
//! [`checkpoint_message`]: `"sigil-audit-checkpoint-v1" || seq (u64 big
//! endian) || head hash (32 bytes)`. The public half ([`AuditPublicKey`],
//! PEM `PUBLIC KEY`) is what `audit verify --key` checks against.
//! Appending a checkpoint just before an export leaves no unsigned tail.
//!
//! # Retention
//! [`prune_plan`] picks a prefix of old records that ends right before a
//! checkpoint; the server deletes it and appends [`Event::Pruned`]. The
//! remaining chain starts at that checkpoint, and [`verify`] with the key
//! proves that it extends a head the server signed.

mod batch_line;
mod event;
mod key;
mod record;
mod verify;

#[cfg(test)]
mod tests;

pub use batch_line::{BatchRows, IssuedRef};
pub use event::{Event, IssuedX509Svid, KeyKind, KillTarget, join_token_fingerprint};
pub use key::{AuditKey, AuditPublicKey, CHECKPOINT_DOMAIN, KeyError, checkpoint_message};
pub use record::{
    Digest, DigestError, Head, LineError, ParseError, RECORD_DOMAIN, Record, next, next_batch_line,
    next_line, next_with_line, parse_jsonl, to_jsonl,
};
pub use verify::{
    Authenticity, PrunePlan, Start, Summary, VerifyError, export_start, prune_plan, verify,
    verify_jsonl, verify_jsonl_keys, verify_keys,
};

pub use crate::caller::{Caller, ServerTask};
