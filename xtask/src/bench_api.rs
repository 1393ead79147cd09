//! `cargo xtask bench api`: API throughput and latency on SQLite and on
//! PostgreSQL.
//!
//! Builds the release daemon, starts it once per database (SQLite, then a
//! throwaway PostgreSQL), fills it with 10,000 VMs, and drives it with a
//! small load generator written here: N keep-alive HTTP/1.1 connections,
//! each sending one request at a time for a fixed duration after a
//! warm-up. Every request is authenticated with an API token (`bpt_...`),
//! except the `/healthz` baseline. See `docs/benchmarks.md`.
//!
//! Options: `--duration SECS` (default 5), `--warmup SECS` (default 1),
//! `--concurrency N` (default 16), `--vms N` (default 10,000),
//! `--sqlite-only`, `--no-build`, `--bin PATH` (another daemon binary;
//! implies `--no-build`), `--tls` (SQLite once more over HTTPS, with a
//! certificate from a CA made for the run, side by side with plain HTTP),
//! `--nodes N` (default 1000: simulated nodes that hold 20 VMs each and
//! heartbeat, reporting every VM), `--streams N` (default 1000: open
//! `/v1/events` streams whose cost in database statements per second is
//! measured against the same replica with none open), `--perf DIR`
//! (records each scenario of the server with Linux `perf` into DIR and
//! prints its hottest symbols).

use anyhow::{Context, bail};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PASSWORD: &str = "bench-password";
const IMAGE_SHA256: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

struct Opts {
    duration: Duration,
    warmup: Duration,
    concurrency: usize,
    vms: usize,
    nodes: usize,
    streams: usize,
    sqlite_only: bool,
    tls: bool,
    build: bool,
    bin: Option<PathBuf>,
    perf: Option<PathBuf>,
}

fn parse_args(args: &[&str]) -> anyhow::Result<Opts> {
    let mut o = Opts {
        duration: Duration::from_secs(5),
        warmup: Duration::from_secs(1),
        concurrency: 16,
        vms: 10_000,
        nodes: 1000,
        streams: 1000,
        sqlite_only: false,
        tls: false,
        build: true,
        bin: None,
        perf: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = |name: &str| -> anyhow::Result<f64> {
            let v = it.next().with_context(|| format!("{name} needs a value"))?;
            v.parse::<f64>()
                .ok()
                .filter(|x| x.is_finite() && *x >= 0.0)
                .with_context(|| format!("{name}: not a number: {v}"))
        };
        match *a {
            "--duration" => o.duration = Duration::from_secs_f64(val(a)?),
            "--warmup" => o.warmup = Duration::from_secs_f64(val(a)?),
            "--concurrency" => o.concurrency = (val(a)? as usize).max(1),
            "--vms" => o.vms = (val(a)? as usize).max(1),
            "--nodes" => o.nodes = (val(a)? as usize).max(1),
            "--streams" => o.streams = val(a)? as usize,
            "--sqlite-only" => o.sqlite_only = true,
            "--tls" => o.tls = true,
            "--no-build" => o.build = false,
            "--bin" => {
                let v = it.next().context("--bin needs a path")?;
                o.bin = Some(PathBuf::from(v));
                o.build = false;
            }
            "--perf" => {
                let v = it.next().context("--perf needs a directory")?;
                std::fs::create_dir_all(v).with_context(|| format!("creating {v}"))?;
                o.perf = Some(PathBuf::from(v));
            }
            other => bail!(
                "unknown option {other}; usage: cargo xtask bench api [--duration SECS] \
                 [--warmup SECS] [--concurrency N] [--vms N] [--nodes N] [--streams N] [--sqlite-only] [--no-build] [--bin PATH] [--perf DIR]"
            ),
        }
    }
    if o.duration.is_zero() {
        bail!("--duration must be positive");
    }
    Ok(o)
}

