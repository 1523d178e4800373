#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use super::*;
use serde_json::json;

/// A base64 JPEG that is only a header (SOI, JFIF APP0, SOF0 of `w`×`h`, EOI): all the estimator reads.
fn jpeg_b64(w: u16, h: u16) -> String {
    let mut b = vec![0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x10];
    b.extend_from_slice(b"JFIF\0");
    b.extend_from_slice(&[1, 1, 0, 0, 1, 0, 1, 0, 0]);
    b.extend_from_slice(&[0xFF, 0xC0, 0x00, 0x11, 0x08]);
    b.extend_from_slice(&h.to_be_bytes());
    b.extend_from_slice(&w.to_be_bytes());
    b.extend_from_slice(&[0x03, 0x01, 0x22, 0x00, 0x02, 0x11, 0x01, 0x03, 0x11, 0x01, 0xFF, 0xD9]);
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn png_b64(w: u32, h: u32) -> String {
    let mut b = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
    b.extend_from_slice(&w.to_be_bytes());
    b.extend_from_slice(&h.to_be_bytes());
    b.extend_from_slice(&[8, 6, 0, 0, 0, 0, 0, 0, 0]);
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn gif_b64(w: u16, h: u16) -> String {
    let mut b = b"GIF89a".to_vec();
    b.extend_from_slice(&w.to_le_bytes());
    b.extend_from_slice(&h.to_le_bytes());
    b.extend_from_slice(&[0, 0, 0]);
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn webp_b64(w: u32, h: u32) -> String {
    // VP8X (extended) header: 24-bit width-1 and height-1.
    let mut chunk = vec![0u8; 10];
    chunk[4..7].copy_from_slice(&(w - 1).to_le_bytes()[..3]);
    chunk[7..10].copy_from_slice(&(h - 1).to_le_bytes()[..3]);
    let mut b = b"RIFF".to_vec();
    b.extend_from_slice(&(4 + 8 + chunk.len() as u32).to_le_bytes());
    b.extend_from_slice(b"WEBPVP8X");
    b.extend_from_slice(&(chunk.len() as u32).to_le_bytes());
    b.extend_from_slice(&chunk);
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn image(media_type: &str, data: String) -> Value {
    json!({"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}})
}

/// The mock upstream's count (mock-upstream/src/lib.rs, `expected_usage`): floor(bytes of the compact JSON of
/// `messages` / 4), at least 1; system and tools are not counted. A naive formula, so these rows weigh less
/// than the documentation's.
fn mock_count(body: &Value) -> u64 {
    (serde_json::to_vec(&body["messages"]).unwrap().len() as u64 / 4).max(1)
}

struct Row {
    name: &'static str,
    source: &'static str,
    body: Value,
    reference: u64,
    /// Whether the ≤10% target is asserted for this row (else it is reported, with the reason in `note`).
    asserted: bool,
    note: &'static str,
}

/// Every example of Anthropic's token-counting guide (build-with-claude/token-counting) with its published
/// count, quoted from the guide.
fn doc_rows() -> Vec<Row> {
    vec![
        Row {
            name: "basic: system + one user message",
            source: "docs",
            // client.messages.count_tokens(model="claude-sonnet-4-5", system="You are a scientist",
            //   messages=[{"role": "user", "content": "Hello, Claude"}])  →  { "input_tokens": 14 }
            body: json!({
                "model": "claude-sonnet-4-5",
                "system": "You are a scientist",
                "messages": [{"role": "user", "content": "Hello, Claude"}],
            }),
            reference: 14,
            asserted: true,
            note: "",
        },
        Row {
            name: "tools: get_weather",
            source: "docs",
            //  →  { "input_tokens": 403 }
            body: json!({
                "model": "claude-sonnet-4-5",
                "tools": [{
                    "name": "get_weather",
                    "description": "Get the current weather in a given location",
                    "input_schema": {
                        "type": "object",
                        "properties": {
                            "location": {
                                "type": "string",
                                "description": "The city and state, e.g. San Francisco, CA",
                            }
                        },
                        "required": ["location"],
                    },
                }],
                "messages": [{"role": "user", "content": "What's the weather like in San Francisco?"}],
            }),
            reference: 403,
            asserted: true,
            note: "",
        },
        Row {
            name: "image: Camponotus_flavomarginatus_ant.jpg + text",
            source: "docs",
            // The guide sends the Wikimedia photo as base64 with "Describe this image"  →  { "input_tokens": 1551 }.
            // Its pixel size is not in the guide; any photo past the 1568 px / 1568-token limits counts the
            // same, so a 2000×1500 header stands in for it (assumption: the original is larger than the limits).
            body: json!({
                "model": "claude-sonnet-4-5",
                "messages": [{"role": "user", "content": [
                    image("image/jpeg", jpeg_b64(2000, 1500)),
                    {"type": "text", "text": "Describe this image"},
                ]}],
            }),
            reference: 1551,
            asserted: true,
            note: "image size assumed over the limits",
        },
        Row {
            name: "thinking: earlier turn's thinking block",
            source: "docs",
            //  →  { "input_tokens": 88 }
            body: json!({
                "model": "claude-sonnet-4-5",
                "thinking": {"type": "enabled", "budget_tokens": 16000},
                "messages": [
                    {"role": "user", "content": "Are there an infinite number of prime numbers such that n mod 4 == 3?"},
                    {"role": "assistant", "content": [
                        {
                            "type": "thinking",
                            "thinking": "This is a nice number theory question. Lets think about it step by step...",
                            "signature": "EuYBCkQYAiJAgCs1le6/Pol5Z4/JMomVOouGrWdhYNsH3ukzUECbB6iWrSQtsQuRHJID6lWV...",
                        },
                        {"type": "text", "text": "Yes, there are infinitely many prime numbers p such that p mod 4 = 3..."},
                    ]},
                    {"role": "user", "content": "Can you write a formal proof?"},
                ],
            }),
            reference: 88,
            asserted: true,
            note: "",
        },
        Row {
            name: "pdf: document.pdf + text",
            source: "docs",
            // The guide sends "document.pdf" (its own file, not published) with "Please summarize this
            // document."  →  { "input_tokens": 2188 }. Not measurable: the row uses a one-page PDF and is not asserted.
            body: json!({
                "model": "claude-sonnet-4-5",
                "messages": [{"role": "user", "content": [
                    {"type": "document", "source": {
                        "type": "base64",
                        "media_type": "application/pdf",
                        "data": base64::engine::general_purpose::STANDARD.encode(one_page_pdf()),
                    }},
                    {"type": "text", "text": "Please summarize this document."},
                ]}],
            }),
            reference: 2188,
            asserted: false,
            note: "the guide's PDF is not published; one page assumed",
        },
    ]
}

fn conversation() -> Value {
    json!([
        {"role": "user", "content": "I am planning a trip to Lisbon in the spring. What neighbourhoods would you recommend for a first visit, and how many days should I plan to see the main sights without rushing?"},
        {"role": "assistant", "content": "For a first visit, stay in Baixa or Chiado: both are central, walkable and close to the river. Alfama is charming but hilly, and Príncipe Real is quieter with good restaurants. Four days lets you see the castle, Belém, the tram 28 route and a day trip to Sintra without rushing."},
        {"role": "user", "content": "Thanks. Is Sintra worth a whole day, or can it be combined with Cascais?"},
    ])
}

fn prose() -> String {
    "The relay forwards each request to an upstream account chosen by priority, health and recent latency. \
     When an account is rate limited it is set aside until its limit resets, and the request goes to the \
     next one; when every account is busy, the request waits a short while for one to free up before it \
     is answered with an error that says when to retry. "
        .repeat(6)
}

fn code() -> String {
    r#"fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 2 {
        eprintln!("usage: {} FILE", args[0]);
        std::process::exit(2);
    }
    let text = std::fs::read_to_string(&args[1]).unwrap_or_default();
    let words = text.split_whitespace().filter(|w| !w.is_empty()).count();
    println!("{words} words in {}", args[1]);
}
"#
    .repeat(3)
}

/// Requests whose count the mock upstream reports (text only: the mock counts the JSON of `messages`).
fn mock_rows() -> Vec<Row> {
    let rows: Vec<(&'static str, Value, bool, &'static str)> = vec![
        (
            "short user message (e2e's count_tokens body)",
            json!({"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "count me"}]}),
            true,
            "",
        ),
        (
            "three-turn conversation",
            json!({"model": "claude-sonnet-4-5", "messages": conversation()}),
            true,
            "",
        ),
        (
            "long prose message",
            json!({"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": prose()}]}),
            true,
            "",
        ),
        (
            "code in a message",
            json!({"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": code()}]}),
            false,
            "code has fewer than the mock's 4 bytes a token",
        ),
        (
            "conversation + one tool",
            json!({
                "model": "claude-sonnet-4-5",
                "tools": [{"name": "get_weather", "description": "Get the weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}],
                "messages": conversation(),
            }),
            false,
            "the mock ignores tools and the tool-use system prompt",
        ),
        (
            "small image + text",
            json!({"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": [
                image("image/png", png_b64(200, 200)),
                {"type": "text", "text": "What is in this picture?"},
            ]}]}),
            false,
            "the mock counts the base64 as text, not the 200x200 image",
        ),
    ];
    rows.into_iter()
        .map(|(name, body, asserted, note)| Row {
            name,
            source: "mock",
            reference: mock_count(&body),
            body,
            asserted,
            note,
        })
        .collect()
}

fn one_page_pdf() -> Vec<u8> {
    b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 2 0 R >> endobj\n\
      2 0 obj << /Type /Pages /Kids [3 0 R] /Count 1 >> endobj\n\
      3 0 obj << /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
        .to_vec()
}

/// The error table (printed with `--nocapture`, kept in docs/token-estimate.md): every row's estimate against
/// its reference count; the asserted rows must be within 10% (or 1 token: a count under 10 cannot be closer
/// than one token, which is already more than 10% of it).
#[test]
fn error_table_within_target() {
    let mut failures = Vec::new();
    println!("| source | example | reference | estimate | error | asserted |");
    println!("|---|---|---:|---:|---:|---|");
    for row in doc_rows().into_iter().chain(mock_rows()) {
        let est = estimate_value(&row.body).unwrap();
        let err = (est as f64 - row.reference as f64) / row.reference as f64 * 100.0;
        println!(
            "| {} | {} | {} | {} | {:+.1}% | {} |",
            row.source,
            row.name,
            row.reference,
            est,
            err,
            if row.asserted {
                "yes".to_string()
            } else {
                format!("no: {}", row.note)
            }
        );
        if row.asserted && err.abs() > 10.0 && est.abs_diff(row.reference) > 1 {
            failures.push(format!("{}: {est} vs {} ({err:+.1}%)", row.name, row.reference));
        }
    }
    assert!(failures.is_empty(), "over the 10% target: {failures:?}");
}

#[test]
fn image_sizes_are_read_from_every_supported_format() {
    let p = profile("claude-sonnet-4-5");
    for data in [jpeg_b64(1000, 1000), png_b64(1000, 1000), webp_b64(1000, 1000)] {
        let src = json!({"type": "base64", "data": data});
        assert_eq!(image_tokens(&p, Some(&src)), 36 * 36, "ceil(1000/28)² patches");
    }
    let src = json!({"type": "base64", "data": gif_b64(200, 200)});
    assert_eq!(image_tokens(&p, Some(&src)), 8 * 8);
    // Unreadable or not base64: the most one image can cost.
    for src in [
        json!({"type": "url", "url": "https://example.com/a.png"}),
        json!({"type": "base64", "data": "bm90IGFuIGltYWdl"}),
        json!({"type": "file", "file_id": "file_1"}),
    ] {
        assert_eq!(image_tokens(&p, Some(&src)), 1568);
    }
    // Whitespace-wrapped base64 (as `base64` prints it) and URL-safe base64 decode too.
    let wrapped: String = png_b64(300, 100)
        .chars()
        .collect::<Vec<_>>()
        .chunks(10)
        .map(|c| c.iter().collect::<String>() + "\n")
        .collect();
    let src = json!({"type": "base64", "data": wrapped});
    assert_eq!(image_tokens(&p, Some(&src)), 11 * 4);
}

#[test]
fn large_images_are_scaled_to_the_model_limits() {
    let old = profile("claude-sonnet-4-5-20250929");
    let new = profile("claude-opus-4-7");
    // Within limits: one token per patch.
    assert_eq!(image_tokens_for(&old, 200, 200), 64);
    assert_eq!(image_tokens_for(&old, 1092, 1092), 39 * 39);
    // Past the long edge or the token budget: scaled down, never over the budget, never far under it.
    for (w, h) in [(4000, 3000), (8000, 8000), (1568, 800), (3000, 100), (1920, 1080)] {
        let t = image_tokens_for(&old, w, h);
        assert!(t <= 1568, "{w}x{h}: {t}");
        assert!(t >= 1568 * 85 / 100 || w * h < 1568 * 784, "{w}x{h}: {t}");
    }
    assert!(image_tokens_for(&new, 4000, 3000) <= 4784);
    assert!(image_tokens_for(&new, 4000, 3000) > 4000);
    assert_eq!(image_tokens_for(&new, 1920, 1080), 69 * 39);
}

#[test]
fn pdf_pages_are_counted_plain_and_in_object_streams() {
    assert_eq!(pdf_pages(&one_page_pdf()), 1);
    let three =
        b"%PDF-1.4\n<< /Type /Pages /Count 3 >>\n<</Type/Page>> <</Type /Page /X 1>>\n<< /Type\n/Page >>".to_vec();
    assert_eq!(pdf_pages(&three), 3);
    // PDF 1.5: the page objects are inside a deflated object stream.
    let objects = b"<< /Type /Page /Parent 2 0 R >> << /Type /Page /Parent 2 0 R >> << /Type /Pages /Count 2 >>";
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut z, objects).unwrap();
    let mut pdf = b"%PDF-1.5\n5 0 obj << /Type /ObjStm /Filter /FlateDecode >>\nstream\n".to_vec();
    pdf.extend_from_slice(&z.finish().unwrap());
    pdf.extend_from_slice(b"\nendstream\nendobj\n%%EOF");
    assert_eq!(pdf_pages(&pdf), 2);
    // Not a PDF at all: one page.
    assert_eq!(pdf_pages(b"hello"), 1);
    let doc = |pages: usize| {
        let mut pdf = b"%PDF-1.4\n".to_vec();
        for _ in 0..pages {
            pdf.extend_from_slice(b"<< /Type /Page >>\n");
        }
        json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "document", "source": {
            "type": "base64", "media_type": "application/pdf",
            "data": base64::engine::general_purpose::STANDARD.encode(pdf)}}]}]})
    };
    let one = estimate_value(&doc(1)).unwrap();
    let ten = estimate_value(&doc(10)).unwrap();
    assert_eq!(ten - one, 9 * PDF_PAGE_TOKENS as u64);
}

