//! Revocation: the certificate revocation lists that carry a kill to
//! relying parties which check revocation.
//!
//! A kill stops the server from issuing and the agents from serving, but an
//! X.509-SVID already handed out stays cryptographically valid until it
//! expires. So every published CA signs a CRL listing the serials of the
//! *withdrawn, unexpired* SVIDs: workload SVIDs whose entry, SPIFFE ID,
//! agent or selector a kill in force covers, or that a banned agent asked
//! for, and the agent SVIDs of killed or banned agents.
//!
//! The serials come from the audit trail, which records every serial the CA
//! signs ([`Event::X509SvidsIssued`], [`Event::AgentSvidIssued`],
//! [`Event::AgentSvidRenewed`]): the issuance log needs no second table.
//! Only the window that can hold unexpired SVIDs is read (no SVID outlives
//! its CA, and expired CAs are unpublished, so records older than the
//! oldest published CA are irrelevant); it is found by binary search on the
//! sequence number. A new kill scans the window once for what it covers; a
//! lift, a restart and every periodic re-signing rebuild the set from the
//! kills in force, which also picks up a mint batch that raced with a kill
//! or ban. CRLs are listed per CA (each CA lists every withdrawn serial:
//! serials are random, so a serial of another CA's SVID matches nothing),
//! are valid for [`CRL_LIFETIME`], and are re-signed at half of it or when
//! the published CAs change. Every change reaches the agents on their sync
//! streams, and the agents deliver the CRLs in the Workload API's `crl`
//! fields. An empty CRL is signed too, so relying parties that require one
//! per issuer (openssl `-crl_check`) keep working while nothing is killed.

use std::collections::{BTreeMap, HashSet};

use sigil_core::audit::{Event, Record};
use sigil_core::entry::Entry;
use sigil_core::x509::CrlEntry;
use sigil_core::{SpiffeId, now_unix};

use super::ServerState;
use super::entries::EntryIndex;
use crate::datastore::{KillRecord, KillTarget, StoreError};
use crate::error::RegistryError;

/// How long a signed CRL is valid (`nextUpdate - thisUpdate`); it is
/// re-signed after half of it.
const CRL_LIFETIME: i64 = 600;

/// Audit records read per datastore call while scanning the window.
const SCAN_PAGE: usize = 2048;

/// A withdrawn serial.
#[derive(Debug, Clone, Copy)]
struct Revoked {
    expires_at: i64,
    revoked_at: i64,
}

/// The withdrawn serials and the CRLs signed over them.
#[derive(Default)]
pub(super) struct Revocations {
    revoked: BTreeMap<String, Revoked>,
    /// DER CRLs, one per published CA, oldest CA first.
    crls: Vec<Vec<u8>>,
    /// The last CRL number used (monotonic; seeded from the clock so it
    /// keeps increasing across restarts).
    number: u64,
    /// When the CRLs were signed, and over which CA certificates.
    signed_at: i64,
    signed_for: Vec<Vec<u8>>,
}

/// What is withdrawn now: kills in force and banned agents.
struct Withdrawn<'a> {
    kills: &'a [KillRecord],
    banned: HashSet<SpiffeId>,
    entries: &'a EntryIndex,
}

impl Withdrawn<'_> {
    fn agent(&self, agent: &SpiffeId) -> bool {
        self.banned.contains(agent)
            || self
                .kills
                .iter()
                .any(|k| matches!(&k.target, KillTarget::Agent(a) if a == agent))
    }

    fn workload(&self, agent: &SpiffeId, entry_id: &str, spiffe_id: &SpiffeId) -> bool {
        if self.agent(agent) {
            return true;
        }
        let entry: Option<&Entry> = self.entries.by_id.get(entry_id).map(|e| &**e);
        self.kills.iter().any(|k| match &k.target {
            KillTarget::SpiffeId(id) => id == spiffe_id,
            KillTarget::Entry(id) => id == entry_id,
            KillTarget::Agent(_) => false,
            // A selector kill covers the entry as it is now; the SVIDs of
            // a since-deleted entry are not matched by selector.
            KillTarget::Selector(_) => entry.is_some_and(|e| k.target.covers(e)),
        })
    }

    /// The serials of `rec` this withdraws, with their expiry.
    fn serials<'r>(&self, rec: &'r Record, out: &mut Vec<(&'r str, i64)>) {
        match &rec.event {
            Event::X509SvidsIssued { agent_id, svids } => {
                for s in svids {
                    if self.workload(agent_id, &s.entry_id, &s.spiffe_id) {
                        out.push((&s.serial, s.expires_at));
                    }
                }
            }
            Event::AgentSvidIssued {
                agent_id,
                serial,
                expires_at,
            }
            | Event::AgentSvidRenewed {
                agent_id,
                serial,
                expires_at,
            } if self.agent(agent_id) => out.push((serial, *expires_at)),
            _ => {}
        }
    }
}

