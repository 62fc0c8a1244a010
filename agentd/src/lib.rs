//! sigil-agent as a library: everything the `sigil-agent` binary runs.
//!
//! - [`config`] — `agent.toml`.
//! - [`attestation`] — node attestation client: join token, x509pop, TPM 2.0.
//! - [`node`] — node attestation, the agent SVID on disk, renewal, the sync stream.
//! - [`server_client`] — the TLS channel to the server's agent API.
//! - [`cache`] — the workload SVID cache, minting and half-life rotation.
//! - [`workload_api`] — the SPIFFE Workload API server on a Unix socket.
//! - [`task_api`] — task-scoped identities on the same socket (`StartTask`, ...);
//!   [`task_cli`] — `api task start|fetch|end`.
//! - [`broker`] — the SPIFFE Broker Endpoint: mTLS, `authorized_brokers`, PID references.
//! - [`wit_api`] — the WIT-SVID profile (`FetchWITSVID`, `FetchWITBundles`) of the Workload API.
//! - [`sds`] — Envoy's Secret Discovery Service v3 on the same socket, SPIRE's names.
//! - [`workload_socket`] — the Workload API socket: binding, accepting, peer pinning.
//! - [`h2_authority`] — accepts gRPC C-core clients' socket-path `:authority`.
//! - [`metrics`] — the `sigil_agent_*` Prometheus metrics and the `/ready` probe.
//! - [`debug_selectors`] — `api debug selectors`: what a pid attests to.
//! - [`delegation_api`] — token exchange on the Workload API socket, `api delegate`.
//! - [`run`] — wiring; [`cli`] — `api fetch x509`, `api task`, `healthcheck`.

#![allow(missing_docs)]

pub mod attestation;
pub mod broker;
pub mod cache;
pub mod cli;
pub mod config;
pub mod debug_selectors;
pub mod delegation_api;
pub mod h2_authority;
pub mod metrics;
pub mod node;
pub mod run;
pub mod sds;
pub mod server_client;
pub mod task_api;
pub mod task_cli;
pub mod wit_api;
pub mod workload_api;
pub mod workload_socket;