#[test]
fn model_generations() {
    assert_eq!(version("claude-sonnet-4-5-20250929"), Some((4, 5)));
    assert_eq!(version("claude-opus-4-20250514"), Some((4, 0)));
    assert_eq!(version("claude-3-5-sonnet-20241022"), Some((3, 5)));
    assert_eq!(version("claude-opus-4-7"), Some((4, 7)));
    assert_eq!(version("anthropic.claude-haiku-4-5@20251001"), Some((4, 5)));
    assert_eq!(version("gpt-none"), None);
    assert_eq!(profile("claude-sonnet-4-5").text_scale, 1.0);
    assert_eq!(profile("claude-opus-4-7").text_scale, NEW_TOKENIZER_SCALE);
    assert_eq!(profile("claude-opus-5").text_scale, NEW_TOKENIZER_SCALE);
    assert_eq!(profile("claude-fable-5-1").text_scale, NEW_TOKENIZER_SCALE);
    assert_eq!(profile("some-compatible-model").text_scale, 1.0);
    // The same text counts about 30% more on the newer tokenizer.
    let body = |model: &str| json!({"model": model, "messages": [{"role": "user", "content": prose()}]});
    let old = estimate_value(&body("claude-sonnet-4-5")).unwrap() as f64;
    let new = estimate_value(&body("claude-opus-4-7")).unwrap() as f64;
    assert!((new / old - 1.3).abs() < 0.02, "{old} → {new}");
}

