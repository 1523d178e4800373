//! The price table: list, set an operator price, delete operator prices (built-in ones stay).

use super::validate::validate_models;
use super::{new_id, AdminApi};
use crate::api::auth::Actor;
use crate::api::convert::{price_to_pb, version_pb};
use crate::model::*;
use crate::store::StoreError;
use relay_proto::v1 as pb;
use serde_json::json;
use tonic::Status;

/// The highest price relay takes, per kind of token: $1,000,000 per million tokens (in micro-USD).
/// Far above any real price, and low enough that a cost never overflows.
const MAX_PRICE_MICRO_USD: u64 = 1_000_000 * 1_000_000;

impl AdminApi {
    pub(super) async fn list_prices(
        &self,
        _actor: &Actor,
        _r: pb::ListPricesRequest,
    ) -> Result<pb::ListPricesResponse, Status> {
        let prices = self.store.list_prices().await?;
        Ok(pb::ListPricesResponse {
            prices: prices.iter().map(price_to_pb).collect(),
        })
    }

    pub(super) async fn set_price(&self, actor: &Actor, r: pb::SetPriceRequest) -> Result<pb::Price, Status> {
        let pattern = r.model_pattern.trim().to_string();
        validate_models(std::slice::from_ref(&pattern))?;
        if pattern.is_empty() {
            return Err(Status::invalid_argument(
                "a model id or prefix ending in '*' is required",
            ));
        }
        // Each price in dollars per million tokens, checked in the order the operator gives them
        // (a derived cache price never names itself first for the input price's mistake).
        for (what, v) in [
            ("input", r.input),
            ("output", r.output),
            ("cache write (5m)", r.cache_write_5m),
            ("cache write (1h)", r.cache_write_1h),
            ("cache read", r.cache_read),
        ] {
            if v > MAX_PRICE_MICRO_USD {
                return Err(Status::invalid_argument(format!(
                    "{what} price ${} per million tokens is out of range (at most ${} per million tokens)",
                    v / 1_000_000,
                    MAX_PRICE_MICRO_USD / 1_000_000
                )));
            }
        }
        let effective_from = if r.effective_from_ms == 0 {
            now_ms()
        } else {
            r.effective_from_ms
        };
        let existing = self.store.list_prices().await?;
        let id = existing
            .iter()
            .find(|p| p.model_pattern == pattern && p.effective_from == effective_from)
            .map(|p| p.id.clone())
            .unwrap_or_else(new_id);
        let p = Price {
            id,
            model_pattern: pattern.clone(),
            effective_from,
            input: r.input,
            output: r.output,
            cache_write_5m: r.cache_write_5m,
            cache_write_1h: r.cache_write_1h,
            cache_read: r.cache_read,
            source: "operator".to_string(),
            revision: 0,
        };
        let detail = json!({
            "effective_from_ms": effective_from, "input": p.input, "output": p.output,
            "cache_write_5m": p.cache_write_5m, "cache_write_1h": p.cache_write_1h, "cache_read": p.cache_read,
            "unit": "micro-USD per million tokens",
        });
        self.apply(
            actor,
            "price.set",
            &pattern,
            detail,
            vec![Mutation::UpsertPrice(p.clone())],
        )
        .await?;
        Ok(price_to_pb(&p))
    }

    /// Removes an operator's prices of one pattern: every effective date, or
    /// the one given. Built-in prices stay (an operator price overrides them).
    /// Usage already stored keeps its cost (computed when it was recorded).
    pub(super) async fn delete_price(
        &self,
        actor: &Actor,
        r: pb::DeletePriceRequest,
    ) -> Result<pb::DeletePriceResponse, Status> {
        let pattern = r.model_pattern.trim().to_string();
        if pattern.is_empty() {
            return Err(Status::invalid_argument(
                "a model pattern is required (as `relayctl pricing list` shows it)",
            ));
        }
        let existing = self.store.list_prices().await?;
        let same: Vec<&Price> = existing.iter().filter(|p| p.model_pattern == pattern).collect();
        if same.is_empty() {
            return Err(Status::not_found(format!(
                "no price for model pattern {pattern:?}; `relayctl pricing list` shows the patterns \
                 (give one exactly as listed, with its '*')"
            )));
        }
        let at = |ms: i64| {
            chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms).map_or_else(
                || ms.to_string(),
                |t| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
            )
        };
        let chosen: Vec<&Price> = same
            .iter()
            .copied()
            .filter(|p| r.effective_from_ms == 0 || p.effective_from == r.effective_from_ms)
            .collect();
        if chosen.is_empty() {
            let dates: Vec<String> = same.iter().map(|p| at(p.effective_from)).collect();
            return Err(Status::not_found(format!(
                "no price for {pattern:?} takes effect at {}; its prices take effect at {}",
                at(r.effective_from_ms),
                dates.join(", ")
            )));
        }
        let removed: Vec<Price> = chosen
            .iter()
            .filter(|p| p.source != "builtin")
            .map(|p| (*p).clone())
            .collect();
        if removed.is_empty() {
            return Err(Status::failed_precondition(format!(
                "the price of {pattern:?} is relay's built-in one and cannot be removed; \
                 override it with `relayctl pricing set {pattern} ...`"
            )));
        }
        let detail = json!({
            "effective_from_ms": removed.iter().map(|p| p.effective_from).collect::<Vec<_>>(),
        });
        let muts = removed
            .iter()
            .map(|p| Mutation::DeletePrice { id: p.id.clone() })
            .collect();
        let v = self
            .apply(actor, "price.delete", &pattern, detail, muts)
            .await
            .map_err(|e| match e {
                StoreError::NotFound { .. } => {
                    Status::aborted(format!("the prices of {pattern:?} changed meanwhile; retry"))
                }
                e => e.into(),
            })?;
        Ok(pb::DeletePriceResponse {
            version: Some(version_pb(v)),
            removed: removed.iter().map(price_to_pb).collect(),
        })
    }
}
