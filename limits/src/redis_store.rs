//! Counters in Redis: one Lua script per operation, so a check, its count and its
//! expiries happen atomically and nothing is counted for a refused request. The
//! script's clock is Redis' own `TIME` (one clock for the whole fleet); tests pass
//! theirs.
//!
//! What Redis holds, per subject `S` (`k:<key id>`, `g:<group id>`, `a:<account id>`),
//! every key expiring by itself:
//! * `relay:{S}:rq`, `relay:{S}:tk`: hashes second → requests / tokens, the last 60
//!   seconds (older fields are dropped as they are read; the key lives 2 minutes).
//! * `relay:{S}:cc`: leases in flight (sorted set lease → expiry ms), renewed by
//!   the data plane that holds them every 10 s, gone 30 s after it stops.
//! * `relay:{S}:rs`: each lease's reservation, `tokens:cost:second`.
//! * `relay:{S}:sd:<zone>:<day>`, `relay:{S}:sm:<zone>:<month>`: spend of the period,
//!   nano-USD, expiring a day after the period ends.
//! * `relay:s:<session>`: the account a sticky session is bound to, expiring after
//!   `sticky.ttl_ms` without use (so bounded by the sessions active within it).
//! * `relay:planes`: live data planes (sorted set node → expiry), for the local
//!   fallback's share.
//!
//! Redis memory is bounded by the subjects active in the last minutes and the
//! current periods, not by history. The scripts touch several keys per call, so a
//! Redis Cluster is not supported (one primary, with or without Sentinel, is).

use crate::{Ask, Counters, Error, LimitKind, Refusal, Subject, Use, LEASE_TTL_MS};
use redis::aio::ConnectionManager;
use redis::Script;
use relay_proto::periods::Periods;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

const COMMON: &str = r#"
local now = tonumber(ARGV[1])
if now == 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local sec = math.floor(now / 1000)

local function window(key)
  local h = redis.call('HGETALL', key)
  local secs, vals, sum = {}, {}, 0
  for i = 1, #h, 2 do
    local s = tonumber(h[i])
    local v = tonumber(h[i + 1])
    if s <= sec - 60 then
      redis.call('HDEL', key, h[i])
    else
      table.insert(secs, s)
      vals[s] = v
      sum = sum + v
    end
  end
  table.sort(secs)
  return sum, secs, vals
end

local function newest(secs, vals)
  for i = #secs, 1, -1 do
    if vals[secs[i]] > 0 then return (secs[i] + 60) * 1000 end
  end
  return 0
end

local function spent(key, committed)
  return math.max(tonumber(redis.call('GET', key) or '0') or 0, committed)
end

local function leases(cc, rs, with_rs)
  local gone = redis.call('ZRANGEBYSCORE', cc, '-inf', now)
  if #gone > 0 then
    if with_rs then
      for _, l in ipairs(gone) do redis.call('HDEL', rs, l) end
    end
    redis.call('ZREMRANGEBYSCORE', cc, '-inf', now)
  end
  local reserved = 0
  if with_rs then
    for _, v in ipairs(redis.call('HVALS', rs)) do
      local c = string.match(v, '^[^:]*:([^:]*):')
      reserved = reserved + (tonumber(c) or 0)
    end
  end
  return redis.call('ZCARD', cc), reserved
end

-- What a subject's limits need counted (nothing else is touched): requests for rpm, tokens for
-- tpm, reservations for tpm and budgets, leases for concurrency and reservations, spend for budgets.
local function needs(rpm, tpm, conc, daily, monthly)
  local n = {rq = rpm > 0, tk = tpm > 0, spend = daily > 0 or monthly > 0}
  n.rs = n.tk or n.spend
  n.cc = conc > 0 or n.rs
  return n
end

-- A subject's counters, read (and pruned) as far as its limits need them.
local function read(k, a)
  local rpm, tpm, conc = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local daily, monthly = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  local n = needs(rpm, tpm, conc, daily, monthly)
  local r = {n = n, rpm = rpm, tpm = tpm, conc = conc, daily = daily, monthly = monthly,
    rq = 0, rq_secs = {}, rq_vals = {}, tk = 0, tk_secs = {}, tk_vals = {},
    inflight = 0, reserved = 0, day = 0, month = 0}
  if n.rq then r.rq, r.rq_secs, r.rq_vals = window(KEYS[k + 1]) end
  if n.tk then r.tk, r.tk_secs, r.tk_vals = window(KEYS[k + 2]) end
  if n.cc then r.inflight, r.reserved = leases(KEYS[k + 3], KEYS[k + 4], n.rs) end
  if n.spend then
    r.day = spent(KEYS[k + 5], tonumber(ARGV[a + 5]))
    r.month = spent(KEYS[k + 6], tonumber(ARGV[a + 6]))
  end
  return r
