//! Outcome classification: what one attempt's [`Outcome`] (status, headers, error body, SSE error
//! event, connect error, head timeout, an answer that is not Anthropic's) means: a [`Verdict`] for
//! the request (may another account be tried? what `retry-after` to pass on?), a breaker event and
//! the new states the account calls for ([`Plan`]). Pure: no lock, no clock of its own.

use super::error_body::{clean_type, ErrorInfo};
use super::ratelimit::{rate_limited, unified_limit};
use super::settings::HealthSettings;
use super::{fmt_ms, ms};
use http::HeaderMap;
use relay_proto::anthropic::ratelimit::{retry_after, Unified};
use relay_proto::v1 as pb;
use std::time::Duration;

/// What one attempt's outcome means for the account.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome<'a> {
    /// The upstream answered with this status and headers; `body` is the (small) error body when
    /// status >= 400, or empty.
    Response {
        status: u16,
        headers: &'a HeaderMap,
        body: &'a [u8],
    },
    /// An SSE stream whose FIRST event was `event: error` with this error type (e.g. "overloaded_error").
    StreamError {
        error_type: &'a str,
    },
    ConnectError,
    /// The upstream answered, but not with an Anthropic answer (a 2xx that is not a message or an
    /// event stream, a 1xx/3xx/600+ status, a stream that ended before `message_stop`): an upstream
    /// fault, counted by the breaker like a broken connection.
    Invalid {
        what: &'a str,
    },
    /// No response head within the head timeout.
    Timeout,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// Whether another account may be tried for this request (connect/timeout/429/529/5xx/401/403/
    /// org-disabled: true; any other 4xx: false, the client's request is at fault).
    pub retry_elsewhere: bool,
    /// How long the client should wait before retrying, if the upstream said (retry-after), for the
    /// final error.
    pub retry_after: Option<Duration>,
}

/// A state an outcome calls for (before it is merged with what is known).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct NewState {
    pub(super) health: pb::AccountHealth,
    pub(super) scope: &'static str,
    /// 0 = until reset.
    pub(super) until_ms: i64,
    pub(super) reason: String,
}

#[derive(Debug, Clone, PartialEq)]
pub(super) enum BreakerEvent {
    /// The outcome says nothing about reachability (e.g. an SSE error after a 200 head).
    Nothing,
    /// The upstream answered.
    Success,
    /// 5xx (not 529), timeout, connect error; the text says which.
    Failure(String),
}

/// Everything an outcome implies, computed without any lock held.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Plan {
    pub(super) verdict: Verdict,
    pub(super) breaker: BreakerEvent,
    pub(super) states: [Option<NewState>; 2],
}

impl Plan {
    pub(super) fn new(retry_elsewhere: bool, retry_after: Option<Duration>, breaker: BreakerEvent) -> Self {
        Self {
            verdict: Verdict {
                retry_elsewhere,
                retry_after,
            },
            breaker,
            states: [None, None],
        }
    }

    pub(super) fn push(&mut self, st: Option<NewState>) {
        if let Some(slot) = self.states.iter_mut().find(|s| s.is_none()) {
            *slot = st;
        }
    }

    pub(super) fn changes_state(&self) -> bool {
        self.states.iter().any(Option::is_some) || matches!(self.breaker, BreakerEvent::Failure(_))
    }
}

pub(super) fn classify(outcome: &Outcome<'_>, model: &str, s: &HealthSettings, now: i64) -> Plan {
    match outcome {
        Outcome::Response { status, headers, body } => classify_response(*status, headers, body, model, s, now),
        Outcome::StreamError { error_type } => classify_stream_error(error_type, s, now),
        Outcome::ConnectError => Plan::new(true, None, BreakerEvent::Failure("connect error".into())),
        Outcome::Invalid { what } => Plan::new(true, None, BreakerEvent::Failure(format!("invalid answer: {what}"))),
        Outcome::Timeout => Plan::new(true, None, BreakerEvent::Failure("timeout".into())),
    }
}

