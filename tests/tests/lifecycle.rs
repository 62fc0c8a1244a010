//! End-to-end: restarts, outages, eviction/ban and refusal of bad input.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a test failure"
)]

use std::process::Command;
use std::time::Duration;

use sigil_tests::{Cluster, bin, eventually, log_count, my_uid_selector, wait_for};
use spiffe::WorkloadApiClient;

const LONG: Duration = Duration::from_secs(20);

async fn fetch_id(addr: &str) -> Result<String, String> {
    sigil_tests::fetch_x509_id(addr).await
}

async fn wait_fetch(addr: &str, want: &str) {
    eventually(&format!("a fetch of {want}"), LONG, || async {
        (fetch_id(addr).await.as_deref() == Ok(want)).then_some(())
    })
    .await;
}

async fn all_ids(addr: &str) -> Vec<String> {
    let client = WorkloadApiClient::connect_to(addr).await.unwrap();
    let mut v: Vec<String> = client
        .fetch_all_x509_svids()
        .await
        .unwrap()
        .iter()
        .map(|s| s.spiffe_id().to_string())
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn server_restart_keeps_entries_agents_and_ca() {
    let mut c = Cluster::with_agent();
    c.create_entry(
        "spiffe://example.org/a",
        &["--selector", &my_uid_selector()],
    );
    wait_fetch(&c.api_addr(), "spiffe://example.org/a").await;
    let bundle_before = c.server_ok(&["bundle", "show"]);
    let entries_before = c.server_ok(&["entry", "list", "--output", "json"]);

    c.stop_server();
    c.start_server();

    assert_eq!(
        c.server_ok(&["bundle", "show"]),
        bundle_before,
        "CA changed across restart"
    );
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

    // The agent reconnects by itself and receives changes made after the restart.
    c.create_entry(
        "spiffe://example.org/b",
        &["--selector", &my_uid_selector()],
    );
    let addr = c.api_addr();
    for _ in 0..200 {
        if all_ids(&addr).await.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        all_ids(&addr).await,
        vec!["spiffe://example.org/a", "spiffe://example.org/b"]
    );

    // A restarted agent comes back from its stored identity without a token.
    c.restart_agent();
    for _ in 0..200 {
        if WorkloadApiClient::connect_to(&addr).await.is_ok()
            && fetch_id(&addr).await.is_ok()
            && all_ids(&addr).await.len() == 2
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("restarted agent did not serve both SVIDs");
}

#[tokio::test]
async fn agent_keeps_serving_while_server_is_down() {
    let mut c = Cluster::with_agent();
    c.create_entry(
        "spiffe://example.org/a",
        &["--selector", &my_uid_selector()],
    );
    wait_fetch(&c.api_addr(), "spiffe://example.org/a").await;
    c.stop_server();
    for _ in 0..5 {
        assert_eq!(
            fetch_id(&c.api_addr()).await.as_deref(),
            Ok("spiffe://example.org/a")
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    c.start_server();
    c.create_entry(
        "spiffe://example.org/b",
        &["--selector", &my_uid_selector()],
    );
    let addr = c.api_addr();
    for _ in 0..300 {
        if all_ids(&addr).await.len() == 2 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("agent did not reconnect: {:?}", all_ids(&addr).await);
}

#[tokio::test]
async fn banned_agent_gets_no_new_entries_and_cannot_reattest() {
    let c = Cluster::with_agent();
    c.create_entry(
        "spiffe://example.org/a",
        &["--selector", &my_uid_selector()],
    );
    wait_fetch(&c.api_addr(), "spiffe://example.org/a").await;
    c.server_ok(&["agent", "ban", "spiffe://example.org/test-agent"]);
    let shown: serde_json::Value = serde_json::from_str(&c.server_ok(&[
        "agent",
        "show",
        "spiffe://example.org/test-agent",
        "--output",
        "json",
    ]))
    .unwrap();
    assert_eq!(shown["banned"], true);
    c.create_entry(
        "spiffe://example.org/b",
        &["--selector", &my_uid_selector()],
    );
    // A banned node is told so on its sync stream and drops every identity
    // it served, old and new.
    wait_for("the banned agent withdraws its identities", LONG, || {
        c.logs().contains("withdrawing every identity of the agent")
    });
    let deadline = std::time::Instant::now() + LONG;
    while fetch_id(&c.api_addr()).await.is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "a banned agent still serves an identity"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A fresh token for the banned ID does not get it back.
    let token = c.token("spiffe://example.org/test-agent");
    let mut second = Cluster::start();
    // Attest against the *first* server from a new data dir.
    second.port = c.port;
    std::fs::write(
        second.dir.0.join("bundle.pem"),
        c.server_ok(&["bundle", "show"]),
    )
    .unwrap();
    let cfg = format!(
        "trust_domain = \"example.org\"\nserver_address = \"127.0.0.1\"\nserver_port = {}\nsocket_path = \"{d}/a2/api.sock\"\nadmin_socket = \"{d}/a2/admin.sock\"\ndata_dir = \"{d}/a2/data\"\ntrust_bundle_path = \"{d}/bundle.pem\"\n",
        c.port,
        d = second.dir.0.display()
    );
    std::fs::write(second.dir.0.join("a2.toml"), cfg).unwrap();
    let out = Command::new(bin("sigil-agent"))
        .args(["run", "--config"])
        .arg(second.dir.0.join("a2.toml"))
        .args(["--join-token", &token])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("banned"), "{err}");
    second.stop_server();
}

#[tokio::test]
async fn evicted_agent_cannot_sync() {
    let c = Cluster::with_agent();
    c.create_entry(
        "spiffe://example.org/a",
        &["--selector", &my_uid_selector()],
    );
    wait_fetch(&c.api_addr(), "spiffe://example.org/a").await;
    c.server_ok(&["agent", "evict", "spiffe://example.org/test-agent"]);
    let list: serde_json::Value =
        serde_json::from_str(&c.server_ok(&["agent", "list", "--output", "json"])).unwrap();
    assert_eq!(list["agents"].as_array().unwrap().len(), 0);
    wait_for("sync refusal logged", LONG, || {
        c.logs().contains("not attested")
    });
    let refusals = log_count(&c.dir.0, "agent.log", "not attested");
    c.create_entry(
        "spiffe://example.org/b",
        &["--selector", &my_uid_selector()],
    );
    // The agent tried again after `b` existed and was refused: only then
    // does "b was not delivered" mean something.
    wait_for("a refusal after the new entry", LONG, || {
        log_count(&c.dir.0, "agent.log", "not attested") > refusals
    });
    assert_eq!(all_ids(&c.api_addr()).await, vec!["spiffe://example.org/a"]);
}

#[test]
fn join_tokens_are_single_use_and_expire() {
    let c = Cluster::start();
    let token = c.token("spiffe://example.org/n1");
    let mut first = c.spawn_agent(Some(&token));
    // Wait for the first agent to attest, then reuse its token from a second data dir.
    wait_for("first attestation", LONG, || {
        c.logs().contains("agent attested")
    });
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = first.wait();
    let cfg = std::fs::read_to_string(c.dir.0.join("agent.toml"))
        .unwrap()
        .replace("/agent/", "/agent2/");
    std::fs::write(c.dir.0.join("agent2.toml"), cfg).unwrap();
    let out = Command::new(bin("sigil-agent"))
        .args(["run", "--config"])
        .arg(c.dir.0.join("agent2.toml"))
        .args(["--join-token", &token])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown or already used"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let short = {
        let out = c.server_ok(&["token", "generate", "--ttl", "1s", "--output", "json"]);
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["value"]
            .as_str()
            .unwrap()
            .to_string()
    };
    std::thread::sleep(Duration::from_millis(2100));
    let out = Command::new(bin("sigil-agent"))
        .args(["run", "--config"])
        .arg(c.dir.0.join("agent2.toml"))
        .args(["--join-token", &short])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("expired"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn bad_input_is_refused_naming_the_field_and_changes_nothing() {
    let c = Cluster::start();
    let before = c.server_ok(&["entry", "list", "--output", "json"]);
    let cases: &[(&[&str], &str)] = &[
        (
            &[
                "entry",
                "create",
                "--parent-id",
                "spiffe://example.org/a",
                "--spiffe-id",
                "spiffe://example.org/bad path",
                "--selector",
                "unix:uid:1",
            ],
            "spiffe_id",
        ),
        (
            &[
                "entry",
                "create",
                "--parent-id",
                "spiffe://example.org/a",
                "--spiffe-id",
                "https://example.org/x",
                "--selector",
                "unix:uid:1",
            ],
            "spiffe_id",
        ),
        (
            &[
                "entry",
                "create",
                "--parent-id",
                "not-an-id",
                "--spiffe-id",
                "spiffe://example.org/x",
                "--selector",
                "unix:uid:1",
            ],
            "parent_id",
        ),
        (
            &[
                "entry",
                "create",
                "--parent-id",
                "spiffe://example.org/a",
                "--spiffe-id",
                "spiffe://example.org/x",
                "--selector",
                "unix:uid:abc",
            ],
            "selector",
        ),
        (
            &[
                "entry",
                "create",
                "--parent-id",
                "spiffe://example.org/a",
                "--spiffe-id",
                "spiffe://example.org/x",
                "--selector",
                "bogus:thing",
            ],
            "selector",
        ),
        (
            &[
                "entry",
                "create",
                "--parent-id",
                "spiffe://example.org/a",
                "--spiffe-id",
                "spiffe://example.org/x",
                "--selector",
                "unix:uid:1",
                "--x509-ttl",
                "5 minutes",
            ],
            "x509-ttl",
        ),
        (
            &[
                "entry",
                "create",
                "--parent-id",
                "spiffe://example.org/a",
                "--spiffe-id",
                "spiffe://example.org/x",
                "--selector",
                "unix:uid:1",
                "--dns",
                "bad_dns!",
            ],
            "dns",
        ),
        (
            &["token", "generate", "--spiffe-id", "spiffe://other.org/x"],
            "spiffe_id",
        ),
        (&["token", "generate", "--ttl", "0s"], "ttl"),
        (
            &[
                "token",
                "generate",
                "--spiffe-id",
                "spiffe://example.org/sigil/server",
            ],
            "spiffe_id",
        ),
        (
            &[
                "entry",
                "create",
                "--parent-id",
                "spiffe://example.org/a",
                "--spiffe-id",
                "spiffe://example.org/x",
                "--selector",
                "unix:uid:1",
                "--expires-at",
                "tomorrow",
            ],
            "expires-at",
        ),
    ];
    for (args, field) in cases {
        let out = c.server_cli(args);
        assert!(!out.status.success(), "{args:?} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(field),
            "{args:?}: error does not name {field}: {err}"
        );
    }
    assert_eq!(
        c.server_ok(&["entry", "list", "--output", "json"]),
        before,
        "a refused request changed state"
    );

    // Config errors name the key.
    let bad = c.dir.0.join("bad.toml");
    std::fs::write(
        &bad,
        "trust_domain = \"example.org\"\ndata_dir = \"/tmp/x\"\nbind_prot = 1\n",
    )
    .unwrap();
    let out = Command::new(bin("sigil-server"))
        .args(["run", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("bind_prot"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(&bad, "trust_domain = \"example.org\"\nserver_address = \"127.0.0.1\"\ndata_dir = \"/tmp/x\"\ninsecure_bootstrap = true\nsocket = \"/x\"\n").unwrap();
    let out = Command::new(bin("sigil-agent"))
        .args(["run", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("socket"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn expired_entry_is_withdrawn_from_the_workload() {
    let c = Cluster::with_agent();
    let at = time_in(3);
    c.create_entry(
        "spiffe://example.org/temp",
        &["--selector", &my_uid_selector(), "--expires-at", &at],
    );
    wait_fetch(&c.api_addr(), "spiffe://example.org/temp").await;
    for _ in 0..100 {
        if let Err(e) = fetch_id(&c.api_addr()).await {
            assert!(
                e.contains("no identity issued") || e.contains("permission denied"),
                "{e}"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("expired entry still served");
}

/// RFC 3339 UTC time `secs` from now.
fn time_in(secs: u64) -> String {
    let out = Command::new("date")
        .args([
            "-u",
            "-d",
            &format!("+{secs} seconds"),
            "+%Y-%m-%dT%H:%M:%SZ",
        ])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn duplicate_entries_are_refused_on_create_and_update() {
    let c = Cluster::start();
    let parent = "spiffe://example.org/some-agent";
    let create = |id: &str, sel: &str| {
        c.server_cli(&[
            "entry",
            "create",
            "--parent-id",
            parent,
            "--spiffe-id",
            id,
            "--selector",
            sel,
            "--output",
            "json",
        ])
    };
    let first = create("spiffe://example.org/a", "unix:uid:1");
    assert!(first.status.success(), "{first:?}");
    let first: serde_json::Value = serde_json::from_slice(&first.stdout).unwrap();
    // Same ID and parent, other selectors: a distinct entry.
    let other = create("spiffe://example.org/a", "unix:uid:2");
    assert!(other.status.success(), "{other:?}");
    let other: serde_json::Value = serde_json::from_slice(&other.stdout).unwrap();
    let other_id = other["id"].as_str().unwrap();

    let dup = create("spiffe://example.org/a", "unix:uid:1");
    assert!(!dup.status.success());
    let err = String::from_utf8_lossy(&dup.stderr);
    assert!(
        err.contains(first["id"].as_str().unwrap()),
        "error should name the existing entry: {err}"
    );

    // Updating the second entry into a copy of the first is refused too,
    // and leaves it unchanged.
    let upd = c.server_cli(&["entry", "update", other_id, "--selector", "unix:uid:1"]);
    assert!(!upd.status.success(), "{upd:?}");
    let shown: serde_json::Value =
        serde_json::from_str(&c.server_ok(&["entry", "show", other_id, "--output", "json"]))
            .unwrap();
    assert_eq!(shown["selectors"], other["selectors"]);
    let all: serde_json::Value =
        serde_json::from_str(&c.server_ok(&["entry", "list", "--output", "json"])).unwrap();
    assert_eq!(all["entries"].as_array().map(Vec::len), Some(2), "{all}");

    // Deleting the first frees its identity for a new entry.
    c.server_ok(&["entry", "delete", first["id"].as_str().unwrap()]);
    let again = create("spiffe://example.org/a", "unix:uid:1");
    assert!(again.status.success(), "{again:?}");
}

#[tokio::test]
async fn healthcheck_reports_counts_and_the_signing_queue() {
    let c = Cluster::with_agent();
    let health = || -> serde_json::Value {
        serde_json::from_str(&c.server_ok(&["healthcheck", "--output", "json"])).unwrap()
    };
    let before = health();
    assert_eq!(before["healthy"], true);
    assert_eq!(before["agents"], 1);
    let signed_before = before["signing"]["svids_signed"].as_u64().unwrap();
    for i in 0..3 {
        c.create_entry(
            &format!("spiffe://example.org/h{i}"),
            &["--selector", &my_uid_selector()],
        );
    }
    wait_for("three SVIDs counted", LONG, || {
        health()["signing"]["svids_signed"].as_u64().unwrap() >= signed_before + 3
    });
    let after = health();
    assert_eq!(after["entries"], 3);
    assert_eq!(after["signing"]["waiting_calls"], 0, "{after}");
    let text = c.server_ok(&["healthcheck", "--verbose"]);
    assert!(text.contains("Signing queue"), "{text}");
}
