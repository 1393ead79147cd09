//! The node registry: join tokens, registration, heartbeats that carry
//! capacity and the observed state of the node's VMs, and the desired VMs
//! that each heartbeat answers with. Nodes always dial in; the control plane
//! never needs to reach a node.

use super::auth::{JOIN_PREFIX, NODE_PREFIX, hash_secret, random_secret};
use super::{Actor, App, Ctx, to_u32, to_u64};
use crate::error::{AppError, AppResult};
use byteport_store::{Observation, Release, join_token, node};
use byteport_types::api::{
    BootMode, Capacity, CloudInit, DesiredVm, Egress, Engine, EngineUnavailable, Execution,
    Heartbeat, HeartbeatResponse, JoinToken, JoinTokenCreate, Node, NodeImage, NodeRegister,
    NodeRegistered, OrphanAdopt, OrphanVm, Platform, Vm, VmReport,
};
use byteport_types::node_proto::{FromNode, ToNode};
use byteport_types::vm_state::{self, DesiredState, ObservedState, VmState};
use byteport_types::{Name, NodeId, ProjectId, VmId};
use chrono::{Duration as ChronoDuration, Utc};
use std::collections::HashMap;
use uuid::Uuid;

/// What node `n` said in its latest heartbeat (figures, networks, orphans).
fn latest(n: &node::Model) -> Option<NodeVmStats> {
    serde_json::from_str(n.vm_stats.as_deref()?).ok()
}

/// The orphan `vm` (an id) of node `n`, as of its latest heartbeat.
fn orphan_of(n: &node::Model, vm: &str) -> AppResult<OrphanVm> {
    latest(n)
        .into_iter()
        .flat_map(|s| s.orphans)
        .find(|o| o.id.to_string() == vm)
        .ok_or_else(|| AppError::not_found("orphan", vm))
}

/// A join token's lifetime, in minutes (a week).
pub(crate) const MAX_JOIN_TOKEN_MINUTES: u32 = 10_080;

fn check_capacity(c: &Capacity) -> AppResult<()> {
    if c.vcpus > 65_536 || c.memory_mib > 1 << 40 || c.disk_gib > 1 << 40 {
        return Err(AppError::bad(
            "invalid_capacity",
            "the capacity is out of range",
        ));
    }
    Ok(())
}

/// The architectures node `n` runs guests of. A node that never said
/// (it registered before platforms were reported) runs its own: natively
/// with KVM, else emulated.
pub(crate) fn node_platforms(n: &node::Model) -> Vec<Platform> {
    let said: Vec<Platform> = serde_json::from_str(&n.platforms).unwrap_or_default();
    if !said.is_empty() {
        return said;
    }
    vec![Platform {
        arch: n.arch.clone(),
        execution: if n.kvm {
            Execution::Native
        } else {
            Execution::Emulated
        },
    }]
}

/// The engines node `n` has: what it said, or `qemu` for a node that
/// never said (every node has that one).
pub(crate) fn node_engines(n: &node::Model) -> Vec<String> {
    let said: Vec<String> = serde_json::from_str(&n.engines).unwrap_or_default();
    if said.is_empty() {
        vec![Engine::Qemu.as_str().to_owned()]
    } else {
        said
    }
}

/// A node's engines as stored: known words, at most eight.
fn engines_json(engines: &[String]) -> AppResult<String> {
    if engines.len() > 8 {
        return Err(AppError::bad("invalid_engines", "at most 8 engines"));
    }
    for e in engines {
        super::catalog::check_word("engines[]", e)?;
    }
    serde_json::to_string(engines).map_err(AppError::internal)
}

/// The engines node `n` lacks, with why, as it last said.
pub(crate) fn node_unavailable_engines(n: &node::Model) -> Vec<EngineUnavailable> {
    serde_json::from_str(&n.unavailable_engines).unwrap_or_default()
}

/// At most this long, each reason a node gives for lacking an engine.
const MAX_REASON: usize = 300;

/// A node's unavailable engines as stored: known words, a short reason.
fn unavailable_json(u: &[EngineUnavailable]) -> AppResult<String> {
    if u.len() > 8 {
        return Err(AppError::bad(
            "invalid_engines",
            "at most 8 unavailable engines",
        ));
    }
    for e in u {
        super::catalog::check_word("unavailable_engines[].engine", &e.engine)?;
        if e.reason.len() > MAX_REASON || e.reason.chars().any(char::is_control) {
            return Err(AppError::bad(
                "invalid_engines",
                format!(
                    "the reason for {} must be at most {MAX_REASON} bytes of text",
                    e.engine
                ),
            ));
        }
    }
    serde_json::to_string(u).map_err(AppError::internal)
}

/// At most this many architectures per node.
const MAX_PLATFORMS: usize = 16;

