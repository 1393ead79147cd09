//! Runs the real `byteport` binary against an in-process control plane.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use byteport_testkit::CliOut as Out;

/// Runs `byteport ARGS` with its own config file and optional stdin.
fn byteport(config: &Path, args: &[&str], stdin: Option<&str>) -> Out {
    byteport_testkit::byteport(
        Path::new(env!("CARGO_BIN_EXE_byteport")),
        config,
        args,
        stdin,
    )
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

fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

/// PUTs `body` as an image file directly, as an admin; status and body.
async fn put_file(s: &byteport_testkit::TestServer, path: &str, body: Vec<u8>) -> (u16, String) {
    let url = format!("{}{path}", s.url);
    let token = s.admin.clone();
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let mut r = agent
            .put(&url)
            .header("Authorization", format!("Bearer {token}"))
            .header("Content-Type", "application/octet-stream")
            .send(&body[..])
            .expect("PUT");
        let text = r.body_mut().read_to_string().expect("body");
        (r.status().as_u16(), text)
    })
    .await
    .expect("joining")
}

/// `image import`: a fake kernel and initramfs become an `available` image,
/// again idempotently, and from a manifest.
async fn image_import(s: &byteport_testkit::TestServer, c: &Path) {
    let dir = c
        .parent()
        .and_then(Path::parent)
        .expect("dir")
        .join("images");
    std::fs::create_dir_all(&dir).expect("image dir");
    let kernel: Vec<u8> = (0..6 * 1024u32).map(|i| (i % 251) as u8).collect();
    // Larger than the server's 1 MiB JSON body limit: uploads stream.
    let initrd: Vec<u8> = (0..1536 * 1024u32).map(|i| (i * 7 % 253) as u8).collect();
    let (kpath, ipath) = (dir.join("vmlinuz"), dir.join("initrd.img"));
    std::fs::write(&kpath, &kernel).expect("kernel");
    std::fs::write(&ipath, &initrd).expect("initrd");
    let (k, i) = (
        kpath.to_str().expect("utf-8"),
        ipath.to_str().expect("utf-8"),
    );
    let args = [
        "image",
        "import",
        "small",
        i,
        "--kernel",
        k,
        "--format",
        "initramfs",
        "--boot",
        "kernel",
        "--os-family",
        "linux",
        "--os-version",
        "1",
        "--cmdline",
        "console=ttyS0 quiet",
        "--has-agent",
    ];
    let out = ok(c, &args).await;
    assert!(out.contains("registered image small"), "{out}");
    assert!(out.contains("uploaded kernel"), "{out}");
    assert!(
        out.trim_end().ends_with("image small is available"),
        "{out}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&ok(c, &["image", "show", "small", "--output", "json"]).await)
            .expect("json");
    assert_eq!(v["status"], "available", "{v}");
    assert_eq!(v["format"], "initramfs", "{v}");
    assert_eq!(v["boot"], "kernel", "{v}");
    assert_eq!(v["sha256"], sha256_hex(&initrd), "{v}");
    assert_eq!(v["kernel_sha256"], sha256_hex(&kernel), "{v}");
    assert!(v["initrd_sha256"].is_null(), "{v}");
    assert_eq!(v["size_bytes"], initrd.len(), "{v}");
    assert_eq!(v["cmdline"], "console=ttyS0 quiet", "{v}");
    assert_eq!(v["has_agent"], true, "{v}");

    // Again: nothing new is registered, the files upload again.
    let out = ok(c, &args).await;
    assert!(out.contains("already registered with these files"), "{out}");
    assert!(
        out.trim_end().ends_with("image small is available"),
        "{out}"
    );
    let mut json_args = args.to_vec();
    json_args.extend(["--output", "json"]);
    let v: serde_json::Value = serde_json::from_str(&ok(c, &json_args).await).expect("json");
    assert_eq!(v["status"], "available", "{v}");

    // The same name with other files is refused before any upload.
    let o = fails(
        c,
        &[
            "image",
            "import",
            "small",
            k,
            "--kernel",
            k,
            "--format",
            "initramfs",
            "--os-family",
            "linux",
            "--os-version",
            "1",
        ],
    )
    .await;
    assert!(
        o.stderr.contains("already exists with other files"),
        "{}",
        o.stderr
    );

    // From a manifest, its file names relative to its directory; extra keys
    // are ignored and a flag overrides the manifest.
    let manifest = dir.join("manifest.json");
    std::fs::write(
        &manifest,
        serde_json::json!({
            "name": "from-manifest", "os_family": "linux", "os_version": "1.36.1",
            "kernel_version": "6.1.0", "arch": "x86_64", "format": "initramfs",
            "boot": "kernel", "kernel": "vmlinuz", "initrd": "initrd.img",
            "cmdline": "console=ttyS0", "has_agent": true,
            "agent_port": "org.byteport.agent.0",
            "files": {"vmlinuz": {"size": kernel.len(), "sha256": sha256_hex(&kernel)}},
        })
        .to_string(),
    )
    .expect("manifest");
    let m = manifest.to_str().expect("utf-8");
    let out = ok(
        c,
        &["image", "import", "--manifest", m, "--os-version", "2"],
    )
    .await;
    assert!(out.contains("image from-manifest is available"), "{out}");
    let v: serde_json::Value =
        serde_json::from_str(&ok(c, &["image", "show", "from-manifest", "--output", "json"]).await)
            .expect("json");
    assert_eq!(v["os_version"], "2", "{v}");
    assert_eq!(v["sha256"], sha256_hex(&initrd), "{v}");
    assert_eq!(v["has_agent"], true, "{v}");

    let out = ok(c, &["image", "list"]).await;
    let header = out.lines().next().expect("header");
    assert!(
        header.contains("STATUS") && header.contains("AGENT"),
        "{out}"
    );
    let row = out
        .lines()
        .find(|l| l.starts_with("small "))
        .expect("small listed");
    assert!(row.contains("available") && row.contains("yes"), "{out}");
    let row = out
        .lines()
        .find(|l| l.starts_with("tiny "))
        .expect("tiny listed");
    assert!(row.contains("registered"), "{out}");

    // The server checks the bytes: wrong ones are refused and not kept.
    let (st, body) = put_file(s, "/v1/images/tiny/files/image", b"not the disk".to_vec()).await;
    assert_eq!(st, 400, "{body}");
    assert!(body.contains("checksum_mismatch"), "{body}");
    let v: serde_json::Value =
        serde_json::from_str(&ok(c, &["image", "show", "tiny", "--output", "json"]).await)
            .expect("json");
    assert_eq!(v["status"], "registered", "{v}");
    let _ = std::fs::remove_dir_all(&dir);
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

        // A reader that closes the pipe early (`| head -1`): quiet, status 0.
        let cfg_path = c.to_owned();
        let closed = tokio::task::spawn_blocking(move || {
            let mut child = Command::new(env!("CARGO_BIN_EXE_byteport"))
                .args(["flavor", "list"])
                .env("BYTEPORT_CONFIG", &cfg_path)
                .env_remove("BYTEPORT_URL")
                .env_remove("BYTEPORT_TOKEN")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("running byteport");
            drop(child.stdout.take());
            child.wait_with_output().expect("waiting for byteport")
        })
        .await
        .expect("the closed-pipe run");
        let err = String::from_utf8_lossy(&closed.stderr);
        assert!(
            closed.status.success() && !err.contains("panicked"),
            "{:?} {err}",
            closed.status
        );
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

        image_import(&s, c).await;

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

        assert!(out.contains("ready by:"), "{out}");
        assert!(out.contains("agent version:"), "{out}");
        assert!(out.contains("ports:"), "{out}");

        let o = fails(c, &["vm", "show", "nope"]).await;
        assert!(o.stderr.contains("no VM named nope"), "{}", o.stderr);

        // Exec and the console need a VM that runs on a node.
        let o = fails(c, &["vm", "exec", "web-1", "--", "uname", "-a"]).await;
        assert_eq!(o.code, 1);
        assert!(
            o.stderr
                .contains("the VM is pending; exec needs it running"),
            "{}",
            o.stderr
        );
        let o = run(
            c,
            &[
                "vm",
                "exec",
                &id,
                "--stdin",
                "--env",
                "A=1",
                "--cwd",
                "/",
                "--timeout",
                "5",
                "--",
                "cat",
            ],
            Some("input"),
        )
        .await;
        assert_eq!(o.code, 1, "{}", o.stderr);
        assert!(o.stderr.contains("exec needs it running"), "{}", o.stderr);
        // The command goes after `--`; a bad --env is a usage error.
        assert_eq!(run(c, &["vm", "exec", "web-1", "ls"], None).await.code, 2);
        assert_eq!(run(c, &["vm", "exec", "web-1"], None).await.code, 2);
        let o = run(c, &["vm", "exec", "web-1", "--env", "X", "--", "ls"], None).await;
        assert_eq!(o.code, 2, "{}", o.stderr);
        let o = fails(c, &["vm", "console", "web-1", "--bytes", "100"]).await;
        assert!(o.stderr.contains("the VM is pending"), "{}", o.stderr);
        // The WebSocket's refusal is the API's message too (and proves the
        // upgrade request carries the token: anonymous would be a 401).
        let o = fails(c, &["vm", "console", "web-1", "--follow"]).await;
        assert!(o.stderr.contains("the VM is pending"), "{}", o.stderr);
        let o = fails(
            c,
            &[
                "vm",
                "console",
                "web-1",
                "--follow",
                "--url",
                "https://127.0.0.1:1",
            ],
        )
        .await;
        assert!(
            o.stderr.contains("cannot reach https://127.0.0.1:1"),
            "{}",
            o.stderr
        );

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
        let out = ok(c, &["node", "join-token", "--expires-in-minutes", "30"]).await;
        let token = out
            .lines()
            .find_map(|l| l.strip_prefix("token:"))
            .expect("a token line")
            .trim()
            .to_owned();
        assert!(
            out.contains(&format!(
                "byteportd node --server {} --join-token {token}",
                s.url
            )),
            "{out}"
        );
        let t: serde_json::Value =
            serde_json::from_str(&ok(c, &["node", "join-token", "--output", "json"]).await)
                .expect("json");
        assert!(t["token"].as_str().is_some_and(|t| t != token), "{t}");
        let o = fails(c, &["node", "join-token", "--expires-in-minutes", "0"]).await;
        assert!(o.stderr.contains("expires_in_minutes"), "{}", o.stderr);

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

/// A JSON call straight to the API (as a node, say); status and body.
async fn api(
    url: &str,
    method: &str,
    path: &str,
    token: &str,
    body: serde_json::Value,
) -> (u16, serde_json::Value) {
    let (url, method, token) = (format!("{url}{path}"), method.to_owned(), token.to_owned());
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let auth = format!("Bearer {token}");
        let mut r = match method.as_str() {
            "POST" => agent
                .post(&url)
                .header("Authorization", &auth)
                .send_json(&body),
            _ => agent.get(&url).header("Authorization", &auth).call(),
        }
        .expect("calling the API");
        let text = r.body_mut().read_to_string().expect("body");
        (
            r.status().as_u16(),
            serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
        )
    })
    .await
    .expect("joining")
}

