//! Hypervisor drivers. A [`Driver`] starts a VM from a [`LaunchSpec`] or
//! re-adopts one that kept running while the agent was away; the
//! [`Instance`] it returns controls that one running VM. QEMU (a process
//! per VM, controlled over QMP) and libvirt (a domain XML, driven through
//! libvirtd) are the real drivers, [`engines`] puts them behind one;
//! [`fake`] records calls for fast tests. Firecracker would fit the same
//! shape; it needs a working KVM, and is not built.

pub mod engines;
pub mod fake;
pub mod libvirt;
pub mod qemu;

use byteport_types::api::PortForward;
use std::future::Future;
use std::path::PathBuf;

/// What a driver can fail with; the message is shown as the VM's reason.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("{0}")]
    Failed(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

impl DriverError {
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> DriverError {
        let context = context.into();
        move |source| DriverError::Io { context, source }
    }
}

/// How the guest's CPU is provided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

/// Everything needed to start one VM, prepared by the agent.
#[derive(Clone, Debug)]
pub struct LaunchSpec {
    /// The VM's own directory: sockets, logs, pidfile, disk.
    pub dir: PathBuf,
    pub name: String,
    pub uuid: uuid::Uuid,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// The VM's disk (a qcow2 overlay or a blank qcow2).
    pub disk: PathBuf,
    /// Kernel, initrd and command line for kernel-booted images.
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub cmdline: Option<String>,
    /// Guest ports forwarded to the host.
    pub ports: Vec<PortForward>,
    /// The SMBIOS serial number (the metadata data source), if any; QEMU
    /// reads it from a file in the VM's directory, never its arguments.
    /// On aarch64 it goes to the guest as a fw_cfg file instead.
    pub smbios_serial: Option<String>,
    /// The program (and its arguments) QEMU runs for each guest connection
    /// to the metadata address under user-mode networking; its standard
    /// input and output are that connection. `None`: no metadata service.
    pub metadata_pipe: Option<Vec<String>>,
    /// The tap device (on its project's bridge) the NIC uses; QEMU's
    /// restricted user-mode network when absent.
    pub tap: Option<String>,
    /// The first NIC's MAC address.
    pub mac: String,
    /// The guest's architecture (`x86_64`, `aarch64`).
    pub arch: String,
    /// `qemu` (the architecture's standard machine) or `microvm`.
    pub engine: byteport_types::api::Engine,
    /// KVM only for the host's own architecture; any other is emulated.
    pub accel: Accel,
}

/// Whether `pid` is a live process (not a zombie) whose command line
/// holds `needle`: how a driver knows a pid is still its VM's QEMU.
pub(crate) fn live_process_naming(pid: u32, needle: &str) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let zombie = stat
        .rsplit_once(')')
        .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
    !zombie && String::from_utf8_lossy(&cmdline).contains(needle)
}

/// Files inside a VM's directory.
pub mod files {
    pub const QMP: &str = "qmp.sock";
    pub const AGENT: &str = "agent.sock";
    pub const CONSOLE: &str = "console.sock";
    pub const CONSOLE_LOG: &str = "console.log";
    pub const PIDFILE: &str = "qemu.pid";
    pub const HYPERVISOR_LOG: &str = "qemu.log";
    pub const DISK: &str = "disk.qcow2";
    pub const STATE: &str = "vm.json";
    /// The SMBIOS type 1 table (owner-only: its serial holds the token).
    pub const SMBIOS: &str = "smbios.bin";
    /// The same serial as a fw_cfg file, for boards without SMBIOS tables
    /// (aarch64 `virt` booted without firmware); owner-only too.
    pub const SEED: &str = "seed.fwcfg";
}

/// The fw_cfg name the seed goes under; the debian images' byteport-seed
/// reads it from /sys/firmware/qemu_fw_cfg.
pub const SEED_FW_CFG: &str = "opt/org.byteport/seed";

/// What a VM's hypervisor reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunState {
    Running,
    Paused,
    /// The hypervisor process is gone; why, as the user should read it,
    /// and whether it was a clean power-off of the guest.
    Exited {
        reason: String,
        clean: bool,
    },
}

/// One VM's hypervisor, running or just exited.
pub trait Instance: Send + Sync + 'static {
    fn pid(&self) -> Option<u32>;
    fn state(&self) -> impl Future<Output = RunState> + Send;
    fn pause(&self) -> impl Future<Output = Result<(), DriverError>> + Send;
    fn resume(&self) -> impl Future<Output = Result<(), DriverError>> + Send;
    /// Asks the guest to power off (ACPI power button).
    fn powerdown(&self) -> impl Future<Output = Result<(), DriverError>> + Send;
    /// Resets the guest at once (a hard reboot).
    fn reset(&self) -> impl Future<Output = Result<(), DriverError>> + Send;
    /// Ends the hypervisor process now and waits until it is gone.
    fn kill(&self) -> impl Future<Output = Result<(), DriverError>> + Send;
    /// Resolves when the process has exited.
    fn exited(&self) -> impl Future<Output = ()> + Send;
}

/// A hypervisor.
pub trait Driver: Send + Sync + 'static {
    type Instance: Instance;
    fn name(&self) -> &'static str;
    /// The engines beyond those of the host's QEMU (`qemu`, and `microvm`
    /// where it has the machine, which the node finds itself) that this
    /// driver runs.
    fn engines(&self) -> Vec<byteport_types::api::Engine> {
        Vec::new()
    }
    fn start(
        &self,
        spec: &LaunchSpec,
    ) -> impl Future<Output = Result<Self::Instance, DriverError>> + Send;
    /// Re-attaches to a VM still running from before an agent restart.
    fn adopt(&self, dir: &std::path::Path) -> impl Future<Output = Option<Self::Instance>> + Send;
}
