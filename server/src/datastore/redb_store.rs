//! The embedded datastore: one redb file, values as protobuf/JSON bytes.

use std::path::Path;

use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use sigil_proto::admin::Agent;
use sigil_proto::common::Entry as PbEntry;
use sigil_proto::common::FederatedBundle;

use super::{Datastore, StoreError, TokenRecord};

const ENTRIES: TableDefinition<&str, &[u8]> = TableDefinition::new("entries");
const AGENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("agents");
const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("join_tokens");
const BUNDLES: TableDefinition<&str, &[u8]> = TableDefinition::new("federated_bundles");

fn be(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// redb-backed [`Datastore`].
pub struct RedbStore {
    db: Database,
}

impl RedbStore {
    /// Opens (or creates) the database file and its tables.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path).map_err(be)?;
        let tx = db.begin_write().map_err(be)?;
        {
            tx.open_table(ENTRIES).map_err(be)?;
            tx.open_table(AGENTS).map_err(be)?;
            tx.open_table(TOKENS).map_err(be)?;
            tx.open_table(BUNDLES).map_err(be)?;
        }
        tx.commit().map_err(be)?;
        Ok(Self { db })
    }

    fn put(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
        val: &[u8],
    ) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(be)?;
        {
            let mut t = tx.open_table(table).map_err(be)?;
            t.insert(key, val).map_err(be)?;
        }
        tx.commit().map_err(be)
    }

    fn take(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let tx = self.db.begin_write().map_err(be)?;
        let old = {
            let mut t = tx.open_table(table).map_err(be)?;
            t.remove(key).map_err(be)?.map(|v| v.value().to_vec())
        };
        tx.commit().map_err(be)?;
        Ok(old)
    }

    fn get(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let tx = self.db.begin_read().map_err(be)?;
        let t = tx.open_table(table).map_err(be)?;
        Ok(t.get(key).map_err(be)?.map(|v| v.value().to_vec()))
    }

    fn all(&self, table: TableDefinition<&str, &[u8]>) -> Result<Vec<Vec<u8>>, StoreError> {
        Ok(self.all_keyed(table)?.into_iter().map(|(_, v)| v).collect())
    }

    fn all_keyed(
        &self,
        table: TableDefinition<&str, &[u8]>,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let tx = self.db.begin_read().map_err(be)?;
        let t = tx.open_table(table).map_err(be)?;
        let mut out = Vec::new();
        for item in t.iter().map_err(be)? {
            let (k, v) = item.map_err(be)?;
            out.push((k.value().to_string(), v.value().to_vec()));
        }
        Ok(out)
    }
}

fn decode<M: Message + Default>(b: &[u8]) -> Result<M, StoreError> {
    M::decode(b).map_err(|e| StoreError::Corrupt(e.to_string()))
}

impl Datastore for RedbStore {
    fn put_entry(&self, e: &PbEntry) -> Result<(), StoreError> {
        self.put(ENTRIES, &e.id, &e.encode_to_vec())
    }
    fn delete_entry(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self.take(ENTRIES, id)?.is_some())
    }
    fn list_entries(&self) -> Result<Vec<PbEntry>, StoreError> {
        self.all(ENTRIES)?.iter().map(|b| decode(b)).collect()
    }
    fn put_agent(&self, a: &Agent) -> Result<(), StoreError> {
        self.put(AGENTS, &a.spiffe_id, &a.encode_to_vec())
    }
    fn get_agent(&self, spiffe_id: &str) -> Result<Option<Agent>, StoreError> {
        self.get(AGENTS, spiffe_id)?.map(|b| decode(&b)).transpose()
    }
    fn list_agents(&self) -> Result<Vec<Agent>, StoreError> {
        self.all(AGENTS)?.iter().map(|b| decode(b)).collect()
    }
    fn update_agent(
        &self,
        spiffe_id: &str,
        f: &mut dyn FnMut(Option<Agent>) -> Option<Agent>,
    ) -> Result<Option<Agent>, StoreError> {
        let tx = self.db.begin_write().map_err(be)?;
        let written = {
            let mut t = tx.open_table(AGENTS).map_err(be)?;
            let current = t
                .get(spiffe_id)
                .map_err(be)?
                .map(|v| decode::<Agent>(v.value()))
                .transpose()?;
            let next = f(current);
            if let Some(a) = &next {
                t.insert(spiffe_id, a.encode_to_vec().as_slice())
                    .map_err(be)?;
            }
            next
        };
        tx.commit().map_err(be)?;
        Ok(written)
    }
    fn delete_agent(&self, spiffe_id: &str) -> Result<bool, StoreError> {
        Ok(self.take(AGENTS, spiffe_id)?.is_some())
    }
    fn put_token(&self, hash: &str, t: &TokenRecord) -> Result<(), StoreError> {
        let v = serde_json::to_vec(t).map_err(be)?;
        self.put(TOKENS, hash, &v)
    }
    fn take_token(&self, hash: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.take(TOKENS, hash)?
            .map(|b| serde_json::from_slice(&b).map_err(|e| StoreError::Corrupt(e.to_string())))
            .transpose()
    }
    fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        self.all(TOKENS)?
            .iter()
            .map(|b| serde_json::from_slice(b).map_err(|e| StoreError::Corrupt(e.to_string())))
            .collect()
    }
    fn put_bundle(&self, trust_domain: &str, b: &FederatedBundle) -> Result<(), StoreError> {
        self.put(BUNDLES, trust_domain, &b.encode_to_vec())
    }
    fn delete_bundle(&self, trust_domain: &str) -> Result<bool, StoreError> {
        Ok(self.take(BUNDLES, trust_domain)?.is_some())
    }
    fn list_bundles(&self) -> Result<Vec<(String, FederatedBundle)>, StoreError> {
        self.all_keyed(BUNDLES)?
            .into_iter()
            .map(|(k, v)| Ok((k, decode(&v)?)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_survives_reopen_and_tokens_are_single_use() {
        let dir = std::env::temp_dir().join(format!("sigil-redb-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.redb");
        {
            let s = RedbStore::open(&path).unwrap();
            s.put_entry(&PbEntry {
                id: "e1".into(),
                spiffe_id: "spiffe://x/y".into(),
                ..Default::default()
            })
            .unwrap();
            s.put_agent(&Agent {
                spiffe_id: "spiffe://x/a".into(),
                ..Default::default()
            })
            .unwrap();
            s.put_token(
                "h",
                &TokenRecord {
                    spiffe_id: None,
                    expires_at: 5,
                },
            )
            .unwrap();
        }
        let s = RedbStore::open(&path).unwrap();
        assert_eq!(s.list_entries().unwrap()[0].spiffe_id, "spiffe://x/y");
        assert!(s.get_agent("spiffe://x/a").unwrap().is_some());
        assert_eq!(s.take_token("h").unwrap().unwrap().expires_at, 5);
        assert!(s.take_token("h").unwrap().is_none(), "second use must fail");
        assert!(s.delete_entry("e1").unwrap());
        assert!(!s.delete_entry("e1").unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
