//! The container image: `packaging/container/Dockerfile` built with podman,
//! started, and a `tiny` VM booted inside it under TCG and exec'd into.
//!
//! Slow (a release build inside the container, about ten minutes the first
//! time), so it runs when asked: `BYTEPORT_CONTAINER_TEST=1 cargo nextest
//! run -p byteportd --test container`. This machine has no Docker Hub, so
//! the build's stage images are made here and passed as build arguments:
//! a Debian 12 root from debootstrap (`podman import`), the same with gcc
//! for the Rust stage (the host's toolchain mounted in), and with the
//! host's Node.js for the console's stage. The Dockerfile itself is used
//! as committed.

use byteport_testkit::daemon::{Api, exec_result, guest_image};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BASE: &str = "localhost/byteport-test-base:bookworm";
const RUST: &str = "localhost/byteport-test-rust:bookworm";
const NODE: &str = "localhost/byteport-test-node:bookworm";
const IMAGE: &str = "localhost/byteport-test:latest";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

fn run(cmd: &mut Command) -> String {
    eprintln!("+ {cmd:?}");
    let o = cmd
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(o.status.success(), "{cmd:?} failed: {}", o.status);
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn podman() -> Command {
    Command::new("podman")
}

/// What `podman build` and `podman run` need on this host. Some hosts
/// (cgroups v1 and v2 mounted together, rlimits that may not be raised, as
/// in some sandboxes) refuse crun's defaults: then runc (Debian's `runc`)
/// with limits the host allows. Chosen by trying, and said.
fn runtime_flags() -> Vec<String> {
    static FLAGS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    FLAGS
        .get_or_init(|| {
            let works = |flags: &[&str]| {
                podman()
                    .args(["run", "--rm"])
                    .args(flags)
                    .args([BASE, "true"])
                    .output()
                    .is_ok_and(|o| o.status.success())
            };
            let fallback = [
                "--runtime",
                "runc",
                "--ulimit",
                "nofile=20000:20000",
                "--ulimit",
                "nproc=4096:4096",
            ];
            let flags: &[&str] = if works(&[]) {
                &[]
            } else if works(&fallback) {
                &fallback
            } else {
                panic!(
                    "podman cannot run a container here, with its defaults or with \
                     {fallback:?} (apt-get install runc)"
                )
            };
            eprintln!("podman runs containers here with {flags:?}");
            flags.iter().map(|f| (*f).to_owned()).collect()
        })
        .clone()
}

fn image_exists(name: &str) -> bool {
    podman()
        .args(["image", "exists", name])
        .status()
        .is_ok_and(|s| s.success())
}

/// Builds `tag` from a Containerfile in a context of its own, with
/// `files` copied in first.
fn build_standin(tag: &str, containerfile: &str, files: &[(&Path, &str)]) {
    if image_exists(tag) {
        return;
    }
    let ctx = tempfile::tempdir().unwrap();
    for (from, to) in files {
        run(Command::new("cp")
            .arg("-a")
            .arg(from)
            .arg(ctx.path().join(to)));
    }
    std::fs::write(ctx.path().join("Containerfile"), containerfile).unwrap();
    run(podman()
        .arg("build")
        .args(runtime_flags())
        .args(["-t", tag])
        .arg(ctx.path()));
}

/// The stage images this machine can make without a registry of images.
fn standins(root: &Path) {
    if !image_exists(BASE) {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("rootfs");
        let cache = root.join("build/cache/debootstrap");
        std::fs::create_dir_all(&cache).unwrap();
        run(Command::new("debootstrap")
            .args(["--variant=minbase", "--include=ca-certificates"])
            .arg(format!("--cache-dir={}", cache.display()))
            .args(["bookworm"])
            .arg(&rootfs)
            .arg("http://deb.debian.org/debian"));
        let tar = dir.path().join("rootfs.tar");
        run(Command::new("tar")
            .arg("-C")
            .arg(&rootfs)
            .arg("-cf")
            .arg(&tar)
            .arg("."));
        run(podman().args(["import"]).arg(&tar).arg(BASE));
    }
    build_standin(
        RUST,
        &format!(
            "FROM {BASE}\n\
             RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
             && rm -rf /var/lib/apt/lists/*\n\
             ENV CARGO_HOME=/usr/local/cargo PATH=/opt/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
        ),
        &[],
    );
    build_standin(
        NODE,
        &format!(
            "FROM {BASE}\n\
             COPY node /usr/local/bin/node\n\
             COPY npm /usr/local/lib/node_modules/npm\n\
             COPY ca-certificates.crt /etc/ssl/certs/host-ca-certificates.crt\n\
             ENV NODE_EXTRA_CA_CERTS=/etc/ssl/certs/host-ca-certificates.crt\n\
             RUN ln -s ../lib/node_modules/npm/bin/npm-cli.js /usr/local/bin/npm\n"
        ),
        // The host's CA bundle too: where the way out to the npm registry
        // goes through a proxy with a CA of its own, npm must trust it.
        &[
            (Path::new("/usr/bin/node"), "node"),
            (Path::new("/usr/lib/node_modules/npm"), "npm"),
            (
                Path::new("/etc/ssl/certs/ca-certificates.crt"),
                "ca-certificates.crt",
            ),
        ],
    );
}

/// The host's Rust toolchain (mounted into the Rust stage).
fn toolchain() -> PathBuf {
    let sysroot = run(Command::new("rustc").args(["--print", "sysroot"]));
    PathBuf::from(sysroot.trim())
}

#[test]
fn the_container_image_builds_and_boots_a_tiny_vm_under_tcg() {
    if std::env::var_os("BYTEPORT_CONTAINER_TEST").is_none() {
        eprintln!(
            "SKIP: the container test is slow (a release build inside the container); \
             run it with BYTEPORT_CONTAINER_TEST=1 cargo nextest run -p byteportd --test container"
        );
        return;
    }
    let tiny = guest_image("tiny").expect("the tiny image (cargo xtask image build tiny)");
    let root = root();
    standins(&root);
    // The build's target and registry stay between runs, outside the image.
    let target = root.join("build/container-target");
    let registry = PathBuf::from(std::env::var("HOME").unwrap()).join(".cargo/registry");
    std::fs::create_dir_all(&target).unwrap();
    std::fs::create_dir_all(&registry).unwrap();
    run(podman()
        .arg("build")
        .args(runtime_flags())
        .args(["-f", "packaging/container/Dockerfile", "-t", IMAGE])
        .args(["--build-arg", &format!("RUST_IMAGE={RUST}")])
        .args(["--build-arg", &format!("NODE_IMAGE={NODE}")])
        .args(["--build-arg", &format!("BASE_IMAGE={BASE}")])
        .arg(format!("--volume={}:/opt/rust:ro", toolchain().display()))
        .arg(format!(
            "--volume={}:/usr/local/cargo/registry",
            registry.display()
        ))
        .arg(format!("--volume={}:/src/target", target.display()))
        .arg(".")
        .current_dir(&root));

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let name = format!("byteport-test-{}", std::process::id());
    let _ = podman().args(["rm", "-f", &name]).output();
    run(podman()
        .args(["run", "-d", "--name", &name])
        .args(runtime_flags())
        .args(["-p", &format!("127.0.0.1:{port}:7480")])
        .args(["-v", &format!("{name}-data:/var/lib/byteport")])
        .arg(IMAGE));
    struct Gone(String);
    impl Drop for Gone {
        fn drop(&mut self) {
            let _ = Command::new("podman").args(["rm", "-f", &self.0]).output();
            let _ = Command::new("podman")
                .args(["volume", "rm", "-f", &format!("{}-data", self.0)])
                .output();
        }
    }
    let _gone = Gone(name.clone());
    let logs = || run(podman().args(["logs", &name]));
    let mut api = Api::new(&format!("http://127.0.0.1:{port}"), None);
    let deadline = Instant::now() + Duration::from_secs(60);
    while api.get("/healthz").is_err() {
        assert!(Instant::now() < deadline, "no answer: {}", logs());
        std::thread::sleep(Duration::from_millis(250));
    }
    // The first admin, with the token the server printed.
    let token = loop {
        let l = logs();
        if let Some(i) = l.find("--token ") {
            break l[i + 8..].split_whitespace().next().unwrap().to_owned();
        }
        assert!(Instant::now() < deadline, "no bootstrap token: {l}");
        std::thread::sleep(Duration::from_millis(250));
    };
    api.post(
        "/v1/bootstrap",
        json!({"token": token, "name": "admin", "password": "admin-password"}),
    )
    .expect("bootstrap");
    let login = api
        .post(
            "/v1/auth/login",
            json!({"name": "admin", "password": "admin-password"}),
        )
        .expect("login");
    api.token = login["access_token"].as_str().map(str::to_owned);
    api.import_image_as(&tiny, None);
    let vm = api
        .post(
            "/v1/vms",
            json!({"name": "inside", "image": "tiny", "vcpus": 1, "memory_mib": 128, "disk_gib": 1}),
        )
        .expect("create");
    let id = vm["id"].as_str().unwrap();
    let v = api
        .get(&format!("/v1/vms/{id}/wait?state=running&timeout_secs=180"))
        .unwrap_or_else(|e| panic!("{e}: {}", logs()));
    assert_eq!(v["state"], "running", "{v}");
    let lines = api
        .post_lines(
            &format!("/v1/vms/{id}/exec"),
            json!({"argv": ["uname", "-m"], "timeout_secs": 60}),
        )
        .expect("exec");
    let (out, _, code) = exec_result(&lines).expect("exec result");
    assert_eq!((out.as_str(), code), ("x86_64\n", Some(0)));
    // The node in the container says how it runs guests.
    let nodes = api.get("/v1/nodes").unwrap();
    eprintln!("node in the container: kvm={}", nodes[0]["kvm"]);
}
