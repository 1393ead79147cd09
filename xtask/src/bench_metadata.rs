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
/// Only an ed25519 host key: an RSA key's prime search takes a random
/// 5-20 s under TCG, noise that would drown the differences measured.
const USER_DATA: &str = "#cloud-config\nssh_genkeytypes: [ed25519]\nruncmd:\n  - [sh, -c, 'echo bench > /run/bench-done']\n";
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
    /// The data source cloud-init named at the end.
    source: String,
    /// CPU time QEMU used up to the end of cloud-init.
    qemu_cpu: Option<Duration>,
    /// CPU time the daemon (control plane and node) used meanwhile.
    daemon_cpu: Option<Duration>,
    /// Cores the whole host kept busy on average meanwhile.
    host_busy: f64,
}

impl std::fmt::Display for Marks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |d: Option<Duration>| d.map_or("-".into(), |d| d.as_millis().to_string());
        write!(
            f,
            "first request {} ms, finished line {} ms, API done {} ms, guest uptime {} ms, \
             QEMU CPU {} ms, daemon CPU {} ms, host busy {:.2} cores, {}",
            ms(self.first_request),
            ms(self.finished),
            ms(self.api_done),
            ms(self.guest_up),
            ms(self.qemu_cpu),
            ms(self.daemon_cpu),
            self.host_busy,
            self.source
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
    // Three arms a round, in an order that turns each round, so a drift
    // of the host's speed does not favour one.
    let labels = ["BytePort", Seed::Http.label(), Seed::Iso.label()];
    let mut arms: [Vec<Marks>; 3] = Default::default();
    for round in 1..=opts.runs {
        for k in 0..3 {
            let arm = (k + round) % 3;
            let m = match arm {
                0 => byteport_round(&d, round)?,
                1 => plain_round(&img, &scratch, round, Seed::Http)?,
                _ => plain_round(&img, &scratch, round, Seed::Iso)?,
            };
            eprintln!("run {round}/{}: {:<10} {m}", opts.runs, labels[arm]);
            arms[arm].push(m);
        }
    }
    drop(d);

    type Pick = fn(&Marks) -> Option<Duration>;
    let col = |v: &[Marks], f: Pick| -> Vec<f64> {
        v.iter()
            .filter_map(f)
            .map(|d| d.as_secs_f64() * 1e3)
            .collect()
    };
    let picks: [(&str, Pick); 6] = [
        ("start -> first metadata request", |m| m.first_request),
        ("start -> cloud-init finished (console)", |m| m.finished),
        ("start -> API cloud_init: done", |m| m.api_done),
        ("guest uptime at the end of cloud-init", |m| m.guest_up),
        ("QEMU CPU time to the end", |m| m.qemu_cpu),
        ("daemon CPU time meanwhile", |m| m.daemon_cpu),
    ];
    println!();
    println!(
        "{:<52} {:>8} {:>8} {:>8} {:>3}",
        "cloud-init (ms)", "median", "min", "max", "n"
    );
    for (what, f) in picks {
        for (label, marks) in labels.iter().zip(&arms) {
            let v = col(marks, f);
            if v.is_empty() {
                continue;
            }
            let s = Summary::of(&v);
            println!(
                "{:<52} {:>8.0} {:>8.0} {:>8.0} {:>3}",
                format!("{label:<10} {what}"),
                s.median,
                s.min,
                s.max,
                v.len()
            );
        }
    }
    println!();
    println!(
        "{:<40} {:>10} {:>10} {:>10}",
        "guest uptime at each stage (s, median)", labels[0], labels[1], labels[2]
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
        println!(
            "{stage:<40} {:>10.1} {:>10.1} {:>10.1}",
            at(&arms[0]),
            at(&arms[1]),
            at(&arms[2])
        );
    }
    let busy = |v: &[Marks]| Summary::of(&v.iter().map(|m| m.host_busy).collect::<Vec<_>>()).median;
    println!();
    println!(
        "host cores busy on average (median): {:.2}, {:.2}, {:.2}",
        busy(&arms[0]),
        busy(&arms[1]),
        busy(&arms[2])
    );
    let med = |v: &[Marks], f: Pick| Summary::of(&col(v, f)).median;
    let [bp, http, iso] = &arms;
    let ratio = |base: &[Marks], f: Pick| med(bp, f) / med(base, f);
    let done_http = ratio(http, |m| m.finished);
    let done_iso = ratio(iso, |m| m.finished);
    println!();
    println!(
        "BytePort / plain+http, time to cloud-init finished: {done_http:.3} (the service's own cost; goal <= 1.02)"
    );
    println!(
        "BytePort / plain+http, guest uptime at the end:     {:.3}",
        ratio(http, |m| m.guest_up)
    );
    println!(
        "BytePort / plain+iso,  time to cloud-init finished: {done_iso:.3} (a network data source against a disk)"
    );
    println!(
        "BytePort / plain+iso,  guest uptime at the end:     {:.3}",
        ratio(iso, |m| m.guest_up)
    );
    println!(
        "RESULT bench=metadata runs={} first_request_ms={:.0} done_ms={:.0} api_done_ms={:.0} http_first_request_ms={:.0} http_done_ms={:.0} iso_done_ms={:.0} done_ratio_http={done_http:.3} done_ratio_iso={done_iso:.3}",
        opts.runs,
        med(bp, |m| m.first_request),
        med(bp, |m| m.finished),
        med(bp, |m| m.api_done),
        med(http, |m| m.first_request),
        med(http, |m| m.finished),
        med(iso, |m| m.finished),
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

/// cloud-init's final message, once it is there: the guest uptime it
/// gives ("Up N seconds") and the data source it names.
fn finished_line(log: &Path) -> Option<(Option<Duration>, String)> {
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
    let source = line
        .split("Datasource ")
        .nth(1)
        .and_then(|r| r.split([' ', '.']).next())
        .unwrap_or("")
        .to_owned();
    Some((up, source))
}

/// Both ways must have read the user-data: a boot that fell back to no
/// data source did less work and would flatter its side.
fn check_source(marks: &Marks, want: &str, log: &Path) -> anyhow::Result<()> {
    if marks.source != want {
        bail!(
            "cloud-init used {:?}, not {want}; see {}",
            marks.source,
            log.display()
        );
    }
    Ok(())
}

/// CPU time (user + system) a process has used so far, from /proc.
fn cpu_used(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let ticks: u64 = stat
        .rsplit_once(')')
        .map(|(_, rest)| {
            rest.split_whitespace()
                .skip(11)
                .take(2)
                .filter_map(|t| t.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0);
    // The kernel reports USER_HZ ticks, 100 a second on Linux.
    Duration::from_millis(ticks * 10)
}

/// Busy and total CPU time of the whole host so far, in ticks (/proc/stat).
fn host_cpu() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|t| t.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    // idle and iowait
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// Cores busy on average between two [`host_cpu`] readings.
fn cores_busy(from: (u64, u64), to: (u64, u64)) -> f64 {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let total = to.1.saturating_sub(from.1).max(1) as f64;
    to.0.saturating_sub(from.0) as f64 / total * cores
}

fn byteport_round(d: &Daemon, round: usize) -> anyhow::Result<Marks> {
    let wall0 = SystemTime::now();
    let daemon = d.child.as_ref().map(|c| c.id());
    let daemon0 = daemon.map(cpu_used);
    let host0 = host_cpu();
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
            && let Some((up, source)) = finished_line(&log)
        {
            m.finished = Some(t0.elapsed());
            m.guest_up = up;
            m.source = source;
            m.host_busy = cores_busy(host0, host_cpu());
            m.qemu_cpu = d.qemu_pid(&id).map(cpu_used);
            m.daemon_cpu = daemon
                .zip(daemon0)
                .map(|(pid, from)| cpu_used(pid).saturating_sub(from));
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
    let kept = keep(&log, &format!("byteport-{round}"));
    eprintln!("console log kept: {}", kept.display());
    delete(d, &id)?;
    check_source(&m, "DataSourceNoCloudNet", &kept)?;
    Ok(m)
}

/// How the plain QEMU guest gets its documents.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Seed {
    /// A `cidata` ISO on a second virtio disk (the NoCloud data source).
    Iso,
    /// The same files from a static HTTP server on the host, with the same
    /// SMBIOS data-source line as BytePort's (NoCloud-net).
    Http,
}

impl Seed {
    fn label(self) -> &'static str {
        match self {
            Seed::Iso => "plain+iso",
            Seed::Http => "plain+http",
        }
    }
}

/// The MAC of the plain guest's NIC, matched by its network-config.
const PLAIN_MAC: &str = "52:54:00:be:4c:01";

/// The four documents, as BytePort's service writes them (meta-data and
/// network-config in JSON, which YAML reads as is).
fn seed_files(name: &str) -> Vec<(&'static str, String)> {
    let meta = json!({"instance-id": format!("{name}-{}", std::process::id()),
        "local-hostname": name, "public-keys": []});
    let net = json!({"version": 2, "ethernets": {"nic0": {
        "match": {"macaddress": PLAIN_MAC}, "dhcp4": true}}});
    vec![
        ("meta-data", format!("{meta:#}\n")),
        ("user-data", USER_DATA.to_owned()),
        ("vendor-data", "#cloud-config\n{}\n".to_owned()),
        ("network-config", format!("{net:#}\n")),
    ]
}

/// A static HTTP server for `files` on 127.0.0.1, in a thread that lives
/// as long as the process. Returns its port and when it was first asked.
fn serve_seed(
    files: Vec<(&'static str, String)>,
) -> anyhow::Result<(u16, std::sync::Arc<std::sync::OnceLock<Instant>>)> {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let first = std::sync::Arc::new(std::sync::OnceLock::new());
    let seen = first.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let _ = seen.set(Instant::now());
            let mut line = String::new();
            let _ = BufReader::new(&conn).read_line(&mut line);
            let path = line.split_whitespace().nth(1).unwrap_or("/");
            let name = path.rsplit('/').next().unwrap_or("");
            let body = files.iter().find(|(n, _)| *n == name).map(|(_, b)| b);
            let head = match body {
                Some(b) => format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    b.len()
                ),
                None => "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    .to_owned(),
            };
            let mut conn = conn;
            let _ = conn.write_all(head.as_bytes());
            if let Some(b) = body {
                let _ = conn.write_all(b.as_bytes());
            }
        }
    });
    Ok((port, first))
}

