//! Files to and from a running VM through its guest agent: `dd of=PATH`
//! fed the bytes as standard input, `cat PATH` streamed back, and
//! `sha256sum PATH` in the guest checked against the hash of the bytes
//! that went through. The path is one argument of a program the agent
//! starts; no shell ever parses it.

use super::hub::Stream;
use super::{App, Ctx};
use crate::error::{AppError, AppResult};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use byteport_store::vm;
use byteport_types::Name;
use byteport_types::api::{EnvironmentFileQuery, EnvironmentFileResult, FileWritten, VmFileResult};
use byteport_types::node_proto::{FromNode, ToNode};
use bytes::Bytes;
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use std::time::Instant;
use tokio::sync::mpsc;

/// Longest path a copy takes.
const MAX_PATH: usize = 4096;
/// Largest file one VM copy moves.
pub const MAX_FILE: u64 = 1 << 30;
/// Largest file an environment push takes (it is held once in memory and
/// sent to every VM from there).
pub const MAX_ENV_FILE: usize = 64 << 20;
/// Bytes per message on the node channel.
const CHUNK: usize = 48 * 1024;
/// How long one copy may take in the guest.
const FILE_SECS: u64 = 3600;
/// Guest error text kept for an error message.
const MAX_STDERR: usize = 2048;

/// A file read from a VM: its hash in the guest, and its bytes as they
/// come (an error ends the stream when the bytes do not match the hash).
pub struct FileDownload {
    pub sha256: String,
    pub body: mpsc::Receiver<Result<Bytes, std::io::Error>>,
}

fn check_path(path: &str) -> AppResult<()> {
    if !path.starts_with('/') || path.len() > MAX_PATH || path.contains('\0') || path.ends_with('/')
    {
        return Err(AppError::bad(
            "invalid_path",
            format!(
                "path must be an absolute file path of at most {MAX_PATH} bytes without NUL, \
                 not ending in '/'"
            ),
        ));
    }
    Ok(())
}

/// How a guest program ended: its exit code and what it said on stderr.
struct Ended {
    code: Option<i32>,
    stdout: Vec<u8>,
    stderr: String,
}

/// Reads a stream to its end, keeping stdout (up to `keep` bytes) and a
/// little stderr.
async fn ended(s: &mut Stream, keep: usize) -> AppResult<Ended> {
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    loop {
        match s.rx.recv().await {
            Some(FromNode::Stdout { data, .. }) => {
                let b = B64.decode(data).map_err(AppError::internal)?;
                let room = keep.saturating_sub(stdout.len());
                stdout.extend_from_slice(&b[..b.len().min(room)]);
            }
            Some(FromNode::Stderr { data, .. }) => {
                let b = B64.decode(data).map_err(AppError::internal)?;
                let room = MAX_STDERR.saturating_sub(stderr.len());
                stderr.extend_from_slice(&b[..b.len().min(room)]);
            }
            Some(FromNode::Exit { code, .. }) => {
                return Ok(Ended {
                    code,
                    stdout,
                    stderr: String::from_utf8_lossy(&stderr).trim().to_owned(),
                });
            }
            Some(FromNode::Error { message, .. }) => return Err(AppError::Unavailable(message)),
            Some(_) => {}
            None => return Err(AppError::Unavailable("the node's channel closed".into())),
        }
    }
}

fn guest_refused(what: &str, path: &str, e: &Ended) -> AppError {
    if e.stderr.contains("No such file") || e.stderr.contains("can't open") {
        return AppError::not_found("file", path);
    }
    AppError::Conflict(format!("could not {what} {path} in the VM: {}", e.stderr))
}

