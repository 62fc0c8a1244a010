//! Offline verification of an exported chain, and the retention rule.

use super::record::{parse_line, split_lines};
use super::{AuditPublicKey, Digest, Event, Head, LineError, Record};

/// What a successful [`verify`] established.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Number of records checked.
    pub records: usize,
    /// Sequence number of the first record.
    pub first_seq: u64,
    /// Sequence number of the last record.
    pub last_seq: u64,
    /// The head after the last record.
    pub head: Head,
    /// Where the chain starts.
    pub start: Start,
    /// Checkpoint records found (all consistent with the chain).
    pub checkpoints: usize,
    /// The highest `up_to_seq` of the [`Event::Pruned`] markers in the
    /// chain: how far retention says it deleted. A chain that starts later
    /// than this plus one was cut by someone else (or exported `--since`).
    pub pruned_through: Option<u64>,
    /// Whether checkpoints were authenticated.
    pub authenticity: Authenticity,
}

impl Summary {
    /// Records after the last authenticated head: protected only by the hash
    /// chain, not by a signature. Without a key, every record.
    pub fn unauthenticated_tail(&self) -> u64 {
        match &self.authenticity {
            Authenticity::NotChecked => self.records as u64,
            Authenticity::SignedThrough { seq, .. } => self.last_seq.saturating_sub(*seq),
        }
    }
}

/// Where a verified chain starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// At record 1, whose `prev_hash` is all zeros.
    Genesis,
    /// After pruning (or a partial export), at a checkpoint record naming
    /// the dropped record `seq` with hash `hash`.
    Checkpoint {
        /// The last record before the export.
        seq: u64,
        /// Its hash, as the checkpoint states it.
        hash: Digest,
    },
}

/// Whether checkpoint signatures were checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authenticity {
    /// No key was given: only the chain's integrity was checked, and the
    /// checkpoints' signatures were not.
    NotChecked,
    /// Every checkpoint verified with the key (or one of the keys); the
    /// last one names record `seq`.
    SignedThrough {
        /// Highest sequence number covered by a verified signature.
        seq: u64,
        /// Number of signatures verified.
        signatures: usize,
        /// The ID of the key they verified with; with several keys given,
        /// the IDs of those that verified at least one, in the order given,
        /// separated by ", ".
        key_id: String,
    },
}

