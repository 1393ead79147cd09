//! Background work of the control plane: reconcilers that are idempotent
//! and safe to run at any time, on any replica. For now: placing the VMs
//! that wait for a node.

use crate::app::App;
use std::time::Duration;

/// How often waiting VMs are offered to the scheduler again.
pub const PLACEMENT_INTERVAL: Duration = Duration::from_secs(2);

/// Starts the reconcilers; they run until the runtime stops.
pub fn spawn(app: App) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(PLACEMENT_INTERVAL);
        loop {
            tick.tick().await;
            match app.place_pending().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(placed = n, "placed waiting VMs"),
                Err(e) => tracing::warn!(error = %e, "placement pass failed"),
            }
        }
    })
}
