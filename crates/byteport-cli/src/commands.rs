//! What each command does.

use crate::client::{ApiError, Client, Method, decode, seg};
use crate::config::{self, Config};
use crate::table::{Table, print_fields};
use crate::*;
use anyhow::{Context, Result, bail};
use byteport_trust::Trust;
use byteport_types::api::*;
use byteport_types::{VmId, VmState};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

/// A timestamp to the second (`chrono` values, without naming the crate).
macro_rules! ts {
    ($t:expr) => {
        $t.format("%Y-%m-%d %H:%M:%S").to_string()
    };
}

/// An optional timestamp, `-` when absent.
macro_rules! opt_ts {
    ($t:expr) => {
        $t.as_ref().map_or_else(|| "-".to_owned(), |t| ts!(t))
    };
}

mod environments;
mod files;
mod nodes;
mod runs;
mod users;

/// The longest wait the server grants in one request.
const MAX_SERVER_WAIT: u64 = 600;

/// Ends the process with this status, the error already reported (a
/// command run by `vm exec` that failed, say).
#[derive(Debug)]
pub struct Exit(pub u8);

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit status {}", self.0)
    }
}

impl std::error::Error for Exit {}

struct Env {
    out: Output,
    client: Client,
    /// What `login` stored, if anything.
    config: Option<Config>,
}

impl Env {
    fn json(&self) -> bool {
        self.out == Output::Json
    }
}

fn print_json(v: &Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref()
        .map_or_else(|| "-".to_owned(), ToString::to_string)
}

/// Reads a password from standard input, without its trailing newline.
fn read_password() -> Result<String> {
    use std::io::Read;
    let mut s = String::new();
    std::io::stdin()
        .read_to_string(&mut s)
        .context("cannot read the password from standard input")?;
    let s = s.strip_suffix('\n').unwrap_or(&s);
    let s = s.strip_suffix('\r').unwrap_or(s);
    if s.is_empty() {
        bail!("the password on standard input is empty");
    }
    Ok(s.to_owned())
}

fn normalize_url(u: &str) -> String {
    u.trim().trim_end_matches('/').to_owned()
}

/// The roots to check `url`'s certificate against: the system's, and the
/// CA bundle given now or stored by the `login` to that same URL.
fn trust(flag: Option<&Path>, config: &Option<Config>, url: &str) -> Result<Trust> {
    Ok(Trust::load(flag.or_else(|| stored_ca(config, url)))?)
}

/// The CA bundle to remember: as an absolute path, so it holds from any
/// working directory.
fn absolute(p: Option<&Path>) -> Result<Option<PathBuf>> {
    p.map(|p| std::path::absolute(p).with_context(|| format!("cannot resolve {}", p.display())))
        .transpose()
}

pub fn run(cli: Cli) -> Result<()> {
    let config = config::load()?;
    let flag_url = cli.url.as_deref().map(normalize_url);
    let out = cli.output;
    let ca_flag = cli.ca_cert.as_deref();
    match cli.cmd {
        Cmd::Login {
            user,
            password_stdin: _,
        } => {
            let url = login_url(flag_url, &config)?;
            let password = read_password()?;
            let ca = absolute(ca_flag.or_else(|| stored_ca(&config, &url)))?;
            login(out, &url, &user, &password, ca)
        }
        Cmd::Bootstrap {
            token,
            user,
            password_stdin: _,
        } => {
            let url = login_url(flag_url, &config)?;
            let password = read_password()?;
            let ca = absolute(ca_flag.or_else(|| stored_ca(&config, &url)))?;
            let c = Client::new(&url, None, Trust::load(ca.as_deref())?);
            c.value(
                Method::Post,
                "/v1/bootstrap",
                &[],
                Some(&json!({"token": token, "name": user, "password": password})),
            )?;
            if out == Output::Table {
                println!("created the first admin {user}");
            }
            login(out, &url, &user, &password, ca)
        }
        Cmd::Signup {
            user,
            invite,
            password_stdin: _,
        } => {
            let url = login_url(flag_url, &config)?;
            let password = read_password()?;
            let ca = absolute(ca_flag.or_else(|| stored_ca(&config, &url)))?;
            let c = Client::new(&url, None, Trust::load(ca.as_deref())?);
            let invite = invite.as_deref().map(users::invite_secret);
            let v = c.value(
                Method::Post,
                "/v1/auth/signup",
                &[],
                Some(&json!({"name": user, "password": password, "invite": invite})),
            )?;
            if out == Output::Table {
                println!("signed up as {user}");
            }
            // A sign-up answers as a login does.
            keep_login(out, &url, &c, decode(&v)?, ca)
        }
        cmd => {
            let url = flag_url
                .or_else(|| config.as_ref().map(|c| normalize_url(&c.url)))
                .context(
                    "not logged in: run `byteport login --url URL --user NAME --password-stdin`",
                )?;
            let token = match std::env::var("BYTEPORT_TOKEN") {
                Ok(t) if !t.trim().is_empty() => Some(t.trim().to_owned()),
                // Never send the stored token to another server.
                _ => config
                    .as_ref()
                    .filter(|c| normalize_url(&c.url) == url)
                    .map(|c| c.token.clone()),
            };
            let trust = trust(ca_flag, &config, &url)?;
            let env = Env {
                out,
                client: Client::new(&url, token, trust),
                config,
            };
            dispatch(&env, cmd)
        }
    }
}

