//! `[datastore]`: which backend holds the registry — the redb file under
//! `data_dir` (default) or a PostgreSQL database shared by several servers —
//! and the PostgreSQL connection settings.

use std::path::PathBuf;

use serde::Deserialize;

use super::{ConfigError, absolute, key_err};

/// The `[datastore]` table as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDatastore {
    kind: String,
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    password_file: Option<PathBuf>,
    #[serde(default)]
    sslmode: Option<String>,
    #[serde(default)]
    ca_path: Option<PathBuf>,
    #[serde(default)]
    pool_size: Option<u32>,
    #[serde(default)]
    cache_mib: Option<u32>,
}

/// Which datastore backs the server.
#[derive(Debug, Clone)]
pub enum DatastoreKind {
    /// redb file under `data_dir` (default).
    Redb {
        /// `datastore.cache_mib`: the most memory redb's page cache may
        /// hold, in MiB. redb's own default (1 GiB) lets the cache follow
        /// the file as the audit trail grows; the server bounds it.
        cache_mib: u32,
    },
    /// A PostgreSQL database, shared by several servers.
    Postgres(Box<PostgresConfig>),
}

/// Largest `datastore.pool_size`.
pub const MAX_POOL_SIZE: u32 = 256;
/// Default `datastore.pool_size`.
pub const DEFAULT_POOL_SIZE: u32 = 8;
/// Default `datastore.cache_mib`.
pub const DEFAULT_CACHE_MIB: u32 = 32;
/// Largest `datastore.cache_mib`.
pub const MAX_CACHE_MIB: u32 = 16 * 1024;

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
    /// `sslmode`: whether and how connections use TLS.
    pub sslmode: PgSslMode,
    /// `ca_path`: PEM roots the database's certificate must chain to.
    pub ca_path: Option<PathBuf>,
}

/// `datastore.sslmode`, with libpq's names and meanings (see
/// `datastore::postgres::tls`). `prefer` and `allow` are not offered:
/// a mode that silently falls back to plain text is not one to choose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PgSslMode {
    /// No TLS (a Unix socket or a trusted network).
    Disable,
    /// TLS, the certificate unchecked unless `ca_path` is given.
    Require,
    /// TLS, the certificate chained to `ca_path`.
    VerifyCa,
    /// TLS, the certificate chained to `ca_path` and naming the host.
    VerifyFull,
}

impl PgSslMode {
    /// The mode named `s`, as written in server.toml.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "disable" => Self::Disable,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            _ => return None,
        })
    }

    /// What the PostgreSQL client itself must insist on: TLS for every
    /// mode but `disable`. The connector (`datastore::postgres::tls`)
    /// does the verification.
    pub fn client_mode(self) -> postgres::config::SslMode {
        match self {
            Self::Disable => postgres::config::SslMode::Disable,
            _ => postgres::config::SslMode::Require,
        }
    }
}

impl std::fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("target", &crate::datastore::describe_target(&self.client))
            .field("password_file", &self.password_file)
            .field("pool_size", &self.pool_size)
            .field("sslmode", &self.sslmode)
            .field("ca_path", &self.ca_path)
            .finish_non_exhaustive()
    }
}

/// `sslmode` values.
const SSLMODES: [&str; 4] = ["disable", "require", "verify-ca", "verify-full"];

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
    let written = d.sslmode.as_deref().unwrap_or("disable");
    let sslmode = PgSslMode::parse(written).ok_or_else(|| {
        key_err(
            "datastore.sslmode",
            format!(
                "unknown mode {written:?} (expected one of {})",
                SSLMODES.join(", ")
            ),
        )
    })?;
    match (&d.ca_path, sslmode) {
        (Some(_), PgSslMode::Disable) => {
            return Err(key_err(
                "datastore.ca_path",
                "not used with sslmode = \"disable\"",
            ));
        }
        (None, PgSslMode::VerifyCa | PgSslMode::VerifyFull) => {
            return Err(key_err(
                "datastore.ca_path",
                format!(
                    "required for sslmode = \"{written}\" (the PEM roots the database's certificate must chain to)"
                ),
            ));
        }
        (Some(p), _) => absolute("datastore.ca_path", p)?,
        (None, _) => {}
    }
    client.ssl_mode(sslmode.client_mode());
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
        sslmode,
        ca_path: d.ca_path,
    })
}

impl RawDatastore {
    /// Validates the section; without one the server uses redb.
    pub(super) fn validate(d: Option<Self>) -> Result<DatastoreKind, ConfigError> {
        Ok(match d {
            None => DatastoreKind::Redb {
                cache_mib: DEFAULT_CACHE_MIB,
            },
            Some(d) => match d.kind.as_str() {
                "redb" => {
                    for (key, set) in [
                        ("datastore.url", d.url.is_some()),
                        ("datastore.password_file", d.password_file.is_some()),
                        ("datastore.sslmode", d.sslmode.is_some()),
                        ("datastore.ca_path", d.ca_path.is_some()),
                        ("datastore.pool_size", d.pool_size.is_some()),
                    ] {
                        if set {
                            return Err(key_err(key, "not used by the redb datastore"));
                        }
                    }
                    let cache_mib = d.cache_mib.unwrap_or(DEFAULT_CACHE_MIB);
                    if !(1..=MAX_CACHE_MIB).contains(&cache_mib) {
                        return Err(key_err(
                            "datastore.cache_mib",
                            format!("{cache_mib} is out of range (1 to {MAX_CACHE_MIB})"),
                        ));
                    }
                    DatastoreKind::Redb { cache_mib }
                }
                "postgres" => {
                    if d.cache_mib.is_some() {
                        return Err(key_err(
                            "datastore.cache_mib",
                            "not used by the postgres datastore",
                        ));
                    }
                    DatastoreKind::Postgres(Box::new(postgres_config(d)?))
                }
                other => {
                    return Err(key_err(
                        "datastore.kind",
                        format!("unknown kind {other:?} (expected redb or postgres)"),
                    ));
                }
            },
        })
    }
}