/// A node's platforms as stored: checked, each architecture once.
fn platforms_json(platforms: &[Platform]) -> AppResult<String> {
    if platforms.len() > MAX_PLATFORMS {
        return Err(AppError::bad(
            "invalid_platforms",
            format!("at most {MAX_PLATFORMS} platforms"),
        ));
    }
    for (i, p) in platforms.iter().enumerate() {
        super::catalog::check_word("platforms[].arch", &p.arch)?;
        if platforms[..i].iter().any(|q| q.arch == p.arch) {
            return Err(AppError::bad(
                "invalid_platforms",
                format!("the architecture {} is listed twice", p.arch),
            ));
        }
    }
    serde_json::to_string(platforms).map_err(AppError::internal)
}

pub(crate) fn node_view(n: &node::Model) -> AppResult<Node> {
    let stats = latest(n);
    Ok(Node {
        id: NodeId(n.id),
        name: Name::parse(&n.name).map_err(AppError::internal)?,
        region: n.region.clone(),
        arch: n.arch.clone(),
        platforms: node_platforms(n),
        engines: node_engines(n),
        unavailable_engines: node_unavailable_engines(n),
        kvm: n.kvm,
        status: n.status.clone(),
        capacity: Capacity {
            vcpus: to_u32(n.cap_vcpus),
            memory_mib: to_u64(n.cap_memory_mib),
            disk_gib: to_u64(n.cap_disk_gib),
        },
        usage: Capacity {
            vcpus: to_u32(n.used_vcpus),
            memory_mib: to_u64(n.used_memory_mib),
            disk_gib: to_u64(n.used_disk_gib),
        },
        reserved: Capacity {
            vcpus: to_u32(n.reserved_vcpus),
            memory_mib: to_u64(n.reserved_memory_mib),
            disk_gib: to_u64(n.reserved_disk_gib),
        },
        last_heartbeat_at: n.last_heartbeat_at,
        created_at: n.created_at,
        networks: stats
            .as_ref()
            .map(|s| s.networks.clone())
            .unwrap_or_default(),
        orphans: stats.map(|s| s.orphans).unwrap_or_default(),
    })
}

impl App {
    pub async fn join_token_create(&self, ctx: &Ctx, req: JoinTokenCreate) -> AppResult<JoinToken> {
        ctx.admin()?;
        let minutes = req.expires_in_minutes.unwrap_or(60);
        if !(1..=MAX_JOIN_TOKEN_MINUTES).contains(&minutes) {
            return Err(AppError::bad(
                "invalid_expiry",
                format!(
                    "expires_in_minutes is {minutes}; it must be between 1 and {MAX_JOIN_TOKEN_MINUTES}"
                ),
            ));
        }
        let token = random_secret(JOIN_PREFIX);
        let now = Utc::now();
        let expires_at = now + ChronoDuration::minutes(i64::from(minutes));
        self.store
            .join_token_insert(join_token::Model {
                token_hash: hash_secret(&token),
                expires_at,
                used: false,
                created_at: now,
            })
            .await?;
        Ok(JoinToken { token, expires_at })
    }

    /// A join token for a node agent in this same process (all-in-one), no
    /// admin needed: the caller is the host's own daemon.
    pub async fn join_token_issue_local(&self) -> AppResult<String> {
        let token = random_secret(JOIN_PREFIX);
        let now = Utc::now();
        self.store
            .join_token_insert(join_token::Model {
                token_hash: hash_secret(&token),
                expires_at: now + ChronoDuration::minutes(10),
                used: false,
                created_at: now,
            })
            .await?;
        Ok(token)
    }

    /// Registers a node with a single-use join token; returns the node's own
    /// credential for heartbeats.
    pub async fn node_register(&self, ctx: &Ctx, req: NodeRegister) -> AppResult<NodeRegistered> {
        check_capacity(&req.capacity)?;
        super::catalog::check_word("arch", &req.arch)?;
        let platforms = platforms_json(&req.platforms)?;
        let credential = random_secret(NODE_PREFIX);
        let now = Utc::now();
        let n = self
            .store
            .node_register(
                &hash_secret(&req.join_token),
                node::Model {
                    id: Uuid::now_v7(),
                    name: req.name.to_string(),
                    region: req.region,
                    arch: req.arch,
                    engines: engines_json(&req.engines)?,
                    unavailable_engines: unavailable_json(&req.unavailable_engines)?,
                    kvm: req.kvm,
                    status: "online".into(),
                    credential_hash: hash_secret(&credential),
                    cap_vcpus: i64::from(req.capacity.vcpus),
                    cap_memory_mib: req.capacity.memory_mib as i64,
                    cap_disk_gib: req.capacity.disk_gib as i64,
                    used_vcpus: 0,
                    used_memory_mib: 0,
                    used_disk_gib: 0,
                    reserved_vcpus: 0,
                    reserved_memory_mib: 0,
                    reserved_disk_gib: 0,
                    vm_stats: None,
                    platforms,
                    last_heartbeat_at: Some(now),
                    created_at: now,
                },
            )
            .await
            .map_err(|e| match e {
                byteport_store::StoreError::NotFound => AppError::Unauthorized(
                    "the join token is invalid, expired or already used".into(),
                ),
                e => e.into(),
            })?;
        ctx.target("node", n.id, None);
        self.inventory.invalidate().await;
        Ok(NodeRegistered {
            node: node_view(&n)?,
            credential,
        })
    }

