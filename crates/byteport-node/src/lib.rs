//! The node agent: one per host. It registers with the control plane (once,
//! with a join token; its own credential is kept in its data directory),
//! heartbeats its capacity and the observed state of its VMs, and runs one
//! task per VM that moves the VM towards the desired state each heartbeat
//! answers with. It dials the control plane for everything: heartbeats,
//! image downloads, and a WebSocket channel over which the control plane
//! asks for consoles and execs. It never needs to be reachable itself.
//!
//! It owns drivers, disks, networks and the VM directories; it does not own
//! placement (the scheduler's) or the API (the control plane's).

pub mod bridge;
pub mod cgroup;
pub mod channel;
pub mod client;
pub mod console_log;
pub mod driver;
pub mod generation;
pub mod images;
pub mod metadata;
pub mod network;
pub mod runs;
pub mod ssh;
pub mod stats;
pub mod template;
pub mod vm;

use byteport_guest::host::GuestConn;
use byteport_types::api::{
    Capacity, DesiredVm, Engine, EngineUnavailable, Execution, Heartbeat, NodeRegister, OrphanVm,
    Platform, VmReport,
};
use byteport_types::vm_state::ObservedState;
use byteport_types::{Name, NodeId, VmId};
use client::ControlPlane;
use driver::{Accel, Driver};
use images::ImageCache;
use network::UserNet;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, watch};

/// How the agent is set up.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// The control plane's base URL, `http://host:port` or `https://...`.
    pub server: String,
    /// The roots the control plane's certificate is checked against.
    pub trust: byteport_trust::Trust,
    /// Needed only for the first start; the credential is kept after.
    pub join_token: Option<String>,
    pub data_dir: PathBuf,
    pub name: Name,
    pub region: String,
    /// The host address port forwards listen on.
    pub forward_host: String,
    pub forward_ports: std::ops::RangeInclusive<u16>,
    /// How long a guest has to power off before QEMU is told to quit.
    pub stop_timeout: Duration,
    pub heartbeat_interval: Duration,
    /// `auto` probes KVM once at start; `kvm` or `tcg` force one.
    pub accel: AccelChoice,
    pub qemu_binary: PathBuf,
    /// The metadata relay's port on 127.0.0.1; 0 keeps the one used
    /// before, or takes a free one.
    pub metadata_port: u16,
    /// How VMs are connected.
    pub network: NetworkChoice,
    /// Run-code clones to keep restored and waiting, per template.
    pub run_pool: usize,
    /// Whether runs start as clones of templates (else each boots cold).
    pub run_templates: bool,
    /// Bytes of a VM's serial console log kept before it is cut (see
    /// [`console_log`]).
    pub console_log_max: u64,
    /// The program QEMU runs per guest connection to the metadata address,
    /// with its arguments; the relay's address is added last. This
    /// daemon's own `metadata-pipe` unless set.
    pub metadata_pipe: Vec<String>,
    /// A program, with its arguments, that starts run-code's QEMUs with
    /// transparent huge pages off (QEMU's binary and arguments are added
    /// last); empty: they are started directly. byteportd sets its own
    /// `qemu-no-thp`.
    pub qemu_launcher: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccelChoice {
    Auto,
    Kvm,
    Tcg,
}

/// How a node connects its VMs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetworkChoice {
    /// Bridged where the node can (root, `ip`, `nft`, `dnsmasq`), else
    /// user-mode.
    Auto,
    /// QEMU's restricted user-mode network only.
    User,
    /// Bridged, or the node does not start.
    Bridge,
}

impl std::str::FromStr for NetworkChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(NetworkChoice::Auto),
            "user" => Ok(NetworkChoice::User),
            "bridge" => Ok(NetworkChoice::Bridge),
            _ => Err(format!("{s:?} is not auto, user or bridge")),
        }
    }
}

