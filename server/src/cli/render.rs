//! Every shape the CLI prints: `Key : value` blocks for people and the JSON
//! objects tools read, one pair per resource, plus the helpers that choose
//! between them. Times are RFC 3339 (`null` in JSON, `-` for people, when
//! there is none); JSON keys are stable snake_case.

use serde_json::{Value, json};
use sigil_core::rfc3339;
use sigil_proto::admin::kill_target::Target;
use sigil_proto::admin::{
    Agent, AgentReviewRow, Approval, ClusterServerHealth, DatastoreHealth, EntryReviewRow,
    HealthResponse, Kill, KillTarget,
};
use sigil_proto::common::Entry;

use super::{CliError, Output, OutputArgs};

/// Prints `v` as pretty JSON.
pub(crate) fn print_json(v: &Value) -> Result<(), CliError> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// One record: its JSON, or a headline (when not empty) and its block.
pub(crate) fn one<T>(
    out: &OutputArgs,
    item: &T,
    headline: &str,
    json: fn(&T) -> Value,
    pretty: fn(&T),
) -> Result<(), CliError> {
    if out.output == Output::Json {
        return print_json(&json(item));
    }
    if !headline.is_empty() {
        println!("{headline}\n");
    }
    pretty(item);
    Ok(())
}

/// A list: `{"<key>": [...]}` (or a bare array when `key` is empty), or a
/// count line and one block per item.
pub(crate) fn many<T>(
    out: &OutputArgs,
    key: &str,
    items: &[T],
    count: impl Fn(usize) -> String,
    json: fn(&T) -> Value,
    pretty: fn(&T),
) -> Result<(), CliError> {
    if out.output == Output::Json {
        let arr = Value::Array(items.iter().map(json).collect());
        return print_json(&if key.is_empty() {
            arr
        } else {
            json!({ key: arr })
        });
    }
    println!("{}\n", count(items.len()));
    items.iter().for_each(pretty);
    Ok(())
}

/// `n` followed by the singular or plural form.
pub(crate) fn count(n: usize, one: &str, other: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { other })
}

/// A unix time as JSON: RFC 3339, or `null` for 0.
pub(crate) fn time_or_null(t: i64) -> Value {
    if t == 0 {
        Value::Null
    } else {
        json!(rfc3339(t))
    }
}

/// A unix time for people: RFC 3339, or `-` for 0.
pub(crate) fn or_dash(t: i64) -> String {
    if t == 0 { "-".into() } else { rfc3339(t) }
}

fn dash(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}

// ---- entries ----

/// An entry as JSON.
pub fn entry_json(e: &Entry) -> Value {
    json!({
        "id": e.id,
        "spiffe_id": e.spiffe_id,
        "parent_id": e.parent_id,
        "selectors": e.selectors,
        "x509_svid_ttl": e.x509_svid_ttl,
        "jwt_svid_ttl": e.jwt_svid_ttl,
        "dns_names": e.dns_names,
        "hint": e.hint,
        "federates_with": e.federates_with,
        "admin": e.admin,
        "downstream": e.downstream,
        "node": e.node,
        "owner": e.owner,
        "description": e.description,
        "require_approval": e.require_approval,
        "jwt_claims": e.jwt_claims,
        "task_ttl_max": e.task_ttl_max,
        "delegable_scopes": e.delegable_scopes,
        "wit_svid": e.wit_svid,
        "expires_at": time_or_null(e.expires_at),
        "revision": e.revision,
        "created_at": rfc3339(e.created_at),
    })
}

