//! The QEMU driver: one `qemu-system-ARCH` process per VM, in its own
//! process group so that it outlives the agent (and a Ctrl-C aimed at it),
//! with its pidfile, QMP socket, guest-agent socket, serial console socket
//! and console log in the VM's directory. Control goes over QMP; the
//! process itself is watched so that an exit or a crash is seen at once.
//!
//! Actions: start = spawn; pause/resume = QMP `stop`/`cont`; powerdown =
//! `system_powerdown` (ACPI); reset = `system_reset`; kill = QMP `quit`,
//! then SIGKILL if the process is still there after a few seconds.

use super::{Accel, Driver, DriverError, Instance, LaunchSpec, RunState, SEED_FW_CFG, files};
use byteport_qmp::Qmp;
use byteport_types::api::Engine;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// How long a new QEMU has to open its QMP socket.
const QMP_TIMEOUT: Duration = Duration::from_secs(15);
/// How long `quit` may take before the process is killed.
const QUIT_GRACE: Duration = Duration::from_secs(3);

/// TCG's translation cache, in MiB (see [`command_line`]); within
/// `cgroup::QEMU_OVERHEAD_MIB` with room for QEMU itself.
pub const TCG_TB_MIB: u64 = 128;

/// The guest-agent port's name inside the guest.
pub const AGENT_PORT_NAME: &str = "org.byteport.agent.0";

pub struct QemuDriver {
    /// QEMU for the host's own architecture; the others are found beside
    /// it (see [`binary_for`]).
    pub binary: PathBuf,
    /// The user QEMU drops to once it has opened its files, sockets and
    /// tap (`-runas`); it stays root when absent.
    pub run_as: Option<String>,
}

impl Default for QemuDriver {
    fn default() -> Self {
        QemuDriver {
            binary: PathBuf::from("qemu-system-x86_64"),
            run_as: None,
        }
    }
}

/// The guest architectures this driver knows how to boot.
pub const ARCHS: &[&str] = &["x86_64", "aarch64"];

/// QEMU for guests of `arch`: `base` for the host's own architecture,
/// `qemu-system-ARCH` in the same directory (or on PATH, when `base` is
/// a bare name) for another.
pub fn binary_for(base: &Path, arch: &str) -> PathBuf {
    if arch == std::env::consts::ARCH {
        return base.to_owned();
    }
    let name = format!("qemu-system-{arch}");
    match base.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(name),
        _ => PathBuf::from(name),
    }
}

/// Whether `program` can be run: an executable file at that path, or on
/// PATH for a bare name.
pub fn runnable(program: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let exec = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.components().count() > 1 {
        return exec(program);
    }
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|d| exec(&d.join(program))))
}

