//! What an agent's sync stream sends after each change.
//!
//! A stream starts with the complete set of entries the agent is authorized
//! for. After that, an agent that asked for deltas receives only the entries
//! added or changed and the IDs removed, so a change to one entry of an
//! agent holding 50,000 costs one entry on the wire instead of 50,000.
//! Whatever is sent, large updates are split into chunks of at most
//! [`SYNC_CHUNK`] entries.

use std::collections::HashMap;
use std::sync::Arc;

use sigil_core::entry::Entry;
use sigil_proto::agent::SyncUpdate;
use sigil_proto::common::FederatedBundle;

/// Entries per sync message (a few hundred bytes each: well under the
/// 4 MiB gRPC message limit even for large selector lists).
pub const SYNC_CHUNK: usize = 2000;

/// The trust material every update carries (in its last chunk).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Trust {
    pub bundle: Vec<Vec<u8>>,
    pub jwt_bundle: Vec<u8>,
    pub federated: HashMap<String, FederatedBundle>,
    /// SPIFFE IDs whose JWT-SVIDs validators must reject (killed).
    pub killed: Vec<String>,
    /// CRLs (DER) of the trust domain's CAs.
    pub crl: Vec<Vec<u8>>,
    /// JWKS document of the WIT-SVID authorities (`use: wit-svid`).
    pub wit_bundle: Vec<u8>,
}

/// Remembers what one stream has been sent.
#[derive(Debug)]
pub struct SyncTracker {
    deltas: bool,
    sent: Option<Sent>,
}

#[derive(Debug)]
struct Sent {
    /// Sorted by ID; `Arc`s shared with the server's index, so remembering
    /// a stream's set costs a pointer per entry.
    entries: Vec<Arc<Entry>>,
    trust: Trust,
}

impl SyncTracker {
    /// A tracker for a new stream; `deltas` as the agent asked.
    pub fn new(deltas: bool) -> Self {
        Self { deltas, sent: None }
    }

    /// The update that brings the agent to `entries` and `trust`, or `None`
    /// when it already has exactly that.
    pub fn next(
        &mut self,
        entries: &[Arc<Entry>],
        trust: Trust,
        revision: u64,
    ) -> Option<SyncUpdate> {
        // `entries` holds each entry once, sorted within each parent only
        // (node aliases add parents): sort the copy kept for diffing.
        let mut sorted = entries.to_vec();
        if !sorted.is_sorted_by(|a, b| a.id <= b.id) {
            sorted.sort_by(|a, b| a.id.cmp(&b.id));
        }
        let (changed, removed) = match &self.sent {
            None => (Vec::new(), Vec::new()),
            Some(prev) => {
                let (changed, removed) = diff(&prev.entries, &sorted);
                if changed.is_empty() && removed.is_empty() && prev.trust == trust {
                    return None;
                }
                (changed, removed)
            }
        };
        let delta = self.deltas && self.sent.is_some();
        let update = SyncUpdate {
            entries: if delta {
                changed.iter().map(|e| e.to_proto()).collect()
            } else {
                entries.iter().map(|e| e.to_proto()).collect()
            },
            bundle: trust.bundle.clone(),
            revision,
            jwt_bundle: trust.jwt_bundle.clone(),
            federated: trust.federated.clone(),
            more: false,
            delta,
            removed: if delta { removed } else { Vec::new() },
            killed_spiffe_ids: trust.killed.clone(),
            crl: trust.crl.clone(),
            wit_bundle: trust.wit_bundle.clone(),
            ..Default::default()
        };
        self.sent = Some(Sent {
            entries: sorted,
            trust,
        });
        Some(update)
    }
}

/// Walks two ID-sorted lists: the entries of `now` that are new or differ
/// from `prev` (the same `Arc`, or equal contents, is no change), and the
/// IDs in `prev` that `now` lacks.
fn diff<'a>(prev: &[Arc<Entry>], now: &'a [Arc<Entry>]) -> (Vec<&'a Arc<Entry>>, Vec<String>) {
    let (mut changed, mut removed) = (Vec::new(), Vec::new());
    let (mut p, mut n) = (prev.iter().peekable(), now.iter().peekable());
    loop {
        match (p.peek(), n.peek()) {
            (None, None) => return (changed, removed),
            (Some(a), Some(b)) if a.id == b.id => {
                if !Arc::ptr_eq(a, b) && a != b {
                    changed.push(*b);
                }
                p.next();
                n.next();
            }
            (Some(a), Some(b)) if a.id < b.id => {
                removed.push(a.id.clone());
                p.next();
            }
            (Some(a), None) => {
                removed.push(a.id.clone());
                p.next();
            }
            (_, Some(b)) => {
                changed.push(*b);
                n.next();
            }
        }
    }
}

