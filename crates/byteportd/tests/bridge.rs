//! Bridged networking with real `tiny` guests, checked from inside them
//! through their agent: the daemon runs as root inside a network namespace
//! of the test's own (`ip netns`), whose one veth leads to the host, which
//! stands in for "the outside". A guest gets an address in its project's
//! range and reaches the outside; it cannot open the node's API port on
//! any of the node's addresses; two VMs of one project reach each other
//! and a VM of another project reaches neither; a port map reaches a
//! listener in the guest; `egress: deny` cuts outbound traffic; the
//! metadata service answers at 169.254.169.254. Then the node is killed
//! with -9 and started again: the nftables table is the same and the port
//! map still works; deleting the VMs leaves no tap, bridge, map element or
//! cgroup. Skips, saying why, without root, `nft`, `dnsmasq` or the image,
//! unless `BYTEPORT_REQUIRE_QEMU=1` (set by `cargo xtask test`).

use byteport_testkit::daemon::{Daemon, tiny_or_skip};
use serde_json::json;
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_byteportd");
const BOOT_SECS: u64 = 180;

fn sh(d: &Daemon, id: &str, script: &str) -> (String, Option<i32>) {
    let (out, err, code) = d.exec(id, &["sh", "-c", script]).expect("exec");
    (format!("{out}{err}"), code)
}

fn connects(d: &Daemon, id: &str, addr: &str, port: u16) -> bool {
    sh(
        d,
        id,
        &format!("nc -w 3 {addr} {port} </dev/null >/dev/null 2>&1"),
    )
    .1 == Some(0)
}

/// Starts a one-shot listener on `port` in the guest that greets with `word`.
fn listen(d: &Daemon, id: &str, port: u16, word: &str) {
    let (_, code) = sh(
        d,
        id,
        &format!("(echo {word} | nc -l -p {port} >/dev/null 2>&1 &) ; sleep 1"),
    );
    assert_eq!(code, Some(0));
}