impl std::str::FromStr for AccelChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(AccelChoice::Auto),
            "kvm" => Ok(AccelChoice::Kvm),
            "tcg" => Ok(AccelChoice::Tcg),
            _ => Err(format!("{s:?} is not auto, kvm or tcg")),
        }
    }
}

impl NodeConfig {
    pub fn new(server: &str, data_dir: PathBuf, name: Name) -> Self {
        NodeConfig {
            server: server.to_owned(),
            trust: byteport_trust::Trust::system(),
            join_token: None,
            data_dir,
            name,
            region: "default".into(),
            forward_host: "127.0.0.1".into(),
            forward_ports: 20000..=29999,
            stop_timeout: Duration::from_secs(20),
            heartbeat_interval: Duration::from_secs(5),
            accel: AccelChoice::Auto,
            qemu_binary: PathBuf::from("qemu-system-x86_64"),
            metadata_port: 0,
            network: NetworkChoice::Auto,
            run_pool: 1,
            run_templates: true,
            console_log_max: console_log::DEFAULT_MAX,
            metadata_pipe: std::env::current_exe()
                .map(|p| vec![p.display().to_string(), "metadata-pipe".into()])
                .unwrap_or_default(),
            qemu_launcher: Vec::new(),
        }
    }
}

/// What the agent failed with at start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Client(#[from] client::ClientError),
}

/// The node's identity, kept in `node.json` in its data directory.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Identity {
    pub id: NodeId,
    pub name: String,
    pub credential: String,
    pub server: String,
}

/// State every VM task and the channel share.
pub struct Shared<D: Driver> {
    pub driver: D,
    pub cp: ControlPlane,
    pub identity: Identity,
    pub images: ImageCache,
    pub net: UserNet,
    /// Bridged networks, when the node runs them.
    pub bridge: Option<bridge::BridgeNet>,
    /// Each VM's cgroup.
    pub cgroups: cgroup::Cgroups,
    /// Run-code: templates and their clones.
    pub runs: runs::Runs,
    pub accel: Accel,
    /// The guest architectures this node runs, and how.
    pub platforms: Vec<Platform>,
    /// The hypervisor engines it has (`qemu`, and `microvm` where its
    /// x86_64 QEMU has that machine).
    pub engines: Vec<String>,
    /// The engines it lacks, each with why.
    pub unavailable_engines: Vec<EngineUnavailable>,
    pub vms_dir: PathBuf,
    pub stop_timeout: Duration,
    /// What QEMU runs per guest connection to 10.0.2.254:80: a pipe
    /// to the node's metadata relay (see [`network::pipe_stdio`]).
    pub metadata_pipe: Vec<String>,
    /// The latest observation of each VM, sent with every heartbeat.
    pub reports: Mutex<HashMap<VmId, VmReport>>,
    /// Where each report's generation comes from.
    pub generations: generation::Generations,
    /// Connected, ready guest agents.
    pub guests: Mutex<HashMap<VmId, GuestConn>>,
    /// The node's own SSH key, for images without the agent (none when
    /// this host has no `ssh-keygen`).
    pub ssh_key: Option<ssh::NodeKey>,
    /// VMs without the agent whose image has a login user: exec reaches
    /// them over SSH as that user.
    pub ssh_users: Mutex<HashMap<VmId, String>>,
    /// Heartbeat now (a VM changed, or the control plane poked).
    pub wake: Notify,
    /// VMs here that the control plane's answer does not list: stopped,
    /// kept, and reported until they are adopted or removed.
    pub orphans: Mutex<HashMap<VmId, OrphanVm>>,
    /// Orphans an admin asked to remove, deleted at the next reconcile.
    pub remove_orphans: Mutex<std::collections::HashSet<VmId>>,
    /// Each guest's metadata requests, limited before they are relayed.
    pub metadata_limits: byteport_types::rate::Buckets<VmId>,
}

impl<D: Driver> Shared<D> {
    pub fn credential(&self) -> String {
        self.identity.credential.clone()
    }

