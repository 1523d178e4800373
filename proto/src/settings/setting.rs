//! What a setting is: its type, bounds, default and meaning; checking a value against it, and
//! reading a stored value (the default when absent or unparseable).

use super::values::{fraction, is_http_url, parse_origins, parse_percents, share, MAX_ORIGINS_BYTES};
use super::{is_secret, SettingError};
use std::collections::BTreeMap;

/// What a setting holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Type {
    /// Milliseconds, an integer in `min..=max`.
    Millis,
    /// An integer in `min..=max`.
    Count,
    /// A fraction in (0, 1], or a percentage in (1, 100].
    Fraction,
    /// A share in [0, 1], or a percentage in (1, 100]: 0 means none.
    Share,
    /// A comma-separated list of model ids.
    Models,
    /// `true` or `false`.
    Bool,
    /// One of the setting's `choices`.
    Choice,
    /// An IANA time zone name (`UTC`, `Europe/Berlin`).
    TimeZone,
    /// An `http://` or `https://` URL.
    Url,
    /// One line of visible text (words separated by single spaces allowed).
    Text,
    /// Exact browser origins (`scheme://host[:port]`), comma-separated, or `*` alone.
    Origins,
    /// Percentages in 1..=100, comma-separated (`80,100`).
    Percents,
}

impl Type {
    pub fn as_str(self) -> &'static str {
        match self {
            Type::Millis => "milliseconds",
            Type::Count => "integer",
            Type::Fraction => "fraction",
            Type::Share => "share",
            Type::Models => "model list",
            Type::Bool => "boolean",
            Type::Choice => "choice",
            Type::TimeZone => "time zone",
            Type::Url => "URL",
            Type::Text => "text",
            Type::Origins => "origin list",
            Type::Percents => "percentages",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setting {
    pub name: &'static str,
    pub ty: Type,
    /// Inclusive bounds for `Millis` and `Count`.
    pub min: u64,
    pub max: u64,
    /// As stored; empty for "none" (`models`: the built-in list).
    pub default: &'static str,
    /// May be overridden per account as `account.<ACCOUNT>.<name>`.
    pub per_account: bool,
    /// The values a `Choice` may take.
    pub choices: &'static [&'static str],
    pub description: &'static str,
}

impl Setting {
    /// "1..=20", "0 < x <= 1 (or a percentage)", "ids, comma-separated".
    pub fn range(&self) -> String {
        match self.ty {
            Type::Millis | Type::Count => format!("{}..={}", self.min, self.max),
            Type::Fraction => "0 < x <= 1, or a percentage 1 < x <= 100".into(),
            Type::Share => "0 <= x <= 1 (0: none), or a percentage 1 < x <= 100".into(),
            Type::Models => "model ids, comma-separated".into(),
            Type::Bool => "true or false".into(),
            Type::Choice => self.choices.join(", "),
            Type::TimeZone => "an IANA name such as UTC or Europe/Berlin".into(),
            Type::Url => "http:// or https:// URL, without user:password@".into(),
            Type::Text => "visible text, at most 512 characters".into(),
            Type::Origins => "exact origins scheme://host[:port], comma-separated, or * alone".into(),
            Type::Percents => "percentages 1..=100, comma-separated".into(),
        }
    }

