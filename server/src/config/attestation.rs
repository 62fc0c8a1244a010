//! Node attestation sections: `[x509pop]` (the roots node certificates
//! must chain to) and `[tpm]` (which TPMs may attest, and what they quote).

use std::path::PathBuf;

use serde::Deserialize;

use super::{ConfigError, absolute, key_err};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawX509Pop {
    ca_bundle_path: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTpm {
    #[serde(default)]
    ek_hashes: Vec<String>,
    #[serde(default)]
    ek_ca_path: Option<PathBuf>,
    #[serde(default = "default_pcrs")]
    pcrs: Vec<u32>,
}

fn default_pcrs() -> Vec<u32> {
    vec![0, 7]
}

/// `[tpm]`: which TPMs may attest, and what to quote.
#[derive(Debug, Clone)]
pub struct TpmConfig {
    /// Allowed EK public key hashes (hex SHA-256), for EKs without a certificate.
    pub ek_hashes: Vec<String>,
    /// PEM EK CA certificates, for EKs with a manufacturer certificate.
    pub ek_ca_path: Option<PathBuf>,
    /// sha256-bank PCRs every quote must cover.
    pub pcrs: Vec<u8>,
}

impl RawX509Pop {
    /// Validates `[x509pop]`: the path of the PEM roots.
    pub(super) fn validate(self) -> Result<PathBuf, ConfigError> {
        absolute("x509pop.ca_bundle_path", &self.ca_bundle_path)?;
        Ok(self.ca_bundle_path)
    }
}

impl RawTpm {
    /// Validates `[tpm]`: PCR indexes exist, EK hashes are hex SHA-256,
    /// and at least one way to admit a TPM is given.
    pub(super) fn validate(self) -> Result<TpmConfig, ConfigError> {
        let t = self;
        let mut pcrs = Vec::with_capacity(t.pcrs.len());
        for p in t.pcrs {
            if p > 23 {
                return Err(key_err(
                    "tpm.pcrs",
                    format!("PCR {p} does not exist (0-23)"),
                ));
            }
            pcrs.push(p as u8);
        }
        if pcrs.is_empty() {
            return Err(key_err("tpm.pcrs", "quote at least one PCR"));
        }
        for h in &t.ek_hashes {
            if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(key_err(
                    "tpm.ek_hashes",
                    format!("{h:?} is not a hex SHA-256"),
                ));
            }
        }
        if t.ek_hashes.is_empty() && t.ek_ca_path.is_none() {
            return Err(key_err(
                "tpm.ek_hashes",
                "give ek_hashes or ek_ca_path: no TPM could attest otherwise",
            ));
        }
        if let Some(p) = &t.ek_ca_path {
            absolute("tpm.ek_ca_path", p)?;
        }
        Ok(TpmConfig {
            ek_hashes: t.ek_hashes.iter().map(|h| h.to_ascii_lowercase()).collect(),
            ek_ca_path: t.ek_ca_path,
            pcrs,
        })
    }
}
