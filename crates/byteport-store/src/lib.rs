//! The database. One [`DataStore`] serves SQLite (the embedded default) and
//! PostgreSQL (fleets, several control-plane replicas) from the same code,
//! through SeaORM. It owns schema, transactions and the few invariants that
//! must hold under concurrency (quotas, unique names, generations); it knows
//! nothing of HTTP or of who may do what.

mod audit_log;
mod changes;
pub mod entities;
mod environments;
mod fleet;
mod maintenance;
pub use maintenance::{known_schema_versions, migrate_first};
mod migration;
mod projects;
mod runs;
mod users;
mod vms;

pub use fleet::{PlaceItem, Size};
pub use runs::RunFilter;

use chrono::Utc;
pub use entities::*;
use sea_orm::sea_query::{Expr, OnConflict};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectOptions, ConnectionTrait, Database, DatabaseConnection,
    DbErr, EntityTrait, IntoActiveModel, PaginatorTrait, QueryFilter, QueryOrder, QuerySelect, Set,
    TransactionTrait,
};
use sea_orm_migration::MigratorTrait;
use std::sync::Arc;
use uuid::Uuid;

/// What the store can fail with. Callers turn these into API errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    #[error("{0}")]
    Conflict(String),
    #[error("quota {quota} exceeded: {requested} requested, {used} in use of {limit}")]
    QuotaExceeded {
        quota: &'static str,
        limit: u64,
        used: u64,
        requested: u64,
    },
    /// The database was migrated by a newer BytePort than this one.
    #[error("{0}")]
    Schema(String),
    #[error("database error")]
    Db(#[from] DbErr),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Which database a store runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgresql",
        })
    }
}

/// The database handle. Cheap to clone.
#[derive(Clone)]
pub struct DataStore {
    db: DatabaseConnection,
    backend: Backend,
    /// SQLite has one writer; serializing our own check-then-write
    /// transactions here makes them atomic without `BEGIN IMMEDIATE`.
    /// PostgreSQL uses row locks instead.
    write_lock: Arc<tokio::sync::Mutex<()>>,
    /// Statements run since connecting, for `/metrics`.
    statements: Arc<std::sync::atomic::AtomicU64>,
}

/// A filter for [`DataStore::vm_list`].
#[derive(Clone, Debug, Default)]
pub struct VmFilter {
    /// Only these projects; `None` means every project.
    pub projects: Option<Vec<Uuid>>,
    pub state: Option<String>,
    pub label: Option<(String, String)>,
    pub name: Option<String>,
    pub after: Option<Uuid>,
    pub limit: u64,
}

/// What one heartbeat records of a node ([`DataStore::node_heartbeat`]):
/// its capacity and use (vCPUs, MiB, GiB), and, as JSON, its latest VM
/// figures and what it says it runs; `None` leaves that column as it is.
#[derive(Clone, Debug, Default)]
pub struct NodeBeat {
    pub cap: [i64; 3],
    pub used: [i64; 3],
    pub vm_stats: Option<String>,
    pub platforms: Option<String>,
    pub engines: Option<String>,
    pub unavailable_engines: Option<String>,
}

/// What a project's live VMs hold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UsageRow {
    pub vms: i64,
    /// VMs' and running runs' together.
    pub vcpus: i64,
    pub memory_mib: i64,
    pub disk_gib: i64,
    /// Runs running.
    pub runs: i64,
}

/// A node's report on one VM, with the public state derived from it.
#[derive(Clone, Debug)]
pub struct Observation<'a> {
    pub observed: &'a str,
    pub generation: i64,
    pub state: &'a str,
    pub reason: Option<String>,
    /// JSON array of port forwards.
    pub ports: &'a str,
    pub deleted: bool,
    /// The guest agent's version, when it said ready.
    pub agent_version: Option<&'a str>,
    /// What the guest said of cloud-init, when it has said anything.
    pub cloud_init: Option<&'a str>,
    /// JSON of how the node connected the VM, when it said.
    pub network: Option<String>,
    /// `native` or `emulated`, when the node said.
    pub execution: Option<&'a str>,
    /// What the VM's reservation on its node gives back with this report,
    /// in the same transaction.
    pub release: Release,
}

