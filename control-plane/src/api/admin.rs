//! The Admin service (what `relayctl` calls): validation, secrets sealed or
//! hashed before they reach the store, optimistic-concurrency retries, and an
//! audit record for every write. Reads need a read-only or admin token; writes
//! need an admin token.

use super::auth::{Actor, Authenticator, Need};
use super::status_from_store;
use crate::config::{account_kind_to_pb, account_state_to_pb, key_status_to_pb, limits_to_pb, price_to_pb, version_pb};
use crate::crypto::{self, MasterKey};
use crate::model::{self, *};
use crate::spend::{current_periods, SpendCache, Spent};
use crate::store::{DynStore, StoreError};
use relay_proto::settings;
use relay_proto::v1 as pb;
use relay_proto::v1::admin_server::Admin;
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub const DEFAULT_GROUP: &str = "default";
pub const ANTHROPIC_BASE_URL: &str = "https://api.anthropic.com";
const MAX_WEIGHT: u32 = 10_000;
/// Stored settings at most (the declared ones plus account overrides).
const MAX_STORED_SETTINGS: usize = 2_000;
/// How often an update is retried when another writer changed the row meanwhile.
const CONFLICT_RETRIES: usize = 8;
/// The largest tokens-per-minute limit (the limiter counts tokens exactly up to 2^53).
pub const MAX_TPM: u64 = 1_000_000_000_000;
/// The largest daily or monthly budget, in micro-USD: $1,000,000 (the limiter counts spend in
/// nano-USD, exactly up to 2^53).
pub const MAX_BUDGET_MICRO_USD: u64 = 1_000_000_000_000;

pub struct AdminService {
    store: DynStore,
    key: MasterKey,
    auth: Authenticator,
    spend: Arc<SpendCache>,
    /// Keys' live counters (requests and tokens this minute, in flight).
    live: Option<Arc<relay_limits::Limiter>>,
    /// Runs `CheckAccounts` probes (None: refused).
    prober: Option<Arc<crate::jobs::probe::Prober>>,

    /// This replica's name and its part in the leader election (`GetStatus`).
    replica: String,
    leadership: Option<crate::leader::Leadership>,
    /// Ends `TailRequests` streams when the control plane shuts down.
    closing: Option<super::Closing>,
}

impl AdminService {
    /// Reads live counters from this limiter (Redis, or the standalone data plane's).
    pub fn with_live(mut self, live: Option<Arc<relay_limits::Limiter>>) -> Self {
        self.live = live;
        self
    }

    /// Probes accounts for `CheckAccounts` with this prober.
    pub fn with_prober(mut self, prober: Option<Arc<crate::jobs::probe::Prober>>) -> Self {
        self.prober = prober;
        self
    }

    /// Names this replica and its leadership in `GetStatus`.
    pub fn with_replica(mut self, replica: &str, leadership: Option<crate::leader::Leadership>) -> Self {
        self.replica = replica.to_string();
        self.leadership = leadership;
        self
    }

    /// Ends open `TailRequests` streams when `closing` turns true.
    pub fn with_closing(mut self, closing: super::Closing) -> Self {
        self.closing = Some(closing);
        self
    }

    /// The key's and its group's live counters, when this control plane can see them.
    async fn live_use(
        &self,
        k: &crate::model::ApiKey,
        group: &crate::model::Group,
        p: &relay_proto::periods::Periods,
    ) -> (Option<pb::LiveUse>, Option<pb::LiveUse>) {
        let Some(l) = &self.live else { return (None, None) };
        let subject = |kind, id: &str, limits: &pb::KeyLimits| relay_limits::Subject {
            kind,
            id: id.to_string(),
            limits: relay_limits::Limits::from_pb(Some(limits)),
            committed: relay_limits::Committed::default(),
        };
        let subjects = [
            subject(relay_limits::Kind::Key, &k.id, &limits_to_pb(&k.limits)),
            subject(relay_limits::Kind::Group, &group.id, &limits_to_pb(&group.limits)),
        ];
        match l.peek(&subjects, p).await {
            Ok(u) => {
                let live = |u: &relay_limits::Use| pb::LiveUse {
                    requests_last_minute: u32::try_from(u.requests).unwrap_or(u32::MAX),
                    tokens_last_minute: u.tokens,
                    in_flight: u32::try_from(u.in_flight).unwrap_or(u32::MAX),
                };
                // A subject without limits is not counted: no live use to show.
                let of = |i: usize| {
                    subjects
                        .get(i)
                        .filter(|s| !s.limits.is_unlimited())
                        .and_then(|_| u.get(i))
                        .map(live)
                };
                (of(0), of(1))
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot read live counters");
                (None, None)
            }
        }
    }

    pub fn new(store: DynStore, key: MasterKey, spend: Arc<SpendCache>) -> Self {
        let auth = Authenticator::new(store.clone(), key.clone());
        Self {
            store,
            key,
            auth,
            spend,
            live: None,
            prober: None,
            closing: None,

            replica: String::new(),
            leadership: None,
        }
    }

    async fn authorize<T>(&self, req: &Request<T>, need: Need, method: &'static str) -> Result<Actor, Status> {
        let r = self.auth.check(req.metadata(), need).await;
        let outcome = if r.is_ok() { "ok" } else { "denied" };
        metrics::counter!(relay_proto::metrics::ADMIN_REQUESTS_TOTAL, "method" => method, "auth" => outcome)
            .increment(1);
        r
    }

    async fn apply(
        &self,
        actor: &Actor,
        action: &str,
        target: &str,
        detail: serde_json::Value,
        m: Vec<Mutation>,
    ) -> Result<Version, StoreError> {
        self.store
            .apply(
                m,
                AuditRecord {
                    actor: actor.name.clone(),
                    action: action.to_string(),
                    target: target.to_string(),
                    detail: detail.to_string(),
                },
            )
            .await
    }

    /// Stores `next` over `cur` (optimistic concurrency on `cur`'s revision), audited.
    async fn write_key(
        &self,
        actor: &Actor,
        action: &str,
        cur: &ApiKey,
        next: ApiKey,
        detail: serde_json::Value,
    ) -> Result<ApiKey, Status> {
        let m = Mutation::UpdateApiKey {
            row: next.clone(),
            expect_revision: cur.revision,
        };
        self.apply(actor, action, &cur.name, detail, vec![m])
            .await
            .map_err(status_from_store)?;
        Ok(next)
    }

    /// A proxy URL with a `user:password@` part is a secret: sealed under the
    /// master key (the stored `proxy_url` keeps only the redacted form).
    fn seal_proxy_url(&self, url: &str, account_id: &str) -> Result<Option<Vec<u8>>, Status> {
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
    fn check_usable(&self, a: &Account) -> Result<(), Status> {
        let pb = crate::config::account_to_pb(a, &self.key).map_err(|e| Status::internal(e.to_string()))?;
        relay_proto::validate::account(&pb)
            .map_err(|e| Status::invalid_argument(format!("account {:?} cannot be used: {e}", a.name)))
    }

    /// The stored name of a setting: account overrides by account id.
    async fn setting_key(&self, target: &settings::Target) -> Result<String, Status> {
        Ok(match target {
            settings::Target::Global(s) => s.name.to_string(),
            settings::Target::Account { account, setting } => {
                let a = self.account(account).await?;
                format!("account.{}.{}", a.id, setting.name)
            }
        })
    }

    /// Every declared setting (value in force, default), the account overrides
    /// stored, and stored names relay does not know (so they can be unset).
    async fn settings_response(&self) -> Result<pb::ListSettingsResponse, Status> {
        let mut values = self.store.settings().await.map_err(status_from_store)?;
        // Secrets are shown masked (a URL's scheme and host), never in clear.
        for name in settings::SECRET {
            if let Some(v) = values.get_mut(*name) {
                let clear = crate::notify::open_setting(&self.key, name, v).unwrap_or_default();
                *v = settings::mask(&clear);
            }
        }
        let info = |name: String, value: Option<&String>, decl: Option<&settings::Setting>| pb::SettingInfo {
            name,
            set: value.is_some(),
            value: value
                .cloned()
                .or(decl.map(|d| d.default.to_string()))
                .unwrap_or_default(),
            default_value: decl.map(|d| d.default.to_string()).unwrap_or_default(),
            r#type: decl.map(|d| d.ty.as_str().to_string()).unwrap_or_default(),
            range: decl.map(|d| d.range()).unwrap_or_default(),
            description: decl
                .map(|d| d.description.to_string())
                .unwrap_or_else(|| "not a setting relay knows: ignored (relayctl settings unset NAME)".into()),
            per_account: decl.is_some_and(|d| d.per_account),
        };
        let mut out: Vec<pb::SettingInfo> = settings::SETTINGS
            .iter()
            .map(|d| info(d.name.to_string(), values.get(d.name), Some(d)))
            .collect();
        for (name, value) in &values {
            if settings::get(name).is_some() {
                continue;
            }
            let decl = match settings::target(name) {
                Ok(settings::Target::Account { setting, .. }) => Some(setting),
                _ => None,
            };
            out.push(info(name.clone(), Some(value), decl));
        }
        Ok(pb::ListSettingsResponse { values, settings: out })
    }

    async fn group_names(&self) -> Result<BTreeMap<String, String>, Status> {
        Ok(self
            .store
            .list_groups()
            .await
            .map_err(status_from_store)?
            .into_iter()
            .map(|g| (g.id, g.name))
            .collect())
    }

    async fn resolve_groups(&self, names: &[String]) -> Result<Vec<String>, Status> {
        let mut ids = Vec::new();
        let wanted: Vec<String> = if names.is_empty() {
            vec![DEFAULT_GROUP.to_string()]
        } else {
            names.to_vec()
        };
        for n in wanted {
            let g = self
                .store
                .get_group(&n)
                .await
                .map_err(status_from_store)?
                .ok_or_else(|| {
                    Status::not_found(format!(
                        "group {n:?} not found (create it with `relayctl group add {n}`)"
                    ))
                })?;
            if !ids.contains(&g.id) {
                ids.push(g.id);
            }
        }
        ids.sort();
        Ok(ids)
    }

    async fn account(&self, id_or_name: &str) -> Result<Account, Status> {
        if let Some(a) = self.store.get_account(id_or_name).await.map_err(status_from_store)? {
            return Ok(a);
        }
        let all = self.store.list_accounts().await.map_err(status_from_store)?;
        lookup(all, id_or_name, "account", |a| (&a.id, &a.name))
    }

    async fn api_key(&self, id_or_name: &str) -> Result<ApiKey, Status> {
        if let Some(k) = self.store.get_api_key(id_or_name).await.map_err(status_from_store)? {
            return Ok(k);
        }
        let all = self.store.list_api_keys().await.map_err(status_from_store)?;
        lookup(all, id_or_name, "key", |k| (&k.id, &k.name))
    }

    async fn states(&self) -> Result<Vec<AccountState>, Status> {
        self.store.list_account_states().await.map_err(status_from_store)
    }

    /// What an account listing shows beside the rows: group names, health
    /// states, and what connected data planes could not use.
    async fn account_view(&self) -> Result<AccountView, Status> {
        let mut config_errors: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let now = crate::model::now_ms();
        for p in self.store.list_proxies().await.map_err(status_from_store)? {
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
                .await
                .map_err(status_from_store)?
                .into_iter()
                .map(|q| (q.account_id.clone(), q))
                .collect(),
        })
    }

