//! Projects, their quotas and usage, and their members.

use crate::*;

impl DataStore {
    // ---------- projects and members ----------

    /// Inserts a project and its first owner in one transaction.
    pub async fn project_insert(
        &self,
        p: project::Model,
        owner: Option<Uuid>,
    ) -> Result<project::Model> {
        if self.project_fetch_by_name(&p.name).await?.is_some() {
            return Err(StoreError::Conflict(format!(
                "project {} already exists",
                p.name
            )));
        }
        let tx = self.begin_write().await?;
        // The next free network index. Two replicas making projects at
        // once can pick the same one: the unique index refuses the second,
        // which is a conflict the caller may retry.
        let last: Option<Option<i64>> = project::Entity::find()
            .select_only()
            .column_as(project::Column::NetworkIndex.max(), "m")
            .into_tuple()
            .one(&tx)
            .await?;
        let mut p = p;
        p.network_index = Some(last.flatten().map_or(0, |m| m + 1));
        let p = p
            .into_active_model()
            .insert(&tx)
            .await
            .map_err(unique_conflict("project"))?;
        if let Some(owner) = owner {
            member::Model {
                project_id: p.id,
                user_id: owner,
                role: "owner".into(),
            }
            .into_active_model()
            .insert(&tx)
            .await?;
        }
        tx.commit().await?;
        Ok(p)
    }

    pub async fn project_fetch(&self, id: Uuid) -> Result<project::Model> {
        project::Entity::find_by_id(id)
            .one(&self.db)
            .await?
            .ok_or(StoreError::NotFound)
    }

    pub async fn project_fetch_by_name(&self, name: &str) -> Result<Option<project::Model>> {
        Ok(project::Entity::find()
            .filter(project::Column::Name.eq(name))
            .one(&self.db)
            .await?)
    }

    /// Projects, all of them or those of `ids`.
    pub async fn project_list(&self, ids: Option<&[Uuid]>) -> Result<Vec<project::Model>> {
        let mut q = project::Entity::find().order_by_asc(project::Column::Name);
        if let Some(ids) = ids {
            q = q.filter(project::Column::Id.is_in(ids.iter().copied()));
        }
        Ok(q.all(&self.db).await?)
    }

    pub async fn project_update_quota(&self, id: Uuid, q: [i64; 5]) -> Result<project::Model> {
        let mut p = self.project_fetch(id).await?.into_active_model();
        p.max_vms = Set(q[0]);
        p.max_vcpus = Set(q[1]);
        p.max_memory_mib = Set(q[2]);
        p.max_disk_gib = Set(q[3]);
        p.max_concurrent_runs = Set(q[4]);
        Ok(p.update(&self.db).await?)
    }

    /// Deletes an empty project; a project with live VMs is a conflict.
    pub async fn project_delete(&self, id: Uuid) -> Result<()> {
        let _w = self.serialize().await;
        let tx = self.begin_write().await?;
        lock_project(&tx, id).await?;
        let live = vm::Entity::find()
            .filter(vm::Column::ProjectId.eq(id))
            .filter(vm::Column::DeletedAt.is_null())
            .count(&tx)
            .await?;
        if live > 0 {
            return Err(StoreError::Conflict(format!(
                "the project still has {live} VM(s); delete them first"
            )));
        }
        member::Entity::delete_many()
            .filter(member::Column::ProjectId.eq(id))
            .exec(&tx)
            .await?;
        invite::Entity::delete_many()
            .filter(invite::Column::ProjectId.eq(id))
            .exec(&tx)
            .await?;
        let res = project::Entity::delete_by_id(id).exec(&tx).await?;
        if res.rows_affected == 0 {
            return Err(StoreError::NotFound);
        }
        tx.commit().await?;
        Ok(())
    }