impl ServerState {
    /// The current CRLs (DER), one per published CA.
    pub fn crls(&self) -> Vec<Vec<u8>> {
        self.revocations
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .crls
            .clone()
    }

    /// The withdrawn serials (lowercase hex), sorted.
    pub fn revoked_serials(&self) -> Vec<String> {
        self.revocations
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .revoked
            .keys()
            .cloned()
            .collect()
    }

    fn banned_agents(&self) -> Result<HashSet<SpiffeId>, StoreError> {
        Ok(self
            .store
            .read()?
            .agents()?
            .into_iter()
            .filter(|a| a.banned)
            .map(|a| a.spiffe_id)
            .collect())
    }

    /// The first audit sequence number whose record may list an unexpired
    /// SVID: the first at or after the oldest published CA's notBefore.
    fn window_start(&self) -> Result<u64, StoreError> {
        let oldest = {
            let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
            keys.cas()
                .iter()
                .map(|c| c.not_before().unix_timestamp())
                .min()
                .unwrap_or_else(now_unix)
        };
        self.first_audit_seq_since(oldest)
    }

    /// Every unexpired serial `w` withdraws, from the audit window.
    fn scan_withdrawn(&self, w: &Withdrawn<'_>) -> Result<Vec<(String, i64)>, StoreError> {
        let now = now_unix();
        let mut out = Vec::new();
        if w.kills.is_empty() && w.banned.is_empty() {
            return Ok(out);
        }
        let mut seq = self.window_start()?;
        loop {
            let page = self.store.read()?.audit_records(seq, SCAN_PAGE)?;
            let Some(last) = page.last() else { break };
            seq = last.seq + 1;
            let mut found = Vec::new();
            for rec in &page {
                w.serials(rec, &mut found);
            }
            out.extend(
                found
                    .into_iter()
                    .filter(|(_, exp)| *exp > now)
                    .map(|(s, exp)| (s.to_string(), exp)),
            );
            if page.len() < SCAN_PAGE {
                break;
            }
        }
        Ok(out)
    }

    /// Rebuilds the withdrawn set from the kills in force and the banned
    /// agents, and re-signs the CRLs. Called at start, after a lift and on
    /// every periodic re-signing.
    pub(super) fn rebuild_revocations(&self) -> Result<(), RegistryError> {
        let kills = self.kills.read().unwrap_or_else(|p| p.into_inner()).clone();
        let banned = self.banned_agents()?;
        let found = {
            let idx = self.entries.read().unwrap_or_else(|p| p.into_inner());
            self.scan_withdrawn(&Withdrawn {
                kills: &kills,
                banned,
                entries: &idx,
            })?
        };
        let now = now_unix();
        let mut rev = self.revocations.write().unwrap_or_else(|p| p.into_inner());
        let old = std::mem::take(&mut rev.revoked);
        for (serial, expires_at) in found {
            // A serial already listed keeps its revocation time.
            let revoked_at = old.get(&serial).map_or(now, |r| r.revoked_at);
            rev.revoked.insert(
                serial,
                Revoked {
                    expires_at,
                    revoked_at,
                },
            );
        }
        self.sign_crls(&mut rev, now)
    }

    /// Adds what `kill` withdraws (a new kill, already in force) and
    /// re-signs the CRLs.
    pub(super) fn revoke_for_kill(&self, kill: &KillRecord) -> Result<(), RegistryError> {
        let found = {
            let idx = self.entries.read().unwrap_or_else(|p| p.into_inner());
            self.scan_withdrawn(&Withdrawn {
                kills: std::slice::from_ref(kill),
                banned: HashSet::new(),
                entries: &idx,
            })?
        };
        self.add_revoked(found)
    }