/// A simulated node (registered with a token from `node join-token`)
/// reports a VM running with port forwards: `vm show` and `vm list` show
/// them, and exec reaches as far as the node's missing channel.
#[tokio::test(flavor = "multi_thread")]
async fn cli_shows_port_forwards_of_placed_vms() {
    for backend in byteport_testkit::backends() {
        let s = byteport_testkit::TestServer::start(backend).await;
        let cfg = temp_config();
        let c = cfg.as_path();
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

        let t: serde_json::Value =
            serde_json::from_str(&ok(c, &["node", "join-token", "--output", "json"]).await)
                .expect("json");
        let capacity = serde_json::json!({"vcpus": 4, "memory_mib": 8192, "disk_gib": 100});
        let (st, n) = api(
            &s.url,
            "POST",
            "/v1/nodes/register",
            "",
            serde_json::json!({"join_token": t["token"], "name": "node-1", "engines": ["qemu"],
                "kvm": true, "capacity": capacity}),
        )
        .await;
        assert_eq!(st, 201, "{n}");
        let node = n["node"]["id"].as_str().expect("node id").to_owned();
        let cred = n["credential"].as_str().expect("credential").to_owned();
        let heartbeat = |vms: serde_json::Value| {
            let (url, node, cred, capacity) =
                (s.url.clone(), node.clone(), cred.clone(), capacity.clone());
            async move {
                let (st, v) = api(
                    &url,
                    "POST",
                    &format!("/v1/nodes/{node}/heartbeat"),
                    &cred,
                    serde_json::json!({"capacity": capacity,
                        "usage": {"vcpus": 0, "memory_mib": 0, "disk_gib": 0}, "vms": vms}),
                )
                .await;
                assert_eq!(st, 200, "{v}");
                v
            }
        };
        heartbeat(serde_json::json!([])).await;

        s.image("tiny").await;
        let vm: serde_json::Value = serde_json::from_str(
            &ok(
                c,
                &[
                    "vm", "create", "web-1", "--image", "tiny", "--flavor", "m1.tiny", "--output",
                    "json",
                ],
            )
            .await,
        )
        .expect("json");
        let id = vm["id"].as_str().expect("id").to_owned();
        let desired = heartbeat(serde_json::json!([])).await;
        let gen_ = desired["vms"][0]["desired_generation"].clone();
        assert!(gen_.is_u64(), "the VM is placed on the node: {desired}");
        heartbeat(serde_json::json!([{
            "id": id, "state": "running", "generation": 1, "desired_generation": gen_,
            "ports": [
                {"guest_port": 22, "host_port": 20022, "host": "127.0.0.1"},
                {"guest_port": 80, "host_port": 20080, "host": "127.0.0.1"},
            ],
            "agent_version": "0.1.0",
        }]))
        .await;

        let out = ok(c, &["vm", "show", "web-1"]).await;
        assert!(out.contains("state:          running"), "{out}");
        let ports: Vec<&str> = out
            .lines()
            .skip_while(|l| !l.starts_with("ports:"))
            .take(2)
            .map(|l| l.trim_start_matches("ports:").trim())
            .collect();
        assert_eq!(
            ports,
            ["22 -> 127.0.0.1:20022", "80 -> 127.0.0.1:20080"],
            "{out}"
        );
        // The test image names no login user: no ssh line, but what works.
        assert!(!out.contains("ssh -p"), "{out}");
        assert!(
            out.lines().any(|l| l.starts_with("login:")
                && l.ends_with(
                    "no SSH login in this image: byteport vm exec web-1 -- CMD, or vm console"
                )),
            "{out}"
        );
        assert!(out.contains(&format!("node:           {node}")), "{out}");

        // The node's figures for it.
        let (st, v) = api(
            &s.url,
            "POST",
            &format!("/v1/nodes/{node}/heartbeat"),
            &cred,
            serde_json::json!({"capacity": capacity, "vm_stats": [{"id": id, "cpu_percent": 12.5,
                "cpu_time_ms": 4200, "memory_rss_mib": 97, "disk_used_mib": 3, "uptime_secs": 30}]}),
        )
        .await;
        assert_eq!(st, 200, "{v}");
        let out = ok(c, &["vm", "stats", "web-1"]).await;
        for want in [
            "12.5 % of a host core (1 vCPU given)",
            "4.2 s",
            "97 MiB resident of 512 MiB",
            "3 MiB used on the host of 5 GiB",
        ] {
            assert!(out.contains(want), "{want} in {out}");
        }

        let out = ok(c, &["vm", "list"]).await;
        let row = out.lines().find(|l| l.starts_with("web-1")).expect("web-1");
        assert!(row.ends_with("22→20022,80→20080"), "{out}");

        // cloud-init, as the node reports it from the guest agent: not yet,
        // done, then (another boot) failed.
        let o = fails(
            c,
            &["vm", "wait", "web-1", "--cloud-init", "--timeout", "1"],
        )
        .await;
        assert!(o.stderr.contains("has not finished"), "{}", o.stderr);
        for (generation, outcome) in [(2, "running"), (3, "done")] {
            heartbeat(serde_json::json!([{
                "id": id, "state": "running", "generation": generation,
                "desired_generation": gen_, "agent_version": "0.1.0", "cloud_init": outcome,
                "ports": [{"guest_port": 22, "host_port": 20022, "host": "127.0.0.1"}],
            }]))
            .await;
        }
        let out = ok(
            c,
            &["vm", "wait", "web-1", "--cloud-init", "--timeout", "5"],
        )
        .await;
        assert!(out.contains("web-1"), "{out}");
        let out = ok(c, &["vm", "show", "web-1"]).await;
        assert!(out.contains("cloud-init:     done"), "{out}");
        heartbeat(serde_json::json!([{
            "id": id, "state": "running", "generation": 4, "desired_generation": gen_,
            "agent_version": "0.1.0", "cloud_init": "error",
            "ports": [{"guest_port": 22, "host_port": 20022, "host": "127.0.0.1"}],
        }]))
        .await;
        let o = fails(c, &["vm", "wait", "web-1", "--cloud-init"]).await;
        assert!(
            o.stderr.contains("cloud-init ended with errors"),
            "{}",
            o.stderr
        );
        let o = fails(c, &["vm", "wait", "web-1"]).await;
        assert!(
            o.stderr.contains("--state"),
            "a state or --cloud-init: {}",
            o.stderr
        );

        // Running, but its image has no agent.
        let o = fails(c, &["vm", "exec", "web-1", "--", "true"]).await;
        assert!(o.stderr.contains("no guest agent"), "{}", o.stderr);
        // The console goes through the node's channel, which a simulated
        // node does not open.
        let o = fails(c, &["vm", "console", "web-1"]).await;
        assert!(o.stderr.contains("not connected"), "{}", o.stderr);
        let o = fails(c, &["vm", "console", "web-1", "--follow"]).await;
        assert!(o.stderr.contains("not connected"), "{}", o.stderr);

        let _ = std::fs::remove_dir_all(cfg.parent().and_then(Path::parent).expect("dir"));
    }
}

