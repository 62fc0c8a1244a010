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

use crate::config::{ConfigError, PostgresConfig, postgres_url};
use crate::datastore::{PostgresStore, RedbStore, copy_all};

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
    },
}

pub async fn datastore(cmd: DatastoreCmd) -> Result<(), String> {
    match cmd {
        DatastoreCmd::Migrate {
            from,
            to,
            password_file,
            trust_domain,
        } => tokio::task::spawn_blocking(move || migrate(&from, &to, password_file, &trust_domain))
            .await
            .map_err(|e| format!("migration task failed: {e}"))?,
    }
}

fn migrate(
    from: &str,
    to: &str,
    password_file: Option<PathBuf>,
    trust_domain: &str,
) -> Result<(), String> {
    let td = TrustDomain::new(trust_domain)
        .map_err(|e| format!("--trust-domain {trust_domain:?}: {e}"))?;
    let path = from
        .strip_prefix("redb:")
        .map(Path::new)
        .ok_or_else(|| "--from: expected redb:PATH".to_string())?;
    if !path.is_file() {
        return Err(format!(
            "--from: {} is not a datastore file",
            path.display()
        ));
    }
    let client = postgres_url(to).map_err(|e| match e {
        ConfigError::Key { reason, .. } => format!("--to: {reason}"),
        other => format!("--to: {other}"),
    })?;
    if password_file.is_some() && client.get_password().is_some() {
        return Err("--password-file: the URL already has a password".into());
    }
    if password_file.as_ref().is_some_and(|p| !p.is_absolute()) {
        return Err("--password-file: must be an absolute path".into());
    }
    let src = RedbStore::open(path).map_err(|e| {
        format!(
            "--from {}: {e} (is a server still running on it?)",
            path.display()
        )
    })?;
    let dst = PostgresStore::open_configured(&PostgresConfig {
        client,
        password_file,
        pool_size: 2,
    })
    .map_err(|e| format!("--to: {e}"))?;
    let summary = copy_all(&src, &dst, &td).map_err(|e| e.to_string())?;
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