    /// Recounts every node's reservations from its VMs and repairs drift
    /// (logged, counted in /metrics as
    /// `byteport_reservation_repairs_total`); returns how many nodes.
    pub async fn reservations_recount(&self) -> AppResult<usize> {
        let repaired = self.store.node_recount_reservations().await?;
        if !repaired.is_empty() {
            self.inventory.invalidate().await;
        }
        for (node, was, is) in &repaired {
            tracing::warn!(
                node = %node,
                was = ?was,
                is = ?is,
                "a node's reservations drifted from its VMs: repaired"
            );
        }
        self.reservation_repairs
            .fetch_add(repaired.len() as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(repaired.len())
    }

    /// Takes a node's heartbeat: capacity, usage and what it observed of its
    /// VMs; answers with the VMs it should hold.
    pub async fn node_heartbeat(
        &self,
        ctx: &Ctx,
        id: &str,
        mut hb: Heartbeat,
    ) -> AppResult<HeartbeatResponse> {
        let node_id = match &ctx.actor {
            Actor::Node { id: nid, .. } if nid.to_string() == id => *nid,
            Actor::Node { .. } => return Err(AppError::not_found("node", id)),
            _ => {
                return Err(AppError::Unauthorized(
                    "heartbeats need the node's credential".into(),
                ));
            }
        };
        check_capacity(&hb.capacity)?;
        check_capacity(&hb.usage)?;
        if hb.vm_stats.len() > MAX_VM_STATS {
            return Err(AppError::bad(
                "invalid_heartbeat",
                format!("at most {MAX_VM_STATS} vm_stats in one heartbeat"),
            ));
        }
        if hb.orphans.len() > MAX_VM_STATS {
            return Err(AppError::bad(
                "invalid_heartbeat",
                format!("at most {MAX_VM_STATS} orphans in one heartbeat"),
            ));
        }
        if hb.networks.len() > MAX_VM_STATS {
            return Err(AppError::bad(
                "invalid_heartbeat",
                format!("at most {MAX_VM_STATS} networks in one heartbeat"),
            ));
        }
        let platforms = if hb.platforms.is_empty() {
            None
        } else {
            Some(platforms_json(&hb.platforms)?)
        };
        let engines = if hb.engines.is_empty() {
            None
        } else {
            Some(engines_json(&hb.engines)?)
        };
        let stats = NodeVmStats {
            at: chrono::Utc::now(),
            vms: std::mem::take(&mut hb.vm_stats),
            networks: std::mem::take(&mut hb.networks),
            orphans: std::mem::take(&mut hb.orphans),
        };
        let unavailable_engines = match &hb.unavailable_engines {
            Some(u) => Some(unavailable_json(u)?),
            None => None,
        };
        self.store
            .node_heartbeat(
                node_id.0,
                byteport_store::NodeBeat {
                    cap: [
                        i64::from(hb.capacity.vcpus),
                        hb.capacity.memory_mib as i64,
                        hb.capacity.disk_gib as i64,
                    ],
                    used: [
                        i64::from(hb.usage.vcpus),
                        hb.usage.memory_mib as i64,
                        hb.usage.disk_gib as i64,
                    ],
                    vm_stats: Some(serde_json::to_string(&stats).map_err(AppError::internal)?),
                    platforms,
                    engines,
                    unavailable_engines,
                },
            )
            .await?;
        // A node back online, or with new capacity, changes the room.
        let said = super::placement::Said {
            capacity: byteport_scheduler::Resources {
                vcpus: i64::from(hb.capacity.vcpus),
                memory_mib: hb.capacity.memory_mib as i64,
                disk_gib: hb.capacity.disk_gib as i64,
            },
            engines: (!hb.engines.is_empty()).then_some(hb.engines.as_slice()),
            platforms: (!hb.platforms.is_empty()).then(|| {
                hb.platforms
                    .iter()
                    .map(super::placement::platform)
                    .collect()
            }),
            unavailable: hb.unavailable_engines.as_ref().map(|u| {
                u.iter()
                    .map(|u| (u.engine.clone(), u.reason.clone()))
                    .collect()
            }),
        };
        self.inventory.check_node(node_id.0, said).await;
        // A steady node: its VMs' versions say the same as when its last
        // answer was made, and no report is news. One narrow read then
        // serves the whole heartbeat.
        let versions = self.store.vm_versions_for_node(node_id.0).await?;
        if let Some(vms) = self.answers.steady(node_id.0, &versions, &hb.vms) {
            return Ok(HeartbeatResponse { vms });
        }
        // One read of what the node holds serves every report and, when
        // no report changed anything, the answer too: a heartbeat costs a
        // bounded number of statements whatever its VMs.
        let held = self.store.vm_list_for_node(node_id.0).await?;
        let mut changed = false;
        let by_id: HashMap<Uuid, &byteport_store::vm::Model> =
            held.iter().map(|v| (v.id, v)).collect();
        for r in hb.vms {
            // A VM placed elsewhere, or gone, is not this node's to report.
            let Some(&v) = by_id.get(&r.id.0) else {
                continue;
            };
            let seen = Seen::of(v);
            if !seen.news(&r) {
                // Nothing newer than what is stored: the write below would
                // change no row, so it is not sent.
                continue;
            }
            let mut current: VmState = v.state.parse().map_err(AppError::internal)?;
            // The guest powered itself off (see below).
            let powered_off = seen.powered_off(&r);
            changed = true;
            if current == VmState::Unknown {
                // The node is back: its report counts even if not newer.
                let desired: DesiredState = v.desired_state.parse().map_err(AppError::internal)?;
                let back = vm_state::derive(VmState::Provisioning, desired, r.state, true);
                self.store
                    .vm_set_state(v.id, &back.to_string(), r.reason.clone())
                    .await?;
                let _ = self.vm_changes.send(v.id);
                current = back;
            }
            let mut desired: DesiredState = v.desired_state.parse().map_err(AppError::internal)?;
            let mut caught_up = r.desired_generation as i64 >= v.desired_generation;
            if powered_off {
                // The guest powered itself off: from now on the VM is meant
                // to be stopped, as after a stop action.
                let d = DesiredState::Stopped.to_string();
                if self
                    .store
                    .vm_update_desired(v.id, v.desired_generation, &d, &d, false)
                    .await
                    .is_ok()
                {
                    desired = DesiredState::Stopped;
                    current = VmState::Stopped;
                    caught_up = false;
                }
            }
            let state = vm_state::derive(current, desired, r.state, caught_up);
            let reason = match r.state {
                ObservedState::Error => r
                    .reason
                    .or_else(|| Some("the node reported a failure".into())),
                _ => r.reason,
            };
            let ports = serde_json::to_string(&r.ports).map_err(AppError::internal)?;
            let applied = self
                .store
                .vm_update_observed(
                    v.id,
                    node_id.0,
                    &Observation {
                        observed: &r.state.to_string(),
                        generation: r.generation as i64,
                        state: &state.to_string(),
                        reason,
                        ports: &ports,
                        deleted: state == VmState::Deleted,
                        agent_version: r.agent_version.as_deref(),
                        execution: r.execution.map(Execution::as_str),
                        cloud_init: r.cloud_init.map(CloudInit::as_str),
                        network: r
                            .network
                            .as_ref()
                            .map(serde_json::to_string)
                            .transpose()
                            .map_err(AppError::internal)?,
                        release: match (state, r.state) {
                            (VmState::Deleted, _) => Release::All,
                            // Stopped, or crashed with its QEMU gone: its
                            // vCPUs and memory are free for others; the disk
                            // stays reserved where it lives, and a start
                            // takes them again or is refused with the numbers.
                            (VmState::Stopped, _) | (_, ObservedState::Error) => Release::Compute,
                            // Back from an error on its own: it holds its
                            // vCPUs and memory again.
                            (_, ObservedState::Running) if v.reserved && !v.compute_held => {
                                Release::Retake
                            }
                            _ => Release::Nothing,
                        },
                    },
                )
                .await?;
            if applied {
                if current == VmState::Provisioning && state == VmState::Running {
                    let took = Utc::now() - v.created_at;
                    self.boot_times
                        .observe(took.num_milliseconds().max(0) as f64 / 1000.0);
                }
                let _ = self.vm_changes.send(v.id);
            }
        }
        let rows = if changed {
            // A report may have given room back.
            self.inventory.invalidate().await;
            self.store.vm_list_for_node(node_id.0).await?
        } else {
            held
        };
        // The answer is made from the VMs' rows, their images and their
        // projects' networks: while the rows say the same, the answer of
        // a moment ago is the answer (kept up to ANSWER_TTL, which bounds
        // how late an image's or network's change reaches the node).
        let key = answer_key(&rows);
        let versions: Vec<_> = rows.iter().map(|v| (v.id, v.updated_at)).collect();
        let seen = rows.iter().map(|v| (v.id, Seen::of(v))).collect();
        if let Some(vms) = self.answers.get(node_id.0, key) {
            self.answers
                .put(node_id.0, key, versions, seen, vms.clone(), false);
            return Ok(HeartbeatResponse { vms });
        }
        let vms = self.desired_vms(rows).await?;
        self.answers
            .put(node_id.0, key, versions, seen, vms.clone(), true);
        Ok(HeartbeatResponse { vms })
    }

    /// What a node is told to hold: its VMs with their images and project
    /// networks, read in one query each.
    async fn desired_vms(&self, rows: Vec<byteport_store::vm::Model>) -> AppResult<Vec<DesiredVm>> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let mut image_ids: Vec<Uuid> = rows.iter().map(|v| v.image_id).collect();
        image_ids.sort_unstable();
        image_ids.dedup();
        let mut images: HashMap<Uuid, NodeImage> = HashMap::new();
        for i in self.store.images_by_ids(&image_ids).await? {
            images.insert(i.id, node_image(i)?);
        }
        let mut project_ids: Vec<Uuid> = rows.iter().map(|v| v.project_id).collect();
        project_ids.sort_unstable();
        project_ids.dedup();
        let networks: HashMap<Uuid, Option<String>> = self
            .store
            .project_list(Some(&project_ids))
            .await?
            .into_iter()
            .map(|p| {
                let cidr = p
                    .network_index
                    .and_then(|i| u32::try_from(i).ok())
                    .and_then(byteport_types::net::Subnet::of_index)
                    .map(|n| n.cidr());
                (p.id, cidr)
            })
            .collect();
        let mut vms = Vec::new();
        for v in rows {
            let image = images
                .get(&v.image_id)
                .cloned()
                .ok_or_else(|| AppError::internal(format!("VM {} has no image", v.id)))?;
            vms.push(DesiredVm {
                id: VmId(v.id),
                name: Name::parse(&v.name).map_err(AppError::internal)?,
                desired_state: v.desired_state.parse().map_err(AppError::internal)?,
                desired_generation: to_u64(v.desired_generation),
                restart: v.state == "rebooting",
                vcpus: to_u32(v.vcpus),
                memory_mib: to_u64(v.memory_mib),
                disk_gib: to_u64(v.disk_gib),
                hostname: v.hostname.clone(),
                image,
                metadata_token: v
                    .metadata_token_hash
                    .as_ref()
                    .map(|_| self.metadata_token(v.id)),
                project_id: Some(ProjectId(v.project_id)),
                network_cidr: networks.get(&v.project_id).cloned().flatten(),
                guest_ports: serde_json::from_str(&v.guest_ports).unwrap_or_default(),
                egress: Egress::parse(&v.egress).unwrap_or_default(),
                engine: Engine::parse(&v.engine).unwrap_or_default(),
            });
        }
        Ok(vms)
    }

