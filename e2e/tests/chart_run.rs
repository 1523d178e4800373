//! Runs what the Helm chart renders. The chart is rendered with Helm's own library
//! (`helm/tests/render_json.py`, helm-python-sdk); from the control-plane and data-plane
//! workloads the test takes the container args and env exactly as rendered, resolves Secret
//! references from the rendered Secrets (and `fieldRef`s from the pod name, `$(VAR)` in args as
//! the kubelet does), and starts the real binaries on loopback against a real Postgres, Redis and
//! etcd.
//! Then the probes the chart declares must answer as declared, the data plane must become ready,
//! and a request must go through to the mock upstream.
//!
//! Only what cannot be the same on one machine is remapped, explicitly: a declared containerPort
//! listened on `0.0.0.0:P` becomes `127.0.0.1:<free port>`; a Service's DNS name and port
//! (`relay-control-plane.relay.svc:50051`) becomes `localhost:<the control plane's port>` (the
//! generated certificate names localhost); a volume's mountPath becomes a temp directory (a
//! Secret volume holds the rendered Secret's keys as files; with `tls.mode=cert-manager` and
//! mTLS the test stands in for cert-manager, issuing what the rendered Certificate and the
//! csi.cert-manager.io volume ask for). Every other arg and env value is
//! passed as rendered, so a flag the chart passes that a binary does not accept makes the process
//! exit and fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use base64::Engine;
use common::{mock, sdk_headers, send};
use relay_mock_upstream::MockConfig;
use relay_test_support::{free_port, wait_for, workspace_bin, TestDb};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const NAMESPACE: &str = "relay";

