//! The provider API: a provider manages its own nodes with its provider key.
//!
//! | route | does |
//! |---|---|
//! | `POST /v1/provider/provisions` | register a node ([`RegisterProvisionRequest`]) |
//! | `GET /v1/provider/provisions` | the provider's nodes |
//! | `GET /v1/provider/provisions/{id}` | one node |
//! | `POST /v1/provider/provisions/{id}/start` | get the services to run ([`StartProvisionRequest`]) |
//! | `POST /v1/provider/provisions/{id}/ready` | report the endpoint and services started ([`ReadyProvisionRequest`]) |
//! | `POST /v1/provider/provisions/{id}/heartbeat` | stay alive (204) |
//! | `POST /v1/provider/provisions/{id}/end` | leave every pool, keep the node (204) |
//! | `DELETE /v1/provider/provisions/{id}` | leave every pool and delete the node (204) |
//!
//! Another provider's node answers 404, exactly like a node that does not
//! exist. See [`crate::network`] for the lifecycle's rules.
//!
//! Limits ([`NetworkConfig`](crate::network::NetworkConfig)): a node serves
//! at most 64 (service, model) pairs by default, on registering and on
//! ready alike (400 above); a provider holds at most 32 nodes, ended ones
//! included (403 for the next, until one is deleted); location fields and
//! device diagnostics are size-capped (400).

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Json;

use super::extract::{Body, OptionalBody, Path, ProviderKey};
use super::Routes;
use super::{ok, ApiResult};
use crate::broker::Broker;
use crate::types::*;
use crate::wire::*;

/// The provider routes.
pub(super) fn routes() -> Routes {
    Routes::new()
        .route(
            "/v1/provider/provisions",
            post(register_provision).get(list_provisions),
        )
        .route(
            "/v1/provider/provisions/{id}",
            get(get_provision).delete(delete_provision),
        )
        .route("/v1/provider/provisions/{id}/start", post(start_provision))
        .route("/v1/provider/provisions/{id}/ready", post(ready_provision))
        .route("/v1/provider/provisions/{id}/heartbeat", post(heartbeat))
        .route("/v1/provider/provisions/{id}/end", post(end_provision))
}

#[utoipa::path(
    post,
    path = "/v1/provider/provisions",
    tag = "provider",
    description = "Registers a node (device diagnostics, location; optionally its endpoint and services). \
        Each service must be a catalogue model the node's tier allows (`GET /v1/catalogue`), as on \
        ready. Refused with 400 when it lists more services than a node may serve (64 by default) or its \
        location or diagnostics are too long, and with 403 when the provider already has as many \
        nodes as it may (32 by default, ended ones included).",
    security(("provider_key" = [])),
    request_body = RegisterProvisionRequest,
    responses((status = 200, description = "The node and its secret", body = RegisterProvisionResponse), super::openapi::Refusals)
)]
async fn register_provision(
    ProviderKey(p): ProviderKey,
    State(b): State<Broker>,
    Body(req): Body<RegisterProvisionRequest>,
) -> ApiResult<Json<RegisterProvisionResponse>> {
    ok(b.network().register_provision(&p, req).await?)
}

#[utoipa::path(
    get,
    path = "/v1/provider/provisions",
    tag = "provider",
    description = "The provider's nodes.",
    security(("provider_key" = [])),
    responses((status = 200, description = "Nodes", body = Vec<ProvisionView>), super::openapi::Refusals)
)]
async fn list_provisions(
    ProviderKey(p): ProviderKey,
    State(b): State<Broker>,
) -> ApiResult<Json<Vec<ProvisionView>>> {
    ok(b.network().provisions(&p).await?)
}

#[utoipa::path(
    get,
    path = "/v1/provider/provisions/{id}",
    tag = "provider",
    description = "One of the provider's nodes.",
    security(("provider_key" = [])),
    params(("id" = String, Path, description = "The node")),
    responses((status = 200, description = "The node", body = ProvisionView), super::openapi::Refusals)
)]
async fn get_provision(
    ProviderKey(p): ProviderKey,
    State(b): State<Broker>,
    Path(id): Path<String>,
) -> ApiResult<Json<ProvisionView>> {
    ok(b.network().provision(&p, &ProvisionId::new(id)).await?)
}

#[utoipa::path(
    post,
    path = "/v1/provider/provisions/{id}/start",
    tag = "provider",
    description = "Assigns the services the node should run.",
    security(("provider_key" = [])),
    params(("id" = String, Path, description = "The node")),
    request_body = StartProvisionRequest,
    responses((status = 200, description = "The services to start", body = StartProvisionResponse), super::openapi::Refusals)
)]
async fn start_provision(
    ProviderKey(p): ProviderKey,
    State(b): State<Broker>,
    Path(id): Path<String>,
    OptionalBody(req): OptionalBody<StartProvisionRequest>,
) -> ApiResult<Json<StartProvisionResponse>> {
    // The body is optional: no body asks for any service the tier allows.
    ok(b.network()
        .start_provision(&p, &ProvisionId::new(id), req)
        .await?)
}

#[utoipa::path(
    post,
    path = "/v1/provider/provisions/{id}/ready",
    tag = "provider",
    description = "Reports the endpoint and the services started; the node joins their pools. \
        At most as many services as a node may serve (64 by default).",
    security(("provider_key" = [])),
    params(("id" = String, Path, description = "The node")),
    request_body = ReadyProvisionRequest,
    responses((status = 200, description = "The node", body = ProvisionView), super::openapi::Refusals)
)]
async fn ready_provision(
    ProviderKey(p): ProviderKey,
    State(b): State<Broker>,
    Path(id): Path<String>,
    Body(req): Body<ReadyProvisionRequest>,
) -> ApiResult<Json<ProvisionView>> {
    ok(b.network()
        .ready_provision(&p, &ProvisionId::new(id), req)
        .await?)
}

#[utoipa::path(
    post,
    path = "/v1/provider/provisions/{id}/heartbeat",
    tag = "provider",
    description = "Keeps the node alive.",
    security(("provider_key" = [])),
    params(("id" = String, Path, description = "The node")),
    responses((status = 204, description = "Done"), super::openapi::Refusals)
)]
async fn heartbeat(
    ProviderKey(p): ProviderKey,
    State(b): State<Broker>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    b.network().heartbeat(&p, &ProvisionId::new(id)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    post,
    path = "/v1/provider/provisions/{id}/end",
    tag = "provider",
    description = "Leaves every pool and keeps the node.",
    security(("provider_key" = [])),
    params(("id" = String, Path, description = "The node")),
    responses((status = 204, description = "Done"), super::openapi::Refusals)
)]
async fn end_provision(
    ProviderKey(p): ProviderKey,
    State(b): State<Broker>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    b.network().end_provision(&p, &ProvisionId::new(id)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    delete,
    path = "/v1/provider/provisions/{id}",
    tag = "provider",
    description = "Leaves every pool and deletes the node.",
    security(("provider_key" = [])),
    params(("id" = String, Path, description = "The node")),
    responses((status = 204, description = "Done"), super::openapi::Refusals)
)]
async fn delete_provision(
    ProviderKey(p): ProviderKey,
    State(b): State<Broker>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    b.network()
        .delete_provision(&p, &ProvisionId::new(id))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
