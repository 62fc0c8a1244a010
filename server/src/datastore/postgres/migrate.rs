//! Versioned schema migrations for the PostgreSQL datastore, applied when a
//! server opens the database: all pending ones in one transaction that
//! first takes a transaction-scoped advisory lock, so servers starting at
//! once on an empty database create one schema and record each migration
//! once. A database whose schema is newer than this binary is refused.

use super::pool::{Param, Session};
use crate::datastore::StoreError;

/// Migrations in order: (version, SQL). Never edit one that has shipped;
/// add the next.
const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("schema/0001_initial.sql")),
    (2, include_str!("schema/0002_events.sql")),
    (3, include_str!("schema/0003_governance.sql")),
    (4, include_str!("schema/0004_server_keys.sql")),
    (5, include_str!("schema/0005_tasks.sql")),
    (6, include_str!("schema/0006_events_horizon.sql")),
];

/// The schema version this binary writes and reads.
pub const SCHEMA_VERSION: i32 = 6;

/// Advisory lock key guarding migrations (the ASCII of "sigilsch").
const MIGRATION_LOCK: i64 = 0x7369_6769_6c73_6368;

/// Brings the database to [`SCHEMA_VERSION`]; returns the version found
/// before (0 for an empty database).
pub(super) fn migrate(s: &mut Session<'_>) -> Result<i32, StoreError> {
    s.begin("BEGIN ISOLATION LEVEL READ COMMITTED")?;
    s.query(
        "SELECT pg_advisory_xact_lock($1)",
        vec![Param::Int(MIGRATION_LOCK)],
    )?;
    s.batch(
        "CREATE TABLE IF NOT EXISTS sigil_schema_migrations (
             version integer PRIMARY KEY,
             applied_at timestamptz NOT NULL DEFAULT now()
         )",
    )?;
    let found = current_version(s)?;
    if found > SCHEMA_VERSION {
        s.rollback();
        return Err(StoreError::Backend(format!(
            "the PostgreSQL database has schema version {found}, newer than this \
             sigil-server's {SCHEMA_VERSION}: run a sigil-server at least as new as \
             the one that upgraded it"
        )));
    }
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > found) {
        s.batch(sql)
            .map_err(|e| StoreError::Backend(format!("schema migration {version} failed: {e}")))?;
        s.execute(
            "INSERT INTO sigil_schema_migrations (version) VALUES ($1::bigint)",
            vec![Param::Int(i64::from(*version))],
        )?;
        tracing::info!(version, "applied PostgreSQL schema migration");
    }
    s.commit()?;
    Ok(found)
}

/// The highest migration recorded (0 if none).
pub(super) fn current_version(s: &Session<'_>) -> Result<i32, StoreError> {
    let rows = s.query(
        "SELECT COALESCE(max(version), 0) FROM sigil_schema_migrations",
        vec![],
    )?;
    rows.first()
        .and_then(|r| r.try_get::<_, i32>(0).ok())
        .ok_or_else(|| StoreError::Corrupt("sigil_schema_migrations: no version".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_numbered_from_1_without_gaps_up_to_the_schema_version() {
        for (i, (v, _)) in MIGRATIONS.iter().enumerate() {
            assert_eq!(usize::try_from(*v).ok(), Some(i + 1));
        }
        assert_eq!(MIGRATIONS.last().map(|m| m.0), Some(SCHEMA_VERSION));
    }
}