end

"#;

/// KEYS: 6 per subject (rq tk cc rs sd sm). ARGV: now, lease, ttl, tokens, cost, day_end,
/// month_end, then 7 per subject (rpm tpm concurrency daily monthly committed_day
/// committed_month). Returns {0, subject, code, limit, retry_ms, by_reservations} or {1, now, then
/// 9 per subject}.
const ADMIT: &str = r#"
local lease, ttl = ARGV[2], tonumber(ARGV[3])
local tokens, cost = tonumber(ARGV[4]), tonumber(ARGV[5])
local day_end, month_end = tonumber(ARGV[6]), tonumber(ARGV[7])
local n = #KEYS / 6

local function wait_for(secs, vals, total, fits)
  local left = total
  for _, s in ipairs(secs) do
    left = left - vals[s]
    if fits(left) then return math.max((s + 60) * 1000 - now, 1000) end
  end
  return 60000
end

local reads = {}
for i = 0, n - 1 do
  local r = read(i * 6, 8 + i * 7)
  if r.conc > 0 and r.inflight >= r.conc then return {0, i, 1, r.conc, 1000, 0} end
  if r.rpm > 0 and r.rq >= r.rpm then
    return {0, i, 2, r.rpm, wait_for(r.rq_secs, r.rq_vals, r.rq, function(left) return left < r.rpm end), 0}
  end
  if r.tpm > 0 and r.tk > 0 and r.tk + tokens > r.tpm then
    return {0, i, 3, r.tpm, wait_for(r.tk_secs, r.tk_vals, r.tk, function(left) return left == 0 or left + tokens <= r.tpm end), 0}
  end
  if r.daily > 0 and r.day + r.reserved >= r.daily then
    if r.day >= r.daily then return {0, i, 4, r.daily, math.max(day_end - now, 1000), 0} end
    return {0, i, 4, r.daily, 2000, 1}
  end
  if r.monthly > 0 and r.month + r.reserved >= r.monthly then
    if r.month >= r.monthly then return {0, i, 5, r.monthly, math.max(month_end - now, 1000), 0} end
    return {0, i, 5, r.monthly, 2000, 1}
  end
  reads[i] = r
end

local out = {1, now}
for i = 0, n - 1 do
  local k, r = i * 6, reads[i]
  local u = {0, 0, 0, 0, 0, r.day, r.month, 0, 0}
  if r.n.rq then
    redis.call('HINCRBY', KEYS[k + 1], sec, 1)
    redis.call('PEXPIRE', KEYS[k + 1], 120000)
    u[1], u[2] = r.rq + 1, (sec + 60) * 1000
  end
  if r.n.tk then
    if tokens > 0 then
      redis.call('HINCRBY', KEYS[k + 2], sec, ARGV[4])
      redis.call('PEXPIRE', KEYS[k + 2], 120000)
      u[4] = (sec + 60) * 1000
    else
      u[4] = newest(r.tk_secs, r.tk_vals)
    end
    u[3] = r.tk + tokens
  end
  if r.n.cc then
    redis.call('ZADD', KEYS[k + 3], now + ttl, lease)
    redis.call('PEXPIRE', KEYS[k + 3], ttl * 2)
    u[5] = r.inflight + 1
  end
  if r.n.rs then
    redis.call('HSET', KEYS[k + 4], lease, ARGV[4] .. ':' .. ARGV[5] .. ':' .. sec)
    redis.call('PEXPIRE', KEYS[k + 4], ttl * 2)
    u[8] = r.reserved + cost
  end
  for _, v in ipairs(u) do table.insert(out, v) end
end
return out
"#;

/// KEYS: 6 per subject. ARGV: now, then 7 per subject (as ADMIT). Returns {now, then 9 per
/// subject}.
const PEEK: &str = r#"
local out = {now}
for i = 0, #KEYS / 6 - 1 do
  local r = read(i * 6, 2 + i * 7)
  for _, v in ipairs({r.rq, newest(r.rq_secs, r.rq_vals), r.tk, newest(r.tk_secs, r.tk_vals), r.inflight,
      r.day, r.month, r.reserved, 0}) do
    table.insert(out, v)
  end
