//! Environments: their records, the VMs made for them, and the changes a
//! live one takes (its lifetime, every VM's ports and outbound policy).
//! The environment and its VMs are inserted together by `vms_insert`.

use crate::{DataStore, Result, StoreError, environment, vm};
use chrono::{DateTime, Utc};
use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder};
use uuid::Uuid;

impl DataStore {
    pub async fn env_fetch(&self, id: Uuid) -> Result<environment::Model> {
        environment::Entity::find_by_id(id)
            .one(&self.db)
            .await?
            .ok_or(StoreError::NotFound)
    }

    /// The live environment of that name in the project.
    pub async fn env_fetch_by_name(
        &self,
        project_id: Uuid,
        name: &str,
    ) -> Result<Option<environment::Model>> {
        Ok(environment::Entity::find()
            .filter(environment::Column::ProjectId.eq(project_id))
            .filter(environment::Column::Name.eq(name))
            .filter(environment::Column::DeletedAt.is_null())
            .one(&self.db)
            .await?)
    }

    /// Live environments of these projects, oldest first.
    pub async fn env_list(&self, projects: &[Uuid]) -> Result<Vec<environment::Model>> {
        Ok(environment::Entity::find()
            .filter(environment::Column::ProjectId.is_in(projects.iter().copied()))
            .filter(environment::Column::DeletedAt.is_null())
            .order_by_asc(environment::Column::Id)
            .all(&self.db)
            .await?)
    }

    /// Live environments whose lifetime ended before `now`.
    pub async fn env_expired(&self, now: DateTime<Utc>) -> Result<Vec<environment::Model>> {
        Ok(environment::Entity::find()
            .filter(environment::Column::DeletedAt.is_null())
            .filter(environment::Column::ExpiresAt.lt(now))
            .all(&self.db)
            .await?)
    }

    /// Marks an environment deleted; false if it already was (another
    /// request or replica got there first).
    pub async fn env_mark_deleted(&self, id: Uuid, now: DateTime<Utc>) -> Result<bool> {
        let r = environment::Entity::update_many()
            .col_expr(environment::Column::DeletedAt, Expr::value(now))
            .filter(environment::Column::Id.eq(id))
            .filter(environment::Column::DeletedAt.is_null())
            .exec(&self.db)
            .await?;
        Ok(r.rows_affected == 1)
    }

    /// The VMs made for an environment (deleted ones too), in creation order.
    pub async fn env_vms(&self, id: Uuid) -> Result<Vec<vm::Model>> {
        Ok(vm::Entity::find()
            .filter(vm::Column::EnvironmentId.eq(id))
            .order_by_asc(vm::Column::Id)
            .all(&self.db)
            .await?)
    }

    /// Sets when a live environment expires (`None`: never); false when
    /// it is deleted or being deleted.
    pub async fn env_set_expiry(&self, id: Uuid, at: Option<DateTime<Utc>>) -> Result<bool> {
        let r = environment::Entity::update_many()
            .col_expr(environment::Column::ExpiresAt, Expr::value(at))
            .filter(environment::Column::Id.eq(id))
            .filter(environment::Column::DeletedAt.is_null())
            .exec(&self.db)
            .await?;
        Ok(r.rows_affected == 1)
    }

    /// Gives these VMs new guest ports (a JSON array) and outbound policy,
    /// in one statement; each takes them when it next starts.
    pub async fn vms_set_network(
        &self,
        ids: &[Uuid],
        guest_ports: &str,
        egress: &str,
    ) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        vm::Entity::update_many()
            .col_expr(vm::Column::GuestPorts, Expr::value(guest_ports))
            .col_expr(vm::Column::Egress, Expr::value(egress))
            .col_expr(vm::Column::UpdatedAt, Expr::value(chrono::Utc::now()))
            .filter(vm::Column::Id.is_in(ids.iter().copied()))
            .filter(vm::Column::DeletedAt.is_null())
            .exec(&self.db)
            .await?;
        Ok(())
    }
}
