//! One cgroup per VM: the node puts each VM's QEMU process (and whatever
//! QEMU spawns, such as the metadata pipe) in a cgroup of its own whose CPU
//! and memory limits follow the VM's size, reads its memory use back for
//! the VM's figures, and removes it with the VM.
//!
//! Layout: `byteport/NODE/VM` under the hierarchy's root. cgroup v2 (one
//! hierarchy: `cpu.max`, `memory.max`) is used where `/sys/fs/cgroup` is a
//! cgroup2 mount with the cpu and memory controllers; on hosts still on
//! v1 the `cpu` (`cpu.cfs_quota_us`) and `memory`
//! (`memory.limit_in_bytes`) hierarchies take the same limits. Where
//! neither can be written (not root, a read-only mount) VMs run without
//! one and the node says so once at start.
//!
//! The memory limit is the guest's RAM plus [`QEMU_OVERHEAD_MIB`] for
//! QEMU itself (device state, I/O buffers, and under TCG its translated
//! code): the guest can never use more RAM than it was given, so the limit
//! is there for QEMU's own growth and holds the VM to its size on the host.

use byteport_types::{NodeId, VmId};
use std::path::{Path, PathBuf};

/// What QEMU may use beyond the guest's RAM, in MiB.
pub const QEMU_OVERHEAD_MIB: u64 = 256;
/// The CFS period the CPU quota is written against, in microseconds.
const CPU_PERIOD_US: u64 = 100_000;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Kind {
    V2(PathBuf),
    V1 { cpu: PathBuf, memory: PathBuf },
}

/// The node's cgroups, or none where the host gives it none.
#[derive(Clone, Debug)]
pub struct Cgroups {
    kind: Option<Kind>,
    node: NodeId,
}

fn write(path: &Path, value: &str) -> Result<(), String> {
    std::fs::write(path, value)
        .map_err(|e| format!("cannot write {value:?} to {}: {e}", path.display()))
}

impl Cgroups {
    /// Finds a hierarchy this process can make groups in.
    pub fn detect(node: NodeId) -> Self {
        Self::under(Path::new("/sys/fs/cgroup"), node)
    }

    /// [`Cgroups::detect`] under another root (for tests).
    pub fn under(root: &Path, node: NodeId) -> Self {
        let v2 = root.join("cgroup.controllers");
        let kind = if let Ok(c) = std::fs::read_to_string(&v2) {
            let has = |n: &str| c.split_whitespace().any(|x| x == n);
            (has("cpu") && has("memory")).then(|| Kind::V2(root.join("byteport")))
        } else if root.join("memory/memory.limit_in_bytes").exists()
            || root.join("memory/cgroup.procs").exists()
        {
            Some(Kind::V1 {
                cpu: root.join("cpu/byteport"),
                memory: root.join("memory/byteport"),
            })
        } else {
            None
        };
        let mut cg = Cgroups { kind, node };
        if let Err(why) = cg.prepare() {
            tracing::warn!("VMs run without a cgroup of their own: {why}");
            cg.kind = None;
        }
        cg
    }

    /// A cgroups set that does nothing: VMs run in the agent's own.
    pub fn none(node: NodeId) -> Self {
        Cgroups { kind: None, node }
    }