/// An entry for people.
pub(crate) fn print_entry(e: &Entry) {
    let ttl = |v: i64| {
        if v == 0 {
            "default".to_string()
        } else {
            v.to_string()
        }
    };
    println!("Entry ID         : {}", e.id);
    println!("SPIFFE ID        : {}", e.spiffe_id);
    println!("Parent ID        : {}", e.parent_id);
    println!("Revision         : {}", e.revision);
    println!("X509-SVID TTL    : {}", ttl(e.x509_svid_ttl));
    println!("JWT-SVID TTL     : {}", ttl(e.jwt_svid_ttl));
    for s in &e.selectors {
        println!("Selector         : {s}");
    }
    for d in &e.dns_names {
        println!("DNS name         : {d}");
    }
    for f in &e.federates_with {
        println!("FederatesWith    : {f}");
    }
    if !e.hint.is_empty() {
        println!("Hint             : {}", e.hint);
    }
    if !e.owner.is_empty() {
        println!("Owner            : {}", e.owner);
    }
    if !e.description.is_empty() {
        println!("Description      : {}", e.description);
    }
    for (k, v) in &e.jwt_claims {
        println!("JWT claim        : {k}={v}");
    }
    if !e.delegable_scopes.is_empty() {
        println!("Delegable scopes : {}", e.delegable_scopes.join(" "));
    }
    if e.require_approval {
        println!("Require approval : true");
    }
    if e.wit_svid {
        println!("WIT-SVID         : true");
    }
    if e.task_ttl_max != 0 {
        println!("Task TTL max     : {}", e.task_ttl_max);
    }
    if e.expires_at != 0 {
        println!("Expires at       : {}", rfc3339(e.expires_at));
    }
    if e.node {
        println!("Node             : true");
    }
    if e.admin {
        println!("Admin            : true");
    }
    if e.downstream {
        println!("Downstream       : true");
    }
    println!();
}

/// An access-review row of an entry as JSON (a flat object).
pub(crate) fn entry_review_json(row: &EntryReviewRow) -> Value {
    let e = row.entry.clone().unwrap_or_default();
    json!({
        "id": e.id,
        "spiffe_id": e.spiffe_id,
        "parent_id": e.parent_id,
        "owner": e.owner,
        "description": e.description,
        "reasons": row.reasons,
        "last_used_at": time_or_null(row.last_used_at),
        "expires_at": time_or_null(e.expires_at),
        "created_at": time_or_null(e.created_at),
        "x509_svid_ttl": e.x509_svid_ttl,
        "jwt_svid_ttl": e.jwt_svid_ttl,
        "require_approval": e.require_approval,
    })
}

/// An access-review row of an entry for people.
pub(crate) fn print_entry_review(row: &EntryReviewRow) {
    let e = row.entry.clone().unwrap_or_default();
    println!("Entry ID         : {}", e.id);
    println!("SPIFFE ID        : {}", e.spiffe_id);
    println!("Parent ID        : {}", e.parent_id);
    println!("Owner            : {}", dash(&e.owner));
    println!("Last used        : {}", or_dash(row.last_used_at));
    println!("Expires at       : {}", or_dash(e.expires_at));
    println!("Reasons          : {}", row.reasons.join(", "));
    println!();
}

// ---- agents ----

/// An agent as JSON.
pub(crate) fn agent_json(a: &Agent) -> Value {
    json!({
        "last_seen_at": time_or_null(a.last_seen_at),
        "spiffe_id": a.spiffe_id,
        "attestation_type": a.attestation_type,
        "selectors": a.selectors,
        "serial": a.serial,
        "previous_serial": a.previous_serial,
        "svid_expires_at": rfc3339(a.svid_expires_at),
        "last_attested_at": rfc3339(a.last_attested_at),
        "banned": a.banned,
        "created_at": rfc3339(a.created_at),
    })
}

/// An agent for people.
pub(crate) fn print_agent(a: &Agent) {
    println!("SPIFFE ID         : {}", a.spiffe_id);
    println!("Attestation type  : {}", a.attestation_type);
    println!("Expiration time   : {}", rfc3339(a.svid_expires_at));
    println!("Serial number     : {}", a.serial);
    println!("Last attested     : {}", rfc3339(a.last_attested_at));
    if a.last_seen_at != 0 {
        println!("Last seen         : {}", rfc3339(a.last_seen_at));
    }
    println!("Banned            : {}", a.banned);
    for s in &a.selectors {
        println!("Selector          : {s}");
    }
    println!();
}

