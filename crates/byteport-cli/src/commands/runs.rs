//! `byteport run`: a program run in a fresh VM of its own, its output
//! streamed as it comes and its exit code passed through; `run list`,
//! `run show`, `run cancel`.

use super::{Env, Exit, print_json};
use crate::client::{Method, decode, seg};
use crate::table::{Table, print_fields};
use crate::{RunArgs, RunCmd};
use anyhow::{Context, Result, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use byteport_types::api::{OutputStream, Page, Run, RunLine, RunState};
use byteport_types::runtime;
use serde_json::json;
use std::io::{BufRead, Read, Write};
use std::path::Path;

/// The language of a source file, from its extension.
pub(crate) fn language_of(path: &Path) -> Option<&'static str> {
    runtime::by_extension(path.extension()?.to_str()?).map(|r| r.language)
}

/// What a directory sends: its files, hidden ones and build output left
/// out, with paths relative to it.
fn files_of(dir: &Path) -> Result<Vec<(String, String)>> {
    let mut files = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&d)
            .with_context(|| format!("cannot read {}", d.display()))?
            .collect::<std::io::Result<_>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') || name == "target" || name == "node_modules" {
                continue;
            }
            let path = e.path();
            if e.file_type()?.is_dir() {
                todo.push(path);
                continue;
            }
            let rel = path
                .strip_prefix(dir)
                .ok()
                .and_then(|p| p.to_str())
                .with_context(|| format!("{} has a name that is not UTF-8", path.display()))?
                .to_owned();
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read {} as text", path.display()))?;
            files.push((rel, text));
        }
    }
    Ok(files)
}

/// Cloudlet's `config.toml`, as its CLI reads it.
#[derive(serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
struct CloudletConfig {
    workload_name: String,
    language: String,
    action: String,
    /// Cloudlet's own API; BytePort's CLI talks to the server it is logged
    /// in to instead.
    #[allow(dead_code)]
    server: Option<toml::Value>,
    build: CloudletBuild,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
struct CloudletBuild {
    source_code_path: std::path::PathBuf,
    #[serde(default)]
    release: bool,
}

/// A run from a Cloudlet config: its language, its source, `release`.
fn from_cloudlet(path: &Path) -> Result<(String, std::path::PathBuf, bool, String)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let c: CloudletConfig = toml::from_str(&text)
        .with_context(|| format!("{} is not a Cloudlet config", path.display()))?;
    if !matches!(c.action.as_str(), "prepare-and-run" | "run") {
        bail!(
            "action {:?}: a run is always built and run at once; use \"prepare-and-run\"",
            c.action
        );
    }
    // As given (Cloudlet reads it from where its CLI runs), else beside
    // the config.
    let mut src = c.build.source_code_path;
    if src.is_relative() && !src.exists() {
        src = path.parent().unwrap_or(Path::new(".")).join(src);
    }
    Ok((c.language, src, c.build.release, c.workload_name))
}

pub(super) fn run(env: &Env, args: RunArgs) -> Result<()> {
    match args.cmd {
        Some(RunCmd::List { language, state }) => list(env, args.project, language, state),
        Some(RunCmd::Show { id }) => {
            let v = env.client.get(&format!("/v1/runs/{}", seg(&id)), &[])?;
            if env.json() {
                return print_json(&v);
            }
            show(&decode(&v)?);
            Ok(())
        }
        Some(RunCmd::Cancel { id }) => {
            let v =
                env.client
                    .value(Method::Delete, &format!("/v1/runs/{}", seg(&id)), &[], None)?;
            if env.json() {
                return print_json(&v);
            }
            println!("cancelling run {id}");
            Ok(())
        }
        None => start(env, args),
    }
}

