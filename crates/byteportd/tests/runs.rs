//! Run-code with real guests: `POST /v1/runs` on an all-in-one with the
//! `run-shell` and `run-python` runtime images. Each run's program prints
//! what it should, with its exit code; stdin reaches it; a run past its
//! timeout is killed and says so; one run never sees another's files or
//! random bytes; a run has no network device; a run can be cancelled; the
//! runs are records; nothing of a run's VM is left. Skips, saying why,
//! without QEMU or the images, unless `BYTEPORT_REQUIRE_QEMU=1` (set by
//! `cargo xtask test`, which builds them first).

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use byteport_testkit::daemon::{Daemon, image_or_skip, qemus_under};
use serde_json::{Value, json};
use std::path::Path;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_byteportd");

/// A run's stream: (stdout, stderr, the end record).
fn run(d: &Daemon, body: Value) -> (String, String, Value) {
    let lines = d.api.post_lines("/v1/runs", body).expect("a run");
    assert!(
        lines[0].get("run").is_some(),
        "the stream starts with the run: {lines:?}"
    );
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let mut end = Value::Null;
    let (mut next_out, mut next_err) = (0, 0);
    for l in &lines {
        if let Some(o) = l.get("output") {
            let b = B64.decode(o["data"].as_str().unwrap()).unwrap();
            let (buf, next) = match o["stream"].as_str() {
                Some("stdout") => (&mut out, &mut next_out),
                _ => (&mut err, &mut next_err),
            };
            assert_eq!(o["offset"], *next, "output comes in order: {l}");
            *next += b.len() as u64;
            buf.extend(b);
        } else if let Some(e) = l.get("end") {
            end = e.clone();
        }
    }
    assert!(
        !end.is_null(),
        "the stream ends with the run's end: {lines:?}"
    );
    (
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
        end,
    )
}

