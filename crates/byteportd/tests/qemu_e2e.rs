//! End-to-end tests with real guests: `byteportd` processes, real QEMU
//! (KVM where it works, TCG here), the `tiny` image with its guest agent.
//! They skip, saying why, when QEMU or the image is missing, unless
//! `BYTEPORT_REQUIRE_QEMU=1` (set by `cargo xtask test`), where they fail.

use byteport_testkit::daemon::{
    Daemon, Libvirtd, NODE_TIMEOUT_SECS, alive, qemus_under, tiny_or_skip,
};
use serde_json::{Value, json};
use std::path::Path;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_byteportd");
/// Boots under TCG on a busy 2-core host can take a while.
const BOOT_SECS: u64 = 180;

fn cpu_ticks(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = s.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields after the name: state is [0]; utime [11], stime [12].
    f.get(11).and_then(|u| u.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|u| u.parse::<u64>().ok()).unwrap_or(0)
}

fn port_free(port: u64) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port as u16)).is_ok()
}

/// The admin's request for a VM's live console WebSocket.
fn console_request(d: &Daemon, id: &str) -> tungstenite::handshake::client::Request {
    use tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://127.0.0.1:{}/v1/vms/{id}/console/ws", d.port)
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", d.api.token.as_deref().unwrap())
            .parse()
            .unwrap(),
    );
    req
}

/// Opens a VM's live console with a small receive buffer and never reads
/// it, as a stuck browser tab would.
fn console_nobody_reads(d: &Daemon, id: &str) -> tungstenite::WebSocket<std::net::TcpStream> {
    let req = console_request(d, id);
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], d.port).into();
    sock.connect(&addr.into()).unwrap();
    let (ws, _) = tungstenite::client(req, std::net::TcpStream::from(sock)).expect("websocket");
    ws
}

fn up(d: &Daemon, name: &str) -> String {
    let id = d.create_vm(name);
    let v = d
        .wait(&id, "running", BOOT_SECS)
        .expect("the VM reaches running");
    assert_eq!(v["ready_by"], "agent");
    assert!(v["agent_version"].is_string(), "the agent said ready: {v}");
    id
}

#[test]
fn a_real_guest_runs_execs_pauses_restarts_stops_and_is_deleted_cleanly() {
    lifecycle("qemu");
}

/// The same lifecycle under the microvm engine (`-machine microvm`:
/// virtio-mmio, no firmware, ACPI's GED for the power button).
#[test]
fn a_microvm_guest_runs_execs_pauses_restarts_stops_and_is_deleted_cleanly() {
    lifecycle("microvm");
}

/// The same lifecycle under the libvirt engine: a domain XML the node
/// writes, started and driven by a libvirtd of this test's own.
#[test]
fn a_libvirt_guest_runs_execs_pauses_restarts_stops_and_is_deleted_cleanly() {
    if tiny_or_skip("lifecycle (libvirt)").is_none() {
        return;
    }
    let Some(lv) = Libvirtd::start("lifecycle (libvirt)") else {
        return;
    };
    lifecycle_with("libvirt", &[("BYTEPORT_LIBVIRT_URI", &lv.uri)]);
    // libvirtd holds no domain of it any more.
    let out = std::process::Command::new("virsh")
        .args(["-q", "-c", &lv.uri, "list", "--all", "--name"])
        .output()
        .expect("virsh list");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "",
        "domains left"
    );
}

fn lifecycle(engine: &str) {
    lifecycle_with(engine, &[]);
}

