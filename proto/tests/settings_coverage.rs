//! Nothing accepted that is not done: every setting the control plane accepts
//! (`relay_proto::settings::SETTINGS`) is read by the code that serves, outside test modules
//! and comments. A setting is read where its name is
//! - an argument of a call (`settings::known("x")`, `values.get("x")`, `ms(values, "x")`), or
//! - the value of a `const` (`pub const KEY: &str = "x";`) that is itself used elsewhere.
//!
//! A mention anywhere else (a match arm, a JSON key, a list of names, a map insert, a comment)
//! does not count. Where: settings that stay on the control plane (`CONTROL_PLANE_ONLY`) in
//! `control-plane/src`; the OAuth crate's (`READ_OUTSIDE_THE_PLANES`) in `oauth/src`; every
//! other one in `data-plane/src`, `control-plane/src` or `limits/src`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use relay_proto::settings::{CONTROL_PLANE_ONLY, READ_OUTSIDE_THE_PLANES, SETTINGS};
use std::path::Path;

/// The non-test code of every `.rs` file under `dir`, comment lines left out.
fn code_under(dir: &str) -> String {
    fn walk(dir: &Path, out: &mut String) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .flatten()
            .map(|e| e.path())
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let text = std::fs::read_to_string(&p).unwrap();
                let code = text.split("#[cfg(test)]").next().unwrap_or("");
                for line in code.lines().filter(|l| !l.trim_start().starts_with("//")) {
                    out.push_str(line);
                    out.push('\n');
                }
            }
        }
    }
    let mut out = String::new();
    walk(&Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(dir), &mut out);
    out
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The identifier that ends right before byte `end` of `s`.
fn ident_before(s: &str, end: usize) -> &str {
    let start = s[..end].rfind(|c: char| !is_ident(c)).map_or(0, |i| i + 1);
    &s[start..end]
}

/// Whether the string literal at `at..at + len` is an argument of a call that reads it.
fn call_argument(code: &str, at: usize, len: usize) -> bool {
    let next = code[at + len..].trim_start().chars().next();
    if !matches!(next, Some(')' | ',')) {
        return false;
    }
    // The innermost bracket left open before the literal.
    let mut depth = 0i32;
    for (i, c) in code[..at].char_indices().rev() {
        match c {
            ')' | ']' | '}' => depth += 1,
            '(' | '[' | '{' if depth > 0 => depth -= 1,
            '(' => {
                let callee = ident_before(code, i);
                return !callee.is_empty() && !matches!(callee, "insert" | "remove" | "push");
            }
            '[' | '{' => return false,
            _ => {}
        }
    }
    false
}

/// `const NAME: &str = ` right before the literal at `at`: the constant's name.
fn const_name(code: &str, at: usize) -> Option<&str> {
    let line_start = code[..at].rfind('\n').map_or(0, |i| i + 1);
    let decl = code[line_start..at].trim();
    let rest = decl.strip_suffix('=')?.trim_end();
    let rest = rest
        .strip_suffix("&'static str")
        .or_else(|| rest.strip_suffix("&str"))?;
    let rest = rest.trim_end().strip_suffix(':')?.trim_end();
    let name = ident_before(rest, rest.len());
    let before = rest[..rest.len() - name.len()].trim_end();
    (before.ends_with("const") || before.ends_with("static")).then_some(name)
}

/// Whether `code` reads the setting `name` (see the module doc).
fn reads(code: &str, name: &str) -> bool {
    let literal = format!("\"{name}\"");
    code.match_indices(&literal).any(|(at, _)| {
        if call_argument(code, at, literal.len()) {
            return true;
        }
        match const_name(code, at) {
            Some(constant) => {
                let uses = code
                    .match_indices(constant)
                    .filter(|(i, _)| {
                        let before = code[..*i].chars().next_back().is_none_or(|c| !is_ident(c));
                        let after = code[i + constant.len()..].chars().next().is_none_or(|c| !is_ident(c));
                        before && after
                    })
                    .count();
                uses >= 2
            }
            None => false,
        }
    })
}

#[test]
fn every_setting_is_read_by_the_code_that_serves() {
    let control_plane = code_under("control-plane/src");
    let planes = format!(
        "{}{control_plane}{}",
        code_under("data-plane/src"),
        code_under("limits/src")
    );
    let oauth = code_under("oauth/src");
    let mut unread = Vec::new();
    for s in SETTINGS {
        let (code, where_) = if READ_OUTSIDE_THE_PLANES.contains(&s.name) {
            (&oauth, "oauth/src")
        } else if CONTROL_PLANE_ONLY.contains(&s.name) {
            (&control_plane, "control-plane/src")
        } else {
            (&planes, "data-plane/src, control-plane/src or limits/src")
        };
        if !reads(code, s.name) {
            unread.push(format!("{} (not read in {where_})", s.name));
        }
    }
    assert!(
        unread.is_empty(),
        "settings accepted but read nowhere (refuse them, or read them):\n{}",
        unread.join("\n")
    );
}

#[test]
fn the_lists_name_declared_settings() {
    for n in READ_OUTSIDE_THE_PLANES.iter().chain(CONTROL_PLANE_ONLY) {
        assert!(SETTINGS.iter().any(|s| s.name == *n), "{n} is not a declared setting");
    }
}

/// The check tells a read from a mention.
#[test]
fn a_mention_is_not_a_read() {
    let reads_it = [
        r#"let x = settings::known("a.b").bool_in(values);"#,
        r#"let t = ms(values, "a.b");"#,
        r#"let v = values.get("a.b").map(String::as_str);"#,
        r#"f(g(1), "a.b", h[2])"#,
        "pub const KEY: &str = \"a.b\";\nfn f() { settings::known(KEY) }",
        "const KEY: &'static str = \"a.b\";\nlet v = values.get(KEY);",
    ];
    for code in reads_it {
        assert!(reads(code, "a.b"), "should count as a read: {code}");
    }
    let mentions = [
        r#"match p { _ => "a.b" }"#,
        r#"json!({"a.b": 1, "c": 2})"#,
        r#"changed.insert("a.b".into(), v);"#,
        r#"m.insert("a.b", v);"#,
        r#"const NAMES: &[&str] = &["x", "a.b", "y"];"#,
        "pub const KEY: &str = \"a.b\";",
        "pub const KEY: &str = \"a.b\";\nlet KEYS = 1;",
        r#"let s = "a.bc";"#,
        r#"f("a.b".to_string())"#,
    ];
    for code in mentions {
        assert!(!reads(code, "a.b"), "should not count as a read: {code}");
    }
}