    fn account_info(a: &Account, view: &AccountView) -> pb::AccountInfo {
        let (groups, states) = (&view.groups, &view.states);
        let now = now_ms();
        pb::AccountInfo {
            quota: view.quotas.get(&a.id).map(super::quota::to_pb),
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

    fn key_info(k: &ApiKey, groups: &BTreeMap<String, String>) -> pb::ApiKeyInfo {
        pb::ApiKeyInfo {
            id: k.id.clone(),
            name: k.name.clone(),
            key_prefix: k.key_prefix.clone(),
            status: key_status_to_pb(k.status) as i32,
            expires_at_ms: k.expires_at.unwrap_or(0),
            group: groups.get(&k.group_id).cloned().unwrap_or_else(|| k.group_id.clone()),
            allowed_models: k.allowed_models.clone(),
            limits: Some(limits_to_pb(&k.limits)),
            created_at_ms: k.created_at,
            updated_at_ms: k.updated_at,
        }
    }

    /// A group with its limits, how many accounts and live keys it holds, its fallbacks (and
    /// whose fallback it is) by name, and its state. `groups`: every group (for the names).
    fn group_info(g: &Group, groups: &[Group], accounts: &[Account], keys: &[ApiKey]) -> pb::GroupInfo {
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        let name = |id: &String| {
            groups
                .iter()
                .find(|x| x.id == *id)
                .map_or_else(|| id.clone(), |x| x.name.clone())
        };
        pb::GroupInfo {
            fallbacks: g.fallback_ids.iter().map(name).collect(),
            fallback_of: groups
                .iter()
                .filter(|x| x.fallback_ids.contains(&g.id))
                .map(|x| x.name.clone())
                .collect(),
            state: crate::config::group_state_to_pb(g.state) as i32,
            state_since_ms: g.state_since,
            state_by: g.state_by.clone(),
            account_count: count(accounts.iter().filter(|a| a.group_ids.contains(&g.id)).count()),
            key_count: count(
                keys.iter()
                    .filter(|k| k.group_id == g.id && k.status != KeyStatus::Revoked)
                    .count(),
            ),
            id: g.id.clone(),
            name: g.name.clone(),
            description: g.description.clone(),
            limits: Some(limits_to_pb(&g.limits)),
        }
    }

    async fn group_info_now(&self, g: &Group) -> Result<pb::GroupInfo, Status> {
        let groups = self.store.list_groups().await.map_err(status_from_store)?;
        let accounts = self.store.list_accounts().await.map_err(status_from_store)?;
        let keys = self.store.list_api_keys().await.map_err(status_from_store)?;
        Ok(Self::group_info(g, &groups, &accounts, &keys))
    }

    /// A group's fallbacks as given (names or ids, in order), checked against every group and the
    /// fallbacks they name: each exists, none repeats, none is `g` itself, and no cycle forms
    /// (the store checks the same inside the write, so two writers cannot make one together).
    /// Returns the ids.
    async fn resolve_fallbacks(&self, g: &Group, wanted: &[String]) -> Result<Vec<String>, Status> {
        if wanted.is_empty() {
            return Ok(Vec::new());
        }
        let all = self.store.list_groups().await.map_err(status_from_store)?;
        let mut ids: Vec<String> = Vec::with_capacity(wanted.len());
        for w in wanted {
            let w = w.trim();
            if w.is_empty() {
                return Err(Status::invalid_argument("an empty group name among the fallbacks"));
            }
            let f = all
                .iter()
                .find(|x| x.id == w)
                .or_else(|| all.iter().find(|x| x.name == w))
                .ok_or_else(|| {
                    Status::not_found(format!(
                        "fallback group {w:?} not found (create it with `relayctl group add {w}`)"
                    ))
                })?;
            if f.id == g.id {
                return Err(Status::invalid_argument(format!(
                    "group {:?} cannot be its own fallback",
                    g.name
                )));
            }
            if ids.contains(&f.id) {
                return Err(Status::invalid_argument(format!(
                    "group {:?} is named twice among the fallbacks",
                    f.name
                )));
            }
            ids.push(f.id.clone());
        }
        let mut edges: std::collections::HashMap<String, Vec<String>> =
            all.iter().map(|x| (x.id.clone(), x.fallback_ids.clone())).collect();
        edges.insert(g.id.clone(), ids.clone());
        let mut names: std::collections::HashMap<String, String> =
            all.iter().map(|x| (x.id.clone(), x.name.clone())).collect();
        names.insert(g.id.clone(), g.name.clone());
        crate::store::check_fallbacks(&edges, &names, &g.id).map_err(status_from_store)?;
        Ok(ids)
    }

    /// The names of fallback ids, for audit details.
    async fn fallback_names(&self, ids: &[String]) -> Result<Vec<String>, Status> {
        let names = self.group_names().await?;
        Ok(ids
            .iter()
            .map(|id| names.get(id).cloned().unwrap_or_else(|| id.clone()))
            .collect())
    }

    async fn group(&self, id_or_name: &str) -> Result<Group, Status> {
        if let Some(g) = self.store.get_group(id_or_name).await.map_err(status_from_store)? {
            return Ok(g);
        }
        let all = self.store.list_groups().await.map_err(status_from_store)?;
        lookup(all, id_or_name, "group", |g| (&g.id, &g.name))
    }
}

/// The item named `given` by an id prefix (after the exact name and id found nothing), or
/// NOT_FOUND saying so, with the closest name when one is near ("did you mean").
fn lookup<T>(
    items: Vec<T>,
    given: &str,
    what: &str,
    id_and_name: impl Fn(&T) -> (&String, &String),
) -> Result<T, Status> {
    let names: Vec<String> = items.iter().map(|i| id_and_name(i).1.clone()).collect();
    by_id_prefix(items, given, what, id_and_name)?.ok_or_else(|| Status::not_found(not_found(what, given, &names)))
}

/// "account \"mokc\" not found; did you mean \"mock\"?": the closest name, when a typo away
/// (a case difference, or at most two edits for names of five or more characters).
fn not_found(what: &str, given: &str, names: &[String]) -> String {
    let g = given.to_lowercase();
    let near = names
        .iter()
        .map(|n| (strsim::damerau_levenshtein(&g, &n.to_lowercase()), n))
        .filter(|(d, n)| *d == 0 || (*d <= 2 && g.chars().count() >= 5 && n.chars().count() >= 5) || *d <= 1)
        .min_by_key(|(d, _)| *d);
    match near {
        Some((_, n)) => format!("{what} {given:?} not found; did you mean {n:?}?"),
        None => format!("{what} {given:?} not found"),
    }
}

/// Fewest characters of an id taken as that id (after the exact name and id found nothing).
const MIN_ID_PREFIX: usize = 4;

/// The one item whose id starts with `prefix`, as relayctl's tables show ids (like git's short
/// hashes). Only a name or an exact id is looked up before this, so a name always wins. `None`
/// when it is no id prefix or nothing matches; an error naming the candidates when several do.
fn by_id_prefix<T>(
    items: Vec<T>,
    prefix: &str,
    what: &str,
    id_and_name: impl Fn(&T) -> (&String, &String),
) -> Result<Option<T>, Status> {
    let p = prefix.to_ascii_lowercase();
    if p.len() < MIN_ID_PREFIX || !p.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
        return Ok(None);
    }
    let mut matches: Vec<T> = items
        .into_iter()
        .filter(|i| id_and_name(i).0.to_ascii_lowercase().starts_with(&p))
        .collect();
    match matches.len() {
        0 => Ok(None),
        1 => Ok(matches.pop()),
        n => {
            let names: Vec<&String> = matches.iter().map(|i| id_and_name(i).1).collect();
            Err(Status::invalid_argument(format!(
                "{prefix:?} is the start of the ids of {n} {what}s ({}): give more of the id, or the name",
                names.iter().map(|n| n.as_str()).collect::<Vec<_>>().join(", ")
            )))
        }
    }
}

/// Spend over the current periods, as the Admin API shows it.
fn budget_spend(p: &relay_proto::periods::Periods, s: Spent) -> pb::BudgetSpend {
    pb::BudgetSpend {
        day: p.day.clone(),
        month: p.month.clone(),
        day_pico_usd: s.day,
        month_pico_usd: s.month,
        day_resets_at_ms: p.day_end_ms,
        month_resets_at_ms: p.month_end_ms,
    }
}

fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Names: 1 to 64 characters of letters, digits, '.', '_', '-', '@'.
fn validate_name(what: &str, name: &str) -> Result<(), Status> {
    // A name that reads as an id prefix would shadow the item whose id starts so (names win).
    // (Shaped as relayctl shows ids: eight hex digits or more, then nothing but hex and '-'.)
    let id_like = name.len() >= 8
        && name.bytes().take(8).all(|b| b.is_ascii_hexdigit())
        && name.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
        && name.bytes().any(|b| b.is_ascii_digit());
    if id_like {
        return Err(Status::invalid_argument(format!(
            "invalid {what} name {name:?}: it reads as the start of an id (hex digits and '-'), which \
             relayctl takes as an id; add a letter beyond a-f"
        )));
    }
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'));
    if ok {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "invalid {what} name {name:?}: use 1 to 64 letters, digits, '.', '_', '-' or '@'"
        )))
    }
}

