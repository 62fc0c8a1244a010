//! Signing keys across a cluster of servers sharing one datastore. Each
//! server keeps its own CA and JWT keys (private parts on its own disk) and
//! publishes their public parts — current and next — as one record under
//! its server ID. The bundle a server serves to agents, to federated peers
//! and to its own TLS client verifier is the union of its own keys and
//! every other server's unexpired published keys, so an SVID signed by any
//! server verifies everywhere and an agent can move between servers.
//!
//! - **Publish before use.** A server publishes on start (before it serves)
//!   and whenever rotation changes its keys; a next key is published at half
//!   the active key's life and only signs from five sixths on, leaving the
//!   other servers ample time to follow the change feed. A publication that
//!   fails (datastore down) is retried every rotation tick.
//! - **Departed servers.** Another server's keys are dropped from the bundle
//!   as each expires; a record whose keys have all expired is deleted by the
//!   next server that publishes.
//! - **Sequence.** Each publication takes the largest sequence of every
//!   record plus one, inside the write transaction, and a deletion happens
//!   only in such a transaction: the bundle's sequence (the largest of all
//!   records) never goes back, whichever server changed.

use std::sync::atomic::Ordering;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use sigil_core::now_unix;

use super::{ServerState, poisoned};
use crate::datastore::ServerKeysRecord;
use crate::error::RegistryError;

/// Other servers' published keys as this server last read them.
#[derive(Default)]
pub(super) struct ClusterKeys {
    /// By server ID, this server excluded.
    pub(super) others: Vec<(String, ServerKeysRecord)>,
    /// The largest sequence of every record, this server's included.
    pub(super) sequence: u64,
}

/// One server of the cluster, as `healthcheck --verbose` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterServer {
    pub server_id: String,
    /// Whether it is this server.
    pub this: bool,
    pub x509_authorities: usize,
    pub jwt_authorities: usize,
    /// Unix seconds of its last publication.
    pub published_at: i64,
}

impl ClusterKeys {
    /// Drops keys expired at `now`; true if any went.
    fn drop_expired(&mut self, now: i64) -> bool {
        let mut changed = false;
        for (_, r) in &mut self.others {
            let before = r.x509.len() + r.jwt.len() + r.wit.len();
            r.x509.retain(|c| c.not_after > now);
            r.jwt.retain(|j| j.not_after > now);
            r.wit.retain(|j| j.not_after > now);
            changed |= r.x509.len() + r.jwt.len() + r.wit.len() != before;
        }
        self.others
            .retain(|(_, r)| !(r.x509.is_empty() && r.jwt.is_empty() && r.wit.is_empty()));
        changed
    }
}

impl ServerState {
    /// Publishes this server's public keys (and deletes the records of
    /// servers whose keys have all expired) in one write transaction, then
    /// takes the other servers' keys from what it read.
    pub fn publish_keys(&self) -> Result<(), RegistryError> {
        let (id, x509, jwt) = {
            let keys = self.keys.read().map_err(|_| poisoned())?;
            let (x509, jwt) = keys.published();
            (keys.server_id().to_string(), x509, jwt)
        };
        let wit = self.own_wit_authorities();
        let now = now_unix();
        let all = self.store.transact(|tx| {
            let mut all = tx.server_keys()?;
            let sequence = all.iter().map(|(_, r)| r.sequence).max().unwrap_or(0) + 1;
            for (other, r) in &all {
                if *other != id && r.not_after() <= now {
                    tx.delete_server_keys(other)?;
                    tracing::info!(server = %other, "deleted the expired keys of a departed server");
                }
            }
            all.retain(|(other, r)| *other != id && r.not_after() > now);
            let mine = ServerKeysRecord {
                x509: x509.clone(),
                jwt: jwt.clone(),
                wit: wit.clone(),
                sequence,
                published_at: now,
            };
            tx.put_server_keys(&id, &mine)?;
            all.push((id.clone(), mine));
            Ok(all)
        })?;
        self.keys_unpublished.store(false, Ordering::SeqCst);
        self.take_cluster_keys(all);
        Ok(())
    }

    /// Re-reads every server's published keys (after a change-feed event).
    pub fn reload_cluster_keys(&self) -> Result<(), RegistryError> {
        let all = self.store.read()?.server_keys()?;
        self.take_cluster_keys(all);
        Ok(())
    }

