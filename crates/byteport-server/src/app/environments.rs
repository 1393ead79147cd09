//! Environments: groups of VMs for compatibility testing. One VM per image
//! whose name starts with one of the asked prefixes, made in one
//! transaction within the project's quota, a command run on all of them in
//! parallel, and removal of the whole group, by hand or when its lifetime
//! ends.

use super::guest::{CheckedExec, check_exec};
use super::projects::DEFAULT_PROJECT;
use super::{App, Ctx};
use crate::error::{AppError, AppResult};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use byteport_store::{environment, vm};
use byteport_types::api::{
    Environment, EnvironmentAction, EnvironmentCreate, EnvironmentExecEvent, EnvironmentExecTarget,
    EnvironmentRefusal, EnvironmentRunQuery, EnvironmentRunResult, EnvironmentState,
    EnvironmentUpdate, EnvironmentUpdated, EnvironmentVmRef, ExecEvent, ExecRequest, Role,
    VmCreate, VmRunResult,
};
use byteport_types::vm_state::DesiredState;
use byteport_types::{EnvironmentId, Name, ProjectId, VmAction, VmId, VmState};
use chrono::Utc;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;
use uuid::Uuid;

/// At most this many prefixes, and VMs, in one environment.
pub(crate) const MAX_PREFIXES: usize = 16;
const MAX_VMS: usize = 500;
/// VMs of each image at most (`dup_each`).
const MAX_DUP_EACH: u32 = 50;
/// Lifetimes from a minute to 30 days.
pub(crate) const MIN_LIFETIME: u64 = 60;
pub(crate) const MAX_LIFETIME: u64 = 30 * 24 * 3600;
/// Output kept per stream and VM of a run.
const MAX_RUN_OUTPUT: usize = 1 << 20;
/// Events of a streamed run queued before its VMs' relays wait for the
/// requester to read.
const EXEC_QUEUE: usize = 256;
/// The label every VM of an environment carries, with its name.
pub const ENV_LABEL: &str = "environment";

fn check_prefixes(prefixes: &[String]) -> AppResult<()> {
    if prefixes.is_empty() || prefixes.len() > MAX_PREFIXES {
        return Err(AppError::bad(
            "invalid_os_prefixes",
            format!("give 1 to {MAX_PREFIXES} os_prefixes, such as [\"debian\", \"alpine\"]"),
        ));
    }
    for p in prefixes {
        if p.is_empty()
            || p.len() > 63
            || !p
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        {
            return Err(AppError::bad(
                "invalid_os_prefixes",
                format!(
                    "os prefix {p:?} must be 1-63 lowercase letters, digits, '-' or '.' (the start of image names)"
                ),
            ));
        }
    }
    Ok(())
}

/// The state of an environment from its VMs' states.
/// The 409 of a change to an environment being deleted.
fn being_deleted(e: &environment::Model) -> AppError {
    AppError::Conflict(format!("environment {} is being deleted", e.name))
}

/// A lifetime in range (60 s to 30 days), or a 400.
fn check_lifetime(secs: Option<u64>) -> AppResult<Option<u64>> {
    match secs {
        Some(s) if !(MIN_LIFETIME..=MAX_LIFETIME).contains(&s) => Err(AppError::bad(
            "invalid_lifetime",
            format!("lifetime_secs is {s}; it must be between {MIN_LIFETIME} and {MAX_LIFETIME}"),
        )),
        l => Ok(l),
    }
}

fn env_state(deleted: bool, states: &[VmState]) -> EnvironmentState {
    let all = |f: fn(&VmState) -> bool| states.iter().all(f);
    if deleted {
        return if all(|s| *s == VmState::Deleted) {
            EnvironmentState::Deleted
        } else {
            EnvironmentState::Deleting
        };
    }
    if !states.is_empty() && all(|s| *s == VmState::Stopped) {
        EnvironmentState::Stopped
    } else if states
        .iter()
        .any(|s| matches!(s, VmState::Error | VmState::Stopped | VmState::Deleted))
    {
        EnvironmentState::Degraded
    } else if all(|s| *s == VmState::Running) {
        EnvironmentState::Ready
    } else {
        EnvironmentState::Creating
    }
}

