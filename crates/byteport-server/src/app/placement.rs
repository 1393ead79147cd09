//! Placement: VMs that want to run and have no node get one, through the
//! scheduler's pure [`byteport_scheduler::place`] and the store's one
//! transaction that writes the placement with the node's reservation. A VM
//! that fits nowhere stays `pending` with the scheduler's reason, and the
//! background loop tries again.

use super::App;
use crate::error::AppResult;
use byteport_scheduler::{Decision, NodeInventory, Policy, Request, Resources};
use byteport_store::{Size, node, vm};
use byteport_types::api::{Placement, PlacementPolicy};
use uuid::Uuid;

/// Attempts per VM when another placement takes the chosen node's room.
const RACE_RETRIES: usize = 3;

/// A node row as the scheduler sees it.
pub fn inventory(n: &node::Model) -> NodeInventory<Uuid> {
    NodeInventory {
        id: n.id,
        name: n.name.clone(),
        online: n.status == "online" || n.status == "cordoned",
        cordoned: n.status == "cordoned",
        region: n.region.clone(),
        arch: n.arch.clone(),
        capacity: Resources {
            vcpus: n.cap_vcpus,
            memory_mib: n.cap_memory_mib,
            disk_gib: n.cap_disk_gib,
        },
        reserved: Resources {
            vcpus: n.reserved_vcpus,
            memory_mib: n.reserved_memory_mib,
            disk_gib: n.reserved_disk_gib,
        },
    }
}

impl App {
    /// Tries to place one VM now. Returns the node it landed on.
    pub(crate) async fn place_vm(&self, v: &vm::Model) -> AppResult<Option<Uuid>> {
        let mut pass = Pass::default();
        self.place_in(v, &mut pass).await
    }

    /// Places one VM using (and keeping up to date) the inventory and image
    /// architectures of `pass`; the inventory is read again only when it is
    /// missing or a placement lost a race to another placer.
    async fn place_in(&self, v: &vm::Model, pass: &mut Pass) -> AppResult<Option<Uuid>> {
        let arch = match pass.arch.get(&v.image_id) {
            Some(a) => a.clone(),
            None => {
                let a = match self.store.image_fetch(v.image_id).await {
                    Ok(i) => i.arch,
                    Err(_) => "x86_64".into(),
                };
                pass.arch.insert(v.image_id, a.clone());
                a
            }
        };
        let wish: Placement = v
            .placement
            .as_deref()
            .and_then(|p| serde_json::from_str(p).ok())
            .unwrap_or_default();
        let avoid = match &v.placement_group {
            Some(g) => self.store.nodes_of_group(v.project_id, g).await?,
            None => Vec::new(),
        };
        let policy = match wish.policy {
            Some(PlacementPolicy::Spread) => Policy::Spread,
            Some(PlacementPolicy::Pack) => Policy::Pack,
            None => self.settings.placement_policy,
        };
        let size = Resources {
            vcpus: v.vcpus,
            memory_mib: v.memory_mib,
            disk_gib: v.disk_gib,
        };
        let req = Request {
            size,
            arch,
            region: wish.region,
            avoid,
        };
        for _ in 0..RACE_RETRIES {
            if pass.nodes.is_none() {
                let nodes = self
                    .store
                    .node_list()
                    .await?
                    .iter()
                    .map(inventory)
                    .collect();
                pass.nodes = Some(nodes);
            }
            let nodes = pass.nodes.as_mut().map(std::mem::take).unwrap_or_default();
            let decision =
                byteport_scheduler::place(&nodes, &req, policy, self.settings.overcommit);
            pass.nodes = Some(nodes);
            match decision {
                Decision::Place { node, limit } => {
                    let placed = self
                        .store
                        .vm_place(
                            v.id,
                            node,
                            Size {
                                vcpus: v.vcpus,
                                memory_mib: v.memory_mib,
                                disk_gib: v.disk_gib,
                            },
                            Size {
                                vcpus: limit.vcpus,
                                memory_mib: limit.memory_mib,
                                disk_gib: limit.disk_gib,
                            },
                        )
                        .await?;
                    if placed {
                        if let Some(n) = pass
                            .nodes
                            .as_mut()
                            .and_then(|ns| ns.iter_mut().find(|n| n.id == node))
                        {
                            n.reserved.vcpus += size.vcpus;
                            n.reserved.memory_mib += size.memory_mib;
                            n.reserved.disk_gib += size.disk_gib;
                        }
                        let _ = self.vm_changes.send(v.id);
                        self.hub.poke(node);
                        return Ok(Some(node));
                    }
                    // Another placer took the room, or the VM was placed or
                    // deleted meanwhile: look again.
                    pass.nodes = None;
                    let current = self.store.vm_fetch(v.id).await?;
                    if current.node_id.is_some() || current.deleted_at.is_some() {
                        return Ok(current.node_id);
                    }
                }
                Decision::NoFit(why) => {
                    self.store.vm_set_pending_reason(v.id, &why).await?;
                    let _ = self.vm_changes.send(v.id);
                    return Ok(None);
                }
            }
        }
        Ok(None)
    }

    /// Places every VM that waits for a node; returns how many landed. The
    /// inventory is read once per pass (and again after a lost race).
    pub async fn place_pending(&self) -> AppResult<usize> {
        let mut placed = 0;
        let mut pass = Pass::default();
        for v in self.store.vm_list_unplaced(500).await? {
            if self.place_in(&v, &mut pass).await?.is_some() {
                placed += 1;
            }
        }
        Ok(placed)
    }
}

/// What one placement pass reads once and keeps up to date.
#[derive(Default)]
struct Pass {
    nodes: Option<Vec<NodeInventory<Uuid>>>,
    arch: std::collections::HashMap<Uuid, String>,
}
