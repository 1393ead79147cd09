//! The in-guest side of the protocol: answers Hello and Ping, runs processes
//! for ExecStart and streams their output back.
//!
//! Owns the serving loop over any byte stream ([`serve`]); finding and opening
//! the virtio-serial port is the binary's job. Plain std threads, no runtime:
//!
//! ```text
//!  port ──read──> reader (this thread) ──spawn──> child process
//!                   │ Hello/Ping/Stdin/Kill           │ stdout, stderr pumps
//!                   v                                 v
//!            bounded channel ──────────────> writer thread ──write──> port
//! ```
//!
//! One writer thread owns the write half so frames never interleave. Each
//! exec has a thread per output pipe, one feeding its stdin and one waiting
//! for it to end, so a process that stops reading stdin or floods stdout
//! holds up only itself (and, once the bounded channel is full, the port:
//! the protocol has no per-stream flow control).
//!
//! A virtio-serial port reads 0 bytes while no host is connected. The agent
//! then sleeps briefly and reads the same fd again; it never exits. When a
//! host that had been talking goes away, every running process gets SIGHUP
//! (like a terminal hangup) and whatever they write afterwards is dropped:
//! exec streams belong to one host connection.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::Duration;

use crate::proto::{
    CLOUD_INIT_RUN, CONTROL_STREAM, CloudInitStatus, Decoder, ExecError, ExecRequest, Exit, Frame,
    Kind, MAX_PAYLOAD, Message, Ready, write_frame,
};

/// The agent's version, sent in Ready.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Frames queued for the writer before producers block.
const OUT_QUEUE: usize = 64;

/// Bytes read from a child's stdout or stderr at a time.
const PUMP_CHUNK: usize = 32 * 1024;

/// What [`serve`] does when a read returns end-of-file.
#[derive(Debug, Clone, Copy)]
pub enum OnEof {
    /// A virtio-serial port: no host is connected right now. Sleep this long
    /// and read again; never return.
    WaitForHost(Duration),
    /// An ordinary stream (tests): the peer is gone for good, return.
    Return,
}

/// Serves the protocol on `reader`/`writer` (two handles to one port).
///
/// Sends Ready first. Returns only with [`OnEof::Return`], at end-of-file or
/// on a read error; with [`OnEof::WaitForHost`] read errors are logged and
/// retried after the same pause.
pub fn serve<R, W>(mut reader: R, writer: W, on_eof: OnEof) -> io::Result<()>
where
    R: Read,
    W: Write + Send + 'static,
{
    let (out_tx, out_rx) = mpsc::sync_channel(OUT_QUEUE);
    let agent = Agent {
        shared: Arc::new(Shared {
            out: out_tx,
            generation: AtomicU64::new(0),
        }),
        sessions: HashMap::new(),
        identity_set: false,
    };
    let writer_shared = Arc::clone(&agent.shared);
    thread::Builder::new()
        .name("writer".into())
        .spawn(move || write_loop(writer, out_rx, &writer_shared))?;
    agent.read_loop(&mut reader, on_eof)
}

/// State that the pumps and the writer see.
struct Shared {
    out: SyncSender<Outgoing>,
    /// Bumped when a host goes away; frames of an older generation are dropped.
    generation: AtomicU64,
}

impl Shared {
    fn send(&self, generation: u64, msg: Message, stream: u32) {
        match msg.into_frame(stream) {
            // Fails only when the writer thread is gone, and then serve is ending.
            Ok(frame) => {
                let _ = self.out.send(Outgoing { generation, frame });
            }
            Err(e) => log(format_args!("dropping an unencodable frame: {e}")),
        }
    }
}

struct Outgoing {
    generation: u64,
    frame: Frame,
}

/// A running process, as the reader thread sees it.
struct Session {
    stdin: Option<Sender<Vec<u8>>>,
    child: Arc<Mutex<Child>>,
}

struct Agent {
    shared: Arc<Shared>,
    /// Only the reader thread touches this map; waiters report the end of a
    /// session over `done` so no lock is shared with them.
    sessions: HashMap<u32, Session>,
    /// Whether this guest got its own boot and machine id already.
    identity_set: bool,
}