/// Create, exec, figures, console, port, pause, resume, an agent restart
/// that adopts the running guest, restart, stop, start and delete of one
/// `tiny` guest under `engine`, the daemon run with `envs`.
fn lifecycle_with(engine: &str, envs: &[(&str, &str)]) {
    let Some(img) = tiny_or_skip(&format!("lifecycle ({engine})")) else {
        return;
    };
    let mut d = Daemon::start_with_env(Path::new(BIN), envs);
    d.import_tiny(&img);
    let v = d
        .api
        .post(
            "/v1/vms",
            json!({"name": "life", "image": "tiny", "vcpus": 1, "memory_mib": 256,
                   "disk_gib": 1, "engine": engine}),
        )
        .expect("creating a VM");
    let id = v["id"].as_str().expect("an id").to_owned();
    let v = d
        .wait(&id, "running", BOOT_SECS)
        .expect("the VM reaches running");
    assert_eq!(v["ready_by"], "agent");
    assert_eq!(v["engine"], engine, "{v}");
    let pid = d.qemu_pid(&id).expect("QEMU's pid");
    let args = std::fs::read(format!("/proc/{pid}/cmdline")).expect("QEMU's command line");
    // libvirt names the machine by its version, and the guest after
    // its domain.
    let machine = match engine {
        "microvm" => "-machine\0microvm\0",
        "libvirt" => "-machine\0pc-i440fx-",
        _ => "-machine\0pc\0",
    };
    let args = String::from_utf8_lossy(&args);
    assert!(args.contains(machine), "{engine}: {args}");
    assert_eq!(
        args.contains(&format!("guest=bp-{id},")),
        engine == "libvirt",
        "{engine}: {args}"
    );
    // The database and the node's credential are their owner's only.
    {
        use std::os::unix::fs::PermissionsExt;
        for f in [d.dir.join("byteport.db"), d.dir.join("node/node.json")] {
            let mode = std::fs::metadata(&f).expect("exists").permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", f.display());
        }
    }

    // Exec: output, error output and the exit code come back.
    let (out, _, code) = d.exec(&id, &["uname", "-s"]).expect("exec");
    assert_eq!((out.trim(), code), ("Linux", Some(0)));
    let (out, err, code) = d
        .exec(&id, &["sh", "-c", "echo to-out; echo to-err >&2; exit 3"])
        .expect("exec");
    assert_eq!(
        (out.as_str(), err.as_str(), code),
        ("to-out\n", "to-err\n", Some(3))
    );
    let (out, _, _) = d
        .exec_with(
            &id,
            json!({"argv": ["cat"], "stdin_base64": "aGVsbG8gc3RkaW4=", "timeout_secs": 30}),
        )
        .expect("exec with stdin");
    assert_eq!(out, "hello stdin");

    // The node's figures for it: the QEMU process's own, from the host.
    let pid = d.qemu_pid(&id).expect("QEMU's pid");
    let deadline = Instant::now() + Duration::from_secs(30);
    let f = loop {
        if let Ok(v) = d.api.get(&format!("/v1/vms/{id}/stats"))
            && v["measured"]["cpu_percent"].is_number()
        {
            break v["measured"].clone();
        }
        assert!(Instant::now() < deadline, "no figures for a running VM");
        std::thread::sleep(Duration::from_millis(300));
    };
    let rss = f["memory_rss_mib"].as_u64().unwrap();
    // A 256 MiB guest: QEMU holds what the guest touched plus its own.
    assert!((16..=512).contains(&rss), "resident memory {rss} MiB: {f}");
    let cpu_ms = f["cpu_time_ms"].as_u64().unwrap();
    assert!(
        cpu_ms > 0 && cpu_ms <= cpu_ticks(pid) * 10,
        "CPU time {cpu_ms} ms against /proc's {} ms: {f}",
        cpu_ticks(pid) * 10
    );
    let pct = f["cpu_percent"].as_f64().unwrap();
    assert!((0.0..=200.0).contains(&pct), "{f}");
    assert!(f["uptime_secs"].as_u64().unwrap() < 600, "{f}");

    // The console shows the guest's boot through the API.
    let console = d
        .api
        .get_text(&format!("/v1/vms/{id}/console?bytes=65536"))
        .expect("console");
    assert!(
        console.contains("byteport-tiny: init done"),
        "console: {console}"
    );

    // One forward for ssh, on a port that is really taken.
    let v = d.vm(&id);
    let port = v["ports"][0]["host_port"]
        .as_u64()
        .expect("a forwarded port");
    assert_eq!(v["ports"][0]["guest_port"], 22);
    assert!(!port_free(port), "QEMU listens on the forwarded port");

    // Pause: QMP stopped the vCPUs (the process burns no CPU) and exec
    // does not answer until resume.
    let pid = d.qemu_pid(&id).expect("a pid");
    d.api
        .post(&format!("/v1/vms/{id}/pause"), json!({}))
        .expect("pause");
    d.wait(&id, "paused", 30).expect("paused");
    std::thread::sleep(Duration::from_millis(300));
    let t0 = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(1));
    let burned = cpu_ticks(pid) - t0;
    assert!(
        burned <= 10,
        "a paused guest used {burned} ticks of CPU in 1 s"
    );
    let exec_err = d
        .exec(&id, &["true"])
        .expect_err("exec refused while paused");
    assert!(exec_err.contains("paused"), "{exec_err}");
    d.api
        .post(&format!("/v1/vms/{id}/resume"), json!({}))
        .expect("resume");
    d.wait(&id, "running", 30).expect("running again");
    let (out, _, _) = d
        .exec(&id, &["echo", "after-resume"])
        .expect("exec after resume");
    assert_eq!(out, "after-resume\n");
    assert!(
        alive(pid) && d.qemu_pid(&id) == Some(pid),
        "the same QEMU ran on"
    );

    // The agent dies (kill -9) and comes back: it adopts the guest that
    // ran on meanwhile, the same process, and exec reaches it again.
    d.kill9();
    assert!(alive(pid), "{engine}: the guest outlives its agent");
    d.spawn();
    d.wait(&id, "running", 60)
        .expect("running after the agent restart");
    // Until the node's channel is back, exec says so (503), and until the
    // node has reconnected to the adopted guest's agent, it says that:
    // retry.
    let deadline = Instant::now() + Duration::from_secs(30);
    let out = loop {
        match d.exec(&id, &["echo", "adopted"]) {
            Ok((out, _, _)) => break out,
            Err(e)
                if (e.starts_with("503") || e.contains("guest agent is not connected"))
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("{engine}: exec after the agent restart: {e}"),
        }
    };
    assert_eq!(out, "adopted\n");
    assert_eq!(
        d.qemu_pid(&id),
        Some(pid),
        "{engine}: the same QEMU, adopted"
    );

    // Restart: a reset; the guest boots again and its agent says ready.
    d.api
        .post(&format!("/v1/vms/{id}/restart"), json!({}))
        .expect("restart");
    d.wait(&id, "running", BOOT_SECS)
        .expect("running after restart");
    let console = d
        .api
        .get_text(&format!("/v1/vms/{id}/console?bytes=1000000"))
        .expect("console");
    assert!(
        console.matches("byteport-tiny: init done").count() >= 2,
        "booted twice"
    );
    let (_, _, code) = d.exec(&id, &["true"]).expect("exec after restart");
    assert_eq!(code, Some(0));

    // Stop: the guest powers itself off on the power button; the disk
    // stays.
    d.api
        .post(&format!("/v1/vms/{id}/stop"), json!({}))
        .expect("stop");
    d.wait(&id, "stopped", 60).expect("stopped");
    assert!(
        !d.log().contains("ignored the power button"),
        "{engine}: the guest powered off by itself"
    );
    assert!(!alive(pid), "QEMU {pid} is gone after stop");
    assert!(
        d.vm_dir(&id).join("disk.qcow2").exists(),
        "the disk is kept"
    );

    // Start again: a new process on the same disk and port.
    d.api
        .post(&format!("/v1/vms/{id}/start"), json!({}))
        .expect("start");
    let v = d
        .wait(&id, "running", BOOT_SECS)
        .expect("running after start");
    assert_eq!(
        v["ports"][0]["host_port"].as_u64(),
        Some(port),
        "the port is kept"
    );
    let pid2 = d.qemu_pid(&id).expect("a new pid");
    assert_ne!(pid, pid2);

    // Delete: no process, no file, no port left.
    d.api.delete(&format!("/v1/vms/{id}")).expect("delete");
    d.wait(&id, "deleted", 60).expect("deleted");
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(pid2) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!alive(pid2), "QEMU is gone after delete");
    assert!(!d.vm_dir(&id).exists(), "the VM's directory is removed");
    assert!(port_free(port), "the forwarded port is free again");
    assert!(qemus_under(&d.dir).is_empty());
}

