//! PKCE S256, the authorize URL, and the `CODE#STATE` the operator pastes back.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use rand::RngCore as _;
use sha2::{Digest as _, Sha256};

use crate::{OAuthConfig, OAuthError};

/// What a query value may keep unencoded: RFC 3986's unreserved characters.
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// One login's PKCE pair and state. The verifier is a secret: it stays in the process that made it, and
/// `Debug` does not show it.
#[derive(Clone)]
pub struct Pkce {
    verifier: String,
    /// base64url(SHA-256(verifier)), no padding: goes into the authorize URL.
    pub challenge: String,
    /// A random value the pasted answer must carry back.
    pub state: String,
}

impl Pkce {
    /// A fresh pair: 32 random bytes of verifier (base64url, no padding), its S256 challenge, and 32 random
    /// bytes of state.
    pub fn new() -> Pkce {
        let verifier = random_b64(32);
        let challenge = challenge_of(&verifier);
        Pkce {
            verifier,
            challenge,
            state: random_b64(32),
        }
    }

    /// The code verifier, for the token exchange only.
    pub fn verifier(&self) -> &str {
        &self.verifier
    }
}

impl Default for Pkce {
    fn default() -> Self {
        Pkce::new()
    }
}

impl std::fmt::Debug for Pkce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkce")
            .field("verifier", &"[redacted]")
            .field("challenge", &self.challenge)
            .field("state", &self.state)
            .finish()
    }
}

/// base64url(SHA-256(verifier)), no padding (PKCE S256).
pub(crate) fn challenge_of(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

fn random_b64(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rngs::OsRng.fill_bytes(&mut buf);
    URL_SAFE_NO_PAD.encode(buf)
}

fn enc(v: &str) -> String {
    utf8_percent_encode(v, QUERY_VALUE).to_string()
}

/// The URL the operator opens to approve:
/// `AUTHORIZE?code=true&client_id&response_type=code&redirect_uri&scope&code_challenge&code_challenge_method=S256&state`.
pub fn authorize_url(cfg: &OAuthConfig, pkce: &Pkce) -> String {
    let sep = if cfg.authorize_url.contains('?') { '&' } else { '?' };
    format!(
        "{}{sep}code=true&client_id={}&response_type=code&redirect_uri={}&scope={}&code_challenge={}\
         &code_challenge_method=S256&state={}",
        cfg.authorize_url,
        enc(&cfg.client_id),
        enc(&cfg.redirect_uri),
        enc(&cfg.scopes),
        enc(&pkce.challenge),
        enc(&pkce.state),
    )
}

/// The authorization code in what the operator pasted: `CODE#STATE` as the callback page shows it (or the
/// callback URL itself, `…?code=CODE&state=STATE`). Refuses an answer whose state is not `expected_state`
/// ([`OAuthError::StateMismatch`]): it belongs to another login. Errors never repeat the pasted text.
pub fn parse_pasted(pasted: &str, expected_state: &str) -> Result<String, OAuthError> {
    let pasted = pasted.trim();
    if pasted.is_empty() {
        return Err(OAuthError::Malformed(
            "nothing was pasted: expected the code the page shows, CODE#STATE".into(),
        ));
    }
    let (code, state) = if let Some((code, state)) = pasted.split_once('#') {
        (code.trim().to_string(), state.trim().to_string())
    } else if let Some((_, query)) = pasted.split_once('?') {
        let mut code = None;
        let mut state = None;
        for pair in query.split(['&', '#']) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_encoding::percent_decode_str(v).decode_utf8_lossy().to_string();
            match k {
                "code" => code = Some(v),
                "state" => state = Some(v),
                _ => {}
            }
        }
        match (code, state) {
            (Some(c), Some(s)) => (c, s),
            _ => {
                return Err(OAuthError::Malformed(
                    "the pasted URL has no code and state: expected CODE#STATE".into(),
                ))
            }
        }
    } else {
        return Err(OAuthError::Malformed(
            "the pasted text has no '#': expected CODE#STATE, exactly as the page shows it".into(),
        ));
    };
    if code.is_empty() || code.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(OAuthError::Malformed(
            "the pasted code is empty or holds spaces: expected CODE#STATE".into(),
        ));
    }
    if !subtle_eq(state.as_bytes(), expected_state.as_bytes()) {
        return Err(OAuthError::StateMismatch);
    }
    Ok(code)
}

/// Constant-time equality (the state is not much of a secret, but costs nothing to compare so).
fn subtle_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn the_pair_is_s256_and_fresh() {
        let p = Pkce::new();
        assert_eq!(p.verifier().len(), 43, "32 bytes base64url without padding");
        assert!(p
            .verifier()
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
        assert_eq!(p.challenge, challenge_of(p.verifier()));
        assert_eq!(p.state.len(), 43);
        let q = Pkce::new();
        assert_ne!(p.verifier(), q.verifier());
        assert_ne!(p.state, q.state);
        // RFC 7636 appendix B.
        assert_eq!(
            challenge_of("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
    }

    #[test]
    fn debug_hides_the_verifier() {
        let p = Pkce::new();
        let d = format!("{p:?}");
        assert!(!d.contains(p.verifier()), "{d}");
        assert!(d.contains("[redacted]"));
    }

    #[test]
    fn the_authorize_url_has_every_parameter() {
        let p = Pkce::new();
        let cfg = OAuthConfig::default();
        let url = authorize_url(&cfg, &p);
        assert!(url.starts_with("https://claude.ai/oauth/authorize?code=true&client_id=9d1c250a-e61b-44d9-88ed-5944d1962f5e&response_type=code&"), "{url}");
        assert!(url.contains("&redirect_uri=https%3A%2F%2Fplatform.claude.com%2Foauth%2Fcode%2Fcallback&"));
        assert!(url.contains(
            "&scope=org%3Acreate_api_key%20user%3Aprofile%20user%3Ainference%20user%3Asessions%3Aclaude_code&"
        ));
        assert!(url.contains(&format!(
            "&code_challenge={}&code_challenge_method=S256&state={}",
            p.challenge, p.state
        )));
        assert!(!url.contains(p.verifier()));
    }

    #[test]
    fn pasted_codes_are_checked_against_the_state() {
        assert_eq!(parse_pasted(" abc123#st-1 \n", "st-1").unwrap(), "abc123");
        assert_eq!(
            parse_pasted(
                "https://platform.claude.com/oauth/code/callback?code=abc%2D1&state=st-1",
                "st-1"
            )
            .unwrap(),
            "abc-1"
        );
        assert_eq!(parse_pasted("abc123#other", "st-1"), Err(OAuthError::StateMismatch));
        let e = parse_pasted("abc123", "st-1").unwrap_err();
        assert!(
            matches!(e, OAuthError::Malformed(_)) && !e.to_string().contains("abc123"),
            "{e}"
        );
        assert!(matches!(parse_pasted("", "s"), Err(OAuthError::Malformed(_))));
        assert!(matches!(parse_pasted("#s", "s"), Err(OAuthError::Malformed(_))));
    }
}
