//! `byteportd admin backup` and `restore`: a tar archive of a consistent
//! copy of the SQLite database (`VACUUM INTO`, taken while the server
//! serves), the secrets file (the token-signing and metadata keys: without
//! them every session and every VM's metadata token would end) and a
//! manifest naming the schema. Owner-only, as the data directory is.

use anyhow::{Context, bail};
use byteport_store::DataStore;
use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

const DB: &str = "byteport.db";
const SECRETS: &str = "secrets.json";
const MANIFEST: &str = "backup.json";
const FORMAT: u64 = 1;

fn owner_only_file(path: &Path) -> anyhow::Result<File> {
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))
}

fn append(tar: &mut tar::Builder<File>, name: &str, data: &[u8]) -> anyhow::Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o600);
    h.set_mtime(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    );
    h.set_cksum();
    tar.append_data(&mut h, name, data)
        .with_context(|| format!("writing {name} into the backup"))
}

/// Writes the backup to `file` (which must not exist), and says what it
/// holds.
pub async fn write(store: &DataStore, secrets: &Path, file: &Path) -> anyhow::Result<String> {
    if file.exists() {
        bail!("{} exists: name a new file", file.display());
    }
    let keys = fs::read(secrets).with_context(|| {
        format!(
            "reading the secrets file {} (the server makes it at its first start; \
             --secrets-file names another)",
            secrets.display()
        )
    })?;
    let parent = file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = file.file_name().context("the backup needs a file name")?;
    let work = parent.join(format!(".{}.partial", name.to_string_lossy()));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir(&work).with_context(|| format!("creating {}", work.display()))?;
    fs::set_permissions(&work, fs::Permissions::from_mode(0o700))?;
    let result = async {
        let copy = work.join(DB);
        store
            .sqlite_copy_into(&copy)
            .await
            .map_err(|e| anyhow::anyhow!("copying the database: {e}"))?;
        let schema = store
            .schema_versions()
            .await
            .map_err(|e| anyhow::anyhow!("reading the schema: {e}"))?;
        let manifest = serde_json::json!({
            "format": FORMAT,
            "byteportd": env!("CARGO_PKG_VERSION"),
            "schema": schema,
            "created_at": chrono_now(),
        });
        let tmp = work.join("archive.tar");
        let mut tar = tar::Builder::new(owner_only_file(&tmp)?);
        append(&mut tar, MANIFEST, manifest.to_string().as_bytes())?;
        append(&mut tar, SECRETS, &keys)?;
        let db = fs::read(&copy).context("reading the copy")?;
        append(&mut tar, DB, &db)?;
        tar.into_inner()?.sync_all()?;
        fs::rename(&tmp, file).with_context(|| format!("writing {}", file.display()))?;
        Ok::<_, anyhow::Error>(format!(
            "backup {}: the database ({} bytes, schema {}) and the secrets file",
            file.display(),
            db.len(),
            schema.last().map_or("empty", String::as_str)
        ))
    }
    .await;
    let _ = fs::remove_dir_all(&work);
    result
}

fn chrono_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Restores a backup into `dir` (which must have no database) and its
/// secrets to `secrets` (which must not exist), and says what it did.
pub fn restore(file: &Path, dir: &Path, secrets: &Path) -> anyhow::Result<String> {
    let db = dir.join(DB);
    if db.exists() {
        bail!(
            "{} already has a database: restore into a data directory without one \
             (move {} and its -wal and -shm files away first)",
            dir.display(),
            db.display()
        );
    }
    if secrets.exists() {
        bail!(
            "{} exists: move it away first (the backup brings its own keys)",
            secrets.display()
        );
    }
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut tar = tar::Archive::new(
        File::open(file).with_context(|| format!("opening the backup {}", file.display()))?,
    );
    let (mut manifest, mut keys, mut data) = (None, None, None);
    for entry in tar.entries().context("reading the backup")? {
        let mut entry = entry.context("reading the backup")?;
        let name = entry.path()?.to_string_lossy().into_owned();
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes)?;
        match name.as_str() {
            MANIFEST => manifest = Some(bytes),
            SECRETS => keys = Some(bytes),
            DB => data = Some(bytes),
            other => bail!(
                "{}: unexpected {other:?}: not a BytePort backup",
                file.display()
            ),
        }
    }
    let (Some(manifest), Some(keys), Some(data)) = (manifest, keys, data) else {
        bail!(
            "{}: not a BytePort backup (it lacks {MANIFEST}, {SECRETS} or {DB})",
            file.display()
        );
    };
    let manifest: serde_json::Value =
        serde_json::from_slice(&manifest).context("reading the backup's manifest")?;
    if manifest["format"].as_u64() != Some(FORMAT) {
        bail!(
            "{}: a backup of format {} (this version reads {FORMAT})",
            file.display(),
            manifest["format"]
        );
    }
    let partial = dir.join(format!("{DB}.restoring"));
    let _ = fs::remove_file(&partial);
    {
        use std::io::Write;
        let mut f = owner_only_file(&partial)?;
        f.write_all(&data)?;
        f.sync_all()?;
    }
    {
        use std::io::Write;
        if let Some(p) = secrets.parent() {
            fs::create_dir_all(p)?;
        }
        let mut f = owner_only_file(secrets)?;
        f.write_all(&keys)?;
        f.sync_all()?;
    }
    fs::rename(&partial, &db)?;
    Ok(format!(
        "restored {} into {} (schema {}) and its keys into {}",
        file.display(),
        dir.display(),
        manifest["schema"]
            .as_array()
            .and_then(|s| s.last())
            .and_then(|s| s.as_str())
            .unwrap_or("empty"),
        secrets.display()
    ))
}
