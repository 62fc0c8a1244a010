//! Tests of the audit chain: encoding stability, export round trips, and
//! that verification fails at the exact record for every kind of tampering.

use serde_json::json;
use spiffe::{SpiffeId, TrustDomain};

use super::*;

/// RFC 8032 test vector 1 secret key, as a PKCS#8 v1 document (the form
/// `openssl genpkey -algorithm ed25519` writes).
const RFC8032_PKCS8_HEX: &str = "302e020100300506032b657004220420\
                                 9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60";
/// Its public key.
const RFC8032_PUBLIC_HEX: &str = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";

fn fixed_key() -> AuditKey {
    AuditKey::from_pkcs8(&hex::decode(RFC8032_PKCS8_HEX).unwrap()).unwrap()
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::new(s).unwrap()
}

fn agent_id(n: usize) -> SpiffeId {
    id(&format!(
        "spiffe://example.org/sigil/agent/join_token/node{n}"
    ))
}

/// One event of every kind except checkpoints, chosen by `i`.
fn event(i: usize) -> Event {
    let agent = agent_id(i % 3);
    let workload = id(&format!("spiffe://example.org/app/w{}", i % 7));
    match i % 19 {
        0 => Event::NodeAttested {
            attestation_type: "join_token".into(),
            evidence: format!("token {}", join_token_fingerprint(&format!("t{i}"))),
            agent_id: agent,
            peer: Some(format!("10.0.0.{}:5{i:04}", i % 250)),
        },
        1 => Event::NodeAttestationFailed {
            attestation_type: "tpm".into(),
            evidence: "ek sha256 ab12".into(),
            peer: None,
            reason: "quote \"nonce\" mismatch\n\tretry".into(),
        },
        2 => Event::AgentSvidIssued {
            agent_id: agent,
            serial: format!("{i:032x}"),
            expires_at: 1_700_003_600 + i as i64,
        },
        3 => Event::AgentSvidRenewed {
            agent_id: agent,
            serial: format!("{:032x}", i * 7),
            expires_at: 1_700_003_600 + i as i64,
        },
        4 => Event::X509SvidsIssued {
            agent_id: agent,
            svids: (0..3)
                .map(|k| IssuedX509Svid {
                    entry_id: format!("e-{i}-{k}"),
                    spiffe_id: workload.clone(),
                    serial: format!("{:032x}", i * 100 + k),
                    expires_at: 1_700_000_300 + k as i64,
                })
                .collect(),
        },
        5 => Event::JwtSvidIssued {
            agent_id: agent,
            entry_id: format!("e-{i}"),
            spiffe_id: workload,
            audience: vec!["db".into(), "https://api.example.com".into()],
            jti: format!("jti-{i}"),
            expires_at: 1_700_000_300,
        },
        6 => Event::EntryCreated {
            entry_id: format!("e-{i}"),
            spiffe_id: workload,
            parent_id: agent,
            entry: json!({
                "selectors": ["unix:uid:1000", "unix:path:/usr/bin/caf\u{e9}"],
                "x509_ttl": 300,
                "dns_names": [],
                "admin": false,
                "hint": null,
                "description": "caf\u{e9} \u{1f}",
            }),
        },
        7 => Event::EntryUpdated {
            entry_id: format!("e-{}", i - 1),
            spiffe_id: workload,
            parent_id: agent,
            entry: json!({"z": {"b": 1, "a": [1, -2, 3.5]}, "a": "x"}),
        },
        8 => Event::EntryDeleted {
            entry_id: format!("e-{}", i - 2),
            spiffe_id: workload,
            parent_id: agent,
        },
        9 => Event::AgentEvicted { agent_id: agent },
        10 => Event::AgentBanned { agent_id: agent },
        11 => Event::KillCreated {
            kill_id: format!("k{i}"),
            target: match i % 4 {
                0 => KillTarget::SpiffeId {
                    spiffe_id: workload,
                },
                1 => KillTarget::Entry {
                    entry_id: "e-1".into(),
                },
                2 => KillTarget::Agent { agent_id: agent },
                _ => KillTarget::selector(&"docker:label:team:ml".parse().unwrap()),
            },
            reason: "compromised".into(),
        },
        12 => Event::KillLifted {
            kill_id: format!("k{}", i - 1),
            target: KillTarget::Entry {
                entry_id: "e-1".into(),
            },
        },
        13 => Event::JoinTokenGenerated {
            spiffe_id: i.is_multiple_of(2).then(|| agent_id(9)),
            expires_at: 1_700_000_600,
            token_hash: join_token_fingerprint(&format!("t{i}")),
        },
        14 => Event::JoinTokenUsed {
            token_hash: join_token_fingerprint(&format!("t{}", i - 1)),
            agent_id: agent,
        },
        15 => Event::FederatedBundleSet {
            trust_domain: TrustDomain::new("partner.example").unwrap(),
            sequence: Some(i as u64),
        },
        16 => Event::FederatedBundleDeleted {
            trust_domain: TrustDomain::new("partner.example").unwrap(),
        },
        17 => Event::KeyPrepared {
            key_kind: KeyKind::X509Ca,
            key_id: format!("ca-{i}"),
        },
        _ => Event::KeyActivated {
            key_kind: KeyKind::Jwt,
            key_id: format!("jwt-{i}"),
        },
    }
}

fn caller(i: usize) -> Caller {
    match i % 4 {
        0 => Caller::admin(0, 0, Some(i as i32)),
        1 => Caller::agent(agent_id(i % 3)),
        2 => Caller::Node {
            peer: Some("10.1.2.3:4444".into()),
        },
        _ => Caller::server(ServerTask::KeyRotation),
    }
}

