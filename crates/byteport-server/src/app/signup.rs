//! Sign-up: invites (single-use links that admins, or a project's owners,
//! send) and self-registration, which admins may turn on (it is off by
//! default). A new account joins the invite's project, or none.

use super::auth::{Issued, hash_password, hash_secret, random_secret};
use super::{Actor, App, Ctx};
use crate::error::{AppError, AppResult};
use byteport_store::{StoreError, invite, user};
use byteport_types::api::{
    Invite, InviteCreate, InviteCreated, InvitePreview, InviteState, Role, ServerSettings,
    ServerSettingsUpdate, SignupInfo, SignupRequest,
};
use byteport_types::{InviteId, Name, ProjectId, UserId};
use chrono::{DateTime, Utc};
use std::collections::VecDeque;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// The settings row that turns self-registration on.
const SELF_REGISTRATION_KEY: &str = "self_registration";
/// Invite secrets start with this, so they are recognisable.
pub const INVITE_PREFIX: &str = "bpi_";
pub const DEFAULT_INVITE_HOURS: u32 = 7 * 24;
pub const MAX_INVITE_HOURS: u32 = 30 * 24;

/// Open sign-ups (those without an invite) accepted lately: past
/// [`SignupWindow::MAX`] within [`SignupWindow::WINDOW`] they are refused
/// with 429, so an open server cannot be filled with accounts in a burst.
/// Kept per replica, in memory; invites are bounded by who sends them.
#[derive(Default)]
pub(crate) struct SignupWindow(std::sync::Mutex<VecDeque<Instant>>);

impl SignupWindow {
    pub const MAX: usize = 20;
    pub const WINDOW: Duration = Duration::from_secs(60);

    /// Takes a place in the window, or says how long until one frees.
    fn take(&self) -> Result<(), Duration> {
        let Ok(mut q) = self.0.lock() else {
            return Ok(());
        };
        while q.front().is_some_and(|t| t.elapsed() >= Self::WINDOW) {
            q.pop_front();
        }
        if q.len() >= Self::MAX {
            let oldest = q.front().copied().unwrap_or_else(Instant::now);
            return Err(Self::WINDOW.saturating_sub(oldest.elapsed()));
        }
        q.push_back(Instant::now());
        Ok(())
    }
}

fn invalid_invite() -> AppError {
    AppError::Forbidden("this invite link is invalid, expired or already used".into())
}

fn invite_state(i: &invite::Model, now: DateTime<Utc>) -> InviteState {
    if i.used_at.is_some() {
        InviteState::Used
    } else if i.expires_at <= now {
        InviteState::Expired
    } else {
        InviteState::Pending
    }
}

fn parse_role(r: &Option<String>) -> AppResult<Option<Role>> {
    r.as_deref()
        .map(|r| r.parse().map_err(AppError::internal))
        .transpose()
}

impl App {
    pub async fn server_settings(&self, ctx: &Ctx) -> AppResult<ServerSettings> {
        ctx.admin()?;
        Ok(ServerSettings {
            self_registration: self.self_registration().await?,
        })
    }

    pub async fn server_settings_update(
        &self,
        ctx: &Ctx,
        req: ServerSettingsUpdate,
    ) -> AppResult<ServerSettings> {
        ctx.admin()?;
        ctx.target("settings", "server", None);
        match req.self_registration {
            Some(true) => self.store.setting_set(SELF_REGISTRATION_KEY, "on").await?,
            Some(false) => self.store.setting_delete(SELF_REGISTRATION_KEY).await?,
            None => {}
        }
        self.server_settings(ctx).await
    }

    async fn self_registration(&self) -> AppResult<bool> {
        Ok(self
            .store
            .setting_get(SELF_REGISTRATION_KEY)
            .await?
            .is_some_and(|v| v == "on"))
    }

    /// What the registration form shows: open or not, and what the invite
    /// gives when it can still be used. Asked without credentials.
    pub async fn signup_info(&self, invite: Option<&str>) -> AppResult<SignupInfo> {
        let invite = match invite {
            Some(secret) => self.invite_preview(secret).await?,
            None => None,
        };
        Ok(SignupInfo {
            self_registration: self.self_registration().await?,
            invite,
        })
    }

    async fn invite_preview(&self, secret: &str) -> AppResult<Option<InvitePreview>> {
        let Some(i) = self
            .store
            .invite_fetch_by_hash(&hash_secret(secret))
            .await?
        else {
            return Ok(None);
        };
        if invite_state(&i, Utc::now()) != InviteState::Pending {
            return Ok(None);
        }
        let project = match i.project_id {
            Some(id) => match self.store.project_fetch(id).await {
                Ok(p) => Some(Name::parse(&p.name).map_err(AppError::internal)?),
                Err(StoreError::NotFound) => return Ok(None),
                Err(e) => return Err(e.into()),
            },
            None => None,
        };
        Ok(Some(InvitePreview {
            project,
            role: parse_role(&i.role)?,
            created_by: i.created_by,
            expires_at: i.expires_at,
        }))
    }

