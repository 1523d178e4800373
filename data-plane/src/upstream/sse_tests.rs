//! Tests of the usage tap ([`super::SseTap`]): event framing, usage, errors, bounds; then property
//! tests (`props`) checking the tap against a reference reading on every split of a stream.

#![allow(clippy::unwrap_used)]

use super::*;

/// Everything a tap reports, for comparing runs.
#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    usage: Usage,
    model: Option<String>,
    message_id: Option<String>,
    start: bool,
    stop: bool,
    error_type: Option<String>,
    events: u64,
    first: bool,
}

fn snapshot(tap: &SseTap) -> Snapshot {
    Snapshot {
        usage: tap.usage(),
        model: tap.model().map(str::to_owned),
        message_id: tap.message_id().map(str::to_owned),
        start: tap.saw_message_start(),
        stop: tap.saw_message_stop(),
        error_type: tap.error_type().map(str::to_owned),
        events: tap.events(),
        first: tap.first_event_complete(),
    }
}

fn run(chunks: &[&[u8]]) -> Snapshot {
    let mut tap = SseTap::new();
    for chunk in chunks {
        tap.feed(chunk);
    }
    snapshot(&tap)
}

fn whole(s: &[u8]) -> Snapshot {
    run(&[s])
}

fn byte_by_byte(s: &[u8]) -> Snapshot {
    let mut tap = SseTap::new();
    for b in s {
        tap.feed(std::slice::from_ref(b));
    }
    snapshot(&tap)
}

/// Checks that every way of chunking `s` gives `expected`.
fn assert_any_chunking(s: &[u8], expected: &Snapshot) {
    assert_eq!(&whole(s), expected, "whole");
    assert_eq!(&byte_by_byte(s), expected, "byte by byte");
    for i in 0..=s.len() {
        assert_eq!(&run(&[&s[..i], &s[i..]]), expected, "split at {i}");
    }
    for size in [2, 3, 5, 7, 16, 61, 256] {
        let chunks: Vec<&[u8]> = s.chunks(size).collect();
        assert_eq!(&run(&chunks), expected, "chunks of {size}");
    }
    // Empty chunks anywhere change nothing.
    let mut tap = SseTap::new();
    for chunk in s.chunks(3) {
        tap.feed(b"");
        tap.feed(chunk);
        tap.feed(b"");
    }
    assert_eq!(&snapshot(&tap), expected, "with empty chunks");
}

const STREAM: &str = concat!(
    "event: message_start\n",
    r#"data: {"type":"message_start","message":{"id":"msg_01ABCdef","type":"message","role":"assistant","model":"claude-sonnet-4-5-20250929","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":25,"cache_creation_input_tokens":300,"cache_read_input_tokens":2000,"cache_creation":{"ephemeral_5m_input_tokens":100,"ephemeral_1h_input_tokens":200},"output_tokens":1,"service_tier":"standard"}}}"#,
    "\n\n",
    "event: content_block_start\n",
    r#"data: {"type":"content_block_start","index":0,"content_block":{"type":"thinking","thinking":"","signature":""}}"#,
    "\n\n",
    "event: ping\n",
    r#"data: {"type": "ping"}"#,
    "\n\n",
    "event: content_block_delta\n",
    r#"data: {"type":"content_block_delta","index":0,"delta":{"type":"thinking_delta","thinking":"Let me think… 🦀 about \"message_start\"\n"}}"#,
    "\n\n",
    "event: content_block_delta\n",
    r#"data: {"type":"content_block_delta","index":0,"delta":{"type":"signature_delta","signature":"EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds"}}"#,
    "\n\n",
    "event: content_block_stop\n",
    r#"data: {"type":"content_block_stop","index":0}"#,
    "\n\n",
    "event: content_block_start\n",
    r#"data: {"type":"content_block_start","index":1,"content_block":{"type":"text","text":""}}"#,
    "\n\n",
    "event: content_block_delta\n",
    r#"data: {"type":"content_block_delta","index":1,"delta":{"type":"text_delta","text":"Héllo, wörld 🦀! "}}"#,
    "\n\n",
    "event: ping\n",
    r#"data: {"type": "ping"}"#,
    "\n\n",
    "event: content_block_delta\n",
    r#"data: {"type":"content_block_delta","index":1,"delta":{"type":"text_delta","text":"Let me check the weather."}}"#,
    "\n\n",
    "event: content_block_stop\n",
    r#"data: {"type":"content_block_stop","index":1}"#,
    "\n\n",
    "event: content_block_start\n",
    r#"data: {"type":"content_block_start","index":2,"content_block":{"type":"tool_use","id":"toolu_01T1x1fJ34qAmk2tNTrN7Up6","name":"get_weather","input":{}}}"#,
    "\n\n",
    "event: content_block_delta\n",
    r#"data: {"type":"content_block_delta","index":2,"delta":{"type":"input_json_delta","partial_json":""}}"#,
    "\n\n",
    "event: content_block_delta\n",
    r#"data: {"type":"content_block_delta","index":2,"delta":{"type":"input_json_delta","partial_json":"{\"location\": \"Par"}}"#,
    "\n\n",
    "event: content_block_delta\n",
    r#"data: {"type":"content_block_delta","index":2,"delta":{"type":"input_json_delta","partial_json":"is\"}"}}"#,
    "\n\n",
    "event: content_block_stop\n",
    r#"data: {"type":"content_block_stop","index":2}"#,
    "\n\n",
    "event: message_delta\n",
    r#"data: {"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},"usage":{"output_tokens":89}}"#,
    "\n\n",
    "event: message_stop\n",
    r#"data: {"type":"message_stop"}"#,
    "\n\n",
);

