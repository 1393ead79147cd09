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
use crate::template::{Clone, Template, TemplateSpec, build};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use byteport_guest::host::ExecEvent;
use byteport_guest::proto::ExecRequest;
use byteport_types::api::{BootMode, NodeImage};
use byteport_types::node_proto::{FromNode, RunResult, RunSpec};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Templates by image and size, and where clones live.
pub struct Runs {
    qemu: PathBuf,
    accel: Accel,
    dir: PathBuf,
    /// Prefix of the templates' RAM files in /dev/shm.
    shm_prefix: String,
    templates: tokio::sync::Mutex<HashMap<String, Arc<Template>>>,
    /// Clones already restored and waiting, by template.
    pool: Arc<std::sync::Mutex<HashMap<String, Vec<Clone>>>>,
    /// How many restored clones to keep waiting per template.
    pool_size: usize,
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

/// How a run is ending, before its result is written.
enum Ending {
    Exited(Option<i32>, Option<i32>),
    Timeout,
    OutputLimit,
    Cancelled,
    Failed(String),
}

impl Runs {
    /// `dir` holds templates and clones; what a crash left there goes.
    pub fn new(qemu: PathBuf, accel: Accel, dir: PathBuf, node: &str, pool_size: usize) -> Runs {
        kill_leftovers(&dir);
        let _ = std::fs::remove_dir_all(&dir);
        // The whole id: a node's id starts with the time it was made, so
        // two nodes made together share any prefix of it.
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
            shm_prefix,
            templates: tokio::sync::Mutex::default(),
            pool: Arc::default(),
            pool_size,
        }
    }

    /// A restored clone of `template`: one waiting in the pool, else a new
    /// one; the pool is topped up in the background either way.
    async fn take_clone(
        &self,
        key: &str,
        template: &Arc<Template>,
    ) -> Result<(Clone, bool), String> {
        let pooled = self
            .pool
            .lock()
            .ok()
            .and_then(|mut p| p.get_mut(key).and_then(|v| v.pop()));
        let got = match pooled {
            Some(c) if !c.agent.is_closed() => (c, true),
            other => {
                if let Some(c) = other {
                    c.destroy().await;
                }
                let dir = self.clone_dir();
                match template.start_clone(&self.qemu, &dir).await {
                    Ok(c) => (c, false),
                    Err(e) => {
                        let _ = std::fs::remove_dir_all(&dir);
                        return Err(e);
                    }
                }
            }
        };
        self.refill(key, template);
        Ok(got)
    }

    fn clone_dir(&self) -> PathBuf {
        self.dir
            .join(format!("run-{}", uuid::Uuid::new_v4().simple()))
    }

