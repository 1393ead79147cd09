//! VM networking. Under QEMU's user-mode network a guest is restricted:
//! it reaches neither the host nor the outside, only the metadata address
//! (relayed by [`pipe_stdio`] to the node) and what QEMU itself answers
//! (DHCP, DNS); chosen guest ports are forwarded from host ports that this
//! allocator hands out without collisions across the node's VMs.

use byteport_types::VmId;
use byteport_types::api::PortForward;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::ops::RangeInclusive;
use std::sync::Mutex;

/// Where a guest under user-mode networking reaches the node's metadata
/// relay, port 80. QEMU forwards a guest's connections only to addresses
/// inside its virtual network (10.0.2.0/24, not its host or DNS address),
/// so the cloud's usual 169.254.169.254 cannot be used there.
pub const USER_METADATA_ADDR: &str = "10.0.2.254";

/// Joins standard input and output to a TCP connection to `addr` until
/// both sides are done: what QEMU runs for each guest connection to the
/// metadata address (`guestfwd=...-cmd:`), with the guest's connection as
/// its standard input and output.
pub fn pipe_stdio(addr: &str) -> std::io::Result<()> {
    let up = TcpStream::connect(addr)?;
    let mut down = up.try_clone()?;
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let _ = std::io::copy(&mut stdin, &mut down);
        // The guest is done sending. No half-close towards the relay: its
        // HTTP server drops a half-closed connection without answering.
        // The answer has until the grace ends; then the pipe goes, so a
        // kept-alive connection never leaves a process behind.
        std::thread::sleep(PIPE_GRACE);
        std::process::exit(0);
    });
    let mut from = up;
    let mut stdout = std::io::stdout().lock();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = from.read(&mut buf)?;
        if n == 0 {
            break;
        }
        stdout.write_all(&buf[..n])?;
        stdout.flush()?;
    }
    let _ = from.shutdown(Shutdown::Both);
    Ok(())
}

/// How long a metadata pipe waits for the relay's answer once the guest
/// has closed its side.
const PIPE_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// How VMs are connected.
pub trait Network: Send + Sync + 'static {
    /// Host ports for the VM's guest ports; stable for the VM's life.
    fn allocate(&self, vm: VmId, guest_ports: &[u16]) -> Result<Vec<PortForward>, String>;
    /// Takes back ports a VM held before an agent restart.
    fn adopt(&self, vm: VmId, ports: &[PortForward]);
    /// Frees everything the VM held.
    fn release(&self, vm: VmId);
}

/// User-mode NAT with host port forwards.
pub struct UserNet {
    /// The host address forwards listen on.
    pub host: String,
    range: RangeInclusive<u16>,
    used: Mutex<HashMap<u16, VmId>>,
}

impl UserNet {
    pub fn new(host: String, range: RangeInclusive<u16>) -> Self {
        UserNet {
            host,
            range,
            used: Mutex::default(),
        }
    }
}

impl Network for UserNet {
    fn allocate(&self, vm: VmId, guest_ports: &[u16]) -> Result<Vec<PortForward>, String> {
        let mut used = self.used.lock().map_err(|_| "port table poisoned")?;
        let mut out = Vec::new();
        let span = u32::from(self.range.end() - self.range.start()) + 1;
        // Start at a spot derived from the VM id so restarts of many agents
        // do not all probe the same ports first.
        let offset = (vm.0.as_u128() % u128::from(span)) as u32;
        for &guest_port in guest_ports {
            let mut found = None;
            for i in 0..span {
                let port = self.range.start() + ((offset + i) % span) as u16;
                if used.contains_key(&port) {
                    continue;
                }
                if TcpListener::bind((self.host.as_str(), port)).is_ok() {
                    found = Some(port);
                    break;
                }
            }
            let Some(port) = found else {
                for p in &out {
                    let p: &PortForward = p;
                    used.remove(&p.host_port);
                }
                return Err(format!(
                    "no free host port in {}-{}",
                    self.range.start(),
                    self.range.end()
                ));
            };
            used.insert(port, vm);
            out.push(PortForward {
                guest_port,
                host_port: port,
                host: self.host.clone(),
            });
        }
        Ok(out)
    }

    fn adopt(&self, vm: VmId, ports: &[PortForward]) {
        if let Ok(mut used) = self.used.lock() {
            for p in ports {
                used.insert(p.host_port, vm);
            }
        }
    }

    fn release(&self, vm: VmId) {
        if let Ok(mut used) = self.used.lock() {
            used.retain(|_, v| *v != vm);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_never_collide_and_come_back() {
        // Above Linux's ephemeral range (32768-60999): no outgoing
        // connection of another test can be holding one of these.
        let net = UserNet::new("127.0.0.1".into(), 61000..=61009);
        let mut seen = std::collections::HashSet::new();
        let vms: Vec<VmId> = (0..5).map(|_| VmId::new()).collect();
        for vm in &vms {
            for p in net.allocate(*vm, &[22, 80]).unwrap() {
                assert!(seen.insert(p.host_port), "port {} given twice", p.host_port);
            }
        }
        assert!(
            net.allocate(VmId::new(), &[22]).is_err(),
            "the range is full"
        );
        net.release(vms[0]);
        assert_eq!(net.allocate(VmId::new(), &[22, 80]).unwrap().len(), 2);
    }
}
