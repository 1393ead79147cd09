//! Run-code: `POST /v1/runs` takes a program in one of the runtimes'
//! languages and runs it in a fresh VM of its own on a node connected to
//! this replica (a clone of the runtime image's template, see the node's
//! `runs` module), streaming its output back as it comes; the run is a
//! record (who, what, how it ended, its output up to a cap) visible to the
//! project's members only, counted against `max_concurrent_runs` while it
//! runs, and cancelled by `DELETE /v1/runs/{id}`.
//!
//! The language picks the runtime image `run-LANGUAGE` (built by `cargo
//! xtask image build run-LANGUAGE`) and the command that runs one source
//! text; the code goes to the interpreter as one argument, never through
//! a shell of ours.

use super::nodes::node_image;
use super::projects::DEFAULT_PROJECT;
use super::{App, Ctx};
use crate::error::{AppError, AppResult};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use byteport_store::{RunFilter, run};
use byteport_types::api::{
    OutputStream, Page, Role, Run, RunCreate, RunLine, RunListQuery, RunState, RunTimings,
};
use byteport_types::node_proto::{FromNode, RunResult, RunSpec, ToNode};
use byteport_types::runtime::{self, Runtime};
use byteport_types::{Name, NodeId, ProjectId, RunId};
use chrono::Utc;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

pub(crate) const MAX_CODE: usize = 64 * 1024;
pub(crate) const MAX_FILES: usize = 64;
const MAX_FILES_BYTES: usize = 256 * 1024;
const MAX_PATH: usize = 255;
const MAX_STDIN: usize = 512 * 1024;
pub(crate) const MAX_ARGS: usize = 256;
const MAX_ENV: usize = 256;
pub(crate) const MAX_TIMEOUT_SECS: u64 = 600;
/// A run's size.
pub(crate) const MAX_RUN_VCPUS: u32 = 4;
pub(crate) const MIN_RUN_MEMORY_MIB: u64 = 128;
pub(crate) const MAX_RUN_MEMORY_MIB: u64 = 4096;
/// Code up to this size goes to the interpreter as an argument (`-c`);
/// longer code is written to the runtime's main file first, since one
/// message to the guest agent is at most 64 KiB.
const INLINE_CODE: usize = 32 * 1024;
/// Output the node lets a run write (stdout and stderr together).
const OUTPUT_LIMIT: u64 = 16 * 1024 * 1024;
/// Output a run's record keeps, per stream.
pub const KEPT_OUTPUT: usize = 1024 * 1024;

/// Cancel switches of the runs this replica serves.
#[derive(Default)]
pub(crate) struct Live(Mutex<HashMap<Uuid, oneshot::Sender<()>>>);

fn bad(code: &'static str, msg: impl Into<String>) -> AppError {
    AppError::bad(code, msg)
}

/// A path under the run's directory: relative, plain components only.
fn check_path(p: &str) -> AppResult<()> {
    let ok = !p.is_empty()
        && p.len() <= MAX_PATH
        && !p.starts_with('/')
        && !p.contains('\0')
        && p.split('/').all(|c| !c.is_empty() && c != "." && c != "..");
    if ok {
        Ok(())
    } else {
        Err(bad(
            "invalid_path",
            format!(
                "file path {p:?} must be relative to the run's directory, without `.` or `..` \
                 components, at most {MAX_PATH} bytes"
            ),
        ))
    }
}

