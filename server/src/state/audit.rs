//! The audit trail's signing side and its queries:
//!
//! - the audit key: `<data_dir>/audit_key.pem`, an Ed25519 PKCS#8 PEM
//!   created on first start with mode 0600 and afterwards read only if it is
//!   a regular file (no symlink) owned by the server's uid or root with no
//!   group/other permission bits, like `keys.json`. It is never logged; only
//!   its public half and key ID leave the server (`GetAuditKey`);
//! - checkpoints: a [`Event::Checkpoint`] over the chain head, appended by
//!   [`Caller::server`]`(`[`ServerTask::AuditCheckpoint`]`)` in its own write
//!   transaction that reads the head (so it is always the record right after
//!   the head it signs). [`ServerState::audit_checkpoint_if_due`] (polled
//!   once a second) signs when `audit_checkpoint_every` records follow the
//!   last checkpoint or when unsigned records have waited
//!   `audit_checkpoint_interval`; [`ServerState::audit_export_page`] signs
//!   before serving a page that reaches the head, so an export never ends
//!   with unsigned records (unless records are appended while it runs);
//! - queries: [`ServerState::query_audit`] scans the whole chain (one read
//!   snapshot, in pages) and returns the records matching every filter of an
//!   [`AuditQuery`]. A full scan costs time linear in the chain's length;
//!   there is no index yet.

use crate::error::StartupError;
use std::path::Path;
use std::sync::{Mutex, OnceLock};

use serde_json::Value;
use sigil_core::audit::{AuditKey, AuditPublicKey, Event, Record};
use sigil_core::{SpiffeId, now_unix};
use sigil_fs::{Links, read_private_file, write_atomic};

use super::{Caller, ServerState, ServerTask};
use crate::datastore::append_audit;
use crate::error::RegistryError;

/// The audit key's file name inside `data_dir`.
pub const AUDIT_KEY_FILE: &str = "audit_key.pem";

/// Records read per datastore call while scanning.
const SCAN_PAGE: usize = 10_000;

/// Most audit records one retention pass examines.
const PRUNE_SCAN: usize = 500_000;

/// Loads `<data_dir>/audit_key.pem`, or creates it (mode 0600) if absent.
/// The error names the file; it never contains key material.
pub fn load_or_create_audit_key(data_dir: &Path) -> Result<AuditKey, StartupError> {
    let path = data_dir.join(AUDIT_KEY_FILE);
    let bad = |e: &dyn std::fmt::Display| StartupError::file("audit key", &path, e);
    match read_private_file(&path, Links::Refuse) {
        Ok(bytes) => {
            let text = String::from_utf8(bytes).map_err(|_| bad(&"not UTF-8 PEM"))?;
            AuditKey::from_pkcs8_pem(&text).map_err(|e| bad(&e))
        }
        Err(e) if e.is_not_found() => {
            let key = AuditKey::generate().map_err(|e| bad(&e))?;
            write_atomic(&path, key.to_pkcs8_pem().as_bytes(), 0o600).map_err(|e| bad(&e))?;
            tracing::info!(key_id = %key.key_id(), path = %path.display(), "created the audit signing key");
            Ok(key)
        }
        Err(e) => Err(bad(&e)),
    }
}

/// The checkpointer's state, part of [`ServerState`].
#[derive(Default)]
pub(super) struct AuditState {
    key: OnceLock<AuditKey>,
    /// The last checkpoint known: (its own seq, its time in Unix seconds);
    /// `None` until first looked up.
    last: Mutex<Option<(u64, i64)>>,
}

/// Filters of an audit query; a record matches when it matches every one
/// that is set.
#[derive(Debug, Default, Clone)]
pub struct AuditQuery {
    /// Any `spiffe_id`, `agent_id` or `parent_id` in the event, or the
    /// calling agent, equals this ID.
    pub spiffe_id: Option<SpiffeId>,
    /// Any `serial` in the event equals this one (normalized by
    /// [`normalize_serial`]).
    pub serial: Option<String>,
    /// Any `jti` in the event equals this.
    pub jti: Option<String>,
    /// The agent the record concerns: an `agent_id` or `parent_id` in the
    /// event, or the calling agent.
    pub agent_id: Option<SpiffeId>,
    /// Only records at or after this time (Unix seconds).
    pub since_time: Option<i64>,
}

