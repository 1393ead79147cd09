//! The control plane's two keys: the one that signs access tokens (JWT,
//! HS256) and the one that derives each VM's metadata token.
//!
//! With a secrets file (what `byteportd` uses: `DATA_DIR/secrets.json`,
//! owner-only) the keys live there and never in the database, so a plain
//! database backup holds no key. The database keeps only their fingerprint,
//! so a replica started with other keys (or none) refuses to start instead
//! of signing tokens its peers reject: every replica on one database needs
//! a copy of the same file. An install that kept its keys in the database
//! moves them to the file on its first start with one, and deletes them
//! from the database.
//!
//! Without a file (tests, embedded use) the keys are kept in the database's
//! settings, shared by every replica.

use crate::error::{AppError, AppResult};
use byteport_store::DataStore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::Path;

const JWT: &str = "jwt_secret";
const METADATA: &str = "metadata_secret";
const FINGERPRINT: &str = "secrets_fingerprint";

#[derive(Clone, Serialize, Deserialize)]
pub(crate) struct Secrets {
    pub jwt_secret: String,
    pub metadata_secret: String,
}

impl Secrets {
    fn fingerprint(&self) -> String {
        let mut h = Sha256::new();
        h.update(self.jwt_secret.as_bytes());
        h.update(b"\0");
        h.update(self.metadata_secret.as_bytes());
        hex::encode(h.finalize())
    }

    fn fresh() -> Secrets {
        Secrets {
            jwt_secret: super::auth::random_secret(""),
            metadata_secret: super::auth::random_secret(""),
        }
    }

    /// The keys, from `file` when given (made on first start), else from the
    /// database.
    pub(crate) async fn load(store: &DataStore, file: Option<&Path>) -> AppResult<Secrets> {
        let Some(path) = file else {
            let fresh = Secrets::fresh();
            return Ok(Secrets {
                jwt_secret: store.setting_get_or_insert(JWT, &fresh.jwt_secret).await?,
                metadata_secret: store
                    .setting_get_or_insert(METADATA, &fresh.metadata_secret)
                    .await?,
            });
        };
        let known = store.setting_get(FINGERPRINT).await?;
        let secrets = match read(path)? {
            Some(s) => s,
            None if known.is_some() => {
                return Err(AppError::internal(format!(
                    "{} is missing, and this database's keys are kept in such a file: copy the \
                     secrets file of the replica that made them (owner-only) to this path",
                    path.display()
                )));
            }
            None => {
                // First start with a file: an older install's keys move
                // here; a new one's are made.
                let s = Secrets {
                    jwt_secret: match store.setting_get(JWT).await? {
                        Some(k) => k,
                        None => Secrets::fresh().jwt_secret,
                    },
                    metadata_secret: match store.setting_get(METADATA).await? {
                        Some(k) => k,
                        None => Secrets::fresh().metadata_secret,
                    },
                };
                write(path, &s)?;
                s
            }
        };
        let won = store
            .setting_get_or_insert(FINGERPRINT, &secrets.fingerprint())
            .await?;
        if won != secrets.fingerprint() {
            return Err(AppError::internal(format!(
                "the keys in {} are not this database's: every replica needs a copy of the same \
                 secrets file",
                path.display()
            )));
        }
        store.setting_delete(JWT).await?;
        store.setting_delete(METADATA).await?;
        Ok(secrets)
    }
}

/// What to make anew in [`rotate`].
#[derive(Clone, Copy, Debug)]
pub struct Rotate {
    /// The token-signing key: every access token ends (clients refresh
    /// with their sessions, which stay).
    pub jwt: bool,
    /// The metadata key: every VM's token changes; a running VM keeps its
    /// old one, which stops working, until its QEMU is started again.
    pub metadata: bool,
}

/// Makes new keys in the secrets file and records their fingerprint; the
/// replicas must then be given the new file and restarted.
pub async fn rotate(store: &DataStore, path: &Path, what: Rotate) -> AppResult<()> {
    let mut s = read(path)?.ok_or_else(|| {
        AppError::internal(format!("{} is missing: nothing to rotate", path.display()))
    })?;
    let known = store.setting_get(FINGERPRINT).await?;
    if known.as_deref() != Some(s.fingerprint().as_str()) {
        return Err(AppError::internal(format!(
            "the keys in {} are not this database's",
            path.display()
        )));
    }
    let fresh = Secrets::fresh();
    if what.jwt {
        s.jwt_secret = fresh.jwt_secret;
    }
    if what.metadata {
        s.metadata_secret = fresh.metadata_secret;
    }
    write(path, &s)?;
    store.setting_set(FINGERPRINT, &s.fingerprint()).await?;
    Ok(())
}

fn read(path: &Path) -> AppResult<Option<Secrets>> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| AppError::internal(format!("{} is damaged: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(AppError::internal(format!(
            "cannot read {}: {e}",
            path.display()
        ))),
    }
}

/// Writes the file owner-only from its first byte, whole or not at all.
fn write(path: &Path, s: &Secrets) -> AppResult<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let fail =
        |e: std::io::Error| AppError::internal(format!("cannot write {}: {e}", path.display()));
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(fail)?;
    f.write_all(&serde_json::to_vec_pretty(s).map_err(AppError::internal)?)
        .map_err(fail)?;
    f.sync_all().map_err(fail)?;
    std::fs::rename(&tmp, path).map_err(fail)
}
