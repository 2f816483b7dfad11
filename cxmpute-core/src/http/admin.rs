//! The admin API. Every call checks, on every request, that the caller holds
//! the admin role now: an admin's session or an admin's unrestricted API key
//! (a key limited to some routes or by a credit limit is refused with 403),
//! the account not suspended, and the role stored or granted by configuration.
//!
//! | route | what |
//! |---|---|
//! | `GET /v1/admin/users?q=&limit=` | list and search accounts by email |
//! | `POST /v1/admin/users` | create a user with a first key |
//! | `GET /v1/admin/users/{id}` | a user with keys (no secrets) and grants |
//! | `PATCH /v1/admin/users/{id}` | change a user's budget or alerts |
//! | `POST /v1/admin/users/{id}/credits` | grant or remove credits (who and why recorded) |
//! | `POST /v1/admin/users/{id}/suspend`, `.../unsuspend` | suspend with a reason, or lift it |
//! | `PATCH /v1/admin/keys/{id}` | change any key: rate limits (`rpm`, `tpm`), credit limit, routes, name |
//! | `POST /v1/admin/providers` | create a provider account |
//! | `GET /v1/admin/providers/{id}` | a provider with its nodes |
//! | `POST /v1/admin/providers/{id}/suspend`, `.../unsuspend` | suspend (key refused, nodes out of routing), or lift it |
//! | `GET /v1/admin/provisions`, `DELETE /v1/admin/provisions/{id}` | list nodes, disconnect one |
//! | `GET`/`PUT /v1/admin/prices` | prices per service and model |
//! | `GET`/`PUT /v1/admin/catalogue`, `DELETE /v1/admin/catalogue/{service}/{model}` | the catalogue of models |
//! | `GET`/`PUT /v1/admin/aliases`, `DELETE /v1/admin/aliases/{alias}` | model aliases (`fast` -> models tried in order) |
//! | `GET /v1/admin/reward` | the reward policy: what providers earn, what the platform keeps |
//! | `GET`/`POST /v1/admin/notifications`, `PUT`/`DELETE /v1/admin/notifications/{id}` | notifications |

use axum::extract::State;
use axum::handler::Handler;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::MethodRouter;
use axum::Json;
use serde::Deserialize;

use super::extract::{Admin, Body, Path, Query};
use super::Routes;
use super::{ok, ApiResult};
use crate::broker::Broker;
use crate::types::*;
use crate::wire::*;

/// The admin routes. The table takes only handlers whose first argument is
/// [`Admin`] (see [`AdminHandler`]): an admin route that forgets to authorize
/// does not compile.
pub(super) fn routes() -> Routes {
    AdminRoutes(Routes::new())
        .route("/v1/admin/users", post(create_user).get(search_users))
        .route("/v1/admin/users/{id}", get(user_detail).patch(update_user))
        .route("/v1/admin/users/{id}/credits", post(grant_credits))
        .route("/v1/admin/users/{id}/suspend", post(suspend_user))
        .route("/v1/admin/users/{id}/unsuspend", post(unsuspend_user))
        .route("/v1/admin/keys/{id}", patch(update_key))
        .route("/v1/admin/providers", post(create_provider))
        .route("/v1/admin/providers/{id}", get(provider_detail))
        .route("/v1/admin/providers/{id}/suspend", post(suspend_provider))
        .route(
            "/v1/admin/providers/{id}/unsuspend",
            post(unsuspend_provider),
        )
        .route("/v1/admin/provisions", get(provisions))
        .route("/v1/admin/provisions/{id}", delete(disconnect))
        .route("/v1/admin/prices", put(put_price).get(prices))
        .route("/v1/admin/catalogue", get(catalogue).put(put_catalogue))
        .route(
            "/v1/admin/catalogue/{service}/{model}",
            delete(delete_catalogue),
        )
        .route("/v1/admin/aliases", get(aliases).put(put_alias))
        .route("/v1/admin/aliases/{alias}", delete(delete_alias))
        .route("/v1/admin/reward", get(reward_policy))
        .route(
            "/v1/admin/notifications",
            get(notifications).post(create_notification),
        )
        .route(
            "/v1/admin/notifications/{id}",
            put(replace_notification).delete(delete_notification),
        )
        .0
}

