//! `image import`: turns arguments and an optional `manifest.json` into an
//! image record, hashes the files locally, registers the image and streams
//! each file to the server, which checks it against the declared sha256.
//! It does not build images (that is `cargo xtask image build`).

use crate::client::{ApiError, Client, Method, decode, seg};
use crate::{Boot, ImageFormat, ImportArgs};
use anyhow::{Context, Result, bail};
use byteport_types::api::{BootMode, Image};
use clap::ValueEnum;
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::path::{Path, PathBuf};

/// What an image's `manifest.json` says; keys not named here (the files'
/// sizes and hashes, the kernel's version, ...) are ignored.
#[derive(Debug, Default, Deserialize)]
struct Manifest {
    name: Option<String>,
    os_family: Option<String>,
    os_version: Option<String>,
    arch: Option<String>,
    format: Option<String>,
    boot: Option<String>,
    kernel: Option<String>,
    /// The initramfs of an `initramfs` image, else an initrd for the disk.
    initrd: Option<String>,
    /// The disk of a `qcow2` or `raw` image.
    #[serde(alias = "disk")]
    image: Option<String>,
    cmdline: Option<String>,
    has_agent: Option<bool>,
    login_user: Option<String>,
}

/// One file to upload, under the role the server knows it by.
#[derive(Debug, PartialEq, Eq)]
pub struct PlannedFile {
    /// `image`, `kernel` or `initrd`.
    pub role: &'static str,
    pub path: PathBuf,
}

/// Everything an import needs, arguments and manifest merged.
#[derive(Debug)]
pub struct Plan {
    pub name: String,
    pub os_family: String,
    pub os_version: String,
    pub arch: String,
    pub format: ImageFormat,
    pub boot: Boot,
    pub cmdline: Option<String>,
    pub has_agent: bool,
    pub login_user: Option<String>,
    /// The `image` file first.
    pub files: Vec<PlannedFile>,
}

fn format_str(f: ImageFormat) -> &'static str {
    match f {
        ImageFormat::Qcow2 => "qcow2",
        ImageFormat::Raw => "raw",
        ImageFormat::Initramfs => "initramfs",
    }
}

fn boot_str(b: Boot) -> &'static str {
    match b {
        Boot::Disk => "disk",
        Boot::Kernel => "kernel",
    }
}

fn read_manifest(path: &Path) -> Result<Manifest> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the manifest {}", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("the manifest {} is not valid", path.display()))
}

/// Merges the arguments over the manifest; arguments win.
pub fn plan(a: ImportArgs) -> Result<Plan> {
    let (m, dir) = match &a.manifest {
        Some(p) => (
            read_manifest(p)?,
            p.parent().map(Path::to_path_buf).unwrap_or_default(),
        ),
        None => (Manifest::default(), PathBuf::new()),
    };
    // Manifest file names are relative to the manifest's directory.
    let rel = |s: String| dir.join(s);
    let name = a
        .name
        .or(m.name)
        .context("the image needs a name: pass NAME or a manifest with \"name\"")?;
    let format = match (a.format, m.format) {
        (Some(f), _) => f,
        (None, Some(s)) => ImageFormat::from_str(&s, true).map_err(|_| {
            anyhow::anyhow!("the manifest's format {s:?} is not one of qcow2, raw, initramfs")
        })?,
        (None, None) => bail!("pass --format (qcow2, raw or initramfs)"),
    };
    let os_family = a
        .os_family
        .or(m.os_family)
        .context("pass --os-family (linux, debian, ...)")?;
    let os_version = a.os_version.or(m.os_version).context("pass --os-version")?;
    let arch = a.arch.or(m.arch).unwrap_or_else(|| "x86_64".into());
    let kernel = a.kernel.or(m.kernel.map(rel));
    let (main, initrd) = if format == ImageFormat::Initramfs {
        if a.file.is_some() && a.initrd.is_some() {
            bail!(
                "an initramfs image's FILE is its initramfs; --initrd is for qcow2 and raw images"
            );
        }
        let main = a
            .file
            .or(a.initrd)
            .or(m.initrd.map(rel))
            .context("an initramfs image needs its initramfs: pass FILE")?;
        (main, None)
    } else {
        let main = a
            .file
            .or(m.image.map(rel))
            .context("pass FILE, the image's disk")?;
        (main, a.initrd.or(m.initrd.map(rel)))
    };
    let boot = match (a.boot, m.boot) {
        (Some(b), _) => b,
        (None, Some(s)) => Boot::from_str(&s, true)
            .map_err(|_| anyhow::anyhow!("the manifest's boot {s:?} is not one of disk, kernel"))?,
        (None, None) if format == ImageFormat::Initramfs || kernel.is_some() => Boot::Kernel,
        (None, None) => Boot::Disk,
    };
    if format == ImageFormat::Initramfs && boot == Boot::Disk {
        bail!("an initramfs image has no disk to boot from: use --boot kernel");
    }
    if boot == Boot::Kernel && kernel.is_none() {
        bail!("a kernel-booted image needs --kernel FILE");
    }
    let mut files = vec![PlannedFile {
        role: "image",
        path: main,
    }];
    if let Some(k) = kernel {
        files.push(PlannedFile {
            role: "kernel",
            path: k,
        });
    }
    if let Some(i) = initrd {
        files.push(PlannedFile {
            role: "initrd",
            path: i,
        });
    }
    Ok(Plan {
        name,
        os_family,
        os_version,
        arch,
        format,
        boot,
        cmdline: a.cmdline.or(m.cmdline),
        has_agent: a.has_agent.or(m.has_agent).unwrap_or(false),
        login_user: a.login_user.or(m.login_user),
        files,
    })
}

