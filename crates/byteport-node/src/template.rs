//! Templates and clones: fresh VMs from a memory snapshot, the start of
//! run-code (and later of VM snapshots and forks).
//!
//! A template is a VM of a kernel-booted image, booted once with its RAM
//! in a shared file (`memory-backend-file,share=on`), stopped once its
//! guest agent is ready, and saved with `x-ignore-shared`: the migration
//! stream then holds only the device state (a few hundred KiB), the RAM
//! stays in the file. A clone
//! is a new QEMU with the same devices that maps that file privately
//! (`share=off`: copy-on-write, so its writes are its own and the template
//! is never changed), restores the device state (`-incoming defer`,
//! `migrate-incoming`) and continues: it wakes where the template stopped,
//! in well under a second instead of a boot. Each clone gets a fresh VM
//! generation id (`vmgenid,guid=auto`), so Linux reseeds its random
//! generator on restore; the guest agent is reached on the clone's own
//! socket.
//!
//! A clone does not boot, so it is given no kernel or initrd: QEMU would
//! read both into its own memory (about 10 MiB per clone) to serve them
//! to a firmware that never runs again. It gets only the option ROM that
//! `-kernel` adds (`linuxboot_dma.bin`), whose RAM the device state names;
//! should a QEMU need more than that, the restore fails, and the template's
//! clones carry the kernel again from then on.
//!
//! QEMU asks for transparent huge pages for its translated code and its
//! RAM blocks, so a clone's few MiB of each take whole 2 MiB pages (3-4
//! MiB more a clone, measured). The node starts these QEMUs through a launcher
//! ([`QemuCommand::launcher`], `byteportd qemu-no-thp`) that turns them
//! off for itself (`PR_SET_THP_DISABLE`, kept across `exec`) and becomes
//! QEMU; the node's own process, and the QEMUs of other VMs, keep them.
//!
//! The RAM file is a memfd the node holds, which QEMU opens as
//! `/proc/NODE/fd/N`: it is memory, and it goes with the node's process
//! (and the clones still mapping it), even when the node is killed, so no
//! template's RAM is ever left behind.
//!
//! QEMU 7.2 has no `file:` migration URI, so the state goes through
//! `exec:cat`, which QEMU runs with `/bin/sh -c`: the only word in it is
//! the node's own path, quoted; nothing a user sends reaches it.
//!
//! ```text
//!  build:  spawn (share=on) ──agent Ready──► stop ──migrate x-ignore-shared──► state file; quit
//!  clone:  spawn (share=off, -incoming defer) ──migrate-incoming──► cont ──agent Ready──► use; kill
//! ```

use crate::driver::Accel;
use crate::driver::qemu::AGENT_PORT_NAME;
use byteport_guest::host::GuestConn;
use byteport_qmp::Qmp;
use serde_json::json;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How long a template's guest has to say ready after its boot.
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
/// How long a save or a restore may take.
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(60);

/// How a QEMU is started: its binary, after a launcher if there is one.
#[derive(Clone, Debug)]
pub struct QemuCommand {
    pub binary: PathBuf,
    /// A program and its arguments that start the binary (given last,
    /// with QEMU's arguments) with transparent huge pages off; empty:
    /// the binary is run itself.
    pub launcher: Vec<String>,
}

impl QemuCommand {
    /// The binary, run itself.
    pub fn new(binary: impl Into<PathBuf>) -> QemuCommand {
        QemuCommand {
            binary: binary.into(),
            launcher: Vec::new(),
        }
    }

    fn command(&self) -> tokio::process::Command {
        match self.launcher.split_first() {
            None => tokio::process::Command::new(&self.binary),
            Some((program, args)) => {
                let mut c = tokio::process::Command::new(program);
                c.args(args).arg(&self.binary);
                c
            }
        }
    }
}

/// `byteportd qemu-no-thp QEMU ARGS...`: turns transparent huge pages off
/// for this process and becomes `QEMU ARGS...`; returns only on failure.
pub fn launch_without_huge_pages(qemu: &str, args: &[String]) -> std::io::Error {
    if let Err(e) = rustix::thread::disable_transparent_huge_pages(true) {
        // An older kernel: QEMU runs as it would have.
        eprintln!("byteportd qemu-no-thp: PR_SET_THP_DISABLE: {e}");
    }
    std::os::unix::process::CommandExt::exec(std::process::Command::new(qemu).args(args))
}

