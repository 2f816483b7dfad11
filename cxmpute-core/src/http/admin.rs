//! The admin API: every call checks for an admin's API key.

use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::routing::{post, put};
use axum::{Json, Router};
use bytes::Bytes;

use super::{bearer, json_body, ok, ApiResult};
use crate::broker::Broker;
use crate::types::*;
use crate::wire::*;

/// The admin routes.
pub(super) fn routes() -> Router<Broker> {
    Router::new()
        .route("/v1/admin/users", post(admin_create_user))
        .route("/v1/admin/users/{id}/credits", post(admin_grant_credits))
        .route("/v1/admin/providers", post(admin_create_provider))
        .route("/v1/admin/prices", put(admin_put_price).get(admin_prices))
}

async fn admin_create_user(
    State(b): State<Broker>,
    h: HeaderMap,
    body: std::result::Result<Bytes, BytesRejection>,
) -> ApiResult<Json<CreateUserResponse>> {
    b.authenticate_admin(bearer(&h).as_ref()).await?;
    let req: CreateUserRequest = json_body(body)?;
    let (user, key, secret) = b.create_user(&req.email, req.credits, false).await?;
    ok(CreateUserResponse {
        user_id: user.id,
        key_id: key.id,
        api_key: secret.expose().to_owned(),
    })
}

async fn admin_grant_credits(
    State(b): State<Broker>,
    h: HeaderMap,
    Path(id): Path<String>,
    body: std::result::Result<Bytes, BytesRejection>,
) -> ApiResult<Json<BalanceResponse>> {
    let admin = b.authenticate_admin(bearer(&h).as_ref()).await?;
    let req: GrantCreditsRequest = json_body(body)?;
    let user_id = UserId::new(id);
    let credits = b
        .grant_credits(&user_id, req.amount, admin.id.as_str(), &req.reason)
        .await?;
    ok(BalanceResponse { user_id, credits })
}

async fn admin_create_provider(
    State(b): State<Broker>,
    h: HeaderMap,
    body: std::result::Result<Bytes, BytesRejection>,
) -> ApiResult<Json<CreateProviderResponse>> {
    b.authenticate_admin(bearer(&h).as_ref()).await?;
    let req: CreateProviderRequest = json_body(body)?;
    let (p, secret) = b.create_provider(&req.email, None).await?;
    ok(CreateProviderResponse {
        provider_id: p.id,
        provider_key: secret.expose().to_owned(),
    })
}

async fn admin_put_price(
    State(b): State<Broker>,
    h: HeaderMap,
    body: std::result::Result<Bytes, BytesRejection>,
) -> ApiResult<Json<PriceEntry>> {
    b.authenticate_admin(bearer(&h).as_ref()).await?;
    let price: PriceEntry = json_body(body)?;
    b.put_price(price.clone()).await?;
    ok(price)
}

async fn admin_prices(State(b): State<Broker>, h: HeaderMap) -> ApiResult<Json<Vec<PriceEntry>>> {
    b.authenticate_admin(bearer(&h).as_ref()).await?;
    ok(b.prices().all())
}
