//! Faults two real sigil-servers on one real PostgreSQL 15 must survive
//! with nothing lost:
//! - `kill -9` of a server in the middle of a bulk `entry create` loop:
//!   every entry the CLI reported created exists afterwards with its audit
//!   record, none is half-written, and the other server keeps serving the
//!   agent, which fails over;
//! - PostgreSQL restarted (`pg_ctl stop -m fast`, then start on the same
//!   port) under two running servers: writes during the outage fail at once
//!   with an error naming the datastore, reads and the agent's SVIDs
//!   continue, and afterwards both servers converge (an entry created on A
//!   reaches a workload whose agent is connected to B);
//! - two servers started at once on an empty database: one schema, each
//!   migration applied once.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a test failure"
)]

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sigil_tests::pg::{self, Postgres};
use sigil_tests::{
    Cluster, Scratch, bin, eventually, log_count, my_uid_selector, wait_for, x509_ids,
};

const LONG: Duration = Duration::from_secs(40);

/// A database `db` on `pg` and the `[datastore]` section naming it.
fn shared_db(pg: &Postgres, db: &str, secrets: &Scratch) -> String {
    pg.create_db(db);
    pg.datastore_section(db, &secrets.0.join(format!("{db}.pgpass")))
}

/// `entry list --output json` of a server: SPIFFE ID by entry ID.
fn entries(c: &Cluster) -> BTreeMap<String, serde_json::Value> {
    let v: serde_json::Value =
        serde_json::from_str(&c.server_ok(&["entry", "list", "--output", "json"])).unwrap();
    v["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["id"].as_str().unwrap().to_string(), e.clone()))
        .collect()
}

/// The IDs of the entries under `parent` the audit trail records as created.
fn audited_creations(c: &Cluster, parent: &str) -> Vec<String> {
    c.server_ok(&["audit", "export"])
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["event"]["kind"] == "entry_created" && v["event"]["parent_id"] == parent)
                .then(|| v["event"]["entry_id"].as_str().unwrap().to_string())
        })
        .collect()
}

fn sigkill(pid: u32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
}

#[tokio::test]
async fn kill_9_during_a_bulk_create_loses_no_reported_entry_and_the_agent_fails_over() {
    let Some(pg) = pg::start("ha-kill") else {
        return;
    };
    let secrets = Scratch::new("ha-kill-secret");
    let section = shared_db(&pg, "sigil", &secrets);
    let mut a = Cluster::start_with(&section);
    let b = Cluster::start_with(&section);
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
    eventually("the SVID through A", LONG, || async {
        (x509_ids(&addr).await? == ["spiffe://example.org/before"]).then_some(())
    })
    .await;

    // A loop of `entry create` on A, each a separate CLI process, as a
    // script would run it; it stops at the first failure (A is gone).
    let created = Arc::new(AtomicUsize::new(0));
    let sock = a.admin_socket();
    let count = created.clone();
    let bulk = std::thread::spawn(move || {
        let mut reported: Vec<(String, String)> = Vec::new();
        let mut failure = None;
        for i in 0..2000 {
            let id = format!("spiffe://example.org/bulk/{i}");
            let out = Command::new(bin("sigil-server"))
                .args([
                    "entry",
                    "create",
                    "--parent-id",
                    "spiffe://example.org/bulk-node",
                    "--spiffe-id",
                    &id,
                    "--selector",
                    "unix:uid:4242",
                    "--output",
                    "json",
                ])
                .env("SIGIL_ADMIN_SOCKET", &sock)
                .output()
                .unwrap();
            if !out.status.success() {
                failure = Some(String::from_utf8_lossy(&out.stderr).into_owned());
                break;
            }
            let v: serde_json::Value = serde_json::from_slice(&out.stdout)
                .expect("a successful entry create prints its entry");
            reported.push((v["id"].as_str().unwrap().to_string(), id));
            count.fetch_add(1, Ordering::SeqCst);
        }
        (reported, failure)
    });
    wait_for("20 bulk entries created", LONG, || {
        created.load(Ordering::SeqCst) >= 20
    });
    sigkill(a.server_pid().unwrap());
    let (reported, failure) = bulk.join().unwrap();
    assert!(
        failure.is_some(),
        "the loop outlived the server it was talking to"
    );
    assert!(reported.len() >= 20);

    // Every entry A reported exists, seen through B, with the fields it was
    // created with; whatever else exists (the create in flight at the kill
    // may have committed) is whole: entry and audit record together.
    let on_b = eventually("B to hold every reported entry", LONG, || async {
        let e = entries(&b);
        reported
            .iter()
            .all(|(id, _)| e.contains_key(id))
            .then_some(e)
    })
    .await;
    for (id, spiffe_id) in &reported {
        let e = &on_b[id];
        assert_eq!(e["spiffe_id"], spiffe_id.as_str(), "entry {id}");
        assert_eq!(e["parent_id"], "spiffe://example.org/bulk-node");
        assert_eq!(
            e["selectors"],
            serde_json::json!(["unix:uid:4242"]),
            "entry {id}"
        );
    }
    let bulk_on_b: Vec<&String> = on_b
        .iter()
        .filter(|(_, e)| e["parent_id"] == "spiffe://example.org/bulk-node")
        .map(|(id, _)| id)
        .collect();
    assert!(
        bulk_on_b.len() == reported.len() || bulk_on_b.len() == reported.len() + 1,
        "{} bulk entries stored, {} reported created",
        bulk_on_b.len(),
        reported.len()
    );
    // Entry and audit record commit together: the bulk entries stored are
    // exactly those the trail records as created.
    let mut stored: Vec<String> = bulk_on_b.iter().map(|s| s.to_string()).collect();
    stored.sort();
    let mut audited = audited_creations(&b, "spiffe://example.org/bulk-node");
    audited.sort();
    assert_eq!(
        stored, audited,
        "stored bulk entries vs their audit records"
    );
    let rows: usize = pg
        .psql("sigil", "SELECT count(*) FROM entries")
        .parse()
        .unwrap();
    assert_eq!(rows, on_b.len(), "B's index differs from the database");
    b.server_ok(&["audit", "verify"]);

    // The agent kept serving and moved to B: a new entry made on B is
    // minted through it.
    assert_eq!(
        x509_ids(&addr).await.as_deref(),
        Some(&["spiffe://example.org/before".to_string()][..]),
    );
    b.create_entry_under(
        "spiffe://example.org/ha-agent",
        "spiffe://example.org/after",
        &["--selector", &my_uid_selector()],
    );
    eventually("the SVID minted through B", LONG, || async {
        (x509_ids(&addr).await? == ["spiffe://example.org/after", "spiffe://example.org/before"])
            .then_some(())
    })
    .await;
    assert!(log_count(&a.dir.0, "agent.log", "failed over to another server") >= 1);
}