    /// Restores clones until the template's pool is full again.
    fn refill(&self, key: &str, template: &Arc<Template>) {
        let have = self
            .pool
            .lock()
            .map(|p| p.get(key).map_or(0, Vec::len))
            .unwrap_or(usize::MAX);
        if have >= self.pool_size {
            return;
        }
        let (pool, qemu, template, key) = (
            self.pool.clone(),
            self.qemu.clone(),
            template.clone(),
            key.to_owned(),
        );
        let dir = self.clone_dir();
        tokio::spawn(async move {
            match template.start_clone(&qemu, &dir).await {
                Ok(c) => {
                    if let Ok(mut p) = pool.lock() {
                        p.entry(key).or_default().push(c);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot restore a clone for the pool");
                    let _ = std::fs::remove_dir_all(&dir);
                }
            }
        });
    }

    /// The template for this image and size, built if missing (and the
    /// time that took).
    async fn template<D: Driver>(
        &self,
        shared: &Shared<D>,
        image: &NodeImage,
        warmup: &[String],
        vcpus: u32,
        memory_mib: u64,
    ) -> Result<(Arc<Template>, Option<Duration>), String> {
        let key = template_key(image, vcpus, memory_mib);
        let mut templates = self.templates.lock().await;
        if let Some(t) = templates.get(&key) {
            return Ok((t.clone(), None));
        }
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
        let spec = TemplateSpec {
            kernel,
            initrd,
            cmdline: image
                .cmdline
                .clone()
                .unwrap_or_else(|| "console=ttyS0 quiet".into()),
            disk,
            warmup: (!warmup.is_empty()).then(|| warmup.to_vec()),
            vcpus,
            memory_mib,
            accel: self.accel,
        };
        let memory = PathBuf::from("/dev/shm").join(format!("{}{key}", self.shm_prefix));
        let t = build(
            &self.qemu,
            spec,
            &self.dir.join(format!("template-{key}")),
            &memory,
        )
        .await
        .map_err(|e| format!("building the template of {}: {e}", image.name))?;
        tracing::info!(image = %image.name, ms = t.built_in.as_millis() as u64, "run template built");
        let built = t.built_in;
        let t = Arc::new(t);
        templates.insert(key, t.clone());
        Ok((t, Some(built)))
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
        let mut result = RunResult {
            outcome: "failed".into(),
            code: None,
            signal: None,
            message: None,
            from_template: true,
            from_pool: false,
            template_build_ms: None,
            vm_ready_ms: 0,
            first_output_ms: None,
            end_ms: 0,
        };
        let (template, built) = match self
            .template(
                shared,
                &spec.image,
                &spec.warmup,
                spec.vcpus,
                spec.memory_mib,
            )
            .await
        {
            Ok(t) => t,
            Err(e) => return end(stream, result, Ending::Failed(e), t0),
        };
        result.template_build_ms = built.map(|d| d.as_millis() as u64);
        let key = template_key(&spec.image, spec.vcpus, spec.memory_mib);
        let clone = match self.take_clone(&key, &template).await {
            Ok((c, pooled)) => {
                result.from_pool = pooled;
                c
            }
            Err(e) => return end(stream, result, Ending::Failed(e), t0),
        };
        result.vm_ready_ms = t0.elapsed().as_millis() as u64;
        let req = ExecRequest {
            argv: spec.argv.clone(),
            env: spec.env.clone(),
            cwd: Some("/run/code".into()),
            stdin: spec.stdin.is_some(),
            // The clone woke with the template's clock.
            set_clock: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .ok()
                .map(|d| (d.as_secs() as i64, d.subsec_nanos())),
        };
        let ending = match clone.agent.exec(req).await {
            Err(e) => Ending::Failed(format!("the guest agent refused the run: {e}")),
            Ok(mut s) => {
                if let Some(data) = spec.stdin.as_deref().and_then(|d| B64.decode(d).ok()) {
                    let _ = s.write_stdin(&data).await;
                    let _ = s.close_stdin().await;
                }
                let deadline = tokio::time::sleep(Duration::from_secs(spec.timeout_secs));
                tokio::pin!(deadline);
                let mut sent = 0u64;
                loop {
                    tokio::select! {
                        ev = s.events.recv() => match ev {
                            Some(ExecEvent::Stdout(b) | ExecEvent::Stderr(b))
                                if sent + b.len() as u64 > spec.output_limit =>
                            {
                                let _ = s.kill().await;
                                break Ending::OutputLimit;
                            }
                            Some(ExecEvent::Stdout(b)) => {
                                sent += b.len() as u64;
                                result.first_output_ms.get_or_insert(t0.elapsed().as_millis() as u64);
                                let _ = out.send(FromNode::Stdout { stream, data: B64.encode(b) }).await;
                            }
                            Some(ExecEvent::Stderr(b)) => {
                                sent += b.len() as u64;
                                result.first_output_ms.get_or_insert(t0.elapsed().as_millis() as u64);
                                let _ = out.send(FromNode::Stderr { stream, data: B64.encode(b) }).await;
                            }
                            Some(ExecEvent::Exit { code, signal }) => break Ending::Exited(code, signal),
                            Some(ExecEvent::Error(m)) => break Ending::Failed(m),
                            None => break Ending::Failed("the guest agent went away".into()),
                        },
                        i = input.recv() => if matches!(i, Some(Input::Close) | None) {
                            let _ = s.kill().await;
                            break Ending::Cancelled;
                        },
                        _ = &mut deadline => {
                            let _ = s.kill().await;
                            break Ending::Timeout;
                        }
                    }
                }
            }
        };
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
