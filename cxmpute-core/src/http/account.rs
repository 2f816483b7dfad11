//! Sign-in, sessions and the signed-in user's own account.
//!
//! | route | who |
//! |---|---|
//! | `POST /v1/auth/code` | anyone (rate-limited per email, per client address and in all) |
//! | `POST /v1/auth/verify` | anyone with the mailed code |
//! | `POST /v1/auth/refresh` | the holder of a refresh token (body or cookie; rate-limited per session) |
//! | `POST /v1/auth/logout` | the holder of a refresh or access token |
//! | `GET /v1/me`, `GET /v1/me/usage` | a signed-in user |
//! | `PATCH /v1/me` | a signed-in user: the account's budget and alerts |
//! | `GET`/`POST /v1/me/keys`, `PATCH`/`DELETE /v1/me/keys/{id}` | a signed-in user, own keys only |
//! | `GET /v1/notifications` | anyone: the notifications shown now |
//!
//! Sessions travel as `Authorization: Bearer <access token>` or as the
//! `cx_access` cookie; the session routes set both cookies `HttpOnly`,
//! `Secure`, `SameSite=Strict`, so another site can neither read nor send them.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use axum::{Extension, Json};
use serde::Deserialize;

use super::extract::{Body, OptionalBody, Path, Query, SessionUser};
use super::Routes;
use super::{bearer, no_store, ok};
use super::{ApiError, ApiResult};
use crate::broker::Broker;
use crate::error::Error;
use crate::secret::Secret;
use crate::sessions::{Credentials, Refused, SessionTokens};
use crate::types::*;
use crate::wire::*;

/// The access-token cookie: sent on every path.
pub(crate) const ACCESS_COOKIE: &str = "cx_access";
/// The refresh-token cookie: sent only to the session routes.
pub(crate) const REFRESH_COOKIE: &str = "cx_refresh";
const REFRESH_COOKIE_PATH: &str = "/v1/auth";

/// The user and session routes.
pub(super) fn routes() -> Routes {
    Routes::new()
        .route("/v1/auth/code", post(request_code))
        .route("/v1/auth/verify", post(verify))
        .route("/v1/auth/refresh", post(refresh))
        .route("/v1/auth/logout", post(logout))
        .route("/v1/me", get(me).patch(update_account))
        .route("/v1/me/usage", get(usage))
        .route("/v1/me/keys", get(list_keys).post(create_key))
        .route("/v1/me/keys/{id}", patch(update_key).delete(revoke_key))
        .route("/v1/notifications", get(active_notifications))
}

/// The value of a cookie, from every `Cookie` header of the request.
pub(super) fn cookie(h: &HeaderMap, name: &str) -> Option<Secret> {
    h.get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, v)| *k == name && !v.is_empty())
        .map(|(_, v)| Secret::new(v.trim_matches('"')))
}

/// The credentials a request carries.
pub(super) fn credentials(h: &HeaderMap) -> Credentials {
    Credentials {
        bearer: bearer(h),
        access_cookie: cookie(h, ACCESS_COOKIE),
    }
}

fn set_cookie(resp: &mut Response, name: &str, value: &str, path: &str, max_age: u64) {
    let c = format!(
        "{name}={value}; Path={path}; Max-Age={max_age}; HttpOnly; Secure; SameSite=Strict"
    );
    // Tokens are base64url or alphanumeric, always a valid header value; a
    // cookie that cannot be set is dropped rather than breaking the answer.
    if let Ok(v) = HeaderValue::from_str(&c) {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
}

fn session_answer(b: &Broker, t: &SessionTokens) -> Response {
    let body = t.to_response(b.now());
    let mut resp = Json(&body).into_response();
    set_cookie(
        &mut resp,
        ACCESS_COOKIE,
        t.access_token.expose(),
        "/",
        body.expires_in,
    );
    set_cookie(
        &mut resp,
        REFRESH_COOKIE,
        t.refresh_token.expose(),
        REFRESH_COOKIE_PATH,
        body.refresh_expires_in,
    );
    no_store(&mut resp);
    resp
}

/// The answer to a refused sign-in step: the error, with the rate limit's
/// own `Retry-After` when one refused it.
fn refused(r: Refused) -> Response {
    let mut resp = ApiError(r.error).into_response();
    if let Some(wait) = r.retry_after {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(wait.as_secs()));
    }
    resp
}

