//! The limits stage: the key's and its group's limits and budgets, checked and counted
//! fleet-wide (`relay_limits`) before any upstream is called, the 429 that names the
//! limit, and the `anthropic-ratelimit-*` headers that tell a limited client where it
//! stands (as Anthropic's own API does).

use super::admission::ClientRequest;
use crate::control::spend::SpendBook;
use crate::control::state::{KeyEntry, ServingConfig};
use crate::errors::{ApiError, Body};
use crate::upstream::usage::Usage;
use http::{HeaderName, HeaderValue, Response};
use relay_limits::{Ask, Charge, Decision, Kind, LimitKind, Limiter, Limits, Refusal, Subject, Use};
use relay_proto::periods::{periods, Periods};
use std::sync::Arc;

/// What a request was admitted with.
#[derive(Default)]
pub struct Admitted {
    /// Its reservation: attempts add their usage to it; it settles when dropped.
    pub charge: Option<Arc<Charge>>,
    /// `anthropic-ratelimit-*` for the response (empty for a key without limits).
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

/// The subjects a key's requests count against: the key, and its group when the group has limits.
pub fn subjects(cfg: &ServingConfig, key: &KeyEntry, spend: &SpendBook, p: &Periods) -> Vec<Subject> {
    let mut out = vec![Subject {
        kind: Kind::Key,
        id: key.id.clone(),
        limits: Limits::from_pb(Some(&key.limits)),
        committed: spend.committed(Kind::Key, &key.id, p),
    }];
    if let Some(g) = cfg.group(&key.group_id) {
        out.push(Subject {
            kind: Kind::Group,
            id: g.id.clone(),
            limits: Limits::from_pb(g.limits.as_ref()),
            committed: spend.committed(Kind::Group, &g.id, p),
        });
    }
    out
}

/// The request's reservation: its input (about four bytes a token) and all the output it may
/// ask for, and what that would cost at the model's price.
pub fn estimate(cfg: &ServingConfig, model: &str, body_len: usize, max_tokens: u64, is_messages: bool) -> (u64, u64) {
    if !is_messages {
        return (0, 0);
    }
    let input = (body_len / 4) as u64;
    let tokens = input.saturating_add(max_tokens);
    let now = chrono::Utc::now().timestamp_millis();
    let cost = cfg.prices.lookup(model, now).map_or(0, |p| {
        crate::upstream::usage::cost_pico_usd(
            p,
            &Usage {
                input_tokens: input,
                output_tokens: max_tokens,
                ..Usage::default()
            },
        )
    });
    (tokens, relay_limits::nano_of_pico(cost))
}

/// Tokens a settled request counts against tokens-per-minute.
pub fn counted_tokens(u: &Usage, count_cache_reads: bool) -> u64 {
    let mut t = u
        .input_tokens
        .saturating_add(u.output_tokens)
        .saturating_add(u.cache_write_5m_tokens)
        .saturating_add(u.cache_write_1h_tokens);
    if count_cache_reads {
        t = t.saturating_add(u.cache_read_tokens);
    }
    t
}

/// The limits stage: the request's tokens and cost estimated, then checked and counted against
/// its key's and group's limits before any upstream is called.
pub async fn check(limiter: &Arc<Limiter>, spend: &SpendBook, req: &ClientRequest) -> Result<Admitted, ApiError> {
    let (tokens, cost) = estimate(&req.cfg, &req.model, req.body.len(), req.max_tokens, req.is_messages);
    admit(limiter, spend, &req.cfg, &req.key, &req.model, tokens, cost).await
}

impl Admitted {
    /// A limited key's standing goes on every answer, success or not.
    pub fn decorate(self, out: Result<Response<Body>, ApiError>) -> Result<Response<Body>, ApiError> {
        match out {
            Ok(mut resp) => {
                for (name, value) in self.headers {
                    resp.headers_mut().insert(name, value);
                }
                Ok(resp)
            }
            Err(mut e) => {
                e.headers.extend(self.headers);
                Err(e)
            }
        }
    }
}

/// Checks and counts one request.
pub async fn admit(
    limiter: &Arc<Limiter>,
    spend: &SpendBook,
    cfg: &ServingConfig,
    key: &KeyEntry,
    model: &str,
    tokens: u64,
    cost_nano: u64,
) -> Result<Admitted, ApiError> {
    // Neither the key nor its group has a limit (the limiter would answer Unlimited): nothing
    // to count, so no periods, committed spend or subjects built for it.
    let group_limited = cfg
        .group(&key.group_id)
        .is_some_and(|g| !Limits::from_pb(g.limits.as_ref()).is_unlimited());
    if !group_limited && Limits::from_pb(Some(&key.limits)).is_unlimited() {
        return Ok(Admitted::default());
    }
    let now = chrono::Utc::now().timestamp_millis();
    let p = periods(cfg.policy.timezone, now);
    let subjects = subjects(cfg, key, spend, &p);
    // A budget protects only if every request it admits has a cost.
    if subjects.iter().any(|s| s.limits.has_budget()) && cfg.prices.lookup(model, now).is_none() {
        return Err(ApiError::invalid_request(format!(
            "model {model} has no price, so this API key's budget cannot count it; the operator can set one \
             with `relayctl pricing set`"
        )));
    }
    let ask = Ask {
        subjects,
        tokens,
        cost_nano,
        periods: p,
    };
    match limiter.admit(ask).await {
        Decision::Unlimited => Ok(Admitted::default()),
        Decision::Admitted(charge) => {
            let headers = headers(charge.subjects(), &charge.uses);
            Ok(Admitted {
                charge: Some(Arc::new(charge)),
                headers,
            })
        }
        Decision::Refused { refusal, subject } => Err(refused(cfg, &refusal, &subject)),
        Decision::StoreDown => {
            metrics::counter!(relay_proto::metrics::LIMITS_REFUSED_TOTAL, "limit" => "store_down", "subject" => "key")
                .increment(1);
            Err(ApiError::overloaded(
                "relay cannot check this API key's limits right now (its limit store is unreachable and \
                 limits.on_store_down is deny); retry shortly",
                5,
            ))
        }
    }
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn push(out: &mut Vec<(HeaderName, HeaderValue)>, name: &'static str, value: String) {
    if let Ok(v) = HeaderValue::from_str(&value) {
        out.push((HeaderName::from_static(name), v));
    }
}

/// The tightest request and token limits among the subjects, as Anthropic's headers.
pub fn headers(subjects: &[Subject], uses: &[Use]) -> Vec<(HeaderName, HeaderValue)> {
    let mut out = Vec::new();
    let pairs = || subjects.iter().zip(uses.iter());
    let tightest = |limit: fn(&Limits) -> u64, used: fn(&Use) -> u64| {
        pairs()
            .filter(|(s, _)| limit(&s.limits) > 0)
            .map(|(s, u)| (limit(&s.limits), limit(&s.limits).saturating_sub(used(u)), u))
            .min_by_key(|(_, remaining, _)| *remaining)
    };
    if let Some((limit, remaining, u)) = tightest(|l| l.rpm, |u| u.requests) {
        push(&mut out, "anthropic-ratelimit-requests-limit", limit.to_string());
        push(
            &mut out,
            "anthropic-ratelimit-requests-remaining",
            remaining.to_string(),
        );
        push(
            &mut out,
            "anthropic-ratelimit-requests-reset",
            rfc3339(u.requests_reset_ms.max(u.now_ms)),
        );
    }
    if let Some((limit, remaining, u)) = tightest(|l| l.tpm, |u| u.tokens) {
        push(&mut out, "anthropic-ratelimit-tokens-limit", limit.to_string());
        push(&mut out, "anthropic-ratelimit-tokens-remaining", remaining.to_string());
        push(
            &mut out,
            "anthropic-ratelimit-tokens-reset",
            rfc3339(u.tokens_reset_ms.max(u.now_ms)),
        );
    }
    out
}

/// Dollars with cents, or with as many decimals (up to micro-dollars) as the amount needs.
fn usd(nano: u64) -> String {
    if nano.is_multiple_of(10_000_000) {
        return format!("${:.2}", nano as f64 / 1e9);
    }
    let s = format!("{:.6}", nano as f64 / 1e9);
    format!("${}", s.trim_end_matches('0'))
}

/// The 429 for a refusal: which limit of whom, when to retry, and for a budget: not before the
/// period ends (`x-should-retry: false`).
fn refused(cfg: &ServingConfig, r: &Refusal, s: &Subject) -> ApiError {
    let who = match s.kind {
        Kind::Group => format!(
            "this API key's group {:?}",
            cfg.group(&s.id).map_or(s.id.as_str(), |g| g.name.as_str())
        ),
        _ => "this API key".to_string(),
    };
    // The whole limit (a refusal counted in process while Redis is down is by this data plane's
    // share of it, said as such).
    let whole = match r.kind {
        LimitKind::Concurrency => s.limits.concurrency,
        LimitKind::Requests => s.limits.rpm,
        LimitKind::Tokens => s.limits.tpm,
        LimitKind::DailyBudget => s.limits.daily_nano,
        LimitKind::MonthlyBudget => s.limits.monthly_nano,
    };
    let share = if whole != r.limit && whole > 0 {
        format!(
            " (this data plane's share while the limit store is unreachable: {})",
            r.limit
        )
    } else {
        String::new()
    };
    let r = &Refusal {
        limit: if whole > 0 { whole } else { r.limit },
        ..r.clone()
    };
    let secs = r.retry_after_ms.div_ceil(1000).max(1);
    let now = chrono::Utc::now().timestamp_millis();
    let at = rfc3339(now + r.retry_after_ms as i64);
    let message = match r.kind {
        LimitKind::Concurrency => format!(
            "{who} allows {} concurrent requests and has that many in flight; retry when one finishes",
            r.limit
        ),
        LimitKind::Requests => format!("{who} allows {} requests per minute; retry in {secs} s", r.limit),
        LimitKind::Tokens => format!("{who} allows {} tokens per minute; retry in {secs} s", r.limit),
        LimitKind::DailyBudget | LimitKind::MonthlyBudget if r.by_reservations => format!(
            "{who}'s requests in flight may spend the rest of its {} budget of {}; retry when they finish",
            if r.kind == LimitKind::DailyBudget {
                "daily"
            } else {
                "monthly"
            },
            usd(r.limit)
        ),
        LimitKind::DailyBudget => format!(
            "{who} has spent its daily budget of {}; it renews at {at}",
            usd(r.limit)
        ),
        LimitKind::MonthlyBudget => format!(
            "{who} has spent its monthly budget of {}; it renews at {at}",
            usd(r.limit)
        ),
    };
    let mut e = ApiError::rate_limited(message + &share);
    e.retry_after_secs = Some(secs);
    let mut h = Vec::new();
    match r.kind {
        LimitKind::Requests => {
            push(&mut h, "anthropic-ratelimit-requests-limit", r.limit.to_string());
            push(&mut h, "anthropic-ratelimit-requests-remaining", "0".into());
            push(&mut h, "anthropic-ratelimit-requests-reset", at);
        }
        LimitKind::Tokens => {
            push(&mut h, "anthropic-ratelimit-tokens-limit", r.limit.to_string());
            push(&mut h, "anthropic-ratelimit-tokens-remaining", "0".into());
            push(&mut h, "anthropic-ratelimit-tokens-reset", at);
        }
        _ => {}
    }
    e.headers = h;
    if r.kind.is_budget() && !r.by_reservations {
        e = e.no_retry();
    }
    e
}

/// `GET /relay/v1/key`: what a key holder may see of their own key: its name, group, models,
/// expiry, and each limit with its current use and reset, budgets spent and remaining.
pub async fn status(limiter: &Limiter, spend: &SpendBook, cfg: &ServingConfig, key: &KeyEntry) -> serde_json::Value {
    use serde_json::json;
    let now = chrono::Utc::now().timestamp_millis();
    let p = periods(cfg.policy.timezone, now);
    let subjects = subjects(cfg, key, spend, &p);
    let uses = match limiter.peek(&subjects, &p).await {
        Ok(u) => Some(u),
        Err(e) => {
            tracing::debug!(error = %e, "cannot read a key's counters");
            None
        }
    };
    let usd = |nano: u64| (nano as f64 / 1e9 * 1e6).round() / 1e6;
    let describe = |s: &Subject, u: Option<&Use>| {
        let l = &s.limits;
        let mut out = serde_json::Map::new();
        let u = u.copied();
        let reset = |ms: i64| {
            if ms > 0 {
                json!(rfc3339(ms))
            } else {
                serde_json::Value::Null
            }
        };
        if l.rpm > 0 {
            out.insert(
                "requests_per_minute".into(),
                json!({
                    "limit": l.rpm,
                    "used": u.map(|u| u.requests),
                    "remaining": u.map(|u| l.rpm.saturating_sub(u.requests)),
                    "resets_at": u.map(|u| reset(u.requests_reset_ms)),
                }),
            );
        }
        if l.tpm > 0 {
            out.insert(
                "tokens_per_minute".into(),
                json!({
                    "limit": l.tpm,
                    "used": u.map(|u| u.tokens),
                    "remaining": u.map(|u| l.tpm.saturating_sub(u.tokens)),
                    "resets_at": u.map(|u| reset(u.tokens_reset_ms)),
                }),
            );
        }
        if l.concurrency > 0 {
            out.insert(
                "concurrency".into(),
                json!({
                    "limit": l.concurrency,
                    "in_flight": u.map(|u| u.in_flight),
                }),
            );
        }
        // Redis is down and this data plane enforces its share of each rate: say which.
        if limiter.mode() == relay_limits::Mode::Degraded(relay_limits::Policy::Local) {
            let share = l.share(limiter.planes());
            for (name, v) in [
                ("requests_per_minute", share.rpm),
                ("tokens_per_minute", share.tpm),
                ("concurrency", share.concurrency),
            ] {
                if let Some(o) = out.get_mut(name) {
                    o["enforced_here"] = json!(v);
                }
            }
        }
        let budget = |limit: u64, spent: Option<u64>, period: &str, ends: i64| {
            json!({
                "limit_usd": usd(limit),
                "spent_usd": spent.map(usd),
                "reserved_usd": u.map(|u| usd(u.reserved_nano)),
                "remaining_usd": spent.map(|sp| usd(limit.saturating_sub(sp))),
                "period": period,
                "resets_at": rfc3339(ends),
            })
        };
        if l.daily_nano > 0 {
            let spent = u.map(|u| u.day_nano).or(Some(s.committed.day_nano));
            out.insert("daily_budget".into(), budget(l.daily_nano, spent, &p.day, p.day_end_ms));
        }
        if l.monthly_nano > 0 {
            let spent = u.map(|u| u.month_nano).or(Some(s.committed.month_nano));
            out.insert(
                "monthly_budget".into(),
                budget(l.monthly_nano, spent, &p.month, p.month_end_ms),
            );
        }
        serde_json::Value::Object(out)
    };
    let group = cfg.group(&key.group_id);
    let mut body = json!({
        "id": key.id,
        "name": key.name,
        "group": group.map(|g| json!({"id": g.id, "name": g.name})),
        "allowed_models": if key.allowed_models.is_empty() { json!("all") } else { json!(key.allowed_models) },
        "expires_at": if key.expires_at_ms > 0 { json!(rfc3339(key.expires_at_ms)) } else { serde_json::Value::Null },
        "limits": describe(&subjects[0], uses.as_ref().and_then(|u| u.first())),
        "counted": limiter.mode().as_str(),
        "time_zone": cfg.policy.timezone.name(),
    });
    if let Some(g) = subjects.get(1).filter(|g| !g.limits.is_unlimited()) {
        body["group_limits"] = describe(g, uses.as_ref().and_then(|u| u.get(1)));
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subject(rpm: u64, tpm: u64) -> Subject {
        Subject {
            kind: Kind::Key,
            id: "k".into(),
            limits: Limits {
                rpm,
                tpm,
                ..Limits::default()
            },
            committed: Default::default(),
        }
    }

    #[test]
    fn headers_describe_the_tightest_limit() {
        let now = 1_796_378_400_000;
        let subjects = [subject(10, 0), subject(100, 5000)];
        let uses = [
            Use {
                now_ms: now,
                requests: 9,
                requests_reset_ms: now + 60_000,
                ..Use::default()
            },
            Use {
                now_ms: now,
                requests: 50,
                tokens: 1200,
                tokens_reset_ms: now + 30_000,
                ..Use::default()
            },
        ];
        let h = headers(&subjects, &uses);
        let get = |n: &str| {
            h.iter()
                .find(|(k, _)| k == n)
                .map(|(_, v)| v.to_str().unwrap_or("").to_string())
        };
        assert_eq!(get("anthropic-ratelimit-requests-limit").as_deref(), Some("10"));
        assert_eq!(get("anthropic-ratelimit-requests-remaining").as_deref(), Some("1"));
        assert_eq!(
            get("anthropic-ratelimit-requests-reset").as_deref(),
            Some("2026-12-04T10:01:00Z")
        );
        assert_eq!(get("anthropic-ratelimit-tokens-limit").as_deref(), Some("5000"));
        assert_eq!(get("anthropic-ratelimit-tokens-remaining").as_deref(), Some("3800"));
    }

    #[test]
    fn budgets_are_shown_to_the_precision_they_have() {
        assert_eq!(usd(5_000_000_000), "$5.00");
        assert_eq!(usd(2_000_000), "$0.002");
        assert_eq!(usd(1_000), "$0.000001");
        assert_eq!(usd(12_500_000_000), "$12.50");
    }

    #[test]
    fn a_key_without_limits_gets_no_headers() {
        assert!(headers(&[subject(0, 0)], &[Use::default()]).is_empty());
    }

    #[test]
    fn cache_reads_count_only_when_configured() {
        let u = Usage {
            input_tokens: 10,
            output_tokens: 20,
            cache_write_5m_tokens: 3,
            cache_write_1h_tokens: 4,
            cache_read_tokens: 1000,
            ..Usage::default()
        };
        assert_eq!(counted_tokens(&u, false), 37);
        assert_eq!(counted_tokens(&u, true), 1037);
    }
}
