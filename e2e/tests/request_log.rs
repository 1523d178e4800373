//! The request log end to end: mixed traffic (streaming and not, failovers, an upstream error,
//! a client that disconnects mid-stream) through two data planes into a Postgres control plane,
//! read back with the real `relayctl requests list|show|stats|tail`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use bytes::Bytes;
use common::*;
use http_body_util::Full;
use relay_mock_upstream::{Fault, MockConfig};
use relay_proto::v1 as pb;
use relay_test_support::wait_for;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::io::BufRead;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);
const MODEL: &str = "claude-sonnet-4-5";

fn json_list(server: &str, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["requests"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["-o", "json"]);
    let out = relayctl(server, ADMIN_TOKEN, &all, None);
    serde_json::from_str::<Value>(&out)
        .unwrap_or_else(|e| panic!("relayctl {all:?} is not JSON ({e}): {out}"))
        .as_array()
        .unwrap()
        .clone()
}

fn ids(records: &[Value]) -> BTreeSet<String> {
    records.iter().map(|r| r["id"].as_str().unwrap().to_string()).collect()
}

/// What the test knows about each request it sent, by relay's request id.
#[derive(Debug, Clone)]
struct Sent {
    stream: bool,
    key: &'static str,
    /// The client saw a success.
    ok: bool,
    disconnected: bool,
    /// Sent a body that is not JSON (refused before any upstream).
    bad_body: bool,
    /// Its `x-test-seq` header (relay forwards it: the upstream calls made for it carry it).
    seq: usize,
    /// The data plane it was sent to.
    node: &'static str,
}

