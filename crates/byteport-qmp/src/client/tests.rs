//! The client against an in-process fake QEMU on a Unix socket in a temp dir.

use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines},
    net::{
        UnixListener,
        unix::{OwnedReadHalf, OwnedWriteHalf},
    },
    sync::broadcast::error::RecvError,
    time,
};

use crate::{Qmp, QmpError, RunState, Status};

const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "fake"}, "capabilities": ["oob"]}}"#;

/// Long enough never to fire on a slow machine; the tests that wait this
/// long are failing anyway.
const PATIENCE: Duration = Duration::from_secs(5);

/// A directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("byteport-qmp-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    fn socket(&self) -> PathBuf {
        self.0.join("qmp.sock")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The server side of one QMP connection, scripted by each test.
struct FakeQemu {
    lines: Lines<BufReader<OwnedReadHalf>>,
    writer: OwnedWriteHalf,
}

impl FakeQemu {
    /// Accepts one client without greeting it.
    async fn accept_silently(listener: &UnixListener) -> FakeQemu {
        let (stream, _) = listener.accept().await.expect("accept");
        let (read, writer) = stream.into_split();
        FakeQemu {
            lines: BufReader::new(read).lines(),
            writer,
        }
    }

    /// Accepts one client, greets it and accepts its `qmp_capabilities`.
    async fn accept(listener: &UnixListener) -> FakeQemu {
        let mut fake = FakeQemu::accept_silently(listener).await;
        fake.send(GREETING).await;
        let command = fake.recv().await;
        assert_eq!(command["execute"], "qmp_capabilities");
        assert!(command.get("arguments").is_none(), "{command}");
        fake.reply(&command, json!({})).await;
        fake
    }

    /// The next command the client sent.
    async fn recv(&mut self) -> Value {
        let line = time::timeout(PATIENCE, self.lines.next_line())
            .await
            .expect("a command within PATIENCE")
            .expect("read")
            .expect("a command, not EOF");
        serde_json::from_str(&line).expect("a command is JSON")
    }

    /// Sends one line the way QEMU does, CRLF-terminated.
    async fn send(&mut self, line: &str) {
        self.writer
            .write_all(format!("{line}\r\n").as_bytes())
            .await
            .expect("write");
    }

    async fn reply(&mut self, command: &Value, ret: Value) {
        let line = json!({"return": ret, "id": command["id"]}).to_string();
        self.send(&line).await;
    }

    async fn event(&mut self, name: &str) {
        let line = json!({
            "event": name,
            "timestamp": {"seconds": 1_700_000_000, "microseconds": 42},
        })
        .to_string();
        self.send(&line).await;
    }
}

/// A connected client and the fake it talks to.
async fn setup() -> (TempDir, Qmp, FakeQemu) {
    let dir = TempDir::new();
    let path = dir.socket();
    let listener = UnixListener::bind(&path).expect("bind");
    let (qmp, fake) = tokio::join!(Qmp::connect(&path), FakeQemu::accept(&listener));
    (dir, qmp.expect("connect"), fake)
}

#[tokio::test]
async fn handshake_reads_greeting_and_negotiates_capabilities() {
    let (_dir, qmp, _fake) = setup().await;
    let version = &qmp.greeting().version;
    assert_eq!(
        (version.qemu.major, version.qemu.minor, version.qemu.micro),
        (7, 2, 0)
    );
    assert_eq!(version.package, "fake");
    assert_eq!(qmp.greeting().capabilities, ["oob"]);
    assert!(!qmp.is_closed());
    assert_eq!(qmp.timeout(), crate::DEFAULT_TIMEOUT);
}

#[tokio::test]
async fn handshake_error_fails_connect() {
    let dir = TempDir::new();
    let path = dir.socket();
    let listener = UnixListener::bind(&path).unwrap();
    let server = async {
        let mut fake = FakeQemu::accept_silently(&listener).await;
        fake.send(GREETING).await;
        let command = fake.recv().await;
        let line =
            json!({"error": {"class": "CommandNotFound", "desc": "nope"}, "id": command["id"]});
        fake.send(&line.to_string()).await;
        fake
    };
    let (qmp, _fake) = tokio::join!(Qmp::connect(&path), server);
    assert!(matches!(qmp, Err(QmpError::Command { class, .. }) if class == "CommandNotFound"));
}