    /// Makes an account and logs it in: with an invite (spent here, its
    /// project joined), or without one when self-registration is on.
    pub async fn signup(&self, ctx: &Ctx, req: SignupRequest) -> AppResult<Issued> {
        let hash = req.invite.as_deref().map(hash_secret);
        match &hash {
            // The invite first: hashing the password costs, and a stranger
            // must not make us spend it for nothing.
            Some(h) => {
                let usable = self
                    .store
                    .invite_fetch_by_hash(h)
                    .await?
                    .is_some_and(|i| invite_state(&i, Utc::now()) == InviteState::Pending);
                if !usable {
                    return Err(invalid_invite());
                }
            }
            None => {
                if !self.self_registration().await? {
                    return Err(AppError::Forbidden(
                        "self-registration is off on this server: ask an admin for an invite link"
                            .into(),
                    ));
                }
                if let Err(wait) = self.signup_window.take() {
                    let secs = wait.as_secs().max(1);
                    return Err(AppError::RateLimited(
                        format!("too many sign-ups just now: try again in {secs} s"),
                        secs,
                    ));
                }
            }
        }
        let password_hash = hash_password(req.password).await?;
        let (u, spent) = self
            .store
            .user_signup(
                user::Model {
                    id: Uuid::now_v7(),
                    name: req.name.to_string(),
                    password_hash,
                    admin: false,
                    created_at: Utc::now(),
                },
                hash.as_deref(),
            )
            .await
            .map_err(|e| match e {
                StoreError::NotFound => invalid_invite(),
                e => e.into(),
            })?;
        self.access.memberships_changed();
        ctx.target(
            "user",
            u.id,
            spent.and_then(|i| i.project_id).map(ProjectId),
        );
        ctx.became(&u.name, UserId(u.id));
        self.issue(&u).await
    }

    /// Makes an invite. Admins may invite to any project or to none; a
    /// project's owners may invite to their project.
    pub async fn invite_create(
        &self,
        ctx: &Ctx,
        req: InviteCreate,
        origin: &str,
    ) -> AppResult<InviteCreated> {
        let Actor::User { name: creator, .. } = &ctx.actor else {
            return Err(AppError::Unauthorized(
                "log in first: this needs a user".into(),
            ));
        };
        let hours = req.expires_in_hours.unwrap_or(DEFAULT_INVITE_HOURS);
        if !(1..=MAX_INVITE_HOURS).contains(&hours) {
            return Err(AppError::bad(
                "invalid_expiry",
                format!("expires_in_hours must be 1-{MAX_INVITE_HOURS}"),
            ));
        }
        let project = match &req.project {
            Some(key) => Some(self.project_resolve(ctx, key.as_str(), Role::Owner).await?),
            None => {
                if req.role.is_some() {
                    return Err(AppError::bad(
                        "role_without_project",
                        "a role needs a project: name the project the new user joins",
                    ));
                }
                ctx.admin()?;
                None
            }
        };
        let role = project.as_ref().map(|_| req.role.unwrap_or(Role::Member));
        let secret = random_secret(INVITE_PREFIX);
        let now = Utc::now();
        let i = self
            .store
            .invite_insert(invite::Model {
                id: Uuid::now_v7(),
                token_hash: hash_secret(&secret),
                created_by: creator.clone(),
                project_id: project.as_ref().map(|p| p.id),
                role: role.map(|r| r.to_string()),
                created_at: now,
                expires_at: now + chrono::Duration::hours(hours.into()),
                used_at: None,
                used_by: None,
            })
            .await?;
        ctx.target("invite", i.id, i.project_id.map(ProjectId));
        let link = format!("{}/register?invite={secret}", origin.trim_end_matches('/'));
        Ok(InviteCreated {
            invite: self.invite_view(i, project.map(|p| p.name)).await?,
            secret,
            link,
        })
    }

    /// Invites an admin sees all of; an owner, those to their projects.
    pub async fn invite_list(&self, ctx: &Ctx) -> AppResult<Vec<Invite>> {
        let (me, admin) = ctx.user()?;
        let owned: Vec<Uuid> = if admin {
            Vec::new()
        } else {
            self.store
                .memberships(me.0)
                .await?
                .into_iter()
                .filter(|(_, role)| role == "owner")
                .map(|(p, _)| p.id)
                .collect()
        };
        let mut out = Vec::new();
        for i in self.store.invite_list().await? {
            if admin || i.project_id.is_some_and(|p| owned.contains(&p)) {
                out.push(self.invite_view(i, None).await?);
            }
        }
        Ok(out)
    }

    /// Revokes an invite (its link stops working; a used one is forgotten).
    pub async fn invite_delete(&self, ctx: &Ctx, id: &str) -> AppResult<()> {
        let (_, admin) = ctx.user()?;
        let not_found = || AppError::not_found("invite", id);
        let key: InviteId = id.parse().map_err(|_| not_found())?;
        let i = self
            .store
            .invite_fetch(key.0)
            .await?
            .ok_or_else(not_found)?;
        ctx.target("invite", i.id, i.project_id.map(ProjectId));
        if !admin {
            // Owners only, and nobody else learns that it exists.
            let Some(p) = i.project_id else {
                return Err(not_found());
            };
            self.require(ctx, ProjectId(p), Role::Owner, "invite", id)
                .await?;
        }
        self.store.invite_delete(i.id).await.map_err(|e| match e {
            StoreError::NotFound => not_found(),
            e => e.into(),
        })
    }

    async fn invite_view(&self, i: invite::Model, project: Option<String>) -> AppResult<Invite> {
        let project = match (project, i.project_id) {
            (Some(name), _) => Some(name),
            (None, Some(id)) => self.store.project_fetch(id).await.ok().map(|p| p.name),
            (None, None) => None,
        };
        Ok(Invite {
            id: InviteId(i.id),
            state: invite_state(&i, Utc::now()),
            project: project
                .map(|n| Name::parse(&n))
                .transpose()
                .map_err(AppError::internal)?,
            project_id: i.project_id.map(ProjectId),
            role: parse_role(&i.role)?,
            created_by: i.created_by,
            created_at: i.created_at,
            expires_at: i.expires_at,
            used_at: i.used_at,
            used_by: i.used_by.map(UserId),
        })
    }
}
