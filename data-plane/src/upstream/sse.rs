//! The usage tap: an incremental parser of the Anthropic event stream that watches the bytes going
//! to the client and keeps what accounting needs (usage, model, message id, how the stream ended).
//!
//! The proxy passes every byte through untouched and feeds the same chunks to [`SseTap::feed`]; the
//! tap never fails and never changes the stream. Parsing follows the WHATWG `text/event-stream`
//! rules:
//!
//! * lines end in LF, CRLF or CR; a CR ending one chunk and an LF starting the next are one line end;
//! * a UTF-8 BOM at the very start of the stream is skipped;
//! * an empty line dispatches the event (if it had at least one `data` line); lines starting with
//!   `:` are comments; a field is `name:value` with one optional space after the colon stripped, a
//!   line without a colon is a field with an empty value; `event` sets the event name, `data` lines
//!   are joined with `\n`, other fields (`id`, `retry`, unknown ones) are ignored.
//!
//! Bytes are buffered only for the current incomplete line and the current event's data, and
//! decoded (as JSON, hence UTF-8) only once an event is complete, so chunks may split events and
//! multi-byte characters anywhere. `message_start`, `message_delta` and `error` are parsed as
//! JSON; every other event's data is only checked to be JSON (no allocation): one that is not makes
//! the stream corrupt ([`SseTap::corrupt`]) and nothing after it counts, nor anything after
//! `message_stop` ([`SseTap::ended`]). [`SseTap::complete_bytes`] says where the last whole event
//! ends, so a relay can pass on whole events only. The event is chosen by its
//! `event:` name, or, for a nameless event, by a cheap look at the `{"type":"…"` prefix of its data
//! (a full parse only if `type` is not the first key).
//!
//! An event whose data exceeds [`MAX_EVENT_BYTES`] is counted but its data is dropped rather than
//! buffered (so a misbehaving upstream cannot make the tap grow without bound).

use serde_json::Value;

use super::usage::Usage;

/// The most data bytes buffered for one event (and bytes for one line); beyond, the event's data is dropped.
pub const MAX_EVENT_BYTES: usize = 1 << 20;

/// Buffers that grew past this are released after use instead of kept for the next event.
const RETAIN_CAPACITY: usize = 64 << 10;

/// The UTF-8 byte order mark.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// `error.type` recorded for an `error` event whose data carries none (unparseable or truncated).
const UNKNOWN_ERROR_TYPE: &str = "api_error";

/// What an event is, as far as the tap cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// No (or an empty) `event:` name: decided by the data's `type`.
    Unnamed,
    MessageStart,
    MessageDelta,
    MessageStop,
    Error,
    /// Anything else: counted, not parsed.
    Other,
}

impl Kind {
    fn of_name(name: &[u8]) -> Kind {
        match name {
            b"" => Kind::Unnamed,
            b"message_start" => Kind::MessageStart,
            b"message_delta" => Kind::MessageDelta,
            b"message_stop" => Kind::MessageStop,
            b"error" => Kind::Error,
            _ => Kind::Other,
        }
    }
}

/// Watches an Anthropic SSE stream for usage. See the [module docs](self).
#[derive(Debug)]
pub struct SseTap {
    /// The current incomplete line (at most [`MAX_EVENT_BYTES`] of it).
    line: Vec<u8>,
    /// `line` lost bytes to the cap.
    line_truncated: bool,
    /// The last chunk ended in CR: an LF starting the next one ends nothing.
    pending_cr: bool,
    /// No line completed yet (a BOM is still to be skipped).
    at_stream_start: bool,

    /// The current event's name, classified.
    kind: Kind,
    /// The current event had a `data` line.
    has_data: bool,
    /// The current event's data (joined lines), when `kind` wants it.
    data: Vec<u8>,
    /// `data` is not the event's whole data (too large, or skipped before the name made it matter).
    data_incomplete: bool,

    usage: Usage,
    model: Option<String>,
    message_id: Option<String>,
    /// `message_delta.delta.stop_reason` (the last one seen).
    stop_reason: Option<String>,
    saw_message_start: bool,
    saw_message_stop: bool,
    error_type: Option<String>,
    events: u64,
    /// `message_start` came but its usage could not be read (not JSON, too large, no `usage` object).
    start_unparsed: bool,
    /// Bytes fed so far.
    fed: u64,
    /// Bytes fed up to and including the blank line that ended the last event (or comment block).
    complete: u64,
    /// Set by `dispatch`, read by `feed` to move `complete`.
    boundary: bool,
    /// An event's data was not JSON: `complete` stays before it from then on.
    corrupt: bool,
    /// `message_stop` was dispatched in this line; `complete` moves past it, then never again.
    stop_pending: bool,
    /// Nothing after `message_stop` is part of the message.
    ended: bool,
    /// Whether the first event with data had an `event:` line (None: no event yet).
    first_named: Option<bool>,
    /// A usage count could not be read as a whole number (see `Usage::has_unreadable_counts`).
    counts_unreadable: bool,
}

