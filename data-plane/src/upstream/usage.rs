//! Token usage as the Anthropic API reports it, and what it costs.
//!
//! * [`Usage`] is the normalized count of one response: input, output, cache writes split by TTL
//!   (5 minutes / 1 hour), cache reads and web-search requests. [`Usage::from_json`] reads an API
//!   `usage` object; [`Usage::merge_delta`] applies a streaming `message_delta.usage` (whose values
//!   are cumulative, so present fields replace ours).
//! * [`Usage::parse_message_body`] reads a non-streaming body (streams go through
//!   [`super::sse::SseTap`]; error bodies through `relay_proto::anthropic::ApiError`).
//! * [`PriceTable`] answers "what did model M cost at time T" from the operator's price list
//!   ([`relay_proto::v1::Price`], micro-USD per million tokens), and [`cost_pico_usd`] turns a price
//!   and a usage into an exact cost in pico-USD (1 token × 1 µUSD/MTok = 1 pUSD, so no rounding).
//!
//! A model no price matches has no cost: [`PriceTable::lookup`] returns `None` and the caller records
//! a cost of 0 (the usage itself is still recorded, so it can be priced later).

use std::collections::HashMap;

use relay_proto::v1::Price;
use serde::Deserialize;
use serde_json::Value;

/// Token counts of one response, normalized.
///
/// `cache_write_5m_tokens + cache_write_1h_tokens` is the API's `cache_creation_input_tokens`
/// (or more, when the API's 5m/1h split adds up to more than its total: the split is trusted).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// `input_tokens`: uncached input.
    pub input_tokens: u64,
    /// `output_tokens`.
    pub output_tokens: u64,
    /// Cache writes with the 5-minute TTL (also every cache write the API did not split by TTL).
    pub cache_write_5m_tokens: u64,
    /// Cache writes with the 1-hour TTL.
    pub cache_write_1h_tokens: u64,
    /// `cache_read_input_tokens`.
    pub cache_read_tokens: u64,
    /// `server_tool_use.web_search_requests` (not priced by [`cost_pico_usd`]: `Price` has no field for it).
    pub web_search_requests: u64,
}

/// A non-negative integer field of a JSON object; `null`, missing or non-integer values are absent.
fn u64_field(obj: &Value, key: &str) -> Option<u64> {
    obj.get(key).and_then(Value::as_u64)
}

/// What [`Usage::parse_message_body`] reads: usage, `model`, `id`, `stop_reason`.
pub type MessageBody = (Usage, Option<String>, Option<String>, Option<String>);

impl Usage {
    /// Reads an API `usage` object (`input_tokens`, `output_tokens`, `cache_creation_input_tokens`,
    /// `cache_creation.ephemeral_{5m,1h}_input_tokens`, `cache_read_input_tokens`,
    /// `server_tool_use.web_search_requests`). Missing fields count 0; anything but an object gives
    /// all zeros.
    ///
    /// Cache writes: without the 5m/1h split, all of `cache_creation_input_tokens` counts as 5m. With
    /// it, the split is used; if the total is larger than the split's sum the remainder goes to 5m
    /// (tokens are never lost), if it is smaller the split wins.
    pub fn from_json(usage: &Value) -> Usage {
        let mut u = Usage::default();
        u.merge_delta(usage);
        u
    }

