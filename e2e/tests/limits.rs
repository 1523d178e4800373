//! Fleet-wide limits (issue 9): three real data-plane processes behind one control plane on
//! Postgres, sharing one Redis. A key's requests per minute, concurrency, tokens per minute and
//! budgets hold across the fleet; sessions stay on one account across replicas; Redis killed under
//! load costs no request and limits keep within the stated bound.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use relay_mock_upstream::MockConfig;
use relay_proto::v1 as pb;
use relay_test_support::{free_port, wait_for, workspace_bin, Proc};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

struct Fleet {
    cp: ControlPlane,
    planes: Vec<(Proc, String)>,
    _dir: tempfile::TempDir,
}

impl Fleet {
    async fn start(redis: &str, n: usize) -> Fleet {
        let mut cp = ControlPlane::create(Backend::Postgres).await;
        // `relayctl key show` reads live counters from the same Redis (`--redis-url`).
        cp.limiter = Some(
            relay_limits::Limiter::new(relay_limits::LimiterOptions {
                redis_url: Some(redis.to_string()),
                redis_password: None,
                node_id: "control-plane".into(),
            })
            .unwrap(),
        );
        cp.resume().await;
        let dir = tempfile::tempdir().unwrap();
        let mut planes = Vec::new();
        for i in 0..n {
            planes.push(spawn_plane(&cp, redis, &format!("dp-{i}"), dir.path()).await);
        }
        Fleet { cp, planes, _dir: dir }
    }

    fn url(&self, i: usize) -> &str {
        &self.planes[i % self.planes.len()].1
    }

    /// Waits until every data plane serves the control plane's current config.
    async fn settle(&self) {
        let head = self.cp.head().await;
        for (_, url) in &self.planes {
            let ready = format!("{url}/readyz");
            wait_for(Duration::from_secs(20), "a data plane to serve the new config", || {
                let ready = ready.clone();
                async move {
                    let r = try_send("GET", &ready).await?;
                    let v = r.json()["config_version"].as_str()?.to_string();
                    (r.status == 200 && v == head.to_string()).then_some(())
                }
            })
            .await
            .unwrap();
        }
    }

