//! What the mock answers to a Messages request: the content blocks, the stop reason and the usage, all derived
//! deterministically from the request body and the configuration. The streaming and non-streaming renderings
//! and [`crate::expected_usage`] share one [`Plan`], so the numbers always agree.

use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

/// Tokens of cache creation charged per `cache_control` mark in the request (see [`crate::expected_usage`]).
pub const CACHE_WRITE_TOKENS_PER_MARK: u64 = 1024;

/// Token usage of one answer, as the mock reports it.
///
/// `cache_creation_input_tokens == cache_5m + cache_1h`; `cache_5m` and `cache_1h` are reported on the wire as
/// `usage.cache_creation.ephemeral_5m_input_tokens` and `usage.cache_creation.ephemeral_1h_input_tokens`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_creation_input_tokens: u64,
    pub cache_5m: u64,
    pub cache_1h: u64,
    pub cache_read_input_tokens: u64,
}

/// The knobs of [`crate::MockConfig`] that shape an answer's content.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shape {
    pub text_events: usize,
    pub event_bytes: usize,
    pub thinking_events: usize,
    pub tool_json_pieces: usize,
    pub ping_every: usize,
}

#[derive(Debug, Clone)]
pub(crate) enum Block {
    Thinking {
        deltas: Vec<String>,
        signature: String,
    },
    Text {
        deltas: Vec<String>,
    },
    ToolUse {
        name: String,
        input: Value,
        pieces: Vec<String>,
    },
}

