//! Secrets out of bodies: the one redaction of an account's credentials (and a client's key)
//! from bytes relay passes on, stores or shows. An upstream may quote the credential it was sent in
//! an error ("Incorrect API key provided: sk-ant-…", whole or in part); relay must not hand it to
//! its client, put it in the request log, a capture, an account's state or the audit log. Used by
//! the data plane's attempt stage on an upstream's error body (before the client, the health judge
//! and the request log see it; bounded, and only error answers pay for it), by capture on the
//! bodies it stores, and by the control plane's account probe on the error it reports.
//!
//! Each occurrence is replaced by the secret's [`mask`] (`sk-ant…wxyz`), JSON-safe, so an
//! Anthropic error body keeps its shape. Found: the whole secret; any run of at least
//! [`MIN_PARTIAL`] of its characters (its last 20, a middle part); the start of one that a size
//! bound left at the very end; one spanning two chunks of a stream.

use crate::v1 as pb;
use bytes::Bytes;
use std::collections::HashMap;

/// The shortest secret redacted (a shorter one would match ordinary text).
pub const MIN_REDACTED: usize = 8;
/// The shortest part of a longer secret that is redacted where it appears alone: longer than
/// the fixed prefixes keys share (`sk-ant-api03-` is 13), so only the secret's own characters
/// match.
pub const MIN_PARTIAL: usize = 16;

/// The secrets an account's config holds, as they may be quoted: its credential (API key or
/// OAuth access token) and its outbound proxy's password (as configured and decoded). Each also
/// as a JSON string escapes it, when that differs. Shorter than [`MIN_REDACTED`]: left out.
pub fn account_secrets(a: &pb::Account) -> Vec<String> {
    secrets(&a.credential, &a.proxy_url)
}

/// The secrets of a credential and an outbound proxy URL ("" for none), as [`account_secrets`].
pub fn secrets(credential: &str, proxy_url: &str) -> Vec<String> {
    let mut raw = vec![credential.to_string()];
    if !proxy_url.is_empty() {
        if let Ok(p) = crate::validate::parse_proxy_url(proxy_url) {
            if let Some((_, pass)) = p.auth {
                raw.push(pass);
            }
        }
        // As written in the URL (percent-encoded).
        if let Some((userinfo, _)) = proxy_url.split_once("://").and_then(|(_, rest)| rest.rsplit_once('@')) {
            if let Some((_, pass)) = userinfo.split_once(':') {
                raw.push(pass.to_string());
            }
        }
    }
    normalized(raw)
}

/// `raw` with JSON-escaped forms added, short ones dropped, sorted, without duplicates.
pub fn normalized(raw: Vec<String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(raw.len() * 2);
    for s in raw {
        if let Ok(quoted) = serde_json::to_string(&s) {
            let escaped = quoted.trim_start_matches('"').trim_end_matches('"').to_string();
            if escaped != s {
                out.push(escaped);
            }
        }
        out.push(s);
    }
    out.retain(|s| s.len() >= MIN_REDACTED);
    out.sort();
    out.dedup();
    out
}

/// `body` with every secret replaced ([`redact`] on one piece), and how many were; `body`
/// itself when none was. A JSON body that writes characters as `\u` escapes (`\u0073k-ant-…`,
/// which every JSON reader decodes and a byte search does not see) is searched as serde_json
/// writes it (those escapes decoded), and is given so when a secret was in it.
pub fn redact_body(body: Vec<u8>, secrets: &[String]) -> (Vec<u8>, usize) {
    if secrets.is_empty() {
        return (body, 0);
    }
    let decoded = memchr::memmem::find(&body, b"\\u")
        .and_then(|_| serde_json::from_slice::<serde_json::Value>(&body).ok())
        .and_then(|v| serde_json::to_vec(&v).ok());
    let piece = Bytes::from(decoded.unwrap_or_else(|| body.clone()));
    let (mut out, n) = redact(std::slice::from_ref(&piece), secrets);
    match out.pop() {
        Some(b) if n > 0 => (b.to_vec(), n),
        _ => (body, 0),
    }
}

