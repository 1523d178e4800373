//! A local estimate of the input tokens of a Messages request, for `POST /v1/messages/count_tokens`
//! when no account can answer it (see `docs/token-estimate.md` for the method and its measured error).
//!
//! The estimate is only ever an answer to count_tokens (marked `x-relay-estimate: true`); it is never
//! used for usage, limits or budgets.
//!
//! Method:
//! - Text goes through a BPE tokenizer (`o200k_base`, shipped inside the `tiktoken-rs` crate, so nothing is
//!   fetched at build or run time) and is scaled to Claude's tokenizer: ×[`PROSE_SCALE`] for prose,
//!   ×[`CODE_SCALE`] for code and JSON (tool schemas, tool inputs), and a further ×[`NEW_TOKENIZER_SCALE`] for
//!   the models that use the tokenizer introduced with Claude Opus 4.7.
//! - Fixed overheads: per request, per message, for a system prompt, per content block, per tool, and the
//!   tool-use system prompt Anthropic documents per model and `tool_choice`.
//! - Images: Anthropic's vision formula (one token per 28×28 patch after the image is scaled down to the
//!   model's long-edge and token limits); the dimensions are read from the base64 image's header.
//! - PDFs: the documented 1,500–3,000 tokens per page (its midpoint), pages counted in the PDF itself.
//! - Thinking blocks count only in the last (current) assistant turn, as documented.

use base64::Engine as _;
use serde_json::Value;
use std::sync::OnceLock;

/// o200k tokens → Claude tokens for prose (Claude 3.5 Sonnet's tokenizer gives about 16% more tokens than
/// GPT-4o's on English prose in published comparisons).
pub const PROSE_SCALE: f64 = 1.16;
/// o200k tokens → Claude tokens for code and JSON (about 30% more on Python code in the same comparison).
pub const CODE_SCALE: f64 = 1.30;
/// Claude Opus 4.7 and later (and Fable/Mythos) use a tokenizer that gives "approximately 30 percent more
/// tokens" for the same text (Anthropic's token-counting docs).
pub const NEW_TOKENIZER_SCALE: f64 = 1.30;

// The fixed overheads below were fitted to the examples of Anthropic's token-counting docs (see the tests
// and docs/token-estimate.md): few data points, so they are round numbers of the right size, not exact.

/// Every request: the assistant prompt that ends the conversation.
const PER_REQUEST: f64 = 3.0;
/// Every message: its role marker.
const PER_MESSAGE: f64 = 3.0;
/// A system prompt: none beyond its text (the basic example, 14 tokens, leaves no room for one).
const PER_SYSTEM: f64 = 0.0;
/// Every content block after the first of a message (block separators).
const PER_EXTRA_BLOCK: f64 = 1.0;
/// Every tool definition: nothing beyond its name, description and schema (the tools example, 403 tokens,
/// is already slightly over with the documented tool-use system prompt and the schema counted as JSON).
const PER_TOOL: f64 = 0.0;
/// A tool_use or tool_result block: its tags and id.
const PER_TOOL_BLOCK: f64 = 10.0;
/// Extended or adaptive thinking enabled: the instructions that come with it (the thinking example, 88).
const THINKING_ENABLED: f64 = 24.0;
/// Tokens per PDF page: the midpoint of Anthropic's documented 1,500–3,000 per page.
const PDF_PAGE_TOKENS: f64 = 2250.0;
/// Side of the square patch one image token stands for (Anthropic's vision docs).
const PATCH_PX: u64 = 28;
/// Text past this many bytes in one request is not tokenized: it is counted at the ratio seen so far.
const EXACT_TEXT_BUDGET: usize = 1 << 20;
/// A single text longer than this is sampled (evenly spaced windows) rather than tokenized whole.
const SAMPLE_ABOVE: usize = 64 * 1024;
const SAMPLE_WINDOW: usize = 16 * 1024;
/// At most this much of an image's or a PDF's base64 is decoded.
const MAX_DECODE_BYTES: usize = 48 * 1024 * 1024;

