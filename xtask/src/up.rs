//! `cargo xtask up`: install what is missing (as root, from Debian's
//! packages), build, build the `tiny` guest image, start BytePort all in
//! one process on this machine (SQLite and the node's VMs in `.byteport/`),
//! create the first admin, log the CLI in, import `tiny` and start a VM
//! named `hello` that answers `byteport vm exec`.

use anyhow::{Context, bail};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const LISTEN: &str = "127.0.0.1:7480";

/// Debian packages the all-in-one needs, by the command that shows them.
const PACKAGES: &[(&str, &str)] = &[
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("qemu-img", "qemu-utils"),
];

fn on_path(cmd: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()))
}

/// What bridged networking needs; installed only as root (an unprivileged
/// node uses QEMU's user-mode network and needs none of them).
const NETWORK_PACKAGES: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("nft", "nftables"),
    ("dnsmasq", "dnsmasq-base"),
];

fn ensure_packages() -> anyhow::Result<()> {
    let root = is_root();
    let network: &[(&str, &str)] = if root { NETWORK_PACKAGES } else { &[] };
    let mut missing: Vec<&str> = PACKAGES
        .iter()
        .chain(network)
        .filter(|(cmd, _)| !on_path(cmd))
        .map(|(_, pkg)| *pkg)
        .collect();
    // Debian's qemu-system-x86 takes out a qemu-utils of another version
    // (backports') as it comes in: ask for the matching one with it.
    if missing.contains(&"qemu-system-x86") && !missing.contains(&"qemu-utils") {
        missing.push("qemu-utils");
    }
    let lists = std::fs::read_dir("/var/lib/apt/lists")
        .map(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().contains("Packages"))
        })
        .unwrap_or(false);
    if missing.is_empty() && lists {
        return Ok(());
    }
    if !root {
        bail!(
            "missing Debian packages: run `sudo apt-get update && sudo apt-get install -y --no-install-recommends {}`",
            missing.join(" ")
        );
    }
    crate::run(
        Command::new("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    if !missing.is_empty() {
        crate::run(
            Command::new("apt-get")
                .args(["install", "-y", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    Ok(())
}

/// The run-code runtimes `up` builds and imports (their debootstrap needs
/// root).
const RUNTIMES: &[&str] = &["run-shell", "run-python"];

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

pub fn run(root: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    ensure_packages()?;
    // The daemon and the CLI compile while the images and the console are
    // made (those mostly download and compress).
    // In the dev profile, the one `cargo xtask` itself and the tests build
    // in: every crate compiles once, with dependencies optimised
    // (`[profile.dev.package."*"]`). A production install builds --release
    // (docs/admin.md).
    eprintln!("+ cargo build -p byteportd -p byteport-cli (in the background)");
    let mut build = Command::new("cargo")
        .current_dir(root)
        .args(["build", "--quiet", "-p", "byteportd", "-p", "byteport-cli"])
        .spawn()
        .context("starting cargo build")?;
    let made = make_images_and_console(root);
    let built = build.wait().context("waiting for cargo build")?;
    made?;
    if !built.success() {
        bail!("cargo build -p byteportd -p byteport-cli failed: {built}");
    }
    serve(root, started)
}

/// What `hello` needs, made while the daemon compiles: the `tiny` image and
/// the web console. The run-code runtimes come after `hello` answers.
fn make_images_and_console(root: &Path) -> anyhow::Result<()> {
    let image = root.join("build/images/tiny");
    if !image.join("manifest.json").exists() {
        crate::image::run(root, &["build", "tiny"])?;
    }
    crate::web::build(root).context("building the web console")?;
    Ok(())
}

/// The run-code runtimes (as root: debootstrap needs it), built where
/// missing; returns the ones to import.
fn make_runtimes(root: &Path) -> anyhow::Result<Vec<&'static str>> {
    if !is_root() {
        eprintln!(
            "not root: skipping the run-code images (build them as root with `cargo xtask image build run-shell`)"
        );
        return Ok(Vec::new());
    }
    for name in RUNTIMES {
        if !root
            .join("build/images")
            .join(name)
            .join("manifest.json")
            .exists()
        {
            crate::image::run(root, &["build", name])?;
        }
    }
    Ok(RUNTIMES.to_vec())
}

/// Starts the all-in-one, logs the CLI in, imports the images and starts
/// `hello`; then waits for the daemon.
fn serve(root: &Path, started: Instant) -> anyhow::Result<()> {
    let image = root.join("build/images/tiny");
    let bin = root.join("target/debug");
    let data = root.join(".byteport");
    std::fs::create_dir_all(&data)?;
    let config = data.join("cli-config.json");
    let password_file = data.join("admin-password");
    let first = !data.join("byteport.db").exists();
    if first {
        let password = format!("bp-{}", random_hex());
        let mut child = Command::new(bin.join("byteportd"))
            .args([
                "admin",
                "create-user",
                "admin",
                "--admin",
                "--password-stdin",
                "--data-dir",
            ])
            .arg(&data)
            .stdin(Stdio::piped())
            .spawn()
            .context("creating the admin")?;
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(password.as_bytes())?;
        if !child.wait()?.success() {
            bail!("could not create the admin user");
        }
        std::fs::write(&password_file, &password)?;
    }
    let mut server = Command::new(bin.join("byteportd"))
        .args(["all-in-one", "--listen", LISTEN, "--data-dir"])
        .arg(&data)
        .arg("--web-dir")
        .arg(root.join("web/build"))
        .spawn()
        .context("starting byteportd")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(LISTEN).is_err() {
        if Instant::now() > deadline {
            let _ = server.kill();
            bail!("byteportd did not start listening on {LISTEN}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let password =
        std::fs::read_to_string(&password_file).context("reading .byteport/admin-password")?;
    let mut login = Command::new(bin.join("byteport"))
        .args([
            "login",
            "--url",
            &format!("http://{LISTEN}"),
            "--user",
            "admin",
            "--password-stdin",
        ])
        .env("BYTEPORT_CONFIG", &config)
        .stdin(Stdio::piped())
        .spawn()
        .context("logging the CLI in")?;
    login
        .stdin
        .take()
        .context("stdin")?
        .write_all(password.as_bytes())?;
    login.wait()?;
    let cli = |args: &[&str]| -> anyhow::Result<bool> {
        Ok(Command::new(bin.join("byteport"))
            .args(args)
            .env("BYTEPORT_CONFIG", &config)
            .status()
            .with_context(|| format!("running byteport {}", args.join(" ")))?
            .success())
    };
    let manifest = image.join("manifest.json");
    if !cli(&[
        "image",
        "import",
        "--manifest",
        &manifest.display().to_string(),
    ])? {
        let _ = server.kill();
        bail!("importing the tiny image failed");
    }
    let exists = Command::new(bin.join("byteport"))
        .args(["vm", "show", "hello"])
        .env("BYTEPORT_CONFIG", &config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?
        .success();
    if !exists
        && !cli(&[
            "vm",
            "create",
            "hello",
            "--image",
            "tiny",
            "--flavor",
            "m1.tiny",
            "--wait",
            "--timeout",
            "300",
        ])?
    {
        let _ = server.kill();
        bail!("the hello VM did not start");
    }
    if exists {
        let _ = cli(&["vm", "start", "hello", "--wait"]);
    }
    let _ = cli(&["vm", "exec", "hello", "--", "uname", "-a"]);
    let took = started.elapsed().as_secs();
    println!();
    println!(
        "Up in {}m{:02}s: hello answers `byteport vm exec`.",
        took / 60,
        took % 60
    );
    // Then run-code's runtimes, so that `byteport run` works too.
    let runtimes = match make_runtimes(root) {
        Ok(r) => r,
        Err(e) => {
            let _ = server.kill();
            return Err(e.context("building the run-code images"));
        }
    };
    for name in &runtimes {
        let m = root.join("build/images").join(name).join("manifest.json");
        if !cli(&["image", "import", "--manifest", &m.display().to_string()])? {
            let _ = server.kill();
            bail!("importing the {name} image failed");
        }
    }
    if !runtimes.is_empty() {
        let took = started.elapsed().as_secs();
        println!(
            "Run-code ready in {}m{:02}s: {} imported.",
            took / 60,
            took % 60,
            runtimes.join(" and ")
        );
    }
    println!("BytePort is running at http://{LISTEN} (API docs: http://{LISTEN}/docs)");
    println!("  web console: http://{LISTEN}/ (log in as admin)");
    println!("  admin password: in {}", password_file.display());
    println!("  CLI:  export BYTEPORT_CONFIG={}", config.display());
    println!("        {}/byteport vm list", bin.display());
    println!(
        "        {}/byteport vm exec hello -- cat /proc/cpuinfo",
        bin.display()
    );
    println!(
        "        {}/byteport vm console hello --follow",
        bin.display()
    );
    if !runtimes.is_empty() {
        println!(
            "        {}/byteport run --language python -e 'print(6 * 7)'",
            bin.display()
        );
    }
    println!("Press Ctrl-C to stop.");
    server.wait()?;
    Ok(())
}

/// 12 random bytes as hex, for the first admin's password.
fn random_hex() -> String {
    let mut buf = [0u8; 12];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut buf);
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}
