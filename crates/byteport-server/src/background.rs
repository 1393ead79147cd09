//! Background work of the control plane: reconcilers that are idempotent
//! and safe to run at any time, on any replica: placing the VMs that wait
//! for a node, marking silent nodes offline, deleting environments whose
//! lifetime ended, recounting nodes' reservations from their VMs, and
//! removing idempotency keys and audit events past their time.

use crate::app::App;
use std::time::Duration;

/// How often waiting VMs are offered to the scheduler again.
pub const PLACEMENT_INTERVAL: Duration = Duration::from_secs(2);

/// How often every node's reservations are recounted from its VMs.
pub const RECOUNT_INTERVAL: Duration = Duration::from_secs(60);

/// A node that sends no heartbeat for this long is offline.
pub const NODE_TIMEOUT: Duration = Duration::from_secs(30);

/// Starts the reconcilers; they run until the runtime stops.
pub fn spawn(app: App) -> tokio::task::JoinHandle<()> {
    spawn_with(app, NODE_TIMEOUT)
}

/// Like [`spawn`], with the offline timeout given.
pub fn spawn_with(app: App, node_timeout: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(PLACEMENT_INTERVAL);
        let mut recounted = tokio::time::Instant::now();
        loop {
            tick.tick().await;
            if recounted.elapsed() >= RECOUNT_INTERVAL {
                recounted = tokio::time::Instant::now();
                if let Err(e) = app.reservations_recount().await {
                    tracing::warn!(error = %e, "reservation recount failed");
                }
                if let Err(e) = app.store.idem_expire().await {
                    tracing::warn!(error = %e, "expiring idempotency keys failed");
                }
                match app.audit_expire().await {
                    Ok(0) => {}
                    Ok(n) => {
                        tracing::info!(removed = n, "removed audit events past their retention")
                    }
                    Err(e) => tracing::warn!(error = %e, "expiring audit events failed"),
                }
            }
            if let Err(e) = app.nodes_mark_stale(node_timeout).await {
                tracing::warn!(error = %e, "offline check failed");
            }
            match app.env_reap().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(deleted = n, "deleted expired environments"),
                Err(e) => tracing::warn!(error = %e, "environment lifetime check failed"),
            }
            match app.place_pending().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(placed = n, "placed waiting VMs"),
                Err(e) => tracing::warn!(error = %e, "placement pass failed"),
            }
        }
    })
}
