//! Run-code on the node: each run gets a VM of its own, a clone of its
//! runtime image's template (see [`crate::template`]), never reused and
//! destroyed at the end with its directory. The template of an image and
//! size is built the first time a run needs it and kept for the next runs.
//!
//! The node enforces the run's limits: its wall-clock timeout, its output
//! limit (stdout and stderr together), and its memory (the clone's RAM;
//! a program the guest's kernel kills for memory shows as
//! `out_of_memory`). A clone has no network device at all.

use crate::Shared;
use crate::channel::Input;
use crate::driver::{Accel, Driver};
use crate::template::{Clone, QemuCommand, Template, TemplateSpec, boot_cold, build};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use byteport_guest::host::ExecEvent;
use byteport_guest::proto::ExecRequest;
use byteport_types::api::{BootMode, NodeImage};
use byteport_types::node_proto::{FromNode, RunResult, RunSpec};
use byteport_types::runtime::RUN_DIR;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Templates by image and size, and where clones live.
pub struct Runs {
    qemu: QemuCommand,
    accel: Accel,
    dir: PathBuf,
    /// Templates by key; `None`: this one could not be saved.
    templates: tokio::sync::Mutex<HashMap<String, Option<Arc<Template>>>>,
    /// Whether runs start from templates at all (else each boots cold).
    templates_on: bool,
    /// Clones restored ahead, by template.
    pool: Arc<std::sync::Mutex<HashMap<String, Slot>>>,
    /// Runs going on now.
    active: Arc<AtomicUsize>,
    /// How many restored clones to keep waiting per template.
    pool_size: usize,
}

/// One template's clones in the pool.
#[derive(Default)]
struct Slot {
    ready: Vec<Clone>,
    /// Being restored now; counted in the pool's size.
    coming: usize,
}

/// The key of a template: its image and size.
fn template_key(image: &NodeImage, vcpus: u32, memory_mib: u64) -> String {
    format!(
        "{}-{vcpus}-{memory_mib}",
        &image.sha256[..16.min(image.sha256.len())]
    )
}

/// Kills the QEMUs of clones under `dir` that a crash of the node left
/// running (pooled clones wait there).
fn kill_leftovers(dir: &std::path::Path) {
    let needle = dir.display().to_string();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd);
        if cmd.contains("qemu-system") && cmd.contains(&needle) {
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status();
        }
    }
}

/// A clone of `template` restored in `dir`, with a boot id and machine id
/// of its own (it woke with the template's). Done as it is restored, so a
/// pooled clone has it before its run comes: bind-mounting them costs the
/// guest tens of milliseconds under emulation.
///
/// A clone restored ahead of its run (the pool's) then runs its runtime's
/// prewarm command, if `prewarm()` says so once it is ready: a fresh QEMU
/// that emulates translates each guest instruction the first time it
/// meets it, which is most of a first process's cost (a shell's `echo`
/// takes about twice as long in a clone that has never started a
/// process). The prewarm is a fixed program of the runtime, run before any
/// user's code reaches this VM, and nothing of it is left but the
/// translated code; a run's own clone never shares it with another. The
/// pool skips it while other runs are going: on a busy node it is work no
/// run waits less for, and the processors are what the runs wait for.
async fn restore(
    qemu: &QemuCommand,
    template: &Template,
    dir: &std::path::Path,
    prewarm: impl Fn() -> bool,
) -> Result<Clone, String> {
    let c = template.start_clone(qemu, dir).await?;
    let req = ExecRequest {
        argv: Vec::new(),
        identity: Some((
            uuid::Uuid::new_v4().to_string(),
            uuid::Uuid::new_v4().simple().to_string(),
        )),
        ..ExecRequest::default()
    };
    if let Err(e) = c.agent.exec_output(req).await {
        c.destroy().await;
        return Err(format!("giving the clone its identity: {e}"));
    }
    if let Some(argv) = template.spec.prewarm.as_ref().filter(|_| prewarm()) {
        match c.agent.exec_output(ExecRequest::new(argv.clone())).await {
            Ok(o) if o.code == Some(0) => {}
            Ok(o) => tracing::warn!(
                code = ?o.code,
                stderr = %String::from_utf8_lossy(&o.stderr).trim(),
                "a pooled clone's prewarm failed"
            ),
            Err(e) => {
                c.destroy().await;
                return Err(format!("prewarming the clone: {e}"));
            }
        }
    }
    Ok(c)
}