/// A chain of `n` records, a checkpoint after every `every` plain records
/// (checkpoints count towards `n`), one second apart from `t0`.
fn chain_from(
    mut head: Option<Head>,
    n: usize,
    every: usize,
    key: &AuditKey,
    t0: i64,
) -> Vec<Record> {
    let mut out = Vec::with_capacity(n);
    let mut since_checkpoint = 0;
    for i in 0..n {
        let time = t0 + i as i64;
        let r = match head {
            Some(h) if since_checkpoint == every => {
                since_checkpoint = 0;
                next(
                    Some(&h),
                    time,
                    Caller::server(ServerTask::AuditCheckpoint),
                    key.checkpoint(&h),
                )
            }
            _ => {
                since_checkpoint += 1;
                next(head.as_ref(), time, caller(i), event(i))
            }
        };
        head = Some(r.head());
        out.push(r);
    }
    out
}

fn chain(n: usize, every: usize, key: &AuditKey) -> Vec<Record> {
    chain_from(None, n, every, key, 1_700_000_000)
}

/// Recomputes every hash and link from `from` on, as someone rewriting the
/// datastore without the audit key would.
fn rehash_from(records: &mut [Record], from: usize) {
    for i in from..records.len() {
        if i > 0 {
            records[i].prev_hash = records[i - 1].hash;
            if let Event::Checkpoint { seq, head_hash, .. } = &mut records[i].event {
                *seq = records[i].seq - 1;
                *head_hash = records[i].prev_hash;
            }
        }
        records[i].hash = records[i].compute_hash();
    }
}

fn index_of_seq(records: &[Record], seq: u64) -> usize {
    records.iter().position(|r| r.seq == seq).unwrap()
}

#[test]
fn golden_canonical_encoding_and_hash() {
    let record = Record {
        seq: 7,
        time: 1_700_000_000,
        caller: Caller::admin(0, 0, Some(42)),
        event: Event::EntryCreated {
            entry_id: "0b4f2d0e-5a5c-4f7e-9d1a-3c2b1a098765".into(),
            spiffe_id: id("spiffe://example.org/app/db"),
            parent_id: id("spiffe://example.org/sigil/agent/join_token/n1"),
            entry: json!({"x509_ttl": 300, "selectors": ["unix:uid:1000"], "admin": false}),
        },
        prev_hash: Digest::sha256(b"record 6"),
        hash: Digest::ZERO,
    };
    let encoding = String::from_utf8(record.canonical_encoding()).unwrap();
    assert_eq!(
        encoding,
        "sigil-audit-record-v1\n\
         {\"seq\":7,\"time\":1700000000,\"at\":\"2023-11-14T22:13:20Z\",\
         \"caller\":{\"kind\":\"admin\",\"uid\":0,\"gid\":0,\"pid\":42},\
         \"event\":{\"kind\":\"entry_created\",\"entry_id\":\"0b4f2d0e-5a5c-4f7e-9d1a-3c2b1a098765\",\
         \"spiffe_id\":\"spiffe://example.org/app/db\",\
         \"parent_id\":\"spiffe://example.org/sigil/agent/join_token/n1\",\
         \"entry\":{\"admin\":false,\"selectors\":[\"unix:uid:1000\"],\"x509_ttl\":300}},\
         \"prev_hash\":\"GOLDEN_PREV\"}"
            .replace("GOLDEN_PREV", &Digest::sha256(b"record 6").to_string())
    );
    assert_eq!(
        record.compute_hash().to_string(),
        "9ce8c2f44e339cd701562aae8bac42d38e4acffccfbd55d2277f6a8fc1ac139a"
    );
}

#[test]
fn golden_checkpoint_message_and_signature() {
    let key = fixed_key();
    assert_eq!(hex::encode(key.public_key().as_raw()), RFC8032_PUBLIC_HEX);
    let head = Digest::from_bytes([0xab; 32]);
    let message = checkpoint_message(0x0102_0304_0506_0708, &head);
    assert_eq!(
        hex::encode(message),
        format!(
            "{}0102030405060708{}",
            hex::encode(b"sigil-audit-checkpoint-v1"),
            "ab".repeat(32)
        )
    );
    let Event::Checkpoint {
        seq,
        head_hash,
        key_id,
        signature,
    } = key.sign_checkpoint(0x0102_0304_0506_0708, &head)
    else {
        panic!("not a checkpoint");
    };
    assert_eq!((seq, head_hash), (0x0102_0304_0506_0708, head));
    assert_eq!(key_id, "06e3fd8fda29bb60ab59557de61edb0a");
    // Ed25519 is deterministic: the same key and message, the same signature.
    // (Checked independently: `openssl pkeyutl -verify -rawin` accepts it,
    // and the key ID is `openssl pkey -pubin -outform DER | sha256sum`.)
    assert_eq!(
        signature,
        "61c1a54a2bdae877948dfda1535e443445e41df510e651762a08f684a9fe1bd45f18e43e7ed82bc16a445dd564f24676f363022215b8ac770c4aec07f5464e07"
    );
    key.public_key()
        .verify_checkpoint(seq, &head_hash, &signature)
        .unwrap();
}

#[test]
fn jsonl_round_trips_every_event_kind() {
    let key = AuditKey::generate().unwrap();
    let records = chain(60, 9, &key);
    let kinds: std::collections::BTreeSet<_> = records.iter().map(|r| r.event.kind()).collect();
    assert_eq!(kinds.len(), 20, "{kinds:?}");
    let text = to_jsonl(&records);
    assert_eq!(text.lines().count(), records.len());
    assert_eq!(parse_jsonl(&text).unwrap(), records);
    // Without the final newline too.
    assert_eq!(parse_jsonl(text.trim_end()).unwrap(), records);
    for r in &records {
        let line = r.to_jsonl_line();
        assert_eq!(Record::from_jsonl_line(&line).unwrap(), *r);
        assert_eq!(serde_json::to_string(r).unwrap(), line);
        assert_eq!(serde_json::from_str::<Record>(&line).unwrap(), *r);
    }
}