    /// Marks nodes silent for longer than `after` as offline (their VMs
    /// become `unknown`); returns how many.
    pub async fn nodes_mark_stale(&self, after: std::time::Duration) -> AppResult<usize> {
        let before = Utc::now() - ChronoDuration::from_std(after).map_err(AppError::internal)?;
        let gone = self.store.node_mark_stale(before).await?;
        for n in &gone {
            tracing::warn!(node = %n, "node missed its heartbeats; it is offline");
        }
        if !gone.is_empty() {
            self.inventory.invalidate().await;
            let _ = self.vm_changes.send(Uuid::nil());
        }
        Ok(gone.len())
    }

    /// Checks that the caller is node `id` itself, for its channel.
    pub fn node_channel_auth(&self, ctx: &Ctx, id: &str) -> AppResult<Uuid> {
        match &ctx.actor {
            Actor::Node { id: nid, .. } if nid.to_string() == id => Ok(nid.0),
            Actor::Node { .. } => Err(AppError::not_found("node", id)),
            _ => Err(AppError::Unauthorized(
                "the node channel needs the node's credential".into(),
            )),
        }
    }

    pub async fn node_list(&self, ctx: &Ctx) -> AppResult<Vec<Node>> {
        ctx.admin()?;
        self.store
            .node_list()
            .await?
            .iter()
            .map(node_view)
            .collect()
    }

