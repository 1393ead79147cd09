//! One task per VM. It owns the VM's hypervisor instance, its directory
//! and its guest-agent connection, takes the latest desired state from a
//! watch channel (so a slow VM never blocks the agent's loop), moves the VM
//! one step at a time towards it, and publishes what it observes.
//!
//! ```text
//!  desired running/paused:  (none) ──prepare+start──► provisioning
//!      provisioning ──agent ready (or process up, no agent)──► running
//!      running ◄──cont── paused ◄──stop── running        restart: system_reset
//!  desired stopped:  running/paused ──powerdown──► (wait ≤ stop timeout) ──quit──► stopped (disk kept)
//!  desired deleted:  any ──quit──► remove disk, sockets, logs, ports ──► deleted
//!  process exits by itself: guest power-off ──► stopped (reason), crash ──► error (reason)
//! ```

use crate::Shared;
use crate::bridge::{Attachment, tap_name};
use crate::driver::{Driver, Instance, LaunchSpec, RunState, files};
use crate::network::Network;
use byteport_guest::host::{ExecRequest, GuestConn, GuestError};
use byteport_guest::proto::{CLOUD_INIT_RUN, CloudInitStatus};
use byteport_types::VmId;
use byteport_types::api::{
    BootMode, CloudInit, DesiredVm, Engine, PortForward, VmNetwork, VmReport, guest_mac,
};
use byteport_types::vm_state::{DesiredState, ObservedState};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Guest ports forwarded to the host for every VM.
const FORWARDED: &[u16] = &[22];
/// How long a guest agent has to say ready after its VM starts.
const AGENT_TIMEOUT: Duration = Duration::from_secs(300);

/// What survives an agent restart, in the VM's directory.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Persisted {
    pub spec: DesiredVm,
    /// The desired generation carried out.
    pub applied: u64,
    pub ports: Vec<PortForward>,
    /// A start that failed at this desired generation is not retried until
    /// the desired state changes.
    pub failed: Option<u64>,
    pub observed: ObservedState,
    pub reason: Option<String>,
    /// Its place on its project's bridge, when bridged.
    #[serde(default)]
    pub net: Option<Attachment>,
}

pub struct VmTask<D: Driver> {
    shared: Arc<Shared<D>>,
    id: VmId,
    dir: PathBuf,
    p: Persisted,
    inst: Option<D::Instance>,
    ready: watch::Receiver<Option<AgentSeen>>,
    /// Wakes the task when the agent's readiness changes.
    ready_wake: watch::Receiver<Option<AgentSeen>>,
    ready_tx: Arc<watch::Sender<Option<AgentSeen>>>,
    stop_deadline: Option<Instant>,
    generation: u64,
    guest_task: Option<tokio::task::JoinHandle<()>>,
    /// The guest agent connection, once ready (kept across guest resets).
    conn: Option<GuestConn>,
    pending_conn: Option<tokio::sync::oneshot::Receiver<GuestConn>>,
    /// An adopted guest that had booted before the agent restarted: it
    /// stays running (or paused) while its guest agent reconnects, rather
    /// than going back to provisioning. A reset or a new start clears it.
    booted_before_adoption: bool,
}

/// What the guest agent said: its version once ready, then how cloud-init
/// went on this boot (see [`cloud_init_outcome`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentSeen {
    pub version: String,
    pub cloud_init: CloudInit,
}

/// How often the node asks while cloud-init runs.
const CLOUD_INIT_POLL: Duration = Duration::from_secs(1);
/// How long one Hello may take to be answered.
const CLOUD_INIT_ASK: Duration = Duration::from_secs(10);

/// Waits for cloud-init to end in the guest and says how it ended.
///
/// The agent reads cloud-init's run directory itself and says where it is
/// in every Ready, so the node asks with a Hello once a second and no
/// process starts in the guest. (`cloud-init status --wait` started Python
/// while the guest booted, about a quarter more boot time under TCG;
/// listing the directory with `ls` each second still cost about a tenth.)
/// An agent older than that field gets the `ls` poll.
async fn cloud_init_outcome(conn: &GuestConn) -> CloudInit {
    loop {
        match conn.hello(CLOUD_INIT_ASK).await {
            Ok(r) => match r.cloud_init {
                None => return cloud_init_by_listing(conn, CLOUD_INIT_RUN).await,
                Some(CloudInitStatus::Running) => {}
                Some(s) => return cloud_init_of(s),
            },
            // Busy: ask again.
            Err(GuestError::Timeout(_)) => {}
            // The connection went (a reset or a stop): the next one asks again.
            Err(_) => return CloudInit::Running,
        }
        tokio::time::sleep(CLOUD_INIT_POLL).await;
    }
}

