//! The HTTP surface: an axum [`Router`] built from a [`Broker`].
//!
//! A host only serves it (see [`router`]), best with [`serve`], which puts
//! limits on every connection (header and body read timeouts, idle
//! connections, a cap on open ones) and gives the router the caller's
//! address. Every error is OpenAI's error JSON
//! with a status that means something:
//!
//! | status | when | `type` / `code` |
//! |---|---|---|
//! | 400 | malformed JSON, missing or wrong fields | `invalid_request_error` / `invalid_request` |
//! | 401 | missing, unknown or revoked key | `authentication_error` / `invalid_api_key` |
//! | 402 | the **account** balance does not cover the request: topping up fixes it | `insufficient_quota` / `insufficient_credits` |
//! | 403 | suspended account, route not permitted for the key, not an admin (or an admin's restricted key) | `permission_error` / `forbidden` |
//! | 404 | unknown model, unknown thing, another account's thing | `not_found_error` / `model_not_found` or `not_found` |
//! | 409 | already exists, conflicting change | `conflict_error` / `conflict` |
//! | 413 | request body over the limit | `invalid_request_error` / `payload_too_large` |
//! | 429 | the **key's** own credit limit, or the key's or its account's budget for the day or month, is spent (raise it, wait for the next period, or use another key); a key's or account's requests or tokens per minute are used up (with `Retry-After`); or a sign-in rate limit | `insufficient_quota` / `key_limit_reached` or `budget_exceeded`, `requests` or `tokens` / `rate_limit_exceeded`, or `rate_limit_error` / `rate_limited` |
//! | 502 | every node tried failed | `upstream_error` / `upstream_failed` |
//! | 503 | no healthy node serves the model, the store is unavailable, or a call's charge could not be committed (its answer withheld, nothing charged) | `service_unavailable` / `no_capacity`, `unavailable` or `not_charged` |
//! | 504 | every node tried timed out | `upstream_error` / `upstream_timeout` |
//!
//! 402 and 429 are kept apart on purpose: a 402 asks the account holder to
//! buy credits, a 429 `key_limit_reached` or `budget_exceeded` asks them to
//! change a key or account setting (a budget's message names the key's or
//! the account's and says when its next period starts); OpenAI's SDKs treat 429 as retryable, so these carry no
//! `Retry-After`.
//!
//! Every gateway answer after the key is known, refusals included, carries
//! OpenAI's rate-limit headers for each limit the call is under:
//! `x-ratelimit-limit-requests`, `x-ratelimit-remaining-requests`,
//! `x-ratelimit-reset-requests` (Go's duration format: `6s`, `1m0s`) and the
//! same three for `-tokens`. A dimension with no limit has no headers.

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, MatchedPath, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use axum::{Json, Router};
use bytes::Bytes;
use serde::Serialize;
use tower_http::trace::TraceLayer;
use tracing::Instrument;

use crate::broker::{Broker, GatewayRequest, GatewayResponse};
use crate::error::Error;
use crate::secret::Secret;
use crate::types::*;
use crate::wire::*;

mod account;
mod admin;
mod dashboard;
mod extract;
pub mod openapi;
mod pages;
mod provider;
mod provider_account;
mod serve;
mod stats;
pub(crate) mod workers;

pub use serve::{serve, shutdown_signal, ServeConfig};

