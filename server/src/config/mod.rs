//! `server.toml` (every key in deploy/config/server.toml), unknown keys refused,
//! every duration bounded (see the `MAX_*` constants), `log_level` one of
//! the level names, and every path absolute.
//!
//! Each table is its own type with its own validation, in its own module:
//! [`datastore`] (`[datastore]`), [`attestation`] (`[x509pop]`, `[tpm]`),
//! [`federation`] (`[bundle_endpoint]`, `[[federation]]`, `[oidc]`),
//! [`upstream`] (`[upstream_authority]`), and
//! `[limits]` in `crate::limits`. This module holds the top-level keys and
//! [`ServerConfig::parse`], which validates them and calls each section.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use sigil_core::TrustDomain;
use sigil_core::duration::parse_field;

mod attestation;
mod datastore;
mod federation;
mod key_manager;
mod upstream;

pub use attestation::TpmConfig;
use attestation::{RawTpm, RawX509Pop};
use datastore::RawDatastore;
pub use datastore::{
    DEFAULT_CACHE_MIB, DEFAULT_POOL_SIZE, DatastoreKind, MAX_CACHE_MIB, MAX_POOL_SIZE, PgSslMode,
    PostgresConfig, postgres_url,
};
pub use federation::{BundleEndpointConfig, EndpointProfile, FederationConfig, OidcConfig};
use federation::{RawBundleEndpoint, RawFederation, RawOidc};
use key_manager::RawKeyManager;
pub use key_manager::{KeyManagerKind, Pkcs11Config};
pub use upstream::UpstreamConfig;

/// Built-in admin socket path (DESIGN.md).
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/sigil/server/admin.sock";

const DAY: u64 = 86_400;
/// Largest `ca_ttl` (also the life of each JWT signing key).
pub const MAX_CA_TTL: Duration = Duration::from_secs(365 * DAY);
/// Largest `default_x509_svid_ttl`, `default_jwt_svid_ttl` and
/// `agent_svid_ttl`: the same limit as an entry's own TTLs.
pub const MAX_SVID_TTL: Duration = sigil_core::entry::MAX_TTL;
/// Largest `bundle_endpoint.refresh_hint`.
pub const MAX_REFRESH_HINT: Duration = Duration::from_secs(DAY);
/// Largest `audit_retention` (ten years).
const MAX_AUDIT_RETENTION: Duration = Duration::from_secs(10 * 366 * 86_400);
/// Largest `audit_checkpoint_every`.
pub const MAX_AUDIT_CHECKPOINT_EVERY: u64 = 1_000_000;
/// Largest `audit_checkpoint_interval`.
pub const MAX_AUDIT_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(DAY);
pub use sigil_core::LOG_LEVELS;

/// Refuses an empty or relative path, naming the key.
pub(super) fn absolute(key: &'static str, p: &Path) -> Result<(), ConfigError> {
    sigil_core::config_path_problem(p).map_or(Ok(()), |reason| Err(key_err(key, reason)))
}

