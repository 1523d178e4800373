//! Tapped-body stage: the streamed answer passed to the client frame by frame, only whole
//! events, with frames already arrived coalesced into one write, the usage tapped on the side
//! and exactly one usage event recorded when the body ends, fails, stalls or is dropped because
//! the client went away. It also holds the attempt's concurrency slot, so the slot is released
//! however the request ends.

use super::balance::SlotGuard;
use super::health::Outcome;
use super::sink::HealthSink;
use super::usage::{record, Attempt, Tap};
use crate::errors::{sse_error_event, Body, BoxError};
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame};
use http_body_util::BodyExt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// Timeouts that apply while a body streams.
#[derive(Debug, Clone, Copy)]
pub struct BodyTimeouts {
    pub idle: Duration,
    pub total_deadline: tokio::time::Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome2 {
    Complete,
    /// The upstream failed or stalled after the head went out.
    UpstreamFailed,
    /// The stream ended cleanly, but before `message_stop` (and with no error event).
    Truncated,
    Cancelled,
}

/// A streamed response body passed through frame by frame, recording usage once.
///
/// Only whole events reach the client: bytes after the last complete event (by the tap's count)
/// are held until the event ends, so a stream that dies inside an event is followed by relay's
/// `event: error` on a clean event boundary, never glued onto half an event. An event larger than
/// [`MAX_HELD_BYTES`] is passed on in pieces (memory stays bounded).
pub struct TappedBody<B = relay_net::client::UpstreamBody> {
    inner: B,
    prefix: Option<Bytes>,
    tap: Tap,
    attempt: Option<Attempt>,
    health: HealthSink,
    ttfb_ms: Option<u64>,
    slot: Option<SlotGuard>,
    timeouts: BodyTimeouts,
    idle: Pin<Box<tokio::time::Sleep>>,
    /// Bytes to send last, before ending (relay's error event, or a successful stream's tail).
    trailer_event: Option<Bytes>,
    /// What the upstream body said while frames were being coalesced.
    deferred: Option<Deferred>,
    /// Bytes read but held for a scheduler turn (see `coalesce`).
    held: Option<Held>,
    /// Consecutive turns that brought no new chunk while holding.
    idle_turns: u8,
    /// Whether arrived bytes are held across scheduler turns for more to merge (see `coalesce`):
    /// not when `inner` hands over all that has arrived in one poll.
    hold: bool,
    /// Bytes fed to the tap but not yet sent: the start of an event not complete yet.
    tail: bytes::BytesMut,
    /// Bytes sent to the client so far.
    sent: u64,
    done: bool,
    /// Events the tap had counted when bytes last arrived, when the last new one arrived, and
    /// the longest gap between two arrivals (ms): the usage row's gap summary.
    events_seen: u64,
    last_event_at: Option<Instant>,
    max_event_gap_ms: u64,
}

/// What `coalesce` holds across a scheduler turn: one chunk as it came, or chunks merged so
/// far, kept growable so that each turn appends to it (not copied again every turn).
enum Held {
    Chunk(Bytes),
    Merged(bytes::BytesMut),
}

impl Held {
    fn len(&self) -> usize {
        match self {
            Held::Chunk(b) => b.len(),
            Held::Merged(m) => m.len(),
        }
    }

    fn append(self, more: &[u8]) -> Held {
        match self {
            Held::Chunk(first) => {
                let mut m = bytes::BytesMut::with_capacity((first.len() + more.len()) * 2);
                m.extend_from_slice(&first);
                m.extend_from_slice(more);
                Held::Merged(m)
            }
            Held::Merged(mut m) => {
                m.extend_from_slice(more);
                Held::Merged(m)
            }
        }
    }