/// Why a chain does not verify. Each variant that concerns a record names
/// the sequence number expected at the first position that fails.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// There are no records.
    #[error("expected at least one audit record, found none")]
    Empty,
    /// A line of an export is not a record ([`verify_jsonl`] only). `seq`
    /// is the sequence number that line should hold, inferred from its
    /// neighbours (`None` if no line parses).
    #[error("{}line {line} is not a valid record: {error}", seq_prefix(*seq))]
    Unparseable {
        /// Sequence number expected on that line, if known.
        seq: Option<u64>,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        error: LineError,
    },
    /// A record is missing, repeated or out of order.
    #[error(
        "seq {expected}: expected record {expected}, found record {found} (removed, reordered or repeated records)"
    )]
    OutOfSequence {
        /// The sequence number expected here.
        expected: u64,
        /// The one found.
        found: u64,
    },
    /// A record's content does not hash to its `hash`: it was altered.
    #[error(
        "seq {seq}: record altered: its content hashes to {computed}, the record says {stored}"
    )]
    HashMismatch {
        /// The record.
        seq: u64,
        /// The `hash` it carries.
        stored: Digest,
        /// The hash of its content.
        computed: Digest,
    },
    /// A record's `prev_hash` is not the previous record's hash.
    #[error("seq {seq}: broken link: prev_hash is {found}, expected the hash of record {} ({expected})", seq.saturating_sub(1))]
    BrokenLink {
        /// The record.
        seq: u64,
        /// The previous record's hash.
        expected: Digest,
        /// The record's `prev_hash`.
        found: Digest,
    },
    /// Record 1 does not have an all-zero `prev_hash`.
    #[error("seq 1: expected an all-zero prev_hash at the start of the chain, found {found}")]
    BadGenesis {
        /// The `prev_hash` found.
        found: Digest,
    },
    /// The records start after record 1 but not at a checkpoint, so nothing
    /// anchors them.
    #[error(
        "seq {seq}: the chain starts after record 1 without a checkpoint: expected a checkpoint record first (records before it missing)"
    )]
    UnanchoredStart {
        /// The first record's sequence number.
        seq: u64,
    },
    /// A checkpoint does not name the record directly before it.
    #[error("seq {seq}: checkpoint names record {named} with hash {named_hash}, expected record {} with hash {expected_hash}", seq.saturating_sub(1))]
    CheckpointMismatch {
        /// The checkpoint record.
        seq: u64,
        /// The sequence number it names.
        named: u64,
        /// The hash it names.
        named_hash: Digest,
        /// The previous record's hash (its `prev_hash`).
        expected_hash: Digest,
    },
    /// A pruning marker names a hash other than the record it names.
    #[error(
        "seq {seq}: pruning marker says record {up_to_seq} had hash {named_hash}, expected {expected_hash}"
    )]
    PrunedMismatch {
        /// The marker record.
        seq: u64,
        /// The sequence number it names.
        up_to_seq: u64,
        /// The hash it names.
        named_hash: Digest,
        /// The hash the chain has for that record.
        expected_hash: Digest,
    },
    /// A pruning marker names itself or a later record as pruned.
    #[error(
        "seq {seq}: pruning marker names record {up_to_seq} as deleted, expected a record before it"
    )]
    PrunedAhead {
        /// The marker record.
        seq: u64,
        /// The sequence number it names.
        up_to_seq: u64,
    },
    /// A checkpoint was signed by a key other than the one (or ones) given.
    #[error("seq {seq}: checkpoint signed by audit key {found}, expected key {expected}")]
    WrongKey {
        /// The checkpoint record.
        seq: u64,
        /// The given key's ID (several: separated by " or ").
        expected: String,
        /// The key ID in the checkpoint.
        found: String,
    },
    /// A checkpoint's signature does not verify with the given key.
    #[error("seq {seq}: checkpoint signature does not verify with audit key {key_id}")]
    BadSignature {
        /// The checkpoint record.
        seq: u64,
        /// The key it was checked against.
        key_id: String,
    },
    /// A key was given but there is no checkpoint to authenticate.
    #[error(
        "expected at least one signed checkpoint to check the audit key against, found none (records {first_seq}..={last_seq})"
    )]
    NoCheckpoint {
        /// First record's sequence number.
        first_seq: u64,
        /// Last record's sequence number.
        last_seq: u64,
    },
}

fn seq_prefix(seq: Option<u64>) -> String {
    seq.map(|s| format!("seq {s}: ")).unwrap_or_default()
}

impl VerifyError {
    /// The sequence number of the first bad record, when the error concerns one.
    pub fn seq(&self) -> Option<u64> {
        match self {
            Self::Empty | Self::NoCheckpoint { .. } => None,
            Self::Unparseable { seq, .. } => *seq,
            Self::OutOfSequence { expected, .. } => Some(*expected),
            Self::BadGenesis { .. } => Some(1),
            Self::HashMismatch { seq, .. }
            | Self::BrokenLink { seq, .. }
            | Self::UnanchoredStart { seq }
            | Self::CheckpointMismatch { seq, .. }
            | Self::PrunedMismatch { seq, .. }
            | Self::PrunedAhead { seq, .. }
            | Self::WrongKey { seq, .. }
            | Self::BadSignature { seq, .. } => Some(*seq),
        }
    }
}

