//! `byteport`: the BytePort command-line client.

mod client;
mod commands;
mod config;
mod import;
mod progress;
mod table;
mod vm_io;

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;

use byteport_types::VmState;
use byteport_types::api::Role;

#[derive(Parser, Debug)]
#[command(name = "byteport", version, about = "The BytePort command-line client")]
pub struct Cli {
    /// How to print results: aligned tables or the server's JSON.
    #[arg(long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// The control plane's URL; overrides the one stored by `login`.
    #[arg(long, global = true, env = "BYTEPORT_URL")]
    pub url: Option<String>,
    /// A PEM bundle of the CA that signed the server's certificate (the
    /// system's trust store is used too); `login` remembers it.
    #[arg(long, global = true, env = "BYTEPORT_CA_CERT")]
    pub ca_cert: Option<std::path::PathBuf>,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Log in (with --url) and store a personal API token in the config file.
    Login {
        #[arg(long)]
        user: String,
        /// Read the password from standard input.
        #[arg(long, required = true)]
        password_stdin: bool,
    },
    /// Create the first admin with the server's one-time token, then log in.
    Bootstrap {
        /// The one-time bootstrap token the server printed at first start.
        #[arg(long)]
        token: String,
        #[arg(long)]
        user: String,
        /// Read the password from standard input.
        #[arg(long, required = true)]
        password_stdin: bool,
    },
    /// Make an account (with an invite link, or where the server allows
    /// self-registration), then log in.
    Signup {
        #[arg(long)]
        user: String,
        /// The invite link (or its `bpi_...` secret) you were sent.
        #[arg(long)]
        invite: Option<String>,
        /// Read the password from standard input.
        #[arg(long, required = true)]
        password_stdin: bool,
    },
    /// Revoke the stored token and remove the config file.
    Logout,
    /// Show who you are and your project memberships.
    Whoami,
    /// Manage projects, their quotas and members.
    #[command(subcommand)]
    Project(ProjectCmd),
    /// Manage users (admins).
    #[command(subcommand)]
    User(UserCmd),
    /// Invite links that let people sign up (admins; owners to their project).
    #[command(subcommand)]
    Invite(InviteCmd),
    /// Server-wide settings, such as self-registration (admins).
    #[command(subcommand)]
    Settings(SettingsCmd),
    /// Manage your personal API tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Manage flavors (instance types).
    #[command(subcommand)]
    Flavor(FlavorCmd),
    /// Manage the image catalog.
    #[command(subcommand)]
    Image(ImageCmd),
    /// Manage virtual machines.
    Vm(VmArgs),
    /// Groups of VMs, one per matching image, to run a command on all.
    Env(EnvArgs),
    /// Run a program in a fresh VM of its own: `byteport run main.py`,
    /// `byteport run --language shell -e 'echo hi'`; `run list|show|cancel`.
    Run(RunArgs),
    /// Show nodes (admins).
    #[command(subcommand)]
    Node(NodeCmd),
    /// Print a shell completion script: `byteport completion bash >
    /// /etc/bash_completion.d/byteport` (zsh: a file named `_byteport` on
    /// `$fpath`; fish: `~/.config/fish/completions/byteport.fish`).
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write man pages (byteport.1 and one per command) into DIR.
    Man {
        #[arg(default_value = ".")]
        dir: std::path::PathBuf,
    },
    /// Show the audit log, newest first.
    Audit {
        /// Only this project's events (required unless admin).
        #[arg(long)]
        project: Option<String>,
        #[arg(long)]
        limit: Option<u32>,
    },
}

#[derive(Subcommand, Debug)]
pub enum ProjectCmd {
    /// List your projects (every project for admins).
    List,
    /// Show a project with its quota and usage.
    Show { project: String },
    /// Create a project (admins).
    Create {
        name: String,
        #[arg(long)]
        description: Option<String>,
        /// The first owner; you when absent.
        #[arg(long)]
        owner: Option<String>,
    },
    /// Delete an empty project (admins).
    Delete { project: String },
    /// Change a project's quota; limits not given stay as they are.
    Quota {
        project: String,
        #[arg(long)]
        vms: Option<u32>,
        #[arg(long)]
        vcpus: Option<u32>,
        #[arg(long)]
        memory_mib: Option<u64>,
        #[arg(long)]
        disk_gib: Option<u64>,
        /// Runs (run-code) at once.
        #[arg(long)]
        runs: Option<u32>,
    },
    /// List a project's members.
    Members { project: String },
    /// Add a member or change their role.
    AddMember {
        project: String,
        user: String,
        #[arg(long, default_value = "member")]
        role: Role,
    },
    /// Remove a member.
    RemoveMember { project: String, user: String },
}

