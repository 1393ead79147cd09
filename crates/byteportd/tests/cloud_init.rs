//! An unmodified cloud-init (Debian bookworm's, inside the `debian-12`
//! image) configures a BytePort VM from the metadata service, through the
//! node's relay; then a user logs in over SSH with the key they gave.
//! Slow under TCG (a couple of minutes); it skips, saying why, when QEMU or
//! the image is missing, unless `BYTEPORT_REQUIRE_QEMU=1` (set by
//! `cargo xtask test`, which builds the image first).

use byteport_testkit::daemon::{Daemon, image_or_skip, sha256_hex};
use serde_json::{Value, json};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_byteportd");
/// Booting Debian with systemd and cloud-init under TCG on a busy host.
const BOOT_SECS: u64 = 420;

fn ssh_keygen(dir: &Path) -> (std::path::PathBuf, String) {
    let key = dir.join("id_ed25519");
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "byteport-test", "-f"])
        .arg(&key)
        .status()
        .expect("ssh-keygen (Debian's openssh-client) must be installed");
    assert!(st.success(), "ssh-keygen failed");
    let public = std::fs::read_to_string(key.with_extension("pub")).expect("public key");
    (key, public.trim().to_owned())
}

#[test]
fn cloud_init_configures_a_debian_vm_from_the_metadata_service_and_ssh_works() {
    let Some(img) = image_or_skip("debian-12", "cloud-init") else {
        return;
    };
    let d = Daemon::start(Path::new(BIN));
    // User-mode: the metadata at 10.0.2.254, SSH through the forward on
    // the host's loopback.
    configures_and_ssh_works(&d, &img, "10.0.2.254", "127.0.0.1");
}

#[test]
fn on_a_bridge_cloud_init_reads_169_254_169_254_and_ssh_goes_through_the_port_map() {
    let Some(img) = image_or_skip("debian-12", "cloud-init on a bridge") else {
        return;
    };
    let bridged = std::fs::read_to_string("/proc/self/status")
        .is_ok_and(|s| s.lines().any(|l| l.starts_with("Uid:\t0\t")));
    if !bridged {
        assert!(
            std::env::var("BYTEPORT_REQUIRE_QEMU").as_deref() != Ok("1"),
            "cloud-init on a bridge needs root, and BYTEPORT_REQUIRE_QEMU=1"
        );
        eprintln!(
            "SKIP cloud-init on a bridge: needs root (network namespaces); run `cargo xtask test` as root"
        );
        return;
    }
    let d = Daemon::start_bridged(Path::new(BIN)).expect("a network namespace");
    let addr = d.netns.as_ref().expect("netns").ns_addr.clone();
    configures_and_ssh_works(&d, &img, "169.254.169.254", &addr);
}