#[test]
fn a_line_hash_is_reproducible_without_this_library() {
    let key = AuditKey::generate().unwrap();
    for r in chain(40, 5, &key) {
        let line = r.to_jsonl_line();
        let cut = line.rfind(",\"hash\":\"").unwrap();
        let mut hashed = b"sigil-audit-record-v1\n".to_vec();
        hashed.extend_from_slice(&line.as_bytes()[..cut]);
        hashed.push(b'}');
        let value: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(value["hash"].as_str().unwrap(), ring_hex(&hashed), "{line}");
    }
}

fn ring_hex(data: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, data))
}

#[test]
fn next_starts_at_one_and_links_to_the_head() {
    let first = next(None, 5, caller(0), event(0));
    assert_eq!((first.seq, first.prev_hash), (1, Digest::ZERO));
    assert_eq!(first.hash, first.compute_hash());
    let second = next(Some(&first.head()), 6, caller(1), event(1));
    assert_eq!((second.seq, second.prev_hash), (2, first.hash));
    assert_eq!(
        first.head(),
        Head {
            seq: 1,
            hash: first.hash
        }
    );
}

#[test]
fn next_with_line_agrees_with_next_and_the_export_line() {
    let key = AuditKey::generate().unwrap();
    let records = chain(60, 9, &key);
    let mut head = None;
    for (i, r) in records.iter().enumerate() {
        let (built, line) =
            next_with_line(head.as_ref(), r.time, r.caller.clone(), r.event.clone());
        assert_eq!(
            built,
            next(head.as_ref(), r.time, r.caller.clone(), r.event.clone()),
            "record {i}"
        );
        assert_eq!(line, built.to_jsonl_line(), "record {i}");
        assert_eq!(built.hash, built.compute_hash(), "record {i}");
        assert_eq!(Record::from_jsonl_line(&line).unwrap(), built);
        assert_eq!(Head::of_line(&line).unwrap(), built.head());
        head = Some(built.head());
    }
}

/// The direct writer of mint-batch records (`batch_line`), from the event
/// and from borrowed rows, against serde_json, the definition of the
/// encoding: the same line for every caller kind, for empty and large
/// batches, and for strings serde_json escapes (quotes, backslashes,
/// control characters) or passes through (non-ASCII, `/`, U+2028).
#[test]
fn a_batch_line_is_spelled_as_serde_json_spells_it() {
    let odd = [
        "plain-entry",
        "quote\"in",
        "back\\slash",
        "tab\tnewline\n",
        "\u{1}\u{1f}",
        "caf\u{e9} \u{2028} / <>&",
        "",
    ];
    let mut head = None;
    for n in [0usize, 1, 2, 7, 500] {
        for c in 0..4 {
            let event = Event::X509SvidsIssued {
                agent_id: agent_id(n),
                svids: (0..n)
                    .map(|k| IssuedX509Svid {
                        entry_id: format!("{}-{k}", odd[k % odd.len()]),
                        spiffe_id: id(&format!("spiffe://example.org/app/w{k}/x-y_z.1")),
                        serial: format!("{:032x}", k * 7919),
                        expires_at: if k % 3 == 0 {
                            -(k as i64)
                        } else {
                            1_700_000_300 + k as i64
                        },
                    })
                    .collect(),
            };
            let time = 1_700_000_000 + (n * 4 + c) as i64;
            let Event::X509SvidsIssued { agent_id, svids } = &event else {
                unreachable!()
            };
            let rows: BatchRows = svids.iter().map(IssuedRef::of).collect();
            let borrowed = next_batch_line(head.as_ref(), time, &caller(c), agent_id, &rows);
            let (record, line) = next_with_line(head.as_ref(), time, caller(c), event.clone());
            assert_eq!(line, record.to_jsonl_line(), "{n} SVIDs, caller {c}");
            assert_eq!(record.hash, record.compute_hash(), "{n} SVIDs, caller {c}");
            assert_eq!(borrowed, (record.head(), line), "{n} SVIDs, caller {c}");
            head = Some(record.head());
        }
    }
    // A serial is a plain string field: an odd one is escaped the same way.
    let event = Event::X509SvidsIssued {
        agent_id: agent_id(1),
        svids: vec![IssuedX509Svid {
            entry_id: "e".into(),
            spiffe_id: id("spiffe://example.org/a"),
            serial: "\"\\\u{7f}".into(),
            expires_at: i64::MIN,
        }],
    };
    let (record, line) = next_with_line(None, i64::MAX / 4, caller(1), event);
    assert_eq!(line, record.to_jsonl_line());
}

#[test]
fn a_head_is_read_from_the_ends_of_a_line_only_when_they_are_well_formed() {
    let r = next(
        Some(&Head {
            seq: 41,
            hash: Digest::sha256(b"41"),
        }),
        7,
        caller(0),
        event(3),
    );
    let line = r.to_jsonl_line();
    assert_eq!(
        Head::of_line(&line).unwrap(),
        Head {
            seq: 42,
            hash: r.hash
        }
    );
    let hex = r.hash.to_string();
    for bad in [
        String::new(),
        "{}".to_string(),
        line.replacen("{\"seq\":42,", "{\"seq\":042,", 1),
        line.replacen("{\"seq\":42,", "{\"seq\":-42,", 1),
        line.replacen("{\"seq\":42,", "{\"seq\":42", 1),
        line.replacen("{\"seq\":42,", "{ \"seq\":42,", 1),
        line.replace(&hex, &hex.to_uppercase()),
        line.replace(&hex, &hex[1..]),
        line.replace(",\"hash\":\"", ",\"hash\": \""),
        line.strip_suffix('}').unwrap().to_string(),
        format!("{line}\n"),
        // 64 bytes from the end falls inside a character.
        format!("{{\"seq\":1,\"hash\":\"\u{e9}{}\"}}", &hex[..63]),
    ] {
        assert!(Head::of_line(&bad).is_err(), "{bad:?}");
    }
}

