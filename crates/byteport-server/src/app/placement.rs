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

fn inventory(n: &node::Model) -> NodeInventory<Uuid> {
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
        let arch = match self.store.image_fetch(v.image_id).await {
            Ok(i) => i.arch,
            Err(_) => "x86_64".into(),
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
        let req = Request {
            size: Resources {
                vcpus: v.vcpus,
                memory_mib: v.memory_mib,
                disk_gib: v.disk_gib,
            },
            arch,
            region: wish.region,
            avoid,
        };
        for _ in 0..RACE_RETRIES {
            let nodes: Vec<_> = self
                .store
                .node_list()
                .await?
                .iter()
                .map(inventory)
                .collect();
            match byteport_scheduler::place(&nodes, &req, policy, self.settings.overcommit) {
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
                        let _ = self.vm_changes.send(v.id);
                        self.hub.poke(node);
                        return Ok(Some(node));
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

    /// Places every VM that waits for a node; returns how many landed.
    pub async fn place_pending(&self) -> AppResult<usize> {
        let mut placed = 0;
        for v in self.store.vm_list_unplaced(500).await? {
            if self.place_vm(&v).await?.is_some() {
                placed += 1;
            }
        }
        Ok(placed)
    }
}
