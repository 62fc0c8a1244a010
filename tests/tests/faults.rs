//! End-to-end fault suite (issue 14): the real server and agent under
//! `kill -9`, a full disk, a damaged agent `data_dir` and long server
//! outages. Each test checks that nothing acknowledged is lost, nothing is
//! corrupted, the error says what went wrong, and the system recovers.
//! (The PostgreSQL faults are in ha_faults.rs.)

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a test failure"
)]

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use sigil_tests::{
    Cluster, Scratch, bin, eventually, fetch_x509_id, log_count, my_uid_selector, openssl, wait_for,
};

const LONG: Duration = Duration::from_secs(60);
const AGENT: &str = "spiffe://example.org/test-agent";

/// Waits until the Workload API at `addr` serves `spiffe://example.org/w`.
async fn served(addr: &str, what: &str) {
    eventually(what, LONG, || async {
        fetch_x509_id(addr)
            .await
            .ok()
            .filter(|id| id == "spiffe://example.org/w")
    })
    .await;
}

fn sigkill(pid: u32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
}

/// `entry list --output json`: entry ID → entry.
fn entry_ids(c: &Cluster) -> BTreeSet<String> {
    let v: serde_json::Value =
        serde_json::from_str(&c.server_ok(&["entry", "list", "--output", "json"])).unwrap();
    v["entries"]
        .as_array()
        .expect("entry list has entries")
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect()
}

/// One `entry create` as a separate CLI process; the entry ID when the
/// server acknowledged it, else the CLI's stderr.
fn create(sock: &Path, parent: &str, spiffe_id: &str) -> Result<String, String> {
    let out = Command::new(bin("sigil-server"))
        .args([
            "entry",
            "create",
            "--parent-id",
            parent,
            "--spiffe-id",
            spiffe_id,
            "--selector",
            "unix:uid:4242",
            "--output",
            "json",
        ])
        .env("SIGIL_ADMIN_SOCKET", sock)
        .output()
        .unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("a successful entry create prints its entry");
    Ok(v["id"].as_str().unwrap().to_string())
}

/// The IDs of the entries the audit trail records as created.
fn audited_creations(c: &Cluster) -> BTreeSet<String> {
    c.server_ok(&["audit", "export"])
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["event"]["kind"] == "entry_created")
                .then(|| v["event"]["entry_id"].as_str().unwrap().to_string())
        })
        .collect()
}

#[test]
fn kill_9_during_entry_writes_loses_no_acknowledged_entry() {
    let mut c = Cluster::start();
    let sock = c.admin_socket();
    let acked = Arc::new(AtomicUsize::new(0));
    let count = acked.clone();
    let writer = std::thread::spawn(move || {
        let mut ids = Vec::new();
        for i in 0..5000 {
            match create(
                &sock,
                "spiffe://example.org/node",
                &format!("spiffe://example.org/w/{i}"),
            ) {
                Ok(id) => {
                    ids.push(id);
                    count.fetch_add(1, Ordering::SeqCst);
                }
                Err(e) => return (ids, Some(e)),
            }
        }
        (ids, None)
    });
    wait_for("30 acknowledged entries", LONG, || {
        acked.load(Ordering::SeqCst) >= 30
    });
    sigkill(c.server_pid().unwrap());
    let (ids, failure) = writer.join().unwrap();
    assert!(failure.is_some(), "the writer outlived the server");
    c.stop_server(); // reaps the killed process

    // The datastore opens again and holds every acknowledged entry, and at
    // most the one in flight besides; the audit trail still verifies and
    // records exactly the entries stored.
    c.start_server();
    let stored = entry_ids(&c);
    for id in &ids {
        assert!(stored.contains(id), "acknowledged entry {id} lost");
    }
    assert!(
        stored.len() == ids.len() || stored.len() == ids.len() + 1,
        "{} stored, {} acknowledged",
        stored.len(),
        ids.len()
    );
    c.server_ok(&["audit", "verify"]);
    let created = audited_creations(&c);
    assert_eq!(
        created, stored,
        "entries stored vs entries the audit trail records"
    );
    // And it takes writes again.
    create(
        &c.admin_socket(),
        "spiffe://example.org/node",
        "spiffe://example.org/after",
    )
    .unwrap();
}

/// The `kid`s of the JWT keys in the server's SPIFFE bundle.
fn bundle_kids(c: &Cluster) -> BTreeSet<String> {
    let v: serde_json::Value =
        serde_json::from_str(&c.server_ok(&["bundle", "show", "--format", "spiffe"])).unwrap();
    v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["use"] == "jwt-svid")
        .map(|k| k["kid"].as_str().unwrap().to_string())
        .collect()
}

