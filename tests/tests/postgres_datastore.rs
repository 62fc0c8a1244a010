//! End-to-end with `[datastore] kind = "postgres"`: the real sigil-server on
//! a real PostgreSQL started by the harness. An agent attests, an entry
//! reaches a workload (fetched with the `spiffe` crate), a server restart
//! keeps entries and agents, and `audit verify` passes; the records are in
//! the database, not in a redb file; a redb deployment migrates; two servers
//! on one database converge. A group-readable password file stops
//! the server before it serves, naming the key. A lone server down past
//! the SVID half-life: its agent keeps serving and renews once it is back.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a test failure"
)]

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use sigil_tests::pg::{self, Postgres};
use sigil_tests::{Cluster, Scratch, bin, eventually, my_uid_selector};

const LONG: Duration = Duration::from_secs(30);

async fn ids(addr: &str) -> Option<Vec<String>> {
    sigil_tests::x509_ids(addr).await
}

async fn wait_ids(addr: &str, want: &[&str]) {
    eventually(&format!("SVIDs {want:?}"), LONG, || async {
        (ids(addr).await? == want).then_some(())
    })
    .await;
}

fn datastore_section(pg: &Postgres, db: &str, password_file: &std::path::Path) -> String {
    format!(
        "[datastore]\nkind = \"postgres\"\nurl = \"{}\"\npassword_file = \"{}\"\npool_size = 4\n",
        pg.url(db),
        password_file.display()
    )
}

#[tokio::test]
async fn a_server_on_postgres_serves_survives_restart_and_audits() {
    let Some(pg) = pg::start("e2e") else {
        return;
    };
    pg.create_db("sigil");
    let secrets = Scratch::new("pg-secret");
    let pw = secrets.0.join("pgpass");
    pg.write_password_file(&pw);
    let mut c = Cluster::start_with(&datastore_section(&pg, "sigil", &pw));
    c.start_agent("spiffe://example.org/test-agent");
    c.create_entry(
        "spiffe://example.org/pg-a",
        &["--selector", &my_uid_selector()],
    );
    let addr = c.api_addr();
    wait_ids(&addr, &["spiffe://example.org/pg-a"]).await;

    // Everything is in PostgreSQL: no redb file was created.
    assert!(!c.dir.0.join("server/datastore.redb").exists());
    assert_eq!(pg.psql("sigil", "SELECT count(*) FROM entries"), "1");
    assert_eq!(pg.psql("sigil", "SELECT count(*) FROM agents"), "1");

    let entries_before = c.server_ok(&["entry", "list", "--output", "json"]);
    c.stop_server();
    c.start_server();
    assert_eq!(
        c.server_ok(&["entry", "list", "--output", "json"]),
        entries_before
    );
    let agents: serde_json::Value =
        serde_json::from_str(&c.server_ok(&["agent", "list", "--output", "json"])).unwrap();
    assert_eq!(
        agents["agents"][0]["spiffe_id"],
        "spiffe://example.org/test-agent"
    );

    // The agent reconnects and receives a change made after the restart.
    c.create_entry(
        "spiffe://example.org/pg-b",
        &["--selector", &my_uid_selector()],
    );
    wait_ids(
        &addr,
        &["spiffe://example.org/pg-a", "spiffe://example.org/pg-b"],
    )
    .await;

    let verified = c.server_ok(&["audit", "verify"]);
    assert!(verified.starts_with("OK:"), "{verified}");
    let records: u64 = pg
        .psql("sigil", "SELECT count(*) FROM audit")
        .parse()
        .unwrap();
    assert!(
        records >= 4,
        "token, attestation and two entries audited: {records}"
    );
    assert!(
        !c.logs().contains(pg::PASSWORD),
        "the database password is in a log"
    );
}