impl App {
    pub async fn env_create(&self, ctx: &Ctx, req: EnvironmentCreate) -> AppResult<Environment> {
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
        check_prefixes(&req.os_prefixes)?;
        let lifetime = check_lifetime(req.lifetime_secs)?;
        // One VM per matching image, in name order, each image once.
        let images = self.store.image_list().await?;
        let mut chosen: BTreeMap<String, byteport_store::image::Model> = BTreeMap::new();
        for p in &req.os_prefixes {
            let matching: Vec<_> = images
                .iter()
                .filter(|i| i.name.starts_with(p.as_str()))
                .collect();
            if matching.is_empty() {
                return Err(AppError::bad(
                    "unknown_image",
                    format!("no image name starts with {p:?}"),
                ));
            }
            for i in matching {
                chosen.insert(i.name.clone(), i.clone());
            }
        }
        if !req.archs.is_empty() {
            if req.archs.len() > MAX_PREFIXES {
                return Err(AppError::bad(
                    "invalid_archs",
                    format!("give at most {MAX_PREFIXES} archs"),
                ));
            }
            for a in &req.archs {
                if !chosen.values().any(|i| i.arch == *a) {
                    return Err(AppError::bad(
                        "unknown_image",
                        format!("no {a} image starts with {}", req.os_prefixes.join(" or ")),
                    ));
                }
            }
            chosen.retain(|_, i| req.archs.contains(&i.arch));
        }
        let dup = req.dup_each.unwrap_or(1);
        if !(1..=MAX_DUP_EACH).contains(&dup) {
            return Err(AppError::bad(
                "invalid_dup_each",
                format!("dup_each is {dup}; it must be between 1 and {MAX_DUP_EACH}"),
            ));
        }
        let total = chosen.len() * dup as usize;
        if total > MAX_VMS {
            return Err(AppError::bad(
                "too_many_vms",
                format!(
                    "{} images x {dup} is {total} VMs; an environment has at most {MAX_VMS}",
                    chosen.len()
                ),
            ));
        }
        let now = Utc::now();
        let env = environment::Model {
            id: Uuid::now_v7(),
            project_id: project.id,
            name: req.name.to_string(),
            os_prefixes: serde_json::to_string(&req.os_prefixes).map_err(AppError::internal)?,
            flavor_name: req.flavor.as_ref().map(|f| f.to_string()),
            expires_at: lifetime.map(|s| now + chrono::Duration::seconds(s as i64)),
            created_at: now,
            deleted_at: None,
        };
        let mut vms = Vec::with_capacity(total);
        let copies = chosen
            .values()
            .flat_map(|image| (1..=dup).map(move |n| (image, n)));
        for (image, n) in copies {
            let vm_name = if dup == 1 {
                format!("{}-{}", req.name, image.name)
            } else {
                format!("{}-{}-{n}", req.name, image.name)
            };
            let name = Name::parse(&vm_name).map_err(|e| {
                AppError::bad(
                    "invalid_name",
                    format!("the VM name {vm_name:?} (environment-image) is not valid: {e}; use a shorter environment name"),
                )
            })?;
            let labels = BTreeMap::from([(ENV_LABEL.to_owned(), req.name.to_string())]);
            let vm_req = VmCreate {
                name,
                project: None,
                image: Name::parse(&image.name).map_err(AppError::internal)?,
                flavor: req.flavor.clone(),
                vcpus: req.vcpus,
                memory_mib: req.memory_mib,
                disk_gib: req.disk_gib,
                user_data: req.user_data.clone(),
                ssh_keys: req.ssh_keys.clone(),
                labels,
                hostname: None,
                placement: Default::default(),
                ports: req.ports.clone(),
                egress: req.egress,
                engine: req.engine,
            };
            vms.push(
                self.vm_model(project.id, image, vm_req, Some(env.id))
                    .await?,
            );
        }
        let env_id = env.id;
        let made = self.store.vms_insert(Some(env), vms).await?;
        ctx.target("environment", env_id, Some(ProjectId(project.id)));
        for v in made {
            self.vm_created(v, true).await?;
        }
        self.env_view(&self.store.env_fetch(env_id).await?, &project.name)
            .await
    }

