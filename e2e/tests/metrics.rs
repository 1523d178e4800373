//! relay's metrics against their catalogue (`relay_proto::metrics`): a real scrape of both
//! binaries after traffic (a failover, a stream, an error) passes `promtool check metrics` and
//! holds only cataloged metrics, each with its cataloged type and help; the Grafana dashboard and
//! the alert rules name only cataloged metrics; docs/observability.md lists every metric and
//! every alert.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use relay_mock_upstream::{Fault, MockConfig};
use relay_proto::metrics::{self as catalogue, Kind, CATALOGUE};
use relay_test_support::{free_port, wait_for, workspace_bin, Proc};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// Every `relay_…` metric name in `text` (PromQL, YAML, JSON), with its histogram series
/// suffix if any. The bare prefix of a `__name__` regex (`relay_(a|b)`) is skipped.
fn metric_names(text: &str) -> Vec<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(at) = text[i..].find("relay_") {
        let start = i + at;
        let boundary = start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        let name = &text[start..end];
        if boundary && name != "relay_" {
            out.push(name.to_string());
        }
        i = end.max(start + 1);
    }
    out
}

/// Every PromQL expression of the dashboard (panels in rows included), and of its variables.
fn dashboard_exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("expr" | "definition", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => dashboard_exprs(x, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| dashboard_exprs(x, out)),
        _ => {}
    }
}

/// The `expr:` of every rule (inline, or a folded `>-` block).
fn rule_exprs(rules: &str) -> Vec<String> {
    let mut out = Vec::new();
    let lines: Vec<&str> = rules.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        if let Some(rest) = line.trim_start().strip_prefix("expr:") {
            let indent = line.len() - line.trim_start().len();
            let rest = rest.trim();
            if rest.starts_with('>') || rest.starts_with('|') {
                let mut e = String::new();
                while i + 1 < lines.len() && (lines[i + 1].len() - lines[i + 1].trim_start().len()) > indent {
                    i += 1;
                    e.push_str(lines[i].trim());
                    e.push(' ');
                }
                out.push(e);
            } else {
                out.push(rest.to_string());
            }
        }
        i += 1;
    }
    out
}

#[test]
fn the_dashboard_and_the_alert_rules_name_only_cataloged_metrics() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo("helm/relay/dashboards/relay.json")).unwrap()).unwrap();
    let mut exprs = Vec::new();
    dashboard_exprs(&dashboard, &mut exprs);
    assert!(exprs.len() > 30, "{exprs:?}");
    let rules = std::fs::read_to_string(repo("helm/relay/alerts/relay.rules.yaml")).unwrap();
    let rule_exprs = rule_exprs(&rules);
    assert_eq!(rule_exprs.len(), rules.matches("- alert: ").count());
    for e in exprs.iter().chain(&rule_exprs) {
        let names = metric_names(e);
        assert!(!names.is_empty() || e.contains("relay_("), "no relay metric in {e:?}");
        for n in names {
            assert!(
                catalogue::find(&n).is_some(),
                "{n} (in {e:?}) is not in the metric catalogue"
            );
        }
    }
    // The rules' descriptions and the dashboard's panel descriptions name real metrics too.
    let text = std::fs::read_to_string(repo("helm/relay/dashboards/relay.json")).unwrap();
    for n in metric_names(&text).into_iter().chain(metric_names(&rules)) {
        assert!(catalogue::find(&n).is_some(), "{n} is not in the metric catalogue");
    }
    // What an operator looks for on it: accounts' state and quota, spend per key, relay's
    // overhead, errors; and the control plane's view of its data planes.
    let all = exprs.join("\n");
    for needed in [
        "relay_account_state{",
        "relay_account_quota_utilization{",
        "relay_usage_cost_micro_usd_total{namespace=~\"$namespace\",key!=\"\"}",
        "relay_overhead_seconds_bucket",
        "relay_error_answers_total",
        "relay_budget_used_ratio",
        "relay_data_plane_config_lag_revisions",
        "relay_data_plane_ingest_lag_seconds",
        "relay_leader_info",
    ] {
        assert!(all.contains(needed), "the dashboard has no panel on {needed}");
    }
}

