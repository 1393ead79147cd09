//! BytePort's guest agent and the protocol it speaks with the host.
//!
//! - [`proto`]: the wire format, shared by both sides (no I/O).
//! - [`agent`]: the in-guest server, plain std threads; the `byteport-guest`
//!   binary opens the virtio-serial port and runs it.
//! - [`run`]: the binary's run-code subcommands (`unpack`, `warm`).
//! - `host` (feature `host`): the async client the node agent uses to talk
//!   to a guest through the QEMU chardev socket.
//!
//! What runs inside a guest stays small and static: this crate's default
//! features pull in only serde, serde_json and thiserror.

pub mod agent;
#[cfg(feature = "host")]
pub mod host;
pub mod proto;
pub mod run;
