//! What a guest can reach, and what holds it, checked from inside real
//! `tiny` guests through their agent: under user-mode networking a guest
//! reaches neither the host's loopback (the API, a listener of the host's,
//! other VMs' forwarded ports) nor the outside, and still reads its own
//! metadata at 10.0.2.254; its forwarded port reaches a listener in
//! it; each VM's QEMU runs in a cgroup of its own, limited to its size,
//! removed with it. They skip, saying why, when QEMU or the image is
//! missing, unless `BYTEPORT_REQUIRE_QEMU=1` (set by `cargo xtask test`).

use byteport_testkit::daemon::{Daemon, tiny_or_skip};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_byteportd");
const BOOT_SECS: u64 = 180;

fn up(d: &Daemon, name: &str) -> String {
    let id = d.create_vm(name);
    d.wait(&id, "running", BOOT_SECS)
        .expect("the VM reaches running");
    id
}

/// Runs `sh -c script` in the guest: (stdout, exit code).
fn sh(d: &Daemon, id: &str, script: &str) -> (String, Option<i32>) {
    let (out, err, code) = d.exec(id, &["sh", "-c", script]).expect("exec");
    (format!("{out}{err}"), code)
}

/// Whether the guest opens a TCP connection to `addr:port` within 3 s.
fn guest_connects(d: &Daemon, id: &str, addr: &str, port: u16) -> bool {
    // busybox nc: -w is the connect (and idle) timeout; the connection
    // closes at once since standard input is empty.
    let (_, code) = sh(
        d,
        id,
        &format!("nc -w 3 {addr} {port} </dev/null >/dev/null 2>&1"),
    );
    code == Some(0)
}

