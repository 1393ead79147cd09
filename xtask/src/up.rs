//! `cargo xtask up`: build, start BytePort all on this machine (SQLite in
//! `.byteport/`), create the first admin, and log the CLI in.

use anyhow::{Context, bail};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const LISTEN: &str = "127.0.0.1:7480";

pub fn run(root: &Path) -> anyhow::Result<()> {
    crate::run(Command::new("cargo").current_dir(root).args([
        "build",
        "--release",
        "-p",
        "byteportd",
        "-p",
        "byteport-cli",
    ]))?;
    let bin = root.join("target/release");
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
        .args(["server", "--listen", LISTEN, "--data-dir"])
        .arg(&data)
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
    println!();
    println!("BytePort is running at http://{LISTEN} (API docs: http://{LISTEN}/docs)");
    println!("  admin password: in {}", password_file.display());
    println!("  CLI:  export BYTEPORT_CONFIG={}", config.display());
    println!("        {}/byteport vm list", bin.display());
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