    pub async fn node_show(&self, ctx: &Ctx, id: &str) -> AppResult<Node> {
        node_view(&self.node_resolve(ctx, id).await?)
    }
}

impl App {
    async fn node_resolve(&self, ctx: &Ctx, key: &str) -> AppResult<node::Model> {
        ctx.admin()?;
        let nf = || AppError::not_found("node", key);
        if let Ok(id) = key.parse::<NodeId>() {
            return self.store.node_fetch(id.0).await.map_err(|_| nf());
        }
        self.store
            .node_list()
            .await?
            .into_iter()
            .find(|n| n.name == key)
            .ok_or_else(nf)
    }

    /// Cordons (no new placements) or uncordons a node (admins).
    pub async fn node_cordon(&self, ctx: &Ctx, key: &str, cordoned: bool) -> AppResult<Node> {
        let n = self.node_resolve(ctx, key).await?;
        ctx.target("node", n.id, None);
        let n = self.store.node_set_cordon(n.id, cordoned).await?;
        self.inventory.invalidate().await;
        node_view(&n)
    }

    /// Removes an orphan (admins): its node deletes it with its disk.
    pub async fn node_orphan_remove(&self, ctx: &Ctx, key: &str, vm: &str) -> AppResult<()> {
        let n = self.node_resolve(ctx, key).await?;
        let o = orphan_of(&n, vm)?;
        ctx.target("vm", o.id.0, o.project_id);
        let id = o.id;
        let mut s = self
            .hub
            .open(n.id, |stream| ToNode::RemoveOrphan { stream, vm: id })
            .await
            .ok_or_else(|| {
                AppError::Unavailable(format!(
                    "node {} is not connected to this control plane",
                    n.name
                ))
            })?;
        let answer = tokio::time::timeout(std::time::Duration::from_secs(10), s.rx.recv())
            .await
            .map_err(|_| AppError::Unavailable("the node did not answer in time".into()))?;
        match answer {
            Some(FromNode::End { .. }) => Ok(()),
            Some(FromNode::Error { .. }) => Err(AppError::not_found("orphan", id)),
            _ => Err(AppError::Unavailable("the node's channel closed".into())),
        }
    }

