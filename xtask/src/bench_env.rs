//! `cargo xtask bench env`: environments, measured in one run.
//!
//! 1. **Simulated fleet**: an in-process control plane on SQLite (the
//!    testkit's `TestServer`) with 20 simulated nodes that answer exec at
//!    once over their channels, so what is timed is the control plane's
//!    own fan-out. For 100 and 500 VMs: `POST /v1/environments` until
//!    every VM is placed, then `POST .../exec` of `true` from the request
//!    to the `done` line (p50 of the rounds), beside one VM's
//!    `POST /v1/vms/{id}/exec` in the same run.
//! 2. **Real guests**: an all-in-one daemon with the `tiny` image; for 1,
//!    4 and 8 VMs (1 and 4 with `--quick`; 8 is what this 2-core node's
//!    vCPU allowance holds of 1-vCPU guests): `env add` until every VM
//!    runs with its agent ready, then `env exec -- true` to the last
//!    result, p50 of the rounds, beside one VM's exec (the baseline of the
//!    fan-out ratio) in the same environment.
//! 3. **SSH** (when the `debian-12` image is built, which has sshd): an
//!    environment of 2 VMs with a key; the same `env exec -- true` beside
//!    `ssh VM true` to every VM at once (one `ssh` process per VM, as a
//!    parallel SSH loop does), p50 of the rounds.
//! 4. **Boot per engine and architecture**: one `tiny` VM at a time, from
//!    `POST /v1/vms` to `running` (the node says so once the guest agent
//!    is ready), deleted after; each round boots it under `qemu` (`pc`,
//!    the baseline), `microvm` and `libvirt` (a private libvirtd, when
//!    libvirt is installed) on x86_64, and `tiny-aarch64` emulated on
//!    `virt`, one after the other so that load hits them alike. p50 of
//!    the rounds, and each against `qemu`.
//!
//! Prints each figure, the ratios and a `RESULT` line. Options:
//! `--quick`, `--runs N` (default 10; 4 with `--quick`), `--no-build`,
//! `--bin PATH`. See docs/benchmarks.md.

use crate::bench_boot::Summary;
use anyhow::{Context, bail};
use byteport_testkit::daemon::{Daemon, Libvirtd, image_or_skip};
use byteport_testkit::{SimNode, TestServer};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

struct Opts {
    runs: usize,
    quick: bool,
    build: bool,
    bin: Option<PathBuf>,
}

fn parse(args: &[&str]) -> anyhow::Result<Opts> {
    let mut o = Opts {
        runs: 0,
        quick: false,
        build: true,
        bin: None,
    };
    let mut runs = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match *a {
            "--quick" => o.quick = true,
            "--no-build" => o.build = false,
            "--runs" => {
                let v = it.next().context("--runs needs a value")?;
                runs = Some(
                    v.parse::<usize>()
                        .ok()
                        .filter(|n| *n > 0)
                        .with_context(|| format!("--runs: not a positive number: {v}"))?,
                );
            }
            "--bin" => {
                o.bin = Some(PathBuf::from(it.next().context("--bin needs a path")?));
                o.build = false;
            }
            other => bail!(
                "unknown option {other}; usage: cargo xtask bench env [--quick] [--runs N] [--no-build] [--bin PATH]"
            ),
        }
    }
    o.runs = runs.unwrap_or(if o.quick { 4 } else { 10 });
    Ok(o)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The lines of a streamed environment run: how many VMs ended with
/// exit 0, from its `done` line.
fn succeeded(lines: &[Value]) -> anyhow::Result<u64> {
    lines
        .last()
        .and_then(|l| l["done"]["succeeded"].as_u64())
        .with_context(|| format!("no done line: {:?}", lines.last()))
}