/// A handler whose first argument is [`Admin`]: the admin check runs before
/// anything else of the request is read. `T` is axum's list of a handler's
/// extractors (the first item is axum's marker for the last one).
trait AdminHandler<T>: Handler<T, Broker> {}

macro_rules! admin_handler {
    ($($rest:ident),*) => {
        impl<H, M, $($rest,)*> AdminHandler<(M, Admin, $($rest,)*)> for H where
            H: Handler<(M, Admin, $($rest,)*), Broker>
        {
        }
    };
}
admin_handler!();
admin_handler!(T2);
admin_handler!(T2, T3);
admin_handler!(T2, T3, T4);

/// The admin route table: like [`Routes`], but its routes are
/// [`AdminMethods`] only.
struct AdminRoutes(Routes);

impl AdminRoutes {
    fn route(self, path: &str, methods: AdminMethods) -> Self {
        AdminRoutes(self.0.route(path, methods.0))
    }
}

/// A method router whose every handler is an [`AdminHandler`].
struct AdminMethods(MethodRouter<Broker>);

macro_rules! admin_methods {
    ($($method:ident),*) => {
        impl AdminMethods {
            $(
                fn $method<H: AdminHandler<T>, T: 'static>(self, h: H) -> Self {
                    AdminMethods(self.0.$method(h))
                }
            )*
        }
        $(
            fn $method<H: AdminHandler<T>, T: 'static>(h: H) -> AdminMethods {
                AdminMethods(MethodRouter::new()).$method(h)
            }
        )*
    };
}
admin_methods!(get, post, put, delete, patch);

#[utoipa::path(
    post,
    path = "/v1/admin/users",
    tag = "admin",
    description = "Creates a user with a first API key.",
    security(("session" = []), ("session_cookie" = []), ("api_key" = [])),
    request_body = CreateUserRequest,
    responses((status = 200, description = "The user and its key", body = CreateUserResponse), super::openapi::Refusals)
)]
async fn create_user(
    _: Admin,
    State(b): State<Broker>,
    Body(req): Body<CreateUserRequest>,
) -> ApiResult<Response> {
    let (user, key, secret) = b
        .admin()
        .create_user(&req.email, req.credits, false)
        .await?;
    let out = CreateUserResponse {
        user_id: user.id,
        key_id: key.id,
        api_key: secret,
    };
    Ok((StatusCode::OK, Json(out)).into_response())
}

#[utoipa::path(
    patch,
    path = "/v1/admin/keys/{id}",
    tag = "admin",
    description = "Changes any user's API key: its rate limits (`rpm`, `tpm`), credit limit, \
                   permitted routes or name. Absent fields stay; `null` removes a limit.",
    security(("session" = []), ("session_cookie" = []), ("api_key" = [])),
    params(("id" = String, Path, description = "The key")),
    request_body = UpdateKeyRequest,
    responses((status = 200, description = "The key", body = ApiKeyView), super::openapi::Refusals)
)]
async fn update_key(
    _: Admin,
    State(b): State<Broker>,
    Path(id): Path<String>,
    Body(req): Body<UpdateKeyRequest>,
) -> ApiResult<Json<ApiKeyView>> {
    let key = b.admin().update_key(&ApiKeyId::new(id), req).await?;
    ok(ApiKeyView::from(&key))
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

#[utoipa::path(
    get,
    path = "/v1/admin/users",
    tag = "admin",
    description = "Lists and searches accounts by email.",
    security(("session" = []), ("session_cookie" = []), ("api_key" = [])),
    params(("q" = Option<String>, Query, description = "Part of an email"), ("limit" = Option<usize>, Query, description = "1 to 200; default 50")),
    responses((status = 200, description = "Accounts", body = Vec<AdminUserView>), super::openapi::Refusals)
)]
async fn search_users(
    _: Admin,
    State(b): State<Broker>,
    Query(q): Query<SearchQuery>,
) -> ApiResult<Json<Vec<AdminUserView>>> {
    ok(b.admin().search_users(&q.q, q.limit).await?)
}