/// What a template boots.
#[derive(Clone, Debug)]
pub struct TemplateSpec {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
    /// A root disk, attached read-only (template and clones share it).
    pub disk: Option<PathBuf>,
    /// A command run once in the template before it is saved, so that what
    /// it reads (an interpreter, its libraries) is in the saved page cache
    /// and clones need not read it from disk.
    pub warmup: Option<Vec<String>>,
    /// A command a clone runs before it is used, when it is restored ahead
    /// of time, so that the code its use goes through is translated
    /// already (see [`crate::runs`]).
    pub prewarm: Option<Vec<String>>,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub accel: Accel,
}

/// A saved template: its RAM file and its device state.
#[derive(Debug)]
pub struct Template {
    pub spec: TemplateSpec,
    /// The template's RAM, as QEMU opens it (`/proc/NODE/fd/N`).
    pub memory: PathBuf,
    /// The memfd behind `memory`, held for as long as the template lives.
    ram: OwnedFd,
    /// The device state saved with `x-ignore-shared`.
    pub state: PathBuf,
    /// How long building it took.
    pub built_in: Duration,
    /// Whether clones boot nothing (no kernel or initrd given); cleared
    /// when a restore without them fails.
    lean: AtomicBool,
}

/// A running clone.
pub struct Clone {
    pub dir: PathBuf,
    pub pid: u32,
    pub qmp: Qmp,
    pub agent: GuestConn,
    /// From spawning QEMU to the restored guest running.
    pub restored_in: Duration,
    /// From spawning QEMU to the guest agent's Ready.
    pub ready_in: Duration,
    child: tokio::process::Child,
}

/// What a QEMU of `spec` is given to start from.
#[derive(Clone, Copy, PartialEq)]
enum Start {
    /// Boots the kernel.
    Boot,
    /// Restored from a saved state: the kernel's option ROM, not the kernel.
    Restore,
}

fn argv(spec: &TemplateSpec, dir: &Path, memory: &Path, shared: bool, start: Start) -> Vec<String> {
    let d = |f: &str| dir.join(f).display().to_string();
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    let accel = match spec.accel {
        Accel::Kvm => "kvm",
        Accel::Tcg => "tcg",
    };
    push(&[
        "-machine",
        &format!("pc,accel={accel},memory-backend=mem0"),
        "-object",
        &format!(
            "memory-backend-file,id=mem0,size={}M,mem-path={},share={}",
            spec.memory_mib,
            memory.display(),
            if shared { "on" } else { "off" }
        ),
        "-m",
        &format!("{}M", spec.memory_mib),
        "-smp",
        &spec.vcpus.to_string(),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
    ]);
    match start {
        Start::Boot => push(&[
            "-kernel",
            &spec.kernel.display().to_string(),
            "-initrd",
            &spec.initrd.display().to_string(),
            "-append",
            &spec.cmdline,
        ]),
        // What `-kernel` adds for a bzImage on a machine with fw_cfg DMA.
        Start::Restore => push(&["-option-rom", "linuxboot_dma.bin,bootindex=0"]),
    }
    if let Some(disk) = &spec.disk {
        push(&[
            "-drive",
            &format!(
                "file={},if=none,id=disk0,format=qcow2,readonly=on",
                disk.display()
            ),
            "-device",
            "virtio-blk-pci,drive=disk0",
        ]);
    }
    push(&[
        // A fresh generation id in every process: the guest reseeds its
        // random generator when a clone wakes.
        "-device",
        "vmgenid,guid=auto",
        "-device",
        "virtio-serial-pci,id=vser0",
        "-chardev",
        &format!(
            "socket,id=agent0,path={},server=on,wait=off",
            d("agent.sock")
        ),
        "-device",
        &format!("virtserialport,chardev=agent0,name={AGENT_PORT_NAME}"),
        "-chardev",
        &format!("socket,id=qmp0,path={},server=on,wait=off", d("qmp.sock")),
        "-mon",
        "chardev=qmp0,mode=control",
        "-serial",
        &format!("file:{}", d("console.log")),
        "-sandbox",
        "on,obsolete=deny",
    ]);
    a
}

