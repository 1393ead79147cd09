//! `byteportd`: the BytePort daemon. A thin main that wires the control
//! plane (`byteport-server`) to a listener and a database, the node agent
//! (`byteport-node`) to its control plane, or both in one process.

use anyhow::{Context, bail};
use byteport_server::{App, Settings};
use byteport_store::DataStore;
use clap::{Args, FromArgMatches, Parser, Subcommand};
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

mod backup;
mod config;

/// The port BytePort listens on unless told otherwise.
const DEFAULT_LISTEN: &str = "127.0.0.1:7480";

#[derive(Parser)]
#[command(name = "byteportd", version, about = "The BytePort daemon")]
struct Cli {
    /// What to run; `all-in-one` when absent.
    #[command(subcommand)]
    command: Option<Command>,
    /// The configuration file: every flag, by its long name, as a key
    /// (flags and environment variables win over it); read from
    /// /etc/byteport/byteportd.toml when that exists.
    #[arg(long, global = true, env = "BYTEPORT_CONFIG")]
    config: Option<PathBuf>,
    /// How logs are written to standard error: text, or json (one object
    /// per line).
    #[arg(long, global = true, env = "BYTEPORT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// The same as --log-format json.
    #[arg(long, global = true, env = "BYTEPORT_LOG_JSON")]
    log_json: bool,
}

#[derive(Clone, Copy, PartialEq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the control plane and a node agent in one process (the default).
    AllInOne(AllInOneArgs),
    /// Run the control plane (API on /v1).
    Server(ServerArgs),
    /// Run a node agent that dials a control plane.
    Node(NodeArgs),
    /// Print the OpenAPI document (or write it to a file).
    Openapi {
        /// Write to this file instead of standard output.
        #[arg(long)]
        write: Option<PathBuf>,
    },
    /// Local administration, straight on the database.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
    /// The configuration file.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print every setting of a command as it would run (file, environment
    /// and flags applied; secrets masked), in the file's syntax:
    /// `byteportd config show server --listen 0.0.0.0:7480`.
    Show {
        /// all-in-one (the default), server or node, then any of its flags.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
}

#[derive(Args, Clone)]
struct DbArgs {
    /// Where BytePort keeps its data (the SQLite file, certificates).
    #[arg(long, env = "BYTEPORT_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// postgres://... to use PostgreSQL; a SQLite file in the data directory when absent.
    #[arg(long, env = "BYTEPORT_DATABASE_URL")]
    database_url: Option<String>,
}

#[derive(Args)]
struct ServerArgs {
    #[command(flatten)]
    db: DbArgs,
    /// Address to listen on.
    #[arg(long, env = "BYTEPORT_LISTEN", default_value = DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// PEM certificate chain: serve HTTPS (with --tls-key).
    #[arg(long, env = "BYTEPORT_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "BYTEPORT_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Seconds without a heartbeat after which a node is offline.
    #[arg(long, env = "BYTEPORT_NODE_TIMEOUT", default_value_t = 30)]
    node_timeout: u64,
    /// spread (VMs over all nodes) or pack (fill a node first), for VMs
    /// that do not ask.
    #[arg(long, env = "BYTEPORT_PLACEMENT_POLICY", default_value = "spread")]
    placement_policy: String,
    /// vCPUs that may be reserved per host CPU.
    #[arg(long, env = "BYTEPORT_CPU_OVERCOMMIT", default_value_t = 4.0)]
    cpu_overcommit: f64,
    /// Memory that may be reserved per MiB of host memory.
    #[arg(long, env = "BYTEPORT_MEMORY_OVERCOMMIT", default_value_t = 1.0)]
    memory_overcommit: f64,
    /// Where the token-signing and metadata keys are kept (owner-only);
    /// `DATA_DIR/secrets.json` when absent. Every replica on one database
    /// needs a copy of the same file.
    #[arg(long, env = "BYTEPORT_SECRETS_FILE")]
    secrets_file: Option<PathBuf>,
    /// Days audit events are kept; 0 keeps them for ever.
    #[arg(long, env = "BYTEPORT_AUDIT_RETENTION_DAYS", default_value_t = 90)]
    audit_retention_days: u64,
    /// The built web console to serve at `/` (`npm run build` in `web/`);
    /// `web/build` under the working directory when absent and present.
    #[arg(long, env = "BYTEPORT_WEB_DIR")]
    web_dir: Option<PathBuf>,
}

