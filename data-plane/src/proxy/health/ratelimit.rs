//! What rate-limit signals mean for an account: how long a 429 keeps it out (`retry-after`, else
//! the limiting `anthropic-ratelimit-*-reset`, a `rejected` unified status at least until the
//! unified reset, else the default), and when a subscription account's unified utilization takes it
//! out before any 429. The headers themselves are read by `relay_proto::anthropic::ratelimit`.

use super::classify::{bounded, NewState};
use super::error_body::ErrorInfo;
use super::family::family_in;
use super::settings::HealthSettings;
use super::{fmt_ms, ms};
use http::HeaderMap;
use relay_proto::anthropic::ratelimit::{limiting_reset, Unified};
use relay_proto::v1 as pb;
use std::borrow::Cow;
use std::time::Duration;

/// How far in the past a limit's reset may be and still be read as clock skew.
const SKEW_MS: i64 = 60_000;

/// A 429: limited until the reset the upstream gave. `retry-after` is the upstream's own answer and
/// wins; else the relevant `anthropic-ratelimit-*-reset`; a subscription account whose unified status
/// is `rejected` is limited at least until the unified reset; nothing at all: the default.
pub(super) fn rate_limited(
    h: &HeaderMap,
    body: &[u8],
    model: &str,
    retry_after: Option<Duration>,
    unified: Option<&Unified<'_>>,
    s: &HealthSettings,
    now: i64,
) -> NewState {
    let err = ErrorInfo::parse(body);
    let scope = err.message().and_then(|m| family_in(m, model)).unwrap_or("");
    let kind = err.kind().unwrap_or("rate_limit_error");
    let mut end: Option<(i64, Cow<'static, str>)> = None;
    if let Some(d) = retry_after {
        end = Some((
            now.saturating_add(ms(d)),
            format!("retry-after {}", fmt_ms(ms(d))).into(),
        ));
    } else if let Some((reset, name)) = limiting_reset(h).filter(|(reset, _)| *reset > now - SKEW_MS) {
        // A reset just past is clock skew (the limit lifts about now: a brief rest, the floor).
        // One long past says nothing about when the limit lifts (a placeholder such as the
        // epoch): the default applies, not a one-second rest.
        end = Some((reset, name.into()));
    }
    if let Some(reset) = unified.and_then(|u| u.reset_ms) {
        let rejected = unified.is_some_and(Unified::rejected);
        if end.as_ref().is_none_or(|(e, _)| rejected && reset > *e) {
            end = Some((reset, "anthropic-ratelimit-unified-reset".into()));
        }
    }
    let (end, source) = end.unwrap_or_else(|| {
        let d = ms(s.rate_limit_default);
        (
            now.saturating_add(d),
            format!("no reset given, default {}", fmt_ms(d)).into(),
        )
    });
    let (until, capped) = bounded(now, end, s);
    let scoped = if scope.is_empty() {
        String::new()
    } else {
        format!(" ({scope})")
    };
    NewState {
        health: pb::AccountHealth::RateLimited,
        scope,
        until_ms: until,
        reason: format!("429 {kind}{scoped}: {source}{capped}"),
    }
}

/// A subscription account's unified headers, on any answer: rate limited until the reset of the
/// window whose utilization reached `unified.threshold` (or, with `use_status`, whose status or the
/// account's is `rejected`). `None`: no window calls for it.
pub(super) fn unified_limit(u: &Unified<'_>, s: &HealthSettings, now: i64, use_status: bool) -> Option<NewState> {
    let mut end: Option<(i64, String)> = None;
    for w in &u.windows {
        let over = w.utilization.filter(|u| *u >= s.unified_threshold);
        if over.is_none() && !(use_status && w.rejected()) {
            continue;
        }
        let at = w
            .reset_ms
            .or(u.reset_ms)
            .unwrap_or_else(|| now.saturating_add(ms(s.rate_limit_default)));
        if end.as_ref().is_none_or(|(e, _)| at > *e) {
            let why = match over {
                Some(u) => format!(
                    "unified {} utilization {:.1}% >= {:.1}%",
                    w.name,
                    u * 100.0,
                    s.unified_threshold * 100.0
                ),
                None => format!("unified {} status rejected", w.name),
            };
            end = Some((at, why));
        }
    }
    if end.is_none() && use_status && u.rejected() {
        let at = u
            .reset_ms
            .or_else(|| u.windows.iter().filter_map(|w| w.reset_ms).max())
            .unwrap_or_else(|| now.saturating_add(ms(s.rate_limit_default)));
        end = Some((at, "unified status rejected".into()));
    }
    let (at, why) = end?;
    let (until, capped) = bounded(now, at, s);
    Some(NewState {
        health: pb::AccountHealth::RateLimited,
        scope: "",
        until_ms: until,
        reason: format!("{why}: until reset in {}{capped}", fmt_ms(until - now)),
    })
}
