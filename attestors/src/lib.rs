//! sigil-attestors: how Sigil learns facts about callers.
//!
//! - [`workload::unix`] — the peer of a Workload API connection (pid, uid,
//!   gid from the socket, bound to the process with a pidfd) and its `unix:*`
//!   selectors read from /proc.
//!
//! Node attestation (join tokens today; x509pop and TPM 2.0 next) verifies on
//! the server side; its evidence types live in the agent API protocol.

pub mod workload;
