//! A local Docker Engine for the tests that run containers (container
//! attestation, the deployment image): finds a daemon on
//! /var/run/docker.sock or starts one, and runs the `docker` CLI against it.
//!
//! A daemon started here uses data-root and exec-root under
//! /tmp/sigil-test-dockerd, no iptables and no bridge (containers run with
//! `--network none` or share another container's network namespace), and
//! outlives the test process so the next run reuses it. Needs root and
//! `dockerd` (Debian: `docker.io`). Without it [`engine`] returns `None`
//! after a loud SKIP message, except in CI, where it panics.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::in_ci;

const OWN_DIR: &str = "/tmp/sigil-test-dockerd";

/// Runs `docker -H unix://<host> <args>`.
pub fn docker(host: &str, args: &[&str]) -> Output {
    Command::new("docker")
        .arg("-H")
        .arg(format!("unix://{host}"))
        .args(args)
        .output()
        .expect("run docker CLI")
}

/// Like [`docker`], panicking with its stderr unless it succeeds; returns
/// stdout, trimmed.
pub fn docker_ok(host: &str, args: &[&str]) -> String {
    let out = docker(host, args);
    assert!(
        out.status.success(),
        "docker {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn answers(sock: &str) -> bool {
    Path::new(sock).exists()
        && docker(sock, &["version", "--format", "{{.Server.Version}}"])
            .status
            .success()
}

/// Whether `cmd` is on PATH.
pub fn installed(cmd: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {cmd}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The socket of a running Docker Engine (started here if needed); `None`,
/// after a loud SKIP naming `what`, when dockerd or the docker CLI is not
/// installed outside CI. In CI a missing engine fails the test.
pub fn engine(what: &str) -> Option<&'static str> {
    static ENGINE: OnceLock<Option<String>> = OnceLock::new();
    let found = ENGINE
        .get_or_init(|| {
            if !installed("dockerd") || !installed("docker") {
                return None;
            }
            let system = "/var/run/docker.sock".to_string();
            if answers(&system) {
                return Some(system);
            }
            let own = format!("{OWN_DIR}/docker.sock");
            if !answers(&own) {
                start_dockerd(&own);
            }
            Some(own)
        })
        .as_deref();
    if found.is_none() {
        assert!(
            !in_ci(),
            "{what}: dockerd and the docker CLI are required in CI (Debian: docker.io; \
             scripts/install-deps test installs it)"
        );
        eprintln!(
            "\n\n!!! SKIPPING {what}: dockerd is not installed \
             (Debian: apt-get install docker.io; .ci/run installs it) !!!\n"
        );
    }
    found
}

#[expect(
    clippy::zombie_processes,
    reason = "dockerd outlives the test process and is reused by the next run"
)]
fn start_dockerd(sock: &str) {
    std::fs::create_dir_all(OWN_DIR).unwrap();
    let _ = std::fs::remove_file(sock);
    let log = std::fs::File::create(format!("{OWN_DIR}/dockerd.log")).unwrap();
    // In its own process group: the daemon outlives this test process
    // (and a ^C of it) and is reused.
    let mut child = Command::new("dockerd")
        .process_group(0)
        .args([
            "--iptables=false",
            "--ip6tables=false",
            "--bridge=none",
            "--host",
            &format!("unix://{sock}"),
            "--data-root",
            &format!("{OWN_DIR}/data"),
            "--exec-root",
            &format!("{OWN_DIR}/exec"),
            "--pidfile",
            &format!("{OWN_DIR}/docker.pid"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn dockerd");
    let start = Instant::now();
    while !answers(sock) {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "dockerd exited with {status}:\n{}",
                std::fs::read_to_string(format!("{OWN_DIR}/dockerd.log")).unwrap_or_default()
            );
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "dockerd did not answer on {sock} within 90 s:\n{}",
            std::fs::read_to_string(format!("{OWN_DIR}/dockerd.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("started dockerd on {sock} in {:?}", start.elapsed());
}
