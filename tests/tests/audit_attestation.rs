//! End-to-end: a refused node attestation is in the audit trail with the
//! claimed attestor, a secret-free summary of the evidence (a hash prefix,
//! never the token) and the reason, and the chain still verifies.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a test failure"
)]

use std::time::Duration;

use sigil_tests::{Cluster, wait_for};

#[test]
fn a_refused_join_token_is_audited_without_the_token() {
    let c = Cluster::start();
    let bogus = "00112233445566778899aabbccddeeff";
    let mut agent = c.spawn_agent(Some(bogus));
    let mut export = String::new();
    wait_for(
        "the refusal in the audit trail",
        Duration::from_secs(30),
        || {
            export = c.server_ok(&["audit", "export"]);
            export.contains("node_attestation_failed")
        },
    );
    let _ = agent.kill();
    let _ = agent.wait();
    let rec: serde_json::Value = export
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|r| r["event"]["kind"] == "node_attestation_failed")
        .unwrap();
    let ev = &rec["event"];
    assert_eq!(ev["attestation_type"], "join_token");
    // sha256("00112233…eeff") starts with these 16 hex digits.
    let digest = ring_free_sha256_prefix(bogus);
    assert_eq!(ev["evidence"], format!("token sha256:{digest}"));
    assert!(
        ev["reason"].as_str().unwrap().contains("PermissionDenied"),
        "{ev}"
    );
    assert!(
        ev["peer"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{ev}"
    );
    assert_eq!(rec["caller"]["kind"], "node");
    assert!(!export.contains(bogus), "the token itself is in the trail");
    let out = c.server_ok(&["audit", "verify"]);
    assert!(out.starts_with("OK"), "{out}");
}

/// The first 16 hex digits of SHA-256(`s`), computed by openssl (an
/// implementation that is not Sigil's).
fn ring_free_sha256_prefix(s: &str) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("openssl")
        .args(["dgst", "-sha256", "-r"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)[..16].to_string()
}