#[test]
fn five_guests_run_at_once_on_one_node() {
    let Some(img) = tiny_or_skip("five guests") else {
        return;
    };
    let d = Daemon::start(Path::new(BIN));
    d.import_tiny(&img);
    let ids: Vec<String> = (0..5).map(|i| d.create_vm(&format!("many-{i}"))).collect();
    let mut ports = std::collections::HashSet::new();
    for (i, id) in ids.iter().enumerate() {
        let v = d.wait(id, "running", BOOT_SECS * 2).expect("running");
        assert!(
            ports.insert(v["ports"][0]["host_port"].as_u64()),
            "ports differ"
        );
        let (out, _, code) = d.exec(id, &["hostname"]).expect("exec");
        assert_eq!((out.trim(), code), (format!("many-{i}").as_str(), Some(0)));
    }
    assert_eq!(qemus_under(&d.dir).len(), 5);
    for id in &ids {
        d.api.delete(&format!("/v1/vms/{id}")).expect("delete");
    }
    for id in &ids {
        d.wait(id, "deleted", 60).expect("deleted");
    }
    assert!(d.no_qemu_left(5), "no QEMU left");
}

#[test]
fn a_killed_node_agent_goes_offline_and_on_restart_readopts_its_guests_and_cleans_up() {
    let Some(img) = tiny_or_skip("agent restart") else {
        return;
    };
    let mut d = Daemon::start_split(Path::new(BIN));
    d.import_tiny(&img);
    let a = up(&d, "keep-a");
    let b = up(&d, "keep-b");
    let gone = up(&d, "gone");
    let (pa, pb, pg) = (
        d.qemu_pid(&a).expect("pid"),
        d.qemu_pid(&b).expect("pid"),
        d.qemu_pid(&gone).expect("pid"),
    );
    d.kill9_node();
    let killed = Instant::now();
    // The node goes offline after its timeout and its VMs show `unknown`.
    d.wait(&a, "unknown", 30)
        .expect("unknown once the node is offline");
    let seen = killed.elapsed();
    assert!(
        seen < Duration::from_secs(NODE_TIMEOUT_SECS + 5),
        "noticed after {seen:?}"
    );
    let nodes = d.api.get("/v1/nodes").expect("nodes");
    assert_eq!(nodes[0]["status"], "offline", "{nodes}");
    assert!(
        alive(pa) && alive(pb) && alive(pg),
        "guests outlive their agent"
    );
    // Deleted while the agent is away.
    d.api.delete(&format!("/v1/vms/{gone}")).expect("delete");
    d.spawn_node();
    d.wait(&gone, "deleted", 60)
        .expect("the deletion is carried out");
    assert!(!alive(pg), "the deleted VM's QEMU was stopped");
    assert!(!d.vm_dir(&gone).exists(), "its files are gone");
    for (id, pid) in [(&a, pa), (&b, pb)] {
        let v = d.wait(id, "running", 60).expect("still running");
        assert_eq!(v["state"], "running");
        assert_eq!(d.qemu_pid(id), Some(pid), "the same process");
        let (_, _, code) = d.exec(id, &["true"]).expect("exec after re-adoption");
        assert_eq!(code, Some(0));
    }
    assert_eq!(
        qemus_under(&d.dir).len(),
        2,
        "no duplicate QEMU: {}",
        d.node_log()
    );
    let nodes = d.api.get("/v1/nodes").expect("nodes");
    assert_eq!(nodes[0]["status"], "online", "{nodes}");
}

