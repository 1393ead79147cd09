//! The host side of the guest protocol: an async client for one guest's
//! agent, reached through the unix socket of QEMU's virtio-serial chardev.
//!
//! Owns one connection: a reader task that demultiplexes frames to exec
//! sessions and a writer task that owns the write half. It does not start
//! guests, reconnect by itself or retry commands; the node agent decides
//! that. A new connection to the same socket is simply a new [`GuestConn`];
//! call [`GuestConn::hello`] on it to learn that the agent is there.
//!
//! When the agent restarts under an open connection (it crashed and init
//! started it again, or the guest rebooted), its Ready carries a new
//! `instance` and every open session ends with an Error: those processes
//! are gone. A session started in the instant between the restart and that
//! Ready is ended too.
//!
//! Flow control: each session's events go through a bounded channel. When a
//! session's receiver is full the reader waits, which in turn holds up every
//! stream of this guest (the protocol has no per-stream windows) — so read
//! `events` while writing large stdin. A session whose receiver was dropped
//! has its process killed when it next produces output.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::proto::{
    CONTROL_STREAM, Decoder, Exit, Frame, Kill, Kind, MAX_PAYLOAD, Message, ProtoError, encode_into,
};
pub use crate::proto::{ExecRequest, Ready};

/// How often [`GuestConn::hello`] repeats Hello while waiting.
const HELLO_INTERVAL: Duration = Duration::from_millis(500);

/// Events buffered per exec session before the reader waits.
const SESSION_EVENTS: usize = 64;

/// Frames queued for the writer task before senders wait.
const OUT_QUEUE: usize = 64;

/// Bytes the writer gathers from queued frames into one write.
const WRITE_BATCH: usize = 256 * 1024;

const SIGKILL: i32 = 9;
/// Control frames (Ready, Ping, Pong and kinds this side does not know) a
/// guest may send in a burst, and per second after that: an agent sends a
/// few a boot and one Pong per Ping. Past that they are dropped unread and
/// counted ([`GuestConn::dropped_frames`]), so a hostile guest cannot keep
/// the node busy parsing, or waking its heartbeat with Ready after Ready.
const CONTROL_BURST: f64 = 64.0;
const CONTROL_PER_SECOND: f64 = 16.0;

/// What went wrong talking to a guest.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// Connecting to, reading or writing the socket failed.
    #[error("guest connection i/o")]
    Io(#[from] std::io::Error),
    /// The connection is closed; open a new one.
    #[error("guest connection closed")]
    Closed,
    /// The guest did not answer in time.
    #[error("no answer from the guest agent within {0:?}")]
    Timeout(Duration),
    /// A request could not be encoded (for example, an environment over 64 KiB).
    #[error("guest protocol")]
    Protocol(#[from] ProtoError),
    /// The command could not run, or its session ended without an exit status.
    #[error("exec failed: {0}")]
    Exec(String),
}

/// What [`ExecSession::output`] collects at most, stdout and stderr together.
pub const OUTPUT_CAP: usize = 1 << 20;

/// What an exec session reports, in order; Exit or Error is the last event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    /// Bytes from the process's stdout.
    Stdout(Vec<u8>),
    /// Bytes from the process's stderr.
    Stderr(Vec<u8>),
    /// The process ended.
    Exit {
        code: Option<i32>,
        signal: Option<i32>,
    },
    /// The process could not start, or the connection closed under it.
    Error(String),
}

/// Everything a finished process wrote, and how it ended.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

impl ExecOutput {
    /// Whether the process exited with code 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// A connection to one guest agent. Cheap to clone; all clones share it.
/// The connection closes when the last clone (and the last [`ExecSession`])
/// is dropped, on [`GuestConn::close`], or when the socket fails.
#[derive(Clone)]
pub struct GuestConn {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for GuestConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestConn")
            .field("closed", &self.is_closed())
            .field("ready", &self.ready())
            .finish()
    }
}

struct Inner {
    out: mpsc::Sender<Frame>,
    state: Mutex<State>,
    /// The last Ready; also poked on close to wake [`GuestConn::hello`].
    ready: watch::Sender<Option<Ready>>,
    closed: AtomicBool,
    /// Tells the writer task to drop the write half.
    stop_writer: Arc<Notify>,
    reader: OnceLock<AbortHandle>,
    next_stream: AtomicU32,
    next_ping: AtomicU64,
    /// Control frames dropped for coming too fast.
    dropped: AtomicU64,
}

#[derive(Default)]
struct State {
    closed: bool,
    sessions: HashMap<u32, mpsc::Sender<ExecEvent>>,
    pings: HashMap<u64, oneshot::Sender<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(reader) = self.reader.get() {
            reader.abort();
        }
    }
}

