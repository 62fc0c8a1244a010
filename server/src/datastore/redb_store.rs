//! The embedded datastore: one redb file. Agents and tokens are stored as
//! JSON of their record types, entries and federated bundles as protobuf
//! (entries are re-validated through `Entry::from_proto` when read). Every
//! [`Datastore::write`] is one redb write transaction.

use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use prost::Message;
use redb::{
    Database, ReadTransaction, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    TableDefinition, TableHandle, WriteTransaction,
};
use sigil_core::TrustDomain;
use sigil_core::audit;
use sigil_core::entry::Entry;
use sigil_proto::common::FederatedBundle;

use super::records::{
    audit_head_of, decode_audit, decode_bundle, decode_entry, encode_bundle, encode_entry,
};
use super::{
    AgentRecord, ApprovalRecord, Datastore, KillRecord, ReadTx, ServerKeysRecord, StoreError,
    TaskRecord, TokenRecord, UsageMark, WriteTx,
};
use crate::error::RegistryError;

type Table = TableDefinition<'static, &'static str, &'static [u8]>;

const ENTRIES: Table = TableDefinition::new("entries");
/// Version 2: JSON agent records (version 1 stored the admin wire message).
const AGENTS: Table = TableDefinition::new("agents_v2");
const TOKENS: Table = TableDefinition::new("join_tokens");
const BUNDLES: Table = TableDefinition::new("federated_bundles");
const KILLS: Table = TableDefinition::new("kills");
/// Last-activity marks, by `kind/id`.
const USAGE: Table = TableDefinition::new("usage_marks");
/// Approval requests, by ID.
const APPROVALS: Table = TableDefinition::new("approvals");
/// Tasks (task-scoped identities), by ID.
const TASKS: Table = TableDefinition::new("tasks");
/// Each server's published public keys (one server with redb: its own).
const SERVER_KEYS: Table = TableDefinition::new("server_keys");
/// The audit chain: sequence number -> the record's JSON line.
const AUDIT: TableDefinition<'static, u64, &'static str> = TableDefinition::new("audit");

fn be(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// Free bytes the filesystem holding the database must keep: below it a
/// write transaction is refused before it starts. redb grows its file in
/// steps and, once a commit fails for want of space, refuses every later
/// operation (reads too) until the file is reopened; refusing early keeps
/// the database readable and consistent while the disk is full.
const SPACE_RESERVE: u64 = 4 * 1024 * 1024;

/// Whether a redb error is the disk running out of space.
fn out_of_space(e: &redb::StorageError) -> bool {
    matches!(e, redb::StorageError::Io(io)
        if io.kind() == std::io::ErrorKind::StorageFull || io.raw_os_error() == Some(28))
}

/// redb-backed [`Datastore`].
pub struct RedbStore {
    db: Database,
    /// A second handle on the open database file: the free space of the
    /// filesystem that holds it (`fstatvfs`, no path lookup per write, and
    /// never another filesystem mounted at the path since) decides whether
    /// a write may start.
    file: std::fs::File,
    /// The file's path, for messages.
    path: std::path::PathBuf,
}

impl RedbStore {
    /// Refuses a write when the database's filesystem has less than
    /// [`SPACE_RESERVE`] bytes free for this process.
    fn check_space(&self) -> Result<(), StoreError> {
        let Ok(st) = nix::sys::statvfs::fstatvfs(&self.file) else {
            // No figure: let redb try (and report what it finds).
            return Ok(());
        };
        let free = st.blocks_available().saturating_mul(st.fragment_size());
        if free < SPACE_RESERVE {
            return Err(StoreError::NoSpace(format!(
                "{free} bytes free on the filesystem of {}, below the {SPACE_RESERVE} kept in reserve (no space left for writes)",
                self.path.display()
            )));
        }
        Ok(())
    }
}

impl RedbStore {
    /// Opens (or creates) the database file and its tables.
    /// An existing file must be a regular file (not a link) owned by this
    /// process's uid or root and not writable by group or others.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with_cache(path, crate::config::DEFAULT_CACHE_MIB)
    }

    /// As [`RedbStore::open`], with redb's page cache (reads and the write
    /// buffer) held to `cache_mib` MiB. Without a bound redb would keep up
    /// to 1 GiB of the file in memory, and the file grows with the audit
    /// trail, so the server's memory would follow it.
    pub fn open_with_cache(path: &Path, cache_mib: u32) -> Result<Self, StoreError> {
        match sigil_fs::check_trusted_file(path, sigil_fs::Links::Refuse) {
            Ok(()) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(StoreError::Backend(e.to_string())),
        }
        let io = |e: std::io::Error| StoreError::Backend(format!("{}: {e}", path.display()));
        // Created owner-only, and never through a link (the check above
        // and this open are not one step).
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(path)
            .map_err(io)?;
        let space_handle = file.try_clone().map_err(io)?;
        let db = Database::builder()
            .set_cache_size((cache_mib as usize).saturating_mul(1024 * 1024))
            .create_with_backend(redb::backends::FileBackend::new(file).map_err(be)?)
            .map_err(be)?;
        let tx = db.begin_write().map_err(be)?;
        for t in [
            ENTRIES,
            AGENTS,
            TOKENS,
            BUNDLES,
            KILLS,
            USAGE,
            APPROVALS,
            TASKS,
            SERVER_KEYS,
        ] {
            tx.open_table(t).map_err(be)?;
        }
        tx.open_table(AUDIT).map_err(be)?;
        migrate_agents_v1(&tx)?;
        tx.commit().map_err(be)?;
        Ok(Self {
            db,
            file: space_handle,
            path: path.to_path_buf(),
        })
    }
}