    /// An environment by id (deleted ones too, to watch them go), or a
    /// live one by name in the `project` (the default project when
    /// absent), if the caller has at least `need` in its project; 404 as
    /// for one that never was otherwise.
    pub(crate) async fn env_resolve(
        &self,
        ctx: &Ctx,
        key: &str,
        project: Option<&str>,
        need: Role,
    ) -> AppResult<environment::Model> {
        let nf = || AppError::not_found("environment", key);
        let e = match key.parse::<EnvironmentId>() {
            Ok(id) => self.store.env_fetch(id.0).await.ok(),
            Err(_) => {
                let p = self
                    .project_resolve(ctx, project.unwrap_or(DEFAULT_PROJECT), Role::Viewer)
                    .await
                    .map_err(|_| nf())?;
                self.store.env_fetch_by_name(p.id, key).await?
            }
        }
        .ok_or_else(nf)?;
        self.require(ctx, ProjectId(e.project_id), need, "environment", key)
            .await?;
        ctx.target("environment", e.id, Some(ProjectId(e.project_id)));
        Ok(e)
    }

    async fn env_view(&self, e: &environment::Model, project: &str) -> AppResult<Environment> {
        let vms = self.store.env_vms(e.id).await?;
        let mut views = Vec::with_capacity(vms.len());
        for v in &vms {
            views.push(super::vms::vm_view(v, project)?);
        }
        let states: Vec<VmState> = views.iter().map(|v| v.state).collect();
        Ok(Environment {
            id: EnvironmentId(e.id),
            name: Name::parse(&e.name).map_err(AppError::internal)?,
            project: Name::parse(project).map_err(AppError::internal)?,
            project_id: ProjectId(e.project_id),
            os_prefixes: serde_json::from_str(&e.os_prefixes).unwrap_or_default(),
            flavor: e.flavor_name.as_deref().and_then(|f| Name::parse(f).ok()),
            state: env_state(e.deleted_at.is_some(), &states),
            vms: views,
            expires_at: e.expires_at,
            created_at: e.created_at,
        })
    }

    pub async fn env_show(
        &self,
        ctx: &Ctx,
        key: &str,
        project: Option<&str>,
    ) -> AppResult<Environment> {
        let e = self.env_resolve(ctx, key, project, Role::Viewer).await?;
        let p = self.store.project_fetch(e.project_id).await?;
        self.env_view(&e, &p.name).await
    }

    /// The live environments of every project the caller sees.
    pub async fn env_list(&self, ctx: &Ctx) -> AppResult<Vec<Environment>> {
        let (filter, names) = self.visible_projects(ctx).await?;
        let projects: Vec<Uuid> = match filter {
            Some(ids) => ids,
            None => names.keys().copied().collect(),
        };
        let mut out = Vec::new();
        for e in self.store.env_list(&projects).await? {
            let project = names.get(&e.project_id).cloned().unwrap_or_default();
            out.push(self.env_view(&e, &project).await?);
        }
        Ok(out)
    }

    /// Deletes an environment and every VM in it (they go `deleting`, then
    /// `deleted` as their nodes remove them).
    pub async fn env_delete(
        &self,
        ctx: &Ctx,
        key: &str,
        project: Option<&str>,
    ) -> AppResult<Environment> {
        let e = self.env_resolve(ctx, key, project, Role::Member).await?;
        if e.deleted_at.is_none() {
            self.env_remove(&e).await?;
        }
        let p = self.store.project_fetch(e.project_id).await?;
        let e = self.store.env_fetch(e.id).await?;
        self.env_view(&e, &p.name).await
    }

    async fn env_remove(&self, e: &environment::Model) -> AppResult<()> {
        self.store.env_mark_deleted(e.id, Utc::now()).await?;
        for v in self.store.env_vms(e.id).await? {
            if v.deleted_at.is_some() || v.desired_state == "deleted" {
                continue;
            }
            let id = v.id;
            if let Err(err) = self.vm_apply(v, VmAction::Delete).await {
                tracing::warn!(vm = %id, error = %err, "could not delete a VM of an environment");
            }
        }
        Ok(())
    }