impl Block {
    fn delta_count(&self) -> usize {
        match self {
            Block::Thinking { deltas, .. } | Block::Text { deltas } => deltas.len(),
            Block::ToolUse { pieces, .. } => pieces.len(),
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub blocks: Vec<Block>,
    pub stop_reason: &'static str,
    pub usage: Usage,
    /// Number of content deltas across all blocks, excluding `signature_delta`.
    pub content_deltas: usize,
}

/// `floor(len(compact JSON of body["messages"]) / 4)`, at least 1. (Compact serialization of the parsed value,
/// as `serde_json::to_vec` writes it: its length does not depend on key order or on the client's whitespace.)
pub(crate) fn input_tokens(body: &Value) -> u64 {
    let messages = body.get("messages").unwrap_or(&Value::Null);
    let len = serde_json::to_vec(messages).map(|v| v.len()).unwrap_or(0) as u64;
    (len / 4).max(1)
}

/// Cache creation (5m, 1h) from the request's `cache_control` marks.
pub(crate) fn cache_creation(body: &Value) -> (u64, u64) {
    let mut marks: Vec<&Value> = Vec::new();
    marks.extend(body.get("cache_control"));
    for tool in array(body.get("tools")) {
        marks.extend(tool.get("cache_control"));
    }
    for block in array(body.get("system")) {
        marks.extend(block.get("cache_control"));
    }
    for message in array(body.get("messages")) {
        for block in array(message.get("content")) {
            marks.extend(block.get("cache_control"));
            for inner in array(block.get("content")) {
                marks.extend(inner.get("cache_control"));
            }
        }
    }
    let (mut m5, mut h1) = (0, 0);
    for mark in marks.into_iter().filter(|m| m.is_object()) {
        if mark.get("ttl").and_then(Value::as_str) == Some("1h") {
            h1 += CACHE_WRITE_TOKENS_PER_MARK;
        } else {
            m5 += CACHE_WRITE_TOKENS_PER_MARK;
        }
    }
    (m5, h1)
}

fn array(v: Option<&Value>) -> &[Value] {
    match v {
        Some(Value::Array(a)) => a,
        _ => &[],
    }
}

const TEXT_FILLER: &str = "The quick brown fox jumps over the lazy dog while the relay streams every byte. ";
const THINKING_FILLER: &str = "Let me think about this carefully, step by step, before answering. ";

/// `count` pieces of `bytes` bytes each, read consecutively from an endless repetition of `filler` (ASCII).
fn filler_pieces(filler: &str, count: usize, bytes: usize) -> Vec<String> {
    let src = filler.as_bytes();
    let mut pos = 0usize;
    (0..count)
        .map(|_| {
            let mut s = String::with_capacity(bytes);
            for _ in 0..bytes {
                s.push(char::from(src[pos % src.len()]));
                pos += 1;
            }
            s
        })
        .collect()
}

/// Splits `s` into at most `n` (at least 1) consecutive non-empty pieces of nearly equal length in chars.
fn split_pieces(s: &str, n: usize) -> Vec<String> {
    let chars: Vec<char> = s.chars().collect();
    let n = n.max(1).min(chars.len().max(1));
    let base = chars.len() / n;
    let extra = chars.len() % n;
    let mut out = Vec::with_capacity(n);
    let mut start = 0;
    for i in 0..n {
        let len = base + usize::from(i < extra);
        out.push(chars[start..start + len].iter().collect());
        start += len;
    }
    out
}

/// A tool input satisfying the shape of `input_schema.properties` (one value per property, by JSON type).
fn tool_input(tool: &Value) -> Value {
    let mut input = Map::new();
    if let Some(Value::Object(props)) = tool.get("input_schema").and_then(|s| s.get("properties")) {
        for (name, schema) in props {
            let value = match schema.get("type").and_then(Value::as_str) {
                Some("integer") | Some("number") => json!(1),
                Some("boolean") => json!(true),
                Some("array") => json!([]),
                Some("object") => json!({}),
                Some("null") => Value::Null,
                _ => Value::String(format!("mock value for {name}")),
            };
            input.insert(name.clone(), value);
        }
    }
    Value::Object(input)
}

pub(crate) fn thinking_enabled(body: &Value) -> bool {
    matches!(
        body.get("thinking").and_then(|t| t.get("type")).and_then(Value::as_str),
        Some("enabled") | Some("adaptive")
    )
}

/// The tool the mock calls, if the request offers tools and does not say `tool_choice: {"type":"none"}`.
fn chosen_tool(body: &Value) -> Option<&Value> {
    let tools = array(body.get("tools"));
    let choice = body.get("tool_choice");
    match choice.and_then(|c| c.get("type")).and_then(Value::as_str) {
        Some("none") => return None,
        Some("tool") => {
            let wanted = choice.and_then(|c| c.get("name")).and_then(Value::as_str);
            if let Some(t) = tools.iter().find(|t| t.get("name").and_then(Value::as_str) == wanted) {
                return Some(t);
            }
        }
        _ => {}
    }
    tools.iter().find(|t| t.get("name").and_then(Value::as_str).is_some())
}

pub(crate) fn plan(shape: &Shape, body: &Value, cache_read: u64) -> Plan {
    let mut blocks = Vec::new();
    if thinking_enabled(body) {
        let deltas = filler_pieces(THINKING_FILLER, shape.thinking_events, shape.event_bytes);
        let signature = format!(
            "mocksig_{}",
            relay_proto::hex(&Sha256::digest(deltas.concat().as_bytes()))
        );
        blocks.push(Block::Thinking { deltas, signature });
    }
    let stop_reason = match chosen_tool(body) {
        Some(tool) => {
            let name = tool.get("name").and_then(Value::as_str).unwrap_or("tool").to_string();
            let input = tool_input(tool);
            let pieces = split_pieces(&input.to_string(), shape.tool_json_pieces);
            blocks.push(Block::ToolUse { name, input, pieces });
            "tool_use"
        }
        None => {
            blocks.push(Block::Text {
                deltas: filler_pieces(TEXT_FILLER, shape.text_events, shape.event_bytes),
            });
            "end_turn"
        }
    };
    let content_deltas: usize = blocks.iter().map(Block::delta_count).sum();
    let (cache_5m, cache_1h) = cache_creation(body);
    let usage = Usage {
        input_tokens: input_tokens(body),
        output_tokens: content_deltas as u64,
        cache_creation_input_tokens: cache_5m + cache_1h,
        cache_5m,
        cache_1h,
        cache_read_input_tokens: cache_read,
    };
    Plan {
        blocks,
        stop_reason,
        usage,
        content_deltas,
    }
}

/// Ids the rendering needs: message id and one tool-use id.
pub(crate) struct Ids {
    pub message_id: String,
    pub tool_use_id: String,
}

fn full_usage_json(u: &Usage, output_tokens: u64) -> Value {
    json!({
        "input_tokens": u.input_tokens,
        "cache_creation_input_tokens": u.cache_creation_input_tokens,
        "cache_read_input_tokens": u.cache_read_input_tokens,
        "cache_creation": {
            "ephemeral_5m_input_tokens": u.cache_5m,
            "ephemeral_1h_input_tokens": u.cache_1h,
        },
        "output_tokens": output_tokens,
        "service_tier": "standard",
    })
}

fn complete_block(block: &Block, ids: &Ids) -> Value {
    match block {
        Block::Thinking { deltas, signature } => {
            json!({"type": "thinking", "thinking": deltas.concat(), "signature": signature})
        }
        Block::Text { deltas } => json!({"type": "text", "text": deltas.concat()}),
        Block::ToolUse { name, input, .. } => {
            json!({"type": "tool_use", "id": ids.tool_use_id, "name": name, "input": input})
        }
    }
}

/// The non-streaming Message object.
pub(crate) fn message_json(plan: &Plan, model: &Value, ids: &Ids) -> Value {
    json!({
        "id": ids.message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": plan.blocks.iter().map(|b| complete_block(b, ids)).collect::<Vec<_>>(),
        "stop_reason": plan.stop_reason,
        "stop_sequence": null,
        "usage": full_usage_json(&plan.usage, plan.usage.output_tokens),
    })
}

/// One SSE frame: `event: NAME\ndata: JSON\n\n`.
pub(crate) fn sse_frame(name: &str, data: &Value) -> bytes::Bytes {
    bytes::Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
}

pub(crate) fn ping_frame() -> bytes::Bytes {
    sse_frame("ping", &json!({"type": "ping"}))
}

/// The streaming answer, one frame per event:
/// `message_start`, `ping`, then per block `content_block_start`, its deltas (with a `ping` after every
/// `ping_every`-th content delta counted across blocks), `content_block_stop`; then `message_delta`,
/// `message_stop`.
pub(crate) fn sse_frames(plan: &Plan, model: &Value, ids: &Ids, ping_every: usize) -> Vec<bytes::Bytes> {
    let mut frames = Vec::with_capacity(plan.content_deltas + 3 * plan.blocks.len() + 8);
    let u = &plan.usage;
    frames.push(sse_frame(
        "message_start",
        &json!({
            "type": "message_start",
            "message": {
                "id": ids.message_id,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [],
                "stop_reason": null,
                "stop_sequence": null,
                "usage": full_usage_json(u, 1),
            }
        }),
    ));
    frames.push(ping_frame());
    let mut deltas_sent = 0usize;
    let mut push_delta = |frames: &mut Vec<bytes::Bytes>, index: usize, delta: Value| {
        frames.push(sse_frame(
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": index, "delta": delta}),
        ));
        deltas_sent += 1;
        if ping_every > 0 && deltas_sent.is_multiple_of(ping_every) {
            frames.push(ping_frame());
        }
    };
    for (index, block) in plan.blocks.iter().enumerate() {
        let start = match block {
            Block::Thinking { .. } => json!({"type": "thinking", "thinking": "", "signature": ""}),
            Block::Text { .. } => json!({"type": "text", "text": ""}),
            Block::ToolUse { name, .. } => {
                json!({"type": "tool_use", "id": ids.tool_use_id, "name": name, "input": {}})
            }
        };
        frames.push(sse_frame(
            "content_block_start",
            &json!({"type": "content_block_start", "index": index, "content_block": start}),
        ));
        match block {
            Block::Thinking { deltas, signature } => {
                for d in deltas {
                    push_delta(&mut frames, index, json!({"type": "thinking_delta", "thinking": d}));
                }
                frames.push(sse_frame(
                    "content_block_delta",
                    &json!({
                        "type": "content_block_delta",
                        "index": index,
                        "delta": {"type": "signature_delta", "signature": signature},
                    }),
                ));
            }
            Block::Text { deltas } => {
                for d in deltas {
                    push_delta(&mut frames, index, json!({"type": "text_delta", "text": d}));
                }
            }
            Block::ToolUse { pieces, .. } => {
                for p in pieces {
                    push_delta(
                        &mut frames,
                        index,
                        json!({"type": "input_json_delta", "partial_json": p}),
                    );
                }
            }
        }
        frames.push(sse_frame(
            "content_block_stop",
            &json!({"type": "content_block_stop", "index": index}),
        ));
    }
    frames.push(sse_frame(
        "message_delta",
        &json!({
            "type": "message_delta",
            "delta": {"stop_reason": plan.stop_reason, "stop_sequence": null},
            "usage": {
                "input_tokens": u.input_tokens,
                "cache_creation_input_tokens": u.cache_creation_input_tokens,
                "cache_read_input_tokens": u.cache_read_input_tokens,
                "output_tokens": u.output_tokens,
            },
        }),
    ));
    frames.push(sse_frame("message_stop", &json!({"type": "message_stop"})));
    frames
}

/// The mid-stream error event of [`crate::Fault::ErrorEventMidStream`].
pub(crate) fn overloaded_error_frame() -> bytes::Bytes {
    sse_frame(
        "error",
        &json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_lossless() {
        let s = r#"{"a":"mock value for a","b":1}"#;
        for n in 0..40 {
            let p = split_pieces(s, n);
            assert_eq!(p.concat(), s);
            assert!(p.iter().all(|x| !x.is_empty()));
            assert_eq!(p.len(), n.clamp(1, s.len()));
        }
        assert_eq!(split_pieces("", 3), vec![String::new()]);
    }

    #[test]
    fn filler_is_continuous() {
        let p = filler_pieces(TEXT_FILLER, 10, 7);
        assert_eq!(p.len(), 10);
        assert!(p.iter().all(|x| x.len() == 7));
        assert!(p.concat().starts_with("The quick brown fox"));
    }

    #[test]
    fn cache_marks_split_by_ttl() {
        let body = json!({
            "system": [{"type": "text", "text": "s", "cache_control": {"type": "ephemeral", "ttl": "1h"}}],
            "tools": [{"name": "t", "input_schema": {"type": "object", "properties": {"cache_control": {}}}}],
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "x", "cache_control": {"type": "ephemeral"}},
                {"type": "tool_result", "tool_use_id": "t", "content": [
                    {"type": "text", "text": "y", "cache_control": {"type": "ephemeral", "ttl": "5m"}}
                ]}
            ]}]
        });
        assert_eq!(
            cache_creation(&body),
            (2 * CACHE_WRITE_TOKENS_PER_MARK, CACHE_WRITE_TOKENS_PER_MARK)
        );
    }
}
