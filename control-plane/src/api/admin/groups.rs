//! Groups: create, update (limits, fallbacks checked for cycles), list, pause/resume/activate,
//! delete (refused while in use); group names and lookups the other resources share.

use super::lookup::lookup;
use super::validate::{limits_json, validate_description, validate_limits, validate_name};
use super::{new_id, retry_conflicts, AdminApi, DEFAULT_GROUP};
use crate::api::auth::Actor;
use crate::api::convert::{group_state_to_pb, limits_to_pb, version_pb};
use crate::model::*;
use crate::store::StoreError;
use relay_proto::v1 as pb;
use serde_json::json;
use std::collections::BTreeMap;
use tonic::Status;

impl AdminApi {
    pub(super) async fn group_names(&self) -> Result<BTreeMap<String, String>, Status> {
        Ok(self
            .store
            .list_groups()
            .await?
            .into_iter()
            .map(|g| (g.id, g.name))
            .collect())
    }

    pub(super) async fn resolve_groups(&self, names: &[String]) -> Result<Vec<String>, Status> {
        let mut ids = Vec::new();
        let wanted: Vec<String> = if names.is_empty() {
            vec![DEFAULT_GROUP.to_string()]
        } else {
            names.to_vec()
        };
        for n in wanted {
            let g = self.store.get_group(&n).await?.ok_or_else(|| {
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

    /// A group with its limits, how many accounts and live keys it holds, its fallbacks (and
    /// whose fallback it is) by name, and its state. `groups`: every group (for the names).
    pub(super) fn group_info(g: &Group, groups: &[Group], accounts: &[Account], keys: &[ApiKey]) -> pb::GroupInfo {
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
            state: group_state_to_pb(g.state) as i32,
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

    pub(super) async fn group_info_now(&self, g: &Group) -> Result<pb::GroupInfo, Status> {
        let groups = self.store.list_groups().await?;
        let accounts = self.store.list_accounts().await?;
        let keys = self.store.list_api_keys().await?;
        Ok(Self::group_info(g, &groups, &accounts, &keys))
    }

    /// A group's fallbacks as given (names or ids, in order), checked against every group and the
    /// fallbacks they name: each exists, none repeats, none is `g` itself, and no cycle forms
    /// (the store checks the same inside the write, so two writers cannot make one together).
    /// Returns the ids.
    pub(super) async fn resolve_fallbacks(&self, g: &Group, wanted: &[String]) -> Result<Vec<String>, Status> {
        if wanted.is_empty() {
            return Ok(Vec::new());
        }
        let all = self.store.list_groups().await?;
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
        crate::store::check_fallbacks(&edges, &names, &g.id)?;
        Ok(ids)
    }

    /// The names of fallback ids, for audit details.
    pub(super) async fn fallback_names(&self, ids: &[String]) -> Result<Vec<String>, Status> {
        let names = self.group_names().await?;
        Ok(ids
            .iter()
            .map(|id| names.get(id).cloned().unwrap_or_else(|| id.clone()))
            .collect())
    }

    pub(super) async fn group(&self, id_or_name: &str) -> Result<Group, Status> {
        if let Some(g) = self.store.get_group(id_or_name).await? {
            return Ok(g);
        }
        let all = self.store.list_groups().await?;
        lookup(all, id_or_name, "group", |g| (&g.id, &g.name))
    }

    pub(super) async fn create_group(&self, actor: &Actor, r: pb::CreateGroupRequest) -> Result<pb::GroupInfo, Status> {
        validate_name("group", &r.name)?;
        validate_description(&r.description)?;
        let limits = validate_limits("group", r.limits.as_ref())?;
        let mut g = Group::new(&new_id(), &r.name, &r.description, limits, now_ms());
        g.fallback_ids = self.resolve_fallbacks(&g, &r.fallbacks).await?;
        let fallbacks = self.fallback_names(&g.fallback_ids).await?;
        self.apply(
            actor,
            "group.create",
            &g.name,
            json!({"id": g.id, "description": g.description, "limits": limits_json(&g.limits),
                   "fallbacks": fallbacks}),
            vec![Mutation::InsertGroup(g.clone())],
        )
        .await?;
        self.group_info_now(&g).await
    }

    pub(super) async fn update_group(&self, actor: &Actor, r: pb::UpdateGroupRequest) -> Result<pb::GroupInfo, Status> {
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
                actor,
                "group.update",
                &cur.name,
                serde_json::Value::Object(changed),
                vec![Mutation::UpdateGroup {
                    row: g.clone(),
                    expect_revision: cur.revision,
                }],
            )
            .await?;
            Ok(g)
        })
        .await?;
        self.group_info_now(&row).await
    }

    pub(super) async fn list_groups(
        &self,
        _actor: &Actor,
        _r: pb::ListGroupsRequest,
    ) -> Result<pb::ListGroupsResponse, Status> {
        let groups = self.store.list_groups().await?;
        let accounts = self.store.list_accounts().await?;
        let keys = self.store.list_api_keys().await?;
        Ok(pb::ListGroupsResponse {
            groups: groups
                .iter()
                .map(|g| Self::group_info(g, &groups, &accounts, &keys))
                .collect(),
        })
    }

    /// `relayctl group pause|resume|activate`: the state, when and by whom, in one audited write
    /// that every data plane gets with the config. Setting the state a group already has changes
    /// nothing (and keeps its since-time).
    pub(super) async fn set_group_state(
        &self,
        actor: &Actor,
        r: pb::SetGroupStateRequest,
    ) -> Result<pb::GroupInfo, Status> {
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
                actor,
                action,
                &cur.name,
                json!({"id": g.id, "from": cur.state.as_str(), "to": state.as_str()}),
                vec![Mutation::UpdateGroup {
                    row: g.clone(),
                    expect_revision: cur.revision,
                }],
            )
            .await?;
            Ok(g)
        })
        .await?;
        self.group_info_now(&row).await
    }

    /// A group can go when no account and no live key uses it and no group names it as a
    /// fallback (refused, naming those groups: the operator decides where their keys go
    /// instead). Its own fallback list goes with it. Revoked keys never authenticate again:
    /// they move to the default group in the same write (their usage history stays).
    pub(super) async fn delete_group(
        &self,
        actor: &Actor,
        r: pb::DeleteGroupRequest,
    ) -> Result<pb::DeleteResponse, Status> {
        let name = r.group.clone();
        let v = retry_conflicts(|| async {
            let g = self.group(&name).await?;
            if g.name == DEFAULT_GROUP {
                return Err(Status::failed_precondition("the default group cannot be removed"));
            }
            let fallback_of: Vec<String> = self
                .store
                .list_groups()
                .await?
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
            let keys = self.store.list_api_keys().await?;
            let accounts = self.store.list_accounts().await?;
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
                actor,
                "group.delete",
                &g.name,
                json!({"id": g.id, "revoked_keys_moved": moved}),
                muts,
            )
            .await
            .map_err(|e| match e {
                StoreError::InUse(_) => Status::aborted(format!("group {:?} changed meanwhile; retry", g.name)),
                e => e.into(),
            })
        })
        .await?;
        Ok(pb::DeleteResponse {
            version: Some(version_pb(v)),
        })
    }
}
