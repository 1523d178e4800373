//! Optional TLS: the rustls (ring) server configuration built from [`MockTls`], and what a connection
//! negotiated ([`TlsInfo`]).

use std::io;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

/// Serve HTTPS instead of plain HTTP: a certificate chain and its key, both PEM. The mock offers ALPN `h2`
/// and `http/1.1`, TLS 1.2 and 1.3.
#[derive(Clone)]
pub struct MockTls {
    /// The server's certificate chain, leaf first (PEM, one or more `CERTIFICATE` blocks). Issue it for the
    /// names clients use: [`MockUpstream::base_url`](crate::MockUpstream::base_url) says `localhost`.
    pub cert_chain_pem: String,
    /// The leaf's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key_pem: String,
}

impl std::fmt::Debug for MockTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockTls")
            .field("cert_chain_pem", &self.cert_chain_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// What the TLS connection a request came on negotiated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsInfo {
    /// `TLSv1.3` or `TLSv1.2`.
    pub protocol_version: String,
    /// The ALPN protocol agreed (`h2` or `http/1.1`), if the client offered ALPN.
    pub alpn: Option<String>,
}

impl TlsInfo {
    pub(crate) fn of(conn: &rustls::ServerConnection) -> TlsInfo {
        let protocol_version = match conn.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_string(),
            Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_string(),
            Some(other) => format!("{other:?}"),
            None => String::new(),
        };
        let alpn = conn.alpn_protocol().map(|p| String::from_utf8_lossy(p).into_owned());
        TlsInfo { protocol_version, alpn }
    }
}

/// The acceptor for `tls`; an `InvalidInput` error if the PEM or the key does not fit.
/// With `h2` false ALPN offers only `http/1.1`.
pub(crate) fn acceptor(tls: &MockTls, h2: bool) -> io::Result<TlsAcceptor> {
    let invalid =
        |what: &str, e: &dyn std::fmt::Display| io::Error::new(io::ErrorKind::InvalidInput, format!("{what}: {e}"));
    let certs = CertificateDer::pem_slice_iter(tls.cert_chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid("mock TLS certificate chain", &e))?;
    if certs.is_empty() {
        return Err(invalid("mock TLS certificate chain", &"no PEM certificate in it"));
    }
    let key = PrivateKeyDer::from_pem_slice(tls.key_pem.as_bytes()).map_err(|e| invalid("mock TLS private key", &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid("mock TLS protocol versions", &e))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| invalid("mock TLS certificate", &e))?;
    config.alpn_protocols = if h2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    Ok(TlsAcceptor::from(Arc::new(config)))
}
