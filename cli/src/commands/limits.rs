//! Limits as keys and groups share them: the flags applied over current values, and how a set of
//! limits and the budget spent read on screen.

use relay_proto::v1::{BudgetSpend, KeyLimits};

use crate::args::LimitArgs;
use crate::output::Value;
use crate::parse::{format_cost, format_micros, PICOS_PER_MICRO};

/// `current` with the limits given on the command line changed (0 clears one).
pub fn apply(mut current: KeyLimits, args: &LimitArgs) -> KeyLimits {
    if let Some(v) = args.rpm {
        current.requests_per_minute = v;
    }
    if let Some(v) = args.tpm {
        current.tokens_per_minute = v;
    }
    if let Some(v) = args.concurrency {
        current.max_concurrency = v;
    }
    if let Some(v) = args.daily_budget {
        current.daily_budget_micro_usd = v;
    }
    if let Some(v) = args.monthly_budget {
        current.monthly_budget_micro_usd = v;
    }
    current
}

/// Every limit set, on one line: `600 rpm, 4 concurrent, $5.00/day`; `unlimited` when none is.
pub fn summary(l: &KeyLimits) -> String {
    let mut parts = Vec::new();
    if l.requests_per_minute > 0 {
        parts.push(format!("{} rpm", l.requests_per_minute));
    }
    if l.tokens_per_minute > 0 {
        parts.push(format!("{} tpm", l.tokens_per_minute));
    }
    if l.max_concurrency > 0 {
        parts.push(format!("{} concurrent", l.max_concurrency));
    }
    if l.daily_budget_micro_usd > 0 {
        parts.push(format!("${}/day", format_micros(l.daily_budget_micro_usd)));
    }
    if l.monthly_budget_micro_usd > 0 {
        parts.push(format!("${}/month", format_micros(l.monthly_budget_micro_usd)));
    }
    if parts.is_empty() {
        crate::output::UNLIMITED.to_string()
    } else {
        parts.join(", ")
    }
}

/// Spend in pico-USD as USD (six decimals, exact to the micro-dollar).
pub fn spent(picos: u64) -> Value {
    Value::Decimal(format_cost(picos))
}

/// What is left of a budget (micro-USD; 0 = none) after `picos` spent: never below zero;
/// `unlimited` (JSON null) without a budget.
pub fn remaining(budget_micros: u64, picos: u64) -> Value {
    if budget_micros == 0 {
        return Value::Limit {
            value: Box::new(Value::Null),
            unlimited: true,
        };
    }
    let left = budget_micros.saturating_mul(PICOS_PER_MICRO).saturating_sub(picos);
    Value::Decimal(format_cost(left))
}

/// The spend of one period pair, or zeros when the server sent none.
pub fn of(s: Option<&BudgetSpend>) -> BudgetSpend {
    s.cloned().unwrap_or_default()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn only_given_limits_change() {
        let current = KeyLimits {
            requests_per_minute: 60,
            tokens_per_minute: 1000,
            max_concurrency: 4,
            daily_budget_micro_usd: 5_000_000,
            monthly_budget_micro_usd: 100_000_000,
        };
        let args = LimitArgs {
            rpm: Some(120),
            tpm: None,
            concurrency: None,
            daily_budget: Some(0),
            monthly_budget: None,
        };
        assert_eq!(
            apply(current, &args),
            KeyLimits {
                requests_per_minute: 120,
                daily_budget_micro_usd: 0,
                ..current
            }
        );
    }

    #[test]
    fn summaries_and_remaining() {
        assert_eq!(summary(&KeyLimits::default()), "unlimited");
        let l = KeyLimits {
            requests_per_minute: 600,
            max_concurrency: 4,
            daily_budget_micro_usd: 12_500_000,
            ..Default::default()
        };
        assert_eq!(summary(&l), "600 rpm, 4 concurrent, $12.50/day");
        // $5 budget, $1.25 spent: $3.75 left; overspent: 0, never negative.
        assert_eq!(
            remaining(5_000_000, 1_250_000_000_000),
            Value::Decimal("3.750000".into())
        );
        assert_eq!(
            remaining(5_000_000, 9_000_000_000_000),
            Value::Decimal("0.000000".into())
        );
        assert!(matches!(remaining(0, 1), Value::Limit { unlimited: true, .. }));
    }
}
