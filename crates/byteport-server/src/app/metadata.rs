//! The instance metadata service: the NoCloud documents an unmodified
//! cloud-init reads at boot (`meta-data`, `user-data`, `vendor-data`,
//! `network-config`).
//!
//! A guest never talks to the control plane: it asks the metadata relay of
//! the node it runs on (`http://10.0.2.254/VM/TOKEN/`), and the node
//! asks here with its own credential. A document
//! is served only when the node is the VM's node, the VM is not deleted,
//! and the token is the VM's; anything else is the same 404, so a guest
//! learns nothing about other VMs. Each VM's token is an HMAC of its id
//! under a cluster secret: the database keeps only its SHA-256, and a node
//! gets the token with the VM's desired state.

use super::auth::hash_secret;
use super::{Actor, App, Ctx};
use crate::error::{AppError, AppResult};
use base64::Engine;
use byteport_types::api::guest_mac;
use byteport_types::rate::{METADATA_BURST as BURST, METADATA_PER_SECOND as PER_SECOND};
use byteport_types::{NodeId, ProjectId, VmId};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use uuid::Uuid;

/// The documents a NoCloud data source fetches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Document {
    MetaData,
    UserData,
    VendorData,
    NetworkConfig,
}

impl Document {
    pub fn parse(s: &str) -> Option<Document> {
        match s {
            "meta-data" => Some(Document::MetaData),
            "user-data" => Some(Document::UserData),
            "vendor-data" => Some(Document::VendorData),
            "network-config" => Some(Document::NetworkConfig),
            _ => None,
        }
    }

    fn action(self) -> &'static str {
        match self {
            Document::MetaData => "metadata_meta_data",
            Document::UserData => "metadata_user_data",
            Document::VendorData => "metadata_vendor_data",
            Document::NetworkConfig => "metadata_network_config",
        }
    }
}

/// Metadata requests refused on this replica, for `/metrics`.
#[derive(Default)]
pub struct Refusals {
    pub not_found: std::sync::atomic::AtomicU64,
    pub rate_limited: std::sync::atomic::AtomicU64,
}

/// One token bucket per VM, on this replica.
pub(crate) struct RateLimits(byteport_types::rate::Buckets<Uuid>);

impl Default for RateLimits {
    fn default() -> Self {
        RateLimits(byteport_types::rate::Buckets::new(BURST, PER_SECOND))
    }
}

impl RateLimits {
    /// Takes one request from the VM's bucket; false when it is empty.
    fn take(&self, vm: Uuid) -> bool {
        self.0.take(vm)
    }
}

/// The metadata tokens' key, shared by every replica.
pub(crate) struct TokenKey(Vec<u8>);

impl TokenKey {
    /// The key (see [`super::secrets`]).
    pub(crate) fn new(secret: &str) -> Self {
        TokenKey(secret.as_bytes().to_vec())
    }

    /// The VM's token: what its guest presents, in a URL-safe alphabet.
    pub(crate) fn token(&self, vm: Uuid) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(b"byteport-metadata:");
        mac.update(vm.as_bytes());
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    }
}

impl App {
    /// The VM's metadata token, for its node.
    pub(crate) fn metadata_token(&self, vm: Uuid) -> String {
        self.metadata_key.token(vm)
    }

    /// What a new VM's record keeps of its token.
    pub(crate) fn metadata_token_hash(&self, vm: Uuid) -> String {
        hash_secret(&self.metadata_token(vm))
    }

