//! User accounts: admins create and delete them; everyone can see
//! themselves and their memberships.

use super::auth::{hash_password, user_view};
use super::{App, Ctx};
use crate::error::{AppError, AppResult};
use byteport_store::user;
use byteport_types::api::{Membership, User, UserCreate, Whoami};
use byteport_types::{Name, ProjectId, UserId};
use chrono::Utc;
use uuid::Uuid;

impl App {
    pub async fn user_create(&self, ctx: &Ctx, req: UserCreate) -> AppResult<User> {
        ctx.admin()?;
        self.user_create_unchecked(ctx, req).await
    }

    /// Creates a user without an authorization check: for the local
    /// `byteportd admin create-user`, which holds the database itself.
    pub async fn user_create_unchecked(&self, ctx: &Ctx, req: UserCreate) -> AppResult<User> {
        let hash = hash_password(req.password).await?;
        let u = self
            .store
            .user_insert(user::Model {
                id: Uuid::now_v7(),
                name: req.name.to_string(),
                password_hash: hash,
                admin: req.admin,
                created_at: Utc::now(),
            })
            .await?;
        if u.admin {
            self.projects_adopt_default(u.id).await?;
        }
        ctx.target("user", u.id, None);
        user_view(&u)
    }

    pub async fn user_list(&self, ctx: &Ctx) -> AppResult<Vec<User>> {
        ctx.admin()?;
        self.store
            .user_list()
            .await?
            .iter()
            .map(user_view)
            .collect()
    }

    /// A user by name or id: admins see anyone, users only themselves.
    pub async fn user_show(&self, ctx: &Ctx, key: &str) -> AppResult<User> {
        let u = self.user_resolve(key).await?;
        let (me, admin) = ctx.user()?;
        if !admin && me.0 != u.id {
            return Err(AppError::not_found("user", key));
        }
        user_view(&u)
    }

    pub async fn user_delete(&self, ctx: &Ctx, key: &str) -> AppResult<()> {
        let me = ctx.admin()?;
        let u = self.user_resolve(key).await?;
        ctx.target("user", u.id, None);
        if u.id == me.0 {
            return Err(AppError::Conflict(
                "you cannot delete your own account".into(),
            ));
        }
        self.store.user_delete(u.id).await?;
        self.access.memberships_changed();
        self.token_cache_clear();
        Ok(())
    }

    pub async fn whoami(&self, ctx: &Ctx) -> AppResult<Whoami> {
        let (me, _) = ctx.user()?;
        let u = self
            .store
            .user_fetch(me.0)
            .await
            .map_err(|_| AppError::Unauthorized("this account no longer exists".into()))?;
        let memberships = self
            .store
            .memberships(me.0)
            .await?
            .into_iter()
            .map(|(p, role)| {
                Ok(Membership {
                    project: Name::parse(&p.name).map_err(AppError::internal)?,
                    project_id: ProjectId(p.id),
                    role: role.parse().map_err(AppError::internal)?,
                })
            })
            .collect::<AppResult<_>>()?;
        Ok(Whoami {
            user: user_view(&u)?,
            memberships,
        })
    }

    pub(crate) async fn user_resolve(&self, key: &str) -> AppResult<user::Model> {
        let found = match key.parse::<UserId>() {
            Ok(id) => self.store.user_fetch(id.0).await.ok(),
            Err(_) => self.store.user_fetch_by_name(key).await?,
        };
        found.ok_or_else(|| AppError::not_found("user", key))
    }

    /// Forgets what this replica knows of tokens and sessions: a user was
    /// deleted or changed.
    pub(crate) fn token_cache_clear(&self) {
        self.token_cache.clear_all();
        self.session_cache.clear_all();
    }
}
