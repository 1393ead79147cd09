//! Placement: VMs that want to run and have no node get one, through the
//! scheduler's pure [`byteport_scheduler::place`] and the store's one
//! transaction that writes the placement with the node's reservation. A VM
//! that fits nowhere stays `pending` with the scheduler's reason, and the
//! background loop tries again.
//!
//! Every placement on a replica decides on one shared copy of the node
//! inventory ([`Inventory`]), not on a read of its own: a create on a
//! fleet of thousands of nodes decides in memory. The copy counts each
//! placement it decided at once, and is read again when it is older than
//! [`INVENTORY_TTL`] (which bounds how late another replica's placements
//! and any release of room are seen), when a node changes through this
//! replica, when a placement lost its race to another placer, and before
//! a VM is said to fit nowhere on a copy older than [`NO_FIT_FRESH`]. The
//! store's guarded commit is what keeps a node within its limit; the copy
//! only makes a lost race rare.

use super::App;
use crate::error::AppResult;
use byteport_scheduler::{Decision, NodeInventory, Policy, Request, Resources};
use byteport_store::{PlaceItem, Size, node, vm};
use byteport_types::api::{Placement, PlacementPolicy};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};
use uuid::Uuid;

/// Attempts per VM when another placement takes the chosen node's room.
const RACE_RETRIES: usize = 3;
/// Placements committed together by a placement pass.
const BATCH: usize = 64;
/// VMs one placement pass takes on.
const PASS: u64 = 2000;
/// How long the shared inventory is decided on before it is read again.
pub const INVENTORY_TTL: Duration = Duration::from_secs(2);
/// A VM that fits nowhere on an inventory older than this is decided
/// again on a fresh read before it is kept waiting.
pub const NO_FIT_FRESH: Duration = Duration::from_millis(500);

/// The node inventory every placement on this replica decides on.
#[derive(Default)]
pub struct Inventory {
    copy: tokio::sync::Mutex<Option<Copy>>,
    /// Reads of the nodes made for it, for /metrics and the benchmarks.
    pub reads: AtomicU64,
}

struct Copy {
    nodes: Vec<NodeInventory<Uuid>>,
    index: HashMap<Uuid, usize>,
    /// Architectures some node runs natively.
    native: std::collections::HashSet<String>,
    read_at: Instant,
}

impl Inventory {
    /// Drops the copy: the next decision reads the nodes again.
    pub async fn invalidate(&self) {
        *self.copy.lock().await = None;
    }

    /// Drops the copy unless node `id` is in it as online and as a
    /// heartbeat describes it (capacity, and the engines and platforms it
    /// said, if it said them): a check that costs nothing when nothing
    /// changed.
    pub(crate) async fn check_node(&self, id: Uuid, said: Said<'_>) {
        let mut copy = self.copy.lock().await;
        let same = copy.as_ref().is_some_and(|c| {
            c.index.get(&id).map(|&i| &c.nodes[i]).is_some_and(|n| {
                n.online
                    && n.capacity == said.capacity
                    && said.engines.is_none_or(|e| n.engines == e)
                    && said.platforms.as_ref().is_none_or(|p| n.platforms == *p)
                    && said
                        .unavailable
                        .as_ref()
                        .is_none_or(|u| n.unavailable == *u)
            })
        });
        if !same {
            *copy = None;
        }
    }
}

/// What a heartbeat says of its node, as the scheduler sees it.
pub(crate) struct Said<'a> {
    pub capacity: Resources,
    pub engines: Option<&'a [String]>,
    pub platforms: Option<Vec<byteport_scheduler::Platform>>,
    pub unavailable: Option<Vec<(String, String)>>,
}

