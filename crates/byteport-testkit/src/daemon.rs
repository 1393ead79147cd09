//! Real `byteportd` processes for end-to-end tests and benchmarks: an
//! all-in-one daemon (control plane + node agent, SQLite) in a temp data
//! directory, a blocking API client, and the `tiny` guest image imported
//! from `build/images/tiny` (made by `cargo xtask image build tiny`).

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where the `tiny` image's build output is, or why it cannot be used.
/// `Err` explains the skip; with `BYTEPORT_REQUIRE_QEMU=1` callers fail.
pub fn tiny_image() -> Result<PathBuf, String> {
    guest_image("tiny")
}

/// Where a built guest image is (`build/images/NAME`, or the directory in
/// `BYTEPORT_TINY_IMAGE` for `tiny`), or why it cannot be used.
pub fn guest_image(name: &str) -> Result<PathBuf, String> {
    let dir = match std::env::var_os("BYTEPORT_TINY_IMAGE") {
        Some(d) if name == "tiny" => PathBuf::from(d),
        _ => workspace_root().join("build/images").join(name),
    };
    if which("qemu-system-x86_64").is_none() {
        return Err("qemu-system-x86_64 is not installed".into());
    }
    if which("qemu-img").is_none() {
        return Err("qemu-img is not installed".into());
    }
    if !dir.join("manifest.json").exists() {
        return Err(format!(
            "no {name} image at {} (build it with `cargo xtask image build {name}`)",
            dir.display()
        ));
    }
    Ok(dir)
}

/// The tiny image, or a skip: prints `SKIP: reason` and returns `None`,
/// unless `BYTEPORT_REQUIRE_QEMU=1`, where a missing part is a failure.
pub fn tiny_or_skip(test: &str) -> Option<PathBuf> {
    image_or_skip("tiny", test)
}

/// Like [`tiny_or_skip`], for any image `cargo xtask image build` makes.
pub fn image_or_skip(name: &str, test: &str) -> Option<PathBuf> {
    match guest_image(name) {
        Ok(d) => Some(d),
        Err(why) if std::env::var("BYTEPORT_REQUIRE_QEMU").as_deref() == Ok("1") => {
            panic!("{test}: {why}, and BYTEPORT_REQUIRE_QEMU=1 requires real guests")
        }
        Err(why) => {
            eprintln!("SKIP: {test}: {why}; `cargo xtask test` builds and runs it for real");
            None
        }
    }
}

pub fn workspace_root() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.ancestors()
        .nth(2)
        .map(Path::to_path_buf)
        .unwrap_or(here)
}

fn which(bin: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(bin))
            .find(|f| f.is_file())
    })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// In split mode, a node silent this long is offline.
pub const NODE_TIMEOUT_SECS: u64 = 4;

/// A libvirtd of one test's own: its sockets and log in a temporary
/// directory, reached at [`Libvirtd::uri`], stopped when dropped. It is a
/// privileged daemon, so it uses the host's /etc/libvirt/qemu.conf (which
/// `.ci/run` writes) and must be the only libvirtd on the host.
pub struct Libvirtd {
    pub uri: String,
    dir: PathBuf,
    child: Child,
}

