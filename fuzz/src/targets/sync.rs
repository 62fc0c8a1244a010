//! Sync updates as the agent decodes them: protobuf `SyncUpdate` messages
//! through `SyncAssembler` (chunks, deltas, removals, `Entry::from_proto`
//! on every entry), then what the cache does with a complete update: the
//! JWT and federated bundles (`TrustMaterial::new`) and the entry index
//! (`EntrySet::entitled`, checked against a full scan).
//!
//! Input: parts, each one encoded `SyncUpdate`.

use std::collections::BTreeSet;

use crate::parts;
use prost::Message;
use sigil_agent::cache::{EntrySet, TrustMaterial};
use sigil_agent::node::SyncAssembler;
use sigil_core::TrustDomain;
use sigil_core::entry::Entry;
use sigil_core::selector::SelectorSet;
use sigil_proto::agent::SyncUpdate;

/// One input through the target; panics when an oracle fails.
pub fn run(data: &[u8]) {
    let td = TrustDomain::new("example.org").expect("valid");
    let mut asm = SyncAssembler::new(td.clone());
    // A model of the entry set: IDs only.
    let mut model: BTreeSet<String> = BTreeSet::new();
    let mut pending = Vec::new();
    for p in parts(data) {
        let Ok(u) = SyncUpdate::decode(p) else {
            continue;
        };
        pending.extend(u.entries.iter().cloned());
        let more = u.more;
        let (delta, removed) = (u.delta, u.removed.clone());
        let state = asm.push(u);
        if more {
            assert!(state.is_none());
            assert_eq!(asm.pending(), pending.len());
            continue;
        }
        let state = state.expect("a last chunk completes the update");
        assert_eq!(asm.pending(), 0);
        if !delta {
            model.clear();
        }
        for r in &removed {
            model.remove(r);
        }
        for e in pending.drain(..) {
            match Entry::from_proto(&e, &td) {
                Ok(v) => model.insert(v.id),
                Err(_) => model.remove(&e.id),
            };
        }
        let ids: Vec<&str> = state.entries.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, model.iter().map(String::as_str).collect::<Vec<_>>());

        let _ = TrustMaterial::new(&td, state.jwt_bundle.clone(), state.federated.clone());
        let set = EntrySet::new(state.entries.clone());
        for probe in state.entries.iter().take(4) {
            let caller: SelectorSet = probe.selectors.iter().cloned().collect();
            let got: Vec<&str> = set
                .entitled(&caller)
                .iter()
                .map(|e| e.id.as_str())
                .collect();
            let want: Vec<&str> = state
                .entries
                .iter()
                .filter(|e| !e.selectors.is_empty() && caller.satisfies(&e.selectors))
                .map(|e| e.id.as_str())
                .collect();
            assert_eq!(got, want);
        }
    }
}
