//! The provider's own account: summary, key rotation, earnings and nodes.
//!
//! Every route takes either the provider key (refused while the provider is
//! suspended) or the session of the user who owns the provider account; a
//! provider only ever sees its own account. Node lifecycle routes live in
//! the `provider` module.

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Json;

use super::account::credentials;
use super::Routes;
use super::{ok, ApiResult};
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

async fn account(
    State(b): State<Broker>,
    h: HeaderMap,
) -> ApiResult<Json<ProviderAccountResponse>> {
    let a = b.accounts();
    let p = a.provider(&credentials(&h)).await?;
    ok(a.provider_account(&p).await?)
}

async fn rotate_key(State(b): State<Broker>, h: HeaderMap) -> ApiResult<Response> {
    let a = b.accounts();
    let p = a.provider(&credentials(&h)).await?;
    let key = a.rotate_provider_key(&p).await?;
    let mut resp = Json(ProviderKeyResponse {
        provider_id: p.id,
        provider_key: key,
    })
    .into_response();
    // The key is shown once: keep it out of caches.
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}

async fn earnings(State(b): State<Broker>, h: HeaderMap) -> ApiResult<Json<EarningsResponse>> {
    let a = b.accounts();
    let p = a.provider(&credentials(&h)).await?;
    ok(a.earnings(&p).await?)
}

async fn provisions(State(b): State<Broker>, h: HeaderMap) -> ApiResult<Json<Vec<ProvisionView>>> {
    let p = b.accounts().provider(&credentials(&h)).await?;
    ok(b.provider_provisions(&p).await?)
}