end
return out
"#;

/// KEYS: 6 per subject. ARGV: now, lease, tokens, cost, day_expire_at, month_expire_at, then 7
/// per subject (as ADMIT).
const FINISH: &str = r#"
local lease, tokens, cost = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
for i = 0, #KEYS / 6 - 1 do
  local k, a = i * 6, 7 + i * 7
  local n = needs(tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]),
    tonumber(ARGV[a + 4]))
  if n.cc then redis.call('ZREM', KEYS[k + 3], lease) end
  if n.rs then
    local r = redis.call('HGET', KEYS[k + 4], lease)
    if r then
      redis.call('HDEL', KEYS[k + 4], lease)
      local est, s = string.match(r, '^([^:]*):[^:]*:([^:]*)$')
      est, s = tonumber(est) or 0, tonumber(s) or 0
      if n.tk and s > sec - 60 and redis.call('HEXISTS', KEYS[k + 2], s) == 1 then
        local v = redis.call('HINCRBY', KEYS[k + 2], s, tokens - est)
        if v < 0 then redis.call('HSET', KEYS[k + 2], s, 0) end
      end
    elseif n.tk and tokens > 0 then
      redis.call('HINCRBY', KEYS[k + 2], sec, ARGV[3])
      redis.call('PEXPIRE', KEYS[k + 2], 120000)
    end
  end
  if n.spend and cost > 0 then
    local d = spent(KEYS[k + 5], tonumber(ARGV[a + 5])) + cost
    redis.call('SET', KEYS[k + 5], string.format('%d', d), 'PXAT', ARGV[5])
    local m = spent(KEYS[k + 6], tonumber(ARGV[a + 6])) + cost
    redis.call('SET', KEYS[k + 6], string.format('%d', m), 'PXAT', ARGV[6])
  end
end
return 1
"#;

/// KEYS: this data plane's marker `relay:alive:<node>`, then (cc, rs) per lease. ARGV: now, ttl,
/// force, then (lease, reservation) per lease. A Redis that lost this data plane's leases (no
/// marker, or `force`: an earlier chunk of the same renewal found it gone) gets them and their
/// reservations back; otherwise only leases it still holds are extended (a finished one is not
/// revived). Returns 1 when it re-added.
const RENEW: &str = r#"
local ttl = tonumber(ARGV[2])
local lost = ARGV[3] == '1' or redis.call('EXISTS', KEYS[1]) == 0
for i = 1, (#KEYS - 1) / 2 do
  local cc, rs = KEYS[2 * i], KEYS[2 * i + 1]
  local lease, res = ARGV[2 + 2 * i], ARGV[3 + 2 * i]
  if lost then
    redis.call('ZADD', cc, now + ttl, lease)
    redis.call('HSETNX', rs, lease, res)
  else
    redis.call('ZADD', cc, 'XX', now + ttl, lease)
  end
  redis.call('PEXPIRE', cc, ttl * 2)
  redis.call('PEXPIRE', rs, ttl * 2)
end
redis.call('SET', KEYS[1], '1')
if lost then return 1 end
return 0
"#;

/// KEYS: 6 per subject. ARGV: now, lease. Undoes an admission whose answer never arrived (the
/// call timed out, the script ran later): its lease, its token reservation and its request.
const CANCEL: &str = r#"
for i = 0, #KEYS / 6 - 1 do
  local k = i * 6
  local r = redis.call('HGET', KEYS[k + 4], ARGV[2])
  redis.call('ZREM', KEYS[k + 3], ARGV[2])
  if r then
    redis.call('HDEL', KEYS[k + 4], ARGV[2])
    local est, s = string.match(r, '^([^:]*):[^:]*:([^:]*)$')
    est, s = tonumber(est) or 0, tonumber(s) or 0
    for _, pair in ipairs({{KEYS[k + 2], est}, {KEYS[k + 1], 1}}) do
      if pair[2] > 0 and redis.call('HEXISTS', pair[1], s) == 1 then
        local v = redis.call('HINCRBY', pair[1], s, -pair[2])
        if v < 0 then redis.call('HSET', pair[1], s, 0) end
      end
    end
  end
end
return 1
"#;

/// KEYS: relay:planes. ARGV: now, node, ttl. Returns the live data planes.
const HEARTBEAT: &str = r#"
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]) * 4)
return redis.call('ZCARD', KEYS[1])
"#;

