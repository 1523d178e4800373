//! Every Admin RPC, declared once: its gRPC method, the handler that serves it, its request and
//! reply messages, and what the caller needs ([`Need::Read`]: a read-only or admin token;
//! [`Need::Write`]: an admin token). [`AdminApi::call`] enforces it for every caller, over gRPC
//! or in process; the table's tests check it against the proto descriptor (an RPC without an
//! entry fails them) and `tests/grpc.rs` checks it over the wire for every method.

use super::requests::TailStream;
use super::AdminApi;
use crate::api::auth::{Actor, Need};
use relay_proto::v1 as pb;
use std::future::Future;
use tonic::Status;

/// Proof that [`AdminApi::call`] authorized the call: only this module and `call` can make one,
/// so nothing reaches a handler around the check.
pub struct Authorized(());

impl Authorized {
    pub(super) fn granted() -> Self {
        Self(())
    }
}

/// One Admin RPC, named by its request message.
pub trait Rpc: Send + Sized + 'static {
    /// The gRPC method (`/relay.v1.Admin/<METHOD>`, as in the proto).
    const METHOD: &'static str;
    /// The handler's name: the `method` label of `relay_admin_requests_total`.
    const LABEL: &'static str;
    /// What the caller's role must allow.
    const NEED: Need;
    type Reply: Send + 'static;
    /// Serves the call (see [`AdminApi::call`], the only way in).
    fn run<'a>(
        self,
        api: &'a AdminApi,
        caller: &'a Actor,
        proof: Authorized,
    ) -> impl Future<Output = Result<Self::Reply, Status>> + Send + 'a;
}

macro_rules! rpcs {
    ($($method:ident: $need:ident, $handler:ident($req:ident) -> $reply:ty;)*) => {
        /// Every Admin RPC: (method, request message, what it needs), in the proto's order.
        pub const RPCS: &[(&str, &str, Need)] = &[$((stringify!($method), stringify!($req), Need::$need)),*];
        $(
            impl Rpc for pb::$req {
                const METHOD: &'static str = stringify!($method);
                const LABEL: &'static str = stringify!($handler);
                const NEED: Need = Need::$need;
                type Reply = $reply;
                fn run<'a>(
                    self,
                    api: &'a AdminApi,
                    caller: &'a Actor,
                    _: Authorized,
                ) -> impl Future<Output = Result<$reply, Status>> + Send + 'a {
                    api.$handler(caller, self)
                }
            }
        )*
    };
}

rpcs! {
    // accounts
    CreateAccount: Write, create_account(CreateAccountRequest) -> pb::AccountInfo;
    UpdateAccount: Write, update_account(UpdateAccountRequest) -> pb::AccountInfo;
    GetAccount: Read, get_account(GetAccountRequest) -> pb::AccountInfo;
    ListAccounts: Read, list_accounts(ListAccountsRequest) -> pb::ListAccountsResponse;
    DeleteAccount: Write, delete_account(DeleteAccountRequest) -> pb::DeleteResponse;
    ResetAccount: Write, reset_account(ResetAccountRequest) -> pb::AccountInfo;
    CheckAccounts: Write, check_accounts(CheckAccountsRequest) -> pb::CheckAccountsResponse;
    // keys
    CreateApiKey: Write, create_api_key(CreateApiKeyRequest) -> pb::CreateApiKeyResponse;
    UpdateApiKey: Write, update_api_key(UpdateApiKeyRequest) -> pb::ApiKeyInfo;
    ListApiKeys: Read, list_api_keys(ListApiKeysRequest) -> pb::ListApiKeysResponse;
    RevokeApiKey: Write, revoke_api_key(RevokeApiKeyRequest) -> pb::ApiKeyInfo;
    GetApiKey: Read, get_api_key(GetApiKeyRequest) -> pb::GetApiKeyResponse;
    // groups
    CreateGroup: Write, create_group(CreateGroupRequest) -> pb::GroupInfo;
    UpdateGroup: Write, update_group(UpdateGroupRequest) -> pb::GroupInfo;
    ListGroups: Read, list_groups(ListGroupsRequest) -> pb::ListGroupsResponse;
    DeleteGroup: Write, delete_group(DeleteGroupRequest) -> pb::DeleteResponse;
    SetGroupState: Write, set_group_state(SetGroupStateRequest) -> pb::GroupInfo;
    // pricing
    ListPrices: Read, list_prices(ListPricesRequest) -> pb::ListPricesResponse;
    SetPrice: Write, set_price(SetPriceRequest) -> pb::Price;
    DeletePrice: Write, delete_price(DeletePriceRequest) -> pb::DeletePriceResponse;
    // settings
    ListSettings: Read, list_settings(ListSettingsRequest) -> pb::ListSettingsResponse;
    SetSetting: Write, set_setting(SetSettingRequest) -> pb::ListSettingsResponse;
    UnsetSetting: Write, unset_setting(UnsetSettingRequest) -> pb::ListSettingsResponse;
    // the fleet
    ListProxies: Read, list_proxies(ListProxiesRequest) -> pb::ListProxiesResponse;
    GetConfigVersion: Read, get_config_version(GetConfigVersionRequest) -> pb::ConfigVersion;
    GetStatus: Read, get_status(GetStatusRequest) -> pb::GetStatusResponse;
    // reports
    ListAudit: Read, list_audit(ListAuditRequest) -> pb::ListAuditResponse;
    QueryUsage: Read, query_usage(QueryUsageRequest) -> pb::QueryUsageResponse;
    // the request log
    ListRequests: Read, list_requests(ListRequestsRequest) -> pb::ListRequestsResponse;
    GetRequest: Read, get_request(GetRequestRequest) -> pb::RequestRecord;
    RequestStats: Read, request_stats(RequestStatsRequest) -> pb::RequestStatsResponse;
    TailRequests: Read, tail_requests(TailRequestsRequest) -> TailStream;
    ClearRequests: Write, clear_requests(ClearRequestsRequest) -> pb::ClearRequestsResponse;
    // capture rules
    AddCaptureRule: Write, add_capture_rule(AddCaptureRuleRequest) -> pb::CaptureRuleInfo;
    ListCaptureRules: Read, list_capture_rules(ListCaptureRulesRequest) -> pb::ListCaptureRulesResponse;
    DeleteCaptureRule: Write, delete_capture_rule(DeleteCaptureRuleRequest) -> pb::DeleteResponse;
    // admin tokens
    CreateAdminToken: Write, create_admin_token(CreateAdminTokenRequest) -> pb::CreateAdminTokenResponse;
    ListAdminTokens: Read, list_admin_tokens(ListAdminTokensRequest) -> pb::ListAdminTokensResponse;
    RevokeAdminToken: Write, revoke_admin_token(RevokeAdminTokenRequest) -> pb::DeleteResponse;
    // notifications
    TestNotification: Write, test_notification(TestNotificationRequest) -> pb::TestNotificationResponse;
    ListNotifications: Read, list_notifications(ListNotificationsRequest) -> pb::ListNotificationsResponse;
}

