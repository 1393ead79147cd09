//! Request and response bodies of the public API (`/v1`) and of the node
//! protocol. Inputs deny unknown fields so a typo is an error, not a no-op.

use crate::ids::*;
use crate::name::Name;
use crate::vm_state::{DesiredState, ObservedState, VmAction, VmState};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::{IntoParams, ToSchema};

/// The error body every failing request returns.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// A stable, machine-readable code such as `not_found` or `quota_exceeded`.
    pub code: String,
    /// A sentence for humans.
    pub message: String,
}

/// A page of results; pass `next_cursor` back as `cursor` for the next one.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// Absent on the last page.
    pub next_cursor: Option<String>,
}

// ---------- auth ----------

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    pub name: String,
    pub password: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefreshRequest {
    pub refresh_token: String,
}

/// Tokens issued at login or refresh. The same login also sets the
/// HTTP-only session cookie that the web console uses.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct LoginResponse {
    /// A JWT for `Authorization: Bearer`.
    pub access_token: String,
    pub token_type: String,
    /// Seconds until `access_token` expires.
    pub expires_in: u64,
    /// Exchange at `/v1/auth/refresh` for a new pair; single use.
    pub refresh_token: String,
    pub user: User,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BootstrapRequest {
    /// The one-time token that `byteportd server` printed at first start.
    pub token: String,
    pub name: Name,
    pub password: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Whoami {
    pub user: User,
    pub memberships: Vec<Membership>,
}

// ---------- users and tokens ----------

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct User {
    pub id: UserId,
    pub name: Name,
    pub admin: bool,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UserCreate {
    pub name: Name,
    /// At least 8 characters.
    pub password: String,
    #[serde(default)]
    pub admin: bool,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenCreate {
    pub name: Name,
    /// Lifetime in days (1-3650); no expiry when absent.
    pub expires_in_days: Option<u32>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ApiToken {
    pub id: TokenId,
    pub name: Name,
    /// The first characters of the secret, to recognise it.
    pub prefix: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
}

/// A new token: `secret` is shown this once and stored only as a hash.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ApiTokenCreated {
    pub token: ApiToken,
    pub secret: String,
}

// ---------- sign-up and invites ----------

/// Sign up: with an invite link's secret, or without one when the server
/// allows self-registration. Answers as a login does (and sets the
/// session cookie), so the new user is logged in at once.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignupRequest {
    pub name: Name,
    /// At least 8 characters.
    pub password: String,
    /// The secret of an invite link (`bpi_...`).
    #[serde(default)]
    pub invite: Option<String>,
}

/// What the registration form needs before it is shown.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SignupInfo {
    /// Whether anyone who reaches the server may make an account.
    pub self_registration: bool,
    /// The invite asked about, when it can still be used.
    pub invite: Option<InvitePreview>,
}

#[derive(Debug, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct SignupQuery {
    /// An invite link's secret, to learn what it gives.
    pub invite: Option<String>,
}

/// What an invite gives, shown to whoever holds its link.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct InvitePreview {
    pub project: Option<Name>,
    pub role: Option<Role>,
    pub created_by: String,
    pub expires_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InviteCreate {
    /// The project the new user joins (its owners may invite to it).
    pub project: Option<Name>,
    /// Their role there; `member` when a project is named.
    pub role: Option<Role>,
    /// Lifetime in hours (1-720); 168 (a week) when absent.
    pub expires_in_hours: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum InviteState {
    /// Can still be used.
    Pending,
    Used,
    Expired,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Invite {
    pub id: InviteId,
    pub state: InviteState,
    pub project: Option<Name>,
    pub project_id: Option<ProjectId>,
    pub role: Option<Role>,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub used_at: Option<DateTime<Utc>>,
    pub used_by: Option<UserId>,
}

/// A new invite: `secret` and `link` are shown this once; the server keeps
/// only a hash.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct InviteCreated {
    pub invite: Invite,
    pub secret: String,
    /// The web console's registration form with the secret in it.
    pub link: String,
}

/// Server-wide settings that admins change at run time (kept in the
/// database, so every replica sees them).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ServerSettings {
    /// Whether anyone who reaches the server may sign up (off by
    /// default). New accounts join no project until an owner adds them.
    pub self_registration: bool,
}

/// A change to [`ServerSettings`]: absent fields stay as they are.
#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ServerSettingsUpdate {
    pub self_registration: Option<bool>,
}

// ---------- projects ----------

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Viewer,
    Member,
    Owner,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Viewer => "viewer",
            Role::Member => "member",
            Role::Owner => "owner",
        })
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "viewer" => Ok(Role::Viewer),
            "member" => Ok(Role::Member),
            "owner" => Ok(Role::Owner),
            _ => Err(format!("unknown role {s:?}; use viewer, member or owner")),
        }
    }
}

/// Limits of a project. Creating or resizing beyond one is a 403.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    pub max_vms: u32,
    pub max_vcpus: u32,
    pub max_memory_mib: u64,
    pub max_disk_gib: u64,
    /// Runs (run-code) at once; 4 when absent.
    #[serde(default = "default_max_concurrent_runs")]
    pub max_concurrent_runs: u32,
}

fn default_max_concurrent_runs() -> u32 {
    4
}

impl Default for Quota {
    fn default() -> Self {
        Quota {
            max_vms: 20,
            max_vcpus: 40,
            max_memory_mib: 64 * 1024,
            max_disk_gib: 1024,
            max_concurrent_runs: default_max_concurrent_runs(),
        }
    }
}