pub(super) fn classify_response(
    status: u16,
    h: &HeaderMap,
    body: &[u8],
    model: &str,
    s: &HealthSettings,
    now: i64,
) -> Plan {
    let unified = Unified::parse(h);
    let mut plan = match status {
        0..=399 => Plan::new(false, None, BreakerEvent::Success),
        429 => {
            let retry_after = retry_after(h, now);
            let mut plan = Plan::new(true, retry_after, BreakerEvent::Success);
            plan.push(Some(rate_limited(
                h,
                body,
                model,
                retry_after,
                unified.as_ref(),
                s,
                now,
            )));
            plan
        }
        529 => {
            let retry_after = retry_after(h, now);
            let cooldown = ms(s.overloaded).max(retry_after.map_or(0, ms));
            let (until, capped) = bounded(now, now.saturating_add(cooldown), s);
            let mut plan = Plan::new(true, retry_after, BreakerEvent::Success);
            plan.push(Some(NewState {
                health: pb::AccountHealth::Overloaded,
                scope: "",
                until_ms: until,
                reason: format!("529 overloaded_error: cooldown {}{capped}", fmt_ms(until - now)),
            }));
            plan
        }
        500..=599 => {
            let err = ErrorInfo::parse(body);
            let what = match err.kind() {
                Some(k) => format!("{status} {k}"),
                None => status.to_string(),
            };
            Plan::new(true, retry_after(h, now), BreakerEvent::Failure(what))
        }
        // A 404 that is not about the request's model ("model: …", the client's error) means the
        // account's URL leads nowhere (a base URL ending in /v1, a proxy path): the account's fault.
        404 if !ErrorInfo::parse(body).about_the_model() => Plan::new(
            true,
            None,
            BreakerEvent::Failure("404 that is not about the model: check the account's base URL".into()),
        ),
        // The upstream timed the request out: another account may well answer.
        408 => Plan::new(
            true,
            retry_after(h, now),
            BreakerEvent::Failure("408 request timeout".into()),
        ),
        // An account out of credit (402 billing_error, or 400 "credit balance is too low"): out
        // until an operator tops it up and resets it; never the client's answer.
        400 | 402 if status == 402 || ErrorInfo::parse(body).out_of_credit(body) => {
            let mut plan = Plan::new(true, None, BreakerEvent::Success);
            plan.push(Some(NewState {
                health: pb::AccountHealth::Blocked,
                scope: "",
                until_ms: 0,
                reason: format!("{status}: out of credit (billing)"),
            }));
            plan
        }
        400..=499 => {
            let err = ErrorInfo::parse(body);
            let mut plan = Plan::new(true, None, BreakerEvent::Success);
            if matches!(status, 400 | 403) && err.org_disabled(body) {
                plan.push(Some(NewState {
                    health: pb::AccountHealth::Blocked,
                    scope: "",
                    until_ms: 0,
                    reason: format!("{status}: organization disabled"),
                }));
            } else if status == 401
                || (status == 403
                    && err
                        .kind()
                        .is_none_or(|k| k == "permission_error" || k == "authentication_error"))
            {
                let kind = err.kind().unwrap_or(if status == 401 {
                    "authentication_error"
                } else {
                    "permission_error"
                });
                plan.push(Some(NewState {
                    health: pb::AccountHealth::Unauthorized,
                    scope: "",
                    until_ms: 0,
                    reason: format!("{status} {kind}"),
                }));
            } else {
                // The client's request is at fault: no other account would answer differently.
                plan.verdict.retry_elsewhere = false;
            }
            plan
        }
        _ => Plan::new(false, None, BreakerEvent::Success),
    };
    // Subscription utilization, from every answer. On a 429 the rejection itself is handled above
    // (with its scope); only the utilization threshold applies here.
    if let Some(u) = unified {
        plan.push(unified_limit(&u, s, now, status != 429));
    }
    plan
}

pub(super) fn classify_stream_error(error_type: &str, s: &HealthSettings, now: i64) -> Plan {
    let kind = clean_type(error_type);
    match error_type {
        "overloaded_error" => {
            let (until, capped) = bounded(now, now.saturating_add(ms(s.overloaded)), s);
            let mut plan = Plan::new(true, None, BreakerEvent::Nothing);
            plan.push(Some(NewState {
                health: pb::AccountHealth::Overloaded,
                scope: "",
                until_ms: until,
                reason: format!("SSE overloaded_error: cooldown {}{capped}", fmt_ms(until - now)),
            }));
            plan
        }
        "rate_limit_error" => {
            let (until, capped) = bounded(now, now.saturating_add(ms(s.rate_limit_default)), s);
            let mut plan = Plan::new(true, None, BreakerEvent::Nothing);
            plan.push(Some(NewState {
                health: pb::AccountHealth::RateLimited,
                scope: "",
                until_ms: until,
                reason: format!(
                    "SSE rate_limit_error: no reset given, default {}{capped}",
                    fmt_ms(until - now)
                ),
            }));
            plan
        }
        "api_error" => Plan::new(true, None, BreakerEvent::Failure(format!("SSE {kind}"))),
        "authentication_error" | "permission_error" => {
            let mut plan = Plan::new(true, None, BreakerEvent::Nothing);
            plan.push(Some(NewState {
                health: pb::AccountHealth::Unauthorized,
                scope: "",
                until_ms: 0,
                reason: format!("SSE {kind}"),
            }));
            plan
        }
        _ => Plan::new(false, None, BreakerEvent::Nothing),
    }
}

/// The end of a timed state: at least `min` from now, at most `max`. The text notes a cap.
pub(super) fn bounded(now: i64, end: i64, s: &HealthSettings) -> (i64, &'static str) {
    let end = end.max(now.saturating_add(ms(s.min.min(s.max))));
    let limit = now.saturating_add(ms(s.max));
    if end > limit {
        (limit, " (capped)")
    } else {
        (end, "")
    }
}

#[cfg(test)]
#[path = "classify_tests.rs"]
mod tests;
