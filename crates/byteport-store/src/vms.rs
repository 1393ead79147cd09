//! VMs: inserting them under their project's quota, the list's narrow
//! rows and keyset pages, and the two writers of a VM's state (the
//! desired one, from the API, and the observed one, from its node).
//!
//! Every change to what the API shows of a VM moves its `updated_at`: the
//! event feed and the API's views of VMs both key on it.

use crate::{
    DataStore, Observation, Release, Result, StoreError, VmFilter, environment, fleet, on_unique,
    project, vm, vm_label,
};
use chrono::{DateTime, Utc};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, DbErr, EntityTrait, IntoActiveModel,
    PaginatorTrait, QueryFilter, QueryOrder, QuerySelect, QueryTrait,
};
use uuid::Uuid;

impl DataStore {
    /// Inserts a VM if the project's quota allows it, atomically: the usage
    /// is read and the row written in one transaction, with the project row
    /// locked on PostgreSQL and the writer lock held on SQLite.
    pub async fn vm_insert(&self, v: vm::Model, labels: &[(String, String)]) -> Result<vm::Model> {
        let mut made = self.vms_insert(None, vec![(v, labels.to_vec())]).await?;
        made.pop().ok_or(StoreError::NotFound)
    }

    /// Inserts VMs of one project, and the environment they form if one is
    /// given, in one transaction. The project's quota is checked for all of
    /// them together: either every VM is made or none is.
    pub async fn vms_insert(
        &self,
        env: Option<environment::Model>,
        vms: Vec<(vm::Model, Vec<(String, String)>)>,
    ) -> Result<Vec<vm::Model>> {
        let Some(project_id) = env
            .as_ref()
            .map(|e| e.project_id)
            .or_else(|| vms.first().map(|(v, _)| v.project_id))
        else {
            return Ok(Vec::new());
        };
        if vms.iter().any(|(v, _)| v.project_id != project_id) {
            return Err(StoreError::Conflict(
                "the VMs of one insert must share a project".into(),
            ));
        }
        let _w = self.serialize().await;
        let tx = self.begin_write().await?;
        // Read and locked in one statement (`FOR UPDATE` on PostgreSQL;
        // SQLite's transaction holds the one write lock already).
        let p = project::Entity::find_by_id(project_id)
            .lock_exclusive()
            .one(&tx)
            .await?
            .ok_or(StoreError::NotFound)?;
        let used = self.project_usage(&tx, p.id).await?;
        let sum = |f: fn(&vm::Model) -> i64| vms.iter().map(|(v, _)| f(v)).sum::<i64>();
        let checks: [(&'static str, i64, i64, i64); 4] = [
            ("max_vms", p.max_vms, used.vms, vms.len() as i64),
            ("max_vcpus", p.max_vcpus, used.vcpus, sum(|v| v.vcpus)),
            (
                "max_memory_mib",
                p.max_memory_mib,
                used.memory_mib,
                sum(|v| v.memory_mib),
            ),
            (
                "max_disk_gib",
                p.max_disk_gib,
                used.disk_gib,
                sum(|v| v.disk_gib),
            ),
        ];
        for (quota, limit, used, requested) in checks {
            if used + requested > limit {
                return Err(StoreError::QuotaExceeded {
                    quota,
                    limit: limit as u64,
                    used: used as u64,
                    requested: requested as u64,
                });
            }
        }
        if let Some(e) = env {
            let taken = environment::Entity::find()
                .filter(environment::Column::ProjectId.eq(project_id))
                .filter(environment::Column::Name.eq(e.name.clone()))
                .filter(environment::Column::DeletedAt.is_null())
                .count(&tx)
                .await?;
            if taken > 0 {
                return Err(StoreError::Conflict(format!(
                    "an environment named {} already exists in project {}",
                    e.name, p.name
                )));
            }
            e.into_active_model().insert(&tx).await?;
        }
        let mut made = Vec::with_capacity(vms.len());
        for (v, labels) in vms {
            // A live VM's name is unique in its project (an index says
            // so): a taken name fails the insert, and nothing is written.
            let name = v.name.clone();
            let v = v
                .into_active_model()
                .insert(&tx)
                .await
                .map_err(on_unique(|| {
                    format!("a VM named {name} already exists in project {}", p.name)
                }))?;
            for (k, val) in labels {
                vm_label::Model {
                    vm_id: v.id,
                    key: k,
                    value: val,
                }
                .into_active_model()
                .insert(&tx)
                .await?;
            }
            made.push(v);
        }
        tx.commit().await?;
        Ok(made)
    }

    /// A VM as the API shows it: [`DataStore::vm_list`]'s narrow row.
    pub async fn vm_fetch_narrow(&self, id: Uuid) -> Result<vm::Model> {
        vm_narrow()
            .filter(vm::Column::Id.eq(id))
            .one(&self.db)
            .await?
            .ok_or(StoreError::NotFound)
    }

    /// A VM's project and change time: what decides who may see it, and
    /// which view of it is current.
    pub async fn vm_version(&self, id: Uuid) -> Result<(Uuid, DateTime<Utc>)> {
        vm::Entity::find()
            .select_only()
            .column(vm::Column::ProjectId)
            .column(vm::Column::UpdatedAt)
            .filter(vm::Column::Id.eq(id))
            .into_tuple()
            .one(&self.db)
            .await?
            .ok_or(StoreError::NotFound)
    }

    pub async fn vm_fetch(&self, id: Uuid) -> Result<vm::Model> {
        vm::Entity::find_by_id(id)
            .one(&self.db)
            .await?
            .ok_or(StoreError::NotFound)
    }

    /// A page of the VM list: VMs in id order (ids are time-ordered), after
    /// the cursor, at most `limit`. Deleted VMs appear only when the state
    /// filter asks for them. Narrow: the user-data stays in the database
    /// (`user_data` is `Some("")` when the VM has some, so the API can say
    /// so) and so does the metadata token's hash (`None`).
    pub async fn vm_list(&self, f: &VmFilter) -> Result<Vec<vm::Model>> {
        Ok(page_of(vm_narrow(), f).all(&self.db).await?)
    }

    /// [`DataStore::vm_list`]'s page as each VM's id and change time
    /// (`updated_at`; `None` if unreadable), in id order. The database
    /// aggregates the page into one JSON text, so it crosses as one value
    /// whatever its length: the API fills the rows from views it keeps of
    /// each VM at each change, and reads only the ones it lacks
    /// ([`DataStore::vm_fetch_narrow_many`]).
    pub async fn vm_list_versions(
        &self,
        f: &VmFilter,
    ) -> Result<Vec<(Uuid, Option<DateTime<Utc>>)>> {
        let inner = page_of(
            vm::Entity::find()
                .select_only()
                .column(vm::Column::Id)
                .column(vm::Column::UpdatedAt),
            f,
        );
        let backend = self.db.get_database_backend();
        let inner = inner.build(backend);
        let sql = match backend {
            sea_orm::DbBackend::Postgres => format!(
                "SELECT CAST(json_agg(json_build_array(id, updated_at)) AS TEXT) AS page \
                 FROM ({}) AS page_rows",
                inner.sql
            ),
            // Ids are 16-byte blobs here.
            _ => format!(
                "SELECT json_group_array(json_array(\
                 CASE typeof(id) WHEN 'blob' THEN hex(id) ELSE id END, updated_at)) AS page \
                 FROM ({}) AS page_rows",
                inner.sql
            ),
        };
        let values = inner.values.map(|v| v.0).unwrap_or_default();
        let row = self
            .db
            .query_one_raw(sea_orm::Statement::from_sql_and_values(
                backend, sql, values,
            ))
            .await?;
        let text: Option<String> = match row {
            Some(r) => r.try_get("", "page")?,
            None => None,
        };
        let Some(text) = text else {
            return Ok(Vec::new());
        };
        // Ids and times hold nothing to unescape: borrowed, not copied.
        let pairs: Vec<(&str, Option<&str>)> = serde_json::from_str(&text)
            .map_err(|e| StoreError::Db(DbErr::Custom(format!("a page of VM ids: {e}"))))?;
        let mut page = Vec::with_capacity(pairs.len());
        for (id, at) in pairs {
            let id = Uuid::parse_str(id)
                .map_err(|e| StoreError::Db(DbErr::Custom(format!("a VM id {id}: {e}"))))?;
            page.push((id, at.and_then(parse_time)));
        }
        // Aggregates keep no order of their own.
        page.sort_by_key(|(id, _)| *id);
        Ok(page)
    }

    /// The narrow rows ([`DataStore::vm_list`]'s) of these VMs, in no
    /// particular order; one that is gone is left out.
    pub async fn vm_fetch_narrow_many(&self, ids: &[Uuid]) -> Result<Vec<vm::Model>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        Ok(vm_narrow()
            .filter(vm::Column::Id.is_in(ids.iter().copied()))
            .all(&self.db)
            .await?)
    }