#[test]
fn verify_passes_on_a_long_chain_with_checkpoints() {
    let key = AuditKey::generate().unwrap();
    let records = chain(300, 24, &key);
    let unkeyed = verify(&records, None).unwrap();
    assert_eq!(unkeyed.records, 300);
    assert_eq!((unkeyed.first_seq, unkeyed.last_seq), (1, 300));
    assert_eq!(unkeyed.start, Start::Genesis);
    assert_eq!(unkeyed.checkpoints, 12);
    assert_eq!(unkeyed.authenticity, Authenticity::NotChecked);
    assert_eq!(unkeyed.unauthenticated_tail(), 300);
    assert_eq!(unkeyed.head, records[299].head());

    let keyed = verify(&records, Some(key.public_key())).unwrap();
    // A checkpoint follows every 24 plain records: records 25, 50, ..., 300.
    let last_cp = records
        .iter()
        .rev()
        .find(|r| matches!(r.event, Event::Checkpoint { .. }))
        .unwrap();
    assert_eq!(
        keyed.authenticity,
        Authenticity::SignedThrough {
            seq: last_cp.seq - 1,
            signatures: 12,
            key_id: key.key_id()
        }
    );
    assert_eq!(keyed.unauthenticated_tail(), 300 - (last_cp.seq - 1));
    assert_eq!(
        verify_jsonl(to_jsonl(&records).as_bytes(), Some(key.public_key())).unwrap(),
        keyed
    );
}

/// Byte transformations applied at each position.
const FLIPS: [fn(u8) -> u8; 5] = [
    |b| b ^ 0x01,
    |b| b ^ 0x20,
    |b| if b == b'0' { b'1' } else { b'0' },
    |b| if b == b'"' { b'\'' } else { b'"' },
    |_| 0xff,
];

#[test]
fn flipping_any_byte_fails_at_that_record() {
    let key = AuditKey::generate().unwrap();
    // Short enough to try every byte: the first line, checkpoints (signed
    // content), events with escapes and non-ASCII text, the last line.
    let records = chain(12, 3, &key);
    let text = to_jsonl(&records).into_bytes();
    // Byte offset where each line starts; the newline belongs to its line.
    let mut starts = vec![0];
    starts.extend(
        text.iter()
            .enumerate()
            .filter(|(_, b)| **b == b'\n')
            .map(|(i, _)| i + 1),
    );
    let mut checked = 0;
    for (pos, &orig) in text.iter().enumerate() {
        let line = starts.iter().rposition(|&s| s <= pos).unwrap();
        let seq = records[line].seq;
        for (n, flip) in FLIPS.iter().enumerate() {
            // Every byte with the first transformation, a spread of bytes
            // with the others (a debug build verifies ~10k exports here).
            if n > 0 && (pos + n) % 5 != 0 {
                continue;
            }
            let b = flip(orig);
            if b == orig {
                continue;
            }
            let mut bad = text.clone();
            bad[pos] = b;
            let key = (pos % 3 == 0).then(|| key.public_key());
            match verify_jsonl(&bad, key) {
                Ok(_) => panic!(
                    "byte {pos} {orig:#04x}->{b:#04x} of seq {seq} not detected: {}",
                    String::from_utf8_lossy(&bad[starts[line]..starts[line + 1]])
                ),
                Err(e) => assert_eq!(
                    e.seq(),
                    Some(seq),
                    "byte {pos} ({:?} -> {:?}) of seq {seq}: {e}",
                    orig as char,
                    b as char
                ),
            }
            checked += 1;
        }
    }
    assert!(
        checked > text.len() * 17 / 10,
        "{checked} of {}",
        text.len()
    );
}

#[test]
fn removing_a_record_fails_at_the_missing_seq() {
    let key = AuditKey::generate().unwrap();
    let records = chain(50, 7, &key);
    for i in 1..records.len() - 1 {
        let mut cut = records.clone();
        cut.remove(i);
        let err = verify(&cut, None).unwrap_err();
        assert_eq!(err.seq(), Some(records[i].seq), "removed index {i}: {err}");
        assert!(matches!(err, VerifyError::OutOfSequence { .. }), "{err}");
    }
    // Without record 1 the chain starts at record 2, which is no checkpoint.
    let err = verify(&records[1..], None).unwrap_err();
    assert_eq!(err, VerifyError::UnanchoredStart { seq: 2 });
}

#[test]
fn truncating_the_tail_is_not_detectable() {
    // Pinned limitation (documented on `verify`): a chain cut at its end is
    // an older export. Only the summary's head tells.
    let key = AuditKey::generate().unwrap();
    let records = chain(50, 7, &key);
    let summary = verify(&records[..45], Some(key.public_key())).unwrap();
    assert_eq!(summary.last_seq, 45);
}

#[test]
fn swapping_two_records_fails_at_the_first_of_them() {
    let key = AuditKey::generate().unwrap();
    let records = chain(50, 7, &key);
    for i in 0..records.len() - 1 {
        let mut swapped = records.clone();
        swapped.swap(i, i + 1);
        for key in [None, Some(key.public_key())] {
            let err = verify(&swapped, key).unwrap_err();
            assert_eq!(err.seq(), Some(records[i].seq), "swap at {i}: {err}");
        }
    }
    // Non-adjacent swap.
    let mut swapped = records.clone();
    swapped.swap(10, 30);
    assert_eq!(verify(&swapped, None).unwrap_err().seq(), Some(11));
    // A duplicated record.
    let mut dup = records.clone();
    dup.insert(20, records[19].clone());
    assert_eq!(
        verify(&dup, None).unwrap_err(),
        VerifyError::OutOfSequence {
            expected: 21,
            found: 20
        }
    );
}

