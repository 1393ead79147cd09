//! The one error type of this crate.

use std::{io, path::PathBuf, time::Duration};

/// Everything that can go wrong talking to QEMU over QMP.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket could not be connected to (and the error is not one a retry fixes).
    #[error("connecting to QMP socket {}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// [`crate::Qmp::connect_retry`] gave up: the socket never accepted a connection.
    #[error("QMP socket {} not ready after {after:?}", path.display())]
    ConnectTimeout {
        path: PathBuf,
        after: Duration,
        #[source]
        source: io::Error,
    },
    /// Reading or writing the socket failed during the handshake.
    #[error("QMP socket I/O")]
    Io(#[from] io::Error),
    /// QEMU sent something that is not QMP as we know it.
    #[error("QMP protocol violation: {0}")]
    Protocol(String),
    /// QEMU answered the command with an error.
    #[error("QMP command failed: {class}: {desc}")]
    Command { class: String, desc: String },
    /// No reply within the client's timeout; the command may still take effect.
    #[error("no reply to QMP command `{command}` within {after:?}")]
    Timeout { command: String, after: Duration },
    /// The connection closed before a reply arrived (or was already closed).
    #[error("QMP connection closed")]
    Closed,
}
