//! `cargo xtask bench boot`: how long a VM takes to boot through BytePort,
//! against plain QEMU (and libvirt, when installed) in the same run, and how
//! much memory the node agent uses.
//!
//! One run of the benchmark:
//!
//! 1. Builds the release daemon (unless `--no-build`), starts an all-in-one
//!    `byteportd` (the testkit's [`Daemon`]) and imports the `tiny` image.
//! 2. A warm-up round (not counted: the node downloads the image into its
//!    cache), then `--runs` rounds. Each round boots the same guest three
//!    ways, one after the other, so that machine load hits them alike:
//!    - BytePort: `POST /v1/vms`, then the time until the VM's `qemu.pid`
//!      names a live process, until `console.log` has its first complete
//!      line, and until the API says `running` (the node reports running
//!      only after the guest agent said Ready). The VM is deleted after.
//!    - Plain QEMU: the argument list the node's QEMU driver builds, with
//!      our own paths (kernel, initrd, a blank qcow2 made before the clock
//!      starts); spawn to the pidfile, to the first serial line, and to the
//!      guest agent's Ready read from the agent socket.
//!    - libvirt, when `virsh` is installed and libvirtd answers (or can be
//!      started): a domain with the same kernel, initrd, disk, network,
//!      serial-to-file and agent channel; `virsh start` to the first serial
//!      line and to the agent's Ready.
//! 3. Node agent memory: the all-in-one process's VmRSS idle and with 5
//!    running VMs; then (not with `--quick`) the same for the `byteportd
//!    node` process alone in a split layout.
//! 4. Prints medians, min and max, the ratios against plain QEMU, and one
//!    final `RESULT key=value ...` line.
//!
//! Options: `--runs N` (default 5), `--quick` (2 runs, 2 VMs for memory,
//! no libvirt, no split node), `--no-build`, `--bin PATH` (another daemon
//! binary; implies `--no-build`). See `docs/benchmarks.md`.

use anyhow::{Context, bail};
use byteport_guest::proto::{CONTROL_STREAM, Decoder, Frame, Kind, encode};
use byteport_testkit::daemon::{Daemon, alive, tail};
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

/// How long one guest may take to boot (TCG on a busy 2-core host is slow).
const BOOT_SECS: u64 = 300;
/// How often the watchers look at files and sockets.
const POLL: Duration = Duration::from_millis(2);
/// The guest agent's port name (the node's `AGENT_PORT_NAME`).
const AGENT_PORT: &str = byteport_guest::proto::AGENT_PORT_NAME;
/// Guest size: what `Daemon::create_vm` asks for.
const VCPUS: u32 = 1;
const MEMORY_MIB: u64 = 256;
const DISK_GIB: u64 = 1;

struct Opts {
    runs: usize,
    quick: bool,
    build: bool,
    bin: Option<PathBuf>,
}

fn parse_args(args: &[&str]) -> anyhow::Result<Opts> {
    let mut o = Opts {
        runs: 5,
        quick: false,
        build: true,
        bin: None,
    };
    let mut runs = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match *a {
            "--runs" => {
                let v = it.next().context("--runs needs a value")?;
                let n: usize = v
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .with_context(|| format!("--runs: not a positive number: {v}"))?;
                runs = Some(n);
            }
            "--quick" => o.quick = true,
            "--no-build" => o.build = false,
            "--bin" => {
                let v = it.next().context("--bin needs a path")?;
                o.bin = Some(PathBuf::from(v));
                o.build = false;
            }
            other => bail!(
                "unknown option {other}; usage: cargo xtask bench boot [--runs N] [--quick] \
                 [--no-build] [--bin PATH]"
            ),
        }
    }
    o.runs = runs.unwrap_or(if o.quick { 2 } else { 5 });
    Ok(o)
}

/// The `tiny` image's files, as the node would boot them.
struct Tiny {
    dir: PathBuf,
    kernel: PathBuf,
    initrd: PathBuf,
    cmdline: String,
}

impl Tiny {
    fn load(dir: &Path) -> anyhow::Result<Tiny> {
        let m: Value = serde_json::from_slice(
            &std::fs::read(dir.join("manifest.json")).context("reading the image manifest")?,
        )
        .context("the image manifest is not JSON")?;
        let file = |k: &str| -> anyhow::Result<PathBuf> {
            Ok(dir.join(
                m[k].as_str()
                    .with_context(|| format!("the manifest names no {k}"))?,
            ))
        };
        Ok(Tiny {
            dir: dir.to_owned(),
            kernel: file("kernel")?,
            initrd: file("initrd")?,
            cmdline: m["cmdline"].as_str().unwrap_or("console=ttyS0").to_owned(),
        })
    }

    /// The kernel command line the node passes for a VM of this hostname.
    fn cmdline_for(&self, hostname: &str) -> String {
        format!("{} byteport.hostname={hostname}", self.cmdline)
    }
}

