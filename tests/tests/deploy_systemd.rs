//! The shipped systemd units (`deploy/systemd/*.service`) pass
//! `systemd-analyze verify` with the binaries the workspace builds.
//!
//! Each unit is copied into a temporary directory with only its
//! `ExecStart=` binary rewritten from `/usr/local/bin/sigil-*` to the
//! built `target/<profile>/sigil-*` (verify checks that the command exists
//! and is executable), and the copies are verified together. Any line of
//! verify's output that names one of the copies fails the test, as does a
//! non-zero exit. Lines about other units are only printed: verify loads
//! the dependencies (`network-online.target`, `multi-user.target`, and
//! what those pull in) from the host's own unit directories and reports
//! their problems too, which say nothing about Sigil's units and differ
//! from host to host. A second test feeds the same check a unit with a
//! misspelt key and a missing binary, so the filter cannot hide what
//! verify says about our units.
//!
//! Needs `systemd-analyze` (Debian: `systemd`). Without it the tests skip
//! loudly, except in CI, where they fail.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use sigil_tests::{Scratch, bin, in_ci};

const UNITS: [&str; 2] = ["sigil-server", "sigil-agent"];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// `true` when `systemd-analyze` runs; otherwise SKIP outside CI, panic in CI.
fn have_systemd_analyze() -> bool {
    let ok = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            !in_ci(),
            "systemd-analyze not found: install systemd (scripts/install-deps test)"
        );
        eprintln!(
            "\n\n!!! SKIPPING systemd unit verification: systemd-analyze is not installed \
             (Debian: apt-get install systemd; .ci/run installs it) !!!\n"
        );
    }
    ok
}

/// Copies `deploy/systemd/<name>.service` into `dir`, with `ExecStart`'s
/// binary pointing at `binary`, optionally changed further by `edit`.
fn install_unit(dir: &Path, name: &str, binary: &Path, edit: impl Fn(String) -> String) -> PathBuf {
    let src = repo_root().join(format!("deploy/systemd/{name}.service"));
    let text = std::fs::read_to_string(&src).unwrap();
    let shipped = format!("ExecStart=/usr/local/bin/{name} ");
    assert_eq!(
        text.matches(&shipped).count(),
        1,
        "{} should have exactly one `{shipped}…` line (this test rewrites it)",
        src.display()
    );
    let text = text.replace(&shipped, &format!("ExecStart={} ", binary.display()));
    let dest = dir.join(format!("{name}.service"));
    std::fs::write(&dest, edit(text)).unwrap();
    dest
}

/// Runs `systemd-analyze verify` on `units`; returns the lines that are
/// about them (empty when verify is happy with them).
fn verify(units: &[PathBuf]) -> Vec<String> {
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(units)
        .output()
        .expect("run systemd-analyze");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let names: Vec<String> = units
        .iter()
        .map(|u| u.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    let (ours, other): (Vec<&str>, Vec<&str>) = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .partition(|l| names.iter().any(|n| l.contains(n.as_str())));
    if !other.is_empty() {
        eprintln!(
            "systemd-analyze verify, lines about other (host) units, ignored:\n  {}",
            other.join("\n  ")
        );
    }
    let mut ours: Vec<String> = ours.into_iter().map(str::to_string).collect();
    if !out.status.success() && ours.is_empty() {
        ours.push(format!(
            "systemd-analyze verify exited with {}:\n{text}",
            out.status
        ));
    }
    ours
}

#[test]
fn shipped_units_pass_systemd_analyze_verify() {
    if !have_systemd_analyze() {
        return;
    }
    let dir = Scratch::new("systemd-verify");
    let units: Vec<PathBuf> = UNITS
        .iter()
        .map(|name| install_unit(&dir.0, name, &bin(name), |t| t))
        .collect();
    let complaints = verify(&units);
    assert!(
        complaints.is_empty(),
        "systemd-analyze verify complains about deploy/systemd units:\n{}",
        complaints.join("\n")
    );
}

#[test]
fn verify_check_reports_a_misspelt_key_and_a_missing_binary() {
    if !have_systemd_analyze() {
        return;
    }
    let dir = Scratch::new("systemd-verify-bad");
    let missing = dir.0.join("no-such-sigil-server");
    let unit = install_unit(&dir.0, "sigil-server", &missing, |t| {
        t.replace("\nProtectSystem=strict\n", "\nProtectSytem=strict\n")
    });
    let complaints = verify(std::slice::from_ref(&unit)).join("\n");
    assert!(
        complaints.contains("ProtectSytem"),
        "the misspelt key is not reported: {complaints}"
    );
    assert!(
        complaints.contains("no-such-sigil-server"),
        "the missing binary is not reported: {complaints}"
    );
}