/// Splits an update into messages of at most [`SYNC_CHUNK`] entries; trust
/// material and removals travel in the last one, which alone lacks `more`.
pub fn chunks(update: SyncUpdate) -> Vec<SyncUpdate> {
    if update.entries.len() <= SYNC_CHUNK {
        return vec![update];
    }
    let mut entries = update.entries.into_iter().peekable();
    let mut out = Vec::new();
    loop {
        let part: Vec<_> = entries.by_ref().take(SYNC_CHUNK).collect();
        if entries.peek().is_some() {
            out.push(SyncUpdate {
                entries: part,
                revision: update.revision,
                more: true,
                delta: update.delta,
                ..Default::default()
            });
            continue;
        }
        out.push(SyncUpdate {
            entries: part,
            revision: update.revision,
            more: false,
            delta: update.delta,
            bundle: update.bundle,
            jwt_bundle: update.jwt_bundle,
            federated: update.federated,
            removed: update.removed,
            killed_spiffe_ids: update.killed_spiffe_ids,
            crl: update.crl,
            wit_bundle: update.wit_bundle,
            ..Default::default()
        });
        return out;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sigil_core::TrustDomain;
    use sigil_proto::common::Entry as PbEntry;

    fn entry(id: &str, hint: &str) -> Arc<Entry> {
        let td = TrustDomain::new("example.org").unwrap();
        let pb = PbEntry {
            id: id.into(),
            spiffe_id: format!("spiffe://example.org/{id}"),
            parent_id: "spiffe://example.org/agent".into(),
            selectors: vec!["unix:uid:1".into()],
            hint: hint.into(),
            ..Default::default()
        };
        Arc::new(Entry::from_proto(&pb, &td).unwrap())
    }

    fn ids(u: &SyncUpdate) -> Vec<&str> {
        u.entries.iter().map(|e| e.id.as_str()).collect()
    }

    #[test]
    fn deltas_carry_only_changes_after_a_full_first_update() {
        let mut t = SyncTracker::new(true);
        let (a, b, c) = (entry("a", ""), entry("b", ""), entry("c", ""));
        let first = t
            .next(&[a.clone(), b.clone(), c.clone()], Trust::default(), 1)
            .unwrap();
        assert!(!first.delta);
        assert_eq!(ids(&first), ["a", "b", "c"]);
        // Nothing changed: nothing to send.
        assert!(
            t.next(&[a.clone(), b.clone(), c.clone()], Trust::default(), 2)
                .is_none()
        );
        // b changed (a new Arc with equal content is not a change), c removed,
        // d added.
        let d = entry("d", "");
        let u = t
            .next(&[entry("a", ""), entry("b", "new"), d], Trust::default(), 3)
            .unwrap();
        assert!(u.delta);
        assert_eq!(ids(&u), ["b", "d"]);
        assert_eq!(u.removed, ["c"]);
        // A trust change alone is sent, with no entries.
        let trust = Trust {
            bundle: vec![vec![1, 2, 3]],
            ..Default::default()
        };
        let all = [entry("a", ""), entry("b", "new"), entry("d", "")];
        let u = t.next(&all, trust.clone(), 4).unwrap();
        assert!(u.delta && u.entries.is_empty() && u.removed.is_empty());
        assert_eq!(u.bundle, trust.bundle);
    }

    #[test]
    fn without_deltas_every_update_is_complete() {
        let mut t = SyncTracker::new(false);
        let (a, b) = (entry("a", ""), entry("b", ""));
        t.next(&[a.clone(), b.clone()], Trust::default(), 1)
            .unwrap();
        assert!(
            t.next(&[a.clone(), b.clone()], Trust::default(), 1)
                .is_none()
        );
        let u = t.next(&[a], Trust::default(), 2).unwrap();
        assert!(!u.delta && u.removed.is_empty());
        assert_eq!(ids(&u), ["a"]);
    }

    #[test]
    fn chunks_keep_trust_and_removals_for_the_last_message() {
        let n = SYNC_CHUNK * 2 + 5;
        let update = SyncUpdate {
            entries: (0..n)
                .map(|i| PbEntry {
                    id: format!("e{i}"),
                    ..Default::default()
                })
                .collect(),
            bundle: vec![vec![9]],
            removed: vec!["gone".into()],
            delta: true,
            revision: 7,
            ..Default::default()
        };
        let parts = chunks(update);
        assert_eq!(parts.len(), 3);
        assert_eq!(parts.iter().map(|p| p.entries.len()).sum::<usize>(), n);
        assert!(
            parts[..2]
                .iter()
                .all(|p| p.more && p.bundle.is_empty() && p.removed.is_empty())
        );
        let last = &parts[2];
        assert!(
            !last.more && last.delta && last.bundle == vec![vec![9]] && last.removed == ["gone"]
        );
        assert!(parts.iter().all(|p| p.revision == 7 && p.delta));
        // Small updates stay one message.
        assert_eq!(chunks(SyncUpdate::default()).len(), 1);
    }
}
