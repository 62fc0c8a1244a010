//! End-to-end: TPM 2.0 node attestation against a real software TPM
//! (swtpm, started by scripts/swtpm-start), with the real server and agent.
//! Needs swtpm, swtpm-tools and tpm2-tools (installed by .ci/run).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a test failure"
)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use sigil_tests::{Cluster, bin, log_count, my_uid_selector, wait_for};
use spiffe::WorkloadApiClient;

/// A running swtpm, killed (and its state removed) on drop.
struct Swtpm {
    vars: HashMap<String, String>,
}

impl Swtpm {
    fn start(ek_cert: bool) -> Self {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/swtpm-start");
        let mut cmd = Command::new(script);
        if ek_cert {
            cmd.arg("--ek-cert");
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "swtpm-start failed (is swtpm installed? .ci/run installs it): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let vars = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Swtpm { vars }
    }

    fn tcti(&self) -> &str {
        &self.vars["TPM2TOOLS_TCTI"]
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

    fn extend_pcr16(&self) {
        let out = Command::new("tpm2_pcrextend")
            .arg("16:sha256=0000000000000000000000000000000000000000000000000000000000000001")
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
        if let Some(pid) = self
            .vars
            .get("SWTPM_PID")
            .and_then(|p| p.parse::<i32>().ok())
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        if let Some(dir) = self.vars.get("SWTPM_STATE_DIR") {
            std::thread::sleep(Duration::from_millis(100));
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn tpm_agent_config(tpm: &Swtpm) -> String {
    format!(
        "node_attestor = \"tpm\"\n[tpm]\ntcti = \"{}\"\n",
        tpm.tcti()
    )
}

#[tokio::test]
async fn tpm_node_attests_gets_workloads_by_pcr_alias_and_loses_identity_when_a_pcr_changes() {
    let tpm = Swtpm::start(false);
    let ek = tpm.ek_hash();
    assert_eq!(ek.len(), 64, "{ek}");
    let mut c = Cluster::start_with(&format!(
        "agent_svid_ttl = \"6s\"\n[tpm]\nek_hashes = [\"{ek}\"]\npcrs = [7, 16]\n"
    ));
    c.start_agent_configured(&tpm_agent_config(&tpm));

    let list = c.agents_json();
    let agent = &list["agents"][0];
    assert_eq!(agent["attestation_type"], "tpm");
    assert_eq!(
        agent["spiffe_id"],
        format!("spiffe://example.org/sigil/agent/tpm/{ek}")
    );
    let selectors: Vec<String> = serde_json::from_value(agent["selectors"].clone()).unwrap();
    assert!(
        selectors.contains(&format!("tpm:ek-hash:{ek}")),
        "{selectors:?}"
    );
    let pcr7 = selectors
        .iter()
        .find(|s| s.starts_with("tpm:pcr:sha256:7:"))
        .expect("PCR 7 selector")
        .clone();
    assert!(
        selectors
            .iter()
            .any(|s| s.starts_with("tpm:pcr:sha256:16:")),
        "{selectors:?}"
    );

    // A node alias on PCR 7 delivers workload entries to this node.
    c.server_ok(&[
        "entry",
        "create",
        "--node",
        "--spiffe-id",
        "spiffe://example.org/nodes/measured",
        "--parent-id",
        "spiffe://example.org/sigil/server",
        "--selector",
        &pcr7,
    ]);
    c.server_ok(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/on-tpm-node",
        "--parent-id",
        "spiffe://example.org/nodes/measured",
        "--selector",
        &my_uid_selector(),
    ]);
    let client = WorkloadApiClient::connect_to(c.api_addr()).await.unwrap();
    let mut got = None;
    for _ in 0..100 {
        if let Ok(s) = client.fetch_x509_svid().await {
            got = Some(s.spiffe_id().to_string());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(got.as_deref(), Some("spiffe://example.org/on-tpm-node"));

    // Renewal re-attests with a fresh nonce and quote...
    let first = c.agents_json()["agents"][0]["last_attested_at"]
        .as_str()
        .unwrap()
        .to_string();
    wait_for("a TPM re-attestation", Duration::from_secs(20), || {
        c.agents_json()["agents"][0]["last_attested_at"].as_str() != Some(first.as_str())
    });
    // ... so a changed PCR takes the node's identity away at the next renewal.
    tpm.extend_pcr16();
    wait_for(
        "renewal refused after the PCR change",
        Duration::from_secs(20),
        || c.logs().contains("PCRs) changed since enrollment"),
    );

    // Once its (6 s) agent SVID has expired, the open connection is refused
    // too: a new entry for this node never reaches it.
    let pem_text = std::fs::read(c.dir.0.join("agent/data/agent_svid.pem")).unwrap();
    let leaf = pem::parse_many(&pem_text).unwrap().remove(0);
    let expires = x509_parser::parse_x509_certificate(leaf.contents())
        .unwrap()
        .1
        .validity()
        .not_after
        .timestamp();
    wait_for("the agent SVID to expire", Duration::from_secs(20), || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
            > expires
    });
    let refusals = log_count(&c.dir.0, "server.log", "agent SVID has expired");
    c.server_ok(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/after-change",
        "--parent-id",
        "spiffe://example.org/nodes/measured",
        "--selector",
        &my_uid_selector(),
    ]);
    // The node asked again after the entry existed and was refused.
    wait_for(
        "a refusal after the new entry",
        Duration::from_secs(40),
        || log_count(&c.dir.0, "server.log", "agent SVID has expired") > refusals,
    );
    let ids: Vec<String> = client
        .fetch_all_x509_svids()
        .await
        .map(|v| v.iter().map(|s| s.spiffe_id().to_string()).collect())
        .unwrap_or_default();
    assert!(
        !ids.contains(&"spiffe://example.org/after-change".to_string()),
        "a node whose PCRs changed still got new identities: {ids:?}"
    );
    assert!(
        c.logs().contains("agent SVID has expired"),
        "the server should refuse the expired agent SVID on the open connection"
    );
}

#[test]
fn a_copied_tpm_agent_identity_cannot_renew_without_the_tpm() {
    let tpm = Swtpm::start(false);
    let ek = tpm.ek_hash();
    let mut c = Cluster::start_with(&format!(
        "agent_svid_ttl = \"6s\"\n[tpm]\nek_hashes = [\"{ek}\"]\npcrs = [16]\n"
    ));
    c.start_agent_configured(&tpm_agent_config(&tpm));
    c.stop_agent();
    // Someone copies the agent's SVID and key and runs a join-token agent on them.
    let stolen = c.dir.0.join("stolen");
    std::fs::create_dir_all(&stolen).unwrap();
    for f in ["agent_svid.pem", "agent_svid.key", "bundle.pem"] {
        std::fs::copy(c.dir.0.join("agent/data").join(f), stolen.join(f)).unwrap();
    }
    let cfg = c.write_agent_config_with("");
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        &format!("{}/agent/data", c.dir.0.display()),
        stolen.to_str().unwrap(),
    );
    std::fs::write(&cfg, text).unwrap();
    let log = c.dir.0.join("thief.log");
    let mut thief = Command::new(bin("sigil-agent"))
        .args(["run", "--config"])
        .arg(&cfg)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_for(
        "the copied identity's renewal is refused",
        Duration::from_secs(20),
        || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("renew by re-attesting")
        },
    );
    let _ = thief.kill();
    let _ = thief.wait();
}

#[test]
fn tpm_with_an_unlisted_ek_is_refused() {
    let tpm = Swtpm::start(false);
    let c = Cluster::start_with(&format!("[tpm]\nek_hashes = [\"{}\"]\n", "ab".repeat(32)));
    let cfg = c.write_agent_config_with(&tpm_agent_config(&tpm));
    let out = Command::new(bin("sigil-agent"))
        .args(["run", "--config"])
        .arg(cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("TPM attestation"), "{err}");
    assert_eq!(c.agents_json()["agents"].as_array().unwrap().len(), 0);
}

#[test]
fn tpm_with_a_manufacturer_ek_certificate_attests_through_the_ek_ca() {
    let tpm = Swtpm::start(true);
    let ca = tpm.vars["SWTPM_EK_CA"].clone();
    let root = tpm.vars["SWTPM_EK_ROOT_CA"].clone();
    let both = format!(
        "{}{}",
        std::fs::read_to_string(&ca).unwrap(),
        std::fs::read_to_string(&root).unwrap()
    );
    let c0 = Cluster::start();
    let ca_path = c0.dir.0.join("ek-ca.pem");
    std::fs::write(&ca_path, both).unwrap();
    let mut c = Cluster::start_with(&format!(
        "[tpm]\nek_ca_path = \"{}\"\npcrs = [16]\n",
        ca_path.display()
    ));
    c.start_agent_configured(&tpm_agent_config(&tpm));
    assert_eq!(c.agents_json()["agents"][0]["attestation_type"], "tpm");
    drop(c0);
}