    /// A live environment a member may change, named as the audit
    /// event's target; a 409 once it is being deleted.
    async fn env_to_change(
        &self,
        ctx: &Ctx,
        key: &str,
        project: Option<&str>,
    ) -> AppResult<environment::Model> {
        let e = self.env_resolve(ctx, key, project, Role::Member).await?;
        if e.deleted_at.is_some() {
            return Err(being_deleted(&e));
        }
        ctx.target("environment", e.id, Some(ProjectId(e.project_id)));
        Ok(e)
    }

    /// Changes a live environment: its lifetime, VMs to drop (named, by
    /// image prefix, or those that stopped answering) and every VM's ports
    /// and outbound policy. Everything is checked first; a 400 changes
    /// nothing.
    pub async fn env_update(
        &self,
        ctx: &Ctx,
        key: &str,
        project: Option<&str>,
        req: EnvironmentUpdate,
    ) -> AppResult<EnvironmentUpdated> {
        let e = self.env_to_change(ctx, key, project).await?;
        let lifetime = check_lifetime(req.lifetime_secs)?;
        if lifetime.is_some() && req.no_expiry {
            return Err(AppError::bad(
                "invalid_lifetime",
                "give lifetime_secs or no_expiry, not both",
            ));
        }
        if !req.remove_os_prefixes.is_empty() {
            check_prefixes(&req.remove_os_prefixes)?;
        }
        if let Some(p) = &req.ports {
            super::vms::check_guest_ports(p)?;
        }
        let nothing = lifetime.is_none()
            && !req.no_expiry
            && req.remove_vms.is_empty()
            && req.remove_os_prefixes.is_empty()
            && !req.remove_unresponsive
            && req.ports.is_none()
            && req.egress.is_none();
        if nothing {
            return Err(AppError::bad(
                "empty_update",
                "nothing to change: give lifetime_secs, no_expiry, remove_vms, remove_os_prefixes, remove_unresponsive, ports or egress",
            ));
        }
        let live: Vec<vm::Model> = self
            .store
            .env_vms(e.id)
            .await?
            .into_iter()
            .filter(|v| v.deleted_at.is_none() && v.desired_state != "deleted")
            .collect();
        for n in &req.remove_vms {
            if !live.iter().any(|v| v.name == *n || v.id.to_string() == *n) {
                return Err(AppError::bad(
                    "unknown_vm",
                    format!("{n} is not a live VM of environment {}", e.name),
                ));
            }
        }
        let unresponsive = |v: &vm::Model| {
            matches!(
                v.state.parse::<VmState>(),
                Ok(VmState::Error | VmState::Unknown)
            )
        };
        let (gone, kept): (Vec<vm::Model>, Vec<vm::Model>) = live.into_iter().partition(|v| {
            req.remove_vms
                .iter()
                .any(|n| v.name == *n || v.id.to_string() == *n)
                || req
                    .remove_os_prefixes
                    .iter()
                    .any(|p| v.image_name.starts_with(p.as_str()))
                || (req.remove_unresponsive && unresponsive(v))
        });

        if lifetime.is_some() || req.no_expiry {
            let at = lifetime.map(|s| Utc::now() + chrono::Duration::seconds(s as i64));
            if !self.store.env_set_expiry(e.id, at).await? {
                return Err(being_deleted(&e));
            }
        }
        let vm_ref = |v: &vm::Model| -> AppResult<EnvironmentVmRef> {
            Ok(EnvironmentVmRef {
                vm_id: VmId(v.id),
                vm_name: Name::parse(&v.name).map_err(AppError::internal)?,
            })
        };
        let mut apply_at_next_start = Vec::new();
        if req.ports.is_some() || req.egress.is_some() {
            // Each VM keeps what the update does not name.
            let mut changes: BTreeMap<(String, String), Vec<Uuid>> = BTreeMap::new();
            for v in &kept {
                let ports = match &req.ports {
                    Some(p) => serde_json::to_string(p).map_err(AppError::internal)?,
                    None => v.guest_ports.clone(),
                };
                let egress = req
                    .egress
                    .map_or(v.egress.clone(), |g| g.as_str().to_owned());
                if ports == v.guest_ports && egress == v.egress {
                    continue;
                }
                // A VM whose hypervisor runs or is being started keeps the
                // ports and policy it started with until its next start.
                if matches!(
                    v.state.parse::<VmState>(),
                    Ok(VmState::Provisioning
                        | VmState::Running
                        | VmState::Paused
                        | VmState::Rebooting)
                ) {
                    apply_at_next_start.push(vm_ref(v)?);
                }
                changes.entry((ports, egress)).or_default().push(v.id);
            }
            // One statement per distinct (ports, egress): one in all when
            // the update names both.
            for ((ports, egress), ids) in changes {
                self.store.vms_set_network(&ids, &ports, &egress).await?;
            }
        }
        let mut removed = Vec::with_capacity(gone.len());
        for v in gone {
            removed.push(vm_ref(&v)?);
            self.vm_apply(v, VmAction::Delete).await?;
        }
        let p = self.store.project_fetch(e.project_id).await?;
        let e = self.store.env_fetch(e.id).await?;
        Ok(EnvironmentUpdated {
            environment: self.env_view(&e, &p.name).await?,
            removed,
            apply_at_next_start,
        })
    }

