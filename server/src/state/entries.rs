//! Registration entries: the in-memory index (by ID, by parent, by
//! identity, node aliases) and create/update/delete, each one datastore
//! transaction followed by an index update and a targeted wake-up.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::str::FromStr;
use std::sync::Arc;

use sigil_core::SpiffeId;
use sigil_core::entry::Entry;
use sigil_core::ids::new_entry_id;
use sigil_core::now_unix;
use sigil_proto::common::Entry as PbEntry;

use super::namespace::Claimant;
use super::{Caller, ServerState, poisoned};
use crate::datastore::append_audit;
use crate::error::RegistryError;
use sigil_core::audit::Event;

/// Most entries one [`ServerState::create_entries`] call takes.
pub const MAX_ENTRY_BATCH: usize = 1000;

/// An entry's fields as recorded in the audit trail.
fn entry_json(e: &Entry) -> serde_json::Value {
    let p = e.to_proto();
    serde_json::json!({
        "id": p.id,
        "spiffe_id": p.spiffe_id,
        "parent_id": p.parent_id,
        "selectors": p.selectors,
        "x509_svid_ttl": p.x509_svid_ttl,
        "jwt_svid_ttl": p.jwt_svid_ttl,
        "dns_names": p.dns_names,
        "hint": p.hint,
        "federates_with": p.federates_with,
        "admin": p.admin,
        "downstream": p.downstream,
        "node": p.node,
        "owner": p.owner,
        "expires_at": p.expires_at,
        "revision": p.revision,
        "description": p.description,
        "require_approval": p.require_approval,
        "jwt_claims": p.jwt_claims,
        "task_ttl_max": p.task_ttl_max,
        "delegable_scopes": p.delegable_scopes,
        "wit_svid": p.wit_svid,
    })
}

/// In-memory index of the validated entries.
#[derive(Default)]
pub(super) struct EntryIndex {
    pub(super) by_id: HashMap<String, Arc<Entry>>,
    pub(super) by_parent: HashMap<SpiffeId, BTreeSet<String>>,
    /// Entry IDs by (parent_id, spiffe_id): the duplicate check looks here
    /// instead of scanning every entry of the parent, which made creating
    /// many entries under one agent quadratic.
    by_identity: HashMap<(SpiffeId, SpiffeId), BTreeSet<String>>,
    /// IDs of node-alias entries.
    pub(super) nodes: BTreeSet<String>,
}

impl EntryIndex {
    pub(super) fn insert(&mut self, e: Arc<Entry>) {
        self.remove(&e.id);
        self.by_parent
            .entry(e.parent_id.clone())
            .or_default()
            .insert(e.id.clone());
        self.by_identity
            .entry((e.parent_id.clone(), e.spiffe_id.clone()))
            .or_default()
            .insert(e.id.clone());
        if e.node {
            self.nodes.insert(e.id.clone());
        }
        self.by_id.insert(e.id.clone(), e);
    }

    pub(super) fn remove(&mut self, id: &str) -> Option<Arc<Entry>> {
        let old = self.by_id.remove(id)?;
        self.nodes.remove(id);
        if let Some(set) = self.by_parent.get_mut(&old.parent_id) {
            set.remove(id);
            if set.is_empty() {
                self.by_parent.remove(&old.parent_id);
            }
        }
        let key = (old.parent_id.clone(), old.spiffe_id.clone());
        if let Some(set) = self.by_identity.get_mut(&key) {
            set.remove(id);
            if set.is_empty() {
                self.by_identity.remove(&key);
            }
        }
        Some(old)
    }

    /// Another entry with the same SPIFFE ID, parent and selectors as `e`.
    fn duplicate_of(&self, e: &Entry) -> Option<&str> {
        self.by_identity
            .get(&(e.parent_id.clone(), e.spiffe_id.clone()))
            .into_iter()
            .flatten()
            .filter(|id| **id != e.id)
            .find(|id| {
                self.by_id
                    .get(*id)
                    .is_some_and(|o| o.selectors == e.selectors)
            })
            .map(String::as_str)
    }
}

/// A field of an entry that `entry update` may set: the update mask, typed.
/// The wire carries the names (`UpdateEntryRequest.set_fields`); they are
/// parsed here, once, and applied by [`EntryField::copy`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EntryField {
    SpiffeId,
    ParentId,
    Selectors,
    X509SvidTtl,
    JwtSvidTtl,
    DnsNames,
    Hint,
    FederatesWith,
    Admin,
    Downstream,
    Node,
    Owner,
    ExpiresAt,
    Description,
    RequireApproval,
    JwtClaims,
    TaskTtlMax,
    DelegableScopes,
    WitSvid,
}

