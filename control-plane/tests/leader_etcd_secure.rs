//! Leader election on an etcd that has its authentication on (users, roles, short-lived simple
//! tokens) and/or TLS on its client port (a CA the test makes, client certificates), against a real
//! etcd member each test starts (relay-test-support's).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use relay_control_plane::leader::{EtcdCredentials, EtcdOptions, EtcdTls, Leadership, Role};
use relay_control_plane::store::sqlite::SqliteStore;
use relay_control_plane::store::DynStore;
use relay_test_support::etcd::{EtcdSetup, ServerTls, TestEtcd};
use relay_test_support::wait_for;
use std::sync::Arc;
use std::time::Duration;

const PREFIX: &str = "/relay/";
const USER: &str = "relay-cp";
const PASSWORD: &str = "s3cret-etcd-pässword";
const WITHIN: Duration = Duration::from_secs(30);

fn store() -> DynStore {
    Arc::new(SqliteStore::open_in_memory().unwrap()) as DynStore
}

fn opts(etcd: &TestEtcd, password: Option<&str>) -> EtcdOptions {
    let mut o = EtcdOptions::new(&etcd.endpoints);
    o.prefix = PREFIX.to_string();
    o.ttl = Duration::from_secs(3);
    o.credentials = password.map(|p| EtcdCredentials {
        user: USER.to_string(),
        password: p.to_string(),
    });
    o
}

async fn leads(l: &Leadership) -> u64 {
    wait_for(WITHIN, "the replica to lead", || async { l.role().term() })
        .await
        .unwrap()
}

async fn follows(l: &Leadership, leader: &str) {
    let want = Role::Following {
        leader: Some(leader.to_string()),
    };
    wait_for(WITHIN, &format!("the replica to follow {leader}"), || async {
        (l.role() == want).then_some(())
    })
    .await
    .unwrap();
}

/// The replica named in the leader key, read as etcd's root user.
async fn leader_key_holder(etcd: &TestEtcd) -> Option<String> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let token = etcd.root_token().await.unwrap();
    let key = b64.encode(format!("{PREFIX}leader"));
    let v = etcd
        .admin_call("/v3/kv/range", serde_json::json!({ "key": key }), Some(&token))
        .await
        .unwrap();
    let value = b64.decode(v["kvs"][0]["value"].as_str()?).unwrap();
    let value: serde_json::Value = serde_json::from_slice(&value).unwrap();
    value["replica"].as_str().map(str::to_string)
}

