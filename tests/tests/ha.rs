//! High availability end-to-end: two real sigil-servers on one real
//! PostgreSQL. Each publishes its public CA and JWT keys through the
//! datastore, so both serve one bundle holding both servers' keys; an agent
//! configured with `servers = [A, B]` keeps serving when A is killed with
//! SIGKILL and moves its sync stream and minting to B.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a test failure"
)]

use std::time::Duration;

use sigil_tests::pg;
use sigil_tests::{Cluster, Scratch, eventually, log_count, my_uid_selector, wait_for};

const LONG: Duration = Duration::from_secs(40);

async fn ids(addr: &str) -> Option<Vec<String>> {
    sigil_tests::x509_ids(addr).await
}

fn pem_certs(c: &Cluster) -> Vec<String> {
    let pem = c.server_ok(&["bundle", "show"]);
    pem.split("-----END CERTIFICATE-----")
        .filter(|s| s.contains("BEGIN CERTIFICATE"))
        .map(|s| s.trim().to_string())
        .collect()
}

fn jwt_kids(c: &Cluster) -> Vec<String> {
    let v: serde_json::Value =
        serde_json::from_str(&c.server_ok(&["bundle", "show", "--format", "spiffe"])).unwrap();
    let mut kids: Vec<String> = v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["use"] == "jwt-svid")
        .map(|k| k["kid"].as_str().unwrap().to_string())
        .collect();
    kids.sort();
    kids
}

fn sequence(c: &Cluster) -> u64 {
    let v: serde_json::Value =
        serde_json::from_str(&c.server_ok(&["bundle", "show", "--format", "spiffe"])).unwrap();
    v["spiffe_sequence"].as_u64().unwrap()
}

#[tokio::test]
async fn two_servers_publish_one_bundle_and_an_agent_fails_over_when_one_is_killed() {
    let Some(pg) = pg::start("ha") else {
        return;
    };
    pg.create_db("sigil");
    let secrets = Scratch::new("pg-ha-secret");
    let pw = secrets.0.join("pgpass");
    pg.write_password_file(&pw);
    let section = format!(
        "[datastore]\nkind = \"postgres\"\nurl = \"{}\"\npassword_file = \"{}\"\npool_size = 4\n",
        pg.url("sigil"),
        pw.display()
    );
    let mut a = Cluster::start_with(&section);
    let seq_alone = sequence(&a);
    let b = Cluster::start_with(&section);

    // Both servers serve the union of their keys: two CAs, two JWT keys,
    // the same on each; B's start moved the sequence forward on A too.
    wait_for("A's bundle to hold B's CA", LONG, || {
        pem_certs(&a).len() == 2
    });
    let mut on_a = pem_certs(&a);
    let mut on_b = pem_certs(&b);
    on_a.sort();
    on_b.sort();
    assert_eq!(on_a, on_b, "the servers serve different X.509 authorities");
    eventually("both JWT keys on both servers", LONG, || async {
        (jwt_kids(&a).len() == 2 && jwt_kids(&a) == jwt_kids(&b)).then_some(())
    })
    .await;
    assert!(sequence(&a) > seq_alone, "the bundle sequence did not grow");
    assert_eq!(sequence(&a), sequence(&b));

    // An agent attested to A that knows both servers.
    let servers = format!(
        "servers = [\"127.0.0.1:{}\", \"127.0.0.1:{}\"]\n",
        a.port, b.port
    );
    a.start_agent_with("spiffe://example.org/ha-agent", &servers);
    let addr = a.api_addr();
    a.create_entry(
        "spiffe://example.org/before",
        &["--selector", &my_uid_selector()],
    );
    eventually("the SVID from A", LONG, || async {
        (ids(&addr).await? == ["spiffe://example.org/before"]).then_some(())
    })
    .await;

    // kill -9 A: the agent keeps serving, moves to B, and an entry created
    // on B is synced and minted through B.
    let pid = a.server_pid().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert_eq!(
        ids(&addr).await.as_deref(),
        Some(&["spiffe://example.org/before".to_string()][..]),
        "the agent stopped serving when its server died"
    );
    b.server_ok(&[
        "entry",
        "create",
        "--parent-id",
        "spiffe://example.org/ha-agent",
        "--spiffe-id",
        "spiffe://example.org/after",
        "--selector",
        &my_uid_selector(),
    ]);
    eventually("the SVID minted through B", LONG, || async {
        (ids(&addr).await? == ["spiffe://example.org/after", "spiffe://example.org/before"])
            .then_some(())
    })
    .await;
    assert!(
        log_count(&a.dir.0, "agent.log", "failed over to another server") >= 1,
        "the agent log does not record the failover"
    );
}