    async fn key(&self, name: &str, limits: pb::KeyLimits) -> String {
        let r = self
            .cp
            .admin()
            .await
            .create_api_key(pb::CreateApiKeyRequest {
                name: name.into(),
                limits: Some(limits),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        self.settle().await;
        r.key
    }
}

async fn spawn_plane(cp: &ControlPlane, redis: &str, node: &str, dir: &std::path::Path) -> (Proc, String) {
    let port = free_port();
    let mut cmd = Command::new(workspace_bin("relay-data-plane"));
    cmd.args(["--control-plane", &cp.url()])
        .args(["--listen", &format!("127.0.0.1:{port}"), "--node-id", node])
        .arg("--data-dir")
        .arg(dir.join(node))
        .args(["--redis-url", redis])
        .env("RELAY_DATAPLANE_TOKEN", DP_TOKEN)
        .env("RUST_LOG", "info");
    let p = Proc::spawn(cmd, &dir.join(format!("{node}.log"))).unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let ready = format!("{url}/readyz");
    wait_for(Duration::from_secs(30), "a data plane to get its config", || {
        let ready = ready.clone();
        async move { try_send("GET", &ready).await.filter(|r| r.status == 200).map(|_| ()) }
    })
    .await
    .unwrap();
    (p, url)
}

async fn post_to(base: &str, key: &str, body: &serde_json::Value, extra: &[(&str, &str)]) -> HttpResponse {
    let h = sdk_headers(key);
    let mut headers: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
    headers.extend_from_slice(extra);
    send("POST", &format!("{base}/v1/messages"), &headers, body.to_string()).await
}

async fn key_status(base: &str, key: &str) -> serde_json::Value {
    let h = sdk_headers(key);
    let headers: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let r = send("GET", &format!("{base}/relay/v1/key"), &headers, "").await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()
}

fn limits() -> pb::KeyLimits {
    pb::KeyLimits::default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_per_minute_hold_exactly_across_three_data_planes() {
    let mock = mock(MockConfig::default()).await;
    let fleet = Fleet::start(&redis_url(), 3).await;
    fleet.cp.add_account("a", &mock.base_url(), ACCOUNT_SECRET).await;
    let key = fleet
        .key(
            "rpm",
            pb::KeyLimits {
                requests_per_minute: 30,
                ..limits()
            },
        )
        .await;
    let body = message_body("claude-sonnet-4-5", false);
    // 90 requests, 15 at a time, spread over the three data planes.
    let mut statuses = Vec::new();
    for batch in 0..6 {
        let mut set = tokio::task::JoinSet::new();
        for i in 0..15 {
            let (url, key, body) = (fleet.url(batch * 15 + i).to_string(), key.clone(), body.clone());
            set.spawn(async move { post_to(&url, &key, &body, &[]).await });
        }
        while let Some(r) = set.join_next().await {
            statuses.push(r.unwrap());
        }
    }
    let ok: Vec<_> = statuses.iter().filter(|r| r.status == 200).collect();
    let limited: Vec<_> = statuses.iter().filter(|r| r.status == 429).collect();
    assert_eq!(ok.len(), 30, "exactly the limit succeeds across the fleet");
    assert_eq!(limited.len(), 60);
    assert_eq!(mock.request_count(), 30, "refused requests never reach an upstream");
    for r in &limited {
        assert_eq!(r.error_type(), "rate_limit_error");
        assert!(r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("30 requests per minute"));
        let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
        assert!((1..=60).contains(&retry), "{retry}");
        assert_eq!(r.header("anthropic-ratelimit-requests-remaining"), Some("0"));
    }
    for r in &ok {
        assert_eq!(r.header("anthropic-ratelimit-requests-limit"), Some("30"));
        assert!(r.header("anthropic-ratelimit-requests-reset").unwrap().ends_with('Z'));
    }
    let remaining: Vec<u64> = ok
        .iter()
        .map(|r| {
            r.header("anthropic-ratelimit-requests-remaining")
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    assert_eq!(remaining.iter().min(), Some(&0));
    // The key holder sees the same count from any data plane.
    let s = key_status(fleet.url(2), &key).await;
    assert_eq!(s["limits"]["requests_per_minute"]["used"], 30, "{s}");
    assert_eq!(s["limits"]["requests_per_minute"]["remaining"], 0);
    assert_eq!(s["counted"], "shared");
    // Operators see the same live counters through the control plane.
    let shown = fleet
        .cp
        .admin()
        .await
        .get_api_key(pb::GetApiKeyRequest { key: "rpm".into() })
        .await
        .unwrap()
        .into_inner();
    let live = shown.live.expect("live counters from Redis");
    assert_eq!((live.requests_last_minute, live.in_flight), (30, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrency_holds_across_replicas_and_the_upstream_never_sees_more() {
    let mock = mock(MockConfig {
        ttfb: Duration::from_millis(400),
        ..MockConfig::default()
    })
    .await;
    let fleet = Fleet::start(&redis_url(), 3).await;
    fleet.cp.add_account("a", &mock.base_url(), ACCOUNT_SECRET).await;
    let key = fleet
        .key(
            "conc",
            pb::KeyLimits {
                max_concurrency: 2,
                ..limits()
            },
        )
        .await;
    let body = message_body("claude-sonnet-4-5", true);
    let mut set = tokio::task::JoinSet::new();
    for i in 0..12 {
        let (url, key, body) = (fleet.url(i).to_string(), key.clone(), body.clone());
        set.spawn(async move { post_to(&url, &key, &body, &[]).await });
    }
    let mut ok = 0;
    let mut limited = 0;
    while let Some(r) = set.join_next().await {
        let r = r.unwrap();
        match r.status {
            200 => ok += 1,
            429 => {
                limited += 1;
                assert!(r.json()["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("2 concurrent requests"));
            }
            s => panic!("unexpected {s}"),
        }
    }
    assert!(ok >= 2 && limited > 0, "ok {ok}, limited {limited}");
    assert!(
        mock.max_in_flight() <= 2,
        "the upstream saw {} at once",
        mock.max_in_flight()
    );
    // Every slot came back: the leases ended with the streams.
    wait_for(Duration::from_secs(5), "leases to end", || async {
        let s = key_status(fleet.url(0), &key).await;
        (s["limits"]["concurrency"]["in_flight"] == 0).then_some(())
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_accounts_max_concurrency_is_fleet_wide() {
    let mock = mock(MockConfig {
        ttfb: Duration::from_millis(300),
        ..MockConfig::default()
    })
    .await;
    let fleet = Fleet::start(&redis_url(), 3).await;
    fleet
        .cp
        .admin()
        .await
        .create_account(pb::CreateAccountRequest {
            name: "one-at-a-time".into(),
            kind: pb::AccountKind::AnthropicCompatible as i32,
            base_url: mock.base_url(),
            credential: ACCOUNT_SECRET.into(),
            max_concurrency: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    let (_, key) = fleet.cp.add_key("free", &[]).await;
    fleet.settle().await;
    let body = message_body("claude-sonnet-4-5", false);
    let mut set = tokio::task::JoinSet::new();
    for i in 0..6 {
        let (url, key, body) = (fleet.url(i).to_string(), key.clone(), body.clone());
        set.spawn(async move { post_to(&url, &key, &body, &[]).await });
    }
    while let Some(r) = set.join_next().await {
        assert_eq!(r.unwrap().status, 200, "requests wait for the account's one slot");
    }
    assert_eq!(mock.request_count(), 6);
    assert_eq!(
        mock.max_in_flight(),
        1,
        "one request at a time across three data planes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokens_per_minute_count_the_real_usage_of_each_answer() {
    let mock = mock(MockConfig::default()).await;
    let fleet = Fleet::start(&redis_url(), 3).await;
    fleet.cp.add_account("a", &mock.base_url(), ACCOUNT_SECRET).await;
    let mut body = message_body("claude-sonnet-4-5", true);
    body["max_tokens"] = serde_json::json!(8);
    let usage = relay_mock_upstream::expected_usage(&body);
    let used = usage.input_tokens + usage.output_tokens + usage.cache_creation_input_tokens;
    let estimate = body.to_string().len() as u64 / 4 + 8;
    assert!(
        used > estimate,
        "the answer uses more than the estimate ({used} vs {estimate})"
    );
    // Room for two answers and the third one's estimate, less one token.
    let tpm = 2 * used + estimate - 1;
    let key = fleet
        .key(
            "tpm",
            pb::KeyLimits {
                tokens_per_minute: tpm,
                ..limits()
            },
        )
        .await;
    for i in 0..2 {
        let r = post_to(fleet.url(i), &key, &body, &[]).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert!(String::from_utf8_lossy(&r.body).contains("message_stop"));
    }
    // Settled from the streams' usage (the charge settles just after the body ends).
    wait_for(Duration::from_secs(5), "usage to settle", || async {
        let s = key_status(fleet.url(2), &key).await;
        (s["limits"]["tokens_per_minute"]["used"] == 2 * used).then_some(())
    })
    .await
    .unwrap();
    let r = post_to(fleet.url(2), &key, &body, &[]).await;
    assert_eq!(r.status, 429);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains(&format!("{tpm} tokens per minute")));
    assert_eq!(r.header("anthropic-ratelimit-tokens-remaining"), Some("0"));
    assert_eq!(mock.request_count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_spent_monthly_budget_refuses_on_every_replica_until_next_month() {
    let mock = mock(MockConfig::default()).await;
    let fleet = Fleet::start(&redis_url(), 2).await;
    fleet.cp.add_account("a", &mock.base_url(), ACCOUNT_SECRET).await;
    // No daily budget; one micro-dollar a month: the first answer spends it.
    let key = fleet
        .key(
            "monthly",
            pb::KeyLimits {
                monthly_budget_micro_usd: 1,
                ..limits()
            },
        )
        .await;
    let body = message_body("claude-sonnet-4-5", false);
    assert_eq!(post_to(fleet.url(0), &key, &body, &[]).await.status, 200);
    for i in 0..4 {
        let r = wait_for(Duration::from_secs(5), "the spend to count", || {
            let (url, key, body) = (fleet.url(i).to_string(), key.clone(), body.clone());
            async move {
                let r = post_to(&url, &key, &body, &[]).await;
                // The retryable "in flight" 429 comes first until the spend is settled.
                (r.status == 429 && r.header("x-should-retry") == Some("false")).then_some(r)
            }
        })
        .await
        .unwrap();
        assert_eq!(r.error_type(), "rate_limit_error");
        assert_eq!(r.header("x-should-retry"), Some("false"));
        let message = r.json()["error"]["message"].as_str().unwrap().to_string();
        assert!(message.contains("monthly budget of $0.00"), "{message}");
        // It renews at the start of next month: at most 31 days away.
        let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
        assert!((1..=31 * 86_400).contains(&retry), "{retry}");
    }
    assert_eq!(
        mock.request_count(),
        1,
        "nothing after the budget was spent reached an upstream"
    );
    let s = key_status(fleet.url(1), &key).await;
    assert_eq!(s["limits"]["monthly_budget"]["remaining_usd"], 0.0, "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_spent_daily_budget_refuses_on_every_replica_until_tomorrow() {
    let mock = mock(MockConfig::default()).await;
    let fleet = Fleet::start(&redis_url(), 3).await;
    fleet.cp.add_account("a", &mock.base_url(), ACCOUNT_SECRET).await;
    // One micro-dollar: the first answer spends it.
    let key = fleet
        .key(
            "budget",
            pb::KeyLimits {
                daily_budget_micro_usd: 1,
                ..limits()
            },
        )
        .await;
    let body = message_body("claude-sonnet-4-5", false);
    let r = post_to(fleet.url(0), &key, &body, &[]).await;
    assert_eq!(r.status, 200);
    let mut refused = 0;
    for i in 0..6 {
        let r = wait_for(Duration::from_secs(5), "the spend to count", || {
            let (url, key, body) = (fleet.url(i).to_string(), key.clone(), body.clone());
            async move {
                let r = post_to(&url, &key, &body, &[]).await;
                // Until the first request's spend is settled, its reservation answers a
                // retryable 429 ("in flight may spend the rest"); then the spent budget.
                (r.status == 429 && r.header("x-should-retry") == Some("false")).then_some(r)
            }
        })
        .await
        .unwrap();
        assert_eq!(r.error_type(), "rate_limit_error");
        assert_eq!(
            r.header("x-should-retry"),
            Some("false"),
            "SDKs must not retry a spent budget: {} {:?}",
            String::from_utf8_lossy(&r.body),
            r.headers
        );
        assert!(r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("daily budget of $0.00"));
        let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
        assert!((1..=86_400).contains(&retry));
        refused += 1;
    }
    assert_eq!(refused, 6);
    assert_eq!(
        mock.request_count(),
        1,
        "nothing after the budget was spent reached an upstream"
    );
    // What the key holder sees is what the control plane stored.
    let stored = wait_for(Duration::from_secs(20), "the usage to be stored", || async {
        let t = fleet.cp.usage_total().await;
        (t.requests == 1).then_some(t)
    })
    .await
    .unwrap();
    let s = key_status(fleet.url(1), &key).await;
    let spent = s["limits"]["daily_budget"]["spent_usd"].as_f64().unwrap();
    assert!(stored.cost_pico_usd > 0);
    assert!(
        (spent - stored.cost_pico_usd as f64 / 1e12).abs() < 1e-6,
        "spent {spent} vs stored {}",
        stored.cost_pico_usd
    );
    assert_eq!(s["limits"]["daily_budget"]["remaining_usd"], 0.0);

    // Redis loses the running counters (a restart without persistence): the budget still holds,
    // from the spend the control plane stored.
    let id = fleet
        .cp
        .admin()
        .await
        .get_api_key(pb::GetApiKeyRequest { key: "budget".into() })
        .await
        .unwrap()
        .into_inner()
        .info
        .unwrap()
        .id;
    let p = relay_proto::periods::periods(chrono_tz::UTC, chrono::Utc::now().timestamp_millis());
    let deleted = Command::new("redis-cli")
        .args(["-u", &redis_url(), "DEL"])
        .arg(format!("relay:{{k:{id}}}:sd:UTC:{}", p.day))
        .arg(format!("relay:{{k:{id}}}:sm:UTC:{}", p.month))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&deleted.stdout).trim(),
        "2",
        "both counters were there"
    );
    for i in 0..3 {
        // Once this data plane has polled the stored spend, that is what it counts.
        wait_for(Duration::from_secs(10), "the stored spend to be polled", || async {
            let s = key_status(fleet.url(i), &key).await;
            let spent = s["limits"]["daily_budget"]["spent_usd"].as_f64()?;
            ((spent - stored.cost_pico_usd as f64 / 1e12).abs() < 1e-6).then_some(())
        })
        .await
        .unwrap();
        let r = post_to(fleet.url(i), &key, &body, &[]).await;
        assert_eq!(r.status, 429, "the stored spend still counts");
    }
    assert_eq!(mock.request_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_session_whose_turns_alternate_between_data_planes_stays_on_one_account() {
    let mock = mock(MockConfig::default()).await;
    let fleet = Fleet::start(&redis_url(), 3).await;
    for i in 0..4 {
        fleet
            .cp
            .add_account(&format!("acct-{i}"), &mock.base_url(), &format!("{ACCOUNT_SECRET}-{i}"))
            .await;
    }
    let (_, key) = fleet.cp.add_key("cc", &[]).await;
    fleet.settle().await;
    for session in 0..3 {
        mock.clear_requests();
        let id = uuid::Uuid::new_v4().to_string();
        for turn in 0..9 {
            let body = message_body("claude-sonnet-4-5", true);
            let r = post_to(
                fleet.url(turn),
                &key,
                &body,
                &[("x-claude-code-session-id", id.as_str())],
            )
            .await;
            assert_eq!(r.status, 200);
        }
        let accounts: std::collections::BTreeSet<String> = mock
            .requests()
            .iter()
            .map(|r| r.header("x-api-key").unwrap_or_default().to_string())
            .collect();
        assert_eq!(accounts.len(), 1, "session {session}: {accounts:?}");
    }
}

fn redis_server(port: u16) -> Child {
    let c = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_killed_under_load_costs_no_request_and_limits_hold_within_the_bound() {
    let port = free_port();
    let mut redis = redis_server(port);
    let url = format!("redis://127.0.0.1:{port}/0");
    let mock = mock(MockConfig::default()).await;
    let fleet = Fleet::start(&url, 3).await;
    fleet.cp.add_account("a", &mock.base_url(), ACCOUNT_SECRET).await;
    let busy = fleet
        .key(
            "busy",
            pb::KeyLimits {
                requests_per_minute: 100_000,
                max_concurrency: 64,
                ..limits()
            },
        )
        .await;
    let tight = fleet
        .key(
            "tight",
            pb::KeyLimits {
                requests_per_minute: 9,
                ..limits()
            },
        )
        .await;
    // Every data plane has counted the fleet (heartbeats every second).
    for i in 0..3 {
        let metrics = format!("{}/metrics", fleet.url(i));
        wait_for(Duration::from_secs(10), "a data plane to count the fleet", || {
            let metrics = metrics.clone();
            async move {
                let r = try_send("GET", &metrics).await?;
                String::from_utf8_lossy(&r.body)
                    .contains("relay_limits_live_data_planes 3")
                    .then_some(())
            }
        })
        .await
        .unwrap();
    }

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = tokio::task::JoinSet::new();
    for w in 0..6 {
        let (base, key, stop) = (fleet.url(w).to_string(), busy.clone(), stop.clone());
        load.spawn(async move {
            let mut statuses = Vec::new();
            let body = message_body("claude-sonnet-4-5", w % 2 == 0);
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                statuses.push(post_to(&base, &key, &body, &[]).await.status);
            }
            statuses
        });
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    redis.kill().unwrap();
    redis.wait().unwrap();
    wait_for(Duration::from_secs(10), "every data plane to notice", || async {
        for i in 0..3 {
            if key_status(fleet.url(i), &tight).await["counted"] != "degraded_local" {
                return None;
            }
        }
        Some(())
    })
    .await
    .unwrap();
    // While Redis is down, each data plane allows its share of the tight key: 9 / 3 = 3.
    let mut tight_ok = 0;
    for i in 0..30 {
        let r = post_to(fleet.url(i), &tight, &message_body("claude-sonnet-4-5", false), &[]).await;
        match r.status {
            200 => tight_ok += 1,
            429 => {
                let m = r.json()["error"]["message"].as_str().unwrap().to_string();
                assert!(m.contains("9 requests per minute") && m.contains("share"), "{m}");
            }
            s => panic!("unexpected {s}"),
        }
    }
    assert!((1..=9).contains(&tight_ok), "within the stated bound: {tight_ok}");
    for i in 0..3 {
        let r = try_send("GET", &format!("{}/readyz", fleet.url(i))).await.unwrap();
        assert_eq!(r.status, 200, "a data plane without Redis stays ready");
        let s = key_status(fleet.url(i), &tight).await;
        assert_eq!(s["counted"], "degraded_local", "{s}");
    }
    let mut redis = redis_server(port);
    // Back to Redis within a few heartbeats.
    wait_for(
        Duration::from_secs(10),
        "every data plane to count in Redis again",
        || async {
            for i in 0..3 {
                let s = key_status(fleet.url(i), &busy).await;
                if s["counted"] != "shared" {
                    return None;
                }
            }
            Some(())
        },
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop.store(true, std::sync::atomic::Ordering::Release);
    let mut total = 0;
    while let Some(r) = load.join_next().await {
        let statuses = r.unwrap();
        total += statuses.len();
        assert!(
            statuses.iter().all(|s| *s == 200),
            "no request failed because of Redis: {statuses:?}"
        );
    }
    assert!(total > 20, "the load ran: {total}");
    for (p, _) in &fleet.planes {
        let log = p.log_text();
        assert!(log.contains("Redis cannot be reached"), "{log}");
        assert!(log.contains("Redis answers again"), "{log}");
        assert!(!log.contains("panicked"), "{log}");
    }
    // No counter leaked: nothing is in flight any more, in Redis.
    wait_for(Duration::from_secs(5), "leases to end", || async {
        let s = key_status(fleet.url(0), &busy).await;
        (s["limits"]["concurrency"]["in_flight"] == 0).then_some(())
    })
    .await
    .unwrap();
    redis.kill().unwrap();
    let _ = redis.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn standalone_counts_limits_in_process() {
    let mock = mock(MockConfig::default()).await;
    let cp = ControlPlane::start(Backend::Sqlite).await;
    cp.add_account("a", &mock.base_url(), ACCOUNT_SECRET).await;
    let key = cp
        .admin()
        .await
        .create_api_key(pb::CreateApiKeyRequest {
            name: "k".into(),
            limits: Some(pb::KeyLimits {
                requests_per_minute: 2,
                ..limits()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .key;
    let dir = tempfile::tempdir().unwrap();
    let dp = DataPlane::start(&cp.url(), "solo", dir.path().join("dp")).await;
    dp.wait_version(cp.head().await).await;
    let body = message_body("claude-sonnet-4-5", false);
    assert_eq!(post_messages(&dp, &key, &body).await.status, 200);
    assert_eq!(post_messages(&dp, &key, &body).await.status, 200);
    let r = post_messages(&dp, &key, &body).await;
    assert_eq!(r.status, 429);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("2 requests per minute"));
    let s = send("GET", &dp.url("/relay/v1/key"), &[("x-api-key", key.as_str())], "").await;
    assert_eq!(s.json()["counted"], "process");
    assert_eq!(s.json()["name"], "k");
    // The key holder's endpoint takes GET only.
    let r = send("POST", &dp.url("/relay/v1/key"), &[("x-api-key", key.as_str())], "").await;
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET"));
    // A budget cannot count a model without a price: refused, not served for free.
    let budgeted = cp
        .admin()
        .await
        .create_api_key(pb::CreateApiKeyRequest {
            name: "budgeted".into(),
            limits: Some(pb::KeyLimits {
                daily_budget_micro_usd: 500,
                ..limits()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .key;
    dp.wait_version(cp.head().await).await;
    let r = post_messages(&dp, &budgeted, &message_body("claude-future-9", false)).await;
    assert_eq!(r.status, 400);
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("has no price"));
    assert_eq!(mock.request_count(), 2);
    // Another key is not affected.
    let (_, free) = cp.add_key("free", &[]).await;
    dp.wait_version(cp.head().await).await;
    let r = post_messages(&dp, &free, &body).await;
    assert_eq!(r.status, 200);
    assert!(r.header("anthropic-ratelimit-requests-limit").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_groups_limit_is_the_total_of_its_keys_and_limits_change_live() {
    let mock = mock(MockConfig::default()).await;
    let fleet = Fleet::start(&redis_url(), 2).await;
    fleet.cp.add_account("a", &mock.base_url(), ACCOUNT_SECRET).await;
    let admin = || async { fleet.cp.admin().await };
    let group = admin()
        .await
        .create_group(pb::CreateGroupRequest {
            name: "team".into(),
            limits: Some(pb::KeyLimits {
                requests_per_minute: 4,
                ..limits()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // The account serves the group too.
    admin()
        .await
        .update_account(pb::UpdateAccountRequest {
            account: "a".into(),
            set_groups: true,
            groups: vec!["default".into(), group.name.clone()],
            ..Default::default()
        })
        .await
        .unwrap();
    let mut keys = Vec::new();
    for name in ["alice", "bob"] {
        let r = admin()
            .await
            .create_api_key(pb::CreateApiKeyRequest {
                name: name.into(),
                group: "team".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        keys.push(r.key);
    }
    fleet.settle().await;
    let body = message_body("claude-sonnet-4-5", false);
    let mut ok = 0;
    for i in 0..8 {
        let r = post_to(fleet.url(i), &keys[i % 2], &body, &[]).await;
        match r.status {
            200 => ok += 1,
            429 => {
                let m = r.json()["error"]["message"].as_str().unwrap().to_string();
                assert!(
                    m.contains("group \"team\"") && m.contains("4 requests per minute"),
                    "{m}"
                );
            }
            s => panic!("unexpected {s}"),
        }
    }
    assert_eq!(ok, 4, "the group's total, whichever key asks");

    // Raised live: within a second every data plane has it.
    let changed = std::time::Instant::now();
    admin()
        .await
        .update_group(pb::UpdateGroupRequest {
            group: "team".into(),
            limits: Some(pb::KeyLimits {
                requests_per_minute: 6,
                ..limits()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    fleet.settle().await;
    assert!(
        changed.elapsed() < Duration::from_secs(1),
        "live in {:?}",
        changed.elapsed()
    );
    for (i, key) in keys.iter().enumerate() {
        assert_eq!(post_to(fleet.url(i), key, &body, &[]).await.status, 200);
    }
    assert_eq!(post_to(fleet.url(0), &keys[0], &body, &[]).await.status, 429);
    // A key of its own limit inside the group: the tighter one refuses first.
    admin()
        .await
        .update_api_key(pb::UpdateApiKeyRequest {
            key: "alice".into(),
            limits: Some(pb::KeyLimits {
                requests_per_minute: 100,
                ..limits()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    fleet.settle().await;
    let r = post_to(fleet.url(1), &keys[0], &body, &[]).await;
    assert_eq!(r.status, 429);
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("group"));
    // Lowered to 0 (unlimited): every request passes.
    admin()
        .await
        .update_group(pb::UpdateGroupRequest {
            group: "team".into(),
            limits: Some(limits()),
            ..Default::default()
        })
        .await
        .unwrap();
    admin()
        .await
        .update_api_key(pb::UpdateApiKeyRequest {
            key: "alice".into(),
            limits: Some(limits()),
            ..Default::default()
        })
        .await
        .unwrap();
    fleet.settle().await;
    for i in 0..4 {
        let r = post_to(fleet.url(i), &keys[i % 2], &body, &[]).await;
        assert_eq!(r.status, 200);
        assert!(r.header("anthropic-ratelimit-requests-limit").is_none());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_data_plane_that_never_reached_redis_takes_its_share_from_the_control_planes_count() {
    // Nothing listens there: every data plane starts with Redis down.
    let down = format!("redis://127.0.0.1:{}/0", free_port());
    let mock = mock(MockConfig::default()).await;
    let fleet = Fleet::start(&down, 3).await;
    fleet.cp.add_account("a", &mock.base_url(), ACCOUNT_SECRET).await;
    let key = fleet
        .key(
            "share",
            pb::KeyLimits {
                requests_per_minute: 30,
                ..limits()
            },
        )
        .await;
    // The control plane's count of connected data planes arrives with the next poll.
    wait_for(
        Duration::from_secs(10),
        "the fleet size from the control plane",
        || async {
            let s = key_status(fleet.url(0), &key).await;
            (s["limits"]["requests_per_minute"]["enforced_here"] == 10).then_some(())
        },
    )
    .await
    .unwrap();
    let body = message_body("claude-sonnet-4-5", false);
    let mut ok = 0;
    for _ in 0..30 {
        if post_to(fleet.url(0), &key, &body, &[]).await.status == 200 {
            ok += 1;
        }
    }
    assert_eq!(ok, 10, "this data plane's share of 30 over 3");
}
