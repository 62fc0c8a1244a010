//! End-to-end: x509pop node attestation, node selectors, node-alias
//! entries, and re-attestation on renewal.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a test failure"
)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use sigil_tests::{Cluster, Scratch, bin, my_uid_selector, wait_for};
use spiffe::WorkloadApiClient;

use sigil_tests::pki::x509pop_node as node_pki;

fn x509pop_agent_config(pki: &Path, cn: &str) -> String {
    format!(
        "node_attestor = \"x509pop\"\n[x509pop]\ncert_path = \"{d}/{cn}.pem\"\nkey_path = \"{d}/{cn}.key\"\n",
        d = pki.display()
    )
}

#[tokio::test]
async fn x509pop_node_gets_workloads_through_a_node_alias_and_reattests_on_renewal() {
    let pki = Scratch::new("nodepki");
    node_pki(&pki.0, "nodeca", "node-1");
    let mut c = Cluster::start_with(&format!(
        "agent_svid_ttl = \"4s\"\n[x509pop]\nca_bundle_path = \"{}/nodeca.pem\"\n",
        pki.0.display()
    ));
    c.start_agent_configured(&x509pop_agent_config(&pki.0, "node-1"));

    let list = c.agents_json();
    let agent = &list["agents"][0];
    assert_eq!(agent["attestation_type"], "x509pop");
    let id = agent["spiffe_id"].as_str().unwrap().to_string();
    assert!(
        id.starts_with("spiffe://example.org/sigil/agent/x509pop/"),
        "{id}"
    );
    let selectors: Vec<String> = serde_json::from_value(agent["selectors"].clone()).unwrap();
    assert!(
        selectors.contains(&"x509pop:subject:cn:node-1".to_string()),
        "{selectors:?}"
    );
    assert!(
        selectors.contains(&"x509pop:san:dns:node-1.nodes.example.org".to_string()),
        "{selectors:?}"
    );
    assert!(
        selectors
            .iter()
            .any(|s| s.starts_with("x509pop:ca:fingerprint:")),
        "{selectors:?}"
    );

    // A node-alias entry groups every node with CN node-1; workloads under it reach this agent.
    c.server_ok(&[
        "entry",
        "create",
        "--node",
        "--spiffe-id",
        "spiffe://example.org/nodes/node-1",
        "--parent-id",
        "spiffe://example.org/sigil/server",
        "--selector",
        "x509pop:subject:cn:node-1",
    ]);
    let sel = my_uid_selector();
    c.server_ok(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/on-node-1",
        "--parent-id",
        "spiffe://example.org/nodes/node-1",
        "--selector",
        &sel,
    ]);
    // An alias whose selectors this node lacks delivers nothing here.
    c.server_ok(&[
        "entry",
        "create",
        "--node",
        "--spiffe-id",
        "spiffe://example.org/nodes/node-2",
        "--parent-id",
        "spiffe://example.org/sigil/server",
        "--selector",
        "x509pop:subject:cn:node-2",
    ]);
    c.server_ok(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/on-node-2",
        "--parent-id",
        "spiffe://example.org/nodes/node-2",
        "--selector",
        &sel,
    ]);

    let client = WorkloadApiClient::connect_to(c.api_addr()).await.unwrap();
    let mut ids = vec![];
    for _ in 0..100 {
        if let Ok(all) = client.fetch_all_x509_svids().await {
            ids = all.iter().map(|s| s.spiffe_id().to_string()).collect();
            if !ids.is_empty() {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ids, vec!["spiffe://example.org/on-node-1"]);

    // Renewal (4 s agent SVIDs) re-attests: the last attestation time moves on.
    let first = c.agents_json()["agents"][0]["last_attested_at"]
        .as_str()
        .unwrap()
        .to_string();
    wait_for("re-attestation on renewal", Duration::from_secs(20), || {
        c.agents_json()["agents"][0]["last_attested_at"].as_str() != Some(first.as_str())
    });
}

#[test]
fn x509pop_node_from_an_untrusted_ca_is_refused() {
    let pki = Scratch::new("nodepki2");
    node_pki(&pki.0, "nodeca", "node-1");
    node_pki(&pki.0, "rogueca", "rogue");
    let c = Cluster::start_with(&format!(
        "[x509pop]\nca_bundle_path = \"{}/nodeca.pem\"\n",
        pki.0.display()
    ));
    let cfg = c.write_agent_config_with(&x509pop_agent_config(&pki.0, "rogue"));
    let out = Command::new(bin("sigil-agent"))
        .args(["run", "--config"])
        .arg(cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not chain"), "{err}");
    assert_eq!(c.agents_json()["agents"].as_array().unwrap().len(), 0);
}