#[test]
fn the_observability_doc_lists_every_metric_and_alert() {
    let doc = std::fs::read_to_string(repo("docs/observability.md")).unwrap();
    let mut missing = Vec::new();
    for m in CATALOGUE {
        let labels = if m.labels.is_empty() {
            String::new()
        } else {
            format!("{{{}}}", m.labels.join(","))
        };
        let row = format!(
            "| `{}{labels}` | {} | {} | {} | {} |",
            m.name,
            m.kind.as_str(),
            if m.unit.is_empty() { "" } else { m.unit },
            m.emitter.as_str(),
            m.help.replace('|', "\\|")
        );
        if !doc.lines().any(|l| l == row) {
            missing.push(row);
        }
    }
    assert!(
        missing.is_empty(),
        "docs/observability.md (section Metrics) should have these rows:\n{}",
        missing.join("\n")
    );
    // A renamed metric is documented with its new name, and no longer emitted.
    for (old, new) in catalogue::DEPRECATED {
        assert!(catalogue::find(old).is_none(), "{old} is both renamed and cataloged");
        assert!(
            doc.lines()
                .any(|l| l.contains(&format!("`{old}`")) && l.contains(&format!("`{new}`"))),
            "docs/observability.md does not say {old} is now {new}"
        );
    }
    let rules = std::fs::read_to_string(repo("helm/relay/alerts/relay.rules.yaml")).unwrap();
    for name in rules.lines().filter_map(|l| l.trim().strip_prefix("- alert: ")) {
        assert!(
            doc.contains(&format!("[{name}](runbooks.md#{})", name.to_lowercase())),
            "docs/observability.md (section Alerts) does not list {name}"
        );
    }
}

/// One scrape: HELP and TYPE per family, and every sample line.
struct Scrape {
    help: BTreeMap<String, String>,
    kind: BTreeMap<String, String>,
    samples: Vec<(String, String, f64)>,
}

fn parse(text: &str) -> Scrape {
    let mut s = Scrape {
        help: BTreeMap::new(),
        kind: BTreeMap::new(),
        samples: Vec::new(),
    };
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap();
            s.help.insert(name.to_string(), help.to_string());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            s.kind.insert(name.to_string(), kind.to_string());
        } else if !line.starts_with('#') {
            let (series, value) = line.rsplit_once(' ').unwrap();
            let (name, labels) = match series.split_once('{') {
                Some((n, l)) => (n, l.trim_end_matches('}')),
                None => (series, ""),
            };
            let value = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v.parse().unwrap_or(f64::NAN),
            };
            s.samples.push((name.to_string(), labels.to_string(), value));
        }
    }
    s
}

impl Scrape {
    fn value(&self, name: &str, labels: &[&str]) -> Option<f64> {
        self.samples
            .iter()
            .find(|(n, l, _)| n == name && labels.iter().all(|x| l.split(',').any(|p| p == *x)))
            .map(|s| s.2)
    }

    fn has(&self, name: &str) -> bool {
        self.samples.iter().any(|(n, _, _)| n == name)
    }
}

/// The scrape passes `promtool check metrics` (silently) and holds only cataloged metrics, each
/// with its cataloged type and help.
fn check_against_catalogue(what: &str, text: &str) -> Scrape {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("scrape.txt");
    std::fs::write(&file, text).unwrap();
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("promtool check metrics < {}", file.display()))
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics on the {what} scrape ({}):\n{said}",
        out.status
    );
    let s = parse(text);
    for (name, kind) in &s.kind {
        let m = CATALOGUE
            .iter()
            .find(|m| m.name == name.as_str())
            .unwrap_or_else(|| panic!("{what}: {name} is not in the catalogue"));
        assert_eq!(kind, m.kind.as_str(), "{what}: type of {name}");
        assert_eq!(
            s.help.get(name).map(String::as_str),
            Some(m.help),
            "{what}: help of {name}"
        );
    }
    for (name, labels, _) in &s.samples {
        let m = catalogue::find(name).unwrap_or_else(|| panic!("{what}: {name} is not in the catalogue"));
        assert!(s.kind.contains_key(m.name), "{what}: {name} has no # TYPE");
        for pair in labels.split(',').filter(|p| !p.is_empty()) {
            let key = pair.split_once('=').unwrap().0;
            assert!(
                m.labels.contains(&key) || (key == "le" && m.kind == Kind::Histogram),
                "{what}: {name} has label {key}, not in the catalogue's {:?}",
                m.labels
            );
        }
    }
    s
}

