//! What an operator does to a BytePort host without a guest: the
//! configuration file, upgrades from every older schema, a database from
//! a newer one, and the service units. (Backups and restores are in
//! qemu_e2e, where a node with VMs meets the restored server.)

use byteport_testkit::daemon::Daemon;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_byteportd");

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn byteportd(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut c = Command::new(BIN);
    c.args(args).env_remove("BYTEPORT_CONFIG");
    for (k, v) in envs {
        c.env(k, v);
    }
    c.output().expect("running byteportd")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The line of `config show` for `key`.
fn line<'a>(shown: &'a str, key: &str) -> &'a str {
    shown
        .lines()
        .find(|l| l.starts_with(&format!("{key} = ")))
        .unwrap_or_else(|| panic!("no {key} in:\n{shown}"))
}

#[test]
fn config_show_applies_the_file_then_the_environment_then_flags_and_masks_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("byteportd.toml");
    std::fs::write(
        &file,
        "listen = \"127.0.0.1:7999\"\nnode-timeout = 9\naudit-retention-days = 7\n\
         database-url = \"postgres://bp:hunter2@db/bp\"\nforward-ports = \"21000-21099\"\n\
         join-token = \"bpj_secret\"\nserver = \"http://10.1.2.3:7480\"\n",
    )
    .unwrap();
    let f = file.to_str().unwrap();
    let o = byteportd(
        &[
            "--config",
            f,
            "config",
            "show",
            "server",
            "--node-timeout",
            "3",
        ],
        &[("BYTEPORT_AUDIT_RETENTION_DAYS", "30")],
    );
    assert!(o.status.success(), "{}", text(&o));
    let shown = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(
        line(&shown, "listen"),
        "listen = \"127.0.0.1:7999\"  # file"
    );
    assert_eq!(line(&shown, "node-timeout"), "node-timeout = 3  # flag");
    assert_eq!(
        line(&shown, "audit-retention-days"),
        "audit-retention-days = 30  # environment"
    );
    assert_eq!(
        line(&shown, "placement-policy"),
        "placement-policy = \"spread\"  # default"
    );
    assert_eq!(
        line(&shown, "database-url"),
        "database-url = \"postgres://bp:****@db/bp\"  # file"
    );
    assert!(!shown.contains("hunter2"), "{shown}");
    // The same file for a node: its keys, the server's left alone.
    let o = byteportd(&["config", "show", "node"], &[("BYTEPORT_CONFIG", f)]);
    assert!(o.status.success(), "{}", text(&o));
    let shown = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(
        line(&shown, "forward-ports"),
        "forward-ports = \"21000-21099\"  # file"
    );
    assert_eq!(line(&shown, "join-token"), "join-token = \"****\"  # file");
    assert!(
        !shown.contains("bpj_secret") && !shown.contains("listen ="),
        "{shown}"
    );
}

#[test]
fn a_daemon_refuses_to_start_on_an_unknown_key_or_a_bad_value_and_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("byteportd.toml");
    let data = dir.path().join("data");
    for (body, says) in [
        ("lisen = \"0.0.0.0:7480\"\n", "unknown key `lisen`"),
        ("node-timeout = \"soon\"\n", "`node-timeout`"),
        ("placement-policy = 3\nlisten = \"here\"\n", "`listen`"),
        ("listen = \n", "byteportd.toml"),
    ] {
        std::fs::write(&file, body).unwrap();
        let o = byteportd(
            &["--config", file.to_str().unwrap(), "server"],
            &[("BYTEPORT_DATA_DIR", data.to_str().unwrap())],
        );
        assert!(!o.status.success(), "{body}: started");
        let t = text(&o);
        assert!(t.contains(says), "{body}: {t}");
        // Refused before anything was made.
        assert!(!data.join("byteport.db").exists(), "{body}");
    }
    let o = byteportd(&["--config", "/nonexistent.toml", "server"], &[]);
    assert!(
        text(&o).contains("no configuration file at /nonexistent.toml"),
        "{}",
        text(&o)
    );
}

#[test]
fn the_shipped_example_configuration_is_valid_for_server_and_node() {
    let example = root().join("packaging/byteportd.toml");
    let f = example.to_str().unwrap();
    for cmd in [
        &["config", "show", "server"][..],
        &["config", "show", "node", "--server", "http://h:1"],
    ] {
        let mut args = vec!["--config", f];
        args.extend_from_slice(cmd);
        let o = byteportd(&args, &[]);
        assert!(o.status.success(), "{cmd:?}: {}", text(&o));
    }
}

