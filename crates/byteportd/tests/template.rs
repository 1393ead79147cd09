//! Fresh VMs from a memory snapshot, with real QEMU and the `tiny` image:
//! a template booted once and saved, then clones that wake from it. Each
//! clone answers through its own guest agent, reads its own random bytes
//! (a fresh VM generation id reseeds the guest's generator), keeps what it
//! writes to itself, and leaves nothing when destroyed. Prints how long a
//! clone took to run and to answer. Skips, saying why, without QEMU or the
//! image, unless `BYTEPORT_REQUIRE_QEMU=1` (set by `cargo xtask test`).

use byteport_guest::host::ExecRequest;
use byteport_node::driver::Accel;
use byteport_node::template::{QemuCommand, TemplateSpec, build};
use byteport_testkit::daemon::tiny_or_skip;
use std::time::Instant;

async fn run(c: &byteport_node::template::Clone, script: &str) -> (String, Option<i32>) {
    let out = c
        .agent
        .exec_output(ExecRequest::new(["sh", "-c", script]))
        .await
        .expect("exec in the clone");
    (String::from_utf8_lossy(&out.stdout).into_owned(), out.code)
}

#[tokio::test]
async fn clones_of_a_template_wake_in_a_fraction_of_a_boot_each_with_its_own_state() {
    let Some(img) = tiny_or_skip("templates and clones") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let spec = TemplateSpec {
        kernel: img.join("vmlinuz"),
        initrd: img.join("initrd.img"),
        cmdline: "console=ttyS0 quiet byteport.hostname=tpl".into(),
        disk: None,
        warmup: None,
        prewarm: None,
        vcpus: 1,
        memory_mib: 256,
        accel: Accel::Tcg,
    };
    let qemu = &QemuCommand::new("qemu-system-x86_64");
    let t = build(qemu, spec, &tmp.path().join("template"), "bp-test-tpl")
        .await
        .expect("a template");
    let state = std::fs::metadata(&t.state).unwrap().len();
    eprintln!(
        "template built in {} ms; device state {} KiB",
        t.built_in.as_millis(),
        state / 1024
    );
    assert!(
        state < 8 << 20,
        "the RAM is not in the state file: {state} bytes"
    );

    let mut seen = Vec::new();
    for i in 0..2 {
        let t0 = Instant::now();
        let c = t
            .start_clone(qemu, &tmp.path().join(format!("clone-{i}")))
            .await
            .expect("a clone");
        let (out, code) = run(&c, "echo hi").await;
        let first = t0.elapsed();
        assert_eq!((out.trim(), code), ("hi", Some(0)));
        // It woke without being given the kernel to boot (QEMU keeps a
        // kernel and initrd it is given in its memory).
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", c.pid)).unwrap();
        let argv: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        assert!(
            !argv.contains(&&b"-kernel"[..]) && !argv.contains(&&b"-initrd"[..]),
            "clone {i} was given the kernel: {}",
            String::from_utf8_lossy(&cmdline)
        );
        eprintln!(
            "clone {i}: running after {} ms, agent ready after {} ms, first output after {} ms",
            c.restored_in.as_millis(),
            c.ready_in.as_millis(),
            first.as_millis()
        );
        // What one clone writes, the next never sees (private RAM).
        let (was, _) = run(
            &c,
            "cat /tmp/mark 2>/dev/null; echo clone-$RANDOM > /tmp/mark",
        )
        .await;
        assert!(
            was.trim().is_empty(),
            "clone {i} saw an earlier clone's file: {was}"
        );
        let (random, _) = run(&c, "head -c 16 /dev/urandom | od -An -tx1").await;
        seen.push(random.split_whitespace().collect::<String>());
        let pid = c.pid;
        let dir = c.dir.clone();
        c.destroy().await;
        assert!(!byteport_testkit::daemon::alive(pid), "QEMU {pid} is left");
        assert!(!dir.exists(), "the clone's directory is left");
    }
    assert_ne!(seen[0], seen[1], "two clones read the same random bytes");
    // The RAM is a memfd of this process: once let go, nothing holds it.
    let memory = t.memory.clone();
    assert!(
        std::fs::read_link(&memory)
            .is_ok_and(|l| l.to_string_lossy().contains("memfd:bp-test-tpl"))
    );
    t.remove();
    assert!(
        !std::fs::read_link(&memory).is_ok_and(|l| l.to_string_lossy().contains("bp-test-tpl")),
        "the template's RAM is still open"
    );
}

#[tokio::test]
async fn a_runtime_image_clones_with_its_read_only_root_and_runs_python() {
    let Some(img) = byteport_testkit::daemon::image_or_skip("run-python", "run-python clones")
    else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let spec = TemplateSpec {
        kernel: img.join("vmlinuz"),
        initrd: img.join("initrd.img"),
        cmdline: "console=ttyS0 root=/dev/vda ro quiet".into(),
        disk: Some(img.join("disk.qcow2")),
        warmup: Some(vec!["python3".into(), "-c".into(), "pass".into()]),
        prewarm: None,
        vcpus: 1,
        memory_mib: 256,
        accel: Accel::Tcg,
    };
    let qemu = &QemuCommand::new("qemu-system-x86_64");
    let t = build(qemu, spec, &tmp.path().join("template"), "bp-test-rtpl")
        .await
        .expect("a template of run-python");
    eprintln!("run-python template built in {} ms", t.built_in.as_millis());
    for i in 0..2 {
        let t0 = Instant::now();
        let c = t
            .start_clone(qemu, &tmp.path().join(format!("clone-{i}")))
            .await
            .expect("a clone");
        let out = c
            .agent
            .exec_output(ExecRequest::new([
                "python3",
                "-c",
                "import sys; print(sum(range(10)), sys.version_info[0])",
            ]))
            .await
            .expect("python in the clone");
        eprintln!(
            "run-python clone {i}: first output after {} ms",
            t0.elapsed().as_millis()
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "45 3");
        // The root is read-only; the run's own directory is RAM.
        let (w, code) = run(
            &c,
            "touch /usr/x 2>/dev/null; echo $?; echo hi > /run/code/f && cat /run/code/f",
        )
        .await;
        assert_eq!(
            (w.split_whitespace().collect::<Vec<_>>(), code),
            (vec!["1", "hi"], Some(0))
        );
        c.destroy().await;
    }
    t.remove();
}
