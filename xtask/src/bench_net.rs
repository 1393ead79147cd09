//! `cargo xtask bench net`: the bridged network beside QEMU's user-mode
//! network, in one run on this machine. Needs root (it works inside
//! network namespaces of its own and leaves nothing behind).
//!
//! 1. **Port maps**: the time to add one port map to the node's nftables
//!    table holding 1 and 1,000 maps, two ways: the node's own way (the
//!    whole table written in one `nft -f` transaction from the attachments,
//!    which is what makes a restart idempotent) and one `nft add element`
//!    into the map (what a map makes flat). Medians of `--runs` (20).
//! 2. **Boot**: POST to `running` (the guest agent said ready) of a `tiny`
//!    VM on a bridged all-in-one and on a user-mode one, alternating, over
//!    `--boots` (3) rounds each.
//! 3. **Throughput and latency through a port map**: bytes sent from the
//!    host into a listener in the guest (`nc -l`) through its port 22 map,
//!    in both modes (the only path both modes have: a user-mode guest
//!    reaches nothing outside), and the time to open a connection through
//!    the map; on the bridge also guest to guest and guest to the outside
//!    (a listener beyond the namespace's veth), timed in the guest.
//!
//! Prints each figure, the ratios bridge/user, and a `RESULT` line.
//! Options: `--quick` (5 runs, 1 boot, 8 MiB), `--no-build`.

use crate::bench_boot::Summary;
use anyhow::{Context, bail};
use byteport_node::bridge::{Attachment, render};
use byteport_testkit::daemon::{Daemon, NetNs};
use byteport_types::api::{Egress, PortForward};
use byteport_types::{ProjectId, VmId};
use serde_json::json;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Opts {
    runs: usize,
    boots: usize,
    mib: u64,
    build: bool,
}

fn parse(args: &[&str]) -> anyhow::Result<Opts> {
    let mut o = Opts {
        runs: 20,
        boots: 3,
        mib: 32,
        build: true,
    };
    for a in args {
        match *a {
            "--quick" => {
                o.runs = 5;
                o.boots = 1;
                o.mib = 8;
            }
            "--no-build" => o.build = false,
            other => bail!("unknown option {other}; try --quick, --no-build"),
        }
    }
    Ok(o)
}

fn attachments(n: usize) -> Vec<Attachment> {
    (0..n)
        .map(|i| {
            let vm = VmId(uuid::Uuid::from_u128(i as u128 + 1));
            // Spread over as many /24s as needed, 240 guests each.
            let (net, host) = (i / 240, 10 + i % 240);
            Attachment {
                vm,
                project: ProjectId(uuid::Uuid::from_u128(net as u128 + 1)),
                cidr: format!("10.80.{net}.0/24"),
                address: Ipv4Addr::new(10, 80, net as u8, host as u8),
                mac: "52:54:00:00:00:01".into(),
                tap: byteport_node::bridge::tap_name(vm),
                ports: vec![PortForward {
                    guest_port: 22,
                    host_port: 20000 + i as u16,
                    host: "127.0.0.1".into(),
                }],
                egress: Egress::Allow,
            }
        })
        .collect()
}