/// Version 1 stored agents as the admin API's wire message; converts them
/// to version 2 records in the opening transaction, refusing any that do
/// not parse.
fn migrate_agents_v1(tx: &WriteTransaction) -> Result<(), StoreError> {
    const AGENTS_V1: Table = TableDefinition::new("agents");
    let exists = tx
        .list_tables()
        .map_err(be)?
        .any(|h| h.name() == AGENTS_V1.name());
    if !exists {
        return Ok(());
    }
    let old = all(&tx.open_table(AGENTS_V1).map_err(be)?)?;
    for (key, bytes) in &old {
        let a = sigil_proto::admin::Agent::decode(bytes.as_slice())
            .map_err(|e| StoreError::Corrupt(format!("v1 agent record {key:?}: {e}")))?;
        let bad = |what: String| StoreError::Corrupt(format!("v1 agent record {key:?}: {what}"));
        let rec = AgentRecord {
            spiffe_id: sigil_core::SpiffeId::new(&a.spiffe_id).map_err(|e| bad(e.to_string()))?,
            attestation: a.attestation_type.parse().map_err(bad)?,
            selectors: a
                .selectors
                .iter()
                .map(|s| s.parse().map_err(|e| bad(format!("selector {s:?}: {e}"))))
                .collect::<Result<_, _>>()?,
            serial: a.serial,
            previous_serial: None,
            svid_expires_at: a.svid_expires_at,
            last_attested_at: a.last_attested_at,
            banned: a.banned,
            created_at: a.created_at,
        };
        put(tx, AGENTS, key, &rec.encode()?)?;
    }
    tx.delete_table(AGENTS_V1).map_err(be)?;
    tracing::info!(agents = old.len(), "migrated agent records to version 2");
    Ok(())
}

