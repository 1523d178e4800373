//! What a control plane makes sure of at start: the `default` group, the
//! built-in price table, and a first admin token.
//!
//! Every step is idempotent and safe when several replicas start at once.

use crate::api::admin::{admin_token_row, DEFAULT_GROUP};
use crate::crypto::{self, MasterKey};
use crate::model::*;
use crate::store::{DynStore, StoreError};
use std::path::{Path, PathBuf};

/// USD per million tokens → micro-USD per million tokens.
const fn usd(whole: u64, micros: u64) -> u64 {
    whole * 1_000_000 + micros
}

/// The default price table: (model pattern, input, output, cache write 5m,
/// cache write 1h, cache read), in micro-USD per million tokens. Anthropic's
/// list prices; operators override with `relayctl pricing set`.
pub const DEFAULT_PRICES: &[(&str, u64, u64, u64, u64, u64)] = &[
    (
        "claude-opus-4-5*",
        usd(5, 0),
        usd(25, 0),
        usd(6, 250_000),
        usd(10, 0),
        usd(0, 500_000),
    ),
    (
        "claude-opus-4-1*",
        usd(15, 0),
        usd(75, 0),
        usd(18, 750_000),
        usd(30, 0),
        usd(1, 500_000),
    ),
    (
        "claude-opus-4*",
        usd(15, 0),
        usd(75, 0),
        usd(18, 750_000),
        usd(30, 0),
        usd(1, 500_000),
    ),
    (
        "claude-sonnet-4*",
        usd(3, 0),
        usd(15, 0),
        usd(3, 750_000),
        usd(6, 0),
        usd(0, 300_000),
    ),
    (
        "claude-3-7-sonnet*",
        usd(3, 0),
        usd(15, 0),
        usd(3, 750_000),
        usd(6, 0),
        usd(0, 300_000),
    ),
    (
        "claude-3-5-sonnet*",
        usd(3, 0),
        usd(15, 0),
        usd(3, 750_000),
        usd(6, 0),
        usd(0, 300_000),
    ),
    (
        "claude-haiku-4-5*",
        usd(1, 0),
        usd(5, 0),
        usd(1, 250_000),
        usd(2, 0),
        usd(0, 100_000),
    ),
    (
        "claude-3-5-haiku*",
        usd(0, 800_000),
        usd(4, 0),
        usd(1, 0),
        usd(1, 600_000),
        usd(0, 80_000),
    ),
    (
        "claude-3-haiku*",
        usd(0, 250_000),
        usd(1, 250_000),
        usd(0, 300_000),
        usd(0, 500_000),
        usd(0, 30_000),
    ),
    (
        "claude-3-opus*",
        usd(15, 0),
        usd(75, 0),
        usd(18, 750_000),
        usd(30, 0),
        usd(1, 500_000),
    ),
];

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot write {path}: {reason}")]
    Write { path: String, reason: String },
    #[error("no admin token exists: set RELAY_ADMIN_TOKEN (or start with --data-dir so one is generated)")]
    NoAdminToken,
    #[error(
        "RELAY_ADMIN_TOKEN is too weak to become the first admin token: use at least {MIN_TOKEN_CHARS} \
         characters of random text (e.g. \"rat-$(openssl rand -hex 32)\")"
    )]
    WeakToken,
}

/// The shortest `RELAY_ADMIN_TOKEN` accepted, in characters.
pub const MIN_TOKEN_CHARS: usize = 32;

/// At least `MIN_TOKEN_CHARS` printable characters, and not a few repeated ones.
fn strong_enough(token: &str) -> bool {
    let distinct: std::collections::BTreeSet<char> = token.chars().collect();
    token.chars().count() >= MIN_TOKEN_CHARS && distinct.len() >= 10 && token.chars().all(|c| c.is_ascii_graphic())
}

fn system() -> AuditRecord {
    AuditRecord {
        actor: "system".into(),
        action: String::new(),
        target: String::new(),
        detail: "{}".into(),
    }
}

