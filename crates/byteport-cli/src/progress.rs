//! Progress shown on a terminal: a bar for files read or sent, a status
//! line for waits. When standard error is not a terminal (a script, a
//! pipe, a log) nothing is drawn and the plain result lines stay as they
//! are.

use std::io::{IsTerminal, Read, Write};
use std::time::{Duration, Instant};

/// How often a bar is redrawn at most.
const REDRAW: Duration = Duration::from_millis(100);
const WIDTH: usize = 30;

/// Whether progress is drawn at all.
pub fn shown() -> bool {
    std::io::stderr().is_terminal()
}

/// `[=========>          ]  45%  12.0 MiB/26.5 MiB  4.1 MiB/s`.
pub fn bar_line(label: &str, done: u64, total: u64, elapsed: Duration) -> String {
    let frac = if total == 0 {
        1.0
    } else {
        (done as f64 / total as f64).min(1.0)
    };
    let filled = (frac * WIDTH as f64) as usize;
    let mut bar = "=".repeat(filled);
    if filled < WIDTH {
        bar.push('>');
        bar.push_str(&" ".repeat(WIDTH - filled - 1));
    }
    let secs = elapsed.as_secs_f64();
    let rate = if secs > 0.0 {
        format!(
            "  {}/s",
            crate::import::human_size((done as f64 / secs) as u64)
        )
    } else {
        String::new()
    };
    format!(
        "{label} [{bar}] {:>3}%  {}/{}{rate}",
        (frac * 100.0) as u32,
        crate::import::human_size(done),
        crate::import::human_size(total),
    )
}

/// A bar on standard error, redrawn in place; silent off a terminal.
pub struct Bar {
    label: String,
    total: u64,
    done: u64,
    started: Instant,
    drawn: Option<Instant>,
    shown: bool,
}

impl Bar {
    pub fn new(label: impl Into<String>, total: u64) -> Self {
        Bar {
            label: label.into(),
            total,
            done: 0,
            started: Instant::now(),
            drawn: None,
            shown: shown(),
        }
    }

    /// Keeps the bar hidden unless `cond` holds (a small file, say).
    pub fn only_if(mut self, cond: bool) -> Self {
        self.shown &= cond;
        self
    }

    pub fn add(&mut self, n: u64) {
        self.done += n;
        if self.shown && self.drawn.is_none_or(|t| t.elapsed() >= REDRAW) {
            self.draw();
        }
    }

    fn draw(&mut self) {
        let line = bar_line(&self.label, self.done, self.total, self.started.elapsed());
        let mut e = std::io::stderr();
        let _ = write!(e, "\r\x1b[2K{line}");
        let _ = e.flush();
        self.drawn = Some(Instant::now());
    }

    /// Draws the last state and ends the line.
    pub fn finish(mut self) {
        if self.shown {
            self.draw();
            eprintln!();
        }
    }
}

/// A reader that moves a bar as it is read.
pub struct Counting<'a, R> {
    pub inner: R,
    pub bar: &'a mut Bar,
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bar.add(n as u64);
        Ok(n)
    }
}

/// A status line for a wait: `web-1: starting (12 s)`, rewritten as the
/// state changes; each change is kept as a line of its own.
pub struct Status {
    what: String,
    started: Instant,
    last: Option<String>,
    shown: bool,
}

impl Status {
    pub fn new(what: impl Into<String>) -> Self {
        Status {
            what: what.into(),
            started: Instant::now(),
            last: None,
            shown: shown(),
        }
    }

    pub fn shown(&self) -> bool {
        self.shown
    }

    /// Shows `state` (and why, if the server says), after the time so far.
    pub fn update(&mut self, state: &str, reason: Option<&str>) {
        if !self.shown {
            return;
        }
        let now = match reason {
            Some(r) if !r.is_empty() => format!("{state}: {r}"),
            _ => state.to_owned(),
        };
        let mut e = std::io::stderr();
        if self.last.as_deref() != Some(now.as_str()) {
            if self.last.is_some() {
                let _ = writeln!(e);
            }
            self.last = Some(now.clone());
        }
        let _ = write!(
            e,
            "\r\x1b[2K{}: {now} ({} s)",
            self.what,
            self.started.elapsed().as_secs()
        );
        let _ = e.flush();
    }

    pub fn finish(self) {
        if self.shown && self.last.is_some() {
            eprintln!();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bar_fills_with_what_is_done() {
        let l = bar_line("disk", 0, 100, Duration::ZERO);
        assert!(l.starts_with("disk [>"), "{l}");
        assert!(l.contains("  0%  0 B/100 B"), "{l}");
        let l = bar_line("disk", 50 << 20, 100 << 20, Duration::from_secs(5));
        assert!(l.contains(" 50%  50.0 MiB/100.0 MiB  10.0 MiB/s"), "{l}");
        assert_eq!(l.matches('=').count(), WIDTH / 2, "{l}");
        let l = bar_line("disk", 100, 100, Duration::from_secs(1));
        assert!(l.contains(&format!("[{}]", "=".repeat(WIDTH))), "{l}");
        assert!(l.contains("100%"), "{l}");
        // An empty file is done at once.
        assert!(bar_line("x", 0, 0, Duration::ZERO).contains("100%"));
    }
}
