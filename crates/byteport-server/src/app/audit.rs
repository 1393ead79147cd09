//! The audit log: one event per mutating request (who, what, target,
//! result, when), readable by admins and by a project's owners.

use super::{App, Ctx};
use crate::error::{AppError, AppResult};
use byteport_store::audit;
use byteport_types::api::{AuditEvent, AuditQuery, Page, Role};
use byteport_types::{EventId, ProjectId};
use uuid::Uuid;

impl App {
    /// Records one event; failures are logged, never fail the request.
    pub async fn audit_record(&self, ctx: &Ctx, action: &str, status: u16, result: &str) {
        let note = ctx.note.lock().map(|n| n.clone()).unwrap_or_default();
        let (actor, actor_id) = match (&note.became, &ctx.actor) {
            (Some((name, id)), _) => (name.clone(), Some(id.0)),
            (None, super::Actor::User { id, .. }) => (ctx.actor.label(), Some(id.0)),
            (None, super::Actor::Node { id, .. }) => (ctx.actor.label(), Some(id.0)),
            (None, super::Actor::Anonymous) => (ctx.actor.label(), None),
        };
        let e = audit::Model {
            id: Uuid::now_v7(),
            at: chrono::Utc::now(),
            actor,
            actor_id,
            action: action.to_owned(),
            target_kind: note.target_kind.map(str::to_owned),
            target_id: note.target_id,
            project_id: note.project_id.map(|p| p.0),
            status: i32::from(status),
            result: result.to_owned(),
        };
        if let Err(e) = self.store.audit_insert(e).await {
            tracing::error!(error = %e, action, "could not write an audit event");
        }
    }

    /// Removes the audit events older than the retention; returns how many.
    pub async fn audit_expire(&self) -> AppResult<u64> {
        let Some(keep) = self.settings.audit_retention else {
            return Ok(0);
        };
        let keep = chrono::Duration::from_std(keep).map_err(crate::error::AppError::internal)?;
        Ok(self.store.audit_expire(chrono::Utc::now() - keep).await?)
    }

    pub async fn audit_list(&self, ctx: &Ctx, q: AuditQuery) -> AppResult<Page<AuditEvent>> {
        let (_, admin) = ctx.user()?;
        let project = match &q.project {
            Some(key) => Some(self.project_resolve(ctx, key, Role::Owner).await?.id),
            None if admin => None,
            None => {
                return Err(AppError::bad(
                    "missing_project",
                    "name a project: only admins read the whole audit log",
                ));
            }
        };
        let limit = q.limit.unwrap_or(100);
        if !(1..=500).contains(&limit) {
            return Err(AppError::bad(
                "invalid_limit",
                format!("limit is {limit}; it must be between 1 and 500"),
            ));
        }
        let before = match &q.cursor {
            Some(c) => Some(c.parse::<Uuid>().map_err(|_| {
                AppError::bad("invalid_cursor", "the cursor is not one this API returned")
            })?),
            None => None,
        };
        let rows = self
            .store
            .audit_list(project, before, u64::from(limit) + 1)
            .await?;
        let more = rows.len() > limit as usize;
        let items: Vec<AuditEvent> = rows
            .into_iter()
            .take(limit as usize)
            .map(|e| AuditEvent {
                id: EventId(e.id),
                at: e.at,
                actor: e.actor,
                action: e.action,
                target_kind: e.target_kind,
                target_id: e.target_id,
                project_id: e.project_id.map(ProjectId),
                status: u16::try_from(e.status).unwrap_or(0),
                result: e.result,
            })
            .collect();
        let next_cursor = if more {
            items.last().map(|e| e.id.to_string())
        } else {
            None
        };
        Ok(Page { items, next_cursor })
    }
}