/// A file's sha256 (lowercase hex) and size, read in a stream.
/// A bar shows the reading of big files on a terminal.
pub fn hash_file(path: &Path) -> Result<(String, u64)> {
    let mut f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut bar = crate::progress::Bar::new("checksumming  ", len).only_if(len >= 16 << 20);
    let mut h = Sha256::new();
    let mut reader = crate::progress::Counting {
        inner: &mut f,
        bar: &mut bar,
    };
    let size = std::io::copy(&mut reader, &mut h)
        .with_context(|| format!("cannot read {}", path.display()))?;
    bar.finish();
    Ok((hex::encode(h.finalize()), size))
}

/// A byte count for people: `512 B`, `8.0 KiB`, `1.5 GiB`.
pub fn human_size(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = UNITS[0];
    for u in &UNITS[1..] {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.1} {unit}")
}

struct Hashed<'a> {
    file: &'a PlannedFile,
    sha256: String,
    size: u64,
}

/// Registers the image (or finds it registered with the same files) and
/// uploads every file; returns the image as the server last sent it.
pub fn run(c: &Client, plan: &Plan, quiet: bool) -> Result<Value> {
    let mut hashed = Vec::new();
    for f in &plan.files {
        let (sha256, size) = hash_file(&f.path)?;
        if size == 0 {
            bail!("{} is empty", f.path.display());
        }
        hashed.push(Hashed {
            file: f,
            sha256,
            size,
        });
    }
    let sha_of = |role: &str| {
        hashed
            .iter()
            .find(|h| h.file.role == role)
            .map(|h| h.sha256.clone())
    };
    let (image_sha, kernel_sha, initrd_sha) = (
        sha_of("image").context("no image file")?,
        sha_of("kernel"),
        sha_of("initrd"),
    );
    let size_bytes = hashed[0].size;
    let name = &plan.name;
    let body = json!({
        "name": name,
        "os_family": plan.os_family,
        "os_version": plan.os_version,
        "arch": plan.arch,
        "format": format_str(plan.format),
        "size_bytes": size_bytes,
        "sha256": image_sha,
        "boot": boot_str(plan.boot),
        "kernel_sha256": kernel_sha,
        "initrd_sha256": initrd_sha,
        "cmdline": plan.cmdline,
        "has_agent": plan.has_agent,
        "login_user": plan.login_user,
    });
    match c.value(Method::Post, "/v1/images", &[], Some(&body)) {
        Ok(_) => {
            if !quiet {
                println!("registered image {name}");
            }
        }
        Err(e)
            if e.downcast_ref::<ApiError>()
                .is_some_and(|a| a.status == 409) =>
        {
            let have: Image = decode(&c.get(&format!("/v1/images/{}", seg(name)), &[])?)?;
            if have.sha256 != image_sha
                || have.kernel_sha256 != kernel_sha
                || have.initrd_sha256 != initrd_sha
            {
                bail!(
                    "image {name} already exists with other files (sha256 {}); \
                     delete it or import under another name",
                    have.sha256
                );
            }
            let differs = settings_that_differ(&have, plan);
            if !differs.is_empty() {
                eprintln!(
                    "warning: image {name} exists with the same files but another {}; \
                     the registered values stay",
                    differs.join(", ")
                );
            }
            if !quiet {
                println!("image {name} is already registered with these files");
            }
        }
        Err(e) => return Err(e),
    }
    let mut last = None;
    for h in &hashed {
        let path = &h.file.path;
        let mut f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let now = f
            .metadata()
            .with_context(|| format!("cannot read {}", path.display()))?
            .len();
        if now != h.size {
            bail!("{} changed while it was being imported", path.display());
        }
        let mut bar = crate::progress::Bar::new(format!("uploading {:<6}", h.file.role), h.size);
        let mut reader = crate::progress::Counting {
            inner: &mut f,
            bar: &mut bar,
        };
        let v = c
            .upload(
                &format!("/v1/images/{}/files/{}", seg(name), h.file.role),
                &mut reader,
                h.size,
            )
            .with_context(|| format!("uploading {}", path.display()))?;
        bar.finish();
        if !quiet {
            println!(
                "uploaded {:<6}  {}  {}  sha256 {}",
                h.file.role,
                path.display(),
                human_size(h.size),
                h.sha256
            );
        }
        last = Some(v);
    }
    last.context("no file was uploaded")
}

