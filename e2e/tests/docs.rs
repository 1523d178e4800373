//! What a new operator reads first: the README's routes, limits and links to the operations docs,
//! and the license the LICENSE file, the README and every crate's `Cargo.toml` agree on.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

#[test]
fn every_crate_declares_the_license_of_the_license_file() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let license = std::fs::read_to_string(root.join("LICENSE")).unwrap();
    assert!(
        license.trim_start().starts_with("Apache License") && license.contains("Version 2.0"),
        "LICENSE is not the Apache License 2.0"
    );
    let workspace = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    assert!(
        workspace.contains("license = \"Apache-2.0\""),
        "[workspace.package] license"
    );
    let members_line = workspace.lines().find(|l| l.starts_with("members")).unwrap();
    let members: Vec<&str> = members_line.split('"').skip(1).step_by(2).collect();
    assert!(members.len() >= 8, "{members:?}");
    for m in members {
        let manifest = std::fs::read_to_string(root.join(m).join("Cargo.toml")).unwrap();
        assert!(
            manifest.contains("license.workspace = true") || manifest.contains("license = \"Apache-2.0\""),
            "{m}/Cargo.toml does not say its license"
        );
    }
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    assert!(readme.contains("Apache License 2.0"), "the README names the license");
}

/// The README lists what the data plane serves and does not, says `--control-plane` takes one URL,
/// and links to sections of the operations docs that exist.
#[test]
fn the_readme_says_what_is_served_and_links_to_existing_sections() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    for route in [
        "POST /v1/messages",
        "POST /v1/messages/count_tokens",
        "GET /v1/models",
        "GET /healthz",
        "GET /readyz",
        "GET /metrics",
    ] {
        assert!(readme.contains(route), "the README does not list {route}");
    }
    assert!(readme.contains("Message Batches API") && readme.contains("Files API"));
    assert!(readme.contains("takes one `--control-plane` URL"));
    let ops = std::fs::read_to_string(root.join("docs/operations.md")).unwrap();
    let anchors: Vec<String> = ops
        .lines()
        .filter_map(|l| l.strip_prefix("## ").or_else(|| l.strip_prefix("### ")))
        .map(|h| {
            h.to_lowercase()
                .chars()
                .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-')
                .map(|c| if c == ' ' { '-' } else { c })
                .collect()
        })
        .collect();
    for section in ["upgrades", "backup-and-restore", "certificates"] {
        let link = format!("docs/operations.md#{section}");
        assert!(readme.contains(&link), "the README does not link {link}");
        assert!(
            anchors.iter().any(|a| a == section),
            "no section {section}: {anchors:?}"
        );
    }
    for link in readme.split("docs/operations.md#").skip(1) {
        let anchor: String = link.chars().take_while(|c| *c != ')' && *c != '`').collect();
        assert!(
            anchors.contains(&anchor),
            "a README link to a missing section: #{anchor}"
        );
    }
}
