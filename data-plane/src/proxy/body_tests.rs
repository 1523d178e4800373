#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;
use crate::proxy::testkit::{self, Acct, ScriptedBody, Step};
use relay_proto::v1 as pb;
use std::sync::Arc;

const START: &str = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"usage\":{\"input_tokens\":5,\"output_tokens\":1}}}\n\n";
const DELTA: &str = "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"hi\"}}\n\n";
const STOP: &str = "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";

/// A tapped event stream over `steps`; the proxy (spool, health) is kept alive beside it.
fn tapped(steps: Vec<Step>, dir: &std::path::Path) -> (TappedBody<ScriptedBody>, Arc<crate::proxy::Proxy>) {
    let p = testkit::proxy(testkit::config(1, &[Acct::new("a")], pb::KeyStatus::Active, &[]), dir);
    let cfg = p.holder.get().unwrap();
    let account = cfg.accounts_of("g")[0].clone();
    let attempt = Attempt {
        spool: p.spool.clone(),
        pending: p.pending.clone(),
        config: cfg.clone(),
        node_id: p.node_id.clone(),
        request_id: "req_test".into(),
        key: cfg.key_for(testkit::KEY).unwrap().clone(),
        account: account.clone(),
        model: "claude-sonnet-4-5".into(),
        stream: true,
        started: Instant::now(),
        status: 200,
        upstream_request_id: String::new(),
        client_request_id: String::new(),
        waited: Default::default(),
        charge: None,
        log: testkit::log(),
        span: tracing::Span::none(),
    };
    let sink = HealthSink {
        registry: p.health.clone(),
        reporter: p.reporter.clone(),
        settings: cfg.health_settings(&account.id).clone(),
        generation: account.reset_generation,
        account,
    };
    let timeouts = BodyTimeouts {
        idle: Duration::from_secs(5),
        total_deadline: tokio::time::Instant::now() + Duration::from_secs(60),
    };
    let body = TappedBody::new(
        ScriptedBody::new(steps),
        None,
        Tap::for_content(true),
        attempt,
        sink,
        None,
        timeouts,
        None,
    );
    (body, p)
}

/// The frames the client is sent, as text.
async fn frames(mut body: TappedBody<ScriptedBody>) -> Vec<String> {
    let mut out = Vec::new();
    while let Some(f) = body.frame().await {
        let d = f.unwrap().into_data().unwrap();
        out.push(String::from_utf8(d.to_vec()).unwrap());
    }
    out
}

#[tokio::test]
async fn frames_already_arrived_leave_as_one_write() {
    let dir = tempfile::tempdir().unwrap();
    let (body, _p) = tapped(
        vec![
            Step::Data(START),
            Step::Data(DELTA),
            Step::Data(DELTA),
            Step::Data(STOP),
        ],
        dir.path(),
    );
    let sent = frames(body).await;
    assert_eq!(sent, vec![format!("{START}{DELTA}{DELTA}{STOP}")]);
}

#[tokio::test]
async fn only_whole_events_are_sent_and_the_rest_waits_for_its_end() {
    let dir = tempfile::tempdir().unwrap();
    let (first_half, second_half) = DELTA.split_at(30);
    let first_half: &'static str = first_half;
    let second_half: &'static str = second_half;
    let start_and_half: &'static str = Box::leak(format!("{START}{first_half}").into_boxed_str());
    let (body, _p) = tapped(
        vec![
            Step::Data(start_and_half),
            Step::Pending,
            Step::Pending,
            Step::Pending,
            Step::Data(second_half),
            Step::Data(STOP),
        ],
        dir.path(),
    );
    let sent = frames(body).await;
    assert_eq!(sent[0], START, "the first write ends on the event boundary");
    assert_eq!(sent.concat(), format!("{START}{DELTA}{STOP}"));
    assert!(sent.iter().all(|f| f.ends_with("\n\n")), "{sent:?}");
}

#[tokio::test]
async fn a_stream_that_dies_inside_an_event_ends_with_relays_error_event_on_a_boundary() {
    let dir = tempfile::tempdir().unwrap();
    let start_and_half: &'static str = Box::leak(format!("{START}{}", &DELTA[..30]).into_boxed_str());
    let (body, _p) = tapped(vec![Step::Data(start_and_half), Step::Fail], dir.path());
    let sent = frames(body).await.concat();
    assert!(sent.starts_with(START), "{sent}");
    let rest = &sent[START.len()..];
    assert!(
        rest.starts_with("event: error\ndata: "),
        "the half event is dropped: {rest}"
    );
    assert!(rest.contains("upstream connection lost mid-stream"), "{rest}");
}

#[tokio::test]
async fn a_stream_that_ends_before_message_stop_is_told_so() {
    let dir = tempfile::tempdir().unwrap();
    let (body, _p) = tapped(vec![Step::Data(START), Step::Data(DELTA)], dir.path());
    let sent = frames(body).await.concat();
    assert!(sent.starts_with(&format!("{START}{DELTA}")), "{sent}");
    assert!(sent.ends_with("\n\n") && sent.contains("event: error"), "{sent}");
    assert!(sent.contains("ended before message_stop"), "{sent}");
}