/// Which registered settings disagree with the plan, by name.
fn settings_that_differ(have: &Image, plan: &Plan) -> Vec<&'static str> {
    let boot = match have.boot {
        BootMode::Disk => Boot::Disk,
        BootMode::Kernel => Boot::Kernel,
    };
    [
        ("os_family", have.os_family != plan.os_family),
        ("os_version", have.os_version != plan.os_version),
        ("arch", have.arch != plan.arch),
        ("format", have.format != format_str(plan.format)),
        ("boot", boot != plan.boot),
        ("cmdline", have.cmdline != plan.cmdline),
        ("has_agent", have.has_agent != plan.has_agent),
    ]
    .into_iter()
    .filter_map(|(k, d)| d.then_some(k))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Cli;
    use clap::Parser;

    fn import_args(args: &[&str]) -> ImportArgs {
        let mut argv = vec!["byteport", "image", "import"];
        argv.extend(args);
        match Cli::try_parse_from(argv).expect("parses").cmd {
            crate::Cmd::Image(crate::ImageCmd::Import(a)) => a,
            other => panic!("parsed as {other:?}"),
        }
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "byteport-cli-import-{tag}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock")
                .as_nanos()
        ));
        std::fs::create_dir_all(&d).expect("temp dir");
        d
    }

    #[test]
    fn manifest_fills_everything_relative_to_its_dir() {
        let dir = temp_dir("manifest");
        let m = dir.join("manifest.json");
        std::fs::write(
            &m,
            r#"{"name":"tiny","os_family":"linux","os_version":"1.36.1","arch":"x86_64",
                "format":"initramfs","boot":"kernel","kernel":"vmlinuz","initrd":"initrd.img",
                "cmdline":"console=ttyS0 quiet","has_agent":true,"kernel_version":"6.1",
                "files":{"vmlinuz":{"size":1,"sha256":"x"}}}"#,
        )
        .expect("manifest");
        let p = plan(import_args(&["--manifest", m.to_str().expect("utf-8")])).expect("plan");
        assert_eq!(p.name, "tiny");
        assert_eq!(p.format, ImageFormat::Initramfs);
        assert_eq!(p.boot, Boot::Kernel);
        assert_eq!(p.cmdline.as_deref(), Some("console=ttyS0 quiet"));
        assert!(p.has_agent);
        assert_eq!(
            p.files,
            vec![
                PlannedFile {
                    role: "image",
                    path: dir.join("initrd.img")
                },
                PlannedFile {
                    role: "kernel",
                    path: dir.join("vmlinuz")
                },
            ]
        );

        // Arguments override the manifest.
        let p = plan(import_args(&[
            "other",
            "/tmp/x.img",
            "--manifest",
            m.to_str().expect("utf-8"),
            "--has-agent=false",
            "--os-version",
            "2",
        ]))
        .expect("plan");
        assert_eq!(p.name, "other");
        assert_eq!(p.os_version, "2");
        assert!(!p.has_agent);
        assert_eq!(p.files[0].path, PathBuf::from("/tmp/x.img"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn disk_images_and_defaults() {
        let p = plan(import_args(&[
            "deb",
            "d.qcow2",
            "--format",
            "qcow2",
            "--os-family",
            "debian",
            "--os-version",
            "12",
        ]))
        .expect("plan");
        assert_eq!(p.boot, Boot::Disk);
        assert_eq!(p.arch, "x86_64");
        assert!(!p.has_agent);
        assert_eq!(p.files.len(), 1);

        // A kernel makes it kernel-booted; an initrd is its own role.
        let p = plan(import_args(&[
            "deb",
            "d.raw",
            "--format",
            "raw",
            "--os-family",
            "debian",
            "--os-version",
            "12",
            "--kernel",
            "k",
            "--initrd",
            "i",
            "--has-agent",
        ]))
        .expect("plan");
        assert_eq!(p.boot, Boot::Kernel);
        assert!(p.has_agent);
        let roles: Vec<&str> = p.files.iter().map(|f| f.role).collect();
        assert_eq!(roles, ["image", "kernel", "initrd"]);

        let e = plan(import_args(&[
            "t",
            "initrd.img",
            "--format",
            "initramfs",
            "--os-family",
            "linux",
            "--os-version",
            "1",
        ]))
        .expect_err("no kernel");
        assert!(e.to_string().contains("--kernel"), "{e}");
        let e = plan(import_args(&["t", "x.img", "--os-family", "linux"])).expect_err("no format");
        assert!(e.to_string().contains("--format"), "{e}");
    }

    #[test]
    fn hashes_and_sizes() {
        let dir = temp_dir("hash");
        let f = dir.join("f");
        std::fs::write(&f, b"abc").expect("file");
        let (sha, size) = hash_file(&f).expect("hash");
        assert_eq!(size, 3);
        assert_eq!(
            sha,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(8 * 1024), "8.0 KiB");
        assert_eq!(human_size(3 << 29), "1.5 GiB");
    }
}
