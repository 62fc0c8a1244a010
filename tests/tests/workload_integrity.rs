//! End-to-end: an identity belongs to the attested process, not to its
//! connection. A child process (real `python3`, or a copy of it) connects
//! to the real agent's Workload API socket, using a socket this test shares
//! with it (so the test holds the same connection, as after a fork or
//! SCM_RIGHTS), then waits; the test speaks gRPC over it, so the agent's
//! peer is the child. Then:
//! - the child exits: the open `FetchX509SVID` stream ends with
//!   `PermissionDenied` (it would otherwise keep delivering the child's
//!   SVIDs to whoever holds the socket);
//! - the child's executable (a copy, pinned by `unix:sha256`) is modified
//!   on disk while it runs: the next fetch is refused and the open stream
//!   ends at the next update;
//! - a stream opened while the entries used only the socket's credentials
//!   (so the agent derived no `unix:path`, `unix:sha256` or
//!   `unix:supplementary_gid`) is re-attested when an entry starts to use
//!   them, and receives that entry's SVID when the caller matches it, and
//!   not when it does not.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a test failure"
)]

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
use sigil_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use sigil_proto::workload::{X509svidRequest, X509svidResponse};
use sigil_tests::{Cluster, Scratch, eventually, my_uid_selector};
use tonic::transport::Channel;

const LONG: Duration = Duration::from_secs(20);

/// Connects the socket on its stdin (shared with the test) to `api`, so
/// that the kernel records this process as the peer.
/// With `SIGIL_TEST_SETGROUPS=N` (as root) its supplementary groups are
/// set to just N first.
const CONNECTOR: &str = "import os, socket, sys, time\n\
g = os.environ.get('SIGIL_TEST_SETGROUPS')\n\
if g: os.setgroups([int(g)])\n\
s = socket.socket(fileno=0)\n\
s.connect(sys.argv[1])\n\
print('connected', flush=True)\n\
time.sleep(600)\n";

struct Handed {
    child: Child,
    client: SpiffeWorkloadApiClient<Channel>,
}

impl Drop for Handed {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `python` as the connecting process and returns a gRPC client over
/// the connection it made.
async fn handed_connection(python: &Path, api: &Path) -> Handed {
    handed_connection_with(python, api, &[]).await
}

/// [`handed_connection`] with extra environment for the child.
async fn handed_connection_with(python: &Path, api: &Path, env: &[(&str, &str)]) -> Handed {
    // One unconnected socket, two descriptors: the child connects it,
    // the test speaks over its own copy (the same open file).
    let mine = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    let theirs = mine.try_clone().unwrap();
    let mut child = Command::new(python)
        .env("PYTHONHOME", "/usr")
        .envs(env.iter().copied())
        .arg("-c")
        .arg(CONNECTOR)
        .arg(api)
        .stdin(Stdio::from(theirs))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "connected", "the child did not connect");
    let sock = UnixStream::from(mine);
    sock.set_nonblocking(true).unwrap();
    let slot = Arc::new(Mutex::new(Some(
        tokio::net::UnixStream::from_std(sock).unwrap(),
    )));
    let ch = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let s = slot.lock().unwrap().take();
            async move {
                s.map(hyper_util::rt::TokioIo::new)
                    .ok_or_else(|| std::io::Error::other("the handed connection is used up"))
            }
        }))
        .await
        .unwrap();
    Handed {
        child,
        client: SpiffeWorkloadApiClient::new(ch),
    }
}

fn request() -> tonic::Request<X509svidRequest> {
    let mut req = tonic::Request::new(X509svidRequest {});
    req.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    req
}

/// Opens a stream on `h` and returns it with its first message, retrying
/// until the agent has synced the entry.
async fn first_svid(h: &mut Handed) -> (tonic::Streaming<X509svidResponse>, X509svidResponse) {
    eventually("the handed connection's first SVID", LONG, || {
        let mut client = h.client.clone();
        async move {
            let mut stream = client.fetch_x509svid(request()).await.ok()?.into_inner();
            let first = stream.message().await.ok()??;
            Some((stream, first))
        }
    })
    .await
}

