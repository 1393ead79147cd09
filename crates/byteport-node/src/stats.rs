//! Per-VM figures measured from the host, sent with each heartbeat: CPU
//! and resident memory of each VM's hypervisor process (from /proc), and
//! what its disk file takes on the host. Nothing runs in the guest.

use crate::driver::files;
use byteport_types::VmId;
use byteport_types::api::VmStats;
use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Instant;

/// Linux reports process CPU time in USER_HZ ticks, 100 a second.
const TICK_MS: u64 = 10;

/// A rate needs at least this long between readings: CPU time comes in
/// 10 ms ticks, and heartbeats can follow each other within milliseconds.
const MIN_INTERVAL_MS: u64 = 1000;

/// What the previous reading of a VM was, for a rate.
#[derive(Clone, Copy)]
struct Reading {
    pid: u32,
    ticks: u64,
    at: Instant,
    /// The rate computed when this reading was taken.
    percent: Option<f32>,
}

/// Remembers each VM's previous CPU reading, for a rate.
#[derive(Default)]
pub struct Sampler {
    last: HashMap<VmId, Reading>,
}

/// What /proc says of one process: CPU ticks, resident KiB, start time in
/// ticks after boot.
struct Proc {
    ticks: u64,
    rss_kib: u64,
    start_ticks: u64,
}

fn read_proc(pid: u32, dir: &Path) -> Option<Proc> {
    // The pid must still be this VM's QEMU (a pidfile outlives it): it
    // names the VM's disk, whichever engine started it (libvirt hands
    // QEMU its sockets as descriptors, so only paths of files show).
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let needle = dir.join(files::DISK).display().to_string();
    if !String::from_utf8_lossy(&cmdline).contains(&needle) {
        return None;
    }
    proc_figures(pid)
}

fn proc_figures(pid: u32) -> Option<Proc> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let f: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // After the name: state [0], utime [11], stime [12], starttime [19].
    let num = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok());
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    Some(Proc {
        ticks: num(11)? + num(12)?,
        rss_kib,
        start_ticks: num(19)?,
    })
}

fn uptime_ticks() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/uptime").ok()?;
    let secs: f64 = s.split_whitespace().next()?.parse().ok()?;
    Some((secs * 1000.0) as u64 / TICK_MS)
}

/// The reading after `prev`: a rate only against the same process (a
/// restart is a new pid) and over at least [`MIN_INTERVAL_MS`]; sooner,
/// the previous reading and its rate stand.
fn next_reading(prev: Option<Reading>, pid: u32, ticks: u64, now: Instant) -> Reading {
    let fresh = Reading {
        pid,
        ticks,
        at: now,
        percent: None,
    };
    let Some(r) = prev.filter(|r| r.pid == pid && ticks >= r.ticks) else {
        return fresh;
    };
    let wall = now.duration_since(r.at).as_millis() as u64;
    if wall < MIN_INTERVAL_MS {
        return r;
    }
    let pct = ((ticks - r.ticks) * TICK_MS * 100) as f32 / wall as f32;
    Reading {
        percent: Some((pct * 10.0).round() / 10.0),
        ..fresh
    }
}

impl Sampler {
    /// Figures for each VM in `vms_dir` among `ids` that has a live QEMU.
    pub fn sample(&mut self, vms_dir: &Path, ids: impl IntoIterator<Item = VmId>) -> Vec<VmStats> {
        let now = Instant::now();
        let boot = uptime_ticks();
        let mut out = Vec::new();
        let mut seen = HashMap::new();
        for id in ids {
            let dir = vms_dir.join(id.to_string());
            let Some(pid) = std::fs::read_to_string(dir.join(files::PIDFILE))
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
            else {
                continue;
            };
            let Some(p) = read_proc(pid, &dir) else {
                continue;
            };
            let reading = next_reading(self.last.get(&id).copied(), pid, p.ticks, now);
            seen.insert(id, reading);
            let cpu_percent = reading.percent;
            let disk_used = std::fs::metadata(dir.join(files::DISK))
                .map(|m| m.blocks() * 512)
                .unwrap_or(0);
            out.push(VmStats {
                id,
                cpu_percent,
                cpu_time_ms: p.ticks * TICK_MS,
                memory_rss_mib: p.rss_kib / 1024,
                disk_used_mib: disk_used >> 20,
                uptime_secs: boot
                    .map(|b| b.saturating_sub(p.start_ticks) * TICK_MS / 1000)
                    .unwrap_or(0),
                cgroup_memory_mib: None,
                cgroup_memory_limit_mib: None,
            });
        }
        self.last = seen;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stale_pidfile_gives_no_figures() {
        let tmp = tempfile::tempdir().unwrap();
        let id = VmId(uuid::Uuid::now_v7());
        let dir = tmp.path().join(id.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        // A live pid, but not this VM's QEMU (its command line does not
        // name the VM's disk).
        std::fs::write(
            dir.join(files::PIDFILE),
            format!("{}\n", std::process::id()),
        )
        .unwrap();
        let mut s = Sampler::default();
        assert!(s.sample(tmp.path(), [id]).is_empty());
        std::fs::write(dir.join(files::PIDFILE), "not a pid").unwrap();
        assert!(s.sample(tmp.path(), [id]).is_empty());
    }

    #[test]
    fn a_rate_needs_the_same_process_and_a_second() {
        let t0 = Instant::now();
        let first = next_reading(None, 7, 100, t0);
        assert_eq!(first.percent, None);
        // 50 ticks (500 ms of CPU) in 2 s: 25 %.
        let two_s = t0 + std::time::Duration::from_secs(2);
        let r = next_reading(Some(first), 7, 150, two_s);
        assert_eq!(r.percent, Some(25.0));
        // 30 ms later, 3 ticks more: too short to say; the 25 % stands.
        let soon = two_s + std::time::Duration::from_millis(30);
        let s = next_reading(Some(r), 7, 153, soon);
        assert_eq!((s.percent, s.ticks), (Some(25.0), 150));
        // Another pid (QEMU restarted): no rate yet.
        assert_eq!(next_reading(Some(r), 8, 5, soon).percent, None);
        // Two busy threads for a second: 200 %.
        let later = two_s + std::time::Duration::from_secs(1);
        assert_eq!(next_reading(Some(r), 7, 350, later).percent, Some(200.0));
    }

    #[test]
    fn a_process_has_cpu_time_memory_and_a_start() {
        // Burn a little CPU so the reading is not zero.
        let t = Instant::now();
        let mut x = 0u64;
        while t.elapsed().as_millis() < 60 {
            x = x.wrapping_mul(31).wrapping_add(7);
        }
        assert_ne!(x, 1);
        let p = proc_figures(std::process::id()).expect("our own /proc entry");
        assert!(p.ticks > 0, "CPU ticks");
        assert!(p.rss_kib > 1024, "resident memory {} KiB", p.rss_kib);
        assert!(p.start_ticks <= uptime_ticks().unwrap());
    }
}
