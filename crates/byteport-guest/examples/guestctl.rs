//! A manual probe for a guest's agent socket.
//!
//! ```text
//! cargo run -p byteport-guest --features host --example guestctl -- SOCK ready [TIMEOUT_S]
//! cargo run -p byteport-guest --features host --example guestctl -- SOCK ping
//! cargo run -p byteport-guest --features host --example guestctl -- SOCK exec ARGV...
//! ```
//!
//! `ready` keeps trying to connect until the socket exists, then prints the
//! time to Ready; `exec` forwards this process's stdin and exits with the
//! command's code.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use byteport_guest::host::{ExecEvent, ExecRequest, GuestConn};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(sock), Some(cmd)) = (args.first(), args.get(1)) else {
        eprintln!("usage: guestctl SOCK ready [TIMEOUT_S] | ping | exec ARGV...");
        return ExitCode::from(2);
    };
    let sock = PathBuf::from(sock);
    let start = Instant::now();
    let timeout = Duration::from_secs(args.get(2).and_then(|s| s.parse().ok()).unwrap_or(60));
    let conn = loop {
        match GuestConn::connect_unix(&sock).await {
            Ok(c) => break c,
            Err(_) if cmd == "ready" && start.elapsed() < timeout => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => {
                eprintln!("guestctl: {}: {e}", sock.display());
                return ExitCode::FAILURE;
            }
        }
    };
    let ready = match conn.hello(timeout.saturating_sub(start.elapsed())).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("guestctl: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cmd.as_str() {
        "ready" => {
            println!(
                "ready after {:.2}s: agent {} on {} (guest uptime {} ms)",
                start.elapsed().as_secs_f64(),
                ready.version,
                ready.hostname,
                ready.uptime_ms
            );
            ExitCode::SUCCESS
        }
        "ping" => match conn.ping(Duration::from_secs(5)).await {
            Ok(rtt) => {
                println!("pong in {rtt:?}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("guestctl: {e}");
                ExitCode::FAILURE
            }
        },
        "exec" => exec(&conn, args[2..].to_vec()).await,
        _ => {
            eprintln!("guestctl: unknown command {cmd}");
            ExitCode::from(2)
        }
    }
}

async fn exec(conn: &GuestConn, argv: Vec<String>) -> ExitCode {
    let mut session = match conn
        .exec(ExecRequest {
            argv,
            stdin: true,
            ..ExecRequest::default()
        })
        .await
    {
        Ok(s) => s,
        Err(e) => {
            eprintln!("guestctl: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut stdin = tokio::io::stdin();
    let mut buf = vec![0u8; 16 * 1024];
    let mut stdin_open = true;
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    loop {
        tokio::select! {
            n = stdin.read(&mut buf), if stdin_open => match n {
                Ok(0) | Err(_) => {
                    stdin_open = false;
                    let _ = session.close_stdin().await;
                }
                Ok(n) => {
                    let _ = session.write_stdin(&buf[..n]).await;
                }
            },
            ev = session.events.recv() => match ev {
                Some(ExecEvent::Stdout(b)) => {
                    let _ = stdout.write_all(&b).await;
                    let _ = stdout.flush().await;
                }
                Some(ExecEvent::Stderr(b)) => {
                    let _ = stderr.write_all(&b).await;
                }
                Some(ExecEvent::Exit { code, signal }) => {
                    if let Some(sig) = signal {
                        eprintln!("guestctl: killed by signal {sig}");
                        return ExitCode::from(128 + sig as u8);
                    }
                    return ExitCode::from(code.unwrap_or(1) as u8);
                }
                Some(ExecEvent::Error(m)) => {
                    eprintln!("guestctl: {m}");
                    return ExitCode::FAILURE;
                }
                None => return ExitCode::FAILURE,
            },
        }
    }
}
