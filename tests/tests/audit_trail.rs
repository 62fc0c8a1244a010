//! End-to-end: every registry change is in the hash-chained audit trail,
//! with its caller, written in the change's own transaction; `audit verify`
//! passes on an untouched export and names the first bad record after a
//! byte is flipped, a record is removed or two are swapped.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a test failure"
)]

use sigil_tests::{Cluster, my_uid_selector};

fn verify_file(c: &Cluster, text: &str) -> (bool, String) {
    let path = c.dir.0.join("audit.jsonl");
    std::fs::write(&path, text).unwrap();
    let out = c.server_cli(&["audit", "verify", "--file", path.to_str().unwrap()]);
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn changes_are_audited_with_their_caller_and_tampering_is_caught() {
    let c = Cluster::with_agent();
    let entry = c.create_entry(
        "spiffe://example.org/a",
        &["--selector", &my_uid_selector()],
    );
    c.server_ok(&["entry", "update", &entry, "--hint", "h2"]);
    let kill_out = c.server_ok(&[
        "kill", "--entry", &entry, "--reason", "drill", "--output", "json",
    ]);
    let kill: serde_json::Value = serde_json::from_str(&kill_out).unwrap();
    c.server_ok(&["kill", "lift", kill["id"].as_str().unwrap()]);
    c.server_ok(&["entry", "delete", &entry]);
    c.server_ok(&["agent", "ban", "spiffe://example.org/test-agent"]);

    let export = c.server_ok(&["audit", "export"]);
    let lines: Vec<&str> = export.lines().collect();
    let records: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: Vec<&str> = records
        .iter()
        .map(|r| r["event"]["kind"].as_str().unwrap())
        .collect();
    for want in [
        "join_token_generated",
        "join_token_used",
        "node_attested",
        "agent_svid_issued",
        "entry_created",
        "entry_updated",
        "kill_created",
        "kill_lifted",
        "entry_deleted",
        "agent_banned",
    ] {
        assert!(kinds.contains(&want), "no {want} in {kinds:?}");
    }
    let created = records
        .iter()
        .find(|r| r["event"]["kind"] == "entry_created")
        .unwrap();
    assert_eq!(created["caller"]["kind"], "admin");
    assert_eq!(created["caller"]["uid"], sigil_tests::my_uid());
    let used = records
        .iter()
        .find(|r| r["event"]["kind"] == "join_token_used")
        .unwrap();
    assert_eq!(used["caller"]["kind"], "node");

    // Untouched: verifies, live and offline.
    let live = c.server_ok(&["audit", "verify"]);
    assert!(live.starts_with("OK:"), "{live}");
    let (ok, msg) = verify_file(&c, &export);
    assert!(ok, "{msg}");

    // One byte flipped in record 3 (inside its reason/IDs, not its hash).
    let mut flipped: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    flipped[2] = flipped[2].replacen("spiffe://", "spiffe:/x", 1);
    let (ok, msg) = verify_file(&c, &(flipped.join("\n") + "\n"));
    assert!(!ok && msg.contains("seq 3"), "{msg}");

    // Record 4 removed.
    let mut removed: Vec<&str> = lines.clone();
    removed.remove(3);
    let (ok, msg) = verify_file(&c, &(removed.join("\n") + "\n"));
    assert!(!ok && msg.contains("seq 4"), "{msg}");

    // Records 5 and 6 swapped.
    let mut swapped: Vec<&str> = lines.clone();
    swapped.swap(4, 5);
    let (ok, msg) = verify_file(&c, &(swapped.join("\n") + "\n"));
    assert!(!ok && msg.contains("seq 5"), "{msg}");
}

/// `audit verify --file FILE --key KEY`: success and combined output.
fn verify_with_key(c: &Cluster, text: &str, key_pem: &str) -> (bool, String) {
    let path = c.dir.0.join("audit-k.jsonl");
    let key = c.dir.0.join("audit-key.pem");
    std::fs::write(&path, text).unwrap();
    std::fs::write(&key, key_pem).unwrap();
    let out = c.server_cli(&[
        "audit",
        "verify",
        "--file",
        path.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
    ]);
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Every record, read through `audit query` (which, unlike an export,
/// appends no checkpoint).
fn all_records(c: &Cluster) -> Vec<serde_json::Value> {
    c.server_ok(&[
        "audit",
        "query",
        "--since",
        "1970-01-01T00:00:01Z",
        "--output",
        "json",
    ])
    .lines()
    .map(|l| serde_json::from_str(l).unwrap())
    .collect()
}

fn checkpoints(records: &[serde_json::Value]) -> Vec<&serde_json::Value> {
    records
        .iter()
        .filter(|r| r["event"]["kind"] == "checkpoint")
        .collect()
}

#[test]
fn checkpoints_are_signed_with_the_servers_audit_key_and_verify_offline() {
    let mut c =
        Cluster::start_with("audit_checkpoint_every = 3\naudit_checkpoint_interval = \"1h\"\n");
    c.start_agent("spiffe://example.org/test-agent");

    // The key file: created on first start, private, never logged.
    let key_file = c.dir.0.join("server/audit_key.pem");
    let meta = std::fs::metadata(&key_file).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
        0o600
    );
    let private_pem = std::fs::read_to_string(&key_file).unwrap();
    assert!(private_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
    let secret_body = private_pem.lines().nth(1).unwrap();
    let public_pem = c.server_ok(&["audit", "key"]);
    assert!(
        public_pem.starts_with("-----BEGIN PUBLIC KEY-----"),
        "{public_pem}"
    );

    // Every 3 records: the join token, attestation and SVID records (and
    // more) are followed by a checkpoint without any export.
    for i in 0..3 {
        c.server_ok(&[
            "token",
            "generate",
            "--spiffe-id",
            &format!("spiffe://example.org/n{i}"),
        ]);
    }
    sigil_tests::wait_for(
        "a count-triggered checkpoint",
        std::time::Duration::from_secs(15),
        || {
            let recs = all_records(&c);
            let cps = checkpoints(&recs);
            !cps.is_empty()
                && cps.iter().all(|r| {
                    r["caller"]["kind"] == "server" && r["caller"]["task"] == "audit_checkpoint"
                })
        },
    );
    // None is ever more than 3 records (plus the 1 s poll) behind... at
    // least: the first checkpoint signs a head within the first records.
    let recs = all_records(&c);
    let first_cp = checkpoints(&recs)[0]["seq"].as_u64().unwrap();
    assert!(first_cp <= 3 + 8, "first checkpoint only at seq {first_cp}");

    // An export ends with a checkpoint over the head before it. (The entry
    // is under an agent that does not exist, so no mint record can land
    // between the two exports below.)
    c.server_ok(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/x",
        "--parent-id",
        "spiffe://example.org/no-such-agent",
        "--selector",
        "unix:uid:1",
    ]);
    let export = c.server_ok(&["audit", "export"]);
    let lines: Vec<&str> = export.lines().collect();
    let last: serde_json::Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    assert_eq!(last["event"]["kind"], "checkpoint", "{last}");
    assert_eq!(
        last["event"]["seq"].as_u64().unwrap() + 1,
        last["seq"].as_u64().unwrap()
    );
    // Exporting again appends nothing: the head already is a checkpoint.
    assert_eq!(c.server_ok(&["audit", "export"]), export);

    // With the server's key: every signature verifies, nothing unsigned.
    let (ok, msg) = verify_with_key(&c, &export, &public_pem);
    assert!(ok, "{msg}");
    // Signed through the record before the final checkpoint; only the
    // checkpoint record itself (its time and caller) is outside a signature.
    let through = format!(
        "through seq {}; 1 records after it",
        last["seq"].as_u64().unwrap() - 1
    );
    assert!(msg.contains("signed:") && msg.contains(&through), "{msg}");

    // A checkpoint signature altered and the record re-hashed (so the chain
    // itself stays intact): the chain alone still verifies, the key names
    // the checkpoint's seq.
    let last_rec = sigil_core::audit::Record::from_jsonl_line(lines.last().unwrap()).unwrap();
    let mut forged = last_rec.clone();
    if let sigil_core::audit::Event::Checkpoint { signature, .. } = &mut forged.event {
        let flipped = if signature.starts_with('0') { "1" } else { "0" };
        signature.replace_range(0..1, flipped);
    }
    forged.hash = forged.compute_hash();
    let mut tampered: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    *tampered.last_mut().unwrap() = forged.to_jsonl_line();
    let tampered = tampered.join("\n") + "\n";
    let (ok, msg) = verify_file(&c, &tampered);
    assert!(ok, "chain-only verify should pass: {msg}");
    let (ok, msg) = verify_with_key(&c, &tampered, &public_pem);
    assert!(
        !ok && msg.contains(&format!("seq {}", last_rec.seq)),
        "{msg}"
    );

    // A key from another server: its first checkpoint fails, by seq.
    let other = Cluster::start_with(
        "audit_checkpoint_every = 1000000\naudit_checkpoint_interval = \"1s\"\n",
    );
    let other_pem = other.server_ok(&["audit", "key"]);
    assert_ne!(other_pem, public_pem);
    let (ok, msg) = verify_with_key(&c, &export, &other_pem);
    assert!(!ok && msg.contains(&format!("seq {first_cp}")), "{msg}");

    // Time-triggered: the other server signs its one unsigned record
    // within the interval (plus the poll), with no export.
    other.server_ok(&["token", "generate"]);
    sigil_tests::wait_for(
        "a time-triggered checkpoint",
        std::time::Duration::from_secs(15),
        || !checkpoints(&all_records(&other)).is_empty(),
    );

    // The key survives a restart; its secret never reaches the log.
    c.stop_server();
    c.start_server();
    assert_eq!(c.server_ok(&["audit", "key"]), public_pem);
    assert!(
        !c.logs().contains(secret_body),
        "audit key material in the logs"
    );
    let (ok, msg) = verify_with_key(&c, &c.server_ok(&["audit", "export"]), &public_pem);
    assert!(ok, "{msg}");
}

#[test]
fn audit_query_answers_what_an_agent_got_when_from_which_node_and_who_allowed_it() {
    let c = Cluster::with_agent();
    let agent = "spiffe://example.org/test-agent";
    let entry = c.create_entry(
        "spiffe://example.org/q",
        &["--selector", &my_uid_selector()],
    );
    let q = |args: &[&str]| -> Vec<serde_json::Value> {
        let mut a = vec!["audit", "query", "--output", "json"];
        a.extend_from_slice(args);
        c.server_ok(&a)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let kinds = |recs: &[serde_json::Value]| -> Vec<String> {
        recs.iter()
            .map(|r| r["event"]["kind"].as_str().unwrap().to_string())
            .collect()
    };

    // The agent mints for the entry on its own: wait for that record, so
    // that the trail no longer changes under the queries below.
    let mut by_agent = Vec::new();
    sigil_tests::wait_for(
        "the mint record",
        std::time::Duration::from_secs(20),
        || {
            by_agent = q(&["--agent", agent]);
            kinds(&by_agent).contains(&"x509_svids_issued".to_string())
        },
    );
    let k = kinds(&by_agent);
    for want in [
        "join_token_used",
        "node_attested",
        "agent_svid_issued",
        "entry_created",
    ] {
        assert!(k.contains(&want.to_string()), "no {want} in {k:?}");
    }
    // From which node: the attestation names the node's address.
    let att = by_agent
        .iter()
        .find(|r| r["event"]["kind"] == "node_attested")
        .unwrap();
    assert!(
        att["event"]["peer"]
            .as_str()
            .is_some_and(|p| p.contains("127.0.0.1")),
        "{att}"
    );
    // Who allowed it: the entry parented to the agent, created by an admin.
    let created = by_agent
        .iter()
        .find(|r| r["event"]["kind"] == "entry_created")
        .unwrap();
    assert_eq!(created["event"]["entry_id"], entry.as_str());
    assert_eq!(created["caller"]["kind"], "admin");
    assert_eq!(created["caller"]["uid"], sigil_tests::my_uid());
    // Chain order.
    let seqs: Vec<u64> = by_agent
        .iter()
        .map(|r| r["seq"].as_u64().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");

    // By serial (upper case, with a leading zero): exactly that issuance.
    let svid = by_agent
        .iter()
        .find(|r| r["event"]["kind"] == "agent_svid_issued")
        .unwrap();
    let serial = svid["event"]["serial"].as_str().unwrap();
    let found = q(&["--serial", &format!("0{}", serial.to_uppercase())]);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0]["seq"], svid["seq"]);

    // By SPIFFE ID; filters combine (all must match).
    let by_id = q(&["--spiffe-id", "spiffe://example.org/q"]);
    // The entry, and the workload SVID the agent minted under it.
    assert_eq!(kinds(&by_id), vec!["entry_created", "x509_svids_issued"]);
    assert!(q(&["--spiffe-id", "spiffe://example.org/q", "--serial", serial]).is_empty());
    assert!(q(&["--jti", "no-such-jti"]).is_empty());
    assert!(q(&["--agent", agent, "--since", "2999-01-01T00:00:00Z"]).is_empty());
    assert_eq!(
        q(&["--agent", agent, "--since", "2000-01-01T00:00:00Z"]).len(),
        by_agent.len()
    );

    // Pretty output: one line per record.
    let pretty = c.server_ok(&["audit", "query", "--agent", agent]);
    assert_eq!(pretty.lines().count(), by_agent.len(), "{pretty}");
    assert!(pretty.contains("node_attested"), "{pretty}");

    // Bad input names the field.
    for (args, field) in [
        (vec!["--serial", "xyz"], "serial"),
        (vec!["--since", "yesterday"], "since"),
        (vec!["--agent", "not-an-id"], "agent"),
        (vec!["--spiffe-id", "http://x"], "spiffe-id"),
        (vec!["--jti", ""], "jti"),
    ] {
        let mut a = vec!["audit", "query"];
        a.extend_from_slice(&args);
        let out = c.server_cli(&a);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(&format!("`{field}`")),
            "{args:?}: {err}"
        );
    }
}

/// The claims of a compact JWS, decoded without checking anything.
fn jwt_claims(token: &str) -> serde_json::Value {
    let payload = token.split('.').nth(1).unwrap();
    let mut bits = 0u32;
    let mut n = 0;
    let mut out = Vec::new();
    for c in payload.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => panic!("not base64url: {c}"),
        };
        bits = (bits << 6) | u32::from(v);
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
        }
    }
    serde_json::from_slice(&out).unwrap()
}