    /// Applies a streaming `message_delta.usage`. Its values are cumulative for the whole message,
    /// so every field present (and not `null`) replaces ours and absent ones are kept: a delta with
    /// only `output_tokens` keeps `message_start`'s input and cache counts.
    ///
    /// Cache writes follow [`Usage::from_json`]'s rules, starting from our current split: split
    /// fields present in the delta replace ours, then a larger total's remainder goes to 5m. A total
    /// without a split keeps our 1h count when it fits (the rest is 5m), else all of it is 5m.
    pub fn merge_delta(&mut self, delta: &Value) {
        if let Some(v) = u64_field(delta, "input_tokens") {
            self.input_tokens = v;
        }
        if let Some(v) = u64_field(delta, "output_tokens") {
            self.output_tokens = v;
        }
        if let Some(v) = u64_field(delta, "cache_read_input_tokens") {
            self.cache_read_tokens = v;
        }
        if let Some(v) = delta
            .get("server_tool_use")
            .and_then(|s| u64_field(s, "web_search_requests"))
        {
            self.web_search_requests = v;
        }

        let total = u64_field(delta, "cache_creation_input_tokens");
        let split = delta.get("cache_creation");
        let split_5m = split.and_then(|c| u64_field(c, "ephemeral_5m_input_tokens"));
        let split_1h = split.and_then(|c| u64_field(c, "ephemeral_1h_input_tokens"));
        if split_5m.is_some() || split_1h.is_some() {
            if let Some(v) = split_5m {
                self.cache_write_5m_tokens = v;
            }
            if let Some(v) = split_1h {
                self.cache_write_1h_tokens = v;
            }
            if let Some(total) = total {
                let sum = self.cache_write_5m_tokens.saturating_add(self.cache_write_1h_tokens);
                if total > sum {
                    self.cache_write_5m_tokens = self.cache_write_5m_tokens.saturating_add(total - sum);
                }
            }
        } else if let Some(total) = total {
            if total >= self.cache_write_1h_tokens {
                self.cache_write_5m_tokens = total - self.cache_write_1h_tokens;
            } else {
                self.cache_write_5m_tokens = total;
                self.cache_write_1h_tokens = 0;
            }
        }
    }

    /// Whether a `usage` object carries a count relay cannot read as a whole number of tokens (a
    /// negative, fractional, too large or non-numeric value): such a count is left out of the
    /// usage, and the row is flagged suspect rather than silently billed as zero.
    pub fn has_unreadable_counts(usage: &Value) -> bool {
        const COUNTS: [&str; 4] = [
            "input_tokens",
            "output_tokens",
            "cache_read_input_tokens",
            "cache_creation_input_tokens",
        ];
        let bad = |v: Option<&Value>| matches!(v, Some(v) if !v.is_null() && v.as_u64().is_none());
        if COUNTS.iter().any(|k| bad(usage.get(*k))) {
            return true;
        }
        let split = usage.get("cache_creation");
        let web = usage.get("server_tool_use");
        bad(split.and_then(|c| c.get("ephemeral_5m_input_tokens")))
            || bad(split.and_then(|c| c.get("ephemeral_1h_input_tokens")))
            || bad(web.and_then(|w| w.get("web_search_requests")))
    }

    /// Reads a non-streaming Messages response: its top-level `usage`, `model`, `id` and
    /// `stop_reason`. `None` if
    /// the body is not JSON or has no `usage` object. The rest of the body (the content) is skipped
    /// without being materialized.
    pub fn parse_message_body(body: &[u8]) -> Option<MessageBody> {
        #[derive(Deserialize)]
        struct Body {
            usage: Option<Value>,
            model: Option<Value>,
            id: Option<Value>,
            stop_reason: Option<Value>,
        }
        let body: Body = serde_json::from_slice(body).ok()?;
        let usage = body.usage.filter(Value::is_object)?;
        let string = |v: Option<Value>| match v {
            Some(Value::String(s)) => Some(s),
            _ => None,
        };
        Some((
            Usage::from_json(&usage),
            string(body.model),
            string(body.id),
            string(body.stop_reason),
        ))
    }
}

/// Entries of one pattern, latest `effective_from_ms` first.
#[derive(Debug, Clone)]
struct PatternPrices {
    /// The exact id, or the prefix without its trailing `*`.
    key: String,
    prices: Vec<Price>,
}

impl PatternPrices {
    /// The latest entry effective at `at_ms`.
    fn effective(&self, at_ms: i64) -> Option<&Price> {
        self.prices.iter().find(|p| p.effective_from_ms <= at_ms)
    }
}

