//! Accounts: create, update (credentials sealed, health states cleared when the way to the
//! upstream changes), show, list, delete, reset, and probe (`CheckAccounts`); the account view
//! (group names, health states, what data planes could not use, quota windows).

use super::lookup::lookup;
use super::validate::{
    account_kind, validate_credential, validate_name, validate_oauth_fields, validate_proxy_url, validate_url,
    validate_weight, MAX_WEIGHT,
};
use super::{new_id, retry_conflicts, AdminApi};
use crate::api::auth::Actor;
use crate::api::convert::{account_kind_to_pb, account_state_to_pb, version_pb};
use crate::crypto;
use crate::model::*;
use relay_proto::v1 as pb;
use serde_json::json;
use std::collections::BTreeMap;
use tonic::Status;

pub const ANTHROPIC_BASE_URL: &str = "https://api.anthropic.com";

/// What `account_info` needs beside the account row.
pub(super) struct AccountView {
    groups: BTreeMap<String, String>,
    states: Vec<AccountState>,
    config_errors: BTreeMap<String, Vec<String>>,
    quotas: BTreeMap<String, crate::model::AccountQuota>,
}

impl AdminApi {
    /// A proxy URL with a `user:password@` part is a secret: sealed under the
    /// master key (the stored `proxy_url` keeps only the redacted form).
    pub(super) fn seal_proxy_url(&self, url: &str, account_id: &str) -> Result<Option<Vec<u8>>, Status> {
        if redact_url(url) == url {
            return Ok(None);
        }
        self.key
            .seal(url, &proxy_seal_context(account_id))
            .map(Some)
            .map_err(|_| Status::internal("cannot encrypt the proxy URL"))
    }

    /// The shared validation every data plane runs on the account as it will
    /// receive it ([`relay_proto::validate::account`]): what is accepted here
    /// is served everywhere.
    pub(super) fn check_usable(&self, a: &Account) -> Result<(), Status> {
        let pb = crate::api::publish::account_to_pb(a, &self.key).map_err(|e| Status::internal(e.to_string()))?;
        relay_proto::validate::account(&pb)
            .map_err(|e| Status::invalid_argument(format!("account {:?} cannot be used: {e}", a.name)))
    }

    pub(super) async fn account(&self, id_or_name: &str) -> Result<Account, Status> {
        if let Some(a) = self.store.get_account(id_or_name).await? {
            return Ok(a);
        }
        let all = self.store.list_accounts().await?;
        lookup(all, id_or_name, "account", |a| (&a.id, &a.name))
    }

    pub(super) async fn states(&self) -> Result<Vec<AccountState>, Status> {
        Ok(self.store.list_account_states().await?)
    }

    /// What an account listing shows beside the rows: group names, health
    /// states, and what connected data planes could not use.
    pub(super) async fn account_view(&self) -> Result<AccountView, Status> {
        let mut config_errors: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let now = crate::model::now_ms();
        for p in self.store.list_proxies().await? {
            if !p.live(now) {
                continue;
            }
            for r in p.rejected.iter().filter(|r| r.kind == ResourceKind::Account.as_str()) {
                config_errors
                    .entry(r.id.clone())
                    .or_default()
                    .push(format!("{}: {}", p.node_id, r.error));
            }
        }
        Ok(AccountView {
            groups: self.group_names().await?,
            states: self.states().await?,
            config_errors,
            quotas: self
                .store
                .list_quotas()
                .await?
                .into_iter()
                .map(|q| (q.account_id.clone(), q))
                .collect(),
        })
    }

    pub(super) fn account_info(a: &Account, view: &AccountView) -> pb::AccountInfo {
        let (groups, states) = (&view.groups, &view.states);
        let now = now_ms();
        pb::AccountInfo {
            quota: view.quotas.get(&a.id).map(crate::api::quota::to_pb),
            config_errors: view.config_errors.get(&a.id).cloned().unwrap_or_default(),
            states: states
                .iter()
                .filter(|s| s.account_id == a.id && (s.until == 0 || s.until > now))
                .map(account_state_to_pb)
                .collect(),
            id: a.id.clone(),
            name: a.name.clone(),
            kind: account_kind_to_pb(a.kind) as i32,
            base_url: a.base_url.clone(),
            priority: a.priority,
            weight: a.weight,
            groups: a
                .group_ids
                .iter()
                .map(|g| groups.get(g).cloned().unwrap_or_else(|| g.clone()))
                .collect(),
            max_concurrency: a.max_concurrency,
            status: match a.status {
                AccountStatus::Enabled => pb::AccountStatus::Enabled,
                AccountStatus::Disabled => pb::AccountStatus::Disabled,
            } as i32,
            proxy_url: redact_url(&a.proxy_url),
            // A claude-oauth account without a refresh token holds a long-lived setup token: nothing
            // refreshes it, the operator replaces it.
            credential_hint: if a.kind == AccountKind::ClaudeOauth && a.refresh_token_enc.is_none() {
                format!("setup token (no refresh) {}", a.credential_hint)
            } else {
                a.credential_hint.clone()
            },
            created_at_ms: a.created_at,
            updated_at_ms: a.updated_at,
            credential_expires_at_ms: a.credential_expires_at.unwrap_or(0),
            scopes: a.scopes.clone(),
            subscription_type: a.subscription_type.clone(),
            organization: a.organization.clone(),
        }
    }

