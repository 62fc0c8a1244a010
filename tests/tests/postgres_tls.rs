//! TLS between sigil-server and a real PostgreSQL 15 (`[datastore]
//! sslmode`, `ca_path`): the database takes TCP connections only over TLS
//! (`hostssl` in pg_hba.conf), with a certificate from a CA the test makes
//! with openssl. Checks that `verify-full` connects and that the server's
//! sessions really are encrypted (`pg_stat_ssl`), that a plain connection
//! and an unknown CA are refused at start with a clear error, and that
//! `verify-ca` accepts a certificate for another host name where
//! `verify-full` refuses it.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a test failure"
)]

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use sigil_tests::pki::{make_ca, make_server_cert};
use sigil_tests::{Cluster, Scratch, bin, free_port, pg, wait_for};

/// The `[datastore]` section for `db` with `tls` (sslmode and ca_path
/// lines) added.
fn section(pg: &pg::Postgres, db: &str, pw: &Path, tls: &str) -> String {
    format!("{}{tls}", pg.datastore_section(db, pw))
}

/// Starts `sigil-server run` with `datastore` and expects it to exit
/// non-zero (it cannot open its datastore); returns its stderr.
fn server_refuses_to_start(datastore: &str) -> String {
    let dir = Scratch::new("pg-tls-refused");
    let d = dir.0.display();
    let cfg = format!(
        "trust_domain = \"example.org\"\nbind_port = {}\ndata_dir = \"{d}/server\"\nadmin_socket = \"{d}/admin/admin.sock\"\n{datastore}",
        free_port()
    );
    let path = dir.0.join("server.toml");
    fs::write(&path, cfg).unwrap();
    let log = dir.0.join("server.log");
    let mut child = Command::new(bin("sigil-server"))
        .args(["run", "--config"])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut status = None;
    wait_for("the server to give up", Duration::from_secs(30), || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    let status = status.unwrap();
    let err = fs::read_to_string(&log).unwrap();
    assert!(!status.success(), "the server started: {err}");
    eprintln!("refused as expected:\n{err}");
    err
}

/// The server's sessions as PostgreSQL sees them: (ssl, count).
fn sigil_sessions(pg: &pg::Postgres) -> String {
    pg.psql(
        "postgres",
        "SELECT s.ssl, count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
         WHERE a.application_name = 'sigil-server' GROUP BY s.ssl ORDER BY s.ssl",
    )
}

#[tokio::test]
async fn the_server_reaches_postgres_over_verified_tls_and_refuses_what_it_cannot_verify() {
    let Some(mut pg) = pg::start("tls") else {
        return;
    };
    pg.create_db("sigil");
    let certs = Scratch::new("pg-tls-certs");
    let ca = make_ca(&certs.0, "db-ca");
    let other_ca = make_ca(&certs.0, "other-ca");
    let (crt, key) = make_server_cert(&certs.0, "db-ca", "db", "IP:127.0.0.1,DNS:localhost");
    pg.enable_tls(&crt, &key);
    let pw = certs.0.join("pgpass");

    // Without TLS the database turns the server away, and the server says
    // why instead of starting.
    let err = server_refuses_to_start(&section(&pg, "sigil", &pw, ""));
    assert!(
        err.contains("no encryption") || err.contains("pg_hba"),
        "{err}"
    );

    // A CA that did not sign the database's certificate: refused.
    let err = server_refuses_to_start(&section(
        &pg,
        "sigil",
        &pw,
        &format!(
            "sslmode = \"verify-full\"\nca_path = \"{}\"\n",
            other_ca.display()
        ),
    ));
    assert!(
        err.contains("certificate") && err.contains("PostgreSQL"),
        "{err}"
    );

    // verify-full with the right CA: the server runs on the database, and
    // every session it holds is encrypted.
    let full = section(
        &pg,
        "sigil",
        &pw,
        &format!(
            "sslmode = \"verify-full\"\nca_path = \"{}\"\n",
            ca.display()
        ),
    );
    let c = Cluster::start_with(&full);
    let out = c.server_ok(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/over-tls",
        "--parent-id",
        "spiffe://example.org/agent",
        "--selector",
        "unix:uid:4242",
    ]);
    assert!(out.contains("over-tls"), "{out}");
    assert_eq!(pg.psql("sigil", "SELECT count(*) FROM entries"), "1");
    let sessions = sigil_sessions(&pg);
    assert!(
        sessions.starts_with("t|") && !sessions.contains("f|"),
        "sessions (ssl|count): {sessions:?}"
    );
    drop(c);

    // A certificate for another host name, from the right CA: verify-ca
    // takes it (the chain is all it checks), verify-full does not.
    let (crt, key) = make_server_cert(&certs.0, "db-ca", "elsewhere", "DNS:db.elsewhere.test");
    pg.enable_tls(&crt, &key);
    let err = server_refuses_to_start(&full);
    assert!(err.contains("certificate"), "{err}");
    let c = Cluster::start_with(&section(
        &pg,
        "sigil",
        &pw,
        &format!("sslmode = \"verify-ca\"\nca_path = \"{}\"\n", ca.display()),
    ));
    let listed = c.server_ok(&["entry", "list"]);
    assert!(listed.contains("over-tls"), "{listed}");
    drop(c);

    // `datastore migrate` takes the same TLS settings: a redb deployment
    // copied over verify-ca; without TLS the database refuses it.
    let mut redb = Cluster::start();
    redb.server_ok(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/from-redb",
        "--parent-id",
        "spiffe://example.org/agent",
        "--selector",
        "unix:uid:4343",
    ]);
    redb.stop_server();
    pg.create_db("migrated");
    let file = redb.dir.0.join("server/datastore.redb");
    let migrate = |tls: &[&str]| {
        Command::new(bin("sigil-server"))
            .args(["datastore", "migrate", "--from"])
            .arg(format!("redb:{}", file.display()))
            .args(["--to", &pg.url("migrated"), "--password-file"])
            .arg(&pw)
            .args(["--trust-domain", "example.org"])
            .args(tls)
            .output()
            .unwrap()
    };
    let plain = migrate(&[]);
    assert!(!plain.status.success());
    let err = String::from_utf8_lossy(&plain.stderr);
    assert!(
        err.contains("--to") && err.contains("no encryption"),
        "{err}"
    );
    let ca_arg = ca.display().to_string();
    let bad = migrate(&["--sslmode", "sometimes"]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && err.contains("--sslmode"), "{err}");
    let out = migrate(&["--sslmode", "verify-ca", "--ca-path", &ca_arg]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(pg.psql("migrated", "SELECT count(*) FROM entries"), "1");

    // require without roots: encrypted, nothing verified.
    let c = Cluster::start_with(&section(&pg, "sigil", &pw, "sslmode = \"require\"\n"));
    assert!(c.server_ok(&["entry", "list"]).contains("over-tls"));
    let sessions = sigil_sessions(&pg);
    assert!(
        sessions.starts_with("t|") && !sessions.contains("f|"),
        "sessions (ssl|count): {sessions:?}"
    );
}
