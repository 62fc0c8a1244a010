//! End-to-end: the `ima` workload attestor of the real agent, with a real
//! TPM (swtpm, started by scripts/swtpm-start) and a real client
//! (`spiffe-probe`, the `spiffe` crate). This machine's kernel has no IMA,
//! so the test writes an `ima-ng` binary log listing the probe's digest and
//! extends swtpm's PCR 10 with the same template hashes, as the kernel
//! would; the agent's `log_path` points at that file. Then:
//! - the measured probe gets the entry pinned by `ima:sha256:`;
//! - a log with an entry that was never extended into PCR 10 does not
//!   verify: callers are refused (the attestor failed), the agent logs why;
//! - a binary absent from a verified log gets no `ima` selector.
//!
//!
//! The second test is the server's side: a TPM agent with
//! `[tpm] ima_log_path` sends that log with every quote, the server quotes
//! PCR 10 too, replays the log against it and records one
//! `tpm:ima:sha256:` node selector per measured file; a measurement
//! missing from the log (PCR 10 extended, log not) fails the
//! re-attestation, and the refusal is in the audit trail.
//!
//! Needs swtpm and tpm2-tools; `SIGIL_SKIP_TPM=1` skips them.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a test failure"
)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use sigil_tests::{Cluster, Scratch, bin, log_count, my_uid_selector, wait_for};

const LONG: Duration = Duration::from_secs(20);

fn sha256(parts: &[&[u8]]) -> Vec<u8> {
    let mut cmd = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = cmd.stdin.take().unwrap();
        for p in parts {
            stdin.write_all(p).unwrap();
        }
    }
    let out = cmd.wait_with_output().unwrap();
    let hex = String::from_utf8(out.stdout).unwrap();
    decode_hex(hex.split_whitespace().next().unwrap())
}

fn decode_hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn encode_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// One ima-ng entry (SHA-256 bank) for a file with `file_digest` at
/// `path`, and its template hash (what the kernel extends into PCR 10).
fn entry(file_digest: &[u8], path: &str) -> (Vec<u8>, Vec<u8>) {
    let mut d = b"sha256:\0".to_vec();
    d.extend_from_slice(file_digest);
    let mut p = path.as_bytes().to_vec();
    p.push(0);
    let mut data = Vec::new();
    data.extend_from_slice(&(d.len() as u32).to_le_bytes());
    data.extend_from_slice(&d);
    data.extend_from_slice(&(p.len() as u32).to_le_bytes());
    data.extend_from_slice(&p);
    let template = sha256(&[&data]);
    let mut e = Vec::new();
    e.extend_from_slice(&10u32.to_le_bytes());
    e.extend_from_slice(&template);
    e.extend_from_slice(&6u32.to_le_bytes());
    e.extend_from_slice(b"ima-ng");
    e.extend_from_slice(&(data.len() as u32).to_le_bytes());
    e.extend_from_slice(&data);
    (e, template)
}

/// A running swtpm, killed (and its state removed) on drop.
struct Swtpm(HashMap<String, String>);