impl Default for SseTap {
    fn default() -> Self {
        Self::new()
    }
}

impl SseTap {
    /// A tap for a new stream.
    pub fn new() -> Self {
        SseTap {
            line: Vec::new(),
            line_truncated: false,
            pending_cr: false,
            at_stream_start: true,
            kind: Kind::Unnamed,
            has_data: false,
            data: Vec::new(),
            data_incomplete: false,
            usage: Usage::default(),
            model: None,
            message_id: None,
            stop_reason: None,
            saw_message_start: false,
            saw_message_stop: false,
            error_type: None,
            events: 0,
            start_unparsed: false,
            fed: 0,
            complete: 0,
            boundary: false,
            corrupt: false,
            stop_pending: false,
            ended: false,
            first_named: None,
            counts_unreadable: false,
        }
    }

    /// Feed the next chunk of bytes exactly as they pass to the client. Never fails; malformed input is skipped.
    pub fn feed(&mut self, chunk: &[u8]) {
        let base = self.fed;
        self.fed += chunk.len() as u64;
        let mut rest = chunk;
        if self.pending_cr {
            let Some((&first, tail)) = rest.split_first() else {
                return;
            };
            self.pending_cr = false;
            if first == b'\n' {
                rest = tail;
                if self.complete == base {
                    // The LF of the CRLF that ended the last event belongs to it.
                    self.complete = base + 1;
                }
            }
        }
        while !rest.is_empty() {
            let Some(end) = rest.iter().position(|&b| b == b'\n' || b == b'\r') else {
                self.buffer_partial(rest);
                return;
            };
            let (line, after) = rest.split_at(end);
            let (eol, after) = match after.split_first() {
                Some((&eol, after)) => (eol, after),
                None => (b'\n', after),
            };
            rest = after;
            if eol == b'\r' {
                match rest.split_first() {
                    Some((b'\n', after)) => rest = after,
                    Some(_) => {}
                    None => self.pending_cr = true,
                }
            }
            if self.ended || self.corrupt {
                // Nothing after message_stop or a corrupt event is read (or sent).
                return;
            }
            if self.line.is_empty() && !self.line_truncated {
                self.process_line(line, false);
            } else {
                self.buffer_partial(line);
                let buffered = std::mem::take(&mut self.line);
                let truncated = std::mem::replace(&mut self.line_truncated, false);
                self.process_line(&buffered, truncated);
                self.line = recycle(buffered);
            }
            if std::mem::take(&mut self.boundary) && !self.corrupt && !self.ended {
                self.complete = base + (chunk.len() - rest.len()) as u64;
                self.ended = std::mem::take(&mut self.stop_pending);
            }
        }
    }

    /// Bytes fed so far.
    pub fn fed(&self) -> u64 {
        self.fed
    }

    /// Bytes fed up to the end of the last complete event (its blank line included): what may go to
    /// a client without leaving it half an event if the stream dies now.
    pub fn complete_bytes(&self) -> u64 {
        self.complete
    }

    /// `message_start` was seen but its usage could not be read.
    pub fn usage_unparsed(&self) -> bool {
        self.start_unparsed
    }

    /// A usage count was present but not a whole number of tokens.
    pub fn counts_unreadable(&self) -> bool {
        self.counts_unreadable
    }

    /// An event's data was not JSON: the stream is corrupt from that event on
    /// ([`Self::complete_bytes`] stays before it).
    pub fn corrupt(&self) -> bool {
        self.corrupt
    }

    /// `message_stop` and its blank line were read: the message is whole and nothing after it
    /// belongs to it.
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// The first event carried an `event:` line (SDKs dispatch on the name).
    pub fn first_event_named(&self) -> bool {
        self.first_named == Some(true)
    }

    /// Usage so far: `message_start`'s, updated by each `message_delta` (whose values are cumulative).
    pub fn usage(&self) -> Usage {
        self.usage
    }