fn login_url(flag: Option<String>, config: &Option<Config>) -> Result<String> {
    match flag.or_else(|| config.as_ref().map(|c| normalize_url(&c.url))) {
        Some(u) if !u.is_empty() => Ok(u),
        _ => {
            use clap::CommandFactory;
            Cli::command()
                .error(
                    clap::error::ErrorKind::MissingRequiredArgument,
                    "the server's URL is required: pass --url URL",
                )
                .exit()
        }
    }
}

/// A token name from the host's name: `cli-HOST`, or `cli`.
fn token_name() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    let mut h: String = host
        .trim()
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    while h.contains("..") {
        h = h.replace("..", ".");
    }
    // Room for `cli-` and a `-NN` suffix.
    let h: String = h.chars().take(55).collect();
    let h = h.trim_matches(|c: char| !c.is_ascii_alphanumeric());
    if h.is_empty() {
        "cli".to_owned()
    } else {
        format!("cli-{h}")
    }
}

/// The CA bundle stored by the last `login` to `url`.
fn stored_ca<'a>(config: &'a Option<Config>, url: &str) -> Option<&'a Path> {
    config
        .as_ref()
        .filter(|c| normalize_url(&c.url) == url)
        .and_then(|c| c.ca_cert.as_deref())
}

fn login(
    out: Output,
    url: &str,
    user: &str,
    password: &str,
    ca_cert: Option<PathBuf>,
) -> Result<()> {
    let anon = Client::new(url, None, Trust::load(ca_cert.as_deref())?);
    let v = anon.value(
        Method::Post,
        "/v1/auth/login",
        &[],
        Some(&json!({"name": user, "password": password})),
    )?;
    keep_login(out, url, &anon, decode(&v)?, ca_cert)
}

/// Turns a login's tokens into a personal API token stored in the config
/// file, and spends the login's refresh token.
fn keep_login(
    out: Output,
    url: &str,
    anon: &Client,
    lr: LoginResponse,
    ca_cert: Option<PathBuf>,
) -> Result<()> {
    let jwt = anon.with_token(Some(lr.access_token.clone()));
    let base = token_name();
    let mut created = None;
    for n in 1..=20 {
        let name = if n == 1 {
            base.clone()
        } else {
            format!("{base}-{n}")
        };
        match jwt.value(
            Method::Post,
            "/v1/tokens",
            &[],
            Some(&json!({"name": name})),
        ) {
            Ok(v) => {
                created = Some(v);
                break;
            }
            Err(e)
                if e.downcast_ref::<ApiError>()
                    .is_some_and(|a| a.status == 409) =>
            {
                continue;
            }
            Err(e) => return Err(e.context("cannot create an API token")),
        }
    }
    let created: ApiTokenCreated = decode(&created.context("cannot pick a free token name")?)?;
    // The session is no longer needed: spend its refresh token.
    let _ = anon.request(
        Method::Post,
        "/v1/auth/logout",
        &[],
        Some(&json!({"refresh_token": lr.refresh_token})),
    );
    let path = config::save(&Config {
        url: url.to_owned(),
        token: created.secret,
        token_id: Some(created.token.id.to_string()),
        user: Some(lr.user.name.to_string()),
        ca_cert,
    })?;
    match out {
        Output::Table => println!("logged in to {url} as {}", lr.user.name),
        Output::Json => print_json(&json!({
            "url": url,
            "user": lr.user,
            "token": created.token,
            "config": path.display().to_string(),
        }))?,
    }
    Ok(())
}

fn dispatch(env: &Env, cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Login { .. } | Cmd::Bootstrap { .. } | Cmd::Signup { .. } => {
            unreachable!("handled in run")
        }
        Cmd::Completion { .. } | Cmd::Man { .. } => unreachable!("handled in main"),
        Cmd::Logout => logout(env),
        Cmd::Whoami => whoami(env),
        Cmd::Project(c) => project(env, c),
        Cmd::User(c) => users::user(env, c),
        Cmd::Invite(c) => users::invite(env, c),
        Cmd::Settings(c) => users::settings(env, c),
        Cmd::Token(c) => token(env, c),
        Cmd::Flavor(c) => flavor(env, c),
        Cmd::Image(c) => image(env, c),
        Cmd::Vm(a) => vm(env, a),
        Cmd::Env(a) => environments::run(env, a),
        Cmd::Run(a) => runs::run(env, a),
        Cmd::Node(c) => nodes::run(env, c),
        Cmd::Audit { project, limit } => audit(env, project, limit),
    }
}

fn logout(env: &Env) -> Result<()> {
    let Some(cfg) = &env.config else {
        bail!("not logged in");
    };
    if let Some(id) = &cfg.token_id {
        // Revoke with the stored token itself, on the server it belongs to.
        let c = Client::new(
            &cfg.url,
            Some(cfg.token.clone()),
            Trust::load(cfg.ca_cert.as_deref())?,
        );
        if let Err(e) = c.request(
            Method::Delete,
            &format!("/v1/tokens/{}", seg(id)),
            &[],
            None,
        ) {
            let msg = match e.downcast_ref::<ApiError>() {
                Some(a) => a.message.clone(),
                None => format!("{e:#}"),
            };
            eprintln!("warning: could not revoke the stored token: {msg}");
        }
    }
    config::remove()?;
    if !env.json() {
        println!("logged out of {}", cfg.url);
    }
    Ok(())
}

