//! `cargo xtask image build NAME [--out DIR]`: guest images built from
//! Debian's packages and the recipes under `images/`.
//!
//! Owns fetching packages (`apt-get download`, cached in `build/cache/debs/`),
//! unpacking them, building the static guest agent, assembling an initramfs
//! (a newc cpio written here, so no `cpio` package is needed) and writing the
//! output directory with its `manifest.json`. It does not boot anything.
//!
//! Recipes: `tiny` (Debian kernel + busybox + agent, all in the initramfs)
//! and `debian-12` (a debootstrap root with cloud-init and the agent as a
//! service, packed as an ext4 qcow2, booted by Debian's kernel and a busybox
//! initramfs that mounts it), each also for aarch64 (a foreign debootstrap
//! finished under qemu-user-static), and the run-code runtimes.
//!
//! Every external tool runs as an argument vector, never through a shell.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, bail};

/// Where the agent's static build goes, apart from the main target dir so
/// its RUSTFLAGS do not invalidate the main build.
const AGENT_TARGET_DIR: &str = "target/guest";
/// The trixie chroot that cross-builds the agent for other architectures
/// (see [`build_agent_cross`]), kept between builds.
const CROSS_ROOT: &str = "build/cache/cross-trixie";
/// Kept in step with `byteport_guest::proto::AGENT_PORT_NAME`.
const AGENT_PORT_NAME: &str = "org.byteport.agent.0";

const USAGE: &str = "usage: cargo xtask image build NAME [--out DIR]   (NAME: tiny, tiny-aarch64, debian-12, debian-13, debian-12-aarch64, debian-13-aarch64, run-shell, run-python, run-node or run-rust)";

/// Entry point for `cargo xtask image ...`.
pub fn run(root: &Path, args: &[&str]) -> anyhow::Result<()> {
    let ["build", name, rest @ ..] = args else {
        bail!("{USAGE}");
    };
    let recipe = Recipe::parse(name)?;
    let out = match rest {
        [] => root.join("build/images").join(name),
        ["--out", dir] => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                root.join(dir)
            }
        }
        _ => bail!("{USAGE}"),
    };
    let started = Instant::now();
    let ctx = Ctx::new(root, &out)?;
    let manifest = match recipe {
        Recipe::Tiny(arch) => build_tiny(&ctx, arch)?,
        Recipe::Debian(release, arch) => build_debian(&ctx, release, arch)?,
        Recipe::Runtime(lang) => build_runtime(&ctx, lang)?,
    };
    println!(
        "image {name} ({}) built in {:.1}s: {}",
        manifest.os_version,
        started.elapsed().as_secs_f64(),
        out.display()
    );
    for f in &manifest.files {
        println!("  {:<12} {:>10} bytes  sha256 {}", f.name, f.size, f.sha256);
    }
    Ok(())
}

/// The images this task knows how to build.
enum Recipe {
    /// Debian's kernel, busybox and the agent, entirely in an initramfs.
    Tiny(Arch),
    /// Debian (bookworm or trixie) with cloud-init on an ext4 disk.
    Debian(Release, Arch),
    /// A run-code runtime: bookworm's minbase and a language's packages on
    /// a read-only ext4 disk, the guest agent as the only service.
    Runtime(Runtime),
}

/// The run-code runtimes, each an image `run-LANGUAGE`.
#[derive(Clone, Copy, Debug)]
enum Runtime {
    Shell,
    Python,
    Node,
    Rust,
}

impl Runtime {
    fn language(self) -> &'static str {
        match self {
            Runtime::Shell => "shell",
            Runtime::Python => "python",
            Runtime::Node => "node",
            Runtime::Rust => "rust",
        }
    }

    /// Packages beyond minbase (which has bash and coreutils).
    fn packages(self) -> &'static [&'static str] {
        match self {
            Runtime::Shell => &[],
            Runtime::Python => &["python3-minimal", "libpython3.11-stdlib"],
            Runtime::Node => &["nodejs"],
            // rustc brings gcc and binutils for linking; no cargo: a run is
            // offline, so there are no crates to fetch (rustc follows `mod`).
            // (libc-dev is virtual: debootstrap needs the real package named.)
            Runtime::Rust => &["rustc", "libc6-dev"],
        }
    }

    /// How runs of it are carried out (shared with the control plane).
    fn table(self) -> &'static byteport_types::runtime::Runtime {
        byteport_types::runtime::runtime(self.language()).expect("every runtime is in the table")
    }

    /// Room for the image's files: minbase is about 200 MiB unpacked, rustc
    /// with gcc and LLVM about 700 MiB more.
    fn disk_bytes(self) -> u64 {
        match self {
            Runtime::Rust => 3 << 30,
            _ => 1 << 30,
        }
    }
}

impl Recipe {
    fn parse(name: &str) -> anyhow::Result<Recipe> {
        match name {
            "tiny" => Ok(Recipe::Tiny(Arch::X86_64)),
            "tiny-aarch64" => Ok(Recipe::Tiny(Arch::Aarch64)),
            "debian-12" => Ok(Recipe::Debian(Release::Bookworm, Arch::X86_64)),
            "debian-13" => Ok(Recipe::Debian(Release::Trixie, Arch::X86_64)),
            "debian-12-aarch64" => Ok(Recipe::Debian(Release::Bookworm, Arch::Aarch64)),
            "debian-13-aarch64" => Ok(Recipe::Debian(Release::Trixie, Arch::Aarch64)),
            "run-shell" => Ok(Recipe::Runtime(Runtime::Shell)),
            "run-python" => Ok(Recipe::Runtime(Runtime::Python)),
            "run-node" => Ok(Recipe::Runtime(Runtime::Node)),
            "run-rust" => Ok(Recipe::Runtime(Runtime::Rust)),
            other => bail!(
                "unknown image {other:?}; known images: tiny, tiny-aarch64, debian-12, debian-13, debian-12-aarch64, debian-13-aarch64, run-shell, run-python, run-node, run-rust"
            ),
        }
    }
}

/// A Debian release the `debian-N` recipes build.
#[derive(Clone, Copy, Debug)]
enum Release {
    Bookworm,
    Trixie,
}

impl Release {
    fn suite(self) -> &'static str {
        match self {
            Release::Bookworm => "bookworm",
            Release::Trixie => "trixie",
        }
    }

    /// `debian-12`, and `debian-12-aarch64` for another architecture.
    fn image_name(self, arch: Arch) -> String {
        let base = match self {
            Release::Bookworm => "debian-12",
            Release::Trixie => "debian-13",
        };
        match arch {
            Arch::X86_64 => base.to_string(),
            other => format!("{base}-{}", other.name()),
        }
    }
}

/// A guest architecture, as BytePort, Debian and Rust name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Arch {
    X86_64,
    Aarch64,
}