#[utoipa::path(
    get,
    path = "/v1/admin/users/{id}",
    tag = "admin",
    description = "A user with keys (no secrets) and credit grants.",
    security(("session" = []), ("session_cookie" = []), ("api_key" = [])),
    params(("id" = String, Path, description = "The user")),
    responses((status = 200, description = "The user", body = AdminUserDetail), super::openapi::Refusals)
)]
async fn user_detail(
    _: Admin,
    State(b): State<Broker>,
    Path(id): Path<String>,
) -> ApiResult<Json<AdminUserDetail>> {
    let id = UserId::new(id);
    ok(b.admin().user_detail(&id).await?)
}

#[utoipa::path(
    patch,
    path = "/v1/admin/users/{id}",
    tag = "admin",
    description = "Changes a user's budget per UTC day or month (`null` removes it) or alerts. \
                   Absent fields stay.",
    security(("session" = []), ("session_cookie" = []), ("api_key" = [])),
    params(("id" = String, Path, description = "The user")),
    request_body = UpdateAccountRequest,
    responses((status = 200, description = "The user", body = AdminUserView), super::openapi::Refusals)
)]
async fn update_user(
    _: Admin,
    State(b): State<Broker>,
    Path(id): Path<String>,
    Body(req): Body<UpdateAccountRequest>,
) -> ApiResult<Json<AdminUserView>> {
    let id = UserId::new(id);
    ok(b.admin().update_user(&id, req).await?)
}

#[utoipa::path(
    post,
    path = "/v1/admin/users/{id}/credits",
    tag = "admin",
    description = "Grants (or removes) credits; who and why are recorded.",
    security(("session" = []), ("session_cookie" = []), ("api_key" = [])),
    params(("id" = String, Path, description = "The user")),
    request_body = GrantCreditsRequest,
    responses((status = 200, description = "The new balance", body = BalanceResponse), super::openapi::Refusals)
)]
async fn grant_credits(
    Admin(admin): Admin,
    State(b): State<Broker>,
    Path(id): Path<String>,
    Body(req): Body<GrantCreditsRequest>,
) -> ApiResult<Json<BalanceResponse>> {
    let user_id = UserId::new(id);
    let credits = (b.admin())
        .grant_credits(&user_id, req.amount, admin.id.as_str(), &req.reason)
        .await?;
    ok(BalanceResponse { user_id, credits })
}

#[utoipa::path(
    post,
    path = "/v1/admin/users/{id}/suspend",
    tag = "admin",
    description = "Suspends a user, with a reason.",
    security(("session" = []), ("session_cookie" = []), ("api_key" = [])),
    params(("id" = String, Path, description = "The user")),
    request_body = SuspendRequest,
    responses((status = 204, description = "Done"), super::openapi::Refusals)
)]
async fn suspend_user(
    Admin(admin): Admin,
    State(b): State<Broker>,
    Path(id): Path<String>,
    Body(req): Body<SuspendRequest>,
) -> ApiResult<StatusCode> {
    let id = UserId::new(id);
    b.admin().suspend_user(&admin, &id, &req.reason).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    post,
    path = "/v1/admin/users/{id}/unsuspend",
    tag = "admin",
    description = "Lifts a user's suspension.",
    security(("session" = []), ("session_cookie" = []), ("api_key" = [])),
    params(("id" = String, Path, description = "The user")),
    responses((status = 204, description = "Done"), super::openapi::Refusals)
)]
async fn unsuspend_user(
    Admin(admin): Admin,
    State(b): State<Broker>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let id = UserId::new(id);
    b.admin().unsuspend_user(&admin, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    post,
    path = "/v1/admin/providers",
    tag = "admin",
    description = "Creates a provider account; its key is shown once.",
    security(("session" = []), ("session_cookie" = []), ("api_key" = [])),
    request_body = CreateProviderRequest,
    responses((status = 200, description = "The provider and its key", body = CreateProviderResponse), super::openapi::Refusals)
)]
async fn create_provider(
    _: Admin,
    State(b): State<Broker>,
    Body(req): Body<CreateProviderRequest>,
) -> ApiResult<Json<CreateProviderResponse>> {
    let (p, secret) = b.admin().create_provider(&req.email, None).await?;
    ok(CreateProviderResponse {
        provider_id: p.id,
        provider_key: secret,
    })
}