fn spawn(qemu: &QemuCommand, args: &[String], dir: &Path) -> Result<tokio::process::Child, String> {
    let log = std::fs::File::create(dir.join("qemu.log"))
        .map_err(|e| format!("cannot open the QEMU log: {e}"))?;
    qemu.command()
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", qemu.binary.display()))
}

fn log_tail(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("qemu.log"))
        .unwrap_or_default()
        .trim()
        .chars()
        .rev()
        .take(400)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect()
}

async fn qmp(dir: &Path) -> Result<Qmp, String> {
    Qmp::connect_retry(&dir.join("qmp.sock"), Duration::from_secs(15))
        .await
        .map_err(|e| format!("QMP: {e}; QEMU said: {}", log_tail(dir)))
}

async fn agent(dir: &Path, within: Duration) -> Result<GuestConn, String> {
    let start = Instant::now();
    loop {
        if let Ok(c) = GuestConn::connect_unix(&dir.join("agent.sock")).await {
            match c.hello(within.saturating_sub(start.elapsed())).await {
                Ok(_) => return Ok(c),
                Err(e) if start.elapsed() >= within => {
                    return Err(format!("the guest agent did not answer: {e}"));
                }
                Err(_) => c.close(),
            }
        }
        if start.elapsed() >= within {
            return Err("the guest agent's socket did not open".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits for a migration (out or in) to end; an error names its state.
async fn migrated(q: &Qmp) -> Result<(), String> {
    let start = Instant::now();
    loop {
        let v = q
            .execute("query-migrate", None)
            .await
            .map_err(|e| format!("query-migrate: {e}"))?;
        match v["status"].as_str().unwrap_or("") {
            "completed" => return Ok(()),
            s @ ("failed" | "cancelled") => {
                return Err(format!(
                    "the migration {s}: {}",
                    v["error-desc"].as_str().unwrap_or("no reason given")
                ));
            }
            _ if start.elapsed() > MIGRATE_TIMEOUT => return Err("the migration hangs".into()),
            _ => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

async fn ignore_shared(q: &Qmp) -> Result<(), String> {
    q.execute(
        "migrate-set-capabilities",
        Some(json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]})),
    )
    .await
    .map(|_| ())
    .map_err(|e| format!("x-ignore-shared: {e}"))
}

/// The `exec:` URI that writes or reads `state`. The path is ours (the
/// node's own directory) and is quoted for the shell QEMU runs.
fn exec_uri(write: bool, state: &Path) -> Result<String, String> {
    let p = state.display().to_string();
    if p.contains('\'') {
        return Err(format!("the state path may not hold a quote: {p}"));
    }
    Ok(if write {
        format!("exec:cat > '{p}'")
    } else {
        format!("exec:cat '{p}'")
    })
}

/// A memfd of `size_mib` for a template's RAM, and the path QEMU opens it by.
fn ram_file(name: &str, size_mib: u64) -> Result<(OwnedFd, PathBuf), String> {
    let fd = rustix::fs::memfd_create(name, rustix::fs::MemfdFlags::CLOEXEC)
        .map_err(|e| format!("memfd_create: {e}"))?;
    rustix::fs::ftruncate(&fd, size_mib << 20).map_err(|e| format!("sizing the RAM file: {e}"))?;
    let path = PathBuf::from(format!(
        "/proc/{}/fd/{}",
        std::process::id(),
        fd.as_raw_fd()
    ));
    Ok((fd, path))
}

/// Boots a template in `dir` with its RAM in a memfd named `name`, and
/// saves it.
pub async fn build(
    qemu: &QemuCommand,
    spec: TemplateSpec,
    dir: &Path,
    name: &str,
) -> Result<Template, String> {
    let started = Instant::now();
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let (ram, memory) = ram_file(name, spec.memory_mib)?;
    let memory = memory.as_path();
    let mut child = spawn(qemu, &argv(&spec, dir, memory, true, Start::Boot), dir)?;
    let q = qmp(dir).await?;
    let conn = agent(dir, BOOT_TIMEOUT).await?;
    if let Some(argv) = &spec.warmup {
        let _ = conn
            .exec_output(byteport_guest::proto::ExecRequest::new(argv.clone()))
            .await;
    }
    conn.close();
    q.stop().await.map_err(|e| format!("stop: {e}"))?;
    ignore_shared(&q).await?;
    let state = dir.join("state");
    q.execute("migrate", Some(json!({"uri": exec_uri(true, &state)?})))
        .await
        .map_err(|e| format!("migrate: {e}"))?;
    migrated(&q).await?;
    let _ = q.quit().await;
    let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
    let _ = child.kill().await;
    Ok(Template {
        spec,
        memory: memory.to_owned(),
        ram,
        state,
        built_in: started.elapsed(),
        lean: AtomicBool::new(true),
    })
}

/// Boots a VM of `spec` from scratch in `dir`, for a run where templates
/// are off or cannot be made: its RAM is private (a file of its own in
/// `dir`), and it has the devices a clone has.
pub async fn boot_cold(
    qemu: &QemuCommand,
    spec: &TemplateSpec,
    dir: &Path,
) -> Result<Clone, String> {
    let t0 = Instant::now();
    let args = argv(spec, dir, &dir.join("ram"), false, Start::Boot);
    let (child, q) = launch(qemu, &args, dir).await?;
    connect(dir, t0, child, q, BOOT_TIMEOUT).await
}

/// Spawns QEMU with `args` in `dir` (made first) and connects to its QMP.
async fn launch(
    qemu: &QemuCommand,
    args: &[String],
    dir: &Path,
) -> Result<(tokio::process::Child, Qmp), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let child = spawn(qemu, args, dir)?;
    Ok((child, qmp(dir).await?))
}

/// A running VM spawned at `t0`, once its guest agent answers (within
/// `within`): the clone's handle.
async fn connect(
    dir: &Path,
    t0: Instant,
    child: tokio::process::Child,
    q: Qmp,
    within: Duration,
) -> Result<Clone, String> {
    let restored_in = t0.elapsed();
    let agent = agent(dir, within).await?;
    Ok(Clone {
        dir: dir.to_owned(),
        pid: child.id().unwrap_or(0),
        qmp: q,
        agent,
        restored_in,
        ready_in: t0.elapsed(),
        child,
    })
}

impl Template {
    /// Starts a clone in `dir` (its sockets and log), restored and running,
    /// its guest agent connected.
    pub async fn start_clone(&self, qemu: &QemuCommand, dir: &Path) -> Result<Clone, String> {
        let t0 = Instant::now();
        if self.lean.load(Ordering::Relaxed) {
            match self.restore(qemu, dir, Start::Restore).await {
                Ok((child, q)) => return connect(dir, t0, child, q, Duration::from_secs(30)).await,
                Err(e) => {
                    tracing::warn!(error = %e, "a clone without the kernel did not restore: its template's clones carry it from now on");
                    self.lean.store(false, Ordering::Relaxed);
                    let _ = std::fs::remove_dir_all(dir);
                }
            }
        }
        let (child, q) = self.restore(qemu, dir, Start::Boot).await?;
        connect(dir, t0, child, q, Duration::from_secs(30)).await
    }

    /// Spawns a QEMU in `dir` and restores the template's state into it,
    /// leaving it running.
    async fn restore(
        &self,
        qemu: &QemuCommand,
        dir: &Path,
        start: Start,
    ) -> Result<(tokio::process::Child, Qmp), String> {
        let mut args = argv(&self.spec, dir, &self.memory, false, start);
        args.extend(["-incoming".to_owned(), "defer".to_owned()]);
        let (mut child, q) = launch(qemu, &args, dir).await?;
        let restored = async {
            ignore_shared(&q).await?;
            q.execute(
                "migrate-incoming",
                Some(json!({"uri": exec_uri(false, &self.state)?})),
            )
            .await
            .map_err(|e| format!("migrate-incoming: {e}"))?;
            migrated(&q).await?;
            q.cont().await.map_err(|e| format!("cont: {e}"))
        };
        match restored.await {
            Ok(()) => Ok((child, q)),
            Err(e) => {
                let _ = child.kill().await;
                Err(format!("{e}; QEMU said: {}", log_tail(dir)))
            }
        }
    }

    /// Removes the template's state file and lets its RAM go (once no
    /// clone maps it).
    pub fn remove(self) {
        let _ = std::fs::remove_file(&self.state);
        drop(self.ram);
    }
}

impl Clone {
    /// Ends the clone's QEMU and removes its directory.
    pub async fn destroy(mut self) {
        self.agent.close();
        let _ = self.qmp.quit().await;
        if tokio::time::timeout(Duration::from_secs(3), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
