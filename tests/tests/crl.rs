//! End-to-end: a kill reaches relying parties through CRLs. The server
//! signs a CRL of the killed, unexpired serials; the agent delivers it in
//! the Workload API's `crl` fields; the example mTLS service (examples/)
//! refuses a killed client that still presents its unexpired certificate
//! (as a stolen or offline copy would), `openssl verify -crl_check` agrees,
//! and a lift lets the same certificate in again.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a test failure"
)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use sigil_tests::{
    Cluster, agent_fetch_x509, bin, free_port, my_uid_selector, path_selector, wait_for,
};

const LONG: Duration = Duration::from_secs(30);
const CLIENT: &str = "spiffe://example.org/echo-client";
const OBSERVER: &str = "spiffe://example.org/observer";

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `sigil-agent api fetch x509 --write DIR` (run as the `sigil-agent`
/// binary, so the entries with its path match): the SPIFFE IDs in the
/// order of the written files.
fn fetch(c: &Cluster, dir: &Path) -> Vec<String> {
    let out = agent_fetch_x509(&c.api_addr(), Some(dir));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("SPIFFE ID:"))
        .map(|l| l.trim().to_string())
        .collect()
}

/// The written certificate file of `id`.
fn svid_file(dir: &Path, ids: &[String], id: &str) -> (PathBuf, PathBuf) {
    let i = ids.iter().position(|x| x == id).unwrap();
    let suffix = if i == 0 {
        String::new()
    } else {
        format!(".{i}")
    };
    (
        dir.join(format!("svid{suffix}.pem")),
        dir.join(format!("svid{suffix}.key")),
    )
}

/// One connection to the mTLS service with openssl as the client,
/// presenting `cert`/`key`: the service's answer, if it accepted us.
fn connect(port: u16, cert: &Path, key: &Path) -> Option<String> {
    let mut child = Command::new("timeout")
        .arg("20")
        .arg("openssl")
        .args(["s_client", "-quiet", "-connect"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("-cert")
        .arg(cert)
        .arg("-key")
        .arg(key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"hi\n").unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    text.contains("hello ").then_some(text)
}

fn openssl_verify(dir: &Path, crl: &Path, cert: &Path) -> Output {
    Command::new("openssl")
        .args(["verify", "-crl_check", "-CAfile"])
        .arg(dir.join("bundle.pem"))
        .arg("-CRLfile")
        .arg(crl)
        .arg(cert)
        .output()
        .unwrap()
}

#[test]
fn a_killed_client_is_refused_by_crl_and_openssl_agrees_until_the_kill_is_lifted() {
    let c = Cluster::with_agent();
    let uid = my_uid_selector();
    for (id, exe) in [
        ("spiffe://example.org/echo-server", "mtls-server"),
        (CLIENT, "sigil-agent"),
        (OBSERVER, "sigil-agent"),
    ] {
        c.create_entry(id, &["--selector", &uid, "--selector", &path_selector(exe)]);
    }

    // The client's certificate, key and CRLs, fetched before the kill.
    let before = c.dir.0.join("before");
    let ids = wait_fetch(&c, &before, 2);
    let (cert, key) = svid_file(&before, &ids, CLIENT);
    let (observer_cert, _) = svid_file(&before, &ids, OBSERVER);
    let crl_before = before.join("crl.pem");
    assert!(crl_before.exists(), "no crl.pem written");
    let v = openssl_verify(&before, &crl_before, &cert);
    assert!(v.status.success(), "{v:?}");

    // The service admits the client.
    let port = free_port();
    let log = c.dir.0.join("mtls-server.log");
    let server = Server(
        Command::new(bin("mtls-server"))
            .args(["--socket", &c.api_addr(), "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .args(["--allow", CLIENT])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_for("mtls-server listening", LONG, || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let answer = connect(port, &cert, &key).expect("the live client is refused");
    assert!(answer.contains(&format!("hello {CLIENT}")), "{answer}");

    // Kill the client's identity; its certificate has not expired.
    let out = c.server_ok(&[
        "kill",
        "--spiffe-id",
        CLIENT,
        "--reason",
        "stolen key",
        "--output",
        "json",
    ]);
    let kill: serde_json::Value = serde_json::from_str(&out).unwrap();
    let kill_id = kill["id"].as_str().unwrap().to_string();
    let t0 = Instant::now();
    wait_for("the service to refuse the killed client", LONG, || {
        connect(port, &cert, &key).is_none()
    });
    println!(
        "killed client refused at a handshake {:?} after the kill returned",
        t0.elapsed()
    );
    let server_log = std::fs::read_to_string(&log).unwrap();
    assert!(server_log.contains("revoked"), "{server_log}");

    // openssl agrees with the CRL the agent now delivers; the observer's
    // certificate (same CA, not killed) still verifies.
    let after = c.dir.0.join("after");
    let ids = wait_fetch(&c, &after, 1);
    assert_eq!(ids, [OBSERVER]);
    let crl_after = after.join("crl.pem");
    let v = openssl_verify(&before, &crl_after, &cert);
    assert!(!v.status.success(), "{v:?}");
    let text = String::from_utf8_lossy(&v.stdout).to_string() + &String::from_utf8_lossy(&v.stderr);
    assert!(text.contains("revoked"), "{text}");
    let v = openssl_verify(&before, &crl_after, &observer_cert);
    assert!(v.status.success(), "{v:?}");

    // Lifting the kill takes the serial off the CRL: the same certificate
    // is admitted again.
    c.server_ok(&["kill", "lift", &kill_id]);
    wait_for("the service to admit the client again", LONG, || {
        connect(port, &cert, &key).is_some()
    });
    drop(server);
}

/// Fetches until `want` SVIDs are served (the agent mints after the
/// entries reach it).
fn wait_fetch(c: &Cluster, dir: &Path, want: usize) -> Vec<String> {
    let deadline = Instant::now() + LONG;
    loop {
        let _ = std::fs::remove_dir_all(dir);
        let out = agent_fetch_x509(&c.api_addr(), None);
        let n = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("SPIFFE ID:"))
            .count();
        if out.status.success() && n == want {
            return fetch(c, dir);
        }
        assert!(
            Instant::now() < deadline,
            "served {n} SVIDs, want {want}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
