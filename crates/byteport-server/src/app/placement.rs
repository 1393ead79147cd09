//! Placement: VMs that want to run and have no node get one, through the
//! scheduler's pure [`byteport_scheduler::place`] and the store's one
//! transaction that writes the placement with the node's reservation. A VM
//! that fits nowhere stays `pending` with the scheduler's reason, and the
//! background loop tries again.

use super::App;
use crate::error::AppResult;
use byteport_scheduler::{Decision, NodeInventory, Policy, Request, Resources};
use byteport_store::{PlaceItem, Size, node, vm};
use byteport_types::api::{Placement, PlacementPolicy};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use uuid::Uuid;

/// Attempts per VM when another placement takes the chosen node's room.
const RACE_RETRIES: usize = 3;
/// Placements committed together by a placement pass.
const BATCH: usize = 64;
/// VMs one placement pass takes on, all decided on one inventory read
/// (re-read only after a lost race).
const PASS: u64 = 2000;

/// A node row as the scheduler sees it.
pub fn inventory(n: &node::Model) -> NodeInventory<Uuid> {
    NodeInventory {
        id: n.id,
        name: n.name.clone(),
        online: n.status == "online" || n.status == "cordoned",
        cordoned: n.status == "cordoned",
        region: n.region.clone(),
        platforms: super::nodes::node_platforms(n)
            .into_iter()
            .map(|p| byteport_scheduler::Platform {
                native: p.execution == byteport_types::api::Execution::Native,
                arch: p.arch,
            })
            .collect(),
        engines: super::nodes::node_engines(n),
        unavailable: super::nodes::node_unavailable_engines(n)
            .into_iter()
            .map(|u| (u.engine, u.reason))
            .collect(),
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

/// How the scheduler's decisions went, for /metrics.
#[derive(Default)]
pub struct Decisions {
    /// VMs placed on a node.
    pub placed: AtomicU64,
    /// Decisions that found no node with room (the VM stays pending).
    pub no_fit: AtomicU64,
    /// Placements another placer beat to the room (decided again).
    pub lost_race: AtomicU64,
}

impl App {
    /// Tries to place one VM now. Returns the node it landed on.
    pub(crate) async fn place_vm(&self, v: &vm::Model) -> AppResult<Option<Uuid>> {
        let mut pass = Pass::default();
        self.place_in(v, &mut pass).await
    }

    /// What the scheduler is asked for `v`, and under which policy.
    async fn request_for(
        &self,
        v: &vm::Model,
        pass: &mut Pass,
    ) -> AppResult<(Request<Uuid>, Policy)> {
        let arch = v.arch.clone();
        let wish: Placement = v
            .placement
            .as_deref()
            .and_then(|p| serde_json::from_str(p).ok())
            .unwrap_or_default();
        let avoid = match &v.placement_group {
            Some(g) => {
                let mut nodes = self.store.nodes_of_group(v.project_id, g).await?;
                // Members this pass has decided on but not yet committed.
                if let Some(more) = pass.groups.get(&(v.project_id, g.clone())) {
                    nodes.extend(more.iter().copied());
                }
                nodes
            }
            None => Vec::new(),
        };
        let policy = match wish.policy {
            Some(PlacementPolicy::Spread) => Policy::Spread,
            Some(PlacementPolicy::Pack) => Policy::Pack,
            None => self.settings.placement_policy,
        };
        let req = Request {
            size: size_of(v),
            arch,
            engine: v.engine.clone(),
            region: wish.region,
            avoid,
        };
        Ok((req, policy))
    }

    /// The scheduler's decision on the pass's inventory (read first if the
    /// pass has none).
    async fn decide(
        &self,
        req: &Request<Uuid>,
        policy: Policy,
        pass: &mut Pass,
    ) -> AppResult<Decision<Uuid>> {
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
        let nodes = pass.nodes.as_deref().unwrap_or_default();
        Ok(byteport_scheduler::place(
            nodes,
            req,
            policy,
            self.settings.overcommit,
        ))
    }

    /// Says that `v` landed on `node`: waiters, event streams, the node.
    fn landed(&self, v: &vm::Model, node: Uuid) {
        self.scheduler.placed.fetch_add(1, Relaxed);
        let _ = self.vm_changes.send(v.id);
        self.hub.poke(node);
    }

    /// Keeps `v` pending with the scheduler's reason.
    async fn no_fit(&self, v: &vm::Model, why: &str) -> AppResult<()> {
        self.scheduler.no_fit.fetch_add(1, Relaxed);
        if v.state_reason.as_deref() == Some(why) {
            // Said already: no write, and no change to tell watchers of
            // (every pass looks at every waiting VM again).
            return Ok(());
        }
        self.store.vm_set_pending_reason(v.id, why).await?;
        let _ = self.vm_changes.send(v.id);
        Ok(())
    }

    /// Places one VM using (and keeping up to date) the inventory of
    /// `pass`; the inventory is read again only when it is
    /// missing or a placement lost a race to another placer.
    async fn place_in(&self, v: &vm::Model, pass: &mut Pass) -> AppResult<Option<Uuid>> {
        let (req, policy) = self.request_for(v, pass).await?;
        for _ in 0..RACE_RETRIES {
            match self.decide(&req, policy, pass).await? {
                Decision::Place { node, limit } => {
                    if self
                        .store
                        .vm_place(v.id, node, to_size(req.size), to_size(limit))
                        .await?
                    {
                        pass.reserve(node, req.size);
                        self.landed(v, node);
                        return Ok(Some(node));
                    }
                    // Another placer took the room, or the VM was placed or
                    // deleted meanwhile: look again.
                    self.scheduler.lost_race.fetch_add(1, Relaxed);
                    pass.nodes = None;
                    let current = self.store.vm_fetch(v.id).await?;
                    if current.node_id.is_some() || current.deleted_at.is_some() {
                        return Ok(current.node_id);
                    }
                }
                Decision::NoFit(why) => {
                    self.no_fit(v, &why).await?;
                    return Ok(None);
                }
            }
        }
        Ok(None)
    }

    /// Places every VM that waits for a node; returns how many landed. The
    /// inventory is read once per pass (and again after a lost race); the
    /// VMs are decided on it in memory, a batch at a time, and each batch
    /// is committed in one transaction. A VM whose placement lost a race
    /// is placed again on its own, on a fresh inventory.
    pub async fn place_pending(&self) -> AppResult<usize> {
        let mut placed = 0;
        let mut pass = Pass::default();
        let waiting = self.store.vm_list_unplaced(PASS).await?;
        for chunk in waiting.chunks(BATCH) {
            let mut batch: Vec<(&vm::Model, PlaceItem)> = Vec::with_capacity(chunk.len());
            for v in chunk {
                let (req, policy) = self.request_for(v, &mut pass).await?;
                match self.decide(&req, policy, &mut pass).await? {
                    Decision::Place { node, limit } => {
                        // Counted now, so the next decision sees it.
                        pass.reserve(node, req.size);
                        if let Some(g) = &v.placement_group {
                            pass.groups
                                .entry((v.project_id, g.clone()))
                                .or_default()
                                .push(node);
                        }
                        let item = PlaceItem {
                            vm_id: v.id,
                            node_id: node,
                            size: to_size(req.size),
                            limit: to_size(limit),
                        };
                        batch.push((v, item));
                    }
                    Decision::NoFit(why) => self.no_fit(v, &why).await?,
                }
            }
            let items: Vec<PlaceItem> = batch.iter().map(|(_, i)| *i).collect();
            let landed = self.store.vm_place_many(&items).await?;
            let mut lost = Vec::new();
            for ((v, item), ok) in batch.into_iter().zip(landed) {
                if ok {
                    placed += 1;
                    self.landed(v, item.node_id);
                } else {
                    lost.push(v);
                }
            }
            if !lost.is_empty() {
                self.scheduler
                    .lost_race
                    .fetch_add(lost.len() as u64, Relaxed);
                // The inventory counted placements that did not happen.
                pass.nodes = None;
                for v in lost {
                    if self.place_in(v, &mut pass).await?.is_some() {
                        placed += 1;
                    }
                }
            }
        }
        Ok(placed)
    }
}

fn size_of(v: &vm::Model) -> Resources {
    Resources {
        vcpus: v.vcpus,
        memory_mib: v.memory_mib,
        disk_gib: v.disk_gib,
    }
}

/// The store's form of the scheduler's resources.
pub fn to_size(r: Resources) -> Size {
    Size {
        vcpus: r.vcpus,
        memory_mib: r.memory_mib,
        disk_gib: r.disk_gib,
    }
}

/// What one placement pass reads once and keeps up to date.
#[derive(Default)]
struct Pass {
    nodes: Option<Vec<NodeInventory<Uuid>>>,
    /// Nodes chosen in this pass for each (project, anti-affinity group).
    groups: std::collections::HashMap<(Uuid, String), Vec<Uuid>>,
}

impl Pass {
    /// Counts a placement in the pass's copy of the node's reservation.
    fn reserve(&mut self, node: Uuid, size: Resources) {
        if let Some(n) = self
            .nodes
            .as_mut()
            .and_then(|ns| ns.iter_mut().find(|n| n.id == node))
        {
            n.reserved.vcpus += size.vcpus;
            n.reserved.memory_mib += size.memory_mib;
            n.reserved.disk_gib += size.disk_gib;
        }
    }
}
