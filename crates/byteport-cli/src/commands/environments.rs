//! `byteport env`: groups of VMs, and one command run on all of them.

use super::{Env, Exit, print_json, read_ssh_keys};
use crate::client::{Method, decode, seg};
use crate::table::{Table, print_fields};
use crate::{EnvArgs, EnvCmd};
use anyhow::{Context, Result, bail};
use byteport_types::VmId;
use byteport_types::api::{
    Environment, EnvironmentAction, EnvironmentExecEvent, EnvironmentFileResult,
    EnvironmentRunResult, EnvironmentState, EnvironmentUpdated,
};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::time::{Duration, Instant};

pub(super) fn run(env: &Env, args: EnvArgs) -> Result<()> {
    let c = &env.client;
    let query: Vec<(&str, String)> = args
        .project
        .iter()
        .map(|p| ("project", p.clone()))
        .collect();
    let path = |name: &str| format!("/v1/environments/{}", seg(name));
    match args.cmd {
        EnvCmd::Add {
            name,
            os_prefix,
            arch,
            dup_each,
            engine,
            flavor,
            vcpus,
            memory_mib,
            disk_gib,
            user_data,
            ssh_key,
            lifetime,
            ports,
            no_egress,
            wait,
            timeout,
        } => {
            let mut body = json!({"name": name, "os_prefixes": os_prefix, "archs": arch});
            if !ports.is_empty() {
                body["ports"] = json!(ports);
            }
            if no_egress {
                body["egress"] = json!("deny");
            }
            let fields = [
                ("dup_each", dup_each.map(Value::from)),
                ("engine", engine.map(Value::from)),
                ("project", args.project.clone().map(Value::from)),
                ("flavor", flavor.map(Value::from)),
                ("vcpus", vcpus.map(Value::from)),
                ("memory_mib", memory_mib.map(Value::from)),
                ("disk_gib", disk_gib.map(Value::from)),
                ("lifetime_secs", lifetime.map(Value::from)),
            ];
            for (k, v) in fields {
                if let Some(v) = v {
                    body[k] = v;
                }
            }
            if let Some(f) = user_data {
                let ud = std::fs::read_to_string(&f)
                    .with_context(|| format!("cannot read the user-data file {}", f.display()))?;
                body["user_data"] = json!(ud);
            }
            let keys = read_ssh_keys(&ssh_key)?;
            if !keys.is_empty() {
                body["ssh_keys"] = json!(keys);
            }
            let v = c.value(Method::Post, "/v1/environments", &[], Some(&body))?;
            let e: Environment = decode(&v)?;
            let v = if wait {
                if !env.json() {
                    println!(
                        "created {} with {} VMs; waiting for them to run",
                        e.name,
                        e.vms.len()
                    );
                }
                wait_until(env, &e.id.to_string(), timeout, |s| {
                    s == EnvironmentState::Ready
                })?
            } else {
                v
            };
            print_env(env, &v)
        }
        EnvCmd::Update {
            env: name,
            lifetime,
            no_expiry,
            remove_vm,
            remove_os_prefix,
            remove_unresponsive,
            ports,
            no_ports,
            egress,
        } => {
            let mut body = json!({});
            if let Some(l) = lifetime {
                body["lifetime_secs"] = json!(l);
            }
            for (k, on) in [
                ("no_expiry", no_expiry),
                ("remove_unresponsive", remove_unresponsive),
            ] {
                if on {
                    body[k] = json!(true);
                }
            }
            if !remove_vm.is_empty() {
                body["remove_vms"] = json!(remove_vm);
            }
            if !remove_os_prefix.is_empty() {
                body["remove_os_prefixes"] = json!(remove_os_prefix);
            }
            if !ports.is_empty() || no_ports {
                body["ports"] = json!(ports);
            }
            if let Some(g) = egress {
                body["egress"] = json!(g);
            }
            let v = c.value(Method::Patch, &path(&name), &query, Some(&body))?;
            if env.json() {
                return print_json(&v);
            }
            let u: EnvironmentUpdated = decode(&v)?;
            for r in &u.removed {
                println!("removing {}", r.vm_name);
            }
            if !u.apply_at_next_start.is_empty() {
                let names: Vec<&str> = u
                    .apply_at_next_start
                    .iter()
                    .map(|r| r.vm_name.as_str())
                    .collect();
                println!(
                    "new ports and outbound policy apply when these next start: {} (byteport env stop {name}, then env start {name})",
                    names.join(", ")
                );
            }
            print_env(env, &serde_json::to_value(&u.environment)?)
        }
        EnvCmd::List => {
            let v = c.get("/v1/environments", &[])?;
            if env.json() {
                return print_json(&v);
            }
            let es: Vec<Environment> = decode(&v)?;
            let mut t = Table::new(&["NAME", "PROJECT", "STATE", "VMS", "EXPIRES", "ID"]);
            for e in &es {
                t.row(vec![
                    e.name.to_string(),
                    e.project.to_string(),
                    state_str(e.state).into(),
                    e.vms.len().to_string(),
                    e.expires_at
                        .map_or_else(|| "-".into(), |t| t.format("%Y-%m-%d %H:%M:%S").to_string()),
                    e.id.to_string(),
                ]);
            }
            t.print();
            Ok(())
        }
        EnvCmd::Show { env: name } => {
            let v = c.get(&path(&name), &query)?;
            print_env(env, &v)
        }
        EnvCmd::Run {
            env: name,
            timeout,
            os_prefix,
            vm,
            script,
            argv,
        } => {
            let mut body = json!({"argv": argv});
            if let Some(file) = script {
                use base64::Engine;
                let text = std::fs::read(&file)
                    .with_context(|| format!("cannot read {}", file.display()))?;
                let mut argv = vec!["/bin/sh".to_owned(), "-s".to_owned()];
                if !body["argv"].as_array().is_none_or(|a| a.is_empty()) {
                    argv.push("--".to_owned());
                }
                argv.extend(
                    body["argv"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|a| a.as_str().map(str::to_owned)),
                );
                body = json!({
                    "argv": argv,
                    "stdin_base64": base64::engine::general_purpose::STANDARD.encode(text),
                });
            }
            if let Some(t) = timeout {
                body["timeout_secs"] = json!(t);
            }
            let mut query = query.clone();
            query.extend(os_prefix.map(|p| ("os_prefix", p)));
            query.extend(vm.map(|v| ("vm", v)));
            let failed = if env.json() {
                let v = c.value(
                    Method::Post,
                    &format!("{}/run", path(&name)),
                    &query,
                    Some(&body),
                )?;
                let r: EnvironmentRunResult = decode(&v)?;
                print_json(&v)?;
                r.results
                    .iter()
                    .filter(|x| x.error.is_some() || x.exit_code != Some(0))
                    .count()
            } else {
                let lines = c.post_stream(
                    &format!("{}/exec", path(&name)),
                    &query,
                    &body,
                    "application/x-ndjson",
                )?;
                print_fan_out(lines)?
            };
            if failed > 0 {
                return Err(Exit(1).into());
            }
            Ok(())
        }
        EnvCmd::Push {
            env: name,
            file,
            dest,
            os_prefix,
            vm,
        } => {
            let dest = super::files::guest_dest(dest.as_deref().unwrap_or("/tmp/"), &file)?;
            let len = std::fs::metadata(&file)
                .with_context(|| format!("cannot read {}", file.display()))?
                .len();
            let mut f = std::fs::File::open(&file)
                .with_context(|| format!("cannot open {}", file.display()))?;
            let mut query = query.clone();
            query.push(("path", dest));
            query.extend(os_prefix.map(|p| ("os_prefix", p)));
            query.extend(vm.map(|v| ("vm", v)));
            let v = c.upload_with(&format!("{}/files", path(&name)), &query, &mut f, len)?;
            let r: EnvironmentFileResult = decode(&v)?;
            if env.json() {
                print_json(&v)?;
            } else {
                for x in &r.results {
                    match (&x.written, &x.error) {
                        (Some(w), _) => println!(
                            "{}: {} {} bytes sha256 {}, {} ms",
                            x.vm_name, w.path, w.size, w.sha256, x.duration_ms
                        ),
                        (None, e) => println!(
                            "{}: error: {}",
                            x.vm_name,
                            e.as_deref().unwrap_or("no copy")
                        ),
                    }
                }
            }
            let failed = r.results.iter().filter(|x| x.written.is_none()).count();
            if failed > 0 {
                if !env.json() {
                    eprintln!("failed on {failed} of {} VMs", r.results.len());
                }
                return Err(Exit(1).into());
            }
            Ok(())
        }
        EnvCmd::Get {
            env: name,
            path: file,
            dir,
            os_prefix,
            vm,
        } => {
            let e: Environment = decode(&c.get(&path(&name), &query)?)?;
            super::files::env_get(env, &e, &file, &dir, os_prefix.as_deref(), vm.as_deref())
        }
        EnvCmd::Stop {
            env: name,
            wait,
            timeout,
        } => {
            let path = format!("{}/stop", path(&name));
            act(env, &path, &query, wait, timeout, EnvironmentState::Stopped)
        }
        EnvCmd::Start {
            env: name,
            wait,
            timeout,
        } => {
            let path = format!("{}/start", path(&name));
            act(env, &path, &query, wait, timeout, EnvironmentState::Ready)
        }
        EnvCmd::Del {
            env: name,
            wait,
            timeout,
        } => {
            let v = c.value(Method::Delete, &path(&name), &query, None)?;
            let e: Environment = decode(&v)?;
            let v = if wait {
                wait_until(env, &e.id.to_string(), timeout, |s| {
                    s == EnvironmentState::Deleted
                })?
            } else {
                v
            };
            print_env(env, &v)
        }
    }
}

