//! The connection: handshake, one task that owns the socket, and the handle
//! ([`Qmp`]) that commands are issued through.
//!
//! One task per connection owns both halves of the socket. It takes commands
//! from a channel in the order handles submit them, gives each a fresh id and
//! writes it whole, so writes never interleave; and it routes every line QEMU
//! sends: a reply to the call waiting on its id (replies may come in any
//! order), an event to every subscriber. When the socket closes, or every
//! handle is dropped, the task ends; that fails every pending call with
//! [`QmpError::Closed`], ends every event receiver and resolves
//! [`Qmp::closed`]. Because commands reach the socket through a channel,
//! dropping an `execute` future (on a timeout, say) never leaves half a
//! command on the wire.

use std::{collections::HashMap, fmt, io, path::Path, sync::Arc, time::Duration};

use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines},
    net::{
        UnixStream,
        unix::{OwnedReadHalf, OwnedWriteHalf},
    },
    sync::{broadcast, mpsc, oneshot},
    time::{self, Instant},
};

use crate::{
    QmpError, Status,
    codec::{self, Event, Greeting, Message},
};

/// How long a command (and the connection handshake) may wait for its reply
/// unless [`Qmp::with_timeout`] says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Events buffered per subscriber before a slow one starts missing them
/// (its next `recv` then reports `Lagged`).
const EVENT_CAPACITY: usize = 256;

/// The id of `qmp_capabilities` during the handshake; commands start after it.
const HANDSHAKE_ID: u64 = 0;

/// Retry delays of [`Qmp::connect_retry`] double from the first to the last.
const RETRY_FIRST: Duration = Duration::from_millis(10);
const RETRY_MAX: Duration = Duration::from_millis(200);

type Reply = Result<Value, QmpError>;

/// A command on its way to the connection task.
struct Request {
    command: String,
    arguments: Option<Value>,
    reply: oneshot::Sender<Reply>,
}

/// A handle on one QMP connection.
///
/// Cheap to clone; clones share the connection (and may each have their own
/// timeout). Commands from any number of tasks may be in flight at once. The
/// connection closes when QEMU closes it or when the last handle is dropped.
pub struct Qmp {
    requests: mpsc::UnboundedSender<Request>,
    /// Never read: only the source of [`Qmp::subscribe`]'s receivers, since a
    /// broadcast channel hands out receivers from its sender or another receiver
    /// and the sender must live in the connection task alone (dropping it is
    /// what ends subscribers' streams).
    events: broadcast::Receiver<Event>,
    greeting: Arc<Greeting>,
    timeout: Duration,
}