/// The web console's build directory: the one asked for (which must hold
/// `index.html`), or `web/build` here if it was built.
fn web_dir(asked: Option<PathBuf>) -> anyhow::Result<Option<PathBuf>> {
    match asked {
        Some(d) if d.join("index.html").is_file() => Ok(Some(d)),
        Some(d) => bail!(
            "--web-dir {} has no index.html: build the console with `npm ci && npm run build` in web/",
            d.display()
        ),
        None => {
            let d = PathBuf::from("web/build");
            Ok(d.join("index.html").is_file().then_some(d))
        }
    }
}

#[derive(Args, Clone)]
struct NodeOpts {
    /// The node's name; the host's name when absent.
    #[arg(long, env = "BYTEPORT_NODE_NAME")]
    name: Option<String>,
    #[arg(long, env = "BYTEPORT_REGION", default_value = "default")]
    region: String,
    /// The host address that VM port forwards listen on.
    #[arg(long, env = "BYTEPORT_FORWARD_HOST", default_value = "127.0.0.1")]
    forward_host: String,
    /// Host ports handed out for forwards, FIRST-LAST.
    #[arg(long, env = "BYTEPORT_FORWARD_PORTS", default_value = "20000-29999")]
    forward_ports: String,
    /// Seconds a guest has to power off before QEMU is told to quit.
    #[arg(long, env = "BYTEPORT_STOP_TIMEOUT", default_value_t = 20)]
    stop_timeout: u64,
    /// Seconds between heartbeats (changes are sent at once anyway).
    #[arg(long, default_value_t = 5)]
    heartbeat_secs: u64,
    /// auto (try KVM once, else TCG), kvm or tcg.
    #[arg(long, env = "BYTEPORT_ACCEL", default_value = "auto")]
    accel: String,
    /// The QEMU binary.
    #[arg(long, env = "BYTEPORT_QEMU", default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
    /// Run QEMU as this user once it has opened what it needs (`-runas`);
    /// as the node's own user when absent.
    #[arg(long, env = "BYTEPORT_QEMU_USER")]
    qemu_user: Option<String>,
    /// A libvirt connection for the `libvirt` engine, such as
    /// `qemu:///system`; the node offers that engine when libvirtd
    /// answers on it.
    #[arg(long, env = "BYTEPORT_LIBVIRT_URI")]
    libvirt_uri: Option<String>,
    /// The metadata relay's port on 127.0.0.1 (guests reach it at
    /// 10.0.2.254:80); 0 keeps the port used before, or takes a free one.
    #[arg(long, env = "BYTEPORT_METADATA_PORT", default_value_t = 0)]
    metadata_port: u16,
    /// How VMs are connected: bridge (a network per project, nftables),
    /// user (QEMU's restricted user-mode network), or auto (bridge when
    /// running as root with ip, nft and dnsmasq).
    #[arg(long, env = "BYTEPORT_NETWORK", default_value = "auto")]
    network: String,
    /// Run-code clones kept restored and waiting per runtime template
    /// (each holds its RAM); 0 restores each run's clone when it comes.
    #[arg(long, env = "BYTEPORT_RUN_POOL", default_value_t = 1)]
    run_pool: usize,
    /// Whether run-code starts each run as a clone of a runtime's template
    /// (false: every run boots its VM cold, as on a host where templates
    /// cannot be saved).
    #[arg(long, env = "BYTEPORT_RUN_TEMPLATES", default_value_t = true, action = clap::ArgAction::Set)]
    run_templates: bool,
    /// A PEM bundle of the CA that signed the control plane's certificate
    /// (the system's trust store is used too).
    #[arg(long, env = "BYTEPORT_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// Bytes of a VM's serial console log kept before it is cut (the
    /// previous part stays as console.log.1).
    #[arg(long, env = "BYTEPORT_CONSOLE_LOG_MAX", default_value_t = byteport_node::console_log::DEFAULT_MAX)]
    console_log_max: u64,
}