/// Whether this QEMU has the `microvm` machine (x86_64 QEMU has since 4.2).
pub async fn has_microvm(binary: &Path) -> bool {
    let out = tokio::process::Command::new(binary)
        .args(["-machine", "help"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .await;
    out.is_ok_and(|o| {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .any(|l| l.split_whitespace().next() == Some("microvm"))
    })
}

/// The host's TSC frequency in kHz, for a microvm guest's
/// `tsc_early_khz=`: under TCG its kernel otherwise often hangs
/// calibrating the TSC against a PIT that microvm does not emulate well.
pub fn host_tsc_khz() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = info
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    Some((mhz * 1000.0).round() as u64)
}

/// Whether `name` can be a user QEMU runs as: a plain login name.
pub fn valid_user(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// The argument vector for one VM. Every value is either ours (paths in
/// the VM's directory, numbers) or validated by the control plane (the
/// hostname is a name); nothing goes through a shell.
pub fn command_line(spec: &LaunchSpec) -> Vec<String> {
    let d = |f: &str| spec.dir.join(f).display().to_string();
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    push(&["-name", &format!("guest={},debug-threads=off", spec.name)]);
    push(&["-uuid", &spec.uuid.to_string()]);
    let arm = spec.arch == "aarch64";
    // microvm: no firmware, no PCI; its devices sit on virtio-mmio,
    // described to the kernel by ACPI (whose GED also gives it the power
    // button).
    let micro = spec.engine == Engine::Microvm;
    let bus = if micro { "device" } else { "pci" };
    let machine = match (micro, arm) {
        (true, _) => "microvm",
        (false, false) => "pc",
        (false, true) => "virt",
    };
    push(&["-machine", machine]);
    match spec.accel {
        Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
        // TCG's translated code counts against the VM's cgroup: QEMU's
        // default cache (1 GiB) let a Debian guest outgrow its memory
        // limit and be killed. 128 MiB fits the allowance.
        Accel::Tcg => push(&["-accel", &format!("tcg,tb-size={TCG_TB_MIB}")]),
    }
    if arm && spec.accel == Accel::Tcg {
        // A Cortex-A72 rather than `max`, whose pointer authentication
        // is slow to emulate.
        push(&["-cpu", "cortex-a72"]);
    }
    push(&[
        "-smp",
        &spec.vcpus.to_string(),
        "-m",
        &spec.memory_mib.to_string(),
    ]);
    push(&["-nodefaults", "-no-user-config", "-display", "none"]);
    if let Some(k) = &spec.kernel {
        push(&["-kernel", &k.display().to_string()]);
    }
    if let Some(i) = &spec.initrd {
        push(&["-initrd", &i.display().to_string()]);
    }
    if let Some(c) = &spec.cmdline {
        push(&["-append", c]);
    }
    push(&[
        "-drive",
        &format!(
            "file={},if=none,id=disk0,format=qcow2,cache=writeback,discard=unmap",
            spec.disk.display()
        ),
        "-device",
        &format!(
            "virtio-blk-{bus},drive=disk0{}",
            if micro { "" } else { ",bootindex=1" }
        ),
    ]);
    match &spec.tap {
        Some(tap) => push(&[
            "-netdev",
            &format!("tap,id=net0,ifname={tap},script=no,downscript=no"),
        ]),
        None => push(&["-netdev", &user_netdev(spec)]),
    }
    // No option ROM on `virt`: it boots the kernel directly, and QEMU's
    // network boot ROMs are built for the PC.
    let rom = if arm { ",romfile=" } else { "" };
    push(&[
        "-device",
        &format!("virtio-net-{bus},netdev=net0,mac={}{rom}", spec.mac),
    ]);
    push(&[
        "-chardev",
        &format!(
            "socket,id=serial0,path={},server=on,wait=off,logfile={},logappend=on",
            d(files::CONSOLE),
            d(files::CONSOLE_LOG)
        ),
        "-serial",
        "chardev:serial0",
    ]);
    push(&[
        "-device",
        &format!("virtio-serial-{bus},id=vser0"),
        "-chardev",
        &format!(
            "socket,id=agent0,path={},server=on,wait=off",
            d(files::AGENT)
        ),
        "-device",
        &format!("virtserialport,chardev=agent0,name={AGENT_PORT_NAME}"),
    ]);
    push(&[
        "-chardev",
        &format!("socket,id=qmp0,path={},server=on,wait=off", d(files::QMP)),
        "-mon",
        "chardev=qmp0,mode=control",
    ]);
    match seed_carrier(spec) {
        Some(SeedCarrier::Smbios) => push(&["-smbios", &format!("file={}", d(files::SMBIOS))]),
        Some(SeedCarrier::FwCfg) => push(&[
            "-fw_cfg",
            &format!("name={SEED_FW_CFG},file={}", d(files::SEED)),
        ]),
        None => {}
    }
    push(&["-pidfile", &d(files::PIDFILE)]);
    // seccomp: QEMU's own filter, obsolete system calls denied. Spawning
    // and setsid stay allowed: the metadata forward runs a program per
    // connection, and QEMU's user-mode network calls setsid() in that
    // child (`elevateprivileges=deny` kills it there).
    push(&["-sandbox", "on,obsolete=deny"]);
    a
}

/// How a VM's data source (`smbios_serial`) reaches its guest, always from
/// a file the node writes: the serial holds the VM's metadata token, which
/// a command line would show to every user of the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SeedCarrier {
    /// The PC's SMBIOS tables (see [`smbios_type1`]).
    Smbios,
    /// A fw_cfg file: `virt` booting a kernel directly has no firmware,
    /// so no SMBIOS tables.
    FwCfg,
}

/// The carrier of `spec`'s seed; `None` without one, or under microvm,
/// which has no firmware to hand SMBIOS tables to the guest.
fn seed_carrier(spec: &LaunchSpec) -> Option<SeedCarrier> {
    spec.smbios_serial.as_ref()?;
    match (spec.engine == Engine::Microvm, spec.arch == "aarch64") {
        (true, _) => None,
        (false, true) => Some(SeedCarrier::FwCfg),
        (false, false) => Some(SeedCarrier::Smbios),
    }
}

/// An SMBIOS type 1 (System Information) structure in the SMBIOS 2.4
/// layout, for `-smbios file=`: QEMU then builds no type 1 of its own, so
/// this one carries the VM's UUID too. Its serial number is the NoCloud
/// data source that cloud-init reads from `/sys/class/dmi/id/product_serial`.
pub fn smbios_type1(serial: &str, uuid: uuid::Uuid) -> Vec<u8> {
    // Type 1, 27 bytes of fields, handle 0x0100 (QEMU's own for type 1).
    let mut b = vec![1u8, 0x1b, 0x00, 0x01];
    // Manufacturer, product, version and serial number: strings 1-4.
    b.extend([1, 2, 3, 4]);
    // The UUID, its first three fields little-endian (SMBIOS 2.6).
    let u = uuid.as_bytes();
    b.extend([u[3], u[2], u[1], u[0], u[5], u[4], u[7], u[6]]);
    b.extend(&u[8..]);
    // Woken by the power switch; no SKU, no family.
    b.extend([0x06, 0, 0]);
    for text in ["QEMU", "BytePort VM", "1", serial] {
        b.extend(text.bytes().filter(|&c| c != 0));
        b.push(0);
    }
    b.push(0);
    b
}

/// Writes `bytes` to `path`, readable by its owner only.
pub(crate) fn write_private(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)
}

