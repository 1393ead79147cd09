//! VMs: create within quota, list, show, lifecycle actions through the
//! state machine, and waiting for a state.

use super::catalog::check_size;
use super::projects::DEFAULT_PROJECT;
use super::vm_views::VmJson;
use super::{App, Ctx, to_u32, to_u64};
use crate::error::{AppError, AppResult};
use byteport_store::{VmFilter, vm};
use byteport_types::api::{
    CloudInit, Egress, Engine, Execution, Page, PortForward, ReadyBy, Role, Vm, VmActionCheck,
    VmCreate, VmListQuery,
};
use byteport_types::vm_state::{self, DesiredState, ObservedState, VmAction, VmState};
use byteport_types::{Name, NodeId, ProjectId, VmId};
use chrono::Utc;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;
use uuid::Uuid;

/// At most this much user-data (cloud-init's own limit is similar).
pub const MAX_USER_DATA: usize = 64 * 1024;
const MAX_SSH_KEYS: usize = 32;
const MAX_LABELS: usize = 32;
pub(crate) const MAX_PAGE: u32 = 500;
pub(crate) const MAX_WAIT: u64 = 600;

fn check_user_data(d: &str) -> AppResult<()> {
    if d.len() > MAX_USER_DATA {
        return Err(AppError::bad(
            "invalid_user_data",
            format!(
                "user_data is {} bytes; at most {MAX_USER_DATA} are allowed",
                d.len()
            ),
        ));
    }
    if let Some(c) = d
        .chars()
        .find(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t'))
    {
        return Err(AppError::bad(
            "invalid_user_data",
            format!(
                "user_data must be text (cloud-config, a script or multipart); it contains the control character U+{:04X}",
                c as u32
            ),
        ));
    }
    Ok(())
}

fn check_ssh_keys(keys: &[String]) -> AppResult<()> {
    if keys.len() > MAX_SSH_KEYS {
        return Err(AppError::bad(
            "invalid_ssh_key",
            format!(
                "{} SSH keys given; at most {MAX_SSH_KEYS} are allowed",
                keys.len()
            ),
        ));
    }
    for (i, k) in keys.iter().enumerate() {
        let kind = k.split_whitespace().next().unwrap_or_default();
        let known =
            kind.starts_with("ssh-") || kind.starts_with("ecdsa-") || kind.starts_with("sk-");
        if !known || k.len() > 8192 || k.chars().any(|c| c.is_control()) {
            return Err(AppError::bad(
                "invalid_ssh_key",
                format!(
                    "ssh_keys[{i}] is not one OpenSSH public key line (\"ssh-ed25519 AAAA... comment\")"
                ),
            ));
        }
    }
    Ok(())
}

fn check_labels(labels: &BTreeMap<String, String>) -> AppResult<()> {
    if labels.len() > MAX_LABELS {
        return Err(AppError::bad(
            "invalid_label",
            format!(
                "{} labels given; at most {MAX_LABELS} are allowed",
                labels.len()
            ),
        ));
    }
    for (k, v) in labels {
        let key_ok = !k.is_empty()
            && k.len() <= 63
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'/'));
        if !key_ok {
            return Err(AppError::bad(
                "invalid_label",
                format!(
                    "label key {k:?} must be 1-63 characters of letters, digits, '.', '-', '_' and '/'"
                ),
            ));
        }
        if v.len() > 255 || v.chars().any(|c| c.is_control()) {
            return Err(AppError::bad(
                "invalid_label",
                format!("label {k:?} has a value longer than 255 bytes or with control characters"),
            ));
        }
    }
    Ok(())
}

fn parse<T: std::str::FromStr>(s: &str) -> AppResult<T> {
    s.parse()
        .map_err(|_| AppError::internal(format!("bad stored value {s:?}")))
}

impl App {
    pub(crate) async fn vm_view(&self, v: &vm::Model) -> AppResult<Vm> {
        let project = self.project_name(ProjectId(v.project_id)).await?;
        vm_view(v, &project)
    }