impl Arch {
    /// BytePort's name (and the kernel's, `uname -m`).
    fn name(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        }
    }

    /// Debian's name.
    fn deb(self) -> &'static str {
        match self {
            Arch::X86_64 => "amd64",
            Arch::Aarch64 => "arm64",
        }
    }

    fn rust_target(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64-unknown-linux-gnu",
            Arch::Aarch64 => "aarch64-unknown-linux-gnu",
        }
    }

    /// The ELF header's `e_machine`.
    fn elf_machine(self) -> u16 {
        match self {
            Arch::X86_64 => 62,
            Arch::Aarch64 => 183,
        }
    }

    /// The serial console QEMU's machine for it has: the PC's 16550 or
    /// the `virt` board's PL011.
    fn console(self) -> &'static str {
        match self {
            Arch::X86_64 => "ttyS0",
            Arch::Aarch64 => "ttyAMA0",
        }
    }
}

/// Paths shared by every recipe.
struct Ctx {
    root: PathBuf,
    out: PathBuf,
    debs: Debs,
    /// Scratch space, removed when the build ends.
    work: TempDir,
}

impl Ctx {
    fn new(root: &Path, out: &Path) -> anyhow::Result<Ctx> {
        let build = root.join("build");
        fs::create_dir_all(&build)?;
        // Build output never belongs in git.
        let ignore = build.join(".gitignore");
        if !ignore.exists() {
            fs::write(&ignore, "*\n")?;
        }
        fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        Ok(Ctx {
            root: root.to_path_buf(),
            out: out.to_path_buf(),
            debs: Debs::new(build.join("cache/debs"))?,
            work: TempDir::new(&build.join("tmp"))?,
        })
    }
}

/// The `tiny` recipe; see images/README.md.
fn build_tiny(ctx: &Ctx, arch: Arch) -> anyhow::Result<Manifest> {
    let recipe_dir = ctx.root.join("images/tiny");
    let kernel_pkg = ctx.debs.kernel_package(arch)?;
    let kernel_deb = ctx.debs.fetch_for(&kernel_pkg, arch)?;
    let busybox_deb = ctx.debs.fetch_for("busybox-static", arch)?;
    let agent = build_agent(&ctx.root, arch)?;

    let kernel_dir = ctx.work.path().join("kernel");
    let busybox_dir = ctx.work.path().join("busybox");
    extract_deb(&kernel_deb, &kernel_dir)?;
    extract_deb(&busybox_deb, &busybox_dir)?;
    let kver = kernel_version(&kernel_dir)?;
    let busybox_version = upstream_version(&deb_field(&busybox_deb, "Version")?);

    let mut cpio = Cpio::new();
    cpio.dir("dev", 0o755);
    // The kernel opens /dev/console before /init runs, ahead of devtmpfs.
    cpio.char_device("dev/console", 0o600, 5, 1);
    for dir in [
        "proc", "sys", "run", "tmp", "root", "mnt", "var/log", "sbin", "usr/bin", "usr/sbin",
    ] {
        cpio.dir(dir, if dir == "tmp" { 0o1777 } else { 0o755 });
    }
    add_busybox(&mut cpio, &busybox_dir)?;
    // /init's interpreter; the other applet links are made at boot.
    cpio.symlink("bin/sh", "busybox");
    cpio.file("sbin/byteport-guest", 0o755, fs::read(&agent)?);
    cpio.file("init", 0o755, fs::read(recipe_dir.join("init"))?);
    add_tree(&mut cpio, &recipe_dir.join("files"), "")?;

    let mut modules = read_list(&recipe_dir.join("modules"))?;
    let extra = recipe_dir.join(format!("modules-{}", arch.name()));
    if extra.exists() {
        modules.extend(read_list(&extra)?);
    }
    add_modules(&mut cpio, &kernel_dir, &kver, &modules)?;
    cpio.file(
        "etc/os-release",
        0o644,
        format!(
            "NAME=\"BytePort tiny\"\nID=byteport-tiny\nVERSION_ID={busybox_version}\n\
             PRETTY_NAME=\"BytePort tiny (busybox {busybox_version}, Linux {kver})\"\n"
        )
        .into_bytes(),
    );

    let (vmlinuz, initrd) = write_boot_files(ctx, cpio, &kernel_dir, &kver)?;

    let manifest = Manifest {
        name: match arch {
            Arch::X86_64 => "tiny".into(),
            other => format!("tiny-{}", other.name()),
        },
        arch,
        os_family: "linux".into(),
        os_version: busybox_version,
        kernel_version: kver,
        format: "initramfs".into(),
        boot: "kernel".into(),
        cmdline: format!("console={} quiet", arch.console()),
        has_agent: true,
        login_user: None,
        runtime: None,
        files: vec![file_entry(&vmlinuz)?, file_entry(&initrd)?],
    };
    write_manifest(&ctx.out, &manifest)?;
    Ok(manifest)
}

/// Adds busybox as `/bin/busybox`; /init makes the applet links.
fn add_busybox(cpio: &mut Cpio, busybox_dir: &Path) -> anyhow::Result<()> {
    cpio.file(
        "bin/busybox",
        0o755,
        fs::read(busybox_dir.join("bin/busybox")).context("busybox-static has no bin/busybox")?,
    );
    Ok(())
}

/// Writes the initramfs (gzip'd) and the kernel into the output
/// directory; returns their paths.
fn write_boot_files(
    ctx: &Ctx,
    cpio: Cpio,
    kernel_dir: &Path,
    kver: &str,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    let cpio_path = ctx.work.path().join("initrd.cpio");
    fs::write(&cpio_path, cpio.finish())?;
    let initrd = ctx.out.join("initrd.img");
    gzip(&cpio_path, &initrd)?;
    let vmlinuz = ctx.out.join("vmlinuz");
    fs::copy(kernel_dir.join(format!("boot/vmlinuz-{kver}")), &vmlinuz)
        .context("copying the kernel")?;
    Ok((vmlinuz, initrd))
}