/// An access-review row of an agent as JSON (a flat object).
pub(crate) fn agent_review_json(row: &AgentReviewRow) -> Value {
    let ag = row.agent.clone().unwrap_or_default();
    json!({
        "id": ag.spiffe_id,
        "spiffe_id": ag.spiffe_id,
        "attestation_type": ag.attestation_type,
        "reasons": row.reasons,
        "last_seen_at": time_or_null(row.last_seen_at),
        "last_attested_at": time_or_null(ag.last_attested_at),
        "created_at": time_or_null(ag.created_at),
        "banned": ag.banned,
    })
}

/// An access-review row of an agent for people.
pub(crate) fn print_agent_review(row: &AgentReviewRow) {
    let ag = row.agent.clone().unwrap_or_default();
    println!("SPIFFE ID         : {}", ag.spiffe_id);
    println!("Attestation type  : {}", ag.attestation_type);
    println!("Last seen         : {}", or_dash(row.last_seen_at));
    println!("Reasons           : {}", row.reasons.join(", "));
    println!();
}

// ---- kills ----

fn target_parts(t: &Option<KillTarget>) -> (&'static str, String) {
    match t.as_ref().and_then(|t| t.target.as_ref()) {
        Some(Target::SpiffeId(v)) => ("spiffe_id", v.clone()),
        Some(Target::EntryId(v)) => ("entry", v.clone()),
        Some(Target::AgentId(v)) => ("agent", v.clone()),
        Some(Target::Selector(v)) => ("selector", v.clone()),
        None => ("none", String::new()),
    }
}

/// A kill as JSON.
pub(crate) fn kill_json(k: &Kill) -> Value {
    let (kind, value) = target_parts(&k.target);
    json!({
        "id": k.id,
        "target": { "kind": kind, "value": value },
        "reason": k.reason,
        "caller": k.caller,
        "created_at": rfc3339(k.created_at),
    })
}

/// A kill for people.
pub(crate) fn print_kill(k: &Kill) {
    let (kind, value) = target_parts(&k.target);
    println!("Kill ID           : {}", k.id);
    println!("Target            : {kind} {value}");
    println!("Reason            : {}", k.reason);
    println!("Caller            : {}", k.caller);
    println!("Created at        : {}", rfc3339(k.created_at));
    println!();
}

// ---- approvals ----

/// An approval request as JSON.
pub(crate) fn approval_json(a: &Approval) -> Value {
    json!({
        "id": a.id,
        "entry_id": a.entry_id,
        "spiffe_id": a.spiffe_id,
        "agent_id": a.agent_id,
        "status": a.status,
        "requested_at": time_or_null(a.requested_at),
        "decided_at": time_or_null(a.decided_at),
        "decided_by": a.decided_by,
        "expires_at": time_or_null(a.expires_at),
    })
}

/// An approval request for people.
pub(crate) fn print_approval(a: &Approval) {
    println!("Request ID       : {}", a.id);
    println!("Status           : {}", a.status);
    println!("Entry ID         : {}", a.entry_id);
    println!("SPIFFE ID        : {}", a.spiffe_id);
    println!("Agent            : {}", a.agent_id);
    println!("Requested at     : {}", rfc3339(a.requested_at));
    if a.decided_at != 0 {
        println!("Decided at       : {}", rfc3339(a.decided_at));
        println!("Decided by       : {}", a.decided_by);
    }
    if a.expires_at != 0 {
        println!("Grant ends       : {}", rfc3339(a.expires_at));
    }
    println!();
}

// ---- tasks ----

/// `running` or `ended`.
fn state(t: &sigil_proto::task::Task) -> &'static str {
    if t.ended_at == 0 { "running" } else { "ended" }
}