fn validate_url(what: &str, url: &str, schemes: &[&str]) -> Result<(), Status> {
    let parsed: Result<tonic::codegen::http::Uri, _> = url.parse();
    match parsed {
        Ok(u) if u.scheme_str().is_some_and(|s| schemes.contains(&s)) && u.host().is_some() => Ok(()),
        _ => Err(Status::invalid_argument(format!(
            "invalid {what} {:?}: expected an absolute URL with scheme {}",
            redact_url(url),
            schemes.join(" or ")
        ))),
    }
}

/// An outbound proxy URL, checked with the parser the data planes use.
fn validate_proxy_url(url: &str) -> Result<(), Status> {
    relay_proto::validate::parse_proxy_url(url).map(|_| ()).map_err(|e| {
        Status::invalid_argument(format!(
            "invalid proxy URL {:?}: {e}; expected http://[user:pass@]host:port, socks5://… or socks5h://…",
            redact_url(url)
        ))
    })
}

/// What a sealed proxy URL is bound to (AES-GCM associated data).
pub fn proxy_seal_context(account_id: &str) -> String {
    format!("{account_id}/proxy")
}

/// A URL with any `user:password@` part hidden.
/// The host (and port) of a URL, for comparing where a credential goes.
fn url_host(url: &str) -> String {
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

fn validate_weight(w: u32) -> Result<u32, Status> {
    match w {
        0 => Ok(1),
        w if w <= MAX_WEIGHT => Ok(w),
        w => Err(Status::invalid_argument(format!(
            "weight {w} is out of range 1..={MAX_WEIGHT}"
        ))),
    }
}

fn validate_credential(c: &str) -> Result<(), Status> {
    if c.trim().is_empty() {
        return Err(Status::invalid_argument("the credential is empty"));
    }
    if c.chars().any(|ch| ch.is_control()) {
        return Err(Status::invalid_argument(
            "the credential contains control characters (a stray newline?)",
        ));
    }
    Ok(())
}

fn account_kind(k: i32) -> Result<AccountKind, Status> {
    match pb::AccountKind::try_from(k) {
        Ok(pb::AccountKind::AnthropicApiKey) => Ok(AccountKind::AnthropicApiKey),
        Ok(pb::AccountKind::ClaudeOauth) => Ok(AccountKind::ClaudeOauth),
        Ok(pb::AccountKind::AnthropicCompatible) => Ok(AccountKind::AnthropicCompatible),
        _ => Err(Status::invalid_argument(
            "account kind is required: anthropic-api-key, claude-oauth or anthropic-compatible",
        )),
    }
}

/// A USD amount from micro-USD, for messages ("$12.50").
fn usd(micros: u64) -> String {
    format!("${}.{:02}", micros / 1_000_000, (micros % 1_000_000) / 10_000)
}

/// The limits of a key or a group (`whose`: "key" or "group"), checked: every value fits what
/// the limiter counts exactly. 0 means unlimited for each; an absent message is all zeros.
/// (A negative or non-numeric value cannot reach here: the fields are unsigned integers, and
/// relayctl refuses such input before it sends anything.)
fn validate_limits(whose: &str, l: Option<&pb::KeyLimits>) -> Result<KeyLimits, Status> {
    let limits = limits_from_pb(l);
    let mut wrong = Vec::new();
    if limits.tpm > MAX_TPM {
        wrong.push(format!(
            "tokens per minute (--tpm) {} is above the largest relay enforces, {MAX_TPM}",
            limits.tpm
        ));
    }
    for (what, v) in [
        ("daily budget (--daily-budget)", limits.daily_budget),
        ("monthly budget (--monthly-budget)", limits.monthly_budget),
    ] {
        if v > MAX_BUDGET_MICRO_USD {
            wrong.push(format!(
                "{what} {} is above the largest relay counts exactly, {}",
                usd(v),
                usd(MAX_BUDGET_MICRO_USD)
            ));
        }
    }
    if wrong.is_empty() {
        return Ok(limits);
    }
    Err(Status::invalid_argument(format!(
        "invalid {whose} limits: {} (0 means unlimited)",
        wrong.join("; ")
    )))
}

fn limits_from_pb(l: Option<&pb::KeyLimits>) -> KeyLimits {
    let l = l.cloned().unwrap_or_default();
    KeyLimits {
        rpm: u64::from(l.requests_per_minute),
        tpm: l.tokens_per_minute,
        max_concurrency: u64::from(l.max_concurrency),
        daily_budget: l.daily_budget_micro_usd,
        monthly_budget: l.monthly_budget_micro_usd,
    }
}

fn limits_json(l: &KeyLimits) -> serde_json::Value {
    json!({
        "rpm": l.rpm, "tpm": l.tpm, "concurrency": l.max_concurrency,
        "daily_budget_micro_usd": l.daily_budget, "monthly_budget_micro_usd": l.monthly_budget,
    })
}

/// A group's description: at most 500 characters, no control characters.
fn validate_description(d: &str) -> Result<(), Status> {
    if d.chars().count() > 500 || d.chars().any(char::is_control) {
        return Err(Status::invalid_argument(
            "invalid group description: at most 500 characters, without control characters",
        ));
    }
    Ok(())
}

fn validate_models(models: &[String]) -> Result<Vec<String>, Status> {
    let mut out = Vec::new();
    for m in models.iter().map(|m| m.trim()).filter(|m| !m.is_empty()) {
        let body = m.strip_suffix('*').unwrap_or(m);
        if body.contains('*') || m.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(Status::invalid_argument(format!(
                "invalid model {m:?}: an exact model id, or a prefix ending in '*'"
            )));
        }
        if !out.iter().any(|x: &String| x == m) {
            out.push(m.to_string());
        }
    }
    Ok(out)
}

fn validate_expiry(ms: i64) -> Result<Option<Millis>, Status> {
    match ms {
        0 => Ok(None),
        ms if ms < now_ms() => Err(Status::invalid_argument("the expiry is in the past")),
        ms => Ok(Some(ms)),
    }
}

/// Runs `f` until it does not hit a concurrent-modification conflict.
async fn retry_conflicts<T, F, Fut>(mut f: F) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Status>>,
{
    let mut attempt = 0;
    loop {
        match f().await {
            Err(s) if s.code() == tonic::Code::Aborted && attempt + 1 < CONFLICT_RETRIES => attempt += 1,
            r => return r,
        }
    }
}

fn role_from_pb(r: i32) -> Result<Role, Status> {
    match pb::AdminRole::try_from(r) {
        Ok(pb::AdminRole::Admin) => Ok(Role::Admin),
        Ok(pb::AdminRole::ReadOnly) => Ok(Role::ReadOnly),
        Ok(pb::AdminRole::DataPlane) => Ok(Role::DataPlane),
        _ => Err(Status::invalid_argument(
            "role is required: admin, read-only or data-plane",
        )),
    }
}

fn role_to_pb(r: Role) -> pb::AdminRole {
    match r {
        Role::Admin => pb::AdminRole::Admin,
        Role::ReadOnly => pb::AdminRole::ReadOnly,
        Role::DataPlane => pb::AdminRole::DataPlane,
    }
}