/// Verifies a chain, offline.
///
/// Checks, for the records in order:
/// - sequence numbers are consecutive (`seq` of each = previous + 1);
/// - each record's `hash` is the SHA-256 of its canonical encoding;
/// - each `prev_hash` is the previous record's `hash`;
/// - the start: either record 1 with an all-zero `prev_hash`, or a
///   checkpoint record (an export after pruning or from `--since`);
/// - every checkpoint names the record directly before it (`seq - 1` and its
///   hash); every pruning marker's hash agrees with the record it names when
///   that record (or the one after it) is present;
/// - with `key`: every checkpoint carries the key's ID and a valid signature,
///   and there is at least one.
///
/// A chain that starts at a checkpoint is accepted as pruned: cutting
/// records from the front up to a checkpoint looks exactly like retention
/// (compare [`Summary::first_seq`] with [`Summary::pruned_through`]), and
/// cutting records from the end looks like an older export.
///
/// What a success proves: the records are exactly those whose hashes chain
/// to the last record, none removed, inserted or reordered in between. With
/// a key, additionally: every record up to the last checkpoint's head is
/// one the key's holder (the server) committed to when it signed; and if
/// the chain starts at a checkpoint, that the retained suffix extends a head
/// the server signed (what was pruned before it is gone, but cannot have
/// been swapped for something else). It does not prove anything about
/// records after the last checkpoint beyond their linkage
/// ([`Summary::unauthenticated_tail`]): whoever can write the datastore can
/// rewrite or truncate that tail. Without a key, anyone able to rewrite the
/// whole file can produce a chain that verifies; times are the server's
/// clock and are not checked for order.
pub fn verify(records: &[Record], key: Option<&AuditPublicKey>) -> Result<Summary, VerifyError> {
    verify_keys(records, key.map(std::slice::from_ref).unwrap_or_default())
}

