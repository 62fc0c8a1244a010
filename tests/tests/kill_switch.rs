//! End-to-end: the kill switch through the real binaries and the `spiffe`
//! crate's client. Each kind of kill withdraws exactly what it names, kills
//! are durable rules (later entries, server restarts), lifting restores,
//! and bad input names the field and writes nothing.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a test failure"
)]

use std::time::{Duration, Instant};

use sigil_tests::{Cluster, my_uid_selector};
use spiffe::WorkloadApiClient;

const LONG: Duration = Duration::from_secs(20);
const AGENT: &str = "spiffe://example.org/test-agent";

/// Every SPIFFE ID the Workload API serves this process (empty when it
/// answers PermissionDenied).
async fn ids(addr: &str) -> Vec<String> {
    sigil_tests::x509_ids(addr).await.unwrap_or_default()
}

/// Waits until the served set is exactly `want`.
async fn wait_ids(addr: &str, want: &[&str]) {
    let deadline = Instant::now() + LONG;
    loop {
        let got = ids(addr).await;
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "served {got:?}, want {want:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn kill(c: &Cluster, args: &[&str]) -> String {
    let mut a = vec!["kill"];
    a.extend_from_slice(args);
    a.extend_from_slice(&["--reason", "incident 42", "--output", "json"]);
    let v: serde_json::Value = serde_json::from_str(&c.server_ok(&a)).unwrap();
    v["id"].as_str().unwrap().to_string()
}

fn kills(c: &Cluster) -> serde_json::Value {
    serde_json::from_str(&c.server_ok(&["kill", "list", "--output", "json"])).unwrap()
}

#[tokio::test]
async fn each_kind_of_kill_withdraws_exactly_what_it_names_until_lifted() {
    let c = Cluster::with_agent();
    let uid = my_uid_selector();
    let a = c.create_entry("spiffe://example.org/a", &["--selector", &uid]);
    c.create_entry(
        "spiffe://example.org/b",
        &["--selector", &uid, "--selector", "unix:gid:0"],
    );
    let addr = c.api_addr();
    let both = ["spiffe://example.org/a", "spiffe://example.org/b"];
    wait_ids(&addr, &both).await;

    // By SPIFFE ID.
    let k1 = kill(&c, &["--spiffe-id", "spiffe://example.org/a"]);
    wait_ids(&addr, &["spiffe://example.org/b"]).await;
    // The rule applies to entries created later.
    c.create_entry(
        "spiffe://example.org/a",
        &["--selector", &uid, "--selector", "unix:user:root"],
    );
    c.create_entry("spiffe://example.org/c", &["--selector", &uid]);
    wait_ids(&addr, &["spiffe://example.org/b", "spiffe://example.org/c"]).await;
    c.server_ok(&["kill", "lift", &k1]);
    wait_ids(
        &addr,
        &[
            "spiffe://example.org/a",
            "spiffe://example.org/a",
            "spiffe://example.org/b",
            "spiffe://example.org/c",
        ],
    )
    .await;

    // By entry: only that entry, not its namesake.
    let k2 = kill(&c, &["--entry", &a]);
    wait_ids(
        &addr,
        &[
            "spiffe://example.org/a",
            "spiffe://example.org/b",
            "spiffe://example.org/c",
        ],
    )
    .await;
    c.server_ok(&["kill", "lift", &k2]);

    // By selector: only entries that carry it.
    let k3 = kill(&c, &["--selector", "unix:gid:0"]);
    wait_ids(
        &addr,
        &[
            "spiffe://example.org/a",
            "spiffe://example.org/a",
            "spiffe://example.org/c",
        ],
    )
    .await;
    assert_eq!(kills(&c)["kills"][0]["target"]["kind"], "selector");
    assert!(
        kills(&c)["kills"][0]["caller"]
            .as_str()
            .unwrap()
            .starts_with("admin uid=")
    );
    c.server_ok(&["kill", "lift", &k3]);
    assert_eq!(kills(&c)["kills"].as_array().unwrap().len(), 0);
}

#[tokio::test]
async fn a_killed_agent_serves_nothing_across_restarts_until_lifted() {
    let mut c = Cluster::with_agent();
    let uid = my_uid_selector();
    c.create_entry("spiffe://example.org/a", &["--selector", &uid]);
    let addr = c.api_addr();
    wait_ids(&addr, &["spiffe://example.org/a"]).await;
    let k = kill(&c, &["--agent", AGENT]);
    wait_ids(&addr, &[]).await;
    // Neither an agent restart nor a server restart brings it back.
    c.stop_server();
    c.start_server();
    assert_eq!(kills(&c)["kills"][0]["id"], k.as_str(), "kills are durable");
    c.stop_agent();
    let log = c.dir.0.join("agent.log");
    let before = std::fs::read_to_string(&log).unwrap().len();
    let mut child = c.spawn_agent(None);
    // The restarted agent comes up with its stored identity and an empty
    // cache, is refused, and serves nothing; the refusal in its log proves
    // it got that far.
    let deadline = Instant::now() + LONG;
    while !std::fs::read_to_string(&log).unwrap()[before..].contains("is killed") {
        assert!(Instant::now() < deadline, "{}", c.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // It never synced, so it may hold the call until it does; either way
    // it serves nothing.
    if let Ok(got) = tokio::time::timeout(Duration::from_secs(3), ids(&addr)).await {
        assert_eq!(got, Vec::<String>::new());
    }
    // Lifted: the node's pinned SVID is accepted again at its next sync
    // (after its reconnect backoff), and it serves its entries.
    c.server_ok(&["kill", "lift", &k]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while ids(&addr).await != ["spiffe://example.org/a"] {
        assert!(Instant::now() < deadline, "not restored: {}", c.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn bad_kill_requests_name_the_field_and_write_nothing() {
    let c = Cluster::with_agent();
    let cases: &[(&[&str], &str)] = &[
        (&["kill", "--reason", "x"], "target"),
        (
            &[
                "kill",
                "--spiffe-id",
                "spiffe://example.org/a",
                "--entry",
                "e",
                "--reason",
                "x",
            ],
            "cannot be used with",
        ),
        (&["kill", "--entry", "nope", "--reason", "x"], "no entry"),
        (
            &[
                "kill",
                "--agent",
                "spiffe://example.org/nope",
                "--reason",
                "x",
            ],
            "no agent",
        ),
        (
            &["kill", "--selector", "nocolon", "--reason", "x"],
            "selector",
        ),
        (
            &["kill", "--spiffe-id", "not-an-id", "--reason", "x"],
            "spiffe_id",
        ),
        (&["kill", "--spiffe-id", "spiffe://example.org/a"], "reason"),
        (
            &[
                "kill",
                "--spiffe-id",
                "spiffe://example.org/a",
                "--reason",
                " ",
            ],
            "reason",
        ),
    ];
    for (args, needle) in cases {
        let out = c.server_cli(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    assert_eq!(kills(&c)["kills"].as_array().unwrap().len(), 0);
}

#[tokio::test]
async fn validate_jwtsvid_rejects_a_killed_identity_until_the_kill_is_lifted() {
    let c = Cluster::with_agent();
    c.create_entry(
        "spiffe://example.org/signer",
        &["--selector", &my_uid_selector()],
    );
    c.create_entry(
        "spiffe://example.org/bystander",
        &["--selector", &my_uid_selector()],
    );
    let addr = c.api_addr();
    wait_ids(
        &addr,
        &[
            "spiffe://example.org/bystander",
            "spiffe://example.org/signer",
        ],
    )
    .await;
    let client = WorkloadApiClient::connect_to(&addr).await.unwrap();
    let fetch = |id: &'static str| {
        let client = client.clone();
        async move {
            client
                .fetch_jwt_svid(["aud"], Some(&spiffe::SpiffeId::new(id).unwrap()))
                .await
                .unwrap()
                .token()
                .to_string()
        }
    };
    let signer = fetch("spiffe://example.org/signer").await;
    let bystander = fetch("spiffe://example.org/bystander").await;
    assert!(client.validate_jwt_token("aud", &signer).await.is_ok());

    let k = kill(&c, &["--spiffe-id", "spiffe://example.org/signer"]);
    let deadline = Instant::now() + LONG;
    let err = loop {
        match client.validate_jwt_token("aud", &signer).await {
            Err(e) => break e.to_string(),
            Ok(_) => {
                assert!(
                    Instant::now() < deadline,
                    "the killed token still validates"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert!(err.contains("killed"), "{err}");
    // Only the killed identity: another one's token still validates.
    assert!(client.validate_jwt_token("aud", &bystander).await.is_ok());

    c.server_ok(&["kill", "lift", &k]);
    let deadline = Instant::now() + LONG;
    while client.validate_jwt_token("aud", &signer).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "lifting did not restore validation"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until agent A serves exactly `a` and agent B exactly `b`.
async fn both(on_a: &str, on_b: &str, a: &[&str], b: &[&str]) {
    wait_ids(on_a, a).await;
    wait_ids(on_b, b).await;
}

#[tokio::test]
async fn each_kind_of_kill_withdraws_exactly_what_it_names_on_two_agents() {
    let c = Cluster::with_agent();
    let b = c.start_extra_agent("agent-b", "spiffe://example.org/agent-b");
    let uid = my_uid_selector();
    const X: &str = "spiffe://example.org/x";
    const Y: &str = "spiffe://example.org/y";
    const Z: &str = "spiffe://example.org/z";
    c.create_entry_under(AGENT, X, &["--selector", &uid]);
    c.create_entry_under(AGENT, Y, &["--selector", &uid, "--selector", "unix:gid:0"]);
    c.create_entry_under(&b.id, X, &["--selector", &uid]);
    let bz = c.create_entry_under(&b.id, Z, &["--selector", &uid]);
    let (a, b_addr) = (c.api_addr(), b.api_addr());
    both(&a, &b_addr, &[X, Y], &[X, Z]).await;

    // SPIFFE ID: on every agent, nothing else.
    let k = kill(&c, &["--spiffe-id", X]);
    both(&a, &b_addr, &[Y], &[Z]).await;
    c.server_ok(&["kill", "lift", &k]);
    both(&a, &b_addr, &[X, Y], &[X, Z]).await;

    // One entry on agent B: agent A untouched.
    let k = kill(&c, &["--entry", &bz]);
    both(&a, &b_addr, &[X, Y], &[X]).await;
    c.server_ok(&["kill", "lift", &k]);
    both(&a, &b_addr, &[X, Y], &[X, Z]).await;

    // A selector only agent A's entry carries.
    let k = kill(&c, &["--selector", "unix:gid:0"]);
    both(&a, &b_addr, &[X], &[X, Z]).await;
    c.server_ok(&["kill", "lift", &k]);
    both(&a, &b_addr, &[X, Y], &[X, Z]).await;

    // Agent A as a node: B keeps everything.
    let k = kill(&c, &["--agent", AGENT]);
    both(&a, &b_addr, &[], &[X, Z]).await;
    c.server_ok(&["kill", "lift", &k]);
    both(&a, &b_addr, &[X, Y], &[X, Z]).await;
}