/// The version a guest agent says it is, as the node passes it on: a
/// short printable string, or a word saying it was not one (the guest is
/// not trusted).
fn agent_version(v: &str) -> String {
    if !v.is_empty() && v.len() <= 64 && v.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        v.to_owned()
    } else {
        "(unreadable)".to_owned()
    }
}

fn cloud_init_of(s: CloudInitStatus) -> CloudInit {
    match s {
        CloudInitStatus::Running => CloudInit::Running,
        CloudInitStatus::Done => CloudInit::Done,
        CloudInitStatus::Error => CloudInit::Error,
        CloudInitStatus::Absent => CloudInit::Absent,
    }
}

/// [`cloud_init_outcome`] for an agent that does not report it: lists
/// `run_dir` with `ls` once a second and reads `result.json` when it
/// appears (see [`CloudInitStatus::read`]).
async fn cloud_init_by_listing(conn: &GuestConn, run_dir: &str) -> CloudInit {
    loop {
        let names = match conn.exec_output(ExecRequest::new(["ls", run_dir])).await {
            Ok(out) if out.code == Some(0) => String::from_utf8_lossy(&out.stdout).into_owned(),
            // No directory (or no `ls`): cloud-init is not in this guest.
            Ok(_) => return CloudInit::Absent,
            Err(GuestError::Exec(m)) if m.starts_with("cannot run") => return CloudInit::Absent,
            Err(_) => return CloudInit::Running,
        };
        let has = |n: &str| names.split_whitespace().any(|x| x == n);
        if has("result.json") {
            let path = format!("{run_dir}/result.json");
            match conn.exec_output(ExecRequest::new(["cat", &path])).await {
                Ok(out) if out.code == Some(0) => {
                    if let Some(s) = CloudInitStatus::from_result(&out.stdout) {
                        return cloud_init_of(s);
                    }
                }
                Ok(_) | Err(GuestError::Exec(_)) => {}
                Err(_) => return CloudInit::Running,
            }
        } else if has("disabled") {
            return CloudInit::Absent;
        }
        tokio::time::sleep(CLOUD_INIT_POLL).await;
    }
}

/// What to do after a step.
enum Next {
    /// Take another step now.
    Again,
    /// Wait for a change, an exit, or at most this long.
    Wait(Duration),
    /// The VM is gone; the task ends.
    Done,
}

impl<D: Driver> VmTask<D> {
    pub fn new(shared: Arc<Shared<D>>, spec: DesiredVm) -> Self {
        let dir = shared.vms_dir.join(spec.id.to_string());
        let p = std::fs::read(dir.join(files::STATE))
            .ok()
            .and_then(|b| serde_json::from_slice::<Persisted>(&b).ok())
            .unwrap_or(Persisted {
                spec: spec.clone(),
                applied: 0,
                ports: Vec::new(),
                failed: None,
                observed: ObservedState::Provisioning,
                reason: None,
                net: None,
            });
        let (tx, rx) = watch::channel(None);
        let mut t = VmTask {
            shared,
            id: spec.id,
            dir,
            p,
            inst: None,
            ready_wake: rx.clone(),
            ready: rx,
            ready_tx: Arc::new(tx),
            stop_deadline: None,
            generation: 0,
            guest_task: None,
            conn: None,
            pending_conn: None,
            booted_before_adoption: false,
        };
        t.p.spec = spec;
        t
    }

    fn save(&self) {
        if !self.dir.exists() {
            return;
        }
        if let Ok(b) = serde_json::to_vec_pretty(&self.p) {
            let tmp = self.dir.join(".vm.json.tmp");
            if std::fs::write(&tmp, b).is_ok() {
                let _ = std::fs::rename(tmp, self.dir.join(files::STATE));
            }
        }
    }

    fn publish(&mut self) {
        // One borrow, released before anything else: a watch's lock lets
        // no new reader in while its sender waits to write, so a second
        // borrow in the same statement (its guard lives to the `;`) would
        // wait forever on the guest task's write, and that on the first.
        let seen = self.ready.borrow().clone();
        let report = VmReport {
            id: self.id,
            state: self.p.observed,
            generation: 0,
            desired_generation: self.p.applied,
            reason: self.p.reason.clone(),
            ports: self.p.ports.clone(),
            agent_version: seen.as_ref().map(|r| r.version.clone()),
            execution: self
                .inst
                .as_ref()
                .and_then(|_| self.shared.execution(&self.p.spec.image.arch)),
            cloud_init: seen.as_ref().map(|r| r.cloud_init),
            network: self.network(),
        };
        let mut reports = match self.shared.reports.lock() {
            Ok(r) => r,
            Err(_) => return,
        };
        let changed = reports.get(&self.id).is_none_or(|old| {
            old.state != report.state
                || old.desired_generation != report.desired_generation
                || old.reason != report.reason
                || old.agent_version != report.agent_version
                || old.execution != report.execution
                || old.cloud_init != report.cloud_init
                || old.ports.len() != report.ports.len()
                || old.network != report.network
        });
        if changed {
            if reports
                .get(&self.id)
                .is_none_or(|old| old.state != report.state)
            {
                tracing::info!(vm = %self.id, state = %report.state, applied = report.desired_generation, "VM observed");
            }
            self.generation = self.shared.generations.next();
            reports.insert(
                self.id,
                VmReport {
                    generation: self.generation,
                    ..report
                },
            );
            drop(reports);
            self.save();
            self.shared.wake.notify_one();
        }
    }