impl Agent {
    fn read_loop<R: Read>(mut self, reader: &mut R, on_eof: OnEof) -> io::Result<()> {
        let (done_tx, done_rx) = mpsc::channel::<(u32, Arc<Mutex<Child>>)>();
        self.send_ready();
        let mut decoder = Decoder::new();
        let mut buf = vec![0u8; MAX_PAYLOAD + 9];
        // True once the current host has sent something; false after it went away.
        let mut connected = false;
        // After a framing error nothing more from this host can be trusted.
        let mut poisoned = false;
        let mut last_error: Option<io::ErrorKind> = None;
        loop {
            let res = match reader.read(&mut buf) {
                // The peer closed with our frames still unread: it is gone,
                // exactly as at end-of-file.
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Ok(0),
                r => r,
            };
            self.reap(&done_rx);
            let n = match res {
                Ok(0) => match on_eof {
                    OnEof::Return => return Ok(()),
                    OnEof::WaitForHost(pause) => {
                        if connected {
                            log(format_args!("host disconnected"));
                            connected = false;
                            self.host_gone();
                        }
                        poisoned = false;
                        decoder.reset();
                        thread::sleep(pause);
                        continue;
                    }
                },
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => match on_eof {
                    OnEof::Return => return Err(e),
                    OnEof::WaitForHost(pause) => {
                        if last_error != Some(e.kind()) {
                            log(format_args!("read: {e}; retrying"));
                            last_error = Some(e.kind());
                        }
                        thread::sleep(pause);
                        continue;
                    }
                },
            };
            last_error = None;
            connected = true;
            if poisoned {
                continue;
            }
            decoder.push(&buf[..n]);
            loop {
                match decoder.next_frame() {
                    Ok(Some(frame)) => self.handle(frame, &done_tx),
                    Ok(None) => break,
                    Err(e) => {
                        log(format_args!(
                            "protocol error: {e}; ignoring input until the host reconnects"
                        ));
                        poisoned = true;
                        decoder.reset();
                        break;
                    }
                }
            }
        }
    }

    fn generation(&self) -> u64 {
        self.shared.generation.load(Ordering::SeqCst)
    }

    fn send(&self, msg: Message, stream: u32) {
        self.shared.send(self.generation(), msg, stream);
    }

    fn send_ready(&self) {
        self.send(Message::Ready(ready()), CONTROL_STREAM);
    }

    fn handle(&mut self, frame: Frame, done: &Sender<(u32, Arc<Mutex<Child>>)>) {
        let stream = frame.stream();
        let kind = frame.kind();
        let msg = match Message::from_frame(frame) {
            Ok(m) => m,
            Err(e) => {
                // Unknown kinds and bad payloads are skipped, not fatal: the
                // framing is intact. A bad ExecStart still gets an answer.
                log(format_args!("stream {stream}: {e}"));
                if kind == Kind::ExecStart && !self.sessions.contains_key(&stream) {
                    self.exec_error(stream, e.to_string());
                }
                return;
            }
        };
        match msg {
            Message::Hello => self.send_ready(),
            Message::Ping(p) => self.send(Message::Pong(p), CONTROL_STREAM),
            Message::ExecStart(req) => self.exec_start(stream, req, done),
            Message::Stdin(data) => {
                if let Some(tx) = self.sessions.get(&stream).and_then(|s| s.stdin.as_ref()) {
                    // Fails once the child closed its stdin; the data has nowhere to go.
                    let _ = tx.send(data);
                }
            }
            Message::StdinEof => {
                if let Some(s) = self.sessions.get_mut(&stream) {
                    s.stdin = None;
                }
            }
            Message::Kill(k) => {
                if let Some(s) = self.sessions.get(&stream) {
                    signal(&s.child, k.signal);
                }
            }
            // Guest→host kinds coming the wrong way, and Pong: nothing to do.
            Message::Ready(_)
            | Message::Pong(_)
            | Message::Stdout(_)
            | Message::Stderr(_)
            | Message::Exit(_)
            | Message::ExecError(_) => {}
        }
    }

    fn exec_error(&self, stream: u32, message: String) {
        self.send(Message::ExecError(ExecError { message }), stream);
    }