impl EntryField {
    /// Every field, with its wire name.
    pub const ALL: [(EntryField, &'static str); 19] = [
        (Self::SpiffeId, "spiffe_id"),
        (Self::ParentId, "parent_id"),
        (Self::Selectors, "selectors"),
        (Self::X509SvidTtl, "x509_svid_ttl"),
        (Self::JwtSvidTtl, "jwt_svid_ttl"),
        (Self::DnsNames, "dns_names"),
        (Self::Hint, "hint"),
        (Self::FederatesWith, "federates_with"),
        (Self::Admin, "admin"),
        (Self::Downstream, "downstream"),
        (Self::Node, "node"),
        (Self::Owner, "owner"),
        (Self::ExpiresAt, "expires_at"),
        (Self::Description, "description"),
        (Self::RequireApproval, "require_approval"),
        (Self::JwtClaims, "jwt_claims"),
        (Self::TaskTtlMax, "task_ttl_max"),
        (Self::DelegableScopes, "delegable_scopes"),
        (Self::WitSvid, "wit_svid"),
    ];

    /// The wire name.
    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(f, _)| *f == self)
            .map_or("?", |(_, n)| n)
    }

    /// Copies this field from `from` into `to`.
    fn copy(self, from: &PbEntry, to: &mut PbEntry) {
        match self {
            Self::SpiffeId => to.spiffe_id = from.spiffe_id.clone(),
            Self::ParentId => to.parent_id = from.parent_id.clone(),
            Self::Selectors => to.selectors = from.selectors.clone(),
            Self::X509SvidTtl => to.x509_svid_ttl = from.x509_svid_ttl,
            Self::JwtSvidTtl => to.jwt_svid_ttl = from.jwt_svid_ttl,
            Self::DnsNames => to.dns_names = from.dns_names.clone(),
            Self::Hint => to.hint = from.hint.clone(),
            Self::FederatesWith => to.federates_with = from.federates_with.clone(),
            Self::Admin => to.admin = from.admin,
            Self::Downstream => to.downstream = from.downstream,
            Self::Node => to.node = from.node,
            Self::Owner => to.owner = from.owner.clone(),
            Self::ExpiresAt => to.expires_at = from.expires_at,
            Self::Description => to.description = from.description.clone(),
            Self::RequireApproval => to.require_approval = from.require_approval,
            Self::JwtClaims => to.jwt_claims = from.jwt_claims.clone(),
            Self::TaskTtlMax => to.task_ttl_max = from.task_ttl_max,
            Self::DelegableScopes => to.delegable_scopes = from.delegable_scopes.clone(),
            Self::WitSvid => to.wit_svid = from.wit_svid,
        }
    }

    /// Parses an update mask; an unknown name is an error naming the field
    /// `set_fields` and the known names.
    pub fn parse_mask(names: &[String]) -> Result<BTreeSet<EntryField>, RegistryError> {
        names.iter().map(|n| n.parse()).collect()
    }
}

impl FromStr for EntryField {
    type Err = RegistryError;
    fn from_str(s: &str) -> Result<Self, RegistryError> {
        Self::ALL
            .iter()
            .find(|(_, n)| *n == s)
            .map(|(f, _)| *f)
            .ok_or_else(|| {
                let known: Vec<&str> = Self::ALL.iter().map(|(_, n)| *n).collect();
                RegistryError::invalid(format!(
                    "invalid field `set_fields`: unknown field {s:?} (known: {})",
                    known.join(", ")
                ))
            })
    }
}

impl ServerState {
    /// Writes a created (or updated) entry and its audit record in one
    /// transaction.
    fn store_entry(&self, caller: &Caller, e: &Entry, created: bool) -> Result<(), RegistryError> {
        let (entry_id, spiffe_id, parent_id, entry) = (
            e.id.clone(),
            e.spiffe_id.clone(),
            e.parent_id.clone(),
            entry_json(e),
        );
        let event = if created {
            Event::EntryCreated {
                entry_id,
                spiffe_id,
                parent_id,
                entry,
            }
        } else {
            Event::EntryUpdated {
                entry_id,
                spiffe_id,
                parent_id,
                entry,
            }
        };
        self.store.transact(|tx| {
            tx.put_entry(e)?;
            append_audit(tx, caller, event.clone())
        })
    }