    /// How the VM is connected, once it was started here.
    fn network(&self) -> Option<VmNetwork> {
        if let Some(a) = &self.p.net {
            return Some(VmNetwork {
                mode: Some("bridge".into()),
                addresses: vec![a.address.to_string()],
                bridge: byteport_types::net::Subnet::parse(&a.cidr)
                    .map(|s| crate::bridge::bridge_name(&s)),
            });
        }
        (!self.p.ports.is_empty()).then(|| VmNetwork {
            mode: Some("user".into()),
            // QEMU's DHCP gives a user-mode guest its first address.
            addresses: vec!["10.0.2.15".into()],
            bridge: None,
        })
    }

    fn set(&mut self, observed: ObservedState, reason: Option<String>) {
        self.p.observed = observed;
        self.p.reason = reason;
    }

    /// Runs until the VM is deleted, or the agent drops the sender.
    pub async fn run(mut self, mut rx: watch::Receiver<DesiredVm>) {
        if let (Some(b), Some(a)) = (&self.shared.bridge, &self.p.net)
            && let Err(e) = b.attach(a.clone())
        {
            tracing::warn!(vm = %self.id, error = %e, "cannot restore the VM's network");
        }
        if self.dir.join(files::STATE).exists() {
            if let Some(i) = self.shared.driver.adopt(&self.dir).await {
                tracing::info!(vm = %self.id, pid = ?i.pid(), "re-adopted a running VM");
                self.inst = Some(i);
                self.booted_before_adoption = matches!(
                    self.p.observed,
                    ObservedState::Running | ObservedState::Paused
                );
                self.shared.net.adopt(self.id, &self.p.ports);
                self.watch_guest();
            } else {
                self.shared.net.adopt(self.id, &self.p.ports);
            }
        }
        loop {
            let next = self.step().await;
            self.publish();
            let wait = match next {
                Next::Again => continue,
                Next::Done => return,
                Next::Wait(d) => d,
            };
            enum Woke {
                Spec(bool),
                Other,
            }
            let inst = &self.inst;
            let ready_wake = &mut self.ready_wake;
            let exited = async {
                match inst {
                    Some(i) => i.exited().await,
                    None => std::future::pending().await,
                }
            };
            let woke = tokio::select! {
                changed = rx.changed() => Woke::Spec(changed.is_ok()),
                _ = exited => Woke::Other,
                _ = ready_wake.changed() => Woke::Other,
                _ = tokio::time::sleep(wait) => Woke::Other,
            };
            match woke {
                Woke::Spec(false) => return,
                Woke::Spec(true) => self.p.spec = rx.borrow_and_update().clone(),
                Woke::Other => {}
            }
        }
    }

