//! Token usage as the Anthropic API reports it, and what it costs.
//!
//! * [`Usage`] is the normalized count of one response: input, output, cache writes split by TTL
//!   (5 minutes / 1 hour), cache reads and web-search requests. [`Usage::from_json`] reads an API
//!   `usage` object; [`Usage::merge_delta`] applies a streaming `message_delta.usage` (whose values
//!   are cumulative, so present fields replace ours).
//! * [`UsageReport`] is a `usage` object as sent (each count absent, readable or not), read
//!   straight from the bytes with serde (typed, borrowed: no `serde_json::Value`); odd input
//!   (duplicate keys, a non-object where an object belongs) falls back to reading a `Value`, the
//!   reference whose results the typed reading matches (property tests in `tests::typed`).
//! * [`Usage::parse_message_body`] reads a non-streaming body (streams go through
//!   [`super::sse::SseTap`]; error bodies through `relay_proto::anthropic::ApiError`).
//! * [`PriceTable`] answers "what did model M cost at time T" from the operator's price list
//!   ([`relay_proto::v1::Price`], micro-USD per million tokens), and [`cost_pico_usd`] turns a price
//!   and a usage into an exact cost in pico-USD (1 token × 1 µUSD/MTok = 1 pUSD, so no rounding).
//!
//! A model no price matches has no cost: [`PriceTable::lookup`] returns `None` and the caller records
//! a cost of 0 (the usage itself is still recorded, so it can be priced later).

use std::collections::HashMap;

use std::borrow::Cow;

use relay_proto::v1::Price;
use serde::de::IgnoredAny;
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

/// One count of an API `usage` object as it was sent.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    /// Missing or `null`.
    #[default]
    Absent,
    /// A whole, non-negative number of tokens (or requests).
    Tokens(u64),
    /// Present but not a whole non-negative number (negative, fractional, too large, a string…):
    /// left out of the usage, and the row flagged suspect.
    Unreadable,
}

impl Count {
    /// The count held by a `serde_json::Value` field (`Value::as_u64`'s reading).
    fn of(v: Option<&Value>) -> Count {
        match v {
            None | Some(Value::Null) => Count::Absent,
            Some(v) => v.as_u64().map_or(Count::Unreadable, Count::Tokens),
        }
    }

    /// The tokens, when the count was readable and present.
    fn get(self) -> Option<u64> {
        match self {
            Count::Tokens(n) => Some(n),
            Count::Absent | Count::Unreadable => None,
        }
    }
}

/// Reads any JSON value as a [`Count`] without allocating (an array or object is skipped).
impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Count;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_u64<E>(self, n: u64) -> Result<Count, E> {
                Ok(Count::Tokens(n))
            }
            fn visit_i64<E>(self, n: i64) -> Result<Count, E> {
                Ok(u64::try_from(n).map_or(Count::Unreadable, Count::Tokens))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Count, E> {
                Ok(Count::Unreadable)
            }
            fn visit_bool<E>(self, _: bool) -> Result<Count, E> {
                Ok(Count::Unreadable)
            }
            fn visit_str<E>(self, _: &str) -> Result<Count, E> {
                Ok(Count::Unreadable)
            }
            fn visit_unit<E>(self) -> Result<Count, E> {
                Ok(Count::Absent)
            }
            fn visit_none<E>(self) -> Result<Count, E> {
                Ok(Count::Absent)
            }
            fn visit_some<D2: serde::Deserializer<'de>>(self, d: D2) -> Result<Count, D2::Error> {
                Count::deserialize(d)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Count, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Count::Unreadable)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Count, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Count::Unreadable)
            }
        }
        d.deserialize_any(V)
    }
}