    /// Stops (`VmAction::Stop`: each guest powers off, its disk is kept)
    /// or starts every VM of an environment. VMs already on their way are
    /// left alone; one that refuses (no room on its node to start, say)
    /// is listed with the reason and holds no other back.
    pub async fn env_act(
        &self,
        ctx: &Ctx,
        key: &str,
        project: Option<&str>,
        action: VmAction,
    ) -> AppResult<EnvironmentAction> {
        let e = self.env_to_change(ctx, key, project).await?;
        let want = match action {
            VmAction::Stop => DesiredState::Stopped,
            _ => DesiredState::Running,
        };
        let mut refused = Vec::new();
        for v in self.store.env_vms(e.id).await? {
            if v.deleted_at.is_some() || v.desired_state == want.to_string() {
                continue;
            }
            let (id, name) = (v.id, v.name.clone());
            if let Err(err) = self.vm_apply(v, action).await {
                refused.push(EnvironmentRefusal {
                    vm_id: VmId(id),
                    vm_name: Name::parse(&name).map_err(AppError::internal)?,
                    reason: err.to_string(),
                });
            }
        }
        let p = self.store.project_fetch(e.project_id).await?;
        Ok(EnvironmentAction {
            environment: self.env_view(&e, &p.name).await?,
            refused,
        })
    }

    /// Deletes the environments whose lifetime has ended; how many.
    pub async fn env_reap(&self) -> AppResult<usize> {
        let expired = self.store.env_expired(Utc::now()).await?;
        for e in &expired {
            tracing::info!(environment = %e.name, id = %e.id, "lifetime ended; deleting");
            self.env_remove(e).await?;
            let ctx = Ctx::new(super::Actor::Anonymous);
            ctx.target("environment", e.id, Some(ProjectId(e.project_id)));
            self.audit_record(&ctx, "environment_expired", 200, "deleted")
                .await;
        }
        Ok(expired.len())
    }

    /// Runs one command on every selected VM of the environment at once;
    /// the events say which VMs it went to, then each VM's output and end
    /// as they come, then `Done`. A VM that is not running ends with an
    /// error of its own; the others still run. A bad request is the same
    /// on every VM: it is one 400, and nothing runs.
    pub async fn env_exec(
        &self,
        ctx: &Ctx,
        key: &str,
        q: &EnvironmentRunQuery,
        req: ExecRequest,
    ) -> AppResult<(environment::Model, mpsc::Receiver<EnvironmentExecEvent>)> {
        let x = Arc::new(check_exec(req)?);
        let (e, vms) = self
            .env_targets(ctx, key, q.project.as_deref(), &q.os_prefix, &q.vm)
            .await?;
        let started = Instant::now();
        let targets = vms
            .iter()
            .map(|v| {
                Ok(EnvironmentExecTarget {
                    vm_id: VmId(v.id),
                    vm_name: Name::parse(&v.name).map_err(AppError::internal)?,
                    image: Name::parse(&v.image_name).map_err(AppError::internal)?,
                    arch: v.arch.clone(),
                })
            })
            .collect::<AppResult<Vec<_>>>()?;
        let (tx, rx) = mpsc::channel(EXEC_QUEUE);
        // The first message of an empty channel always has room.
        let _ = tx.try_send(EnvironmentExecEvent::Started { vms: targets });
        let app = self.clone();
        tokio::spawn(async move {
            let total = vms.len();
            let each = vms.into_iter().map(|v| {
                let (app, x, tx) = (app.clone(), x.clone(), tx.clone());
                async move { app.exec_relay(v, &x, &tx, started).await }
            });
            let succeeded = futures_util::future::join_all(each)
                .await
                .into_iter()
                .filter(|ok| *ok)
                .count();
            let _ = tx
                .send(EnvironmentExecEvent::Done {
                    succeeded,
                    failed: total - succeeded,
                    duration_ms: started.elapsed().as_millis() as u64,
                })
                .await;
        });
        Ok((e, rx))
    }