    /// How this node runs guests of `arch`, if it does.
    pub fn execution(&self, arch: &str) -> Option<Execution> {
        self.platforms
            .iter()
            .find(|p| p.arch == arch)
            .map(|p| p.execution)
    }

    /// The acceleration for a guest of `arch`: KVM for the host's own
    /// architecture where it works, emulation for every other.
    pub fn accel_for(&self, arch: &str) -> Accel {
        match self.execution(arch) {
            Some(Execution::Native) => self.accel,
            _ => Accel::Tcg,
        }
    }

    pub fn vm_dir(&self, id: VmId) -> PathBuf {
        self.vms_dir.join(id.to_string())
    }
}

fn read_meminfo_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(1024, |kb| kb / 1024)
}

async fn disk_gib(dir: &std::path::Path) -> u64 {
    let out = tokio::process::Command::new("df")
        .arg("-Pk")
        .arg(dir)
        .output()
        .await;
    out.ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .nth(1)
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
        })
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(10, |kb| kb / 1024 / 1024)
}

/// The host's capacity for VMs.
pub async fn detect_capacity(dir: &std::path::Path) -> Capacity {
    Capacity {
        vcpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
        memory_mib: read_meminfo_mib(),
        disk_gib: disk_gib(dir).await,
    }
}

async fn choose_accel(cfg: &NodeConfig, images: &ImageCache) -> (Accel, String) {
    match cfg.accel {
        AccelChoice::Kvm => (Accel::Kvm, "KVM (forced)".into()),
        AccelChoice::Tcg => (Accel::Tcg, "TCG (forced)".into()),
        AccelChoice::Auto => {
            let Some(kernel) = images.any_kernel() else {
                return (
                    Accel::Tcg,
                    "TCG: no kernel cached yet to prove KVM with".into(),
                );
            };
            match driver::qemu::probe_kvm(&cfg.qemu_binary, &kernel, Duration::from_secs(8)).await {
                Ok(()) => (Accel::Kvm, "KVM: a Linux kernel booted under it".into()),
                Err(why) => (Accel::Tcg, format!("TCG: {why}")),
            }
        }
    }
}

/// The guest architectures this host runs: its own (natively with KVM,
/// else emulated), then each other one whose QEMU is installed, emulated.
pub fn detect_platforms(qemu: &std::path::Path, accel: Accel) -> Vec<Platform> {
    let host = std::env::consts::ARCH;
    let mut out = vec![Platform {
        arch: host.into(),
        execution: if accel == Accel::Kvm {
            Execution::Native
        } else {
            Execution::Emulated
        },
    }];
    for arch in driver::qemu::ARCHS.iter().filter(|a| **a != host) {
        if driver::qemu::runnable(&driver::qemu::binary_for(qemu, arch)) {
            out.push(Platform {
                arch: (*arch).into(),
                execution: Execution::Emulated,
            });
        }
    }
    out
}

/// The engines this host has: `qemu`, and `microvm` where the x86_64
/// QEMU has that machine.
pub async fn detect_engines(qemu: &std::path::Path) -> Vec<String> {
    let mut out = vec![Engine::Qemu.as_str().to_owned()];
    let x86 = driver::qemu::binary_for(qemu, "x86_64");
    if driver::qemu::has_microvm(&x86).await {
        out.push(Engine::Microvm.as_str().to_owned());
    }
    out
}

/// Why this node lacks each engine it does not have: `kvm_why` says how
/// the accelerator was chosen (a KVM probe's failure, say).
pub fn unavailable_engines(have: &[String], kvm: bool, kvm_why: &str) -> Vec<EngineUnavailable> {
    Engine::ALL
        .iter()
        .filter(|e| !have.iter().any(|h| h == e.as_str()))
        .map(|e| EngineUnavailable {
            engine: e.as_str().to_owned(),
            reason: match e {
                Engine::Qemu => "QEMU is not installed".into(),
                Engine::Microvm => "the x86_64 QEMU has no microvm machine".into(),
                Engine::Libvirt => {
                    "no libvirt connection (start the node with --libvirt-uri)".into()
                }
                Engine::Firecracker if !kvm => {
                    format!("Firecracker needs KVM, and this host has none that works ({kvm_why})")
                }
                Engine::Firecracker => "this node agent has no Firecracker driver yet".into(),
            },
        })
        .collect()
}