#[derive(Args)]
struct NodeArgs {
    /// The control plane's URL.
    #[arg(long, env = "BYTEPORT_SERVER")]
    server: String,
    /// A join token from `byteport node join-token` (first start only).
    #[arg(long, env = "BYTEPORT_JOIN_TOKEN")]
    join_token: Option<String>,
    /// Where the node keeps VMs, image cache and its credential.
    #[arg(long, env = "BYTEPORT_DATA_DIR")]
    data_dir: Option<PathBuf>,
    #[command(flatten)]
    opts: NodeOpts,
}

#[derive(Args)]
struct AllInOneArgs {
    #[command(flatten)]
    server: ServerArgs,
    #[command(flatten)]
    node: NodeOpts,
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Make new keys in the secrets file: the token-signing key (every
    /// access token ends; sessions refresh), the metadata key (running
    /// VMs keep their old token until they are started again), or both.
    /// Then copy the file to every replica and restart them.
    RotateKeys {
        #[arg(long)]
        jwt: bool,
        #[arg(long)]
        metadata: bool,
        /// The secrets file; `DATA_DIR/secrets.json` when absent.
        #[arg(long, env = "BYTEPORT_SECRETS_FILE")]
        secrets_file: Option<PathBuf>,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Write a consistent copy of a running server's SQLite database and
    /// its secrets file to FILE (a tar archive, owner-only). For
    /// PostgreSQL, use pg_dump (see docs/admin.md).
    Backup {
        file: PathBuf,
        /// The secrets file; `DATA_DIR/secrets.json` when absent.
        #[arg(long, env = "BYTEPORT_SECRETS_FILE")]
        secrets_file: Option<PathBuf>,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Restore a backup into a data directory that has no database yet,
    /// then start the server on it.
    Restore {
        file: PathBuf,
        /// Where the secrets file goes; `DATA_DIR/secrets.json` when absent.
        #[arg(long, env = "BYTEPORT_SECRETS_FILE")]
        secrets_file: Option<PathBuf>,
        /// Where BytePort keeps its data.
        #[arg(long, env = "BYTEPORT_DATA_DIR")]
        data_dir: Option<PathBuf>,
    },
    /// Create a user, reading the password from standard input.
    CreateUser {
        name: String,
        /// Make the user a global admin.
        #[arg(long)]
        admin: bool,
        /// Read the password from standard input (required: no prompts).
        #[arg(long, required = true)]
        password_stdin: bool,
        /// The secrets file; `DATA_DIR/secrets.json` when absent.
        #[arg(long, env = "BYTEPORT_SECRETS_FILE")]
        secrets_file: Option<PathBuf>,
        #[command(flatten)]
        db: DbArgs,
    },
}

/// An error at start, with its detail: the operator reads it, not a client.
fn startup(e: byteport_server::error::AppError) -> anyhow::Error {
    match e {
        byteport_server::error::AppError::Internal(m) => anyhow::anyhow!(m),
        e => anyhow::anyhow!("{e}"),
    }
}

fn default_data_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(d).join("byteport");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".local/share/byteport"),
        None => PathBuf::from("/var/lib/byteport"),
    }
}

/// Makes `path` its owner's only (`mode` 0600).
fn owner_only(path: &std::path::Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("making {} its owner's only", path.display()))
}

