//! Test harness: a real control plane on a temporary SQLite file or on a
//! fresh database in a real PostgreSQL, reachable in-process (tower
//! `oneshot`) and over TCP.
//!
//! PostgreSQL runs when `BYTEPORT_TEST_PG_URL` names a server
//! (`cargo xtask test` starts one); without it the PostgreSQL half says it
//! skips and why, unless `BYTEPORT_REQUIRE_PG=1`, which makes that a failure.

pub mod daemon;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use byteport_server::{App, Settings};
use byteport_store::{Backend, DataStore};
use sea_orm::{ConnectionTrait, Database};
use serde_json::Value;
use tower::ServiceExt;

/// The databases this run tests on: SQLite always, PostgreSQL when
/// configured. Prints which, so the output says what ran.
pub fn backends() -> Vec<Backend> {
    let mut v = vec![Backend::Sqlite];
    if std::env::var("BYTEPORT_TEST_PG_URL").is_ok() {
        v.push(Backend::Postgres);
    } else if std::env::var("BYTEPORT_REQUIRE_PG").as_deref() == Ok("1") {
        panic!("BYTEPORT_REQUIRE_PG=1 but BYTEPORT_TEST_PG_URL is not set");
    } else {
        eprintln!(
            "SKIP postgresql: BYTEPORT_TEST_PG_URL is not set (`cargo xtask test` starts a PostgreSQL and sets it)"
        );
    }
    v
}

/// A running control plane for one test.
pub struct TestServer {
    pub app: App,
    pub router: axum::Router,
    /// `http://127.0.0.1:PORT`, served by the same router.
    pub url: String,
    pub backend: Backend,
    /// The bootstrapped admin's access token.
    pub admin: String,
    _dir: tempdir::TempDir,
}

mod tempdir {
    /// A directory removed on drop.
    pub struct TempDir(pub std::path::PathBuf);
    impl TempDir {
        pub fn new() -> Self {
            let p = std::env::temp_dir().join(format!("byteport-test-{}", uuid::Uuid::new_v4()));
            std::fs::create_dir_all(&p).expect("creating a temp dir");
            TempDir(p)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A fresh database URL on `backend`.
pub async fn fresh_database(backend: Backend, dir: &std::path::Path) -> String {
    match backend {
        Backend::Sqlite => format!("sqlite://{}?mode=rwc", dir.join("byteport.db").display()),
        Backend::Postgres => {
            let base = std::env::var("BYTEPORT_TEST_PG_URL").expect("BYTEPORT_TEST_PG_URL");
            let name = format!("bp_{}", uuid::Uuid::new_v4().simple());
            let admin = Database::connect(&base)
                .await
                .expect("connecting to PostgreSQL");
            admin
                .execute_unprepared(&format!("CREATE DATABASE {name}"))
                .await
                .expect("creating a test database");
            let (root, _) = base.rsplit_once('/').expect("a URL with a database name");
            format!("{root}/{name}")
        }
    }
}

impl TestServer {
    /// Starts a server with an admin named `admin` (password `admin-password`).
    pub async fn start(backend: Backend) -> TestServer {
        eprintln!("database: {backend}");
        let dir = tempdir::TempDir::new();
        let url = fresh_database(backend, &dir.0).await;
        let store = DataStore::connect(&url)
            .await
            .expect("connecting the store");
        let settings = Settings {
            image_dir: dir.0.join("images"),
            ..Settings::default()
        };
        let app = App::new(store, settings).await.expect("starting the app");
        let router = byteport_server::router(app.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding");
        let addr = listener.local_addr().expect("local addr");
        let r = router.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, r).await;
        });
        let token = app
            .bootstrap_token()
            .await
            .expect("bootstrap")
            .expect("no users yet");
        let mut s = TestServer {
            app,
            router,
            url: format!("http://{addr}"),
            backend,
            admin: String::new(),
            _dir: dir,
        };
        let (st, _) = s
            .call(
                Method::POST,
                "/v1/bootstrap",
                None,
                Some(serde_json::json!({"token": token, "name": "admin", "password": "admin-password"})),
            )
            .await;
        assert_eq!(st, StatusCode::CREATED, "bootstrap");
        s.admin = s.login("admin", "admin-password").await;
        s
    }