pub fn run(root: &Path, args: &[&str]) -> anyhow::Result<()> {
    let o = parse(args)?;
    let mut result = Vec::new();

    // 1. The control plane's fan-out, simulated nodes.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    for n in [100usize, 500] {
        let (create, exec, one) = rt.block_on(simulated(n, o.runs))?;
        println!(
            "simulated, {n} VMs on 20 nodes: create to placed {create:.0} ms; env exec p50 {:.1} ms (min {:.1}, max {:.1}); one VM's exec p50 {:.2} ms; ratio {:.1}",
            exec.median,
            exec.min,
            exec.max,
            one.median,
            exec.median / one.median
        );
        result.push(format!("sim{n}_create_ms={create:.0}"));
        result.push(format!("sim{n}_exec_ms={:.1}", exec.median));
        result.push(format!("sim{n}_exec1_ms={:.2}", one.median));
    }
    drop(rt);

    // 2. Real guests.
    let Some(tiny) = image_or_skip("tiny", "bench env (real guests)") else {
        bail!("the tiny image is needed: cargo xtask image build tiny");
    };
    let bin = crate::release_daemon(root, o.build, o.bin.clone())?;
    println!("daemon: {}", bin.display());
    // libvirtd for part 4, when libvirt is installed.
    let libvirtd = Libvirtd::start("bench env (the libvirt engine)");
    let d = match &libvirtd {
        Some(lv) => Daemon::start_with_env(&bin, &[("BYTEPORT_LIBVIRT_URI", &lv.uri)]),
        None => Daemon::start(&bin),
    };
    d.import_tiny(&tiny);
    d.api
        .put(
            "/v1/projects/default/quota",
            json!({"max_vms": 100, "max_vcpus": 100, "max_memory_mib": 1_000_000u64, "max_disk_gib": 1000}),
        )
        .map_err(anyhow::Error::msg)?;
    let sizes: &[usize] = if o.quick { &[1, 4] } else { &[1, 4, 8] };
    let mut exec1 = f64::NAN;
    let mut fan = Vec::new();
    for &n in sizes {
        let name = format!("b{n}");
        let (ready, exec, one) = real(&d, &name, "tiny", n, o.runs)?;
        println!(
            "real tiny, {n} VMs: env add to ready {ready:.0} ms; env exec p50 {:.1} ms (min {:.1}, max {:.1}); one VM's exec p50 {:.1} ms; ratio {:.2}",
            exec.median,
            exec.min,
            exec.max,
            one.median,
            exec.median / one.median
        );
        result.push(format!("ready_ms_{n}={ready:.0}"));
        result.push(format!("env_exec_ms_{n}={:.1}", exec.median));
        if n == 1 {
            exec1 = one.median;
        }
        fan.push((n, exec.median));
    }
    let (biggest, last) = *fan.last().expect("a size");
    println!(
        "fan-out to {biggest} VMs against one VM's exec: {:.2}x (goal: at most 2x)",
        last / exec1
    );
    result.push(format!("exec1_ms={exec1:.1}"));
    result.push(format!("fanout_vs_exec1={:.2}", last / exec1));

    // 3. Against SSH.
    match image_or_skip("debian-12", "bench env (SSH comparison)") {
        Some(img) => {
            d.import_image(&img);
            let (env_ms, ssh_ms) = against_ssh(&d, o.runs)?;
            println!(
                "2 debian-12 VMs: env exec p50 {env_ms:.1} ms; ssh to each at once p50 {ssh_ms:.1} ms; SSH is {:.1}x slower (goal: at least 5x)",
                ssh_ms / env_ms
            );
            result.push(format!("ssh_ms={ssh_ms:.1}"));
            result.push(format!("ssh_env_ms={env_ms:.1}"));
            result.push(format!("ssh_vs_env={:.1}", ssh_ms / env_ms));
        }
        None => {
            println!("SKIP: SSH comparison: build debian-12 (cargo xtask image build debian-12)")
        }
    }
    // 4. Boot to agent ready, per engine and architecture.
    let mut kinds: Vec<(&str, &str, &str)> =
        vec![("qemu", "tiny", "qemu"), ("microvm", "tiny", "microvm")];
    if libvirtd.is_some() {
        kinds.push(("libvirt", "tiny", "libvirt"));
    } else {
        println!("SKIP: boot under libvirt: libvirt is not installed");
    }
    match image_or_skip("tiny-aarch64", "bench env (aarch64 boot)") {
        Some(img) => {
            d.import_image(&img);
            kinds.push(("aarch64", "tiny-aarch64", "qemu"));
        }
        None => println!("SKIP: aarch64 boot: cargo xtask image build tiny-aarch64"),
    }
    let boots = boot_per_engine(&d, &kinds, if o.quick { 2 } else { 5 })?;
    let base = boots[0].1.median;
    for (label, b) in &boots {
        println!(
            "boot to agent ready, tiny under {label}: p50 {:.0} ms (min {:.0}, max {:.0}); {:.2}x qemu's",
            b.median,
            b.min,
            b.max,
            b.median / base
        );
        result.push(format!("boot_{label}_ms={:.0}", b.median));
    }
    println!("RESULT {}", result.join(" "));
    drop(d);
    drop(libvirtd);
    Ok(())
}