fn token_info(t: &AdminToken) -> pb::AdminTokenInfo {
    pb::AdminTokenInfo {
        id: t.id.clone(),
        name: t.name.clone(),
        role: role_to_pb(t.role) as i32,
        token_prefix: t.token_prefix.clone(),
        created_at_ms: t.created_at,
        source: String::new(),
    }
}

/// Where a token came from, as the audit entry of the change that stored it says: the bootstrap's
/// `source` (RELAY_ADMIN_TOKEN, generated at first start, standalone start), else who created it.
fn token_source(entry: &AuditEntry) -> String {
    let source = serde_json::from_str::<serde_json::Value>(&entry.detail)
        .ok()
        .and_then(|d| d.get("source").and_then(|s| s.as_str()).map(str::to_string));
    source.unwrap_or_else(|| format!("created by {}", entry.actor))
}

/// Creates an admin token row for `token` (not stored: only its hash).
pub fn admin_token_row(key: &MasterKey, name: &str, role: Role, token: &str) -> AdminToken {
    AdminToken {
        id: new_id(),
        name: name.to_string(),
        token_hash: key.hash_admin_token(token),
        token_prefix: crypto::display_prefix(token, crypto::ADMIN_TOKEN_PREFIX),
        role,
        created_at: now_ms(),
        revision: 0,
    }
}

