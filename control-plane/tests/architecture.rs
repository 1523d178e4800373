//! Checks, by reading the sources, the invariant of docs/architecture.md that proto (generated)
//! types appear on the control plane only in `src/api/`: the wire side (the Admin API and its
//! gRPC adapter, Watch, Report, the published config in wire form, the domain ↔ proto
//! conversions). Everywhere else in `control-plane/src`, a path into `relay_proto` may name only
//! the crate's proto-free modules (`metrics`, `settings`, `periods`, `anthropic`, `models`, `hex`,
//! `keyed_hash`, `redact`) and the encoded descriptor
//! set (`FILE_DESCRIPTOR_SET`, bytes for reflection): `relay_proto::v1`, an alias of the crate, a
//! grouped import naming anything else, and the functions over proto types (`config_hash`,
//! `changed`, `delta`, `validate`, ...) all fail. The check is textual: comment lines are skipped.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

/// The parts of `relay_proto` that hold no proto type, usable anywhere.
const PROTO_FREE: &[&str] = &[
    "metrics",
    "settings",
    "periods",
    "anthropic",
    "models",
    "hex",
    "keyed_hash",
    // Its functions over proto types (`account_secrets`) need a `v1` value, which is flagged.
    "redact",
    "FILE_DESCRIPTOR_SET",
];

/// Where proto types may appear, under `control-plane/src`: the wire side, and the web console
/// (which calls the Admin API in process with its request messages, as the gRPC adapter does).
const WIRE_SIDE: &str = "api/";
const CONSOLE: &str = "web/";

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The code of a source file with comment lines (`//`, `///`, `//!`) and block comments blanked.
fn code(src: &str) -> String {
    let mut out = String::new();
    let mut in_block = false;
    for line in src.lines() {
        let t = line.trim_start();
        if in_block {
            if t.contains("*/") {
                in_block = false;
            }
            out.push('\n');
            continue;
        }
        if t.starts_with("/*") {
            in_block = !t.contains("*/");
            out.push('\n');
            continue;
        }
        if !t.starts_with("//") {
            out.push_str(line);
        }
        out.push('\n');
    }
    out
}

/// Every use of `relay_proto` in `code` that names something other than a proto-free part:
/// (line number, what it names).
fn proto_uses(code: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (i, line) in code.lines().enumerate() {
        let mut rest = line;
        while let Some(at) = rest.find("relay_proto") {
            let after = rest[at + "relay_proto".len()..].trim_start();
            let named: Vec<String> = if let Some(path) = after.strip_prefix("::") {
                let path = path.trim_start();
                if let Some(group) = path.strip_prefix('{') {
                    let inner = group.split('}').next().unwrap_or("");
                    inner
                        .split(',')
                        .map(|s| {
                            let item = s.split(" as ").next().unwrap_or("");
                            item.trim().split("::").next().unwrap_or("").trim().to_string()
                        })
                        .filter(|s| !s.is_empty())
                        .collect()
                } else {
                    let ident: String = path.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                    vec![ident]
                }
            } else if after.starts_with("as ") || after.starts_with(';') {
                // `use relay_proto as x;` or `use relay_proto;`: the whole crate under a name.
                vec![format!("relay_proto {}", after.trim_end_matches(';'))]
            } else {
                Vec::new()
            };
            for n in named {
                if !PROTO_FREE.contains(&n.as_str()) && n != "self" {
                    found.push((i + 1, n));
                }
            }
            rest = &rest[at + "relay_proto".len()..];
        }
    }
    found
}

#[test]
fn proto_types_appear_only_on_the_wire_side() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    assert!(
        files.len() > 20,
        "found only {} source files under {}",
        files.len(),
        src.display()
    );
    let mut wrong = Vec::new();
    let mut wire_side_uses = 0;
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap().to_string_lossy().replace('\\', "/");
        let uses = proto_uses(&code(&std::fs::read_to_string(f).unwrap()));
        if rel.starts_with(CONSOLE) {
            continue;
        }
        if rel.starts_with(WIRE_SIDE) {
            wire_side_uses += uses.len();
            continue;
        }
        for (line, what) in uses {
            wrong.push(format!("control-plane/src/{rel}:{line}: relay_proto::{what}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "proto types outside control-plane/src/{WIRE_SIDE} (docs/architecture.md, Architecture invariants): \
         convert in api/ instead\n{}",
        wrong.join("\n")
    );
    // The scan sees proto use where it is: a scanner that finds nothing would pass vacuously.
    assert!(wire_side_uses > 10, "only {wire_side_uses} proto uses found in api/");
}

/// The invariant the test checks is the one the document states.
#[test]
fn the_document_states_this_invariant() {
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/architecture.md")).unwrap();
    let line = doc
        .lines()
        .find(|l| l.starts_with("- Proto types appear only in"))
        .expect("docs/architecture.md states where proto types appear");
    assert!(
        line.contains(&format!("`{WIRE_SIDE}` and `{CONSOLE}` (control plane)")),
        "docs/architecture.md names other control-plane modules than this test: {line}"
    );
}

/// The scanner finds what it must and nothing else.
#[test]
fn the_scan_tells_proto_use_from_proto_free_use() {
    let flagged = |s: &str| proto_uses(&code(s)).into_iter().map(|(_, w)| w).collect::<Vec<_>>();
    assert_eq!(flagged("use relay_proto::v1 as pb;"), ["v1"]);
    assert_eq!(flagged("let r: relay_proto::v1::Resources = x;"), ["v1"]);
    assert_eq!(flagged("use relay_proto::{metrics, v1::Account};"), ["v1"]);
    assert_eq!(flagged("let h = relay_proto::config_hash(&r);"), ["config_hash"]);
    assert_eq!(flagged("use relay_proto as rp;"), ["relay_proto as rp"]);
    assert!(flagged("metrics::counter!(relay_proto::metrics::X).increment(1);").is_empty());
    assert!(flagged("use relay_proto::{self, settings, periods::Periods};").is_empty());
    assert!(flagged("/// see `relay_proto::v1::Resources`\n// relay_proto::v1\nfn f() {}").is_empty());
    assert!(flagged("/*\nrelay_proto::v1\n*/").is_empty());
}
