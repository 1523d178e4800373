//! Architecture invariants of the data plane that can be checked mechanically.
//!
//! **Anthropic error bodies come from `errors.rs` only.** The test reads every source file
//! under `data-plane/src/` except `errors.rs` and the test code (`*_tests.rs` files and any
//! item marked `#[cfg(test)]`, found by matching braces with comments and string literals
//! skipped) and fails when the rest builds an Anthropic-format error body:
//! - a string literal holding `event: error` (an SSE error frame), or, once `\"` is unescaped
//!   and whitespace removed, `"type":"error"` (a hand-written JSON error body);
//! - code (comments removed, whitespace ignored) where the literal `"type"` is followed by `:`
//!   and the literal `"error"`, or the literal `"error"` by `:` and `{` (a `serde_json::json!`
//!   error body).
//!
//! Reading an error body (`v["type"] == "error"`, a serde field renamed `"type"`) and prose in
//! comments do not count. `the_check_finds_what_it_must_and_nothing_else` runs the checker on
//! samples of each kind, so a checker that stopped finding them fails too.

use std::path::{Path, PathBuf};

/// Source text reduced to what the check reads: code without comments, each string literal
/// replaced by `"N"` (its index in `literals`), and the literals' contents.
struct Lexed {
    code: String,
    literals: Vec<String>,
}

fn lex(src: &str) -> Lexed {
    let b = src.as_bytes();
    let (mut code, mut literals) = (String::new(), Vec::new());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if c == b'/' && b.get(i + 1) == Some(&b'*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                    depth += 1;
                    i += 2;
                } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if c == b'r' && matches!(b.get(i + 1), Some(b'#' | b'"')) && !ident_before(b, i) {
            // A raw string: r"…", r#"…"#, br#"…"# (the `b` went out as code).
            let mut j = i + 1;
            let mut hashes = 0;
            while b.get(j) == Some(&b'#') {
                hashes += 1;
                j += 1;
            }
            if b.get(j) != Some(&b'"') {
                code.push(c as char);
                i += 1;
                continue;
            }
            let start = j + 1;
            let close: String = std::iter::once('"').chain(std::iter::repeat_n('#', hashes)).collect();
            let end = src[start..].find(&close).map_or(b.len(), |n| start + n);
            literals.push(src[start..end].to_string());
            code.push_str(&format!("\"{}\"", literals.len() - 1));
            i = (end + close.len()).min(b.len());
        } else if c == b'"' {
            let mut j = i + 1;
            let mut text = String::new();
            while j < b.len() && b[j] != b'"' {
                if b[j] == b'\\' && j + 1 < b.len() {
                    // `\"` is a quote; every other escape is kept as written.
                    if b[j + 1] != b'"' {
                        text.push('\\');
                    }
                    text.push(b[j + 1] as char);
                    j += 2;
                } else {
                    let ch = src[j..].chars().next().unwrap_or(' ');
                    text.push(ch);
                    j += ch.len_utf8();
                }
            }
            literals.push(text);
            code.push_str(&format!("\"{}\"", literals.len() - 1));
            i = j + 1;
        } else if c == b'\'' && is_char_literal(b, i) {
            // '{' and '"' must not open anything.
            let end = if b.get(i + 1) == Some(&b'\\') { i + 3 } else { i + 2 };
            let end = b[end..].iter().position(|&x| x == b'\'').map_or(b.len(), |n| end + n);
            code.push_str("' '");
            i = end + 1;
        } else {
            let ch = src[i..].chars().next().unwrap_or(' ');
            code.push(ch);
            i += ch.len_utf8();
        }
    }
    Lexed { code, literals }
}

fn ident_before(b: &[u8], i: usize) -> bool {
    i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_') && b[i - 1] != b'b'
}

/// A char literal (`'x'`, `'\n'`, `'"'`), not a lifetime (`'a`).
fn is_char_literal(b: &[u8], i: usize) -> bool {
    match b.get(i + 1) {
        Some(b'\\') => true,
        Some(_) => b.get(i + 2) == Some(&b'\'') || (b[i + 1] >= 0x80),
        None => false,
    }
}

