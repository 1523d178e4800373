//! Secrets out of bodies on the data plane. The redaction itself is the one in
//! [`relay_proto::redact`] (the control plane's account probe uses it too); this adds the secrets
//! of an account of the serving config.

pub use relay_proto::redact::*;

/// The secrets of the account `account_id` in `cfg` (none when it is not there).
pub fn secrets_of(cfg: &crate::control::state::ServingConfig, account_id: &str) -> Vec<String> {
    cfg.resources
        .accounts
        .iter()
        .find(|a| a.id == account_id)
        .map(account_secrets)
        .unwrap_or_default()
}

/// `headers` with every secret quoted in a value masked (an upstream may echo the credential it
/// was sent in any header relay passes on: `anthropic-*`, `request-id`, `content-type`), and how
/// many were. In a header the mask's ellipsis is written `...` (header values are ASCII).
pub fn redact_headers(headers: &mut http::HeaderMap, secrets: &[String]) -> usize {
    let mut n = 0;
    for v in headers.values_mut() {
        let (out, k) = redact_body(v.as_bytes().to_vec(), secrets);
        if k > 0 {
            n += k;
            let ascii = String::from_utf8_lossy(&out).replace('…', "...");
            *v = http::HeaderValue::from_str(&ascii).unwrap_or_else(|_| http::HeaderValue::from_static("..."));
        }
    }
    n
}

/// `text` (a header value relay keeps, as the upstream's request id) with every secret masked.
pub fn redact_text(text: &str, secrets: &[String]) -> String {
    match redact_body(text.as_bytes().to_vec(), secrets) {
        (out, n) if n > 0 => String::from_utf8_lossy(&out).replace('…', "..."),
        _ => text.to_string(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_echoed_in_a_header_is_masked_in_ascii() {
        let cred = "sk-ant-api03-Zx9Qw8Er7Ty6Ui5Op4As3Df2Gh1Jk0LmNbVcXz-AAAAAAAA".to_string();
        let secrets = normalized(vec![cred.clone()]);
        let mut h = http::HeaderMap::new();
        h.insert("anthropic-echo", cred.parse().unwrap());
        h.insert(
            "content-type",
            format!("application/json; charset={cred}").parse().unwrap(),
        );
        h.insert("x-upstream-request-id", format!("req_{}", &cred[20..]).parse().unwrap());
        h.insert("anthropic-version", "2023-06-01".parse().unwrap());
        assert_eq!(redact_headers(&mut h, &secrets), 3);
        for (name, v) in &h {
            let v = v.to_str().unwrap();
            assert!(!v.contains(&cred[13..29]) && !v.contains(&cred[30..46]), "{name}: {v}");
        }
        assert_eq!(h["anthropic-echo"], "sk-ant...AAAA");
        assert_eq!(h["content-type"], "application/json; charset=sk-ant...AAAA");
        assert_eq!(h["anthropic-version"], "2023-06-01");
        assert_eq!(redact_text(&format!("req_{cred}"), &secrets), "req_sk-ant...AAAA");
        assert_eq!(redact_text("req_011CTx", &secrets), "req_011CTx");
    }
}
