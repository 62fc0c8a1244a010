//! Federated trust domains' bundles: stored, held in memory, and delivered
//! to the entries that federate with them.
//!
//! The rules for accepting a bundle live here, once, for both ways one
//! arrives (`bundle set` by an operator, and the bundle endpoint poller):
//! not this server's own trust domain; at least one authority; every X.509
//! authority a certificate, none naming another trust domain in a
//! `spiffe://` URI SAN; a JWKS only of asymmetric keys with a `kid`;
//! and no rollback: a bundle whose `spiffe_sequence` is lower than the
//! stored one's is refused, and so is one without a sequence unless an
//! operator sets it (checked inside the write transaction, against what is
//! stored, so two writers cannot interleave).

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
        for der in &b.x509_authorities {
            let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| {
                RegistryError::invalid(format!("invalid field `bundle`: bad certificate: {e}"))
            })?;
            if let Some(named) = foreign_trust_domain(&cert, td) {
                return Err(RegistryError::invalid(format!(
                    "invalid field `bundle`: an X.509 authority names trust domain {named}, not {td}"
                )));
            }
        }
        if !b.jwt_bundle.is_empty() {
            sigil_core::jwt::JwtBundle::from_jwks(&b.jwt_bundle)
                .map_err(|e| RegistryError::invalid(format!("invalid field `bundle`: {e}")))?;
        }
        let mut fed = self.federated.write().map_err(|_| poisoned())?;
        let changed = fed.get(td.as_str()) != Some(&b);
        if !changed {
            return Ok(());
        }
        self.store.transact(|tx| {
            let known = tx
                .bundles()?
                .into_iter()
                .find(|(name, _)| name == td.as_str())
                .map_or(0, |(_, stored)| stored.sequence);
            if b.sequence != 0 && b.sequence < known {
                return Err(RegistryError::invalid(format!(
                    "invalid field `spiffe_sequence`: {} is older than the stored bundle's {known} (a rollback)",
                    b.sequence
                )));
            }
            // A bundle without a sequence would reset the stored one to 0,
            // after which any older bundle passes the rule above: only an
            // operator may do that (`bundle set` of a PEM bundle), never a
            // bundle endpoint.
            if b.sequence == 0 && known != 0 && !matches!(caller, Caller::Admin { .. }) {
                return Err(RegistryError::invalid(format!(
                    "invalid field `spiffe_sequence`: missing, and the stored bundle's is {known} (only an operator's `bundle set` may drop it)"
                )));
            }
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

/// The trust domain named by a `spiffe://` URI SAN of `cert` that is not
/// `td`, if any: a CA that says it belongs to another trust domain is not
/// an authority of `td` (a bundle endpoint serving the wrong bundle, or
/// one trying to smuggle a third trust domain's CA in). Authorities
/// without a SPIFFE URI SAN (an upstream root, say) name nothing and pass.
fn foreign_trust_domain(
    cert: &x509_parser::certificate::X509Certificate<'_>,
    td: &TrustDomain,
) -> Option<String> {
    let san = cert.subject_alternative_name().ok().flatten()?;
    san.value.general_names.iter().find_map(|g| match g {
        x509_parser::extensions::GeneralName::URI(u) => {
            let rest = u.strip_prefix("spiffe://")?;
            let host = rest.split('/').next().unwrap_or(rest);
            (!host.eq_ignore_ascii_case(td.as_str())).then(|| host.to_string())
        }
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::super::tests::{admin, temp_state};
    use super::*;

    fn bundle(seq: u64) -> FederatedBundle {
        let td = TrustDomain::new("other.org").unwrap();
        let (ca, _) =
            sigil_core::x509::Ca::generate(&td, std::time::Duration::from_secs(600)).unwrap();
        FederatedBundle {
            x509_authorities: vec![ca.cert_der().to_vec()],
            jwt_bundle: vec![],
            sequence: seq,
        }
    }

    #[test]
    fn one_set_of_rules_for_every_federated_bundle() {
        let t = temp_state();
        let s = &t.state;
        let other = TrustDomain::new("other.org").unwrap();
        s.set_federated_bundle(&admin(), &other, bundle(5)).unwrap();
        // A rollback is refused, naming the field, and changes nothing.
        let before = s.federated_bundles();
        let e = s
            .set_federated_bundle(&admin(), &other, bundle(4))
            .unwrap_err();
        assert!(e.to_string().contains("spiffe_sequence"), "{e}");
        assert_eq!(s.federated_bundles(), before);
        // Newer is taken; without a sequence, only from an operator: from a
        // bundle endpoint it would reset the sequence and open the way to
        // any rollback.
        s.set_federated_bundle(&admin(), &other, bundle(6)).unwrap();
        let before = s.federated_bundles();
        let fetcher = Caller::server(sigil_core::caller::ServerTask::Federation);
        let e = s
            .set_federated_bundle(&fetcher, &other, bundle(0))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing, and the stored bundle's is 6"), "{e}");
        assert_eq!(s.federated_bundles(), before);
        s.set_federated_bundle(&admin(), &other, bundle(0)).unwrap();
        // Bad certificates and symmetric JWKS keys are refused here too.
        let mut bad = bundle(7);
        bad.x509_authorities = vec![b"not a certificate".to_vec()];
        assert!(
            s.set_federated_bundle(&admin(), &other, bad)
                .unwrap_err()
                .to_string()
                .contains("bad certificate")
        );
        let mut hmac = bundle(7);
        hmac.jwt_bundle = br#"{"keys":[{"kty":"oct","kid":"k","k":"c2VjcmV0"}]}"#.to_vec();
        assert!(s.set_federated_bundle(&admin(), &other, hmac).is_err());
        // A CA that names another trust domain in its URI SAN is not
        // other.org's authority, whatever its sequence.
        let third = TrustDomain::new("third.org").unwrap();
        let (ca, _) =
            sigil_core::x509::Ca::generate(&third, std::time::Duration::from_secs(600)).unwrap();
        let mut smuggled = bundle(9);
        smuggled.x509_authorities.push(ca.cert_der().to_vec());
        let before = s.federated_bundles();
        let e = s
            .set_federated_bundle(&admin(), &other, smuggled)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("names trust domain third.org, not other.org"),
            "{e}"
        );
        assert_eq!(s.federated_bundles(), before);
        // Our own trust domain never.
        let own = s.trust_domain().clone();
        assert!(s.set_federated_bundle(&admin(), &own, bundle(1)).is_err());
    }
}