impl GuestConn {
    /// Connects to a guest's agent socket (QEMU's `-chardev socket,path=...`).
    pub async fn connect_unix(path: &Path) -> std::io::Result<GuestConn> {
        let stream = tokio::net::UnixStream::connect(path).await?;
        let (reader, writer) = stream.into_split();
        Ok(GuestConn::new(reader, writer))
    }

    /// A connection over any byte stream split in two. Spawns its reader and
    /// writer tasks, so it must be called inside a tokio runtime.
    pub fn new<R, W>(reader: R, writer: W) -> GuestConn
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let (out_tx, out_rx) = mpsc::channel(OUT_QUEUE);
        let stop_writer = Arc::new(Notify::new());
        let inner = Arc::new(Inner {
            out: out_tx,
            state: Mutex::new(State::default()),
            ready: watch::Sender::new(None),
            closed: AtomicBool::new(false),
            stop_writer: Arc::clone(&stop_writer),
            reader: OnceLock::new(),
            next_stream: AtomicU32::new(first_stream_id()),
            next_ping: AtomicU64::new(1),
            dropped: AtomicU64::new(0),
        });
        tokio::spawn(write_task(
            writer,
            out_rx,
            stop_writer,
            Arc::downgrade(&inner),
        ));
        let reader = tokio::spawn(read_task(reader, Arc::downgrade(&inner)));
        let _ = inner.reader.set(reader.abort_handle());
        GuestConn { inner }
    }

    /// Sends Hello every 500 ms until the agent answers with Ready, or
    /// `timeout` passes. Use it after connecting. A Ready this connection
    /// had already seen does not count; one the guest queued before the
    /// connection opened may (its `uptime_ms` is then a little old).
    pub async fn hello(&self, timeout: Duration) -> Result<Ready, GuestError> {
        let deadline = Instant::now() + timeout;
        let mut ready = self.inner.ready.subscribe();
        loop {
            self.send(Message::Hello, CONTROL_STREAM).await?;
            let next = (Instant::now() + HELLO_INTERVAL).min(deadline);
            match tokio::time::timeout_at(next, ready.changed()).await {
                Ok(changed) => {
                    if changed.is_err() || self.is_closed() {
                        return Err(GuestError::Closed);
                    }
                    if let Some(r) = ready.borrow_and_update().clone() {
                        return Ok(r);
                    }
                }
                Err(_) if Instant::now() >= deadline => {
                    return Err(GuestError::Timeout(timeout));
                }
                Err(_) => {}
            }
        }
    }

    /// The last Ready the agent sent on this connection.
    pub fn ready(&self) -> Option<Ready> {
        self.inner.ready.borrow().clone()
    }

    /// Control frames the guest sent faster than it may, dropped unread.
    pub fn dropped_frames(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }

    /// Round trip of a Ping through the agent.
    pub async fn ping(&self, timeout: Duration) -> Result<Duration, GuestError> {
        let nonce = self.inner.next_ping.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut st = self.inner.lock();
            if st.closed {
                return Err(GuestError::Closed);
            }
            st.pings.insert(nonce, tx);
        }
        let start = Instant::now();
        self.send(Message::Ping(nonce.to_be_bytes().to_vec()), CONTROL_STREAM)
            .await?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(())) => Ok(start.elapsed()),
            Ok(Err(_)) => Err(GuestError::Closed),
            Err(_) => {
                self.inner.lock().pings.remove(&nonce);
                Err(GuestError::Timeout(timeout))
            }
        }
    }

    /// Starts a process in the guest. The answer comes as events: output,
    /// then Exit, or Error if it could not run.
    pub async fn exec(&self, req: ExecRequest) -> Result<ExecSession, GuestError> {
        let stream = self.inner.alloc_stream();
        let frame = Message::ExecStart(req).into_frame(stream)?;
        let (tx, rx) = mpsc::channel(SESSION_EVENTS);
        {
            let mut st = self.inner.lock();
            if st.closed {
                return Err(GuestError::Closed);
            }
            st.sessions.insert(stream, tx);
        }
        if self.inner.out.send(frame).await.is_err() {
            self.inner.lock().sessions.remove(&stream);
            return Err(GuestError::Closed);
        }
        Ok(ExecSession {
            events: rx,
            stream,
            conn: self.clone(),
        })
    }

    /// Runs a process to completion without stdin and collects its output.
    pub async fn exec_output(&self, req: ExecRequest) -> Result<ExecOutput, GuestError> {
        self.exec(req).await?.output().await
    }

    /// Whether the connection has closed; every call fails from then on.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::SeqCst)
    }

    /// Closes the connection: open sessions end with an Error event and the
    /// socket is released.
    pub fn close(&self) {
        self.inner.shut("connection closed by the host");
    }

    async fn send(&self, msg: Message, stream: u32) -> Result<(), GuestError> {
        if self.is_closed() {
            return Err(GuestError::Closed);
        }
        let frame = msg.into_frame(stream)?;
        self.inner
            .out
            .send(frame)
            .await
            .map_err(|_| GuestError::Closed)
    }
}