/// Adds kernel modules to an initramfs, each at its usual place, and their
/// load order for its /init (`etc/modules.load`).
fn add_modules(
    cpio: &mut Cpio,
    kernel_dir: &Path,
    kver: &str,
    names: &[String],
) -> anyhow::Result<()> {
    let modules_dir = format!("lib/modules/{kver}");
    let index = index_modules(&kernel_dir.join(&modules_dir))?;
    // What one architecture's kernel builds as a module another's may
    // build in (arm64 has virtio and the button built in): nothing to load.
    let builtin: std::collections::HashSet<String> =
        fs::read_to_string(kernel_dir.join(&modules_dir).join("modules.builtin"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.rsplit('/').next()?.strip_suffix(".ko"))
            .map(|m| m.replace('-', "_"))
            .collect();
    let mut load = String::new();
    for name in names {
        if builtin.contains(&name.replace('-', "_")) {
            continue;
        }
        let rel = index
            .get(&name.replace('-', "_"))
            .with_context(|| format!("kernel {kver} has no module {name}"))?;
        let path = format!("{modules_dir}/{rel}");
        cpio.file(&path, 0o644, fs::read(kernel_dir.join(&path))?);
        load.push_str(&format!("/{path}\n"));
    }
    cpio.file("etc/modules.load", 0o644, load.into_bytes());
    Ok(())
}

/// The packages of the debian-12 image beyond debootstrap's minbase.
const DEBIAN_PACKAGES: &[&str] = &[
    "systemd-sysv",
    "udev",
    "dbus",
    "cloud-init",
    // Without it cloud-init's python3-cryptography fails to configure.
    "python3-cffi-backend",
    "ifupdown",
    "isc-dhcp-client",
    "openssh-server",
    "sudo",
    "iproute2",
    "ca-certificates",
    "wget",
    // The kernel runs modprobe for file systems (a NoCloud ISO seed).
    "kmod",
];

/// The disk's size; cloud-init grows the filesystem to the VM's disk.
const DEBIAN_DISK_BYTES: u64 = 2 << 30;

/// What a root-filesystem image boots with: Debian's kernel and busybox
/// unpacked in the work directory, and the static guest agent.
struct Unpacked {
    agent: PathBuf,
    kernel_dir: PathBuf,
    busybox_dir: PathBuf,
    kver: String,
}

fn unpack_boot_parts(ctx: &Ctx, arch: Arch) -> anyhow::Result<Unpacked> {
    let kernel_deb = ctx.debs.fetch_for(&ctx.debs.kernel_package(arch)?, arch)?;
    let busybox_deb = ctx.debs.fetch_for("busybox-static", arch)?;
    let agent = build_agent(&ctx.root, arch)?;
    let kernel_dir = ctx.work.path().join("kernel");
    let busybox_dir = ctx.work.path().join("busybox");
    extract_deb(&kernel_deb, &kernel_dir)?;
    extract_deb(&busybox_deb, &busybox_dir)?;
    let kver = kernel_version(&kernel_dir)?;
    Ok(Unpacked {
        agent,
        kernel_dir,
        busybox_dir,
        kver,
    })
}

/// The `debian-N` and `debian-N-ARCH` recipes; see images/README.md.
/// All boot bookworm's kernel of their architecture, which runs trixie's
/// userland as well; the root filesystem is the release's.
fn build_debian(ctx: &Ctx, release: Release, arch: Arch) -> anyhow::Result<Manifest> {
    let recipe_dir = ctx.root.join("images/debian");
    for tool in ["debootstrap", "mkfs.ext4", "depmod", "qemu-img"] {
        if crate::which(tool).is_none() {
            bail!("{tool} is missing: apt-get install debootstrap e2fsprogs kmod qemu-utils");
        }
    }
    let Unpacked {
        agent,
        kernel_dir,
        busybox_dir,
        kver,
    } = unpack_boot_parts(ctx, arch)?;

    // The modules the root filesystem gets, staged before the slow part.
    let modules_root = ctx.work.path().join("modules-root");
    let mut modules = read_list(&recipe_dir.join("modules"))?;
    let extra = recipe_dir.join(format!("modules-{}", arch.name()));
    if extra.exists() {
        modules.extend(read_list(&extra)?);
    }
    install_modules(&kernel_dir, &kver, &modules_root, &modules)?;

    // The root filesystem; debootstrap keeps the packages it fetched.
    let rootfs = ctx.work.path().join("rootfs");
    let cache = ctx.root.join("build/cache/debootstrap").join(match arch {
        Arch::X86_64 => release.suite().to_string(),
        other => format!("{}-{}", release.suite(), other.deb()),
    });
    fs::create_dir_all(&cache)?;
    let started = Instant::now();
    let foreign = arch != Arch::X86_64;
    let mut cmd = Command::new("debootstrap");
    cmd.arg("--variant=minbase")
        .arg(format!("--arch={}", arch.deb()))
        .arg(format!("--include={}", DEBIAN_PACKAGES.join(",")))
        .arg(format!("--cache-dir={}", cache.display()));
    if foreign {
        // Unpack only: the packages' scripts are the guest's programs.
        cmd.arg("--foreign");
    }
    crate::run(
        cmd.arg(release.suite())
            .arg(&rootfs)
            .arg(debian_mirror())
            .stdout(Stdio::null()),
    )
    .context("debootstrap (it needs root and Debian's package mirror)")?;
    if foreign {
        // The second stage runs the guest's own dpkg and maintainer
        // scripts, through qemu-user-static; it also reads the package
        // index with an emulated perl several times, over a minute each
        // on trixie's full one: cut it to the packages being installed.
        trim_package_index(&rootfs)?;
        let emulator = Binfmt::register(arch, &rootfs)?;
        crate::run(
            Command::new("chroot")
                .arg(&rootfs)
                .args(["/debootstrap/debootstrap", "--second-stage"])
                .env("LC_ALL", "C")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .stdout(Stdio::null()),
        )
        .context("debootstrap's second stage under qemu-user-static")?;
        drop(emulator);
    }
    eprintln!("debootstrap took {:.0} s", started.elapsed().as_secs_f64());
    copy_tree(&recipe_dir.join("files"), &rootfs)?;
    let sbin = rootfs.join("usr/local/sbin");
    fs::create_dir_all(&sbin)?;
    fs::copy(&agent, sbin.join("byteport-guest"))?;
    let wants = rootfs.join("etc/systemd/system/sysinit.target.wants");
    fs::create_dir_all(&wants)?;
    for unit in ["byteport-guest.service", "byteport-seed.service"] {
        std::os::unix::fs::symlink(format!("/etc/systemd/system/{unit}"), wants.join(unit))?;
    }
    // Debian's /lib is a link to /usr/lib.
    copy_tree(&modules_root.join("lib"), &rootfs.join("usr/lib"))?;
    // Every VM makes its own identity: machine id, SSH host keys (cloud-init
    // writes new ones), and fetches package lists itself.
    fs::write(rootfs.join("etc/machine-id"), "")?;
    fs::write(rootfs.join("etc/hostname"), "debian\n")?;
    for entry in fs::read_dir(rootfs.join("etc/ssh"))? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with("ssh_host_") {
            fs::remove_file(entry.path())?;
        }
    }
    for dir in ["var/cache/apt/archives", "var/lib/apt/lists"] {
        for entry in fs::read_dir(rootfs.join(dir))? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                fs::remove_file(entry.path())?;
            }
        }
    }
    let os_version = fs::read_to_string(rootfs.join("etc/debian_version"))?
        .trim()
        .to_string();

    let (disk, vmlinuz, initrd) = disk_and_initramfs(
        ctx,
        &rootfs,
        DEBIAN_DISK_BYTES,
        &recipe_dir,
        &kernel_dir,
        &busybox_dir,
        &kver,
    )?;

    let manifest = Manifest {
        name: release.image_name(arch),
        arch,
        os_family: "debian".into(),
        os_version,
        kernel_version: kver,
        format: "qcow2".into(),
        boot: "kernel".into(),
        // Classic NIC names: the first one is eth0 on every release, as the
        // network config says (trixie would name it ens3).
        cmdline: format!("console={} root=/dev/vda net.ifnames=0", arch.console()),
        has_agent: true,
        // cloud-init's default user in Debian's cloud.cfg.
        login_user: Some("debian".into()),
        runtime: None,
        files: vec![
            file_entry(&vmlinuz)?,
            file_entry(&initrd)?,
            file_entry(&disk)?,
        ],
    };
    write_manifest(&ctx.out, &manifest)?;
    Ok(manifest)
}