fn script(body: &str) -> Script {
    Script::new(&format!("{COMMON}\n{body}"))
}

static ADMIT_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(ADMIT));
static PEEK_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(PEEK));
static FINISH_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(FINISH));
static RENEW_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(RENEW));
static HEARTBEAT_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(HEARTBEAT));
static CANCEL_SCRIPT: LazyLock<Script> = LazyLock::new(|| script(CANCEL));

/// The bound on background calls (clean-ups, retried settlements), longer than a request's.
const BACKGROUND_TIMEOUT: Duration = Duration::from_secs(2);

/// The Redis key of a subject's counter (`rq`, `tk`, `cc`, `rs`, `sd:<day>`, `sm:<month>`).
pub fn key_of(subject: &str, part: &str) -> String {
    format!("relay:{{{subject}}}:{part}")
}

/// A sticky session's key: `relay:s:<session key>` (session keys are at most 66 bytes).
fn session_key(session: &str) -> String {
    format!("relay:s:{session}")
}

fn subject_keys(s: &Subject, p: &Periods) -> [String; 6] {
    let n = s.name();
    [
        key_of(&n, "rq"),
        key_of(&n, "tk"),
        key_of(&n, "cc"),
        key_of(&n, "rs"),
        key_of(&n, &format!("sd:{}:{}", p.zone, p.day)),
        key_of(&n, &format!("sm:{}:{}", p.zone, p.month)),
    ]
}

fn uses(v: &[i64], n: usize) -> Result<Vec<Use>, Error> {
    let now = *v.first().ok_or_else(|| Error::Protocol("empty answer".into()))?;
    if v.len() != 1 + 9 * n {
        return Err(Error::Protocol(format!("{} values for {n} subjects", v.len())));
    }
    let u = |x: i64| x.max(0) as u64;
    Ok(v[1..]
        .chunks(9)
        .map(|c| Use {
            now_ms: now,
            requests: u(c[0]),
            requests_reset_ms: c[1],
            tokens: u(c[2]),
            tokens_reset_ms: c[3],
            in_flight: u(c[4]),
            day_nano: u(c[5]),
            month_nano: u(c[6]),
            reserved_nano: u(c[7]),
        })
        .collect())
}

/// Counters in one Redis (or a Sentinel-managed primary).
#[derive(Clone)]
pub struct RedisCounters {
    con: ConnectionManager,
    /// Every call's bound, ms (`limits.store_timeout_ms`, live).
    timeout_ms: Arc<AtomicU64>,
}