/// `rounds` boots of one VM per `(label, image, engine)`, interleaved:
/// ms from the create to `running`, summarised per kind.
fn boot_per_engine(
    d: &Daemon,
    kinds: &[(&str, &str, &str)],
    rounds: usize,
) -> anyhow::Result<Vec<(String, Summary)>> {
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); kinds.len()];
    // Round 0 warms each image's cache on the node (and microvm's
    // unpacked kernel): not counted.
    for round in 0..=rounds {
        for (k, (label, image, engine)) in kinds.iter().enumerate() {
            let t0 = Instant::now();
            let v = d
                .api
                .post(
                    "/v1/vms",
                    json!({"name": format!("boot-{label}-{round}"), "image": image,
                        "engine": engine, "vcpus": 1, "memory_mib": 256, "disk_gib": 1}),
                )
                .map_err(anyhow::Error::msg)?;
            let id = v["id"].as_str().context("an id")?.to_owned();
            d.wait(&id, "running", 300)
                .map_err(|e| anyhow::anyhow!("{label}: {e}"))?;
            let took = ms(t0.elapsed());
            if round > 0 {
                times[k].push(took);
            }
            d.api
                .delete(&format!("/v1/vms/{id}"))
                .map_err(anyhow::Error::msg)?;
            d.wait(&id, "deleted", 120)
                .map_err(|e| anyhow::anyhow!("{label}: {e}"))?;
        }
    }
    Ok(kinds
        .iter()
        .zip(times)
        .map(|((label, _, _), t)| (label.to_string(), Summary::of(&t)))
        .collect())
}

/// One environment of `n` VMs on simulated nodes: ms from the create to
/// every VM placed, the streamed exec's times and one VM's exec's.
async fn simulated(n: usize, runs: usize) -> anyhow::Result<(f64, Summary, Summary)> {
    use axum::http::{Method, StatusCode};
    let s = TestServer::start(byteport_store::Backend::Sqlite).await;
    let t = s.admin.clone();
    // Ten images: 500 VMs are 50 of each, `dup_each`'s most.
    for r in 0..10 {
        s.agent_image_for(&format!("img-{r}"), "x86_64").await;
    }
    let (st, v) = s
        .call(
            Method::PUT,
            "/v1/projects/default/quota",
            Some(&t),
            Some(json!({"max_vms": 1000, "max_vcpus": 100000, "max_memory_mib": 100_000_000u64, "max_disk_gib": 1_000_000u64})),
        )
        .await;
    anyhow::ensure!(st == StatusCode::OK, "quota: {v}");
    let mut nodes = Vec::new();
    let mut serving = Vec::new();
    for i in 0..20 {
        nodes.push(SimNode::join_running(&s, &format!("n-{i}"), 256, 262144, &[]).await);
    }
    let t0 = Instant::now();
    let (st, e) = s
        .call(
            Method::POST,
            "/v1/environments",
            Some(&t),
            Some(
                json!({"name": "sim", "os_prefixes": ["img-"], "dup_each": n / 10,
                "vcpus": 1, "memory_mib": 256, "disk_gib": 1}),
            ),
        )
        .await;
    anyhow::ensure!(st == StatusCode::ACCEPTED, "create: {e}");
    s.app
        .place_pending()
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let create = ms(t0.elapsed());
    let (_, e) = s
        .call(Method::GET, "/v1/environments/sim", Some(&t), None)
        .await;
    let vms = e["vms"].as_array().context("VMs")?;
    anyhow::ensure!(vms.len() == n, "{} VMs, not {n}", vms.len());
    for node in &nodes {
        let mine: Vec<(&str, &str, u64, u64)> = vms
            .iter()
            .filter(|v| v["node_id"] == node.id.as_str())
            .map(|v| (v["id"].as_str().unwrap_or_default(), "running", 1, 1))
            .collect();
        node.report(&s, &mine).await;
        serving.push(node.serve_exec(&s, |_, _| (String::new(), 0)));
    }
    let one_id = vms[0]["id"].as_str().context("an id")?.to_owned();
    let (mut fan, mut one) = (Vec::new(), Vec::new());
    for _ in 0..runs + 1 {
        let t0 = Instant::now();
        let (st, lines) = s
            .post_lines("/v1/environments/sim/exec", &t, json!({"argv": ["true"]}))
            .await;
        fan.push(ms(t0.elapsed()));
        anyhow::ensure!(st == StatusCode::OK, "exec: {lines:?}");
        anyhow::ensure!(succeeded(&lines)? == n as u64, "not every VM answered");
        let t0 = Instant::now();
        let (st, lines) = s
            .post_lines(
                &format!("/v1/vms/{one_id}/exec"),
                &t,
                json!({"argv": ["true"]}),
            )
            .await;
        one.push(ms(t0.elapsed()));
        anyhow::ensure!(st == StatusCode::OK, "exec: {lines:?}");
    }
    for h in serving {
        h.abort();
    }
    // The first round warms caches; it is not counted.
    Ok((create, Summary::of(&fan[1..]), Summary::of(&one[1..])))
}

