//! The control plane's Postgres connections honour `sslmode` and `sslrootcert` as libpq does,
//! against a real Postgres server that accepts only TLS (started here with its own CA).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use relay_control_plane::store::pg_tls;
use relay_control_plane::store::postgres::PostgresStore;
use std::time::Duration;

struct Pki {
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

/// A CA and a server certificate for `localhost` only (no IP address in it).
fn pki() -> Pki {
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "relay test Postgres CA");
    ca.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    let issuer = rcgen::CertifiedIssuer::self_signed(ca, rcgen::KeyPair::generate().unwrap()).unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params.distinguished_name.push(rcgen::DnType::CommonName, "localhost");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    Pki {
        ca_pem: issuer.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

/// Connects with relay's TLS rules; Ok(whether the session is encrypted).
async fn connect(url: &str) -> Result<bool, String> {
    let t = pg_tls::target(url).map_err(|e| e.to_string())?;
    let (client, conn) = t.config.connect(t.tls).await.map_err(|e| format!("{e:?}"))?;
    tokio::spawn(conn);
    let row = client
        .query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[])
        .await
        .map_err(|e| e.to_string())?;
    Ok(row.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmode_and_sslrootcert_mean_what_they_mean_to_libpq() {
    let p = pki();
    let port = relay_test_support::start_tls_postgres(&p.cert_pem, &p.key_pem).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &p.ca_pem).unwrap();
    let ca = ca.display();
    let url = |host: &str, params: &str| format!("postgres://postgres@{host}:{port}/postgres?{params}");

    // The server is up once it answers a TLS connection.
    relay_test_support::wait_for(Duration::from_secs(30), "the TLS Postgres server", || async {
        connect(&url("localhost", "sslmode=require")).await.ok()
    })
    .await
    .unwrap();

    // Encrypted, certificate not checked (libpq's require and prefer).
    assert_eq!(connect(&url("127.0.0.1", "sslmode=require")).await, Ok(true));
    assert_eq!(connect(&url("127.0.0.1", "")).await, Ok(true), "prefer is the default");
    // The chain is checked; the name too with verify-full.
    assert_eq!(
        connect(&url("localhost", &format!("sslmode=verify-full&sslrootcert={ca}"))).await,
        Ok(true)
    );
    let wrong_name = connect(&url("127.0.0.1", &format!("sslmode=verify-full&sslrootcert={ca}"))).await;
    assert!(
        wrong_name.as_ref().is_err_and(|e| e.contains("NotValidForName")),
        "{wrong_name:?}"
    );
    assert_eq!(
        connect(&url("127.0.0.1", &format!("sslmode=verify-ca&sslrootcert={ca}"))).await,
        Ok(true),
        "verify-ca does not check the name"
    );
    assert_eq!(
        connect(&url("127.0.0.1", &format!("sslmode=require&sslrootcert={ca}"))).await,
        Ok(true),
        "require with a root certificate checks the chain (as libpq does)"
    );
    // An issuer nobody trusts: refused, with the reason.
    let unknown = connect(&url("localhost", "sslmode=verify-full")).await;
    assert!(
        unknown.as_ref().is_err_and(|e| e.contains("UnknownIssuer")),
        "{unknown:?}"
    );
    let other_ca = dir.path().join("other.pem");
    std::fs::write(&other_ca, pki().ca_pem).unwrap();
    let other = connect(&url(
        "localhost",
        &format!("sslmode=verify-ca&sslrootcert={}", other_ca.display()),
    ))
    .await;
    assert!(other.is_err(), "{other:?}");
    // Plaintext is refused by this server: sslmode=disable cannot reach it.
    assert!(connect(&url("127.0.0.1", "sslmode=disable")).await.is_err());

    // The store itself connects (pool and LISTEN connection) over verified TLS and works.
    let store = PostgresStore::connect(&url("localhost", &format!("sslmode=verify-full&sslrootcert={ca}")), 2)
        .await
        .unwrap();
    use relay_control_plane::store::Store;
    store.head().await.unwrap();
    let refused = PostgresStore::connect(&url("localhost", "sslmode=verify-full"), 2).await;
    assert!(refused.is_err());
}

#[tokio::test]
async fn require_fails_against_a_server_without_tls() {
    // A server that speaks no TLS at all: a listener that answers the SSLRequest with 'N'.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut s, _)) = l.accept().await {
            let mut buf = [0u8; 8];
            if s.read_exact(&mut buf).await.is_ok() {
                let _ = s.write_all(b"N").await;
            }
        }
    });
    let e = connect(&format!(
        "postgres://postgres@127.0.0.1:{port}/postgres?sslmode=require"
    ))
    .await
    .unwrap_err();
    assert!(e.to_lowercase().contains("tls"), "{e}");
}

#[tokio::test]
async fn connection_errors_say_what_went_wrong_and_what_to_do() {
    let server = relay_test_support::server_url();
    let (base, _) = server.rsplit_once('/').unwrap();
    let no_db = format!("{base}/relay_no_such_database_4711");
    let e = match PostgresStore::connect(&no_db, 2).await {
        Err(e) => e.to_string(),
        Ok(_) => panic!("connected to a database that does not exist"),
    };
    assert!(
        e.contains("3D000") && e.contains("relay_no_such_database_4711") && e.contains("create the database"),
        "{e}"
    );
    // Nothing listening.
    let port = relay_test_support::free_port();
    let e = match PostgresStore::connect(&format!("postgres://relay@127.0.0.1:{port}/relay"), 2).await {
        Err(e) => e.to_string(),
        Ok(_) => panic!("connected to nothing"),
    };
    assert!(e.contains("nothing listens there") && e.contains("refused"), "{e}");
}
