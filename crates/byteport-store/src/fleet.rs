//! Placement bookkeeping and image files: which VMs wait for a node, the
//! one transaction that places a VM and reserves its size on the node, and
//! the release of that reservation when the VM is gone.

use crate::{DataStore, Release, Result, StoreError, image, node, vm};
use chrono::Utc;
use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect};
use std::collections::{BTreeMap, HashSet};
use uuid::Uuid;

/// A VM's size, as reserved on a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Size {
    pub vcpus: i64,
    pub memory_mib: i64,
    pub disk_gib: i64,
}

/// One placement to commit: the VM, its node, its size, and the node's
/// limit (capacity after overcommit) that the reservation must stay within.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlaceItem {
    pub vm_id: Uuid,
    pub node_id: Uuid,
    pub size: Size,
    pub limit: Size,
}

/// Rows per multi-row statement: far below either database's limit on
/// bound parameters.
const CHUNK: usize = 500;

/// The `n`th bound parameter (from 1), typed on PostgreSQL (a `VALUES`
/// list gives its parameters no type of its own); SQLite takes `$n` too.
fn param(backend: sea_orm::DbBackend, n: usize, ty: &str) -> String {
    match backend {
        sea_orm::DbBackend::Postgres => format!("CAST(${n} AS {ty})"),
        _ => format!("${n}"),
    }
}

