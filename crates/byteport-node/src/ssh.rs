//! Exec over SSH, for images without the guest agent (TTStack's
//! `--use-ssh`). The node has a key of its own (made once with
//! `ssh-keygen`, kept in its data directory); the metadata relay adds its
//! public half to such a VM's `public-keys`, so cloud-init authorizes it
//! for the image's login user; an exec then runs `ssh` to the VM's port 22
//! forward and the command, as root through `sudo -n`.
//!
//! sshd hands the command to the login user's shell, so the argv is sent
//! as one string in which every word is single-quoted (a `'` inside is
//! `'\''`): the remote shell reads each word back exactly, and nothing of
//! it is interpreted.

use crate::channel::Input;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use byteport_types::VmId;
use byteport_types::node_proto::FromNode;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// The node's SSH key pair.
#[derive(Clone, Debug)]
pub struct NodeKey {
    pub private: PathBuf,
    /// The public key, one `authorized_keys` line.
    pub public: String,
}

impl NodeKey {
    /// The key in `dir`, made there (ed25519, no passphrase) the first
    /// time; `None` when `ssh-keygen` is missing or fails.
    pub async fn ensure(dir: &Path) -> Option<NodeKey> {
        let private = dir.join("id_ed25519");
        if !private.exists() {
            std::fs::create_dir_all(dir).ok()?;
            let ok = tokio::process::Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C", "byteport-node", "-f"])
                .arg(&private)
                .stdin(Stdio::null())
                .status()
                .await
                .is_ok_and(|s| s.success());
            if !ok {
                tracing::warn!("no ssh-keygen: images without the agent get no exec");
                return None;
            }
        }
        let public = std::fs::read_to_string(private.with_extension("pub")).ok()?;
        Some(NodeKey {
            private,
            public: public.trim().to_owned(),
        })
    }
}

/// One word for a POSIX shell, read back exactly.
pub fn quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

/// The command line sshd's shell runs: `sudo -n` (as root, like the
/// agent's exec, and never waiting for a password), `env` with the
/// variables, in `cwd` when given; every word quoted.
pub fn remote_command(argv: &[String], env: &[(String, String)], cwd: Option<&str>) -> String {
    let mut words: Vec<String> = vec!["sudo".into(), "-n".into(), "--".into()];
    if let Some(dir) = cwd {
        // `sh -c 'cd "$1" && shift && exec "$@"' sh DIR CMD...`: the
        // directory and the command are arguments, never code.
        words.extend([
            "sh".into(),
            "-c".into(),
            r#"cd "$1" && shift && exec "$@""#.into(),
            "sh".into(),
            dir.to_owned(),
        ]);
    }
    // `env --`: its options end there; then the variables, then the
    // command.
    words.extend(["env".into(), "--".into()]);
    words.extend(env.iter().map(|(k, v)| format!("{k}={v}")));
    words.extend(argv.iter().cloned());
    words.iter().map(|w| quote(w)).collect::<Vec<_>>().join(" ")
}

/// Where a VM's sshd answers: its port 22 forward.
pub struct Target {
    pub user: String,
    pub host: String,
    pub port: u16,
}

/// Runs one exec over SSH; its output goes to `out` as it comes and the
/// last message is returned: `Exit`, or `Error` (ssh itself failed, the
/// timeout, the requester went away).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn exec(
    stream: u64,
    key: &NodeKey,
    t: &Target,
    command: String,
    stdin: bool,
    mut input: mpsc::Receiver<Input>,
    timeout_secs: u64,
    out: &mpsc::Sender<FromNode>,
    vm: VmId,
) -> FromNode {
    let error = |message: String| FromNode::Error {
        stream,
        message,
        not_found: false,
    };
    let mut cmd = tokio::process::Command::new("ssh");
    cmd.args([
        "-T",
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=no",
    ])
    .args(["-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"])
    .args([
        "-o",
        "ConnectTimeout=10",
        "-o",
        "ConnectionAttempts=3",
        "-i",
    ])
    .arg(&key.private)
    .args([
        "-p",
        &t.port.to_string(),
        "-l",
        &t.user,
        &t.host,
        "--",
        &command,
    ])
    .stdin(if stdin { Stdio::piped() } else { Stdio::null() })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return error(format!("cannot run ssh: {e}")),
    };
    let mut child_in = child.stdin.take();
    let (mut so, mut se) = (
        child.stdout.take().expect("piped"),
        child.stderr.take().expect("piped"),
    );
    let (mut bo, mut be) = (vec![0u8; 32 * 1024], vec![0u8; 32 * 1024]);
    let (mut out_open, mut err_open, mut input_open) = (true, true, stdin);
    // What ssh itself said, for an error of its own (exit status 255).
    let mut last_err = Vec::new();
    let deadline = tokio::time::sleep(Duration::from_secs(timeout_secs));
    tokio::pin!(deadline);
    while out_open || err_open {
        tokio::select! {
            n = so.read(&mut bo), if out_open => match n {
                Ok(0) | Err(_) => out_open = false,
                Ok(n) => { let _ = out.send(FromNode::Stdout { stream, data: B64.encode(&bo[..n]) }).await; }
            },
            n = se.read(&mut be), if err_open => match n {
                Ok(0) | Err(_) => err_open = false,
                Ok(n) => {
                    last_err.extend_from_slice(&be[..n]);
                    let keep = last_err.len().saturating_sub(2048);
                    last_err.drain(..keep);
                    let _ = out.send(FromNode::Stderr { stream, data: B64.encode(&be[..n]) }).await;
                }
            },
            i = input.recv(), if input_open => match i {
                Some(Input::Data(b)) => {
                    if let Some(w) = child_in.as_mut() { let _ = w.write_all(&b).await; }
                }
                Some(Input::End) => { child_in = None; input_open = false; }
                Some(Input::Close) | None => {
                    let _ = child.kill().await;
                    return error("the requester went away; the command was killed".into());
                }
            },
            _ = &mut deadline => {
                let _ = child.kill().await;
                tracing::info!(%vm, timeout_secs, "exec over SSH timed out");
                return error(format!("the command ran longer than {timeout_secs} s and was killed"));
            }
        }
    }
    drop(child_in);
    match child.wait().await {
        Ok(s) if s.code() == Some(255) => error(format!(
            "ssh to {}@{}:{} failed: {}",
            t.user,
            t.host,
            t.port,
            String::from_utf8_lossy(&last_err).trim()
        )),
        Ok(s) => {
            use std::os::unix::process::ExitStatusExt;
            FromNode::Exit {
                stream,
                code: s.code(),
                signal: s.signal(),
            }
        }
        Err(e) => error(format!("ssh: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_word_reaches_the_remote_shell_as_it_is() {
        assert_eq!(quote("it's"), r"'it'\''s'");
        let c = remote_command(
            &["printf".into(), "%s\n".into(), "$(reboot); `x` ;|&".into()],
            &[("A".into(), "b c".into())],
            Some("/tmp/my dir"),
        );
        assert_eq!(
            c,
            r#"'sudo' '-n' '--' 'sh' '-c' 'cd "$1" && shift && exec "$@"' 'sh' '/tmp/my dir' 'env' '--' 'A=b c' 'printf' '%s
' '$(reboot); `x` ;|&'"#
        );
        // A real shell reads the words back exactly.
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "for w in {}; do printf '[%s]' \"$w\"; done",
                ["a'b", "$HOME", "x y", "*"].map(quote).join(" ")
            ))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "[a'b][$HOME][x y][*]");
    }
}
