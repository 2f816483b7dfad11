//! The admin API. Every call checks, on every request, that the caller holds
//! the admin role now: an admin's session or an admin's API key, the account
//! not suspended, and the role stored or granted by configuration.
//!
//! | route | what |
//! |---|---|
//! | `GET /v1/admin/users?q=&limit=` | list and search accounts by email |
//! | `POST /v1/admin/users` | create a user with a first key |
//! | `GET /v1/admin/users/{id}` | a user with keys (no secrets) and grants |
//! | `POST /v1/admin/users/{id}/credits` | grant or remove credits (who and why recorded) |
//! | `POST /v1/admin/users/{id}/suspend`, `.../unsuspend` | suspend with a reason, or lift it |
//! | `POST /v1/admin/providers` | create a provider account |
//! | `GET /v1/admin/providers/{id}` | a provider with its nodes |
//! | `POST /v1/admin/providers/{id}/suspend`, `.../unsuspend` | suspend (key refused, nodes out of routing), or lift it |
//! | `GET /v1/admin/provisions`, `DELETE /v1/admin/provisions/{id}` | list nodes, disconnect one |
//! | `GET`/`PUT /v1/admin/prices` | prices per service and model |
//! | `GET`/`POST /v1/admin/notifications`, `PUT`/`DELETE /v1/admin/notifications/{id}` | notifications |

use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Json;
use bytes::Bytes;
use serde::Deserialize;

use super::account::{credentials, path_param, query};
use super::Routes;
use super::{json_body, ok, ApiResult};
use crate::broker::Broker;
use crate::types::*;
use crate::wire::*;

/// The admin routes.
pub(super) fn routes() -> Routes {
    Routes::new()
        .route("/v1/admin/users", post(create_user).get(search_users))
        .route("/v1/admin/users/{id}", get(user_detail))
        .route("/v1/admin/users/{id}/credits", post(grant_credits))
        .route("/v1/admin/users/{id}/suspend", post(suspend_user))
        .route("/v1/admin/users/{id}/unsuspend", post(unsuspend_user))
        .route("/v1/admin/providers", post(create_provider))
        .route("/v1/admin/providers/{id}", get(provider_detail))
        .route("/v1/admin/providers/{id}/suspend", post(suspend_provider))
        .route(
            "/v1/admin/providers/{id}/unsuspend",
            post(unsuspend_provider),
        )
        .route("/v1/admin/provisions", get(provisions))
        .route(
            "/v1/admin/provisions/{id}",
            axum::routing::delete(disconnect),
        )
        .route("/v1/admin/prices", put(put_price).get(prices))
        .route(
            "/v1/admin/notifications",
            get(notifications).post(create_notification),
        )
        .route(
            "/v1/admin/notifications/{id}",
            put(replace_notification).delete(delete_notification),
        )
}

async fn admin(b: &Broker, h: &HeaderMap) -> ApiResult<User> {
    Ok(b.accounts().admin(&credentials(h)).await?)
}

async fn create_user(
    State(b): State<Broker>,
    h: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    admin(&b, &h).await?;
    let req: CreateUserRequest = json_body(body)?;
    let (user, key, secret) = b.create_user(&req.email, req.credits, false).await?;
    let out = CreateUserResponse {
        user_id: user.id,
        key_id: key.id,
        api_key: secret.expose().to_owned(),
    };
    Ok((StatusCode::OK, Json(out)).into_response())
}

#[derive(Deserialize)]
struct SearchQuery {
    #[serde(default)]
    q: String,
    #[serde(default = "fifty")]
    limit: usize,
}

fn fifty() -> usize {
    50
}

async fn search_users(
    State(b): State<Broker>,
    h: HeaderMap,
    q: Result<Query<SearchQuery>, QueryRejection>,
) -> ApiResult<Json<Vec<AdminUserView>>> {
    admin(&b, &h).await?;
    let q = query(q)?;
    ok(b.accounts().search_accounts(&q.q, q.limit).await?)
}

