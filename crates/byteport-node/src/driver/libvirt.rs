//! The libvirt engine: the node writes a domain XML for each VM and has
//! libvirtd start it (`virsh create`, a transient domain: it is gone once
//! the guest powers off or is destroyed), then drives it through libvirtd:
//! `suspend`, `resume`, `shutdown --mode acpi`, `reset`, `destroy`. The
//! guest is the same as under the `qemu` engine (disk, kernel, serial
//! console with its log, guest-agent channel, NIC), so exec, consoles and
//! cloud-init work unchanged. What libvirt's XML cannot say for QEMU's
//! user-mode network (`restrict=on`, host forwards, the metadata pipe)
//! and the SMBIOS file go in `<qemu:commandline>`; a tap on a bridge is
//! a plain `<interface type='ethernet'>`.
//!
//! libvirtd runs QEMU as the user of its qemu.conf. Here (no systemd, no
//! logind) that file needs `security_driver = "none"`, `stdio_handler =
//! "file"`, `namespaces = []` and `cgroup_controllers = []`; see
//! docs/platforms.md.

use super::qemu::{
    AGENT_PORT_NAME, TCG_TB_MIB, binary_for, smbios_type1, user_netdev, write_private,
};
use super::{
    Accel, Driver, DriverError, Instance, LaunchSpec, RunState, files, live_process_naming,
};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::watch;

/// The file in a VM's directory naming its libvirt domain; its presence
/// says the VM runs under libvirt.
pub const DOMAIN_FILE: &str = "libvirt-domain";
/// The domain XML as given to libvirtd, kept beside the VM for reading.
pub const XML_FILE: &str = "domain.xml";
/// How long one `virsh` call may take (the first connection to a fresh
/// libvirtd probes QEMU's capabilities: about 10 s here).
const VIRSH_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a destroyed domain's QEMU has to be gone.
const DESTROY_WAIT: Duration = Duration::from_secs(15);

pub struct LibvirtDriver {
    /// The connection, such as `qemu:///system` or
    /// `qemu:///system?socket=/run/x/libvirt-sock`.
    pub uri: String,
    /// The host's own QEMU; libvirt runs the one of each guest's
    /// architecture beside it (see [`binary_for`]).
    pub qemu: PathBuf,
}

impl LibvirtDriver {
    /// A driver for `uri` once libvirtd answers on it with its QEMU
    /// driver; why not otherwise.
    pub async fn connect(uri: &str, qemu: &Path) -> Result<LibvirtDriver, String> {
        let out = virsh(uri, &["version"]).await.map_err(|e| e.to_string())?;
        if !out.contains("QEMU") {
            return Err(format!("libvirt at {uri} has no QEMU driver: {out}"));
        }
        Ok(LibvirtDriver {
            uri: uri.to_owned(),
            qemu: qemu.to_owned(),
        })
    }
}

/// The domain's name: the VM's UUID, so that two nodes' VMs never meet.
pub fn domain_name(uuid: uuid::Uuid) -> String {
    format!("bp-{uuid}")
}

