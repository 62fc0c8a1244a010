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