/// The operator's price list, indexed for lookups on the request path.
///
/// A `model_pattern` ending in `*` is a prefix (`"claude-sonnet-4*"`, `"*"` matches every model);
/// any other pattern is an exact model id. Empty patterns are ignored.
#[derive(Debug, Default, Clone)]
pub struct PriceTable {
    exact: HashMap<String, PatternPrices>,
    /// Longest prefix first.
    prefixes: Vec<PatternPrices>,
}

impl PriceTable {
    /// Indexes `prices`. Entries of one pattern are ordered latest `effective_from_ms` first; on
    /// equal dates an `"operator"` entry beats a `"builtin"` one, then the smaller id wins, so a
    /// lookup is deterministic whatever the input order.
    pub fn new(prices: &[Price]) -> PriceTable {
        let mut exact: HashMap<String, PatternPrices> = HashMap::new();
        let mut prefixes: HashMap<String, PatternPrices> = HashMap::new();
        for price in prices {
            let pattern = price.model_pattern.as_str();
            if pattern.is_empty() {
                continue;
            }
            let (map, key) = match pattern.strip_suffix('*') {
                Some(prefix) => (&mut prefixes, prefix),
                None => (&mut exact, pattern),
            };
            map.entry(key.to_owned())
                .or_insert_with(|| PatternPrices {
                    key: key.to_owned(),
                    prices: Vec::new(),
                })
                .prices
                .push(price.clone());
        }
        let order = |a: &Price, b: &Price| {
            b.effective_from_ms
                .cmp(&a.effective_from_ms)
                .then_with(|| (b.source == "operator").cmp(&(a.source == "operator")))
                .then_with(|| a.id.cmp(&b.id))
        };
        for entry in exact.values_mut() {
            entry.prices.sort_by(order);
        }
        let mut prefixes: Vec<PatternPrices> = prefixes.into_values().collect();
        for entry in &mut prefixes {
            entry.prices.sort_by(order);
        }
        prefixes.sort_by(|a, b| b.key.len().cmp(&a.key.len()).then_with(|| a.key.cmp(&b.key)));
        PriceTable { exact, prefixes }
    }

    /// True if the table has no usable entry.
    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.prefixes.is_empty()
    }

    /// The price of `model` at `at_ms` (unix ms): the longest pattern matching `model` (an exact id
    /// beats any prefix) that has an entry effective at `at_ms`, and of that pattern the entry with
    /// the latest `effective_from_ms <= at_ms`. A pattern whose entries are all in the future is
    /// passed over for the next-longest match. `None` if nothing matches: the caller records 0 cost.
    pub fn lookup(&self, model: &str, at_ms: i64) -> Option<&Price> {
        if let Some(price) = self.exact.get(model).and_then(|e| e.effective(at_ms)) {
            return Some(price);
        }
        self.prefixes
            .iter()
            .filter(|e| model.starts_with(e.key.as_str()))
            .find_map(|e| e.effective(at_ms))
    }
}