/// `code` without the items marked `#[cfg(test)]` (a `mod`, `fn` or `use` up to its matching
/// brace or its semicolon).
fn without_tests(code: &str) -> String {
    let mut out = String::new();
    let mut rest = code;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let after = &rest[at..];
        let b = after.as_bytes();
        let mut i = 0;
        while i < b.len() && b[i] != b'{' && b[i] != b';' {
            i += 1;
        }
        if i < b.len() && b[i] == b'{' {
            let mut depth = 0;
            while i < b.len() {
                match b[i] {
                    b'{' => depth += 1,
                    b'}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
        }
        rest = &after[(i + 1).min(after.len())..];
    }
    out.push_str(rest);
    out
}

/// What in `src` builds an Anthropic error body, one line each.
fn error_bodies_built(src: &str) -> Vec<String> {
    let lexed = lex(src);
    let code = without_tests(&lexed.code);
    let squeezed: String = code.chars().filter(|c| !c.is_whitespace()).collect();
    let lit = |n: &str| {
        n.parse::<usize>()
            .ok()
            .and_then(|n| lexed.literals.get(n))
            .map(String::as_str)
    };
    let mut found = Vec::new();
    // The literals the code (tests left out) uses, in order.
    let mut used = Vec::new();
    let s = squeezed.as_bytes();
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'"' {
            let end = squeezed[i + 1..].find('"').map_or(s.len(), |n| i + 1 + n);
            used.push((i, end, lit(&squeezed[i + 1..end]).unwrap_or("")));
            i = end + 1;
        } else {
            i += 1;
        }
    }
    for (_, _, text) in &used {
        let flat: String = text.chars().filter(|c| !c.is_whitespace()).collect();
        if text.contains("event: error") || text.contains("event:error") {
            found.push(format!("an SSE `event: error` frame in {text:?}"));
        } else if flat.contains(r#""type":"error""#) {
            found.push(format!("a JSON error body in {text:?}"));
        }
    }
    for w in used.windows(2) {
        let ((_, a_end, a), (b_start, _, b)) = (w[0], w[1]);
        let between = &squeezed[a_end + 1..b_start];
        if a == "type" && between == ":" && b == "error" {
            found.push("`\"type\": \"error\"` in code (a json! error body)".to_string());
        }
    }
    for (_, end, text) in &used {
        if text == &"error" && squeezed[end + 1..].starts_with(":{") {
            found.push("`\"error\": {` in code (a json! error body)".to_string());
        }
    }
    found
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn anthropic_error_bodies_are_built_only_in_errors_rs() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    assert!(
        files.len() > 20,
        "found only {} source files under {}",
        files.len(),
        src.display()
    );
    let mut violations = Vec::new();
    for f in files {
        let name = f.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if f == src.join("errors.rs") || name.ends_with("_tests.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap_or_default();
        for v in error_bodies_built(&text) {
            violations.push(format!("{}: {v}", f.strip_prefix(&src).unwrap_or(&f).display()));
        }
    }
    assert!(
        violations.is_empty(),
        "Anthropic error bodies are built by data-plane/src/errors.rs only; found elsewhere:\n{}",
        violations.join("\n")
    );
    // And errors.rs does build them: the check looks at the right thing.
    let errors = std::fs::read_to_string(src.join("errors.rs")).unwrap_or_default();
    assert!(error_bodies_built(&errors).len() >= 2);
}

#[test]
fn the_check_finds_what_it_must_and_nothing_else() {
    let built = [
        r#"fn f(m: &str) -> String { serde_json::json!({"type": "error", "error": {"type": "api_error", "message": m}}).to_string() }"#,
        r#"fn f() -> Bytes { Bytes::from_static(b"event: error\ndata: {}\n\n") }"#,
        r#"fn f() -> String { format!("event: error\ndata: {data}\n\n") }"#,
        r#"const B: &str = "{\"type\":\"error\",\"error\":{\"type\":\"api_error\",\"message\":\"x\"}}";"#,
        r##"const B: &str = r#"{"type": "error", "error": {"type": "api_error"}}"#;"##,
        r#"fn f() -> serde_json::Value { json!({ "error": { "message": "x" } }) }"#,
        // Code after a test module is still checked.
        "#[cfg(test)]\nmod tests { fn t() {} }\nfn f() -> String { format!(\"event: error\\n\") }",
    ];
    for s in built {
        assert!(!error_bodies_built(s).is_empty(), "not found in: {s}");
    }
    let fine = [
        // Reading an error body, a serde rename, comments and doc comments, test code.
        r#"fn f(v: &serde_json::Value) -> bool { v["type"] == "error" && v["error"].is_object() }"#,
        r#"#[derive(Deserialize)] struct E { #[serde(rename = "type")] kind: String }"#,
        "/// a stream that opens with `event: error`\n// {\"type\":\"error\"}\nfn f() {}",
        "#[cfg(test)]\nmod tests { const B: &str = \"event: error\\n\"; fn t() { let c = '{'; } }",
        r#"fn f() -> &'static str { "overloaded_error" }"#,
    ];
    for s in fine {
        assert_eq!(error_bodies_built(s), Vec::<String>::new(), "in: {s}");
    }
}