fn expected_full() -> Snapshot {
    Snapshot {
        usage: Usage {
            input_tokens: 25,
            output_tokens: 89,
            cache_write_5m_tokens: 100,
            cache_write_1h_tokens: 200,
            cache_read_tokens: 2000,
            web_search_requests: 0,
        },
        model: Some("claude-sonnet-4-5-20250929".to_owned()),
        message_id: Some("msg_01ABCdef".to_owned()),
        start: true,
        stop: true,
        error_type: None,
        events: 18,
        first: true,
    }
}

/// Where every event of `s` ends (offsets after its blank line).
fn event_ends(s: &[u8]) -> Vec<u64> {
    let mut ends = Vec::new();
    let mut tap = SseTap::new();
    for (i, b) in s.iter().enumerate() {
        tap.feed(std::slice::from_ref(b));
        if ends.last() != Some(&tap.complete_bytes()) && tap.complete_bytes() > 0 {
            ends.push(tap.complete_bytes());
        }
        assert!(tap.complete_bytes() <= (i + 1) as u64);
    }
    ends
}

#[test]
fn complete_bytes_is_always_an_event_boundary_whatever_the_chunking() {
    for stream in [
        STREAM.to_string(),
        STREAM.replace('\n', "\r\n"),
        STREAM.replace('\n', "\r"),
    ] {
        let s = stream.as_bytes();
        let ends = event_ends(s);
        assert_eq!(
            ends.last().copied(),
            Some(s.len() as u64),
            "the whole stream is complete"
        );
        // Each boundary follows a blank line: the bytes before it end with two line ends.
        for &e in &ends {
            let before = &s[..e as usize];
            assert!(
                // (a CR ends a line at once; the LF after it, if any, joins it when it comes)
                before.ends_with(b"\n\n")
                    || before.ends_with(b"\r\n\r")
                    || before.ends_with(b"\r\r")
                    || before.ends_with(b"\r\n\r\n"),
                "{:?}",
                String::from_utf8_lossy(&before[before.len().saturating_sub(20)..])
            );
        }
        // Any two-piece chunking gives the same boundary for the same bytes.
        for cut in (0..s.len()).step_by(7) {
            let mut tap = SseTap::new();
            tap.feed(&s[..cut]);
            let at_cut = tap.complete_bytes();
            assert!(at_cut == 0 || ends.contains(&at_cut), "{at_cut} at cut {cut}");
            assert!(ends.iter().filter(|&&e| e <= cut as u64).max().copied().unwrap_or(0) >= at_cut);
            tap.feed(&s[cut..]);
            assert_eq!(tap.complete_bytes(), s.len() as u64);
            assert_eq!(tap.fed(), s.len() as u64);
        }
    }
}

#[test]
fn unreadable_message_start_is_flagged() {
    let mut tap = SseTap::new();
    tap.feed(b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\": 5\n\n");
    assert!(tap.saw_message_start());
    assert!(tap.usage_unparsed());
    let mut ok = SseTap::new();
    ok.feed(STREAM.as_bytes());
    assert!(!ok.usage_unparsed());
}

#[test]
fn full_stream_any_chunking() {
    assert_any_chunking(STREAM.as_bytes(), &expected_full());
}