#[utoipa::path(
    get,
    path = "/v1/admin/providers/{id}",
    tag = "admin",
    description = "A provider with its nodes.",
    security(("session" = []), ("session_cookie" = []), ("api_key" = [])),
    params(("id" = String, Path, description = "The provider")),
    responses((status = 200, description = "The provider", body = AdminProviderView), super::openapi::Refusals)
)]
async fn provider_detail(
    _: Admin,
    State(b): State<Broker>,
    Path(id): Path<String>,
) -> ApiResult<Json<AdminProviderView>> {
    let id = ProviderId::new(id);
    ok(b.admin().provider_detail(&id).await?)
}

#[utoipa::path(
    post,
    path = "/v1/admin/providers/{id}/suspend",
    tag = "admin",
    description = "Suspends a provider: its key is refused and its nodes leave routing.",
    security(("session" = []), ("session_cookie" = []), ("api_key" = [])),
    params(("id" = String, Path, description = "The provider")),
    request_body = SuspendRequest,
    responses((status = 204, description = "Done"), super::openapi::Refusals)
)]
async fn suspend_provider(
    Admin(admin): Admin,
    State(b): State<Broker>,
    Path(id): Path<String>,
    Body(req): Body<SuspendRequest>,
) -> ApiResult<StatusCode> {
    let id = ProviderId::new(id);
    b.admin().suspend_provider(&admin, &id, &req.reason).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    post,
    path = "/v1/admin/providers/{id}/unsuspend",
    tag = "admin",
    description = "Lifts a provider's suspension.",
    security(("session" = []), ("session_cookie" = []), ("api_key" = [])),
    params(("id" = String, Path, description = "The provider")),
    responses((status = 204, description = "Done"), super::openapi::Refusals)
)]
async fn unsuspend_provider(
    Admin(admin): Admin,
    State(b): State<Broker>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let id = ProviderId::new(id);
    b.admin().unsuspend_provider(&admin, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    get,
    path = "/v1/admin/provisions",
    tag = "admin",
    description = "Every node.",
    security(("session" = []), ("session_cookie" = []), ("api_key" = [])),
    responses((status = 200, description = "Nodes", body = Vec<AdminProvisionView>), super::openapi::Refusals)
)]
async fn provisions(_: Admin, State(b): State<Broker>) -> ApiResult<Json<Vec<AdminProvisionView>>> {
    ok(b.admin().provisions().await?)
}

#[utoipa::path(
    delete,
    path = "/v1/admin/provisions/{id}",
    tag = "admin",
    description = "Disconnects a node: it leaves every pool.",
    security(("session" = []), ("session_cookie" = []), ("api_key" = [])),
    params(("id" = String, Path, description = "The node")),
    responses((status = 204, description = "Done"), super::openapi::Refusals)
)]
async fn disconnect(
    Admin(admin): Admin,
    State(b): State<Broker>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let id = ProvisionId::new(id);
    b.admin().delete_provision(&admin, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    put,
    path = "/v1/admin/prices",
    tag = "admin",
    description = "Sets the price of a service (and optionally a model).",
    security(("session" = []), ("session_cookie" = []), ("api_key" = [])),
    request_body = PriceEntry,
    responses((status = 200, description = "The price stored", body = PriceEntry), super::openapi::Refusals)
)]
async fn put_price(
    _: Admin,
    State(b): State<Broker>,
    Body(price): Body<PriceEntry>,
) -> ApiResult<Json<PriceEntry>> {
    b.admin().put_price(price.clone()).await?;
    ok(price)
}