    fn freeze(self) -> Bytes {
        match self {
            Held::Chunk(b) => b,
            Held::Merged(m) => m.freeze(),
        }
    }
}

enum Deferred {
    Error(BoxError),
    End,
}

/// Frames already arrived are merged into one write up to this size.
const COALESCE_BYTES: usize = 64 * 1024;
/// Scheduler turns without a new chunk after which held bytes are sent (the
/// connection task needs two turns to hand over its next chunk).
const IDLE_TURNS: u8 = 2;
/// The most bytes of an incomplete event held back; a larger event is passed on as it comes.
pub const MAX_HELD_BYTES: usize = crate::upstream::sse::MAX_EVENT_BYTES;

impl<B> TappedBody<B> {
    /// `prefix` holds bytes already read from `inner` (and already fed to `tap`).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        inner: B,
        prefix: Option<Bytes>,
        tap: Tap,
        attempt: Attempt,
        health: HealthSink,
        slot: Option<SlotGuard>,
        timeouts: BodyTimeouts,
        ttfb_ms: Option<u64>,
    ) -> Self {
        let idle = Box::pin(tokio::time::sleep(
            timeouts.idle.min(remaining(timeouts.total_deadline)),
        ));
        let mut body = Self {
            inner,
            prefix: None,
            tap,
            attempt: Some(attempt),
            health,
            ttfb_ms,
            slot,
            timeouts,
            idle,
            trailer_event: None,
            deferred: None,
            held: None,
            idle_turns: 0,
            hold: true,
            tail: bytes::BytesMut::new(),
            sent: 0,
            done: false,
            events_seen: 0,
            last_event_at: None,
            max_event_gap_ms: 0,
        };
        body.prefix = prefix.and_then(|p| body.release(p));
        body
    }

    /// Whether arrived bytes wait for more (`coalesce`): set false for a body whose every poll
    /// hands over all that has arrived (relay's own HTTP/1.1 upstream body), where waiting
    /// cannot merge anything.
    pub fn hold_for_more(mut self, hold: bool) -> Self {
        self.hold = hold;
        self
    }

    /// The part of `data` (already fed to the tap) that completes events, with whatever was held
    /// before it; the rest is held. None: nothing to send yet.
    fn release(&mut self, data: Bytes) -> Option<Bytes> {
        let Tap::Sse(t) = &self.tap else {
            self.sent += data.len() as u64;
            return (!data.is_empty()).then_some(data);
        };
        // New events arrived with these bytes: the gap since the previous ones.
        if t.events() > self.events_seen {
            let now = Instant::now();
            if let Some(last) = self.last_event_at {
                let gap = now.saturating_duration_since(last).as_millis() as u64;
                self.max_event_gap_ms = self.max_event_gap_ms.max(gap);
            }
            self.last_event_at = Some(now);
            self.events_seen = t.events();
        }
        let complete = t.complete_bytes();
        let fed = t.fed();
        // Everything fed is either sent, held in `tail`, or in `data`; an event too large to hold
        // is let through as it is.
        let upto = if fed.saturating_sub(complete) as usize > MAX_HELD_BYTES {
            fed
        } else {
            complete
        };
        let n = usize::try_from(upto.saturating_sub(self.sent)).unwrap_or(usize::MAX);
        let out = if self.tail.is_empty() {
            if n >= data.len() {
                data
            } else {
                self.tail.extend_from_slice(&data[n..]);
                data.slice(..n)
            }
        } else {
            self.tail.extend_from_slice(&data);
            self.tail.split_to(n.min(self.tail.len())).freeze()
        };
        self.sent += out.len() as u64;
        (!out.is_empty()).then_some(out)
    }

