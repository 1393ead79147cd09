//! Every engine a node has, behind one [`Driver`]: each VM goes to the
//! driver of its engine (`qemu` and `microvm` are QEMU's own, `libvirt`
//! goes through libvirtd), and a VM found running after an agent restart
//! is adopted by the driver that started it.

use super::libvirt::{DOMAIN_FILE, LibvirtDriver, LibvirtInstance};
use super::qemu::{QemuDriver, QemuInstance};
use super::{Driver, DriverError, Instance, LaunchSpec, RunState};
use byteport_types::api::Engine;
use std::path::Path;

pub struct Engines {
    pub qemu: QemuDriver,
    /// libvirtd, when the node was given a connection that answered.
    pub libvirt: Option<LibvirtDriver>,
}

pub enum EngineInstance {
    Qemu(QemuInstance),
    Libvirt(LibvirtInstance),
}

impl Instance for EngineInstance {
    fn pid(&self) -> Option<u32> {
        match self {
            EngineInstance::Qemu(i) => i.pid(),
            EngineInstance::Libvirt(i) => i.pid(),
        }
    }

    async fn state(&self) -> RunState {
        match self {
            EngineInstance::Qemu(i) => i.state().await,
            EngineInstance::Libvirt(i) => i.state().await,
        }
    }

    async fn pause(&self) -> Result<(), DriverError> {
        match self {
            EngineInstance::Qemu(i) => i.pause().await,
            EngineInstance::Libvirt(i) => i.pause().await,
        }
    }

    async fn resume(&self) -> Result<(), DriverError> {
        match self {
            EngineInstance::Qemu(i) => i.resume().await,
            EngineInstance::Libvirt(i) => i.resume().await,
        }
    }

    async fn powerdown(&self) -> Result<(), DriverError> {
        match self {
            EngineInstance::Qemu(i) => i.powerdown().await,
            EngineInstance::Libvirt(i) => i.powerdown().await,
        }
    }

    async fn reset(&self) -> Result<(), DriverError> {
        match self {
            EngineInstance::Qemu(i) => i.reset().await,
            EngineInstance::Libvirt(i) => i.reset().await,
        }
    }

    async fn kill(&self) -> Result<(), DriverError> {
        match self {
            EngineInstance::Qemu(i) => i.kill().await,
            EngineInstance::Libvirt(i) => i.kill().await,
        }
    }

    async fn exited(&self) {
        match self {
            EngineInstance::Qemu(i) => i.exited().await,
            EngineInstance::Libvirt(i) => i.exited().await,
        }
    }
}

impl Driver for Engines {
    type Instance = EngineInstance;

    fn name(&self) -> &'static str {
        "engines"
    }

    fn engines(&self) -> Vec<Engine> {
        self.libvirt.iter().map(|_| Engine::Libvirt).collect()
    }

    async fn start(&self, spec: &LaunchSpec) -> Result<EngineInstance, DriverError> {
        match spec.engine {
            Engine::Libvirt => match &self.libvirt {
                Some(l) => l.start(spec).await.map(EngineInstance::Libvirt),
                None => Err(DriverError::Failed(
                    "this node has no libvirt connection (byteportd node --libvirt-uri)".into(),
                )),
            },
            Engine::Qemu | Engine::Microvm => self.qemu.start(spec).await.map(EngineInstance::Qemu),
            // Never placed here: no node lists it among its engines.
            Engine::Firecracker => Err(DriverError::Failed(
                "this node agent has no Firecracker driver".into(),
            )),
        }
    }

    async fn adopt(&self, dir: &Path) -> Option<EngineInstance> {
        if dir.join(DOMAIN_FILE).exists() {
            self.libvirt
                .as_ref()?
                .adopt(dir)
                .await
                .map(EngineInstance::Libvirt)
        } else {
            self.qemu.adopt(dir).await.map(EngineInstance::Qemu)
        }
    }
}