/// Reads shared by read snapshots and write transactions.
fn get(
    t: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Option<Vec<u8>>, StoreError> {
    Ok(t.get(key).map_err(be)?.map(|v| v.value().to_vec()))
}

fn all(
    t: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
    let mut out = Vec::new();
    for item in t.iter().map_err(be)? {
        let (k, v) = item.map_err(be)?;
        out.push((k.value().to_string(), v.value().to_vec()));
    }
    Ok(out)
}

/// Implements [`ReadTx`] for a transaction type whose `open_table` yields a
/// readable table.
macro_rules! read_tx {
    ($ty:ty) => {
        impl ReadTx for $ty {
            fn agent(&self, id: &str) -> Result<Option<AgentRecord>, StoreError> {
                let t = self.open_table(AGENTS).map_err(be)?;
                get(&t, id)?
                    .map(|b| AgentRecord::decode(id, &b))
                    .transpose()
            }
            fn agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
                let t = self.open_table(AGENTS).map_err(be)?;
                all(&t)?
                    .iter()
                    .map(|(k, v)| AgentRecord::decode(k, v))
                    .collect()
            }
            fn agent_count(&self) -> Result<u64, StoreError> {
                self.open_table(AGENTS).map_err(be)?.len().map_err(be)
            }
            fn entries(&self, td: &TrustDomain) -> Result<Vec<Entry>, StoreError> {
                let t = self.open_table(ENTRIES).map_err(be)?;
                all(&t)?
                    .iter()
                    .map(|(k, v)| decode_entry(k, v, td))
                    .collect()
            }
            fn entry(&self, id: &str, td: &TrustDomain) -> Result<Option<Entry>, StoreError> {
                let t = self.open_table(ENTRIES).map_err(be)?;
                get(&t, id)?.map(|b| decode_entry(id, &b, td)).transpose()
            }
            fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
                let t = self.open_table(TOKENS).map_err(be)?;
                all(&t)?
                    .iter()
                    .map(|(k, v)| TokenRecord::decode(k, v))
                    .collect()
            }
            fn tokens_by_hash(&self) -> Result<Vec<(String, TokenRecord)>, StoreError> {
                let t = self.open_table(TOKENS).map_err(be)?;
                all(&t)?
                    .into_iter()
                    .map(|(k, v)| TokenRecord::decode(&k, &v).map(|r| (k, r)))
                    .collect()
            }
            fn bundles(&self) -> Result<Vec<(String, FederatedBundle)>, StoreError> {
                let t = self.open_table(BUNDLES).map_err(be)?;
                all(&t)?
                    .into_iter()
                    .map(|(k, v)| decode_bundle(&k, &v).map(|b| (k, b)))
                    .collect()
            }
            fn audit_head(&self) -> Result<Option<audit::Head>, StoreError> {
                let t = self.open_table(AUDIT).map_err(be)?;
                let last = t.last().map_err(be)?;
                last.map(|(k, v)| audit_head_of(k.value(), v.value()))
                    .transpose()
            }
            fn audit_records(
                &self,
                since: u64,
                limit: usize,
            ) -> Result<Vec<audit::Record>, StoreError> {
                let t = self.open_table(AUDIT).map_err(be)?;
                let mut out = Vec::new();
                for item in t.range(since..).map_err(be)?.take(limit) {
                    let (k, v) = item.map_err(be)?;
                    out.push(decode_audit(k.value(), v.value())?);
                }
                Ok(out)
            }
            fn kills(&self) -> Result<Vec<KillRecord>, StoreError> {
                let t = self.open_table(KILLS).map_err(be)?;
                all(&t)?
                    .iter()
                    .map(|(k, v)| KillRecord::decode(k, v))
                    .collect()
            }
            fn usage_marks(&self) -> Result<Vec<UsageMark>, StoreError> {
                let t = self.open_table(USAGE).map_err(be)?;
                all(&t)?
                    .iter()
                    .map(|(k, v)| UsageMark::decode(k, v))
                    .collect()
            }
            fn approvals(&self) -> Result<Vec<ApprovalRecord>, StoreError> {
                let t = self.open_table(APPROVALS).map_err(be)?;
                all(&t)?
                    .iter()
                    .map(|(k, v)| ApprovalRecord::decode(k, v))
                    .collect()
            }
            fn approval(&self, id: &str) -> Result<Option<ApprovalRecord>, StoreError> {
                let t = self.open_table(APPROVALS).map_err(be)?;
                get(&t, id)?
                    .map(|b| ApprovalRecord::decode(id, &b))
                    .transpose()
            }
            fn tasks(&self) -> Result<Vec<TaskRecord>, StoreError> {
                let t = self.open_table(TASKS).map_err(be)?;
                all(&t)?
                    .iter()
                    .map(|(k, v)| TaskRecord::decode(k, v))
                    .collect()
            }
            fn task(&self, id: &str) -> Result<Option<TaskRecord>, StoreError> {
                let t = self.open_table(TASKS).map_err(be)?;
                get(&t, id)?.map(|b| TaskRecord::decode(id, &b)).transpose()
            }
            fn server_keys(&self) -> Result<Vec<(String, ServerKeysRecord)>, StoreError> {
                let t = self.open_table(SERVER_KEYS).map_err(be)?;
                all(&t)?
                    .into_iter()
                    .map(|(k, v)| ServerKeysRecord::decode(&k, &v).map(|r| (k, r)))
                    .collect()
            }
        }
    };
}

read_tx!(ReadTransaction);
read_tx!(WriteTransaction);

fn put(tx: &WriteTransaction, table: Table, key: &str, val: &[u8]) -> Result<(), StoreError> {
    tx.open_table(table)
        .map_err(be)?
        .insert(key, val)
        .map_err(be)?;
    Ok(())
}

