//! Bridged networks, the default on a node that runs as root with `ip`,
//! `nft` and `dnsmasq`: each project with VMs here gets a Linux bridge
//! (`bpnINDEX`, the node's address `.1` of the project's /24), each VM a
//! tap device on it (`bptXXXXXXXXXXXX`, from its id), and a fixed address
//! that a dnsmasq per bridge hands out by MAC (DHCP) beside DNS.
//!
//! nftables is the firewall, in a table of the node's own (`inet
//! byteport`), written whole from the attachments this node holds in one
//! `nft -f` transaction after every change, so a restart or a crash never
//! leaves a stale rule or misses one:
//! - port maps: an nftables map from host port to guest address and port,
//!   DNAT on the operator's forward address (prerouting and, for the
//!   host's own connections, output);
//! - `169.254.169.254:80` from a bridge is DNAT to the metadata relay on
//!   127.0.0.1 (`route_localnet` on the bridges);
//! - a guest reaches the host only for DHCP, DNS and that relay; a guest
//!   never reaches another bridge (another project); guests of a bridge
//!   reach each other (switched by the bridge itself);
//! - the outside is reached through masquerade, unless the VM's address
//!   is in the `noegress` set.
//!
//! Only a project's VMs on this node share its network: bridges of one
//! project on two nodes are not joined (there is no overlay).

use byteport_types::api::{Egress, NodeNetwork, PortForward};
use byteport_types::net::Subnet;
use byteport_types::{ProjectId, VmId};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

/// The nftables table the node owns.
pub const TABLE: &str = "byteport";
/// Where every cloud serves instance metadata.
pub const METADATA_ADDR: &str = "169.254.169.254";
/// Every project network lies in this range.
const PLAN: &str = "10.80.0.0/12";

/// One VM's place on a bridge; kept in its `vm.json` so that a restarted
/// node rebuilds the same rules before anything else.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub vm: VmId,
    pub project: ProjectId,
    pub cidr: String,
    pub address: Ipv4Addr,
    pub mac: String,
    pub tap: String,
    pub ports: Vec<PortForward>,
    pub egress: Egress,
}

/// The bridge of a project network.
pub fn bridge_name(s: &Subnet) -> String {
    let o = s.host(0).octets();
    format!("bpn{}", (u32::from(o[1]) - 80) * 256 + u32::from(o[2]))
}

/// A VM's tap device: the last 12 hex digits of its id (its random part).
pub fn tap_name(vm: VmId) -> String {
    let hex = vm.0.simple().to_string();
    format!("bpt{}", &hex[hex.len() - 12..])
}

/// Whether a link is one of the node's taps (`bpt` and 12 hex digits).
fn is_tap_name(n: &str) -> bool {
    n.len() == 15
        && n.starts_with("bpt")
        && n[3..]
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// Whether a link is one of the node's bridges (`bpn` and a number).
fn is_bridge_name(n: &str) -> bool {
    n.len() > 3 && n.starts_with("bpn") && n[3..].bytes().all(|b| b.is_ascii_digit())
}

fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// Why bridged networking cannot run here, if it cannot.
pub fn unavailable() -> Option<String> {
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|u| u.split_whitespace().next() == Some("0"))
        })
        .unwrap_or(false);
    if !root {
        return Some("the node does not run as root".into());
    }
    for (tool, arg) in [("nft", "--version"), ("dnsmasq", "--version"), ("ip", "-V")] {
        if run(tool, &[arg]).is_err() {
            return Some(format!("{tool} is not installed"));
        }
    }
    if !Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun is missing".into());
    }
    None
}

/// The node's bridged networks.
pub struct BridgeNet {
    dir: PathBuf,
    relay_port: u16,
    /// Port maps answer on this address only (`None`: every local one).
    forward_host: Option<Ipv4Addr>,
    vms: Mutex<BTreeMap<VmId, Attachment>>,
    /// Held while links, dnsmasq and the table change: two VMs starting at
    /// once must not both start a bridge's dnsmasq.
    changes: Mutex<()>,
}