/// What `method` (a gRPC method name of the Admin service) needs; `None` when it is not one.
pub fn need(method: &str) -> Option<Need> {
    RPCS.iter().find(|(m, _, _)| *m == method).map(|(_, _, n)| *n)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use prost::Message;
    use std::collections::BTreeMap;

    /// The Admin service's methods in the compiled proto: name → input message.
    fn admin_methods() -> BTreeMap<String, String> {
        let set = prost_types::FileDescriptorSet::decode(relay_proto::FILE_DESCRIPTOR_SET).unwrap();
        let admin: Vec<_> = set
            .file
            .iter()
            .filter(|f| f.package() == "relay.v1")
            .flat_map(|f| f.service.iter())
            .filter(|s| s.name() == "Admin")
            .collect();
        assert_eq!(admin.len(), 1, "one relay.v1.Admin service");
        admin[0]
            .method
            .iter()
            .map(|m| (m.name().to_string(), m.input_type().to_string()))
            .collect()
    }

    /// Every method of the Admin service has exactly one entry, for the request message the proto
    /// gives it, and every entry is a method: a new RPC without a declared need fails here.
    #[test]
    fn every_admin_rpc_declares_what_it_needs() {
        let methods = admin_methods();
        assert!(methods.len() >= 30, "{methods:?}");
        for (name, input) in &methods {
            let entries: Vec<_> = RPCS.iter().filter(|(m, _, _)| m == name).collect();
            assert_eq!(entries.len(), 1, "Admin.{name} needs exactly one entry in RPCS");
            assert_eq!(
                format!(".relay.v1.{}", entries[0].1),
                *input,
                "Admin.{name}'s entry names the wrong request"
            );
        }
        for (m, _, _) in RPCS {
            assert!(
                methods.contains_key(*m),
                "RPCS names {m}, which the Admin service does not have"
            );
        }
        assert_eq!(need("CreateAccount"), Some(Need::Write));
        assert_eq!(need("ListAccounts"), Some(Need::Read));
        assert_eq!(need("Watch"), None);
    }

    /// A read is what its name says is one (List, Get, Query, Tail, RequestStats); anything that
    /// changes, probes or sends is a write. Guards against declaring a new write as a read.
    #[test]
    fn only_reads_are_declared_read() {
        for (m, _, n) in RPCS {
            let reads = ["List", "Get", "Query", "Tail"].iter().any(|p| m.starts_with(p)) || *m == "RequestStats";
            let want = if reads { Need::Read } else { Need::Write };
            assert_eq!(*n, want, "Admin.{m}");
        }
    }
}
