//! Run records: a run is inserted `running` when its project has room for
//! one more at once and for its vCPUs and memory (checked and written in one transaction, so replicas
//! never overbook a project), and written once more when it ends.

use crate::{DataStore, Result, StoreError, lock_project, project, run};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, EntityTrait, IntoActiveModel, QueryFilter, QueryOrder,
    QuerySelect,
};
use uuid::Uuid;

/// Which runs to list.
#[derive(Clone, Debug, Default)]
pub struct RunFilter {
    /// Only these projects; `None` means every project.
    pub projects: Option<Vec<Uuid>>,
    pub state: Option<String>,
    pub language: Option<String>,
    /// Runs older than this one (ids grow with time).
    pub before: Option<Uuid>,
    pub limit: u64,
}

impl DataStore {
    /// Inserts a run unless its project already runs its
    /// `max_concurrent_runs`, or the run's vCPUs or memory would take the
    /// project (its VMs and running runs) past its quota; then a quota
    /// error names the limit.
    pub async fn run_insert(&self, r: run::Model) -> Result<run::Model> {
        let _w = self.serialize().await;
        let tx = self.begin_write().await?;
        lock_project(&tx, r.project_id).await?;
        let p = project::Entity::find_by_id(r.project_id)
            .one(&tx)
            .await?
            .ok_or(StoreError::NotFound)?;
        let used = self.project_usage(&tx, p.id).await?;
        let checks: [(&'static str, i64, i64, i64); 3] = [
            ("max_concurrent_runs", p.max_concurrent_runs, used.runs, 1),
            ("max_vcpus", p.max_vcpus, used.vcpus, r.vcpus),
            (
                "max_memory_mib",
                p.max_memory_mib,
                used.memory_mib,
                r.memory_mib,
            ),
        ];
        for (quota, limit, used, requested) in checks {
            if used + requested > limit {
                return Err(StoreError::QuotaExceeded {
                    quota,
                    limit: limit.max(0) as u64,
                    used: used.max(0) as u64,
                    requested: requested.max(0) as u64,
                });
            }
        }
        let r = r.into_active_model().insert(&tx).await?;
        tx.commit().await?;
        Ok(r)
    }

    /// Writes how a run ended (only a run still `running`).
    pub async fn run_finish(&self, r: run::Model) -> Result<run::Model> {
        let current = self.run_fetch(r.id).await?;
        if current.state != "running" {
            return Ok(current);
        }
        let mut a = current.into_active_model();
        a.state = sea_orm::Set(r.state);
        a.exit_code = sea_orm::Set(r.exit_code);
        a.signal = sea_orm::Set(r.signal);
        a.message = sea_orm::Set(r.message);
        a.node_id = sea_orm::Set(r.node_id);
        a.timings = sea_orm::Set(r.timings);
        a.stdout = sea_orm::Set(r.stdout);
        a.stderr = sea_orm::Set(r.stderr);
        a.output_truncated = sea_orm::Set(r.output_truncated);
        a.ended_at = sea_orm::Set(r.ended_at);
        Ok(a.update(&self.db).await?)
    }

    pub async fn run_fetch(&self, id: Uuid) -> Result<run::Model> {
        run::Entity::find_by_id(id)
            .one(&self.db)
            .await?
            .ok_or(StoreError::NotFound)
    }

    /// Runs, newest first.
    pub async fn run_list(&self, f: &RunFilter) -> Result<Vec<run::Model>> {
        let mut q = run::Entity::find()
            .order_by_desc(run::Column::Id)
            .limit(f.limit);
        if let Some(ps) = &f.projects {
            q = q.filter(run::Column::ProjectId.is_in(ps.iter().copied()));
        }
        if let Some(s) = &f.state {
            q = q.filter(run::Column::State.eq(s.clone()));
        }
        if let Some(l) = &f.language {
            q = q.filter(run::Column::Language.eq(l.clone()));
        }
        if let Some(b) = f.before {
            q = q.filter(run::Column::Id.lt(b));
        }
        Ok(q.all(&self.db).await?)
    }

    /// Marks runs left `running` by a control plane that went away as
    /// failed; returns how many.
    pub async fn run_fail_stale(&self, before: chrono::DateTime<chrono::Utc>) -> Result<u64> {
        use sea_orm::sea_query::Expr;
        let res = run::Entity::update_many()
            .col_expr(run::Column::State, Expr::value("failed"))
            .col_expr(
                run::Column::Message,
                Expr::value("the control plane serving the run went away"),
            )
            .col_expr(run::Column::EndedAt, Expr::value(chrono::Utc::now()))
            .filter(run::Column::State.eq("running"))
            .filter(run::Column::CreatedAt.lt(before))
            .exec(&self.db)
            .await?;
        Ok(res.rows_affected)
    }
}
