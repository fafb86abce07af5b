//! The crate's error type.

use std::io;
use std::path::PathBuf;

use crate::wire::QmpError;

/// Errors of the QMP server and client.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Binding the server socket failed.
    #[error("QMP server: cannot listen on {path}")]
    Bind {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Connecting to a QMP server failed.
    #[error("QMP client: cannot connect to {path}")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Reading from or writing to the QMP socket failed.
    #[error("QMP {peer}: {what}")]
    Io {
        /// The peer (socket path or description).
        peer: String,
        /// What was being done.
        what: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The peer did not answer in time.
    #[error("QMP {peer}: timed out waiting for {what}")]
    Timeout {
        /// The peer.
        peer: String,
        /// What was awaited.
        what: String,
    },
    /// The peer closed the connection.
    #[error("QMP {peer}: connection closed while waiting for {what}")]
    Closed {
        /// The peer.
        peer: String,
        /// What was awaited.
        what: String,
    },
    /// The peer sent something that is not QMP.
    #[error("QMP {peer}: protocol error: {detail}")]
    Protocol {
        /// The peer.
        peer: String,
        /// What was wrong.
        detail: String,
    },
    /// The server answered a command with an error response.
    #[error("QMP {peer}: command {command} failed")]
    Command {
        /// The peer.
        peer: String,
        /// The command that failed.
        command: String,
        /// The error response.
        #[source]
        error: QmpError,
    },
}

impl Error {
    /// The QMP error response, if this is a failed command.
    pub fn qmp(&self) -> Option<&QmpError> {
        match self {
            Error::Command { error, .. } => Some(error),
            _ => None,
        }
    }
}