async fn user_detail(
    State(b): State<Broker>,
    h: HeaderMap,
    id: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<AdminUserDetail>> {
    admin(&b, &h).await?;
    let id = UserId::new(path_param(id)?);
    ok(b.accounts().user_detail(&id).await?)
}

async fn grant_credits(
    State(b): State<Broker>,
    h: HeaderMap,
    id: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<BalanceResponse>> {
    let admin = admin(&b, &h).await?;
    let user_id = UserId::new(path_param(id)?);
    let req: GrantCreditsRequest = json_body(body)?;
    let credits = b
        .grant_credits(&user_id, req.amount, admin.id.as_str(), &req.reason)
        .await?;
    ok(BalanceResponse { user_id, credits })
}

async fn suspend_user(
    State(b): State<Broker>,
    h: HeaderMap,
    id: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<StatusCode> {
    let admin = admin(&b, &h).await?;
    let id = UserId::new(path_param(id)?);
    let req: SuspendRequest = json_body(body)?;
    b.accounts().suspend_user(&admin, &id, &req.reason).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn unsuspend_user(
    State(b): State<Broker>,
    h: HeaderMap,
    id: Result<Path<String>, PathRejection>,
) -> ApiResult<StatusCode> {
    let admin = admin(&b, &h).await?;
    let id = UserId::new(path_param(id)?);
    b.accounts().unsuspend_user(&admin, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn create_provider(
    State(b): State<Broker>,
    h: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<CreateProviderResponse>> {
    admin(&b, &h).await?;
    let req: CreateProviderRequest = json_body(body)?;
    let (p, secret) = b.create_provider(&req.email, None).await?;
    ok(CreateProviderResponse {
        provider_id: p.id,
        provider_key: secret.expose().to_owned(),
    })
}

async fn provider_detail(
    State(b): State<Broker>,
    h: HeaderMap,
    id: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<AdminProviderView>> {
    admin(&b, &h).await?;
    let id = ProviderId::new(path_param(id)?);
    ok(b.accounts().provider_detail(&id).await?)
}

async fn suspend_provider(
    State(b): State<Broker>,
    h: HeaderMap,
    id: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<StatusCode> {
    let admin = admin(&b, &h).await?;
    let id = ProviderId::new(path_param(id)?);
    let req: SuspendRequest = json_body(body)?;
    b.accounts()
        .suspend_provider(&admin, &id, &req.reason)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn unsuspend_provider(
    State(b): State<Broker>,
    h: HeaderMap,
    id: Result<Path<String>, PathRejection>,
) -> ApiResult<StatusCode> {
    let admin = admin(&b, &h).await?;
    let id = ProviderId::new(path_param(id)?);
    b.accounts().unsuspend_provider(&admin, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn provisions(
    State(b): State<Broker>,
    h: HeaderMap,
) -> ApiResult<Json<Vec<AdminProvisionView>>> {
    admin(&b, &h).await?;
    ok(b.accounts().all_provisions().await?)
}

async fn disconnect(
    State(b): State<Broker>,
    h: HeaderMap,
    id: Result<Path<String>, PathRejection>,
) -> ApiResult<StatusCode> {
    let admin = admin(&b, &h).await?;
    let id = ProvisionId::new(path_param(id)?);
    b.accounts().disconnect_provision(&admin, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn put_price(
    State(b): State<Broker>,
    h: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<PriceEntry>> {
    admin(&b, &h).await?;
    let price: PriceEntry = json_body(body)?;
    b.put_price(price.clone()).await?;
    ok(price)
}

async fn prices(State(b): State<Broker>, h: HeaderMap) -> ApiResult<Json<Vec<PriceEntry>>> {
    admin(&b, &h).await?;
    ok(b.prices().all())
}

async fn notifications(
    State(b): State<Broker>,
    h: HeaderMap,
) -> ApiResult<Json<Vec<Notification>>> {
    admin(&b, &h).await?;
    ok(b.accounts().notifications().await?)
}

async fn create_notification(
    State(b): State<Broker>,
    h: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    admin(&b, &h).await?;
    let req: NotificationRequest = json_body(body)?;
    let n = b.accounts().put_notification(None, req).await?;
    Ok((StatusCode::CREATED, Json(n)).into_response())
}

async fn replace_notification(
    State(b): State<Broker>,
    h: HeaderMap,
    id: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Notification>> {
    admin(&b, &h).await?;
    let id = NotificationId::new(path_param(id)?);
    let req: NotificationRequest = json_body(body)?;
    ok(b.accounts().put_notification(Some(id), req).await?)
}

async fn delete_notification(
    State(b): State<Broker>,
    h: HeaderMap,
    id: Result<Path<String>, PathRejection>,
) -> ApiResult<StatusCode> {
    admin(&b, &h).await?;
    let id = NotificationId::new(path_param(id)?);
    b.accounts().delete_notification(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}
