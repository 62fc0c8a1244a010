//! `sigil-server entry create --file`: many entries in batches of 1,000,
//! one datastore transaction each, with a result per entry; run against
//! the redb datastore and a real PostgreSQL 15. A file that does not parse
//! creates nothing; refused entries are named by their index in the file
//! and the others are created, audited and served.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a test failure"
)]

use std::fs;
use std::time::Duration;

use serde_json::{Value, json};
use sigil_tests::{Cluster, Scratch, eventually, my_uid_selector, pg, x509_ids};

const AGENT: &str = "spiffe://example.org/test-agent";
/// More than one batch, so the CLI's chunking is exercised.
const N: usize = 1_200;

fn entry(i: usize, selector: &str) -> Value {
    json!({
        "spiffe_id": format!("spiffe://example.org/batch/{i}"),
        "parent_id": AGENT,
        "selectors": [selector],
        "x509_svid_ttl": "30m",
    })
}

fn entry_count(c: &Cluster) -> usize {
    let v: Value =
        serde_json::from_str(&c.server_ok(&["entry", "list", "--output", "json"])).unwrap();
    v["entries"].as_array().unwrap().len()
}

fn created_records(c: &Cluster) -> usize {
    c.server_ok(&["audit", "export"])
        .lines()
        .filter(|l| l.contains("\"entry_created\""))
        .count()
}

/// The scenario, on a server with an attested agent.
async fn batch_creates_what_is_valid_and_names_what_is_not(c: &Cluster) {
    let dir = Scratch::new("entry-batch");
    let before = entry_count(c);
    let audited_before = created_records(c);

    // A file that does not parse: nothing is sent.
    let broken = dir.0.join("broken.json");
    let mut bad_item = entry(0, "unix:uid:5000");
    bad_item["colour"] = json!("red");
    fs::write(
        &broken,
        json!({"entries": [entry(1, "unix:uid:5001"), bad_item]}).to_string(),
    )
    .unwrap();
    let out = c.server_cli(&["entry", "create", "--file", broken.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("entries[1]") && err.contains("colour"),
        "{err}"
    );
    assert_eq!(
        entry_count(c),
        before,
        "a file that does not parse wrote entries"
    );

    // 1,200 entries: the first is the workload this test runs as, three are
    // refused (a duplicate of an earlier one, a malformed selector, another
    // trust domain), the rest are created.
    let mut items: Vec<Value> = (0..N)
        .map(|i| entry(i, &format!("unix:uid:{}", 100_000 + i)))
        .collect();
    items[0] = entry(0, &my_uid_selector());
    items[10] = entry(9, "unix:uid:100009");
    items[500] = entry(500, "unix:uid");
    items[1100]["spiffe_id"] = json!("spiffe://other.org/batch/1100");
    let file = dir.0.join("entries.json");
    fs::write(&file, json!({ "entries": items }).to_string()).unwrap();
    let out = c.server_cli(&[
        "entry",
        "create",
        "--file",
        file.to_str().unwrap(),
        "--output",
        "json",
    ]);
    assert!(
        !out.status.success(),
        "refused entries must fail the command"
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), N);
    let refused: Vec<(u64, &str, &str)> = results
        .iter()
        .filter(|r| r["created"] == false)
        .map(|r| {
            (
                r["index"].as_u64().unwrap(),
                r["code"].as_str().unwrap(),
                r["error"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(refused.len(), 3, "{refused:?}");
    assert_eq!((refused[0].0, refused[0].1), (10, "AlreadyExists"));
    assert!(refused[0].2.starts_with("entries[10]: "), "{refused:?}");
    assert_eq!((refused[1].0, refused[1].1), (500, "InvalidArgument"));
    assert!(refused[1].2.contains("selector"), "{refused:?}");
    assert_eq!((refused[2].0, refused[2].1), (1100, "InvalidArgument"));
    assert!(
        refused[2].2.starts_with("entries[1100]: ") && refused[2].2.contains("other.org"),
        "{refused:?}"
    );
    assert_eq!(entry_count(c), before + N - 3);
    assert_eq!(created_records(c), audited_before + N - 3);

    // Created in a batch, served like any other entry.
    let addr = c.api_addr();
    eventually(
        "the batch entry's SVID",
        Duration::from_secs(20),
        || async {
            x509_ids(&addr)
                .await
                .filter(|ids| ids.iter().any(|i| i == "spiffe://example.org/batch/0"))
        },
    )
    .await;

    // The same file again: every entry is now a duplicate, nothing is added.
    let out = c.server_cli(&["entry", "create", "--file", file.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(
        stdout.contains(&format!("Created 0 of {N} entries.")),
        "{stdout}"
    );
    assert_eq!(entry_count(c), before + N - 3);

    // Flags and --file together are refused.
    let out = c.server_cli(&[
        "entry",
        "create",
        "--file",
        file.to_str().unwrap(),
        "--spiffe-id",
        "spiffe://example.org/x",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--file"), "{err}");
    c.server_ok(&["audit", "verify"]);
}

#[tokio::test]
async fn entry_batches_on_redb() {
    let mut c = Cluster::start();
    c.start_agent(AGENT);
    batch_creates_what_is_valid_and_names_what_is_not(&c).await;
}

#[tokio::test]
async fn entry_batches_on_postgres() {
    let Some(pg) = pg::start("batch") else {
        return;
    };
    pg.create_db("sigil");
    let secrets = Scratch::new("pg-batch-secret");
    let mut c = Cluster::start_with(&pg.datastore_section("sigil", &secrets.0.join("pgpass")));
    c.start_agent(AGENT);
    batch_creates_what_is_valid_and_names_what_is_not(&c).await;
    assert_eq!(
        pg.psql("sigil", "SELECT count(*) FROM entries"),
        (N - 3).to_string()
    );
}