pub fn run(root: &Path, args: &[&str]) -> anyhow::Result<()> {
    let opts = parse_args(args)?;
    for tool in ["qemu-system-x86_64", "qemu-img"] {
        if crate::which(tool).is_none() {
            bail!("{tool} is not installed (apt-get install qemu-system-x86 qemu-utils)");
        }
    }
    let bin = crate::release_daemon(root, opts.build, opts.bin.clone())?;
    let img_dir = root.join("build/images/tiny");
    if !img_dir.join("manifest.json").exists() {
        eprintln!("no tiny image at {}: building it", img_dir.display());
        crate::image::run(root, &["build", "tiny"])
            .context("building the tiny image (cargo xtask image build tiny)")?;
    }
    let tiny = Tiny::load(&img_dir)?;

    let mut libvirt = if opts.quick {
        println!("libvirt: skipped (--quick)");
        None
    } else {
        match Libvirt::probe() {
            Ok(l) => Some(l),
            Err(why) => {
                println!("libvirt: {why}");
                None
            }
        }
    };

    let scratch = std::env::temp_dir().join(format!("byteport-bench-boot-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch)?;
    let scratch_guard = RemoveOnDrop(scratch.clone());

    println!(
        "boot benchmark: {} runs + 1 warm-up, {} cores, accel tcg, guest {} vCPU / {} MiB / {} GiB disk, image {}",
        opts.runs,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        VCPUS,
        MEMORY_MIB,
        DISK_GIB,
        tiny.dir.display()
    );

    // ---------- boot times ----------
    let d = Daemon::start(&bin);
    d.import_tiny(&tiny.dir);
    let daemon_pid = d
        .child
        .as_ref()
        .map(Child::id)
        .context("no daemon process")?;
    std::thread::sleep(Duration::from_secs(2));
    let rss_fresh = rss_kib(daemon_pid);

    let mut bp = Vec::new();
    let mut plain = Vec::new();
    let mut lv = Vec::new();
    for round in 0..=opts.runs {
        let tag = if round == 0 {
            "warm-up".to_owned()
        } else {
            format!("run {round}/{}", opts.runs)
        };
        let b = byteport_run(&d, daemon_pid, round)?;
        eprintln!("{tag}: BytePort   {b}");
        let p = plain_run(&tiny, &scratch, round)?;
        eprintln!("{tag}: plain QEMU {p}");
        let l = match libvirt.as_mut() {
            Some(l) => match l.run(&tiny, &scratch, round) {
                Ok(m) => {
                    eprintln!("{tag}: libvirt    {m}");
                    Some(m)
                }
                Err(e) => {
                    println!("libvirt: failed ({e:#}); left out from here on");
                    libvirt = None;
                    None
                }
            },
            None => None,
        };
        if round > 0 {
            bp.push(b);
            plain.push(p);
            lv.extend(l);
        }
    }
    let libvirt_ok = libvirt.is_some() && lv.len() == opts.runs;
    drop(libvirt.take());

    // ---------- memory ----------
    let mem_vms = if opts.quick { 2 } else { 5 };
    std::thread::sleep(Duration::from_secs(2));
    let rss_idle = rss_kib(daemon_pid);
    let rss_loaded = with_running_vms(&d, mem_vms, "aio", || rss_kib(daemon_pid))?;
    let kept_log = keep_log(&d, "all-in-one");
    drop(d);

    let split = if opts.quick {
        None
    } else {
        let mut s = Daemon::start_split(&bin);
        s.import_tiny(&tiny.dir);
        let node_pid = s.node.as_ref().map(Child::id).context("no node process")?;
        std::thread::sleep(Duration::from_secs(2));
        let idle = rss_kib(node_pid);
        let loaded = with_running_vms(&s, mem_vms, "split", || rss_kib(node_pid))?;
        let server_rss = s.child.as_ref().and_then(|c| rss_kib(c.id()));
        keep_log(&s, "split");
        s.kill9_node();
        drop(s);
        Some((idle, loaded, server_rss))
    };
    drop(scratch_guard);

    // ---------- report ----------
    type Pick = fn(&Marks) -> Option<Duration>;
    let col = |v: &[Marks], f: Pick| -> Vec<f64> {
        v.iter()
            .filter_map(f)
            .map(|d| d.as_secs_f64() * 1e3)
            .collect()
    };
    let med = |v: &[Marks], f: Pick| Summary::of(&col(v, f)).median;
    let mut rows: Vec<(&str, Vec<f64>)> = vec![
        (
            "BytePort  POST /v1/vms -> QEMU running (pidfile)",
            col(&bp, |m| m.qemu),
        ),
        (
            "BytePort  POST /v1/vms -> 1st serial line",
            col(&bp, |m| m.serial),
        ),
        (
            "BytePort  POST /v1/vms -> agent ready (API: running)",
            col(&bp, |m| m.ready),
        ),
        (
            "plain     spawn -> QEMU running (pidfile)",
            col(&plain, |m| m.qemu),
        ),
        (
            "plain     spawn -> 1st serial line",
            col(&plain, |m| m.serial),
        ),
        (
            "plain     spawn -> agent Ready frame",
            col(&plain, |m| m.ready),
        ),
    ];
    if libvirt_ok {
        rows.push((
            "libvirt   virsh start -> virsh returned",
            col(&lv, |m| m.post),
        ));
        rows.push((
            "libvirt   virsh start -> 1st serial line",
            col(&lv, |m| m.serial),
        ));
        rows.push((
            "libvirt   virsh start -> agent Ready frame",
            col(&lv, |m| m.ready),
        ));
    }
    println!();
    println!(
        "{:<54} {:>8} {:>8} {:>8} {:>3}",
        "boot (ms)", "median", "min", "max", "n"
    );
    let print_rows = |rows: &[(&str, Vec<f64>)]| {
        for (name, v) in rows {
            let s = Summary::of(v);
            println!(
                "{name:<54} {:>8.0} {:>8.0} {:>8.0} {:>3}",
                s.median,
                s.min,
                s.max,
                v.len()
            );
        }
    };
    print_rows(&rows);

    let bp_serial = med(&bp, |m| m.serial);
    let bp_ready = med(&bp, |m| m.ready);
    let p_serial = med(&plain, |m| m.serial);
    let p_ready = med(&plain, |m| m.ready);
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    // Each BytePort boot against the plain boot right after it.
    let paired = |f: Pick| -> f64 {
        let r: Vec<f64> = bp
            .iter()
            .zip(&plain)
            .filter_map(|(b, p)| Some(f(b)?.as_secs_f64() / f(p)?.as_secs_f64()))
            .collect();
        Summary::of(&r).median
    };
    println!();
    println!(
        "ratio BytePort/plain, 1st serial line: {:.3} (medians), {:.3} (median of per-round ratios); goal <= 1.05",
        ratio(bp_serial, p_serial),
        paired(|m| m.serial)
    );
    println!(
        "ratio BytePort/plain, agent ready:     {:.3} (medians), {:.3} (median of per-round ratios); goal <= 1.05",
        ratio(bp_ready, p_ready),
        paired(|m| m.ready)
    );
    let (lv_serial, lv_ready) = if libvirt_ok {
        let s = med(&lv, |m| m.serial);
        let r = med(&lv, |m| m.ready);
        println!(
            "ratio libvirt/plain,  1st serial line: {:.3}; agent ready: {:.3}",
            ratio(s, p_serial),
            ratio(r, p_ready)
        );
        (Some(s), Some(r))
    } else {
        (None, None)
    };

    // Where BytePort's time goes: per-run differences between milestones
    // (medians), against the same steps of plain QEMU.
    let diff = |v: &[Marks], a: Pick, b: Pick| -> Vec<f64> {
        v.iter()
            .filter_map(|m| {
                Some((b(m)?.as_secs_f64() - a(m).unwrap_or_default().as_secs_f64()) * 1e3)
            })
            .collect()
    };
    let zero: Pick = |_| Some(Duration::ZERO);
    let steps: Vec<(&str, Vec<f64>)> = vec![
        ("BytePort  POST answered", diff(&bp, zero, |m| m.post)),
        (
            "BytePort  POST -> node task made the VM dir",
            diff(&bp, zero, |m| m.dir),
        ),
        (
            "BytePort  VM dir -> disk file appears (qemu-img started)",
            diff(&bp, |m| m.dir, |m| m.disk),
        ),
        (
            "BytePort  disk -> vm.json (qemu-img done, ports; spawn)",
            diff(&bp, |m| m.disk, |m| m.state),
        ),
        (
            "BytePort  vm.json -> QEMU pidfile",
            diff(&bp, |m| m.state, |m| m.qemu),
        ),
        (
            "plain     (qemu-img create, before the clock)",
            col(&plain, |m| m.prep),
        ),
        (
            "plain     spawn -> QEMU pidfile",
            diff(&plain, zero, |m| m.qemu),
        ),
        (
            "BytePort  QEMU pidfile -> \"VM started\" logged (QMP up)",
            diff(&bp, |m| m.qemu, |m| m.logged),
        ),
        (
            "BytePort  QEMU pidfile -> 1st serial line (the guest)",
            diff(&bp, |m| m.qemu, |m| m.serial),
        ),
        (
            "plain     QEMU pidfile -> 1st serial line (the guest)",
            diff(&plain, |m| m.qemu, |m| m.serial),
        ),
        (
            "BytePort  1st serial line -> API says running",
            diff(&bp, |m| m.serial, |m| m.ready),
        ),
        (
            "plain     1st serial line -> agent Ready frame",
            diff(&plain, |m| m.serial, |m| m.ready),
        ),
        (
            "BytePort  daemon CPU time during the boot",
            col(&bp, |m| m.cpu),
        ),
    ];
    println!();
    println!(
        "{:<54} {:>8} {:>8} {:>8} {:>3}",
        "where the time goes (ms)", "median", "min", "max", "n"
    );
    print_rows(&steps);
    let m = |i: usize| Summary::of(&steps[i].1).median;
    // The fixed costs BytePort adds around the same guest boot: everything
    // before QEMU's pidfile beyond plain QEMU's own spawn, and after the
    // guest's Ready beyond what reading it takes.
    let before = med(&bp, |m| m.qemu) - med(&plain, |m| m.qemu);
    let after = m(10) - m(11);
    println!(
        "BytePort's fixed cost: {before:.0} ms before QEMU is up, {after:.0} ms from the agent's Ready to the API; \
         on the plain median that is {:.3} (1st line) and {:.3} (agent ready)",
        ratio(p_serial + before, p_serial),
        ratio(p_ready + before + after, p_ready)
    );
    println!(
        "the guest's own part (QEMU up -> 1st line) differs by {:+.0} ms (BytePort - plain, medians); \
         BytePort does no step there, so compare it with the spread of that row: machine load",
        m(8) - m(9)
    );

    let mib = |k: Option<u64>| k.map_or(f64::NAN, |k| k as f64 / 1024.0);
    let per_vm = |idle: Option<u64>, loaded: Option<u64>| match (idle, loaded) {
        (Some(i), Some(l)) => (l as f64 - i as f64) / mem_vms as f64 / 1024.0,
        _ => f64::NAN,
    };
    println!();
    println!(
        "memory, all-in-one byteportd (control plane + node agent + SQLite): {:.1} MiB fresh, \
         {:.1} MiB idle after the runs, {:.1} MiB with {mem_vms} running VMs: {:.2} MiB per VM",
        mib(rss_fresh),
        mib(rss_idle),
        mib(rss_loaded),
        per_vm(rss_idle, rss_loaded)
    );
    if let Some((idle, loaded, server)) = split {
        println!(
            "memory, byteportd node alone (split layout): {:.1} MiB idle, {:.1} MiB with {mem_vms} running VMs: \
             {:.2} MiB per VM (its server process: {:.1} MiB)",
            mib(idle),
            mib(loaded),
            per_vm(idle, loaded),
            mib(server)
        );
    } else {
        println!("memory, byteportd node alone: measured without --quick");
    }
    println!("memory goals: < 30 MiB idle, < 1 MiB per running VM");
    println!("daemon log kept at {}", kept_log.display());

    let mut line = format!(
        "RESULT runs={} bp_qemu_ms={:.0} bp_serial_ms={:.0} bp_ready_ms={:.0} plain_qemu_ms={:.0} \
         plain_serial_ms={:.0} plain_ready_ms={:.0} ratio_serial={:.3} ratio_ready={:.3} \
         bp_fixed_before_ms={before:.0} bp_fixed_after_ms={after:.0}",
        opts.runs,
        med(&bp, |m| m.qemu),
        bp_serial,
        bp_ready,
        med(&plain, |m| m.qemu),
        p_serial,
        p_ready,
        ratio(bp_serial, p_serial),
        ratio(bp_ready, p_ready),
    );
    if let (Some(s), Some(r)) = (lv_serial, lv_ready) {
        line.push_str(&format!(
            " libvirt_serial_ms={s:.0} libvirt_ready_ms={r:.0} libvirt_ratio_serial={:.3} libvirt_ratio_ready={:.3}",
            ratio(s, p_serial),
            ratio(r, p_ready)
        ));
    }
    line.push_str(&format!(
        " aio_rss_idle_mib={:.1} aio_rss_per_vm_mib={:.2}",
        mib(rss_idle),
        per_vm(rss_idle, rss_loaded)
    ));
    if let Some((idle, loaded, _)) = split {
        line.push_str(&format!(
            " node_rss_idle_mib={:.1} node_rss_per_vm_mib={:.2}",
            mib(idle),
            per_vm(idle, loaded)
        ));
    }
    println!("{line}");
    Ok(())
}

// ---------- measurements ----------

/// When each milestone was seen, from the start of the clock (POST for
/// BytePort, spawn for plain QEMU, `virsh start` for libvirt).
#[derive(Clone, Debug, Default)]
struct Marks {
    /// BytePort: POST answered; libvirt: `virsh start` returned.
    post: Option<Duration>,
    /// BytePort: the node's VM directory exists (its task started).
    dir: Option<Duration>,
    /// BytePort: the VM's disk file exists (qemu-img is running).
    disk: Option<Duration>,
    /// BytePort: `vm.json` exists (written just before QEMU is spawned).
    state: Option<Duration>,
    /// QEMU's pidfile names a live process.
    qemu: Option<Duration>,
    /// BytePort: the node logged "VM started" (QMP answered).
    logged: Option<Duration>,
    /// The console log holds its first complete, non-blank line.
    serial: Option<Duration>,
    /// The guest agent said Ready (BytePort: the API says running).
    ready: Option<Duration>,
    /// Plain QEMU: `qemu-img create`, before the clock starts.
    prep: Option<Duration>,
    /// BytePort: CPU time the daemon used from POST to running.
    cpu: Option<Duration>,
    first_line: Option<String>,
}

impl std::fmt::Display for Marks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        for (k, v) in [
            ("post", self.post),
            ("dir", self.dir),
            ("disk", self.disk),
            ("vm.json", self.state),
            ("pid", self.qemu),
            ("qmp", self.logged),
            ("1st line", self.serial),
            ("ready", self.ready),
            ("qemu-img", self.prep),
            ("daemon cpu", self.cpu),
        ] {
            if let Some(v) = v {
                parts.push(format!("{k} {}", v.as_millis()));
            }
        }
        write!(f, "{} ms", parts.join(", "))?;
        if let Some(l) = &self.first_line {
            write!(f, " ({:?})", tail(l, 60))?;
        }
        Ok(())
    }
}