/// Checks `log_level` against [`LOG_LEVELS`] (`info` when absent).
pub fn log_level(v: Option<String>) -> Result<String, ConfigError> {
    let v = v.unwrap_or_else(|| "info".into());
    match sigil_core::log_level_problem(&v) {
        None => Ok(v),
        Some(reason) => Err(key_err("log_level", reason)),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    trust_domain: String,
    #[serde(default = "default_bind_address")]
    bind_address: String,
    #[serde(default = "default_bind_port")]
    bind_port: u16,
    data_dir: PathBuf,
    #[serde(default)]
    admin_socket: Option<PathBuf>,
    #[serde(default = "default_ca_ttl")]
    ca_ttl: String,
    #[serde(default = "default_x509_ttl")]
    default_x509_svid_ttl: String,
    #[serde(default = "default_jwt_ttl")]
    default_jwt_svid_ttl: String,
    #[serde(default = "default_agent_ttl")]
    agent_svid_ttl: String,
    #[serde(default)]
    log_level: Option<String>,
    #[serde(default)]
    datastore: Option<RawDatastore>,
    #[serde(default)]
    jwt_issuer: Option<String>,
    #[serde(default)]
    jwt_key_type: Option<String>,
    #[serde(default)]
    verify_csr_signatures: bool,
    /// Undocumented, for `sigil-bench mint`'s baseline only.
    #[serde(default = "default_true")]
    audit_issuance: bool,
    #[serde(default)]
    bundle_endpoint: Option<RawBundleEndpoint>,
    #[serde(default)]
    federation: Vec<RawFederation>,
    #[serde(default)]
    oidc: Option<RawOidc>,
    #[serde(default)]
    x509pop: Option<RawX509Pop>,
    #[serde(default)]
    tpm: Option<RawTpm>,
    #[serde(default)]
    key_manager: Option<RawKeyManager>,
    #[serde(default)]
    limits: crate::limits::RawLimits,
    #[serde(default)]
    telemetry: sigil_telemetry::RawTelemetry,
    #[serde(default = "default_audit_checkpoint_every")]
    audit_checkpoint_every: u64,
    #[serde(default = "default_audit_checkpoint_interval")]
    audit_checkpoint_interval: String,
    #[serde(default)]
    audit_retention: Option<String>,
    // Governance (issue 11).
    #[serde(default)]
    require_owner: bool,
    #[serde(default = "default_review_max_ttl")]
    review_max_ttl: String,
    #[serde(default)]
    jwt_attestation_claims: bool,
    #[serde(default)]
    approvers_gid: Option<u32>,
    // Delegation (issue 11 §5): see crate::trusted_issuer.
    #[serde(default)]
    trusted_issuer: Vec<crate::trusted_issuer::RawTrustedIssuer>,
    #[serde(default)]
    max_delegation_depth: Option<u32>,
    #[serde(default)]
    upstream_authority: Option<upstream::RawUpstream>,
}

fn default_review_max_ttl() -> String {
    "24h".into()
}

pub(super) fn default_bind_address() -> String {
    "127.0.0.1".into()
}
fn default_bind_port() -> u16 {
    8081
}
fn default_ca_ttl() -> String {
    "24h".into()
}
fn default_x509_ttl() -> String {
    "1h".into()
}
fn default_jwt_ttl() -> String {
    "5m".into()
}
fn default_audit_checkpoint_every() -> u64 {
    1000
}
fn default_audit_checkpoint_interval() -> String {
    "60s".into()
}
fn default_agent_ttl() -> String {
    "1h".into()
}

fn default_true() -> bool {
    true
}

/// A validated server configuration.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub trust_domain: TrustDomain,
    pub bind_address: std::net::IpAddr,
    pub bind_port: u16,
    pub data_dir: PathBuf,
    pub admin_socket: PathBuf,
    pub ca_ttl: Duration,
    pub default_x509_svid_ttl: Duration,
    pub default_jwt_svid_ttl: Duration,
    pub agent_svid_ttl: Duration,
    pub log_level: String,
    pub datastore: DatastoreKind,
    /// `iss` claim of JWT-SVIDs (defaults to the OIDC issuer when set).
    pub jwt_issuer: Option<String>,
    /// Key type of the JWT signing keys (`ec-p256` default, `ec-p384`).
    pub jwt_key_type: sigil_core::jwt::JwtKeyType,
    /// `verify_csr_signatures`: check each workload CSR's self-signature
    /// (off by default: the agent's mTLS channel vouches for its keys; agent
    /// CSRs at attestation and renewal are always verified).
    pub workload_csr_check: sigil_core::x509::CsrSignature,
    /// Audit workload X.509- and JWT-SVID issuance (on unless the hidden
    /// key `audit_issuance = false` turns it off, for benchmark baselines).
    pub audit_issuance: bool,
    pub bundle_endpoint: Option<BundleEndpointConfig>,
    pub federation: Vec<FederationConfig>,
    pub oidc: Option<OidcConfig>,
    /// `[x509pop]`: PEM roots node certificates must chain to.
    pub x509pop_ca_bundle: Option<PathBuf>,
    pub tpm: Option<TpmConfig>,
    /// `[key_manager]`: where the CA and JWT signing keys are kept.
    pub key_manager: KeyManagerKind,
    /// `[limits]`: agent-API connection caps and idle timeout.
    pub limits: crate::limits::Limits,
    /// `[telemetry]`: where `/metrics`, `/ready` and `/live` are served.
    pub telemetry: sigil_telemetry::TelemetryConfig,
    /// Sign a checkpoint once this many records follow the last one.
    pub audit_checkpoint_every: u64,
    /// Sign a checkpoint when unsigned records are this old.
    pub audit_checkpoint_interval: Duration,
    /// Delete audit records older than this (keeping the chain verifiable
    /// from a signed checkpoint); `None` keeps everything.
    pub audit_retention: Option<Duration>,
    /// Governance settings (owners, review, context claims, approvals).
    pub governance: GovernanceConfig,
    /// `[[trusted_issuer]]` and `max_delegation_depth`.
    pub delegation: crate::trusted_issuer::DelegationConfig,
    /// `[upstream_authority]`: issue the CAs under an enterprise CA.
    pub upstream_authority: Option<UpstreamConfig>,
}

