//! The node's metadata relay: the HTTP listener a guest's cloud-init reads
//! its NoCloud documents from, passed on to the control plane with this
//! node's credential.
//!
//! A VM's data source (in its SMBIOS serial) is
//! `http://169.254.169.254/VM/TOKEN/` on a bridged network, where the
//! node's nftables DNAT that address to the relay on 127.0.0.1, and
//! `http://10.0.2.254/VM/TOKEN/` under user-mode networking (see
//! [`crate::network::USER_METADATA_ADDR`] for why not the usual address),
//! where QEMU hands each guest connection to a pipe program (`byteportd
//! metadata-pipe`) that joins it to the relay, the only way out of a
//! restricted guest. The relay answers only for VMs on this node and keeps
//! nothing: the control plane checks the token, rate-limits and audits.
//! The relay limits each guest too, before it forwards anything, so a guest
//! that asks in a loop costs the control plane nothing.

use crate::Shared;
use crate::driver::Driver;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use byteport_types::VmId;
use std::sync::Arc;

/// Binds the relay on `127.0.0.1:port`; port 0 takes the port this node
/// used before (kept in `metadata.port` in its data directory, since
/// running guests have it in their data source URL), else a free one.
pub async fn bind(
    data_dir: &std::path::Path,
    port: u16,
) -> std::io::Result<tokio::net::TcpListener> {
    let saved = data_dir.join("metadata.port");
    let want = match port {
        0 => std::fs::read_to_string(&saved)
            .ok()
            .and_then(|s| s.trim().parse::<u16>().ok())
            .unwrap_or(0),
        p => p,
    };
    let listener = match tokio::net::TcpListener::bind(("127.0.0.1", want)).await {
        Ok(l) => l,
        // The remembered port is taken: a new one serves new boots.
        Err(_) if port == 0 && want != 0 => tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?,
        Err(e) => return Err(e),
    };
    let bound = listener.local_addr()?.port();
    std::fs::write(&saved, format!("{bound}\n"))?;
    Ok(listener)
}

/// The data source URL of a VM, for its SMBIOS serial: the metadata
/// address of its network mode.
pub fn seed_url(addr: &str, vm: VmId, token: &str) -> String {
    format!("http://{addr}/{vm}/{token}/")
}

/// Serves the relay until the process ends.
pub async fn serve<D: Driver>(shared: Arc<Shared<D>>, listener: tokio::net::TcpListener) {
    let app = Router::new()
        .route("/{vm}/{token}/{document}", get(document::<D>))
        .fallback(|| async { StatusCode::NOT_FOUND })
        .with_state(shared);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "the metadata relay stopped");
    }
}

async fn document<D: Driver>(
    State(s): State<Arc<Shared<D>>>,
    Path((vm, token, document)): Path<(String, String, String)>,
) -> Response {
    let Ok(vm) = vm.parse::<VmId>() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let here = s
        .reports
        .lock()
        .map(|r| r.contains_key(&vm))
        .unwrap_or(false);
    if !here {
        return StatusCode::NOT_FOUND.into_response();
    }
    if !s.metadata_limits.take(vm) {
        tracing::debug!(vm = %vm, "metadata request over the guest's rate");
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, "1")],
            "too many metadata requests: slow down\n",
        )
            .into_response();
    }
    let id = &s.identity;
    match s
        .cp
        .metadata(id.id, &id.credential, vm, &token, &document)
        .await
    {
        Ok((status, body)) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
            let body = if status == StatusCode::OK && document == "meta-data" {
                with_node_key(&s, vm, body)
            } else {
                body
            };
            tracing::debug!(vm = %vm, document, status = status.as_u16(), "metadata request");
            (
                status,
                [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                body,
            )
                .into_response()
        }
        Err(e) => {
            tracing::warn!(vm = %vm, error = %e, "cannot relay a metadata request");
            StatusCode::BAD_GATEWAY.into_response()
        }
    }
}

/// A VM without the agent is reached over SSH with the node's key: its
/// meta-data (JSON) gets that key among its `public-keys`, so cloud-init
/// authorizes it for the login user. Any other VM's is passed as is.
fn with_node_key<D: Driver>(s: &Shared<D>, vm: VmId, body: Vec<u8>) -> Vec<u8> {
    let ssh = s.ssh_users.lock().is_ok_and(|u| u.contains_key(&vm));
    let (true, Some(key)) = (ssh, &s.ssh_key) else {
        return body;
    };
    let Ok(mut doc) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return body;
    };
    match doc.get_mut("public-keys").and_then(|k| k.as_array_mut()) {
        Some(keys) => keys.push(key.public.clone().into()),
        None => doc["public-keys"] = serde_json::json!([key.public]),
    }
    format!("{doc:#}\n").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use byteport_types::api::VmReport;
    use byteport_types::vm_state::ObservedState;

    #[tokio::test]
    async fn a_guest_asking_in_a_loop_is_held_back_before_anything_is_relayed() {
        let dir = tempfile::tempdir().unwrap();
        let s = crate::vm::tests::shared(dir.path(), Default::default());
        let vm = VmId::new();
        s.reports.lock().unwrap().insert(
            vm,
            VmReport {
                id: vm,
                state: ObservedState::Running,
                generation: 1,
                desired_generation: 1,
                reason: None,
                ports: Vec::new(),
                agent_version: None,
                execution: None,
                cloud_init: None,
                network: None,
            },
        );
        let mut codes = Vec::new();
        for _ in 0..30 {
            let path = Path((vm.to_string(), "tok".to_owned(), "meta-data".to_owned()));
            codes.push(document(State(s.clone()), path).await.status().as_u16());
        }
        // The control plane of this fixture is unreachable: each relayed
        // request is a 502; the ones past the burst never get that far.
        let relayed = codes.iter().filter(|c| **c == 502).count();
        assert_eq!(
            relayed,
            byteport_types::rate::METADATA_BURST as usize,
            "{codes:?}"
        );
        assert!(codes[relayed..].iter().all(|c| *c == 429), "{codes:?}");
        // Another guest is not held back.
        let other = VmId::new();
        let path = Path((other.to_string(), "tok".to_owned(), "meta-data".to_owned()));
        assert_eq!(
            document(State(s.clone()), path).await.status(),
            StatusCode::NOT_FOUND
        );
    }
}
