//! `cargo xtask bench metadata`: how long cloud-init takes in a `debian-12`
//! VM that reads BytePort's metadata service, against the same image booted
//! by plain QEMU with a static NoCloud seed (a `cidata` ISO made with
//! genisoimage), in the same run.
//!
//! One run:
//!
//! 1. Builds the release daemon (unless `--no-build`), starts an all-in-one
//!    `byteportd` and imports `debian-12` (built first if missing). A
//!    warm-up VM fills the node's image cache and is deleted.
//! 2. `--runs` rounds, each booting the same guest both ways, one after the
//!    other, with the same user-data (a `runcmd`):
//!    - BytePort: `POST /v1/vms`; the time to the guest's first metadata
//!      request (the audit log of the metadata service), to cloud-init's
//!      "finished at" line on the serial console, and to the API showing
//!      `cloud_init: done` (reported through the guest agent).
//!    - Plain QEMU: the same machine, kernel, initrd, disk overlay, NIC and
//!      agent port, plus the seed ISO as a second virtio disk; spawn to the
//!      same console line.
//!
//!    Both also report cloud-init's own "Up N seconds" (guest uptime).
//! 3. Prints medians, min and max, the ratio BytePort / plain, and one
//!    `RESULT key=value ...` line.
//!
//! Options: `--runs N` (default 3), `--quick` (1 run), `--no-build`,
//! `--bin PATH`. See `docs/benchmarks.md`.

use crate::bench_boot::{Killed, RemoveOnDrop, Summary, free_port};
use anyhow::{Context, bail};
use byteport_testkit::daemon::Daemon;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

/// Debian with systemd and cloud-init under TCG on a busy host.
const BOOT_SECS: u64 = 420;
const VCPUS: u32 = 1;
const MEMORY_MIB: u64 = 1024;
const DISK_GIB: u64 = 4;
const USER_DATA: &str = "#cloud-config\nruncmd:\n  - [sh, -c, 'echo bench > /run/bench-done']\n";
/// What cloud-init's final stage prints on the console.
const FINISHED: &str = "finished at";

struct Opts {
    runs: usize,
    build: bool,
    bin: Option<PathBuf>,
}

fn parse_args(args: &[&str]) -> anyhow::Result<Opts> {
    let mut o = Opts {
        runs: 3,
        build: true,
        bin: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match *a {
            "--runs" => {
                let v = it.next().context("--runs needs a value")?;
                o.runs = v
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .with_context(|| format!("--runs: not a positive number: {v}"))?;
            }
            "--quick" => o.runs = 1,
            "--no-build" => o.build = false,
            "--bin" => {
                o.bin = Some(PathBuf::from(it.next().context("--bin needs a path")?));
                o.build = false;
            }
            other => bail!(
                "unknown option {other}; usage: cargo xtask bench metadata [--runs N] [--quick] \
                 [--no-build] [--bin PATH]"
            ),
        }
    }
    Ok(o)
}

/// The image's files, as the node boots them.
struct Image {
    dir: PathBuf,
    kernel: PathBuf,
    initrd: PathBuf,
    disk: PathBuf,
    cmdline: String,
}

impl Image {
    fn load(dir: &Path) -> anyhow::Result<Image> {
        let m: Value = serde_json::from_slice(&std::fs::read(dir.join("manifest.json"))?)
            .context("the image manifest is not JSON")?;
        let file = |k: &str| -> anyhow::Result<PathBuf> {
            Ok(dir.join(
                m[k].as_str()
                    .with_context(|| format!("the manifest names no {k}"))?,
            ))
        };
        Ok(Image {
            dir: dir.to_owned(),
            kernel: file("kernel")?,
            initrd: file("initrd")?,
            disk: file("disk")?,
            cmdline: m["cmdline"].as_str().unwrap_or("console=ttyS0").to_owned(),
        })
    }
}

/// One boot's milestones, from the POST (BytePort) or the spawn (plain).
#[derive(Default)]
struct Marks {
    first_request: Option<Duration>,
    finished: Option<Duration>,
    api_done: Option<Duration>,
    /// cloud-init's "Up N seconds": guest uptime at the end.
    guest_up: Option<Duration>,
    /// Guest uptime (s) at the start of each cloud-init stage.
    stages: Vec<(String, f64)>,
}

impl std::fmt::Display for Marks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |d: Option<Duration>| d.map_or("-".into(), |d| d.as_millis().to_string());
        write!(
            f,
            "first request {} ms, finished line {} ms, API done {} ms, guest uptime {} ms",
            ms(self.first_request),
            ms(self.finished),
            ms(self.api_done),
            ms(self.guest_up)
        )
    }
}

