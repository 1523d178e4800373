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

/// The README lists what the data plane serves and does not, says what `--control-plane` takes,
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
    assert!(readme.contains("the replicas' URLs separated by commas"));
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

/// The README's first two fenced commands are the two a newcomer copies on a fresh machine:
/// one script that builds and starts relay standalone, one that runs the whole test suite. The
/// scripts exist, are executable, and do what the README says (without running a release build).
#[test]
fn the_readme_starts_with_two_commands_that_exist() {
    use std::os::unix::fs::PermissionsExt;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let mut blocks = Vec::new();
    let mut current: Option<Vec<&str>> = None;
    for line in readme.lines() {
        if line.trim_start().starts_with("```") {
            match current.take() {
                Some(body) => blocks.push(body),
                None => current = Some(Vec::new()),
            }
        } else if let Some(body) = current.as_mut() {
            body.push(line);
        }
    }
    assert!(blocks.len() >= 2, "the README has fewer than two fenced blocks");
    let first: Vec<&str> = blocks[0].iter().copied().filter(|l| !l.trim().is_empty()).collect();
    let second: Vec<&str> = blocks[1].iter().copied().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(first, ["scripts/standalone.sh"], "the README's first command");
    assert_eq!(second, ["scripts/test.sh"], "the README's second command");
    for script in ["scripts/standalone.sh", "scripts/test.sh"] {
        let meta = std::fs::metadata(root.join(script)).unwrap();
        assert!(meta.permissions().mode() & 0o111 != 0, "{script} is not executable");
        let text = std::fs::read_to_string(root.join(script)).unwrap();
        assert!(text.starts_with("#!/usr/bin/env bash"), "{script} has no shebang");
        let syntax = std::process::Command::new("bash")
            .arg("-n")
            .arg(root.join(script))
            .status()
            .unwrap();
        assert!(syntax.success(), "{script} is not valid bash");
    }
    // The standalone script builds the three binaries and starts the control plane standalone
    // with arguments the binary accepts, and says where the admin token is.
    let standalone = std::fs::read_to_string(root.join("scripts/standalone.sh")).unwrap();
    assert!(standalone.contains("cargo build --release"));
    for package in ["relay-control-plane-bin", "relay-data-plane", "relayctl"] {
        assert!(
            standalone.contains(&format!("-p {package}")),
            "standalone.sh does not build {package}"
        );
    }
    assert!(
        standalone.contains("admin.token"),
        "standalone.sh does not say where the admin token is"
    );
    let exec = standalone
        .lines()
        .find(|l| l.starts_with("exec "))
        .expect("standalone.sh ends by exec-ing the control plane");
    let help = std::process::Command::new(relay_test_support::workspace_bin("relay-control-plane"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in exec.split_whitespace().filter(|w| w.starts_with("--")) {
        assert!(help.contains(flag), "relay-control-plane does not accept {flag}");
    }
    assert!(exec.contains("--standalone") && exec.contains("--data-dir"), "{exec}");
    // The test script runs the whole workspace's tests.
    let test = std::fs::read_to_string(root.join("scripts/test.sh")).unwrap();
    assert!(test.contains("cargo test --workspace --all-targets"));
}

/// The Rust version the README asks for is the workspace's `rust-version`, and every locked
/// dependency builds with it: a newcomer with exactly that toolchain gets a build, not "package X
/// cannot be built because it requires rustc 1.N".
#[test]
fn the_readme_asks_for_a_rust_that_builds_every_locked_dependency() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let msrv = manifest
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .expect("the workspace declares rust-version")
        .trim_matches('"')
        .to_string();
    let minor = |v: &str| -> (u32, u32) {
        let mut parts = v.split('.').map(|p| p.parse::<u32>().unwrap());
        (parts.next().unwrap(), parts.next().unwrap_or(0))
    };
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let asked: Vec<&str> = readme
        .match_indices("Rust toolchain (")
        .map(|(i, m)| readme[i + m.len()..].split('+').next().unwrap())
        .collect();
    assert!(!asked.is_empty(), "the README says which Rust it needs");
    for v in &asked {
        assert_eq!(
            *v, msrv,
            "the README asks for Rust {v}+, the workspace's rust-version is {msrv}"
        );
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let host = std::process::Command::new("rustc").arg("-vV").output().unwrap();
    let host = String::from_utf8_lossy(&host.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_string))
        .unwrap();
    let out = std::process::Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--locked",
            "--offline",
            "--filter-platform",
        ])
        .arg(&host)
        .current_dir(root)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let newer: Vec<String> = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| {
            let v = p["rust_version"].as_str()?;
            (minor(v) > minor(&msrv)).then(|| {
                format!(
                    "{} {} needs {v}",
                    p["name"].as_str().unwrap_or("?"),
                    p["version"].as_str().unwrap_or("?")
                )
            })
        })
        .collect();
    assert!(
        newer.is_empty(),
        "locked dependencies need a newer Rust than rust-version {msrv}: {newer:?}"
    );
}
