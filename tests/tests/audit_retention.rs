//! End-to-end: `audit_retention` prunes old audit records while the chain
//! stays verifiable, with the audit key, from the signed checkpoint that
//! now starts it; a `pruned` record says how far it went; and a retention
//! shorter than `ca_ttl` is refused (the CRL is rebuilt from that window).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a test failure"
)]

use std::time::Duration;

use sigil_tests::{Cluster, bin, my_uid_selector, wait_for};

/// An entry under an agent that never attests: only its audit record matters.
fn entry(c: &Cluster, id: &str) {
    c.server_ok(&[
        "entry",
        "create",
        "--parent-id",
        "spiffe://example.org/nobody",
        "--spiffe-id",
        id,
        "--selector",
        &my_uid_selector(),
    ]);
}

fn records(export: &str) -> Vec<serde_json::Value> {
    export
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn old_records_are_pruned_up_to_a_signed_checkpoint_and_the_chain_still_verifies() {
    // A 20 s CA bounds every SVID, so a 20 s retention may prune.
    let c = Cluster::start_with(
        "ca_ttl = \"20s\"\ndefault_x509_svid_ttl = \"10s\"\ndefault_jwt_svid_ttl = \"10s\"\naudit_retention = \"20s\"\naudit_checkpoint_interval = \"1s\"\n",
    );
    for i in 0..5 {
        entry(&c, &format!("spiffe://example.org/r{i}"));
    }
    let before = records(&c.server_ok(&["audit", "export"]));
    assert_eq!(before[0]["seq"], 1);
    let first_kinds: Vec<String> = before
        .iter()
        .map(|r| r["event"]["kind"].as_str().unwrap().to_string())
        .collect();
    assert!(first_kinds.contains(&"entry_created".to_string()));

    // Keep the chain moving so that checkpoints follow the old records.
    let mut export = String::new();
    let mut n = 0;
    wait_for("records to be pruned", Duration::from_secs(90), || {
        n += 1;
        entry(&c, &format!("spiffe://example.org/later{n}"));
        std::thread::sleep(Duration::from_millis(500));
        export = c.server_ok(&["audit", "export"]);
        records(&export)[0]["seq"] != 1
    });
    let after = records(&export);
    // The chain now starts at a checkpoint, after the last pruned record...
    assert_eq!(after[0]["event"]["kind"], "checkpoint", "{:?}", after[0]);
    let first_seq = after[0]["seq"].as_u64().unwrap();
    // ...and a pruned record names what went.
    let pruned = after
        .iter()
        .find(|r| r["event"]["kind"] == "pruned")
        .expect("no pruned record");
    assert_eq!(
        pruned["event"]["up_to_seq"].as_u64().unwrap() + 1,
        first_seq
    );
    assert_eq!(pruned["caller"]["kind"], "server");
    // Nothing pruned is younger than the retention (20 s) before the prune.
    let oldest_kept = after[1]["time"].as_i64().unwrap();
    assert!(pruned["time"].as_i64().unwrap() - oldest_kept < 20 + 2);

    // Verified online, offline and with the audit key.
    let live = c.server_ok(&["audit", "verify"]);
    assert!(
        live.contains("OK") || live.to_lowercase().contains("ok"),
        "{live}"
    );
    let path = c.dir.0.join("audit.jsonl");
    std::fs::write(&path, &export).unwrap();
    let key = c.dir.0.join("audit-key.pem");
    std::fs::write(&key, c.server_ok(&["audit", "key"])).unwrap();
    let out = c.server_cli(&[
        "audit",
        "verify",
        "--file",
        path.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Cutting the anchor off breaks it, naming the first record.
    let cut: String = export.lines().skip(1).map(|l| format!("{l}\n")).collect();
    std::fs::write(&path, cut).unwrap();
    let out = c.server_cli(&["audit", "verify", "--file", path.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(err.contains(&format!("seq {}", first_seq + 1)), "{err}");
}

#[test]
fn a_retention_shorter_than_ca_ttl_is_refused_naming_the_key() {
    let dir = sigil_tests::Scratch::new("ret");
    let cfg = dir.0.join("server.toml");
    std::fs::write(
        &cfg,
        format!(
            "trust_domain = \"example.org\"\ndata_dir = \"{}/server\"\naudit_retention = \"1h\"\n",
            dir.0.display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(bin("sigil-server"))
        .args(["run", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("audit_retention") && err.contains("ca_ttl"),
        "{err}"
    );
    assert!(
        !dir.0.join("server").exists(),
        "a refused config wrote data"
    );
}
