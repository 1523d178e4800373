//! Parsing and formatting helpers: money (exact, integer-based), times and
//! durations, and the string names of the proto enums.
//!
//! Money never goes through floating point: USD amounts on the command line are
//! parsed as decimal strings into micro-USD, and costs (pico-USD) are formatted
//! from integers.

use chrono::{DateTime, NaiveDate, SecondsFormat, Utc};

/// Micro-USD in one USD.
pub const MICROS_PER_USD: u64 = 1_000_000;
/// Pico-USD in one micro-USD.
pub const PICOS_PER_MICRO: u64 = 1_000_000;
/// At most this many fractional digits in a USD amount (micro-USD precision).
const MAX_DECIMALS: usize = 6;

/// Parses a non-negative USD amount ("3", "0.30", "18.75", ".5") into micro-USD,
/// exactly. At most 6 significant fractional digits; no sign, exponent or unit.
pub fn parse_usd(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if t.starts_with('-') {
        return Err(format!("{s:?} is negative; amounts must be >= 0"));
    }
    let (int_part, frac_part) = match t.split_once('.') {
        Some((i, f)) => (i, f),
        None => (t, ""),
    };
    let all_digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    if (int_part.is_empty() && frac_part.is_empty()) || !all_digits(int_part) || !all_digits(frac_part) {
        return Err(format!(
            "{s:?} is not a USD amount (expected a decimal like 3, 0.30 or 18.75)"
        ));
    }
    // Extra fractional digits are tolerated only when they are zeros ("0.1000000").
    let significant = frac_part.trim_end_matches('0');
    if significant.len() > MAX_DECIMALS {
        return Err(format!(
            "{s:?} has more than {MAX_DECIMALS} decimal places (micro-USD is the smallest unit)"
        ));
    }
    let too_large = || format!("{s:?} is too large");
    let mut micros: u64 = 0;
    for b in int_part.bytes() {
        micros = micros
            .checked_mul(10)
            .and_then(|m| m.checked_add(u64::from(b - b'0')))
            .ok_or_else(too_large)?;
    }
    micros = micros.checked_mul(MICROS_PER_USD).ok_or_else(too_large)?;
    let mut frac: u64 = 0;
    for i in 0..MAX_DECIMALS {
        let digit = significant.as_bytes().get(i).map_or(0, |b| u64::from(b - b'0'));
        frac = frac * 10 + digit;
    }
    micros.checked_add(frac).ok_or_else(too_large)
}

/// Formats micro-USD as a USD decimal with at least two and at most six
/// decimals, dropping trailing zeros beyond the second: 3_000_000 → "3.00",
/// 300_000 → "0.30", 18_750_000 → "18.75", 1 → "0.000001".
pub fn format_micros(micros: u64) -> String {
    let frac = format!("{:06}", micros % MICROS_PER_USD);
    let trimmed = frac.trim_end_matches('0');
    let shown = if trimmed.len() < 2 { &frac[..2] } else { trimmed };
    format!("{}.{shown}", micros / MICROS_PER_USD)
}

/// Pico-USD to micro-USD, rounded half-up.
pub fn picos_to_micros(picos: u64) -> u64 {
    picos / PICOS_PER_MICRO + u64::from(picos % PICOS_PER_MICRO >= PICOS_PER_MICRO / 2)
}

/// A cost in pico-USD as USD with exactly six decimals (rounded half-up to the
/// micro-dollar): 3_000_000_000 → "0.003000".
pub fn format_cost(picos: u64) -> String {
    let micros = picos_to_micros(picos);
    format!("{}.{:06}", micros / MICROS_PER_USD, micros % MICROS_PER_USD)
}

/// The cache prices relay assumes when only the input price is given, in integer
/// micro-USD per MTok (rounded half-up): 5-minute cache writes cost 1.25× input,
/// 1-hour writes 2× input, cache reads 0.1× input.
pub fn default_cache_prices(input: u64) -> Result<(u64, u64, u64), String> {
    let wide = u128::from(input);
    let narrow = |v: u128| u64::try_from(v).map_err(|_| "input price is too large".to_string());
    Ok((narrow((wide * 5 + 2) / 4)?, narrow(wide * 2)?, narrow((wide + 5) / 10)?))
}