#[test]
fn crlf_and_cr_line_endings() {
    let crlf = STREAM.replace('\n', "\r\n");
    assert_any_chunking(crlf.as_bytes(), &expected_full());
    let cr = STREAM.replace('\n', "\r");
    assert_any_chunking(cr.as_bytes(), &expected_full());
    // Mixed: every kind of line end in one stream.
    // (Never a CR line end before an empty line ending in LF: that would be one CRLF.)
    let lines: Vec<&str> = STREAM.split('\n').collect();
    let mixed: String = lines[..lines.len() - 1]
        .iter()
        .enumerate()
        .map(|(i, line)| format!("{line}{}", ["\r", "\r\n", "\n", "\r\n"][i % 4]))
        .collect();
    assert!(mixed.contains("\r\r\n") && mixed.contains("\n\r") && mixed.contains("\r\n\n"));
    assert_any_chunking(mixed.as_bytes(), &expected_full());
}

#[test]
fn cr_then_lf_in_the_next_chunk_is_one_line_end() {
    // If the LF were a second line end, it would dispatch an event with no name in between.
    let s = "event: message_delta\r";
    let mut tap = SseTap::new();
    tap.feed(s.as_bytes());
    tap.feed(b"");
    tap.feed(b"\ndata: {\"usage\":{\"output_tokens\":3}}\r");
    tap.feed(b"\n\r");
    tap.feed(b"\n");
    assert_eq!(tap.events(), 1);
    assert_eq!(tap.usage().output_tokens, 3);
    // CR CR is two line ends: the second dispatches.
    let mut tap = SseTap::new();
    tap.feed(b"event: message_stop\rdata: {}\r");
    assert_eq!(tap.events(), 0);
    tap.feed(b"\r");
    assert_eq!(tap.events(), 1);
    assert!(tap.saw_message_stop());
}

#[test]
fn bom_at_start_is_skipped() {
    let s = format!("\u{FEFF}{STREAM}");
    assert_any_chunking(s.as_bytes(), &expected_full());
    // A BOM anywhere else is part of the line: here it spoils message_start's data field.
    let s = format!("event: ping\ndata: {{}}\n\n{STREAM}").replacen(
        "data: {\"type\":\"message_start\"",
        "\u{FEFF}data: {\"type\":\"message_start\"",
        1,
    );
    let snap = whole(s.as_bytes());
    assert!(!snap.start);
    assert_eq!(snap.model, None);
    assert_eq!(snap.events, expected_full().events);
    // Only one BOM is skipped.
    let s = "\u{FEFF}\u{FEFF}data: {\"type\":\"message_stop\"}\n\n";
    assert!(!whole(s.as_bytes()).stop);
    assert!(whole(&s.as_bytes()[3..]).stop);
}

#[test]
fn comments_unknown_fields_and_unknown_events_are_ignored() {
    let extra = concat!(
        ": keep-alive comment\n",
        ":\n",
        "id: 42\n",
        "retry: 1000\n",
        "x-custom: whatever\n",
        "event: brand_new_event\n",
        r#"data: {"type":"brand_new_event","usage":{"output_tokens":999999}}"#,
        "\n\n",
        "event: content_block_delta\n",
        r#"data: {"type":"content_block_delta","index":0,"delta":{"type":"future_delta","x":1}}"#,
        "\n\n",
        ": another comment between events\n\n",
    );
    let s = STREAM.replacen("event: ping\n", &format!("{extra}event: ping\n"), 1);
    let mut expected = expected_full();
    expected.events += 2;
    assert_any_chunking(s.as_bytes(), &expected);
}

#[test]
fn field_syntax() {
    // No space after the colon; two spaces keep one; "data" alone is an empty data line.
    let mut tap = SseTap::new();
    tap.feed(b"event:message_delta\ndata:{\"usage\":{\"output_tokens\":5}}\n\n");
    assert_eq!(tap.usage().output_tokens, 5);
    tap.feed(b"event:  message_delta\ndata: {\"usage\":{\"output_tokens\":6}}\n\n");
    assert_eq!(tap.usage().output_tokens, 5, "\" message_delta\" is another name");
    assert_eq!(tap.events(), 2);
    // An event without data is not dispatched; its name does not leak into the next one.
    tap.feed(b"event: message_delta\n\ndata: {\"type\":\"ping\",\"usage\":{\"output_tokens\":7}}\n\n");
    assert_eq!(tap.events(), 3);
    assert_eq!(tap.usage().output_tokens, 5);
    // Blank lines alone dispatch nothing.
    tap.feed(b"\n\n\r\n\r\r\n");
    assert_eq!(tap.events(), 3);
    // The last event: line wins; the name is reset after dispatch.
    tap.feed(b"event: ping\nevent: message_delta\ndata: {\"usage\":{\"output_tokens\":8}}\n\n");
    assert_eq!(tap.usage().output_tokens, 8);
    tap.feed(b"data: {\"usage\":{\"output_tokens\":9}}\n\n");
    assert_eq!(tap.usage().output_tokens, 8);
    // An event: line after the data still names the event.
    tap.feed(b"data: {\"usage\":{\"output_tokens\":10}}\nevent: message_delta\n\n");
    assert_eq!(tap.usage().output_tokens, 10);
    // ...unless the data was skipped under an uninteresting name: then it is not half-parsed.
    tap.feed(b"event: ping\ndata: {\"usage\":{\"output_tokens\":11}}\nevent: message_delta\n\n");
    assert_eq!(
        tap.usage().output_tokens,
        11,
        "every event's data is read now: the last name wins"
    );
    assert_eq!(tap.events(), 7);
    // "data" alone is an empty data line: not JSON, so the stream is corrupt from there.
    tap.feed(b"event: message_stop\ndata\n\n");
    assert!(tap.corrupt());
}