    /// Checks a value for this setting.
    pub fn check(&self, value: &str) -> Result<(), SettingError> {
        let v = value.trim();
        let invalid = || SettingError::Invalid {
            name: self.name.to_string(),
            // A secret is never repeated back (it would reach logs and terminals).
            value: if is_secret(self.name) {
                "(secret, not shown)".to_string()
            } else {
                value.chars().take(64).collect()
            },
            expected: format!("{} in {}", self.ty.as_str(), self.range()),
        };
        // A number is short: with the value cap only a model list may be long, so
        // `settings list` stays small whatever is stored.
        let cap = match self.ty {
            Type::Models => usize::MAX,
            Type::Origins => MAX_ORIGINS_BYTES,
            Type::Url | Type::Text => 512,
            _ => 32,
        };
        if v.len() > cap {
            return Err(invalid());
        }
        match self.ty {
            Type::Millis | Type::Count => match v.parse::<u64>() {
                Ok(n) if (self.min..=self.max).contains(&n) => Ok(()),
                _ => Err(invalid()),
            },
            Type::Fraction => match v.parse::<f64>().ok().and_then(fraction) {
                Some(_) => Ok(()),
                None => Err(invalid()),
            },
            Type::Share => match v.parse::<f64>().ok().and_then(share) {
                Some(_) => Ok(()),
                None => Err(invalid()),
            },
            Type::Bool => match v {
                "true" | "false" => Ok(()),
                _ => Err(invalid()),
            },
            Type::Choice => match self.choices.contains(&v) {
                true => Ok(()),
                false => Err(invalid()),
            },
            Type::TimeZone => match v.parse::<chrono_tz::Tz>() {
                Ok(_) => Ok(()),
                Err(_) => Err(invalid()),
            },
            Type::Url => match is_http_url(v) {
                true => Ok(()),
                false => Err(invalid()),
            },
            Type::Text => {
                let ok = !v.is_empty() && v.chars().all(|c| c == ' ' || (!c.is_control() && !c.is_whitespace()));
                if ok {
                    Ok(())
                } else {
                    Err(invalid())
                }
            }
            Type::Percents => match parse_percents(v) {
                Some(_) => Ok(()),
                None => Err(invalid()),
            },
            Type::Origins => match parse_origins(v) {
                Ok(_) => Ok(()),
                Err(reason) => Err(SettingError::BadOrigins {
                    name: self.name.to_string(),
                    reason,
                }),
            },
            Type::Models => {
                let ok = !v.is_empty()
                    && v.split(',')
                        .map(str::trim)
                        .all(|m| !m.is_empty() && m.chars().all(|c| c.is_ascii_graphic() && c != '*'));
                if ok {
                    Ok(())
                } else {
                    Err(invalid())
                }
            }
        }
    }

    /// The value in `values` (or `raw`), parsed, else the default.
    pub fn u64_in(&self, values: &BTreeMap<String, String>) -> u64 {
        self.u64_of(values.get(self.name).map(String::as_str))
    }

    /// `raw` parsed as an integer in range, else the default.
    pub fn u64_of(&self, raw: Option<&str>) -> u64 {
        raw.and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|n| (self.min..=self.max).contains(n))
            .or_else(|| self.default.parse().ok())
            .unwrap_or(self.min)
    }

    /// The value in `values` as a boolean, else the default.
    pub fn bool_in(&self, values: &BTreeMap<String, String>) -> bool {
        match values.get(self.name).map(|v| v.trim()) {
            Some("true") => true,
            Some("false") => false,
            _ => self.default == "true",
        }
    }

    /// The value in `values` if it is one of the choices, else the default.
    pub fn choice_in(&self, values: &BTreeMap<String, String>) -> &'static str {
        let v = values.get(self.name).map(|v| v.trim()).unwrap_or("");
        self.choices.iter().copied().find(|c| *c == v).unwrap_or(self.default)
    }

    /// The value in `values` as percentages ([`parse_percents`]), else the default.
    pub fn percents_in(&self, values: &BTreeMap<String, String>) -> Vec<u64> {
        values
            .get(self.name)
            .and_then(|v| parse_percents(v))
            .or_else(|| parse_percents(self.default))
            .unwrap_or_default()
    }

    /// The value in `values` (trimmed) if it passes [`Setting::check`], else the default (`Url`, `Text`).
    pub fn str_in<'a>(&'a self, values: &'a BTreeMap<String, String>) -> &'a str {
        match values.get(self.name) {
            Some(v) if self.check(v).is_ok() => v.trim(),
            _ => self.default,
        }
    }

    /// The value in `values` as a time zone, else the default (UTC).
    pub fn tz_in(&self, values: &BTreeMap<String, String>) -> chrono_tz::Tz {
        values
            .get(self.name)
            .and_then(|v| v.trim().parse::<chrono_tz::Tz>().ok())
            .or_else(|| self.default.parse().ok())
            .unwrap_or(chrono_tz::UTC)
    }

    /// `raw` parsed as a fraction (a share, 0 allowed, for [`Type::Share`]), else the default.
    pub fn fraction_of(&self, raw: Option<&str>) -> f64 {
        let parse = if self.ty == Type::Share { share } else { fraction };
        raw.and_then(|v| v.trim().parse::<f64>().ok())
            .and_then(parse)
            .or_else(|| self.default.parse::<f64>().ok())
            .unwrap_or(1.0)
    }
}
