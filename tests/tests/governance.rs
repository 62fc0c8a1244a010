//! End-to-end: agent governance through the real binaries and the `spiffe`
//! crate's client — owners and required owners, entry expiry withdrawing an
//! identity from an open stream, context claims in JWT-SVIDs (decoded from
//! the token the `spiffe` crate fetched), the approval gate (denied, then
//! granted, grant expiry, non-approver gid refused) and the access review.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a test failure"
)]

use std::process::Command;
use std::time::Duration;

use base64::Engine;
use serde_json::Value;
use sigil_tests::{Cluster, bin, eventually, my_uid, my_uid_selector};
use spiffe::WorkloadApiClient;
use tokio_stream::StreamExt;
use x509_parser::prelude::{FromDer, X509Certificate};

const LONG: Duration = Duration::from_secs(20);
const AGENT: &str = "spiffe://example.org/test-agent";

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn json(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

fn entry_count(c: &Cluster) -> usize {
    json(&c.server_ok(&["entry", "list", "--output", "json"]))["entries"]
        .as_array()
        .unwrap()
        .len()
}

/// Runs `sigil-server ARGS` and returns (success, stderr).
fn cli_err(c: &Cluster, args: &[&str]) -> (bool, String) {
    let out = c.server_cli(args);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// The claims of a compact JWS, decoded by hand (no Sigil code).
fn claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

fn not_after(der: &[u8]) -> i64 {
    let (_, c) = X509Certificate::from_der(der).unwrap();
    c.validity().not_after.timestamp()
}

/// Reads `stream` until it no longer serves `id` (an error, its end, or an
/// update without it); every SVID of `id` it delivers meanwhile ends by
/// `deadline`, and the withdrawal comes no earlier than `deadline`.
async fn withdrawn<S>(stream: &mut S, id: &str, deadline: i64)
where
    S: tokio_stream::Stream<Item = Result<spiffe::X509Context, spiffe::WorkloadApiError>> + Unpin,
{
    loop {
        let next = tokio::time::timeout(LONG, stream.next())
            .await
            .expect("the stream moved on by the deadline");
        match next {
            None | Some(Err(_)) => break,
            Some(Ok(ctx)) => {
                let Some(s) = ctx.svids().iter().find(|s| s.spiffe_id().to_string() == id) else {
                    break;
                };
                let end = not_after(s.leaf().as_ref());
                assert!(
                    end <= deadline,
                    "renewed past the deadline: {end} > {deadline}"
                );
            }
        }
    }
    assert!(now() >= deadline, "withdrawn no earlier than the deadline");
}

/// Unix seconds of an RFC 3339 UTC time as the CLI prints it (within an
/// hour of now).
fn time_of(s: &str) -> i64 {
    let d = now();
    (d - 3600..d + 3600)
        .find(|t| sigil_core::rfc3339(*t) == s)
        .unwrap_or_else(|| panic!("{s} is not within an hour of now"))
}

/// What the Workload API says to this process now: its SPIFFE IDs, or the
/// error message.
async fn x509(addr: &str) -> Result<Vec<String>, String> {
    let client = WorkloadApiClient::connect_to(addr)
        .await
        .map_err(|e| e.to_string())?;
    client
        .fetch_all_x509_svids()
        .await
        .map(|v| v.iter().map(|s| s.spiffe_id().to_string()).collect())
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn owners_are_required_when_configured_and_bad_text_names_the_field() {
    let mut c = Cluster::start_with("require_owner = true\n");
    c.start_agent(AGENT);
    let uid = my_uid_selector();
    let (ok, err) = cli_err(
        &c,
        &[
            "entry",
            "create",
            "--parent-id",
            AGENT,
            "--spiffe-id",
            "spiffe://example.org/unowned",
            "--selector",
            &uid,
        ],
    );
    assert!(!ok && err.contains("`owner`"), "{err}");
    let (ok, err) = cli_err(
        &c,
        &[
            "entry",
            "create",
            "--parent-id",
            AGENT,
            "--spiffe-id",
            "spiffe://example.org/x",
            "--selector",
            &uid,
            "--owner",
            "team-ai",
            "--description",
            "bad\u{7}bell",
        ],
    );
    assert!(!ok && err.contains("`description`"), "{err}");
    let (ok, err) = cli_err(
        &c,
        &[
            "entry",
            "create",
            "--parent-id",
            AGENT,
            "--spiffe-id",
            "spiffe://example.org/x",
            "--selector",
            &uid,
            "--owner",
            &"o".repeat(300),
        ],
    );
    assert!(!ok && err.contains("`owner`"), "{err}");
    assert_eq!(entry_count(&c), 0, "refused entries write nothing");

    let id = c.create_entry(
        "spiffe://example.org/triage",
        &[
            "--selector",
            &uid,
            "--owner",
            "team-ai (alice@example.org)",
            "--description",
            "triages support tickets",
        ],
    );
    let shown = json(&c.server_ok(&["entry", "show", &id, "--output", "json"]));
    assert_eq!(shown["owner"], "team-ai (alice@example.org)");
    assert_eq!(shown["description"], "triages support tickets");
    let pretty = c.server_ok(&["entry", "show", &id]);
    assert!(pretty.contains("Description      : triages support tickets"));
    // Clearing the owner is refused too; the entry is unchanged.
    let (ok, err) = cli_err(&c, &["entry", "update", &id, "--owner", ""]);
    assert!(!ok && err.contains("`owner`"), "{err}");
    let listed = json(&c.server_ok(&["entry", "list", "--output", "json"]));
    assert_eq!(listed["entries"][0]["owner"], "team-ai (alice@example.org)");
    assert_eq!(listed["entries"][0]["revision"], 0);
}

#[tokio::test]
async fn an_expired_entry_is_withdrawn_from_an_open_stream_at_its_expiry() {
    let c = Cluster::with_agent();
    let uid = my_uid_selector();
    let expires = now() + 6;
    let stamp = sigil_core::rfc3339(expires);
    c.create_entry(
        "spiffe://example.org/short-lived",
        &[
            "--selector",
            &uid,
            "--expires-at",
            &stamp,
            "--x509-ttl",
            "1h",
        ],
    );
    let addr = c.api_addr();
    let client = eventually("client", LONG, || async {
        WorkloadApiClient::connect_to(&addr).await.ok()
    })
    .await;
    let mut stream = eventually("first X.509 context", LONG, || async {
        client.stream_x509_contexts().await.ok()
    })
    .await;
    let first = tokio::time::timeout(LONG, stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let svid = first.default_svid().unwrap();
    assert_eq!(
        svid.spiffe_id().to_string(),
        "spiffe://example.org/short-lived"
    );
    // The SVID does not outlive the entry, although the entry asks for 1h.
    let leaf = not_after(svid.leaf().as_ref());
    assert!(leaf <= expires, "notAfter {leaf} > expiry {expires}");
    // The open stream loses the identity at the expiry: PermissionDenied
    // (nothing left) or an update without it. Until then it may deliver
    // renewals (the 6 s SVID renews at half-life), none past the expiry.
    withdrawn(&mut stream, "spiffe://example.org/short-lived", expires).await;
    let e = x509(&addr).await.unwrap_err();
    assert!(e.contains("no identity issued"), "{e}");
    // The access review says why.
    let rows = json(&c.server_ok(&["entry", "review", "--output", "json"]));
    assert!(
        rows[0]["reasons"]
            .as_array()
            .unwrap()
            .contains(&"expired".into()),
        "{rows}"
    );
}

#[tokio::test]
async fn jwt_svids_carry_context_claims_and_reserved_names_are_refused() {
    let mut c = Cluster::start_with("jwt_attestation_claims = true\n");
    c.start_agent(AGENT);
    let uid = my_uid_selector();
    for (claim, needle) in [
        ("sub=someone-else", "reserved"),
        ("act=x", "reserved"),
        ("sigil_owner=x", "sigil_"),
        ("no-equals-sign", "KEY=VALUE"),
    ] {
        let (ok, err) = cli_err(
            &c,
            &[
                "entry",
                "create",
                "--parent-id",
                AGENT,
                "--spiffe-id",
                "spiffe://example.org/x",
                "--selector",
                &uid,
                "--jwt-claim",
                claim,
            ],
        );
        assert!(
            !ok && err.contains("`jwt_claim`") && err.contains(needle),
            "{claim}: {err}"
        );
    }
    assert_eq!(entry_count(&c), 0, "refused entries write nothing");

    c.create_entry(
        "spiffe://example.org/analyst",
        &[
            "--selector",
            &uid,
            "--owner",
            "team-ai",
            "--jwt-claim",
            "environment=prod",
            "--jwt-claim",
            "risk_tier=high",
        ],
    );
    let addr = c.api_addr();
    let client = WorkloadApiClient::connect_to(&addr).await.unwrap();
    let jwt = eventually("a JWT-SVID", LONG, || async {
        client.fetch_jwt_svid(["reports"], None).await.ok()
    })
    .await;
    let cl = claims(jwt.token());
    assert_eq!(cl["sub"], "spiffe://example.org/analyst");
    assert_eq!(cl["environment"], "prod");
    assert_eq!(cl["risk_tier"], "high");
    assert_eq!(cl["sigil_owner"], "team-ai");
    let att = &cl["sigil_attestation"];
    assert_eq!(att["node_attestation"], "join_token", "{cl}");
    assert_eq!(att["agent_id"], AGENT);
    assert_eq!(
        att["workload_selector_types"],
        serde_json::json!(["unix:uid"])
    );
    // The token still validates with the bundle, claims and all.
    let bundles = client.fetch_jwt_bundles().await.unwrap();
    spiffe::JwtSvid::parse_and_validate(jwt.token(), &bundles, &["reports"]).unwrap();
}

/// `sigil-server ARGS` as root with primary gid `gid` (setpriv).
fn as_gid(c: &Cluster, gid: u32, args: &[&str]) -> std::process::Output {
    Command::new("setpriv")
        .args(["--regid", &gid.to_string(), "--clear-groups"])
        .arg(bin("sigil-server"))
        .args(args)
        .env("SIGIL_ADMIN_SOCKET", c.admin_socket())
        .output()
        .unwrap()
}

/// The request ID named in a workload's PermissionDenied.
fn request_id(msg: &str) -> String {
    let after = msg.split("request ").nth(1).expect("names a request");
    after.split_whitespace().next().unwrap().to_string()
}

#[tokio::test]
async fn approval_gate_denied_then_granted_and_the_grant_expires() {
    const APPROVERS: u32 = 4242;
    let root = my_uid() == 0;
    let extra = if root {
        format!("approvers_gid = {APPROVERS}\n")
    } else {
        String::new()
    };
    let mut c = Cluster::start_with(&extra);
    c.start_agent(AGENT);
    let uid = my_uid_selector();
    let entry = c.create_entry(
        "spiffe://example.org/payments-agent",
        &[
            "--selector",
            &uid,
            "--require-approval",
            "--owner",
            "payments",
        ],
    );
    let addr = c.api_addr();
    // The workload is refused, with the request named.
    let msg = eventually("a PermissionDenied naming the request", LONG, || async {
        match x509(&addr).await {
            Err(e) if e.contains("requires approval") => Some(e),
            _ => None,
        }
    })
    .await;
    let req = request_id(&msg);
    assert!(msg.contains("pending"), "{msg}");
    let list = json(&c.server_ok(&["approval", "list", "--output", "json"]));
    assert_eq!(list[0]["id"], req.as_str(), "{list}");
    assert_eq!(list[0]["status"], "pending");
    assert_eq!(list[0]["entry_id"], entry.as_str());
    assert_eq!(list[0]["agent_id"], AGENT);
    // JWT-SVIDs are refused the same way.
    let client = WorkloadApiClient::connect_to(&addr).await.unwrap();
    let e = client
        .fetch_jwt_svid(["x"], None)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains(&req), "{e}");

    let decide = |args: &[&str]| -> std::process::Output {
        if root {
            as_gid(&c, APPROVERS, args)
        } else {
            c.server_cli(args)
        }
    };
    if root {
        // Not an approver: root with gid 0 is refused, nothing changes.
        let (ok, err) = cli_err(&c, &["approval", "grant", &req, "--for", "1h"]);
        assert!(!ok && err.contains("approvers_gid"), "{err}");
        let list = json(&c.server_ok(&["approval", "list", "--output", "json"]));
        assert_eq!(list[0]["status"], "pending");
    }
    // Bad input names the field.
    let (ok, err) = cli_err(&c, &["approval", "grant", &req, "--for", "nonsense"]);
    assert!(!ok && err.contains("--for"), "{err}");

    // Denied: the workload is told so.
    let out = decide(&["approval", "deny", &req]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eventually("the workload sees the denial", LONG, || async {
        match x509(&addr).await {
            Err(e) if e.contains("denied") && e.contains(&req) => Some(()),
            _ => None,
        }
    })
    .await;

    // Then granted, briefly: the workload gets its SVID, capped at the grant.
    let out = decide(&["approval", "grant", &req, "--for", "6s", "--output", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let granted = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(granted["status"], "granted");
    let mut stream = eventually("an SVID under the grant", LONG, || async {
        let mut s = client.stream_x509_contexts().await.ok()?;
        match s.next().await {
            Some(Ok(ctx)) => Some((s, ctx)),
            _ => None,
        }
    })
    .await;
    let svid = stream.1.default_svid().unwrap();
    assert_eq!(
        svid.spiffe_id().to_string(),
        "spiffe://example.org/payments-agent"
    );
    let grant_end = now() + 6;
    assert!(not_after(svid.leaf().as_ref()) <= grant_end);
    // At the grant's end the open stream loses the identity ...
    let until = time_of(granted["expires_at"].as_str().unwrap());
    withdrawn(&mut stream.0, "spiffe://example.org/payments-agent", until).await;
    // ... and a new request is needed.
    let msg = eventually("a new pending request", LONG, || async {
        match x509(&addr).await {
            Err(e) if e.contains("pending") && !e.contains(&req) => Some(e),
            _ => None,
        }
    })
    .await;
    let req2 = request_id(&msg);
    let list = json(&c.server_ok(&["approval", "list", "--output", "json"]));
    let status = |id: &str| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|a| a["id"] == id)
            .map(|a| a["status"].clone())
    };
    assert_eq!(status(&req), Some("expired".into()), "{list}");
    assert_eq!(status(&req2), Some("pending".into()), "{list}");

    // The audit trail has the request, the denial and the grant, the
    // decisions with the approver's uid and gid.
    let audit = c.server_ok(&["audit", "export"]);
    let records: Vec<Value> = audit.lines().map(json).collect();
    let find = |kind: &str| {
        records
            .iter()
            .find(|r| r["event"]["kind"] == kind && r["event"]["request_id"] == req.as_str())
            .unwrap_or_else(|| panic!("no {kind} record in {audit}"))
    };
    find("approval_requested");
    let granted = find("approval_granted");
    find("approval_denied");
    assert_eq!(granted["caller"]["kind"], "admin", "{granted}");
    assert_eq!(granted["caller"]["uid"], my_uid());
    if root {
        assert_eq!(granted["caller"]["gid"], APPROVERS);
    }
}

/// The review row of entry `id` with `--unused-for 1s`, once it appears.
async fn used_row_within(c: &Cluster, id: &str) -> Value {
    eventually("the entry flagged as unused for 1s", LONG, || async {
        let rows =
            json(&c.server_ok(&["entry", "review", "--unused-for", "1s", "--output", "json"]));
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == id)
            .cloned()
    })
    .await
}

#[tokio::test]
async fn the_access_review_lists_each_entry_and_agent_with_its_reasons() {
    let mut c = Cluster::start_with("review_max_ttl = \"12h\"\n");
    c.start_agent(AGENT);
    let uid = my_uid_selector();
    let used = c.create_entry(
        "spiffe://example.org/used",
        &["--selector", &uid, "--owner", "team-a"],
    );
    let idle = c.create_entry(
        "spiffe://example.org/idle",
        &["--selector", "unix:uid:4242", "--owner", "team-b"],
    );
    let soon = c.create_entry(
        "spiffe://example.org/soon",
        &[
            "--selector",
            "unix:uid:4243",
            "--owner",
            "team-c",
            "--expires-at",
            &sigil_core::rfc3339(now() + 86_400),
        ],
    );
    let long = c.create_entry(
        "spiffe://example.org/long-ttl",
        &["--selector", "unix:uid:4244", "--x509-ttl", "2d"],
    );
    let orphan = c.server_ok(&[
        "entry",
        "create",
        "--parent-id",
        "spiffe://example.org/decommissioned",
        "--spiffe-id",
        "spiffe://example.org/orphan",
        "--selector",
        "unix:uid:1",
        "--owner",
        "team-d",
        "--output",
        "json",
    ]);
    let orphan = json(&orphan)["id"].as_str().unwrap().to_string();
    let addr = c.api_addr();
    eventually("the used entry's SVID", LONG, || async {
        x509(&addr).await.ok().filter(|v| !v.is_empty())
    })
    .await;
    // Every entry of the live agent was minted for.
    let rows = eventually("the agent's entries used", LONG, || async {
        let rows = json(&c.server_ok(&["entry", "review", "--output", "json"]));
        let all_used = rows
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| {
                [&long, &soon, &idle]
                    .iter()
                    .any(|id| r["id"] == id.as_str())
            })
            .all(|r| {
                !r["reasons"]
                    .as_array()
                    .unwrap()
                    .contains(&"never_used".into())
            });
        all_used.then_some(rows)
    })
    .await;
    let reasons = |id: &str| -> Option<Vec<String>> {
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == id)
            .map(|r| {
                r["reasons"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|s| s.as_str().unwrap().to_string())
                    .collect()
            })
    };
    assert_eq!(
        reasons(&used),
        None,
        "a used, owned entry is not flagged: {rows}"
    );
    // The agent mints for every entry it is given, so an entry under a live
    // agent counts as used; one whose parent never attested does not.
    assert_eq!(reasons(&idle), None, "{rows}");
    assert_eq!(reasons(&soon).unwrap(), ["expiring"]);
    assert_eq!(reasons(&long).unwrap(), ["no_owner", "ttl_above_max"]);
    assert_eq!(
        reasons(&orphan).unwrap(),
        ["never_used", "parent_agent_gone"]
    );
    let row = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == soon.as_str())
        .unwrap();
    assert_eq!(row["owner"], "team-c");
    assert_eq!(row["spiffe_id"], "spiffe://example.org/soon");
    assert!(row["expires_at"].as_str().unwrap().ends_with('Z'));
    assert!(row["last_used_at"].as_str().unwrap().ends_with('Z'));
    let orphan_row = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == orphan.as_str())
        .unwrap();
    assert!(orphan_row["last_used_at"].is_null());
    // A window shorter than the time left drops `expiring`.
    let rows = json(&c.server_ok(&[
        "entry",
        "review",
        "--expiring-within",
        "1h",
        "--output",
        "json",
    ]));
    assert!(
        rows.as_array()
            .unwrap()
            .iter()
            .all(|r| r["id"] != soon.as_str()),
        "{rows}"
    );
    // The used entry's last use is recorded: with a 1s period it is
    // flagged as soon as a second has passed.
    let used_row = used_row_within(&c, &used).await;
    assert_eq!(
        used_row["reasons"],
        serde_json::json!(["unused_for_period"])
    );
    assert!(used_row["last_used_at"].as_str().unwrap().ends_with('Z'));

    // Agents: attested with a join token only, then banned.
    let agents = json(&c.server_ok(&["agent", "review", "--output", "json"]));
    assert_eq!(agents[0]["id"], AGENT);
    assert_eq!(agents[0]["reasons"], serde_json::json!(["join_token_only"]));
    assert!(agents[0]["last_seen_at"].as_str().unwrap().ends_with('Z'));
    c.server_ok(&["agent", "ban", AGENT]);
    let agents = json(&c.server_ok(&["agent", "review", "--output", "json"]));
    assert_eq!(
        agents[0]["reasons"],
        serde_json::json!(["join_token_only", "banned"])
    );
    let rows = json(&c.server_ok(&["entry", "review", "--output", "json"]));
    let used_row = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == used.as_str())
        .unwrap();
    assert_eq!(
        used_row["reasons"],
        serde_json::json!(["parent_agent_banned"])
    );
    // Marks survive a restart (flushed at shutdown).
    c.stop_server();
    c.start_server();
    let used_row = used_row_within(&c, &used).await;
    assert!(used_row["last_used_at"].as_str().is_some(), "{used_row}");
    // Bad input names the flag.
    let (ok, err) = cli_err(&c, &["entry", "review", "--unused-for", "soon"]);
    assert!(!ok && err.contains("--unused-for"), "{err}");
}
