//! The Helm chart's security settings, rendered with Helm's own library (helm-python-sdk,
//! installed by scripts/test.sh): TLS by default, bring-your-own and off, mTLS through
//! cert-manager's csi-driver, the control plane's NetworkPolicy, and refusals of settings that
//! cannot work (`helm/tests/render_security.py` holds the checks).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::process::Command;

#[test]
fn chart_secures_the_control_plane_link_by_default() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new("python3")
        .arg(root.join("helm/tests/render_security.py"))
        .arg(root.join("helm/relay"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run python3 ({e}): scripts/test.sh installs it"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "chart rendering checks failed (scripts/test.sh installs helm-python-sdk and pyyaml):\n{text}"
    );
    assert!(text.contains("chart security rendering: ok"), "{text}");
}

/// `helm lint`, then a render under eleven value sets (defaults with secrets, existing Secrets,
/// persistence, HPA, TLS from a Secret with mTLS, TLS from cert-manager with mTLS, TLS off, Redis and etcd, etcd with auth and TLS, ServiceMonitor and
/// PrometheusRule, dashboards, everything at once), every manifest validated with
/// kubernetes-validate (strict: unknown fields fail) against each Kubernetes version Chart.yaml's
/// kubeVersion admits, and the default render compared with helm/tests/snapshots/default.yaml.
/// After a meant change: `RELAY_UPDATE_SNAPSHOTS=1 cargo test -p relay-e2e --test chart`, and
/// commit the snapshot with the change.
#[test]
fn chart_lints_renders_and_validates_on_every_supported_kubernetes() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut cmd = Command::new("python3");
    cmd.arg(root.join("helm/tests/render_matrix.py"))
        .arg(root.join("helm/relay"));
    if std::env::var_os("RELAY_UPDATE_SNAPSHOTS").is_some() {
        cmd.arg("--update");
    }
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run python3 ({e}): scripts/test.sh installs it"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "chart lint/render/validation failed (scripts/test.sh installs helm-python-sdk, pyyaml and kubernetes-validate):\n{text}"
    );
    assert!(text.contains("chart lint, render and validation: ok"), "{text}");
    for set in [
        "existing Secrets",
        "persistence on",
        "HPA on",
        "mTLS on",
        "TLS from cert-manager",
        "Redis and etcd on",
        "etcd with auth and TLS",
        "PrometheusRule on",
        "dashboards on",
    ] {
        assert!(text.contains(set), "value set {set:?} not rendered:\n{text}");
    }
}
