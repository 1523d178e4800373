//! The Admin service over gRPC: a thin adapter. Each method turns the call's bearer token into
//! the caller ([`Actor`]) and hands the request message to [`AdminApi::call`], which authorizes,
//! counts and serves it.

use super::requests::TailStream;
use super::{AdminApi, Rpc};
use crate::api::auth::Authenticator;
use relay_proto::v1 as pb;
use relay_proto::v1::admin_server::Admin;
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub struct AdminService {
    api: Arc<AdminApi>,
    auth: Authenticator,
}

impl AdminService {
    pub fn new(api: Arc<AdminApi>, auth: Authenticator) -> Self {
        Self { api, auth }
    }

    /// The caller from the token, then [`AdminApi::call`].
    async fn serve<R: Rpc>(&self, req: Request<R>) -> Result<Response<R::Reply>, Status> {
        let caller = match self.auth.identify(req.metadata()).await {
            Ok(c) => c,
            Err(e) => {
                super::count(R::LABEL, false);
                return Err(e);
            }
        };
        self.api.call(&caller, req.into_inner()).await.map(Response::new)
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    type TailRequestsStream = TailStream;

    async fn create_account(
        &self,
        req: Request<pb::CreateAccountRequest>,
    ) -> Result<Response<pb::AccountInfo>, Status> {
        self.serve(req).await
    }

    async fn update_account(
        &self,
        req: Request<pb::UpdateAccountRequest>,
    ) -> Result<Response<pb::AccountInfo>, Status> {
        self.serve(req).await
    }

    async fn get_account(&self, req: Request<pb::GetAccountRequest>) -> Result<Response<pb::AccountInfo>, Status> {
        self.serve(req).await
    }

    async fn list_accounts(
        &self,
        req: Request<pb::ListAccountsRequest>,
    ) -> Result<Response<pb::ListAccountsResponse>, Status> {
        self.serve(req).await
    }

    async fn delete_account(
        &self,
        req: Request<pb::DeleteAccountRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        self.serve(req).await
    }

    async fn reset_account(&self, req: Request<pb::ResetAccountRequest>) -> Result<Response<pb::AccountInfo>, Status> {
        self.serve(req).await
    }

    async fn check_accounts(
        &self,
        req: Request<pb::CheckAccountsRequest>,
    ) -> Result<Response<pb::CheckAccountsResponse>, Status> {
        self.serve(req).await
    }

    async fn create_api_key(
        &self,
        req: Request<pb::CreateApiKeyRequest>,
    ) -> Result<Response<pb::CreateApiKeyResponse>, Status> {
        self.serve(req).await
    }

    async fn update_api_key(&self, req: Request<pb::UpdateApiKeyRequest>) -> Result<Response<pb::ApiKeyInfo>, Status> {
        self.serve(req).await
    }

    async fn list_api_keys(
        &self,
        req: Request<pb::ListApiKeysRequest>,
    ) -> Result<Response<pb::ListApiKeysResponse>, Status> {
        self.serve(req).await
    }

    async fn revoke_api_key(&self, req: Request<pb::RevokeApiKeyRequest>) -> Result<Response<pb::ApiKeyInfo>, Status> {
        self.serve(req).await
    }

    async fn get_api_key(&self, req: Request<pb::GetApiKeyRequest>) -> Result<Response<pb::GetApiKeyResponse>, Status> {
        self.serve(req).await
    }

    async fn create_group(&self, req: Request<pb::CreateGroupRequest>) -> Result<Response<pb::GroupInfo>, Status> {
        self.serve(req).await
    }

    async fn update_group(&self, req: Request<pb::UpdateGroupRequest>) -> Result<Response<pb::GroupInfo>, Status> {
        self.serve(req).await
    }

    async fn list_groups(
        &self,
        req: Request<pb::ListGroupsRequest>,
    ) -> Result<Response<pb::ListGroupsResponse>, Status> {
        self.serve(req).await
    }

    async fn delete_group(&self, req: Request<pb::DeleteGroupRequest>) -> Result<Response<pb::DeleteResponse>, Status> {
        self.serve(req).await
    }

    async fn set_group_state(&self, req: Request<pb::SetGroupStateRequest>) -> Result<Response<pb::GroupInfo>, Status> {
        self.serve(req).await
    }

    async fn list_prices(
        &self,
        req: Request<pb::ListPricesRequest>,
    ) -> Result<Response<pb::ListPricesResponse>, Status> {
        self.serve(req).await
    }

    async fn set_price(&self, req: Request<pb::SetPriceRequest>) -> Result<Response<pb::Price>, Status> {
        self.serve(req).await
    }

    async fn delete_price(
        &self,
        req: Request<pb::DeletePriceRequest>,
    ) -> Result<Response<pb::DeletePriceResponse>, Status> {
        self.serve(req).await
    }

    async fn list_settings(
        &self,
        req: Request<pb::ListSettingsRequest>,
    ) -> Result<Response<pb::ListSettingsResponse>, Status> {
        self.serve(req).await
    }

    async fn set_setting(
        &self,
        req: Request<pb::SetSettingRequest>,
    ) -> Result<Response<pb::ListSettingsResponse>, Status> {
        self.serve(req).await
    }

    async fn unset_setting(
        &self,
        req: Request<pb::UnsetSettingRequest>,
    ) -> Result<Response<pb::ListSettingsResponse>, Status> {
        self.serve(req).await
    }

    async fn list_proxies(
        &self,
        req: Request<pb::ListProxiesRequest>,
    ) -> Result<Response<pb::ListProxiesResponse>, Status> {
        self.serve(req).await
    }

    async fn get_config_version(
        &self,
        req: Request<pb::GetConfigVersionRequest>,
    ) -> Result<Response<pb::ConfigVersion>, Status> {
        self.serve(req).await
    }

    async fn get_status(&self, req: Request<pb::GetStatusRequest>) -> Result<Response<pb::GetStatusResponse>, Status> {
        self.serve(req).await
    }

    async fn list_audit(&self, req: Request<pb::ListAuditRequest>) -> Result<Response<pb::ListAuditResponse>, Status> {
        self.serve(req).await
    }

    async fn query_usage(
        &self,
        req: Request<pb::QueryUsageRequest>,
    ) -> Result<Response<pb::QueryUsageResponse>, Status> {
        self.serve(req).await
    }

    async fn list_requests(
        &self,
        req: Request<pb::ListRequestsRequest>,
    ) -> Result<Response<pb::ListRequestsResponse>, Status> {
        self.serve(req).await
    }

    async fn clear_requests(
        &self,
        req: Request<pb::ClearRequestsRequest>,
    ) -> Result<Response<pb::ClearRequestsResponse>, Status> {
        self.serve(req).await
    }

    async fn add_capture_rule(
        &self,
        req: Request<pb::AddCaptureRuleRequest>,
    ) -> Result<Response<pb::CaptureRuleInfo>, Status> {
        self.serve(req).await
    }

    async fn list_capture_rules(
        &self,
        req: Request<pb::ListCaptureRulesRequest>,
    ) -> Result<Response<pb::ListCaptureRulesResponse>, Status> {
        self.serve(req).await
    }

    async fn delete_capture_rule(
        &self,
        req: Request<pb::DeleteCaptureRuleRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        self.serve(req).await
    }

    async fn get_request(&self, req: Request<pb::GetRequestRequest>) -> Result<Response<pb::RequestRecord>, Status> {
        self.serve(req).await
    }

    async fn request_stats(
        &self,
        req: Request<pb::RequestStatsRequest>,
    ) -> Result<Response<pb::RequestStatsResponse>, Status> {
        self.serve(req).await
    }

    async fn tail_requests(
        &self,
        req: Request<pb::TailRequestsRequest>,
    ) -> Result<Response<Self::TailRequestsStream>, Status> {
        self.serve(req).await
    }

    async fn create_admin_token(
        &self,
        req: Request<pb::CreateAdminTokenRequest>,
    ) -> Result<Response<pb::CreateAdminTokenResponse>, Status> {
        self.serve(req).await
    }

    async fn list_admin_tokens(
        &self,
        req: Request<pb::ListAdminTokensRequest>,
    ) -> Result<Response<pb::ListAdminTokensResponse>, Status> {
        self.serve(req).await
    }

    async fn revoke_admin_token(
        &self,
        req: Request<pb::RevokeAdminTokenRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        self.serve(req).await
    }

    async fn test_notification(
        &self,
        req: Request<pb::TestNotificationRequest>,
    ) -> Result<Response<pb::TestNotificationResponse>, Status> {
        self.serve(req).await
    }

    async fn list_notifications(
        &self,
        req: Request<pb::ListNotificationsRequest>,
    ) -> Result<Response<pb::ListNotificationsResponse>, Status> {
        self.serve(req).await
    }
}