/// An address as proxies write it: `203.0.113.5`, `2001:db8::1`, with a port
/// (`203.0.113.5:4711`, `[2001:db8::1]:4711`) or in brackets.
fn parse_addr(v: &str) -> Option<IpAddr> {
    v.parse::<IpAddr>()
        .ok()
        .or_else(|| v.parse::<SocketAddr>().ok().map(|a| a.ip()))
        .or_else(|| v.strip_prefix('[')?.strip_suffix(']')?.parse().ok())
}

/// The caller's address: from the trusted proxy header when one is
/// configured and present, else the connection's peer (known when the
/// router is served with connect info, as [`super::serve`] does).
fn client_ip(b: &Broker, h: &HeaderMap, peer: Option<SocketAddr>) -> Option<IpAddr> {
    let from_header = b
        .config()
        .auth
        .client_ip_header
        .as_deref()
        .and_then(|name| {
            // The last address: the one the trusted proxy added (earlier ones
            // in a list came from the caller).
            let v = h.get_all(name).iter().next_back()?.to_str().ok()?;
            parse_addr(v.rsplit(',').next()?.trim())
        });
    let ip = from_header.or(peer.map(|a| a.ip()));
    static WARNED: AtomicBool = AtomicBool::new(false);
    if ip.is_none() && !WARNED.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            "the caller's address is unknown, so sign-in codes are not limited per client: \
             serve the router with `cxmpute_core::http::serve` (or axum's connect info), or \
             set a trusted client address header"
        );
    }
    ip
}

#[utoipa::path(
    post,
    path = "/v1/auth/code",
    tag = "auth",
    description = "Mails a sign-in code to the address. Rate-limited per email, per client \
        address and in all: over a limit the answer is 429 with `Retry-After`, and nothing is sent.",
    request_body = RequestCodeRequest,
    responses((status = 202, description = "The code was sent", body = RequestCodeResponse), super::openapi::Refusals)
)]
async fn request_code(
    State(b): State<Broker>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    h: HeaderMap,
    Body(req): Body<RequestCodeRequest>,
) -> ApiResult<Response> {
    let client = client_ip(&b, &h, peer.map(|Extension(ConnectInfo(a))| a));
    if let Err(r) = b.sessions().issue_code(&req.email, client).await {
        return Ok(refused(r));
    }
    let out = RequestCodeResponse {
        status: "sent".into(),
        expires_in: b.config().auth.code_ttl.as_secs(),
    };
    Ok((StatusCode::ACCEPTED, Json(out)).into_response())
}

#[utoipa::path(
    post,
    path = "/v1/auth/verify",
    tag = "auth",
    description = "Exchanges a mailed code for a session (also set as HttpOnly cookies).",
    request_body = VerifyCodeRequest,
    responses((status = 200, description = "A new session", body = SessionResponse), super::openapi::Refusals)
)]
async fn verify(
    State(b): State<Broker>,
    Body(req): Body<VerifyCodeRequest>,
) -> ApiResult<Response> {
    let t = b.sessions().verify_code(&req.email, &req.code).await?;
    Ok(session_answer(&b, &t))
}

/// The refresh token from the body, else from the cookie. An empty body is fine.
fn refresh_token(h: &HeaderMap, body: RefreshRequest) -> Option<Secret> {
    body.refresh_token.or_else(|| cookie(h, REFRESH_COOKIE))
}