    /// Runs the command on one VM, its events tagged with the VM; true
    /// when it exited 0.
    async fn exec_relay(
        &self,
        v: vm::Model,
        x: &CheckedExec,
        tx: &mpsc::Sender<EnvironmentExecEvent>,
        started: Instant,
    ) -> bool {
        let vm_id = VmId(v.id);
        let ms = || started.elapsed().as_millis() as u64;
        let mut rx = match self.exec_start(&v, x).await {
            Ok(rx) => rx,
            Err(e) => {
                let _ = tx
                    .send(EnvironmentExecEvent::Error {
                        vm_id,
                        message: e.to_string(),
                        duration_ms: ms(),
                    })
                    .await;
                return false;
            }
        };
        loop {
            let (ev, end) = match rx.recv().await {
                Some(ExecEvent::Stdout(data)) => {
                    (EnvironmentExecEvent::Stdout { vm_id, data }, None)
                }
                Some(ExecEvent::Stderr(data)) => {
                    (EnvironmentExecEvent::Stderr { vm_id, data }, None)
                }
                Some(ExecEvent::Exit { code, signal }) => (
                    EnvironmentExecEvent::Exit {
                        vm_id,
                        code,
                        signal,
                        duration_ms: ms(),
                    },
                    Some(code == Some(0)),
                ),
                Some(ExecEvent::Error(message)) => (
                    EnvironmentExecEvent::Error {
                        vm_id,
                        message,
                        duration_ms: ms(),
                    },
                    Some(false),
                ),
                None => (
                    EnvironmentExecEvent::Error {
                        vm_id,
                        message: "the run ended without an exit status".into(),
                        duration_ms: ms(),
                    },
                    Some(false),
                ),
            };
            if tx.send(ev).await.is_err() {
                // The requester went away; dropping `rx` closes the stream,
                // and the node kills the command.
                return false;
            }
            if let Some(ok) = end {
                return ok;
            }
        }
    }

    /// [`App::env_exec`] gathered: each VM's output (up to 1 MiB per
    /// stream), exit code and time, in the environment's order.
    pub async fn env_run(
        &self,
        ctx: &Ctx,
        key: &str,
        q: &EnvironmentRunQuery,
        req: ExecRequest,
    ) -> AppResult<EnvironmentRunResult> {
        let (e, mut rx) = self.env_exec(ctx, key, q, req).await?;
        let mut results: Vec<(VmRunResult, Vec<u8>, Vec<u8>)> = Vec::new();
        let mut at: HashMap<VmId, usize> = HashMap::new();
        let keep = |buf: &mut Vec<u8>, data: &str, truncated: &mut bool| {
            let bytes = B64.decode(data).unwrap_or_default();
            let room = MAX_RUN_OUTPUT.saturating_sub(buf.len());
            if bytes.len() > room {
                *truncated = true;
            }
            buf.extend_from_slice(&bytes[..bytes.len().min(room)]);
        };
        while let Some(ev) = rx.recv().await {
            match ev {
                EnvironmentExecEvent::Started { vms } => {
                    for (i, t) in vms.into_iter().enumerate() {
                        at.insert(t.vm_id, i);
                        results.push((
                            VmRunResult {
                                vm_id: t.vm_id,
                                vm_name: t.vm_name,
                                image: t.image,
                                exit_code: None,
                                signal: None,
                                stdout: String::new(),
                                stderr: String::new(),
                                truncated: false,
                                error: None,
                                duration_ms: 0,
                            },
                            Vec::new(),
                            Vec::new(),
                        ));
                    }
                }
                EnvironmentExecEvent::Stdout { vm_id, data } => {
                    if let Some((r, out, _)) = at.get(&vm_id).and_then(|i| results.get_mut(*i)) {
                        keep(out, &data, &mut r.truncated);
                    }
                }
                EnvironmentExecEvent::Stderr { vm_id, data } => {
                    if let Some((r, _, err)) = at.get(&vm_id).and_then(|i| results.get_mut(*i)) {
                        keep(err, &data, &mut r.truncated);
                    }
                }
                EnvironmentExecEvent::Exit {
                    vm_id,
                    code,
                    signal,
                    duration_ms,
                } => {
                    if let Some((r, _, _)) = at.get(&vm_id).and_then(|i| results.get_mut(*i)) {
                        (r.exit_code, r.signal, r.duration_ms) = (code, signal, duration_ms);
                    }
                }
                EnvironmentExecEvent::Error {
                    vm_id,
                    message,
                    duration_ms,
                } => {
                    if let Some((r, _, _)) = at.get(&vm_id).and_then(|i| results.get_mut(*i)) {
                        (r.error, r.duration_ms) = (Some(message), duration_ms);
                    }
                }
                EnvironmentExecEvent::Done { .. } => break,
            }
        }
        Ok(EnvironmentRunResult {
            environment: Name::parse(&e.name).map_err(AppError::internal)?,
            results: results
                .into_iter()
                .map(|(mut r, out, err)| {
                    r.stdout = String::from_utf8_lossy(&out).into_owned();
                    r.stderr = String::from_utf8_lossy(&err).into_owned();
                    r
                })
                .collect(),
        })
    }