/// [`verify`] with any number of keys: every checkpoint must carry the ID
/// of one of `keys` and verify with it (each server of a cluster signs its
/// checkpoints with its own audit key). No keys: signatures not checked.
pub fn verify_keys(records: &[Record], keys: &[AuditPublicKey]) -> Result<Summary, VerifyError> {
    let mut used = vec![false; keys.len()];
    let first = records.first().ok_or(VerifyError::Empty)?;
    let mut checkpoints = 0usize;
    let mut signed_through: Option<u64> = None;
    let mut start = Start::Genesis;
    let mut pruned_through: Option<u64> = None;

    for (i, r) in records.iter().enumerate() {
        let prev = i.checked_sub(1).and_then(|j| records.get(j));
        // The sequence number this position must hold. For the first record
        // it is its own, unless that record is damaged (its successor then
        // tells where the export begins) or its successor comes before it
        // (the start is reordered).
        let expected = match prev {
            // Past u64::MAX nothing can follow.
            Some(p) => match p.seq.checked_add(1) {
                Some(s) => s,
                None => {
                    return Err(VerifyError::OutOfSequence {
                        expected: u64::MAX,
                        found: r.seq,
                    });
                }
            },
            None => {
                let damaged = r.seq == 0 || r.compute_hash() != r.hash;
                match records.get(1).map(|n| n.seq) {
                    Some(n) if damaged && n >= 2 => n - 1,
                    Some(n) if n >= 1 && n < r.seq => n,
                    _ => r.seq.max(1),
                }
            }
        };
        if r.seq != expected {
            return Err(VerifyError::OutOfSequence {
                expected,
                found: r.seq,
            });
        }
        let computed = r.compute_hash();
        if computed != r.hash {
            return Err(VerifyError::HashMismatch {
                seq: r.seq,
                stored: r.hash,
                computed,
            });
        }
        match prev {
            Some(p) if r.prev_hash != p.hash => {
                return Err(VerifyError::BrokenLink {
                    seq: r.seq,
                    expected: p.hash,
                    found: r.prev_hash,
                });
            }
            Some(_) => {}
            None if r.seq == 1 => {
                if r.prev_hash != Digest::ZERO {
                    return Err(VerifyError::BadGenesis { found: r.prev_hash });
                }
            }
            None => match &r.event {
                Event::Checkpoint { seq, head_hash, .. } => {
                    start = Start::Checkpoint {
                        seq: *seq,
                        hash: *head_hash,
                    };
                }
                _ => return Err(VerifyError::UnanchoredStart { seq: r.seq }),
            },
        }

        match &r.event {
            Event::Checkpoint {
                seq,
                head_hash,
                key_id,
                signature,
            } => {
                if r.seq < 2 || *seq != r.seq - 1 || *head_hash != r.prev_hash {
                    return Err(VerifyError::CheckpointMismatch {
                        seq: r.seq,
                        named: *seq,
                        named_hash: *head_hash,
                        expected_hash: r.prev_hash,
                    });
                }
                checkpoints += 1;
                if !keys.is_empty() {
                    let Some(i) = keys.iter().position(|k| k.key_id() == *key_id) else {
                        return Err(VerifyError::WrongKey {
                            seq: r.seq,
                            expected: keys
                                .iter()
                                .map(AuditPublicKey::key_id)
                                .collect::<Vec<_>>()
                                .join(" or "),
                            found: key_id.clone(),
                        });
                    };
                    keys[i]
                        .verify_checkpoint(*seq, head_hash, signature)
                        .map_err(|_| VerifyError::BadSignature {
                            seq: r.seq,
                            key_id: key_id.clone(),
                        })?;
                    used[i] = true;
                    signed_through = Some(*seq);
                }
            }
            Event::Pruned {
                up_to_seq,
                head_hash,
            } => {
                if *up_to_seq >= r.seq {
                    return Err(VerifyError::PrunedAhead {
                        seq: r.seq,
                        up_to_seq: *up_to_seq,
                    });
                }
                let known = if *up_to_seq >= first.seq {
                    // Earlier records are consecutive from `first`.
                    usize::try_from(up_to_seq - first.seq)
                        .ok()
                        .and_then(|j| records.get(j))
                        .map(|p| p.hash)
                } else if *up_to_seq + 1 == first.seq {
                    Some(first.prev_hash)
                } else {
                    None
                };
                if let Some(expected_hash) = known
                    && expected_hash != *head_hash
                {
                    return Err(VerifyError::PrunedMismatch {
                        seq: r.seq,
                        up_to_seq: *up_to_seq,
                        named_hash: *head_hash,
                        expected_hash,
                    });
                }
                pruned_through = pruned_through.max(Some(*up_to_seq));
            }
            _ => {}
        }
    }

    let last = records.last().unwrap_or(first);
    let authenticity = if keys.is_empty() {
        Authenticity::NotChecked
    } else {
        match signed_through {
            Some(seq) => Authenticity::SignedThrough {
                seq,
                signatures: checkpoints,
                key_id: keys
                    .iter()
                    .zip(&used)
                    .filter(|(_, u)| **u)
                    .map(|(k, _)| k.key_id())
                    .collect::<Vec<_>>()
                    .join(", "),
            },
            None => {
                return Err(VerifyError::NoCheckpoint {
                    first_seq: first.seq,
                    last_seq: last.seq,
                });
            }
        }
    };
    Ok(Summary {
        records: records.len(),
        first_seq: first.seq,
        last_seq: last.seq,
        head: last.head(),
        start,
        checkpoints,
        pruned_through,
        authenticity,
    })
}

/// Parses and verifies a JSON lines export (the bytes of `audit.jsonl`),
/// naming a line that does not parse by the sequence number it should hold.
pub fn verify_jsonl(bytes: &[u8], key: Option<&AuditPublicKey>) -> Result<Summary, VerifyError> {
    verify_jsonl_keys(bytes, key.map(std::slice::from_ref).unwrap_or_default())
}