impl BridgeNet {
    /// `dir` keeps dnsmasq's files; `forward_host` is where port maps
    /// answer (0.0.0.0: on every address of the host).
    pub fn new(dir: PathBuf, relay_port: u16, forward_host: &str) -> Result<Self, String> {
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let host: Ipv4Addr = forward_host
            .parse()
            .map_err(|_| format!("the forward host {forward_host:?} is not an IPv4 address"))?;
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
            .map_err(|e| format!("cannot turn on IPv4 forwarding: {e}"))?;
        Ok(BridgeNet {
            dir,
            relay_port,
            forward_host: (!host.is_unspecified()).then_some(host),
            vms: Mutex::default(),
            changes: Mutex::default(),
        })
    }

    /// Records attachments from before a restart and writes the rules,
    /// without touching links (the VMs' tasks attach them again).
    pub fn restore(&self, list: Vec<Attachment>) -> Result<(), String> {
        if let Ok(mut vms) = self.vms.lock() {
            for a in list {
                vms.insert(a.vm, a);
            }
        }
        self.apply()
    }

    /// Makes the VM's bridge, DHCP entry and tap (each only if missing)
    /// and writes the rules. An unspecified address (0.0.0.0) is given the
    /// lowest free one of the network here; the attachment as made is
    /// returned.
    pub fn attach(&self, mut a: Attachment) -> Result<Attachment, String> {
        let _one = self
            .changes
            .lock()
            .map_err(|_| "network changes poisoned")?;
        let subnet = Subnet::parse(&a.cidr).ok_or_else(|| format!("bad network {}", a.cidr))?;
        let br = bridge_name(&subnet);
        {
            let mut vms = self.vms.lock().map_err(|_| "network table poisoned")?;
            let taken = |ip: Ipv4Addr| {
                vms.values()
                    .any(|x| x.vm != a.vm && x.cidr == a.cidr && x.address == ip)
            };
            if a.address.is_unspecified() || taken(a.address) {
                let (lo, hi) = subnet.guest_range();
                a.address = (lo.octets()[3]..=hi.octets()[3])
                    .map(|n| subnet.host(n))
                    .find(|ip| !taken(*ip))
                    .ok_or_else(|| format!("no free address left in {} on this node", a.cidr))?;
            }
            vms.insert(a.vm, a.clone());
        }
        self.ensure_bridge(&br, &subnet)?;
        self.ensure_dnsmasq(&br, &subnet)?;
        if !link_exists(&a.tap) {
            run("ip", &["tuntap", "add", "dev", &a.tap, "mode", "tap"])?;
        }
        run("ip", &["link", "set", &a.tap, "master", &br, "up"])?;
        self.apply()?;
        Ok(a)
    }

    /// Removes the VM's tap and, with its last VM, the bridge and its
    /// dnsmasq; writes the rules.
    pub fn detach(&self, vm: VmId) -> Result<(), String> {
        let _one = self
            .changes
            .lock()
            .map_err(|_| "network changes poisoned")?;
        let gone = self.vms.lock().ok().and_then(|mut v| v.remove(&vm));
        let tap = gone
            .as_ref()
            .map_or_else(|| tap_name(vm), |a| a.tap.clone());
        if link_exists(&tap) {
            run("ip", &["link", "del", &tap])?;
        }
        self.apply()?;
        if let Some(a) = gone
            && let Some(subnet) = Subnet::parse(&a.cidr)
        {
            let br = bridge_name(&subnet);
            let left = self
                .vms
                .lock()
                .map(|v| v.values().any(|x| x.cidr == a.cidr))
                .unwrap_or(true);
            if left {
                self.write_hosts(&br, &a.cidr)?;
                self.hup_dnsmasq(&br);
            } else {
                self.stop_dnsmasq(&br);
                if link_exists(&br) {
                    run("ip", &["link", "del", &br])?;
                }
            }
        }
        Ok(())
    }

