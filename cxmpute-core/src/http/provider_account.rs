//! The provider's own account: summary, key rotation, earnings and nodes.
//!
//! Every route takes either the provider key (refused while the provider is
//! suspended) or the session of the user who owns the provider account; a
//! provider only ever sees its own account. Node lifecycle routes live in
//! the `provider` module.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Json;

use super::extract::ProviderAccount;
use super::Routes;
use super::{no_store, ok, ApiResult};
use crate::broker::Broker;
use crate::wire::*;

/// The provider account routes.
pub(super) fn routes() -> Routes {
    Routes::new()
        .route("/v1/provider/account", get(account))
        .route("/v1/provider/account/key", post(rotate_key))
        .route("/v1/provider/account/earnings", get(earnings))
        .route("/v1/provider/account/provisions", get(provisions))
}

#[utoipa::path(
    get,
    path = "/v1/provider/account",
    tag = "provider",
    description = "The provider's account summary.",
    security(("provider_key" = []), ("session" = []), ("session_cookie" = [])),
    responses((status = 200, description = "The account", body = ProviderAccountResponse), super::openapi::Refusals)
)]
async fn account(
    ProviderAccount(p): ProviderAccount,
    State(b): State<Broker>,
) -> ApiResult<Json<ProviderAccountResponse>> {
    let a = b.accounts();
    ok(a.provider_account(&p).await?)
}

#[utoipa::path(
    post,
    path = "/v1/provider/account/key",
    tag = "provider",
    description = "Replaces the provider key; the old one stops working at once.",
    security(("provider_key" = []), ("session" = []), ("session_cookie" = [])),
    responses((status = 200, description = "The new key, shown once", body = ProviderKeyResponse), super::openapi::Refusals)
)]
async fn rotate_key(
    ProviderAccount(p): ProviderAccount,
    State(b): State<Broker>,
) -> ApiResult<Response> {
    let a = b.accounts();
    let key = a.rotate_provider_key(&p).await?;
    let mut resp = Json(ProviderKeyResponse {
        provider_id: p.id,
        provider_key: key,
    })
    .into_response();
    // The key is shown once.
    no_store(&mut resp);
    Ok(resp)
}

#[utoipa::path(
    get,
    path = "/v1/provider/account/earnings",
    tag = "provider",
    description = "Unpaid earnings and each of the last 30 days.",
    security(("provider_key" = []), ("session" = []), ("session_cookie" = [])),
    responses((status = 200, description = "Earnings", body = EarningsResponse), super::openapi::Refusals)
)]
async fn earnings(
    ProviderAccount(p): ProviderAccount,
    State(b): State<Broker>,
) -> ApiResult<Json<EarningsResponse>> {
    let a = b.accounts();
    ok(a.earnings(&p).await?)
}

#[utoipa::path(
    get,
    path = "/v1/provider/account/provisions",
    tag = "provider",
    description = "The provider's nodes.",
    security(("provider_key" = []), ("session" = []), ("session_cookie" = [])),
    responses((status = 200, description = "Nodes", body = Vec<ProvisionView>), super::openapi::Refusals)
)]
async fn provisions(
    ProviderAccount(p): ProviderAccount,
    State(b): State<Broker>,
) -> ApiResult<Json<Vec<ProvisionView>>> {
    ok(b.network().provisions(&p).await?)
}
