//! sigil-server as a library: everything the `sigil-server` binary runs,
//! importable by benchmarks and tests.
//!
//! - [`config`] — `server.toml` parsing and validation.
//! - [`datastore`] — persistence behind the [`datastore::Datastore`] trait
//!   (redb, or PostgreSQL for several servers).
//! - [`keys`] — X.509 CAs and JWT keys: persistence (0600) and rotation;
//!   [`key_manager`] — where their private keys live (keys.json or a PKCS#11 token).
//! - [`state`] — the registry: entries, agents, tokens, federation, minting
//!   and change notification, one module each; [`error`] — its error type.
//! - [`node_attestation`] — the Attest stream: join token, x509pop, TPM ([`tpm_attest`]).
//! - [`agent_api`] — attestation, renewal, sync stream, minting (gRPC over TLS).
//! - [`signing`] — the bounded, measured signing queue in front of minting.
//! - [`sync`] — what each agent's sync stream sends: a full snapshot, then deltas, in chunks.
//! - [`admin_api`] — the operator API on the admin Unix socket.
//! - [`task_api`] — task-scoped identities: the agents' and the operators' task services.
//! - [`delegation_api`] — token exchange's agent -> server leg; [`trusted_issuer`] —
//!   the `[[trusted_issuer]]` config section and the issuers' keys.
//! - [`endpoints`] — bundle endpoint (server and client) and OIDC discovery.
//! - [`tls`] — the server's TLS identity and client-SVID verification.
//! - [`metrics`] — the `sigil_server_*` Prometheus metrics and the `/ready` probe.
//! - [`limits`] — connection caps, idle/preface timeouts and the gRPC limits of every listener.
//! - [`run`] — wiring and serving; [`cli`] — operator subcommands, one
//!   module per resource, with one rendering module.

#![allow(missing_docs)]

pub mod admin_api;
pub mod agent_api;
pub mod cli;
pub mod config;
pub mod datastore;
pub mod delegation_api;
pub mod endpoints;
pub mod error;
pub mod key_manager;
pub mod keys;
pub mod limits;
pub mod metrics;
pub mod node_attestation;
pub mod run;
pub mod signing;
pub mod state;
pub mod sync;
pub mod task_api;
pub mod tls;
pub mod tpm_attest;
pub mod trusted_issuer;
pub mod upstream;

/// Runs blocking work (datastore, signing) off the async runtime.
pub(crate) async fn blocking<T: Send + 'static, E: Into<tonic::Status> + Send + 'static>(
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, tonic::Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| tonic::Status::internal("worker task failed"))?
        .map_err(Into::into)
}