pub(crate) struct Summary {
    pub(crate) median: f64,
    pub(crate) min: f64,
    pub(crate) max: f64,
}

impl Summary {
    pub(crate) fn of(v: &[f64]) -> Summary {
        let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return Summary {
                median: f64::NAN,
                min: f64::NAN,
                max: f64::NAN,
            };
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Summary {
            median,
            min: v[0],
            max: v[n - 1],
        }
    }
}

/// The first complete line with something on it, if the file has one.
fn first_line(path: &Path) -> Option<String> {
    let b = std::fs::read(path).ok()?;
    let mut rest = &b[..];
    while let Some(nl) = rest.iter().position(|c| *c == b'\n') {
        let line = String::from_utf8_lossy(&rest[..nl]);
        if !line.trim().is_empty() {
            return Some(line.trim_end().to_owned());
        }
        rest = &rest[nl + 1..];
    }
    None
}

/// What [`watch_files`] looks at in a VM's directory.
struct Watch {
    /// QEMU's pidfile, if it writes one.
    pidfile: Option<PathBuf>,
    /// The serial console's log file.
    log: PathBuf,
    /// BytePort's own files: the directory, the disk, `vm.json`.
    node_files: Option<[PathBuf; 3]>,
}

/// Polls files every [`POLL`] from `t0` until every milestone was seen, or
/// `stop` is set, or the boot timeout passes.
fn watch_files(w: Watch, t0: Instant, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Marks> {
    std::thread::spawn(move || {
        let mut m = Marks::default();
        let deadline = t0 + Duration::from_secs(BOOT_SECS);
        while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
            if let Some([dir, disk, state]) = &w.node_files {
                for (slot, p) in [
                    (&mut m.dir, dir),
                    (&mut m.disk, disk),
                    (&mut m.state, state),
                ] {
                    if slot.is_none() && p.exists() {
                        *slot = Some(t0.elapsed());
                    }
                }
            }
            if m.qemu.is_none()
                && let Some(pid) = w
                    .pidfile
                    .as_ref()
                    .and_then(|p| std::fs::read_to_string(p).ok())
                    .and_then(|s| s.trim().parse::<u32>().ok())
                && alive(pid)
            {
                m.qemu = Some(t0.elapsed());
            }
            if m.serial.is_none()
                && std::fs::metadata(&w.log).is_ok_and(|md| md.len() > 0)
                && let Some(l) = first_line(&w.log)
            {
                m.serial = Some(t0.elapsed());
                m.first_line = Some(l);
            }
            if (w.pidfile.is_none() || m.qemu.is_some()) && m.serial.is_some() {
                break;
            }
            std::thread::sleep(POLL);
        }
        m
    })
}

