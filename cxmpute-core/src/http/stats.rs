//! Usage analytics and metrics over HTTP.
//!
//! | route | who |
//! |---|---|
//! | `GET /v1/stats/network` | anyone: traffic and nodes, no money, no accounts |
//! | `GET /v1/stats/me` | a user: API key or session; their own usage and charges |
//! | `GET /v1/stats/provider` | a provider: provider key or the owner's session; earnings and nodes |
//! | `GET /v1/stats/admin` | an admin: everything, money included |
//! | `GET /metrics` | anyone: Prometheus text (aggregates only, see [`crate::metrics`]) |
//!
//! Every stats route takes `?from=YYYY-MM-DD&to=YYYY-MM-DD` (inclusive UTC
//! days, at most 366; default the last 30) and answers 400 otherwise. The
//! computations live in [`crate::analytics`].
//!
//! The public routes stay small whatever strangers register: the network's
//! lists of models and pools, and the per-pool series of `/metrics`, name at
//! most `BrokerConfig::public_list_limit` entries (the catalogue's pools
//! first) and count the rest.

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Json;

use super::extract::{Admin, KeyOrSession, ProviderAccount, Query};
use super::{ok, ApiResult, Routes};
use crate::analytics::{AdminStats, DateRange, NetworkStats, ProviderStats, RangeQuery, UserStats};
use crate::broker::Broker;
use crate::error::Error;

/// The stats and metrics routes.
pub(super) fn routes() -> Routes {
    Routes::new()
        .route("/v1/stats/network", get(network))
        .route("/v1/stats/me", get(me))
        .route("/v1/stats/provider", get(provider))
        .route("/v1/stats/admin", get(admin))
        .route("/metrics", get(metrics))
}

fn range(b: &Broker, q: &RangeQuery) -> Result<DateRange, Error> {
    Ok(DateRange::from_query(q, b.now().day())?)
}

/// Public network statistics.
#[utoipa::path(
    get, path = "/v1/stats/network", tag = "stats",
    description = "Traffic and nodes, no money and no accounts. The lists of models and pools \
        name at most the broker's list limit (100 by default): the busiest models, the \
        catalogue's pools and then the largest; `*_omitted` counts the rest.",
    params(RangeQuery),
    responses(
        (status = 200, description = "Traffic and nodes over the range", body = NetworkStats),
        (status = 400, description = "Bad range", body = crate::http::openapi::ErrorSchema),
    )
)]
pub(super) async fn network(
    State(b): State<Broker>,
    Query(q): Query<RangeQuery>,
) -> ApiResult<Json<NetworkStats>> {
    let r = range(&b, &q)?;
    ok(b.analytics().network(r).await?)
}

/// The caller's own usage: an API key or a signed-in session.
#[utoipa::path(
    get, path = "/v1/stats/me", tag = "stats",
    params(RangeQuery),
    security(("api_key" = []), ("session" = [])),
    responses(
        (status = 200, description = "The caller's usage over the range", body = UserStats),
        (status = 400, description = "Bad range", body = crate::http::openapi::ErrorSchema),
        (status = 401, description = "No valid key or session", body = crate::http::openapi::ErrorSchema),
    )
)]
pub(super) async fn me(
    KeyOrSession(user): KeyOrSession,
    State(b): State<Broker>,
    Query(q): Query<RangeQuery>,
) -> ApiResult<Json<UserStats>> {
    let r = range(&b, &q)?;
    ok(b.analytics().user(&user, r).await?)
}

/// The caller's earnings and nodes: a provider key or the owner's session.
#[utoipa::path(
    get, path = "/v1/stats/provider", tag = "stats",
    params(RangeQuery),
    security(("provider_key" = []), ("session" = [])),
    responses(
        (status = 200, description = "Earnings and node performance over the range", body = ProviderStats),
        (status = 400, description = "Bad range", body = crate::http::openapi::ErrorSchema),
        (status = 401, description = "No valid provider key or session", body = crate::http::openapi::ErrorSchema),
    )
)]
pub(super) async fn provider(
    ProviderAccount(p): ProviderAccount,
    State(b): State<Broker>,
    Query(q): Query<RangeQuery>,
) -> ApiResult<Json<ProviderStats>> {
    let r = range(&b, &q)?;
    ok(b.analytics().provider(&p, r).await?)
}

/// Totals for operators.
#[utoipa::path(
    get, path = "/v1/stats/admin", tag = "stats",
    params(RangeQuery),
    security(("api_key" = []), ("session" = [])),
    responses(
        (status = 200, description = "Everything over the range, money included", body = AdminStats),
        (status = 400, description = "Bad range", body = crate::http::openapi::ErrorSchema),
        (status = 401, description = "Not signed in", body = crate::http::openapi::ErrorSchema),
        (status = 403, description = "Not an admin", body = crate::http::openapi::ErrorSchema),
    )
)]
pub(super) async fn admin(
    _: Admin,
    State(b): State<Broker>,
    Query(q): Query<RangeQuery>,
) -> ApiResult<Json<AdminStats>> {
    let r = range(&b, &q)?;
    ok(b.analytics().admin(r).await?)
}

/// Prometheus metrics of this broker.
#[utoipa::path(
    get, path = "/metrics", tag = "observability",
    description = "Aggregates only. `cxmpute_pool_nodes` names at most the broker's list \
        limit of pools (the catalogue's first, then the largest) and only pools that have \
        nodes; `cxmpute_pools` counts them all.",
    responses((status = 200, description = "Prometheus text exposition format", content_type = "text/plain", body = String))
)]
pub(super) async fn metrics(State(b): State<Broker>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        b.metrics().render(&b),
    )
}