impl Libvirtd {
    /// Starts one and waits until it answers with its QEMU driver; a
    /// skip (`None`, saying why) where libvirt is not installed, or a
    /// failure under `BYTEPORT_REQUIRE_QEMU=1`.
    pub fn start(test: &str) -> Option<Libvirtd> {
        let require = std::env::var("BYTEPORT_REQUIRE_QEMU").as_deref() == Ok("1");
        let skip = |why: String| {
            assert!(
                !require,
                "{test}: {why}, and BYTEPORT_REQUIRE_QEMU=1 requires it"
            );
            eprintln!("SKIP: {test}: {why}; `.ci/run` installs and configures libvirt");
            None
        };
        if !Path::new("/usr/sbin/libvirtd").exists()
            || Command::new("virsh").arg("--version").output().is_err()
        {
            return skip(
                "libvirt is not installed (libvirt-daemon-driver-qemu, libvirt-clients)".into(),
            );
        }
        let dir = std::env::temp_dir().join(format!(
            "byteport-libvirt-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(dir.join("sock")).expect("a temp dir");
        let conf = dir.join("libvirtd.conf");
        std::fs::write(
            &conf,
            format!(
                "unix_sock_dir = \"{}\"\nunix_sock_rw_perms = \"0700\"\nauth_unix_rw = \"none\"\nauth_unix_ro = \"none\"\nlog_outputs = \"3:file:{}\"\n",
                dir.join("sock").display(),
                dir.join("libvirtd.log").display()
            ),
        )
        .expect("libvirtd.conf");
        let child = Command::new("/usr/sbin/libvirtd")
            .arg("--config")
            .arg(&conf)
            .arg("--pid-file")
            .arg(dir.join("libvirtd.pid"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(dir.join("stderr.log")).expect("a log"),
            ))
            .spawn()
            .expect("starting libvirtd");
        let uri = format!(
            "qemu:///system?socket={}",
            dir.join("sock/libvirt-sock").display()
        );
        let d = Libvirtd { uri, dir, child };
        // The first connection probes QEMU's capabilities: seconds.
        let deadline = Instant::now() + Duration::from_secs(90);
        while Instant::now() < deadline {
            let out = Command::new("virsh")
                .args(["-q", "-c", &d.uri, "version"])
                .output();
            if out.is_ok_and(|o| {
                o.status.success() && String::from_utf8_lossy(&o.stdout).contains("QEMU")
            }) {
                return Some(d);
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        let log = std::fs::read_to_string(d.dir.join("stderr.log")).unwrap_or_default()
            + &std::fs::read_to_string(d.dir.join("libvirtd.log")).unwrap_or_default();
        panic!(
            "{test}: libvirtd did not answer on {}: {}",
            d.uri,
            tail(&log, 3000)
        );
    }
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A running all-in-one `byteportd`; killed (not its VMs) on drop, and its
/// data directory removed once every QEMU of it is gone.
pub struct Daemon {
    pub bin: PathBuf,
    pub dir: PathBuf,
    pub url: String,
    pub port: u16,
    pub forward_ports: (u16, u16),
    pub child: Option<Child>,
    /// In split mode, the separate node agent process.
    pub node: Option<Child>,
    /// More node agents beside `node` (see `spawn_extra_node`).
    pub extra: Vec<Option<Child>>,
    node_token: Option<String>,
    pub api: Api,
    /// `--database-url`, when not the SQLite file of the data directory.
    pub database_url: Option<String>,
    /// `--network` of its node: `user` unless a test asks (a bridged
    /// node changes the host's network, so it runs in a namespace).
    pub network: String,
    /// The network namespace it runs in, if any.
    pub netns: Option<NetNs>,
    /// More environment for the daemon (its `BYTEPORT_*` settings).
    pub envs: Vec<(String, String)>,
    /// The CA of its HTTPS certificate, when it serves HTTPS.
    pub tls: Option<TestCa>,
    keep: bool,
}

/// A network namespace of a test's own with one veth to the host: the
/// host side is `10.251.N.1/30`, the namespace side `10.251.N.2/30` and
/// its default route, so the host stands in for "the outside". Dropping
/// it kills every process left in it and deletes it, and with it every
/// link and nftables table made inside.
pub struct NetNs {
    pub name: String,
    /// The host's address on the veth (the namespace's "internet").
    pub host_addr: String,
    /// The namespace's own address.
    pub ns_addr: String,
}

impl NetNs {
    /// Makes a namespace, or `None` (saying why) where this process may
    /// not (not root, no `ip`).
    pub fn new() -> Option<NetNs> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n =
            (std::process::id() % 200) * 8 + NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let n = n % 16000;
        let name = format!("bptest{n}");
        let (hi, lo) = (n / 64, (n % 64) * 4);
        let host_addr = format!("10.251.{hi}.{}", lo + 1);
        let ns_addr = format!("10.251.{hi}.{}", lo + 2);
        let (host_if, ns_if) = (format!("vbph{n}"), format!("vbpn{n}"));
        let ip = |args: &[&str]| {
            Command::new("ip")
                .args(args)
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        };
        sweep_leftovers();
        // Ours from now on: a later sweep leaves it alone while we live.
        let _ = std::fs::write(netns_owner(&name), std::process::id().to_string());
        // Leftovers of an earlier run that was killed, quietly.
        for args in [vec!["netns", "del", &name], vec!["link", "del", &host_if]] {
            let _ = Command::new("ip")
                .args(&args)
                .stderr(Stdio::null())
                .status();
        }
        if !ip(&["netns", "add", &name]) {
            return None;
        }
        let ns = NetNs {
            name: name.clone(),
            host_addr: host_addr.clone(),
            ns_addr: ns_addr.clone(),
        };
        let ok = ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ]) && ip(&["link", "set", &ns_if, "netns", &name])
            && ip(&["addr", "add", &format!("{host_addr}/30"), "dev", &host_if])
            && ip(&["link", "set", &host_if, "up"])
            && ip(&[
                "-n",
                &name,
                "addr",
                "add",
                &format!("{ns_addr}/30"),
                "dev",
                &ns_if,
            ])
            && ip(&["-n", &name, "link", "set", &ns_if, "up"])
            && ip(&["-n", &name, "link", "set", "lo", "up"])
            && ip(&["-n", &name, "route", "add", "default", "via", &host_addr]);
        ok.then_some(ns)
    }

    /// Runs a command inside, for its output.
    pub fn run(&self, argv: &[&str]) -> String {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(argv)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let pids = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        for pid in pids.split_whitespace() {
            let _ = Command::new("kill").args(["-9", pid]).status();
        }
        std::thread::sleep(Duration::from_millis(100));
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        let _ = std::fs::remove_file(netns_owner(&self.name));
    }
}

/// The file that names the test process a namespace belongs to.
fn netns_owner(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("{name}.owner"))
}

/// Removes what test processes killed before their drops ran (a timeout's
/// SIGKILL) left behind, once per test process: daemons and QEMUs of a
/// data directory whose `owner.pid` names a dead process, and namespaces
/// whose owner is dead. Without it, one killed test leaves guests running
/// that slow every test after it.
fn sweep_leftovers() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let owner_alive = |file: PathBuf| {
            std::fs::read_to_string(file)
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
                .is_some_and(alive)
        };
        let tmp = std::env::temp_dir();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            // QEMU names its directory in its arguments, byteportd in its
            // environment.
            let mut seen = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            seen.extend(std::fs::read(e.path().join("environ")).unwrap_or_default());
            let seen = String::from_utf8_lossy(&seen);
            let Some(at) = seen.find("bp-e2e-") else {
                continue;
            };
            let Some(name) = seen.get(at..at + 7 + 32) else {
                continue;
            };
            if !owner_alive(tmp.join(name).join("owner.pid")) {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
        }
        let list = Command::new("ip")
            .args(["netns", "list"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
            if !name.starts_with("bptest") || owner_alive(netns_owner(name)) {
                continue;
            }
            // Dropping a namespace we do not own kills what runs in it.
            drop(NetNs {
                name: name.to_owned(),
                host_addr: String::new(),
                ns_addr: String::new(),
            });
            let n = name.trim_start_matches("bptest");
            let _ = Command::new("ip")
                .args(["link", "del", &format!("vbph{n}")])
                .stderr(Stdio::null())
                .status();
        }
    });
}