/// The governance keys of server.toml.
#[derive(Debug, Clone, Default)]
pub struct GovernanceConfig {
    /// `require_owner`: entries without `owner` are refused.
    pub require_owner: bool,
    /// `review_max_ttl`: `entry review` flags entries whose X.509- or
    /// JWT-SVID TTL is longer (default 24h).
    pub review_max_ttl: Duration,
    /// `jwt_attestation_claims`: JWT-SVIDs carry `sigil_attestation`.
    pub jwt_attestation_claims: bool,
    /// `approvers_gid`: only admin callers with this primary gid (root
    /// included) may grant or deny approval requests.
    pub approvers_gid: Option<u32>,
}

/// A config error, naming the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("config {0}: {1}")]
    Parse(PathBuf, String),
    #[error("config key `{key}`: {reason}")]
    Key { key: &'static str, reason: String },
}

pub(super) fn key_err(key: &'static str, reason: impl ToString) -> ConfigError {
    ConfigError::Key {
        key,
        reason: reason.to_string(),
    }
}

/// A duration key, bounded by `max`; the error names the key.
pub(super) fn duration(key: &'static str, v: &str, max: Duration) -> Result<Duration, ConfigError> {
    parse_field(key, v, max).map_err(|e| key_err(key, e.detail()))
}

/// The audit keys: `audit_checkpoint_every` in range, the checkpoint
/// interval at least a second, and `audit_retention` (when set) no shorter
/// than `ca_ttl`. Returns the interval and the retention.
fn audit_keys(
    every: u64,
    interval: &str,
    retention: Option<&str>,
    ca_ttl: Duration,
) -> Result<(Duration, Option<Duration>), ConfigError> {
    if !(1..=MAX_AUDIT_CHECKPOINT_EVERY).contains(&every) {
        return Err(key_err(
            "audit_checkpoint_every",
            format!("{every} is out of range (1 to {MAX_AUDIT_CHECKPOINT_EVERY} records)"),
        ));
    }
    let interval = duration(
        "audit_checkpoint_interval",
        interval,
        MAX_AUDIT_CHECKPOINT_INTERVAL,
    )?;
    if interval < Duration::from_secs(1) {
        return Err(key_err("audit_checkpoint_interval", "must be at least 1s"));
    }
    let retention = retention
        .map(|v| duration("audit_retention", v, MAX_AUDIT_RETENTION))
        .transpose()?;
    // No SVID outlives its CA, and a CA lives ca_ttl: a record older than
    // ca_ttl lists only expired SVIDs, so pruning it never takes a killed
    // serial off the CRL.
    if let Some(r) = retention
        && r < ca_ttl
    {
        return Err(key_err(
            "audit_retention",
            format!(
                "must be at least ca_ttl ({}s): the CRL of killed SVIDs is rebuilt from the issuance records of that window",
                ca_ttl.as_secs()
            ),
        ));
    }
    Ok((interval, retention))
}

