//! `sigil-server datastore migrate`: copy a stopped server's redb datastore
//! into an empty PostgreSQL database, every table in one transaction, read
//! back and compared (audit chain verified) before success is printed.
//!
//! ```text
//! sigil-server datastore migrate --from redb:/var/lib/sigil/server/datastore.redb \
//!     --to postgres://sigil@db:5432/sigil --password-file /etc/sigil/pgpass \
//!     --trust-domain example.org
//! ```

use std::path::{Path, PathBuf};

use clap::Subcommand;
use sigil_core::TrustDomain;

use super::CliError;
use crate::config::{ConfigError, PgSslMode, PostgresConfig, postgres_url};
use crate::datastore::{PostgresStore, RedbStore, copy_all};

/// `sigil-server datastore ...`.
#[derive(Subcommand)]
pub enum DatastoreCmd {
    /// Copy every record (entries, agents, join tokens, federated bundles,
    /// kills, the audit chain) of a redb datastore into an empty
    /// PostgreSQL database. Stop the server that uses the redb file first.
    Migrate {
        /// The source: `redb:PATH` (data_dir/datastore.redb).
        #[arg(long)]
        from: String,
        /// The target: `postgres://user@host:port/dbname`.
        #[arg(long)]
        to: String,
        /// File whose first line is the database password (0600).
        #[arg(long)]
        password_file: Option<PathBuf>,
        /// The server's trust domain; every entry is validated for it.
        #[arg(long)]
        trust_domain: String,
        /// TLS to the database, as `[datastore] sslmode`: disable,
        /// require, verify-ca or verify-full.
        #[arg(long, default_value = "disable")]
        sslmode: String,
        /// PEM roots the database's certificate must chain to (required
        /// for verify-ca and verify-full).
        #[arg(long)]
        ca_path: Option<PathBuf>,
    },
}

/// Where and how `migrate` connects.
struct Target {
    url: String,
    password_file: Option<PathBuf>,
    sslmode: String,
    ca_path: Option<PathBuf>,
}

/// Runs `sigil-server datastore ...`.
pub async fn datastore(cmd: DatastoreCmd) -> Result<(), CliError> {
    match cmd {
        DatastoreCmd::Migrate {
            from,
            to,
            password_file,
            trust_domain,
            sslmode,
            ca_path,
        } => tokio::task::spawn_blocking(move || {
            let to = Target {
                url: to,
                password_file,
                sslmode,
                ca_path,
            };
            migrate(&from, to, &trust_domain)
        })
        .await
        .map_err(|source| CliError::Join {
            what: "migration",
            source,
        })?,
    }
}

fn migrate(from: &str, to: Target, trust_domain: &str) -> Result<(), CliError> {
    let Target {
        url: to,
        password_file,
        sslmode,
        ca_path,
    } = to;
    let sslmode = PgSslMode::parse(&sslmode).ok_or_else(|| {
        CliError::flag(
            "--sslmode",
            format!(
                "unknown mode {sslmode:?} (expected disable, require, verify-ca or verify-full)"
            ),
        )
    })?;
    if ca_path.as_ref().is_some_and(|p| !p.is_absolute()) {
        return Err(CliError::flag("--ca-path", "must be an absolute path"));
    }
    let td = TrustDomain::new(trust_domain)
        .map_err(|e| CliError::flag("--trust-domain", format!("{trust_domain:?}: {e}")))?;
    let path = from
        .strip_prefix("redb:")
        .map(Path::new)
        .ok_or(CliError::flag("--from", "expected redb:PATH"))?;
    if !path.is_file() {
        return Err(CliError::flag(
            "--from",
            format!("{} is not a datastore file", path.display()),
        ));
    }
    let mut client = postgres_url(&to).map_err(|e| match e {
        ConfigError::Key { reason, .. } => CliError::flag("--to", reason),
        other => CliError::flag("--to", other),
    })?;
    if password_file.is_some() && client.get_password().is_some() {
        return Err(CliError::flag(
            "--password-file",
            "the URL already has a password",
        ));
    }
    if password_file.as_ref().is_some_and(|p| !p.is_absolute()) {
        return Err(CliError::flag(
            "--password-file",
            "must be an absolute path",
        ));
    }
    let src = RedbStore::open(path).map_err(|e| {
        CliError::flag(
            "--from",
            format!("{}: {e} (is a server still running on it?)", path.display()),
        )
    })?;
    client.ssl_mode(sslmode.client_mode());
    let dst = PostgresStore::open_configured(&PostgresConfig {
        client,
        password_file,
        pool_size: 2,
        sslmode,
        ca_path,
    })
    .map_err(|e| CliError::flag("--to", e))?;
    let summary = copy_all(&src, &dst, &td)?;
    println!(
        "Migrated {summary} from redb:{} to {}.",
        path.display(),
        dst.target()
    );
    println!(
        "Set [datastore] kind = \"postgres\" in server.toml and start the server; \
         keys.json and audit_key.pem stay in data_dir."
    );
    Ok(())
}
