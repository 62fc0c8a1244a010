//! Who caused a change: the admin-socket peer, an attested agent, a node
//! that is attesting, or the server acting on its own.
//!
//! Every registry mutation takes a [`Caller`] and every audit record names
//! one. The JSON form is stable (it is part of the hashed audit encoding, see
//! [`crate::audit`]): an object tagged by `"kind"`, SPIFFE IDs as strings.
//!
//! ```json
//! {"kind":"admin","uid":0,"gid":0,"pid":42}
//! {"kind":"agent","spiffe_id":"spiffe://example.org/sigil/agent/join_token/abc"}
//! {"kind":"node","peer":"10.0.0.7:50112"}
//! {"kind":"server","task":"key_rotation"}
//! ```

use std::fmt;

use serde::{Deserialize, Serialize};
use spiffe::SpiffeId;

/// Who caused a change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
pub enum Caller {
    /// An operator on the server's admin socket, by its peer credentials
    /// (`SO_PEERCRED`). `pid` is `None` when the platform does not report it.
    Admin {
        /// Peer user ID.
        uid: u32,
        /// Peer group ID.
        gid: u32,
        /// Peer process ID, if known.
        pid: Option<i32>,
    },
    /// An attested agent, authenticated by its agent X.509-SVID.
    Agent {
        /// The agent's SPIFFE ID.
        #[serde(with = "serde_text")]
        spiffe_id: SpiffeId,
    },
    /// A node that has no identity yet: the peer of a node attestation (or a
    /// join-token use). `peer` is its socket address when the transport
    /// reports one.
    Node {
        /// The peer's socket address (`ip:port`), if known.
        peer: Option<String>,
    },
    /// The server itself, doing one of its periodic or lifecycle tasks.
    Server {
        /// What the server was doing.
        task: ServerTask,
    },
}

impl Caller {
    /// An admin-socket peer.
    pub fn admin(uid: u32, gid: u32, pid: Option<i32>) -> Self {
        Self::Admin { uid, gid, pid }
    }

    /// An attested agent.
    pub fn agent(spiffe_id: SpiffeId) -> Self {
        Self::Agent { spiffe_id }
    }

    /// The server doing `task`.
    pub fn server(task: ServerTask) -> Self {
        Self::Server { task }
    }
}

impl fmt::Display for Caller {
    /// `admin uid=0 gid=0 pid=42`, `agent spiffe://…`, `node 10.0.0.7:50112`,
    /// `server (key rotation)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Admin { uid, gid, pid } => {
                write!(f, "admin uid={uid} gid={gid}")?;
                if let Some(pid) = pid {
                    write!(f, " pid={pid}")?;
                }
                Ok(())
            }
            Self::Agent { spiffe_id } => write!(f, "agent {spiffe_id}"),
            Self::Node { peer: Some(peer) } => write!(f, "node {peer}"),
            Self::Node { peer: None } => f.write_str("node (unknown address)"),
            Self::Server { task } => write!(f, "server ({task})"),
        }
    }
}

/// What the server was doing when it changed something on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ServerTask {
    /// Preparing or activating a CA or JWT signing key.
    KeyRotation,
    /// Removing expired entries, agents, tokens or kills.
    Expiry,
    /// Refreshing a federated trust domain's bundle.
    Federation,
    /// Initialising state at startup.
    Startup,
    /// Signing an audit checkpoint.
    AuditCheckpoint,
    /// Pruning audit records older than `audit_retention`.
    AuditRetention,
    /// Copying state between datastores (`datastore migrate`).
    Migration,
}

impl fmt::Display for ServerTask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::KeyRotation => "key rotation",
            Self::Expiry => "expiry",
            Self::Federation => "federation",
            Self::Startup => "startup",
            Self::AuditCheckpoint => "audit checkpoint",
            Self::AuditRetention => "audit retention",
            Self::Migration => "datastore migration",
        })
    }
}