fn whoami(env: &Env) -> Result<()> {
    let v = env.client.get("/v1/auth/whoami", &[])?;
    if env.json() {
        return print_json(&v);
    }
    let w: Whoami = decode(&v)?;
    println!(
        "{}{} at {}",
        w.user.name,
        if w.user.admin { " (admin)" } else { "" },
        env.client.base
    );
    if !w.memberships.is_empty() {
        let mut t = Table::new(&["PROJECT", "ROLE"]);
        for m in &w.memberships {
            t.row(vec![m.project.to_string(), m.role.to_string()]);
        }
        println!();
        t.print();
    }
    Ok(())
}

/// Prints `v` as JSON, or `done` in table mode.
fn done(env: &Env, v: Option<Value>, msg: String) -> Result<()> {
    if env.json() {
        if let Some(v) = v {
            print_json(&v)?;
        }
    } else {
        println!("{msg}");
    }
    Ok(())
}

fn show_project(p: &Project) {
    let q = &p.quota;
    let u = &p.usage;
    print_fields(&[
        ("name", p.name.to_string()),
        ("id", p.id.to_string()),
        ("description", p.description.clone()),
        ("vms", format!("{}/{}", u.vms, q.max_vms)),
        ("vcpus", format!("{}/{}", u.vcpus, q.max_vcpus)),
        (
            "memory",
            format!("{}/{} MiB", u.memory_mib, q.max_memory_mib),
        ),
        ("disk", format!("{}/{} GiB", u.disk_gib, q.max_disk_gib)),
        ("network", opt(&p.network_cidr)),
        ("created", ts!(p.created_at)),
    ]);
}

fn project(env: &Env, cmd: ProjectCmd) -> Result<()> {
    let c = &env.client;
    match cmd {
        ProjectCmd::List => {
            let v = c.get("/v1/projects", &[])?;
            if env.json() {
                return print_json(&v);
            }
            let ps: Vec<Project> = decode(&v)?;
            let mut t = Table::new(&[
                "NAME",
                "ID",
                "VMS",
                "VCPUS",
                "MEMORY(MiB)",
                "DISK(GiB)",
                "DESCRIPTION",
            ]);
            for p in &ps {
                let (q, u) = (&p.quota, &p.usage);
                t.row(vec![
                    p.name.to_string(),
                    p.id.to_string(),
                    format!("{}/{}", u.vms, q.max_vms),
                    format!("{}/{}", u.vcpus, q.max_vcpus),
                    format!("{}/{}", u.memory_mib, q.max_memory_mib),
                    format!("{}/{}", u.disk_gib, q.max_disk_gib),
                    p.description.clone(),
                ]);
            }
            t.print();
            Ok(())
        }
        ProjectCmd::Show { project } => {
            let v = c.get(&format!("/v1/projects/{}", seg(&project)), &[])?;
            if env.json() {
                return print_json(&v);
            }
            show_project(&decode(&v)?);
            Ok(())
        }
        ProjectCmd::Create {
            name,
            description,
            owner,
        } => {
            let mut body = json!({"name": name});
            if let Some(d) = description {
                body["description"] = json!(d);
            }
            if let Some(o) = owner {
                body["owner"] = json!(o);
            }
            let v = c.value(Method::Post, "/v1/projects", &[], Some(&body))?;
            if env.json() {
                return print_json(&v);
            }
            show_project(&decode(&v)?);
            Ok(())
        }
        ProjectCmd::Delete { project } => {
            c.request(
                Method::Delete,
                &format!("/v1/projects/{}", seg(&project)),
                &[],
                None,
            )?;
            done(env, None, format!("deleted project {project}"))
        }
        ProjectCmd::Quota {
            project,
            vms,
            vcpus,
            memory_mib,
            disk_gib,
            runs,
        } => {
            let path = format!("/v1/projects/{}", seg(&project));
            let p: Project = decode(&c.get(&path, &[])?)?;
            let q = Quota {
                max_vms: vms.unwrap_or(p.quota.max_vms),
                max_vcpus: vcpus.unwrap_or(p.quota.max_vcpus),
                max_memory_mib: memory_mib.unwrap_or(p.quota.max_memory_mib),
                max_disk_gib: disk_gib.unwrap_or(p.quota.max_disk_gib),
                max_concurrent_runs: runs.unwrap_or(p.quota.max_concurrent_runs),
            };
            let v = c.value(
                Method::Put,
                &format!("{path}/quota"),
                &[],
                Some(&serde_json::to_value(q)?),
            )?;
            if env.json() {
                return print_json(&v);
            }
            show_project(&decode(&v)?);
            Ok(())
        }
        ProjectCmd::Members { project } => {
            let v = c.get(&format!("/v1/projects/{}/members", seg(&project)), &[])?;
            if env.json() {
                return print_json(&v);
            }
            let ms: Vec<Member> = decode(&v)?;
            let mut t = Table::new(&["USER", "ROLE"]);
            for m in &ms {
                t.row(vec![m.user.to_string(), m.role.to_string()]);
            }
            t.print();
            Ok(())
        }
        ProjectCmd::AddMember {
            project,
            user,
            role,
        } => {
            let v = c.value(
                Method::Put,
                &format!("/v1/projects/{}/members/{}", seg(&project), seg(&user)),
                &[],
                Some(&json!({"role": role})),
            )?;
            done(env, Some(v), format!("{user} is now {role} of {project}"))
        }
        ProjectCmd::RemoveMember { project, user } => {
            c.request(
                Method::Delete,
                &format!("/v1/projects/{}/members/{}", seg(&project), seg(&user)),
                &[],
                None,
            )?;
            done(env, None, format!("removed {user} from {project}"))
        }
    }
}

