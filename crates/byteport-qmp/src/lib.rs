//! A small async client for QEMU's QMP monitor socket.
//!
//! This crate owns the QMP wire format (parsing greetings,
//! replies and events), the connection handshake, matching replies to
//! concurrent commands by id, fanning asynchronous events out to subscribers,
//! and typed helpers for the commands BytePort uses ([`Qmp::query_status`],
//! [`Qmp::stop`], [`Qmp::cont`], [`Qmp::system_powerdown`],
//! [`Qmp::system_reset`], [`Qmp::quit`]).
//!
//! It does not own the QEMU process: starting it, choosing the socket path,
//! waiting for it to exit and killing it belong to the node agent's driver.
//! Any other QMP command goes through [`Qmp::execute`] with raw JSON.
//!
//! ```no_run
//! # async fn demo() -> Result<(), byteport_qmp::QmpError> {
//! use std::{path::Path, time::Duration};
//! let qmp = byteport_qmp::Qmp::connect_retry(Path::new("/run/vm/qmp.sock"), Duration::from_secs(5)).await?;
//! let mut events = qmp.subscribe();
//! qmp.cont().await?;
//! while let Ok(event) = events.recv().await {
//!     if event.name == "SHUTDOWN" { break; }
//! }
//! # Ok(()) }
//! ```

mod client;
mod codec;
mod error;
mod status;

pub use client::{DEFAULT_TIMEOUT, Qmp};
pub use codec::{Event, Greeting, QemuVersion, Version};
pub use error::QmpError;
pub use status::{RunState, Status};
