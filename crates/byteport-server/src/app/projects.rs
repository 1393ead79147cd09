//! Projects, their members and quotas.

use super::{App, Ctx, to_u32, to_u64};
use crate::error::{AppError, AppResult};
use byteport_store::project;
use byteport_types::api::{Member, MemberSet, Project, ProjectCreate, Quota, Role, Usage};
use byteport_types::{Name, ProjectId, UserId};
use chrono::Utc;
use uuid::Uuid;

/// The project every installation starts with.
pub const DEFAULT_PROJECT: &str = "default";

/// Quota values above these are absurd, not generous.
pub(crate) const MAX_QUOTA: Quota = Quota {
    max_vms: 100_000,
    max_vcpus: 1_000_000,
    max_memory_mib: 1 << 40,
    max_disk_gib: 1 << 30,
    max_concurrent_runs: 10_000,
};

pub(crate) async fn seed_default(app: &App) -> AppResult<()> {
    if app
        .store
        .project_fetch_by_name(DEFAULT_PROJECT)
        .await?
        .is_none()
    {
        let q = Quota::default();
        let res = app
            .store
            .project_insert(
                project::Model {
                    id: Uuid::now_v7(),
                    name: DEFAULT_PROJECT.into(),
                    description: "The project every installation starts with".into(),
                    max_vms: i64::from(q.max_vms),
                    max_vcpus: i64::from(q.max_vcpus),
                    max_memory_mib: q.max_memory_mib as i64,
                    max_disk_gib: q.max_disk_gib as i64,
                    created_at: Utc::now(),
                    network_index: None,
                    max_concurrent_runs: i64::from(q.max_concurrent_runs),
                },
                None,
            )
            .await;
        // Another replica may have seeded it at the same moment.
        if let Err(e) = res
            && !matches!(e, byteport_store::StoreError::Conflict(_))
        {
            return Err(e.into());
        }
    }
    Ok(())
}

fn check_quota(q: &Quota) -> AppResult<()> {
    let fields = [
        (
            "max_vms",
            u64::from(q.max_vms),
            u64::from(MAX_QUOTA.max_vms),
        ),
        (
            "max_vcpus",
            u64::from(q.max_vcpus),
            u64::from(MAX_QUOTA.max_vcpus),
        ),
        ("max_memory_mib", q.max_memory_mib, MAX_QUOTA.max_memory_mib),
        ("max_disk_gib", q.max_disk_gib, MAX_QUOTA.max_disk_gib),
        (
            "max_concurrent_runs",
            u64::from(q.max_concurrent_runs),
            u64::from(MAX_QUOTA.max_concurrent_runs),
        ),
    ];
    for (name, v, max) in fields {
        if v > max {
            return Err(AppError::bad(
                "invalid_quota",
                format!("{name} is {v}; at most {max} is allowed"),
            ));
        }
    }
    Ok(())
}

impl App {
    /// Makes a new admin an owner of the default project, so a fresh
    /// installation has somewhere to create VMs.
    pub(crate) async fn projects_adopt_default(&self, user: Uuid) -> AppResult<()> {
        if let Some(p) = self.store.project_fetch_by_name(DEFAULT_PROJECT).await? {
            self.store.member_set(p.id, user, "owner").await?;
            self.access.memberships_changed();
        }
        Ok(())
    }

    pub(crate) async fn project_view(&self, p: &project::Model) -> AppResult<Project> {
        let u = self.store.usage(p.id).await?;
        Ok(Project {
            id: ProjectId(p.id),
            name: Name::parse(&p.name).map_err(AppError::internal)?,
            description: p.description.clone(),
            quota: Quota {
                max_vms: to_u32(p.max_vms),
                max_vcpus: to_u32(p.max_vcpus),
                max_memory_mib: to_u64(p.max_memory_mib),
                max_disk_gib: to_u64(p.max_disk_gib),
                max_concurrent_runs: to_u32(p.max_concurrent_runs),
            },
            network_cidr: p
                .network_index
                .and_then(|i| u32::try_from(i).ok())
                .and_then(byteport_types::net::Subnet::of_index)
                .map(|n| n.cidr()),
            usage: Usage {
                vms: to_u32(u.vms),
                vcpus: to_u32(u.vcpus),
                memory_mib: to_u64(u.memory_mib),
                disk_gib: to_u64(u.disk_gib),
            },
            created_at: p.created_at,
        })
    }

    /// A project by name or id, if the caller may see it (404 otherwise).
    pub(crate) async fn project_resolve(
        &self,
        ctx: &Ctx,
        key: &str,
        need: Role,
    ) -> AppResult<project::Model> {
        let found = match key.parse::<ProjectId>() {
            Ok(id) => self.store.project_fetch(id.0).await.ok(),
            Err(_) => self.store.project_fetch_by_name(key).await?,
        };
        let p = found.ok_or_else(|| AppError::not_found("project", key))?;
        ctx.target("project", p.id, Some(ProjectId(p.id)));
        self.require(ctx, ProjectId(p.id), need, "project", key)
            .await?;
        Ok(p)
    }