/// A serial number in hex as queries compare it: lowercase, without colons
/// or leading zeros. The error names the field.
pub fn normalize_serial(s: &str) -> Result<String, RegistryError> {
    let hex: String = s
        .chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(RegistryError::invalid(format!(
            "invalid field `serial`: {s:?} is not a hex serial number"
        )));
    }
    let trimmed = hex.trim_start_matches('0');
    Ok(if trimmed.is_empty() { "0" } else { trimmed }.to_string())
}

/// Whether any member named one of `keys`, at any depth of `v`, is a string
/// for which `eq` holds.
fn any_member(v: &Value, keys: &[&str], eq: &dyn Fn(&str) -> bool) -> bool {
    match v {
        Value::Object(m) => m.iter().any(|(k, val)| {
            (keys.contains(&k.as_str()) && val.as_str().is_some_and(eq))
                || any_member(val, keys, eq)
        }),
        Value::Array(items) => items.iter().any(|i| any_member(i, keys, eq)),
        _ => false,
    }
}

impl AuditQuery {
    /// Whether record `r` matches every filter that is set.
    pub fn matches(&self, r: &Record) -> bool {
        if self.since_time.is_some_and(|t| r.time < t) {
            return false;
        }
        let event = serde_json::to_value(&r.event).unwrap_or(Value::Null);
        let calling_agent = match &r.caller {
            Caller::Agent { spiffe_id } => Some(spiffe_id),
            _ => None,
        };
        if let Some(id) = &self.spiffe_id {
            let id = id.to_string();
            if calling_agent.map(|a| a.to_string()) != Some(id.clone())
                && !any_member(&event, &["spiffe_id", "agent_id", "parent_id"], &|s| {
                    s == id
                })
            {
                return false;
            }
        }
        if let Some(id) = &self.agent_id {
            let id = id.to_string();
            if calling_agent.map(|a| a.to_string()) != Some(id.clone())
                && !any_member(&event, &["agent_id", "parent_id"], &|s| s == id)
            {
                return false;
            }
        }
        if let Some(serial) = &self.serial
            && !any_member(&event, &["serial"], &|s| {
                normalize_serial(s).is_ok_and(|n| &n == serial)
            })
        {
            return false;
        }
        if let Some(jti) = &self.jti
            && !any_member(&event, &["jti"], &|s| s == jti)
        {
            return false;
        }
        true
    }
}

impl ServerState {
    /// Installs the audit key (once, at startup); checkpoints are signed
    /// from then on.
    pub fn install_audit_key(&self, key: AuditKey) -> Result<(), RegistryError> {
        self.audit
            .key
            .set(key)
            .map_err(|_| RegistryError::internal("the audit key is already installed"))
    }

    /// The audit key's public half, once installed.
    pub fn audit_public_key(&self) -> Option<&AuditPublicKey> {
        self.audit.key.get().map(|k| k.public_key())
    }

    /// Appends a checkpoint over the chain head unless the head already is
    /// one (or the chain is empty, or no key is installed). Returns the
    /// checkpoint's seq if one was appended.
    pub fn audit_checkpoint(&self) -> Result<Option<u64>, RegistryError> {
        let Some(key) = self.audit.key.get() else {
            return Ok(None);
        };
        let caller = Caller::server(ServerTask::AuditCheckpoint);
        let (appended, last) = self.store.transact(|tx| {
            let Some(head) = tx.audit_head()? else {
                return Ok((None, None));
            };
            let top = tx.audit_records(head.seq, 1)?;
            if let Some(r) = top.first()
                && matches!(r.event, Event::Checkpoint { .. })
            {
                return Ok((None, Some((r.seq, r.time))));
            }
            append_audit(tx, &caller, key.checkpoint(&head))?;
            Ok((Some(head.seq + 1), Some((head.seq + 1, now_unix()))))
        })?;
        if let Some(l) = last {
            *self.audit.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(l);
        }
        if let Some(seq) = appended {
            tracing::debug!(seq, "audit checkpoint signed");
        }
        Ok(appended)
    }

