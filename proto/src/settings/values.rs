//! The formats of setting values: browser origins, percentages, fractions, URLs, and how a
//! secret value is shown.

/// How a secret setting's value is shown: a URL as its scheme and host then `…`, anything else
/// as `…` alone (never a character of the secret beyond a URL's host).
pub fn mask(value: &str) -> String {
    let v = value.trim();
    if v.is_empty() {
        return String::new();
    }
    match v.split_once("://") {
        Some((scheme, rest)) if scheme == "http" || scheme == "https" => {
            let host = rest.split(['/', '?', '#']).next().unwrap_or("");
            let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
            format!("{scheme}://{host}/…")
        }
        _ => "…".to_string(),
    }
}

/// Parses a `Percents` value: each percentage in 1..=100, sorted, without repeats.
pub fn parse_percents(value: &str) -> Option<Vec<u64>> {
    let mut out = Vec::new();
    for p in value.split(',').map(str::trim) {
        let n = p.strip_suffix('%').unwrap_or(p).trim().parse::<u64>().ok()?;
        if !(1..=100).contains(&n) {
            return None;
        }
        out.push(n);
    }
    out.sort_unstable();
    out.dedup();
    (!out.is_empty()).then_some(out)
}

/// `http://` or `https://`, then a host (no spaces, no fragment).
pub(super) fn is_http_url(v: &str) -> bool {
    let Some(rest) = v.strip_prefix("https://").or_else(|| v.strip_prefix("http://")) else {
        return false;
    };
    let host = rest.split(['/', '?']).next().unwrap_or("");
    // No `user:password@`: an HTTP client does not send it, and its connection pool logs the
    // authority (put a token in the path, or use notify.signing_secret).
    !host.contains('@')
        && !host.is_empty()
        && !host.starts_with(':')
        && v.chars().all(|c| c.is_ascii_graphic())
        && !v.contains('#')
}

/// The longest `cors.allowed_origins` value, in bytes.
pub const MAX_ORIGINS_BYTES: usize = 4096;

/// What `cors.allowed_origins` allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowedOrigins {
    /// `*`: every origin.
    Any,
    /// These exact origins, lowercased (browsers send scheme and host in lowercase).
    List(Vec<String>),
}

/// Parses a `cors.allowed_origins` value: `*` alone, or exact origins `scheme://host[:port]`,
/// comma-separated. Err: why not, naming the offending origin.
pub fn parse_origins(value: &str) -> Result<AllowedOrigins, String> {
    let v = value.trim();
    if v.is_empty() {
        return Err("no origin given (to turn CORS off: relayctl settings unset cors.allowed_origins)".into());
    }
    if v == "*" {
        return Ok(AllowedOrigins::Any);
    }
    let mut out = Vec::new();
    for o in v.split(',').map(str::trim) {
        check_origin(o)?;
        let o = o.to_ascii_lowercase();
        if !out.contains(&o) {
            out.push(o);
        }
    }
    Ok(AllowedOrigins::List(out))
}

/// One exact origin: `scheme://host[:port]`, nothing else.
fn check_origin(o: &str) -> Result<(), String> {
    let shown: String = o.chars().take(80).collect();
    let bad = |why: &str| Err(format!("{shown:?} {why}"));
    if o.is_empty() {
        return Err("an empty origin (two commas, or one at an end)".into());
    }
    if o == "*" {
        return bad("must stand alone (* allows every origin; it cannot be listed with others)");
    }
    if o.eq_ignore_ascii_case("null") {
        return bad("is not allowed (the null origin is shared by sandboxed pages and local files)");
    }
    if !o.chars().all(|c| c.is_ascii_graphic()) {
        return bad("is not an origin (spaces or characters outside visible ASCII)");
    }
    let Some((scheme, rest)) = o.split_once("://") else {
        return bad("is not an origin: expected scheme://host[:port], such as https://app.example.com");
    };
    let scheme_ok = scheme.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    if !scheme_ok {
        return bad("has no valid scheme: expected scheme://host[:port], such as https://app.example.com");
    }
    if rest.contains(['/', '?', '#']) {
        return bad("has a path, query or fragment: an origin is scheme://host[:port] only (no trailing slash)");
    }
    if rest.contains('@') {
        return bad("has a user name: an origin is scheme://host[:port] only");
    }
    if rest.contains('*') {
        return bad("has a wildcard: list exact origins, or * alone for every origin");
    }
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let Some((addr, after)) = v6.split_once(']') else {
            return bad("has an unclosed [ in its host");
        };
        if addr.is_empty() || !addr.chars().all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.') {
            return bad("has an invalid IPv6 host");
        }
        match after {
            "" => (addr, None),
            p => match p.strip_prefix(':') {
                Some(p) => (addr, Some(p)),
                None => return bad("has something after its host that is not :port"),
            },
        }
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        }
    };
    let host_ok = !host.is_empty()
        && !host.starts_with(['.', '-'])
        && !host.ends_with('-')
        && (rest.starts_with('[')
            || host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.')));
    if !host_ok {
        return bad("has no valid host: expected scheme://host[:port], such as https://app.example.com");
    }
    if let Some(p) = port {
        let n = match p.parse::<u16>() {
            Ok(n) if n > 0 && p.chars().all(|c| c.is_ascii_digit()) && !p.starts_with('0') => n,
            _ => return bad("has an invalid port (1..=65535)"),
        };
        let default = match scheme.to_ascii_lowercase().as_str() {
            "http" | "ws" => Some(80),
            "https" | "wss" => Some(443),
            _ => None,
        };
        if default == Some(n) {
            return bad("names its scheme's default port: browsers send the origin without it, so leave it out");
        }
    }
    Ok(())
}

/// A share in [0, 1] (0: none): values above 1.0 are percentages.
pub fn share(v: f64) -> Option<f64> {
    if v == 0.0 {
        return Some(0.0);
    }
    fraction(v)
}

/// A utilization or threshold as a fraction in (0, 1]: values above 1.0 are percentages.
pub fn fraction(v: f64) -> Option<f64> {
    if !v.is_finite() || v <= 0.0 || v > 100.0 {
        return None;
    }
    Some(if v > 1.0 { v / 100.0 } else { v })
}