/// How a test daemon is started.
struct Launch {
    mode: &'static str,
    database_url: Option<String>,
    /// Make the first admin (else log in as the one a replica made).
    bootstrap: bool,
    network: &'static str,
    netns: Option<NetNs>,
    envs: Vec<(String, String)>,
    tls: Option<TestCa>,
    /// Run on the fresh data directory before the daemon starts.
    prepare: Option<Prepare>,
}

/// What a test puts in a data directory before its daemon starts.
type Prepare = Box<dyn FnOnce(&Path)>;

impl Launch {
    fn new(mode: &'static str) -> Launch {
        Launch {
            mode,
            database_url: None,
            bootstrap: true,
            network: "user",
            netns: None,
            envs: Vec::new(),
            tls: None,
            prepare: None,
        }
    }
}

impl Daemon {
    /// Starts `bin all-in-one` on a fresh data directory with an admin.
    pub fn start(bin: &Path) -> Daemon {
        Daemon::launch(bin, Launch::new("all-in-one"))
    }

    /// Starts `bin server` (no node) on a fresh data directory that
    /// `prepare` has put something in first (the database an older
    /// version left, say), then makes an admin.
    pub fn start_server_prepared(bin: &Path, prepare: impl FnOnce(&Path) + 'static) -> Daemon {
        Daemon::launch(
            bin,
            Launch {
                prepare: Some(Box::new(prepare)),
                ..Launch::new("server")
            },
        )
    }

    /// Starts `bin all-in-one` with these `BYTEPORT_*` settings in its
    /// environment (kept for restarts).
    pub fn start_with_env(bin: &Path, envs: &[(&str, &str)]) -> Daemon {
        let envs = envs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Daemon::launch(
            bin,
            Launch {
                envs,
                ..Launch::new("all-in-one")
            },
        )
    }

    /// Starts `bin all-in-one` with bridged networking inside a network
    /// namespace of its own (see [`NetNs`]), listening on the namespace's
    /// address; `None`, saying why, where namespaces cannot be made.
    pub fn start_bridged(bin: &Path) -> Option<Daemon> {
        let ns = NetNs::new()?;
        Some(Daemon::launch(
            bin,
            Launch {
                network: "bridge",
                netns: Some(ns),
                ..Launch::new("all-in-one")
            },
        ))
    }

    /// Starts `bin server` on a shared database. The first replica
    /// (`first`) bootstraps the admin; the others log in as it.
    pub fn start_replica(bin: &Path, database_url: &str, first: bool) -> Daemon {
        // Replicas share one secrets file, as an operator copies it.
        let id = hex::encode(&Sha256::digest(database_url.as_bytes())[..8]);
        let secrets = std::env::temp_dir().join(format!("bp-secrets-{id}.json"));
        if first {
            let _ = std::fs::remove_file(&secrets);
        }
        Daemon::launch(
            bin,
            Launch {
                database_url: Some(database_url.to_owned()),
                bootstrap: first,
                envs: vec![(
                    "BYTEPORT_SECRETS_FILE".into(),
                    secrets.display().to_string(),
                )],
                ..Launch::new("server")
            },
        )
    }