/// How long an `Idempotency-Key` answers with its first response.
pub const IDEMPOTENCY_TTL: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// How long a claimed key whose request has not finished keeps answering
/// 409; after that its request is taken to have died with its server.
pub const IDEMPOTENCY_IN_FLIGHT: std::time::Duration = std::time::Duration::from_secs(600);

/// What of a VM's reservation a report gives back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Release {
    Nothing,
    /// Stopped, or crashed with its QEMU gone: vCPUs and memory; the disk
    /// stays reserved where it lives.
    Compute,
    /// Deleted: everything.
    All,
    /// Not a release: running again without a start that took its vCPUs
    /// and memory back (its node brought it back from an error), so they
    /// are held again, whatever the node's limit, since it runs.
    Retake,
}

/// The outcome of claiming an idempotency key.
#[derive(Debug)]
pub enum IdemClaim {
    /// First use: serve the request, then [`DataStore::idem_finish`].
    New,
    /// Served before with the same body: replay this.
    Replay {
        status: u16,
        content_type: String,
        body: Vec<u8>,
    },
    /// Served before with a different body.
    Mismatch,
    /// The first request with this key is still being served.
    InFlight,
}

impl DataStore {
    /// Connects and runs pending migrations. `url` is `sqlite://PATH?mode=rwc`
    /// or `postgres://...`.
    pub async fn connect(url: &str) -> Result<Self> {
        let backend = if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else {
            Backend::Sqlite
        };
        let mut opts = ConnectOptions::new(url.to_owned());
        opts.sqlx_logging(false);
        match backend {
            Backend::Sqlite => {
                opts.max_connections(8).min_connections(1);
                opts.map_sqlx_sqlite_opts(|o| {
                    o.journal_mode(sea_orm::sqlx::sqlite::SqliteJournalMode::Wal)
                        .synchronous(sea_orm::sqlx::sqlite::SqliteSynchronous::Normal)
                        .busy_timeout(std::time::Duration::from_secs(10))
                        .foreign_keys(false)
                        // Lists and quota sums over thousands of VMs read
                        // the database through a memory map and keep up
                        // to 16 MiB of pages per connection (SQLite's
                        // default is 2 MiB, read with a call per page).
                        .pragma("mmap_size", "268435456")
                        .pragma("cache_size", "-16384")
                });
            }
            Backend::Postgres => {
                opts.max_connections(16).min_connections(1);
            }
        }
        let mut db = Database::connect(opts).await?;
        let statements = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let count = statements.clone();
        db.set_metric_callback(move |_| {
            count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        });
        refuse_newer_schema(&db).await?;
        migration::Migrator::up(&db, None).await?;
        Ok(Self {
            db,
            backend,
            write_lock: Arc::default(),
            statements,
        })
    }