fn plain_round(img: &Image, scratch: &Path, round: usize, seed: Seed) -> anyhow::Result<Marks> {
    let name = format!("{}-{round}", seed.label().replace('+', "-"));
    let dir = scratch.join(&name);
    std::fs::create_dir_all(&dir)?;
    // The seed and the overlay are made before the clock starts.
    let files = seed_files(&name);
    let mut seed_args: Vec<String> = Vec::new();
    let mut first_request = None;
    match seed {
        Seed::Iso => {
            let seed_dir = dir.join("seed");
            std::fs::create_dir_all(&seed_dir)?;
            for (n, body) in &files {
                std::fs::write(seed_dir.join(n), body)?;
            }
            let iso = dir.join("seed.iso");
            let out = Command::new("genisoimage")
                .arg("-quiet")
                .arg("-output")
                .arg(&iso)
                .args(["-volid", "cidata", "-joliet", "-rock"])
                .args(files.iter().map(|(n, _)| seed_dir.join(n)))
                .output()
                .context("running genisoimage")?;
            if !out.status.success() {
                bail!("genisoimage: {}", String::from_utf8_lossy(&out.stderr));
            }
            seed_args.extend([
                "-drive".to_owned(),
                format!(
                    "file={},if=none,id=seed,format=raw,readonly=on",
                    iso.display()
                ),
                "-device".to_owned(),
                "virtio-blk-pci,drive=seed".to_owned(),
            ]);
        }
        Seed::Http => {
            let (port, first) = serve_seed(files)?;
            first_request = Some(first);
            seed_args.extend([
                "-smbios".to_owned(),
                format!("type=1,serial=ds=nocloud-net;s=http://10.0.2.2:{port}/"),
            ]);
        }
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
        "-netdev",
        &format!("user,id=net0,hostfwd=tcp:127.0.0.1:{}-:22", free_port()),
        "-device",
        &format!("virtio-net-pci,netdev=net0,mac={PLAIN_MAC}"),
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
    .chain(seed_args)
    .collect();
    let t0 = Instant::now();
    let child = Command::new("qemu-system-x86_64")
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("qemu.log"))?)
        .spawn()
        .context("spawning QEMU")?;
    let pid = child.id();
    let _qemu = Killed(child);
    let host0 = host_cpu();
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
        if let Some((up, source)) = finished_line(&log) {
            m.finished = Some(t0.elapsed());
            m.guest_up = up;
            m.source = source;
            m.host_busy = cores_busy(host0, host_cpu());
            m.qemu_cpu = Some(cpu_used(pid));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    m.first_request = first_request
        .and_then(|f| f.get().copied())
        .map(|at| at.saturating_duration_since(t0));
    m.stages = stages(&log);
    let kept = keep(&log, &name);
    eprintln!("console log kept: {}", kept.display());
    let want = match seed {
        Seed::Iso => "DataSourceNoCloud",
        Seed::Http => "DataSourceNoCloudNet",
    };
    check_source(&m, want, &kept)?;
    Ok(m)
}