    /// Starts `bin MODE` on a fresh data directory (and its database URL,
    /// or its own SQLite), bootstraps the admin if asked, and logs in as it.
    fn launch(bin: &Path, l: Launch) -> Daemon {
        let dir = std::env::temp_dir().join(format!("bp-e2e-{}", uuid::Uuid::new_v4().simple()));
        sweep_leftovers();
        std::fs::create_dir_all(&dir).expect("temp dir");
        std::fs::write(dir.join("owner.pid"), std::process::id().to_string()).expect("owner.pid");
        if let Some(prepare) = l.prepare {
            prepare(&dir);
        }
        let port = free_port();
        // A forward range of our own, so parallel tests never collide.
        let base = 30000 + (port % 300) * 100;
        let host = l
            .netns
            .as_ref()
            .map_or("127.0.0.1".to_owned(), |n| n.ns_addr.clone());
        let mut envs = l.envs;
        let scheme = match &l.tls {
            Some(ca) => {
                envs.push((
                    "BYTEPORT_TLS_CERT".into(),
                    ca.server_cert.display().to_string(),
                ));
                envs.push((
                    "BYTEPORT_TLS_KEY".into(),
                    ca.server_key.display().to_string(),
                ));
                "https"
            }
            None => "http",
        };
        let url = format!("{scheme}://{host}:{port}");
        let api = match &l.tls {
            Some(ca) => Api::trusting(&url, None, &ca.ca_cert),
            None => Api::new(&url, None),
        };
        let mut d = Daemon {
            bin: bin.to_owned(),
            dir,
            url,
            port,
            forward_ports: (base, base + 99),
            child: None,
            node: None,
            extra: Vec::new(),
            node_token: None,
            api,
            database_url: l.database_url,
            network: l.network.into(),
            netns: l.netns,
            envs,
            tls: l.tls,
            keep: std::env::var_os("BYTEPORT_KEEP_TEST_DIRS").is_some(),
        };
        d.spawn_mode(l.mode);
        if l.bootstrap {
            let token = d.bootstrap_token();
            d.api
                .post(
                    "/v1/bootstrap",
                    json!({"token": token, "name": "admin", "password": "admin-password"}),
                )
                .expect("bootstrap");
        }
        d.login();
        d
    }

    /// Logs the API client in as the admin.
    pub fn login(&mut self) {
        // A bearer the server no longer knows is refused, even here.
        self.api.token = None;
        let login = self
            .api
            .post(
                "/v1/auth/login",
                json!({"name": "admin", "password": "admin-password"}),
            )
            .expect("login");
        self.api.token = login["access_token"].as_str().map(str::to_owned);
    }

    /// Restarts a killed server on the same data directory and database.
    pub fn respawn_server(&mut self) {
        self.spawn_mode("server");
    }

    /// Starts `bin server` and a separate `bin node` (the fleet layout), so
    /// that the node agent can be killed and restarted on its own.
    pub fn start_split(bin: &Path) -> Daemon {
        Daemon::split(bin, None)
    }

    /// Like [`Daemon::start_split`], with the server on HTTPS with a
    /// certificate signed by `ca`, which the node and the API client are
    /// given with `--ca-cert`.
    pub fn start_split_tls(bin: &Path, ca: TestCa) -> Daemon {
        Daemon::split(bin, Some(ca))
    }

