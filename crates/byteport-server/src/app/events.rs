//! The event stream behind `GET /v1/events`: VM changes the caller may see
//! and, for admins, node changes.
//!
//! Every stream polls the database once a second for VM rows whose
//! `updated_at` moved, and for admins compares the node list with what it
//! last sent. Polling the shared database (rather than only listening to
//! this process) is what makes a change written by any control-plane
//! replica on the same PostgreSQL reach every stream. A change made by
//! this replica also wakes its streams at once through the in-process
//! notification that `wait` uses.
//!
//! Rows are read in (updated_at, id) order, page by page, so a burst of
//! more changes than a page with one timestamp is read through, never the
//! same page again. The window looks [`OVERLAP`] back past the newest change
//! already seen,
//! so a row written by a replica whose clock lags a little, or committed a
//! moment after its `updated_at` was taken, is still caught; a per-VM
//! record of the last `updated_at` sent keeps that overlap from repeating
//! events.

use super::{App, Ctx};
use crate::error::{AppError, AppResult};
use byteport_types::api::{Event, VmStateCount};
use chrono::{DateTime, TimeDelta, Utc};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;
use uuid::Uuid;

/// How far behind the newest seen change each poll looks again.
pub const OVERLAP: TimeDelta = TimeDelta::seconds(5);
/// How often a stream looks at the database.
pub const POLL: Duration = Duration::from_secs(1);
/// VM changes read per page; a poll reads up to [`PAGES`] pages.
pub const BATCH: u64 = 500;
/// Pages per poll: more changes than that resume at the next poll, from
/// where this one stopped.
const PAGES: usize = 10;

/// What one stream has seen, and what its caller may see.
pub struct EventCursor {
    /// Holds one of the user's open streams until the stream ends.
    _slot: StreamSlot,
    admin: bool,
    /// The caller's projects (`None` for admins: all), with their names.
    projects: Option<Vec<Uuid>>,
    names: BTreeMap<Uuid, String>,
    high: DateTime<Utc>,
    /// Where a poll that hit [`PAGES`] stopped, for the next to go on from.
    resume: Option<(DateTime<Utc>, Uuid)>,
    sent: HashMap<Uuid, DateTime<Utc>>,
    nodes: HashMap<Uuid, (String, [i64; 9])>,
}

/// Event streams one user may hold open at once (browser tabs, scripts).
pub const MAX_STREAMS_PER_USER: usize = 32;

/// Open event streams per user, on this replica.
pub(crate) type StreamCounts = std::sync::Arc<std::sync::Mutex<HashMap<Uuid, usize>>>;

/// One open stream of a user's; given back when dropped.
pub(crate) struct StreamSlot {
    counts: StreamCounts,
    user: Uuid,
}

impl StreamSlot {
    fn take(counts: &StreamCounts, user: Uuid) -> Option<StreamSlot> {
        let mut m = counts.lock().ok()?;
        let n = m.entry(user).or_insert(0);
        if *n >= MAX_STREAMS_PER_USER {
            return None;
        }
        *n += 1;
        Some(StreamSlot {
            counts: counts.clone(),
            user,
        })
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        if let Ok(mut m) = self.counts.lock()
            && let Some(n) = m.get_mut(&self.user)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.user);
            }
        }
    }
}

impl App {
    /// Opens a stream for the caller: who they are and which projects they
    /// see are fixed now (a stream ends after a while and the browser
    /// reconnects, which checks the credential again).
    pub async fn events_open(&self, ctx: &Ctx) -> AppResult<EventCursor> {
        let (me, admin) = ctx.user()?;
        let slot = StreamSlot::take(&self.event_streams, me.0).ok_or_else(|| {
            AppError::RateLimited(
                format!(
                    "you have {MAX_STREAMS_PER_USER} event streams open already; close one first"
                ),
                5,
            )
        })?;
        let (projects, names) = self.visible_projects(ctx).await?;
        Ok(EventCursor {
            _slot: slot,
            admin,
            projects,
            names,
            high: Utc::now(),
            resume: None,
            sent: HashMap::new(),
            nodes: HashMap::new(),
        })
    }

    /// Waits for the next poll (or a change on this replica).
    pub async fn events_wait(&self, rx: &mut tokio::sync::broadcast::Receiver<Uuid>) {
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = rx.recv() => {
                // Let the rest of a burst land before reading.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// A receiver of this replica's VM change notifications.
    pub fn events_subscribe(&self) -> tokio::sync::broadcast::Receiver<Uuid> {
        self.vm_changes.subscribe()
    }

    /// What changed since the last call.
    pub async fn events_poll(&self, c: &mut EventCursor) -> AppResult<Vec<Event>> {
        let mut out = Vec::new();
        let mut after = c.resume.take().unwrap_or((c.high - OVERLAP, Uuid::nil()));
        for page in 0..PAGES {
            let rows = self
                .store
                .vm_list_changed(c.projects.as_deref(), after, BATCH)
                .await?;
            for v in &rows {
                if c.sent.get(&v.id) == Some(&v.updated_at) {
                    continue;
                }
                let project = match c.names.get(&v.project_id) {
                    Some(n) => n.clone(),
                    // A project made after the stream opened (admins see all).
                    None if c.admin => {
                        let p = self.store.project_fetch(v.project_id).await?;
                        c.names.insert(p.id, p.name.clone());
                        p.name
                    }
                    None => continue,
                };
                c.sent.insert(v.id, v.updated_at);
                out.push(Event::Vm(Box::new(super::vms::vm_view(v, &project)?)));
            }
            let Some(last) = rows.last() else { break };
            after = (last.updated_at, last.id);
            c.high = c.high.max(last.updated_at);
            if (rows.len() as u64) < BATCH {
                break;
            }
            if page + 1 == PAGES {
                c.resume = Some(after);
            }
        }
        let floor = c.high - OVERLAP;
        c.sent.retain(|_, at| *at > floor);

        if c.admin {
            for n in self.store.node_list().await? {
                let key = (
                    n.status.clone(),
                    [
                        n.cap_vcpus,
                        n.cap_memory_mib,
                        n.cap_disk_gib,
                        n.used_vcpus,
                        n.used_memory_mib,
                        n.used_disk_gib,
                        n.reserved_vcpus,
                        n.reserved_memory_mib,
                        n.reserved_disk_gib,
                    ],
                );
                if c.nodes.get(&n.id) != Some(&key) {
                    c.nodes.insert(n.id, key);
                    out.push(Event::Node(Box::new(super::nodes::node_view(&n)?)));
                }
            }
        }
        Ok(out)
    }
}

impl App {
    /// The caller's live VMs by state (every project for admins), for the
    /// dashboard: one query, however many VMs there are.
    pub async fn vm_state_counts(&self, ctx: &Ctx) -> AppResult<Vec<VmStateCount>> {
        let (projects, _) = self.visible_projects(ctx).await?;
        let mut out = Vec::new();
        for (state, n) in self.store.vm_count_by_state_in(projects.as_deref()).await? {
            out.push(VmStateCount {
                state: state.parse().map_err(|_| {
                    crate::error::AppError::internal(format!("bad stored state {state:?}"))
                })?,
                count: super::to_u64(n),
            });
        }
        out.sort_by_key(|c| c.state as u8);
        Ok(out)
    }
}
