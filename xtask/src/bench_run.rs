//! `cargo xtask bench run`: run-code, measured at the client, in one run:
//!
//! 1. **First run**: the first run of each runtime waits for its template
//!    (a boot to the guest agent's ready, then the save), reported as
//!    `template_build_ms`.
//! 2. **Pooled clone** (the default node, `--run-pool 1`): 30 runs each
//!    (10 with `--quick`) of a shell `echo` and a Python `print`, one
//!    second after the other ended (the pool has restored the next clone):
//!    the time from sending `POST /v1/runs` to the first output line
//!    arriving at the client; p50 and p99. Then the same runs back to
//!    back, each coming while the pool restores.
//! 3. **Sustained**: Python runs from 4 clients at once for `--secs` (20);
//!    runs per second (the project's `max_concurrent_runs` set to 8).
//! 4. **Memory**: what a clone's QEMU adds to the host, idle in the pool
//!    and (on the second daemon) while its program sleeps: its anonymous
//!    memory (`Anonymous` of
//!    `/proc/PID/smaps_rollup`: the pages of guest RAM it wrote, copied
//!    on write, QEMU's heap and translated code). The template's RAM file
//!    is page cache that every clone of it maps, there once per template;
//!    what of it a clone maps is printed beside.
//!
//! 5. **Clone restored for the run** (a second daemon, `--run-pool 0`) and
//!    **cold boot** (a third, `--run-templates false`, 6 runs each, 3 with
//!    `--quick`): the same runs, for the ratios against the pooled clone.
//!
//! Prints each figure, the ratios and a `RESULT` line. Options: `--quick` (10 runs,
//! 8 s), `--no-build`.

use crate::bench_boot::Summary;
use anyhow::{Context, bail};
use byteport_testkit::daemon::{Daemon, qemus_under};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The pause between two pooled runs: time for the pool to restore the
/// next clone, as between the runs of a person at an editor.
const POOL_GAP: Duration = Duration::from_millis(1000);

struct Opts {
    runs: usize,
    secs: u64,
    build: bool,
}

fn parse(args: &[&str]) -> anyhow::Result<Opts> {
    let mut o = Opts {
        runs: 30,
        secs: 20,
        build: true,
    };
    for a in args {
        match *a {
            "--quick" => {
                o.runs = 10;
                o.secs = 8;
            }
            "--no-build" => o.build = false,
            other => bail!("unknown option {other}; try --quick, --no-build"),
        }
    }
    Ok(o)
}

/// One run over a plain HTTP/1.1 connection: (ms to the first output line,
/// the end record).
fn timed_run(addr: &str, token: &str, body: &Value) -> anyhow::Result<(Option<f64>, Value)> {
    let body = serde_json::to_vec(body)?;
    let t0 = Instant::now();
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    write!(
        s,
        "POST /v1/runs HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    s.write_all(&body)?;
    let mut r = BufReader::new(s);
    let mut first = None;
    let mut end = Value::Null;
    let mut line = String::new();
    // Headers, then chunked NDJSON: chunk-size lines and data lines.
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            break;
        }
        let l = line.trim();
        if !l.starts_with('{') {
            if l.starts_with("HTTP/1.1") && !l.contains(" 200 ") {
                bail!("the run was refused: {l}");
            }
            continue;
        }
        let v: Value = serde_json::from_str(l).unwrap_or(Value::Null);
        if v.get("output").is_some() && first.is_none() {
            first = Some(t0.elapsed().as_secs_f64() * 1000.0);
        }
        if let Some(e) = v.get("end") {
            end = e.clone();
            break;
        }
    }
    Ok((first, end))
}

