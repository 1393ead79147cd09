//! The client against a real `qemu-system-x86_64` started with `-S` and no
//! guest: state changes, their events, and `quit`.
//!
//! Skips (saying so) when QEMU is not installed, unless
//! `BYTEPORT_REQUIRE_QEMU=1`, which turns a missing QEMU into a failure.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use byteport_qmp::{Event, Qmp, RunState};
use tokio::{process::Command, sync::broadcast, time};

const QEMU: &str = "qemu-system-x86_64";

/// Generous for TCG on a busy 2-core machine; every step takes milliseconds.
const STEP: Duration = Duration::from_secs(5);

fn find_on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

/// Waits for the next event called `name`, skipping others.
async fn expect_event(events: &mut broadcast::Receiver<Event>, name: &str) -> Event {
    time::timeout(STEP, async {
        loop {
            let event = events.recv().await.expect("event stream open");
            if event.name == name {
                return event;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {name} event within {STEP:?}"))
}

/// Removes the socket's directory even when the test fails.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test]
async fn drives_a_real_qemu() {
    let Some(qemu) = find_on_path(QEMU) else {
        if std::env::var("BYTEPORT_REQUIRE_QEMU").as_deref() == Ok("1") {
            panic!("{QEMU} not found on PATH and BYTEPORT_REQUIRE_QEMU=1");
        }
        // Written straight to stderr, not with eprintln!, so that the test
        // harness does not capture it: a skip must be visible.
        let _ = writeln!(
            std::io::stderr(),
            "SKIP: {QEMU} not found (set BYTEPORT_REQUIRE_QEMU=1 to fail instead)"
        );
        return;
    };

    let dir =
        TempDir(std::env::temp_dir().join(format!("byteport-qmp-real-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let socket = dir.0.join("qmp.sock");
    let mut child = Command::new(&qemu)
        .args([
            "-accel",
            "tcg",
            "-M",
            "pc",
            "-m",
            "64",
            "-nodefaults",
            "-display",
            "none",
            "-S",
        ])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", socket.display()))
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {}: {e}", qemu.display()));

    let qmp = Qmp::connect_retry(Path::new(&socket), STEP)
        .await
        .expect("connect to QEMU's QMP socket");
    assert!(
        qmp.greeting().version.qemu.major >= 7,
        "{:?}",
        qmp.greeting()
    );
    let mut events = qmp.subscribe();

    let status = qmp.query_status().await.unwrap();
    assert_eq!(status.status, RunState::Prelaunch);
    assert!(!status.running);

    qmp.cont().await.unwrap();
    expect_event(&mut events, "RESUME").await;
    let status = qmp.query_status().await.unwrap();
    assert_eq!(status.status, RunState::Running);
    assert!(status.running);

    qmp.stop().await.unwrap();
    let stop = expect_event(&mut events, "STOP").await;
    assert!(stop.timestamp.is_some());
    let status = qmp.query_status().await.unwrap();
    assert_eq!(status.status, RunState::Paused);
    assert!(!status.running);

    qmp.cont().await.unwrap();
    qmp.system_reset().await.unwrap();
    let reset = expect_event(&mut events, "RESET").await;
    assert_eq!(reset.data["guest"], false, "{reset:?}");
    assert_eq!(qmp.query_status().await.unwrap().status, RunState::Running);

    // QEMU errors come back as errors, and the connection survives them.
    let error = qmp.execute("no-such-command", None).await.unwrap_err();
    assert!(
        matches!(&error, byteport_qmp::QmpError::Command { class, .. } if class == "CommandNotFound"),
        "{error:?}"
    );

    qmp.quit().await.unwrap();
    time::timeout(STEP, qmp.closed())
        .await
        .expect("QMP closes after quit");
    let exit = time::timeout(STEP, child.wait())
        .await
        .expect("QEMU exits after quit")
        .unwrap();
    assert!(exit.success(), "{exit}");
    assert!(qmp.is_closed());
}