    pub(super) async fn create_account(
        &self,
        actor: &Actor,
        r: pb::CreateAccountRequest,
    ) -> Result<pb::AccountInfo, Status> {
        validate_name("account", &r.name)?;
        let kind = account_kind(r.kind)?;
        let base_url = match (r.base_url.trim(), kind) {
            ("", AccountKind::AnthropicCompatible) => {
                return Err(Status::invalid_argument(
                    "an anthropic-compatible account needs --base-url",
                ))
            }
            ("", _) => ANTHROPIC_BASE_URL.to_string(),
            (u, _) => {
                relay_proto::validate::base_url_names_no_route(u).map_err(Status::invalid_argument)?;
                relay_proto::validate::normalize_base_url(u)
            }
        };
        validate_url("base URL", &base_url, &["http", "https"])?;
        validate_credential(&r.credential)?;
        if !r.proxy_url.is_empty() {
            validate_proxy_url(&r.proxy_url)?;
        }
        let weight = validate_weight(r.weight)?;
        let (scopes, subscription_type, organization) = validate_oauth_fields(kind, &r)?;
        let group_ids = self.resolve_groups(&r.groups).await?;
        let id = new_id();
        let seal = |v: &str, ctx: &str| {
            self.key
                .seal(v, ctx)
                .map_err(|_| Status::internal("cannot encrypt the credential"))
        };
        let now = now_ms();
        let row = Account {
            id: id.clone(),
            name: r.name.clone(),
            kind,
            base_url,
            credential_enc: seal(&r.credential, &id)?,
            refresh_token_enc: if r.refresh_token.is_empty() {
                None
            } else {
                Some(seal(&r.refresh_token, &format!("{id}/refresh"))?)
            },
            credential_hint: crypto::credential_hint(&r.credential),
            credential_expires_at: (r.credential_expires_at_ms > 0).then_some(r.credential_expires_at_ms),
            priority: r.priority,
            weight,
            group_ids,
            max_concurrency: r.max_concurrency,
            status: AccountStatus::Enabled,
            proxy_url: redact_url(&r.proxy_url),
            proxy_url_enc: self.seal_proxy_url(&r.proxy_url, &id)?,
            reset_generation: 0,
            scopes,
            subscription_type,
            organization,
            created_at: now,
            updated_at: now,
            revision: 0,
        };
        self.check_usable(&row)?;
        let info = Self::account_info(&row, &self.account_view().await?);
        if r.validate_only {
            if self.store.get_account(&r.name).await?.is_some() {
                return Err(Status::already_exists(format!("account {:?} already exists", r.name)));
            }
            return Ok(info);
        }
        let detail = json!({
            "id": id, "kind": kind.as_str(), "base_url": row.base_url, "priority": row.priority,
            "weight": row.weight, "groups": info.groups, "max_concurrency": row.max_concurrency,
            "proxy_url": info.proxy_url, "credential": "set",
            "refresh_token": if r.refresh_token.is_empty() { "none" } else { "set" },
            "scopes": row.scopes, "subscription_type": row.subscription_type, "organization": row.organization,
        });
        self.apply(
            actor,
            "account.create",
            &r.name,
            detail,
            vec![Mutation::InsertAccount(row)],
        )
        .await?;
        Ok(info)
    }

