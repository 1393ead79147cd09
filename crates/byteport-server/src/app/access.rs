//! Who may see what, kept per replica so that a request costs no
//! database read to learn it: a user's role in a project, the projects
//! they see, and project names.
//!
//! Every change of memberships made through this replica (a member set
//! or removed, a project made or deleted, a user deleted) clears the
//! roles and the visible projects at once; another replica's change
//! takes effect here within the token cache's time to live (5 s), as for
//! a revoked token. Names are kept without expiry: a project's name never
//! changes, and a deleted project has no VMs left to be named.

use super::auth::TtlCache;
use super::{App, Ctx};
use crate::error::{AppError, AppResult};
use byteport_types::ProjectId;
use byteport_types::api::Role;
use std::collections::HashMap;
use std::sync::Mutex;
use uuid::Uuid;

/// At most this many names are kept; the map starts over beyond it.
const MAX_NAMES: usize = 10_000;

#[derive(Default)]
pub(crate) struct AccessCache {
    /// (user, project) → the role, `None` for no membership.
    roles: TtlCache<(Uuid, Uuid), Option<Role>>,
    /// user → the projects they are a member of.
    visible: TtlCache<Uuid, Vec<Uuid>>,
    names: Mutex<HashMap<Uuid, String>>,
}

impl AccessCache {
    /// Forgets every role and visible set (names stay right).
    pub(crate) fn memberships_changed(&self) {
        self.roles.clear_all();
        self.visible.clear_all();
    }
}

impl App {
    /// A user's role in a project, from the cache or one read.
    pub(crate) async fn member_role(&self, user: Uuid, project: Uuid) -> AppResult<Option<Role>> {
        if let Some(r) = self.access.roles.get(&(user, project)) {
            return Ok(r);
        }
        let role = match self.store.member_role(project, user).await? {
            Some(r) => Some(r.parse::<Role>().map_err(AppError::internal)?),
            None => None,
        };
        self.access.roles.put((user, project), role);
        Ok(role)
    }

    /// The projects the calling user sees: `None` for an admin (every
    /// project), else the ones they are a member of.
    pub(crate) async fn visible_project_ids(&self, ctx: &Ctx) -> AppResult<Option<Vec<Uuid>>> {
        let (me, admin) = ctx.user()?;
        if admin {
            return Ok(None);
        }
        if let Some(v) = self.access.visible.get(&me.0) {
            return Ok(Some(v));
        }
        let ids: Vec<Uuid> = self
            .store
            .memberships(me.0)
            .await?
            .into_iter()
            .map(|(p, _)| p.id)
            .collect();
        self.access.visible.put(me.0, ids.clone());
        Ok(Some(ids))
    }

    /// The projects the calling user sees, with their names: every project
    /// for an admin (`None` as the filter: no restriction), else the ones
    /// they are a member of, from the caches.
    pub(crate) async fn visible_projects(
        &self,
        ctx: &Ctx,
    ) -> AppResult<(Option<Vec<Uuid>>, std::collections::BTreeMap<Uuid, String>)> {
        let Some(ids) = self.visible_project_ids(ctx).await? else {
            let names = self
                .store
                .project_list(None)
                .await?
                .into_iter()
                .map(|p| (p.id, p.name))
                .collect();
            return Ok((None, names));
        };
        let mut names = std::collections::BTreeMap::new();
        for id in ids {
            match self.project_name(ProjectId(id)).await {
                Ok(n) => {
                    names.insert(id, n);
                }
                // Deleted since another replica's cache was filled.
                Err(AppError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok((Some(names.keys().copied().collect()), names))
    }

    /// A project's name, from the cache or one read.
    pub(crate) async fn project_name(&self, id: ProjectId) -> AppResult<String> {
        if let Some(n) = self
            .access
            .names
            .lock()
            .ok()
            .and_then(|m| m.get(&id.0).cloned())
        {
            return Ok(n);
        }
        let p = self.store.project_fetch(id.0).await?;
        if let Ok(mut m) = self.access.names.lock() {
            if m.len() >= MAX_NAMES {
                m.clear();
            }
            m.insert(p.id, p.name.clone());
        }
        Ok(p.name)
    }
}