    pub async fn project_create(&self, ctx: &Ctx, req: ProjectCreate) -> AppResult<Project> {
        let me = ctx.admin()?;
        let quota = req.quota.unwrap_or_default();
        check_quota(&quota)?;
        let owner = match &req.owner {
            Some(n) => self.user_resolve(n.as_str()).await?.id,
            None => me.0,
        };
        let p = self
            .store
            .project_insert(
                project::Model {
                    id: Uuid::now_v7(),
                    name: req.name.to_string(),
                    description: req.description,
                    max_vms: i64::from(quota.max_vms),
                    max_vcpus: i64::from(quota.max_vcpus),
                    max_memory_mib: quota.max_memory_mib as i64,
                    max_disk_gib: quota.max_disk_gib as i64,
                    created_at: Utc::now(),
                    network_index: None,
                    max_concurrent_runs: i64::from(quota.max_concurrent_runs),
                },
                Some(owner),
            )
            .await?;
        self.access.memberships_changed();
        ctx.target("project", p.id, Some(ProjectId(p.id)));
        self.project_view(&p).await
    }

    /// The caller's projects; every project for an admin.
    pub async fn project_list(&self, ctx: &Ctx) -> AppResult<Vec<Project>> {
        let (me, admin) = ctx.user()?;
        let ps = if admin {
            self.store.project_list(None).await?
        } else {
            self.store
                .memberships(me.0)
                .await?
                .into_iter()
                .map(|(p, _)| p)
                .collect()
        };
        let mut out = Vec::with_capacity(ps.len());
        for p in &ps {
            out.push(self.project_view(p).await?);
        }
        Ok(out)
    }

    pub async fn project_show(&self, ctx: &Ctx, key: &str) -> AppResult<Project> {
        let p = self.project_resolve(ctx, key, Role::Viewer).await?;
        self.project_view(&p).await
    }

    pub async fn project_delete(&self, ctx: &Ctx, key: &str) -> AppResult<()> {
        let p = self.project_resolve(ctx, key, Role::Viewer).await?;
        ctx.admin()?;
        self.store.project_delete(p.id).await?;
        self.access.memberships_changed();
        Ok(())
    }

    pub async fn project_set_quota(&self, ctx: &Ctx, key: &str, q: Quota) -> AppResult<Project> {
        let p = self.project_resolve(ctx, key, Role::Owner).await?;
        check_quota(&q)?;
        // Owners may lower their project's limits; raising one is an
        // admin's decision (the limits are what the cloud grants).
        let (_, admin) = ctx.user()?;
        let raised: Vec<&str> = [
            ("max_vms", i64::from(q.max_vms), p.max_vms),
            ("max_vcpus", i64::from(q.max_vcpus), p.max_vcpus),
            ("max_memory_mib", q.max_memory_mib as i64, p.max_memory_mib),
            ("max_disk_gib", q.max_disk_gib as i64, p.max_disk_gib),
            (
                "max_concurrent_runs",
                i64::from(q.max_concurrent_runs),
                p.max_concurrent_runs,
            ),
        ]
        .into_iter()
        .filter(|(_, new, old)| new > old)
        .map(|(name, _, _)| name)
        .collect();
        if !admin && !raised.is_empty() {
            return Err(AppError::Forbidden(format!(
                "only an admin raises a project's quota ({}); an owner may lower it",
                raised.join(", ")
            )));
        }
        let p = self
            .store
            .project_update_quota(
                p.id,
                [
                    i64::from(q.max_vms),
                    i64::from(q.max_vcpus),
                    q.max_memory_mib as i64,
                    q.max_disk_gib as i64,
                    i64::from(q.max_concurrent_runs),
                ],
            )
            .await?;
        self.project_view(&p).await
    }

    pub async fn member_list(&self, ctx: &Ctx, key: &str) -> AppResult<Vec<Member>> {
        let p = self.project_resolve(ctx, key, Role::Viewer).await?;
        self.store
            .member_list(p.id)
            .await?
            .into_iter()
            .map(|(m, u)| {
                Ok(Member {
                    user: Name::parse(&u.name).map_err(AppError::internal)?,
                    user_id: UserId(u.id),
                    role: m.role.parse().map_err(AppError::internal)?,
                })
            })
            .collect()
    }

    pub async fn member_set(
        &self,
        ctx: &Ctx,
        key: &str,
        user: &str,
        req: MemberSet,
    ) -> AppResult<Member> {
        let p = self.project_resolve(ctx, key, Role::Owner).await?;
        let u = self.user_resolve(user).await?;
        self.store
            .member_set(p.id, u.id, &req.role.to_string())
            .await?;
        self.access.memberships_changed();
        Ok(Member {
            user: Name::parse(&u.name).map_err(AppError::internal)?,
            user_id: UserId(u.id),
            role: req.role,
        })
    }

    pub async fn member_remove(&self, ctx: &Ctx, key: &str, user: &str) -> AppResult<()> {
        let p = self.project_resolve(ctx, key, Role::Owner).await?;
        let u = self.user_resolve(user).await?;
        let removed = self
            .store
            .member_delete(p.id, u.id)
            .await
            .map_err(|_| AppError::not_found("member", user));
        self.access.memberships_changed();
        removed
    }
}