/// A task as JSON (a flat object).
pub(crate) fn task_json(t: &sigil_proto::task::Task) -> Value {
    json!({
        "id": t.id,
        "name": t.name,
        "state": state(t),
        "spiffe_id": t.spiffe_id,
        "entry_id": t.entry_id,
        "entry_spiffe_id": t.entry_spiffe_id,
        "owner": t.owner,
        "agent_id": t.agent_id,
        "started_at": time_or_null(t.started_at),
        "deadline": time_or_null(t.deadline),
        "ended_at": time_or_null(t.ended_at),
        "end_reason": if t.end_reason.is_empty() { Value::Null } else { json!(t.end_reason) },
        "started_by": t.started_by,
        "ended_by": if t.ended_by.is_empty() { Value::Null } else { json!(t.ended_by) },
        "kill_id": if t.kill_id.is_empty() { Value::Null } else { json!(t.kill_id) },
    })
}

/// A task for people.
pub(crate) fn print_task(t: &sigil_proto::task::Task) {
    println!("Task ID          : {}", t.id);
    println!("Name             : {}", t.name);
    println!("State            : {}", state(t));
    println!("SPIFFE ID        : {}", t.spiffe_id);
    println!("Entry            : {} ({})", t.entry_id, t.entry_spiffe_id);
    if !t.owner.is_empty() {
        println!("Owner            : {}", t.owner);
    }
    println!("Agent            : {}", t.agent_id);
    println!("Started at       : {}", rfc3339(t.started_at));
    println!("Deadline         : {}", rfc3339(t.deadline));
    if t.ended_at != 0 {
        println!(
            "Ended at         : {} ({})",
            rfc3339(t.ended_at),
            t.end_reason
        );
        println!("Ended by         : {}", t.ended_by);
    }
    if !t.kill_id.is_empty() {
        println!("Kill             : {}", t.kill_id);
    }
    println!();
}

// ---- health ----

/// The health answer as JSON; `healthy` is false when the datastore is
/// unreachable.
pub(crate) fn health_json(h: &HealthResponse) -> Value {
    let s = h.signing.unwrap_or_default();
    let ds = h.datastore.clone().unwrap_or_default();
    let (datastore, cluster) = datastore_json(&ds, &h.cluster_servers);
    json!({
        "healthy": ds.reachable,
        "datastore": datastore,
        "cluster_servers": cluster,
        "trust_domain": h.trust_domain,
        "entries": h.entries,
        "agents": h.agents,
        "signing": {
            "free_slots": s.free_slots,
            "waiting_calls": s.waiting_calls,
            "waiting_csrs": s.waiting_csrs,
            "peak_calls": s.peak_calls,
            "peak_csrs": s.peak_csrs,
            "svids_signed": s.svids_signed,
        },
    })
}

/// The health answer's details for people (`healthcheck --verbose`).
pub(crate) fn print_health(h: &HealthResponse) {
    let s = h.signing.unwrap_or_default();
    println!("Trust domain     : {}", h.trust_domain);
    println!("Entries          : {}", h.entries);
    println!("Agents           : {}", h.agents);
    println!("SVIDs signed     : {}", s.svids_signed);
    println!(
        "Signing queue    : {} batches ({} CSRs) waiting, peak {} batches ({} CSRs), {} free slots",
        s.waiting_calls, s.waiting_csrs, s.peak_calls, s.peak_csrs, s.free_slots
    );
    print_datastore(&h.datastore.clone().unwrap_or_default(), &h.cluster_servers);
}

/// The datastore and cluster fields of `healthcheck --output json`:
/// whether the datastore answers, the change-feed lag and the servers whose
/// keys are in the bundle.
pub(crate) fn datastore_json(
    ds: &DatastoreHealth,
    servers: &[ClusterServerHealth],
) -> (Value, Value) {
    let mut d = json!({
        "kind": ds.kind,
        "target": ds.target,
        "reachable": ds.reachable,
    });
    if !ds.reachable {
        d["error"] = json!(ds.error);
    }
    if ds.schema_version != 0 {
        d["schema_version"] = json!(ds.schema_version);
    }
    if ds.change_feed {
        d["events_seen"] = json!(ds.events_seen);
        d["events_head"] = json!(ds.events_head);
        d["event_lag"] = json!(ds.events_head.saturating_sub(ds.events_seen));
    }
    let c = servers
        .iter()
        .map(|s| {
            json!({
                "server_id": s.server_id,
                "this": s.this,
                "x509_authorities": s.x509_authorities,
                "jwt_authorities": s.jwt_authorities,
                "published_at": (s.published_at != 0).then(|| rfc3339(s.published_at)),
            })
        })
        .collect::<Vec<_>>();
    (d, json!(c))
}

