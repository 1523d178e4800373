//! relay says it is open source: the LICENSE file, the README and every crate's `Cargo.toml`
//! agree on the license.
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