/// The `run-LANGUAGE` recipes; see images/README.md.
fn build_runtime(ctx: &Ctx, rt: Runtime) -> anyhow::Result<Manifest> {
    let recipe_dir = ctx.root.join("images/run");
    for tool in ["debootstrap", "mkfs.ext4", "qemu-img"] {
        if crate::which(tool).is_none() {
            bail!("{tool} is missing: apt-get install debootstrap e2fsprogs qemu-utils");
        }
    }
    let Unpacked {
        agent,
        kernel_dir,
        busybox_dir,
        kver,
    } = unpack_boot_parts(ctx, Arch::X86_64)?;

    let rootfs = ctx.work.path().join("rootfs");
    let cache = ctx.root.join("build/cache/debootstrap/bookworm");
    fs::create_dir_all(&cache)?;
    let started = Instant::now();
    let mut cmd = Command::new("debootstrap");
    cmd.arg("--variant=minbase");
    if !rt.packages().is_empty() {
        cmd.arg(format!("--include={}", rt.packages().join(",")));
    }
    crate::run(
        cmd.arg(format!("--cache-dir={}", cache.display()))
            .arg("bookworm")
            .arg(&rootfs)
            .arg(debian_mirror())
            .stdout(Stdio::null()),
    )
    .context("debootstrap (it needs root and Debian's package mirror)")?;
    eprintln!("debootstrap took {:.0} s", started.elapsed().as_secs_f64());
    copy_tree(&recipe_dir.join("files"), &rootfs)?;
    let sbin = rootfs.join("usr/local/sbin");
    fs::create_dir_all(&sbin)?;
    fs::copy(&agent, sbin.join("byteport-guest"))?;
    // What a runtime never needs: package caches and lists, documentation.
    for dir in [
        "var/cache/apt/archives",
        "var/lib/apt/lists",
        "usr/share/doc",
        "usr/share/man",
        "usr/share/locale",
        "usr/share/info",
    ] {
        let d = rootfs.join(dir);
        if d.is_dir() {
            fs::remove_dir_all(&d)?;
            fs::create_dir_all(&d)?;
        }
    }
    fs::write(rootfs.join("etc/machine-id"), "")?;
    fs::write(rootfs.join("etc/hostname"), "run\n")?;
    let os_version = fs::read_to_string(rootfs.join("etc/debian_version"))?
        .trim()
        .to_string();

    let (disk, vmlinuz, initrd) = disk_and_initramfs(
        ctx,
        &rootfs,
        rt.disk_bytes(),
        &recipe_dir,
        &kernel_dir,
        &busybox_dir,
        &kver,
    )?;
    let manifest = Manifest {
        name: format!("run-{}", rt.language()),
        arch: Arch::X86_64,
        os_family: "debian".into(),
        os_version,
        kernel_version: kver,
        format: "qcow2".into(),
        boot: "kernel".into(),
        cmdline: "console=ttyS0 root=/dev/vda ro quiet".into(),
        has_agent: true,
        login_user: None,
        runtime: Some(rt.table()),
        files: vec![
            file_entry(&vmlinuz)?,
            file_entry(&initrd)?,
            file_entry(&disk)?,
        ],
    };
    write_manifest(&ctx.out, &manifest)?;
    Ok(manifest)
}

/// The disk of a root-filesystem image (ext4 filled from `rootfs`, then
/// qcow2) and its initramfs (busybox, the recipe's `init` and its
/// `initrd-modules`); returns the disk, the kernel and the initrd.
fn disk_and_initramfs(
    ctx: &Ctx,
    rootfs: &Path,
    disk_bytes: u64,
    recipe_dir: &Path,
    kernel_dir: &Path,
    busybox_dir: &Path,
    kver: &str,
) -> anyhow::Result<(PathBuf, PathBuf, PathBuf)> {
    let raw = ctx.work.path().join("disk.raw");
    fs::File::create(&raw)?.set_len(disk_bytes)?;
    crate::run(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "root", "-d"])
            .arg(rootfs)
            .arg(&raw),
    )?;
    let disk = ctx.out.join("disk.qcow2");
    crate::run(
        Command::new("qemu-img")
            .args(["convert", "-O", "qcow2"])
            .arg(&raw)
            .arg(&disk),
    )?;
    let mut cpio = Cpio::new();
    cpio.dir("dev", 0o755);
    cpio.char_device("dev/console", 0o600, 5, 1);
    for dir in ["proc", "sys", "newroot", "sbin", "usr/bin", "usr/sbin"] {
        cpio.dir(dir, 0o755);
    }
    add_busybox(&mut cpio, busybox_dir)?;
    cpio.symlink("bin/sh", "busybox");
    cpio.file("init", 0o755, fs::read(recipe_dir.join("init"))?);
    add_modules(
        &mut cpio,
        kernel_dir,
        kver,
        &read_list(&recipe_dir.join("initrd-modules"))?,
    )?;
    let (vmlinuz, initrd) = write_boot_files(ctx, cpio, kernel_dir, kver)?;
    Ok((disk, vmlinuz, initrd))
}

/// The Debian mirror apt uses here (`BYTEPORT_DEBIAN_MIRROR` overrides).
fn debian_mirror() -> String {
    if let Ok(m) = std::env::var("BYTEPORT_DEBIAN_MIRROR") {
        return m;
    }
    let mut text = fs::read_to_string("/etc/apt/sources.list.d/debian.sources").unwrap_or_default();
    text.push_str(&fs::read_to_string("/etc/apt/sources.list").unwrap_or_default());
    text.split_whitespace()
        .find(|w| {
            (w.starts_with("http://") || w.starts_with("https://"))
                && w.trim_end_matches('/').ends_with("/debian")
        })
        .unwrap_or("http://deb.debian.org/debian")
        .to_string()
}

/// Copies a recipe's files over a root filesystem.
fn copy_tree(from: &Path, to: &Path) -> anyhow::Result<()> {
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let dest = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            fs::create_dir_all(&dest)?;
            copy_tree(&entry.path(), &dest)?;
        } else {
            fs::copy(entry.path(), &dest)
                .with_context(|| format!("copying to {}", dest.display()))?;
        }
    }
    Ok(())
}

/// Installs `names` and what they depend on (per the kernel's
/// `modules.dep`) under the root's /lib/modules, then runs depmod.
fn install_modules(
    kernel_dir: &Path,
    kver: &str,
    root: &Path,
    names: &[String],
) -> anyhow::Result<()> {
    let src = kernel_dir.join("lib/modules").join(kver);
    // The package leaves modules.dep to its postinst: make it here.
    crate::run(Command::new("depmod").arg("-b").arg(kernel_dir).arg(kver))?;
    let deps_text =
        fs::read_to_string(src.join("modules.dep")).context("the kernel's modules.dep")?;
    let deps: HashMap<&str, Vec<&str>> = deps_text
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(m, d)| (m, d.split_whitespace().collect()))
        .collect();
    let index = index_modules(&src)?;
    let mut todo: Vec<String> = Vec::new();
    for name in names {
        match index.get(&name.replace('-', "_")) {
            Some(rel) => todo.push(rel.clone()),
            // Built in (=y) in this kernel: nothing to install.
            None => eprintln!("module {name} is built into {kver}"),
        }
    }
    let dest = root.join("lib/modules").join(kver);
    let mut done = std::collections::HashSet::new();
    while let Some(rel) = todo.pop() {
        if !done.insert(rel.clone()) {
            continue;
        }
        let to = dest.join(&rel);
        fs::create_dir_all(to.parent().context("module path")?)?;
        fs::copy(src.join(&rel), &to)?;
        for d in deps.get(rel.as_str()).into_iter().flatten() {
            todo.push((*d).to_string());
        }
    }
    for f in [
        "modules.order",
        "modules.builtin",
        "modules.builtin.modinfo",
    ] {
        if src.join(f).exists() {
            fs::copy(src.join(f), dest.join(f))?;
        }
    }
    crate::run(Command::new("depmod").arg("-b").arg(root).arg(kver))
}