#[utoipa::path(
    post,
    path = "/v1/auth/refresh",
    tag = "auth",
    description = "Rotates a refresh token (from the body or its cookie) into a new session.",
    request_body = RefreshRequest,
    responses((status = 200, description = "A new session", body = SessionResponse), super::openapi::Refusals)
)]
async fn refresh(
    State(b): State<Broker>,
    h: HeaderMap,
    OptionalBody(body): OptionalBody<RefreshRequest>,
) -> ApiResult<Response> {
    let token = refresh_token(&h, body).ok_or_else(|| {
        Error::Unauthorized("send the refresh token in the body or its cookie".into())
    })?;
    match b.sessions().refresh_session(&token).await {
        Ok(t) => Ok(session_answer(&b, &t)),
        Err(r) => Ok(refused(r)),
    }
}

#[utoipa::path(
    post,
    path = "/v1/auth/logout",
    tag = "auth",
    description = "Ends the session (its whole token family) and clears the cookies.",
    request_body = RefreshRequest,
    responses((status = 204, description = "Done"), super::openapi::Refusals)
)]
async fn logout(
    State(b): State<Broker>,
    h: HeaderMap,
    OptionalBody(body): OptionalBody<RefreshRequest>,
) -> ApiResult<Response> {
    let token = refresh_token(&h, body);
    let creds = credentials(&h);
    b.sessions()
        .logout(token.as_ref(), creds.access_token())
        .await?;
    let mut resp = StatusCode::NO_CONTENT.into_response();
    set_cookie(&mut resp, ACCESS_COOKIE, "", "/", 0);
    set_cookie(&mut resp, REFRESH_COOKIE, "", REFRESH_COOKIE_PATH, 0);
    no_store(&mut resp);
    Ok(resp)
}

#[utoipa::path(
    get,
    path = "/v1/me",
    tag = "account",
    description = "The signed-in user's account.",
    security(("session" = []), ("session_cookie" = [])),
    responses((status = 200, description = "The account", body = MeResponse), super::openapi::Refusals)
)]
async fn me(
    SessionUser(user): SessionUser,
    State(b): State<Broker>,
) -> ApiResult<Json<MeResponse>> {
    let a = b.accounts();
    ok(a.me(&user).await?)
}

#[utoipa::path(
    patch,
    path = "/v1/me",
    tag = "account",
    description = "Changes the account's budget per UTC day or month (over all its keys; `null` \
                   removes it) or its alert emails (`alerts` replaces the ones set). Absent \
                   fields stay.",
    security(("session" = []), ("session_cookie" = [])),
    request_body = UpdateAccountRequest,
    responses((status = 200, description = "The account", body = MeResponse), super::openapi::Refusals)
)]
async fn update_account(
    SessionUser(user): SessionUser,
    State(b): State<Broker>,
    Body(req): Body<UpdateAccountRequest>,
) -> ApiResult<Json<MeResponse>> {
    let a = b.accounts();
    ok(a.update_account(&user, req).await?)
}

#[derive(Deserialize)]
struct UsageQuery {
    #[serde(default = "thirty")]
    days: u32,
}

fn thirty() -> u32 {
    30
}

#[utoipa::path(
    get,
    path = "/v1/me/usage",
    tag = "account",
    description = "Usage over the last `days` days.",
    security(("session" = []), ("session_cookie" = [])),
    params(("days" = Option<u32>, Query, description = "1 to 90; default 30")),
    responses((status = 200, description = "Usage per day and per service", body = UsageResponse), super::openapi::Refusals)
)]
async fn usage(
    SessionUser(user): SessionUser,
    State(b): State<Broker>,
    Query(q): Query<UsageQuery>,
) -> ApiResult<Json<UsageResponse>> {
    let a = b.accounts();
    ok(a.usage(&user, q.days).await?)
}

