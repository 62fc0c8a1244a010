//! End-to-end: `serve_offline_for` bounds how long an agent cut off from
//! the server keeps serving cached SVIDs (what a kill cannot reach), and an
//! agent without it keeps serving until its SVIDs expire.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a test failure"
)]

use std::time::{Duration, Instant};

use sigil_tests::{Cluster, eventually, fetch_x509_id as fetch, my_uid_selector};

const LONG: Duration = Duration::from_secs(30);
const AGENT: &str = "spiffe://example.org/test-agent";

#[tokio::test]
async fn an_agent_cut_off_longer_than_serve_offline_for_serves_nothing_until_the_server_is_back() {
    let mut c = Cluster::start();
    c.start_agent_with(AGENT, "serve_offline_for = \"3s\"\n");
    c.create_entry(
        "spiffe://example.org/w",
        &["--selector", &my_uid_selector()],
    );
    let addr = c.api_addr();
    eventually("the SVID", LONG, || async {
        fetch(&addr)
            .await
            .ok()
            .filter(|id| id == "spiffe://example.org/w")
    })
    .await;

    // The server goes away: the agent keeps serving for serve_offline_for
    // (the SVID's own lifetime is an hour)...
    c.stop_server();
    let cut = Instant::now();
    let first = fetch(&addr).await;
    assert!(
        first.is_ok() || cut.elapsed() >= Duration::from_secs(3),
        "refused before serve_offline_for passed: {first:?}"
    );
    // ...then refuses, saying why.
    let err = eventually("the agent to stop serving", LONG, || async {
        fetch(&addr).await.err()
    })
    .await;
    println!("served for {:?} after the server stopped", cut.elapsed());
    assert!(err.contains("serve_offline_for"), "{err}");

    // The server is back: the agent re-syncs, mints and serves again.
    c.start_server();
    eventually("the SVID again", LONG, || async {
        fetch(&addr)
            .await
            .ok()
            .filter(|id| id == "spiffe://example.org/w")
    })
    .await;
}

#[tokio::test]
async fn without_serve_offline_for_an_agent_serves_its_cached_svid_while_the_server_is_down() {
    let mut c = Cluster::start();
    c.start_agent_with(AGENT, "");
    c.create_entry(
        "spiffe://example.org/w",
        &["--selector", &my_uid_selector(), "--x509-ttl", "1h"],
    );
    let addr = c.api_addr();
    eventually("the SVID", LONG, || async {
        fetch(&addr)
            .await
            .ok()
            .filter(|id| id == "spiffe://example.org/w")
    })
    .await;
    c.stop_server();
    // Positive event first: the agent noticed the outage (its log says
    // the sync stream failed), then it still serves.
    let dir = c.dir.0.clone();
    eventually("the agent to notice the outage", LONG, || async {
        (sigil_tests::log_count(&dir, "agent.log", "sync stream failed") > 0).then_some(())
    })
    .await;
    assert_eq!(fetch(&addr).await.unwrap(), "spiffe://example.org/w");
}