/// A byte count: a number with an optional unit (`K`, `KB`, `KiB`, `M`, `MB`, `MiB`; all 1024-based).
pub fn byte_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{t:?} is not a byte count (e.g. 65536, 256KiB, 1MiB)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1024,
        "m" | "mb" | "mib" => 1024 * 1024,
        _ => return Err(format!("{t:?} is not a byte count (units: KiB, MiB)")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("{t:?} is too large"))
}

/// A duration as milliseconds: `500ms`, a plain number of milliseconds, or what
/// [`parse_duration_ms`] takes (`2s`, `1m`, …).
pub fn short_duration_ms(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let ms = match t.strip_suffix("ms") {
        Some(n) => n.trim().parse::<i64>().map_err(|_| format!("invalid duration {t:?}"))?,
        None if t.bytes().all(|b| b.is_ascii_digit()) && !t.is_empty() => {
            t.parse::<i64>().map_err(|_| format!("invalid duration {t:?}"))?
        }
        None => parse_duration_ms(t)?,
    };
    u64::try_from(ms).map_err(|_| format!("invalid duration {t:?}"))
}

/// Parses a duration such as `30m`, `24h`, `7d` or `1d12h` into milliseconds.
/// Units: `s`, `m`, `h`, `d`, `w`.
pub fn parse_duration_ms(s: &str) -> Result<i64, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty duration".into());
    }
    let mut total: i64 = 0;
    let mut number = String::new();
    for c in t.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let unit_ms: i64 = match c {
            's' => 1_000,
            'm' => 60_000,
            'h' => 3_600_000,
            'd' => 86_400_000,
            'w' => 7 * 86_400_000,
            _ => return Err(format!("{s:?} is not a duration (expected e.g. 30m, 24h, 7d)")),
        };
        if number.is_empty() {
            return Err(format!("{s:?} is not a duration (a number must precede {c:?})"));
        }
        let n: i64 = number.parse().map_err(|_| format!("{s:?} is too large"))?;
        number.clear();
        total = n
            .checked_mul(unit_ms)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| format!("{s:?} is too large"))?;
    }
    if !number.is_empty() {
        return Err(format!("{s:?} lacks a unit (use s, m, h, d or w, e.g. {number}h)"));
    }
    Ok(total)
}

/// Parses an absolute instant: RFC 3339 (`2025-01-31T12:00:00Z`, any offset) or
/// a bare date (`2025-01-31`, midnight UTC). Returns unix milliseconds.
pub fn parse_instant(s: &str) -> Result<i64, String> {
    let t = s.trim();
    if let Ok(dt) = DateTime::parse_from_rfc3339(t) {
        return Ok(dt.timestamp_millis());
    }
    if let Ok(d) = NaiveDate::parse_from_str(t, "%Y-%m-%d") {
        if let Some(dt) = d.and_hms_opt(0, 0, 0) {
            return Ok(dt.and_utc().timestamp_millis());
        }
    }
    Err(format!(
        "{s:?} is not an RFC 3339 time (expected e.g. 2025-01-31T12:00:00Z)"
    ))
}

/// Parses a point in the past: `now`, a duration ago (`24h`, `7d`, `30m`), or an
/// absolute instant (see [`parse_instant`]). `now_ms` anchors relative values.
pub fn parse_time_at(s: &str, now_ms: i64) -> Result<i64, String> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("now") {
        return Ok(now_ms);
    }
    if t.starts_with(|c: char| c.is_ascii_digit()) && t.ends_with(|c: char| c.is_ascii_alphabetic()) && !t.contains('-')
    {
        return Ok(now_ms.saturating_sub(parse_duration_ms(t)?));
    }
    parse_instant(t).map_err(|_| format!("{s:?} is neither an RFC 3339 time nor a duration like 24h, 7d or 30m"))
}

/// Clap value parser for `--since`/`--until`.
pub fn time_arg(s: &str) -> Result<i64, String> {
    parse_time_at(s, Utc::now().timestamp_millis())
}

/// Clap value parser for RFC 3339 instants such as `--expires`.
pub fn instant_arg(s: &str) -> Result<i64, String> {
    parse_instant(s)
}

/// Clap value parser for `--expires` on updates: an instant, or `never` (0).
pub fn expiry_arg(s: &str) -> Result<i64, String> {
    if s.trim().eq_ignore_ascii_case("never") {
        return Ok(0);
    }
    parse_instant(s).map_err(|e| format!("{e}, or `never`"))
}

/// Clap value parser for USD amounts (to micro-USD).
pub fn usd_arg(s: &str) -> Result<u64, String> {
    parse_usd(s)
}