/// The exact cost of `u` at `price`, in pico-USD: tokens × micro-USD per million tokens =
/// pico-USD. `input·P_in + cache_5m·P_5m + cache_1h·P_1h + cache_read·P_read + output·P_out`,
/// computed in `u128` and saturating at `u64::MAX` (≈ 18.4 million USD). Web-search requests are
/// not included (`Price` has no field for them).
pub fn cost_pico_usd(price: &Price, u: &Usage) -> u64 {
    let terms = [
        (u.input_tokens, price.input),
        (u.cache_write_5m_tokens, price.cache_write_5m),
        (u.cache_write_1h_tokens, price.cache_write_1h),
        (u.cache_read_tokens, price.cache_read),
        (u.output_tokens, price.output),
    ];
    let total = terms.iter().fold(0u128, |acc, &(tokens, per_mtok)| {
        acc.saturating_add(u128::from(tokens) * u128::from(per_mtok))
    });
    u64::try_from(total).unwrap_or(u64::MAX)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn price(id: &str, pattern: &str, from_ms: i64, input: u64) -> Price {
        Price {
            id: id.to_owned(),
            model_pattern: pattern.to_owned(),
            effective_from_ms: from_ms,
            input,
            output: input * 5,
            cache_write_5m: input * 5 / 4,
            cache_write_1h: input * 2,
            cache_read: input / 10,
            source: "builtin".to_owned(),
        }
    }

    #[test]
    fn from_json_reads_every_field() {
        let u = Usage::from_json(&json!({
            "input_tokens": 25,
            "output_tokens": 7,
            "cache_creation_input_tokens": 300,
            "cache_creation": {"ephemeral_5m_input_tokens": 100, "ephemeral_1h_input_tokens": 200},
            "cache_read_input_tokens": 2000,
            "server_tool_use": {"web_search_requests": 3},
            "service_tier": "standard"
        }));
        assert_eq!(
            u,
            Usage {
                input_tokens: 25,
                output_tokens: 7,
                cache_write_5m_tokens: 100,
                cache_write_1h_tokens: 200,
                cache_read_tokens: 2000,
                web_search_requests: 3,
            }
        );
    }

    #[test]
    fn missing_split_counts_as_5m() {
        let u = Usage::from_json(&json!({"input_tokens": 1, "cache_creation_input_tokens": 300}));
        assert_eq!(u.cache_write_5m_tokens, 300);
        assert_eq!(u.cache_write_1h_tokens, 0);
        // A null split object is the same as none.
        let u = Usage::from_json(&json!({"cache_creation_input_tokens": 40, "cache_creation": null}));
        assert_eq!((u.cache_write_5m_tokens, u.cache_write_1h_tokens), (40, 0));
    }

    #[test]
    fn split_remainder_goes_to_5m_and_split_wins_over_smaller_total() {
        let u = Usage::from_json(&json!({
            "cache_creation_input_tokens": 350,
            "cache_creation": {"ephemeral_5m_input_tokens": 100, "ephemeral_1h_input_tokens": 200}
        }));
        assert_eq!((u.cache_write_5m_tokens, u.cache_write_1h_tokens), (150, 200));
        let u = Usage::from_json(&json!({
            "cache_creation_input_tokens": 10,
            "cache_creation": {"ephemeral_5m_input_tokens": 100, "ephemeral_1h_input_tokens": 200}
        }));
        assert_eq!((u.cache_write_5m_tokens, u.cache_write_1h_tokens), (100, 200));
        // Only the 1h half of the split present.
        let u = Usage::from_json(&json!({
            "cache_creation_input_tokens": 80,
            "cache_creation": {"ephemeral_1h_input_tokens": 50}
        }));
        assert_eq!((u.cache_write_5m_tokens, u.cache_write_1h_tokens), (30, 50));
        // Split without a total.
        let u = Usage::from_json(&json!({"cache_creation": {"ephemeral_5m_input_tokens": 5}}));
        assert_eq!((u.cache_write_5m_tokens, u.cache_write_1h_tokens), (5, 0));
    }

    #[test]
    fn unreadable_counts_are_noticed() {
        for junk in [
            json!({"input_tokens": 1e30}),
            json!({"input_tokens": -500}),
            json!({"output_tokens": "abc"}),
            json!({"output_tokens": 2.7}),
            json!({"cache_creation": {"ephemeral_1h_input_tokens": -1}}),
        ] {
            assert!(Usage::has_unreadable_counts(&junk), "{junk}");
        }
        for fine in [
            json!({"input_tokens": 5, "output_tokens": null}),
            json!({}),
            json!({"service_tier": "standard"}),
        ] {
            assert!(!Usage::has_unreadable_counts(&fine), "{fine}");
        }
    }

    #[test]
    fn from_json_tolerates_junk() {
        assert_eq!(Usage::from_json(&json!(null)), Usage::default());
        assert_eq!(Usage::from_json(&json!([1, 2])), Usage::default());
        let u = Usage::from_json(&json!({"input_tokens": -5, "output_tokens": "7", "cache_read_input_tokens": 1.5}));
        assert_eq!(u, Usage::default());
        let u = Usage::from_json(&json!({"input_tokens": u64::MAX}));
        assert_eq!(u.input_tokens, u64::MAX);
    }

    fn start_usage() -> Usage {
        Usage::from_json(&json!({
            "input_tokens": 25,
            "output_tokens": 1,
            "cache_creation_input_tokens": 300,
            "cache_creation": {"ephemeral_5m_input_tokens": 100, "ephemeral_1h_input_tokens": 200},
            "cache_read_input_tokens": 2000
        }))
    }

    #[test]
    fn delta_without_input_fields_keeps_start() {
        let mut u = start_usage();
        u.merge_delta(&json!({"output_tokens": 89}));
        assert_eq!(
            u,
            Usage {
                input_tokens: 25,
                output_tokens: 89,
                cache_write_5m_tokens: 100,
                cache_write_1h_tokens: 200,
                cache_read_tokens: 2000,
                web_search_requests: 0,
            }
        );
        // Cumulative: a later delta replaces, it does not add.
        u.merge_delta(&json!({"output_tokens": 120}));
        assert_eq!(u.output_tokens, 120);
        // Null fields are absent.
        u.merge_delta(&json!({"input_tokens": null, "cache_read_input_tokens": null, "output_tokens": 121}));
        assert_eq!((u.input_tokens, u.cache_read_tokens, u.output_tokens), (25, 2000, 121));
    }

    #[test]
    fn delta_with_input_fields_replaces_start() {
        let mut u = start_usage();
        u.merge_delta(&json!({
            "input_tokens": 30,
            "cache_creation_input_tokens": 400,
            "cache_creation": {"ephemeral_5m_input_tokens": 150, "ephemeral_1h_input_tokens": 250},
            "cache_read_input_tokens": 2100,
            "output_tokens": 89,
            "server_tool_use": {"web_search_requests": 2}
        }));
        assert_eq!(
            u,
            Usage {
                input_tokens: 30,
                output_tokens: 89,
                cache_write_5m_tokens: 150,
                cache_write_1h_tokens: 250,
                cache_read_tokens: 2100,
                web_search_requests: 2,
            }
        );
    }

    #[test]
    fn delta_total_without_split_keeps_our_1h_when_it_fits() {
        // Same total as the start: the start's split stays.
        let mut u = start_usage();
        u.merge_delta(&json!({"cache_creation_input_tokens": 300, "output_tokens": 5}));
        assert_eq!((u.cache_write_5m_tokens, u.cache_write_1h_tokens), (100, 200));
        // A larger total: the growth is 5m.
        u.merge_delta(&json!({"cache_creation_input_tokens": 500}));
        assert_eq!((u.cache_write_5m_tokens, u.cache_write_1h_tokens), (300, 200));
        // A total smaller than our 1h count: it is all 5m.
        u.merge_delta(&json!({"cache_creation_input_tokens": 50}));
        assert_eq!((u.cache_write_5m_tokens, u.cache_write_1h_tokens), (50, 0));
        // A delta with only half a split replaces that half.
        let mut u = start_usage();
        u.merge_delta(&json!({"cache_creation": {"ephemeral_1h_input_tokens": 260}}));
        assert_eq!((u.cache_write_5m_tokens, u.cache_write_1h_tokens), (100, 260));
    }

    #[test]
    fn message_body() {
        let body = br#"{"id":"msg_01XFDUDYJgAACzvnptvVoYEL","type":"message","role":"assistant",
            "content":[{"type":"text","text":"Hello!"},{"type":"tool_use","id":"t","name":"n","input":{"a":[1,2,{"b":null}]}}],
            "model":"claude-sonnet-4-5-20250929","stop_reason":"end_turn","stop_sequence":null,
            "usage":{"input_tokens":12,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,
            "cache_creation":{"ephemeral_5m_input_tokens":0,"ephemeral_1h_input_tokens":0},
            "output_tokens":6,"service_tier":"standard"}}"#;
        let (u, model, id, stop) = Usage::parse_message_body(body).unwrap();
        assert_eq!(stop.as_deref(), Some("end_turn"));
        assert_eq!((u.input_tokens, u.output_tokens), (12, 6));
        assert_eq!(model.as_deref(), Some("claude-sonnet-4-5-20250929"));
        assert_eq!(id.as_deref(), Some("msg_01XFDUDYJgAACzvnptvVoYEL"));

        let (u, model, id, _) = Usage::parse_message_body(br#"{"usage":{"output_tokens":3},"model":5}"#).unwrap();
        assert_eq!(u.output_tokens, 3);
        assert_eq!((model, id), (None, None));

        assert!(Usage::parse_message_body(b"not json").is_none());
        assert!(Usage::parse_message_body(b"").is_none());
        assert!(Usage::parse_message_body(br#"{"id":"msg","model":"m"}"#).is_none());
        assert!(Usage::parse_message_body(br#"{"usage":null}"#).is_none());
        assert!(Usage::parse_message_body(br#"[1]"#).is_none());
        assert!(Usage::parse_message_body(br#"{"usage":{"output_tokens":3}"#).is_none());
    }

    #[test]
    fn longest_prefix_wins_and_exact_beats_prefix() {
        let table = PriceTable::new(&[
            price("all", "*", 0, 1),
            price("claude", "claude-*", 0, 2),
            price("sonnet4", "claude-sonnet-4*", 0, 3),
            price("sonnet45", "claude-sonnet-4-5*", 0, 4),
            price("exact", "claude-sonnet-4-5-20250929", 0, 5),
            price("exact-short", "claude-sonnet-4", 0, 6),
        ]);
        let id = |m: &str| table.lookup(m, 1).map(|p| p.id.as_str());
        assert_eq!(id("claude-sonnet-4-5-20250929"), Some("exact"));
        assert_eq!(id("claude-sonnet-4-5-20990101"), Some("sonnet45"));
        assert_eq!(id("claude-sonnet-4-20250514"), Some("sonnet4"));
        assert_eq!(id("claude-sonnet-4"), Some("exact-short"));
        assert_eq!(id("claude-opus-4-1"), Some("claude"));
        assert_eq!(id("gpt-4"), Some("all"));
        // The pattern "claude-*" is a prefix "claude-", so it does not match "claude".
        assert_eq!(id("claude"), Some("all"));

        let table = PriceTable::new(&[price("sonnet4", "claude-sonnet-4*", 0, 3)]);
        assert!(table.lookup("claude-opus-4", 1).is_none());
        assert!(table.lookup("", 1).is_none());
        assert!(PriceTable::new(&[]).lookup("claude-sonnet-4", 1).is_none());
        assert!(PriceTable::new(&[]).is_empty());
        assert!(PriceTable::new(&[price("e", "", 0, 1)]).is_empty());
    }

    #[test]
    fn effective_dates() {
        let table = PriceTable::new(&[
            price("old", "claude-sonnet-4*", 100, 1),
            price("future", "claude-sonnet-4*", 1_000, 3),
            price("current", "claude-sonnet-4*", 500, 2),
            price("generic", "claude-*", 0, 9),
            price("exact-future", "claude-sonnet-4-5", 2_000, 7),
        ]);
        let id = |m: &str, at: i64| table.lookup(m, at).map(|p| p.id.as_str());
        // Future entries are ignored; the latest past one wins.
        assert_eq!(id("claude-sonnet-4-x", 700), Some("current"));
        assert_eq!(id("claude-sonnet-4-x", 500), Some("current"));
        assert_eq!(id("claude-sonnet-4-x", 499), Some("old"));
        assert_eq!(id("claude-sonnet-4-x", 1_000), Some("future"));
        // None of the longest pattern's entries effective yet: the next-longest pattern.
        assert_eq!(id("claude-sonnet-4-x", 50), Some("generic"));
        assert_eq!(id("claude-sonnet-4-5", 1_500), Some("future"));
        assert_eq!(id("claude-sonnet-4-5", 2_000), Some("exact-future"));
        assert_eq!(id("claude-sonnet-4-5", 10), Some("generic"));
        assert_eq!(id("claude-sonnet-4-5", -1), None);
    }

    #[test]
    fn equal_dates_are_deterministic() {
        let mut op = price("b-operator", "claude-*", 100, 2);
        op.source = "operator".to_owned();
        let prices = [
            price("a-builtin", "claude-*", 100, 1),
            op,
            price("c-builtin", "claude-*", 100, 3),
        ];
        for perm in [[0, 1, 2], [2, 1, 0], [1, 0, 2], [2, 0, 1]] {
            let list: Vec<Price> = perm.iter().map(|&i| prices[i].clone()).collect();
            let table = PriceTable::new(&list);
            assert_eq!(table.lookup("claude-x", 100).unwrap().id, "b-operator");
        }
    }

    #[test]
    fn cost_is_exact() {
        let p = Price {
            id: "p".to_owned(),
            model_pattern: "claude-sonnet-4*".to_owned(),
            effective_from_ms: 0,
            input: 3_000_000,
            output: 15_000_000,
            cache_write_5m: 3_750_000,
            cache_write_1h: 6_000_000,
            cache_read: 300_000,
            source: "builtin".to_owned(),
        };
        let u = Usage {
            input_tokens: 1000,
            output_tokens: 500,
            cache_write_5m_tokens: 100,
            cache_write_1h_tokens: 10,
            cache_read_tokens: 2000,
            web_search_requests: 4,
        };
        assert_eq!(cost_pico_usd(&p, &u), 11_535_000_000);
        assert_eq!(cost_pico_usd(&p, &Usage::default()), 0);
        // One token at $3/MTok is 3 micro-USD = 3_000_000 pico-USD.
        assert_eq!(
            cost_pico_usd(
                &p,
                &Usage {
                    input_tokens: 1,
                    ..Usage::default()
                }
            ),
            3_000_000
        );
    }

    #[test]
    fn cost_never_overflows() {
        let p = Price {
            input: u64::MAX,
            output: u64::MAX,
            cache_write_5m: u64::MAX,
            cache_write_1h: u64::MAX,
            cache_read: u64::MAX,
            ..Price::default()
        };
        let huge = Usage {
            input_tokens: u64::MAX,
            output_tokens: u64::MAX,
            cache_write_5m_tokens: u64::MAX,
            cache_write_1h_tokens: u64::MAX,
            cache_read_tokens: u64::MAX,
            web_search_requests: u64::MAX,
        };
        assert_eq!(cost_pico_usd(&p, &huge), u64::MAX);
        let p = Price {
            output: 15_000_000,
            ..Price::default()
        };
        // 10^13 output tokens at $15/MTok = $150M: beyond u64 pico-USD, saturates.
        assert_eq!(
            cost_pico_usd(
                &p,
                &Usage {
                    output_tokens: 10_000_000_000_000,
                    ..Usage::default()
                }
            ),
            u64::MAX
        );
        // Just within range: 10^12 tokens at $15/MTok = 1.5e19 pico-USD.
        assert_eq!(
            cost_pico_usd(
                &p,
                &Usage {
                    output_tokens: 1_000_000_000_000,
                    ..Usage::default()
                }
            ),
            15_000_000_000_000_000_000
        );
    }
}