    /// Adopts an orphan (admins): it becomes a stopped VM again, in its
    /// project (or the one asked for), held on its node, counted in the
    /// project's quota; start it as any VM.
    pub async fn node_orphan_adopt(
        &self,
        ctx: &Ctx,
        key: &str,
        vm: &str,
        req: OrphanAdopt,
    ) -> AppResult<Vm> {
        let n = self.node_resolve(ctx, key).await?;
        let o = orphan_of(&n, vm)?;
        let project = match (&req.project, o.project_id) {
            (Some(p), _) => self.project_resolve(ctx, p, super::Role::Owner).await?,
            (None, Some(p)) => self.store.project_fetch(p.0).await.map_err(|_| {
                AppError::bad(
                    "unknown_project",
                    "the orphan's project no longer exists: name one with project",
                )
            })?,
            (None, None) => {
                return Err(AppError::bad(
                    "unknown_project",
                    "the node does not know the orphan's project: name one with project",
                ));
            }
        };
        let image = self
            .store
            .image_fetch_by_name(o.image.as_str())
            .await?
            .ok_or_else(|| {
                AppError::bad(
                    "unknown_image",
                    format!(
                        "the orphan's image {} is not in the catalogue: import it first",
                        o.image
                    ),
                )
            })?;
        if self.store.vm_fetch(o.id.0).await.is_ok() {
            return Err(AppError::Conflict(format!("VM {} exists already", o.id)));
        }
        let name = req.name.unwrap_or(o.name.clone());
        let size = (o.vcpus, o.memory_mib, o.disk_gib);
        let model = byteport_store::vm::Model {
            state: VmState::Stopped.to_string(),
            state_reason: Some(format!("adopted from node {}", n.name)),
            desired_state: DesiredState::Stopped.to_string(),
            node_id: Some(n.id),
            // Its disk is held on the node from now on (the recount below
            // writes it into the node's figures); its compute when started.
            reserved: true,
            ..self.vm_row(
                o.id.0,
                project.id,
                name.as_str(),
                &image,
                size,
                o.hostname.clone(),
            )
        };
        ctx.target("vm", o.id.0, Some(ProjectId(project.id)));
        let v = self.store.vm_insert(model, &[]).await?;
        self.store.node_recount_reservations().await?;
        self.inventory.invalidate().await;
        let _ = self.vm_changes.send(v.id);
        self.hub.poke(n.id);
        self.vm_view(&v).await
    }

    /// Drains a node (admins): cordons it and stops every VM on it, which
    /// keep their disks there. Local disks do not move; stopped VMs can be
    /// started again once the node is uncordoned, or deleted.
    pub async fn node_drain(&self, ctx: &Ctx, key: &str) -> AppResult<Node> {
        let n = self.node_resolve(ctx, key).await?;
        ctx.target("node", n.id, None);
        let n = self.store.node_set_cordon(n.id, true).await?;
        self.inventory.invalidate().await;
        for v in self.store.vm_list_for_node(n.id).await? {
            let state: VmState = v.state.parse().map_err(AppError::internal)?;
            let desired: DesiredState = v.desired_state.parse().map_err(AppError::internal)?;
            if desired == DesiredState::Stopped || desired == DesiredState::Deleted {
                continue;
            }
            if let Ok(plan) = vm_state::plan(state, desired, true, byteport_types::VmAction::Stop) {
                self.store
                    .vm_update_desired(
                        v.id,
                        v.desired_generation,
                        &plan.desired.to_string(),
                        &plan.state.to_string(),
                        false,
                    )
                    .await?;
                let _ = self.vm_changes.send(v.id);
            }
        }
        self.hub.poke(n.id);
        node_view(&n)
    }

    /// Removes a node that holds no VM (admins); its credential stops working.
    pub async fn node_remove(&self, ctx: &Ctx, key: &str) -> AppResult<()> {
        let n = self.node_resolve(ctx, key).await?;
        ctx.target("node", n.id, None);
        self.store.node_remove(n.id).await?;
        self.inventory.invalidate().await;
        // Its credential stops working here at once.
        self.token_cache.remove(&n.credential_hash);
        Ok(())
    }
}

/// How a node is told to boot an image.
pub(crate) fn node_image(i: byteport_store::image::Model) -> AppResult<NodeImage> {
    Ok(NodeImage {
        name: Name::parse(&i.name).map_err(AppError::internal)?,
        format: i.format,
        boot: match i.boot.as_str() {
            "kernel" => BootMode::Kernel,
            _ => BootMode::Disk,
        },
        sha256: i.sha256,
        kernel_sha256: i.kernel_sha256,
        initrd_sha256: i.initrd_sha256,
        cmdline: i.cmdline,
        has_agent: i.has_agent,
        arch: i.arch,
        login_user: i.login_user,
    })
}