    /// Applies an action's plan if nobody changed the VM's desired state
    /// since `seen_generation` was read (optimistic concurrency); the loser
    /// of a race gets a conflict and changes nothing.
    pub async fn vm_update_desired(
        &self,
        id: Uuid,
        seen_generation: i64,
        desired: &str,
        state: &str,
        deleted: bool,
    ) -> Result<vm::Model> {
        let now = Utc::now();
        let mut u = vm::Entity::update_many()
            .col_expr(vm::Column::DesiredState, Expr::value(desired))
            .col_expr(vm::Column::State, Expr::value(state))
            .col_expr(vm::Column::StateReason, Expr::value(Option::<String>::None))
            .col_expr(
                vm::Column::DesiredGeneration,
                Expr::value(seen_generation + 1),
            )
            .col_expr(vm::Column::UpdatedAt, Expr::value(now));
        if deleted {
            u = u.col_expr(vm::Column::DeletedAt, Expr::value(now));
        }
        let res = u
            .filter(vm::Column::Id.eq(id))
            .filter(vm::Column::DesiredGeneration.eq(seen_generation))
            .exec(&self.db)
            .await?;
        if res.rows_affected == 0 {
            return Err(StoreError::Conflict(
                "the VM changed while this request was served; retry".into(),
            ));
        }
        if deleted {
            vm_label::Entity::delete_many()
                .filter(vm_label::Column::VmId.eq(id))
                .exec(&self.db)
                .await?;
        }
        self.vm_fetch(id).await
    }