#[utoipa::path(
    get,
    path = "/v1/admin/prices",
    tag = "admin",
    description = "Every price in force.",
    security(("session" = []), ("session_cookie" = []), ("api_key" = [])),
    responses((status = 200, description = "Prices", body = Vec<PriceEntry>), super::openapi::Refusals)
)]
async fn prices(_: Admin, State(b): State<Broker>) -> ApiResult<Json<Vec<PriceEntry>>> {
    ok(b.prices().all())
}

#[utoipa::path(
    get,
    path = "/v1/admin/notifications",
    tag = "admin",
    description = "Every notification.",
    security(("session" = []), ("session_cookie" = []), ("api_key" = [])),
    responses((status = 200, description = "Notifications", body = Vec<Notification>), super::openapi::Refusals)
)]
async fn notifications(_: Admin, State(b): State<Broker>) -> ApiResult<Json<Vec<Notification>>> {
    ok(b.admin().notifications().await?)
}

#[utoipa::path(
    post,
    path = "/v1/admin/notifications",
    tag = "admin",
    description = "Creates a notification.",
    security(("session" = []), ("session_cookie" = []), ("api_key" = [])),
    request_body = NotificationRequest,
    responses((status = 201, description = "The notification", body = Notification), super::openapi::Refusals)
)]
async fn create_notification(
    _: Admin,
    State(b): State<Broker>,
    Body(req): Body<NotificationRequest>,
) -> ApiResult<Response> {
    let n = b.admin().put_notification(None, req).await?;
    Ok((StatusCode::CREATED, Json(n)).into_response())
}

#[utoipa::path(
    put,
    path = "/v1/admin/notifications/{id}",
    tag = "admin",
    description = "Replaces a notification.",
    security(("session" = []), ("session_cookie" = []), ("api_key" = [])),
    params(("id" = String, Path, description = "The notification")),
    request_body = NotificationRequest,
    responses((status = 200, description = "The notification", body = Notification), super::openapi::Refusals)
)]
async fn replace_notification(
    _: Admin,
    State(b): State<Broker>,
    Path(id): Path<String>,
    Body(req): Body<NotificationRequest>,
) -> ApiResult<Json<Notification>> {
    let id = NotificationId::new(id);
    ok(b.admin().put_notification(Some(id), req).await?)
}

#[utoipa::path(
    delete,
    path = "/v1/admin/notifications/{id}",
    tag = "admin",
    description = "Deletes a notification.",
    security(("session" = []), ("session_cookie" = []), ("api_key" = [])),
    params(("id" = String, Path, description = "The notification")),
    responses((status = 204, description = "Done"), super::openapi::Refusals)
)]
async fn delete_notification(
    _: Admin,
    State(b): State<Broker>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let id = NotificationId::new(id);
    b.admin().delete_notification(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    get,
    path = "/v1/admin/catalogue",
    tag = "admin",
    description = "The catalogue of models in force: what nodes may serve.",
    security(("session" = []), ("session_cookie" = []), ("api_key" = [])),
    responses((status = 200, description = "The catalogue", body = Vec<CatalogueModel>), super::openapi::Refusals)
)]
async fn catalogue(_: Admin, State(b): State<Broker>) -> ApiResult<Json<Vec<CatalogueModel>>> {
    ok(b.admin().catalogue())
}