fn check(req: &RunCreate) -> AppResult<&'static Runtime> {
    let rt = runtime::runtime(&req.language).ok_or_else(|| {
        bad(
            "unknown_language",
            format!(
                "language {:?} is not one of {}",
                req.language,
                runtime::languages()
            ),
        )
    })?;
    match (&req.code, req.files.is_empty()) {
        (Some(_), false) => {
            return Err(bad(
                "invalid_code",
                "give the program as `code` or as `files`, not both",
            ));
        }
        (None, true) => {
            return Err(bad(
                "invalid_code",
                "the program is missing: give `code` or `files`",
            ));
        }
        (Some(code), true) => {
            if code.is_empty() || code.len() > MAX_CODE {
                return Err(bad(
                    "invalid_code",
                    format!("code is {} bytes; it must be 1 to {MAX_CODE}", code.len()),
                ));
            }
            if code.contains('\0') {
                return Err(bad(
                    "invalid_code",
                    "code holds a NUL byte: it is not a source text",
                ));
            }
            if req.entry.is_some() {
                return Err(bad("invalid_entry", "`entry` names one of `files`"));
            }
        }
        (None, false) => {
            let total: usize = req.files.iter().map(|f| f.content.len()).sum();
            if req.files.len() > MAX_FILES || total > MAX_FILES_BYTES {
                return Err(bad(
                    "invalid_files",
                    format!(
                        "{} files of {total} bytes; at most {MAX_FILES} files of \
                         {MAX_FILES_BYTES} bytes together",
                        req.files.len()
                    ),
                ));
            }
            let mut seen = std::collections::HashSet::new();
            for f in &req.files {
                check_path(&f.path)?;
                if f.content.contains('\0') {
                    return Err(bad(
                        "invalid_files",
                        format!("{} holds a NUL byte: it is not a source text", f.path),
                    ));
                }
                if !seen.insert(f.path.as_str()) {
                    return Err(bad("invalid_files", format!("{} comes twice", f.path)));
                }
            }
            let entry = req.entry.as_deref().unwrap_or(rt.main_file);
            if !seen.contains(entry) {
                return Err(bad(
                    "invalid_entry",
                    format!("the entry point {entry} is not one of the files"),
                ));
            }
        }
    }
    if req.args.len() > MAX_ARGS || req.args.iter().any(|a| a.contains('\0')) {
        return Err(bad(
            "invalid_args",
            format!("at most {MAX_ARGS} arguments, without NUL bytes"),
        ));
    }
    if req.env.len() > MAX_ENV
        || req.env.keys().any(|k| {
            k.is_empty()
                || !k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                || k.as_bytes()[0].is_ascii_digit()
        })
        || req.env.values().any(|v| v.contains('\0'))
    {
        return Err(bad(
            "invalid_env",
            format!(
                "at most {MAX_ENV} variables; names of letters, digits and _, values without NUL"
            ),
        ));
    }
    if req.stdin.as_ref().is_some_and(|s| s.len() > MAX_STDIN) {
        return Err(bad(
            "invalid_stdin",
            format!("stdin is at most {MAX_STDIN} bytes"),
        ));
    }
    let t = req.timeout_secs.unwrap_or(rt.timeout_secs);
    if !(1..=MAX_TIMEOUT_SECS).contains(&t) {
        return Err(bad(
            "invalid_timeout",
            format!("timeout_secs is {t}; it must be between 1 and {MAX_TIMEOUT_SECS}"),
        ));
    }
    let c = req.vcpus.unwrap_or(1);
    if !(1..=MAX_RUN_VCPUS).contains(&c) {
        return Err(bad(
            "invalid_size",
            format!("vcpus is {c}; it must be 1 to {MAX_RUN_VCPUS}"),
        ));
    }
    let m = req.memory_mib.unwrap_or(rt.memory_mib);
    if !(MIN_RUN_MEMORY_MIB..=MAX_RUN_MEMORY_MIB).contains(&m) {
        return Err(bad(
            "invalid_size",
            format!("memory_mib is {m}; it must be {MIN_RUN_MEMORY_MIB} to {MAX_RUN_MEMORY_MIB}"),
        ));
    }
    Ok(rt)
}

/// What the guest does for a run: the files to write, the build, the
/// command. The code never goes through a shell of ours: it is one
/// argument of the interpreter, or a file.
struct Plan {
    files: Vec<(String, String)>,
    build: Option<Vec<String>>,
    argv: Vec<String>,
    /// The sources, hashed for the record.
    sha256: String,
}