    /// Sends one request through the router; returns status and JSON body
    /// (`Value::Null` when the body is empty or not JSON).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let (st, _, v) = self.call_with(method, path, token, body, &[]).await;
        (st, v)
    }

    /// Like [`TestServer::call`], with extra headers; also returns headers.
    pub async fn call_with(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> (StatusCode, axum::http::HeaderMap, Value) {
        let mut b = Request::builder().method(method).uri(path);
        if let Some(t) = token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = match body {
            Some(v) => b
                .header("content-type", "application/json")
                .body(Body::from(v.to_string()))
                .expect("request"),
            None => b.body(Body::empty()).expect("request"),
        };
        self.raw(req).await
    }

    /// Sends a GET with extra headers; returns status and the body as text.
    pub async fn get_text(
        &self,
        path: &str,
        token: &str,
        headers: &[(&str, &str)],
    ) -> (StatusCode, String) {
        let mut b = Request::builder()
            .method(Method::GET)
            .uri(path)
            .header("authorization", format!("Bearer {token}"));
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let resp = self
            .router
            .clone()
            .oneshot(b.body(Body::empty()).expect("request"))
            .await
            .expect("infallible");
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .expect("body");
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Sends a prepared request.
    pub async fn raw(&self, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, Value) {
        let resp = self.router.clone().oneshot(req).await.expect("infallible");
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .expect("body");
        let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, headers, v)
    }

    /// POSTs `body` to an endpoint that answers `application/x-ndjson`;
    /// returns the status and each line parsed (an error's body as the
    /// one line).
    pub async fn post_lines(
        &self,
        path: &str,
        token: &str,
        body: Value,
    ) -> (StatusCode, Vec<Value>) {
        let req = Request::builder()
            .method(Method::POST)
            .uri(path)
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .expect("request");
        let resp = self.router.clone().oneshot(req).await.expect("infallible");
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .expect("body");
        let lines = bytes
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).expect("a line of JSON"))
            .collect();
        (status, lines)
    }

    /// Logs in; returns the access token.
    pub async fn login(&self, name: &str, password: &str) -> String {
        let (st, v) = self
            .call(
                Method::POST,
                "/v1/auth/login",
                None,
                Some(serde_json::json!({"name": name, "password": password})),
            )
            .await;
        assert_eq!(st, StatusCode::OK, "login {name}: {v}");
        v["access_token"].as_str().expect("access_token").to_owned()
    }

    /// Creates a user and logs them in; returns their access token.
    pub async fn user(&self, name: &str) -> String {
        let (st, v) = self
            .call(
                Method::POST,
                "/v1/users",
                Some(&self.admin),
                Some(serde_json::json!({"name": name, "password": "user-password"})),
            )
            .await;
        assert_eq!(st, StatusCode::CREATED, "create user {name}: {v}");
        self.login(name, "user-password").await
    }

    /// Registers an image named `name` (catalog record only).
    pub async fn image(&self, name: &str) {
        self.image_for(name, "x86_64").await
    }

    /// Registers a (never uploaded) image `name` of architecture `arch`.
    pub async fn image_for(&self, name: &str, arch: &str) {
        self.register_image(name, arch, false).await
    }

    /// [`TestServer::image_for`] of an image with the guest agent, so that
    /// its VMs take exec (from a [`SimNode::serve_exec`] node).
    pub async fn agent_image_for(&self, name: &str, arch: &str) {
        self.register_image(name, arch, true).await
    }

    async fn register_image(&self, name: &str, arch: &str, has_agent: bool) {
        let (st, v) = self
            .call(
                Method::POST,
                "/v1/images",
                Some(&self.admin),
                Some(serde_json::json!({
                    "name": name, "os_family": "linux", "os_version": "1", "format": "qcow2",
                    "size_bytes": 1048576, "sha256": "ab".repeat(32), "arch": arch,
                    "has_agent": has_agent
                })),
            )
            .await;
        assert_eq!(st, StatusCode::CREATED, "create image {name}: {v}");
    }

    /// Creates a project owned by the admin and gives `members` their roles.
    pub async fn project(&self, name: &str, members: &[(&str, &str)]) {
        let (st, v) = self
            .call(
                Method::POST,
                "/v1/projects",
                Some(&self.admin),
                Some(serde_json::json!({"name": name})),
            )
            .await;
        assert_eq!(st, StatusCode::CREATED, "create project {name}: {v}");
        for (user, role) in members {
            let (st, v) = self
                .call(
                    Method::PUT,
                    &format!("/v1/projects/{name}/members/{user}"),
                    Some(&self.admin),
                    Some(serde_json::json!({"role": role})),
                )
                .await;
            assert_eq!(st, StatusCode::OK, "add {user} to {name}: {v}");
        }
    }

    /// Runs one SQL statement on the server's database (to age a row, say).
    pub async fn sql(&self, statement: &str) {
        use sea_orm::ConnectionTrait;
        self.app
            .store
            .connection()
            .execute_unprepared(statement)
            .await
            .expect(statement);
    }

    /// Counts rows of a table, to prove a rejected request changed nothing.
    pub async fn count(&self, table: &str) -> i64 {
        let db = self.app.store.connection();
        let row = db
            .query_one_raw(sea_orm::Statement::from_string(
                db.get_database_backend(),
                format!("SELECT COUNT(*) AS n FROM {table}"),
            ))
            .await
            .expect("count")
            .expect("a row");
        row.try_get::<i64>("", "n").expect("n")
    }
}