impl RedisCounters {
    /// Connects lazily: a Redis that is down at start is not an error here (the limiter's
    /// health check finds it and applies the policy).
    pub fn new(url: &str, password: Option<String>, timeout: Duration) -> Result<Self, Error> {
        if !["redis://", "rediss://", "unix://", "redis+unix://"]
            .iter()
            .any(|p| url.starts_with(p))
        {
            return Err(Error::Store(
                "a Redis URL starts with redis:// (or rediss:// for TLS), e.g. redis://HOST:6379/0".into(),
            ));
        }
        let mut info: redis::ConnectionInfo = redis::IntoConnectionInfo::into_connection_info(url)
            .map_err(|e| Error::Store(format!("{:?}", e.kind())))?;
        if let Some(p) = password {
            let settings = info.redis_settings().clone().set_password(p);
            info = info.set_redis_settings(settings);
        }
        let client = redis::Client::open(info).map_err(|e| Error::Store(format!("{:?}", e.kind())))?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(10)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let con = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| Error::Store(format!("{:?}", e.kind())))?;
        Ok(Self {
            con,
            timeout_ms: Arc::new(AtomicU64::new(timeout.as_millis().max(1) as u64)),
        })
    }

    pub fn set_timeout(&self, t: Duration) {
        self.timeout_ms.store(t.as_millis().max(1) as u64, Ordering::Relaxed);
    }

    async fn run<T: redis::FromRedisValue>(&self, inv: redis::ScriptInvocation<'_>) -> Result<T, Error> {
        let ms = self.timeout_ms.load(Ordering::Relaxed);
        self.run_within(inv, ms).await
    }

    async fn run_within<T: redis::FromRedisValue>(
        &self,
        inv: redis::ScriptInvocation<'_>,
        ms: u64,
    ) -> Result<T, Error> {
        let mut con = self.con.clone();
        match tokio::time::timeout(Duration::from_millis(ms), inv.invoke_async::<T>(&mut con)).await {
            Ok(Ok(v)) => Ok(v),
            // The error's kind and detail, never the URL (it may hold a password).
            Ok(Err(e)) => Err(Error::Store(format!("{:?}: {}", e.kind(), e.detail().unwrap_or("")))),
            Err(_) => Err(Error::Timeout(ms)),
        }
    }

    async fn cmd<T: redis::FromRedisValue>(&self, cmd: redis::Cmd) -> Result<T, Error> {
        let mut con = self.con.clone();
        let ms = self.timeout_ms.load(Ordering::Relaxed);
        match tokio::time::timeout(Duration::from_millis(ms), cmd.query_async::<T>(&mut con)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(Error::Store(format!("{:?}: {}", e.kind(), e.detail().unwrap_or("")))),
            Err(_) => Err(Error::Timeout(ms)),
        }
    }

    /// The account a sticky session is bound to, renewing the binding for `ttl`.
    pub async fn session_get(&self, session: &str, ttl: Duration) -> Result<Option<String>, Error> {
        let mut c = redis::cmd("GETEX");
        c.arg(session_key(session)).arg("PX").arg(ttl.as_millis().max(1) as u64);
        self.cmd(c).await
    }

    /// Binds a sticky session to an account for `ttl`.
    pub async fn session_bind(&self, session: &str, account_id: &str, ttl: Duration) -> Result<(), Error> {
        let mut c = redis::cmd("SET");
        c.arg(session_key(session))
            .arg(account_id)
            .arg("PX")
            .arg(ttl.as_millis().max(1) as u64);
        self.cmd::<()>(c).await
    }

    /// Undoes an admission whose answer was lost (see `CANCEL`); sent on the same connection
    /// after the admission, so it runs after it.
    pub async fn cancel(&self, subjects: &[Subject], lease: &str, periods: &Periods) -> Result<(), Error> {
        let mut inv = CANCEL_SCRIPT.prepare_invoke();
        for s in subjects {
            for k in subject_keys(s, periods) {
                inv.key(k);
            }
        }
        inv.arg(0).arg(lease);
        self.run_within::<i64>(inv, BACKGROUND_TIMEOUT.as_millis() as u64)
            .await
            .map(|_| ())
    }

    /// `finish` with the background bound (a retried settlement).
    pub async fn finish_slowly(
        &self,
        subjects: &[Subject],
        lease: &str,
        tokens: u64,
        cost_nano: u64,
        periods: &Periods,
    ) -> Result<(), Error> {
        let inv = finish_invocation(subjects, lease, tokens, cost_nano, periods, None);
        self.run_within::<i64>(inv, BACKGROUND_TIMEOUT.as_millis() as u64)
            .await
            .map(|_| ())
    }

    /// Keeps this data plane's leases alive: (subject, lease, reservation `tokens:cost:second`).
    /// `force`: re-add them (an earlier chunk found Redis had lost them). Ok(true): re-added.
    pub async fn renew_held(
        &self,
        node: &str,
        leases: &[(String, String, String)],
        force: bool,
    ) -> Result<bool, Error> {
        if leases.is_empty() {
            return Ok(force);
        }
        let mut inv = RENEW_SCRIPT.key(format!("relay:alive:{node}"));
        for (subject, _, _) in leases {
            inv.key(key_of(subject, "cc")).key(key_of(subject, "rs"));
        }
        inv.arg(0).arg(LEASE_TTL_MS).arg(if force { "1" } else { "0" });
        for (_, lease, reservation) in leases {
            inv.arg(lease).arg(reservation);
        }
        self.run_within::<i64>(inv, BACKGROUND_TIMEOUT.as_millis() as u64)
            .await
            .map(|v| v == 1)
    }

    /// Registers this data plane as live for `ttl_ms` and returns how many are.
    pub async fn heartbeat(&self, node: &str, ttl_ms: i64) -> Result<u64, Error> {
        let mut inv = HEARTBEAT_SCRIPT.key("relay:planes");
        inv.arg(0).arg(node).arg(ttl_ms);
        self.run::<i64>(inv).await.map(|n| n.max(1) as u64)
    }
}