    fn split(bin: &Path, tls: Option<TestCa>) -> Daemon {
        let mut d = Daemon::launch(
            bin,
            Launch {
                tls,
                ..Launch::new("server")
            },
        );
        let t = d
            .api
            .post("/v1/node-join-tokens", json!({}))
            .expect("a join token");
        d.node_token = t["token"].as_str().map(str::to_owned);
        d.spawn_node();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if d.api
                .get("/v1/nodes")
                .is_ok_and(|n| n.as_array().is_some_and(|a| !a.is_empty()))
            {
                return d;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("the node did not register; log:\n{}", d.log());
    }

    /// Starts the node agent process (again).
    pub fn spawn_node(&mut self) {
        let token = self.node_token.clone();
        let child = self.node_process(0, token.as_deref());
        self.node = Some(child);
    }

    /// kill -9 of the node agent alone.
    pub fn kill9_node(&mut self) {
        if let Some(mut c) = self.node.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts node agent number `i` (1, 2, ...: more nodes beside the first
    /// of `start_split`), each with its own data directory, name
    /// (`node-{i+1}`) and forward ports; it registers on its first start.
    pub fn spawn_extra_node(&mut self, i: usize) {
        assert!(i >= 1, "node 0 is the first node");
        let registered = self.dir.join(format!("node{i}/node.json")).exists();
        let token = if registered {
            None
        } else {
            let t = self
                .api
                .post("/v1/node-join-tokens", json!({}))
                .expect("a join token");
            t["token"].as_str().map(str::to_owned)
        };
        let child = self.node_process(i, token.as_deref());
        if self.extra.len() < i {
            self.extra.resize_with(i, || None);
        }
        self.extra[i - 1] = Some(child);
    }

    /// kill -9 of extra node agent `i`.
    pub fn kill9_extra_node(&mut self, i: usize) {
        if let Some(mut c) = self.extra.get_mut(i - 1).and_then(Option::take) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn node_process(&self, i: usize, join_token: Option<&str>) -> Child {
        let (dir, log) = match i {
            0 => ("node".to_owned(), "node.log".to_owned()),
            i => (format!("node{i}"), format!("node{i}.log")),
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(log))
            .expect("log file");
        // Each node takes its own slice of the forward range.
        let slice = (self.forward_ports.1 - self.forward_ports.0 + 1) / 4;
        let lo = self.forward_ports.0 + slice * i as u16;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("node")
            .arg("--server")
            .arg(&self.url)
            .arg("--data-dir")
            .arg(self.dir.join(dir))
            .arg("--name")
            .arg(format!("node-{}", i + 1))
            .arg("--forward-ports")
            .arg(format!("{lo}-{}", lo + slice - 1))
            .arg("--stop-timeout")
            .arg("10")
            .arg("--heartbeat-secs")
            .arg("1")
            .arg("--network")
            .arg(&self.network)
            .env("RUST_LOG", "info")
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log));
        if let Some(t) = join_token {
            cmd.arg("--join-token").arg(t);
        }
        if let Some(ca) = &self.tls {
            cmd.arg("--ca-cert").arg(&ca.ca_cert);
        }
        cmd.spawn().expect("starting a node agent")
    }

    pub fn node_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("node.log")).unwrap_or_default()
    }

    /// Starts the process (again) on the same data directory and waits
    /// until its API answers.
    pub fn spawn(&mut self) {
        self.spawn_mode("all-in-one");
    }

