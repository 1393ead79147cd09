//! Change feeds for event streams: which VMs changed lately. The stream
//! polls these (every replica writes `updated_at`), so a change made by any
//! control-plane replica on the same database is seen by every stream.

use crate::{DataStore, Result, vm};
use chrono::{DateTime, Utc};
use sea_orm::{ColumnTrait, Condition, EntityTrait, QueryFilter, QueryOrder, QuerySelect};
use uuid::Uuid;

impl DataStore {
    /// VMs (deleted ones included) whose record changed after `after` (a
    /// change time and, among the VMs changed at that very time, an id), in
    /// the given projects (`None`: every project), in (change, id) order, at
    /// most `limit`.
    pub async fn vm_list_changed(
        &self,
        projects: Option<&[Uuid]>,
        after: (DateTime<Utc>, Uuid),
        limit: u64,
    ) -> Result<Vec<vm::Model>> {
        // Keyset order: a burst of more rows than `limit` with one
        // timestamp is read page by page, never the same page again.
        let (at, id) = after;
        let mut q = vm::Entity::find()
            .filter(
                Condition::any().add(vm::Column::UpdatedAt.gt(at)).add(
                    Condition::all()
                        .add(vm::Column::UpdatedAt.eq(at))
                        .add(vm::Column::Id.gt(id)),
                ),
            )
            .order_by_asc(vm::Column::UpdatedAt)
            .order_by_asc(vm::Column::Id)
            .limit(limit);
        if let Some(ps) = projects {
            q = q.filter(vm::Column::ProjectId.is_in(ps.iter().copied()));
        }
        Ok(q.all(&self.db).await?)
    }

    /// Live (not deleted) VMs by state, in the given projects (`None`:
    /// every project).
    pub async fn vm_count_by_state_in(
        &self,
        projects: Option<&[Uuid]>,
    ) -> Result<Vec<(String, i64)>> {
        let mut q = vm::Entity::find()
            .select_only()
            .column(vm::Column::State)
            .column_as(vm::Column::Id.count(), "n")
            .filter(vm::Column::DeletedAt.is_null())
            .group_by(vm::Column::State);
        if let Some(ps) = projects {
            q = q.filter(vm::Column::ProjectId.is_in(ps.iter().copied()));
        }
        Ok(q.into_tuple().all(&self.db).await?)
    }
}