/// What `manifest.json` says about a built image.
struct Manifest {
    name: String,
    arch: Arch,
    os_family: String,
    os_version: String,
    kernel_version: String,
    format: String,
    boot: String,
    cmdline: String,
    has_agent: bool,
    /// The user an SSH key logs in as, when the image has one.
    login_user: Option<String>,
    /// A run-code runtime: its language and commands.
    runtime: Option<&'static byteport_types::runtime::Runtime>,
    /// The kernel first, then the initrd, then the disk (if any).
    files: Vec<FileEntry>,
}

struct FileEntry {
    name: String,
    size: u64,
    sha256: String,
}

fn file_entry(path: &Path) -> anyhow::Result<FileEntry> {
    Ok(FileEntry {
        name: path
            .file_name()
            .and_then(|n| n.to_str())
            .context("output file name")?
            .to_string(),
        size: fs::metadata(path)?.len(),
        sha256: sha256_file(path)?,
    })
}

fn write_manifest(out: &Path, m: &Manifest) -> anyhow::Result<()> {
    let files: serde_json::Map<String, serde_json::Value> = m
        .files
        .iter()
        .map(|f| {
            (
                f.name.clone(),
                serde_json::json!({ "size": f.size, "sha256": f.sha256 }),
            )
        })
        .collect();
    let json = serde_json::json!({
        "name": m.name,
        "os_family": m.os_family,
        "os_version": m.os_version,
        "kernel_version": m.kernel_version,
        "arch": m.arch.name(),
        "format": m.format,
        "boot": m.boot,
        "kernel": m.files.first().map(|f| &f.name),
        "initrd": m.files.get(1).map(|f| &f.name),
        "disk": m.files.get(2).map(|f| &f.name),
        "cmdline": m.cmdline,
        "has_agent": m.has_agent,
        "login_user": m.login_user,
        "agent_port": if m.has_agent { Some(AGENT_PORT_NAME) } else { None },
        "language": m.runtime.map(|r| r.language),
        "run_command": m.runtime.and_then(|r| r.code),
        "entry_command": m.runtime.map(|r| r.entry),
        "build_command": m.runtime.and_then(|r| r.build),
        "files": files,
    });
    let mut text = serde_json::to_string_pretty(&json)?;
    text.push('\n');
    fs::write(out.join("manifest.json"), text)?;
    Ok(())
}

/// Debian packages, downloaded once into a cache directory.
struct Debs {
    cache: PathBuf,
}

impl Debs {
    fn new(cache: PathBuf) -> anyhow::Result<Debs> {
        fs::create_dir_all(&cache)?;
        Ok(Debs { cache })
    }

    /// The versioned kernel package `linux-image-ARCH` points at now, or,
    /// without apt, the newest one already in the cache.
    fn kernel_package(&self, arch: Arch) -> anyhow::Result<String> {
        let meta = format!("linux-image-{}", arch.deb());
        let suffix = format!("-{}", arch.deb());
        let out = Command::new("apt-cache")
            .args(["depends", &format!("{meta}:{}", arch.deb())])
            .stderr(Stdio::inherit())
            .output();
        if let Ok(out) = out
            && out.status.success()
        {
            let text = String::from_utf8_lossy(&out.stdout);
            if let Some(pkg) = text
                .lines()
                .filter_map(|l| l.trim().strip_prefix("Depends: "))
                .map(|p| p.split_once(':').map_or(p, |(p, _)| p))
                .find(|p| p.starts_with("linux-image-") && p.ends_with(&suffix))
            {
                return Ok(pkg.to_string());
            }
        }
        let mut cached: Vec<String> = self
            .cached()?
            .into_iter()
            .filter(|f| f.ends_with(&format!("_{}.deb", arch.deb())))
            .filter_map(|f| f.split('_').next().map(str::to_string))
            .filter(|p| p.starts_with("linux-image-") && p.ends_with(&suffix))
            .collect();
        cached.sort_by(|a, b| natural_cmp(a, b));
        cached.pop().with_context(|| {
            let foreign = if arch == Arch::X86_64 {
                String::new()
            } else {
                format!("`dpkg --add-architecture {}`, then ", arch.deb())
            };
            format!("cannot resolve {meta} (run {foreign}`apt-get update`; needs a Debian host)")
        })
    }

    fn cached(&self) -> anyhow::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(&self.cache)? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if name.ends_with(".deb") {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    /// The .deb of `pkg` for `arch` (or for all architectures),
    /// downloading it if the cache has none.
    fn fetch_for(&self, pkg: &str, arch: Arch) -> anyhow::Result<PathBuf> {
        let find = || -> anyhow::Result<Option<PathBuf>> {
            let prefix = format!("{pkg}_");
            let ours = format!("_{}.deb", arch.deb());
            Ok(self
                .cached()?
                .into_iter()
                .filter(|n| {
                    n.starts_with(&prefix) && (n.ends_with(&ours) || n.ends_with("_all.deb"))
                })
                .max_by(|a, b| natural_cmp(a, b))
                .map(|n| self.cache.join(n)))
        };
        if let Some(deb) = find()? {
            return Ok(deb);
        }
        crate::run(
            Command::new("apt-get")
                .args(["download", &format!("{pkg}:{}", arch.deb())])
                .current_dir(&self.cache),
        )
        .with_context(|| {
            format!(
                "downloading {pkg}:{} (is `apt-get update` done?)",
                arch.deb()
            )
        })?;
        find()?.with_context(|| format!("apt-get download left no {pkg}_*_{}.deb", arch.deb()))
    }
}

fn extract_deb(deb: &Path, dir: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(dir)?;
    crate::run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(dir))
}

fn deb_field(deb: &Path, field: &str) -> anyhow::Result<String> {
    let out = Command::new("dpkg-deb")
        .arg("-f")
        .arg(deb)
        .arg(field)
        .output()
        .context("running dpkg-deb")?;
    if !out.status.success() {
        bail!("dpkg-deb -f {} {field} failed", deb.display());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// `1:1.35.0-4+deb12u1+b1` -> `1.35.0`.
fn upstream_version(debian: &str) -> String {
    let v = debian.split_once(':').map_or(debian, |(_, v)| v);
    v.rsplit_once('-').map_or(v, |(v, _)| v).to_string()
}

/// The one version under `lib/modules` of an unpacked kernel package.
fn kernel_version(dir: &Path) -> anyhow::Result<String> {
    let mut versions = Vec::new();
    for entry in fs::read_dir(dir.join("lib/modules")).context("kernel package layout")? {
        versions.push(entry?.file_name().to_string_lossy().into_owned());
    }
    match versions.as_slice() {
        [v] => Ok(v.clone()),
        _ => bail!("expected one kernel version, found {versions:?}"),
    }
}

/// Module name (with `_`) -> path under `lib/modules/VERSION`.
fn index_modules(dir: &Path) -> anyhow::Result<HashMap<String, String>> {
    let mut index = HashMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d)? {
            let entry = entry?;
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                stack.push(path);
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(stem) = name.strip_suffix(".ko") {
                let rel = path.strip_prefix(dir)?.to_string_lossy().into_owned();
                index.insert(stem.replace('-', "_"), rel);
            }
        }
    }
    Ok(index)
}

