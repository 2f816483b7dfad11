//! The extractors every handler takes its inputs through: bodies, paths and
//! queries that reject with our [`ApiError`] (OpenAI's error JSON), and the
//! caller ([`Admin`], [`ProviderKey`], [`ProviderAccount`], [`SessionUser`],
//! [`KeyOrSession`]), authenticated before the handler runs. Handlers name
//! their caller in their signature rather than checking credentials in their
//! body, and the admin route table accepts only handlers that take [`Admin`]
//! first (see `admin::AdminHandler`).
//!
//! Caller extractors go first in a handler's arguments, so a caller who may
//! not call is refused before the path, query or body is looked at.

use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use bytes::Bytes;
use serde::de::DeserializeOwned;

use super::account::credentials;
use super::{bearer, ApiError};
use crate::broker::Broker;
use crate::error::Error;
use crate::types::{Provider, User, UserId};

/// The raw body, within the broker's body limit (413 over it).
pub(crate) struct RawBody(pub Bytes);

impl FromRequest<Broker> for RawBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &Broker) -> Result<Self, ApiError> {
        let body = Bytes::from_request(req, state).await;
        Ok(RawBody(body_bytes(body)?))
    }
}

/// A gateway call's headers and raw body (or why the body could not be
/// read, which the gateway answers inside the call's span and metrics). The
/// headers are moved out of the request: axum's `HeaderMap` extractor
/// copies them, on every call.
pub(crate) struct CallParts(pub HeaderMap, pub Result<Bytes, Error>);

impl FromRequest<Broker> for CallParts {
    type Rejection = std::convert::Infallible;

    async fn from_request(mut req: Request, state: &Broker) -> Result<Self, Self::Rejection> {
        let headers = std::mem::take(req.headers_mut());
        let body = Bytes::from_request(req, state).await;
        Ok(CallParts(headers, body_bytes(body)))
    }
}

/// The body, or the right error when it is too large or unreadable.
fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, Error> {
    body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Error::PayloadTooLarge("request body is too large".into())
        } else {
            Error::InvalidInput(format!("unreadable body: {r}"))
        }
    })
}

fn parse_json<T: DeserializeOwned>(b: &[u8]) -> Result<T, Error> {
    serde_json::from_slice(b).map_err(|e| Error::InvalidInput(format!("invalid request body: {e}")))
}

/// A JSON body parsed into `T`, with a clear 400 when it does not parse (any
/// content type is accepted: clients are sloppy about it).
pub(crate) struct Body<T>(pub T);

impl<T: DeserializeOwned> FromRequest<Broker> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &Broker) -> Result<Self, ApiError> {
        let RawBody(b) = RawBody::from_request(req, state).await?;
        Ok(Body(parse_json(&b)?))
    }
}

/// An optional JSON body: an empty (or blank) body is `T::default()`.
pub(crate) struct OptionalBody<T>(pub T);

impl<T: DeserializeOwned + Default> FromRequest<Broker> for OptionalBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &Broker) -> Result<Self, ApiError> {
        let RawBody(b) = RawBody::from_request(req, state).await?;
        if b.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalBody(T::default()));
        }
        Ok(OptionalBody(parse_json(&b)?))
    }
}

/// Path parameters, or a 400 in OpenAI's error shape.
pub(crate) struct Path<T>(pub T);

impl<T: DeserializeOwned + Send> FromRequestParts<Broker> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Broker) -> Result<Self, ApiError> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(t)) => Ok(Path(t)),
            Err(e) => Err(Error::InvalidInput(format!("bad path parameter: {e}")).into()),
        }
    }
}

/// Query parameters, or a 400 in OpenAI's error shape.
pub(crate) struct Query<T>(pub T);

impl<T: DeserializeOwned> FromRequestParts<Broker> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Broker) -> Result<Self, ApiError> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(t)) => Ok(Query(t)),
            Err(e) => {
                Err(Error::InvalidInput(format!("bad query parameters: {}", e.body_text())).into())
            }
        }
    }
}

/// An admin, checked on this request (see [`crate::sessions::Sessions::admin`]):
/// an admin's session or an admin's unrestricted API key. The only way for a
/// handler to get the admin `User`.
pub(crate) struct Admin(pub User);

impl FromRequestParts<Broker> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, b: &Broker) -> Result<Self, ApiError> {
        Ok(Admin(
            b.sessions().admin(&credentials(&parts.headers)).await?,
        ))
    }
}

/// A provider calling with its provider key (the node API: a session is not
/// enough there).
pub(crate) struct ProviderKey(pub Provider);

impl FromRequestParts<Broker> for ProviderKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, b: &Broker) -> Result<Self, ApiError> {
        Ok(ProviderKey(
            b.sessions()
                .authenticate_provider(bearer(&parts.headers).as_ref())
                .await?,
        ))
    }
}

/// A provider calling with its provider key or its owner's session.
pub(crate) struct ProviderAccount(pub Provider);

impl FromRequestParts<Broker> for ProviderAccount {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, b: &Broker) -> Result<Self, ApiError> {
        Ok(ProviderAccount(
            b.sessions().provider(&credentials(&parts.headers)).await?,
        ))
    }
}

/// The user of a signed-in session (an API key is refused).
pub(crate) struct SessionUser(pub User);

impl FromRequestParts<Broker> for SessionUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, b: &Broker) -> Result<Self, ApiError> {
        Ok(SessionUser(
            b.sessions()
                .session(&credentials(&parts.headers))
                .await?
                .user,
        ))
    }
}

/// A user calling with an API key or a signed-in session: the account the
/// key belongs to, or the session's.
pub(crate) struct KeyOrSession(pub UserId);

impl FromRequestParts<Broker> for KeyOrSession {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, b: &Broker) -> Result<Self, ApiError> {
        let creds = credentials(&parts.headers);
        let user = match creds.key() {
            Some(k) => b.sessions().authenticate_key(Some(k)).await?.user_id,
            None => b.sessions().session(&creds).await?.user.id,
        };
        Ok(KeyOrSession(user))
    }
}