/// The user-mode network of a VM. `restrict=on` cuts the guest off from
/// the host and the outside: without it QEMU maps 10.0.2.2 to the host's
/// loopback, where the API and every VM's forwarded ports listen. What
/// stays: DHCP and DNS answered inside QEMU, the forwards into the guest
/// (`hostfwd`, on the operator's address), and the metadata address
/// (`guestfwd` to a pipe program that relays one connection to the node).
pub(crate) fn user_netdev(spec: &LaunchSpec) -> String {
    let mut netdev = String::from("user,id=net0,restrict=on");
    for p in &spec.ports {
        netdev.push_str(&format!(
            ",hostfwd=tcp:{}:{}-:{}",
            p.host, p.host_port, p.guest_port
        ));
    }
    if let Some(pipe) = &spec.metadata_pipe {
        // QEMU splits the command like a shell would (without running
        // one): each word single-quoted; a comma is doubled for QEMU's
        // option parser.
        let cmd: Vec<String> = pipe.iter().map(|w| format!("'{w}'")).collect();
        netdev.push_str(&format!(
            ",guestfwd=tcp:{}:80-cmd:{}",
            crate::network::USER_METADATA_ADDR,
            cmd.join(" ").replace(',', ",,")
        ));
    }
    netdev
}

/// Why a process ended, from what the agent could see.
#[derive(Clone, Debug)]
struct Exit {
    status: Option<String>,
}