async fn open_store(db: &DbArgs) -> anyhow::Result<(DataStore, PathBuf)> {
    let dir = db.data_dir.clone().unwrap_or_else(default_data_dir);
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("creating the data directory {}", dir.display()))?;
    let url = match &db.database_url {
        Some(u) => u.clone(),
        None => format!("sqlite://{}?mode=rwc", dir.join("byteport.db").display()),
    };
    let store = DataStore::connect(&url).await.with_context(|| {
        format!(
            "opening the {} database",
            if url.starts_with("postgres") {
                "PostgreSQL"
            } else {
                "SQLite"
            }
        )
    })?;
    // The database holds the keys and every hash: its owner's only. (The
    // directory stays traversable: a node may run QEMU as another user on
    // VM files below it.)
    if db.database_url.is_none() {
        for f in ["byteport.db", "byteport.db-wal", "byteport.db-shm"] {
            let p = dir.join(f);
            if p.exists() {
                owner_only(&p, 0o600)?;
            }
        }
    }
    Ok((store, dir))
}

fn read_password() -> anyhow::Result<String> {
    let mut s = String::new();
    std::io::stdin()
        .read_to_string(&mut s)
        .context("reading the password from standard input")?;
    let p = s.trim_end_matches(['\n', '\r']).to_owned();
    if p.is_empty() {
        bail!("no password on standard input");
    }
    Ok(p)
}

fn node_config(
    server: &str,
    data_dir: PathBuf,
    join_token: Option<String>,
    o: &NodeOpts,
) -> anyhow::Result<byteport_node::NodeConfig> {
    let name = match &o.name {
        Some(n) => n.clone(),
        None => std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_lowercase())
            .unwrap_or_else(|_| "node-1".into()),
    };
    let name = name
        .parse()
        .map_err(|e| anyhow::anyhow!("invalid node name {name:?}: {e}"))?;
    let (lo, hi) = o
        .forward_ports
        .split_once('-')
        .and_then(|(a, b)| Some((a.parse::<u16>().ok()?, b.parse::<u16>().ok()?)))
        .filter(|(a, b)| a <= b && *a >= 1024)
        .context("--forward-ports is FIRST-LAST, within 1024-65535")?;
    let mut c = byteport_node::NodeConfig::new(server, data_dir, name);
    c.trust = byteport_trust::Trust::load(o.ca_cert.as_deref())?;
    c.join_token = join_token;
    c.region = o.region.clone();
    c.forward_host = o.forward_host.clone();
    c.forward_ports = lo..=hi;
    c.stop_timeout = std::time::Duration::from_secs(o.stop_timeout);
    c.heartbeat_interval = std::time::Duration::from_secs(o.heartbeat_secs.max(1));
    c.accel = o
        .accel
        .parse()
        .map_err(|e: String| anyhow::anyhow!("--accel: {e}"))?;
    c.qemu_binary = o.qemu.clone();
    c.metadata_port = o.metadata_port;
    c.run_pool = o.run_pool.min(64);
    c.run_templates = o.run_templates;
    c.qemu_launcher = std::env::current_exe()
        .map(|p| vec![p.display().to_string(), "qemu-no-thp".into()])
        .unwrap_or_default();
    c.console_log_max = o.console_log_max.max(64 * 1024);
    c.network = o
        .network
        .parse()
        .map_err(|e: String| anyhow::anyhow!("--network: {e}"))?;
    Ok(c)
}

/// The node's engines: QEMU's own, and libvirt when a connection is
/// given and answers (a warning says why not when it does not).
async fn drivers(o: &NodeOpts) -> anyhow::Result<byteport_node::driver::engines::Engines> {
    if let Some(u) = &o.qemu_user
        && !byteport_node::driver::qemu::valid_user(u)
    {
        bail!("--qemu-user {u:?} is not a user name (a-z, 0-9, _ and -)");
    }
    let qemu = byteport_node::driver::qemu::QemuDriver {
        binary: o.qemu.clone(),
        run_as: o.qemu_user.clone(),
    };
    let libvirt = match &o.libvirt_uri {
        Some(uri) => {
            match byteport_node::driver::libvirt::LibvirtDriver::connect(uri, &o.qemu).await {
                Ok(d) => Some(d),
                Err(e) => {
                    tracing::warn!(uri = %uri, "no libvirt engine: {e}");
                    None
                }
            }
        }
        None => None,
    };
    Ok(byteport_node::driver::engines::Engines { qemu, libvirt })
}

