//! The event stream behind `GET /v1/events`: VM changes the caller may see
//! and, for admins, node changes.
//!
//! One feed per replica reads the database for every stream: once a
//! second it reads the VM rows whose `updated_at` moved (and, while an
//! admin's stream is open, the node list), turns each into the event's
//! JSON once, and hands the batch to every open stream, which keeps what
//! its caller may see. A thousand open streams cost the database what one
//! does. Polling the shared database (rather than only listening to this
//! process) is what makes a change written by any control-plane replica
//! on the same PostgreSQL reach every stream. A change made by this
//! replica also wakes the feed at once through the in-process
//! notification that `wait` uses. The feed runs while a stream is open.
//!
//! Rows are read in (updated_at, id) order, page by page, so a burst of
//! more changes than a page with one timestamp is read through, never the
//! same page again. The window looks [`OVERLAP`] back past the newest change
//! already seen,
//! so a row written by a replica whose clock lags a little, or committed a
//! moment after its `updated_at` was taken, is still caught; a per-VM
//! record of the last `updated_at` sent keeps that overlap from repeating
//! events.
//!
//! A stream that falls [`FEED_QUEUE`] batches behind is ended: its client
//! reconnects and reads the lists again (the console does), rather than
//! the feed waiting for it or keeping its backlog.

use super::{App, Ctx};
use crate::error::{AppError, AppResult};
use byteport_store::{node, vm};
use byteport_types::ProjectId;
use byteport_types::api::{Event, VmStateCount};
use chrono::{DateTime, TimeDelta, Utc};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::broadcast;
use uuid::Uuid;

/// How far behind the newest seen change each poll looks again.
pub const OVERLAP: TimeDelta = TimeDelta::seconds(5);
/// How often the feed looks at the database.
pub const POLL: Duration = Duration::from_secs(1);
/// VM changes read per page; a poll reads up to [`PAGES`] pages.
pub const BATCH: u64 = 500;
/// Pages per poll: more changes than that resume at the next poll, from
/// where this one stopped.
const PAGES: usize = 10;
/// Batches kept for a stream that has not taken them yet.
pub const FEED_QUEUE: usize = 64;

/// A node's status and figures: a node event is sent when they change.
type NodeKey = (String, [i64; 9]);

/// What one poll of the feed found, each event already JSON.
pub(crate) struct Changes {
    /// Changed VMs: their project, and the event.
    vms: Vec<(Uuid, Arc<str>)>,
    /// Every node, when an admin's stream was open at the poll.
    nodes: Option<Vec<(Uuid, NodeKey, Arc<str>)>>,
}

/// The replica's one reader of changes, shared by its streams.
pub(crate) struct EventFeed {
    tx: broadcast::Sender<Arc<Changes>>,
    /// Whether the feed's task runs; it ends when no stream is left.
    running: Mutex<bool>,
    /// Admins' streams open: nodes are read only while there is one.
    admins: AtomicUsize,
}

impl Default for EventFeed {
    fn default() -> EventFeed {
        EventFeed {
            tx: broadcast::channel(FEED_QUEUE).0,
            running: Mutex::new(false),
            admins: AtomicUsize::new(0),
        }
    }
}

/// Where the feed has read to.
struct FeedCursor {
    high: DateTime<Utc>,
    /// Where a poll that hit [`PAGES`] stopped, for the next to go on from.
    resume: Option<(DateTime<Utc>, Uuid)>,
    sent: HashMap<Uuid, DateTime<Utc>>,
    /// Each node's event as last made, remade only when its figures change.
    nodes: HashMap<Uuid, (NodeKey, Arc<str>)>,
}

/// One open stream: what its caller may see, and what it has been sent.
pub struct EventCursor {
    /// Holds one of the user's open streams until the stream ends.
    _slot: StreamSlot,
    feed: Arc<EventFeed>,
    rx: broadcast::Receiver<Arc<Changes>>,
    admin: bool,
    /// The caller's projects (every project for admins).
    projects: BTreeMap<Uuid, String>,
    nodes: HashMap<Uuid, NodeKey>,
}

