//! Streams to and from a VM: `vm exec`'s NDJSON events, and
//! `vm console --follow`, the live serial console over a WebSocket (ws://
//! or wss:// over a std `TcpStream`).

use crate::client::{Client, api_error};
use anyhow::{Context, Result, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use byteport_types::api::ExecEvent;
use std::io::{BufRead, IsTerminal, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::Duration;
use tungstenite::handshake::HandshakeError;
use tungstenite::http::{HeaderValue, header::AUTHORIZATION};
use tungstenite::{Message, WebSocket, client::IntoClientRequest};

/// Ctrl-]: leaves the console, as in telnet and virsh.
const ESCAPE: u8 = 0x1d;
/// How long a socket read waits before typed keys get their turn.
const POLL: Duration = Duration::from_millis(30);

/// Copies an exec's events to `out` and `err` as they arrive (or, with
/// `raw`, the event lines themselves to `out`); returns the command's exit
/// status for this process, 128+N for a signal N. An `error` event is an
/// error.
pub fn relay_exec(
    mut events: impl BufRead,
    raw: bool,
    out: &mut impl Write,
    err: &mut impl Write,
) -> Result<u8> {
    let mut line = String::new();
    loop {
        line.clear();
        let n = events
            .read_line(&mut line)
            .context("the exec stream broke off")?;
        if n == 0 {
            bail!("the exec stream ended before the command's exit status");
        }
        if line.trim().is_empty() {
            continue;
        }
        let ev: ExecEvent = serde_json::from_str(line.trim_end()).with_context(|| {
            format!("the server sent an unexpected exec event: {}", line.trim())
        })?;
        if raw {
            out.write_all(line.as_bytes())?;
            out.flush()?;
        }
        match ev {
            ExecEvent::Stdout(b) if !raw => {
                out.write_all(&decode(&b)?)
                    .context("cannot write to standard output")?;
                out.flush()?;
            }
            ExecEvent::Stderr(b) if !raw => {
                err.write_all(&decode(&b)?)
                    .context("cannot write to standard error")?;
                err.flush()?;
            }
            ExecEvent::Stdout(_) | ExecEvent::Stderr(_) => {}
            ExecEvent::Exit { code, signal } => {
                return Ok(match (code, signal) {
                    (Some(c), _) => u8::try_from(c).unwrap_or(1),
                    (None, Some(s)) => u8::try_from(128 + s.clamp(0, 127)).unwrap_or(255),
                    (None, None) => 1,
                });
            }
            ExecEvent::Error(m) => bail!("{m}"),
        }
    }
}

fn decode(b64: &str) -> Result<Vec<u8>> {
    B64.decode(b64)
        .context("the server sent output that is not base64")
}

/// Where a WebSocket for an `http://` or `https://` base URL connects,
/// and its URL.
#[derive(Debug, PartialEq, Eq)]
pub struct WsTarget {
    /// `host:port` for the TCP connection.
    pub addr: String,
    /// The host the server's certificate must name, for `wss://`.
    pub tls_host: Option<String>,
    /// The `ws://` or `wss://` URL of `path` under the base.
    pub url: String,
}

impl WsTarget {
    pub fn new(base: &str, path: &str) -> Result<WsTarget> {
        let lower = base.to_ascii_lowercase();
        let (tls, rest) = if lower.starts_with("https://") {
            (true, &base["https://".len()..])
        } else if lower.starts_with("http://") {
            (false, &base["http://".len()..])
        } else {
            bail!("the server's URL {base} is not an http:// or https:// URL");
        };
        let (authority, prefix) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        if authority.is_empty() {
            bail!("the server's URL {base} has no host");
        }
        // `[::1]` has colons but no port; `[::1]:8080` and `host:8080` have one.
        let port_at = authority
            .rfind(':')
            .filter(|&i| !authority[i..].contains(']'));
        let host = &authority[..port_at.unwrap_or(authority.len())];
        let addr = match port_at {
            Some(_) => authority.to_owned(),
            None => format!("{authority}:{}", if tls { 443 } else { 80 }),
        };
        Ok(WsTarget {
            addr,
            tls_host: tls.then(|| host.to_owned()),
            url: format!(
                "{}://{authority}{prefix}{path}",
                if tls { "wss" } else { "ws" }
            ),
        })
    }
}

/// The console's connection: plain TCP, or TLS over it.
enum Stream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Stream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(t) => t,
            Stream::Tls(s) => s.get_ref(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(t) => t.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(t) => t.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Plain(t) => t.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

/// Attaches to the console WebSocket at `path` until the socket closes or
/// the user types Ctrl-].
pub fn follow(c: &Client, path: &str) -> Result<()> {
    let target = WsTarget::new(&c.base, path)?;
    let tcp =
        TcpStream::connect(&target.addr).with_context(|| format!("cannot reach {}", c.base))?;
    let _ = tcp.set_nodelay(true);
    let stream = match &target.tls_host {
        None => Stream::Plain(tcp),
        Some(host) => {
            let name = byteport_trust::server_name(host)?;
            let conn = rustls::ClientConnection::new(c.trust.rustls(), name)
                .context("cannot start TLS")?;
            Stream::Tls(Box::new(rustls::StreamOwned::new(conn, tcp)))
        }
    };
    let mut req = target
        .url
        .as_str()
        .into_client_request()
        .with_context(|| format!("{} is not a valid WebSocket URL", target.url))?;
    if let Some(a) = c.bearer() {
        req.headers_mut().insert(
            AUTHORIZATION,
            HeaderValue::from_str(&a).context("the API token is not a valid header value")?,
        );
    }
    let mut ws = match tungstenite::client(req, stream) {
        Ok((ws, _)) => ws,
        // The server refused the upgrade: its JSON error explains why.
        Err(HandshakeError::Failure(tungstenite::Error::Http(resp))) => {
            let body = resp.body().as_deref().unwrap_or_default();
            return Err(api_error(resp.status().as_u16(), body).into());
        }
        Err(HandshakeError::Failure(e)) => {
            let hint = byteport_trust::hint(&e.to_string());
            let e = anyhow::Error::new(e).context("cannot open the console");
            return Err(match hint {
                Some(h) => e.context(h),
                None => e,
            });
        }
        Err(HandshakeError::Interrupted(_)) => bail!("the console handshake was interrupted"),
    };
    ws.get_ref()
        .tcp()
        .set_read_timeout(Some(POLL))
        .context("cannot configure the console connection")?;
    let raw = RawMode::enter();
    let how = if raw.is_some() {
        "Ctrl-] to leave"
    } else {
        "Ctrl-] then Enter to leave"
    };
    eprint!("[attached to the console; {how}]\r\n");
    let keys = spawn_stdin_reader();
    let res = pump(&mut ws, &keys, &mut std::io::stdout());
    drop(raw);
    match &res {
        Ok(Ended::Detached) => eprint!("\r\n[detached]\r\n"),
        Ok(Ended::Closed) => eprint!("\r\n[the console closed]\r\n"),
        Err(_) => eprint!("\r\n"),
    }
    res.map(|_| ())
}

/// Why the console session ended.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    Detached,
    Closed,
}

/// Console output to `out`, typed keys to the socket, until one ends.
fn pump<S: Read + Write>(
    ws: &mut WebSocket<S>,
    keys: &Receiver<Vec<u8>>,
    out: &mut impl Write,
) -> Result<Ended> {
    use tungstenite::Error as E;
    loop {
        match ws.read() {
            Ok(Message::Binary(b)) => {
                out.write_all(&b)?;
                out.flush()?;
            }
            Ok(Message::Text(t)) => {
                out.write_all(t.as_bytes())?;
                out.flush()?;
            }
            Ok(Message::Close(_)) => {
                // Sends the queued close reply.
                let _ = ws.flush();
                return Ok(Ended::Closed);
            }
            Ok(_) => {}
            Err(E::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(
                E::ConnectionClosed
                | E::AlreadyClosed
                | E::Protocol(tungstenite::error::ProtocolError::ResetWithoutClosingHandshake),
            ) => return Ok(Ended::Closed),
            Err(e) => return Err(anyhow::Error::new(e).context("the console connection broke")),
        }
        // Once standard input has ended, the output still shows.
        while let Ok(chunk) = keys.try_recv() {
            let (send, leave) = match chunk.iter().position(|&b| b == ESCAPE) {
                Some(i) => (&chunk[..i], true),
                None => (&chunk[..], false),
            };
            if !send.is_empty() {
                ws.send(Message::Binary(send.to_vec().into()))
                    .context("cannot send to the console")?;
            }
            if leave {
                let _ = ws.close(None);
                let _ = ws.flush();
                return Ok(Ended::Detached);
            }
        }
    }
}

/// Reads standard input on a thread, in whatever pieces it arrives.
fn spawn_stdin_reader() -> Receiver<Vec<u8>> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = [0u8; 1024];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    if tx.send(buf[..n].to_vec()).is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    });
    rx
}

