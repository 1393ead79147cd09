//! HTTPS with an operator's own CA, as a private cloud runs it: a server
//! whose certificate a test CA signed, a node that joins and heartbeats
//! over it (`--ca-cert`), and the CLI logging in, exec'ing and following a
//! real guest's console over `https://` and `wss://`.

use byteport_testkit::daemon::{Daemon, TestCa, tiny_or_skip};
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_byteportd");

fn cli() -> std::path::PathBuf {
    let p = Path::new(BIN).with_file_name("byteport");
    assert!(
        p.exists(),
        "{} is missing: build the workspace (cargo build) first",
        p.display()
    );
    p
}

/// `byteport ARGS` with its own config file; (status, stdout, stderr).
fn byteport(config: &Path, args: &[&str], stdin: &str) -> (Option<i32>, String, String) {
    let o = byteport_testkit::byteport(&cli(), config, args, Some(stdin));
    (Some(o.code).filter(|c| *c >= 0), o.stdout, o.stderr)
}

#[test]
fn a_private_ca_carries_the_cli_the_node_and_their_streams() {
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().to_owned();
    let ca = TestCa::new(&work);
    let ca_cert = ca.ca_cert.clone();
    // The node joined over HTTPS: start_split_tls waits for it.
    let d = Daemon::start_split_tls(Path::new(BIN), ca);
    assert!(d.url.starts_with("https://127.0.0.1:"), "{}", d.url);

    // It keeps heartbeating over HTTPS.
    let first = d.api.get("/v1/nodes").unwrap()[0]["last_heartbeat_at"].clone();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let n = &d.api.get("/v1/nodes").unwrap()[0];
        if n["status"] == "online" && n["last_heartbeat_at"] != first {
            break;
        }
        assert!(Instant::now() < deadline, "no new heartbeat: {n}");
        std::thread::sleep(Duration::from_millis(200));
    }

    // A node without the CA cannot join, and says what to do.
    let t = d
        .api
        .post("/v1/node-join-tokens", serde_json::json!({}))
        .unwrap();
    let o = Command::new(BIN)
        .args([
            "node",
            "--server",
            &d.url,
            "--name",
            "stranger",
            "--join-token",
        ])
        .arg(t["token"].as_str().unwrap())
        .arg("--data-dir")
        .arg(work.join("stranger"))
        .env_remove("BYTEPORT_CA_CERT")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("--ca-cert"), "{err}");

    // The CLI: refused without the CA, with the fix in the message; logged
    // in with it, and later commands trust it without the flag.
    let config = work.join("cli.json");
    let pw = "admin-password\n";
    let login = [
        "login",
        "--url",
        &d.url,
        "--user",
        "admin",
        "--password-stdin",
    ];
    let (code, _, err) = byteport(&config, &login, pw);
    assert_ne!(code, Some(0));
    assert!(
        err.contains("--ca-cert") && err.contains("UnknownIssuer"),
        "{err}"
    );
    let ca_arg = ca_cert.display().to_string();
    let with_ca = [&login[..], &["--ca-cert", &ca_arg]].concat();
    let (code, out, err) = byteport(&config, &with_ca, pw);
    assert_eq!(code, Some(0), "{out}{err}");
    let (code, out, err) = byteport(&config, &["node", "list"], "");
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("node-1") && out.contains("online"), "{out}");

    let Some(img) = tiny_or_skip("tls exec and console") else {
        return;
    };
    d.import_tiny(&img);
    let id = d.create_vm("secure");
    d.wait(&id, "running", 180).expect("running");

    // Exec over HTTPS (through the node's channel over wss://).
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (code, out, err) = byteport(
            &config,
            &["vm", "exec", "secure", "--", "echo", "over-tls"],
            "",
        );
        if code == Some(0) {
            assert_eq!(out.trim(), "over-tls");
            break;
        }
        assert!(Instant::now() < deadline, "exec never worked: {err}");
        std::thread::sleep(Duration::from_secs(1));
    }

    // The live console over wss://: typed lines reach the guest's shell.
    let mut follow = Command::new(cli())
        .args(["vm", "console", "secure", "--follow"])
        .env("BYTEPORT_CONFIG", &config)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut stdout = follow.stdout.take().unwrap();
    let s = seen.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            s.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    let mut keys = follow.stdin.take().unwrap();
    let deadline = Instant::now() + Duration::from_secs(40);
    let answered = loop {
        let _ = keys.write_all(b"echo tls-$((6*7))\n");
        std::thread::sleep(Duration::from_secs(2));
        if String::from_utf8_lossy(&seen.lock().unwrap()).contains("tls-42") {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
    };
    let _ = follow.kill();
    let o = follow.wait_with_output().unwrap();
    assert!(
        answered,
        "the shell's answer never came over wss://: {}{}",
        String::from_utf8_lossy(&seen.lock().unwrap()),
        String::from_utf8_lossy(&o.stderr)
    );
}