/// Why a body cannot be estimated: it is not a Messages request (answered as `invalid_request_error`).
#[derive(Debug, PartialEq, Eq)]
pub struct Invalid(pub String);

/// What differs between model generations.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Profile {
    text_scale: f64,
    image_max_edge: u64,
    image_max_tokens: u64,
    /// Tool-use system prompt with tool_choice auto/none, and any/tool.
    tools_auto: f64,
    tools_any: f64,
}

fn profile(model: &str) -> Profile {
    let m = model.to_ascii_lowercase();
    let new = m.contains("fable") || m.contains("mythos") || version(&m).is_some_and(|v| v >= (4, 7));
    // The tool-use system prompt of Anthropic's pricing table, for the models it names by itself; the
    // count the token-counting docs publish for their tools example (403) fits 346 for the 4.x models.
    let (tools_auto, tools_any) = if m.contains("opus-4-8") {
        (290.0, 410.0)
    } else if m.contains("opus-4-7") {
        (675.0, 804.0)
    } else if m.contains("sonnet-5") {
        (354.0, 474.0)
    } else if m.contains("haiku-3") || m.contains("3-haiku") || m.contains("3-5-haiku") {
        (264.0, 340.0)
    } else {
        (346.0, 313.0)
    };
    if new {
        Profile {
            text_scale: NEW_TOKENIZER_SCALE,
            image_max_edge: 2576,
            image_max_tokens: 4784,
            tools_auto,
            tools_any,
        }
    } else {
        Profile {
            text_scale: 1.0,
            image_max_edge: 1568,
            image_max_tokens: 1568,
            tools_auto,
            tools_any,
        }
    }
}

/// The model's version from `claude-<family>-<major>[-<minor>]` or `claude-<major>[-<minor>]-<family>`
/// (a date suffix is not a minor version).
fn version(model: &str) -> Option<(u32, u32)> {
    let parts: Vec<&str> = model.split(['-', '.', '@', ':']).collect();
    let small = |s: &str| (1..=2).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit());
    let i = parts.iter().position(|p| small(p))?;
    let major: u32 = parts[i].parse().ok()?;
    let minor = parts
        .get(i + 1)
        .filter(|p| small(p))
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    Some((major, minor))
}

fn tokenizer() -> Option<&'static tiktoken_rs::CoreBPE> {
    static BPE: OnceLock<Option<tiktoken_rs::CoreBPE>> = OnceLock::new();
    BPE.get_or_init(|| match tiktoken_rs::o200k_base() {
        Ok(b) => Some(b),
        Err(e) => {
            tracing::error!(error = %e, "cannot load the o200k_base vocabulary: estimating 4 bytes a token");
            None
        }
    })
    .as_ref()
}

/// Whether an upstream's error body is the API's own "model not found" (`not_found_error`, "model: NAME"): the
/// client asked for a model that does not exist, which an estimate must not hide.
pub fn unknown_model(body: &[u8]) -> bool {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return false;
    };
    let e = &v["error"];
    e["type"].as_str() == Some("not_found_error")
        && e["message"]
            .as_str()
            .is_some_and(|m| m.trim_start().to_ascii_lowercase().starts_with("model"))
}

/// Counts scaled BPE tokens.
struct Counter {
    prose: f64,
    code: f64,
    fixed: f64,
    /// Bytes tokenized exactly so far, and the tokens they gave.
    exact_bytes: usize,
    exact_tokens: usize,
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Prose,
    Code,
}

impl Counter {
    fn new() -> Self {
        Counter {
            prose: 0.0,
            code: 0.0,
            fixed: 0.0,
            exact_bytes: 0,
            exact_tokens: 0,
        }
    }