    /// Signs a checkpoint if `audit_checkpoint_every` records follow the
    /// last one, or if unsigned records have waited
    /// `audit_checkpoint_interval` since it. Cheap when nothing is due.
    pub fn audit_checkpoint_if_due(&self) -> Result<Option<u64>, RegistryError> {
        if self.audit.key.get().is_none() {
            return Ok(None);
        }
        let every = self.cfg.audit_checkpoint_every;
        let Some(head) = self.store.read()?.audit_head()? else {
            return Ok(None);
        };
        let known = *self.audit.last.lock().unwrap_or_else(|p| p.into_inner());
        let (cp_seq, cp_time) = match known {
            Some(l) => l,
            None => {
                // First look: the last checkpoint within `every` records of
                // the head; none there means one is due anyway.
                let from = head.seq.saturating_sub(every).max(1);
                let window = self
                    .store
                    .read()?
                    .audit_records(from, usize::try_from(every).unwrap_or(usize::MAX))?;
                let found = window
                    .iter()
                    .rev()
                    .find(|r| matches!(r.event, Event::Checkpoint { .. }))
                    .map(|r| (r.seq, r.time))
                    .unwrap_or((head.seq.saturating_sub(every), 0));
                *self.audit.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(found);
                found
            }
        };
        let unsigned = head.seq.saturating_sub(cp_seq);
        let interval =
            i64::try_from(self.cfg.audit_checkpoint_interval.as_secs()).unwrap_or(i64::MAX);
        let due =
            unsigned >= every || (unsigned > 0 && now_unix().saturating_sub(cp_time) >= interval);
        if due {
            self.audit_checkpoint()
        } else {
            Ok(None)
        }
    }

    /// Retention: deletes the longest prefix of the chain older than
    /// `audit_retention` that is directly followed by a signed checkpoint
    /// (which stays, anchoring what remains), in one transaction with a
    /// `pruned` record naming what went. Returns how many records went.
    /// At most `PRUNE_SCAN` records are examined per call; the next call
    /// goes on from there.
    pub fn audit_prune_if_due(&self) -> Result<u64, RegistryError> {
        let Some(retention) = self.cfg.audit_retention else {
            return Ok(0);
        };
        let cutoff =
            now_unix().saturating_sub(i64::try_from(retention.as_secs()).unwrap_or(i64::MAX));
        // The plan, from a read snapshot: the prefix is immutable (records
        // are only ever appended at the head), so it stays valid.
        let plan = {
            let r = self.store.read()?;
            let mut plan = None;
            let mut prev: Option<Record> = None;
            let mut next = 0u64;
            let mut seen = 0usize;
            loop {
                let page = r.audit_records(next, SCAN_PAGE)?;
                let Some(last) = page.last() else { break };
                next = last.seq + 1;
                let reached_cutoff = page.iter().any(|rec| rec.time >= cutoff);
                let full = page.len() == SCAN_PAGE;
                seen += page.len();
                // The previous page's last record first, so a checkpoint at
                // the start of this page can anchor.
                let mut window: Vec<Record> = prev.take().into_iter().collect();
                window.extend(page);
                if let Some(p) = sigil_core::audit::prune_plan(&window, cutoff) {
                    plan = Some(p);
                }
                if reached_cutoff || !full || seen >= PRUNE_SCAN {
                    break;
                }
                prev = window.pop();
            }
            plan
        };
        let Some(plan) = plan else {
            return Ok(0);
        };
        let caller = Caller::server(ServerTask::AuditRetention);
        let n = self.store.transact(|tx| {
            // Another server (or an earlier call) may have pruned already.
            let first = tx.audit_records(0, 1)?.first().map(|r| r.seq);
            if first.is_none_or(|f| f > plan.drop_through) {
                return Ok(0);
            }
            let n = tx.delete_audit_through(plan.drop_through)?;
            append_audit(tx, &caller, plan.marker())?;
            Ok(n)
        })?;
        if n > 0 {
            tracing::info!(
                records = n,
                through = plan.drop_through,
                anchor = plan.anchor_seq,
                "audit retention: pruned the chain up to a signed checkpoint"
            );
        }
        Ok(n)
    }

