//! sigil-proto: the wire contracts of Sigil and nothing else.
//!
//! - [`workload`] — the SPIFFE Workload API, wire-exact (no proto package, so
//!   the gRPC paths are `/SpiffeWorkloadAPI/<Method>`).
//! - [`agent`] — the agent <-> server API (attestation, sync, minting).
//! - [`admin`] — the operator CLI <-> server admin socket API.
//! - [`common`] — messages shared by the two Sigil APIs.
//! - [`task`] — task-scoped identities (workload, agent and admin services).
//! - [`delegation`] — token exchange on the Workload API socket, and its
//!   agent -> server leg.
//! - [`unix`] — the one way every client here opens a gRPC channel over a
//!   Unix socket (Workload API, agent and server admin sockets).

#![allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]

/// SPIFFE Workload API messages and service (no proto package).
pub mod workload {
    tonic::include_proto!("_");
}

/// Messages shared by the agent and admin APIs.
pub mod common {
    tonic::include_proto!("sigil.common");
}

/// Agent <-> server API.
pub mod agent {
    tonic::include_proto!("sigil.agent");
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

pub mod unix;

/// The gRPC metadata key every Workload API request must carry with value `true`.
pub const WORKLOAD_API_HEADER: &str = "workload.spiffe.io";