#[test]
fn thinking_counts_only_in_the_current_assistant_turn() {
    let thinking = "Let me reason about this carefully, one step after the other, before answering.".repeat(5);
    let turn = json!({"role": "assistant", "content": [
        {"type": "thinking", "thinking": thinking, "signature": "sig"},
        {"type": "text", "text": "Partial answer"},
    ]});
    let earlier = json!({"model": "m", "messages": [{"role": "user", "content": "q"}, turn, {"role": "user", "content": "more"}]});
    let current = json!({"model": "m", "messages": [{"role": "user", "content": "q"}, turn]});
    let e = estimate_value(&earlier).unwrap();
    let c = estimate_value(&current).unwrap();
    // The current turn carries the thinking (~75 tokens) but lacks the last user message (~4).
    assert!(c > e + 60, "earlier {e}, current {c}");
}

#[test]
fn tool_blocks_and_tool_choice_count() {
    let base = json!({"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "hi"}]});
    let n = |v: &Value| estimate_value(v).unwrap() as i64;
    let mut with_tool = base.clone();
    with_tool["tools"] = json!([{"name": "t", "input_schema": {"type": "object"}}]);
    let mut any = with_tool.clone();
    any["tool_choice"] = json!({"type": "any"});
    assert!((n(&with_tool) - n(&base) - 346).abs() < 10);
    assert_eq!(n(&with_tool) - n(&any), 346 - 313);
    // Anthropic-defined tools have their documented size.
    let mut bash = base.clone();
    bash["tools"] = json!([{"type": "bash_20250124", "name": "bash"}]);
    assert_eq!(n(&bash) - n(&base), 346 + 245);
    // tool_use input and tool_result content count.
    let turns = json!([
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "San Francisco, CA", "units": "celsius"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "18 degrees and foggy, as usual for the season"}]}]},
    ]);
    let with_results = json!({"model": "claude-sonnet-4-5", "messages": turns});
    assert!(n(&with_results) > n(&base) + 40, "{}", n(&with_results));
    // System as blocks equals system as a string.
    let s1 = json!({"model": "m", "system": "Be brief and precise in every answer.", "messages": [{"role": "user", "content": "hi"}]});
    let s2 = json!({"model": "m", "system": [{"type": "text", "text": "Be brief and precise in every answer.", "cache_control": {"type": "ephemeral"}}], "messages": [{"role": "user", "content": "hi"}]});
    assert_eq!(n(&s1), n(&s2));
}