/// What a project's VMs (all but deleted ones) hold against its quota.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Usage {
    pub vms: u32,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Project {
    pub id: ProjectId,
    pub name: Name,
    pub description: String,
    pub quota: Quota,
    pub usage: Usage,
    /// The addresses its VMs get on bridged nodes (the same /24 on every
    /// node); absent for a project made before networks were planned and
    /// not yet given one.
    pub network_cidr: Option<String>,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProjectCreate {
    pub name: Name,
    #[serde(default)]
    pub description: String,
    pub quota: Option<Quota>,
    /// The first owner; the caller when absent.
    pub owner: Option<Name>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Membership {
    pub project: Name,
    pub project_id: ProjectId,
    pub role: Role,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Member {
    pub user: Name,
    pub user_id: UserId,
    pub role: Role,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MemberSet {
    pub role: Role,
}

// ---------- flavors and images ----------

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Flavor {
    pub id: FlavorId,
    pub name: Name,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FlavorCreate {
    pub name: Name,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
}

/// How an image boots.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BootMode {
    /// The disk carries its own bootloader.
    Disk,
    /// The node passes `kernel` and `initrd` to the hypervisor directly.
    Kernel,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Image {
    pub id: ImageId,
    pub name: Name,
    pub os_family: String,
    pub os_version: String,
    pub arch: String,
    /// `qcow2` or `raw` (the disk) or `initramfs` (kernel-booted, no disk).
    pub format: String,
    pub size_bytes: u64,
    /// Of the disk (or initramfs) file; nodes verify it after download.
    pub sha256: String,
    pub boot: BootMode,
    pub kernel_sha256: Option<String>,
    pub initrd_sha256: Option<String>,
    pub cmdline: Option<String>,
    /// Whether the guest agent is installed in the image.
    pub has_agent: bool,
    /// The user an SSH key logs in as (cloud-init's default user); absent
    /// for an image without an SSH login.
    pub login_user: Option<String>,
    /// `registered` until its files are uploaded, then `available`.
    pub status: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImageCreate {
    pub name: Name,
    pub os_family: String,
    pub os_version: String,
    #[serde(default = "default_arch")]
    pub arch: String,
    pub format: String,
    pub size_bytes: u64,
    pub sha256: String,
    #[serde(default = "default_boot")]
    pub boot: BootMode,
    pub kernel_sha256: Option<String>,
    pub initrd_sha256: Option<String>,
    pub cmdline: Option<String>,
    #[serde(default)]
    pub has_agent: bool,
    /// The user an SSH key logs in as, such as `debian`.
    #[serde(default)]
    pub login_user: Option<String>,
}

fn default_arch() -> String {
    "x86_64".into()
}

fn default_boot() -> BootMode {
    BootMode::Disk
}

// ---------- VMs ----------

/// Where a guest port is reachable on the node's host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PortForward {
    pub guest_port: u16,
    pub host_port: u16,
    pub host: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Vm {
    pub id: VmId,
    pub name: Name,
    pub project: Name,
    pub project_id: ProjectId,
    pub image: Name,
    /// The guest's architecture (its image's).
    pub arch: String,
    /// How its node runs it (native or emulated), once it was started.
    pub execution: Option<Execution>,
    /// The hypervisor engine it runs under.
    pub engine: Engine,
    pub flavor: Option<Name>,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
    pub hostname: String,
    pub labels: BTreeMap<String, String>,
    pub ssh_keys: Vec<String>,
    /// Who the SSH keys log in as: the image's login user; `null` when the
    /// image names none (it has no SSH login: use exec or the console).
    pub ssh_user: Option<String>,
    pub has_user_data: bool,
    /// The public state, derived from `desired_state` and the node's reports.
    pub state: VmState,
    /// Why the VM is in `error` or still `pending`.
    pub state_reason: Option<String>,
    pub desired_state: DesiredState,
    pub desired_generation: u64,
    pub observed_state: Option<ObservedState>,
    pub observed_generation: u64,
    pub node_id: Option<NodeId>,
    /// The port maps from the node's host ports to the guest's.
    pub ports: Vec<PortForward>,
    /// Guest ports asked to be opened (22 always is).
    pub guest_ports: Vec<u16>,
    /// Its outbound policy.
    pub egress: Egress,
    /// Its network and addresses, as its node reported them.
    pub network: VmNetwork,
    /// What `running` means for this VM: `agent` (the guest agent said
    /// ready) or `process` (the image has no agent: the hypervisor is up).
    pub ready_by: ReadyBy,
    /// The guest agent's version, once it said ready.
    pub agent_version: Option<String>,
    /// What the guest reported of cloud-init (through the guest agent),
    /// once it has reported anything.
    pub cloud_init: Option<CloudInit>,
    /// The placement wishes it was created with.
    pub placement: Placement,
    /// The environment it was made for, if any.
    pub environment_id: Option<EnvironmentId>,
    /// Each lifecycle action, and whether the state machine allows it now.
    pub actions: Vec<VmActionCheck>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Where cloud-init is in a guest, as its guest agent reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CloudInit {
    /// The agent is up and cloud-init has not finished yet.
    Running,
    /// cloud-init finished every stage without errors.
    Done,
    /// cloud-init finished with errors (`cloud-init status --long` in the
    /// guest tells which).
    Error,
    /// The image has no cloud-init, or it is disabled.
    Absent,
}

impl CloudInit {
    pub fn as_str(self) -> &'static str {
        match self {
            CloudInit::Running => "running",
            CloudInit::Done => "done",
            CloudInit::Error => "error",
            CloudInit::Absent => "absent",
        }
    }

    pub fn parse(s: &str) -> Option<CloudInit> {
        [
            CloudInit::Running,
            CloudInit::Done,
            CloudInit::Error,
            CloudInit::Absent,
        ]
        .into_iter()
        .find(|c| c.as_str() == s)
    }

    /// Whether cloud-init will not change any more in this boot.
    pub fn is_final(self) -> bool {
        self != CloudInit::Running
    }
}

/// Whether a lifecycle action is allowed on a VM right now.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct VmActionCheck {
    pub action: VmAction,
    pub allowed: bool,
    /// Why not: the message of the 409 the action would get.
    pub reason: Option<String>,
}

/// What `running` waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReadyBy {
    Agent,
    Process,
}

/// A command to run in a VM through its guest agent.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// The program and its arguments; passed as is, never through a shell.
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
    /// Standard input, base64; closed after it is written.
    pub stdin_base64: Option<String>,
    /// At most 3600; 300 when absent. The command is killed after it.
    pub timeout_secs: Option<u64>,
}

/// One line of an exec's `application/x-ndjson` response.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ExecEvent {
    /// Base64 of bytes the command wrote to standard output.
    Stdout(String),
    /// Base64 of bytes the command wrote to standard error.
    Stderr(String),
    /// The command ended.
    Exit {
        code: Option<i32>,
        signal: Option<i32>,
    },
    /// The command could not run, or the agent went away.
    Error(String),
}

// ---------- runs ----------

/// Run a program in a fresh VM of its own (`POST /v1/runs`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunCreate {
    /// The project's name or id; `default` when absent.
    pub project: Option<String>,
    /// `shell`, `python`, `node` or `rust` (the runtime image `run-LANGUAGE`).
    pub language: String,
    /// The program as one source text, at most 65536 bytes of UTF-8; or
    /// give `files` instead.
    pub code: Option<String>,
    /// The program as files (at most 64, 262144 bytes together), written
    /// under the run's directory `/run/code`.
    #[serde(default)]
    pub files: Vec<RunFile>,
    /// The file of `files` to run (rust: to compile); the language's main
    /// file (`main.py`, `main.rs`, ...) when absent.
    pub entry: Option<String>,
    /// Arguments the program gets.
    #[serde(default)]
    pub args: Vec<String>,
    /// Standard input, text, at most 524288 bytes.
    pub stdin: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Wall-clock limit, 1-600 s, the build included; 30 when absent (rust
    /// 120).
    pub timeout_secs: Option<u64>,
    /// 1-4; 1 when absent.
    pub vcpus: Option<u32>,
    /// 128-4096 MiB; the language's default when absent (256, rust 1024).
    pub memory_mib: Option<u64>,
    /// Compiled languages: build with optimisations (`rustc -O`); false
    /// when absent.
    #[serde(default)]
    pub release: bool,
}

/// One file of a run's program.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunFile {
    /// Relative to the run's directory: `src/main.rs`; no `..`, no
    /// leading `/`, at most 255 bytes.
    pub path: String,
    /// Its text (UTF-8).
    pub content: String,
}

/// How a run stands or ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Running,
    /// The program exited (see `exit_code` and `signal`).
    Exited,
    /// It ran past `timeout_secs` and was killed.
    Timeout,
    /// It used more than the run's memory and was killed.
    OutOfMemory,
    /// It wrote more than the output limit and was killed.
    OutputLimit,
    /// `DELETE /v1/runs/{id}`, or the client went away.
    Cancelled,
    /// The run could not be carried out (see `message`).
    Failed,
}

