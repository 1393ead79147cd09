//! The in-guest agent: finds the virtio-serial port named
//! `org.byteport.agent.0`, opens it once and serves the guest protocol on it
//! for as long as the guest runs. The init system restarts it if it exits.

use std::fs::OpenOptions;
use std::path::PathBuf;
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

use byteport_guest::agent::{self, OnEof, log};
use byteport_guest::proto::AGENT_PORT_NAME;
use byteport_guest::run;

/// How long to wait for the port to appear while modules load.
const FIND_TIMEOUT: Duration = Duration::from_secs(30);

/// Pause between reads while no host is connected.
const IDLE_PAUSE: Duration = Duration::from_millis(50);

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    match argv.first().map(String::as_str) {
        Some("unpack") if argv.len() == 2 => return run::unpack_main(&argv[1]),
        Some("warm") if argv.len() >= 3 => return run::warm_main(&argv[1], &argv[2], &argv[3..]),
        Some("prewarm") if argv.len() == 2 => return run::prewarm_main(&argv[1]),
        Some("unpack" | "warm" | "prewarm") => return usage(),
        _ => {}
    }
    let mut name = AGENT_PORT_NAME.to_string();
    let mut args = argv.into_iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--version" | "-V" => {
                println!("byteport-guest {}", agent::VERSION);
                return ExitCode::SUCCESS;
            }
            "--port" => match args.next() {
                Some(n) => name = n,
                None => return usage(),
            },
            "--help" | "-h" => {
                println!(
                    "usage: byteport-guest [--port NAME]\n\
                     \x20      byteport-guest unpack DIR\n\
                     \x20      byteport-guest warm SOCKET PROGRAM [ARGS...]\n\
                     \x20      byteport-guest prewarm SOCKET\n\
                     Serves the BytePort guest protocol on the virtio-serial port NAME \
                     (default {AGENT_PORT_NAME}); unpack, warm and prewarm serve run-code."
                );
                return ExitCode::SUCCESS;
            }
            _ => return usage(),
        }
    }

    let Some(dev) = find_port(&name, FIND_TIMEOUT) else {
        log(format_args!(
            "no virtio-serial port named {name} after {}s",
            FIND_TIMEOUT.as_secs()
        ));
        return ExitCode::FAILURE;
    };
    // Opened once and kept: reopening the port per message loses messages.
    let port = match OpenOptions::new().read(true).write(true).open(&dev) {
        Ok(f) => f,
        Err(e) => {
            log(format_args!("opening {}: {e}", dev.display()));
            return ExitCode::FAILURE;
        }
    };
    let writer = match port.try_clone() {
        Ok(w) => w,
        Err(e) => {
            log(format_args!("duplicating {}: {e}", dev.display()));
            return ExitCode::FAILURE;
        }
    };
    log(format_args!(
        "{} serving on {}",
        agent::VERSION,
        dev.display()
    ));
    match agent::serve(port, writer, OnEof::WaitForHost(IDLE_PAUSE)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log(format_args!("{e}"));
            ExitCode::FAILURE
        }
    }
}

fn usage() -> ExitCode {
    eprintln!(
        "usage: byteport-guest [--version] [--port NAME] | unpack DIR | warm SOCKET PROGRAM [ARGS...] | prewarm SOCKET"
    );
    ExitCode::from(2)
}

/// The `/dev/vportNpM` whose sysfs name is `name`. Without udev there is no
/// `/dev/virtio-ports/NAME` link, so look at sysfs.
fn find_port(name: &str, timeout: Duration) -> Option<PathBuf> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(entries) = std::fs::read_dir("/sys/class/virtio-ports") {
            for entry in entries.flatten() {
                let matches = std::fs::read_to_string(entry.path().join("name"))
                    .is_ok_and(|n| n.trim_end() == name);
                let dev = PathBuf::from("/dev").join(entry.file_name());
                if matches && dev.exists() {
                    return Some(dev);
                }
            }
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(100));
    }
}
