//! The one `relay::request` log line per client request.
//!
//! A [`RequestLog`] is shared (`Arc`) by the request handler and every attempt of the
//! request; each attempt adds what its usage record says when it is recorded. The line
//! is written when the last holder lets go: after the answer's head for a request that
//! failed or was refused, at the end of the body (or when the client went away) for a
//! streamed or buffered answer. Nothing secret and no bodies: ids, names, counts.

use std::sync::{Arc, Mutex};
use std::time::Instant;

/// The log target operators filter on.
pub const TARGET: &str = "relay::request";

/// What one request did, filled in as it goes.
#[derive(Default)]
struct State {
    key_name: String,
    group: String,
    model: String,
    stream: bool,
    accounts: Vec<String>,
    attempts: u32,
    status: u16,
    ttfb_ms: Option<u64>,
    input_tokens: u64,
    output_tokens: u64,
    cache_read_tokens: u64,
    cache_write_tokens: u64,
    cost_pico_usd: u64,
    error_type: String,
    /// The client went away before the answer was complete.
    cancelled: bool,
    success_sample: f64,
}

impl State {
    /// What the request came to, in the request log's words: "ok", "cancelled", the error
    /// type, or "http_<status>".
    fn outcome(&self) -> String {
        if self.cancelled {
            "cancelled".into()
        } else if !self.error_type.is_empty() {
            self.error_type.clone()
        } else if self.status >= 400 || self.status == 0 {
            format!("http_{}", self.status)
        } else {
            "ok".into()
        }
    }
}

/// The request's log line in the making. Written once, on drop.
pub struct RequestLog {
    request_id: String,
    client_request_id: String,
    trace_id: Option<String>,
    route: &'static str,
    started: Instant,
    state: Mutex<State>,
}

impl RequestLog {
    pub fn new(
        request_id: &str,
        client_request_id: Option<&str>,
        trace_id: Option<String>,
        route: &'static str,
        started: Instant,
    ) -> Arc<Self> {
        Arc::new(Self {
            request_id: request_id.to_string(),
            client_request_id: client_request_id.unwrap_or("").to_string(),
            trace_id,
            route,
            started,
            state: Mutex::new(State {
                success_sample: 1.0,
                ..State::default()
            }),
        })
    }

    fn with(&self, f: impl FnOnce(&mut State)) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut s);
    }

    /// Who asked for what (known once the key is admitted and the body read).
    pub fn admitted(&self, key_name: &str, group: &str, model: &str, stream: bool, success_sample: f64) {
        self.with(|s| {
            s.key_name = key_name.to_string();
            s.group = group.to_string();
            s.model = model.to_string();
            s.stream = stream;
            s.success_sample = success_sample;
        });
    }

    /// One attempt's usage record.
    pub fn attempt(&self, account: &str, ttfb_ms: u64, ok: bool, event: &relay_proto::v1::UsageEvent) {
        self.with(|s| {
            s.attempts += 1;
            if !s.accounts.iter().any(|a| a == account) {
                s.accounts.push(account.to_string());
            }
            if ok && s.ttfb_ms.is_none() {
                s.ttfb_ms = Some(ttfb_ms);
            }
            s.input_tokens += event.input_tokens;
            s.output_tokens += event.output_tokens;
            s.cache_read_tokens += event.cache_read_tokens;
            s.cache_write_tokens += event.cache_write_5m_tokens + event.cache_write_1h_tokens;
            s.cost_pico_usd += event.cost_pico_usd;
            s.cancelled |= event.cancelled;
            // The last attempt's error type stands (a success clears an earlier failure's),
            // except that a failure without a type does not hide an earlier one's.
            if ok || s.error_type.is_empty() || !event.error_type.is_empty() {
                s.error_type = event.error_type.clone();
            }
        });
    }

    /// What a capture rule decides on when the answer ends: the accounts tried (names) and
    /// whether the request ended in an error (an error type, or a status of 400 and above).
    pub fn settled(&self) -> (Vec<String>, bool) {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        (s.accounts.clone(), !s.error_type.is_empty() || s.status >= 400)
    }

    /// The status the client got, and relay's own error type when relay answered with an error.
    pub fn answered(&self, status: u16, error_type: Option<&str>) {
        self.with(|s| {
            s.status = status;
            if let Some(t) = error_type {
                s.error_type = t.to_string();
            }
        });
    }
}

