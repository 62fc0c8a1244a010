//! Node attestation: how an agent proves which machine it runs on.
//!
//! - [`tpm`] — TPM 2.0: EK identity (allow-listed hash or EK certificate),
//!   AK bound to the EK by credential activation, quotes over SHA-256 PCRs.
//!   Agent-side evidence comes from [`tpm::AgentTpm`] (feature `tpm`);
//!   server-side verification is pure Rust.
//! - [`ima`] — IMA `ima-ng` measurement logs replayed against a quoted
//!   PCR 10: by the agent's `ima` workload attestor, and by the server for
//!   the log a TPM agent sends with its quote (`tpm:ima:sha256:` node
//!   selectors).

pub mod ima;
pub mod tpm;