    /// The upstream body ended cleanly: a stream without `message_stop` (and without an error
    /// event) is a failure. Returns what to send last: relay's error event, or the tail.
    fn end(&mut self) -> Option<Bytes> {
        self.done = true;
        let truncated = match &self.tap {
            Tap::Sse(t) => !t.saw_message_stop() && t.error_type().is_none(),
            Tap::Buffer(..) => false,
        };
        if truncated {
            metrics::counter!(relay_proto::metrics::UPSTREAM_STREAM_ERRORS_TOTAL, "kind" => "truncated").increment(1);
            self.finish(Outcome2::Truncated);
            self.tail.clear();
            return Some(self.after_partial(sse_error_event("upstream stream ended before message_stop")));
        }
        self.finish(Outcome2::Complete);
        let tail = self.tail.split().freeze();
        match &self.tap {
            // After message_stop nothing belongs to the message; a stream without SSE framing
            // keeps its last bytes.
            Tap::Sse(_) => None,
            Tap::Buffer(..) => (!tail.is_empty()).then_some(tail),
        }
    }

    /// What the tap says of the stream now: corrupt (an event that is not JSON) or ended
    /// (message_stop read): either way the stream ends here, without reading further.
    fn settled(&self) -> Option<bool> {
        match &self.tap {
            Tap::Sse(t) if t.corrupt() => Some(false),
            Tap::Sse(t) if t.ended() => Some(true),
            _ => None,
        }
    }

    /// The bytes that end a stream that stops here: relay's error event when it failed (after a
    /// blank line if part of an oversized event went out), nothing when it ended at message_stop.
    fn close_now(&mut self, ok: bool) -> Option<Bytes> {
        if ok {
            return self.end();
        }
        metrics::counter!(relay_proto::metrics::UPSTREAM_STREAM_ERRORS_TOTAL, "kind" => "corrupt").increment(1);
        Some(self.fail("the upstream sent an event that is not valid JSON"))
    }

    fn finish(&mut self, outcome: Outcome2) {
        let Some(a) = self.attempt.take() else { return };
        let mut r = self.tap.recorded(a.status);
        if let Tap::Sse(t) = &self.tap {
            // A stream that ended without a message_start billed nothing it could read.
            r.unparsed |= !t.saw_message_start();
        }
        if r.error_type.is_empty() && matches!(outcome, Outcome2::UpstreamFailed | Outcome2::Truncated) {
            r.error_type = "api_error".to_string();
        }
        r.cancelled = outcome == Outcome2::Cancelled;
        r.error_message = match outcome {
            Outcome2::UpstreamFailed => "the upstream stream failed or stalled after it started".into(),
            Outcome2::Truncated => "the upstream stream ended before message_stop".into(),
            Outcome2::Complete | Outcome2::Cancelled => String::new(),
        };
        r.stream_events = self.events_seen;
        r.max_event_gap_ms = self.max_event_gap_ms;
        // The account's health: a stream that failed after its head counts against it.
        match outcome {
            Outcome2::UpstreamFailed => {
                self.health.observe(&a.account.id, &a.model, &Outcome::ConnectError);
            }
            Outcome2::Truncated => {
                self.health.observe(
                    &a.account.id,
                    &a.model,
                    &Outcome::Invalid {
                        what: "stream ended before message_stop",
                    },
                );
            }
            Outcome2::Complete if r.error_type == "overloaded_error" => {
                self.health.observe(
                    &a.account.id,
                    &a.model,
                    &Outcome::StreamError {
                        error_type: &r.error_type,
                    },
                );
            }
            _ => {}
        }
        let ttfb = self.ttfb_ms.unwrap_or(0);
        record(a, r, ttfb);
        // Release the concurrency slot now rather than when the body is dropped.
        self.slot = None;
    }

    /// The stream failed after its head: relay's error event on an event boundary (what was held
    /// of an incomplete event is dropped).
    fn fail(&mut self, message: &str) -> Bytes {
        self.finish(Outcome2::UpstreamFailed);
        self.tail.clear();
        self.done = true;
        self.after_partial(sse_error_event(message))
    }

