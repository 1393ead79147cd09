//! Each VM's serial console log is bounded: a guest printing forever must
//! not fill the node's disk. QEMU appends to `console.log` (`logappend=on`,
//! so the file may be cut under it); once a second every VM's log over the
//! limit is copied to `console.log.1` (replacing the previous one) and cut
//! to nothing, logrotate's copy-and-truncate. A VM's log thus takes at most
//! twice the limit plus what the guest prints in a second; what it prints
//! between the copy and the cut is lost.

use crate::driver::files;
use std::path::Path;
use std::time::Duration;

/// The limit when the node is not told one.
pub const DEFAULT_MAX: u64 = 4 << 20;

/// The log's previous part.
pub const OLD: &str = "console.log.1";

/// Cuts `dir`'s console log if it is over `max`; whether it did.
pub fn bound(dir: &Path, max: u64) -> std::io::Result<bool> {
    let log = dir.join(files::CONSOLE_LOG);
    let len = match std::fs::metadata(&log) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if len <= max {
        return Ok(false);
    }
    std::fs::copy(&log, dir.join(OLD))?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&log)?
        .set_len(0)?;
    Ok(true)
}

/// Bounds every VM's log under `vms_dir` once a second, for good.
pub async fn keep_bounded(vms_dir: std::path::PathBuf, max: u64) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let dir = vms_dir.clone();
        let _ = tokio::task::spawn_blocking(move || {
            for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                if let Err(err) = bound(&e.path(), max) {
                    tracing::warn!(vm = %e.path().display(), error = %err, "cannot bound a console log");
                }
            }
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_log_over_the_limit_is_kept_once_and_cut() {
        let dir = std::env::temp_dir().join(format!("bp-console-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join(files::CONSOLE_LOG);
        // Appending, as QEMU does.
        let mut w = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        w.write_all(&[b'a'; 100]).unwrap();
        assert!(!bound(&dir, 1000).unwrap());
        w.write_all(&[b'b'; 1000]).unwrap();
        assert!(bound(&dir, 1000).unwrap());
        assert_eq!(std::fs::metadata(dir.join(OLD)).unwrap().len(), 1100);
        assert_eq!(std::fs::metadata(&log).unwrap().len(), 0);
        // The writer goes on at the new end, not past a hole.
        w.write_all(b"next\n").unwrap();
        assert_eq!(std::fs::read(&log).unwrap(), b"next\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