/// `env stop` or `env start`: the action, the VMs that refused it (an
/// error at the end), and with `wait` the environment once it is `want`.
fn act(
    env: &Env,
    path: &str,
    query: &[(&str, String)],
    wait: bool,
    timeout: u64,
    want: EnvironmentState,
) -> Result<()> {
    let v = env
        .client
        .value(Method::Post, path, query, Some(&json!({})))?;
    let a: EnvironmentAction = decode(&v)?;
    for r in &a.refused {
        eprintln!("{}: {}", r.vm_name, r.reason);
    }
    let v = if wait && a.refused.is_empty() {
        wait_until(env, &a.environment.id.to_string(), timeout, |s| s == want)?
    } else {
        v["environment"].clone()
    };
    print_env(env, &v)?;
    if !a.refused.is_empty() {
        anyhow::bail!("{} VM(s) refused", a.refused.len());
    }
    Ok(())
}

fn state_str(s: EnvironmentState) -> &'static str {
    match s {
        EnvironmentState::Creating => "creating",
        EnvironmentState::Ready => "ready",
        EnvironmentState::Degraded => "degraded",
        EnvironmentState::Stopped => "stopped",
        EnvironmentState::Deleting => "deleting",
        EnvironmentState::Deleted => "deleted",
    }
}