#[utoipa::path(
    put,
    path = "/v1/admin/catalogue",
    tag = "admin",
    description = "Adds a model to the catalogue or changes its entry (minimum tier 1-4, \
        target nodes); nodes below a raised minimum tier leave its pool.",
    security(("session" = []), ("session_cookie" = []), ("api_key" = [])),
    request_body = CatalogueModel,
    responses((status = 200, description = "The entry stored, and the nodes that left its pool", body = CatalogueChange), super::openapi::Refusals)
)]
async fn put_catalogue(
    _: Admin,
    State(b): State<Broker>,
    Body(model): Body<CatalogueModel>,
) -> ApiResult<Json<CatalogueChange>> {
    ok(b.admin().put_catalogue_model(model).await?)
}

#[utoipa::path(
    delete,
    path = "/v1/admin/catalogue/{service}/{model}",
    tag = "admin",
    description = "Removes a model from the catalogue: every node serving it leaves its pool \
        and calls for it get `model_not_found`. The last model cannot be removed (409).",
    security(("session" = []), ("session_cookie" = []), ("api_key" = [])),
    params(
        ("service" = Service, Path, description = "The service"),
        ("model" = String, Path, description = "The model name, percent-encoded"),
    ),
    responses((status = 200, description = "How many nodes left the pool", body = CatalogueChange), super::openapi::Refusals)
)]
async fn delete_catalogue(
    _: Admin,
    State(b): State<Broker>,
    Path((service, model)): Path<(Service, String)>,
) -> ApiResult<Json<CatalogueChange>> {
    ok(b.admin().delete_catalogue_model(service, &model).await?)
}

#[utoipa::path(
    get,
    path = "/v1/admin/aliases",
    tag = "admin",
    description = "The model aliases in force, by name: each stands for models tried in order.",
    security(("session" = []), ("session_cookie" = []), ("api_key" = [])),
    responses((status = 200, description = "The aliases", body = Vec<ModelAlias>), super::openapi::Refusals)
)]
async fn aliases(_: Admin, State(b): State<Broker>) -> ApiResult<Json<Vec<ModelAlias>>> {
    ok(b.admin().aliases())
}

#[utoipa::path(
    put,
    path = "/v1/admin/aliases",
    tag = "admin",
    description = "Defines an alias or changes it: 1-4 models, tried in order as a request's \
        `models`. Refused (400): a name a catalogue model uses, a model named twice, a model \
        that is itself an alias. Other hosts see it after their next refresh.",
    security(("session" = []), ("session_cookie" = []), ("api_key" = [])),
    request_body = ModelAlias,
    responses((status = 200, description = "The alias stored", body = ModelAlias), super::openapi::Refusals)
)]
async fn put_alias(
    _: Admin,
    State(b): State<Broker>,
    Body(alias): Body<ModelAlias>,
) -> ApiResult<Json<ModelAlias>> {
    ok(b.admin().put_alias(alias).await?)
}

#[utoipa::path(
    delete,
    path = "/v1/admin/aliases/{alias}",
    tag = "admin",
    description = "Removes an alias: calls naming it get `model_not_found`.",
    security(("session" = []), ("session_cookie" = []), ("api_key" = [])),
    params(("alias" = String, Path, description = "The alias, percent-encoded")),
    responses((status = 204, description = "Removed"), super::openapi::Refusals)
)]
async fn delete_alias(
    _: Admin,
    State(b): State<Broker>,
    Path(alias): Path<String>,
) -> ApiResult<StatusCode> {
    b.admin().delete_alias(&alias).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    get,
    path = "/v1/admin/reward",
    tag = "admin",
    description = "The reward policy: how providers are paid and what the platform keeps.",
    security(("session" = []), ("session_cookie" = []), ("api_key" = [])),
    responses((status = 200, description = "The policy", body = RewardPolicyView), super::openapi::Refusals)
)]
async fn reward_policy(_: Admin, State(b): State<Broker>) -> ApiResult<Json<RewardPolicyView>> {
    ok(b.admin().reward_policy())
}
