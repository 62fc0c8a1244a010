//! `[upstream_authority]`: the enterprise CA under which the trust domain's
//! X.509 CAs are issued (see `crate::upstream`). Only the paths are checked
//! here; the files are read and checked at start, before anything is
//! written to `data_dir`.

use std::path::PathBuf;

use serde::Deserialize;

use super::{ConfigError, absolute};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstream {
    cert_path: PathBuf,
    key_path: PathBuf,
    bundle_path: PathBuf,
}

/// `[upstream_authority]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamConfig {
    /// PEM: the upstream CA certificate, optionally followed by its chain
    /// of intermediates towards (not necessarily including) a root.
    pub cert_path: PathBuf,
    /// PKCS#8 PEM private key of the upstream CA (mode 0600 or 0400).
    pub key_path: PathBuf,
    /// PEM: the upstream root(s), which become the trust bundle.
    pub bundle_path: PathBuf,
}

impl RawUpstream {
    /// Validates `[upstream_authority]`: three absolute paths.
    pub(super) fn validate(self) -> Result<UpstreamConfig, ConfigError> {
        absolute("upstream_authority.cert_path", &self.cert_path)?;
        absolute("upstream_authority.key_path", &self.key_path)?;
        absolute("upstream_authority.bundle_path", &self.bundle_path)?;
        Ok(UpstreamConfig {
            cert_path: self.cert_path,
            key_path: self.key_path,
            bundle_path: self.bundle_path,
        })
    }
}