    /// A VM by id, if the caller has at least `need` in its project; 404
    /// for a VM the caller may not see, exactly as for one that never was.
    pub(crate) async fn vm_resolve(&self, ctx: &Ctx, id: &str, need: Role) -> AppResult<vm::Model> {
        let nf = || AppError::not_found("VM", id);
        let vid: VmId = id.parse().map_err(|_| nf())?;
        let v = self.store.vm_fetch(vid.0).await.map_err(|_| nf())?;
        self.require(ctx, ProjectId(v.project_id), need, "VM", id)
            .await?;
        ctx.target("vm", v.id, Some(ProjectId(v.project_id)));
        Ok(v)
    }

    pub async fn vm_create(&self, ctx: &Ctx, req: VmCreate) -> AppResult<Vm> {
        let project_key = req.project.as_deref().unwrap_or(DEFAULT_PROJECT);
        let project = self.project_resolve(ctx, project_key, Role::Viewer).await?;
        self.require(
            ctx,
            ProjectId(project.id),
            Role::Member,
            "project",
            project_key,
        )
        .await?;
        let image = self
            .store
            .image_fetch_by_name(req.image.as_str())
            .await?
            .ok_or_else(|| {
                AppError::bad(
                    "unknown_image",
                    format!("there is no image named {}", req.image),
                )
            })?;
        let (mut model, labels) = self.vm_model(project.id, &image, req, None).await?;
        // A VM that fits nowhere is written pending with the reason.
        let no_fit = self.fits_nowhere(&model).await?;
        let place = no_fit.is_none();
        if let Some(why) = no_fit {
            model.state_reason = Some(why);
        }
        let v = self.store.vm_insert(model, &labels).await?;
        ctx.target("vm", v.id, Some(ProjectId(v.project_id)));
        let v = self.vm_created(v, place).await?;
        vm_view(&v, &project.name)
    }

    /// Tells watchers about a new VM and places it now if a node has room
    /// (the background loop retries otherwise), if `place` (not when it
    /// was written with the reason it fits nowhere).
    pub(crate) async fn vm_created(&self, v: vm::Model, place: bool) -> AppResult<vm::Model> {
        let _ = self.vm_changes.send(v.id);
        if !place {
            return Ok(v);
        }
        if let Err(e) = self.place_vm(&v).await {
            tracing::warn!(vm = %v.id, error = %e, "placement failed; will retry");
            return Ok(v);
        }
        Ok(self.store.vm_fetch(v.id).await?)
    }

    /// A new VM's row with what every new VM shares: pending, to run, on
    /// no node, nothing reported or reserved yet, no labels, keys or
    /// user-data; its image's agent and login user. Callers set the rest.
    pub(crate) fn vm_row(
        &self,
        id: Uuid,
        project_id: Uuid,
        name: &str,
        image: &byteport_store::image::Model,
        (vcpus, memory_mib, disk_gib): (u32, u64, u64),
        hostname: String,
    ) -> vm::Model {
        let now = Utc::now();
        vm::Model {
            id,
            project_id,
            name: name.to_owned(),
            image_id: image.id,
            image_name: image.name.clone(),
            arch: image.arch.clone(),
            execution: None,
            engine: Engine::Qemu.as_str().into(),
            flavor_name: None,
            vcpus: i64::from(vcpus),
            memory_mib: memory_mib as i64,
            disk_gib: disk_gib as i64,
            hostname,
            labels: "{}".into(),
            ssh_keys: "[]".into(),
            user_data: None,
            state: VmState::Pending.to_string(),
            state_reason: Some("waiting for a node to place it on".into()),
            desired_state: DesiredState::Running.to_string(),
            desired_generation: 1,
            observed_state: None,
            observed_generation: 0,
            node_id: None,
            ports: "[]".into(),
            created_at: now,
            updated_at: now,
            deleted_at: None,
            has_agent: image.has_agent,
            agent_version: None,
            reserved: false,
            compute_held: false,
            metadata_token_hash: Some(self.metadata_token_hash(id)),
            cloud_init: None,
            ssh_user: image.login_user.clone(),
            placement_group: None,
            placement: None,
            environment_id: None,
            guest_ports: "[]".into(),
            egress: Egress::default().as_str().into(),
            network: None,
        }
    }

