//! Console sessions without server-side state: a cookie holding what it is for (an operator's
//! admin token, or a key holder's relay key), the token's or key's **id** (never the secret),
//! the role and the expiry, signed with HMAC-SHA256 under a key derived from the master key, so
//! any control-plane replica accepts it. CSRF tokens are a second MAC over the session cookie,
//! so they are tied to the session. [`Throttle`] rate-limits sign-in attempts per client address.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use subtle::ConstantTimeEq;

/// The operator's session cookie.
pub const SESSION_COOKIE: &str = "relay_session";
/// The key holder's session cookie (`/me`).
pub const ME_COOKIE: &str = "relay_me";
/// How long a session lasts.
pub const SESSION_TTL: Duration = Duration::from_secs(8 * 3600);

/// What a session cookie says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// `admin` (an admin token's session) or `key` (a key holder's).
    pub kind: String,
    /// The admin token's or the relay key's id.
    pub id: String,
    /// The token's role when signed in (a role change ends the session).
    pub role: String,
    /// Unix ms after which the cookie is refused.
    pub exp: i64,
    /// Random, so two sessions of one token have different CSRF tokens.
    pub nonce: String,
}

/// Signs and checks cookies and CSRF tokens.
pub struct Signer {
    secret: [u8; 32],
}

impl Signer {
    pub fn new(secret: [u8; 32]) -> Self {
        Self { secret }
    }

    fn mac(&self, label: &str, data: &str) -> Vec<u8> {
        let mut mac = match <Hmac<Sha256> as Mac>::new_from_slice(&self.secret) {
            Ok(m) => m,
            // HMAC takes a key of any length: unreachable.
            Err(_) => return Vec::new(),
        };
        mac.update(label.as_bytes());
        mac.update(b"\0");
        mac.update(data.as_bytes());
        mac.finalize().into_bytes().to_vec()
    }

    /// The cookie value for `claims`.
    pub fn seal(&self, claims: &Claims) -> String {
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap_or_default());
        let mac = URL_SAFE_NO_PAD.encode(self.mac("cookie", &payload));
        format!("{payload}.{mac}")
    }

    /// The claims of a cookie this deployment signed, of `kind`, not expired at `now_ms`; None
    /// for anything else (garbled, forged, expired, of the other kind).
    pub fn open(&self, cookie: &str, kind: &str, now_ms: i64) -> Option<Claims> {
        let (payload, mac) = cookie.split_once('.')?;
        let given = URL_SAFE_NO_PAD.decode(mac).ok()?;
        let want = self.mac("cookie", payload);
        if want.is_empty() || !bool::from(want.ct_eq(&given)) {
            return None;
        }
        let claims: Claims = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()?;
        (claims.kind == kind && claims.exp > now_ms).then_some(claims)
    }

    /// The CSRF token of the session whose cookie is `cookie`.
    pub fn csrf(&self, cookie: &str) -> String {
        URL_SAFE_NO_PAD.encode(self.mac("csrf", cookie))
    }

    /// The signature of a notice a page shows after a write.
    pub fn notice(&self, text: &str) -> String {
        URL_SAFE_NO_PAD.encode(self.mac("notice", text))
    }

    /// Whether `sig` is `text`'s notice signature (constant time).
    pub fn notice_ok(&self, text: &str, sig: &str) -> bool {
        !sig.is_empty() && bool::from(self.notice(text).as_bytes().ct_eq(sig.as_bytes()))
    }

    /// Whether `given` is the CSRF token of the session `cookie` (constant time).
    pub fn csrf_ok(&self, cookie: &str, given: &str) -> bool {
        !given.is_empty() && bool::from(self.csrf(cookie).as_bytes().ct_eq(given.as_bytes()))
    }
}

/// A new session's claims.
pub fn claims(kind: &str, id: &str, role: &str, now_ms: i64) -> Claims {
    Claims {
        kind: kind.to_string(),
        id: id.to_string(),
        role: role.to_string(),
        exp: now_ms + SESSION_TTL.as_millis() as i64,
        nonce: crate::crypto::generate_secret("n-"),
    }
}

/// The `Set-Cookie` value for a session (`Secure` when the console is reached over HTTPS).
pub fn set_cookie(name: &str, value: &str, secure: bool) -> String {
    format!(
        "{name}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
        SESSION_TTL.as_secs(),
        if secure { "; Secure" } else { "" }
    )
}

/// The `Set-Cookie` value that ends a session.
pub fn clear_cookie(name: &str, secure: bool) -> String {
    format!(
        "{name}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{}",
        if secure { "; Secure" } else { "" }
    )
}

/// The value of cookie `name` in a `Cookie` header.
pub fn cookie<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').find_map(|c| {
        let (k, v) = c.trim().split_once('=')?;
        (k == name).then_some(v)
    })
}

/// At most `max` attempts per client address per `window` (per replica).
pub struct Throttle {
    max: u32,
    window: Duration,
    seen: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl Throttle {
    pub fn new(max: u32, window: Duration) -> Self {
        Self {
            max,
            window,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Counts one attempt from `ip`; false when it is over the limit.
    pub fn allow(&self, ip: IpAddr) -> bool {
        let now = Instant::now();
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() > 10_000 {
            seen.retain(|_, (start, _)| now.duration_since(*start) < self.window);
        }
        let entry = seen.entry(ip).or_insert((now, 0));
        if now.duration_since(entry.0) >= self.window {
            *entry = (now, 0);
        }
        entry.1 += 1;
        entry.1 <= self.max
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn cookies_open_only_as_signed_of_their_kind_and_unexpired() {
        let s = Signer::new([7; 32]);
        let c = claims("admin", "tok-1", "admin", 1_000);
        let v = s.seal(&c);
        assert_eq!(s.open(&v, "admin", 2_000), Some(c.clone()));
        assert_eq!(s.open(&v, "key", 2_000), None, "of the other kind");
        assert_eq!(s.open(&v, "admin", c.exp), None, "expired");
        assert_eq!(
            Signer::new([8; 32]).open(&v, "admin", 2_000),
            None,
            "another deployment's"
        );
        let (payload, mac) = v.split_once('.').unwrap();
        let forged = serde_json::to_vec(&Claims {
            role: "admin".into(),
            id: "tok-2".into(),
            ..c.clone()
        })
        .unwrap();
        assert_eq!(
            s.open(&format!("{}.{mac}", URL_SAFE_NO_PAD.encode(forged)), "admin", 2_000),
            None
        );
        assert_eq!(s.open(payload, "admin", 2_000), None);
        assert_eq!(s.open("garbage", "admin", 2_000), None);
        assert!(s.csrf_ok(&v, &s.csrf(&v)));
        assert!(!s.csrf_ok(&v, ""));
        assert!(!s.csrf_ok(&s.seal(&claims("admin", "tok-1", "admin", 1_000)), &s.csrf(&v)));
        // Notices: only the text signed shows.
        assert!(s.notice_ok("Key a revoked.", &s.notice("Key a revoked.")));
        assert!(!s.notice_ok("Go to evil.example", &s.notice("Key a revoked.")));
        assert!(!s.notice_ok("Key a revoked.", ""));
    }

    #[test]
    fn the_throttle_counts_per_address() {
        let t = Throttle::new(2, Duration::from_secs(60));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        assert!(t.allow(a) && t.allow(a));
        assert!(!t.allow(a));
        assert!(t.allow(b));
    }
}
