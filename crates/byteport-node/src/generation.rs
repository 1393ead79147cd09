//! Report generations: every report the node makes of a VM carries a
//! number the control plane keeps only when it is higher than the last
//! one it applied. They must strictly increase across agent restarts and
//! clock steps, so they come from one counter of the node's, persisted in
//! its data directory by leases: the file holds the end of the block in
//! use, written (and synced) before a number of the next block is handed
//! out, and a restart starts at that end. A first start begins at the
//! clock's microseconds, so a node that reported clock-based numbers
//! before keeps going up.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Numbers handed out per write of the file.
const LEASE: u64 = 1 << 16;

pub struct Generations {
    path: PathBuf,
    /// (the next number, the end of the leased block)
    state: Mutex<(u64, u64)>,
}

fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn persist(path: &Path, end: u64) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    writeln!(f, "{end}")?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

impl Generations {
    /// The counter kept at `path`, continuing above anything it handed out.
    pub fn open(path: PathBuf) -> Generations {
        let stored = std::fs::read_to_string(&path)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0);
        let start = stored.max(now_micros()).max(1);
        let end = start + LEASE;
        if let Err(e) = persist(&path, end) {
            tracing::warn!(path = %path.display(), error = %e, "cannot keep the report generation");
        }
        Generations {
            path,
            state: Mutex::new((start, end)),
        }
    }

    /// The next generation, higher than every one before it.
    pub fn next(&self) -> u64 {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.0 >= s.1 {
            s.1 = s.0 + LEASE;
            if let Err(e) = persist(&self.path, s.1) {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot keep the report generation");
            }
        }
        let g = s.0;
        s.0 += 1;
        g
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generations_rise_across_restarts_and_a_clock_behind() {
        let dir = std::env::temp_dir().join(format!("bp-gen-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("report-generation");
        let g = Generations::open(path.clone());
        let mut last = 0;
        for _ in 0..(LEASE + 10) {
            let n = g.next();
            assert!(n > last);
            last = n;
        }
        drop(g);
        // Restarted: above everything handed out.
        let g = Generations::open(path.clone());
        assert!(g.next() > last);
        // A clock far behind what was handed out (the file says so): still
        // above it.
        let ahead = now_micros() + 10_000_000_000;
        persist(&path, ahead).unwrap();
        let g = Generations::open(path);
        assert!(g.next() >= ahead);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