/// A struct read only from a JSON object (serde's derived structs also accept an array, which
/// the `Value` reading treats as no object at all).
pub(crate) struct Object<T>(pub T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for V<T> {
            type Value = Object<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Object<T>, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(Object)
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

/// An API `usage` object as sent: each count absent, readable or not. Deserialized straight from
/// the bytes ([`Deserialize`]: only from a JSON object; a duplicate key or a non-object where an
/// object belongs is an error, on which callers read the `serde_json::Value` instead with
/// [`UsageReport::from_value`], whose reading of such input is the reference), or from a `Value`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UsageReport {
    pub input_tokens: Count,
    pub output_tokens: Count,
    pub cache_read_input_tokens: Count,
    pub cache_creation_input_tokens: Count,
    /// `cache_creation.ephemeral_5m_input_tokens`.
    pub cache_5m: Count,
    /// `cache_creation.ephemeral_1h_input_tokens`.
    pub cache_1h: Count,
    /// `server_tool_use.web_search_requests`.
    pub web_search_requests: Count,
}

impl<'de> Deserialize<'de> for UsageReport {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize, Default)]
        #[serde(default)]
        struct Split {
            ephemeral_5m_input_tokens: Count,
            ephemeral_1h_input_tokens: Count,
        }
        #[derive(Deserialize, Default)]
        #[serde(default)]
        struct ToolUse {
            web_search_requests: Count,
        }
        #[derive(Deserialize, Default)]
        #[serde(default)]
        struct Raw {
            input_tokens: Count,
            output_tokens: Count,
            cache_read_input_tokens: Count,
            cache_creation_input_tokens: Count,
            cache_creation: Option<Object<Split>>,
            server_tool_use: Option<Object<ToolUse>>,
        }
        let Object(r) = Object::<Raw>::deserialize(d)?;
        let split = r.cache_creation.map(|o| o.0).unwrap_or_default();
        Ok(UsageReport {
            input_tokens: r.input_tokens,
            output_tokens: r.output_tokens,
            cache_read_input_tokens: r.cache_read_input_tokens,
            cache_creation_input_tokens: r.cache_creation_input_tokens,
            cache_5m: split.ephemeral_5m_input_tokens,
            cache_1h: split.ephemeral_1h_input_tokens,
            web_search_requests: r.server_tool_use.map(|o| o.0.web_search_requests).unwrap_or_default(),
        })
    }
}

impl UsageReport {
    /// Reads a `usage` value: anything but an object (and a non-object `cache_creation` or
    /// `server_tool_use`) reads as absent counts.
    pub fn from_value(usage: &Value) -> UsageReport {
        let count = |obj: Option<&Value>, key: &str| Count::of(obj.and_then(|o| o.get(key)));
        let split = usage.get("cache_creation");
        UsageReport {
            input_tokens: count(Some(usage), "input_tokens"),
            output_tokens: count(Some(usage), "output_tokens"),
            cache_read_input_tokens: count(Some(usage), "cache_read_input_tokens"),
            cache_creation_input_tokens: count(Some(usage), "cache_creation_input_tokens"),
            cache_5m: count(split, "ephemeral_5m_input_tokens"),
            cache_1h: count(split, "ephemeral_1h_input_tokens"),
            web_search_requests: count(usage.get("server_tool_use"), "web_search_requests"),
        }
    }

    /// Whether a count is present but not a whole number of tokens (see
    /// [`Usage::has_unreadable_counts`]).
    pub fn has_unreadable(&self) -> bool {
        [
            self.input_tokens,
            self.output_tokens,
            self.cache_read_input_tokens,
            self.cache_creation_input_tokens,
            self.cache_5m,
            self.cache_1h,
            self.web_search_requests,
        ]
        .contains(&Count::Unreadable)
    }
}

/// What [`Usage::parse_message_body`] reads: usage, `model`, `id`, `stop_reason`.
pub type MessageBody = (Usage, Option<String>, Option<String>, Option<String>);

/// The top-level fields of a non-streaming answer relay reads, borrowed from the body (the
/// content is skipped, never materialized). Deserialize only from an object; on an error the
/// caller reads [`AnswerValues`] instead, the reference reading of odd input (a non-string `model`,
/// a duplicate key).
#[derive(Deserialize, Default)]
#[serde(default)]
pub(crate) struct AnswerFields<'a> {
    #[serde(rename = "type", borrow)]
    pub kind: Option<Cow<'a, str>>,
    pub usage: Option<UsageReport>,
    #[serde(borrow)]
    pub model: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    pub stop_reason: Option<Cow<'a, str>>,
    /// `count_tokens`' answer.
    pub input_tokens: Count,
}