    /// Adds what a ban of `agent` withdraws and re-signs the CRLs.
    pub(super) fn revoke_for_ban(&self, agent: &SpiffeId) -> Result<(), RegistryError> {
        let found = {
            let idx = self.entries.read().unwrap_or_else(|p| p.into_inner());
            self.scan_withdrawn(&Withdrawn {
                kills: &[],
                banned: HashSet::from([agent.clone()]),
                entries: &idx,
            })?
        };
        self.add_revoked(found)
    }

    /// After a mint batch's audit record is written: if a kill in force
    /// covers one of its SVIDs (the kill came while the batch was being
    /// signed), list it now.
    pub(super) fn revoke_raced(
        &self,
        agent: &SpiffeId,
        issued: &[sigil_core::audit::IssuedRef<'_>],
    ) -> Result<(), RegistryError> {
        let kills = self.kills.read().unwrap_or_else(|p| p.into_inner()).clone();
        let found: Vec<(String, i64)> = {
            let idx = self.entries.read().unwrap_or_else(|p| p.into_inner());
            let w = Withdrawn {
                kills: &kills,
                banned: HashSet::new(),
                entries: &idx,
            };
            issued
                .iter()
                .filter(|s| w.workload(agent, s.entry_id, s.spiffe_id))
                .map(|s| (s.serial.to_string(), s.expires_at))
                .collect()
        };
        if found.is_empty() {
            return Ok(());
        }
        tracing::warn!(%agent, count = found.len(), "SVIDs signed while a kill was created: revoked");
        self.add_revoked(found)?;
        self.bump();
        Ok(())
    }

    fn add_revoked(&self, found: Vec<(String, i64)>) -> Result<(), RegistryError> {
        let now = now_unix();
        let mut rev = self.revocations.write().unwrap_or_else(|p| p.into_inner());
        for (serial, expires_at) in found {
            rev.revoked.entry(serial).or_insert(Revoked {
                expires_at,
                revoked_at: now,
            });
        }
        self.sign_crls(&mut rev, now)
    }

    /// Drops expired serials and signs one CRL per published CA.
    fn sign_crls(&self, rev: &mut Revocations, now: i64) -> Result<(), RegistryError> {
        rev.revoked.retain(|_, r| r.expires_at > now);
        let list: Vec<CrlEntry> = rev
            .revoked
            .iter()
            .map(|(serial, r)| CrlEntry {
                serial: serial.clone(),
                revoked_at: r.revoked_at,
            })
            .collect();
        let cas = self.keys.read().unwrap_or_else(|p| p.into_inner()).cas();
        // Monotonic per CA, and across restarts while the clock moves on.
        let number = (rev.number + 1).max(u64::try_from(now).unwrap_or(0) * 1000);
        let mut crls = Vec::with_capacity(cas.len());
        for ca in &cas {
            // Never past the CA's own expiry.
            let next = (now + CRL_LIFETIME).min(ca.not_after().unix_timestamp());
            if next <= now {
                continue;
            }
            crls.push(
                ca.sign_crl(&list, number, now, next)
                    .map_err(|e| RegistryError::internal(format!("signing the CRL: {e}")))?,
            );
        }
        rev.number = number;
        rev.crls = crls;
        rev.signed_at = now;
        rev.signed_for = cas.iter().map(|c| c.cert_der().to_vec()).collect();
        tracing::debug!(revoked = list.len(), crls = rev.crls.len(), "CRLs signed");
        Ok(())
    }

    /// Re-signs the CRLs when half their lifetime has passed or the
    /// published CAs changed (rebuilding the withdrawn set from the kills
    /// in force). Returns whether they changed; the caller wakes the sync
    /// streams.
    pub fn refresh_crls_if_due(&self) -> Result<bool, RegistryError> {
        let now = now_unix();
        let due = {
            let rev = self.revocations.read().unwrap_or_else(|p| p.into_inner());
            let cas: Vec<Vec<u8>> = self
                .keys
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .cas()
                .iter()
                .map(|c| c.cert_der().to_vec())
                .collect();
            now - rev.signed_at >= CRL_LIFETIME / 2 || rev.signed_for != cas
        };
        if !due {
            return Ok(false);
        }
        self.rebuild_revocations()?;
        self.bump();
        Ok(true)
    }
}