/// The OAuth facts of a new account (scopes, subscription type, organization): only for claude-oauth
/// accounts, short, one line each.
fn validate_oauth_fields(
    kind: AccountKind,
    r: &pb::CreateAccountRequest,
) -> Result<(Vec<String>, String, String), Status> {
    let scopes: Vec<String> = r
        .scopes
        .iter()
        .flat_map(|s| s.split_whitespace())
        .map(str::to_string)
        .collect();
    let sub = r.subscription_type.trim().to_string();
    let org = r.organization.trim().to_string();
    if kind != AccountKind::ClaudeOauth && (!scopes.is_empty() || !sub.is_empty() || !org.is_empty()) {
        return Err(Status::invalid_argument(
            "scopes, subscription type and organization are for claude-oauth accounts only",
        ));
    }
    if scopes.len() > 32
        || scopes
            .iter()
            .any(|s| s.len() > 128 || !s.bytes().all(|b| b.is_ascii_graphic()))
    {
        return Err(Status::invalid_argument(
            "scopes: at most 32, each at most 128 visible ASCII characters",
        ));
    }
    for (what, v) in [("subscription type", &sub), ("organization", &org)] {
        if v.chars().count() > 200 || v.chars().any(char::is_control) {
            return Err(Status::invalid_argument(format!(
                "{what}: at most 200 characters, on one line"
            )));
        }
    }
    Ok((scopes, sub, org))
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn create_account(
        &self,
        req: Request<pb::CreateAccountRequest>,
    ) -> Result<Response<pb::AccountInfo>, Status> {
        let actor = self.authorize(&req, Need::Write, "create_account").await?;
        let r = req.into_inner();
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
            if self
                .store
                .get_account(&r.name)
                .await
                .map_err(status_from_store)?
                .is_some()
            {
                return Err(Status::already_exists(format!("account {:?} already exists", r.name)));
            }
            return Ok(Response::new(info));
        }
        let detail = json!({
            "id": id, "kind": kind.as_str(), "base_url": row.base_url, "priority": row.priority,
            "weight": row.weight, "groups": info.groups, "max_concurrency": row.max_concurrency,
            "proxy_url": info.proxy_url, "credential": "set",
            "refresh_token": if r.refresh_token.is_empty() { "none" } else { "set" },
            "scopes": row.scopes, "subscription_type": row.subscription_type, "organization": row.organization,
        });
        self.apply(
            &actor,
            "account.create",
            &r.name,
            detail,
            vec![Mutation::InsertAccount(row)],
        )
        .await
        .map_err(status_from_store)?;
        Ok(Response::new(info))
    }

    async fn update_account(
        &self,
        req: Request<pb::UpdateAccountRequest>,
    ) -> Result<Response<pb::AccountInfo>, Status> {
        let actor = self.authorize(&req, Need::Write, "update_account").await?;
        let r = req.into_inner();
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
            self.apply(&actor, action, &cur.name, serde_json::Value::Object(changed), muts)
                .await
                .map_err(status_from_store)?;
            Ok(a)
        })
        .await?;
        Ok(Response::new(Self::account_info(&row, &self.account_view().await?)))
    }

    async fn get_account(&self, req: Request<pb::GetAccountRequest>) -> Result<Response<pb::AccountInfo>, Status> {
        self.authorize(&req, Need::Read, "get_account").await?;
        let a = self.account(&req.get_ref().account).await?;
        Ok(Response::new(Self::account_info(&a, &self.account_view().await?)))
    }

    async fn list_accounts(
        &self,
        req: Request<pb::ListAccountsRequest>,
    ) -> Result<Response<pb::ListAccountsResponse>, Status> {
        self.authorize(&req, Need::Read, "list_accounts").await?;
        let accounts = self.store.list_accounts().await.map_err(status_from_store)?;
        let view = self.account_view().await?;
        Ok(Response::new(pb::ListAccountsResponse {
            accounts: accounts.iter().map(|a| Self::account_info(a, &view)).collect(),
        }))
    }

    async fn delete_account(
        &self,
        req: Request<pb::DeleteAccountRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let actor = self.authorize(&req, Need::Write, "delete_account").await?;
        let a = self.account(&req.get_ref().account).await?;
        let v = self
            .apply(
                &actor,
                "account.delete",
                &a.name,
                json!({"id": a.id}),
                vec![Mutation::DeleteAccount { id: a.id.clone() }],
            )
            .await
            .map_err(status_from_store)?;
        Ok(Response::new(pb::DeleteResponse {
            version: Some(version_pb(v)),
        }))
    }

    /// Clears every health state of the account, on the control plane and on
    /// every data plane (its `reset_generation` moves: each data plane drops
    /// its local view of the account, circuit breaker included).
    async fn reset_account(&self, req: Request<pb::ResetAccountRequest>) -> Result<Response<pb::AccountInfo>, Status> {
        let actor = self.authorize(&req, Need::Write, "reset_account").await?;
        let name = req.get_ref().account.clone();
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
                &actor,
                "account.reset",
                &cur.name,
                json!({"cleared": cleared, "reset_generation": a.reset_generation}),
                muts,
            )
            .await
            .map_err(status_from_store)?;
            Ok(a)
        })
        .await?;
        Ok(Response::new(Self::account_info(&row, &self.account_view().await?)))
    }

    async fn create_api_key(
        &self,
        req: Request<pb::CreateApiKeyRequest>,
    ) -> Result<Response<pb::CreateApiKeyResponse>, Status> {
        let actor = self.authorize(&req, Need::Write, "create_api_key").await?;
        let r = req.into_inner();
        validate_name("key", &r.name)?;
        let group = if r.group.is_empty() {
            DEFAULT_GROUP
        } else {
            r.group.as_str()
        };
        let group_id = self.resolve_groups(&[group.to_string()]).await?.remove(0);
        let allowed_models = validate_models(&r.allowed_models)?;
        let expires_at = validate_expiry(r.expires_at_ms)?;
        let limits = validate_limits("key", r.limits.as_ref())?;
        let secret = crypto::generate_secret(crypto::API_KEY_PREFIX);
        let now = now_ms();
        let row = ApiKey {
            id: new_id(),
            name: r.name.clone(),
            key_hash: self.key.hash_api_key(&secret),
            key_prefix: crypto::display_prefix(&secret, crypto::API_KEY_PREFIX),
            status: KeyStatus::Active,
            expires_at,
            group_id,
            allowed_models,
            limits,
            created_at: now,
            updated_at: now,
            revision: 0,
        };
        let detail = json!({
            "id": row.id, "group": group, "models": row.allowed_models, "expires_at_ms": row.expires_at,
            "limits": limits_json(&row.limits),
        });
        self.apply(
            &actor,
            "key.create",
            &r.name,
            detail,
            vec![Mutation::InsertApiKey(row.clone())],
        )
        .await
        .map_err(status_from_store)?;
        let groups = self.group_names().await?;
        Ok(Response::new(pb::CreateApiKeyResponse {
            info: Some(Self::key_info(&row, &groups)),
            key: secret,
        }))
    }

    async fn update_api_key(&self, req: Request<pb::UpdateApiKeyRequest>) -> Result<Response<pb::ApiKeyInfo>, Status> {
        let actor = self.authorize(&req, Need::Write, "update_api_key").await?;
        let r = req.into_inner();
        if let Some(n) = &r.name {
            validate_name("key", n)?;
        }
        let limits = r.limits.as_ref().map(|l| validate_limits("key", Some(l))).transpose()?;
        let group_id = match &r.group {
            Some(g) => Some(self.resolve_groups(std::slice::from_ref(g)).await?.remove(0)),
            None => None,
        };
        let models = if r.set_allowed_models {
            Some(validate_models(&r.allowed_models)?)
        } else {
            None
        };
        let expires = r.expires_at_ms.map(validate_expiry).transpose()?;
        let status = match r.status.map(pb::KeyStatus::try_from) {
            None => None,
            Some(Ok(pb::KeyStatus::Active)) => Some(KeyStatus::Active),
            Some(Ok(pb::KeyStatus::Disabled)) => Some(KeyStatus::Disabled),
            Some(_) => {
                return Err(Status::invalid_argument(
                    "status must be active or disabled (revoke with `key revoke`)",
                ))
            }
        };
        let row = retry_conflicts(|| async {
            let cur = self.api_key(&r.key).await?;
            if cur.status == KeyStatus::Revoked {
                return Err(Status::failed_precondition(format!(
                    "key {:?} is revoked; create a new one",
                    cur.name
                )));
            }
            let mut k = cur.clone();
            let mut changed = serde_json::Map::new();
            if let Some(n) = &r.name {
                k.name = n.clone();
                changed.insert("name".into(), json!(n));
            }
            if let Some(g) = &group_id {
                k.group_id = g.clone();
                changed.insert("group_id".into(), json!(g));
            }
            if let Some(m) = &models {
                k.allowed_models = m.clone();
                changed.insert("models".into(), json!(m));
            }
            if let Some(e) = expires {
                k.expires_at = e;
                changed.insert("expires_at_ms".into(), json!(e));
            }
            if let Some(l) = limits {
                k.limits = l;
                changed.insert("limits".into(), limits_json(&k.limits));
            }
            if let Some(s) = status {
                k.status = s;
                changed.insert("status".into(), json!(s.as_str()));
            }
            if k == cur {
                return Ok(k);
            }
            k.updated_at = now_ms();
            self.write_key(&actor, "key.update", &cur, k, serde_json::Value::Object(changed))
                .await
        })
        .await?;
        let groups = self.group_names().await?;
        Ok(Response::new(Self::key_info(&row, &groups)))
    }

    async fn list_api_keys(
        &self,
        req: Request<pb::ListApiKeysRequest>,
    ) -> Result<Response<pb::ListApiKeysResponse>, Status> {
        self.authorize(&req, Need::Read, "list_api_keys").await?;
        let groups = self.group_names().await?;
        let keys = self.store.list_api_keys().await.map_err(status_from_store)?;
        Ok(Response::new(pb::ListApiKeysResponse {
            keys: keys.iter().map(|k| Self::key_info(k, &groups)).collect(),
        }))
    }

    async fn revoke_api_key(&self, req: Request<pb::RevokeApiKeyRequest>) -> Result<Response<pb::ApiKeyInfo>, Status> {
        let actor = self.authorize(&req, Need::Write, "revoke_api_key").await?;
        let name = req.get_ref().key.clone();
        let row = retry_conflicts(|| async {
            let cur = self.api_key(&name).await?;
            if cur.status == KeyStatus::Revoked {
                return Ok(cur);
            }
            let mut k = cur.clone();
            k.status = KeyStatus::Revoked;
            k.updated_at = now_ms();
            self.write_key(&actor, "key.revoke", &cur, k, json!({"id": cur.id}))
                .await
        })
        .await?;
        let groups = self.group_names().await?;
        Ok(Response::new(Self::key_info(&row, &groups)))
    }

    /// The key, its group's limits, and what each has spent of its budgets: the same sums
    /// `UsageIngest.Spend` gives data planes. Live use (requests this minute, in flight) is the
    /// fleet limiter's and is left unset here.
    async fn get_api_key(&self, req: Request<pb::GetApiKeyRequest>) -> Result<Response<pb::GetApiKeyResponse>, Status> {
        self.authorize(&req, Need::Read, "get_api_key").await?;
        let k = self.api_key(&req.get_ref().key).await?;
        let group = self.group(&k.group_id).await?;
        let settings = self.store.settings().await.map_err(status_from_store)?;
        let p = current_periods(&settings, now_ms());
        let totals = self.spend.totals(&p).await.map_err(status_from_store)?;
        let keys = self.store.list_api_keys().await.map_err(status_from_store)?;
        let groups = self.group_names().await?;
        let (live, group_live) = self.live_use(&k, &group, &p).await;
        Ok(Response::new(pb::GetApiKeyResponse {
            info: Some(Self::key_info(&k, &groups)),
            spend: Some(budget_spend(&p, totals.of_key(&k.id))),
            group_limits: Some(limits_to_pb(&group.limits)),
            group_spend: Some(budget_spend(&p, totals.of_group(&group.id, &keys))),
            live,
            group_live,
        }))
    }

    async fn create_group(&self, req: Request<pb::CreateGroupRequest>) -> Result<Response<pb::GroupInfo>, Status> {
        let actor = self.authorize(&req, Need::Write, "create_group").await?;
        let r = req.into_inner();
        validate_name("group", &r.name)?;
        validate_description(&r.description)?;
        let limits = validate_limits("group", r.limits.as_ref())?;
        let mut g = Group::new(&new_id(), &r.name, &r.description, limits, now_ms());
        g.fallback_ids = self.resolve_fallbacks(&g, &r.fallbacks).await?;
        let fallbacks = self.fallback_names(&g.fallback_ids).await?;
        self.apply(
            &actor,
            "group.create",
            &g.name,
            json!({"id": g.id, "description": g.description, "limits": limits_json(&g.limits),
                   "fallbacks": fallbacks}),
            vec![Mutation::InsertGroup(g.clone())],
        )
        .await
        .map_err(status_from_store)?;
        Ok(Response::new(self.group_info_now(&g).await?))
    }

    async fn update_group(&self, req: Request<pb::UpdateGroupRequest>) -> Result<Response<pb::GroupInfo>, Status> {
        let actor = self.authorize(&req, Need::Write, "update_group").await?;
        let r = req.into_inner();
        if let Some(n) = &r.name {
            validate_name("group", n)?;
        }
        if let Some(d) = &r.description {
            validate_description(d)?;
        }
        let limits = r
            .limits
            .as_ref()
            .map(|l| validate_limits("group", Some(l)))
            .transpose()?;
        let row = retry_conflicts(|| async {
            let cur = self.group(&r.group).await?;
            let mut g = cur.clone();
            let mut changed = serde_json::Map::new();
            if let Some(n) = r.name.as_ref().filter(|n| **n != cur.name) {
                if cur.id == DEFAULT_GROUP || cur.name == DEFAULT_GROUP {
                    return Err(Status::failed_precondition(
                        "the default group cannot be renamed (accounts and keys created without --group go to it)",
                    ));
                }
                g.name = n.clone();
                changed.insert("name".into(), json!(n));
            }
            if let Some(d) = &r.description {
                g.description = d.clone();
                changed.insert("description".into(), json!(d));
            }
            if let Some(l) = limits {
                g.limits = l;
                changed.insert("limits".into(), limits_json(&g.limits));
            }
            if r.set_fallbacks {
                g.fallback_ids = self.resolve_fallbacks(&cur, &r.fallbacks).await?;
                if g.fallback_ids != cur.fallback_ids {
                    changed.insert("fallbacks".into(), json!(self.fallback_names(&g.fallback_ids).await?));
                }
            }
            if g == cur {
                return Ok(g);
            }
            g.updated_at = now_ms();
            changed.insert("id".into(), json!(g.id));
            self.apply(
                &actor,
                "group.update",
                &cur.name,
                serde_json::Value::Object(changed),
                vec![Mutation::UpdateGroup {
                    row: g.clone(),
                    expect_revision: cur.revision,
                }],
            )
            .await
            .map_err(status_from_store)?;
            Ok(g)
        })
        .await?;
        Ok(Response::new(self.group_info_now(&row).await?))
    }

    async fn list_groups(
        &self,
        req: Request<pb::ListGroupsRequest>,
    ) -> Result<Response<pb::ListGroupsResponse>, Status> {
        self.authorize(&req, Need::Read, "list_groups").await?;
        let groups = self.store.list_groups().await.map_err(status_from_store)?;
        let accounts = self.store.list_accounts().await.map_err(status_from_store)?;
        let keys = self.store.list_api_keys().await.map_err(status_from_store)?;
        Ok(Response::new(pb::ListGroupsResponse {
            groups: groups
                .iter()
                .map(|g| Self::group_info(g, &groups, &accounts, &keys))
                .collect(),
        }))
    }

    /// `relayctl group pause|resume|activate`: the state, when and by whom, in one audited write
    /// that every data plane gets with the config. Setting the state a group already has changes
    /// nothing (and keeps its since-time).
    async fn set_group_state(&self, req: Request<pb::SetGroupStateRequest>) -> Result<Response<pb::GroupInfo>, Status> {
        let actor = self.authorize(&req, Need::Write, "set_group_state").await?;
        let r = req.into_inner();
        let state = match pb::GroupState::try_from(r.state) {
            Ok(pb::GroupState::Active) => GroupState::Active,
            Ok(pb::GroupState::Paused) => GroupState::Paused,
            Ok(pb::GroupState::Activated) => GroupState::Activated,
            Err(_) => return Err(Status::invalid_argument(format!("unknown group state {}", r.state))),
        };
        let action = match state {
            GroupState::Active => "group.resume",
            GroupState::Paused => "group.pause",
            GroupState::Activated => "group.activate",
        };
        let row = retry_conflicts(|| async {
            let cur = self.group(&r.group).await?;
            if cur.state == state {
                return Ok(cur);
            }
            let now = now_ms();
            let g = Group {
                state,
                state_since: now,
                state_by: actor.name.clone(),
                updated_at: now,
                ..cur.clone()
            };
            self.apply(
                &actor,
                action,
                &cur.name,
                json!({"id": g.id, "from": cur.state.as_str(), "to": state.as_str()}),
                vec![Mutation::UpdateGroup {
                    row: g.clone(),
                    expect_revision: cur.revision,
                }],
            )
            .await
            .map_err(status_from_store)?;
            Ok(g)
        })
        .await?;
        Ok(Response::new(self.group_info_now(&row).await?))
    }

    /// A group can go when no account and no live key uses it and no group names it as a
    /// fallback (refused, naming those groups: the operator decides where their keys go
    /// instead). Its own fallback list goes with it. Revoked keys never authenticate again:
    /// they move to the default group in the same write (their usage history stays).
    async fn delete_group(&self, req: Request<pb::DeleteGroupRequest>) -> Result<Response<pb::DeleteResponse>, Status> {
        let actor = self.authorize(&req, Need::Write, "delete_group").await?;
        let name = req.get_ref().group.clone();
        let v = retry_conflicts(|| async {
            let g = self.group(&name).await?;
            if g.name == DEFAULT_GROUP {
                return Err(Status::failed_precondition("the default group cannot be removed"));
            }
            let fallback_of: Vec<String> = self
                .store
                .list_groups()
                .await
                .map_err(status_from_store)?
                .into_iter()
                .filter(|x| x.fallback_ids.contains(&g.id))
                .map(|x| x.name)
                .collect();
            if !fallback_of.is_empty() {
                return Err(Status::failed_precondition(format!(
                    "group {:?} is a fallback of {}; remove it from their fallbacks first \
                     (`relayctl group update {} --fallback …`)",
                    g.name,
                    fallback_of.join(", "),
                    fallback_of[0]
                )));
            }
            let default = self.resolve_groups(&[DEFAULT_GROUP.to_string()]).await?.remove(0);
            let keys = self.store.list_api_keys().await.map_err(status_from_store)?;
            let accounts = self.store.list_accounts().await.map_err(status_from_store)?;
            let live: Vec<&str> = keys
                .iter()
                .filter(|k| k.group_id == g.id && k.status != KeyStatus::Revoked)
                .map(|k| k.name.as_str())
                .collect();
            let members: Vec<&str> = accounts
                .iter()
                .filter(|a| a.group_ids.contains(&g.id))
                .map(|a| a.name.as_str())
                .collect();
            if !live.is_empty() || !members.is_empty() {
                let mut users = Vec::new();
                if !members.is_empty() {
                    users.push(format!("accounts {}", members.join(", ")));
                }
                if !live.is_empty() {
                    users.push(format!("keys {}", live.join(", ")));
                }
                return Err(Status::failed_precondition(format!(
                    "group {:?} is still used by {}; move them to another group (or revoke the keys) first",
                    g.name,
                    users.join(" and ")
                )));
            }
            let mut muts: Vec<Mutation> = keys
                .iter()
                .filter(|k| k.group_id == g.id)
                .map(|k| Mutation::UpdateApiKey {
                    row: ApiKey {
                        group_id: default.clone(),
                        updated_at: now_ms(),
                        ..k.clone()
                    },
                    expect_revision: k.revision,
                })
                .collect();
            let moved = muts.len();
            muts.push(Mutation::DeleteGroup { id: g.id.clone() });
            self.apply(
                &actor,
                "group.delete",
                &g.name,
                json!({"id": g.id, "revoked_keys_moved": moved}),
                muts,
            )
            .await
            .map_err(|e| match e {
                StoreError::InUse(_) => Status::aborted(format!("group {:?} changed meanwhile; retry", g.name)),
                e => status_from_store(e),
            })
        })
        .await?;
        Ok(Response::new(pb::DeleteResponse {
            version: Some(version_pb(v)),
        }))
    }

    async fn list_prices(
        &self,
        req: Request<pb::ListPricesRequest>,
    ) -> Result<Response<pb::ListPricesResponse>, Status> {
        self.authorize(&req, Need::Read, "list_prices").await?;
        let prices = self.store.list_prices().await.map_err(status_from_store)?;
        Ok(Response::new(pb::ListPricesResponse {
            prices: prices.iter().map(price_to_pb).collect(),
        }))
    }

    async fn set_price(&self, req: Request<pb::SetPriceRequest>) -> Result<Response<pb::Price>, Status> {
        let actor = self.authorize(&req, Need::Write, "set_price").await?;
        let r = req.into_inner();
        let pattern = r.model_pattern.trim().to_string();
        validate_models(std::slice::from_ref(&pattern))?;
        if pattern.is_empty() {
            return Err(Status::invalid_argument(
                "a model id or prefix ending in '*' is required",
            ));
        }
        let effective_from = if r.effective_from_ms == 0 {
            now_ms()
        } else {
            r.effective_from_ms
        };
        let existing = self.store.list_prices().await.map_err(status_from_store)?;
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
            &actor,
            "price.set",
            &pattern,
            detail,
            vec![Mutation::UpsertPrice(p.clone())],
        )
        .await
        .map_err(status_from_store)?;
        Ok(Response::new(price_to_pb(&p)))
    }

    /// Removes an operator's prices of one pattern: every effective date, or
    /// the one given. Built-in prices stay (an operator price overrides them).
    /// Usage already stored keeps its cost (computed when it was recorded).
    async fn delete_price(
        &self,
        req: Request<pb::DeletePriceRequest>,
    ) -> Result<Response<pb::DeletePriceResponse>, Status> {
        let actor = self.authorize(&req, Need::Write, "delete_price").await?;
        let r = req.into_inner();
        let pattern = r.model_pattern.trim().to_string();
        if pattern.is_empty() {
            return Err(Status::invalid_argument(
                "a model pattern is required (as `relayctl pricing list` shows it)",
            ));
        }
        let existing = self.store.list_prices().await.map_err(status_from_store)?;
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
            .apply(&actor, "price.delete", &pattern, detail, muts)
            .await
            .map_err(|e| match e {
                StoreError::NotFound { .. } => {
                    Status::aborted(format!("the prices of {pattern:?} changed meanwhile; retry"))
                }
                e => status_from_store(e),
            })?;
        Ok(Response::new(pb::DeletePriceResponse {
            version: Some(version_pb(v)),
            removed: removed.iter().map(price_to_pb).collect(),
        }))
    }

    async fn list_settings(
        &self,
        req: Request<pb::ListSettingsRequest>,
    ) -> Result<Response<pb::ListSettingsResponse>, Status> {
        self.authorize(&req, Need::Read, "list_settings").await?;
        Ok(Response::new(self.settings_response().await?))
    }

    /// Refused unless `relay_proto::settings` declares the name and the value
    /// fits it (the same declaration the data planes read with).
    async fn set_setting(
        &self,
        req: Request<pb::SetSettingRequest>,
    ) -> Result<Response<pb::ListSettingsResponse>, Status> {
        let actor = self.authorize(&req, Need::Write, "set_setting").await?;
        let r = req.into_inner();
        let target = settings::check(&r.name, &r.value).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let name = self.setting_key(&target).await?;
        let stored = self.store.settings().await.map_err(status_from_store)?;
        if !stored.contains_key(&name) && stored.len() >= MAX_STORED_SETTINGS {
            return Err(Status::resource_exhausted(format!(
                "{MAX_STORED_SETTINGS} settings are stored already; unset some first"
            )));
        }
        let mut value = r.value.trim().to_string();
        // Secrets are audited masked and stored sealed with the master key.
        let audited = if settings::is_secret(&name) {
            let shown = settings::mask(&value);
            value =
                crate::notify::seal_setting(&self.key, &name, &value).map_err(|e| Status::internal(e.to_string()))?;
            shown
        } else {
            value.clone()
        };
        self.apply(
            &actor,
            "setting.set",
            &name,
            json!({"value": audited}),
            vec![Mutation::SetSetting {
                name: name.clone(),
                value,
            }],
        )
        .await
        .map_err(status_from_store)?;
        Ok(Response::new(self.settings_response().await?))
    }

    async fn unset_setting(
        &self,
        req: Request<pb::UnsetSettingRequest>,
    ) -> Result<Response<pb::ListSettingsResponse>, Status> {
        let actor = self.authorize(&req, Need::Write, "unset_setting").await?;
        let r = req.into_inner();
        let stored = self.store.settings().await.map_err(status_from_store)?;
        // A stored name relay does not know (an older typo) can always go.
        let name = if stored.contains_key(&r.name) {
            r.name.clone()
        } else {
            let target = settings::target(&r.name).map_err(|e| Status::invalid_argument(e.to_string()))?;
            self.setting_key(&target).await?
        };
        if !stored.contains_key(&name) {
            return Err(Status::not_found(format!(
                "{} is not set (its default applies)",
                r.name
            )));
        }
        self.apply(
            &actor,
            "setting.unset",
            &name,
            json!({}),
            vec![Mutation::UnsetSetting { name: name.clone() }],
        )
        .await
        .map_err(status_from_store)?;
        Ok(Response::new(self.settings_response().await?))
    }

    async fn list_proxies(
        &self,
        req: Request<pb::ListProxiesRequest>,
    ) -> Result<Response<pb::ListProxiesResponse>, Status> {
        self.authorize(&req, Need::Read, "list_proxies").await?;
        let head = self.store.head().await.map_err(status_from_store)?;
        let proxies = self.store.list_proxies().await.map_err(status_from_store)?;
        let now = crate::model::now_ms();
        Ok(Response::new(pb::ListProxiesResponse {
            proxies: proxies
                .into_iter()
                .map(|p| pb::ProxyState {
                    connected: p.live(now),
                    node_id: p.node_id,
                    build_version: p.build_version,
                    acked: p.acked.map(version_pb),
                    last_nack_version: p.nack_version.map(version_pb),
                    last_nack_error: p.nack_error,
                    last_nack_at_ms: p.nack_at,
                    last_seen_ms: p.last_seen,
                    replica: p.replica,
                    rejected: p
                        .rejected
                        .into_iter()
                        .map(|r| pb::RejectedResource {
                            r#ref: Some(pb::ResourceRef {
                                kind: r
                                    .kind
                                    .parse::<ResourceKind>()
                                    .map_or(0, |k| resource_kind_to_pb(k) as i32),
                                id: r.id,
                            }),
                            error: r.error,
                        })
                        .collect(),
                })
                .collect(),
            head: Some(version_pb(head)),
        }))
    }

    async fn list_audit(&self, req: Request<pb::ListAuditRequest>) -> Result<Response<pb::ListAuditResponse>, Status> {
        self.authorize(&req, Need::Read, "list_audit").await?;
        let r = req.get_ref();
        let limit = if r.limit == 0 { 100 } else { r.limit.min(10_000) };
        let since = (r.since_ms > 0).then_some(r.since_ms);
        let entries = self.store.list_audit(limit, since).await.map_err(status_from_store)?;
        Ok(Response::new(pb::ListAuditResponse {
            entries: entries
                .into_iter()
                .map(|e| pb::AuditEntry {
                    id: e.id,
                    at_ms: e.at,
                    actor: e.actor,
                    action: e.action,
                    target: e.target,
                    detail: e.detail,
                    revision: e.revision,
                })
                .collect(),
        }))
    }

    async fn query_usage(
        &self,
        req: Request<pb::QueryUsageRequest>,
    ) -> Result<Response<pb::QueryUsageResponse>, Status> {
        self.authorize(&req, Need::Read, "query_usage").await?;
        let r = req.get_ref();
        let group_by = match pb::UsageGroupBy::try_from(r.group_by) {
            Ok(pb::UsageGroupBy::Key) => UsageGroupBy::Key,
            Ok(pb::UsageGroupBy::Account) => UsageGroupBy::Account,
            Ok(pb::UsageGroupBy::Model) => UsageGroupBy::Model,
            _ => UsageGroupBy::None,
        };
        let bucket = match pb::UsageBucket::try_from(r.bucket) {
            Ok(pb::UsageBucket::Hour) => model::UsageBucket::Hour,
            Ok(pb::UsageBucket::Day) => model::UsageBucket::Day,
            _ => model::UsageBucket::None,
        };
        if r.since_ms > 0 && r.until_ms > 0 && r.until_ms <= r.since_ms {
            return Err(Status::invalid_argument("--until must be after --since"));
        }
        let rows = self
            .store
            .query_usage(UsageQuery {
                group_by,
                since: (r.since_ms > 0).then_some(r.since_ms),
                until: (r.until_ms > 0).then_some(r.until_ms),
                bucket,
            })
            .await
            .map_err(status_from_store)?;
        Ok(Response::new(pb::QueryUsageResponse {
            rows: rows
                .into_iter()
                .map(|u| pb::UsageRow {
                    bucket_start_ms: u.bucket_start,
                    group: u.group,
                    group_id: u.group_id,
                    requests: u.requests,
                    input_tokens: u.input_tokens,
                    output_tokens: u.output_tokens,
                    cache_write_5m_tokens: u.cache_write_5m_tokens,
                    cache_write_1h_tokens: u.cache_write_1h_tokens,
                    cache_read_tokens: u.cache_read_tokens,
                    cost_pico_usd: u.cost_pico_usd,
                    errors: u.errors,
                    anomalies: u.anomalies,
                })
                .collect(),
        }))
    }

    async fn list_requests(
        &self,
        req: Request<pb::ListRequestsRequest>,
    ) -> Result<Response<pb::ListRequestsResponse>, Status> {
        self.authorize(&req, Need::Read, "list_requests").await?;
        super::requests::list(&self.store, req.get_ref())
            .await
            .map(Response::new)
    }

    async fn get_request(&self, req: Request<pb::GetRequestRequest>) -> Result<Response<pb::RequestRecord>, Status> {
        self.authorize(&req, Need::Read, "get_request").await?;
        super::requests::get(&self.store, &req.get_ref().id)
            .await
            .map(Response::new)
    }

    async fn request_stats(
        &self,
        req: Request<pb::RequestStatsRequest>,
    ) -> Result<Response<pb::RequestStatsResponse>, Status> {
        self.authorize(&req, Need::Read, "request_stats").await?;
        super::requests::stats(&self.store, req.get_ref())
            .await
            .map(Response::new)
    }

    type TailRequestsStream = tokio_stream::wrappers::ReceiverStream<Result<pb::RequestRecord, Status>>;

    async fn tail_requests(
        &self,
        req: Request<pb::TailRequestsRequest>,
    ) -> Result<Response<Self::TailRequestsStream>, Status> {
        self.authorize(&req, Need::Read, "tail_requests").await?;
        let filter = super::requests::filter(&self.store, req.get_ref().filter.as_ref()).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let tail = super::requests::tail(self.store.clone(), filter, tx.clone());
        let closing = self.closing.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = tail => {}
                _ = async move {
                    match closing {
                        Some(mut c) => super::closed(&mut c).await,
                        None => std::future::pending().await,
                    }
                } => {
                    let _ = tx.send(Err(super::shutting_down())).await;
                }
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    async fn create_admin_token(
        &self,
        req: Request<pb::CreateAdminTokenRequest>,
    ) -> Result<Response<pb::CreateAdminTokenResponse>, Status> {
        let actor = self.authorize(&req, Need::Write, "create_admin_token").await?;
        let r = req.into_inner();
        validate_name("token", &r.name)?;
        let role = role_from_pb(r.role)?;
        let token = crypto::generate_secret(crypto::ADMIN_TOKEN_PREFIX);
        let row = admin_token_row(&self.key, &r.name, role, &token);
        self.apply(
            &actor,
            "token.create",
            &r.name,
            json!({"id": row.id, "role": role.as_str()}),
            vec![Mutation::InsertAdminToken(row.clone())],
        )
        .await
        .map_err(status_from_store)?;
        let mut info = token_info(&row);
        // As `token list` will say it.
        info.source = format!("created by {}", actor.name);
        Ok(Response::new(pb::CreateAdminTokenResponse {
            info: Some(info),
            token,
        }))
    }

    async fn list_admin_tokens(
        &self,
        req: Request<pb::ListAdminTokensRequest>,
    ) -> Result<Response<pb::ListAdminTokensResponse>, Status> {
        self.authorize(&req, Need::Read, "list_admin_tokens").await?;
        let tokens = self.store.list_admin_tokens().await.map_err(status_from_store)?;
        let revisions: Vec<u64> = tokens.iter().map(|t| t.revision).collect();
        let created = self
            .store
            .audit_at_revisions(&revisions)
            .await
            .map_err(status_from_store)?;
        Ok(Response::new(pb::ListAdminTokensResponse {
            tokens: tokens
                .iter()
                .map(|t| pb::AdminTokenInfo {
                    source: created
                        .iter()
                        .find(|e| {
                            e.revision == t.revision
                                && e.target == t.name
                                && (e.action == "token.create" || e.action == "token.rotate")
                        })
                        .map(token_source)
                        .unwrap_or_default(),
                    ..token_info(t)
                })
                .collect(),
        }))
    }

    async fn revoke_admin_token(
        &self,
        req: Request<pb::RevokeAdminTokenRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let actor = self.authorize(&req, Need::Write, "revoke_admin_token").await?;
        let name = &req.get_ref().token;
        let tokens = self.store.list_admin_tokens().await.map_err(status_from_store)?;
        let t = match tokens.iter().find(|t| &t.id == name || &t.name == name) {
            Some(t) => t,
            None => lookup(tokens.iter().collect(), name, "token", |t| (&t.id, &t.name))?,
        };
        if t.role == Role::Admin && tokens.iter().filter(|t| t.role == Role::Admin).count() == 1 {
            return Err(Status::failed_precondition(
                "this is the last admin token; create another before revoking it",
            ));
        }
        let v = self
            .apply(
                &actor,
                "token.revoke",
                &t.name,
                json!({"id": t.id, "role": t.role.as_str()}),
                vec![Mutation::DeleteAdminToken { id: t.id.clone() }],
            )
            .await
            .map_err(status_from_store)?;
        Ok(Response::new(pb::DeleteResponse {
            version: Some(version_pb(v)),
        }))
    }

    async fn get_config_version(
        &self,
        req: Request<pb::GetConfigVersionRequest>,
    ) -> Result<Response<pb::ConfigVersion>, Status> {
        self.authorize(&req, Need::Read, "get_config_version").await?;
        let v = self.store.head().await.map_err(status_from_store)?;
        Ok(Response::new(version_pb(v)))
    }

    async fn check_accounts(
        &self,
        req: Request<pb::CheckAccountsRequest>,
    ) -> Result<Response<pb::CheckAccountsResponse>, Status> {
        let actor = self.authorize(&req, Need::Write, "check_accounts").await?;
        let prober = self
            .prober
            .clone()
            .ok_or_else(|| Status::unimplemented("this control plane cannot probe accounts"))?;
        let r = req.into_inner();
        let accounts = if r.account.trim().is_empty() {
            self.store.list_accounts().await.map_err(status_from_store)?
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
        Ok(Response::new(pb::CheckAccountsResponse { checks }))
    }

    async fn list_notifications(
        &self,
        req: Request<pb::ListNotificationsRequest>,
    ) -> Result<Response<pb::ListNotificationsResponse>, Status> {
        self.authorize(&req, Need::Read, "list_notifications").await?;
        let limit = match req.get_ref().limit {
            0 => 50,
            n => n.min(1000),
        };
        let rows = self.store.notify_recent(limit).await.map_err(status_from_store)?;
        let notifications = rows
            .into_iter()
            .map(|e| {
                let doc: serde_json::Value = serde_json::from_str(&e.notification.payload).unwrap_or_default();
                let text = |k: &str| doc.get(k).and_then(|v| v.as_str()).unwrap_or("").to_string();
                pb::Notification {
                    id: text("id"),
                    r#type: e.notification.kind.clone(),
                    summary: text("summary"),
                    created_at_ms: e.notification.created_ms,
                    state: e.state,
                    attempts: e.notification.attempts,
                    next_attempt_at_ms: e.next_attempt_ms,
                    last_error: e.last_error,
                    done_at_ms: e.done_ms,
                }
            })
            .collect();
        Ok(Response::new(pb::ListNotificationsResponse { notifications }))
    }

    async fn test_notification(
        &self,
        req: Request<pb::TestNotificationRequest>,
    ) -> Result<Response<pb::TestNotificationResponse>, Status> {
        let actor = self.authorize(&req, Need::Write, "test_notification").await?;
        let values = self.store.settings().await.map_err(status_from_store)?;
        let hook = crate::notify::Webhook::from_settings(&values, &self.key).ok_or_else(|| {
            Status::failed_precondition(
                "no webhook is configured: relayctl settings set notify.webhook_url URL (see docs/operations.md, Notifications)",
            )
        })?;
        let upstreams = match &self.prober {
            Some(p) => p.upstreams.clone(),
            None => Arc::new(
                relay_net::client::Upstreams::new(&Default::default())
                    .map_err(|e| Status::internal(format!("cannot build the HTTP client: {e}")))?,
            ),
        };
        let doc = crate::notify::test_document(&actor.name, crate::model::now_ms());
        let (http_status, error) = match crate::notify::send(&upstreams, &hook, &doc).await {
            Ok(s) => (u32::from(s), String::new()),
            Err(e) => (0, e),
        };
        tracing::info!(actor = %actor.name, http_status, "test notification sent");
        Ok(Response::new(pb::TestNotificationResponse {
            http_status,
            error,
            webhook: settings::mask(&hook.url),
            format: if hook.slack { "slack" } else { "json" }.into(),
            signed: hook.secret.is_some(),
        }))
    }

    async fn get_status(&self, req: Request<pb::GetStatusRequest>) -> Result<Response<pb::GetStatusResponse>, Status> {
        self.authorize(&req, Need::Read, "get_status").await?;
        let leader = self.store.leader().await.map_err(status_from_store)?;
        Ok(Response::new(pb::GetStatusResponse {
            replica: self.replica.clone(),
            build_version: env!("CARGO_PKG_VERSION").to_string(),
            leader: leader.map(|l| pb::LeaderInfo {
                holder: l.holder,
                mechanism: l.mechanism,
                since_ms: l.since_ms,
                term: l.term,
                detail: l.detail,
            }),
            replica_is_leader: self.leadership.as_ref().is_some_and(|l| l.role().is_leading()),
            replica_mechanism: self
                .leadership
                .as_ref()
                .map(|l| l.mechanism().to_string())
                .unwrap_or_default(),
            current_leader: self.leadership.as_ref().map(|l| match l.role() {
                crate::leader::Role::Leading { .. } => self.replica.clone(),
                crate::leader::Role::Following { leader } => leader.unwrap_or_default(),
            }),
        }))
    }
}

fn resource_kind_to_pb(k: ResourceKind) -> pb::ResourceKind {
    match k {
        ResourceKind::ApiKey => pb::ResourceKind::ApiKey,
        ResourceKind::Account => pb::ResourceKind::Account,
        ResourceKind::Group => pb::ResourceKind::Group,
        ResourceKind::Price => pb::ResourceKind::Price,
        ResourceKind::Settings => pb::ResourceKind::Settings,
        ResourceKind::AccountState => pb::ResourceKind::AccountState,
        ResourceKind::AdminToken => pb::ResourceKind::Unspecified,
    }
}

/// The stored name of a resource kind a data plane reports.
pub fn resource_kind_from_pb(k: i32) -> &'static str {
    match pb::ResourceKind::try_from(k) {
        Ok(pb::ResourceKind::ApiKey) => ResourceKind::ApiKey.as_str(),
        Ok(pb::ResourceKind::Account) => ResourceKind::Account.as_str(),
        Ok(pb::ResourceKind::Group) => ResourceKind::Group.as_str(),
        Ok(pb::ResourceKind::Price) => ResourceKind::Price.as_str(),
        Ok(pb::ResourceKind::Settings) => ResourceKind::Settings.as_str(),
        Ok(pb::ResourceKind::AccountState) => ResourceKind::AccountState.as_str(),
        _ => "unknown",
    }
}