/// [`AnswerFields`] through `serde_json::Value`: every field may hold anything.
#[derive(Deserialize)]
pub(crate) struct AnswerValues {
    #[serde(rename = "type")]
    pub kind: Option<Value>,
    pub usage: Option<Value>,
    pub model: Option<Value>,
    pub id: Option<Value>,
    pub stop_reason: Option<Value>,
    pub input_tokens: Option<Value>,
}

/// A non-streaming answer's fields as relay reads them. `usage`: `Some` only when it was an object.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Answer {
    pub is_message: bool,
    pub usage: Option<UsageReport>,
    pub model: Option<String>,
    pub id: Option<String>,
    pub stop_reason: Option<String>,
    /// `input_tokens` is a whole number (a `count_tokens` answer).
    pub has_input_tokens: bool,
}

impl Answer {
    /// Reads the fields typed and borrowed. `None` for anything else than a JSON object with
    /// those fields of the expected types (and no duplicate): the caller then reads
    /// `serde_json::Value`s ([`Answer::from_values`]), which read the same for everything this
    /// accepts.
    pub fn typed(body: &[u8]) -> Option<Answer> {
        let Object(a) = serde_json::from_slice::<Object<AnswerFields<'_>>>(body).ok()?;
        Some(Answer {
            is_message: a.kind.as_deref() == Some("message"),
            usage: a.usage,
            model: a.model.map(Cow::into_owned),
            id: a.id.map(Cow::into_owned),
            stop_reason: a.stop_reason.map(Cow::into_owned),
            has_input_tokens: matches!(a.input_tokens, Count::Tokens(_)),
        })
    }

    /// The reference reading: every field a `serde_json::Value`.
    pub fn from_values(a: AnswerValues) -> Answer {
        Answer {
            is_message: a.kind.as_ref().and_then(Value::as_str) == Some("message"),
            usage: a.usage.filter(Value::is_object).map(|u| UsageReport::from_value(&u)),
            model: value_string(a.model),
            id: value_string(a.id),
            stop_reason: value_string(a.stop_reason),
            has_input_tokens: a.input_tokens.as_ref().is_some_and(Value::is_u64),
        }
    }
}