/// At most this many VM figures in one heartbeat.
const MAX_VM_STATS: usize = 10_000;

/// What a node's row keeps of its latest figures.
#[derive(serde::Serialize, serde::Deserialize)]
struct NodeVmStats {
    at: chrono::DateTime<chrono::Utc>,
    vms: Vec<byteport_types::api::VmStats>,
    /// The node's networks as of that heartbeat.
    #[serde(default)]
    networks: Vec<byteport_types::api::NodeNetwork>,
    /// The VMs it holds that this control plane does not list.
    #[serde(default)]
    orphans: Vec<OrphanVm>,
}

impl App {
    /// The fleet's series for /metrics: each node's heartbeat age and
    /// status, and each VM's CPU and memory as its node measured them.
    pub async fn render_fleet_metrics(&self, out: &mut String) -> AppResult<()> {
        use crate::metrics::label;
        use std::fmt::Write;
        let nodes = self.store.node_list().await?;
        let now = Utc::now();
        out.push_str(
            "# HELP byteport_node_heartbeat_age_seconds Seconds since each node's last heartbeat.\n\
             # TYPE byteport_node_heartbeat_age_seconds gauge\n",
        );
        for n in &nodes {
            if let Some(at) = n.last_heartbeat_at {
                let age = (now - at).num_milliseconds().max(0) as f64 / 1000.0;
                let _ = writeln!(
                    out,
                    "byteport_node_heartbeat_age_seconds{{node=\"{}\"}} {age}",
                    label(&n.name)
                );
            }
        }
        out.push_str(
            "# HELP byteport_node_status Each node's status (1 for the one it has).\n\
             # TYPE byteport_node_status gauge\n",
        );
        for n in &nodes {
            let _ = writeln!(
                out,
                "byteport_node_status{{node=\"{}\",status=\"{}\"}} 1",
                label(&n.name),
                label(&n.status)
            );
        }
        let mut cpu = String::from(
            "# HELP byteport_vm_cpu_seconds_total CPU time of each VM's hypervisor process.\n\
             # TYPE byteport_vm_cpu_seconds_total counter\n",
        );
        let mut mem = String::from(
            "# HELP byteport_vm_memory_rss_bytes Resident memory of each VM's hypervisor process.\n\
             # TYPE byteport_vm_memory_rss_bytes gauge\n",
        );
        for n in &nodes {
            for v in latest(n).map(|s| s.vms).unwrap_or_default() {
                let labels = format!("vm=\"{}\",node=\"{}\"", v.id, label(&n.name));
                let _ = writeln!(
                    cpu,
                    "byteport_vm_cpu_seconds_total{{{labels}}} {}",
                    v.cpu_time_ms as f64 / 1000.0
                );
                let _ = writeln!(
                    mem,
                    "byteport_vm_memory_rss_bytes{{{labels}}} {}",
                    v.memory_rss_mib << 20
                );
            }
        }
        out.push_str(&cpu);
        out.push_str(&mem);
        let d = &self.scheduler;
        let _ = write!(
            out,
            "# HELP byteport_scheduler_decisions_total Placement decisions: placed, no node with room (no_fit), or beaten to the room (lost_race).\n\
             # TYPE byteport_scheduler_decisions_total counter\n\
             byteport_scheduler_decisions_total{{result=\"placed\"}} {}\n\
             byteport_scheduler_decisions_total{{result=\"no_fit\"}} {}\n\
             byteport_scheduler_decisions_total{{result=\"lost_race\"}} {}\n",
            d.placed.load(std::sync::atomic::Ordering::Relaxed),
            d.no_fit.load(std::sync::atomic::Ordering::Relaxed),
            d.lost_race.load(std::sync::atomic::Ordering::Relaxed),
        );
        self.boot_times.render(
            "byteport_vm_boot_seconds",
            "Seconds from a VM's creation to its first report as running.",
            out,
        );
        Ok(())
    }

    /// A VM's latest figures from its node, or why there are none (not
    /// placed, not running, or not measured yet).
    pub async fn vm_stats(
        &self,
        ctx: &Ctx,
        id: &str,
    ) -> AppResult<byteport_types::api::VmStatsView> {
        let v = self
            .vm_resolve(ctx, id, byteport_types::api::Role::Viewer)
            .await?;
        let measured = match v.node_id {
            Some(n) => {
                let n = self.store.node_fetch(n).await?;
                latest(&n).and_then(|all| {
                    let at = all.at;
                    all.vms.into_iter().find(|s| s.id.0 == v.id).map(|s| {
                        byteport_types::api::VmMeasured {
                            at,
                            cpu_percent: s.cpu_percent,
                            cpu_time_ms: s.cpu_time_ms,
                            memory_rss_mib: s.memory_rss_mib,
                            disk_used_mib: s.disk_used_mib,
                            uptime_secs: s.uptime_secs,
                            cgroup_memory_mib: s.cgroup_memory_mib,
                            cgroup_memory_limit_mib: s.cgroup_memory_limit_mib,
                        }
                    })
                })
            }
            None => None,
        };
        let note = measured.is_none().then(|| {
            format!(
                "the VM is {}: its node has no figures for it (they are measured while it runs)",
                v.state
            )
        });
        Ok(byteport_types::api::VmStatsView {
            vm_id: VmId(v.id),
            vcpus: to_u32(v.vcpus),
            memory_mib: to_u64(v.memory_mib),
            disk_gib: to_u64(v.disk_gib),
            measured,
            note,
        })
    }
}