/// `pieces` (the chunks of one byte string) with every occurrence of a secret, whole or
/// partial, replaced by its [`mask`] (one spanning two chunks goes where it starts), and the
/// number of places replaced. Unchanged (and 0) when none is there.
pub fn redact(pieces: &[Bytes], secrets: &[String]) -> (Vec<Bytes>, usize) {
    if secrets.is_empty() {
        return (pieces.to_vec(), 0);
    }
    let all: Vec<u8> = if pieces.len() == 1 {
        pieces.first().map(|p| p.to_vec()).unwrap_or_default()
    } else {
        pieces.iter().flat_map(|p| p.iter().copied()).collect()
    };
    let mut found: Vec<(usize, usize, &str)> = Vec::new();
    for s in secrets {
        find(&all, s, &mut found);
    }
    if found.is_empty() {
        return (pieces.to_vec(), 0);
    }
    found.sort_by_key(|f| (f.0, std::cmp::Reverse(f.1)));
    // Disjoint ranges, each with the mask of the secret found first there.
    let mut ranges: Vec<(usize, usize, String)> = Vec::new();
    for (a, b, s) in found {
        match ranges.last_mut() {
            Some(last) if a < last.1 => last.1 = last.1.max(b),
            _ => ranges.push((a, b, json_safe_mask(s))),
        }
    }
    let count = ranges.len();
    let mut out = Vec::with_capacity(pieces.len());
    let mut start = 0usize;
    let mut next = 0usize;
    for p in pieces {
        let end = start + p.len();
        let mut buf = Vec::with_capacity(p.len());
        let mut i = start;
        while i < end {
            while ranges.get(next).is_some_and(|r| r.1 <= i) {
                next += 1;
            }
            match ranges.get(next) {
                Some((a, b, m)) if *a <= i => {
                    if *a == i {
                        buf.extend_from_slice(m.as_bytes());
                    }
                    i = (*b).min(end);
                }
                Some((a, _, _)) => {
                    let to = (*a).min(end);
                    buf.extend_from_slice(all.get(i..to).unwrap_or_default());
                    i = to;
                }
                None => {
                    buf.extend_from_slice(all.get(i..end).unwrap_or_default());
                    i = end;
                }
            }
        }
        out.push(Bytes::from(buf));
        start = end;
    }
    (out, count)
}

/// Where `secret` is in `hay`, whole or partly, added to `found` as byte ranges.
fn find<'s>(hay: &[u8], secret: &'s str, found: &mut Vec<(usize, usize, &'s str)>) {
    let needle = secret.as_bytes();
    if needle.len() < MIN_REDACTED {
        return;
    }
    if needle.len() <= MIN_PARTIAL {
        for at in memchr::memmem::find_iter(hay, needle) {
            found.push((at, at + needle.len(), secret));
        }
    } else {
        // Every window of MIN_PARTIAL bytes of the secret; a hit is grown both ways as far as
        // it follows the secret.
        let mut windows: HashMap<&[u8], Vec<usize>> = HashMap::new();
        for (p, w) in needle.windows(MIN_PARTIAL).enumerate() {
            windows.entry(w).or_default().push(p);
        }
        let mut i = 0usize;
        while i + MIN_PARTIAL <= hay.len() {
            let Some(positions) = hay.get(i..i + MIN_PARTIAL).and_then(|w| windows.get(w)) else {
                i += 1;
                continue;
            };
            let mut furthest = i + MIN_PARTIAL;
            for &p in positions {
                let mut a = i;
                let mut q = p;
                while a > 0 && q > 0 && hay.get(a - 1) == needle.get(q - 1) {
                    a -= 1;
                    q -= 1;
                }
                let mut b = i + MIN_PARTIAL;
                let mut r = p + MIN_PARTIAL;
                while b < hay.len() && r < needle.len() && hay.get(b) == needle.get(r) {
                    b += 1;
                    r += 1;
                }
                found.push((a, b, secret));
                furthest = furthest.max(b);
            }
            // A later distinct hit must reach past this one.
            i = (i + 1).max(furthest + 1 - MIN_PARTIAL);
        }
    }
    // The start of the secret left at the very end (a size bound cut it).
    if let Some(k) = (MIN_REDACTED..needle.len())
        .rev()
        .find(|k| needle.get(..*k).is_some_and(|head| hay.ends_with(head)))
    {
        found.push((hay.len() - k, hay.len(), secret));
    }
}