/// One process running in the guest.
#[derive(Debug)]
pub struct ExecSession {
    /// What the process does, in order; ends after Exit or Error.
    pub events: mpsc::Receiver<ExecEvent>,
    stream: u32,
    conn: GuestConn,
}

impl ExecSession {
    /// The stream id carrying this session.
    pub fn stream(&self) -> u32 {
        self.stream
    }

    /// Sends bytes to the process's stdin (the request must have set `stdin`).
    pub async fn write_stdin(&self, data: &[u8]) -> Result<(), GuestError> {
        for chunk in data.chunks(MAX_PAYLOAD) {
            self.conn
                .send(Message::Stdin(chunk.to_vec()), self.stream)
                .await?;
        }
        Ok(())
    }

    /// Closes the process's stdin.
    pub async fn close_stdin(&self) -> Result<(), GuestError> {
        self.conn.send(Message::StdinEof, self.stream).await
    }

    /// Kills the process (SIGKILL).
    pub async fn kill(&self) -> Result<(), GuestError> {
        self.signal(SIGKILL).await
    }

    /// Sends a signal to the process. The agent delivers SIGKILL itself and
    /// other signals through the guest's `kill` command; if that fails the
    /// process gets SIGKILL.
    pub async fn signal(&self, signal: i32) -> Result<(), GuestError> {
        self.conn
            .send(Message::Kill(Kill { signal }), self.stream)
            .await
    }

    /// Waits for the process to end, collecting what it wrote: at most
    /// [`OUTPUT_CAP`] bytes, past which the process is killed and this is
    /// an error (the guest is not trusted to keep its output small).
    pub async fn output(mut self) -> Result<ExecOutput, GuestError> {
        let mut out = ExecOutput::default();
        while let Some(ev) = self.events.recv().await {
            if let ExecEvent::Stdout(b) | ExecEvent::Stderr(b) = &ev
                && out.stdout.len() + out.stderr.len() + b.len() > OUTPUT_CAP
            {
                let _ = self.kill().await;
                return Err(GuestError::Exec(format!(
                    "the command wrote more than {OUTPUT_CAP} bytes"
                )));
            }
            match ev {
                ExecEvent::Stdout(b) => out.stdout.extend_from_slice(&b),
                ExecEvent::Stderr(b) => out.stderr.extend_from_slice(&b),
                ExecEvent::Exit { code, signal } => {
                    out.code = code;
                    out.signal = signal;
                    return Ok(out);
                }
                ExecEvent::Error(message) => return Err(GuestError::Exec(message)),
            }
        }
        Err(GuestError::Closed)
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent between statements; a panic elsewhere
        // does not make it unusable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn alloc_stream(&self) -> u32 {
        loop {
            let id = self.next_stream.fetch_add(1, Ordering::Relaxed);
            if id != CONTROL_STREAM {
                return id;
            }
        }
    }

    /// Marks the connection closed and ends every open session with `reason`.
    fn shut(&self, reason: &str) {
        let sessions = {
            let mut st = self.lock();
            if st.closed {
                return;
            }
            st.closed = true;
            self.closed.store(true, Ordering::SeqCst);
            st.pings.clear();
            std::mem::take(&mut st.sessions)
        };
        end_sessions(sessions, reason);
        self.ready.send_modify(|_| {});
        self.stop_writer.notify_one();
        if let Some(reader) = self.reader.get() {
            reader.abort();
        }
    }