fn start(env: &Env, mut a: RunArgs) -> Result<()> {
    if let Some(config) = &a.config {
        let (language, src, release, workload) = from_cloudlet(config)?;
        eprintln!(
            "byteport: running {workload} ({language}) from {}",
            src.display()
        );
        a.language = Some(language);
        a.file = Some(src);
        a.release |= release;
    }
    let mut body = match (&a.eval, &a.file) {
        (Some(code), None) => json!({"code": code}),
        (None, Some(f)) if f.is_dir() => {
            let files = files_of(f)?;
            let language = match (&a.language, a.entry.as_deref().map(Path::new)) {
                (Some(l), _) => l.clone(),
                (None, Some(e)) => language_of(e)
                    .context("cannot tell the language: give --language")?
                    .to_owned(),
                (None, None) => bail!("with a directory, give --language or --entry"),
            };
            let entry = match &a.entry {
                Some(e) => e.clone(),
                None => {
                    let main = runtime::runtime(&language)
                        .with_context(|| {
                            format!(
                                "language {language:?} is not one of {}",
                                runtime::languages()
                            )
                        })?
                        .main_file;
                    let nested = format!("src/{main}");
                    if files.iter().any(|(p, _)| *p == nested) {
                        nested
                    } else {
                        main.to_owned()
                    }
                }
            };
            a.language = Some(language);
            let files: Vec<_> = files
                .into_iter()
                .map(|(path, content)| json!({"path": path, "content": content}))
                .collect();
            json!({"files": files, "entry": entry})
        }
        (None, Some(f)) => json!({
            "code": std::fs::read_to_string(f)
                .with_context(|| format!("cannot read {}", f.display()))?
        }),
        (Some(_), Some(_)) => bail!("give a FILE or -e CODE, not both"),
        (None, None) => bail!("give a FILE to run, -e CODE with --language, or --config"),
    };
    let language = match (&a.language, a.file.as_deref().and_then(language_of)) {
        (Some(l), _) => l.clone(),
        (None, Some(l)) => l.to_owned(),
        (None, None) => bail!(
            "cannot tell the language: give --language {}",
            runtime::languages().replace(", ", "|")
        ),
    };
    body["language"] = json!(language);
    body["args"] = json!(a.args);
    if a.release {
        body["release"] = json!(true);
    }
    if let Some(p) = &a.project {
        body["project"] = json!(p);
    }
    if let Some(t) = a.timeout {
        body["timeout_secs"] = json!(t);
    }
    if let Some(m) = a.memory_mib {
        body["memory_mib"] = json!(m);
    }
    if a.stdin {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("cannot read standard input (it must be text)")?;
        body["stdin"] = json!(s);
    }
    let lines = env
        .client
        .post_stream("/v1/runs", &[], &body, "application/x-ndjson")?;
    let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
    let mut end: Option<Run> = None;
    for line in lines.lines() {
        let line = line.context("the run's stream broke")?;
        if line.trim().is_empty() {
            continue;
        }
        let l: RunLine = serde_json::from_str(&line).context("the server sent a bad line")?;
        match l {
            RunLine::Run(r) => {
                if env.json() {
                    println!("{}", serde_json::to_string(&r)?);
                }
            }
            RunLine::Output { stream, data, .. } if !env.json() => {
                let b = B64.decode(data).unwrap_or_default();
                match stream {
                    OutputStream::Stdout => {
                        out.write_all(&b)?;
                        out.flush()?;
                    }
                    OutputStream::Stderr => {
                        err.write_all(&b)?;
                        err.flush()?;
                    }
                }
            }
            RunLine::Output { .. } => println!("{line}"),
            RunLine::End(r) => {
                if env.json() {
                    println!("{}", serde_json::to_string(&r)?);
                }
                end = Some(*r);
            }
        }
    }
    let r = end.context("the run's stream ended without its end")?;
    match r.state {
        RunState::Exited => match (r.exit_code, r.signal) {
            (Some(0), _) => Ok(()),
            (Some(c), _) => Err(Exit(u8::try_from(c & 0xff).unwrap_or(1)).into()),
            (None, Some(s)) => {
                eprintln!("byteport: the program was killed by signal {s}");
                Err(Exit(u8::try_from(128 + (s & 0x7f)).unwrap_or(1)).into())
            }
            (None, None) => Err(Exit(1).into()),
        },
        state => {
            eprintln!(
                "byteport: run {} ended {}: {}",
                r.id,
                state.as_str(),
                r.message.as_deref().unwrap_or("no reason given")
            );
            Err(Exit(if state == RunState::Timeout { 124 } else { 125 }).into())
        }
    }
}

fn list(
    env: &Env,
    project: Option<String>,
    language: Option<String>,
    state: Option<String>,
) -> Result<()> {
    let mut q: Vec<(&str, String)> = Vec::new();
    for (k, v) in [
        ("project", project),
        ("language", language),
        ("state", state),
    ] {
        if let Some(v) = v {
            q.push((k, v));
        }
    }
    let v = env.client.get("/v1/runs", &q)?;
    if env.json() {
        return print_json(&v);
    }
    let page: Page<Run> = decode(&v)?;
    let mut t = Table::new(&[
        "ID",
        "PROJECT",
        "LANGUAGE",
        "STATE",
        "EXIT",
        "FIRST OUTPUT",
        "WHEN",
    ]);
    for r in &page.items {
        t.row(vec![
            r.id.to_string(),
            r.project.to_string(),
            r.language.clone(),
            r.state.as_str().into(),
            r.exit_code.map_or("-".into(), |c| c.to_string()),
            r.timings
                .first_output_ms
                .map_or("-".into(), |ms| format!("{ms} ms")),
            r.created_at.format("%Y-%m-%d %H:%M:%S").to_string(),
        ]);
    }
    t.print();
    Ok(())
}

fn show(r: &Run) {
    let ms = |v: Option<u64>| v.map_or("-".into(), |m| format!("{m} ms"));
    print_fields(&[
        ("id", r.id.to_string()),
        ("project", r.project.to_string()),
        ("user", r.user.clone()),
        ("language", r.language.clone()),
        ("code sha256", r.code_sha256.clone()),
        ("state", r.state.as_str().into()),
        (
            "exit code",
            r.exit_code.map_or("-".into(), |c| c.to_string()),
        ),
        ("message", r.message.clone().unwrap_or_else(|| "-".into())),
        (
            "size",
            format!(
                "{} vCPU, {} MiB, {} s",
                r.vcpus, r.memory_mib, r.timeout_secs
            ),
        ),
        ("vm ready", ms(r.timings.vm_ready_ms)),
        ("build", ms(r.timings.build_ms)),
        ("first output", ms(r.timings.first_output_ms)),
        ("end", ms(r.timings.end_ms)),
        ("template build", ms(r.timings.template_build_ms)),
        ("stdout", r.stdout.clone()),
        ("stderr", r.stderr.clone()),
    ]);
}