/// Counts a run out of [`Runs::active`] when it ends, however it ends.
struct Going<'a>(&'a AtomicUsize);

impl Drop for Going<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How a run is ending, before its result is written.
enum Ending {
    Exited(Option<i32>, Option<i32>),
    /// The compiler said no (its exit code or signal).
    BuildFailed(Option<i32>, Option<i32>),
    Timeout,
    OutputLimit,
    Cancelled,
    Failed(String),
}

impl Runs {
    /// `dir` holds templates and clones; what a crash left there goes.
    pub fn new(
        qemu: QemuCommand,
        accel: Accel,
        dir: PathBuf,
        node: &str,
        pool_size: usize,
        templates_on: bool,
    ) -> Runs {
        kill_leftovers(&dir);
        let _ = std::fs::remove_dir_all(&dir);
        // Templates' RAM is a memfd now; earlier versions kept it in
        // /dev/shm, under the node's whole id (a node's id starts with the
        // time it was made, so two nodes made together share any prefix).
        let shm_prefix = format!("byteport-{}-", node.replace('-', ""));
        for e in std::fs::read_dir("/dev/shm")
            .into_iter()
            .flatten()
            .flatten()
        {
            if e.file_name().to_string_lossy().starts_with(&shm_prefix) {
                let _ = std::fs::remove_file(e.path());
            }
        }
        Runs {
            qemu,
            accel,
            dir,
            templates: tokio::sync::Mutex::default(),
            templates_on,
            pool: Arc::default(),
            active: Arc::default(),
            pool_size,
        }
    }