/// Waits until the guest has its DHCP lease from QEMU.
fn wait_lease(d: &Daemon, id: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (out, _) = sh(d, id, "ip -4 -o addr show dev eth0");
        if let Some(addr) = out.split_whitespace().skip_while(|w| *w != "inet").nth(1) {
            return addr.to_owned();
        }
        assert!(Instant::now() < deadline, "no DHCP lease: {out}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The host's own addresses other than loopback (where a service bound
/// to all addresses also listens).
fn host_addresses() -> Vec<String> {
    let out = std::process::Command::new("ip")
        .args(["-4", "-o", "addr", "show"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    out.lines()
        .filter_map(|l| l.split_whitespace().skip_while(|w| *w != "inet").nth(1))
        .filter_map(|a| a.split('/').next())
        .filter(|a| !a.starts_with("127."))
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_user_mode_guest_reaches_only_its_metadata_and_is_reached_through_its_forward() {
    let Some(img) = tiny_or_skip("user-mode isolation") else {
        return;
    };
    let d = Daemon::start(Path::new(BIN));
    d.import_tiny(&img);
    let a = up(&d, "iso-a");
    let b = up(&d, "iso-b");
    let lease = wait_lease(&d, &a);
    assert!(lease.starts_with("10.0.2."), "QEMU's DHCP: {lease}");

    // A listener of the host's on all addresses stands in for any host
    // service; the API listens on 127.0.0.1.
    let host_service = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let service_port = host_service.local_addr().unwrap().port();
    let b_ssh = d.vm(&b)["ports"][0]["host_port"].as_u64().unwrap() as u16;
    // Before the checks: the host itself reaches them, so a refusal below
    // is the guest's isolation, not a closed port.
    assert!(std::net::TcpStream::connect(("127.0.0.1", d.port)).is_ok());
    assert!(std::net::TcpStream::connect(("127.0.0.1", b_ssh)).is_ok());
    for (what, port) in [
        ("the API", d.port),
        ("a host service", service_port),
        ("the other VM's SSH forward", b_ssh),
    ] {
        assert!(
            !guest_connects(&d, &a, "10.0.2.2", port),
            "the guest reached {what} at 10.0.2.2:{port}"
        );
        for addr in host_addresses() {
            assert!(
                !guest_connects(&d, &a, &addr, port),
                "the guest reached {what} at {addr}:{port}"
            );
        }
    }
    // The same probe does connect where the guest may go: its metadata.
    assert!(
        guest_connects(&d, &a, "10.0.2.254", 80),
        "the probe itself works"
    );
    // Nor the outside: no address answers a restricted guest.
    assert!(!guest_connects(&d, &a, "192.0.2.1", 80));

    // Its own metadata, by the URL in its SMBIOS serial.
    let (serial, _) = sh(&d, &a, "cat /sys/class/dmi/id/product_serial");
    let url = serial
        .trim()
        .split_once(";s=")
        .map(|(_, u)| u.to_owned())
        .unwrap_or_else(|| panic!("no data source in the serial: {serial:?}"));
    assert!(url.starts_with("http://10.0.2.254/"), "{url}");
    let get = |url: &str| -> String {
        // busybox's static wget crashes in this guest; HTTP by hand.
        let (host, path) = url
            .strip_prefix("http://")
            .and_then(|u| u.split_once('/'))
            .expect("an http URL");
        sh(
            &d,
            &a,
            &format!(
                "printf 'GET /{path} HTTP/1.0\\r\\nHost: {host}\\r\\n\\r\\n' | nc -w 10 {host} 80"
            ),
        )
        .0
    };
    let meta = get(&format!("{url}meta-data"));
    assert!(meta.starts_with("HTTP/1.0 200"), "metadata: {meta}");
    assert!(
        meta.contains(&format!("\"instance-id\": \"{a}\"")),
        "{meta}"
    );
    // Another VM's document with this VM's token is not served.
    let other = get(&format!("{}meta-data", url.replace(&a, &b)));
    assert!(
        other.starts_with("HTTP/1.0 404"),
        "a VM read another VM's metadata: {other}"
    );

    // Inbound: the forward of guest port 22 reaches a listener there.
    let a_ssh = d.vm(&a)["ports"][0].clone();
    assert_eq!(
        a_ssh["host"], "127.0.0.1",
        "forwards listen where configured"
    );
    let a_port = a_ssh["host_port"].as_u64().unwrap() as u16;
    // The forward takes the connection at once; the greeting comes once
    // the guest's listener (started here in the background) is up.
    let (_, code) = sh(
        &d,
        &a,
        "(echo hello-from-the-guest | nc -l -p 22 >/dev/null 2>&1 &) ; sleep 1",
    );
    assert_eq!(code, Some(0));
    let mut s = std::net::TcpStream::connect(("127.0.0.1", a_port)).expect("the forward");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let _ = s.write_all(b"hi\n");
    let mut got = String::new();
    let _ = s.read_to_string(&mut got);
    assert!(
        got.contains("hello-from-the-guest"),
        "through the forward: {got:?}"
    );
    drop(host_service);
}

/// The cgroup directories of a VM's QEMU, from /proc (v1: cpu and
/// memory; v2: one), if it is in BytePort's.
fn qemu_cgroups(pid: u32) -> Vec<PathBuf> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    s.lines()
        .filter_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, ctrl, path) = (f.next()?, f.next()?, f.next()?);
            if !path.starts_with("/byteport/") {
                return None;
            }
            Some(match ctrl {
                "" => PathBuf::from(format!("/sys/fs/cgroup{path}")),
                "memory" | "cpu" => PathBuf::from(format!("/sys/fs/cgroup/{ctrl}{path}")),
                _ => return None,
            })
        })
        .collect()
}

fn cgroup_v1_or_v2_writable() -> bool {
    let root = is_root();
    root && (Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
        || Path::new("/sys/fs/cgroup/memory/cgroup.procs").exists())
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|u| u.split_whitespace().next() == Some("0"))
        })
        .unwrap_or(false)
}

