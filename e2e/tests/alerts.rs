//! The alerting rules shipped with the chart (`helm/relay/alerts/`) are valid
//! Prometheus rules and fire as their unit tests say, checked with Prometheus'
//! own `promtool` (installed by scripts/test.sh from Debian's `prometheus`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::process::Command;

fn alerts_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../helm/relay/alerts")
}

fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(alerts_dir())
        .output()
        .unwrap_or_else(|e| {
            panic!("promtool is needed (scripts/test.sh installs it: apt-get install prometheus): {e}")
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

#[test]
fn alert_rules_are_valid_and_fire_as_tested() {
    let checked = promtool(&["check", "rules", "relay.rules.yaml"]);
    assert!(checked.contains("SUCCESS"), "{checked}");
    let tested = promtool(&["test", "rules", "relay.rules.test.yaml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
}

/// Every alert names a runbook section that docs/operations.md has.
#[test]
fn every_alert_has_a_runbook() {
    let rules = std::fs::read_to_string(alerts_dir().join("relay.rules.yaml")).unwrap();
    let ops = std::fs::read_to_string(alerts_dir().join("../../../docs/operations.md")).unwrap();
    let mut alerts = 0;
    for line in rules.lines() {
        if let Some(name) = line.trim().strip_prefix("- alert: ") {
            alerts += 1;
            let anchor = format!("operations.md#{}", name.to_lowercase());
            assert!(rules.contains(&anchor), "{name} has no runbook_url {anchor}");
            assert!(
                ops.contains(&format!("### {name}")),
                "docs/operations.md has no section for {name}"
            );
        }
    }
    assert!(alerts >= 3);
}