#[derive(Subcommand, Debug)]
pub enum UserCmd {
    /// List users.
    List,
    /// Create a user; the password is read from standard input.
    Create {
        name: String,
        #[arg(long)]
        admin: bool,
        #[arg(long, required = true)]
        password_stdin: bool,
    },
    /// Show a user by name or id.
    Show { user: String },
    /// Delete a user with their tokens and memberships.
    Delete { user: String },
}

#[derive(Subcommand, Debug)]
pub enum InviteCmd {
    /// Make a single-use link; it is printed once.
    Create {
        /// The project the new user joins.
        #[arg(long)]
        project: Option<String>,
        /// Their role there: viewer, member (the default) or owner.
        #[arg(long)]
        role: Option<Role>,
        /// How long the link works, in hours (1-720; a week by default).
        #[arg(long)]
        expires_in_hours: Option<u32>,
    },
    /// List invites, newest first.
    List,
    /// Revoke an invite by id: its link stops working.
    Revoke { id: String },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Toggle {
    On,
    Off,
}

#[derive(Subcommand, Debug)]
pub enum SettingsCmd {
    /// Show the server-wide settings.
    Show,
    /// Change them; what is not given stays.
    Set {
        /// Whether anyone who reaches the server may sign up.
        #[arg(long, value_enum)]
        self_registration: Option<Toggle>,
    },
}

#[derive(Subcommand, Debug)]
pub enum TokenCmd {
    /// List your tokens (never their secrets).
    List,
    /// Create a token; its secret is printed once.
    Create {
        name: String,
        #[arg(long)]
        expires_in_days: Option<u32>,
    },
    /// Revoke a token by id.
    Revoke { id: String },
}

#[derive(Subcommand, Debug)]
pub enum FlavorCmd {
    /// List flavors.
    List,
    /// Add a flavor (admins).
    Create {
        name: String,
        #[arg(long)]
        vcpus: u32,
        #[arg(long)]
        memory_mib: u64,
        #[arg(long)]
        disk_gib: u64,
    },
    /// Remove a flavor (admins).
    Delete { name: String },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Boot {
    Disk,
    Kernel,
}

// Parsed once per run: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum ImageCmd {
    /// List images.
    List,
    /// Show an image.
    Show { name: String },
    /// Register an image in the catalog (admins).
    Create {
        name: String,
        #[arg(long)]
        os_family: String,
        #[arg(long)]
        os_version: String,
        #[arg(long)]
        arch: Option<String>,
        /// qcow2, raw or initramfs.
        #[arg(long)]
        format: String,
        #[arg(long)]
        size_bytes: u64,
        #[arg(long)]
        sha256: String,
        #[arg(long, value_enum)]
        boot: Option<Boot>,
        #[arg(long)]
        kernel_sha256: Option<String>,
        #[arg(long)]
        initrd_sha256: Option<String>,
        #[arg(long)]
        cmdline: Option<String>,
        /// The guest agent is installed in the image.
        #[arg(long)]
        has_agent: bool,
    },
    /// Register an image and upload its files (admins); safe to repeat.
    ///
    /// Hashes each file locally, registers the image and streams each file
    /// to the server, which checks it against the sha256. With --manifest
    /// (a `manifest.json` from `cargo xtask image build`) every field comes
    /// from the manifest, its file names relative to its directory; flags
    /// and arguments given here override it.
    ///
    /// Examples:
    ///   byteport image import tiny initrd.img --kernel vmlinuz --format initramfs
    ///       --os-family linux --os-version 1.36 --cmdline "console=ttyS0" --has-agent
    ///   byteport image import debian-12 debian-12.qcow2 --format qcow2
    ///       --os-family debian --os-version 12
    ///   byteport image import --manifest build/images/tiny/manifest.json
    #[command(verbatim_doc_comment)]
    Import(ImportArgs),
    /// Remove an image no VM uses (admins).
    Delete { name: String },
}

/// An image file's format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ImageFormat {
    Qcow2,
    Raw,
    /// Kernel-booted, no disk: FILE is the initramfs.
    Initramfs,
}

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// The image's name (from the manifest when absent).
    #[arg(required_unless_present = "manifest")]
    pub name: Option<String>,
    /// The disk (qcow2, raw) or the initramfs (initramfs).
    #[arg(required_unless_present = "manifest")]
    pub file: Option<PathBuf>,
    /// A manifest.json that describes the image and names its files.
    #[arg(long)]
    pub manifest: Option<PathBuf>,
    /// The kernel, for kernel-booted images.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// An initrd to boot a qcow2/raw disk's kernel with.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// The OS family, such as linux or debian.
    #[arg(long)]
    pub os_family: Option<String>,
    /// The OS's version, such as 12.
    #[arg(long)]
    pub os_version: Option<String>,
    /// x86_64 when absent.
    #[arg(long)]
    pub arch: Option<String>,
    #[arg(long, value_enum)]
    pub format: Option<ImageFormat>,
    /// `kernel` for initramfs images or when --kernel is given, else `disk`.
    #[arg(long, value_enum)]
    pub boot: Option<Boot>,
    /// The kernel command line, for kernel-booted images.
    #[arg(long)]
    pub cmdline: Option<String>,
    /// The guest agent is installed in the image (--has-agent=false to
    /// override a manifest).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub has_agent: Option<bool>,
    /// The user an SSH key logs in as in this image (cloud-init's default
    /// user, such as debian).
    #[arg(long)]
    pub login_user: Option<String>,
}