    /// Connects to the guest agent in the background (or reuses the open
    /// connection: QEMU serves one client per socket) and records `ready`.
    fn watch_guest(&mut self) {
        if !self.p.spec.image.has_agent {
            // No agent: exec goes over SSH as the image's login user,
            // with the node's key that the metadata service hands it.
            if let (Some(user), Ok(mut u)) = (
                self.p.spec.image.login_user.clone(),
                self.shared.ssh_users.lock(),
            ) {
                u.insert(self.id, user);
            }
            return;
        }
        if let Some(t) = self.guest_task.take() {
            t.abort();
        }
        self.ready_tx.send_replace(None);
        let existing = self
            .shared
            .guests
            .lock()
            .ok()
            .and_then(|mut g| g.remove(&self.id))
            .or_else(|| self.conn.take())
            .filter(|c| !c.is_closed());
        let path = self.dir.join(files::AGENT);
        let tx = self.ready_tx.clone();
        let shared = self.shared.clone();
        let id = self.id;
        let (conn_tx, conn_rx) = tokio::sync::oneshot::channel();
        self.pending_conn = Some(conn_rx);
        self.guest_task = Some(tokio::spawn(async move {
            let started = Instant::now();
            let mut conn = existing;
            while started.elapsed() < AGENT_TIMEOUT {
                let c = match conn.take().filter(|c| !c.is_closed()) {
                    Some(c) => c,
                    None => match GuestConn::connect_unix(&path).await {
                        Ok(c) => c,
                        Err(_) => {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                };
                match c
                    .hello(AGENT_TIMEOUT.saturating_sub(started.elapsed()))
                    .await
                {
                    Ok(r) => {
                        if let Ok(mut g) = shared.guests.lock() {
                            g.insert(id, c.clone());
                        }
                        let _ = conn_tx.send(c.clone());
                        tx.send_replace(Some(AgentSeen {
                            version: agent_version(&r.version),
                            cloud_init: CloudInit::Running,
                        }));
                        let outcome = cloud_init_outcome(&c).await;
                        tracing::info!(vm = %id, cloud_init = outcome.as_str(), "cloud-init outcome");
                        tx.send_modify(|seen| {
                            if let Some(seen) = seen {
                                seen.cloud_init = outcome;
                            }
                        });
                        return;
                    }
                    Err(e) => {
                        tracing::debug!(vm = %id, error = %e, "guest agent not ready yet");
                        c.close();
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        }));
    }

    fn forget_guest(&mut self) {
        self.booted_before_adoption = false;
        if let Some(t) = self.guest_task.take() {
            t.abort();
        }
        if let Ok(mut u) = self.shared.ssh_users.lock() {
            u.remove(&self.id);
        }
        self.ready_tx.send_replace(None);
        if let Ok(mut g) = self.shared.guests.lock()
            && let Some(c) = g.remove(&self.id)
        {
            c.close();
        }
        if let Some(c) = self.conn.take() {
            c.close();
        }
        self.pending_conn = None;
    }

    async fn step(&mut self) -> Next {
        if let Some(rx) = self.pending_conn.as_mut()
            && let Ok(c) = rx.try_recv()
        {
            self.conn = Some(c);
            self.pending_conn = None;
        }
        let want_gen = self.p.spec.desired_generation;
        match self.p.spec.desired_state {
            DesiredState::Deleted => {
                if let Some(i) = self.inst.take()
                    && let Err(e) = i.kill().await
                {
                    self.set(ObservedState::Error, Some(e.to_string()));
                    return Next::Wait(Duration::from_secs(2));
                }
                self.forget_guest();
                let _ = tokio::fs::remove_dir_all(&self.dir).await;
                self.shared.net.release(self.id);
                self.shared.cgroups.remove(self.id);
                if let (Some(b), Some(_)) = (&self.shared.bridge, self.p.net.take())
                    && let Err(e) = b.detach(self.id)
                {
                    tracing::warn!(vm = %self.id, error = %e, "cannot remove the VM's network");
                }
                self.p.applied = want_gen;
                self.set(ObservedState::Deleted, None);
                Next::Done
            }
            DesiredState::Stopped => {
                if let Some(i) = &self.inst {
                    match i.state().await {
                        RunState::Exited { .. } => {}
                        _ => match self.stop_deadline {
                            None => {
                                let _ = i.powerdown().await;
                                self.stop_deadline =
                                    Some(Instant::now() + self.shared.stop_timeout);
                                return Next::Wait(Duration::from_millis(500));
                            }
                            Some(t) if Instant::now() < t => {
                                return Next::Wait(Duration::from_millis(500));
                            }
                            Some(_) => {
                                tracing::info!(vm = %self.id, "the guest ignored the power button; quitting QEMU");
                                let _ = i.kill().await;
                            }
                        },
                    }
                }
                self.inst = None;
                self.stop_deadline = None;
                self.forget_guest();
                self.shared.cgroups.remove(self.id);
                self.p.applied = want_gen;
                self.p.failed = None;
                self.set(ObservedState::Stopped, None);
                Next::Wait(Duration::from_secs(30))
            }
            DesiredState::Running | DesiredState::Paused => self.step_up(want_gen).await,
        }
    }

    async fn step_up(&mut self, want_gen: u64) -> Next {
        self.stop_deadline = None;
        if self.p.failed == Some(want_gen) {
            return Next::Wait(Duration::from_secs(30));
        }
        let state = match &self.inst {
            Some(i) => Some(i.state().await),
            None => None,
        };
        match state {
            Some(RunState::Exited { reason, clean }) => {
                // It went away by itself while it should run.
                self.inst = None;
                self.forget_guest();
                self.shared.cgroups.remove(self.id);
                self.p.applied = want_gen;
                self.p.failed = Some(want_gen);
                if clean {
                    self.set(ObservedState::Stopped, Some(reason));
                } else {
                    tracing::warn!(vm = %self.id, %reason, "VM process died");
                    self.set(ObservedState::Error, Some(reason));
                }
                Next::Wait(Duration::from_secs(30))
            }
            None => {
                self.set(ObservedState::Provisioning, None);
                self.publish();
                match self.start().await {
                    Ok(()) => Next::Again,
                    Err(e) => {
                        tracing::warn!(vm = %self.id, error = %e, "VM did not start");
                        self.p.applied = want_gen;
                        self.p.failed = Some(want_gen);
                        self.set(ObservedState::Error, Some(e));
                        Next::Wait(Duration::from_secs(30))
                    }
                }
            }
            Some(run) => {
                let Some(i) = &self.inst else {
                    return Next::Again;
                };
                if self.p.spec.restart && self.p.applied < want_gen {
                    if let Err(e) = i.reset().await {
                        self.set(ObservedState::Error, Some(e.to_string()));
                        return Next::Wait(Duration::from_secs(2));
                    }
                    self.p.applied = want_gen;
                    self.booted_before_adoption = false;
                    self.watch_guest();
                    self.set(ObservedState::Provisioning, None);
                    return Next::Wait(Duration::from_secs(1));
                }
                let want = self.p.spec.desired_state;
                let res = match (want, &run) {
                    (DesiredState::Running, RunState::Paused) => i.resume().await,
                    (DesiredState::Paused, RunState::Running) => i.pause().await,
                    _ => Ok(()),
                };
                if let Err(e) = res {
                    self.set(ObservedState::Error, Some(e.to_string()));
                    return Next::Wait(Duration::from_secs(2));
                }
                let run = if matches!(
                    (want, &run),
                    (DesiredState::Running, RunState::Paused)
                        | (DesiredState::Paused, RunState::Running)
                ) {
                    i.state().await
                } else {
                    run
                };
                let booted = !self.p.spec.image.has_agent
                    || self.booted_before_adoption
                    || self.ready.borrow().is_some();
                let observed = match run {
                    RunState::Paused if booted => ObservedState::Paused,
                    RunState::Running if booted => ObservedState::Running,
                    RunState::Exited { .. } => return Next::Again,
                    _ => ObservedState::Provisioning,
                };
                let done = matches!(
                    (want, observed),
                    (DesiredState::Running, ObservedState::Running)
                        | (DesiredState::Paused, ObservedState::Paused)
                );
                if done {
                    self.p.applied = want_gen;
                }
                self.set(observed, None);
                Next::Wait(Duration::from_secs(if done { 5 } else { 1 }))
            }
        }
    }

    /// Fetches the image, makes the disk and the forwards, starts QEMU.
    async fn start(&mut self) -> Result<(), String> {
        let s = &self.shared;
        let spec = self.p.spec.clone();
        tokio::fs::create_dir_all(&self.dir)
            .await
            .map_err(|e| format!("cannot create the VM's directory: {e}"))?;
        let credential = s.credential();
        let main = s
            .images
            .ensure(&s.cp, &credential, &spec.image.sha256)
            .await?;
        let mut kernel = None;
        let mut initrd = None;
        if spec.image.boot == BootMode::Kernel {
            let k = spec
                .image
                .kernel_sha256
                .as_deref()
                .ok_or("the image boots a kernel but names none")?;
            kernel = Some(s.images.ensure(&s.cp, &credential, k).await?);
            if let Some(i) = &spec.image.initrd_sha256 {
                initrd = Some(s.images.ensure(&s.cp, &credential, i).await?);
            }
        }
        let base = match spec.image.format.as_str() {
            // The image is the initramfs; the VM gets a blank disk.
            "initramfs" => {
                initrd = Some(main.clone());
                None
            }
            f @ ("qcow2" | "raw") => Some((main.as_path(), f)),
            f => return Err(format!("image format {f} is not supported")),
        };
        let disk = self.dir.join(files::DISK);
        if !disk.exists() {
            crate::images::create_disk(&disk, base, spec.disk_gib).await?;
        }
        // The forwards it holds, when they are still the ones it wants
        // (stable for its life); the ports it no longer wants are given
        // back, and new ones found for those it now wants too.
        let mut wanted = FORWARDED.to_vec();
        wanted.extend(spec.guest_ports.iter().filter(|p| !FORWARDED.contains(p)));
        let mut have: Vec<u16> = self.p.ports.iter().map(|p| p.guest_port).collect();
        have.sort_unstable();
        let mut sorted = wanted.clone();
        sorted.sort_unstable();
        if have != sorted {
            let kept: Vec<PortForward> = self
                .p
                .ports
                .iter()
                .filter(|p| wanted.contains(&p.guest_port))
                .cloned()
                .collect();
            s.net.release(self.id);
            s.net.adopt(self.id, &kept);
            let missing: Vec<u16> = wanted
                .iter()
                .copied()
                .filter(|g| !kept.iter().any(|k| k.guest_port == *g))
                .collect();
            let mut ports = kept;
            ports.extend(s.net.allocate(self.id, &missing)?);
            ports.sort_by_key(|p| wanted.iter().position(|g| *g == p.guest_port));
            self.p.ports = ports;
        }
        // Its project's bridge where the node runs them; QEMU's restricted
        // user-mode network otherwise.
        let (tap, metadata_addr) = match (&s.bridge, &spec.network_cidr) {
            (Some(b), Some(cidr)) => {
                let address = match &self.p.net {
                    Some(a) if a.cidr == *cidr => a.address,
                    _ => std::net::Ipv4Addr::UNSPECIFIED,
                };
                let a = Attachment {
                    vm: self.id,
                    project: spec
                        .project_id
                        .unwrap_or(byteport_types::ProjectId(uuid::Uuid::nil())),
                    cidr: cidr.clone(),
                    address,
                    mac: guest_mac(spec.id),
                    tap: tap_name(self.id),
                    ports: self.p.ports.clone(),
                    egress: spec.egress,
                };
                let a = b.attach(a)?;
                self.p.net = Some(a);
                self.save();
                (Some(tap_name(self.id)), crate::bridge::METADATA_ADDR)
            }
            _ => (None, crate::network::USER_METADATA_ADDR),
        };
        let mut cmdline = spec
            .image
            .cmdline
            .clone()
            .unwrap_or_else(|| "console=ttyS0".into());
        cmdline.push_str(&format!(" byteport.hostname={}", spec.hostname));
        if spec.engine == Engine::Microvm {
            if !s.engines.iter().any(|e| e == Engine::Microvm.as_str()) {
                return Err("this node has no microvm engine".into());
            }
            if let Some(khz) = crate::driver::qemu::host_tsc_khz() {
                cmdline.push_str(&format!(" tsc_early_khz={khz}"));
            }
            // Its kernel uncompressed, booted at its PVH entry: the
            // bzImage's own decompression is most of a TCG boot.
            if let Some(k) = &kernel
                && let Some(v) = s.images.pvh_kernel(k).await
            {
                kernel = Some(v);
            }
        }
        // The NoCloud data source: `nocloud-net`, so that cloud-init runs
        // its network stages (plain `nocloud` skips them).
        let smbios_serial = spec.metadata_token.as_deref().map(|t| {
            format!(
                "ds=nocloud-net;s={}",
                crate::metadata::seed_url(metadata_addr, spec.id, t)
            )
        });
        let metadata_pipe = spec
            .metadata_token
            .as_ref()
            .filter(|_| tap.is_none())
            .map(|_| s.metadata_pipe.clone());
        let launch = LaunchSpec {
            dir: self.dir.clone(),
            name: spec.name.to_string(),
            uuid: spec.id.0,
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            disk,
            cmdline: kernel.as_ref().map(|_| cmdline),
            kernel,
            initrd,
            ports: self.p.ports.clone(),
            smbios_serial,
            metadata_pipe,
            tap,
            mac: guest_mac(spec.id),
            arch: spec.image.arch.clone(),
            engine: spec.engine,
            accel: s.accel_for(&spec.image.arch),
        };
        self.save();
        s.cgroups.create(self.id, spec.vcpus, spec.memory_mib)?;
        let started = Instant::now();
        let inst = s.driver.start(&launch).await.map_err(|e| e.to_string())?;
        if let Some(pid) = inst.pid()
            && let Err(e) = s.cgroups.attach(self.id, pid)
        {
            // A VM outside its limits is not started.
            let _ = inst.kill().await;
            return Err(format!("cannot put QEMU in the VM's cgroup: {e}"));
        }
        tracing::info!(vm = %self.id, pid = ?inst.pid(), ms = started.elapsed().as_millis() as u64, "VM started");
        self.inst = Some(inst);
        self.watch_guest();
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    //! The VM task against the fake driver: desired states in, driver calls
    //! and reports out. No QEMU, no guest agent (the image has none).
    use super::*;
    use crate::driver::fake::FakeDriver;
    use crate::images::ImageCache;
    use crate::network::UserNet;

    #[test]
    fn an_agent_version_is_passed_on_only_when_short_and_printable() {
        assert_eq!(agent_version("0.1.0"), "0.1.0");
        for bad in ["", "a\u{1b}[31mred", &"9".repeat(65), "tab\there", "é"] {
            assert_eq!(agent_version(bad), "(unreadable)", "{bad:?}");
        }
    }
    use crate::{Identity, Shared};
    use byteport_types::api::NodeImage;
    use byteport_types::{Name, NodeId};
    use std::sync::Mutex;

    const SHA: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

    pub(crate) fn shared(dir: &std::path::Path, driver: FakeDriver) -> Arc<Shared<FakeDriver>> {
        std::fs::create_dir_all(dir.join("images")).unwrap();
        // A cached "initramfs": the cache never downloads it.
        std::fs::write(dir.join("images").join(SHA), b"initramfs").unwrap();
        Arc::new(Shared {
            driver,
            cp: crate::client::ControlPlane::new(
                "http://127.0.0.1:9",
                byteport_trust::Trust::system(),
            ),
            identity: Identity {
                id: NodeId::new(),
                name: "n".into(),
                credential: "bpn_test".into(),
                server: String::new(),
            },
            images: ImageCache::new(dir.join("images")),
            net: UserNet::new("127.0.0.1".into(), 42000..=42099),
            bridge: None,
            cgroups: crate::cgroup::Cgroups::none(NodeId::new()),
            runs: crate::runs::Runs::new(
                crate::template::QemuCommand::new("qemu-system-x86_64"),
                crate::driver::Accel::Tcg,
                dir.join("runs"),
                "test",
                0,
                true,
            ),
            accel: crate::driver::Accel::Tcg,
            engines: vec!["qemu".into()],
            unavailable_engines: Vec::new(),
            platforms: crate::detect_platforms(
                std::path::Path::new("qemu-system-x86_64"),
                crate::driver::Accel::Tcg,
            ),
            vms_dir: dir.join("vms"),
            stop_timeout: Duration::from_millis(200),
            metadata_pipe: vec!["metadata-pipe".into(), "127.0.0.1:8123".into()],
            reports: Mutex::default(),
            generations: crate::generation::Generations::open(dir.join("report-generation")),
            guests: Mutex::default(),
            ssh_key: None,
            ssh_users: Mutex::default(),
            wake: tokio::sync::Notify::new(),
            orphans: Default::default(),
            remove_orphans: Default::default(),
            metadata_limits: byteport_types::rate::Buckets::new(20.0, 2.0),
        })
    }

    fn spec(state: DesiredState, generation: u64) -> DesiredVm {
        DesiredVm {
            id: VmId(uuid::Uuid::nil()),
            name: Name::parse("fake-1").unwrap(),
            desired_state: state,
            desired_generation: generation,
            restart: false,
            vcpus: 1,
            memory_mib: 64,
            disk_gib: 1,
            hostname: "fake-1".into(),
            image: NodeImage {
                name: Name::parse("tiny").unwrap(),
                format: "initramfs".into(),
                boot: BootMode::Disk,
                sha256: SHA.into(),
                kernel_sha256: None,
                initrd_sha256: None,
                cmdline: None,
                has_agent: false,
                arch: "x86_64".into(),
                login_user: None,
            },
            metadata_token: Some("tok-1".into()),
            project_id: None,
            network_cidr: None,
            guest_ports: Vec::new(),
            egress: Default::default(),
            engine: Default::default(),
        }
    }

    /// Waits until the VM's report satisfies `f`.
    async fn until(s: &Shared<FakeDriver>, what: &str, f: impl Fn(&VmReport) -> bool) -> VmReport {
        for _ in 0..400 {
            if let Some(r) = s
                .reports
                .lock()
                .unwrap()
                .get(&VmId(uuid::Uuid::nil()))
                .cloned()
                && f(&r)
            {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("never saw {what}; reports: {:?}", s.reports.lock().unwrap());
    }

    #[tokio::test]
    async fn desired_states_drive_the_driver_and_reports_follow() {
        if skip_without_qemu_img() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let fake = FakeDriver::default();
        let s = shared(dir.path(), fake.clone());
        let (tx, rx) = watch::channel(spec(DesiredState::Running, 1));
        let task = tokio::spawn(VmTask::new(s.clone(), spec(DesiredState::Running, 1)).run(rx));

        let r = until(&s, "running", |r| r.state == ObservedState::Running).await;
        assert_eq!(r.desired_generation, 1);
        assert_eq!(r.ports.len(), 1, "ssh is forwarded");
        assert!(
            dir.path()
                .join("vms")
                .join(VmId(uuid::Uuid::nil()).to_string())
                .join("disk.qcow2")
                .exists()
        );

        tx.send_replace(spec(DesiredState::Paused, 2));
        let r = until(&s, "paused", |r| r.state == ObservedState::Paused).await;
        assert_eq!(r.desired_generation, 2);
        tx.send_replace(spec(DesiredState::Running, 3));
        until(&s, "running again", |r| {
            r.state == ObservedState::Running && r.desired_generation == 3
        })
        .await;

        let mut restart = spec(DesiredState::Running, 4);
        restart.restart = true;
        tx.send_replace(restart);
        until(&s, "restarted", |r| r.desired_generation == 4).await;

        tx.send_replace(spec(DesiredState::Stopped, 5));
        until(&s, "stopped", |r| {
            r.state == ObservedState::Stopped && r.desired_generation == 5
        })
        .await;

        tx.send_replace(spec(DesiredState::Deleted, 6));
        until(&s, "deleted", |r| r.state == ObservedState::Deleted).await;
        task.await.unwrap();
        assert!(
            !dir.path()
                .join("vms")
                .join(VmId(uuid::Uuid::nil()).to_string())
                .exists()
        );
        assert_eq!(
            fake.calls(),
            [
                "start fake-1",
                "pause fake-1",
                "resume fake-1",
                "reset fake-1",
                "powerdown fake-1",
            ]
        );
    }

    #[tokio::test]
    async fn a_crash_is_an_error_with_the_reason_and_is_not_restarted_on_its_own() {
        if skip_without_qemu_img() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let fake = FakeDriver::default();
        let s = shared(dir.path(), fake.clone());
        let (tx, rx) = watch::channel(spec(DesiredState::Running, 1));
        let _task = tokio::spawn(VmTask::new(s.clone(), spec(DesiredState::Running, 1)).run(rx));
        until(&s, "running", |r| r.state == ObservedState::Running).await;
        fake.crash(
            &dir.path()
                .join("vms")
                .join(VmId(uuid::Uuid::nil()).to_string()),
        );
        let r = until(&s, "error", |r| r.state == ObservedState::Error).await;
        assert!(
            r.reason.as_deref().unwrap_or_default().contains("signal 9"),
            "{r:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(fake.calls(), ["start fake-1"], "no automatic restart");
        // A start (a new desired generation) starts it again.
        tx.send_replace(spec(DesiredState::Running, 2));
        until(&s, "running again", |r| {
            r.state == ObservedState::Running && r.desired_generation == 2
        })
        .await;
        assert_eq!(fake.calls(), ["start fake-1", "start fake-1"]);
    }

    pub(crate) fn skip_without_qemu_img() -> bool {
        let found = std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("qemu-img").is_file()));
        if found {
            return false;
        }
        assert!(
            std::env::var("BYTEPORT_REQUIRE_QEMU").as_deref() != Ok("1"),
            "qemu-img is not installed, and BYTEPORT_REQUIRE_QEMU=1"
        );
        eprintln!(
            "SKIP: qemu-img is not installed (the task makes a real disk); `cargo xtask test` runs this for real"
        );
        true
    }

    /// A real agent on a socketpair, running `ls` and `cat` on this host.
    fn agent_conn() -> GuestConn {
        use byteport_guest::agent::{self, OnEof};
        let (guest, host) = std::os::unix::net::UnixStream::pair().unwrap();
        let writer = guest.try_clone().unwrap();
        std::thread::spawn(move || agent::serve(guest, writer, OnEof::Return));
        host.set_nonblocking(true).unwrap();
        let (r, w) = tokio::net::UnixStream::from_std(host).unwrap().into_split();
        GuestConn::new(r, w)
    }

    #[tokio::test]
    async fn the_agent_says_where_cloud_init_is() {
        let conn = agent_conn();
        let here = cloud_init_of(CloudInitStatus::read(std::path::Path::new(CLOUD_INIT_RUN)));
        if here == CloudInit::Running {
            eprintln!("SKIP: cloud-init is still running on this host");
            return;
        }
        assert_eq!(cloud_init_outcome(&conn).await, here);
    }

    #[tokio::test]
    async fn an_older_agent_gets_cloud_init_listed() {
        let conn = agent_conn();
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path().join("cloud-init");
        let dir = run.display().to_string();
        // No directory: the guest has no cloud-init.
        assert_eq!(cloud_init_by_listing(&conn, &dir).await, CloudInit::Absent);
        std::fs::create_dir(&run).unwrap();
        std::fs::write(run.join("disabled"), "").unwrap();
        assert_eq!(cloud_init_by_listing(&conn, &dir).await, CloudInit::Absent);
        std::fs::remove_file(run.join("disabled")).unwrap();
        std::fs::write(run.join("enabled"), "").unwrap();
        // Enabled and still running: it keeps waiting, then sees the end.
        let waiting = tokio::spawn({
            let conn = conn.clone();
            let dir = dir.clone();
            async move { cloud_init_by_listing(&conn, &dir).await }
        });
        tokio::time::sleep(CLOUD_INIT_POLL * 2).await;
        assert!(!waiting.is_finished(), "it must wait while cloud-init runs");
        std::fs::write(
            run.join("result.json"),
            r#"{"v1": {"datasource": "DataSourceNoCloudNet", "errors": []}}"#,
        )
        .unwrap();
        let done = tokio::time::timeout(CLOUD_INIT_POLL * 5, waiting).await;
        assert_eq!(done.unwrap().unwrap(), CloudInit::Done);
        std::fs::write(
            run.join("result.json"),
            r#"{"v1": {"datasource": null, "errors": ["('scripts_user', RuntimeError())"]}}"#,
        )
        .unwrap();
        assert_eq!(cloud_init_by_listing(&conn, &dir).await, CloudInit::Error);
    }
}