pub struct QemuInstance {
    pid: u32,
    qmp: Qmp,
    exit: watch::Receiver<Option<Exit>>,
    /// The reason of QEMU's SHUTDOWN event, if one came.
    shutdown: Arc<Mutex<Option<(bool, String)>>>,
    dir: PathBuf,
}

fn read_tail(path: &Path, max: usize) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let s = s.trim();
    let start = s.len().saturating_sub(max);
    let start = (start..=s.len())
        .find(|i| s.is_char_boundary(*i))
        .unwrap_or(s.len());
    s[start..].to_owned()
}

/// Whether `pid` is a live (not zombie) QEMU of the VM in `dir`.
fn is_our_qemu(pid: u32, dir: &Path) -> bool {
    super::live_process_naming(pid, &dir.join(files::QMP).display().to_string())
}

impl QemuInstance {
    async fn attach(
        pid: u32,
        dir: &Path,
        exit: watch::Receiver<Option<Exit>>,
    ) -> Result<Self, DriverError> {
        let qmp = Qmp::connect_retry(&dir.join(files::QMP), QMP_TIMEOUT)
            .await
            .map_err(|e| DriverError::Failed(format!("QMP: {e}")))?;
        let shutdown: Arc<Mutex<Option<(bool, String)>>> = Arc::default();
        let mut events = qmp.subscribe();
        let sd = shutdown.clone();
        tokio::spawn(async move {
            while let Ok(ev) = events.recv().await {
                if ev.name == "SHUTDOWN" {
                    let guest = ev
                        .data
                        .get("guest")
                        .and_then(|g| g.as_bool())
                        .unwrap_or(false);
                    let reason = ev
                        .data
                        .get("reason")
                        .and_then(|r| r.as_str())
                        .unwrap_or("unknown")
                        .to_owned();
                    if let Ok(mut s) = sd.lock() {
                        *s = Some((guest, reason));
                    }
                }
            }
        });
        Ok(QemuInstance {
            pid,
            qmp,
            exit,
            shutdown,
            dir: dir.to_owned(),
        })
    }

    fn exit_state(&self, e: &Exit) -> RunState {
        let shutdown = self.shutdown.lock().ok().and_then(|s| s.clone());
        match shutdown {
            Some((true, _)) => RunState::Exited {
                reason: "the guest powered itself off".into(),
                clean: true,
            },
            Some((false, r)) if r == "host-qmp-quit" => RunState::Exited {
                reason: "QEMU was told to quit".into(),
                clean: true,
            },
            _ => {
                let log = read_tail(&self.dir.join(files::HYPERVISOR_LOG), 300);
                let mut reason = format!(
                    "QEMU (pid {}) exited unexpectedly{}",
                    self.pid,
                    e.status
                        .as_deref()
                        .map(|s| format!(": {s}"))
                        .unwrap_or_default()
                );
                if !log.is_empty() {
                    reason.push_str(&format!("; its log ends: {log}"));
                }
                RunState::Exited {
                    reason,
                    clean: false,
                }
            }
        }
    }
}

impl Instance for QemuInstance {
    fn pid(&self) -> Option<u32> {
        Some(self.pid)
    }

    async fn state(&self) -> RunState {
        let exit = self.exit.borrow().clone();
        if let Some(e) = exit {
            return self.exit_state(&e);
        }
        match self.qmp.query_status().await {
            Ok(s) if s.running => RunState::Running,
            Ok(_) => RunState::Paused,
            Err(_) => {
                // The socket closes as the process dies: wait for the watcher.
                let mut rx = self.exit.clone();
                let _ = tokio::time::timeout(Duration::from_secs(2), rx.wait_for(|e| e.is_some()))
                    .await;
                let exit = self.exit.borrow().clone();
                match exit {
                    Some(e) => self.exit_state(&e),
                    None => RunState::Running,
                }
            }
        }
    }

    async fn pause(&self) -> Result<(), DriverError> {
        self.qmp
            .stop()
            .await
            .map_err(|e| DriverError::Failed(format!("QMP stop: {e}")))
    }