    /// Retries a failed publication and drops other servers' expired keys;
    /// called every rotation tick.
    pub fn cluster_keys_tick(&self) {
        if self.keys_unpublished.load(Ordering::SeqCst) {
            match self.publish_keys() {
                Ok(()) => tracing::info!("published this server's keys"),
                Err(e) => {
                    tracing::warn!(error = %e, "publishing this server's keys failed; retrying");
                }
            }
        }
        let changed = self
            .cluster
            .write()
            .map(|mut c| c.drop_expired(now_unix()))
            .unwrap_or(false);
        if changed {
            self.refresh_bundle();
            self.bump();
        }
    }

    fn take_cluster_keys(&self, all: Vec<(String, ServerKeysRecord)>) {
        let own = self
            .keys
            .read()
            .map(|k| k.server_id().to_string())
            .unwrap_or_default();
        let sequence = all.iter().map(|(_, r)| r.sequence).max().unwrap_or(0);
        let mut next = ClusterKeys {
            others: all.into_iter().filter(|(id, _)| *id != own).collect(),
            sequence,
        };
        next.drop_expired(now_unix());
        let changed = {
            let Ok(mut c) = self.cluster.write() else {
                return;
            };
            // Never let the sequence go back (a stale read after a newer one).
            next.sequence = next.sequence.max(c.sequence);
            let changed = c.others != next.others || c.sequence != next.sequence;
            *c = next;
            changed
        };
        if changed {
            self.refresh_bundle();
            self.bump();
        }
    }

    /// Rebuilds the shared X.509 bundle: this server's CAs, then every
    /// other server's unexpired ones (each certificate once).
    pub(super) fn refresh_bundle(&self) {
        let mut certs = self
            .keys
            .read()
            .map(|k| k.x509_authorities())
            .unwrap_or_default();
        if let Ok(c) = self.cluster.read() {
            for (id, r) in &c.others {
                for ca in &r.x509 {
                    match STANDARD.decode(&ca.der) {
                        Ok(der) if !certs.contains(&der) => certs.push(der),
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(server = %id, error = %e, "skipping a published CA that is not base64")
                        }
                    }
                }
            }
        }
        if let Ok(mut b) = self.x509_bundle.write() {
            *b = certs;
        }
    }

    /// Every JWT authority of the cluster: this server's, then the others'.
    pub(super) fn cluster_jwt_authorities(&self) -> Vec<serde_json::Value> {
        let mut jwks = self
            .keys
            .read()
            .map(|k| k.jwt_authorities())
            .unwrap_or_default();
        if let Ok(c) = self.cluster.read() {
            for (_, r) in &c.others {
                for j in &r.jwt {
                    if !jwks.iter().any(|k| k.get("kid") == j.jwk.get("kid")) {
                        jwks.push(j.jwk.clone());
                    }
                }
            }
        }
        jwks
    }

    /// Every WIT-SVID authority of the cluster: this server's, then the
    /// others' (each `kid` once).
    pub(super) fn cluster_wit_authorities(&self) -> Vec<serde_json::Value> {
        let mut jwks: Vec<serde_json::Value> = self
            .own_wit_authorities()
            .into_iter()
            .map(|p| p.jwk)
            .collect();
        if let Ok(c) = self.cluster.read() {
            for (_, r) in &c.others {
                for j in &r.wit {
                    if !jwks.iter().any(|k| k.get("kid") == j.jwk.get("kid")) {
                        jwks.push(j.jwk.clone());
                    }
                }
            }
        }
        jwks
    }

    /// The bundle sequence: the largest of every server's publication.
    pub(super) fn cluster_sequence(&self) -> u64 {
        self.cluster.read().map(|c| c.sequence).unwrap_or(0)
    }

    /// The servers whose keys are in the bundle, this one first.
    pub fn cluster_servers(&self) -> Vec<ClusterServer> {
        let mut out = Vec::new();
        if let Ok(k) = self.keys.read() {
            let (x509, jwt) = k.published();
            out.push(ClusterServer {
                server_id: k.server_id().to_string(),
                this: true,
                x509_authorities: x509.len(),
                jwt_authorities: jwt.len(),
                published_at: 0,
            });
        }
        if let Ok(c) = self.cluster.read() {
            for (id, r) in &c.others {
                out.push(ClusterServer {
                    server_id: id.clone(),
                    this: false,
                    x509_authorities: r.x509.len(),
                    jwt_authorities: r.jwt.len(),
                    published_at: r.published_at,
                });
            }
        }
        out
    }
}