    /// `ev` after a blank line when part of an event larger than [`MAX_HELD_BYTES`] already went
    /// out: the error then arrives as its own event, not glued onto half of another.
    fn after_partial(&self, ev: Bytes) -> Bytes {
        match &self.tap {
            Tap::Sse(t) if self.sent > t.complete_bytes() => {
                let mut b = bytes::BytesMut::with_capacity(ev.len() + 2);
                b.extend_from_slice(b"\n\n");
                b.extend_from_slice(&ev);
                b.freeze()
            }
            _ => ev,
        }
    }
}

fn remaining(deadline: tokio::time::Instant) -> Duration {
    deadline.saturating_duration_since(tokio::time::Instant::now())
}

impl<B> TappedBody<B>
where
    B: HttpBody<Data = Bytes> + Send + Sync + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    pub fn boxed(self) -> Body {
        BodyExt::boxed(self)
    }

    /// Sends `data` (already fed to the tap) merged with whatever else the
    /// upstream connection has already delivered, up to [`COALESCE_BYTES`].
    ///
    /// hyper hands a response body over from the connection task one chunk at a
    /// time, so a burst of SSE events read with one `recv` would otherwise
    /// leave as one `writev` each. While chunks keep coming, the bytes are held
    /// across scheduler turns (the task yields) so the connection task can hand
    /// over its next chunk; after [`IDLE_TURNS`] turns that bring nothing new,
    /// what is held is sent. No byte waits for the network, only for tasks
    /// that are already runnable: a few microseconds when idle; on a busy
    /// worker at most until its next I/O poll (tokio wakes deferred tasks then,
    /// every `event_interval` = 61 polls), the same bound socket readiness has.
    fn coalesce(
        &mut self,
        cx: &mut Context<'_>,
        data: Held,
        fresh: bool,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut acc = data;
        let mut more = false;
        let mut pending = false;
        while self.hold && acc.len() < COALESCE_BYTES && !self.inner.is_end_stream() {
            match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(f))) => {
                    if let Ok(d) = f.into_data() {
                        self.tap.feed(&d);
                        acc = acc.append(&d);
                        more = true;
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    self.deferred = Some(Deferred::Error(e.into()));
                    break;
                }
                Poll::Ready(None) => {
                    self.deferred = Some(Deferred::End);
                    break;
                }
                Poll::Pending => {
                    pending = true;
                    break;
                }
            }
        }
        self.idle_turns = if fresh || more { 0 } else { self.idle_turns + 1 };
        if pending && self.idle_turns < IDLE_TURNS && acc.len() < COALESCE_BYTES {
            self.held = Some(acc);
            // tokio's yield: the wake-up is deferred until this worker has run
            // what is queued (the connection task just woken among them), and no
            // idle worker is signalled to steal this task back meanwhile.
            let mut turn = std::pin::pin!(tokio::task::yield_now());
            let _ = turn.as_mut().poll(cx);
            return Poll::Pending;
        }
        let out = self.release(acc.freeze());
        let ending = if let Some(ok) = self.settled() {
            // message_stop read, or an event that is not JSON: the stream ends here.
            Some(self.close_now(ok))
        } else if self.inner.is_end_stream() || matches!(self.deferred, Some(Deferred::End)) {
            // hyper may not poll again once the body says it has
            // ended: record now, not in Drop (which would mean "cancelled").
            Some(self.end())
        } else {
            None
        };
        if let Some(last) = ending {
            self.deferred = None;
            return match (out, last) {
                (Some(out), last) => {
                    self.trailer_event = last;
                    Poll::Ready(Some(Ok(Frame::data(out))))
                }
                (None, Some(last)) => Poll::Ready(Some(Ok(Frame::data(last)))),
                (None, None) => Poll::Ready(None),
            };
        }
        let next = self.timeouts.idle.min(remaining(self.timeouts.total_deadline));
        self.idle.as_mut().reset(tokio::time::Instant::now() + next);
        match out {
            Some(out) => Poll::Ready(Some(Ok(Frame::data(out)))),
            None => {
                // Nothing whole to send yet. When the upstream is pending its waker is set;
                // otherwise (an error or end was deferred) come back at once.
                if !pending {
                    cx.waker().wake_by_ref();
                }
                Poll::Pending
            }
        }
    }
}

