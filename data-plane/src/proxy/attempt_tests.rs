#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;
use crate::proxy::testkit::{self, answer, deadline, Acct, ScriptedBody, Step, STREAM_OK};
use relay_proto::v1 as pb;

const OVERLOADED_STREAM: &str =
    "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n";

fn sse_tap() -> Tap {
    Tap::for_content(true)
}

#[tokio::test(start_paused = true)]
async fn the_hold_keeps_a_streams_head_until_its_first_event_is_whole() {
    let mut body = ScriptedBody::new(vec![
        Step::Data("event: message_start\ndata: {\"type\":\"message_start\","),
        Step::Pending,
        Step::Data("\"message\":{\"id\":\"msg_1\",\"usage\":{\"input_tokens\":1}}}\n\n"),
        Step::Data("event: ping\ndata: {\"type\":\"ping\"}\n\n"),
    ]);
    let mut tap = sse_tap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let (held, rest) = hold_first_event(&mut body, &mut tap, deadline).await.unwrap();
    assert!(held.ends_with(b"}}}\n\n"), "held exactly up to the first event");
    assert!(rest.is_empty());
    assert_eq!(first_event(&tap), FirstEvent::Started);
}

#[tokio::test(start_paused = true)]
async fn a_whole_stream_in_one_frame_is_judged_and_billed_by_its_first_event_alone() {
    // Everything in one read (relay's own HTTP/1.1 body hands over all that arrived): a stream
    // that opens with a ping and bills later must be refused on its first event, billing nothing;
    // one that opens well and breaks later is accepted, the rest left for the tapped body.
    let bad_first = "event: ping\ndata: {\"type\":\"ping\"}\n\n";
    let mut body = ScriptedBody::new(vec![Step::Data(Box::leak(
        format!("{bad_first}{STREAM_OK}").into_boxed_str(),
    ))]);
    let mut tap = sse_tap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let (held, rest) = hold_first_event(&mut body, &mut tap, deadline).await.unwrap();
    assert_eq!(held, bad_first.as_bytes());
    assert_eq!(rest, STREAM_OK.as_bytes());
    assert_eq!(first_event(&tap), FirstEvent::NotAnthropic);
    let r = tap.recorded(200);
    assert_eq!(
        (r.usage.input_tokens, r.usage.output_tokens),
        (0, 0),
        "nothing after the first event was read"
    );

    let corrupt_later = format!(
        "{}event: content_block_delta\ndata: {{not json\n\n",
        &STREAM_OK[..STREAM_OK.find("\n\n").unwrap() + 2]
    );
    let mut body = ScriptedBody::new(vec![Step::Data(Box::leak(corrupt_later.clone().into_boxed_str()))]);
    let mut tap = sse_tap();
    let (held, rest) = hold_first_event(&mut body, &mut tap, deadline).await.unwrap();
    assert_eq!(held.len() + rest.len(), corrupt_later.len());
    assert_eq!(
        first_event(&tap),
        FirstEvent::Started,
        "the corrupt event is not the first"
    );
}

#[tokio::test(start_paused = true)]
async fn the_hold_fails_over_a_stream_that_breaks_or_stalls_before_its_first_event() {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut broken = ScriptedBody::new(vec![Step::Data("event: message_start\n"), Step::Fail]);
    assert!(matches!(
        hold_first_event(&mut broken, &mut sse_tap(), deadline).await,
        Err(Outcome::ConnectError)
    ));
    let mut ended = ScriptedBody::new(vec![Step::Data("event: message_start\n")]);
    assert!(matches!(
        hold_first_event(&mut ended, &mut sse_tap(), deadline).await,
        Err(Outcome::ConnectError)
    ));
    let mut stalled = ScriptedBody::new(vec![Step::Data("event: message_start\n"), Step::Stall]);
    let t0 = tokio::time::Instant::now();
    assert!(matches!(
        hold_first_event(&mut stalled, &mut sse_tap(), deadline).await,
        Err(Outcome::Timeout)
    ));
    assert_eq!(
        t0.elapsed(),
        Duration::from_secs(10),
        "given until the deadline, no longer"
    );
}

#[tokio::test]
async fn what_a_first_event_says() {
    let said = |s: &str| {
        let mut tap = sse_tap();
        tap.feed(s.as_bytes());
        first_event(&tap)
    };
    assert_eq!(said(OVERLOADED_STREAM), FirstEvent::Error("overloaded_error".into()));
    assert_eq!(
        said("event: ping\ndata: {\"type\":\"ping\"}\n\n"),
        FirstEvent::NotAnthropic
    );
    assert_eq!(
        said("data: {\"type\":\"message_start\",\"message\":{}}\n\n"),
        FirstEvent::NotAnthropic,
        "no event name"
    );
    assert_eq!(
        said("event: message_start\ndata: not json\n\n"),
        FirstEvent::NotAnthropic
    );
    assert_eq!(first_event(&Tap::for_content(false)), FirstEvent::NotAnthropic);
    assert_eq!(stream_error_status("overloaded_error").as_u16(), 529);
    assert_eq!(stream_error_status("rate_limit_error").as_u16(), 429);
    assert_eq!(stream_error_status("api_error").as_u16(), 500);
    assert!(anthropic_status(200) && anthropic_status(404) && anthropic_status(529));
    assert!(!anthropic_status(101) && !anthropic_status(302) && !anthropic_status(600));
    let missing = br#"{"type":"error","error":{"type":"not_found_error","message":"Not found"}}"#;
    let unknown = br#"{"type":"error","error":{"type":"not_found_error","message":"model: claude-nope"}}"#;
    assert!(endpoint_missing(false, 404, missing) && endpoint_missing(false, 405, b""));
    assert!(
        !endpoint_missing(false, 404, unknown),
        "an unknown model is the client's error"
    );
    assert!(!endpoint_missing(true, 404, missing), "only count_tokens");
}