fn lease(d: &Daemon, id: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (out, _) = sh(d, id, "ip -4 -o addr show dev eth0");
        if let Some(a) = out.split_whitespace().skip_while(|w| *w != "inet").nth(1) {
            return a.split('/').next().unwrap_or_default().to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no DHCP lease for {id}: {out}; dnsmasq: {}",
            d.netns.as_ref().unwrap().run(&["sh", "-c", &format!("ps -ef | grep dnsmas[q]; cat {}/node/net/dhcp-hosts-*; ip -o link; ip -4 -o addr", d.dir.display())])
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn create(d: &Daemon, name: &str, project: &str, egress: &str) -> String {
    let v = d
        .api
        .post(
            "/v1/vms",
            json!({"name": name, "project": project, "image": "tiny", "vcpus": 1,
                   "memory_mib": 256, "disk_gib": 1, "egress": egress, "ports": [8080]}),
        )
        .expect("creating a VM");
    v["id"].as_str().unwrap().to_owned()
}

fn read_greeting(addr: &str, port: u16) -> String {
    let mut s = std::net::TcpStream::connect((addr, port)).expect("the port map answers");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let _ = s.write_all(b"hi\n");
    let mut got = String::new();
    let _ = s.read_to_string(&mut got);
    got
}

fn table(d: &Daemon) -> String {
    d.netns
        .as_ref()
        .unwrap()
        .run(&["nft", "list", "table", "inet", "byteport"])
}

#[test]
fn bridged_guests_are_isolated_per_project_and_keep_their_rules_across_a_node_crash() {
    let Some(img) = tiny_or_skip("bridged networking") else {
        return;
    };
    if let Some(why) = byteport_node::bridge::unavailable() {
        assert!(
            std::env::var("BYTEPORT_REQUIRE_QEMU").as_deref() != Ok("1"),
            "bridged networking: {why}, and BYTEPORT_REQUIRE_QEMU=1"
        );
        eprintln!("SKIP bridged networking: {why}; run `cargo xtask test` as root for real");
        return;
    }
    let mut d = Daemon::start_bridged(Path::new(BIN)).expect("a network namespace");
    d.import_tiny(&img);
    d.api
        .post("/v1/projects", json!({"name": "other"}))
        .expect("a second project");
    let cidr = |p: &str| -> String {
        d.api.get(&format!("/v1/projects/{p}")).unwrap()["network_cidr"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let (mine, theirs) = (cidr("default"), cidr("other"));
    assert_ne!(mine, theirs, "each project has its own range");

    let a1 = create(&d, "br-a1", "default", "allow");
    let a2 = create(&d, "br-a2", "default", "deny");
    let b1 = create(&d, "br-b1", "other", "allow");
    for id in [&a1, &a2, &b1] {
        d.wait(id, "running", BOOT_SECS).expect("running");
    }
    let (ip1, ip2, ipb) = (lease(&d, &a1), lease(&d, &a2), lease(&d, &b1));
    let prefix = |c: &str| c.trim_end_matches("0/24").to_owned();
    assert!(
        ip1.starts_with(&prefix(&mine)) && ip2.starts_with(&prefix(&mine)),
        "{ip1} {ip2} in {mine}"
    );
    assert!(ipb.starts_with(&prefix(&theirs)), "{ipb} in {theirs}");
    let v1 = d.vm(&a1);
    assert_eq!(v1["network"]["mode"], "bridge", "{v1}");
    assert_eq!(v1["network"]["addresses"][0], ip1.as_str(), "{v1}");
    assert_eq!(v1["egress"], "allow");
    assert_eq!(d.vm(&a2)["egress"], "deny");
    let maps: Vec<u64> = v1["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["guest_port"].as_u64().unwrap())
        .collect();
    assert_eq!(maps, [22, 8080], "{v1}");

    // The outside: a listener on the host, beyond the namespace's veth.
    let ns_addr = d.netns.as_ref().unwrap().ns_addr.clone();
    let host_addr = d.netns.as_ref().unwrap().host_addr.clone();
    let outside = std::net::TcpListener::bind((host_addr.as_str(), 0)).unwrap();
    let outside_port = outside.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in outside.incoming() {
            drop(c);
        }
    });
    assert!(
        connects(&d, &a1, &host_addr, outside_port),
        "egress allowed"
    );
    assert!(
        !connects(&d, &a2, &host_addr, outside_port),
        "egress denied"
    );

    // The node itself: its API on every address it has here.
    let gateway = mine.replace("0/24", "1");
    for addr in [gateway.as_str(), ns_addr.as_str(), "127.0.0.1"] {
        assert!(
            !connects(&d, &a1, addr, d.port),
            "the guest reached the API at {addr}"
        );
    }
    // Its own metadata, at the usual address.
    let (serial, _) = sh(&d, &a1, "cat /sys/class/dmi/id/product_serial");
    let url = serial
        .trim()
        .split_once(";s=")
        .map(|(_, u)| u.to_owned())
        .unwrap();
    assert!(url.starts_with("http://169.254.169.254/"), "{url}");
    let path = url.trim_start_matches("http://169.254.169.254");
    let (meta, _) = sh(
        &d,
        &a1,
        // The pause keeps nc from half-closing before the answer (the
        // relay's HTTP server drops a half-closed request; HTTP clients
        // such as cloud-init's never half-close).
        &format!(
            "(printf 'GET {path}meta-data HTTP/1.0\\r\\n\\r\\n'; sleep 3) | nc -w 10 169.254.169.254 80"
        ),
    );
    assert!(
        meta.starts_with("HTTP/1.0 200") && meta.contains(&a1),
        "metadata: {meta:?}\nguest routes: {:?}\ntable:\n{}\nsysctl: {}",
        sh(&d, &a1, "ip route; ip addr").0,
        table(&d),
        d.netns.as_ref().unwrap().run(&[
            "sh",
            "-c",
            "grep . /proc/sys/net/ipv4/conf/*/route_localnet; ss -ltnp"
        ])
    );

    // Another project's VM never reaches a1; its own project's does.
    listen(&d, &a1, 5555, "same-project");
    assert!(
        !connects(&d, &b1, &ip1, 5555),
        "another project reached the VM"
    );
    let (got, _) = sh(&d, &a2, &format!("nc -w 5 {ip1} 5555 </dev/null"));
    assert!(got.contains("same-project"), "{got}");
    listen(&d, &b1, 5556, "x");
    assert!(
        !connects(&d, &a1, &ipb, 5556),
        "the VM reached another project"
    );

    // A port map from the node's address reaches a listener in the guest,
    // but never from another project's guest.
    let host_port = v1["ports"][0]["host_port"].as_u64().unwrap() as u16;
    listen(&d, &a1, 22, "through-the-map");
    for addr in [ns_addr.as_str(), gateway.as_str()] {
        assert!(
            !connects(&d, &b1, addr, host_port),
            "another project's VM reached a1's SSH map at {addr}"
        );
    }
    assert!(read_greeting(&ns_addr, host_port).contains("through-the-map"));

    // kill -9 the node (all in one) and start it again.
    let before = table(&d);
    assert!(
        before.contains(&format!("{host_port} : {ip1} . 22")),
        "{before}"
    );
    d.kill9();
    d.spawn();
    let deadline = Instant::now() + Duration::from_secs(30);
    while d.vm(&a1)["state"] != "running" || table(&d) != before {
        assert!(
            Instant::now() < deadline,
            "the table after the restart:\n{}\nbefore:\n{before}",
            table(&d)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    while d.exec(&a1, &["true"]).is_err() {
        assert!(Instant::now() < deadline, "the node did not come back");
        std::thread::sleep(Duration::from_millis(300));
    }
    listen(&d, &a1, 22, "after-the-crash");
    assert!(read_greeting(&ns_addr, host_port).contains("after-the-crash"));

    let nodes = d.api.get("/v1/nodes").unwrap();
    let nets = &nodes[0]["networks"];
    let n = nets
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["cidr"] == mine.as_str())
        .unwrap_or_else(|| panic!("no network {mine}: {nodes}"));
    assert_eq!(n["vms"], 2, "{n}");

    // Deleting every VM leaves nothing of them behind.
    for id in [&a1, &a2, &b1] {
        d.api.delete(&format!("/v1/vms/{id}")).expect("delete");
    }
    for id in [&a1, &a2, &b1] {
        d.wait(id, "deleted", 60).expect("deleted");
    }
    let links = d.netns.as_ref().unwrap().run(&["ip", "-o", "link"]);
    let left: Vec<&str> = links
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .filter(|n| n.starts_with("bpt") || n.starts_with("bpn"))
        .collect();
    assert!(left.is_empty(), "links left: {left:?}");
    let after = table(&d);
    assert!(!after.contains("elements"), "{after}");
}
