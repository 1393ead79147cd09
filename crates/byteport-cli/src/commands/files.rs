//! Files to and from VMs: `byteport vm cp`, and the copies `env push` and
//! `env get` make. Every copy is checked by sha256: the server answers a
//! write with the guest's hash of the file, and sends the guest's hash
//! ahead of a read.

use super::{Env, Exit, print_json};
use crate::client::{Client, seg};
use anyhow::{Context, Result, bail};
use byteport_types::api::{Environment, FileWritten, comma_list};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Writes a local file to `path` in a VM, checking the guest's sha256 of
/// it against the local file's.
pub(super) fn put(c: &Client, vm_id: &str, local: &Path, path: &str) -> Result<FileWritten> {
    let (len, sha) = hash_file(local)?;
    let mut f =
        std::fs::File::open(local).with_context(|| format!("cannot open {}", local.display()))?;
    let v = c.upload_with(
        &format!("/v1/vms/{}/files", seg(vm_id)),
        &[("path", path.to_owned())],
        &mut f,
        len,
    )?;
    let w: FileWritten = crate::client::decode(&v)?;
    if w.sha256 != sha || w.size != len {
        bail!(
            "the VM's copy of {path} is {} bytes with sha256 {}; {} is {len} bytes with sha256 {sha}",
            w.size,
            w.sha256,
            local.display()
        );
    }
    Ok(w)
}

/// Reads `path` of a VM into `local` (through a `.part` file renamed once
/// the bytes hash to what the guest said); returns size and sha256.
pub(super) fn get(c: &Client, vm_id: &str, path: &str, local: &Path) -> Result<(u64, String)> {
    let (sha, mut body) = c.download(
        &format!("/v1/vms/{}/files", seg(vm_id)),
        &[("path", path.to_owned())],
        "x-byteport-sha256",
    )?;
    let sha = sha.context("the server sent no x-byteport-sha256")?;
    let part = local.with_extension(match local.extension() {
        Some(e) => format!("{}.part", e.to_string_lossy()),
        None => "part".into(),
    });
    let mut out = std::fs::File::create(&part)
        .with_context(|| format!("cannot create {}", part.display()))?;
    let (mut hash, mut size, mut buf) = (Sha256::new(), 0u64, vec![0u8; 64 * 1024]);
    let copied = (|| -> Result<()> {
        loop {
            let n = body
                .read(&mut buf)
                .with_context(|| format!("the copy of {path} broke off"))?;
            if n == 0 {
                return Ok(());
            }
            hash.update(&buf[..n]);
            size += n as u64;
            out.write_all(&buf[..n])
                .with_context(|| format!("cannot write {}", part.display()))?;
        }
    })();
    let got = hex::encode(hash.finalize());
    if let Err(e) = copied.and_then(|()| {
        if got == sha {
            Ok(())
        } else {
            bail!("the bytes of {path} hash to {got}, the guest said {sha}")
        }
    }) {
        let _ = std::fs::remove_file(&part);
        return Err(e);
    }
    out.sync_all().ok();
    std::fs::rename(&part, local)
        .with_context(|| format!("cannot rename {} to {}", part.display(), local.display()))?;
    Ok((size, got))
}

/// Where a copy went, its size and its sha256.
type Copied = (PathBuf, u64, String);

fn hash_file(p: &Path) -> Result<(u64, String)> {
    let mut f = std::fs::File::open(p).with_context(|| format!("cannot open {}", p.display()))?;
    let (mut hash, mut size, mut buf) = (Sha256::new(), 0u64, vec![0u8; 64 * 1024]);
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", p.display()))?;
        if n == 0 {
            return Ok((size, hex::encode(hash.finalize())));
        }
        hash.update(&buf[..n]);
        size += n as u64;
    }
}

/// `VM:PATH` as (VM, PATH); a local path otherwise (as scp reads them:
/// a colon before any slash).
fn remote(arg: &str) -> Option<(&str, &str)> {
    let (vm, path) = arg.split_once(':')?;
    (!vm.is_empty() && !vm.contains('/')).then_some((vm, path))
}

/// Where a file named like `src` lands when `dest` names a directory
/// (ends in `/`), or `dest` itself.
pub(super) fn guest_dest(dest: &str, src: &Path) -> Result<String> {
    if !dest.ends_with('/') {
        return Ok(dest.to_owned());
    }
    let name = src
        .file_name()
        .with_context(|| format!("{} has no file name", src.display()))?;
    Ok(format!("{dest}{}", name.to_string_lossy()))
}

