//! A driver that runs nothing and records every call, for fast tests of the
//! agent's reconcile logic. Its instances obey pause/resume/powerdown at
//! once; `crash` makes one exit as a killed QEMU would.

use super::{Driver, DriverError, Instance, LaunchSpec, RunState};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

#[derive(Clone, Default)]
pub struct FakeDriver {
    /// Every call, as `"start NAME"`, `"pause NAME"`, ...
    pub calls: Arc<Mutex<Vec<String>>>,
    live: Arc<Mutex<HashMap<PathBuf, FakeInstance>>>,
}

#[derive(Clone)]
pub struct FakeInstance {
    name: String,
    calls: Arc<Mutex<Vec<String>>>,
    state: Arc<watch::Sender<RunState>>,
}

impl FakeDriver {
    fn log(&self, s: String) {
        if let Ok(mut c) = self.calls.lock() {
            c.push(s);
        }
    }

    /// The calls so far.
    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// Makes the VM in `dir` exit as if its process died.
    pub fn crash(&self, dir: &Path) {
        if let Some(i) = self.live.lock().ok().and_then(|l| l.get(dir).cloned()) {
            let _ = i.state.send(RunState::Exited {
                reason: "killed by signal 9".into(),
                clean: false,
            });
        }
    }
}

impl FakeInstance {
    fn log(&self, what: &str) {
        if let Ok(mut c) = self.calls.lock() {
            c.push(format!("{what} {}", self.name));
        }
    }
}

impl Instance for FakeInstance {
    fn pid(&self) -> Option<u32> {
        None
    }
    async fn state(&self) -> RunState {
        self.state.borrow().clone()
    }
    async fn pause(&self) -> Result<(), DriverError> {
        self.log("pause");
        self.state.send_replace(RunState::Paused);
        Ok(())
    }
    async fn resume(&self) -> Result<(), DriverError> {
        self.log("resume");
        self.state.send_replace(RunState::Running);
        Ok(())
    }
    async fn powerdown(&self) -> Result<(), DriverError> {
        self.log("powerdown");
        self.state.send_replace(RunState::Exited {
            reason: "the guest powered itself off".into(),
            clean: true,
        });
        Ok(())
    }
    async fn reset(&self) -> Result<(), DriverError> {
        self.log("reset");
        Ok(())
    }
    async fn kill(&self) -> Result<(), DriverError> {
        self.log("kill");
        self.state.send_replace(RunState::Exited {
            reason: "QEMU was told to quit".into(),
            clean: true,
        });
        Ok(())
    }
    async fn exited(&self) {
        let mut rx = self.state.subscribe();
        let _ = rx.wait_for(|s| matches!(s, RunState::Exited { .. })).await;
    }
}

impl Driver for FakeDriver {
    type Instance = FakeInstance;

    fn name(&self) -> &'static str {
        "fake"
    }

    async fn start(&self, spec: &LaunchSpec) -> Result<FakeInstance, DriverError> {
        self.log(format!("start {}", spec.name));
        let (tx, _) = watch::channel(RunState::Running);
        let i = FakeInstance {
            name: spec.name.clone(),
            calls: self.calls.clone(),
            state: Arc::new(tx),
        };
        if let Ok(mut l) = self.live.lock() {
            l.insert(spec.dir.clone(), i.clone());
        }
        Ok(i)
    }

    async fn adopt(&self, dir: &Path) -> Option<FakeInstance> {
        let i = self.live.lock().ok()?.get(dir).cloned()?;
        if matches!(*i.state.borrow(), RunState::Exited { .. }) {
            return None;
        }
        self.log(format!("adopt {}", i.name));
        Some(i)
    }
}