/// What a budget flag takes, as its errors say.
const BUDGET_EXPECTED: &str = "expected an amount in USD such as 5 or 12.50 (0 = no budget)";

/// Clap value parser for `--daily-budget`/`--monthly-budget`: a USD amount (to micro-USD), not
/// negative.
pub fn budget_arg(s: &str) -> Result<u64, String> {
    if s.trim().starts_with('-') {
        return Err(format!("a budget cannot be negative; {BUDGET_EXPECTED}"));
    }
    parse_usd(s).map_err(|e| {
        // The amount's own problem when it is a number at all (too precise, too large).
        if e.contains("decimal places") || e.contains("too large") {
            format!("{e}; {BUDGET_EXPECTED}")
        } else {
            BUDGET_EXPECTED.to_string()
        }
    })
}

/// A limit that counts something: a whole number, not negative, at most `max`.
fn count_arg(s: &str, what: &str, example: u64, max: u64) -> Result<u64, String> {
    let expected = format!("expected a whole number of {what} such as {example} (0 = unlimited)");
    let t = s.trim();
    if t.starts_with('-') {
        return Err(format!("a limit cannot be negative; {expected}"));
    }
    if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
        return Err(expected);
    }
    match t.parse::<u64>() {
        Ok(v) if v <= max => Ok(v),
        _ => Err(format!("at most {max}; {expected}")),
    }
}

/// Clap value parser for `--rpm`.
pub fn rpm_arg(s: &str) -> Result<u32, String> {
    count_arg(s, "requests per minute", 60, u64::from(u32::MAX)).map(|v| u32::try_from(v).unwrap_or(u32::MAX))
}

/// Clap value parser for `--tpm`.
pub fn tpm_arg(s: &str) -> Result<u64, String> {
    count_arg(s, "tokens per minute", 100_000, u64::MAX)
}

/// Clap value parser for `--concurrency`.
pub fn concurrency_arg(s: &str) -> Result<u32, String> {
    count_arg(s, "concurrent requests", 4, u64::from(u32::MAX)).map(|v| u32::try_from(v).unwrap_or(u32::MAX))
}

/// Largest account weight the control plane accepts.
pub const MAX_WEIGHT: u32 = 10_000;

/// Clap value parser for `--weight`: a share of its priority tier's traffic, 1..=10000. 0 is
/// refused (it used to be taken silently as 1): an account that should get no traffic is
/// disabled, not weighted 0.
pub fn weight_arg(s: &str) -> Result<u32, String> {
    let expected =
        format!("expected a whole number in 1..={MAX_WEIGHT} (the account's share of its priority tier's traffic)");
    let t = s.trim();
    if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
        return Err(expected);
    }
    match t.parse::<u32>() {
        Ok(0) => Err(format!(
            "weight 0 is not a weight; {expected}. To stop routing to an account, use `relayctl account disable ACCOUNT`"
        )),
        Ok(v) if v <= MAX_WEIGHT => Ok(v),
        _ => Err(format!("at most {MAX_WEIGHT}; {expected}")),
    }
}

/// Unix milliseconds as RFC 3339 UTC (fractional seconds only when non-zero);
/// `None` for 0 (unset) or out-of-range values.
pub fn format_time(ms: i64) -> Option<String> {
    if ms == 0 {
        return None;
    }
    DateTime::<Utc>::from_timestamp_millis(ms).map(|dt| dt.to_rfc3339_opts(SecondsFormat::AutoSi, true))
}

/// A proto enum's name as relayctl spells it: the type prefix dropped, lower
/// case, `-` for `_` (`ACCOUNT_KIND_ANTHROPIC_API_KEY` → `anthropic-api-key`).
/// Values this build does not know show as `unknown(N)`.
pub fn enum_label(name: Option<&str>, prefix: &str, raw: i32) -> String {
    match name {
        Some(n) => n
            .strip_prefix(prefix)
            .unwrap_or(n)
            .to_ascii_lowercase()
            .replace('_', "-"),
        None => format!("unknown({raw})"),
    }
}

