//! The CLI's config file: where it is and what it holds.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// What `byteport login` stores.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Config {
    pub url: String,
    /// A personal API token (`bpt_...`).
    pub token: String,
    /// The id of `token`, so `logout` can revoke it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The CA bundle `login` was given, trusted for `url` from then on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert: Option<PathBuf>,
}

/// `$BYTEPORT_CONFIG`, else `$XDG_CONFIG_HOME/byteport/config.json`, else
/// `~/.config/byteport/config.json`.
pub fn path() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("BYTEPORT_CONFIG").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let base = match std::env::var_os("XDG_CONFIG_HOME").filter(|p| !p.is_empty()) {
        Some(x) => PathBuf::from(x),
        None => {
            let home = std::env::var_os("HOME")
                .filter(|p| !p.is_empty())
                .context("cannot find the config file: neither BYTEPORT_CONFIG, XDG_CONFIG_HOME nor HOME is set")?;
            PathBuf::from(home).join(".config")
        }
    };
    Ok(base.join("byteport").join("config.json"))
}

/// The stored config, or `None` when there is none.
pub fn load() -> Result<Option<Config>> {
    let p = path()?;
    match std::fs::read_to_string(&p) {
        Ok(s) => {
            let c = serde_json::from_str(&s)
                .with_context(|| format!("cannot parse the config file {}", p.display()))?;
            Ok(Some(c))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read the config file {}", p.display())),
    }
}

/// Writes the config readable by its owner only (mode 0600).
pub fn save(c: &Config) -> Result<PathBuf> {
    let p = path()?;
    if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(c)? + "\n";
    let tmp = p.with_extension("json.tmp");
    let _ = std::fs::remove_file(&tmp);
    {
        use std::io::Write;
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts
            .open(&tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    }
    std::fs::rename(&tmp, &p).with_context(|| format!("cannot write {}", p.display()))?;
    Ok(p)
}

/// Removes the config; true when there was one.
pub fn remove() -> Result<bool> {
    let p = path()?;
    match std::fs::remove_file(&p) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("cannot remove {}", p.display())),
    }
}
