//! The certificates BytePort's clients (the CLI and the node agent) trust
//! when they dial an `https://` control plane: the system's store (on
//! Debian /etc/ssl/certs/ca-certificates.crt, which `update-ca-certificates`
//! builds from /usr/local/share/ca-certificates) and the operator's own CA
//! bundle (`--ca-cert`, `BYTEPORT_CA_CERT`), which is what a private cloud's
//! certificates are signed by. A host with neither trusts the public web's
//! roots compiled in.
//!
//! One [`Trust`] configures both kinds of connection a client makes: ureq
//! for HTTP, and a rustls client for WebSockets (`wss://`).

use rustls::pki_types::{CertificateDer, ServerName};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// `SSL_CERT_FILE` names the system's bundle when set; else the first of
/// these that exists.
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt", // Debian, Ubuntu, Alpine, Arch
    "/etc/pki/tls/certs/ca-bundle.crt",   // Fedora, RHEL
    "/etc/ssl/ca-bundle.pem",             // openSUSE
    "/etc/ssl/cert.pem",                  // others
];

/// A CA bundle that cannot be used.
#[derive(Debug)]
pub struct TrustError(String);

impl std::fmt::Display for TrustError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TrustError {}

/// The roots a client verifies the control plane's certificate against.
#[derive(Clone, Debug)]
pub struct Trust {
    /// Empty when neither a system store nor an operator bundle was found:
    /// then the compiled-in web roots.
    roots: Arc<Vec<ureq::tls::Certificate<'static>>>,
    /// The files they were read from.
    pub sources: Vec<PathBuf>,
}

impl Trust {
    /// The system's store plus `ca_cert`, a PEM bundle of one or more CA
    /// certificates (refused when unreadable or holding none).
    pub fn load(ca_cert: Option<&Path>) -> Result<Trust, TrustError> {
        let mut roots = Vec::new();
        let mut sources = Vec::new();
        // A broken system store is not the operator's doing: skip it.
        if let Some(p) = system_bundle()
            && let Ok(certs) = read_pem(&p)
        {
            roots.extend(certs);
            sources.push(p);
        }
        let mut t = Trust {
            roots: Arc::new(roots),
            sources,
        };
        if let Some(p) = ca_cert {
            t.add_bundle(p)?;
        }
        Ok(t)
    }

    /// Trusts the certificates of one more PEM bundle too.
    fn add_bundle(&mut self, path: &Path) -> Result<(), TrustError> {
        let certs = read_pem(path)?;
        Arc::make_mut(&mut self.roots).extend(certs);
        self.sources.push(path.to_owned());
        Ok(())
    }

    /// The system's store alone (what a client trusts with no `--ca-cert`).
    pub fn system() -> Trust {
        Trust::load(None).unwrap_or_else(|_| Trust {
            roots: Arc::default(),
            sources: Vec::new(),
        })
    }

    /// How many root certificates are trusted (0: the web roots compiled in).
    pub fn len(&self) -> usize {
        self.roots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.roots.is_empty()
    }

    /// The TLS settings of a ureq agent.
    pub fn ureq(&self) -> ureq::tls::TlsConfig {
        let roots = if self.roots.is_empty() {
            ureq::tls::RootCerts::WebPki
        } else {
            ureq::tls::RootCerts::Specific(self.roots.clone())
        };
        ureq::tls::TlsConfig::builder().root_certs(roots).build()
    }

    /// A rustls client configuration (HTTP/1.1, for WebSockets).
    pub fn rustls(&self) -> Arc<rustls::ClientConfig> {
        let mut store = rustls::RootCertStore::empty();
        if self.roots.is_empty() {
            store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        } else {
            store.add_parsable_certificates(
                self.roots
                    .iter()
                    .map(|c| CertificateDer::from(c.der().to_vec())),
            );
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_root_certificates(store)
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(cfg)
    }
}

/// The name a server's certificate must carry for `host` (a DNS name or an
/// IP address, IPv6 with or without its brackets).
pub fn server_name(host: &str) -> Result<ServerName<'static>, TrustError> {
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    ServerName::try_from(bare.to_owned())
        .map_err(|_| TrustError(format!("{host:?} is not a host name or an IP address")))
}