fn render(values: &Value) -> Vec<Value> {
    use std::io::Write;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut child = Command::new("python3")
        .arg(root.join("helm/tests/render_json.py"))
        .arg(root.join("helm/relay"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run python3 ({e}): scripts/test.sh installs it"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(values.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "render failed (scripts/test.sh installs helm-python-sdk):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The cluster's Secrets: what the renders installed. A Secret the chart marks
/// `helm.sh/resource-policy: keep` (the generated TLS Secret, which the chart looks up on
/// upgrade) keeps its first contents, as it does in a cluster.
#[derive(Default)]
struct Cluster {
    secrets: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    /// Stands in for cert-manager when set: issues what a rendered `Certificate` asks for into
    /// its Secret, and what a csi.cert-manager.io volume asks for into the pod's volume.
    cert_manager: Option<common::TestCa>,
}

impl Cluster {
    fn apply(&mut self, docs: &[Value]) {
        self.apply_secrets(docs);
        for c in docs.iter().filter(|d| d["kind"] == "Certificate") {
            let ca = self.cert_manager.as_ref().unwrap_or_else(|| {
                panic!("the chart rendered a cert-manager Certificate, but there is no cert-manager")
            });
            let spec = &c["spec"];
            let secret = spec["secretName"].as_str().unwrap().to_string();
            if self.secrets.contains_key(&secret) {
                continue;
            }
            let names: Vec<&str> = spec["dnsNames"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n.as_str().unwrap())
                .collect();
            let usages = spec["usages"].as_array().unwrap();
            assert!(usages.contains(&json!("server auth")), "{usages:?}");
            let (cert, key) = ca.issue(&names, false);
            let data = BTreeMap::from([
                ("tls.crt".to_string(), cert.into_bytes()),
                ("tls.key".to_string(), key.into_bytes()),
                ("ca.crt".to_string(), ca.pem.clone().into_bytes()),
            ]);
            self.secrets.insert(secret, data);
        }
    }

    fn apply_secrets(&mut self, docs: &[Value]) {
        for d in docs.iter().filter(|d| d["kind"] == "Secret") {
            let name = d["metadata"]["name"].as_str().unwrap().to_string();
            let keep = d["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep";
            if keep && self.secrets.contains_key(&name) {
                continue;
            }
            let mut data = BTreeMap::new();
            if let Some(m) = d["data"].as_object() {
                for (k, v) in m {
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(v.as_str().unwrap())
                        .unwrap();
                    data.insert(k.clone(), bytes);
                }
            }
            if let Some(m) = d["stringData"].as_object() {
                for (k, v) in m {
                    data.insert(k.clone(), v.as_str().unwrap().as_bytes().to_vec());
                }
            }
            self.secrets.insert(name, data);
        }
    }

    fn secret(&self, name: &str, key: &str) -> &[u8] {
        self.secrets
            .get(name)
            .and_then(|s| s.get(key))
            .unwrap_or_else(|| panic!("the chart refers to Secret {name} key {key}, which it did not render"))
    }
}

fn workload<'a>(docs: &'a [Value], component: &str) -> &'a Value {
    let found: Vec<&Value> = docs
        .iter()
        .filter(|d| {
            (d["kind"] == "Deployment" || d["kind"] == "StatefulSet")
                && d["metadata"]["labels"]["app.kubernetes.io/component"] == component
        })
        .collect();
    assert_eq!(found.len(), 1, "one {component} workload");
    found[0]
}

/// One container started as the kubelet would start it, remapped for loopback.
struct Pod {
    name: String,
    child: Child,
    /// declared containerPort → the free loopback port it listens on here
    ports: BTreeMap<u64, u16>,
    /// port name → containerPort
    port_names: BTreeMap<String, u64>,
    container: Value,
    log: PathBuf,
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Pod {
    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn port(&self, port: &Value) -> u16 {
        let container_port = match port {
            Value::Number(n) => n.as_u64().unwrap(),
            Value::String(name) => *self.port_names.get(name).unwrap_or_else(|| {
                panic!(
                    "{}: a probe names port {name}, which the container does not declare",
                    self.name
                )
            }),
            other => panic!("port {other}"),
        };
        *self.ports.get(&container_port).unwrap_or_else(|| {
            panic!(
                "{}: a probe uses port {container_port}, which the container does not declare",
                self.name
            )
        })
    }

    /// Panics with the process's output when it has exited (a refused flag, a bad setting).
    fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!(
                "{} exited ({status}) with the args and env the chart renders:\n{}",
                self.name,
                self.logs()
            );
        }
    }

    /// Does the probe answer as the chart declares it (TCP accepts, HTTP 200-399)?
    async fn probe(&self, probe: &Value) -> bool {
        if let Some(tcp) = probe.get("tcpSocket") {
            let port = self.port(&tcp["port"]);
            return tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok();
        }
        if let Some(get) = probe.get("httpGet") {
            let port = self.port(&get["port"]);
            let path = get["path"].as_str().unwrap();
            assert!(get.get("scheme").is_none_or(|s| s == "HTTP"), "{probe}");
            let url = format!("http://127.0.0.1:{port}{path}");
            return match common::try_send("GET", &url).await {
                Some(r) => (200..400).contains(&r.status),
                None => false,
            };
        }
        panic!("{}: a probe this test cannot run: {probe}", self.name)
    }

    /// Waits until each of the container's probes answers.
    async fn wait_probes(&mut self) {
        for kind in ["startupProbe", "livenessProbe", "readinessProbe"] {
            let probe = self.container[kind].clone();
            assert!(probe.is_object(), "{}: no {kind}", self.name);
            let this = &*self;
            let answered = wait_for(Duration::from_secs(60), kind, || {
                let probe = probe.clone();
                async move { this.probe(&probe).await.then_some(()) }
            })
            .await;
            self.assert_running();
            if answered.is_err() {
                panic!("{}: the {kind} {probe} never answered:\n{}", self.name, self.logs());
            }
        }
    }
}

/// Starts `workload`'s first container as pod `pod_name`. `services` maps a Service's
/// `host:port` to the loopback address that serves it.
fn start_pod(
    cluster: &Cluster,
    workload: &Value,
    pod_name: &str,
    services: &BTreeMap<String, String>,
    dir: &Path,
) -> Pod {
    let spec = &workload["spec"]["template"]["spec"];
    let container = spec["containers"][0].clone();
    let image = container["image"].as_str().unwrap();
    let binary = image.split(':').next().unwrap();
    let pod_dir = dir.join(pod_name);
    std::fs::create_dir_all(&pod_dir).unwrap();

    // Ports: each declared containerPort gets a free loopback port.
    let mut ports = BTreeMap::new();
    let mut port_names = BTreeMap::new();
    for p in container["ports"].as_array().unwrap() {
        let cp = p["containerPort"].as_u64().unwrap();
        ports.insert(cp, free_port());
        if let Some(n) = p["name"].as_str() {
            port_names.insert(n.to_string(), cp);
        }
    }

    // Volumes: each mountPath becomes a directory; a Secret volume holds its keys as files.
    let volumes: BTreeMap<String, Value> = spec["volumes"]
        .as_array()
        .map(|vs| {
            vs.iter()
                .map(|v| (v["name"].as_str().unwrap().to_string(), v.clone()))
                .collect()
        })
        .unwrap_or_default();
    let mut mounts: Vec<(String, PathBuf)> = Vec::new();
    for m in container["volumeMounts"].as_array().into_iter().flatten() {
        let mount_path = m["mountPath"].as_str().unwrap().to_string();
        let name = m["name"].as_str().unwrap();
        let local = pod_dir.join(format!("vol-{name}"));
        std::fs::create_dir_all(&local).unwrap();
        match volumes.get(name) {
            Some(v) if v.get("secret").is_some() => {
                let secret = v["secret"]["secretName"].as_str().unwrap();
                let keys: Vec<String> = cluster
                    .secrets
                    .get(secret)
                    .unwrap_or_else(|| panic!("volume {name}: Secret {secret} is not rendered"))
                    .keys()
                    .cloned()
                    .collect();
                // `items` projects the named keys to the given paths (only those), as the kubelet does.
                let files: Vec<(String, String)> = match v["secret"]["items"].as_array() {
                    Some(items) => items
                        .iter()
                        .map(|i| {
                            let key = i["key"].as_str().unwrap().to_string();
                            (key, i["path"].as_str().unwrap().to_string())
                        })
                        .collect(),
                    None => keys.into_iter().map(|k| (k.clone(), k)).collect(),
                };
                for (k, path) in files {
                    std::fs::write(local.join(path), cluster.secret(secret, &k)).unwrap();
                }
            }
            Some(v) if v["csi"]["driver"] == "csi.cert-manager.io" => {
                let ca = cluster.cert_manager.as_ref().unwrap_or_else(|| {
                    panic!("volume {name}: cert-manager's csi-driver, but there is no cert-manager")
                });
                let attrs = &v["csi"]["volumeAttributes"];
                let names = attrs["csi.cert-manager.io/dns-names"]
                    .as_str()
                    .unwrap()
                    .replace("${POD_NAME}", pod_name);
                let names: Vec<&str> = names.split(',').collect();
                let usages = attrs["csi.cert-manager.io/key-usages"].as_str().unwrap();
                assert!(usages.contains("client auth"), "{usages}");
                let (cert, key) = ca.issue(&names, true);
                std::fs::write(local.join("tls.crt"), cert).unwrap();
                std::fs::write(local.join("tls.key"), key).unwrap();
                std::fs::write(local.join("ca.crt"), &ca.pem).unwrap();
            }
            Some(v) if v.get("emptyDir").is_some() => {}
            // A StatefulSet's volumeClaimTemplates: an empty volume too.
            None if workload["kind"] == "StatefulSet" => {}
            other => panic!("volume {name}: a kind this test does not provide: {other:?}"),
        }
        mounts.push((mount_path, local));
    }
    // Longest mountPath first, so /etc/relay/tls/x is not taken for /etc/relay/….
    mounts.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));

    let remap = |value: &str| -> String {
        let mut v = value.to_string();
        for (cp, local) in &ports {
            for any in ["0.0.0.0", "[::]"] {
                v = v.replace(&format!("{any}:{cp}"), &format!("127.0.0.1:{local}"));
            }
        }
        for (service, local) in services {
            v = v.replace(service, local);
        }
        // One mount per value (the temp directories are under /tmp, itself a mountPath).
        let (flag, path) = match v.split_once('=') {
            Some((f, p)) if f.starts_with("--") => (format!("{f}="), p.to_string()),
            _ => (String::new(), v.clone()),
        };
        for (mount, local) in &mounts {
            if path == *mount || path.starts_with(&format!("{mount}/")) {
                return format!("{flag}{}{}", local.display(), &path[mount.len()..]);
            }
        }
        v
    };

    // Env, as the kubelet resolves it.
    let mut env: Vec<(String, String)> = Vec::new();
    for e in container["env"].as_array().into_iter().flatten() {
        let name = e["name"].as_str().unwrap().to_string();
        let value = if let Some(v) = e.get("value") {
            v.as_str().unwrap().to_string()
        } else if let Some(r) = e["valueFrom"].get("secretKeyRef") {
            let bytes = cluster.secret(r["name"].as_str().unwrap(), r["key"].as_str().unwrap());
            String::from_utf8(bytes.to_vec()).unwrap()
        } else if let Some(r) = e["valueFrom"].get("fieldRef") {
            match r["fieldPath"].as_str().unwrap() {
                "metadata.name" => pod_name.to_string(),
                "metadata.namespace" => NAMESPACE.to_string(),
                other => panic!("env {name}: fieldRef {other} is not provided by this test"),
            }
        } else {
            panic!("env {name}: {e} is not provided by this test")
        };
        env.push((name, remap(&value)));
    }
    assert!(
        container.get("envFrom").is_none(),
        "envFrom is not provided by this test"
    );
    // Args: $(VAR) expands from the container's env, as the kubelet does.
    let args: Vec<String> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let mut a = a.as_str().unwrap().to_string();
            for (k, v) in &env {
                a = a.replace(&format!("$({k})"), v);
            }
            remap(&a)
        })
        .collect();
    for a in args.iter().chain(env.iter().map(|(_, v)| v)) {
        assert!(
            !a.contains("0.0.0.0") && !a.contains(".svc") && !a.contains("$("),
            "{pod_name}: a value this test did not map to loopback: {a}"
        );
    }
    assert!(container.get("command").is_none(), "the image's entrypoint runs");

    let log = pod_dir.join("output.log");
    let out = std::fs::File::create(&log).unwrap();
    let child = Command::new(workspace_bin(binary))
        .args(&args)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .current_dir(&pod_dir)
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {binary}: {e}"));
    Pod {
        name: pod_name.to_string(),
        child,
        ports,
        port_names,
        container,
        log,
    }
}

