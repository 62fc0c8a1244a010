//! sigil-proto: the wire contracts of Sigil and nothing else.
//!
//! - [`workload`] — the SPIFFE Workload API, wire-exact (no proto package, so
//!   the gRPC paths are `/SpiffeWorkloadAPI/<Method>`).
//! - [`workload_wit`] — the WIT-SVID profile's client, from the standard's file alone.
//! - [`agent`] — the agent <-> server API (attestation, sync, minting).
//! - [`admin`] — the operator CLI <-> server admin socket API.
//! - [`common`] — messages shared by the two Sigil APIs.
//! - [`task`] — task-scoped identities (workload, agent and admin services).
//! - [`delegation`] — token exchange on the Workload API socket, and its
//!   agent -> server leg.
//! - [`broker`] — the SPIFFE Broker API (a broker names a workload by PID).
//! - [`envoy`] — Envoy's Secret Discovery Service v3 (wire subset).
//! - [`unix`] — the one way every client here opens a gRPC channel over a
//!   Unix socket (Workload API, agent and server admin sockets).

#![allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]

/// SPIFFE Workload API messages and service (no proto package).
pub mod workload {
    tonic::include_proto!("_");
}

/// The standard's WIT-SVID profile alone (`proto/spiffe/workloadapiwitsvid.proto`):
/// a client for `FetchWITSVID`/`FetchWITBundles`, generated apart from
/// [`workload`] (whose service carries the same methods).
pub mod workload_wit {
    include!(concat!(env!("OUT_DIR"), "/wit/_.rs"));
}

/// The SPIFFE Broker API (`proto/spiffe/broker.proto`, package `spiffe.broker`).
pub mod broker {
    tonic::include_proto!("spiffe.broker");
    /// Type URL of a [`WorkloadPidReference`] in a `WorkloadReference`.
    pub const PID_REFERENCE_TYPE_URL: &str =
        "type.googleapis.com/spiffe.broker.WorkloadPIDReference";
}

/// The gRPC metadata key every Broker API request must carry with value `true`.
pub const BROKER_API_HEADER: &str = "broker.spiffe.io";

/// Messages shared by the agent and admin APIs.
pub mod common {
    tonic::include_proto!("sigil.common");
}

/// Agent <-> server API.
pub mod agent {
    tonic::include_proto!("sigil.agent");

    /// Most CSRs in one `MintX509Svids` call: the server refuses a longer
    /// `csrs` list (`InvalidArgument`, nothing signed), and the agent sends
    /// its due SVIDs in calls of this many. A call has a fixed cost besides
    /// its signatures (its audit record's commit, the HTTP/2 exchange, the
    /// hand-offs to the signing thread), so the agent fills calls to the
    /// cap. A full call is a request of about 266 KB and a response of
    /// about 572 KB (measured by the attack test of the cap), well under
    /// gRPC's default 4 MiB decoding limit.
    pub const MAX_MINT_BATCH: usize = 1000;
}

/// Operator CLI <-> server admin API.
pub mod admin {
    tonic::include_proto!("sigil.admin");
}

/// Task-scoped identities: the workload-facing, agent <-> server and admin
/// task services (`proto/sigil/task.proto`).
pub mod task {
    tonic::include_proto!("sigil.task");
}

/// Token exchange for workloads acting on behalf of a user (RFC 8693).
pub mod delegation {
    tonic::include_proto!("sigil.delegation");
}

/// Envoy's Secret Discovery Service v3: the messages the agent serves on
/// the Workload API socket (`proto/envoy/`, Envoy's packages and field
/// numbers, only the fields Sigil uses).
pub mod envoy {
    pub mod config {
        pub mod core {
            pub mod v3 {
                tonic::include_proto!("envoy.config.core.v3");
            }
        }
    }
    pub mod extensions {
        pub mod transport_sockets {
            pub mod tls {
                pub mod v3 {
                    tonic::include_proto!("envoy.extensions.transport_sockets.tls.v3");
                }
            }
        }
    }
    pub mod service {
        pub mod discovery {
            pub mod v3 {
                tonic::include_proto!("envoy.service.discovery.v3");
            }
        }
        pub mod secret {
            pub mod v3 {
                tonic::include_proto!("envoy.service.secret.v3");
            }
        }
    }
    /// Short paths to the packages above.
    pub use config::core::v3 as core;
    pub use extensions::transport_sockets::tls::v3 as tls;
    pub use service::discovery::v3 as discovery;
    pub use service::secret::v3 as secret;
    /// Type URL of an SDS `Secret` in `Any`.
    pub const SECRET_TYPE_URL: &str =
        "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
    /// Type URL of the SPIFFE certificate validator's configuration.
    pub const SPIFFE_VALIDATOR_TYPE_URL: &str =
        "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig";
    /// Name of Envoy's SPIFFE certificate validator extension.
    pub const SPIFFE_VALIDATOR_NAME: &str = "envoy.tls.cert_validator.spiffe";
}

/// `google.rpc.Status`, the NACK detail of an xDS request.
pub mod google {
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
}

pub mod unix;

/// The gRPC metadata key every Workload API request must carry with value `true`.
pub const WORKLOAD_API_HEADER: &str = "workload.spiffe.io";