    /// o200k tokens of `text`: exact while within budget, else at the ratio seen so far.
    fn bpe(&mut self, text: &str) -> f64 {
        if text.is_empty() {
            return 0.0;
        }
        let Some(bpe) = tokenizer() else {
            return text.len() as f64 / 4.0;
        };
        if self.exact_bytes >= EXACT_TEXT_BUDGET && self.exact_tokens > 0 {
            return text.len() as f64 * self.exact_tokens as f64 / self.exact_bytes as f64;
        }
        if text.len() <= SAMPLE_ABOVE {
            let n = bpe.encode_ordinary(text).len();
            self.exact_bytes += text.len();
            self.exact_tokens += n;
            return n as f64;
        }
        // Four evenly spaced windows, each cut at char boundaries.
        let (mut bytes, mut tokens) = (0usize, 0usize);
        for k in 0..4 {
            let start = floor_char(text, (text.len() - SAMPLE_WINDOW) * k / 3);
            let end = floor_char(text, (start + SAMPLE_WINDOW).min(text.len()));
            let window = &text[start..end];
            bytes += window.len();
            tokens += bpe.encode_ordinary(window).len();
        }
        self.exact_bytes += bytes;
        self.exact_tokens += tokens;
        if bytes == 0 {
            return text.len() as f64 / 4.0;
        }
        text.len() as f64 * tokens as f64 / bytes as f64
    }

    fn text(&mut self, text: &str, kind: Kind) {
        let n = self.bpe(text);
        match kind {
            Kind::Prose => self.prose += n,
            Kind::Code => self.code += n,
        }
    }

    /// Text whose kind is guessed: code when it has many of the characters code is made of.
    fn guess(&mut self, text: &str) {
        let kind = if looks_like_code(text) { Kind::Code } else { Kind::Prose };
        self.text(text, kind);
    }

    fn json(&mut self, v: &Value) {
        let s = match v {
            Value::String(s) => s.clone(),
            v => v.to_string(),
        };
        self.text(&s, Kind::Code);
    }

    fn total(&self, p: &Profile) -> u64 {
        let text = (self.prose * PROSE_SCALE + self.code * CODE_SCALE) * p.text_scale;
        (text + self.fixed).round().max(1.0) as u64
    }
}