fn relayctl(server: &str, ca: &Path, token: &str, args: &[&str], stdin: Option<&str>) -> String {
    common::relayctl_with(server, token, &[("RELAY_CA_FILE", ca.as_os_str())], args, stdin)
}

#[tokio::test(flavor = "multi_thread")]
async fn what_the_chart_renders_runs_and_serves_a_request() {
    install_run_and_serve(None, false).await;
}

/// The same with `tls.mode=cert-manager` and mTLS (`tls.clientAuth`): the test stands in for
/// cert-manager, issuing from one CA exactly what the rendered `Certificate` asks for (the control
/// plane's names, into the Secret it names) and what the data plane's csi.cert-manager.io volume
/// asks for (a client certificate for the pod's name); the CA's Secret is the one the operator
/// names in `tls.clientAuth.caSecret`. The control plane then accepts the data plane by its
/// certificate, and a request goes through.
#[tokio::test(flavor = "multi_thread")]
async fn what_the_chart_renders_with_cert_manager_and_mtls_runs_and_serves_a_request() {
    install_run_and_serve(
        Some(json!({
            "mode": "cert-manager",
            "certManager": {"issuer": {"name": "relay-ca", "kind": "ClusterIssuer"}},
            "clientAuth": {"enabled": true, "issuer": {"name": "relay-ca", "kind": "ClusterIssuer"}, "caSecret": "relay-dp-ca"},
        })),
        false,
    )
    .await;
}

