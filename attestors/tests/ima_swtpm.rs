//! IMA log replay checked against a real (software) TPM: the test writes an
//! `ima-ng` binary log, extends swtpm's PCR 10 with the same template
//! digests using `tpm2_pcrextend` (this machine's kernel has no IMA), reads
//! PCR 10 back with `tpm2_pcrread`, and `verify_log` must accept exactly
//! that log and refuse one with an entry the TPM never saw.
//! Needs swtpm and tpm2-tools; `SIGIL_SKIP_TPM=1` skips it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use sigil_attestors::node::ima::{ImaBank, ImaError, verify_log};

fn sha256(parts: &[&[u8]]) -> Vec<u8> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for p in parts {
        ctx.update(p);
    }
    ctx.finish().as_ref().to_vec()
}

/// One ima-ng entry (SHA-256 log) and its template digest.
fn entry(file: &[u8], path: &str) -> (Vec<u8>, Vec<u8>) {
    let mut d = b"sha256:\0".to_vec();
    d.extend_from_slice(&sha256(&[file]));
    let mut p = path.as_bytes().to_vec();
    p.push(0);
    let mut data = Vec::new();
    data.extend_from_slice(&(d.len() as u32).to_le_bytes());
    data.extend_from_slice(&d);
    data.extend_from_slice(&(p.len() as u32).to_le_bytes());
    data.extend_from_slice(&p);
    let digest = sha256(&[&data]);
    let mut e = 10u32.to_le_bytes().to_vec();
    e.extend_from_slice(&digest);
    e.extend_from_slice(&6u32.to_le_bytes());
    e.extend_from_slice(b"ima-ng");
    e.extend_from_slice(&(data.len() as u32).to_le_bytes());
    e.extend_from_slice(&data);
    (e, digest)
}

#[test]
fn a_log_replays_to_swtpm_pcr10_and_an_unmeasured_entry_does_not() {
    if std::env::var_os("SIGIL_SKIP_TPM").is_some() {
        eprintln!("SIGIL_SKIP_TPM set: skipping");
        return;
    }
    let state = tempfile::tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/swtpm-start");
    let out = Command::new(&script).arg(state.path()).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let vars: BTreeMap<String, String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let tcti = vars["TPM2TOOLS_TCTI"].clone();
    let _swtpm = Kill(vars["SWTPM_PID"].parse().unwrap());
    let tpm2 = |tool: &str, args: &[&str]| {
        let out = Command::new(tool)
            .args(args)
            .env("TPM2TOOLS_TCTI", &tcti)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{tool}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };

    let mut log = Vec::new();
    for (file, path) in [
        (&b"boot aggregate"[..], "boot_aggregate"),
        (b"\x7fELF triage agent", "/usr/bin/triage"),
        (b"\x7fELF libc", "/usr/lib/x86_64-linux-gnu/libc.so.6"),
    ] {
        let (e, digest) = entry(file, path);
        log.extend(e);
        tpm2(
            "tpm2_pcrextend",
            &[&format!("10:sha256={}", hex::encode(digest))],
        );
    }
    let out = tpm2("tpm2_pcrread", &["sha256:10"]);
    let pcr10 = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("10:"))
        .and_then(|v| v.trim().strip_prefix("0x"))
        .map(|h| hex::decode(h).unwrap())
        .expect("PCR 10 in tpm2_pcrread output");

    let verified = verify_log(&log, ImaBank::Sha256, &pcr10).unwrap();
    assert_eq!(verified.entries(), 3);
    assert!(verified.contains(&hex::encode(sha256(&[b"\x7fELF triage agent"]))));

    let (extra, _) = entry(b"\x7fELF not measured", "/tmp/evil");
    let mut forged = log.clone();
    forged.extend(extra);
    let e = verify_log(&forged, ImaBank::Sha256, &pcr10).unwrap_err();
    assert!(matches!(e, ImaError::PcrMismatch { .. }), "{e}");
    eprintln!("refused as expected: {e}");
}

/// Stops the swtpm this test started, also when an assertion fails.
struct Kill(i32);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
}