impl RunState {
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Exited => "exited",
            RunState::Timeout => "timeout",
            RunState::OutOfMemory => "out_of_memory",
            RunState::OutputLimit => "output_limit",
            RunState::Cancelled => "cancelled",
            RunState::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<RunState> {
        [
            RunState::Running,
            RunState::Exited,
            RunState::Timeout,
            RunState::OutOfMemory,
            RunState::OutputLimit,
            RunState::Cancelled,
            RunState::Failed,
        ]
        .into_iter()
        .find(|r| r.as_str() == s)
    }
}

/// When the steps of a run happened, in milliseconds after the request.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RunTimings {
    /// The request was taken by a node.
    pub queued_ms: u64,
    /// Building the runtime's template, when this run had to wait for it.
    pub template_build_ms: Option<u64>,
    /// The run's VM was up, its guest agent ready.
    pub vm_ready_ms: Option<u64>,
    /// How long compiling took (rust); the run's time is the rest.
    #[serde(default)]
    pub build_ms: Option<u64>,
    /// The first byte of output.
    pub first_output_ms: Option<u64>,
    /// The end.
    pub end_ms: Option<u64>,
    /// Whether the VM was a clone of a template (else a cold boot).
    pub from_template: Option<bool>,
    /// Whether that clone was restored before the run came (the node's pool).
    #[serde(default)]
    pub from_pool: Option<bool>,
}

