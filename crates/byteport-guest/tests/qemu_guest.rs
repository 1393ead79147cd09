//! Checks a running guest through its agent socket.
//!
//! Ignored by default because it needs a booted guest: it does not start
//! QEMU. Boot the `tiny` image (see images/README.md) with
//! `-chardev socket,path=SOCK,server=on,wait=off,id=ag` and run
//!
//! ```text
//! BYTEPORT_GUEST_SOCK=SOCK cargo test -p byteport-guest --features host \
//!     --test qemu_guest -- --ignored --nocapture
//! ```

use std::path::PathBuf;
use std::time::{Duration, Instant};

use byteport_guest::host::{ExecEvent, ExecRequest, GuestConn};

fn socket() -> PathBuf {
    std::env::var_os("BYTEPORT_GUEST_SOCK")
        .map(PathBuf::from)
        .expect("set BYTEPORT_GUEST_SOCK to the guest's agent socket")
}

async fn connect() -> GuestConn {
    let path = socket();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match GuestConn::connect_unix(&path).await {
            Ok(c) => return c,
            Err(e) if Instant::now() < deadline => {
                eprintln!("waiting for {}: {e}", path.display());
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("connecting to {}: {e}", path.display()),
        }
    }
}

#[tokio::test]
#[ignore = "needs a booted guest: set BYTEPORT_GUEST_SOCK (see the module docs)"]
async fn guest_runs_commands_and_survives_reconnects() {
    let start = Instant::now();
    let conn = connect().await;
    let ready = conn
        .hello(Duration::from_secs(120))
        .await
        .expect("the agent answers Hello");
    eprintln!("ready after {:?}: {ready:?}", start.elapsed());
    eprintln!("ping {:?}", conn.ping(Duration::from_secs(5)).await);

    let uname = conn
        .exec_output(ExecRequest::new(["uname", "-a"]))
        .await
        .expect("uname");
    eprintln!(
        "uname -a: {}",
        String::from_utf8_lossy(&uname.stdout).trim()
    );
    assert!(uname.success());
    assert!(uname.stdout.starts_with(b"Linux "));

    let t = Instant::now();
    let out = conn
        .exec_output(ExecRequest::new([
            "sh",
            "-c",
            "echo out; echo err >&2; exit 3",
        ]))
        .await
        .expect("sh");
    eprintln!("sh -c round trip {:?}", t.elapsed());
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");
    assert_eq!(out.code, Some(3));

    // Two at once: both take a second, together not much more.
    let t = Instant::now();
    let a = conn.exec_output(ExecRequest::new(["sh", "-c", "sleep 1; echo a"]));
    let b = conn.exec_output(ExecRequest::new(["sh", "-c", "sleep 1; echo b"]));
    let (a, b) = tokio::join!(a, b);
    eprintln!("two concurrent 1 s execs took {:?}", t.elapsed());
    assert_eq!(a.expect("a").stdout, b"a\n");
    assert_eq!(b.expect("b").stdout, b"b\n");
    assert!(t.elapsed() < Duration::from_millis(1900));

    // A process left running is hung up when the host goes away.
    let orphan = conn
        .exec(ExecRequest::new(["sleep", "600"]))
        .await
        .expect("sleep");
    drop(orphan);
    conn.close();
    drop(conn);

    let t = Instant::now();
    let conn = connect().await;
    let again = conn
        .hello(Duration::from_secs(10))
        .await
        .expect("Ready again after reconnecting");
    eprintln!("reconnect to Ready {:?}: {again:?}", t.elapsed());
    assert!(again.uptime_ms >= ready.uptime_ms);
    let ps = conn
        .exec_output(ExecRequest::new(["sh", "-c", "pidof sleep || true"]))
        .await
        .expect("pidof");
    assert!(ps.stdout.is_empty(), "sleep survived the hangup: {ps:?}");
    let out = conn
        .exec_output(ExecRequest::new(["hostname"]))
        .await
        .expect("hostname");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), ready.hostname);

    // The agent dies under an open connection: init starts it again, and its
    // Ready ends the sessions the old one had.
    let before = conn.hello(Duration::from_secs(10)).await.expect("ready");
    let mut victim = conn
        .exec(ExecRequest::new(["sleep", "5"]))
        .await
        .expect("sleep");
    let _suicide = conn
        .exec(ExecRequest::new([
            "sh",
            "-c",
            "kill -9 $(pidof byteport-guest)",
        ]))
        .await
        .expect("kill the agent");
    let t = Instant::now();
    let ev = tokio::time::timeout(Duration::from_secs(60), victim.events.recv())
        .await
        .expect("the session ends");
    eprintln!("agent restart noticed after {:?}: {ev:?}", t.elapsed());
    assert!(matches!(ev, Some(ExecEvent::Error(_))), "{ev:?}");
    let after = conn.hello(Duration::from_secs(10)).await.expect("ready");
    assert_ne!(after.instance, before.instance);
    let out = conn
        .exec_output(ExecRequest::new(["true"]))
        .await
        .expect("exec after the restart");
    assert!(out.success());
}