pub fn run(root: &Path, args: &[&str]) -> anyhow::Result<()> {
    let opts = parse_args(args)?;
    for tool in ["qemu-system-x86_64", "qemu-img", "genisoimage"] {
        if crate::which(tool).is_none() {
            bail!("{tool} is missing (apt-get install qemu-system-x86 qemu-utils genisoimage)");
        }
    }
    let bin = crate::release_daemon(root, opts.build, opts.bin.clone())?;
    let img_dir = root.join("build/images/debian-12");
    if !img_dir.join("manifest.json").exists() {
        eprintln!("no debian-12 image at {}: building it", img_dir.display());
        crate::image::run(root, &["build", "debian-12"])?;
    }
    let img = Image::load(&img_dir)?;
    let scratch =
        std::env::temp_dir().join(format!("byteport-bench-metadata-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch)?;
    let _scratch = RemoveOnDrop(scratch.clone());
    println!(
        "metadata benchmark: {} runs, {} cores, accel tcg, guest {VCPUS} vCPU / {MEMORY_MIB} MiB / {DISK_GIB} GiB, image {}",
        opts.runs,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        img.dir.display()
    );

    let d = Daemon::start(&bin);
    d.import_image(&img.dir);
    warm_up(&d)?;
    let mut bp = Vec::new();
    let mut plain = Vec::new();
    for round in 1..=opts.runs {
        let b = byteport_round(&d, round)?;
        eprintln!("run {round}/{}: BytePort   {b}", opts.runs);
        let p = plain_round(&img, &scratch, round)?;
        eprintln!("run {round}/{}: plain QEMU {p}", opts.runs);
        bp.push(b);
        plain.push(p);
    }
    drop(d);

    type Pick = fn(&Marks) -> Option<Duration>;
    let col = |v: &[Marks], f: Pick| -> Vec<f64> {
        v.iter()
            .filter_map(f)
            .map(|d| d.as_secs_f64() * 1e3)
            .collect()
    };
    let rows: Vec<(&str, Vec<f64>)> = vec![
        (
            "BytePort  POST -> first metadata request",
            col(&bp, |m| m.first_request),
        ),
        (
            "BytePort  POST -> cloud-init finished (console)",
            col(&bp, |m| m.finished),
        ),
        (
            "BytePort  POST -> API cloud_init: done",
            col(&bp, |m| m.api_done),
        ),
        (
            "BytePort  guest uptime at the end (cloud-init)",
            col(&bp, |m| m.guest_up),
        ),
        (
            "plain     spawn -> cloud-init finished (console)",
            col(&plain, |m| m.finished),
        ),
        (
            "plain     guest uptime at the end (cloud-init)",
            col(&plain, |m| m.guest_up),
        ),
    ];
    println!();
    println!(
        "{:<52} {:>8} {:>8} {:>8} {:>3}",
        "cloud-init (ms)", "median", "min", "max", "n"
    );
    for (label, v) in &rows {
        let s = Summary::of(v);
        println!(
            "{label:<52} {:>8.0} {:>8.0} {:>8.0} {:>3}",
            s.median,
            s.min,
            s.max,
            v.len()
        );
    }
    println!();
    println!(
        "{:<52} {:>8} {:>8}",
        "guest uptime at each cloud-init stage (s, median)", "BytePort", "plain"
    );
    for stage in [
        "init-local",
        "init",
        "modules:config",
        "modules:final",
        "finished",
    ] {
        let at = |v: &[Marks]| {
            let xs: Vec<f64> = v
                .iter()
                .filter_map(|m| m.stages.iter().find(|(n, _)| n == stage).map(|(_, t)| *t))
                .collect();
            Summary::of(&xs).median
        };
        println!("{stage:<52} {:>8.1} {:>8.1}", at(&bp), at(&plain));
    }
    let med = |v: &[Marks], f: Pick| Summary::of(&col(v, f)).median;
    let done_ratio = med(&bp, |m| m.finished) / med(&plain, |m| m.finished);
    let up_ratio = med(&bp, |m| m.guest_up) / med(&plain, |m| m.guest_up);
    println!();
    println!("BytePort / plain, time to cloud-init finished: {done_ratio:.3} (goal <= 1.02)");
    println!("BytePort / plain, guest uptime at the end:     {up_ratio:.3}");
    println!(
        "RESULT bench=metadata runs={} first_request_ms={:.0} done_ms={:.0} api_done_ms={:.0} plain_done_ms={:.0} done_ratio={done_ratio:.3} uptime_ratio={up_ratio:.3}",
        opts.runs,
        med(&bp, |m| m.first_request),
        med(&bp, |m| m.finished),
        med(&bp, |m| m.api_done),
        med(&plain, |m| m.finished),
    );
    Ok(())
}

fn vm_body(name: &str) -> Value {
    json!({"name": name, "image": "debian-12", "vcpus": VCPUS, "memory_mib": MEMORY_MIB,
        "disk_gib": DISK_GIB, "user_data": USER_DATA})
}

/// One VM through to a running QEMU, so the node has the image cached.
fn warm_up(d: &Daemon) -> anyhow::Result<()> {
    let v = d
        .api
        .post("/v1/vms", vm_body("warm-up"))
        .map_err(|e| anyhow::anyhow!("POST /v1/vms: {e}"))?;
    let id = v["id"].as_str().context("no VM id")?.to_owned();
    let t0 = Instant::now();
    while d.qemu_pid(&id).is_none() {
        if t0.elapsed() > Duration::from_secs(BOOT_SECS) {
            bail!("the warm-up VM never started: {}", d.vm(&id));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "warm-up: image cached, QEMU up in {} ms",
        t0.elapsed().as_millis()
    );
    delete(d, &id)
}

fn delete(d: &Daemon, id: &str) -> anyhow::Result<()> {
    d.api
        .delete(&format!("/v1/vms/{id}"))
        .map_err(|e| anyhow::anyhow!("DELETE: {e}"))?;
    d.wait(id, "deleted", 120)
        .map_err(|e| anyhow::anyhow!("VM {id} was not deleted: {e}"))?;
    Ok(())
}

/// The stages cloud-init announced on the console ("running 'init' at
/// ... Up 48.69 seconds"), with the guest uptime at each, and the end.
fn stages(log: &Path) -> Vec<(String, f64)> {
    let text = std::fs::read(log).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let up = |l: &str| {
        l.split("Up ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse::<f64>().ok())
    };
    text.lines()
        .filter(|l| l.contains("Cloud-init v."))
        .filter_map(|l| {
            let name = match l.split("running '").nth(1) {
                Some(r) => r.split('\'').next()?.to_owned(),
                None if l.contains(FINISHED) => "finished".to_owned(),
                None => return None,
            };
            Some((name, up(l)?))
        })
        .collect()
}

/// Keeps a boot's console log for reading after the run.
fn keep(log: &Path, label: &str) -> PathBuf {
    let to = std::env::temp_dir().join(format!(
        "byteport-bench-metadata-{}-{label}.log",
        std::process::id()
    ));
    let _ = std::fs::copy(log, &to);
    to
}

/// The "Up N seconds" of cloud-init's final message, once it is there.
fn finished_line(log: &Path) -> Option<Option<Duration>> {
    let text = std::fs::read(log).ok()?;
    let text = String::from_utf8_lossy(&text);
    let line = text
        .lines()
        .find(|l| l.contains(FINISHED) && l.contains("Cloud-init"))?;
    let up = line
        .split("Up ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse::<f64>().ok())
        .map(Duration::from_secs_f64);
    Some(up)
}

fn byteport_round(d: &Daemon, round: usize) -> anyhow::Result<Marks> {
    let wall0 = SystemTime::now();
    let t0 = Instant::now();
    let v = d
        .api
        .post("/v1/vms", vm_body(&format!("meta-{round}")))
        .map_err(|e| anyhow::anyhow!("POST /v1/vms: {e}"))?;
    let id = v["id"].as_str().context("no VM id")?.to_owned();
    let log = d.vm_dir(&id).join("console.log");
    let mut m = Marks::default();
    let mut last_api = Instant::now();
    while m.finished.is_none() || m.api_done.is_none() {
        if t0.elapsed() > Duration::from_secs(BOOT_SECS) {
            bail!("cloud-init did not finish in {BOOT_SECS} s: {}", d.vm(&id));
        }
        if m.finished.is_none()
            && let Some(up) = finished_line(&log)
        {
            m.finished = Some(t0.elapsed());
            m.guest_up = up;
        }
        if m.api_done.is_none() && last_api.elapsed() >= Duration::from_millis(250) {
            last_api = Instant::now();
            let v = d.vm(&id);
            match v["cloud_init"].as_str() {
                Some("done") => m.api_done = Some(t0.elapsed()),
                Some("error" | "absent") => bail!("cloud-init did not end well: {v}"),
                _ => {}
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // The first metadata request, from the service's audit log.
    let audit = d
        .api
        .get("/v1/audit?limit=500")
        .map_err(|e| anyhow::anyhow!("audit: {e}"))?;
    m.first_request = audit["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["target_id"] == id.as_str())
        .filter(|e| {
            e["action"]
                .as_str()
                .is_some_and(|a| a.starts_with("metadata_"))
        })
        .filter_map(|e| e["at"].as_str())
        .filter_map(|at| chrono::DateTime::parse_from_rfc3339(at).ok())
        .map(SystemTime::from)
        .filter_map(|at| at.duration_since(wall0).ok())
        .min();
    m.stages = stages(&log);
    eprintln!(
        "console log kept: {}",
        keep(&log, &format!("byteport-{round}")).display()
    );
    delete(d, &id)?;
    Ok(m)
}

fn plain_round(img: &Image, scratch: &Path, round: usize) -> anyhow::Result<Marks> {
    let dir = scratch.join(format!("plain-{round}"));
    std::fs::create_dir_all(&dir)?;
    // The seed and the overlay are made before the clock starts.
    let seed = dir.join("seed");
    std::fs::create_dir_all(&seed)?;
    std::fs::write(
        seed.join("meta-data"),
        format!(
            "instance-id: plain-{round}-{}\nlocal-hostname: plain-{round}\n",
            std::process::id()
        ),
    )?;
    std::fs::write(seed.join("user-data"), USER_DATA)?;
    let iso = dir.join("seed.iso");
    let out = Command::new("genisoimage")
        .arg("-quiet")
        .arg("-output")
        .arg(&iso)
        .args(["-volid", "cidata", "-joliet", "-rock"])
        .arg(seed.join("user-data"))
        .arg(seed.join("meta-data"))
        .output()
        .context("running genisoimage")?;
    if !out.status.success() {
        bail!("genisoimage: {}", String::from_utf8_lossy(&out.stderr));
    }
    let disk = dir.join("disk.qcow2");
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&img.disk)
        .arg(&disk)
        .arg(format!("{DISK_GIB}G"))
        .output()
        .context("running qemu-img")?;
    if !out.status.success() {
        bail!("qemu-img create: {}", String::from_utf8_lossy(&out.stderr));
    }
    let log = dir.join("console.log");
    let p = |p: &Path| p.display().to_string();
    let args: Vec<String> = [
        "-machine",
        "pc,accel=tcg",
        "-smp",
        &VCPUS.to_string(),
        "-m",
        &MEMORY_MIB.to_string(),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-kernel",
        &p(&img.kernel),
        "-initrd",
        &p(&img.initrd),
        "-append",
        &img.cmdline,
        "-drive",
        &format!(
            "file={},if=none,id=disk0,format=qcow2,cache=writeback,discard=unmap",
            p(&disk)
        ),
        "-device",
        "virtio-blk-pci,drive=disk0,bootindex=1",
        "-drive",
        &format!("file={},if=none,id=seed,format=raw,readonly=on", p(&iso)),
        "-device",
        "virtio-blk-pci,drive=seed",
        "-netdev",
        &format!("user,id=net0,hostfwd=tcp:127.0.0.1:{}-:22", free_port()),
        "-device",
        "virtio-net-pci,netdev=net0,mac=52:54:00:be:4c:01",
        "-chardev",
        &format!("file,id=serial0,path={}", p(&log)),
        "-serial",
        "chardev:serial0",
        "-device",
        "virtio-serial-pci,id=vser0",
        "-chardev",
        &format!(
            "socket,id=agent0,path={},server=on,wait=off",
            p(&dir.join("agent.sock"))
        ),
        "-device",
        &format!(
            "virtserialport,chardev=agent0,name={}",
            byteport_guest::proto::AGENT_PORT_NAME
        ),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let t0 = Instant::now();
    let child = Command::new("qemu-system-x86_64")
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("qemu.log"))?)
        .spawn()
        .context("spawning QEMU")?;
    let _qemu = Killed(child);
    let mut m = Marks::default();
    while m.finished.is_none() {
        if t0.elapsed() > Duration::from_secs(BOOT_SECS) {
            bail!(
                "plain QEMU: cloud-init did not finish in {BOOT_SECS} s; console tail: {}",
                std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .lines()
                    .rev()
                    .take(5)
                    .collect::<Vec<_>>()
                    .join(" | ")
            );
        }
        if let Some(up) = finished_line(&log) {
            m.finished = Some(t0.elapsed());
            m.guest_up = up;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    m.stages = stages(&log);
    eprintln!(
        "console log kept: {}",
        keep(&log, &format!("plain-{round}")).display()
    );
    Ok(m)
}
