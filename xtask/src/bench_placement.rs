//! `cargo xtask bench placement`: how fast the real scheduler with the real
//! store places VMs, on SQLite and on PostgreSQL, for 100 to 5,000 nodes.
//!
//! For every backend and node count it creates a fresh database, registers
//! N simulated nodes of varied size through the store (a join token each),
//! inserts the VMs as pending rows (`DataStore::vm_insert`), then places
//! them all, measuring decision (`byteport_scheduler::place`) plus committed
//! reservation (`DataStore::vm_place`) per VM. Each variant runs on its own
//! fresh database:
//!
//! - `per-vm`: an inventory read (`node_list()`) for every VM, then
//!   decide and `vm_place`, up to 3 attempts: what `App::place_vm` did for
//!   one VM (placement on create) before the shared inventory, kept as the
//!   baseline of `create`. A loop here repeats those steps so that every
//!   placement can be timed.
//! - `create`: `App::place_vm` for every VM, one at a time, each timed:
//!   what a create does inline, on the control plane's shared inventory
//!   (read once, kept up to date, re-read after its time to live).
//! - `app`: the control plane's own `App::place_pending()`, called until it
//!   places nothing (passes of up to 500 VMs, one inventory read per pass).
//!   Only whole passes can be timed from outside: no p50/p99.
//! - `cached`: the inventory is read once per placer for the whole run;
//!   each VM is decided on it in memory and committed with `vm_place`; on
//!   success the cached node's reservation is bumped, and only a lost race
//!   (or a no-fit) re-reads it. On PostgreSQL it also runs with several
//!   placers at once, each with its own cache (as several control-plane
//!   replicas would), so only the store's row guard keeps them from
//!   overfilling a node.
//! - `fill`: `cached` with several placers on 25 identical nodes and
//!   exactly as many identical VMs as fill every node to its limit, with
//!   the pack policy (all placers aim at the same node until it is full)
//!   and unequal shares: races are certain, and the check below also
//!   demands every node be exactly full. A correctness check under
//!   contention, not a speed figure.
//!
//! After every run the store is checked: every VM placed exactly once, and
//! on every node the sum of its VMs' sizes equals its reservation and stays
//! within capacity × overcommit. A violation fails the benchmark.
//!
//! Options: `--quick` (100 and 1,000 nodes, 2,000 VMs, 300 timed `per-vm`
//! placements), `--vms N` (default 10,000), `--nodes LIST` (comma-separated,
//! default `100,1000,5000`), `--placers N` (concurrent placers of the
//! `cached` variant on PostgreSQL and of `fill`, default 4),
//! `--per-vm-sample N|all` (how many `per-vm` placements to time, default
//! 2,000: each costs an inventory read, and the rest is placed untimed by
//! the cached path), `--sqlite-only`. See `docs/benchmarks.md`.

use anyhow::{Context, bail, ensure};
use byteport_scheduler::{Decision, NodeInventory, Overcommit, Policy, Request, Resources};
use byteport_server::app::placement::{inventory, to_size};
use byteport_server::{App, Settings};
use byteport_store::{DataStore, Size, VmFilter, image, join_token, node, project, vm};
use chrono::Utc;
use sea_orm::{ConnectionTrait, Database};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;
use uuid::Uuid;

/// As in `App::place_vm`.
const RACE_RETRIES: usize = 3;
/// Attempts per VM for a cached placer before the benchmark gives up.
/// Every lost race means another placer took the room, so this only
/// guards against a bug.
const CACHED_RETRIES: usize = 1000;
/// VMs per project: the quota check scans the project's VMs on insert.
const VMS_PER_PROJECT: usize = 1000;
/// Concurrent inserts while filling a PostgreSQL database.
const SETUP_TASKS: usize = 8;

struct Opts {
    vms: usize,
    nodes: Vec<usize>,
    placers: usize,
    /// How many `per-vm` placements to time (the rest is placed untimed).
    per_vm_sample: usize,
    sqlite_only: bool,
    quick: bool,
}

fn parse_args(args: &[&str]) -> anyhow::Result<Opts> {
    let usage = "usage: cargo xtask bench placement [--quick] [--vms N] [--nodes LIST] \
                 [--placers N] [--per-vm-sample N|all] [--sqlite-only]";
    let mut o = Opts {
        vms: 10_000,
        nodes: vec![100, 1000, 5000],
        placers: 4,
        per_vm_sample: 2000,
        sqlite_only: false,
        quick: false,
    };
    let (mut vms, mut nodes, mut sample) = (None, None, None);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = |name: &str| -> anyhow::Result<&str> {
            it.next()
                .copied()
                .with_context(|| format!("{name} needs a value; {usage}"))
        };
        match *a {
            "--quick" => o.quick = true,
            "--sqlite-only" => o.sqlite_only = true,
            "--vms" => vms = Some(positive(a, val(a)?)?),
            "--placers" => o.placers = positive(a, val(a)?)?,
            "--per-vm-sample" => {
                sample = Some(match val(a)? {
                    "all" => usize::MAX,
                    v => positive(a, v)?,
                })
            }
            "--nodes" => {
                let v = val(a)?;
                nodes = Some(
                    v.split(',')
                        .map(|n| positive(a, n.trim()))
                        .collect::<anyhow::Result<Vec<_>>>()?,
                );
            }
            other => bail!("unknown option {other}; {usage}"),
        }
    }
    if o.quick {
        o.vms = 2000;
        o.nodes = vec![100, 1000];
        o.per_vm_sample = 300;
    }
    if let Some(v) = vms {
        o.vms = v;
    }
    if let Some(n) = nodes {
        o.nodes = n;
    }
    if let Some(s) = sample {
        o.per_vm_sample = s;
    }
    Ok(o)
}