#[test]
fn a_group_readable_password_file_is_refused_naming_the_key() {
    let Some(pg) = pg::start("e2e-pw") else {
        return;
    };
    pg.create_db("sigil");
    let dir = Scratch::new("pg-pw");
    let pw = dir.0.join("pgpass");
    pg.write_password_file(&pw);
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o640)).unwrap();
    let cfg = dir.0.join("server.toml");
    std::fs::write(
        &cfg,
        format!(
            "trust_domain = \"example.org\"\nbind_port = {}\ndata_dir = \"{d}/server\"\nadmin_socket = \"{d}/admin.sock\"\n{}",
            sigil_tests::free_port(),
            datastore_section(&pg, "sigil", &pw),
            d = dir.0.display()
        ),
    )
    .unwrap();
    let out = Command::new(bin("sigil-server"))
        .args(["run", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started with a 0640 password file");
    assert!(
        err.contains("datastore.password_file") && err.contains("pgpass"),
        "{err}"
    );
    assert!(!err.contains(pg::PASSWORD), "{err}");
    // Nothing was created in the database.
    assert_eq!(
        pg.psql(
            "sigil",
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
        ),
        "0"
    );
}

#[tokio::test]
async fn a_redb_deployment_migrates_to_postgres_with_nothing_lost() {
    let Some(pg) = pg::start("migrate") else {
        return;
    };
    pg.create_db("sigil");
    let secrets = Scratch::new("pg-mig-secret");
    let pw = secrets.0.join("pgpass");
    pg.write_password_file(&pw);

    // A redb deployment with an agent, entries, an unused token and a kill.
    let mut c = Cluster::start();
    c.start_agent("spiffe://example.org/test-agent");
    c.create_entry(
        "spiffe://example.org/m-a",
        &["--selector", &my_uid_selector()],
    );
    c.create_entry("spiffe://example.org/m-b", &["--selector", "unix:uid:4242"]);
    c.token("spiffe://example.org/spare-node");
    c.server_ok(&[
        "kill",
        "--spiffe-id",
        "spiffe://example.org/m-b",
        "--reason",
        "drill",
    ]);
    let addr = c.api_addr();
    wait_ids(&addr, &["spiffe://example.org/m-a"]).await;
    let listed = |c: &Cluster| {
        [
            c.server_ok(&["entry", "list", "--output", "json"]),
            c.server_ok(&["agent", "list", "--output", "json"]),
            c.server_ok(&["kill", "list", "--output", "json"]),
        ]
    };
    let before = listed(&c);
    let audit_before = c.server_ok(&["audit", "export"]);

    let redb = c.dir.0.join("server/datastore.redb");
    let migrate = || {
        Command::new(bin("sigil-server"))
            .args(["datastore", "migrate", "--from"])
            .arg(format!("redb:{}", redb.display()))
            .args(["--to", &pg.url("sigil"), "--password-file"])
            .arg(&pw)
            .args(["--trust-domain", "example.org"])
            .output()
            .unwrap()
    };
    // The file of a running server is refused, and nothing is copied.
    let busy = migrate();
    let err = String::from_utf8_lossy(&busy.stderr);
    assert!(!busy.status.success(), "migrated a datastore in use");
    assert!(err.contains("still running"), "{err}");
    assert_eq!(
        pg.psql(
            "sigil",
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
        ),
        "0"
    );
    c.stop_server();

    let out = migrate();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("2 entries, 1 agents, 1 join tokens, 0 federated bundles, 1 kills"),
        "{stdout}"
    );
    // The server's published public keys came along (agents hold SVIDs
    // its CA signed).
    assert!(stdout.contains("1 server key records"), "{stdout}");
    assert_eq!(pg.psql("sigil", "SELECT count(*) FROM server_keys"), "1");
    // Into a database that is no longer empty: refused, nothing added.
    let audit_rows = pg.psql("sigil", "SELECT count(*) FROM audit");
    let again = migrate();
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(err.contains("already holds"), "{err}");
    assert_eq!(pg.psql("sigil", "SELECT count(*) FROM audit"), audit_rows);

    // The server on PostgreSQL (the redb file moved away) has everything.
    std::fs::rename(&redb, redb.with_extension("migrated")).unwrap();
    let toml = c.dir.0.join("server.toml");
    let mut cfg = std::fs::read_to_string(&toml).unwrap();
    cfg.push_str(&datastore_section(&pg, "sigil", &pw));
    std::fs::write(&toml, cfg).unwrap();
    c.start_server();
    assert!(!redb.exists(), "the server created a new redb file");
    assert_eq!(listed(&c), before);
    let verified = c.server_ok(&["audit", "verify"]);
    assert!(verified.starts_with("OK:"), "{verified}");
    let audit_after = c.server_ok(&["audit", "export"]);
    assert!(
        audit_after.starts_with(&audit_before),
        "the migrated audit chain is not the old one"
    );

    // The agent reconnects with its migrated record and gets new entries.
    c.create_entry(
        "spiffe://example.org/m-c",
        &["--selector", &my_uid_selector()],
    );
    wait_ids(
        &addr,
        &["spiffe://example.org/m-a", "spiffe://example.org/m-c"],
    )
    .await;
}

