//! Reaching into a VM through its node's channel: the serial console (its
//! tail, and a live attachment that also takes keystrokes) and exec through
//! the guest agent. The control plane never dials the node; it asks over
//! the channel the node opened.

use super::hub::Stream;
use super::{App, Ctx};
use crate::error::{AppError, AppResult};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use byteport_store::vm;
use byteport_types::api::{ExecEvent, ExecRequest, Role};
use byteport_types::node_proto::{FromNode, ToNode};
use byteport_types::{VmId, VmState};
use std::time::Duration;
use tokio::sync::mpsc;

pub const MAX_CONSOLE_TAIL: u64 = 1024 * 1024;
const DEFAULT_CONSOLE_TAIL: u64 = 16 * 1024;
pub(crate) const MAX_EXEC_SECS: u64 = 3600;
pub(crate) const MAX_ARGV: usize = 4096;
pub(crate) const MAX_STDIN: usize = 512 * 1024;
/// How long a node has to answer a console tail.
const TAIL_TIMEOUT: Duration = Duration::from_secs(10);

impl App {
    /// The node of a placed VM, and a stream opened to it.
    async fn open_on_node(
        &self,
        v: &vm::Model,
        make: impl FnOnce(u64) -> ToNode,
    ) -> AppResult<Stream> {
        let Some(node) = v.node_id else {
            return Err(AppError::Conflict(format!(
                "the VM is {}; it has no node yet",
                v.state
            )));
        };
        self.hub.open(node, make).await.ok_or_else(|| {
            AppError::Unavailable(format!(
                "node {node} holding this VM is not connected to this control plane"
            ))
        })
    }

    /// The last `bytes` of the VM's serial console log.
    pub async fn vm_console(&self, ctx: &Ctx, id: &str, bytes: Option<u64>) -> AppResult<Vec<u8>> {
        let bytes = bytes.unwrap_or(DEFAULT_CONSOLE_TAIL);
        if !(1..=MAX_CONSOLE_TAIL).contains(&bytes) {
            return Err(AppError::bad(
                "invalid_bytes",
                format!("bytes is {bytes}; it must be between 1 and {MAX_CONSOLE_TAIL}"),
            ));
        }
        let v = self.vm_resolve(ctx, id, Role::Viewer).await?;
        let vm = VmId(v.id);
        let mut s = self
            .open_on_node(&v, |stream| ToNode::ConsoleTail { stream, vm, bytes })
            .await?;
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + TAIL_TIMEOUT;
        loop {
            let msg = tokio::time::timeout_at(deadline, s.rx.recv())
                .await
                .map_err(|_| AppError::Unavailable("the node did not answer in time".into()))?;
            match msg {
                Some(FromNode::Console { data, .. }) => {
                    out.extend(B64.decode(data).map_err(AppError::internal)?);
                }
                Some(FromNode::End { .. }) => return Ok(out),
                Some(FromNode::Error {
                    message, not_found, ..
                }) => {
                    return Err(if not_found {
                        AppError::Conflict(format!(
                            "the VM has no console on its node yet: {message}"
                        ))
                    } else {
                        AppError::Unavailable(message)
                    });
                }
                Some(_) => {}
                None => return Err(AppError::Unavailable("the node's channel closed".into())),
            }
        }
    }

    /// Attaches to the VM's live serial console: output from now on, and
    /// input (for members and above).
    pub async fn vm_console_attach(&self, ctx: &Ctx, id: &str) -> AppResult<Stream> {
        let v = self.vm_resolve(ctx, id, Role::Member).await?;
        let vm = VmId(v.id);
        self.open_on_node(&v, |stream| ToNode::ConsoleAttach { stream, vm })
            .await
    }

    /// Runs a command in the VM through its guest agent; the events end
    /// with `Exit` or `Error`.
    pub async fn vm_exec(
        &self,
        ctx: &Ctx,
        id: &str,
        req: ExecRequest,
    ) -> AppResult<mpsc::Receiver<ExecEvent>> {
        let x = check_exec(req)?;
        let v = self.vm_resolve(ctx, id, Role::Member).await?;
        self.exec_start(&v, &x).await
    }

    /// Starts a checked command on a VM the caller may exec in (running,
    /// with an agent, or a 409): its events, ending with `Exit` or `Error`.
    pub(crate) async fn exec_start(
        &self,
        v: &vm::Model,
        x: &CheckedExec,
    ) -> AppResult<mpsc::Receiver<ExecEvent>> {
        exec_ready(v)?;
        let s = self
            .exec_open(
                v,
                x.argv.clone(),
                x.env.clone(),
                x.cwd.clone(),
                x.stdin.is_some(),
                x.timeout_secs,
            )
            .await?;
        if let Some(b) = &x.stdin {
            for chunk in b.chunks(32 * 1024) {
                s.send(ToNode::Input {
                    stream: s.id,
                    data: B64.encode(chunk),
                })
                .await;
            }
            s.send(ToNode::InputEnd { stream: s.id }).await;
        }
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(relay_exec(s, tx));
        Ok(rx)
    }