/// The `kid` in a compact JWS's header.
fn jwt_kid(token: &str) -> String {
    use base64::Engine;
    let header = token.split('.').next().unwrap();
    let header = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&header).unwrap();
    v["kid"].as_str().unwrap().to_string()
}

fn pem(label: &str, der: &[u8]) -> String {
    pem::encode(&pem::Pem::new(label, der.to_vec()))
}

/// Fetches this process's X.509-SVID and a JWT-SVID through the agent and
/// checks both against the server's current bundle: the chain verifies
/// with `openssl verify` against the bundle's X.509 authorities only, and
/// the token's `kid` is one of the bundle's JWT keys.
async fn check_served_against_bundle(c: &Cluster, scratch: &Path, round: usize) {
    let addr = c.api_addr();
    let client = spiffe::WorkloadApiClient::connect_to(&addr).await.unwrap();
    let svid = eventually("an X.509-SVID", LONG, || async {
        client.fetch_x509_svid().await.ok()
    })
    .await;
    let jwt = eventually("a JWT-SVID", LONG, || async {
        client.fetch_jwt_svid(&["faults"], None).await.ok()
    })
    .await;
    let dir = scratch.join(format!("round-{round}"));
    fs::create_dir_all(&dir).unwrap();
    let chain = svid.cert_chain();
    fs::write(dir.join("leaf.pem"), pem("CERTIFICATE", chain[0].as_ref())).unwrap();
    let rest: String = chain[1..]
        .iter()
        .map(|cert| pem("CERTIFICATE", cert.as_ref()))
        .collect();
    fs::write(dir.join("chain.pem"), rest).unwrap();
    fs::write(dir.join("bundle.pem"), c.server_ok(&["bundle", "show"])).unwrap();
    let mut args = vec!["verify", "-CAfile", "bundle.pem"];
    if chain.len() > 1 {
        args.extend(["-untrusted", "chain.pem"]);
    }
    args.push("leaf.pem");
    openssl(&dir, &args);
    let kid = jwt_kid(jwt.token());
    let kids = bundle_kids(c);
    assert!(
        kids.contains(&kid),
        "round {round}: JWT-SVID signed by {kid}, not in the bundle's {kids:?}"
    );
}

#[tokio::test]
async fn kill_9_during_key_rotation_leaves_no_served_svid_without_its_key_in_the_bundle() {
    // Keys that rotate every few seconds: a successor is made at half of a
    // key's 24 s life and activated at five sixths.
    let mut c = Cluster::start_with(
        "ca_ttl = \"24s\"\ndefault_x509_svid_ttl = \"4s\"\ndefault_jwt_svid_ttl = \"4s\"\nagent_svid_ttl = \"6s\"\n",
    );
    c.start_agent(AGENT);
    c.create_entry(
        "spiffe://example.org/w",
        &["--selector", &my_uid_selector()],
    );
    let scratch = Scratch::new("faults-rotation");
    check_served_against_bundle(&c, &scratch.0, 0).await;
    let dir = c.dir.0.clone();
    for round in 1..=4 {
        // Kill the server right after it generated a key, the moment
        // between making it and persisting it.
        let seen = log_count(&dir, "server.log", "generated X.509 CA")
            + log_count(&dir, "server.log", "generated JWT key");
        eventually("the server to generate a key", LONG, || async {
            (log_count(&dir, "server.log", "generated X.509 CA")
                + log_count(&dir, "server.log", "generated JWT key")
                > seen)
                .then_some(())
        })
        .await;
        sigkill(c.server_pid().unwrap());
        c.stop_server();
        c.start_server();
        // What the agent serves now (minted before or after the kill) is
        // signed by keys the restarted server still publishes.
        check_served_against_bundle(&c, &scratch.0, round).await;
    }
    assert_eq!(log_count(&dir, "server.log", "panicked"), 0, "{}", c.logs());
}

/// A tmpfs of `size` mounted at `dir`, unmounted on drop.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    /// `None` (and a note) when this process may not mount: the test then
    /// has nothing to run on. As root (CI) the mount must work.
    fn mount(dir: &Path, size: &str) -> Option<Self> {
        fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .output()
            .unwrap();
        if out.status.success() {
            return Some(Tmpfs(dir.to_path_buf()));
        }
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            sigil_tests::my_uid() != 0,
            "root could not mount a tmpfs: {err}"
        );
        eprintln!("skipped: mounting a tmpfs needs root ({err})");
        None
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the filesystem holding `dir` with `filler` until a write fails.
fn fill(filler: &Path) {
    use std::io::Write;
    let mut f = fs::File::create(filler).unwrap();
    let block = vec![0u8; 4096];
    while f.write_all(&block).and_then(|()| f.sync_data()).is_ok() {}
}

