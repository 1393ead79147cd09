//! The node channel: one WebSocket that each node agent opens to the control
//! plane (`GET /v1/nodes/{id}/channel`), so that the control plane can ask a
//! node for things that stream (a VM's serial console, an exec in a guest)
//! without ever dialing the node. Heartbeats stay plain HTTP requests.
//!
//! Every message is one JSON text frame. Requests from the control plane open
//! a *stream* (a number the control plane picks); the node answers on the
//! same stream until it sends `End`, `Exit` or `Error`. Bytes travel as
//! base64 so that every frame is text.

use crate::api::NodeImage;
use crate::ids::VmId;
use serde::{Deserialize, Serialize};

/// Control plane to node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToNode {
    /// Something changed for this node: heartbeat now to fetch it.
    Poke,
    /// Send the last `bytes` of the VM's serial log, then `End`.
    ConsoleTail { stream: u64, vm: VmId, bytes: u64 },
    /// Stream the VM's serial output as it comes (from the end of the log),
    /// and accept `Input` on this stream, until `Close`.
    ConsoleAttach { stream: u64, vm: VmId },
    /// Run a command through the VM's guest agent.
    Exec {
        stream: u64,
        vm: VmId,
        argv: Vec<String>,
        env: Vec<(String, String)>,
        cwd: Option<String>,
        /// Whether `Input` follows (then `InputEnd`).
        stdin: bool,
        timeout_secs: u64,
    },
    /// Bytes for a console's keyboard or an exec's standard input.
    Input { stream: u64, data: String },
    /// No more standard input for this exec.
    InputEnd { stream: u64 },
    /// The requester went away: stop the stream (an exec is killed).
    Close { stream: u64 },
    /// Delete an orphan (a VM the control plane does not know) with its
    /// disk; answered with `End`, or `Error` when there is no such orphan.
    RemoveOrphan { stream: u64, vm: VmId },
    /// Run a program in a fresh VM of its own, a clone of the runtime
    /// image's template; answered with output, then `RunEnd`.
    Run { stream: u64, spec: Box<RunSpec> },
}

/// One run for a node: what to start and its limits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunSpec {
    /// The runtime image (diskless or read-only root, with the agent).
    pub image: NodeImage,
    /// Files written under the run's directory before anything starts
    /// (path relative to it, text).
    #[serde(default)]
    pub files: Vec<(String, String)>,
    /// Compiles the program first (compiled languages); a failure ends
    /// the run with the compiler's exit code.
    #[serde(default)]
    pub build: Option<Vec<String>>,
    /// The command in the guest (the runtime's, with the code in it).
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Standard input, base64; none closes it at once.
    pub stdin: Option<String>,
    pub timeout_secs: u64,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// Bytes of output (stdout and stderr together) before the run is
    /// stopped.
    pub output_limit: u64,
    /// What the runtime's template runs once before it is saved (the
    /// interpreter on an empty program), so clones start it from memory.
    #[serde(default)]
    pub warmup: Vec<String>,
    /// What a clone restored ahead in the node's pool runs before its run
    /// comes (`Runtime::prewarm`).
    #[serde(default)]
    pub prewarm: Vec<String>,
}

/// How a run ended, as its node saw it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunResult {
    /// `exited`, `timeout`, `out_of_memory`, `output_limit`, `cancelled`
    /// or `failed` (the VM could not be made; see `message`).
    pub outcome: String,
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub message: Option<String>,
    /// Whether the VM was a clone of a template (else a cold boot).
    pub from_template: bool,
    /// Whether the clone was restored ahead of the run, in the node's pool.
    #[serde(default)]
    pub from_pool: bool,
    /// Building the template first, when this run had to.
    pub template_build_ms: Option<u64>,
    /// From the node taking the run to the VM's agent ready.
    pub vm_ready_ms: u64,
    /// How long the build took, for a compiled language.
    #[serde(default)]
    pub build_ms: Option<u64>,
    /// To the first byte of output, if any came.
    pub first_output_ms: Option<u64>,
    /// To the end.
    pub end_ms: u64,
}

/// Node to control plane.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FromNode {
    /// Serial console bytes.
    Console {
        stream: u64,
        data: String,
    },
    Stdout {
        stream: u64,
        data: String,
    },
    Stderr {
        stream: u64,
        data: String,
    },
    /// An exec ended.
    Exit {
        stream: u64,
        code: Option<i32>,
        signal: Option<i32>,
    },
    /// The stream failed; `not_found` when the node does not hold the VM.
    Error {
        stream: u64,
        message: String,
        #[serde(default)]
        not_found: bool,
    },
    /// The stream ended normally.
    End {
        stream: u64,
    },
    /// A run ended (its VM is gone).
    RunEnd {
        stream: u64,
        result: RunResult,
    },
}

impl FromNode {
    /// The stream this message belongs to.
    pub fn stream(&self) -> u64 {
        match self {
            FromNode::Console { stream, .. }
            | FromNode::Stdout { stream, .. }
            | FromNode::Stderr { stream, .. }
            | FromNode::Exit { stream, .. }
            | FromNode::Error { stream, .. }
            | FromNode::RunEnd { stream, .. }
            | FromNode::End { stream } => *stream,
        }
    }

    /// Whether this is the last message of its stream.
    pub fn is_last(&self) -> bool {
        matches!(
            self,
            FromNode::Exit { .. }
                | FromNode::Error { .. }
                | FromNode::End { .. }
                | FromNode::RunEnd { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_tagged_json() {
        let m = ToNode::ConsoleTail {
            stream: 7,
            vm: VmId(uuid::Uuid::nil()),
            bytes: 100,
        };
        let j = serde_json::to_string(&m).unwrap();
        assert!(j.starts_with("{\"type\":\"console_tail\""), "{j}");
        assert_eq!(serde_json::from_str::<ToNode>(&j).unwrap(), m);
        let f: FromNode = serde_json::from_str(r#"{"type":"end","stream":3}"#).unwrap();
        assert_eq!(f.stream(), 3);
        assert!(f.is_last());
        assert!(serde_json::from_str::<FromNode>(r#"{"type":"nope","stream":3}"#).is_err());
    }
}
