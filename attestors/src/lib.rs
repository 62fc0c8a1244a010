//! sigil-attestors: how Sigil learns facts about callers.
//!
//! - [`workload::unix`] — the peer of a Workload API connection (pid, uid,
//!   gid from the socket, bound to the process with a pidfd) and its `unix:*`
//!   selectors read from /proc.
//! - [`node::tpm`] — TPM 2.0 node attestation: agent-side evidence,
//!   credential activation and quotes (tss-esapi, feature `tpm`), and the
//!   server-side checks of the EK, the activation and the quote (pure Rust).
//! - [`x509pop`] — node attestation by proof of possession of a node
//!   certificate's key: signing on the agent, chain and signature checks on
//!   the server.
//!
//! Node attestation verifies on the server side; its evidence travels in the
//! agent API protocol (`sigil-proto`).

pub mod node;
pub mod workload;
pub mod x509pop;
