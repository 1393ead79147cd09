//! Image files: uploads streamed to disk and checked against the sha256 the
//! image was registered with, and downloads by sha256 for nodes (which keep
//! their own content-addressed cache). Files live in the image directory
//! under their sha256, so two images that share a kernel store it once.

use super::catalog::image_view;
use super::{Actor, App, Ctx};
use crate::error::{AppError, AppResult};
use byteport_types::ImageId;
use byteport_types::api::Image;
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use std::path::PathBuf;
use tokio::io::AsyncWriteExt;
use uuid::Uuid;

/// Which file of an image an upload carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileRole {
    /// The disk, or the initramfs of a kernel-booted image without a disk.
    Image,
    Kernel,
    Initrd,
}

impl std::str::FromStr for FileRole {
    type Err = AppError;
    fn from_str(s: &str) -> AppResult<Self> {
        match s {
            "image" => Ok(FileRole::Image),
            "kernel" => Ok(FileRole::Kernel),
            "initrd" => Ok(FileRole::Initrd),
            _ => Err(AppError::bad(
                "invalid_file_role",
                format!("file {s:?} is not one of image, kernel, initrd"),
            )),
        }
    }
}

fn valid_sha(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

impl App {
    fn image_file_path(&self, sha256: &str) -> PathBuf {
        self.settings.image_dir.join(sha256)
    }

    /// Receives one file of an image. The bytes must hash to the sha256
    /// the image declares for that file; otherwise nothing is kept. When
    /// every file the image needs is present it becomes `available`.
    pub async fn image_upload<S, E>(
        &self,
        ctx: &Ctx,
        id: &str,
        role: FileRole,
        mut body: S,
    ) -> AppResult<Image>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        ctx.admin()?;
        let nf = || AppError::not_found("image", id);
        let img = match self.store.image_fetch_by_name(id).await? {
            Some(i) => i,
            None => {
                let iid: ImageId = id.parse().map_err(|_| nf())?;
                self.store.image_fetch(iid.0).await.map_err(|_| nf())?
            }
        };
        ctx.target("image", img.id, None);
        let expected = match role {
            FileRole::Image => Some(img.sha256.clone()),
            FileRole::Kernel => img.kernel_sha256.clone(),
            FileRole::Initrd => img.initrd_sha256.clone(),
        }
        .ok_or_else(|| {
            AppError::bad(
                "invalid_file_role",
                format!("image {} declares no {role:?} file", img.name).to_lowercase(),
            )
        })?;
        let dest = self.image_file_path(&expected);
        if !tokio::fs::try_exists(&dest).await.unwrap_or(false) {
            tokio::fs::create_dir_all(&self.settings.image_dir)
                .await
                .map_err(AppError::internal)?;
            let tmp = self
                .settings
                .image_dir
                .join(format!(".upload-{}", Uuid::new_v4()));
            let mut res = receive(&mut body, &tmp, &expected).await;
            if res.is_ok() && role == FileRole::Image {
                res = inspect(&tmp, &img.format).await;
            }
            match res {
                Ok(()) => tokio::fs::rename(&tmp, &dest)
                    .await
                    .map_err(AppError::internal)?,
                Err(e) => {
                    let _ = tokio::fs::remove_file(&tmp).await;
                    return Err(e);
                }
            }
        } else {
            // Already stored (shared with another image): the upload must
            // still be the same bytes, or the client learns it is wrong.
            let mut h = Sha256::new();
            let mut len = 0u64;
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| {
                    AppError::bad("upload_failed", format!("the upload broke off: {e}"))
                })?;
                len += chunk.len() as u64;
                h.update(&chunk);
            }
            let got = hex::encode(h.finalize());
            if got != expected {
                return Err(AppError::bad(
                    "checksum_mismatch",
                    format!(
                        "the {len} bytes uploaded hash to sha256 {got}; the image declares {expected}"
                    ),
                ));
            }
        }
        let mut needed = vec![img.sha256.clone()];
        needed.extend(img.kernel_sha256.clone());
        needed.extend(img.initrd_sha256.clone());
        let mut complete = true;
        for sha in &needed {
            if !tokio::fs::try_exists(self.image_file_path(sha))
                .await
                .unwrap_or(false)
            {
                complete = false;
            }
        }
        if complete {
            self.store.image_set_status(img.id, "available").await?;
        }
        image_view(&self.store.image_fetch(img.id).await?)
    }

    /// Opens an image file for download, by sha256; for nodes and users.
    pub async fn image_file_open(
        &self,
        ctx: &Ctx,
        sha256: &str,
    ) -> AppResult<(tokio::fs::File, u64)> {
        if matches!(ctx.actor, Actor::Anonymous) {
            return Err(AppError::Unauthorized("log in first".into()));
        }
        let nf = || AppError::not_found("image file", sha256);
        if !valid_sha(sha256) || !self.store.image_file_known(sha256).await? {
            return Err(nf());
        }
        let f = tokio::fs::File::open(self.image_file_path(sha256))
            .await
            .map_err(|_| nf())?;
        let len = f.metadata().await.map_err(AppError::internal)?.len();
        Ok((f, len))
    }
}

/// Writes the body to `tmp`, hashing as it goes; an error if the hash is
/// not `expected`.
/// Refuses a disk that is not what it claims to be or that reaches for
/// other files: QEMU would open a backing file or an external data file
/// named inside the image, on the node, with the node's rights.
async fn inspect(path: &std::path::Path, format: &str) -> AppResult<()> {
    if !matches!(format, "qcow2" | "raw") {
        return Ok(());
    }
    let bad = |m: String| AppError::bad("invalid_image", m);
    let out = tokio::process::Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(path)
        .output()
        .await
        .map_err(|e| {
            AppError::Unavailable(format!(
                "qemu-img (Debian's qemu-utils) is needed to check a {format} image: {e}"
            ))
        })?;
    if !out.status.success() {
        return Err(bad(format!(
            "qemu-img cannot read the file as a disk image: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(AppError::internal)?;
    let got = v["format"].as_str().unwrap_or("unknown");
    if got != format {
        return Err(bad(format!(
            "the file is a {got} image, not the {format} the image declares"
        )));
    }
    if let Some(b) = v.get("backing-filename").and_then(|b| b.as_str()) {
        return Err(bad(format!(
            "the image names a backing file ({b}); upload a standalone one (`qemu-img convert -O {format}`)"
        )));
    }
    if let Some(d) = v["format-specific"]["data"]["data-file"].as_str() {
        return Err(bad(format!(
            "the image names an external data file ({d}); upload a standalone one"
        )));
    }
    Ok(())
}

async fn receive<S, E>(body: &mut S, tmp: &PathBuf, expected: &str) -> AppResult<()>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let mut f = tokio::fs::File::create(tmp)
        .await
        .map_err(AppError::internal)?;
    let mut h = Sha256::new();
    let mut len = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk
            .map_err(|e| AppError::bad("upload_failed", format!("the upload broke off: {e}")))?;
        h.update(&chunk);
        len += chunk.len() as u64;
        f.write_all(&chunk).await.map_err(AppError::internal)?;
    }
    f.sync_all().await.map_err(AppError::internal)?;
    let got = hex::encode(h.finalize());
    if got != expected {
        return Err(AppError::bad(
            "checksum_mismatch",
            format!("the {len} bytes uploaded hash to sha256 {got}; the image declares {expected}"),
        ));
    }
    Ok(())
}
