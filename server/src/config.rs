//! `server.toml` (every key in deploy/config/server.toml), unknown keys refused,
//! every duration bounded (see the `MAX_*` constants), `log_level` one of
//! the level names, and every path absolute.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use sigil_core::TrustDomain;
use sigil_core::duration::parse_field;

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
/// The values `log_level` accepts (per-module filters go in `SIGIL_LOG`).
pub const LOG_LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// Refuses a relative path: the service's working directory is not part
/// of its configuration.
fn absolute(key: &'static str, p: &Path) -> Result<(), ConfigError> {
    if p.as_os_str().is_empty() {
        return Err(key_err(key, "must not be empty"));
    }
    if !p.is_absolute() {
        return Err(key_err(
            key,
            format!("{:?} must be an absolute path", p.display().to_string()),
        ));
    }
    Ok(())
}

/// Checks `log_level` against [`LOG_LEVELS`].
pub fn log_level(v: Option<String>) -> Result<String, ConfigError> {
    let v = v.unwrap_or_else(|| "info".into());
    if LOG_LEVELS.contains(&v.as_str()) {
        Ok(v)
    } else {
        Err(key_err(
            "log_level",
            format!(
                "{v:?} is not a level (expected one of {}; per-module filters go in SIGIL_LOG)",
                LOG_LEVELS.join(", ")
            ),
        ))
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
    limits: crate::limits::RawLimits,
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
}

fn default_review_max_ttl() -> String {
    "24h".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawX509Pop {
    ca_bundle_path: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTpm {
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBundleEndpoint {
    #[serde(default = "default_bind_address")]
    address: String,
    port: u16,
    #[serde(default = "default_profile")]
    profile: String,
    #[serde(default)]
    cert_path: Option<PathBuf>,
    #[serde(default)]
    key_path: Option<PathBuf>,
    #[serde(default)]
    refresh_hint: Option<String>,
}

fn default_profile() -> String {
    "https_spiffe".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFederation {
    trust_domain: String,
    bundle_endpoint_url: String,
    #[serde(default = "default_profile")]
    profile: String,
    #[serde(default)]
    endpoint_spiffe_id: Option<String>,
    #[serde(default)]
    ca_bundle_path: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOidc {
    #[serde(default = "default_bind_address")]
    address: String,
    port: u16,
    issuer: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDatastore {
    kind: String,
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    password_file: Option<PathBuf>,
    #[serde(default)]
    sslmode: Option<String>,
    #[serde(default)]
    pool_size: Option<u32>,
}

fn default_bind_address() -> String {
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

/// Which datastore backs the server.
#[derive(Debug, Clone)]
pub enum DatastoreKind {
    /// redb file under `data_dir` (default).
    Redb,
    /// A PostgreSQL database, shared by several servers.
    Postgres(Box<PostgresConfig>),
}

/// Largest `datastore.pool_size`.
pub const MAX_POOL_SIZE: u32 = 256;
/// Default `datastore.pool_size`.
pub const DEFAULT_POOL_SIZE: u32 = 8;

/// `[datastore] kind = "postgres"`.
#[derive(Clone)]
pub struct PostgresConfig {
    /// The parsed `url` (it may hold a password: never logged, and shown
    /// by `Debug` without it).
    pub client: postgres::Config,
    /// `password_file`: read at start, must be 0600 or stricter.
    pub password_file: Option<PathBuf>,
    /// Connections kept open at most.
    pub pool_size: u32,
}

impl std::fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("target", &crate::datastore::describe_target(&self.client))
            .field("password_file", &self.password_file)
            .field("pool_size", &self.pool_size)
            .finish_non_exhaustive()
    }
}

/// `sslmode` values: only `disable` is implemented so far.
const SSLMODES: [&str; 3] = ["disable", "require", "verify-full"];

/// Parses and checks a `postgres://user@host:port/dbname` URL (key
/// `datastore.url`); errors never quote it, since it may hold a password.
pub fn postgres_url(url: &str) -> Result<postgres::Config, ConfigError> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(key_err(
            "datastore.url",
            "must be a postgres:// URL (postgres://user@host:port/dbname)",
        ));
    }
    let client: postgres::Config = url
        .parse()
        .map_err(|e| key_err("datastore.url", format!("not a valid PostgreSQL URL: {e}")))?;
    if url.contains("sslmode=") {
        return Err(key_err(
            "datastore.url",
            "set TLS with datastore.sslmode, not in the URL",
        ));
    }
    if client.get_user().is_none_or(str::is_empty) {
        return Err(key_err(
            "datastore.url",
            "names no user (postgres://user@host:port/dbname)",
        ));
    }
    if client.get_dbname().is_none_or(str::is_empty) {
        return Err(key_err(
            "datastore.url",
            "names no database (postgres://user@host:port/dbname)",
        ));
    }
    if client.get_hosts().is_empty() {
        return Err(key_err(
            "datastore.url",
            "names no host (postgres://user@host:port/dbname)",
        ));
    }
    Ok(client)
}

fn postgres_config(d: RawDatastore) -> Result<PostgresConfig, ConfigError> {
    let url = d
        .url
        .ok_or_else(|| key_err("datastore.url", "required for kind = \"postgres\""))?;
    let mut client = postgres_url(&url)?;
    if d.password_file.is_some() && client.get_password().is_some() {
        return Err(key_err(
            "datastore.password_file",
            "the URL already has a password: give one or the other",
        ));
    }
    if let Some(p) = &d.password_file {
        absolute("datastore.password_file", p)?;
    }
    match d.sslmode.as_deref().unwrap_or("disable") {
        "disable" => {
            client.ssl_mode(postgres::config::SslMode::Disable);
        }
        "require" | "verify-full" => {
            return Err(key_err(
                "datastore.sslmode",
                "TLS to PostgreSQL is not implemented yet: use \"disable\" over a Unix socket \
                 or a trusted network",
            ));
        }
        other => {
            return Err(key_err(
                "datastore.sslmode",
                format!(
                    "unknown mode {other:?} (expected one of {})",
                    SSLMODES.join(", ")
                ),
            ));
        }
    }
    let pool_size = d.pool_size.unwrap_or(DEFAULT_POOL_SIZE);
    if !(1..=MAX_POOL_SIZE).contains(&pool_size) {
        return Err(key_err(
            "datastore.pool_size",
            format!("{pool_size} is out of range (1 to {MAX_POOL_SIZE})"),
        ));
    }
    Ok(PostgresConfig {
        client,
        password_file: d.password_file,
        pool_size,
    })
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
    /// `[limits]`: agent-API connection caps and idle timeout.
    pub limits: crate::limits::Limits,
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

/// How a bundle endpoint authenticates itself (SPIFFE Federation §5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointProfile {
    /// TLS with the server's own X.509-SVID.
    HttpsSpiffe,
    /// TLS with a Web PKI certificate.
    HttpsWeb,
}

/// `[bundle_endpoint]`: serve this trust domain's bundle to federated peers.
#[derive(Debug, Clone)]
pub struct BundleEndpointConfig {
    pub addr: std::net::SocketAddr,
    pub profile: EndpointProfile,
    /// https_web: PEM certificate chain and key.
    pub cert_path: Option<PathBuf>,
    pub key_path: Option<PathBuf>,
    pub refresh_hint: Duration,
}

/// `[[federation]]`: a foreign trust domain whose bundle endpoint we poll.
#[derive(Debug, Clone)]
pub struct FederationConfig {
    pub trust_domain: TrustDomain,
    pub url: http::Uri,
    pub profile: EndpointProfile,
    /// https_spiffe: the SPIFFE ID the endpoint must present.
    pub endpoint_spiffe_id: Option<sigil_core::SpiffeId>,
    /// https_web: PEM roots to verify the endpoint with.
    pub ca_bundle_path: Option<PathBuf>,
}

/// `[oidc]`: OpenID Connect discovery for JWT-SVID verifiers.
#[derive(Debug, Clone)]
pub struct OidcConfig {
    pub addr: std::net::SocketAddr,
    pub issuer: String,
}

fn profile(key: &'static str, v: &str) -> Result<EndpointProfile, ConfigError> {
    match v {
        "https_spiffe" => Ok(EndpointProfile::HttpsSpiffe),
        "https_web" => Ok(EndpointProfile::HttpsWeb),
        other => Err(key_err(
            key,
            format!("unknown profile {other:?} (expected https_spiffe or https_web)"),
        )),
    }
}

fn socket_addr(
    key: &'static str,
    address: &str,
    port: u16,
) -> Result<std::net::SocketAddr, ConfigError> {
    let ip: std::net::IpAddr = address
        .parse()
        .map_err(|_| key_err(key, format!("{address:?} is not an IP address")))?;
    Ok(std::net::SocketAddr::new(ip, port))
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

fn key_err(key: &'static str, reason: impl ToString) -> ConfigError {
    ConfigError::Key {
        key,
        reason: reason.to_string(),
    }
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
        let dur = |key: &'static str, v: &str, max: Duration| {
            parse_field(key, v, max).map_err(|e| key_err(key, e.detail()))
        };
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
        if !(1..=MAX_AUDIT_CHECKPOINT_EVERY).contains(&raw.audit_checkpoint_every) {
            return Err(key_err(
                "audit_checkpoint_every",
                format!(
                    "{} is out of range (1 to {MAX_AUDIT_CHECKPOINT_EVERY} records)",
                    raw.audit_checkpoint_every
                ),
            ));
        }
        let audit_checkpoint_interval = dur(
            "audit_checkpoint_interval",
            &raw.audit_checkpoint_interval,
            MAX_AUDIT_CHECKPOINT_INTERVAL,
        )?;
        if audit_checkpoint_interval < Duration::from_secs(1) {
            return Err(key_err("audit_checkpoint_interval", "must be at least 1s"));
        }
        let audit_retention = raw
            .audit_retention
            .as_deref()
            .map(|v| dur("audit_retention", v, MAX_AUDIT_RETENTION))
            .transpose()?;
        // No SVID outlives its CA, and a CA lives ca_ttl: a record older
        // than ca_ttl lists only expired SVIDs, so pruning it never takes
        // a killed serial off the CRL.
        if let Some(r) = audit_retention
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
        if default_x509_svid_ttl > ca_ttl {
            return Err(key_err("default_x509_svid_ttl", "must not exceed ca_ttl"));
        }
        let datastore = match raw.datastore {
            None => DatastoreKind::Redb,
            Some(d) => match d.kind.as_str() {
                "redb" => {
                    for (key, set) in [
                        ("datastore.url", d.url.is_some()),
                        ("datastore.password_file", d.password_file.is_some()),
                        ("datastore.sslmode", d.sslmode.is_some()),
                        ("datastore.pool_size", d.pool_size.is_some()),
                    ] {
                        if set {
                            return Err(key_err(key, "not used by the redb datastore"));
                        }
                    }
                    DatastoreKind::Redb
                }
                "postgres" => DatastoreKind::Postgres(Box::new(postgres_config(d)?)),
                other => {
                    return Err(key_err(
                        "datastore.kind",
                        format!("unknown kind {other:?} (expected redb or postgres)"),
                    ));
                }
            },
        };
        let tpm = match raw.tpm {
            None => None,
            Some(t) => {
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
                Some(TpmConfig {
                    ek_hashes: t.ek_hashes.iter().map(|h| h.to_ascii_lowercase()).collect(),
                    ek_ca_path: t.ek_ca_path,
                    pcrs,
                })
            }
        };
        let jwt_key_type = match &raw.jwt_key_type {
            None => sigil_core::jwt::JwtKeyType::default(),
            Some(k) => {
                sigil_core::jwt::JwtKeyType::parse(k).map_err(|e| key_err("jwt_key_type", e))?
            }
        };
        let bundle_endpoint = match raw.bundle_endpoint {
            None => None,
            Some(b) => {
                let profile = profile("bundle_endpoint.profile", &b.profile)?;
                if profile == EndpointProfile::HttpsWeb
                    && (b.cert_path.is_none() || b.key_path.is_none())
                {
                    return Err(key_err(
                        "bundle_endpoint.cert_path",
                        "https_web needs cert_path and key_path",
                    ));
                }
                let refresh_hint = match &b.refresh_hint {
                    Some(v) => dur("bundle_endpoint.refresh_hint", v, MAX_REFRESH_HINT)?,
                    None => Duration::from_secs(300),
                };
                Some(BundleEndpointConfig {
                    addr: socket_addr("bundle_endpoint.address", &b.address, b.port)?,
                    profile,
                    cert_path: b.cert_path,
                    key_path: b.key_path,
                    refresh_hint,
                })
            }
        };
        let mut federation = Vec::new();
        for f in raw.federation {
            let td = TrustDomain::new(&f.trust_domain).map_err(|e| {
                key_err(
                    "federation.trust_domain",
                    format!("{:?}: {e}", f.trust_domain),
                )
            })?;
            if td == trust_domain {
                return Err(key_err(
                    "federation.trust_domain",
                    "cannot federate with the server's own trust domain",
                ));
            }
            let url: http::Uri = f.bundle_endpoint_url.parse().map_err(|e| {
                key_err(
                    "federation.bundle_endpoint_url",
                    format!("{:?}: {e}", f.bundle_endpoint_url),
                )
            })?;
            if url.scheme_str() != Some("https") || url.host().is_none() {
                return Err(key_err(
                    "federation.bundle_endpoint_url",
                    format!("{:?} must be an https:// URL", f.bundle_endpoint_url),
                ));
            }
            let profile = profile("federation.profile", &f.profile)?;
            let endpoint_spiffe_id = match (&profile, &f.endpoint_spiffe_id) {
                (EndpointProfile::HttpsSpiffe, Some(id)) => {
                    let id = sigil_core::SpiffeId::new(id).map_err(|e| {
                        key_err("federation.endpoint_spiffe_id", format!("{id:?}: {e}"))
                    })?;
                    if !id.is_member_of(&td) {
                        return Err(key_err(
                            "federation.endpoint_spiffe_id",
                            format!("{id} is not in {td}"),
                        ));
                    }
                    Some(id)
                }
                (EndpointProfile::HttpsSpiffe, None) => {
                    return Err(key_err(
                        "federation.endpoint_spiffe_id",
                        "required for https_spiffe",
                    ));
                }
                (EndpointProfile::HttpsWeb, _) => None,
            };
            if profile == EndpointProfile::HttpsWeb && f.ca_bundle_path.is_none() {
                return Err(key_err(
                    "federation.ca_bundle_path",
                    "required for https_web (no system roots are used)",
                ));
            }
            federation.push(FederationConfig {
                trust_domain: td,
                url,
                profile,
                endpoint_spiffe_id,
                ca_bundle_path: f.ca_bundle_path,
            });
        }
        let oidc = match &raw.oidc {
            None => None,
            Some(o) => {
                let iss: http::Uri = o
                    .issuer
                    .parse()
                    .map_err(|e| key_err("oidc.issuer", format!("{:?}: {e}", o.issuer)))?;
                if !matches!(iss.scheme_str(), Some("https" | "http")) || iss.host().is_none() {
                    return Err(key_err(
                        "oidc.issuer",
                        format!("{:?} must be an http(s) URL", o.issuer),
                    ));
                }
                Some(OidcConfig {
                    addr: socket_addr("oidc.address", &o.address, o.port)?,
                    issuer: o.issuer.trim_end_matches('/').to_string(),
                })
            }
        };
        absolute("data_dir", &raw.data_dir)?;
        if let Some(p) = &raw.admin_socket {
            absolute("admin_socket", p)?;
        }
        if let Some(x) = &raw.x509pop {
            absolute("x509pop.ca_bundle_path", &x.ca_bundle_path)?;
        }
        if let Some(p) = tpm.as_ref().and_then(|t| t.ek_ca_path.as_ref()) {
            absolute("tpm.ek_ca_path", p)?;
        }
        if let Some(b) = &bundle_endpoint {
            if let Some(p) = &b.cert_path {
                absolute("bundle_endpoint.cert_path", p)?;
            }
            if let Some(p) = &b.key_path {
                absolute("bundle_endpoint.key_path", p)?;
            }
        }
        for f in &federation {
            if let Some(p) = &f.ca_bundle_path {
                absolute("federation.ca_bundle_path", p)?;
            }
        }
        let log_level = log_level(raw.log_level)?;
        Ok(ServerConfig {
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
            x509pop_ca_bundle: raw.x509pop.map(|x| x.ca_bundle_path),
            tpm,
            bundle_endpoint,
            federation,
            oidc,
            limits: raw
                .limits
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
                "datastore.sslmode",
                "not implemented",
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
            "{base}kind = \"postgres\"\nurl = \"postgres://u:s3cret@db/d\"\nsslmode = \"require\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(!e.contains("s3cret"), "{e}");
    }
}