#[test]
fn a_qemu_killed_behind_the_agents_back_shows_as_an_error_with_the_reason() {
    let Some(img) = tiny_or_skip("crash") else {
        return;
    };
    let d = Daemon::start(Path::new(BIN));
    d.import_tiny(&img);
    let id = up(&d, "crashy");
    let pid = d.qemu_pid(&id).expect("pid");
    let killed = Instant::now();
    std::process::Command::new("kill")
        .arg("-9")
        .arg(pid.to_string())
        .status()
        .expect("kill");
    let v = d.wait(&id, "error", 20).expect("the VM shows the failure");
    let seen = killed.elapsed();
    assert_eq!(v["state"], "error", "{v}");
    let reason = v["state_reason"].as_str().unwrap_or_default();
    assert!(reason.contains("signal 9"), "reason: {reason}");
    assert!(seen < Duration::from_secs(10), "noticed after {seen:?}");
    // Its QEMU is gone: only its disk stays reserved, and a start takes
    // its vCPUs and memory again.
    let node = &d.api.get("/v1/nodes").expect("nodes")[0];
    assert_eq!(node["reserved"]["vcpus"], 0, "{node}");
    assert_eq!(node["reserved"]["memory_mib"], 0, "{node}");
    assert_eq!(node["reserved"]["disk_gib"], v["disk_gib"], "{node}");
    d.api
        .post(&format!("/v1/vms/{id}/start"), serde_json::json!({}))
        .expect("start again");
    let node = &d.api.get("/v1/nodes").expect("nodes")[0];
    assert_eq!(node["reserved"]["vcpus"], v["vcpus"], "{node}");
    d.wait(&id, "running", 60).expect("running again");
}

/// The `byteport` binary built beside this test's `byteportd`.
fn cli_bin() -> Option<std::path::PathBuf> {
    let dir = Path::new(BIN).parent()?;
    let p = dir.join("byteport");
    p.exists().then_some(p)
}

