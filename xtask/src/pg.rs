//! A throwaway PostgreSQL cluster in a temp directory, on loopback, for
//! one test or benchmark run. Stopped and removed on drop.

use anyhow::{Context, bail};
use std::path::PathBuf;
use std::process::Command;

pub struct Postgres {
    pub url: String,
    dir: PathBuf,
    as_postgres: bool,
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn tool(name: &str) -> String {
    // Debian keeps the server tools off PATH; prefer PATH, then Debian's place.
    let on_path = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if on_path {
        return name.to_owned();
    }
    for v in ["17", "16", "15"] {
        let p = format!("/usr/lib/postgresql/{v}/bin/{name}");
        if std::path::Path::new(&p).exists() {
            return p;
        }
    }
    name.to_owned()
}

impl Postgres {
    pub fn start() -> anyhow::Result<Postgres> {
        let dir = std::env::temp_dir().join(format!("byteport-pg-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        // PostgreSQL refuses to run as root: run it as the `postgres` user.
        let as_postgres = is_root();
        if as_postgres {
            crate::run(
                Command::new("chown")
                    .args(["-R", "postgres:postgres"])
                    .arg(&dir),
            )?;
        }
        let port = free_port()?;
        let data = dir.join("data");
        let pg = Postgres {
            url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            dir: dir.clone(),
            as_postgres,
        };
        pg.cmd(
            &tool("initdb"),
            &[
                "-D",
                &data.to_string_lossy(),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
            ],
        )
        .context("initdb")?;
        let opts = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300",
            dir.display()
        );
        pg.cmd(
            &tool("pg_ctl"),
            &[
                "-D",
                &data.to_string_lossy(),
                "-l",
                &dir.join("log").to_string_lossy(),
                "-o",
                &opts,
                "-w",
                "start",
            ],
        )
        .context("pg_ctl start")?;
        Ok(pg)
    }

    fn cmd(&self, program: &str, args: &[&str]) -> anyhow::Result<()> {
        let mut c = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--", program]);
            c
        } else {
            Command::new(program)
        };
        c.args(args).current_dir(&self.dir);
        let out = c.output().with_context(|| format!("running {program}"))?;
        if !out.status.success() {
            bail!("{program} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let _ = self.cmd(
            &tool("pg_ctl"),
            &["-D", &data.to_string_lossy(), "-m", "immediate", "stop"],
        );
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
