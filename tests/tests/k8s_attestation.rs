//! The k8s attestor with the real binaries: a process in a real cgroup laid
//! out as the kubelet's systemd driver does for a containerd container
//! (`kubepods.slice/…-pod<uid>.slice/cri-containerd-<id>.scope`, created
//! here and entered through `cgroup.procs`), and `openssl s_server -WWW`
//! standing in for the kubelet: real TLS with a CA and serving certificate
//! made by `openssl`, answering `/pods` with a PodList document. No kubelet
//! runs on the test machines: the bearer token check is covered by
//! attestors/tests/k8s_kubelet.rs, not here. Needs root, cgroup v2 and
//! `openssl` (skips loudly without cgroup v2 or root).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use sigil_tests::pki::{make_ca, make_server_cert};
use sigil_tests::{Cluster, bin, free_port, wait_for};

const POD: &str = "2f1c7a52-8a4b-4bd6-9e1c-2f0a6d7b3e41";
const POD_: &str = "2f1c7a52_8a4b_4bd6_9e1c_2f0a6d7b3e41";
const ID: &str = "3c5c8e5d2f6f4b3e9a1b7c0d8e2f4a6b8c0d2e4f6a8b0c2d4e6f8a0b2c4d6e8f";

fn cgroup2_root() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        post.starts_with("cgroup2 ")
            .then(|| pre.split_whitespace().nth(4).map(PathBuf::from))
            .flatten()
    })
}

/// Nested cgroups created for the test, removed innermost first.
struct Cgroups(Vec<PathBuf>);

impl Drop for Cgroups {
    fn drop(&mut self) {
        for d in self.0.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A CA (`ca.pem`) and a kubelet serving certificate for 127.0.0.1
/// (`kubelet.pem`, `kubelet.key`), made by openssl.
fn kubelet_pki(dir: &Path) {
    make_ca(dir, "ca");
    make_server_cert(dir, "ca", "kubelet", "IP:127.0.0.1,DNS:worker-3");
}

#[test]
fn a_process_in_a_pod_cgroup_gets_k8s_selectors_from_the_kubelet() {
    let Some(root) = cgroup2_root() else {
        eprintln!("\n!!! SKIPPING k8s attestation test: no cgroup v2 hierarchy mounted !!!\n");
        return;
    };
    if !nix::unistd::geteuid().is_root() {
        eprintln!("\n!!! SKIPPING k8s attestation test: needs root to create cgroups !!!\n");
        return;
    }
    let mut c = Cluster::start();
    let kdir = c.dir.0.join("kubelet");
    std::fs::create_dir_all(&kdir).unwrap();
    kubelet_pki(&kdir);
    let pods = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../attestors/tests/testdata/kubelet-pods.json"
    ))
    .unwrap();
    std::fs::write(kdir.join("pods"), pods).unwrap();
    std::fs::write(kdir.join("token"), "node-token\n").unwrap();
    let port = free_port();
    let server = Server(
        Command::new("openssl")
            .args([
                "s_server",
                "-quiet",
                "-WWW",
                "-accept",
                &port.to_string(),
                "-cert",
                "kubelet.pem",
                "-key",
                "kubelet.key",
            ])
            .current_dir(&kdir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for("openssl s_server", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });

    let slice = root.join("kubepods.slice");
    let qos = slice.join("kubepods-besteffort.slice");
    let pod = qos.join(format!("kubepods-besteffort-pod{POD_}.slice"));
    let scope = pod.join(format!("cri-containerd-{ID}.scope"));
    let cgroups = Cgroups(vec![slice.clone(), qos, pod, scope.clone()]);
    std::fs::create_dir_all(&scope).unwrap();

    c.start_agent_with(
        "spiffe://example.org/k8s-node",
        &format!(
            "[workload_attestor.k8s]\nkubelet_url = \"https://127.0.0.1:{port}\"\ntoken_path = \"{d}/token\"\nca_path = \"{d}/ca.pem\"\ntimeout = \"5s\"\n",
            d = kdir.display()
        ),
    );
    c.create_entry(
        "spiffe://example.org/triage",
        &[
            "--selector",
            "k8s:ns:agents",
            "--selector",
            "k8s:sa:triage",
            "--selector",
            "k8s:pod-label:team:sec",
        ],
    );

    // A long-running process in the container's cgroup, seen by the operator tool.
    let mut sleeper = Command::new("/bin/sleep").arg("300").spawn().unwrap();
    std::fs::write(scope.join("cgroup.procs"), sleeper.id().to_string()).unwrap();
    let admin = c.dir.0.join("agent/private/admin.sock");
    let mut v = serde_json::Value::Null;
    wait_for("the entry to match", Duration::from_secs(30), || {
        let out = Command::new(bin("sigil-agent"))
            .args(["api", "debug", "selectors", "--output", "json", "--pid"])
            .arg(sleeper.id().to_string())
            .arg("--admin-socket")
            .arg(&admin)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        v = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["failed"], serde_json::json!([]), "{v}\n{}", c.logs());
        v["entries"].as_array().is_some_and(|e| !e.is_empty())
    });
    let sels = v["selectors"].to_string();
    for want in [
        format!("k8s:pod-uid:{POD}"),
        "k8s:pod-owner:ReplicaSet:triage-7c9d8f6b5".into(),
        "k8s:container-name:agent".into(),
        "k8s:node-name:worker-3".into(),
        format!("container:id:{ID}"),
        "container:runtime:containerd".into(),
    ] {
        assert!(sels.contains(&want), "missing {want} in {sels}");
    }
    // The text form, as an operator sees it (printed for the docs).
    let text = Command::new(bin("sigil-agent"))
        .args(["api", "debug", "selectors", "--pid"])
        .arg(sleeper.id().to_string())
        .arg("--admin-socket")
        .arg(&admin)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("Entry      : "), "{text}");
    eprintln!(
        "$ sigil-agent api debug selectors --pid {}\n{text}",
        sleeper.id()
    );
    let _ = sleeper.kill();
    let _ = sleeper.wait();

    // A Workload API client started in the pod's container cgroup gets the
    // identity; the same client outside it does not.
    let script = format!(
        "echo $$ > {}/cgroup.procs && exec {} {}",
        scope.display(),
        bin("spiffe-probe").display(),
        c.api_addr()
    );
    let out = Command::new("sh").arg("-c").arg(&script).output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "OK spiffe://example.org/triage",
        "{}",
        c.logs()
    );
    let out = Command::new(bin("spiffe-probe"))
        .arg(c.api_addr())
        .output()
        .unwrap();
    let got = String::from_utf8_lossy(&out.stdout);
    assert!(got.starts_with("ERR permission_denied"), "{got}");
    drop(server);
    drop(cgroups);
}