    /// One export page (`seq >= since`, at most `limit`): when the page
    /// reaches the chain head, a checkpoint over the head is appended first,
    /// so the page ends with a signed record.
    pub fn audit_export_page(
        &self,
        since: u64,
        limit: usize,
    ) -> Result<Vec<Record>, RegistryError> {
        let head = self.store.read()?.audit_head()?;
        if let Some(h) = head
            && h.seq < since.saturating_add(limit as u64)
        {
            self.audit_checkpoint()?;
        }
        self.audit_records(since, limit)
    }

    /// The first sequence number whose record's time is at or after `t`
    /// (one past the head if none), by binary search: record times follow
    /// the chain order, because appends are serialized and stamped then.
    /// Records pruned by retention are skipped (a lookup below the first
    /// retained record lands on it).
    pub(super) fn first_audit_seq_since(
        &self,
        t: i64,
    ) -> Result<u64, crate::datastore::StoreError> {
        let r = self.store.read()?;
        let Some(head) = r.audit_head()? else {
            return Ok(1);
        };
        let (mut lo, mut hi) = (1u64, head.seq + 1);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let at = r
                .audit_records(mid, 1)?
                .first()
                .map_or(i64::MAX, |rec| rec.time);
            if at >= t {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        Ok(lo)
    }

    /// Records matching `q`, in chain order, at most `limit`; the flag says
    /// whether more matched. Scans the chain, from `--since` on when it is
    /// given (found by binary search on time).
    pub fn query_audit(
        &self,
        q: &AuditQuery,
        limit: usize,
    ) -> Result<(Vec<Record>, bool), RegistryError> {
        let mut next = match q.since_time {
            Some(t) => self.first_audit_seq_since(t)?,
            None => 1,
        };
        let r = self.store.read()?;
        let mut out = Vec::new();
        loop {
            let page = r.audit_records(next, SCAN_PAGE)?;
            let n = page.len();
            for rec in page {
                next = rec.seq + 1;
                if q.matches(&rec) {
                    if out.len() == limit {
                        return Ok((out, true));
                    }
                    out.push(rec);
                }
            }
            if n < SCAN_PAGE {
                return Ok((out, false));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn audit_key_is_created_private_reloaded_and_refused_when_exposed() {
        let dir = std::env::temp_dir().join(format!("sigil-audit-key-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        sigil_fs::ensure_private_dir(&dir).unwrap();
        let k1 = load_or_create_audit_key(&dir).unwrap();
        let path = dir.join(AUDIT_KEY_FILE);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let k2 = load_or_create_audit_key(&dir).unwrap();
        assert_eq!(k1.key_id(), k2.key_id());

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = load_or_create_audit_key(&dir).unwrap_err().to_string();
        assert!(e.contains(AUDIT_KEY_FILE), "{e}");
        assert!(!e.contains("PRIVATE KEY"), "{e}");

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let real = dir.join("real.pem");
        std::fs::rename(&path, &real).unwrap();
        std::os::unix::fs::symlink(&real, &path).unwrap();
        let e = load_or_create_audit_key(&dir).unwrap_err().to_string();
        assert!(e.contains("symbolic link"), "{e}");

        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, "not a key").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = load_or_create_audit_key(&dir).unwrap_err().to_string();
        assert!(e.contains(AUDIT_KEY_FILE), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn serials_are_normalized_and_bad_ones_name_the_field() {
        assert_eq!(normalize_serial("00:AB:cd").unwrap(), "abcd");
        assert_eq!(normalize_serial("000").unwrap(), "0");
        for bad in ["", ":", "xyz", "12 34"] {
            let e = normalize_serial(bad).unwrap_err().to_string();
            assert!(e.contains("`serial`"), "{bad:?}: {e}");
        }
    }
}
