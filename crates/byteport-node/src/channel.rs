//! The node's end of its channel to the control plane: a WebSocket it
//! dials (and redials), over which the control plane asks for console
//! tails, live consoles and execs. Each request is a stream served by its
//! own task; input for a stream is routed to that task.

use crate::Shared;
use crate::driver::{Driver, files};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use byteport_guest::host::{ExecEvent as GuestEvent, GuestConn};
use byteport_guest::proto::ExecRequest as GuestExec;
use byteport_types::VmId;
use byteport_types::node_proto::{FromNode, ToNode};
use futures_util::{SinkExt, StreamExt};
use std::collections::HashMap;
use std::io::SeekFrom;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// Input for a stream: bytes, end of input, or close.
pub(crate) enum Input {
    Data(Vec<u8>),
    End,
    Close,
}

type Inputs = Arc<Mutex<HashMap<u64, mpsc::Sender<Input>>>>;

/// How long one write to the channel may take before the control plane is
/// taken for gone and the channel is dialed again.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Keeps the channel open for the life of the agent.
pub async fn run<D: Driver>(shared: Arc<Shared<D>>) {
    let mut backoff = Duration::from_millis(200);
    loop {
        match session(&shared).await {
            Ok(()) => backoff = Duration::from_millis(200),
            Err(e) => tracing::debug!(error = %e, "node channel"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn session<D: Driver>(shared: &Arc<Shared<D>>) -> Result<(), String> {
    let url = shared.cp.channel_url(shared.identity.id);
    let mut req = url.into_client_request().map_err(|e| e.to_string())?;
    let auth = format!("Bearer {}", shared.credential());
    req.headers_mut().insert(
        "authorization",
        auth.parse().map_err(|_| "bad credential".to_string())?,
    );
    let tls = tokio_tungstenite::Connector::Rustls(shared.cp.trust().rustls());
    let (ws, _) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async_tls_with_config(req, None, true, Some(tls)),
    )
    .await
    .map_err(|_| "the channel's handshake took over 10 s".to_string())?
    .map_err(|e| e.to_string())?;
    tracing::info!("node channel connected");
    let (mut sink, mut source) = ws.split();
    let (out_tx, mut out_rx) = mpsc::channel::<FromNode>(256);
    let inputs: Inputs = Arc::default();
    let mut writer = tokio::spawn(async move {
        while let Some(m) = out_rx.recv().await {
            let Ok(t) = serde_json::to_string(&m) else {
                continue;
            };
            // A control plane that stops reading is taken for gone.
            let sent = tokio::time::timeout(WRITE_TIMEOUT, sink.send(Message::Text(t.into())));
            if !matches!(sent.await, Ok(Ok(()))) {
                break;
            }
        }
    });
    let ended = loop {
        tokio::select! {
            _ = &mut writer => break Err("the channel's writes stalled or failed".to_string()),
            msg = source.next() => {
                let Some(msg) = msg else { break Ok(()) };
                let msg = match msg {
                    Ok(m) => m,
                    Err(e) => break Err(e.to_string()),
                };
                let Message::Text(t) = msg else { continue };
                let Ok(req) = serde_json::from_str::<ToNode>(&t) else {
                    tracing::warn!("unknown message on the node channel");
                    continue;
                };
                match req {
                    ToNode::Input { .. } | ToNode::InputEnd { .. } | ToNode::Close { .. } => {
                        feed(&inputs, req).await;
                    }
                    req => handle(shared, &inputs, &out_tx, req),
                }
            }
        }
    };
    writer.abort();
    ended
}

fn handle<D: Driver>(
    shared: &Arc<Shared<D>>,
    inputs: &Inputs,
    out: &mpsc::Sender<FromNode>,
    req: ToNode,
) {
    match req {
        ToNode::Poke => shared.wake.notify_one(),
        ToNode::ConsoleTail { stream, vm, bytes } => {
            let path = shared.vm_dir(vm).join(files::CONSOLE_LOG);
            let out = out.clone();
            tokio::spawn(async move {
                let msg = match console_tail(&path, bytes).await {
                    Ok(data) => {
                        for chunk in data.chunks(48 * 1024) {
                            let _ = out
                                .send(FromNode::Console {
                                    stream,
                                    data: B64.encode(chunk),
                                })
                                .await;
                        }
                        FromNode::End { stream }
                    }
                    Err(e) => FromNode::Error {
                        stream,
                        message: e,
                        not_found: true,
                    },
                };
                let _ = out.send(msg).await;
            });
        }
        ToNode::ConsoleAttach { stream, vm } => {
            let (tx, rx) = mpsc::channel(64);
            if let Ok(mut m) = inputs.lock() {
                m.insert(stream, tx);
            }
            let dir = shared.vm_dir(vm);
            let (out, inputs) = (out.clone(), inputs.clone());
            tokio::spawn(async move {
                let end = console_attach(stream, dir, rx, &out).await;
                let _ = out.send(end).await;
                if let Ok(mut m) = inputs.lock() {
                    m.remove(&stream);
                }
            });
        }
        ToNode::Exec {
            stream,
            vm,
            argv,
            env,
            cwd,
            stdin,
            timeout_secs,
        } => {
            let (tx, rx) = mpsc::channel(64);
            if let Ok(mut m) = inputs.lock() {
                m.insert(stream, tx);
            }
            let over_ssh = ssh_target(shared, vm);
            let (out, inputs) = (out.clone(), inputs.clone());
            let key = shared.ssh_key.clone();
            let shared = shared.clone();
            tokio::spawn(async move {
                let conn = match over_ssh {
                    Some(_) => None,
                    None => agent_of(&shared, vm).await,
                };
                let end = match (conn, over_ssh, key) {
                    (Some(c), _, _) => {
                        let req = GuestExec {
                            argv,
                            env,
                            cwd,
                            stdin,
                            set_clock: None,
                            identity: None,
                        };
                        exec(stream, c, req, rx, timeout_secs, &out, vm).await
                    }
                    (None, Some(t), Some(key)) => {
                        let command = crate::ssh::remote_command(&argv, &env, cwd.as_deref());
                        crate::ssh::exec(
                            stream,
                            &key,
                            &t,
                            command,
                            stdin,
                            rx,
                            timeout_secs,
                            &out,
                            vm,
                        )
                        .await
                    }
                    (None, _, _) => FromNode::Error {
                        stream,
                        message: "the VM's guest agent is not connected".into(),
                        not_found: false,
                    },
                };
                let _ = out.send(end).await;
                if let Ok(mut m) = inputs.lock() {
                    m.remove(&stream);
                }
            });
        }
        ToNode::Run { stream, spec } => {
            let (tx, rx) = mpsc::channel(64);
            if let Ok(mut m) = inputs.lock() {
                m.insert(stream, tx);
            }
            let (shared, out, inputs) = (shared.clone(), out.clone(), inputs.clone());
            tokio::spawn(async move {
                let end = shared.runs.run(&shared, stream, *spec, rx, &out).await;
                let _ = out.send(end).await;
                if let Ok(mut m) = inputs.lock() {
                    m.remove(&stream);
                }
            });
        }
        ToNode::RemoveOrphan { stream, vm } => {
            let known = shared.orphans.lock().is_ok_and(|o| o.contains_key(&vm));
            let msg = if known {
                if let Ok(mut r) = shared.remove_orphans.lock() {
                    r.insert(vm);
                }
                shared.wake.notify_one();
                FromNode::End { stream }
            } else {
                FromNode::Error {
                    stream,
                    message: format!("this node holds no orphan {vm}"),
                    not_found: true,
                }
            };
            let _ = out.try_send(msg);
        }
        // The channel's reader feeds these to their streams itself (`feed`).
        ToNode::Input { .. } | ToNode::InputEnd { .. } | ToNode::Close { .. } => {}
    }
}

/// How long the channel's reader waits for a stream to take its input
/// before dropping it (its process stopped reading).
const INPUT_WAIT: Duration = Duration::from_secs(30);

/// Hands input to its stream, waiting while the stream's queue is full:
/// the channel's reader slows down (and with it the control plane's
/// sender) instead of losing bytes of a file or a script.
async fn feed(inputs: &Inputs, req: ToNode) {
    let (stream, i) = match req {
        ToNode::Input { stream, data } => match B64.decode(data) {
            Ok(b) => (stream, Input::Data(b)),
            Err(_) => return,
        },
        ToNode::InputEnd { stream } => (stream, Input::End),
        ToNode::Close { stream } => (stream, Input::Close),
        _ => return,
    };
    let tx = inputs.lock().ok().and_then(|m| m.get(&stream).cloned());
    if let Some(tx) = tx
        && tokio::time::timeout(INPUT_WAIT, tx.send(i)).await.is_err()
    {
        tracing::warn!(stream, "dropped input for a stream that stopped taking it");
    }
}

/// The last `bytes` of a VM's console log, reaching into its previous
/// part when the log was cut not long ago.
async fn console_tail(path: &std::path::Path, bytes: u64) -> Result<Vec<u8>, String> {
    let mut now = tail(path, bytes).await?;
    let short = bytes.saturating_sub(now.len() as u64);
    if short > 0 {
        let old = path.with_file_name(crate::console_log::OLD);
        if let Ok(mut before) = tail(&old, short).await {
            before.append(&mut now);
            return Ok(before);
        }
    }
    Ok(now)
}

/// The last `bytes` of a file.
async fn tail(path: &std::path::Path, bytes: u64) -> Result<Vec<u8>, String> {
    let mut f = tokio::fs::File::open(path)
        .await
        .map_err(|_| "no console log for this VM on its node".to_string())?;
    let len = f.metadata().await.map_err(|e| e.to_string())?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(bytes)))
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    f.take(bytes)
        .read_to_end(&mut buf)
        .await
        .map_err(|e| e.to_string())?;
    Ok(buf)
}

/// Follows the console log from its end and types input into the serial
/// console's socket, until the requester closes.
async fn console_attach(
    stream: u64,
    dir: std::path::PathBuf,
    mut input: mpsc::Receiver<Input>,
    out: &mpsc::Sender<FromNode>,
) -> FromNode {
    let log = dir.join(files::CONSOLE_LOG);
    let mut f = match tokio::fs::File::open(&log).await {
        Ok(f) => f,
        Err(_) => {
            return FromNode::Error {
                stream,
                message: "no console log for this VM on its node".into(),
                not_found: true,
            };
        }
    };
    let mut pos = f.metadata().await.map(|m| m.len()).unwrap_or(0);
    let mut sock: Option<tokio::net::UnixStream> = None;
    let mut buf = vec![0u8; 32 * 1024];
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let len = f.metadata().await.map(|m| m.len()).unwrap_or(pos);
                if len < pos {
                    pos = 0; // the log was replaced
                }
                while pos < len {
                    if f.seek(SeekFrom::Start(pos)).await.is_err() { break; }
                    let n = match f.read(&mut buf).await { Ok(0) | Err(_) => break, Ok(n) => n };
                    pos += n as u64;
                    if out.send(FromNode::Console { stream, data: B64.encode(&buf[..n]) }).await.is_err() {
                        return FromNode::End { stream };
                    }
                }
            }
            i = input.recv() => match i {
                Some(Input::Data(b)) => {
                    if sock.is_none() {
                        sock = tokio::net::UnixStream::connect(dir.join(files::CONSOLE)).await.ok();
                    }
                    if let Some(s) = sock.as_mut()
                        && s.write_all(&b).await.is_err()
                    {
                        sock = None;
                    }
                }
                Some(Input::End) => {}
                Some(Input::Close) | None => return FromNode::End { stream },
            }
        }
        // Drain whatever QEMU echoes back on the socket; output is read
        // from the log.
        if let Some(s) = sock.as_mut() {
            let mut sink = [0u8; 4096];
            while let Ok(n) = s.try_read(&mut sink) {
                if n == 0 {
                    sock = None;
                    break;
                }
            }
        }
    }
}