/// [`mask`], with any character a JSON string would have to escape shown as `*`, so that the
/// mask keeps a JSON body whole.
fn json_safe_mask(secret: &str) -> String {
    mask(secret)
        .chars()
        .map(|c| {
            if c == '"' || c == '\\' || c.is_control() {
                '*'
            } else {
                c
            }
        })
        .collect()
}

/// A secret as anthropic-proxy shows it: its first characters, an ellipsis, its last four
/// (`sk-ant…wxyz`); an auth scheme (`Bearer`) is kept. Short values show nothing but the
/// ellipsis, so at most a quarter of a value, and never more than ten characters, is shown.
pub fn mask(value: &str) -> String {
    let (scheme, secret) = match value.split_once(' ') {
        Some((s, rest)) if s.eq_ignore_ascii_case("bearer") || s.eq_ignore_ascii_case("basic") => {
            (format!("{s} "), rest.trim())
        }
        _ => (String::new(), value),
    };
    let chars: Vec<char> = secret.chars().collect();
    if chars.len() < 16 {
        return format!("{scheme}…");
    }
    let head = (chars.len() / 4).min(6);
    let first: String = chars.iter().take(head).collect();
    let last: String = chars.iter().skip(chars.len() - 4).collect();
    format!("{scheme}{first}…{last}")
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn text(pieces: &[Bytes]) -> Vec<String> {
        pieces.iter().map(|p| String::from_utf8(p.to_vec()).unwrap()).collect()
    }

    #[test]
    fn secrets_are_redacted_from_bodies_across_chunks_and_at_the_cut() {
        let cred = "sk-ant-api03-ECHOSECRET-abcdefghijklmnop".to_string();
        let key = "rk-client-key-0123456789".to_string();
        let secrets = vec![cred.clone(), key.clone()];
        // Whole in one chunk.
        let (out, n) = redact(&[Bytes::from(format!("Incorrect API key provided: {cred}."))], &secrets);
        assert_eq!(n, 1);
        assert_eq!(
            text(&out),
            vec![format!("Incorrect API key provided: {}.", mask(&cred))]
        );
        // Spanning two chunks (the mask where it starts), with the client's key in a third.
        let (a, b) = cred.split_at(10);
        let pieces = [
            Bytes::from(format!("x {a}")),
            Bytes::from(format!("{b} y")),
            Bytes::from(format!("z {key}")),
        ];
        let (out, n) = redact(&pieces, &secrets);
        assert_eq!(n, 2);
        assert_eq!(
            text(&out),
            vec![
                format!("x {}", mask(&cred)),
                " y".to_string(),
                format!("z {}", mask(&key))
            ]
        );
        // Its start left at the end by a size bound (shorter than a partial run).
        let (out, n) = redact(&[Bytes::from(format!("key: {}", &cred[..10]))], &secrets);
        assert_eq!(n, 1);
        assert!(!text(&out)[0].contains("sk-ant-api"), "{out:?}");
        // Nothing to redact: the same bytes.
        let same = [Bytes::from_static(b"hello"), Bytes::from_static(b" world")];
        assert_eq!(redact(&same, &secrets), (same.to_vec(), 0));
    }

    #[test]
    fn a_part_of_a_secret_is_redacted_and_the_error_keeps_its_shape() {
        let cred = "sk-ant-api03-Zx9Qw8Er7Ty6Ui5Op4As3Df2Gh1Jk0LmNbVcXz-AAAAAAAA".to_string();
        let secrets = normalized(vec![cred.clone()]);
        let tail = &cred[cred.len() - 20..];
        let middle = &cred[20..40];
        for quoted in [tail, middle, &cred[..30], cred.as_str()] {
            let body = format!(
                r#"{{"type":"error","error":{{"type":"authentication_error","message":"Incorrect API key provided: {quoted}. See docs."}}}}"#
            );
            let (out, n) = redact_body(body.into_bytes(), &secrets);
            assert_eq!(n, 1, "{quoted}");
            let out = String::from_utf8(out).unwrap();
            assert!(!out.contains(&quoted[2..18]), "{out}");
            let v: serde_json::Value = serde_json::from_str(&out).unwrap();
            assert_eq!(v["error"]["type"], "authentication_error");
            assert_eq!(
                v["error"]["message"],
                format!("Incorrect API key provided: {}. See docs.", mask(&cred))
            );
        }
        // The prefix every key shares, or a few of its characters, are not a secret.
        let body = b"keys look like sk-ant-api03-... and end in AAAA".to_vec();
        assert_eq!(redact_body(body.clone(), &secrets), (body, 0));
        // Two quotes, one cut by the bound at the end.
        let body = format!("a {cred} b {}", &cred[..12]);
        let (out, n) = redact_body(body.into_bytes(), &secrets);
        assert_eq!(n, 2);
        assert_eq!(String::from_utf8(out).unwrap(), format!("a {m} b {m}", m = mask(&cred)));
    }

    #[test]
    fn a_secret_written_as_json_unicode_escapes_is_redacted() {
        let cred = "sk-ant-api03-Zx9Qw8Er7Ty6Ui5Op4As3Df2Gh1Jk0LmNbVcXz-AAAAAAAA".to_string();
        let secrets = normalized(vec![cred.clone()]);
        let escaped: String = cred.chars().map(|c| format!("\\u{:04x}", c as u32)).collect();
        let body = format!(
            r#"{{"type":"error","error":{{"type":"authentication_error","message":"Incorrect API key provided: {escaped} \u2014 see docs"}}}}"#
        );
        let (out, n) = redact_body(body.into_bytes(), &secrets);
        assert_eq!(n, 1);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["error"]["type"], "authentication_error");
        assert_eq!(
            v["error"]["message"],
            format!("Incorrect API key provided: {} \u{2014} see docs", mask(&cred))
        );
        // Not JSON, or no secret in it: left as it is.
        let text = format!("key {escaped}").into_bytes();
        assert_eq!(redact_body(text.clone(), &secrets), (text, 0));
        let other = br#"{"type":"error","error":{"type":"api_error","message":"\u2014"}}"#.to_vec();
        assert_eq!(redact_body(other.clone(), &secrets), (other, 0));
    }

    #[test]
    fn an_accounts_secrets_are_its_credential_and_its_proxy_password() {
        let a = pb::Account {
            credential: "sk-ant-oat01-access-token-0123456789".into(),
            proxy_url: "http://user:p%40ss%2Fw0rd-secret@proxy.example:3128".into(),
            ..Default::default()
        };
        let s = account_secrets(&a);
        assert!(s.contains(&a.credential), "{s:?}");
        assert!(s.contains(&"p@ss/w0rd-secret".to_string()), "{s:?}");
        assert!(s.contains(&"p%40ss%2Fw0rd-secret".to_string()), "{s:?}");
        // As a JSON string writes it ("/" may be escaped by some servers: not by serde; a quote is).
        let q = normalized(vec!["abc\"defghijkl".into()]);
        assert!(q.contains(&"abc\\\"defghijkl".to_string()), "{q:?}");
        // A short secret would match ordinary words.
        assert!(normalized(vec!["hunter2".into()]).is_empty());
        // A quote in a secret does not break the JSON it is masked in.
        let secret = "0123456789\"abcdefghij".to_string();
        let body = br#"{"m":"0123456789\"abcdefghij"}"#.to_vec();
        let (out, n) = redact_body(body, &normalized(vec![secret]));
        assert_eq!(n, 1);
        serde_json::from_slice::<serde_json::Value>(&out).unwrap();
    }

    #[test]
    fn secrets_are_masked_as_first_characters_an_ellipsis_and_the_last_four() {
        assert_eq!(mask("sk-ant-api03-abcdefghijklmnopqrstuvwxyz"), "sk-ant…wxyz");
        assert_eq!(mask("Bearer rk-live-0123456789abcdefWXYZ"), "Bearer rk-liv…WXYZ");
        // Too short to show any of it.
        assert_eq!(mask("hunter2"), "…");
    }
}