/// The status, OpenAI `type` and `code` of an error.
pub(crate) fn error_parts(e: &Error) -> (StatusCode, &'static str, &'static str) {
    match e {
        Error::InvalidInput(_) => (
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_request",
        ),
        Error::Unauthorized(_) => (
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "invalid_api_key",
        ),
        Error::InsufficientCredits(_) => (
            StatusCode::PAYMENT_REQUIRED,
            "insufficient_quota",
            "insufficient_credits",
        ),
        Error::KeyLimitReached(_) => (
            StatusCode::TOO_MANY_REQUESTS,
            "insufficient_quota",
            "key_limit_reached",
        ),
        Error::BudgetExceeded(_) => (
            StatusCode::TOO_MANY_REQUESTS,
            "insufficient_quota",
            "budget_exceeded",
        ),
        Error::RateLimited(_) => (
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "rate_limited",
        ),
        // OpenAI's `type` says which limit: `requests` or `tokens`.
        Error::RateLimitExceeded { tokens, .. } => (
            StatusCode::TOO_MANY_REQUESTS,
            if *tokens { "tokens" } else { "requests" },
            "rate_limit_exceeded",
        ),
        Error::Forbidden(_) => (StatusCode::FORBIDDEN, "permission_error", "forbidden"),
        Error::ModelNotFound(_) => (StatusCode::NOT_FOUND, "not_found_error", "model_not_found"),
        Error::NotFound(_) => (StatusCode::NOT_FOUND, "not_found_error", "not_found"),
        Error::AlreadyExists(_) | Error::Conflict(_) => {
            (StatusCode::CONFLICT, "conflict_error", "conflict")
        }
        Error::PayloadTooLarge(_) => (
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "payload_too_large",
        ),
        Error::NoCapacity(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            "no_capacity",
        ),
        Error::Upstream(_) => (StatusCode::BAD_GATEWAY, "upstream_error", "upstream_failed"),
        Error::UpstreamTimeout(_) => (
            StatusCode::GATEWAY_TIMEOUT,
            "upstream_error",
            "upstream_timeout",
        ),
        Error::Unavailable { .. } => (
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            "unavailable",
        ),
        Error::NotCharged(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            "not_charged",
        ),
        Error::Backend { .. } => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "internal_error",
        ),
    }
}