#[tokio::test]
async fn a_mint_batch_is_one_record_of_its_serials_and_a_jwt_is_audited_by_jti() {
    let mut c = Cluster::start();
    let sel = my_uid_selector();
    let agent = "spiffe://example.org/batch-agent";
    // Three entries before the agent starts: its first sync mints them in
    // one batch.
    c.agent_id = agent.to_string();
    let mut entries = Vec::new();
    for name in ["a", "b", "c"] {
        entries.push(c.create_entry(
            &format!("spiffe://example.org/batch/{name}"),
            &["--selector", &sel],
        ));
    }
    c.start_agent(agent);

    let client = spiffe::WorkloadApiClient::connect_to(c.api_addr())
        .await
        .unwrap();
    let mut ctx = None;
    for _ in 0..100 {
        match client.fetch_x509_context().await {
            Ok(x) if x.svids().len() == 3 => {
                ctx = Some(x);
                break;
            }
            _ => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
        }
    }
    let ctx = ctx.expect("three X.509-SVIDs");
    let mut got: Vec<(String, String, i64)> = ctx
        .svids()
        .iter()
        .map(|s| {
            let (_, cert) = x509_parser::parse_x509_certificate(s.leaf().as_bytes()).unwrap();
            (
                s.spiffe_id().to_string(),
                cert.raw_serial_as_string().replace(':', ""),
                cert.validity().not_after.timestamp(),
            )
        })
        .collect();
    got.sort();

    let token = client
        .fetch_jwt_token(["payments", "ledger"], None)
        .await
        .unwrap();
    let claims = jwt_claims(&token);
    let jti = claims["jti"].as_str().expect("a jti claim").to_string();
    assert_eq!(jti.len(), 32, "{jti}");

    let export = c.server_ok(&["audit", "export"]);
    let records: Vec<serde_json::Value> = export
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let batches: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| r["event"]["kind"] == "x509_svids_issued")
        .collect();
    assert_eq!(batches.len(), 1, "one record per mint batch: {batches:?}");
    let b = batches[0];
    assert_eq!(b["caller"]["kind"], "agent");
    assert_eq!(b["event"]["agent_id"], agent);
    let mut listed: Vec<(String, String, i64)> = b["event"]["svids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            assert!(entries.iter().any(|e| s["entry_id"] == e.as_str()), "{s}");
            (
                s["spiffe_id"].as_str().unwrap().to_string(),
                s["serial"].as_str().unwrap().to_string(),
                s["expires_at"].as_i64().unwrap(),
            )
        })
        .collect();
    listed.sort();
    assert_eq!(listed, got, "the record lists exactly the SVIDs delivered");

    // The workload holds three identities: the agent mints a JWT-SVID
    // for each, and each has its own record and jti.
    let jwts: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| r["event"]["kind"] == "jwt_svid_issued")
        .collect();
    assert_eq!(jwts.len(), 3, "{jwts:?}");
    let mut jtis: Vec<&str> = jwts
        .iter()
        .map(|r| r["event"]["jti"].as_str().unwrap())
        .collect();
    jtis.sort();
    jtis.dedup();
    assert_eq!(jtis.len(), 3, "{jtis:?}");
    let mine: Vec<&&serde_json::Value> = jwts
        .iter()
        .filter(|r| r["event"]["jti"] == jti.as_str())
        .collect();
    assert_eq!(
        mine.len(),
        1,
        "the token's jti {jti} is in the trail: {jwts:?}"
    );
    let j = &mine[0]["event"];
    assert_eq!(mine[0]["caller"]["kind"], "agent");
    assert_eq!(j["spiffe_id"], claims["sub"]);
    assert_eq!(j["expires_at"], claims["exp"]);
    let mut aud: Vec<&str> = j["audience"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    aud.sort();
    assert_eq!(aud, ["ledger", "payments"]);
    assert_eq!(j["agent_id"], agent);

    let live = c.server_ok(&["audit", "verify"]);
    assert!(live.starts_with("OK:"), "{live}");
}
