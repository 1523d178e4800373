//! What an Anthropic error body means for an account: its (cleaned) `error.type`, whether a 404
//! is about the request's model, whether the account is out of credit or its organization
//! disabled. The body itself is read by `relay_proto::anthropic::ApiError`.

use super::family::contains_ci;
use relay_proto::anthropic::ApiError;

/// The `error` of an Anthropic error body as health reads it: the type cleaned for reasons, the
/// message as sent (only matched against, never echoed).
#[derive(Debug, Default)]
pub(super) struct ErrorInfo {
    kind: Option<String>,
    message: Option<String>,
}

impl ErrorInfo {
    /// Empty when the body is not an Anthropic error body.
    pub(super) fn parse(body: &[u8]) -> Self {
        let Some(err) = ApiError::parse(body) else {
            return Self::default();
        };
        Self {
            kind: err.kind().map(clean_type).filter(|k| !k.is_empty()),
            message: err.message().map(str::to_owned),
        }
    }

    pub(super) fn kind(&self) -> Option<&str> {
        self.kind.as_deref()
    }

    pub(super) fn message(&self) -> Option<&str> {
        self.message.as_deref()
    }

    /// A 404 about the request's model (`not_found_error` "model: …"): the client's error.
    pub(super) fn about_the_model(&self) -> bool {
        self.kind() == Some("not_found_error")
            && self
                .message()
                .is_some_and(|m| m.trim_start().to_ascii_lowercase().starts_with("model"))
    }

    /// The account has no credit left (Anthropic: 400 "Your credit balance is too low …").
    pub(super) fn out_of_credit(&self, body: &[u8]) -> bool {
        let hay = self.message().map_or(body, str::as_bytes);
        self.kind() == Some("billing_error") || contains_ci(hay, b"credit balance is too low")
    }

    /// "This organization has been disabled." (in the message, or anywhere in a body that is not JSON).
    pub(super) fn org_disabled(&self, body: &[u8]) -> bool {
        const NEEDLES: [&[u8]; 2] = [b"organization has been disabled", b"organization is disabled"];
        let hay = self.message().map_or(body, str::as_bytes);
        NEEDLES.iter().any(|n| contains_ci(hay, n))
    }
}

/// An error type safe to put in a reason: `[A-Za-z0-9_]`, at most 40 characters.
pub(super) fn clean_type(t: &str) -> String {
    t.chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        .take(40)
        .collect()
}