/// Non-empty, non-comment lines.
fn read_list(path: &Path) -> anyhow::Result<Vec<String>> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect())
}

/// Copies a recipe's file tree into the archive under `prefix`. Scripts
/// (files starting with `#!`) become executable whatever git kept of their mode.
fn add_tree(cpio: &mut Cpio, dir: &Path, prefix: &str) -> anyhow::Result<()> {
    let mut entries: Vec<_> = fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name().to_string_lossy().into_owned();
        let rel = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        let ty = entry.file_type()?;
        if ty.is_dir() {
            cpio.dir(&rel, 0o755);
            add_tree(cpio, &entry.path(), &rel)?;
        } else if ty.is_file() {
            let data = fs::read(entry.path())?;
            let exec =
                data.starts_with(b"#!") || entry.metadata()?.permissions().mode() & 0o111 != 0;
            cpio.file(&rel, if exec { 0o755 } else { 0o644 }, data);
        } else {
            bail!("{}: only files and directories", entry.path().display());
        }
    }
    Ok(())
}

/// The agent's release profile: small over fast, since it is copied into
/// every guest. A panic ends the process, and init starts a fresh one.
const AGENT_PROFILE: &[(&str, &str)] = &[
    ("CARGO_PROFILE_RELEASE_OPT_LEVEL", "s"),
    ("CARGO_PROFILE_RELEASE_LTO", "true"),
    ("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "1"),
    ("CARGO_PROFILE_RELEASE_PANIC", "abort"),
    (
        "RUSTFLAGS",
        "-C target-feature=+crt-static -C strip=symbols",
    ),
];

/// Builds the agent for `arch` as a static, stripped binary and returns
/// its path.
fn build_agent(root: &Path, arch: Arch) -> anyhow::Result<PathBuf> {
    let bin = match arch {
        Arch::X86_64 => build_agent_native(root)?,
        other => build_agent_cross(root, other)?,
    };
    let elf = fs::read(&bin).with_context(|| format!("reading {}", bin.display()))?;
    let machine = elf
        .get(0x12..0x14)
        .map(|b| u16::from_le_bytes([b[0], b[1]]));
    if machine != Some(arch.elf_machine()) {
        bail!("{} is not an {} executable", bin.display(), arch.name());
    }
    if has_interpreter(&elf)? {
        bail!(
            "{} is dynamically linked; it cannot run in the initramfs",
            bin.display()
        );
    }
    Ok(bin)
}

fn build_agent_native(root: &Path) -> anyhow::Result<PathBuf> {
    let target = Arch::X86_64.rust_target();
    let target_dir = root.join(AGENT_TARGET_DIR);
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root)
        .args([
            "build",
            "--release",
            "-p",
            "byteport-guest",
            "--bin",
            "byteport-guest",
        ])
        .args(["--target", target])
        .env("CARGO_TARGET_DIR", &target_dir)
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .envs(AGENT_PROFILE.iter().copied());
    crate::run(&mut cmd)?;
    Ok(target_dir.join(target).join("release/byteport-guest"))
}

/// Packages of the cross-building chroot: trixie's Rust with the standard
/// library of every architecture BytePort builds guests for, and their
/// C cross toolchains for linking.
const CROSS_PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev:arm64",
    "gcc-aarch64-linux-gnu",
    "libc6-dev-arm64-cross",
    "ca-certificates",
];