/// Waits (a few seconds at most) for a watcher that should be done soon,
/// then stops it.
fn finish_watch(h: std::thread::JoinHandle<Marks>, stop: &AtomicBool) -> Marks {
    let settle = Instant::now() + Duration::from_secs(5);
    while !h.is_finished() && Instant::now() < settle {
        std::thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, Ordering::Relaxed);
    h.join().unwrap_or_default()
}

/// Connects to a guest agent socket as soon as it exists, says Hello (again
/// every 500 ms, as the node does) and returns when the first Ready frame
/// arrives.
fn watch_agent(
    sock: PathBuf,
    t0: Instant,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Option<Duration>> {
    std::thread::spawn(move || {
        let deadline = t0 + Duration::from_secs(BOOT_SECS);
        let over = || Instant::now() >= deadline || stop.load(Ordering::Relaxed);
        let hello = encode(&Frame::new(CONTROL_STREAM, Kind::Hello, Vec::new()).ok()?);
        'connect: loop {
            let mut s = loop {
                if over() {
                    return None;
                }
                match UnixStream::connect(&sock) {
                    Ok(s) => break s,
                    Err(_) => std::thread::sleep(POLL),
                }
            };
            s.set_read_timeout(Some(Duration::from_millis(50))).ok()?;
            let mut dec = Decoder::new();
            let mut buf = vec![0u8; 64 * 1024];
            let mut last_hello: Option<Instant> = None;
            loop {
                if over() {
                    return None;
                }
                if last_hello.is_none_or(|t| t.elapsed() >= Duration::from_millis(500)) {
                    if s.write_all(&hello).is_err() {
                        continue 'connect;
                    }
                    last_hello = Some(Instant::now());
                }
                match s.read(&mut buf) {
                    Ok(0) => {
                        std::thread::sleep(POLL);
                        continue 'connect;
                    }
                    Ok(n) => {
                        let at = t0.elapsed();
                        dec.push(&buf[..n]);
                        while let Ok(Some(f)) = dec.next_frame() {
                            if f.kind() == Kind::Ready {
                                return Some(at);
                            }
                        }
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(_) => {
                        std::thread::sleep(POLL);
                        continue 'connect;
                    }
                }
            }
        }
    })
}

fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let f: Vec<&str> = s.rsplit_once(')')?.1.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Clock ticks to a duration (USER_HZ is 100 on Linux).
fn ticks(t: u64) -> Duration {
    Duration::from_millis(t * 10)
}

fn vm_body(name: &str) -> Value {
    json!({"name": name, "image": "tiny", "vcpus": VCPUS, "memory_mib": MEMORY_MIB, "disk_gib": DISK_GIB})
}

// ---------- BytePort ----------

fn byteport_run(d: &Daemon, daemon_pid: u32, round: usize) -> anyhow::Result<Marks> {
    let name = format!("boot-{round}");
    let cpu0 = cpu_ticks(daemon_pid);
    let wall0 = SystemTime::now();
    let t0 = Instant::now();
    let v = d
        .api
        .post("/v1/vms", vm_body(&name))
        .map_err(|e| anyhow::anyhow!("POST /v1/vms: {e}"))?;
    let post = t0.elapsed();
    let id = v["id"].as_str().context("no VM id")?.to_owned();
    let dir = d.vm_dir(&id);
    let stop = Arc::new(AtomicBool::new(false));
    let files = watch_files(
        Watch {
            pidfile: Some(dir.join("qemu.pid")),
            log: dir.join("console.log"),
            node_files: Some([dir.clone(), dir.join("disk.qcow2"), dir.join("vm.json")]),
        },
        t0,
        stop.clone(),
    );
    let res = d.wait(&id, "running", BOOT_SECS);
    let ready = t0.elapsed();
    let cpu1 = cpu_ticks(daemon_pid);
    let mut m = finish_watch(files, &stop);
    if let Err(e) = res {
        bail!("VM {id} did not reach running: {e}");
    }
    m.post = Some(post);
    m.ready = Some(ready);
    m.cpu = cpu0.zip(cpu1).map(|(a, b)| ticks(b.saturating_sub(a)));
    m.logged = vm_started_at(&d.log(), &id, wall0);
    d.api
        .delete(&format!("/v1/vms/{id}"))
        .map_err(|e| anyhow::anyhow!("DELETE: {e}"))?;
    d.wait(&id, "deleted", 120)
        .map_err(|e| anyhow::anyhow!("VM {id} was not deleted: {e}"))?;
    Ok(m)
}

/// When the node logged "VM started" for `id`, from `wall0`.
fn vm_started_at(log: &str, id: &str, wall0: SystemTime) -> Option<Duration> {
    let line = log
        .lines()
        .find(|l| l.contains("VM started") && l.contains(id))?;
    let line = strip_ansi(line);
    let at = parse_rfc3339(line.split_whitespace().next()?)?;
    at.duration_since(wall0).ok()
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `2026-11-23T12:34:56.123456Z` as a time.
fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut dp = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, mo, d) = (dp.next()??, dp.next()??, dp.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut tp = hms.split(':').map(|x| x.parse::<i64>().ok());
    let (h, mi, sec) = (tp.next()??, tp.next()??, tp.next()??);
    let frac: String = frac.chars().chain(std::iter::repeat('0')).take(9).collect();
    let nanos: u64 = frac.parse().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = u64::try_from(days * 86_400 + h * 3600 + mi * 60 + sec).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_nanos(nanos))
}

