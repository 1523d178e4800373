//! The web console over plain HTTP (issue 15), against a control plane on a real store with its
//! console on, a data plane and the mock upstream: sign-in and sign-out, the session cookie's
//! flags, the security headers, CSRF on every form, a read-only token that sees no controls and
//! whose writes are refused, expired and garbled cookies refused, a revoked token's session
//! ended, and a key created through the form that serves `/v1/messages` until it is revoked
//! through the form; the key holder's page shows that key only.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use relay_control_plane::model::Role;
use relay_control_plane::web::session::{self, Claims, Signer};
use relay_mock_upstream::MockConfig;
use relay_proto::v1 as pb;
use relay_test_support::control_plane::RO_TOKEN;
use relay_test_support::wait_for;
use std::net::SocketAddr;
use std::time::Duration;

const MODEL: &str = "claude-sonnet-4-5";

struct Setup {
    cp: ControlPlane,
    web: String,
    dp: DataPlane,
    _mock: relay_mock_upstream::MockUpstream,
    _dir: tempfile::TempDir,
}

async fn setup() -> Setup {
    let mut cp = ControlPlane::create_with_tokens(
        Backend::Sqlite,
        &[("dp", Role::DataPlane, DP_TOKEN), ("viewer", Role::ReadOnly, RO_TOKEN)],
    )
    .await;
    cp.web = Some(SocketAddr::from(([127, 0, 0, 1], relay_test_support::free_port())));
    cp.resume().await;
    let web = cp.web_url().unwrap();
    let mock = mock(MockConfig::default()).await;
    cp.add_account("acct-1", &mock.base_url(), ACCOUNT_SECRET).await;
    let dir = tempfile::tempdir().unwrap();
    let dp = DataPlane::start(&cp.url(), "dp-1", dir.path().join("dp-1")).await;
    dp.wait_version(cp.head().await).await;
    let w = web.clone();
    wait_for(Duration::from_secs(10), "the console to listen", || {
        let w = w.clone();
        async move { try_send("GET", &format!("{w}/signin")).await }
    })
    .await
    .unwrap();
    Setup {
        cp,
        web,
        dp,
        _mock: mock,
        _dir: dir,
    }
}

fn form(pairs: &[(&str, &str)]) -> String {
    let enc = |s: &str| {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    };
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect::<Vec<_>>()
        .join("&")
}

impl Setup {
    async fn get(&self, path: &str, cookie: Option<&str>) -> HttpResponse {
        let c = cookie.map(|c| format!("relay_session={c}; relay_me={c}"));
        let mut h = vec![];
        if let Some(c) = &c {
            h.push(("cookie", c.as_str()));
        }
        send("GET", &format!("{}{path}", self.web), &h, "").await
    }

    async fn post(&self, path: &str, cookie: Option<&str>, pairs: &[(&str, &str)]) -> HttpResponse {
        let c = cookie.map(|c| format!("relay_session={c}; relay_me={c}"));
        let mut h = vec![("content-type", "application/x-www-form-urlencoded")];
        if let Some(c) = &c {
            h.push(("cookie", c.as_str()));
        }
        send("POST", &format!("{}{path}", self.web), &h, form(pairs)).await
    }

    /// Signs in with `token`: the session cookie's value.
    async fn sign_in(&self, token: &str) -> String {
        let r = self.post("/signin", None, &[("token", token)]).await;
        assert_eq!(r.status, 303, "{:?}", r.body);
        cookie_value(&r, "relay_session")
    }

    async fn keys(&self) -> Vec<pb::ApiKeyInfo> {
        self.cp
            .admin()
            .await
            .list_api_keys(pb::ListApiKeysRequest {})
            .await
            .unwrap()
            .into_inner()
            .keys
    }
}

fn cookie_value(r: &HttpResponse, name: &str) -> String {
    let set = r.header("set-cookie").expect("a session cookie");
    let (k, rest) = set.split_once('=').unwrap();
    assert_eq!(k, name);
    rest.split(';').next().unwrap().to_string()
}

fn text(r: &HttpResponse) -> String {
    String::from_utf8_lossy(&r.body).to_string()
}

/// The CSRF token in a page's forms.
fn csrf(page: &str) -> String {
    let at = page.find("name=\"csrf\" value=\"").expect("a form with a CSRF token") + 19;
    page[at..].split('"').next().unwrap().to_string()
}

#[tokio::test]
async fn sign_in_cookie_headers_and_sessions() {
    let s = setup().await;
    // Not signed in: to the sign-in page; it carries the security headers.
    let r = s.get("/", None).await;
    assert_eq!((r.status, r.header("location")), (303, Some("/signin")));
    let r = s.get("/signin", None).await;
    assert_eq!(r.status, 200);
    let csp = r.header("content-security-policy").unwrap();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert_eq!(r.header("x-frame-options"), Some("DENY"));
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(r.header("referrer-policy"), Some("same-origin"));
    assert!(!text(&r).contains("<script>"), "no inline script");
    let css = s.get("/static/console.css", None).await;
    assert_eq!(
        (css.status, css.header("content-type")),
        (200, Some("text/css; charset=utf-8"))
    );

    // A wrong token is refused.
    let r = s.post("/signin", None, &[("token", "rat-not-a-token")]).await;
    assert_eq!(r.status, 401);
    assert!(r.header("set-cookie").is_none());

    // The right one: an HttpOnly, SameSite=Strict cookie with an expiry, holding no token.
    let r = s.post("/signin", None, &[("token", ADMIN_TOKEN)]).await;
    assert_eq!((r.status, r.header("location")), (303, Some("/")));
    let set = r.header("set-cookie").unwrap().to_string();
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Strict") && set.contains("Max-Age="),
        "{set}"
    );
    assert!(!set.contains("Secure"), "plain HTTP: {set}");
    assert!(!set.contains(ADMIN_TOKEN) && !set.contains("rat-"), "{set}");
    let cookie = cookie_value(&r, "relay_session");
    // Over HTTPS (a TLS-terminating proxy says so) the cookie is Secure.
    let https = send(
        "POST",
        &format!("{}/signin", s.web),
        &[
            ("content-type", "application/x-www-form-urlencoded"),
            ("x-forwarded-proto", "https"),
        ],
        form(&[("token", ADMIN_TOKEN)]),
    )
    .await;
    assert!(https.header("set-cookie").unwrap().contains("; Secure"));

    let r = s.get("/", Some(&cookie)).await;
    assert_eq!(r.status, 200);
    let page = text(&r);
    assert!(page.contains("Overview") && page.contains("Data planes"));
    assert!(page.contains("dp-1"), "the data plane is listed");
    assert!(page.contains("<svg"), "charts are rendered on the server");
    for p in ["/keys", "/accounts"] {
        let r = s.get(p, Some(&cookie)).await;
        assert_eq!(r.status, 200, "{p}");
    }
    assert!(text(&s.get("/accounts", Some(&cookie)).await).contains("acct-1"));
    assert!(!text(&s.get("/accounts", Some(&cookie)).await).contains(ACCOUNT_SECRET));

    // Garbled, forged and expired cookies are refused.
    for bad in ["garbage".to_string(), format!("{cookie}x"), cookie.replace('.', "")] {
        let r = s.get("/", Some(&bad)).await;
        assert_eq!((r.status, r.header("location")), (303, Some("/signin")), "{bad}");
    }
    let signer = Signer::new(s.cp.key.console_session_secret());
    let valid: Claims = {
        let payload = cookie.split('.').next().unwrap();
        use base64::Engine;
        serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload)
                .unwrap(),
        )
        .unwrap()
    };
    let expired = signer.seal(&Claims {
        exp: chrono::Utc::now().timestamp_millis() - 1,
        ..valid.clone()
    });
    assert_eq!(s.get("/", Some(&expired)).await.status, 303);
    // Signed with another deployment's key: refused.
    let other = Signer::new([1; 32]).seal(&session::claims("admin", &valid.id, "admin", 0));
    assert_eq!(s.get("/", Some(&other)).await.status, 303);

    // Sign-out needs the CSRF token and clears the cookie.
    assert_eq!(s.post("/signout", Some(&cookie), &[]).await.status, 403);
    let page = text(&s.get("/", Some(&cookie)).await);
    let r = s.post("/signout", Some(&cookie), &[("csrf", &csrf(&page))]).await;
    assert_eq!(r.status, 303);
    assert!(r.header("set-cookie").unwrap().contains("Max-Age=0"));

    // A revoked token's session ends at once.
    let viewer = s.sign_in(RO_TOKEN).await;
    assert_eq!(s.get("/", Some(&viewer)).await.status, 200);
    s.cp.admin()
        .await
        .revoke_admin_token(pb::RevokeAdminTokenRequest { token: "viewer".into() })
        .await
        .unwrap();
    assert_eq!(s.get("/", Some(&viewer)).await.status, 303);

    // Sign-in attempts are throttled per address.
    let mut last = 0;
    for _ in 0..12 {
        last = s.post("/signin", None, &[("token", "rat-guess")]).await.status;
    }
    assert_eq!(last, 429);
}

