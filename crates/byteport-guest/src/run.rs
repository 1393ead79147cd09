//! What the agent's binary does for run-code besides serving the port,
//! as subcommands the node starts through the agent:
//!
//! - `byteport-guest unpack DIR`: writes a run's files under `DIR`, read
//!   from standard input as a JSON list of `[path, text]` pairs (one agent
//!   message is at most 64 KiB; standard input has no such limit).
//! - `byteport-guest warm SOCKET PROGRAM ARGS...`: hands the program to an
//!   interpreter that the runtime's template started and left waiting on
//!   the Unix socket `SOCKET`, so a clone of the template does not start
//!   one. The interpreter takes this process's standard input, output and
//!   error (through `/proc/PID/fd/N`), its directory and environment, and
//!   answers with the exit code, which this process exits with. Without
//!   the socket (a cold boot) it runs `PROGRAM ARGS...` itself.
//! - `byteport-guest prewarm SOCKET`: asks that interpreter to run its own
//!   fixed program once, the way it runs a program given by `warm`, and
//!   to wait for the next one: a clone restored ahead of its run goes
//!   through the run's code once, so that an emulating QEMU has it
//!   translated when the run comes.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Component, Path};
use std::process::ExitCode;

/// Standard input `unpack` reads at most.
const MAX_FILES_INPUT: u64 = 4 << 20;

/// Whether `p` stays under the directory it is joined to.
fn plain_relative(p: &str) -> bool {
    !p.is_empty()
        && Path::new(p)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

/// Writes `files` under `dir`, making the directories between.
pub fn unpack(dir: &Path, files: &[(String, String)]) -> Result<(), String> {
    for (path, text) in files {
        if !plain_relative(path) {
            return Err(format!("{path:?} is not a path under the run's directory"));
        }
        let to = dir.join(path);
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("making {}: {e}", parent.display()))?;
        }
        std::fs::write(&to, text).map_err(|e| format!("writing {}: {e}", to.display()))?;
    }
    Ok(())
}

/// `unpack DIR`, files on standard input.
pub fn unpack_main(dir: &str) -> ExitCode {
    let mut input = Vec::new();
    if let Err(e) = std::io::stdin()
        .take(MAX_FILES_INPUT)
        .read_to_end(&mut input)
    {
        eprintln!("byteport-guest unpack: reading standard input: {e}");
        return ExitCode::FAILURE;
    }
    let files: Vec<(String, String)> = match serde_json::from_slice(&input) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("byteport-guest unpack: the files are not a JSON list of [path, text]: {e}");
            return ExitCode::FAILURE;
        }
    };
    match unpack(Path::new(dir), &files) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("byteport-guest unpack: {e}");
            ExitCode::FAILURE
        }
    }
}

/// What `warm` asks of the waiting interpreter, one JSON line.
#[derive(serde::Serialize)]
struct WarmRequest<'a> {
    /// Whose standard streams to take.
    pid: u32,
    /// The interpreter's arguments, as for `PROGRAM ARGS...`.
    argv: &'a [String],
    cwd: String,
    env: Vec<(String, String)>,
    /// Run the interpreter's own program, and wait for the next request.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    prewarm: bool,
}

/// `warm SOCKET PROGRAM ARGS...`.
pub fn warm_main(socket: &str, program: &str, args: &[String]) -> ExitCode {
    let Ok(conn) = UnixStream::connect(socket) else {
        // No interpreter waits (a cold boot, or it is gone): start one.
        let e = std::process::Command::new(program).args(args).exec();
        eprintln!("byteport-guest warm: cannot run {program}: {e}");
        return ExitCode::from(127);
    };
    hand_over(conn, args, false)
}

/// `prewarm SOCKET`.
pub fn prewarm_main(socket: &str) -> ExitCode {
    match UnixStream::connect(socket) {
        Ok(conn) => hand_over(conn, &[], true),
        Err(e) => {
            eprintln!("byteport-guest prewarm: no interpreter waits on {socket}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Sends the waiting interpreter its request and ends as it answers.
fn hand_over(mut conn: UnixStream, args: &[String], prewarm: bool) -> ExitCode {
    let req = WarmRequest {
        pid: std::process::id(),
        argv: args,
        cwd: std::env::current_dir()
            .map(|d| d.display().to_string())
            .unwrap_or_else(|_| "/".into()),
        env: std::env::vars().collect(),
        prewarm,
    };
    let mut line = match serde_json::to_vec(&req) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("byteport-guest warm: {e}");
            return ExitCode::FAILURE;
        }
    };
    line.push(b'\n');
    if let Err(e) = conn.write_all(&line) {
        eprintln!("byteport-guest warm: sending the program: {e}");
        return ExitCode::FAILURE;
    }
    let mut answer = String::new();
    let _ = BufReader::new(conn).read_line(&mut answer);
    match answer.trim().parse::<u8>() {
        Ok(code) => ExitCode::from(code),
        // The interpreter died without an answer: killed, most likely by
        // the kernel for memory. End the same way, so the run says so.
        Err(_) => {
            let _ = rustix::process::kill_process(
                rustix::process::getpid(),
                rustix::process::Signal::KILL,
            );
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpack_writes_under_the_directory_only() {
        let dir = std::env::temp_dir().join(format!("bp-unpack-{}", std::process::id()));
        let files = vec![
            ("main.rs".to_owned(), "mod util;\n".to_owned()),
            ("src/util.rs".to_owned(), "pub fn f() {}\n".to_owned()),
        ];
        unpack(&dir, &files).expect("unpack");
        assert_eq!(
            std::fs::read_to_string(dir.join("src/util.rs")).unwrap(),
            "pub fn f() {}\n"
        );
        for bad in ["../x", "/etc/passwd", "a/../../x", "", "./a"] {
            let e = unpack(&dir, &[(bad.to_owned(), String::new())]).unwrap_err();
            assert!(e.contains("not a path under"), "{bad}: {e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
