//! `byteportd`: the BytePort daemon. A thin main that wires the control
//! plane (`byteport-server`) to a listener and a database.

use anyhow::{Context, bail};
use byteport_server::{App, Settings};
use byteport_store::DataStore;
use clap::{Args, Parser, Subcommand};
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The port BytePort listens on unless told otherwise.
const DEFAULT_LISTEN: &str = "127.0.0.1:7480";

#[derive(Parser)]
#[command(name = "byteportd", version, about = "The BytePort daemon")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log as JSON lines.
    #[arg(long, global = true, env = "BYTEPORT_LOG_JSON")]
    log_json: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Run the control plane (API on /v1).
    Server(ServerArgs),
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
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Create a user, reading the password from standard input.
    CreateUser {
        name: String,
        /// Make the user a global admin.
        #[arg(long)]
        admin: bool,
        /// Read the password from standard input (required: no prompts).
        #[arg(long, required = true)]
        password_stdin: bool,
        #[command(flatten)]
        db: DbArgs,
    },
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

async fn serve(args: ServerArgs) -> anyhow::Result<()> {
    let (store, _dir) = open_store(&args.db).await?;
    let backend = store.backend();
    let settings = Settings {
        secure_cookies: args.tls_cert.is_some(),
        ..Settings::default()
    };
    let app = App::new(store, settings)
        .await
        .map_err(|e| anyhow::anyhow!("starting: {e}"))?;
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
    let router = byteport_server::router(app);
    tracing::info!(%url, database = %backend, "serving");
    println!("BytePort API listening on {url} (database: {backend})");
    match (args.tls_cert, args.tls_key) {
        (Some(cert), Some(key)) => serve_tls(args.listen, &cert, &key, router).await,
        _ => {
            let listener = tokio::net::TcpListener::bind(args.listen)
                .await
                .with_context(|| format!("listening on {}", args.listen))?;
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if cli.log_json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    } else {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    }
    match cli.command {
        Command::Server(args) => serve(args).await,
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
        Command::Admin {
            command:
                AdminCommand::CreateUser {
                    name,
                    admin,
                    password_stdin: _,
                    db,
                },
        } => {
            let password = read_password()?;
            let name = name
                .parse()
                .map_err(|e| anyhow::anyhow!("invalid user name: {e}"))?;
            let (store, _) = open_store(&db).await?;
            let app = App::new(store, Settings::default())
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
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