/// Loads the node's identity, or registers with the join token.
async fn identity(
    cfg: &NodeConfig,
    cp: &ControlPlane,
    cap: Capacity,
    kvm: bool,
    platforms: &[Platform],
    engines: &[String],
    unavailable: &[EngineUnavailable],
) -> Result<Identity, NodeError> {
    let path = cfg.data_dir.join("node.json");
    if let Ok(b) = std::fs::read(&path) {
        let id: Identity = serde_json::from_slice(&b)
            .map_err(|e| NodeError::Setup(format!("{} is damaged: {e}", path.display())))?;
        return Ok(id);
    }
    let Some(token) = &cfg.join_token else {
        return Err(NodeError::Setup(format!(
            "this node is not registered yet ({} is missing): start it once with --join-token",
            path.display()
        )));
    };
    let reg = cp
        .register(NodeRegister {
            join_token: token.clone(),
            name: cfg.name.clone(),
            region: cfg.region.clone(),
            arch: std::env::consts::ARCH.into(),
            engines: engines.to_vec(),
            unavailable_engines: unavailable.to_vec(),
            kvm,
            capacity: cap,
            platforms: platforms.to_vec(),
        })
        .await?;
    let ident = Identity {
        id: reg.node.id,
        name: reg.node.name.to_string(),
        credential: reg.credential,
        server: cfg.server.clone(),
    };
    let tmp = cfg.data_dir.join(".node.json.tmp");
    // The credential: the owner's only, from the first byte.
    let _ = std::fs::remove_file(&tmp);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| {
            std::io::Write::write_all(
                &mut f,
                &serde_json::to_vec_pretty(&ident).unwrap_or_default(),
            )
        })
        .and_then(|_| std::fs::rename(&tmp, &path))
        .map_err(|e| NodeError::Setup(format!("cannot save {}: {e}", path.display())))?;
    tracing::info!(node = %ident.id, name = %ident.name, "registered with the control plane");
    Ok(ident)
}

/// A VM task's handle: the desired state goes in through a watch channel.
struct Handle {
    tx: watch::Sender<DesiredVm>,
    task: tokio::task::JoinHandle<()>,
}

