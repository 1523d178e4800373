//! Every operator setting, declared once: name, type, range, default and
//! meaning. The control plane refuses what does not fit here (`relayctl
//! settings set`), `settings list` shows it, and data planes read values
//! through it, so a default or a range is defined in one place. A stored value
//! that does not parse (an old database) reads as the default.
//!
//! `setting.rs`: what a setting is (its type and bounds), checking a value and reading one;
//! `catalogue.rs`: every setting ([`SETTINGS`]); `values.rs`: the value formats (origins,
//! percentages, fractions, URLs, masking secrets); here: which settings stay on the control
//! plane or are secret, looking a name up (`account.<ACCOUNT>.<NAME>` too), and the errors.
//! `proto/tests/settings_coverage.rs` checks that every setting is read by the code that serves.

mod catalogue;
mod setting;
mod values;

pub use catalogue::SETTINGS;
pub use setting::{Setting, Type};
pub use values::{fraction, mask, parse_origins, parse_percents, AllowedOrigins, MAX_ORIGINS_BYTES};

/// Settings read outside the data plane, control plane and limiter sources: by the OAuth crate
/// (`oauth/src`), which relayctl (logins) and the control plane (token refreshes) use.
pub const READ_OUTSIDE_THE_PLANES: &[&str] = &[
    "oauth.authorize_url",
    "oauth.client_id",
    "oauth.redirect_uri",
    "oauth.refresh_ahead_ms",
    "oauth.scopes",
    "oauth.token_url",
];

/// Settings only the control plane reads: they are never pushed to data planes.
pub const CONTROL_PLANE_ONLY: &[&str] = &[
    "notify.budget_thresholds",
    "notify.data_plane_lost_after_ms",
    "notify.rate_limited_after_ms",
    "notify.signing_secret",
    "notify.webhook_format",
    "notify.webhook_url",
];

/// Secret settings: stored sealed with the master key, shown masked by `settings list`, audited
/// masked, kept out of error messages, never pushed to data planes (they are in
/// [`CONTROL_PLANE_ONLY`] too).
pub const SECRET: &[&str] = &["notify.signing_secret", "notify.webhook_url"];

/// Whether `name` is a secret setting ([`SECRET`]).
pub fn is_secret(name: &str) -> bool {
    SECRET.contains(&name)
}

/// Whether `name` stays on the control plane ([`CONTROL_PLANE_ONLY`]).
pub fn is_control_plane_only(name: &str) -> bool {
    CONTROL_PLANE_ONLY.contains(&name)
}

/// The declared setting `name`. Panics never: unknown names are `None`.
pub fn get(name: &str) -> Option<&'static Setting> {
    SETTINGS.iter().find(|s| s.name == name)
}

/// The declared setting `name`, for a name the code knows exists.
pub fn known(name: &str) -> &'static Setting {
    match get(name) {
        Some(s) => s,
        None => &SETTINGS[0],
    }
}

/// The longest value a setting may hold, in bytes.
pub const MAX_VALUE_BYTES: usize = 16 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingError {
    #[error("unknown setting {name:?}{}; the settings are: {}", suggestion.map(|s| format!(" (did you mean {s}?)")).unwrap_or_default(), names())]
    Unknown {
        name: String,
        suggestion: Option<&'static str>,
    },
    #[error("invalid value {value:?} for {name}: expected {expected}")]
    Invalid {
        name: String,
        value: String,
        expected: String,
    },
    #[error("{0} cannot be set per account; per-account settings: {1}")]
    NotPerAccount(String, String),
    #[error("the value is {0} bytes; at most {MAX_VALUE_BYTES}")]
    TooLong(usize),
    #[error(
        "invalid value for {name}: {reason}; expected exact origins scheme://host[:port], comma-separated, or * alone"
    )]
    BadOrigins { name: String, reason: String },
}

fn names() -> String {
    SETTINGS.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
}

/// What a setting name addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Global(&'static Setting),
    /// `account.<ACCOUNT>.<setting>`: the account as written (id or name).
    Account {
        account: String,
        setting: &'static Setting,
    },
}

/// Resolves a setting name (`NAME` or `account.<ACCOUNT>.<NAME>`).
pub fn target(name: &str) -> Result<Target, SettingError> {
    if let Some(rest) = name.strip_prefix("account.") {
        // The account part may itself hold dots (a name): the setting is the longest known suffix.
        let found = SETTINGS.iter().find_map(|s| {
            rest.strip_suffix(s.name)
                .and_then(|a| a.strip_suffix('.'))
                .filter(|a| !a.is_empty())
                .map(|a| (a, s))
        });
        return match found {
            Some((account, s)) if s.per_account => Ok(Target::Account {
                account: account.to_string(),
                setting: s,
            }),
            Some((_, s)) => Err(SettingError::NotPerAccount(
                s.name.to_string(),
                SETTINGS
                    .iter()
                    .filter(|s| s.per_account)
                    .map(|s| s.name)
                    .collect::<Vec<_>>()
                    .join(", "),
            )),
            None => Err(SettingError::Unknown {
                name: name.to_string(),
                suggestion: suggest(rest.rsplit_once('.').map_or(rest, |(_, n)| n)),
            }),
        };
    }
    get(name).map(Target::Global).ok_or_else(|| SettingError::Unknown {
        name: name.to_string(),
        suggestion: suggest(name),
    })
}

/// Checks `name = value` as `settings set` would.
pub fn check(name: &str, value: &str) -> Result<Target, SettingError> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(SettingError::TooLong(value.len()));
    }
    let t = target(name)?;
    match &t {
        Target::Global(s) | Target::Account { setting: s, .. } => s.check(value)?,
    }
    Ok(t)
}

/// The closest declared name, if it is close (a typo).
fn suggest(name: &str) -> Option<&'static str> {
    SETTINGS
        .iter()
        .map(|s| (strsim::levenshtein(name, s.name), s.name))
        .filter(|(d, n)| *d <= 3.max(n.len() / 4) || n.ends_with(name) || name.ends_with(*n))
        .min_by_key(|(d, _)| *d)
        .map(|(_, n)| n)
}

/// The settings table of `docs/operations.md`, as that file holds it (a test keeps them equal).
pub fn markdown_table() -> String {
    let mut out = String::from(
        "| setting | type | range | default | per account | meaning |\n| --- | --- | --- | --- | --- | --- |\n",
    );
    for s in SETTINGS {
        let default = match (s.default.is_empty(), s.ty) {
            (true, Type::Origins | Type::Url | Type::Text) => "(none: off)",
            (true, _) => "(built-in list)",
            (false, _) => s.default,
        };
        out.push_str(&format!(
            "| `{}` | {} | {} | {} | {} | {} |\n",
            s.name,
            s.ty.as_str(),
            s.range(),
            default,
            if s.per_account { "yes" } else { "" },
            s.description
        ));
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