/// Runs `virsh -c URI ARGS...` (no shell: each argument is one argv
/// entry); its standard output, or its error as the failure.
async fn virsh(uri: &str, args: &[&str]) -> Result<String, DriverError> {
    let mut cmd = tokio::process::Command::new("virsh");
    cmd.arg("-q")
        .arg("-c")
        .arg(uri)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let out = tokio::time::timeout(VIRSH_TIMEOUT, cmd.output())
        .await
        .map_err(|_| DriverError::Failed(format!("virsh {} took over a minute", args[0])))?
        .map_err(|e| DriverError::Failed(format!("cannot run virsh: {e}")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        Err(DriverError::Failed(format!(
            "virsh {}: {}",
            args[0],
            err.trim().trim_start_matches("error: ")
        )))
    }
}

/// `program` as an absolute path (libvirt takes no other): found on PATH
/// when it is a bare name; as it is otherwise.
fn on_path(program: &Path) -> PathBuf {
    if program.components().count() > 1 {
        return program.to_owned();
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| program.to_owned())
}

/// Text for an XML attribute or element.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

/// The domain XML of one VM. Every value is the node's own (paths in the
/// VM's directory, numbers) or checked by the control plane, and escaped.
pub fn domain_xml(spec: &LaunchSpec, emulator: &Path) -> String {
    let d = |f: &str| esc(&spec.dir.join(f).display().to_string());
    let mut x = String::new();
    let kvm = spec.accel == Accel::Kvm;
    x.push_str(&format!(
        "<domain type='{}' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>\n",
        if kvm { "kvm" } else { "qemu" }
    ));
    x.push_str(&format!(
        "  <name>{}</name>\n  <uuid>{}</uuid>\n  <title>{}</title>\n",
        domain_name(spec.uuid),
        spec.uuid,
        esc(&spec.name)
    ));
    x.push_str(&format!(
        "  <memory unit='MiB'>{}</memory>\n  <vcpu>{}</vcpu>\n",
        spec.memory_mib, spec.vcpus
    ));
    x.push_str("  <os>\n    <type arch='x86_64' machine='pc'>hvm</type>\n");
    if let Some(k) = &spec.kernel {
        x.push_str(&format!(
            "    <kernel>{}</kernel>\n",
            esc(&k.display().to_string())
        ));
    }
    if let Some(i) = &spec.initrd {
        x.push_str(&format!(
            "    <initrd>{}</initrd>\n",
            esc(&i.display().to_string())
        ));
    }
    if let Some(c) = &spec.cmdline {
        x.push_str(&format!("    <cmdline>{}</cmdline>\n", esc(c)));
    }
    if spec.kernel.is_none() {
        x.push_str("    <boot dev='hd'/>\n");
    }
    x.push_str("  </os>\n");
    // ACPI: without it libvirt passes -no-acpi, and the power button
    // (`virsh shutdown`) never reaches the guest.
    x.push_str("  <features>\n    <acpi/>\n");
    if !kvm {
        x.push_str(&format!(
            "    <tcg><tb-cache unit='MiB'>{TCG_TB_MIB}</tb-cache></tcg>\n"
        ));
    }
    x.push_str("  </features>\n");
    if kvm {
        x.push_str("  <cpu mode='host-passthrough'/>\n");
    }
    x.push_str(
        "  <on_poweroff>destroy</on_poweroff>\n  <on_reboot>restart</on_reboot>\n  <on_crash>destroy</on_crash>\n",
    );
    x.push_str("  <devices>\n");
    x.push_str(&format!(
        "    <emulator>{}</emulator>\n",
        esc(&emulator.display().to_string())
    ));
    x.push_str(&format!(
        "    <disk type='file' device='disk'>\n      <driver name='qemu' type='qcow2' cache='writeback' discard='unmap'/>\n      <source file='{}'/>\n      <target dev='vda' bus='virtio'/>\n    </disk>\n",
        esc(&spec.disk.display().to_string())
    ));
    if let Some(tap) = &spec.tap {
        x.push_str(&format!(
            "    <interface type='ethernet'>\n      <mac address='{}'/>\n      <target dev='{}' managed='no'/>\n      <model type='virtio'/>\n    </interface>\n",
            esc(&spec.mac),
            esc(tap)
        ));
    }
    x.push_str(&format!(
        "    <serial type='unix'>\n      <source mode='bind' path='{}'/>\n      <log file='{}' append='on'/>\n      <target port='0'/>\n    </serial>\n",
        d(files::CONSOLE),
        d(files::CONSOLE_LOG)
    ));
    x.push_str(&format!(
        "    <channel type='unix'>\n      <source mode='bind' path='{}'/>\n      <target type='virtio' name='{AGENT_PORT_NAME}'/>\n    </channel>\n",
        d(files::AGENT)
    ));
    x.push_str("    <controller type='usb' model='none'/>\n    <memballoon model='none'/>\n");
    x.push_str("  </devices>\n");
    let mut args: Vec<String> = Vec::new();
    if spec.tap.is_none() {
        // The NIC on a slot of its own: libvirt numbers its own devices
        // from slot 2 up.
        args.extend([
            "-netdev".into(),
            user_netdev(spec),
            "-device".into(),
            format!(
                "virtio-net-pci,netdev=net0,mac={},bus=pci.0,addr=0x1f",
                spec.mac
            ),
        ]);
    }
    if spec.smbios_serial.is_some() {
        args.extend([
            "-smbios".into(),
            format!("file={}", spec.dir.join(files::SMBIOS).display()),
        ]);
    }
    if !args.is_empty() {
        x.push_str("  <qemu:commandline>\n");
        for a in &args {
            x.push_str(&format!("    <qemu:arg value='{}'/>\n", esc(a)));
        }
        x.push_str("  </qemu:commandline>\n");
    }
    x.push_str("</domain>\n");
    x
}

/// The QEMU process libvirt runs for `domain`: the one whose `-name`
/// is `guest=DOMAIN,...` and that is not a zombie.
fn find_qemu(domain: &str) -> Option<u32> {
    let needle = format!("guest={domain},");
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if live_process_naming(pid, &needle) {
            return Some(pid);
        }
    }
    None
}