    /// Whether VMs get a cgroup, and of which version.
    pub fn describe(&self) -> &'static str {
        match self.kind {
            Some(Kind::V2(_)) => "cgroup v2",
            Some(Kind::V1 { .. }) => "cgroup v1 (cpu, memory)",
            None => "none",
        }
    }

    fn node_dirs(&self) -> Vec<PathBuf> {
        let n = self.node.to_string();
        match &self.kind {
            Some(Kind::V2(b)) => vec![b.join(n)],
            Some(Kind::V1 { cpu, memory }) => vec![cpu.join(&n), memory.join(n)],
            None => Vec::new(),
        }
    }

    /// The VM's group directories (one on v2, cpu and memory on v1).
    pub fn vm_dirs(&self, vm: VmId) -> Vec<PathBuf> {
        self.node_dirs()
            .into_iter()
            .map(|d| d.join(vm.to_string()))
            .collect()
    }

    fn prepare(&self) -> Result<(), String> {
        let Some(kind) = &self.kind else {
            return Ok(());
        };
        for d in self.node_dirs() {
            std::fs::create_dir_all(&d)
                .map_err(|e| format!("cannot create {}: {e}", d.display()))?;
        }
        if let Kind::V2(base) = kind {
            // Each level hands cpu and memory down to its children.
            let root = base.parent().unwrap_or(base);
            for d in [root, base, &base.join(self.node.to_string())] {
                write(&d.join("cgroup.subtree_control"), "+cpu +memory")?;
            }
        }
        Ok(())
    }

    /// Makes (or keeps) the VM's group with limits for its size.
    pub fn create(&self, vm: VmId, vcpus: u32, memory_mib: u64) -> Result<(), String> {
        let Some(kind) = &self.kind else {
            return Ok(());
        };
        let memory = (memory_mib + QEMU_OVERHEAD_MIB) * 1024 * 1024;
        let quota = u64::from(vcpus.max(1)) * CPU_PERIOD_US;
        let dirs = self.vm_dirs(vm);
        for d in &dirs {
            std::fs::create_dir_all(d)
                .map_err(|e| format!("cannot create {}: {e}", d.display()))?;
        }
        match kind {
            Kind::V2(_) => {
                write(&dirs[0].join("memory.max"), &memory.to_string())?;
                // No swapping past the limit either.
                let _ = write(&dirs[0].join("memory.swap.max"), "0");
                write(
                    &dirs[0].join("cpu.max"),
                    &format!("{quota} {CPU_PERIOD_US}"),
                )?;
            }
            Kind::V1 { .. } => {
                write(
                    &dirs[0].join("cpu.cfs_period_us"),
                    &CPU_PERIOD_US.to_string(),
                )?;
                write(&dirs[0].join("cpu.cfs_quota_us"), &quota.to_string())?;
                write(&dirs[1].join("memory.limit_in_bytes"), &memory.to_string())?;
                let _ = write(
                    &dirs[1].join("memory.memsw.limit_in_bytes"),
                    &memory.to_string(),
                );
            }
        }
        Ok(())
    }

    /// Moves a process (all its threads) into the VM's group.
    pub fn attach(&self, vm: VmId, pid: u32) -> Result<(), String> {
        for d in self.vm_dirs(vm) {
            write(&d.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// The VM's memory use as its group counts it (QEMU and its helpers,
    /// page cache included), in bytes.
    pub fn memory_bytes(&self, vm: VmId) -> Option<u64> {
        let dirs = self.vm_dirs(vm);
        let file = match self.kind.as_ref()? {
            Kind::V2(_) => dirs.first()?.join("memory.current"),
            Kind::V1 { .. } => dirs.get(1)?.join("memory.usage_in_bytes"),
        };
        std::fs::read_to_string(file).ok()?.trim().parse().ok()
    }

    /// The memory limit written for the VM, in bytes.
    pub fn memory_limit(&self, vm: VmId) -> Option<u64> {
        let dirs = self.vm_dirs(vm);
        let file = match self.kind.as_ref()? {
            Kind::V2(_) => dirs.first()?.join("memory.max"),
            Kind::V1 { .. } => dirs.get(1)?.join("memory.limit_in_bytes"),
        };
        std::fs::read_to_string(file).ok()?.trim().parse().ok()
    }

    /// Removes the VM's group once no process is left in it.
    pub fn remove(&self, vm: VmId) {
        for d in self.vm_dirs(vm) {
            if d.exists()
                && let Err(e) = std::fs::remove_dir(&d)
            {
                tracing::warn!(vm = %vm, error = %e, dir = %d.display(), "cannot remove the VM's cgroup");
            }
        }
    }

    /// Removes the empty groups of VMs this node no longer holds (a crash
    /// between a VM's end and its group's removal).
    pub fn sweep(&self, keep: &dyn Fn(VmId) -> bool) {
        for d in self.node_dirs() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let Ok(vm) = e.file_name().to_string_lossy().parse::<VmId>() else {
                    continue;
                };
                if !keep(vm) {
                    let _ = std::fs::remove_dir(e.path());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_follow_the_size_on_a_v1_layout() {
        // A directory tree shaped like a v1 host (plain files, so the test
        // needs no root); the kernel's own files are checked by the
        // real-guest tests.
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("memory")).unwrap();
        std::fs::create_dir_all(root.path().join("cpu")).unwrap();
        std::fs::write(root.path().join("memory/cgroup.procs"), "").unwrap();
        let node = NodeId::new();
        let cg = Cgroups::under(root.path(), node);
        assert_eq!(cg.describe(), "cgroup v1 (cpu, memory)");
        let vm = VmId::new();
        cg.create(vm, 2, 512).unwrap();
        let dirs = cg.vm_dirs(vm);
        let read = |p: PathBuf| std::fs::read_to_string(p).unwrap();
        assert_eq!(read(dirs[0].join("cpu.cfs_quota_us")), "200000");
        assert_eq!(
            read(dirs[1].join("memory.limit_in_bytes")),
            ((512 + QEMU_OVERHEAD_MIB) * 1024 * 1024).to_string()
        );
        assert_eq!(cg.memory_limit(vm), Some((512 + QEMU_OVERHEAD_MIB) << 20));
        for d in &dirs {
            for f in std::fs::read_dir(d).unwrap() {
                std::fs::remove_file(f.unwrap().path()).unwrap();
            }
        }
        cg.sweep(&|_| false);
        assert!(dirs.iter().all(|d| !d.exists()), "swept");
    }

    #[test]
    fn no_hierarchy_means_no_groups_and_no_errors() {
        let root = tempfile::tempdir().unwrap();
        let cg = Cgroups::under(root.path(), NodeId::new());
        assert_eq!(cg.describe(), "none");
        let vm = VmId::new();
        cg.create(vm, 1, 64).unwrap();
        cg.attach(vm, std::process::id()).unwrap();
        assert_eq!(cg.memory_bytes(vm), None);
        cg.remove(vm);
    }
}
