//! TLS for OTLP export: the standard `OTEL_EXPORTER_OTLP_[TRACES_]CERTIFICATE` (a CA bundle
//! trusted besides the public web roots) and `OTEL_EXPORTER_OTLP_[TRACES_]CLIENT_CERTIFICATE` /
//! `_CLIENT_KEY` (a client certificate for collectors that require mTLS), read at start into
//! the gRPC (tonic) and HTTP (rustls) client configurations. The SDK itself reads none of them.

use std::sync::Arc;

use crate::TelemetryError;

/// PEM files named by the `OTEL_*` certificate variables, read at start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// Extra trusted CA certificates (PEM).
    pub ca: Option<Vec<u8>>,
    /// Client certificate chain and key (PEM), both or neither.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

fn read(name: &'static str, path: &str) -> Result<Vec<u8>, TelemetryError> {
    std::fs::read(path.trim()).map_err(|e| TelemetryError::Tls {
        name,
        reason: format!("cannot read {}: {e}", path.trim()),
    })
}

impl TlsFiles {
    /// Reads the files the variables name (the `TRACES_` variant first).
    pub fn from_env(set: &impl Fn(&str) -> Option<String>) -> Result<Self, TelemetryError> {
        let pick = |traces: &'static str, general: &'static str| {
            set(traces)
                .map(|v| (traces, v))
                .or_else(|| set(general).map(|v| (general, v)))
        };
        let ca = match pick(
            "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
            "OTEL_EXPORTER_OTLP_CERTIFICATE",
        ) {
            Some((name, path)) => {
                let pem = read(name, &path)?;
                if !has_pem(&pem, "CERTIFICATE") {
                    return Err(TelemetryError::Tls {
                        name,
                        reason: format!("no PEM certificate in {}", path.trim()),
                    });
                }
                Some(pem)
            }
            None => None,
        };
        let cert = pick(
            "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE",
            "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
        );
        let key = pick("OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY", "OTEL_EXPORTER_OTLP_CLIENT_KEY");
        let identity = match (cert, key) {
            (None, None) => None,
            (Some((name, cert)), Some((kname, key))) => Some((read(name, &cert)?, read(kname, &key)?)),
            (Some((name, _)), None) | (None, Some((name, _))) => {
                return Err(TelemetryError::Tls {
                    name,
                    reason: "a client certificate needs both OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE and OTEL_EXPORTER_OTLP_CLIENT_KEY".into(),
                })
            }
        };
        Ok(Self { ca, identity })
    }

    /// The gRPC client's TLS: the public web roots, the extra CA, the client identity.
    pub fn tonic(&self) -> tonic::transport::ClientTlsConfig {
        let mut c = tonic::transport::ClientTlsConfig::new().with_webpki_roots();
        if let Some(ca) = &self.ca {
            c = c.ca_certificate(tonic::transport::Certificate::from_pem(ca));
        }
        if let Some((cert, key)) = &self.identity {
            c = c.identity(tonic::transport::Identity::from_pem(cert, key));
        }
        c
    }

    /// The HTTP client's TLS, the same trust and identity.
    pub fn rustls(&self) -> Result<rustls::ClientConfig, TelemetryError> {
        let bad = |name: &'static str, e: String| TelemetryError::Tls { name, reason: e };
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(ca) = &self.ca {
            for cert in rustls_pemfile::certs(&mut ca.as_slice()) {
                let cert = cert.map_err(|e| bad("OTEL_EXPORTER_OTLP_CERTIFICATE", e.to_string()))?;
                roots
                    .add(cert)
                    .map_err(|e| bad("OTEL_EXPORTER_OTLP_CERTIFICATE", e.to_string()))?;
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad("OTEL_EXPORTER_OTLP_CERTIFICATE", e.to_string()))?
            .with_root_certificates(roots);
        match &self.identity {
            None => Ok(builder.with_no_client_auth()),
            Some((cert, key)) => {
                let chain = rustls_pemfile::certs(&mut cert.as_slice())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| bad("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", e.to_string()))?;
                let key = rustls_pemfile::private_key(&mut key.as_slice())
                    .map_err(|e| bad("OTEL_EXPORTER_OTLP_CLIENT_KEY", e.to_string()))?
                    .ok_or_else(|| bad("OTEL_EXPORTER_OTLP_CLIENT_KEY", "no PEM private key in it".into()))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| bad("OTEL_EXPORTER_OTLP_CLIENT_KEY", e.to_string()))
            }
        }
    }
}

fn has_pem(pem: &[u8], label: &str) -> bool {
    let begin = format!("-----BEGIN {label}-----");
    pem.windows(begin.len()).any(|w| w == begin.as_bytes())
}