    /// Deletes BytePort's links that no VM here holds (left by a crash).
    pub fn sweep(&self) {
        let (taps, bridges) = {
            let vms = self.vms.lock();
            let Ok(vms) = vms else { return };
            let taps: Vec<String> = vms.values().map(|a| a.tap.clone()).collect();
            let bridges: Vec<String> = vms
                .values()
                .filter_map(|a| Subnet::parse(&a.cidr))
                .map(|s| bridge_name(&s))
                .collect();
            (taps, bridges)
        };
        for e in std::fs::read_dir("/sys/class/net")
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            let stale = (is_tap_name(&name) && !taps.contains(&name))
                || (is_bridge_name(&name) && !bridges.contains(&name));
            if stale {
                tracing::info!(link = %name, "removing a network link no VM holds");
                if is_bridge_name(&name) {
                    self.stop_dnsmasq(&name);
                }
                let _ = run("ip", &["link", "del", &name]);
            }
        }
    }

    /// The networks with VMs here.
    pub fn networks(&self) -> Vec<NodeNetwork> {
        let vms = match self.vms.lock() {
            Ok(v) => v,
            Err(_) => return Vec::new(),
        };
        let mut by: BTreeMap<String, NodeNetwork> = BTreeMap::new();
        for a in vms.values() {
            let Some(s) = Subnet::parse(&a.cidr) else {
                continue;
            };
            by.entry(a.cidr.clone())
                .or_insert_with(|| NodeNetwork {
                    bridge: bridge_name(&s),
                    project_id: a.project,
                    cidr: a.cidr.clone(),
                    gateway: s.gateway().to_string(),
                    vms: 0,
                })
                .vms += 1;
        }
        by.into_values().collect()
    }

    fn ensure_bridge(&self, br: &str, s: &Subnet) -> Result<(), String> {
        if !link_exists(br) {
            // A fixed address of its own: a bridge otherwise takes its
            // first port's, and the guests' gateway would change MAC each
            // time that VM goes.
            let o = s.gateway().octets();
            let mac = format!("02:62:70:{:02x}:{:02x}:01", o[1], o[2]);
            run(
                "ip",
                &["link", "add", br, "address", &mac, "type", "bridge"],
            )?;
        }
        let addr = format!("{}/24", s.gateway());
        let have = run("ip", &["-4", "-o", "addr", "show", "dev", br])?;
        if !have.contains(&format!("inet {addr} ")) {
            run("ip", &["addr", "replace", &addr, "dev", br])?;
        }
        run("ip", &["link", "set", br, "up"])?;
        // DNAT to the relay on 127.0.0.1 for packets that come in here.
        std::fs::write(format!("/proc/sys/net/ipv4/conf/{br}/route_localnet"), "1")
            .map_err(|e| format!("cannot set route_localnet on {br}: {e}"))?;
        Ok(())
    }

    fn pidfile(&self, br: &str) -> PathBuf {
        self.dir.join(format!("dnsmasq-{br}.pid"))
    }

    fn hostsfile(&self, br: &str) -> PathBuf {
        self.dir.join(format!("dhcp-hosts-{br}"))
    }

    fn dnsmasq_pid(&self, br: &str) -> Option<u32> {
        let pid: u32 = std::fs::read_to_string(self.pidfile(br))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        String::from_utf8_lossy(&cmd)
            .contains(&format!("--interface={br}"))
            .then_some(pid)
    }

    fn write_hosts(&self, br: &str, cidr: &str) -> Result<(), String> {
        let vms = self.vms.lock().map_err(|_| "network table poisoned")?;
        let mut lines = String::new();
        for a in vms.values().filter(|a| a.cidr == cidr) {
            lines.push_str(&format!("{},{}\n", a.mac, a.address));
        }
        let path = self.hostsfile(br);
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, lines)
            .and_then(|_| std::fs::rename(&tmp, &path))
            .map_err(|e| format!("cannot write {}: {e}", path.display()))
    }

    fn hup_dnsmasq(&self, br: &str) {
        if let Some(pid) = self.dnsmasq_pid(br) {
            let _ = run("kill", &["-HUP", &pid.to_string()]);
        }
    }

    fn stop_dnsmasq(&self, br: &str) {
        if let Some(pid) = self.dnsmasq_pid(br) {
            let _ = run("kill", &[&pid.to_string()]);
        }
        let _ = std::fs::remove_file(self.pidfile(br));
        let _ = std::fs::remove_file(self.hostsfile(br));
    }

    /// One dnsmasq per bridge: DHCP for the addresses in its hosts file
    /// only (`static`), DNS forwarded to the host's resolvers. It outlives
    /// the node, as QEMU does; a hosts file change is a SIGHUP.
    fn ensure_dnsmasq(&self, br: &str, s: &Subnet) -> Result<(), String> {
        self.write_hosts(br, &s.cidr())?;
        if self.dnsmasq_pid(br).is_some() {
            self.hup_dnsmasq(br);
            return Ok(());
        }
        let gw = s.gateway().to_string();
        run(
            "dnsmasq",
            &[
                "--conf-file=/dev/null",
                &format!("--pid-file={}", self.pidfile(br).display()),
                &format!("--interface={br}"),
                "--bind-interfaces",
                "--except-interface=lo",
                &format!("--listen-address={gw}"),
                &format!("--dhcp-range={},static,255.255.255.0,12h", s.host(0)),
                &format!("--dhcp-hostsfile={}", self.hostsfile(br).display()),
                &format!("--dhcp-option=option:router,{gw}"),
                &format!("--dhcp-option=option:dns-server,{gw}"),
                "--dhcp-authoritative",
                "--leasefile-ro",
                "--no-hosts",
                "--user=root",
            ],
        )?;
        Ok(())
    }

    /// The node's whole table, from the attachments (sorted, so the same
    /// VMs always give the same text).
    pub fn ruleset(&self) -> String {
        let vms: Vec<Attachment> = self
            .vms
            .lock()
            .map(|v| v.values().cloned().collect())
            .unwrap_or_default();
        render(&vms, self.relay_port, self.forward_host)
    }

    /// Replaces the table in one transaction.
    pub fn apply(&self) -> Result<(), String> {
        let script = format!(
            "table inet {TABLE} {{}}\ndelete table inet {TABLE}\n{}",
            self.ruleset()
        );
        let mut child = Command::new("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run nft: {e}"))?;
        if let Some(mut i) = child.stdin.take() {
            use std::io::Write;
            i.write_all(script.as_bytes())
                .map_err(|e| format!("cannot feed nft: {e}"))?;
        }
        let out = child.wait_with_output().map_err(|e| format!("nft: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "nft refused the node's table: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(())
    }

    /// Removes the node's table (for tests that clean up after themselves).
    pub fn remove_table() {
        let _ = run("nft", &["delete", "table", "inet", TABLE]);
    }
}

