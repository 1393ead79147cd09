//! The web console's tasks: install its npm packages (from the committed
//! lock file), check it (generated API types up to date,
//! svelte-check), unit tests (Vitest), build it to `web/build`, and
//! `cargo xtask bench web` (size and time to first render in Chromium).

use anyhow::{Context, bail};
use std::path::Path;
use std::process::Command;

fn npm(web: &Path, args: &[&str]) -> anyhow::Result<()> {
    crate::run(Command::new("npm").current_dir(web).args(args))
}

/// `npm ci` unless the installed packages match the lock file.
pub fn install(root: &Path) -> anyhow::Result<()> {
    let web = root.join("web");
    if Command::new("npm").arg("--version").output().is_err() {
        bail!("npm is missing: apt-get install nodejs npm (Node.js 20 or later)");
    }
    let lock = web.join("package-lock.json");
    let installed = web.join("node_modules/.package-lock.json");
    let fresh = match (std::fs::metadata(&lock), std::fs::metadata(&installed)) {
        (Ok(l), Ok(i)) => i.modified()? >= l.modified()?,
        _ => false,
    };
    if fresh {
        return Ok(());
    }
    if npm(&web, &["ci", "--no-audit", "--no-fund"]).is_err() {
        // `npm ci` refuses a lock file that lacks another platform's
        // optional native package (esbuild, rollup, tailwind's oxide) when
        // the registry it was made against did not serve one. This installs
        // the same locked versions without rewriting the lock file.
        eprintln!(
            "npm ci refused the lock file; installing its versions with npm install --no-save"
        );
        npm(&web, &["install", "--no-save", "--no-audit", "--no-fund"])?;
    }
    Ok(())
}

/// `npm ci && npm run build`: the console that byteportd serves.
pub fn build(root: &Path) -> anyhow::Result<()> {
    install(root)?;
    npm(&root.join("web"), &["run", "build"])
}

/// Every check of the console but the browser test (which runs under
/// nextest with the other real-guest tests, against the build made here).
pub fn test(root: &Path) -> anyhow::Result<()> {
    install(root)?;
    let web = root.join("web");
    npm(&web, &["run", "check"]).context("the generated API client or svelte-check")?;
    npm(&web, &["test"]).context("the console's unit tests")?;
    npm(&web, &["run", "build"]).context("building the console")
}

/// `cargo xtask bench web`: builds the release daemon and the console,
/// then `web/bench/bench.mjs` starts the daemon with 1,000 VMs and
/// measures in Chromium.
pub fn bench(root: &Path, args: &[&str]) -> anyhow::Result<()> {
    let daemon = crate::release_daemon(root, true, None)?;
    build(root)?;
    crate::run(
        Command::new("node")
            .current_dir(root.join("web"))
            .arg("bench/bench.mjs")
            .args(args)
            .env("BYTEPORTD", daemon),
    )
}