#[tokio::test]
async fn replies_out_of_order_reach_their_callers() {
    let (_dir, qmp, mut fake) = setup().await;
    let server = async {
        let first = fake.recv().await;
        let second = fake.recv().await;
        assert_eq!(first["execute"], "first");
        assert!(first.get("arguments").is_none());
        assert_eq!(second["execute"], "second");
        assert_eq!(second["arguments"], json!({"x": 1}));
        assert_ne!(first["id"], second["id"]);
        fake.reply(&second, json!("two")).await;
        fake.reply(&first, json!("one")).await;
    };
    let (first, second, ()) = tokio::join!(
        qmp.execute("first", None),
        qmp.execute("second", Some(json!({"x": 1}))),
        server,
    );
    assert_eq!(first.unwrap(), json!("one"));
    assert_eq!(second.unwrap(), json!("two"));
}

#[tokio::test]
async fn event_before_a_reply_goes_to_subscribers() {
    let (_dir, qmp, mut fake) = setup().await;
    let mut events = qmp.subscribe();
    let server = async {
        let command = fake.recv().await;
        assert_eq!(command["execute"], "stop");
        fake.event("STOP").await;
        fake.reply(&command, json!({})).await;
    };
    let (stopped, ()) = tokio::join!(qmp.stop(), server);
    stopped.unwrap();
    let event = events.try_recv().expect("the event came before the reply");
    assert_eq!(event.name, "STOP");
    assert_eq!(event.data, Value::Null);
    assert_eq!(event.timestamp, Some((1_700_000_000, 42)));

    // A clone's subscriber sees events too, and the connection still works.
    let mut other = qmp.clone().subscribe();
    fake.send(r#"{"event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-shutdown"}}"#)
        .await;
    let event = time::timeout(PATIENCE, other.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(event.name, "SHUTDOWN");
    assert_eq!(event.data["reason"], "guest-shutdown");
    assert_eq!(events.recv().await.unwrap().name, "SHUTDOWN");
}

#[tokio::test]
async fn error_reply_becomes_command_error() {
    let (_dir, qmp, mut fake) = setup().await;
    let server = async {
        let command = fake.recv().await;
        let line = json!({
            "id": command["id"],
            "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"},
        });
        fake.send(&line.to_string()).await;
    };
    let (result, ()) = tokio::join!(qmp.execute("nope", None), server);
    match result {
        Err(QmpError::Command { class, desc }) => {
            assert_eq!(class, "CommandNotFound");
            assert_eq!(desc, "The command nope has not been found");
        }
        other => panic!("expected a command error, got {other:?}"),
    }

    // The connection survives an error reply.
    let server = async {
        let command = fake.recv().await;
        assert_eq!(command["execute"], "query-status");
        let status = json!({"status": "prelaunch", "singlestep": false, "running": false});
        fake.reply(&command, status).await;
    };
    let (status, ()) = tokio::join!(qmp.query_status(), server);
    assert_eq!(
        status.unwrap(),
        Status {
            status: RunState::Prelaunch,
            running: false
        }
    );
}

#[tokio::test]
async fn close_fails_pending_calls_and_ends_subscribers() {
    let (_dir, qmp, mut fake) = setup().await;
    let mut events = qmp.subscribe();
    let server = async move {
        fake.recv().await;
        drop(fake);
    };
    let (result, ()) = tokio::join!(qmp.execute("query-status", None), server);
    assert!(matches!(result, Err(QmpError::Closed)), "{result:?}");

    time::timeout(PATIENCE, qmp.closed())
        .await
        .expect("closed resolves");
    assert!(qmp.is_closed());
    assert!(matches!(events.recv().await, Err(RecvError::Closed)));
    assert!(matches!(
        qmp.subscribe().recv().await,
        Err(RecvError::Closed)
    ));
    assert!(matches!(qmp.cont().await, Err(QmpError::Closed)));
    assert!(matches!(qmp.quit().await, Err(QmpError::Closed)));
}

#[tokio::test]
async fn timeout_leaves_the_connection_usable() {
    let (_dir, qmp, mut fake) = setup().await;
    let qmp = qmp.with_timeout(Duration::from_millis(100));
    let (result, slow) = tokio::join!(qmp.execute("slow", None), fake.recv());
    match result {
        Err(QmpError::Timeout { command, after }) => {
            assert_eq!(command, "slow");
            assert_eq!(after, Duration::from_millis(100));
        }
        other => panic!("expected a timeout, got {other:?}"),
    }

    // The late reply to the timed-out call must not answer the next one.
    let server = async {
        let next = fake.recv().await;
        fake.reply(&slow, json!("late")).await;
        fake.reply(&next, json!("next")).await;
    };
    let (result, ()) = tokio::join!(qmp.execute("next", None), server);
    assert_eq!(result.unwrap(), json!("next"));
}

#[tokio::test]
async fn quit_succeeds_when_the_socket_closes_before_the_reply() {
    let (_dir, qmp, mut fake) = setup().await;
    let server = async move {
        let command = fake.recv().await;
        assert_eq!(command["execute"], "quit");
        drop(fake);
    };
    let (result, ()) = tokio::join!(qmp.quit(), server);
    result.unwrap();
    time::timeout(PATIENCE, qmp.closed()).await.unwrap();
}

#[tokio::test]
async fn quit_succeeds_with_a_reply() {
    let (_dir, qmp, mut fake) = setup().await;
    let server = async {
        let command = fake.recv().await;
        fake.reply(&command, json!({})).await;
    };
    let (result, ()) = tokio::join!(qmp.quit(), server);
    result.unwrap();
}

#[tokio::test]
async fn typed_helpers_send_their_commands() {
    let (_dir, qmp, mut fake) = setup().await;
    let server = async {
        for expected in ["stop", "cont", "system_powerdown", "system_reset"] {
            let command = fake.recv().await;
            assert_eq!(command["execute"], expected);
            assert!(command.get("arguments").is_none());
            fake.reply(&command, json!({})).await;
        }
        let command = fake.recv().await;
        let status = json!({"status": "colo-ish", "singlestep": false, "running": true});
        fake.reply(&command, status).await;
    };
    let client = async {
        qmp.stop().await.unwrap();
        qmp.cont().await.unwrap();
        qmp.system_powerdown().await.unwrap();
        qmp.system_reset().await.unwrap();
        qmp.query_status().await.unwrap()
    };
    let (status, ()) = tokio::join!(client, server);
    assert_eq!(status.status, RunState::Other("colo-ish".into()));
    assert!(status.running);
}

#[tokio::test]
async fn dropping_every_handle_closes_the_socket() {
    let (_dir, qmp, mut fake) = setup().await;
    let clone = qmp.clone();
    drop(qmp);
    drop(clone);
    let eof = time::timeout(PATIENCE, fake.lines.next_line())
        .await
        .unwrap();
    assert!(matches!(eof, Ok(None)), "{eof:?}");
}

#[tokio::test]
async fn connect_retry_waits_for_the_socket() {
    let dir = TempDir::new();
    let path = dir.socket();
    let server = async {
        time::sleep(Duration::from_millis(150)).await;
        let listener = UnixListener::bind(&path).unwrap();
        FakeQemu::accept(&listener).await
    };
    let (qmp, _fake) = tokio::join!(Qmp::connect_retry(&path, PATIENCE), server);
    assert_eq!(qmp.unwrap().greeting().version.qemu.minor, 2);
}

#[tokio::test]
async fn connect_retry_gives_up() {
    let dir = TempDir::new();
    let result = Qmp::connect_retry(&dir.socket(), Duration::from_millis(100)).await;
    match result {
        Err(QmpError::ConnectTimeout {
            path,
            after,
            source,
        }) => {
            assert_eq!(path, dir.socket());
            assert_eq!(after, Duration::from_millis(100));
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("expected ConnectTimeout, got {other:?}"),
    }
}

#[tokio::test]
async fn connect_retry_bounds_the_handshake() {
    let dir = TempDir::new();
    let path = dir.socket();
    let listener = UnixListener::bind(&path).unwrap();
    let (result, _fake) = tokio::join!(
        Qmp::connect_retry(&path, Duration::from_millis(200)),
        FakeQemu::accept_silently(&listener),
    );
    assert!(
        matches!(&result, Err(QmpError::Timeout { command, .. }) if command == "qmp_capabilities"),
        "{result:?}"
    );
}

#[tokio::test]
async fn connect_without_a_socket_fails() {
    let result = Qmp::connect(Path::new("/nonexistent/byteport/qmp.sock")).await;
    assert!(
        matches!(result, Err(QmpError::Connect { .. })),
        "{result:?}"
    );
}

#[test]
fn handles_and_their_futures_cross_tasks() {
    fn send_sync<T: Send + Sync>(_: &T) {}
    fn send<T: Send>(_: &T) {}
    let path = Path::new("/nonexistent");
    send(&Qmp::connect(path));
    send(&Qmp::connect_retry(path, PATIENCE));
    let _ = |qmp: Qmp| {
        send_sync(&qmp);
        send(&qmp.execute("x", None));
        send(&qmp.query_status());
        send(&qmp.quit());
        send(&qmp.closed());
    };
}