async fn node(args: NodeArgs) -> anyhow::Result<()> {
    let dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| default_data_dir().join("node"));
    let cfg = node_config(&args.server, dir, args.join_token.clone(), &args.opts)?;
    tokio::select! {
        r = byteport_node::run(cfg, drivers(&args.opts).await?) => {
            r.map_err(|e| anyhow::anyhow!("{e}"))
        }
        _ = shutdown() => Ok(()),
    }
}

async fn all_in_one(args: AllInOneArgs) -> anyhow::Result<()> {
    let (_, dir) = open_store(&args.server.db).await?;
    let node_dir = dir.join("node");
    let url = format!(
        "{}://{}",
        if args.server.tls_cert.is_some() {
            "https"
        } else {
            "http"
        },
        loopback(args.server.listen)
    );
    let node_opts = args.node.clone();
    let server = args.server;
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let serving = tokio::spawn(serve_with(server, Some(ready_tx)));
    let app = match ready_rx.await {
        Ok(app) => app,
        Err(_) => return serving.await.context("the control plane")?,
    };
    let token = if node_dir.join("node.json").exists() {
        None
    } else {
        Some(
            app.join_token_issue_local()
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?,
        )
    };
    // The node in this process dials this server on loopback: with HTTPS,
    // its certificate must name 127.0.0.1 and be signed by a CA the node
    // trusts (the system's store or --ca-cert).
    let cfg = node_config(&url, node_dir, token, &node_opts)?;
    let engines = drivers(&node_opts).await?;
    tokio::select! {
        r = serving => r.context("the control plane")?,
        r = byteport_node::run(cfg, engines) => r.map_err(|e| anyhow::anyhow!("node agent: {e}")),
    }
}

/// The address to dial a listener on: 0.0.0.0 is reached on loopback.
fn loopback(a: SocketAddr) -> SocketAddr {
    if a.ip().is_unspecified() {
        SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), a.port())
    } else {
        a
    }
}

async fn serve(args: ServerArgs) -> anyhow::Result<()> {
    serve_with(args, None).await
}

async fn serve_with(
    args: ServerArgs,
    ready: Option<tokio::sync::oneshot::Sender<App>>,
) -> anyhow::Result<()> {
    let (store, dir) = open_store(&args.db).await?;
    let backend = store.backend();
    let placement_policy = match args.placement_policy.as_str() {
        "spread" => byteport_scheduler::Policy::Spread,
        "pack" => byteport_scheduler::Policy::Pack,
        p => bail!("--placement-policy {p:?} is not spread or pack"),
    };
    for (flag, v) in [
        ("--cpu-overcommit", args.cpu_overcommit),
        ("--memory-overcommit", args.memory_overcommit),
    ] {
        if !(0.1..=100.0).contains(&v) {
            bail!("{flag} {v} is outside 0.1-100");
        }
    }
    let web_dir = web_dir(args.web_dir.clone())?;
    match &web_dir {
        Some(d) => tracing::info!(dir = %d.display(), "serving the web console"),
        None => tracing::info!("no web console built; / says how to build it"),
    }
    let settings = Settings {
        web_dir,
        secure_cookies: args.tls_cert.is_some(),
        image_dir: dir.join("images"),
        placement_policy,
        overcommit: byteport_scheduler::Overcommit {
            cpu: args.cpu_overcommit,
            memory: args.memory_overcommit,
            disk: 1.0,
        },
        secrets_file: Some(
            args.secrets_file
                .clone()
                .unwrap_or_else(|| dir.join("secrets.json")),
        ),
        audit_retention: (args.audit_retention_days > 0).then(|| {
            std::time::Duration::from_secs(args.audit_retention_days.min(36_500) * 86_400)
        }),
        ..Settings::default()
    };
    let app = App::new(store, settings)
        .await
        .map_err(|e| startup(e).context("starting"))?;
    let scheme = if args.tls_cert.is_some() {
        "https"
    } else {
        "http"
    };
    let url = format!("{scheme}://{}", args.listen);
    if let Some(token) = app
        .bootstrap_token()
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?
    {
        println!("No user exists yet. Create the first admin with:");
        println!("  byteport bootstrap --url {url} --token {token} --user admin --password-stdin");
        println!("or, on this host: byteportd admin create-user admin --admin --password-stdin");
    }
    byteport_server::background::spawn_with(
        app.clone(),
        std::time::Duration::from_secs(args.node_timeout.max(1)),
    );
    let router = byteport_server::router(app.clone());
    tracing::info!(%url, database = %backend, "serving");
    println!("BytePort API listening on {url} (database: {backend})");
    match (args.tls_cert, args.tls_key) {
        (Some(cert), Some(key)) => {
            if let Some(r) = ready {
                let _ = r.send(app);
            }
            serve_tls(args.listen, &cert, &key, router).await
        }
        _ => {
            let listener = tokio::net::TcpListener::bind(args.listen)
                .await
                .with_context(|| format!("listening on {}", args.listen))?;
            if let Some(r) = ready {
                let _ = r.send(app);
            }
            axum::serve(listener, router)
                .with_graceful_shutdown(shutdown())
                .await
                .context("serving")
        }
    }
}