    /// `message_start.message.model`.
    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    /// `message_start.message.id`.
    pub fn message_id(&self) -> Option<&str> {
        self.message_id.as_deref()
    }

    /// `message_delta.delta.stop_reason` (`end_turn`, `max_tokens`, `tool_use`, …).
    pub fn stop_reason(&self) -> Option<&str> {
        self.stop_reason.as_deref()
    }

    /// A `message_start` event was dispatched.
    pub fn saw_message_start(&self) -> bool {
        self.saw_message_start
    }

    /// A `message_stop` event was dispatched: the message is complete.
    pub fn saw_message_stop(&self) -> bool {
        self.saw_message_stop
    }

    /// The `error.type` of the last `event: error` (e.g. `"overloaded_error"`); `"api_error"` if
    /// that event's data had none.
    pub fn error_type(&self) -> Option<&str> {
        self.error_type.as_deref()
    }

    /// Complete events seen (of any name, including ones not parsed).
    pub fn events(&self) -> u64 {
        self.events
    }

    /// At least one full event was parsed (used to hold the response head until the first event).
    pub fn first_event_complete(&self) -> bool {
        self.events > 0
    }

    /// Appends part of an incomplete line to `line`, up to the cap.
    fn buffer_partial(&mut self, bytes: &[u8]) {
        let room = MAX_EVENT_BYTES.saturating_sub(self.line.len());
        if bytes.len() > room {
            self.line_truncated = true;
            self.line.extend_from_slice(bytes.get(..room).unwrap_or_default());
        } else {
            self.line.extend_from_slice(bytes);
        }
    }

