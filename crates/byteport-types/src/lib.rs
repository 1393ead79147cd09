//! BytePort's shared vocabulary: typed ids, validated names, the VM state
//! machine, and the request/response types of the public API and of the
//! node protocol. This crate does no I/O; the server, the node agent and the
//! CLI all speak through it.

pub mod api;
pub mod ids;
pub mod name;
pub mod net;
pub mod node_proto;
pub mod rate;
pub mod runtime;
pub mod vm_state;

pub use ids::*;
pub use name::{Name, NameError};
pub use vm_state::{DesiredState, InvalidTransition, VmAction, VmState};

/// One mebibyte in bytes.
pub const MIB: u64 = 1024 * 1024;
/// One gibibyte in bytes.
pub const GIB: u64 = 1024 * MIB;