impl Qmp {
    /// Connects to QEMU's QMP socket, reads the greeting and negotiates
    /// capabilities (none are enabled). The handshake is bounded by
    /// [`DEFAULT_TIMEOUT`].
    ///
    /// QEMU serves one client per monitor socket at a time: a second client
    /// connects but gets no greeting until the first leaves, and so times out.
    pub async fn connect(path: &Path) -> Result<Qmp, QmpError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| QmpError::Connect {
                path: path.to_owned(),
                source,
            })?;
        handshake(stream, DEFAULT_TIMEOUT).await
    }

    /// Like [`Qmp::connect`], but retries while the socket does not exist yet
    /// or nobody listens on it, as right after QEMU was spawned. `timeout`
    /// bounds everything, the handshake included.
    pub async fn connect_retry(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let deadline = Instant::now() + timeout;
        let mut delay = RETRY_FIRST;
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(stream) => break stream,
                Err(source) if not_listening_yet(&source) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(QmpError::ConnectTimeout {
                            path: path.to_owned(),
                            after: timeout,
                            source,
                        });
                    }
                    time::sleep(delay.min(left)).await;
                    delay = (delay * 2).min(RETRY_MAX);
                }
                Err(source) => {
                    return Err(QmpError::Connect {
                        path: path.to_owned(),
                        source,
                    });
                }
            }
        };
        handshake(stream, deadline.saturating_duration_since(Instant::now())).await
    }

    /// Sets how long each command waits for its reply (default [`DEFAULT_TIMEOUT`]).
    pub fn with_timeout(mut self, timeout: Duration) -> Qmp {
        self.timeout = timeout;
        self
    }

    /// How long each command waits for its reply.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The greeting QEMU sent, with its version.
    pub fn greeting(&self) -> &Greeting {
        &self.greeting
    }

    /// Runs a QMP command and returns its `return` value.
    ///
    /// `arguments`, when given, must be a JSON object. A QMP error reply
    /// becomes [`QmpError::Command`]; a connection that closes first,
    /// [`QmpError::Closed`]; no reply within the timeout, [`QmpError::Timeout`]
    /// (the command may still take effect later). Dropping the future before
    /// the command was written means it is never sent.
    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        let (reply, reply_rx) = oneshot::channel();
        self.requests
            .send(Request {
                command: command.to_owned(),
                arguments,
                reply,
            })
            .map_err(|_| QmpError::Closed)?;
        match time::timeout(self.timeout, reply_rx).await {
            Ok(Ok(result)) => result,
            // The connection task dropped the call: the connection is gone.
            Ok(Err(_)) => Err(QmpError::Closed),
            Err(_) => Err(QmpError::Timeout {
                command: command.to_owned(),
                after: self.timeout,
            }),
        }
    }

    /// `query-status`: the run state and whether vCPUs are running.
    pub async fn query_status(&self) -> Result<Status, QmpError> {
        let value = self.execute("query-status", None).await?;
        serde_json::from_value(value)
            .map_err(|e| QmpError::Protocol(format!("bad query-status reply: {e}")))
    }

    /// `stop`: pauses the vCPUs (a `STOP` event follows).
    pub async fn stop(&self) -> Result<(), QmpError> {
        self.execute("stop", None).await.map(drop)
    }

    /// `cont`: starts or resumes the vCPUs (a `RESUME` event follows).
    pub async fn cont(&self) -> Result<(), QmpError> {
        self.execute("cont", None).await.map(drop)
    }

    /// `system_powerdown`: presses the ACPI power button; the guest may ignore it.
    pub async fn system_powerdown(&self) -> Result<(), QmpError> {
        self.execute("system_powerdown", None).await.map(drop)
    }

    /// `system_reset`: resets the machine (a `RESET` event follows).
    pub async fn system_reset(&self) -> Result<(), QmpError> {
        self.execute("system_reset", None).await.map(drop)
    }

    /// `quit`: makes QEMU exit at once. The socket closing before the reply
    /// arrives counts as success, since that is what quitting does; a
    /// connection already closed beforehand is still [`QmpError::Closed`].
    /// Waiting for the process to exit is the caller's job.
    pub async fn quit(&self) -> Result<(), QmpError> {
        if self.is_closed() {
            return Err(QmpError::Closed);
        }
        match self.execute("quit", None).await {
            Ok(_) | Err(QmpError::Closed) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// A receiver of every event QEMU sends from now on. It reports
    /// `RecvError::Closed` once the connection has closed, and `Lagged` if it
    /// fell more than 256 events behind.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.resubscribe()
    }

    /// Whether the connection has closed.
    pub fn is_closed(&self) -> bool {
        self.requests.is_closed()
    }

    /// Resolves once the connection has closed (at once if it already has).
    pub async fn closed(&self) {
        self.requests.closed().await;
    }
}

impl Clone for Qmp {
    fn clone(&self) -> Qmp {
        Qmp {
            requests: self.requests.clone(),
            events: self.events.resubscribe(),
            greeting: Arc::clone(&self.greeting),
            timeout: self.timeout,
        }
    }
}

impl fmt::Debug for Qmp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Qmp")
            .field("qemu", &self.greeting.version.qemu)
            .field("timeout", &self.timeout)
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

/// Errors meaning "QEMU has not created or is not yet listening on the socket".
fn not_listening_yet(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
    )
}