/// The terminal in raw mode (no echo, no line editing, keys such as Ctrl-C
/// passed through), set and restored with `stty` so that no unsafe termios
/// call is needed; restored on drop.
struct RawMode {
    saved: String,
}

fn stty(args: &[&str]) -> Option<std::process::Output> {
    Command::new("stty")
        .args(args)
        .stdin(Stdio::inherit())
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
}

impl RawMode {
    /// Raw mode when standard input is a terminal and `stty` works.
    fn enter() -> Option<RawMode> {
        if !std::io::stdin().is_terminal() {
            return None;
        }
        let saved = String::from_utf8(stty(&["-g"])?.stdout).ok()?;
        let mode = RawMode {
            saved: saved.trim().to_owned(),
        };
        // On failure, dropping `mode` restores what `stty` may have changed.
        stty(&["raw", "-echo"]).map(|_| mode)
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = stty(&[&self.saved]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ws_targets() {
        let t = WsTarget::new("http://127.0.0.1:8080", "/v1/vms/x/console/ws").expect("ok");
        assert_eq!(t.addr, "127.0.0.1:8080");
        assert_eq!(t.url, "ws://127.0.0.1:8080/v1/vms/x/console/ws");
        let t = WsTarget::new("http://cloud.example/bp", "/v1/x").expect("ok");
        assert_eq!(t.addr, "cloud.example:80");
        assert_eq!(t.url, "ws://cloud.example/bp/v1/x");
        assert_eq!(
            WsTarget::new("http://[::1]", "/").expect("ok").addr,
            "[::1]:80"
        );
        assert_eq!(
            WsTarget::new("http://[::1]:9", "/").expect("ok").addr,
            "[::1]:9"
        );
        let t = WsTarget::new("https://cloud.example/bp", "/v1/x").expect("tls");
        assert_eq!(t.addr, "cloud.example:443");
        assert_eq!(t.tls_host.as_deref(), Some("cloud.example"));
        assert_eq!(t.url, "wss://cloud.example/bp/v1/x");
        let t = WsTarget::new("https://[::1]:8443", "/").expect("tls");
        assert_eq!(t.tls_host.as_deref(), Some("[::1]"));
        let e = WsTarget::new("ftp://cloud.example", "/").expect_err("scheme");
        assert!(e.to_string().contains("https://"), "{e}");
    }

    /// A WebSocket server on a thread that sends `say`, then (if `close`)
    /// closes, else collects what it is sent until the client closes.
    fn ws_pair(
        say: &'static [u8],
        close: bool,
    ) -> (WebSocket<TcpStream>, std::thread::JoinHandle<Vec<u8>>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().expect("accept");
            let mut ws = tungstenite::accept(s).expect("ws accept");
            ws.send(Message::Binary(say.to_vec().into())).expect("send");
            let mut got = Vec::new();
            if close {
                ws.close(None).expect("close");
            }
            loop {
                match ws.read() {
                    Ok(Message::Binary(b)) => got.extend_from_slice(&b),
                    Ok(Message::Close(_)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            got
        });
        let tcp = TcpStream::connect(addr).expect("connect");
        let (ws, _) = tungstenite::client(format!("ws://{addr}/"), tcp).expect("handshake");
        ws.get_ref().set_read_timeout(Some(POLL)).expect("timeout");
        (ws, server)
    }

    #[test]
    fn console_shows_output_until_the_server_closes() {
        let (mut ws, server) = ws_pair(b"login: ", true);
        let (tx, rx) = std::sync::mpsc::channel();
        drop(tx);
        let mut out = Vec::new();
        assert_eq!(pump(&mut ws, &rx, &mut out).expect("pump"), Ended::Closed);
        assert_eq!(out, b"login: ");
        server.join().expect("server");
    }

    #[test]
    fn console_sends_keys_and_leaves_on_ctrl_bracket() {
        let (mut ws, server) = ws_pair(b"", false);
        let (tx, rx) = std::sync::mpsc::channel();
        tx.send(b"root\r".to_vec()).expect("key");
        tx.send(b"ls\x1dnot sent".to_vec()).expect("key");
        let mut out = Vec::new();
        assert_eq!(pump(&mut ws, &rx, &mut out).expect("pump"), Ended::Detached);
        assert_eq!(server.join().expect("server"), b"root\rls");
    }

    /// A Write that reports each write on a channel.
    struct Signal(std::sync::mpsc::Sender<Vec<u8>>);

    impl Write for Signal {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let _ = self.0.send(b.to_vec());
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Exec output is shown while the command still runs: the fake server
    /// sends the exit only after the first line reached standard output.
    #[test]
    fn exec_output_streams_before_the_exit() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (seen_tx, seen_rx) = std::sync::mpsc::channel::<Vec<u8>>();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            let mut req = Vec::new();
            let mut buf = [0u8; 4096];
            // The request: headers, then a Content-Length body.
            let body_len = loop {
                let n = s.read(&mut buf).expect("read");
                req.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&req).to_string();
                if let Some(end) = text.find("\r\n\r\n") {
                    let len: usize = text
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().expect("length"))
                        })
                        .unwrap_or(0);
                    if req.len() >= end + 4 + len {
                        break len;
                    }
                }
            };
            let req = String::from_utf8(req).expect("utf-8");
            assert!(req.starts_with("POST /v1/vms/x/exec "), "{req}");
            assert!(
                req.to_ascii_lowercase()
                    .contains("authorization: bearer tok"),
                "{req}"
            );
            let body: serde_json::Value =
                serde_json::from_str(&req[req.len() - body_len..]).expect("a JSON body");
            assert_eq!(body, serde_json::json!({"argv": ["ls"]}));
            let chunk = |s: &mut TcpStream, line: &str| {
                write!(s, "{:x}\r\n{line}\r\n", line.len()).expect("write");
                s.flush().expect("flush");
            };
            write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            )
            .expect("write");
            chunk(&mut s, "{\"stdout\":\"aGkK\"}\n");
            let first = seen_rx
                .recv_timeout(Duration::from_secs(10))
                .expect("the first line is shown before the exit is sent");
            assert_eq!(first, b"hi\n");
            // The exit and the end of the body go out in one write: the
            // client may leave as soon as it has read the exit.
            let exit = "{\"exit\":{\"code\":7,\"signal\":null}}\n";
            s.write_all(format!("{:x}\r\n{exit}\r\n0\r\n\r\n", exit.len()).as_bytes())
                .expect("write");
        });
        let c = Client::new(
            &format!("http://{addr}"),
            Some("tok".into()),
            byteport_trust::Trust::system(),
        );
        let events = c
            .post_stream(
                "/v1/vms/x/exec",
                &[],
                &serde_json::json!({"argv": ["ls"]}),
                "application/x-ndjson",
            )
            .expect("stream");
        let code = relay_exec(events, false, &mut Signal(seen_tx), &mut Vec::new()).expect("relay");
        assert_eq!(code, 7);
        server.join().expect("server");
    }

    fn relay(lines: &str, raw: bool) -> (Result<u8>, Vec<u8>, Vec<u8>) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let r = relay_exec(lines.as_bytes(), raw, &mut out, &mut err);
        (r, out, err)
    }

    #[test]
    fn exec_events() {
        let (r, out, err) = relay(
            "{\"stdout\":\"aGVsbG8K\"}\n{\"stderr\":\"b29wcw==\"}\n\n{\"exit\":{\"code\":3,\"signal\":null}}\n",
            false,
        );
        assert_eq!(r.expect("exit"), 3);
        assert_eq!(out, b"hello\n");
        assert_eq!(err, b"oops");

        let (r, _, _) = relay("{\"exit\":{\"code\":null,\"signal\":9}}\n", false);
        assert_eq!(r.expect("exit"), 137);

        let (r, out, _) = relay(
            "{\"stdout\":\"aGk=\"}\n{\"error\":\"the agent went away\"}\n",
            false,
        );
        assert_eq!(out, b"hi");
        assert_eq!(r.expect_err("error").to_string(), "the agent went away");

        let (r, _, _) = relay("{\"stdout\":\"aGk=\"}\n", false);
        assert!(r.expect_err("cut").to_string().contains("ended"));

        // JSON output passes the lines through.
        let lines = "{\"stdout\":\"aGk=\"}\n{\"exit\":{\"code\":0,\"signal\":null}}\n";
        let (r, out, err) = relay(lines, true);
        assert_eq!(r.expect("exit"), 0);
        assert_eq!(out, lines.as_bytes());
        assert!(err.is_empty());
    }
}
