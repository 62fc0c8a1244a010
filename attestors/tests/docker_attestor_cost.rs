//! What the docker attestor costs per Workload API call, measured against a
//! real Docker Engine: attestation latency of one containerized process with
//! `unix` only and with `unix` + `docker` (metadata cached, and uncached).
//! Ignored by default (needs a running dockerd with the image the end-to-end
//! tests import); run with
//! `cargo test -p sigil-attestors --test docker_attestor_cost -- --ignored --nocapture`
//! after `cargo test -p sigil-tests --test container_attestation`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sigil_attestors::workload::AttestorSet;
use sigil_attestors::workload::docker::{DockerAttestor, DockerConfig};
use sigil_attestors::workload::unix::Peer;

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

async fn measure(set: &AttestorSet, pid: i32, n: usize) -> (Duration, Duration) {
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let peer = Arc::new(Peer::from_pid(pid).unwrap());
        let t = Instant::now();
        let got = set.attest(peer).await.unwrap();
        lat.push(t.elapsed());
        assert!(got.failed.is_empty(), "{:?}", got.failed);
    }
    (percentile(&mut lat, 0.5), percentile(&mut lat, 0.99))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a running Docker Engine; prints figures"]
async fn docker_attestor_cost_per_call() {
    let sock = [
        "/var/run/docker.sock",
        "/tmp/sigil-test-dockerd/docker.sock",
    ]
    .into_iter()
    .find(|s| std::path::Path::new(s).exists())
    .expect("no Docker Engine socket");
    let docker = |args: &[&str]| {
        let out = Command::new("docker")
            .arg("-H")
            .arg(format!("unix://{sock}"))
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let id = docker(&[
        "run",
        "-d",
        "--network",
        "none",
        "--label",
        "team=sec",
        "sigil-e2e-probe:latest",
        "/bin/sleep",
        "300",
    ]);
    let pid: i32 = docker(&["inspect", "-f", "{{.State.Pid}}", &id])
        .parse()
        .unwrap();
    let cfg = |ttl| DockerConfig {
        socket_path: sock.into(),
        env: vec![],
        cache_ttl: ttl,
        timeout: Duration::from_secs(5),
    };
    let unix_only = AttestorSet::new(vec![]);
    let cached = AttestorSet::new(vec![Arc::new(DockerAttestor::new(cfg(
        Duration::from_secs(3600),
    )))]);
    let uncached = AttestorSet::new(vec![Arc::new(DockerAttestor::new(cfg(Duration::ZERO)))]);
    let n = 2000;
    measure(&unix_only, pid, 50).await;
    measure(&cached, pid, 50).await;
    let (u50, u99) = measure(&unix_only, pid, n).await;
    let (c50, c99) = measure(&cached, pid, n).await;
    let (n50, n99) = measure(&uncached, pid, 200).await;
    eprintln!("attestation of a containerized process, {n} calls each (uncached: 200):");
    eprintln!("  unix only                    p50 {u50:?}  p99 {u99:?}");
    eprintln!("  unix + docker (cached)       p50 {c50:?}  p99 {c99:?}");
    eprintln!("  unix + docker (Engine asked) p50 {n50:?}  p99 {n99:?}");
    docker(&["rm", "-f", &id]);
}