/// A clone's memory, MiB: (what it adds, what of the template's RAM file
/// it maps). What it adds is its anonymous memory: the guest pages it
/// wrote (private copies), QEMU's heap, stacks and translated code. The
/// file's pages are the template's, shared by every clone of it.
fn clone_mib(pid: u32) -> Option<(f64, f64)> {
    let mib = |v: &str| {
        v.split_whitespace()
            .next()
            .and_then(|n| n.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let added = rollup.lines().find_map(|l| l.strip_prefix("Anonymous:"))?;
    // The RAM file's mapping: its resident pages less those copied on write.
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let (mut file, mut in_file) = (0.0, false);
    for l in smaps.lines() {
        if let Some(v) = l.strip_prefix("Rss:") {
            file += if in_file { mib(v) } else { 0.0 };
        } else if let Some(v) = l.strip_prefix("Anonymous:") {
            file -= if in_file { mib(v) } else { 0.0 };
        } else if !l.contains(": ") || l.ends_with(':') {
            // A mapping's first line (`start-end perms offset dev inode path`).
            in_file = l.contains("/dev/shm/") || l.contains("/memfd:");
        }
    }
    Some((mib(added), file))
}

/// The mean of what `pids`' clones add and map, with how many there were.
fn clones_mib(pids: &[u32]) -> (f64, f64, usize) {
    let m: Vec<(f64, f64)> = pids.iter().filter_map(|p| clone_mib(*p)).collect();
    let n = m.len().max(1) as f64;
    (
        m.iter().map(|x| x.0).sum::<f64>() / n,
        m.iter().map(|x| x.1).sum::<f64>() / n,
        m.len(),
    )
}

/// Sequential runs of each program: (p50, p99) of the time to first
/// output, printed as it goes.
fn latencies(
    addr: &str,
    token: &str,
    programs: &[(&str, &serde_json::Value)],
    runs: usize,
    gap: Duration,
) -> anyhow::Result<Vec<(f64, f64)>> {
    let mut p = Vec::new();
    for (name, body) in programs {
        let mut v = Vec::new();
        for _ in 0..runs {
            std::thread::sleep(gap);
            let (first, end) = timed_run(addr, token, body)?;
            if end["state"] != "exited" {
                bail!("a {name} run ended {}", end);
            }
            v.push(first.unwrap_or(f64::NAN));
        }
        v.sort_by(f64::total_cmp);
        let p99 = v[((v.len() as f64 * 0.99).ceil() as usize).min(v.len()) - 1];
        let s = Summary::of(&v);
        println!(
            "  {name}: p50 {:.0} ms, p99 {p99:.0} ms (min {:.0}, max {:.0})",
            s.median, s.min, s.max
        );
        p.push((s.median, p99));
    }
    Ok(p)
}

/// An all-in-one with the runtimes imported and room for the runs.
fn daemon(
    bin: &Path,
    root: &Path,
    envs: &[(&str, &str)],
) -> anyhow::Result<(Daemon, String, String)> {
    let d = Daemon::start_with_env(bin, envs);
    for name in ["run-shell", "run-python"] {
        d.import_image(&root.join("build/images").join(name));
    }
    d.api
        .put(
            "/v1/projects/default/quota",
            json!({"max_vms": 20, "max_vcpus": 40, "max_memory_mib": 65536, "max_disk_gib": 1024, "max_concurrent_runs": 8}),
        )
        .map_err(anyhow::Error::msg)?;
    let addr = d.url.trim_start_matches("http://").to_owned();
    let token = d.api.token.clone().context("a token")?;
    Ok((d, addr, token))
}

pub fn run(root: &Path, args: &[&str]) -> anyhow::Result<()> {
    let o = parse(args)?;
    let bin = crate::release_daemon(root, o.build, None)?;
    for name in ["run-shell", "run-python"] {
        if !root
            .join("build/images")
            .join(name)
            .join("manifest.json")
            .exists()
        {
            crate::image::run(root, &["build", name])?;
        }
    }
    let (d, addr, token) = daemon(&bin, root, &[])?;
    let shell = json!({"language": "shell", "code": "echo hi"});
    let python = json!({"language": "python", "code": "print('hi')"});

    println!("== first run of each runtime: it builds its template");
    let mut cold = Vec::new();
    for (name, body) in [("shell", &shell), ("python", &python)] {
        let (first, end) = timed_run(&addr, &token, body)?;
        let build = end["timings"]["template_build_ms"].as_f64();
        println!(
            "  {name}: template {:.0} ms; first output at the client {:.0} ms",
            build.unwrap_or(f64::NAN),
            first.unwrap_or(f64::NAN)
        );
        cold.push(first.unwrap_or(f64::NAN));
    }

    println!(
        "== pooled clone (the default, one restored ahead per template), a run every {} ms \
         after the last ended: {} runs each",
        POOL_GAP.as_millis(),
        o.runs
    );
    let programs = [("shell", &shell), ("python", &python)];
    let p = latencies(&addr, &token, &programs, o.runs, POOL_GAP)?;
    println!(
        "== pooled clone, back to back (the pool restores while the runs come): {} runs each",
        o.runs
    );
    let b2b = latencies(&addr, &token, &programs, o.runs, Duration::ZERO)?;

    println!("== sustained: Python runs from 4 clients for {} s", o.secs);
    let done = Arc::new(AtomicU64::new(0));
    let stop = Instant::now() + Duration::from_secs(o.secs);
    let t0 = Instant::now();
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (addr, token, body, done) =
                (addr.clone(), token.clone(), python.clone(), done.clone());
            std::thread::spawn(move || {
                while Instant::now() < stop {
                    if let Ok((_, end)) = timed_run(&addr, &token, &body)
                        && end["state"] == "exited"
                    {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for c in clients {
        let _ = c.join();
    }
    let runs_per_s = done.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64();
    println!("  {runs_per_s:.2} runs/s");

    println!("== memory of the clones idle in the pool");
    // The pools refill after the sustained runs; then every QEMU is idle.
    std::thread::sleep(Duration::from_secs(3));
    let (idle, idle_file, idle_n) = clones_mib(&qemus_under(&d.dir));
    println!(
        "  an idle clone adds {idle:.1} MiB (anonymous: written guest RAM, QEMU's heap and \
         translated code) and maps {idle_file:.1} MiB of its template's RAM file \
         ({idle_n} clone(s) seen)"
    );
    drop(d);

    println!(
        "== clone restored for the run (--run-pool 0): {} runs each",
        o.runs
    );
    let (d, addr, token) = daemon(&bin, root, &[("BYTEPORT_RUN_POOL", "0")])?;
    for body in [&shell, &python] {
        timed_run(&addr, &token, body)?;
    }
    let unpooled = latencies(&addr, &token, &programs, o.runs, Duration::ZERO)?;
    // Without a pool the only QEMU is the run's.
    let (addr2, token2) = (addr.clone(), token.clone());
    let sleeper = std::thread::spawn(move || {
        timed_run(
            &addr2,
            &token2,
            &json!({"language": "shell", "code": "echo up; sleep 6"}),
        )
    });
    std::thread::sleep(Duration::from_secs(3));
    let (busy, busy_file, busy_n) = clones_mib(&qemus_under(&d.dir));
    let _ = sleeper.join();
    println!(
        "  a running clone, restored for its run (its shell sleeping), adds {busy:.1} MiB and \
         maps {busy_file:.1} MiB of the template's file ({busy_n} clone(s) seen)"
    );
    drop(d);

    let cold_runs = if o.runs < 30 { 3 } else { 6 };
    println!("== cold boot (--run-templates false): {cold_runs} runs each");
    let (d, addr, token) = daemon(&bin, root, &[("BYTEPORT_RUN_TEMPLATES", "false")])?;
    let cold_boot = latencies(&addr, &token, &programs, cold_runs, Duration::ZERO)?;
    drop(d);

    let clone_p50 = p[0].0.max(p[1].0);
    let clone_p99 = p[0].1.max(p[1].1);
    let cold_p50 = cold_boot[0].0.max(cold_boot[1].0);
    println!(
        "ratios: cold boot / pooled clone p50 {:.0}x, restored clone / pooled clone p50 {:.2}x",
        cold_p50 / clone_p50,
        unpooled[0].0.max(unpooled[1].0) / clone_p50
    );
    println!(
        "RESULT clone_p50_ms={clone_p50:.0} clone_p99_ms={clone_p99:.0} shell_p50_ms={:.0} \
         python_p50_ms={:.0} back_to_back_p50_ms={:.0} unpooled_p50_ms={:.0} cold_p50_ms={cold_p50:.0} \
         template_first_ms={:.0} runs_per_s={runs_per_s:.2} clone_private_mib={idle:.1} running_clone_mib={busy:.1}",
        p[0].0,
        p[1].0,
        b2b[0].0.max(b2b[1].0),
        unpooled[0].0.max(unpooled[1].0),
        Summary::of(&cold).median
    );
    Ok(())
}