/// What `account_info` needs beside the account row.
struct AccountView {
    groups: BTreeMap<String, String>,
    states: Vec<AccountState>,
    config_errors: BTreeMap<String, Vec<String>>,
    quotas: BTreeMap<String, crate::model::AccountQuota>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_urls() {
        assert!(validate_name("x", "team-a_1").is_ok());
        assert!(validate_name("x", "").is_err());
        assert!(validate_name("x", "a b").is_err());
        assert!(validate_url("u", "https://api.anthropic.com", &["https"]).is_ok());
        assert!(validate_url("u", "api.anthropic.com", &["https"]).is_err());
        assert_eq!(redact_url("http://user:pw@proxy:3128"), "http://…@proxy:3128");
        // Issue 12 item 10: an unescaped '@' in the password leaked its tail.
        assert_eq!(redact_url("http://user:p@ss@proxy:3128"), "http://…@proxy:3128");
        assert_eq!(redact_url("socks5://u:a@b@c@h:1/"), "socks5://…@h:1/");
        assert_eq!(redact_url("http://proxy:3128/x@y"), "http://proxy:3128/x@y");
        assert!(validate_models(&["claude-*".into()]).is_ok());
        assert!(validate_models(&["cl*aude".into()]).is_err());
        assert_eq!(validate_weight(0).ok(), Some(1));
    }