    /// Records a node's observation if it is newer than the stored one
    /// (`WHERE observed_generation < new`), and gives back what it
    /// releases of the VM's reservation, in one transaction: a crash
    /// between the two cannot leak a reservation. Returns whether it
    /// applied.
    pub async fn vm_update_observed(
        &self,
        id: Uuid,
        node_id: Uuid,
        o: &Observation<'_>,
    ) -> Result<bool> {
        let (observed, state, ports) = (o.observed, o.state, o.ports);
        let (generation, deleted, reason) = (o.generation, o.deleted, o.reason.clone());
        let now = Utc::now();
        let mut u = vm::Entity::update_many()
            .col_expr(vm::Column::ObservedState, Expr::value(observed))
            .col_expr(vm::Column::ObservedGeneration, Expr::value(generation))
            .col_expr(vm::Column::State, Expr::value(state))
            .col_expr(vm::Column::StateReason, Expr::value(reason))
            .col_expr(vm::Column::Ports, Expr::value(ports))
            .col_expr(vm::Column::UpdatedAt, Expr::value(now));
        if let Some(a) = o.agent_version {
            u = u.col_expr(vm::Column::AgentVersion, Expr::value(a));
        }
        if let Some(c) = o.cloud_init {
            u = u.col_expr(vm::Column::CloudInit, Expr::value(c));
        }
        if let Some(n) = &o.network {
            u = u.col_expr(vm::Column::Network, Expr::value(n.clone()));
        }
        if let Some(e) = o.execution {
            u = u.col_expr(vm::Column::Execution, Expr::value(e));
        }
        if deleted {
            u = u.col_expr(vm::Column::DeletedAt, Expr::value(now));
        }
        let u = u
            .filter(vm::Column::Id.eq(id))
            .filter(vm::Column::NodeId.eq(node_id))
            .filter(vm::Column::ObservedGeneration.lt(generation));
        if o.release == Release::Nothing {
            return Ok(u.exec(&self.db).await?.rows_affected == 1);
        }
        let _w = self.serialize().await;
        let tx = self.begin_write().await?;
        if u.exec(&tx).await?.rows_affected != 1 {
            tx.rollback().await?;
            return Ok(false);
        }
        fleet::release_on(&tx, id, o.release).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// The VMs a node should hold: placed there and not yet gone.
    pub async fn vm_list_for_node(&self, node_id: Uuid) -> Result<Vec<vm::Model>> {
        Ok(vm::Entity::find()
            .filter(vm::Column::NodeId.eq(node_id))
            .filter(vm::Column::State.ne("deleted"))
            .order_by_asc(vm::Column::Id)
            .all(&self.db)
            .await?)
    }

    /// What [`DataStore::vm_list_for_node`] would return, narrowed to each
    /// VM's id and change time (in id order): every write of a VM moves
    /// its `updated_at`, so while this says the same, so would the rows.
    /// One range read of an index, whatever the VMs' columns hold.
    pub async fn vm_versions_for_node(
        &self,
        node_id: Uuid,
    ) -> Result<Vec<(Uuid, chrono::DateTime<Utc>)>> {
        Ok(vm::Entity::find()
            .select_only()
            .column(vm::Column::Id)
            .column(vm::Column::UpdatedAt)
            .filter(vm::Column::NodeId.eq(node_id))
            // Written out, not bound, so that the partial index is used.
            .filter(Expr::cust("state <> 'deleted'"))
            .order_by_asc(vm::Column::Id)
            .into_tuple()
            .all(&self.db)
            .await?)
    }
}

/// The list's filters, order and limit on `q`.
fn page_of(q: sea_orm::Select<vm::Entity>, f: &VmFilter) -> sea_orm::Select<vm::Entity> {
    let mut q = q.order_by_asc(vm::Column::Id).limit(f.limit);
    if let Some(ps) = &f.projects {
        q = q.filter(vm::Column::ProjectId.is_in(ps.iter().copied()));
    }
    match &f.state {
        Some(s) => q = q.filter(vm::Column::State.eq(s.clone())),
        None => q = q.filter(vm::Column::DeletedAt.is_null()),
    }
    if let Some(n) = &f.name {
        q = q.filter(vm::Column::Name.eq(n.clone()));
    }
    if let Some(after) = f.after {
        q = q.filter(vm::Column::Id.gt(after));
    }
    if let Some((k, v)) = &f.label {
        let sub = sea_orm::sea_query::Query::select()
            .column(vm_label::Column::VmId)
            .from(vm_label::Entity)
            .and_where(vm_label::Column::Key.eq(k.clone()))
            .and_where(vm_label::Column::Value.eq(v.clone()))
            .to_owned();
        q = q.filter(vm::Column::Id.in_subquery(sub));
    }
    q
}

/// A change time as either database writes it into JSON: RFC 3339, or
/// SQLite's text with a space for the `T`.
fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    for fmt in ["%Y-%m-%d %H:%M:%S%.f%:z", "%Y-%m-%d %H:%M:%S%.f%#z"] {
        if let Ok(t) = DateTime::parse_from_str(s, fmt) {
            return Some(t.with_timezone(&Utc));
        }
    }
    chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f")
        .ok()
        .map(|n| n.and_utc())
}

/// VM rows without what the API never shows: the user-data (`Some("")`
/// when there is some) and the metadata token's hash (`None`).
pub(crate) fn vm_narrow() -> sea_orm::Select<vm::Entity> {
    use sea_orm::Iterable;
    let mut q = vm::Entity::find().select_only();
    for c in vm::Column::iter() {
        if !matches!(c, vm::Column::UserData | vm::Column::MetadataTokenHash) {
            q = q.column(c);
        }
    }
    q.column_as(
        Expr::cust("CASE WHEN user_data IS NULL THEN NULL ELSE '' END"),
        "user_data",
    )
    .column_as(Expr::value(Option::<String>::None), "metadata_token_hash")
}