    async fn resume(&self) -> Result<(), DriverError> {
        self.qmp
            .cont()
            .await
            .map_err(|e| DriverError::Failed(format!("QMP cont: {e}")))
    }

    async fn powerdown(&self) -> Result<(), DriverError> {
        self.qmp
            .system_powerdown()
            .await
            .map_err(|e| DriverError::Failed(format!("QMP system_powerdown: {e}")))
    }

    async fn reset(&self) -> Result<(), DriverError> {
        self.qmp
            .system_reset()
            .await
            .map_err(|e| DriverError::Failed(format!("QMP system_reset: {e}")))
    }

    async fn kill(&self) -> Result<(), DriverError> {
        if self.exit.borrow().is_some() {
            return Ok(());
        }
        let _ = self.qmp.quit().await;
        let mut rx = self.exit.clone();
        if tokio::time::timeout(QUIT_GRACE, rx.wait_for(|e| e.is_some()))
            .await
            .is_ok()
        {
            return Ok(());
        }
        tracing::warn!(pid = self.pid, "QEMU ignored quit; killing it");
        let _ = tokio::process::Command::new("kill")
            .arg("-9")
            .arg(self.pid.to_string())
            .status()
            .await;
        let mut rx = self.exit.clone();
        tokio::time::timeout(QUIT_GRACE, rx.wait_for(|e| e.is_some()))
            .await
            .map(|_| ())
            .map_err(|_| DriverError::Failed(format!("QEMU pid {} would not die", self.pid)))
    }

    async fn exited(&self) {
        let mut rx = self.exit.clone();
        let _ = rx.wait_for(|e| e.is_some()).await;
    }
}

impl Driver for QemuDriver {
    type Instance = QemuInstance;