    pub(super) async fn update_account(
        &self,
        actor: &Actor,
        r: pb::UpdateAccountRequest,
    ) -> Result<pb::AccountInfo, Status> {
        if let Some(n) = &r.name {
            validate_name("account", n)?;
        }
        if let Some(u) = &r.base_url {
            validate_url("base URL", u, &["http", "https"])?;
        }
        if let Some(c) = &r.credential {
            validate_credential(c)?;
        }
        if let Some(p) = r.proxy_url.as_deref().filter(|p| !p.is_empty()) {
            validate_proxy_url(p)?;
        }
        // 0 is not "the default" in an update: it would silently become 1.
        if r.weight == Some(0) {
            return Err(Status::invalid_argument(format!(
                "weight 0 is refused: a weight is in 1..={MAX_WEIGHT}; to stop routing to an account, disable it"
            )));
        }
        let weight = r.weight.map(validate_weight).transpose()?;
        let status = match r.status.map(pb::AccountStatus::try_from) {
            None => None,
            Some(Ok(pb::AccountStatus::Enabled)) => Some(AccountStatus::Enabled),
            Some(Ok(pb::AccountStatus::Disabled)) => Some(AccountStatus::Disabled),
            Some(_) => return Err(Status::invalid_argument("status must be enabled or disabled")),
        };
        let group_ids = if r.set_groups {
            Some(self.resolve_groups(&r.groups).await?)
        } else {
            None
        };
        let row = retry_conflicts(|| async {
            let cur = self.account(&r.account).await?;
            let mut a = cur.clone();
            let mut changed = serde_json::Map::new();
            if let Some(n) = &r.name {
                a.name = n.clone();
                changed.insert("name".into(), json!(n));
            }
            if let Some(u) = &r.base_url {
                relay_proto::validate::base_url_names_no_route(u).map_err(Status::invalid_argument)?;
                a.base_url = relay_proto::validate::normalize_base_url(u);
                changed.insert("base_url".into(), json!(a.base_url));
                // The stored credential would go to another host: only when it is given
                // again, or the operator says so explicitly.
                let keeps_secret = matches!(cur.kind, AccountKind::AnthropicApiKey | AccountKind::ClaudeOauth);
                if keeps_secret && url_host(&a.base_url) != url_host(&cur.base_url) && r.credential.is_none() {
                    if !r.allow_credential_to_new_host {
                        return Err(Status::failed_precondition(format!(
                            "moving account {:?} to host {:?} would send its stored credential there: give the \
                             credential again (--secret-stdin / --secret-file) or pass --allow-credential-to-new-host",
                            cur.name,
                            url_host(&a.base_url)
                        )));
                    }
                    changed.insert("credential_sent_to_new_host".into(), json!(true));
                }
            }
            if let Some(c) = &r.credential {
                a.credential_enc = self
                    .key
                    .seal(c, &a.id)
                    .map_err(|_| Status::internal("cannot encrypt the credential"))?;
                a.credential_hint = crypto::credential_hint(c);
                changed.insert("credential".into(), json!("changed"));
            }
            if let Some(t) = &r.refresh_token {
                a.refresh_token_enc = if t.is_empty() {
                    None
                } else {
                    Some(
                        self.key
                            .seal(t, &format!("{}/refresh", a.id))
                            .map_err(|_| Status::internal("cannot encrypt the credential"))?,
                    )
                };
                changed.insert("refresh_token".into(), json!("changed"));
            }
            if let Some(p) = r.priority {
                a.priority = p;
                changed.insert("priority".into(), json!(p));
            }
            if let Some(w) = weight {
                a.weight = w;
                changed.insert("weight".into(), json!(w));
            }
            if let Some(g) = &group_ids {
                a.group_ids = g.clone();
                changed.insert("group_ids".into(), json!(g));
            }
            if let Some(m) = r.max_concurrency {
                a.max_concurrency = m;
                changed.insert("max_concurrency".into(), json!(m));
            }
            if let Some(s) = status {
                a.status = s;
                changed.insert("status".into(), json!(s.as_str()));
            }
            if let Some(p) = &r.proxy_url {
                a.proxy_url = redact_url(p);
                a.proxy_url_enc = self.seal_proxy_url(p, &a.id)?;
                changed.insert("proxy_url".into(), json!(a.proxy_url));
            }
            if let Some(e) = r.credential_expires_at_ms {
                a.credential_expires_at = (e > 0).then_some(e);
                changed.insert("credential_expires_at_ms".into(), json!(e));
            }
            // A new credential or way to reach the upstream, or an operator enabling
            // the account, ends its health states.
            let clears = r.credential.is_some()
                || r.base_url.is_some()
                || r.proxy_url.is_some()
                || status == Some(AccountStatus::Enabled);
            if clears {
                a.reset_generation = cur.reset_generation.saturating_add(1);
            }
            let clear: Vec<AccountState> = if clears {
                self.states()
                    .await?
                    .into_iter()
                    .filter(|s| s.account_id == a.id)
                    .collect()
            } else {
                Vec::new()
            };
            if a == cur && clear.is_empty() {
                return Ok(a);
            }
            self.check_usable(&a)?;
            a.updated_at = now_ms();
            let mut muts = vec![Mutation::UpdateAccount {
                row: a.clone(),
                expect_revision: cur.revision,
            }];
            for st in clear {
                muts.push(Mutation::ClearAccountState {
                    account_id: st.account_id,
                    scope: st.scope,
                });
            }
            let action = match (status, changed.len()) {
                (Some(AccountStatus::Disabled), 1) => "account.disable",
                (Some(AccountStatus::Enabled), 1) => "account.enable",
                _ => "account.update",
            };
            self.apply(actor, action, &cur.name, serde_json::Value::Object(changed), muts)
                .await?;
            Ok(a)
        })
        .await?;
        Ok(Self::account_info(&row, &self.account_view().await?))
    }