/// A node that exists only as its registration and its heartbeats: what
/// a node agent tells the control plane, sent by the test, with the
/// capacity it registered with.
pub struct SimNode {
    pub id: String,
    pub credential: String,
    pub capacity: Value,
}

impl SimNode {
    /// Registers a node `name` with 2 vCPUs, `memory_mib` and 100 GiB.
    pub async fn join(s: &TestServer, name: &str, memory_mib: u64) -> SimNode {
        SimNode::join_running(s, name, 2, memory_mib, &[]).await
    }

    /// [`SimNode::join`] with `vcpus`, for a node that says which guest
    /// architectures it runs: `(arch, "native" or "emulated")`, its host's first (none:
    /// an x86_64 host without KVM).
    pub async fn join_running(
        s: &TestServer,
        name: &str,
        vcpus: u32,
        memory_mib: u64,
        platforms: &[(&str, &str)],
    ) -> SimNode {
        let (_, jt) = s
            .call(
                Method::POST,
                "/v1/node-join-tokens",
                Some(&s.admin),
                Some(serde_json::json!({})),
            )
            .await;
        let capacity =
            serde_json::json!({"vcpus": vcpus, "memory_mib": memory_mib, "disk_gib": 100});
        let host = platforms.first().map_or("x86_64", |p| p.0);
        let platforms: Vec<Value> = platforms
            .iter()
            .map(|(arch, how)| serde_json::json!({"arch": arch, "execution": how}))
            .collect();
        let reg = serde_json::json!({"join_token": jt["token"], "name": name, "arch": host,
            "engines": ["qemu"], "capacity": capacity, "platforms": platforms});
        let (st, n) = s
            .call(Method::POST, "/v1/nodes/register", None, Some(reg))
            .await;
        assert_eq!(st, StatusCode::CREATED, "register {name}: {n}");
        SimNode {
            id: n["node"]["id"].as_str().expect("an id").to_owned(),
            credential: n["credential"].as_str().expect("a credential").to_owned(),
            capacity,
        }
    }

    /// One heartbeat reporting each VM as `(id, observed state, report
    /// generation, desired generation seen)`; the answer.
    pub async fn report(
        &self,
        s: &TestServer,
        vms: &[(&str, &str, u64, u64)],
    ) -> (StatusCode, Value) {
        self.report_measured(s, vms, &[]).await
    }

