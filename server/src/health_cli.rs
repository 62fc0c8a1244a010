//! The datastore and cluster part of `sigil-server healthcheck`: whether
//! the datastore answers, how far this server has followed the change
//! feed (event lag), and the servers whose keys are in the bundle.

use serde_json::{Value, json};
use sigil_core::rfc3339;
use sigil_proto::admin::{ClusterServerHealth, DatastoreHealth};

/// The datastore and cluster fields of `healthcheck --output json`.
pub fn json_fields(ds: &DatastoreHealth, servers: &[ClusterServerHealth]) -> (Value, Value) {
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
pub fn print_verbose(ds: &DatastoreHealth, servers: &[ClusterServerHealth]) {
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
