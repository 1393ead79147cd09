//! The typed result of `query-status`.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What `query-status` reports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub status: RunState,
    /// True when vCPUs are executing (QEMU's `running` member).
    pub running: bool,
}

/// QEMU's `RunState`; a state this crate does not know yet is kept as [`RunState::Other`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum RunState {
    /// Stopped by a debugger.
    Debug,
    /// Waiting for an incoming migration.
    InMigrate,
    /// An internal error stopped the VM.
    InternalError,
    /// An I/O error stopped the VM (`werror=stop`).
    IoError,
    /// Paused by `stop`.
    Paused,
    /// Paused after an outgoing migration finished.
    PostMigrate,
    /// Started with `-S` and not yet run.
    Prelaunch,
    /// Paused to finish an outgoing migration.
    FinishMigrate,
    /// Paused to restore a snapshot.
    RestoreVm,
    Running,
    /// Paused to save a snapshot.
    SaveVm,
    /// The guest shut down and QEMU was told not to exit (`-no-shutdown`).
    Shutdown,
    /// The guest is suspended (ACPI S3).
    Suspended,
    /// A watchdog fired with action `pause`.
    Watchdog,
    /// The guest panicked (with a pvpanic device and action `pause`).
    GuestPanicked,
    /// COLO fault-tolerance state.
    Colo,
    /// A state newer than this crate, as QEMU spelled it.
    Other(String),
}

impl RunState {
    /// QEMU's spelling of the state.
    pub fn as_str(&self) -> &str {
        match self {
            RunState::Debug => "debug",
            RunState::InMigrate => "inmigrate",
            RunState::InternalError => "internal-error",
            RunState::IoError => "io-error",
            RunState::Paused => "paused",
            RunState::PostMigrate => "postmigrate",
            RunState::Prelaunch => "prelaunch",
            RunState::FinishMigrate => "finish-migrate",
            RunState::RestoreVm => "restore-vm",
            RunState::Running => "running",
            RunState::SaveVm => "save-vm",
            RunState::Shutdown => "shutdown",
            RunState::Suspended => "suspended",
            RunState::Watchdog => "watchdog",
            RunState::GuestPanicked => "guest-panicked",
            RunState::Colo => "colo",
            RunState::Other(other) => other,
        }
    }
}

impl From<&str> for RunState {
    fn from(state: &str) -> Self {
        match state {
            "debug" => RunState::Debug,
            "inmigrate" => RunState::InMigrate,
            "internal-error" => RunState::InternalError,
            "io-error" => RunState::IoError,
            "paused" => RunState::Paused,
            "postmigrate" => RunState::PostMigrate,
            "prelaunch" => RunState::Prelaunch,
            "finish-migrate" => RunState::FinishMigrate,
            "restore-vm" => RunState::RestoreVm,
            "running" => RunState::Running,
            "save-vm" => RunState::SaveVm,
            "shutdown" => RunState::Shutdown,
            "suspended" => RunState::Suspended,
            "watchdog" => RunState::Watchdog,
            "guest-panicked" => RunState::GuestPanicked,
            "colo" => RunState::Colo,
            other => RunState::Other(other.to_owned()),
        }
    }
}

impl fmt::Display for RunState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for RunState {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for RunState {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let state = String::deserialize(deserializer)?;
        Ok(RunState::from(state.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn parses_query_status_replies() {
        let status: Status = serde_json::from_value(
            json!({"status": "running", "singlestep": false, "running": true}),
        )
        .unwrap();
        assert_eq!(
            status,
            Status {
                status: RunState::Running,
                running: true
            }
        );
        let status: Status =
            serde_json::from_value(json!({"status": "guest-panicked", "running": false})).unwrap();
        assert_eq!(status.status, RunState::GuestPanicked);
    }

    #[test]
    fn unknown_states_are_kept() {
        let state: RunState = serde_json::from_value(json!("hibernating")).unwrap();
        assert_eq!(state, RunState::Other("hibernating".into()));
        assert_eq!(serde_json::to_value(&state).unwrap(), json!("hibernating"));
    }

    #[test]
    fn spellings_round_trip() {
        for spelling in [
            "debug",
            "inmigrate",
            "internal-error",
            "io-error",
            "paused",
            "postmigrate",
            "prelaunch",
            "finish-migrate",
            "restore-vm",
            "running",
            "save-vm",
            "shutdown",
            "suspended",
            "watchdog",
            "guest-panicked",
            "colo",
        ] {
            let state = RunState::from(spelling);
            assert!(!matches!(state, RunState::Other(_)), "{spelling}");
            assert_eq!(state.to_string(), spelling);
        }
    }
}