/// The rows of a `VALUES` list, each a tuple of (value, PostgreSQL type):
/// the values are appended to `values` and numbered after those already
/// there.
fn values_list<const N: usize>(
    backend: sea_orm::DbBackend,
    values: &mut Vec<sea_orm::Value>,
    rows: impl Iterator<Item = [(sea_orm::Value, &'static str); N]>,
) -> String {
    let rows: Vec<String> = rows
        .map(|row| {
            let cells: Vec<String> = row
                .into_iter()
                .map(|(v, ty)| {
                    values.push(v);
                    param(backend, values.len(), ty)
                })
                .collect();
            format!("({})", cells.join(", "))
        })
        .collect();
    rows.join(", ")
}

impl DataStore {
    /// VMs that want to run and have no node yet, oldest first.
    pub async fn vm_list_unplaced(&self, limit: u64) -> Result<Vec<vm::Model>> {
        Ok(vm::Entity::find()
            .filter(vm::Column::NodeId.is_null())
            .filter(vm::Column::DeletedAt.is_null())
            .filter(vm::Column::DesiredState.eq("running"))
            .order_by_asc(vm::Column::Id)
            .limit(limit)
            .all(&self.db)
            .await?)
    }

    /// Places a VM on a node and reserves its size there, in one
    /// transaction: the node's row is updated only while the reservation
    /// stays within `limit` (its capacity after overcommit), and the VM's
    /// only while it is still unplaced. Returns `false`, changing nothing,
    /// when either lost a race.
    pub async fn vm_place(
        &self,
        vm_id: Uuid,
        node_id: Uuid,
        size: Size,
        limit: Size,
    ) -> Result<bool> {
        let landed = self
            .vm_place_many(&[PlaceItem {
                vm_id,
                node_id,
                size,
                limit,
            }])
            .await?;
        Ok(landed.first().copied().unwrap_or(false))
    }

    /// Commits many placements in one transaction (one commit, which is
    /// most of a placement's cost), each guarded as in [`DataStore::vm_place`]:
    /// one that lost its race changes nothing and is `false` in the answer,
    /// the others land. A batch costs the same few statements whatever its
    /// size: its nodes and its VMs are read and locked (`FOR UPDATE` on
    /// PostgreSQL, in id order, so concurrent batches cannot deadlock;
    /// SQLite's transaction holds the one write lock already), the fits
    /// are decided on those rows, then one multi-row `UPDATE ... FROM`
    /// places the VMs and one adds each node's share to its reservation.
    /// One or two placements (a create's) take two guarded statements each
    /// instead, which is fewer.
    pub async fn vm_place_many(&self, items: &[PlaceItem]) -> Result<Vec<bool>> {
        let mut landed = vec![false; items.len()];
        if items.is_empty() {
            return Ok(landed);
        }
        let _w = self.serialize().await;
        let tx = self.begin_write().await?;
        if items.len() <= 2 {
            let mut order: Vec<usize> = (0..items.len()).collect();
            order.sort_by_key(|&i| items[i].node_id);
            for i in order {
                landed[i] = place_one(&tx, items[i]).await?;
            }
            tx.commit().await?;
            return Ok(landed);
        }
        let mut node_ids: Vec<Uuid> = items.iter().map(|i| i.node_id).collect();
        node_ids.sort();
        node_ids.dedup();
        let mut vm_ids: Vec<Uuid> = items.iter().map(|i| i.vm_id).collect();
        vm_ids.sort();
        vm_ids.dedup();
        let mut nodes: BTreeMap<Uuid, Size> = BTreeMap::new();
        for ids in node_ids.chunks(CHUNK) {
            let rows: Vec<(Uuid, i64, i64, i64)> = node::Entity::find()
                .select_only()
                .column(node::Column::Id)
                .column(node::Column::ReservedVcpus)
                .column(node::Column::ReservedMemoryMib)
                .column(node::Column::ReservedDiskGib)
                .filter(node::Column::Id.is_in(ids.iter().copied()))
                .filter(node::Column::Status.eq("online"))
                .order_by_asc(node::Column::Id)
                .lock_exclusive()
                .into_tuple()
                .all(&tx)
                .await?;
            for (id, vcpus, memory_mib, disk_gib) in rows {
                nodes.insert(
                    id,
                    Size {
                        vcpus,
                        memory_mib,
                        disk_gib,
                    },
                );
            }
        }
        // The VMs that still wait: unplaced, live, wanted running.
        let mut waiting: HashSet<Uuid> = HashSet::new();
        for ids in vm_ids.chunks(CHUNK) {
            let rows: Vec<Uuid> = vm::Entity::find()
                .select_only()
                .column(vm::Column::Id)
                .filter(vm::Column::Id.is_in(ids.iter().copied()))
                .filter(vm::Column::NodeId.is_null())
                .filter(vm::Column::DeletedAt.is_null())
                .filter(vm::Column::DesiredState.eq("running"))
                .order_by_asc(vm::Column::Id)
                .lock_exclusive()
                .into_tuple()
                .all(&tx)
                .await?;
            waiting.extend(rows);
        }
        // Each node's VMs in the order given, each within its own limit
        // on what the node holds with the ones before it.
        let mut added: BTreeMap<Uuid, Size> = BTreeMap::new();
        let mut places: Vec<(Uuid, Uuid)> = Vec::new();
        for (i, it) in items.iter().enumerate() {
            let Some(held) = nodes.get_mut(&it.node_id) else {
                continue;
            };
            if !waiting.remove(&it.vm_id) {
                continue;
            }
            let after = held.plus(it.size);
            if after.vcpus > it.limit.vcpus
                || after.memory_mib > it.limit.memory_mib
                || after.disk_gib > it.limit.disk_gib
            {
                // Still waiting: a later item may name it with another node.
                waiting.insert(it.vm_id);
                continue;
            }
            *held = after;
            let a = added.entry(it.node_id).or_insert(Size::ZERO);
            *a = a.plus(it.size);
            places.push((it.vm_id, it.node_id));
            landed[i] = true;
        }
        let backend = tx.get_database_backend();
        let now = Utc::now();
        for chunk in places.chunks(CHUNK) {
            let mut values: Vec<sea_orm::Value> = vec![now.into()];
            let rows = values_list(
                backend,
                &mut values,
                chunk
                    .iter()
                    .map(|&(vm, node)| [(vm.into(), "UUID"), (node.into(), "UUID")]),
            );
            let sql = format!(
                "WITH p(vm, node) AS (VALUES {rows}) \
                 UPDATE vms SET node_id = p.node, reserved = TRUE, compute_held = TRUE, \
                 state = 'provisioning', state_reason = NULL, updated_at = {} \
                 FROM p WHERE vms.id = p.vm",
                param(backend, 1, "TIMESTAMPTZ"),
            );
            tx.execute_raw(sea_orm::Statement::from_sql_and_values(
                backend, sql, values,
            ))
            .await?;
        }
        let added: Vec<(Uuid, Size)> = added.into_iter().collect();
        for chunk in added.chunks(CHUNK) {
            let mut values: Vec<sea_orm::Value> = Vec::new();
            let rows = values_list(
                backend,
                &mut values,
                chunk.iter().map(|&(node, s)| {
                    [
                        (node.into(), "UUID"),
                        (s.vcpus.into(), "BIGINT"),
                        (s.memory_mib.into(), "BIGINT"),
                        (s.disk_gib.into(), "BIGINT"),
                    ]
                }),
            );
            let sql = format!(
                "WITH a(node, c, m, d) AS (VALUES {rows}) \
                 UPDATE nodes SET reserved_vcpus = reserved_vcpus + a.c, \
                 reserved_memory_mib = reserved_memory_mib + a.m, \
                 reserved_disk_gib = reserved_disk_gib + a.d \
                 FROM a WHERE nodes.id = a.node"
            );
            tx.execute_raw(sea_orm::Statement::from_sql_and_values(
                backend, sql, values,
            ))
            .await?;
        }
        tx.commit().await?;
        Ok(landed)
    }

    /// Says why a VM still waits for a node (shown as its state reason).
    pub async fn vm_set_pending_reason(&self, vm_id: Uuid, reason: &str) -> Result<()> {
        vm::Entity::update_many()
            .col_expr(
                vm::Column::StateReason,
                Expr::value(Some(reason.to_owned())),
            )
            .col_expr(vm::Column::UpdatedAt, Expr::value(Utc::now()))
            .filter(vm::Column::Id.eq(vm_id))
            .filter(vm::Column::NodeId.is_null())
            .filter(vm::Column::State.eq("pending"))
            .exec(&self.db)
            .await?;
        Ok(())
    }

    /// Returns a deleted VM's reservation (its disk, and its vCPUs and
    /// memory if it still held them) to its node, once.
    pub async fn vm_release(&self, vm_id: Uuid) -> Result<bool> {
        self.release(vm_id, Release::All).await
    }

    /// A stopped VM gives its vCPUs and memory back (its disk stays
    /// reserved), once.
    pub async fn vm_release_compute(&self, vm_id: Uuid) -> Result<bool> {
        self.release(vm_id, Release::Compute).await
    }

    async fn release(&self, vm_id: Uuid, what: Release) -> Result<bool> {
        let _w = self.serialize().await;
        let tx = self.begin_write().await?;
        let done = release_on(&tx, vm_id, what).await?;
        tx.commit().await?;
        Ok(done)
    }

    /// Recounts every node's reservations from the VMs placed on it (the
    /// disk of each VM that holds its reservation, vCPUs and memory of each
    /// that holds its compute) and writes the true figures where they
    /// drifted; returns the nodes repaired with (was, is).
    pub async fn node_recount_reservations(&self) -> Result<Vec<(Uuid, Size, Size)>> {
        let _w = self.serialize().await;
        let mut repaired = Vec::new();
        for n in node::Entity::find().all(&self.db).await? {
            let tx = self.begin_write().await?;
            // The node's row first: a reservation being shifted in another
            // transaction is either committed before this reads the VMs,
            // or shifts the figure written here after.
            crate::lock_node(&tx, n.id).await?;
            let Some(n) = node::Entity::find_by_id(n.id).one(&tx).await? else {
                tx.rollback().await?;
                continue;
            };
            let vms = vm::Entity::find()
                .filter(vm::Column::NodeId.eq(n.id))
                .filter(vm::Column::Reserved.eq(true))
                .all(&tx)
                .await?;
            let is = vms.iter().fold(
                Size {
                    vcpus: 0,
                    memory_mib: 0,
                    disk_gib: 0,
                },
                |s, v| Size {
                    vcpus: s.vcpus + if v.compute_held { v.vcpus } else { 0 },
                    memory_mib: s.memory_mib + if v.compute_held { v.memory_mib } else { 0 },
                    disk_gib: s.disk_gib + v.disk_gib,
                },
            );
            let was = Size {
                vcpus: n.reserved_vcpus,
                memory_mib: n.reserved_memory_mib,
                disk_gib: n.reserved_disk_gib,
            };
            if was == is {
                tx.rollback().await?;
                continue;
            }
            node::Entity::update_many()
                .col_expr(node::Column::ReservedVcpus, Expr::value(is.vcpus))
                .col_expr(node::Column::ReservedMemoryMib, Expr::value(is.memory_mib))
                .col_expr(node::Column::ReservedDiskGib, Expr::value(is.disk_gib))
                .filter(node::Column::Id.eq(n.id))
                .exec(&tx)
                .await?;
            tx.commit().await?;
            repaired.push((n.id, was, is));
        }
        Ok(repaired)
    }

    /// Takes a stopped VM's vCPUs and memory back on its node before it
    /// starts, if they fit within `limit`; `false`, changing nothing, if
    /// not.
    pub async fn vm_reserve_compute(&self, vm_id: Uuid, limit: Size) -> Result<bool> {
        let _w = self.serialize().await;
        let tx = self.begin_write().await?;
        let Some(v) = vm::Entity::find_by_id(vm_id).one(&tx).await? else {
            return Err(StoreError::NotFound);
        };
        let Some(node_id) = v.node_id else {
            return Ok(false);
        };
        if v.compute_held {
            return Ok(true);
        }
        let compute = Size {
            vcpus: v.vcpus,
            memory_mib: v.memory_mib,
            disk_gib: 0,
        };
        // The disk stayed reserved while the VM was stopped: not checked.
        let within = Size {
            disk_gib: i64::MAX,
            ..limit
        };
        if !shift_reserved(&tx, node_id, compute, Some(within), false).await? {
            tx.rollback().await?;
            return Ok(false);
        }
        vm::Entity::update_many()
            .col_expr(vm::Column::ComputeHeld, Expr::value(true))
            .filter(vm::Column::Id.eq(vm_id))
            .exec(&tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    pub async fn image_fetch(&self, id: Uuid) -> Result<image::Model> {
        image::Entity::find_by_id(id)
            .one(&self.db)
            .await?
            .ok_or(StoreError::NotFound)
    }

    /// The images with these ids (those that exist), in one query.
    pub async fn images_by_ids(&self, ids: &[Uuid]) -> Result<Vec<image::Model>> {
        Ok(image::Entity::find()
            .filter(image::Column::Id.is_in(ids.iter().copied()))
            .all(&self.db)
            .await?)
    }

    pub async fn image_set_status(&self, id: Uuid, status: &str) -> Result<()> {
        image::Entity::update_many()
            .col_expr(image::Column::Status, Expr::value(status))
            .filter(image::Column::Id.eq(id))
            .exec(&self.db)
            .await?;
        Ok(())
    }

    /// Whether some image names a file with this sha256.
    pub async fn image_file_known(&self, sha256: &str) -> Result<bool> {
        let n = image::Entity::find()
            .filter(
                image::Column::Sha256
                    .eq(sha256)
                    .or(image::Column::KernelSha256.eq(sha256))
                    .or(image::Column::InitrdSha256.eq(sha256)),
            )
            .limit(1)
            .all(&self.db)
            .await?;
        Ok(!n.is_empty())
    }
}

impl DataStore {
    /// Marks `offline` every online or cordoned node whose last heartbeat
    /// is older than `before`, and shows its live VMs as `unknown`.
    /// Returns the nodes that went offline.
    pub async fn node_mark_stale(&self, before: chrono::DateTime<Utc>) -> Result<Vec<Uuid>> {
        let stale: Vec<Uuid> = node::Entity::find()
            .filter(node::Column::Status.ne("offline"))
            .filter(node::Column::LastHeartbeatAt.lt(before))
            .all(&self.db)
            .await?
            .into_iter()
            .map(|n| n.id)
            .collect();
        for id in &stale {
            let _w = self.serialize().await;
            let tx = self.begin_write().await?;
            node::Entity::update_many()
                .col_expr(node::Column::Status, Expr::value("offline"))
                .filter(node::Column::Id.eq(*id))
                .filter(node::Column::LastHeartbeatAt.lt(before))
                .exec(&tx)
                .await?;
            vm::Entity::update_many()
                .col_expr(vm::Column::State, Expr::value("unknown"))
                .col_expr(
                    vm::Column::StateReason,
                    Expr::value(Some("its node stopped sending heartbeats".to_owned())),
                )
                .col_expr(vm::Column::UpdatedAt, Expr::value(Utc::now()))
                .filter(vm::Column::NodeId.eq(*id))
                .filter(vm::Column::DeletedAt.is_null())
                .filter(vm::Column::State.is_not_in(["deleted", "pending"]))
                .exec(&tx)
                .await?;
            tx.commit().await?;
        }
        Ok(stale)
    }

    /// A VM's state and reason set directly, for a VM whose node came back
    /// (its last report is re-read rather than waiting for a newer one).
    pub async fn vm_set_state(&self, id: Uuid, state: &str, reason: Option<String>) -> Result<()> {
        vm::Entity::update_many()
            .col_expr(vm::Column::State, Expr::value(state))
            .col_expr(vm::Column::StateReason, Expr::value(reason))
            .col_expr(vm::Column::UpdatedAt, Expr::value(Utc::now()))
            .filter(vm::Column::Id.eq(id))
            .filter(vm::Column::State.eq("unknown"))
            .exec(&self.db)
            .await?;
        Ok(())
    }
}

impl DataStore {
    /// Sets a node's admin status: `cordoned` (no new placements) or back
    /// to `online`. An offline node stays offline until it heartbeats; it
    /// becomes online or cordoned then.
    pub async fn node_set_cordon(&self, id: Uuid, cordoned: bool) -> Result<node::Model> {
        let (from, to) = if cordoned {
            ("online", "cordoned")
        } else {
            ("cordoned", "online")
        };
        node::Entity::update_many()
            .col_expr(node::Column::Status, Expr::value(to))
            .filter(node::Column::Id.eq(id))
            .filter(node::Column::Status.eq(from))
            .exec(&self.db)
            .await?;
        let n = node::Entity::find_by_id(id)
            .one(&self.db)
            .await?
            .ok_or(StoreError::NotFound)?;
        Ok(n)
    }

    /// Removes a node that holds no VM (not even a stopped one).
    pub async fn node_remove(&self, id: Uuid) -> Result<()> {
        let _w = self.serialize().await;
        let tx = self.begin_write().await?;
        let held = vm::Entity::find()
            .filter(vm::Column::NodeId.eq(id))
            .filter(vm::Column::DeletedAt.is_null())
            .all(&tx)
            .await?
            .len();
        if held > 0 {
            return Err(StoreError::Conflict(format!(
                "the node still holds {held} VM(s); drain it and delete them first"
            )));
        }
        let r = node::Entity::delete_by_id(id).exec(&tx).await?;
        if r.rows_affected == 0 {
            return Err(StoreError::NotFound);
        }
        tx.commit().await?;
        Ok(())
    }
}

impl DataStore {
    /// The nodes that hold a live VM of this anti-affinity group.
    pub async fn nodes_of_group(&self, project: Uuid, group: &str) -> Result<Vec<Uuid>> {
        Ok(vm::Entity::find()
            .filter(vm::Column::ProjectId.eq(project))
            .filter(vm::Column::PlacementGroup.eq(group))
            .filter(vm::Column::DeletedAt.is_null())
            .filter(vm::Column::NodeId.is_not_null())
            .all(&self.db)
            .await?
            .into_iter()
            .filter_map(|v| v.node_id)
            .collect())
    }
}

/// One placement, guarded: the node's reservation grows only within the
/// item's limit, and the VM is placed only while it still waits; if the
/// VM was placed or deleted meanwhile, the room is given back.
async fn place_one<C: ConnectionTrait>(c: &C, it: PlaceItem) -> Result<bool> {
    if !shift_reserved(c, it.node_id, it.size, Some(it.limit), true).await? {
        return Ok(false);
    }
    let v = vm::Entity::update_many()
        .col_expr(vm::Column::NodeId, Expr::value(Some(it.node_id)))
        .col_expr(vm::Column::Reserved, Expr::value(true))
        .col_expr(vm::Column::ComputeHeld, Expr::value(true))
        .col_expr(vm::Column::State, Expr::value("provisioning"))
        .col_expr(vm::Column::StateReason, Expr::value(Option::<String>::None))
        .col_expr(vm::Column::UpdatedAt, Expr::value(Utc::now()))
        .filter(vm::Column::Id.eq(it.vm_id))
        .filter(vm::Column::NodeId.is_null())
        .filter(vm::Column::DeletedAt.is_null())
        .filter(vm::Column::DesiredState.eq("running"))
        .exec(c)
        .await?;
    if v.rows_affected == 1 {
        return Ok(true);
    }
    shift_reserved(c, it.node_id, it.size.negated(), None, false).await?;
    Ok(false)
}

/// Adds `delta` to a node's reserved columns (negative amounts give back),
/// in one guarded UPDATE: only an `online` node when `online_only`, and only
/// while every column stays within `within` when given. Returns whether the
/// node's row changed.
async fn shift_reserved<C: ConnectionTrait>(
    c: &C,
    node_id: Uuid,
    delta: Size,
    within: Option<Size>,
    online_only: bool,
) -> Result<bool> {
    let cols = [
        (node::Column::ReservedVcpus, delta.vcpus),
        (node::Column::ReservedMemoryMib, delta.memory_mib),
        (node::Column::ReservedDiskGib, delta.disk_gib),
    ];
    let mut u = node::Entity::update_many().filter(node::Column::Id.eq(node_id));
    for (col, d) in cols {
        u = u.col_expr(col, Expr::col(col).add(d));
    }
    if online_only {
        u = u.filter(node::Column::Status.eq("online"));
    }
    if let Some(w) = within {
        for ((col, d), max) in cols.into_iter().zip([w.vcpus, w.memory_mib, w.disk_gib]) {
            u = u.filter(Expr::col(col).add(d).lte(max));
        }
    }
    Ok(u.exec(c).await?.rows_affected == 1)
}

impl Size {
    const ZERO: Size = Size {
        vcpus: 0,
        memory_mib: 0,
        disk_gib: 0,
    };

    fn plus(self, o: Size) -> Size {
        Size {
            vcpus: self.vcpus + o.vcpus,
            memory_mib: self.memory_mib + o.memory_mib,
            disk_gib: self.disk_gib + o.disk_gib,
        }
    }

    fn negated(self) -> Size {
        Size {
            vcpus: -self.vcpus,
            memory_mib: -self.memory_mib,
            disk_gib: -self.disk_gib,
        }
    }
}

/// Gives back what `what` says of a VM's reservation on its node, once
/// (the VM's flags say what it still holds), within `c`'s transaction.
pub(crate) async fn release_on<C: ConnectionTrait>(
    c: &C,
    vm_id: Uuid,
    what: Release,
) -> Result<bool> {
    let Some(v) = vm::Entity::find_by_id(vm_id).one(c).await? else {
        return Err(StoreError::NotFound);
    };
    let Some(node_id) = v.node_id else {
        return Ok(false);
    };
    if what == Release::Retake {
        if !v.reserved || v.compute_held {
            return Ok(false);
        }
        let taken = vm::Entity::update_many()
            .col_expr(vm::Column::ComputeHeld, Expr::value(true))
            .filter(vm::Column::Id.eq(vm_id))
            .filter(vm::Column::ComputeHeld.eq(false))
            .exec(c)
            .await?;
        if taken.rows_affected != 1 {
            return Ok(false);
        }
        let size = Size {
            vcpus: v.vcpus,
            memory_mib: v.memory_mib,
            disk_gib: 0,
        };
        shift_reserved(c, node_id, size, None, false).await?;
        return Ok(true);
    }
    let (flag, size) = match what {
        Release::Nothing | Release::Retake => return Ok(false),
        Release::Compute if v.compute_held => (
            vm::Column::ComputeHeld,
            Size {
                vcpus: v.vcpus,
                memory_mib: v.memory_mib,
                disk_gib: 0,
            },
        ),
        Release::All if v.reserved => (
            vm::Column::Reserved,
            Size {
                vcpus: if v.compute_held { v.vcpus } else { 0 },
                memory_mib: if v.compute_held { v.memory_mib } else { 0 },
                disk_gib: v.disk_gib,
            },
        ),
        _ => return Ok(false),
    };
    let mut u = vm::Entity::update_many()
        .col_expr(vm::Column::ComputeHeld, Expr::value(false))
        .filter(vm::Column::Id.eq(vm_id))
        .filter(flag.eq(true));
    if what == Release::All {
        u = u.col_expr(vm::Column::Reserved, Expr::value(false));
    }
    if u.exec(c).await?.rows_affected != 1 {
        return Ok(false);
    }
    shift_reserved(c, node_id, size.negated(), None, false).await?;
    Ok(true)
}