#[test]
fn programs_run_in_fresh_vms_of_their_own_with_their_limits() {
    let Some(shell) = image_or_skip("run-shell", "run-code") else {
        return;
    };
    let Some(python) = image_or_skip("run-python", "run-code") else {
        return;
    };
    let Some(node) = image_or_skip("run-node", "run-code") else {
        return;
    };
    let d = Daemon::start(Path::new(BIN));
    d.import_image(&shell);
    d.import_image(&python);
    d.import_image(&node);

    // Shell: output on both streams, in order, and the exit code.
    let (out, err, end) = run(
        &d,
        json!({"language": "shell", "code": "echo hello \"$1\"; echo oops >&2; exit 3", "args": ["world"]}),
    );
    assert_eq!(
        (out.as_str(), err.as_str()),
        ("hello world\n", "oops\n"),
        "{end}"
    );
    assert_eq!(
        (end["state"].as_str(), end["exit_code"].as_i64()),
        (Some("exited"), Some(3)),
        "{end}"
    );
    let t = &end["timings"];
    assert!(
        t["vm_ready_ms"].as_u64().unwrap() <= t["end_ms"].as_u64().unwrap(),
        "{t}"
    );
    eprintln!("shell run timings: {t}");

    // Python, with stdin.
    let (out, _, end) = run(
        &d,
        json!({"language": "python", "code": "import sys\nprint(sys.stdin.read().upper(), sum(range(10)))", "stdin": "abc"}),
    );
    assert_eq!(out, "ABC 45\n");
    assert_eq!(end["exit_code"], 0, "{end}");
    eprintln!("python run timings: {}", end["timings"]);

    // Node.
    let (out, _, end) = run(
        &d,
        json!({"language": "node", "code": "console.log([1, 2, 3].map(x => x * 2).join(','), process.argv.slice(1))", "args": ["a"]}),
    );
    assert_eq!(out, "2,4,6 [ 'a' ]\n", "{end}");
    assert_eq!(end["exit_code"], 0, "{end}");

    // Past its timeout: killed, and told so.
    let t0 = Instant::now();
    let (_, _, end) = run(
        &d,
        json!({"language": "shell", "code": "sleep 60", "timeout_secs": 2}),
    );
    assert_eq!(end["state"], "timeout", "{end}");
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "the timeout held: {:?}",
        t0.elapsed()
    );

    // Every run is a fresh VM: no file, no random bytes of another run.
    let (_, _, first) = run(
        &d,
        json!({"language": "shell", "code": "echo mine > /tmp/mark; head -c 16 /dev/urandom | od -An -tx1"}),
    );
    let (out, _, second) = run(
        &d,
        json!({"language": "shell", "code": "cat /tmp/mark 2>/dev/null || echo absent; head -c 16 /dev/urandom | od -An -tx1"}),
    );
    assert!(
        out.starts_with("absent\n"),
        "a run saw another run's file: {out}"
    );
    assert_ne!(
        first["stdout"], second["stdout"],
        "two runs read the same random bytes"
    );

    // The clone's clock is the host's, not the template's.
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
    };
    let before = now();
    let (out, _, _) = run(&d, json!({"language": "shell", "code": "date +%s.%N"}));
    let after = now();
    let guest: f64 = out
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("date: {out:?}"));
    assert!(
        guest > before - 1.0 && guest < after + 1.0,
        "the guest's clock {guest} is off the host's {before}..{after}"
    );

    // No network at all: only the loopback device.
    let (out, _, _) = run(
        &d,
        json!({"language": "shell", "code": "ls /sys/class/net"}),
    );
    assert_eq!(out.split_whitespace().collect::<Vec<_>>(), ["lo"], "{out}");

    // Bad input: 4xx, and no record made.
    let before = d.api.get("/v1/runs").unwrap()["items"]
        .as_array()
        .unwrap()
        .len();
    for (body, want) in [
        (
            json!({"language": "cobol", "code": "x"}),
            "not one of shell, python, node",
        ),
        (json!({"language": "shell", "code": ""}), "code is 0 bytes"),
        (json!({"language": "shell", "code": "a\u{0}b"}), "NUL"),
        (
            json!({"language": "shell", "code": "x".repeat(70_000)}),
            "code is 70000 bytes",
        ),
        (
            json!({"language": "shell", "code": "true", "timeout_secs": 0}),
            "timeout_secs is 0",
        ),
        (
            json!({"language": "shell", "code": "true", "memory_mib": 64}),
            "memory_mib is 64",
        ),
        (
            json!({"language": "shell", "code": "true", "extra": 1}),
            "extra",
        ),
    ] {
        let e = d.api.post("/v1/runs", body).unwrap_err();
        assert!(
            (e.starts_with("400") || e.starts_with("422")) && e.contains(want),
            "{want}: {e}"
        );
    }
    let after = d.api.get("/v1/runs").unwrap()["items"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(before, after, "a refused run left a record");

    // Cancel a running one.
    let api = d.api.clone();
    let waiting = std::thread::spawn(move || {
        api.post_lines(
            "/v1/runs",
            json!({"language": "shell", "code": "echo started; sleep 60"}),
        )
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let id = loop {
        let runs = d.api.get("/v1/runs?state=running").unwrap();
        if let Some(r) = runs["items"].as_array().unwrap().first() {
            break r["id"].as_str().unwrap().to_owned();
        }
        assert!(Instant::now() < deadline, "the run never showed as running");
        std::thread::sleep(Duration::from_millis(100));
    };
    std::thread::sleep(Duration::from_secs(1));
    // Clones' QEMUs (the running one and the pool's) run with transparent
    // huge pages off, through the daemon's launcher.
    let qemus = qemus_under(&d.dir);
    assert!(!qemus.is_empty());
    for pid in qemus {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        assert!(
            status
                .lines()
                .any(|l| l.split_whitespace().eq(["THP_enabled:", "0"])),
            "QEMU {pid} has transparent huge pages on: {status}"
        );
    }
    d.api.delete(&format!("/v1/runs/{id}")).expect("cancel");
    let lines = waiting.join().unwrap().expect("the stream");
    let end = &lines.last().unwrap()["end"];
    assert_eq!(end["state"], "cancelled", "{lines:?}");

    // Records: the run as it ended, its output kept.
    let shown = d.api.get(&format!("/v1/runs/{id}")).unwrap();
    assert_eq!(shown["state"], "cancelled", "{shown}");
    assert_eq!(shown["stdout"], "started\n", "{shown}");
    assert_eq!(shown["user"], "admin");
    assert_eq!(shown["code_sha256"].as_str().unwrap().len(), 64);
    let all = d.api.get("/v1/runs").unwrap();
    assert_eq!(all["items"].as_array().unwrap().len(), 9, "{all}");
    // Later runs of a runtime found a clone restored ahead in the pool.
    assert!(
        all["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["timings"]["from_pool"] == true),
        "no run came from the pool: {all}"
    );

    // Nothing left of the runs' VMs: what still runs is the node's pool,
    // one restored clone per runtime waiting for the next run (the
    // templates' own QEMUs quit once saved).
    std::thread::sleep(Duration::from_secs(2));
    let qemus = qemus_under(&d.dir);
    let runs_dir = d.dir.join("node/runs");
    let left: Vec<String> = std::fs::read_dir(&runs_dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("run-"))
        .collect();
    assert!(
        qemus.len() <= 3,
        "more QEMUs than the pool holds: {qemus:?}"
    );
    assert_eq!(
        left.len(),
        qemus.len(),
        "clone directories {left:?} beside QEMUs {qemus:?}"
    );
}

/// Programs as files with an entry point, code too long to be an
/// argument, Python's waiting interpreter (its exit codes, tracebacks and
/// memory limit), each clone's own boot id, and Rust compiled in the VM
/// from a Cloudlet `config.toml` through the CLI.
#[test]
fn files_the_warm_interpreter_and_rust() {
    let Some(shell) = image_or_skip("run-shell", "run-code") else {
        return;
    };
    let Some(python) = image_or_skip("run-python", "run-code") else {
        return;
    };
    let Some(rust) = image_or_skip("run-rust", "run-code") else {
        return;
    };
    let d = Daemon::start(Path::new(BIN));
    d.import_image(&shell);
    d.import_image(&python);
    d.import_image(&rust);

    // Files: the entry imports its neighbour; the working directory holds
    // them; arguments follow the entry.
    let (out, err, end) = run(
        &d,
        json!({
            "language": "python",
            "files": [
                {"path": "app/main.py", "content": "import sys, os, util\nprint(util.twice(21), sys.argv[1:], sorted(f for f in os.listdir('app') if f.endswith('.py')))\n"},
                {"path": "app/util.py", "content": "def twice(x):\n    return 2 * x\n"},
            ],
            "entry": "app/main.py",
            "args": ["x"],
        }),
    );
    assert_eq!(out, "42 ['x'] ['main.py', 'util.py']\n", "{err} {end}");
    assert_eq!(end["exit_code"], 0, "{end}");

    // The waiting interpreter behaves as python3 does: exit codes, a
    // traceback on stderr, __name__, argv of -c.
    let (out, _, end) = run(
        &d,
        json!({"language": "python", "code": "import sys\nprint(__name__, sys.argv)\nsys.exit(4)", "args": ["a"]}),
    );
    assert_eq!(out, "__main__ ['-c', 'a']\n");
    assert_eq!(end["exit_code"], 4, "{end}");
    let (_, err, end) = run(&d, json!({"language": "python", "code": "1 / 0"}));
    assert!(
        err.starts_with("Traceback (most recent call last):") && err.contains("ZeroDivisionError"),
        "{err}"
    );
    assert!(
        !err.contains("python-warm"),
        "the traceback shows the loader: {err}"
    );
    assert_eq!(end["exit_code"], 1, "{end}");
    eprintln!("python (warm) timings: {}", end["timings"]);

    // Past its memory: killed by the guest's kernel, and told so.
    let (_, _, end) = run(
        &d,
        json!({"language": "python", "code": "x = []\nwhile True:\n    x.append(bytearray(1 << 20))", "memory_mib": 128}),
    );
    assert_eq!(end["state"], "out_of_memory", "{end}");

    // Code too long for an argument goes as a file.
    let long = format!("# {}\necho long ok", "x".repeat(40_000));
    let (out, _, end) = run(&d, json!({"language": "shell", "code": long}));
    assert_eq!(out, "long ok\n", "{end}");

    // Each clone has its own boot id.
    let boot_id = || {
        run(
            &d,
            json!({"language": "shell", "code": "cat /proc/sys/kernel/random/boot_id"}),
        )
        .0
    };
    let (a, b) = (boot_id(), boot_id());
    assert_eq!(a.trim().len(), 36, "{a}");
    assert_ne!(a, b, "two clones share a boot id");

    // Bad files: refused, nothing made.
    for (body, want) in [
        (
            json!({"language": "python", "files": [{"path": "../x.py", "content": ""}], "entry": "../x.py"}),
            "must be relative",
        ),
        (
            json!({"language": "python", "files": [{"path": "a.py", "content": ""}]}),
            "main.py is not one of the files",
        ),
        (
            json!({"language": "python", "code": "1", "files": [{"path": "main.py", "content": ""}]}),
            "not both",
        ),
    ] {
        let e = d.api.post("/v1/runs", body).unwrap_err();
        assert!(e.starts_with("400") && e.contains(want), "{want}: {e}");
    }

    // Rust, from Cloudlet's config.toml and example, through the CLI.
    let cli = Path::new(BIN).with_file_name("byteport");
    assert!(
        cli.exists(),
        "{} is missing: build the workspace (cargo build) first",
        cli.display()
    );
    let work = d.dir.join("cloudlet");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(
        work.join("main.rs"),
        "fn fibonacci(n: u32) -> u64 {\n    match n {\n        0 => 0,\n        1 => 1,\n        _ => {\n            let (mut prev, mut curr) = (0, 1);\n            for _ in 2..=n {\n                let next = prev + curr;\n                prev = curr;\n                curr = next;\n            }\n            curr\n        }\n    }\n}\n\nfn main() {\n    let n = 10;\n    println!(\"Fibonacci number at position {} is: {}\", n, fibonacci(n));\n}\n",
    )
    .unwrap();
    std::fs::write(
        work.join("config.toml"),
        format!(
            "workload-name = \"fibonacci\"\nlanguage = \"rust\"\naction = \"prepare-and-run\"\n\n[server]\naddress = \"localhost\"\nport = 50051\n\n[build]\nsource-code-path = \"{}\"\nrelease = true\n",
            work.join("main.rs").display()
        ),
    )
    .unwrap();
    let o = std::process::Command::new(&cli)
        .args(["run", "--config"])
        .arg(work.join("config.toml"))
        .env("BYTEPORT_URL", &d.url)
        .env("BYTEPORT_TOKEN", d.api.token.as_deref().unwrap())
        .env("BYTEPORT_CONFIG", work.join("cli.json"))
        .output()
        .expect("byteport run --config");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(o.status.success(), "{stdout}\n{stderr}");
    assert_eq!(
        stdout, "Fibonacci number at position 10 is: 55\n",
        "{stderr}"
    );
    let runs = d.api.get("/v1/runs?language=rust").unwrap();
    let t = &runs["items"][0]["timings"];
    assert!(t["build_ms"].as_u64().is_some_and(|b| b > 0), "{t}");
    eprintln!("rust run timings: {t}");

    // A compile error: the compiler's message and exit code; nothing ran.
    let (_, err, end) = run(
        &d,
        json!({"language": "rust", "code": "fn main() { let x: u32 = \"no\"; }", "timeout_secs": 600}),
    );
    assert!(err.contains("mismatched types"), "{err}");
    assert_eq!(end["exit_code"], 1, "{end}");
    assert!(
        end["message"]
            .as_str()
            .unwrap_or("")
            .contains("build failed"),
        "{end}"
    );
}

/// With templates off (`--run-templates false`, as on a host where they
/// cannot be saved) every run boots its VM cold, works the same, and says
/// so in its timings; Python without its waiting interpreter starts one.
#[test]
fn without_templates_runs_boot_cold_and_say_so() {
    let Some(shell) = image_or_skip("run-shell", "run-code") else {
        return;
    };
    let Some(python) = image_or_skip("run-python", "run-code") else {
        return;
    };
    let d = Daemon::start_with_env(Path::new(BIN), &[("BYTEPORT_RUN_TEMPLATES", "false")]);
    d.import_image(&shell);
    d.import_image(&python);
    let (out, _, end) = run(
        &d,
        json!({"language": "shell", "code": "echo cold; exit 2"}),
    );
    assert_eq!(out, "cold\n", "{end}");
    assert_eq!(end["exit_code"], 2, "{end}");
    assert_eq!(end["timings"]["from_template"], false, "{end}");
    assert!(end["timings"]["template_build_ms"].is_null(), "{end}");
    let (out, _, end) = run(
        &d,
        json!({"language": "python", "code": "import sys; print(sys.stdin.read()[::-1])", "stdin": "abc"}),
    );
    assert_eq!(out, "cba\n", "{end}");
    assert_eq!(end["timings"]["from_template"], false, "{end}");
    eprintln!("cold python timings: {}", end["timings"]);
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        qemus_under(&d.dir).is_empty(),
        "a cold run's VM was left: {:?}",
        qemus_under(&d.dir)
    );
}
