//! TLS to Postgres, with `sslmode` meaning what it means to libpq (and so to every operator who
//! has written a Postgres URL before):
//!
//! | `sslmode` | TLS | the server's certificate |
//! | --- | --- | --- |
//! | `disable` | never | - |
//! | `prefer` (default) | if the server offers it | not checked |
//! | `require` | always | not checked; with `sslrootcert`, its chain is (as `verify-ca`) |
//! | `verify-ca` | always | chain to `sslrootcert` (default: the Mozilla roots) |
//! | `verify-full` | always | chain, and the host name in the URL |
//!
//! `sslrootcert=PATH` names a PEM file of CA certificates (`system`: the Mozilla roots).
//! `sslmode=allow` and client certificates (`sslcert`, `sslkey`) are refused with a message
//! rather than ignored. Built on `tokio-postgres-rustls` with relay's rustls (ring) provider.

use super::StoreError;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use std::sync::Arc;
use tokio_postgres::config::SslMode;

/// How the server's certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    /// Not at all (libpq's `prefer` and `require`): encryption against passive listeners only.
    Nothing,
    /// Its chain to a trusted root, whatever name it has (`verify-ca`).
    Chain,
    /// Its chain and the host name (`verify-full`).
    Full,
}

/// A Postgres target: the connection settings and the TLS connector to use with them.
pub struct PgTarget {
    pub config: tokio_postgres::Config,
    pub tls: tokio_postgres_rustls::MakeRustlsConnect,
    pub verify: Verify,
}

fn invalid(m: impl Into<String>) -> StoreError {
    StoreError::Invalid(format!("invalid database URL: {}", m.into()))
}

/// The URL without the TLS parameters relay handles itself, and those parameters.
fn split_tls_params(url: &str) -> Result<(String, Option<String>, Option<String>), StoreError> {
    let mut mode = None;
    let mut root = None;
    let mut take = |key: &str, value: &str| -> Result<bool, StoreError> {
        match key {
            "sslmode" => {
                mode = Some(value.to_string());
                Ok(true)
            }
            "sslrootcert" => {
                root = Some(value.to_string());
                Ok(true)
            }
            "sslcert" | "sslkey" | "sslpassword" => Err(invalid(format!(
                "{key}: client certificates for Postgres are not supported yet (use a password over sslmode=verify-full)"
            ))),
            _ => Ok(false),
        }
    };
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let Some((base, query)) = url.split_once('?') else {
            return Ok((url.to_string(), None, None));
        };
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_encoding::percent_decode_str(v).decode_utf8_lossy();
            if !take(k, &v)? {
                kept.push(pair);
            }
        }
        let rebuilt = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return Ok((rebuilt, mode, root));
    }
    // key=value form ("host=db user=relay sslmode=require").
    let mut kept = Vec::new();
    for part in url.split_whitespace() {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        if !take(k.trim(), v.trim())? {
            kept.push(part);
        }
    }
    Ok((kept.join(" "), mode, root))
}

/// Parses a database URL (URL or key=value form) with libpq's TLS parameters.
pub fn target(url: &str) -> Result<PgTarget, StoreError> {
    let (rest, mode, root) = split_tls_params(url)?;
    let mut config: tokio_postgres::Config = rest
        .parse()
        .map_err(|e: tokio_postgres::Error| invalid(e.to_string()))?;
    let (ssl_mode, verify) = match mode.as_deref().unwrap_or("prefer") {
        "disable" => (SslMode::Disable, Verify::Nothing),
        "prefer" => (SslMode::Prefer, Verify::Nothing),
        "require" if root.is_some() => (SslMode::Require, Verify::Chain),
        "require" => (SslMode::Require, Verify::Nothing),
        "verify-ca" => (SslMode::Require, Verify::Chain),
        "verify-full" => (SslMode::Require, Verify::Full),
        "allow" => {
            return Err(invalid(
                "sslmode=allow is not supported: use prefer, require, verify-ca or verify-full",
            ))
        }
        other => {
            return Err(invalid(format!(
                "sslmode={other}: expected disable, prefer, require, verify-ca or verify-full"
            )))
        }
    };
    config.ssl_mode(ssl_mode);
    let roots = match root.as_deref() {
        None | Some("system") => {
            let mut r = rustls::RootCertStore::empty();
            r.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            r
        }
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| invalid(format!("sslrootcert {path}: {e}")))?;
            let mut r = rustls::RootCertStore::empty();
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert = cert.map_err(|e| invalid(format!("sslrootcert {path}: {e}")))?;
                r.add(cert).map_err(|e| invalid(format!("sslrootcert {path}: {e}")))?;
            }
            if r.is_empty() {
                return Err(invalid(format!("sslrootcert {path}: no PEM certificate in it")));
            }
            r
        }
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| invalid(format!("TLS roots: {e}")))?;
    let verifier = Arc::new(Verifier {
        webpki,
        provider: provider.clone(),
        verify,
    });
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(format!("TLS: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(PgTarget {
        config,
        tls: tokio_postgres_rustls::MakeRustlsConnect::new(tls),
        verify,
    })
}

#[derive(Debug)]
struct Verifier {
    webpki: Arc<rustls::client::WebPkiServerVerifier>,
    provider: Arc<rustls::crypto::CryptoProvider>,
    verify: Verify,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.verify {
            Verify::Nothing => Ok(ServerCertVerified::assertion()),
            Verify::Full => self
                .webpki
                .verify_server_cert(end_entity, intermediates, server_name, ocsp, now),
            Verify::Chain => match self
                .webpki
                .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
            {
                Err(rustls::Error::InvalidCertificate(
                    CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
                )) => Ok(ServerCertVerified::assertion()),
                other => other,
            },
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn libpq_modes() {
        let t = target("postgres://relay:pw@db:5432/relay").unwrap();
        assert_eq!((t.config.get_ssl_mode(), t.verify), (SslMode::Prefer, Verify::Nothing));
        let t = target("postgres://relay@db/relay?sslmode=require&application_name=x").unwrap();
        assert_eq!((t.config.get_ssl_mode(), t.verify), (SslMode::Require, Verify::Nothing));
        assert_eq!(t.config.get_application_name(), Some("x"));
        let t = target("postgres://relay@db/relay?sslmode=verify-full").unwrap();
        assert_eq!((t.config.get_ssl_mode(), t.verify), (SslMode::Require, Verify::Full));
        let t = target("postgres://relay@db/relay?sslmode=verify-ca&sslrootcert=system").unwrap();
        assert_eq!(t.verify, Verify::Chain);
        let t = target("host=db user=relay sslmode=disable").unwrap();
        assert_eq!(t.config.get_ssl_mode(), SslMode::Disable);
    }

    #[test]
    fn what_is_not_supported_is_refused_with_a_reason() {
        let e = |u: &str| match target(u) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{u} was accepted"),
        };
        assert!(e("postgres://db/relay?sslmode=allow").contains("sslmode=allow is not supported"));
        assert!(e("postgres://db/relay?sslmode=verify").contains("expected disable"));
        assert!(e("postgres://db/relay?sslcert=/c.pem").contains("client certificates"));
        assert!(e("postgres://db/relay?sslmode=verify-full&sslrootcert=/nonexistent.pem").contains("sslrootcert"));
    }
}