fn take(tx: &WriteTransaction, table: Table, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
    let mut t = tx.open_table(table).map_err(be)?;
    let old = t.remove(key).map_err(be)?.map(|v| v.value().to_vec());
    Ok(old)
}

impl WriteTx for WriteTransaction {
    fn put_agent(&mut self, a: &AgentRecord) -> Result<(), StoreError> {
        put(self, AGENTS, &a.spiffe_id.to_string(), &a.encode()?)
    }
    fn delete_agent(&mut self, id: &str) -> Result<bool, StoreError> {
        Ok(take(self, AGENTS, id)?.is_some())
    }
    fn put_entry(&mut self, e: &Entry) -> Result<(), StoreError> {
        put(self, ENTRIES, &e.id, &encode_entry(e))
    }
    fn delete_entry(&mut self, id: &str) -> Result<bool, StoreError> {
        Ok(take(self, ENTRIES, id)?.is_some())
    }
    fn put_token(&mut self, hash: &str, t: &TokenRecord) -> Result<(), StoreError> {
        put(self, TOKENS, hash, &t.encode()?)
    }
    fn take_token(&mut self, hash: &str) -> Result<Option<TokenRecord>, StoreError> {
        take(self, TOKENS, hash)?
            .map(|b| TokenRecord::decode(hash, &b))
            .transpose()
    }
    fn put_bundle(&mut self, td: &str, b: &FederatedBundle) -> Result<(), StoreError> {
        put(self, BUNDLES, td, &encode_bundle(b))
    }
    fn delete_bundle(&mut self, td: &str) -> Result<bool, StoreError> {
        Ok(take(self, BUNDLES, td)?.is_some())
    }
    fn put_kill(&mut self, k: &KillRecord) -> Result<(), StoreError> {
        put(self, KILLS, &k.id, &k.encode()?)
    }
    fn put_usage_mark(&mut self, m: &UsageMark) -> Result<(), StoreError> {
        put(self, USAGE, &m.key(), &m.encode()?)
    }
    fn put_approval(&mut self, a: &ApprovalRecord) -> Result<(), StoreError> {
        put(self, APPROVALS, &a.id, &a.encode()?)
    }
    fn put_task(&mut self, t: &TaskRecord) -> Result<(), StoreError> {
        put(self, TASKS, &t.id, &t.encode()?)
    }
    fn put_server_keys(&mut self, id: &str, r: &ServerKeysRecord) -> Result<(), StoreError> {
        put(self, SERVER_KEYS, id, &r.encode()?)
    }
    fn delete_server_keys(&mut self, id: &str) -> Result<bool, StoreError> {
        Ok(take(self, SERVER_KEYS, id)?.is_some())
    }
    fn put_audit(&mut self, r: &audit::Record) -> Result<(), StoreError> {
        self.put_audit_line(r.seq, &r.to_jsonl_line())
    }
    fn put_audit_line(&mut self, seq: u64, line: &str) -> Result<(), StoreError> {
        self.open_table(AUDIT)
            .map_err(be)?
            .insert(seq, line)
            .map_err(be)?;
        Ok(())
    }
    fn delete_audit_through(&mut self, through: u64) -> Result<u64, StoreError> {
        let mut t = self.open_table(AUDIT).map_err(be)?;
        let mut n = 0;
        t.retain_in(..=through, |_, _| {
            n += 1;
            false
        })
        .map_err(be)?;
        Ok(n)
    }
    fn take_kill(&mut self, id: &str) -> Result<Option<KillRecord>, StoreError> {
        take(self, KILLS, id)?
            .map(|b| KillRecord::decode(id, &b))
            .transpose()
    }
}