#[test]
fn the_cli_creates_execs_and_reads_the_console_of_a_real_guest() {
    let Some(img) = tiny_or_skip("cli") else {
        return;
    };
    let Some(cli) = cli_bin() else {
        assert!(
            std::env::var("BYTEPORT_REQUIRE_QEMU").as_deref() != Ok("1"),
            "the byteport binary is not built beside byteportd"
        );
        eprintln!("SKIP: cli: build the workspace (`cargo build`) so that `byteport` exists");
        return;
    };
    let d = Daemon::start(Path::new(BIN));
    let config = d.dir.join("cli.json");
    let run = |args: &[&str], stdin: Option<&str>| {
        use std::io::Write;
        let mut c = std::process::Command::new(&cli)
            .args(args)
            .env("BYTEPORT_CONFIG", &config)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("running byteport");
        if let Some(s) = stdin {
            c.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
        }
        drop(c.stdin.take());
        let out = c.wait_with_output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, _, err) = run(
        &[
            "login",
            "--url",
            &d.url,
            "--user",
            "admin",
            "--password-stdin",
        ],
        Some("admin-password"),
    );
    assert_eq!(code, Some(0), "login: {err}");
    let manifest = img.join("manifest.json").display().to_string();
    let (code, out, err) = run(&["image", "import", "--manifest", &manifest], None);
    assert_eq!(code, Some(0), "import: {out}{err}");
    let (code, out, err) = run(
        &[
            "vm",
            "create",
            "cli-vm",
            "--image",
            "tiny",
            "--vcpus",
            "1",
            "--memory-mib",
            "256",
            "--disk-gib",
            "1",
            "--wait",
            "--timeout",
            "180",
        ],
        None,
    );
    assert_eq!(code, Some(0), "create: {out}{err}");
    assert!(out.contains("running"), "{out}");
    let (code, out, _) = run(
        &[
            "vm",
            "exec",
            "cli-vm",
            "--",
            "sh",
            "-c",
            "echo from-guest; exit 7",
        ],
        None,
    );
    assert_eq!(
        (code, out.as_str()),
        (Some(7), "from-guest\n"),
        "the exit code is the command's"
    );
    let (code, out, _) = run(&["vm", "show", "cli-vm"], None);
    assert_eq!(code, Some(0));
    // tiny has no SSH server: the page says how to get in instead.
    assert!(!out.contains("ssh -p "), "{out}");
    assert!(
        out.contains("no SSH login in this image: byteport vm exec cli-vm"),
        "{out}"
    );
    let (code, out, _) = run(&["vm", "console", "cli-vm"], None);
    assert_eq!(code, Some(0));
    assert!(out.contains("byteport-tiny: init done"), "{out}");

    // The live console over the WebSocket: keystrokes reach the guest's
    // shell on ttyS0 and its answer comes back.
    let id = d.api.get("/v1/vms?name=cli-vm").unwrap()["items"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let req = console_request(&d, &id);
    let tcp = std::net::TcpStream::connect(("127.0.0.1", d.port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let (mut ws, _) = tungstenite::client(req, tcp).expect("websocket");
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut sent = Instant::now() - Duration::from_secs(10);
    while Instant::now() < deadline {
        if sent.elapsed() > Duration::from_secs(3) {
            ws.send(tungstenite::Message::text("echo ws-$((6*7))\n"))
                .unwrap();
            sent = Instant::now();
        }
        match ws.read() {
            Ok(tungstenite::Message::Binary(b)) => seen.extend_from_slice(&b),
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => panic!("console socket: {e}"),
        }
        if String::from_utf8_lossy(&seen).contains("ws-42") {
            break;
        }
    }
    assert!(
        String::from_utf8_lossy(&seen).contains("ws-42"),
        "the shell's answer never came: {}",
        String::from_utf8_lossy(&seen)
    );
    // The session is in the audit log: who opened it, and when it closed.
    let _ = ws.close(None);
    drop(ws);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let a = d.api.get("/v1/audit?limit=50").expect("audit");
        let of = |action: &str| {
            a["items"].as_array().unwrap().iter().any(|e| {
                e["action"] == action && e["actor"] == "admin" && e["target_id"] == id.as_str()
            })
        };
        if of("vm_console_open") && of("vm_console_close") {
            break;
        }
        assert!(Instant::now() < deadline, "no console session audited: {a}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn three_real_nodes_spread_a_group_and_survive_one_agent_dying() {
    let Some(img) = tiny_or_skip("three nodes") else {
        return;
    };
    let mut d = Daemon::start_split(Path::new(BIN));
    d.spawn_extra_node(1);
    d.spawn_extra_node(2);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let nodes = d.api.get("/v1/nodes").expect("nodes");
        let online = nodes
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["status"] == "online")
            .count();
        if online == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "3 nodes online: {nodes}");
        std::thread::sleep(Duration::from_millis(200));
    }
    d.import_tiny(&img);
    // One VM of the group per node (anti-affinity), booted for real.
    let ids: Vec<String> = (0..3)
        .map(|i| {
            let v = d
                .api
                .post(
                    "/v1/vms",
                    json!({"name": format!("g-{i}"), "image": "tiny", "vcpus": 1, "memory_mib": 256,
                           "disk_gib": 1, "placement": {"group": "g"}}),
                )
                .expect("create");
            v["id"].as_str().unwrap().to_owned()
        })
        .collect();
    let mut by_node = std::collections::HashMap::new();
    for id in &ids {
        let v = d.wait(id, "running", BOOT_SECS * 2).expect("running");
        by_node.insert(v["node_id"].as_str().unwrap().to_owned(), id.clone());
    }
    assert_eq!(by_node.len(), 3, "one per node");
    // The VM on node-2 (extra node 1): kill that agent.
    let nodes = d.api.get("/v1/nodes").expect("nodes");
    let n2 = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == "node-2")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let victim = by_node[&n2].clone();
    let pid = std::fs::read_to_string(d.dir.join("node1/vms").join(&victim).join("qemu.pid"))
        .expect("pidfile")
        .trim()
        .parse::<u32>()
        .unwrap();
    d.kill9_extra_node(1);
    d.wait(&victim, "unknown", 30)
        .expect("unknown while its node is away");
    for id in ids.iter().filter(|i| **i != victim) {
        assert_eq!(
            d.vm(id)["state"],
            "running",
            "the other nodes' VMs are untouched"
        );
    }
    // Nothing new lands on the offline node.
    let v = d
        .api
        .post(
            "/v1/vms",
            json!({"name": "late", "image": "tiny", "vcpus": 1, "memory_mib": 256, "disk_gib": 1}),
        )
        .expect("create");
    assert_ne!(v["node_id"].as_str(), Some(n2.as_str()));
    d.api
        .delete(&format!("/v1/vms/{}", v["id"].as_str().unwrap()))
        .expect("delete");
    // Back: the same QEMU, running again, no duplicate.
    d.spawn_extra_node(1);
    d.wait(&victim, "running", 60).expect("running again");
    assert!(alive(pid));
    let pid_after = std::fs::read_to_string(d.dir.join("node1/vms").join(&victim).join("qemu.pid"))
        .unwrap()
        .trim()
        .parse::<u32>()
        .unwrap();
    assert_eq!(pid, pid_after, "re-adopted, not restarted");
    let deadline = Instant::now() + Duration::from_secs(30);
    while qemus_under(&d.dir).len() != 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(qemus_under(&d.dir).len(), 3, "three guests, no duplicate");
}