    /// Statements this handle has run since it connected (every clone
    /// counts into one figure).
    pub fn statements(&self) -> u64 {
        self.statements.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The SeaORM connection, for tests that inspect rows directly.
    pub fn connection(&self) -> &DatabaseConnection {
        &self.db
    }

    /// Takes the SQLite writer lock; a no-op guard on PostgreSQL.
    async fn serialize(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        match self.backend {
            Backend::Sqlite => Some(self.write_lock.lock().await),
            Backend::Postgres => None,
        }
    }

    /// Begins a transaction that writes. On SQLite it takes the write lock
    /// at `BEGIN` (`IMMEDIATE`), waiting out the busy timeout there: a
    /// deferred transaction that read first and is then beaten to the
    /// write by another connection fails at once with "database is
    /// locked", whatever the timeout. PostgreSQL begins as usual.
    pub(crate) async fn begin_write(&self) -> Result<sea_orm::DatabaseTransaction> {
        let mode = match self.backend {
            Backend::Sqlite => Some(sea_orm::SqliteTransactionMode::Immediate),
            Backend::Postgres => None,
        };
        Ok(self
            .db
            .begin_with_options(sea_orm::TransactionOptions {
                sqlite_transaction_mode: mode,
                ..Default::default()
            })
            .await?)
    }

    // ---------- flavors and images ----------

    pub async fn flavor_insert(&self, f: flavor::Model) -> Result<flavor::Model> {
        if self.flavor_fetch_by_name(&f.name).await?.is_some() {
            return Err(StoreError::Conflict(format!(
                "flavor {} already exists",
                f.name
            )));
        }
        f.into_active_model()
            .insert(&self.db)
            .await
            .map_err(unique_conflict("flavor"))
    }

    /// Inserts a flavor unless one of that name exists (seeding).
    pub async fn flavor_seed(&self, f: flavor::Model) -> Result<()> {
        flavor::Entity::insert(f.into_active_model())
            .on_conflict_do_nothing_on([flavor::Column::Name])
            .exec(&self.db)
            .await?;
        Ok(())
    }

    pub async fn flavor_list(&self) -> Result<Vec<flavor::Model>> {
        Ok(flavor::Entity::find()
            .order_by_asc(flavor::Column::Vcpus)
            .order_by_asc(flavor::Column::MemoryMib)
            .order_by_asc(flavor::Column::Name)
            .all(&self.db)
            .await?)
    }

    pub async fn flavor_fetch_by_name(&self, name: &str) -> Result<Option<flavor::Model>> {
        Ok(flavor::Entity::find()
            .filter(flavor::Column::Name.eq(name))
            .one(&self.db)
            .await?)
    }

    pub async fn flavor_delete(&self, name: &str) -> Result<()> {
        let res = flavor::Entity::delete_many()
            .filter(flavor::Column::Name.eq(name))
            .exec(&self.db)
            .await?;
        if res.rows_affected == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    pub async fn image_insert(&self, i: image::Model) -> Result<image::Model> {
        if self.image_fetch_by_name(&i.name).await?.is_some() {
            return Err(StoreError::Conflict(format!(
                "image {} already exists",
                i.name
            )));
        }
        i.into_active_model()
            .insert(&self.db)
            .await
            .map_err(unique_conflict("image"))
    }

    pub async fn image_list(&self) -> Result<Vec<image::Model>> {
        Ok(image::Entity::find()
            .order_by_asc(image::Column::Name)
            .all(&self.db)
            .await?)
    }

    pub async fn image_fetch_by_name(&self, name: &str) -> Result<Option<image::Model>> {
        Ok(image::Entity::find()
            .filter(image::Column::Name.eq(name))
            .one(&self.db)
            .await?)
    }

    /// Deletes an image that no live VM uses.
    pub async fn image_delete(&self, id: Uuid) -> Result<()> {
        let users = vm::Entity::find()
            .filter(vm::Column::ImageId.eq(id))
            .filter(vm::Column::DeletedAt.is_null())
            .count(&self.db)
            .await?;
        if users > 0 {
            return Err(StoreError::Conflict(format!(
                "{users} VM(s) still use this image"
            )));
        }
        let res = image::Entity::delete_by_id(id).exec(&self.db).await?;
        if res.rows_affected == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    // ---------- nodes ----------

    pub async fn join_token_insert(&self, t: join_token::Model) -> Result<()> {
        t.into_active_model().insert(&self.db).await?;
        Ok(())
    }

    /// Spends a join token and inserts the node, in one transaction.
    pub async fn node_register(&self, token_hash: &str, n: node::Model) -> Result<node::Model> {
        let _w = self.serialize().await;
        let tx = self.begin_write().await?;
        let spent = join_token::Entity::update_many()
            .col_expr(join_token::Column::Used, Expr::value(true))
            .filter(join_token::Column::TokenHash.eq(token_hash))
            .filter(join_token::Column::Used.eq(false))
            .filter(join_token::Column::ExpiresAt.gt(Utc::now()))
            .exec(&tx)
            .await?;
        if spent.rows_affected != 1 {
            return Err(StoreError::NotFound);
        }
        if node::Entity::find()
            .filter(node::Column::Name.eq(n.name.clone()))
            .one(&tx)
            .await?
            .is_some()
        {
            return Err(StoreError::Conflict(format!(
                "a node named {} is already registered",
                n.name
            )));
        }
        let n = n
            .into_active_model()
            .insert(&tx)
            .await
            .map_err(unique_conflict("node"))?;
        tx.commit().await?;
        Ok(n)
    }

    pub async fn node_fetch(&self, id: Uuid) -> Result<node::Model> {
        node::Entity::find_by_id(id)
            .one(&self.db)
            .await?
            .ok_or(StoreError::NotFound)
    }

    pub async fn node_list(&self) -> Result<Vec<node::Model>> {
        Ok(node::Entity::find()
            .order_by_asc(node::Column::Name)
            .all(&self.db)
            .await?)
    }

    /// Every node as the scheduler sees it: its rows without the latest
    /// VM figures (`vm_stats` is `None`), the one wide column, which the
    /// scheduler does not read.
    pub async fn node_inventory(&self) -> Result<Vec<node::Model>> {
        use sea_orm::Iterable;
        Ok(node::Entity::find()
            .select_only()
            .columns(node::Column::iter().filter(|c| !matches!(c, node::Column::VmStats)))
            .column_as(Expr::cust("CAST(NULL AS TEXT)"), "vm_stats")
            .order_by_asc(node::Column::Name)
            .into_model::<node::Model>()
            .all(&self.db)
            .await?)
    }

    /// Records a heartbeat: capacity, usage, time, and `online` unless the
    /// node is cordoned. One guarded statement: a cordon that lands while
    /// the heartbeat is served is never overwritten with `online`.
    pub async fn node_heartbeat(&self, id: Uuid, beat: NodeBeat) -> Result<()> {
        let NodeBeat {
            cap,
            used,
            vm_stats,
            platforms,
            engines,
            unavailable_engines,
        } = beat;
        let mut u = node::Entity::update_many();
        if let Some(p) = platforms {
            u = u.col_expr(node::Column::Platforms, Expr::value(p));
        }
        if let Some(e) = engines {
            u = u.col_expr(node::Column::Engines, Expr::value(e));
        }
        if let Some(e) = unavailable_engines {
            u = u.col_expr(node::Column::UnavailableEngines, Expr::value(e));
        }
        let res = u
            .col_expr(
                node::Column::Status,
                Expr::cust("CASE WHEN status = 'cordoned' THEN 'cordoned' ELSE 'online' END"),
            )
            .col_expr(node::Column::CapVcpus, Expr::value(cap[0]))
            .col_expr(node::Column::CapMemoryMib, Expr::value(cap[1]))
            .col_expr(node::Column::CapDiskGib, Expr::value(cap[2]))
            .col_expr(node::Column::UsedVcpus, Expr::value(used[0]))
            .col_expr(node::Column::UsedMemoryMib, Expr::value(used[1]))
            .col_expr(node::Column::UsedDiskGib, Expr::value(used[2]))
            .col_expr(node::Column::LastHeartbeatAt, Expr::value(Some(Utc::now())))
            .col_expr(node::Column::VmStats, Expr::value(vm_stats))
            .filter(node::Column::Id.eq(id))
            .exec(&self.db)
            .await?;
        if res.rows_affected != 1 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    // ---------- idempotency ----------

    /// Claims `(actor, key)` for a request whose body hashes to `hash`.
    pub async fn idem_claim(&self, actor: &str, key: &str, hash: &str) -> Result<IdemClaim> {
        let row = idempotency::ActiveModel {
            actor: Set(actor.to_owned()),
            key: Set(key.to_owned()),
            request_hash: Set(hash.to_owned()),
            status: Set(0),
            content_type: Set(String::new()),
            body: Set(Vec::new()),
            created_at: Set(Utc::now()),
        };
        let inserted = idempotency::Entity::insert(row)
            .on_conflict_do_nothing_on([idempotency::Column::Actor, idempotency::Column::Key])
            .exec(&self.db)
            .await?;
        if matches!(inserted, sea_orm::TryInsertResult::Inserted(_)) {
            return Ok(IdemClaim::New);
        }
        let prev = idempotency::Entity::find_by_id((actor.to_owned(), key.to_owned()))
            .one(&self.db)
            .await?
            .ok_or(StoreError::NotFound)?;
        let now = Utc::now();
        let limit = if prev.status == 0 {
            IDEMPOTENCY_IN_FLIGHT
        } else {
            IDEMPOTENCY_TTL
        };
        let stale_before = now - chrono::Duration::from_std(limit).unwrap_or_default();
        if prev.created_at < stale_before {
            // A claim whose request died with its server, or a key past its
            // time: this request takes it (one of several racing wins).
            let taken = idempotency::Entity::update_many()
                .col_expr(idempotency::Column::RequestHash, Expr::value(hash))
                .col_expr(idempotency::Column::Status, Expr::value(0))
                .col_expr(idempotency::Column::ContentType, Expr::value(""))
                .col_expr(idempotency::Column::Body, Expr::value(Vec::<u8>::new()))
                .col_expr(idempotency::Column::CreatedAt, Expr::value(now))
                .filter(idempotency::Column::Actor.eq(actor))
                .filter(idempotency::Column::Key.eq(key))
                // Still stale: the first taker made it fresh.
                .filter(idempotency::Column::CreatedAt.lt(stale_before))
                .exec(&self.db)
                .await?;
            return Ok(if taken.rows_affected == 1 {
                IdemClaim::New
            } else {
                IdemClaim::InFlight
            });
        }
        Ok(if prev.request_hash != hash {
            IdemClaim::Mismatch
        } else if prev.status == 0 {
            IdemClaim::InFlight
        } else {
            IdemClaim::Replay {
                status: prev.status as u16,
                content_type: prev.content_type,
                body: prev.body,
            }
        })
    }

    pub async fn idem_finish(
        &self,
        actor: &str,
        key: &str,
        status: u16,
        ct: &str,
        body: &[u8],
    ) -> Result<()> {
        idempotency::Entity::update_many()
            .col_expr(idempotency::Column::Status, Expr::value(status as i32))
            .col_expr(idempotency::Column::ContentType, Expr::value(ct))
            .col_expr(idempotency::Column::Body, Expr::value(body.to_vec()))
            .filter(idempotency::Column::Actor.eq(actor))
            .filter(idempotency::Column::Key.eq(key))
            .exec(&self.db)
            .await?;
        Ok(())
    }

    /// Removes keys past [`IDEMPOTENCY_TTL`]; returns how many.
    pub async fn idem_expire(&self) -> Result<u64> {
        let before = Utc::now() - chrono::Duration::from_std(IDEMPOTENCY_TTL).unwrap_or_default();
        Ok(idempotency::Entity::delete_many()
            .filter(idempotency::Column::CreatedAt.lt(before))
            .exec(&self.db)
            .await?
            .rows_affected)
    }

    /// Forgets a claim whose request failed on the server's side, so a
    /// retry runs again.
    pub async fn idem_release(&self, actor: &str, key: &str) -> Result<()> {
        idempotency::Entity::delete_by_id((actor.to_owned(), key.to_owned()))
            .exec(&self.db)
            .await?;
        Ok(())
    }
}

/// Refuses a database that a newer BytePort migrated: this one would not
/// know its tables, and migrations only go forward.
async fn refuse_newer_schema(db: &DatabaseConnection) -> Result<()> {
    let stmt = sea_orm::Statement::from_string(
        db.get_database_backend(),
        "SELECT version FROM seaql_migrations",
    );
    // A new database has no table yet: nothing applied.
    let Ok(rows) = db.query_all_raw(stmt).await else {
        return Ok(());
    };
    let known: Vec<String> = migration::Migrator::migrations()
        .iter()
        .map(|m| m.name().to_owned())
        .collect();
    let unknown: Vec<String> = rows
        .iter()
        .filter_map(|r| r.try_get::<String>("", "version").ok())
        .filter(|v| !known.contains(v))
        .collect();
    if unknown.is_empty() {
        return Ok(());
    }
    Err(StoreError::Schema(format!(
        "this database was migrated by a newer BytePort (it has {}, which this version does \
         not know; the newest it knows is {}): run that newer version, or restore a backup \
         taken before the upgrade",
        unknown.join(", "),
        known.last().map_or("none", String::as_str)
    )))
}

/// Opens a transaction's check-then-write on a project with a write to its
/// row. On PostgreSQL that takes the row lock (like `SELECT ... FOR UPDATE`).
/// On SQLite the transaction holds the database's write lock from its
/// `BEGIN` already ([`DataStore::begin_write`]), and this write adds nothing.
pub(crate) async fn lock_project<C: ConnectionTrait>(c: &C, id: Uuid) -> Result<()> {
    project::Entity::update_many()
        .col_expr(project::Column::MaxVms, Expr::col(project::Column::MaxVms))
        .filter(project::Column::Id.eq(id))
        .exec(c)
        .await?;
    Ok(())
}

/// Takes a node's row lock for the rest of the transaction (a no-op
/// update), as [`lock_project`] does for a project.
pub(crate) async fn lock_node<C: ConnectionTrait>(c: &C, id: Uuid) -> Result<()> {
    node::Entity::update_many()
        .col_expr(
            node::Column::ReservedVcpus,
            Expr::col(node::Column::ReservedVcpus),
        )
        .filter(node::Column::Id.eq(id))
        .exec(c)
        .await?;
    Ok(())
}

/// Maps a unique-constraint violation (a race the pre-check lost) to a
/// conflict naming the kind of resource.
pub(crate) fn unique_conflict(kind: &'static str) -> impl Fn(DbErr) -> StoreError {
    on_unique(move || format!("a {kind} with that name already exists"))
}

/// Maps a unique-constraint violation to a conflict saying `message`.
pub(crate) fn on_unique(message: impl Fn() -> String) -> impl Fn(DbErr) -> StoreError {
    move |e| match e.sql_err() {
        Some(sea_orm::SqlErr::UniqueConstraintViolation(_)) => StoreError::Conflict(message()),
        _ => StoreError::Db(e),
    }
}

impl DataStore {
    /// A node by the hash of its credential.
    pub async fn node_by_credential(&self, credential_hash: &str) -> Result<Option<node::Model>> {
        Ok(node::Entity::find()
            .filter(node::Column::CredentialHash.eq(credential_hash))
            .one(&self.db)
            .await?)
    }
}

impl DataStore {
    /// How many VMs are in each state (deleted ones excluded).
    pub async fn vm_count_by_state(&self) -> Result<Vec<(String, i64)>> {
        Ok(vm::Entity::find()
            .select_only()
            .column(vm::Column::State)
            .column_as(vm::Column::Id.count(), "n")
            .filter(vm::Column::DeletedAt.is_null())
            .group_by(vm::Column::State)
            .into_tuple()
            .all(&self.db)
            .await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sea_orm::ConnectionTrait;

    /// A check-then-write transaction on SQLite and a plain write of
    /// another connection that lands between its read and its write both
    /// succeed: the transaction holds the write lock from its `BEGIN`, so
    /// the other write waits for it instead of making its upgrade fail
    /// ("database is locked", which no busy timeout retries).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_landing_inside_a_check_then_write_transaction_fails_neither() {
        let dir = std::env::temp_dir().join(format!("byteport-store-tx-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.join("t.db").display());
        let store = DataStore::connect(&url).await.unwrap();
        store
            .db
            .execute_unprepared("CREATE TABLE scratch (x INTEGER)")
            .await
            .unwrap();
        let tx = store.begin_write().await.unwrap();
        tx.execute_unprepared("SELECT count(*) FROM scratch")
            .await
            .unwrap();
        let other = {
            let db = store.db.clone();
            tokio::spawn(async move {
                db.execute_unprepared("INSERT INTO scratch VALUES (1)")
                    .await
            })
        };
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        tx.execute_unprepared("INSERT INTO scratch VALUES (2)")
            .await
            .expect("the transaction's write");
        tx.commit().await.expect("the transaction's commit");
        other.await.unwrap().expect("the other connection's write");
        let n: Option<i64> = store
            .db
            .query_one_raw(sea_orm::Statement::from_string(
                sea_orm::DatabaseBackend::Sqlite,
                "SELECT count(*) AS n FROM scratch",
            ))
            .await
            .unwrap()
            .and_then(|r| r.try_get("", "n").ok());
        assert_eq!(n, Some(2));
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