    async fn dispatch(&self, frame: Frame) {
        let stream = frame.stream();
        let kind = frame.kind();
        let event = match kind {
            Kind::Ready => {
                if let Ok(ready) = frame.parse_json::<Ready>() {
                    let restarted = self.ready.borrow().as_ref().is_some_and(|old| {
                        !old.instance.is_empty() && old.instance != ready.instance
                    });
                    self.ready.send_replace(Some(ready));
                    if restarted {
                        // The processes of the old agent are gone with it.
                        let sessions = std::mem::take(&mut self.lock().sessions);
                        end_sessions(sessions, "the guest agent restarted");
                    }
                }
                return;
            }
            Kind::Pong => {
                if let Ok(nonce) = <[u8; 8]>::try_from(frame.payload()) {
                    let waiter = self.lock().pings.remove(&u64::from_be_bytes(nonce));
                    if let Some(tx) = waiter {
                        let _ = tx.send(());
                    }
                }
                return;
            }
            Kind::Ping => {
                // Never wait on the writer from the reader: a full queue drops the Pong.
                if let Ok(pong) = Frame::new(CONTROL_STREAM, Kind::Pong, frame.into_payload()) {
                    let _ = self.out.try_send(pong);
                }
                return;
            }
            Kind::Stdout => ExecEvent::Stdout(frame.into_payload()),
            Kind::Stderr => ExecEvent::Stderr(frame.into_payload()),
            Kind::Exit => match frame.parse_json::<Exit>() {
                Ok(e) => ExecEvent::Exit {
                    code: e.code,
                    signal: e.signal,
                },
                Err(e) => ExecEvent::Error(e.to_string()),
            },
            Kind::ExecError => match Message::from_frame(frame) {
                Ok(Message::ExecError(e)) => ExecEvent::Error(e.message),
                Ok(_) => return,
                Err(e) => ExecEvent::Error(e.to_string()),
            },
            // Host→guest kinds coming back, and kinds from a newer agent.
            _ => return,
        };
        let terminal = matches!(kind, Kind::Exit | Kind::ExecError);
        let tx = {
            let mut st = self.lock();
            if terminal {
                st.sessions.remove(&stream)
            } else {
                st.sessions.get(&stream).cloned()
            }
        };
        // Streams we do not know are left over from an earlier connection.
        let Some(tx) = tx else { return };
        if tx.send(event).await.is_err() && !terminal {
            // Nobody listens any more: stop the process.
            self.lock().sessions.remove(&stream);
            if let Ok(kill) = Message::Kill(Kill { signal: SIGKILL }).into_frame(stream) {
                let _ = self.out.try_send(kill);
            }
        }
    }
}

/// Ends each session with an Error event.
fn end_sessions(sessions: HashMap<u32, mpsc::Sender<ExecEvent>>, reason: &str) {
    for (_, tx) in sessions {
        if let Err(TrySendError::Full(ev)) = tx.try_send(ExecEvent::Error(reason.to_string())) {
            // The consumer is behind: deliver the end after what it has queued.
            tokio::spawn(async move {
                let _ = tx.send(ev).await;
            });
        }
    }
}

async fn read_task<R: AsyncRead + Unpin>(mut reader: R, inner: Weak<Inner>) {
    let mut decoder = Decoder::new();
    let mut buf = vec![0u8; MAX_PAYLOAD + 9];
    let (mut budget, mut refilled) = (CONTROL_BURST, Instant::now());
    let reason = 'conn: loop {
        let n = match reader.read(&mut buf).await {
            Ok(0) => break "the guest agent socket closed".to_string(),
            Ok(n) => n,
            Err(e) => break format!("reading from the guest: {e}"),
        };
        decoder.push(&buf[..n]);
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => {
                    let Some(inner) = inner.upgrade() else { return };
                    let output = matches!(
                        frame.kind(),
                        Kind::Stdout | Kind::Stderr | Kind::Exit | Kind::ExecError
                    );
                    if !output {
                        let now = Instant::now();
                        budget = (budget
                            + now.duration_since(refilled).as_secs_f64() * CONTROL_PER_SECOND)
                            .min(CONTROL_BURST);
                        refilled = now;
                        if budget < 1.0 {
                            inner.dropped.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        budget -= 1.0;
                    }
                    inner.dispatch(frame).await;
                }
                Ok(None) => break,
                Err(e) => break 'conn format!("guest protocol: {e}"),
            }
        }
    };
    if let Some(inner) = inner.upgrade() {
        inner.shut(&reason);
    }
}

/// Owns the write half. Holds the connection only weakly, so dropping the
/// last [`GuestConn`] closes the queue and ends this task.
async fn write_task<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut frames: mpsc::Receiver<Frame>,
    stop: Arc<Notify>,
    inner: Weak<Inner>,
) {
    let mut buf = Vec::new();
    loop {
        let frame = tokio::select! {
            biased;
            () = stop.notified() => break,
            f = frames.recv() => match f {
                Some(f) => f,
                None => break,
            },
        };
        buf.clear();
        encode_into(&frame, &mut buf);
        while buf.len() < WRITE_BATCH {
            match frames.try_recv() {
                Ok(f) => encode_into(&f, &mut buf),
                Err(_) => break,
            }
        }
        let res = async {
            writer.write_all(&buf).await?;
            writer.flush().await
        }
        .await;
        if let Err(e) = res {
            if let Some(inner) = inner.upgrade() {
                inner.shut(&format!("writing to the guest: {e}"));
            }
            break;
        }
    }
    let _ = writer.shutdown().await;
}

/// Stream ids start somewhere new on each connection, so frames the guest
/// had queued for an earlier connection cannot land on a new session.
fn first_stream_id() -> u32 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.subsec_nanos());
    (nanos & 0x3fff_ffff) | 1
}