#[test]
fn an_environment_runs_one_command_on_every_guest_and_goes_away_whole() {
    let Some(img) = tiny_or_skip("environment") else {
        return;
    };
    let d = Daemon::start(Path::new(BIN));
    // Two "systems": the same guest under two image names.
    d.import_image_as(&img, Some("tiny-one"));
    d.import_image_as(&img, Some("tiny-two"));
    let e = d
        .api
        .post(
            "/v1/environments",
            json!({"name": "compat", "os_prefixes": ["tiny-"], "flavor": "m1.tiny",
                   "lifetime_secs": 3600}),
        )
        .expect("create the environment");
    let id = e["id"].as_str().expect("an id").to_owned();
    let names: Vec<&str> = e["vms"]
        .as_array()
        .expect("vms")
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["compat-tiny-one", "compat-tiny-two"]);
    d.wait_env(&id, "ready", &["degraded"], BOOT_SECS * 2);

    // One command, every VM, each with its own answer.
    let r = d
        .api
        .post(
            "/v1/environments/compat/run",
            json!({"argv": ["sh", "-c", "cat /proc/sys/kernel/hostname; echo oops >&2; exit 7"]}),
        )
        .expect("run");
    let results = r["results"].as_array().expect("results");
    assert_eq!(results.len(), 2, "{r}");
    for (res, name) in results.iter().zip(["compat-tiny-one", "compat-tiny-two"]) {
        assert_eq!(res["vm_name"], name, "{r}");
        assert_eq!(res["stdout"].as_str().unwrap().trim(), name, "{r}");
        assert_eq!(res["stderr"], "oops\n", "{r}");
        assert_eq!(res["exit_code"], 7, "{r}");
        assert!(res["error"].is_null(), "{r}");
    }
    // The runs overlap: together they take far less than one after the other
    // would with a command that sleeps.
    let t0 = Instant::now();
    let r = d
        .api
        .post(
            "/v1/environments/compat/run",
            json!({"argv": ["sleep", "3"]}),
        )
        .expect("run");
    assert!(
        r["results"]
            .as_array()
            .unwrap()
            .iter()
            .all(|x| x["exit_code"] == 0),
        "{r}"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(6),
        "two 3 s runs took {:?}: not in parallel",
        t0.elapsed()
    );

    // The CLI reads the run as it streams: each VM's lines under its
    // name; and a file goes to every VM and comes back from each.
    match cli_bin() {
        Some(cli) => env_through_the_cli(&d, &cli),
        None => {
            assert!(
                std::env::var("BYTEPORT_REQUIRE_QEMU").as_deref() != Ok("1"),
                "the byteport binary is not built beside byteportd"
            );
            eprintln!("SKIP: env run through the CLI: build the workspace (`cargo build`)");
        }
    }

    // New ports for every VM: the running ones say they take them at
    // their next start, and after a stop and a start each forwards them.
    let u = d
        .api
        .patch("/v1/environments/compat", json!({"ports": [8080]}))
        .expect("update the environment");
    assert_eq!(
        u["apply_at_next_start"].as_array().map(Vec::len),
        Some(2),
        "{u}"
    );
    d.api
        .post("/v1/environments/compat/stop", json!({}))
        .expect("stop");
    d.wait_env(&id, "stopped", &[], 120);
    d.api
        .post("/v1/environments/compat/start", json!({}))
        .expect("start");
    let e = d.wait_env(&id, "ready", &["degraded"], BOOT_SECS * 2);
    for v in e["vms"].as_array().expect("vms") {
        let fwd = v["ports"]
            .as_array()
            .expect("ports")
            .iter()
            .find(|p| p["guest_port"] == 8080)
            .unwrap_or_else(|| panic!("no forward of 8080: {v}"));
        let port = fwd["host_port"].as_u64().expect("a host port");
        assert!(!port_free(port), "QEMU listens on {port} for 8080: {v}");
        assert!(
            v["ports"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["guest_port"] == 22),
            "22 is kept: {v}"
        );
    }

    // Deleting it removes every VM and its QEMU.
    d.api
        .delete("/v1/environments/compat")
        .expect("delete the environment");
    d.wait_env(&id, "deleted", &[], 120);
    assert!(d.no_qemu_left(10), "no QEMU left");
    let list = d.api.get("/v1/environments").expect("list");
    assert_eq!(list, json!([]));
}