/// [`verify_jsonl`] with any number of keys, as [`verify_keys`].
pub fn verify_jsonl_keys(bytes: &[u8], keys: &[AuditPublicKey]) -> Result<Summary, VerifyError> {
    let lines: Vec<&[u8]> = split_lines(bytes).collect();
    let parsed: Vec<Result<Record, LineError>> = lines.iter().map(|l| parse_line(l)).collect();
    let first_bad = parsed
        .iter()
        .enumerate()
        .find_map(|(i, r)| r.as_ref().err().map(|e| (i, e.clone())));
    if let Some((bad, error)) = first_bad {
        // Every line before `bad` parsed. A chain error among them comes
        // first: it is the first bad record.
        let good: Vec<Record> = parsed[..bad]
            .iter()
            .filter_map(|r| r.clone().ok())
            .collect();
        let seq = match good.last() {
            Some(last) => {
                verify(&good, None)?;
                last.seq.checked_add(1)
            }
            // The first line is bad. If it starts with a whole record (and
            // something follows it, e.g. a lost newline), that record's
            // number; else infer from the next line that parses.
            None => lines
                .get(bad)
                .and_then(|l| leading_record(l))
                .map(|r| r.seq)
                .or_else(|| {
                    parsed.iter().enumerate().skip(1).find_map(|(i, r)| {
                        r.as_ref()
                            .ok()
                            .and_then(|r| r.seq.checked_sub(i as u64))
                            .filter(|&s| s >= 1)
                    })
                }),
        };
        return Err(VerifyError::Unparseable {
            seq,
            line: bad + 1,
            error,
        });
    }
    let records: Vec<Record> = parsed.into_iter().filter_map(Result::ok).collect();
    verify_keys(&records, keys)
}

/// The record a line begins with, when the line is a record followed by
/// something else (even bytes that are not UTF-8).
fn leading_record(line: &[u8]) -> Option<Record> {
    let text = match std::str::from_utf8(line) {
        Ok(text) => text,
        Err(e) => std::str::from_utf8(line.get(..e.valid_up_to())?).ok()?,
    };
    serde_json::Deserializer::from_str(text)
        .into_iter::<Record>()
        .next()?
        .ok()
}

/// What retention may delete: records with `seq <= drop_through`. The
/// record `drop_through + 1` is a checkpoint that becomes the chain's new
/// start; append [`Event::Pruned`] with [`PrunePlan::marker`] in the same
/// transaction as the deletes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrunePlan {
    /// Last sequence number to delete.
    pub drop_through: u64,
    /// Sequence number of the checkpoint that will be the first record kept.
    pub anchor_seq: u64,
    /// Head of the last deleted record, as the anchor checkpoint signs it.
    pub dropped_head: Head,
}

impl PrunePlan {
    /// The [`Event::Pruned`] marker recording this prune.
    pub fn marker(&self) -> Event {
        Event::Pruned {
            up_to_seq: self.dropped_head.seq,
            head_hash: self.dropped_head.hash,
        }
    }
}

/// Which prefix of the chain retention may delete so that what remains
/// still verifies from a signed checkpoint.
///
/// `records` are the retained records in order, from the current first one;
/// `cutoff` is the oldest time to keep (Unix seconds: now minus
/// `audit_retention`). The plan drops the longest prefix that contains only
/// records older than `cutoff` and is directly followed by a well-formed
/// checkpoint (one that names the record before it), which is kept. `None`
/// when nothing can go: no old records, or no checkpoint after them yet
/// (old records wait for the next checkpoint). Checkpoint signatures are
/// not checked here; the server signed them itself.
pub fn prune_plan(records: &[Record], cutoff: i64) -> Option<PrunePlan> {
    let mut plan = None;
    for (i, r) in records.iter().enumerate() {
        if i > 0
            && let Event::Checkpoint { seq, head_hash, .. } = &r.event
            && seq.checked_add(1) == Some(r.seq)
            && *head_hash == r.prev_hash
        {
            plan = Some(PrunePlan {
                drop_through: *seq,
                anchor_seq: r.seq,
                dropped_head: Head {
                    seq: *seq,
                    hash: *head_hash,
                },
            });
        }
        if r.time >= cutoff {
            break;
        }
    }
    plan
}

/// Where an export that must include record `since` should begin so that it
/// verifies: the index of the last checkpoint at or before `since`, or 0
/// (the chain's first retained record, which is record 1 or a checkpoint).
pub fn export_start(records: &[Record], since: u64) -> usize {
    records
        .iter()
        .enumerate()
        .take_while(|(_, r)| r.seq <= since)
        .filter(|(_, r)| matches!(r.event, Event::Checkpoint { .. }))
        .map(|(i, _)| i)
        .last()
        .unwrap_or(0)
}
