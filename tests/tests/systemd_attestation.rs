//! The systemd attestor with the real binaries and real cgroups: the test
//! creates a cgroup named like a systemd service in the host's cgroup v2
//! hierarchy, moves processes into it through `cgroup.procs`, and checks
//! the selectors the agent derives (`sigil-agent api debug selectors`) and
//! an SVID fetched by a process in that cgroup. Needs root and a mounted
//! cgroup v2 hierarchy (skips loudly otherwise).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use sigil_tests::{Cluster, bin, wait_for};

/// Mount point of the cgroup v2 hierarchy, from /proc/self/mountinfo.
fn cgroup2_root() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        post.starts_with("cgroup2 ")
            .then(|| pre.split_whitespace().nth(4).map(PathBuf::from))
            .flatten()
    })
}

/// A cgroup created for the test, removed (after its processes) on drop.
struct TestCgroup(PathBuf);

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
        if let Some(parent) = self.0.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

#[test]
fn a_process_in_a_service_cgroup_gets_systemd_selectors_and_its_identity() {
    let Some(root) = cgroup2_root() else {
        eprintln!("\n!!! SKIPPING systemd attestation test: no cgroup v2 hierarchy mounted !!!\n");
        return;
    };
    if !nix::unistd::geteuid().is_root() {
        eprintln!("\n!!! SKIPPING systemd attestation test: needs root to create cgroups !!!\n");
        return;
    }
    let unit = format!("sigil-e2e-{}.service", std::process::id());
    let cg = TestCgroup(root.join("sigil-e2e.slice").join(&unit));
    std::fs::create_dir_all(&cg.0).unwrap();

    let mut c = Cluster::start();
    let units = c.dir.0.join("units");
    std::fs::create_dir_all(&units).unwrap();
    std::fs::write(units.join(&unit), "[Service]\nExecStart=/bin/sleep 300\n").unwrap();
    c.start_agent_with(
        "spiffe://example.org/systemd-node",
        &format!(
            "[workload_attestor.systemd]\nunit_dirs = [\"{}\"]\n",
            units.display()
        ),
    );
    c.create_entry(
        "spiffe://example.org/svc",
        &["--selector", &format!("systemd:id:{unit}")],
    );

    // A long-running process moved into the unit's cgroup.
    let mut sleeper = Command::new("/bin/sleep").arg("300").spawn().unwrap();
    std::fs::write(cg.0.join("cgroup.procs"), sleeper.id().to_string()).unwrap();
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
        v["entries"].as_array().is_some_and(|e| !e.is_empty())
    });
    let sels = v["selectors"].to_string();
    assert!(sels.contains(&format!("systemd:id:{unit}")), "{sels}");
    assert!(
        sels.contains(&format!("systemd:fragment_path:{}/{unit}", units.display())),
        "{sels}"
    );
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

    // A Workload API client started inside the cgroup gets the identity...
    let script = format!(
        "echo $$ > {}/cgroup.procs && exec {} {}",
        cg.0.display(),
        bin("spiffe-probe").display(),
        c.api_addr()
    );
    let out = Command::new("sh")
        .arg("-c")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "OK spiffe://example.org/svc",
        "{}",
        c.logs()
    );
    // ...and the same client outside it does not.
    let out = Command::new(bin("spiffe-probe"))
        .arg(c.api_addr())
        .output()
        .unwrap();
    let got = String::from_utf8_lossy(&out.stdout);
    assert!(got.starts_with("ERR permission_denied"), "{got}");
}
