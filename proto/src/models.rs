//! The Claude models relay knows, newest first: what a data plane's `GET /v1/models` lists when
//! the `models` setting is unset, and what the mock upstream lists. Adding a model is one line
//! here (and its price in the control plane's default price table, which a test checks).

/// (id, display name, `created_at`), newest first.
pub const KNOWN: &[(&str, &str, &str)] = &[
    ("claude-opus-4-5-20251101", "Claude Opus 4.5", "2025-11-24T00:00:00Z"),
    ("claude-haiku-4-5-20251001", "Claude Haiku 4.5", "2025-10-15T00:00:00Z"),
    (
        "claude-sonnet-4-5-20250929",
        "Claude Sonnet 4.5",
        "2025-09-29T00:00:00Z",
    ),
    ("claude-opus-4-1-20250805", "Claude Opus 4.1", "2025-08-05T00:00:00Z"),
    ("claude-opus-4-20250514", "Claude Opus 4", "2025-05-22T00:00:00Z"),
    ("claude-sonnet-4-20250514", "Claude Sonnet 4", "2025-05-22T00:00:00Z"),
    (
        "claude-3-7-sonnet-20250219",
        "Claude Sonnet 3.7",
        "2025-02-24T00:00:00Z",
    ),
    ("claude-3-5-haiku-20241022", "Claude Haiku 3.5", "2024-10-22T00:00:00Z"),
    ("claude-3-haiku-20240307", "Claude Haiku 3", "2024-03-07T00:00:00Z"),
];

#[cfg(test)]
mod tests {
    #[test]
    fn newest_first_with_unique_ids() {
        for pair in super::KNOWN.windows(2) {
            assert!(pair[0].2 >= pair[1].2, "{:?} is listed before a newer model", pair[0]);
        }
        let mut ids: Vec<&str> = super::KNOWN.iter().map(|m| m.0).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), super::KNOWN.len());
    }
}
