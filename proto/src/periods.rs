//! Budget periods: the calendar day and month, in the operator's time zone
//! (`limits.timezone`), that daily and monthly budgets count. The control plane
//! sums stored spend over them and data planes label their counters with them,
//! so both compute them here, identically.

use chrono::{Datelike, LocalResult, NaiveDate, TimeZone};
use chrono_tz::Tz;

/// The day and month that hold one instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Periods {
    /// The time zone they are days and months of (`UTC`, `Europe/Berlin`): counters are named by
    /// it too, so a changed `limits.timezone` never mistakes one zone's day for another's.
    pub zone: String,
    /// `2026-12-04`.
    pub day: String,
    /// `2026-12`.
    pub month: String,
    /// Unix milliseconds: the day's first instant and the next day's.
    pub day_start_ms: i64,
    pub day_end_ms: i64,
    /// Unix milliseconds: the month's first instant and the next month's.
    pub month_start_ms: i64,
    pub month_end_ms: i64,
}

/// The first instant of local date `d` in `tz` (a midnight that a DST change skips is the first
/// instant after the gap).
fn start_of(tz: Tz, d: NaiveDate) -> i64 {
    let midnight = d.and_hms_opt(0, 0, 0).unwrap_or_default();
    match tz.from_local_datetime(&midnight) {
        LocalResult::Single(t) => t.timestamp_millis(),
        LocalResult::Ambiguous(a, _) => a.timestamp_millis(),
        // A gap (a few zones skip midnight): the first hour that exists.
        LocalResult::None => (1..=3)
            .find_map(|h| tz.from_local_datetime(&d.and_hms_opt(h, 0, 0)?).earliest())
            .map_or_else(|| midnight.and_utc().timestamp_millis(), |t| t.timestamp_millis()),
    }
}

/// The periods that hold `now_ms` (unix milliseconds) in `tz`.
pub fn periods(tz: Tz, now_ms: i64) -> Periods {
    let local = match tz.timestamp_millis_opt(now_ms) {
        LocalResult::Single(t) | LocalResult::Ambiguous(t, _) => t.date_naive(),
        LocalResult::None => chrono::DateTime::from_timestamp_millis(now_ms)
            .unwrap_or_default()
            .date_naive(),
    };
    let next_day = local.succ_opt().unwrap_or(local);
    let month_first = local.with_day(1).unwrap_or(local);
    let next_month = if local.month() == 12 {
        NaiveDate::from_ymd_opt(local.year() + 1, 1, 1)
    } else {
        NaiveDate::from_ymd_opt(local.year(), local.month() + 1, 1)
    }
    .unwrap_or(next_day);
    Periods {
        zone: tz.name().to_string(),
        day: local.format("%Y-%m-%d").to_string(),
        month: local.format("%Y-%m").to_string(),
        day_start_ms: start_of(tz, local),
        day_end_ms: start_of(tz, next_day),
        month_start_ms: start_of(tz, month_first),
        month_end_ms: start_of(tz, next_month),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_day_and_month() {
        // 2026-12-04T06:41:00Z
        let p = periods(chrono_tz::UTC, 1_796_366_460_000);
        assert_eq!(p.day, "2026-12-04");
        assert_eq!(p.month, "2026-12");
        assert_eq!(p.day_end_ms - p.day_start_ms, 86_400_000);
        assert_eq!(p.day_start_ms, 1_796_342_400_000);
        assert_eq!(p.month_end_ms, 1_798_761_600_000, "2027-01-01T00:00Z");
    }

    #[test]
    fn a_zone_east_of_utc_is_already_tomorrow() {
        // 2026-12-04T23:30Z is 2026-12-05 08:30 in Tokyo.
        let at = 1_796_342_400_000 + 23 * 3_600_000 + 30 * 60_000;
        let p = periods(chrono_tz::Asia::Tokyo, at);
        assert_eq!(p.day, "2026-12-05");
        assert_eq!(p.day_start_ms, 1_796_342_400_000 + 15 * 3_600_000);
    }

    #[test]
    fn a_dst_day_is_23_hours_long() {
        // 2026-03-29: Europe/Berlin moves from +01:00 to +02:00.
        let noon = 1_774_785_600_000; // 2026-03-29T12:00Z
        let p = periods(chrono_tz::Europe::Berlin, noon);
        assert_eq!(p.day, "2026-03-29");
        assert_eq!(p.day_end_ms - p.day_start_ms, 23 * 3_600_000);
        assert_eq!(p.month, "2026-03");
    }
}