    pub(super) async fn get_account(
        &self,
        _actor: &Actor,
        r: pb::GetAccountRequest,
    ) -> Result<pb::AccountInfo, Status> {
        let a = self.account(&r.account).await?;
        Ok(Self::account_info(&a, &self.account_view().await?))
    }

    pub(super) async fn list_accounts(
        &self,
        _actor: &Actor,
        _r: pb::ListAccountsRequest,
    ) -> Result<pb::ListAccountsResponse, Status> {
        let accounts = self.store.list_accounts().await?;
        let view = self.account_view().await?;
        Ok(pb::ListAccountsResponse {
            accounts: accounts.iter().map(|a| Self::account_info(a, &view)).collect(),
        })
    }

    pub(super) async fn delete_account(
        &self,
        actor: &Actor,
        r: pb::DeleteAccountRequest,
    ) -> Result<pb::DeleteResponse, Status> {
        let a = self.account(&r.account).await?;
        let v = self
            .apply(
                actor,
                "account.delete",
                &a.name,
                json!({"id": a.id}),
                vec![Mutation::DeleteAccount { id: a.id.clone() }],
            )
            .await?;
        Ok(pb::DeleteResponse {
            version: Some(version_pb(v)),
        })
    }

    /// Clears every health state of the account, on the control plane and on
    /// every data plane (its `reset_generation` moves: each data plane drops
    /// its local view of the account, circuit breaker included).
    pub(super) async fn reset_account(
        &self,
        actor: &Actor,
        r: pb::ResetAccountRequest,
    ) -> Result<pb::AccountInfo, Status> {
        let name = r.account.clone();
        let row = retry_conflicts(|| async {
            let cur = self.account(&name).await?;
            let states: Vec<AccountState> = self
                .states()
                .await?
                .into_iter()
                .filter(|s| s.account_id == cur.id)
                .collect();
            let cleared: Vec<String> = states.iter().map(|s| format!("{}:{}", s.health, s.scope)).collect();
            let mut a = cur.clone();
            a.reset_generation = cur.reset_generation.saturating_add(1);
            let mut muts = vec![Mutation::UpdateAccount {
                row: a.clone(),
                expect_revision: cur.revision,
            }];
            muts.extend(states.into_iter().map(|s| Mutation::ClearAccountState {
                account_id: s.account_id,
                scope: s.scope,
            }));
            self.apply(
                actor,
                "account.reset",
                &cur.name,
                json!({"cleared": cleared, "reset_generation": a.reset_generation}),
                muts,
            )
            .await?;
            Ok(a)
        })
        .await?;
        Ok(Self::account_info(&row, &self.account_view().await?))
    }

    pub(super) async fn check_accounts(
        &self,
        actor: &Actor,
        r: pb::CheckAccountsRequest,
    ) -> Result<pb::CheckAccountsResponse, Status> {
        let prober = self
            .prober
            .clone()
            .ok_or_else(|| Status::unimplemented("this control plane cannot probe accounts"))?;
        let accounts = if r.account.trim().is_empty() {
            self.store.list_accounts().await?
        } else {
            vec![self.account(&r.account).await?]
        };
        let mut checks: Vec<pb::AccountCheck> = prober
            .check(accounts, &actor.name)
            .await
            .into_iter()
            .map(|(a, v, marked)| pb::AccountCheck {
                account_id: a.id.clone(),
                name: a.name.clone(),
                verdict: v.label().to_string(),
                detail: v.detail().to_string(),
                until_ms: v.until(),
                marked: matches!(marked, Ok(true)),
                mark_error: marked.err().map(|e| e.to_string()).unwrap_or_default(),
            })
            .collect();
        checks.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(pb::CheckAccountsResponse { checks })
    }
}

/// What a sealed proxy URL is bound to (AES-GCM associated data).
pub fn proxy_seal_context(account_id: &str) -> String {
    format!("{account_id}/proxy")
}

/// A URL with any `user:password@` part hidden.
/// The host (and port) of a URL, for comparing where a credential goes.
pub(super) fn url_host(url: &str) -> String {
    url.parse::<tonic::codegen::http::Uri>()
        .ok()
        .and_then(|u| {
            u.authority()
                .map(|a| a.as_str().rsplit('@').next().unwrap_or("").to_ascii_lowercase())
        })
        .unwrap_or_default()
}

/// The user info ends at the LAST `@` of the authority (as the proxy URL parser
/// reads it), so a password holding an unescaped `@` is hidden whole.
pub fn redact_url(url: &str) -> String {
    let Some(s) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[s + 3..];
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..end].rfind('@') {
        Some(at) => format!("{}://…@{}", &url[..s], &rest[at + 1..]),
        None => url.to_string(),
    }
}