fn nft_in(ns: &NetNs, script: &str) -> anyhow::Result<()> {
    let mut c = Command::new("ip")
        .args(["netns", "exec", &ns.name, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    c.stdin
        .take()
        .context("stdin")?
        .write_all(script.as_bytes())?;
    let out = c.wait_with_output()?;
    if !out.status.success() {
        bail!("nft: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// (whole table, one element) in ms, median over `runs`, on a table of `n`.
fn port_map_cost(ns: &NetNs, n: usize, runs: usize) -> anyhow::Result<(Summary, Summary)> {
    let lo = Some(Ipv4Addr::LOCALHOST);
    let base = attachments(n);
    let with_one = attachments(n + 1);
    let (mut whole, mut one) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let reset = format!(
            "table inet byteport {{}}\ndelete table inet byteport\n{}",
            render(&base, 4000, lo)
        );
        nft_in(ns, &reset)?;
        let t = Instant::now();
        let script = format!(
            "table inet byteport {{}}\ndelete table inet byteport\n{}",
            render(&with_one, 4000, lo)
        );
        nft_in(ns, &script)?;
        whole.push(t.elapsed().as_secs_f64() * 1000.0);
        nft_in(ns, &reset)?;
        let t = Instant::now();
        nft_in(
            ns,
            &format!(
                "add element inet byteport portmap {{ {} : 10.95.0.10 . 22 }}\n",
                30000 + n
            ),
        )?;
        one.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    Ok((Summary::of(&whole), Summary::of(&one)))
}

fn sh(d: &Daemon, id: &str, script: &str) -> anyhow::Result<String> {
    let (out, err, _) = d
        .exec_with(
            id,
            json!({"argv": ["sh", "-c", script], "timeout_secs": 300}),
        )
        .map_err(anyhow::Error::msg)?;
    Ok(format!("{out}{err}"))
}

fn boot(d: &Daemon, name: &str) -> anyhow::Result<(String, f64)> {
    let t = Instant::now();
    let id = d.create_vm(name);
    d.wait(&id, "running", 300).map_err(anyhow::Error::msg)?;
    Ok((id, t.elapsed().as_secs_f64() * 1000.0))
}

/// MiB/s from the host into the guest's `nc -l -p 22` through its map,
/// and the connect time through the map (ms).
fn inbound(d: &Daemon, id: &str, addr: &str, mib: u64) -> anyhow::Result<(f64, f64)> {
    let v = d.vm(id);
    let port = v["ports"][0]["host_port"].as_u64().context("a port map")? as u16;
    // Connect time: the guest needs no listener for the map to answer on
    // the bridge (DNAT), but user-mode QEMU accepts itself; so time a
    // connection to a listener in both.
    sh(d, id, "(nc -l -p 22 >/dev/null 2>&1 &); sleep 1")?;
    let t = Instant::now();
    let s = TcpStream::connect((addr, port))?;
    let connect_ms = t.elapsed().as_secs_f64() * 1000.0;
    drop(s);
    std::thread::sleep(Duration::from_millis(500));
    sh(d, id, "(nc -l -p 22 >/dev/null 2>&1 &); sleep 1")?;
    let mut s = TcpStream::connect((addr, port))?;
    let buf = vec![0u8; 64 * 1024];
    let total = mib * 1024 * 1024;
    let t = Instant::now();
    let mut sent = 0u64;
    while sent < total {
        s.write_all(&buf)?;
        sent += buf.len() as u64;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    let secs = t.elapsed().as_secs_f64();
    Ok((mib as f64 / secs, connect_ms))
}

/// MiB/s of `dd | nc` from the guest to `addr:port`, timed in the guest
/// (its uptime before and after: busybox's date has no nanoseconds).
fn outbound(d: &Daemon, id: &str, addr: &str, port: u16, mib: u64) -> anyhow::Result<f64> {
    let out = sh(
        d,
        id,
        &format!(
            "a=$(cut -d' ' -f1 /proc/uptime); dd if=/dev/zero bs=65536 count={} 2>/dev/null | nc -w 5 {addr} {port}; b=$(cut -d' ' -f1 /proc/uptime); echo \"$a $b\"",
            mib * 16
        ),
    )?;
    let nums: Vec<f64> = out
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    let [.., a, b] = nums[..] else {
        bail!("the guest's timing: {out}");
    };
    if out.contains("can't connect") {
        bail!("the guest could not connect: {out}");
    }
    Ok(mib as f64 / (b - a).max(0.01))
}

fn sink() -> anyhow::Result<(TcpListener, u16)> {
    let l = TcpListener::bind("0.0.0.0:0")?;
    let p = l.local_addr()?.port();
    Ok((l, p))
}

fn drain(l: TcpListener) {
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut c = c;
                let mut b = [0u8; 65536];
                while matches!(c.read(&mut b), Ok(n) if n > 0) {}
            });
        }
    });
}

pub fn run(root: &Path, args: &[&str]) -> anyhow::Result<()> {
    let o = parse(args)?;
    if byteport_node::bridge::unavailable().is_some() {
        bail!(
            "bench net needs root with ip, nft and dnsmasq: {}",
            byteport_node::bridge::unavailable().unwrap_or_default()
        );
    }
    let bin = crate::release_daemon(root, o.build, None)?;
    let img = root.join("build/images/tiny");
    if !img.join("manifest.json").exists() {
        crate::image::run(root, &["build", "tiny"])?;
    }

    println!("== port maps: add one to a table of N");
    let ns = NetNs::new().context("a network namespace")?;
    let mut maps = Vec::new();
    for n in [1usize, 1000] {
        let (whole, one) = port_map_cost(&ns, n, o.runs)?;
        println!(
            "  N={n:>4}: whole table {:.1} ms (min {:.1}, max {:.1}); add element {:.1} ms (min {:.1}, max {:.1})",
            whole.median, whole.min, whole.max, one.median, one.min, one.max
        );
        maps.push((whole.median, one.median));
    }
    drop(ns);
    println!(
        "  ratio 1000/1: whole table {:.2}x, add element {:.2}x",
        maps[1].0 / maps[0].0,
        maps[1].1 / maps[0].1
    );

    println!("== boot: POST to running, bridge beside user-mode");
    let bridged = Daemon::start_bridged(&bin).context("a bridged daemon")?;
    let user = Daemon::start(&bin);
    bridged.import_tiny(&img);
    user.import_tiny(&img);
    // Warm-up: the image lands in each node's cache.
    let (wb, _) = boot(&bridged, "warm-b")?;
    let (wu, _) = boot(&user, "warm-u")?;
    let (mut tb, mut tu) = (Vec::new(), Vec::new());
    for i in 0..o.boots {
        let order: [(&Daemon, &mut Vec<f64>, &str); 2] = if i % 2 == 0 {
            [(&bridged, &mut tb, "b"), (&user, &mut tu, "u")]
        } else {
            [(&user, &mut tu, "u"), (&bridged, &mut tb, "b")]
        };
        for (d, v, tag) in order {
            let (id, ms) = boot(d, &format!("boot-{tag}{i}"))?;
            v.push(ms);
            d.api
                .delete(&format!("/v1/vms/{id}"))
                .map_err(anyhow::Error::msg)?;
            d.wait(&id, "deleted", 60).map_err(anyhow::Error::msg)?;
        }
    }
    let (sb, su) = (Summary::of(&tb), Summary::of(&tu));
    println!(
        "  bridge {:.0} ms (min {:.0}, max {:.0}); user {:.0} ms (min {:.0}, max {:.0}); ratio {:.2}",
        sb.median,
        sb.min,
        sb.max,
        su.median,
        su.min,
        su.max,
        sb.median / su.median
    );

    println!("== through the port map (host to guest), {} MiB", o.mib);
    let ns_addr = bridged.netns.as_ref().context("netns")?.ns_addr.clone();
    let (bin_mibs, bconn) = inbound(&bridged, &wb, &ns_addr, o.mib)?;
    let (uin_mibs, uconn) = inbound(&user, &wu, "127.0.0.1", o.mib)?;
    println!(
        "  bridge {bin_mibs:.1} MiB/s, connect {bconn:.2} ms; user {uin_mibs:.1} MiB/s, connect {uconn:.2} ms; ratio {:.2}",
        bin_mibs / uin_mibs
    );

    println!("== on the bridge: guest to guest, guest to the outside");
    let (peer, _) = boot(&bridged, "peer")?;
    let peer_ip = bridged.vm(&peer)["network"]["addresses"][0]
        .as_str()
        .context("the peer's address")?
        .to_owned();
    sh(
        &bridged,
        &peer,
        "(nc -l -p 5001 >/dev/null 2>&1 &); sleep 1",
    )?;
    let report = |what: &str, r: anyhow::Result<f64>| match r {
        Ok(v) => v,
        Err(e) => {
            println!("  {what}: not measured: {e}");
            f64::NAN
        }
    };
    let g2g = report(
        "guest to guest",
        outbound(&bridged, &wb, &peer_ip, 5001, o.mib),
    );
    let host_addr = bridged.netns.as_ref().context("netns")?.host_addr.clone();
    let (l, port) = sink()?;
    drain(l);
    let g2o = report(
        "guest to the outside",
        outbound(&bridged, &wb, &host_addr, port, o.mib),
    );
    println!("  guest to guest {g2g:.1} MiB/s; guest to the outside {g2o:.1} MiB/s");
    let _ = (wb, wu);

    println!(
        "RESULT map_whole_1_ms={:.1} map_whole_1000_ms={:.1} map_add_1_ms={:.1} map_add_1000_ms={:.1} \
         boot_bridge_ms={:.0} boot_user_ms={:.0} boot_ratio={:.2} in_bridge_mibs={bin_mibs:.1} \
         in_user_mibs={uin_mibs:.1} connect_bridge_ms={bconn:.2} connect_user_ms={uconn:.2} \
         g2g_mibs={g2g:.1} g2o_mibs={g2o:.1}",
        maps[0].0,
        maps[1].0,
        maps[0].1,
        maps[1].1,
        sb.median,
        su.median,
        sb.median / su.median
    );
    Ok(())
}