/// The datastore and cluster lines of `healthcheck --verbose`.
pub(crate) fn print_datastore(ds: &DatastoreHealth, servers: &[ClusterServerHealth]) {
    let state = if ds.reachable {
        let mut s = "reachable".to_string();
        if ds.schema_version != 0 {
            s.push_str(&format!(", schema {}", ds.schema_version));
        }
        s
    } else {
        format!("UNREACHABLE: {}", ds.error)
    };
    println!("Datastore        : {} {} ({state})", ds.kind, ds.target);
    if ds.change_feed {
        println!(
            "Change feed      : event {} applied, head {} (lag {})",
            ds.events_seen,
            ds.events_head,
            ds.events_head.saturating_sub(ds.events_seen)
        );
    }
    println!("Cluster servers  : {}", servers.len());
    for s in servers {
        let when = if s.this {
            "this server".to_string()
        } else {
            format!("published {}", rfc3339(s.published_at))
        };
        println!(
            "  {}  {} X.509 CA{}, {} JWT key{}, {when}",
            s.server_id,
            s.x509_authorities,
            if s.x509_authorities == 1 { "" } else { "s" },
            s.jwt_authorities,
            if s.jwt_authorities == 1 { "" } else { "s" },
        );
    }
}

// ---- bundles ----

/// A bundle as PEM certificates or as a SPIFFE bundle document.
pub(crate) fn bundle_text(
    spiffe_format: bool,
    x509: &[Vec<u8>],
    jwks: &[u8],
    sequence: u64,
) -> Result<String, CliError> {
    if !spiffe_format {
        return Ok(sigil_core::x509::certs_to_pem(
            x509.iter().map(Vec::as_slice),
        ));
    }
    let jwt_keys: Vec<Value> = if jwks.is_empty() {
        vec![]
    } else {
        serde_json::from_slice::<Value>(jwks)?
            .get("keys")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    let doc = sigil_core::bundle::spiffe_bundle(x509, &jwt_keys, sequence, 300)?;
    Ok(serde_json::to_string_pretty(&doc)? + "\n")
}

/// The banner above each federated bundle in `bundle list`.
pub(crate) fn bundle_banner(td: &str) {
    println!("****************************************");
    println!("* spiffe://{td}");
    println!("****************************************");
}

// ---- audit ----

/// One audit record (a JSON line) for people: seq, time, kind, caller,
/// then the event.
pub(crate) fn audit_line(line: &str) -> String {
    let Ok(v) = serde_json::from_str::<Value>(line) else {
        return line.to_string();
    };
    let mut ev = v["event"].clone();
    let kind = ev["kind"].as_str().unwrap_or("?").to_string();
    if let Some(m) = ev.as_object_mut() {
        m.remove("kind");
        m.remove("entry");
    }
    let caller = match v["caller"]["kind"].as_str() {
        Some("admin") => format!("admin(uid {})", v["caller"]["uid"]),
        Some("agent") => format!(
            "agent({})",
            v["caller"]["spiffe_id"].as_str().unwrap_or("?")
        ),
        Some("node") => format!("node({})", v["caller"]["peer"].as_str().unwrap_or("?")),
        Some("server") => format!("server({})", v["caller"]["task"].as_str().unwrap_or("?")),
        _ => v["caller"].to_string(),
    };
    format!(
        "{:>6}  {}  {:<24} {:<28} {}",
        v["seq"].as_u64().unwrap_or(0),
        v["at"].as_str().unwrap_or("?"),
        kind,
        caller,
        ev
    )
}