/// One attempt on an upstream answering `raw`: Ok(status) or Err((status the client would
/// see, whether another account may be tried, body)).
async fn attempt_on(raw: String, stream: bool) -> Result<u16, (u16, bool, String)> {
    let url = testkit::upstream(vec![raw]).await;
    let dir = tempfile::tempdir().unwrap();
    let p = testkit::proxy(
        testkit::config(1, &[Acct::new("a").at(&url)], pb::KeyStatus::Active, &[]),
        dir.path(),
    );
    let req = testkit::request(&p, stream);
    let log = testkit::log();
    let attempted = std::sync::atomic::AtomicBool::new(false);
    let ctx = AttemptCtx::new(&req, "req_test", Instant::now(), deadline(&req), None, &attempted, &log);
    let account = req.cfg.accounts_of("g")[0].clone();
    let slot = p.balancer.try_acquire(&account).unwrap();
    let span = attempt_span(&ctx, &account, 1);
    let out = p.attempt(&ctx, account, slot, Waited::default(), span).await;
    assert!(
        attempted.load(std::sync::atomic::Ordering::Acquire),
        "the attempt leaves a usage row"
    );
    match out {
        Ok(r) => {
            let status = r.status().as_u16();
            let body = crate::proxy::body_bytes(r.into_body()).await.unwrap();
            assert!(!body.is_empty());
            Ok(status)
        }
        Err((failure, retry)) => {
            let r = failure.into_response("req_test");
            let status = r.status().as_u16();
            let body = crate::proxy::body_bytes(r.into_body()).await.unwrap();
            Err((status, retry, String::from_utf8_lossy(&body).to_string()))
        }
    }
}

#[tokio::test]
async fn an_attempt_fails_over_an_overloaded_stream_and_passes_a_clients_own_error() {
    // A stream that opens with `event: error`: held, judged, another account may be tried.
    let (status, retry, body) = attempt_on(answer(200, "text/event-stream", OVERLOADED_STREAM), true)
        .await
        .unwrap_err();
    assert_eq!((status, retry), (529, true));
    assert!(body.contains("overloaded_error"), "{body}");
    // A rate limit: another account.
    let limited = r#"{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}"#;
    let (status, retry, _) = attempt_on(answer(429, "application/json", limited), false)
        .await
        .unwrap_err();
    assert_eq!((status, retry), (429, true));
    // The request's own fault: no account would answer otherwise; passed as the upstream said.
    let invalid = r#"{"type":"error","error":{"type":"invalid_request_error","message":"messages: Field required"}}"#;
    let (status, retry, body) = attempt_on(answer(400, "application/json", invalid), false)
        .await
        .unwrap_err();
    assert_eq!((status, retry), (400, false));
    assert!(body.contains("messages: Field required"), "{body}");
}

#[tokio::test]
async fn an_attempt_fails_over_what_is_not_an_anthropic_answer_and_accepts_one_that_is() {
    let (status, retry, body) = attempt_on(answer(200, "text/html", "<html>hi</html>"), false)
        .await
        .unwrap_err();
    assert_eq!((status, retry), (502, true));
    assert!(body.contains("not a valid Anthropic API response"), "{body}");
    let (status, retry, _) = attempt_on(answer(200, "application/json", STREAM_OK), true)
        .await
        .unwrap_err();
    assert_eq!((status, retry), (502, true), "JSON to a streaming request");
    let (status, retry, body) = attempt_on(answer(503, "text/html", "<html>down</html>"), false)
        .await
        .unwrap_err();
    assert_eq!((status, retry), (503, true));
    assert!(
        body.contains("without a readable error body"),
        "relay's own body, not the HTML: {body}"
    );
    assert_eq!(
        attempt_on(answer(200, "text/event-stream", STREAM_OK), true).await,
        Ok(200)
    );
}

/// An upstream that quotes the credential it was sent (the test account's `sk-ant-test`) in an
/// error: the client gets the error in its shape, the credential masked; only error answers are
/// looked at.
#[tokio::test]
async fn an_upstream_error_quoting_the_credential_reaches_the_client_masked() {
    for (status, kind) in [
        (400, "invalid_request_error"),
        (429, "rate_limit_error"),
        (500, "api_error"),
    ] {
        let echo = format!(
            r#"{{"type":"error","error":{{"type":"{kind}","message":"Incorrect API key provided: sk-ant-test. Or was it sk-ant-test?"}}}}"#
        );
        let (got, _, body) = attempt_on(answer(status, "application/json", &echo), false)
            .await
            .unwrap_err();
        assert_eq!(got, status);
        assert!(!body.contains("sk-ant-test"), "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"]["type"], kind, "{body}");
        assert_eq!(
            v["error"]["message"], "Incorrect API key provided: …. Or was it …?",
            "{body}"
        );
    }
}
