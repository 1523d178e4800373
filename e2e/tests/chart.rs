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