/// The header that tags a client request's upstream calls.
const SEQ: &str = "x-test-seq";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_request_has_one_record_with_its_attempts_and_relayctl_reads_them() {
    let mock = mock(MockConfig {
        event_delay: Duration::from_millis(5),
        ..MockConfig::default()
    })
    .await;
    let cp = ControlPlane::start(Backend::Postgres).await;
    let server = cp.url();
    let mut admin = cp.admin().await;
    // default group: two good accounts and one that is always overloaded (fails over);
    // group "broken": one account answering 500 (the client gets the error).
    // "flaky" is tried first (priority 0) and kept out for only a millisecond after each 529, so
    // requests fail over from it to a good account (priority 1) again and again.
    cp.add_account("flaky", &mock.base_url(), "cred-flaky").await;
    mock.set_fault("cred-flaky", Some(Fault::Overloaded));
    cp.set_setting("cooldown.overloaded_ms", "1").await;
    for name in ["good-1", "good-2"] {
        admin
            .create_account(pb::CreateAccountRequest {
                name: name.into(),
                kind: pb::AccountKind::AnthropicCompatible as i32,
                base_url: mock.base_url(),
                credential: format!("cred-{name}"),
                priority: 1,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    admin
        .create_group(pb::CreateGroupRequest {
            name: "broken".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    admin
        .create_account(pb::CreateAccountRequest {
            name: "bad".into(),
            kind: pb::AccountKind::AnthropicCompatible as i32,
            base_url: mock.base_url(),
            credential: "cred-bad".into(),
            groups: vec!["broken".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    mock.set_fault("cred-bad", Some(Fault::ServerError));
    let (_, good_key) = cp.add_key("team-a", &[]).await;
    let broken_key = admin
        .create_api_key(pb::CreateApiKeyRequest {
            name: "team-b".into(),
            group: "broken".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .key;
    // A request with no account to wait for is answered at once (529), without an attempt.
    cp.set_setting("queue.max_wait_ms", "0").await;
    // A group without accounts: its key's requests find no account at all.
    admin
        .create_group(pb::CreateGroupRequest {
            name: "empty".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let empty_key = admin
        .create_api_key(pb::CreateApiKeyRequest {
            name: "team-c".into(),
            group: "empty".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .key;
    let head = cp.head().await;
    let dir = tempfile::tempdir().unwrap();
    let dp1 = DataPlane::start(&server, "dp-1", dir.path().join("dp1")).await;
    let dp2 = DataPlane::start(&server, "dp-2", dir.path().join("dp2")).await;
    dp1.wait_version(head).await;
    dp2.wait_version(head).await;

    // Mixed traffic, alternating data planes.
    let mut sent: BTreeMap<String, Sent> = BTreeMap::new();
    for i in 0..24 {
        let (dp, node) = if i % 2 == 0 { (&dp1, "dp-1") } else { (&dp2, "dp-2") };
        let stream = i % 3 == 0;
        let (key, name) = if i % 8 == 7 {
            (&broken_key, "team-b")
        } else {
            (&good_key, "team-a")
        };
        let seq = i.to_string();
        let r = post(dp, "/v1/messages", key, &message_body(MODEL, stream), &[(SEQ, &seq)]).await;
        let id = r.header("request-id").unwrap().to_string();
        sent.insert(
            id,
            Sent {
                stream,
                key: name,
                ok: r.status == 200,
                disconnected: false,
                bad_body: false,
                seq: i,
                node,
            },
        );
    }
    // Two clients that go away after the head of a stream.
    for (n, (dp, node)) in [(&dp1, "dp-1"), (&dp2, "dp-2")].into_iter().enumerate() {
        let h = sdk_headers(&good_key);
        let mut req = http::Request::builder()
            .method("POST")
            .uri(dp.url("/v1/messages"))
            .header(SEQ, (100 + n).to_string());
        for (k, v) in &h {
            req = req.header(*k, v.as_str());
        }
        let body = message_body(MODEL, true).to_string();
        let resp = http_client()
            .request(req.body(Full::new(Bytes::from(body))).unwrap())
            .await
            .unwrap();
        let id = resp.headers()["request-id"].to_str().unwrap().to_string();
        drop(resp);
        sent.insert(
            id,
            Sent {
                stream: true,
                key: "team-a",
                ok: false,
                disconnected: true,
                bad_body: false,
                seq: 100 + n,
                node,
            },
        );
    }
    // No enabled account at all: a configuration gap, 503 at once, still one record.
    {
        let r = post_messages(&dp2, &empty_key, &message_body(MODEL, false)).await;
        assert_eq!(r.status, 503);
        sent.insert(
            r.header("request-id").unwrap().to_string(),
            Sent {
                stream: false,
                key: "team-c",
                ok: false,
                disconnected: false,
                bad_body: false,
                seq: 200,
                node: "dp-2",
            },
        );
    }
    // A body that is not JSON: refused before any upstream, still one record.
    {
        let h = sdk_headers(&good_key);
        let headers: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let r = send("POST", &dp1.url("/v1/messages"), &headers, "{not json").await;
        assert_eq!(r.status, 400);
        sent.insert(
            r.header("request-id").unwrap().to_string(),
            Sent {
                stream: false,
                key: "team-a",
                ok: false,
                disconnected: false,
                bad_body: true,
                seq: 201,
                node: "dp-1",
            },
        );
    }
    assert!(sent.values().any(|s| !s.ok && !s.disconnected), "some request failed");

    // Every request has exactly one record (paged three at a time through the CLI).
    let want: BTreeSet<String> = sent.keys().cloned().collect();
    let records = wait_for(WAIT, "a record for every request", || {
        let server = server.clone();
        let want = want.clone();
        async move {
            let records = json_list(&server, &["list", "--all", "--limit", "3"]);
            (ids(&records) == want).then_some(records)
        }
    })
    .await
    .unwrap();
    assert_eq!(records.len(), sent.len(), "one record per request, none twice");

    // The right attempts, exactly: a record's attempts are the upstream calls made for its client
    // request (tagged by a header relay forwards), in order, each on the account whose credential
    // it carried, with the upstream's request id, through the data plane the client called.
    let account_of = BTreeMap::from([
        ("cred-good-1", "good-1"),
        ("cred-good-2", "good-2"),
        ("cred-flaky", "flaky"),
        ("cred-bad", "bad"),
    ]);
    let calls = mock.requests();
    for r in &records {
        let s = &sent[r["id"].as_str().unwrap()];
        let seq = s.seq.to_string();
        let want: Vec<(String, String)> = calls
            .iter()
            .filter(|c| c.header(SEQ) == Some(seq.as_str()))
            .map(|c| {
                let cred = c.header("x-api-key").unwrap();
                (account_of[cred].to_string(), c.request_id.clone())
            })
            .collect();
        let attempts = r["attempts"].as_array().unwrap();
        let got: Vec<(String, String)> = attempts
            .iter()
            .map(|a| {
                (
                    a["account"].as_str().unwrap().to_string(),
                    a["upstream_request_id"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        assert_eq!(got, want, "{r}");
        for a in attempts {
            assert_eq!(a["node"], s.node, "{r}");
        }
    }
    assert!(
        records.iter().any(|r| r["attempts"].as_array().unwrap().len() > 1),
        "some request failed over"
    );

    let flaky_attempts = mock
        .requests()
        .iter()
        .filter(|r| r.header("x-api-key") == Some("cred-flaky"))
        .count();
    let mut seen_flaky = 0;
    let mut no_upstream = 0;
    for r in &records {
        let id = r["id"].as_str().unwrap();
        let s = &sent[id];
        assert_eq!(r["stream"], s.stream, "{r}");
        assert_eq!(r["key"], s.key, "{r}");
        let attempts = r["attempts"].as_array().unwrap();
        if attempts.is_empty() {
            // Never reached an upstream: a bad body, or the broken group's account out (after
            // its 500) and nothing else to try.
            if s.bad_body {
                assert_eq!(r["status"], 400, "{r}");
                assert_eq!(r["outcome"], "invalid_request_error", "{r}");
                assert!(r["error_message"].as_str().unwrap().contains("not valid JSON"), "{r}");
            } else if s.key == "team-c" {
                // The group has no enabled account: said as a configuration gap.
                assert_eq!(r["outcome"], "api_error", "{r}");
                assert_eq!(r["status"], 503, "{r}");
                assert!(
                    r["error_message"]
                        .as_str()
                        .unwrap()
                        .contains("no enabled upstream account"),
                    "{r}"
                );
            } else {
                assert_eq!(s.key, "team-b", "{r}");
                assert_eq!(r["outcome"], "overloaded_error", "{r}");
                assert_eq!(r["status"], 529, "{r}");
                assert!(
                    r["error_message"].as_str().unwrap().contains("no upstream account"),
                    "{r}"
                );
            }
            assert_eq!(r["cost_usd"].as_f64().unwrap(), 0.0, "{r}");
            no_upstream += 1;
            continue;
        }
        assert_eq!(r["model"], MODEL, "{r}");
        for a in &attempts[..attempts.len() - 1] {
            // Only the overloaded account fails over (the broken group has one account).
            assert_eq!(a["account"], "flaky", "{r}");
            assert_eq!(a["outcome"], "overloaded_error", "{r}");
        }
        seen_flaky += attempts.iter().filter(|a| a["account"] == "flaky").count();
        let last = attempts.last().unwrap();
        if s.disconnected {
            assert_eq!(last["outcome"], "cancelled", "{r}");
        } else if s.key == "team-b" {
            assert_eq!(last["account"], "bad", "{r}");
            assert_eq!(last["outcome"], "api_error", "{r}");
            assert_eq!(r["status"], 500, "{r}");
            assert_eq!(r["group"], "broken", "{r}");
        } else if s.bad_body {
            unreachable!("a request without attempts is checked above");
        } else {
            assert!(s.ok, "{r}");
            assert!(["good-1", "good-2"].contains(&last["account"].as_str().unwrap()), "{r}");
            assert_eq!(last["outcome"], "ok", "{r}");
            assert_eq!(r["status"], 200, "{r}");
            assert!(r["output_tokens"].as_u64().unwrap() > 0, "{r}");
            assert!(r["cost_usd"].as_f64().unwrap() > 0.0, "{r}");
            assert_eq!(r["group"], "default", "{r}");
            if s.stream {
                // message_start … message_stop, pings included, as the client received them.
                assert!(r["stream_events"].as_u64().unwrap() > 30, "{r}");
            } else {
                assert_eq!(r["stream_events"], 0, "{r}");
            }
        }
        for field in ["time", "ttfb_ms", "duration_ms", "input_tokens", "cache_read_tokens"] {
            assert!(r.get(field).is_some(), "{field} in {r}");
        }
    }
    assert_eq!(
        seen_flaky, flaky_attempts,
        "every attempt on the overloaded account is in a record"
    );
    assert!(no_upstream >= 2, "the bad body and team-c's request: {no_upstream}");
    // Requests that never reached an upstream are no usage: `relayctl usage` counts attempts.
    let usage: Value = serde_json::from_str(&relayctl(&server, ADMIN_TOKEN, &["usage", "-o", "json"], None)).unwrap();
    let attempts_total: usize = records.iter().map(|r| r["attempts"].as_array().unwrap().len()).sum();
    assert_eq!(usage[0]["requests"], attempts_total, "{usage}");

    // Filters, through the CLI.
    let streams: BTreeSet<String> = sent.iter().filter(|(_, s)| s.stream).map(|(i, _)| i.clone()).collect();
    assert_eq!(ids(&json_list(&server, &["list", "--all", "--stream"])), streams);
    let team_b: BTreeSet<String> = sent
        .iter()
        .filter(|(_, s)| s.key == "team-b")
        .map(|(i, _)| i.clone())
        .collect();
    assert_eq!(
        ids(&json_list(&server, &["list", "--all", "--group", "broken"])),
        team_b
    );
    assert_eq!(ids(&json_list(&server, &["list", "--all", "--key", "team-b"])), team_b);
    let server_errors: BTreeSet<String> = sent
        .iter()
        .filter(|(_, s)| s.key != "team-a")
        .map(|(i, _)| i.clone())
        .collect();
    assert_eq!(
        ids(&json_list(&server, &["list", "--all", "--status", "5xx"])),
        server_errors
    );
    let cancelled: BTreeSet<String> = sent
        .iter()
        .filter(|(_, s)| s.disconnected)
        .map(|(i, _)| i.clone())
        .collect();
    assert_eq!(
        ids(&json_list(&server, &["list", "--all", "--status", "cancelled"])),
        cancelled
    );
    let ok: BTreeSet<String> = sent.iter().filter(|(_, s)| s.ok).map(|(i, _)| i.clone()).collect();
    assert_eq!(ids(&json_list(&server, &["list", "--all", "--status", "ok"])), ok);
    let via_flaky: BTreeSet<String> = records
        .iter()
        .filter(|r| {
            r["attempts"]
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a["account"] == "flaky")
        })
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        ids(&json_list(&server, &["list", "--all", "--account", "flaky"])),
        via_flaky
    );
    // A page of two is the newest two.
    let page = json_list(&server, &["list", "--limit", "2"]);
    assert_eq!(page.len(), 2);
    assert_eq!(page[0]["id"], records[0]["id"]);
    assert_eq!(page[1]["id"], records[1]["id"]);

    // show: the same record, with its attempts.
    let one = records
        .iter()
        .find(|r| r["attempts"].as_array().unwrap().len() > 1)
        .unwrap_or(&records[0]);
    let id = one["id"].as_str().unwrap();
    let shown: Value = serde_json::from_str(&relayctl(
        &server,
        ADMIN_TOKEN,
        &["requests", "show", id, "-o", "json"],
        None,
    ))
    .unwrap();
    // The same record, and its capture (none: no rule).
    let mut shown = shown;
    let capture = shown.as_object_mut().unwrap().remove("capture");
    assert_eq!(capture, Some(Value::Null), "{shown}");
    assert_eq!(&shown, one);
    let table = relayctl(&server, ADMIN_TOKEN, &["requests", "show", id], None);
    assert!(table.contains(id) && table.contains("attempts ("), "{table}");

    // stats: what a direct computation over the listed records gives, in total and for every
    // model, key and account (a request under its final attempt's account).
    let stats: Vec<Value> = serde_json::from_str(&relayctl(
        &server,
        ADMIN_TOKEN,
        &["requests", "stats", "-o", "json"],
        None,
    ))
    .unwrap();
    let nearest_rank = |mut v: Vec<u64>, p: usize| -> u64 {
        v.sort_unstable();
        if v.is_empty() {
            0
        } else {
            v[(v.len() * p).div_ceil(100).max(1) - 1]
        }
    };
    let direct = |rs: &[&Value]| -> Value {
        let sum = |f: &str| rs.iter().map(|r| r[f].as_u64().unwrap()).sum::<u64>();
        let errors = rs.iter().filter(|r| r["outcome"] != "ok").count();
        let durations: Vec<u64> = rs.iter().map(|r| r["duration_ms"].as_u64().unwrap()).collect();
        let ttfbs: Vec<u64> = rs
            .iter()
            .map(|r| r["ttfb_ms"].as_u64().unwrap_or(0))
            .filter(|t| *t > 0)
            .collect();
        serde_json::json!({
            "requests": rs.len(),
            "errors": errors,
            "error_ratio": format!("{:.4}", errors as f64 / rs.len() as f64),
            "duration_p50_ms": nearest_rank(durations.clone(), 50),
            "duration_p90_ms": nearest_rank(durations.clone(), 90),
            "duration_p99_ms": nearest_rank(durations, 99),
            "ttfb_p50_ms": nearest_rank(ttfbs.clone(), 50),
            "ttfb_p90_ms": nearest_rank(ttfbs.clone(), 90),
            "ttfb_p99_ms": nearest_rank(ttfbs, 99),
            "input_tokens": sum("input_tokens"),
            "output_tokens": sum("output_tokens"),
            "cache_read_tokens": sum("cache_read_tokens"),
            "cache_write_5m_tokens": sum("cache_write_5m_tokens"),
            "cache_write_1h_tokens": sum("cache_write_1h_tokens"),
            "cost_pico_usd": sum("cost_pico_usd"),
        })
    };
    let of_stats = |row: &Value| -> Value {
        let mut v = direct(&[]);
        for k in v.as_object().unwrap().keys().cloned().collect::<Vec<_>>() {
            v[&k] = if k == "error_ratio" {
                Value::String(format!("{:.4}", row[&k].as_f64().unwrap()))
            } else {
                row[&k].clone()
            };
        }
        v
    };
    let final_account = |r: &Value| -> String {
        r["attempts"]
            .as_array()
            .unwrap()
            .last()
            .map_or(String::new(), |a| a["account"].as_str().unwrap().to_string())
    };
    let mut groups: BTreeMap<(String, String), Vec<&Value>> = BTreeMap::new();
    for r in &records {
        groups.entry(("total".into(), String::new())).or_default().push(r);
        let model = r["model"].as_str().unwrap_or("").to_string();
        groups.entry(("model".into(), model)).or_default().push(r);
        groups
            .entry(("key".into(), r["key"].as_str().unwrap().to_string()))
            .or_default()
            .push(r);
        groups.entry(("account".into(), final_account(r))).or_default().push(r);
    }
    assert_eq!(stats.len(), groups.len(), "one stats row per group: {stats:?}");
    for row in &stats {
        let name = row["name"].as_str().unwrap_or("").to_string();
        let rs = groups
            .get(&(row["by"].as_str().unwrap().to_string(), name))
            .unwrap_or_else(|| panic!("a stats row for no records: {row}"));
        assert_eq!(of_stats(row), direct(rs), "{row}");
    }
    let total = stats.iter().find(|r| r["by"] == "total").unwrap();
    assert_eq!(total["requests"], records.len());
    let errors = sent.values().filter(|s| !s.ok).count();
    assert_eq!(total["errors"], errors, "{total}");
    let output: u64 = records.iter().map(|r| r["output_tokens"].as_u64().unwrap()).sum();
    assert_eq!(total["output_tokens"], output);
    let mut durations: Vec<u64> = records.iter().map(|r| r["duration_ms"].as_u64().unwrap()).collect();
    durations.sort_unstable();
    let p50 = durations[(durations.len() * 50).div_ceil(100) - 1];
    assert_eq!(total["duration_p50_ms"], p50);
    let by_key: u64 = stats
        .iter()
        .filter(|r| r["by"] == "key")
        .map(|r| r["requests"].as_u64().unwrap())
        .sum();
    assert_eq!(by_key, records.len() as u64);
    let b = stats
        .iter()
        .find(|r| r["by"] == "key" && r["name"] == "team-b")
        .unwrap();
    assert_eq!(b["requests"], team_b.len());
    assert_eq!(b["errors"], team_b.len());
    let csv = relayctl(&server, ADMIN_TOKEN, &["requests", "list", "-o", "csv"], None);
    assert!(csv.lines().next().unwrap().starts_with("id,time,"), "{csv}");

    // tail: new records as they are stored, each once.
    let mut child = std::process::Command::new(relay_test_support::workspace_bin("relayctl"))
        .args(["requests", "tail", "-o", "json"])
        .env("RELAY_SERVER", &server)
        .env("RELAY_ADMIN_TOKEN", ADMIN_TOKEN)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Give the tail a moment to start following, then send more.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut fresh = BTreeSet::new();
    for i in 0..4 {
        let dp = if i % 2 == 0 { &dp1 } else { &dp2 };
        let r = post_messages(dp, &good_key, &message_body(MODEL, i % 2 == 0)).await;
        fresh.insert(r.header("request-id").unwrap().to_string());
    }
    let mut tailed = Vec::new();
    let rx = std::sync::Mutex::new(rx);
    wait_for(WAIT, "tail to show the new requests", || {
        while let Ok(line) = rx.lock().unwrap().try_recv() {
            let v: Value = serde_json::from_str(&line).unwrap();
            tailed.push(v["id"].as_str().unwrap().to_string());
        }
        let done = fresh.iter().all(|id| tailed.contains(id));
        async move { done.then_some(()) }
    })
    .await
    .unwrap();
    child.kill().unwrap();
    let _ = child.wait();
    let unique: BTreeSet<&String> = tailed.iter().collect();
    assert_eq!(unique.len(), tailed.len(), "tail shows each record once: {tailed:?}");
    assert!(
        tailed.iter().all(|id| fresh.contains(id)),
        "tail shows only what was stored after it started: {tailed:?}"
    );

    // The model asked and the model answered: an upstream answering under another name.
    let h = sdk_headers(&good_key);
    let mut hs: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
    hs.push(("x-mock-answer-model", "glm-4.6"));
    let r = send(
        "POST",
        &dp1.url("/v1/messages"),
        &hs,
        message_body(MODEL, false).to_string(),
    )
    .await;
    assert_eq!(r.status, 200);
    let mapped = r.header("request-id").unwrap().to_string();
    let answered = wait_for(WAIT, "the mapped request's record", || {
        let server = server.clone();
        async move {
            let l = json_list(&server, &["list", "--all", "--model", "glm-4.6"]);
            (!l.is_empty()).then_some(l)
        }
    })
    .await
    .unwrap();
    assert_eq!(ids(&answered), BTreeSet::from([mapped.clone()]));
    assert_eq!(answered[0]["model"], "glm-4.6", "{}", answered[0]);
    assert_eq!(answered[0]["model_requested"], MODEL, "{}", answered[0]);
    // Every request that got as far as its body asked for MODEL; the one without a readable body
    // asked for nothing and has no model_requested.
    let asked = json_list(&server, &["list", "--all", "--model-requested", MODEL]);
    assert!(ids(&asked).contains(&mapped));
    let bad_body: BTreeSet<String> = sent
        .iter()
        .filter(|(_, s)| s.bad_body)
        .map(|(i, _)| i.clone())
        .collect();
    let everything = json_list(&server, &["list", "--all"]);
    let want_asked: BTreeSet<String> = ids(&everything).difference(&bad_body).cloned().collect();
    assert_eq!(ids(&asked), want_asked);
    for r in &everything {
        let id = r["id"].as_str().unwrap();
        if bad_body.contains(id) {
            assert!(r["model_requested"].is_null(), "{r}");
        } else {
            assert_eq!(r["model_requested"], MODEL, "{r}");
        }
    }

    // The group is the one the request was served in: team-b's key moves to the default group;
    // its old records stay in "broken", its new one is in "default".
    admin
        .update_api_key(pb::UpdateApiKeyRequest {
            key: "team-b".into(),
            group: Some("default".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let head = cp.head().await;
    dp2.wait_version(head).await;
    let r = post_messages(&dp2, &broken_key, &message_body(MODEL, false)).await;
    assert_eq!(r.status, 200);
    let moved = r.header("request-id").unwrap().to_string();
    let in_default = wait_for(WAIT, "the moved key's new record", || {
        let server = server.clone();
        let moved = moved.clone();
        async move {
            let l = json_list(&server, &["list", "--all", "--key", "team-b"]);
            l.iter().any(|r| r["id"] == moved.as_str()).then_some(l)
        }
    })
    .await
    .unwrap();
    for r in &in_default {
        let want = if r["id"] == moved.as_str() { "default" } else { "broken" };
        assert_eq!(r["group"], want, "{r}");
    }
    assert_eq!(
        ids(&json_list(&server, &["list", "--all", "--group", "broken"])),
        team_b,
        "the group filter follows the group at request time"
    );
    assert!(ids(&json_list(&server, &["list", "--all", "--group", "default"])).contains(&moved));
}