pub fn run(root: &Path, args: &[&str]) -> anyhow::Result<()> {
    let opts = parse_args(args)?;
    let bin = crate::release_daemon(root, opts.build, opts.bin.clone())?;
    // The load generator gets one thread: on a small machine the server
    // should have the rest.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;

    let sqlite = rt.block_on(bench_one(&bin, "sqlite", None, &opts))?;
    print_table("SQLite", &sqlite, &opts);
    let tls = if opts.tls {
        let ca = tls_setup()?;
        let r = rt.block_on(bench_one(&bin, "sqlite-tls", None, &opts));
        let _ = TLS.lock().map(|mut t| t.take());
        let _ = std::fs::remove_dir_all(&ca);
        let r = r?;
        print_table("SQLite over HTTPS", &r, &opts);
        Some(r)
    } else {
        None
    };
    let pg = if opts.sqlite_only {
        None
    } else {
        let pg = crate::pg::Postgres::start().context("starting PostgreSQL for the benchmark")?;
        eprintln!("PostgreSQL for the benchmark: {}", pg.url);
        let r = rt.block_on(bench_one(&bin, "pg", Some(&pg.url), &opts));
        drop(pg);
        let r = r?;
        print_table("PostgreSQL", &r, &opts);
        Some(r)
    };

    let mut line = String::from("RESULT");
    let mut push = |prefix: &str, r: &DbResults| {
        for (name, s) in [
            ("list", &r.list),
            ("get", &r.get),
            ("create", &r.create),
            ("heartbeat", &r.heartbeat),
        ] {
            line.push_str(&format!(
                " {prefix}_{name}_rps={:.0} {prefix}_{name}_p99_ms={:.1}",
                s.rps(),
                s.p99_ms()
            ));
        }
        line.push_str(&format!(
            " {prefix}_db_statements_per_s_idle={:.1} {prefix}_db_statements_per_s_streams={:.1}",
            r.streams.idle_per_s, r.streams.with_per_s
        ));
    };
    push("sqlite", &sqlite);
    if let Some(t) = &tls {
        push("tls", t);
    }
    if let Some(pg) = &pg {
        push("pg", pg);
    }
    if let Some(t) = &tls {
        for (name, plain, over) in [
            ("list", &sqlite.list, &t.list),
            ("get", &sqlite.get, &t.get),
            ("create", &sqlite.create, &t.create),
        ] {
            line.push_str(&format!(
                " tls_{name}_ratio={:.3}",
                over.rps() / plain.rps()
            ));
        }
    }
    line.push_str(&format!(
        " heartbeats_per_s={:.0} baseline_rps={:.0}",
        sqlite.heartbeat.rps(),
        sqlite.baseline.rps()
    ));
    println!("{line}");
    Ok(())
}

// ---------- the server under test ----------