    /// One document for the guest of `vm`, asked for by node `node` with
    /// the token the guest presented. Every request is audited but the
    /// refused ones (404, 429), which are counted ([`Refusals`]).
    pub async fn metadata_document(
        &self,
        ctx: &Ctx,
        node: NodeId,
        vm: VmId,
        token: Option<&str>,
        doc: Document,
    ) -> AppResult<String> {
        let res = self.metadata_lookup(ctx, node, vm, token, doc).await;
        let (status, result) = match &res {
            Ok(_) => (200, "ok"),
            Err(e) => (e.status().as_u16(), e.code()),
        };
        // A guest that asks again and again for what is not there, or too
        // often, is counted, not written to the audit log request by request.
        let refused = match status {
            404 => Some(&self.metadata_refusals.not_found),
            429 => Some(&self.metadata_refusals.rate_limited),
            _ => None,
        };
        match refused {
            Some(n) => {
                n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            None => self.audit_record(ctx, doc.action(), status, result).await,
        }
        res
    }

    async fn metadata_lookup(
        &self,
        ctx: &Ctx,
        node: NodeId,
        vm: VmId,
        token: Option<&str>,
        doc: Document,
    ) -> AppResult<String> {
        match &ctx.actor {
            Actor::Node { id, .. } if *id == node => {}
            Actor::Node { .. } => {
                return Err(AppError::Forbidden(
                    "a node asks for the metadata of its own VMs only".into(),
                ));
            }
            _ => return Err(AppError::Forbidden("this is for nodes".into())),
        }
        ctx.target("vm", vm, None);
        let missing = || AppError::not_found("metadata", "for this VM and token");
        let v = match self.store.vm_fetch(vm.0).await {
            Ok(v) => v,
            Err(byteport_store::StoreError::NotFound) => return Err(missing()),
            Err(e) => return Err(e.into()),
        };
        let presented = token.map(hash_secret);
        // A VM being deleted is as gone as a deleted one.
        let known = v.deleted_at.is_none()
            && v.desired_state != "deleted"
            && v.node_id == Some(node.0)
            && v.metadata_token_hash.is_some()
            && presented == v.metadata_token_hash;
        if !known {
            return Err(missing());
        }
        ctx.target("vm", vm, Some(ProjectId(v.project_id)));
        if !self.metadata_limits.take(v.id) {
            return Err(AppError::RateLimited(
                format!(
                    "VM {vm} asked for its metadata too often; at most {PER_SECOND} requests a second after a burst of {BURST}"
                ),
                1,
            ));
        }
        let ssh_keys: Vec<String> =
            serde_json::from_str(&v.ssh_keys).map_err(AppError::internal)?;
        Ok(render(
            vm,
            &v.hostname,
            &ssh_keys,
            v.user_data.as_deref(),
            doc,
        ))
    }
}

/// A document's text. YAML documents are written as JSON, which YAML
/// parsers read as is, so no user string needs YAML quoting rules.
fn render(
    id: VmId,
    hostname: &str,
    ssh_keys: &[String],
    user_data: Option<&str>,
    doc: Document,
) -> String {
    match doc {
        Document::MetaData => {
            let json = serde_json::json!({
                "instance-id": id.to_string(),
                "local-hostname": hostname,
                "public-keys": ssh_keys,
            });
            format!("{json:#}\n")
        }
        // Exactly the user's bytes: #cloud-config, a script or multipart.
        Document::UserData => user_data.unwrap_or_default().to_owned(),
        Document::VendorData => "#cloud-config\n{}\n".to_owned(),
        Document::NetworkConfig => {
            let json = serde_json::json!({
                "version": 2,
                "ethernets": {
                    // Named as the image names it (net.ifnames=0): a
                    // key that is no interface's name is what cloud-init's
                    // ENI renderer would `ifup`.
                    "eth0": {
                        "match": { "macaddress": guest_mac(id) },
                        "set-name": "eth0",
                        "dhcp4": true,
                        // Said, not left out: newer cloud-init asks for
                        // DHCPv6 too unless told, and no node answers it.
                        "dhcp6": false,
                    }
                }
            });
            format!("{json:#}\n")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_differ_per_vm_and_per_key() {
        let a = TokenKey(b"one".to_vec());
        let b = TokenKey(b"two".to_vec());
        let (v1, v2) = (Uuid::now_v7(), Uuid::now_v7());
        assert_eq!(a.token(v1), a.token(v1));
        assert_ne!(a.token(v1), a.token(v2));
        assert_ne!(a.token(v1), b.token(v1));
        assert_eq!(a.token(v1).len(), 43);
        assert!(
            a.token(v1)
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        );
    }

    #[test]
    fn a_burst_is_allowed_then_the_rate() {
        let l = RateLimits::default();
        let vm = Uuid::now_v7();
        let allowed = (0..100).filter(|_| l.take(vm)).count();
        assert!((20..=21).contains(&allowed), "{allowed} of 100");
        // Another VM has its own bucket.
        assert!(l.take(Uuid::now_v7()));
    }
}