    fn name(&self) -> &'static str {
        "qemu"
    }

    async fn start(&self, spec: &LaunchSpec) -> Result<QemuInstance, DriverError> {
        for f in [files::QMP, files::AGENT, files::CONSOLE, files::PIDFILE] {
            let _ = std::fs::remove_file(spec.dir.join(f));
        }
        if let (Some(serial), Some(carrier)) = (&spec.smbios_serial, seed_carrier(spec)) {
            match carrier {
                SeedCarrier::Smbios => write_private(
                    &spec.dir.join(files::SMBIOS),
                    &smbios_type1(serial, spec.uuid),
                )
                .map_err(DriverError::io("cannot write the VM's SMBIOS table"))?,
                SeedCarrier::FwCfg => write_private(&spec.dir.join(files::SEED), serial.as_bytes())
                    .map_err(DriverError::io("cannot write the VM's fw_cfg seed"))?,
            }
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(spec.dir.join(files::HYPERVISOR_LOG))
            .map_err(DriverError::io("cannot open the QEMU log"))?;
        let log2 = log
            .try_clone()
            .map_err(DriverError::io("cannot open the QEMU log"))?;
        let binary = binary_for(&self.binary, &spec.arch);
        let mut cmd = tokio::process::Command::new(&binary);
        if let Some(u) = &self.run_as {
            cmd.args(["-runas", u]);
        }
        cmd.args(command_line(spec))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .process_group(0)
            .kill_on_drop(false);
        let mut child = cmd
            .spawn()
            .map_err(|e| DriverError::Failed(format!("cannot run {}: {e}", binary.display())))?;
        let pid = child.id().unwrap_or(0);
        let (tx, rx) = watch::channel(None);
        tokio::spawn(async move {
            let status = child.wait().await.ok().map(|s| {
                use std::os::unix::process::ExitStatusExt;
                match (s.code(), s.signal()) {
                    (_, Some(sig)) => format!("killed by signal {sig}"),
                    (Some(c), _) => format!("exit status {c}"),
                    _ => s.to_string(),
                }
            });
            let _ = tx.send(Some(Exit { status }));
        });
        let early = rx.clone();
        match QemuInstance::attach(pid, &spec.dir, rx).await {
            Ok(i) => Ok(i),
            Err(e) => {
                let mut early = early;
                let _ =
                    tokio::time::timeout(Duration::from_secs(1), early.wait_for(|x| x.is_some()))
                        .await;
                let log = read_tail(&spec.dir.join(files::HYPERVISOR_LOG), 500);
                let _ = tokio::process::Command::new("kill")
                    .arg("-9")
                    .arg(pid.to_string())
                    .status()
                    .await;
                Err(DriverError::Failed(if log.is_empty() {
                    format!("QEMU did not start: {e}")
                } else {
                    format!("QEMU did not start: {log}")
                }))
            }
        }
    }

    async fn adopt(&self, dir: &Path) -> Option<QemuInstance> {
        let pid: u32 = std::fs::read_to_string(dir.join(files::PIDFILE))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        if !is_our_qemu(pid, dir) {
            return None;
        }
        let (tx, rx) = watch::channel(None);
        let d = dir.to_owned();
        tokio::spawn(async move {
            // Not our child: watch /proc instead of waiting on it.
            while is_our_qemu(pid, &d) {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            let _ = tx.send(Some(Exit { status: None }));
        });
        QemuInstance::attach(pid, dir, rx).await.ok()
    }
}

/// Whether KVM really runs a Linux guest here: boots `kernel` under KVM with
/// no init and waits for the kernel's own lines on the serial console. A
/// host whose /dev/kvm cannot run normal guests (it hangs or aborts) fails
/// within `timeout`, and TCG is used.
pub async fn probe_kvm(binary: &Path, kernel: &Path, timeout: Duration) -> Result<(), String> {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return Err("/dev/kvm cannot be opened".into());
    }
    let mut child = tokio::process::Command::new(binary)
        .args(["-machine", "pc,accel=kvm", "-cpu", "host", "-m", "128"])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(kernel)
        .args([
            "-append",
            "console=ttyS0 panic=-1 rdinit=/byteport-kvm-probe",
        ])
        .args(["-serial", "stdio"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", binary.display()))?;
    let mut out = child.stdout.take().ok_or("no stdout")?;
    let read = async {
        use tokio::io::AsyncReadExt;
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = out.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                return false;
            }
            seen.extend_from_slice(&buf[..n]);
            let s = String::from_utf8_lossy(&seen);
            // Past early boot: the kernel looked for init.
            if s.contains("Kernel panic")
                || s.contains("Run /byteport-kvm-probe")
                || s.contains("No working init")
            {
                return true;
            }
        }
    };
    let ok = tokio::time::timeout(timeout, read).await.unwrap_or(false);
    let _ = child.kill().await;
    if ok {
        Ok(())
    } else {
        Err(format!(
            "a Linux kernel did not boot under KVM within {} s",
            timeout.as_secs()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_data_source_and_the_mac_reach_qemu_as_single_arguments() {
        let spec = LaunchSpec {
            dir: PathBuf::from("/vms/a"),
            name: "web-1".into(),
            uuid: uuid::Uuid::nil(),
            vcpus: 1,
            memory_mib: 256,
            disk: PathBuf::from("/vms/a/disk.qcow2"),
            kernel: None,
            initrd: None,
            cmdline: None,
            ports: Vec::new(),
            smbios_serial: Some("ds=nocloud-net;s=http://10.0.2.254/v/t,x/".into()),
            metadata_pipe: Some(vec![
                "/opt/by,te/byteportd".into(),
                "metadata-pipe".into(),
                "127.0.0.1:7".into(),
            ]),
            tap: None,
            mac: "52:54:00:aa:bb:cc".into(),
            arch: "x86_64".into(),
            engine: Engine::Qemu,
            accel: Accel::Tcg,
        };
        let a = command_line(&spec);
        let at = a.iter().position(|x| x == "-smbios").expect("-smbios");
        // The serial (and the token in it) is in a file, not the arguments.
        assert!(a[at + 1].starts_with("file=") && a[at + 1].ends_with("/smbios.bin"));
        assert!(!a.iter().any(|x| x.contains("t,x")), "{a:?}");
        let t1 = smbios_type1("ds=nocloud-net;s=http://10.0.2.254/v/t,x/", spec.uuid);
        assert_eq!((t1[0], t1[1]), (1, 27));
        let strings: Vec<&[u8]> = t1[27..].split(|&c| c == 0).collect();
        assert_eq!(strings[3], b"ds=nocloud-net;s=http://10.0.2.254/v/t,x/");
        assert!(t1.ends_with(&[0, 0]));
        let at = a.iter().position(|x| x == "-netdev").expect("-netdev");
        assert_eq!(
            a[at + 1],
            "user,id=net0,restrict=on,guestfwd=tcp:10.0.2.254:80-cmd:'/opt/by,,te/byteportd' 'metadata-pipe' '127.0.0.1:7'"
        );
        assert!(a.contains(&"-sandbox".to_string()), "{a:?}");
        assert!(
            a.contains(&"virtio-net-pci,netdev=net0,mac=52:54:00:aa:bb:cc".to_string()),
            "{a:?}"
        );
        assert!(
            a.windows(4)
                .any(|w| w == ["-machine", "pc", "-accel", "tcg,tb-size=128"]),
            "{a:?}"
        );
        // An aarch64 guest: the `virt` board, emulated.
        let micro = command_line(&LaunchSpec {
            engine: Engine::Microvm,
            ..spec.clone()
        });
        assert!(
            micro.windows(2).any(|w| w == ["-machine", "microvm"]),
            "{micro:?}"
        );
        assert!(
            micro.contains(&"virtio-net-device,netdev=net0,mac=52:54:00:aa:bb:cc".to_string())
                && micro.contains(&"virtio-blk-device,drive=disk0".to_string())
                && !micro.iter().any(|x| x.contains("-pci")),
            "{micro:?}"
        );
        assert!(!micro.contains(&"-smbios".to_string()), "{micro:?}");
        let arm = command_line(&LaunchSpec {
            arch: "aarch64".into(),
            ..spec
        });
        assert!(
            arm.windows(6).any(|w| w
                == [
                    "-machine",
                    "virt",
                    "-accel",
                    "tcg,tb-size=128",
                    "-cpu",
                    "cortex-a72"
                ]),
            "{arm:?}"
        );
        // No SMBIOS on `virt` without firmware: the seed is a fw_cfg file.
        assert!(!arm.contains(&"-smbios".to_string()), "{arm:?}");
        assert!(
            arm.windows(2).any(|w| w
                == [
                    "-fw_cfg",
                    "name=opt/org.byteport/seed,file=/vms/a/seed.fwcfg"
                ]),
            "{arm:?}"
        );
        assert!(!arm.iter().any(|x| x.contains("t,x")), "{arm:?}");
    }

    #[test]
    fn other_architectures_use_the_qemu_beside_the_hosts() {
        let host = std::env::consts::ARCH;
        assert_eq!(
            binary_for(Path::new("/opt/q/qemu-system-x86_64"), host),
            PathBuf::from("/opt/q/qemu-system-x86_64")
        );
        let other = if host == "aarch64" {
            "x86_64"
        } else {
            "aarch64"
        };
        assert_eq!(
            binary_for(Path::new("/opt/q/qemu-system-x86_64"), other),
            PathBuf::from(format!("/opt/q/qemu-system-{other}"))
        );
        assert_eq!(
            binary_for(Path::new("qemu-system-x86_64"), other),
            PathBuf::from(format!("qemu-system-{other}"))
        );
        assert!(runnable(Path::new("sh")));
        assert!(!runnable(Path::new("/nonexistent/qemu")));
    }
}