#[test]
fn large_text_is_sampled_close_to_exact() {
    let big = prose().repeat(200); // ~430 KB: sampled
    let exact = tokenizer().unwrap().encode_ordinary(&big).len() as f64;
    let mut c = Counter::new();
    let sampled = c.bpe(&big);
    assert!((sampled / exact - 1.0).abs() < 0.05, "{sampled} vs {exact}");
    // Past the per-request budget, text counts at the ratio seen so far.
    let mut c = Counter::new();
    let chunk = prose().repeat(20); // ~43 KB: exact
    let mut total = 0.0;
    for _ in 0..40 {
        total += c.bpe(&chunk);
    }
    let exact_one = tokenizer().unwrap().encode_ordinary(&chunk).len() as f64;
    assert!((total / (40.0 * exact_one) - 1.0).abs() < 0.01);
    assert!(c.exact_bytes <= EXACT_TEXT_BUDGET + chunk.len());
}

#[test]
fn not_a_messages_request_is_invalid() {
    assert!(estimate(b"{not json").unwrap_err().0.contains("not valid JSON"));
    assert_eq!(
        estimate(b"[]").unwrap_err(),
        Invalid("request body must be a JSON object".into())
    );
    assert_eq!(
        estimate(br#"{"model":"m"}"#).unwrap_err(),
        Invalid("messages: Field required".into())
    );
    assert!(estimate(br#"{"model":"m","messages":{}}"#).is_err());
    assert!(estimate(br#"{"model":"m","messages":[{"role":"user"}]}"#).is_err());
    // Anything else in a well-formed request is counted, not refused.
    let odd = json!({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "web_search_tool_result", "tool_use_id": "x", "content": [{"type": "web_search_result", "title": "A page", "url": "https://example.com"}]},
        {"type": "search_result", "source": "https://example.com", "title": "T", "content": [{"type": "text", "text": "found text"}]},
        {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "plain document text"}},
        {"type": "document", "source": {"type": "url", "url": "https://example.com/a.pdf"}},
        {"type": "redacted_thinking", "data": "abcd"},
        "a bare string",
        42,
    ]}]});
    assert!(estimate_value(&odd).unwrap() > PDF_PAGE_TOKENS as u64);
    assert_eq!(estimate(br#"{"model":"m","messages":[]}"#).unwrap(), PER_REQUEST as u64);
}

mod fallback {
    use crate::errors::{full, ApiError};
    use crate::proxy::fallback::answer_or_estimate as estimate_unanswered;
    use bytes::Bytes;
    use http::{Response, StatusCode};

    fn upstream(status: u16, body: &str) -> Result<Response<crate::errors::Body>, ApiError> {
        let mut r = Response::new(full(body.to_string()));
        *r.status_mut() = StatusCode::from_u16(status).unwrap();
        Ok(r)
    }

    const BODY: &str = r#"{"model":"claude-sonnet-4-5","messages":[{"role":"user","content":"Hello, Claude"}]}"#;

    async fn run(out: Result<Response<crate::errors::Body>, ApiError>, body: &str) -> (u16, Option<String>, String) {
        let r = match estimate_unanswered(out, &Bytes::from(body.to_string()), "req_1").await {
            Ok(r) => r,
            Err(e) => e.into_response("req_1"),
        };
        let status = r.status().as_u16();
        let mark = r
            .headers()
            .get("x-relay-estimate")
            .map(|v| v.to_str().unwrap().to_string());
        let text = String::from_utf8(crate::proxy::body_bytes(r.into_body()).await.unwrap().to_vec()).unwrap();
        (status, mark, text)
    }

    #[tokio::test]
    async fn what_is_replaced_and_what_is_passed_on() {
        // The upstream's own count: as it is.
        assert_eq!(
            run(upstream(200, r#"{"input_tokens":7}"#), BODY).await,
            (200, None, r#"{"input_tokens":7}"#.into())
        );
        // Errors about the request itself: as they are.
        let bad = r#"{"type":"error","error":{"type":"invalid_request_error","message":"messages: Field required"}}"#;
        assert_eq!(run(upstream(400, bad), BODY).await, (400, None, bad.into()));
        assert_eq!(run(upstream(413, "{}"), BODY).await.0, 413);
        let unknown = r#"{"type":"error","error":{"type":"not_found_error","message":"model: claude-nope"}}"#;
        assert_eq!(run(upstream(404, unknown), BODY).await, (404, None, unknown.into()));
        assert_eq!(run(Err(ApiError::invalid_request("x")), BODY).await.0, 400);
        // No account could answer: the estimate, marked.
        let missing = r#"{"type":"error","error":{"type":"not_found_error","message":"Not found: POST /v1/messages/count_tokens"}}"#;
        for out in [
            upstream(404, missing),
            upstream(404, "<html>nope</html>"),
            upstream(405, ""),
            upstream(429, "{}"),
            upstream(529, "{}"),
            upstream(500, "{}"),
            upstream(401, "{}"),
            Err(ApiError::overloaded(
                "no upstream account is available for this key right now",
                5,
            )),
        ] {
            let (status, mark, text) = run(out, BODY).await;
            assert_eq!((status, mark.as_deref()), (200, Some("true")), "{text}");
            let n = serde_json::from_str::<serde_json::Value>(&text).unwrap()["input_tokens"]
                .as_u64()
                .unwrap();
            assert!((5..=20).contains(&n), "{n}");
        }
        // A body that is no Messages request: Anthropic's error for it, not an estimate.
        let (status, mark, text) = run(upstream(429, "{}"), r#"{"model":"m"}"#).await;
        assert_eq!((status, mark), (400, None));
        assert!(
            text.contains("invalid_request_error") && text.contains("messages: Field required"),
            "{text}"
        );
    }
}

#[test]
#[ignore = "measures memory; run by hand"]
fn tokenizer_footprint() {
    let rss = || {
        let s = std::fs::read_to_string("/proc/self/statm").unwrap();
        s.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 4096 / (1 << 20)
    };
    let before = rss();
    let t = std::time::Instant::now();
    tokenizer().unwrap();
    println!("o200k: {:?}, +{} MiB", t.elapsed(), rss() - before);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

    /// Whatever a well-formed request carries (any text, any bytes as an image or a PDF, any image size), the
    /// estimate is an answer, never a panic.
    #[test]
    fn never_panics(text in "\\PC{0,300}", data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600), w in 1u32..100_000, h in 1u32..100_000) {
        let b64 = base64::engine::general_purpose::STANDARD.encode(&data);
        let mut pdf = b"%PDF-1.5\nstream\n".to_vec();
        pdf.extend_from_slice(&data);
        let body = json!({"model": "claude-opus-4-7", "system": text, "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": text},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": b64}},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png_b64(w, h)}},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": text}},
                {"type": "document", "source": {"type": "base64", "media_type": "application/pdf",
                    "data": base64::engine::general_purpose::STANDARD.encode(&pdf)}},
            ]},
            {"role": "assistant", "content": [{"type": "thinking", "thinking": text}]},
        ]});
        let n = estimate_value(&body).unwrap();
        proptest::prop_assert!(n >= 2 * PDF_PAGE_TOKENS as u64);
        proptest::prop_assert!(image_tokens_for(&profile("claude-sonnet-4-5"), w as u64, h as u64) <= 1568);
    }
}

#[test]
fn a_body_of_very_many_blocks_is_estimated_from_its_size_without_being_parsed() {
    let block = r#"{"type":"text","text":"hi"},"#;
    let n = MAX_STRUCTURES + 10;
    let mut body = String::from(r#"{"model":"claude-sonnet-4-5","messages":[{"role":"user","content":["#);
    body.push_str(&block.repeat(n));
    body.pop();
    body.push_str("]}]}");
    let est = estimate(body.as_bytes()).unwrap();
    assert_eq!(est, (body.len() as f64 / 4.0).ceil() as u64);
    // Still refused when it is not JSON.
    let broken = &body[..body.len() - 3];
    assert!(estimate(broken.as_bytes()).is_err());
}
