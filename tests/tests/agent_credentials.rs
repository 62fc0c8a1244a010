//! End-to-end: an agent's credential is the one SVID the server issued it
//! (pinned by serial), and workload entries never share an ID with agents,
//! so neither a workload SVID nor a copied old agent SVID acts as an agent.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a test failure"
)]

use std::process::{Command, Stdio};
use std::time::Duration;

use sigil_tests::{Cluster, bin, my_uid_selector, wait_for};

const AGENT: &str = "spiffe://example.org/myagent";

fn refused(c: &Cluster, args: &[&str], needle: &str) {
    let out = c.server_cli(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} was accepted");
    assert!(err.contains(needle), "{args:?}: {err}");
}

#[test]
fn entries_and_agents_never_share_a_spiffe_id() {
    let mut c = Cluster::start();
    c.start_agent(AGENT);
    let uid = my_uid_selector();
    // An unused token reserves its ID for an agent.
    c.token("spiffe://example.org/agent2");
    refused(
        &c,
        &[
            "entry",
            "create",
            "--parent-id",
            AGENT,
            "--spiffe-id",
            "spiffe://example.org/agent2",
            "--selector",
            &uid,
        ],
        "unused join token",
    );
    // A registered agent's ID.
    refused(
        &c,
        &[
            "entry",
            "create",
            "--parent-id",
            AGENT,
            "--spiffe-id",
            AGENT,
            "--selector",
            &uid,
        ],
        "registered agent",
    );
    // A token for a workload's ID, and for a live agent's ID.
    let entry = c.create_entry("spiffe://example.org/myservice", &["--selector", &uid]);
    refused(
        &c,
        &[
            "token",
            "generate",
            "--spiffe-id",
            "spiffe://example.org/myservice",
        ],
        &entry,
    );
    refused(
        &c,
        &["token", "generate", "--spiffe-id", AGENT],
        "already registered",
    );
    // Nothing was written by the refusals: one entry, one agent.
    let entries: serde_json::Value =
        serde_json::from_str(&c.server_ok(&["entry", "list", "--output", "json"])).unwrap();
    assert_eq!(entries["entries"].as_array().unwrap().len(), 1, "{entries}");
    assert_eq!(c.agents_json()["agents"].as_array().unwrap().len(), 1);
}

#[test]
fn an_agent_svid_replaced_by_renewal_is_refused_once_the_new_one_is_in_use() {
    let mut c = Cluster::start_with("agent_svid_ttl = \"16s\"\n");
    c.start_agent(AGENT);
    let first_serial = c.agents_json()["agents"][0]["serial"]
        .as_str()
        .unwrap()
        .to_string();
    // Someone copies the agent's SVID and key as they are now.
    let stolen = c.dir.0.join("stolen");
    std::fs::create_dir_all(&stolen).unwrap();
    for f in ["agent_svid.pem", "agent_svid.key", "bundle.pem"] {
        std::fs::copy(c.dir.0.join("agent/data").join(f), stolen.join(f)).unwrap();
    }
    // The agent renews at half-life and presents the new SVID; from then on
    // the server holds no other serial for it.
    wait_for(
        "the agent to renew and use its new SVID",
        Duration::from_secs(30),
        || {
            let a = &c.agents_json()["agents"][0];
            a["serial"].as_str() != Some(first_serial.as_str()) && a["previous_serial"] == ""
        },
    );
    let current = c.agents_json()["agents"][0]["serial"].clone();
    // The copied SVID is still signed by the CA and unexpired, but it is not
    // the agent's credential any more.
    let cfg = c.write_agent_config_with("");
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        &format!("{}/agent/data", c.dir.0.display()),
        stolen.to_str().unwrap(),
    );
    let thief_cfg = c.dir.0.join("thief.toml");
    std::fs::write(
        &thief_cfg,
        text.replace("agent/public", "thief/public")
            .replace("agent/private", "thief/private"),
    )
    .unwrap();
    let log = c.dir.0.join("thief.log");
    let mut thief = Command::new(bin("sigil-agent"))
        .args(["run", "--config"])
        .arg(&thief_cfg)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_for(
        "the copied SVID to be refused",
        Duration::from_secs(20),
        || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("is not the current SVID of agent")
        },
    );
    let _ = thief.kill();
    let _ = thief.wait();
    // The refusal changed nothing: the real agent keeps its serial.
    assert_eq!(c.agents_json()["agents"][0]["serial"], current);
    assert!(
        std::fs::read_to_string(c.dir.0.join("server.log"))
            .unwrap()
            .contains("not the agent's current SVID"),
        "the server logs the refusal"
    );
}
