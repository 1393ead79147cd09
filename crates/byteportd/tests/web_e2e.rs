//! The web console end to end: a real `byteportd` all-in-one serving the
//! built console, a real `tiny` guest, and Debian's Chromium driven by
//! `web/e2e/console.e2e.mjs` (playwright-core). This test sets up the
//! daemon, the image, the users and the projects, then runs the script.
//!
//! It skips, saying why, when QEMU, the image, Chromium, Node.js, the
//! console's npm packages or its build are missing, unless
//! `BYTEPORT_REQUIRE_WEB=1` (set by `cargo xtask test`), where it fails.

use byteport_testkit::daemon::{Daemon, image_or_skip, tiny_or_skip, workspace_root};
use serde_json::json;
use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_byteportd");

fn chromium() -> String {
    std::env::var("BYTEPORT_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into())
}

/// Why the browser half cannot run here, if it cannot.
fn missing() -> Option<String> {
    let web = workspace_root().join("web");
    if !Path::new(&chromium()).exists() {
        return Some(format!(
            "no Chromium at {} (apt-get install chromium)",
            chromium()
        ));
    }
    if Command::new("node").arg("--version").output().is_err() {
        return Some("node is not installed".into());
    }
    if !web.join("node_modules/playwright-core").exists() {
        return Some("the console's npm packages are not installed (npm ci in web/)".into());
    }
    if !web.join("build/index.html").exists() {
        return Some("the console is not built (npm run build in web/)".into());
    }
    None
}

#[test]
fn the_console_drives_a_real_guest_in_chromium() {
    if let Some(why) = missing() {
        if std::env::var("BYTEPORT_REQUIRE_WEB").as_deref() == Ok("1") {
            panic!("web console end-to-end: {why}, and BYTEPORT_REQUIRE_WEB=1 requires it");
        }
        eprintln!("SKIP: web console end-to-end: {why}; `cargo xtask test` runs it for real");
        return;
    }
    let Some(img) = tiny_or_skip("web console end-to-end") else {
        return;
    };
    let Some(python) = image_or_skip("run-python", "web console end-to-end (its Run page)") else {
        return;
    };
    let d = Daemon::start(Path::new(BIN));
    d.import_tiny(&img);
    d.import_image(&python);
    for user in ["alice", "vera", "bob"] {
        d.api
            .post(
                "/v1/users",
                json!({"name": user, "password": "user-password"}),
            )
            .expect("a user");
    }
    for (project, members) in [
        ("team-a", &[("alice", "member"), ("vera", "viewer")][..]),
        ("team-b", &[("bob", "owner")][..]),
    ] {
        d.api
            .post("/v1/projects", json!({"name": project}))
            .expect("a project");
        for (user, role) in members {
            d.api
                .put(
                    &format!("/v1/projects/{project}/members/{user}"),
                    json!({"role": role}),
                )
                .expect("a member");
        }
    }
    // Team B's VM, which team A must never see: too big for any node, so it
    // waits, pending, without a guest to boot.
    d.api
        .put(
            "/v1/projects/team-b/quota",
            json!({"max_vms": 5, "max_vcpus": 8, "max_memory_mib": 2_097_152, "max_disk_gib": 10}),
        )
        .expect("a quota");
    let b = d
        .api
        .post(
            "/v1/vms",
            json!({"name": "secret-b", "project": "team-b", "image": "tiny", "vcpus": 1,
                "memory_mib": 1_048_576, "disk_gib": 1}),
        )
        .expect("team-b's VM");
    assert_eq!(b["state"], "pending", "{b}");
    let b_id = b["id"].as_str().expect("an id").to_owned();

    let web = workspace_root().join("web");
    let out = Command::new("node")
        .arg("e2e/console.e2e.mjs")
        .current_dir(&web)
        .env("BYTEPORT_URL", &d.url)
        .env("BYTEPORT_E2E_B_VM", &b_id)
        .output()
        .expect("running node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "the browser test failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}\ndaemon log tail:\n{}",
        out.status,
        byteport_testkit::daemon::tail(&d.log(), 3000)
    );
}