    /// Ids are taken by a prefix, as relayctl's tables show them; several matches are refused
    /// with their names; too short or not hex is no prefix.
    #[test]
    #[allow(clippy::unwrap_used)]
    fn ids_are_taken_by_a_unique_prefix() {
        let items = || {
            vec![
                ("01a240bb-3e84-7348-8e4d-8fdee19ae7ed".to_string(), "mock".to_string()),
                ("01a240bb-3e95-7021-b19b-4e9f2e185be9".to_string(), "mock2".to_string()),
            ]
        };
        fn f(i: &(String, String)) -> (&String, &String) {
            (&i.0, &i.1)
        }
        let one = by_id_prefix(items(), "01a240bb-3e9", "account", f).unwrap();
        assert_eq!(one.map(|i| i.1), Some("mock2".to_string()));
        assert_eq!(
            by_id_prefix(items(), "01A240BB-3E84", "account", f)
                .unwrap()
                .map(|i| i.1),
            Some("mock".to_string())
        );
        let err = by_id_prefix(items(), "01a240bb", "account", f).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(
            err.message().contains("2 accounts (mock, mock2)") && err.message().contains("give more of the id"),
            "{}",
            err.message()
        );
        assert!(
            by_id_prefix(items(), "01a", "account", f).unwrap().is_none(),
            "too short"
        );
        assert!(
            by_id_prefix(items(), "mock", "account", f).unwrap().is_none(),
            "not hex"
        );
        assert!(by_id_prefix(items(), "ffff", "account", f).unwrap().is_none());
        assert!(validate_weight(MAX_WEIGHT + 1).is_err());
        // A name shaped like an id prefix would shadow an id: refused; words of hex letters not.
        assert!(validate_name("account", "01a2414c-9e06").is_err());
        assert!(validate_name("account", "01a2414c").is_err());
        for ok in ["cafe", "team-1", "acc-1", "1234", "deadbeef"] {
            assert!(validate_name("account", ok).is_ok(), "{ok}");
        }
        // A typo gets the closest name.
        let names: Vec<String> = ["mock", "team-alpha", "MOCK2"].iter().map(|s| s.to_string()).collect();
        assert!(not_found("account", "mokc", &names).ends_with("did you mean \"mock\"?"));
        assert!(not_found("account", "team-alhpa", &names).ends_with("did you mean \"team-alpha\"?"));
        assert!(not_found("account", "mock2", &names).ends_with("did you mean \"MOCK2\"?"));
        assert_eq!(not_found("account", "zzz", &names), "account \"zzz\" not found");
    }
}