/// A run: who ran what, how it ended, and its output up to the kept cap.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Run {
    pub id: RunId,
    pub project: Name,
    pub project_id: ProjectId,
    /// Who asked for it.
    pub user: String,
    pub language: String,
    /// SHA-256 of the code, hex.
    pub code_sha256: String,
    pub state: RunState,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    /// Why it failed or what limit ended it.
    pub message: Option<String>,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub timeout_secs: u64,
    pub node_id: Option<NodeId>,
    pub timings: RunTimings,
    /// Standard output and error as they came, up to 1 MiB each (UTF-8,
    /// invalid bytes replaced).
    pub stdout: String,
    pub stderr: String,
    /// Whether either was cut at the kept cap.
    pub output_truncated: bool,
    pub created_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
}

/// One line of `POST /v1/runs`'s `application/x-ndjson` answer: first
/// `run` (the record as it starts), then output chunks in order, then
/// `end` (the record as it ended).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunLine {
    Run(Box<Run>),
    /// Output: which stream, its offset in that stream, base64 bytes.
    Output {
        stream: OutputStream,
        offset: u64,
        data: String,
    },
    End(Box<Run>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OutputStream {
    Stdout,
    Stderr,
}

#[derive(Debug, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RunCreateQuery {
    /// `false`: answer once with the ended run (JSON) instead of a stream.
    pub stream: Option<bool>,
}

#[derive(Debug, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RunListQuery {
    /// Only this project's runs (name or id).
    pub project: Option<String>,
    /// Only runs in this state.
    pub state: Option<String>,
    /// Only runs of this language.
    pub language: Option<String>,
    /// Page size, 1-500 (50).
    pub limit: Option<u64>,
    pub cursor: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ConsoleQuery {
    /// How many bytes of the end of the serial log; 16384 when absent, at most 1048576.
    pub bytes: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmCreate {
    pub name: Name,
    /// The project's name or id; `default` when absent.
    pub project: Option<String>,
    /// The image's name.
    pub image: Name,
    /// A flavor name; or give `vcpus`, `memory_mib` and `disk_gib`. Given
    /// sizes override the flavor's.
    pub flavor: Option<Name>,
    pub vcpus: Option<u32>,
    pub memory_mib: Option<u64>,
    pub disk_gib: Option<u64>,
    /// cloud-init user-data, at most 64 KiB of text.
    pub user_data: Option<String>,
    #[serde(default)]
    pub ssh_keys: Vec<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The guest's hostname; the VM's name when absent.
    pub hostname: Option<Name>,
    /// Where the VM may go; the server's defaults when absent.
    #[serde(default)]
    pub placement: Placement,
    /// Guest TCP ports to open to the outside through the node (port 22
    /// always is); at most 16.
    #[serde(default)]
    pub ports: Vec<u16>,
    /// Whether the guest may open connections to the outside; `allow`
    /// when absent.
    #[serde(default)]
    pub egress: Egress,
    /// The hypervisor engine; `qemu` when absent. A node that has it
    /// runs the VM (it waits `pending` until one does).
    #[serde(default)]
    pub engine: Option<Engine>,
}

/// A VM's outbound policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Egress {
    /// It reaches the outside through the node's NAT.
    #[default]
    Allow,
    /// Only what the node itself serves it (DHCP, DNS, metadata) and the
    /// VMs of its own project.
    Deny,
}

impl Egress {
    pub fn as_str(self) -> &'static str {
        match self {
            Egress::Allow => "allow",
            Egress::Deny => "deny",
        }
    }

    pub fn parse(s: &str) -> Option<Egress> {
        match s {
            "allow" => Some(Egress::Allow),
            "deny" => Some(Egress::Deny),
            _ => None,
        }
    }
}

/// How a VM is connected, as its node set it up.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmNetwork {
    /// `bridge` (its project's network on the node) or `user` (QEMU's
    /// restricted user-mode network); absent until a node started it.
    pub mode: Option<String>,
    /// The guest's addresses.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// The node's bridge for its project, in bridge mode.
    #[serde(default)]
    pub bridge: Option<String>,
}

/// Placement wishes for one VM.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    /// `spread` or `pack`; the server's policy when absent.
    pub policy: Option<PlacementPolicy>,
    /// Only nodes in this region.
    pub region: Option<String>,
    /// Never on a node that already holds a live VM of this group (in the
    /// same project): anti-affinity.
    pub group: Option<Name>,
}

/// Spread VMs over nodes, or pack them onto as few as possible.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PlacementPolicy {
    Spread,
    Pack,
}

#[derive(Debug, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct VmListQuery {
    /// Only this project (name or id); all the caller's projects when absent.
    pub project: Option<String>,
    /// Only VMs in this state. Deleted VMs are listed only when asked for.
    pub state: Option<VmState>,
    /// `key=value`: only VMs with this label.
    pub label: Option<String>,
    /// Only the VM with this exact name.
    pub name: Option<String>,
    /// 1-500; 100 when absent.
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct VmWaitQuery {
    /// The state to wait for.
    pub state: VmState,
    /// At most 600; 60 when absent.
    pub timeout_secs: Option<u64>,
}

// ---------- nodes ----------

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Capacity {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
}

/// How a node runs guests of one architecture: `native` on the host's
/// own CPU with hardware virtualisation (KVM), `emulated` in software
/// (QEMU's TCG: any architecture, on any host, several times slower).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Execution {
    Native,
    Emulated,
}