    fn spawn_mode(&mut self, mode: &str) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("daemon.log"))
            .expect("log file");
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &ns.name]).arg(&self.bin);
                c
            }
            None => Command::new(&self.bin),
        };
        let listen = if self.netns.is_some() {
            "0.0.0.0"
        } else {
            "127.0.0.1"
        };
        cmd.arg(mode)
            .arg("--listen")
            .arg(format!("{listen}:{}", self.port));
        if mode == "server" {
            cmd.arg("--node-timeout").arg(NODE_TIMEOUT_SECS.to_string());
        }
        if mode == "all-in-one" {
            cmd.arg("--forward-ports")
                .arg(format!("{}-{}", self.forward_ports.0, self.forward_ports.1))
                .arg("--stop-timeout")
                .arg("10")
                .arg("--network")
                .arg(&self.network);
            if self.netns.is_some() {
                // Port maps answer on the namespace's own address.
                cmd.arg("--forward-host").arg("0.0.0.0");
            }
        }
        if let Some(u) = &self.database_url {
            cmd.arg("--database-url").arg(u);
        }
        // The built web console, when there is one.
        let web = workspace_root().join("web/build");
        if web.join("index.html").is_file() {
            cmd.env("BYTEPORT_WEB_DIR", web);
        }
        cmd.envs(self.envs.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let child = cmd
            .env("BYTEPORT_DATA_DIR", &self.dir)
            .env("RUST_LOG", "info")
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("starting byteportd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.api.get("/healthz").is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("byteportd did not answer; its log:\n{}", self.log());
    }

    fn bootstrap_token(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let log = self.log();
            if let Some(i) = log.find("--token ") {
                let rest = &log[i + 8..];
                return rest
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_owned();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("no bootstrap token in the log:\n{}", self.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// kill -9: the daemon dies at once; its QEMU processes do not.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The node's directory for one VM.
    pub fn vm_dir(&self, id: &str) -> PathBuf {
        self.dir.join("node/vms").join(id)
    }

    /// Imports the tiny image from its build directory.
    pub fn import_tiny(&self, dir: &Path) {
        self.import_image(dir);
    }

    /// Imports an image from its build directory (`manifest.json` and the
    /// files it names): an initramfs image, or a disk with kernel and
    /// initrd.
    pub fn import_image(&self, dir: &Path) {
        self.import_image_as(dir, None);
    }

    /// [`Daemon::import_image`] under another name than the manifest's.
    pub fn import_image_as(&self, dir: &Path, name: Option<&str>) {
        self.api.import_image_as(dir, name);
    }

    /// Creates a VM from `tiny` and returns its id.
    pub fn create_vm(&self, name: &str) -> String {
        let v = self
            .api
            .post("/v1/vms", json!({"name": name, "image": "tiny", "vcpus": 1, "memory_mib": 256, "disk_gib": 1}))
            .expect("creating a VM");
        v["id"].as_str().expect("an id").to_owned()
    }

    pub fn vm(&self, id: &str) -> Value {
        self.api
            .get(&format!("/v1/vms/{id}"))
            .expect("showing a VM")
    }

    /// Polls environment `env` (id or name) until it is in `state`, and
    /// returns it; panics (with the daemon's log) after `secs`, or at once
    /// if it shows one of `never`.
    pub fn wait_env(&self, env: &str, state: &str, never: &[&str], secs: u64) -> Value {
        let deadline = std::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let e = self
                .api
                .get(&format!("/v1/environments/{env}"))
                .expect("showing the environment");
            if e["state"] == state {
                return e;
            }
            assert!(
                !never.iter().any(|n| e["state"] == *n),
                "environment {env} went {}: {e}",
                e["state"]
            );
            assert!(
                std::time::Instant::now() < deadline,
                "environment {env} never {state}: {e}\ndaemon log tail:\n{}",
                tail(&self.log(), 3000)
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Waits until the guest's agent has reported how cloud-init ended
    /// (`cloud_init` no longer `running`), and returns the VM; panics with
    /// its console after `secs`.
    pub fn wait_cloud_init(&self, id: &str, secs: u64) -> Value {
        let deadline = std::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let v = self.vm(id);
            if v["cloud_init"].as_str().is_some_and(|c| c != "running") {
                return v;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "cloud-init did not finish in {secs} s: {v}\nconsole:\n{}",
                self.api
                    .get_text(&format!("/v1/vms/{id}/console?bytes=8192"))
                    .unwrap_or_default()
            );
            std::thread::sleep(Duration::from_secs(2));
        }
    }

    /// Waits up to `secs` for no QEMU of this daemon to be left, and says
    /// whether none is.
    pub fn no_qemu_left(&self, secs: u64) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(secs);
        while !qemus_under(&self.dir).is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        qemus_under(&self.dir).is_empty()
    }

    /// Waits for a state through the API's own wait.
    pub fn wait(&self, id: &str, state: &str, secs: u64) -> Result<Value, String> {
        self.api
            .get(&format!(
                "/v1/vms/{id}/wait?state={state}&timeout_secs={secs}"
            ))
            .map_err(|e| {
                // What the control plane holds of the VM and its node, to
                // tell a report that never came from one that was refused.
                let vm = self.api.get(&format!("/v1/vms/{id}")).unwrap_or_default();
                let nodes = self.api.get("/v1/nodes").unwrap_or_default();
                let node = |k: &str| nodes[0][k].clone();
                format!(
                    "{e}; the VM: {vm}; its node: status {} last heartbeat {}; daemon log tail:\n{}",
                    node("status"),
                    node("last_heartbeat_at"),
                    tail(&self.log(), 3000)
                )
            })
    }

    /// Runs a command through the guest agent; (stdout, stderr, exit code).
    pub fn exec(&self, id: &str, argv: &[&str]) -> Result<(String, String, Option<i32>), String> {
        self.exec_with(id, json!({"argv": argv, "timeout_secs": 60}))
    }

    pub fn exec_with(
        &self,
        id: &str,
        body: Value,
    ) -> Result<(String, String, Option<i32>), String> {
        let lines = self.api.post_lines(&format!("/v1/vms/{id}/exec"), body)?;
        exec_result(&lines)
    }

    /// The QEMU pid of a VM, from its pidfile.
    pub fn qemu_pid(&self, id: &str) -> Option<u32> {
        std::fs::read_to_string(self.vm_dir(id).join("qemu.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

/// Whether a process is alive (and not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| !r.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// Every QEMU process whose command line mentions `dir`.
pub fn qemus_under(dir: &Path) -> Vec<u32> {
    let needle = dir.display().to_string();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd);
        if cmd.contains("qemu-system") && cmd.contains(&needle) && alive(pid) {
            out.push(pid);
        }
    }
    out
}

pub fn tail(s: &str, n: usize) -> &str {
    let start = s.len().saturating_sub(n);
    let start = (start..=s.len())
        .find(|i| s.is_char_boundary(*i))
        .unwrap_or(0);
    &s[start..]
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9_node();
        for i in 1..=self.extra.len() {
            self.kill9_extra_node(i);
        }
        self.kill9();
        for pid in qemus_under(&self.dir) {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
        }
        if !self.keep {
            std::thread::sleep(Duration::from_millis(200));
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// An exec's NDJSON events as (stdout, stderr, exit code).
pub fn exec_result(lines: &[Value]) -> Result<(String, String, Option<i32>), String> {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    for l in lines {
        if let Some(s) = l.get("stdout").and_then(Value::as_str) {
            out.extend(B64.decode(s).unwrap_or_default());
        } else if let Some(s) = l.get("stderr").and_then(Value::as_str) {
            err.extend(B64.decode(s).unwrap_or_default());
        } else if let Some(x) = l.get("exit") {
            return Ok((
                String::from_utf8_lossy(&out).into_owned(),
                String::from_utf8_lossy(&err).into_owned(),
                x["code"].as_i64().map(|c| c as i32),
            ));
        } else if let Some(e) = l.get("error") {
            return Err(format!("exec error: {e}"));
        }
    }
    Err("the exec stream ended without an exit".into())
}

/// A certificate authority of a test's own, made with `openssl`, and a
/// server certificate it signed for 127.0.0.1 and localhost.
pub struct TestCa {
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

impl TestCa {
    /// Makes the CA and the server's certificate in `dir`.
    pub fn new(dir: &Path) -> TestCa {
        std::fs::create_dir_all(dir).expect("the CA's directory");
        let ca = TestCa {
            ca_cert: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
        };
        let ca_key = dir.join("ca.key");
        let csr = dir.join("server.csr");
        let ext = dir.join("server.ext");
        std::fs::write(
            &ext,
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
             keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
        )
        .expect("the extensions file");
        let openssl = |args: &[&str]| {
            let o = Command::new("openssl")
                .args(args)
                .output()
                .expect("running openssl (Debian's openssl package)");
            assert!(
                o.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        };
        let p = |p: &Path| p.display().to_string();
        let (ca_pem, ca_key, server_pem, server_key) = (
            p(&ca.ca_cert),
            p(&ca_key),
            p(&ca.server_cert),
            p(&ca.server_key),
        );
        let (csr, ext) = (p(&csr), p(&ext));
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let subj_ca = ["-subj", "/CN=BytePort test CA", "-days", "2"];
        let ca_ext = [
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ];
        let out = ["-keyout", &ca_key, "-out", &ca_pem];
        openssl(&[&["req", "-x509"][..], &ec, &out, &subj_ca, &ca_ext].concat());
        let out = [
            "-keyout",
            &server_key,
            "-out",
            &csr,
            "-subj",
            "/CN=127.0.0.1",
        ];
        openssl(&[&["req"][..], &ec, &out].concat());
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_pem,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-out",
            &server_pem,
            "-days",
            "2",
            "-extfile",
            &ext,
        ]);
        ca
    }
}

/// A blocking client of the `/v1` API.
#[derive(Clone)]
pub struct Api {
    agent: ureq::Agent,
    pub base: String,
    pub token: Option<String>,
}

impl Api {
    /// Registers a built guest image (`build/images/NAME`) and uploads its
    /// files, under `name` if given.
    pub fn import_image_as(&self, dir: &Path, name: Option<&str>) {
        self.import_image_edited(dir, |m| {
            if let Some(n) = name {
                m["name"] = json!(n);
            }
        });
    }

    /// Imports the image in `dir` with its manifest changed by `edit`
    /// first (another name, `has_agent: false`, ...).
    pub fn import_image_edited(&self, dir: &Path, edit: impl FnOnce(&mut Value)) {
        let mut m: Value =
            serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).expect("manifest"))
                .expect("manifest JSON");
        edit(&mut m);
        let file = |k: &str| dir.join(m[k].as_str().expect("a file name"));
        let sha = |p: &Path| {
            use sha2::Digest;
            hex::encode(sha2::Sha256::digest(std::fs::read(p).expect("read")))
        };
        let kernel = file("kernel");
        let initramfs = m["format"] == "initramfs";
        let mut files = vec![("kernel", kernel.clone())];
        let main = if initramfs {
            file("initrd")
        } else {
            files.push(("initrd", file("initrd")));
            file("disk")
        };
        files.insert(0, ("image", main.clone()));
        let size = std::fs::metadata(&main).expect("image file").len();
        self.post(
            "/v1/images",
            json!({
                "name": m["name"], "os_family": m["os_family"], "os_version": m["os_version"],
                "arch": m["arch"], "format": m["format"], "size_bytes": size,
                "sha256": sha(&main), "boot": m["boot"], "kernel_sha256": sha(&kernel),
                "initrd_sha256": if initramfs { Value::Null } else { json!(sha(&file("initrd"))) },
                "cmdline": m["cmdline"], "has_agent": m["has_agent"],
                "login_user": m["login_user"],
            }),
        )
        .expect("registering the image");
        let name = m["name"].as_str().expect("the image's name");
        for (role, path) in &files {
            self.put_file(&format!("/v1/images/{name}/files/{role}"), path)
                .expect("uploading an image file");
        }
    }

    pub fn new(base: &str, token: Option<String>) -> Api {
        Api::with(base, token, byteport_trust::Trust::system())
    }

    /// A client that trusts the CA bundle `ca` besides the system's store.
    pub fn trusting(base: &str, token: Option<String>, ca: &Path) -> Api {
        let trust = byteport_trust::Trust::load(Some(ca)).expect("the test CA");
        Api::with(base, token, trust)
    }

    fn with(base: &str, token: Option<String>, trust: byteport_trust::Trust) -> Api {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(700)))
            .tls_config(trust.ureq())
            .build()
            .into();
        Api {
            agent,
            base: base.to_owned(),
            token,
        }
    }

    fn auth(&self) -> String {
        format!("Bearer {}", self.token.as_deref().unwrap_or(""))
    }

    fn finish(mut resp: ureq::http::Response<ureq::Body>) -> Result<Value, String> {
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if status >= 400 {
            return Err(format!(
                "{status}: {}",
                v["error"]["message"].as_str().unwrap_or(&v.to_string())
            ));
        }
        Ok(v)
    }

    pub fn get(&self, path: &str) -> Result<Value, String> {
        let r = self
            .agent
            .get(&format!("{}{path}", self.base))
            .header("Authorization", &self.auth())
            .call()
            .map_err(|e| e.to_string())?;
        Self::finish(r)
    }

    pub fn get_text(&self, path: &str) -> Result<String, String> {
        let mut r = self
            .agent
            .get(&format!("{}{path}", self.base))
            .header("Authorization", &self.auth())
            .call()
            .map_err(|e| e.to_string())?;
        let status = r.status().as_u16();
        let text = r.body_mut().read_to_string().map_err(|e| e.to_string())?;
        if status >= 400 {
            return Err(format!("{status}: {text}"));
        }
        Ok(text)
    }

    pub fn post(&self, path: &str, body: Value) -> Result<Value, String> {
        let r = self
            .agent
            .post(&format!("{}{path}", self.base))
            .header("Authorization", &self.auth())
            .send_json(&body)
            .map_err(|e| e.to_string())?;
        Self::finish(r)
    }

    pub fn put(&self, path: &str, body: Value) -> Result<Value, String> {
        let r = self
            .agent
            .put(&format!("{}{path}", self.base))
            .header("Authorization", &self.auth())
            .send_json(&body)
            .map_err(|e| e.to_string())?;
        Self::finish(r)
    }

    pub fn patch(&self, path: &str, body: Value) -> Result<Value, String> {
        let r = self
            .agent
            .patch(&format!("{}{path}", self.base))
            .header("Authorization", &self.auth())
            .send_json(&body)
            .map_err(|e| e.to_string())?;
        Self::finish(r)
    }

    pub fn delete(&self, path: &str) -> Result<Value, String> {
        let r = self
            .agent
            .delete(&format!("{}{path}", self.base))
            .header("Authorization", &self.auth())
            .call()
            .map_err(|e| e.to_string())?;
        Self::finish(r)
    }

    pub fn put_file(&self, path: &str, file: &Path) -> Result<Value, String> {
        let mut f = std::fs::File::open(file).map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf).map_err(|e| e.to_string())?;
        let r = self
            .agent
            .put(&format!("{}{path}", self.base))
            .header("Authorization", &self.auth())
            .header("Content-Type", "application/octet-stream")
            .send(&buf[..])
            .map_err(|e| e.to_string())?;
        Self::finish(r)
    }

    /// PUTs raw bytes (a file's contents).
    pub fn put_bytes(&self, path: &str, body: &[u8]) -> Result<Value, String> {
        let r = self
            .agent
            .put(&format!("{}{path}", self.base))
            .header("Authorization", &self.auth())
            .header("Content-Type", "application/octet-stream")
            .send(body)
            .map_err(|e| e.to_string())?;
        Self::finish(r)
    }

    /// GETs raw bytes, with the value of one response header.
    pub fn get_bytes(&self, path: &str, header: &str) -> Result<(Option<String>, Vec<u8>), String> {
        let mut r = self
            .agent
            .get(&format!("{}{path}", self.base))
            .header("Authorization", &self.auth())
            .call()
            .map_err(|e| e.to_string())?;
        if r.status().as_u16() >= 400 {
            return Err(Self::finish(r).err().unwrap_or_default());
        }
        let value = r
            .headers()
            .get(header)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = r
            .body_mut()
            .with_config()
            .limit(1 << 30)
            .read_to_vec()
            .map_err(|e| e.to_string())?;
        Ok((value, body))
    }

    /// POSTs and reads an NDJSON response line by line.
    pub fn post_lines(&self, path: &str, body: Value) -> Result<Vec<Value>, String> {
        let mut r = self
            .agent
            .post(&format!("{}{path}", self.base))
            .header("Authorization", &self.auth())
            .send_json(&body)
            .map_err(|e| e.to_string())?;
        if r.status().as_u16() >= 400 {
            return Err(Self::finish(r).err().unwrap_or_default());
        }
        let reader = BufReader::new(r.body_mut().as_reader());
        let mut out = Vec::new();
        for line in reader.lines() {
            let line = line.map_err(|e| e.to_string())?;
            if !line.trim().is_empty() {
                out.push(serde_json::from_str(&line).map_err(|e| e.to_string())?);
            }
        }
        Ok(out)
    }
}

/// Hex SHA-256 of some bytes.
pub fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}