impl Datastore for RedbStore {
    fn read(&self) -> Result<Box<dyn ReadTx + '_>, StoreError> {
        Ok(Box::new(self.db.begin_read().map_err(be)?))
    }

    fn write(
        &self,
        op: &mut dyn FnMut(&mut dyn WriteTx) -> Result<(), RegistryError>,
    ) -> Result<(), RegistryError> {
        self.check_space()?;
        let mut tx = self.db.begin_write().map_err(be)?;
        match op(&mut tx) {
            Ok(()) => tx.commit().map_err(|e| {
                RegistryError::Store(match &e {
                    redb::CommitError::Storage(s) if out_of_space(s) => StoreError::NoSpace(
                        format!("no space left on the disk of {}: {e}", self.path.display()),
                    ),
                    _ => be(e),
                })
            }),
            Err(e) => {
                tx.abort().map_err(be)?;
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sigil_core::SpiffeId;
    use sigil_proto::common::Entry as PbEntry;

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    fn entry() -> Entry {
        Entry::from_proto(
            &PbEntry {
                id: "e1".into(),
                spiffe_id: "spiffe://example.org/y".into(),
                parent_id: "spiffe://example.org/a".into(),
                selectors: vec!["unix:uid:0".into()],
                ..Default::default()
            },
            &td(),
        )
        .unwrap()
    }

    fn agent() -> AgentRecord {
        AgentRecord {
            spiffe_id: SpiffeId::new("spiffe://example.org/a").unwrap(),
            attestation: super::super::AttestationType::JoinToken,
            selectors: vec![],
            serial: "01".into(),
            previous_serial: None,
            svid_expires_at: 0,
            last_attested_at: 0,
            banned: false,
            created_at: 0,
        }
    }

    #[test]
    fn state_survives_reopen_and_tokens_are_single_use() {
        let dir = std::env::temp_dir().join(format!("sigil-redb-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.redb");
        {
            let s: Box<dyn Datastore> = Box::new(RedbStore::open(&path).unwrap());
            s.write(&mut |tx| {
                tx.put_entry(&entry())?;
                tx.put_agent(&agent())?;
                tx.put_token(
                    "h",
                    &TokenRecord {
                        spiffe_id: None,
                        expires_at: 5,
                    },
                )?;
                Ok(())
            })
            .unwrap();
        }
        let s: Box<dyn Datastore> = Box::new(RedbStore::open(&path).unwrap());
        assert_eq!(s.read().unwrap().entries(&td()).unwrap(), vec![entry()]);
        assert!(
            s.read()
                .unwrap()
                .agent("spiffe://example.org/a")
                .unwrap()
                .is_some()
        );
        let take = |s: &dyn Datastore| s.transact(|tx| Ok(tx.take_token("h")?));
        assert_eq!(take(s.as_ref()).unwrap().unwrap().expires_at, 5);
        assert!(take(s.as_ref()).unwrap().is_none(), "second use must fail");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_new_database_file_is_owner_only_and_a_link_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("sigil-redb-mode-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.redb");
        drop(RedbStore::open(&path).unwrap());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "database file mode {mode:o}");
        // A link where the database should be is not followed, whether it
        // points at a database or at nothing yet.
        for (name, target) in [("to-db", path.clone()), ("dangling", dir.join("absent"))] {
            let link = dir.join(name);
            std::os::unix::fs::symlink(&target, &link).unwrap();
            assert!(RedbStore::open(&link).is_err(), "{name}: link followed");
        }
        assert!(
            !dir.join("absent").exists(),
            "nothing created through the link"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failed_mutation_writes_nothing() {
        let dir = std::env::temp_dir().join(format!("sigil-redb-abort-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let s: Box<dyn Datastore> = Box::new(RedbStore::open(&dir.join("t.redb")).unwrap());
        let err = s
            .write(&mut |tx| {
                tx.put_entry(&entry())?;
                tx.put_agent(&agent())?;
                Err(RegistryError::denied("refused after writing"))
            })
            .unwrap_err();
        assert!(matches!(err, RegistryError::PermissionDenied(_)));
        let r = s.read().unwrap();
        assert!(r.entries(&td()).unwrap().is_empty());
        assert_eq!(r.agent_count().unwrap(), 0);
        drop(r);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn version_1_agent_records_are_migrated_on_open() {
        let dir = std::env::temp_dir().join(format!("sigil-redb-v1-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.redb");
        {
            let db = Database::create(&path).unwrap();
            let tx = db.begin_write().unwrap();
            let v1: Table = TableDefinition::new("agents");
            let a = sigil_proto::admin::Agent {
                spiffe_id: "spiffe://example.org/a".into(),
                attestation_type: "join_token".into(),
                serial: "0a".into(),
                ..Default::default()
            };
            tx.open_table(v1)
                .unwrap()
                .insert("spiffe://example.org/a", a.encode_to_vec().as_slice())
                .unwrap();
            tx.commit().unwrap();
        }
        let s: Box<dyn Datastore> = Box::new(RedbStore::open(&path).unwrap());
        let a = s
            .read()
            .unwrap()
            .agent("spiffe://example.org/a")
            .unwrap()
            .unwrap();
        assert_eq!(a.serial, "0a");
        assert_eq!(a.attestation, super::super::AttestationType::JoinToken);
        drop(s);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