/// Builds the agent for another architecture. The host's Rust toolchain
/// has only the x86_64 standard library, and no other can be downloaded;
/// Debian's can: a trixie chroot (made once, kept in `build/cache`) has
/// `rustc-web` with the multi-arch `libstd-rust-web-dev:arm64` and the
/// aarch64 cross gcc. The workspace is bind-mounted into it, in a mount
/// namespace of the build's own, and the build runs there as on the host.
fn build_agent_cross(root: &Path, arch: Arch) -> anyhow::Result<PathBuf> {
    let chroot = root.join(CROSS_ROOT);
    let ready = chroot.join(".byteport-ready");
    if !ready.exists() {
        for tool in ["debootstrap", "unshare", "chroot"] {
            if crate::which(tool).is_none() {
                bail!("{tool} is missing: apt-get install debootstrap util-linux coreutils");
            }
        }
        let started = Instant::now();
        let _ = fs::remove_dir_all(&chroot);
        crate::run(
            Command::new("debootstrap")
                .arg("--variant=minbase")
                .arg("trixie")
                .arg(&chroot)
                .arg(debian_mirror())
                .stdout(Stdio::null()),
        )
        .context("debootstrap of the cross-building chroot (it needs root and Debian's mirror)")?;
        fs::copy("/etc/resolv.conf", chroot.join("etc/resolv.conf")).ok();
        let in_chroot = |args: &[&str]| {
            crate::run(
                Command::new("chroot")
                    .arg(&chroot)
                    .args(args)
                    .env("DEBIAN_FRONTEND", "noninteractive")
                    .stdout(Stdio::null()),
            )
        };
        in_chroot(&["dpkg", "--add-architecture", "arm64"])?;
        in_chroot(&["apt-get", "update", "-q"])?;
        let mut install = vec!["apt-get", "install", "-y", "-q", "--no-install-recommends"];
        install.extend_from_slice(CROSS_PACKAGES);
        in_chroot(&install)?;
        fs::write(&ready, "")?;
        eprintln!(
            "cross-building chroot made in {:.0} s",
            started.elapsed().as_secs_f64()
        );
    }
    // The host's CA bundle, for crates.io behind this host's proxy, if any.
    fs::copy(
        "/etc/ssl/certs/ca-certificates.crt",
        chroot.join("etc/ssl/certs/host-ca.crt"),
    )
    .ok();
    fs::create_dir_all(chroot.join("src"))?;
    let target = arch.rust_target();
    let linker_var = format!(
        "CARGO_TARGET_{}_LINKER",
        target.to_uppercase().replace('-', "_")
    );
    let linker = format!("{}-linux-gnu-gcc", arch.name());
    let target_dir = format!("target/guest-{}", arch.name());
    let mut cmd = Command::new("unshare");
    // Positional arguments, not text in the script: the paths are ours,
    // and the shell only sequences the mount and the chroot.
    cmd.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(r#"mount --bind "$1" "$2/src" && root=$2 && shift 2 && exec chroot "$root" sh -c 'cd /src && exec "$@"' sh "$@""#)
        .arg("sh")
        .arg(root)
        .arg(&chroot)
        .args(["cargo", "build"])
        .args(["-j2", "--release", "-p", "byteport-guest", "--bin", "byteport-guest"])
        .args(["--target", target])
        .env_clear()
        .env("PATH", "/usr/bin:/bin:/usr/sbin:/sbin")
        .env("HOME", "/root")
        .env("CARGO_HOME", "/src/build/cache/cargo-cross")
        .env("CARGO_TARGET_DIR", format!("/src/{target_dir}"))
        .env("CARGO_HTTP_CAINFO", "/etc/ssl/certs/host-ca.crt")
        .env(linker_var, linker)
        .envs(AGENT_PROFILE.iter().copied());
    for proxy in [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "http_proxy",
        "https_proxy",
        "NO_PROXY",
        "no_proxy",
    ] {
        if let Some(v) = std::env::var_os(proxy) {
            cmd.env(proxy, v);
        }
    }
    crate::run(&mut cmd).context("cross-building the agent in the trixie chroot")?;
    Ok(root
        .join(target_dir)
        .join(target)
        .join("release/byteport-guest"))
}

/// Whether an ELF64 little-endian file asks for a dynamic loader (PT_INTERP).
fn has_interpreter(elf: &[u8]) -> anyhow::Result<bool> {
    let u16_at = |o: usize| Some(u16::from_le_bytes(elf.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(elf.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(elf.get(o..o + 8)?.try_into().ok()?));
    if !elf.starts_with(b"\x7fELF\x02\x01") {
        bail!("not a little-endian ELF64 file");
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        bail!("truncated ELF header");
    };
    for i in 0..usize::from(phnum) {
        let off = phoff as usize + i * usize::from(phentsize);
        const PT_INTERP: u32 = 3;
        if u32_at(off).context("truncated program header")? == PT_INTERP {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Cuts the package index a first-stage debootstrap left in `rootfs` to
/// the stanzas of the packages it unpacked (`debootstrap/debpaths`): all
/// the second stage looks up. The image drops the lists afterwards anyway.
fn trim_package_index(rootfs: &Path) -> anyhow::Result<()> {
    let debpaths = fs::read_to_string(rootfs.join("debootstrap/debpaths"))
        .context("the first stage left no debootstrap/debpaths")?;
    let wanted: std::collections::HashSet<&str> = debpaths
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let lists = rootfs.join("var/lib/apt/lists");
    for entry in fs::read_dir(&lists)? {
        let path = entry?.path();
        if !path.to_string_lossy().ends_with("_Packages") {
            continue;
        }
        let text = fs::read_to_string(&path)?;
        let before = text.len();
        let kept: Vec<&str> = text
            .split("\n\n")
            .filter(|stanza| {
                stanza
                    .lines()
                    .find_map(|l| l.strip_prefix("Package: "))
                    .is_some_and(|p| wanted.contains(p.trim()))
            })
            .collect();
        let mut out = kept.join("\n\n");
        out.push_str("\n\n");
        fs::write(&path, &out)?;
        eprintln!(
            "package index cut to {} packages ({} of {} bytes)",
            kept.len(),
            out.len(),
            before
        );
    }
    Ok(())
}

/// The kernel's binfmt_misc entry that runs `arch`'s programs with
/// qemu-user-static, for a foreign chroot. Registered from the package's
/// own `/usr/lib/binfmt.d` line when the host has none, and removed again
/// on drop, with the mount if this made it: the host is left as it was.
struct Binfmt {
    entry: Option<PathBuf>,
    mounted: bool,
    /// The emulator copied into the chroot for an entry without the `F`
    /// flag (its interpreter is then looked up inside the chroot).
    copied: Option<PathBuf>,
}

const BINFMT_DIR: &str = "/proc/sys/fs/binfmt_misc";

impl Binfmt {
    fn register(arch: Arch, chroot: &Path) -> anyhow::Result<Binfmt> {
        let dir = Path::new(BINFMT_DIR);
        let mut b = Binfmt {
            entry: None,
            mounted: false,
            copied: None,
        };
        if !dir.join("register").exists() {
            crate::run(
                Command::new("mount")
                    .args(["-t", "binfmt_misc", "binfmt_misc"])
                    .arg(dir),
            )
            .context("mounting binfmt_misc (foreign images need it, and root)")?;
            b.mounted = true;
        }
        let name = format!("qemu-{}", arch.name());
        let entry = dir.join(&name);
        match fs::read_to_string(&entry) {
            Ok(text) if text.lines().next() == Some("enabled") => {
                let flags = text
                    .lines()
                    .find_map(|l| l.strip_prefix("flags: "))
                    .unwrap_or("");
                if !flags.contains('F') {
                    let interp = text
                        .lines()
                        .find_map(|l| l.strip_prefix("interpreter "))
                        .context("binfmt_misc entry without an interpreter")?;
                    let inside = chroot.join(interp.trim_start_matches('/'));
                    fs::create_dir_all(inside.parent().context("interpreter path")?)?;
                    fs::copy(fs::canonicalize(interp)?, &inside)
                        .with_context(|| format!("copying {interp} into the chroot"))?;
                    b.copied = Some(inside);
                }
            }
            _ => {
                let conf = format!("/usr/lib/binfmt.d/{name}.conf");
                let line = fs::read_to_string(&conf).with_context(|| {
                    format!("{conf} is missing: apt-get install qemu-user-static")
                })?;
                fs::write(dir.join("register"), line.trim())
                    .with_context(|| format!("registering {name} with binfmt_misc"))?;
                b.entry = Some(entry);
            }
        }
        Ok(b)
    }
}

impl Drop for Binfmt {
    fn drop(&mut self) {
        if let Some(copied) = &self.copied {
            let _ = fs::remove_file(copied);
        }
        if let Some(entry) = &self.entry {
            let _ = fs::write(entry, "-1");
        }
        if self.mounted {
            let _ = Command::new("umount").arg(BINFMT_DIR).status();
        }
    }
}

fn gzip(src: &Path, dst: &Path) -> anyhow::Result<()> {
    let out = fs::File::create(dst)?;
    crate::run(
        Command::new("gzip")
            .args(["-9", "-n", "-c"])
            .arg(src)
            .stdout(out),
    )
    .context("compressing the initramfs")
}

/// Orders `6.1.0-9` before `6.1.0-10`: digit runs compare as numbers.
fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn chunks(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        let bytes = s.as_bytes();
        for i in 1..=bytes.len() {
            if i == bytes.len() || bytes[i].is_ascii_digit() != bytes[start].is_ascii_digit() {
                out.push((bytes[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        out
    }
    let (ca, cb) = (chunks(a), chunks(b));
    for (x, y) in ca.iter().zip(&cb) {
        let ord = match (x, y) {
            ((true, x), (true, y)) => x
                .trim_start_matches('0')
                .len()
                .cmp(&y.trim_start_matches('0').len())
                .then_with(|| x.trim_start_matches('0').cmp(y.trim_start_matches('0'))),
            ((_, x), (_, y)) => x.cmp(y),
        };
        if ord.is_ne() {
            return ord;
        }
    }
    ca.len().cmp(&cb.len())
}

/// A scratch directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(parent: &Path) -> anyhow::Result<TempDir> {
        let dir = parent.join(format!("image-{}", std::process::id()));
        if dir.exists() {
            fs::remove_dir_all(&dir)?;
        }
        fs::create_dir_all(&dir)?;
        Ok(TempDir(dir))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A newc ("070701") cpio archive, the format the kernel unpacks into its
/// initial rootfs. Entries are sorted and carry no timestamps or owners, so
/// the same inputs give the same bytes. Parent directories are added as needed.
struct Cpio {
    entries: BTreeMap<String, Entry>,
}

struct Entry {
    mode: u32,
    rdev: (u32, u32),
    data: Vec<u8>,
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

impl Cpio {
    fn new() -> Cpio {
        Cpio {
            entries: BTreeMap::new(),
        }
    }

    fn add(&mut self, path: &str, mode: u32, rdev: (u32, u32), data: Vec<u8>) {
        let path = path.trim_matches('/');
        let mut parent = Path::new(path).parent();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            self.entries
                .entry(p.to_string_lossy().into_owned())
                .or_insert(Entry {
                    mode: S_IFDIR | 0o755,
                    rdev: (0, 0),
                    data: Vec::new(),
                });
            parent = p.parent();
        }
        self.entries
            .insert(path.to_string(), Entry { mode, rdev, data });
    }

    fn dir(&mut self, path: &str, perm: u32) {
        self.add(path, S_IFDIR | perm, (0, 0), Vec::new());
    }

    fn file(&mut self, path: &str, perm: u32, data: Vec<u8>) {
        self.add(path, S_IFREG | perm, (0, 0), data);
    }

    fn symlink(&mut self, path: &str, target: &str) {
        self.add(path, S_IFLNK | 0o777, (0, 0), target.as_bytes().to_vec());
    }

    fn char_device(&mut self, path: &str, perm: u32, major: u32, minor: u32) {
        self.add(path, S_IFCHR | perm, (major, minor), Vec::new());
    }

    /// The archive bytes. BTreeMap order puts every directory before its contents.
    fn finish(self) -> Vec<u8> {
        let mut out = Vec::new();
        for (ino, (path, e)) in (1..).zip(&self.entries) {
            let nlink = if e.mode & S_IFDIR == S_IFDIR { 2 } else { 1 };
            Cpio::entry(&mut out, ino, path, e.mode, nlink, e.rdev, &e.data);
        }
        Cpio::entry(&mut out, 0, "TRAILER!!!", 0, 1, (0, 0), &[]);
        out
    }

    fn entry(
        out: &mut Vec<u8>,
        ino: u32,
        name: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) {
        let fields = [
            ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            data.len() as u32,
            0, // dev major
            0, // dev minor
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0, // check
        ];
        out.extend_from_slice(b"070701");
        for f in fields {
            out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        pad4(out);
        out.extend_from_slice(data);
        pad4(out);
    }
}

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let mut f = fs::File::open(path)?;
    let mut h = <sha2::Sha256 as sha2::Digest>::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        sha2::Digest::update(&mut h, &buf[..n]);
    }
    Ok(sha2::Digest::finalize(h)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// The images the real-guest tests boot, in two lanes that build side by
/// side. Within a lane the order matters: `tiny-aarch64` makes the
/// cross-building chroot the other aarch64 images reuse, and `debian-12`
/// and the runtimes share bookworm's debootstrap cache; across lanes no
/// cache is shared.
const TEST_IMAGE_LANES: [&[&str]; 2] = [
    &["tiny-aarch64", "debian-12-aarch64", "debian-13-aarch64"],
    &[
        "tiny",
        "debian-12",
        "debian-13",
        "run-shell",
        "run-python",
        "run-node",
        "run-rust",
    ],
];

/// Builds, in the background, each test image that `build/images` lacks:
/// every build is this program's `image build NAME` with its output in
/// `build/logs/image-NAME.log`, one line said per image, the log's tail
/// when one fails. Join the handle before the tests run.
pub fn build_test_images(root: &Path) -> std::thread::JoinHandle<anyhow::Result<()>> {
    let root = root.to_path_buf();
    std::thread::spawn(move || {
        let lanes: Vec<_> = TEST_IMAGE_LANES
            .iter()
            .map(|lane| {
                let root = root.clone();
                std::thread::spawn(move || -> anyhow::Result<()> {
                    for name in lane.iter() {
                        build_logged(&root, name)?;
                    }
                    Ok(())
                })
            })
            .collect();
        let mut failed = Vec::new();
        for lane in lanes {
            match lane.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failed.push(format!("{e:#}")),
                Err(_) => failed.push("an image build panicked".to_owned()),
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            bail!("{}", failed.join("; "))
        }
    })
}

fn build_logged(root: &Path, name: &str) -> anyhow::Result<()> {
    if root
        .join("build/images")
        .join(name)
        .join("manifest.json")
        .exists()
    {
        return Ok(());
    }
    let logs = root.join("build/logs");
    fs::create_dir_all(&logs)?;
    let log_path = logs.join(format!("image-{name}.log"));
    let log = fs::File::create(&log_path)?;
    let started = Instant::now();
    eprintln!(
        "building the {name} guest image (log: {})",
        log_path.display()
    );
    let st = Command::new(std::env::current_exe()?)
        .args(["image", "build", name])
        .current_dir(root)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()
        .with_context(|| format!("running the {name} image build"))?;
    if st.success() {
        eprintln!(
            "the {name} guest image is built ({:.0} s)",
            started.elapsed().as_secs_f64()
        );
        return Ok(());
    }
    let text = fs::read_to_string(&log_path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = &lines[lines.len().saturating_sub(40)..];
    eprintln!("the {name} image build failed ({st}); the end of its log:");
    for l in tail {
        eprintln!("  | {l}");
    }
    bail!(
        "building the {name} guest image failed: {}",
        log_path.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_newc_layout() {
        let mut c = Cpio::new();
        c.file("etc/x", 0o644, b"hi".to_vec());
        let bytes = c.finish();
        // The parent directory comes first, then the file, then the trailer.
        assert!(bytes.starts_with(b"070701"));
        let text = String::from_utf8_lossy(&bytes);
        let etc = text.find("etc\0").unwrap();
        let x = text.find("etc/x\0").unwrap();
        let trailer = text.find("TRAILER!!!\0").unwrap();
        assert!(etc < x && x < trailer);
        assert_eq!(bytes.len() % 4, 0);
        // Header of etc/x: mode 0100644, size 2, name length 6.
        let hdr = &text[x - 110..x];
        assert_eq!(&hdr[14..22], "000081a4");
        assert_eq!(&hdr[54..62], "00000002");
        assert_eq!(&hdr[94..102], "00000006");
    }

    #[test]
    fn versions() {
        assert_eq!(upstream_version("1:1.35.0-4+deb12u1+b1"), "1.35.0");
        assert_eq!(upstream_version("6.1.192-2"), "6.1.192");
        assert!(natural_cmp("linux-image-6.1.0-9-amd64", "linux-image-6.1.0-10-amd64").is_lt());
        assert!(natural_cmp("a-2", "a-2").is_eq());
    }
}
