//! The node's content-addressed image cache: files named by their sha256,
//! fetched from the control plane once and verified, shared by every VM
//! that boots them; and each VM's disk, a qcow2 overlay on a cached base
//! (or a blank qcow2 for images that boot from a kernel and initramfs).

use crate::client::ControlPlane;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub struct ImageCache {
    dir: PathBuf,
    fetching: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl ImageCache {
    pub fn new(dir: PathBuf) -> Self {
        ImageCache {
            dir,
            fetching: Mutex::default(),
        }
    }

    pub fn path(&self, sha256: &str) -> PathBuf {
        self.dir.join(sha256)
    }

    /// Any cached file whose first bytes look like a Linux kernel, for the
    /// KVM probe.
    pub fn any_kernel(&self) -> Option<PathBuf> {
        for e in std::fs::read_dir(&self.dir).ok()?.flatten() {
            let mut head = [0u8; 0x210];
            if let Ok(mut f) = std::fs::File::open(e.path()) {
                use std::io::Read;
                if f.read_exact(&mut head).is_ok() && &head[0x202..0x206] == b"HdrS" {
                    return Some(e.path());
                }
            }
        }
        None
    }

    /// The uncompressed kernel (an ELF with a PVH entry) inside a cached
    /// x86 `bzImage`, made once beside it as `SHA.vmlinux`: QEMU's microvm
    /// machine boots it directly, without the kernel's own decompression,
    /// which takes seconds under TCG. `None` (and the bzImage is booted)
    /// when the payload is not xz, `xz` is missing, or the ELF has no PVH
    /// note.
    pub async fn pvh_kernel(&self, bzimage: &Path) -> Option<PathBuf> {
        let out = bzimage.with_extension("vmlinux");
        if out.exists() {
            return Some(out);
        }
        let image = tokio::fs::read(bzimage).await.ok()?;
        let at = find(&image, b"\xfd7zXZ\x00")?;
        let mut child = tokio::process::Command::new("xz")
            .args(["--decompress", "--single-stream", "--stdout"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .ok()?;
        let mut stdin = child.stdin.take()?;
        let payload = image[at..].to_vec();
        let feed = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            // xz stops reading after the stream: a broken pipe is fine.
            let _ = stdin.write_all(&payload).await;
        });
        let done = child.wait_with_output().await.ok()?;
        let _ = feed.await;
        if !done.status.success() || !has_pvh_note(&done.stdout) {
            tracing::info!(kernel = %bzimage.display(), "no PVH kernel in it; microvm boots the bzImage");
            return None;
        }
        let part = bzimage.with_extension("vmlinux.part");
        tokio::fs::write(&part, &done.stdout).await.ok()?;
        tokio::fs::rename(&part, &out).await.ok()?;
        tracing::info!(kernel = %bzimage.display(), bytes = done.stdout.len(), "uncompressed the kernel for microvm");
        Some(out)
    }

    /// The local path of a file, downloading and verifying it first if it
    /// is not cached. Concurrent callers for one file download it once.
    pub async fn ensure(
        &self,
        cp: &ControlPlane,
        credential: &str,
        sha256: &str,
    ) -> Result<PathBuf, String> {
        if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("image file id {sha256:?} is not a sha256"));
        }
        let path = self.path(sha256);
        if path.exists() {
            return Ok(path);
        }
        let lock = {
            let mut f = self.fetching.lock().map_err(|_| "cache lock poisoned")?;
            f.entry(sha256.to_owned()).or_default().clone()
        };
        let _g = lock.lock().await;
        if path.exists() {
            return Ok(path);
        }
        std::fs::create_dir_all(&self.dir).map_err(|e| format!("image cache: {e}"))?;
        let part = self
            .dir
            .join(format!(".part-{sha256}-{}", uuid::Uuid::new_v4()));
        let started = std::time::Instant::now();
        match cp.download(credential, sha256, part.clone()).await {
            Ok(n) => {
                std::fs::rename(&part, &path).map_err(|e| format!("image cache: {e}"))?;
                tracing::info!(
                    sha256,
                    bytes = n,
                    ms = started.elapsed().as_millis() as u64,
                    "image file cached"
                );
                Ok(path)
            }
            Err(e) => {
                let _ = std::fs::remove_file(&part);
                Err(format!("cannot fetch image file {sha256}: {e}"))
            }
        }
    }
}

/// Creates a VM's disk: an overlay on `base` (format `base_format`), or a
/// blank qcow2 when there is no base; `size_gib` is its virtual size.
pub async fn create_disk(
    disk: &Path,
    base: Option<(&Path, &str)>,
    size_gib: u64,
) -> Result<(), String> {
    let mut cmd = tokio::process::Command::new("qemu-img");
    cmd.args(["create", "-q", "-f", "qcow2"]);
    if let Some((b, fmt)) = base {
        cmd.arg("-b").arg(b).arg("-F").arg(fmt);
    }
    cmd.arg(disk).arg(format!("{size_gib}G"));
    let out = cmd
        .output()
        .await
        .map_err(|e| format!("cannot run qemu-img: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "qemu-img create failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An overlay records only what the guest writes: it costs the same for
    /// any size of base, and the base is never copied or changed.
    #[tokio::test]
    async fn an_overlay_is_small_whatever_the_size_of_its_base() {
        if crate::vm::tests::skip_without_qemu_img() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        for gib in [1u64, 100] {
            let base = dir.path().join(format!("base-{gib}.qcow2"));
            create_disk(&base, None, gib).await.unwrap();
            let before = std::fs::read(&base).unwrap();
            let vm = dir.path().join(format!("vm-{gib}.qcow2"));
            create_disk(&vm, Some((&base, "qcow2")), gib + 10)
                .await
                .unwrap();
            let size = std::fs::metadata(&vm).unwrap().len();
            assert!(
                size < 1024 * 1024,
                "a {gib} GiB base made a {size}-byte overlay"
            );
            assert_eq!(
                std::fs::read(&base).unwrap(),
                before,
                "the base is untouched"
            );
            let info = tokio::process::Command::new("qemu-img")
                .args(["info", "--output=json"])
                .arg(&vm)
                .output()
                .await
                .unwrap();
            let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
            assert_eq!(info["virtual-size"].as_u64(), Some((gib + 10) << 30));
            assert!(
                info["backing-filename"]
                    .as_str()
                    .unwrap()
                    .ends_with(&format!("base-{gib}.qcow2"))
            );
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Whether an ELF kernel has the PVH entry note (`Xen`, type 18,
/// `XEN_ELFNOTE_PHYS32_ENTRY`) that QEMU needs to boot it uncompressed.
fn has_pvh_note(elf: &[u8]) -> bool {
    // namesz 4, then descsz, then type 18, then "Xen\0".
    elf.starts_with(b"\x7fELF")
        && elf
            .windows(16)
            .any(|w| w[0..4] == [4, 0, 0, 0] && w[8..12] == [18, 0, 0, 0] && &w[12..16] == b"Xen\0")
}

#[cfg(test)]
mod pvh_tests {
    use super::*;

    #[test]
    fn a_pvh_note_is_found_and_its_absence_seen() {
        let mut elf = b"\x7fELF".to_vec();
        elf.extend([0u8; 40]);
        assert!(!has_pvh_note(&elf));
        elf.extend([4, 0, 0, 0, 8, 0, 0, 0, 18, 0, 0, 0]);
        elf.extend(b"Xen\0");
        assert!(has_pvh_note(&elf));
        assert!(!has_pvh_note(&elf[1..]), "not an ELF");
    }
}
