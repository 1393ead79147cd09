//! The configuration file (`/etc/byteport/byteportd.toml`, or
//! `--config FILE`): every flag of every command, by its long name, as a
//! top-level key (`listen = "0.0.0.0:7480"`, `run-pool = 2`,
//! `log-json = true`). One file serves a server and a node: a key that
//! another command takes is left alone by this one, a key that no command
//! takes is an error naming it, and so is a value its flag would refuse.
//!
//! What wins: a flag, then its environment variable, then the file, then
//! the built-in default. The file's values are handed to clap as flags
//! after the command line's, for the keys the command line and the
//! environment left unset, so clap alone parses and validates everything.

use anyhow::{Context, bail};
use clap::{Arg, ArgAction, Command};
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Read when it exists and no other file is named.
pub const DEFAULT_PATH: &str = "/etc/byteport/byteportd.toml";

/// Names the file.
pub const ENV: &str = "BYTEPORT_CONFIG";

/// Flags whose values are kept out of `config show`.
const SECRET: &[&str] = &["join-token"];

/// Flags of the root command that take a value (to skip it when looking
/// for the subcommand on a command line).
const ROOT_VALUED: &[&str] = &["--config", "--log-format"];

/// A parsed configuration file.
pub struct File {
    pub path: PathBuf,
    values: BTreeMap<String, toml::Value>,
}

impl File {
    pub fn load(path: &Path) -> anyhow::Result<File> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the configuration file {}", path.display()))?;
        File::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> anyhow::Result<File> {
        let table: toml::Table = text
            .parse()
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok(File {
            path: path.to_owned(),
            values: table.into_iter().collect(),
        })
    }
}

/// The file to read: `--config FILE` on the command line, else
/// `BYTEPORT_CONFIG`, else [`DEFAULT_PATH`] if it exists. `Err` when a
/// named file is missing.
pub fn locate(
    argv: &[OsString],
    env: &dyn Fn(&str) -> Option<OsString>,
) -> anyhow::Result<Option<PathBuf>> {
    let mut named = None;
    for (i, a) in argv.iter().enumerate() {
        let a = a.to_string_lossy();
        if a == "--" {
            break;
        }
        if a == "--config" {
            named = argv.get(i + 1).map(PathBuf::from);
        } else if let Some(v) = a.strip_prefix("--config=") {
            named = Some(PathBuf::from(v));
        }
    }
    match named.or_else(|| env(ENV).map(PathBuf::from)) {
        Some(p) if p.is_file() => Ok(Some(p)),
        Some(p) => bail!("no configuration file at {} (--config)", p.display()),
        None => Ok(Path::new(DEFAULT_PATH)
            .is_file()
            .then(|| PathBuf::from(DEFAULT_PATH))),
    }
}

/// The subcommand a command line runs (`admin backup` is two deep), and
/// where its words end.
fn target<'a>(root: &'a Command, argv: &[OsString]) -> &'a Command {
    let mut cmd = root;
    let mut words = argv.iter().skip(1);
    while let Some(w) = words.next() {
        let w = w.to_string_lossy();
        if ROOT_VALUED.contains(&w.as_ref()) {
            words.next();
            continue;
        }
        if w.starts_with('-') {
            continue;
        }
        match cmd.find_subcommand(w.as_ref()) {
            Some(sub) => cmd = sub,
            None => break,
        }
    }
    cmd
}

/// Every long flag of a command tree, for telling "another command's key"
/// from "nobody's key".
fn all_keys(cmd: &Command, out: &mut BTreeSet<String>) {
    for a in cmd.get_arguments() {
        if let Some(l) = a.get_long() {
            out.insert(l.to_owned());
        }
    }
    for s in cmd.get_subcommands() {
        all_keys(s, out);
    }
}

/// Keys that are not settings.
fn reserved(key: &str) -> bool {
    matches!(key, "help" | "version" | "config")
}