fn floor_char(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn looks_like_code(text: &str) -> bool {
    let sample = &text[..floor_char(text, text.len().min(4096))];
    let total = sample.chars().count();
    if total < 40 {
        return false;
    }
    let symbols = sample
        .chars()
        .filter(|c| {
            matches!(
                c,
                '{' | '}' | '[' | ']' | '(' | ')' | ';' | '=' | '<' | '>' | '_' | '"' | '\\' | '|'
            )
        })
        .count();
    symbols * 100 / total >= 4
}

/// The estimated input tokens of a Messages request body (as count_tokens would count it).
pub fn estimate(body: &[u8]) -> Result<u64, Invalid> {
    // A body of very many tiny blocks would cost some 1.5 KB of memory per block as a parsed
    // document (a 32 MB body: gigabytes): past MAX_STRUCTURES objects and arrays (counted as
    // bytes, an upper bound) it is estimated from its size without being parsed.
    let structures = body.iter().filter(|b| matches!(b, b'{' | b'[')).count();
    if structures > MAX_STRUCTURES {
        serde_json::from_slice::<serde::de::IgnoredAny>(body)
            .map_err(|e| Invalid(format!("request body is not valid JSON: {e}")))?;
        return Ok((body.len() as f64 / BYTES_PER_TOKEN_UNPARSED).ceil() as u64);
    }
    let v: Value = serde_json::from_slice(body).map_err(|e| Invalid(format!("request body is not valid JSON: {e}")))?;
    estimate_value(&v)
}

/// More JSON objects and arrays than this, and the body is estimated from its size.
pub const MAX_STRUCTURES: usize = 50_000;
/// Bytes per token of a body estimated from its size (JSON syntax included: a low guess of
/// tokens, about what prose gives).
const BYTES_PER_TOKEN_UNPARSED: f64 = 4.0;

pub fn estimate_value(v: &Value) -> Result<u64, Invalid> {
    let obj = v
        .as_object()
        .ok_or_else(|| Invalid("request body must be a JSON object".into()))?;
    let model = obj.get("model").and_then(Value::as_str).unwrap_or_default();
    let messages = match obj.get("messages") {
        Some(Value::Array(m)) => m,
        Some(_) => return Err(Invalid("messages: Input should be a valid list".into())),
        None => return Err(Invalid("messages: Field required".into())),
    };
    let p = profile(model);
    let mut c = Counter::new();
    c.fixed += PER_REQUEST;

    match obj.get("system") {
        Some(Value::String(s)) if !s.is_empty() => {
            c.fixed += PER_SYSTEM;
            c.guess(s);
        }
        Some(Value::Array(blocks)) if !blocks.is_empty() => {
            c.fixed += PER_SYSTEM;
            for b in blocks {
                block(&mut c, &p, b, false);
            }
        }
        _ => {}
    }

    if let Some(Value::Array(tools)) = obj.get("tools") {
        if !tools.is_empty() {
            let any = matches!(
                obj.get("tool_choice")
                    .and_then(|t| t.get("type"))
                    .and_then(Value::as_str),
                Some("any" | "tool")
            );
            c.fixed += if any { p.tools_any } else { p.tools_auto };
            for t in tools {
                tool(&mut c, t);
            }
        }
    }

    if let Some(t) = obj.get("thinking").and_then(|t| t.get("type")).and_then(Value::as_str) {
        if t == "enabled" || t == "adaptive" {
            c.fixed += THINKING_ENABLED;
        }
    }

    let last = messages.len().saturating_sub(1);
    for (i, m) in messages.iter().enumerate() {
        let Some(m) = m.as_object() else {
            return Err(Invalid(format!("messages.{i}: Input should be a valid dictionary")));
        };
        c.fixed += PER_MESSAGE;
        // Thinking counts only in the current assistant turn (the last message).
        let current_assistant = i == last && m.get("role").and_then(Value::as_str) == Some("assistant");
        match m.get("content") {
            Some(Value::String(s)) => c.guess(s),
            Some(Value::Array(blocks)) => {
                c.fixed += PER_EXTRA_BLOCK * blocks.len().saturating_sub(1) as f64;
                for b in blocks {
                    block(&mut c, &p, b, current_assistant);
                }
            }
            Some(other) => c.json(other),
            None => return Err(Invalid(format!("messages.{i}.content: Field required"))),
        }
    }
    Ok(c.total(&p))
}

fn tool(c: &mut Counter, t: &Value) {
    c.fixed += PER_TOOL;
    let kind = t.get("type").and_then(Value::as_str).unwrap_or("custom");
    // Anthropic-defined tools: their definition is Anthropic's, of a documented size.
    let fixed = match kind {
        k if k.starts_with("bash_") => Some(245.0),
        k if k.starts_with("text_editor_") => Some(700.0),
        k if k.starts_with("computer_") => Some(735.0 + 466.0),
        _ => None,
    };
    if let Some(n) = fixed {
        c.fixed += n;
        return;
    }
    if let Some(name) = t.get("name").and_then(Value::as_str) {
        c.text(name, Kind::Code);
    }
    if let Some(d) = t.get("description").and_then(Value::as_str) {
        c.guess(d);
    }
    match t.get("input_schema") {
        Some(s) => c.json(s),
        None if kind != "custom" => {
            // A server tool (web search, code execution, …): its parameters as given.
            let mut rest = t.clone();
            if let Some(o) = rest.as_object_mut() {
                o.remove("cache_control");
            }
            c.json(&rest);
        }
        None => {}
    }
}

fn block(c: &mut Counter, p: &Profile, b: &Value, current_assistant: bool) {
    let Some(o) = b.as_object() else {
        if let Some(s) = b.as_str() {
            c.guess(s);
        }
        return;
    };
    match o.get("type").and_then(Value::as_str).unwrap_or_default() {
        "text" => {
            if let Some(s) = o.get("text").and_then(Value::as_str) {
                c.guess(s);
            }
        }
        "thinking" => {
            if current_assistant {
                if let Some(s) = o.get("thinking").and_then(Value::as_str) {
                    c.text(s, Kind::Prose);
                }
            }
        }
        "redacted_thinking" => {
            if current_assistant {
                // Encrypted: about as many tokens as its plain text would have had, which is unknown;
                // count its data as opaque text.
                if let Some(s) = o.get("data").and_then(Value::as_str) {
                    c.fixed += s.len() as f64 / 8.0;
                }
            }
        }
        "tool_use" | "server_tool_use" => {
            c.fixed += PER_TOOL_BLOCK;
            if let Some(n) = o.get("name").and_then(Value::as_str) {
                c.text(n, Kind::Code);
            }
            if let Some(input) = o.get("input") {
                c.json(input);
            }
        }
        "tool_result" => {
            c.fixed += PER_TOOL_BLOCK;
            match o.get("content") {
                Some(Value::String(s)) => c.guess(s),
                Some(Value::Array(inner)) => {
                    for b in inner {
                        block(c, p, b, false);
                    }
                }
                _ => {}
            }
        }
        "image" => c.fixed += image_tokens(p, o.get("source")) as f64,
        "document" => document(c, p, o),
        "search_result" => {
            for k in ["title", "source"] {
                if let Some(s) = o.get(k).and_then(Value::as_str) {
                    c.guess(s);
                }
            }
            if let Some(Value::Array(inner)) = o.get("content") {
                for b in inner {
                    block(c, p, b, false);
                }
            }
        }
        _ => {
            // Anything else (server tool results, …): its JSON, less what is not content.
            let mut rest = b.clone();
            if let Some(o) = rest.as_object_mut() {
                o.remove("cache_control");
                o.remove("citations");
            }
            c.json(&rest);
        }
    }
}

fn document(c: &mut Counter, p: &Profile, o: &serde_json::Map<String, Value>) {
    for k in ["title", "context"] {
        if let Some(s) = o.get(k).and_then(Value::as_str) {
            c.guess(s);
        }
    }
    let Some(source) = o.get("source").and_then(Value::as_object) else {
        return;
    };
    match source.get("type").and_then(Value::as_str).unwrap_or_default() {
        "text" => {
            if let Some(s) = source.get("data").and_then(Value::as_str) {
                c.guess(s);
            }
        }
        "content" => match source.get("content") {
            Some(Value::String(s)) => c.guess(s),
            Some(Value::Array(inner)) => {
                for b in inner {
                    block(c, p, b, false);
                }
            }
            _ => {}
        },
        "base64" => {
            let pages = source
                .get("data")
                .and_then(Value::as_str)
                .map(|d| pdf_pages(&decode_base64(d)))
                .unwrap_or(1);
            c.fixed += PDF_PAGE_TOKENS * pages as f64;
        }
        // A URL or a file id: the pages are unknown; one page.
        _ => c.fixed += PDF_PAGE_TOKENS,
    }
}

/// Decodes base64 leniently (standard or URL-safe alphabet, padded or not, whitespace anywhere, a cut-off
/// last group): what decodes of it, empty when it is not base64.
fn decode_base64(data: &str) -> Vec<u8> {
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new()
            .with_decode_allow_trailing_bits(true)
            .with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    let mut clean: Vec<u8> = data
        .bytes()
        .filter(|b| !b.is_ascii_whitespace() && *b != b'=')
        .take(MAX_DECODE_BYTES / 3 * 4)
        .map(|b| match b {
            b'-' => b'+',
            b'_' => b'/',
            b => b,
        })
        .collect();
    if clean.len() % 4 == 1 {
        clean.pop();
    }
    LENIENT.decode(&clean).unwrap_or_default()
}

/// Image tokens: one per 28×28 patch once the image fits the model's long-edge and token limits; an image
/// whose size cannot be read (a URL, a file id, an unknown format) counts as the most an image can cost.
fn image_tokens(p: &Profile, source: Option<&Value>) -> u64 {
    let dims = source
        .filter(|s| s.get("type").and_then(Value::as_str) == Some("base64"))
        .and_then(|s| s.get("data"))
        .and_then(Value::as_str)
        .and_then(|d| {
            // The header is at the start, but a JPEG's EXIF segment may come before its frame header.
            let head = &d[..floor_char(d, d.len().min(256 * 1024))];
            let bytes = decode_base64(head);
            imagesize::blob_size(&bytes)
                .ok()
                .or_else(|| imagesize::blob_size(&decode_base64(d)).ok())
        })
        .map(|s| (s.width as u64, s.height as u64));
    match dims {
        Some((w, h)) if w > 0 && h > 0 => image_tokens_for(p, w, h),
        _ => p.image_max_tokens,
    }
}

fn patches(w: u64, h: u64) -> u64 {
    w.div_ceil(PATCH_PX) * h.div_ceil(PATCH_PX)
}

/// Anthropic's vision formula: the image is scaled down (aspect kept) until its long edge is within the
/// limit and its patches within the token limit, then costs one token per patch.
fn image_tokens_for(p: &Profile, w: u64, h: u64) -> u64 {
    let (wf, hf) = (w as f64, h as f64);
    let mut scale = (p.image_max_edge as f64 / wf.max(hf)).min(1.0);
    let budget = (p.image_max_tokens * PATCH_PX * PATCH_PX) as f64;
    if wf * hf * scale * scale > budget {
        scale = scale.min((budget / (wf * hf)).sqrt());
    }
    let (mut sw, mut sh) = (
        ((wf * scale).floor() as u64).max(1),
        ((hf * scale).floor() as u64).max(1),
    );
    // Rounding up to whole patches may still overshoot: shrink a pixel at a time along the long edge.
    while patches(sw, sh) > p.image_max_tokens && sw > 1 && sh > 1 {
        if sw >= sh {
            sw -= 1;
            sh = ((sw as f64) * hf / wf).floor().max(1.0) as u64;
        } else {
            sh -= 1;
            sw = ((sh as f64) * wf / hf).floor().max(1.0) as u64;
        }
    }
    patches(sw, sh).min(p.image_max_tokens)
}

/// The pages of a PDF: its page objects (`/Type /Page`), looked for in its plain bytes and, when none are
/// there (PDF 1.5 object streams), in its deflated streams; at least 1.
fn pdf_pages(pdf: &[u8]) -> u64 {
    let plain = count_page_objects(pdf);
    if plain > 0 {
        return plain;
    }
    let mut n = 0u64;
    let mut rest = pdf;
    // What all the streams may inflate to, together (a deflate bomb costs no more than this).
    let mut budget: u64 = 64 * 1024 * 1024;
    while let Some(start) = find(rest, b"stream") {
        if budget == 0 {
            break;
        }
        let mut body = &rest[start + 6..];
        if body.starts_with(b"\r\n") {
            body = &body[2..];
        } else if body.starts_with(b"\n") || body.starts_with(b"\r") {
            body = &body[1..];
        }
        let end = find(body, b"endstream").unwrap_or(body.len());
        let mut out = Vec::new();
        let decoder = flate2::read::ZlibDecoder::new(&body[..end]);
        use std::io::Read as _;
        let _ = decoder.take(budget.min(16 * 1024 * 1024)).read_to_end(&mut out);
        budget = budget.saturating_sub(out.len() as u64);
        n += count_page_objects(&out);
        rest = &body[end..];
    }
    n.max(1)
}

fn count_page_objects(b: &[u8]) -> u64 {
    let mut n = 0u64;
    let mut rest = b;
    while let Some(i) = find(rest, b"/Type") {
        let mut j = i + 5;
        while j < rest.len() && rest[j].is_ascii_whitespace() {
            j += 1;
        }
        if rest[j..].starts_with(b"/Page") && !rest[j + 5..].first().is_some_and(|c| c.is_ascii_alphanumeric()) {
            n += 1;
        }
        rest = &rest[j..];
    }
    n
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
#[path = "estimate_tests.rs"]
mod tests;