/// Starts `n` VMs, waits until all run, lets things settle, measures, and
/// deletes them again.
fn with_running_vms(
    d: &Daemon,
    n: usize,
    tag: &str,
    measure: impl Fn() -> Option<u64>,
) -> anyhow::Result<Option<u64>> {
    let ids: Vec<String> = (0..n)
        .map(|i| d.create_vm(&format!("mem-{tag}-{i}")))
        .collect();
    for id in &ids {
        d.wait(id, "running", BOOT_SECS * 2)
            .map_err(|e| anyhow::anyhow!("VM {id} did not reach running: {e}"))?;
    }
    std::thread::sleep(Duration::from_secs(3));
    let m = measure();
    for id in &ids {
        let _ = d.api.delete(&format!("/v1/vms/{id}"));
    }
    for id in &ids {
        let _ = d.wait(id, "deleted", 120);
    }
    Ok(m)
}

fn keep_log(d: &Daemon, label: &str) -> PathBuf {
    let to = std::env::temp_dir().join(format!(
        "byteport-bench-boot-{}-{label}.log",
        std::process::id()
    ));
    let mut log = d.log();
    let node = d.node_log();
    if !node.is_empty() {
        log.push_str("\n---- node.log ----\n");
        log.push_str(&node);
    }
    let _ = std::fs::write(&to, log);
    to
}