impl Execution {
    pub fn as_str(self) -> &'static str {
        match self {
            Execution::Native => "native",
            Execution::Emulated => "emulated",
        }
    }

    pub fn parse(s: &str) -> Option<Execution> {
        match s {
            "native" => Some(Execution::Native),
            "emulated" => Some(Execution::Emulated),
            _ => None,
        }
    }
}

/// How a node runs a VM's hypervisor.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Engine {
    /// QEMU with its standard machine (`pc` on x86_64, `virt` on aarch64).
    #[default]
    Qemu,
    /// QEMU's `microvm` machine: no firmware, no PCI, virtio over MMIO;
    /// for x86_64 images that boot a kernel directly. Boots sooner.
    Microvm,
    /// QEMU started and driven by libvirtd from a domain XML the node
    /// writes (x86_64 images, on nodes given a libvirt connection).
    Libvirt,
    /// Firecracker microVMs. It needs KVM, and no node agent has its
    /// driver yet: nodes list it among their unavailable engines with the
    /// reason, and a VM asking for it stays pending, saying so.
    Firecracker,
}

impl Engine {
    pub const ALL: &[Engine] = &[
        Engine::Qemu,
        Engine::Microvm,
        Engine::Libvirt,
        Engine::Firecracker,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Engine::Qemu => "qemu",
            Engine::Microvm => "microvm",
            Engine::Libvirt => "libvirt",
            Engine::Firecracker => "firecracker",
        }
    }

    pub fn parse(s: &str) -> Option<Engine> {
        Engine::ALL.iter().copied().find(|e| e.as_str() == s)
    }
}

/// An engine a node does not have, and why (what it would take).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EngineUnavailable {
    pub engine: String,
    pub reason: String,
}

/// An architecture a node runs guests of, and how.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Platform {
    /// `x86_64`, `aarch64`, ... (as `uname -m` says in the guest).
    pub arch: String,
    pub execution: Execution,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Node {
    pub id: NodeId,
    pub name: Name,
    pub region: String,
    /// The host's own architecture.
    pub arch: String,
    /// The architectures it runs guests of, and how (its own first).
    pub platforms: Vec<Platform>,
    pub engines: Vec<String>,
    /// The engines it does not have, each with the reason.
    pub unavailable_engines: Vec<EngineUnavailable>,
    pub kvm: bool,
    /// `online`, `offline` or `cordoned`.
    pub status: String,
    pub capacity: Capacity,
    /// What the node reported in use.
    pub usage: Capacity,
    /// What placements hold on it.
    pub reserved: Capacity,
    pub last_heartbeat_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    /// The networks it runs for projects (bridged nodes), as of its
    /// latest heartbeat.
    pub networks: Vec<NodeNetwork>,
    /// VMs it holds that the control plane does not know, as of its
    /// latest heartbeat (see [`OrphanVm`]).
    pub orphans: Vec<OrphanVm>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JoinTokenCreate {
    /// Lifetime in minutes (1-10080); 60 when absent.
    pub expires_in_minutes: Option<u32>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct JoinToken {
    pub token: String,
    pub expires_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NodeRegister {
    pub join_token: String,
    pub name: Name,
    #[serde(default = "default_region")]
    pub region: String,
    #[serde(default = "default_arch")]
    pub arch: String,
    #[serde(default)]
    pub engines: Vec<String>,
    /// The engines it does not have, and why.
    #[serde(default)]
    pub unavailable_engines: Vec<EngineUnavailable>,
    #[serde(default)]
    pub kvm: bool,
    pub capacity: Capacity,
    /// The architectures it runs guests of; its own `arch` (native with
    /// KVM, else emulated) when empty.
    #[serde(default)]
    pub platforms: Vec<Platform>,
}

fn default_region() -> String {
    "default".into()
}

/// The node's own credential, shown once; it authenticates heartbeats.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct NodeRegistered {
    pub node: Node,
    pub credential: String,
}

/// What a node saw of one VM.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmReport {
    pub id: VmId,
    pub state: ObservedState,
    /// The node's own counter for this VM; older reports are ignored.
    pub generation: u64,
    /// The desired generation the node had applied when it observed.
    pub desired_generation: u64,
    pub reason: Option<String>,
    #[serde(default)]
    pub ports: Vec<PortForward>,
    /// The guest agent's version, once it said ready.
    #[serde(default)]
    pub agent_version: Option<String>,
    /// How the node runs it, once it started it.
    #[serde(default)]
    pub execution: Option<Execution>,
    /// cloud-init's progress in the guest, once the agent said ready.
    #[serde(default)]
    pub cloud_init: Option<CloudInit>,
    /// How the node connected it.
    #[serde(default)]
    pub network: Option<VmNetwork>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    pub capacity: Capacity,
    #[serde(default)]
    pub usage: Capacity,
    #[serde(default)]
    pub vms: Vec<VmReport>,
    /// Host-side figures of the VMs with a running process.
    #[serde(default)]
    pub vm_stats: Vec<VmStats>,
    /// The node's networks (bridged mode).
    #[serde(default)]
    pub networks: Vec<NodeNetwork>,
    /// VMs the node holds that the control plane's answer did not list.
    #[serde(default)]
    pub orphans: Vec<OrphanVm>,
    /// The architectures it runs guests of now (it may have gained an
    /// emulator since it registered); unchanged when empty.
    #[serde(default)]
    pub platforms: Vec<Platform>,
    /// The engines it has now; unchanged when empty.
    #[serde(default)]
    pub engines: Vec<String>,
    /// The engines it does not have now, and why; unchanged when absent.
    #[serde(default)]
    pub unavailable_engines: Option<Vec<EngineUnavailable>>,
}

/// A VM a node holds that the control plane does not know (its answer to a
/// heartbeat stopped listing it without asking for its deletion: a
/// restored database backup, say). The node never deletes it for that: it
/// stops it, keeps its disk, and reports it until an admin adopts it
/// (`POST /v1/nodes/{id}/orphans/{vm}/adopt`) or removes it (`DELETE`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OrphanVm {
    pub id: VmId,
    pub name: Name,
    /// The project it was made in, as the node last heard.
    pub project_id: Option<ProjectId>,
    pub image: Name,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
    pub hostname: String,
    /// When the node first found it unlisted.
    pub since: DateTime<Utc>,
}

