//! The agent and the host client talking over a socketpair on this machine:
//! the whole protocol, real child processes, no guest.

use std::os::unix::net::UnixStream as StdUnixStream;
use std::thread;
use std::time::Duration;

use byteport_guest::agent::{self, OnEof};
use byteport_guest::host::{ExecEvent, ExecRequest, GuestConn, GuestError, Ready};
use byteport_guest::proto::{Message, write_frame};

const T: Duration = Duration::from_secs(10);

/// An agent serving one end of a socketpair in a thread, a client on the other.
fn pair() -> (GuestConn, thread::JoinHandle<std::io::Result<()>>) {
    let (guest, host) = StdUnixStream::pair().expect("socketpair");
    let writer = guest.try_clone().expect("dup");
    let agent = thread::spawn(move || agent::serve(guest, writer, OnEof::Return));
    host.set_nonblocking(true).expect("nonblocking");
    let host = tokio::net::UnixStream::from_std(host).expect("tokio socket");
    let (r, w) = host.into_split();
    (GuestConn::new(r, w), agent)
}

fn sh(script: &str) -> ExecRequest {
    ExecRequest::new(["sh", "-c", script])
}

#[tokio::test]
async fn ready_comes_unasked_and_on_hello() {
    let (conn, _agent) = pair();
    let ready = conn.hello(T).await.expect("ready");
    assert_eq!(ready.version, agent::VERSION);
    assert!(conn.ready().is_some());
    assert!(conn.ping(T).await.expect("pong") < T);
}

#[tokio::test]
async fn exec_reports_output_and_exit_code() {
    let (conn, _agent) = pair();
    let out = conn
        .exec_output(sh("echo out; echo err >&2; exit 3"))
        .await
        .expect("exec");
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");
    assert_eq!((out.code, out.signal), (Some(3), None));
    assert!(!out.success());
}

#[tokio::test]
async fn env_and_cwd_are_applied() {
    let (conn, _agent) = pair();
    let req = ExecRequest {
        env: vec![("GREETING".into(), "hi there".into())],
        cwd: Some("/".into()),
        ..sh("echo \"$GREETING\"; pwd")
    };
    let out = conn.exec_output(req).await.expect("exec");
    assert_eq!(out.stdout, b"hi there\n/\n");
    assert!(out.success());
}

#[tokio::test]
async fn missing_command_is_an_exec_error() {
    let (conn, _agent) = pair();
    let err = conn
        .exec_output(ExecRequest::new(["/nonexistent/byteport-test"]))
        .await
        .expect_err("no such program");
    assert!(
        matches!(&err, GuestError::Exec(m) if m.contains("/nonexistent/byteport-test")),
        "{err:?}"
    );
    let err = conn
        .exec_output(ExecRequest::default())
        .await
        .expect_err("empty argv");
    assert!(matches!(err, GuestError::Exec(_)), "{err:?}");
}

#[tokio::test]
async fn stdin_flows_through_and_eof_ends_it() {
    let (conn, _agent) = pair();
    let session = conn
        .exec(ExecRequest {
            stdin: true,
            ..ExecRequest::new(["sh", "-c", "wc -c"])
        })
        .await
        .expect("exec");
    // More than one frame's worth.
    let data = vec![b'x'; 200_000];
    session.write_stdin(&data).await.expect("stdin");
    session.close_stdin().await.expect("eof");
    let out = session.output().await.expect("output");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "200000");
    assert!(out.success());
}

#[tokio::test]
async fn large_output_arrives_whole_and_in_order() {
    let (conn, _agent) = pair();
    let out = conn.exec_output(sh("seq 1 100000")).await.expect("exec");
    let expected: String = (1..=100_000).map(|i| format!("{i}\n")).collect();
    assert_eq!(out.stdout.len(), expected.len());
    assert!(out.stdout == expected.as_bytes());
}

#[tokio::test]
async fn concurrent_execs_do_not_mix() {
    let (conn, _agent) = pair();
    let runs = (0..8).map(|i| {
        let conn = conn.clone();
        async move {
            conn.exec_output(sh(&format!("sleep 0.2; echo {i}; exit {i}")))
                .await
                .expect("exec")
        }
    });
    let outs = futures_join_all(runs).await;
    for (i, out) in outs.into_iter().enumerate() {
        assert_eq!(out.stdout, format!("{i}\n").as_bytes());
        assert_eq!(out.code, Some(i as i32));
    }
}

#[tokio::test]
async fn kill_and_signals_end_the_process() {
    let (conn, _agent) = pair();
    let session = conn
        .exec(ExecRequest::new(["sleep", "30"]))
        .await
        .expect("exec");
    session.kill().await.expect("kill");
    let out = tokio::time::timeout(T, session.output())
        .await
        .expect("ended")
        .expect("exit");
    assert_eq!((out.code, out.signal), (None, Some(9)));

    let session = conn
        .exec(ExecRequest::new(["sleep", "30"]))
        .await
        .expect("exec");
    session.signal(15).await.expect("term");
    let out = tokio::time::timeout(T, session.output())
        .await
        .expect("ended")
        .expect("exit");
    // SIGTERM through the `kill` command, or SIGKILL where there is none.
    assert!(matches!(out.signal, Some(15) | Some(9)), "{out:?}");
}