/// `byteport vm cp SRC DST`: one side `VM:PATH`, the other local.
pub(super) fn vm_cp(env: &Env, project: Option<&str>, src: &str, dst: &str) -> Result<()> {
    match (remote(src), remote(dst)) {
        (None, Some((vm, path))) => {
            let local = PathBuf::from(src);
            let id = super::resolve_vm(env, project, vm)?;
            let path = guest_dest(path, &local)?;
            let w = put(&env.client, &id, &local, &path)?;
            if env.json() {
                return print_json(&serde_json::to_value(&w)?);
            }
            println!("{vm}:{} {} bytes sha256 {}", w.path, w.size, w.sha256);
            Ok(())
        }
        (Some((vm, path)), None) => {
            let id = super::resolve_vm(env, project, vm)?;
            let mut local = PathBuf::from(dst);
            if local.is_dir() {
                let name = Path::new(path)
                    .file_name()
                    .with_context(|| format!("{path} has no file name"))?;
                local.push(name);
            }
            let (size, sha) = get(&env.client, &id, path, &local)?;
            if env.json() {
                return print_json(&serde_json::json!({
                    "path": local, "size": size, "sha256": sha
                }));
            }
            println!("{} {size} bytes sha256 {sha}", local.display());
            Ok(())
        }
        (Some(_), Some(_)) => {
            bail!("copy between two VMs is not supported; one side must be local")
        }
        (None, None) => bail!("one of SRC and DST must be VM:PATH"),
    }
}

/// `byteport env get`: the file of every selected VM, saved as
/// `dir/VM-NAME/FILE-NAME`, a few at a time.
pub(super) fn env_get(
    env: &Env,
    e: &Environment,
    path: &str,
    dir: &Path,
    os_prefix: Option<&str>,
    vm: Option<&str>,
) -> Result<()> {
    let (prefixes, names) = (comma_list(os_prefix), comma_list(vm));
    let vms: Vec<_> = e
        .vms
        .iter()
        .filter(|v| {
            prefixes.is_empty()
                || prefixes
                    .iter()
                    .any(|p| v.image.as_str().starts_with(p.as_str()))
        })
        .filter(|v| {
            names.is_empty()
                || names
                    .iter()
                    .any(|n| *n == v.name.as_str() || *n == v.id.to_string())
        })
        .collect();
    if vms.is_empty() {
        bail!("no VM of the environment matches --os-prefix and --vm");
    }
    let name = Path::new(path)
        .file_name()
        .with_context(|| format!("{path} has no file name"))?
        .to_owned();
    let results: Vec<(String, Result<Copied>)> = std::thread::scope(|s| {
        let mut out = Vec::new();
        for batch in vms.chunks(8) {
            let handles: Vec<_> = batch
                .iter()
                .map(|v| {
                    let local = dir.join(v.name.as_str()).join(&name);
                    let id = v.id.to_string();
                    let vm_name = v.name.to_string();
                    let c = &env.client;
                    s.spawn(move || {
                        let r = (|| {
                            std::fs::create_dir_all(local.parent().unwrap_or(dir))
                                .with_context(|| format!("cannot create {}", local.display()))?;
                            let (size, sha) = get(c, &id, path, &local)?;
                            Ok((local, size, sha))
                        })();
                        (vm_name, r)
                    })
                })
                .collect();
            out.extend(handles.into_iter().map(|h| {
                h.join()
                    .unwrap_or_else(|_| (String::new(), Err(anyhow::anyhow!("a copy panicked"))))
            }));
        }
        out
    });
    let failed = results.iter().filter(|(_, r)| r.is_err()).count();
    if env.json() {
        let v: Vec<_> = results
            .iter()
            .map(|(vm, r)| match r {
                Ok((p, size, sha)) => {
                    serde_json::json!({"vm": vm, "path": p, "size": size, "sha256": sha})
                }
                Err(e) => serde_json::json!({"vm": vm, "error": format!("{e:#}")}),
            })
            .collect();
        print_json(&serde_json::Value::Array(v))?;
    } else {
        for (vm, r) in &results {
            match r {
                Ok((p, size, sha)) => println!("{vm}: {} {size} bytes sha256 {sha}", p.display()),
                Err(e) => println!("{vm}: error: {e:#}"),
            }
        }
    }
    if failed > 0 {
        if !env.json() {
            eprintln!("failed on {failed} of {} VMs", results.len());
        }
        return Err(Exit(1).into());
    }
    Ok(())
}
