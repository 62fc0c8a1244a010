//! Federated trust domains' bundles: stored, held in memory, and delivered
//! to the entries that federate with them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use sigil_core::TrustDomain;
use sigil_core::entry::Entry;
use sigil_proto::common::FederatedBundle;

use super::{Caller, ServerState, poisoned};
use crate::datastore::append_audit;
use crate::error::RegistryError;
use sigil_core::audit::Event;

impl ServerState {
    /// Bundles of the trust domains that any of `entries` federates with.
    pub fn federated_for(&self, entries: &[Arc<Entry>]) -> HashMap<String, FederatedBundle> {
        // Distinct names first: many entries federate with the same few
        // trust domains, and each bundle is cloned once.
        let names: BTreeSet<&str> = entries
            .iter()
            .flat_map(|e| e.federates_with.iter().map(|td| td.as_str()))
            .collect();
        let fed = self.federated.read().unwrap_or_else(|p| p.into_inner());
        names
            .into_iter()
            .filter_map(|td| fed.get(td).map(|b| (td.to_string(), b.clone())))
            .collect()
    }

    /// Sets (creates or replaces) a federated trust domain's bundle.
    pub fn set_federated_bundle(
        &self,
        caller: &Caller,
        td: &TrustDomain,
        b: FederatedBundle,
    ) -> Result<(), RegistryError> {
        if td == self.trust_domain() {
            return Err(RegistryError::invalid(
                "invalid field `id`: that is this server's own trust domain",
            ));
        }
        if b.x509_authorities.is_empty() && b.jwt_bundle.is_empty() {
            return Err(RegistryError::invalid(
                "invalid field `bundle`: no authorities",
            ));
        }
        let mut fed = self.federated.write().map_err(|_| poisoned())?;
        let changed = fed.get(td.as_str()) != Some(&b);
        if !changed {
            return Ok(());
        }
        self.store.transact(|tx| {
            tx.put_bundle(td.as_str(), &b)?;
            append_audit(
                tx,
                caller,
                Event::FederatedBundleSet {
                    trust_domain: td.clone(),
                    sequence: None,
                },
            )
        })?;
        fed.insert(td.to_string(), b);
        drop(fed);
        if changed {
            tracing::info!(%caller, trust_domain = %td, "federated bundle changed");
            self.bump();
        }
        Ok(())
    }

    /// Removes a federated bundle.
    pub fn delete_federated_bundle(
        &self,
        caller: &Caller,
        td: &TrustDomain,
    ) -> Result<(), RegistryError> {
        let mut fed = self.federated.write().map_err(|_| poisoned())?;
        if !self.store.transact(|tx| {
            if !tx.delete_bundle(td.as_str())? {
                return Ok(false);
            }
            append_audit(
                tx,
                caller,
                Event::FederatedBundleDeleted {
                    trust_domain: td.clone(),
                },
            )?;
            Ok(true)
        })? {
            return Err(RegistryError::not_found(format!(
                "no bundle for trust domain {td}"
            )));
        }
        fed.remove(td.as_str());
        drop(fed);
        tracing::info!(%caller, trust_domain = %td, "federated bundle deleted");
        self.bump();
        Ok(())
    }

    /// All federated bundles.
    pub fn federated_bundles(&self) -> BTreeMap<String, FederatedBundle> {
        self.federated
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}
