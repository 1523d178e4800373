//! The OAuth refresh job against the mock's token endpoint (which rotates refresh tokens and
//! answers `invalid_grant` to a reused one) and a real store: refreshed ahead of expiry exactly
//! once per expiry, fenced by the leadership term, the answer kept across a lost commit, a rejected
//! refresh token taking the account out once, a 401 triggering one refresh.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use relay_control_plane::crypto::MasterKey;
use relay_control_plane::jobs::oauth_refresh::{OAuthEndpoint, Refresher, ACTOR};
use relay_control_plane::model::*;
use relay_control_plane::store::postgres::PostgresStore;
use relay_control_plane::store::sqlite::SqliteStore;
use relay_control_plane::store::DynStore;
use relay_mock_upstream::{MockConfig, MockUpstream};
use relay_test_support::{wait_for, TestDb};
use std::sync::Arc;
use std::time::Duration;

struct Fixture {
    store: DynStore,
    key: MasterKey,
    mock: MockUpstream,
    _db: Option<TestDb>,
    _dir: tempfile::TempDir,
}

async fn fixture(postgres: bool) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let (store, db) = if postgres {
        let db = TestDb::new().await.unwrap();
        let s = Arc::new(PostgresStore::connect(&db.url, 8).await.unwrap()) as DynStore;
        (s, Some(db))
    } else {
        let s = Arc::new(SqliteStore::open(&dir.path().join("relay.db")).unwrap()) as DynStore;
        (s, None)
    };
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    let (_, token_url) = mock.oauth_urls();
    let set = |name: &str, value: String| Mutation::SetSetting {
        name: name.into(),
        value,
    };
    store
        .apply(
            vec![
                set("oauth.token_url", token_url),
                set("oauth.refresh_ahead_ms", "1500".into()),
            ],
            audit(),
        )
        .await
        .unwrap();
    Fixture {
        store,
        key: MasterKey::generate(),
        mock,
        _db: db,
        _dir: dir,
    }
}

fn audit() -> AuditRecord {
    AuditRecord {
        actor: "test".into(),
        action: "test".into(),
        target: "test".into(),
        detail: "{}".into(),
    }
}

impl Fixture {
    /// A subscription account holding a fresh login's tokens, expiring in `expires_in_ms`.
    async fn account(&self, name: &str, expires_in_ms: i64) -> (String, String) {
        let (at, rt) = self.mock.mint_oauth_tokens("user:inference");
        let id = format!("acc-{name}");
        let row = Account {
            id: id.clone(),
            name: name.into(),
            kind: AccountKind::ClaudeOauth,
            base_url: self.mock.base_url(),
            credential_enc: self.key.seal(&at, &id).unwrap(),
            refresh_token_enc: Some(self.key.seal(&rt, &format!("{id}/refresh")).unwrap()),
            credential_hint: "…".into(),
            credential_expires_at: Some(now_ms() + expires_in_ms),
            priority: 0,
            weight: 1,
            group_ids: Vec::new(),
            max_concurrency: 0,
            status: AccountStatus::Enabled,
            proxy_url: String::new(),
            proxy_url_enc: None,
            reset_generation: 0,
            created_at: now_ms(),
            updated_at: now_ms(),
            revision: 0,
            scopes: vec!["user:inference".into()],
            subscription_type: "max".into(),
            organization: "Test Org".into(),
        };
        self.store
            .apply(vec![Mutation::InsertAccount(row)], audit())
            .await
            .unwrap();
        (id, rt)
    }

    fn refresher(&self) -> Arc<Refresher> {
        Arc::new(Refresher {
            store: self.store.clone(),
            key: self.key.clone(),
            endpoint: Arc::new(OAuthEndpoint {
                client: relay_oauth::TokenClient::new(&Default::default(), Duration::from_secs(5)).unwrap(),
            }),
            rejection_grace: Duration::from_secs(2),
        })
    }

    async fn get(&self, id: &str) -> Account {
        self.store.get_account(id).await.unwrap().unwrap()
    }

    fn access_token(&self, a: &Account) -> String {
        self.key.open(&a.credential_enc, &a.id).unwrap()
    }

    fn refresh_token(&self, a: &Account) -> String {
        self.key
            .open(a.refresh_token_enc.as_ref().unwrap(), &format!("{}/refresh", a.id))
            .unwrap()
    }

    /// Whether the mock's API takes `token` now.
    async fn token_works(&self, token: &str) -> bool {
        let before = self.mock.oauth_counters().rejected_access_tokens;
        let client = reqwest_like(&self.mock.base_url(), token).await;
        client && self.mock.oauth_counters().rejected_access_tokens == before
    }
}

