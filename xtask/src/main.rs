//! Repository tasks: `cargo xtask up` (build and start BytePort here),
//! `cargo xtask test` (the whole suite on SQLite and on a
//! real PostgreSQL that it starts), `cargo xtask openapi` (rewrite the
//! committed API document), `cargo xtask bench NAME`.

#[cfg(feature = "bench")]
mod bench_api;
#[cfg(feature = "bench")]
mod bench_boot;
#[cfg(feature = "bench")]
mod bench_env;
#[cfg(feature = "bench")]
mod bench_metadata;
#[cfg(feature = "bench")]
mod bench_net;
#[cfg(feature = "bench")]
mod bench_placement;
#[cfg(feature = "bench")]
mod bench_run;
pub(crate) mod image;
mod pg;
mod up;
mod web;

use anyhow::{Context, bail};
use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("+ {cmd:?}");
    let st = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed: {st}");
    }
    Ok(())
}

/// A program on PATH (or in /usr/sbin and /sbin, where Debian keeps
/// debootstrap and mkfs), if there is one.
fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(tool))
        .find(|f| f.is_file())
}

/// The release daemon the benchmarks run: built here unless `build` is
/// false, or the binary at `bin`.
fn release_daemon(
    root: &std::path::Path,
    build: bool,
    bin: Option<PathBuf>,
) -> anyhow::Result<PathBuf> {
    if build {
        run(Command::new("cargo").current_dir(root).args([
            "build",
            "--release",
            "-p",
            "byteportd",
        ]))?;
    }
    let bin = bin.unwrap_or_else(|| root.join("target/release/byteportd"));
    if !bin.exists() {
        bail!(
            "{} is missing: build it with cargo build --release -p byteportd",
            bin.display()
        );
    }
    Ok(bin)
}

fn usage() -> anyhow::Result<()> {
    eprintln!(
        "usage: cargo xtask up | test | openapi | bench api|boot|env|placement|metadata|net|run|web | web build | image build NAME"
    );
    bail!("unknown task")
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["test", rest @ ..] => test(rest),
        ["up"] => up::run(&root()),
        ["openapi"] => run(Command::new("cargo").current_dir(root()).args([
            "run",
            "--quiet",
            "-p",
            "byteportd",
            "--",
            "openapi",
            "--write",
            "openapi/byteport.json",
        ])),
        ["bench", "web", rest @ ..] => web::bench(&root(), rest),
        #[cfg(feature = "bench")]
        ["bench", "api", rest @ ..] => bench_api::run(&root(), rest),
        #[cfg(feature = "bench")]
        ["bench", "boot", rest @ ..] => bench_boot::run(&root(), rest),
        #[cfg(feature = "bench")]
        ["bench", "placement", rest @ ..] => bench_placement::run(&root(), rest),
        #[cfg(feature = "bench")]
        ["bench", "env", rest @ ..] => bench_env::run(&root(), rest),
        #[cfg(feature = "bench")]
        ["bench", "metadata", rest @ ..] => bench_metadata::run(&root(), rest),
        #[cfg(feature = "bench")]
        ["bench", "net", rest @ ..] => bench_net::run(&root(), rest),
        #[cfg(feature = "bench")]
        ["bench", "run", rest @ ..] => bench_run::run(&root(), rest),
        // Built without the benchmarks: again, with them.
        #[cfg(not(feature = "bench"))]
        ["bench", ..] => run(Command::new("cargo")
            .current_dir(root())
            .args([
                "run",
                "--quiet",
                "--package",
                "xtask",
                "--features",
                "bench",
                "--",
            ])
            .args(&args)),
        ["web", "build"] => web::build(&root()),
        ["image", rest @ ..] => image::run(&root(), rest),
        _ => usage(),
    }
}

/// The README's test command: formatting, lints, then every test on SQLite
/// and on a PostgreSQL started here for the run.
fn test(extra: &[&str]) -> anyhow::Result<()> {
    let root = root();
    run(Command::new("cargo")
        .current_dir(&root)
        .args(["fmt", "--all", "--check"]))?;
    // The real-guest tests boot these images (they fail, not skip, here):
    // they build meanwhile, beside the lints and the console's checks.
    let images = image::build_test_images(&root);
    run(Command::new("cargo").current_dir(&root).args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The benchmarks, which the workspace's build leaves out.
    run(Command::new("cargo").current_dir(&root).args([
        "clippy",
        "--package",
        "xtask",
        "--features",
        "bench",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The console: npm ci, generated client, svelte-check, Vitest, build.
    // Its browser test runs below with the other real-guest tests.
    web::test(&root).context("the web console")?;
    // The test binaries, built while the images may still be building.
    run(Command::new("cargo").current_dir(&root).args([
        "nextest",
        "run",
        "--workspace",
        "--no-run",
    ]))?;
    images
        .join()
        .map_err(|_| anyhow::anyhow!("the image builds' thread panicked"))?
        .context("the guest images")?;
    let pg = pg::Postgres::start().context("starting PostgreSQL for the tests")?;
    eprintln!("PostgreSQL for the tests: {}", pg.url);
    let mut cmd = Command::new("cargo");
    cmd.current_dir(&root)
        .args([
            "nextest",
            "run",
            "--workspace",
            "--no-fail-fast",
            "--success-output",
            "never",
        ])
        .args(extra)
        .env("BYTEPORT_TEST_PG_URL", &pg.url)
        .env("BYTEPORT_REQUIRE_PG", "1")
        .env("BYTEPORT_REQUIRE_QEMU", "1")
        .env("BYTEPORT_REQUIRE_WEB", "1");
    let res = run(&mut cmd);
    drop(pg);
    res
}