    /// Handles one complete line (without its line end). `truncated`: bytes past the cap were lost.
    fn process_line(&mut self, mut line: &[u8], truncated: bool) {
        if self.at_stream_start {
            self.at_stream_start = false;
            line = line.strip_prefix(BOM).unwrap_or(line);
        }
        if line.is_empty() {
            self.dispatch();
            return;
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(0) => return, // comment
            Some(colon) => {
                let (field, value) = line.split_at(colon);
                let value = value.get(1..).unwrap_or_default();
                (field, value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &b""[..]),
        };
        match field {
            b"event" => self.kind = Kind::of_name(value),
            b"data" => self.push_data(value, truncated),
            _ => {} // id, retry, unknown fields
        }
    }

    fn push_data(&mut self, value: &[u8], truncated: bool) {
        let joined = std::mem::replace(&mut self.has_data, true);
        if self.data_incomplete {
            return;
        }
        // Every event's data is kept (within MAX_EVENT_BYTES): it is checked to be JSON, so that
        // garbage never reaches a client.
        let len = self.data.len() + value.len() + usize::from(joined);
        if truncated || len > MAX_EVENT_BYTES {
            self.data_incomplete = true;
            self.data = recycle(std::mem::take(&mut self.data));
            return;
        }
        if joined {
            self.data.push(b'\n');
        }
        self.data.extend_from_slice(value);
    }

    /// The end of an event (an empty line).
    fn dispatch(&mut self) {
        self.boundary = true;
        if self.has_data {
            if self.first_named.is_none() {
                self.first_named = Some(self.kind != Kind::Unnamed);
            }
            self.events = self.events.saturating_add(1);
            let data = std::mem::take(&mut self.data);
            let complete = !self.data_incomplete;
            match self.kind {
                Kind::Unnamed if complete => match sniff_type(&data) {
                    Some(name) => self.handle_event(Kind::of_name(name), complete, &data),
                    None => {
                        // `type` is not the first key (or is escaped): parse it all.
                        match serde_json::from_slice::<Value>(&data) {
                            Ok(value) => {
                                let name = value.get("type").and_then(Value::as_str).unwrap_or_default();
                                match Kind::of_name(name.as_bytes()) {
                                    Kind::Unnamed => {}
                                    kind => self.handle_value(kind, Some(&value)),
                                }
                            }
                            Err(_) => self.corrupt = true,
                        }
                    }
                },
                Kind::Unnamed => {} // nameless and too large to tell what it was
                kind => self.handle_event(kind, complete, &data),
            }
            self.data = recycle(data);
        }
        self.kind = Kind::Unnamed;
        self.has_data = false;
        self.data.clear();
        self.data_incomplete = false;
    }

    /// Handles an event of a known kind from its raw data.
    fn handle_event(&mut self, kind: Kind, complete: bool, data: &[u8]) {
        let value = match kind {
            Kind::MessageStart | Kind::MessageDelta | Kind::Error if complete => {
                match serde_json::from_slice::<Value>(data) {
                    Ok(v) => Some(v),
                    Err(_) => {
                        self.corrupt = true;
                        None
                    }
                }
            }
            Kind::Unnamed | Kind::Other | Kind::MessageStop => {
                // Not read for usage, but it must be JSON.
                if complete && serde_json::from_slice::<serde::de::IgnoredAny>(data).is_err() {
                    self.corrupt = true;
                    return;
                }
                if kind != Kind::MessageStop {
                    return;
                }
                None
            }
            _ => None,
        };
        self.handle_value(kind, value.as_ref());
    }

    /// Handles an event of a known kind from its parsed data (`None`: unparseable or dropped).
    fn handle_value(&mut self, kind: Kind, value: Option<&Value>) {
        match kind {
            Kind::MessageStart => {
                self.saw_message_start = true;
                let Some(message) = value.and_then(|v| v.get("message")) else {
                    self.start_unparsed = true;
                    return;
                };
                match message.get("usage") {
                    Some(u) if u.is_object() => {
                        self.counts_unreadable |= Usage::has_unreadable_counts(u);
                        self.usage = Usage::from_json(u);
                    }
                    _ => {
                        self.start_unparsed = true;
                        self.usage = Usage::default();
                    }
                }
                let string = |key: &str| message.get(key).and_then(Value::as_str).map(str::to_owned);
                self.model = string("model");
                self.message_id = string("id");
            }
            Kind::MessageDelta => {
                if let Some(r) = value
                    .and_then(|v| v.pointer("/delta/stop_reason"))
                    .and_then(Value::as_str)
                {
                    self.stop_reason = Some(r.to_owned());
                }
                if let Some(usage) = value.and_then(|v| v.get("usage")) {
                    self.counts_unreadable |= Usage::has_unreadable_counts(usage);
                    self.usage.merge_delta(usage);
                }
            }
            Kind::MessageStop => {
                self.saw_message_stop = true;
                self.stop_pending = true;
            }
            Kind::Error => {
                let error_type = value
                    .and_then(|v| v.pointer("/error/type"))
                    .and_then(Value::as_str)
                    .unwrap_or(UNKNOWN_ERROR_TYPE);
                self.error_type = Some(error_type.to_owned());
            }
            Kind::Unnamed | Kind::Other => {}
        }
    }
}

/// Keeps a buffer's allocation for reuse unless it grew large.
fn recycle(mut buf: Vec<u8>) -> Vec<u8> {
    if buf.capacity() > RETAIN_CAPACITY {
        return Vec::new();
    }
    buf.clear();
    buf
}

fn skip_json_ws(s: &[u8]) -> &[u8] {
    let start = s
        .iter()
        .position(|&b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
        .unwrap_or(s.len());
    s.get(start..).unwrap_or_default()
}

/// The value of `type` when it is the first key of the JSON object `data` (`{"type":"NAME"`,
/// whitespace allowed) and has no escapes; `None` otherwise.
fn sniff_type(data: &[u8]) -> Option<&[u8]> {
    let rest = skip_json_ws(data).strip_prefix(b"{")?;
    let rest = skip_json_ws(rest).strip_prefix(b"\"type\"")?;
    let rest = skip_json_ws(rest).strip_prefix(b":")?;
    let rest = skip_json_ws(rest).strip_prefix(b"\"")?;
    let end = rest.iter().position(|&b| b == b'"' || b == b'\\')?;
    let (name, after) = rest.split_at(end);
    (after.first() == Some(&b'"')).then_some(name)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
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
        tap.feed(
            b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"rate_limit_error\",\"message\":\"x\"}}\n",
        );
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
        tap.feed(
            b"data: {\"message\":{\"model\":\"m\",\"usage\":{\"input_tokens\":2}},\"type\":\"message_start\"}\n\n",
        );
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
        tap.feed(
            b"event: message_delta\ndata: {\"usage\":{\"output_tokens\":77}}\n\nevent: message_stop\ndata: {}\n\n",
        );
        assert_eq!(tap.usage().output_tokens, 77);
        assert_eq!(tap.usage().input_tokens, 0);
        assert!(tap.saw_message_stop());
        assert_eq!(tap.events(), 6);
    }

    #[test]
    fn garbage_data_marks_the_stream_corrupt_and_nothing_after_message_stop_counts() {
        let mut tap = SseTap::new();
        let good =
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"delta\":{\"text\":\"abc\"}}\n\n";
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
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
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