/// `env run`, `env push` and `env get` of the CLI on the environment
/// `compat` of two running guests, `compat-tiny-one` and `-two`.
fn env_through_the_cli(d: &Daemon, cli: &Path) {
    use byteport_testkit::byteport;
    let config = d.dir.join("cli-env.json");
    let login = [
        "login",
        "--url",
        &d.url,
        "--user",
        "admin",
        "--password-stdin",
    ];
    let o = byteport(cli, &config, &login, Some("admin-password"));
    assert_eq!(o.code, 0, "login: {}", o.stderr);
    let o = byteport(
        cli,
        &config,
        &[
            "env",
            "run",
            "compat",
            "--",
            "sh",
            "-c",
            "echo one; echo two >&2; exit 4",
        ],
        None,
    );
    assert_eq!(o.code, 1, "{}", o.stderr);
    for name in ["compat-tiny-one", "compat-tiny-two"] {
        assert!(
            o.stdout.lines().any(|l| l == format!("{name} | one")),
            "{}",
            o.stdout
        );
        assert!(
            o.stderr.lines().any(|l| l == format!("{name} | two")),
            "{}",
            o.stderr
        );
        assert!(
            o.stderr.contains(&format!("{name}: exit 4")),
            "{}",
            o.stderr
        );
    }
    assert!(o.stderr.contains("exit 0 on 0 of 2 VMs"), "{}", o.stderr);

    // 1 MiB of bytes that are not text, there and back.
    let local = d.dir.join("blob.bin");
    let bytes: Vec<u8> = (0..1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&local, &bytes).expect("a local file");
    let o = byteport(
        cli,
        &config,
        &["env", "push", "compat", local.to_str().unwrap(), "/tmp/"],
        None,
    );
    assert_eq!(o.code, 0, "push: {} {}", o.stdout, o.stderr);
    let back = d.dir.join("back");
    let o = byteport(
        cli,
        &config,
        &[
            "env",
            "get",
            "compat",
            "/tmp/blob.bin",
            "--dir",
            back.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(o.code, 0, "get: {} {}", o.stdout, o.stderr);
    for name in ["compat-tiny-one", "compat-tiny-two"] {
        let got = std::fs::read(back.join(name).join("blob.bin")).expect("each VM's copy");
        assert!(got == bytes, "{name}'s copy differs");
    }
}

/// A guest that floods its serial console does not fill the node's disk:
/// the log is cut past `--console-log-max` (its previous part kept), the
/// console's tail still shows the latest lines, and the VM still answers.
#[test]
fn a_guest_flooding_a_console_nobody_reads_stalls_no_other_stream_and_its_log_stays_bounded() {
    let Some(img) = tiny_or_skip("console flood") else {
        return;
    };
    const MAX: u64 = 64 * 1024;
    let d = Daemon::start_with_env(
        Path::new(BIN),
        &[("BYTEPORT_CONSOLE_LOG_MAX", &MAX.to_string())],
    );
    d.import_tiny(&img);
    let id = up(&d, "loud");
    let quiet = up(&d, "quiet");
    // A console client that never reads, on a small receive buffer.
    let stuck = console_nobody_reads(&d, &id);
    // Lines as fast as the serial port takes them (0.2-0.3 MB/s under TCG
    // on a busy machine) for long enough to fill what lies between the node
    // and the console nobody reads: the server's queue and a loopback send
    // buffer of up to 4 MiB. The guest says how many bytes it wrote.
    let script = "end=$(( $(cut -d. -f1 /proc/uptime) + 35 )); n=0; \
        while [ $(cut -d. -f1 /proc/uptime) -lt $end ]; do \
        i=0; while [ $i -lt 200 ]; do echo \"flood-$n-$i-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\"; i=$((i+1)); done > /dev/console; \
        n=$((n+1)); done; echo $n";
    let flood = {
        let api = d.api.clone();
        let id = id.clone();
        std::thread::spawn(move || {
            let lines = api
                .post_lines(
                    &format!("/v1/vms/{id}/exec"),
                    json!({"argv": ["sh", "-c", script]}),
                )
                .expect("the flood");
            byteport_testkit::daemon::exec_result(&lines)
        })
    };
    // Meanwhile the other VM of the node answers, and the node heartbeats.
    let beat = |d: &Daemon| d.api.get("/v1/nodes").unwrap()[0]["last_heartbeat_at"].clone();
    let first_beat = beat(&d);
    let mut slowest = Duration::ZERO;
    let mut answers = 0;
    while !flood.is_finished() {
        let t = Instant::now();
        let (out, _, _) = d
            .exec(&quiet, &["echo", "here"])
            .expect("exec beside the flood");
        assert_eq!(out, "here\n");
        slowest = slowest.max(t.elapsed());
        answers += 1;

        std::thread::sleep(Duration::from_millis(300));
    }
    let (out, err, code) = flood.join().unwrap().expect("the flood ends");
    assert_eq!(code, Some(0), "{err}");
    assert_ne!(beat(&d), first_beat, "the node kept heartbeating");
    eprintln!("the quiet VM answered {answers} execs during the flood, the slowest in {slowest:?}");
    assert!(
        answers >= 5 && slowest < Duration::from_secs(5),
        "{answers} answers, slowest {slowest:?}"
    );

    let batches: u64 = out.trim().parse().expect("a count");
    let written = batches * 200 * 80;
    std::thread::sleep(Duration::from_secs(2));
    let dir = d.vm_dir(&id);
    let size = |f: &str| std::fs::metadata(dir.join(f)).map_or(0, |m| m.len());
    let kept = size("console.log") + size("console.log.1");
    eprintln!(
        "the guest wrote about {written} bytes in 35 s; the node keeps {kept} (console.log {}, console.log.1 {})",
        size("console.log"),
        size("console.log.1")
    );
    assert!(
        written > 4 * MAX,
        "the flood was too slow to tell: {written} bytes"
    );
    // Two parts, each at most the limit plus a second of output.
    assert!(
        kept <= 2 * (MAX + written / 35),
        "the log grew to {kept} bytes of {written} written"
    );
    assert!(size("console.log.1") > 0, "the log was never cut");
    let metrics = d.api.get_text("/metrics").expect("metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("byteport_stuck_streams_total ") && !l.ends_with(" 0")),
        "the console nobody read was closed: {}",
        metrics
            .lines()
            .filter(|l| l.contains("stuck"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    drop(stuck);
    let tail = d
        .api
        .get_text(&format!("/v1/vms/{id}/console?bytes=4096"))
        .expect("console");
    assert!(tail.contains(&format!("flood-{}-", batches - 1)), "{tail}");
    let (out, _, _) = d.exec(&id, &["echo", "still here"]).expect("exec");
    assert_eq!(out, "still here\n");
}

/// `byteportd admin ARGS` on the daemon's data directory.
fn admin(d: &Daemon, args: &[&str]) -> String {
    let o = std::process::Command::new(BIN)
        .arg("admin")
        .args(args)
        .env("BYTEPORT_DATA_DIR", &d.dir)
        .env_remove("BYTEPORT_CONFIG")
        .output()
        .expect("byteportd admin");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "admin {args:?}: {text}");
    text
}

fn names(v: &Value) -> Vec<String> {
    // A list, or a page of one.
    let items = v.get("items").unwrap_or(v);
    let mut n: Vec<String> = items
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|i| i["name"].as_str().unwrap().to_owned())
        .collect();
    n.sort();
    n
}

#[test]
fn an_online_backup_restored_answers_the_same_lists_and_vms_it_forgot_become_orphans() {
    let Some(img) = tiny_or_skip("orphans") else {
        return;
    };
    let mut d = Daemon::start_split(Path::new(BIN));
    d.import_tiny(&img);
    d.api
        .post("/v1/projects", json!({"name": "before"}))
        .expect("project");
    d.api
        .post(
            "/v1/users",
            json!({"name": "dev", "password": "dev-password"}),
        )
        .expect("user");
    let projects_before = names(&d.api.get("/v1/projects").unwrap());
    // A backup from before the VMs existed, taken while the server
    // answers and writes.
    let busy = {
        let api = d.api.clone();
        std::thread::spawn(move || {
            (0..40)
                .filter(|i| {
                    api.post("/v1/projects", json!({"name": format!("during-{i}")}))
                        .is_ok()
                })
                .count()
        })
    };
    let backup = d.dir.join("backup.tar");
    let said = admin(&d, &["backup", backup.to_str().unwrap()]);
    assert!(said.contains("the secrets file"), "{said}");
    assert_eq!(busy.join().unwrap(), 40, "the server kept serving");
    let users = names(&d.api.get("/v1/users").unwrap());
    let images = names(&d.api.get("/v1/images").unwrap());
    let projects_after = names(&d.api.get("/v1/projects").unwrap());
    let id = up(&d, "keeper");
    let other = up(&d, "other");
    // On its disk (tiny's root is in memory).
    let disk = "d=$(ls /dev/vd? | head -1);";
    let (_, err, code) = d
        .exec(
            &id,
            &[
                "sh",
                "-c",
                &format!("{disk} echo precious | dd of=$d conv=fsync"),
            ],
        )
        .expect("write to the disk");
    assert_eq!(code, Some(0), "{err}");

    // The backup comes back in place of the database: the control plane
    // no longer knows either VM.
    d.kill9();
    let old = d.dir.join("old");
    std::fs::create_dir(&old).unwrap();
    for f in [
        "byteport.db",
        "byteport.db-wal",
        "byteport.db-shm",
        "secrets.json",
    ] {
        if d.dir.join(f).exists() {
            std::fs::rename(d.dir.join(f), old.join(f)).unwrap();
        }
    }
    let said = admin(&d, &["restore", backup.to_str().unwrap()]);
    assert!(said.contains("restored"), "{said}");
    // Restoring over a database is refused.
    let o = std::process::Command::new(BIN)
        .args(["admin", "restore", backup.to_str().unwrap()])
        .env("BYTEPORT_DATA_DIR", &d.dir)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("already has a database"));
    d.respawn_server();
    d.login();
    assert_eq!(names(&d.api.get("/v1/users").unwrap()), users);
    assert_eq!(names(&d.api.get("/v1/images").unwrap()), images);
    // Every project made before the backup, some made during it, none
    // made after.
    let restored = names(&d.api.get("/v1/projects").unwrap());
    assert!(
        projects_before.iter().all(|p| restored.contains(p))
            && restored.iter().all(|p| projects_after.contains(p)),
        "{restored:?} against {projects_before:?} .. {projects_after:?}"
    );
    assert!(d.api.get(&format!("/v1/vms/{id}")).is_err());
    // The node stops them, keeps their disks and reports them as orphans.
    let deadline = Instant::now() + Duration::from_secs(90);
    let node = loop {
        let n = d.api.get("/v1/nodes").unwrap()[0].clone();
        let orphans = n["orphans"].as_array().cloned().unwrap_or_default();
        let pids_gone = d.qemu_pid(&id).is_none_or(|p| !alive(p));
        if orphans.len() == 2 && pids_gone {
            break n;
        }
        assert!(Instant::now() < deadline, "no orphans reported: {n}");
        std::thread::sleep(Duration::from_millis(500));
    };
    let names: Vec<&str> = node["orphans"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"keeper") && names.contains(&"other"),
        "{node}"
    );
    assert!(d.vm_dir(&id).exists() && d.vm_dir(&other).exists());
    let node_id = node["id"].as_str().unwrap().to_owned();

    // Adopted, it is a stopped VM again; started, its disk is as it was.
    let v = d
        .api
        .post(
            &format!("/v1/nodes/{node_id}/orphans/{id}/adopt"),
            json!({"project": "default"}),
        )
        .expect("adopt");
    assert_eq!(v["state"], "stopped", "{v}");
    d.api
        .post(&format!("/v1/vms/{id}/start"), json!({}))
        .expect("start");
    d.wait(&id, "running", BOOT_SECS).expect("running again");
    let (out, _, _) = d
        .exec(&id, &["sh", "-c", &format!("{disk} head -c 9 $d")])
        .expect("read the disk");
    assert_eq!(out, "precious\n");
    // Removed, the other goes away with its disk.
    d.api
        .delete(&format!("/v1/nodes/{node_id}/orphans/{other}"))
        .expect("remove");
    let deadline = Instant::now() + Duration::from_secs(60);
    while d.vm_dir(&other).exists() {
        assert!(Instant::now() < deadline, "the orphan's directory stayed");
        std::thread::sleep(Duration::from_millis(300));
    }
    let n = d.api.get(&format!("/v1/nodes/{node_id}")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut n = n;
    while n["orphans"].as_array().is_some_and(|a| !a.is_empty()) {
        assert!(Instant::now() < deadline, "still reported: {n}");
        std::thread::sleep(Duration::from_millis(300));
        n = d.api.get(&format!("/v1/nodes/{node_id}")).unwrap();
    }
    // The adopted VM holds its share of the node again.
    assert_eq!(n["reserved"]["vcpus"], 1, "{n}");
    let e = d
        .api
        .delete(&format!("/v1/nodes/{node_id}/orphans/{other}"))
        .unwrap_err();
    assert!(e.starts_with("404"), "{e}");
}