/// A running `byteportd server`, killed on drop (also on error paths).
struct Server {
    child: Child,
    addr: String,
    data_dir: PathBuf,
    log_path: PathBuf,
    stdout_thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(t) = self.stdout_thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Starts the daemon and returns it with the bootstrap token it printed.
async fn start_server(
    bin: &Path,
    label: &str,
    database_url: Option<&str>,
) -> anyhow::Result<(Server, String)> {
    let port = free_port()?;
    let addr = format!("127.0.0.1:{port}");
    let data_dir =
        std::env::temp_dir().join(format!("byteport-bench-{}-{label}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data_dir);
    std::fs::create_dir_all(&data_dir)?;
    // The log stays after the run (outside the data directory), for a look.
    let log_path =
        std::env::temp_dir().join(format!("byteport-bench-{}-{label}.log", std::process::id()));
    let log = std::fs::File::create(&log_path)?;
    let mut cmd = Command::new(bin);
    cmd.args(["server", "--listen", &addr, "--data-dir"])
        .arg(&data_dir)
        .env_remove("BYTEPORT_TLS_CERT")
        .env_remove("BYTEPORT_TLS_KEY")
        .env_remove("BYTEPORT_DATABASE_URL")
        .env_remove("BYTEPORT_LOG_JSON")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log));
    if let Some(u) = database_url {
        cmd.args(["--database-url", u]);
    }
    if let Some((cert, key)) = TLS
        .lock()
        .ok()
        .and_then(|t| t.as_ref().map(|t| (t.cert.clone(), t.key.clone())))
    {
        cmd.arg("--tls-cert").arg(cert).arg("--tls-key").arg(key);
    }
    eprintln!("+ {cmd:?}");
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let stdout = child.stdout.take().context("no stdout")?;
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    // Read every line (so the pipe never fills) and hand over the token.
    let stdout_thread = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let mut words = line.split_whitespace();
            while let Some(w) = words.next() {
                if w == "--token"
                    && let Some(t) = words.next()
                {
                    let _ = tx.send(t.to_owned());
                }
            }
        }
    });
    let mut server = Server {
        child,
        addr,
        data_dir,
        log_path: log_path.clone(),
        stdout_thread: Some(stdout_thread),
    };

    let deadline = Instant::now() + Duration::from_secs(60);
    let token = loop {
        match rx.try_recv() {
            Ok(t) => break t,
            Err(std::sync::mpsc::TryRecvError::Empty) => {}
            Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                bail!("byteportd exited without printing a bootstrap token; its log:\n{log}");
            }
        }
        if let Some(st) = server.child.try_wait()? {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            bail!("byteportd exited ({st}) before printing a bootstrap token; its log:\n{log}");
        }
        if Instant::now() > deadline {
            bail!("no bootstrap token from byteportd within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    // Wait for /healthz.
    loop {
        if let Ok(mut c) = Conn::connect(&server.addr).await {
            let req = Req::get(&server.addr, "/healthz", None);
            if let Ok((200, _)) = c.send(&req.bytes).await {
                break;
            }
        }
        if let Some(st) = server.child.try_wait()? {
            bail!("byteportd exited ({st}) before answering /healthz");
        }
        if Instant::now() > deadline {
            bail!("byteportd did not answer /healthz within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok((server, token))
}

// ---------- a minimal HTTP/1.1 client ----------

/// One request, serialised once and sent as is.
#[derive(Clone)]
struct Req {
    bytes: Vec<u8>,
}

impl Req {
    fn get(host: &str, path: &str, bearer: Option<&str>) -> Req {
        Req::new("GET", host, path, bearer, None)
    }

    fn json(
        method: &str,
        host: &str,
        path: &str,
        bearer: Option<&str>,
        body: &serde_json::Value,
    ) -> Req {
        Req::new(method, host, path, bearer, Some(body.to_string()))
    }

    fn new(
        method: &str,
        host: &str,
        path: &str,
        bearer: Option<&str>,
        body: Option<String>,
    ) -> Req {
        let mut s = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\n");
        if let Some(b) = bearer {
            s.push_str(&format!("Authorization: Bearer {b}\r\n"));
        }
        if let Some(body) = &body {
            s.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        s.push_str("\r\n");
        if let Some(body) = body {
            s.push_str(&body);
        }
        Req {
            bytes: s.into_bytes(),
        }
    }
}

/// A keep-alive connection. One request in flight at a time.
/// A connection's byte stream: plain TCP, or TLS over it.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// Set while the HTTPS server is measured: the server is started with this
/// certificate, and every connection then speaks TLS to it (one handshake
/// per connection; connections are kept alive).
struct TlsRun {
    connector: tokio_rustls::TlsConnector,
    cert: PathBuf,
    key: PathBuf,
}

static TLS: std::sync::Mutex<Option<TlsRun>> = std::sync::Mutex::new(None);

/// Makes a CA and a certificate for 127.0.0.1 in a temp directory and sets
/// [`TLS`] for the next server; returns the directory.
fn tls_setup() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("byteport-bench-{}-ca", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let ca = byteport_testkit::daemon::TestCa::new(&dir);
    let trust =
        byteport_trust::Trust::load(Some(&ca.ca_cert)).map_err(|e| anyhow::anyhow!("{e}"))?;
    *TLS.lock().map_err(|_| anyhow::anyhow!("poisoned"))? = Some(TlsRun {
        connector: tokio_rustls::TlsConnector::from(trust.rustls()),
        cert: ca.server_cert,
        key: ca.server_key,
    });
    Ok(dir)
}

struct Conn {
    stream: Box<dyn Io>,
    /// Bytes read but not yet consumed.
    buf: Vec<u8>,
    /// The server said `Connection: close` (or sent a body without length).
    closed: bool,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

impl Conn {
    async fn connect(addr: &str) -> anyhow::Result<Conn> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let tls = TLS
            .lock()
            .ok()
            .and_then(|t| t.as_ref().map(|t| t.connector.clone()));
        let stream: Box<dyn Io> = match tls {
            Some(c) => {
                let name =
                    byteport_trust::server_name("127.0.0.1").map_err(|e| anyhow::anyhow!("{e}"))?;
                Box::new(c.connect(name, tcp).await?)
            }
            None => Box::new(tcp),
        };
        Ok(Conn {
            stream,
            buf: Vec::with_capacity(64 * 1024),
            closed: false,
        })
    }

    /// Reads more bytes into `buf`; 0 at end of stream.
    async fn fill(&mut self) -> anyhow::Result<usize> {
        let len = self.buf.len();
        if self.buf.capacity() - len < 16 * 1024 {
            self.buf.reserve(64 * 1024);
        }
        let n = self.stream.read_buf(&mut self.buf).await?;
        Ok(n)
    }

    /// Reads until `buf` holds at least `n` bytes.
    async fn need(&mut self, n: usize) -> anyhow::Result<()> {
        while self.buf.len() < n {
            if self.fill().await? == 0 {
                bail!("connection closed mid-response");
            }
        }
        Ok(())
    }

    /// Reads a CRLF-terminated line (without the CRLF) from `buf`.
    async fn line(&mut self) -> anyhow::Result<String> {
        loop {
            if let Some(p) = find(&self.buf, b"\r\n") {
                let l = String::from_utf8_lossy(&self.buf[..p]).into_owned();
                self.buf.drain(..p + 2);
                return Ok(l);
            }
            if self.fill().await? == 0 {
                bail!("connection closed mid-response");
            }
        }
    }

    /// Sends a request, returns the status and the body.
    async fn send(&mut self, req: &[u8]) -> anyhow::Result<(u16, Vec<u8>)> {
        if self.closed {
            bail!("connection closed by the server");
        }
        self.stream.write_all(req).await?;
        let head_end = loop {
            if let Some(p) = find(&self.buf, b"\r\n\r\n") {
                break p;
            }
            if self.fill().await? == 0 {
                bail!("connection closed before a response");
            }
        };
        let head = std::str::from_utf8(&self.buf[..head_end])
            .context("response head is not UTF-8")?
            .to_owned();
        self.buf.drain(..head_end + 4);
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or("");
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("bad status line: {status_line:?}"))?;
        let mut content_length = None;
        let mut chunked = false;
        for l in lines {
            let Some((k, v)) = l.split_once(':') else {
                continue;
            };
            let v = v.trim();
            if k.eq_ignore_ascii_case("content-length") {
                content_length = Some(v.parse::<usize>().context("bad content-length")?);
            } else if k.eq_ignore_ascii_case("transfer-encoding") {
                chunked = v.to_ascii_lowercase().contains("chunked");
            } else if k.eq_ignore_ascii_case("connection") {
                self.closed |= v.eq_ignore_ascii_case("close");
            }
        }
        let body = if chunked {
            let mut body = Vec::new();
            loop {
                let size_line = self.line().await?;
                let size =
                    usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
                        .with_context(|| format!("bad chunk size {size_line:?}"))?;
                if size == 0 {
                    // Trailers, up to the empty line.
                    while !self.line().await?.is_empty() {}
                    break;
                }
                self.need(size + 2).await?;
                body.extend_from_slice(&self.buf[..size]);
                self.buf.drain(..size + 2);
            }
            body
        } else if let Some(n) = content_length {
            self.need(n).await?;
            self.buf.drain(..n).collect()
        } else if status == 204 || status == 304 || (100..200).contains(&status) {
            Vec::new()
        } else {
            // No length: the body runs to the end of the stream.
            while self.fill().await? != 0 {}
            self.closed = true;
            std::mem::take(&mut self.buf)
        };
        Ok((status, body))
    }
}

/// Logs `name` in (with the benchmark's password); its access token.
async fn login(c: &mut Conn, host: &str, name: &str) -> anyhow::Result<String> {
    let login = call(
        c,
        Req::json(
            "POST",
            host,
            "/v1/auth/login",
            None,
            &serde_json::json!({"name": name, "password": PASSWORD}),
        ),
        200,
        &format!("log {name} in"),
    )
    .await?;
    Ok(login["access_token"]
        .as_str()
        .context("login: no access_token")?
        .to_owned())
}

/// A setup call that must answer `want`; returns the JSON body.
async fn call(c: &mut Conn, req: Req, want: u16, what: &str) -> anyhow::Result<serde_json::Value> {
    let (st, body) = c.send(&req.bytes).await.with_context(|| what.to_owned())?;
    if st != want {
        bail!(
            "{what}: HTTP {st} (wanted {want}): {}",
            String::from_utf8_lossy(&body)
        );
    }
    if body.is_empty() {
        return Ok(serde_json::Value::Null);
    }
    serde_json::from_slice(&body).with_context(|| format!("{what}: response is not JSON"))
}

// ---------- the benchmark ----------

#[derive(Default)]
struct Stats {
    /// Every measured request's latency in microseconds, sorted.
    lat_us: Vec<u32>,
    ok: u64,
    errors: u64,
    /// Transport failures (reconnected), part of `errors`.
    io_errors: u64,
    secs: f64,
    first_error: Option<String>,
}

impl Stats {
    /// Successful (2xx) responses per second.
    fn rps(&self) -> f64 {
        if self.secs > 0.0 {
            self.ok as f64 / self.secs
        } else {
            0.0
        }
    }

    fn pct_ms(&self, p: f64) -> f64 {
        if self.lat_us.is_empty() {
            return 0.0;
        }
        let rank = ((p * self.lat_us.len() as f64).ceil() as usize).clamp(1, self.lat_us.len());
        f64::from(self.lat_us[rank - 1]) / 1000.0
    }

    fn p50_ms(&self) -> f64 {
        self.pct_ms(0.50)
    }

    fn p99_ms(&self) -> f64 {
        self.pct_ms(0.99)
    }
}

struct DbResults {
    baseline: Stats,
    list: Stats,
    get: Stats,
    create: Stats,
    heartbeat: Stats,
    streams: StreamCost,
}

/// Builds the request for connection `conn`, iteration `i`.
type MakeReq = Arc<dyn Fn(usize, u64) -> Req + Send + Sync>;

/// Runs `concurrency` connections, each sending `make(conn, i)` back to
/// back for `warmup + duration`; measures the requests sent after the warm-up.
async fn load(addr: &str, make: MakeReq, opts: &Opts) -> Stats {
    let start = Instant::now();
    let measure_from = start + opts.warmup;
    let end = measure_from + opts.duration;
    let mut tasks = Vec::new();
    for conn_ix in 0..opts.concurrency {
        let make = make.clone();
        let addr = addr.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut s = Stats::default();
            let mut conn: Option<Conn> = None;
            let mut i: u64 = 0;
            loop {
                let t0 = Instant::now();
                if t0 >= end {
                    break;
                }
                let c = match conn.as_mut() {
                    Some(c) => c,
                    None => match Conn::connect(&addr).await {
                        Ok(c) => conn.insert(c),
                        Err(e) => {
                            if t0 >= measure_from {
                                s.errors += 1;
                                s.io_errors += 1;
                                s.first_error.get_or_insert_with(|| format!("connect: {e}"));
                            }
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    },
                };
                let req = make(conn_ix, i);
                i += 1;
                let res = c.send(&req.bytes).await;
                let measured = t0 >= measure_from;
                match res {
                    Ok((st, body)) => {
                        if measured {
                            s.lat_us
                                .push(t0.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                            if (200..300).contains(&st) {
                                s.ok += 1;
                            } else {
                                s.errors += 1;
                                s.first_error.get_or_insert_with(|| {
                                    format!("HTTP {st}: {}", String::from_utf8_lossy(&body))
                                });
                            }
                        }
                        if c.closed {
                            conn = None;
                        }
                    }
                    Err(e) => {
                        if measured {
                            s.errors += 1;
                            s.io_errors += 1;
                            s.first_error
                                .get_or_insert_with(|| format!("transport: {e:#}"));
                        }
                        conn = None;
                    }
                }
            }
            s
        }));
    }
    let mut total = Stats::default();
    for t in tasks {
        match t.await {
            Ok(s) => {
                total.lat_us.extend(s.lat_us);
                total.ok += s.ok;
                total.errors += s.errors;
                total.io_errors += s.io_errors;
                if total.first_error.is_none() {
                    total.first_error = s.first_error;
                }
            }
            Err(e) => {
                total.errors += 1;
                total
                    .first_error
                    .get_or_insert_with(|| format!("load task: {e}"));
            }
        }
    }
    total.lat_us.sort_unstable();
    total.secs = opts.duration.as_secs_f64();
    total
}

async fn bench_one(
    bin: &Path,
    label: &str,
    database_url: Option<&str>,
    opts: &Opts,
) -> anyhow::Result<DbResults> {
    let (server, bootstrap) = start_server(bin, label, database_url).await?;
    let addr = server.addr.clone();
    let host = addr.as_str();
    eprintln!(
        "[{label}] byteportd up on {addr} (log: {}); setting up",
        server.log_path.display()
    );

    let mut c = Conn::connect(host).await?;
    call(
        &mut c,
        Req::json(
            "POST",
            host,
            "/v1/bootstrap",
            None,
            &serde_json::json!({"token": bootstrap, "name": "admin", "password": PASSWORD}),
        ),
        201,
        "bootstrap",
    )
    .await?;
    let jwt = login(&mut c, host, "admin").await?;
    let tok = call(
        &mut c,
        Req::json(
            "POST",
            host,
            "/v1/tokens",
            Some(&jwt),
            &serde_json::json!({"name": "bench"}),
        ),
        201,
        "create the API token",
    )
    .await?;
    let token: Arc<str> = tok["secret"].as_str().context("token: no secret")?.into();
    if !token.starts_with("bpt_") {
        bail!(
            "the API token does not look like one: {}",
            &token[..token.len().min(8)]
        );
    }
    call(
        &mut c,
        Req::json(
            "POST",
            host,
            "/v1/images",
            Some(&token),
            &serde_json::json!({
                "name": "tiny", "os_family": "linux", "os_version": "1", "format": "qcow2",
                "size_bytes": 1_048_576, "sha256": IMAGE_SHA256,
            }),
        ),
        201,
        "create the image",
    )
    .await?;
    call(
        &mut c,
        Req::json(
            "PUT",
            host,
            "/v1/projects/default/quota",
            Some(&token),
            &serde_json::json!({
                "max_vms": 100_000, "max_vcpus": 1_000_000,
                "max_memory_mib": 1_000_000_000_u64, "max_disk_gib": 1_000_000_000_u64,
            }),
        ),
        200,
        "raise the quota",
    )
    .await?;
    let t0 = Instant::now();
    let mut vm_id = String::new();
    for n in 1..=opts.vms {
        let vm = call(
            &mut c,
            Req::json(
                "POST",
                host,
                "/v1/vms",
                Some(&token),
                &serde_json::json!({"name": format!("vm-{n}"), "image": "tiny", "flavor": "m1.tiny"}),
            ),
            202,
            &format!("create VM vm-{n}"),
        )
        .await
        .with_context(|| format!("server log: {}", server.log_path.display()))?;
        if n == opts.vms.div_ceil(2) {
            vm_id = vm["id"].as_str().context("VM without id")?.to_owned();
        }
    }
    eprintln!(
        "[{label}] created {} VMs in {:.1} s (one connection, sequential)",
        opts.vms,
        t0.elapsed().as_secs_f64()
    );
    let list_path = "/v1/vms?project=default&limit=100";
    let page = call(
        &mut c,
        Req::get(host, list_path, Some(&token)),
        200,
        "list VMs",
    )
    .await?;
    let n_items = page["items"].as_array().map_or(0, Vec::len);
    if n_items != opts.vms.min(100) {
        bail!(
            "the VM list returned {n_items} items, wanted {}",
            opts.vms.min(100)
        );
    }
    drop(c);

    let host_s: Arc<str> = addr.as_str().into();
    let pid = server.child.id();
    let run = |name: &'static str, make: MakeReq| scenario(label, name, &addr, make, opts, pid);

    let h = host_s.clone();
    let baseline = run(
        "baseline GET /healthz",
        Arc::new(move |_, _| Req::get(&h, "/healthz", None)),
    )
    .await;
    let (h, t) = (host_s.clone(), token.clone());
    let list = run(
        "GET /v1/vms (page of 100)",
        Arc::new(move |_, _| Req::get(&h, list_path, Some(&t))),
    )
    .await;
    let (h, t) = (host_s.clone(), token.clone());
    let get_path = format!("/v1/vms/{vm_id}");
    let get = run(
        "GET /v1/vms/{id}",
        Arc::new(move |_, _| Req::get(&h, &get_path, Some(&t))),
    )
    .await;
    let (h, t) = (host_s.clone(), token.clone());
    let create = run(
        "POST /v1/vms",
        Arc::new(move |conn, i| {
            Req::json(
                "POST",
                &h,
                "/v1/vms",
                Some(&t),
                &serde_json::json!({"name": format!("bench-c-{conn}-{i}"), "image": "tiny", "flavor": "m1.tiny"}),
            )
        }),
    )
    .await;
    // Before the heartbeats: their nodes going quiet afterwards would
    // change VMs while the idle replica is measured.
    let streams = stream_cost(label, &addr, &token, opts)
        .await
        .with_context(|| format!("server log: {}", server.log_path.display()))?;
    let heartbeat = heartbeats(label, &addr, &token, opts, pid)
        .await
        .with_context(|| format!("server log: {}", server.log_path.display()))?;
    drop(server);
    Ok(DbResults {
        baseline,
        list,
        get,
        create,
        heartbeat,
        streams,
    })
}

/// What open event streams cost the database: statements per second of
/// the replica with nothing changing, without streams and with them.
#[derive(Default)]
struct StreamCost {
    streams: usize,
    idle_per_s: f64,
    with_per_s: f64,
}

/// Streams one user may hold open (the server's limit).
const STREAMS_PER_USER: usize = 32;
/// How long each statement count runs.
const STREAM_WINDOW: Duration = Duration::from_secs(5);

/// The replica's `byteport_db_statements_total` and `byteport_event_streams`.
async fn statements(c: &mut Conn, host: &str) -> anyhow::Result<(u64, u64)> {
    let (st, body) = c.send(&Req::get(host, "/metrics", None).bytes).await?;
    if st != 200 {
        bail!("/metrics: HTTP {st}");
    }
    let text = String::from_utf8_lossy(&body);
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .with_context(|| format!("/metrics has no {name}"))
    };
    Ok((
        value("byteport_db_statements_total")?,
        value("byteport_event_streams")?,
    ))
}

/// Statements per second over [`STREAM_WINDOW`]; checks `streams` are open.
async fn statements_per_s(c: &mut Conn, host: &str, streams: u64) -> anyhow::Result<f64> {
    let (a, open) = statements(c, host).await?;
    if open != streams {
        bail!("{open} event streams open, wanted {streams}");
    }
    let t0 = Instant::now();
    tokio::time::sleep(STREAM_WINDOW).await;
    // The first scrape's own statements are in the difference: take
    // a second scrape's away.
    let (b, _) = statements(c, host).await?;
    let (b2, _) = statements(c, host).await?;
    let scrape = b2 - b;
    Ok((b - a).saturating_sub(scrape) as f64 / t0.elapsed().as_secs_f64())
}

async fn stream_cost(
    label: &str,
    host: &str,
    token: &str,
    opts: &Opts,
) -> anyhow::Result<StreamCost> {
    if opts.streams == 0 {
        return Ok(StreamCost::default());
    }
    let mut c = Conn::connect(host).await?;
    if let Err(e) = statements(&mut c, host).await {
        eprintln!("[{label}] event streams not measured: {e:#} (a daemon without the counter)");
        return Ok(StreamCost::default());
    }
    let users = opts.streams.div_ceil(STREAMS_PER_USER);
    let mut bearers = Vec::new();
    for u in 0..users {
        let name = format!("bench-s-{u}");
        call(
            &mut c,
            Req::json(
                "POST",
                host,
                "/v1/users",
                Some(token),
                &serde_json::json!({"name": name, "password": PASSWORD}),
            ),
            201,
            "create a stream user",
        )
        .await?;
        call(
            &mut c,
            Req::json(
                "PUT",
                host,
                &format!("/v1/projects/default/members/{name}"),
                Some(token),
                &serde_json::json!({"role": "viewer"}),
            ),
            200,
            "add the stream user",
        )
        .await?;
        bearers.push(login(&mut c, host, &name).await?);
    }
    eprintln!(
        "[{label}] event streams: statements/s with none open, then with {} open ({} s each)",
        opts.streams,
        STREAM_WINDOW.as_secs()
    );
    let idle_per_s = statements_per_s(&mut c, host, 0).await?;
    let mut open = Vec::new();
    for i in 0..opts.streams {
        let mut s = Conn::connect(host).await?;
        let req = Req::get(host, "/v1/events", Some(&bearers[i / STREAMS_PER_USER]));
        s.stream.write_all(&req.bytes).await?;
        while find(&s.buf, b"\r\n\r\n").is_none() {
            if s.fill().await? == 0 {
                bail!("event stream {i} closed before its head");
            }
        }
        if !s.buf.starts_with(b"HTTP/1.1 200") {
            bail!(
                "event stream {i}: {}",
                String::from_utf8_lossy(&s.buf[..s.buf.len().min(200)])
            );
        }
        // Read what the stream sends, so it never falls behind.
        open.push(tokio::spawn(async move {
            loop {
                s.buf.clear();
                if !matches!(s.fill().await, Ok(n) if n > 0) {
                    break;
                }
            }
        }));
    }
    let with_per_s = statements_per_s(&mut c, host, opts.streams as u64).await;
    for t in &open {
        t.abort();
    }
    Ok(StreamCost {
        streams: opts.streams,
        idle_per_s,
        with_per_s: with_per_s?,
    })
}

/// VMs each simulated node holds: its capacity fits this many `m1.tiny`.
const VMS_PER_NODE: u64 = 20;

fn pending(counts: &serde_json::Value) -> u64 {
    counts
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["state"] == "pending")
        .and_then(|c| c["count"].as_u64())
        .unwrap_or(0)
}

/// Registers nodes that take [`VMS_PER_NODE`] of the pending VMs each,
/// waits until the control plane has placed them, reports every VM
/// running once, then measures heartbeats that report all of a node's VMs
/// with nothing new: a fleet in its steady state.
async fn heartbeats(
    label: &str,
    host: &str,
    token: &str,
    opts: &Opts,
    pid: u32,
) -> anyhow::Result<Stats> {
    let mut c = Conn::connect(host).await?;
    let counts = call(
        &mut c,
        Req::get(host, "/v1/vm-states", Some(token)),
        200,
        "VM states",
    )
    .await?;
    let before = pending(&counts);
    let n = opts.nodes.min((before / VMS_PER_NODE) as usize);
    if n == 0 {
        bail!("no pending VMs for the nodes to hold ({before} pending)");
    }
    let capacity = serde_json::json!({"vcpus": 64, "memory_mib": 512 * VMS_PER_NODE,
        "disk_gib": 5 * VMS_PER_NODE});
    let t0 = Instant::now();
    let mut nodes = Vec::new();
    for i in 0..n {
        let jt = call(
            &mut c,
            Req::json(
                "POST",
                host,
                "/v1/node-join-tokens",
                Some(token),
                &serde_json::json!({}),
            ),
            201,
            "a join token",
        )
        .await?;
        let reg = call(
            &mut c,
            Req::json(
                "POST",
                host,
                "/v1/nodes/register",
                None,
                &serde_json::json!({"join_token": jt["token"], "name": format!("sim-{i}"),
                    "engines": ["qemu"], "capacity": capacity}),
            ),
            201,
            "register a node",
        )
        .await?;
        let id = reg["node"]["id"]
            .as_str()
            .context("node without id")?
            .to_owned();
        let cred = reg["credential"]
            .as_str()
            .context("no credential")?
            .to_owned();
        nodes.push((id, cred));
    }
    let want = before - n as u64 * VMS_PER_NODE;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let counts = call(
            &mut c,
            Req::get(host, "/v1/vm-states", Some(token)),
            200,
            "VM states",
        )
        .await?;
        if pending(&counts) <= want {
            break;
        }
        if Instant::now() > deadline {
            bail!("placement did not finish: {counts}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!(
        "[{label}] {n} nodes registered, {} VMs placed in {:.1} s",
        n as u64 * VMS_PER_NODE,
        t0.elapsed().as_secs_f64()
    );
    // Each node learns its VMs from a first heartbeat, then reports them
    // all running once (the writes of a fleet coming up).
    let mut reqs = Vec::new();
    for (id, cred) in &nodes {
        let path = format!("/v1/nodes/{id}/heartbeat");
        let hb = |vms: serde_json::Value| {
            Req::json(
                "POST",
                host,
                &path,
                Some(cred),
                &serde_json::json!({"capacity": capacity, "vms": vms}),
            )
        };
        let answer = call(&mut c, hb(serde_json::json!([])), 200, "a first heartbeat").await?;
        let vms: Vec<serde_json::Value> = answer["vms"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|v| {
                serde_json::json!({"id": v["id"], "state": "running", "generation": 1,
                    "desired_generation": v["desired_generation"]})
            })
            .collect();
        if vms.len() as u64 != VMS_PER_NODE {
            bail!("node {id} holds {} VMs, not {VMS_PER_NODE}", vms.len());
        }
        let report = hb(serde_json::Value::Array(vms));
        call(&mut c, report.clone(), 200, "a report").await?;
        reqs.push(report);
    }
    drop(c);
    let reqs = Arc::new(reqs);
    let conns = opts.concurrency as u64;
    let name = "POST heartbeat (20 VMs, unchanged)";
    Ok(scenario(
        label,
        name,
        host,
        Arc::new(move |conn, i| {
            reqs[((i * conns + conn as u64) % reqs.len() as u64) as usize].clone()
        }),
        opts,
        pid,
    )
    .await)
}

async fn scenario(
    label: &str,
    name: &str,
    addr: &str,
    make: MakeReq,
    opts: &Opts,
    pid: u32,
) -> Stats {
    eprintln!(
        "[{label}] {name}: {} connections, {} s warm-up + {} s",
        opts.concurrency,
        opts.warmup.as_secs_f64(),
        opts.duration.as_secs_f64()
    );
    let perf = opts.perf.as_ref().and_then(|dir| {
        let slug: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let data = dir.join(format!("{label}-{}.data", slug.trim_matches('-')));
        let child = Command::new("perf")
            .args([
                "record",
                "-q",
                "-F",
                "499",
                "-g",
                "-p",
                &pid.to_string(),
                "-o",
            ])
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| eprintln!("[{label}] perf did not start: {e}"))
            .ok()?;
        Some((child, data))
    });
    let s = load(addr, make, opts).await;
    if let Some((child, data)) = perf {
        perf_summary(label, name, child, &data);
    }
    if let Some(e) = &s.first_error {
        eprintln!("[{label}] {name}: {} errors; first: {e}", s.errors);
    }
    s
}

/// Stops a `perf record` and prints the scenario's hottest symbols
/// (self time, every thread of the server); the full report is kept next
/// to the data as `.txt`.
fn perf_summary(label: &str, name: &str, child: Child, data: &Path) {
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let _ = child.wait_with_output();
    let out = Command::new("perf")
        .args(["report", "--stdio", "--no-children", "-g", "none"])
        .args(["--sort", "dso,symbol", "--percent-limit", "0.5", "-i"])
        .arg(data)
        .stderr(Stdio::null())
        .output();
    let Ok(out) = out else {
        eprintln!("[{label}] perf report did not run");
        return;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let _ = std::fs::write(data.with_extension("txt"), text.as_bytes());
    eprintln!("[{label}] {name}: hottest symbols (self time)");
    for l in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .take(20)
    {
        eprintln!("    {}", l.trim_end());
    }
}

fn print_table(db: &str, r: &DbResults, opts: &Opts) {
    println!();
    println!(
        "{db}: {} connections, {} s per scenario after {} s warm-up",
        opts.concurrency,
        opts.duration.as_secs_f64(),
        opts.warmup.as_secs_f64()
    );
    println!(
        "{:<30} {:>9} {:>9} {:>9} {:>8} {:>9}",
        "scenario", "req/s", "p50 ms", "p99 ms", "errors", "vs base"
    );
    let base = r.baseline.rps();
    for (name, s) in [
        ("baseline GET /healthz", &r.baseline),
        ("GET /v1/vms?limit=100", &r.list),
        ("GET /v1/vms/{id}", &r.get),
        ("POST /v1/vms", &r.create),
        ("POST heartbeat (20 VMs)", &r.heartbeat),
    ] {
        let ratio = if base > 0.0 { s.rps() / base } else { 0.0 };
        println!(
            "{:<30} {:>9.0} {:>9.2} {:>9.2} {:>8} {:>8.1}%",
            name,
            s.rps(),
            s.p50_ms(),
            s.p99_ms(),
            s.errors,
            ratio * 100.0
        );
    }
    let st = &r.streams;
    if st.streams > 0 {
        println!(
            "database statements/s with nothing changing: {:.1} with no event stream open, {:.1} with {} open",
            st.idle_per_s, st.with_per_s, st.streams
        );
    }
    println!();
}
