//! Change notification: every change bumps a revision and wakes exactly the
//! sync streams it concerns (one agent's, or all of them).

use sigil_core::SpiffeId;
use sigil_core::entry::Entry;
use tokio::sync::watch;

use super::ServerState;
use super::entries::EntryIndex;

impl ServerState {
    /// Change notifications for one agent's sync stream: the global
    /// channel and the agent's own. A change to one agent's entries wakes
    /// only that agent, so the cost of a change does not grow with the
    /// number of agents.
    pub fn subscribe(&self, agent: &SpiffeId) -> (watch::Receiver<u64>, watch::Receiver<u64>) {
        let mut map = self.agent_watch.lock().unwrap_or_else(|p| p.into_inner());
        let own = map
            .entry(agent.clone())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe();
        (self.global.subscribe(), own)
    }

    /// Current change revision.
    pub fn revision(&self) -> u64 {
        self.revision.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn next_revision(&self) -> u64 {
        self.revision
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1
    }

    /// Wakes every sync stream.
    pub(super) fn bump(&self) {
        let r = self.next_revision();
        self.global.send_replace(r);
    }

    /// Wakes the sync stream of one agent, if it has one.
    pub(super) fn notify_agent(&self, agent: &SpiffeId) {
        let r = self.next_revision();
        let map = self.agent_watch.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = map.get(agent) {
            tx.send_replace(r);
        }
    }

    /// Wakes whoever an entry change concerns: the agent named as parent,
    /// or everyone when a node alias (or an entry under one) changed, since
    /// alias membership depends on each agent's node selectors.
    pub(super) fn entry_changed(&self, idx: &EntryIndex, old: Option<&Entry>, new: Option<&Entry>) {
        let mut everyone = false;
        let mut agents: Vec<&SpiffeId> = Vec::new();
        for e in [old, new].into_iter().flatten() {
            let parent_is_alias = idx
                .nodes
                .iter()
                .filter_map(|id| idx.by_id.get(id))
                .any(|n| n.spiffe_id == e.parent_id);
            if e.node || parent_is_alias {
                everyone = true;
            } else {
                agents.push(&e.parent_id);
            }
        }
        if everyone {
            self.bump();
        } else {
            for a in agents {
                self.notify_agent(a);
            }
        }
    }
}
