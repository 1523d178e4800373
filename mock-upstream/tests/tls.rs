//! The mock serving HTTPS ([`MockConfig::tls`]): a CA and a `localhost` leaf generated with rcgen, hyper's
//! client over rustls (HTTP/1.1, and HTTP/2 by ALPN `h2`), and a client that does not trust the CA.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnectorBuilder;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use relay_mock_upstream::{MockConfig, MockTls, MockUpstream};
use rustls::pki_types::CertificateDer;
use serde_json::json;

/// A CA and a leaf for `localhost` / `127.0.0.1` signed by it: (CA certificate DER, the mock's TLS config).
fn certs() -> (CertificateDer<'static>, MockTls) {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "relay mock test CA");
    ca_params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap()).unwrap();
    let mut leaf_params =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    leaf_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "localhost");
    leaf_params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = leaf_params.signed_by(&leaf_key, &ca).unwrap();
    let tls = MockTls {
        cert_chain_pem: leaf.pem(),
        key_pem: leaf_key.serialize_pem(),
    };
    (ca.der().clone(), tls)
}

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// An HTTPS-only client trusting `roots`, HTTP/1.1 only (no ALPN) or HTTP/2 only (ALPN `h2`).
fn client(roots: &[CertificateDer<'static>], h2: bool) -> HttpsClient {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(r.clone()).unwrap();
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(store)
        .with_no_client_auth();
    let b = HttpsConnectorBuilder::new().with_tls_config(tls).https_only();
    let https = if h2 {
        b.enable_http2().build()
    } else {
        b.enable_http1().build()
    };
    let mut builder = Client::builder(TokioExecutor::new());
    builder.http2_only(h2);
    builder.build(https)
}

fn messages_request(mock: &MockUpstream, stream: bool) -> Request<Full<Bytes>> {
    let body = json!({
        "model": "claude-sonnet-4-5",
        "max_tokens": 64,
        "stream": stream,
        "messages": [{"role": "user", "content": "hi"}],
    });
    Request::post(format!("{}/v1/messages", mock.base_url()))
        .header("x-api-key", "sk-ant-good")
        .header("anthropic-version", "2023-06-01")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

#[tokio::test]
async fn serves_http1_and_h2_over_tls() {
    let (ca, tls) = certs();
    let mock = MockUpstream::start(MockConfig {
        tls: Some(tls),
        ..MockConfig::default()
    })
    .await
    .unwrap();
    assert_eq!(mock.base_url(), format!("https://localhost:{}", mock.addr().port()));

    for (h2, stream) in [(false, false), (false, true), (true, false), (true, true)] {
        let resp = client(std::slice::from_ref(&ca), h2)
            .request(messages_request(&mock, stream))
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let expected_version = if h2 {
            http::Version::HTTP_2
        } else {
            http::Version::HTTP_11
        };
        assert_eq!(resp.version(), expected_version);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        if stream {
            assert!(String::from_utf8_lossy(&body).contains("event: message_stop"));
        } else {
            let j: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(j["type"], "message");
        }
    }

    let seen = mock.requests();
    assert_eq!(seen.len(), 4);
    for (i, r) in seen.iter().enumerate() {
        let tls = r.tls.as_ref().expect("recorded over TLS");
        assert!(tls.protocol_version.starts_with("TLSv1."), "{tls:?}");
        // hyper-rustls offers no ALPN for an HTTP/1.1-only client, `h2` for an HTTP/2 one.
        let alpn = if i < 2 { None } else { Some("h2") };
        assert_eq!(tls.alpn.as_deref(), alpn);
        assert_eq!(
            r.version,
            if i < 2 {
                http::Version::HTTP_11
            } else {
                http::Version::HTTP_2
            }
        );
    }
    assert_eq!(mock.tls_handshake_failures(), 0);
}

#[tokio::test]
async fn untrusted_client_gets_nothing_served() {
    let (_ca, tls) = certs();
    let mock = MockUpstream::start(MockConfig {
        tls: Some(tls),
        ..MockConfig::default()
    })
    .await
    .unwrap();
    // Trusts only an unrelated CA.
    let (other_ca, _) = certs();
    let err = client(&[other_ca], false)
        .request(messages_request(&mock, false))
        .await
        .unwrap_err();
    assert!(err.is_connect(), "{err:?}");
    wait_until(|| mock.tls_handshake_failures() == 1).await;
    assert_eq!(mock.request_count(), 0);
    assert!(mock.requests().is_empty());
}

/// The server notices the failed handshake shortly after the client does.
async fn wait_until(mut cond: impl FnMut() -> bool) {
    for _ in 0..200 {
        if cond() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("condition not met in 2s");
}

#[tokio::test]
async fn plain_http_stays_plain() {
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    assert!(mock.base_url().starts_with("http://127.0.0.1:"));
    let resp = Client::builder(TokioExecutor::new())
        .build_http::<Full<Bytes>>()
        .request(messages_request(&mock, false))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(mock.requests()[0].tls, None);
}

#[tokio::test]
async fn bad_pem_is_invalid_input() {
    let (_, tls) = certs();
    for bad in [
        MockTls {
            cert_chain_pem: String::new(),
            ..tls.clone()
        },
        MockTls {
            key_pem: "not a key".into(),
            ..tls.clone()
        },
    ] {
        let err = MockUpstream::start(MockConfig {
            tls: Some(bad),
            ..MockConfig::default()
        })
        .await
        .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput, "{err}");
    }
}