async fn serve_tls(
    addr: SocketAddr,
    cert: &Path,
    key: &Path,
    router: axum::Router,
) -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = axum_server::tls_rustls::RustlsConfig::from_pem_file(cert, key)
        .await
        .context("loading the TLS certificate and key")?;
    let handle = axum_server::Handle::new();
    let h = handle.clone();
    tokio::spawn(async move {
        shutdown().await;
        h.graceful_shutdown(Some(std::time::Duration::from_secs(10)));
    });
    axum_server::bind_rustls(addr, config)
        .handle(handle)
        .serve(router.into_make_service())
        .await
        .context("serving HTTPS")
}

async fn shutdown() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(t) => t,
        Err(_) => return ctrl_c.await.unwrap_or_default(),
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
}

fn main() -> anyhow::Result<()> {
    // What QEMU runs per guest connection to the metadata address: plain
    // threads and blocking I/O, before any runtime starts, since it runs
    // under QEMU's seccomp filter.
    let args: Vec<String> = std::env::args().collect();
    if let [_, cmd, addr] = args.as_slice()
        && cmd == "metadata-pipe"
    {
        return byteport_node::network::pipe_stdio(addr)
            .with_context(|| format!("relaying to {addr}"));
    }
    // What the node starts run-code's QEMUs through.
    if let [_, cmd, qemu, qemu_args @ ..] = args.as_slice()
        && cmd == "qemu-no-thp"
    {
        let e = byteport_node::template::launch_without_huge_pages(qemu, qemu_args);
        bail!("cannot run {qemu}: {e}");
    }
    // The configuration file's settings join the command line as flags.
    let root = <Cli as clap::CommandFactory>::command();
    let argv = config::effective_argv(&root, std::env::args_os().collect())?;
    let cli = Cli::parse_from(argv);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(daemon(cli))
}

