//! Settings: every declared setting with its value in force, set (checked against the declaration
//! the data planes read with; secrets sealed and shown masked), unset.

use super::AdminApi;
use crate::api::auth::Actor;
use crate::model::*;
use relay_proto::settings;
use relay_proto::v1 as pb;
use serde_json::json;
use tonic::Status;

/// Stored settings at most (the declared ones plus account overrides).
const MAX_STORED_SETTINGS: usize = 2_000;

impl AdminApi {
    /// The stored name of a setting: account overrides by account id.
    pub(super) async fn setting_key(&self, target: &settings::Target) -> Result<String, Status> {
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
    pub(super) async fn settings_response(&self) -> Result<pb::ListSettingsResponse, Status> {
        let mut values = self.store.settings().await?;
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

    pub(super) async fn list_settings(
        &self,
        _actor: &Actor,
        _r: pb::ListSettingsRequest,
    ) -> Result<pb::ListSettingsResponse, Status> {
        self.settings_response().await
    }

    /// Refused unless `relay_proto::settings` declares the name and the value
    /// fits it (the same declaration the data planes read with).
    pub(super) async fn set_setting(
        &self,
        actor: &Actor,
        r: pb::SetSettingRequest,
    ) -> Result<pb::ListSettingsResponse, Status> {
        let target = settings::check(&r.name, &r.value).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let name = self.setting_key(&target).await?;
        let stored = self.store.settings().await?;
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
            actor,
            "setting.set",
            &name,
            json!({"value": audited}),
            vec![Mutation::SetSetting {
                name: name.clone(),
                value,
            }],
        )
        .await?;
        self.settings_response().await
    }

    pub(super) async fn unset_setting(
        &self,
        actor: &Actor,
        r: pb::UnsetSettingRequest,
    ) -> Result<pb::ListSettingsResponse, Status> {
        let stored = self.store.settings().await?;
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
            actor,
            "setting.unset",
            &name,
            json!({}),
            vec![Mutation::UnsetSetting { name: name.clone() }],
        )
        .await?;
        self.settings_response().await
    }
}