impl<B> HttpBody for TappedBody<B>
where
    B: HttpBody<Data = Bytes> + Send + Sync + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(p) = this.prefix.take() {
            return Poll::Ready(Some(Ok(Frame::data(p))));
        }
        if let Some(ev) = this.trailer_event.take() {
            this.done = true;
            return Poll::Ready(Some(Ok(Frame::data(ev))));
        }
        if this.done {
            return Poll::Ready(None);
        }
        if let Some(held) = this.held.take() {
            return this.coalesce(cx, held, false);
        }
        if let Some(ok) = this.settled() {
            // Settled in bytes already sent (the held first event): do not wait for more.
            this.deferred = None;
            return match this.close_now(ok) {
                Some(last) => Poll::Ready(Some(Ok(Frame::data(last)))),
                None => Poll::Ready(None),
            };
        }
        let polled = match this.deferred.take() {
            Some(Deferred::Error(e)) => Poll::Ready(Some(Err(e))),
            Some(Deferred::End) => Poll::Ready(None),
            None => match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
                Poll::Ready(Some(Ok(f))) => Poll::Ready(Some(Ok(f))),
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
        };
        match polled {
            Poll::Pending => {
                if this.idle.as_mut().poll(cx).is_ready() {
                    // Stalled: end the stream (with an SSE error event when it is a stream).
                    metrics::counter!(relay_proto::metrics::UPSTREAM_STREAM_ERRORS_TOTAL, "kind" => "stalled")
                        .increment(1);
                    if matches!(this.tap, Tap::Sse(_)) {
                        let ev = this.fail("upstream stream stalled");
                        return Poll::Ready(Some(Ok(Frame::data(ev))));
                    }
                    this.finish(Outcome2::UpstreamFailed);
                    this.done = true;
                    return Poll::Ready(Some(Err("upstream stream stalled".into())));
                }
                Poll::Pending
            }
            Poll::Ready(Some(Ok(frame))) => {
                let data = match frame.into_data() {
                    Ok(d) => d,
                    // Not data (trailers): dropped; relay ends the body itself.
                    Err(_) => {
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                };
                if this.ttfb_ms.is_none() {
                    if let Some(a) = &this.attempt {
                        this.ttfb_ms = Some(a.started.elapsed().as_millis() as u64);
                    }
                }
                this.tap.feed(&data);
                this.coalesce(cx, Held::Chunk(data), true)
            }
            Poll::Ready(Some(Err(e))) => {
                metrics::counter!(relay_proto::metrics::UPSTREAM_STREAM_ERRORS_TOTAL, "kind" => "failed").increment(1);
                if matches!(this.tap, Tap::Sse(_)) {
                    // The client already has a 200 and events: tell it in-band, then end.
                    let ev = this.fail("upstream connection lost mid-stream");
                    return Poll::Ready(Some(Ok(Frame::data(ev))));
                }
                this.finish(Outcome2::UpstreamFailed);
                this.done = true;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => match this.end() {
                Some(last) => Poll::Ready(Some(Ok(Frame::data(last)))),
                None => Poll::Ready(None),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.prefix.is_none() && self.trailer_event.is_none()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        // relay frames what it sends (whole events, perhaps its own error event): never the
        // upstream's length.
        http_body::SizeHint::default()
    }
}

impl<B> Drop for TappedBody<B> {
    fn drop(&mut self) {
        // Dropped before the end: the client went away. Dropping `inner`
        // closes the upstream connection, which cancels the upstream request;
        // dropping the slot releases the account's concurrency slot.
        if self.attempt.is_some() {
            self.finish(Outcome2::Cancelled);
        }
    }
}

#[cfg(test)]
#[path = "body_tests.rs"]
mod tests;