fn plan(rt: &Runtime, req: &RunCreate) -> Plan {
    let opt = if req.release { rt.opt.1 } else { rt.opt.0 };
    let mut hash = Sha256::new();
    let (files, entry, argv) = match (&req.code, rt.code) {
        (Some(code), Some(cmd)) if code.len() <= INLINE_CODE => {
            hash.update(code.as_bytes());
            (Vec::new(), None, runtime::fill(cmd, code, "", opt))
        }
        (Some(code), _) => {
            hash.update(code.as_bytes());
            (
                vec![(rt.main_file.to_owned(), code.clone())],
                Some(rt.main_file.to_owned()),
                Vec::new(),
            )
        }
        (None, _) => {
            // Path, then content, each with its length: no two sets of
            // files hash alike.
            for f in &req.files {
                for part in [&f.path, &f.content] {
                    hash.update((part.len() as u64).to_le_bytes());
                    hash.update(part.as_bytes());
                }
            }
            (
                req.files
                    .iter()
                    .map(|f| (f.path.clone(), f.content.clone()))
                    .collect(),
                Some(req.entry.clone().unwrap_or_else(|| rt.main_file.to_owned())),
                Vec::new(),
            )
        }
    };
    let (build, mut argv) = match entry {
        Some(e) => (
            rt.build.map(|b| runtime::fill(b, "", &e, opt)),
            runtime::fill(rt.entry, "", &e, opt),
        ),
        None => (None, argv),
    };
    argv.extend(req.args.iter().cloned());
    Plan {
        files,
        build,
        argv,
        sha256: hex::encode(hash.finalize()),
    }
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// A run's record as the API shows it.
pub(crate) fn run_view(r: &run::Model, project: &str) -> AppResult<Run> {
    Ok(Run {
        id: RunId(r.id),
        project: Name::parse(project).map_err(AppError::internal)?,
        project_id: ProjectId(r.project_id),
        user: r.user_name.clone(),
        language: r.language.clone(),
        code_sha256: r.code_sha256.clone(),
        state: RunState::parse(&r.state).unwrap_or(RunState::Failed),
        exit_code: r.exit_code,
        signal: r.signal,
        message: r.message.clone(),
        vcpus: u32::try_from(r.vcpus).unwrap_or(0),
        memory_mib: to_u64(r.memory_mib),
        timeout_secs: to_u64(r.timeout_secs),
        node_id: r.node_id.map(NodeId),
        timings: serde_json::from_str(&r.timings).unwrap_or_default(),
        stdout: r.stdout.clone(),
        stderr: r.stderr.clone(),
        output_truncated: r.output_truncated,
        created_at: r.created_at,
        ended_at: r.ended_at,
    })
}

/// Output kept for the record, cut at [`KEPT_OUTPUT`].
#[derive(Default)]
struct Kept {
    bytes: Vec<u8>,
    total: u64,
}

impl Kept {
    fn push(&mut self, b: &[u8]) -> u64 {
        let offset = self.total;
        self.total += b.len() as u64;
        let room = KEPT_OUTPUT.saturating_sub(self.bytes.len());
        self.bytes.extend_from_slice(&b[..b.len().min(room)]);
        offset
    }

    fn cut(&self) -> bool {
        self.total > self.bytes.len() as u64
    }
}

impl App {
    /// Starts a run; the lines of its stream follow on the receiver,
    /// `RunLine::Run` first and `RunLine::End` last.
    pub async fn run_create(
        &self,
        ctx: &Ctx,
        req: RunCreate,
    ) -> AppResult<mpsc::Receiver<RunLine>> {
        let t0 = Instant::now();
        let rt = check(&req)?;
        ctx.user()?;
        let name = match &ctx.actor {
            super::Actor::User { name, .. } => name.clone(),
            _ => {
                return Err(AppError::Unauthorized(
                    "log in first: this needs a user".into(),
                ));
            }
        };
        let key = req.project.as_deref().unwrap_or(DEFAULT_PROJECT);
        let project = self.project_resolve(ctx, key, Role::Viewer).await?;
        self.require(ctx, ProjectId(project.id), Role::Member, "project", key)
            .await?;
        let image_name = rt.image;
        let image = self
            .store
            .image_fetch_by_name(image_name)
            .await?
            .filter(|i| i.status == "available")
            .ok_or_else(|| {
                AppError::Conflict(format!(
                    "the {image_name} runtime image is not imported: an admin builds it with \
                     `cargo xtask image build {image_name}` and imports it with \
                     `byteport image import --manifest build/images/{image_name}/manifest.json`"
                ))
            })?;
        let node = self.run_node().await?;
        let vcpus = req.vcpus.unwrap_or(1);
        let memory_mib = req.memory_mib.unwrap_or(rt.memory_mib);
        let plan = plan(rt, &req);
        let timeout_secs = req.timeout_secs.unwrap_or(rt.timeout_secs);
        let id = Uuid::now_v7();
        let record = run::Model {
            id,
            project_id: project.id,
            user_name: name,
            language: req.language.clone(),
            code_sha256: plan.sha256.clone(),
            state: RunState::Running.as_str().into(),
            exit_code: None,
            signal: None,
            message: None,
            vcpus: i64::from(vcpus),
            memory_mib: memory_mib as i64,
            timeout_secs: timeout_secs as i64,
            node_id: Some(node),
            timings: "{}".into(),
            stdout: String::new(),
            stderr: String::new(),
            output_truncated: false,
            created_at: Utc::now(),
            ended_at: None,
        };
        let record = self.store.run_insert(record).await?;
        ctx.target("run", id, Some(ProjectId(project.id)));
        let mut env: Vec<(String, String)> = Vec::new();
        if req.language == "python" && !req.env.contains_key("PYTHONUNBUFFERED") {
            // Output as it is printed, in order across stdout and stderr.
            env.push(("PYTHONUNBUFFERED".into(), "1".into()));
        }
        env.extend(req.env);
        let spec = RunSpec {
            image: node_image(image)?,
            files: plan.files,
            build: plan.build,
            argv: plan.argv,
            env,
            stdin: req.stdin.map(|s| B64.encode(s.as_bytes())),
            timeout_secs,
            vcpus,
            memory_mib,
            output_limit: OUTPUT_LIMIT,
            warmup: rt.warmup.iter().map(|w| (*w).to_owned()).collect(),
            prewarm: rt.prewarm.iter().map(|w| (*w).to_owned()).collect(),
        };
        let stream = match self
            .hub
            .open(node, |stream| ToNode::Run {
                stream,
                spec: Box::new(spec),
            })
            .await
        {
            Some(s) => s,
            None => {
                let mut r = record;
                r.state = RunState::Failed.as_str().into();
                r.message = Some("the node went away before the run started".into());
                r.ended_at = Some(Utc::now());
                self.store.run_finish(r).await?;
                return Err(AppError::Unavailable(
                    "the node went away before the run started".into(),
                ));
            }
        };
        let queued_ms = t0.elapsed().as_millis() as u64;
        let (cancel_tx, cancel_rx) = oneshot::channel();
        if let Ok(mut live) = self.runs_live.0.lock() {
            live.insert(id, cancel_tx);
        }
        let (tx, rx) = mpsc::channel(64);
        let _ = tx
            .send(RunLine::Run(Box::new(run_view(&record, &project.name)?)))
            .await;
        let app = self.clone();
        let project_name = project.name.clone();
        tokio::spawn(async move {
            app.run_relay(record, project_name, stream, queued_ms, cancel_rx, tx)
                .await;
        });
        Ok(rx)
    }

    /// A node to run on: connected here, online, with the most free memory.
    async fn run_node(&self) -> AppResult<Uuid> {
        let here = self.hub.connected();
        let nodes = self.store.node_inventory().await?;
        nodes
            .into_iter()
            .filter(|n| here.contains(&n.id) && n.status == "online")
            .max_by_key(|n| n.cap_memory_mib - n.reserved_memory_mib)
            .map(|n| n.id)
            .ok_or_else(|| {
                AppError::Unavailable("no online node is connected to this control plane".into())
            })
    }

    /// Passes the node's answers on and writes the record at the end.
    async fn run_relay(
        &self,
        mut record: run::Model,
        project: String,
        mut s: super::hub::Stream,
        queued_ms: u64,
        mut cancel: oneshot::Receiver<()>,
        tx: mpsc::Sender<RunLine>,
    ) {
        let (mut out, mut err) = (Kept::default(), Kept::default());
        let mut cancelled = false;
        // The run never waits on its client: one that falls behind is let go
        // (its response ends early) and the run's record keeps the output.
        let mut client = Some(tx);
        let result = loop {
            let msg = tokio::select! {
                m = s.rx.recv() => m,
                _ = &mut cancel, if !cancelled => {
                    cancelled = true;
                    s.send(ToNode::Close { stream: s.id }).await;
                    continue;
                }
            };
            match msg {
                Some(FromNode::Stdout { data, .. }) | Some(FromNode::Stderr { data, .. })
                    if B64.decode(&data).is_err() => {}
                Some(FromNode::Stdout { data, .. }) => {
                    let b = B64.decode(&data).unwrap_or_default();
                    let offset = out.push(&b);
                    pass(
                        &mut client,
                        RunLine::Output {
                            stream: OutputStream::Stdout,
                            offset,
                            data,
                        },
                    );
                }
                Some(FromNode::Stderr { data, .. }) => {
                    let b = B64.decode(&data).unwrap_or_default();
                    let offset = err.push(&b);
                    pass(
                        &mut client,
                        RunLine::Output {
                            stream: OutputStream::Stderr,
                            offset,
                            data,
                        },
                    );
                }
                Some(FromNode::RunEnd { result, .. }) => break Some(result),
                Some(FromNode::Error { message, .. }) => {
                    break Some(RunResult {
                        outcome: "failed".into(),
                        code: None,
                        signal: None,
                        message: Some(message),
                        from_template: false,
                        from_pool: false,
                        template_build_ms: None,
                        vm_ready_ms: 0,
                        build_ms: None,
                        first_output_ms: None,
                        end_ms: 0,
                    });
                }
                Some(_) => {}
                None => break None,
            }
        };
        if let Ok(mut live) = self.runs_live.0.lock() {
            live.remove(&record.id);
        }
        let at = |ms: u64| queued_ms + ms;
        match result {
            Some(r) => {
                record.state = RunState::parse(&r.outcome)
                    .filter(|s| *s != RunState::Running)
                    .unwrap_or(RunState::Failed)
                    .as_str()
                    .into();
                record.exit_code = r.code;
                record.signal = r.signal;
                record.message =
                    r.message
                        .filter(|m| !m.is_empty())
                        .or_else(|| match r.outcome.as_str() {
                            "timeout" => Some(format!(
                                "the program ran longer than its {} s and was killed",
                                record.timeout_secs
                            )),
                            "output_limit" => Some(format!(
                                "the program wrote more than {OUTPUT_LIMIT} bytes and was killed"
                            )),
                            "cancelled" => Some("the run was cancelled".into()),
                            _ => None,
                        });
                let timings = RunTimings {
                    queued_ms,
                    template_build_ms: r.template_build_ms,
                    vm_ready_ms: Some(at(r.vm_ready_ms)),
                    build_ms: r.build_ms,
                    first_output_ms: r.first_output_ms.map(at),
                    end_ms: Some(at(r.end_ms)),
                    from_template: Some(r.from_template),
                    from_pool: Some(r.from_pool),
                };
                record.timings = serde_json::to_string(&timings).unwrap_or_else(|_| "{}".into());
            }
            None => {
                record.state = RunState::Failed.as_str().into();
                record.message = Some("the node's channel closed during the run".into());
            }
        }
        record.stdout = String::from_utf8_lossy(&out.bytes).into_owned();
        record.stderr = String::from_utf8_lossy(&err.bytes).into_owned();
        record.output_truncated = out.cut() || err.cut();
        record.ended_at = Some(Utc::now());
        let record = match self.store.run_finish(record.clone()).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(run = %record.id, error = %e, "cannot write a run's end");
                record
            }
        };
        if let (Ok(v), Some(tx)) = (run_view(&record, &project), client) {
            let end = tx.send(RunLine::End(Box::new(v)));
            let _ = tokio::time::timeout(std::time::Duration::from_secs(30), end).await;
        }
    }

    pub async fn run_show(&self, ctx: &Ctx, id: &str) -> AppResult<Run> {
        let (r, project) = self.run_resolve(ctx, id, Role::Viewer).await?;
        run_view(&r, &project)
    }

    async fn run_resolve(
        &self,
        ctx: &Ctx,
        id: &str,
        need: Role,
    ) -> AppResult<(run::Model, String)> {
        let nf = || AppError::not_found("run", id);
        let rid: RunId = id.parse().map_err(|_| nf())?;
        let r = self.store.run_fetch(rid.0).await.map_err(|_| nf())?;
        self.require(ctx, ProjectId(r.project_id), need, "run", id)
            .await?;
        ctx.target("run", r.id, Some(ProjectId(r.project_id)));
        let p = self.store.project_fetch(r.project_id).await?;
        Ok((r, p.name))
    }

    pub async fn run_list(&self, ctx: &Ctx, q: RunListQuery) -> AppResult<Page<Run>> {
        let limit = q.limit.unwrap_or(50);
        if !(1..=500).contains(&limit) {
            return Err(bad(
                "invalid_limit",
                format!("limit is {limit}; it must be 1 to 500"),
            ));
        }
        let (visible, names) = self.visible_projects(ctx).await?;
        let projects = match &q.project {
            Some(key) => Some(vec![self.project_resolve(ctx, key, Role::Viewer).await?.id]),
            None => visible,
        };
        let before = match &q.cursor {
            Some(c) => Some(
                c.parse::<Uuid>()
                    .map_err(|_| bad("invalid_cursor", "the cursor is not one this server gave"))?,
            ),
            None => None,
        };
        if let Some(s) = &q.state
            && RunState::parse(s).is_none()
        {
            return Err(bad("invalid_state", format!("{s:?} is not a run state")));
        }
        let rows = self
            .store
            .run_list(&RunFilter {
                projects,
                state: q.state.clone(),
                language: q.language.clone(),
                before,
                limit: limit + 1,
            })
            .await?;
        let more = rows.len() as u64 > limit;
        let rows: Vec<run::Model> = rows.into_iter().take(limit as usize).collect();
        let next_cursor = more
            .then(|| rows.last().map(|r| r.id.to_string()))
            .flatten();
        let mut items = Vec::new();
        for r in &rows {
            let name = match names.get(&r.project_id) {
                Some(n) => n.clone(),
                None => self.store.project_fetch(r.project_id).await?.name,
            };
            items.push(run_view(r, &name)?);
        }
        Ok(Page { items, next_cursor })
    }

    /// Cancels a running run (a member's); an ended one is a conflict.
    pub async fn run_cancel(&self, ctx: &Ctx, id: &str) -> AppResult<Run> {
        let (r, project) = self.run_resolve(ctx, id, Role::Member).await?;
        if r.state != RunState::Running.as_str() {
            return Err(AppError::Conflict(format!(
                "the run has ended ({})",
                r.state
            )));
        }
        let sw = self
            .runs_live
            .0
            .lock()
            .ok()
            .and_then(|mut l| l.remove(&r.id));
        match sw {
            Some(s) => {
                let _ = s.send(());
                run_view(&r, &project)
            }
            None => Err(AppError::Unavailable(
                "the run is served by another control-plane replica".into(),
            )),
        }
    }
}

/// Hands one line to the run's client unless it has fallen behind, in
/// which case it is let go.
fn pass(client: &mut Option<mpsc::Sender<RunLine>>, line: RunLine) {
    if let Some(tx) = client
        && tx.try_send(line).is_err()
    {
        *client = None;
    }
}
