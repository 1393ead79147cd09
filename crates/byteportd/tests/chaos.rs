//! Chaos: a storm of creates and deletes against a control plane and a
//! separate node agent, both killed with -9 at random moments, several
//! times. At the end every VM the API accepted exists exactly once (or is
//! gone, if its deletion was accepted), and nothing is left that no VM
//! owns: no QEMU process, no VM directory, no reservation. The seed is
//! printed; `BYTEPORT_CHAOS_SEED=N` replays a run.

use byteport_testkit::daemon::{Daemon, qemus_under, tiny_or_skip};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_byteportd");

/// xorshift64*: enough randomness to pick moments, replayable by seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// What the test knows of a VM it asked for.
#[derive(Debug, PartialEq)]
enum Asked {
    /// Created (202), not deleted.
    Live,
    /// Its deletion was accepted.
    Deleted,
    /// The request got no answer (a process died under it): it may exist.
    Unknown,
}

/// The VM ids a QEMU command line names (`.../vms/ID/...`).
fn vm_of_qemu(pid: u32) -> Option<String> {
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let cmd = String::from_utf8_lossy(&cmd);
    let at = cmd.find("/vms/")? + 5;
    cmd.get(at..at + 36).map(str::to_owned)
}

fn all_vms(d: &Daemon) -> Vec<Value> {
    d.api
        .get("/v1/vms?limit=500")
        .map(|v| v["items"].as_array().cloned().unwrap_or_default())
        .unwrap_or_default()
}

#[test]
fn a_storm_with_kill_9s_of_server_and_node_leaves_every_vm_once_and_nothing_else() {
    let Some(img) = tiny_or_skip("chaos") else {
        return;
    };
    let seed = std::env::var("BYTEPORT_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                | 1
        });
    eprintln!("chaos seed {seed} (BYTEPORT_CHAOS_SEED={seed} replays it)");
    let mut rng = Rng(seed);
    let mut d = Daemon::start_split(Path::new(BIN));
    d.import_tiny(&img);
    let mut asked: BTreeMap<String, (Asked, Option<String>)> = BTreeMap::new();
    let mut kills = Vec::new();

    for round in 0..3 {
        let ops = 6 + rng.below(4);
        let kill_at = rng.below(ops);
        for op in 0..ops {
            if op == kill_at {
                // -9 the server, the node, or both; back after a moment.
                let which = rng.below(3);
                if which != 1 {
                    d.kill9();
                }
                if which != 0 {
                    d.kill9_node();
                }
                std::thread::sleep(Duration::from_millis(rng.below(1500)));
                if which != 1 {
                    d.respawn_server();
                }
                if which != 0 {
                    d.spawn_node();
                }
                kills.push(["server", "node", "both"][which as usize]);
            }
            let live: Vec<String> = asked
                .iter()
                .filter(|(_, (a, id))| *a == Asked::Live && id.is_some())
                .map(|(n, _)| n.clone())
                .collect();
            // At most 5 live at once: the node (2 cores, 8 vCPU slots with
            // its overcommit) runs all of them, so every one can settle.
            if !live.is_empty() && (live.len() >= 5 || rng.below(3) == 0) {
                let name = &live[rng.below(live.len() as u64) as usize];
                let id = asked[name].1.clone().unwrap_or_default();
                match d.api.delete(&format!("/v1/vms/{id}")) {
                    Ok(_) => asked.insert(name.clone(), (Asked::Deleted, Some(id))),
                    Err(e) if e.starts_with('4') => None,
                    // No answer: the deletion may or may not have landed.
                    Err(_) => asked.insert(name.clone(), (Asked::Unknown, Some(id))),
                };
            } else {
                let name = format!("c-{round}-{op}");
                let body = json!({"name": name, "image": "tiny", "vcpus": 1, "memory_mib": 128, "disk_gib": 1});
                let entry = match d.api.post("/v1/vms", body) {
                    Ok(v) => (Asked::Live, v["id"].as_str().map(str::to_owned)),
                    Err(e) if e.starts_with('4') => continue,
                    Err(_) => (Asked::Unknown, None),
                };
                asked.insert(name, entry);
            }
            std::thread::sleep(Duration::from_millis(rng.below(400)));
        }
    }
    eprintln!("kills: {kills:?}; asked: {} VMs", asked.len());

    // Both processes up; everything settles.
    let deadline = Instant::now() + Duration::from_secs(240);
    let settled = loop {
        let vms = all_vms(&d);
        let states: BTreeMap<String, String> = vms
            .iter()
            .map(|v| {
                (
                    v["name"].as_str().unwrap_or("").to_owned(),
                    v["state"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect();
        let live_ok = asked
            .iter()
            .filter(|(_, (a, _))| *a == Asked::Live)
            .all(|(n, _)| states.get(n).is_some_and(|s| s == "running"));
        let gone_ok = asked
            .iter()
            .filter(|(_, (a, _))| *a == Asked::Deleted)
            .all(|(n, _)| !states.contains_key(n));
        let quiet = vms
            .iter()
            .all(|v| matches!(v["state"].as_str(), Some("running")));
        if live_ok && gone_ok && quiet {
            break vms;
        }
        assert!(
            Instant::now() < deadline,
            "did not settle: {states:?}\nasked: {asked:?}\nlog: {}",
            byteport_testkit::daemon::tail(&d.log(), 3000)
        );
        std::thread::sleep(Duration::from_millis(500));
    };

    // Each VM once; none that the test did not ask for.
    let mut names = BTreeSet::new();
    for v in &settled {
        let n = v["name"].as_str().unwrap().to_owned();
        assert!(names.insert(n.clone()), "{n} listed twice");
        assert!(asked.contains_key(&n), "{n} was never asked for");
        assert_ne!(
            asked[&n].0,
            Asked::Deleted,
            "{n} came back after its deletion"
        );
    }
    let ids: BTreeSet<String> = settled
        .iter()
        .map(|v| v["id"].as_str().unwrap().to_owned())
        .collect();
    // One QEMU per VM, and none for anything else.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut owners: Vec<String> = qemus_under(&d.dir)
            .into_iter()
            .filter_map(vm_of_qemu)
            .collect();
        owners.sort();
        let unique: BTreeSet<String> = owners.iter().cloned().collect();
        let dirs: BTreeSet<String> = std::fs::read_dir(d.dir.join("node/vms"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        if unique == ids && owners.len() == ids.len() && dirs == ids {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "left over: QEMUs for {owners:?}, directories {dirs:?}, VMs {ids:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // The node holds exactly what its VMs need (all of them run).
    let node = &d.api.get("/v1/nodes").unwrap()[0];
    let sum = |f: &str| settled.iter().map(|v| v[f].as_u64().unwrap()).sum::<u64>();
    assert_eq!(
        node["reserved"]["vcpus"].as_u64().unwrap(),
        sum("vcpus"),
        "{node}"
    );
    assert_eq!(
        node["reserved"]["memory_mib"].as_u64().unwrap(),
        sum("memory_mib"),
        "{node}"
    );
    assert_eq!(
        node["reserved"]["disk_gib"].as_u64().unwrap(),
        sum("disk_gib"),
        "{node}"
    );
    eprintln!(
        "settled: {} VMs running, {} deleted, {} unanswered requests",
        settled.len(),
        asked.values().filter(|(a, _)| *a == Asked::Deleted).count(),
        asked.values().filter(|(a, _)| *a == Asked::Unknown).count()
    );
}