fn positive(name: &str, v: &str) -> anyhow::Result<usize> {
    v.replace('_', "")
        .parse::<usize>()
        .ok()
        .filter(|n| *n > 0)
        .with_context(|| format!("{name}: not a positive number: {v}"))
}

pub fn run(root: &Path, args: &[&str]) -> anyhow::Result<()> {
    let opts = parse_args(args)?;
    // Measure optimised code: the store and scheduler are workspace crates,
    // built without optimisation in the dev profile.
    if cfg!(debug_assertions) {
        return crate::run(
            Command::new("cargo")
                .current_dir(root)
                .args([
                    "run",
                    "--quiet",
                    "--release",
                    "-p",
                    "xtask",
                    "--features",
                    "bench",
                    "--",
                    "bench",
                    "placement",
                ])
                .args(args),
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let started = Instant::now();
    eprintln!(
        "placement benchmark: {} VMs on {:?} nodes{}",
        opts.vms,
        opts.nodes,
        if opts.quick { " (quick)" } else { "" }
    );
    let tmp = TempDir::new()?;
    let mut results = Vec::new();
    for (i, (n, variant, placers)) in configurations(&opts, false).into_iter().enumerate() {
        let url = format!(
            "sqlite://{}?mode=rwc",
            tmp.0
                .join(format!("{i}-{n}-{}.db", variant.name()))
                .display()
        );
        let r = rt.block_on(bench_one(
            &url, "sqlite", n, variant, placers, &opts, &tmp.0,
        ))?;
        r.print_progress();
        results.push(r);
    }
    if !opts.sqlite_only {
        let pg = crate::pg::Postgres::start().context("starting PostgreSQL for the benchmark")?;
        eprintln!("PostgreSQL for the benchmark: {}", pg.url);
        let res = (|| -> anyhow::Result<()> {
            for (n, variant, placers) in configurations(&opts, true) {
                let url = rt.block_on(fresh_pg_database(&pg.url))?;
                let r = rt.block_on(bench_one(
                    &url,
                    "postgresql",
                    n,
                    variant,
                    placers,
                    &opts,
                    &tmp.0,
                ))?;
                r.print_progress();
                results.push(r);
            }
            Ok(())
        })();
        drop(pg);
        res?;
    }
    print_report(&results, &opts);
    eprintln!(
        "placement benchmark done in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// (nodes, variant, placers) in the order they run. Several cached placers
/// run on PostgreSQL only (SQLite has one writer); the fill check runs on
/// both. `--quick` leaves out PostgreSQL's single cached placer (`app` is
/// the same path with one placer) to stay near a minute.
fn configurations(opts: &Opts, pg: bool) -> Vec<(usize, Variant, usize)> {
    let mut c = Vec::new();
    for &n in &opts.nodes {
        c.push((n, Variant::PerVm, 1));
        c.push((n, Variant::Create, 1));
        c.push((n, Variant::App, 1));
        if !(pg && opts.quick && opts.placers > 1) {
            c.push((n, Variant::Cached, 1));
        }
        if pg && opts.placers > 1 {
            c.push((n, Variant::Cached, opts.placers));
        }
    }
    c.push((FULL_NODES, Variant::Fill, opts.placers));
    c
}

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> anyhow::Result<Self> {
        let p =
            std::env::temp_dir().join(format!("byteport-bench-placement-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p)?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A new, empty database in the benchmark's cluster.
async fn fresh_pg_database(base: &str) -> anyhow::Result<String> {
    let name = format!("bp_bench_{}", Uuid::new_v4().simple());
    let admin = Database::connect(base)
        .await
        .context("connecting to PostgreSQL")?;
    admin
        .execute_unprepared(&format!("CREATE DATABASE {name}"))
        .await
        .context("creating a benchmark database")?;
    admin.close().await?;
    let (root, _) = base
        .rsplit_once('/')
        .context("a URL with a database name")?;
    Ok(format!("{root}/{name}"))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    /// A fresh inventory read for every VM, as `App::place_vm` did for a
    /// single VM (placement on create) before the shared inventory.
    PerVm,
    /// What a create does today: `App::place_vm` for one VM at a time, on
    /// the control plane's shared inventory.
    Create,
    /// The control plane's own background path: `App::place_pending()`
    /// until nothing is left (passes of up to 500 VMs, one inventory read
    /// per pass).
    App,
    /// One inventory read for the whole run per placer, kept up to date in
    /// memory, re-read only after a lost race.
    Cached,
    /// `Cached` on a uniform fleet that the VMs fill to exactly 100%: with
    /// several placers, races are certain and only the row guard stops an
    /// overfill (a contention check rather than a speed figure).
    Fill,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::PerVm => "per-vm",
            Variant::Create => "create",
            Variant::App => "app",
            Variant::Cached => "cached",
            Variant::Fill => "fill",
        }
    }
}

/// One configuration's figures.
struct RunResult {
    backend: &'static str,
    nodes: usize,
    variant: Variant,
    placers: usize,
    placed: usize,
    secs: f64,
    /// Every placement's latency in microseconds, sorted; empty when the
    /// variant cannot time placements one by one (`app`).
    lat_us: Vec<u64>,
    /// Lost races, when the variant can see them.
    lost_races: Option<u64>,
    inventory_reads: u64,
    setup_secs: f64,
    /// Where the time went, when the variant can see it.
    split: Option<Split>,
}

impl RunResult {
    fn new(variant: Variant, placers: usize) -> Self {
        RunResult {
            backend: "",
            nodes: 0,
            variant,
            placers,
            placed: 0,
            secs: 0.0,
            lat_us: Vec::new(),
            lost_races: Some(0),
            inventory_reads: 0,
            setup_secs: 0.0,
            split: None,
        }
    }

    fn per_s(&self) -> f64 {
        if self.secs > 0.0 {
            self.placed as f64 / self.secs
        } else {
            0.0
        }
    }

    /// Wall time per placement, in ms (the cost the ratios compare).
    fn cost_ms(&self) -> f64 {
        if self.placed > 0 {
            self.secs * 1000.0 / self.placed as f64
        } else {
            0.0
        }
    }

    /// Nearest-rank percentile of the per-placement latencies.
    fn pct_ms(&self, p: f64) -> Option<f64> {
        if self.lat_us.is_empty() {
            return None;
        }
        let rank = ((p * self.lat_us.len() as f64).ceil() as usize).clamp(1, self.lat_us.len());
        Some(self.lat_us[rank - 1] as f64 / 1000.0)
    }

    fn mean_ms(&self) -> f64 {
        if self.lat_us.is_empty() {
            return self.cost_ms();
        }
        self.lat_us.iter().sum::<u64>() as f64 / self.lat_us.len() as f64 / 1000.0
    }

    fn print_progress(&self) {
        eprintln!(
            "  {} {} nodes {} x{}: {} placements in {:.2} s = {:.0}/s, p50 {} ms, p99 {} ms \
             (setup {:.1} s)",
            self.backend,
            self.nodes,
            self.variant.name(),
            self.placers,
            self.placed,
            self.secs,
            self.per_s(),
            ms(self.pct_ms(0.5)),
            ms(self.pct_ms(0.99)),
            self.setup_secs
        );
    }
}

fn ms(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.3}")).unwrap_or_else(|| "-".into())
}

// ---------- the simulated fleet ----------

/// A small deterministic generator (splitmix64): the same fleet every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// The simulated fleet and its VMs.
#[derive(Clone, Copy, Debug)]
enum Fleet {
    /// Nodes of 8 to 64 vCPUs, VMs of mixed sizes; the fleet keeps room.
    Varied(usize),
    /// Identical nodes (8 vCPUs, 32 GiB, 320 GiB) and identical VMs (1 vCPU,
    /// 1 GiB, 10 GiB), exactly as many as fill every node to its limit.
    Full(usize),
}

impl Fleet {
    fn nodes(self) -> usize {
        match self {
            Fleet::Varied(n) | Fleet::Full(n) => n,
        }
    }

    fn full(self) -> bool {
        matches!(self, Fleet::Full(_))
    }

    fn capacities(self) -> Vec<Resources> {
        match self {
            Fleet::Varied(n) => {
                let mut rng = Rng(0x0b17_e9f0);
                (0..n).map(|_| node_capacity(&mut rng)).collect()
            }
            Fleet::Full(n) => vec![FULL_NODE; n],
        }
    }

    /// How many VMs fill a `Full` fleet exactly.
    fn vms_to_fill(self) -> usize {
        let l = control_plane().1.limit(FULL_NODE);
        let per_node = (l.vcpus / FULL_VM.vcpus)
            .min(l.memory_mib / FULL_VM.memory_mib)
            .min(l.disk_gib / FULL_VM.disk_gib);
        self.nodes() * per_node as usize
    }

    fn vm_size(self, i: usize) -> Size {
        match self {
            Fleet::Varied(_) => vm_size(i),
            Fleet::Full(_) => FULL_VM,
        }
    }
}

const FULL_NODE: Resources = Resources {
    vcpus: 8,
    memory_mib: 32 * 1024,
    disk_gib: 320,
};
const FULL_VM: Size = Size {
    vcpus: 1,
    memory_mib: 1024,
    disk_gib: 10,
};
/// Nodes of the fill-to-the-brim contention check.
const FULL_NODES: usize = 25;

/// A varied node: 8 to 64 vCPUs, 4 GiB of memory and 64 GiB of disk per
/// vCPU (32 to 256 GiB, 512 to 4,096 GiB).
fn node_capacity(rng: &mut Rng) -> Resources {
    let vcpus = 8 * (1 + (rng.next() % 8) as i64);
    Resources {
        vcpus,
        memory_mib: vcpus * 4 * 1024,
        disk_gib: vcpus * 64,
    }
}

/// VM `i`'s size: mostly 1 vCPU, 512 MiB to 2 GiB (1,152 MiB on average).
fn vm_size(i: usize) -> Size {
    const SIZES: [(i64, i64, i64); 8] = [
        (1, 512, 10),
        (1, 1024, 10),
        (1, 1024, 10),
        (1, 2048, 20),
        (1, 512, 10),
        (1, 1024, 10),
        (1, 1024, 10),
        (2, 2048, 20),
    ];
    let (vcpus, memory_mib, disk_gib) = SIZES[i % SIZES.len()];
    Size {
        vcpus,
        memory_mib,
        disk_gib,
    }
}

/// The control plane's default policy and overcommit (what `App::place_vm`
/// uses for a VM that asks for nothing).
fn control_plane() -> (Policy, Overcommit) {
    let s = Settings::default();
    (s.placement_policy, s.overcommit)
}

fn limit_of(n: &node::Model) -> Resources {
    control_plane().1.limit(inventory(n).capacity)
}

fn request(v: &vm::Model, arch: String) -> Request<Uuid> {
    Request {
        size: Resources {
            vcpus: v.vcpus,
            memory_mib: v.memory_mib,
            disk_gib: v.disk_gib,
        },
        arch,
        engine: v.engine.clone(),
        region: None,
        avoid: Vec::new(),
    }
}

fn size_of(v: &vm::Model) -> Size {
    Size {
        vcpus: v.vcpus,
        memory_mib: v.memory_mib,
        disk_gib: v.disk_gib,
    }
}

/// Fills a fresh store: an image, `nodes` online nodes, `vms` pending VMs.
async fn setup(store: &DataStore, fleet: Fleet, vms: usize) -> anyhow::Result<()> {
    let nodes = fleet.nodes();
    let now = Utc::now();
    store
        .image_insert(image::Model {
            id: Uuid::now_v7(),
            name: "bench".into(),
            os_family: "linux".into(),
            os_version: "1".into(),
            arch: "x86_64".into(),
            format: "raw".into(),
            size_bytes: 1 << 20,
            sha256: "0".repeat(64),
            boot: "direct".into(),
            kernel_sha256: None,
            initrd_sha256: None,
            cmdline: None,
            has_agent: false,
            status: "ready".into(),
            created_at: now,
            login_user: None,
        })
        .await?;
    let img = store
        .image_fetch_by_name("bench")
        .await?
        .context("the bench image")?;

    // The fleet must hold every VM, or the run measures no-fits.
    let caps = fleet.capacities();
    let over = control_plane().1;
    let room = caps.iter().fold(Resources::default(), |a, c| {
        let l = over.limit(*c);
        Resources {
            vcpus: a.vcpus + l.vcpus,
            memory_mib: a.memory_mib + l.memory_mib,
            disk_gib: a.disk_gib + l.disk_gib,
        }
    });
    let need = (0..vms)
        .map(|i| fleet.vm_size(i))
        .fold(Resources::default(), |a, s| Resources {
            vcpus: a.vcpus + s.vcpus,
            memory_mib: a.memory_mib + s.memory_mib,
            disk_gib: a.disk_gib + s.disk_gib,
        });
    let most = if fleet.full() { 10 } else { 9 };
    ensure!(
        need.vcpus * 10 <= room.vcpus * most
            && need.memory_mib * 10 <= room.memory_mib * most
            && need.disk_gib * 10 <= room.disk_gib * most,
        "{vms} VMs ({} vCPU, {} MiB, {} GiB) would fill {nodes} nodes ({} vCPU, {} MiB, {} GiB \
         after overcommit) beyond 90%: use fewer --vms or more --nodes",
        need.vcpus,
        need.memory_mib,
        need.disk_gib,
        room.vcpus,
        room.memory_mib,
        room.disk_gib
    );

    let store = Arc::new(store.clone());
    let tasks = match store.backend() {
        byteport_store::Backend::Sqlite => 1,
        byteport_store::Backend::Postgres => SETUP_TASKS,
    };
    let caps = Arc::new(caps);
    let mut set = tokio::task::JoinSet::new();
    for t in 0..tasks {
        let (store, caps) = (store.clone(), caps.clone());
        set.spawn(async move {
            for i in (t..caps.len()).step_by(tasks) {
                let token = format!("bench-join-{i}");
                let now = Utc::now();
                store
                    .join_token_insert(join_token::Model {
                        token_hash: token.clone(),
                        expires_at: now + chrono::Duration::hours(1),
                        used: false,
                        created_at: now,
                    })
                    .await?;
                let c = caps[i];
                store
                    .node_register(
                        &token,
                        node::Model {
                            id: Uuid::now_v7(),
                            name: format!("node-{i:05}"),
                            region: "default".into(),
                            arch: "x86_64".into(),
                            engines: r#"["qemu"]"#.into(),
                            unavailable_engines: "[]".into(),
                            kvm: true,
                            status: "online".into(),
                            credential_hash: format!("bench-credential-{i}"),
                            cap_vcpus: c.vcpus,
                            cap_memory_mib: c.memory_mib,
                            cap_disk_gib: c.disk_gib,
                            used_vcpus: 0,
                            used_memory_mib: 0,
                            used_disk_gib: 0,
                            reserved_vcpus: 0,
                            reserved_memory_mib: 0,
                            reserved_disk_gib: 0,
                            vm_stats: None,
                            platforms: "[]".into(),
                            last_heartbeat_at: Some(now),
                            created_at: now,
                        },
                    )
                    .await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }

    let mut projects = Vec::new();
    for p in 0..vms.div_ceil(VMS_PER_PROJECT) {
        let pr = store
            .project_insert(
                project::Model {
                    id: Uuid::now_v7(),
                    name: format!("bench-{p}"),
                    description: "placement benchmark".into(),
                    max_vms: 1 << 40,
                    max_vcpus: 1 << 40,
                    max_memory_mib: 1 << 50,
                    max_disk_gib: 1 << 50,
                    created_at: now,
                    network_index: None,
                    max_concurrent_runs: 4,
                },
                None,
            )
            .await?;
        projects.push(pr.id);
    }
    let projects = Arc::new(projects);
    let img = Arc::new(img);
    for t in 0..tasks {
        let (store, projects, img) = (store.clone(), projects.clone(), img.clone());
        set.spawn(async move {
            for i in (t..vms).step_by(tasks) {
                let s = fleet.vm_size(i);
                let now = Utc::now();
                let name = format!("vm-{i:06}");
                store
                    .vm_insert(
                        vm::Model {
                            id: Uuid::now_v7(),
                            project_id: projects[i / VMS_PER_PROJECT],
                            name: name.clone(),
                            image_id: img.id,
                            image_name: img.name.clone(),
                            arch: img.arch.clone(),
                            execution: None,
                            engine: "qemu".into(),
                            flavor_name: None,
                            vcpus: s.vcpus,
                            memory_mib: s.memory_mib,
                            disk_gib: s.disk_gib,
                            hostname: name,
                            labels: "{}".into(),
                            ssh_keys: "[]".into(),
                            user_data: None,
                            state: "pending".into(),
                            state_reason: Some("waiting for a node to place it on".into()),
                            desired_state: "running".into(),
                            desired_generation: 1,
                            observed_state: None,
                            observed_generation: 0,
                            node_id: None,
                            ports: "[]".into(),
                            created_at: now,
                            updated_at: now,
                            deleted_at: None,
                            has_agent: false,
                            agent_version: None,
                            reserved: false,
                            placement: None,
                            placement_group: None,
                            compute_held: false,
                            metadata_token_hash: None,
                            environment_id: None,
                            guest_ports: "[]".into(),
                            egress: "allow".into(),
                            network: None,
                            cloud_init: None,
                            ssh_user: None,
                        },
                        &[],
                    )
                    .await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    Ok(())
}

// ---------- one configuration ----------

async fn bench_one(
    url: &str,
    backend: &'static str,
    nodes: usize,
    variant: Variant,
    placers: usize,
    opts: &Opts,
    tmp: &Path,
) -> anyhow::Result<RunResult> {
    let (fleet, vms) = match variant {
        Variant::Fill => {
            let f = Fleet::Full(nodes);
            (f, f.vms_to_fill())
        }
        _ => (Fleet::Varied(nodes), opts.vms),
    };
    eprintln!(
        "{backend}, {nodes} nodes, {}, {placers} placer(s): setting up {vms} VMs",
        variant.name(),
    );
    let t = Instant::now();
    let store = DataStore::connect(url)
        .await
        .with_context(|| format!("connecting to {backend}"))?;
    setup(&store, fleet, vms).await?;
    let unplaced = store.vm_list_unplaced(i64::MAX as u64).await?.len();
    ensure!(
        unplaced == vms,
        "{unplaced} pending VMs after setup, expected {vms}"
    );
    let setup_secs = t.elapsed().as_secs_f64();

    let mut r = match variant {
        Variant::PerVm => {
            let r = run_per_vm(&store, opts.per_vm_sample).await?;
            if r.placed < opts.vms {
                // The rest only has to be placed for the check below.
                eprintln!(
                    "  timed {} per-vm placements; placing the other {} with the cached path",
                    r.placed,
                    opts.vms - r.placed
                );
                run_cached(&store, 1, Variant::Cached).await?;
            }
            r
        }
        Variant::App | Variant::Create => {
            let settings = Settings {
                image_dir: tmp.join("images"),
                ..Settings::default()
            };
            let app = App::new(store.clone(), settings)
                .await
                .map_err(|e| anyhow::anyhow!("starting the app: {e}"))?;
            if variant == Variant::App {
                run_app(&app).await?
            } else {
                run_create(&app).await?
            }
        }
        Variant::Cached | Variant::Fill => run_cached(&store, placers, variant).await?,
    };
    let expected = match variant {
        Variant::PerVm => vms.min(opts.per_vm_sample),
        _ => vms,
    };
    ensure!(
        r.placed == expected,
        "{} placements reported, expected {expected}",
        r.placed
    );
    r.backend = backend;
    r.nodes = nodes;
    r.setup_secs = setup_secs;
    verify(&store, vms, fleet.full())
        .await
        .with_context(|| format!("{backend}, {nodes} nodes, {}", variant.name()))?;
    store.connection().clone().close().await?;
    Ok(r)
}

/// What `App::place_vm` does for one VM (a fresh pass: image and inventory
/// read from the store), in a loop over the pending VMs, timed one by one.
async fn run_per_vm(store: &DataStore, sample: usize) -> anyhow::Result<RunResult> {
    let (policy, over) = control_plane();
    let mut r = RunResult::new(Variant::PerVm, 1);
    let mut split = Split::default();
    let mut lost = 0;
    let t = Instant::now();
    'run: loop {
        let batch = store.vm_list_unplaced(500).await?;
        if batch.is_empty() {
            break;
        }
        for v in batch {
            if r.lat_us.len() == sample {
                break 'run;
            }
            let t1 = Instant::now();
            // The VM row carries its architecture: no image read.
            let arch = v.arch.clone();
            split.read_us += micros(t1.elapsed());
            let req = request(&v, arch);
            let mut placed = false;
            for _ in 0..RACE_RETRIES {
                let t2 = Instant::now();
                let nodes: Vec<_> = store.node_list().await?.iter().map(inventory).collect();
                r.inventory_reads += 1;
                split.read_us += micros(t2.elapsed());
                let t3 = Instant::now();
                let d = byteport_scheduler::place(&nodes, &req, policy, over);
                split.decide_us += micros(t3.elapsed());
                match d {
                    Decision::Place { node, limit } => {
                        let t4 = Instant::now();
                        let ok = store
                            .vm_place(v.id, node, size_of(&v), to_size(limit))
                            .await?;
                        split.commit_us += micros(t4.elapsed());
                        if ok {
                            placed = true;
                            break;
                        }
                        lost += 1;
                    }
                    Decision::NoFit(why) => bail!("VM {} fits nowhere: {why}", v.name),
                }
            }
            ensure!(placed, "VM {} lost {RACE_RETRIES} races", v.name);
            r.lat_us.push(micros(t1.elapsed()));
        }
    }
    r.secs = t.elapsed().as_secs_f64();
    r.placed = r.lat_us.len();
    r.lost_races = Some(lost);
    r.split = Some(split);
    r.lat_us.sort_unstable();
    Ok(r)
}

fn micros(d: std::time::Duration) -> u64 {
    d.as_micros() as u64
}

/// Where a variant's placement time went, summed over its placements.
#[derive(Clone, Copy, Debug, Default)]
struct Split {
    /// Inventory (and, for `per-vm`, image) reads.
    read_us: u64,
    /// `byteport_scheduler::place` on the inventory.
    decide_us: u64,
    /// `vm_place` transactions, lost ones included.
    commit_us: u64,
}

impl Split {
    fn add(&mut self, o: Split) {
        self.read_us += o.read_us;
        self.decide_us += o.decide_us;
        self.commit_us += o.commit_us;
    }
}

/// The control plane's own code: `App::place_pending()` until it places
/// nothing. Only whole passes can be timed from outside.
async fn run_app(app: &App) -> anyhow::Result<RunResult> {
    let mut r = RunResult::new(Variant::App, 1);
    r.lost_races = None;
    let t = Instant::now();
    loop {
        let n = app
            .place_pending()
            .await
            .map_err(|e| anyhow::anyhow!("App::place_pending: {e}"))?;
        if n == 0 {
            break;
        }
        r.placed += n;
    }
    r.secs = t.elapsed().as_secs_f64();
    r.inventory_reads = app
        .inventory
        .reads
        .load(std::sync::atomic::Ordering::Relaxed);
    let left = app.store.vm_list_unplaced(1).await?;
    if let Some(v) = left.first() {
        bail!(
            "App::place_pending left VM {} unplaced: {}",
            v.name,
            v.state_reason.as_deref().unwrap_or("no reason")
        );
    }
    Ok(r)
}

/// The create path: `App::place_vm` for every pending VM, one at a time,
/// each timed (the shared inventory is the control plane's own).
async fn run_create(app: &App) -> anyhow::Result<RunResult> {
    use std::sync::atomic::Ordering::Relaxed;
    let mut r = RunResult::new(Variant::Create, 1);
    let t = Instant::now();
    loop {
        let batch = app.store.vm_list_unplaced(500).await?;
        if batch.is_empty() {
            break;
        }
        for v in batch {
            let t1 = Instant::now();
            let node = app
                .place_vm(&v)
                .await
                .map_err(|e| anyhow::anyhow!("App::place_vm: {e}"))?;
            ensure!(node.is_some(), "VM {} was not placed", v.name);
            r.lat_us.push(micros(t1.elapsed()));
        }
    }
    r.secs = t.elapsed().as_secs_f64();
    r.placed = r.lat_us.len();
    r.lost_races = Some(app.scheduler.lost_race.load(Relaxed));
    r.inventory_reads = app.inventory.reads.load(Relaxed);
    r.lat_us.sort_unstable();
    Ok(r)
}

struct PlacerOut {
    lat_us: Vec<u64>,
    lost: u64,
    reads: u64,
    split: Split,
}

/// The inventory as a placer keeps it, with an index by node id.
struct Cache {
    nodes: Vec<NodeInventory<Uuid>>,
    index: HashMap<Uuid, usize>,
}

async fn read_cache(store: &DataStore) -> anyhow::Result<Cache> {
    let nodes: Vec<_> = store.node_list().await?.iter().map(inventory).collect();
    let index = nodes.iter().enumerate().map(|(i, n)| (n.id, i)).collect();
    Ok(Cache { nodes, index })
}

/// One placer of the cached variant: `vms` in order, on its own cache.
async fn cached_placer(
    store: DataStore,
    vms: Vec<vm::Model>,
    arch: Arc<HashMap<Uuid, String>>,
    policy: Policy,
) -> anyhow::Result<PlacerOut> {
    let over = control_plane().1;
    let t0 = Instant::now();
    let mut cache = read_cache(&store).await?;
    let mut out = PlacerOut {
        lat_us: Vec::with_capacity(vms.len()),
        lost: 0,
        reads: 1,
        split: Split {
            read_us: micros(t0.elapsed()),
            ..Split::default()
        },
    };
    for v in vms {
        let t = Instant::now();
        let arch = arch
            .get(&v.image_id)
            .cloned()
            .unwrap_or_else(|| "x86_64".into());
        let req = request(&v, arch);
        let mut fresh = false;
        let mut attempts = 0;
        loop {
            attempts += 1;
            ensure!(
                attempts <= CACHED_RETRIES,
                "VM {} not placed after {CACHED_RETRIES} attempts",
                v.name
            );
            let t1 = Instant::now();
            let d = byteport_scheduler::place(&cache.nodes, &req, policy, over);
            out.split.decide_us += micros(t1.elapsed());
            match d {
                Decision::Place { node, limit } => {
                    let t2 = Instant::now();
                    let ok = store
                        .vm_place(v.id, node, size_of(&v), to_size(limit))
                        .await?;
                    out.split.commit_us += micros(t2.elapsed());
                    if ok {
                        let n = &mut cache.nodes[cache.index[&node]];
                        n.reserved.vcpus += v.vcpus;
                        n.reserved.memory_mib += v.memory_mib;
                        n.reserved.disk_gib += v.disk_gib;
                        break;
                    }
                    out.lost += 1;
                }
                // The cache may be stale the other way (a release); only a
                // fresh read can say no.
                Decision::NoFit(why) if fresh => bail!("VM {} fits nowhere: {why}", v.name),
                Decision::NoFit(_) => {}
            }
            let t3 = Instant::now();
            cache = read_cache(&store).await?;
            out.split.read_us += micros(t3.elapsed());
            out.reads += 1;
            fresh = true;
        }
        out.lat_us.push(micros(t.elapsed()));
    }
    Ok(out)
}

async fn run_cached(
    store: &DataStore,
    placers: usize,
    variant: Variant,
) -> anyhow::Result<RunResult> {
    let t = Instant::now();
    let pending = store.vm_list_unplaced(i64::MAX as u64).await?;
    let arch: HashMap<Uuid, String> = store
        .image_list()
        .await?
        .into_iter()
        .map(|i| (i.id, i.arch))
        .collect();
    let arch = Arc::new(arch);
    // `fill` packs (every placer aims at the same node until it is full)
    // and gives placer k k+1 shares, so that the placers' private views of
    // the fleet drift apart and they keep aiming at nodes already full.
    let policy = match variant {
        Variant::Fill => Policy::Pack,
        _ => control_plane().0,
    };
    let pattern: Vec<usize> = match variant {
        Variant::Fill => (0..placers)
            .flat_map(|k| std::iter::repeat_n(k, k + 1))
            .collect(),
        _ => (0..placers).collect(),
    };
    let mut shares: Vec<Vec<vm::Model>> = (0..placers).map(|_| Vec::new()).collect();
    for (i, v) in pending.into_iter().enumerate() {
        shares[pattern[i % pattern.len()]].push(v);
    }
    let mut set = tokio::task::JoinSet::new();
    for share in shares {
        set.spawn(cached_placer(store.clone(), share, arch.clone(), policy));
    }
    let mut r = RunResult::new(variant, placers);
    let mut lost = 0;
    let mut split = Split::default();
    while let Some(out) = set.join_next().await {
        let out = out??;
        r.lat_us.extend(out.lat_us);
        split.add(out.split);
        lost += out.lost;
        r.inventory_reads += out.reads;
    }
    r.secs = t.elapsed().as_secs_f64();
    r.placed = r.lat_us.len();
    r.lost_races = Some(lost);
    r.split = Some(split);
    r.lat_us.sort_unstable();
    Ok(r)
}

/// Every VM placed once; every node's reservation the sum of its VMs and
/// within its limit. Reads everything back through the store.
async fn verify(store: &DataStore, vms: usize, full: bool) -> anyhow::Result<()> {
    let nodes = store.node_list().await?;
    let mut sums: HashMap<Uuid, Resources> =
        nodes.iter().map(|n| (n.id, Resources::default())).collect();
    let mut seen = 0usize;
    let mut after = None;
    loop {
        let page = store
            .vm_list(&VmFilter {
                after,
                limit: 1000,
                ..VmFilter::default()
            })
            .await?;
        let Some(last) = page.last() else { break };
        after = Some(last.id);
        for v in &page {
            seen += 1;
            let node = v
                .node_id
                .with_context(|| format!("VM {} was never placed", v.name))?;
            ensure!(
                v.reserved && v.compute_held,
                "VM {} is placed but holds no reservation (reserved {}, compute held {})",
                v.name,
                v.reserved,
                v.compute_held
            );
            ensure!(
                v.state == "provisioning",
                "VM {} is {} after placement",
                v.name,
                v.state
            );
            let s = sums
                .get_mut(&node)
                .with_context(|| format!("VM {} is on an unknown node {node}", v.name))?;
            s.vcpus += v.vcpus;
            s.memory_mib += v.memory_mib;
            s.disk_gib += v.disk_gib;
        }
    }
    ensure!(seen == vms, "{seen} VMs in the store, expected {vms}");
    let mut used = 0;
    for n in &nodes {
        let s = sums[&n.id];
        let reserved = Resources {
            vcpus: n.reserved_vcpus,
            memory_mib: n.reserved_memory_mib,
            disk_gib: n.reserved_disk_gib,
        };
        ensure!(
            s == reserved,
            "node {}: its VMs hold {s:?} but its reservation says {reserved:?}",
            n.name
        );
        let l = limit_of(n);
        ensure!(
            s.vcpus <= l.vcpus && s.memory_mib <= l.memory_mib && s.disk_gib <= l.disk_gib,
            "node {} over its limit: {s:?} reserved, {l:?} allowed",
            n.name
        );
        ensure!(
            !full || s == l,
            "node {} of the full fleet is not full: {s:?} reserved, {l:?} allowed",
            n.name
        );
        if s.vcpus > 0 {
            used += 1;
        }
    }
    eprintln!(
        "  verified: {seen} VMs placed once, reservations match on {} nodes ({used} in use), \
         none over capacity x overcommit",
        nodes.len()
    );
    Ok(())
}

// ---------- report ----------

fn print_report(results: &[RunResult], opts: &Opts) {
    let (policy, over) = control_plane();
    println!();
    println!(
        "Placement of {} pending VMs per run ({} for fill; a fresh database each), \
         policy {policy:?}, overcommit cpu {} memory {} disk {}",
        opts.vms,
        Fleet::Full(FULL_NODES).vms_to_fill(),
        over.cpu,
        over.memory,
        over.disk
    );
    println!(
        "{:<10} {:>5} {:<7} {:>7} {:>7} {:>7} {:>9} {:>8} {:>8} {:>8} {:>6} {:>9} {:>8} {:>8} {:>8}",
        "backend",
        "nodes",
        "variant",
        "placers",
        "placed",
        "wall s",
        "placed/s",
        "p50 ms",
        "p99 ms",
        "mean ms",
        "races",
        "inv.reads",
        "read ms",
        "decide",
        "commit"
    );
    for r in results {
        let part = |f: fn(&Split) -> u64| {
            r.split
                .filter(|_| r.placed > 0)
                .map(|s| format!("{:.3}", f(&s) as f64 / r.placed as f64 / 1000.0))
                .unwrap_or_else(|| "-".into())
        };
        println!(
            "{:<10} {:>5} {:<7} {:>7} {:>7} {:>7.2} {:>9.0} {:>8} {:>8} {:>8.3} {:>6} {:>9} {:>8} {:>8} {:>8}",
            r.backend,
            r.nodes,
            r.variant.name(),
            r.placers,
            r.placed,
            r.secs,
            r.per_s(),
            ms(r.pct_ms(0.5)),
            ms(r.pct_ms(0.99)),
            r.mean_ms(),
            r.lost_races
                .map(|n| n.to_string())
                .unwrap_or_else(|| "-".into()),
            r.inventory_reads,
            part(|s| s.read_us),
            part(|s| s.decide_us),
            part(|s| s.commit_us)
        );
    }
    println!();
    println!("Scaling (cost = wall time per placement; x = ratio to the previous node count):");
    println!(
        "{:<10} {:<7} {:>7} {:>13} {:>8} {:>8} {:>8}  reading",
        "backend", "variant", "placers", "nodes", "x nodes", "x cost", "x p50"
    );
    for (i, b) in results.iter().enumerate() {
        // The previous (smaller) node count of the same configuration.
        let Some(a) = results[..i].iter().rev().find(|a| {
            a.backend == b.backend
                && a.variant == b.variant
                && a.placers == b.placers
                && a.nodes < b.nodes
        }) else {
            continue;
        };
        let xn = b.nodes as f64 / a.nodes as f64;
        let xc = b.cost_ms() / a.cost_ms().max(1e-9);
        let xp = match (a.pct_ms(0.5), b.pct_ms(0.5)) {
            (Some(a), Some(b)) => format!("{:.2}", b / a.max(1e-9)),
            _ => "-".into(),
        };
        let reading = if xc <= 1.25 {
            "flat"
        } else if xc < 0.8 * xn {
            "grows, sub-linearly"
        } else if xc <= 1.25 * xn {
            "about linear"
        } else {
            "super-linear"
        };
        println!(
            "{:<10} {:<7} {:>7} {:>13} {:>8.1} {:>8.2} {:>8}  {reading}",
            b.backend,
            b.variant.name(),
            b.placers,
            format!("{} -> {}", a.nodes, b.nodes),
            xn,
            xc,
            xp
        );
    }
    println!();
    for r in results {
        println!(
            "RESULT bench=placement backend={} nodes={} variant={} placers={} placements={} \
             placements_per_s={:.0} p50_ms={} p99_ms={} mean_ms={:.3}",
            r.backend,
            r.nodes,
            r.variant.name(),
            r.placers,
            r.placed,
            r.per_s(),
            ms(r.pct_ms(0.5)),
            ms(r.pct_ms(0.99)),
            r.mean_ms()
        );
    }
}