#[test]
fn multi_line_data_is_joined_with_newlines() {
    let s = concat!(
        "event: message_start\n",
        r#"data: {"type":"message_start","message":{"id":"msg_multi","#,
        "\n",
        r#"data:   "model":"claude-opus-4-1","usage":"#,
        "\n",
        r#"data: {"input_tokens":10,"cache_creation_input_tokens":40,"output_tokens":1}}}"#,
        "\n\n",
        "event: message_delta\r\n",
        "data: {\"type\":\"message_delta\",\r\n",
        "data: \"usage\":{\"output_tokens\"\r",
        "data: :\r",
        "data: 12}}\r\n\r\n",
    );
    let expected = Snapshot {
        usage: Usage {
            input_tokens: 10,
            output_tokens: 12,
            cache_write_5m_tokens: 40,
            ..Usage::default()
        },
        model: Some("claude-opus-4-1".to_owned()),
        message_id: Some("msg_multi".to_owned()),
        start: true,
        stop: false,
        error_type: None,
        events: 2,
        first: true,
    };
    assert_any_chunking(s.as_bytes(), &expected);

    // Joined with "\n" exactly: a string broken over two data lines contains a raw newline,
    // which JSON forbids, so the event is skipped.
    let mut tap = SseTap::new();
    tap.feed(b"event: message_start\ndata: {\"message\":{\"model\":\"a\ndata: b\",\"usage\":{}}}\n\n");
    assert!(tap.saw_message_start());
    assert_eq!(tap.model(), None);
}

#[test]
fn utf8_split_inside_a_text_delta() {
    let s = concat!(
        "event: message_start\n",
        r#"data: {"type":"message_start","message":{"id":"msg_é🦀","model":"claude-é🦀","usage":{"input_tokens":3,"output_tokens":1}}}"#,
        "\n\n",
        "event: content_block_delta\n",
        r#"data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"é🦀é🦀"}}"#,
        "\n\n",
        "event: message_delta\n",
        r#"data: {"type":"message_delta","delta":{},"usage":{"output_tokens":4}}"#,
        "\n\n",
    );
    let expected = Snapshot {
        usage: Usage {
            input_tokens: 3,
            output_tokens: 4,
            ..Usage::default()
        },
        model: Some("claude-é🦀".to_owned()),
        message_id: Some("msg_é🦀".to_owned()),
        start: true,
        stop: false,
        error_type: None,
        events: 3,
        first: true,
    };
    // Every split point, including the middle of each multi-byte character.
    assert_any_chunking(s.as_bytes(), &expected);
    // Invalid UTF-8 inside a skipped event hurts nothing.
    let bad = s.replace("é🦀é🦀", "XX").into_bytes();
    let at = bad.windows(2).position(|w| w == b"XX").unwrap();
    let mut bad = bad;
    bad[at] = 0xFF;
    bad[at + 1] = 0xC3;
    assert_any_chunking(&bad, &expected);
}

#[test]
fn error_mid_stream() {
    let cut = STREAM.find("event: message_delta").unwrap();
    let s = format!(
        "{}event: error\ndata: {{\"type\":\"error\",\"error\":{{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}}}\n\n",
        &STREAM[..cut]
    );
    let mut expected = expected_full();
    expected.usage.output_tokens = 1;
    expected.stop = false;
    expected.error_type = Some("overloaded_error".to_owned());
    expected.events -= 1;
    assert_any_chunking(s.as_bytes(), &expected);

    // An error event whose data says nothing still records an error.
    let mut tap = SseTap::new();
    tap.feed(b"event: error\ndata: not json\n\n");
    assert_eq!(tap.error_type(), Some("api_error"));
    // A nameless error event is found by its type.
    let mut tap = SseTap::new();
    tap.feed(b"data: {\"type\":\"error\",\"error\":{\"type\":\"api_error\",\"message\":\"x\"}}\n\n");
    assert_eq!(tap.error_type(), Some("api_error"));
    assert!(!tap.saw_message_start());
}

