//! The registry's errors: what went wrong with an operation, independent of
//! the API that carried it. They become gRPC `Status` only at the API edge
//! (`impl From<RegistryError> for Status`), so the registry, the datastore
//! backends and their tests speak no transport.

use std::net::SocketAddr;
use std::path::PathBuf;

use tonic::Status;

use crate::datastore::StoreError;

/// Why the server could not start. Each variant names the config key, file
/// or listener at fault; none carries key material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartupError {
    /// A file named by the configuration (or kept in `data_dir`) is
    /// unreadable, unsafe or does not parse.
    #[error("{what} {}: {reason}", path.display())]
    File {
        /// The config key or the file's role, e.g. `tpm.ek_ca_path`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A configured value is refused at start.
    #[error("{key}: {reason}")]
    Key {
        /// The config key.
        key: &'static str,
        /// Why.
        reason: String,
    },
    /// A listener could not be bound.
    #[error("{what} {addr}: {source}")]
    Bind {
        /// Which listener (`bind`, `bundle_endpoint`, `oidc`).
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The socket error.
        source: std::io::Error,
    },
    /// The signing keys could not be loaded or made.
    #[error(transparent)]
    Keys(#[from] crate::keys::KeyError),
    /// The datastore could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Loading the registry failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The server's TLS identity or a TLS configuration could not be made.
    #[error("TLS: {0}")]
    Tls(String),
    /// A thread could not be started.
    #[error("{what} thread: {source}")]
    Thread {
        /// What the thread is for.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// A listener stopped with an error.
    #[error("{what}: {reason}")]
    Serve {
        /// Which server.
        what: &'static str,
        /// Why it stopped.
        reason: String,
    },
}

impl StartupError {
    /// A bad file named by `what`.
    pub fn file(
        what: &'static str,
        path: &std::path::Path,
        reason: impl std::fmt::Display,
    ) -> Self {
        StartupError::File {
            what,
            path: path.to_path_buf(),
            reason: reason.to_string(),
        }
    }
}

/// Why a registry operation failed. `Clone`, so that one failed group
/// commit can answer every record in it.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// The request is malformed; the message names the field.
    #[error("{0}")]
    InvalidArgument(String),
    /// The record it names does not exist.
    #[error("{0}")]
    NotFound(String),
    /// It would collide with an existing record (named in the message).
    #[error("{0}")]
    AlreadyExists(String),
    /// The caller may not do this (banned, killed, not authorized).
    #[error("{0}")]
    PermissionDenied(String),
    /// The caller's credential is not (or no longer) valid.
    #[error("{0}")]
    Unauthenticated(String),
    /// The operation does not apply to the record's current state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The datastore failed; details are logged, not returned.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A bug or broken invariant in the server.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Shorthands, so refusals read like the rule they enforce.
impl RegistryError {
    pub fn invalid(msg: impl Into<String>) -> Self {
        Self::InvalidArgument(msg.into())
    }
    pub fn not_found(msg: impl Into<String>) -> Self {
        Self::NotFound(msg.into())
    }
    pub fn exists(msg: impl Into<String>) -> Self {
        Self::AlreadyExists(msg.into())
    }
    pub fn denied(msg: impl Into<String>) -> Self {
        Self::PermissionDenied(msg.into())
    }
    pub fn unauthenticated(msg: impl Into<String>) -> Self {
        Self::Unauthenticated(msg.into())
    }
    pub fn precondition(msg: impl Into<String>) -> Self {
        Self::FailedPrecondition(msg.into())
    }
    pub fn internal(msg: impl Into<String>) -> Self {
        Self::Internal(msg.into())
    }

    /// The same error, its message prefixed with `entries[i]: ` so that a
    /// batch's caller knows which item it is about.
    pub fn in_batch(self, i: usize) -> Self {
        let at = |m: String| format!("entries[{i}]: {m}");
        match self {
            Self::InvalidArgument(m) => Self::InvalidArgument(at(m)),
            Self::NotFound(m) => Self::NotFound(at(m)),
            Self::AlreadyExists(m) => Self::AlreadyExists(at(m)),
            Self::PermissionDenied(m) => Self::PermissionDenied(at(m)),
            Self::Unauthenticated(m) => Self::Unauthenticated(at(m)),
            Self::FailedPrecondition(m) => Self::FailedPrecondition(at(m)),
            Self::Internal(m) => Self::Internal(at(m)),
            other @ Self::Store(_) => other,
        }
    }
}

impl From<RegistryError> for Status {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::InvalidArgument(m) => Status::invalid_argument(m),
            RegistryError::NotFound(m) => Status::not_found(m),
            RegistryError::AlreadyExists(m) => Status::already_exists(m),
            RegistryError::PermissionDenied(m) => Status::permission_denied(m),
            RegistryError::Unauthenticated(m) => Status::unauthenticated(m),
            RegistryError::FailedPrecondition(m) => Status::failed_precondition(m),
            // The database could not be reached or refused the
            // transaction: a retry may succeed (another server, or once
            // the database is back). Details stay in the server's log.
            RegistryError::Store(e @ crate::datastore::StoreError::NoSpace(_)) => {
                crate::metrics::METRICS.datastore_errors.inc();
                tracing::error!(error = %e, "datastore write refused");
                Status::resource_exhausted(format!(
                    "{e}; nothing was written: free space on the disk holding data_dir and retry"
                ))
            }
            RegistryError::Store(e @ crate::datastore::StoreError::Backend(_)) => {
                crate::metrics::METRICS.datastore_errors.inc();
                tracing::error!(error = %e, "datastore failure");
                Status::unavailable(
                    "datastore unavailable: the server cannot complete the transaction in its \
                     database now (details in the server log); retry later or on another server",
                )
            }
            RegistryError::Store(e) => {
                crate::metrics::METRICS.datastore_errors.inc();
                tracing::error!(error = %e, "datastore failure");
                Status::internal("datastore failure")
            }
            RegistryError::Internal(m) => {
                tracing::error!(error = %m, "internal error");
                Status::internal(m)
            }
        }
    }
}