/// Adopting an orphan: it becomes a stopped VM of this project (the one it
/// was made in when absent), under its own name unless another is given.
#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OrphanAdopt {
    pub project: Option<String>,
    pub name: Option<Name>,
}

/// One network a node runs for a project.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NodeNetwork {
    /// The Linux bridge.
    pub bridge: String,
    pub project_id: ProjectId,
    pub cidr: String,
    /// The node's address on it.
    pub gateway: String,
    /// VMs attached.
    pub vms: u32,
}

/// One VM's figures as its node measures them from outside the guest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmStats {
    pub id: VmId,
    /// CPU used by the VM's hypervisor process since the node's previous
    /// sample, in percent of one host core (200 is two cores busy); absent
    /// on the first sample.
    pub cpu_percent: Option<f32>,
    /// CPU time the process has used since it started, in milliseconds.
    pub cpu_time_ms: u64,
    /// Resident memory of the hypervisor process (guest RAM it touched,
    /// plus the hypervisor's own), in MiB.
    pub memory_rss_mib: u64,
    /// Bytes the VM's disk file takes on the host (its copy-on-write
    /// overlay), in MiB.
    pub disk_used_mib: u64,
    /// How long the process has been running, in seconds.
    pub uptime_secs: u64,
    /// Memory charged to the VM's cgroup (QEMU and its helpers), in MiB;
    /// absent where the node runs VMs without one.
    #[serde(default)]
    pub cgroup_memory_mib: Option<u64>,
    /// The cgroup's memory limit (the VM's RAM plus QEMU's allowance), in MiB.
    #[serde(default)]
    pub cgroup_memory_limit_mib: Option<u64>,
}

/// A VM's latest figures, with the sizes they compare to.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct VmStatsView {
    pub vm_id: VmId,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
    /// What the node measured last; absent while there is nothing to
    /// measure (the VM is not running on a node, or was not measured yet).
    pub measured: Option<VmMeasured>,
    /// Why `measured` is absent.
    pub note: Option<String>,
}

/// One measurement of a VM from its host.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct VmMeasured {
    /// When the node measured it.
    pub at: DateTime<Utc>,
    /// CPU in percent of one host core since the node's previous sample;
    /// absent on the first.
    pub cpu_percent: Option<f32>,
    pub cpu_time_ms: u64,
    pub memory_rss_mib: u64,
    pub disk_used_mib: u64,
    pub uptime_secs: u64,
    /// Memory charged to the VM's cgroup on its node, in MiB.
    pub cgroup_memory_mib: Option<u64>,
    /// The limit of that cgroup, in MiB.
    pub cgroup_memory_limit_mib: Option<u64>,
}

/// How a node boots an image, and the files it needs (by sha256).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NodeImage {
    pub name: Name,
    /// `qcow2`, `raw` or `initramfs`.
    pub format: String,
    pub boot: BootMode,
    /// Of the disk (or initramfs) file.
    pub sha256: String,
    pub kernel_sha256: Option<String>,
    pub initrd_sha256: Option<String>,
    pub cmdline: Option<String>,
    pub has_agent: bool,
    /// The guest's architecture.
    #[serde(default = "default_arch")]
    pub arch: String,
    /// The user its cloud-init makes with the SSH keys (Debian's
    /// `debian`): the node runs exec over SSH as that user (through
    /// `sudo`) on an image without the agent.
    #[serde(default)]
    pub login_user: Option<String>,
}

/// What the control plane wants a node to run.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct DesiredVm {
    pub id: VmId,
    pub name: Name,
    pub desired_state: DesiredState,
    pub desired_generation: u64,
    /// A restart was asked for at `desired_generation` and is not done yet.
    #[serde(default)]
    pub restart: bool,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
    pub hostname: String,
    pub image: NodeImage,
    /// The secret the guest presents to the node's metadata relay.
    #[serde(default)]
    pub metadata_token: Option<String>,
    /// Its project, whose network it joins on a bridged node.
    #[serde(default)]
    pub project_id: Option<ProjectId>,
    /// That project's network (`a.b.c.0/24`).
    #[serde(default)]
    pub network_cidr: Option<String>,
    /// Guest ports to map from host ports (besides 22).
    #[serde(default)]
    pub guest_ports: Vec<u16>,
    #[serde(default)]
    pub egress: Egress,
    #[serde(default)]
    pub engine: Engine,
}

