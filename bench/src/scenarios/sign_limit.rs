//! `sign-limit`: raw ECDSA P-256 (SHA-256) signatures per second on one
//! core with ring, the library rcgen signs with for the CA — the physical
//! reference for `mint`. Verifications per second are reported too: the
//! server checks every CSR's signature before signing.

use std::time::{Duration, Instant};

use ring::rand::SystemRandom;
use ring::signature::{
    ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair,
    UnparsedPublicKey,
};

use crate::Result;
use crate::harness::{nproc, on_pinned_thread};
use crate::report::{Record, Reporter, progress};

/// Size of the message signed: about an SVID's TBSCertificate.
const MSG_LEN: usize = 450;

#[derive(clap::Args, Default)]
pub(crate) struct Args {
    /// Seconds of signing (default 3; 0.3 with --quick).
    #[arg(long)]
    seconds: Option<f64>,
}

fn key(rng: &SystemRandom) -> Result<EcdsaKeyPair> {
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, rng)
        .map_err(|_| "key generation failed")?;
    Ok(
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), rng)
            .map_err(|_| "bad key")?,
    )
}

fn signs(kp: &EcdsaKeyPair, rng: &SystemRandom, msg: &[u8], d: Duration) -> Result<f64> {
    // Warm up caches and the CPU clock.
    for _ in 0..100 {
        kp.sign(rng, msg).map_err(|_| "sign failed")?;
    }
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < d {
        for _ in 0..64 {
            kp.sign(rng, msg).map_err(|_| "sign failed")?;
        }
        n += 64;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// Signatures per second on the calling thread, signing for `d`.
pub(crate) fn signs_per_sec(d: Duration) -> Result<f64> {
    let rng = SystemRandom::new();
    signs(&key(&rng)?, &rng, &[0x5au8; MSG_LEN], d)
}

/// Signatures and verifications per second on the calling thread.
pub(crate) fn measure(d: Duration) -> Result<(f64, f64)> {
    let rng = SystemRandom::new();
    let kp = key(&rng)?;
    let msg = vec![0x5au8; MSG_LEN];
    let signs = signs(&kp, &rng, &msg, d)?;
    let sig = kp.sign(&rng, &msg).map_err(|_| "sign failed")?;
    let pk = UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, kp.public_key().as_ref().to_vec());
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < d / 2 {
        for _ in 0..64 {
            pk.verify(&msg, sig.as_ref()).map_err(|_| "verify failed")?;
        }
        n += 64;
    }
    let verifies = n as f64 / start.elapsed().as_secs_f64();
    Ok((signs, verifies))
}

/// The CPU single-core measurements run on: the last one (the harness
/// pins servers to CPU 0).
pub(crate) fn bench_cpu() -> Option<usize> {
    (nproc() > 1).then(|| nproc() - 1)
}

pub(crate) async fn run(a: &Args, quick: bool, rep: &mut Reporter) -> Result<()> {
    let secs = a.seconds.unwrap_or(if quick { 0.3 } else { 3.0 });
    progress(format!("sign-limit: signing for {secs} s on one core"));
    let d = Duration::from_secs_f64(secs);
    let (signs, verifies) =
        on_pinned_thread(bench_cpu(), move || async move { measure(d) }).await?;
    rep.emit(
        Record::new("sign-limit")
            .f("signs_per_sec", signs)
            .f("verifies_per_sec", verifies)
            .f("sign_us", 1e6 / signs)
            .f("verify_us", 1e6 / verifies)
            .with("library", "ring 0.17 (ECDSA_P256_SHA256_ASN1)"),
    );
    rep.table("sign-limit");
    Ok(())
}
