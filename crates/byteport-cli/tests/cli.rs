//! Runs the real `byteport` binary against an in-process control plane.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs `byteport ARGS` with its own config file and optional stdin.
fn byteport(config: &Path, args: &[&str], stdin: Option<&str>) -> Out {
    let mut child = Command::new(env!("CARGO_BIN_EXE_byteport"))
        .args(args)
        .env("BYTEPORT_CONFIG", config)
        .env_remove("BYTEPORT_URL")
        .env_remove("BYTEPORT_TOKEN")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running byteport");
    {
        let mut input = child.stdin.take().expect("stdin");
        if let Some(s) = stdin {
            input.write_all(s.as_bytes()).expect("writing stdin");
        }
    }
    let o = child.wait_with_output().expect("waiting for byteport");
    let out = Out {
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

/// Runs `byteport` off the async runtime so the server keeps serving.
async fn run(config: &Path, args: &[&str], stdin: Option<&str>) -> Out {
    let config = config.to_owned();
    let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    let stdin = stdin.map(str::to_owned);
    tokio::task::spawn_blocking(move || {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        byteport(&config, &a, stdin.as_deref())
    })
    .await
    .expect("joining")
}

async fn ok(config: &Path, args: &[&str]) -> String {
    let o = run(config, args, None).await;
    assert_eq!(o.code, 0, "byteport {args:?} failed: {}", o.stderr);
    o.stdout
}

async fn fails(config: &Path, args: &[&str]) -> Out {
    let o = run(config, args, None).await;
    assert_ne!(o.code, 0, "byteport {args:?} should fail: {}", o.stdout);
    assert!(
        o.stderr.starts_with("error: "),
        "byteport {args:?}: {}",
        o.stderr
    );
    o
}

fn temp_config() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "byteport-cli-test-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_nanos()
    ));
    dir.join("nested").join("config.json")
}