    /// A VM the caller may exec in: a member's, running, with an agent.
    pub(crate) async fn exec_target(&self, ctx: &Ctx, id: &str) -> AppResult<vm::Model> {
        let v = self.vm_resolve(ctx, id, Role::Member).await?;
        exec_ready(&v)?;
        Ok(v)
    }

    /// Starts a process in the VM through its node; its answers come on
    /// the stream, and `Input` / `InputEnd` feed it when `stdin` is set.
    pub(crate) async fn exec_open(
        &self,
        v: &vm::Model,
        argv: Vec<String>,
        env: Vec<(String, String)>,
        cwd: Option<String>,
        stdin: bool,
        timeout_secs: u64,
    ) -> AppResult<Stream> {
        let vm = VmId(v.id);
        self.open_on_node(v, |stream| ToNode::Exec {
            stream,
            vm,
            argv,
            env,
            cwd,
            stdin,
            timeout_secs,
        })
        .await
    }
}

/// An exec request that passed its checks: what every VM it goes to gets.
pub(crate) struct CheckedExec {
    argv: Vec<String>,
    env: Vec<(String, String)>,
    cwd: Option<String>,
    stdin: Option<Vec<u8>>,
    timeout_secs: u64,
}

/// The 400s of an exec request, before any VM is looked at.
pub(crate) fn check_exec(req: ExecRequest) -> AppResult<CheckedExec> {
    if req.argv.is_empty() || req.argv[0].is_empty() {
        return Err(AppError::bad(
            "invalid_argv",
            "argv needs at least the program",
        ));
    }
    if req.argv.len() > MAX_ARGV || req.argv.iter().any(|a| a.contains('\0')) {
        return Err(AppError::bad(
            "invalid_argv",
            format!("argv takes at most {MAX_ARGV} arguments without NUL bytes"),
        ));
    }
    if req
        .env
        .keys()
        .any(|k| k.is_empty() || k.contains(['=', '\0']))
        || req.env.values().any(|v| v.contains('\0'))
    {
        return Err(AppError::bad(
            "invalid_env",
            "environment names must be non-empty without '=' or NUL; values without NUL",
        ));
    }
    let timeout_secs = req.timeout_secs.unwrap_or(300);
    if !(1..=MAX_EXEC_SECS).contains(&timeout_secs) {
        return Err(AppError::bad(
            "invalid_timeout",
            format!("timeout_secs is {timeout_secs}; it must be between 1 and {MAX_EXEC_SECS}"),
        ));
    }
    let stdin = match &req.stdin_base64 {
        Some(s) => {
            let b = B64
                .decode(s)
                .map_err(|_| AppError::bad("invalid_stdin", "stdin_base64 is not valid base64"))?;
            if b.len() > MAX_STDIN {
                return Err(AppError::bad(
                    "invalid_stdin",
                    format!("stdin is {} bytes; at most {MAX_STDIN}", b.len()),
                ));
            }
            Some(b)
        }
        None => None,
    };
    Ok(CheckedExec {
        argv: req.argv,
        env: req.env.into_iter().collect(),
        cwd: req.cwd,
        stdin,
        timeout_secs,
    })
}

/// Why exec cannot reach this VM now, if it cannot.
pub(crate) fn exec_ready(v: &vm::Model) -> AppResult<()> {
    let state: VmState = v.state.parse().map_err(AppError::internal)?;
    if state != VmState::Running {
        return Err(AppError::Conflict(format!(
            "the VM is {state}; exec needs it running"
        )));
    }
    // Without the agent, the node runs exec over SSH as the image's login
    // user; an image with neither cannot be reached.
    if !v.has_agent && v.ssh_user.is_none() {
        return Err(AppError::Conflict(
            "the VM's image has no guest agent and no login user for SSH; exec needs one".into(),
        ));
    }
    Ok(())
}

/// Turns the node's answers into exec events until the last one.
async fn relay_exec(mut s: Stream, tx: mpsc::Sender<ExecEvent>) {
    loop {
        let ev = match s.rx.recv().await {
            Some(FromNode::Stdout { data, .. }) => ExecEvent::Stdout(data),
            Some(FromNode::Stderr { data, .. }) => ExecEvent::Stderr(data),
            Some(FromNode::Exit { code, signal, .. }) => ExecEvent::Exit { code, signal },
            Some(FromNode::Error { message, .. }) => ExecEvent::Error(message),
            Some(FromNode::Console { .. } | FromNode::End { .. } | FromNode::RunEnd { .. }) => {
                continue;
            }
            None => ExecEvent::Error("the node's channel closed".into()),
        };
        let last = matches!(ev, ExecEvent::Exit { .. } | ExecEvent::Error(_));
        if tx.send(ev).await.is_err() || last {
            return;
        }
    }
}