fn text_of(v: &toml::Value) -> Option<String> {
    match v {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

/// The command line with the file's settings added as flags, and the
/// keys that came from the file. `root` is the daemon's whole command,
/// `argv` its command line (program name first).
pub fn merge(
    root: &Command,
    argv: Vec<OsString>,
    file: &File,
    env: &dyn Fn(&str) -> Option<OsString>,
) -> anyhow::Result<(Vec<OsString>, Vec<String>)> {
    let mut root = root.clone();
    root.build();
    let cmd = target(&root, &argv);
    let mut known = BTreeSet::new();
    all_keys(&root, &mut known);
    let given = |long: &str| {
        argv.iter().take_while(|a| *a != "--").any(|a| {
            let a = a.to_string_lossy();
            a.strip_prefix("--").is_some_and(|r| {
                r == long || r.strip_prefix(long).is_some_and(|r| r.starts_with('='))
            })
        })
    };
    let at = file.path.display();
    let mut extra = Vec::new();
    let mut from_file = Vec::new();
    for (key, value) in &file.values {
        let arg: Option<&Arg> = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(key.as_str()));
        let Some(arg) = arg.filter(|_| !reserved(key)) else {
            if known.contains(key) && !reserved(key) {
                continue;
            }
            bail!(
                "{at}: unknown key `{key}` (the keys are the long flags of `byteportd <command> --help`)"
            );
        };
        if given(key)
            || arg
                .get_env()
                .is_some_and(|name| env(&name.to_string_lossy()).is_some())
        {
            continue;
        }
        let Some(text) = text_of(value) else {
            bail!("{at}: `{key}` takes one value (a string, number or boolean)");
        };
        if matches!(arg.get_action(), ArgAction::SetTrue) {
            match value {
                toml::Value::Boolean(true) => extra.push(OsString::from(format!("--{key}"))),
                toml::Value::Boolean(false) => {}
                _ => bail!("{at}: `{key}` is true or false"),
            }
        } else {
            // The flag's own parser, on its own (without the rules that
            // tie it to other flags, which the whole command checks).
            let alone = Arg::new("value")
                .long("value")
                .value_parser(arg.get_value_parser().clone())
                .action(ArgAction::Set);
            Command::new("byteportd.toml")
                .no_binary_name(true)
                .arg(alone)
                .try_get_matches_from([OsString::from(format!("--value={text}"))])
                .map_err(|e| {
                    let detail = e.to_string();
                    let detail = detail
                        .lines()
                        .next()
                        .unwrap_or_default()
                        .trim_start_matches("error: ")
                        .replace(" for '--value <value>'", "");
                    anyhow::anyhow!("{at}: `{key}`: {detail}")
                })?;
            extra.push(OsString::from(format!("--{key}={text}")));
        }
        from_file.push(key.clone());
    }
    // After the command line's own words (before a `--`, if any).
    let mut out = argv;
    let end = out.iter().position(|a| a == "--").unwrap_or(out.len());
    out.splice(end..end, extra);
    Ok((out, from_file))
}

/// The command line to parse: the file's settings added (when there is a
/// file), and `all-in-one` when no command is named.
pub fn effective_argv(root: &Command, mut argv: Vec<OsString>) -> anyhow::Result<Vec<OsString>> {
    let env = |k: &str| std::env::var_os(k);
    let mut r = root.clone();
    r.build();
    let asks_help = argv.iter().skip(1).any(|a| {
        matches!(
            a.to_str(),
            Some("-h" | "--help" | "-V" | "--version" | "help")
        )
    });
    if std::ptr::eq(target(&r, &argv), &r) && !asks_help {
        argv.push("all-in-one".into());
    }
    match locate(&argv, &env)? {
        Some(path) => Ok(merge(root, argv, &File::load(&path)?, &env)?.0),
        None => Ok(argv),
    }
}

/// `byteportd config show [COMMAND [FLAGS]]`: every setting of COMMAND
/// (all-in-one by default) as it would run, one `key = value` line each
/// in the file's own syntax, with where it came from; secrets masked.
pub fn show(root: &Command, config: Option<&Path>, args: &[OsString]) -> anyhow::Result<String> {
    let env = |k: &str| std::env::var_os(k);
    let mut argv: Vec<OsString> = vec!["byteportd".into()];
    argv.extend(args.iter().cloned());
    if argv.len() == 1 {
        argv.push("all-in-one".into());
    }
    let path = match config {
        Some(p) => Some(p.to_owned()),
        None => locate(&argv, &env)?,
    };
    let (argv, from_file) = match &path {
        Some(p) => merge(root, argv, &File::load(p)?, &env)?,
        None => (argv, Vec::new()),
    };
    let mut r = root.clone();
    r.build();
    let cmd = target(&r, &argv).clone();
    if std::ptr::eq(target(&r, &argv), &r) {
        bail!("config show takes a command: all-in-one, server or node");
    }
    let matches = r.try_get_matches_from_mut(&argv)?;
    let mut m = &matches;
    while let Some((_, sub)) = m.subcommand() {
        m = sub;
    }
    let mut out = String::new();
    out.push_str(&format!(
        "# byteportd {}: {}\n",
        cmd.get_name(),
        match &path {
            Some(p) => format!("configuration file {}", p.display()),
            None => format!("no configuration file ({DEFAULT_PATH} is read when it exists)"),
        }
    ));
    for arg in cmd.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if reserved(long) {
            continue;
        }
        let id = arg.get_id().as_str();
        let raw: Vec<String> = m
            .get_raw(id)
            .map(|v| v.map(|s| s.to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        let source = if from_file.iter().any(|k| k == long) {
            "file"
        } else {
            match m.value_source(id) {
                Some(clap::parser::ValueSource::CommandLine) => "flag",
                Some(clap::parser::ValueSource::EnvVariable) => "environment",
                Some(clap::parser::ValueSource::DefaultValue) => "default",
                _ => "unset",
            }
        };
        let value = match raw.first() {
            None => {
                out.push_str(&format!("# {long} (unset)\n"));
                continue;
            }
            Some(_) if SECRET.contains(&long) => "\"****\"".to_owned(),
            Some(v) if long == "database-url" => toml_text(&mask_url(v)),
            Some(v) => toml_text(v),
        };
        out.push_str(&format!("{long} = {value}  # {source}\n"));
    }
    Ok(out)
}

/// A value as the file would spell it: numbers and booleans bare.
fn toml_text(v: &str) -> String {
    if v == "true" || v == "false" || v.parse::<f64>().is_ok_and(f64::is_finite) {
        v.to_owned()
    } else {
        toml::Value::String(v.to_owned()).to_string()
    }
}

/// `postgres://user:secret@host/db` without its password.
fn mask_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((auth, host)) = rest.rsplit_once('@') else {
        return url.to_owned();
    };
    match auth.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:****@{host}"),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> Command {
        <crate::Cli as clap::CommandFactory>::command()
    }

    fn words(s: &str) -> Vec<OsString> {
        s.split_whitespace().map(OsString::from).collect()
    }

    fn no_env(_: &str) -> Option<OsString> {
        None
    }

    fn file(text: &str) -> File {
        File::parse(Path::new("byteportd.toml"), text).unwrap()
    }

    /// A value its flag takes, for every flag.
    fn sample(arg: &Arg) -> toml::Value {
        if matches!(arg.get_action(), ArgAction::SetTrue) {
            return toml::Value::Boolean(true);
        }
        let long = arg.get_long().unwrap();
        let text = match long {
            "listen" => "127.0.0.1:7999".to_owned(),
            "placement-policy" => "pack".to_owned(),
            "forward-ports" => "21000-21099".to_owned(),
            "accel" => "tcg".to_owned(),
            "network" => "user".to_owned(),
            "log-format" => "json".to_owned(),
            "run-templates" => "false".to_owned(),
            "server" => "http://10.0.0.1:7480".to_owned(),
            _ => match arg.get_default_values().first() {
                Some(d) => d.to_string_lossy().into_owned(),
                None => format!("/srv/{long}"),
            },
        };
        match text.parse::<i64>() {
            Ok(i) if long != "forward-ports" => toml::Value::Integer(i),
            _ => toml::Value::String(text),
        }
    }

    #[test]
    fn every_flag_of_every_daemon_command_is_a_key_that_reaches_its_argument() {
        let root = root();
        for name in ["all-in-one", "server", "node"] {
            let mut built = root.clone();
            built.build();
            let cmd = built.find_subcommand(name).unwrap().clone();
            let mut table = toml::Table::new();
            for a in cmd.get_arguments() {
                let Some(long) = a.get_long() else { continue };
                if !reserved(long) {
                    table.insert(long.to_owned(), sample(a));
                }
            }
            let text = toml::to_string(&table).unwrap();
            let f = file(&text);
            let (argv, from_file) =
                merge(&root, words(&format!("byteportd {name}")), &f, &no_env).unwrap();
            assert_eq!(from_file.len(), table.len(), "{name}: {text}");
            let m = root.clone().try_get_matches_from(&argv).unwrap();
            let (_, m) = m.subcommand().unwrap();
            for (key, v) in &table {
                let a = cmd
                    .get_arguments()
                    .find(|a| a.get_long() == Some(key))
                    .unwrap();
                let got = m
                    .get_raw(a.get_id().as_str())
                    .and_then(|mut r| r.next())
                    .map(|s| s.to_string_lossy().into_owned());
                assert_eq!(got, text_of(v), "{name}: key {key}");
            }
        }
    }

    #[test]
    fn an_unknown_key_is_refused_by_name_and_another_commands_key_is_left_alone() {
        let root = root();
        let e = merge(
            &root,
            words("byteportd server"),
            &file("lisen = \"0.0.0.0:1\""),
            &no_env,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("unknown key `lisen`"), "{e}");
        // forward-ports is the node's: a server started on the same file
        // does not mind it.
        let (argv, from_file) = merge(
            &root,
            words("byteportd server"),
            &file("forward-ports = \"21000-21099\"\nnode-timeout = 9"),
            &no_env,
        )
        .unwrap();
        assert_eq!(from_file, ["node-timeout"]);
        assert_eq!(argv, words("byteportd server --node-timeout=9"));
    }

    #[test]
    fn a_bad_value_is_refused_with_its_key() {
        let root = root();
        for (text, key) in [
            ("listen = \"nowhere\"", "`listen`"),
            ("node-timeout = \"soon\"", "`node-timeout`"),
            ("node-timeout = [1, 2]", "`node-timeout`"),
            ("log-json = \"yes\"", "`log-json`"),
        ] {
            let e = merge(&root, words("byteportd server"), &file(text), &no_env)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(key) && e.starts_with("byteportd.toml:"),
                "{text}: {e}"
            );
        }
        let e = File::parse(Path::new("f.toml"), "listen = ")
            .err()
            .unwrap()
            .to_string();
        assert!(e.starts_with("f.toml:"), "{e}");
    }

    #[test]
    fn a_flag_beats_its_environment_variable_which_beats_the_file() {
        let root = root();
        let f = file("node-timeout = 9\naudit-retention-days = 7\ncpu-overcommit = 2.5");
        let env = |k: &str| (k == "BYTEPORT_AUDIT_RETENTION_DAYS").then(|| OsString::from("30"));
        let (argv, from_file) =
            merge(&root, words("byteportd server --node-timeout 3"), &f, &env).unwrap();
        assert_eq!(from_file, ["cpu-overcommit"]);
        assert_eq!(
            argv,
            words("byteportd server --node-timeout 3 --cpu-overcommit=2.5")
        );
    }

    #[test]
    fn the_file_reaches_admin_commands_and_the_default_command() {
        let root = root();
        let f = file("data-dir = \"/srv/bp\"\nlisten = \"0.0.0.0:7480\"");
        let (argv, _) = merge(&root, words("byteportd admin backup out.tar"), &f, &no_env).unwrap();
        assert_eq!(
            argv,
            words("byteportd admin backup out.tar --data-dir=/srv/bp")
        );
        let (argv, _) = merge(
            &root,
            words("byteportd --config x.toml all-in-one"),
            &f,
            &no_env,
        )
        .unwrap();
        assert!(argv.contains(&"--listen=0.0.0.0:7480".into()), "{argv:?}");
    }

    #[test]
    fn a_password_in_a_database_url_is_masked() {
        assert_eq!(
            mask_url("postgres://bp:hunter2@db:5432/bp"),
            "postgres://bp:****@db:5432/bp"
        );
        assert_eq!(mask_url("postgres://db/bp"), "postgres://db/bp");
    }
}
