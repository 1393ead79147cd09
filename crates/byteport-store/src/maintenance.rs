//! What an operator does to the database as a whole: a consistent copy
//! for a backup, and which schema it has.

use crate::{Backend, DataStore, Result, StoreError, migration};
use sea_orm::ConnectionTrait;
use sea_orm_migration::MigratorTrait;
use std::path::Path;

impl DataStore {
    /// Opens an existing SQLite database to read only, with no migration:
    /// for a backup taken beside a running server, which must not be made
    /// to wait for (or retry against) a second writer.
    pub async fn open_sqlite_read_only(path: &Path) -> Result<Self> {
        let url = format!("sqlite://{}?mode=ro", path.display());
        let mut opts = sea_orm::ConnectOptions::new(url);
        opts.sqlx_logging(false)
            .max_connections(1)
            .min_connections(1);
        opts.map_sqlx_sqlite_opts(|o| o.busy_timeout(std::time::Duration::from_secs(10)));
        Ok(Self {
            db: sea_orm::Database::connect(opts).await?,
            backend: Backend::Sqlite,
            write_lock: Default::default(),
            statements: Default::default(),
        })
    }

    /// Writes a consistent copy of a SQLite database to `path`, which must
    /// not exist yet (`VACUUM INTO`: one read transaction, so the server
    /// keeps serving and writing while it runs).
    pub async fn sqlite_copy_into(&self, path: &Path) -> Result<()> {
        if self.backend != Backend::Sqlite {
            return Err(StoreError::Schema(
                "a copy is made of SQLite databases only; use pg_dump for PostgreSQL".into(),
            ));
        }
        let Some(p) = path.to_str() else {
            return Err(StoreError::Schema(format!(
                "{} is not a UTF-8 path",
                path.display()
            )));
        };
        self.db
            .execute_unprepared(&format!("VACUUM INTO '{}'", p.replace('\'', "''")))
            .await?;
        Ok(())
    }

    /// The migrations this database has, oldest first.
    pub async fn schema_versions(&self) -> Result<Vec<String>> {
        Ok(migration::Migrator::get_applied_migrations(&self.db)
            .await?
            .iter()
            .map(|m| m.name().to_owned())
            .collect())
    }
}

/// The migrations this version knows, oldest first.
pub fn known_schema_versions() -> Vec<String> {
    migration::Migrator::migrations()
        .iter()
        .map(|m| m.name().to_owned())
        .collect()
}

/// Applies only the first `n` migrations to a new database: what an older
/// BytePort left, for upgrade tests.
pub async fn migrate_first(url: &str, n: u32) -> Result<()> {
    let db = sea_orm::Database::connect(url).await?;
    migration::Migrator::up(&db, Some(n)).await?;
    Ok(())
}