/// Creates the default group and the built-in prices when missing.
pub async fn ensure_defaults(store: &DynStore) -> Result<(), BootstrapError> {
    if store.get_group(DEFAULT_GROUP).await?.is_none() {
        let now = now_ms();
        let g = Group::new(
            DEFAULT_GROUP,
            DEFAULT_GROUP,
            "accounts and keys without an explicit group",
            KeyLimits::default(),
            now,
        );
        let audit = AuditRecord {
            action: "group.create".into(),
            target: DEFAULT_GROUP.into(),
            ..system()
        };
        match store.apply(vec![Mutation::InsertGroup(g)], audit).await {
            Ok(_) | Err(StoreError::AlreadyExists { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let have = store.list_prices().await?;
    if !have.iter().any(|p| p.source == "builtin") {
        let muts = DEFAULT_PRICES
            .iter()
            .map(|&(pattern, input, output, w5, w1, read)| {
                Mutation::UpsertPrice(Price {
                    id: format!("builtin:{pattern}"),
                    model_pattern: pattern.to_string(),
                    effective_from: 0,
                    input,
                    output,
                    cache_write_5m: w5,
                    cache_write_1h: w1,
                    cache_read: read,
                    source: "builtin".into(),
                    revision: 0,
                })
            })
            .collect();
        let audit = AuditRecord {
            action: "price.defaults".into(),
            target: "builtin".into(),
            detail: format!("{{\"models\":{}}}", DEFAULT_PRICES.len()),
            ..system()
        };
        store.apply(muts, audit).await?;
    }
    Ok(())
}

/// Where the first admin token came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminTokenSource {
    /// `RELAY_ADMIN_TOKEN` is a registered admin token.
    Environment,
    /// `RELAY_ADMIN_TOKEN` became the first admin token now.
    EnvironmentRegistered,
    /// `RELAY_ADMIN_TOKEN` is not a registered token and admin tokens exist: it was NOT registered
    /// (it may have been revoked; bootstrap happens only when there is no admin token).
    EnvironmentIgnored,
    /// Generated now and written to this file (mode 0600).
    Generated(PathBuf),
    /// A file from an earlier start holds it.
    Existing(PathBuf),
    /// Admin tokens already exist in the store.
    AlreadyPresent,
}

/// Makes sure an admin token exists: the one in `env_token` when given and no
/// admin token exists yet (bootstrap only, and only a strong one), else a
/// generated one written to `data_dir/admin.token`.
pub async fn ensure_admin_token(
    store: &DynStore,
    key: &MasterKey,
    env_token: Option<&str>,
    data_dir: Option<&Path>,
) -> Result<AdminTokenSource, BootstrapError> {
    if let Some(token) = env_token.map(str::trim).filter(|t| !t.is_empty()) {
        let hash = key.hash_admin_token(token);
        if store.find_admin_token(&hash).await?.is_some() {
            return Ok(AdminTokenSource::Environment);
        }
        // Bootstrap only: a token revoked since must not come back at the next start.
        if store.list_admin_tokens().await?.iter().any(|t| t.role == Role::Admin) {
            return Ok(AdminTokenSource::EnvironmentIgnored);
        }
        if !strong_enough(token) {
            return Err(BootstrapError::WeakToken);
        }
        let name = format!("bootstrap-{}", &hash[..8]);
        let mut row = admin_token_row(key, &name, Role::Admin, token);
        row.token_prefix = "(from RELAY_ADMIN_TOKEN)".into();
        let audit = AuditRecord {
            action: "token.create".into(),
            target: name.clone(),
            detail: "{\"role\":\"admin\",\"source\":\"RELAY_ADMIN_TOKEN\"}".into(),
            ..system()
        };
        match store.apply(vec![Mutation::InsertAdminToken(row)], audit).await {
            Ok(_) | Err(StoreError::AlreadyExists { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        return Ok(AdminTokenSource::EnvironmentRegistered);
    }
    let file = data_dir.map(|d| d.join("admin.token"));
    if let Some(f) = &file {
        if let Ok(existing) = std::fs::read_to_string(f) {
            let hash = key.hash_admin_token(existing.trim());
            if store.find_admin_token(&hash).await?.is_some() {
                return Ok(AdminTokenSource::Existing(f.clone()));
            }
        }
    }
    if store.list_admin_tokens().await?.iter().any(|t| t.role == Role::Admin) {
        return Ok(AdminTokenSource::AlreadyPresent);
    }
    let Some(file) = file else {
        return Err(BootstrapError::NoAdminToken);
    };
    let token = crypto::generate_secret(crypto::ADMIN_TOKEN_PREFIX);
    let row = admin_token_row(key, "admin", Role::Admin, &token);
    let audit = AuditRecord {
        action: "token.create".into(),
        target: "admin".into(),
        detail: "{\"role\":\"admin\",\"source\":\"generated at first start\"}".into(),
        ..system()
    };
    let _ = std::fs::remove_file(&file);
    crypto::write_secret_file(&file, &token).map_err(|e| BootstrapError::Write {
        path: file.display().to_string(),
        reason: e.to_string(),
    })?;
    store.apply(vec![Mutation::InsertAdminToken(row)], audit).await?;
    Ok(AdminTokenSource::Generated(file))
}

/// Name of the data-plane token standalone mode mints for its in-process data plane.
pub const STANDALONE_DP_TOKEN: &str = "standalone-data-plane";

/// Mints a fresh data-plane token for the in-process data plane of standalone
/// mode (replacing the one from the previous start). The token is kept in
/// memory only.
pub async fn standalone_data_plane_token(store: &DynStore, key: &MasterKey) -> Result<String, BootstrapError> {
    let token = crypto::generate_secret(crypto::ADMIN_TOKEN_PREFIX);
    let mut muts = Vec::new();
    if let Some(old) = store
        .list_admin_tokens()
        .await?
        .into_iter()
        .find(|t| t.name == STANDALONE_DP_TOKEN)
    {
        muts.push(Mutation::DeleteAdminToken { id: old.id });
    }
    muts.push(Mutation::InsertAdminToken(admin_token_row(
        key,
        STANDALONE_DP_TOKEN,
        Role::DataPlane,
        &token,
    )));
    let audit = AuditRecord {
        action: "token.rotate".into(),
        target: STANDALONE_DP_TOKEN.into(),
        detail: "{\"role\":\"data-plane\",\"source\":\"standalone start\"}".into(),
        ..system()
    };
    store.apply(muts, audit).await?;
    Ok(token)
}

#[cfg(test)]
mod tests {
    /// Every model a data plane lists by default has a built-in price: its usage is never
    /// accounted at zero cost on a fresh install.
    #[test]
    fn every_known_model_has_a_default_price() {
        for (id, _, _) in relay_proto::models::KNOWN {
            let priced = super::DEFAULT_PRICES
                .iter()
                .any(|(pattern, ..)| match pattern.strip_suffix('*') {
                    Some(prefix) => id.starts_with(prefix),
                    None => pattern == id,
                });
            assert!(priced, "{id} has no default price");
        }
    }
}
