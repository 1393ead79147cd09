//! The run-code runtimes: for each language, its image, how it runs a
//! program, and the defaults of a run. The control plane builds a run's
//! commands from this table, the image recipes write it into each runtime
//! image's manifest, and the CLI picks a language from a file's extension.
//!
//! A program comes as one source text or as files with an entry point.
//! Commands are argv words; a word that is exactly a placeholder is
//! replaced whole (`{code}`: the source text, `{entry}`: the entry file's
//! path under the run's directory, `{opt}`: the optimisation flag), never
//! spliced into another word, and nothing goes through a shell.

/// One runtime.
#[derive(Debug)]
pub struct Runtime {
    pub language: &'static str,
    /// The image a run of this language boots.
    pub image: &'static str,
    /// File extensions of its sources (the CLI's guess).
    pub extensions: &'static [&'static str],
    /// Runs a program given as one source text; `None`: the text is
    /// written to [`Runtime::main_file`] and run as an entry point.
    pub code: Option<&'static [&'static str]>,
    /// The file a lone source text becomes when there is no `code` command,
    /// and the entry point when files come without one.
    pub main_file: &'static str,
    /// Runs an entry point (after the build, if any).
    pub entry: &'static [&'static str],
    /// Compiles the entry point first; its time is reported apart.
    pub build: Option<&'static [&'static str]>,
    /// `{opt}` of the build: (debug, release).
    pub opt: (&'static str, &'static str),
    /// A run's memory when it does not ask (MiB).
    pub memory_mib: u64,
    /// A run's wall-clock limit when it does not ask (s), the build
    /// included.
    pub timeout_secs: u64,
    /// What the template runs once before it is saved, to page the
    /// runtime in.
    pub warmup: &'static [&'static str],
    /// What a clone waiting in a node's pool runs before its run comes:
    /// the run's path through the guest (a process started as a run's is,
    /// the interpreter's compile and print) on a fixed program, so that a
    /// QEMU that emulates has translated that code already. Empty: none.
    pub prewarm: &'static [&'static str],
}

/// Where a run's files live in the guest (its working directory).
pub const RUN_DIR: &str = "/run/code";

/// Where run-python's waiting interpreter listens.
const PYTHON_SOCKET: &str = "/run/byteport-python.sock";

pub const RUNTIMES: &[Runtime] = &[
    Runtime {
        language: "shell",
        image: "run-shell",
        extensions: &["sh", "bash"],
        code: Some(&["bash", "-c", "{code}", "run"]),
        main_file: "main.sh",
        entry: &["bash", "{entry}"],
        build: None,
        opt: ("", ""),
        memory_mib: 256,
        timeout_secs: 30,
        warmup: &["bash", "-c", "true"],
        prewarm: &["bash", "-c", "echo >/dev/null", "run"],
    },
    Runtime {
        language: "python",
        image: "run-python",
        extensions: &["py"],
        // The interpreter the template started waits on PYTHON_SOCKET
        // (images/run/files/usr/local/lib/byteport/python-warm.py); without
        // it, `warm` starts python3 itself.
        code: Some(&[
            "byteport-guest",
            "warm",
            PYTHON_SOCKET,
            "python3",
            "-c",
            "{code}",
        ]),
        main_file: "main.py",
        entry: &[
            "byteport-guest",
            "warm",
            PYTHON_SOCKET,
            "python3",
            "{entry}",
        ],
        build: None,
        opt: ("", ""),
        memory_mib: 256,
        timeout_secs: 30,
        warmup: &[
            "python3",
            "/usr/local/lib/byteport/python-warm.py",
            PYTHON_SOCKET,
        ],
        prewarm: &["byteport-guest", "prewarm", PYTHON_SOCKET],
    },
    Runtime {
        language: "node",
        image: "run-node",
        extensions: &["js", "mjs", "cjs"],
        code: Some(&["node", "-e", "{code}"]),
        main_file: "main.js",
        entry: &["node", "{entry}"],
        build: None,
        opt: ("", ""),
        memory_mib: 256,
        timeout_secs: 30,
        warmup: &["node", "-e", ""],
        prewarm: &[],
    },
    Runtime {
        language: "rust",
        image: "run-rust",
        extensions: &["rs"],
        code: None,
        main_file: "main.rs",
        // rustc follows `mod` declarations to the other files; a run is
        // offline, so there is no registry and no cargo.
        entry: &["/tmp/byteport-main"],
        build: Some(&[
            "rustc",
            "--edition",
            "2021",
            "{opt}",
            "-o",
            "/tmp/byteport-main",
            "{entry}",
        ]),
        opt: ("-Copt-level=0", "-O"),
        memory_mib: 1024,
        // rustc takes about 10 s under emulation.
        timeout_secs: 120,
        warmup: &["rustc", "--version"],
        prewarm: &[],
    },
];

/// The runtime of a language.
pub fn runtime(language: &str) -> Option<&'static Runtime> {
    RUNTIMES.iter().find(|r| r.language == language)
}

/// The runtime whose sources end in `.ext`.
pub fn by_extension(ext: &str) -> Option<&'static Runtime> {
    RUNTIMES.iter().find(|r| r.extensions.contains(&ext))
}

/// The languages, for messages: `shell, python, node, rust`.
pub fn languages() -> String {
    RUNTIMES
        .iter()
        .map(|r| r.language)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A command with its placeholders filled.
pub fn fill(words: &[&str], code: &str, entry: &str, opt: &str) -> Vec<String> {
    words
        .iter()
        .filter_map(|w| match *w {
            "{code}" => Some(code.to_owned()),
            "{entry}" => Some(entry.to_owned()),
            "{opt}" if opt.is_empty() => None,
            "{opt}" => Some(opt.to_owned()),
            w => Some(w.to_owned()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_whole_words() {
        let rust = runtime("rust").unwrap();
        assert_eq!(
            fill(rust.build.unwrap(), "", "src/main.rs", rust.opt.1),
            [
                "rustc",
                "--edition",
                "2021",
                "-O",
                "-o",
                "/tmp/byteport-main",
                "src/main.rs"
            ]
        );
        let sh = runtime("shell").unwrap();
        assert_eq!(
            fill(sh.code.unwrap(), "echo {entry} $1", "x", ""),
            ["bash", "-c", "echo {entry} $1", "run"]
        );
        assert_eq!(by_extension("py").unwrap().language, "python");
        assert_eq!(languages(), "shell, python, node, rust");
    }
}
