//! TPM 2.0 node attestation against a real software TPM.
//!
//! Every test starts its own `swtpm` through `scripts/swtpm-start` (free
//! port, own state directory, killed and removed on drop) and the tests run
//! one at a time behind a lock. Independent tools check the results:
//! `tpm2_createek`/`tpm2_readpublic`/`openssl` for the EK hash,
//! `tpm2_pcrread`/`tpm2_pcrextend` for PCRs, `tpm2_makecredential` for
//! credential activation, `swtpm_setup`'s local CA for EK certificates.
//!
//! Needs the Debian packages swtpm, swtpm-tools, tpm2-tools and openssl;
//! without them the tests fail, unless `SIGIL_SKIP_TPM=1` skips them.
#![cfg(feature = "tpm")]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is a test failure"
)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use ring::digest::{SHA256, digest};
use ring::rand::{SecureRandom, SystemRandom};
use sigil_attestors::node::tpm::{
    AgentTpm, AkAlgorithm, TpmError, TpmEvidence, check_activation, ek_hash, make_credential,
    verify_ek, verify_quote,
};

/// One swtpm at a time: they are CPU-heavy (RSA key generation) and the
/// machine running the tests may have two cores.
static TPM_LOCK: Mutex<()> = Mutex::new(());

/// A running swtpm, killed (and its state removed) on drop.
struct Swtpm {
    pid: i32,
    port: u16,
    state: tempfile::TempDir,
    vars: BTreeMap<String, String>,
    _serial: MutexGuard<'static, ()>,
}

impl Swtpm {
    /// Starts a blank TPM, or `None` when `SIGIL_SKIP_TPM=1`.
    fn start() -> Option<Self> {
        Self::start_with(&[])
    }

    /// Starts a TPM manufactured with an EK certificate.
    fn start_with_ek_cert() -> Option<Self> {
        Self::start_with(&["--ek-cert"])
    }