    /// A restored clone of `template`: one waiting in the pool, else a new
    /// one; the pool is topped up in the background either way. A run
    /// does not wait for a clone the pool is restoring: that one also
    /// prewarms, which a run restored for itself would wait through.
    async fn take_clone(
        &self,
        key: &str,
        template: &Arc<Template>,
    ) -> Result<(Clone, bool), String> {
        let pooled = loop {
            let clone = {
                let mut slots = self.pool.lock().unwrap_or_else(|p| p.into_inner());
                slots.get_mut(key).and_then(|s| s.ready.pop())
            };
            match clone {
                Some(c) if !c.agent.is_closed() => break Some(c),
                Some(c) => c.destroy().await,
                None => break None,
            }
        };
        self.refill(key, template);
        if let Some(c) = pooled {
            return Ok((c, true));
        }
        let dir = self.clone_dir();
        match restore(&self.qemu, template, &dir, || false).await {
            Ok(c) => Ok((c, false)),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    fn clone_dir(&self) -> PathBuf {
        self.dir
            .join(format!("run-{}", uuid::Uuid::new_v4().simple()))
    }

    /// Restores clones until the template's pool (those ready and those
    /// coming) is full again.
    fn refill(&self, key: &str, template: &Arc<Template>) {
        let missing = {
            let mut slots = self.pool.lock().unwrap_or_else(|p| p.into_inner());
            let slot = slots.entry(key.to_owned()).or_default();
            let missing = self
                .pool_size
                .saturating_sub(slot.ready.len() + slot.coming);
            slot.coming += missing;
            missing
        };
        for _ in 0..missing {
            let (pool, qemu, template, key, active) = (
                self.pool.clone(),
                self.qemu.clone(),
                template.clone(),
                key.to_owned(),
                self.active.clone(),
            );
            let dir = self.clone_dir();
            tokio::spawn(async move {
                // The run that took the last clone may still be going.
                let quiet = || active.load(Ordering::Relaxed) <= 1;
                let c = restore(&qemu, &template, &dir, quiet).await;
                if let Err(e) = &c {
                    tracing::warn!(error = %e, "cannot restore a clone for the pool");
                    let _ = std::fs::remove_dir_all(&dir);
                }
                {
                    let mut slots = pool.lock().unwrap_or_else(|p| p.into_inner());
                    let slot = slots.entry(key).or_default();
                    slot.coming -= 1;
                    if let Ok(c) = c {
                        slot.ready.push(c);
                    }
                }
            });
        }
    }

    /// What a VM of this image and size boots (its files fetched).
    async fn vm_spec<D: Driver>(
        &self,
        shared: &Shared<D>,
        image: &NodeImage,
        warmup: &[String],
        prewarm: &[String],
        vcpus: u32,
        memory_mib: u64,
    ) -> Result<TemplateSpec, String> {
        if image.boot != BootMode::Kernel || !image.has_agent {
            return Err(format!(
                "image {} cannot run code: it must boot a kernel and have the guest agent",
                image.name
            ));
        }
        let cred = shared.credential();
        let (imgs, cp) = (&shared.images, &shared.cp);
        let kernel_sha = image
            .kernel_sha256
            .as_deref()
            .ok_or("the image names no kernel")?;
        let kernel = imgs.ensure(cp, &cred, kernel_sha).await?;
        let main = imgs.ensure(cp, &cred, &image.sha256).await?;
        let (initrd, disk) = match image.format.as_str() {
            "initramfs" => (main, None),
            "qcow2" => {
                let sha = image
                    .initrd_sha256
                    .as_deref()
                    .ok_or("the image names no initrd")?;
                (imgs.ensure(cp, &cred, sha).await?, Some(main))
            }
            f => return Err(format!("a runtime image cannot be {f}")),
        };
        Ok(TemplateSpec {
            kernel,
            initrd,
            cmdline: image
                .cmdline
                .clone()
                .unwrap_or_else(|| "console=ttyS0 quiet".into()),
            disk,
            warmup: (!warmup.is_empty()).then(|| warmup.to_vec()),
            prewarm: (!prewarm.is_empty()).then(|| prewarm.to_vec()),
            vcpus,
            memory_mib,
            accel: self.accel,
        })
    }

    /// The template for this image and size, built if missing (and the
    /// time that took). `Ok(None)`: templates are off, or this one could
    /// not be saved (the reason is logged once): boot cold.
    async fn template(
        &self,
        key: &str,
        image: &NodeImage,
        spec: &TemplateSpec,
    ) -> (Option<Arc<Template>>, Option<Duration>) {
        if !self.templates_on {
            return (None, None);
        }
        let mut templates = self.templates.lock().await;
        match templates.get(key) {
            Some(Some(t)) => return (Some(t.clone()), None),
            Some(None) => return (None, None),
            None => {}
        }
        let dir = self.dir.join(format!("template-{key}"));
        match build(
            &self.qemu,
            spec.clone(),
            &dir,
            &format!("byteport-template-{key}"),
        )
        .await
        {
            Ok(t) => {
                tracing::info!(image = %image.name, ms = t.built_in.as_millis() as u64, "run template built");
                let built = t.built_in;
                let t = Arc::new(t);
                templates.insert(key.to_owned(), Some(t.clone()));
                (Some(t), Some(built))
            }
            Err(e) => {
                tracing::warn!(image = %image.name, error = %e, "cannot save a run template: runs of it boot cold");
                let _ = std::fs::remove_dir_all(&dir);
                templates.insert(key.to_owned(), None);
                (None, None)
            }
        }
    }

    /// Carries out one run, streaming its output to `out`; returns its end.
    pub(crate) async fn run<D: Driver>(
        &self,
        shared: &Shared<D>,
        stream: u64,
        spec: RunSpec,
        mut input: mpsc::Receiver<Input>,
        out: &mpsc::Sender<FromNode>,
    ) -> FromNode {
        let t0 = Instant::now();
        self.active.fetch_add(1, Ordering::Relaxed);
        let _going = Going(&self.active);
        let mut result = RunResult {
            outcome: "failed".into(),
            code: None,
            signal: None,
            message: None,
            from_template: true,
            from_pool: false,
            template_build_ms: None,
            vm_ready_ms: 0,
            build_ms: None,
            first_output_ms: None,
            end_ms: 0,
        };
        let vm = match self
            .vm_spec(
                shared,
                &spec.image,
                &spec.warmup,
                &spec.prewarm,
                spec.vcpus,
                spec.memory_mib,
            )
            .await
        {
            Ok(s) => s,
            Err(e) => return end(stream, result, Ending::Failed(e), t0),
        };
        let key = template_key(&spec.image, spec.vcpus, spec.memory_mib);
        let (template, built) = self.template(&key, &spec.image, &vm).await;
        result.template_build_ms = built.map(|d| d.as_millis() as u64);
        let clone = match &template {
            Some(t) => match self.take_clone(&key, t).await {
                Ok((c, pooled)) => {
                    result.from_pool = pooled;
                    c
                }
                Err(e) => return end(stream, result, Ending::Failed(e), t0),
            },
            None => {
                result.from_template = false;
                let dir = self.clone_dir();
                match boot_cold(&self.qemu, &vm, &dir).await {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = std::fs::remove_dir_all(&dir);
                        return end(stream, result, Ending::Failed(e), t0);
                    }
                }
            }
        };
        result.vm_ready_ms = t0.elapsed().as_millis() as u64;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(spec.timeout_secs);
        let mut io = RunIo {
            stream,
            input: &mut input,
            out,
            deadline,
            output_limit: spec.output_limit,
            sent: 0,
            first_output_ms: None,
            t0,
        };
        let ending = 'run: {
            if !spec.files.is_empty() {
                let files = serde_json::to_vec(&spec.files).unwrap_or_default();
                let req = ExecRequest {
                    stdin: true,
                    ..ExecRequest::new(["byteport-guest", "unpack", RUN_DIR])
                };
                match clone.agent.exec(req).await {
                    Err(e) => {
                        break 'run Ending::Failed(format!("writing the program's files: {e}"));
                    }
                    Ok(s) => {
                        let _ = s.write_stdin(&files).await;
                        let _ = s.close_stdin().await;
                        match s.output().await {
                            Ok(o) if o.code == Some(0) => {}
                            Ok(o) => {
                                break 'run Ending::Failed(format!(
                                    "writing the program's files: {}",
                                    String::from_utf8_lossy(&o.stderr).trim()
                                ));
                            }
                            Err(e) => {
                                break 'run Ending::Failed(format!(
                                    "writing the program's files: {e}"
                                ));
                            }
                        }
                    }
                }
            }
            // The clone woke with the template's clock.
            let now = || {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .ok()
                    .map(|d| (d.as_secs() as i64, d.subsec_nanos()))
            };
            let mut clock = now();
            if let Some(build) = &spec.build {
                let started = Instant::now();
                let req = ExecRequest {
                    argv: build.clone(),
                    env: spec.env.clone(),
                    cwd: Some(RUN_DIR.into()),
                    stdin: false,
                    set_clock: clock.take(),
                    identity: None,
                };
                let e = io.exec(&clone, req, None).await;
                result.build_ms = Some(started.elapsed().as_millis() as u64);
                match e {
                    Ending::Exited(Some(0), None) => {}
                    Ending::Exited(code, signal) => {
                        break 'run Ending::BuildFailed(code, signal);
                    }
                    other => break 'run other,
                }
            }
            let req = ExecRequest {
                argv: spec.argv.clone(),
                env: spec.env.clone(),
                cwd: Some(RUN_DIR.into()),
                stdin: spec.stdin.is_some(),
                set_clock: clock,
                identity: None,
            };
            let stdin = spec.stdin.as_deref().and_then(|d| B64.decode(d).ok());
            io.exec(&clone, req, stdin.as_deref()).await
        };
        result.first_output_ms = io.first_output_ms;
        // A SIGKILL we did not send: was it the guest kernel's OOM killer?
        let oom = matches!(ending, Ending::Exited(_, Some(9)))
            && clone
                .agent
                .exec_output(ExecRequest::new(["cat", "/proc/vmstat"]))
                .await
                .is_ok_and(|o| {
                    String::from_utf8_lossy(&o.stdout).lines().any(|l| {
                        l.strip_prefix("oom_kill ")
                            .and_then(|n| n.trim().parse::<u64>().ok())
                            .is_some_and(|n| n > 0)
                    })
                });
        clone.destroy().await;
        let mut r = end(stream, result, ending, t0);
        if oom && let FromNode::RunEnd { result, .. } = &mut r {
            result.outcome = "out_of_memory".into();
            result.message = Some(format!(
                "the program used more than the run's {} MiB and was killed",
                spec.memory_mib
            ));
        }
        r
    }
}