fn token(env: &Env, cmd: TokenCmd) -> Result<()> {
    let c = &env.client;
    match cmd {
        TokenCmd::List => {
            let v = c.get("/v1/tokens", &[])?;
            if env.json() {
                return print_json(&v);
            }
            let ts: Vec<ApiToken> = decode(&v)?;
            let current = env.config.as_ref().and_then(|c| c.token_id.clone());
            let mut t = Table::new(&[
                "ID",
                "NAME",
                "PREFIX",
                "CREATED",
                "EXPIRES",
                "LAST USED",
                "",
            ]);
            for tok in &ts {
                let id = tok.id.to_string();
                let mark = if current.as_deref() == Some(id.as_str()) {
                    "(this CLI)"
                } else {
                    ""
                };
                t.row(vec![
                    id,
                    tok.name.to_string(),
                    tok.prefix.clone(),
                    ts!(tok.created_at),
                    opt_ts!(tok.expires_at),
                    opt_ts!(tok.last_used_at),
                    mark.into(),
                ]);
            }
            t.print();
            Ok(())
        }
        TokenCmd::Create {
            name,
            expires_in_days,
        } => {
            let mut body = json!({"name": name});
            if let Some(d) = expires_in_days {
                body["expires_in_days"] = json!(d);
            }
            let v = c.value(Method::Post, "/v1/tokens", &[], Some(&body))?;
            if env.json() {
                return print_json(&v);
            }
            let t: ApiTokenCreated = decode(&v)?;
            print_fields(&[
                ("id", t.token.id.to_string()),
                ("name", t.token.name.to_string()),
                ("expires", opt_ts!(t.token.expires_at)),
                ("secret", t.secret),
            ]);
            println!();
            println!("note: the secret is shown only this once; store it now.");
            Ok(())
        }
        TokenCmd::Revoke { id } => {
            c.request(
                Method::Delete,
                &format!("/v1/tokens/{}", seg(&id)),
                &[],
                None,
            )?;
            done(env, None, format!("revoked token {id}"))
        }
    }
}

fn flavor(env: &Env, cmd: FlavorCmd) -> Result<()> {
    let c = &env.client;
    match cmd {
        FlavorCmd::List => {
            let v = c.get("/v1/flavors", &[])?;
            if env.json() {
                return print_json(&v);
            }
            let fs: Vec<Flavor> = decode(&v)?;
            let mut t = Table::new(&["NAME", "VCPUS", "MEMORY(MiB)", "DISK(GiB)"]);
            for f in &fs {
                t.row(vec![
                    f.name.to_string(),
                    f.vcpus.to_string(),
                    f.memory_mib.to_string(),
                    f.disk_gib.to_string(),
                ]);
            }
            t.print();
            Ok(())
        }
        FlavorCmd::Create {
            name,
            vcpus,
            memory_mib,
            disk_gib,
        } => {
            let v = c.value(
                Method::Post,
                "/v1/flavors",
                &[],
                Some(&json!({"name": name, "vcpus": vcpus, "memory_mib": memory_mib, "disk_gib": disk_gib})),
            )?;
            done(env, Some(v), format!("created flavor {name}"))
        }
        FlavorCmd::Delete { name } => {
            c.request(
                Method::Delete,
                &format!("/v1/flavors/{}", seg(&name)),
                &[],
                None,
            )?;
            done(env, None, format!("deleted flavor {name}"))
        }
    }
}

fn image(env: &Env, cmd: ImageCmd) -> Result<()> {
    let c = &env.client;
    match cmd {
        ImageCmd::List => {
            let v = c.get("/v1/images", &[])?;
            if env.json() {
                return print_json(&v);
            }
            let is: Vec<Image> = decode(&v)?;
            let mut t = Table::new(&[
                "NAME", "OS", "ARCH", "FORMAT", "SIZE", "BOOT", "AGENT", "STATUS",
            ]);
            for i in &is {
                t.row(vec![
                    i.name.to_string(),
                    format!("{} {}", i.os_family, i.os_version),
                    i.arch.clone(),
                    i.format.clone(),
                    i.size_bytes.to_string(),
                    boot_str(i.boot).into(),
                    if i.has_agent { "yes" } else { "no" }.into(),
                    i.status.clone(),
                ]);
            }
            t.print();
            Ok(())
        }
        ImageCmd::Show { name } => {
            let v = c.get(&format!("/v1/images/{}", seg(&name)), &[])?;
            if env.json() {
                return print_json(&v);
            }
            let i: Image = decode(&v)?;
            print_fields(&[
                ("name", i.name.to_string()),
                ("id", i.id.to_string()),
                ("os", format!("{} {}", i.os_family, i.os_version)),
                ("arch", i.arch),
                ("format", i.format),
                ("size", format!("{} bytes", i.size_bytes)),
                ("sha256", i.sha256),
                ("boot", boot_str(i.boot).into()),
                ("kernel sha256", opt(&i.kernel_sha256)),
                ("initrd sha256", opt(&i.initrd_sha256)),
                ("cmdline", opt(&i.cmdline)),
                ("agent", i.has_agent.to_string()),
                ("status", i.status),
                ("created", ts!(i.created_at)),
            ]);
            Ok(())
        }
        ImageCmd::Create {
            name,
            os_family,
            os_version,
            arch,
            format,
            size_bytes,
            sha256,
            boot,
            kernel_sha256,
            initrd_sha256,
            cmdline,
            has_agent,
        } => {
            let mut body = json!({
                "name": name, "os_family": os_family, "os_version": os_version,
                "format": format, "size_bytes": size_bytes, "sha256": sha256,
                "has_agent": has_agent,
            });
            if let Some(a) = arch {
                body["arch"] = json!(a);
            }
            if let Some(b) = boot {
                body["boot"] = json!(match b {
                    Boot::Disk => "disk",
                    Boot::Kernel => "kernel",
                });
            }
            for (k, v) in [
                ("kernel_sha256", kernel_sha256),
                ("initrd_sha256", initrd_sha256),
                ("cmdline", cmdline),
            ] {
                if let Some(v) = v {
                    body[k] = json!(v);
                }
            }
            let v = c.value(Method::Post, "/v1/images", &[], Some(&body))?;
            done(env, Some(v), format!("registered image {name}"))
        }
        ImageCmd::Import(a) => {
            let plan = crate::import::plan(a)?;
            let v = crate::import::run(c, &plan, env.json())?;
            if env.json() {
                return print_json(&v);
            }
            let i: Image = decode(&v)?;
            println!("image {} is {}", i.name, i.status);
            Ok(())
        }
        ImageCmd::Delete { name } => {
            c.request(
                Method::Delete,
                &format!("/v1/images/{}", seg(&name)),
                &[],
                None,
            )?;
            done(env, None, format!("deleted image {name}"))
        }
    }
}