/// What the stream does next, within `LONG` (a hang fails the test).
async fn next_end(stream: &mut tonic::Streaming<X509svidResponse>) -> tonic::Status {
    match tokio::time::timeout(LONG, stream.message()).await {
        Err(_) => panic!("the stream kept running for {LONG:?}"),
        Ok(Ok(Some(m))) => panic!("the stream delivered another message: {m:?}"),
        Ok(Ok(None)) => panic!("the stream ended without saying why"),
        Ok(Err(st)) => st,
    }
}

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn a_stream_ends_when_the_process_that_opened_it_exits() {
    let c = Cluster::with_agent();
    c.create_entry(
        "spiffe://example.org/handed",
        &["--selector", &my_uid_selector()],
    );
    let python = std::fs::canonicalize("/usr/bin/python3").unwrap();
    let mut h = handed_connection(&python, &c.api_socket()).await;
    let (mut stream, first) = first_svid(&mut h).await;
    assert_eq!(first.svids[0].spiffe_id, "spiffe://example.org/handed");
    // The stream is healthy while the child lives: an entry change reaches it.
    c.create_entry(
        "spiffe://example.org/handed-2",
        &["--selector", &my_uid_selector()],
    );
    let update = tokio::time::timeout(LONG, stream.message())
        .await
        .expect("no update while the child lives")
        .unwrap()
        .unwrap();
    assert_eq!(update.svids.len(), 2, "{update:?}");
    h.child.kill().unwrap();
    h.child.wait().unwrap();
    let st = next_end(&mut stream).await;
    assert_eq!(st.code(), tonic::Code::PermissionDenied, "{st:?}");
    assert!(st.message().contains("exited"), "{st:?}");
    // And a new call on the same connection is refused: its peer is gone.
    let err = h.client.fetch_x509svid(request()).await.err();
    let err = match err {
        Some(e) => e,
        None => panic!("a call from a dead peer was accepted"),
    };
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
}

#[tokio::test]
async fn a_binary_modified_on_disk_after_start_loses_its_digest_identity() {
    let c = Cluster::with_agent();
    let dir = Scratch::new("integrity");
    let copy = dir.0.join("python3-copy");
    std::fs::copy(std::fs::canonicalize("/usr/bin/python3").unwrap(), &copy).unwrap();
    let digest = sha256(&copy);
    c.create_entry(
        "spiffe://example.org/pinned",
        &[
            "--selector",
            &my_uid_selector(),
            "--selector",
            &format!("unix:sha256:{digest}"),
        ],
    );
    let mut h = handed_connection(&copy, &c.api_socket()).await;
    let (mut stream, first) = first_svid(&mut h).await;
    assert_eq!(first.svids[0].spiffe_id, "spiffe://example.org/pinned");

    // Modify the file the process runs. Writing to a running executable
    // fails with ETXTBSY on most kernels; then replace it on disk instead
    // (a modified copy renamed over it), which changes the running inode's
    // status too (its link count drops).
    let modified = match std::fs::OpenOptions::new().append(true).open(&copy) {
        Ok(mut f) => {
            use std::io::Write;
            f.write_all(b"\0tampered").unwrap();
            "written in place"
        }
        Err(e) if e.raw_os_error() == Some(nix::libc::ETXTBSY) => {
            let tmp = dir.0.join("python3-tampered");
            std::fs::copy(&copy, &tmp).unwrap();
            std::fs::OpenOptions::new()
                .append(true)
                .open(&tmp)
                .and_then(|mut f| std::io::Write::write_all(&mut f, b"\0tampered"))
                .unwrap();
            std::fs::rename(&tmp, &copy).unwrap();
            "replaced (ETXTBSY on write)"
        }
        Err(e) => panic!("cannot modify {}: {e}", copy.display()),
    };
    eprintln!("executable {modified}");

    // The next fetch on the same connection is refused.
    let err = h
        .client
        .fetch_x509svid(request())
        .await
        .err()
        .unwrap_or_else(|| panic!("a modified binary still got its pinned identity"));
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    // And the open stream ends at its next update instead of delivering it.
    c.create_entry(
        "spiffe://example.org/unrelated",
        &["--selector", "unix:uid:4242424"],
    );
    let st = next_end(&mut stream).await;
    assert_eq!(st.code(), tonic::Code::PermissionDenied, "{st:?}");
    assert!(st.message().contains("changed"), "{st:?}");
}