/// An environment `name` of `n` VMs of `image` on the real daemon: ms
/// from `env add` to ready, the streamed exec's times and one VM's.
/// Deleted at the end.
fn real(
    d: &Daemon,
    name: &str,
    image: &str,
    n: usize,
    runs: usize,
) -> anyhow::Result<(f64, Summary, Summary)> {
    let t0 = Instant::now();
    let e = d
        .api
        .post(
            "/v1/environments",
            json!({"name": name, "os_prefixes": [image], "dup_each": n, "vcpus": 1,
                "memory_mib": 256, "disk_gib": 2}),
        )
        .map_err(anyhow::Error::msg)?;
    let id = e["id"].as_str().context("an id")?.to_owned();
    d.wait_env(&id, "ready", &["degraded"], 600);
    let ready = ms(t0.elapsed());
    let e = d
        .api
        .get(&format!("/v1/environments/{id}"))
        .map_err(anyhow::Error::msg)?;
    let one_id = e["vms"][0]["id"].as_str().context("a VM")?.to_owned();
    let (mut fan, mut one) = (Vec::new(), Vec::new());
    for _ in 0..runs + 1 {
        fan.push(timed_env_true(d, &id, n)?);
        let t0 = Instant::now();
        d.exec(&one_id, &["true"]).map_err(anyhow::Error::msg)?;
        one.push(ms(t0.elapsed()));
    }
    delete_env(d, &id)?;
    Ok((ready, Summary::of(&fan[1..]), Summary::of(&one[1..])))
}

/// ms of one streamed `env exec -- true` on environment `id` to its
/// `done` line, which must count `n` VMs that exited 0.
fn timed_env_true(d: &Daemon, id: &str, n: usize) -> anyhow::Result<f64> {
    let t0 = Instant::now();
    let lines = d
        .api
        .post_lines(
            &format!("/v1/environments/{id}/exec"),
            json!({"argv": ["true"]}),
        )
        .map_err(anyhow::Error::msg)?;
    let took = ms(t0.elapsed());
    anyhow::ensure!(
        succeeded(&lines)? == n as u64,
        "not every VM answered: {lines:?}"
    );
    Ok(took)
}

/// Deletes environment `id` and waits until it is gone.
fn delete_env(d: &Daemon, id: &str) -> anyhow::Result<()> {
    d.api
        .delete(&format!("/v1/environments/{id}"))
        .map_err(anyhow::Error::msg)?;
    d.wait_env(id, "deleted", &[], 120);
    Ok(())
}

/// Two debian-12 VMs with a fresh key: p50 ms of `env exec -- true`, and
/// of `ssh VM true` to both at once.
fn against_ssh(d: &Daemon, runs: usize) -> anyhow::Result<(f64, f64)> {
    let key = d.dir.join("bench-key");
    let _ = std::fs::remove_file(&key);
    let ok = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .status()?
        .success();
    anyhow::ensure!(ok, "ssh-keygen failed");
    let public = std::fs::read_to_string(key.with_extension("pub"))?;
    let e = d
        .api
        .post(
            "/v1/environments",
            json!({"name": "ssh", "os_prefixes": ["debian-12"], "dup_each": 2, "vcpus": 1,
                "memory_mib": 1024, "disk_gib": 4, "ssh_keys": [public.trim()]}),
        )
        .map_err(anyhow::Error::msg)?;
    let id = e["id"].as_str().context("an id")?.to_owned();
    let e = d.wait_env(&id, "ready", &["degraded"], 900);
    let targets: Vec<(String, u64)> = e["vms"]
        .as_array()
        .context("VMs")?
        .iter()
        .map(|v| {
            let port = v["ports"]
                .as_array()
                .and_then(|p| p.iter().find(|p| p["guest_port"] == 22))
                .and_then(|p| p["host_port"].as_u64())
                .unwrap_or(0);
            (v["ssh_user"].as_str().unwrap_or("debian").to_owned(), port)
        })
        .collect();
    let ssh = |user: &str, port: u64| {
        Command::new("ssh")
            .args([
                "-q",
                "-o",
                "BatchMode=yes",
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "ConnectTimeout=10",
                "-i",
            ])
            .arg(&key)
            .args([
                "-p",
                &port.to_string(),
                &format!("{user}@127.0.0.1"),
                "true",
            ])
            .spawn()
    };
    // sshd may come up after the agent: wait until each VM answers.
    let deadline = Instant::now() + Duration::from_secs(300);
    for (user, port) in &targets {
        while !ssh(user, *port)?.wait()?.success() {
            anyhow::ensure!(Instant::now() < deadline, "no SSH on port {port}");
            std::thread::sleep(Duration::from_secs(2));
        }
    }
    let (mut env, mut over_ssh) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        env.push(timed_env_true(d, &id, 2)?);
        let t0 = Instant::now();
        let children: Vec<_> = targets
            .iter()
            .map(|(u, p)| ssh(u, *p))
            .collect::<Result<_, _>>()?;
        for mut c in children {
            anyhow::ensure!(c.wait()?.success(), "ssh failed");
        }
        over_ssh.push(ms(t0.elapsed()));
    }
    delete_env(d, &id)?;
    Ok((Summary::of(&env).median, Summary::of(&over_ssh).median))
}