async fn daemon(cli: Cli) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if cli.log_json || cli.log_format == LogFormat::Json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    } else {
        use std::io::IsTerminal;
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .init();
    }
    let command = match cli.command {
        Some(c) => c,
        None => {
            // The defaults (and BYTEPORT_* variables) of `all-in-one`.
            let m = <AllInOneArgs as Args>::augment_args(clap::Command::new("all-in-one"))
                .get_matches_from(["all-in-one"]);
            Command::AllInOne(AllInOneArgs::from_arg_matches(&m)?)
        }
    };
    match command {
        Command::AllInOne(args) => all_in_one(args).await,
        Command::Server(args) => serve(args).await,
        Command::Node(args) => node(args).await,
        Command::Openapi { write } => {
            let doc = byteport_server::openapi_json();
            match write {
                Some(p) => {
                    std::fs::write(&p, doc).with_context(|| format!("writing {}", p.display()))
                }
                None => {
                    println!("{doc}");
                    Ok(())
                }
            }
        }
        Command::Config {
            command: ConfigCommand::Show { args },
        } => {
            let root = <Cli as clap::CommandFactory>::command();
            print!("{}", config::show(&root, cli.config.as_deref(), &args)?);
            Ok(())
        }
        Command::Admin {
            command:
                AdminCommand::Backup {
                    file,
                    secrets_file,
                    db,
                },
        } => {
            if db
                .database_url
                .as_deref()
                .is_some_and(|u| u.starts_with("postgres"))
            {
                bail!(
                    "admin backup copies SQLite databases; for PostgreSQL use pg_dump \
                     (docs/admin.md, \"Backups\") and keep a copy of the secrets file"
                );
            }
            // Read only and unmigrated: the server beside it keeps the
            // only writer.
            let dir = db.data_dir.clone().unwrap_or_else(default_data_dir);
            let path = dir.join("byteport.db");
            if !path.is_file() {
                bail!(
                    "no database at {} (--data-dir names another)",
                    path.display()
                );
            }
            let store = DataStore::open_sqlite_read_only(&path)
                .await
                .with_context(|| format!("opening {}", path.display()))?;
            let secrets = secrets_file.unwrap_or_else(|| dir.join("secrets.json"));
            let made = backup::write(&store, &secrets, &file).await?;
            println!("{made}");
            Ok(())
        }
        Command::Admin {
            command:
                AdminCommand::Restore {
                    file,
                    secrets_file,
                    data_dir,
                },
        } => {
            let dir = data_dir.unwrap_or_else(default_data_dir);
            let secrets = secrets_file.unwrap_or_else(|| dir.join("secrets.json"));
            let restored = backup::restore(&file, &dir, &secrets)?;
            // Open it once: migrated forward, or refused if newer.
            let (store, _) = open_store(&DbArgs {
                data_dir: Some(dir.clone()),
                database_url: None,
            })
            .await?;
            drop(store);
            println!("{restored}");
            Ok(())
        }
        Command::Admin {
            command:
                AdminCommand::RotateKeys {
                    jwt,
                    metadata,
                    secrets_file,
                    db,
                },
        } => {
            if !jwt && !metadata {
                bail!("say what to rotate: --jwt, --metadata, or both");
            }
            let (store, dir) = open_store(&db).await?;
            let path = secrets_file.unwrap_or_else(|| dir.join("secrets.json"));
            byteport_server::app::secrets::rotate(
                &store,
                &path,
                byteport_server::app::secrets::Rotate { jwt, metadata },
            )
            .await
            .map_err(startup)?;
            println!(
                "new keys in {}: copy it to every replica and restart them",
                path.display()
            );
            Ok(())
        }
        Command::Admin {
            command:
                AdminCommand::CreateUser {
                    name,
                    admin,
                    password_stdin: _,
                    secrets_file,
                    db,
                },
        } => {
            let password = read_password()?;
            let name = name
                .parse()
                .map_err(|e| anyhow::anyhow!("invalid user name: {e}"))?;
            let (store, dir) = open_store(&db).await?;
            let settings = Settings {
                secrets_file: Some(secrets_file.unwrap_or_else(|| dir.join("secrets.json"))),
                ..Settings::default()
            };
            let app = App::new(store, settings).await.map_err(startup)?;
            let ctx = byteport_server::app::Ctx::new(byteport_server::app::Actor::Anonymous);
            let u = app
                .user_create_unchecked(
                    &ctx,
                    byteport_types::api::UserCreate {
                        name,
                        password,
                        admin,
                    },
                )
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            app.audit_record(&ctx, "admin_create_user", 201, "ok").await;
            println!(
                "created user {} ({}){}",
                u.name,
                u.id,
                if u.admin { ", admin" } else { "" }
            );
            Ok(())
        }
    }
}