/// An [`Error`] as an HTTP answer: OpenAI's error JSON with the status and
/// code the error maps to. Public so that routes an embedder (or the
/// provider node) serves next to the broker's answer errors the same way.
#[derive(Debug)]
pub struct ApiError(pub Error);

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        ApiError(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, kind, code) = error_parts(&self.0);
        let message = match &self.0 {
            // Internal details stay in the log.
            Error::Backend { .. } => {
                tracing::error!(error = %self.0, source = ?std::error::Error::source(&self.0), "internal error");
                "internal error".to_owned()
            }
            Error::Unavailable { .. } => {
                tracing::warn!(error = %self.0, "backend unavailable");
                "the service is temporarily unavailable; try again shortly".to_owned()
            }
            e => e.to_string(),
        };
        let body = ErrorBody {
            error: ErrorDetail {
                message,
                kind: kind.into(),
                code: Some(code.into()),
                param: None,
            },
        };
        let mut resp = (status, Json(body)).into_response();
        if matches!(
            self.0,
            Error::RateLimited(_)
                | Error::Unavailable { .. }
                | Error::NoCapacity(_)
                | Error::NotCharged(_)
        ) {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if let Error::RateLimitExceeded { retry_after, .. } = &self.0 {
            let secs = crate::ratelimit::whole_seconds(*retry_after);
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

/// The result of a handler.
pub(crate) type ApiResult<T> = std::result::Result<T, ApiError>;

/// The bearer secret of a request, if any.
pub(crate) fn bearer(headers: &HeaderMap) -> Option<Secret> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then(|| Secret::new(token))
}

/// Marks an answer that carries a secret shown once (tokens, keys): it must
/// not land in a shared or browser cache.
pub(crate) fn no_store(resp: &mut Response) {
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

/// Routing preferences a caller may send: `X-Cxmpute-Region: DE` prefers
/// nodes in that region (their location's country) and falls back to any
/// node when the region has none.
fn preferences(headers: &HeaderMap) -> crate::pool::RoutePreferences {
    match headers
        .get("x-cxmpute-region")
        .and_then(|v| v.to_str().ok())
    {
        Some(r) if r.len() <= 64 => crate::pool::RoutePreferences::region(r),
        _ => crate::pool::RoutePreferences::none(),
    }
}

/// What a call asks of the response cache (`X-Cxmpute-Cache: ttl=N` or
/// `no-store`); a value that is neither is a 400.
fn cache_directive(headers: &HeaderMap) -> Result<Option<crate::types::CacheDirective>, Error> {
    use crate::types::CacheDirective;
    let Some(v) = headers.get(CacheDirective::HEADER) else {
        return Ok(None);
    };
    v.to_str()
        .ok()
        .and_then(CacheDirective::parse)
        .map(Some)
        .ok_or_else(|| {
            Error::InvalidInput("X-Cxmpute-Cache must be `ttl=<seconds>` or `no-store`".to_owned())
        })
}

fn app_name(headers: &HeaderMap) -> Option<String> {
    let v = headers
        .get("x-title")
        .or_else(|| headers.get("http-referer"))?;
    let s = v.to_str().ok()?.trim();
    (!s.is_empty()).then(|| s.chars().take(100).collect())
}

async fn gateway(
    broker: Broker,
    route: Route,
    headers: HeaderMap,
    // An unreadable or oversized body is answered inside the request's span
    // and metrics, like any other refusal.
    body: Result<Bytes, Error>,
) -> ApiResult<Response> {
    let started = std::time::Instant::now();
    // One span per call: the pipeline fills in the model, the request id,
    // the node and attempts, and the outcome as they become known. Never
    // the key or the body. At DEBUG: an enabled span costs each poll of the
    // call an enter and an exit and each field a formatting, a sixth of the
    // host's CPU per call; at INFO the call's one line (`request settled`)
    // carries its own fields instead.
    let span = tracing::debug_span!(
        "request",
        route = %route,
        model = tracing::field::Empty,
        request_id = tracing::field::Empty,
        node = tracing::field::Empty,
        attempts = tracing::field::Empty,
        outcome = tracing::field::Empty,
        status = tracing::field::Empty,
    );
    let result = async {
        let req = GatewayRequest {
            api_key: bearer(&headers),
            route,
            body: body?,
            app: app_name(&headers),
            preferences: preferences(&headers),
            cache: cache_directive(&headers)?,
        };
        Ok::<_, Error>(broker.handle_limited(req).await)
    }
    .instrument(span.clone())
    .await;
    let (result, rate, lookup) = match result {
        Ok(answer) => answer,
        Err(e) => (Err(e), Default::default(), None),
    };
    let status = match &result {
        Ok(_) => StatusCode::OK,
        Err(e) => error_parts(e).0,
    };
    span.record("status", status.as_u16());
    if let Err(e) = &result {
        // Refusals are the caller's business (and cheap to provoke): debug.
        // Failures on our side or the nodes' are worth a warning.
        span.in_scope(|| {
            if status.is_server_error() {
                tracing::warn!(%route, status = status.as_u16(), error = %e, "request failed");
            } else {
                tracing::debug!(status = status.as_u16(), error = %e, "request refused");
            }
        });
    }
    broker
        .metrics()
        .http_request(route, status.as_u16(), started.elapsed());
    let mut resp = match result {
        Err(e) => ApiError(e).into_response(),
        Ok(GatewayResponse::Complete { content_type, body }) => {
            ([(header::CONTENT_TYPE, content_type)], body).into_response()
        }
        Ok(GatewayResponse::Stream { content_type, body }) => (
            [
                (header::CONTENT_TYPE, content_type),
                (header::CACHE_CONTROL, "no-cache".to_owned()),
            ],
            Body::from_stream(body),
        )
            .into_response(),
    };
    if let Some(l) = lookup {
        resp.headers_mut().insert(
            crate::types::CacheDirective::HEADER,
            HeaderValue::from_static(l.as_str()),
        );
    }
    // OpenAI's rate-limit headers, on answers and refusals alike.
    for (name, value) in rate.headers() {
        if let Ok(v) = HeaderValue::from_str(&value) {
            resp.headers_mut().insert(name, v);
        }
    }
    Ok(resp)
}

macro_rules! gateway_route {
    ($route:expr) => {
        post(
            |State(b): State<Broker>, extract::CallParts(h, body): extract::CallParts| {
                gateway(b, $route, h, body)
            },
        )
    };
}

/// Wraps a value as a JSON answer.
pub(crate) fn ok<T: Serialize>(v: T) -> ApiResult<Json<T>> {
    Ok(Json(v))
}

/// A route table: an axum [`Router`] that also remembers the paths it
/// serves, so that the OpenAPI document can be checked against what is
/// really served (see [`paths`]). Each area's `routes()` builds one; its
/// `route` and `merge` are axum's.
pub(crate) struct Routes {
    router: Router<Broker>,
    paths: Vec<String>,
}

impl Routes {
    /// An empty table.
    pub(crate) fn new() -> Self {
        Routes {
            router: Router::new(),
            paths: Vec::new(),
        }
    }

    /// Adds a route, as [`Router::route`] does, and records its path.
    pub(crate) fn route(mut self, path: &str, method_router: MethodRouter<Broker>) -> Self {
        self.router = self.router.route(path, method_router);
        self.paths.push(path.to_owned());
        self
    }

    /// Adds every route of another table. There is deliberately no way to
    /// merge a plain `Router`: its paths would escape the OpenAPI check.
    pub(crate) fn merge(mut self, other: Routes) -> Self {
        self.router = self.router.merge(other.router);
        self.paths.extend(other.paths);
        self
    }
}

/// Every route of the broker, before the state is attached.
fn table() -> Routes {
    Routes::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/v1/models",
            get(|State(b): State<Broker>| async move { Json(b.models()) }),
        )
        .route(
            "/v1/catalogue",
            get(|State(b): State<Broker>| async move { Json(b.network().offers()) }),
        )
        .route(
            Route::ChatCompletions.path(),
            gateway_route!(Route::ChatCompletions),
        )
        .route(Route::Embeddings.path(), gateway_route!(Route::Embeddings))
        .route(
            Route::AudioSpeech.path(),
            gateway_route!(Route::AudioSpeech),
        )
        .route(Route::Tts.path(), gateway_route!(Route::Tts))
        .route(Route::Scrape.path(), gateway_route!(Route::Scrape))
        .route(Route::Caption.path(), gateway_route!(Route::Caption))
        .route(Route::Query.path(), gateway_route!(Route::Query))
        .route(Route::Detect.path(), gateway_route!(Route::Detect))
        .route(Route::Point.path(), gateway_route!(Route::Point))
        .merge(provider::routes())
        .merge(admin::routes())
        .merge(account::routes())
        .merge(provider_account::routes())
        .merge(stats::routes())
        .merge(dashboard::routes())
        .merge(pages::routes())
        .merge(openapi::routes())
}

/// Every route of the broker: the gateway, the provider API and the admin API.
///
/// Each area keeps its routes in its own module (`provider`, `admin`, ...) and
/// one route table merges them.
pub fn router(broker: Broker) -> Router {
    let limit = broker.config().max_body_bytes;
    table()
        .router
        .fallback(|| async { ApiError(Error::NotFound("no such route".into())).into_response() })
        .layer(DefaultBodyLimit::max(limit))
        .layer(
            // A span per HTTP request, named by the route's pattern (never
            // the query string or a token). Not for gateway calls: their own
            // `request` span names the route, and a second span per call
            // (made, entered at every poll, closed) was a sixth of the
            // tracing a proxied call paid for.
            TraceLayer::new_for_http().make_span_with(|req: &axum::http::Request<Body>| {
                let path = req
                    .extensions()
                    .get::<MatchedPath>()
                    .map_or("unmatched", MatchedPath::as_str);
                if Route::ALL.iter().any(|r| r.path() == path) {
                    return tracing::Span::none();
                }
                tracing::info_span!("http", method = %req.method(), path)
            }),
        )
        .with_state(broker)
}

/// Every path [`router`] serves, as written in its routes (`{id}` for
/// parameters), sorted. The OpenAPI test walks these.
pub fn paths() -> Vec<String> {
    let mut p = table().paths;
    p.sort();
    p.dedup();
    p
}