    /// [`SimNode::report`] with figures for some VMs: `(id, CPU time in
    /// ms, resident MiB)`, as a node measures its QEMU processes.
    pub async fn report_measured(
        &self,
        s: &TestServer,
        vms: &[(&str, &str, u64, u64)],
        measured: &[(&str, u64, u64)],
    ) -> (StatusCode, Value) {
        let vms: Vec<Value> = vms
            .iter()
            .map(|(id, state, generation, desired)| {
                serde_json::json!({"id": id, "state": state, "generation": generation,
                    "desired_generation": desired})
            })
            .collect();
        let stats: Vec<Value> = measured
            .iter()
            .map(|(id, cpu_ms, rss)| {
                serde_json::json!({"id": id, "cpu_percent": null, "cpu_time_ms": cpu_ms,
                    "memory_rss_mib": rss, "disk_used_mib": 1, "uptime_secs": 5})
            })
            .collect();
        s.call(
            Method::POST,
            &format!("/v1/nodes/{}/heartbeat", self.id),
            Some(&self.credential),
            Some(serde_json::json!({"capacity": self.capacity, "vms": vms, "vm_stats": stats})),
        )
        .await
    }
}

impl SimNode {
    /// Holds the node's channel in this process, as its agent's WebSocket
    /// would, and answers every exec on one of its VMs at once: `answer`
    /// gives the standard output and the exit code from the VM and the
    /// argv. Other requests are answered with an error. Ends when the
    /// server drops the channel.
    pub fn serve_exec(
        &self,
        s: &TestServer,
        answer: impl Fn(&str, &[String]) -> (String, i32) + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        use base64::Engine;
        use byteport_types::node_proto::{FromNode, ToNode};
        let node: uuid::Uuid = self.id.parse().expect("a node id");
        let mut link = s.app.hub.attach(node);
        tokio::spawn(async move {
            while let Some(m) = link.rx.recv().await {
                match m {
                    ToNode::Exec {
                        stream, vm, argv, ..
                    } => {
                        let (out, code) = answer(&vm.to_string(), &argv);
                        let data = base64::engine::general_purpose::STANDARD.encode(out);
                        link.deliver(FromNode::Stdout { stream, data });
                        link.deliver(FromNode::Exit {
                            stream,
                            code: Some(code),
                            signal: None,
                        });
                    }
                    ToNode::Poke
                    | ToNode::Input { .. }
                    | ToNode::InputEnd { .. }
                    | ToNode::Close { .. } => {}
                    other => {
                        let stream = match other {
                            ToNode::ConsoleTail { stream, .. }
                            | ToNode::ConsoleAttach { stream, .. }
                            | ToNode::RemoveOrphan { stream, .. }
                            | ToNode::Run { stream, .. } => stream,
                            _ => continue,
                        };
                        link.deliver(FromNode::Error {
                            stream,
                            message: "a simulated node runs exec only".into(),
                            not_found: false,
                        });
                    }
                }
            }
        })
    }
}

/// What one run of the `byteport` CLI printed, and its exit status (-1
/// when a signal ended it).
pub struct CliOut {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs the `byteport` binary `bin` with `args`, its own config file, and
/// `stdin` (closed at once when `None`), free of the caller's `BYTEPORT_*`
/// settings; logs the command and what it printed for a failing test.
pub fn byteport(
    bin: &std::path::Path,
    config: &std::path::Path,
    args: &[&str],
    stdin: Option<&str>,
) -> CliOut {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(bin)
        .args(args)
        .env("BYTEPORT_CONFIG", config)
        .env_remove("BYTEPORT_CA_CERT")
        .env_remove("BYTEPORT_URL")
        .env_remove("BYTEPORT_TOKEN")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {}: {e}", bin.display()));
    {
        let mut input = child.stdin.take().expect("stdin");
        if let Some(s) = stdin {
            input.write_all(s.as_bytes()).expect("writing stdin");
        }
    }
    let o = child.wait_with_output().expect("waiting for byteport");
    let out = CliOut {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    };
    eprintln!(
        "$ byteport {}\n-> {}\n{}{}",
        args.join(" "),
        out.code,
        out.stdout,
        out.stderr
    );
    out
}