/// Every cataloged metric, each recorded once with every label it may carry, rendered by the
/// exporter relay installs: `promtool check metrics` is silent on all of them (not only on those a
/// scrape happens to hold), and each histogram has the catalogue's buckets.
#[test]
fn every_cataloged_metric_passes_promtool_with_its_buckets() {
    let recorder = relay_runtime::metrics::builder().build_recorder();
    let handle = recorder.handle();
    metrics::with_local_recorder(&recorder, || {
        catalogue::describe_all();
        for m in CATALOGUE {
            let labels: Vec<metrics::Label> = m.labels.iter().map(|l| metrics::Label::new(*l, "x")).collect();
            match m.kind {
                Kind::Counter => metrics::counter!(m.name, labels).increment(1),
                Kind::Gauge => metrics::gauge!(m.name, labels).set(1.0),
                Kind::Histogram => metrics::histogram!(m.name, labels).record(0.0002),
            }
        }
    });
    let text = handle.render();
    let s = check_against_catalogue("every cataloged metric", &text);
    for m in CATALOGUE {
        assert_eq!(
            s.kind.get(m.name).map(String::as_str),
            Some(m.kind.as_str()),
            "{}",
            m.name
        );
        if m.kind == Kind::Histogram {
            let les: Vec<f64> = s
                .samples
                .iter()
                .filter(|(n, _, _)| *n == format!("{}_bucket", m.name))
                .filter_map(|(_, l, _)| l.split(',').find_map(|p| p.strip_prefix("le=\"")))
                .map(|v| v.trim_end_matches('"'))
                .filter(|v| *v != "+Inf")
                .map(|v| v.parse().unwrap())
                .collect();
            assert_eq!(les, m.buckets(), "{} buckets", m.name);
        }
    }
}