/// The inverse of [`enum_label`]: the proto enum name for a label.
pub fn enum_name(label: &str, prefix: &str) -> String {
    format!("{prefix}{}", label.to_ascii_uppercase().replace('-', "_"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn usd_parses_exactly() {
        assert_eq!(parse_usd("3").unwrap(), 3_000_000);
        assert_eq!(parse_usd("0.30").unwrap(), 300_000);
        assert_eq!(parse_usd("0.3").unwrap(), 300_000);
        assert_eq!(parse_usd("18.75").unwrap(), 18_750_000);
        assert_eq!(parse_usd("0.000001").unwrap(), 1);
        assert_eq!(parse_usd("1.100000").unwrap(), 1_100_000);
        assert_eq!(parse_usd("1.1000000").unwrap(), 1_100_000);
        assert_eq!(parse_usd(".5").unwrap(), 500_000);
        assert_eq!(parse_usd("5.").unwrap(), 5_000_000);
        assert_eq!(parse_usd("0").unwrap(), 0);
        assert_eq!(parse_usd(" 15 ").unwrap(), 15_000_000);
        // Decimal string arithmetic: no float rounding.
        assert_eq!(parse_usd("0.29").unwrap(), 290_000);
        assert_eq!(parse_usd("18446744073709.551615").unwrap(), u64::MAX);
    }

    #[test]
    fn usd_rejects_garbage() {
        for bad in [
            "",
            " ",
            ".",
            "-1",
            "-0.5",
            "+1",
            "1e3",
            "abc",
            "1.2.3",
            "$3",
            "1,5",
            "0.0000001",
            "3 USD",
            "18446744073709.551616",
            "99999999999999999999",
        ] {
            assert!(parse_usd(bad).is_err(), "{bad:?} should be rejected");
        }
        assert!(parse_usd("-1").unwrap_err().contains("negative"));
        assert!(parse_usd("0.0000001").unwrap_err().contains("decimal places"));
    }

    #[test]
    fn limits_parse_or_say_what_they_expect() {
        assert_eq!(rpm_arg("60").unwrap(), 60);
        assert_eq!(rpm_arg("0").unwrap(), 0);
        assert_eq!(tpm_arg(" 100000 ").unwrap(), 100_000);
        assert_eq!(concurrency_arg("4").unwrap(), 4);
        assert_eq!(budget_arg("12.50").unwrap(), 12_500_000);
        assert_eq!(budget_arg("0").unwrap(), 0);
        let e = rpm_arg("-5").unwrap_err();
        assert!(
            e.contains("cannot be negative") && e.contains("requests per minute such as 60"),
            "{e}"
        );
        let e = rpm_arg("abc").unwrap_err();
        assert_eq!(
            e,
            "expected a whole number of requests per minute such as 60 (0 = unlimited)"
        );
        assert!(rpm_arg("1.5").is_err() && rpm_arg("").is_err() && rpm_arg("+3").is_err());
        assert!(rpm_arg("4294967296").unwrap_err().starts_with("at most 4294967295"));
        assert!(concurrency_arg("-1").unwrap_err().contains("concurrent requests"));
        assert!(tpm_arg("1e6").unwrap_err().contains("tokens per minute"));
        let e = budget_arg("-1").unwrap_err();
        assert_eq!(
            e,
            "a budget cannot be negative; expected an amount in USD such as 5 or 12.50 (0 = no budget)"
        );
        assert_eq!(
            budget_arg("five").unwrap_err(),
            "expected an amount in USD such as 5 or 12.50 (0 = no budget)"
        );
        assert!(budget_arg("$5").is_err());
        assert!(budget_arg("0.0000001").unwrap_err().contains("decimal places"));
    }

    #[test]
    fn micros_format() {
        assert_eq!(format_micros(3_000_000), "3.00");
        assert_eq!(format_micros(300_000), "0.30");
        assert_eq!(format_micros(18_750_000), "18.75");
        assert_eq!(format_micros(3_750_000), "3.75");
        assert_eq!(format_micros(1), "0.000001");
        assert_eq!(format_micros(1_234_500), "1.2345");
        assert_eq!(format_micros(0), "0.00");
        for v in [0, 1, 10, 300_000, 18_750_000, 123_456_789, u64::MAX] {
            assert_eq!(parse_usd(&format_micros(v)).unwrap(), v, "round trip of {v}");
        }
    }

    #[test]
    fn cost_format_is_exact_and_rounds_half_up() {
        assert_eq!(format_cost(3_000_000_000), "0.003000");
        assert_eq!(format_cost(0), "0.000000");
        assert_eq!(format_cost(1_000_000_000_000), "1.000000");
        assert_eq!(format_cost(499_999), "0.000000");
        assert_eq!(format_cost(500_000), "0.000001");
        assert_eq!(format_cost(1_500_000), "0.000002");
        assert_eq!(format_cost(2_499_999), "0.000002");
        assert_eq!(format_cost(12_345_678_900_000), "12.345679");
        assert_eq!(format_cost(u64::MAX), "18446744.073710");
        assert_eq!(picos_to_micros(999_999), 1);
    }

    #[test]
    fn cost_is_a_json_number_with_micro_precision() {
        let n: serde_json::Number = format_cost(3_000_000_000).parse().unwrap();
        assert_eq!(n.as_f64().unwrap(), 0.003);
        let n: serde_json::Number = format_cost(12_345_678_900_000).parse().unwrap();
        assert_eq!(n.as_f64().unwrap(), 12.345679);
    }

    #[test]
    fn cache_price_defaults() {
        assert_eq!(
            default_cache_prices(3_000_000).unwrap(),
            (3_750_000, 6_000_000, 300_000)
        );
        assert_eq!(
            default_cache_prices(15_000_000).unwrap(),
            (18_750_000, 30_000_000, 1_500_000)
        );
        assert_eq!(default_cache_prices(800_000).unwrap(), (1_000_000, 1_600_000, 80_000));
        // Half-up rounding in integer micro-USD.
        assert_eq!(default_cache_prices(2).unwrap(), (3, 4, 0)); // 2.5 → 3, 0.2 → 0
        assert_eq!(default_cache_prices(5).unwrap(), (6, 10, 1)); // 6.25 → 6, 0.5 → 1
        assert_eq!(default_cache_prices(0).unwrap(), (0, 0, 0));
        assert!(default_cache_prices(u64::MAX).is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("30m").unwrap(), 30 * 60_000);
        assert_eq!(parse_duration_ms("24h").unwrap(), 86_400_000);
        assert_eq!(parse_duration_ms("7d").unwrap(), 7 * 86_400_000);
        assert_eq!(parse_duration_ms("1w").unwrap(), 7 * 86_400_000);
        assert_eq!(parse_duration_ms("45s").unwrap(), 45_000);
        assert_eq!(parse_duration_ms("1d12h").unwrap(), 36 * 3_600_000);
        for bad in ["", "h", "24", "7x", "-1h", "1.5h", "99999999999999999999d"] {
            assert!(parse_duration_ms(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn times() {
        let now = 1_700_000_000_000;
        assert_eq!(parse_time_at("24h", now).unwrap(), now - 86_400_000);
        assert_eq!(parse_time_at("30m", now).unwrap(), now - 1_800_000);
        assert_eq!(parse_time_at("now", now).unwrap(), now);
        assert_eq!(parse_time_at("2023-11-14T22:13:20Z", now).unwrap(), 1_700_000_000_000);
        assert_eq!(
            parse_time_at("2023-11-14T23:13:20+01:00", now).unwrap(),
            1_700_000_000_000
        );
        assert_eq!(parse_time_at("2023-11-14T22:13:20.5Z", now).unwrap(), 1_700_000_000_500);
        assert_eq!(parse_time_at("2024-01-01", now).unwrap(), 1_704_067_200_000);
        for bad in ["yesterday", "24", "2024-13-01", "2024-01-01T00:00:00", ""] {
            assert!(parse_time_at(bad, now).is_err(), "{bad:?} should be rejected");
        }
        assert_eq!(expiry_arg("never").unwrap(), 0);
        assert!(instant_arg("7d").is_err());
    }

    #[test]
    fn time_format() {
        assert_eq!(format_time(0), None);
        assert_eq!(format_time(1_700_000_000_000).unwrap(), "2023-11-14T22:13:20Z");
        assert_eq!(format_time(1_700_000_000_500).unwrap(), "2023-11-14T22:13:20.500Z");
        let back = parse_instant(&format_time(1_700_000_000_123).unwrap()).unwrap();
        assert_eq!(back, 1_700_000_000_123);
    }

    #[test]
    fn enum_labels() {
        assert_eq!(
            enum_label(Some("ACCOUNT_KIND_ANTHROPIC_API_KEY"), "ACCOUNT_KIND_", 1),
            "anthropic-api-key"
        );
        assert_eq!(enum_label(Some("ADMIN_ROLE_READ_ONLY"), "ADMIN_ROLE_", 2), "read-only");
        assert_eq!(enum_label(None, "ADMIN_ROLE_", 9), "unknown(9)");
        assert_eq!(enum_name("data-plane", "ADMIN_ROLE_"), "ADMIN_ROLE_DATA_PLANE");
    }
}