#[test]
fn each_vm_runs_in_a_cgroup_of_its_size_that_goes_with_it() {
    let Some(img) = tiny_or_skip("cgroups") else {
        return;
    };
    if !cgroup_v1_or_v2_writable() {
        eprintln!("SKIP cgroups: needs root and a cgroup hierarchy (run as root for real)");
        return;
    }
    let d = Daemon::start(Path::new(BIN));
    d.import_tiny(&img);
    let id = up(&d, "cg-1");
    let pid = d.qemu_pid(&id).expect("QEMU's pid");
    let groups = qemu_cgroups(pid);
    assert!(
        !groups.is_empty() && groups.iter().all(|g| g.ends_with(&id)),
        "QEMU is in the VM's own cgroup: {groups:?}"
    );
    // 256 MiB of guest RAM plus QEMU's documented allowance.
    let limit_mib = (256 + 256) as u64;
    let mem = groups
        .iter()
        .find_map(|g| {
            std::fs::read_to_string(g.join("memory.max"))
                .or_else(|_| std::fs::read_to_string(g.join("memory.limit_in_bytes")))
                .ok()
        })
        .expect("a memory limit");
    assert_eq!(mem.trim().parse::<u64>().unwrap(), limit_mib << 20);
    // The guest fills most of its RAM (a file on its RAM root): the group
    // holds QEMU under the limit, and the node reports the group's figures.
    let (_, code) = sh(
        &d,
        &id,
        "dd if=/dev/zero of=/fill bs=1M count=150 2>/dev/null; rm -f /fill",
    );
    assert_eq!(code, Some(0));
    let deadline = Instant::now() + Duration::from_secs(30);
    let f = loop {
        let v = d.api.get(&format!("/v1/vms/{id}/stats")).unwrap();
        if v["measured"]["cgroup_memory_mib"].is_number() {
            break v["measured"].clone();
        }
        assert!(Instant::now() < deadline, "no cgroup figures: {v}");
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(f["cgroup_memory_limit_mib"], limit_mib);
    assert!(f["cgroup_memory_mib"].as_u64().unwrap() <= limit_mib, "{f}");
    assert!(qemu_cgroups(pid).iter().all(|g| {
        let procs = std::fs::read_to_string(g.join("cgroup.procs")).unwrap_or_default();
        procs.lines().any(|p| p == pid.to_string())
    }));

    d.api.delete(&format!("/v1/vms/{id}")).expect("delete");
    d.wait(&id, "deleted", 60).expect("deleted");
    let deadline = Instant::now() + Duration::from_secs(10);
    while groups.iter().any(|g| g.exists()) {
        assert!(
            Instant::now() < deadline,
            "the VM's cgroup is left: {groups:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Whether a user other than the owner may run `bin`: every directory on
/// its path searchable by others, the file executable by others.
fn others_may_run(bin: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.permissions().mode())
            .unwrap_or(0)
    };
    mode(bin) & 0o001 != 0 && bin.ancestors().skip(1).all(|d| mode(d) & 0o001 != 0)
}

#[test]
fn qemu_drops_to_the_configured_user_and_the_vm_still_works() {
    let Some(img) = tiny_or_skip("QEMU as another user") else {
        return;
    };
    if !is_root() {
        eprintln!("SKIP QEMU as another user: needs root to start as one");
        return;
    }
    let d = Daemon::start_with_env(Path::new(BIN), &[("BYTEPORT_QEMU_USER", "nobody")]);
    d.import_tiny(&img);
    let id = up(&d, "runas-1");
    let pid = d.qemu_pid(&id).expect("QEMU's pid");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|u| u.split_whitespace().nth(1))
        .unwrap();
    assert_eq!(uid, "65534", "QEMU runs as nobody: {status}");
    // The guest agent, the metadata pipe (spawned by QEMU, so as nobody
    // too) and the console all still work.
    let (out, code) = sh(&d, &id, "uname -s");
    assert_eq!((out.trim(), code), ("Linux", Some(0)));
    // The metadata pipe is this daemon's binary, run by QEMU as nobody:
    // it works where nobody may run it (not under a private home).
    if others_may_run(Path::new(BIN)) {
        let (serial, _) = sh(&d, &id, "cat /sys/class/dmi/id/product_serial");
        let url = serial
            .trim()
            .split_once(";s=")
            .map(|(_, u)| u.to_owned())
            .unwrap();
        let path = url.trim_start_matches("http://10.0.2.254");
        let (meta, _) = sh(
            &d,
            &id,
            &format!("printf 'GET {path}meta-data HTTP/1.0\\r\\n\\r\\n' | nc -w 10 10.0.2.254 80"),
        );
        assert!(
            meta.starts_with("HTTP/1.0 200"),
            "metadata as nobody: {meta}"
        );
    } else {
        eprintln!(
            "NOTE: {BIN} is not executable by other users here: the metadata check as nobody is left out"
        );
    }
    d.api.delete(&format!("/v1/vms/{id}")).expect("delete");
    d.wait(&id, "deleted", 60).expect("deleted");
}