/// The MAC address of a VM's first NIC: fixed by its id, so the
/// metadata service's network-config can name the NIC before the guest
/// boots. Locally administered, unicast (`52:54:00` is QEMU's prefix).
pub fn guest_mac(id: VmId) -> String {
    let b = id.0.as_bytes();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", b[13], b[14], b[15])
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HeartbeatResponse {
    pub vms: Vec<DesiredVm>,
}

// ---------- audit ----------

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AuditEvent {
    pub id: EventId,
    pub at: DateTime<Utc>,
    /// The user's name, `node:NAME`, or `anonymous`.
    pub actor: String,
    /// The operation, such as `vm_create` or `vm_stop`.
    pub action: String,
    pub target_kind: Option<String>,
    pub target_id: Option<String>,
    pub project_id: Option<ProjectId>,
    /// The HTTP status of the request.
    pub status: u16,
    /// `ok`, or the error code.
    pub result: String,
}

#[derive(Debug, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// Only events of this project (name or id). Required unless admin.
    pub project: Option<String>,
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

// ---------- events ----------

/// One message of the `/v1/events` stream (the `data` of a server-sent
/// event): the current record of something that changed.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// A VM the caller may see changed (state, ports, deletion, ...).
    Vm(Box<Vm>),
    /// A node's status, capacity or usage changed (admins only).
    Node(Box<Node>),
}

/// Whether the caller has a session, for a browser that cannot read its
/// HTTP-only cookie: `whoami` is absent when nobody is logged in.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SessionState {
    pub whoami: Option<Whoami>,
}

/// How many of the caller's VMs are in one state.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct VmStateCount {
    pub state: VmState,
    pub count: u64,
}

// ---------- environments ----------

/// A group of VMs, one per image whose name starts with one of
/// `os_prefixes`, made together within the project's quota (all or none).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnvironmentCreate {
    pub name: Name,
    /// The project's name or id; `default` when absent.
    pub project: Option<String>,
    /// Image-name prefixes, such as `debian` and `alpine`: every image
    /// whose name starts with one gets a VM. Each must match an image.
    pub os_prefixes: Vec<String>,
    /// Only images of these architectures (`x86_64`, `aarch64`, ...):
    /// one VM per (image, architecture) pair that exists. Every one of
    /// them when empty.
    #[serde(default)]
    pub archs: Vec<String>,
    /// VMs of each image (1-50; 1 when absent), named `ENV-IMAGE-N`.
    pub dup_each: Option<u32>,
    /// The engine every VM runs under; `qemu` when absent.
    #[serde(default)]
    pub engine: Option<Engine>,
    /// A flavor name; or give `vcpus`, `memory_mib` and `disk_gib`.
    pub flavor: Option<Name>,
    pub vcpus: Option<u32>,
    pub memory_mib: Option<u64>,
    pub disk_gib: Option<u64>,
    /// cloud-init user-data for every VM, at most 64 KiB of text.
    pub user_data: Option<String>,
    #[serde(default)]
    pub ssh_keys: Vec<String>,
    /// Deleted this many seconds after creation (60 to 30 days); kept
    /// until deleted when absent.
    pub lifetime_secs: Option<u64>,
    /// Guest TCP ports every VM opens to the outside through its node
    /// (port 22 always is); at most 16.
    #[serde(default)]
    pub ports: Vec<u16>,
    /// Whether the VMs may open connections to the outside; `allow` when
    /// absent.
    #[serde(default)]
    pub egress: Egress,
}

/// A change to a live environment (`PATCH /v1/environments/{env}`): its
/// lifetime, VMs to drop, and every VM's ports and outbound policy. All
/// of it is checked before anything changes; a bad field is a 400 and
/// changes nothing.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnvironmentUpdate {
    /// A new lifetime counted from now (60 s to 30 days): the environment
    /// is deleted then.
    pub lifetime_secs: Option<u64>,
    /// The environment no longer expires (not with `lifetime_secs`).
    #[serde(default)]
    pub no_expiry: bool,
    /// Delete these VMs of it, by name or id; each must be one of its
    /// live VMs.
    #[serde(default)]
    pub remove_vms: Vec<String>,
    /// Delete its VMs whose image name starts with one of these.
    #[serde(default)]
    pub remove_os_prefixes: Vec<String>,
    /// Delete its VMs that stopped answering: those in `error`, and those
    /// `unknown` because their node went silent.
    #[serde(default)]
    pub remove_unresponsive: bool,
    /// Replaces the guest ports every VM opens (port 22 always is; at
    /// most 16). A running VM gets them when it next starts.
    pub ports: Option<Vec<u16>>,
    /// Replaces every VM's outbound policy; a running VM gets it when it
    /// next starts.
    pub egress: Option<Egress>,
}

/// What `PATCH /v1/environments/{env}` did.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EnvironmentUpdated {
    pub environment: Environment,
    /// The VMs it deleted (they go `deleting`, then `deleted`).
    pub removed: Vec<EnvironmentVmRef>,
    /// Running VMs whose new ports or outbound policy apply when they
    /// next start (`env stop`, then `env start`).
    pub apply_at_next_start: Vec<EnvironmentVmRef>,
}

/// One VM of an environment, by id and name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct EnvironmentVmRef {
    pub vm_id: VmId,
    pub vm_name: Name,
}

/// An environment and its VMs.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Environment {
    pub id: EnvironmentId,
    pub name: Name,
    pub project: Name,
    pub project_id: ProjectId,
    pub os_prefixes: Vec<String>,
    pub flavor: Option<Name>,
    /// `creating` while a VM is on its way up, `ready` when every VM runs,
    /// `degraded` when one is in `error` or stopped, `deleting` after a
    /// delete until every VM is gone, then `deleted`.
    pub state: EnvironmentState,
    pub vms: Vec<Vm>,
    pub expires_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EnvironmentState {
    Creating,
    Ready,
    Degraded,
    /// Every VM stopped (`POST .../stop`): disks kept, nothing running.
    Stopped,
    Deleting,
    Deleted,
}