#[tokio::test]
async fn forms_need_the_session_csrf_token_and_read_only_tokens_change_nothing() {
    let s = setup().await;
    let admin = s.sign_in(ADMIN_TOKEN).await;
    let other = s.sign_in(ADMIN_TOKEN).await;
    let keys_page = text(&s.get("/keys", Some(&admin)).await);
    assert!(keys_page.contains("action=\"/keys\""), "an admin sees the create form");
    let token = csrf(&keys_page);
    let other_token = csrf(&text(&s.get("/keys", Some(&other)).await));
    assert_ne!(token, other_token, "CSRF tokens are per session");

    // Forged posts: no token, another session's token.
    let r = s.post("/keys", Some(&admin), &[("name", "forged")]).await;
    assert_eq!(r.status, 403);
    let r = s
        .post("/keys", Some(&admin), &[("name", "forged"), ("csrf", &other_token)])
        .await;
    assert_eq!(r.status, 403);
    // No session at all: to the sign-in page, nothing done.
    let r = s.post("/keys", None, &[("name", "forged"), ("csrf", &token)]).await;
    assert_eq!(r.status, 303);
    assert!(s.keys().await.is_empty(), "no forged post created a key");

    // A read-only token sees everything and no control.
    let viewer = s.sign_in(RO_TOKEN).await;
    for p in ["/", "/keys", "/accounts"] {
        let page = text(&s.get(p, Some(&viewer)).await);
        assert!(!page.contains("<form method=\"post\" action=\"/keys"), "{p}");
        assert!(
            !page.contains("/accounts/check") && !page.contains("Revoke") && !page.contains("Add account"),
            "{p}"
        );
        assert!(page.contains("read-only"), "{p}");
    }
    assert!(text(&s.get("/accounts", Some(&viewer)).await).contains("acct-1"));
    // And its posts, with its own valid CSRF token, are refused by the service layer.
    let vt = csrf(&text(&s.get("/", Some(&viewer)).await));
    let r = s
        .post("/keys", Some(&viewer), &[("name", "sneaky"), ("csrf", &vt)])
        .await;
    assert_eq!(r.status, 403);
    let acct =
        s.cp.admin()
            .await
            .get_account(pb::GetAccountRequest {
                account: "acct-1".into(),
            })
            .await
            .unwrap()
            .into_inner();
    let r = s
        .post(
            &format!("/accounts/{}/disable", acct.id),
            Some(&viewer),
            &[("csrf", &vt)],
        )
        .await;
    assert_eq!(r.status, 403);
    assert!(s.keys().await.is_empty());
    let acct =
        s.cp.admin()
            .await
            .get_account(pb::GetAccountRequest {
                account: "acct-1".into(),
            })
            .await
            .unwrap()
            .into_inner();
    assert_eq!(acct.status, pb::AccountStatus::Enabled as i32);

    // The admin's write is audited under the token's name.
    let r = s
        .post(
            &format!("/accounts/{}/disable", acct.id),
            Some(&admin),
            &[("csrf", &token)],
        )
        .await;
    assert_eq!(r.status, 303);
    let audit =
        s.cp.admin()
            .await
            .list_audit(pb::ListAuditRequest { limit: 5, since_ms: 0 })
            .await
            .unwrap()
            .into_inner();
    let last = audit.entries.iter().max_by_key(|e| e.id).unwrap();
    let tokens =
        s.cp.admin()
            .await
            .list_admin_tokens(pb::ListAdminTokensRequest {})
            .await
            .unwrap()
            .into_inner()
            .tokens;
    let admin_name = &tokens
        .iter()
        .find(|t| t.role == pb::AdminRole::Admin as i32)
        .unwrap()
        .name;
    assert_eq!(&last.actor, admin_name, "the signed-in token's name: {last:?}");
    assert!(last.action.starts_with("account."), "{last:?}");
    // Deleting needs the name typed again.
    let r = s
        .post(
            &format!("/accounts/{}/delete", acct.id),
            Some(&admin),
            &[("csrf", &token), ("confirm", "nope")],
        )
        .await;
    assert_eq!(r.status, 400);
    let r = s
        .post(
            &format!("/accounts/{}/delete", acct.id),
            Some(&admin),
            &[("csrf", &token), ("confirm", "acct-1")],
        )
        .await;
    assert_eq!(r.status, 303);
    assert!(!text(&s.get("/accounts", Some(&admin)).await).contains("acct-1"));
}