/// Runs the node agent until the process ends.
pub async fn run<D: Driver>(cfg: NodeConfig, driver: D) -> Result<(), NodeError> {
    std::fs::create_dir_all(cfg.data_dir.join("vms"))
        .map_err(|e| NodeError::Setup(format!("cannot create {}: {e}", cfg.data_dir.display())))?;
    let images = ImageCache::new(cfg.data_dir.join("images"));
    let (accel, why) = choose_accel(&cfg, &images).await;
    tracing::info!(accel = ?accel, "{why}");
    let cp = ControlPlane::new(&cfg.server, cfg.trust.clone());
    let cap = detect_capacity(&cfg.data_dir).await;
    let platforms = detect_platforms(&cfg.qemu_binary, accel);
    tracing::info!(
        platforms = %platforms
            .iter()
            .map(|p| format!("{} ({})", p.arch, p.execution.as_str()))
            .collect::<Vec<_>>()
            .join(", "),
        "guest architectures"
    );
    let mut engines = detect_engines(&cfg.qemu_binary).await;
    engines.extend(driver.engines().iter().map(|e| e.as_str().to_owned()));
    let unavailable = unavailable_engines(&engines, accel == Accel::Kvm, &why);
    tracing::info!(
        engines = %engines.join(", "),
        unavailable = %unavailable
            .iter()
            .map(|u| format!("{} ({})", u.engine, u.reason))
            .collect::<Vec<_>>()
            .join("; "),
        "engines"
    );
    let ident = identity(
        &cfg,
        &cp,
        cap,
        accel == Accel::Kvm,
        &platforms,
        &engines,
        &unavailable,
    )
    .await?;
    let relay = metadata::bind(&cfg.data_dir, cfg.metadata_port)
        .await
        .map_err(|e| NodeError::Setup(format!("cannot listen for metadata requests: {e}")))?;
    let metadata_port = relay.local_addr().map(|a| a.port()).unwrap_or(0);
    tracing::info!(port = metadata_port, "metadata relay on 127.0.0.1");
    let mut metadata_pipe = cfg.metadata_pipe.clone();
    if metadata_pipe.is_empty() {
        return Err(NodeError::Setup("no metadata pipe program is set".into()));
    }
    metadata_pipe.push(format!("127.0.0.1:{metadata_port}"));
    // QEMU splits the command itself; a quote would change its words.
    if metadata_pipe.iter().any(|w| w.contains('\'')) {
        return Err(NodeError::Setup(format!(
            "the metadata pipe program's path may not hold a quote: {metadata_pipe:?}"
        )));
    }
    let bridge = match (cfg.network, bridge::unavailable()) {
        (NetworkChoice::User, _) => None,
        (NetworkChoice::Bridge, Some(why)) => {
            return Err(NodeError::Setup(format!("bridged networking: {why}")));
        }
        (NetworkChoice::Auto, Some(why)) => {
            tracing::info!("user-mode networking: {why}");
            None
        }
        (_, None) => Some(
            bridge::BridgeNet::new(cfg.data_dir.join("net"), metadata_port, &cfg.forward_host)
                .map_err(|e| NodeError::Setup(format!("bridged networking: {e}")))?,
        ),
    };
    tracing::info!(
        network = if bridge.is_some() { "bridge" } else { "user" },
        "VM networking"
    );
    let cgroups = cgroup::Cgroups::detect(ident.id);
    tracing::info!(cgroups = cgroups.describe(), "one cgroup per VM");
    let shared = Arc::new(Shared {
        driver,
        cp: cp.clone(),
        identity: ident.clone(),
        images,
        net: UserNet::new(cfg.forward_host.clone(), cfg.forward_ports.clone()),
        bridge,
        cgroups,
        runs: runs::Runs::new(
            template::QemuCommand {
                binary: cfg.qemu_binary.clone(),
                launcher: cfg.qemu_launcher.clone(),
            },
            accel,
            cfg.data_dir.join("runs"),
            &ident.id.to_string(),
            cfg.run_pool,
            cfg.run_templates,
        ),
        accel,
        platforms,
        engines,
        unavailable_engines: unavailable,
        vms_dir: cfg.data_dir.join("vms"),
        stop_timeout: cfg.stop_timeout,
        metadata_pipe,
        reports: Mutex::default(),
        generations: generation::Generations::open(cfg.data_dir.join("report-generation")),
        guests: Mutex::default(),
        ssh_key: ssh::NodeKey::ensure(&cfg.data_dir.join("ssh")).await,
        ssh_users: Mutex::default(),
        wake: Notify::new(),
        orphans: Mutex::default(),
        remove_orphans: Mutex::default(),
        metadata_limits: byteport_types::rate::Buckets::new(
            byteport_types::rate::METADATA_BURST,
            byteport_types::rate::METADATA_PER_SECOND,
        ),
    });
    let mut tasks: HashMap<VmId, Handle> = HashMap::new();
    // Re-adopt what was here before a restart.
    let mut before = Vec::new();
    for e in std::fs::read_dir(&shared.vms_dir)
        .into_iter()
        .flatten()
        .flatten()
    {
        let Ok(b) = std::fs::read(e.path().join(driver::files::STATE)) else {
            continue;
        };
        let Ok(p) = serde_json::from_slice::<vm::Persisted>(&b) else {
            continue;
        };
        before.push(p);
    }
    // The firewall first, from what the VMs held: their port maps and
    // isolation hold again before any task runs.
    if let Some(b) = &shared.bridge {
        b.restore(before.iter().filter_map(|p| p.net.clone()).collect())
            .map_err(NodeError::Setup)?;
        b.sweep();
    }
    for p in before {
        tasks.insert(p.spec.id, spawn_vm(&shared, p.spec));
    }
    shared.cgroups.sweep(&|vm| tasks.contains_key(&vm));
    tokio::spawn(channel::run(shared.clone()));
    tokio::spawn(metadata::serve(shared.clone(), relay));
    tokio::spawn(console_log::keep_bounded(
        shared.vms_dir.clone(),
        cfg.console_log_max,
    ));
    let mut backoff = Duration::from_millis(200);
    let mut sampler = stats::Sampler::default();
    loop {
        let mut vm_stats = sampler.sample(&shared.vms_dir, tasks.keys().copied());
        for s in &mut vm_stats {
            s.cgroup_memory_mib = shared.cgroups.memory_bytes(s.id).map(|b| b >> 20);
            s.cgroup_memory_limit_mib = shared.cgroups.memory_limit(s.id).map(|b| b >> 20);
        }
        let reports: Vec<VmReport> = shared
            .reports
            .lock()
            .map(|r| r.values().cloned().collect())
            .unwrap_or_default();
        let usage = usage(&tasks);
        let hb = Heartbeat {
            capacity: cap,
            usage,
            vms: reports,
            vm_stats,
            networks: shared
                .bridge
                .as_ref()
                .map(|b| b.networks())
                .unwrap_or_default(),
            orphans: shared
                .orphans
                .lock()
                .map(|o| o.values().cloned().collect())
                .unwrap_or_default(),
            platforms: shared.platforms.clone(),
            engines: shared.engines.clone(),
            unavailable_engines: Some(shared.unavailable_engines.clone()),
        };
        match cp.heartbeat(ident.id, &ident.credential, hb).await {
            Ok(resp) => {
                backoff = Duration::from_millis(200);
                reconcile(&shared, &mut tasks, resp.vms);
            }
            Err(e) => {
                tracing::warn!(error = %e, "heartbeat failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        }
        // A change heartbeats at once; `Notify` folds a burst of changes
        // made while a heartbeat is in flight into the next one.
        tokio::select! {
            _ = shared.wake.notified() => {}
            _ = tokio::time::sleep(cfg.heartbeat_interval) => {}
        }
    }
}

fn usage(tasks: &HashMap<VmId, Handle>) -> Capacity {
    let mut u = Capacity::default();
    for h in tasks.values() {
        let d = h.tx.borrow();
        u.vcpus += d.vcpus;
        u.memory_mib += d.memory_mib;
        u.disk_gib += d.disk_gib;
    }
    u
}

fn spawn_vm<D: Driver>(shared: &Arc<Shared<D>>, spec: DesiredVm) -> Handle {
    let (tx, rx) = watch::channel(spec.clone());
    let task = vm::VmTask::new(shared.clone(), spec);
    Handle {
        tx,
        task: tokio::spawn(task.run(rx)),
    }
}

/// Hands each VM task its desired state; starts tasks for new VMs; stops
/// and reports as orphans the VMs the control plane does not list.
fn reconcile<D: Driver>(
    shared: &Arc<Shared<D>>,
    tasks: &mut HashMap<VmId, Handle>,
    desired: Vec<DesiredVm>,
) {
    let listed: std::collections::HashSet<VmId> = desired.iter().map(|d| d.id).collect();
    for d in desired {
        match tasks.get(&d.id) {
            Some(h) if !h.task.is_finished() => {
                h.tx.send_if_modified(|cur| {
                    let changed = cur.desired_generation != d.desired_generation
                        || cur.desired_state != d.desired_state
                        || cur.restart != d.restart;
                    if changed {
                        *cur = d.clone();
                    }
                    changed
                });
            }
            Some(_) => {
                // The task finished (deleted) but the control plane still
                // lists the VM until it takes the report; keep reporting.
            }
            None => {
                if d.desired_state == byteport_types::DesiredState::Deleted
                    && !shared.vm_dir(d.id).exists()
                {
                    // Nothing here: say so.
                    report_gone(shared, d.id, d.desired_generation);
                    continue;
                }
                tasks.insert(d.id, spawn_vm(shared, d));
            }
        }
    }
    // VMs here that the control plane does not list. One it asked to
    // delete goes on being deleted; any other is never deleted for being
    // unlisted (a restored backup or a forged answer would take every VM
    // of the node): it is an orphan, stopped with its disk kept, and
    // reported until an admin adopts or removes it.
    let gone: Vec<VmId> = tasks
        .keys()
        .filter(|id| !listed.contains(id))
        .copied()
        .collect();
    let mut orphans = shared.orphans.lock().unwrap_or_else(|e| e.into_inner());
    let mut removing = shared
        .remove_orphans
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    orphans.retain(|id, _| !listed.contains(id));
    for id in gone {
        let Some(h) = tasks.get(&id) else { continue };
        if h.task.is_finished() {
            tasks.remove(&id);
            orphans.remove(&id);
            removing.remove(&id);
            if let Ok(mut r) = shared.reports.lock() {
                r.remove(&id);
            }
            continue;
        }
        let remove = removing.contains(&id);
        let mut orphan = None;
        h.tx.send_modify(|d| {
            use byteport_types::DesiredState as D;
            if remove && d.desired_state != D::Deleted {
                tracing::info!(vm = %id, "removing an orphan, as an admin asked");
                d.desired_state = D::Deleted;
            } else if !remove && d.desired_state != D::Deleted {
                if d.desired_state != D::Stopped {
                    tracing::warn!(
                        vm = %id,
                        "the control plane does not list this VM: stopping it and keeping its disk as an orphan"
                    );
                    d.desired_state = D::Stopped;
                }
                orphan = Some(OrphanVm {
                    id,
                    name: d.name.clone(),
                    project_id: d.project_id,
                    image: d.image.name.clone(),
                    vcpus: d.vcpus,
                    memory_mib: d.memory_mib,
                    disk_gib: d.disk_gib,
                    hostname: d.hostname.clone(),
                    since: chrono::Utc::now(),
                });
            }
        });
        match orphan {
            Some(o) => {
                orphans.entry(id).or_insert(o);
            }
            None => {
                orphans.remove(&id);
            }
        }
    }
    drop((orphans, removing));
    if let Ok(mut r) = shared.reports.lock() {
        r.retain(|id, _| listed.contains(id) || tasks.contains_key(id));
    }
}

fn report_gone<D: Driver>(shared: &Arc<Shared<D>>, id: VmId, want_gen: u64) {
    if let Ok(mut r) = shared.reports.lock()
        && !r.contains_key(&id)
    {
        r.insert(
            id,
            VmReport {
                id,
                state: ObservedState::Deleted,
                generation: shared.generations.next(),
                desired_generation: want_gen,
                reason: None,
                ports: Vec::new(),
                agent_version: None,
                execution: None,
                cloud_init: None,
                network: None,
            },
        );
        shared.wake.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_engine_the_node_lacks_is_listed_with_what_it_would_take() {
        let have = ["qemu".to_string(), "microvm".to_string()];
        let u = unavailable_engines(&have, false, "TCG: a Linux kernel did not boot under KVM");
        let names: Vec<&str> = u.iter().map(|e| e.engine.as_str()).collect();
        assert_eq!(names, ["libvirt", "firecracker"]);
        assert!(u[0].reason.contains("--libvirt-uri"), "{u:?}");
        assert!(
            u[1].reason.contains("needs KVM") && u[1].reason.contains("did not boot under KVM"),
            "{u:?}"
        );
        // With KVM, Firecracker is still not claimed: there is no driver.
        let u = unavailable_engines(&have, true, "KVM");
        assert_eq!(u[1].reason, "this node agent has no Firecracker driver yet");
    }
}