/// Polls the environment until `done` says yes about its state.
fn wait_until(
    env: &Env,
    id: &str,
    timeout: u64,
    done: impl Fn(EnvironmentState) -> bool,
) -> Result<Value> {
    let start = Instant::now();
    loop {
        let v = env
            .client
            .get(&format!("/v1/environments/{}", seg(id)), &[])?;
        let e: Environment = decode(&v)?;
        if done(e.state) {
            return Ok(v);
        }
        if e.state == EnvironmentState::Degraded {
            bail!(
                "environment {} is degraded: {}",
                e.name,
                e.vms
                    .iter()
                    .filter(|v| !matches!(v.state, byteport_types::VmState::Running))
                    .map(|v| format!(
                        "{} is {}{}",
                        v.name,
                        v.state,
                        v.state_reason
                            .as_deref()
                            .map(|r| format!(" ({r})"))
                            .unwrap_or_default()
                    ))
                    .collect::<Vec<_>>()
                    .join("; ")
            );
        }
        if start.elapsed() > Duration::from_secs(timeout) {
            bail!(
                "environment {} is still {} after {timeout} s",
                e.name,
                state_str(e.state)
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn print_env(env: &Env, v: &Value) -> Result<()> {
    if env.json() {
        return print_json(v);
    }
    let e: Environment = decode(v)?;
    print_fields(&[
        ("name", e.name.to_string()),
        ("id", e.id.to_string()),
        ("project", e.project.to_string()),
        ("state", state_str(e.state).into()),
        ("os prefixes", e.os_prefixes.join(",")),
        (
            "flavor",
            e.flavor.map_or_else(|| "-".into(), |f| f.to_string()),
        ),
        (
            "expires",
            e.expires_at
                .map_or_else(|| "-".into(), |t| t.format("%Y-%m-%d %H:%M:%S").to_string()),
        ),
    ]);
    let mut t = Table::new(&["VM", "IMAGE", "ARCH", "STATE", "NODE", "SSH", "ID"]);
    for v in &e.vms {
        let ssh = v
            .ports
            .iter()
            .find(|p| p.guest_port == 22)
            .map_or_else(|| "-".into(), |p| format!("{}:{}", p.host, p.host_port));
        t.row(vec![
            v.name.to_string(),
            v.image.to_string(),
            super::arch_of(v),
            v.state.to_string(),
            v.node_id.map_or_else(|| "-".into(), |n| n.to_string()),
            ssh,
            v.id.to_string(),
        ]);
    }
    println!();
    t.print();
    Ok(())
}

/// Prints a streamed environment run as it comes: each line a VM writes,
/// prefixed with the VM's name (standard error's on standard error), then
/// how each VM that did not exit 0 ended and a count. The number of VMs
/// that failed.
fn print_fan_out(lines: impl BufRead) -> Result<usize> {
    let mut p = FanOut::default();
    let mut failures: Vec<String> = Vec::new();
    for line in lines.lines() {
        let line = line.context("the run's stream broke off")?;
        if line.is_empty() {
            continue;
        }
        let ev: EnvironmentExecEvent =
            serde_json::from_str(&line).context("the server sent a line this CLI cannot read")?;
        match ev {
            EnvironmentExecEvent::Started { vms } => {
                p.width = vms
                    .iter()
                    .map(|v| v.vm_name.as_str().len())
                    .max()
                    .unwrap_or(0);
                p.names = vms
                    .into_iter()
                    .map(|v| (v.vm_id, v.vm_name.to_string()))
                    .collect();
            }
            EnvironmentExecEvent::Stdout { vm_id, data } => p.output(vm_id, false, &data),
            EnvironmentExecEvent::Stderr { vm_id, data } => p.output(vm_id, true, &data),
            EnvironmentExecEvent::Exit {
                vm_id,
                code,
                signal,
                duration_ms,
            } => {
                let name = p.end(vm_id);
                match (code, signal) {
                    (Some(0), _) => {}
                    (Some(c), _) => {
                        failures.push(format!("{name}: exit {c} after {duration_ms} ms"))
                    }
                    (None, Some(s)) => failures.push(format!(
                        "{name}: killed by signal {s} after {duration_ms} ms"
                    )),
                    (None, None) => failures.push(format!("{name}: no exit status")),
                }
            }
            EnvironmentExecEvent::Error {
                vm_id,
                message,
                duration_ms,
            } => {
                let name = p.end(vm_id);
                failures.push(format!("{name}: {message} (after {duration_ms} ms)"));
            }
            EnvironmentExecEvent::Done {
                succeeded,
                failed,
                duration_ms,
            } => {
                for f in &failures {
                    eprintln!("{f}");
                }
                eprintln!(
                    "exit 0 on {succeeded} of {} VMs, {duration_ms} ms",
                    succeeded + failed
                );
                return Ok(failed);
            }
        }
    }
    bail!("the run's stream ended before every VM had")
}

/// The VMs of a streamed run and the bytes each wrote after its last
/// newline, per stream (true: standard error).
#[derive(Default)]
struct FanOut {
    names: HashMap<VmId, String>,
    width: usize,
    partial: HashMap<(VmId, bool), Vec<u8>>,
}

impl FanOut {
    /// Prints every whole line `data` completes for the VM.
    fn output(&mut self, vm: VmId, to_err: bool, data: &str) {
        use base64::Engine;
        let Some(name) = self.names.get(&vm) else {
            return;
        };
        let buf = self.partial.entry((vm, to_err)).or_default();
        buf.extend(
            base64::engine::general_purpose::STANDARD
                .decode(data)
                .unwrap_or_default(),
        );
        while let Some(i) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            emit(name, self.width, to_err, &line);
        }
    }

    /// Prints what the VM left without a newline; its name.
    fn end(&mut self, vm: VmId) -> String {
        let name = self
            .names
            .get(&vm)
            .cloned()
            .unwrap_or_else(|| vm.to_string());
        for to_err in [false, true] {
            if let Some(mut rest) = self.partial.remove(&(vm, to_err))
                && !rest.is_empty()
            {
                rest.push(b'\n');
                emit(&name, self.width, to_err, &rest);
            }
        }
        name
    }
}

fn emit(name: &str, width: usize, to_err: bool, line: &[u8]) {
    let prefix = format!("{name:width$} | ");
    let _ = if to_err {
        let mut e = std::io::stderr().lock();
        e.write_all(prefix.as_bytes())
            .and_then(|_| e.write_all(line))
    } else {
        let mut o = std::io::stdout().lock();
        o.write_all(prefix.as_bytes())
            .and_then(|_| o.write_all(line))
            .and_then(|_| o.flush())
    };
}
