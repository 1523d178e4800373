//! One file per console page; what they share: turning the service layer's answers into HTTP
//! answers, reading form fields, the notice a write leaves for the page it returns to.

pub mod accounts;
pub mod audit;
pub mod groups;
pub mod keys;
pub mod me;
pub mod overview;
pub mod planes;
pub mod requests;
pub mod settings;
pub mod signin;
pub mod usage;

use super::Console;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use std::collections::HashMap;
use tonic::{Code, Status};

pub(crate) type Form = HashMap<String, String>;

/// The HTTP status that says what `s` says.
pub(crate) fn http_status(s: &Status) -> StatusCode {
    match s.code() {
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted | Code::FailedPrecondition => StatusCode::CONFLICT,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The error page for a refused or failed service call.
pub(crate) fn failed(c: &Console, s: &Status) -> Response {
    c.views.error(http_status(s), s.message())
}

/// Back to `path` with `notice` shown there (after a write: reloading does not repeat it). The
/// notice is signed ([`notice`] shows only what relay wrote): a link cannot put words of its own
/// on a console page.
pub(crate) fn done(c: &Console, path: &str, notice: &str) -> Response {
    let q: String = url_encode(notice);
    let sig = c.signer.notice(notice);
    Redirect::to(&format!("{path}?notice={q}&sig={sig}")).into_response()
}

/// The notice a write left for this page ([`done`]); None when there is none or it is not
/// relay's (no signature, or another text's).
pub(crate) fn notice(c: &Console, q: &HashMap<String, String>) -> Option<String> {
    let text = q.get("notice")?;
    c.signer
        .notice_ok(text, q.get("sig").map(String::as_str).unwrap_or(""))
        .then(|| text.clone())
}

pub(crate) fn url_encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// A form field, trimmed ("" when absent).
pub(crate) fn field<'a>(f: &'a Form, name: &str) -> &'a str {
    f.get(name).map(|s| s.trim()).unwrap_or("")
}

/// A whole-number form field (empty = 0).
pub(crate) fn number(f: &Form, name: &str) -> Result<u64, String> {
    let v = field(f, name);
    if v.is_empty() {
        return Ok(0);
    }
    v.parse().map_err(|_| format!("{name}: {v:?} is not a whole number"))
}

/// A dollar amount form field as micro-USD (empty = 0).
pub(crate) fn dollars(f: &Form, name: &str) -> Result<u64, String> {
    let v = field(f, name).trim_start_matches('$');
    if v.is_empty() {
        return Ok(0);
    }
    match v.parse::<f64>() {
        Ok(d) if (0.0..1e12).contains(&d) => Ok((d * 1e6).round() as u64),
        _ => Err(format!("{name}: {v:?} is not an amount in dollars")),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn form_numbers_and_dollars() {
        let f: Form = [("a", "12"), ("b", "$2.5"), ("c", "x"), ("d", "")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(number(&f, "a"), Ok(12));
        assert_eq!(number(&f, "d"), Ok(0));
        assert!(number(&f, "c").is_err());
        assert_eq!(dollars(&f, "b"), Ok(2_500_000));
        assert!(dollars(&f, "c").is_err());
    }
}