/// `env add/list/show/run/del` against the server (no node: the VMs wait
/// to be placed, so a run reports per VM that they are not running).
#[tokio::test(flavor = "multi_thread")]
async fn cli_manages_environments() {
    for backend in byteport_testkit::backends() {
        let s = byteport_testkit::TestServer::start(backend).await;
        let cfg = temp_config();
        let c = cfg.as_path();
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
        s.image("tiny-a").await;
        s.image("tiny-b").await;

        let out = ok(
            c,
            &[
                "env",
                "add",
                "compat",
                "--os-prefix",
                "tiny-a,tiny-b",
                "--flavor",
                "m1.tiny",
                "--lifetime",
                "2h",
            ],
        )
        .await;
        assert!(out.contains("state:"), "{out}");
        for vm in ["compat-tiny-a", "compat-tiny-b"] {
            assert!(
                out.lines()
                    .any(|l| l.starts_with(vm) && l.contains("pending")),
                "{vm} in {out}"
            );
        }
        let out = ok(c, &["env", "list"]).await;
        let row = out
            .lines()
            .find(|l| l.starts_with("compat"))
            .expect("a row");
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(&cells[..4], ["compat", "default", "creating", "2"], "{out}");

        let out = ok(c, &["env", "show", "compat", "--output", "json"]).await;
        let e: serde_json::Value = serde_json::from_str(&out).expect("json");
        assert_eq!(e["os_prefixes"], serde_json::json!(["tiny-a", "tiny-b"]));

        // Not running yet: each VM says so, and the exit status is 1.
        let o = run(c, &["env", "run", "compat", "--", "uname", "-a"], None).await;
        assert_eq!(o.code, 1);
        for vm in ["compat-tiny-a", "compat-tiny-b"] {
            assert!(
                o.stderr
                    .lines()
                    .any(|l| l.starts_with(&format!("{vm}: the VM is pending"))),
                "{vm}: {}",
                o.stderr
            );
        }
        assert!(o.stderr.contains("exit 0 on 0 of 2 VMs"), "{}", o.stderr);
        // --json: the gathered answer, each VM's error in it.
        let o = run(
            c,
            &["env", "run", "compat", "--output", "json", "--", "true"],
            None,
        )
        .await;
        assert_eq!(o.code, 1);
        let r: serde_json::Value = serde_json::from_str(&o.stdout).expect("json");
        assert_eq!(r["results"].as_array().map(Vec::len), Some(2), "{r}");
        assert!(
            r["results"][0]["error"]
                .as_str()
                .unwrap()
                .contains("pending")
        );

        let o = fails(
            c,
            &["env", "add", "x", "--os-prefix", "tiny", "--lifetime", "5x"],
        )
        .await;
        assert!(o.stderr.contains("unknown unit"), "{}", o.stderr);
        let o = fails(
            c,
            &[
                "env",
                "add",
                "x",
                "--os-prefix",
                "fedora",
                "--flavor",
                "m1.tiny",
            ],
        )
        .await;
        assert!(
            o.stderr.contains("no image name starts with"),
            "{}",
            o.stderr
        );
        let o = fails(c, &["env", "show", "nope"]).await;
        assert!(o.stderr.contains("not found"), "{}", o.stderr);

        // Update: a lifetime, ports and policy for every VM, then one VM
        // dropped; a VM it does not have is an error that changes nothing.
        let out = ok(
            c,
            &[
                "env",
                "update",
                "compat",
                "--lifetime",
                "2h",
                "--port",
                "80,443",
                "--egress",
                "deny",
            ],
        )
        .await;
        assert!(out.contains("compat"), "{out}");
        let e: serde_json::Value =
            serde_json::from_str(&ok(c, &["env", "show", "compat", "--output", "json"]).await)
                .expect("json");
        assert!(e["expires_at"].is_string(), "{e}");
        for v in e["vms"].as_array().expect("VMs") {
            assert_eq!(v["guest_ports"], serde_json::json!([80, 443]), "{v}");
            assert_eq!(v["egress"], "deny", "{v}");
        }
        let o = fails(c, &["env", "update", "compat", "--remove-vm", "nope"]).await;
        assert!(o.stderr.contains("not a live VM"), "{}", o.stderr);
        let out = ok(
            c,
            &["env", "update", "compat", "--remove-vm", "compat-tiny-b"],
        )
        .await;
        assert!(out.contains("removing compat-tiny-b"), "{out}");

        let out = ok(c, &["env", "del", "compat", "--wait"]).await;
        assert!(out.contains("deleted"), "{out}");
        let out = ok(c, &["env", "list"]).await;
        assert!(!out.contains("compat"), "{out}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn cli_invites_and_signs_up() {
    for backend in byteport_testkit::backends() {
        let s = byteport_testkit::TestServer::start(backend).await;
        let admin_cfg = temp_config();
        let a = admin_cfg.as_path();
        let o = run(
            a,
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
        let out = ok(a, &["settings", "show"]).await;
        assert!(
            out.contains("self-registration") && out.contains("off"),
            "{out}"
        );

        let out = ok(
            a,
            &[
                "invite",
                "create",
                "--project",
                "default",
                "--role",
                "viewer",
            ],
        )
        .await;
        let link = out
            .lines()
            .find(|l| l.contains("/register?invite=bpi_"))
            .unwrap_or_else(|| panic!("no link in {out}"))
            .trim()
            .to_owned();
        assert!(out.contains("to default"), "{out}");
        let list = ok(a, &["invite", "list"]).await;
        assert!(
            list.contains("pending") && list.contains("viewer"),
            "{list}"
        );

        // Without the invite the server refuses; with the link, the new
        // user is signed up, logged in, and sees the project.
        let new_cfg = temp_config();
        let n = new_cfg.as_path();
        let o = run(
            n,
            &[
                "signup",
                "--url",
                &s.url,
                "--user",
                "tess",
                "--password-stdin",
            ],
            Some("tess-password\n"),
        )
        .await;
        assert_ne!(o.code, 0);
        assert!(o.stderr.contains("invite link"), "{}", o.stderr);
        let o = run(
            n,
            &[
                "signup",
                "--url",
                &s.url,
                "--user",
                "tess",
                "--invite",
                &link,
                "--password-stdin",
            ],
            Some("tess-password\n"),
        )
        .await;
        assert_eq!(o.code, 0, "{}", o.stderr);
        assert!(o.stdout.contains("signed up as tess"), "{}", o.stdout);
        let who = ok(n, &["whoami"]).await;
        assert!(who.contains("tess") && who.contains("default"), "{who}");
        let o = fails(
            n,
            &[
                "vm", "create", "x", "--image", "tiny", "--flavor", "m1.tiny",
            ],
        )
        .await;
        assert!(
            o.stderr.contains("viewer"),
            "a viewer cannot create: {}",
            o.stderr
        );

        let list = ok(a, &["invite", "list"]).await;
        assert!(list.contains("used"), "{list}");
        let id = list
            .lines()
            .nth(1)
            .and_then(|l| l.split_whitespace().next())
            .expect("an invite id")
            .to_owned();
        let out = ok(a, &["invite", "revoke", &id]).await;
        assert!(out.contains("revoked"), "{out}");

        // Self-registration, turned on by the admin.
        let out = ok(a, &["settings", "set", "--self-registration", "on"]).await;
        assert!(out.contains("on"), "{out}");
        let other = temp_config();
        let o = run(
            other.as_path(),
            &[
                "signup",
                "--url",
                &s.url,
                "--user",
                "uma",
                "--password-stdin",
            ],
            Some("uma-password\n"),
        )
        .await;
        assert_eq!(o.code, 0, "{}", o.stderr);
        let o = fails(a, &["settings", "set", "--self-registration", "maybe"]).await;
        assert!(o.stderr.contains("maybe"), "{}", o.stderr);
    }
}

/// On a terminal (here a pseudo-terminal made by util-linux's `script`),
/// an import draws a bar per upload; through a pipe it prints plain lines.
#[tokio::test(flavor = "multi_thread")]
async fn an_import_on_a_terminal_draws_progress_bars() {
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("SKIP: util-linux's script is not installed; it makes the terminal here");
        return;
    }
    let s = byteport_testkit::TestServer::start(byteport_testkit::backends()[0]).await;
    let cfg = temp_config();
    let c = cfg.as_path();
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
    let dir = c.parent().expect("dir").to_owned();
    let disk = dir.join("disk.raw");
    std::fs::write(&disk, vec![7u8; 3 << 20]).expect("disk");
    let cmd = format!(
        "{} image import barred {} --format raw --os-family linux --os-version 1",
        env!("CARGO_BIN_EXE_byteport"),
        disk.display()
    );
    let o = tokio::task::spawn_blocking(move || {
        Command::new("script")
            .args(["-qec", &cmd, "/dev/null"])
            .env("BYTEPORT_CONFIG", &cfg)
            .env_remove("BYTEPORT_URL")
            .env_remove("BYTEPORT_TOKEN")
            .stdin(Stdio::null())
            .output()
            .expect("running script")
    })
    .await
    .expect("joining");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}");
    let bar = format!("[{}] 100%  3.0 MiB/3.0 MiB", "=".repeat(30));
    assert!(
        out.contains("uploading image") && out.contains(&bar),
        "{out:?}"
    );
    assert!(out.contains("image barred is available"), "{out:?}");
}

#[test]
fn completions_for_bash_zsh_and_fish_and_man_pages_cover_every_command() {
    let cfg = temp_config();
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef byteport"),
        ("fish", "complete -c byteport"),
    ] {
        let o = byteport(&cfg, &["completion", shell], None);
        assert_eq!(o.code, 0, "{}", o.stderr);
        assert!(
            o.stdout.contains(marker),
            "{shell}: {}",
            &o.stdout[..200.min(o.stdout.len())]
        );
        // Nested commands complete too.
        for word in ["create", "exec", "join-token", "adopt"] {
            assert!(o.stdout.contains(word), "{shell} lacks {word}");
        }
    }
    let o = byteport(&cfg, &["completion", "tcsh"], None);
    assert_ne!(o.code, 0);
    let dir = std::env::temp_dir().join(format!("byteport-man-{}", std::process::id()));
    let o = byteport(&cfg, &["man", dir.to_str().unwrap()], None);
    assert_eq!(o.code, 0, "{}", o.stderr);
    for page in [
        "byteport.1",
        "byteport-vm.1",
        "byteport-vm-create.1",
        "byteport-env-run.1",
    ] {
        let text =
            std::fs::read_to_string(dir.join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
        let title = page.trim_end_matches(".1");
        assert!(
            text.contains(&format!(".TH {title}")),
            "{page}: {}",
            &text[..200.min(text.len())]
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