    fn exec_start(
        &mut self,
        stream: u32,
        req: ExecRequest,
        done: &Sender<(u32, Arc<Mutex<Child>>)>,
    ) {
        if stream == CONTROL_STREAM || self.sessions.contains_key(&stream) {
            return self.exec_error(stream, format!("stream {stream} is not free"));
        }
        if req.argv.is_empty() && req.set_clock.is_none() && req.identity.is_none() {
            return self.exec_error(stream, "empty argv".into());
        }
        if let Some((secs, nanos)) = req.set_clock {
            let t = rustix::time::Timespec {
                tv_sec: secs,
                tv_nsec: i64::from(nanos.min(999_999_999)),
            };
            if let Err(e) = rustix::time::clock_settime(rustix::time::ClockId::Realtime, t) {
                eprintln!("byteport-guest: cannot set the clock: {e}");
            }
        }
        if let Some((boot, machine)) = &req.identity
            && !self.identity_set
        {
            self.identity_set = true;
            if let Err(e) = new_identity(boot, machine) {
                eprintln!("byteport-guest: cannot give the guest a new identity: {e}");
            }
        }
        let Some(program) = req.argv.first() else {
            // Only the clock or the identity: nothing to start.
            return self.send(
                Message::Exit(Exit {
                    code: Some(0),
                    signal: None,
                }),
                stream,
            );
        };
        let mut cmd = Command::new(program);
        cmd.args(&req.argv[1..])
            .envs(req.env.iter().map(|(k, v)| (k, v)))
            .stdin(if req.stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(cwd) = &req.cwd {
            cmd.current_dir(cwd);
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => return self.exec_error(stream, format!("cannot run {program}: {e}")),
        };
        let generation = self.generation();
        let mut pumps = Vec::with_capacity(2);
        if let Some(out) = child.stdout.take() {
            pumps.push(pump(&self.shared, generation, stream, out, Message::Stdout));
        }
        if let Some(err) = child.stderr.take() {
            pumps.push(pump(&self.shared, generation, stream, err, Message::Stderr));
        }
        let stdin = child.stdin.take().map(feed_stdin);
        let child = Arc::new(Mutex::new(child));
        let waiter = {
            let shared = Arc::clone(&self.shared);
            let child = Arc::clone(&child);
            let done = done.clone();
            move || {
                for p in pumps.into_iter().flatten() {
                    let _ = p.join();
                }
                let exit = wait(&child);
                // Before Exit, so the reader forgets the stream first.
                let _ = done.send((stream, child));
                shared.send(generation, Message::Exit(exit), stream);
            }
        };
        if let Err(e) = thread::Builder::new()
            .name(format!("exec-{stream}"))
            .spawn(waiter)
        {
            signal(&child, 9);
            return self.exec_error(stream, format!("cannot start a thread: {e}"));
        }
        self.sessions.insert(stream, Session { stdin, child });
    }

    /// Forgets sessions whose process has ended.
    fn reap(&mut self, done: &Receiver<(u32, Arc<Mutex<Child>>)>) {
        while let Ok((stream, child)) = done.try_recv() {
            if self
                .sessions
                .get(&stream)
                .is_some_and(|s| Arc::ptr_eq(&s.child, &child))
            {
                self.sessions.remove(&stream);
            }
        }
    }

    /// The host went away: hang up every process and drop their output.
    fn host_gone(&mut self) {
        self.shared.generation.fetch_add(1, Ordering::SeqCst);
        for (_, s) in self.sessions.drain() {
            signal(&s.child, SIGHUP);
        }
    }
}

const SIGHUP: i32 = 1;
const SIGKILL: i32 = 9;

/// Copies one output pipe of a child into frames until it closes.
fn pump<R: Read + Send + 'static>(
    shared: &Arc<Shared>,
    generation: u64,
    stream: u32,
    mut pipe: R,
    wrap: fn(Vec<u8>) -> Message,
) -> Option<thread::JoinHandle<()>> {
    let shared = Arc::clone(shared);
    let spawned = thread::Builder::new()
        .name(format!("pump-{stream}"))
        .spawn(move || {
            let mut buf = vec![0u8; PUMP_CHUNK];
            loop {
                match pipe.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => shared.send(generation, wrap(buf[..n].to_vec()), stream),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
        });
    // Without the thread the pipe is dropped: the child sees EPIPE, nothing hangs.
    spawned.ok()
}

/// A thread that writes what the host sends into the child's stdin and closes
/// it when the host says so (the channel's sender is dropped).
fn feed_stdin(mut stdin: ChildStdin) -> Sender<Vec<u8>> {
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    let spawned = thread::Builder::new().name("stdin".into()).spawn(move || {
        for chunk in rx {
            if stdin.write_all(&chunk).is_err() {
                // The child closed its stdin; later chunks have nowhere to go.
                break;
            }
        }
    });
    if let Err(e) = spawned {
        log(format_args!("cannot start a stdin thread: {e}"));
    }
    tx
}

/// Waits for a child without holding its lock for long, so Kill can still
/// reach it. Usually the child has already ended when its pipes close, so the
/// first look succeeds.
fn wait(child: &Mutex<Child>) -> Exit {
    let mut pause = Duration::from_millis(1);
    loop {
        match lock(child).try_wait() {
            Ok(Some(st)) => {
                return Exit {
                    code: st.code(),
                    signal: st.signal(),
                };
            }
            Ok(None) => {}
            Err(e) => {
                log(format_args!("waiting for a child: {e}"));
                return Exit {
                    code: None,
                    signal: None,
                };
            }
        }
        thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// Sends `sig` to a child that has not been reaped yet (so its pid cannot
/// have been reused).
///
/// std can only send SIGKILL (`Child::kill`); other signals go through the
/// system's `kill` command, and when that is missing or fails the child gets
/// SIGKILL instead, so a Kill always ends the process.
fn signal(child: &Mutex<Child>, sig: i32) {
    let mut child = lock(child);
    if !matches!(child.try_wait(), Ok(None)) {
        return;
    }
    if sig != SIGKILL {
        let sent = Command::new("kill")
            .args(["-s", &sig.to_string(), &child.id().to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if sent {
            return;
        }
    }
    if let Err(e) = child.kill() {
        log(format_args!("kill: {e}"));
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicked holder leaves a Child that is still perfectly usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn write_loop<W: Write>(mut w: W, rx: Receiver<Outgoing>, shared: &Shared) {
    let mut failing = false;
    for out in rx {
        if out.generation != shared.generation.load(Ordering::SeqCst) {
            continue;
        }
        match write_frame(&mut w, &out.frame) {
            Ok(()) => failing = false,
            Err(e) => {
                if !failing {
                    log(format_args!("write: {e}; dropping frames until it works"));
                    failing = true;
                }
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// What Ready says about this guest now.
pub fn ready() -> Ready {
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let uptime_ms = std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0, |secs| (secs * 1000.0) as u64);
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    Ready {
        version: VERSION.to_string(),
        hostname,
        uptime_ms,
        instance: format!("{}-{}", boot_id.trim(), std::process::id()),
        cloud_init: Some(CloudInitStatus::read(Path::new(CLOUD_INIT_RUN))),
    }
}

/// One line on stderr, which in a guest is the serial console.
pub fn log(args: std::fmt::Arguments<'_>) {
    eprintln!("byteport-guest: {args}");
}

/// The boot id and machine id given, bind-mounted over the kernel's
/// `/proc/sys/kernel/random/boot_id` (read-only, fixed at boot) and
/// `/etc/machine-id`, from files under /run.
fn new_identity(boot: &str, machine: &str) -> Result<(), String> {
    let uuid = boot.len() == 36 && boot.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    let id = machine.len() == 32 && machine.bytes().all(|b| b.is_ascii_hexdigit());
    if !uuid || !id {
        return Err("the identity is not a UUID and 32 hex digits".into());
    }
    for (text, file, over) in [
        (
            boot,
            "/run/byteport-boot-id",
            "/proc/sys/kernel/random/boot_id",
        ),
        (machine, "/run/byteport-machine-id", "/etc/machine-id"),
    ] {
        if !std::path::Path::new(over).exists() {
            continue;
        }
        std::fs::write(file, format!("{text}\n")).map_err(|e| format!("{file}: {e}"))?;
        rustix::mount::mount_bind(file, over).map_err(|e| format!("{over}: {e}"))?;
    }
    Ok(())
}