async fn scrape(url: &str) -> String {
    let r = send("GET", url, &[], "").await;
    assert_eq!(r.status, 200, "{url}");
    String::from_utf8(r.body.to_vec()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_scrape_of_both_binaries_after_traffic_matches_the_catalogue() {
    // The first account's credential is refused upstream: requests fail over to the second.
    let mut mock_cfg = MockConfig::default();
    mock_cfg
        .faults_by_credential
        .insert("sk-refused".to_string(), Fault::Unauthorized);
    let mock = mock(mock_cfg).await;

    let dir = tempfile::tempdir().unwrap();
    let mut relay = Standalone::spawn(&dir.path().join("relay-data"), &dir.path().join("relay.log"), &[]);
    relay.ready().await;
    let token = std::fs::read_to_string(dir.path().join("relay-data/admin.token")).unwrap();
    let (server, token) = (relay.server(), token.trim().to_string());
    for (name, secret, priority) in [("refused", "sk-refused", "0"), ("good", "sk-good", "1")] {
        relayctl(
            &server,
            &token,
            &[
                "account",
                "add",
                name,
                "--kind",
                "anthropic-compatible",
                "--base-url",
                &mock.base_url(),
                "--priority",
                priority,
                "--secret-stdin",
            ],
            Some(&format!("{secret}\n")),
        );
    }
    let created: serde_json::Value = serde_json::from_str(&relayctl(
        &server,
        &token,
        &["-o", "json", "key", "create", "metrics-key", "--daily-budget", "100"],
        None,
    ))
    .unwrap();
    let key = created["key"].as_str().unwrap().to_string();
    let dp_token: serde_json::Value = serde_json::from_str(&relayctl(
        &server,
        &token,
        &["-o", "json", "token", "create", "dp-m", "--role", "data-plane"],
        None,
    ))
    .unwrap();

    // A data-plane process of its own.
    let port = free_port();
    let mut cmd = std::process::Command::new(workspace_bin("relay-data-plane"));
    cmd.args(["--control-plane", &format!("http://{server}")])
        .args(["--listen", &format!("127.0.0.1:{port}"), "--node-id", "dp-m"])
        .arg("--data-dir")
        .arg(dir.path().join("dp"))
        .env("RELAY_DATAPLANE_TOKEN", dp_token["token"].as_str().unwrap());
    let dp = Proc::spawn(cmd, &dir.path().join("dp.log")).unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let ready = format!("{base}/readyz");
    wait_for(Duration::from_secs(30), "the data plane to get its config", || {
        let url = ready.clone();
        async move { try_send("GET", &url).await.filter(|r| r.status == 200).map(|_| ()) }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", dp.log_text()));
    let h = sdk_headers(&key);
    let hs: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();

    // Traffic: a request that fails over (the refused account first), a stream, a bad key.
    let body = message_body("claude-sonnet-4-5", false).to_string();
    wait_for(Duration::from_secs(20), "the data plane to serve the key", || {
        let (url, body, hs) = (format!("{base}/v1/messages"), body.clone(), hs.clone());
        async move { (send("POST", &url, &hs, body).await.status == 200).then_some(()) }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", dp.log_text()));
    let streamed = send(
        "POST",
        &format!("{base}/v1/messages"),
        &hs,
        message_body("claude-sonnet-4-5", true).to_string(),
    )
    .await;
    assert_eq!(streamed.status, 200);
    assert!(String::from_utf8_lossy(&streamed.body).contains("event: message_stop"));
    let bad = send(
        "POST",
        &format!("{base}/v1/messages"),
        &[("x-api-key", "rk-not-a-key"), ("anthropic-version", "2023-06-01")],
        body.clone(),
    )
    .await;
    assert_eq!(bad.status, 401);

    // The control plane has stored the usage and heard the data plane's ingest lag.
    let cp_url = format!("http://127.0.0.1:{}/metrics", relay.proxy);
    let cp_text = wait_for(Duration::from_secs(20), "usage to reach the control plane", || {
        let url = cp_url.clone();
        async move {
            let t = scrape(&url).await;
            let s = parse(&t);
            (s.value("relay_usage_events_total", &["outcome=\"inserted\""])
                .unwrap_or(0.0)
                >= 3.0
                && s.has("relay_data_plane_ingest_lag_seconds")
                && s.value("relay_data_plane_config_lag_revisions", &["node_id=\"dp-m\""]) == Some(0.0))
            .then_some(t)
        }
    })
    .await
    .unwrap();
    let dp_text = scrape(&format!("{base}/metrics")).await;

    // Both scrapes: promtool is silent, and every metric is cataloged with its type and help.
    let cp = check_against_catalogue("control plane (standalone)", &cp_text);
    let dpm = check_against_catalogue("data plane", &dp_text);

    // The data plane: the failover, relay's overhead, the upstream's TTFB, the stream's
    // duration, tokens and cost by model pattern and group (no key label: it is opt-in).
    assert!(
        dpm.value("relay_failovers_total", &[]).unwrap_or(0.0) >= 1.0,
        "{dp_text}"
    );
    assert!(
        dpm.value("relay_overhead_seconds_count", &["route=\"messages\""])
            .unwrap_or(0.0)
            >= 3.0
    );
    assert!(dpm
        .value(
            "relay_overhead_seconds_bucket",
            &["route=\"messages\"", "le=\"0.0001\""]
        )
        .is_some());
    assert!(dpm.value("relay_upstream_ttfb_seconds_count", &[]).unwrap_or(0.0) >= 2.0);
    assert!(dpm.value("relay_request_duration_seconds_count", &["stream=\"true\""]) == Some(1.0));
    assert!(
        dpm.value("relay_usage_tokens_total", &["kind=\"output\"", "group=\"default\""])
            .unwrap_or(0.0)
            > 0.0,
        "{dp_text}"
    );
    assert!(
        dpm.value("relay_usage_cost_micro_usd_total", &["group=\"default\""])
            .unwrap_or(0.0)
            > 0.0
    );
    for (name, labels, _) in &dpm.samples {
        assert!(
            !labels.contains("key=") && !labels.contains(&key) && !labels.contains("metrics-key"),
            "{name}{{{labels}}}: no key label unless metrics.key_labels is on"
        );
        assert!(!labels.contains("sk-"), "{name}{{{labels}}}: a credential in a label");
    }
    assert!(dpm
        .samples
        .iter()
        .any(|(n, l, _)| n == "relay_usage_tokens_total" && l.contains("model=\"claude-sonnet-4")));
    assert_eq!(
        dpm.value(
            "relay_account_state",
            &["account=\"refused\"", "state=\"unauthorized\""]
        ),
        Some(1.0),
        "{dp_text}"
    );
    assert_eq!(
        dpm.value("relay_account_state", &["account=\"good\"", "state=\"available\""]),
        Some(1.0)
    );
    assert_eq!(
        dpm.value("relay_group_accounts_available", &["group=\"default\""]),
        Some(1.0)
    );
    assert!(dpm
        .value(
            "relay_budget_used_ratio",
            &["subject=\"key\"", "group=\"default\"", "period=\"day\""]
        )
        .is_some());
    assert_eq!(
        dpm.value("relay_error_answers_total", &["type=\"authentication_error\""]),
        Some(1.0)
    );
    assert_eq!(dpm.value("relay_control_plane_connected", &[]), Some(1.0));

    // The control plane: data planes connected and their config lag, ingest lag, the leader.
    assert_eq!(cp.value("relay_data_plane_connected", &["node_id=\"dp-m\""]), Some(1.0));
    assert_eq!(
        cp.value("relay_data_plane_connected", &["node_id=\"standalone\""]),
        Some(1.0)
    );
    assert!(cp.value("relay_watch_streams", &[]).unwrap_or(0.0) >= 2.0);
    assert!(cp
        .value("relay_data_plane_ingest_lag_seconds", &["node_id=\"dp-m\""])
        .is_some());
    assert!(cp
        .samples
        .iter()
        .any(|(n, l, v)| n == "relay_leader_info" && l.starts_with("replica=") && *v == 1.0));

    // With metrics.key_labels on, spend is by key name too.
    relayctl(
        &server,
        &token,
        &["settings", "set", "metrics.key_labels", "true"],
        None,
    );
    let with_key = wait_for(Duration::from_secs(20), "a key label after metrics.key_labels", || {
        let (url, body, hs, m) = (
            format!("{base}/v1/messages"),
            body.clone(),
            hs.clone(),
            format!("{base}/metrics"),
        );
        async move {
            assert_eq!(send("POST", &url, &hs, body).await.status, 200);
            let t = scrape(&m).await;
            // The budget gauge may carry the key before a request was counted under the new config.
            t.lines()
                .any(|l| l.starts_with("relay_usage_cost_micro_usd_total{") && l.contains("key=\"metrics-key\""))
                .then_some(t)
        }
    })
    .await
    .unwrap();
    let s = check_against_catalogue("data plane with key labels", &with_key);
    assert!(s
        .value(
            "relay_usage_cost_micro_usd_total",
            &["key=\"metrics-key\"", "group=\"default\""]
        )
        .is_some());
    assert!(s
        .value(
            "relay_budget_used_ratio",
            &["subject=\"key\"", "key=\"metrics-key\"", "period=\"day\""]
        )
        .is_some());
    drop(dp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_a_metrics_listener_the_api_port_says_where_metrics_are_and_state_gauges_stay_current() {
    let mock = mock(MockConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let metrics_port = free_port();
    let listen = format!("127.0.0.1:{metrics_port}");
    let mut relay = Standalone::spawn(
        &dir.path().join("relay-data"),
        &dir.path().join("relay.log"),
        &["--metrics-listen", &listen],
    );
    relay.ready().await;
    let token = std::fs::read_to_string(dir.path().join("relay-data/admin.token")).unwrap();
    // Not an empty 200 that a scraper would take for a healthy target with nothing to say.
    let on_api = send("GET", &format!("http://127.0.0.1:{}/metrics", relay.proxy), &[], "").await;
    assert_eq!(on_api.status, 404);
    let body = String::from_utf8_lossy(&on_api.body);
    assert!(
        body.contains("--metrics-listen") && body.contains("not_found_error"),
        "{body}"
    );
    // An account added after start shows in the state gauge without any scrape of the API port.
    relayctl(
        &relay.server(),
        token.trim(),
        &[
            "account",
            "add",
            "gauged",
            "--kind",
            "anthropic-compatible",
            "--base-url",
            &mock.base_url(),
            "--secret-stdin",
        ],
        Some("sk-gauged\n"),
    );
    let url = format!("http://{listen}/metrics");
    wait_for(Duration::from_secs(20), "the account's state gauge", || {
        let url = url.clone();
        async move {
            let text = scrape(&url).await;
            text.lines()
                .any(|l| l.starts_with("relay_account_state{") && l.contains("account=\"gauged\""))
                .then_some(())
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", relay.proc.log_text()));
}
