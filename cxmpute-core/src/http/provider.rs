//! The provider API: a provider manages its own nodes with its provider key.

use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{delete, post};
use axum::{Json, Router};
use bytes::Bytes;

use super::{bearer, json_body, ok, ApiResult};
use crate::broker::Broker;
use crate::types::*;
use crate::wire::*;

/// The provider routes.
pub(super) fn routes() -> Router<Broker> {
    Router::new()
        .route(
            "/v1/provider/provisions",
            post(register_provision).get(list_provisions),
        )
        .route("/v1/provider/provisions/{id}", delete(end_provision))
        .route("/v1/provider/provisions/{id}/heartbeat", post(heartbeat))
}

async fn register_provision(
    State(b): State<Broker>,
    h: HeaderMap,
    body: std::result::Result<Bytes, BytesRejection>,
) -> ApiResult<Json<RegisterProvisionResponse>> {
    let p = b.authenticate_provider(bearer(&h).as_ref()).await?;
    let req: RegisterProvisionRequest = json_body(body)?;
    ok(b.register_provision(&p, req).await?)
}

async fn list_provisions(
    State(b): State<Broker>,
    h: HeaderMap,
) -> ApiResult<Json<Vec<ProvisionView>>> {
    let p = b.authenticate_provider(bearer(&h).as_ref()).await?;
    ok(b.provider_provisions(&p).await?)
}

async fn heartbeat(
    State(b): State<Broker>,
    h: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let p = b.authenticate_provider(bearer(&h).as_ref()).await?;
    b.heartbeat(&p, &ProvisionId::new(id)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn end_provision(
    State(b): State<Broker>,
    h: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let p = b.authenticate_provider(bearer(&h).as_ref()).await?;
    b.end_provision(&p, &ProvisionId::new(id)).await?;
    Ok(StatusCode::NO_CONTENT)
}