/// The table for these attachments.
pub fn render(vms: &[Attachment], relay_port: u16, forward_host: Option<Ipv4Addr>) -> String {
    let mut vms: Vec<&Attachment> = vms.iter().collect();
    vms.sort_by_key(|a| (a.cidr.clone(), a.address));
    let mut bridges: Vec<String> = vms
        .iter()
        .filter_map(|a| Subnet::parse(&a.cidr))
        .map(|s| bridge_name(&s))
        .collect();
    bridges.sort();
    bridges.dedup();
    let mut maps: Vec<String> = Vec::new();
    for a in &vms {
        for p in &a.ports {
            maps.push(format!(
                "{} : {} . {}",
                p.host_port, a.address, p.guest_port
            ));
        }
    }
    let noegress: Vec<String> = vms
        .iter()
        .filter(|a| a.egress == Egress::Deny)
        .map(|a| a.address.to_string())
        .collect();
    let elements = |v: &[String]| {
        if v.is_empty() {
            String::new()
        } else {
            format!("\n\t\telements = {{ {} }}", v.join(", "))
        }
    };
    let to_host = match forward_host {
        Some(h) => format!("ip daddr {h}"),
        None => "fib daddr type local".into(),
    };
    let same_bridge: String = bridges
        .iter()
        .map(|b| format!("\t\tiifname \"{b}\" oifname \"{b}\" accept\n"))
        .collect();
    format!(
        "table inet {TABLE} {{
\tmap portmap {{
\t\ttype inet_service : ipv4_addr . inet_service{maps}
\t}}
\tset noegress {{
\t\ttype ipv4_addr{noegress}
\t}}
\tchain prerouting {{
\t\ttype nat hook prerouting priority dstnat; policy accept;
\t\tiifname \"bpn*\" ip daddr {METADATA_ADDR} tcp dport 80 dnat ip to 127.0.0.1:{relay_port}
\t\t{to_host} dnat ip to tcp dport map @portmap
\t}}
\tchain output {{
\t\ttype nat hook output priority -100; policy accept;
\t\t{to_host} dnat ip to tcp dport map @portmap
\t}}
\tchain postrouting {{
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\toifname \"bpn*\" ip saddr 127.0.0.0/8 masquerade
\t\tip saddr {PLAN} oifname != \"bpn*\" masquerade
\t}}
\tchain input {{
\t\ttype filter hook input priority filter; policy accept;
\t\tiifname \"bpn*\" ct state established,related accept
\t\tiifname \"bpn*\" udp dport {{ 53, 67 }} accept
\t\tiifname \"bpn*\" tcp dport 53 accept
\t\tiifname \"bpn*\" ip daddr 127.0.0.1 tcp dport {relay_port} ct status dnat accept
\t\tiifname \"bpn*\" drop
\t}}
\tchain forward {{
\t\ttype filter hook forward priority filter; policy accept;
\t\tct state established,related accept
{same_bridge}\t\tiifname \"bpn*\" oifname \"bpn*\" drop
\t\toifname \"bpn*\" ct status dnat accept
\t\toifname \"bpn*\" drop
\t\tiifname \"bpn*\" ip saddr @noegress drop
\t\tiifname \"bpn*\" accept
\t}}
}}
",
        maps = elements(&maps),
        noegress = elements(&noegress),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn att(vm: u128, cidr: &str, addr: &str, egress: Egress, ports: &[(u16, u16)]) -> Attachment {
        let vm = VmId(uuid::Uuid::from_u128(vm));
        Attachment {
            vm,
            project: ProjectId(uuid::Uuid::from_u128(7)),
            cidr: cidr.into(),
            address: addr.parse().unwrap(),
            mac: "52:54:00:00:00:01".into(),
            tap: tap_name(vm),
            ports: ports
                .iter()
                .map(|&(h, g)| PortForward {
                    guest_port: g,
                    host_port: h,
                    host: "0.0.0.0".into(),
                })
                .collect(),
            egress,
        }
    }

    #[test]
    fn names_fit_linux_interface_names() {
        let s = Subnet::of_index(4095).unwrap();
        assert_eq!(bridge_name(&s), "bpn4095");
        let t = tap_name(VmId::new());
        assert_eq!(t.len(), 15, "{t}");
        assert!(is_tap_name(&t) && is_bridge_name("bpn4095"));
        assert!(!is_tap_name("bptn64") && !is_bridge_name("bpnx") && !is_bridge_name("bpn"));
    }

    #[test]
    fn the_table_follows_the_vms_and_is_the_same_for_the_same_vms() {
        let a = att(
            1,
            "10.80.0.0/24",
            "10.80.0.10",
            Egress::Allow,
            &[(30001, 22)],
        );
        let b = att(
            2,
            "10.80.1.0/24",
            "10.80.1.10",
            Egress::Deny,
            &[(30002, 22), (30003, 8080)],
        );
        let one = render(&[a.clone(), b.clone()], 4321, None);
        assert_eq!(
            one,
            render(&[b.clone(), a.clone()], 4321, None),
            "order-free"
        );
        assert!(one.contains("elements = { 30001 : 10.80.0.10 . 22, 30002 : 10.80.1.10 . 22, 30003 : 10.80.1.10 . 8080 }"), "{one}");
        assert!(one.contains("elements = { 10.80.1.10 }"), "{one}");
        assert!(
            one.contains("iifname \"bpn0\" oifname \"bpn0\" accept"),
            "{one}"
        );
        assert!(
            one.contains("iifname \"bpn1\" oifname \"bpn1\" accept"),
            "{one}"
        );
        assert!(one.contains("dnat ip to 127.0.0.1:4321"), "{one}");
        assert!(one.contains("fib daddr type local dnat"), "{one}");
        let on_lo = render(&[a], 4321, Some(Ipv4Addr::LOCALHOST));
        assert!(on_lo.contains("ip daddr 127.0.0.1 dnat ip to tcp dport map @portmap"));
        let empty = render(&[], 4321, None);
        assert!(!empty.contains("elements"), "{empty}");
    }
}
