//! End-to-end: the example mTLS service and client (examples/) authenticate
//! each other with SVIDs from real agents, across SVID rotation, and accept a
//! peer from a federated trust domain only when it is allowed.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a test failure"
)]

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use sigil_tests::{Cluster, bin, free_port, my_uid_selector, path_selector};

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_server(socket: &str, port: u16, allow: &[&str]) -> Server {
    let mut cmd = Command::new(bin("mtls-server"));
    cmd.args(["--socket", socket, "--listen", &format!("127.0.0.1:{port}")]);
    for a in allow {
        cmd.args(["--allow", a]);
    }
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    sigil_tests::wait_for("mtls-server listening", Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    Server(child)
}

fn client(socket: &str, port: u16, server_id: &str, count: u32) -> (bool, String) {
    let out = Command::new(bin("mtls-client"))
        .args([
            "--socket",
            socket,
            "--connect",
            &format!("127.0.0.1:{port}"),
            "--server-id",
            server_id,
            "--count",
            &count.to_string(),
            "--interval-ms",
            "500",
        ])
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn example_service_and_client_authenticate_by_spiffe_id_across_rotation() {
    let c = Cluster::with_agent();
    let uid = my_uid_selector();
    c.create_entry(
        "spiffe://example.org/echo-server",
        &[
            "--selector",
            &uid,
            "--selector",
            &path_selector("mtls-server"),
            "--x509-ttl",
            "4s",
        ],
    );
    c.create_entry(
        "spiffe://example.org/echo-client",
        &[
            "--selector",
            &uid,
            "--selector",
            &path_selector("mtls-client"),
            "--x509-ttl",
            "4s",
        ],
    );
    let socket = c.api_addr();
    let port = free_port();
    let _server = start_server(&socket, port, &["spiffe://example.org/echo-client"]);

    // 16 connections over ~8 s: both SVIDs rotate (4 s TTL, renewed at 2 s) several times.
    let (ok, out) = client(&socket, port, "spiffe://example.org/echo-server", 16);
    assert!(ok, "{out}");
    assert_eq!(
        out.lines().filter(|l| l.starts_with("ok ")).count(),
        16,
        "{out}"
    );
    assert!(
        out.contains(
            "hello spiffe://example.org/echo-client, from spiffe://example.org/echo-server"
        ),
        "{out}"
    );

    // The client refuses a server with another identity.
    let (ok, out) = client(&socket, port, "spiffe://example.org/someone-else", 1);
    assert!(!ok, "{out}");
    assert!(out.contains("not allowed"), "{out}");

    // The server refuses a client that is not on its allow-list.
    let port2 = free_port();
    let _strict = start_server(&socket, port2, &["spiffe://example.org/nobody"]);
    let (ok, out) = client(&socket, port2, "spiffe://example.org/echo-server", 1);
    assert!(!ok, "{out}");
}

fn exchange_bundles(a: &Cluster, b: &Cluster) {
    for (on, from) in [(a, b), (b, a)] {
        let path = on.dir.0.join(format!("{}.pem", from.trust_domain));
        std::fs::write(&path, from.server_ok(&["bundle", "show"])).unwrap();
        on.server_ok(&[
            "bundle",
            "set",
            "--id",
            &format!("spiffe://{}", from.trust_domain),
            "--format",
            "pem",
            "--path",
            path.to_str().unwrap(),
        ]);
    }
}

#[test]
fn a_federated_peer_is_accepted_only_when_allowed() {
    let mut a = Cluster::start_td("example.org", "");
    a.start_agent("spiffe://example.org/agent-a");
    let mut b = Cluster::start_td("other.org", "");
    b.start_agent("spiffe://other.org/agent-b");
    exchange_bundles(&a, &b);
    let uid = my_uid_selector();
    a.create_entry(
        "spiffe://example.org/echo-server",
        &[
            "--selector",
            &uid,
            "--selector",
            &path_selector("mtls-server"),
            "--federates-with",
            "spiffe://other.org",
        ],
    );
    b.create_entry(
        "spiffe://other.org/partner",
        &[
            "--selector",
            &uid,
            "--selector",
            &path_selector("mtls-client"),
            "--federates-with",
            "spiffe://example.org",
        ],
    );

    let allowed_port = free_port();
    let _allowed = start_server(&a.api_addr(), allowed_port, &["spiffe://other.org/partner"]);
    let (ok, out) = client(
        &b.api_addr(),
        allowed_port,
        "spiffe://example.org/echo-server",
        2,
    );
    assert!(ok, "{out}");
    assert!(
        out.contains("hello spiffe://other.org/partner, from spiffe://example.org/echo-server"),
        "{out}"
    );

    let closed_port = free_port();
    let _closed = start_server(
        &a.api_addr(),
        closed_port,
        &["spiffe://example.org/echo-client"],
    );
    let (ok, out) = client(
        &b.api_addr(),
        closed_port,
        "spiffe://example.org/echo-server",
        1,
    );
    assert!(!ok, "a foreign peer must be refused unless allowed: {out}");
}