/// What to do about a connection error that says the server's certificate
/// was not trusted; `None` for other errors.
pub fn hint(error: &str) -> Option<&'static str> {
    let untrusted = ["UnknownIssuer", "invalid peer certificate", "certificate"];
    untrusted.iter().any(|w| error.contains(w)).then_some(
        "the server's certificate is not signed by a CA this host trusts: pass the CA's \
         certificate with --ca-cert FILE (or BYTEPORT_CA_CERT), or install it under \
         /usr/local/share/ca-certificates and run update-ca-certificates",
    )
}

fn system_bundle() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SSL_CERT_FILE").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    SYSTEM_BUNDLES
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// The certificates of a PEM file (other items, such as keys, are skipped).
fn read_pem(path: &Path) -> Result<Vec<ureq::tls::Certificate<'static>>, TrustError> {
    let text = std::fs::read(path)
        .map_err(|e| TrustError(format!("cannot read the CA bundle {}: {e}", path.display())))?;
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(&text) {
        match item {
            Ok(ureq::tls::PemItem::Certificate(c)) => certs.push(c),
            Ok(_) => {}
            Err(e) => {
                return Err(TrustError(format!(
                    "the CA bundle {} is not PEM: {e}",
                    path.display()
                )));
            }
        }
    }
    if certs.is_empty() {
        return Err(TrustError(format!(
            "the CA bundle {} holds no certificate (want PEM, -----BEGIN CERTIFICATE-----)",
            path.display()
        )));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    // A self-signed certificate (openssl req -x509 -newkey ec ...).
    const CA: &str = "-----BEGIN CERTIFICATE-----
MIIBfjCCASOgAwIBAgIUBuMDprfGc3eHt4/j0MPSdzczFWUwCgYIKoZIzj0EAwIw
FDESMBAGA1UEAwwJdGVzdCByb290MB4XDTI2MTIwMjAzMDA0OVoXDTM2MTEyOTAz
MDA0OVowFDESMBAGA1UEAwwJdGVzdCByb290MFkwEwYHKoZIzj0CAQYIKoZIzj0D
AQcDQgAEn5u7QEeBii9eHn2HNNggFUjhboKJUs3hbWlhUnEU85VkaQaT97qcnhZW
Nju23cEflqY2jlrbmfvXGb2xHTdW0KNTMFEwHQYDVR0OBBYEFKVneI1MLXdKN0Gj
nWCqNTausmjPMB8GA1UdIwQYMBaAFKVneI1MLXdKN0GjnWCqNTausmjPMA8GA1Ud
EwEB/wQFMAMBAf8wCgYIKoZIzj0EAwIDSQAwRgIhAPHnPp0pQpl0Ius588YvguoY
9hRWBtd3LygcBUQ97kjhAiEAkDdxZK2JM00oAItVHJDlQ7PWg/E7SRM9u/aOisJx
7+I=
-----END CERTIFICATE-----
";

    #[test]
    fn an_operator_bundle_adds_its_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ca.pem");
        std::fs::write(&p, format!("{CA}{CA}")).unwrap();
        let base = Trust::system().len();
        let t = Trust::load(Some(&p)).unwrap();
        assert_eq!(t.len(), base + 2);
        assert_eq!(t.sources.last(), Some(&p));
        // Both kinds of client can be configured from it.
        let _ = t.ureq();
        assert_eq!(t.rustls().alpn_protocols, vec![b"http/1.1".to_vec()]);
    }

    #[test]
    fn a_bundle_that_is_missing_or_holds_no_certificate_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.pem");
        let e = Trust::load(Some(&missing)).unwrap_err().to_string();
        assert!(
            e.contains("cannot read the CA bundle") && e.contains("nope.pem"),
            "{e}"
        );
        let empty = dir.path().join("key.pem");
        std::fs::write(&empty, "just text\n").unwrap();
        let e = Trust::load(Some(&empty)).unwrap_err().to_string();
        assert!(e.contains("holds no certificate"), "{e}");
    }

    #[test]
    fn untrusted_certificates_say_what_to_do() {
        let h = hint("io: invalid peer certificate: UnknownIssuer").unwrap();
        assert!(h.contains("--ca-cert"), "{h}");
        assert_eq!(hint("Connection refused (os error 111)"), None);
    }

    #[test]
    fn server_names_take_hosts_and_addresses() {
        assert!(matches!(
            server_name("cloud.example"),
            Ok(ServerName::DnsName(_))
        ));
        assert!(matches!(
            server_name("127.0.0.1"),
            Ok(ServerName::IpAddress(_))
        ));
        assert!(matches!(server_name("[::1]"), Ok(ServerName::IpAddress(_))));
        assert!(server_name("not a host").is_err());
    }
}