    fn start_with(args: &[&str]) -> Option<Self> {
        if std::env::var("SIGIL_SKIP_TPM").as_deref() == Ok("1") {
            eprintln!("SIGIL_SKIP_TPM=1: skipping a swtpm test");
            return None;
        }
        for tool in ["swtpm", "swtpm_setup", "tpm2_pcrread", "openssl"] {
            let found = Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            assert!(
                found,
                "`{tool}` is not installed: the TPM tests need the Debian packages swtpm, \
                 swtpm-tools, tpm2-tools and openssl (set SIGIL_SKIP_TPM=1 to skip them)"
            );
        }
        let serial = TPM_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let state = tempfile::Builder::new()
            .prefix("sigil-swtpm-test.")
            .tempdir()
            .unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/swtpm-start");
        let out = Command::new(&script)
            .args(args)
            .arg(state.path())
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "{} failed: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let vars: BTreeMap<String, String> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Some(Self {
            pid: vars["SWTPM_PID"].parse().unwrap(),
            port: vars["SWTPM_PORT"].parse().unwrap(),
            state,
            vars,
            _serial: serial,
        })
    }

    fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.state.path().join(name)
    }

    /// Runs a tpm2-tools command against this TPM; panics on failure.
    fn tpm2(&self, tool: &str, args: &[&str]) -> String {
        let out = Command::new(tool)
            .args(args)
            .env("TPM2TOOLS_TCTI", self.tcti())
            .current_dir(self.state.path())
            .output()
            .unwrap_or_else(|e| panic!("running {tool}: {e}"));
        assert!(
            out.status.success(),
            "{tool} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// The SHA-256 PCR values as `tpm2_pcrread` reports them.
    fn pcrread(&self, pcrs: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let list: Vec<String> = pcrs.iter().map(u8::to_string).collect();
        let out = self.tpm2("tpm2_pcrread", &[&format!("sha256:{}", list.join(","))]);
        let mut values = Vec::new();
        for line in out.lines() {
            if let Some((index, value)) = line.trim().split_once(':')
                && let Some(hex) = value.trim().strip_prefix("0x")
            {
                values.push((index.trim().parse().unwrap(), hex::decode(hex).unwrap()));
            }
        }
        values.sort();
        assert_eq!(values.len(), pcrs.len(), "tpm2_pcrread output: {out}");
        values
    }

    /// The TPM's own EK through tpm2-tools: (TPM2B_PUBLIC, DER SPKI).
    fn tpm2_tools_ek(&self) -> (Vec<u8>, Vec<u8>) {
        self.tpm2(
            "tpm2_createek",
            &["-c", "ek.ctx", "-G", "rsa", "-u", "ek.pub"],
        );
        self.tpm2(
            "tpm2_readpublic",
            &["-c", "ek.ctx", "-f", "der", "-o", "ek.der"],
        );
        // No resource manager: flush what the tools left loaded.
        self.tpm2("tpm2_flushcontext", &["-t"]);
        (
            std::fs::read(self.path("ek.pub")).unwrap(),
            std::fs::read(self.path("ek.der")).unwrap(),
        )
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        let pid = Pid::from_raw(self.pid);
        if kill(pid, Signal::SIGTERM).is_ok() {
            let deadline = Instant::now() + Duration::from_secs(3);
            // Gone once the port is closed (the daemon may stay a zombie).
            while Instant::now() < deadline
                && std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

fn random(len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    SystemRandom::new().fill(&mut out).unwrap();
    out
}

fn sha256(data: &[u8]) -> Vec<u8> {
    digest(&SHA256, data).as_ref().to_vec()
}

/// Evidence, EK allow-listed, credential activated: what a server accepts.
fn attest(tpm: &mut AgentTpm) -> (TpmEvidence, String) {
    let evidence = tpm.evidence().unwrap();
    let hash = ek_hash(&evidence.ek_public).unwrap();
    assert_eq!(
        verify_ek(&evidence, std::slice::from_ref(&hash), &[]).unwrap(),
        hash
    );
    let secret = random(32);
    let (blob, encrypted) =
        make_credential(&evidence.ek_public, &evidence.ak_public, &secret).unwrap();
    let returned = tpm.activate_credential(&blob, &encrypted).unwrap();
    check_activation(&secret, &returned).unwrap();
    (evidence, hash)
}

#[test]
fn full_flow_allow_listed_ek_activation_and_fresh_quote() {
    let Some(swtpm) = Swtpm::start() else { return };
    let mut tpm = AgentTpm::open(&swtpm.tcti()).unwrap();
    let evidence = tpm.evidence().unwrap();
    assert_eq!(
        evidence.ek_cert, None,
        "a blank swtpm has no EK certificate"
    );
    // The AK is created once per AgentTpm.
    assert_eq!(tpm.evidence().unwrap(), evidence);

    let hash = ek_hash(&evidence.ek_public).unwrap();
    assert_eq!(hash.len(), 64);
    assert_eq!(
        verify_ek(&evidence, &[hash.to_uppercase()], &[]).unwrap(),
        hash
    );

    let secret = random(32);
    let (blob, encrypted) =
        make_credential(&evidence.ek_public, &evidence.ak_public, &secret).unwrap();
    let returned = tpm.activate_credential(&blob, &encrypted).unwrap();
    assert_eq!(returned, secret);
    check_activation(&secret, &returned).unwrap();

    let pcrs = [0u8, 1, 2, 3, 4, 5, 6, 7, 16, 23];
    let nonce = random(32);
    let quote = tpm.quote(&nonce, &pcrs).unwrap();
    let verified = verify_quote(&evidence.ak_public, &quote, &nonce, &pcrs).unwrap();
    assert_eq!(verified, quote.pcr_values);
    assert_eq!(verified.len(), pcrs.len());
    assert_eq!(verified, tpm.read_pcrs(&pcrs).unwrap());
    drop(tpm); // the TPM connection is not held between calls anyway
    assert_eq!(verified, swtpm.pcrread(&pcrs));
}

#[test]
fn ek_hash_is_the_sha256_of_the_der_public_key_tpm2_tools_reports() {
    let Some(swtpm) = Swtpm::start() else { return };
    let evidence = AgentTpm::open(&swtpm.tcti()).unwrap().evidence().unwrap();
    let (tools_ek_public, tools_ek_der) = swtpm.tpm2_tools_ek();
    assert_eq!(
        evidence.ek_public, tools_ek_public,
        "same default EK template, same TPM2B_PUBLIC bytes as tpm2_createek"
    );
    assert_eq!(
        ek_hash(&evidence.ek_public).unwrap(),
        hex::encode(sha256(&tools_ek_der))
    );
    // And openssl agrees the DER is a 2048-bit RSA key.
    let out = Command::new("openssl")
        .args(["pkey", "-pubin", "-inform", "DER", "-noout", "-text"])
        .arg("-in")
        .arg(swtpm.path("ek.der"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("2048 bit"));
}

#[test]
fn ek_not_allow_listed_is_refused() {
    let Some(swtpm) = Swtpm::start() else { return };
    let evidence = AgentTpm::open(&swtpm.tcti()).unwrap().evidence().unwrap();
    let hash = ek_hash(&evidence.ek_public).unwrap();
    let other = hex::encode(sha256(b"another TPM"));
    for allowed in [vec![], vec![other]] {
        match verify_ek(&evidence, &allowed, &[]) {
            Err(TpmError::EkNotTrusted { ek_hash, reason }) => {
                assert_eq!(ek_hash, hash);
                assert!(reason.contains("not allow-listed"), "{reason}");
            }
            other => panic!("expected EkNotTrusted, got {other:?}"),
        }
    }
    // The AK is not an EK: evidence that swaps them is refused outright.
    let swapped = TpmEvidence {
        ek_public: evidence.ak_public.clone(),
        ..evidence.clone()
    };
    assert!(matches!(
        verify_ek(&swapped, &[ek_hash(&evidence.ak_public).unwrap()], &[]),
        Err(TpmError::BadEkAttributes(_))
    ));
}

#[test]
fn replayed_quote_with_an_old_nonce_is_refused() {
    let Some(swtpm) = Swtpm::start() else { return };
    let mut tpm = AgentTpm::open(&swtpm.tcti()).unwrap();
    let (evidence, _) = attest(&mut tpm);
    let pcrs = [0u8, 7];
    let old_nonce = random(32);
    let old_quote = tpm.quote(&old_nonce, &pcrs).unwrap();
    verify_quote(&evidence.ak_public, &old_quote, &old_nonce, &pcrs).unwrap();

    let new_nonce = random(32);
    assert_eq!(
        verify_quote(&evidence.ak_public, &old_quote, &new_nonce, &pcrs),
        Err(TpmError::NonceMismatch)
    );
    let fresh = tpm.quote(&new_nonce, &pcrs).unwrap();
    verify_quote(&evidence.ak_public, &fresh, &new_nonce, &pcrs).unwrap();
}

#[test]
fn pcr_extended_between_quotes_changes_the_verified_value() {
    let Some(swtpm) = Swtpm::start() else { return };
    let mut tpm = AgentTpm::open(&swtpm.tcti()).unwrap();
    let (evidence, _) = attest(&mut tpm);
    let pcrs = [7u8, 16];

    let nonce1 = random(32);
    let before = verify_quote(
        &evidence.ak_public,
        &tpm.quote(&nonce1, &pcrs).unwrap(),
        &nonce1,
        &pcrs,
    )
    .unwrap();

    // Another process measures something into PCR 16 while the agent runs.
    let measured = sha256(b"a new kernel");
    swtpm.tpm2(
        "tpm2_pcrextend",
        &[&format!("16:sha256={}", hex::encode(&measured))],
    );

    let nonce2 = random(32);
    let after = verify_quote(
        &evidence.ak_public,
        &tpm.quote(&nonce2, &pcrs).unwrap(),
        &nonce2,
        &pcrs,
    )
    .unwrap();
    assert_eq!(before[0], after[0], "PCR 7 untouched");
    assert_ne!(before[1], after[1], "PCR 16 changed");
    // extend: new = sha256(old || measurement)
    assert_eq!(
        after[1].1,
        sha256(&[before[1].1.clone(), measured].concat())
    );
    assert_eq!(after, swtpm.pcrread(&pcrs));
}

#[test]
fn tampered_quotes_signatures_and_pcr_values_are_refused() {
    let Some(swtpm) = Swtpm::start() else { return };
    let mut tpm = AgentTpm::open(&swtpm.tcti()).unwrap();
    let (evidence, _) = attest(&mut tpm);
    let pcrs = [0u8, 7, 16];
    let nonce = random(32);
    let quote = tpm.quote(&nonce, &pcrs).unwrap();
    verify_quote(&evidence.ak_public, &quote, &nonce, &pcrs).unwrap();

    // Any flipped bit in the attestation or in the signature.
    for i in [0, 6, quote.attest.len() / 2, quote.attest.len() - 1] {
        let mut bad = quote.clone();
        bad.attest[i] ^= 0x01;
        assert_eq!(
            verify_quote(&evidence.ak_public, &bad, &nonce, &pcrs),
            Err(TpmError::BadSignature),
            "attest byte {i}"
        );
    }
    for i in [8, quote.signature.len() - 1] {
        let mut bad = quote.clone();
        bad.signature[i] ^= 0x80;
        assert_eq!(
            verify_quote(&evidence.ak_public, &bad, &nonce, &pcrs),
            Err(TpmError::BadSignature),
            "signature byte {i}"
        );
    }
    let mut truncated = quote.clone();
    truncated.signature.pop();
    assert!(verify_quote(&evidence.ak_public, &truncated, &nonce, &pcrs).is_err());

    // PCR values that are not the quoted ones.
    let mut lying = quote.clone();
    lying.pcr_values[1].1 = sha256(b"what the server wants to see");
    assert!(matches!(
        verify_quote(&evidence.ak_public, &lying, &nonce, &pcrs),
        Err(TpmError::PcrValuesMismatch(_))
    ));
    let mut missing = quote.clone();
    missing.pcr_values.pop();
    assert!(matches!(
        verify_quote(&evidence.ak_public, &missing, &nonce, &pcrs),
        Err(TpmError::PcrValuesMismatch(_))
    ));

    // A quote over other PCRs than the server asked for.
    assert!(matches!(
        verify_quote(&evidence.ak_public, &quote, &nonce, &[0, 7]),
        Err(TpmError::PcrSelectionMismatch { .. })
    ));

    // Signed by another AK (another agent on the same TPM).
    let mut other = AgentTpm::open(&swtpm.tcti()).unwrap();
    let other_ak = other.evidence().unwrap().ak_public;
    assert_ne!(other_ak, evidence.ak_public);
    assert_eq!(
        verify_quote(&other_ak, &quote, &nonce, &pcrs),
        Err(TpmError::BadSignature)
    );
}

#[test]
fn credential_made_for_another_ak_does_not_activate() {
    let Some(swtpm) = Swtpm::start() else { return };
    let mut agent = AgentTpm::open(&swtpm.tcti()).unwrap();
    let evidence = agent.evidence().unwrap();
    // A second AK in the same TPM, e.g. from a rogue process.
    let other_ak = AgentTpm::open(&swtpm.tcti())
        .unwrap()
        .evidence()
        .unwrap()
        .ak_public;

    let secret = random(32);
    let (blob, encrypted) = make_credential(&evidence.ek_public, &other_ak, &secret).unwrap();
    match agent.activate_credential(&blob, &encrypted) {
        Err(TpmError::Tpm { operation, .. }) => {
            assert_eq!(operation, "TPM2_ActivateCredential")
        }
        other => panic!("expected the TPM to refuse, got {other:?}"),
    }
    // A tampered blob for the right AK fails too.
    let (mut blob, encrypted) =
        make_credential(&evidence.ek_public, &evidence.ak_public, &secret).unwrap();
    let last = blob.len() - 1;
    blob[last] ^= 1;
    assert!(agent.activate_credential(&blob, &encrypted).is_err());
    // The TPM still has free object slots: nothing leaked on the error paths.
    let (evidence, _) = attest(&mut agent);
    let nonce = random(32);
    let quote = agent.quote(&nonce, &[0]).unwrap();
    verify_quote(&evidence.ak_public, &quote, &nonce, &[0]).unwrap();
    let handles = swtpm.tpm2("tpm2_getcap", &["handles-transient"]);
    assert!(
        handles.trim().is_empty(),
        "transient handles left: {handles}"
    );
}

#[test]
fn credential_from_tpm2_makecredential_activates() {
    let Some(swtpm) = Swtpm::start() else { return };
    let mut agent = AgentTpm::open(&swtpm.tcti()).unwrap();
    let evidence = agent.evidence().unwrap();
    // tpm2-tools' software MakeCredential (OpenSSL), for the AK's Name.
    let ak_name = [&[0x00, 0x0b][..], &sha256(&evidence.ak_public[2..])].concat();
    let secret = random(32);
    std::fs::write(swtpm.path("ek.pub"), &evidence.ek_public).unwrap();
    std::fs::write(swtpm.path("secret"), &secret).unwrap();
    swtpm.tpm2(
        "tpm2_makecredential",
        &[
            "-T",
            "none",
            "-u",
            "ek.pub",
            "-s",
            "secret",
            "-n", // tpm2-tools 5.4 takes the Name in hex
            &hex::encode(&ak_name),
            "-o",
            "cred",
        ],
    );
    // File: magic 0xBADCC0DE, version 1, TPM2B_ID_OBJECT, TPM2B_ENCRYPTED_SECRET.
    let file = std::fs::read(swtpm.path("cred")).unwrap();
    assert_eq!(&file[..8], &[0xba, 0xdc, 0xc0, 0xde, 0, 0, 0, 1]);
    let blob_len = 2 + usize::from(u16::from_be_bytes([file[8], file[9]]));
    let (blob, encrypted) = file[8..].split_at(blob_len);
    assert_eq!(agent.activate_credential(blob, encrypted).unwrap(), secret);

    // And ours has the same shape as theirs.
    let (ours, ours_encrypted) =
        make_credential(&evidence.ek_public, &evidence.ak_public, &secret).unwrap();
    assert_eq!(ours.len(), blob.len());
    assert_eq!(ours_encrypted.len(), encrypted.len());
}

#[test]
fn ecc_p256_attestation_key_full_flow() {
    let Some(swtpm) = Swtpm::start() else { return };
    let mut tpm = AgentTpm::open_with(&swtpm.tcti(), AkAlgorithm::EccP256).unwrap();
    let (evidence, _) = attest(&mut tpm);
    let pcrs = [0u8, 16];
    let nonce = random(16);
    let quote = tpm.quote(&nonce, &pcrs).unwrap();
    assert_eq!(
        verify_quote(&evidence.ak_public, &quote, &nonce, &pcrs).unwrap(),
        quote.pcr_values
    );
    let mut bad = quote.clone();
    let last = bad.signature.len() - 1;
    bad.signature[last] ^= 1;
    assert_eq!(
        verify_quote(&evidence.ak_public, &bad, &nonce, &pcrs),
        Err(TpmError::BadSignature)
    );
}

#[test]
fn ek_certificate_from_the_manufacturer_ca_is_trusted() {
    let Some(swtpm) = Swtpm::start_with_ek_cert() else {
        return;
    };
    let mut tpm = AgentTpm::open(&swtpm.tcti()).unwrap();
    let evidence = tpm.evidence().unwrap();
    let cert = evidence
        .ek_cert
        .clone()
        .expect("swtpm_setup stored an EK certificate in NV 0x01c00002");
    let pem_to_der = |path: &str| {
        let out = Command::new("openssl")
            .args(["x509", "-outform", "DER", "-in", path])
            .output()
            .unwrap();
        assert!(out.status.success());
        out.stdout
    };
    let issuer = pem_to_der(&swtpm.vars["SWTPM_EK_CA"]);
    let root = pem_to_der(&swtpm.vars["SWTPM_EK_ROOT_CA"]);
    let hash = ek_hash(&evidence.ek_public).unwrap();

    // The certificate's key is the EK, as openssl reads it.
    std::fs::write(swtpm.path("ek.crt"), &cert).unwrap();
    let out = Command::new("sh")
        .arg("-c")
        .arg(
            "openssl x509 -inform DER -in ek.crt -noout -pubkey | openssl pkey -pubin -outform DER",
        )
        .current_dir(swtpm.state.path())
        .output()
        .unwrap();
    assert_eq!(hex::encode(sha256(&out.stdout)), hash);

    // Not allow-listed, but certified by the configured issuing CA.
    assert_eq!(
        verify_ek(&evidence, &[], &[root.clone(), issuer.clone()]).unwrap(),
        hash
    );
    assert_eq!(
        verify_ek(&evidence, &[], std::slice::from_ref(&issuer)).unwrap(),
        hash
    );
    // The root alone is not enough: the evidence carries no intermediates.
    assert!(matches!(
        verify_ek(&evidence, &[], std::slice::from_ref(&root)),
        Err(TpmError::EkNotTrusted { .. })
    ));
    // Without CAs the certificate is worthless.
    assert!(matches!(
        verify_ek(&evidence, &[], &[]),
        Err(TpmError::EkNotTrusted { .. })
    ));

    // The activation works with this EK as well.
    let (_, _) = attest(&mut tpm);

    // A genuine certificate presented with another TPM's EK is refused.
    drop(tpm);
    drop(swtpm);
    let Some(other) = Swtpm::start() else { return };
    let other_evidence = AgentTpm::open(&other.tcti()).unwrap().evidence().unwrap();
    let forged = TpmEvidence {
        ek_cert: Some(cert),
        ..other_evidence
    };
    match verify_ek(&forged, &[], &[issuer]) {
        Err(TpmError::EkNotTrusted { reason, .. }) => {
            assert!(reason.contains("another key"), "{reason}")
        }
        other => panic!("expected EkNotTrusted, got {other:?}"),
    }
}

#[test]
fn misuse_and_unreachable_tpms_are_typed_errors() {
    let Some(swtpm) = Swtpm::start() else { return };
    let mut tpm = AgentTpm::open(&swtpm.tcti()).unwrap();
    assert_eq!(
        tpm.quote(&random(32), &[0]),
        Err(TpmError::NoAttestationKey)
    );
    assert_eq!(
        tpm.activate_credential(&[0, 0], &[0, 0]),
        Err(TpmError::NoAttestationKey)
    );
    let evidence = tpm.evidence().unwrap();
    assert!(matches!(
        tpm.quote(&random(8), &[0]),
        Err(TpmError::InvalidArgument(_))
    ));
    assert!(matches!(
        tpm.quote(&random(32), &[24]),
        Err(TpmError::InvalidArgument(_))
    ));
    assert!(matches!(
        tpm.activate_credential(&[0, 5, 1], &[0, 0]),
        Err(TpmError::Malformed { .. })
    ));
    // The server refuses an AK that is not a restricted signing key: the EK.
    assert!(matches!(
        make_credential(&evidence.ek_public, &evidence.ek_public, &[1; 32]),
        Err(TpmError::BadAkAttributes(_))
    ));
    assert!(matches!(
        make_credential(&evidence.ak_public, &evidence.ak_public, &[1; 32]),
        Err(TpmError::BadEkAttributes(_))
    ));
    assert!(matches!(
        AgentTpm::open("no-such-tcti-module"),
        Err(TpmError::InvalidArgument(_) | TpmError::Tpm { .. })
    ));
    // Nothing listens on port 1.
    assert!(matches!(
        AgentTpm::open("swtpm:host=127.0.0.1,port=1"),
        Err(TpmError::Tpm { .. })
    ));
}