#[derive(Args, Debug)]
pub struct VmArgs {
    /// The project (name or id): the filter for `list` and name lookups,
    /// the target for `create` (`default` when absent).
    #[arg(long, global = true)]
    pub project: Option<String>,
    #[command(subcommand)]
    pub cmd: VmCmd,
}

#[derive(Args, Debug)]
pub struct EnvArgs {
    /// The project (name or id) to create in or look names up in
    /// (`default` when absent).
    #[arg(long, global = true)]
    pub project: Option<String>,
    #[command(subcommand)]
    pub cmd: EnvCmd,
}

/// Parses a lifetime: seconds, or a number with s, m, h or d.
fn parse_lifetime(s: &str) -> Result<u64, String> {
    let (n, unit) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = n
        .parse()
        .map_err(|_| format!("expected a lifetime such as 90s, 30m, 2h or 1d, got {s:?}"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("unknown unit {unit:?} in {s:?}; use s, m, h or d")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too long"))
}

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct RunArgs {
    #[command(subcommand)]
    pub cmd: Option<RunCmd>,
    /// The program: a source file (its extension names the language), or
    /// a directory whose files are sent with --entry to run.
    pub file: Option<PathBuf>,
    /// The program itself, instead of a file.
    #[arg(short = 'e', long = "eval")]
    pub eval: Option<String>,
    /// shell, python, node or rust (from the file's extension when absent).
    #[arg(long)]
    pub language: Option<String>,
    /// With a directory: the file to run (rust: to compile); the
    /// language's main file (main.py, main.rs or src/main.rs, ...) when
    /// absent.
    #[arg(long)]
    pub entry: Option<String>,
    /// Compiled languages: build with optimisations.
    #[arg(long)]
    pub release: bool,
    /// Run what a Cloudlet config.toml describes (its format unchanged).
    #[arg(long, value_name = "CONFIG_TOML", conflicts_with_all = ["file", "eval", "language"])]
    pub config: Option<PathBuf>,
    /// The project (default: default).
    #[arg(long)]
    pub project: Option<String>,
    /// Seconds before the run is killed, the build included (1-600; 30,
    /// rust 120).
    #[arg(long)]
    pub timeout: Option<u64>,
    /// The run's memory (128-4096 MiB; 256, rust 1024).
    #[arg(long)]
    pub memory_mib: Option<u64>,
    /// Pass this command's standard input to the program.
    #[arg(long)]
    pub stdin: bool,
    /// Arguments for the program (after --).
    #[arg(last = true)]
    pub args: Vec<String>,
}

#[derive(Subcommand, Debug)]
pub enum RunCmd {
    /// List runs, newest first.
    List {
        #[arg(long)]
        language: Option<String>,
        #[arg(long)]
        state: Option<String>,
    },
    /// Show a run with its timings and kept output.
    Show { id: String },
    /// Cancel a running run.
    Cancel { id: String },
}

#[derive(Subcommand, Debug)]
pub enum EnvCmd {
    /// Create an environment: one VM per image whose name starts with one
    /// of the prefixes (--wait: until every VM runs).
    Add {
        name: String,
        /// Image-name prefixes, comma-separated (debian,alpine).
        #[arg(long, value_delimiter = ',', required = true)]
        os_prefix: Vec<String>,
        /// Only images of these architectures, comma-separated
        /// (x86_64,aarch64): one VM per (image, architecture) that exists.
        #[arg(long, value_delimiter = ',')]
        arch: Vec<String>,
        /// VMs of each image (1-50), named ENV-IMAGE-N.
        #[arg(long)]
        dup_each: Option<u32>,
        /// The engine of every VM: qemu (the default) or microvm.
        #[arg(long)]
        engine: Option<String>,
        #[arg(long)]
        flavor: Option<String>,
        #[arg(long)]
        vcpus: Option<u32>,
        #[arg(long)]
        memory_mib: Option<u64>,
        #[arg(long)]
        disk_gib: Option<u64>,
        /// A cloud-init user-data file for every VM.
        #[arg(long)]
        user_data: Option<PathBuf>,
        /// A file of SSH public keys, one per line (repeatable).
        #[arg(long)]
        ssh_key: Vec<PathBuf>,
        /// Delete it after this long (90s, 30m, 2h, 1d).
        #[arg(long, value_parser = parse_lifetime)]
        lifetime: Option<u64>,
        /// Guest TCP ports every VM maps from host ports, comma-separated
        /// or repeated (22 always is).
        #[arg(long = "port", value_delimiter = ',')]
        ports: Vec<u16>,
        /// No outbound connections from the VMs (DHCP, DNS, metadata and
        /// the project's VMs stay reachable).
        #[arg(long)]
        no_egress: bool,
        /// Wait until every VM is running.
        #[arg(long)]
        wait: bool,
        /// Seconds to wait with --wait.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
    /// Change an environment: its lifetime, VMs to drop, and every VM's
    /// ports and outbound policy (a running VM takes those when it next
    /// starts: `env stop`, then `env start`). Checked whole first: an
    /// error changes nothing.
    Update {
        env: String,
        /// A new lifetime from now (90s, 30m, 2h, 1d).
        #[arg(long, value_parser = parse_lifetime, conflicts_with = "no_expiry")]
        lifetime: Option<u64>,
        /// Never delete it by itself.
        #[arg(long)]
        no_expiry: bool,
        /// Delete these VMs, by name or id (comma-separated).
        #[arg(long, value_delimiter = ',')]
        remove_vm: Vec<String>,
        /// Delete the VMs whose image name starts with one of these.
        #[arg(long, value_delimiter = ',')]
        remove_os_prefix: Vec<String>,
        /// Delete the VMs that stopped answering (in error, or on a node
        /// that went silent).
        #[arg(long)]
        remove_unresponsive: bool,
        /// The guest ports every VM maps, comma-separated (replaces the
        /// old ones; 22 always is).
        #[arg(long = "port", value_delimiter = ',', conflicts_with = "no_ports")]
        ports: Vec<u16>,
        /// No mapped port but 22.
        #[arg(long)]
        no_ports: bool,
        /// Outbound connections: allow or deny.
        #[arg(long)]
        egress: Option<String>,
    },
    /// List environments.
    List,
    /// Show an environment and its VMs.
    Show { env: String },
    /// Run a command on every VM at once, each line of output printed as
    /// it comes, prefixed with its VM's name (with --json: every VM's
    /// output and exit code at the end, as one JSON).
    ///
    /// Exits 0 when it exited 0 on every VM, 1 otherwise.
    Run {
        env: String,
        /// Kill the command after this many seconds (default 300).
        #[arg(long)]
        timeout: Option<u64>,
        /// Only VMs whose image name starts with one of these (comma-separated).
        #[arg(long)]
        os_prefix: Option<String>,
        /// Only these VMs, by name or id (comma-separated).
        #[arg(long)]
        vm: Option<String>,
        /// A local script to run on every VM: sent as the standard input
        /// of `/bin/sh -s`, with the arguments after `--` as its `$1...`.
        #[arg(long)]
        script: Option<std::path::PathBuf>,
        /// The program and its arguments, after `--`; no shell.
        #[arg(last = true, required_unless_present = "script")]
        argv: Vec<String>,
    },
    /// Copy a local file to every VM of an environment (to DEST, by
    /// default /tmp/ and the file's name; a DEST ending in / is a directory), checked by sha256 in each
    /// guest. At most 64 MiB.
    Push {
        env: String,
        file: std::path::PathBuf,
        dest: Option<String>,
        /// Only VMs whose image name starts with one of these (comma-separated).
        #[arg(long)]
        os_prefix: Option<String>,
        /// Only these VMs, by name or id (comma-separated).
        #[arg(long)]
        vm: Option<String>,
    },
    /// Copy a file from every VM of an environment, each saved as
    /// DIR/VM-NAME/FILE-NAME and checked by sha256.
    Get {
        env: String,
        /// The absolute path in the guests.
        path: String,
        /// Where the copies go (default: the current directory).
        #[arg(long, default_value = ".")]
        dir: std::path::PathBuf,
        /// Only VMs whose image name starts with one of these (comma-separated).
        #[arg(long)]
        os_prefix: Option<String>,
        /// Only these VMs, by name or id (comma-separated).
        #[arg(long)]
        vm: Option<String>,
    },
    /// Stop every VM of an environment, disks kept (--wait: until all
    /// are stopped).
    Stop {
        env: String,
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
    /// Start every VM of an environment again (--wait: until all run).
    Start {
        env: String,
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value_t = 180)]
        timeout: u64,
    },
    /// Delete an environment and all its VMs (--wait: until they are gone).
    Del {
        env: String,
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
}

/// Parses `key=value`.
fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("expected key=value, got {s:?}")),
    }
}