#[test]
fn error_before_anything() {
    let mut tap = SseTap::new();
    assert!(!tap.first_event_complete());
    tap.feed(b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"rate_limit_error\",\"message\":\"x\"}}\n");
    assert!(!tap.first_event_complete(), "not complete before the blank line");
    tap.feed(b"\n");
    assert!(tap.first_event_complete());
    assert_eq!(tap.error_type(), Some("rate_limit_error"));
    assert_eq!(tap.usage(), Usage::default());
    assert_eq!(tap.model(), None);
}

#[test]
fn delta_with_input_fields_replaces_start() {
    let cut = STREAM.find("event: message_delta").unwrap();
    let s = format!(
        "{}event: message_delta\ndata: {}\n\n",
        &STREAM[..cut],
        r#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"input_tokens":30,"cache_creation_input_tokens":450,"cache_read_input_tokens":2100,"output_tokens":120,"server_tool_use":{"web_search_requests":2}}}"#
    );
    let mut expected = expected_full();
    expected.usage = Usage {
        input_tokens: 30,
        output_tokens: 120,
        cache_write_5m_tokens: 250, // the growth of the total is 5m; start's 1h kept
        cache_write_1h_tokens: 200,
        cache_read_tokens: 2100,
        web_search_requests: 2,
    };
    expected.stop = false;
    expected.events -= 1;
    assert_any_chunking(s.as_bytes(), &expected);
}

#[test]
fn several_deltas_are_cumulative_not_added() {
    let mut tap = SseTap::new();
    tap.feed(&STREAM.as_bytes()[..STREAM.find("event: message_stop").unwrap()]);
    tap.feed(b"event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":100}}\n\n");
    tap.feed(b"event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":150}}\n\n");
    assert_eq!(tap.usage().output_tokens, 150);
    assert_eq!(tap.usage().input_tokens, 25);
}

#[test]
fn missing_split_counts_as_5m() {
    let s = concat!(
        "event: message_start\n",
        r#"data: {"type":"message_start","message":{"id":"m","model":"claude-3-5-haiku-20241022","content":[],"usage":{"input_tokens":4,"cache_creation_input_tokens":1500,"cache_read_input_tokens":0,"output_tokens":1}}}"#,
        "\n\n",
    );
    let snap = whole(s.as_bytes());
    assert_eq!(snap.usage.cache_write_5m_tokens, 1500);
    assert_eq!(snap.usage.cache_write_1h_tokens, 0);
}

#[test]
fn nameless_events_are_classified_by_type() {
    let s = STREAM
        .lines()
        .filter(|l| !l.starts_with("event:"))
        .map(|l| format!("{l}\n"))
        .collect::<String>();
    assert_any_chunking(s.as_bytes(), &expected_full());
    // `type` not the first key: found by a full parse.
    let mut tap = SseTap::new();
    tap.feed(b"data: {\"message\":{\"model\":\"m\",\"usage\":{\"input_tokens\":2}},\"type\":\"message_start\"}\n\n");
    tap.feed(b"data: {\"usage\":{\"output_tokens\":3},\"type\":\"message_delta\"}\n\n");
    tap.feed(b"data: { \"type\" : \"message_stop\" }\n\n");
    assert_eq!(tap.model(), Some("m"));
    assert_eq!((tap.usage().input_tokens, tap.usage().output_tokens), (2, 3));
    assert!(tap.saw_message_stop());
    // JSON without a known type is counted and ignored; what is not JSON makes the stream corrupt.
    let mut tap = SseTap::new();
    tap.feed(b"data: [1,2]\n\ndata: {\"type\":\"mess\\u0061ge_stop\"}\n\n");
    assert_eq!((tap.events(), tap.corrupt(), tap.saw_message_stop()), (2, false, true));
    let mut tap = SseTap::new();
    tap.feed(b"data: [1,2]\n\ndata: hello\n\n");
    assert!(tap.corrupt());
}