impl Drop for RequestLog {
    fn drop(&mut self) {
        // Health checks and scrapes are not client requests.
        if self.route == "ops" {
            return;
        }
        let s = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        let outcome = s.outcome();
        // Only a complete success may be sampled away: a cancelled stream was answered 200 but
        // is what an operator looks for when a client complains.
        if outcome == "ok" && s.success_sample < 1.0 && rand::random::<f64>() >= s.success_sample {
            return;
        }
        let duration_ms = self.started.elapsed().as_millis() as u64;
        let cost_usd = s.cost_pico_usd as f64 / 1e12;
        tracing::info!(
            target: TARGET,
            request_id = %self.request_id,
            client_request_id = %self.client_request_id,
            trace_id = self.trace_id.as_deref().unwrap_or(""),
            route = self.route,
            key_name = %s.key_name,
            group = %s.group,
            accounts = %s.accounts.join(","),
            model = %s.model,
            stream = s.stream,
            status = s.status,
            attempts = s.attempts,
            ttfb_ms = s.ttfb_ms.unwrap_or(0),
            duration_ms,
            input_tokens = s.input_tokens,
            output_tokens = s.output_tokens,
            cache_read_tokens = s.cache_read_tokens,
            cache_write_tokens = s.cache_write_tokens,
            cost_usd,
            error_type = %s.error_type,
            outcome = %outcome,
            "request"
        );
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use relay_proto::v1::UsageEvent;
    use std::io::Write;

    /// Collects what the JSON formatter writes.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The `relay::request` lines written while `f` runs, as JSON.
    fn lines(f: impl FnOnce()) -> Vec<serde_json::Value> {
        let sink = Sink::default();
        let w = sink.clone();
        let sub = tracing_subscriber::fmt()
            .json()
            .with_writer(move || w.clone())
            .with_max_level(tracing::Level::INFO)
            .finish();
        tracing::subscriber::with_default(sub, f);
        let out = sink.0.lock().unwrap().clone();
        String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|l| l["target"] == TARGET)
            .collect()
    }

    fn request(sample: f64, status: u16, event: UsageEvent) {
        let log = RequestLog::new("req_1", Some("client-1"), None, "messages", Instant::now());
        log.admitted("k", "g", "claude-sonnet-4-5", true, sample);
        log.attempt("acct", 5, event.error_type.is_empty(), &event);
        log.answered(status, None);
    }

    #[test]
    fn a_cancelled_stream_is_always_logged_and_says_so() {
        let cancelled = UsageEvent {
            cancelled: true,
            output_tokens: 3,
            ..Default::default()
        };
        let got = lines(|| request(0.0, 200, cancelled));
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0]["fields"]["status"], 200);
        assert_eq!(got[0]["fields"]["outcome"], "cancelled");
        assert_eq!(got[0]["fields"]["output_tokens"], 3);
    }

    #[test]
    fn successes_follow_the_sample_and_failures_do_not() {
        assert!(lines(|| request(0.0, 200, UsageEvent::default())).is_empty());
        let all = lines(|| request(1.0, 200, UsageEvent::default()));
        assert_eq!(all.len(), 1);
        assert_eq!(all[0]["fields"]["outcome"], "ok");
        let failed = UsageEvent {
            error_type: "overloaded_error".into(),
            ..Default::default()
        };
        let got = lines(|| request(0.0, 529, failed));
        assert_eq!(got[0]["fields"]["outcome"], "overloaded_error");
        let got = lines(|| request(0.0, 502, UsageEvent::default()));
        assert_eq!(got[0]["fields"]["outcome"], "http_502");
    }
}