/// Serde adapter for types whose text form is their wire form (`Display` +
/// `FromStr`), such as `SpiffeId` and `TrustDomain`, which have no serde
/// support of their own. Use as `#[serde(with = "serde_text")]`.
pub(crate) mod serde_text {
    use std::fmt::Display;
    use std::str::FromStr;

    use serde::{Deserialize, Deserializer, Serializer, de::Error as _};

    pub(crate) fn serialize<T: Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    pub(crate) fn deserialize<'de, T, D>(d: D) -> Result<T, D::Error>
    where
        T: FromStr,
        T::Err: Display,
        D: Deserializer<'de>,
    {
        let s = String::deserialize(d)?;
        s.parse()
            .map_err(|e| D::Error::custom(format!("{s:?}: {e}")))
    }

    /// The same for `Option<T>` (`null` for `None`).
    pub(crate) mod option {
        use std::fmt::Display;
        use std::str::FromStr;

        use serde::{Deserialize, Deserializer, Serializer, de::Error as _};

        pub(crate) fn serialize<T: Display, S: Serializer>(
            v: &Option<T>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            match v {
                Some(v) => s.collect_str(v),
                None => s.serialize_none(),
            }
        }

        pub(crate) fn deserialize<'de, T, D>(d: D) -> Result<Option<T>, D::Error>
        where
            T: FromStr,
            T::Err: Display,
            D: Deserializer<'de>,
        {
            Option::<String>::deserialize(d)?
                .map(|s| {
                    s.parse()
                        .map_err(|e| D::Error::custom(format!("{s:?}: {e}")))
                })
                .transpose()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent() -> Caller {
        Caller::agent(SpiffeId::new("spiffe://example.org/sigil/agent/join_token/abc").unwrap())
    }

    #[test]
    fn display_is_readable_in_logs() {
        assert_eq!(
            Caller::admin(0, 0, Some(42)).to_string(),
            "admin uid=0 gid=0 pid=42"
        );
        assert_eq!(
            Caller::admin(1000, 100, None).to_string(),
            "admin uid=1000 gid=100"
        );
        assert_eq!(
            agent().to_string(),
            "agent spiffe://example.org/sigil/agent/join_token/abc"
        );
        assert_eq!(
            Caller::server(ServerTask::KeyRotation).to_string(),
            "server (key rotation)"
        );
        assert_eq!(
            Caller::Node {
                peer: Some("10.0.0.7:50112".into())
            }
            .to_string(),
            "node 10.0.0.7:50112"
        );
    }

    #[test]
    fn json_form_is_stable() {
        let cases = [
            (
                Caller::admin(0, 0, Some(42)),
                r#"{"kind":"admin","uid":0,"gid":0,"pid":42}"#,
            ),
            (
                agent(),
                r#"{"kind":"agent","spiffe_id":"spiffe://example.org/sigil/agent/join_token/abc"}"#,
            ),
            (
                Caller::Node { peer: None },
                r#"{"kind":"node","peer":null}"#,
            ),
            (
                Caller::server(ServerTask::AuditRetention),
                r#"{"kind":"server","task":"audit_retention"}"#,
            ),
        ];
        for (caller, json) in cases {
            assert_eq!(serde_json::to_string(&caller).unwrap(), json);
            assert_eq!(serde_json::from_str::<Caller>(json).unwrap(), caller);
        }
    }

    #[test]
    fn json_rejects_unknown_fields_and_bad_ids() {
        for bad in [
            r#"{"kind":"admin","uid":0,"gid":0,"pid":1,"extra":1}"#,
            r#"{"kind":"agent","spiffe_id":"http://example.org/x"}"#,
            r#"{"kind":"server","task":"coffee"}"#,
            r#"{"kind":"root"}"#,
        ] {
            assert!(serde_json::from_str::<Caller>(bad).is_err(), "{bad}");
        }
    }
}