/// Why libvirt says a domain ended, from the last `shutting down,
/// reason=` line of its log (libvirt's own QEMU log).
fn end_reason(log: &str) -> Option<String> {
    log.lines().rev().find_map(|l| {
        l.split_once("shutting down, reason=")
            .map(|(_, r)| r.trim().to_owned())
    })
}

/// libvirt's log of a domain's QEMU, for the system connection.
fn libvirt_log(domain: &str) -> PathBuf {
    PathBuf::from(format!("/var/log/libvirt/qemu/{domain}.log"))
}

pub struct LibvirtInstance {
    uri: String,
    domain: String,
    pid: u32,
    /// Set once the process is gone, with libvirt's reason.
    exit: watch::Receiver<Option<Option<String>>>,
    /// Whether the node itself destroyed it (a stop's last resort, a
    /// delete).
    destroyed: Arc<AtomicBool>,
}

impl LibvirtInstance {
    /// Watches domain `domain`'s QEMU `pid` until it is gone; then reads
    /// why from libvirt's log and removes that log.
    fn watch(uri: &str, domain: &str, pid: u32) -> LibvirtInstance {
        let (tx, rx) = watch::channel(None);
        let needle = format!("guest={domain},");
        let name = domain.to_owned();
        tokio::spawn(async move {
            while live_process_naming(pid, &needle) {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            // libvirt writes its line once it has reaped the process.
            let log = libvirt_log(&name);
            let mut reason = None;
            for _ in 0..25 {
                reason = std::fs::read_to_string(&log)
                    .ok()
                    .and_then(|l| end_reason(&l));
                if reason.is_some() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let _ = std::fs::remove_file(&log);
            let _ = tx.send(Some(reason));
        });
        LibvirtInstance {
            uri: uri.to_owned(),
            domain: domain.to_owned(),
            pid,
            exit: rx,
            destroyed: Arc::default(),
        }
    }

    async fn virsh(&self, verb: &str, extra: &[&str]) -> Result<(), DriverError> {
        let mut args = vec![verb, self.domain.as_str()];
        args.extend_from_slice(extra);
        virsh(&self.uri, &args).await.map(|_| ())
    }
}

impl Instance for LibvirtInstance {
    fn pid(&self) -> Option<u32> {
        Some(self.pid)
    }

    async fn state(&self) -> RunState {
        if let Some(reason) = self.exit.borrow().clone() {
            let r = reason.as_deref().unwrap_or("unknown");
            return match r {
                "shutdown" => RunState::Exited {
                    reason: "the guest powered itself off".into(),
                    clean: true,
                },
                "destroyed" if self.destroyed.load(Ordering::Relaxed) => RunState::Exited {
                    reason: "libvirt destroyed the domain".into(),
                    clean: true,
                },
                r => RunState::Exited {
                    reason: format!(
                        "the domain's QEMU (pid {}) ended: libvirt says {r}",
                        self.pid
                    ),
                    clean: false,
                },
            };
        }
        match virsh(&self.uri, &["domstate", &self.domain]).await {
            Ok(s) if s.starts_with("paused") => RunState::Paused,
            _ => RunState::Running,
        }
    }

    async fn pause(&self) -> Result<(), DriverError> {
        self.virsh("suspend", &[]).await
    }

    async fn resume(&self) -> Result<(), DriverError> {
        self.virsh("resume", &[]).await
    }

    async fn powerdown(&self) -> Result<(), DriverError> {
        self.virsh("shutdown", &["--mode", "acpi"]).await
    }

    async fn reset(&self) -> Result<(), DriverError> {
        self.virsh("reset", &[]).await
    }

    async fn kill(&self) -> Result<(), DriverError> {
        if self.exit.borrow().is_some() {
            return Ok(());
        }
        self.destroyed.store(true, Ordering::Relaxed);
        if let Err(e) = self.virsh("destroy", &[]).await {
            // Gone meanwhile: nothing to destroy.
            if self.exit.borrow().is_none() && find_qemu(&self.domain).is_some() {
                return Err(e);
            }
        }
        let mut exit = self.exit.clone();
        tokio::time::timeout(DESTROY_WAIT, exit.wait_for(|x| x.is_some()))
            .await
            .map_err(|_| {
                DriverError::Failed(format!("domain {} outlived its destroy", self.domain))
            })?
            .map_err(|_| DriverError::Failed("the domain's watch ended".into()))?;
        Ok(())
    }

    async fn exited(&self) {
        let mut exit = self.exit.clone();
        let _ = exit.wait_for(|x| x.is_some()).await;
    }
}

impl Driver for LibvirtDriver {
    type Instance = LibvirtInstance;

    fn name(&self) -> &'static str {
        "libvirt"
    }

    async fn start(&self, spec: &LaunchSpec) -> Result<LibvirtInstance, DriverError> {
        if spec.arch != "x86_64" {
            return Err(DriverError::Failed(format!(
                "the libvirt engine runs x86_64 guests, not {}",
                spec.arch
            )));
        }
        for f in [files::AGENT, files::CONSOLE, files::PIDFILE] {
            let _ = std::fs::remove_file(spec.dir.join(f));
        }
        if let Some(serial) = &spec.smbios_serial {
            write_private(
                &spec.dir.join(files::SMBIOS),
                &smbios_type1(serial, spec.uuid),
            )
            .map_err(DriverError::io("cannot write the VM's SMBIOS table"))?;
        }
        let domain = domain_name(spec.uuid);
        let xml = spec.dir.join(XML_FILE);
        let emulator = on_path(&binary_for(&self.qemu, &spec.arch));
        std::fs::write(&xml, domain_xml(spec, &emulator))
            .map_err(DriverError::io("cannot write the domain XML"))?;
        std::fs::write(spec.dir.join(DOMAIN_FILE), &domain)
            .map_err(DriverError::io("cannot write the domain's name"))?;
        let _ = std::fs::remove_file(libvirt_log(&domain));
        virsh(&self.uri, &["create", &xml.display().to_string()]).await?;
        let Some(pid) = find_qemu(&domain) else {
            return Err(DriverError::Failed(format!(
                "libvirt created {domain}, but its QEMU is not running"
            )));
        };
        // Where the node and its tools look for the VM's QEMU.
        std::fs::write(spec.dir.join(files::PIDFILE), format!("{pid}\n"))
            .map_err(DriverError::io("cannot write the pidfile"))?;
        Ok(LibvirtInstance::watch(&self.uri, &domain, pid))
    }

    async fn adopt(&self, dir: &Path) -> Option<LibvirtInstance> {
        let domain = std::fs::read_to_string(dir.join(DOMAIN_FILE)).ok()?;
        let domain = domain.trim();
        let pid = find_qemu(domain)?;
        let _ = std::fs::write(dir.join(files::PIDFILE), format!("{pid}\n"));
        Some(LibvirtInstance::watch(&self.uri, domain, pid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use byteport_types::api::{Engine, PortForward};

    fn spec() -> LaunchSpec {
        LaunchSpec {
            dir: "/var/lib/bp/vms/x".into(),
            name: "web-1".into(),
            uuid: uuid::Uuid::nil(),
            vcpus: 2,
            memory_mib: 512,
            disk: "/var/lib/bp/vms/x/disk.qcow2".into(),
            kernel: Some("/img/vmlinuz".into()),
            initrd: None,
            cmdline: Some("console=ttyS0 ds=nocloud;s=http://169.254.169.254/ a<b".into()),
            ports: vec![PortForward {
                guest_port: 22,
                host_port: 20022,
                host: "127.0.0.1".into(),
            }],
            smbios_serial: Some("ds=nocloud".into()),
            metadata_pipe: Some(vec!["/bin/bp".into(), "pipe".into()]),
            tap: None,
            mac: "52:54:00:00:00:01".into(),
            arch: "x86_64".into(),
            engine: Engine::Libvirt,
            accel: Accel::Tcg,
        }
    }

    #[test]
    fn the_domain_carries_the_guest_and_escapes_what_it_is_given() {
        let x = domain_xml(&spec(), Path::new("/usr/bin/qemu-system-x86_64"));
        assert!(x.starts_with("<domain type='qemu'"), "{x}");
        assert!(x.contains("<name>bp-00000000-0000-0000-0000-000000000000</name>"));
        assert!(x.contains("<memory unit='MiB'>512</memory>") && x.contains("<vcpu>2</vcpu>"));
        assert!(x.contains("<acpi/>"), "the power button needs ACPI");
        assert!(x.contains("<tb-cache unit='MiB'>128</tb-cache>"));
        // The command line's < is escaped; the metadata pipe's quotes too.
        assert!(x.contains("a&lt;b</cmdline>"), "{x}");
        assert!(x.contains("hostfwd=tcp:127.0.0.1:20022-:22"), "{x}");
        assert!(
            x.contains("cmd:&apos;/bin/bp&apos; &apos;pipe&apos;"),
            "{x}"
        );
        assert!(x.contains(&format!("name='{AGENT_PORT_NAME}'")));
        assert!(x.contains("file=/var/lib/bp/vms/x/smbios.bin"));
        // A tap is libvirt's own interface, with no user network.
        let mut s = spec();
        s.tap = Some("bpt1".into());
        s.accel = Accel::Kvm;
        let x = domain_xml(&s, Path::new("/usr/bin/qemu-system-x86_64"));
        assert!(x.starts_with("<domain type='kvm'") && x.contains("host-passthrough"));
        assert!(x.contains("<target dev='bpt1' managed='no'/>") && !x.contains("-netdev"));
    }

    #[test]
    fn libvirt_s_reason_is_read_from_its_log() {
        let log = "2026-12-03 06:51:04.904+0000: Domain id=2 is tainted: custom-argv\n\
                   qemu-system-x86_64: terminating on signal 15 from pid 7511\n\
                   2026-12-03 06:51:32.113+0000: shutting down, reason=shutdown\n";
        assert_eq!(end_reason(log).as_deref(), Some("shutdown"));
        assert_eq!(end_reason("nothing yet"), None);
    }
}