/// How long an exec waits for a VM's agent connection that is being
/// made again (the node agent restarted and adopted the VM, or the guest
/// rebooted) before it fails.
const AGENT_WAIT: Duration = Duration::from_secs(15);

/// The VM's guest-agent connection; for a VM this node holds whose
/// connection is not there yet, the one that comes within [`AGENT_WAIT`].
async fn agent_of<D: Driver>(shared: &Shared<D>, vm: VmId) -> Option<GuestConn> {
    let deadline = tokio::time::Instant::now() + AGENT_WAIT;
    loop {
        if let Some(c) = shared.guests.lock().ok().and_then(|g| g.get(&vm).cloned()) {
            return Some(c);
        }
        let held = shared.reports.lock().is_ok_and(|r| r.contains_key(&vm));
        if !held || tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Where exec reaches a VM without the agent over SSH: its login user
/// and its port 22 forward (on loopback when it listens on every
/// address); `None` for a VM with the agent, or without either.
fn ssh_target<D: Driver>(shared: &Shared<D>, vm: VmId) -> Option<crate::ssh::Target> {
    let user = shared.ssh_users.lock().ok()?.get(&vm).cloned()?;
    let reports = shared.reports.lock().ok()?;
    let fwd = reports
        .get(&vm)?
        .ports
        .iter()
        .find(|p| p.guest_port == 22)?;
    let host = match fwd.host.as_str() {
        "0.0.0.0" | "" => "127.0.0.1".to_owned(),
        h => h.to_owned(),
    };
    Some(crate::ssh::Target {
        user,
        host,
        port: fwd.host_port,
    })
}

async fn exec(
    stream: u64,
    conn: byteport_guest::host::GuestConn,
    req: GuestExec,
    mut input: mpsc::Receiver<Input>,
    timeout_secs: u64,
    out: &mpsc::Sender<FromNode>,
    vm: VmId,
) -> FromNode {
    let mut s = match conn.exec(req).await {
        Ok(s) => s,
        Err(e) => {
            return FromNode::Error {
                stream,
                message: format!("the guest agent refused: {e}"),
                not_found: false,
            };
        }
    };
    let deadline = tokio::time::sleep(Duration::from_secs(timeout_secs));
    tokio::pin!(deadline);
    let mut input_open = true;
    loop {
        tokio::select! {
            ev = s.events.recv() => match ev {
                Some(GuestEvent::Stdout(b)) => {
                    let _ = out.send(FromNode::Stdout { stream, data: B64.encode(b) }).await;
                }
                Some(GuestEvent::Stderr(b)) => {
                    let _ = out.send(FromNode::Stderr { stream, data: B64.encode(b) }).await;
                }
                Some(GuestEvent::Exit { code, signal }) => return FromNode::Exit { stream, code, signal },
                Some(GuestEvent::Error(message)) => return FromNode::Error { stream, message, not_found: false },
                None => return FromNode::Error { stream, message: "the guest agent went away".into(), not_found: false },
            },
            i = input.recv(), if input_open => match i {
                Some(Input::Data(b)) => { let _ = s.write_stdin(&b).await; }
                Some(Input::End) => { let _ = s.close_stdin().await; input_open = false; }
                Some(Input::Close) | None => {
                    let _ = s.kill().await;
                    return FromNode::Error { stream, message: "the requester went away; the command was killed".into(), not_found: false };
                }
            },
            _ = &mut deadline => {
                let _ = s.kill().await;
                tracing::info!(%vm, timeout_secs, "exec timed out");
                return FromNode::Error { stream, message: format!("the command ran longer than {timeout_secs} s and was killed"), not_found: false };
            }
        }
    }
}