    /// What the project's live VMs hold, and its running runs: one
    /// statement.
    pub async fn project_usage<C: ConnectionTrait>(&self, c_: &C, id: Uuid) -> Result<UsageRow> {
        let backend = c_.get_database_backend();
        let at = |i: usize| match backend {
            sea_orm::DbBackend::Postgres => format!("${i}"),
            _ => "?".to_owned(),
        };
        // PostgreSQL sums BIGINT into NUMERIC; cast back on both.
        let sql = format!(
            "SELECT v.n AS vn, v.c AS vc, v.m AS vm, v.d AS vd, r.n AS rn, r.c AS rc, r.m AS rm FROM \
             (SELECT COUNT(id) AS n, CAST(SUM(vcpus) AS BIGINT) AS c, \
              CAST(SUM(memory_mib) AS BIGINT) AS m, CAST(SUM(disk_gib) AS BIGINT) AS d \
              FROM vms WHERE project_id = {} AND deleted_at IS NULL) AS v, \
             (SELECT COUNT(id) AS n, CAST(SUM(vcpus) AS BIGINT) AS c, \
              CAST(SUM(memory_mib) AS BIGINT) AS m \
              FROM runs WHERE project_id = {} AND state = 'running') AS r",
            at(1),
            at(2)
        );
        let row = c_
            .query_one_raw(sea_orm::Statement::from_sql_and_values(
                backend,
                sql,
                [id.into(), id.into()],
            ))
            .await?
            .ok_or(StoreError::NotFound)?;
        let get =
            |col: &str| -> Result<i64> { Ok(row.try_get::<Option<i64>>("", col)?.unwrap_or(0)) };
        Ok(UsageRow {
            vms: get("vn")?,
            // A run holds its vCPUs and memory while it runs.
            vcpus: get("vc")? + get("rc")?,
            memory_mib: get("vm")? + get("rm")?,
            disk_gib: get("vd")?,
            runs: get("rn")?,
        })
    }

    pub async fn usage(&self, id: Uuid) -> Result<UsageRow> {
        self.project_usage(&self.db, id).await
    }

    pub async fn member_role(&self, project_id: Uuid, user_id: Uuid) -> Result<Option<String>> {
        Ok(member::Entity::find_by_id((project_id, user_id))
            .one(&self.db)
            .await?
            .map(|m| m.role))
    }

    pub async fn member_list(&self, project_id: Uuid) -> Result<Vec<(member::Model, user::Model)>> {
        let members = member::Entity::find()
            .filter(member::Column::ProjectId.eq(project_id))
            .all(&self.db)
            .await?;
        let ids: Vec<Uuid> = members.iter().map(|m| m.user_id).collect();
        let users = user::Entity::find()
            .filter(user::Column::Id.is_in(ids))
            .all(&self.db)
            .await?;
        let mut out: Vec<_> = members
            .into_iter()
            .filter_map(|m| {
                users
                    .iter()
                    .find(|u| u.id == m.user_id)
                    .cloned()
                    .map(|u| (m, u))
            })
            .collect();
        out.sort_by(|a, b| a.1.name.cmp(&b.1.name));
        Ok(out)
    }

    pub async fn member_set(&self, project_id: Uuid, user_id: Uuid, role: &str) -> Result<()> {
        let row = member::ActiveModel {
            project_id: Set(project_id),
            user_id: Set(user_id),
            role: Set(role.to_owned()),
        };
        member::Entity::insert(row)
            .on_conflict(
                OnConflict::columns([member::Column::ProjectId, member::Column::UserId])
                    .update_column(member::Column::Role)
                    .to_owned(),
            )
            .exec(&self.db)
            .await?;
        Ok(())
    }

    pub async fn member_delete(&self, project_id: Uuid, user_id: Uuid) -> Result<()> {
        let res = member::Entity::delete_by_id((project_id, user_id))
            .exec(&self.db)
            .await?;
        if res.rows_affected == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    /// Every project the user belongs to, with the role.
    pub async fn memberships(&self, user_id: Uuid) -> Result<Vec<(project::Model, String)>> {
        let ms = member::Entity::find()
            .filter(member::Column::UserId.eq(user_id))
            .all(&self.db)
            .await?;
        let ids: Vec<Uuid> = ms.iter().map(|m| m.project_id).collect();
        let ps = self.project_list(Some(&ids)).await?;
        Ok(ps
            .into_iter()
            .filter_map(|p| {
                let role = ms.iter().find(|m| m.project_id == p.id)?.role.clone();
                Some((p, role))
            })
            .collect())
    }
}