impl App {
    /// The hex SHA-256 of a file in the guest.
    async fn guest_sha256(&self, v: &vm::Model, path: &str) -> AppResult<String> {
        let argv = vec!["sha256sum".to_owned(), path.to_owned()];
        let mut s = self
            .exec_open(v, argv, Vec::new(), None, false, FILE_SECS)
            .await?;
        let e = ended(&mut s, 4096).await?;
        if e.code != Some(0) {
            return Err(guest_refused("read", path, &e));
        }
        let out = String::from_utf8_lossy(&e.stdout);
        match out.split_whitespace().next() {
            Some(h) if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) => {
                Ok(h.to_ascii_lowercase())
            }
            _ => Err(AppError::Unavailable(format!(
                "the guest's sha256sum answered {out:?}"
            ))),
        }
    }

    /// Writes `body` to `path` in the VM, replacing what was there, and
    /// checks the guest's copy against what was sent.
    async fn put_to<S>(&self, v: &vm::Model, path: &str, mut body: S) -> AppResult<FileWritten>
    where
        S: futures_util::Stream<Item = AppResult<Bytes>> + Unpin,
    {
        let argv = vec!["dd".to_owned(), format!("of={path}"), "bs=65536".to_owned()];
        let mut s = self
            .exec_open(v, argv, Vec::new(), None, true, FILE_SECS)
            .await?;
        let (mut hash, mut size) = (Sha256::new(), 0u64);
        while let Some(chunk) = body.next().await {
            // An error drops the stream, which ends the guest's dd.
            let chunk = chunk?;
            size += chunk.len() as u64;
            if size > MAX_FILE {
                return Err(AppError::TooLarge(MAX_FILE as usize));
            }
            hash.update(&chunk);
            for part in chunk.chunks(CHUNK) {
                let data = B64.encode(part);
                if !s.send(ToNode::Input { stream: s.id, data }).await {
                    return Err(AppError::Unavailable("the node's channel closed".into()));
                }
            }
        }
        s.send(ToNode::InputEnd { stream: s.id }).await;
        let e = ended(&mut s, 0).await?;
        if e.code != Some(0) {
            return Err(guest_refused("write", path, &e));
        }
        let sent = hex::encode(hash.finalize());
        let theirs = self.guest_sha256(v, path).await?;
        if theirs != sent {
            return Err(AppError::Unavailable(format!(
                "the VM's copy of {path} has sha256 {theirs}, not {sent} as sent"
            )));
        }
        Ok(FileWritten {
            path: path.to_owned(),
            size,
            sha256: sent,
        })
    }

    /// Writes a file into one VM from a streamed body.
    pub async fn vm_file_put<S>(
        &self,
        ctx: &Ctx,
        id: &str,
        path: &str,
        body: S,
    ) -> AppResult<FileWritten>
    where
        S: futures_util::Stream<Item = AppResult<Bytes>> + Unpin,
    {
        check_path(path)?;
        let v = self.exec_target(ctx, id).await?;
        self.put_to(&v, path, body).await
    }

    /// Reads a file from one VM: its hash first, then its bytes.
    pub async fn vm_file_get(&self, ctx: &Ctx, id: &str, path: &str) -> AppResult<FileDownload> {
        check_path(path)?;
        let v = self.exec_target(ctx, id).await?;
        let sha256 = self.guest_sha256(&v, path).await?;
        let argv = vec!["cat".to_owned(), path.to_owned()];
        let s = self
            .exec_open(&v, argv, Vec::new(), None, false, FILE_SECS)
            .await?;
        let (tx, body) = mpsc::channel(16);
        tokio::spawn(relay_file(s, sha256.clone(), tx));
        Ok(FileDownload { sha256, body })
    }

    /// Writes one file into every selected VM of an environment at once.
    /// A VM that cannot take it is listed with the reason; the others go
    /// ahead.
    pub async fn env_file_put<S>(
        &self,
        ctx: &Ctx,
        key: &str,
        q: &EnvironmentFileQuery,
        mut body: S,
    ) -> AppResult<EnvironmentFileResult>
    where
        S: futures_util::Stream<Item = AppResult<Bytes>> + Unpin,
    {
        check_path(&q.path)?;
        let (e, vms) = self
            .env_targets(ctx, key, q.project.as_deref(), &q.os_prefix, &q.vm)
            .await?;
        let mut file = Vec::new();
        while let Some(chunk) = body.next().await {
            let chunk = chunk?;
            if file.len() + chunk.len() > MAX_ENV_FILE {
                return Err(AppError::TooLarge(MAX_ENV_FILE));
            }
            file.extend_from_slice(&chunk);
        }
        let file = Bytes::from(file);
        let puts = vms.iter().map(|v| {
            let file = file.clone();
            async move {
                let started = Instant::now();
                let done = match super::guest::exec_ready(v) {
                    Ok(()) => {
                        let parts = (0..file.len().max(1))
                            .step_by(1 << 20)
                            .map(move |at| Ok(file.slice(at..(at + (1 << 20)).min(file.len()))));
                        self.put_to(v, &q.path, futures_util::stream::iter(parts))
                            .await
                    }
                    Err(e) => Err(e),
                };
                let (written, error) = match done {
                    Ok(w) => (Some(w), None),
                    Err(e) => (None, Some(e.to_string())),
                };
                Ok::<_, AppError>(VmFileResult {
                    vm_id: byteport_types::VmId(v.id),
                    vm_name: Name::parse(&v.name).map_err(AppError::internal)?,
                    image: Name::parse(&v.image_name).map_err(AppError::internal)?,
                    written,
                    error,
                    duration_ms: started.elapsed().as_millis() as u64,
                })
            }
        });
        let results = futures_util::future::join_all(puts)
            .await
            .into_iter()
            .collect::<AppResult<Vec<_>>>()?;
        Ok(EnvironmentFileResult {
            environment: Name::parse(&e.name).map_err(AppError::internal)?,
            path: q.path.clone(),
            results,
        })
    }
}

/// Streams `cat`'s output as the body, ending it with an error when the
/// bytes do not hash to what the guest said first (the file changed, or
/// the copy broke).
async fn relay_file(
    mut s: Stream,
    sha256: String,
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
) {
    let mut hash = Sha256::new();
    let fail = |m: String| Err(std::io::Error::other(m));
    let last = loop {
        match s.rx.recv().await {
            Some(FromNode::Stdout { data, .. }) => {
                let Ok(b) = B64.decode(data) else {
                    break fail("the node sent bad data".into());
                };
                hash.update(&b);
                if tx.send(Ok(Bytes::from(b))).await.is_err() {
                    return;
                }
            }
            Some(FromNode::Exit { code: Some(0), .. }) => {
                let got = hex::encode(hash.finalize());
                if got == sha256 {
                    return;
                }
                break fail(format!("the bytes read hash to {got}, not {sha256}"));
            }
            Some(FromNode::Exit { code, signal, .. }) => {
                break fail(format!("cat ended with code {code:?}, signal {signal:?}"));
            }
            Some(FromNode::Error { message, .. }) => break fail(message),
            Some(_) => {}
            None => break fail("the node's channel closed".into()),
        }
    };
    let _ = tx.send(last).await;
}