impl Drop for EventCursor {
    fn drop(&mut self) {
        if self.admin {
            self.feed.admins.fetch_sub(1, Ordering::Relaxed);
        }
    }
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
    /// reconnects, which checks the credential again). It gets every
    /// change the feed reads from now on.
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
        let (_, projects) = self.visible_projects(ctx).await?;
        let feed = self.event_feed.clone();
        if admin {
            feed.admins.fetch_add(1, Ordering::Relaxed);
        }
        let rx = {
            let mut running = feed.running.lock().unwrap_or_else(|e| e.into_inner());
            let rx = feed.tx.subscribe();
            if !*running {
                *running = true;
                tokio::spawn(self.clone().feed_run());
            }
            rx
        };
        Ok(EventCursor {
            _slot: slot,
            feed,
            rx,
            admin,
            projects,
            nodes: HashMap::new(),
        })
    }

    /// Open event streams on this replica.
    pub fn event_streams_open(&self) -> usize {
        self.event_feed.tx.receiver_count()
    }

    /// The next events for this stream, waiting for the feed's next batch;
    /// `None` once the stream has fallen too far behind to go on.
    pub async fn events_next(&self, c: &mut EventCursor) -> Option<Vec<Arc<str>>> {
        let batch = match c.rx.recv().await {
            Ok(b) => b,
            Err(broadcast::error::RecvError::Lagged(_) | broadcast::error::RecvError::Closed) => {
                return None;
            }
        };
        let mut out = Vec::new();
        for (project, json) in &batch.vms {
            if c.admin || c.projects.contains_key(project) {
                out.push(json.clone());
            }
        }
        if c.admin
            && let Some(nodes) = &batch.nodes
        {
            for (id, key, json) in nodes {
                if c.nodes.get(id) != Some(key) {
                    c.nodes.insert(*id, key.clone());
                    out.push(json.clone());
                }
            }
        }
        Some(out)
    }

    /// The feed: polls while any stream is open, then ends.
    async fn feed_run(self) {
        let feed = self.event_feed.clone();
        let mut wake = self.vm_changes.subscribe();
        let mut cur = FeedCursor {
            high: Utc::now(),
            resume: None,
            sent: HashMap::new(),
            nodes: HashMap::new(),
        };
        loop {
            tokio::select! {
                _ = tokio::time::sleep(POLL) => {}
                r = wake.recv() => {
                    if matches!(r, Err(broadcast::error::RecvError::Closed)) {
                        tokio::time::sleep(POLL).await;
                    }
                    // Let the rest of a burst land before reading.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            {
                let mut running = feed.running.lock().unwrap_or_else(|e| e.into_inner());
                if feed.tx.receiver_count() == 0 {
                    *running = false;
                    return;
                }
            }
            let changes = self
                .feed_poll(&mut cur, feed.admins.load(Ordering::Relaxed) > 0)
                .await;
            if !changes.vms.is_empty() || changes.nodes.is_some() {
                let _ = feed.tx.send(Arc::new(changes));
            }
        }
    }

    /// What changed since the last poll. A read that fails is logged and
    /// the cursor stays where it is, so the next poll reads it again.
    async fn feed_poll(&self, c: &mut FeedCursor, nodes: bool) -> Changes {
        let mut vms = Vec::new();
        let mut after = c.resume.take().unwrap_or((c.high - OVERLAP, Uuid::nil()));
        for page in 0..PAGES {
            let rows = match self.store.vm_list_changed(None, after, BATCH).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "the event feed could not read VM changes; retrying");
                    c.resume = Some(after);
                    break;
                }
            };
            for v in &rows {
                if c.sent.get(&v.id) == Some(&v.updated_at) {
                    continue;
                }
                match self.vm_event(v).await {
                    Ok(json) => vms.push((v.project_id, json)),
                    Err(e) => {
                        tracing::warn!(vm = %v.id, error = %e, "a VM change left out of the events")
                    }
                }
                c.sent.insert(v.id, v.updated_at);
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

        let nodes = if nodes {
            match self.store.node_list().await {
                Ok(list) => {
                    let mut made = HashMap::with_capacity(list.len());
                    let mut out = Vec::with_capacity(list.len());
                    for n in &list {
                        let key = node_key(n);
                        let json = match c.nodes.remove(&n.id) {
                            Some((k, json)) if k == key => json,
                            _ => match node_event(n) {
                                Some(j) => j,
                                None => continue,
                            },
                        };
                        out.push((n.id, key.clone(), json.clone()));
                        made.insert(n.id, (key, json));
                    }
                    c.nodes = made;
                    Some(out)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the event feed could not read the nodes; retrying");
                    None
                }
            }
        } else {
            None
        };
        Changes { vms, nodes }
    }

    async fn vm_event(&self, v: &vm::Model) -> AppResult<Arc<str>> {
        let project = self.project_name(ProjectId(v.project_id)).await?;
        let e = Event::Vm(Box::new(super::vms::vm_view(v, &project)?));
        Ok(serde_json::to_string(&e)
            .map_err(AppError::internal)?
            .into())
    }
}

fn node_key(n: &node::Model) -> NodeKey {
    (
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
    )
}

fn node_event(n: &node::Model) -> Option<Arc<str>> {
    let view = super::nodes::node_view(n).ok()?;
    Some(
        serde_json::to_string(&Event::Node(Box::new(view)))
            .ok()?
            .into(),
    )
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