#[tokio::test]
async fn a_full_disk_fails_writes_clearly_keeps_serving_and_corrupts_nothing() {
    let mut c = Cluster::configured("");
    let data = c.dir.0.join("server");
    let Some(_mount) = Tmpfs::mount(&data, "24m") else {
        return;
    };
    c.start_server();
    c.start_agent(AGENT);
    c.create_entry(
        "spiffe://example.org/w",
        &["--selector", &my_uid_selector()],
    );
    let addr = c.api_addr();
    served(&addr, "the SVID").await;
    let before = entry_ids(&c);

    // The disk fills up: the next writes fail, saying why.
    let filler = data.join("filler");
    fill(&filler);
    let sock = c.admin_socket();
    let mut acked = Vec::new();
    let mut err = None;
    for i in 0..200 {
        match create(&sock, AGENT, &format!("spiffe://example.org/full/{i}")) {
            Ok(id) => acked.push(id),
            Err(e) => {
                err = Some(e);
                break;
            }
        }
    }
    let err = err.expect("200 entries were written to a full disk");
    println!("entry create on a full disk: {err}");
    assert!(
        err.to_lowercase().contains("no space") || err.to_lowercase().contains("storage full"),
        "the error does not say the disk is full: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");

    // Reads keep working: the admin API lists entries, the agent keeps
    // its SVIDs and the Workload API serves them.
    let listed = entry_ids(&c);
    for id in before.iter().chain(&acked) {
        assert!(
            listed.contains(id),
            "entry {id} gone while the disk was full"
        );
    }
    c.server_ok(&["healthcheck"]);
    assert_eq!(
        fetch_x509_id(&addr).await.unwrap(),
        "spiffe://example.org/w"
    );

    // Space again: writes work without a restart...
    fs::remove_file(&filler).unwrap();
    let after = eventually("a write after space is freed", LONG, || async {
        create(&sock, AGENT, "spiffe://example.org/after-full").ok()
    })
    .await;
    let new_addr = c.api_addr();
    c.create_entry(
        "spiffe://example.org/w2",
        &["--selector", &my_uid_selector()],
    );
    eventually("an SVID minted after the disk was full", LONG, || async {
        let ids = sigil_tests::x509_ids(&new_addr).await?;
        ids.contains(&"spiffe://example.org/w2".to_string())
            .then_some(())
    })
    .await;
    // ...and after a restart the datastore opens with everything
    // acknowledged, and the audit trail verifies.
    c.stop_server();
    c.start_server();
    let stored = entry_ids(&c);
    for id in before.iter().chain(&acked).chain([&after]) {
        assert!(stored.contains(id), "acknowledged entry {id} lost");
    }
    c.server_ok(&["audit", "verify"]);
    assert_eq!(log_count(&c.dir.0, "server.log", "panicked"), 0);
}