#[tokio::test(flavor = "multi_thread")]
async fn cli_end_to_end() {
    for backend in byteport_testkit::backends() {
        let s = byteport_testkit::TestServer::start(backend).await;
        let cfg = temp_config();
        let c = cfg.as_path();

        // Not logged in yet.
        let o = fails(c, &["whoami"]).await;
        assert!(o.stderr.contains("not logged in"), "{}", o.stderr);

        // A wrong password is the server's message and exit code 1.
        let o = run(
            c,
            &[
                "login",
                "--url",
                &s.url,
                "--user",
                "admin",
                "--password-stdin",
            ],
            Some("wrong-password\n"),
        )
        .await;
        assert_eq!(o.code, 1, "{}", o.stderr);
        assert!(o.stderr.starts_with("error: "), "{}", o.stderr);
        assert!(!cfg.exists());

        let o = run(
            c,
            &[
                "login",
                "--url",
                &s.url,
                "--user",
                "admin",
                "--password-stdin",
            ],
            Some("admin-password\n"),
        )
        .await;
        assert_eq!(o.code, 0, "{}", o.stderr);
        assert_eq!(o.stdout.trim(), format!("logged in to {} as admin", s.url));
        let stored: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(c).expect("config written"))
                .expect("config is JSON");
        assert!(
            stored["token"].as_str().expect("token").starts_with("bpt_"),
            "{stored}"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(c).expect("config").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }

        let out = ok(c, &["whoami"]).await;
        assert!(out.contains("admin"), "{out}");
        let w: serde_json::Value =
            serde_json::from_str(&ok(c, &["whoami", "--output", "json"]).await).expect("json");
        assert_eq!(w["user"]["name"], "admin");

        // Usage errors are clap's exit code 2.
        let o = run(c, &["vm", "create", "x"], None).await;
        assert_eq!(o.code, 2, "{}", o.stderr);

        let out = ok(c, &["flavor", "list"]).await;
        assert!(out.contains("m1.tiny"), "{out}");
        let out = ok(c, &["token", "list"]).await;
        assert!(out.contains("cli"), "{out}");

        s.image("tiny").await;
        let out = ok(c, &["image", "list"]).await;
        assert!(out.contains("tiny"), "{out}");

        let out = ok(
            c,
            &[
                "vm", "create", "web-1", "--image", "tiny", "--flavor", "m1.tiny", "--label",
                "env=dev",
            ],
        )
        .await;
        assert!(out.contains("web-1"), "{out}");

        let out = ok(c, &["vm", "list"]).await;
        let header = out.lines().next().expect("a header");
        assert!(header.starts_with("NAME"), "{out}");
        assert!(header.contains("PORTS"), "{out}");
        let row = out
            .lines()
            .find(|l| l.starts_with("web-1"))
            .expect("web-1 listed");
        assert!(row.contains("pending"), "{out}");
        // Columns line up: STATE starts at the same offset in header and row.
        let col = header.find("STATE").expect("STATE");
        assert_eq!(&row[col..col + "pending".len()], "pending", "{out}");

        let out = ok(c, &["vm", "list", "--label", "env=dev", "--all"]).await;
        assert!(out.contains("web-1"), "{out}");
        let out = ok(c, &["vm", "list", "--label", "env=prod"]).await;
        assert!(!out.contains("web-1"), "{out}");

        let page: serde_json::Value =
            serde_json::from_str(&ok(c, &["vm", "list", "--output", "json"]).await).expect("json");
        let items = page["items"].as_array().expect("items");
        assert_eq!(items.len(), 1, "{page}");
        assert_eq!(items[0]["name"], "web-1");
        let id = items[0]["id"].as_str().expect("id").to_owned();

        let out = ok(c, &["vm", "show", "web-1"]).await;
        assert!(out.contains(&id), "{out}");
        assert!(out.contains("env=dev"), "{out}");
        // By id, too.
        let out = ok(c, &["vm", "show", &id]).await;
        assert!(out.contains("web-1"), "{out}");

        let o = fails(c, &["vm", "show", "nope"]).await;
        assert!(o.stderr.contains("no VM named nope"), "{}", o.stderr);

        // A pending VM is already starting.
        let o = fails(c, &["vm", "start", "web-1"]).await;
        assert_eq!(o.code, 1);
        assert!(o.stderr.contains("cannot start"), "{}", o.stderr);

        // An unplaced VM stops at once.
        let out = ok(c, &["vm", "stop", "web-1"]).await;
        assert!(out.contains("stopped"), "{out}");
        let out = ok(
            c,
            &[
                "vm",
                "wait",
                "web-1",
                "--state",
                "stopped",
                "--timeout",
                "5",
            ],
        )
        .await;
        assert!(out.contains("stopped"), "{out}");

        let out = ok(c, &["vm", "delete", "web-1", "--wait"]).await;
        assert!(out.contains("deleted"), "{out}");
        let o = fails(c, &["vm", "show", "web-1"]).await;
        assert!(o.stderr.contains("no VM named web-1"), "{}", o.stderr);

        let out = ok(c, &["project", "list"]).await;
        assert!(out.contains("default"), "{out}");

        // A pending VM never runs without a node: --wait times out.
        let o = fails(
            c,
            &[
                "vm",
                "create",
                "web-2",
                "--image",
                "tiny",
                "--vcpus",
                "1",
                "--memory-mib",
                "256",
                "--disk-gib",
                "1",
                "--wait",
                "--timeout",
                "1",
            ],
        )
        .await;
        assert!(o.stderr.contains("still pending"), "{}", o.stderr);
        ok(c, &["vm", "delete", "web-2"]).await;

        // Users, projects, quotas and members.
        let o = run(
            c,
            &["user", "create", "alice", "--password-stdin"],
            Some("alice-password\n"),
        )
        .await;
        assert_eq!(o.code, 0, "{}", o.stderr);
        assert!(ok(c, &["user", "list"]).await.contains("alice"));
        ok(c, &["project", "create", "team", "--description", "a team"]).await;
        let out = ok(
            c,
            &["project", "quota", "team", "--vms", "3", "--vcpus", "6"],
        )
        .await;
        assert!(out.contains("0/3"), "{out}");
        assert!(out.contains("0/6"), "{out}");
        assert!(out.contains("0/65536 MiB"), "{out}");
        ok(
            c,
            &["project", "add-member", "team", "alice", "--role", "viewer"],
        )
        .await;
        let out = ok(c, &["project", "members", "team"]).await;
        assert!(
            out.lines()
                .any(|l| l.starts_with("alice") && l.contains("viewer")),
            "{out}"
        );
        ok(c, &["project", "remove-member", "team", "alice"]).await;
        ok(c, &["project", "delete", "team"]).await;
        fails(c, &["project", "show", "team"]).await;
        ok(c, &["user", "delete", "alice"]).await;

        // Tokens: the secret is shown once.
        let t: serde_json::Value = serde_json::from_str(
            &ok(
                c,
                &[
                    "token",
                    "create",
                    "ci",
                    "--expires-in-days",
                    "7",
                    "--output",
                    "json",
                ],
            )
            .await,
        )
        .expect("json");
        assert!(t["secret"].as_str().expect("secret").starts_with("bpt_"));
        let tid = t["token"]["id"].as_str().expect("id").to_owned();
        ok(c, &["token", "revoke", &tid]).await;
        assert!(!ok(c, &["token", "list"]).await.contains(" ci "));

        let out = ok(c, &["node", "list"]).await;
        assert!(out.starts_with("NAME"), "{out}");

        let out = ok(c, &["audit", "--limit", "5"]).await;
        assert!(out.starts_with("AT"), "{out}");

        let saved = std::fs::read_to_string(c).expect("config");
        let out = ok(c, &["logout"]).await;
        assert!(out.contains("logged out"), "{out}");
        assert!(!cfg.exists());
        let o = fails(c, &["whoami"]).await;
        assert!(o.stderr.contains("not logged in"), "{}", o.stderr);

        // Logout revoked the stored token: it no longer works.
        std::fs::write(c, saved).expect("restoring the old config");
        let o = fails(c, &["whoami"]).await;
        assert_eq!(o.code, 1);
        std::fs::remove_file(c).expect("removing the config");

        let _ = std::fs::remove_dir_all(cfg.parent().and_then(Path::parent).expect("dir"));
    }
}