/// A node row as the scheduler sees it.
pub fn inventory(n: &node::Model) -> NodeInventory<Uuid> {
    NodeInventory {
        id: n.id,
        name: n.name.clone(),
        online: n.status == "online" || n.status == "cordoned",
        cordoned: n.status == "cordoned",
        region: n.region.clone(),
        platforms: super::nodes::node_platforms(n)
            .iter()
            .map(platform)
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

/// A platform as the scheduler sees it.
pub(crate) fn platform(p: &byteport_types::api::Platform) -> byteport_scheduler::Platform {
    byteport_scheduler::Platform {
        native: p.execution == byteport_types::api::Execution::Native,
        arch: p.arch.clone(),
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
    pub async fn place_vm(&self, v: &vm::Model) -> AppResult<Option<Uuid>> {
        let mut pass = Pass::default();
        self.place_in(v, &mut pass).await
    }

    /// Why a VM not yet written would fit nowhere now, on the shared
    /// inventory (`None`: it would fit), so that a create writes it with
    /// its reason at once instead of writing the reason after it.
    pub(crate) async fn fits_nowhere(&self, v: &vm::Model) -> AppResult<Option<String>> {
        let mut pass = Pass::default();
        let (req, policy) = self.request_for(v, &mut pass).await?;
        Ok(match self.decide_on_copy(&req, policy, false).await? {
            Decision::NoFit(why) => {
                self.scheduler.no_fit.fetch_add(1, Relaxed);
                Some(why)
            }
            Decision::Place { .. } => None,
        })
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

    /// The scheduler's decision on the shared inventory (read first when
    /// there is none or it is old). A placement is counted in the copy at
    /// once, so the next decision sees it; one that does not commit must
    /// [`Inventory::invalidate`] it.
    async fn decide(&self, req: &Request<Uuid>, policy: Policy) -> AppResult<Decision<Uuid>> {
        self.decide_on_copy(req, policy, true).await
    }

    /// [`App::decide`]; a placement is counted in the copy only if `count`.
    async fn decide_on_copy(
        &self,
        req: &Request<Uuid>,
        policy: Policy,
        count: bool,
    ) -> AppResult<Decision<Uuid>> {
        let mut copy = self.inventory.copy.lock().await;
        let mut fresh = false;
        loop {
            if copy
                .as_ref()
                .is_none_or(|c| c.read_at.elapsed() >= INVENTORY_TTL)
            {
                let read_at = Instant::now();
                let nodes: Vec<NodeInventory<Uuid>> = self
                    .store
                    .node_inventory()
                    .await?
                    .iter()
                    .map(inventory)
                    .collect();
                self.inventory.reads.fetch_add(1, Relaxed);
                let index = nodes.iter().enumerate().map(|(i, n)| (n.id, i)).collect();
                let native = nodes
                    .iter()
                    .flat_map(|n| n.platforms.iter().filter(|p| p.native))
                    .map(|p| p.arch.clone())
                    .collect();
                *copy = Some(Copy {
                    nodes,
                    index,
                    native,
                    read_at,
                });
                fresh = true;
            }
            let Some(c) = copy.as_mut() else {
                unreachable!("the inventory was just read")
            };
            // A large fleet is sampled, each decision with its own draw.
            let d = byteport_scheduler::place_sampled(
                &c.nodes,
                req,
                policy,
                self.settings.overcommit,
                c.native.contains(&req.arch),
                rand::random(),
            );
            match &d {
                Decision::Place { node, .. } if count => {
                    if let Some(n) = c.index.get(node).map(|&i| &mut c.nodes[i]) {
                        n.reserved.vcpus += req.size.vcpus;
                        n.reserved.memory_mib += req.size.memory_mib;
                        n.reserved.disk_gib += req.size.disk_gib;
                    }
                }
                Decision::NoFit(_) if !fresh && c.read_at.elapsed() >= NO_FIT_FRESH => {
                    // Room may have come free since: look again.
                    *copy = None;
                    continue;
                }
                Decision::Place { .. } | Decision::NoFit(_) => {}
            }
            return Ok(d);
        }
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
            match self.decide(&req, policy).await? {
                Decision::Place { node, limit } => {
                    let placed = self
                        .store
                        .vm_place(v.id, node, to_size(req.size), to_size(limit))
                        .await;
                    if matches!(placed, Ok(true)) {
                        self.landed(v, node);
                        return Ok(Some(node));
                    }
                    // The copy counted a placement that did not happen.
                    self.inventory.invalidate().await;
                    placed?;
                    // Another placer took the room, or the VM was placed or
                    // deleted meanwhile: look again.
                    self.scheduler.lost_race.fetch_add(1, Relaxed);
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
    /// VMs are decided on the shared inventory in memory, a batch at a
    /// time, and each batch is committed in one transaction. A VM whose
    /// placement lost a race is placed again on its own, on a fresh
    /// inventory.
    pub async fn place_pending(&self) -> AppResult<usize> {
        let mut placed = 0;
        let mut pass = Pass::default();
        let waiting = self.store.vm_list_unplaced(PASS).await?;
        for chunk in waiting.chunks(BATCH) {
            let mut batch: Vec<(&vm::Model, PlaceItem)> = Vec::with_capacity(chunk.len());
            for v in chunk {
                let (req, policy) = self.request_for(v, &mut pass).await?;
                match self.decide(&req, policy).await? {
                    Decision::Place { node, limit } => {
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
            let landed = match self.store.vm_place_many(&items).await {
                Ok(l) => l,
                Err(e) => {
                    self.inventory.invalidate().await;
                    return Err(e.into());
                }
            };
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
                // The copy counted placements that did not happen.
                self.inventory.invalidate().await;
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

/// What one placement pass keeps beside the shared inventory.
#[derive(Default)]
struct Pass {
    /// Nodes chosen in this pass for each (project, anti-affinity group).
    groups: HashMap<(Uuid, String), Vec<Uuid>>,
}