/// How long a node's answer is reused while its VMs' rows are unchanged.
const ANSWER_TTL: std::time::Duration = std::time::Duration::from_secs(10);

/// The last answer to each node's heartbeat on this replica, with the
/// fingerprint of the rows it was made from, their versions, and what a
/// report is compared with.
#[derive(Default)]
pub(crate) struct Answers {
    map: std::sync::Mutex<HashMap<Uuid, Answer>>,
}

struct Answer {
    /// The rows' fingerprint ([`answer_key`]).
    key: u64,
    /// When the answer was made from the images and networks.
    made: std::time::Instant,
    vms: Vec<DesiredVm>,
    /// The rows' (id, updated_at), in id order.
    versions: Vec<(Uuid, chrono::DateTime<Utc>)>,
    seen: HashMap<Uuid, Seen>,
}

/// What a VM's report is compared with, from its row.
#[derive(Clone, Copy, Debug)]
struct Seen {
    unknown: bool,
    desired_running: bool,
    desired_generation: i64,
    observed_generation: i64,
}

impl Seen {
    fn of(v: &byteport_store::vm::Model) -> Seen {
        Seen {
            unknown: v.state == VmState::Unknown.to_string(),
            desired_running: v.desired_state == DesiredState::Running.to_string(),
            desired_generation: v.desired_generation,
            observed_generation: v.observed_generation,
        }
    }

    /// The guest powered itself off: stopped, with a reason, while meant
    /// to run, after the node saw the latest desired state.
    fn powered_off(&self, r: &VmReport) -> bool {
        r.state == ObservedState::Stopped
            && self.desired_running
            && r.desired_generation as i64 >= self.desired_generation
            && r.reason.is_some()
    }

    /// Whether the report says anything the row does not.
    fn news(&self, r: &VmReport) -> bool {
        self.unknown || self.powered_off(r) || r.generation as i64 > self.observed_generation
    }
}

impl Answers {
    fn get(&self, node: Uuid, key: u64) -> Option<Vec<DesiredVm>> {
        let map = self.map.lock().ok()?;
        let a = map.get(&node)?;
        (a.key == key && a.made.elapsed() < ANSWER_TTL).then(|| a.vms.clone())
    }

    /// The answer, when the node's VMs are at `versions` as when it was
    /// made, it is fresh, and no report is news.
    fn steady(
        &self,
        node: Uuid,
        versions: &[(Uuid, chrono::DateTime<Utc>)],
        reports: &[VmReport],
    ) -> Option<Vec<DesiredVm>> {
        let map = self.map.lock().ok()?;
        let a = map.get(&node)?;
        let quiet = a.versions == versions
            && a.made.elapsed() < ANSWER_TTL
            && reports
                .iter()
                .all(|r| a.seen.get(&r.id.0).is_none_or(|s| !s.news(r)));
        quiet.then(|| a.vms.clone())
    }

    /// Keeps an answer; `made` when it was made now (not reused).
    fn put(
        &self,
        node: Uuid,
        key: u64,
        versions: Vec<(Uuid, chrono::DateTime<Utc>)>,
        seen: HashMap<Uuid, Seen>,
        vms: Vec<DesiredVm>,
        made: bool,
    ) {
        if let Ok(mut map) = self.map.lock() {
            if map.len() > 100_000 {
                map.clear();
            }
            let made = match map.get(&node) {
                Some(a) if !made => a.made,
                _ => std::time::Instant::now(),
            };
            map.insert(
                node,
                Answer {
                    key,
                    made,
                    vms,
                    versions,
                    seen,
                },
            );
        }
    }
}

/// A fingerprint of every column of the rows that [`App::desired_vms`]
/// reads (its images and networks aside).
fn answer_key(rows: &[byteport_store::vm::Model]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for v in rows {
        (
            v.id,
            &v.name,
            &v.desired_state,
            v.desired_generation,
            v.state == "rebooting",
            (v.vcpus, v.memory_mib, v.disk_gib),
            &v.hostname,
        )
            .hash(&mut h);
        (
            v.image_id,
            v.metadata_token_hash.is_some(),
            v.project_id,
            &v.guest_ports,
            &v.egress,
            &v.engine,
        )
            .hash(&mut h);
    }
    h.finish()
}