/// Which project an environment named in the path is in.
#[derive(Debug, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct EnvironmentQuery {
    /// The project's name or id, when the path names the environment by
    /// name; `default` when absent.
    pub project: Option<String>,
}

/// Which environment a run is on, and which of its VMs it goes to.
#[derive(Debug, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct EnvironmentRunQuery {
    /// The project's name or id, when the path names the environment by
    /// name; `default` when absent.
    pub project: Option<String>,
    /// Only VMs whose image name starts with one of these prefixes
    /// (comma-separated).
    pub os_prefix: Option<String>,
    /// Only these VMs, by name or id (comma-separated).
    pub vm: Option<String>,
}

/// The words of a comma-separated filter (`os_prefix`, `vm`), trimmed,
/// empty ones left out.
pub fn comma_list(s: Option<&str>) -> Vec<String> {
    s.into_iter()
        .flat_map(|s| s.split(','))
        .map(str::trim)
        .filter(|w| !w.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Which file of a VM a copy writes or reads.
#[derive(Debug, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct VmFileQuery {
    /// An absolute path in the guest, at most 4096 bytes.
    pub path: String,
}

/// Which file an environment's copy writes, and to which of its VMs.
#[derive(Debug, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct EnvironmentFileQuery {
    /// An absolute path in each guest, at most 4096 bytes.
    pub path: String,
    /// The project's name or id, when the path names the environment by
    /// name; `default` when absent.
    pub project: Option<String>,
    /// Only VMs whose image name starts with one of these prefixes
    /// (comma-separated).
    pub os_prefix: Option<String>,
    /// Only these VMs, by name or id (comma-separated).
    pub vm: Option<String>,
}

/// A file written into a VM, as the guest read it back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct FileWritten {
    pub path: String,
    pub size: u64,
    /// Hex SHA-256 of the file in the guest, equal to that of the bytes sent.
    pub sha256: String,
}

/// What one VM of an environment made of a file sent to all of them.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct VmFileResult {
    pub vm_id: VmId,
    pub vm_name: Name,
    pub image: Name,
    /// The file as written, when it was.
    pub written: Option<FileWritten>,
    /// Why this VM has no copy (not running, no agent, the guest refused).
    pub error: Option<String>,
    pub duration_ms: u64,
}

/// A file sent to every VM of an environment.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct EnvironmentFileResult {
    pub environment: Name,
    pub path: String,
    pub results: Vec<VmFileResult>,
}

/// What one VM of an environment made of a command run on all of them.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct VmRunResult {
    pub vm_id: VmId,
    pub vm_name: Name,
    pub image: Name,
    /// The exit code, when the command ran and exited.
    pub exit_code: Option<i32>,
    /// The signal that ended it, if one did (a timeout kills it).
    pub signal: Option<i32>,
    /// Standard output as text (invalid UTF-8 replaced), at most 1 MiB.
    pub stdout: String,
    pub stderr: String,
    /// Whether output beyond 1 MiB per stream was dropped.
    pub truncated: bool,
    /// Why the command did not run or did not finish on this VM.
    pub error: Option<String>,
    pub duration_ms: u64,
}

/// What `POST /v1/environments/{env}/stop` or `/start` did: the
/// environment as it is now, and the VMs that refused (the others went
/// ahead).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EnvironmentAction {
    pub environment: Environment,
    /// VMs the action could not be applied to now, and why.
    pub refused: Vec<EnvironmentRefusal>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EnvironmentRefusal {
    pub vm_id: VmId,
    pub vm_name: Name,
    pub reason: String,
}

/// The results of a command run on every VM of an environment, in the
/// order of the environment's VMs.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct EnvironmentRunResult {
    pub environment: Name,
    pub results: Vec<VmRunResult>,
}

/// One VM of an environment a streamed run goes to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct EnvironmentExecTarget {
    pub vm_id: VmId,
    pub vm_name: Name,
    pub image: Name,
    pub arch: String,
}

/// One line of `POST /v1/environments/{env}/exec` (`application/x-ndjson`):
/// first `started` with the VMs, then each VM's output and end as they
/// come (lines of different VMs interleave; one VM's are in order), and
/// last `done`. A VM that fails or is slow never holds back the others'
/// lines.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EnvironmentExecEvent {
    /// The VMs the command runs on.
    Started { vms: Vec<EnvironmentExecTarget> },
    /// Bytes one VM's command wrote to standard output, base64.
    Stdout { vm_id: VmId, data: String },
    /// Bytes one VM's command wrote to standard error, base64.
    Stderr { vm_id: VmId, data: String },
    /// One VM's command ended; `duration_ms` since the request.
    Exit {
        vm_id: VmId,
        code: Option<i32>,
        signal: Option<i32>,
        duration_ms: u64,
    },
    /// The command did not run or did not finish on one VM, and why.
    Error {
        vm_id: VmId,
        message: String,
        duration_ms: u64,
    },
    /// Every VM has ended: how many exited 0, and how many did not.
    Done {
        succeeded: usize,
        failed: usize,
        duration_ms: u64,
    },
}