/// Waits (bounded) for an agent process to exit; its status.
fn wait_exit(child: &mut std::process::Child, limit: Duration) -> std::process::ExitStatus {
    let start = std::time::Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        assert!(
            start.elapsed() < limit,
            "the agent did not exit within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn the_agent_survives_its_data_dir_deleted_and_refuses_a_corrupt_identity_clearly() {
    // Agent SVIDs renew every ~3 s, so the agent writes its data_dir often.
    let mut c = Cluster::start_with("agent_svid_ttl = \"6s\"\n");
    c.start_agent(AGENT);
    c.create_entry(
        "spiffe://example.org/w",
        &["--selector", &my_uid_selector()],
    );
    let addr = c.api_addr();
    let dir = c.dir.0.clone();
    let data = dir.join("agent/data");
    served(&addr, "the SVID").await;

    // While running: data_dir disappears. The agent keeps serving, and
    // the next renewal puts its identity back on disk.
    fs::remove_dir_all(&data).unwrap();
    let renewed = log_count(&dir, "agent.log", "renewed agent SVID");
    eventually("a renewal after data_dir was deleted", LONG, || async {
        (log_count(&dir, "agent.log", "renewed agent SVID") > renewed).then_some(())
    })
    .await;
    for f in ["agent_svid.key", "agent_svid.pem", "bundle.pem"] {
        assert!(data.join(f).is_file(), "{f} not written back");
    }
    assert_eq!(
        fetch_x509_id(&addr).await.unwrap(),
        "spiffe://example.org/w"
    );
    // What it wrote back is a usable identity: a restart without a token
    // comes up from it.
    c.restart_agent();
    served(&addr, "the SVID after the restart").await;

    // At start: a corrupt agent SVID file. The agent says which file and
    // what to do, and exits; it does not panic or silently start over.
    c.stop_agent();
    fs::write(data.join("agent_svid.pem"), "not a certificate\n").unwrap();
    let mut child = c.spawn_agent(None);
    let status = wait_exit(&mut child, LONG);
    assert!(!status.success());
    let log = fs::read_to_string(dir.join("agent.log")).unwrap();
    let tail = &log[log
        .rfind("agent_svid.pem")
        .expect("the log names agent_svid.pem")..];
    println!(
        "corrupt identity at start: {}",
        tail.lines().next().unwrap()
    );
    assert!(log.contains("--join-token"), "no recovery path given");
    assert_eq!(log_count(&dir, "agent.log", "panicked"), 0, "{log}");

    // The recovery path it names works: the old registration is evicted
    // and a new join token attests again.
    c.server_ok(&["agent", "evict", AGENT]);
    c.start_agent(AGENT);
    served(&addr, "the SVID after re-attesting").await;
}

/// Debian's libfaketime, which fakes the wall clock of the process it is
/// preloaded into.
fn libfaketime() -> std::path::PathBuf {
    fs::read_dir("/usr/lib")
        .unwrap()
        .filter_map(Result::ok)
        .map(|d| d.path().join("faketime/libfaketime.so.1"))
        .find(|p| p.is_file())
        .expect("libfaketime is missing: `scripts/install-deps test` installs it")
}

/// notAfter of the X.509-SVID the agent serves now, if it serves one.
async fn served_not_after(addr: &str) -> Option<i64> {
    let client = spiffe::WorkloadApiClient::connect_to(addr).await.ok()?;
    let svid = client.fetch_x509_svid().await.ok()?;
    let (_, leaf) = x509_parser::parse_x509_certificate(svid.leaf().as_ref()).ok()?;
    Some(leaf.validity().not_after.timestamp())
}

/// Steps the agent's clock to `offset` (libfaketime syntax, e.g. `-3600`)
/// and checks, until `window` has passed and the agent has answered once
/// after it, that every SVID it serves is unexpired by the real clock.
async fn step_and_watch(addr: &str, clock: &Path, offset: &str, window: Duration) {
    fs::write(clock, format!("{offset}\n")).unwrap();
    let until = sigil_core::now_unix() + window.as_secs() as i64;
    let mut answered_after = false;
    while !answered_after {
        let now = sigil_core::now_unix();
        if let Some(not_after) = served_not_after(addr).await {
            assert!(
                not_after > sigil_core::now_unix(),
                "clock stepped {offset}: the agent served an SVID that expired at {not_after} (now {now})"
            );
        }
        answered_after = now > until;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test]
async fn a_stepped_agent_clock_never_keeps_an_expired_svid_in_use_and_the_agent_recovers() {
    // SVIDs of 8 s; the agent's wall clock is faked (its monotonic clock
    // is not, as when NTP or an operator steps a real clock).
    let mut c = Cluster::start_with("default_x509_svid_ttl = \"8s\"\n");
    let clock = c.dir.0.join("agent-clock");
    fs::write(&clock, "+0\n").unwrap();
    c.agent_env = vec![
        ("LD_PRELOAD".into(), libfaketime().display().to_string()),
        (
            "FAKETIME_TIMESTAMP_FILE".into(),
            clock.display().to_string(),
        ),
        ("FAKETIME_NO_CACHE".into(), "1".into()),
        ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
    ];
    c.start_agent(AGENT);
    c.create_entry(
        "spiffe://example.org/w",
        &["--selector", &my_uid_selector()],
    );
    let addr = c.api_addr();
    let dir = c.dir.0.clone();
    for offset in ["-3600", "+3600"] {
        eventually("a valid SVID", LONG, || async {
            served_not_after(&addr)
                .await
                .filter(|t| *t > sigil_core::now_unix())
        })
        .await;
        // Three SVID lifetimes with the clock an hour off: whatever the
        // agent serves is still valid by the real clock.
        step_and_watch(&addr, &clock, offset, Duration::from_secs(24)).await;
        // Back to the right time: it serves fresh SVIDs again.
        fs::write(&clock, "+0\n").unwrap();
    }
    eventually("a valid SVID after the clock is right", LONG, || async {
        served_not_after(&addr)
            .await
            .filter(|t| *t > sigil_core::now_unix())
    })
    .await;
    for needle in ["clock differs from the server", "NotValidYet", "Expired"] {
        println!(
            "agent log lines with {needle:?}: {}",
            log_count(&dir, "agent.log", needle)
        );
    }
    assert!(
        log_count(&dir, "agent.log", "clock differs from the server") > 0
            || log_count(&dir, "agent.log", "NotValidYet") > 0
            || log_count(&dir, "agent.log", "Expired") > 0,
        "the agent never said what was wrong with its clock:\n{}",
        c.logs()
    );
    assert_eq!(log_count(&dir, "agent.log", "panicked"), 0);
}

#[tokio::test]
async fn an_x509pop_agent_outlives_a_server_outage_longer_than_its_svids_and_comes_back() {
    // Workload SVIDs of 4 s, agent SVIDs of 6 s; the agent attests by
    // x509pop, so it can attest again on its own.
    let pki = Scratch::new("faults-nodepki");
    sigil_tests::pki::x509pop_node(&pki.0, "nodeca", "node-1");
    let mut c = Cluster::start_with(&format!(
        "agent_svid_ttl = \"6s\"\ndefault_x509_svid_ttl = \"4s\"\n[x509pop]\nca_bundle_path = \"{}/nodeca.pem\"\n",
        pki.0.display()
    ));
    c.start_agent_configured(&format!(
        "node_attestor = \"x509pop\"\n[x509pop]\ncert_path = \"{d}/node-1.pem\"\nkey_path = \"{d}/node-1.key\"\n",
        d = pki.0.display()
    ));
    let agent_id = c.agents_json()["agents"][0]["spiffe_id"]
        .as_str()
        .unwrap()
        .to_string();
    c.create_entry_under(
        &agent_id,
        "spiffe://example.org/w",
        &["--selector", &my_uid_selector()],
    );
    let addr = c.api_addr();
    served(&addr, "the SVID").await;

    // The server is away longer than both lifetimes: the agent withdraws
    // the expired workload SVID, and its own SVID runs out.
    c.stop_server();
    let err = eventually("the expired SVID to be withdrawn", LONG, || async {
        fetch_x509_id(&addr).await.err()
    })
    .await;
    println!("while the server is away: {err}");
    let dir = c.dir.0.clone();
    eventually("the agent SVID to expire", LONG, || async {
        let raw = fs::read(dir.join("agent/data/agent_svid.pem")).ok()?;
        let cert = pem::parse(raw).ok()?;
        let (_, x) = x509_parser::parse_x509_certificate(cert.contents()).ok()?;
        (x.validity().not_after.timestamp() < sigil_core::now_unix()).then_some(())
    })
    .await;
    // Once the server is back the agent attests again and serves.
    c.start_server();
    served(&addr, "the SVID after the outage").await;
    assert!(log_count(&dir, "agent.log", "the agent SVID expired: attesting again") > 0);
    assert_eq!(log_count(&dir, "agent.log", "panicked"), 0);
}

#[tokio::test]
async fn an_agent_restarted_while_the_server_is_down_serves_nothing_until_it_resyncs() {
    // Workload private keys never touch the agent's disk: only its own
    // identity and the bundle are stored. An agent restarted during an
    // outage therefore comes up on its stored identity, serves no SVID
    // (and so no stale or expired one), and serves again once it syncs.
    let mut c = Cluster::start();
    c.start_agent(AGENT);
    c.create_entry(
        "spiffe://example.org/w",
        &["--selector", &my_uid_selector()],
    );
    let addr = c.api_addr();
    served(&addr, "the SVID").await;
    let data = c.dir.0.join("agent/data");
    let stored: BTreeSet<String> = fs::read_dir(&data)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    // Nothing but the agent's own identity and trust material on disk.
    for name in &stored {
        let text = fs::read_to_string(data.join(name)).unwrap_or_default();
        assert!(
            !text.contains("spiffe://example.org/w"),
            "{name} in the agent's data_dir holds the workload's identity"
        );
    }

    c.stop_server();
    let dir = c.dir.0.clone();
    let before = log_count(&dir, "agent.log", "sync stream failed");
    // Restarted from its stored identity (no token) while the server is away.
    c.respawn_agent();
    eventually("the restarted agent to try the server", LONG, || async {
        (log_count(&dir, "agent.log", "sync stream failed") > before).then_some(())
    })
    .await;
    // Once its socket is up it answers at once (a status, not a hang).
    let err = eventually("the Workload API to answer", LONG, || async {
        fetch_x509_id(&addr)
            .await
            .err()
            .filter(|e| !e.contains("transport error"))
    })
    .await;
    println!("restarted while the server is away: {err}");
    assert!(err.contains("not synced"), "{err}");

    c.start_server();
    served(&addr, "the SVID after the server is back").await;
    assert_eq!(log_count(&dir, "agent.log", "panicked"), 0);
}