/// Reads the greeting, negotiates capabilities and starts the connection task.
async fn handshake(stream: UnixStream, timeout: Duration) -> Result<Qmp, QmpError> {
    let (read, mut writer) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let negotiate = async {
        let greeting = match next_message(&mut lines).await? {
            Message::Greeting(greeting) => greeting,
            other => {
                return Err(QmpError::Protocol(format!(
                    "expected the QMP greeting, got {other:?}"
                )));
            }
        };
        writer
            .write_all(&codec::encode_command(
                "qmp_capabilities",
                None,
                HANDSHAKE_ID,
            ))
            .await?;
        loop {
            // Only our one command can be answered here; QEMU sends no events
            // before capabilities are negotiated, so skipping is just caution.
            if let Message::Reply { result, .. } = next_message(&mut lines).await? {
                result?;
                return Ok(greeting);
            }
        }
    };
    let greeting = time::timeout(timeout, negotiate)
        .await
        .map_err(|_| QmpError::Timeout {
            command: "qmp_capabilities".to_owned(),
            after: timeout,
        })??;

    let (requests, requests_rx) = mpsc::unbounded_channel();
    let (events, events_rx) = broadcast::channel(EVENT_CAPACITY);
    tokio::spawn(run(lines, writer, requests_rx, events));
    Ok(Qmp {
        requests,
        events: events_rx,
        greeting: Arc::new(greeting),
        timeout: DEFAULT_TIMEOUT,
    })
}

async fn next_message(lines: &mut Lines<BufReader<OwnedReadHalf>>) -> Result<Message, QmpError> {
    match lines.next_line().await? {
        Some(line) => codec::parse_message(&line),
        None => Err(QmpError::Closed),
    }
}

/// The connection task: see the module docs.
async fn run(
    mut lines: Lines<BufReader<OwnedReadHalf>>,
    mut writer: OwnedWriteHalf,
    mut requests: mpsc::UnboundedReceiver<Request>,
    events: broadcast::Sender<Event>,
) {
    let mut pending: HashMap<u64, oneshot::Sender<Reply>> = HashMap::new();
    let mut next_id = HANDSHAKE_ID + 1;
    loop {
        tokio::select! {
            // `next_line` is cancel-safe: a partly read line stays buffered.
            line = lines.next_line() => match line {
                Ok(Some(line)) => route(&line, &mut pending, &events),
                // EOF or a broken socket: either way the connection is over.
                Ok(None) | Err(_) => break,
            },
            request = requests.recv() => {
                // `None`: every handle is gone, so nobody can use the connection.
                let Some(request) = request else { break };
                if request.reply.is_closed() {
                    // The caller gave up before the command was sent: don't send it.
                    continue;
                }
                // Calls that timed out leave entries whose replies never came.
                pending.retain(|_, reply| !reply.is_closed());
                let id = next_id;
                next_id += 1;
                let line = codec::encode_command(&request.command, request.arguments.as_ref(), id);
                pending.insert(id, request.reply);
                if writer.write_all(&line).await.is_err() {
                    break;
                }
            }
        }
    }
    // Refuse new commands first, so `is_closed` holds before any pending call
    // learns (through its dropped reply sender) that the connection closed.
    requests.close();
    drop(pending);
    drop(requests);
    drop(events);
}

/// Hands one line from QEMU to whoever waits for it.
fn route(
    line: &str,
    pending: &mut HashMap<u64, oneshot::Sender<Reply>>,
    events: &broadcast::Sender<Event>,
) {
    match codec::parse_message(line) {
        Ok(Message::Reply { id, result }) => {
            // A reply with an unknown id or none answers a call that already
            // timed out, or a line so malformed QEMU could not read its id
            // (this client never writes one).
            if let Some(reply) = id.and_then(|id| pending.remove(&id)) {
                // The caller may have just timed out; then nobody wants it.
                let _ = reply.send(result);
            }
        }
        Ok(Message::Event(event)) => {
            // No subscribers is fine: events are only for those who listen.
            let _ = events.send(event);
        }
        // A second greeting or a line that is not QMP cannot be attributed to
        // any call; the calls it might have answered will time out.
        Ok(Message::Greeting(_)) | Err(_) => {}
    }
}

#[cfg(test)]
mod tests;