#[test]
fn sniffing() {
    assert_eq!(sniff_type(br#"{"type":"ping"}"#), Some(&b"ping"[..]));
    assert_eq!(
        sniff_type(b" {\n \"type\" :\t\"message_delta\" , \"usage\":{}}"),
        Some(&b"message_delta"[..])
    );
    assert_eq!(sniff_type(br#"{"index":0,"type":"ping"}"#), None);
    assert_eq!(sniff_type(br#"{"type":"a\"b"}"#), None);
    assert_eq!(sniff_type(br#"{"type":"unterminated"#), None);
    assert_eq!(sniff_type(br#"{"type":5}"#), None);
    assert_eq!(sniff_type(b""), None);
}

#[test]
fn oversized_event_is_dropped_but_counted() {
    let big = "x".repeat(MAX_EVENT_BYTES + 10);
    let mut tap = SseTap::new();
    // A huge interesting event: its data is dropped, the stream goes on.
    tap.feed(b"event: message_start\ndata: {\"message\":{\"model\":\"");
    for piece in big.as_bytes().chunks(4096) {
        tap.feed(piece);
    }
    tap.feed(b"\",\"usage\":{\"input_tokens\":5}}}\n\n");
    assert_eq!(tap.events(), 1);
    assert!(tap.saw_message_start());
    assert_eq!(tap.model(), None);
    assert!(tap.line.capacity() <= MAX_EVENT_BYTES + 4096);
    // Many data lines adding up past the cap.
    tap.feed(b"event: message_delta\n");
    let line = format!("data: {}\n", "y".repeat(1000));
    for _ in 0..(MAX_EVENT_BYTES / 1000 + 2) {
        tap.feed(line.as_bytes());
    }
    assert!(tap.data.len() <= MAX_EVENT_BYTES);
    tap.feed(b"\n");
    assert_eq!(tap.events(), 2);
    // A huge uninteresting event, in one chunk and in pieces.
    let huge_delta = format!("event: content_block_delta\ndata: {{\"text\":\"{big}\"}}\n\n");
    tap.feed(huge_delta.as_bytes());
    for piece in huge_delta.as_bytes().chunks(1000) {
        tap.feed(piece);
    }
    assert_eq!(tap.events(), 4);
    // Buffers were released and later events parse normally.
    assert!(tap.line.capacity() <= RETAIN_CAPACITY);
    assert!(tap.data.capacity() <= RETAIN_CAPACITY);
    tap.feed(b"event: message_delta\ndata: {\"usage\":{\"output_tokens\":77}}\n\nevent: message_stop\ndata: {}\n\n");
    assert_eq!(tap.usage().output_tokens, 77);
    assert_eq!(tap.usage().input_tokens, 0);
    assert!(tap.saw_message_stop());
    assert_eq!(tap.events(), 6);
}

#[test]
fn garbage_data_marks_the_stream_corrupt_and_nothing_after_message_stop_counts() {
    let mut tap = SseTap::new();
    let good = "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"abc\"}}\n\n";
    tap.feed(good.as_bytes());
    assert_eq!((tap.events(), tap.corrupt()), (1, false));
    tap.feed(b"event: content_block_delta\ndata: {not json at all\n\n");
    assert!(tap.corrupt());
    assert_eq!(
        tap.complete_bytes(),
        good.len() as u64,
        "complete stays before the corrupt event"
    );
    tap.feed(good.as_bytes());
    assert_eq!(tap.complete_bytes(), good.len() as u64);

    let mut tap = SseTap::new();
    tap.feed(STREAM.as_bytes());
    assert!(tap.ended() && !tap.corrupt());
    let whole = tap.complete_bytes();
    tap.feed(good.as_bytes());
    tap.feed(b"<html>");
    assert_eq!(tap.complete_bytes(), whole, "nothing after message_stop");
    assert!(tap.first_event_named());
    let mut nameless = SseTap::new();
    nameless.feed(b"data: {\"type\":\"message_start\",\"message\":{}}\n\n");
    assert!(nameless.saw_message_start() && !nameless.first_event_named());
}

#[test]
fn incomplete_event_at_end_is_not_counted() {
    let s = &STREAM[..STREAM.len() - 1];
    let mut expected = expected_full();
    expected.stop = false;
    expected.events -= 1;
    assert_any_chunking(s.as_bytes(), &expected);
    assert_eq!(run(&[]), whole(b""));
    assert!(!whole(b"").first);
}

mod props {
    //! Property tests: on every split of a stream the tap agrees with a reference reading of the
    //! whole stream, and its event boundaries are real ones; arbitrary bytes never panic it.
    use super::*;
    use proptest::prelude::*;

    fn event(name: &str, data: &serde_json::Value, eol: &str) -> String {
        format!("event: {name}{eol}data: {data}{eol}{eol}")
    }

    fn stream(input: u64, output: u64, read: u64, deltas: usize, eol: &str) -> String {
        let mut s = event(
            "message_start",
            &serde_json::json!({"type": "message_start", "message": {"id": "m", "model": "claude-x",
                "usage": {"input_tokens": input, "cache_read_input_tokens": read, "output_tokens": 1}}}),
            eol,
        );
        s.push_str(&format!(": a comment{eol}{eol}"));
        for i in 0..deltas {
            s.push_str(&event(
                "content_block_delta",
                &serde_json::json!({"type": "content_block_delta", "index": 0,
                    "delta": {"type": "text_delta", "text": format!("piece {i} with \"quotes\" and\nnewlines")}}),
                eol,
            ));
        }
        s.push_str(&event(
            "message_delta",
            &serde_json::json!({"type": "message_delta", "usage": {"output_tokens": output}}),
            eol,
        ));
        s.push_str(&event(
            "message_stop",
            &serde_json::json!({"type": "message_stop"}),
            eol,
        ));
        s
    }

    /// The reference: where each block (event or comment) ends, read off the whole text.
    fn boundaries(s: &str, eol: &str) -> Vec<u64> {
        let sep = format!("{eol}{eol}");
        let mut out = Vec::new();
        let mut from = 0;
        while let Some(i) = s[from..].find(&sep) {
            from += i + sep.len();
            out.push(from as u64);
        }
        out
    }

    proptest! {
        #[test]
        fn every_split_agrees_with_the_reference(
            input in 0u64..10_000_000,
            output in 0u64..200_000,
            read in 0u64..1_000_000,
            deltas in 0usize..12,
            crlf in any::<bool>(),
            cuts in proptest::collection::vec(0usize..10_000, 0..16),
        ) {
            let eol = if crlf { "\r\n" } else { "\n" };
            let s = stream(input, output, read, deltas, eol);
            let bytes = s.as_bytes();
            let ends = boundaries(&s, eol);
            let mut points: Vec<usize> = cuts.into_iter().map(|c| c % (bytes.len() + 1)).collect();
            points.push(bytes.len());
            points.sort_unstable();
            let mut tap = SseTap::new();
            let (mut prev, mut last) = (0usize, 0u64);
            for p in points {
                tap.feed(&bytes[prev..p]);
                prev = p;
                let c = tap.complete_bytes();
                prop_assert!(c >= last, "complete_bytes went back");
                // A boundary, or (CRLF) one byte before it, when the chunk ended between CR and LF.
                prop_assert!(c == 0 || ends.contains(&c) || (crlf && ends.contains(&(c + 1))), "{} is not a boundary", c);
                prop_assert!(c <= tap.fed());
                last = c;
            }
            prop_assert_eq!(tap.complete_bytes(), bytes.len() as u64);
            let u = tap.usage();
            prop_assert_eq!((u.input_tokens, u.output_tokens, u.cache_read_tokens), (input, output, read));
            prop_assert!(tap.saw_message_start() && tap.saw_message_stop());
            prop_assert!(!tap.usage_unparsed());
            prop_assert_eq!(tap.events(), deltas as u64 + 3);
            prop_assert_eq!(tap.model(), Some("claude-x"));
        }

        #[test]
        fn arbitrary_bytes_never_panic(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..400), 0..24)) {
            let mut tap = SseTap::new();
            for c in &chunks {
                tap.feed(c);
                prop_assert!(tap.complete_bytes() <= tap.fed());
            }
            let _ = (tap.usage(), tap.error_type(), tap.model());
        }
    }
}

/// The typed reading of `message_start` and `message_delta` against the `Value` reading it
/// replaced (which still reads what the typed one declines): same state whenever it accepts.
mod typed {
    use super::*;
    use proptest::prelude::*;

    /// What a tap holds after one event, beyond [`Snapshot`].
    fn state(t: &SseTap) -> (Usage, Option<String>, Option<String>, Option<String>, bool, bool, bool) {
        (
            t.usage(),
            t.model().map(str::to_owned),
            t.message_id().map(str::to_owned),
            t.stop_reason().map(str::to_owned),
            t.counts_unreadable(),
            t.usage_unparsed(),
            t.saw_message_start(),
        )
    }

    /// A JSON value of any shape the API might (mis)send where a count, a string or an object belongs.
    fn scalar() -> impl Strategy<Value = String> {
        prop_oneof![
            (0u64..u64::MAX).prop_map(|n| n.to_string()),
            Just("0".to_owned()),
            Just("-3".to_owned()),
            Just("2.5".to_owned()),
            Just("2.0".to_owned()),
            Just("1e30".to_owned()),
            Just("18446744073709551615".to_owned()),
            Just("18446744073709551616".to_owned()),
            Just("null".to_owned()),
            Just("true".to_owned()),
            Just(r#""end_turn""#.to_owned()),
            Just(r#""cla\"ude""#.to_owned()),
            Just(r#""\u00e9t\u00e9""#.to_owned()),
            Just("[1,{\"a\":2}]".to_owned()),
            Just("{}".to_owned()),
            Just("{\"input_tokens\":1}".to_owned()),
        ]
    }

    /// A JSON object whose keys come from `keys` (repeats allowed) with values from `value`.
    fn object(keys: &'static [&'static str], value: BoxedStrategy<String>) -> BoxedStrategy<String> {
        proptest::collection::vec((proptest::sample::select(keys), value), 0..6)
            .prop_map(|fields| {
                let inner: Vec<String> = fields.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
                format!("{{{}}}", inner.join(","))
            })
            .boxed()
    }

    fn usage() -> BoxedStrategy<String> {
        let split = object(
            &["ephemeral_5m_input_tokens", "ephemeral_1h_input_tokens", "other"],
            scalar().boxed(),
        );
        let tool = object(&["web_search_requests", "other"], scalar().boxed());
        let value = prop_oneof![4 => scalar(), 1 => split, 1 => tool].boxed();
        let usage = object(
            &[
                "input_tokens",
                "output_tokens",
                "cache_read_input_tokens",
                "cache_creation_input_tokens",
                "cache_creation",
                "server_tool_use",
                "service_tier",
            ],
            value,
        );
        prop_oneof![6 => usage, 1 => scalar()].boxed()
    }

    fn start() -> BoxedStrategy<String> {
        let field = prop_oneof![3 => usage(), 1 => scalar()].boxed();
        let message = object(&["usage", "model", "id", "type", "content"], field);
        let top = prop_oneof![6 => message, 1 => scalar()].boxed();
        object(&["type", "message", "message", "index"], top)
    }

    fn delta() -> BoxedStrategy<String> {
        let d = object(&["stop_reason", "stop_sequence"], scalar().boxed());
        let field = prop_oneof![2 => usage(), 1 => d, 1 => scalar()].boxed();
        object(&["type", "delta", "usage", "usage"], field)
    }

    fn check(kind: Kind, data: &str) -> Result<(), TestCaseError> {
        // A tap that has seen a start, so that a delta merges into something.
        let seeded = || {
            let mut t = SseTap::new();
            t.handle_value(
                Kind::MessageStart,
                Some(&serde_json::json!({"message": {"usage": {
                    "input_tokens": 5, "cache_creation_input_tokens": 30,
                    "cache_creation": {"ephemeral_1h_input_tokens": 20}}}})),
            );
            t
        };
        let mut typed = seeded();
        if typed.handle_typed(kind, data.as_bytes()) {
            let mut reference = seeded();
            let value: Value = serde_json::from_str(data).unwrap();
            reference.handle_value(kind, Some(&value));
            prop_assert_eq!(state(&typed), state(&reference), "{}", data);
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn message_start_reads_as_the_value_reading(data in start()) {
            check(Kind::MessageStart, &data)?;
        }

        #[test]
        fn message_delta_reads_as_the_value_reading(data in delta()) {
            check(Kind::MessageDelta, &data)?;
        }
    }

    #[test]
    fn the_api_s_own_events_are_read_typed() {
        let start = r#"{"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":12,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"cache_creation":{"ephemeral_5m_input_tokens":0,"ephemeral_1h_input_tokens":0},"output_tokens":1,"service_tier":"standard"}}}"#;
        let delta = r#"{"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":15}}"#;
        let mut t = SseTap::new();
        assert!(t.handle_typed(Kind::MessageStart, start.as_bytes()));
        assert!(t.handle_typed(Kind::MessageDelta, delta.as_bytes()));
        assert_eq!((t.usage().input_tokens, t.usage().output_tokens), (12, 15));
        assert_eq!(
            (t.model(), t.message_id(), t.stop_reason()),
            (Some("claude-sonnet-4-5"), Some("msg_1"), Some("end_turn"))
        );
        // What the typed reading declines is left to the Value reading, untouched.
        let mut t = SseTap::new();
        assert!(!t.handle_typed(Kind::MessageStart, br#"{"message":null}"#));
        assert!(!t.handle_typed(Kind::MessageStart, br#"{"message":{"model":5}}"#));
        assert!(!t.handle_typed(
            Kind::MessageDelta,
            br#"{"usage":{"output_tokens":1,"output_tokens":2}}"#
        ));
        assert!(!t.handle_typed(Kind::MessageDelta, br#"{"usage":[1,2,3,4,5,6,7]}"#));
        assert!(!t.saw_message_start());
    }
}