fn value_string(v: Option<Value>) -> Option<String> {
    match v {
        Some(Value::String(s)) => Some(s),
        _ => None,
    }
}

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
        Usage::from_report(&UsageReport::from_value(usage))
    }

    /// [`Usage::from_json`] of a usage read typed.
    pub fn from_report(report: &UsageReport) -> Usage {
        let mut u = Usage::default();
        u.merge(report);
        u
    }

    /// Applies a streaming `message_delta.usage` (see [`Usage::merge`]).
    pub fn merge_delta(&mut self, delta: &Value) {
        self.merge(&UsageReport::from_value(delta));
    }

    /// Applies a streaming `message_delta.usage`. Its values are cumulative for the whole message,
    /// so every field present (and not `null`) replaces ours and absent ones are kept: a delta with
    /// only `output_tokens` keeps `message_start`'s input and cache counts.
    ///
    /// Cache writes follow [`Usage::from_json`]'s rules, starting from our current split: split
    /// fields present in the delta replace ours, then a larger total's remainder goes to 5m. A total
    /// without a split keeps our 1h count when it fits (the rest is 5m), else all of it is 5m.
    pub fn merge(&mut self, delta: &UsageReport) {
        if let Some(v) = delta.input_tokens.get() {
            self.input_tokens = v;
        }
        if let Some(v) = delta.output_tokens.get() {
            self.output_tokens = v;
        }
        if let Some(v) = delta.cache_read_input_tokens.get() {
            self.cache_read_tokens = v;
        }
        if let Some(v) = delta.web_search_requests.get() {
            self.web_search_requests = v;
        }

        let total = delta.cache_creation_input_tokens.get();
        let split_5m = delta.cache_5m.get();
        let split_1h = delta.cache_1h.get();
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
        UsageReport::from_value(usage).has_unreadable()
    }

    /// Reads a non-streaming Messages response: its top-level `usage`, `model`, `id` and
    /// `stop_reason`. `None` if
    /// the body is not JSON or has no `usage` object. The rest of the body (the content) is skipped
    /// without being materialized.
    pub fn parse_message_body(body: &[u8]) -> Option<MessageBody> {
        if let Some(a) = Answer::typed(body) {
            let usage = a.usage?;
            return Some((Usage::from_report(&usage), a.model, a.id, a.stop_reason));
        }
        #[derive(Deserialize)]
        struct Body {
            usage: Option<Value>,
            model: Option<Value>,
            id: Option<Value>,
            stop_reason: Option<Value>,
        }
        let body: Body = serde_json::from_slice(body).ok()?;
        let usage = body.usage.filter(Value::is_object)?;
        Some((
            Usage::from_json(&usage),
            value_string(body.model),
            value_string(body.id),
            value_string(body.stop_reason),
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

    /// The typed reading of a whole answer against the `Value` reading (which still reads what
    /// the typed one declines): the same fields whenever it accepts.
    mod typed {
        use super::super::{Answer, AnswerValues, UsageReport};
        use proptest::prelude::*;

        fn scalar() -> impl Strategy<Value = String> {
            prop_oneof![
                (0u64..u64::MAX).prop_map(|n| n.to_string()),
                proptest::sample::select(vec![
                    "0",
                    "-3",
                    "2.5",
                    "2.0",
                    "1e30",
                    "18446744073709551616",
                    "null",
                    "true",
                    r#""message""#,
                    r#""claude-sonnet-4-5""#,
                    r#""a\"b""#,
                    "[1,{}]",
                    "{}",
                ])
                .prop_map(str::to_owned),
            ]
        }

        fn object(keys: &'static [&'static str], value: BoxedStrategy<String>) -> BoxedStrategy<String> {
            proptest::collection::vec((proptest::sample::select(keys), value), 0..7)
                .prop_map(|fields| {
                    let inner: Vec<String> = fields.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
                    format!("{{{}}}", inner.join(","))
                })
                .boxed()
        }

        fn body() -> BoxedStrategy<String> {
            let split = object(
                &["ephemeral_5m_input_tokens", "ephemeral_1h_input_tokens"],
                scalar().boxed(),
            );
            let usage = object(
                &[
                    "input_tokens",
                    "output_tokens",
                    "cache_creation_input_tokens",
                    "cache_creation",
                    "server_tool_use",
                ],
                prop_oneof![4 => scalar(), 1 => split].boxed(),
            );
            let field = prop_oneof![3 => scalar(), 2 => usage].boxed();
            let answer = object(
                &["type", "usage", "model", "id", "stop_reason", "input_tokens", "content"],
                field,
            );
            prop_oneof![8 => answer, 1 => scalar()].boxed()
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(3000))]

            #[test]
            fn an_answer_reads_as_the_value_reading(body in body()) {
                if let Some(typed) = Answer::typed(body.as_bytes()) {
                    let values: AnswerValues = serde_json::from_str(&body).unwrap();
                    prop_assert_eq!(typed, Answer::from_values(values), "{}", body);
                }
            }

            #[test]
            fn a_usage_reads_as_the_value_reading(body in body()) {
                if let Ok(typed) = serde_json::from_str::<UsageReport>(&body) {
                    let value: serde_json::Value = serde_json::from_str(&body).unwrap();
                    prop_assert_eq!(typed, UsageReport::from_value(&value), "{}", body);
                }
            }
        }

        #[test]
        fn an_api_answer_is_read_typed() {
            let body = br#"{"id":"msg_1","type":"message","role":"assistant","content":[{"type":"text","text":"Hi \"there\""}],"model":"claude-sonnet-4-5","stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":12,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":6}}"#;
            let a = Answer::typed(body).unwrap();
            assert!(a.is_message);
            assert_eq!(a.model.as_deref(), Some("claude-sonnet-4-5"));
            assert_eq!(a.usage.unwrap().output_tokens, super::super::Count::Tokens(6));
            // An array is no object for either reading of a usage.
            assert!(serde_json::from_str::<UsageReport>("[1,2,3,4]").is_err());
            assert!(Answer::typed(br#"["message"]"#).is_none());
        }
    }
}