/// One `POST /v1/messages` with `Authorization: Bearer token`; true on 200.
async fn reqwest_like(base: &str, token: &str) -> bool {
    use http_body_util::{BodyExt, Full};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    let client: Client<_, Full<bytes::Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let body = serde_json::json!({"model": "claude-sonnet-4-5", "max_tokens": 16,
        "messages": [{"role": "user", "content": "hi"}]});
    let req = http::Request::post(format!("{base}/v1/messages"))
        .header("authorization", format!("Bearer {token}"))
        .header("anthropic-version", "2023-06-01")
        .header("anthropic-beta", "oauth-2025-04-20")
        .header("content-type", "application/json")
        .body(Full::new(bytes::Bytes::from(body.to_string())))
        .unwrap();
    let r = client.request(req).await.unwrap();
    let ok = r.status() == 200;
    let _ = r.into_body().collect().await;
    ok
}

async fn leader_term(store: &DynStore, who: &str) -> u64 {
    store.claim_term(who, "test", "", now_ms()).await.unwrap()
}

async fn refreshes_ahead_of_expiry_exactly_once_each_time(postgres: bool) {
    let f = fixture(postgres).await;
    // Tokens live 3 s; the job refreshes 1.5 s before expiry.
    f.mock.set_oauth_token_lifetime(Duration::from_secs(3));
    let (id, first_rt) = f.account("sub", 3000).await;
    let term = leader_term(&f.store, "cp-1").await;
    let job = tokio::spawn(f.refresher().run(term));
    // About 8 s: four or five expiries, each refreshed once.
    let mut tokens = Vec::new();
    let until = std::time::Instant::now() + Duration::from_secs(8);
    while std::time::Instant::now() < until {
        let a = f.get(&id).await;
        let at = f.access_token(&a);
        assert!(f.token_works(&at).await, "the stored access token stopped working");
        if tokens.last() != Some(&at) {
            tokens.push(at);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    job.abort();
    let c = f.mock.oauth_counters();
    assert!(c.rotations >= 3, "{c:?}");
    assert_eq!(
        c.refresh_grants, c.rotations,
        "every refresh spent a current token: {c:?}"
    );
    assert_eq!(c.invalid_grants, 0, "no refresh token was ever reused: {c:?}");
    assert_eq!(c.rejected_access_tokens, 0, "{c:?}");
    let a = f.get(&id).await;
    assert_ne!(f.refresh_token(&a), first_rt, "the rotated refresh token is stored");
    assert!(a.credential_expires_at.unwrap() > now_ms());
    assert!(tokens.len() as u64 >= c.rotations, "each refresh reached the store");
    // Every refresh is audited, under the term.
    let audits: Vec<_> = f
        .store
        .list_audit(100, None)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.action == "account.oauth_refresh")
        .collect();
    assert_eq!(audits.len() as u64, c.rotations);
    assert!(
        audits[0].detail.contains(&format!("\"term\":{term}")),
        "{}",
        audits[0].detail
    );
    assert!(
        !audits[0].detail.contains("mock-oauth"),
        "no token in the audit: {}",
        audits[0].detail
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refreshes_ahead_of_expiry_exactly_once_each_time_postgres() {
    refreshes_ahead_of_expiry_exactly_once_each_time(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refreshes_ahead_of_expiry_exactly_once_each_time_sqlite() {
    refreshes_ahead_of_expiry_exactly_once_each_time(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_leader_cannot_commit_and_its_answer_is_kept_for_the_next() {
    let f = fixture(true).await;
    let (id, old_rt) = f.account("sub", 1000).await;
    let stale = leader_term(&f.store, "cp-1").await;
    // Another replica became leader meanwhile.
    let current = leader_term(&f.store, "cp-2").await;
    assert!(current > stale);
    // The stale leader still refreshes (it does not know yet): the token endpoint answers …
    let job = f.refresher().run(stale);
    tokio::time::timeout(Duration::from_secs(10), job)
        .await
        .expect("the stale leader's job stops once fenced");
    assert_eq!(f.mock.oauth_counters().rotations, 1);
    // … but its write is rejected: the account still holds the old tokens, and the answer is kept.
    let a = f.get(&id).await;
    assert_eq!(f.refresh_token(&a), old_rt, "a stale leader's write was applied");
    let kept = f.store.list_oauth_pending().await.unwrap();
    assert_eq!(kept.len(), 1, "the answer is kept");
    assert!(
        !String::from_utf8_lossy(&kept[0].sealed).contains("mock-oauth"),
        "kept sealed"
    );
    // The current leader applies the kept answer without spending the (now dead) old token.
    let job = tokio::spawn(f.refresher().run(current));
    wait_for(Duration::from_secs(10), "the kept answer to be applied", || async {
        let a = f.get(&id).await;
        (f.refresh_token(&a) != old_rt).then_some(())
    })
    .await
    .unwrap();
    job.abort();
    let c = f.mock.oauth_counters();
    assert_eq!((c.rotations, c.invalid_grants), (1, 0), "{c:?}");
    assert!(f.store.list_oauth_pending().await.unwrap().is_empty());
    let a = f.get(&id).await;
    assert!(f.token_works(&f.access_token(&a)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_refresh_token_takes_the_account_out_once() {
    let f = fixture(false).await;
    let (id, _) = f.account("sub", 1000).await;
    f.mock.revoke_all_oauth_tokens();
    let term = leader_term(&f.store, "cp-1").await;
    let job = tokio::spawn(f.refresher().run(term));
    let st = wait_for(Duration::from_secs(10), "the account to be taken out", || async {
        f.store
            .list_account_states()
            .await
            .unwrap()
            .into_iter()
            .find(|s| s.account_id == id)
    })
    .await
    .unwrap();
    assert_eq!(st.health, AccountHealth::Unauthorized);
    assert_eq!(st.reported_by, ACTOR);
    assert!(
        st.reason.contains("invalid_grant") && st.reason.contains("relayctl account login"),
        "{}",
        st.reason
    );
    assert_eq!(st.until, 0, "until an operator logs in again");
    // Not retried in a loop.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(f.mock.oauth_counters().refresh_grants, 1);
    job.abort();
    let audits = f.store.list_audit(50, None).await.unwrap();
    assert!(audits.iter().any(|e| e.action == "account.oauth_refresh_failed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_from_a_data_plane_triggers_one_refresh() {
    let f = fixture(false).await;
    // Far from expiry: only the 401 makes it due.
    let (id, old_rt) = f.account("sub", 3_600_000).await;
    let term = leader_term(&f.store, "cp-1").await;
    let job = tokio::spawn(f.refresher().run(term));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(f.mock.oauth_counters().refresh_grants, 0, "nothing due yet");
    let st = AccountState {
        account_id: id.clone(),
        scope: String::new(),
        health: AccountHealth::Unauthorized,
        reason: "401 authentication_error".into(),
        until: 0,
        since: now_ms(),
        reported_by: "dp-1".into(),
        revision: 0,
    };
    f.store
        .apply(vec![Mutation::SetAccountState(st)], audit())
        .await
        .unwrap();
    wait_for(
        Duration::from_secs(10),
        "the 401 to be answered by a refresh",
        || async {
            let a = f.get(&id).await;
            (f.refresh_token(&a) != old_rt).then_some(())
        },
    )
    .await
    .unwrap();
    // The new token ended the state; one refresh, not one per tick.
    wait_for(
        Duration::from_secs(5),
        "the unauthorized state to be cleared",
        || async {
            let states = f.store.list_account_states().await.unwrap();
            (!states.iter().any(|s| s.account_id == id)).then_some(())
        },
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    job.abort();
    assert_eq!(f.mock.oauth_counters().refresh_grants, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_token_endpoint_is_retried_with_backoff() {
    let f = fixture(false).await;
    let (id, old_rt) = f.account("sub", 1000).await;
    f.mock.fail_next_oauth_token_calls(1);
    let term = leader_term(&f.store, "cp-1").await;
    let job = tokio::spawn(f.refresher().run(term));
    wait_for(
        Duration::from_secs(20),
        "the refresh to succeed after a failure",
        || async {
            let a = f.get(&id).await;
            (f.refresh_token(&a) != old_rt).then_some(())
        },
    )
    .await
    .unwrap();
    job.abort();
    let c = f.mock.oauth_counters();
    assert_eq!((c.injected_failures, c.rotations, c.invalid_grants), (1, 1, 0), "{c:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leaders_probe_brings_a_repaired_account_back() {
    use relay_control_plane::jobs::probe::Prober;
    let f = fixture(false).await;
    // An API-key account a data plane took out with a 401; the upstream then repairs it.
    let id = "acc-key".to_string();
    let mut row = Account {
        id: id.clone(),
        name: "key-account".into(),
        kind: AccountKind::AnthropicApiKey,
        base_url: f.mock.base_url(),
        credential_enc: f.key.seal("key-broken", &id).unwrap(),
        refresh_token_enc: None,
        credential_hint: "…".into(),
        credential_expires_at: None,
        priority: 0,
        weight: 1,
        group_ids: Vec::new(),
        max_concurrency: 0,
        status: AccountStatus::Enabled,
        proxy_url: String::new(),
        proxy_url_enc: None,
        reset_generation: 0,
        created_at: now_ms(),
        updated_at: now_ms(),
        revision: 0,
        scopes: Vec::new(),
        subscription_type: String::new(),
        organization: String::new(),
    };
    f.mock
        .set_fault("key-broken", Some(relay_mock_upstream::Fault::Unauthorized));
    f.store
        .apply(vec![Mutation::InsertAccount(row.clone())], audit())
        .await
        .unwrap();
    let st = AccountState {
        account_id: id.clone(),
        scope: String::new(),
        health: AccountHealth::Unauthorized,
        reason: "401 authentication_error".into(),
        until: 0,
        since: now_ms(),
        reported_by: "dp-1".into(),
        revision: 0,
    };
    f.store
        .apply(vec![Mutation::SetAccountState(st)], audit())
        .await
        .unwrap();
    let prober = Arc::new(Prober {
        store: f.store.clone(),
        key: f.key.clone(),
        upstreams: Arc::new(relay_net::client::Upstreams::new(&Default::default()).unwrap()),
    });
    let term = leader_term(&f.store, "cp-1").await;
    let job = tokio::spawn(prober.clone().run(term));
    // Still broken: the first probe leaves the data plane's state as it is.
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert_eq!(f.store.list_account_states().await.unwrap().len(), 1);
    let probes = f.mock.requests().iter().filter(|r| r.path() == "/v1/models").count();
    assert_eq!(probes, 1, "one probe, then backoff");
    // Repaired upstream-side: the next probe (after its 30 s backoff) brings it back.
    f.mock.set_fault("key-broken", None);
    wait_for(
        Duration::from_secs(45),
        "the probe to bring the account back",
        || async { f.store.list_account_states().await.unwrap().is_empty().then_some(()) },
    )
    .await
    .unwrap();
    job.abort();
    row = f.get(&id).await;
    assert_eq!(row.reset_generation, 1, "reset like `relayctl account reset`");
    let audits = f.store.list_audit(50, None).await.unwrap();
    assert!(audits
        .iter()
        .any(|e| e.action == "account.check" && e.actor == "control-plane:probe"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejection_waits_for_a_paused_ex_leaders_kept_answer() {
    use relay_control_plane::jobs::oauth_refresh::{token_hash, Refreshed};
    let f = fixture(false).await;
    let (id, rt) = f.account("sub", 1000).await;
    // A replica that lost leadership spent the refresh token and froze before keeping the answer.
    let (_, token_url) = f.mock.oauth_urls();
    let cfg = relay_oauth::OAuthConfig {
        token_url,
        ..Default::default()
    };
    let client = relay_oauth::TokenClient::new(&Default::default(), Duration::from_secs(5)).unwrap();
    let answer = client.refresh(&cfg, &rt, None).await.unwrap();
    // The leader's own refresh of that token is rejected …
    let refresher = Arc::new(Refresher {
        rejection_grace: Duration::from_secs(8),
        ..Arc::try_unwrap(f.refresher()).ok().unwrap()
    });
    let term = leader_term(&f.store, "cp-2").await;
    let job = tokio::spawn(refresher.run(term));
    wait_for(
        Duration::from_secs(10),
        "the leader's refresh to be rejected",
        || async { (f.mock.oauth_counters().invalid_grants == 1).then_some(()) },
    )
    .await
    .unwrap();
    // … and the account stays in service while the ex-leader wakes up and keeps its answer.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        f.store.list_account_states().await.unwrap().is_empty(),
        "taken out too early"
    );
    let kept = Refreshed {
        access_token: answer.access_token.clone(),
        refresh_token: answer.refresh_token.clone(),
        expires_at_ms: answer.expires_at_ms,
        scopes: Vec::new(),
    };
    let sealed = f
        .key
        .seal(&serde_json::to_string(&kept).unwrap(), &format!("{id}/oauth-pending"))
        .unwrap();
    f.store
        .stash_oauth(&OAuthPending {
            account_id: id.clone(),
            from_hash: token_hash(&rt),
            sealed,
            created_at: now_ms(),
        })
        .await
        .unwrap();
    wait_for(Duration::from_secs(10), "the kept answer to be applied", || async {
        let a = f.get(&id).await;
        (Some(f.refresh_token(&a)) == answer.refresh_token).then_some(())
    })
    .await
    .unwrap();
    // Past the grace: still in service, never taken out, no false alarm in the audit.
    tokio::time::sleep(Duration::from_secs(8)).await;
    job.abort();
    assert!(f.store.list_account_states().await.unwrap().is_empty());
    let audits = f.store.list_audit(50, None).await.unwrap();
    assert!(!audits.iter().any(|e| e.action == "account.oauth_refresh_failed"));
    assert!(f.token_works(&f.access_token(&f.get(&id).await)).await);
}
