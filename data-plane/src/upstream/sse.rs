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
//! multi-byte characters anywhere. `message_start` and `message_delta` are read typed and
//! borrowed with serde (only the fields accounting needs; odd shapes, such as a duplicate key or
//! a number where an object belongs, fall back to a `serde_json::Value` reading, the reference
//! the typed one matches), `error` as a `Value`; every other event's data is only checked to be
//! JSON (no allocation): one that is not makes the stream corrupt ([`SseTap::corrupt`]) and
//! nothing after it counts, nor anything after `message_stop` ([`SseTap::ended`]).
//! [`SseTap::complete_bytes`] says where the last whole event ends, so a relay can pass on whole
//! events only. The event is chosen by its `event:` name, or, for a nameless event, by a cheap look at the `{"type":"…"` prefix of its data
//! (a full parse only if `type` is not the first key).
//!
//! An event whose data exceeds [`MAX_EVENT_BYTES`] is counted but its data is dropped rather than
//! buffered (so a misbehaving upstream cannot make the tap grow without bound).

use std::borrow::Cow;

use relay_proto::anthropic::ApiError;
use serde::Deserialize;
use serde_json::Value;

use super::usage::{Object, Usage, UsageReport};

/// `message_start`'s data, as far as the tap reads it.
#[derive(Deserialize, Default)]
#[serde(default)]
struct StartData<'a> {
    #[serde(borrow)]
    message: Option<Object<StartMessage<'a>>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct StartMessage<'a> {
    usage: Option<UsageReport>,
    #[serde(borrow)]
    model: Option<Cow<'a, str>>,
    #[serde(borrow)]
    id: Option<Cow<'a, str>>,
}

/// `message_delta`'s data, as far as the tap reads it.
#[derive(Deserialize, Default)]
#[serde(default)]
struct DeltaData<'a> {
    #[serde(borrow)]
    delta: Option<Object<Delta<'a>>>,
    usage: Option<UsageReport>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Delta<'a> {
    #[serde(borrow)]
    stop_reason: Option<Cow<'a, str>>,
}

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
            // memchr2: SIMD, not a byte-by-byte loop (an event's bytes are all scanned here).
            let Some(end) = memchr::memchr2(b'\n', b'\r', rest) else {
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
            Kind::MessageStart | Kind::MessageDelta if complete => {
                if self.handle_typed(kind, data) {
                    return;
                }
                // Odd input the typed reading leaves to `Value` (or not JSON at all).
                match serde_json::from_slice::<Value>(data) {
                    Ok(v) => Some(v),
                    Err(_) => {
                        self.corrupt = true;
                        None
                    }
                }
            }
            Kind::Error if complete => match serde_json::from_slice::<Value>(data) {
                Ok(v) => Some(v),
                Err(_) => {
                    self.corrupt = true;
                    None
                }
            },
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

    /// `message_start` and `message_delta` read typed and borrowed (no `Value`), for the shapes
    /// the API sends: `message` an object, `usage` and `delta` objects or null, strings where
    /// strings belong, no duplicate keys. False (nothing changed) for anything else, which
    /// [`Self::handle_value`] reads the same way it always did.
    fn handle_typed(&mut self, kind: Kind, data: &[u8]) -> bool {
        match kind {
            Kind::MessageStart => {
                let Ok(Object(start)) = serde_json::from_slice::<Object<StartData<'_>>>(data) else {
                    return false;
                };
                let Some(Object(message)) = start.message else {
                    // Missing and null differ in the `Value` reading.
                    return false;
                };
                self.saw_message_start = true;
                match message.usage {
                    Some(u) => {
                        self.counts_unreadable |= u.has_unreadable();
                        self.usage = Usage::from_report(&u);
                    }
                    None => {
                        self.start_unparsed = true;
                        self.usage = Usage::default();
                    }
                }
                self.model = message.model.map(Cow::into_owned);
                self.message_id = message.id.map(Cow::into_owned);
                true
            }
            Kind::MessageDelta => {
                let Ok(Object(delta)) = serde_json::from_slice::<Object<DeltaData<'_>>>(data) else {
                    return false;
                };
                if let Some(r) = delta.delta.and_then(|Object(d)| d.stop_reason) {
                    self.stop_reason = Some(r.into_owned());
                }
                if let Some(u) = delta.usage {
                    self.counts_unreadable |= u.has_unreadable();
                    self.usage.merge(&u);
                }
                true
            }
            _ => false,
        }
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
                let error = value.and_then(ApiError::from_value);
                let error_type = error.as_ref().and_then(ApiError::kind).unwrap_or(UNKNOWN_ERROR_TYPE);
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
#[path = "sse_tests.rs"]
mod tests;
