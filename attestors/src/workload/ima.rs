//! The `ima` workload attestor: `ima:sha256:<digest>` for a process whose
//! executable (the file the kernel maps, hashed by the `unix` attestor as
//! `unix:sha256`) is listed in the node's IMA measurement log, and only
//! when that log verifies: it is replayed (see
//! [`crate::node::ima::verify_log`]) against SHA-256 PCR 10 read from the
//! TPM at `tcti`. A log that does not replay to the PCR, an unreadable log
//! or an unreachable TPM make the attestor fail (no `ima` selectors, the
//! caller is refused as incomplete), never a selector from an unverified
//! log. A process whose binary changed after it started has no
//! `unix:sha256` and gets no `ima` selector either.
//!
//! The log and the PCR are read afresh on every call (on a blocking
//! thread): a log only grows, and a stale verified copy could vouch for a
//! digest the TPM no longer backs if the PCR was reset.

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use sigil_core::selector::Selector;

use super::{BoxFuture, Workload, WorkloadAttestError, WorkloadAttestor};
use crate::node::ima::{ImaBank, verify_log};

/// Largest IMA log read (a busy host's log is a few MiB).
pub const MAX_LOG_BYTES: u64 = 64 << 20;

/// `[workload_attestor.ima]`, validated.
#[derive(Debug, Clone)]
pub struct ImaConfig {
    /// The binary ima-ng log kept for the SHA-256 bank
    /// (`/sys/kernel/security/ima/binary_runtime_measurements_sha256`).
    pub log_path: PathBuf,
    /// TCTI of the TPM whose PCR 10 the log must replay to.
    pub tcti: String,
    /// Per call.
    pub timeout: Duration,
}

/// The attestor.
#[derive(Debug)]
pub struct ImaAttestor {
    cfg: ImaConfig,
}

impl ImaAttestor {
    /// An attestor for `cfg`.
    pub fn new(cfg: ImaConfig) -> Self {
        Self { cfg }
    }

    /// Reads and verifies the log, then answers for `exe_sha256`.
    fn answer(cfg: &ImaConfig, exe_sha256: &str) -> Result<Vec<Selector>, WorkloadAttestError> {
        let unavailable = |what: String| WorkloadAttestError::Unavailable(what);
        let f = std::fs::File::open(&cfg.log_path)
            .map_err(|e| unavailable(format!("IMA log {}: {e}", cfg.log_path.display())))?;
        let mut log = Vec::new();
        f.take(MAX_LOG_BYTES + 1)
            .read_to_end(&mut log)
            .map_err(|e| unavailable(format!("IMA log {}: {e}", cfg.log_path.display())))?;
        if log.len() as u64 > MAX_LOG_BYTES {
            return Err(unavailable(format!(
                "IMA log {} is larger than {MAX_LOG_BYTES} bytes",
                cfg.log_path.display()
            )));
        }
        let pcr = crate::node::tpm::read_ima_pcr(&cfg.tcti)
            .map_err(|e| unavailable(format!("reading PCR 10: {e}")))?;
        let verified = verify_log(&log, ImaBank::Sha256, &pcr).map_err(|e| {
            unavailable(format!(
                "IMA log {} does not verify: {e}",
                cfg.log_path.display()
            ))
        })?;
        if !verified.contains(exe_sha256) {
            return Ok(Vec::new());
        }
        Selector::new("ima", &format!("sha256:{exe_sha256}"))
            .map(|s| vec![s])
            .map_err(|e| unavailable(format!("ima selector: {e}")))
    }
}

impl WorkloadAttestor for ImaAttestor {
    fn kind(&self) -> &'static str {
        "ima"
    }

    fn timeout(&self) -> Duration {
        self.cfg.timeout
    }

    fn needs_exe_digest(&self) -> bool {
        true
    }

    fn attest<'a>(
        &'a self,
        workload: &'a Workload,
    ) -> BoxFuture<'a, Result<Vec<Selector>, WorkloadAttestError>> {
        Box::pin(async move {
            let Some(digest) = workload.exe_sha256.clone() else {
                return Ok(Vec::new());
            };
            let cfg = self.cfg.clone();
            tokio::task::spawn_blocking(move || Self::answer(&cfg, &digest))
                .await
                .map_err(|_| WorkloadAttestError::Unavailable("ima task failed".into()))?
        })
    }
}
