//! Copying one datastore into another (`sigil-server datastore migrate`):
//! every table, in one write transaction of the target, which must be
//! empty; then the copy is read back and compared, and its audit chain
//! verified, before success is reported.

use sigil_core::TrustDomain;
use sigil_core::audit;

use super::Datastore;
use crate::error::RegistryError;

/// What was copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CopySummary {
    pub entries: usize,
    pub agents: usize,
    pub join_tokens: usize,
    pub federated_bundles: usize,
    pub kills: usize,
    pub audit_records: usize,
    pub approvals: usize,
    pub tasks: usize,
    /// Servers whose published public keys were copied.
    pub server_keys: usize,
}

impl std::fmt::Display for CopySummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} entries, {} agents, {} join tokens, {} federated bundles, {} kills, {} audit records, {} approval requests, {} tasks, {} server key records",
            self.entries,
            self.agents,
            self.join_tokens,
            self.federated_bundles,
            self.kills,
            self.audit_records,
            self.approvals,
            self.tasks,
            self.server_keys
        )
    }
}

fn mismatch(what: &str) -> RegistryError {
    RegistryError::internal(format!(
        "the copy's {what} differ from the source's after writing; the target was left as written"
    ))
}

/// Copies every record of `from` into the empty datastore `to`; entries
/// are validated for trust domain `td` on the way.
pub fn copy_all(
    from: &dyn Datastore,
    to: &dyn Datastore,
    td: &TrustDomain,
) -> Result<CopySummary, RegistryError> {
    let src = from.read()?;
    let entries = src.entries(td)?;
    let agents = src.agents()?;
    let tokens = src.tokens_by_hash()?;
    let bundles = src.bundles()?;
    let kills = src.kills()?;
    let records = src.audit_records(0, usize::MAX)?;
    let approvals = src.approvals()?;
    let marks = src.usage_marks()?;
    let tasks = src.tasks()?;
    // The public keys servers published: agents hold SVIDs signed by them,
    // and the servers of the new deployment serve them until they expire.
    let server_keys = src.server_keys()?;
    drop(src);
    if !records.is_empty() {
        audit::verify(&records, None).map_err(|e| {
            RegistryError::precondition(format!(
                "the source's audit chain does not verify ({e}); not copied"
            ))
        })?;
    }
    to.write(&mut |tx| {
        let nonempty = [
            ("entries", !tx.entries(td)?.is_empty()),
            ("agents", tx.agent_count()? > 0),
            ("join tokens", !tx.tokens()?.is_empty()),
            ("federated bundles", !tx.bundles()?.is_empty()),
            ("kills", !tx.kills()?.is_empty()),
            ("audit records", tx.audit_head()?.is_some()),
            ("approval requests", !tx.approvals()?.is_empty()),
            ("tasks", !tx.tasks()?.is_empty()),
            ("server keys", !tx.server_keys()?.is_empty()),
        ];
        if let Some((what, _)) = nonempty.iter().find(|(_, n)| *n) {
            return Err(RegistryError::precondition(format!(
                "the target datastore already holds {what}: migrate only into an empty one"
            )));
        }
        for e in &entries {
            tx.put_entry(e)?;
        }
        for a in &agents {
            tx.put_agent(a)?;
        }
        for (hash, t) in &tokens {
            tx.put_token(hash, t)?;
        }
        for (trust_domain, b) in &bundles {
            tx.put_bundle(trust_domain, b)?;
        }
        for k in &kills {
            tx.put_kill(k)?;
        }
        for r in &records {
            tx.put_audit(r)?;
        }
        for a in &approvals {
            tx.put_approval(a)?;
        }
        for t in &tasks {
            tx.put_task(t)?;
        }
        for (id, k) in &server_keys {
            tx.put_server_keys(id, k)?;
        }
        // Last-activity marks are bookkeeping: copied, not compared.
        for m in &marks {
            tx.put_usage_mark(m)?;
        }
        Ok(())
    })?;
    let dst = to.read()?;
    if dst.entries(td)? != entries {
        return Err(mismatch("entries"));
    }
    if dst.agents()? != agents {
        return Err(mismatch("agents"));
    }
    if dst.tokens_by_hash()? != tokens {
        return Err(mismatch("join tokens"));
    }
    if dst.bundles()? != bundles {
        return Err(mismatch("federated bundles"));
    }
    if dst.kills()? != kills {
        return Err(mismatch("kills"));
    }
    let mut got = dst.approvals()?;
    let mut want = approvals.clone();
    got.sort_by(|a, b| a.id.cmp(&b.id));
    want.sort_by(|a, b| a.id.cmp(&b.id));
    if got != want {
        return Err(mismatch("approval requests"));
    }
    if dst.tasks()? != tasks {
        return Err(mismatch("tasks"));
    }
    if dst.server_keys()? != server_keys {
        return Err(mismatch("server keys"));
    }
    let copied = dst.audit_records(0, usize::MAX)?;
    if copied != records {
        return Err(mismatch("audit records"));
    }
    if !copied.is_empty() {
        audit::verify(&copied, None)
            .map_err(|e| RegistryError::internal(format!("the copied audit chain: {e}")))?;
    }
    Ok(CopySummary {
        entries: entries.len(),
        agents: agents.len(),
        join_tokens: tokens.len(),
        federated_bundles: bundles.len(),
        kills: kills.len(),
        audit_records: records.len(),
        approvals: approvals.len(),
        tasks: tasks.len(),
        server_keys: server_keys.len(),
    })
}