/// Runs `sigil-server ARGS` against `c` in a thread; `None` if it has not
/// finished within `limit` (a hang), else its output.
fn cli_within(c: &Cluster, args: &[&str], limit: Duration) -> Option<std::process::Output> {
    let mut child = Command::new(bin("sigil-server"))
        .args(args)
        .env("SIGIL_ADMIN_SOCKET", c.admin_socket())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while start.elapsed() < limit {
        if child.try_wait().unwrap().is_some() {
            return Some(child.wait_with_output().unwrap());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

#[tokio::test]
async fn postgres_restart_fails_writes_fast_keeps_serving_and_both_servers_converge() {
    let Some(mut pg) = pg::start("ha-restart") else {
        return;
    };
    let secrets = Scratch::new("ha-restart-secret");
    let section = shared_db(&pg, "sigil", &secrets);
    let a = Cluster::start_with(&section);
    // B's agent talks to B only.
    let mut b = Cluster::start_with(&section);
    b.start_agent("spiffe://example.org/agent-b");
    let addr = b.api_addr();
    let uid = my_uid_selector();
    a.create_entry_under(
        "spiffe://example.org/agent-b",
        "spiffe://example.org/known",
        &["--selector", &uid],
    );
    eventually("the entry made on A served through B", LONG, || async {
        (x509_ids(&addr).await? == ["spiffe://example.org/known"]).then_some(())
    })
    .await;

    // healthcheck --verbose: the datastore, the feed's lag, both servers.
    let v = b.server_ok(&["healthcheck", "--verbose"]);
    assert!(v.contains("Server is healthy."), "{v}");
    assert!(
        v.contains(&format!(
            "Datastore        : postgres postgres@127.0.0.1:{}/sigil (reachable, schema ",
            pg.port()
        )),
        "{v}"
    );
    assert!(v.contains("Cluster servers  : 2"), "{v}");
    assert!(v.contains("this server"), "{v}");
    eventually("B's change feed lag to reach 0", LONG, || async {
        let h: serde_json::Value =
            serde_json::from_str(&b.server_ok(&["healthcheck", "--output", "json"])).unwrap();
        assert_eq!(h["datastore"]["kind"], "postgres");
        assert_eq!(h["cluster_servers"].as_array().unwrap().len(), 2);
        let head = h["datastore"]["events_head"].as_u64().unwrap();
        (head > 0 && h["datastore"]["event_lag"] == 0).then_some(())
    })
    .await;

    pg.stop_mode("fast");

    // The health check says what is wrong, and fails.
    let out = cli_within(&b, &["healthcheck", "--verbose"], Duration::from_secs(20))
        .expect("healthcheck hung while PostgreSQL was down");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "healthy without a database: {text}");
    assert!(
        text.contains("datastore is unreachable") && text.contains("UNREACHABLE"),
        "{text}"
    );

    // Writes fail quickly, with an error that names the cause.
    for c in [&a, &b] {
        let out = cli_within(
            c,
            &[
                "entry",
                "create",
                "--parent-id",
                "spiffe://example.org/agent-b",
                "--spiffe-id",
                "spiffe://example.org/during",
                "--selector",
                &uid,
            ],
            Duration::from_secs(20),
        )
        .expect("entry create hung while PostgreSQL was down");
        assert!(
            !out.status.success(),
            "a write succeeded without a database"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("datastore unavailable"),
            "unclear error for a write during the outage: {err}"
        );
    }
    // Reads are served from memory; the agent keeps its SVIDs.
    for c in [&a, &b] {
        let out = cli_within(
            c,
            &["entry", "list", "--output", "json"],
            Duration::from_secs(20),
        )
        .expect("entry list hung while PostgreSQL was down");
        assert!(
            out.status.success(),
            "entry list failed during the outage: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("spiffe://example.org/known"));
        c.server_ok(&["bundle", "show"]);
    }
    assert_eq!(
        x509_ids(&addr).await.as_deref(),
        Some(&["spiffe://example.org/known".to_string()][..]),
        "the agent stopped serving during the outage"
    );

    pg.start_server();

    // After the restart, a write on A succeeds (its pool reconnects) and
    // reaches the workload through B (B's feed reconnects and catches up).
    eventually("a write on A after the restart", LONG, || async {
        a.server_cli(&[
            "entry",
            "create",
            "--parent-id",
            "spiffe://example.org/agent-b",
            "--spiffe-id",
            "spiffe://example.org/after",
            "--selector",
            &uid,
        ])
        .status
        .success()
        .then_some(())
    })
    .await;
    eventually(
        "the entry made on A after the restart, through B",
        LONG,
        || async {
            (x509_ids(&addr).await? == ["spiffe://example.org/after", "spiffe://example.org/known"])
                .then_some(())
        },
    )
    .await;
    // And the other way round.
    b.create_entry_under(
        "spiffe://example.org/agent-b",
        "spiffe://example.org/from-b",
        &["--selector", "unix:uid:4242"],
    );
    eventually("A to see B's entry", LONG, || async {
        entries(&a)
            .values()
            .any(|e| e["spiffe_id"] == "spiffe://example.org/from-b")
            .then_some(())
    })
    .await;
    assert_eq!(entries(&a).len(), entries(&b).len());
    a.server_ok(&["audit", "verify"]);
}

#[test]
fn two_servers_started_at_once_on_an_empty_database_create_one_schema() {
    let Some(pg) = pg::start("ha-race") else {
        return;
    };
    let secrets = Scratch::new("ha-race-secret");
    // A few rounds, each on a fresh database, to give the race a chance.
    for round in 0..3 {
        let db = format!("race{round}");
        let section = shared_db(&pg, &db, &secrets);
        let servers = Cluster::start_together(2, &section);
        let versions = pg.psql(
            &db,
            "SELECT string_agg(version::text, ',' ORDER BY version) FROM sigil_schema_migrations",
        );
        let n = versions.split(',').count();
        let expected: Vec<String> = (1..=n).map(|v| v.to_string()).collect();
        assert_eq!(versions, expected.join(","), "round {round}: migrations");
        assert!(n >= 4, "round {round}: only {n} migrations recorded");
        let applied: usize = servers
            .iter()
            .map(|c| {
                log_count(
                    &c.dir.0,
                    "server.log",
                    "applied PostgreSQL schema migration",
                )
            })
            .sum();
        assert_eq!(
            applied, n,
            "round {round}: migrations applied {applied} times for {n} migrations"
        );
        assert_eq!(
            pg.psql(&db, "SELECT count(*) FROM write_lock"),
            "1",
            "round {round}: write_lock rows"
        );
        assert_eq!(
            pg.psql(
                &db,
                "SELECT count(*) FROM pg_tables WHERE tablename = 'entries'"
            ),
            "1"
        );
        // Both serve the same registry.
        let id = servers[0].create_entry_under(
            "spiffe://example.org/node",
            "spiffe://example.org/race",
            &["--selector", "unix:uid:4242"],
        );
        wait_for("the other server to see the entry", LONG, || {
            entries(&servers[1]).contains_key(&id)
        });
    }
}

#[test]
fn audit_verify_after_two_servers_wrote_concurrently_needs_both_servers_keys() {
    let Some(pg) = pg::start("ha-audit") else {
        return;
    };
    let secrets = Scratch::new("ha-audit-secret");
    // Top-level keys before the [datastore] table.
    let config = format!(
        "audit_checkpoint_every = 4\naudit_checkpoint_interval = \"1h\"\n{}",
        shared_db(&pg, "sigil", &secrets)
    );
    let servers = Cluster::start_together(2, &config);
    // Both servers write at once: a create loop on each, in parallel.
    std::thread::scope(|s| {
        for (n, c) in servers.iter().enumerate() {
            s.spawn(move || {
                for i in 0..15 {
                    c.create_entry_under(
                        "spiffe://example.org/node",
                        &format!("spiffe://example.org/s{n}/e{i}"),
                        &["--selector", "unix:uid:4242"],
                    );
                }
            });
        }
    });
    let dir = &servers[0].dir.0;
    let keys: Vec<String> = servers
        .iter()
        .enumerate()
        .map(|(n, c)| {
            let p = dir.join(format!("audit-{n}.pem"));
            std::fs::write(&p, c.server_ok(&["audit", "key"])).unwrap();
            p.display().to_string()
        })
        .collect();
    // Each server signs checkpoints of its own (checked once a second):
    // go on writing on both until each has.
    let file = dir.join("audit.jsonl");
    let mut round = 0;
    let mut signers: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
    wait_for("both servers to sign checkpoints", LONG, || {
        round += 1;
        for (n, c) in servers.iter().enumerate() {
            c.create_entry_under(
                "spiffe://example.org/node",
                &format!("spiffe://example.org/s{n}/more{round}"),
                &["--selector", "unix:uid:4242"],
            );
        }
        let export = servers[0].server_ok(&["audit", "export"]);
        std::fs::write(&file, &export).unwrap();
        signers = export
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v["event"]["kind"] == "checkpoint")
            .fold(Default::default(), |mut m, v| {
                m.entry(v["event"]["key_id"].as_str().unwrap().to_string())
                    .or_default()
                    .push(v["seq"].as_u64().unwrap());
                m
            });
        signers.len() == 2
    });

    let file = file.display().to_string();
    for c in &servers {
        let ok = c.server_ok(&["audit", "verify", "--key", &keys[0], "--key", &keys[1]]);
        assert!(ok.contains("verified with audit keys"), "{ok}");
    }
    let ok = servers[0].server_ok(&[
        "audit", "verify", "--file", &file, "--key", &keys[1], "--key", &keys[0],
    ]);
    assert!(ok.starts_with("OK: "), "{ok}");
    // One key alone fails, naming the first checkpoint the other signed.
    for key in &keys {
        let out = servers[0].server_cli(&["audit", "verify", "--file", &file, "--key", key]);
        assert!(!out.status.success(), "verified with one server's key only");
        let err = String::from_utf8_lossy(&out.stderr);
        let (foreign, seqs) = signers
            .iter()
            .find(|(id, _)| !err.contains(&format!("expected key {id}")))
            .unwrap();
        assert!(
            err.contains(&format!(
                "seq {}: checkpoint signed by audit key {foreign}",
                seqs[0]
            )),
            "the error does not name the first checkpoint signed by the other server: {err}"
        );
    }
}

#[test]
fn a_server_behind_the_pruned_change_feed_reloads_everything() {
    let Some(pg) = pg::start("ha-behind") else {
        return;
    };
    let secrets = Scratch::new("ha-behind-secret");
    let section = shared_db(&pg, "sigil", &secrets);
    let a = Cluster::start_with(&section);
    let b = Cluster::start_with(&section);
    let old = a.create_entry_under(
        "spiffe://example.org/node",
        "spiffe://example.org/old",
        &["--selector", "unix:uid:4242"],
    );
    wait_for("B to see the first entry", LONG, || {
        entries(&b).contains_key(&old)
    });
    // B is frozen while A changes things and the feed's window moves past
    // them (pruned here by hand; servers prune events older than minutes).
    let pid = nix::unistd::Pid::from_raw(b.server_pid().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let new = a.create_entry_under(
        "spiffe://example.org/node",
        "spiffe://example.org/new",
        &["--selector", "unix:uid:4242"],
    );
    a.server_ok(&["entry", "delete", &old]);
    pg.psql(
        "sigil",
        "BEGIN; UPDATE events_horizon SET pruned_through = (SELECT max(seq) FROM events); \
         DELETE FROM events; COMMIT",
    );
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    wait_for(
        "B to reload: the new entry in, the deleted one out",
        LONG,
        || {
            let e = entries(&b);
            e.contains_key(&new) && !e.contains_key(&old)
        },
    );
    assert!(
        log_count(&b.dir.0, "server.log", "reloading every record") >= 1,
        "B converged without noticing it was behind the feed"
    );
}