#[derive(Args, Debug)]
pub struct ActionArgs {
    /// The VM's name or id.
    pub vm: String,
    /// Wait until the VM reaches the action's target state.
    #[arg(long)]
    pub wait: bool,
    /// Seconds to wait with --wait.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
}

// Parsed once per run: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum VmCmd {
    /// Create a VM; it is `pending` until the scheduler places it on a node (--wait: until running).
    Create {
        name: String,
        /// The image, or ENGINE:IMAGE (microvm:tiny) to pick the engine too.
        #[arg(long)]
        image: String,
        /// The hypervisor engine: qemu (the default) or microvm (x86_64
        /// images that boot a kernel; no firmware, faster to boot).
        #[arg(long)]
        engine: Option<String>,
        #[arg(long)]
        flavor: Option<String>,
        #[arg(long)]
        vcpus: Option<u32>,
        #[arg(long)]
        memory_mib: Option<u64>,
        #[arg(long)]
        disk_gib: Option<u64>,
        /// A cloud-init user-data file.
        #[arg(long)]
        user_data: Option<PathBuf>,
        /// A file of SSH public keys, one per line (repeatable).
        #[arg(long)]
        ssh_key: Vec<PathBuf>,
        /// A label key=value (repeatable).
        #[arg(long, value_parser = parse_label)]
        label: Vec<(String, String)>,
        #[arg(long)]
        hostname: Option<String>,
        /// Never on a node that holds another VM of this group (anti-affinity).
        #[arg(long)]
        group: Option<String>,
        /// Only nodes in this region.
        #[arg(long)]
        region: Option<String>,
        /// spread or pack, instead of the server's policy.
        #[arg(long)]
        policy: Option<String>,
        /// A guest TCP port to map from a host port (repeatable; 22 always is).
        #[arg(long = "port")]
        ports: Vec<u16>,
        /// No outbound connections from the guest (DHCP, DNS, metadata and
        /// its project's VMs stay reachable).
        #[arg(long)]
        no_egress: bool,
        /// Wait until the VM is running.
        #[arg(long)]
        wait: bool,
        /// Seconds to wait with --wait.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// List VMs.
    List {
        #[arg(long)]
        state: Option<VmState>,
        /// key=value: only VMs with this label.
        #[arg(long)]
        label: Option<String>,
        #[arg(long)]
        name: Option<String>,
        /// Page size (1-500).
        #[arg(long)]
        limit: Option<u32>,
        /// Follow the pages to the end.
        #[arg(long)]
        all: bool,
    },
    /// Show a VM by name or id.
    Show { vm: String },
    /// A running VM's figures as its node measures them: CPU, resident
    /// memory, the disk space it takes on the host.
    Stats { vm: String },
    /// Start a stopped VM (--wait: until running).
    Start(ActionArgs),
    /// Stop a VM (--wait: until stopped).
    Stop(ActionArgs),
    /// Restart a running VM (--wait: until running).
    Restart(ActionArgs),
    /// Pause a running VM (--wait: until paused).
    Pause(ActionArgs),
    /// Resume a paused VM (--wait: until running).
    Resume(ActionArgs),
    /// Delete a VM (--wait: until deleted).
    Delete(ActionArgs),
    /// Wait until a VM reaches a state, or until cloud-init has finished.
    ///
    /// With --cloud-init, waits for the guest's cloud-init to end (as its
    /// guest agent reports it) and exits non-zero if it ended with errors.
    Wait {
        vm: String,
        #[arg(long, required_unless_present = "cloud_init")]
        state: Option<VmState>,
        /// Wait for cloud-init in the guest to finish.
        #[arg(long, conflicts_with = "state")]
        cloud_init: bool,
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Run a command in a running VM through its guest agent.
    ///
    /// The command's output streams to this terminal as it comes, and
    /// `byteport` exits with the command's exit status (128+N when a
    /// signal N ended it). The command runs without a shell; with --stdin
    /// all of standard input is read first and sent with the command.
    /// With --output json the server's NDJSON events are printed as they
    /// come instead.
    ///
    /// Examples:
    ///   byteport vm exec web-1 -- uname -a
    ///   byteport vm exec web-1 --env LANG=C --cwd /tmp -- ls -l
    ///   echo hello | byteport vm exec web-1 --stdin -- cat
    #[command(verbatim_doc_comment)]
    Exec(ExecArgs),
    /// Copy a file into or out of a running VM through its guest agent,
    /// checked by sha256; one side is VM:PATH (an absolute path).
    ///
    /// Examples:
    ///   byteport vm cp build.tar web-1:/tmp/
    ///   byteport vm cp web-1:/var/log/syslog .
    #[command(verbatim_doc_comment)]
    Cp { src: String, dst: String },
    /// Show a VM's serial console: the end of its log, or live with --follow.
    ///
    /// With --follow, the console's output streams here and what you type
    /// is sent to the guest; Ctrl-] leaves. When standard input is a
    /// terminal it is put in raw mode with `stty` (keys go through one by
    /// one, Ctrl-C included); if that is not possible input is sent a line
    /// at a time, and Ctrl-] takes effect after Enter. An https:// server
    /// is followed over wss://.
    ///
    /// Examples:
    ///   byteport vm console web-1 --bytes 4096
    ///   byteport vm console web-1 --follow
    #[command(verbatim_doc_comment)]
    Console {
        /// The VM's name or id.
        vm: String,
        /// How many bytes of the log's end (server default 16384, at most 1048576).
        #[arg(long, conflicts_with = "follow")]
        bytes: Option<u64>,
        /// Attach to the live console; Ctrl-] leaves.
        #[arg(long)]
        follow: bool,
    },
}

#[derive(Args, Debug)]
pub struct ExecArgs {
    /// The VM's name or id.
    pub vm: String,
    /// An environment variable K=V for the command (repeatable).
    #[arg(long, value_parser = parse_label)]
    pub env: Vec<(String, String)>,
    /// The working directory in the guest.
    #[arg(long)]
    pub cwd: Option<String>,
    /// Seconds before the command is killed (server default 300, at most 3600).
    #[arg(long)]
    pub timeout: Option<u64>,
    /// Send all of standard input to the command.
    #[arg(long)]
    pub stdin: bool,
    /// The program and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub argv: Vec<String>,
}

#[derive(Subcommand, Debug)]
pub enum NodeCmd {
    /// List nodes with their capacity and usage.
    List,
    /// Show a node by id or name.
    Show { id: String },
    /// Stop placing new VMs on a node.
    Cordon { id: String },
    /// Place new VMs on a node again.
    Uncordon { id: String },
    /// Cordon a node and stop its VMs (their disks stay on it).
    Drain { id: String },
    /// Remove a node that holds no VM.
    Remove { id: String },
    /// Make an orphan (a VM the node holds that the control plane does not
    /// know, shown by `node show`) a stopped VM again.
    Adopt {
        node: String,
        /// The orphan's id.
        vm: String,
        /// The project to adopt it into; the one it was made in when absent.
        #[arg(long)]
        project: Option<String>,
        /// A new name, when its own is taken.
        #[arg(long)]
        name: Option<String>,
    },
    /// Delete an orphan and its disk on its node.
    RemoveOrphan {
        node: String,
        /// The orphan's id.
        vm: String,
    },
    /// Create a single-use token that lets a new host join as a node.
    JoinToken {
        /// The token's lifetime (server default 60, at most 10080).
        #[arg(long)]
        expires_in_minutes: Option<u32>,
    },
}

/// A reader that closed the pipe (`byteport vm list | head -1`) ends the
/// command quietly with status 0, as it does for other tools: printing
/// panics on a closed standard output, so the panic is caught here.
fn quiet_on_closed_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.starts_with("failed printing to std") && msg.contains("Broken pipe") {
            std::process::exit(0);
        }
        default(info);
    }));
}

