//! `byteport node`: the hosts that run VMs, their capacity, cordons and
//! drains, join tokens, and the orphans a node reports.

use super::{Env, print_json};
use crate::NodeCmd;
use crate::client::{Method, decode, seg};
use crate::table::{Table, print_fields};
use anyhow::Result;
use byteport_types::api::{Capacity, JoinToken, Node, Vm};
use serde_json::json;

pub(super) fn run(env: &Env, cmd: NodeCmd) -> Result<()> {
    let c = &env.client;
    match cmd {
        NodeCmd::List => {
            let v = c.get("/v1/nodes", &[])?;
            if env.json() {
                return print_json(&v);
            }
            let ns: Vec<Node> = decode(&v)?;
            let mut t = Table::new(&[
                "NAME",
                "STATUS",
                "REGION",
                "VCPUS",
                "MEMORY(MiB)",
                "DISK(GiB)",
                "LAST HEARTBEAT",
            ]);
            for n in &ns {
                t.row(vec![
                    n.name.to_string(),
                    n.status.clone(),
                    n.region.clone(),
                    format!("{}/{}", n.usage.vcpus, n.capacity.vcpus),
                    format!("{}/{}", n.usage.memory_mib, n.capacity.memory_mib),
                    format!("{}/{}", n.usage.disk_gib, n.capacity.disk_gib),
                    opt_ts!(n.last_heartbeat_at),
                ]);
            }
            t.print();
            Ok(())
        }
        NodeCmd::Show { id } => {
            let v = c.get(&format!("/v1/nodes/{}", seg(&id)), &[])?;
            if env.json() {
                return print_json(&v);
            }
            let n: Node = decode(&v)?;
            let cap = |x: &Capacity| {
                format!(
                    "{} vCPUs, {} MiB, {} GiB",
                    x.vcpus, x.memory_mib, x.disk_gib
                )
            };
            print_fields(&[
                ("name", n.name.to_string()),
                ("id", n.id.to_string()),
                ("status", n.status.clone()),
                ("region", n.region.clone()),
                ("arch", n.arch.clone()),
                (
                    "guests",
                    n.platforms
                        .iter()
                        .map(|p| format!("{} ({})", p.arch, p.execution.as_str()))
                        .collect::<Vec<_>>()
                        .join(", "),
                ),
                ("engines", n.engines.join(",")),
                (
                    "unavailable",
                    n.unavailable_engines
                        .iter()
                        .map(|u| format!("{} ({})", u.engine, u.reason))
                        .collect::<Vec<_>>()
                        .join("; "),
                ),
                ("kvm", n.kvm.to_string()),
                ("capacity", cap(&n.capacity)),
                ("in use", cap(&n.usage)),
                ("reserved", cap(&n.reserved)),
                ("last heartbeat", opt_ts!(n.last_heartbeat_at)),
                ("created", ts!(n.created_at)),
            ]);
            if !n.networks.is_empty() {
                println!();
                let mut t = Table::new(&["BRIDGE", "NETWORK", "GATEWAY", "PROJECT", "VMS"]);
                for net in &n.networks {
                    t.row(vec![
                        net.bridge.clone(),
                        net.cidr.clone(),
                        net.gateway.clone(),
                        net.project_id.to_string(),
                        net.vms.to_string(),
                    ]);
                }
                t.print();
            }
            if !n.orphans.is_empty() {
                println!();
                println!(
                    "Orphans: VMs this node holds that the control plane does not know, stopped\n\
                     with their disks kept (byteport node adopt / byteport node remove-orphan):"
                );
                let mut t = Table::new(&["ID", "NAME", "IMAGE", "SIZE", "SINCE"]);
                for o in &n.orphans {
                    t.row(vec![
                        o.id.to_string(),
                        o.name.to_string(),
                        o.image.to_string(),
                        format!(
                            "{} vCPUs, {} MiB, {} GiB",
                            o.vcpus, o.memory_mib, o.disk_gib
                        ),
                        ts!(o.since),
                    ]);
                }
                t.print();
            }
            Ok(())
        }
        NodeCmd::Adopt {
            node,
            vm,
            project,
            name,
        } => {
            let v = c.value(
                Method::Post,
                &format!("/v1/nodes/{}/orphans/{}/adopt", seg(&node), seg(&vm)),
                &[],
                Some(&json!({"project": project, "name": name})),
            )?;
            if env.json() {
                return print_json(&v);
            }
            let vm: Vm = decode(&v)?;
            println!(
                "adopted {} into project {}; it is {} (byteport vm start {} to run it)",
                vm.name, vm.project, vm.state, vm.name
            );
            Ok(())
        }
        NodeCmd::RemoveOrphan { node, vm } => {
            c.request(
                Method::Delete,
                &format!("/v1/nodes/{}/orphans/{}", seg(&node), seg(&vm)),
                &[],
                None,
            )?;
            if !env.json() {
                println!("orphan {vm} is being removed with its disk");
            }
            Ok(())
        }
        NodeCmd::Cordon { ref id } | NodeCmd::Uncordon { ref id } | NodeCmd::Drain { ref id } => {
            let verb = match &cmd {
                NodeCmd::Cordon { .. } => "cordon",
                NodeCmd::Uncordon { .. } => "uncordon",
                _ => "drain",
            };
            let v = c.value(
                Method::Post,
                &format!("/v1/nodes/{}/{verb}", seg(id)),
                &[],
                None,
            )?;
            if env.json() {
                return print_json(&v);
            }
            let n: Node = decode(&v)?;
            println!("node {} is {}", n.name, n.status);
            Ok(())
        }
        NodeCmd::Remove { id } => {
            c.request(
                Method::Delete,
                &format!("/v1/nodes/{}", seg(&id)),
                &[],
                None,
            )?;
            println!("node {id} removed");
            Ok(())
        }
        NodeCmd::JoinToken { expires_in_minutes } => {
            let mut body = json!({});
            if let Some(m) = expires_in_minutes {
                body["expires_in_minutes"] = json!(m);
            }
            let v = c.value(Method::Post, "/v1/node-join-tokens", &[], Some(&body))?;
            if env.json() {
                return print_json(&v);
            }
            let t: JoinToken = decode(&v)?;
            print_fields(&[("token", t.token.clone()), ("expires", ts!(t.expires_at))]);
            println!();
            println!("On the new host, run (the token works once):");
            println!(
                "  byteportd node --server {} --join-token {}",
                c.base, t.token
            );
            Ok(())
        }
    }
}