/// The 7 per-subject arguments of ADMIT, PEEK and FINISH: limits and committed spend.
fn subject_args(inv: &mut redis::ScriptInvocation<'_>, s: &Subject) {
    let l = &s.limits;
    inv.arg(l.rpm)
        .arg(l.tpm)
        .arg(l.concurrency)
        .arg(l.daily_nano)
        .arg(l.monthly_nano)
        .arg(s.committed.day_nano)
        .arg(s.committed.month_nano);
}

fn finish_invocation<'a>(
    subjects: &[Subject],
    lease: &str,
    tokens: u64,
    cost_nano: u64,
    periods: &Periods,
    now_ms: Option<i64>,
) -> redis::ScriptInvocation<'a> {
    const DAY_MS: i64 = 86_400_000;
    let mut inv = FINISH_SCRIPT.prepare_invoke();
    for s in subjects {
        for k in subject_keys(s, periods) {
            inv.key(k);
        }
    }
    inv.arg(now_arg(now_ms))
        .arg(lease)
        .arg(tokens)
        .arg(cost_nano)
        .arg(periods.day_end_ms + DAY_MS)
        .arg(periods.month_end_ms + DAY_MS);
    for s in subjects {
        subject_args(&mut inv, s);
    }
    inv
}

fn now_arg(now_ms: Option<i64>) -> i64 {
    now_ms.unwrap_or(0)
}

#[async_trait::async_trait]
impl Counters for RedisCounters {
    async fn admit(&self, ask: &Ask, lease: &str, now_ms: Option<i64>) -> Result<Result<Vec<Use>, Refusal>, Error> {
        let mut inv = ADMIT_SCRIPT.prepare_invoke();
        for s in &ask.subjects {
            for k in subject_keys(s, &ask.periods) {
                inv.key(k);
            }
        }
        inv.arg(now_arg(now_ms))
            .arg(lease)
            .arg(LEASE_TTL_MS)
            .arg(ask.tokens)
            .arg(ask.cost_nano)
            .arg(ask.periods.day_end_ms)
            .arg(ask.periods.month_end_ms);
        for s in &ask.subjects {
            subject_args(&mut inv, s);
        }
        let v: Vec<i64> = self.run(inv).await?;
        match v.first() {
            Some(0) if v.len() == 6 => Ok(Err(Refusal {
                subject: v[1].max(0) as usize,
                kind: LimitKind::from_code(v[2]).ok_or_else(|| Error::Protocol(format!("limit code {}", v[2])))?,
                limit: v[3].max(0) as u64,
                retry_after_ms: v[4].max(1000) as u64,
                by_reservations: v[5] == 1,
            })),
            Some(1) => uses(&v[1..], ask.subjects.len()).map(Ok),
            _ => Err(Error::Protocol(format!("admit answered {} values", v.len()))),
        }
    }

    async fn finish(
        &self,
        subjects: &[Subject],
        lease: &str,
        tokens: u64,
        cost_nano: u64,
        periods: &Periods,
        now_ms: Option<i64>,
    ) -> Result<(), Error> {
        let inv = finish_invocation(subjects, lease, tokens, cost_nano, periods, now_ms);
        self.run::<i64>(inv).await.map(|_| ())
    }

    async fn renew(&self, leases: &[(String, String)], now_ms: Option<i64>) -> Result<(), Error> {
        if leases.is_empty() {
            return Ok(());
        }
        let mut inv = RENEW_SCRIPT.key("relay:alive:counters");
        for (subject, _) in leases {
            inv.key(key_of(subject, "cc")).key(key_of(subject, "rs"));
        }
        inv.arg(now_arg(now_ms)).arg(LEASE_TTL_MS).arg("0");
        for (_, lease) in leases {
            inv.arg(lease).arg("0:0:0");
        }
        self.run::<i64>(inv).await.map(|_| ())
    }

    async fn peek(&self, subjects: &[Subject], periods: &Periods, now_ms: Option<i64>) -> Result<Vec<Use>, Error> {
        let mut inv = PEEK_SCRIPT.prepare_invoke();
        for s in subjects {
            for k in subject_keys(s, periods) {
                inv.key(k);
            }
        }
        inv.arg(now_arg(now_ms));
        for s in subjects {
            subject_args(&mut inv, s);
        }
        let v: Vec<i64> = self.run(inv).await?;
        uses(&v, subjects.len())
    }
}