#[tokio::test]
async fn two_servers_on_one_database_converge_on_each_others_entries_and_bans() {
    let Some(pg) = pg::start("two") else {
        return;
    };
    pg.create_db("sigil");
    let secrets = Scratch::new("pg-two-secret");
    let pw = secrets.0.join("pgpass");
    pg.write_password_file(&pw);
    let section = datastore_section(&pg, "sigil", &pw);
    let mut a = Cluster::start_with(&section);
    a.start_agent("spiffe://example.org/test-agent");
    let b = Cluster::start_with(&section);
    let addr = a.api_addr();

    // Created on B, served by the agent connected to A.
    let created: serde_json::Value = serde_json::from_str(&b.server_ok(&[
        "entry",
        "create",
        "--parent-id",
        "spiffe://example.org/test-agent",
        "--spiffe-id",
        "spiffe://example.org/from-b",
        "--selector",
        &my_uid_selector(),
        "--output",
        "json",
    ]))
    .unwrap();
    let id = created["id"].as_str().unwrap().to_string();
    wait_ids(&addr, &["spiffe://example.org/from-b"]).await;
    assert!(
        a.server_ok(&["entry", "show", &id])
            .contains("spiffe://example.org/from-b"),
        "server A does not list the entry created on B"
    );

    // Updated and then deleted on B: A follows.
    b.server_ok(&["entry", "update", &id, "--hint", "via-b"]);
    eventually("A to see B's update", LONG, || async {
        a.server_ok(&["entry", "show", &id])
            .contains("via-b")
            .then_some(())
    })
    .await;
    b.server_ok(&["entry", "delete", &id]);
    eventually("the entry deleted on B to be withdrawn", LONG, || async {
        ids(&addr).await.is_none_or(|v| v.is_empty()).then_some(())
    })
    .await;
    assert!(!a.server_cli(&["entry", "show", &id]).status.success());

    // A ban made on B withdraws the identities served through A.
    a.create_entry(
        "spiffe://example.org/on-a",
        &["--selector", &my_uid_selector()],
    );
    wait_ids(&addr, &["spiffe://example.org/on-a"]).await;
    b.server_ok(&["agent", "ban", "spiffe://example.org/test-agent"]);
    eventually("the agent banned on B to stop serving", LONG, || async {
        ids(&addr).await.is_none_or(|v| v.is_empty()).then_some(())
    })
    .await;

    // Both servers wrote one audit chain.
    let verified = a.server_ok(&["audit", "verify"]);
    assert!(verified.starts_with("OK:"), "{verified}");
}

/// The serial (hex) and notAfter (Unix seconds) of the X.509-SVID the
/// Workload API at `addr` serves this process, if it serves one.
async fn leaf(addr: &str) -> Option<(String, i64)> {
    let client = spiffe::WorkloadApiClient::connect_to(addr).await.ok()?;
    let svid = client.fetch_x509_svid().await.ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(svid.leaf().as_bytes()).ok()?;
    Some((
        cert.raw_serial_as_string(),
        cert.validity().not_after.timestamp(),
    ))
}

#[tokio::test]
async fn one_server_on_postgres_down_past_the_half_life_its_agent_keeps_serving_and_renews_when_back()
 {
    let Some(pg) = pg::start("halflife") else {
        return;
    };
    pg.create_db("sigil");
    let secrets = Scratch::new("pg-halflife-secret");
    let pw = secrets.0.join("pgpass");
    pg.write_password_file(&pw);
    let mut c = Cluster::start_with(&datastore_section(&pg, "sigil", &pw));
    c.start_agent("spiffe://example.org/test-agent");
    c.create_entry(
        "spiffe://example.org/half-life",
        &["--selector", &my_uid_selector(), "--x509-ttl", "12s"],
    );
    let addr = c.api_addr();
    let first = eventually("the first SVID", LONG, || leaf(&addr)).await;

    // The server goes away. Past the half-life the agent tries to renew
    // and fails (the positive event), and still serves the SVID it holds,
    // which is valid.
    c.stop_server();
    let dir = c.dir.0.clone();
    eventually(
        "a failed renewal while the server is down",
        LONG,
        || async {
            (sigil_tests::log_count(&dir, "agent.log", "minting failed") > 0).then_some(())
        },
    )
    .await;
    let during = leaf(&addr).await.expect("nothing served during the outage");
    assert_eq!(during.0, first.0, "a new SVID appeared with no server");
    assert!(sigil_core::now_unix() < first.1, "the held SVID expired");

    // Back on the same database: the agent renews at once.
    c.start_server();
    let renewed = eventually("a renewed SVID once the server is back", LONG, || async {
        leaf(&addr).await.filter(|l| l.0 != first.0)
    })
    .await;
    assert!(
        renewed.1 > first.1,
        "{renewed:?} does not outlive {first:?}"
    );
}