/// byteport.1, and byteport-vm.1, byteport-vm-create.1 ... for every
/// command; returns how many.
fn write_man_pages(dir: &std::path::Path) -> anyhow::Result<usize> {
    use anyhow::Context;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    fn walk(cmd: &clap::Command, name: &str, dir: &std::path::Path) -> anyhow::Result<usize> {
        let page = cmd.clone().name(name.to_owned());
        let mut out = Vec::new();
        clap_mangen::Man::new(page).render(&mut out)?;
        let path = dir.join(format!("{name}.1"));
        std::fs::write(&path, out).with_context(|| format!("writing {}", path.display()))?;
        let mut n = 1;
        for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
            n += walk(sub, &format!("{name}-{}", sub.get_name()), dir)?;
        }
        Ok(n)
    }
    let mut cmd = <Cli as clap::CommandFactory>::command();
    cmd.build();
    walk(&cmd, "byteport", dir)
}

fn main() -> ExitCode {
    quiet_on_closed_pipe();
    let cli = Cli::parse();
    match &cli.cmd {
        Cmd::Completion { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(*shell, &mut cmd, "byteport", &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
        Cmd::Man { dir } => {
            return match write_man_pages(dir) {
                Ok(n) => {
                    println!("wrote {n} man pages to {}", dir.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        _ => {}
    }
    let logging_in = matches!(cli.cmd, Cmd::Login { .. } | Cmd::Bootstrap { .. });
    if let Err(e) = commands::run(cli) {
        let closed_pipe = e.chain().any(|c| {
            c.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
        });
        if closed_pipe {
            return ExitCode::SUCCESS;
        }
        // A command's own exit status (from `vm exec`), already reported.
        if let Some(commands::Exit(code)) = e.downcast_ref::<commands::Exit>() {
            return ExitCode::from(*code);
        }
        let msg = match e.downcast_ref::<client::ApiError>() {
            Some(api) => api.message.clone(),
            None => format!("{e:#}"),
        };
        eprintln!("error: {msg}");
        if !logging_in
            && e.downcast_ref::<client::ApiError>()
                .is_some_and(|a| a.code == "unauthorized")
        {
            eprintln!("hint: run `byteport login --url URL --user NAME --password-stdin`");
        }
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }
}
