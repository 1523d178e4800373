//! Domain types to and from their proto form, for the Admin API, Watch and the published config.
//! One function per type; nothing outside `api/` sees a proto type.

use crate::model::{self, Version};
use relay_proto::v1 as pb;

pub fn group_state_to_pb(s: model::GroupState) -> pb::GroupState {
    match s {
        model::GroupState::Active => pb::GroupState::Active,
        model::GroupState::Paused => pb::GroupState::Paused,
        model::GroupState::Activated => pb::GroupState::Activated,
    }
}

pub fn version_pb(v: Version) -> pb::ConfigVersion {
    pb::ConfigVersion::new(v.epoch, v.revision)
}

pub fn health_to_pb(h: model::AccountHealth) -> pb::AccountHealth {
    match h {
        model::AccountHealth::RateLimited => pb::AccountHealth::RateLimited,
        model::AccountHealth::Overloaded => pb::AccountHealth::Overloaded,
        model::AccountHealth::Erroring => pb::AccountHealth::Erroring,
        model::AccountHealth::Unauthorized => pb::AccountHealth::Unauthorized,
        model::AccountHealth::Blocked => pb::AccountHealth::Blocked,
    }
}

pub fn health_from_pb(h: i32) -> Option<model::AccountHealth> {
    match pb::AccountHealth::try_from(h).ok()? {
        pb::AccountHealth::RateLimited => Some(model::AccountHealth::RateLimited),
        pb::AccountHealth::Overloaded => Some(model::AccountHealth::Overloaded),
        pb::AccountHealth::Erroring => Some(model::AccountHealth::Erroring),
        pb::AccountHealth::Unauthorized => Some(model::AccountHealth::Unauthorized),
        pb::AccountHealth::Blocked => Some(model::AccountHealth::Blocked),
        pb::AccountHealth::Unspecified => None,
    }
}

pub fn account_state_to_pb(s: &model::AccountState) -> pb::AccountState {
    pb::AccountState {
        account_id: s.account_id.clone(),
        health: health_to_pb(s.health) as i32,
        reason: s.reason.clone(),
        until_ms: s.until,
        scope: s.scope.clone(),
        since_ms: s.since,
        reported_by: s.reported_by.clone(),
        reset_generation: 0,
    }
}

pub fn account_kind_to_pb(k: model::AccountKind) -> pb::AccountKind {
    match k {
        model::AccountKind::AnthropicApiKey => pb::AccountKind::AnthropicApiKey,
        model::AccountKind::ClaudeOauth => pb::AccountKind::ClaudeOauth,
        model::AccountKind::AnthropicCompatible => pb::AccountKind::AnthropicCompatible,
    }
}

pub fn key_status_to_pb(s: model::KeyStatus) -> pb::KeyStatus {
    match s {
        model::KeyStatus::Active => pb::KeyStatus::Active,
        model::KeyStatus::Disabled => pb::KeyStatus::Disabled,
        model::KeyStatus::Revoked => pb::KeyStatus::Revoked,
    }
}

pub fn limits_to_pb(l: &model::KeyLimits) -> pb::KeyLimits {
    pb::KeyLimits {
        requests_per_minute: u32::try_from(l.rpm).unwrap_or(u32::MAX),
        tokens_per_minute: l.tpm,
        max_concurrency: u32::try_from(l.max_concurrency).unwrap_or(u32::MAX),
        daily_budget_micro_usd: l.daily_budget,
        monthly_budget_micro_usd: l.monthly_budget,
    }
}

pub fn capture_rule_to_pb(c: &model::CaptureRule) -> pb::CaptureRule {
    pb::CaptureRule {
        id: c.id.clone(),
        key_id: c.key_id.clone(),
        group_id: c.group_id.clone(),
        account_id: c.account_id.clone(),
        model: c.model.clone(),
        errors_only: c.errors_only,
        sample_rate: f64::from(c.sample_ppm) / 1_000_000.0,
        max_bytes: c.max_bytes,
        ttl_ms: c.ttl_ms,
    }
}

pub fn price_to_pb(p: &model::Price) -> pb::Price {
    pb::Price {
        id: p.id.clone(),
        model_pattern: p.model_pattern.clone(),
        effective_from_ms: p.effective_from,
        input: p.input,
        output: p.output,
        cache_write_5m: p.cache_write_5m,
        cache_write_1h: p.cache_write_1h,
        cache_read: p.cache_read,
        source: p.source.clone(),
    }
}

pub fn resource_kind_to_pb(k: model::ResourceKind) -> pb::ResourceKind {
    match k {
        model::ResourceKind::ApiKey => pb::ResourceKind::ApiKey,
        model::ResourceKind::Account => pb::ResourceKind::Account,
        model::ResourceKind::Group => pb::ResourceKind::Group,
        model::ResourceKind::Price => pb::ResourceKind::Price,
        model::ResourceKind::Settings => pb::ResourceKind::Settings,
        model::ResourceKind::AccountState => pb::ResourceKind::AccountState,
        model::ResourceKind::AdminToken => pb::ResourceKind::Unspecified,
    }
}

/// The stored name of a resource kind a data plane reports.
pub fn resource_kind_from_pb(k: i32) -> &'static str {
    match pb::ResourceKind::try_from(k) {
        Ok(pb::ResourceKind::ApiKey) => model::ResourceKind::ApiKey.as_str(),
        Ok(pb::ResourceKind::Account) => model::ResourceKind::Account.as_str(),
        Ok(pb::ResourceKind::Group) => model::ResourceKind::Group.as_str(),
        Ok(pb::ResourceKind::Price) => model::ResourceKind::Price.as_str(),
        Ok(pb::ResourceKind::Settings) => model::ResourceKind::Settings.as_str(),
        Ok(pb::ResourceKind::AccountState) => model::ResourceKind::AccountState.as_str(),
        _ => "unknown",
    }
}

pub fn role_from_pb(r: i32) -> Result<model::Role, tonic::Status> {
    match pb::AdminRole::try_from(r) {
        Ok(pb::AdminRole::Admin) => Ok(model::Role::Admin),
        Ok(pb::AdminRole::ReadOnly) => Ok(model::Role::ReadOnly),
        Ok(pb::AdminRole::DataPlane) => Ok(model::Role::DataPlane),
        _ => Err(tonic::Status::invalid_argument(
            "role is required: admin, read-only or data-plane",
        )),
    }
}

pub fn role_to_pb(r: model::Role) -> pb::AdminRole {
    match r {
        model::Role::Admin => pb::AdminRole::Admin,
        model::Role::ReadOnly => pb::AdminRole::ReadOnly,
        model::Role::DataPlane => pb::AdminRole::DataPlane,
    }
}