    /// Checks a create request and makes the VM's row (not stored yet).
    pub(crate) async fn vm_model(
        &self,
        project_id: Uuid,
        image: &byteport_store::image::Model,
        req: VmCreate,
        environment: Option<Uuid>,
    ) -> AppResult<(vm::Model, Vec<(String, String)>)> {
        let flavor = match &req.flavor {
            Some(f) => Some(
                self.store
                    .flavor_fetch_by_name(f.as_str())
                    .await?
                    .ok_or_else(|| {
                        AppError::bad("unknown_flavor", format!("there is no flavor named {f}"))
                    })?,
            ),
            None => None,
        };
        let size = match (&flavor, req.vcpus, req.memory_mib, req.disk_gib) {
            (Some(f), c, m, d) => (
                c.unwrap_or(to_u32(f.vcpus)),
                m.unwrap_or(to_u64(f.memory_mib)),
                d.unwrap_or(to_u64(f.disk_gib)),
            ),
            (None, Some(c), Some(m), Some(d)) => (c, m, d),
            _ => {
                return Err(AppError::bad(
                    "missing_size",
                    "give a flavor, or all of vcpus, memory_mib and disk_gib",
                ));
            }
        };
        check_size(size.0, size.1, size.2)?;
        if let Some(d) = &req.user_data {
            check_user_data(d)?;
        }
        check_ssh_keys(&req.ssh_keys)?;
        check_labels(&req.labels)?;
        check_guest_ports(&req.ports)?;
        let engine = req.engine.unwrap_or_default();
        check_engine(engine, image)?;
        if let Some(r) = &req.placement.region
            && (r.is_empty()
                || r.len() > 63
                || !r.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
        {
            return Err(AppError::bad(
                "invalid_region",
                "placement.region must be 1-63 letters, digits and '-'",
            ));
        }

        let id = Uuid::now_v7();
        let hostname = req.hostname.as_ref().unwrap_or(&req.name).to_string();
        let model = vm::Model {
            flavor_name: flavor.map(|f| f.name),
            labels: serde_json::to_string(&req.labels).map_err(AppError::internal)?,
            ssh_keys: serde_json::to_string(&req.ssh_keys).map_err(AppError::internal)?,
            user_data: req.user_data,
            placement_group: req.placement.group.as_ref().map(|g| g.to_string()),
            placement: Some(serde_json::to_string(&req.placement).map_err(AppError::internal)?),
            environment_id: environment,
            guest_ports: serde_json::to_string(&req.ports).map_err(AppError::internal)?,
            egress: req.egress.as_str().into(),
            engine: engine.as_str().into(),
            ..self.vm_row(id, project_id, req.name.as_str(), image, size, hostname)
        };
        Ok((model, req.labels.into_iter().collect()))
    }

    pub async fn vm_list(&self, ctx: &Ctx, q: VmListQuery) -> AppResult<Page<VmJson>> {
        ctx.user()?;
        let limit = q.limit.unwrap_or(100);
        if !(1..=MAX_PAGE).contains(&limit) {
            return Err(AppError::bad(
                "invalid_limit",
                format!("limit is {limit}; it must be between 1 and {MAX_PAGE}"),
            ));
        }
        let after = match &q.cursor {
            Some(c) => Some(c.parse::<Uuid>().map_err(|_| {
                AppError::bad("invalid_cursor", "the cursor is not one this API returned")
            })?),
            None => None,
        };
        let label = match &q.label {
            Some(l) => match l.split_once('=') {
                Some((k, v)) => Some((k.to_owned(), v.to_owned())),
                None => {
                    return Err(AppError::bad(
                        "invalid_label",
                        "the label filter is key=value",
                    ));
                }
            },
            None => None,
        };
        let projects = match &q.project {
            Some(key) => Some(vec![self.project_resolve(ctx, key, Role::Viewer).await?.id]),
            None => self.visible_project_ids(ctx).await?,
        };
        let mut page = self
            .store
            .vm_list_versions(&VmFilter {
                projects,
                state: q.state.map(|s| s.to_string()),
                label,
                name: q.name.clone(),
                after,
                limit: u64::from(limit) + 1,
            })
            .await?;
        let more = page.len() > limit as usize;
        page.truncate(limit as usize);
        // Each VM from its view at this change, if kept; the others read
        // in one query and kept for next time.
        let mut items = self.views.get_many(&page);
        let missing: Vec<Uuid> = page
            .iter()
            .zip(&items)
            .filter(|(_, v)| v.is_none())
            .map(|((id, _), _)| *id)
            .collect();
        if !missing.is_empty() {
            let rows = self.store.vm_fetch_narrow_many(&missing).await?;
            let slot: HashMap<Uuid, usize> = page
                .iter()
                .enumerate()
                .map(|(i, (id, _))| (*id, i))
                .collect();
            for v in &rows {
                let view = self.keep_vm_json(v).await?;
                if let Some(&i) = slot.get(&v.id) {
                    items[i] = Some(view);
                }
            }
        }
        let next_cursor = if more {
            page.last().map(|(id, _)| id.to_string())
        } else {
            None
        };
        // A VM purged between the two reads is left out.
        Ok(Page {
            items: items.into_iter().flatten().collect(),
            next_cursor,
        })
    }

    /// Makes a VM's view as JSON from its row and keeps it; the callers
    /// looked for a kept one first.
    async fn keep_vm_json(&self, v: &vm::Model) -> AppResult<VmJson> {
        let view = VmJson::new(&self.vm_view(v).await?).map_err(AppError::internal)?;
        self.views.put(v.id, v.updated_at, view.clone());
        Ok(view)
    }

    /// A VM as the list shows it. Its project and change time come first
    /// (two columns): the caller's role is checked on the one, and the
    /// view kept at the other answers; only a VM changed since it was last
    /// shown is read whole (the list's narrow row) and made JSON again.
    pub async fn vm_show(&self, ctx: &Ctx, id: &str) -> AppResult<VmJson> {
        let nf = || AppError::not_found("VM", id);
        let vid: VmId = id.parse().map_err(|_| nf())?;
        let (project, at) = self.store.vm_version(vid.0).await.map_err(|_| nf())?;
        self.require(ctx, ProjectId(project), Role::Viewer, "VM", id)
            .await?;
        ctx.target("vm", vid.0, Some(ProjectId(project)));
        if let Some(j) = self.views.get(vid.0, at) {
            return Ok(j);
        }
        let v = self.store.vm_fetch_narrow(vid.0).await.map_err(|_| nf())?;
        self.keep_vm_json(&v).await
    }

    /// Applies a lifecycle action. A forbidden one is a 409 naming the state
    /// and the action, and changes nothing.
    pub async fn vm_act(&self, ctx: &Ctx, id: &str, action: VmAction) -> AppResult<Vm> {
        let v = self.vm_resolve(ctx, id, Role::Member).await?;
        let v = self.vm_apply(v, action).await?;
        self.vm_view(&v).await
    }

    /// Carries out a lifecycle action the caller may take on this VM.
    pub(crate) async fn vm_apply(&self, v: vm::Model, action: VmAction) -> AppResult<vm::Model> {
        let state: VmState = parse(&v.state)?;
        let desired: DesiredState = parse(&v.desired_state)?;
        let plan = vm_state::plan(state, desired, v.node_id.is_some(), action)?;
        // A stopped VM gave its vCPUs and memory back: take them again on
        // its node (where its disk is) before it starts.
        let mut took_compute = false;
        if let (Some(node_id), false) = (v.node_id, v.compute_held)
            && plan.desired == DesiredState::Running
        {
            let n = self.store.node_fetch(node_id).await?;
            let limit = self
                .settings
                .overcommit
                .limit(super::placement::inventory(&n).capacity);
            let within = byteport_store::Size {
                vcpus: limit.vcpus,
                memory_mib: limit.memory_mib,
                disk_gib: limit.disk_gib,
            };
            if !self.store.vm_reserve_compute(v.id, within).await? {
                return Err(AppError::Conflict(format!(
                    "node {} has no room to start this VM now: it needs {} vCPU and {} MiB; {} vCPU and {} MiB of {} and {} are reserved",
                    n.name,
                    v.vcpus,
                    v.memory_mib,
                    n.reserved_vcpus,
                    n.reserved_memory_mib,
                    limit.vcpus,
                    limit.memory_mib
                )));
            }
            took_compute = true;
        }
        let updated = self
            .store
            .vm_update_desired(
                v.id,
                v.desired_generation,
                &plan.desired.to_string(),
                &plan.state.to_string(),
                plan.state == VmState::Deleted,
            )
            .await;
        let v = match updated {
            Ok(v) => v,
            Err(e) => {
                if took_compute {
                    self.store.vm_release_compute(v.id).await?;
                }
                return Err(e.into());
            }
        };
        let _ = self.vm_changes.send(v.id);
        if let Some(node) = v.node_id {
            // Its node's room changed (taken for a start, given back by
            // a delete): the next placement reads it.
            self.inventory.invalidate().await;
            self.hub.poke(node);
        }
        Ok(v)
    }

    /// Blocks until the VM is in `target` or `timeout` passes. Reaching a
    /// state from which `target` cannot follow (`deleted`, or `error` when
    /// waiting for something else) ends the wait with a 409.
    pub async fn vm_wait(
        &self,
        ctx: &Ctx,
        id: &str,
        target: VmState,
        timeout: Option<u64>,
    ) -> AppResult<Vm> {
        let secs = timeout.unwrap_or(60);
        if secs > MAX_WAIT {
            return Err(AppError::bad(
                "invalid_timeout",
                format!("timeout_secs is {secs}; at most {MAX_WAIT} is allowed"),
            ));
        }
        let v = self.vm_resolve(ctx, id, Role::Viewer).await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        let mut changes = self.vm_changes.subscribe();
        let mut current = v;
        loop {
            let state: VmState = parse(&current.state)?;
            if state == target {
                return self.vm_view(&current).await;
            }
            if state == VmState::Deleted || (state == VmState::Error && target != VmState::Error) {
                return Err(AppError::Conflict(format!(
                    "the VM is {state}{}; it will not become {target}",
                    current
                        .state_reason
                        .as_deref()
                        .map(|r| format!(" ({r})"))
                        .unwrap_or_default()
                )));
            }
            // Wake on a change made by this replica, or poll for changes
            // made by another one.
            let tick = tokio::time::sleep(Duration::from_millis(500));
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(AppError::Timeout(format!(
                        "the VM is still {state} after {secs} s of waiting for {target}"
                    )));
                }
                _ = changes.recv() => {}
                _ = tick => {}
            }
            current = self.store.vm_fetch(current.id).await?;
        }
    }
}