/// The same against an etcd with its authentication on, TLS on its client port and client
/// certificates required: the operator's Secrets hold the etcd user's password, etcd's CA and
/// relay's client certificate; the control plane must lead through etcd, and the password must
/// not show in its logs.
#[tokio::test(flavor = "multi_thread")]
async fn what_the_chart_renders_with_etcd_auth_and_tls_runs_leads_and_serves_a_request() {
    install_run_and_serve(None, true).await;
}

const ETCD_PASSWORD: &str = "chart-run-etcd-pässword";

/// An etcd with TLS, client certificates and authentication on, and the Secrets an operator
/// creates for it; the chart's `etcd` values naming them.
async fn secure_etcd(cluster: &mut Cluster) -> (relay_test_support::etcd::TestEtcd, Value) {
    use relay_test_support::etcd::{EtcdSetup, ServerTls, TestEtcd};
    let ca = common::TestCa::new("relay-test-etcd-ca");
    // etcd's gateway shows etcd's own certificate to etcd's gRPC server: client auth too.
    let (cert_pem, key_pem) = ca.issue_with(
        &["localhost", "127.0.0.1"],
        vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ],
    );
    let etcd = TestEtcd::start_with(EtcdSetup {
        tls: Some(ServerTls {
            cert_pem,
            key_pem,
            client_ca_pem: Some(ca.pem.clone()),
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    etcd.enable_auth("relay-cp", ETCD_PASSWORD, "/relay/").await.unwrap();
    // No Common Name: etcd's gateway refuses a client certificate with one once auth is on.
    let (client_cert, client_key) = ca.issue_cn(
        &["relay-control-plane"],
        None,
        vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth],
    );
    let secret = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect::<BTreeMap<_, _>>()
    };
    let password = format!("{ETCD_PASSWORD}\n");
    cluster
        .secrets
        .insert("etcd-relay-user".into(), secret(&[("etcd-password", &password)]));
    cluster.secrets.insert("etcd-ca".into(), secret(&[("ca.pem", &ca.pem)]));
    cluster.secrets.insert(
        "etcd-relay-client".into(),
        secret(&[("tls.crt", &client_cert), ("tls.key", &client_key)]),
    );
    let values = json!({
        "enabled": true,
        "endpoints": [etcd.endpoints],
        "auth": {"user": "relay-cp", "existingSecret": {"name": "etcd-relay-user", "key": "etcd-password"}},
        "tls": {"caSecret": {"name": "etcd-ca", "key": "ca.pem"}, "clientCertSecret": "etcd-relay-client"},
    });
    (etcd, values)
}

/// Installs the control plane alone, makes the data-plane token, upgrades with the data plane,
/// and sends a request; `tls`: the chart's `tls` values (default: generated certificates);
/// `secure_etcd`: etcd with authentication and TLS (else a plain one).
async fn install_run_and_serve(tls: Option<Value>, secure_etcd: bool) {
    let db = TestDb::new().await.unwrap();
    let upstream = mock(MockConfig::default()).await;
    let redis = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let mut cluster = Cluster::default();
    let (_etcd, etcd_values) = if secure_etcd {
        self::secure_etcd(&mut cluster).await
    } else {
        let etcd = relay_test_support::etcd::TestEtcd::start().await.unwrap();
        let values = json!({"enabled": true, "endpoints": [etcd.endpoints]});
        (etcd, values)
    };
    let dir = tempfile::tempdir().unwrap();
    let admin_token = format!("rat-chart-run-{}", uuid::Uuid::new_v4().simple());
    let master_key = base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>());
    let mut values = json!({
        "secrets": {
            "databaseUrl": {"value": db.url},
            "masterKey": {"value": master_key},
            "adminToken": {"value": admin_token},
        },
        "redis": {"url": redis},
        "etcd": etcd_values,
        "dataPlane": {"enabled": false},
    });
    if let Some(tls) = tls {
        values["tls"] = tls;
        let ca = common::TestCa::new("relay-test-cert-manager");
        // What the operator creates for tls.clientAuth.caSecret: the issuer's CA.
        cluster.secrets.insert(
            "relay-dp-ca".into(),
            BTreeMap::from([("ca.crt".to_string(), ca.pem.clone().into_bytes())]),
        );
        cluster.cert_manager = Some(ca);
    }

    // 1. Install the control plane alone (dataPlane.enabled=false, as the chart says to when
    //    there is no data-plane token yet), create the token, then upgrade with it.
    let docs = render(&values);
    cluster.apply(&docs);
    let cp_workload = workload(&docs, "control-plane").clone();
    let mut cp = start_pod(
        &cluster,
        &cp_workload,
        "relay-control-plane-0",
        &BTreeMap::new(),
        dir.path(),
    );
    cp.wait_probes().await;
    let cp_grpc = cp.port(&json!("grpc"));
    // The metrics port the Service and ServiceMonitor name serves Prometheus' format.
    let metrics = cp.port(&json!("metrics"));
    let m = common::try_send("GET", &format!("http://127.0.0.1:{metrics}/metrics"))
        .await
        .unwrap_or_else(|| panic!("no answer on the metrics port:\n{}", cp.logs()));
    assert_eq!(m.status, 200);
    // The control plane's certificate (generated, or from cert-manager), verified by name
    // (localhost is among its names).
    let tls = cluster
        .secrets
        .keys()
        .find(|name| name.ends_with("-tls"))
        .unwrap()
        .clone();
    let ca = dir.path().join("ca.crt");
    std::fs::write(&ca, cluster.secret(&tls, "ca.crt")).unwrap();
    let server = format!("https://localhost:{cp_grpc}");
    let created: Value = serde_json::from_str(&relayctl(
        &server,
        &ca,
        &admin_token,
        &["-o", "json", "token", "create", "dp", "--role", "data-plane"],
        None,
    ))
    .unwrap();
    let dp_token = created["token"]
        .as_str()
        .unwrap_or_else(|| panic!("{created}"))
        .to_string();
    relayctl(
        &server,
        &ca,
        &admin_token,
        &[
            "account",
            "create",
            "main",
            "--kind",
            "anthropic-compatible",
            "--base-url",
            &upstream.base_url(),
            "--secret-stdin",
        ],
        Some("mock-upstream-credential\n"),
    );
    let key: Value = serde_json::from_str(&relayctl(
        &server,
        &ca,
        &admin_token,
        &["-o", "json", "key", "create", "app"],
        None,
    ))
    .unwrap();
    let key = key["key"].as_str().unwrap().to_string();
    // The one replica leads, elected on etcd.
    let status = wait_for(Duration::from_secs(30), "the control plane to lead on etcd", || {
        let status = relayctl(&server, &ca, &admin_token, &["status"], None);
        async move { status.contains("etcd, leading").then_some(status) }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}:\n{}", cp.logs()));
    assert!(status.contains("leader: relay-control-plane-0 (etcd)"), "{status}");
    assert!(!cp.logs().contains(ETCD_PASSWORD), "the etcd password in the logs");

    // 2. Upgrade with the data-plane token; the Services map to the loopback addresses.
    values["secrets"]["dataPlaneToken"] = json!({"value": dp_token});
    values["dataPlane"]["enabled"] = json!(true);
    let docs = render(&values);
    cluster.apply(&docs);
    assert_eq!(
        workload(&docs, "control-plane")["spec"]["template"]["spec"]["containers"][0]["args"],
        cp_workload["spec"]["template"]["spec"]["containers"][0]["args"],
        "the upgrade changes the control plane's args"
    );
    let mut services = BTreeMap::new();
    for s in docs.iter().filter(|d| d["kind"] == "Service") {
        let name = s["metadata"]["name"].as_str().unwrap();
        for p in s["spec"]["ports"].as_array().unwrap() {
            let target = &p["targetPort"];
            if s["spec"]["selector"]["app.kubernetes.io/component"] == "control-plane" {
                let local = cp.port(target);
                let port = p["port"].as_u64().unwrap();
                for host in [
                    format!("{name}.{NAMESPACE}.svc.cluster.local"),
                    format!("{name}.{NAMESPACE}.svc"),
                ] {
                    services.insert(format!("{host}:{port}"), format!("localhost:{local}"));
                }
            }
        }
    }
    let mut dp = start_pod(
        &cluster,
        workload(&docs, "data-plane"),
        "relay-data-plane-0",
        &services,
        dir.path(),
    );
    // /readyz (the readiness probe) answers only once the data plane has its config.
    dp.wait_probes().await;
    cp.assert_running();

    // 3. A request through the data plane to the mock upstream.
    let http = dp.port(&json!("http"));
    let h = sdk_headers(&key);
    let hs: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let body = common::message_body("claude-sonnet-4-5", false).to_string();
    let url = format!("http://127.0.0.1:{http}/v1/messages");
    let r = wait_for(Duration::from_secs(30), "the key to reach the data plane", || {
        let (url, hs, body) = (url.clone(), hs.clone(), body.clone());
        async move {
            let r = send("POST", &url, &hs, body).await;
            (r.status != 401).then_some(r)
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}:\n{}", dp.logs()));
    assert_eq!(r.status, 200, "{}\n{}", String::from_utf8_lossy(&r.body), dp.logs());
    assert_eq!(upstream.requests().len(), 1, "the request reached the upstream once");
    let proxies: Value = serde_json::from_str(&relayctl(
        &server,
        &ca,
        &admin_token,
        &["-o", "json", "proxies", "list"],
        None,
    ))
    .unwrap();
    assert_eq!(proxies[0]["node_id"], "relay-data-plane-0", "{proxies}");
    dp.assert_running();
    cp.assert_running();
}