    /// Validates an entry from the admin API: the fields `Entry::from_proto`
    /// checks, and `owner` when server.toml has `require_owner = true`. The
    /// sync-only approval fields are never taken from the admin API.
    fn validate(&self, pb: &PbEntry) -> Result<Entry, RegistryError> {
        let mut pb = pb.clone();
        pb.approval_pending.clear();
        pb.approved_until = 0;
        if self.cfg.governance.require_owner && pb.owner.trim().is_empty() {
            return Err(RegistryError::invalid(
                "invalid entry field `owner`: required (server.toml has require_owner = true)",
            ));
        }
        let e = Entry::from_proto(&pb, self.trust_domain())
            .map_err(|e| RegistryError::invalid(e.to_string()))?;
        self.check_task_ttl_max(&e)?;
        Ok(e)
    }

    /// Creates an entry. Refuses an exact duplicate (same SPIFFE ID, parent
    /// and selectors) and an ID that belongs to an agent.
    pub fn create_entry(&self, caller: &Caller, mut pb: PbEntry) -> Result<Entry, RegistryError> {
        if !pb.id.is_empty() {
            return Err(RegistryError::invalid(
                "invalid entry field `id`: assigned by the server",
            ));
        }
        pb.id = new_entry_id();
        pb.revision = 0;
        pb.created_at = now_unix();
        let e = self.validate(&pb)?;
        e.check_expiry_is_future(pb.created_at)
            .map_err(|e| RegistryError::invalid(e.to_string()))?;
        let mut idx = self.entries.write().map_err(|_| poisoned())?;
        self.check_namespace(&e.spiffe_id, Claimant::Entry, &idx)?;
        if let Some(other) = idx.duplicate_of(&e) {
            return Err(RegistryError::exists(format!(
                "entry {other} already has this spiffe_id, parent_id and selectors"
            )));
        }
        self.store_entry(caller, &e, true)?;
        idx.insert(Arc::new(e.clone()));
        if self.any_kill() {
            self.refresh_killed_ids(&idx);
        }
        self.entry_changed(&idx, None, Some(&e));
        drop(idx);
        tracing::info!(%caller, entry = %e.id, spiffe_id = %e.spiffe_id, "entry created");
        Ok(e)
    }

    /// Creates a batch of entries in one datastore transaction (each with
    /// its own `entry_created` audit record). Each entry is checked as
    /// [`ServerState::create_entry`] checks one, and also against the
    /// batch's earlier entries; one that fails gets its error in its place
    /// and is not written, the others are. The outer error (datastore
    /// failure) means nothing was written.
    pub fn create_entries(
        &self,
        caller: &Caller,
        batch: Vec<PbEntry>,
    ) -> Result<Vec<Result<Entry, RegistryError>>, RegistryError> {
        if batch.len() > MAX_ENTRY_BATCH {
            return Err(RegistryError::invalid(format!(
                "invalid field `entries`: at most {MAX_ENTRY_BATCH} per batch, got {}",
                batch.len()
            )));
        }
        let mut idx = self.entries.write().map_err(|_| poisoned())?;
        let now = now_unix();
        let mut seen: HashSet<(SpiffeId, SpiffeId, Vec<String>)> = HashSet::new();
        let checked: Vec<Result<Entry, RegistryError>> = batch
            .into_iter()
            .enumerate()
            .map(|(i, mut pb)| {
                let at = |e: RegistryError| e.in_batch(i);
                if !pb.id.is_empty() {
                    return Err(at(RegistryError::invalid(
                        "invalid entry field `id`: assigned by the server",
                    )));
                }
                pb.id = new_entry_id();
                pb.revision = 0;
                pb.created_at = now;
                let e = self.validate(&pb).map_err(at)?;
                e.check_expiry_is_future(now)
                    .map_err(|err| at(RegistryError::invalid(err.to_string())))?;
                self.check_namespace(&e.spiffe_id, Claimant::Entry, &idx)
                    .map_err(at)?;
                if let Some(other) = idx.duplicate_of(&e) {
                    return Err(at(RegistryError::exists(format!(
                        "entry {other} already has this spiffe_id, parent_id and selectors"
                    ))));
                }
                let key = (
                    e.parent_id.clone(),
                    e.spiffe_id.clone(),
                    e.selectors.iter().map(|s| s.to_string()).collect(),
                );
                if !seen.insert(key) {
                    return Err(at(RegistryError::exists(
                        "an earlier entry of this batch has the same spiffe_id, parent_id and selectors",
                    )));
                }
                Ok(e)
            })
            .collect();
        let created: Vec<&Entry> = checked.iter().filter_map(|r| r.as_ref().ok()).collect();
        if !created.is_empty() {
            self.store.transact(|tx| {
                for e in &created {
                    tx.put_entry(e)?;
                    append_audit(
                        tx,
                        caller,
                        Event::EntryCreated {
                            entry_id: e.id.clone(),
                            spiffe_id: e.spiffe_id.clone(),
                            parent_id: e.parent_id.clone(),
                            entry: entry_json(e),
                        },
                    )?;
                }
                Ok(())
            })?;
        }
        for e in &created {
            idx.insert(Arc::new((*e).clone()));
        }
        if self.any_kill() {
            self.refresh_killed_ids(&idx);
        }
        for e in &created {
            self.entry_changed(&idx, None, Some(e));
        }
        drop(idx);
        tracing::info!(%caller, created = created.len(), refused = checked.len() - created.len(), "entries created in one batch");
        Ok(checked)
    }