/// What the state machine allows now, action by action.
fn action_checks(state: VmState, desired: DesiredState, placed: bool) -> Vec<VmActionCheck> {
    VmAction::ALL
        .iter()
        .map(
            |&action| match vm_state::plan(state, desired, placed, action) {
                Ok(_) => VmActionCheck {
                    action,
                    allowed: true,
                    reason: None,
                },
                Err(e) => VmActionCheck {
                    action,
                    allowed: false,
                    reason: Some(e.to_string()),
                },
            },
        )
        .collect()
}

/// At most this many extra guest ports per VM.
const MAX_GUEST_PORTS: usize = 16;

pub(crate) fn check_guest_ports(ports: &[u16]) -> AppResult<()> {
    if ports.len() > MAX_GUEST_PORTS {
        return Err(AppError::bad(
            "invalid_ports",
            format!("at most {MAX_GUEST_PORTS} ports; {} given", ports.len()),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for &p in ports {
        if p == 0 || p == 22 || !seen.insert(p) {
            return Err(AppError::bad(
                "invalid_ports",
                format!("port {p} is 0, 22 (always open) or given twice"),
            ));
        }
    }
    Ok(())
}

/// Whether `image` can run under `engine`: `microvm` has no firmware and
/// no PCI, so it boots a kernel directly, and it is an x86_64 machine.
fn check_engine(engine: Engine, image: &byteport_store::image::Model) -> AppResult<()> {
    if engine == Engine::Microvm && (image.boot != "kernel" || image.arch != "x86_64") {
        return Err(AppError::bad(
            "engine_unsupported",
            format!(
                "the microvm engine boots x86_64 kernels directly; image {} is {} and boots from its {}",
                image.name,
                image.arch,
                if image.boot == "kernel" {
                    "kernel"
                } else {
                    "disk"
                }
            ),
        ));
    }
    if engine == Engine::Libvirt && image.arch != "x86_64" {
        return Err(AppError::bad(
            "engine_unsupported",
            format!(
                "the libvirt engine runs x86_64 guests; image {} is {}",
                image.name, image.arch
            ),
        ));
    }
    Ok(())
}

pub(crate) fn vm_view(v: &vm::Model, project: &str) -> AppResult<Vm> {
    let state: VmState = parse(&v.state)?;
    let desired: DesiredState = parse(&v.desired_state)?;
    let labels: BTreeMap<String, String> =
        serde_json::from_str(&v.labels).map_err(AppError::internal)?;
    let ssh_keys: Vec<String> = serde_json::from_str(&v.ssh_keys).map_err(AppError::internal)?;
    let ports: Vec<PortForward> = serde_json::from_str(&v.ports).map_err(AppError::internal)?;
    Ok(Vm {
        id: VmId(v.id),
        name: Name::parse(&v.name).map_err(AppError::internal)?,
        project: Name::parse(project).map_err(AppError::internal)?,
        project_id: ProjectId(v.project_id),
        arch: v.arch.clone(),
        execution: v.execution.as_deref().and_then(Execution::parse),
        engine: Engine::parse(&v.engine).unwrap_or_default(),
        image: Name::parse(&v.image_name).map_err(AppError::internal)?,
        flavor: v
            .flavor_name
            .as_deref()
            .map(Name::parse)
            .transpose()
            .map_err(AppError::internal)?,
        vcpus: to_u32(v.vcpus),
        memory_mib: to_u64(v.memory_mib),
        disk_gib: to_u64(v.disk_gib),
        hostname: v.hostname.clone(),
        labels,
        ssh_keys,
        ssh_user: v.ssh_user.clone(),
        has_user_data: v.user_data.is_some(),
        state,
        state_reason: v.state_reason.clone(),
        desired_state: desired,
        desired_generation: to_u64(v.desired_generation),
        observed_state: v
            .observed_state
            .as_deref()
            .map(parse::<ObservedState>)
            .transpose()?,
        observed_generation: to_u64(v.observed_generation),
        node_id: v.node_id.map(NodeId),
        ports,
        guest_ports: serde_json::from_str(&v.guest_ports).map_err(AppError::internal)?,
        egress: Egress::parse(&v.egress).unwrap_or_default(),
        network: v
            .network
            .as_deref()
            .and_then(|n| serde_json::from_str(n).ok())
            .unwrap_or_default(),
        ready_by: if v.has_agent {
            ReadyBy::Agent
        } else {
            ReadyBy::Process
        },
        agent_version: v.agent_version.clone(),
        cloud_init: v.cloud_init.as_deref().and_then(CloudInit::parse),
        placement: v
            .placement
            .as_deref()
            .and_then(|p| serde_json::from_str(p).ok())
            .unwrap_or_default(),
        environment_id: v.environment_id.map(byteport_types::EnvironmentId),
        actions: action_checks(state, desired, v.node_id.is_some()),
        created_at: v.created_at,
        updated_at: v.updated_at,
    })
}