#[tokio::test]
async fn a_key_created_through_the_form_serves_until_revoked_through_the_form() {
    let s = setup().await;
    let admin = s.sign_in(ADMIN_TOKEN).await;
    let token = csrf(&text(&s.get("/keys", Some(&admin)).await));
    // An account added through the form serves too.
    let r = s
        .post("/keys", Some(&admin), &[("name", "other-app"), ("csrf", &token)])
        .await;
    assert_eq!(r.status, 200);
    let r = s
        .post(
            "/keys",
            Some(&admin),
            &[("name", "web-app"), ("csrf", &token), ("daily", "5"), ("rpm", "100")],
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let page = text(&r);
    let at = page.find("<code id=\"new-key\">").expect("the new key is shown") + 19;
    let key = page[at..].split('<').next().unwrap().to_string();
    assert!(key.starts_with("rk-"), "{key}");
    // Shown once: the list does not show it again.
    assert!(!text(&s.get("/keys", Some(&admin)).await).contains(&key));

    s.dp.wait_version(s.cp.head().await).await;
    let r = post_messages(&s.dp, &key, &message_body(MODEL, false)).await;
    assert_eq!(r.status, 200, "{:?}", r.body);

    // The key holder's page: this key's use only.
    let r = s.post("/me", None, &[("key", &key)]).await;
    assert_eq!(r.status, 303);
    let me = cookie_value(&r, "relay_me");
    let page = wait_for(Duration::from_secs(20), "the request to show on /me", || {
        let s = &s;
        let me = me.clone();
        async move {
            let p = text(&s.get("/me", Some(&me)).await);
            p.contains(MODEL).then_some(p)
        }
    })
    .await
    .unwrap();
    assert!(page.contains("web-app") && !page.contains("other-app"), "{page}");
    assert!(page.contains("$5.00"), "the daily budget shows");
    assert_eq!(page.matches("<svg").count(), 2, "charts of requests and cost per day");
    assert!(page.contains("Your cost per day"), "{page}");
    assert!(!page.contains("acct-1"), "no account is shown to a key holder");
    assert_eq!(s.post("/me", None, &[("key", "rk-wrong")]).await.status, 401);

    // The overview and the key list see the spend.
    let page = text(&s.get("/", Some(&admin)).await);
    assert!(page.contains("web-app"), "spend by key lists it");

    let id = s.keys().await.into_iter().find(|k| k.name == "web-app").unwrap().id;
    let r = s
        .post(&format!("/keys/{id}/revoke"), Some(&admin), &[("csrf", &token)])
        .await;
    assert_eq!(r.status, 303);
    s.dp.wait_version(s.cp.head().await).await;
    let r = post_messages(&s.dp, &key, &message_body(MODEL, false)).await;
    assert_eq!(r.status, 401, "{:?}", r.body);
    assert!(text(&s.get("/keys", Some(&admin)).await).contains("revoked"));
    // The revoked key's holder page no longer opens.
    assert!(!text(&s.get("/me", Some(&me)).await).contains("Recent requests"));
}

/// Reads the SSE answer of `path` until an event carrying `needle` arrives: (status, content type,
/// everything read up to it).
async fn sse_until(
    s: &Setup,
    path: &str,
    cookie: &str,
    needle: &str,
    send_traffic: impl std::future::Future<Output = ()>,
) -> (u16, String, String) {
    use http_body_util::BodyExt;
    let req = http::Request::builder()
        .method("GET")
        .uri(format!("{}{path}", s.web))
        .header("cookie", format!("relay_session={cookie}"))
        .header("accept", "text/event-stream")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let resp = http_client().request(req).await.unwrap();
    let status = resp.status().as_u16();
    let ctype = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let mut body = resp.into_body();
    send_traffic.await;
    let mut seen = String::new();
    let read = async {
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.unwrap().into_data() {
                seen.push_str(&String::from_utf8_lossy(&data));
                if seen.contains(needle) {
                    return;
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .unwrap_or_else(|_| panic!("no SSE event with {needle:?} within 30 s; read: {seen}"));
    (status, ctype, seen)
}

#[tokio::test]
async fn the_requests_page_lists_filters_tails_and_shows_a_capture() {
    let s = setup().await;
    let (_, key_a) = s.cp.add_key("app-a", &[]).await;
    let (_, key_b) = s.cp.add_key("app-b", &[]).await;
    // Bodies of app-a's requests are captured.
    s.cp.admin()
        .await
        .add_capture_rule(pb::AddCaptureRuleRequest {
            key: "app-a".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    s.dp.wait_version(s.cp.head().await).await;
    let r = post_messages(&s.dp, &key_a, &message_body(MODEL, true)).await;
    assert_eq!(r.status, 200);
    let id_a = r.header("request-id").unwrap().to_string();
    let r = post_messages(&s.dp, &key_b, &message_body(MODEL, false)).await;
    assert_eq!(r.status, 200);
    let id_b = r.header("request-id").unwrap().to_string();

    let admin = s.sign_in(ADMIN_TOKEN).await;
    let page = wait_for(Duration::from_secs(30), "both requests in the log", || {
        let s = &s;
        let (admin, a, b) = (admin.clone(), id_a.clone(), id_b.clone());
        async move {
            let p = text(&s.get("/requests", Some(&admin)).await);
            (p.contains(&a) && p.contains(&b)).then_some(p)
        }
    })
    .await
    .unwrap();
    assert!(page.contains("aria-current=\"page\">Requests</a>"), "in the navigation");
    // Newest first.
    assert!(page.find(&id_b).unwrap() < page.find(&id_a).unwrap());
    // Filters: by key, by stream, by a status no request had.
    let p = text(&s.get("/requests?key=app-a", Some(&admin)).await);
    assert!(p.contains(&id_a) && !p.contains(&id_b), "{p}");
    let p = text(&s.get("/requests?stream=no&since=1h", Some(&admin)).await);
    assert!(!p.contains(&id_a) && p.contains(&id_b));
    let p = text(&s.get("/requests?status=5xx", Some(&admin)).await);
    assert!(!p.contains(&id_a) && !p.contains(&id_b) && p.contains("No request matches"));
    let r = s.get("/requests?since=yesterday", Some(&admin)).await;
    assert_eq!(r.status, 400);
    assert!(text(&r).contains("not a time"));
    let r = s.get("/requests?key=nobody", Some(&admin)).await;
    assert_eq!(r.status, 404, "an unknown key is named: {}", text(&r));
    // Pages of one: the link to older records carries the filter and the cursor on.
    let r = s.get("/requests?key=app-a&cursor=garbage", Some(&admin)).await;
    assert_eq!(r.status, 400);

    // The detail: attempts on the account, usage and cost, the captured bodies and the stream's
    // timeline (the capture arrives after the record).
    let detail = wait_for(Duration::from_secs(30), "the capture on the detail page", || {
        let s = &s;
        let (admin, a) = (admin.clone(), id_a.clone());
        async move {
            let p = text(&s.get(&format!("/requests/{a}"), Some(&admin)).await);
            p.contains("id=\"request-body\"").then_some(p)
        }
    })
    .await
    .unwrap();
    assert!(detail.contains("acct-1"), "the attempt's account");
    assert!(detail.contains("app-a") && detail.contains(MODEL));
    assert!(
        detail.contains("message_start") && detail.contains("message_stop"),
        "the timeline"
    );
    assert!(detail.contains("<svg") && detail.contains("class=\"tick\""));
    assert!(detail.contains("Say hello to relay."), "the captured request body");
    assert!(!detail.contains(&key_a), "the key is masked in the captured headers");
    let p = text(&s.get(&format!("/requests/{id_b}"), Some(&admin)).await);
    assert!(p.contains("No body was captured"), "{p}");
    assert_eq!(s.get("/requests/not-a-request", Some(&admin)).await.status, 404);

    // The live tail: a new request arrives as an SSE event; a read-only token may follow it too.
    let viewer = s.sign_in(RO_TOKEN).await;
    let dp = &s.dp;
    let key = key_b.clone();
    let (status, ctype, seen) = sse_until(
        &s,
        "/requests/tail?key=app-b",
        &viewer,
        "\"key\":\"app-b\"",
        async move {
            let r = post_messages(dp, &key, &message_body(MODEL, false)).await;
            assert_eq!(r.status, 200);
        },
    )
    .await;
    assert_eq!(status, 200);
    assert!(ctype.starts_with("text/event-stream"), "{ctype}");
    assert!(seen.contains("event: record"), "{seen}");
    assert!(!seen.contains("app-a"), "the filter holds: {seen}");
    // Not signed in: no stream.
    assert_eq!(s.get("/requests/tail", None).await.status, 303);
    // The page's script reads it, and the CSP allows the page to connect to its own origin only.
    let r = s.get("/requests", Some(&viewer)).await;
    assert!(r
        .header("content-security-policy")
        .unwrap()
        .contains("connect-src 'self'"));
    assert!(
        text(&r).contains("data-tail=\"&#x2f;requests&#x2f;tail\""),
        "the tail's URL (escaped)"
    );
    assert!(!text(&r).contains("<script>"), "no inline script");
}

/// The name of the admin token the console signs in with (the audit's actor).
async fn admin_name(s: &Setup) -> String {
    s.cp.admin()
        .await
        .list_admin_tokens(pb::ListAdminTokensRequest {})
        .await
        .unwrap()
        .into_inner()
        .tokens
        .into_iter()
        .find(|t| t.role == pb::AdminRole::Admin as i32)
        .unwrap()
        .name
}

async fn last_audit(s: &Setup) -> pb::AuditEntry {
    s.cp.admin()
        .await
        .list_audit(pb::ListAuditRequest { limit: 20, since_ms: 0 })
        .await
        .unwrap()
        .into_inner()
        .entries
        .into_iter()
        .max_by_key(|e| e.id)
        .unwrap()
}

#[tokio::test]
async fn groups_are_created_paused_resumed_and_activated_from_the_page() {
    let s = setup().await;
    let (_, key) = s.cp.add_key("app", &[]).await;
    let admin = s.sign_in(ADMIN_TOKEN).await;
    let page = text(&s.get("/groups", Some(&admin)).await);
    assert!(page.contains("aria-current=\"page\">Groups</a>"), "{page}");
    assert!(page.contains("data-refresh=\"15\""), "the page follows the live state");
    let token = csrf(&page);
    let r = s
        .post(
            "/groups",
            Some(&admin),
            &[
                ("csrf", &token),
                ("name", "backup"),
                ("description", "spare capacity"),
                ("rpm", "60"),
            ],
        )
        .await;
    assert_eq!(r.status, 303, "{}", text(&r));
    let r = s
        .post(
            "/groups",
            Some(&admin),
            &[("csrf", &token), ("name", "main"), ("fallbacks", "backup")],
        )
        .await;
    assert_eq!(r.status, 303);
    let r = s
        .post(
            "/groups",
            Some(&admin),
            &[("csrf", &token), ("name", "bad"), ("fallbacks", "nowhere")],
        )
        .await;
    assert_eq!(r.status, 404, "an unknown fallback is refused: {}", text(&r));
    let groups =
        s.cp.admin()
            .await
            .list_groups(pb::ListGroupsRequest {})
            .await
            .unwrap()
            .into_inner()
            .groups;
    let main = groups.iter().find(|g| g.name == "main").unwrap();
    assert_eq!(main.fallbacks, vec!["backup".to_string()]);
    let default = groups.iter().find(|g| g.name == "default").unwrap().id.clone();

    // Pausing the default group (no fallback) stops its keys; the page shows it and who did it.
    let r = s
        .post(&format!("/groups/{default}/pause"), Some(&admin), &[("csrf", &token)])
        .await;
    assert_eq!(r.status, 303);
    let audit = last_audit(&s).await;
    assert_eq!(audit.actor, admin_name(&s).await);
    assert!(audit.action.starts_with("group."), "{audit:?}");
    let page = text(&s.get("/groups", Some(&admin)).await);
    let row = &page[page.find("data-group=\"default\"").unwrap()..];
    let row = &row[..row.find("</tr>").unwrap()];
    assert!(row.contains(">paused</span>"), "{row}");
    assert!(row.contains("acct-1") && row.contains("app"), "members and keys: {row}");
    assert!(row.contains("/resume") && !row.contains("/pause\""), "{row}");
    s.dp.wait_version(s.cp.head().await).await;
    let r = post_messages(&s.dp, &key, &message_body(MODEL, false)).await;
    assert_ne!(r.status, 200, "a paused group serves nobody");
    let r = s
        .post(&format!("/groups/{default}/resume"), Some(&admin), &[("csrf", &token)])
        .await;
    assert_eq!(r.status, 303);
    s.dp.wait_version(s.cp.head().await).await;
    assert_eq!(
        post_messages(&s.dp, &key, &message_body(MODEL, false)).await.status,
        200
    );
    let r = s
        .post(
            &format!("/groups/{}/activate", main.id),
            Some(&admin),
            &[("csrf", &token)],
        )
        .await;
    assert_eq!(r.status, 303);
    assert!(text(&s.get("/groups", Some(&admin)).await).contains(">activated</span>"));

    // Edit: the fallbacks cleared, a budget set.
    let r = s
        .post(
            &format!("/groups/{}/edit", main.id),
            Some(&admin),
            &[
                ("csrf", &token),
                ("description", "primary"),
                ("fallbacks", ""),
                ("daily", "12.5"),
            ],
        )
        .await;
    assert_eq!(r.status, 303);
    let g =
        s.cp.admin()
            .await
            .list_groups(pb::ListGroupsRequest {})
            .await
            .unwrap()
            .into_inner()
            .groups;
    let main2 = g.iter().find(|g| g.name == "main").unwrap();
    assert!(main2.fallbacks.is_empty());
    assert_eq!(main2.description, "primary");
    assert_eq!(main2.limits.unwrap().daily_budget_micro_usd, 12_500_000);

    // A read-only token sees the groups and no control; its posts are refused.
    let viewer = s.sign_in(RO_TOKEN).await;
    let page = text(&s.get("/groups", Some(&viewer)).await);
    assert!(page.contains("backup") && page.matches("method=\"post\"").count() == 1);
    let vt = csrf(&page);
    let r = s
        .post(&format!("/groups/{default}/pause"), Some(&viewer), &[("csrf", &vt)])
        .await;
    assert_eq!(r.status, 403);
    let r = s
        .post("/groups", Some(&viewer), &[("csrf", &vt), ("name", "sneaky")])
        .await;
    assert_eq!(r.status, 403);
    // Without the session's CSRF token: refused.
    let r = s.post(&format!("/groups/{default}/pause"), Some(&admin), &[]).await;
    assert_eq!(r.status, 403);
    let g =
        s.cp.admin()
            .await
            .list_groups(pb::ListGroupsRequest {})
            .await
            .unwrap()
            .into_inner()
            .groups;
    assert!(g.iter().all(|g| g.name != "sneaky"));
    assert_eq!(
        g.iter().find(|g| g.id == default).unwrap().state,
        pb::GroupState::Active as i32
    );

    // Delete needs the name typed again.
    let backup = g.iter().find(|g| g.name == "backup").unwrap().id.clone();
    let r = s
        .post(
            &format!("/groups/{backup}/delete"),
            Some(&admin),
            &[("csrf", &token), ("confirm", "x")],
        )
        .await;
    assert_eq!(r.status, 400);
    let r = s
        .post(
            &format!("/groups/{backup}/delete"),
            Some(&admin),
            &[("csrf", &token), ("confirm", "backup")],
        )
        .await;
    assert_eq!(r.status, 303);
    assert!(!text(&s.get("/groups", Some(&admin)).await).contains("data-group=\"backup\""));
}

#[tokio::test]
async fn the_usage_page_reports_charts_and_downloads_csv_and_json() {
    let s = setup().await;
    let (_, key) = s.cp.add_key("reporter", &[]).await;
    s.dp.wait_version(s.cp.head().await).await;
    for _ in 0..2 {
        assert_eq!(
            post_messages(&s.dp, &key, &message_body(MODEL, false)).await.status,
            200
        );
    }
    let admin = s.sign_in(ADMIN_TOKEN).await;
    let page = wait_for(Duration::from_secs(30), "the usage by key", || {
        let s = &s;
        let admin = admin.clone();
        async move {
            let p = text(&s.get("/usage?by=key&since=1h", Some(&admin)).await);
            p.contains("<td>reporter</td>").then_some(p)
        }
    })
    .await
    .unwrap();
    assert!(page.contains("aria-current=\"page\">Usage</a>"));
    assert!(
        page.contains("<svg") && page.contains("reporter: $"),
        "the chart has the key's bar"
    );
    let by_model = text(&s.get("/usage?by=model&bucket=hour", Some(&admin)).await);
    assert!(by_model.contains(&format!("<td>{MODEL}</td>")), "{by_model}");
    assert!(by_model.contains("Cost per bucket"));
    // The downloads: the columns relayctl gives, the same numbers.
    let r = s.get("/usage/export?format=csv&by=key&since=1h", Some(&admin)).await;
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().starts_with("text/csv"));
    assert!(r.header("content-disposition").unwrap().contains("relay-usage.csv"));
    let csv = text(&r);
    let mut lines = csv.lines();
    assert!(lines.next().unwrap().starts_with("key,key_id,requests,input_tokens,"));
    let row = lines.find(|l| l.starts_with("reporter,")).expect("the key's row");
    assert_eq!(row.split(',').nth(2), Some("2"), "{row}");
    let r = s.get("/usage/export?format=json&by=key&since=1h", Some(&admin)).await;
    assert_eq!(r.header("content-type"), Some("application/json"));
    let rows = r.json();
    let mine = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["key"] == "reporter")
        .unwrap();
    assert_eq!(mine["requests"], 2);
    assert!(mine["cost_pico_usd"].as_u64().unwrap() > 0);
    // Bad input is named.
    let r = s.get("/usage?by=team", Some(&admin)).await;
    assert_eq!(r.status, 400);
    assert!(text(&r).contains("not key, account, model or total"));
    assert_eq!(s.get("/usage/export?format=xml", Some(&admin)).await.status, 400);
    assert_eq!(s.get("/usage?since=1h&until=2h", Some(&admin)).await.status, 400);
    // Signed out: no report.
    assert_eq!(s.get("/usage/export?format=csv", None).await.status, 303);
    // A read-only token reads it too.
    let viewer = s.sign_in(RO_TOKEN).await;
    assert!(text(&s.get("/usage?by=key", Some(&viewer)).await).contains("<td>reporter</td>"));
}

#[tokio::test]
async fn audit_settings_and_data_planes_pages() {
    let s = setup().await;
    let admin = s.sign_in(ADMIN_TOKEN).await;
    let name = admin_name(&s).await;

    // Settings: every declared setting with its value and default; a full admin changes one.
    let page = text(&s.get("/settings", Some(&admin)).await);
    assert!(page.contains("aria-current=\"page\">Settings</a>"));
    let listed =
        s.cp.admin()
            .await
            .list_settings(pb::ListSettingsRequest {})
            .await
            .unwrap()
            .into_inner()
            .settings;
    assert!(listed.len() > 10);
    for st in &listed {
        assert!(
            page.contains(&format!("data-setting=\"{}\"", st.name)),
            "{} is listed",
            st.name
        );
    }
    let some = listed.iter().find(|st| st.r#type == "milliseconds").unwrap();
    assert!(
        page.contains(&some.description.replace('\'', "&#x27;").replace('"', "&quot;")) || some.description.is_empty()
    );
    let token = csrf(&page);
    let r = s
        .post(
            "/settings",
            Some(&admin),
            &[("csrf", &token), ("name", &some.name), ("value", "not-a-number")],
        )
        .await;
    assert_eq!(r.status, 400, "a bad value is refused by the service: {}", text(&r));
    let good = if some.value == "1000" { "2000" } else { "1000" };
    let r = s
        .post(
            "/settings",
            Some(&admin),
            &[("csrf", &token), ("name", &some.name), ("value", good)],
        )
        .await;
    assert_eq!(r.status, 303, "{}", text(&r));
    let page = text(&s.get("/settings", Some(&admin)).await);
    let row = &page[page.find(&format!("data-setting=\"{}\"", some.name)).unwrap()..];
    assert!(row[..row.find("</tr>").unwrap()]
        .contains(&format!("<code>{good}</code> <small class=\"badge state-healthy\">set")));
    let audit = last_audit(&s).await;
    assert_eq!(
        (audit.actor.as_str(), audit.target.as_str()),
        (name.as_str(), some.name.as_str()),
        "{audit:?}"
    );
    let r = s
        .post(
            "/settings",
            Some(&admin),
            &[("csrf", &token), ("name", &some.name), ("unset", "1")],
        )
        .await;
    assert_eq!(r.status, 303);
    let now =
        s.cp.admin()
            .await
            .list_settings(pb::ListSettingsRequest {})
            .await
            .unwrap()
            .into_inner()
            .settings;
    assert!(
        !now.iter().find(|st| st.name == some.name).unwrap().set,
        "back to the default"
    );

    // Audit: the changes above under the token's name, filterable.
    let page = text(&s.get(&format!("/audit?target={}", some.name), Some(&admin)).await);
    assert!(page.contains("aria-current=\"page\">Audit</a>"));
    assert!(page.contains(&format!("<td>{name}</td>")), "{page}");
    assert_eq!(page.matches("data-audit=").count(), 2, "the set and the unset: {page}");
    let page = text(&s.get("/audit?actor=nobody-at-all", Some(&admin)).await);
    assert!(page.contains("No entry matches"));
    assert_eq!(s.get("/audit?since=whenever", Some(&admin)).await.status, 400);

    // Data planes: dp-1 on the head, connected.
    let head = s.cp.head().await;
    let page = text(&s.get("/planes", Some(&admin)).await);
    assert!(page.contains("aria-current=\"page\">Data planes</a>"));
    let row = &page[page.find("data-plane=\"dp-1\"").expect("dp-1 is listed")..];
    let row = &row[..row.find("</tr>").unwrap()];
    assert!(row.contains("connected") && row.contains("ago"), "{row}");
    assert!(page.contains(&format!("{}.{}", head.epoch, head.revision)));

    // A read-only token sees every page and no control; its setting change is refused.
    let viewer = s.sign_in(RO_TOKEN).await;
    for p in ["/settings", "/audit", "/planes", "/usage", "/requests", "/groups"] {
        let page = text(&s.get(p, Some(&viewer)).await);
        // The header's sign-out form is the only one.
        assert_eq!(page.matches("method=\"post\"").count(), 1, "{p}: {page}");
        assert!(page.contains("action=\"/signout\""), "{p}");
    }
    let vt = csrf(&text(&s.get("/settings", Some(&viewer)).await));
    let r = s
        .post(
            "/settings",
            Some(&viewer),
            &[("csrf", &vt), ("name", &some.name), ("value", good)],
        )
        .await;
    assert_eq!(r.status, 403);
    let r = s
        .post("/settings", Some(&admin), &[("name", &some.name), ("value", good)])
        .await;
    assert_eq!(r.status, 403, "no CSRF token");
    let now =
        s.cp.admin()
            .await
            .list_settings(pb::ListSettingsRequest {})
            .await
            .unwrap()
            .into_inner()
            .settings;
    assert!(!now.iter().find(|st| st.name == some.name).unwrap().set);
}

/// Undoes the console's HTML escaping of an attribute value.
fn unescape(s: &str) -> String {
    s.replace("&#x2f;", "/")
        .replace("&quot;", "\"")
        .replace("&#x27;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

async fn account(s: &Setup, name: &str) -> Option<pb::AccountInfo> {
    s.cp.admin()
        .await
        .list_accounts(pb::ListAccountsRequest {})
        .await
        .unwrap()
        .into_inner()
        .accounts
        .into_iter()
        .find(|a| a.name == name)
}

#[tokio::test]
async fn subscriptions_are_added_by_the_browser_login_and_by_a_credentials_file() {
    let s = setup().await;
    let (authorize, token_url) = s._mock.oauth_urls();
    s.cp.set_setting("oauth.authorize_url", &authorize).await;
    s.cp.set_setting("oauth.token_url", &token_url).await;
    s.cp.admin()
        .await
        .create_group(pb::CreateGroupRequest {
            name: "subs".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let base = s._mock.base_url();
    let admin = s.sign_in(ADMIN_TOKEN).await;
    let page = text(&s.get("/accounts", Some(&admin)).await);
    let token = csrf(&page);
    assert!(page.contains("action=\"/accounts/oauth\"") && page.contains("action=\"/accounts/import\""));

    // What the control plane would refuse is refused before the login: an unknown group.
    let r = s
        .post(
            "/accounts/oauth",
            Some(&admin),
            &[("csrf", &token), ("name", "sub-web"), ("groups", "nowhere")],
        )
        .await;
    assert_eq!(r.status, 404, "{}", text(&r));
    // Step 1: the authorize URL and the form for the code.
    let r = s
        .post(
            "/accounts/oauth",
            Some(&admin),
            &[
                ("csrf", &token),
                ("name", "sub-web"),
                ("groups", "subs"),
                ("base_url", &base),
            ],
        )
        .await;
    assert_eq!(r.status, 200, "{}", text(&r));
    let page = text(&r);
    let at = page.find("id=\"authorize-url\"").unwrap();
    let href = &page[page[..at].rfind("href=\"").unwrap() + 6..];
    let url = unescape(&href[..href.find('"').unwrap()]);
    assert!(
        url.starts_with(&authorize) && url.contains("code_challenge_method=S256"),
        "{url}"
    );
    let login = {
        let at = page.find("name=\"login\" value=\"").unwrap() + 20;
        page[at..].split('"').next().unwrap().to_string()
    };
    // The user approves: the page shows CODE#STATE.
    let approved = text(&send("GET", &url, &[], "").await);
    let (code, state) = approved.trim().split_once('#').unwrap();
    // Another login's state, or the login sealed for another session: refused, nothing created.
    let r = s
        .post(
            "/accounts/oauth/finish",
            Some(&admin),
            &[
                ("csrf", &token),
                ("login", &login),
                ("code", &format!("{code}#other-state")),
            ],
        )
        .await;
    assert_eq!(r.status, 400, "{}", text(&r));
    let other = s.sign_in(ADMIN_TOKEN).await;
    let other_token = csrf(&text(&s.get("/accounts", Some(&other)).await));
    let r = s
        .post(
            "/accounts/oauth/finish",
            Some(&other),
            &[("csrf", &other_token), ("login", &login), ("code", approved.trim())],
        )
        .await;
    assert_eq!(r.status, 400, "{}", text(&r));
    assert!(text(&r).contains("not started in this session"));
    assert!(account(&s, "sub-web").await.is_none());
    // The right code: the account is created with the tokens, which are never shown.
    let r = s
        .post(
            "/accounts/oauth/finish",
            Some(&admin),
            &[
                ("csrf", &token),
                ("login", &login),
                ("code", &format!("{code}#{state}")),
            ],
        )
        .await;
    assert_eq!(r.status, 303, "{}", text(&r));
    let a = account(&s, "sub-web").await.expect("the account");
    assert_eq!(a.kind, pb::AccountKind::ClaudeOauth as i32);
    assert_eq!(a.groups, vec!["subs".to_string()]);
    let page = text(&s.get("/accounts", Some(&admin)).await);
    assert!(page.contains("sub-web") && !page.contains("mock-oauth-at-") && !page.contains("mock-oauth-rt-"));
    assert_eq!(last_audit(&s).await.actor, admin_name(&s).await);
    // It serves a key of its group.
    let key =
        s.cp.admin()
            .await
            .create_api_key(pb::CreateApiKeyRequest {
                name: "sub-key".into(),
                group: "subs".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .key;
    s.dp.wait_version(s.cp.head().await).await;
    let r = post_messages(&s.dp, &key, &message_body(MODEL, false)).await;
    assert_eq!(r.status, 200, "{:?}", r.body);

    // Claude Code's credentials file, pasted.
    let (at, rt) = s._mock.mint_oauth_tokens("user:inference user:profile");
    let expires = chrono::Utc::now().timestamp_millis() + 3_600_000;
    let file = format!(
        r#"{{"claudeAiOauth":{{"accessToken":"{at}","refreshToken":"{rt}","expiresAt":{expires},"scopes":["user:inference","user:profile"],"subscriptionType":"max"}}}}"#
    );
    let r = s
        .post(
            "/accounts/import",
            Some(&admin),
            &[("csrf", &token), ("name", "sub-file"), ("credentials", "{not json")],
        )
        .await;
    assert_eq!(r.status, 400);
    let r = s
        .post(
            "/accounts/import",
            Some(&admin),
            &[
                ("csrf", &token),
                ("name", "sub-file"),
                ("groups", "subs"),
                ("credentials", &file),
            ],
        )
        .await;
    assert_eq!(r.status, 303, "{}", text(&r));
    let a = account(&s, "sub-file").await.unwrap();
    assert_eq!(a.subscription_type, "max");
    let page = text(&s.get("/accounts", Some(&admin)).await);
    assert!(!page.contains(&at) && !page.contains(&rt), "the tokens are never shown");

    // Edit: the concurrency and the priority change, the credential stays.
    let r = s
        .post(
            &format!("/accounts/{}/edit", a.id),
            Some(&admin),
            &[
                ("csrf", &token),
                ("name", "sub-file"),
                ("base_url", &a.base_url),
                ("groups", "subs, default"),
                ("priority", "3"),
                ("weight", "2"),
                ("max_concurrency", "4"),
                ("proxy_url", ""),
            ],
        )
        .await;
    assert_eq!(r.status, 303, "{}", text(&r));
    let b = account(&s, "sub-file").await.unwrap();
    assert_eq!((b.priority, b.weight, b.max_concurrency), (3, 2, 4));
    assert_eq!(b.groups.len(), 2);
    assert_eq!(b.credential_hint, a.credential_hint, "the credential was kept");

    // A read-only token: no login, no import, no edit.
    let viewer = s.sign_in(RO_TOKEN).await;
    let page = text(&s.get("/accounts", Some(&viewer)).await);
    assert!(!page.contains("/accounts/oauth") && !page.contains("/accounts/import") && !page.contains("/edit"));
    let vt = csrf(&page);
    for (path, pairs) in [
        ("/accounts/oauth".to_string(), vec![("name", "ro-sub")]),
        (
            "/accounts/import".to_string(),
            vec![("name", "ro-file"), ("credentials", file.as_str())],
        ),
        (format!("/accounts/{}/edit", a.id), vec![("name", "renamed")]),
    ] {
        let mut pairs = pairs;
        pairs.push(("csrf", &vt));
        let r = s.post(&path, Some(&viewer), &pairs).await;
        assert_eq!(r.status, 403, "{path}: {}", text(&r));
    }
    assert!(account(&s, "ro-file").await.is_none() && account(&s, "renamed").await.is_none());
}

#[tokio::test]
async fn the_overview_charts_its_windows_and_shows_subscription_quota_bars() {
    let s = setup().await;
    let admin_api = s.cp.admin().await;
    let mut api = admin_api.clone();
    api.create_group(pb::CreateGroupRequest {
        name: "subs".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let (at, rt) = s._mock.mint_oauth_tokens("user:inference user:profile");
    api.create_account(pb::CreateAccountRequest {
        name: "sub-quota".into(),
        kind: pb::AccountKind::ClaudeOauth as i32,
        base_url: s._mock.base_url(),
        credential: at.clone(),
        refresh_token: rt,
        credential_expires_at_ms: chrono::Utc::now().timestamp_millis() + 3_600_000,
        groups: vec!["subs".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let key = api
        .create_api_key(pb::CreateApiKeyRequest {
            name: "sub-key".into(),
            group: "subs".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .key;
    s._mock.set_unified_utilization(&at, 0.42);
    let admin = s.sign_in(ADMIN_TOKEN).await;
    let page = text(&s.get("/", Some(&admin)).await);
    assert!(page.contains("sub-quota") && page.contains("not seen yet"), "{page}");
    s.dp.wait_version(s.cp.head().await).await;
    let r = post_messages(&s.dp, &key, &message_body(MODEL, false)).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let page = wait_for(Duration::from_secs(30), "the quota bar", || {
        let s = &s;
        let admin = admin.clone();
        async move {
            let p = text(&s.get("/", Some(&admin)).await);
            p.contains("value=\"42\"").then_some(p)
        }
    })
    .await
    .unwrap();
    let quotas = &page[page.find("id=\"quotas\"").unwrap()..];
    assert!(quotas.contains("<meter") && quotas.contains("42%"), "{quotas}");
    assert!(page.contains("Requests per hour, last day"));
    let week = text(&s.get("/?window=week", Some(&admin)).await);
    assert!(week.contains("Requests per day, last week") && week.contains("Cost per day, last week"));
    assert_eq!(s.get("/?window=year", Some(&admin)).await.status, 400);
    // The last hour, per 5 minutes, from the request log: the one request.
    let hour = wait_for(Duration::from_secs(30), "the request in the last hour's chart", || {
        let s = &s;
        let admin = admin.clone();
        async move {
            let p = text(&s.get("/?window=hour", Some(&admin)).await);
            p.contains("Requests per 5 minutes, last hour (max 1)").then_some(p)
        }
    })
    .await
    .unwrap();
    assert!(hour.contains("Errors per 5 minutes, last hour (max 0)"));
}

/// Reads `path`'s SSE answer while `meanwhile` runs, until `needle` arrives; panics after 60 s.
async fn sse_reads(
    s: &Setup,
    path: &str,
    cookie: &str,
    needle: &str,
    meanwhile: impl std::future::Future<Output = ()>,
) -> String {
    sse_until(s, path, cookie, needle, meanwhile).await.2
}

#[tokio::test]
async fn a_signed_out_session_is_dead_everywhere_and_a_live_tail_ends_with_its_session() {
    let s = setup().await;
    // Sign-out ends the session on the server: a copy of the cookie (stolen, or kept by a
    // proxy) is refused afterwards, though it is signed and unexpired.
    let admin = s.sign_in(ADMIN_TOKEN).await;
    let page = text(&s.get("/", Some(&admin)).await);
    let r = s.post("/signout", Some(&admin), &[("csrf", &csrf(&page))]).await;
    assert_eq!(r.status, 303);
    let r = s.get("/", Some(&admin)).await;
    assert_eq!(
        (r.status, r.header("location")),
        (303, Some("/signin")),
        "the copy after sign-out"
    );
    assert_eq!(s.get("/requests/tail", Some(&admin)).await.status, 303);
    let r = s
        .post("/keys", Some(&admin), &[("name", "late"), ("csrf", &csrf(&page))])
        .await;
    assert_eq!(r.status, 303, "a form posted with the old session does nothing");
    assert!(s.keys().await.is_empty());
    // Another session of the same token is not affected.
    let again = s.sign_in(ADMIN_TOKEN).await;
    assert_eq!(s.get("/", Some(&again)).await.status, 200);

    // The key holder's sign-out too.
    let (_, key) = s.cp.add_key("holder", &[]).await;
    let r = s.post("/me", None, &[("key", &key)]).await;
    assert_eq!(r.status, 303);
    let me = cookie_value(&r, "relay_me");
    let page = text(&s.get("/me", Some(&me)).await);
    assert!(page.contains("Your key: holder"), "{page}");
    let r = s.post("/me/signout", Some(&me), &[("csrf", &csrf(&page))]).await;
    assert_eq!(r.status, 303);
    let page = text(&s.get("/me", Some(&me)).await);
    assert!(
        !page.contains("Your key: holder") && page.contains("action=\"/me\""),
        "the copy after sign-out: {page}"
    );

    // A live tail ends (a `failed` event saying why) when its token is revoked...
    let viewer = s.sign_in(RO_TOKEN).await;
    let cp = &s.cp;
    let seen = sse_reads(&s, "/requests/tail", &viewer, "event: failed", async move {
        cp.admin()
            .await
            .revoke_admin_token(pb::RevokeAdminTokenRequest { token: "viewer".into() })
            .await
            .unwrap();
    })
    .await;
    assert!(seen.contains("session ended"), "{seen}");
    // ...and when its session signs out.
    let live = s.sign_in(ADMIN_TOKEN).await;
    let page = text(&s.get("/", Some(&live)).await);
    let seen = sse_reads(&s, "/requests/tail", &live, "event: failed", async {
        let r = s.post("/signout", Some(&live), &[("csrf", &csrf(&page))]).await;
        assert_eq!(r.status, 303);
    })
    .await;
    assert!(seen.contains("session ended"), "{seen}");

    // The Requests page filtered by a time range still tails (the range does not apply to it):
    // the tail's URL carries the other filters only, and an older link with a range still works.
    let (_, app) = s.cp.add_key("app", &[]).await;
    s.dp.wait_version(s.cp.head().await).await;
    let page = text(&s.get("/requests?since=1h&key=app", Some(&again)).await);
    assert!(
        page.contains("data-tail=\"&#x2f;requests&#x2f;tail?key=app\""),
        "{page}"
    );
    assert!(page.contains("the time range does not apply"), "{page}");
    let dp = &s.dp;
    let (status, _, seen) = sse_until(
        &s,
        "/requests/tail?since=1h&key=app",
        &again,
        "\"key\":\"app\"",
        async move {
            assert_eq!(post_messages(dp, &app, &message_body(MODEL, false)).await.status, 200);
        },
    )
    .await;
    assert_eq!(status, 200, "{seen}");
}

#[tokio::test]
async fn live_tails_are_bounded_per_replica() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = setup().await;
    let admin = s.sign_in(ADMIN_TOKEN).await;
    let addr = s.web.trim_start_matches("http://").to_string();
    // Opens a tail on a raw connection: the status line's code, and the connection (kept open).
    let open = |addr: String, cookie: String| async move {
        let mut c = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let req = format!("GET /requests/tail HTTP/1.1\r\nhost: {addr}\r\ncookie: relay_session={cookie}\r\n\r\n");
        c.write_all(req.as_bytes()).await.unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            assert_eq!(c.read(&mut b).await.unwrap(), 1, "the answer's head");
            head.push(b[0]);
        }
        let status: u16 = String::from_utf8_lossy(&head)[9..12].parse().unwrap();
        (status, c)
    };
    let mut open_tails = Vec::new();
    for _ in 0..relay_control_plane::web::MAX_LIVE_TAILS {
        let (status, c) = open(addr.clone(), admin.clone()).await;
        assert_eq!(status, 200);
        open_tails.push(c);
    }
    let (status, _) = open(addr.clone(), admin.clone()).await;
    assert_eq!(status, 503, "one tail more than the bound");
    let r = s.get("/requests/tail", Some(&admin)).await;
    assert!(text(&r).contains("live tails are open"), "{}", text(&r));
    // Closing one frees its place (the server notices at its next write, a keep-alive at worst).
    open_tails.pop();
    let (a, ad) = (addr.clone(), admin.clone());
    wait_for(Duration::from_secs(60), "a closed tail's place to free", || {
        let (a, ad) = (a.clone(), ad.clone());
        async move { (open(a, ad).await.0 == 200).then_some(()) }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn cross_site_posts_forged_notices_secret_settings_and_expired_keys_are_refused() {
    let s = setup().await;
    // A sign-in form posted from another site's page (login CSRF): refused, no cookie.
    for (path, field, secret) in [("/signin", "token", ADMIN_TOKEN), ("/me", "key", "rk-whatever")] {
        for site in ["cross-site", "same-site"] {
            let r = send(
                "POST",
                &format!("{}{path}", s.web),
                &[
                    ("content-type", "application/x-www-form-urlencoded"),
                    ("sec-fetch-site", site),
                ],
                form(&[(field, secret)]),
            )
            .await;
            assert_eq!(r.status, 403, "{path} from a {site} page");
            assert!(r.header("set-cookie").is_none());
            assert!(r.header("content-security-policy").is_some());
        }
    }
    // The same form from the console's own page signs in.
    let r = send(
        "POST",
        &format!("{}/signin", s.web),
        &[
            ("content-type", "application/x-www-form-urlencoded"),
            ("sec-fetch-site", "same-origin"),
        ],
        form(&[("token", ADMIN_TOKEN)]),
    )
    .await;
    assert_eq!(r.status, 303);
    let admin = cookie_value(&r, "relay_session");

    // A link cannot put words on a console page: only notices relay signed show.
    let page = text(
        &s.get(
            "/keys?notice=Your+session+expired%3A+sign+in+at+evil.example",
            Some(&admin),
        )
        .await,
    );
    assert!(!page.contains("evil.example"), "{page}");
    let token = csrf(&page);
    let r = s
        .post("/groups", Some(&admin), &[("name", "spare"), ("csrf", &token)])
        .await;
    assert_eq!(r.status, 303);
    let back = r.header("location").unwrap().to_string();
    assert!(text(&s.get(&back, Some(&admin)).await).contains("Group spare created."));
    let forged = back.replace("spare", "evil");
    assert!(!text(&s.get(&forged, Some(&admin)).await).contains("Group evil created."));

    // A secret setting's value is never shown again: not in the notice, not in its URL.
    let secret = "whsec-console-SECRET-0123456789";
    let r = s
        .post(
            "/settings",
            Some(&admin),
            &[("name", "notify.signing_secret"), ("value", secret), ("csrf", &token)],
        )
        .await;
    assert_eq!(r.status, 303, "{}", text(&r));
    let back = r.header("location").unwrap().to_string();
    assert!(!back.contains("SECRET"), "{back}");
    let page = text(&s.get(&back, Some(&admin)).await);
    assert!(page.contains("notify.signing_secret set to"), "{page}");
    assert!(!page.contains("SECRET"), "{page}");

    // An expired key's holder cannot sign in, and a session opened before it expired ends.
    let created =
        s.cp.admin()
            .await
            .create_api_key(pb::CreateApiKeyRequest {
                name: "short".into(),
                expires_at_ms: chrono::Utc::now().timestamp_millis() + 3_000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
    let r = s.post("/me", None, &[("key", &created.key)]).await;
    assert_eq!(r.status, 303, "not expired yet");
    let me = cookie_value(&r, "relay_me");
    let page = wait_for(Duration::from_secs(30), "the key to expire", || {
        let (s, me) = (&s, me.clone());
        async move {
            let page = text(&s.get("/me", Some(&me)).await);
            page.contains("no longer active").then_some(page)
        }
    })
    .await
    .unwrap();
    assert!(!page.contains("Recent requests"), "{page}");
    assert_eq!(s.post("/me", None, &[("key", &created.key)]).await.status, 401);
}

/// What a client or an upstream controls, written to look like markup.
const HOSTILE: &str = "\"'><img src=x onerror=alert(1)><script>alert(2)</script>";

#[tokio::test]
async fn client_and_upstream_strings_are_text_on_every_page() {
    let s = setup().await;
    let (_, key) = s.cp.add_key("app", &[]).await;
    s.cp.admin()
        .await
        .add_capture_rule(pb::AddCaptureRuleRequest::default())
        .await
        .unwrap();
    s.cp.admin()
        .await
        .create_group(pb::CreateGroupRequest {
            name: "spare".into(),
            description: HOSTILE.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    s.dp.wait_version(s.cp.head().await).await;
    // A client's model name, request id, headers and body; and a model the upstream names.
    let mut body = message_body(HOSTILE, false);
    body["messages"][0]["content"] = HOSTILE.into();
    let r = post(
        &s.dp,
        "/v1/messages",
        &key,
        &body,
        &[("x-request-id", "<b>id</b>"), ("x-hostile", HOSTILE)],
    )
    .await;
    let id = r.header("request-id").unwrap().to_string();
    let r2 = post(
        &s.dp,
        "/v1/messages",
        &key,
        &message_body(MODEL, true),
        &[("x-mock-answer-model", HOSTILE)],
    )
    .await;
    let id2 = r2.header("request-id").unwrap().to_string();
    let admin = s.sign_in(ADMIN_TOKEN).await;
    // Both recorded and both captured.
    for rid in [&id, &id2] {
        wait_for(Duration::from_secs(30), "the request and its capture", || {
            let (s, admin, rid) = (&s, admin.clone(), rid.clone());
            async move {
                let p = text(&s.get(&format!("/requests/{rid}"), Some(&admin)).await);
                p.contains("id=\"request-body\"").then_some(())
            }
        })
        .await
        .unwrap();
    }
    let r = s.post("/me", None, &[("key", &key)]).await;
    let me = cookie_value(&r, "relay_me");
    let pages = [
        "/".to_string(),
        "/?window=hour".into(),
        "/?window=week".into(),
        "/requests".into(),
        format!("/requests/{id}"),
        format!("/requests/{id2}"),
        "/usage?by=model".into(),
        "/usage?by=model&bucket=hour&since=24h".into(),
        "/groups".into(),
        "/audit".into(),
        "/me".into(),
        format!("/requests?model={}", super_encode(HOSTILE)),
    ];
    let mut reached = Vec::new();
    for p in &pages {
        let r = s.get(p, Some(if p == "/me" { &me } else { &admin })).await;
        let page = text(&r);
        assert!(r.status == 200 || r.status == 404, "{p}: {}", r.status);
        assert!(
            !page.contains("<img") && !page.contains("<script>") && !page.contains("<b>id"),
            "{p}: {page}"
        );
        // (relay keeps a model name's spaces as '_')
        if page.contains("&lt;img src=x onerror=alert(1)&gt;") || page.contains("&lt;img_src=x_onerror") {
            reached.push(p.clone());
        }
    }
    assert!(
        reached.len() >= 8,
        "the hostile strings reached the pages (as text): {reached:?}"
    );
    // The usage download: a model name starting like a formula stays text in a spreadsheet.
    let formula = "=HYPERLINK(\"http://evil.example\",\"x\")";
    let r = post_messages(&s.dp, &key, &message_body(formula, false)).await;
    let fid = r.header("request-id").unwrap().to_string();
    wait_for(Duration::from_secs(30), "the formula request in the log", || {
        let (s, admin, fid) = (&s, admin.clone(), fid.clone());
        async move { (s.get(&format!("/requests/{fid}"), Some(&admin)).await.status == 200).then_some(()) }
    })
    .await
    .unwrap();
    let csv = text(&s.get("/usage/export?format=csv&by=model", Some(&admin)).await);
    assert!(csv.contains("\"'=HYPERLINK("), "{csv}");
    assert!(
        !csv.lines().any(|l| l.starts_with("=") || l.starts_with("\"=")),
        "{csv}"
    );
}

fn super_encode(s: &str) -> String {
    s.bytes().map(|b| format!("%{b:02X}")).collect()
}

#[tokio::test]
async fn huge_or_malformed_forms_store_nothing_and_every_answer_is_a_page() {
    let s = setup().await;
    let admin = s.sign_in(ADMIN_TOKEN).await;
    let token = csrf(&text(&s.get("/keys", Some(&admin)).await));
    let accounts_before =
        s.cp.admin()
            .await
            .list_accounts(pb::ListAccountsRequest {})
            .await
            .unwrap()
            .into_inner()
            .accounts
            .len();
    // A credential far longer than any header an upstream takes: refused, saying the bound.
    let huge = "k".repeat(20_000);
    let r = s
        .post(
            "/accounts",
            Some(&admin),
            &[
                ("name", "huge"),
                ("kind", "anthropic-api-key"),
                ("credential", &huge),
                ("csrf", &token),
            ],
        )
        .await;
    assert_eq!(r.status, 400);
    assert!(
        text(&r).contains("at most 16384") && !text(&r).contains("kkkk"),
        "{}",
        text(&r)
    );
    // A key limited to thousands of models (relayctl's table could not even show it): refused.
    let models: Vec<String> = (0..5_000).map(|i| format!("model-{i}")).collect();
    let r = s
        .post(
            "/keys",
            Some(&admin),
            &[("name", "many"), ("models", &models.join(",")), ("csrf", &token)],
        )
        .await;
    assert_eq!(r.status, 400);
    assert!(text(&r).contains("more than 256 models"), "{}", text(&r));
    // A body over the console's bound, and a body that is not a form: refused.
    let r = s
        .post(
            "/groups",
            Some(&admin),
            &[
                ("name", "big"),
                ("description", &"A".repeat(3_000_000)),
                ("csrf", &token),
            ],
        )
        .await;
    assert_eq!(r.status, 413);
    let r = send(
        "POST",
        &format!("{}/groups", s.web),
        &[
            ("content-type", "application/json"),
            ("cookie", &format!("relay_session={admin}")),
        ],
        "{\"name\":\"json\"}",
    )
    .await;
    assert_eq!(r.status, 415);
    assert!(s.keys().await.is_empty(), "no key stored");
    let accounts =
        s.cp.admin()
            .await
            .list_accounts(pb::ListAccountsRequest {})
            .await
            .unwrap()
            .into_inner()
            .accounts;
    assert_eq!(accounts.len(), accounts_before, "no account stored");
    let groups =
        s.cp.admin()
            .await
            .list_groups(pb::ListGroupsRequest {})
            .await
            .unwrap()
            .into_inner()
            .groups;
    assert!(groups.iter().all(|g| g.name != "big" && g.name != "json"));

    // An unknown path is a console page (the links, the security headers), not an empty answer;
    // so are the static files' neighbours and a method a route does not take.
    for path in ["/nope", "/static/../Cargo.toml", "/static/console.css/x", "/keys/x/y/z"] {
        let r = s.get(path, Some(&admin)).await;
        assert_eq!(r.status, 404, "{path}");
        assert!(
            r.header("content-security-policy")
                .unwrap()
                .contains("script-src 'self'"),
            "{path}"
        );
        assert!(text(&r).contains("no such page"), "{path}: {}", text(&r));
    }
    let r = s.get("/signout", Some(&admin)).await;
    assert_eq!(r.status, 405);
    assert!(r.header("content-security-policy").is_some());
}

#[tokio::test]
async fn a_read_only_token_posting_every_form_changes_nothing() {
    let s = setup().await;
    let (key_id, _) = s.cp.add_key("app", &[]).await;
    let acct =
        s.cp.admin()
            .await
            .get_account(pb::GetAccountRequest {
                account: "acct-1".into(),
            })
            .await
            .unwrap()
            .into_inner();
    let head = s.cp.head().await;
    let audit = last_audit(&s).await.id;
    let viewer = s.sign_in(RO_TOKEN).await;
    let vt = csrf(&text(&s.get("/", Some(&viewer)).await));
    let a = acct.id.as_str();
    let creds = r#"{"claudeAiOauth":{"accessToken":"sk-ant-oat01-x","refreshToken":"sk-ant-ort01-y","expiresAt":4102444800000}}"#;
    let posts: Vec<(String, Vec<(&str, &str)>)> = vec![
        ("/keys".into(), vec![("name", "sneaky")]),
        (format!("/keys/{key_id}/limits"), vec![("rpm", "1")]),
        (format!("/keys/{key_id}/revoke"), vec![]),
        ("/accounts".into(), vec![("name", "sneaky"), ("credential", "sk-x")]),
        ("/accounts/check".into(), vec![]),
        ("/accounts/oauth".into(), vec![("name", "sneaky")]),
        ("/accounts/oauth/finish".into(), vec![("login", "x"), ("code", "a#b")]),
        (
            "/accounts/import".into(),
            vec![("name", "sneaky"), ("credentials", creds)],
        ),
        (format!("/accounts/{a}/disable"), vec![]),
        (format!("/accounts/{a}/enable"), vec![]),
        (format!("/accounts/{a}/reset"), vec![]),
        (format!("/accounts/{a}/check"), vec![]),
        (format!("/accounts/{a}/edit"), vec![("name", "renamed")]),
        (format!("/accounts/{a}/delete"), vec![("confirm", "acct-1")]),
        ("/groups".into(), vec![("name", "sneaky")]),
        ("/groups/default/pause".into(), vec![]),
        ("/groups/default/resume".into(), vec![]),
        ("/groups/default/activate".into(), vec![]),
        ("/groups/default/edit".into(), vec![("description", "x")]),
        ("/groups/default/delete".into(), vec![("confirm", "default")]),
        (
            "/settings".into(),
            vec![("name", "retry.deadline_ms"), ("value", "5000")],
        ),
        ("/settings".into(), vec![("name", "retry.deadline_ms"), ("unset", "1")]),
    ];
    for (path, fields) in &posts {
        let mut f = fields.clone();
        f.push(("csrf", &vt));
        let r = s.post(path, Some(&viewer), &f).await;
        // Refused by the service layer (403); the sealed OAuth login is refused before (400).
        assert!(
            r.status == 403 || (path.ends_with("/finish") && r.status == 400),
            "{path}: {} {}",
            r.status,
            text(&r)
        );
    }
    assert_eq!(s.cp.head().await, head, "no revision");
    assert_eq!(last_audit(&s).await.id, audit, "no audit entry");
    let acct2 =
        s.cp.admin()
            .await
            .get_account(pb::GetAccountRequest {
                account: "acct-1".into(),
            })
            .await
            .unwrap()
            .into_inner();
    assert_eq!(acct2.states, acct.states, "no check or reset ran");
}

/// The value of input `name` in the first form whose action is `action` on `page`, unescaped.
fn input_value(page: &str, action: &str, name: &str) -> String {
    let form = &page[page.find(&format!("action=\"{action}\"")).expect(action)..];
    let form = &form[..form.find("</form>").unwrap()];
    let at = form.find(&format!("name=\"{name}\" value=\"")).expect(name) + name.len() + 15;
    unescape(form[at..].split('"').next().unwrap())
}

#[tokio::test]
async fn editing_an_account_in_the_form_changes_only_what_the_operator_changed() {
    let s = setup().await;
    // An account reached through a proxy with a password: the form shows it masked.
    let acct =
        s.cp.admin()
            .await
            .update_account(pb::UpdateAccountRequest {
                account: "acct-1".into(),
                proxy_url: Some("http://user:proxy-PASSWORD@127.0.0.1:3128".into()),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
    let admin = s.sign_in(ADMIN_TOKEN).await;
    let page = text(&s.get("/accounts", Some(&admin)).await);
    assert!(!page.contains("PASSWORD"), "the proxy's password is never shown");
    let action = format!("/accounts/{}/edit", acct.id);
    let shown: Vec<(&str, String)> = [
        "name",
        "base_url",
        "groups",
        "priority",
        "weight",
        "max_concurrency",
        "proxy_url",
    ]
    .into_iter()
    .map(|n| (n, input_value(&page, &action, n)))
    .collect();
    assert_eq!(shown[6].1, "http://…@127.0.0.1:3128");
    let before = last_audit(&s).await.id;
    // Submitted as shown: nothing changes, nothing is audited.
    let token = csrf(&page);
    let mut f: Vec<(&str, &str)> = shown.iter().map(|(k, v)| (*k, v.as_str())).collect();
    f.push(("csrf", &token));
    let r = s.post(&action, Some(&admin), &f).await;
    assert_eq!(r.status, 303, "{}", text(&r));
    assert_eq!(last_audit(&s).await.id, before);
    // A new priority: saved, and the update carries the priority only (the proxy, with its
    // password, and the health states are kept).
    let mut f: Vec<(&str, &str)> = shown
        .iter()
        .map(|(k, v)| (*k, if *k == "priority" { "7" } else { v.as_str() }))
        .collect();
    f.push(("csrf", &token));
    let r = s.post(&action, Some(&admin), &f).await;
    assert_eq!(r.status, 303, "{}", text(&r));
    let entry = last_audit(&s).await;
    assert_eq!(entry.action, "account.update");
    assert!(
        entry.detail.contains("priority") && !entry.detail.contains("proxy_url"),
        "{entry:?}"
    );
    assert!(!entry.detail.contains("base_url"), "{entry:?}");
    let after =
        s.cp.admin()
            .await
            .get_account(pb::GetAccountRequest {
                account: "acct-1".into(),
            })
            .await
            .unwrap()
            .into_inner();
    assert_eq!(
        (after.priority, after.proxy_url.as_str()),
        (7, "http://…@127.0.0.1:3128")
    );
}

#[tokio::test]
async fn an_admin_checks_resets_disables_and_enables_accounts_from_the_page() {
    let s = setup().await;
    let acct =
        s.cp.admin()
            .await
            .get_account(pb::GetAccountRequest {
                account: "acct-1".into(),
            })
            .await
            .unwrap()
            .into_inner();
    let admin = s.sign_in(ADMIN_TOKEN).await;
    let page = text(&s.get("/accounts", Some(&admin)).await);
    let token = csrf(&page);
    for (action, notice) in [
        ("/accounts/check".to_string(), "Checked acct-1: "),
        (format!("/accounts/{}/check", acct.id), "Checked acct-1: "),
        (format!("/accounts/{}/disable", acct.id), "Account acct-1 disabled."),
        (format!("/accounts/{}/enable", acct.id), "Account acct-1 enabled."),
        (format!("/accounts/{}/reset", acct.id), "Account acct-1 reset."),
    ] {
        // (Enable shows once disabled.)
        assert!(
            action.ends_with("/enable") || page.contains(&format!("action=\"{action}\"")),
            "the page has the {action} form"
        );
        let r = s.post(&action, Some(&admin), &[("csrf", &token)]).await;
        assert_eq!(r.status, 303, "{action}: {}", text(&r));
        let back = text(&s.get(r.header("location").unwrap(), Some(&admin)).await);
        assert!(back.contains(notice), "{action}: {back}");
    }
    let name = admin_name(&s).await;
    let audit =
        s.cp.admin()
            .await
            .list_audit(pb::ListAuditRequest { limit: 20, since_ms: 0 })
            .await
            .unwrap()
            .into_inner()
            .entries;
    for action in ["account.disable", "account.enable", "account.reset"] {
        assert!(
            audit.iter().any(|e| e.action == action && e.actor == name),
            "{action} by {name}: {audit:?}"
        );
    }
}