impl ServerConfig {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.into(), e))?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse(_, m) => ConfigError::Parse(path.into(), m),
            other => other,
        })
    }

    /// Parses and validates config text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            ConfigError::Parse(
                PathBuf::new(),
                sigil_core::config_error(text, e.span(), e.message()),
            )
        })?;
        let trust_domain = TrustDomain::new(&raw.trust_domain)
            .map_err(|e| key_err("trust_domain", format!("{:?}: {e}", raw.trust_domain)))?;
        let bind_address = raw.bind_address.parse().map_err(|_| {
            key_err(
                "bind_address",
                format!("{:?} is not an IP address", raw.bind_address),
            )
        })?;
        let dur = duration;
        let ca_ttl = dur("ca_ttl", &raw.ca_ttl, MAX_CA_TTL)?;
        let default_x509_svid_ttl = dur(
            "default_x509_svid_ttl",
            &raw.default_x509_svid_ttl,
            MAX_SVID_TTL,
        )?;
        let default_jwt_svid_ttl = dur(
            "default_jwt_svid_ttl",
            &raw.default_jwt_svid_ttl,
            MAX_SVID_TTL,
        )?;
        let agent_svid_ttl = dur("agent_svid_ttl", &raw.agent_svid_ttl, MAX_SVID_TTL)?;
        let (audit_checkpoint_interval, audit_retention) = audit_keys(
            raw.audit_checkpoint_every,
            &raw.audit_checkpoint_interval,
            raw.audit_retention.as_deref(),
            ca_ttl,
        )?;
        if default_x509_svid_ttl > ca_ttl {
            return Err(key_err("default_x509_svid_ttl", "must not exceed ca_ttl"));
        }
        let datastore = RawDatastore::validate(raw.datastore)?;
        let tpm = raw.tpm.map(RawTpm::validate).transpose()?;
        let x509pop_ca_bundle = raw.x509pop.map(RawX509Pop::validate).transpose()?;
        let bundle_endpoint = raw
            .bundle_endpoint
            .map(RawBundleEndpoint::validate)
            .transpose()?;
        let federation = raw
            .federation
            .into_iter()
            .map(|f| f.validate(&trust_domain))
            .collect::<Result<Vec<_>, _>>()?;
        let oidc = raw.oidc.as_ref().map(RawOidc::validate).transpose()?;
        let jwt_key_type = match &raw.jwt_key_type {
            None => sigil_core::jwt::JwtKeyType::default(),
            Some(k) => {
                sigil_core::jwt::JwtKeyType::parse(k).map_err(|e| key_err("jwt_key_type", e))?
            }
        };
        let key_manager = RawKeyManager::validate(raw.key_manager)?;
        if matches!(key_manager, KeyManagerKind::Pkcs11(_))
            && jwt_key_type != sigil_core::jwt::JwtKeyType::EcP256
        {
            return Err(key_err(
                "jwt_key_type",
                "must be ec-p256 with [key_manager] kind = \"pkcs11\" (token keys are P-256)",
            ));
        }
        absolute("data_dir", &raw.data_dir)?;
        if let Some(p) = &raw.admin_socket {
            absolute("admin_socket", p)?;
        }
        let log_level = log_level(raw.log_level)?;
        let upstream_authority = raw
            .upstream_authority
            .map(upstream::RawUpstream::validate)
            .transpose()?;
        Ok(ServerConfig {
            upstream_authority,
            trust_domain,
            bind_address,
            bind_port: raw.bind_port,
            data_dir: raw.data_dir,
            admin_socket: raw
                .admin_socket
                .unwrap_or_else(|| DEFAULT_ADMIN_SOCKET.into()),
            ca_ttl,
            default_x509_svid_ttl,
            default_jwt_svid_ttl,
            agent_svid_ttl,
            log_level,
            datastore,
            delegation: crate::trusted_issuer::validate(
                raw.trusted_issuer,
                raw.max_delegation_depth,
                raw.jwt_issuer
                    .as_deref()
                    .or(raw.oidc.as_ref().map(|o| o.issuer.as_str())),
            )
            .map_err(|(key, reason)| key_err(key, reason))?,
            jwt_issuer: raw
                .jwt_issuer
                .or_else(|| raw.oidc.as_ref().map(|o| o.issuer.clone())),
            jwt_key_type,
            workload_csr_check: if raw.verify_csr_signatures {
                sigil_core::x509::CsrSignature::Verify
            } else {
                sigil_core::x509::CsrSignature::TrustChannel
            },
            audit_issuance: raw.audit_issuance,
            x509pop_ca_bundle,
            tpm,
            key_manager,
            bundle_endpoint,
            federation,
            oidc,
            limits: raw
                .limits
                .validate()
                .map_err(|(key, reason)| key_err(key, reason))?,
            telemetry: raw
                .telemetry
                .validate()
                .map_err(|(key, reason)| key_err(key, reason))?,
            audit_checkpoint_every: raw.audit_checkpoint_every,
            audit_checkpoint_interval,
            audit_retention,
            governance: GovernanceConfig {
                require_owner: raw.require_owner,
                review_max_ttl: dur("review_max_ttl", &raw.review_max_ttl, MAX_SVID_TTL)?,
                jwt_attestation_claims: raw.jwt_attestation_claims,
                approvers_gid: raw.approvers_gid,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_config_parses_with_defaults() {
        let c =
            ServerConfig::parse("trust_domain = \"example.org\"\ndata_dir = \"/tmp/x\"\n").unwrap();
        assert_eq!(c.bind_port, 8081);
        assert_eq!(c.default_x509_svid_ttl, Duration::from_secs(3600));
        assert_eq!(c.admin_socket, PathBuf::from(DEFAULT_ADMIN_SOCKET));
        assert_eq!(
            c.workload_csr_check,
            sigil_core::x509::CsrSignature::TrustChannel
        );
    }

    #[test]
    fn csr_signature_verification_can_be_required() {
        let base = "trust_domain = \"example.org\"\ndata_dir = \"/tmp/x\"\n";
        let c = ServerConfig::parse(&format!("{base}verify_csr_signatures = true\n")).unwrap();
        assert_eq!(c.workload_csr_check, sigil_core::x509::CsrSignature::Verify);
        let e = ServerConfig::parse(&format!("{base}verify_csr_signatures = \"yes\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("verify_csr_signatures"), "{e}");
    }

    #[test]
    fn errors_name_the_key() {
        let base = "trust_domain = \"example.org\"\ndata_dir = \"/tmp/x\"\n";
        let e = ServerConfig::parse(&format!("{base}bogus_key = 1\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("bogus_key"), "{e}");
        let e = ServerConfig::parse(&format!("{base}ca_ttl = \"soon\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("ca_ttl"), "{e}");
        let e = ServerConfig::parse("trust_domain = \"Not A Domain\"\ndata_dir = \"/x\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("trust_domain"), "{e}");
        let e = ServerConfig::parse(&format!("{base}bind_address = \"nowhere\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("bind_address"), "{e}");
    }

    #[test]
    fn durations_are_bounded_naming_the_key_and_the_limit() {
        let base = "trust_domain = \"example.org\"\ndata_dir = \"/tmp/x\"\n";
        for (line, key, limit) in [
            ("agent_svid_ttl = \"999999999d\"", "agent_svid_ttl", "30d"),
            ("agent_svid_ttl = \"31d\"", "agent_svid_ttl", "30d"),
            (
                "default_jwt_svid_ttl = \"-5\"",
                "default_jwt_svid_ttl",
                "30d",
            ),
            (
                "default_x509_svid_ttl = \"99999999999999999999\"",
                "default_x509_svid_ttl",
                "30d",
            ),
            ("ca_ttl = \"366d\"", "ca_ttl", "365d"),
            (
                "[bundle_endpoint]\nport = 1\nrefresh_hint = \"2d\"",
                "bundle_endpoint.refresh_hint",
                "1d",
            ),
        ] {
            let e = ServerConfig::parse(&format!("{base}{line}\n"))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(&format!("`{key}`")) && e.contains(limit),
                "{line}: {e}"
            );
        }
        let c = ServerConfig::parse(&format!(
            "{base}agent_svid_ttl = \"30d\"\nca_ttl = \"365d\"\n"
        ))
        .unwrap();
        assert_eq!(c.agent_svid_ttl, Duration::from_secs(30 * 86_400));
    }

    #[test]
    fn audit_checkpoint_settings_default_and_are_bounded_naming_the_key() {
        let base = "trust_domain = \"example.org\"\ndata_dir = \"/tmp/x\"\n";
        let c = ServerConfig::parse(base).unwrap();
        assert_eq!(c.audit_checkpoint_every, 1000);
        assert_eq!(c.audit_checkpoint_interval, Duration::from_secs(60));
        for (line, key) in [
            ("audit_checkpoint_every = 0", "audit_checkpoint_every"),
            ("audit_checkpoint_every = 1000001", "audit_checkpoint_every"),
            ("audit_checkpoint_every = -1", "audit_checkpoint_every"),
            (
                "audit_checkpoint_interval = \"0s\"",
                "audit_checkpoint_interval",
            ),
            (
                "audit_checkpoint_interval = \"2d\"",
                "audit_checkpoint_interval",
            ),
            (
                "audit_checkpoint_interval = \"soon\"",
                "audit_checkpoint_interval",
            ),
        ] {
            let e = ServerConfig::parse(&format!("{base}{line}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{line}: {e}");
        }
        let c = ServerConfig::parse(&format!(
            "{base}audit_checkpoint_every = 5\naudit_checkpoint_interval = \"2s\"\n"
        ))
        .unwrap();
        assert_eq!(c.audit_checkpoint_every, 5);
        assert_eq!(c.audit_checkpoint_interval, Duration::from_secs(2));
    }

    #[test]
    fn log_level_must_be_a_level() {
        let base = "trust_domain = \"example.org\"\ndata_dir = \"/tmp/x\"\n";
        let e = ServerConfig::parse(&format!("{base}log_level = \"bogus\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("log_level") && e.contains("bogus"), "{e}");
        for l in LOG_LEVELS {
            let c = ServerConfig::parse(&format!("{base}log_level = \"{l}\"\n")).unwrap();
            assert_eq!(c.log_level, l);
        }
    }

    #[test]
    fn paths_must_be_absolute() {
        let td = "trust_domain = \"example.org\"\n";
        let e = ServerConfig::parse(&format!("{td}data_dir = \"data\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`data_dir`") && e.contains("absolute"), "{e}");
        let base = format!("{td}data_dir = \"/tmp/x\"\n");
        for (line, key) in [
            ("admin_socket = \"admin.sock\"", "admin_socket"),
            (
                "[x509pop]\nca_bundle_path = \"ca.pem\"",
                "x509pop.ca_bundle_path",
            ),
            ("[tpm]\nek_ca_path = \"./ek.pem\"", "tpm.ek_ca_path"),
            (
                "[bundle_endpoint]\nport = 1\nprofile = \"https_web\"\ncert_path = \"/c.pem\"\nkey_path = \"k.pem\"",
                "bundle_endpoint.key_path",
            ),
            (
                "[[federation]]\ntrust_domain = \"other.org\"\nbundle_endpoint_url = \"https://h/\"\nprofile = \"https_web\"\nca_bundle_path = \"roots.pem\"",
                "federation.ca_bundle_path",
            ),
        ] {
            let e = ServerConfig::parse(&format!("{base}{line}\n"))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(&format!("`{key}`")) && e.contains("absolute"),
                "{line}: {e}"
            );
        }
    }

    #[test]
    fn the_shipped_example_config_parses() {
        let c = ServerConfig::parse(include_str!("../../../deploy/config/server.toml")).unwrap();
        assert!(matches!(
            c.datastore,
            DatastoreKind::Redb {
                cache_mib: DEFAULT_CACHE_MIB
            }
        ));
    }

    #[test]
    fn redb_cache_is_bounded_by_default_and_checked_naming_the_key() {
        let base = "trust_domain = \"example.org\"\ndata_dir = \"/tmp/x\"\n";
        let c = ServerConfig::parse(base).unwrap();
        assert!(matches!(
            c.datastore,
            DatastoreKind::Redb {
                cache_mib: DEFAULT_CACHE_MIB
            }
        ));
        let c = ServerConfig::parse(&format!(
            "{base}[datastore]\nkind = \"redb\"\ncache_mib = 8\n"
        ))
        .unwrap();
        assert!(matches!(c.datastore, DatastoreKind::Redb { cache_mib: 8 }));
        for (lines, says) in [
            ("kind = \"redb\"\ncache_mib = 0", "out of range"),
            (
                &*format!("kind = \"redb\"\ncache_mib = {}", MAX_CACHE_MIB + 1),
                "out of range",
            ),
            (
                "kind = \"postgres\"\nurl = \"postgres://sigil@db/sigil\"\ncache_mib = 8",
                "not used by the postgres datastore",
            ),
        ] {
            let e = ServerConfig::parse(&format!("{base}[datastore]\n{lines}\n"))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("datastore.cache_mib") && e.contains(says),
                "{lines}: {e}"
            );
        }
    }

    #[test]
    fn postgres_datastore_settings_are_checked_naming_the_key() {
        let base = "trust_domain = \"example.org\"\ndata_dir = \"/tmp/x\"\n[datastore]\n";
        let c = ServerConfig::parse(&format!(
            "{base}kind = \"postgres\"\nurl = \"postgres://sigil@db.internal:5433/sigil\"\n\
             password_file = \"/etc/sigil/pgpass\"\npool_size = 4\n"
        ))
        .unwrap();
        let DatastoreKind::Postgres(pg) = &c.datastore else {
            panic!("not postgres: {:?}", c.datastore);
        };
        assert_eq!(pg.pool_size, 4);
        assert_eq!(pg.client.get_dbname(), Some("sigil"));
        assert_eq!(pg.client.get_ports(), &[5433]);
        assert_eq!(
            pg.password_file.as_deref(),
            Some(Path::new("/etc/sigil/pgpass"))
        );
        let c = ServerConfig::parse(&format!(
            "{base}kind = \"postgres\"\nurl = \"postgres://sigil@db/sigil\"\n"
        ))
        .unwrap();
        let DatastoreKind::Postgres(pg) = &c.datastore else {
            panic!("not postgres");
        };
        assert_eq!(pg.pool_size, DEFAULT_POOL_SIZE);
        assert_eq!(pg.sslmode, PgSslMode::Disable);
        for (mode, want) in [
            ("require", PgSslMode::Require),
            ("verify-ca", PgSslMode::VerifyCa),
            ("verify-full", PgSslMode::VerifyFull),
        ] {
            let c = ServerConfig::parse(&format!(
                "{base}kind = \"postgres\"\nurl = \"postgres://sigil@db/sigil\"\nsslmode = \"{mode}\"\nca_path = \"/etc/ssl/db.pem\"\n"
            ))
            .unwrap();
            let DatastoreKind::Postgres(pg) = &c.datastore else {
                panic!("not postgres");
            };
            assert_eq!(pg.sslmode, want);
            assert_eq!(pg.ca_path.as_deref(), Some(Path::new("/etc/ssl/db.pem")));
            assert_eq!(
                pg.client.get_ssl_mode(),
                postgres::config::SslMode::Require,
                "{mode}"
            );
        }
        let url = "url = \"postgres://sigil@db/sigil\"";
        for (lines, key, says) in [
            ("kind = \"postgres\"", "datastore.url", "required"),
            (
                "kind = \"postgres\"\nurl = \"mysql://a@b/c\"",
                "datastore.url",
                "postgres://",
            ),
            (
                "kind = \"postgres\"\nurl = \"postgres://db/sigil\"",
                "datastore.url",
                "no user",
            ),
            (
                "kind = \"postgres\"\nurl = \"postgres://u@db\"",
                "datastore.url",
                "no database",
            ),
            (
                "kind = \"postgres\"\nurl = \"postgres://u@db/d?sslmode=require\"",
                "datastore.url",
                "sslmode",
            ),
            (
                &format!("kind = \"postgres\"\n{url}\nsslmode = \"verify-full\""),
                "datastore.ca_path",
                "required",
            ),
            (
                &format!("kind = \"postgres\"\n{url}\nsslmode = \"verify-ca\""),
                "datastore.ca_path",
                "required",
            ),
            (
                &format!("kind = \"postgres\"\n{url}\nca_path = \"/etc/ssl/db.pem\""),
                "datastore.ca_path",
                "disable",
            ),
            (
                &format!(
                    "kind = \"postgres\"\n{url}\nsslmode = \"verify-full\"\nca_path = \"db.pem\""
                ),
                "datastore.ca_path",
                "absolute",
            ),
            (
                "kind = \"redb\"\nca_path = \"/etc/ssl/db.pem\"",
                "datastore.ca_path",
                "redb",
            ),
            (
                &format!("kind = \"postgres\"\n{url}\nsslmode = \"sometimes\""),
                "datastore.sslmode",
                "sometimes",
            ),
            (
                &format!("kind = \"postgres\"\n{url}\npool_size = 0"),
                "datastore.pool_size",
                "out of range",
            ),
            (
                &format!("kind = \"postgres\"\n{url}\npassword_file = \"pw\""),
                "datastore.password_file",
                "absolute",
            ),
            (
                "kind = \"postgres\"\nurl = \"postgres://u:pw@db/d\"\npassword_file = \"/pw\"",
                "datastore.password_file",
                "already has a password",
            ),
            (&format!("kind = \"redb\"\n{url}"), "datastore.url", "redb"),
            (
                "kind = \"redb\"\npool_size = 3",
                "datastore.pool_size",
                "redb",
            ),
            ("kind = \"mongo\"", "datastore.kind", "mongo"),
            (
                &format!("kind = \"postgres\"\n{url}\nhost = \"x\""),
                "host",
                "unknown field",
            ),
        ] {
            let e = ServerConfig::parse(&format!("{base}{lines}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(key) && e.contains(says), "{lines}: {e}");
        }
        // A password in the URL is accepted but never shown.
        let c = ServerConfig::parse(&format!(
            "{base}kind = \"postgres\"\nurl = \"postgres://u:s3cret@db/d\"\n"
        ))
        .unwrap();
        assert!(!format!("{c:?}").contains("s3cret"));
        let e = ServerConfig::parse(&format!(
            "{base}kind = \"postgres\"\nurl = \"postgres://u:s3cret@db/d\"\nsslmode = \"verify-full\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(!e.contains("s3cret"), "{e}");
    }
}