#[tokio::test]
async fn closing_the_connection_ends_open_sessions() {
    let (conn, agent) = pair();
    let mut session = conn
        .exec(ExecRequest::new(["sleep", "30"]))
        .await
        .expect("exec");
    conn.close();
    assert!(conn.is_closed());
    let ev = tokio::time::timeout(T, session.events.recv())
        .await
        .expect("an event");
    assert!(matches!(ev, Some(ExecEvent::Error(_))), "{ev:?}");
    assert!(matches!(
        conn.exec(ExecRequest::new(["true"])).await,
        Err(GuestError::Closed)
    ));
    assert!(matches!(conn.hello(T).await, Err(GuestError::Closed)));
    drop(session);
    drop(conn);
    // The agent sees end-of-file once every handle is gone.
    tokio::task::spawn_blocking(move || agent.join())
        .await
        .expect("join")
        .expect("agent thread")
        .expect("agent ok");
}

#[tokio::test]
async fn agent_going_away_ends_sessions_with_an_error() {
    let (guest, host) = StdUnixStream::pair().expect("socketpair");
    host.set_nonblocking(true).expect("nonblocking");
    let host = tokio::net::UnixStream::from_std(host).expect("tokio socket");
    let (r, w) = host.into_split();
    let conn = GuestConn::new(r, w);
    let mut session = conn.exec(ExecRequest::new(["true"])).await.expect("exec");
    drop(guest);
    let ev = tokio::time::timeout(T, session.events.recv())
        .await
        .expect("an event");
    assert!(matches!(ev, Some(ExecEvent::Error(_))), "{ev:?}");
    assert!(conn.is_closed());
}

#[tokio::test]
async fn a_restarted_agent_ends_open_sessions() {
    let (guest, host) = StdUnixStream::pair().expect("socketpair");
    let mut impostor = guest.try_clone().expect("dup");
    let writer = guest.try_clone().expect("dup");
    thread::spawn(move || agent::serve(guest, writer, OnEof::Return));
    host.set_nonblocking(true).expect("nonblocking");
    let (r, w) = tokio::net::UnixStream::from_std(host)
        .expect("tokio socket")
        .into_split();
    let conn = GuestConn::new(r, w);
    let first = conn.hello(T).await.expect("ready");
    assert!(!first.instance.is_empty());
    let mut session = conn
        .exec(ExecRequest::new(["sleep", "30"]))
        .await
        .expect("exec");
    // The agent has read the ExecStart once it answers a later Ping.
    conn.ping(T).await.expect("pong");

    // A new agent announces itself on the same port.
    let ready = Message::Ready(Ready {
        instance: "another-run".into(),
        ..first.clone()
    });
    write_frame(&mut impostor, &ready.into_frame(0).expect("frame")).expect("write");
    let ev = tokio::time::timeout(T, session.events.recv())
        .await
        .expect("an event");
    assert!(
        matches!(&ev, Some(ExecEvent::Error(m)) if m.contains("restarted")),
        "{ev:?}"
    );
    assert_eq!(conn.ready().expect("ready").instance, "another-run");
    // The same instance again is no restart: new sessions keep working.
    let out = conn.exec_output(sh("echo still")).await.expect("exec");
    assert_eq!(out.stdout, b"still\n");
}

/// Joins futures without pulling in the futures crate.
async fn futures_join_all<F, O>(futs: impl IntoIterator<Item = F>) -> Vec<O>
where
    F: std::future::Future<Output = O> + Send + 'static,
    O: Send + 'static,
{
    let handles: Vec<_> = futs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.expect("task"));
    }
    out
}

/// What the host collects of a command's output for itself is bounded: a
/// guest that writes without end gets its command killed and an error.
#[tokio::test]
async fn collected_output_is_bounded() {
    let (conn, _agent) = pair();
    let r = conn.exec_output(sh("head -c 3000000 /dev/zero")).await;
    match r {
        Err(byteport_guest::host::GuestError::Exec(m)) => assert!(m.contains("more than"), "{m}"),
        other => panic!("expected the cap to end it: {other:?}"),
    }
}

#[tokio::test]
async fn a_guest_flooding_control_frames_is_held_to_a_rate() {
    use byteport_guest::proto::{Frame, Kind, encode};
    use tokio::io::AsyncWriteExt;
    // A "guest" that sends Ready after Ready as fast as it can.
    let (guest, host) = tokio::net::UnixStream::pair().expect("socketpair");
    let (r, w) = host.into_split();
    let conn = GuestConn::new(r, w);
    let (_guest_r, mut guest_w) = guest.into_split();
    let ready = br#"{"version":"flood","hostname":"g","uptime_ms":1,"instance":"a"}"#.to_vec();
    let mut burst = Vec::new();
    for _ in 0..2000 {
        burst.extend(encode(&Frame::new(0, Kind::Ready, ready.clone()).unwrap()));
    }
    guest_w.write_all(&burst).await.unwrap();
    let deadline = tokio::time::Instant::now() + T;
    while conn.dropped_frames() < 1800 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "dropped {}",
            conn.dropped_frames()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // What got through was read as usual.
    assert_eq!(conn.ready().map(|r| r.version), Some("flood".to_owned()));
}
