//! The node's client of the control plane: registration, heartbeats and
//! image downloads over HTTP, all dialed by the node. The blocking HTTP
//! client runs on tokio's blocking pool.

use byteport_types::api::{ErrorBody, Heartbeat, HeartbeatResponse, NodeRegister, NodeRegistered};
use byteport_types::{NodeId, VmId};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Duration;

/// What talking to the control plane can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The control plane answered with an error.
    #[error("the control plane answered {status}: {message}")]
    Api { status: u16, message: String },
    #[error("cannot reach the control plane: {0}")]
    Transport(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A failed connection, with what to do about an untrusted certificate.
fn transport(e: impl std::fmt::Display) -> ClientError {
    let text = e.to_string();
    match byteport_trust::hint(&text) {
        Some(h) => ClientError::Transport(format!("{text} ({h})")),
        None => ClientError::Transport(text),
    }
}

/// The control plane, as this node reaches it.
#[derive(Clone)]
pub struct ControlPlane {
    agent: ureq::Agent,
    base: String,
    trust: byteport_trust::Trust,
}

impl ControlPlane {
    pub fn new(base: &str, trust: byteport_trust::Trust) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(5)))
            .tls_config(trust.ureq())
            .build()
            .into();
        ControlPlane {
            agent,
            base: base.trim_end_matches('/').to_owned(),
            trust,
        }
    }

    /// The roots the control plane's certificate is checked against.
    pub fn trust(&self) -> &byteport_trust::Trust {
        &self.trust
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// The WebSocket URL of this node's channel.
    pub fn channel_url(&self, id: NodeId) -> String {
        let base = if let Some(rest) = self.base.strip_prefix("https://") {
            format!("wss://{rest}")
        } else if let Some(rest) = self.base.strip_prefix("http://") {
            format!("ws://{rest}")
        } else {
            self.base.clone()
        };
        format!("{base}/v1/nodes/{id}/channel")
    }

    async fn post<B, T>(
        &self,
        path: String,
        credential: Option<String>,
        body: B,
    ) -> Result<T, ClientError>
    where
        B: Serialize + Send + 'static,
        T: DeserializeOwned + Send + 'static,
    {
        let agent = self.agent.clone();
        let url = format!("{}{path}", self.base);
        tokio::task::spawn_blocking(move || {
            let mut req = agent
                .post(&url)
                .config()
                .timeout_global(Some(Duration::from_secs(30)))
                .build();
            if let Some(c) = credential {
                req = req.header("Authorization", &format!("Bearer {c}"));
            }
            let mut resp = req.send_json(&body).map_err(transport)?;
            let status = resp.status().as_u16();
            if status >= 400 {
                let message = resp
                    .body_mut()
                    .read_json::<ErrorBody>()
                    .map(|b| b.error.message)
                    .unwrap_or_else(|_| "no error body".into());
                return Err(ClientError::Api { status, message });
            }
            resp.body_mut().read_json::<T>().map_err(transport)
        })
        .await
        .map_err(transport)?
    }

    pub async fn register(&self, req: NodeRegister) -> Result<NodeRegistered, ClientError> {
        self.post("/v1/nodes/register".into(), None, req).await
    }

    pub async fn heartbeat(
        &self,
        id: NodeId,
        credential: &str,
        hb: Heartbeat,
    ) -> Result<HeartbeatResponse, ClientError> {
        self.post(
            format!("/v1/nodes/{id}/heartbeat"),
            Some(credential.to_owned()),
            hb,
        )
        .await
    }

    /// One metadata document of a VM on this node, for its guest: the
    /// control plane's status and body, passed on as they are.
    pub async fn metadata(
        &self,
        id: NodeId,
        credential: &str,
        vm: VmId,
        token: &str,
        document: &str,
    ) -> Result<(u16, Vec<u8>), ClientError> {
        let agent = self.agent.clone();
        let url = format!("{}/v1/nodes/{id}/metadata/{vm}/{document}", self.base);
        let auth = format!("Bearer {credential}");
        let token = token.to_owned();
        tokio::task::spawn_blocking(move || {
            let mut resp = agent
                .get(&url)
                .header("Authorization", &auth)
                .header("X-Byteport-Metadata-Token", &token)
                .config()
                .timeout_global(Some(Duration::from_secs(10)))
                .build()
                .call()
                .map_err(transport)?;
            let status = resp.status().as_u16();
            // user-data is at most 64 KiB; the rest are smaller.
            let body = resp
                .body_mut()
                .with_config()
                .limit(1 << 20)
                .read_to_vec()
                .map_err(transport)?;
            Ok((status, body))
        })
        .await
        .map_err(transport)?
    }

    /// Downloads an image file to `dest`, checking that it hashes to
    /// `sha256`; a file that does not is removed.
    pub async fn download(
        &self,
        credential: &str,
        sha256: &str,
        dest: PathBuf,
    ) -> Result<u64, ClientError> {
        let agent = self.agent.clone();
        let url = format!("{}/v1/image-files/{sha256}", self.base);
        let auth = format!("Bearer {credential}");
        let want = sha256.to_owned();
        tokio::task::spawn_blocking(move || {
            let mut resp = agent
                .get(&url)
                .header("Authorization", &auth)
                .call()
                .map_err(transport)?;
            let status = resp.status().as_u16();
            if status >= 400 {
                let message = resp
                    .body_mut()
                    .read_json::<ErrorBody>()
                    .map(|b| b.error.message)
                    .unwrap_or_else(|_| "no error body".into());
                return Err(ClientError::Api { status, message });
            }
            let mut reader = resp.body_mut().with_config().limit(u64::MAX).reader();
            let mut f = std::fs::File::create(&dest)?;
            let mut h = Sha256::new();
            let mut buf = vec![0u8; 256 * 1024];
            let mut total = 0u64;
            loop {
                let n = reader.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
                f.write_all(&buf[..n])?;
                total += n as u64;
            }
            f.sync_all()?;
            let got = hex::encode(h.finalize());
            if got != want {
                let _ = std::fs::remove_file(&dest);
                return Err(ClientError::Api {
                    status: 0,
                    message: format!("downloaded file hashes to {got}, not {want}"),
                });
            }
            Ok(total)
        })
        .await
        .map_err(transport)?
    }
}