/// How many calls of `method` etcd's gRPC server answered with `code` (its /metrics).
async fn handled(etcd: &TestEtcd, method: &str, code: &str) -> u64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = etcd.admin.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let method = format!("grpc_method=\"{method}\"");
    let code = format!("grpc_code=\"{code}\"");
    out.lines()
        .filter(|l| l.starts_with("grpc_server_handled_total{") && l.contains(&method) && l.contains(&code))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_etcd_auth_on_the_right_password_leads_and_a_second_replica_follows() {
    let etcd = TestEtcd::start_with(EtcdSetup::default()).await.unwrap();
    etcd.enable_auth(USER, PASSWORD, PREFIX).await.unwrap();
    let store = store();
    let a = Leadership::etcd(store.clone(), "cp-a", opts(&etcd, Some(PASSWORD))).unwrap();
    leads(&a).await;
    let b = Leadership::etcd(store.clone(), "cp-b", opts(&etcd, Some(PASSWORD))).unwrap();
    follows(&b, "cp-a").await;
    assert_eq!(leader_key_holder(&etcd).await.as_deref(), Some("cp-a"));

    // A wrong password, or none, never gets to read etcd: it cannot even tell who leads, while a
    // replica with the right one (started after it) can.
    let wrong = Leadership::etcd(store.clone(), "cp-wrong", opts(&etcd, Some("not-the-password"))).unwrap();
    let none = Leadership::etcd(store.clone(), "cp-none", opts(&etcd, None)).unwrap();
    let c = Leadership::etcd(store.clone(), "cp-c", opts(&etcd, Some(PASSWORD))).unwrap();
    follows(&c, "cp-a").await;
    assert_eq!(wrong.role(), Role::Following { leader: None });
    assert_eq!(none.role(), Role::Following { leader: None });
    // The wrong password did reach etcd, which refused the login.
    wait_for(WITHIN, "etcd to refuse a login", || async {
        (handled(&etcd, "Authenticate", "InvalidArgument").await >= 1).then_some(())
    })
    .await
    .unwrap();

    // The leader hands over on shutdown; the follower with the password takes over.
    a.shutdown().await;
    let term_b = wait_for(WITHIN, "cp-b or cp-c to lead", || async {
        b.role().term().or_else(|| c.role().term())
    })
    .await
    .unwrap();
    assert!(term_b > 0);
    assert!(!wrong.role().is_leading() && !none.role().is_leading());
    for l in [b, c, wrong, none] {
        l.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_etcd_token_is_replaced_by_logging_in_again_and_the_leader_keeps_leading() {
    // Simple tokens unused for 1 s expire; the leader uses its token every TTL/3 = 3 s.
    let etcd = TestEtcd::start_with(EtcdSetup {
        auth_token_ttl_secs: Some(1),
        ..Default::default()
    })
    .await
    .unwrap();
    etcd.enable_auth(USER, PASSWORD, PREFIX).await.unwrap();
    let mut o = opts(&etcd, Some(PASSWORD));
    o.ttl = Duration::from_secs(9);
    let l = Leadership::etcd(store(), "cp-a", o).unwrap();
    let term = leads(&l).await;
    let changes = l.subscribe();
    let logins = handled(&etcd, "Authenticate", "OK").await;
    // etcd refuses the expired token, and relay logs in again, more than once.
    wait_for(
        Duration::from_secs(60),
        "relay to log in again after its token expired",
        || async {
            let refused = handled(&etcd, "Range", "Unauthenticated").await;
            let now = handled(&etcd, "Authenticate", "OK").await;
            (refused >= 2 && now >= logins + 2).then_some(())
        },
    )
    .await
    .unwrap();
    assert!(!changes.has_changed().unwrap(), "the role changed: {:?}", l.role());
    assert_eq!(l.role().term(), Some(term));
    assert_eq!(leader_key_holder(&etcd).await.as_deref(), Some("cp-a"));
    l.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_given_to_an_etcd_without_auth_are_not_needed_and_it_leads() {
    let etcd = TestEtcd::start_with(EtcdSetup::default()).await.unwrap();
    let store = store();
    let a = Leadership::etcd(store.clone(), "cp-a", opts(&etcd, Some(PASSWORD))).unwrap();
    leads(&a).await;
    let b = Leadership::etcd(store.clone(), "cp-b", opts(&etcd, None)).unwrap();
    follows(&b, "cp-a").await;
    a.shutdown().await;
    b.shutdown().await;
}

/// A CA, etcd's server certificate (localhost, 127.0.0.1; client auth too: etcd's own gateway
/// shows it to etcd's gRPC server), and a client certificate.
struct Pki {
    ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl Pki {
    fn new(name: &str) -> Self {
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name.push(rcgen::DnType::CommonName, name);
        ca.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
        Self {
            ca: rcgen::CertifiedIssuer::self_signed(ca, rcgen::KeyPair::generate().unwrap()).unwrap(),
        }
    }

    fn pem(&self) -> String {
        self.ca.pem()
    }

    fn issue(&self, names: &[&str], usages: Vec<rcgen::ExtendedKeyUsagePurpose>) -> (String, String) {
        self.issue_cn(names, Some(names[0]), usages)
    }

    fn issue_cn(
        &self,
        names: &[&str],
        cn: Option<&str>,
        usages: Vec<rcgen::ExtendedKeyUsagePurpose>,
    ) -> (String, String) {
        let mut p = rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        p.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        }
        p.extended_key_usages = usages;
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.ca).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn server(&self) -> (String, String) {
        use rcgen::ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
        self.issue(&["localhost", "127.0.0.1"], vec![ServerAuth, ClientAuth])
    }

    /// A client certificate without a Common Name: etcd's gateway refuses one with a CN once
    /// etcd's authentication is on.
    fn client(&self) -> (Vec<u8>, Vec<u8>) {
        let (c, k) = self.issue_cn(
            &["relay-control-plane"],
            None,
            vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth],
        );
        (c.into_bytes(), k.into_bytes())
    }

    /// A client certificate with a Common Name.
    fn client_with_cn(&self) -> (Vec<u8>, Vec<u8>) {
        let (c, k) = self.issue(
            &["relay-control-plane"],
            vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth],
        );
        (c.into_bytes(), k.into_bytes())
    }
}

async fn tls_etcd(pki: &Pki, client_cert_auth: bool) -> TestEtcd {
    let (cert_pem, key_pem) = pki.server();
    TestEtcd::start_with(EtcdSetup {
        tls: Some(ServerTls {
            cert_pem,
            key_pem,
            client_ca_pem: client_cert_auth.then(|| pki.pem()),
        }),
        ..Default::default()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_with_the_ca_a_replica_leads_and_a_wrong_ca_never_reads_etcd() {
    let pki = Pki::new("relay test etcd CA");
    let etcd = tls_etcd(&pki, false).await;
    assert!(etcd.endpoints.starts_with("https://localhost:"), "{}", etcd.endpoints);
    etcd.enable_auth(USER, PASSWORD, PREFIX).await.unwrap();
    let store = store();
    let with_ca = |name: &str, ca: String| {
        let mut o = opts(&etcd, Some(PASSWORD));
        o.tls.ca_pem = Some(ca.into_bytes());
        Leadership::etcd(store.clone(), name, o).unwrap()
    };
    let a = with_ca("cp-a", pki.pem());
    leads(&a).await;
    // Another CA does not vouch for etcd's certificate; the public web roots do not either.
    let other = with_ca("cp-other-ca", Pki::new("another CA").pem());
    let web_roots = Leadership::etcd(store.clone(), "cp-web-roots", opts(&etcd, Some(PASSWORD))).unwrap();
    let b = with_ca("cp-b", pki.pem());
    follows(&b, "cp-a").await;
    assert_eq!(other.role(), Role::Following { leader: None });
    assert_eq!(web_roots.role(), Role::Following { leader: None });
    assert_eq!(leader_key_holder(&etcd).await.as_deref(), Some("cp-a"));
    for l in [a, b, other, web_roots] {
        l.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_requiring_client_certificates_takes_the_one_relay_is_given() {
    let pki = Pki::new("relay test etcd CA");
    let etcd = tls_etcd(&pki, true).await;
    let store = store();
    let tls = |identity: Option<(Vec<u8>, Vec<u8>)>| {
        let mut o = opts(&etcd, None);
        o.tls = EtcdTls {
            ca_pem: Some(pki.pem().into_bytes()),
            identity,
        };
        o
    };
    let a = Leadership::etcd(store.clone(), "cp-a", tls(Some(pki.client()))).unwrap();
    leads(&a).await;
    // Without a certificate, or with one another CA signed, etcd ends the handshake.
    let stranger = Pki::new("a stranger's CA");
    let no_cert = Leadership::etcd(store.clone(), "cp-no-cert", tls(None)).unwrap();
    let wrong_cert = Leadership::etcd(store.clone(), "cp-wrong-cert", tls(Some(stranger.client()))).unwrap();
    let b = Leadership::etcd(store.clone(), "cp-b", tls(Some(pki.client()))).unwrap();
    follows(&b, "cp-a").await;
    assert_eq!(no_cert.role(), Role::Following { leader: None });
    assert_eq!(wrong_cert.role(), Role::Following { leader: None });
    for l in [a, b, no_cert, wrong_cert] {
        l.shutdown().await;
    }

    // With etcd's authentication on as well: the certificate and the password together. etcd's
    // gateway then refuses a certificate that carries a Common Name (whatever the password).
    etcd.enable_auth(USER, PASSWORD, PREFIX).await.unwrap();
    let with_password = |identity| {
        let mut o = tls(Some(identity));
        o.credentials = opts(&etcd, Some(PASSWORD)).credentials;
        o
    };
    let cn = Leadership::etcd(store.clone(), "cp-cn", with_password(pki.client_with_cn())).unwrap();
    let c = Leadership::etcd(store.clone(), "cp-c", with_password(pki.client())).unwrap();
    let term = leads(&c).await;
    let d = Leadership::etcd(store.clone(), "cp-d", with_password(pki.client())).unwrap();
    follows(&d, "cp-c").await;
    assert_eq!(cn.role(), Role::Following { leader: None });
    assert!(term > 0);
    for l in [c, d, cn] {
        l.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_files_with_a_plain_http_endpoint_or_mixed_schemes_are_refused() {
    let pki = Pki::new("relay test etcd CA");
    let mut o = EtcdOptions::new("http://127.0.0.1:2379");
    o.tls.ca_pem = Some(pki.pem().into_bytes());
    let e = Leadership::etcd(store(), "cp", o).unwrap_err().to_string();
    assert!(e.contains("http://127.0.0.1:2379") && e.contains("use https://"), "{e}");

    let o = EtcdOptions::new("https://etcd-0:2379,http://etcd-1:2379");
    let e = Leadership::etcd(store(), "cp", o).unwrap_err().to_string();
    assert!(e.contains("mix http:// and https://"), "{e}");

    let mut o = EtcdOptions::new("https://etcd-0:2379");
    o.tls.ca_pem = Some(b"not a certificate".to_vec());
    let e = Leadership::etcd(store(), "cp", o).unwrap_err().to_string();
    assert!(e.contains("no PEM certificate"), "{e}");

    let mut o = EtcdOptions::new("https://etcd-0:2379");
    o.tls.identity = Some((
        pki.client().0,
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n".to_vec(),
    ));
    let e = Leadership::etcd(store(), "cp", o).unwrap_err().to_string();
    assert!(e.contains("etcd TLS") && e.contains("key"), "{e}");
    assert!(!e.contains("AAAA"), "the key's content in an error: {e}");
}