fn end(stream: u64, mut r: RunResult, e: Ending, t0: Instant) -> FromNode {
    r.end_ms = t0.elapsed().as_millis() as u64;
    match e {
        Ending::Exited(code, signal) => {
            r.outcome = "exited".into();
            r.code = code;
            r.signal = signal;
        }
        Ending::BuildFailed(code, signal) => {
            r.outcome = "exited".into();
            r.code = code;
            r.signal = signal;
            r.message = Some("the build failed: the program did not run".into());
        }
        Ending::Timeout => r.outcome = "timeout".into(),
        Ending::OutputLimit => r.outcome = "output_limit".into(),
        Ending::Cancelled => r.outcome = "cancelled".into(),
        Ending::Failed(m) => {
            r.outcome = "failed".into();
            r.message = Some(m);
        }
    }
    FromNode::RunEnd { stream, result: r }
}

/// A run's streams, limits and clock, shared by its steps.
struct RunIo<'a> {
    stream: u64,
    input: &'a mut mpsc::Receiver<Input>,
    out: &'a mpsc::Sender<FromNode>,
    deadline: tokio::time::Instant,
    output_limit: u64,
    /// Output passed on so far (every step's).
    sent: u64,
    first_output_ms: Option<u64>,
    t0: Instant,
}

impl RunIo<'_> {
    /// Runs one command in the clone, passing its output on, until it
    /// ends or a limit or a cancel ends it.
    async fn exec(&mut self, clone: &Clone, req: ExecRequest, stdin: Option<&[u8]>) -> Ending {
        let mut s = match clone.agent.exec(req).await {
            Err(e) => return Ending::Failed(format!("the guest agent refused the run: {e}")),
            Ok(s) => s,
        };
        if let Some(data) = stdin {
            let _ = s.write_stdin(data).await;
            let _ = s.close_stdin().await;
        }
        let stream = self.stream;
        loop {
            tokio::select! {
                ev = s.events.recv() => match ev {
                    Some(ExecEvent::Stdout(b) | ExecEvent::Stderr(b))
                        if self.sent + b.len() as u64 > self.output_limit =>
                    {
                        let _ = s.kill().await;
                        return Ending::OutputLimit;
                    }
                    Some(ExecEvent::Stdout(b)) => {
                        self.output();
                        self.sent += b.len() as u64;
                        let _ = self.out.send(FromNode::Stdout { stream, data: B64.encode(b) }).await;
                    }
                    Some(ExecEvent::Stderr(b)) => {
                        self.output();
                        self.sent += b.len() as u64;
                        let _ = self.out.send(FromNode::Stderr { stream, data: B64.encode(b) }).await;
                    }
                    Some(ExecEvent::Exit { code, signal }) => return Ending::Exited(code, signal),
                    Some(ExecEvent::Error(m)) => return Ending::Failed(m),
                    None => return Ending::Failed("the guest agent went away".into()),
                },
                i = self.input.recv() => if matches!(i, Some(Input::Close) | None) {
                    let _ = s.kill().await;
                    return Ending::Cancelled;
                },
                _ = tokio::time::sleep_until(self.deadline) => {
                    let _ = s.kill().await;
                    return Ending::Timeout;
                }
            }
        }
    }

    fn output(&mut self) {
        self.first_output_ms
            .get_or_insert(self.t0.elapsed().as_millis() as u64);
    }
}