/// The SPIFFE IDs of a stream message, sorted.
fn ids(m: &X509svidResponse) -> Vec<String> {
    let mut v: Vec<String> = m.svids.iter().map(|s| s.spiffe_id.clone()).collect();
    v.sort();
    v
}

/// The next message on `stream` within `LONG`.
async fn next_message(stream: &mut tonic::Streaming<X509svidResponse>) -> X509svidResponse {
    tokio::time::timeout(LONG, stream.message())
        .await
        .expect("no update reached the stream")
        .expect("the stream failed")
        .expect("the stream ended")
}

#[tokio::test]
async fn a_stream_is_re_attested_when_entries_start_to_use_costlier_unix_selectors() {
    let c = Cluster::with_agent();
    let uid = my_uid_selector();
    c.create_entry("spiffe://example.org/by-uid", &["--selector", &uid]);
    let python = std::fs::canonicalize("/usr/bin/python3").unwrap();
    // As root the child sets a supplementary group the entries can name.
    let root = nix::unistd::geteuid().is_root();
    let env: &[(&str, &str)] = if root {
        &[("SIGIL_TEST_SETGROUPS", "4242")]
    } else {
        &[]
    };
    let mut h = handed_connection_with(&python, &c.api_socket(), env).await;
    // Opened while the only entry names a uid: only credentials derived.
    let (mut stream, first) = first_svid(&mut h).await;
    assert_eq!(ids(&first), ["spiffe://example.org/by-uid"]);

    // An entry pinning the caller's binary by path and digest (and, as
    // root, its supplementary group): the stream re-attests and gets it.
    let path = format!("unix:path:{}", python.display());
    let digest = format!("unix:sha256:{}", sha256(&python));
    let mut sel = vec![
        "--selector",
        &uid,
        "--selector",
        &path,
        "--selector",
        &digest,
    ];
    if root {
        sel.extend(["--selector", "unix:supplementary_gid:4242"]);
    }
    c.create_entry("spiffe://example.org/pinned", &sel);
    let update = next_message(&mut stream).await;
    assert_eq!(
        ids(&update),
        ["spiffe://example.org/by-uid", "spiffe://example.org/pinned"]
    );

    // An entry for another binary, and one for a group the caller lacks:
    // not delivered. The entry created after them proves the stream saw
    // those changes and moved on.
    c.create_entry(
        "spiffe://example.org/other-binary",
        &[
            "--selector",
            &uid,
            "--selector",
            "unix:path:/usr/bin/no-such-binary",
        ],
    );
    c.create_entry(
        "spiffe://example.org/other-group",
        &[
            "--selector",
            &uid,
            "--selector",
            "unix:supplementary_gid:4343",
        ],
    );
    c.create_entry("spiffe://example.org/by-uid-2", &["--selector", &uid]);
    // Each change may arrive as its own message; each must be within LONG.
    let update = loop {
        let m = next_message(&mut stream).await;
        if ids(&m).contains(&"spiffe://example.org/by-uid-2".to_string()) {
            break m;
        }
        assert_eq!(
            ids(&m),
            ["spiffe://example.org/by-uid", "spiffe://example.org/pinned"],
            "an entry the caller does not match was delivered"
        );
    };
    assert_eq!(
        ids(&update),
        [
            "spiffe://example.org/by-uid",
            "spiffe://example.org/by-uid-2",
            "spiffe://example.org/pinned"
        ]
    );
}