pub(crate) struct RemoveOnDrop(pub(crate) PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------- plain QEMU ----------

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_or(0, |a| a.port())
}

/// A UUID-shaped string (QEMU's `-uuid` wants one).
fn uuid_like(round: usize) -> String {
    let t = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let x = t ^ (u128::from(std::process::id()) << 64) ^ (round as u128);
    let h = format!("{x:032x}");
    format!(
        "{}-{}-4{}-8{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

fn qemu_img_create(disk: &Path) -> anyhow::Result<()> {
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(disk)
        .arg(format!("{DISK_GIB}G"))
        .output()
        .context("running qemu-img")?;
    if !out.status.success() {
        bail!(
            "qemu-img create failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The node driver's `command_line()` for this guest, with paths in `dir`.
fn plain_args(tiny: &Tiny, dir: &Path, name: &str, round: usize) -> Vec<String> {
    let d = |f: &str| dir.join(f).display().to_string();
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    push(&["-name", &format!("guest={name},debug-threads=off")]);
    push(&["-uuid", &uuid_like(round)]);
    push(&["-machine", "pc,accel=tcg"]);
    push(&["-smp", &VCPUS.to_string(), "-m", &MEMORY_MIB.to_string()]);
    push(&["-nodefaults", "-no-user-config", "-display", "none"]);
    push(&["-kernel", &tiny.kernel.display().to_string()]);
    push(&["-initrd", &tiny.initrd.display().to_string()]);
    push(&["-append", &tiny.cmdline_for(name)]);
    push(&[
        "-drive",
        &format!(
            "file={},if=none,id=disk0,format=qcow2,cache=writeback,discard=unmap",
            d("disk.qcow2")
        ),
        "-device",
        "virtio-blk-pci,drive=disk0,bootindex=1",
    ]);
    push(&[
        "-netdev",
        &format!("user,id=net0,hostfwd=tcp:127.0.0.1:{}-:22", free_port()),
        "-device",
        "virtio-net-pci,netdev=net0",
    ]);
    push(&[
        "-chardev",
        &format!(
            "socket,id=serial0,path={},server=on,wait=off,logfile={},logappend=on",
            d("console.sock"),
            d("console.log")
        ),
        "-serial",
        "chardev:serial0",
    ]);
    push(&[
        "-device",
        "virtio-serial-pci,id=vser0",
        "-chardev",
        &format!(
            "socket,id=agent0,path={},server=on,wait=off",
            d("agent.sock")
        ),
        "-device",
        &format!("virtserialport,chardev=agent0,name={AGENT_PORT}"),
    ]);
    push(&[
        "-chardev",
        &format!("socket,id=qmp0,path={},server=on,wait=off", d("qmp.sock")),
        "-mon",
        "chardev=qmp0,mode=control",
    ]);
    push(&["-pidfile", &d("qemu.pid")]);
    a
}

/// A child process killed (and reaped) on drop.
pub(crate) struct Killed(pub(crate) Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn plain_run(tiny: &Tiny, scratch: &Path, round: usize) -> anyhow::Result<Marks> {
    let dir = scratch.join(format!("plain-{round}"));
    std::fs::create_dir_all(&dir)?;
    let _rm = RemoveOnDrop(dir.clone());
    let prep = Instant::now();
    qemu_img_create(&dir.join("disk.qcow2"))?;
    let prep = prep.elapsed();
    let log = std::fs::File::create(dir.join("qemu.log"))?;
    let name = format!("plain-{round}");
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(plain_args(tiny, &dir, &name, round))
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .process_group(0);
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let child = Killed(cmd.spawn().context("starting qemu-system-x86_64")?);
    let files = watch_files(
        Watch {
            pidfile: Some(dir.join("qemu.pid")),
            log: dir.join("console.log"),
            node_files: None,
        },
        t0,
        stop.clone(),
    );
    let agent = watch_agent(dir.join("agent.sock"), t0, stop.clone());
    let ready = agent.join().ok().flatten();
    let mut m = finish_watch(files, &stop);
    m.ready = ready;
    m.prep = Some(prep);
    drop(child);
    if m.ready.is_none() || m.serial.is_none() {
        let qlog = std::fs::read_to_string(dir.join("qemu.log")).unwrap_or_default();
        bail!(
            "plain QEMU did not boot ({m}); its log: {}",
            tail(qlog.trim(), 500)
        );
    }
    Ok(m)
}

// ---------- libvirt ----------

struct Libvirt {
    /// The libvirtd we started, to stop at the end.
    started: Option<Child>,
}

const VIRSH_URI: &str = "qemu:///system";

fn virsh(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("virsh")
        .arg("-c")
        .arg(VIRSH_URI)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running virsh")?;
    if !out.status.success() {
        bail!(
            "virsh {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

impl Libvirt {
    /// libvirt if `virsh` is installed and libvirtd answers, starting it if
    /// it is installed but not running; otherwise why not.
    fn probe() -> Result<Libvirt, String> {
        if crate::which("virsh").is_none() {
            return Err(
                "not installed (apt-get install --no-install-recommends libvirt-daemon \
                        libvirt-daemon-driver-qemu libvirt-clients to compare)"
                    .into(),
            );
        }
        if virsh(&["uri"]).is_ok() {
            return Ok(Libvirt { started: None });
        }
        let daemon = ["/usr/sbin/libvirtd", "/usr/bin/libvirtd"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .ok_or("virsh is installed but libvirtd is not running and not installed")?;
        let child = Command::new(&daemon)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", daemon.display()))?;
        let mut child = child;
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if virsh(&["uri"]).is_ok() {
                eprintln!("libvirt: started {} (pid {})", daemon.display(), child.id());
                return Ok(Libvirt {
                    started: Some(child),
                });
            }
            if let Ok(Some(st)) = child.try_wait() {
                return Err(format!(
                    "{} exited ({st}); see docs/benchmarks.md for its setup",
                    daemon.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        stop_gently(child);
        Err(format!(
            "libvirtd ({}) did not answer on {VIRSH_URI}; see docs/benchmarks.md for its setup",
            daemon.display()
        ))
    }

    fn domain_xml(tiny: &Tiny, dir: &Path, name: &str, round: usize) -> String {
        let p = |f: &str| xml_escape(&dir.join(f).display().to_string());
        format!(
            "<domain type='qemu'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <memory unit='MiB'>{MEMORY_MIB}</memory>
  <vcpu>{VCPUS}</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <emulator>{emulator}</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='writeback' discard='unmap'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='user'><model type='virtio'/></interface>
    <serial type='file'><source path='{log}'/><target port='0'/></serial>
    <channel type='unix'>
      <source mode='bind' path='{agent}'/>
      <target type='virtio' name='{AGENT_PORT}'/>
    </channel>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
",
            uuid = uuid_like(round + 1000),
            kernel = xml_escape(&tiny.kernel.display().to_string()),
            initrd = xml_escape(&tiny.initrd.display().to_string()),
            cmdline = xml_escape(&tiny.cmdline_for(name)),
            emulator = crate::which("qemu-system-x86_64")
                .unwrap_or_else(|| PathBuf::from("/usr/bin/qemu-system-x86_64"))
                .display(),
            disk = p("disk.qcow2"),
            log = p("console.log"),
            agent = p("agent.sock"),
        )
    }

    /// One boot: define, `virsh start` (timed), destroy, undefine.
    fn run(&mut self, tiny: &Tiny, scratch: &Path, round: usize) -> anyhow::Result<Marks> {
        let dir = scratch.join(format!("libvirt-{round}"));
        std::fs::create_dir_all(&dir)?;
        let _rm = RemoveOnDrop(dir.clone());
        qemu_img_create(&dir.join("disk.qcow2"))?;
        let name = format!("bpbench-{}-{round}", std::process::id());
        let xml = dir.join("domain.xml");
        std::fs::write(&xml, Self::domain_xml(tiny, &dir, &name, round))?;
        virsh(&["define", &xml.display().to_string()])?;
        struct Undefine(String);
        impl Drop for Undefine {
            fn drop(&mut self) {
                let _ = virsh(&["destroy", &self.0]);
                let _ = virsh(&["undefine", &self.0]);
            }
        }
        let _undefine = Undefine(name.clone());
        let stop = Arc::new(AtomicBool::new(false));
        let t0 = Instant::now();
        let files = watch_files(
            Watch {
                pidfile: None,
                log: dir.join("console.log"),
                node_files: None,
            },
            t0,
            stop.clone(),
        );
        let agent = watch_agent(dir.join("agent.sock"), t0, stop.clone());
        let started = virsh(&["start", &name]);
        let ret = t0.elapsed();
        if let Err(e) = started {
            stop.store(true, Ordering::Relaxed);
            let _ = files.join();
            let _ = agent.join();
            return Err(e);
        }
        let ready = agent.join().ok().flatten();
        let mut m = finish_watch(files, &stop);
        m.ready = ready;
        m.post = Some(ret);
        if m.serial.is_none() || m.ready.is_none() {
            bail!("the libvirt guest did not boot ({m})");
        }
        Ok(m)
    }
}

impl Drop for Libvirt {
    /// Stops the libvirtd this run started (also when a step panicked).
    fn drop(&mut self) {
        if let Some(c) = self.started.take() {
            stop_gently(c);
        }
    }
}

/// SIGTERM, a few seconds, then SIGKILL; reaps the child.
fn stop_gently(mut c: Child) {
    let _ = Command::new("kill").arg(c.id().to_string()).status();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = c.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = c.kill();
    let _ = c.wait();
}
