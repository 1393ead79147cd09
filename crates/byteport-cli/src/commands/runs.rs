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
use serde_json::json;
use std::io::{BufRead, Read, Write};
use std::path::Path;

/// The language of a source file, from its extension.
pub(crate) fn language_of(path: &Path) -> Option<&'static str> {
    match path.extension()?.to_str()? {
        "py" => Some("python"),
        "sh" | "bash" => Some("shell"),
        "js" | "mjs" => Some("node"),
        _ => None,
    }
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

fn start(env: &Env, a: RunArgs) -> Result<()> {
    let (code, from_file) = match (&a.eval, &a.file) {
        (Some(code), None) => (code.clone(), None),
        (None, Some(f)) => (
            std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?,
            Some(f.as_path()),
        ),
        (Some(_), Some(_)) => bail!("give a FILE or -e CODE, not both"),
        (None, None) => bail!("give a FILE to run, or -e CODE with --language"),
    };
    let language = match (&a.language, from_file.and_then(language_of)) {
        (Some(l), _) => l.clone(),
        (None, Some(l)) => l.to_owned(),
        (None, None) => bail!("cannot tell the language: give --language shell|python|node"),
    };
    let mut body = json!({"language": language, "code": code, "args": a.args});
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
        .post_stream("/v1/runs", &body, "application/x-ndjson")?;
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
        ("first output", ms(r.timings.first_output_ms)),
        ("end", ms(r.timings.end_ms)),
        ("template build", ms(r.timings.template_build_ms)),
        ("stdout", r.stdout.clone()),
        ("stderr", r.stderr.clone()),
    ]);
}
