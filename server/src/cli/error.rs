//! The one error type of the operator CLI. Input is checked before anything
//! is sent, and those errors name the flag or field; the server's own
//! refusals already name the field and are shown as the server wrote them.

use std::path::PathBuf;

/// Why an operator subcommand failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CliError {
    /// A command-line flag has a bad value (`--flag: reason`).
    #[error("{flag}: {reason}")]
    Flag {
        /// The flag as typed, e.g. `--expires-at`.
        flag: &'static str,
        /// What is wrong with its value.
        reason: String,
    },
    /// A field of the request is missing or bad (`invalid field `x`: …`),
    /// in the words the server uses for the same field.
    #[error("invalid field `{field}`: {reason}")]
    Field {
        /// The field's name.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A required flag was not given.
    #[error("{0} is required")]
    Missing(&'static str),
    /// The subcommand was given nothing to do.
    #[error("{0}")]
    Usage(&'static str),
    /// A duration flag is out of range or malformed (names the flag).
    #[error(transparent)]
    Duration(#[from] sigil_core::duration::FieldDurationError),
    /// There is no admin socket at the path.
    #[error(
        "admin socket {} does not exist (is the server running? set --admin-socket or SIGIL_ADMIN_SOCKET)",
        .0.display()
    )]
    NoSocket(PathBuf),
    /// The admin socket exists but the connection failed.
    #[error("cannot connect to admin socket {}: {source}", path.display())]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The transport error.
        source: tonic::transport::Error,
    },
    /// The server refused or failed the request; its message names the
    /// field when the input was at fault.
    #[error("{}", .0.message())]
    Server(#[from] tonic::Status),
    /// Some entries of `entry create --file` were refused (each is printed
    /// with its reason); the others were created.
    #[error("{refused} of {total} entries were not created")]
    BatchRefused {
        /// How many were refused.
        refused: usize,
        /// How many the file held.
        total: usize,
    },
    /// The server answers but cannot reach its datastore.
    #[error("datastore {target}: {reason}")]
    Unhealthy {
        /// The datastore (kind and address, no password).
        target: String,
        /// Why it is unreachable.
        reason: String,
    },
    /// The audit chain did not verify (names the first bad sequence number).
    #[error("audit chain verification failed: {0}")]
    AuditChain(#[from] sigil_core::audit::VerifyError),
    /// Output could not be encoded.
    #[error("cannot encode output: {0}")]
    Encode(#[from] serde_json::Error),
    /// A bundle could not be rendered or parsed.
    #[error("{0}")]
    Bundle(#[from] sigil_core::x509::X509Error),
    /// A registry operation run by the CLI itself (datastore migration)
    /// failed.
    #[error(transparent)]
    Registry(#[from] crate::error::RegistryError),
    /// A blocking task died.
    #[error("{what} task failed: {source}")]
    Join {
        /// What the task was doing.
        what: &'static str,
        /// Why it ended.
        source: tokio::task::JoinError,
    },
}

impl CliError {
    /// A bad flag value.
    pub(crate) fn flag(flag: &'static str, reason: impl std::fmt::Display) -> Self {
        CliError::Flag {
            flag,
            reason: reason.to_string(),
        }
    }

    /// A bad request field.
    pub(crate) fn field(field: &'static str, reason: impl std::fmt::Display) -> Self {
        CliError::Field {
            field,
            reason: reason.to_string(),
        }
    }
}
