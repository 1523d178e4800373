//! The response body: a fixed list of frames yielded one at a time (one SSE event per frame), with optional
//! delays, and an ending (clean, connection abort, or stall forever). Optionally copies what it yields into a
//! per-response buffer so tests can read the exact bytes sent.

use std::future::Future as _;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::time::Sleep;

/// How the body ends once its frames are exhausted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    /// End of body.
    Finish,
    /// Yield an error: hyper aborts the connection (or resets the h2 stream).
    Abort,
    /// Never yield anything again.
    Stall,
}

/// The error a body yields to abort its connection.
#[derive(Debug, thiserror::Error)]
#[error("mock upstream: connection dropped mid-stream on purpose")]
pub(crate) struct DroppedOnPurpose;

/// How long an aborting body waits, after its last frame, before it fails.
const ABORT_GRACE: Duration = Duration::from_millis(25);

pub(crate) type Sink = Arc<Mutex<Vec<u8>>>;

pub(crate) struct MockBody {
    frames: std::vec::IntoIter<Bytes>,
    ending: Ending,
    first_delay: Duration,
    delay: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    /// Whether the delay before the next frame has already been waited.
    waited: bool,
    yielded_any: bool,
    done: bool,
    exact_len: Option<u64>,
    sink: Option<Sink>,
    /// Counts this response as in flight until the body is done or dropped.
    in_flight: Option<crate::server::InFlight>,
}

impl MockBody {
    /// One complete chunk, with an exact length (so HTTP/1.1 uses `content-length`).
    pub(crate) fn full(bytes: Bytes) -> MockBody {
        let len = bytes.len() as u64;
        let mut body = MockBody::frames(vec![bytes], Ending::Finish, Duration::ZERO, Duration::ZERO);
        body.exact_len = Some(len);
        body
    }

    /// Frames yielded one per poll, `first_delay` before the first, `delay` before each later one.
    pub(crate) fn frames(frames: Vec<Bytes>, ending: Ending, first_delay: Duration, delay: Duration) -> MockBody {
        MockBody {
            frames: frames.into_iter(),
            ending,
            first_delay,
            delay,
            sleep: None,
            waited: false,
            yielded_any: false,
            done: false,
            exact_len: None,
            sink: None,
            in_flight: None,
        }
    }

    pub(crate) fn hold(&mut self, g: crate::server::InFlight) {
        self.in_flight = Some(g);
    }

    pub(crate) fn with_sink(mut self, sink: Option<Sink>) -> MockBody {
        self.sink = sink;
        self
    }

    fn record(&self, bytes: &Bytes) {
        if let Some(sink) = &self.sink {
            sink.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(bytes);
        }
    }
}

impl http_body::Body for MockBody {
    type Data = Bytes;
    type Error = DroppedOnPurpose;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        if this.frames.len() == 0 {
            return match this.ending {
                Ending::Finish => {
                    this.done = true;
                    Poll::Ready(None)
                }
                Ending::Abort => {
                    // Give the connection a moment to flush what was yielded (headers included) before the
                    // abort: hyper discards buffered bytes and h2 drops queued frames on reset.
                    let sleep = this
                        .sleep
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(ABORT_GRACE)));
                    if sleep.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    this.sleep = None;
                    this.done = true;
                    Poll::Ready(Some(Err(DroppedOnPurpose)))
                }
                Ending::Stall => Poll::Pending,
            };
        }
        if !this.waited {
            let delay = if this.yielded_any { this.delay } else { this.first_delay };
            if !delay.is_zero() {
                let sleep = this.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep(delay)));
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.sleep = None;
            }
            this.waited = true;
        }
        match this.frames.next() {
            Some(bytes) => {
                this.waited = false;
                this.yielded_any = true;
                this.record(&bytes);
                Poll::Ready(Some(Ok(Frame::data(bytes))))
            }
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || (self.frames.len() == 0 && self.ending == Ending::Finish)
    }

    fn size_hint(&self) -> SizeHint {
        match self.exact_len {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}