    /// The environment (a member's, not deleted) and those of its VMs that
    /// `os_prefix` and `vm` select (all when both are absent; a 400 when
    /// they are given and select none).
    pub(crate) async fn env_targets(
        &self,
        ctx: &Ctx,
        key: &str,
        project: Option<&str>,
        os_prefix: &Option<String>,
        vm: &Option<String>,
    ) -> AppResult<(environment::Model, Vec<vm::Model>)> {
        let e = self.env_resolve(ctx, key, project, Role::Member).await?;
        if e.deleted_at.is_some() {
            return Err(AppError::not_found("environment", key));
        }
        let (prefixes, names) = (
            byteport_types::api::comma_list(os_prefix.as_deref()),
            byteport_types::api::comma_list(vm.as_deref()),
        );
        let vms: Vec<vm::Model> = self
            .store
            .env_vms(e.id)
            .await?
            .into_iter()
            .filter(|v| v.deleted_at.is_none())
            .filter(|v| {
                prefixes.is_empty()
                    || prefixes
                        .iter()
                        .any(|p| v.image_name.starts_with(p.as_str()))
            })
            .filter(|v| {
                names.is_empty() || names.iter().any(|n| *n == v.name || *n == v.id.to_string())
            })
            .collect();
        if vms.is_empty() && !(prefixes.is_empty() && names.is_empty()) {
            return Err(AppError::bad(
                "no_matching_vm",
                "no VM of the environment matches os_prefix and vm",
            ));
        }
        Ok((e, vms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_environment_is_ready_when_every_vm_runs() {
        use VmState::*;
        assert_eq!(
            env_state(false, &[Running, Running]),
            EnvironmentState::Ready
        );
        assert_eq!(
            env_state(false, &[Running, Provisioning]),
            EnvironmentState::Creating
        );
        assert_eq!(env_state(false, &[Pending]), EnvironmentState::Creating);
        assert_eq!(
            env_state(false, &[Running, Error]),
            EnvironmentState::Degraded
        );
        assert_eq!(
            env_state(true, &[Deleting, Deleted]),
            EnvironmentState::Deleting
        );
        assert_eq!(
            env_state(true, &[Deleted, Deleted]),
            EnvironmentState::Deleted
        );
    }

    #[test]
    fn prefixes_are_image_name_starts() {
        assert!(check_prefixes(&["debian".into(), "alpine-3".into()]).is_ok());
        for bad in [
            vec![],
            vec!["".into()],
            vec!["Debian".into()],
            vec!["a b".into()],
            vec!["../x".into()],
        ] {
            assert!(check_prefixes(&bad).is_err(), "{bad:?}");
        }
    }
}