#[test]
fn swapping_lines_of_an_export_fails_at_the_first_of_them() {
    let key = AuditKey::generate().unwrap();
    let records = chain(20, 4, &key);
    let text = to_jsonl(&records);
    let mut lines: Vec<&str> = text.lines().collect();
    lines.swap(5, 6);
    let err = verify_jsonl(lines.join("\n").as_bytes(), None).unwrap_err();
    assert_eq!(
        err,
        VerifyError::OutOfSequence {
            expected: 6,
            found: 7
        }
    );
    assert!(err.to_string().starts_with("seq 6: "), "{err}");
}

#[test]
fn an_altered_checkpoint_signature_fails_only_with_the_key() {
    let key = AuditKey::generate().unwrap();
    let mut records = chain(60, 9, &key);
    let cp = records
        .iter()
        .position(|r| matches!(r.event, Event::Checkpoint { .. }))
        .unwrap();
    let cp_seq = records[cp].seq;
    if let Event::Checkpoint { signature, .. } = &mut records[cp].event {
        let flipped = if signature.starts_with('0') { "1" } else { "0" };
        signature.replace_range(0..1, flipped);
    }
    rehash_from(&mut records, cp);
    assert!(verify(&records, None).is_ok());
    assert_eq!(
        verify(&records, Some(key.public_key())).unwrap_err(),
        VerifyError::BadSignature {
            seq: cp_seq,
            key_id: key.key_id()
        }
    );
}

#[test]
fn a_checkpoint_signed_with_another_key_fails() {
    let key = AuditKey::generate().unwrap();
    let other = AuditKey::generate().unwrap();
    let records = chain(60, 9, &key);
    let cp = records
        .iter()
        .rposition(|r| matches!(r.event, Event::Checkpoint { .. }))
        .unwrap();
    let cp_seq = records[cp].seq;
    let head = records[cp - 1].head();

    // Honestly labelled with the other key's ID.
    let mut forged = records.clone();
    forged[cp].event = other.checkpoint(&head);
    rehash_from(&mut forged, cp);
    assert!(verify(&forged, None).is_ok());
    assert!(verify(&forged, Some(other.public_key())).is_err());
    assert_eq!(
        verify(&forged, Some(key.public_key())).unwrap_err(),
        VerifyError::WrongKey {
            seq: cp_seq,
            expected: key.key_id(),
            found: other.key_id()
        }
    );

    // Claiming the right key ID.
    let mut forged = records.clone();
    let mut event = other.checkpoint(&head);
    if let Event::Checkpoint { key_id, .. } = &mut event {
        *key_id = key.key_id();
    }
    forged[cp].event = event;
    rehash_from(&mut forged, cp);
    assert_eq!(
        verify(&forged, Some(key.public_key())).unwrap_err(),
        VerifyError::BadSignature {
            seq: cp_seq,
            key_id: key.key_id()
        }
    );
}

