//! The Kubernetes manifests in `deploy/k8s` (base/, the PostgreSQL overlay
//! postgres/, and the kustomizations) validate strictly against the
//! Kubernetes 1.37 schemas with `kubernetes-validate` from PyPI, run the
//! image `deploy/image/build` makes (`sigil:<workspace version>`), and
//! probe `/ready` and `/live` on the `[telemetry]` ports their ConfigMaps
//! set (`tests/python/k8s_check.py` does the checking).
//!
//! When `kubectl` is installed, the output of `kubectl kustomize` for both
//! kustomizations is checked the same way, which proves the overlay's
//! patches merge into the base. It is not a test dependency (Debian has no
//! current kubectl), so without it that part is skipped with a message.
//!
//! Needs the virtualenv `scripts/test` makes (`target/pyvenv`, from
//! tests/python/requirements.txt). Without `kubernetes_validate` in it the
//! tests skip loudly, except in CI, where they fail.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sigil_tests::docker::installed;
use sigil_tests::{Scratch, in_ci, py_venv};

fn k8s_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("deploy/k8s")
}

fn image() -> String {
    format!("sigil:{}", env!("CARGO_PKG_VERSION"))
}

/// The venv's python3 when it has kubernetes_validate; otherwise SKIP
/// (outside CI) or panic (in CI).
fn python() -> Option<PathBuf> {
    let python = py_venv().map(|v| v.join("bin/python3"));
    let ok = python.as_ref().is_some_and(|p| {
        Command::new(p)
            .args(["-c", "import kubernetes_validate, yaml"])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if ok {
        return python;
    }
    let how = "run scripts/test (it installs tests/python/requirements.txt into target/pyvenv)";
    assert!(
        !in_ci(),
        "kubernetes-validate is not in the virtualenv: {how}"
    );
    eprintln!("\n\n!!! SKIPPING Kubernetes manifest checks: no kubernetes-validate; {how} !!!\n");
    None
}

fn check(python: &Path, dir: &Path) -> (bool, String) {
    let out = Command::new(python)
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/python/k8s_check.py"))
        .arg(dir)
        .arg(image())
        .output()
        .unwrap();
    (out.status.success(), text(&out))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Copies the regular files of `from` (recursively) into `to`.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn manifests_validate_and_probe_the_telemetry_ports() {
    let Some(python) = python() else {
        return;
    };
    let (ok, said) = check(&python, &k8s_dir());
    eprintln!("{said}");
    assert!(ok, "deploy/k8s does not pass:\n{said}");
    for doc in [
        "base/server.yaml StatefulSet/sigil-server",
        "base/agent.yaml DaemonSet/sigil-agent",
        "base/namespace.yaml Namespace/sigil",
        "postgres/server-config.yaml ConfigMap/sigil-server",
        "postgres/server-statefulset.yaml StatefulSet/sigil-server",
    ] {
        assert!(
            said.contains(&format!("valid {doc}")),
            "{doc} not validated:\n{said}"
        );
    }
}

#[test]
fn rendered_kustomizations_validate() {
    let Some(python) = python() else {
        return;
    };
    if !installed("kubectl") {
        eprintln!("kubectl not installed: the kustomize output is not checked");
        return;
    }
    for overlay in ["", "postgres"] {
        let dir = Scratch::new("k8s-render");
        let out = Command::new("kubectl")
            .arg("kustomize")
            .arg(k8s_dir().join(overlay))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "kubectl kustomize deploy/k8s/{overlay}: {}",
            text(&out)
        );
        let rendered = String::from_utf8(out.stdout).unwrap();
        std::fs::write(dir.0.join("rendered.yaml"), &rendered).unwrap();
        let (ok, said) = check(&python, &dir.0);
        assert!(ok, "kustomize output of deploy/k8s/{overlay}:\n{said}");
        if overlay == "postgres" {
            assert!(rendered.contains("kind = \"postgres\""), "{rendered}");
            assert!(rendered.contains("replicas: 2"), "{rendered}");
            assert!(rendered.contains("initContainers:"), "{rendered}");
        }
    }
}

#[test]
fn the_check_refuses_unknown_fields_wrong_images_and_probes() {
    let Some(python) = python() else {
        return;
    };
    let dir = Scratch::new("k8s-broken");
    copy_tree(&k8s_dir(), &dir.0);
    let edit = |file: &str, from: &str, to: &str| {
        let p = dir.0.join(file);
        let t = std::fs::read_to_string(&p).unwrap();
        assert!(t.contains(from), "{file} has no {from:?}");
        std::fs::write(&p, t.replacen(from, to, 1)).unwrap();
    };
    edit("base/server.yaml", "  serviceName:", "  serviceNme:");
    edit(
        "base/agent.yaml",
        "image: sigil:0.1.0",
        "image: sigil:example",
    );
    edit("base/agent.yaml", "path: /live", "path: /healthz");
    edit(
        "postgres/server-config.yaml",
        "prometheus_port = 9988",
        "prometheus_port = 9090",
    );
    let (ok, said) = check(&python, &dir.0);
    assert!(!ok, "broken manifests passed:\n{said}");
    for needle in [
        "'serviceNme' was unexpected",
        "'sigil:example'",
        "livenessProbe is {'path': '/healthz'",
        "postgres/server-config.yaml server.toml: [telemetry] should be port 9988",
    ] {
        assert!(said.contains(needle), "{needle:?} not reported:\n{said}");
    }
}