#[utoipa::path(
    get,
    path = "/v1/me/keys",
    tag = "account",
    description = "The user's active API keys (never their secrets).",
    security(("session" = []), ("session_cookie" = [])),
    responses((status = 200, description = "The keys", body = Vec<ApiKeyView>), super::openapi::Refusals)
)]
async fn list_keys(
    SessionUser(user): SessionUser,
    State(b): State<Broker>,
) -> ApiResult<Json<Vec<ApiKeyView>>> {
    let a = b.accounts();
    ok(a.active_keys(&user)
        .await?
        .iter()
        .map(ApiKeyView::from)
        .collect())
}

#[utoipa::path(
    post,
    path = "/v1/me/keys",
    tag = "account",
    description = "Creates an API key; its secret is shown once.",
    security(("session" = []), ("session_cookie" = [])),
    request_body = CreateKeyRequest,
    responses((status = 201, description = "The key and its secret", body = CreateKeyResponse), super::openapi::Refusals)
)]
async fn create_key(
    SessionUser(user): SessionUser,
    State(b): State<Broker>,
    Body(req): Body<CreateKeyRequest>,
) -> ApiResult<Response> {
    let a = b.accounts();
    let (key, secret) = a.create_key(&user, req).await?;
    let out = CreateKeyResponse {
        key: ApiKeyView::from(&key),
        api_key: secret,
    };
    let mut resp = (StatusCode::CREATED, Json(out)).into_response();
    no_store(&mut resp);
    Ok(resp)
}

#[utoipa::path(
    patch,
    path = "/v1/me/keys/{id}",
    tag = "account",
    description = "Changes a key's name, credit limit, permitted routes or rate limits (`rpm`, \
                   `tpm`). Absent fields stay; `null` removes a limit.",
    security(("session" = []), ("session_cookie" = [])),
    params(("id" = String, Path, description = "The key")),
    request_body = UpdateKeyRequest,
    responses((status = 200, description = "The key", body = ApiKeyView), super::openapi::Refusals)
)]
async fn update_key(
    SessionUser(user): SessionUser,
    State(b): State<Broker>,
    Path(id): Path<String>,
    Body(req): Body<UpdateKeyRequest>,
) -> ApiResult<Json<ApiKeyView>> {
    let a = b.accounts();
    let id = ApiKeyId::new(id);
    let key = a.update_key(&user, &id, req).await?;
    ok(ApiKeyView::from(&key))
}

#[utoipa::path(
    delete,
    path = "/v1/me/keys/{id}",
    tag = "account",
    description = "Revokes a key for good.",
    security(("session" = []), ("session_cookie" = [])),
    params(("id" = String, Path, description = "The key")),
    responses((status = 204, description = "Done"), super::openapi::Refusals)
)]
async fn revoke_key(
    SessionUser(user): SessionUser,
    State(b): State<Broker>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let a = b.accounts();
    let id = ApiKeyId::new(id);
    a.revoke_key(&user, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
struct PlacementQuery {
    #[serde(default)]
    placement: Option<Placement>,
}

#[utoipa::path(
    get,
    path = "/v1/notifications",
    tag = "account",
    description = "The notifications shown now.",
    params(("placement" = Option<Placement>, Query, description = "Only those shown there")),
    responses((status = 200, description = "Notifications", body = Vec<Notification>), super::openapi::Refusals)
)]
async fn active_notifications(
    State(b): State<Broker>,
    Query(q): Query<PlacementQuery>,
) -> ApiResult<Json<Vec<Notification>>> {
    ok(b.accounts().active_notifications(q.placement).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_addresses_parse_with_or_without_ports() {
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        assert_eq!(parse_addr("203.0.113.5"), ip("203.0.113.5"));
        assert_eq!(parse_addr("203.0.113.5:4711"), ip("203.0.113.5"));
        assert_eq!(parse_addr("2001:db8::1"), ip("2001:db8::1"));
        assert_eq!(parse_addr("[2001:db8::1]"), ip("2001:db8::1"));
        assert_eq!(parse_addr("[2001:db8::1]:4711"), ip("2001:db8::1"));
        assert_eq!(parse_addr("unknown"), None);
        assert_eq!(parse_addr(""), None);
    }
}
