//! Guests of another architecture, for real: an aarch64 `tiny` emulated
//! by `qemu-system-aarch64` (the `virt` board, TCG) beside an x86_64 one,
//! in one environment (two of each with `dup_each`), and Debian on both.
//! Skips, saying why, when the images are missing,
//! unless `BYTEPORT_REQUIRE_QEMU=1` (set by `cargo xtask test`).

use byteport_testkit::daemon::{Daemon, image_or_skip, sha256_hex, tiny_or_skip};
use serde_json::json;
use std::path::Path;

const BIN: &str = env!("CARGO_BIN_EXE_byteportd");
/// An emulated aarch64 boot is slower than an x86_64 one under TCG.
const BOOT_SECS: u64 = 240;
/// Four Debian guests with systemd and cloud-init at once, two emulated.
const DEBIAN_BOOT_SECS: u64 = 900;

#[test]
fn an_environment_across_architectures_answers_from_each_guest_in_its_own() {
    let test = "an environment across architectures";
    let (Some(tiny), Some(arm)) = (tiny_or_skip(test), image_or_skip("tiny-aarch64", test)) else {
        return;
    };
    let d = Daemon::start(Path::new(BIN));
    d.import_image(&tiny);
    d.import_image(&arm);
    let images = d.api.get("/v1/images").expect("images");
    let arch_of = |name: &str| {
        images
            .as_array()
            .and_then(|a| a.iter().find(|i| i["name"] == name))
            .map(|i| i["arch"].clone())
    };
    assert_eq!(arch_of("tiny-aarch64"), Some(json!("aarch64")), "{images}");
    assert_eq!(arch_of("tiny"), Some(json!("x86_64")), "{images}");

    // The node found qemu-system-aarch64 and says it emulates aarch64.
    let nodes = d.api.get("/v1/nodes").expect("nodes");
    let platforms = &nodes[0]["platforms"];
    assert!(
        platforms
            .as_array()
            .expect("platforms")
            .iter()
            .any(|p| p["arch"] == "aarch64" && p["execution"] == "emulated"),
        "{nodes}"
    );

    // Two VMs (`--dup-each 2`) per (image, architecture).
    let e = d
        .api
        .post(
            "/v1/environments",
            json!({"name": "matrix", "os_prefixes": ["tiny"], "archs": ["x86_64", "aarch64"],
                   "dup_each": 2, "vcpus": 1, "memory_mib": 256, "disk_gib": 1}),
        )
        .expect("create the environment");
    let id = e["id"].as_str().expect("an id").to_owned();
    let e = d.wait_env(&id, "ready", &["degraded"], BOOT_SECS);
    let vms = e["vms"].as_array().expect("vms");
    let names: Vec<&str> = vms.iter().map(|v| v["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "matrix-tiny-1",
            "matrix-tiny-2",
            "matrix-tiny-aarch64-1",
            "matrix-tiny-aarch64-2"
        ]
    );
    for v in vms {
        assert_eq!(v["execution"], "emulated", "TCG on this host: {v}");
    }
    assert_eq!(vms[2]["arch"], "aarch64");

    // The same command on all four: each answers with its own
    // architecture, and each copy is a guest of its own (its boot id).
    let r = d
        .api
        .post(
            "/v1/environments/matrix/run",
            json!({"argv": ["sh", "-c", "uname -m; cat /proc/sys/kernel/random/boot_id"]}),
        )
        .expect("run");
    let results = r["results"].as_array().expect("results");
    assert_eq!(results.len(), 4, "{r}");
    let mut boot_ids = std::collections::HashSet::new();
    for (res, arch) in results
        .iter()
        .zip(["x86_64", "x86_64", "aarch64", "aarch64"])
    {
        assert_eq!(res["exit_code"], 0, "{r}");
        let out = res["stdout"].as_str().unwrap();
        assert_eq!(out.lines().next(), Some(arch), "{r}");
        assert!(
            boot_ids.insert(out.lines().nth(1).map(str::to_owned)),
            "{r}"
        );
    }

    // A 10 MiB file to both guests, and back from each, byte for byte.
    let blob: Vec<u8> = (0u64..10 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let sha = sha256_hex(&blob);
    let r = d
        .api
        .put_bytes("/v1/environments/matrix/files?path=/tmp/blob", &blob)
        .expect("push");
    let results = r["results"].as_array().expect("results");
    assert_eq!(results.len(), 4, "{r}");
    for res in results {
        assert_eq!(res["error"], json!(null), "{r}");
        assert_eq!(res["written"]["sha256"], json!(sha), "{r}");
        assert_eq!(res["written"]["size"], json!(10 << 20), "{r}");
    }
    for v in vms {
        let id = v["id"].as_str().unwrap();
        let (said, got) = d
            .api
            .get_bytes(
                &format!("/v1/vms/{id}/files?path=/tmp/blob"),
                "x-byteport-sha256",
            )
            .expect("get");
        assert_eq!(said.as_deref(), Some(sha.as_str()), "{v}");
        assert!(got == blob, "the copy back from {} differs", v["name"]);
    }
    // A relative path is refused before any VM is touched; a missing file
    // is a 404.
    let bad = d
        .api
        .put_bytes("/v1/environments/matrix/files?path=tmp/x", b"x")
        .expect_err("a relative path");
    assert!(bad.starts_with("400"), "{bad}");
    let missing = d
        .api
        .get_bytes(
            &format!(
                "/v1/vms/{}/files?path=/tmp/none",
                vms[0]["id"].as_str().unwrap()
            ),
            "x-byteport-sha256",
        )
        .expect_err("a missing file");
    assert!(missing.starts_with("404"), "{missing}");

    // The aarch64 guest powers off on the `virt` board's power button
    // (a GPIO key, not ACPI) and comes back.
    let arm_id = vms[2]["id"].as_str().unwrap().to_owned();
    d.api
        .post(&format!("/v1/vms/{arm_id}/stop"), json!({}))
        .expect("stop");
    d.wait(&arm_id, "stopped", 120).expect("stopped");
    assert!(
        !d.log().contains("ignored the power button"),
        "the guest powered itself off; daemon log:\n{}",
        d.log()
    );
    d.api
        .post(&format!("/v1/vms/{arm_id}/start"), json!({}))
        .expect("start");
    d.wait(&arm_id, "running", BOOT_SECS)
        .expect("running again");
    let (out, _, code) = d.exec(&arm_id, &["uname", "-m"]).expect("exec");
    assert_eq!((out.trim(), code), ("aarch64", Some(0)));

    d.api
        .delete("/v1/environments/matrix")
        .expect("delete the environment");
    d.wait_env(&id, "deleted", &[], 120);
    assert!(d.no_qemu_left(10), "no QEMU left");
}

/// Debian's two releases on both architectures in one environment, made
/// by `--os-prefix debian --arch x86_64,aarch64`: four VMs, each running
/// its own release's cloud-init (the aarch64 ones, with no SMBIOS tables,
/// find the metadata service through a fw_cfg file), each naming its own
/// release and architecture.
#[test]
fn debian_releases_on_two_architectures_each_name_their_own() {
    let test = "Debian releases on two architectures";
    let names = [
        "debian-12",
        "debian-12-aarch64",
        "debian-13",
        "debian-13-aarch64",
    ];
    let images: Vec<_> = names
        .iter()
        .filter_map(|n| image_or_skip(n, test))
        .collect();
    if images.len() < names.len() {
        return;
    }
    let d = Daemon::start(Path::new(BIN));
    for i in &images {
        d.import_image(i);
    }
    let e = d
        .api
        .post(
            "/v1/environments",
            json!({"name": "compat", "os_prefixes": ["debian"], "archs": ["x86_64", "aarch64"],
                   "vcpus": 1, "memory_mib": 1024, "disk_gib": 4,
                   "user_data": "#cloud-config\nruncmd:\n  - [sh, -c, 'echo ran > /var/lib/byteport-env-ran']\n"}),
        )
        .expect("create the environment");
    let id = e["id"].as_str().expect("an id").to_owned();
    let vms = e["vms"].as_array().expect("vms").clone();
    let mut got: Vec<&str> = vms.iter().map(|v| v["image"].as_str().unwrap()).collect();
    got.sort();
    assert_eq!(got, names, "{e}");
    d.wait_env(&id, "ready", &["degraded"], DEBIAN_BOOT_SECS);
    for v in &vms {
        let v = d.wait_cloud_init(v["id"].as_str().unwrap(), DEBIAN_BOOT_SECS);
        // trixie's resizefs fails (docs/platforms.md); bookworm's is done.
        let image = v["image"].as_str().unwrap();
        if image.starts_with("debian-12") {
            assert_eq!(v["cloud_init"], "done", "{v}");
        }
    }
    let r = d
        .api
        .post(
            "/v1/environments/compat/run",
            json!({"argv": ["sh", "-c",
                "cat /etc/os-release; uname -m; cat /var/lib/byteport-env-ran"]}),
        )
        .expect("run");
    let results = r["results"].as_array().expect("results");
    assert_eq!(results.len(), 4, "{r}");
    for res in results {
        assert_eq!(res["exit_code"], 0, "{r}");
        let vm = vms
            .iter()
            .find(|v| v["id"] == res["vm_id"])
            .expect("a result per VM");
        let image = vm["image"].as_str().unwrap();
        let (version, arch) = match image.split_once("-aarch64") {
            Some((base, _)) => (base.trim_start_matches("debian-"), "aarch64"),
            None => (image.trim_start_matches("debian-"), "x86_64"),
        };
        let out = res["stdout"].as_str().unwrap();
        assert!(
            out.lines()
                .any(|l| l == format!("VERSION_ID=\"{version}\"")),
            "{image}: {out}"
        );
        let tail: Vec<&str> = out.lines().rev().take(2).collect();
        assert_eq!(tail, ["ran", arch], "{image}: {out}");
        assert_eq!(vm["arch"], arch, "{vm}");
    }
    d.api
        .delete("/v1/environments/compat")
        .expect("delete the environment");
    d.wait_env(&id, "deleted", &[], 120);
    assert!(d.no_qemu_left(10), "no QEMU left");
}