#[test]
fn checkpoints_of_several_servers_verify_with_all_their_keys_and_not_with_one() {
    // Two servers appending to one chain, each signing its checkpoints with
    // its own audit key: a's first, then b's.
    let a = AuditKey::generate().unwrap();
    let b = AuditKey::generate().unwrap();
    let mut records = chain(30, 9, &a);
    let tail = chain_from(records.last().map(Record::head), 30, 9, &b, 1_700_000_100);
    let first_b = tail
        .iter()
        .find(|r| matches!(r.event, Event::Checkpoint { .. }))
        .unwrap()
        .seq;
    records.extend(tail);
    let both = [a.public_key().clone(), b.public_key().clone()];
    let s = verify_keys(&records, &both).unwrap();
    match &s.authenticity {
        Authenticity::SignedThrough {
            signatures, key_id, ..
        } => {
            assert_eq!(*signatures, s.checkpoints);
            assert_eq!(*key_id, format!("{}, {}", a.key_id(), b.key_id()));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        verify_jsonl_keys(to_jsonl(&records).as_bytes(), &both).unwrap(),
        s
    );
    // Either key alone fails at the first checkpoint the other signed.
    assert_eq!(
        verify_keys(&records, &both[..1]).unwrap_err(),
        VerifyError::WrongKey {
            seq: first_b,
            expected: a.key_id(),
            found: b.key_id()
        }
    );
    let first_a = records
        .iter()
        .find(|r| matches!(r.event, Event::Checkpoint { .. }))
        .unwrap()
        .seq;
    assert_eq!(
        verify_keys(&records, &both[1..]).unwrap_err().seq(),
        Some(first_a)
    );
    assert!(
        verify_keys(&records, &both[1..])
            .unwrap_err()
            .to_string()
            .contains(&format!("seq {first_a}:"))
    );
}

#[test]
fn a_checkpoint_must_name_the_record_before_it() {
    let key = AuditKey::generate().unwrap();
    let mut records = chain(30, 5, &key);
    let cp = records
        .iter()
        .position(|r| matches!(r.event, Event::Checkpoint { .. }))
        .unwrap();
    // Validly signed, but over an older head.
    let older = records[cp - 2].head();
    records[cp].event = key.checkpoint(&older);
    records[cp].hash = records[cp].compute_hash();
    rehash_from(&mut records, cp + 1);
    let err = verify(&records, Some(key.public_key())).unwrap_err();
    assert!(
        matches!(err, VerifyError::CheckpointMismatch { seq, named, .. }
            if seq == records[cp].seq && named == older.seq),
        "{err}"
    );
}

#[test]
fn with_a_key_a_chain_without_checkpoints_fails() {
    let key = AuditKey::generate().unwrap();
    let mut records = chain(30, 5, &key);
    records.retain(|r| !matches!(r.event, Event::Checkpoint { .. }));
    for (i, r) in records.iter_mut().enumerate() {
        r.seq = i as u64 + 1;
    }
    rehash_from(&mut records, 0);
    assert!(verify(&records, None).is_ok());
    assert_eq!(
        verify(&records, Some(key.public_key())).unwrap_err(),
        VerifyError::NoCheckpoint {
            first_seq: 1,
            last_seq: records.len() as u64
        }
    );
}

#[test]
fn genesis_must_have_a_zero_prev_hash() {
    let key = AuditKey::generate().unwrap();
    let mut records = chain(5, 2, &key);
    records[0].prev_hash = Digest::sha256(b"elsewhere");
    rehash_from(&mut records, 0);
    records[0].prev_hash = Digest::sha256(b"elsewhere");
    records[0].hash = records[0].compute_hash();
    rehash_from(&mut records, 1);
    assert!(matches!(
        verify(&records, None).unwrap_err(),
        VerifyError::BadGenesis { .. }
    ));
    assert_eq!(verify(&[], None).unwrap_err(), VerifyError::Empty);
}

#[test]
fn a_pruned_chain_verifies_from_its_signed_checkpoint() {
    let key = AuditKey::generate().unwrap();
    let t0 = 1_700_000_000;
    let mut records = chain(200, 19, &key);
    // Keep everything from t0 + 90 on.
    let cutoff = t0 + 90;
    let plan = prune_plan(&records, cutoff).unwrap();
    let anchor = index_of_seq(&records, plan.anchor_seq);
    assert!(matches!(records[anchor].event, Event::Checkpoint { .. }));
    assert_eq!(plan.drop_through + 1, plan.anchor_seq);
    assert_eq!(plan.dropped_head, records[anchor - 1].head());
    assert!(records[..anchor].iter().all(|r| r.time < cutoff));
    // It is the last such checkpoint: the next one holds a record to keep.
    assert!(records[anchor..].iter().any(|r| r.time >= cutoff));
    let next_cp = records[anchor + 1..]
        .iter()
        .position(|r| matches!(r.event, Event::Checkpoint { .. }))
        .unwrap()
        + anchor
        + 1;
    assert!(records[next_cp - 1].time >= cutoff);

    // The server deletes the prefix and records the prune.
    let mut kept = records.split_off(anchor);
    let head = kept.last().unwrap().head();
    kept.push(next(
        Some(&head),
        t0 + 500,
        Caller::server(ServerTask::AuditRetention),
        plan.marker(),
    ));
    let summary = verify(&kept, Some(key.public_key())).unwrap();
    assert_eq!(summary.first_seq, plan.anchor_seq);
    assert_eq!(
        summary.start,
        Start::Checkpoint {
            seq: plan.drop_through,
            hash: plan.dropped_head.hash
        }
    );
    assert_eq!(summary.pruned_through, Some(plan.drop_through));
    assert!(verify(&kept, None).is_ok());
    assert!(verify_jsonl(to_jsonl(&kept).as_bytes(), Some(key.public_key())).is_ok());

    // Pruning again later starts from the retained chain.
    let later = prune_plan(&kept, t0 + 1_000).unwrap();
    assert!(later.anchor_seq > plan.anchor_seq);
}

#[test]
fn a_pruned_chain_needs_a_valid_anchor() {
    let key = AuditKey::generate().unwrap();
    let records = chain(100, 9, &key);
    let anchor = records
        .iter()
        .skip(20)
        .position(|r| matches!(r.event, Event::Checkpoint { .. }))
        .unwrap()
        + 20;
    // Cut right after the anchor: no checkpoint first.
    let err = verify(&records[anchor + 1..], None).unwrap_err();
    assert_eq!(
        err,
        VerifyError::UnanchoredStart {
            seq: records[anchor + 1].seq
        }
    );
    // A forged anchor (signature altered, chain rehashed) fails with the key.
    let mut kept = records[anchor..].to_vec();
    if let Event::Checkpoint { signature, .. } = &mut kept[0].event {
        *signature = "00".repeat(64);
    }
    rehash_from(&mut kept, 0);
    assert!(verify(&kept, None).is_ok());
    assert_eq!(
        verify(&kept, Some(key.public_key())).unwrap_err(),
        VerifyError::BadSignature {
            seq: records[anchor].seq,
            key_id: key.key_id()
        }
    );
}

#[test]
fn a_pruning_marker_must_agree_with_the_chain() {
    let key = AuditKey::generate().unwrap();
    let mut records = chain(40, 9, &key);
    let head = records.last().unwrap().head();
    records.push(next(
        Some(&head),
        1_800_000_000,
        Caller::server(ServerTask::AuditRetention),
        Event::Pruned {
            up_to_seq: 5,
            head_hash: Digest::sha256(b"not record 5"),
        },
    ));
    assert_eq!(
        verify(&records, None).unwrap_err(),
        VerifyError::PrunedMismatch {
            seq: 41,
            up_to_seq: 5,
            named_hash: Digest::sha256(b"not record 5"),
            expected_hash: records[4].hash
        }
    );
    // A marker naming itself, whatever hash it gives.
    let head = records[39].head();
    records[40] = next(
        Some(&head),
        1_800_000_000,
        Caller::server(ServerTask::AuditRetention),
        Event::Pruned {
            up_to_seq: 41,
            head_hash: Digest::ZERO,
        },
    );
    assert_eq!(
        verify(&records, None).unwrap_err(),
        VerifyError::PrunedAhead {
            seq: 41,
            up_to_seq: 41
        }
    );
}

#[test]
fn prune_plan_keeps_everything_it_must() {
    let key = AuditKey::generate().unwrap();
    let t0 = 1_700_000_000;
    let records = chain(50, 9, &key);
    // Nothing is old.
    assert_eq!(prune_plan(&records, t0), None);
    // Old records, but no checkpoint after them yet.
    assert_eq!(prune_plan(&records, t0 + 5), None);
    // Everything is old: drop up to the last checkpoint.
    let plan = prune_plan(&records, t0 + 10_000).unwrap();
    let last_cp = records
        .iter()
        .rposition(|r| matches!(r.event, Event::Checkpoint { .. }))
        .unwrap();
    assert_eq!(plan.anchor_seq, records[last_cp].seq);
    assert_eq!(prune_plan(&[], t0), None);
}

#[test]
fn export_start_begins_at_a_checkpoint() {
    let key = AuditKey::generate().unwrap();
    let records = chain(60, 9, &key);
    for since in 1..=60u64 {
        let start = export_start(&records, since);
        let export = &records[start..];
        assert!(export[0].seq <= since);
        // Each export verifies; one that begins at a checkpoint (all but
        // the whole chain) is also authenticated with the key.
        assert!(verify(export, None).is_ok(), "since {since}");
        if start > 0 {
            assert!(matches!(export[0].event, Event::Checkpoint { .. }));
            assert!(verify(export, Some(key.public_key())).is_ok());
        }
    }
    assert_eq!(export_start(&records, 1), 0);
}

#[test]
fn lines_must_be_canonical() {
    let key = AuditKey::generate().unwrap();
    let r = &chain(8, 3, &key)[6];
    let line = r.to_jsonl_line();
    let pretty = serde_json::to_string_pretty(r).unwrap();
    assert_eq!(
        Record::from_jsonl_line(&pretty).unwrap_err(),
        LineError::NotCanonical
    );
    let spaced = line.replacen(":", ": ", 1);
    assert_eq!(
        Record::from_jsonl_line(&spaced).unwrap_err(),
        LineError::NotCanonical
    );
    let upper = line.replace(&r.hash.to_string(), &r.hash.to_string().to_uppercase());
    assert!(matches!(
        Record::from_jsonl_line(&upper).unwrap_err(),
        LineError::Json(_)
    ));
    let extra = line.replacen("{\"seq\"", "{\"x\":1,\"seq\"", 1);
    assert!(matches!(
        Record::from_jsonl_line(&extra).unwrap_err(),
        LineError::Json(_)
    ));
    let wrong_at = line.replacen("\"at\":\"20", "\"at\":\"21", 1);
    assert!(
        matches!(Record::from_jsonl_line(&wrong_at).unwrap_err(), LineError::Json(ref m) if m.contains("`at`"))
    );
    assert_eq!(
        parse_jsonl(&format!("{line}\n\n{line}\n")).unwrap_err(),
        ParseError {
            line: 2,
            error: LineError::Empty
        }
    );
    assert!(parse_jsonl(&format!("{line}\r\n")).is_err());
    assert_eq!(parse_jsonl("").unwrap(), vec![]);
}

#[test]
fn event_json_forms_are_stable() {
    let cases = [
        (
            Event::KeyPrepared {
                key_kind: KeyKind::X509Ca,
                key_id: "k".into(),
            },
            r#"{"kind":"key_prepared","key_kind":"x509-ca","key_id":"k"}"#,
        ),
        (
            Event::KillCreated {
                kill_id: "k1".into(),
                target: KillTarget::selector(&"unix:uid:0".parse().unwrap()),
                reason: "r".into(),
            },
            r#"{"kind":"kill_created","kill_id":"k1","target":{"type":"selector","selector":"unix:uid:0"},"reason":"r"}"#,
        ),
        (
            Event::JoinTokenGenerated {
                spiffe_id: None,
                expires_at: 9,
                token_hash: "ab".into(),
            },
            r#"{"kind":"join_token_generated","spiffe_id":null,"expires_at":9,"token_hash":"ab"}"#,
        ),
        (
            Event::FederatedBundleDeleted {
                trust_domain: TrustDomain::new("td.example").unwrap(),
            },
            r#"{"kind":"federated_bundle_deleted","trust_domain":"td.example"}"#,
        ),
        (
            Event::Pruned {
                up_to_seq: 3,
                head_hash: Digest::ZERO,
            },
            r#"{"kind":"pruned","up_to_seq":3,"head_hash":"0000000000000000000000000000000000000000000000000000000000000000"}"#,
        ),
    ];
    for (event, json) in cases {
        assert_eq!(serde_json::to_string(&event).unwrap(), json);
        assert_eq!(serde_json::from_str::<Event>(json).unwrap(), event);
        assert!(json.contains(&format!("\"kind\":\"{}\"", event.kind())));
    }
    // Unknown fields inside an event are refused.
    assert!(
        serde_json::from_str::<Event>(
            r#"{"kind":"agent_evicted","agent_id":"spiffe://a.b/c","x":1}"#
        )
        .is_err()
    );
}

#[test]
fn join_tokens_are_never_recorded() {
    let token = "4f1c9a0e7b2d4e6f8a1b3c5d7e9f0a2b";
    let fp = join_token_fingerprint(token);
    assert_eq!(fp.len(), 16);
    assert!(!token.contains(&fp) && !fp.contains(&token[..8]));
    assert_eq!(fp, join_token_fingerprint(token));
    assert_ne!(fp, join_token_fingerprint("other"));
}

#[test]
fn keys_round_trip_through_their_file_formats() {
    let key = AuditKey::generate().unwrap();
    let again = AuditKey::from_pkcs8(key.to_pkcs8_der()).unwrap();
    assert_eq!(again.public_key(), key.public_key());
    let from_pem = AuditKey::from_pkcs8_pem(&key.to_pkcs8_pem()).unwrap();
    assert_eq!(from_pem.key_id(), key.key_id());

    let pem = key.public_key_pem();
    assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----"), "{pem}");
    let public = AuditPublicKey::from_pem(&pem).unwrap();
    assert_eq!(&public, key.public_key());
    assert_eq!(public.to_spki_der().len(), 44);
    assert_eq!(public.key_id().len(), 32);
    assert_eq!(public.key_id(), &ring_hex(&public.to_spki_der())[..32]);

    // Wrong label, wrong key type, garbage.
    assert!(matches!(
        AuditPublicKey::from_pem(&key.to_pkcs8_pem()),
        Err(KeyError::BadPem { .. })
    ));
    let mut der = public.to_spki_der();
    der[8] ^= 1;
    assert_eq!(
        AuditPublicKey::from_spki_der(&der),
        Err(KeyError::BadPublicKey)
    );
    assert!(AuditPublicKey::from_pem("not a key").is_err());
    assert!(matches!(
        AuditKey::from_pkcs8(b"garbage"),
        Err(KeyError::BadPrivateKey(_))
    ));
    assert!(!format!("{key:?}").contains(&hex::encode(key.to_pkcs8_der())));
}

#[test]
fn signatures_bind_the_sequence_number_and_hash() {
    let key = fixed_key();
    let h = Digest::sha256(b"head");
    let Event::Checkpoint { signature, .. } = key.sign_checkpoint(10, &h) else {
        panic!("not a checkpoint");
    };
    let public = key.public_key();
    assert!(public.verify_checkpoint(10, &h, &signature).is_ok());
    assert!(public.verify_checkpoint(11, &h, &signature).is_err());
    assert!(
        public
            .verify_checkpoint(10, &Digest::sha256(b"other"), &signature)
            .is_err()
    );
    assert!(
        public
            .verify_checkpoint(10, &h, &signature.to_uppercase())
            .is_err()
    );
    assert!(public.verify_checkpoint(10, &h, "").is_err());
}

/// xorshift64*: a deterministic source of mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

#[test]
fn parsing_and_verifying_mutated_input_never_panics() {
    let key = AuditKey::generate().unwrap();
    let seed = to_jsonl(&chain(12, 4, &key)).into_bytes();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let interesting: &[&[u8]] = &[
        b"{",
        b"}",
        b"\"",
        b"\\",
        b"\n",
        b"\\u",
        b"null",
        b"-1",
        b"18446744073709551616",
        b"1e999",
        b"\xff",
        b"\xe2\x82",
        b"[",
        b"{\"kind\":\"checkpoint\"}",
    ];
    for round in 0..3_000 {
        let mut input = seed.clone();
        for _ in 0..1 + rng.below(4) {
            let pos = rng.below(input.len());
            match rng.below(5) {
                0 => input[pos] = rng.next() as u8,
                1 => {
                    input.remove(pos);
                }
                2 => input.truncate(pos),
                3 => {
                    let piece = interesting[rng.below(interesting.len())];
                    let at = pos.min(input.len());
                    input.splice(at..at, piece.iter().copied());
                }
                _ => {
                    let from = rng.below(input.len());
                    let len = rng.below(200);
                    let piece: Vec<u8> = input.iter().skip(from).take(len).copied().collect();
                    let at = pos.min(input.len());
                    input.splice(at..at, piece);
                }
            }
            if input.is_empty() {
                break;
            }
        }
        let _ = verify_jsonl(&input, Some(key.public_key()));
        let _ = verify_jsonl(&input, None);
        if let Ok(text) = std::str::from_utf8(&input)
            && let Ok(records) = parse_jsonl(text)
        {
            let _ = verify(&records, None);
            let _ = prune_plan(&records, 1_700_000_005);
            let _ = export_start(&records, round);
        }
    }
    // Arbitrary bytes.
    for _ in 0..500 {
        let len = rng.below(300);
        let input: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        assert!(verify_jsonl(&input, None).is_err());
    }
}

#[test]
fn verifying_odd_chains_never_panics() {
    // Extreme numbers where arithmetic could overflow: sequence numbers near
    // 0 and u64::MAX, checkpoints and pruning markers naming anything.
    let key = AuditKey::generate().unwrap();
    let mut rng = Rng(0x0123_4567_89ab_cdef);
    let pick = |rng: &mut Rng| match rng.below(6) {
        0 => 0,
        1 => 1,
        2 => 2,
        3 => u64::MAX,
        4 => u64::MAX - 1,
        _ => rng.next() % 8,
    };
    for _ in 0..2_000 {
        let n = 1 + rng.below(5);
        let mut records: Vec<Record> = Vec::new();
        for i in 0..n {
            let seq = pick(&mut rng);
            let h = records.last().map_or(Digest::ZERO, |r| r.hash);
            let named = pick(&mut rng);
            let event = match rng.below(3) {
                0 => key.sign_checkpoint(named, &h),
                1 => Event::Pruned {
                    up_to_seq: named,
                    head_hash: h,
                },
                _ => event(i),
            };
            let mut r = next(None, rng.next() as i64, caller(i), event);
            r.seq = seq;
            if rng.below(2) == 0 {
                r.prev_hash = h;
            }
            r.hash = r.compute_hash();
            records.push(r);
        }
        let _ = verify(&records, None);
        let _ = verify(&records, Some(key.public_key()));
        let _ = verify_jsonl(to_jsonl(&records).as_bytes(), Some(key.public_key()));
        let _ = prune_plan(&records, rng.next() as i64);
        let _ = export_start(&records, pick(&mut rng));
        if let Err(e) = verify(&records, None) {
            let _ = e.to_string();
        }
    }
}