    /// Replaces the fields in `mask` of entry `pb.id` with `pb`'s.
    pub fn update_entry(
        &self,
        caller: &Caller,
        pb: PbEntry,
        mask: &BTreeSet<EntryField>,
    ) -> Result<Entry, RegistryError> {
        let mut idx = self.entries.write().map_err(|_| poisoned())?;
        let old = idx
            .by_id
            .get(&pb.id)
            .cloned()
            .ok_or_else(|| RegistryError::not_found(format!("no entry with id {:?}", pb.id)))?;
        let mut next = old.to_proto();
        for f in mask {
            f.copy(&pb, &mut next);
        }
        next.revision = old.revision + 1;
        let e = self.validate(&next)?;
        if mask.contains(&EntryField::ExpiresAt) {
            e.check_expiry_is_future(now_unix())
                .map_err(|e| RegistryError::invalid(e.to_string()))?;
        }
        self.check_namespace(&e.spiffe_id, Claimant::Entry, &idx)?;
        if let Some(other) = idx.duplicate_of(&e) {
            return Err(RegistryError::exists(format!(
                "entry {other} already has this spiffe_id, parent_id and selectors"
            )));
        }
        self.store_entry(caller, &e, false)?;
        idx.insert(Arc::new(e.clone()));
        if self.any_kill() {
            self.refresh_killed_ids(&idx);
        }
        self.entry_changed(&idx, Some(&old), Some(&e));
        drop(idx);
        tracing::info!(%caller, entry = %e.id, revision = e.revision, "entry updated");
        Ok(e)
    }

    pub fn get_entry(&self, id: &str) -> Result<Arc<Entry>, RegistryError> {
        let idx = self.entries.read().map_err(|_| poisoned())?;
        idx.by_id
            .get(id)
            .cloned()
            .ok_or_else(|| RegistryError::not_found(format!("no entry with id {id:?}")))
    }

    pub fn list_entries(&self) -> Result<Vec<Arc<Entry>>, RegistryError> {
        let idx = self.entries.read().map_err(|_| poisoned())?;
        let mut v: Vec<_> = idx.by_id.values().cloned().collect();
        // Every entry is in this trust domain, so comparing the parsed IDs
        // orders them as their text would, without an allocation per
        // comparison.
        v.sort_by(|a, b| a.spiffe_id.cmp(&b.spiffe_id).then_with(|| a.id.cmp(&b.id)));
        Ok(v)
    }

    /// How many entries there are (cheap: for health checks).
    pub fn entry_count(&self) -> Result<usize, RegistryError> {
        Ok(self.entries.read().map_err(|_| poisoned())?.by_id.len())
    }

    pub fn delete_entry(&self, caller: &Caller, id: &str) -> Result<(), RegistryError> {
        let mut idx = self.entries.write().map_err(|_| poisoned())?;
        let Some(gone) = idx.by_id.get(id).cloned() else {
            return Err(RegistryError::not_found(format!("no entry with id {id:?}")));
        };
        self.store.transact(|tx| {
            tx.delete_entry(id)?;
            append_audit(
                tx,
                caller,
                Event::EntryDeleted {
                    entry_id: gone.id.clone(),
                    spiffe_id: gone.spiffe_id.clone(),
                    parent_id: gone.parent_id.clone(),
                },
            )
        })?;
        let old = idx.remove(id);
        self.forget_entry_usage(id);
        if self.any_kill() {
            self.refresh_killed_ids(&idx);
        }
        self.entry_changed(&idx, old.as_deref(), None);
        drop(idx);
        tracing::info!(%caller, entry = %id, "entry deleted");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_update_mask_is_parsed_once_and_names_unknown_fields() {
        let mask = EntryField::parse_mask(&["hint".into(), "selectors".into()]).unwrap();
        assert_eq!(
            mask.into_iter().collect::<Vec<_>>(),
            vec![EntryField::Selectors, EntryField::Hint]
        );
        let err = EntryField::parse_mask(&["bogus".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("set_fields") && err.contains("bogus") && err.contains("spiffe_id"));
        for (f, n) in EntryField::ALL {
            assert_eq!(n.parse::<EntryField>().unwrap(), f);
            assert_eq!(f.name(), n);
        }
    }
}