/// Boots debian-12 with user-data and a key; checks what cloud-init did,
/// that its data came from `metadata_addr`, and SSH to `ssh_host`.
fn configures_and_ssh_works(d: &Daemon, img: &Path, metadata_addr: &str, ssh_host: &str) {
    d.import_image(img);
    let tmp = tempfile::tempdir().expect("tempdir");
    let (key, public) = ssh_keygen(tmp.path());
    let secret = format!("secret-{}", std::process::id() * 7919);
    let user_data = format!(
        "#cloud-config\n\
         write_files:\n  - path: /var/lib/byteport-test/secret\n    content: \"{secret}\"\n    permissions: '0600'\n\
         runcmd:\n  - [sh, -c, 'echo ran-$((6*7)) > /var/lib/byteport-test/runcmd']\n"
    );
    let v = d
        .api
        .post(
            "/v1/vms",
            json!({"name": "deb", "image": "debian-12", "vcpus": 1, "memory_mib": 1024,
                "disk_gib": 4, "hostname": "cloud-guest", "ssh_keys": [public],
                "user_data": user_data}),
        )
        .expect("creating the VM");
    let id = v["id"].as_str().expect("id").to_owned();

    let v = d
        .wait(&id, "running", BOOT_SECS)
        .expect("the VM reaches running");
    assert_eq!(v["ready_by"], "agent", "{v}");
    // The data source (with the VM's metadata token) is in an owner-only
    // file QEMU reads, not in its command line, which every user can see.
    let pid = d.qemu_pid(&id).expect("QEMU's pid");
    let args = std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
    let args = String::from_utf8_lossy(&args);
    assert!(!args.contains("nocloud"), "{args}");
    let table = d.vm_dir(&id).join("smbios.bin");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&table).unwrap().permissions());
    assert_eq!(mode & 0o077, 0, "{mode:o}");
    let serial = d
        .exec(&id, &["cat", "/sys/class/dmi/id/product_serial"])
        .unwrap()
        .0;
    assert!(serial.starts_with("ds=nocloud-net;s=http://"), "{serial}");
    let v = d.wait_cloud_init(&id, BOOT_SECS);
    if v["cloud_init"] != "done" {
        // What cloud-init itself says went wrong.
        let said = |argv: &[&str]| {
            d.exec(&id, argv)
                .map(|(o, e, _)| o + &e)
                .unwrap_or_default()
        };
        panic!(
            "cloud-init ended {}: {v}\n{}\n{}\n{}",
            v["cloud_init"],
            said(&["cloud-init", "status", "--long"]),
            said(&["cat", "/run/cloud-init/result.json"]),
            said(&[
                "grep",
                "-E",
                "WARNING|ERROR|Traceback",
                "/var/log/cloud-init.log"
            ]),
        );
    }

    // What the user asked for is there, read through the guest agent.
    let run = |argv: &[&str]| {
        let (out, err, code) = d.exec(&id, argv).expect("exec");
        assert_eq!(code, Some(0), "{argv:?}: {out} {err}");
        out.trim().to_owned()
    };
    assert_eq!(run(&["hostname"]), "cloud-guest");
    assert_eq!(run(&["cat", "/var/lib/byteport-test/secret"]), secret);
    assert_eq!(run(&["cat", "/var/lib/byteport-test/runcmd"]), "ran-42");
    let keys = run(&["cat", "/home/debian/.ssh/authorized_keys"]);
    assert!(keys.contains(&public), "{keys}");
    // cloud-init's own verdict: every stage done, no errors, and the data
    // came from our NoCloud URL on the node's relay.
    let status = run(&["cloud-init", "status", "--long"]);
    assert!(status.contains("status: done"), "{status}");
    let result: Value =
        serde_json::from_str(&run(&["cat", "/run/cloud-init/result.json"])).expect("result.json");
    assert_eq!(result["v1"]["errors"], json!([]), "{result}");
    let source = result["v1"]["datasource"].as_str().unwrap_or_default();
    assert!(
        source.contains("NoCloud") && source.contains(metadata_addr),
        "{result}"
    );

    // The metadata service saw the guest's requests, audited on the VM.
    let audit = d.api.get("/v1/audit?limit=500").expect("audit");
    let served: Vec<&str> = audit["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter(|e| e["target_id"] == id.as_str() && e["status"] == 200)
        .filter_map(|e| e["action"].as_str())
        .collect();
    for doc in ["metadata_meta_data", "metadata_user_data"] {
        assert!(served.contains(&doc), "{doc} not served: {served:?}");
    }

    // SSH through the VM's forwarded port with the injected key, as the
    // CLI's `ssh -p PORT debian@HOST` line says.
    assert_eq!(v["ssh_user"], "debian", "the image's login user: {v}");
    let port = v["ports"][0]["host_port"]
        .as_u64()
        .expect("a forwarded port");
    assert_eq!(v["ports"][0]["guest_port"], 22);
    let out = Command::new("ssh")
        .arg("-i")
        .arg(&key)
        .args([
            "-p",
            &port.to_string(),
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "ConnectTimeout=30",
            &format!("{}@{ssh_host}", v["ssh_user"].as_str().unwrap_or("debian")),
            "hostname; sudo -n cat /var/lib/byteport-test/secret",
        ])
        .output()
        .expect("ssh (Debian's openssh-client) must be installed");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "ssh failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        text
    );
    assert_eq!(
        text.lines().collect::<Vec<_>>(),
        ["cloud-guest", secret.as_str()]
    );

    d.api
        .delete(&format!("/v1/vms/{id}"))
        .expect("deleting the VM");
    d.wait(&id, "deleted", 60).expect("deleted");
}

