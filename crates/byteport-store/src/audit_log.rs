//! The audit log: one row per thing people (and nodes) did, newest first,
//! removed after the retention the operator chose.

use crate::{DataStore, Result, entities::audit};
use chrono::{DateTime, Utc};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, EntityTrait, IntoActiveModel, QueryFilter, QueryOrder,
    QuerySelect,
};
use uuid::Uuid;

impl DataStore {
    pub async fn audit_insert(&self, e: audit::Model) -> Result<()> {
        e.into_active_model().insert(&self.db).await?;
        Ok(())
    }

    /// Newest first; `before` is a cursor.
    pub async fn audit_list(
        &self,
        project: Option<Uuid>,
        before: Option<Uuid>,
        limit: u64,
    ) -> Result<Vec<audit::Model>> {
        let mut q = audit::Entity::find()
            .order_by_desc(audit::Column::Id)
            .limit(limit);
        if let Some(p) = project {
            q = q.filter(audit::Column::ProjectId.eq(p));
        }
        if let Some(b) = before {
            q = q.filter(audit::Column::Id.lt(b));
        }
        Ok(q.all(&self.db).await?)
    }

    /// Removes the events older than `before`; returns how many.
    pub async fn audit_expire(&self, before: DateTime<Utc>) -> Result<u64> {
        Ok(audit::Entity::delete_many()
            .filter(audit::Column::At.lt(before))
            .exec(&self.db)
            .await?
            .rows_affected)
    }
}