impl Swtpm {
    fn start() -> Self {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/swtpm-start");
        let out = Command::new(script).output().unwrap();
        assert!(
            out.status.success(),
            "swtpm-start failed (is swtpm installed? .ci/run installs it): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Swtpm(
            String::from_utf8(out.stdout)
                .unwrap()
                .lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    fn tcti(&self) -> &str {
        &self.0["TPM2TOOLS_TCTI"]
    }

    fn ek_hash(&self) -> String {
        let out = Command::new(bin("sigil-agent"))
            .args(["tpm", "ek-hash", "--tcti", self.tcti()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    fn extend_pcr10(&self, template: &[u8]) {
        let out = Command::new("tpm2_pcrextend")
            .arg(format!("10:sha256={}", encode_hex(template)))
            .env("TPM2TOOLS_TCTI", self.tcti())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "tpm2_pcrextend: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        if let Some(pid) = self.0.get("SWTPM_PID").and_then(|p| p.parse::<i32>().ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        if let Some(dir) = self.0.get("SWTPM_STATE_DIR") {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn probe(exe: &Path, c: &Cluster) -> String {
    let out = Command::new(exe).arg(c.api_addr()).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn a_binary_measured_in_a_verified_ima_log_gets_its_ima_identity_and_a_forged_log_gives_none() {
    if std::env::var_os("SIGIL_SKIP_TPM").is_some() {
        eprintln!("\n!!! SIGIL_SKIP_TPM set: ima_attestation SKIPPED !!!\n");
        return;
    }
    let tpm = Swtpm::start();
    let dir = Scratch::new("ima");
    let measured = dir.0.join("measured-probe");
    std::fs::copy(bin("spiffe-probe"), &measured).unwrap();
    let unmeasured = dir.0.join("unmeasured-probe");
    std::fs::copy(bin("spiffe-probe"), &unmeasured).unwrap();
    // A different binary: one byte appended (ELF loaders ignore trailing bytes).
    std::fs::OpenOptions::new()
        .append(true)
        .open(&unmeasured)
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"\0"))
        .unwrap();
    let digest = sha256(&[&std::fs::read(&measured).unwrap()]);
    let other = sha256(&[&std::fs::read(&unmeasured).unwrap()]);

    let log_path = dir.0.join("binary_runtime_measurements_sha256");
    let mut log = Vec::new();
    for (d, p) in [
        (sha256(&[b"boot aggregate"]), "boot_aggregate".to_string()),
        (digest.clone(), measured.display().to_string()),
    ] {
        let (e, template) = entry(&d, &p);
        log.extend(e);
        tpm.extend_pcr10(&template);
    }
    std::fs::write(&log_path, &log).unwrap();

    let mut c = Cluster::start();
    c.start_agent_with(
        "spiffe://example.org/ima-node",
        &format!(
            "[workload_attestor.ima]\nlog_path = \"{}\"\ntcti = \"{}\"\ntimeout = \"10s\"\n",
            log_path.display(),
            tpm.tcti()
        ),
    );
    for (id, d) in [("ima-measured", &digest), ("ima-other", &other)] {
        c.create_entry(
            &format!("spiffe://example.org/{id}"),
            &[
                "--selector",
                &my_uid_selector(),
                "--selector",
                &format!("ima:sha256:{}", encode_hex(d)),
            ],
        );
    }
    let mut got = String::new();
    wait_for("the measured binary's ima identity", LONG, || {
        got = probe(&measured, &c);
        got == "OK spiffe://example.org/ima-measured"
    });
    // Not in the log: no ima selector, so no identity from either entry.
    let got = probe(&unmeasured, &c);
    assert!(got.starts_with("ERR permission_denied"), "{got}");

    // An entry the TPM never measured: the log no longer replays to PCR 10.
    let before = log_count(&c.dir.0, "agent.log", "does not verify");
    let (forged, _) = entry(&other, &unmeasured.display().to_string());
    log.extend(forged);
    std::fs::write(&log_path, &log).unwrap();
    let got = probe(&unmeasured, &c);
    assert!(got.starts_with("ERR"), "a forged log vouched: {got}");
    assert!(!got.contains("ima-other"), "{got}");
    let got = probe(&measured, &c);
    assert!(
        got.starts_with("ERR") && !got.contains("permission_denied: no identity"),
        "a caller was served from an unverified log: {got}"
    );
    wait_for("the agent's line about the forged log", LONG, || {
        log_count(&c.dir.0, "agent.log", "does not verify") > before
    });
}

fn node_selectors(c: &Cluster) -> Vec<String> {
    serde_json::from_value(c.agents_json()["agents"][0]["selectors"].clone()).unwrap()
}

#[test]
fn the_server_replays_the_nodes_ima_log_against_the_quoted_pcr_10() {
    if std::env::var_os("SIGIL_SKIP_TPM").is_some() {
        eprintln!("\n!!! SIGIL_SKIP_TPM set: ima node attestation SKIPPED !!!\n");
        return;
    }
    let tpm = Swtpm::start();
    let ek = tpm.ek_hash();
    let dir = Scratch::new("ima-node");
    let measured = dir.0.join("measured-probe");
    std::fs::copy(bin("spiffe-probe"), &measured).unwrap();
    let digest = encode_hex(&sha256(&[&std::fs::read(&measured).unwrap()]));
    let log_path = dir.0.join("binary_runtime_measurements_sha256");
    let mut log = Vec::new();
    for (d, p) in [
        (sha256(&[b"boot aggregate"]), "boot_aggregate".to_string()),
        (decode_hex(&digest), measured.display().to_string()),
    ] {
        let (e, template) = entry(&d, &p);
        log.extend(e);
        tpm.extend_pcr10(&template);
    }
    std::fs::write(&log_path, &log).unwrap();

    // Re-attestation at every renewal (half of the 6 s agent SVID TTL).
    let mut c = Cluster::start_with(&format!(
        "agent_svid_ttl = \"6s\"\n[tpm]\nek_hashes = [\"{ek}\"]\npcrs = [7]\n"
    ));
    c.start_agent_configured(&format!(
        "node_attestor = \"tpm\"\n[tpm]\ntcti = \"{}\"\nima_log_path = \"{}\"\n",
        tpm.tcti(),
        log_path.display()
    ));
    let selectors = node_selectors(&c);
    eprintln!("node selectors: {selectors:#?}");
    let ima_selector = format!("tpm:ima:sha256:{digest}");
    assert!(selectors.contains(&ima_selector), "{selectors:?}");
    assert_eq!(
        selectors
            .iter()
            .filter(|s| s.starts_with("tpm:ima:"))
            .count(),
        2,
        "{selectors:?}"
    );
    // PCR 10 is quoted for the log but is no enrolled measurement.
    assert!(
        !selectors
            .iter()
            .any(|s| s.starts_with("tpm:pcr:sha256:10:")),
        "{selectors:?}"
    );
    assert!(
        selectors.iter().any(|s| s.starts_with("tpm:pcr:sha256:7:")),
        "{selectors:?}"
    );

    // A node alias on the measured binary's digest: workloads on nodes
    // whose TPM-backed log lists that binary.
    c.server_ok(&[
        "entry",
        "create",
        "--node",
        "--spiffe-id",
        "spiffe://example.org/nodes/runs-measured-probe",
        "--parent-id",
        "spiffe://example.org/sigil/server",
        "--selector",
        &ima_selector,
    ]);
    c.server_ok(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/on-measured-node",
        "--parent-id",
        "spiffe://example.org/nodes/runs-measured-probe",
        "--selector",
        &my_uid_selector(),
    ]);
    let mut got = String::new();
    wait_for("an SVID through the IMA node alias", LONG, || {
        got = probe(&measured, &c);
        got == "OK spiffe://example.org/on-measured-node"
    });

    // A file measured later (log and PCR 10 both grow): the next
    // re-attestation keeps the identity and adds its digest.
    let later = encode_hex(&sha256(&[b"a binary measured later"]));
    let (e, template) = entry(&decode_hex(&later), "/usr/bin/later");
    log.extend(e);
    std::fs::write(&log_path, &log).unwrap();
    tpm.extend_pcr10(&template);
    wait_for("the later digest after re-attestation", LONG, || {
        node_selectors(&c).contains(&format!("tpm:ima:sha256:{later}"))
    });

    // A measurement hidden from the log: PCR 10 is extended, the log is
    // not, so no prefix of the log replays to the quote. Refused, audited.
    let (_, hidden) = entry(&sha256(&[b"hidden"]), "/tmp/hidden");
    tpm.extend_pcr10(&hidden);
    wait_for("the refused re-attestation", LONG, || {
        log_count(
            &c.dir.0,
            "agent.log",
            "does not replay to the quoted PCR 10",
        ) > 0
    });
    eprintln!(
        "{}",
        std::fs::read_to_string(c.dir.0.join("agent.log"))
            .unwrap()
            .lines()
            .find(|l| l.contains("does not replay"))
            .unwrap()
    );
    let export = c.server_ok(&["audit", "export"]);
    let refusal = export
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|r| r["event"]["kind"] == "node_attestation_failed")
        .expect("the refusal in the audit trail");
    assert_eq!(refusal["event"]["attestation_type"], "tpm", "{refusal}");
    assert!(
        refusal["event"]["reason"]
            .as_str()
            .unwrap()
            .contains("IMA log does not replay to the quoted PCR 10"),
        "{refusal}"
    );
}