fn boot_str(b: BootMode) -> &'static str {
    match b {
        BootMode::Disk => "disk",
        BootMode::Kernel => "kernel",
    }
}

// ---------- VMs ----------

/// Port forwards in a few characters: `22→20022,80→20080`.
fn ports_compact(p: &[PortForward]) -> String {
    if p.is_empty() {
        return "-".into();
    }
    p.iter()
        .map(|f| format!("{}→{}", f.guest_port, f.host_port))
        .collect::<Vec<_>>()
        .join(",")
}

/// `host:port`, bracketing an IPv6 host.
fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// One forward per line: `22 -> 127.0.0.1:20022`.
fn ports_long(p: &[PortForward]) -> String {
    if p.is_empty() {
        return "-".into();
    }
    p.iter()
        .map(|f| format!("{} -> {}", f.guest_port, host_port(&f.host, f.host_port)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The command that reaches the guest's SSH port, if it is forwarded.
/// The command that logs in, when the image has an SSH login and port 22
/// is forwarded.
fn ssh_line(user: Option<&str>, p: &[PortForward]) -> Option<String> {
    let user = user?;
    let f = p.iter().find(|f| f.guest_port == 22)?;
    // A forward on every address: the node's own address is what to use.
    let host = match f.host.as_str() {
        "0.0.0.0" | "::" | "" => "NODE-ADDRESS",
        h => h,
    };
    Some(format!("ssh -p {} {user}@{host}", f.host_port))
}

fn vm_table(vms: &[Vm]) {
    let mut t = Table::new(&[
        "NAME",
        "ID",
        "PROJECT",
        "STATE",
        "IMAGE",
        "VCPUS",
        "MEMORY(MiB)",
        "DISK(GiB)",
        "NODE",
        "PORTS",
    ]);
    for v in vms {
        t.row(vec![
            v.name.to_string(),
            v.id.to_string(),
            v.project.to_string(),
            v.state.to_string(),
            v.image.to_string(),
            v.vcpus.to_string(),
            v.memory_mib.to_string(),
            v.disk_gib.to_string(),
            opt(&v.node_id),
            ports_compact(&v.ports),
        ]);
    }
    t.print();
}

fn vm_details(v: &Vm) {
    let labels = if v.labels.is_empty() {
        "-".to_owned()
    } else {
        v.labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let mut fields = vec![
        ("name", v.name.to_string()),
        ("id", v.id.to_string()),
        ("project", v.project.to_string()),
        ("state", v.state.to_string()),
        ("state reason", opt(&v.state_reason)),
        ("desired state", v.desired_state.to_string()),
        ("image", v.image.to_string()),
        ("arch", arch_of(v)),
        ("engine", v.engine.as_str().into()),
        ("flavor", opt(&v.flavor)),
        ("vcpus", v.vcpus.to_string()),
        ("memory", format!("{} MiB", v.memory_mib)),
        ("disk", format!("{} GiB", v.disk_gib)),
        ("hostname", v.hostname.clone()),
        ("labels", labels),
        ("ssh keys", v.ssh_keys.len().to_string()),
        (
            "user data",
            if v.has_user_data { "yes" } else { "no" }.into(),
        ),
        ("node", opt(&v.node_id)),
        (
            "ready by",
            match v.ready_by {
                ReadyBy::Agent => "agent",
                ReadyBy::Process => "process",
            }
            .into(),
        ),
        ("agent version", opt(&v.agent_version)),
        (
            "cloud-init",
            v.cloud_init.map_or("-", CloudInit::as_str).into(),
        ),
        ("network", network_line(v)),
        ("egress", v.egress.as_str().into()),
        ("ports", ports_long(&v.ports)),
    ];
    match ssh_line(v.ssh_user.as_deref(), &v.ports) {
        Some(ssh) => fields.push(("ssh", ssh)),
        None if v.ssh_user.is_none() => fields.push((
            "login",
            format!(
                "no SSH login in this image: byteport vm exec {} -- CMD, or vm console",
                v.name
            ),
        )),
        None => {}
    }
    fields.push(("created", ts!(v.created_at)));
    fields.push(("updated", ts!(v.updated_at)));
    print_fields(&fields);
}

/// How a VM is connected: `bridge bpn0 10.80.0.10`, `user 10.0.2.15`.
fn network_line(v: &Vm) -> String {
    let n = &v.network;
    let Some(mode) = &n.mode else {
        return "-".into();
    };
    let mut parts = vec![mode.clone()];
    parts.extend(n.bridge.clone());
    parts.extend(n.addresses.iter().cloned());
    parts.join(" ")
}

/// A VM's id from its id or name (in `project`, if given).
fn resolve_vm(env: &Env, project: Option<&str>, key: &str) -> Result<String> {
    if let Ok(id) = key.parse::<VmId>() {
        return Ok(id.to_string());
    }
    let mut q = vec![("name", key.to_owned())];
    if let Some(p) = project {
        q.push(("project", p.to_owned()));
    }
    let page: Page<Vm> = decode(&env.client.get("/v1/vms", &q)?)?;
    match page.items.as_slice() {
        [] => match project {
            Some(p) => bail!("no VM named {key} in project {p}"),
            None => bail!("no VM named {key}"),
        },
        [v] => Ok(v.id.to_string()),
        many => {
            let projects: Vec<String> = many.iter().map(|v| v.project.to_string()).collect();
            bail!(
                "several VMs are named {key}, in projects {}; pass --project or the VM's id",
                projects.join(", ")
            )
        }
    }
}

/// Waits for `state`, in chunks the server accepts; returns the VM's JSON.
/// Waits for the VM to reach `state`. On a terminal the state is shown as
/// it changes (the server is asked in short waits, the VM read between).
fn wait_for(env: &Env, id: &str, state: VmState, timeout: u64) -> Result<Value> {
    let mut status = crate::progress::Status::new(format!("waiting for {state}"));
    let r = wait_with(env, id, state, timeout, &mut status);
    status.finish();
    r
}

fn wait_with(
    env: &Env,
    id: &str,
    state: VmState,
    timeout: u64,
    status: &mut crate::progress::Status,
) -> Result<Value> {
    let path = format!("/v1/vms/{}/wait", seg(id));
    let step = if status.shown() { 2 } else { MAX_SERVER_WAIT };
    let mut left = timeout;
    loop {
        if status.shown()
            && let Ok(v) = env.client.get(&format!("/v1/vms/{}", seg(id)), &[])
            && let Ok(vm) = decode::<Vm>(&v)
        {
            status.update(&vm.state.to_string(), vm.state_reason.as_deref());
        }
        let chunk = left.min(step);
        let r = env.client.get(
            &path,
            &[
                ("state", state.to_string()),
                ("timeout_secs", chunk.to_string()),
            ],
        );
        match r {
            Err(e)
                if left > chunk
                    && e.downcast_ref::<ApiError>()
                        .is_some_and(|a| a.status == 504) =>
            {
                left -= chunk;
            }
            other => return other,
        }
    }
}

/// Polls the VM until its guest reports that cloud-init has ended.
fn wait_cloud_init(env: &Env, id: &str, timeout: u64) -> Result<()> {
    let path = format!("/v1/vms/{}", seg(id));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(timeout);
    loop {
        let v = env.client.get(&path, &[])?;
        let vm: Vm = serde_json::from_value(v.clone()).context("the server's VM")?;
        match vm.cloud_init {
            Some(CloudInit::Done) => {
                print_vm(env, &v, false)?;
                return Ok(());
            }
            Some(CloudInit::Error) => {
                print_vm(env, &v, false)?;
                bail!(
                    "cloud-init ended with errors in {} (see `cloud-init status --long` in the guest)",
                    vm.name
                );
            }
            Some(CloudInit::Absent) => {
                bail!("{} has no cloud-init (or it is disabled)", vm.name)
            }
            _ => {}
        }
        if matches!(
            vm.state,
            VmState::Error | VmState::Deleted | VmState::Stopped
        ) {
            bail!(
                "{} is {} before cloud-init finished{}",
                vm.name,
                vm.state,
                vm.state_reason
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default()
            );
        }
        if std::time::Instant::now() >= deadline {
            bail!(
                "cloud-init has not finished in {} after {timeout} s (the VM is {})",
                vm.name,
                vm.state
            );
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

fn read_ssh_keys(files: &[PathBuf]) -> Result<Vec<String>> {
    let mut keys = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(f)
            .with_context(|| format!("cannot read the SSH key file {}", f.display()))?;
        keys.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_owned),
        );
    }
    Ok(keys)
}

fn print_vm(env: &Env, v: &Value, detailed: bool) -> Result<()> {
    if env.json() {
        return print_json(v);
    }
    let vm: Vm = decode(v)?;
    if detailed {
        vm_details(&vm);
    } else {
        let reason = vm
            .state_reason
            .as_deref()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default();
        println!("{} {}: {}{reason}", vm.name, vm.id, vm.state);
    }
    Ok(())
}

fn vm(env: &Env, args: VmArgs) -> Result<()> {
    let c = &env.client;
    let project = args.project.as_deref();
    match args.cmd {
        VmCmd::Create {
            name,
            image,
            engine,
            flavor,
            vcpus,
            memory_mib,
            disk_gib,
            user_data,
            ssh_key,
            label,
            hostname,
            group,
            region,
            policy,
            ports,
            no_egress,
            wait,
            timeout,
        } => {
            // TTStack's form: `--image microvm:tiny`.
            let (engine, image) = match image.split_once(':') {
                Some((e, i)) if engine.is_none() || engine.as_deref() == Some(e) => {
                    (Some(e.to_owned()), i.to_owned())
                }
                Some((e, _)) => anyhow::bail!(
                    "--image names the engine {e}, and --engine {} another",
                    engine.unwrap_or_default()
                ),
                None => (engine, image),
            };
            let mut body = json!({"name": name, "image": image});
            if let Some(e) = engine {
                body["engine"] = json!(e);
            }
            if !ports.is_empty() {
                body["ports"] = json!(ports);
            }
            if no_egress {
                body["egress"] = json!("deny");
            }
            let mut placement = serde_json::Map::new();
            for (k, v) in [("group", group), ("region", region), ("policy", policy)] {
                if let Some(v) = v {
                    placement.insert(k.into(), json!(v));
                }
            }
            if !placement.is_empty() {
                body["placement"] = Value::Object(placement);
            }
            if let Some(p) = project {
                body["project"] = json!(p);
            }
            if let Some(f) = flavor {
                body["flavor"] = json!(f);
            }
            if let Some(n) = vcpus {
                body["vcpus"] = json!(n);
            }
            if let Some(n) = memory_mib {
                body["memory_mib"] = json!(n);
            }
            if let Some(n) = disk_gib {
                body["disk_gib"] = json!(n);
            }
            if let Some(f) = user_data {
                let ud = std::fs::read_to_string(&f)
                    .with_context(|| format!("cannot read the user-data file {}", f.display()))?;
                body["user_data"] = json!(ud);
            }
            let keys = read_ssh_keys(&ssh_key)?;
            if !keys.is_empty() {
                body["ssh_keys"] = json!(keys);
            }
            if !label.is_empty() {
                let labels: serde_json::Map<String, Value> =
                    label.into_iter().map(|(k, v)| (k, json!(v))).collect();
                body["labels"] = Value::Object(labels);
            }
            if let Some(h) = hostname {
                body["hostname"] = json!(h);
            }
            let v = c.value(Method::Post, "/v1/vms", &[], Some(&body))?;
            let v = if wait {
                let vm: Vm = decode(&v)?;
                if !env.json() {
                    println!("created {} {}; waiting for it to run", vm.name, vm.id);
                }
                wait_for(env, &vm.id.to_string(), VmState::Running, timeout)?
            } else {
                v
            };
            print_vm(env, &v, true)
        }
        VmCmd::List {
            state,
            label,
            name,
            limit,
            all,
        } => {
            let mut q: Vec<(&str, String)> = Vec::new();
            if let Some(p) = project {
                q.push(("project", p.to_owned()));
            }
            if let Some(s) = state {
                q.push(("state", s.to_string()));
            }
            if let Some(l) = label {
                q.push(("label", l));
            }
            if let Some(n) = name {
                q.push(("name", n));
            }
            if let Some(l) = limit {
                q.push(("limit", l.to_string()));
            }
            let first = c.get("/v1/vms", &q)?;
            let result = if all {
                let mut items: Vec<Value> = Vec::new();
                let mut page = first;
                loop {
                    let cursor = page
                        .get("next_cursor")
                        .and_then(Value::as_str)
                        .map(str::to_owned);
                    if let Some(Value::Array(a)) = page.get_mut("items").map(Value::take) {
                        items.extend(a);
                    }
                    let Some(cur) = cursor else { break };
                    let mut q2 = q.clone();
                    q2.push(("cursor", cur));
                    page = c.get("/v1/vms", &q2)?;
                }
                json!({"items": items, "next_cursor": null})
            } else {
                first
            };
            if env.json() {
                return print_json(&result);
            }
            let page: Page<Vm> = decode(&result)?;
            vm_table(&page.items);
            if page.next_cursor.is_some() {
                eprintln!("(more VMs: pass --all to list every page)");
            }
            Ok(())
        }
        VmCmd::Show { vm } => {
            let id = resolve_vm(env, project, &vm)?;
            let v = c.get(&format!("/v1/vms/{}", seg(&id)), &[])?;
            print_vm(env, &v, true)
        }
        VmCmd::Stats { vm } => {
            let id = resolve_vm(env, project, &vm)?;
            let v = c.get(&format!("/v1/vms/{}/stats", seg(&id)), &[])?;
            if env.json() {
                return print_json(&v);
            }
            let view: VmStatsView = decode(&v)?;
            let Some(f) = view.measured else {
                println!(
                    "no figures: {}",
                    view.note.as_deref().unwrap_or("not measured yet")
                );
                return Ok(());
            };
            print_fields(&[
                ("measured", ts!(f.at)),
                (
                    "cpu",
                    match f.cpu_percent {
                        Some(p) => format!("{p:.1} % of a host core ({} vCPU given)", view.vcpus),
                        None => "- (one more sample needed)".into(),
                    },
                ),
                (
                    "cpu time",
                    format!("{:.1} s", f.cpu_time_ms as f64 / 1000.0),
                ),
                (
                    "memory",
                    format!(
                        "{} MiB resident of {} MiB",
                        f.memory_rss_mib, view.memory_mib
                    ),
                ),
                (
                    "disk",
                    format!(
                        "{} MiB used on the host of {} GiB",
                        f.disk_used_mib, view.disk_gib
                    ),
                ),
                ("process up", format!("{} s", f.uptime_secs)),
            ]);
            Ok(())
        }
        VmCmd::Wait {
            vm,
            state,
            cloud_init,
            timeout,
        } => {
            let id = resolve_vm(env, project, &vm)?;
            match state {
                Some(state) if !cloud_init => {
                    let v = wait_for(env, &id, state, timeout)?;
                    print_vm(env, &v, false)
                }
                _ => wait_cloud_init(env, &id, timeout),
            }
        }
        VmCmd::Exec(a) => vm_exec(env, project, a),
        VmCmd::Cp { src, dst } => files::vm_cp(env, project, &src, &dst),
        VmCmd::Console { vm, bytes, follow } => {
            if follow {
                // Refuse an https:// server before any request.
                crate::vm_io::WsTarget::new(&c.base, "")?;
            }
            let id = resolve_vm(env, project, &vm)?;
            let path = format!("/v1/vms/{}/console", seg(&id));
            if follow {
                return crate::vm_io::follow(c, &format!("{path}/ws"));
            }
            let q: Vec<(&str, String)> = bytes
                .map(|b| ("bytes", b.to_string()))
                .into_iter()
                .collect();
            let text = c.get_bytes(&path, &q)?;
            if env.json() {
                return print_json(&json!({"vm": id, "console": String::from_utf8_lossy(&text)}));
            }
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            out.write_all(&text)?;
            out.flush()?;
            Ok(())
        }
        VmCmd::Start(a) => vm_action(env, project, a, "start", VmState::Running),
        VmCmd::Stop(a) => vm_action(env, project, a, "stop", VmState::Stopped),
        VmCmd::Restart(a) => vm_action(env, project, a, "restart", VmState::Running),
        VmCmd::Pause(a) => vm_action(env, project, a, "pause", VmState::Paused),
        VmCmd::Resume(a) => vm_action(env, project, a, "resume", VmState::Running),
        VmCmd::Delete(a) => vm_action(env, project, a, "delete", VmState::Deleted),
    }
}

fn vm_exec(env: &Env, project: Option<&str>, a: ExecArgs) -> Result<()> {
    let id = resolve_vm(env, project, &a.vm)?;
    let mut body = json!({"argv": a.argv});
    if !a.env.is_empty() {
        let vars: serde_json::Map<String, Value> =
            a.env.into_iter().map(|(k, v)| (k, json!(v))).collect();
        body["env"] = Value::Object(vars);
    }
    if let Some(d) = a.cwd {
        body["cwd"] = json!(d);
    }
    if let Some(t) = a.timeout {
        body["timeout_secs"] = json!(t);
    }
    if a.stdin {
        use base64::Engine;
        use std::io::Read;
        let mut input = Vec::new();
        std::io::stdin()
            .read_to_end(&mut input)
            .context("cannot read standard input")?;
        body["stdin_base64"] = json!(base64::engine::general_purpose::STANDARD.encode(input));
    }
    let events = env.client.post_stream(
        &format!("/v1/vms/{}/exec", seg(&id)),
        &[],
        &body,
        "application/x-ndjson",
    )?;
    let code = crate::vm_io::relay_exec(
        events,
        env.json(),
        &mut std::io::stdout(),
        &mut std::io::stderr(),
    )?;
    if code == 0 {
        Ok(())
    } else {
        Err(Exit(code).into())
    }
}

fn vm_action(
    env: &Env,
    project: Option<&str>,
    a: ActionArgs,
    action: &str,
    target: VmState,
) -> Result<()> {
    let id = resolve_vm(env, project, &a.vm)?;
    let v = if action == "delete" {
        env.client
            .value(Method::Delete, &format!("/v1/vms/{}", seg(&id)), &[], None)?
    } else {
        env.client.value(
            Method::Post,
            &format!("/v1/vms/{}/{action}", seg(&id)),
            &[],
            None,
        )?
    };
    let v = if a.wait {
        wait_for(env, &id, target, a.timeout)?
    } else {
        v
    };
    print_vm(env, &v, false)
}

// ---------- audit ----------

fn audit(env: &Env, project: Option<String>, limit: Option<u32>) -> Result<()> {
    let mut q: Vec<(&str, String)> = Vec::new();
    if let Some(p) = project {
        q.push(("project", p));
    }
    if let Some(l) = limit {
        q.push(("limit", l.to_string()));
    }
    let v = env.client.get("/v1/audit", &q)?;
    if env.json() {
        return print_json(&v);
    }
    let page: Page<AuditEvent> = decode(&v)?;
    let mut t = Table::new(&["AT", "ACTOR", "ACTION", "TARGET", "STATUS", "RESULT"]);
    for e in &page.items {
        let target = match (&e.target_kind, &e.target_id) {
            (Some(k), Some(i)) => format!("{k}/{i}"),
            (Some(k), None) => k.clone(),
            (None, Some(i)) => i.clone(),
            (None, None) => "-".into(),
        };
        t.row(vec![
            ts!(e.at),
            e.actor.clone(),
            e.action.clone(),
            target,
            e.status.to_string(),
            e.result.clone(),
        ]);
    }
    t.print();
    Ok(())
}

/// A VM's architecture, and how its node runs it once it does:
/// `aarch64 (emulated)`.
pub(crate) fn arch_of(v: &byteport_types::api::Vm) -> String {
    match v.execution {
        Some(x) => format!("{} ({})", v.arch, x.as_str()),
        None => v.arch.clone(),
    }
}