#[test]
fn a_server_given_the_file_serves_on_its_listen_address() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let file = dir.path().join("byteportd.toml");
    std::fs::write(
        &file,
        format!(
            "listen = \"127.0.0.1:{port}\"\ndata-dir = \"{}\"\nlog-format = \"json\"\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("log")).unwrap();
    let mut child = Command::new(BIN)
        .args(["--config", file.to_str().unwrap(), "server"])
        .env_remove("BYTEPORT_DATA_DIR")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let api = byteport_testkit::daemon::Api::new(&format!("http://127.0.0.1:{port}"), None);
    let deadline = Instant::now() + Duration::from_secs(30);
    while api.get("/healthz").is_err() {
        assert!(Instant::now() < deadline, "no answer on {port}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(dir.path().join("data/byteport.db").exists());
    // Its logs are JSON lines.
    let log = std::fs::read_to_string(dir.path().join("log")).unwrap();
    let first = log.lines().next().expect("a log line");
    let v: serde_json::Value =
        serde_json::from_str(first).unwrap_or_else(|e| panic!("{e}: {first}"));
    assert!(v["level"].is_string(), "{first}");
}

fn sqlite_url(dir: &Path) -> String {
    format!("sqlite://{}?mode=rwc", dir.join("byteport.db").display())
}

#[test]
fn a_database_left_by_every_older_schema_is_migrated_and_serves() {
    let known = byteport_store::known_schema_versions();
    assert!(known.len() >= 2, "{known:?}");
    for n in 1..known.len() as u32 {
        let d = Daemon::start_server_prepared(Path::new(BIN), move |dir| {
            tokio::runtime::Runtime::new()
                .unwrap()
                .block_on(byteport_store::migrate_first(&sqlite_url(dir), n))
                .expect("the older schema");
        });
        let at = &known[n as usize - 1];
        // The API works on it: a project, a user in it, a VM that waits
        // for a node, and the lists.
        let p = d
            .api
            .post("/v1/projects", json!({"name": "upgraded"}))
            .unwrap_or_else(|e| panic!("from {at}: {e}"));
        d.api
            .post(
                "/v1/users",
                json!({"name": "dev", "password": "dev-password"}),
            )
            .unwrap_or_else(|e| panic!("from {at}: {e}"));
        let pid = p["id"].as_str().unwrap();
        d.api
            .put(
                &format!("/v1/projects/{pid}/members/dev"),
                json!({"role": "member"}),
            )
            .unwrap_or_else(|e| panic!("from {at}: {e}"));
        let users = d.api.get("/v1/users").unwrap();
        assert_eq!(users.as_array().unwrap().len(), 2, "from {at}: {users}");
        let e = d
            .api
            .post(
                "/v1/vms",
                json!({"name": "v", "image": "nope", "project": "upgraded"}),
            )
            .unwrap_err();
        assert!(e.starts_with("4"), "from {at}: {e}");
        let log = d.log();
        assert!(!log.contains("ERROR"), "from {at}: {log}");
    }
}

#[test]
fn a_server_refuses_a_database_a_newer_version_migrated_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let url = sqlite_url(dir.path());
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let all = byteport_store::known_schema_versions().len() as u32;
        byteport_store::migrate_first(&url, all).await.unwrap();
        let s = byteport_store::DataStore::connect(&url).await.unwrap();
        use sea_orm::ConnectionTrait;
        s.connection()
            .execute_unprepared(
                "INSERT INTO seaql_migrations (version, applied_at) VALUES ('m9999_later', 0)",
            )
            .await
            .unwrap();
    });
    let o = byteportd(
        &["server", "--listen", "127.0.0.1:0"],
        &[("BYTEPORT_DATA_DIR", dir.path().to_str().unwrap())],
    );
    assert!(!o.status.success());
    let t = text(&o);
    assert!(
        t.contains("migrated by a newer BytePort") && t.contains("m9999_later"),
        "{t}"
    );
}

#[test]
fn the_service_units_pass_systemd_analyze_verify() {
    let Some(analyze) = ["/usr/bin/systemd-analyze", "/bin/systemd-analyze"]
        .into_iter()
        .find(|p| Path::new(p).exists())
    else {
        assert!(
            std::env::var_os("BYTEPORT_REQUIRE_QEMU").is_none(),
            "systemd-analyze is missing (Debian's systemd package)"
        );
        eprintln!("SKIP: systemd-analyze is missing (apt-get install systemd)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for unit in ["byteportd-server.service", "byteportd-node.service"] {
        // As installed, with the binary where the unit says it is.
        let body = std::fs::read_to_string(root().join("packaging/systemd").join(unit)).unwrap();
        assert!(
            body.contains("ExecStart=/usr/local/bin/byteportd "),
            "{unit}"
        );
        let body = body.replace("/usr/local/bin/byteportd", BIN);
        let path = dir.path().join(unit);
        std::fs::write(&path, body).unwrap();
        let o = Command::new(analyze)
            .args(["verify", "--man=no"])
            .arg(&path)
            .output()
            .unwrap();
        let t = text(&o);
        let complaints: Vec<&str> = t
            .lines()
            .filter(|l| l.contains(unit) || l.contains("byteportd"))
            .collect();
        assert!(o.status.success() && complaints.is_empty(), "{unit}: {t}");
        // systemd's own exposure score (0 is locked down, 10 is none):
        // the server takes nearly all the hardening, the node what QEMU,
        // bridges and cgroups leave.
        let o = Command::new(analyze)
            .args(["security", "--offline=true"])
            .arg(&path)
            .output()
            .unwrap();
        let t = text(&o);
        let score: f64 = t
            .lines()
            .find_map(|l| l.split("exposure level for ").nth(1))
            .and_then(|l| l.split(": ").nth(1))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{unit}: no exposure level in {t}"));
        eprintln!("{unit}: exposure {score}");
        let most = if unit.contains("server") { 2.0 } else { 7.0 };
        assert!(score <= most, "{unit}: exposure {score} (at most {most})");
    }
}
