//! Model families (`opus`, `sonnet`, `haiku`): which one a model id belongs to, and which one an
//! upstream error message is about (a rate limit can be scoped to one family).

/// Model families, as they appear in model ids and in upstream error messages.
pub(super) const FAMILIES: [&str; 3] = ["opus", "sonnet", "haiku"];

/// The model family a model id belongs to: "opus", "sonnet", "haiku", or "" when unknown.
pub fn model_family(model: &str) -> &'static str {
    FAMILIES
        .iter()
        .copied()
        .find(|f| contains_ci(model.as_bytes(), f.as_bytes()))
        .unwrap_or("")
}

/// The model family an error message is about: the request's own family if mentioned, else the first
/// family mentioned.
pub(super) fn family_in(message: &str, model: &str) -> Option<&'static str> {
    let own = model_family(model);
    if !own.is_empty() && contains_ci(message.as_bytes(), own.as_bytes()) {
        return Some(own);
    }
    FAMILIES
        .iter()
        .copied()
        .find(|f| contains_ci(message.as_bytes(), f.as_bytes()))
}

/// ASCII case-insensitive substring search (`needle` in lower case). Does not allocate.
pub(super) fn contains_ci(hay: &[u8], needle: &[u8]) -> bool {
    if needle.is_empty() {
        return true;
    }
    hay.windows(needle.len()).any(|w| w.eq_ignore_ascii_case(needle))
}