/// An environment over the Debian releases (`--os-prefix debian`): each
/// VM boots its own release, its cloud-init (bookworm's 22.4, trixie's
/// 25.1) finishes, and one command names the release on each.
#[test]
fn an_environment_of_debian_releases_runs_each_releases_own_cloud_init() {
    let test = "an environment of Debian releases";
    let (Some(bookworm), Some(trixie)) = (
        image_or_skip("debian-12", test),
        image_or_skip("debian-13", test),
    ) else {
        return;
    };
    let d = Daemon::start(Path::new(BIN));
    d.import_image(&bookworm);
    d.import_image(&trixie);
    let e = d
        .api
        .post(
            "/v1/environments",
            json!({"name": "releases", "os_prefixes": ["debian"], "vcpus": 1,
                   "memory_mib": 1024, "disk_gib": 4,
                   "user_data": "#cloud-config\nruncmd:\n  - [sh, -c, 'echo ran > /var/lib/byteport-env-ran']\n"}),
        )
        .expect("create the environment");
    let ids: Vec<String> = e["vms"]
        .as_array()
        .expect("vms")
        .iter()
        .map(|v| v["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 2, "{e}");
    for id in &ids {
        let v = d.wait_cloud_init(id, BOOT_SECS);
        // trixie's cloud-init finishes with one error: its resizefs
        // module fails to grow the root filesystem (docs/platforms.md);
        // the user-data is applied all the same (checked below).
        if v["image"] == "debian-12" {
            assert_eq!(v["cloud_init"], "done", "{v}");
        }
    }
    let r = d
        .api
        .post(
            "/v1/environments/releases/run",
            json!({"argv": ["sh", "-c",
                ". /etc/os-release; echo $ID $VERSION_ID; cat /var/lib/byteport-env-ran"]}),
        )
        .expect("run");
    let results = r["results"].as_array().expect("results");
    assert_eq!(results.len(), 2, "{r}");
    for (res, want) in results.iter().zip(["debian 12\nran", "debian 13\nran"]) {
        assert_eq!(res["exit_code"], 0, "{r}");
        assert_eq!(res["stdout"].as_str().unwrap().trim(), want, "{r}");
    }

    // Stopped (each guest powers off, its disk kept) and started again:
    // what was written before is still there.
    let run = |argv: Value| {
        d.api
            .post("/v1/environments/releases/run", json!({"argv": argv}))
            .expect("run")
    };
    let r = run(json!([
        "sh",
        "-c",
        "echo kept-$(hostname) > /var/lib/byteport-kept; sync"
    ]));
    assert!(
        r["results"]
            .as_array()
            .unwrap()
            .iter()
            .all(|x| x["exit_code"] == 0),
        "{r}"
    );
    // A 10 MiB file pushed to both before the stop.
    let blob: Vec<u8> = (0u64..10 << 20)
        .map(|i| (i.wrapping_mul(0x9E37_79B9) >> 11) as u8)
        .collect();
    let sha = sha256_hex(&blob);
    let p = d
        .api
        .put_bytes("/v1/environments/releases/files?path=/var/lib/blob", &blob)
        .expect("push");
    for res in p["results"].as_array().expect("results") {
        assert_eq!(res["written"]["sha256"], json!(sha), "{p}");
    }
    let a = d
        .api
        .post("/v1/environments/releases/stop", json!({}))
        .expect("stop");
    assert_eq!(a["refused"], json!([]), "{a}");
    d.wait_env("releases", "stopped", &[], BOOT_SECS);
    let a = d
        .api
        .post("/v1/environments/releases/start", json!({}))
        .expect("start");
    assert_eq!(a["refused"], json!([]), "{a}");
    let e = d.wait_env("releases", "ready", &[], BOOT_SECS);
    let r = run(json!(["cat", "/var/lib/byteport-kept"]));
    let results = r["results"].as_array().expect("results");
    for (res, v) in results.iter().zip(e["vms"].as_array().unwrap()) {
        assert_eq!(res["exit_code"], 0, "{r}");
        assert_eq!(
            res["stdout"].as_str().unwrap().trim(),
            format!("kept-{}", v["hostname"].as_str().unwrap()),
            "{r}"
        );
        let (said, got) = d
            .api
            .get_bytes(
                &format!(
                    "/v1/vms/{}/files?path=/var/lib/blob",
                    v["id"].as_str().unwrap()
                ),
                "x-byteport-sha256",
            )
            .expect("get");
        assert_eq!(said.as_deref(), Some(sha.as_str()), "{v}");
        assert!(got == blob, "the copy back from {} differs", v["name"]);
    }
}

/// An image without the guest agent (here `debian-12` registered with
/// `has_agent: false`, so the node never speaks to its agent) is reached
/// over SSH: the node's key goes to the guest through the metadata
/// service, and `env run`, standard input and file copies work as with
/// the agent, every argument arriving as it was sent.
#[test]
fn an_image_without_the_agent_answers_env_run_over_ssh() {
    let Some(img) = image_or_skip("debian-12", "exec over SSH") else {
        return;
    };
    let d = Daemon::start(Path::new(BIN));
    d.api.import_image_edited(&img, |m| {
        m["name"] = json!("debian-12-ssh");
        m["has_agent"] = json!(false);
    });
    let e = d
        .api
        .post(
            "/v1/environments",
            json!({"name": "nossh", "os_prefixes": ["debian-12-ssh"], "vcpus": 1,
                   "memory_mib": 1024, "disk_gib": 4}),
        )
        .expect("create the environment");
    let env_id = e["id"].as_str().unwrap().to_owned();
    let vm = e["vms"][0].clone();
    let (id, name) = (
        vm["id"].as_str().unwrap().to_owned(),
        vm["name"].as_str().unwrap().to_owned(),
    );
    let e = d.wait_env("nossh", "ready", &["degraded"], BOOT_SECS);
    assert_eq!(e["vms"][0]["ready_by"], "process", "{e}");
    let run = |body: Value| {
        d.api.post("/v1/environments/nossh/run", body).expect("run")["results"][0].clone()
    };
    // Until cloud-init has authorized the node's key and sshd answers,
    // the run says why it could not reach the guest.
    let deadline = Instant::now() + Duration::from_secs(BOOT_SECS);
    let first = loop {
        let r = run(json!({"argv": ["sh", "-c", "echo \"$SUDO_USER\"; id -u; hostname"]}));
        if r["exit_code"] == 0 {
            break r;
        }
        assert!(
            Instant::now() < deadline,
            "no answer over SSH: {r}\nconsole:\n{}",
            d.api
                .get_text(&format!("/v1/vms/{id}/console?bytes=8192"))
                .unwrap_or_default()
        );
        std::thread::sleep(Duration::from_secs(3));
    };
    let out = first["stdout"].as_str().unwrap().to_owned();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{first}");
    // Run as root by sudo for the login user: the SSH path (the agent
    // runs commands as root itself, without sudo).
    assert_eq!(lines[0], "debian", "not over SSH: {first}");
    assert_eq!((lines[1], lines[2]), ("0", name.as_str()), "{first}");

    // Words with quotes, $() and spaces arrive as they were sent.
    let r = run(json!({"argv": ["printf", "%s|", "a b", "$(id)", "it's", "*"]}));
    assert_eq!(r["stdout"], "a b|$(id)|it's|*|", "{r}");
    // Standard input, the exit code, and a file there and back.
    let r = run(json!({"argv": ["sh", "-c", "cat; exit 5"], "stdin_base64": "aGVsbG8="}));
    assert_eq!(
        (r["stdout"].as_str(), r["exit_code"].as_i64()),
        (Some("hello"), Some(5)),
        "{r}"
    );
    let blob: Vec<u8> = (0u32..1 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 7) as u8)
        .collect();
    let p = d
        .api
        .put_bytes("/v1/environments/nossh/files?path=/var/tmp/blob", &blob)
        .expect("push");
    assert_eq!(
        p["results"][0]["written"]["sha256"],
        json!(sha256_hex(&blob)),
        "{p}"
    );
    let (sha, back) = d
        .api
        .get_bytes(
            &format!("/v1/vms/{id}/files?path=/var/tmp/blob"),
            "x-byteport-sha256",
        )
        .expect("get");
    assert!(back == blob, "the copy read back differs");
    assert_eq!(sha.as_deref(), Some(sha256_hex(&blob).as_str()));

    d.api.delete("/v1/environments/nossh").expect("delete");
    d.wait_env(&env_id, "deleted", &[], 120);
    assert!(d.no_qemu_left(10), "no QEMU left");
}
